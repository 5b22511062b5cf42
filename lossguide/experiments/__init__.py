"""``lossguide experiment NAME``: the paper's analysis experiments as commands.

Each experiment is a function ``run(out: Path, quick: bool = False) -> dict`` that writes a folder with
``report.md`` (tables, figures, the command that made them and a reading), PNG figures and the raw
numbers as JSON/CSV, and returns a summary dict. Seeds are fixed inside each experiment and recorded
in its JSON. The registry maps names to ``"module:function"`` so that importing it costs nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

EXPERIMENTS: dict[str, str] = {
    "loss-curves": "lossguide.experiments.understanding:loss_curves",
    "gradients": "lossguide.experiments.understanding:gradients",
    "adversarial-gap": "lossguide.experiments.understanding:adversarial_gap",
    "convergence": "lossguide.experiments.understanding:convergence",
    "ablation": "lossguide.experiments.understanding:ablation",
    "ra-cost": "lossguide.experiments.understanding:ra_cost",
    "oracle": "lossguide.experiments.oracle_exp:run",
    "motion": "lossguide.motion.experiment:run",
    "autoguidance": "lossguide.experiments.autoguidance:run",
    "layout": "lossguide.experiments.layout:run",
    "distill": "lossguide.experiments.distill:run",
    "optimization": "lossguide.experiments.optimization:run",
}


def get(name: str) -> Callable[..., dict]:
    """The experiment function registered as ``name``; unknown names raise a one-line error."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)} or all")
    module, fn = EXPERIMENTS[name].split(":")
    return getattr(importlib.import_module(module), fn)


#: experiments that take ``loss="ce"|"feature"`` (the guide's cross-entropy or its class feature distance)
LOSS_AWARE = ("loss-curves", "gradients", "adversarial-gap", "convergence", "ablation")
LOSS_KINDS = ("ce", "feature")


def run(name: str, out: Path, quick: bool = False, loss: str = "ce") -> dict:
    """Run experiment ``name`` into ``out`` (created if needed), with the class loss ``loss``."""
    if loss not in LOSS_KINDS:
        raise ValueError(f"unknown --loss {loss!r}; choose one of {', '.join(LOSS_KINDS)}")
    fn = get(name)
    if loss != "ce" and name not in LOSS_AWARE:
        raise ValueError(f"experiment {name!r} has no class loss to switch; --loss applies to {', '.join(LOSS_AWARE)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return fn(out, quick=quick, **({"loss": loss} if name in LOSS_AWARE else {}))
