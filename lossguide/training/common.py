"""Shared pieces of the training scripts: arguments, the optimiser step, atomic checkpoints, EMA, logging."""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
from pathlib import Path

import torch

from lossguide.io import atomic_write_bytes

log = logging.getLogger(__name__)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through :func:`lossguide.io.atomic_write_bytes`: a killed run never leaves half a file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


class EMA:
    """Exponential moving average of a model's weights with warm-up decay min(d, (1+n)/(10+n))."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]


def setup_logging(log_file: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", handlers=handlers, force=True)


def resume(ckpt: Path, model: torch.nn.Module, ema: EMA, opt, gen: torch.Generator) -> tuple[int, float]:
    """Restore a training checkpoint written by the training loops, if it exists: (step, elapsed seconds)."""
    if not ckpt.exists():
        return 0, 0.0
    state = torch.load(ckpt, weights_only=False)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    gen.set_state(state["gen"])
    log.info("resumed at iteration %d", state["step"])
    return state["step"], state["elapsed"]


def add_run_args(ap: argparse.ArgumentParser, out: str, export_help: str, iters: int, batch: int, lr: float,
                 warmup: int, ema: float = 0.999) -> None:
    """The arguments every training script takes (--out, --export, --iters, --batch, --lr, --warmup, --ema)."""
    ap.add_argument("--out", type=Path, default=Path(out), help="checkpoint/log folder")
    ap.add_argument("--export", type=Path, default=None, help=export_help)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--ema", type=float, default=ema)


def optimizer_step(model: torch.nn.Module, opt, ema: EMA, loss: torch.Tensor, clip: float = 1.0) -> None:
    """One training step: gradients of ``loss``, norm clipped at ``clip``, the optimiser step, the EMA update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    ema.update(model)


def parse_widths(text: str) -> tuple[int, ...]:
    """``16,32,64`` → (16, 32, 64), for a ``--block-channels`` argument."""
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def checkpoint_state(model: torch.nn.Module, ema: EMA, opt, gen: torch.Generator, step: int, elapsed: float,
                     **extra) -> dict:
    """What :func:`resume` restores: model, EMA, optimiser, data generator, step, elapsed seconds (and ``extra``)."""
    return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
            "step": step, "elapsed": elapsed, **extra}  # fmt: skip


def finish(model: torch.nn.Module, ema: EMA, path: Path | None, meta: dict, export, *export_args) -> None:
    """Record the parameter count, export the EMA weights with ``export(ema_model, path, meta, *export_args)``."""
    meta["parameters"] = sum(p.numel() for p in model.parameters())
    if path is not None:
        export(ema.model, path, meta, *export_args)
        log.info("exported EMA weights to %s", path)
    log.info("done: %s", json.dumps(meta))


def run_meta(ap: argparse.ArgumentParser, args, script: str, options: tuple[str, ...], elapsed: float) -> dict:
    """The manifest record of a run: the command that reproduces it (every option in ``options`` that differs from
    its default), the run settings and the training seconds."""
    extra = ""
    for name in options:
        v = getattr(args, name)
        if v != ap.get_default(name):
            extra += f" --{name.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, tuple) else v}"
    command = f"{script} --out {args.out} --iters {args.iters}{extra} --export {args.export}"
    return {"command": command, "iters": args.iters, "batch": args.batch, "lr": args.lr, "seed": args.seed,
            "ema": args.ema, "train_seconds": round(elapsed, 1)}  # fmt: skip
