"""Fisher-information guidance's step rule (Song & Lai 2024, arXiv 2404.18252: FIGD in v1, FICD in v2).

The conditional score needs ∇_{x_t} log p(c | x_t). Through the denoiser's estimate x0_hat = E[x0 | x_t] it is
(∂x0_hat/∂x_t)ᵀ ∇_{x0} log p(c | x0_hat), and by second-order Tweedie, for x_t = α_t·x0 + σ_t·ε of any family,

    ∂x0_hat/∂x_t = (1/α_t)·(I − σ_t²·F_t),     F_t = −∇²_{x_t} log p_t(x_t),

the Fisher information of the noisy marginal at x_t: it weighs how much the condition can still move the estimate
at this step (none where x_t already pins x0 down, F_t → I/σ_t²). Backpropagating through the denoiser computes
exactly this product; the method replaces F_t by a bound of the Fisher information, a scalar per step, so the
gradient is taken at x0_hat only and no denoiser backward pass is needed. Applied as classifier guidance with x_t
held (ε_hat recomputed from x_t and the moved x0), the corrected estimate is

    x0 ← x0_hat − scale·λ_t·∇_{x0} ℓ(x0_hat),     λ_t = (σ_t²/α_t²)·(1 − σ_t²·F̄_t),

with ℓ = −log p(c | x0). λ_t is the posterior variance per dimension that the Fisher information implies, so the
update is E[x0 | x_t, c] ≈ E[x0 | x_t] + Cov[x0 | x_t]·∇ log p(c | x0) with Cov replaced by λ_t·I. The bound is
F̄_t = 1/(α_t²·v + σ_t²), the Fisher information of p_t for Gaussian data of per-dimension variance v: for any data
of that variance it is the Cramér–Rao bound J(p_t) ≥ 1/Var(x_t), and for data whose own Fisher information is 1/v
it is Stam's inequality's upper bound J(p_t) ≤ 1/(α_t²/J_0 + σ_t²). It gives

    λ_t = v·σ_t²/(α_t²·v + σ_t²) = 1/(SNR_t + 1/v),     SNR_t = α_t²/σ_t² = ᾱ_t/(1 − ᾱ_t),

the inverse of the Fisher information about x0 that x_t (SNR_t, the Gaussian kernel's) and a Gaussian prior (1/v)
hold, and the largest posterior variance that data of variance v can have on average (the linear estimator's
error bounds the posterior mean's). On Gaussian data of variance v it is exact: λ_t·α_t/σ_t² is then the
denoiser's Jacobian, and the update equals the one that backpropagates through the denoiser. λ_t depends on the
step only through SNR_t, i.e. the VP-equivalent ᾱ_t, so the x0 update is the same on every family (VP, rectified
flow, VE) at the same noise level; it is bounded by v (pure noise, ᾱ = 0: rectified flow's t = 1, where α = 0)
and falls to 0 as σ_t → 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lossguide.steps import StepContext, StepRule


def fisher_weight(alpha_bar: float, data_var: float = 1.0) -> float:
    """λ = v(1 − ᾱ)/(vᾱ + 1 − ᾱ) = 1/(ᾱ/(1 − ᾱ) + 1/v): the posterior-variance bound at the VP-equivalent ᾱ."""
    return data_var * (1.0 - alpha_bar) / (data_var * alpha_bar + 1.0 - alpha_bar)


def fisher_weight_at(alpha: float, sigma: float, data_var: float = 1.0) -> float:
    """λ = v·σ²/(α²v + σ²) at the levels (α, σ): :func:`fisher_weight` at ᾱ = α²/(α² + σ²), without the rounding
    of 1 − ᾱ at low noise (on VE, ᾱ = 1/(1 + σ²) loses σ² to 1e-11 relative at σ = 0.002)."""
    return data_var * sigma**2 / (alpha**2 * data_var + sigma**2)


@dataclass
class FisherStep(StepRule):
    """step = scale·λ_t, λ_t = v·σ_t²/(α_t²v + σ_t²) = v(1 − ᾱ_t)/(vᾱ_t + 1 − ᾱ_t), one value for every sample
    (computed from the step's levels; it depends on them only through ᾱ_t, so it is the same on every family).

    ``data_var`` is v, the data's variance per dimension (1: data normalised to unit scale)."""

    scale: float = 1.0
    data_var: float = 1.0

    def __post_init__(self):
        for name, lo_open in (("scale", False), ("data_var", True)):
            v = getattr(self, name)
            bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            if bad or v < 0 or (lo_open and v == 0):
                need = "> 0" if lo_open else "≥ 0"
                raise ValueError(f"Fisher-information {name} must be a finite number {need}, got {v!r}")

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        return self._full(ctx, self.scale * fisher_weight_at(ctx.alpha, ctx.sigma, self.data_var))
