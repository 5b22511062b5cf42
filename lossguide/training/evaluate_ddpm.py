"""Evaluate a shipped MNIST diffusion model unguided and record it in the manifest (hashes, command, time, metrics).

Unguided DDIM-50 samples (η = 0, seeds 0..n−1) are classified by the judge: the share with confidence ≥ 0.9,
the class histogram and its total-variation distance to uniform; ``--fid`` adds FID and KID on the judge's
features against the 1,000 held-out digits (:meth:`lossguide.harness.tasks.mnist.MnistKit.fid_kid`).
``--model mnist-flow`` evaluates the rectified-flow model (DDIM-50 on its FlowSchedule: t = 1, 0.98, ..., 0.02).
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

KINDS = {
    "mnist-ddpm": "diffusers UNet2DModel + DDPMScheduler (epsilon, linear beta 1e-4..0.02, 1000 steps)",
    "mnist-flow": "rectified flow (FlowSchedule, flow_prediction): the mnist-ddpm UNet2DModel architecture inside "
    "the exact VP->flow wrapper lossguide.models.flowwrap.FlowFromEps (flow_wrapper.json), fine-tuned with the "
    "flow-matching loss; scheduler/ is a FlowMatchEulerDiscreteScheduler config",
}


def evaluate(n: int = 256, steps: int = 50, batch: int = 64, model: str = "mnist-ddpm", fid: bool = False,
             loaded=None) -> dict:  # fmt: skip
    """Unguided DDIM-``steps`` (η = 0) metrics of ``model`` (or of an already ``loaded`` denoiser) on seeds 0..n−1."""
    m = models.load_denoiser(model) if loaded is None else loaded
    judge = models.load_classifier("mnist-judge")
    sampler = DDIM(m.denoiser.schedule, steps)
    xs, labels, confs = [], [], []
    t0 = time.time()
    for b in range(0, n, batch):
        x = sample(m.denoiser, sampler, shape=m.sample_shape, seeds=range(b, min(n, b + batch))).x0.clamp(-1, 1)
        with torch.no_grad():
            p = torch.softmax(judge(x), 1)
        xs.append(x)
        labels.append(p.argmax(1))
        confs.append(p.max(1).values)
    wall = time.time() - t0
    labels, confs = torch.cat(labels), torch.cat(confs)
    hist = torch.bincount(labels, minlength=10).tolist()
    out = {
        "judge_labels_first64": labels[:64].tolist(),
        "unguided_eval": f"DDIM-{steps}, eta 0, seeds 0..{n - 1}, judge mnist-judge",
        "judge_confident_0.9_share": round(float((confs >= 0.9).float().mean()), 4),
        "judge_mean_confidence": round(float(confs.mean()), 4),
        "class_histogram": hist,
        "class_histogram_tv_to_uniform": round(0.5 * sum(abs(h / n - 0.1) for h in hist), 4),
        "eval_seconds": round(wall, 1),
    }
    if fid:
        from lossguide.harness.tasks.mnist import MnistKit

        with torch.no_grad():
            d = MnistKit().fid_kid(torch.cat(xs))
        out.update({"fid_judge_features": round(d["fid"], 3), "kid_x1e3_judge_features": round(d["kid_x1e3"], 3),
                    "kid_std_x1e3": round(d["kid_std_x1e3"], 3),
                    "fid_note": "judge (mnist-judge) 128-d features against the 1,000 held-out digits"})  # fmt: skip
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=sorted(KINDS), default="mnist-ddpm")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--fid", action="store_true", help="add FID/KID on the judge's features")
    args = ap.parse_args(argv)
    folder = models.DENOISERS[args.model]
    meta = json.loads((folder / "training.json").read_text())
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entry = {
        "folder": args.model,
        "kind": KINDS[args.model],
        "files": {str(p.relative_to(folder)): models.sha256(p) for p in files},
        "split": "gen (A + B, 4000 digits)",
        "seed": meta["seed"],
        "command": meta.get("command", f"python -m lossguide.training {'flow' if 'flow' in args.model else 'ddpm'}"),
        **({"how_made": meta["made"]} if "made" in meta else {}),
        "training": meta,
        "metrics": evaluate(args.n, args.steps, model=args.model, fid=args.fid),
    }
    data = models.manifest()
    if args.model in data:  # keep what other tools added to the entry (e.g. comparisons)
        entry = {**data[args.model], **entry}
    data[args.model] = entry
    atomic_write_json(models.MANIFEST, dict(sorted(data.items())))
    print(json.dumps(entry["metrics"], indent=2))


if __name__ == "__main__":
    main()
