"""The paper's analysis experiments (Shen et al. 2024, §3–4, Fig. 1–2, Tables 4–6) on the shipped MNIST models.

Each function is one ``lossguide experiment NAME``: it writes ``report.md`` (tables, figures, the command
and a reading whose verdict is computed from the numbers by the rule stated in the report), PNG figures,
``results.json`` and ``results.csv`` into ``out``. Seed sets are fixed here and recorded in the JSON:
evaluation seeds start at 0, with target class ``seed mod 10``; step parameters come from
the settings store ``lossguide/harness/settings.json`` (tuned on seeds ≥ 1000).
"""

from __future__ import annotations

import logging
import math
import statistics
import time

import numpy as np
import torch

from lossguide import presets
from lossguide.augment import policy
from lossguide.experiments import command_line
from lossguide.experiments.mnist import MnistKit, config
from lossguide.guidance import GuidanceEngine, GuidanceStats
from lossguide.harness import settings
from lossguide.harness.settings import step_or_start
from lossguide.metrics import classify, holm, mcnemar
from lossguide.rng import make_generators, randn
from lossguide.samplers import DDIM
from lossguide.writers import md_table, pyplot, save_fig, write_csv, write_report

log = logging.getLogger(__name__)

_KIT: MnistKit | None = None


def kit() -> MnistKit:
    """The MNIST kit, loaded once per process."""
    global _KIT
    if _KIT is None:
        _KIT = MnistKit()
    return _KIT


#: images per class in the Fig. 2 experiment (the first runs used 3: 30 images, too few to decide a 10-point gap;
#: 20 makes 200, as many as one CPU-hour allows: the augmented row costs |T| = 10 guide passes per image and step)
GRADIENT_BACKGROUNDS = 20
ALPHA = 0.05  # the paired tests' family-wise level (Holm)


def paired_vs(success: dict[str, list], base: str, others: list[str]) -> list[dict]:
    """Each of ``others`` against ``base`` on the same items: counts valid for one side only, McNemar's exact p,
    Holm-adjusted over ``others``, and the verdict at :data:`ALPHA`."""
    tests = [mcnemar(success[o], success[base]) for o in others]
    adj = holm([t["p"] for t in tests])
    return [{"guided by": o, "vs": base, "only this": t["a_only"], f"only {base}": t["b_only"], "p": f"{t['p']:.2g}",
             "p (Holm)": f"{p:.2g}",
             "verdict": ("more valid" if t["a_only"] > t["b_only"] else "less valid") if p < ALPHA
             else "not distinguishable"} for o, t, p in zip(others, tests, adj, strict=True)]  # fmt: skip


def _verdict(ok: bool, partly: bool = False) -> str:
    return "**confirmed**" if ok else ("**partly confirmed**" if partly else "**not confirmed**")


# -- 1. loss curves (Fig. 1) -----------------------------------------------------------------------------
def _task(loss: str) -> str:
    """The settings section of a class loss kind."""
    return "class" if loss == "ce" else "class-feature"


def _title(title: str, loss: str) -> str:
    return title if loss == "ce" else f"{title}, feature-distance loss"


def _loss_words(loss: str) -> str:
    return ("cross-entropy −log p(y|x0_hat) of the guide (saturating)" if loss == "ce" else
            "feature distance ‖f(x0_hat) − μ_y‖₂ of the guide (unsquared, μ_y on its training split A)")


