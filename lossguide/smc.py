"""Particles over the guidance engine: sequential Monte Carlo with K weighted particles per seed (TDS, FK steering).

Each seed runs K particles. A step moves every particle with the guided step of any preset (the proposal q, one
:meth:`~lossguide.guidance.GuidanceEngine.step` of a stochastic DDIM/DDPM sampler), weighs it and, where the seed's
effective sample size ESS = 1/Σ w_k² falls below ``ess_threshold``·K, resamples the seed's particles. The weight of
a transition x_t → x_{t'} is

    log w = log G(ℓ_{t'}, ℓ_t) + log p(x_{t'} | x_t) − log q(x_{t'} | x_t, y),    ℓ_t = ℓ(x0_hat(x_t)),

with G the potential and p, q the unguided and guided Gaussian transitions: the same variance c² (DDIM's fresh
noise, ``sampler.sigma(i)``) and means m_p, m_q, so log p − log q = (‖x_{t'} − m_q‖² − ‖x_{t'} − m_p‖²)/(2c²).
A step with c = 0 (DDPM's last, x0 = x0_hat) is taken unguided, where q = p. The final weight uses ℓ(x0) itself;
then one particle per seed is drawn by its weight. The potentials telescope, so at K → ∞ the drawn particle is
distributed as p(x0)·exp(−ℓ(x0)) of the sampler's own model p (λ = 1), whatever the proposal.

- TDS (Wu et al. 2023, the twisted diffusion sampler): twist p̃_t(y | x_t) = exp(−λ·ℓ(x0_hat(x_t))),
  G = p̃_{t'}/p̃_t, the final one exp(−ℓ(x0))/p̃; proposal N(m_p + c²·∇_{x_t} log p̃_t, c²) (:func:`tds_proposal`),
  whose noise term cancels the twist's first-order change. Guiding ε instead (``ugd``'s forward step at scale λ)
  shifts the mean by r·c²·∇ log p̃ with r = 1.1–1.6 over DDIM-50's steps and 63 at its second-to-last one, and
  its weights degenerate (on a 1-D Gaussian, 20 steps, K = 32: posterior variance 0.017 for 0.185).
- FK steering (Singhal et al. 2025, the difference potential): G = exp(λ(r_{t'} − r_t)), r = −ℓ(x0_hat) and
  r = −ℓ(x0) at the end, targeting p(x0)·exp(−λ·ℓ(x0)); proposal: the plain sampler (a guided one adds p/q).

At λ = 1 the two potentials are the same weights; they differ in the default proposal and in what λ means (TDS
tempers the intermediate twists only, FK tilts the target). Randomness: particle k of seed s draws every noise
from its own generator (:func:`particle_seed`; k = 0 is seed s itself, so K = 1 is :func:`~lossguide.sampling.sample`),
and the seed's resampling uniforms from one generator of its own (:func:`resample_seed`), so a seed's result is the
same alone or beside others, and for any ``chunk`` of rows the particles are stepped in.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from lossguide import presets
from lossguide.denoiser import Denoiser, DenoiserOutput
from lossguide.guidance import GuidanceConfig, GuidanceEngine, GuidanceStats, _check_loss_output, check_window
from lossguide.rng import randn
from lossguide.samplers import DDIM, Sampler
from lossguide.sampling import SampleResult, _check_channels, guidance_summary
from lossguide.schedule import mismatch
from lossguide.steps import StepContext, StepRule

log = logging.getLogger(__name__)

_MASK = 2**64 - 1
#: the stream index of a seed's resampling generator (no particle index reaches it)
_RESAMPLE_STREAM = 2**63


# -- random streams ----------------------------------------------------------------------------------
def _splitmix64(z: int) -> int:
    """SplitMix64's finaliser (Steele et al. 2014): a bijective 64-bit mix."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _stream(seed: int, k: int) -> int:
    return _splitmix64((_splitmix64(seed & _MASK) + k) & _MASK)


def particle_seed(seed: int, k: int) -> int:
    """The generator seed of particle k of ``seed``: ``seed`` itself for k = 0, else a SplitMix64 hash of (seed, k)."""
    return seed if k == 0 else _stream(seed, k)


def resample_seed(seed: int) -> int:
    """The generator seed of ``seed``'s resampling draws (a SplitMix64 hash, apart from every particle's)."""
    return _stream(seed, _RESAMPLE_STREAM)


