"""Noise schedules: x_t = α_t·x0 + σ_t·ε for every model family, and inference timestep spacing.

Three families share one contract (``alpha(t)``, ``sigma(t)``, ``at(t)``, ``scale(t)``, ``fraction(t)``):

- :class:`NoiseSchedule`, VP (DDPM, Ho et al. 2020): α = √ᾱ_t, σ = √(1−ᾱ_t) over discrete t = 0..T−1;
- :class:`FlowSchedule`, rectified flow (Liu et al. 2023; Lipman et al. 2023): α = 1 − t, σ = t, t ∈ [0, 1];
- :class:`SigmaSchedule`, VE / EDM (Song et al. 2021; Karras et al. 2022): α = 1, σ = t.

Every family is VP after dividing by k_t = √(α_t² + σ_t²): x_t/k_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with the
VP-equivalent signal fraction ᾱ_t = α_t²/(α_t² + σ_t²) (``at``), so a rule written in ᾱ means the same thing
on every family (k = 1 exactly for VP). Schedule maths is kept in float64 and cast to the sample's dtype only
where it multiplies a sample.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class NoiseSchedule:
    """VP: ᾱ_t for t = 0..T−1 (float64, decreasing) and the ᾱ used after the last step (t = −1)."""

    alpha_bar: torch.Tensor
    final_alpha_bar: float = 1.0
    family = "vp"  # class attributes, not fields
    t_end = -1  # the t' after the last inference step

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
        if t != int(t):
            raise ValueError(
                f"t = {t} is not a training timestep; a sampler at fractional t (diffusers' σ-space schedulers) "
                "passes alpha= and sigma= to the denoiser"
            )
        return self.final_alpha_bar if t < 0 else float(self.alpha_bar[int(t)])

    def alpha(self, t: int) -> float:
        """α_t = √ᾱ_t."""
        return self.at(t) ** 0.5

    def sigma(self, t: int) -> float:
        """σ_t = √(1 − ᾱ_t)."""
        return (1 - self.at(t)) ** 0.5

    def scale(self, t: int) -> float:
        """k_t = √(α_t² + σ_t²) = 1."""
        return 1.0

    def fraction(self, t: float) -> float:
        """t/T, the position in [0, 1] that guidance windows read."""
        return t / self.num_train_timesteps

    def net_time(self, t):
        """The timestep the network sees: t itself."""
        return t

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


def _vp_equivalent(alpha: float, sigma: float) -> float:
    """ᾱ = α²/(α² + σ²)."""
    return alpha**2 / (alpha**2 + sigma**2)


def _shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift t ← shift·t/(1 + (shift − 1)·t) (Esser et al. 2024, eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow: x_t = (1 − t)·x0 + t·ε, t ∈ [0, 1] continuous (t = 1 is pure noise).

    Args:
        num_train_timesteps: the network sees t·``num_train_timesteps`` (diffusers' flow-matching convention).
        shift: default inference spacing t_i = shift·s/(1 + (shift − 1)·s), s uniform on (0, 1] (1: uniform).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    family = "flow"
    t_end = 0.0

    def __post_init__(self):
        if not 0 < self.shift < math.inf:
            raise ValueError(f"flow shift must be a finite number > 0 (1: no shift), got {self.shift}")

    def alpha(self, t: float) -> float:
        """α_t = 1 − t."""
        return 1.0 - t

    def sigma(self, t: float) -> float:
        """σ_t = t."""
        return float(t)

    def at(self, t: float) -> float:
        """VP-equivalent ᾱ_t = (1 − t)²/((1 − t)² + t²)."""
        return _vp_equivalent(self.alpha(t), self.sigma(t))

    def scale(self, t: float) -> float:
        """k_t = √((1 − t)² + t²)."""
        return math.hypot(self.alpha(t), self.sigma(t))

    def fraction(self, t: float) -> float:
        """t itself."""
        return float(t)

    def net_time(self, t: float) -> float:
        """t·T, the timestep a diffusers flow model is called with."""
        return t * self.num_train_timesteps

    def times(self, num_steps: int) -> torch.Tensor:
        """Descending t_i = shift(1 − i/n), i = 0..n−1 (the last step goes to t' = 0)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
        s = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)[:-1]
        return _shifted(s, self.shift)

    @classmethod
    def from_diffusers(cls, scheduler) -> FlowSchedule:
        """Read T and the shift of a diffusers ``FlowMatchEulerDiscreteScheduler``."""
        cfg = scheduler.config
        if cfg.get("invert_sigmas"):
            raise ValueError("invert_sigmas=True runs time backwards (t = 0 is noise); lossguide needs t = 1 as noise")
        return cls(int(cfg.num_train_timesteps), float(cfg.get("shift", 1.0)))


