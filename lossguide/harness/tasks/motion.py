"""The motion task (Table 3 of Shen et al. 2024, eq. 8): the last frame's root reaches a goal while the root path
keeps out of a cylinder placed halfway, per seed, on the shipped motion model (:mod:`lossguide.motion.model`).

A sample's seed names its scenario and its draw: seed ``s + SCENARIO_STRIDE·j`` is draw ``s`` of scenario ``j``
(:meth:`MotionTask.seeds`). The guide loss is eq. 8 at the radius r + :data:`GUIDE_MARGIN` (the paper's code), the
score is eq. 8's two terms at r (target MSE in m², avoidance) plus realism statistics of each window, and the
tuners' objective is the mean of the two terms while foot skating stays within :data:`REALISM_GUARD` × unguided's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lossguide.motion.augment import MotionAugment
from lossguide.motion.losses import ObstacleLoss, TargetLoss, WeightedSum, on_normalized
from lossguide.motion.model import MotionModel
from lossguide.motion.stats import window_stats

#: (name, goal x z, obstacle centre x z (goal/2), evaluation radius r), metres
SCENARIOS = (
    ("ahead 2.5 m", (2.5, 0.0), (1.25, 0.0), 0.4),
    ("left 3 m", (0.0, 3.0), (0.0, 1.5), 0.5),
    ("back 2 m", (-1.6, -1.2), (-0.8, -0.6), 0.35),
)
GUIDE_MARGIN = 0.2  # the paper's code guides with r + 0.2 and evaluates with r
SCENARIO_STRIDE = 100_000  # sample seed = draw + SCENARIO_STRIDE · scenario index
REALISM_GUARD = 1.5  # the tuners keep a step value only if mean skating ≤ 1.5 × unguided's (same seeds)


def task_loss(goals: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, margin: float = GUIDE_MARGIN):
    """Eq. 8 per sample: target MSE + obstacle penalty at radius r + margin (per-sample goals/obstacles)."""
    return WeightedSum([(1.0, TargetLoss(goals)), (1.0, ObstacleLoss(centers.unsqueeze(1), radii + margin))])


def evaluate(x: torch.Tensor, goals, centers, radii) -> dict[str, torch.Tensor]:
    """Per-sample target MSE (m²) and avoidance loss (eq. 8's penalty at the evaluation radius r)."""
    x = x.double()
    return {"target_mse": TargetLoss(goals)(x), "avoid": ObstacleLoss(centers.unsqueeze(1), radii)(x)}


class MotionTask:
    """Eq. 8 on ``model`` over ``scenarios``: per-seed guide loss, scores and the realism-guarded objective."""

    def __init__(self, model: MotionModel, scenarios: Sequence[tuple] = SCENARIOS):
        self.model, self.scenarios = model, tuple(scenarios)
        self.shape = model.shape
        self.augment = MotionAugment(model)

    def denoiser(self):
        return self.model.denoiser

    def seeds(self, draws: Sequence[int]) -> tuple[list[int], list[str]]:
        """The sample seeds of every (scenario, draw) pair, scenario-major, and each one's scenario name."""
        if any(not 0 <= int(s) < SCENARIO_STRIDE for s in draws):
            raise ValueError(f"motion draws must lie in 0..{SCENARIO_STRIDE - 1} (a seed above names a scenario)")
        pairs = [(j, int(s)) for j in range(len(self.scenarios)) for s in draws]
        return [s + SCENARIO_STRIDE * j for j, s in pairs], [self.scenarios[j][0] for j, _ in pairs]

    def _targets(self, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample goals, obstacle centres and evaluation radii of sample ``seeds`` (float64)."""
        sc = [self.scenarios[int(s) // SCENARIO_STRIDE] for s in seeds]
        t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return t([c[1] for c in sc]), t([c[2] for c in sc]), t([c[3] for c in sc])

    def loss(self, seeds: Sequence[int]):
        """Eq. 8 at r + margin on the model's normalised representation, one row per sample seed."""
        return on_normalized(task_loss(*self._targets(seeds)), self.model)

    def scores(self, x: torch.Tensor, seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        """Per-sample eq. 8 terms at r and realism statistics of motions ``x`` (joint positions, metres)."""
        m = evaluate(x, *self._targets(seeds))
        m.update(window_stats(x))
        return m

    @staticmethod
    def objective(scores: dict[str, torch.Tensor], unguided_skating: float) -> float:
        """The tuners' objective: −(mean target MSE + avoidance), −inf where mean skating exceeds the guard."""
        total = float((scores["target_mse"] + scores["avoid"]).mean())
        ok = float(scores["skating"].mean()) <= REALISM_GUARD * unguided_skating and math.isfinite(total)
        return -total if ok else -math.inf