# -- resampling ------------------------------------------------------------------------------------
def _inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Indices j with F(j−1) ≤ u < F(j), F the cumulative weights (normalised, so u < 1 always lands)."""
    cdf = torch.cumsum(w, 0)
    cdf = cdf / cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=len(w) - 1)


def multinomial(w: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Multinomial resampling: n ancestors drawn i.i.d. from the weights ``w`` [K] (n uniforms)."""
    return _inverse_cdf(w, torch.rand(n, generator=generator, dtype=torch.float64))


def systematic(w: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Systematic resampling (Kitagawa 1996): one uniform U, ancestors at the quantiles (U + j)/n, j < n."""
    u = (torch.rand(1, generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    return _inverse_cdf(w, u)


def residual(w: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Residual resampling (Liu & Chen 1998): ⌊n·w_j⌋ copies of each j, the other R multinomially from n·w − ⌊n·w⌋."""
    nw = n * w / w.sum()
    copies = torch.floor(nw).long()
    kept = torch.repeat_interleave(torch.arange(len(w)), copies)
    rest = n - len(kept)
    if rest == 0:
        return kept
    return torch.cat([kept, multinomial(nw - copies, rest, generator)]).sort().values


#: resampling schemes by name: ``scheme(w [K], n, generator) -> ancestor indices [n]``, E[counts] = n·w
RESAMPLERS: dict[str, Callable] = {"multinomial": multinomial, "systematic": systematic, "residual": residual}


def ess(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size 1/Σ_k w_k² of normalised weights, per row of ``log_w`` [B, K] → [B]."""
    w = torch.softmax(log_w, dim=-1)
    return 1.0 / (w**2).sum(-1)


# -- potentials ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Twist:
    """Difference potential log G = −λ·(ℓ_new − ℓ_old) between twists exp(−λ·ℓ(x0_hat)); the final one
    −λ_0·ℓ(x0) + λ·ℓ_old, so the weights telescope to exp(−λ_0·ℓ(x0)) (target p(x0)·exp(−λ_0·ℓ(x0)))."""

    scale: float = 1.0  # λ of the intermediate twists
    final_scale: float = 1.0  # λ_0 of the final potential

    def __post_init__(self):
        for name in ("scale", "final_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"the twist's {name} must be a finite number ≥ 0, got {v!r}")

    def __call__(self, loss_new: torch.Tensor, loss_old: torch.Tensor | None, final: bool) -> torch.Tensor:
        new = -(self.final_scale if final else self.scale) * loss_new
        return new if loss_old is None else new + self.scale * loss_old


def tds_potential(twist_scale: float = 1.0) -> Twist:
    """TDS (Wu et al. 2023): twists p̃_t = exp(−λ·ℓ(x0_hat(x_t))), final exp(−ℓ(x0)): target p(x0)·exp(−ℓ)."""
    return Twist(scale=twist_scale, final_scale=1.0)


def fk_potential(lam: float = 1.0) -> Twist:
    """FK steering's difference potential (Singhal et al. 2025): G_t = exp(λ(r_{t'} − r_t)), r = −ℓ(x0_hat)."""
    return Twist(scale=lam, final_scale=lam)


POTENTIALS: dict[str, Callable[..., Twist]] = {"tds": tds_potential, "fk": fk_potential}


# -- TDS's proposal ------------------------------------------------------------------------------------
@dataclass
class NoiseVarianceStep(StepRule):
    """step = scale·c_i², c_i = k_{t'}·η·√((1−ᾱ_{t'})/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_{t'})) the fresh-noise std of DDIM(η) at
    step i: with ``rho_target="x_prev"`` the shift c²·∇ log p̃_t of TDS's proposal (Wu et al. 2023), whose noise
    term cancels the twist's first-order change in the weights. ``eta=None`` is the sampler's, which :func:`smc` sets.
    """

    scale: float = 1.0
    eta: float | None = None

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        if self.eta is None:
            raise ValueError("NoiseVarianceStep needs the sampler's eta: pass eta=... or run it through lossguide.smc")
        ab, ab_prev = ctx.alpha_bar, ctx.alpha_bar_prev
        k2 = ctx.alpha_prev**2 + ctx.sigma_prev**2
        c2 = k2 * self.eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev) if ab < 1 else 0.0
        return self._full(ctx, self.scale * c2)


def tds_proposal(twist_scale: float = 1.0) -> GuidanceConfig:
    """TDS's proposal (Wu et al. 2023): x_{t'} ~ N(m_p(x_t) + c²·∇_{x_t} log p̃_t(y | x_t), c²) with the twist
    p̃_t = exp(−λ·ℓ(x0_hat(x_t))), λ = ``twist_scale``; m_p and c² the sampler's unguided mean and noise variance."""
    return GuidanceConfig(name="tds", rho=NoiseVarianceStep(twist_scale), rho_target="x_prev")