def loss_curves(out, quick: bool = False, loss: str = "ce") -> dict:
    """Guide loss ℓ(x0_hat_t) along FreeDoM trajectories, successful vs failed (by the judge), against
    the guide loss of real held-out digits (Fig. 1)."""
    k = kit()
    n, steps = (10, 10) if quick else (100, 50)
    seeds = list(range(n))
    cfg = config("freedom", _task(loss))
    gen = k.generate(cfg, seeds, steps, kind=loss)
    trace = np.stack([tr[2].double().numpy() for tr in gen.loss_trace])  # [guided steps, n]
    ts = np.array([t for _, t, _ in gen.loss_trace])
    judge_label = classify(k.nets["judge"], gen.x).argmax(1).cpu()
    success = (judge_label == gen.targets).numpy()
    final_guide = k.class_loss("guide", gen.x, gen.targets, loss).numpy()
    final_judge = k.class_loss("judge", gen.x, gen.targets, loss).numpy()
    real = k.class_loss("guide", k.real_x, k.real_y, loss).numpy()
    real_med, real_mean, real_p95 = float(np.median(real)), float(real.mean()), float(np.quantile(real, 0.95))
    guide_label = classify(k.nets["guide"], gen.x).argmax(1).cpu().numpy()

    def group(mask):
        if not mask.any():
            return {"n": 0}
        return {
            "n": int(mask.sum()),
            "final_guide_loss_median": float(np.median(final_guide[mask])),
            "final_guide_loss_mean": float(final_guide[mask].mean()),
            "final_judge_loss_median": float(np.median(final_judge[mask])),
            "share_below_real_median": float((final_guide[mask] <= real_med).mean()),
            "share_below_real_p95": float((final_guide[mask] <= real_p95).mean()),
            "guide_says_target": float((guide_label[mask] == gen.targets.numpy()[mask]).mean()),
            "x0_hat_loss_median_by_step": np.median(trace[:, mask], axis=1).tolist(),
        }

    g_ok, g_bad = group(success), group(~success)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for mask, label, color in ((success, "successful (judge)", "tab:green"), (~success, "failed (judge)", "tab:red")):
        if mask.any():
            q = np.quantile(trace[:, mask], [0.25, 0.5, 0.75], axis=1)
            ax.plot(ts, q[1], color=color, label=f"{label}, n={int(mask.sum())}")
            ax.fill_between(ts, q[0], q[2], color=color, alpha=0.2)
    ax.axhline(real_med, color="k", ls="--", label="real held-out digits (median)")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("diffusion time t")
    ax.set_ylabel("guide loss of x0_hat (median, IQR)")
    ax.legend(fontsize=8)
    ax.set_title("FreeDoM on MNIST: guide loss along the trajectory")
    save_fig(fig, out / "loss_curves.png")

    rows = [{"group": "successful", **{k2: v for k2, v in g_ok.items() if "by_step" not in k2}},
            {"group": "failed", **{k2: v for k2, v in g_bad.items() if "by_step" not in k2}},
            {"group": "real held-out", "n": len(real), "final_guide_loss_median": real_med,
             "final_guide_loss_mean": real_mean, "real_p95": real_p95}]  # fmt: skip
    write_csv(out / "results.csv", rows)
    # the paper: failed samples also reach low guide loss (misaligned gradients)
    ok = g_bad["n"] > 0 and g_bad["final_guide_loss_median"] <= real_p95
    partly = g_bad["n"] > 0 and g_bad["guide_says_target"] >= 0.5
    head = (
        f"judge success {success.mean():.0%}; failed samples' median final guide loss "
        f"{g_bad.get('final_guide_loss_median', float('nan')):.3g} vs real digits' median {real_med:.3g} and 95th "
        f"percentile {real_p95:.3g}; the guide labels {g_bad.get('guide_says_target', float('nan')):.0%} of the "
        "failed samples as their target"
    )
    body = [
        f"FreeDoM (scale {cfg.rho.scale:g}, the {_task(loss)} setting it ran with), "
        f"DDIM-{steps}, seeds 0–{n - 1} (target = seed mod 10), guide = `mnist-guide`, success = the judge "
        f"(`mnist-judge`, never guides) labels the sample as its target.",
        "",
        md_table(
            rows,
            [
                "group",
                "n",
                "final_guide_loss_median",
                "final_guide_loss_mean",
                "final_judge_loss_median",
                "share_below_real_p95",
                "guide_says_target",
            ],
        ),  # fmt: skip
        "",
        "![loss curves](loss_curves.png)",
        "",
        f"**Reading.** Paper's claim (Fig. 1): failed generations also reach low guide loss, because the "
        f"guide's gradients are misaligned. Rule: confirmed if the failed samples' median final guide loss lies "
        f"within the real digits' range (≤ their 95th percentile; the guide is so confident on real digits that "
        f"their median, the first rule we wrote, is ≈ 0.002), partly if the guide labels at least half of the "
        f"failed samples as their target. Here: {head}. "
        f"Verdict: {_verdict(ok, partly)}.",
    ]
    write_report(out, _title("Loss curves (paper Fig. 1)", loss), command_line("loss-curves", quick, loss), body,
                 {"seeds": seeds, "steps": steps, "method": cfg.to_dict(), "groups": {"successful": g_ok,
                  "failed": g_bad}, "t": ts.tolist(), "real_guide_loss_median": real_med,
                  "verdict_confirmed": bool(ok)})  # fmt: skip
    return {"headline": head, "confirmed": bool(ok), "success_rate": float(success.mean())}


