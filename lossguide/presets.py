"""Guidance methods as configurations of the one engine, each citing its source.

Every preset is a function returning a :class:`~lossguide.guidance.GuidanceConfig`; its keyword
arguments are the method's named parameters with documented defaults. The paper's three techniques
(random augmentation, Polyak step, time travel) combine with any preset through :func:`with_techniques`,
so an ablation is one argument. Step scales depend on the loss's scale: tune them per task
(``lossguide bench``). The paper's Polyak step η·‖ε‖/‖g‖² is not scale-free either: it is *inversely*
scaled (ℓ → c·ℓ shrinks the update by 1/c); only the classical gap η·ℓ/‖g‖² (``polyak_gap="loss"``) is.
No preset picks an augmentation: that is the data's (``sample(..., augment=)``, see :mod:`lossguide.augment`).

The formulas are written for x_t = α_t·x0 + σ_t·ε of any schedule family (:mod:`lossguide.schedule`); ᾱ_t is the
VP-equivalent α_t²/(α_t² + σ_t²), so on a VP schedule α_t = √ᾱ_t and σ_t = √(1−ᾱ_t), the papers' notation.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

from lossguide.dreamguider import DreamguiderStep
from lossguide.figd import FisherStep
from lossguide.guidance import GuidanceConfig
from lossguide.steps import AlphaBarPower, Constant, LookAheadStep, LossNormalized, Polyak, TFGSchedule
from lossguide.validate import CHOICES, Range, check_params

log = logging.getLogger(__name__)


def none() -> GuidanceConfig:
    """Unguided sampling."""
    return GuidanceConfig(name="none")


def dps(scale: float = 1.0, power: float = 0.5) -> GuidanceConfig:
    """DPS (Chung et al. 2023, Alg. 1): x_{t'} −= ζ_t·∇_{x_t} ℓ(x0_hat(x_t)), ζ_t = scale/ℓ^power.

    With ℓ = ‖y − A(x0)‖² and power = 1/2 this is the paper's ζ'/‖y − A(x0_hat)‖.
    """
    return GuidanceConfig(name="dps", rho=LossNormalized(scale, power))


def freedom(scale: float = 1.0, n_recur: int = 1, recur_window: tuple[float, float] = (0.5, 0.8)) -> GuidanceConfig:
    """FreeDoM (Yu et al. 2023, eq. 11 and Alg. 1): x_{t'} −= scale·√ᾱ_t·∇_{x_t} ℓ(x0_hat(x_t)),
    with time travel of ``n_recur`` repeats in ``recur_window`` (their ImageNet code: 10 in t ∈ [500, 800])."""
    return GuidanceConfig(name="freedom", rho=AlphaBarPower(scale, 0.5), n_recur=n_recur, recur_window=recur_window)


def ugd(scale: float = 1.0, backward_scale: float = 0.1, n_iter: int = 1, n_recur: int = 1) -> GuidanceConfig:
    """Universal Guidance (Bansal et al. 2023, Alg. 1): forward guidance ε̂ = ε + scale·σ_t·∇_{x_t} ℓ (σ_t = √(1−ᾱ_t)
    on VP), ``n_iter`` backward steps x0 −= backward_scale·∇_{x0} ℓ, and ``n_recur`` self-recurrences.

    As in UG, the backward step holds x_t fixed and recomputes ε from x_t and the new x0
    (ε̂ −= (α_t/σ_t)·Δx0, √(ᾱ_t/(1−ᾱ_t))·Δx0 on VP); ``n_iter=0`` switches backward guidance off.
    """
    return GuidanceConfig(
        name="ugd",
        rho=Constant(scale),
        rho_target="eps",
        mu=Constant(backward_scale) if n_iter > 0 and backward_scale else None,
        n_iter=max(n_iter, 1),
        mu_hold="x_t",
        n_recur=n_recur,
    )


def lgd_mc(scale: float = 1.0, n_mc: int = 10, mc_sigma: float = 1.0) -> GuidanceConfig:
    """LGD-MC (Song et al. 2023, eq. 6; Shen et al. 2024, eq. 6): ∇_{x_t} −log (1/n)Σ exp(−ℓ(x0_hat + r_t δ_i)),
    δ_i ~ N(0, I), r_t = mc_sigma·√(1−ᾱ_t) (ᾱ_t VP-equivalent: σ_t/k_t, k_t = √(α_t² + σ_t²)), n = ``n_mc``
    (10 in Shen et al.). The gradient of the log-sum-exp is already a weighted mean: no extra 1/n (TFG's
    ``lgd.py`` divides twice)."""
    return GuidanceConfig(name="lgd_mc", rho=Constant(scale), mc_sigma=mc_sigma, mc_schedule="decrease", n_mc=n_mc)


def mpgd(scale: float = 1.0, projection: Callable | None = None) -> GuidanceConfig:
    """MPGD (He et al. 2024, Alg. 2): x0' = x0_hat − scale·∇_{x0} ℓ(x0_hat), no backprop through the
    denoiser; the sampler then uses x0' (DDIM scales it by α_{t'}, √ᾱ_{t'} on VP). ``projection`` is the hook for
    MPGD-Z's autoencoder projection x0' ← D(E(x0'))."""
    return GuidanceConfig(name="mpgd", mu=Constant(scale), n_iter=1, x0_projection=projection)


def tfg(
    rho: float = 0.05,
    mu: float | None = None,
    gamma: float = 0.01,
    n_recur: int = 1,
    n_iter: int = 4,
    n_mc: int = 1,
    rho_schedule: str = "increase",
    mu_schedule: str = "increase",
    gamma_schedule: str = "decrease",
) -> GuidanceConfig:
    """TFG (Ye et al. 2024, Alg. 1 as in their code): ρ_t-step through the denoiser (with 1/√α_t), N_iter
    μ_t-steps on x0, both on ℓ smoothed by N(0, γ_t²) noise (``n_mc`` samples, log-sum-exp), and N_recur
    recurrences; ρ_t, μ_t follow ``*_schedule`` normalised to mean 1 over the trajectory.

    ``mu=None`` (the default) ties μ to ρ (μ = ρ), so one scale tunes both; set ``mu`` to decouple them
    (``mu=0`` switches the μ steps off). The default ρ = 0.05 is the largest of {1, 0.3, 0.1, 0.05, 0.03} with no
    noise-like digit outside the 8s on the shipped MNIST model (whose unguided 8s are at the noise threshold;
    ρ = 0.3: 16 of 80, ρ = 1: all, TV up to 4.8× the threshold) and it beats unguided sampling on both oracle tasks,
    where ρ = 1 diverges (``tests/test_preset_defaults.py``). Tune it per task (``lossguide bench``)."""
    if mu is None:
        mu = rho
    return GuidanceConfig(
        name="tfg",
        rho=TFGSchedule(rho, rho_schedule, inv_sqrt_alpha=True) if rho else None,
        mu=TFGSchedule(mu, mu_schedule) if mu else None,
        n_iter=n_iter,
        mc_sigma=gamma,
        mc_schedule=gamma_schedule,
        n_mc=n_mc,
        n_recur=n_recur,
    )


def shen2024(
    eta: float = 0.03,
    n_aug: int = 10,
    n_recur: int = 3,
    recur_window: tuple[float, float] = (0.3, 0.8),
    polyak: bool = True,
    scale: float = 1.0,
    augment: Callable | None = None,
    polyak_gap: str = "eps",
    loss_floor: float = 0.0,
    max_ratio: float | None = None,
    window: tuple[float, float] = (0.0, 1.0),
) -> GuidanceConfig:
    """Shen et al. (2024), "Understanding and Improving Training-free Loss-based Diffusion Guidance", §5:
    FreeDoM + random augmentation (Alg. 1, |T| = ``n_aug`` copies) + Polyak step η·‖ε‖/‖g‖² (Alg. 2) + time
    travel (Alg. 3, ``n_recur`` repeats for t/T ∈ ``recur_window``; the paper's ImageNet setting is 10 in
    [0.3, 0.8]).

    ``augment`` is None by default: the data supplies its augmentation (``sample(..., augment=)``; the
    paper's DiffAugment for photos is ``lossguide.augment.policy("photo")``). ``polyak=False`` falls back to
    FreeDoM's scale·√ᾱ_t step; ``n_aug=0`` and ``n_recur=1`` switch the other techniques off.
    ``polyak_gap="loss"`` is the classical gap ℓ − ``loss_floor`` instead of the paper's ‖ε‖, ``max_ratio`` the
    optional lossguide cap on the update (None: the paper's rule; see :class:`~lossguide.steps.Polyak`), and
    ``window`` where guidance acts (the official code stops at t ≤ 100 or 200 of 1000: ``(0.1, 1.0)``).
    The Polyak rule suits distance losses (‖f(x0_hat) − reference‖, unsquared, as in the paper's code); on a
    saturating loss such as cross-entropy use ``polyak_gap="loss"``.
    """
    if polyak:
        rule = Polyak(eta, gap=polyak_gap, loss_floor=loss_floor, max_ratio=max_ratio)
    else:
        rule = AlphaBarPower(scale, 0.5)
    return GuidanceConfig(
        name="shen2024",
        rho=rule,
        augment=augment if n_aug else None,
        n_aug=n_aug,
        n_recur=n_recur,
        recur_window=tuple(recur_window),
        window=tuple(window),
    )


def cg(scale: float = 1.0) -> GuidanceConfig:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2 in ε form): ε̂ = ε + scale·σ_t·∇_{x_t} ℓ(x_t, t)
    (σ_t = √(1−ᾱ_t) on VP) with ℓ = −log p(y | x_t, t) of a noise-aware classifier; the training-based reference.
    With the exact p(y | x_t) and scale = 1, ε̂ is the exact conditional score."""
    return GuidanceConfig(name="cg", rho=Constant(scale), rho_target="eps", loss_input="x_t")


def dreamguider(
    scale: float = 1.0,
    eps_weight: float = 0.1,
    x0_weight: float = 0.03,
    n_aug: int = 4,
    augment: Callable | None = None,
    window: tuple[float, float] = (0.0, 1.0),
    noise_margin: float | None = 5.0,
) -> GuidanceConfig:
    """Dreamguider (Nair & Patel 2024, arXiv 2406.02549, §3): g = ∇_{x0_hat} ℓ̃(x0_hat) without backprop through the
    denoiser, applied to x0_hat (weight ``x0_weight``) and to ε_θ (weight ``eps_weight``, the factor ρ_t − ρ_{t'} of
    the step's noise-to-signal ratio ρ = σ/α), scaled by ‖ε_hat‖ over the running RMS of the sample's gradient norms,
    on ℓ̃ averaged over ``n_aug`` augmented copies of x0_hat (:class:`~lossguide.dreamguider.DreamguiderStep`).

    The stored paper page gave its abstract only (no public code); the method is reconstructed from it and from the
    public reviews of its ICLR submission, which name the parts: gradients with respect to the MMSE estimate and to
    the predicted noise, ε_θ-guidance early and x0_hat-guidance late, a gradient-dependent ("DoG-style") scale, and a
    differentiable augmentation of prediction and condition. Choices the text left open, and what is chosen here:

    1. How the two terms enter: x0_hat ← x0_hat − c·ĝ at fixed ε, and ε ← ε + d·ĝ at fixed x_t (the direction of
       −∇_ε ℓ = (σ_t/α_t)·g, its σ_t/α_t absorbed by the scale of point 3), with ĝ = ‖ε_hat‖·g/G_k; under
       deterministic DDIM both are one x0 step of (c + d·(ρ_t − ρ_{t'}))·ĝ with ε held, which is how the engine
       applies them (exact for DDIM η = 0; the same x0 step on other samplers).
    2. The time-varying factor: none beyond the schedule's own, ρ_t − ρ_{t'} on the ε-term (23 at the first of 50
       DDIM steps on the linear schedule, 0.3 halfway, 0.01 at the last) and a constant on the x0-term; so the
       ε-term dominates early and the x0-term late.
    3. The empirical scale: DoG-style, ‖ε_hat‖/√(mean_{j≤k}‖g_j‖²) per sample over the trajectory so far (the
       noise's norm as the distance, the running RMS of gradient norms as the denominator), not the paper's own
       formula, which was not available.
    4. The constants eps_weight = 0.1, x0_weight = 0.03: one setting for every task, chosen on the oracle's tuning
       seeds (class and linear tasks, ≥ 1,000,000), not from the paper.
    5. The augmentation: the data's own (``sample(..., augment=)``, e.g. ``digits`` for MNIST) on x0_hat only,
       ℓ averaged over ``n_aug`` = 4 copies (Shen et al.'s Alg. 1; the paper's count was not available); the
       condition is not augmented (the reference lives inside the loss). ``n_aug=0`` switches it off.
    6. One guidance step per sampler step (n_iter = 1), no time travel, guidance over the whole trajectory
       (``window`` as in the other presets).

    7. lossguide's guard, not the paper's: the "distance" ‖ε_hat‖ is capped at √D + ``noise_margin`` (D the
       sample's size), which a true x_t's noise exceeds with probability ≤ exp(−margin²/2) (3.7e-6 at 5; ‖ε‖ is
       1-Lipschitz in ε). Off the data, ε_hat grows with |x_t|/σ_t, and uncapped it fed the step that moved x_t
       further off: at scale 10 on the oracle's linear task, |x| reached 185 (σ-space Euler), 3.0e3 (DPMSolver) and
       791 (flow DDIM) uncapped, 7.9, 12 and 2.5 capped (data: |x| ≤ 2.5; 256 seeds).
       ``noise_margin=None`` is the uncapped rule.

    ``scale`` multiplies both weights (1 = the one default; the harness tunes it like other presets' scales).
    """
    rule = DreamguiderStep(eps_weight=scale * eps_weight, x0_weight=scale * x0_weight, noise_margin=noise_margin)
    return GuidanceConfig(name="dreamguider", mu=rule, n_iter=1, mu_hold="eps", augment=augment if n_aug else None,
                          n_aug=n_aug, window=tuple(window))  # fmt: skip


def figd(scale: float = 0.1, data_var: float = 1.0) -> GuidanceConfig:
    """Fisher-information guidance (Song & Lai 2024, arXiv 2404.18252: "Fisher Information Improved Training-Free
    Conditional Diffusion Model", FIGD, v1; "Improving Training-free Conditional Diffusion Model via Fisher
    Information", FICD, v2): the condition's gradient at x0_hat only (no backprop through the denoiser), weighted per
    step by the posterior variance λ_t that a bound of the Fisher information gives, x0 ← x0_hat − scale·λ_t·∇_{x0}ℓ
    with x_t held (:class:`~lossguide.figd.FisherStep`; λ_t = 1 − ᾱ_t on VP at ``data_var`` = 1).

    The stored pages gave both versions' abstracts and the start of v1's introduction only (no public code): the
    conditional term ∇_{x_t} log p(c | x_t) estimated without the denoiser's gradient, "Fisher information as a
    weight to measure the informativeness of the condition in each generation step", and "the upper bound of the
    Fisher information to reformulate the conditional term, which increases the information gain and decreases the
    time cost". The method is reconstructed from those sentences; the choices they leave open, and what is chosen:

    1. Which Fisher information: F_t = −∇² log p_t(x_t) of the noisy marginal, which enters the denoiser's Jacobian
       ∂x0_hat/∂x_t = (I − σ_t²·F_t)/α_t (second-order Tweedie), the factor that backpropagation would apply to
       ∇_{x0} log p(c | x0_hat). The weight of the condition is then the posterior variance (σ_t²/α_t²)(1 − σ_t²F_t).
    2. Which bound: F_t ⪯ I/σ_t² (the posterior covariance is ⪰ 0), the literal upper bound, makes the weight 0:
       no guidance. So the bound is read as the one that makes the condition's weight largest ("increases the
       information gain"): F̄_t = 1/(α_t²·v + σ_t²), the Cramér–Rao bound of p_t's Fisher information for data of
       variance v, i.e. λ_t = v·σ_t²/(α_t²v + σ_t²) = 1/(SNR_t + 1/v), the linear estimator's error, which bounds
       the posterior variance; it is exact for Gaussian data of variance v (see :mod:`lossguide.figd`).
    3. One scalar per step, the same for every sample and dimension (no per-sample or per-pixel Fisher estimate,
       which would cost the denoiser gradients the method avoids).
    4. How the term is applied: as classifier guidance at fixed x_t (ε recomputed from x_t and the moved x0,
       ``mu_hold="x_t"``), the form in which the weight is the exact Jacobian factor, so every sampler of every
       family sees the same corrected denoiser; not a FreeDoM-style correction of x_{t'} (on the oracle the
       alternative with ε held, ``mu_hold="eps"``, reached the same best distances at a ×10 smaller scale).
    5. v = ``data_var`` = 1: data normalised to unit scale (pixels in [−1, 1], unit-variance latents).
    6. ``scale`` = 0.1, the oracle's tuned value (tuning seeds ≥ 1,000,000, grid 0.01 … 30 in steps of ×√10:
       both the class and the linear task chose 0.1), not the paper's; 1 takes ℓ = −log p(c | x0) at face value,
       which on the oracle over-guides (the loss at x0_hat ignores the posterior's spread).
    7. One gradient per step, no time travel, no augmentation, guidance over the whole trajectory.
    """
    return GuidanceConfig(name="figd", mu=FisherStep(scale=scale, data_var=data_var), n_iter=1, mu_hold="x_t")


def ggdm(scale: float = 1.0, sigma: float | None = 0.1) -> GuidanceConfig:
    """G_loss of Guo et al. (2024, arXiv 2404.14743, Definition 1 and Lemma 1; code GGDMOptim): the loss gradient
    through the denoiser added to the score, ε̂ = ε + β_t·σ_t·∇_{x_t}ℓ(x0_hat(x_t)), with Lemma 1's
    β_t = scale·(ᾱ/2)/(ᾱσ² + (1−ᾱ)‖∇_x̃ r‖²) for ℓ = r² (:class:`~lossguide.steps.LookAheadStep`).

    The paper's ℓ is the look-ahead loss (y − gᵀx0)² (:class:`~lossguide.optimize.LookAheadLoss`, built each round by
    :func:`lossguide.optimize`); σ = ``sigma`` is its reward noise (0.1 in the released code). ``sigma=None`` is a
    constant β_t = ``scale`` (the code's ``--beta``), for any loss. Through E[x0 | x_t] the update stays in the data's
    subspace when the data lie on one (their Theorem 1).

    For a loss that is a negative log-likelihood (exp(−ℓ) the likelihood, this library's convention, e.g.
    ‖y − Ax‖²/(2s²)) the matching reading is ``sigma=0.5**0.5``: ℓ = r²/(2σ²) with σ² = ½ makes β_t the exact
    conditional-score weight on Gaussian data. Measured on the oracle (256 seeds; flow DDIM-50, VE Euler-50, VP
    DPMSolver-50): linear task SW to the posterior 0.07–0.08, against 0.34–0.36 at the default 0.1 (which over-guides
    such a loss) and 0.20 unguided; class task (cross-entropy) 0.18, against 0.15 at 0.1 and 0.65 unguided.
    """
    rule = Constant(scale) if sigma is None else LookAheadStep(scale=scale, sigma=sigma)
    return GuidanceConfig(name="ggdm", rho=rule, rho_target="eps", loss_input="x0")


def naive_grad(scale: float = 1.0) -> GuidanceConfig:
    """Naive gradient guidance (the baseline of Guo et al. 2024, §4): the objective's gradient at x_t added to the
    score, ŝ = s + scale·∇f(x_t), i.e. ε̂ = ε + scale·σ_t·∇_{x_t}ℓ(x_t) with ℓ = −f; no denoiser in the gradient.

    It is classifier guidance's form with a clean loss at the noisy x_t: pass ``lossguide.optimize.on_x_t(loss)``
    (``loss(x_t, t) = ℓ(x_t)``).
    """
    return GuidanceConfig(name="naive_grad", rho=Constant(scale), rho_target="eps", loss_input="x_t")


PRESETS: dict[str, Callable[..., GuidanceConfig]] = {
    f.__name__: f
    for f in (none, dps, freedom, ugd, lgd_mc, mpgd, tfg, shen2024, cg, dreamguider, figd, ggdm, naive_grad)
}

#: where a preset's range differs from :data:`lossguide.validate.RANGES` (ugd: ``n_iter=0`` is no backward step)
PARAM_RANGES: dict[str, dict[str, Range]] = {
    "ugd": {"n_iter": Range(0)},
    "dreamguider": {"scale": Range(0), "eps_weight": Range(0), "x0_weight": Range(0), "noise_margin": Range(0)},
    "figd": {"data_var": Range(0, lo_open=True)},
    "ggdm": {"sigma": Range(0, lo_open=True)},
}


def list_presets() -> dict[str, str]:
    """Every preset's name and the first paragraph of its docstring (what ``lg.preset(name, ...)`` builds)."""
    first = {name: inspect.cleandoc(fn.__doc__ or "").split("\n\n")[0] for name, fn in PRESETS.items()}
    return {name: " ".join(text.split()) for name, text in first.items()}


def get(name: str, **params) -> GuidanceConfig:
    """The preset ``name`` with ``params``; unknown names, parameters, bad values or ones without effect raise.

    Each value is checked against the preset's signature and :mod:`lossguide.validate`'s ranges (an integer
    parameter refuses 2.0: write 2), and each must change the resolved config (:func:`check_effect`)."""
    config = build(name, **params)
    fn = PRESETS[name]
    check_effect(lambda p: build(name, **p), params, defaults(fn), where=f"method {name!r}: ",
                 enablers=param_enablers(fn))  # fmt: skip
    return config


def build(name: str, **params) -> GuidanceConfig:
    """:func:`get` without the check that every parameter has an effect."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(PRESETS)}")
    fn = PRESETS[name]
    allowed = inspect.signature(fn).parameters
    bad = [k for k in params if k not in allowed]
    if bad:
        raise ValueError(
            f"method {name!r} has no parameter {', '.join(map(repr, bad))}; its parameters are: "
            f"{', '.join(allowed) or '(none)'}"
        )
    check_params(fn, params, PARAM_RANGES.get(name), where=f"method {name!r}: ")
    return fn(**params)


# -- parameters without effect ------------------------------------------------------------------------
#: one change that may make a parameter take effect: (the parameter it sets or None, what holds now where that is
#: not a parameter, what to do, the build to use or None: the same, params → changed params)
Enabler = tuple


def defaults(fn: Callable) -> dict:
    """A preset's parameters and their defaults."""
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()}


def probes(name: str, value) -> list:
    """Values other than ``value`` for parameter ``name``, to see whether the resolved config reads it."""
    if isinstance(value, bool):
        return [not value]
    if value is None:
        return [1.0]
    if isinstance(value, int):
        return [value + 1, value + 2]
    if isinstance(value, float):
        return [abs(value) * 2 + 0.5, 0.0] if value else [0.5]
    if isinstance(value, str):
        return [c for c in CHOICES.get(name, ()) if c != value]
    if isinstance(value, (tuple, list)):
        return [w for w in ((0.0, 1.0), (0.25, 0.75), (0.0, 0.5)) if tuple(w) != tuple(value)]
    return []


def param_enablers(fn: Callable) -> list[Enabler]:
    """An :data:`Enabler` for each probe value (and the default) of each of ``fn``'s parameters."""
    out = []
    for k, v in defaults(fn).items():
        for w in ([v] if v is not None and not callable(v) else []) + probes(k, v):  # the default first
            out.append((k, None, f"{k}={w!r}", None, lambda p, k=k, w=w: {**p, k: w}))
    return out


def _reads(build: Callable[[dict], GuidanceConfig], params: dict, name: str) -> bool | None:
    """Whether ``build(params).read()`` changes when ``params[name]`` is left out or changed (None: not buildable)."""
    try:
        base = build(params).read()
    except (ValueError, TypeError):
        return None
    built = False
    for p in [_without(params, name)] + [{**params, name: w} for w in probes(name, params[name])]:
        try:
            r = build(p).read()
        except (ValueError, TypeError):
            continue
        built = True
        if r != base:
            return True
    return False if built else None


def _without(params: dict, *names: str) -> dict:
    return {k: v for k, v in params.items() if k not in names}


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return tuple(a) == tuple(b)
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def check_effect(
    build: Callable[[dict], GuidanceConfig],
    params: dict,
    default: dict,
    where: str = "",
    enablers: list[Enabler] = (),
) -> None:
    """A one-line error where a parameter in ``params`` is not read by the resolved config ``build(params)``
    (leaving it out or changing it gives the same :meth:`~lossguide.guidance.GuidanceConfig.read`), naming the first
    of ``enablers`` (or pair of them) that would make it take effect.

    Where it is harmless, a warning: it equals its default, or it would do what the given parameters that block it
    already do (ugd's ``backward_scale=0`` with ``n_iter=0``: both switch the backward step off)."""
    for name, value in params.items():
        if _reads(build, params, name) is not False:
            continue
        fix = _enabler(build, params, default, name, enablers)
        blockers = [k for k in params if k != name and _reads(build, _without(params, k), name)]
        redundant = bool(blockers) and build(_without(params, *blockers)).read() == build(params).read()
        if redundant:
            log.warning("%s%s=%r has no effect beyond what %s already does; drop one of them", where, name, value,
                        " and ".join(f"{k}={params[k]!r}" for k in blockers))  # fmt: skip
        elif name in default and _same(value, default[name]):
            log.warning("%s%s=%r has no effect%s; drop it", where, name, value,
                        f" with {fix[0]} (it takes effect with {fix[1]})" if fix else "")  # fmt: skip
        elif fix:
            raise ValueError(f"{where}{name}={value!r} has no effect with {fix[0]}; it takes effect with {fix[1]}, "
                             "else drop it")  # fmt: skip
        else:
            raise ValueError(f"{where}{name}={value!r} has no effect on the resolved guidance; drop it")


def _enabler(build, params: dict, default: dict, name: str, enablers) -> tuple[str, str] | None:
    """(what holds now, what to do instead) of the first enabler, or pair, under which ``params[name]`` is read."""
    singles = [e for e in enablers if e[0] != name]

    def now(e) -> str:
        key, fixed = e[0], e[1]
        return fixed if key is None else f"{key}={params.get(key, default.get(key))!r}"

    for e in singles:
        if _reads(e[3] or build, e[4](params), name):
            return now(e), e[2]
    for a, ea in enumerate(singles):
        for eb in singles[a + 1:]:
            if (ea[0] is not None and ea[0] == eb[0]) or (ea[3] and eb[3]):
                continue
            if _reads(ea[3] or eb[3] or build, eb[4](ea[4](params)), name):
                return f"{now(ea)} and {now(eb)}", f"{ea[2]} and {eb[2]}"
    return None


def with_techniques(
    config: GuidanceConfig,
    *,
    n_aug: int | None = None,
    polyak: float | None = None,
    n_recur: int | None = None,
    recur_window: tuple[float, float] | None = None,
    augment: Callable | None = None,
) -> GuidanceConfig:
    """Switch the paper's techniques on (or off) on any preset.

    Args:
        n_aug: |T| random augmentations (0 switches augmentation off).
        polyak: η of a Polyak step replacing the ρ rule (the μ rule if the method has no ρ part).
        n_recur, recur_window: time travel (n_recur = 1 switches it off).
        augment: the augmentation to use (None: the data's own, given to ``sample(..., augment=)``).
    """
    changes: dict = {}
    if n_aug is not None:
        changes["n_aug"] = n_aug
        changes["augment"] = (augment or config.augment) if n_aug else None
    if polyak is not None:
        if config.rho is not None:
            changes["rho"] = Polyak(polyak)
        elif config.mu is not None:
            changes["mu"] = Polyak(polyak)
        else:
            raise ValueError(f"method {config.name!r} takes no guidance step, so a Polyak step has nothing to scale")
    if n_recur is not None:
        changes["n_recur"] = n_recur
    if recur_window is not None:
        changes["recur_window"] = recur_window
    return config.replace(**changes)
