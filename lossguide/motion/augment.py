"""Random augmentation of motions for Shen et al. (2024), Alg. 1: time shift and heading jitter.

A loss on a motion should not hinge on one exact frame or one exact heading: each of the |T| copies of
x0_hat is shifted in time by s ~ U(−max_shift, max_shift) frames (linear interpolation, edge frames
held) and rotated about the vertical through the start by δ ~ U(−max_angle, max_angle) radians. Both
are differentiable; copy k of sample b draws two uniforms from ``generators[b]`` (the interface of
:mod:`lossguide.augment`: ``aug(x [B, ...], generators, n) -> [B·n, ...]``, sample-major rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lossguide.motion.data import rotate_heading
from lossguide.rng import Generators, check_generators, rand

_DRAWS_PER_COPY = 2  # u[0]: time shift, u[1]: heading jitter


def time_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x'[i] = x[i + shift] for windows ``[N, L, C]`` and fractional shifts ``[N]`` (edges held)."""
    N, L, C = x.shape
    pos = (torch.arange(L, device=x.device, dtype=x.dtype).unsqueeze(0) + shift.view(-1, 1)).clamp(0, L - 1)
    i0 = pos.floor().clamp(max=L - 2).long()
    w = (pos - i0.to(x.dtype)).unsqueeze(-1)
    x0 = torch.gather(x, 1, i0.unsqueeze(-1).expand(N, L, C))
    x1 = torch.gather(x, 1, (i0 + 1).unsqueeze(-1).expand(N, L, C))
    return x0 + w * (x1 - x0)


@dataclass(frozen=True)
class MotionAugment:
    """Time shift and heading jitter of a motion model's normalised samples z.

    Args:
        model: the :class:`~lossguide.motion.model.MotionModel` whose ``to_motion``/``normalize`` map z to
            features and back (None: the input is already in features).
        max_shift: largest time shift in frames (2 = 0.1 s at 20 fps).
        max_angle: largest heading jitter in radians (0.1 ≈ 5.7°).
    """

    model: object | None = None
    max_shift: float = 2.0
    max_angle: float = 0.1

    def to_dict(self) -> dict:
        return {"name": "motion_augment", "max_shift": self.max_shift, "max_angle": self.max_angle}

    def __call__(self, z: torch.Tensor, generators: Generators, n: int) -> torch.Tensor:
        if z.ndim != 3:
            raise ValueError(f"MotionAugment expects motions [B, L, 61], got shape {tuple(z.shape)}")
        B = z.shape[0]
        check_generators(generators, B)
        u = rand((n, _DRAWS_PER_COPY), generators, dtype=torch.float64).reshape(B * n, _DRAWS_PER_COPY)
        u = u.to(device=z.device, dtype=z.dtype)
        x = z.repeat_interleave(n, dim=0)
        if self.model is not None:
            x = self.model.to_motion(x)
        x = time_shift(x, (2 * u[:, 0] - 1) * self.max_shift)
        x = rotate_heading(x, (2 * u[:, 1] - 1) * self.max_angle)
        if self.model is not None:
            x = self.model.normalize(x)
        return x
