"""Evaluate the shipped DDPM unguided and record it in the manifest (hashes, command, time, metrics).

Unguided DDIM-50 samples (seeds 0..n−1) are classified by the judge: the share with confidence ≥ 0.9,
the class histogram and its total-variation distance to uniform.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lossguide import models
from lossguide.io import atomic_write_json
from lossguide.samplers import DDIM
from lossguide.sampling import sample


def evaluate(n: int = 256, steps: int = 50, batch: int = 64) -> dict:
    m = models.load_denoiser("mnist-ddpm")
    judge = models.load_classifier("mnist-judge")
    sampler = DDIM(m.denoiser.schedule, steps)
    labels, confs = [], []
    t0 = time.time()
    for b in range(0, n, batch):
        x = sample(m.denoiser, sampler, shape=m.sample_shape, seeds=range(b, min(n, b + batch))).x0.clamp(-1, 1)
        with torch.no_grad():
            p = torch.softmax(judge(x), 1)
        labels.append(p.argmax(1))
        confs.append(p.max(1).values)
    labels, confs = torch.cat(labels), torch.cat(confs)
    hist = torch.bincount(labels, minlength=10).tolist()
    return {
        "judge_labels_first64": labels[:64].tolist(),
        "unguided_eval": f"DDIM-{steps}, eta 0, seeds 0..{n - 1}, judge mnist-judge",
        "judge_confident_0.9_share": round(float((confs >= 0.9).float().mean()), 4),
        "judge_mean_confidence": round(float(confs.mean()), 4),
        "class_histogram": hist,
        "class_histogram_tv_to_uniform": round(0.5 * sum(abs(h / n - 0.1) for h in hist), 4),
        "eval_seconds": round(time.time() - t0, 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    folder = models.DENOISERS["mnist-ddpm"]
    meta = json.loads((folder / "training.json").read_text())
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entry = {
        "folder": "mnist-ddpm",
        "kind": "diffusers UNet2DModel + DDPMScheduler (epsilon, linear beta 1e-4..0.02, 1000 steps)",
        "files": {str(p.relative_to(folder)): models.sha256(p) for p in files},
        "split": "gen (A + B, 4000 digits)",
        "seed": meta["seed"],
        "command": meta.get("command", "python -m lossguide.training ddpm"),
        "training": meta,
        "metrics": evaluate(args.n, args.steps),
    }
    data = models.manifest()
    data["mnist-ddpm"] = entry
    atomic_write_json(models.MANIFEST, dict(sorted(data.items())))
    print(json.dumps(entry["metrics"], indent=2))


if __name__ == "__main__":
    main()
