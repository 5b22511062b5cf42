"""Train the project's MNIST classifiers on fixed splits (see :mod:`lossguide.data.mnist`).

- ``guide``  : GuideCNN on split A, clean digits (the off-the-shelf network that guides);
- ``judge``  : JudgeResNet on split B (disjoint from every guiding network; evaluation only);
- ``noise``  : NoiseAwareCNN p(y | x_t, t) on noised split-A digits (the training-based reference, ``cg``);
- ``robust`` : GuideCNN adversarially trained on split A with L2 PGD (Madry et al. 2018).

Each writes ``<out>/<name>.safetensors`` and its manifest entry (hash, command, split, seed, time,
held-out metrics). Every random draw uses one seeded generator, so a rerun gives the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lossguide.data import load_mnist
from lossguide.io import atomic_write_json
from lossguide.models.nets import GuideCNN, JudgeResNet, NoiseAwareCNN
from lossguide.schedule import NoiseSchedule
from lossguide.training.common import setup_logging

log = logging.getLogger("lossguide.training.classifiers")

SPECS = {
    "mnist-guide": dict(arch="GuideCNN", split="A", epochs=40, seed=1),
    "mnist-judge": dict(arch="JudgeResNet", split="B", epochs=30, seed=2),
    "mnist-noise-aware": dict(arch="NoiseAwareCNN", split="A", epochs=60, seed=3),
    "mnist-robust": dict(arch="GuideCNN", split="A", epochs=20, seed=4, pgd_eps=2.0, pgd_steps=3),
    # issue 23 item 6: the same network trained 400 epochs (12,400 steps, fresh noise each) instead of 60
    "mnist-noise-aware-long": dict(arch="NoiseAwareCNN", split="A", epochs=400, seed=5, fp16=True),
}
ALIASES = {
    "guide": "mnist-guide",
    "judge": "mnist-judge",
    "noise": "mnist-noise-aware",
    "robust": "mnist-robust",
    "noise-long": "mnist-noise-aware-long",
}


NOISE_AWARE_EVAL_T = (0, 200, 400, 500, 600, 700, 800)


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift each digit by up to ``max_shift`` pixels, filling with the background value −1."""
    B, _, H, W = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    off = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=gen)
    return torch.stack([pad[b, :, oy : oy + H, ox : ox + W] for b, (oy, ox) in enumerate(off.tolist())])


def pgd_l2(model, x, y, eps: float, steps: int, gen: torch.Generator) -> torch.Tensor:
    """L2 projected gradient ascent on the cross-entropy from a random start (Madry et al. 2018)."""
    alpha = 2.5 * eps / steps
    delta = torch.randn(x.shape, generator=gen)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * torch.rand(len(x), 1, 1, 1, generator=gen)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (g,) = torch.autograd.grad(loss, delta)
        g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta.detach() + alpha * g
        norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0)
    return (x + delta).detach()


@torch.no_grad()
def accuracy(model, x, y, t: int | None = None, gen: torch.Generator | None = None, schedule=None) -> float:
    model.eval()
    if t is not None:
        ab = schedule.at(t)
        x = ab**0.5 * x + (1 - ab) ** 0.5 * torch.randn(x.shape, generator=gen)
        logits = model(x, torch.full((len(x),), t, dtype=torch.long))
    else:
        logits = model(x)
    return float((logits.argmax(1) == y).float().mean())


