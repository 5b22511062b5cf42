"""Per-sample motion losses on features ``[B, L, 61]`` (metres): target reaching, obstacle avoidance
(Shen et al. 2024, eq. 8, after LGD's motion code), staying on a path, and their weighted sum.

Goals, obstacles and paths are one for all samples or one per sample; the guidance engine passes the
|T| augmented (or Monte-Carlo) copies of sample b as consecutive rows, and they inherit sample b's task.
:func:`on_normalized` turns a feature-space loss into one on the diffusion model's normalised z.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lossguide.losses import WeightedSum

__all__ = ["TargetLoss", "ObstacleLoss", "PathLoss", "WeightedSum", "on_normalized", "root_xz"]


def root_xz(x: torch.Tensor) -> torch.Tensor:
    """Root ground-plane trajectory ``[B, L, 2]`` of motion features ``[B, L, 61]``."""
    if x.ndim != 3 or x.shape[-1] < 2:
        raise ValueError(f"motion losses take features [B, L, 61], got shape {tuple(x.shape)}")
    return x[..., 0:2]


def _per_row(v: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """``v`` ``[K, ...]`` (K = 1 or one per sample) expanded to ``n`` rows, copies consecutive."""
    k = v.shape[0]
    if n % k:
        raise ValueError(f"{k} {what} for {n} motions; pass one for all samples or one per sample")
    return v.repeat_interleave(n // k, dim=0)


class TargetLoss:
    """‖y_target − x0(L)‖²: squared distance (m²) of the last frame's root (x, z) to the goal (eq. 8, first term).

    Args:
        goal: ``[2]`` for all samples or ``[B, 2]`` one per sample (ground-plane x, z in metres).
    """

    def __init__(self, goal: Sequence[float] | torch.Tensor):
        g = torch.as_tensor(goal, dtype=torch.float64)
        if g.ndim == 1:
            g = g.view(1, -1)
        if g.ndim != 2 or g.shape[-1] != 2:
            raise ValueError(f"goal must be [2] or [B, 2] (x, z in metres), got shape {tuple(g.shape)}")
        self.goal = g

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        end = root_xz(x)[:, -1]
        g = _per_row(self.goal.to(end), len(end), "goals")
        return (end - g).square().sum(-1)


class ObstacleLoss:
    """Σ_obstacles mean_frames sigmoid(−(‖x0(i) − y_obs‖ − r)·sharpness)·weight (eq. 8, second term).

    As the paper's (LGD's) code, the penalty is averaged over frames (eq. 8 writes a sum); sharpness 50
    and weight 100 are the paper's. The root's ground-plane position is the point x0(i).

    Args:
        centers: ``[K, 2]`` obstacles for all samples, or ``[B, K, 2]`` per sample.
        radius: cylinder radius r in metres (the paper's code guides with r + 0.2 and evaluates with r);
            a float, or ``[B]`` one per sample.
    """

    def __init__(self, centers, radius, sharpness: float = 50.0, weight: float = 100.0):
        c = torch.as_tensor(centers, dtype=torch.float64)
        if c.ndim == 1:
            c = c.view(1, 2)
        if c.ndim == 2:
            c = c.unsqueeze(0)
        if c.ndim != 3 or c.shape[-1] != 2:
            raise ValueError(f"centers must be [K, 2] or [B, K, 2] (x, z in metres), got shape {tuple(c.shape)}")
        r = torch.as_tensor(radius, dtype=torch.float64).view(-1)
        if (r <= 0).any():
            raise ValueError(f"radius must be > 0 metres, got {radius}")
        self.centers, self.radius, self.sharpness, self.weight = c, r, float(sharpness), float(weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = root_xz(x)  # [N, L, 2]
        c = _per_row(self.centers.to(p), len(p), "obstacle sets")  # [N, K, 2]
        d = (p.unsqueeze(2) - c.unsqueeze(1)).norm(dim=-1)  # [N, L, K]
        r = _per_row(self.radius.to(p), len(p), "radii").view(-1, 1, 1)
        pen = torch.sigmoid(-(d - r) * self.sharpness) * self.weight
        return pen.mean(dim=1).sum(dim=-1)


class PathLoss:
    """mean_frames dist(x0(i), path)²: squared distance (m²) of the root to a polyline, averaged over frames.

    Args:
        path: ``[M, 2]`` vertices for all samples or ``[B, M, 2]`` per sample (M ≥ 2).
    """

    def __init__(self, path):
        p = torch.as_tensor(path, dtype=torch.float64)
        if p.ndim == 2:
            p = p.unsqueeze(0)
        if p.ndim != 3 or p.shape[-1] != 2 or p.shape[1] < 2:
            raise ValueError(f"path must be [M, 2] or [B, M, 2] with M ≥ 2 vertices, got shape {tuple(p.shape)}")
        self.path = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = root_xz(x)  # [N, L, 2]
        v = _per_row(self.path.to(q), len(q), "paths")  # [N, M, 2]
        a, b = v[:, :-1].unsqueeze(1), v[:, 1:].unsqueeze(1)  # [N, 1, S, 2]
        ab = b - a
        s = (((q.unsqueeze(2) - a) * ab).sum(-1) / ab.square().sum(-1).clamp_min(1e-12)).clamp(0, 1)
        nearest = a + s.unsqueeze(-1) * ab  # [N, L, S, 2]
        d2 = (q.unsqueeze(2) - nearest).square().sum(-1).amin(dim=2)
        return d2.mean(dim=1)


def on_normalized(loss: Callable[[torch.Tensor], torch.Tensor], model) -> Callable[[torch.Tensor], torch.Tensor]:
    """ℓ(z) = loss(model.to_motion(z)): a feature-space loss on the model's normalised samples."""

    def loss_z(z: torch.Tensor) -> torch.Tensor:
        return loss(model.to_motion(z))

    return loss_z
