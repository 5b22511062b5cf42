"""Unguided samplers: step-for-step parity with diffusers, and exact reproduction of the oracle mixture."""

import pytest
import torch

from lossguide import DDIM, DDPM, DiffusersSampler, preset, sample
from lossguide.metrics import sliced_wasserstein
from lossguide.rng import make_generators, randn
from lossguide.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")


def _diffusers_loop(scheduler, den, x, n_steps, gens=None, **kw):
    scheduler.set_timesteps(n_steps)
    xs = []
    for t in scheduler.timesteps:
        eps = den(x, int(t)).eps
        extra = {"generator": gens} if gens is not None else {}
        x = scheduler.step(eps, t, x, **extra, **kw).prev_sample
        xs.append(x)
    return xs


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_step_for_step(prior, eta):
    """Same ᾱ, same model, same noise: the same x at every step, to float32 precision (diffusers computes
    its step coefficients from float32 alphas_cumprod)."""
    sch = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True
    )
    schedule = NoiseSchedule.from_diffusers(sch)
    den = prior.denoiser(schedule)
    seeds = range(6)
    x_T = randn((prior.dim,), make_generators(seeds), dtype=torch.float64)
    ref = _diffusers_loop(sch, den, x_T.clone(), 20, gens=make_generators([s + 100 for s in seeds]), eta=eta)
    ours, x, gens = [], x_T.clone(), make_generators([s + 100 for s in seeds])
    sampler = DDIM(schedule, 20, eta=eta)
    for i in range(len(sampler)):
        out = den(x, int(sampler.timesteps[i]))
        x = sampler.step(x, out.x0_hat, out.eps, i, gens)
        ours.append(x)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_ddpm_matches_diffusers_ddpm_scheduler(prior):
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    schedule = NoiseSchedule.from_diffusers(sch)
    den = prior.denoiser(schedule)
    x_T = randn((prior.dim,), make_generators(range(4)), dtype=torch.float64)
    ref = _diffusers_loop(sch, den, x_T.clone(), 40, gens=make_generators(range(10, 14)))
    res = sample(
        den, DDPM(schedule, 40), x_T=x_T.clone(), generators=make_generators(range(10, 14)), dtype=torch.float64
    )
    torch.testing.assert_close(res.x0, ref[-1], rtol=1e-5, atol=1e-5)


def test_diffusers_sampler_path_equals_our_ddim(prior):
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    schedule = NoiseSchedule.from_diffusers(sch)
    den = prior.denoiser(schedule)
    a = sample(den, DiffusersSampler(sch, 25), shape=(prior.dim,), seeds=range(8), dtype=torch.float64).x0
    b = sample(den, DDIM(schedule, 25), shape=(prior.dim,), seeds=range(8), dtype=torch.float64).x0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_diffusers_sampler_rejects_unsupported_sigma_space_and_clamping_schedulers():
    """Euler/Heun/LMS σ-space schedulers are stepped (tests/test_flow.py); others in σ-space are refused."""
    with pytest.raises(ValueError, match="σ-space"):
        DiffusersSampler(diffusers.KDPM2DiscreteScheduler(), 10)
    with pytest.raises(ValueError, match="clip_sample=False"):
        DiffusersSampler(diffusers.DDIMScheduler(), 10)  # diffusers' default clamps x0_hat


@pytest.mark.parametrize("make", [lambda s: DDIM(s, 50), lambda s: DDIM(s, 50, eta=1.0), lambda s: DDPM(s, 100)])
def test_unguided_samplers_reproduce_the_mixture(prior, schedule, make):
    """With the exact denoiser, samples match the mixture: SW at the two-sample noise floor, weights within 4σ."""
    n = 1000
    x = sample(prior.denoiser(schedule), make(schedule), shape=(prior.dim,), seeds=range(n), dtype=torch.float64).x0
    ref, _ = prior.sample(n, torch.Generator().manual_seed(7))
    ref2, _ = prior.sample(n, torch.Generator().manual_seed(8))
    floor = sliced_wasserstein(ref, ref2)
    assert sliced_wasserstein(x, ref) < 2.0 * floor + 0.01
    k = prior.component_log_posterior(x, 1.0).argmax(1)
    freq = torch.bincount(k, minlength=prior.n_components).double() / n
    se = (prior.weights * (1 - prior.weights) / n).sqrt()
    assert ((freq - prior.weights).abs() < 4 * se).all(), (freq, prior.weights)


