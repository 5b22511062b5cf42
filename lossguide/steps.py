"""Step-size rules: each maps the state of one guidance step to a per-sample step size ``[B]``.

The guidance update is ``−step·g`` with g the loss gradient; every norm is taken per sample over all
dimensions but the batch, so a sample's step never depends on its batch-mates.

Rules read ᾱ_t, which on every family (VP, rectified flow, VE/EDM) is the VP-equivalent signal fraction
ᾱ_t = α_t²/(α_t² + σ_t²) of x_t = α_t·x0 + σ_t·ε, i.e. the ᾱ of the VP x_t/k_t, k_t = √(α_t² + σ_t²). So FreeDoM's
√ᾱ_t, the Polyak cap's √(1−ᾱ_t), TFG's ᾱ_t/ᾱ_{t'} and DPS's loss power mean the same thing on every family (on VP
they are the literal ᾱ_t). A rule that needs the actual levels reads ``ctx.alpha``, ``ctx.sigma`` (and ``_prev``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class StepContext:
    """What a rule may look at: the step, its ᾱ pair and levels (α, σ), and the per-sample ε, gradient and loss."""

    i: int
    alpha_bars: list[tuple[float, float]]  # (ᾱ_t, ᾱ_{t'}) for every step, VP-equivalent α²/(α² + σ²)
    eps: torch.Tensor  # ε_hat [B, ...] (unguided)
    grad: torch.Tensor  # g [B, ...]
    loss: torch.Tensor  # ℓ [B]
    stats: dict = field(default_factory=dict)
    levels: list[tuple[float, float, float, float]] | None = None  # (α_t, σ_t, α_{t'}, σ_{t'}); None: VP from ᾱ

    @property
    def alpha_bar(self) -> float:
        """ᾱ_t (VP-equivalent)."""
        return self.alpha_bars[self.i][0]

    @property
    def alpha_bar_prev(self) -> float:
        """ᾱ_{t'} (VP-equivalent)."""
        return self.alpha_bars[self.i][1]

    def _level(self, j: int) -> float:
        if self.levels is not None:
            return self.levels[self.i][j]
        ab = self.alpha_bars[self.i][j // 2]
        return ab**0.5 if j % 2 == 0 else (1 - ab) ** 0.5

    @property
    def alpha(self) -> float:
        """α_t of x_t = α_t·x0 + σ_t·ε."""
        return self._level(0)

    @property
    def sigma(self) -> float:
        """σ_t."""
        return self._level(1)

    @property
    def alpha_prev(self) -> float:
        """α_{t'}."""
        return self._level(2)

    @property
    def sigma_prev(self) -> float:
        """σ_{t'}."""
        return self._level(3)


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x_b‖₂ over all dimensions but the batch, ``[B]``, in float64 (‖g‖² overflows fp16 at ‖g‖ > 256)."""
    return x.flatten(1).double().norm(dim=1)


class StepRule:
    """Base class; subclasses are dataclasses whose fields are their named parameters."""

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"rule": type(self).__name__, **asdict(self)}

    def read(self) -> dict:
        """The fields that the rule reads given the others (what can change a step), by name."""
        return self.to_dict()

    def _full(self, ctx: StepContext, value: float) -> torch.Tensor:
        return torch.full((ctx.loss.shape[0],), float(value), dtype=torch.float64, device=ctx.loss.device)


@dataclass
class Constant(StepRule):
    """step = scale."""

    scale: float = 1.0

    def __call__(self, ctx):
        return self._full(ctx, self.scale)


@dataclass
class AlphaBarPower(StepRule):
    """step = scale·ᾱ_t^power; power = 1/2 is FreeDoM's ρ_t = scale·√ᾱ_t (Yu et al. 2023)."""

    scale: float = 1.0
    power: float = 0.5

    def __call__(self, ctx):
        return self._full(ctx, self.scale * ctx.alpha_bar**self.power)


@dataclass
class LossNormalized(StepRule):
    """step = scale/|ℓ|^power per sample; power = 1/2 on ℓ = ‖y − A(x0)‖² is DPS's ζ'/‖y − A(x0)‖
    (Chung et al. 2023, Alg. 1), power = 1 is TFG's DPS baseline. Samples with ℓ ≤ ``min_loss`` get 0."""

    scale: float = 1.0
    power: float = 0.5
    min_loss: float = 1e-12

    def __call__(self, ctx):
        L = ctx.loss.detach().double().abs()
        ok = L > self.min_loss
        return torch.where(ok, self.scale / L.clamp_min(self.min_loss) ** self.power, torch.zeros_like(L))


@dataclass
class TFGSchedule(StepRule):
    """TFG's ρ_t or μ_t (Ye et al. 2024): scale·s(t)·N/Σ_t' s(t'), with α_t = ᾱ_t/ᾱ_{t'} and
    s = α_t ('increase'), 1 − α_t ('decrease') or 1 ('constant'); ``inv_sqrt_alpha`` adds TFG's 1/√α_t
    factor of the ρ term, and the step is 0 where α_t = 0 (pure noise: rectified flow's t = 1)."""

    scale: float = 1.0
    schedule: str = "increase"
    inv_sqrt_alpha: bool = False

    def __post_init__(self):
        if self.schedule not in ("increase", "decrease", "constant"):
            raise ValueError(f"unknown TFG schedule {self.schedule!r}; choose increase, decrease or constant")

    def _s(self, ab_t: float, ab_prev: float) -> float:
        a = ab_t / ab_prev
        return {"increase": a, "decrease": 1 - a, "constant": 1.0}[self.schedule]

    def __call__(self, ctx):
        s_all = [self._s(*p) for p in ctx.alpha_bars]
        value = self.scale * self._s(*ctx.alpha_bars[ctx.i]) * len(s_all) / sum(s_all)
        if self.inv_sqrt_alpha:
            a_t = ctx.alpha_bar / ctx.alpha_bar_prev
            value = value / math.sqrt(a_t) if a_t > 0 else 0.0
        return self._full(ctx, value)


@dataclass
class Polyak(StepRule):
    """Polyak step of Shen et al. (2024), Alg. 2: step = η·gap/‖g‖₂² per sample, gap = ‖ε_θ(x_t, t)‖₂.

    The update −step·g has norm η·gap/‖g‖. With the paper's gap ``"eps"`` it grows without bound as
    ‖g‖ → 0, which is what a saturating loss (a confident classifier's cross-entropy) does; the paper only
    uses it on distance-to-reference losses (unsquared ‖residual‖ of segmentation logits, sketches, CLIP
    embeddings), whose gradient norm stays of order one. It is *inversely* scaled in the loss: ℓ → c·ℓ
    shrinks the update by 1/c, so η depends on the loss's units. ``gap="loss"`` is the classical Polyak step
    η·(ℓ − ℓ*)/‖g‖² (Hazan & Kakade 2019) with ℓ* = ``loss_floor``: dimensionless η, invariant to ℓ → c·ℓ, and
    a bounded update as a saturating loss and its gradient vanish together. ``loss_floor`` is the loss a true
    sample would have (e.g. m·σ² for a linear measurement with m entries and noise σ); samples at or below
    it take no step.

    Two lossguide guards, neither in the paper's text: samples with ‖g‖ < ``min_grad_norm`` take no step and
    are counted in ``stats.zero_grad`` (the guard the reference code meant to have: its ``rho = 0`` is
    overwritten), and, when ``max_ratio`` is set, the update norm is capped at max_ratio·√(1−ᾱ_t)·‖ε‖, the
    size of the noise in the current x_t (of the VP x_t/k_t on flow and VE; positive at every step, so the final
    step is never switched off).
    ``max_ratio=None`` (the default) is the paper's exact rule.
    """

    eta: float = 1.0
    min_grad_norm: float = 1e-6
    max_ratio: float | None = None
    gap: str = "eps"
    loss_floor: float = 0.0

    def __post_init__(self):
        if self.gap not in ("eps", "loss"):
            raise ValueError(f"Polyak gap must be 'eps' (the paper) or 'loss' (classical), got {self.gap!r}")
        _check_number("Polyak eta", self.eta, positive=True)
        _check_number("Polyak min_grad_norm", self.min_grad_norm, positive=True)
        _check_number("Polyak loss_floor", self.loss_floor)
        if self.max_ratio is not None:
            _check_number("Polyak max_ratio", self.max_ratio, positive=True)

    def read(self) -> dict:
        """The fields read given the others: ``loss_floor`` only with the classical gap ``"loss"``."""
        d = self.to_dict()
        if self.gap != "loss":
            del d["loss_floor"]
        return d

    def __call__(self, ctx):
        g = per_sample_norm(ctx.grad.detach())
        e = per_sample_norm(ctx.eps.detach())
        ok = g >= self.min_grad_norm
        ctx.stats["zero_grad"] = ~ok
        g = g.clamp_min(self.min_grad_norm)
        if self.gap == "eps":
            gap = e
        else:
            gap = (ctx.loss.detach().double().to(g.device) - self.loss_floor).clamp_min(0)
        step = self.eta * gap / g**2
        if self.max_ratio is not None:  # ‖step·g‖ = step·‖g‖ ≤ max_ratio·√(1−ᾱ_t)·‖ε‖
            step = torch.minimum(step, self.max_ratio * (1 - ctx.alpha_bar) ** 0.5 * e / g)
        return torch.where(ok, step, torch.zeros_like(step))


def _check_number(name: str, v, positive: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {need}, got {v!r}")


@dataclass
class LookAheadStep(StepRule):
    """β_t of Guo et al. (2024), Lemma 1 (their ``cond_score_v2``): step = scale·(ᾱ/2)/(ᾱ·σ_y² + (1−ᾱ)·‖∇_x̃ r‖²).

    r = y − gᵀx0_hat is the look-ahead residual, ∇_x̃ its gradient in the VP coordinates x̃ = x_t/k_t (k_t² = α_t² +
    σ_t²: x̃ = √ᾱ·x0 + √(1−ᾱ)·ε), and σ_y = ``sigma`` the noise of the reward model y = gᵀx0 + N(0, σ_y²). On VP
    (k = 1) this is the paper's α_t²/2/(α_t²σ² + h(t)‖∇(gᵀE[x0|x_t])‖²) literally; written in ᾱ it means the same on
    every family. With the exact denoiser of Gaussian data with identity latent covariance, ε̂ = ε + step·σ_t·∇ℓ
    is then the exact conditional score ∇ log p_t(x_t | y) at scale 1 (a Gaussian likelihood of y), on every family.

    The rule reads ‖∇r‖² from the loss ℓ = r² it is given: ‖∇_{x_t}ℓ‖²/(4ℓ) = ‖∇_{x_t}r‖² (0 where ℓ = 0, where the
    gradient vanishes too); any loss ℓ ≥ 0 is so read as a squared residual. A negative loss has no such reading:
    its step is NaN, which the engine skips and counts (``stats.skipped``).
    """

    scale: float = 1.0
    sigma: float = 0.1

    def __post_init__(self):
        _check_number("LookAheadStep scale", self.scale)
        _check_number("LookAheadStep sigma", self.sigma, positive=True)
        if self.scale < 0:
            raise ValueError(f"LookAheadStep scale must be ≥ 0, got {self.scale!r}")

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        ab = ctx.alpha_bar
        L = ctx.loss.detach().double()
        if ab == 0:  # pure noise (rectified flow's t = 1): p(y | x_t) does not depend on x_t, β_t = 0
            return torch.where(L >= 0, torch.zeros_like(L), torch.full_like(L, math.nan))
        k2 = ctx.alpha**2 + ctx.sigma**2
        g2 = per_sample_norm(ctx.grad.detach()).to(L.device) ** 2
        r2 = torch.where(L > 0, g2 / (4 * L.clamp_min(1e-300)), torch.zeros_like(L))  # ‖∇_{x_t} r‖²
        beta = self.scale * (ab / 2) / (ab * self.sigma**2 + (1 - ab) * k2 * r2)
        return torch.where(L >= 0, beta, torch.full_like(beta, math.nan))
