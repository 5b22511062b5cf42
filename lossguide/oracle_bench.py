"""``lossguide oracle``: every preset on the Gaussian-mixture oracle, scored by its distance to the exact posterior.

Two fixed tasks (:func:`~lossguide.harness.tasks.oracle.oracle_tasks`, d = 8, 4 components): ``class`` (toward the
least likely component, exact clean classifier as the loss) and ``linear`` (posterior of a 2-D linear
measurement). The distance is the sliced 2-Wasserstein distance (256 directions) between the guided samples
and 4,096 exact posterior samples. Each preset's step parameter is chosen by :func:`tune` on tuning seeds
(``tune_seeds("oracle", n)``, disjoint from the evaluation seeds) and stored in the settings store (sections
``oracle-class``, ``oracle-linear``); ``cg`` uses the exact noise-aware classifier at scale 1 and is not tuned.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from lossguide.harness import settings as store
from lossguide.harness.methods import METHODS, tuned_param
from lossguide.harness.methods import method_config as _method_config
from lossguide.harness.tasks.oracle import oracle_tasks, posterior_samples
from lossguide.harness.tuning import grid_search, tune_seeds
from lossguide.metrics import sliced_wasserstein
from lossguide.oracle import OracleTask
from lossguide.samplers import DDIM
from lossguide.sampling import sample
from lossguide.schedule import NoiseSchedule

log = logging.getLogger(__name__)

#: the multiplicative grid of each method's step parameter (:func:`~lossguide.harness.methods.tuned_param`)
GRIDS: dict[str, list[float]] = {
    "dps": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
    "freedom": [0.003, 0.01, 0.03, 0.1, 0.3],
    "ugd": [0.01, 0.03, 0.1, 0.3],
    "lgd_mc": [0.003, 0.01, 0.03, 0.1, 0.3],
    "mpgd": [0.001, 0.003, 0.01, 0.03, 0.1],
    "tfg": [0.003, 0.01, 0.03, 0.1],
    "shen2024": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
}
#: parameters held fixed while the grid runs: the paper's Polyak gap ‖ε‖ diverges on the class task's saturating
#: cross-entropy at every η (``benchmarks/oracle_polyak.py``), so there shen2024 takes the classical gap ℓ
FIXED: dict[str, dict[str, dict]] = {"class": {"shen2024": {"polyak_gap": "loss"}}}


def method_config(name: str, params: dict):
    """Method ``name`` with its oracle parameters ``params`` (augmentation: Gaussian jitter, as for vectors)."""
    return _method_config(name, oracle=True, **params)


def run_one(task: OracleTask, name: str, params: dict, schedule, seeds, steps: int, posterior_x, **particles) -> dict:
    row = run_config(task, name, method_config(name, params), schedule, seeds, steps, posterior_x, **particles)
    row["params"] = dict(params)
    return row


def particle_refusal(cfg, steps: int) -> str | None:
    """Why :func:`~lossguide.smc.smc` cannot take ``cfg`` as its proposal (None: it can)."""
    from lossguide.guidance import GuidanceEngine
    from lossguide.smc import _check_sampler

    try:
        _check_sampler(
            GuidanceEngine(cfg, lambda x0: x0.sum(1)), DDIM(NoiseSchedule.linear(), steps, eta=PARTICLE_ETA)
        )
    except ValueError as e:
        return str(e)
    return None


#: DDIM η of ``--particles`` runs (the particle weights need the step's Gaussian density)
PARTICLE_ETA = 1.0


def run_config(task: OracleTask, name: str, cfg, schedule, seeds, steps: int, posterior_x,
               particles: int | None = None, potential: str = "tds") -> dict:  # fmt: skip
    """Sample ``seeds`` with guidance ``cfg`` on ``task`` and score them against ``posterior_x``; with ``particles``
    K, ``cfg`` is the proposal of :func:`~lossguide.smc.smc` (K particles per seed, ``potential``, DDIM η = 1)."""
    loss = task.noisy_loss if cfg.loss_input == "x_t" else task.loss
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
    row = {
        "task": task.name,
        "method": name,
        "sw_to_posterior": sliced_wasserstein(x[finite], posterior_x) if finite.all() else float("inf"),
        "loss": float(task.loss(x[finite]).mean()) if finite.any() else float("inf"),
        "nfe": res.stats.nfe * (particles or 1),
        "denoiser_grads": res.stats.denoiser_grads,
        "loss_grads": res.stats.loss_grads,
        "skipped_steps": int(res.stats.skipped.sum()),
        "wall_s": round(wall, 3),
    }
    if particles is not None:
        row.update(particles=particles, potential=potential)
    if task.name.startswith("class-"):
        target = int(task.name.split("-")[1])
        label = task.prior.component_log_posterior(x[finite], 1.0).argmax(1)
        row["validity"] = float((label == target).double().mean())
    return row


def load_settings() -> dict:
    """The shipped oracle settings, by task kind: ``{"class": {method: params}, "linear": {...}}``."""
    s = store.load()
    return {kind: s[f"oracle-{kind}"] for kind in ("class", "linear") if f"oracle-{kind}" in s}


def save_settings(settings: dict) -> Path:
    """Store ``settings`` (by task kind, as :func:`tune` returns them) as the shipped oracle sections."""
    return store.save({f"oracle-{kind}": v for kind, v in settings.items()})


def run(n: int = 512, steps: int = 50, methods=METHODS, settings: dict | None = None, **particles) -> list[dict]:
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


def tune(n: int = 128, steps: int = 50) -> tuple[dict, list[dict]]:
    """Grid search of each method's step parameter on tuning seeds; returns (settings, trace)."""
    schedule = NoiseSchedule.linear()
    seeds = tune_seeds("oracle", n)
    settings: dict = {}
    trace = []
    for task in oracle_tasks(schedule):
        post = posterior_samples(task)
        kind = task.name.split("-")[0]
        settings[kind] = {}
        for name, values in GRIDS.items():
            param, fixed = tuned_param(name, oracle=True)[0], FIXED.get(kind, {}).get(name, {})

            def score(v, task=task, name=name, param=param, fixed=fixed, post=post):
                row = run_one(task, name, {**fixed, param: v}, schedule, seeds, steps, post)
                trace.append(row)
                return -row["sw_to_posterior"]

            settings[kind][name] = {**fixed, param: grid_search(score, values)[0]}
    return settings, trace
