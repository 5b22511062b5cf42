"""``lossguide experiment autoguidance``: the shipped MNIST DDPM guided by a bad version of itself.

Autoguidance (Karras et al. 2024, §3): D_w = D_bad + w·(D_good − D_bad) with D_good the shipped ``mnist-ddpm`` and
D_bad ``mnist-ddpm-bad`` (half the width per level, 1/4 of the parameters, 900 instead of 7,500 iterations; same
data, schedule and seed). Unguided: FID/KID on the judge's features against the 1,000 held-out digits, and the
judge's confidence, for w ∈ {1, 1.5, 2, 2.5, 3} (w = 1 is the good model alone) plus the bad model alone (w = 0),
all on the same seeds. Guided: the class task with the paper's method on the guide's feature distance
(``shen2024``, loss kind ``feature``, target = seed mod 10), and the backprop-free ``dreamguider``, each on the good
model and on the autoguided prior at w = 2 (fixed in advance, not picked on these seeds).

Full run: DDIM-25 (η = 0); the unguided rows on seeds 0–999, the guided rows on seeds 0–99 (10 per class).
Measured per sample on one thread of a shared 2-core machine (load ≈ 5): 0.75 s for the good model's 25 steps,
0.65–0.95 s autoguided, ≈ 0.2 s for the bad model alone, 3.6 s for shen2024 (51 evaluations with backprop through
the UNet) and 0.86 s for dreamguider on the good model: ≈ 95 min in all there; the time scales with the per-thread
speed (≈ 40 min at 2.4× it). ``--quick``: 16 seeds, DDIM-10, w ∈ {0, 1, 2}, the guided rows on 2 seeds: a
smoke run of every code path (its FIDs on a few samples mean nothing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from lossguide import metrics, presets
from lossguide.autoguidance import AutoGuided, autoguidance
from lossguide.experiments import command_line
from lossguide.samplers import DDIM
from lossguide.sampling import sample
from lossguide.writers import md_table, pyplot, save_fig, write_csv, write_report

log = logging.getLogger(__name__)

W_GRID = (1.0, 1.5, 2.0, 2.5, 3.0)
W_GUIDED = 2.0
FULL = {"seeds": list(range(1000)), "steps": 25, "ws": (0.0, *W_GRID), "guided_seeds": list(range(100))}
QUICK = {"seeds": list(range(16)), "steps": 10, "ws": (0.0, 1.0, 2.0), "guided_seeds": list(range(2))}
BATCH = 100


def prior(good, bad, w: float):
    """The good denoiser for w = 1 (bit-identical to ``autoguidance(good, bad, 1)``, half the cost), else D_w."""
    return good if w == 1.0 else (bad if w == 0.0 else autoguidance(good, bad, w))


def generate(den, shape, seeds: Sequence[int], steps: int, guidance=None, loss_for=None, augment=None) -> dict:
    """Samples in [−1, 1] for ``seeds`` (DDIM-``steps``, batches of :data:`BATCH`), with counters and wall time;
    ``loss_for(seeds)`` builds the per-batch loss when ``guidance`` is given."""
    sampler = DDIM(den.schedule, steps)
    xs, nfe, grads = [], 0, 0
    t0 = time.perf_counter()
    for b in range(0, len(seeds), BATCH):
        part = list(seeds[b : b + BATCH])
        res = sample(den, sampler, guidance, loss_for(part) if guidance is not None else None, shape=shape,
                     seeds=part, augment=augment)  # fmt: skip
        xs.append(res.x0.detach().clamp(-1, 1))
        nfe, grads = res.stats.nfe, res.stats.denoiser_grads
    wall = time.perf_counter() - t0
    per_call = 2 if isinstance(den, AutoGuided) and den.w not in (0.0, 1.0) else 1  # networks per denoiser call
    return {"x": torch.cat(xs), "nfe": nfe, "net_calls_per_sample": nfe * per_call, "denoiser_grads": grads,
            "wall_s": wall}  # fmt: skip


def judge_stats(kit, x: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
    """The judge's mean top probability, the share above 0.9, the TV distance of its class histogram to uniform,
    and with ``targets`` its validity and mean p(target)."""
    p = metrics.classify(kit.nets["judge"], x).double().cpu()
    top = p.max(1).values
    hist = torch.bincount(p.argmax(1), minlength=10).double() / len(x)
    row = {"judge_conf": float(top.mean()), "judge_conf_0.9": float((top >= 0.9).double().mean()),
           "class_tv": float(0.5 * (hist - 0.1).abs().sum())}  # fmt: skip
    if targets is not None:
        t = targets.long().cpu()
        row["judge_validity"] = float((p.argmax(1) == t).double().mean())
        row["judge_p_target"] = float(p[torch.arange(len(t)), t].mean())
    return row


def _row(kit, gen: dict, **info) -> dict:
    row = {**info, "n": len(gen["x"]), **kit.fid_kid(gen["x"])}
    row.update({k: gen[k] for k in ("nfe", "net_calls_per_sample", "denoiser_grads")})
    row["wall_s_per_sample"] = gen["wall_s"] / len(gen["x"])
    return row


def run(out, quick: bool = False) -> dict:
    """Unguided FID/confidence vs w, and autoguidance under class guidance; writes report.md, results.*, a figure."""
    from lossguide.experiments.mnist import MnistKit
    from lossguide.models import load_denoiser

    cfg = QUICK if quick else FULL
    t_start = time.perf_counter()
    kit = MnistKit()
    good = kit.model.denoiser
    bad = load_denoiser("mnist-ddpm-bad").denoiser
    shape, steps = kit.model.sample_shape, cfg["steps"]
    seeds = cfg["seeds"]
    rows, images = [], {}
    for w in cfg["ws"]:
        gen = generate(prior(good, bad, w), shape, seeds, steps)
        rows.append(_row(kit, gen, part="unguided", method="none", w=w, **judge_stats(kit, gen["x"])))
        images[("none", w)] = gen["x"][:16]
        log.info("unguided w=%g: FID %.2f, judge confidence %.3f", w, rows[-1]["fid"], rows[-1]["judge_conf"])
    gseeds = cfg["guided_seeds"]
    targets = torch.tensor([s % 10 for s in gseeds])
    guided_cfgs = {"shen2024": presets.get("shen2024"), "dreamguider": presets.get("dreamguider")}

    def loss_for(part):
        return kit.loss("guide", [s % 10 for s in part], "feature")

    for name, gcfg in guided_cfgs.items():
        for w in (1.0, W_GUIDED):
            gen = generate(prior(good, bad, w), shape, gseeds, steps, gcfg, loss_for, kit.model.augment)
            row = _row(kit, gen, part="class-feature", method=name, w=w, **judge_stats(kit, gen["x"], targets))
            row["guide_feature_loss"] = float(kit.class_loss("guide", gen["x"], targets, "feature").mean())
            rows.append(row)
            images[(name, w)] = gen["x"][:16]
            log.info("%s w=%g: validity %.3f, FID %.2f", name, w, row["judge_validity"], row["fid"])
    wall = time.perf_counter() - t_start
    _figure(rows, images, out)
    write_csv(out / "results.csv", rows)
    unguided = [r for r in rows if r["part"] == "unguided"]
    guided = [r for r in rows if r["part"] != "unguided"]
    best = min((r for r in unguided if r["w"] >= 1), key=lambda r: r["fid"])
    base = next(r for r in unguided if r["w"] == 1.0)
    body = [
        "Autoguidance (Karras et al. 2024): D_w = D_bad + w·(D_good − D_bad), D_good = `mnist-ddpm`, D_bad = "
        "`mnist-ddpm-bad` (widths 16/32/64 instead of 32/64/128, 900 instead of 7,500 iterations, same data, "
        "schedule and seed; see the manifest). w = 1 is the good model alone, w = 0 the bad model alone.",
        "",
        f"Seeds {seeds[0]}–{seeds[-1]} (n = {len(seeds)}), DDIM-{steps} (η = 0), the same seeds for every w. FID/KID "
        "on the judge's 128-d features against the 1,000 held-out digits; judge confidence = mean top softmax "
        "probability; class TV = total variation of the judge's class histogram to uniform (0: balanced).",
        "",
        "## Unguided",
        "",
        md_table(unguided, ["w", "fid", "kid_x1e3", "judge_conf", "judge_conf_0.9", "class_tv", "net_calls_per_sample",
                            "wall_s_per_sample"],
                 ["w", "FID", "KID×10³", "judge conf.", "conf ≥ 0.9", "class TV", "nets/sample", "s/sample"]),
        "",
        _reading(unguided, guided, best, base, quick),
        "",
        "## Class guidance (guide feature distance ‖f(x0) − μ_y‖, target = seed mod 10)",
        "",
        f"Seeds {gseeds[0]}–{gseeds[-1]} (n = {len(gseeds)}), DDIM-{steps}; `shen2024` at its preset defaults "
        "(η = 0.03, |T| = 10 digit augmentations, time travel 3× in t/T ∈ [0.3, 0.8]), `dreamguider` at its defaults "
        f"(no backprop through the denoiser); w = {W_GUIDED:g} was fixed in advance.",
        "",
        md_table(guided, ["method", "w", "judge_validity", "judge_p_target", "fid", "kid_x1e3", "guide_feature_loss",
                          "denoiser_grads", "net_calls_per_sample", "wall_s_per_sample"],
                 ["method", "w", "judge validity", "judge p(target)", "FID", "KID×10³", "guide loss",
                  "denoiser grads", "nets/sample", "s/sample"]),
        "",
        "![FID and judge confidence against w](autoguidance.png)",
        "",
        "![the first 16 samples of each row](samples.png)",
        "",
        f"Wall time {wall:.0f} s." + (" Quick mode: 16 samples, FID/KID are not meaningful." if quick else ""),
    ]  # fmt: skip
    data = {"rows": rows, "seeds": [seeds[0], seeds[-1]], "guided_seeds": [gseeds[0], gseeds[-1]], "steps": steps,
            "w_guided": W_GUIDED, "quick": quick, "wall_s": wall}  # fmt: skip
    write_report(out, "Autoguidance on MNIST", command_line("autoguidance", quick), body, data)
    return {"best_w": best["w"], "fid_w1": base["fid"], "fid_best": best["fid"], "wall_s": wall}


def _reading(unguided: list[dict], guided: list[dict], best: dict, base: dict, quick: bool) -> str:
    """The report's reading, from the numbers."""
    bad = next((r for r in unguided if r["w"] == 0.0), None)
    top = max(unguided, key=lambda r: r["w"])
    text = (f"**Reading.** The bad model alone has FID {bad['fid']:.2f} against the good model's {base['fid']:.2f}. "
            if bad else "**Reading.** ")  # fmt: skip
    if best["w"] == 1.0:
        text += f"No w > 1 lowers the good model's FID ({base['fid']:.2f} at w = 1). "
    else:
        text += f"The lowest FID is at w = {best['w']:g}: {best['fid']:.2f} against {base['fid']:.2f} at w = 1. "
    text += (f"Judge confidence goes from {base['judge_conf']:.3f} (w = 1) to {top['judge_conf']:.3f} "
             f"(w = {top['w']:g}), the class histogram's TV to uniform from {base['class_tv']:.3f} to "
             f"{top['class_tv']:.3f}. ")  # fmt: skip
    for name in ("shen2024", "dreamguider"):
        g = {r["w"]: r for r in guided if r["method"] == name}
        if len(g) == 2:
            a, b = g[1.0], g[W_GUIDED]
            text += (f"{name}: judge validity {a['judge_validity']:.3f} → {b['judge_validity']:.3f}, FID "
                     f"{a['fid']:.2f} → {b['fid']:.2f} from w = 1 to w = {W_GUIDED:g}. ")  # fmt: skip
    if quick:
        text += "(Quick mode: a handful of samples; these numbers only show that every path runs.)"
    return text.strip()


