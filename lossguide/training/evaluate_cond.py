"""Evaluate a two-digit conditional model and record it in the manifest (files and hashes, command, metrics), or
``--check`` a model against the metrics its manifest entry records, within the entry's stated tolerance.

The evaluation set is :func:`lossguide.layout.evaluate.eval_conditions` on seeds 0..n−1 (n = 242: every pair of
halves, blank ones included, twice), DDIM-25 (η = 0) under classifier-free guidance at each ``--ws``, judged half
by half (:func:`lossguide.layout.evaluate.canvas_quality`): validity (both halves right), digit-half and
blank-half validity, and the FID of the digit halves on the judge's features against the 1,000 held-out digits
(in the model's ``style`` for a fine-tuned copy).

    python -m lossguide.training evaluate-cond --model mnist-cond --record
    python -m lossguide.training evaluate-cond --model runs/cond-digits --check mnist-cond

A retrained model reproduces the shipped one within :data:`TOLERANCE`: training is deterministic on one torch
thread (same seeds, same weights on the same build), and the tolerance covers a different build or thread count.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lossguide import models
from lossguide.io import atomic_write_json

log = logging.getLogger("lossguide.training.evaluate_cond")

#: |retrained − shipped| allowed per metric: absolute for validities, relative for FID
TOLERANCE = {"validity": 0.05, "digit_half_validity": 0.05, "blank_half_validity": 0.05, "fid_rel": 0.25}
#: the seeds of the manifest's ``metrics_quick`` (w = 3), re-measured by the test suite
QUICK_N = 44
GUIDE_KIND = ("plug-and-play CFG guide (lossguide.layout.distill.GuideNet: ControlNet-style residuals from zero-"
              "initialised "
              "1x1 convs) for mnist-cond; metrics: mnist-cond with this guide, one pass per step")  # fmt: skip
KIND = ("diffusers UNet2DConditionModel + DDPMScheduler ({prediction}, linear beta 1e-4..0.02, 1000 steps) on 1x28x56 "
        "two-digit canvases, cross-attending to 2 tokens (class 0-9, 10 blank, 11 null) of TokenEncoder")  # fmt: skip


def evaluate(model, n: int = 242, steps: int = 25, ws=(1.0, 2.0, 3.0, 4.0), guide=None, style=None, kit=None) -> dict:
    """Metrics per w of ``model`` (a CondDigitModel; with ``guide``: one guided pass instead of two-pass CFG);
    ``kit``: an already loaded MnistKit."""
    from lossguide.harness.tasks.mnist import MnistKit
    from lossguide.layout.evaluate import canvas_quality, eval_conditions, generate

    kit = MnistKit() if kit is None else kit
    seeds = list(range(n))
    tokens = eval_conditions(seeds)
    out = {"eval": f"DDIM-{steps}, eta 0, seeds 0..{n - 1}, conditions eval_conditions (s mod 11, s//11 mod 11), "
                   "judge mnist-judge half by half, FID of the digit halves on its features", "per_w": {}}  # fmt: skip
    for w in ws:
        x, wall = generate(model, tokens, seeds, steps, w, guide)
        row = canvas_quality(kit, x, tokens, style=style)
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        row["seconds_per_sample"] = round(wall / n, 4)
        out["per_w"][f"{w:g}"] = row
        log.info("w=%g: %s", w, row)
    return out


def check(measured: dict, recorded: dict, tolerance: dict = TOLERANCE) -> list[str]:
    """The metrics of ``measured`` that differ from ``recorded`` by more than ``tolerance`` (one line each)."""
    bad = []
    for w, rec in recorded["per_w"].items():
        got = measured["per_w"].get(w)
        if got is None:
            bad.append(f"w={w}: not measured")
            continue
        if "n" in rec and got.get("n") != rec["n"]:
            bad.append(f"w={w}: measured on n={got.get('n')} samples, the record on n={rec['n']}; pass --n {rec['n']}")
            continue
        for key, tol in tolerance.items():
            name = key.removesuffix("_rel")
            if name not in rec or rec[name] != rec[name]:  # absent or NaN in the record
                continue
            limit = tol * abs(rec[name]) if key.endswith("_rel") else tol
            if name not in got:
                bad.append(f"w={w}: {name} not measured")
            elif not abs(got[name] - rec[name]) <= limit:
                bad.append(
                    f"w={w}: {name} {got[name]:.4g} against the recorded {rec[name]:.4g} (tolerance ±{limit:.3g})"
                )
    return bad


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-cond", help="shipped name or exported folder")
    ap.add_argument("--guide", default=None, help="evaluate one pass with this distilled guide instead of CFG")
    ap.add_argument("--style", default=None, help="the model's data style (FID reference), e.g. thick")
    ap.add_argument("--n", type=int, default=242)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--ws", default="1,2,3,4", help="CFG scales, comma-separated")
    ap.add_argument("--record", action="store_true", help="write the result into the manifest entry of --model")
    ap.add_argument("--check", default=None, metavar="NAME", help="compare with the manifest entry NAME's metrics")
    args = ap.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        ap.error(f"--n and --steps must be ≥ 1, got {args.n} and {args.steps}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        ws = tuple(float(v) for v in args.ws.split(","))
    except ValueError:
        ap.error(f"--ws must be comma-separated numbers, got {args.ws!r}")
    record = args.guide if args.guide else args.model  # a guide's evaluation is the guide's record
    shipped = {**models.CONDITIONAL, **models.GUIDES}
    if args.record and record not in shipped:
        ap.error(f"--record writes a shipped model's entry; --model (or --guide) must be one of {', '.join(shipped)}")
    entry = models.manifest().get(args.check) if args.check else None
    if args.check and (entry is None or "metrics" not in entry):
        ap.error(f"the manifest has no metrics for {args.check!r}")
    if args.record and args.guide and args.model != "mnist-cond":
        ap.error("a guide's record is its evaluation on the base it was trained for: pass --model mnist-cond")
    if args.style is None and args.model in models.CONDITIONAL:  # a shipped copy's own style is its FID reference
        meta_path = models.CONDITIONAL[args.model] / "training.json"
        args.style = json.loads(meta_path.read_text()).get("style") if meta_path.exists() else None
    style = None
    if args.style:
        from lossguide.data.styles import STYLES

        if args.style not in STYLES:
            ap.error(f"unknown --style {args.style!r}; choose one of {', '.join(STYLES)}")
        style = STYLES[args.style]
    model = models.load_conditional(args.model)
    guide = models.load_guide(args.guide) if args.guide else None
    from lossguide.harness.tasks.mnist import MnistKit

    kit = MnistKit()
    metrics = evaluate(model, args.n, args.steps, ws, guide, style, kit)
    print(json.dumps(metrics, indent=2))
    if entry is not None:
        bad = check(metrics, entry["metrics"])
        if bad:
            sys.exit("outside the manifest's tolerance:\n  " + "\n  ".join(bad))
        log.info("within the tolerance of %s's manifest entry (%s)", args.check, TOLERANCE)
    if args.record:
        folder = shipped[record]
        meta = json.loads((folder / "training.json").read_text())
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        quick = evaluate(model, QUICK_N, args.steps, (3.0,), guide, style, kit)
        data = models.manifest()
        check_cmd = (
            f"python -m lossguide.training evaluate-cond --model {args.model if args.guide else 'DIR'}"
            + (" --guide DIR" if args.guide else "")
            + f" --ws {args.ws} --n {args.n} --steps {args.steps} --check {record}"
            + (f" --style {args.style}" if args.style else "")
        )
        kind = GUIDE_KIND if args.guide else KIND.format(prediction=model.scheduler.config.prediction_type)
        data[record] = {
            **data.get(record, {}),
            "folder": record,
            "kind": kind,
            "files": {str(p.relative_to(folder)): models.sha256(p) for p in files},
            "seed": meta["seed"],
            "command": meta["command"],
            "training": meta,
            "metrics": metrics,
            "metrics_quick": quick,
            "tolerance": TOLERANCE,
            "check": check_cmd,
        }
        atomic_write_json(models.MANIFEST, dict(sorted(data.items())))


if __name__ == "__main__":
    main()