@dataclass(frozen=True)
class SigmaSchedule:
    """VE / EDM: x_σ = x0 + σ·ε with t = σ ∈ [0, σ_max] (Karras et al. 2022, Table 1).

    Args:
        sigma_min, sigma_max, rho: the default inference σ's of Karras et al. (2022), eq. 5.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    family = "ve"
    t_end = 0.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(f"need 0 < sigma_min < sigma_max < ∞ (finite numbers), got {self.sigma_min}, "
                             f"{self.sigma_max}; Karras et al.'s are 0.002 and 80")  # fmt: skip
        if not 0 < self.rho < math.inf:
            raise ValueError(f"rho must be a finite number > 0 (Karras et al.'s 7), got {self.rho}")

    def alpha(self, t: float) -> float:
        """α = 1."""
        return 1.0

    def sigma(self, t: float) -> float:
        """σ = t."""
        return float(t)

    def at(self, t: float) -> float:
        """VP-equivalent ᾱ = 1/(1 + σ²)."""
        return _vp_equivalent(1.0, self.sigma(t))

    def scale(self, t: float) -> float:
        """k = √(1 + σ²)."""
        return math.hypot(1.0, self.sigma(t))

    def fraction(self, t: float) -> float:
        """σ/(1 + σ): the rectified-flow t of the same signal-to-noise ratio, in [0, 1)."""
        return float(t) / (1 + float(t))

    def net_time(self, t: float) -> float:
        """σ, what an EDM network is called with."""
        return t

    def times(self, num_steps: int) -> torch.Tensor:
        """σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0..n−1 (Karras et al. 2022, eq. 5)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (hi + ramp * (lo - hi)) ** self.rho


def spaced_timesteps(T: int, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
    """Descending inference timesteps, as diffusers' ``timestep_spacing`` computes them."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an integer in [1, {T}], got {num_steps!r}")
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


#: VP tables agree when every ᾱ_t agrees to this relative tolerance: a diffusers scheduler's float32 table against
#: the same schedule in float64 differs by ≤ 1e-6 relative; linear against scaled-linear by up to 25× at t = T − 1
_VP_RTOL = 1e-4

_VP_NAMED = (
    ("linear β 1e-4..0.02", lambda T: NoiseSchedule.linear(T)),
    ("scaled-linear β 0.00085..0.012 (Stable Diffusion)", lambda T: NoiseSchedule.scaled_linear(T)),
    ("cosine", lambda T: NoiseSchedule.cosine(T)),
)


def describe(schedule) -> str:
    """A schedule in a few words: the family, its table's known name (VP) or its parameters."""
    if isinstance(schedule, NoiseSchedule):
        ab, T = schedule.alpha_bar, schedule.num_train_timesteps
        for name, make in _VP_NAMED:
            ref = make(T).alpha_bar
            if torch.allclose(ab, ref, rtol=_VP_RTOL, atol=0.0):
                return f"VP {name} over T = {T}"
        return f"VP ᾱ over T = {T} (ᾱ_0 = {float(ab[0]):.6g}, ᾱ_{T // 2} = {float(ab[T // 2]):.4g}, " \
               f"ᾱ_{T - 1} = {float(ab[-1]):.4g})"  # fmt: skip
    if isinstance(schedule, FlowSchedule):
        return f"rectified flow, network time t·{schedule.num_train_timesteps}"
    if isinstance(schedule, SigmaSchedule):
        return f"VE σ ∈ [{schedule.sigma_min:g}, {schedule.sigma_max:g}]"
    return type(schedule).__name__



def mismatch(model, sampler) -> str | None:
    """Why a sampler's schedule cannot step a model trained on ``model``'s, or None where it can.

    VP: the ᾱ tables must agree (relative 1e-4, :data:`_VP_RTOL`); rectified flow: the network's time scale T;
    VE: a σ-space network is trained on a continuous σ, so the sampler's σ range is its own choice (no check).
    Inference-only choices (timestep spacing, the flow shift, DDIM's final ᾱ) are never compared."""
    if model.family != sampler.family:
        return f"the model's schedule is {describe(model)} but the sampler steps {describe(sampler)}"
    if isinstance(model, NoiseSchedule) and isinstance(sampler, NoiseSchedule):
        a, b = model.alpha_bar, sampler.alpha_bar
        if a.shape != b.shape or not torch.allclose(a, b, rtol=_VP_RTOL, atol=0.0):
            return f"the model was trained on {describe(model)} but the sampler steps {describe(sampler)}"
    if isinstance(model, FlowSchedule) and isinstance(sampler, FlowSchedule):
        if model.num_train_timesteps != sampler.num_train_timesteps:
            return f"the model's schedule is {describe(model)} but the sampler's is {describe(sampler)}"
    return None