def train(name: str, out: Path, batch: int = 64, lr: float = 1e-3) -> dict:
    spec = SPECS[name]
    torch.manual_seed(spec["seed"])  # parameter init only
    model = {"GuideCNN": GuideCNN, "JudgeResNet": JudgeResNet, "NoiseAwareCNN": NoiseAwareCNN}[spec["arch"]]()
    gen = torch.Generator().manual_seed(spec["seed"])
    x_tr, y_tr = load_mnist(spec["split"])
    ab = NoiseSchedule.linear().alpha_bar.float()
    iters = spec["epochs"] * (len(x_tr) // batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iters, pct_start=0.1)
    t0 = time.time()
    for it in range(iters):
        model.train()
        idx = torch.randint(0, len(x_tr), (batch,), generator=gen)
        x, y = random_shift(x_tr[idx], gen), y_tr[idx]
        if spec["arch"] == "NoiseAwareCNN":
            t = torch.randint(0, 1000, (batch,), generator=gen)
            a = ab[t].view(-1, 1, 1, 1)
            x = a.sqrt() * x + (1 - a).sqrt() * torch.randn(x.shape, generator=gen)
            logits = model(x, t)
        else:
            if "pgd_eps" in spec:
                model.eval()  # attack the current weights without touching BatchNorm statistics
                x = pgd_l2(model, x, y, spec["pgd_eps"], spec["pgd_steps"], gen)
                model.train()
            logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (it + 1) % 200 == 0:
            log.info("%s it %d/%d loss %.4f", name, it + 1, iters, loss.item())
    return finish(name, model, time.time() - t0, out, batch)


def finish(name: str, model: torch.nn.Module, seconds: float, out: Path, batch: int = 64) -> dict:
    """After training: round to the shipped precision, measure on the held-out digits, write the weights
    atomically and return the manifest entry."""
    spec = SPECS[name]
    x_ho, y_ho = load_mnist("heldout")
    schedule = NoiseSchedule.linear()
    model.eval()
    if spec.get("fp16"):  # shipped in half precision (size): the metrics are those of the rounded weights
        model = model.half().float()
    eval_gen = torch.Generator().manual_seed(12345)
    if spec["arch"] == "NoiseAwareCNN":
        metrics = {f"heldout_acc_t{t}": accuracy(model, x_ho, y_ho, t, eval_gen, schedule) for t in NOISE_AWARE_EVAL_T}
    else:
        metrics = {"heldout_acc": accuracy(model, x_ho, y_ho)}
    if "pgd_eps" in spec:
        x_adv = pgd_l2(model, x_ho[:500], y_ho[:500], spec["pgd_eps"], 20, eval_gen)
        metrics[f"heldout_pgd20_l2_{spec['pgd_eps']}_acc_first500"] = accuracy(model, x_adv, y_ho[:500])
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    tmp = path.with_suffix(".tmp")
    dtype = torch.float16 if spec.get("fp16") else torch.float32
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)
    entry = {
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "arch": spec["arch"],
        "kind": "noise_aware_classifier" if spec["arch"] == "NoiseAwareCNN" else "classifier",
        "split": spec["split"],
        "seed": spec["seed"],
        "epochs": spec["epochs"],
        "batch": batch,
        **({"dtype": "float16"} if spec.get("fp16") else {}),
        "train_seconds": round(seconds, 1),
        "command": f"python -m lossguide.training classifiers --which {name} --out {out}",
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
    }
    if "pgd_eps" in spec:
        entry["adversarial_training"] = {"attack": "L2 PGD", "eps": spec["pgd_eps"], "steps": spec["pgd_steps"]}
    log.info("%s: %s", name, json.dumps(entry))
    return entry


def update_manifest(manifest: Path, name: str, entry: dict) -> None:
    data = json.loads(manifest.read_text()) if manifest.exists() else {}
    data[name] = entry
    atomic_write_json(manifest, dict(sorted(data.items())))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", default="all", help=f"comma-separated: {', '.join(ALIASES)} or all")
    ap.add_argument("--out", type=Path, default=Path("lossguide/models/weights"))
    ap.add_argument("--manifest", type=Path, default=None, help="default: <out>/../manifest.json")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging(None)
    names = list(SPECS) if args.which == "all" else [ALIASES.get(w, w) for w in args.which.split(",")]
    bad = [n for n in names if n not in SPECS]
    if bad:
        sys.exit(f"unknown classifier {bad}; choose from {list(ALIASES)}")
    manifest = args.manifest or args.out.parent / "manifest.json"
    for name in names:
        update_manifest(manifest, name, train(name, args.out))


if __name__ == "__main__":
    main()
