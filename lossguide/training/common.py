"""Shared pieces of the training scripts: atomic checkpoints, EMA, logging set-up."""

from __future__ import annotations

import copy
import io
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
