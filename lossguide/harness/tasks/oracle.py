"""The Gaussian-mixture oracle's tasks (:func:`~lossguide.oracle.default_mixture`): guided samples against
4,096 exact posterior samples, by the sliced 2-Wasserstein distance (256 directions)."""

from __future__ import annotations

import torch

from lossguide import metrics
from lossguide.augment import GaussianJitter
from lossguide.harness.methods import ORACLE_JITTER
from lossguide.oracle import OracleTask, class_task, default_mixture, linear_task
from lossguide.schedule import NoiseSchedule

POSTERIOR_SEED = 123


def oracle_tasks(schedule: NoiseSchedule) -> list[OracleTask]:
    """``class`` (toward the least likely component) and ``linear`` (2-D linear measurement) on the default mixture."""
    prior = default_mixture()
    return [class_task(prior, schedule), linear_task(prior, schedule)]


def posterior_samples(task: OracleTask, n: int = 4096) -> torch.Tensor:
    """``n`` exact posterior samples of ``task`` (fixed seed)."""
    return task.posterior.sample(n, torch.Generator().manual_seed(POSTERIOR_SEED))[0]


class OracleTaskAdapter:
    """``oracle-class`` / ``oracle-linear`` as a harness task: the exact clean loss (or the exact noise-aware one)."""

    oracle = True
    augment = GaussianJitter(ORACLE_JITTER)

    def __init__(self, kind: str):
        self.kind = kind
        self.schedule = NoiseSchedule.linear()
        tasks = {t.name.split("-")[0]: t for t in oracle_tasks(self.schedule)}
        self.task = tasks[kind.split("-")[1]]
        self.posterior_x = posterior_samples(self.task)
        self.shape = (self.task.prior.dim,)

    def loss(self, seeds, noise_aware: bool = False):
        return self.task.noisy_loss if noise_aware else self.task.loss

    def denoiser(self):
        return self.task.prior.denoiser(self.schedule)

    def records(self, x: torch.Tensor, seeds) -> list[dict]:
        L = self.task.loss(x)
        lab = self.task.prior.component_log_posterior(x, 1.0).argmax(1)
        return [{"seed": s, "x": [float(v) for v in x[k]], "guide_loss": float(L[k]), "label": int(lab[k])}
                for k, s in enumerate(seeds)]  # fmt: skip

    def summary(self, recs: list[dict]) -> dict:
        x = torch.tensor([r["x"] for r in recs], dtype=torch.float64)
        finite = torch.isfinite(x).all(1)
        out = {"n": len(recs), "guide_loss": sum(r["guide_loss"] for r in recs) / len(recs),
               "sw_to_posterior": metrics.sliced_wasserstein(x[finite], self.posterior_x) if finite.all()
               else float("inf")}  # fmt: skip
        if self.task.name.startswith("class-"):
            target = int(self.task.name.split("-")[1])
            out["validity"] = sum(r["label"] == target for r in recs) / len(recs)
        return out

    def objective(self, summary: dict, fid_ceiling: float | None = None) -> float:
        """Minus the sliced W2 distance to the exact posterior."""
        return -summary["sw_to_posterior"]
