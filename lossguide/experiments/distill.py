"""``lossguide experiment distill``: the distilled classifier-free-guidance guide against two-pass CFG, on the
two-digit model and, unchanged, on its fine-tuned copy (Hsiao et al. 2024, "Plug-and-Play Diffusion
Distillation").

The guide ``mnist-cond-guide`` (:class:`~lossguide.layout.distill.GuideNet`) was trained with ``mnist-cond``
frozen to make one pass of base + guide match ε_∅ + w·(ε_c − ε_∅) for w ∈ [1, 4]. ``mnist-cond-thick`` is
``mnist-cond`` fine-tuned on thickened digits; the guide was never trained on it. For each base, on the same
seeds and conditions (:func:`~lossguide.layout.evaluate.eval_conditions`: every pair of halves, blanks included)
and DDIM-25 (η = 0):

- ``conditional``: ε_c alone (w = 1, one pass);
- ``cfg``: two-pass classifier-free guidance at w = :data:`W`;
- ``distilled``: one pass of the base with the guide at the same w.

Measured: judge validity half by half, FID of the digit halves (against the held-out digits in the base's own
style), the RMS distance of each sample to the two-pass CFG sample of the same seed, UNet passes and wall
seconds per sample (one thread, batches of 64, the same machine state for every row). ``--quick``: 8 seeds,
DDIM-6 (a smoke run; its numbers mean nothing).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from lossguide.experiments.report import command_line, md_table, write_csv, write_report

log = logging.getLogger(__name__)

W = 3.0
FULL = {"n": 242, "steps": 25}
QUICK = {"n": 8, "steps": 6}
BASES = {"mnist-cond": None, "mnist-cond-thick": "thick"}


def run(out, quick: bool = False) -> dict:
    """Every (base, method) row; report.md, results.json/csv."""
    from lossguide.data.styles import STYLES
    from lossguide.harness.tasks.mnist import MnistKit
    from lossguide.layout.evaluate import canvas_quality, eval_conditions, generate
    from lossguide.models import load_conditional, load_guide

    cfg, out = (QUICK if quick else FULL), Path(out)
    t_start = time.perf_counter()
    kit, guide = MnistKit(), load_guide("mnist-cond-guide")
    seeds = list(range(cfg["n"]))
    tokens = eval_conditions(seeds)
    rows = []
    for name, style in BASES.items():
        model = load_conditional(name)
        base_params = sum(p.numel() for p in model.unet.parameters()) + sum(p.numel() for p in model.encoder.parameters())
        ref = None
        for method, w, g in (("cfg", W, None), ("conditional", 1.0, None), ("distilled", W, guide)):
            x, wall = generate(model, tokens, seeds, cfg["steps"], w, g)
            ref = x if method == "cfg" else ref
            row = {"base": name, "method": method, "w": w, **canvas_quality(kit, x, tokens, style=STYLES.get(style))}
            row["rms_to_cfg"] = float((x - ref).pow(2).flatten(1).mean(1).sqrt().mean())
            row["unet_passes_per_step"] = 2 if method == "cfg" else 1
            row["wall_s_per_sample"] = wall / len(seeds)
            row["guide_params_share"] = (sum(p.numel() for p in guide.parameters()) / base_params) if g else 0.0
            rows.append(row)
            log.info("%s %s: validity %.3f, FID %.2f, %.3f s/sample", name, method, row["validity"], row.get("fid", 0),
                     row["wall_s_per_sample"])  # fmt: skip
    wall = time.perf_counter() - t_start
    write_csv(out / "results.csv", rows)
    g_params = sum(p.numel() for p in guide.parameters())
    body = [
        f"Seeds 0–{cfg['n'] - 1} with the conditions `eval_conditions` (every pair of halves, blanks included), "
        f"DDIM-{cfg['steps']} (η = 0), w = {W:g}. Validity: the judge (and the blank test, ink < 10) right on both "
        "halves; FID of the digit halves on the judge's features against the held-out digits (thickened for "
        "`mnist-cond-thick`); RMS to CFG: per-pixel RMS distance to the two-pass CFG sample of the same seed; "
        f"the guide has {g_params:,} parameters. Wall time on one thread of a shared 2-core CPU.",
        "",
        md_table(rows, ["base", "method", "w", "validity", "digit_half_validity", "blank_half_validity", "fid",
                        "rms_to_cfg", "unet_passes_per_step", "wall_s_per_sample"],
                 ["base", "method", "w", "validity", "digit-half validity", "blank-half validity", "FID",
                  "RMS to CFG", "UNet passes/step", "s/sample"]),
        "",
        _reading(rows, quick),
        "",
        f"Wall time {wall:.0f} s." + (" Quick mode: its numbers mean nothing." if quick else ""),
    ]  # fmt: skip
    data = {"rows": rows, "w": W, "seeds": [0, cfg["n"] - 1], "steps": cfg["steps"], "guide_params": g_params,
            "quick": quick, "wall_s": wall}  # fmt: skip
    write_report(out, "Distilled classifier-free guidance", command_line("distill", quick), body, data)
    return {f"{r['base']}/{r['method']}": {"validity": r["validity"], "fid": r.get("fid"),
                                            "wall_s_per_sample": r["wall_s_per_sample"]} for r in rows}  # fmt: skip


def _reading(rows: list[dict], quick: bool) -> str:
    """The report's reading, from the numbers."""
    parts = []
    for base in BASES:
        by = {r["method"]: r for r in rows if r["base"] == base}
        c, d, u = by["cfg"], by["distilled"], by["conditional"]
        parts.append(f"on `{base}` the guide reaches validity {d['validity']:.2f} (CFG {c['validity']:.2f}, no "
                     f"guidance {u['validity']:.2f}) and FID {d.get('fid', float('nan')):.2f} (CFG "
                     f"{c.get('fid', float('nan')):.2f}) at {d['wall_s_per_sample'] / c['wall_s_per_sample']:.2f}× "
                     "CFG's wall time")  # fmt: skip
    text = "Reading: " + "; ".join(parts) + "."
    return text + (" (Quick mode: not a measurement.)" if quick else "")
