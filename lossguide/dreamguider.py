"""Dreamguider's step rule (Nair & Patel 2024, arXiv 2406.02549): time-variant x0_hat/ε_θ guidance, DoG-style scale.

The method takes the loss gradient g = ∇_{x0_hat} ℓ(x0_hat) (no backpropagation through the denoiser) and applies it
twice per step: to x0_hat (ε held; the x0-term) and to ε_θ (x_t held; the ε-term, ∇_ε ℓ = −(σ_t/α_t)·g). Both are
scaled by a gradient-dependent factor instead of a hand-tuned constant. Under deterministic DDIM, in the
coordinates y = x/α where a step is y_{t'} = x0_hat + ρ_{t'}·ε_hat with ρ = σ/α, the two terms move y_{t'} by

    Δy_{t'} = −(c + d·(ρ_t − ρ_{t'}))·ĝ,        ĝ = ‖ε_hat‖·g/G_k,   G_k = √(mean_{j≤k} ‖g_j‖²),

so the ε-term's factor d·(ρ_t − ρ_{t'}), the step's decrease of the noise-to-signal ratio, dominates early and the
x0-term's constant c late: the time-varying regulation of the gradient flow. ĝ has the norm of the noise (the
"distance") over the running RMS of the sample's own gradient norms (DoG's denominator, Ivgi et al. 2023), so the
update does not depend on the loss's units and shrinks once a sample's gradient falls below its history. The rule
returns that update as one x0 step with ε held (``mu_hold="eps"``), which is what the engine's μ part applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lossguide.steps import StepContext, StepRule, per_sample_norm


@dataclass
class DreamguiderStep(StepRule):
    """step = (c + d·(ρ_t − ρ_{t'}))·‖ε_hat‖/G_k, ρ = σ/α, G_k the running RMS of ‖g‖ over the trajectory so far.

    ``x0_weight`` is c (the x0_hat term), ``eps_weight`` d (the ε_θ term). The running RMS is per sample and starts
    afresh with every trajectory (a step index lower than the last one seen, or another batch size); samples with
    ‖g‖ < ``min_grad_norm`` take no step (counted in ``stats.zero_grad``) and do not enter G_k.
    """

    eps_weight: float = 0.1
    x0_weight: float = 0.03
    min_grad_norm: float = 1e-12
    noise_margin: float | None = 5.0

    def __post_init__(self):
        for name in ("eps_weight", "x0_weight", "min_grad_norm", "noise_margin"):
            v = getattr(self, name)
            if name == "noise_margin" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Dreamguider {name} must be a finite number ≥ 0, got {v!r}")
        if self.min_grad_norm == 0:
            raise ValueError("Dreamguider min_grad_norm must be > 0 (it guards the division by the gradient norm)")
        self.reset()

    def reset(self) -> None:
        """Forget the gradient history (done automatically when a new trajectory starts)."""
        self._sum_g2: torch.Tensor | None = None
        self._count: torch.Tensor | None = None
        self._last_i = -1

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        g = per_sample_norm(ctx.grad.detach())
        if self._sum_g2 is None or ctx.i < self._last_i or self._sum_g2.shape != g.shape:
            self.reset()
            self._sum_g2, self._count = torch.zeros_like(g), torch.zeros_like(g)
        self._last_i = ctx.i
        ok = g >= self.min_grad_norm
        ctx.stats["zero_grad"] = ~ok
        self._sum_g2 = self._sum_g2.to(g.device) + torch.where(ok, g**2, torch.zeros_like(g))
        self._count = self._count.to(g.device) + ok.double()
        rms = (self._sum_g2 / self._count.clamp_min(1)).sqrt().clamp_min(self.min_grad_norm)
        # ρ_t − ρ_{t'} of the step; at α_t = 0 (rectified flow's t = 1) ρ_t is infinite: the ε-term is left out there
        d_rho = 0.0
        if ctx.alpha > 0 and ctx.alpha_prev > 0:
            d_rho = ctx.sigma / ctx.alpha - ctx.sigma_prev / ctx.alpha_prev
        factor = self.x0_weight + self.eps_weight * max(d_rho, 0.0)
        dist = per_sample_norm(ctx.eps.detach()).to(g.device)
        if self.noise_margin is not None:  # a true x_t's noise has ‖ε‖ < √D + u but with probability exp(−u²/2)
            dist = dist.clamp_max(ctx.eps[0].numel() ** 0.5 + self.noise_margin)
        step = factor * dist / rms
        return torch.where(ok, step, torch.zeros_like(step))
