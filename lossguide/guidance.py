"""The guidance engine: one guided step for any sampler (Shen et al. 2024, Algs. 1–3; TFG, Ye et al. 2024).

Per step and per sample:

1. ε_hat, x0_hat = D(x_t, t), with autograd to x_t when the ρ part needs it;
2. ρ part: g = ∇_{x_t} ℓ̃(x0_hat(x_t)) through the denoiser (DPS, FreeDoM, UGD-forward, TFG ρ), or
   ∇_{x_t} ℓ(x_t, t) of a noise-aware loss (classifier guidance); applied to x_{t'} (−step·g) or to
   ε (ε + step·σ_t·g, σ_t = √(1−ᾱ_t) on VP);
3. μ part: ``n_iter`` steps x0 ← x0 − step·∇_{x0} ℓ̃(x0) without the denoiser (MPGD, UGD-backward,
   TFG μ), then an optional projection hook (MPGD's autoencoder);
4. x_{t'} = sampler.step(x_t, x0, ε) + the ρ correction.

ℓ̃ is ℓ smoothed by random augmentation (mean over |T| copies, Alg. 1) and/or by Monte-Carlo Gaussian
noise (−log mean exp(−ℓ), LGD-MC and TFG's γ). A non-finite loss or gradient in one sample skips that
sample's step and is counted, as are zero gradients and samples that overflow (:class:`GuidanceStats`); x0_hat
is never clamped.

The engine works on x_t = α_t·x0 + σ_t·ε of any family (VP, rectified flow, VE/EDM): it reads (α_t, σ_t) and the
VP-equivalent ᾱ_t = α_t²/(α_t² + σ_t²) of each step from the sampler (:meth:`~lossguide.samplers.Sampler.levels`)
and hands (α_t, σ_t) to the denoiser, so x0_hat, ε_hat and the ε-form corrections are exact in every family,
while the step rules and the MC smoothing read ᾱ and mean on every family what they mean on VP.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch

from lossguide.augment import augmentation_to_dict
from lossguide.denoiser import Denoiser
from lossguide.rng import Generators, randn
from lossguide.samplers import Sampler
from lossguide.steps import StepContext, StepRule

log = logging.getLogger(__name__)

RHO_TARGETS = ("x_prev", "eps")
LOSS_INPUTS = ("x0", "x_t")
MC_SCHEDULES = ("decrease", "constant")


@dataclass
class GuidanceConfig:
    """Everything a guidance method is, as named parameters (see :mod:`lossguide.presets`).

    Args:
        rho: step rule for the gradient through the denoiser (None: no ρ part).
        rho_target: ``"x_prev"`` subtracts step·g from x_{t'}; ``"eps"`` adds step·σ_t·g to ε_hat (σ_t = √(1−ᾱ_t)
            on VP), which with ℓ = −log p(y|x_t) and step 1 is the exact conditional score.
        mu: step rule for x0-space gradient steps (None: no μ part).
        n_iter: number of x0-space steps per diffusion step.
        mu_hold: what stays fixed when the μ steps move x0: ``"eps"`` (MPGD/TFG: x_{t'} moves by
            α_{t'}·Δx0) or ``"x_t"`` (Universal Guidance's backward step: ε is recomputed from x_t and x0).
        loss_input: ``"x0"`` (the loss sees x0_hat) or ``"x_t"`` (a noise-aware loss ``ℓ(x_t, t)``).
        augment: augmentation callable (e.g. :class:`~lossguide.augment.DiffAugment`), or None: the data's
            own augmentation, passed to :func:`~lossguide.sampling.sample` (``augment=``) by its adapter.
        n_aug: |T|, copies per sample (0: no augmentation).
        mc_sigma: γ̄ of the Monte-Carlo Gaussian smoothing (0: none).
        mc_schedule: ``"decrease"`` (γ_t = γ̄·√(1−ᾱ_t)) or ``"constant"`` (γ_t = γ̄).
        n_mc: Monte-Carlo samples per sample.
        n_recur: time-travel repeats s per step inside ``recur_window`` (1: none).
        recur_window: (lo, hi) fractions of the training timesteps, t/T ∈ [lo, hi].
        window: (lo, hi): guidance is applied where lo < t/T ≤ hi (0 ≤ t/T ≤ hi when lo = 0), so
            (0.2, 1.0) is the reference code's "no guidance for t ≤ 200" of T = 1000. The fraction is
            :meth:`~lossguide.samplers.Sampler.fraction`: t/T on VP, t on rectified flow, σ/(1 + σ) on VE.
        x0_projection: hook ``P(x0) -> x0`` after the μ steps (MPGD-Z's autoencoder projection).
        name: the preset this config came from, for records.
    """

    rho: StepRule | None = None
    rho_target: str = "x_prev"
    mu: StepRule | None = None
    n_iter: int = 1
    mu_hold: str = "eps"
    loss_input: str = "x0"
    augment: Callable | None = None
    n_aug: int = 0
    mc_sigma: float = 0.0
    mc_schedule: str = "decrease"
    n_mc: int = 1
    n_recur: int = 1
    recur_window: tuple[float, float] = (0.0, 1.0)
    window: tuple[float, float] = (0.0, 1.0)
    x0_projection: Callable | None = None
    name: str = "custom"

    def __post_init__(self):
        if self.rho_target not in RHO_TARGETS:
            raise ValueError(f"rho_target must be one of {RHO_TARGETS}, got {self.rho_target!r}")
        if self.loss_input not in LOSS_INPUTS:
            raise ValueError(f"loss_input must be one of {LOSS_INPUTS}, got {self.loss_input!r}")
        if self.mu_hold not in ("eps", "x_t"):
            raise ValueError(f"mu_hold must be 'eps' or 'x_t', got {self.mu_hold!r}")
        for name in ("rho", "mu"):
            rule = getattr(self, name)
            if rule is not None and not isinstance(rule, StepRule):
                raise TypeError(
                    f"{name} must be a step rule (lossguide.steps.Constant(...), Polyak(...), ...), got {rule!r}"
                )
        if self.mc_schedule not in MC_SCHEDULES:
            raise ValueError(f"mc_schedule must be one of {MC_SCHEDULES}, got {self.mc_schedule!r}")
        for name, lo in (("n_iter", 1), ("n_mc", 1), ("n_recur", 1), ("n_aug", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise ValueError(f"{name} must be an integer ≥ {lo}, got {v!r}; pass e.g. {name}={max(lo, 1)}")
        sigma = self.mc_sigma
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 <= sigma < math.inf:
            raise ValueError(f"mc_sigma must be a finite number ≥ 0, got {sigma!r}; pass e.g. mc_sigma=0.0 (none)")
        if self.n_mc > 1 and self.mc_sigma == 0:
            raise ValueError(f"n_mc={self.n_mc} Monte-Carlo copies need mc_sigma > 0 (the smoothing noise scale)")
        for name in ("window", "recur_window"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"{name} must be (lo, hi) with 0 ≤ lo ≤ hi ≤ 1 (fractions of t/T), got {(lo, hi)}")
        if self.loss_input == "x_t" and (self.mu is not None or self.n_aug or self.mc_sigma):
            raise ValueError("a noise-aware loss (loss_input='x_t') takes no μ steps, augmentation or MC smoothing")

    @property
    def enabled(self) -> bool:
        return self.rho is not None or self.mu is not None

    def replace(self, **changes) -> GuidanceConfig:
        return replace(self, **changes)

    def read(self) -> dict:
        """The fields that :class:`GuidanceEngine` reads given the others (what can change samples), by name.

        Two configs with equal ``read()`` guide identically; a parameter that leaves it unchanged has no effect."""
        if not self.enabled:
            return {}
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}
        d["rho"] = None if self.rho is None else self.rho.read()
        d["mu"] = None if self.mu is None else self.mu.read()
        unread = []
        if self.rho is None:
            unread += ["rho_target"]
        if self.mu is None:
            unread += ["n_iter", "mu_hold", "x0_projection"]
        if self.n_aug == 0:
            unread += ["augment"]
        if self.mc_sigma == 0:
            unread += ["mc_schedule", "n_mc"]
        if self.n_recur == 1:
            unread += ["recur_window"]
        for name in unread:
            del d[name]
        return d

    def to_dict(self) -> dict:
        """A serialisable description (for ``config.yaml``)."""
        return {
            "name": self.name,
            "rho": self.rho.to_dict() if self.rho else None,
            "rho_target": self.rho_target,
            "mu": self.mu.to_dict() if self.mu else None,
            "n_iter": self.n_iter,
            "mu_hold": self.mu_hold,
            "loss_input": self.loss_input,
            "augment": augmentation_to_dict(self.augment),
            "n_aug": self.n_aug,
            "mc_sigma": self.mc_sigma,
            "mc_schedule": self.mc_schedule,
            "n_mc": self.n_mc,
            "n_recur": self.n_recur,
            "recur_window": list(self.recur_window),
            "window": list(self.window),
            "x0_projection": None if self.x0_projection is None else getattr(self.x0_projection, "__name__", "hook"),
        }


def resolve_augment(config: GuidanceConfig, augment: Callable | None) -> GuidanceConfig:
    """``config`` with the data's ``augment`` where it asks for |T| > 0 copies and names no augmentation."""
    if config.n_aug > 0 and config.augment is None:
        if augment is None:
            raise ValueError(
                f"'{config.name}' asks for n_aug={config.n_aug} augmented copies but no augmentation was given; "
                "pass sample(..., augment=lossguide.augment.policy('photo')) for natural images, "
                "policy('digits') for MNIST, your own callable, or set n_aug=0"
            )
        config = config.replace(augment=augment)
    return config


def in_window(window: tuple[float, float], frac: float) -> bool:
    """Whether guidance acts at fraction ``frac`` of t/T: lo < frac ≤ hi (0 ≤ frac ≤ hi when lo = 0)."""
    lo, hi = window
    return (frac > lo or lo == 0) and frac <= hi


def check_window(config: GuidanceConfig, sampler: Sampler) -> None:
    """A one-line error where ``window`` holds none of ``sampler``'s steps; a warning where ``recur_window`` does.

    No guided step is an error: the samples would be unguided ones labelled with the method (``none`` draws those).
    No step in ``recur_window`` only warns: the samples are still guided, without time travel (a preset's default
    window at a handful of steps)."""
    if config is None or not config.enabled:
        return
    n = len(sampler)
    guided = [i for i in range(n) if in_window(config.window, sampler.fraction(i))]

    def nearest(steps, lo, hi) -> str:
        frac = min((sampler.fraction(i) for i in steps), key=lambda f: max(lo - f, f - hi, 0.0), default=None)
        return "" if frac is None else f" (the nearest is at t/T = {frac:.3g})"

    if not guided:
        lo, hi = config.window
        raise ValueError(
            f"'{config.name}': window=({lo:g}, {hi:g}) holds none of the {n} sampler steps"
            f"{nearest(range(n), lo, hi)}, so nothing would be guided; widen window (guidance where lo < t/T ≤ hi), "
            "or use method none for unguided samples"
        )
    lo, hi = config.recur_window
    if config.n_recur > 1 and not any(lo <= sampler.fraction(i) <= hi for i in guided):
        log.warning(
            "'%s': recur_window=(%g, %g) holds none of the %d guided steps%s, so n_recur=%d does nothing; widen "
            "recur_window, take more steps, or set n_recur=1", config.name, lo, hi, len(guided),
            nearest(guided, lo, hi), config.n_recur,
        )  # fmt: skip


#: |x| above which a sample counts as overflowed (``GuidanceStats.overflow``)
MAX_ABS = 1e6


@dataclass
class GuidanceStats:
    """Counters of one sampling run; per-sample tensors are ``[B]``.

    ``zero_grad`` counts guided gradient steps (``loss_grads`` per sample) on which the sample's gradient was
    exactly zero, or below a Polyak rule's ``min_grad_norm``, so guidance did nothing; ``skipped`` those with a
    non-finite loss, gradient or step size; ``overflow`` the sampler steps after which the sample's max |x| exceeds
    ``max_abs`` (default :data:`MAX_ABS` = 1e6) or is not finite. Every model here works on data of scale one
    (pixels in [−1, 1], unit-variance latents and vectors, and x_t = α·x0 + σ·ε stays within a few units, a few σ_max
    on VE),
    so 1e6 is six orders of magnitude beyond any sample and still far below float32's overflow of x² (≈ 1.8e19):
    it flags divergence before it turns into Inf/NaN, never a sane sample.
    """

    nfe: int = 0  # denoiser forward passes (each sample sees the same count)
    denoiser_grads: int = 0  # backward passes through the denoiser
    loss_evals: int = 0  # loss evaluations per sample (every augmented / MC copy counts)
    loss_grads: int = 0  # loss gradients per sample
    skipped: torch.Tensor | None = None  # guided steps skipped for a non-finite loss/gradient/step size
    zero_grad: torch.Tensor | None = None  # guided gradient steps with ‖g‖ = 0 (or under Polyak's min_grad_norm)
    overflow: torch.Tensor | None = None  # steps after which max |x| > max_abs (or non-finite)
    max_abs: float = MAX_ABS
    last_loss: torch.Tensor | None = None  # ℓ̃ of the last guided evaluation
    loss_trace: list = field(default_factory=list)  # (i, t, ℓ [B]) per guided step
    ess: list | None = None  # lossguide.smc: the effective sample size [B] of every step's weights and the final ones

    def init(self, batch: int) -> None:
        self.skipped = torch.zeros(batch, dtype=torch.long)
        self.zero_grad = torch.zeros(batch, dtype=torch.long)
        self.overflow = torch.zeros(batch, dtype=torch.long)
        self.last_loss = torch.full((batch,), float("nan"), dtype=torch.float64)


def _check_loss_output(L, n: int, where: str) -> torch.Tensor:
    if not isinstance(L, torch.Tensor):
        raise TypeError(
            f"the loss returned {type(L).__name__}; it must return a tensor of shape [{n}] (one per sample)"
        )
    if L.shape != (n,):
        hint = " (a scalar: did you reduce with .mean()/.sum()? return one value per sample)" if L.ndim == 0 else ""
        where = f" {where}" if where else ""
        raise ValueError(f"the loss returned shape {tuple(L.shape)} for {n} inputs{where}; expected [{n}]{hint}")
    return L


def _check_loss_arity(loss: Callable, config: GuidanceConfig) -> None:
    """ℓ(x_t, t) for a noise-aware config (``loss_input="x_t"``), ℓ(x0) otherwise; a one-line error if not."""
    try:
        sig = inspect.signature(loss)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    name = getattr(loss, "__name__", type(loss).__name__)
    args = (None, None) if config.loss_input == "x_t" else (None,)
    try:
        sig.bind(*args)
    except TypeError:
        if config.loss_input == "x_t":
            raise ValueError(
                f"'{config.name}' is noise-aware (loss_input='x_t') and calls loss(x_t, t), but {name} does not take "
                "(x_t, t); pass a classifier loss of (x_t, t) such as losses.NoisyClassLoss, or use a method that "
                "guides through x0_hat (freedom, dps, shen2024, ...)"
            ) from None
        raise ValueError(
            f"'{config.name}' calls loss(x0) with one argument, but {name} does not take one; pass loss(x0) -> [B], "
            "or use method 'cg' for a noise-aware loss(x_t, t)"
        ) from None


class GuidanceEngine:
    """Applies a :class:`GuidanceConfig` with a per-sample loss to one sampler step."""

    def __init__(self, config: GuidanceConfig | None, loss: Callable | None, augment: Callable | None = None):
        config = config or GuidanceConfig(name="none")
        if config.enabled and loss is None:
            raise ValueError(f"guidance '{config.name}' needs a loss: pass loss=callable(x0) -> [B]")
        config = resolve_augment(config, augment)
        self.config = config
        self.loss = loss
        if config.enabled and loss is not None:
            _check_loss_arity(loss, config)

    # -- windows -----------------------------------------------------------------------------------
    def active(self, sampler: Sampler, i: int) -> bool:
        if not self.config.enabled:
            return False
        return in_window(self.config.window, sampler.fraction(i))

    def recurrences(self, sampler: Sampler, i: int) -> int:
        """Time-travel repeats s at step i (1 outside ``recur_window`` or where guidance is off)."""
        if self.config.n_recur == 1 or not self.active(sampler, i):
            return 1
        lo, hi = self.config.recur_window
        frac = sampler.fraction(i)
        return self.config.n_recur if lo <= frac <= hi else 1

    # -- the smoothed loss ℓ̃ --------------------------------------------------------------------------
    def smoothed_loss(self, x0: torch.Tensor, generators: Generators, alpha_bar: float, stats) -> torch.Tensor:
        """ℓ̃(x0) [B]: mean over |T| augmentations, then −log mean_k exp(−ℓ) over MC noise."""
        cfg = self.config
        B = x0.shape[0]
        x, gens = x0, list(generators)
        n_mc = cfg.n_mc if cfg.mc_sigma > 0 else 1
        if n_mc > 1 or cfg.mc_sigma > 0:
            gamma = cfg.mc_sigma * ((1 - alpha_bar) ** 0.5 if cfg.mc_schedule == "decrease" else 1.0)
            noise = randn((n_mc, *x0.shape[1:]), gens, dtype=x0.dtype, device=x0.device)
            x = (x0.unsqueeze(1) + gamma * noise).reshape(B * n_mc, *x0.shape[1:])
            gens = [g for g in gens for _ in range(n_mc)]
        n_aug = cfg.n_aug
        if n_aug > 0:
            x = cfg.augment(x, gens, n_aug)
        n_copies = n_mc * max(n_aug, 1)
        L = _check_loss_output(self.loss(x), B * n_copies, "(after augmentation/MC copies)" if n_copies > 1 else "")
        stats.loss_evals += n_copies
        L = L.reshape(B, n_mc, max(n_aug, 1)).mean(dim=2)
        if n_mc > 1:
            L = -(torch.logsumexp(-L, dim=1) - math.log(n_mc))
        else:
            L = L[:, 0]
        return L

    # -- gradients -----------------------------------------------------------------------------------
    @staticmethod
    def _grad(L: torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
        if not L.requires_grad:
            raise ValueError(
                f"the loss does not depend on {what}: its output has no gradient. Build it from the input "
                "tensor with differentiable torch ops (no .detach(), .numpy() or torch.no_grad())"
            )
        (g,) = torch.autograd.grad(L.sum(), x, allow_unused=True)
        if g is None:
            raise ValueError(f"the loss does not depend on {what}; a guidance loss must be a function of its input")
        return g

    def _sanitize(self, L, g, stats) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample NaN/Inf guard: zero the bad samples' gradients and count them."""
        bad = ~torch.isfinite(L.detach()) | ~torch.isfinite(g).flatten(1).all(dim=1)
        if bad.any():
            stats.skipped += bad.cpu().long()
            g = torch.where(bad.view(-1, *([1] * (g.ndim - 1))), torch.zeros_like(g), g)
        return g, bad

    def _step_size(self, rule, ctx: StepContext, bad, stats) -> torch.Tensor:
        step = rule(ctx).to(ctx.grad.dtype)
        zero = ctx.grad.detach().flatten(1).abs().amax(dim=1) == 0  # guidance does nothing, whatever the rule
        guard = ctx.stats.pop("zero_grad", None)
        if guard is not None:
            zero = zero | guard.to(zero.device)
        stats.zero_grad += (zero & ~bad).cpu().long()
        nonfinite = ~torch.isfinite(step)
        if nonfinite.any():
            stats.skipped += (nonfinite & ~bad).cpu().long()
        return torch.where(bad | nonfinite, torch.zeros_like(step), step)

    # -- one step ------------------------------------------------------------------------------------
    def step(
        self, denoiser: Denoiser, sampler: Sampler, x_t: torch.Tensor, i: int, generators: Generators, stats
    ) -> torch.Tensor:
        """x_{t'} from x_t at step i, guided where the window says so."""
        cfg = self.config
        if denoiser.schedule.family != sampler.schedule.family:
            raise ValueError(
                f"the denoiser's schedule is {denoiser.schedule.family!r} but {type(sampler).__name__} steps a "
                f"{sampler.schedule.family!r} one; build the sampler on denoiser.schedule"
            )
        t = sampler.timestep(i)
        ab_t, _ = sampler.alpha_bars(i)
        a_t, s_t = sampler.levels(i)[:2]
        active = self.active(sampler, i)
        view = (-1,) + (1,) * (x_t.ndim - 1)
        grad_through_denoiser = active and cfg.rho is not None and cfg.loss_input == "x0"
        x_t = x_t.detach()
        with torch.set_grad_enabled(grad_through_denoiser):
            if grad_through_denoiser:
                x_t.requires_grad_(True)
            out = denoiser(x_t, t, alpha=a_t, sigma=s_t)
        stats.nfe += 1
        eps, x0 = out.eps, out.x0_hat
        delta_prev = None
        alpha_bars = None
        if active and cfg.rho is not None:
            alpha_bars, levels = sampler.alpha_bar_pairs(), sampler.level_list()
            with torch.enable_grad():
                if cfg.loss_input == "x0":
                    L = self.smoothed_loss(x0, generators, ab_t, stats)
                    g = self._grad(L, x_t, "x0_hat")
                    stats.denoiser_grads += 1
                else:
                    xt = x_t.detach().requires_grad_(True)
                    L = _check_loss_output(self.loss(xt, t), x_t.shape[0], "")
                    stats.loss_evals += 1
                    g = self._grad(L, xt, "x_t")
            stats.loss_grads += 1
            g, bad = self._sanitize(L, g, stats)
            ctx = StepContext(i=i, alpha_bars=alpha_bars, eps=eps.detach(), grad=g, loss=L.detach(), levels=levels)
            step = self._step_size(cfg.rho, ctx, bad, stats).view(view)
            stats.last_loss = L.detach().double().cpu()
            stats.loss_trace.append((i, t, L.detach().cpu()))
            if cfg.rho_target == "x_prev":
                delta_prev = -step * g
            elif a_t > 0:  # ε ← ε + step·σ_t·g, x0 from x_t = α_t·x0 + σ_t·ε
                eps = eps.detach() + step * s_t * g
                x0 = (x_t.detach() - s_t * eps) / a_t
            # at α_t = 0 (rectified flow's t = 1) x_t = ε_hat exactly and p(y | x_t) does not depend on x_t:
            # no ε-correction is consistent with x_t, so none is made
        eps, x0 = eps.detach(), x0.detach()
        if active and cfg.mu is not None:
            alpha_bars, levels = sampler.alpha_bar_pairs(), sampler.level_list()
            for _ in range(cfg.n_iter):
                with torch.enable_grad():
                    x0_var = x0.detach().requires_grad_(True)
                    L = self.smoothed_loss(x0_var, generators, ab_t, stats)
                    g0 = self._grad(L, x0_var, "x0")
                stats.loss_grads += 1
                g0, bad = self._sanitize(L, g0, stats)
                ctx = StepContext(i=i, alpha_bars=alpha_bars, eps=eps, grad=g0, loss=L.detach(), levels=levels)
                step = self._step_size(cfg.mu, ctx, bad, stats).view(view)
                x0 = x0 - step * g0
                if cfg.rho is None:
                    stats.last_loss = L.detach().double().cpu()
                    stats.loss_trace.append((i, t, L.detach().cpu()))
            if cfg.x0_projection is not None:
                x0 = cfg.x0_projection(x0).detach()
            if cfg.mu_hold == "x_t":
                eps = (x_t.detach() - a_t * x0) / s_t
        x_prev = sampler.step(x_t.detach(), x0, eps, i, generators)
        if delta_prev is not None:
            x_prev = x_prev + delta_prev.detach()
        if stats.overflow is not None:
            big = ~(x_prev.detach().flatten(1).abs().amax(dim=1) <= stats.max_abs)  # NaN counts too
            stats.overflow += big.cpu().long()
        return x_prev