def _figure(rows: list[dict], images: dict, out) -> None:
    plt = pyplot()
    un = sorted((r for r in rows if r["part"] == "unguided"), key=lambda r: r["w"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    ws = [r["w"] for r in un]
    axes[0].plot(ws, [r["fid"] for r in un], "o-", label="unguided")
    axes[1].plot(ws, [r["judge_conf"] for r in un], "o-", label="unguided")
    for name, marker in (("shen2024", "s"), ("dreamguider", "^")):
        g = sorted((r for r in rows if r["method"] == name), key=lambda r: r["w"])
        axes[0].plot([r["w"] for r in g], [r["fid"] for r in g], marker + "--", label=f"{name} (class)")
        axes[1].plot([r["w"] for r in g], [r["judge_p_target"] for r in g], marker + "--",
                     label=f"{name}: p(target)")  # fmt: skip
    axes[0].set(xlabel="autoguidance weight w", ylabel="FID (judge features, log scale)", yscale="log")
    axes[1].set(xlabel="autoguidance weight w", ylabel="judge confidence")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_fig(fig, out / "autoguidance.png")
    keys = list(images)
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 0.75 * len(keys) + 0.2), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        imgs = list(images[key][:, 0])
        imgs += [torch.full_like(imgs[0], -1.0)] * (16 - len(imgs))  # pad short rows to 16 digits
        ax.imshow(torch.cat(imgs, dim=1).cpu().numpy(), cmap="gray", vmin=-1, vmax=1, aspect="equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{key[0]}\nw = {key[1]:g}", fontsize=6, rotation=0, ha="right", va="center")
    fig.subplots_adjust(hspace=0.08)
    save_fig(fig, out / "samples.png")
