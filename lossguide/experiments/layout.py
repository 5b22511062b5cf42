"""``lossguide experiment layout``: move a digit to the other half of the canvas by layout control of the
two-digit conditional model (``mnist-cond``), with the layout loss, attention modulation, or both
(Patel & Serkh 2024, "Enhancing Image Layout Control with Loss-Guided Diffusion Models").

Task: the condition is (a, blank), "digit a on the left, nothing on the right" (a = seed mod 10), and the layout
asks for the opposite: token 0 (the digit) in the right half, token 1 (the blank) in the left half. Measured on
each sample: the share of its ink in the right half (:func:`~lossguide.layout.ink_fraction`), the judge on the
right half (is it an a?), the layout's validity (right half an a and left half empty) and the FID of the right
halves against the held-out digits. The reference row ``prompt`` conditions on (blank, a), which says the same
layout through the condition itself.

Variants, all under classifier-free guidance at w = :data:`W_CFG` and DDIM-25 (η = 0):

- ``none``: the condition alone;
- ``loss``: the layout loss E (:class:`~lossguide.layout.LayoutLoss`, on the model's own maps) as a noise-aware
  x_t loss with the classifier-guidance step ε̂ = ε + s·σ_t·∇_{x_t} E (``presets.cg(s)``);
- ``modulation``: the logits of token 0 raised by λ_t in the right half and lowered by λ_t in the left, token 1
  the other way (λ_t = λ·t/T);
- ``both``: the two together.

Each variant is tuned on its own on seeds ``tune_seeds("experiments", 20)`` (disjoint from the evaluation seeds 0–99)
by the mean over samples of [right half judged a] × ink share in the right half; ``both`` searches its own joint
grid (4 loss scales × 5 strengths), reported in full. ``--quick``: 4 evaluation and 2 tuning seeds, DDIM-6, 2-point grids
(a smoke run of every code path; its numbers mean nothing).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lossguide import presets
from lossguide.experiments import command_line
from lossguide.harness.tasks.canvas import TARGETS, conditions, score
from lossguide.harness.tuning import doublings, half_decades, tune_each, tune_seeds
from lossguide.layout.evaluate import fid_floor
from lossguide.samplers import DDIM
from lossguide.sampling import sample
from lossguide.writers import md_table, pyplot, save_fig, write_csv, write_report

log = logging.getLogger(__name__)

W_CFG = 3.0
BATCH = 50
#: the loss scales s span the gradient's size: ‖∇_{x_t} E‖ ≈ 0.005 against ‖ε‖ ≈ 40 (measured on 8 samples of an early
#: checkpoint), so s·σ_t·‖∇E‖ reaches ‖ε‖ near s = 10⁴
FULL = {"seeds": list(range(100)), "tune_n": 20, "steps": 25, "scales": half_decades(1e2, 1e5),
        "strengths": doublings(0.5, 16.0), "both_scales": half_decades(3e2, 1e4),
        "both_strengths": doublings(1.0, 16.0)}  # fmt: skip
QUICK = {"seeds": list(range(4)), "tune_n": 2, "steps": 6, "scales": (1e3, 1e4), "strengths": (1.0, 4.0),
         "both_scales": (1e3,), "both_strengths": (1.0, 4.0)}  # fmt: skip


def generate(model, seeds: Sequence[int], steps: int, w: float, scale: float = 0.0, strength: float = 0.0,
             swap: bool = False) -> dict:  # fmt: skip
    """Canvases for ``seeds`` under (a, blank) (or (blank, a) with ``swap``), with the layout loss at cg scale
    ``scale`` and modulation ``strength`` (0: off), and the wall time and UNet calls per sample."""
    if not seeds:
        raise ValueError("no seeds to sample")
    control = model.attention_control()
    xs = []
    t0 = time.perf_counter()
    try:
        for b in range(0, len(seeds), BATCH):
            part = list(seeds[b : b + BATCH])
            tokens = conditions(part, swap)
            control.clear_modulations()
            if strength:
                for k, region in TARGETS.items():
                    control.modulate(k, region, strength)
            den = model.denoiser(tokens, w, control=control)
            guidance = loss = None
            if scale:
                guidance, loss = presets.cg(scale), model.layout_loss(tokens, TARGETS, control)
            res = sample(den, DDIM(den.schedule, steps), guidance, loss, shape=model.sample_shape, seeds=part)
            xs.append(res.x0.detach().clamp(-1, 1))
            stats = res.stats
    finally:
        control.remove()
    # UNet forwards: the denoiser's (two with CFG) and the layout loss's own conditional pass; backwards: one per
    # loss gradient (≈ 2 forwards each)
    forwards = stats.nfe * (1 if w == 1.0 else 2) + stats.loss_evals
    return {"x": torch.cat(xs), "wall_s": time.perf_counter() - t0, "unet_forwards_per_sample": forwards,
            "unet_backwards_per_sample": stats.loss_grads}  # fmt: skip


def tune(kit, model, cfg: dict, w: float) -> tuple[dict, list[dict]]:
    """The tuned (scale, strength) of each variant on the tuning seeds, and every grid point's record."""
    seeds = list(tune_seeds("experiments", cfg["tune_n"]))
    records = []

    def run(variant, point):
        scale, strength = point
        gen = generate(model, seeds, cfg["steps"], w, scale, strength)
        rec = {"variant": variant, "scale": scale, "strength": strength, **score(kit, gen["x"], seeds)}
        rec.pop("per_sample")
        records.append(rec)
        log.info("tune %s scale=%g strength=%g: objective %.3f", variant, scale, strength, rec["objective"])
        return rec["objective"]

    grids = {"loss": [(s, 0.0) for s in cfg["scales"]], "modulation": [(0.0, m) for m in cfg["strengths"]],
             "both": [(s, m) for s in cfg["both_scales"] for m in cfg["both_strengths"]]}  # fmt: skip
    best = {"none": {"scale": 0.0, "strength": 0.0}}
    best |= {variant: {"scale": s, "strength": m} for variant, (s, m) in tune_each(grids, run).items()}
    return best, records


