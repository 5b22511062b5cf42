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
seconds per sample (one thread, batches of 64, methods interleaved batch by batch after a warm-up). ``--quick``: 8 seeds,
DDIM-6 (a smoke run; its numbers mean nothing).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from lossguide.experiments import command_line
from lossguide.writers import md_table, write_csv, write_report

log = logging.getLogger(__name__)

W = 3.0
FULL = {"n": 242, "steps": 25}
QUICK = {"n": 8, "steps": 6}
BASES = {"mnist-cond": None, "mnist-cond-thick": "thick"}


def run(out, quick: bool = False) -> dict:
    """Every (base, method) row; report.md, results.json/csv."""
    from lossguide.data.canvas import BLANK
    from lossguide.data.styles import STYLES
    from lossguide.harness.tasks.mnist import MnistKit
    from lossguide.layout.evaluate import eval_conditions, fid_floor
    from lossguide.models import load_conditional, load_guide

    cfg, out = (QUICK if quick else FULL), Path(out)
    t_start = time.perf_counter()
    kit, guide = MnistKit(), load_guide("mnist-cond-guide")
    seeds = list(range(cfg["n"]))
    tokens = eval_conditions(seeds)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the timings are one-thread figures
    try:
        for name, style in BASES.items():
            rows += _compare(kit, load_conditional(name), name, guide, seeds, tokens, cfg["steps"], STYLES.get(style))
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t_start
    write_csv(out / "results.csv", rows)
    g_params = sum(p.numel() for p in guide.parameters())
    body = [
        f"Seeds 0–{cfg['n'] - 1} with the conditions `eval_conditions` (every pair of halves, blanks included), "
        f"DDIM-{cfg['steps']} (η = 0), w = {W:g}. Validity: the judge (and the blank test, ink < 10) right on both "
        "halves; FID of the digit halves on the judge's features against the held-out digits (thickened for "
        "`mnist-cond-thick`); RMS to CFG: per-pixel RMS distance to the two-pass CFG sample of the same seed; "
        f"the guide has {g_params:,} parameters ({100 * rows[-1]['guide_params_share']:.2f}% of the base), and its own "
        "forward runs beside the one UNet pass. Times on one torch thread of a shared 2-core CPU, after a warm-up, "
        "the methods interleaved batch by batch; CPU s is the thread's own time (insensitive to other processes).",
        "",
        md_table(rows, ["base", "method", "w", "validity", "digit_half_validity", "blank_half_validity", "fid",
                        "kid_x1e3", "rms_to_cfg", "unet_passes_per_step", "wall_s_per_sample", "cpu_s_per_sample"],
                 ["base", "method", "w", "validity", "digit-half validity", "blank-half validity", "FID", "KID×10³",
                  "RMS to CFG", "UNet passes/step (+ guide)", "wall s/sample", "CPU s/sample"]),
        "",
        _reading(rows, fid_floor(kit, int((tokens != BLANK).sum())), quick),
        "",
        f"Wall time {wall:.0f} s." + (" Quick mode: its numbers mean nothing." if quick else ""),
    ]  # fmt: skip
    data = {"rows": rows, "w": W, "seeds": [0, cfg["n"] - 1], "steps": cfg["steps"], "guide_params": g_params,
            "quick": quick, "wall_s": wall}  # fmt: skip
    write_report(out, "Distilled classifier-free guidance", command_line("distill", quick), body, data)
    return {f"{r['base']}/{r['method']}": {"validity": r["validity"], "fid": r.get("fid"),
                                            "wall_s_per_sample": r["wall_s_per_sample"]} for r in rows}  # fmt: skip


METHODS = (("cfg", W, True), ("conditional", 1.0, False), ("distilled", W, False))


def _compare(kit, model, name: str, guide, seeds: list, tokens: torch.Tensor, steps: int, style) -> list[dict]:
    """The three methods on one base. Timing: an untimed warm-up of each, then the methods interleaved batch by
    batch (the order reversed on every other batch), so drifting machine load and first-call costs fall on all
    three alike; wall and thread CPU seconds are summed per method."""
    from lossguide.layout.evaluate import BATCH, canvas_quality, generate

    def run_one(method, w, part, tok):
        g = guide if method == "distilled" else None
        c0 = time.thread_time()
        x, wall = generate(model, tok, part, steps, w, g)
        return x, wall, time.thread_time() - c0

    for method, w, _ in METHODS:  # warm-up
        run_one(method, w, seeds[:2], tokens[:2])
    xs = {m: [] for m, _, _ in METHODS}
    wall = dict.fromkeys(xs, 0.0)
    cpu = dict.fromkeys(xs, 0.0)
    for i, b in enumerate(range(0, len(seeds), BATCH)):
        part, tok = seeds[b : b + BATCH], tokens[b : b + BATCH]
        for method, w, _ in METHODS if i % 2 == 0 else METHODS[::-1]:
            x, dt, dc = run_one(method, w, part, tok)
            xs[method].append(x)
            wall[method] += dt
            cpu[method] += dc
    base_params = sum(p.numel() for p in model.unet.parameters()) + sum(p.numel() for p in model.encoder.parameters())
    ref = torch.cat(xs["cfg"])
    rows = []
    for method, w, two_pass in METHODS:
        x = torch.cat(xs[method])
        row = {"base": name, "method": method, "w": w, **canvas_quality(kit, x, tokens, style=style)}
        row["rms_to_cfg"] = float((x - ref).pow(2).flatten(1).mean(1).sqrt().mean())
        row["unet_passes_per_step"] = 2 if two_pass else 1
        row["wall_s_per_sample"] = wall[method] / len(seeds)
        row["cpu_s_per_sample"] = cpu[method] / len(seeds)
        row["guide_params_share"] = (
            sum(p.numel() for p in guide.parameters()) / base_params if method == "distilled" else 0.0
        )
        rows.append(row)
        log.info("%s %s: validity %.3f, FID %.2f, %.3f s/sample", name, method, row["validity"], row.get("fid", 0),
                 row["wall_s_per_sample"])  # fmt: skip
    return rows


def _reading(rows: list[dict], floor, quick: bool) -> str:
    """The report's reading, from the numbers."""
    parts = []
    for base in BASES:
        by = {r["method"]: r for r in rows if r["base"] == base}
        c, d, u = by["cfg"], by["distilled"], by["conditional"]
        parts.append(f"on `{base}` the guide reaches validity {100 * d['validity']:.1f}% (CFG {100 * c['validity']:.1f}%, "
                     f"no guidance {100 * u['validity']:.1f}%) and FID {d.get('fid', float('nan')):.2f} (CFG "
                     f"{c.get('fid', float('nan')):.2f}) at {d['cpu_s_per_sample'] / c['cpu_s_per_sample']:.2f}× "
                     f"CFG's CPU time ({d['wall_s_per_sample'] / c['wall_s_per_sample']:.2f}× its wall time), "
                     f"RMS {d['rms_to_cfg']:.3f} from the CFG samples against {u['rms_to_cfg']:.3f} for no guidance")  # fmt: skip
    text = (
        "Reading: "
        + "; ".join(parts)
        + (
            f". Real digits score FID {min(floor):.1f}–{max(floor):.1f} at this "
            f"number of digit halves ({len(floor)} draws, `fid_floor`)."
        )
    )
    return text + (" (Quick mode: not a measurement.)" if quick else "")
