"""shen2024 on the shipped MNIST class task over a grid of η: judge validity, noise-like share, FID/KID.

Targets are ``seed mod 10`` (all ten classes); augmentation is the model's (``digits``); the loss is the guide's
unsquared feature distance (``--kind feature``) or its cross-entropy (``--kind ce``). Tuning seeds start at 1000,
disjoint from the evaluation seeds 0–99.

    OMP_NUM_THREADS=1 python benchmarks/shen_scan.py --etas 0.03,0.1,0.3 --seeds 1000-1039 --out runs/scan.json
"""

import argparse
import json
import time

import torch

from lossguide import presets
from lossguide.harness.tasks.mnist import MnistKit
from lossguide.io import atomic_write_json
from lossguide.run_sample import parse_params
from lossguide.runfolder import parse_seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--etas", default="0.03,0.1,0.3")
    ap.add_argument("--seeds", default="1000-1039")
    ap.add_argument("--kind", default="feature", choices=["feature", "ce"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--ddim-eta", type=float, default=0.0)
    ap.add_argument("--set", action="append", default=[], help="other shen2024 parameters, key=value")
    ap.add_argument("--out", default="runs/shen_scan.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kit = MnistKit()
    seeds = parse_seeds(args.seeds)
    extra = parse_params(args.set)
    rows = []
    for eta in (float(e) for e in args.etas.split(",")):
        t0 = time.time()
        cfg = presets.shen2024(eta=eta, **extra)
        r = kit.evaluate(kit.generate(cfg, seeds, args.steps, kind=args.kind, ddim_eta=args.ddim_eta))
        rows.append({"eta": eta, **extra, "kind": args.kind, "steps": args.steps, **r})
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}),
              f"{time.time() - t0:.0f}s", flush=True)  # fmt: skip
        atomic_write_json(args.out, rows)


if __name__ == "__main__":
    main()
