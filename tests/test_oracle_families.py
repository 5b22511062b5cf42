"""The Gaussian-mixture oracle under every schedule family: its exact denoiser and noise-aware losses read the
levels (α_t, σ_t) of rectified-flow and VE schedules (and a σ-space sampler's fractional VP timesteps) instead of
truncating t to an integer, and agree with the mixture's posterior computed directly in those coordinates."""

import math

import pytest
import torch

import lossguide as lg
from lossguide.oracle import class_task, linear_task
from lossguide.schedule import FlowSchedule, NoiseSchedule, SigmaSchedule

F64 = torch.float64


def _mvn_logpdf(x, mean, cov):
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)


def _direct_posterior(prior, x, a, s):
    """In the family's own coordinates x_t = a·x0 + s·ε: w_k ∝ π_k N(x_t; a·m_k, a²C_k + s²I), and per component the
    Gaussian posterior μ_k = m_k + a·C_k S_k⁻¹(x_t − a·m_k), Σ_k = C_k − a²·C_k S_k⁻¹ C_k."""
    eye = torch.eye(prior.dim, dtype=F64)
    logw, mus, covs = [], [], []
    for k in range(prior.n_components):
        m, C = prior.means[k], prior.covs[k]
        S = a**2 * C + s**2 * eye
        logw.append(prior.weights[k].log() + _mvn_logpdf(x, a * m, S))
        gain = a * C @ torch.linalg.inv(S)
        mus.append(m + (x - a * m) @ gain.T)
        covs.append(C - a * gain @ C)
    logw = torch.stack(logw, 1)
    return logw - torch.logsumexp(logw, 1, keepdim=True), torch.stack(mus, 1), covs


CASES = [(FlowSchedule(), 0.2), (FlowSchedule(), 0.55), (FlowSchedule(), 0.9), (SigmaSchedule(), 0.3),
         (SigmaSchedule(), 4.0)]  # fmt: skip


@pytest.mark.parametrize("schedule, t", CASES, ids=[f"{s.family}-{t}" for s, t in CASES])
def test_exact_denoiser_is_the_posterior_mean_in_every_family(prior, schedule, t):
    """x0_hat = E[x0 | x_t]: the VP oracle at the VP-equivalent ᾱ = α²/(α² + σ²) on x_t/k, k = √(α² + σ²), and the
    mixture posterior computed directly in (α, σ) coordinates; x_t = α·x0_hat + σ·ε_hat."""
    a, s = schedule.alpha(t), schedule.sigma(t)
    k, ab = math.hypot(a, s), schedule.at(t)
    x0, _ = prior.sample(64, torch.Generator().manual_seed(0))
    x_t = a * x0 + s * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = prior.denoiser(schedule)(x_t, t)
    torch.testing.assert_close(out.x0_hat, prior.x0_mean(x_t / k, ab), rtol=0, atol=1e-10)
    logw, mus, _ = _direct_posterior(prior, x_t, a, s)
    torch.testing.assert_close(out.x0_hat, (logw.exp().unsqueeze(-1) * mus).sum(1), rtol=0, atol=1e-10)
    torch.testing.assert_close(a * out.x0_hat + s * out.eps, x_t, rtol=0, atol=1e-12)


