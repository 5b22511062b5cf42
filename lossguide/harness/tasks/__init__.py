"""The harness's tasks: what a guided sample set is for and how it is scored, per seed.

A task gives, for a list of seeds, the guide loss (:meth:`Task.loss`), the model (:meth:`Task.denoiser`, its data
augmentation :attr:`Task.augment`), per-sample records of a sample set (:meth:`Task.records`), their summary and
the tuners' objective. MNIST tasks are in :mod:`~lossguide.harness.tasks.mnist`, the Gaussian-mixture oracle's
in :mod:`~lossguide.harness.tasks.oracle`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

MNIST_TASKS = ("class", "class-feature", "sketch", "inpaint", "sr", "class+sketch")
CLASS_TASKS = ("class", "class-feature")  # target = seed mod 10
ORACLE_TASKS = ("oracle-class", "oracle-linear")
NORM_TASKS = ("sketch", "inpaint", "sr", "class+sketch")  # the tasks with a residual whose norm --norm sets
TASKS = MNIST_TASKS + ORACLE_TASKS


class Task(Protocol):
    """What the harness asks of a task (seeds are the unit: the same seed gives the same target and reference)."""

    oracle: bool  # float64 vectors on CPU, no clamping, no image files
    shape: tuple[int, ...]
    augment: Callable | None

    def loss(self, seeds: Sequence[int], noise_aware: bool = False) -> Callable: ...

    def denoiser(self): ...

    def records(self, x, seeds: Sequence[int]) -> list[dict]: ...

    def summary(self, records: list[dict]) -> dict: ...

    def objective(self, summary: dict, fid_ceiling: float | None = None) -> float: ...


#: the methods whose loss of (x_t, t) is a trained noise-aware classifier (the class and oracle tasks have one);
#: any other method that reads x_t (``naive_grad``) gets the task's clean loss evaluated at x_t
NOISE_AWARE_METHODS = ("cg",)


def _base(name: str) -> str:
    return re.split(r"[+-]", name, maxsplit=1)[0]


def applicable(task: str, method: str) -> bool:
    """Whether ``method`` runs on ``task`` (cg needs the noise-aware classifier: class and oracle tasks)."""
    from lossguide.harness.methods import parse_method

    return parse_method(method)[0] not in NOISE_AWARE_METHODS or task in (*CLASS_TASKS, *ORACLE_TASKS)


def method_loss(cfg, clean: Callable, noise_aware: Callable[[], Callable]) -> Callable:
    """The loss a task hands guidance ``cfg`` (one rule for sample, bench and the oracle): its clean loss ℓ(x0)
    where the method guides through x0_hat, ``noise_aware()`` (the task's noise-aware classifier, built only when
    asked) for :data:`NOISE_AWARE_METHODS`, else ℓ read at x_t (:func:`~lossguide.optimize.on_x_t`: naive_grad)."""
    if cfg.loss_input != "x_t":
        return clean
    if _base(cfg.name) in NOISE_AWARE_METHODS:
        return noise_aware()
    from lossguide.optimize import on_x_t

    return on_x_t(clean)
