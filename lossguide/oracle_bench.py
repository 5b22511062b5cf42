"""``lossguide oracle``: every preset on the Gaussian-mixture oracle, scored by its distance to the exact posterior.

Two fixed tasks (:func:`~lossguide.harness.tasks.oracle.oracle_tasks`, d = 8, 4 components): ``class`` (toward the
least likely component, exact clean classifier as the loss) and ``linear`` (posterior of a 2-D linear
measurement), run and scored by :mod:`lossguide.harness.tasks.oracle`. This module is the command's tuner: each
preset's step parameter is chosen by :func:`tune` on tuning seeds (``tune_seeds("oracle", n)``, disjoint from the
evaluation seeds) and stored in the settings store (sections ``oracle-class``, ``oracle-linear``); ``cg`` uses the
exact noise-aware classifier at scale 1 and is not tuned.
"""

from __future__ import annotations

from lossguide.harness.methods import tuned_param
from lossguide.harness.tasks.oracle import oracle_tasks, posterior_samples, run_one
from lossguide.harness.tuning import half_decades, tune_each, tune_seeds
from lossguide.schedule import NoiseSchedule

#: the multiplicative grid of each method's step parameter (:func:`~lossguide.harness.methods.tuned_param`)
GRIDS: dict[str, list[float]] = {
    "dps": half_decades(0.003, 1.0),
    "freedom": half_decades(0.003, 0.3),
    "ugd": half_decades(0.01, 0.3),
    "lgd_mc": half_decades(0.003, 0.3),
    "mpgd": half_decades(0.001, 0.1),
    "tfg": half_decades(0.003, 0.1),
    "shen2024": half_decades(0.001, 1.0),
    "naive_grad": half_decades(0.001, 1.0),
}
#: parameters held fixed while the grid runs: the paper's Polyak gap ‖ε‖ diverges on the class task's saturating
#: cross-entropy at every η (``benchmarks/oracle_polyak.py``), so there shen2024 takes the classical gap ℓ
FIXED: dict[str, dict[str, dict]] = {"class": {"shen2024": {"polyak_gap": "loss"}}}


def tune(n: int = 128, steps: int = 50, methods: list[str] | None = None) -> tuple[dict, list[dict]]:
    """Grid search of the step parameter of each method of :data:`GRIDS` (or of ``methods``) on tuning seeds;
    returns (settings by task kind, trace)."""
    bad = [m for m in methods or () if m not in GRIDS]
    if bad:
        raise ValueError(f"--tune has no grid for {bad[0]!r}; it tunes {', '.join(GRIDS)}")
    grids = GRIDS if methods is None else {m: GRIDS[m] for m in methods}
    schedule = NoiseSchedule.linear()
    seeds = tune_seeds("oracle", n)
    settings: dict = {}
    trace = []
    for task in oracle_tasks(schedule):
        post = posterior_samples(task)
        kind = task.name.split("-")[0]
        fixed = FIXED.get(kind, {})

        def score(name, v, task=task, post=post, fixed=fixed):
            row = run_one(task, name, {**fixed.get(name, {}), tuned_param(name, oracle=True)[0]: v}, schedule,
                          seeds, steps, post)  # fmt: skip
            trace.append(row)
            return -row["sw_to_posterior"]

        best = tune_each(grids, score)
        settings[kind] = {
            name: {**fixed.get(name, {}), tuned_param(name, oracle=True)[0]: v} for name, v in best.items()
        }
    return settings, trace