def test_renoise_has_the_right_marginal(schedule):
    """Time travel maps N(0, v_{t'}) data at level t' to the level-t marginal: for x0 ~ N(0, c²I),
    x_{t'} has variance ᾱ_{t'}c² + 1 − ᾱ_{t'} and the re-noised x_t must have ᾱ_t c² + 1 − ᾱ_t."""
    sampler = DDIM(schedule, 10)
    i, c, n = 3, 0.3, 200_000
    ab_t, ab_prev = sampler.alpha_bars(i)
    g = torch.Generator().manual_seed(0)
    x_prev = torch.randn(n, 1, generator=g, dtype=torch.float64) * (ab_prev * c**2 + 1 - ab_prev) ** 0.5
    gens = [torch.Generator().manual_seed(1)]
    x_t = sampler.renoise(x_prev.T, i, gens).T  # one "sample" with n coordinates
    assert abs(float(x_t.var()) - (ab_t * c**2 + 1 - ab_t)) < 0.01


def _target_loss(x0):
    return ((x0 - 0.7) ** 2).flatten(1).sum(1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear"),
        lambda: diffusers.PNDMScheduler(num_train_timesteps=1000, beta_schedule="linear", skip_prk_steps=True),
        lambda: diffusers.PNDMScheduler(num_train_timesteps=1000, beta_schedule="linear"),
        lambda: diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear"),
        lambda: diffusers.DEISMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear"),
    ],
)
def test_a_reused_multistep_sampler_repeats_its_first_call(prior, make):
    """sample() resets the scheduler: a second call with the same seeds is bit-identical to the first, and to a
    fresh sampler (without the reset, multistep history leaks in: DPMSolver raises, PNDM silently differs)."""
    sch = make()
    den = prior.denoiser(NoiseSchedule.from_diffusers(sch))
    sampler = DiffusersSampler(sch, 8)
    guided = dict(guidance=preset("freedom", scale=0.05), loss=_target_loss)
    if sampler.overwrites_x_prev(0):
        guided = dict(guidance=preset("cg", scale=0.05), loss=lambda x_t, t: _target_loss(x_t))
    for kw in ({}, guided):
        runs = [sample(den, sampler, shape=(prior.dim,), seeds=range(4), dtype=torch.float64, **kw).x0 for _ in "ab"]
        fresh = sample(den, DiffusersSampler(make(), 8), shape=(prior.dim,), seeds=range(4), dtype=torch.float64, **kw)
        assert torch.isfinite(runs[0]).all()
        assert torch.equal(runs[0], runs[1])
        assert torch.equal(runs[0], fresh.x0)


def test_a_sampler_sharing_its_scheduler_gets_its_own_timesteps_back(prior):
    """Two samplers on one scheduler object: each sample() call restores its own step count."""
    sch = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
    den = prior.denoiser(NoiseSchedule.from_diffusers(sch))
    a = DiffusersSampler(sch, 8)
    first = sample(den, a, shape=(prior.dim,), seeds=range(3), dtype=torch.float64).x0
    DiffusersSampler(sch, 20)  # calls set_timesteps(20) on the shared scheduler
    again = sample(den, a, shape=(prior.dim,), seeds=range(3), dtype=torch.float64)
    assert len(a) == 8 and torch.equal(first, again.x0) and again.stats.nfe == 8


def test_unipc_corrector_is_refused_for_guidance_on_x_prev(prior):
    """UniPC's corrector rebuilds x_{t'} from the step's input: guidance added to x_{t'} would vanish, so it is
    refused with the fix; with disable_corrector (or guidance on ε) it runs and the guidance moves the samples."""
    make = lambda **kw: diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", **kw)  # noqa: E731
    den = prior.denoiser(NoiseSchedule.from_diffusers(make()))
    run = dict(shape=(prior.dim,), seeds=range(4), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"disable_corrector=list\(range\(8\)\)"):
        sample(den, DiffusersSampler(make(), 8), preset("freedom", scale=0.05), _target_loss, **run)
    # guidance only where t/T ≤ 0.15 acts on the last step (t = 125), whose x_{t'} no corrector rewrites
    late = preset("freedom", scale=0.05).replace(window=(0.0, 0.15))
    res = sample(den, DiffusersSampler(make(), 8), late, _target_loss, **run)
    assert len(res.stats.loss_trace) == 1 and res.stats.loss_trace[0][1] == 125
    plain = sample(den, DiffusersSampler(make(disable_corrector=list(range(8))), 8), **run).x0
    guided = sample(
        den,
        DiffusersSampler(make(disable_corrector=list(range(8))), 8),
        preset("freedom", scale=0.05),
        _target_loss,
        **run,
    ).x0
    assert float(_target_loss(guided).mean()) < float(_target_loss(plain).mean()) - 1e-3
    eps_guided = sample(den, DiffusersSampler(make(), 8), preset("ugd", scale=0.05, n_iter=0), _target_loss, **run).x0
    assert not torch.equal(eps_guided, sample(den, DiffusersSampler(make(), 8), **run).x0)