#: proposals defined here rather than in :mod:`lossguide.presets`
PROPOSALS: dict[str, Callable[..., GuidanceConfig]] = {"tds": tds_proposal}


# -- the particle methods, for presets and the CLI -----------------------------------------------------
#: each particle method: its proposal (a preset of :mod:`lossguide.presets` or of :data:`PROPOSALS`) with parameters,
#: its potential (of :data:`POTENTIALS`) with parameters, and ``tie``: proposal parameters set from potential ones
#: (TDS's proposal follows its twist's gradient)
PARTICLE_METHODS: dict[str, dict] = {
    "tds": {
        "source": "Wu et al. 2023, twisted diffusion sampler (arXiv 2306.17775)",
        "proposal": "tds",
        "proposal_params": {},
        "potential": "tds",
        "potential_params": {"twist_scale": 1.0},
        "tie": {"twist_scale": "twist_scale"},
    },
    "fk": {
        "source": "Singhal et al. 2025, Feynman-Kac steering (arXiv 2501.06848), difference potential",
        "proposal": "none",
        "proposal_params": {},
        "potential": "fk",
        "potential_params": {"lam": 1.0},
        "tie": {},
    },
}


@dataclass
class SMCResult(SampleResult):
    """:class:`~lossguide.sampling.SampleResult` plus each seed's log evidence estimate log Ẑ [B] (Del Moral 2004:
    Ẑ = Π over resampling epochs of the mean unnormalised weight, an unbiased estimate of E_p[exp(−ℓ(x0))] where the
    potentials' product is exp(−ℓ(x0)))."""

    log_z: torch.Tensor | None = None


@dataclass
class ParticleMethod:
    """A particle method resolved: the proposal's guidance config and the potential, for :func:`smc`."""

    name: str
    guidance: GuidanceConfig
    potential: Callable
    params: dict = field(default_factory=dict)

    def run(self, denoiser: Denoiser, sampler: Sampler, loss: Callable, **kwargs) -> SMCResult:
        """:func:`smc` with this method's proposal and potential."""
        return smc(denoiser, sampler, self.guidance, loss, potential=self.potential, **kwargs)


def particle_method(name: str, **params) -> ParticleMethod:
    """The particle method ``name`` of :data:`PARTICLE_METHODS`: its potential's parameters by name (``twist_scale``
    for tds, ``lam`` for fk), ``proposal=`` another preset, and the rest the proposal preset's parameters."""
    if name not in PARTICLE_METHODS:
        raise ValueError(f"unknown particle method {name!r}; choose one of {', '.join(PARTICLE_METHODS)}")
    spec = PARTICLE_METHODS[name]
    pot = {k: params.pop(k, v) for k, v in spec["potential_params"].items()}
    proposal = params.pop("proposal", spec["proposal"])
    prop = {}
    if proposal == spec["proposal"]:
        prop = dict(spec["proposal_params"])
        prop.update({k: pot[p] for k, p in spec["tie"].items()})
    prop.update(params)
    if proposal in PROPOSALS:
        fn = PROPOSALS[proposal]
        allowed = inspect.signature(fn).parameters
        bad = [k for k in prop if k not in allowed]
        if bad:
            raise ValueError(f"proposal {proposal!r} has no parameter {', '.join(map(repr, bad))}; its parameters "
                             f"are: {', '.join(allowed)}")  # fmt: skip
        guidance = fn(**prop)
    else:
        try:
            guidance = presets.get(proposal, **prop)
        except ValueError as e:  # name the particle method's own parameters beside its proposal's
            own = ", ".join([*spec["potential_params"], "proposal"])
            raise ValueError(f"particle method {name!r} (proposal {proposal!r}): {e}; {name} itself takes "
                             f"{own}") from None  # fmt: skip
    return ParticleMethod(name=name, guidance=guidance, potential=POTENTIALS[spec["potential"]](**pot),
                          params={"proposal": proposal, **prop, **pot})  # fmt: skip