def test_exact_denoiser_at_pure_noise_and_at_sampler_levels(prior):
    """Flow t = 1 (α = 0): x0_hat = E[x0]. Levels handed in by a sampler (a σ-space scheduler at a fractional VP
    timestep, in VP units (1, σ)/√(1 + σ²)) are used as given; integer VP timesteps keep the schedule's own ᾱ."""
    x = torch.randn(8, prior.dim, generator=torch.Generator().manual_seed(2), dtype=F64)
    out = prior.denoiser(FlowSchedule())(x, 1.0)
    torch.testing.assert_close(out.x0_hat, prior.mean().expand_as(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.eps, x, rtol=0, atol=1e-12)
    vp = NoiseSchedule.linear()
    sig = 1.7
    got = prior.denoiser(vp)(x, 412.37, alpha=1 / math.hypot(1, sig), sigma=sig / math.hypot(1, sig))
    torch.testing.assert_close(got.eps, prior.eps(x, 1 / (1 + sig**2)), rtol=0, atol=1e-12)
    assert torch.equal(prior.denoiser(vp)(x, 400).eps, prior.eps(x, vp.at(400)))


def test_noise_aware_losses_in_flow_coordinates(prior):
    """−log p(k | x_t) and −log p(y | x_t) under a FlowSchedule equal the mixture's computed directly at (1 − t, t)
    (and a fractional VP timestep, whose ᾱ the schedule does not have, is a clear error)."""
    schedule, t = FlowSchedule(), 0.4
    a, s = schedule.alpha(t), schedule.sigma(t)
    x0, _ = prior.sample(16, torch.Generator().manual_seed(3))
    x_t = a * x0 + s * torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    logw, mus, covs = _direct_posterior(prior, x_t, a, s)
    task = class_task(prior, schedule)
    y = int(task.name.split("-")[1])
    torch.testing.assert_close(task.noisy_loss(x_t, t), -logw[:, y], rtol=0, atol=1e-10)
    lin = linear_task(prior, schedule)
    A, yv, tau = _linear_measurement(prior)
    lik = torch.stack([_mvn_logpdf(yv.expand(len(x_t), -1), mus[:, k] @ A.T,
                                   A @ covs[k] @ A.T + tau**2 * torch.eye(len(yv), dtype=F64))
                       for k in range(prior.n_components)], 1)  # fmt: skip
    torch.testing.assert_close(lin.noisy_loss(x_t, t), -torch.logsumexp(lik + logw, 1), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="not a training timestep"):
        class_task(prior, NoiseSchedule.linear()).noisy_loss(x_t, 412.37)


def _linear_measurement(prior, n_meas=2, noise_std=0.2, seed=1):
    """linear_task's A, y and s, drawn the same way."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n_meas, prior.dim, generator=g, dtype=F64) / prior.dim**0.5
    x_star, _ = prior.sample(1, g)
    return A, (x_star @ A.T)[0] + noise_std * torch.randn(n_meas, generator=g, dtype=F64), noise_std


def test_exact_classifier_guidance_on_flow_samples_the_target_component(prior):
    """cg with the exact −log p(y | x_t) on rectified flow (FlowEuler, 100 steps) samples component y: mean within
    5 standard errors + 0.02 (the ODE's discretisation), covariance within 0.03."""
    schedule = FlowSchedule()
    task = class_task(prior, schedule)
    target = task.posterior
    res = lg.sample(prior.denoiser(schedule), lg.FlowEuler(schedule, 100), lg.preset("cg"), task.noisy_loss,
                    shape=(prior.dim,), seeds=range(1000), dtype=F64)  # fmt: skip
    x = res.x0
    se = (target.covs[0].diagonal() / len(x)).sqrt()
    assert ((x.mean(0) - target.means[0]).abs() < 5 * se + 0.02).all(), (x.mean(0), target.means[0])
    torch.testing.assert_close(torch.cov(x.T), target.covs[0], atol=0.03, rtol=0.0)


# -- the exact oracle in every family: sampling, exact guidance, presets, batch invariance -------------------------
#
# Bounds. The noise floor of the sliced W2 distance (metrics.sliced_wasserstein, 256 directions) at N samples is
# SW between two independent exact sample sets of N; a sampler with the exact denoiser is judged by SW between its N
# samples and independent exact sets of N (both averaged over 4 exact sets and their 6 pairs), so an exact sampler
# scores ≈ 1× the floor and the discretisation error of 100 Euler steps (32 Heun steps) is what is left (measured:
# 0.93-0.96× unguided, 1.02-1.13× with cg; 10 Euler steps score 1.6×, cg at scale 0.8 or 1.25 2.4× and 1.7×).
# Component weights are read off by the clean classifier (argmax p(k | x0)) and compared with the exact frequencies of
# that label (200,000 exact samples), within 3 standard errors √(q(1 − q)/N).

from functools import cache  # noqa: E402

from lossguide.harness.tasks import method_loss  # noqa: E402
from lossguide.harness.tasks.oracle import load_settings, method_config, oracle_tasks, posterior_samples  # noqa: E402  # noqa: E402
from lossguide.metrics import sliced_wasserstein  # noqa: E402
from lossguide.oracle import default_mixture  # noqa: E402
from lossguide.presets import PRESETS  # noqa: E402
from lossguide.samplers import DDIM, EDMEuler, EDMHeun, FlowEuler  # noqa: E402

N_EXACT = 1000
FLOOR_FACTOR = 1.5
SAMPLERS = {
    "flow-euler100": lambda: FlowEuler(FlowSchedule(), 100),
    "flow-ddim100-eta1": lambda: DDIM(FlowSchedule(), 100, eta=1.0),
    "ve-euler100": lambda: EDMEuler(SigmaSchedule(), 100),
    "ve-heun32": lambda: EDMHeun(SigmaSchedule(), 32),
}


def _draw(mixture, n, seed):
    return mixture.sample(n, torch.Generator().manual_seed(seed))[0]


@cache
def _label_freq():
    prior = default_mixture()
    big = _draw(prior, 200_000, 7)
    return torch.bincount(prior.component_log_posterior(big, 1.0).argmax(1), minlength=prior.n_components) / len(big)


def _floor_check(x, mixture, n_sets=4):
    """(SW(x, exact), SW(exact, exact')): the mean SW of x to ``n_sets`` independent exact sets of len(x), and the
    mean SW between the pairs of those sets (the noise floor; averaging steadies both estimates)."""
    ref = [_draw(mixture, len(x), 1 + j) for j in range(n_sets)]
    sw = sum(sliced_wasserstein(x, r) for r in ref) / n_sets
    pairs = [(i, j) for i in range(n_sets) for j in range(i + 1, n_sets)]
    return sw, sum(sliced_wasserstein(ref[i], ref[j]) for i, j in pairs) / len(pairs)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_unguided_sampling_reproduces_the_mixture_in_every_family(prior, name):
    """Unguided, the exact denoiser under FlowSchedule (FlowEuler; stochastic DDIM η = 1) and SigmaSchedule (EDM
    Euler and Heun) samples the mixture: SW to exact samples ≤ 1.5× the noise floor, label frequencies within
    3 standard errors of the exact ones."""
    sampler = SAMPLERS[name]()
    x = lg.sample(prior.denoiser(sampler.schedule), sampler, shape=(prior.dim,), seeds=range(N_EXACT), dtype=F64).x0
    sw, floor = _floor_check(x, prior)
    assert sw <= FLOOR_FACTOR * floor, (name, sw, floor)
    q = _label_freq()
    freq = torch.bincount(prior.component_log_posterior(x, 1.0).argmax(1), minlength=prior.n_components) / len(x)
    se = (q * (1 - q) / len(x)).sqrt()
    assert ((freq - q).abs() <= 3 * se).all(), (name, freq.tolist(), q.tolist())


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_exact_classifier_guidance_lands_at_the_noise_floor_in_every_family(prior, name):
    """cg with the exact −log p(y | x_t) (the family's own (α_t, σ_t)) samples p(x0 | y) to within 1.5× the noise
    floor (as tests/test_oracle.py checks on VP with DDPM-200)."""
    sampler = SAMPLERS[name]()
    task = class_task(prior, sampler.schedule)
    res = lg.sample(prior.denoiser(sampler.schedule), sampler, lg.preset("cg"), task.noisy_loss, shape=(prior.dim,),
                    seeds=range(N_EXACT), dtype=F64)  # fmt: skip
    sw, floor = _floor_check(res.x0, task.posterior)
    assert sw <= FLOOR_FACTOR * floor, (name, sw, floor)


#: the sampler of each family for the preset comparison: DDIM-50 (η = 0), as ``lossguide oracle`` runs VP (on flow
#: it is FlowEuler step for step); EDM Euler-50 on VE
def _diffusers(name: str, **kw):
    import diffusers

    from lossguide.samplers import DiffusersSampler

    return lambda: DiffusersSampler(getattr(diffusers, name)(**kw), 50)


_LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
PRESET_SAMPLERS = {
    "flow": lambda: DDIM(FlowSchedule(), 50),
    "ve": lambda: EDMEuler(SigmaSchedule(), 50),
    # the diffusers scheduler of each family (σ-space Euler steps a VP state in σ = √((1−ᾱ)/ᾱ))
    "flow-diffusers": _diffusers("FlowMatchEulerDiscreteScheduler"),
    "sigma-diffusers": _diffusers("EulerDiscreteScheduler", **_LINEAR),
    "vp-diffusers": _diffusers("DPMSolverMultistepScheduler", **_LINEAR),
}
#: schedulers that count their own steps cannot time-travel (a one-line error says so), so shen2024 is not run
#: there: without time travel it needs its own η (at the stored η = 0.3 with s = 1 it diverges even on VP DDIM,
#: SW 3.9 against none's 0.65)
NO_TIME_TRAVEL = {"flow-diffusers", "sigma-diffusers", "vp-diffusers"}
N_PRESET = 256


@cache
def _preset_sw(family: str, kind: str, method: str) -> float:
    """SW to 4,096 exact posterior samples of ``method`` at the stored oracle settings (``oracle-class`` /
    ``oracle-linear``, as ``lossguide oracle`` runs them), seeds 0..255."""
    sampler = PRESET_SAMPLERS[family]()
    task = {t.name.split("-")[0]: t for t in oracle_tasks(sampler.schedule)}[kind]
    cfg = method_config(method, dict(load_settings().get(kind, {}).get(method, {})))
    loss = method_loss(cfg, task.loss, lambda: task.noisy_loss)
    x = lg.sample(task.prior.denoiser(sampler.schedule), sampler, cfg, loss, shape=(task.prior.dim,),
                  seeds=range(N_PRESET), dtype=F64).x0  # fmt: skip
    assert torch.isfinite(x).all(), (family, kind, method)
    return sliced_wasserstein(x, posterior_samples(task))


GUIDED = [m for m in PRESETS if m != "none"]


@pytest.mark.filterwarnings("ignore:.*guidance did nothing")
@pytest.mark.parametrize("kind", ["class", "linear"])
@pytest.mark.parametrize("family", list(PRESET_SAMPLERS))
@pytest.mark.parametrize("method", GUIDED)
def test_every_preset_beats_none_in_every_family(family, kind, method):
    """At the stored oracle settings (tuned on VP) every guided preset is closer to the exact posterior than
    unguided sampling on rectified flow and VE too (the VP claim of tests/test_oracle.py)."""
    if method == "shen2024" and family in NO_TIME_TRAVEL:
        pytest.skip("shen2024 time-travels; this scheduler counts its own steps and refuses time travel")
    if method == "cg" and family == "sigma-diffusers":  # cg reads the noise-aware ℓ(x_t, t)
        # the oracle's noise-aware loss reads ᾱ at the training timestep: a σ-space scheduler's fractional
        # timesteps are refused in one line, never silently truncated
        with pytest.raises(ValueError, match="not a training timestep of the VP schedule"):
            _preset_sw(family, kind, method)
        return
    if method == "naive_grad" and family == "ve":
        # measured (seeds 0-255, EDM Euler 50): ε̂ = ε + scale·σ_t·∇ℓ(x_t) moves x by ≈ scale·σ_t²·∇ℓ, and σ_max = 80,
        # so the VP-tuned scale (0.1 / 0.003) overflows |x| > 1e6; the best of scale ∈ {1e-5 … 0.1} barely moves SW
        # (class 0.634 at 1e-4 vs none's 0.646, linear 0.188 at 1e-5 vs 0.197): a clean loss read at a VE x_t is
        # the naive baseline's known failure, kept visible
        pytest.xfail("naive_grad's VP-tuned scale overflows at VE noise levels (σ_max = 80)")
    if method == "ggdm" and kind == "linear":
        # measured: at its default σ = 0.1 Lemma 1's β_t over-guides the linear task's negative log-likelihood in
        # every family (σ = √½, the exact reading for such a loss, gives SW 0.07-0.08 against none's 0.20); a known
        # failure of the default, kept visible
        pytest.xfail("ggdm's default sigma=0.1 over-guides the oracle's linear-measurement NLL")
    d, base = _preset_sw(family, kind, method), _preset_sw(family, kind, "none")
    assert d < base, (family, kind, method, d, base)


DETERMINISM = {
    "flow-euler": (lambda: FlowEuler(FlowSchedule(), 20), "shen2024", {}),
    "flow-ddim-eta1": (lambda: DDIM(FlowSchedule(), 20, eta=1.0), "lgd_mc", {}),
    "ve-euler": (lambda: EDMEuler(SigmaSchedule(), 20), "shen2024", {}),
    "ve-heun": (lambda: EDMHeun(SigmaSchedule(), 12), "shen2024", {"n_recur": 1}),  # Heun cannot time-travel
}


@pytest.mark.filterwarnings("ignore:.*guidance did nothing")
@pytest.mark.parametrize("name", list(DETERMINISM))
def test_batch_invariance_and_determinism_in_every_family(prior, name):
    """Sample k alone equals sample k in a batch (≤ 1e-6, float64) and a rerun is bit-identical, with guidance
    that draws per-sample randomness (shen2024: augmentation copies and time-travel noise; lgd_mc: Monte-Carlo
    draws, on the stochastic DDIM).

    The bound: float64 kernels may round the last bit differently for another batch shape, and the trajectory
    amplifies one ulp: x_T·(1 + 2⁻⁵²) moves the final sample by up to 2.6e-13 (flow Euler), 5.8e-9 (VE Euler) and
    3.2e-8 (VE Heun) over seeds 0-39. Measured alone-vs-batch differences: ≤ 4.4e-15 on one CPU (1 and 2 threads,
    40 seeds), 1.07e-9 (VE Heun) on another; 1e-6 is 30× the largest one-ulp amplification."""
    make, method, extra = DETERMINISM[name]
    schedule = make().schedule
    task = class_task(prior, schedule)
    cfg = method_config(method, {**load_settings().get("class", {}).get(method, {}), **extra})
    loss = method_loss(cfg, task.loss, lambda: task.noisy_loss)

    def run(seeds):
        return lg.sample(prior.denoiser(schedule), make(), cfg, loss, shape=(prior.dim,), seeds=seeds, dtype=F64).x0

    seeds = [11, 3, 7, 5, 2]
    batch = run(seeds)
    assert torch.equal(batch, run(seeds))
    for k in (0, 2):
        torch.testing.assert_close(run([seeds[k]])[0], batch[k], rtol=0, atol=1e-6)
