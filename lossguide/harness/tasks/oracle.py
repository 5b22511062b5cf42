"""The Gaussian-mixture oracle's tasks (:func:`~lossguide.oracle.default_mixture`): guided samples against
4,096 exact posterior samples, by the sliced 2-Wasserstein distance (256 directions).

One scorer (:func:`posterior_scores`) serves the bench's task (:class:`OracleTaskAdapter`), ``lossguide oracle``
and the oracle experiments (:func:`run_config`, :func:`evaluate`); the stored settings are the store's
``oracle-class`` / ``oracle-linear`` sections (:func:`load_settings`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from lossguide import metrics
from lossguide.augment import GaussianJitter
from lossguide.harness import settings as store
from lossguide.harness.methods import METHODS, ORACLE_JITTER
from lossguide.harness.methods import method_config as _method_config
from lossguide.harness.tasks import method_loss
from lossguide.oracle import OracleTask, class_task, default_mixture, linear_task
from lossguide.samplers import DDIM
from lossguide.sampling import sample
from lossguide.schedule import NoiseSchedule

log = logging.getLogger(__name__)

POSTERIOR_SEED = 123


def oracle_tasks(schedule: NoiseSchedule) -> list[OracleTask]:
    """``class`` (toward the least likely component) and ``linear`` (2-D linear measurement) on the default mixture."""
    prior = default_mixture()
    return [class_task(prior, schedule), linear_task(prior, schedule)]


def posterior_samples(task: OracleTask, n: int = 4096) -> torch.Tensor:
    """``n`` exact posterior samples of ``task`` (fixed seed)."""
    return task.posterior.sample(n, torch.Generator().manual_seed(POSTERIOR_SEED))[0]


def posterior_scores(task: OracleTask, x: torch.Tensor, posterior_x: torch.Tensor) -> dict:
    """The oracle's scores of samples ``x``: the sliced W2 distance to ``posterior_x`` (inf if any sample is not
    finite) and, on a class task, validity: the fraction of samples whose most likely component is the target (a
    sample that is not finite counts as invalid)."""
    finite = torch.isfinite(x).all(dim=1)
    out = {"sw_to_posterior": metrics.sliced_wasserstein(x[finite], posterior_x) if finite.all() else float("inf")}
    if task.name.startswith("class-"):
        target = int(task.name.split("-")[1])
        label = task.prior.component_log_posterior(x[finite], 1.0).argmax(1)
        out["validity"] = (label == target).double().sum().item() / len(x)
    return out


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
        guide_loss = sum(r["guide_loss"] for r in recs) / len(recs)
        return {"n": len(recs), "guide_loss": guide_loss, **posterior_scores(self.task, x, self.posterior_x)}

    def objective(self, summary: dict, fid_ceiling: float | None = None) -> float:
        """Minus the sliced W2 distance to the exact posterior."""
        return -summary["sw_to_posterior"]


def method_config(name: str, params: dict):
    """Method ``name`` with its oracle parameters ``params`` (augmentation: Gaussian jitter, as for vectors)."""
    return _method_config(name, oracle=True, **params)


def run_one(task: OracleTask, name: str, params: dict, schedule, seeds, steps: int, posterior_x, **particles) -> dict:
    row = run_config(task, name, method_config(name, params), schedule, seeds, steps, posterior_x, **particles)
    row["params"] = dict(params)
    return row


#: DDIM η of ``--particles`` runs (the particle weights need the step's Gaussian density)
PARTICLE_ETA = 1.0


def run_config(task: OracleTask, name: str, cfg, schedule, seeds, steps: int, posterior_x,
               particles: int | None = None, potential: str = "tds") -> dict:  # fmt: skip
    """Sample ``seeds`` with guidance ``cfg`` on ``task`` and score them against ``posterior_x``; with ``particles``
    K, ``cfg`` is the proposal of :func:`~lossguide.smc.smc` (K particles per seed, ``potential``, DDIM η = 1)."""
    loss = method_loss(cfg, task.loss, lambda: task.noisy_loss)
    t0 = time.perf_counter()
    if particles is None:
        res = sample(task.prior.denoiser(schedule), DDIM(schedule, steps), cfg, loss, shape=(task.prior.dim,),
                     seeds=seeds, dtype=torch.float64)  # fmt: skip
    else:
        from lossguide.smc import smc

        res = smc(task.prior.denoiser(schedule), DDIM(schedule, steps, eta=PARTICLE_ETA), cfg, loss,
                  particles=particles, potential=potential, shape=(task.prior.dim,), seeds=seeds,
                  dtype=torch.float64)  # fmt: skip
    wall = time.perf_counter() - t0
    x = res.x0
    finite = torch.isfinite(x).all(dim=1)
    scores = posterior_scores(task, x, posterior_x)
    row = {
        "task": task.name,
        "method": name,
        "sw_to_posterior": scores.pop("sw_to_posterior"),
        "loss": float(task.loss(x[finite]).mean()) if finite.any() else float("inf"),
        "nfe": res.stats.nfe * (particles or 1),
        "denoiser_grads": res.stats.denoiser_grads,
        "loss_grads": res.stats.loss_grads,
        "skipped_steps": int(res.stats.skipped.sum()),
        "wall_s": round(wall, 3),
    }
    if particles is not None:
        row.update(particles=particles, potential=potential)
    return row | scores


def load_settings() -> dict:
    """The shipped oracle settings, by task kind: ``{"class": {method: params}, "linear": {...}}``."""
    s = store.load()
    return {kind: s[f"oracle-{kind}"] for kind in ("class", "linear") if f"oracle-{kind}" in s}


def save_settings(settings: dict) -> Path:
    """Store ``settings`` (by task kind, as :func:`load_settings` returns them) in the shipped oracle sections: the
    methods given replace their entries, the others keep theirs."""
    shipped = load_settings()
    return store.save({f"oracle-{kind}": {**shipped.get(kind, {}), **v} for kind, v in settings.items()})


def evaluate(n: int = 512, steps: int = 50, methods=METHODS, settings: dict | None = None, **particles) -> list[dict]:
    """Evaluate ``methods`` on both tasks with ``n`` samples (seeds 0..n−1) at their stored settings; ``particles``
    (``particles=K, potential=...``): each method as the proposal of K particles per seed (:func:`run_config`)."""
    schedule = NoiseSchedule.linear()
    settings = load_settings() if settings is None else settings
    rows = []
    for task in oracle_tasks(schedule):
        post = posterior_samples(task)
        kind = task.name.split("-")[0]
        for name in methods:
            params = settings.get(kind, {}).get(name, {})
            rows.append(run_one(task, name, params, schedule, range(n), steps, post, **particles))
            log.info("%s %s %s", task.name, name, rows[-1]["sw_to_posterior"])
    return rows