# -- wrappers the engine steps through ---------------------------------------------------------------
class _Cached:
    """The denoiser, serving a gradient-free call at the x_t of the twist's evaluation from that evaluation."""

    def __init__(self, denoiser: Denoiser):
        self._denoiser = denoiser
        self._key = None
        self._out = None
        self.passes = 0

    def __getattr__(self, name):
        return getattr(self._denoiser, name)

    def put(self, x_t: torch.Tensor, t, alpha: float, sigma: float, out: DenoiserOutput) -> None:
        self._key, self._out = (x_t, t, alpha, sigma), out

    def __call__(self, x_t, t, alpha=None, sigma=None) -> DenoiserOutput:
        key = self._key
        if (key is not None and not torch.is_grad_enabled() and not x_t.requires_grad and key[1:] == (t, alpha, sigma)
                and key[0].shape == x_t.shape and torch.equal(key[0], x_t)):  # fmt: skip
            return self._out
        self.passes += 1
        return self._denoiser(x_t, t, alpha=alpha, sigma=sigma)


class _Recorder:
    """The sampler, recording the (x0_hat, ε) the engine hands its step and what the step returns."""

    def __init__(self, sampler: Sampler):
        self._sampler = sampler
        self.inputs = self.out = None

    def __getattr__(self, name):
        return getattr(self._sampler, name)

    def __len__(self) -> int:
        return len(self._sampler)

    def step(self, x_t, x0_hat, eps, i, generators):
        self.inputs = (x0_hat, eps)
        self.out = self._sampler.step(x_t, x0_hat, eps, i, generators)
        return self.out


def _mean_coefficients(sampler: DDIM, i: int) -> tuple[float, float]:
    """(a, b) of DDIM's mean a·x0_hat + b·ε at step i, read off its own step with the same noise:
    step(x0 = 1) − step(0) and step(ε = 1) − step(0)."""
    one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)

    def step(x0, eps) -> float:
        return float(sampler.step(zero, x0, eps, i, [torch.Generator().manual_seed(0)]))

    base = step(zero, zero)
    return step(one, zero) - base, step(zero, one) - base


def _log_p_over_q(rec: _Recorder, x_q, x0_u, eps_u, coef: tuple[float, float], c: float) -> torch.Tensor:
    """log p(x_q | x_t) − log q(x_q | x_t) = (‖n‖² − ‖x_q − m_p‖²)/(2c²) per row: n = x_q − m_q the step's fresh noise
    and m_p = a·x0_hat + b·ε the unguided mean (m_q: the same of the engine's corrected x0_hat and ε, plus its x_{t'}
    correction)."""
    a, b = coef
    x0_q, eps_q = rec.inputs
    n = rec.out - (a * x0_q + b * eps_q)
    d = x_q - (a * x0_u + b * eps_u)
    sq = lambda v: v.double().flatten(1).pow(2).sum(1)  # noqa: E731
    return (sq(n) - sq(d)) / (2 * c**2)


