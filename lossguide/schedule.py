"""Noise schedules: ᾱ_t over a model's discrete training timesteps, and inference timestep spacing.

Notation follows DDPM (Ho et al. 2020): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, t = 0..T−1. Schedule maths is
kept in float64 and cast to the sample's dtype only where it multiplies a sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t for t = 0..T−1 (float64, decreasing) and the ᾱ used after the last step."""

    alpha_bar: torch.Tensor
    final_alpha_bar: float = 1.0

    def __post_init__(self):
        ab = self.alpha_bar
        if ab.ndim != 1 or len(ab) < 2:
            raise ValueError(f"alpha_bar must be a 1-D tensor of length ≥ 2, got shape {tuple(ab.shape)}")
        if not ((ab > 0) & (ab <= 1)).all() or not (ab[1:] <= ab[:-1]).all():
            raise ValueError("alpha_bar must lie in (0, 1] and be non-increasing in t")
        object.__setattr__(self, "alpha_bar", ab.detach().to("cpu", torch.float64))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alpha_bar)

    def at(self, t: int) -> float:
        """ᾱ_t, with ᾱ_{−1} = ``final_alpha_bar`` (the value diffusers calls final_alpha_cumprod)."""
        return self.final_alpha_bar if t < 0 else float(self.alpha_bar[t])

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, **kw) -> NoiseSchedule:
        """Linear β schedule of DDPM (Ho et al. 2020, §4)."""
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, 0), **kw)

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, **kw):
        """Stable Diffusion's schedule: β linear in √β."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1 - betas, 0), **kw)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999, **kw) -> NoiseSchedule:
        """Cosine schedule of Nichol & Dhariwal (2021), eq. 17, with β clipped at ``max_beta``."""
        f = [math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]
        betas = torch.tensor([min(1 - f[i + 1] / f[i], max_beta) for i in range(T)], dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, 0), **kw)

    @classmethod
    def from_diffusers(cls, scheduler) -> NoiseSchedule:
        """Read ᾱ (``alphas_cumprod``) and the final ᾱ from a diffusers scheduler."""
        if not hasattr(scheduler, "alphas_cumprod"):
            raise TypeError(
                f"{type(scheduler).__name__} has no alphas_cumprod; pass a VP scheduler "
                "(DDPMScheduler, DDIMScheduler, ...) or build a NoiseSchedule yourself"
            )
        ab = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        final = getattr(scheduler, "final_alpha_cumprod", None)
        if final is None:
            final = 1.0
        return cls(ab, final_alpha_bar=float(final))


def spaced_timesteps(T: int, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """Descending inference timesteps, as diffusers' ``timestep_spacing`` computes them."""
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    if spacing == "leading":
        ratio = T // num_steps
        ts = torch.arange(num_steps, dtype=torch.int64) * ratio + steps_offset
    elif spacing == "trailing":
        k = torch.arange(num_steps, dtype=torch.float64)
        return torch.round(T - k * T / num_steps).to(torch.int64) - 1
    elif spacing == "linspace":
        # numpy's linspace, as diffusers: torch's rounds some midpoints (e.g. 499.5 for n = 61) the other way
        ts = torch.from_numpy(np.linspace(0, T - 1, num_steps).round().astype(np.int64))
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    ts = ts.flip(0)
    if ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"timesteps fall outside [0, {T - 1}] (spacing={spacing!r}, steps_offset={steps_offset})")
    return ts
