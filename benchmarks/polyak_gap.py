"""shen2024 with the classical Polyak gap ℓ (``polyak_gap="loss"``) instead of the paper's ‖ε‖, on the shipped
MNIST models: η tuned on seeds 1000–1039 (judge validity), then judge validity and FID/KID on seeds 0–59 at
DDIM-50, the seeds and budget of ``lossguide experiment ablation`` (whose full-method row is the comparison).

    OMP_NUM_THREADS=1 python benchmarks/polyak_gap.py --out runs/polyak_gap.json
"""

import argparse
import json

import torch

from lossguide import presets
from lossguide.experiments.mnist import MnistKit
from lossguide.io import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/polyak_gap.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kit = MnistKit()
    rows = []
    for eta in (0.01, 0.1, 1.0):
        cfg = presets.shen2024(eta=eta, polyak_gap="loss")
        r = kit.evaluate(kit.generate(cfg, range(1000, 1040), 50), fid=False)
        rows.append({"eta": eta, **r})
        print(f"tune eta={eta}: judge validity {r['judge_validity']:.3f}, guide loss {r['guide_loss']:.3f}")
    best = max(rows, key=lambda r: (r["judge_validity"], -r["guide_loss"]))["eta"]
    ev = kit.evaluate(kit.generate(presets.shen2024(eta=best, polyak_gap="loss"), range(60), 50))
    print(f"eval eta={best} on seeds 0-59: {json.dumps(ev)}")
    atomic_write_json(args.out, {"tune": rows, "eval": {"eta": best, **ev}})


if __name__ == "__main__":
    main()
