"""The MNIST experiments' method configs: a method spec with the shipped step parameters of its task, and their
grid tuner.

The kit (shipped DDPM and classifiers) is :class:`lossguide.harness.tasks.mnist.MnistKit`, re-exported here.
Step parameters live in the settings store (:mod:`lossguide.harness.settings`, sections ``class`` and
``class-feature``), chosen by :func:`tune_all` on tuning seeds ≥ 1000 (``tune_seeds("experiments", n)``),
disjoint from every evaluation seed set used here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lossguide.guidance import GuidanceConfig
from lossguide.harness import settings
from lossguide.harness.methods import method_config, tuned_param
from lossguide.harness.tasks.mnist import Generated, MnistKit, targets_for
from lossguide.harness.tuning import half_decades, tune_each, tune_seeds

__all__ = ["Generated", "MnistKit", "targets_for", "TUNE_GRIDS", "config", "tune_all"]

log = logging.getLogger(__name__)

#: the multiplicative grid of each method's step parameter (:func:`~lossguide.harness.methods.tuned_param`), class task
TUNE_GRIDS: dict[str, list[float]] = {
    "freedom": half_decades(1.0, 30.0),
    "freedom+polyak": half_decades(0.003, 0.1),
    "cg": half_decades(3.0, 100.0),
}


def config(name: str, task: str = "class", drop: tuple[str, ...] = (), **overrides) -> GuidanceConfig:
    """Method spec ``name`` at the shipped step parameters of ``task`` (settings store) less ``drop``, then
    ``overrides`` (drop what a variant switches off: ``eta`` with ``polyak=False`` has no effect and is refused)."""
    shipped = {k: v for k, v in settings.params(task, name).items() if k not in drop}
    return method_config(name, **{**shipped, **overrides})


def tune_all(kit: MnistKit, names: Sequence[str], n: int = 40, steps: int = 50) -> tuple[dict, list[dict]]:
    """Grid-search each of ``names`` on :data:`TUNE_GRIDS`; returns (the store, class section updated; trace)."""
    store = settings.load()
    trace: list[dict] = []
    seeds = tune_seeds("experiments", n)
    def score(name, v):
        param = tuned_param(name)[0]
        row = kit.evaluate(kit.generate(config(name, **{param: v}), seeds, steps), fid=False)
        row.update({"method": name, "param": param, "value": v})
        trace.append(row)
        log.info("tune %s %s=%g: validity %.3f loss %.3f", name, param, v, row["judge_validity"], row["guide_loss"])
        return row["judge_validity"], -row["guide_loss"]

    best = tune_each({name: TUNE_GRIDS[name] for name in names}, score)
    store.setdefault("class", {}).update({name: {tuned_param(name)[0]: v} for name, v in best.items()})
    return store, trace