# -- the sampler -------------------------------------------------------------------------------------
def _count(v, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an integer ≥ {lo}, got {v!r}")
    return int(v)


def _seeds(seeds) -> list[int]:
    if seeds is None or isinstance(seeds, (str, bytes)) or not len(seeds):
        raise ValueError(f"pass seeds=[...] (one or more integers, one result each), got {seeds!r}")
    out = []
    for s in seeds:
        try:
            if isinstance(s, bool):
                raise TypeError
            out.append(operator.index(s))
        except TypeError:
            raise ValueError(f"seed {s!r} ({type(s).__name__}) is not an integer; seeds must be integers") from None
    return out


def check_sampler(engine: GuidanceEngine, sampler: Sampler) -> None:
    """A one-line ValueError where ``sampler`` or the engine's method cannot carry weighted particles (a stateful or
    deterministic sampler, time travel, a noise-aware loss); None where :func:`smc` can run them."""
    cfg = engine.config
    name = type(getattr(sampler, "scheduler", sampler)).__name__
    if sampler.stateful:
        raise ValueError(f"smc resamples and chunks particles, which the stateful multistep sampler {name} cannot "
                         "follow; use DDPM(schedule) or DDIM(schedule, n, eta=1.0)")  # fmt: skip
    if not cfg.enabled:
        return
    if cfg.loss_input == "x_t":
        raise ValueError(
            f"smc's twist is exp(−loss(x0_hat)), but '{cfg.name}' reads its loss at x_t, loss(x_t, t); "
            "pass loss(x0) -> [B] and a proposal that guides through x0_hat (ugd, dps, freedom, ...)"
        )
    if any(engine.recurrences(sampler, i) > 1 for i in range(len(sampler))):
        raise ValueError(f"'{cfg.name}' time-travels (n_recur={cfg.n_recur}), a proposal without a Gaussian density "
                         "for smc's weights; set n_recur=1")  # fmt: skip
    if not (isinstance(sampler, DDIM) and sampler.eta > 0):
        ddim = isinstance(sampler, DDIM)
        what = f"DDIM(eta={sampler.eta:g}) is deterministic" if ddim else f"{name} is not DDIM/DDPM"
        raise ValueError(
            f"smc weighs the guided proposal '{cfg.name}' by its Gaussian step density, but {what}; use "
            "DDPM(schedule) or DDIM(schedule, n, eta=1.0), or guidance=None (FK with the plain sampler)"
        )


def proposal_refusal(guidance: GuidanceConfig, steps: int = 50) -> str | None:
    """Why :func:`smc` cannot take ``guidance`` as its proposal on a stochastic DDIM of ``steps`` steps (time travel, a
    noise-aware loss): :func:`check_sampler`'s one-line message, or None where it can."""
    from lossguide.augment import GaussianJitter
    from lossguide.schedule import NoiseSchedule

    if guidance.loss_input == "x_t":  # the method's own loss form, so the refusal is smc's, not the engine's
        loss = lambda x_t, t: x_t.flatten(1).sum(1)  # noqa: E731
    else:
        loss = lambda x0: x0.flatten(1).sum(1)  # noqa: E731
    engine = GuidanceEngine(guidance, loss, augment=GaussianJitter(0.1))  # any augmentation: only its presence
    try:
        check_sampler(engine, DDIM(NoiseSchedule.linear(), steps, eta=1.0))
    except ValueError as e:
        return str(e)
    return None


def smc(
    denoiser: Denoiser,
    sampler: Sampler,
    guidance: GuidanceConfig | None = None,
    loss: Callable | None = None,
    *,
    particles: int = 16,
    shape: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    potential: str | Callable = "tds",
    resample: str = "systematic",
    ess_threshold: float = 0.5,
    chunk: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    augment: Callable | None = None,
) -> SMCResult:
    """Sequential Monte Carlo with ``particles`` K per seed (TDS, Wu et al. 2023; FK steering, Singhal et al. 2025).

    Args:
        denoiser, sampler: as for :func:`~lossguide.sampling.sample`; with guidance, the sampler must be stochastic
            DDIM/DDPM (the weights need the step's Gaussian density).
        guidance: the proposal, a config of :mod:`lossguide.presets` or :func:`tds_proposal` (None: the plain
            sampler); a :class:`NoiseVarianceStep` without ``eta`` takes the sampler's.
        loss: ``loss(x0) -> [B]``, the per-sample negative log-likelihood −log p(y | x0) + const.
        particles: K per seed.
        shape, seeds: per-sample shape and one seed per result.
        potential: ``"tds"``, ``"fk"`` (λ = 1; :func:`tds_potential`, :func:`fk_potential` for others) or a
            callable ``potential(loss_new [N], loss_old [N] | None, final) -> log G [N]``, called once per step in
            order (``loss_old`` None at the first, ``final`` at ℓ(x0)), whose product over the run is exp(−ℓ(x0))
            for the posterior.
        resample: ``"systematic"``, ``"multinomial"`` or ``"residual"`` (:data:`RESAMPLERS`).
        ess_threshold: resample a seed's particles where ESS/K < this (0: never, 1: at every step).
        chunk: rows of particles per denoiser call (None: all B·K); the results do not depend on it.
        augment: the data's augmentation, where ``guidance`` asks for copies.

    Returns the drawn particle per seed ``x0`` [B, ...]; ``stats`` counts per particle (``nfe``: the denoiser
    passes of one particle, twist evaluations included; a seed costs K times that), sums the per-sample counters
    over a seed's particles, holds the seed's mean guidance loss per step in ``loss_trace``, the drawn particle's
    ℓ(x0) in ``last_loss`` and the ESS [B] of every step's weights, before resampling, and of the final ones in
    ``ess``.
    """
    K = _count(particles, "particles", 1)
    if chunk is not None:
        chunk = _count(chunk, "chunk", 1)
    thr = ess_threshold
    if isinstance(thr, bool) or not isinstance(thr, numbers.Real) or not 0 <= thr <= 1:
        raise ValueError(f"ess_threshold must be a number in [0, 1] (a fraction of K), got {thr!r}")
    if resample not in RESAMPLERS:
        raise ValueError(f"unknown resampling scheme {resample!r}; choose one of {', '.join(RESAMPLERS)}")
    scheme = RESAMPLERS[resample]
    if isinstance(potential, str):
        if potential not in POTENTIALS:
            raise ValueError(f"unknown potential {potential!r}; choose one of {', '.join(POTENTIALS)} or a callable")
        potential = POTENTIALS[potential]()
    elif not callable(potential):
        raise TypeError(f"potential must be 'tds', 'fk' or a callable, got {potential!r}")
    if loss is None:
        raise ValueError("smc weighs particles by the loss: pass loss=callable(x0) -> [B]")
    if shape is None:
        raise ValueError("pass shape=(C, H, W) (per sample)")
    shape = tuple(shape)
    seeds = _seeds(seeds)
    if guidance is not None and isinstance(guidance.rho, NoiseVarianceStep) and guidance.rho.eta is None:
        guidance = guidance.replace(rho=replace(guidance.rho, eta=getattr(sampler, "eta", 0.0)))
    engine = GuidanceEngine(guidance, loss, augment=augment)
    cfg = engine.config
    check_window(cfg, sampler)
    why = mismatch(denoiser.schedule, sampler.schedule)
    if why:
        raise ValueError(f"{why}; build {type(sampler).__name__} on denoiser.schedule (or the model's own scheduler)")
    _check_channels(denoiser, shape, None)
    check_sampler(engine, sampler)
    sampler.reset()

    B, n_steps = len(seeds), len(sampler)
    N = B * K
    step_rows = chunk or N
    chunks = [slice(a, min(a + step_rows, N)) for a in range(0, N, step_rows)]
    gens = [torch.Generator().manual_seed(particle_seed(s, k)) for s in seeds for k in range(K)]
    res_gens = [torch.Generator().manual_seed(resample_seed(s)) for s in seeds]
    plain = GuidanceEngine(None, None)
    cached, rec = _Cached(denoiser), _Recorder(sampler)
    guided = [cfg.enabled and engine.active(sampler, i) for i in range(n_steps)]
    noise = [sampler.sigma(i) if g else 0.0 for i, g in enumerate(guided)]
    n_free = sum(g and c == 0 for g, c in zip(guided, noise, strict=True))
    if n_free:
        log.info("smc: '%s' takes the %d noise-free step(s) unguided (a shifted point mass has no density ratio)",
                 cfg.name, n_free)  # fmt: skip

    x = randn(shape, gens, dtype=dtype, device=device)
    k_T = sampler.scales(0)[0]
    if k_T != 1.0:
        x = k_T * x
    log_w = torch.zeros(B, K, dtype=torch.float64)
    log_z = torch.zeros(B, dtype=torch.float64)
    log_pq = torch.zeros(N, dtype=torch.float64)
    ell_prev = None
    rows = GuidanceStats()
    rows.init(N)
    counts = {"nfe": 0, "denoiser_grads": 0, "loss_evals": 0, "loss_grads": 0}
    ess_trace, loss_trace = [], []

    def weigh(ell: torch.Tensor, final: bool, where) -> None:
        nonlocal log_w
        log_g = potential(ell, ell_prev, final)
        if not isinstance(log_g, torch.Tensor) or log_g.shape != (N,):
            got = tuple(log_g.shape) if isinstance(log_g, torch.Tensor) else type(log_g).__name__
            raise ValueError(f"the potential returned {got} for {N} particles; it must return log G of shape [{N}]")
        log_g = log_g.double().cpu() + log_pq
        log_w = log_w + torch.nan_to_num(log_g, nan=-math.inf, posinf=-math.inf).view(B, K)
        dead = torch.isneginf(log_w).all(1)
        if dead.any():
            log.warning("smc: every particle of %d seed(s) has a non-finite weight at step %s; their weights are "
                        "reset to uniform", int(dead.sum()), where)  # fmt: skip
            log_w[dead] = 0.0
            log_z[dead] = -math.inf
        ess_trace.append(ess(log_w))

    for i in range(n_steps):
        t = sampler.timestep(i)
        a_t, s_t = sampler.levels(i)[:2]
        # the twist at x_t: x0_hat(x_t) and ℓ(x0_hat) of every particle
        x0_u, eps_u, ell = torch.empty_like(x), torch.empty_like(x), torch.empty(N, dtype=torch.float64)
        with torch.no_grad():
            for sl in chunks:
                out = denoiser(x[sl], t, alpha=a_t, sigma=s_t)
                x0_u[sl], eps_u[sl] = out.x0_hat, out.eps
                ell[sl] = _check_loss_output(loss(out.x0_hat), sl.stop - sl.start, "").double().cpu()
        counts["nfe"] += 1
        counts["loss_evals"] += 1
        weigh(ell, False, i)
        # resample the seeds whose ESS/K fell below the threshold
        low = ess_trace[-1] < thr * K
        if low.any():
            idx = torch.arange(N).view(B, K).clone()
            w = torch.softmax(log_w, dim=1)
            for b in low.nonzero().flatten().tolist():
                idx[b] = b * K + scheme(w[b], K, res_gens[b])
            log_z[low] += torch.logsumexp(log_w[low], 1) - math.log(K)
            log_w[low] = 0.0
            idx = idx.flatten()
            x, x0_u, eps_u, ell = x[idx.to(x.device)], x0_u[idx.to(x.device)], eps_u[idx.to(x.device)], ell[idx]
        # the proposal: the engine's (guided) step of every chunk of particles
        weighs_pq = guided[i] and noise[i] > 0
        eng = engine if weighs_pq else plain
        coef = _mean_coefficients(sampler, i) if weighs_pq else None
        x_new = torch.empty_like(x)
        step_loss = torch.full((N,), math.nan, dtype=torch.float64)
        log_pq = torch.zeros(N, dtype=torch.float64)
        for j, sl in enumerate(chunks):
            cs = GuidanceStats()
            cs.init(sl.stop - sl.start)
            cached.put(x[sl], t, a_t, s_t, DenoiserOutput(eps=eps_u[sl], x0_hat=x0_u[sl]))
            before = cached.passes
            x_new[sl] = eng.step(cached, rec, x[sl], i, gens[sl], cs).detach()
            if weighs_pq:
                log_pq[sl] = _log_p_over_q(rec, x_new[sl], x0_u[sl], eps_u[sl], coef, noise[i]).cpu()
            for name in ("skipped", "zero_grad", "overflow"):
                getattr(rows, name)[sl] += getattr(cs, name)
            if cs.loss_trace:
                step_loss[sl] = cs.loss_trace[-1][2].double()
            if j == 0:
                counts["nfe"] += cached.passes - before
                for name in ("denoiser_grads", "loss_evals", "loss_grads"):
                    counts[name] += getattr(cs, name)
        if weighs_pq:
            loss_trace.append((i, t, step_loss.view(B, K).mean(1)))
        x, ell_prev = x_new, ell

    # the final weight with ℓ(x0), then one particle per seed
    ell = torch.empty(N, dtype=torch.float64)
    with torch.no_grad():
        for sl in chunks:
            ell[sl] = _check_loss_output(loss(x[sl]), sl.stop - sl.start, "").double().cpu()
    counts["loss_evals"] += 1
    weigh(ell, True, "final")
    log_z += torch.logsumexp(log_w, 1) - math.log(K)
    w = torch.softmax(log_w, dim=1)
    pick = torch.tensor([b * K + int(multinomial(w[b], 1, res_gens[b])) for b in range(B)])

    stats = GuidanceStats(**counts)
    stats.init(B)
    for name in ("skipped", "zero_grad", "overflow"):
        setattr(stats, name, getattr(rows, name).view(B, K).sum(1))
    stats.last_loss = ell[pick].clone()
    stats.loss_trace = loss_trace
    stats.ess = ess_trace
    summary = guidance_summary(stats)
    if summary:
        log.warning("smc '%s': %s (summed over each seed's %d particles)", cfg.name, summary, K)
    return SMCResult(x0=x[pick.to(x.device)], stats=stats, log_z=log_z)