@torch.no_grad()
def sdedit(k: MnistKit, x: torch.Tensor, t0: int = 250, steps: int = 50, seed0: int = 5000) -> torch.Tensor:
    """Project images onto the model's data manifold (SDEdit, Meng et al. 2022): noise to t0, then unguided
    DDIM back to 0. A drawn digit keeps its class; an adversarial texture does not."""
    sampler = DDIM(k.model.denoiser.schedule, steps)
    i0 = next(i for i in range(len(sampler)) if int(sampler.timesteps[i]) <= t0)
    gens = make_generators(range(seed0, seed0 + len(x)))
    ab = k.model.denoiser.schedule.at(int(sampler.timesteps[i0]))
    xt = ab**0.5 * x + (1 - ab) ** 0.5 * randn(tuple(x.shape[1:]), gens)
    for i in range(i0, len(sampler)):
        out = k.model.denoiser(xt, int(sampler.timesteps[i]))
        xt = sampler.step(xt, out.x0_hat, out.eps, i, gens)
    return xt.clamp(-1, 1)


# -- 2. gradients from random backgrounds (Fig. 2) -------------------------------------------------------
def gradients(out, quick: bool = False, loss: str = "ce") -> dict:
    """Accumulated normalised gradient steps x ← clip(x − lr·g/‖g‖) from random backgrounds toward each class,
    for the robust, noise-aware (fed t = T(1 − k/K) at step k), plain, and plain + augmentation nets (Fig. 2)."""
    k = kit()
    n_steps, lr, n_aug = (10, 0.1, 2) if quick else (150, 0.1, 10)
    n_bg = 1 if quick else GRADIENT_BACKGROUNDS  # backgrounds per class
    classes = [s % 10 for s in range(10 * n_bg)]
    gens = make_generators(range(10 * n_bg))
    # a random dark background like MNIST's: −0.7 plus smooth (7×7 upsampled) and fine noise, in [−1, 1]
    coarse = randn((1, 7, 7), gens)
    x_init = (-0.7 + 0.3 * torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear")
              + 0.1 * randn((1, 28, 28), gens)).clamp(-1, 1)  # fmt: skip
    aug = policy("digits")
    targets = torch.tensor(classes)
    n_img = len(classes)
    T = 1000
    variants = {
        "robust": ("robust", None),
        "noise-aware": ("noise-aware", None),
        "plain": ("guide", None),
        "plain + augmentation": ("guide", aug),
    }
    finals, projected, rows, success = {}, {}, [], {}
    for label, (net_name, augment) in variants.items():
        x = x_init.clone()
        loss_fn = k.loss(net_name, classes, loss)
        aug_gens = make_generators(range(1000, 1000 + n_img))
        for step in range(n_steps):
            xv = x.detach().requires_grad_(True)
            if net_name == "noise-aware":
                L = loss_fn(xv, int(round(T * (1 - (step + 1) / n_steps))))
            elif augment is not None:
                L = k.loss(net_name, classes, loss)(augment(xv, aug_gens, n_aug)).view(n_img, n_aug).mean(1)
            else:
                L = loss_fn(xv)
            (g,) = torch.autograd.grad(L.sum(), xv)
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x = (x - lr * g).clamp(-1, 1).detach()
        finals[label] = x
        projected[label] = sdedit(k, x)
        success[label] = (classify(k.nets["judge"], projected[label]).argmax(1).cpu() == targets).tolist()
        rows.append({
            "guided by": label,
            "plain-guide loss": float(k.class_loss("guide", x, targets, loss).mean()),
            "robust loss": float(k.class_loss("robust", x, targets, loss).mean()),
            "judge validity": k.validity("judge", x, targets),
            "judge validity after SDEdit": k.validity("judge", projected[label], targets),
            "judge labels after SDEdit (first 10; targets 0–9)": "".join(
                str(int(c)) for c in classify(k.nets["judge"], projected[label][:10]).argmax(1)),
        })  # fmt: skip
    plt = pyplot()
    n_rows = 2 * len(variants) + 1
    fig, axes = plt.subplots(n_rows, 10, figsize=(10, 1.05 * n_rows))
    labels = ["start"]
    for c in range(10):
        axes[0, c].imshow(x_init[c, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
        axes[0, c].set_title(str(c), fontsize=8)
        for r, label in enumerate(variants):
            axes[1 + 2 * r, c].imshow(finals[label][c, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            axes[2 + 2 * r, c].imshow(projected[label][c, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
    for label in variants:
        labels += [label, "  → SDEdit"]
    for r, label in enumerate(labels):
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    for a in axes.flat:
        a.set_xticks([])
        a.set_yticks([])
    save_fig(fig, out / "gradients.png")
    write_csv(out / "results.csv", rows)
    key = "judge validity after SDEdit"
    pairs = paired_vs(success, "plain", [v for v in variants if v != "plain"])
    better = {p["guided by"]: p["verdict"] == "more valid" for p in pairs}
    ok = all(better.values())
    partly = better["robust"] or better["noise-aware"]
    head = ", ".join(f"{r['guided by']} {r[key]:.0%}" for r in rows) + " judge validity after SDEdit"
    body = [
        f"{n_steps} normalised gradient steps of size {lr} (L2, per image) on the {_loss_words(loss)} "
        "(the noise-aware row: −log p(y|x_t, t), its training loss) from one random dark "
        f"background per image "
        f"({n_img} images, seeds 0–{n_img - 1}, target = seed mod 10; the grid shows the first 10); "
        f"the noise-aware classifier is fed t = 1000·(1 − k/{n_steps}) at "
        f"step k; augmentation averages the gradient over |T| = {n_aug} `digits` augmentations (±2 px shift, "
        "zoom 0.9–1.1, fill −1; seeds 1000 + image).",
        "",
        "![gradients](gradients.png)",
        "",
        md_table(rows, list(rows[0])),
        "",
        f"Paired on the same {n_img} images (McNemar's exact test on recognised-after-SDEdit, Holm over the three "
        "comparisons):",
        "",
        md_table(pairs, list(pairs[0])),
        "",
        "The judge is itself a plain network: on these off-manifold images it answers 8 almost always, so its raw "
        "validity says little. Each image is therefore also projected onto the model's data manifold by SDEdit "
        "(noise to t = 250, unguided DDIM back; seeds 5000 + image) and judged there: a drawn digit keeps its class, "
        "an adversarial texture does not.",
        "",
        "**Reading.** Paper's claim (Fig. 2): gradients of robust and time-dependent classifiers are perceptually "
        "aligned (they draw the class), a plain classifier's are adversarial (its loss falls without the class "
        "appearing), and augmentation partly fixes the plain classifier. Rule: confirmed if the judge recognises "
        "the target more often after robust, noise-aware and plain + augmentation steps than after plain steps, "
        f"each by McNemar's test on the same images at Holm-adjusted p < {ALPHA} (partly: robust or noise-aware "
        "only). The rule was changed after the 30-image runs, which compared point estimates; it was written before "
        f"this {n_img}-image run. Here: {head}. Verdict: {_verdict(ok, partly)}.",
    ]
    write_report(out, _title("Gradients from random backgrounds (paper Fig. 2)", loss), command_line("gradients", quick, loss), body,
                 {"n_steps": n_steps, "lr": lr, "n_aug": n_aug, "seeds": list(range(n_img)), "rows": rows,
                  "pairs": pairs, "success_after_sdedit": success, "verdict_confirmed": bool(ok)})  # fmt: skip
    return {"headline": head, "confirmed": bool(ok), "rows": rows}


# -- 3. adversarial gap (Table 4) -------------------------------------------------------------------------
#: Table 4's samples: n = 500 on seeds disjoint from development (issue 23; the first runs used seeds 0–99)
GAP_N, GAP_SEED0 = 500, 50000
GAP_BOOT = 2000  # bootstrap resamples of the gap ratio's interval


def gap_ratio_interval(robust_plain, robust_ra, robust_real, n_boot: int = GAP_BOOT, seed: int = 0):
    """95% percentile-bootstrap interval of (mean ℓ_rob(RA) − mean ℓ_rob(real)) / (mean ℓ_rob(plain) − mean
    ℓ_rob(real)): the guided seeds resampled together (the two sets are paired), the real digits on their own."""
    g = torch.Generator().manual_seed(seed)
    n, m = len(robust_plain), len(robust_real)
    i = torch.randint(n, (n_boot, n), generator=g)
    j = torch.randint(m, (n_boot, m), generator=g)
    real = robust_real[j].mean(1)
    ratio = (robust_ra[i].mean(1) - real) / (robust_plain[i].mean(1) - real)
    lo, hi = torch.quantile(ratio, torch.tensor([0.025, 0.975], dtype=ratio.dtype))
    return float(lo), float(hi)


def adversarial_gap(out, quick: bool = False, loss: str = "ce") -> dict:
    """Guide by {plain, plain + RA, robust} (FreeDoM, each scale tuned on its own), plus real digits; evaluate each
    set's loss and validity under {plain, robust, judge}, with paired tests on the same seeds (Table 4)."""
    from lossguide.metrics import sign_test

    k = kit()
    n, steps, n_aug = (10, 10, 2) if quick else (GAP_N, 50, 10)
    seeds = list(range(GAP_SEED0, GAP_SEED0 + n))
    base = config("freedom", _task(loss))
    # plain + RA at its own tuned scale (lossguide bench --methods freedom+ra)
    ra = presets.with_techniques(config("freedom+ra", _task(loss)), n_aug=n_aug)
    sets = {
        "plain": (base, "guide"),
        "plain + RA": (ra, "guide"),
        "robust": (base, "robust"),
    }
    gen_sets, meta = {}, {}
    for label, (cfg, net) in sets.items():
        g = k.generate(cfg, seeds, steps, net=net, kind=loss)
        gen_sets[label] = (g.x, g.targets)
        meta[label] = {"nfe": g.nfe, "wall_s_per_sample": g.wall_s / n, "skipped_steps": g.skipped}
    gen_sets["real held-out"] = (k.real_x, k.real_y.cpu())
    rows, per = [], {}
    for evaluator, net in (("plain guide", "guide"), ("robust", "robust"), ("judge", "judge")):
        loss_row = {"evaluated by": evaluator, "metric": "loss"}
        val_row = {"evaluated by": evaluator, "metric": "validity"}
        for label, (x, y) in gen_sets.items():
            per[(net, label)] = k.class_loss(net, x, y, loss).cpu()
            loss_row[label] = float(per[(net, label)].mean())
            val_row[label] = k.validity(net, x, y)
        rows += [loss_row, val_row]
    write_csv(out / "results.csv", rows)
    L = {(r["evaluated by"], r["metric"]): r for r in rows}
    gap_plain = L[("robust", "loss")]["plain"] - L[("robust", "loss")]["real held-out"]
    gap_ra = L[("robust", "loss")]["plain + RA"] - L[("robust", "loss")]["real held-out"]
    reach = L[("plain guide", "loss")]["plain"] <= L[("plain guide", "loss")]["real held-out"]
    rob = {label: per[("robust", label)] for label in gen_sets}
    lo, hi = gap_ratio_interval(rob["plain"], rob["plain + RA"], rob["real held-out"])
    # paired on the same seeds: does RA lower the robust loss of the plain-guided samples? (sign test)
    worst = {k: torch.nan_to_num(rob[k], nan=math.inf).tolist() for k in ("plain", "plain + RA")}  # NaN loss: worst
    st = sign_test(worst["plain"], worst["plain + RA"])
    ra_lower = st["p"] < ALPHA and st["b_wins"] < st["a_wins"]  # b = plain + RA: fewer seeds where it is higher
    ra_higher = st["p"] < ALPHA and st["b_wins"] > st["a_wins"]
    judge = {label: (classify(k.nets["judge"], x).argmax(1).cpu() == y.cpu()).tolist()
             for label, (x, y) in gen_sets.items() if label != "real held-out"}  # fmt: skip
    mc = mcnemar(judge["plain + RA"], judge["plain"])
    ok = reach and gap_plain > 0 and ra_lower and hi <= 0.5
    partly = reach and gap_plain > 0 and ra_lower
    plain_loss = L[("plain guide", "loss")]
    head = (
        f"robust-loss gap to real data: plain {gap_plain:.3g}, plain+RA {gap_ra:.3g} (ratio "
        f"{gap_ra / gap_plain if gap_plain else float('nan'):.2f} [{lo:.2f}, {hi:.2f}]); RA lowers the robust loss on "
        f"{st['a_wins']} of {n} seeds, raises it on {st['b_wins']} (sign test p = {st['p']:.2g}); plain-guided loss "
        f"under the plain net {plain_loss['plain']:.3g} vs real {plain_loss['real held-out']:.3g}"
    )
    cols = ["evaluated by", "metric", *gen_sets]
    body = [
        f"FreeDoM (scale {base.rho.scale} from the settings, the same for every guide network; plain + RA at "
        f"scale {ra.rho.scale}, tuned with RA on), DDIM-{steps}, "
        f"seeds {seeds[0]}–{seeds[-1]} (target = seed mod 10; disjoint from every development seed); RA = "
        f"|T| = {n_aug} `digits` augmentations (±2 px shift, zoom 0.9–1.1, fill −1); robust = `mnist-robust` "
        "(L2-PGD trained); real = the 1,000 held-out "
        "digits. Columns: the network that guided (or real data); rows: the network that evaluates "
        f"(mean loss and validity). Loss: the {_loss_words(loss)}"
        + (", each evaluator with its own class means." if loss == "feature" else "."),
        "",
        md_table(rows, cols),
        "",
        "Paired on the same seeds: plain + RA against plain, per-seed robust-net loss (exact sign test): "
        f"RA lower on {st['a_wins']}, higher on {st['b_wins']}, p = {st['p']:.2g}; judge validity (McNemar): valid "
        f"only with RA {mc['a_only']}, only without {mc['b_only']}, p = {mc['p']:.2g}. Share of the robust-loss gap "
        f"left by RA: {gap_ra / gap_plain if gap_plain else float('nan'):.2f}, 95% bootstrap interval [{lo:.2f}, "
        f"{hi:.2f}] ({GAP_BOOT} resamples; seeds paired, real digits resampled apart).",
        "",
        "**Reading.** Paper's claim (Table 4): guidance by the plain network reaches real-data loss under the plain "
        "network but not under the robust one (misaligned gradients), and random augmentation closes most of the "
        "gap. Rule (written before the n = 500 run; the n = 100 runs compared point estimates): confirmed if the "
        "plain-guided loss under the plain net is ≤ the real data's, its robust-net loss exceeds the real data's, "
        f"RA lowers the per-seed robust loss by the sign test at p < {ALPHA}, and the upper end of the interval of "
        "the gap share RA leaves is ≤ 0.5 (partly: the sign test alone). "
        f"Here: {head}. Verdict: {_verdict(ok, partly)}"
        + (" (RA raises the robust loss)." if ra_higher else "."),
    ]
    write_report(out, _title("Adversarial gap (paper Table 4)", loss), command_line("adversarial-gap", quick, loss), body,
                 {"seeds": seeds, "steps": steps, "n_aug": n_aug, "method": base.to_dict(), "sets": meta,
                  "rows": rows, "ra_sign_test": st, "ra_judge_mcnemar": mc, "gap_share_left": [lo, hi],
                  "verdict_confirmed": bool(ok), "verdict_partly": bool(partly)})  # fmt: skip
    return {"headline": head, "confirmed": bool(ok), "rows": rows}


# -- 4. convergence (Table 5) -----------------------------------------------------------------------------
def convergence(out, quick: bool = False, loss: str = "ce") -> dict:
    """FreeDoM, FreeDoM + Polyak and classifier guidance (noise-aware) at DDIM-20/50/100: guide loss, judge
    validity, FID/KID on judge features (Table 5)."""
    k = kit()
    n, budgets = (10, (5, 10)) if quick else (100, (20, 50, 100))
    seeds = list(range(n))
    rows = []
    for steps in budgets:
        for name in ("freedom", "freedom+polyak", "cg"):
            gen = k.generate(config(name, _task(loss)), seeds, steps, kind=loss)
            row = {"steps": steps, "method": name, **k.evaluate(gen)}
            rows.append(row)
            log.info("convergence %s", row)
    write_csv(out / "results.csv", rows)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name in ("freedom", "freedom+polyak", "cg"):
        r = [x for x in rows if x["method"] == name]
        axes[0].plot([x["steps"] for x in r], [x["judge_validity"] for x in r], "o-", label=name)
        axes[1].plot([x["steps"] for x in r], [x["kid_x1e3"] for x in r], "o-", label=name)
    axes[0].set_ylabel("judge validity")
    axes[1].set_ylabel("KID ×10³ (judge features)")
    for a in axes:
        a.set_xlabel("DDIM steps")
        a.set_xscale("log")
        a.legend(fontsize=8)
    save_fig(fig, out / "convergence.png")
    by = {(r["method"], r["steps"]): r for r in rows}
    lo = budgets[0]
    polyak_better = sum(by[("freedom+polyak", s)]["judge_validity"] >= by[("freedom", s)]["judge_validity"]
                        for s in budgets)  # fmt: skip
    cg_gap_lo = by[("cg", lo)]["judge_validity"] - by[("freedom", lo)]["judge_validity"]
    cg_gap_hi = by[("cg", budgets[-1])]["judge_validity"] - by[("freedom", budgets[-1])]["judge_validity"]
    ok = polyak_better == len(budgets) and cg_gap_lo > 0 and cg_gap_hi < cg_gap_lo
    partly = polyak_better >= 1 or cg_gap_lo > 0
    head = (f"Polyak ≥ FreeDoM validity at {polyak_better}/{len(budgets)} budgets; cg − FreeDoM validity "
            f"{cg_gap_lo:+.2f} at DDIM-{lo}, {cg_gap_hi:+.2f} at DDIM-{budgets[-1]}")  # fmt: skip
    body = [
        f"Seeds 0–{n - 1} (target = seed mod 10) for every cell; FID and KID on the judge's 128-d penultimate "
        f"features against the 1,000 held-out digits (FID on {n} samples is biased upward; KID is unbiased, "
        "±std over 50 subsets). cg = classifier guidance with the noise-aware `mnist-noise-aware` (training-based "
        "reference, the paper's PPAP column). Step parameters from the settings (tuned at DDIM-50).",
        "",
        md_table(
            rows,
            [
                "steps",
                "method",
                "judge_validity",
                "guide_loss",
                "fid",
                "kid_x1e3",
                "kid_std_x1e3",
                "nfe",
                "denoiser_grads",
                "wall_s_per_sample",
            ],
        ),  # fmt: skip
        "",
        "![convergence](convergence.png)",
        "",
        "**Reading.** Paper's claim (Table 5): training-free guidance converges more slowly than classifier "
        "guidance with a noise-aware classifier (a larger gap at few steps), and the Polyak step speeds FreeDoM up. "
        "Rule: confirmed if FreeDoM + Polyak is at least as valid as FreeDoM at every budget and cg's validity "
        f"lead over FreeDoM is positive at the fewest steps and shrinks with more (partly: either). Here: {head}. "
        f"Verdict: {_verdict(ok, partly)}.",
    ]
    write_report(out, _title("Convergence (paper Table 5)", loss), command_line("convergence", quick, loss), body,
                 {"seeds": seeds, "budgets": list(budgets), "settings": settings.load(), "rows": rows,
                  "verdict_confirmed": bool(ok)})  # fmt: skip
    return {"headline": head, "confirmed": bool(ok), "rows": rows}


# -- 5. ablation ------------------------------------------------------------------------------------------
def ablation(out, quick: bool = False, loss: str = "ce") -> dict:
    """The paper's method with each technique switched off in turn, at DDIM-50 and DDIM-100."""
    k = kit()
    n, budgets, n_aug = (10, (5,), 2) if quick else (60, (50, 100), 10)
    seeds = list(range(n))
    full = config("shen2024", _task(loss), n_aug=n_aug)
    freedom_scale = step_or_start(_task(loss), "freedom")
    variants = {
        "full (RA + Polyak + time travel)": full,
        "− augmentation": presets.with_techniques(full, n_aug=0),
        "− Polyak (FreeDoM step)": config("shen2024", _task(loss), drop=("eta",), n_aug=n_aug, polyak=False,
                                            scale=freedom_scale),
        "− time travel": presets.with_techniques(full, n_recur=1),
        "FreeDoM (all off)": config("freedom", _task(loss)),
    }
    rows = []
    for steps in budgets:
        for label, cfg in variants.items():
            gen = k.generate(cfg, seeds, steps, kind=loss)
            rows.append({"steps": steps, "variant": label, **k.evaluate(gen)})
            log.info("ablation %s", rows[-1])
    write_csv(out / "results.csv", rows)
    by = {(r["variant"], r["steps"]): r for r in rows}
    full_label = next(iter(variants))
    worse = {lbl: all(by[(lbl, s)]["judge_validity"] <= by[(full_label, s)]["judge_validity"] for s in budgets)
             for lbl in variants if lbl != full_label}  # fmt: skip
    n_worse = sum(worse.values())
    ok = n_worse == len(worse)
    partly = n_worse >= 2
    vals = ", ".join(f"{by[(full_label, s)]['judge_validity']:.0%} (DDIM-{s})" for s in budgets)
    head = f"full method validity {vals}; {n_worse}/{len(worse)} ablations no better at every budget"
    body = [
        f"shen2024 (η from the settings, |T| = {n_aug}, time travel s = 3 for t/T ∈ [0.3, 0.8]); each row switches "
        f"one technique off (− Polyak uses FreeDoM's step with its tuned scale {freedom_scale}). Seeds 0–{n - 1} "
        f"(target = seed mod 10); FID/KID on judge features vs 1,000 held-out digits ({n} samples: read KID).",
        "",
        md_table(
            rows,
            [
                "steps",
                "variant",
                "judge_validity",
                "guide_loss",
                "fid",
                "kid_x1e3",
                "nfe",
                "denoiser_grads",
                "wall_s_per_sample",
            ],
        ),  # fmt: skip
        "",
        "**Reading.** The paper's claim (§5, Tables 1–2): each technique contributes. Rule: confirmed if no "
        "ablated variant beats the full method's judge validity at any budget (partly: at least two of the four "
        f"do not). Here: {head}. Verdict: {_verdict(ok, partly)}.",
    ]
    write_report(out, _title("Ablation of the paper's techniques", loss), command_line("ablation", quick, loss), body,
                 {"seeds": seeds, "budgets": list(budgets), "rows": rows, "verdict_confirmed": bool(ok),
                  "variants": {k2: v.to_dict() for k2, v in variants.items()}})  # fmt: skip
    return {"headline": head, "confirmed": bool(ok), "rows": rows}


# -- 6. cost of random augmentation (Table 6) --------------------------------------------------------------
def ra_cost(out, quick: bool = False) -> dict:
    """Seconds per guided step (FreeDoM + |T| augmentations, batch 16, mid trajectory) against |T| (Table 6)."""
    k = kit()
    sizes, reps, batch = ((0, 1), 2, 4) if quick else ((0, 1, 10, 20, 30), 7, 16)
    sampler = DDIM(k.model.denoiser.schedule, 50)
    i = 25
    gens = make_generators(range(batch))
    x_t = randn(k.model.sample_shape, gens)
    loss = k.loss("guide", [3] * batch)
    rows = []
    for n_aug in sizes:
        cfg = presets.with_techniques(config("freedom"), n_aug=n_aug)
        engine = GuidanceEngine(cfg, loss, augment=k.model.augment)
        times = []
        for r in range(reps + 1):
            stats = GuidanceStats()
            stats.init(batch)
            t0 = time.perf_counter()
            engine.step(k.model.denoiser, sampler, x_t, i, make_generators(range(batch)), stats)
            if r:  # the first call warms up
                times.append(time.perf_counter() - t0)
        rows.append({"n_aug": n_aug, "s_per_step": statistics.median(times), "threads": torch.get_num_threads()})
    base = rows[0]["s_per_step"]
    for r in rows:
        r["relative_to_no_aug"] = r["s_per_step"] / base
    write_csv(out / "results.csv", rows)
    r10 = next((r for r in rows if r["n_aug"] == 10), rows[-1])
    head = f"|T| = {r10['n_aug']} costs {r10['relative_to_no_aug']:.2f}× a plain guided step"
    ok = r10["relative_to_no_aug"] <= 1.10
    body = [
        f"One guided DDIM step (FreeDoM, guide CNN, batch {batch}, step {i} of 50) timed {reps}× after a warm-up; "
        f"median; torch threads {torch.get_num_threads()} on this machine's CPU.",
        "",
        md_table(rows, ["n_aug", "s_per_step", "relative_to_no_aug", "threads"]),
        "",
        "**Reading.** Paper's claim (Table 6): |T| = 10 adds ≈ 5.5% per step (a ResNet-50 is ~100× cheaper than "
        "their UNet). Rule: confirmed if |T| = 10 costs ≤ 1.10× a plain guided step. Here the guide CNN is only "
        f"≈ 11× cheaper than the MNIST UNet, so each copy costs more in relative terms. Here: {head}. "
        f"Verdict: {_verdict(ok)}.",
    ]
    write_report(out, "Cost of random augmentation (paper Table 6)", command_line("ra-cost", quick), body,
                 {"batch": batch, "reps": reps, "rows": rows, "verdict_confirmed": bool(ok)})  # fmt: skip
    return {"headline": head, "confirmed": bool(ok), "rows": rows}