def run(out, quick: bool = False) -> dict:
    """Tune, then evaluate the three variants, ``none`` and the ``prompt`` reference; report.md, results.*, figure."""
    from lossguide.harness.tasks.mnist import MnistKit
    from lossguide.models import load_conditional

    cfg, out = (QUICK if quick else FULL), Path(out)
    t_start = time.perf_counter()
    kit, model = MnistKit(), load_conditional("mnist-cond")
    best, records = tune(kit, model, cfg, W_CFG)
    seeds, steps = cfg["seeds"], cfg["steps"]
    rows, images, per_sample = [], {}, {}
    for variant in ("prompt", "none", "loss", "modulation", "both"):
        p = best.get(variant, {"scale": 0.0, "strength": 0.0})
        gen = generate(model, seeds, steps, W_CFG, p["scale"], p["strength"], swap=variant == "prompt")
        row = {"variant": variant, **p, **score(kit, gen["x"], seeds, fid=True)}
        row["unet_forwards_per_sample"] = gen["unet_forwards_per_sample"]
        row["unet_backwards_per_sample"] = gen["unet_backwards_per_sample"]
        per_sample[variant] = row.pop("per_sample")
        row["wall_s_per_sample"] = gen["wall_s"] / len(seeds)
        rows.append(row)
        images[variant] = gen["x"][:10]
        log.info("%s: ink share %.3f, box validity %.3f", variant, row["ink_share"], row["box_validity"])
    wall = time.perf_counter() - t_start
    _figure(images, out)
    write_csv(out / "results.csv", rows)
    write_csv(out / "tuning.csv", records)
    body = [
        "Condition (a, blank) = \"digit a on the left, nothing on the right\" (a = seed mod 10); the layout asks for "
        "token 0 (the digit) in the right half and token 1 (the blank) in the left. `prompt` conditions on "
        "(blank, a) instead: the same layout said by the condition (the model's own quality there is the ceiling). "
        f"Classifier-free guidance w = {W_CFG:g}, DDIM-{steps} (η = 0), seeds {seeds[0]}–{seeds[-1]} "
        f"(n = {len(seeds)}).",
        "",
        "Ink share = share of the canvas's ink in the right half; box validity = the judge calls the right half "
        "an a (95% Wilson interval); layout validity = and the left half is empty (ink < 10); FID/KID of the "
        "right halves on the judge's features against the 1,000 held-out digits. Each variant tuned on its own on "
        f"{cfg['tune_n']} other seeds (objective: mean of [right half judged a] × ink share); `both` on its own "
        "joint grid of loss scales × modulation strengths (the table after the main one).",
        "",
        md_table(rows, ["variant", "scale", "strength", "ink_share", "box_validity", "box_validity_ci",
                        "layout_validity", "judge_p_a_right", "fid", "kid_x1e3", "unet_forwards_per_sample",
                        "unet_backwards_per_sample", "wall_s_per_sample"],
                 ["variant", "loss scale s", "modulation λ", "ink share in box", "box validity", "95% CI",
                  "layout validity", "judge p(a) right", "FID right", "KID×10³ right", "UNet fwd/sample",
                  "UNet bwd/sample", "s/sample"]),
        "",
        _reading(rows, per_sample, fid_floor(kit, len(seeds)), quick),
        "",
        _edges(best, cfg),
        "",
        "### The joint grid (tuning seeds): objective, box validity in brackets",
        "",
        _joint_table(records, cfg),
        "",
        "![the first 10 samples of each variant](samples.png)",
        "",
        "Tuning records: `tuning.csv`.",
        "",
        f"Wall time {wall:.0f} s." + (" Quick mode: its numbers mean nothing." if quick else ""),
    ]  # fmt: skip
    data = {"rows": rows, "tuned": best, "tuning": records, "objective_per_sample": per_sample, "seeds": [seeds[0], seeds[-1]], "steps": steps,
            "w_cfg": W_CFG, "quick": quick, "wall_s": wall}  # fmt: skip
    write_report(out, "Layout control of the two-digit model", command_line("layout", quick), body, data)
    by = {r["variant"]: r for r in rows}
    return {v: {"ink_share": by[v]["ink_share"], "box_validity": by[v]["box_validity"]} for v in by} | {"wall_s": wall}


def paired_interval(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% paired-bootstrap interval of mean(a − b) over the same seeds (resampled together)."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(d), (n_boot, len(d)), generator=g)
    means = d[idx].mean(dim=1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def _reading(rows: list[dict], per_sample: dict, floor: Sequence[float], quick: bool) -> str:
    """The report's reading, from the numbers: the combination against the better single variant (picked on the
    evaluation seeds, which favours the single variant), with a paired-bootstrap interval of the difference."""
    by = {r["variant"]: r for r in rows}
    both, single = by["both"], max((by["loss"], by["modulation"]), key=lambda r: r["objective"])
    lo, hi = paired_interval(per_sample["both"], per_sample[single["variant"]])
    verdict = "beats" if lo > 0 else ("is beaten by" if hi < 0 else "is not distinguishable from")
    text = (f"Reading: the combination {verdict} the better single variant (`{single['variant']}`, picked on these "
            f"seeds) on the objective: {both['objective']:.3f} against {single['objective']:.3f}, difference 95% "
            f"paired-bootstrap interval [{lo:+.3f}, {hi:+.3f}]; ink share {both['ink_share']:.2f} against "
            f"{single['ink_share']:.2f}, box validity {both['box_validity']:.2f} against {single['box_validity']:.2f}. "
            f"Without control the right half holds {by['none']['ink_share']:.2f} of the ink; the `prompt` row (the "
            f"layout said by the condition) {by['prompt']['ink_share']:.2f} at box validity "
            f"{by['prompt']['box_validity']:.2f}. Real digits score FID {min(floor):.1f}–{max(floor):.1f} at this n "
            f"({len(floor)} draws of the gen split, `fid_floor`): FID differences inside that spread are noise.")  # fmt: skip
    return text + (" (Quick mode: not a measurement.)" if quick else "")


def _joint_table(records: list[dict], cfg: dict) -> str:
    """Objective (box validity) of every ``both`` grid point, with modulation alone (s = 0) as the first column."""
    mod = {r["strength"]: r for r in records if r["variant"] == "modulation"}
    both = {(r["scale"], r["strength"]): r for r in records if r["variant"] == "both"}
    cols = cfg["both_strengths"]
    out = ["| loss scale s \\ λ | " + " | ".join(f"{m:g}" for m in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    cell = lambda r: f"{r['objective']:.2f} ({r['box_validity']:.2f})" if r else "–"  # noqa: E731
    out.append("| 0 (modulation alone) | " + " | ".join(cell(mod.get(m)) for m in cols) + " |")
    for sc in cfg["both_scales"]:
        out.append(f"| {sc:g} | " + " | ".join(cell(both.get((sc, m))) for m in cols) + " |")
    return "\n".join(out)


def _edges(best: dict, cfg: dict) -> str:
    """A line naming every tuned value that sits at an end of its grid (the optimum may lie beyond it)."""
    hits = []
    for v, p in best.items():
        if v == "none":
            continue
        grids = (("scale", cfg["both_scales"]), ("strength", cfg["both_strengths"])) if v == "both" else (
            ("scale", cfg["scales"]), ("strength", cfg["strengths"]))  # fmt: skip
        for key, grid in grids:
            if p[key] and p[key] in (grid[0], grid[-1]):
                hits.append(f"`{v}` {key} {p[key]:g} (grid {grid[0]:g}–{grid[-1]:g})")
    return (
        ("Tuned values at an end of their grid: " + ", ".join(hits) + ".")
        if hits
        else ("No tuned value sits at an end of its grid.")
    )


def _figure(images: dict, out) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(images), 1, figsize=(10, 1.3 * len(images)))
    for ax, (name, x) in zip(axes, images.items(), strict=True):
        row = torch.cat([torch.nn.functional.pad(c, (1, 1, 1, 1), value=0.0) for c in x], dim=-1)[0]
        ax.imshow(((row + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9, loc="left")
        ax.axis("off")
    save_fig(fig, out / "samples.png")
