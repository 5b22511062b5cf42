"""One schedule contract x_t = α_t·x0 + σ_t·ε for VP, rectified flow and VE/EDM: conversions, time travel,
step-for-step parity with diffusers' flow-matching and σ-space schedulers, and exact Gaussian sampling."""

import inspect
import math

import pytest
import torch

from lossguide import preset, sample
from lossguide.denoiser import Denoiser, from_diffusers
from lossguide.rng import make_generators, randn
from lossguide.samplers import DDIM, DiffusersSampler, EDMEuler, EDMHeun, FlowEuler
from lossguide.schedule import FlowSchedule, NoiseSchedule, SigmaSchedule

diffusers = pytest.importorskip("diffusers")

F64 = torch.float64
D = 3  # data dimension of the toy problems
W = torch.randn(D, D, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.5


def _toy(x, tt):
    """A fixed smooth nonlinear velocity 'network' u(x, timestep), for step-for-step comparisons."""
    return torch.tanh(x @ W.T + tt.to(x.dtype).view(-1, 1) / 1000) - 0.3 * x


def _toy_eps(x, tt):
    """A fixed ε-'network' of the VP input: ε ≈ x plus a bounded perturbation, so x0_hat stays O(1)."""
    return x + 0.1 * torch.tanh(x @ W.T + tt.to(x.dtype).view(-1, 1) / 1000)


def _trajectory(den, sampler, x_T, **kw):
    xs = []
    sample(den, sampler, x_T=x_T.clone(), dtype=F64, callback=lambda d: xs.append(d["x"]), **kw)
    return xs


def _max_diff(ours, ref, scale=None):
    assert len(ours) == len(ref)
    scale = scale or [1.0] * len(ref)
    return max(float((a - b).abs().max()) / k for a, b, k in zip(ours, ref, scale, strict=True))


# -- conversions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, t",
    [(NoiseSchedule.linear(), 400), (FlowSchedule(), 0.3), (FlowSchedule(), 1.0), (SigmaSchedule(), 2.5)],
)
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction", "flow_prediction"])
def test_each_prediction_type_recovers_x0_and_eps_in_each_family(schedule, t, pred):
    """A network that outputs the exact ε, x0, v = (α·ε − σ·x0)/k or u = ε − x0 of a known (x0, ε) gives back that
    x0 and ε, and x_t = α·x0_hat + σ·ε_hat."""
    if t == 1.0 and pred == "epsilon":
        pytest.skip("ε-prediction cannot give x0 at α = 0 (pure noise)")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, D, generator=g, dtype=F64), torch.randn(5, D, generator=g, dtype=F64)
    a, s = schedule.alpha(t), schedule.sigma(t)
    k = math.hypot(a, s)
    x_t = a * x0 + s * eps
    out = {"epsilon": eps, "sample": x0, "v_prediction": (a * eps - s * x0) / k, "flow_prediction": eps - x0}[pred]
    res = Denoiser(lambda x, tt: out, schedule, pred)(x_t, t)
    torch.testing.assert_close(res.x0_hat, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.eps, eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(a * res.x0_hat + s * res.eps, x_t, rtol=0, atol=1e-12)
    assert schedule.at(t) == pytest.approx(a**2 / (a**2 + s**2), abs=1e-15)


def test_family_mismatch_and_bad_times_are_refused():
    den = Denoiser(_toy, FlowSchedule(), "flow_prediction")
    with pytest.raises(ValueError, match="schedule is rectified flow.* but the sampler steps VP"):
        sample(den, DDIM(NoiseSchedule.linear(), 4), shape=(D,), seeds=range(2))
    with pytest.raises(ValueError, match="FlowEuler steps a 'flow' schedule"):
        FlowEuler(SigmaSchedule(), 4)
    with pytest.raises(ValueError, match="strictly decreasing"):
        FlowEuler(times=[0.5, 0.7])


def test_default_inference_times():
    """Flow: t_i = shift·s/(1 + (shift − 1)·s) for s = 1 − i/n (SD3's shift); VE: Karras et al.'s ρ = 7 σ's, as
    diffusers computes them from the same σ_min, σ_max."""
    s = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=F64)
    torch.testing.assert_close(FlowSchedule(shift=3.0).times(4), 3 * s / (1 + 2 * s))
    sch = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True)
    sch.set_timesteps(12)
    ours = SigmaSchedule(float(sch.sigmas[-2]), float(sch.sigmas[0])).times(12)
    torch.testing.assert_close(ours, sch.sigmas[:-1].to(F64), rtol=1e-6, atol=0)


SAMPLERS = {
    "ddim-vp": lambda: DDIM(NoiseSchedule.linear(), 8),
    "ddim-flow": lambda: DDIM(FlowSchedule(), 8, eta=1.0),
    "flow-euler": lambda: FlowEuler(FlowSchedule(shift=3.0), 8),
    "edm-euler": lambda: EDMEuler(SigmaSchedule(), 8),
    "edm-heun": lambda: EDMHeun(SigmaSchedule(), 8),
    "diffusers-flow": lambda: DiffusersSampler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), 8),
    "diffusers-euler": lambda: DiffusersSampler(diffusers.EulerDiscreteScheduler(), 8),
    "diffusers-heun": lambda: DiffusersSampler(diffusers.HeunDiscreteScheduler(), 8),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_reports_one_consistent_level_per_step(name):
    """(α_t, σ_t) → (α_{t'}, σ_{t'}) chain from step to step and end clean (σ = 0), ᾱ is α²/(α² + σ²) of both,
    and the window fraction falls from ≤ 1 to ≥ 0."""
    sampler = SAMPLERS[name]()
    n = len(sampler)
    for i in range(n):
        a, s, a_p, s_p = sampler.levels(i)
        ab, ab_p = sampler.alpha_bars(i)
        assert ab == pytest.approx(a**2 / (a**2 + s**2), rel=1e-6)
        assert ab_p == pytest.approx(a_p**2 / (a_p**2 + s_p**2), rel=1e-6)
        if i + 1 < n:
            assert sampler.levels(i + 1)[:2] == pytest.approx((a_p, s_p), rel=1e-9)
    assert sampler.levels(n - 1)[3] == pytest.approx(0.0, abs=1e-6)
    frac = [sampler.fraction(i) for i in range(n)]
    assert 1 >= frac[0] and frac[-1] >= 0 and all(f1 >= f2 for f1, f2 in zip(frac, frac[1:], strict=False))


# -- time travel --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler",
    [DDIM(NoiseSchedule.linear(), 10), FlowEuler(FlowSchedule(shift=3.0), 10), EDMEuler(SigmaSchedule(), 10)],
    ids=["vp", "flow", "ve"],
)
def test_renoise_has_the_marginal_of_the_noisier_level(sampler):
    """x_{t'} = α_{t'}·x0 + σ_{t'}·ε with x0 fixed → renoised x_t has mean α_t·x0 and variance σ_t²
    (n = 200 000 coordinates: tolerance 5 standard errors, σ_t/√n for the mean, σ_t²·√(2/n) for the variance)."""
    i, x0, n = 3, 0.7, 200_000
    a_t, s_t, a_p, s_p = sampler.levels(i)
    z = torch.randn(1, n, generator=torch.Generator().manual_seed(0), dtype=F64)
    x_t = sampler.renoise(a_p * x0 + s_p * z, i, [torch.Generator().manual_seed(1)])
    assert abs(float(x_t.mean()) - a_t * x0) < 5 * s_t / n**0.5
    assert abs(float(x_t.var()) - s_t**2) < 5 * s_t**2 * (2 / n) ** 0.5


# -- step-for-step parity with diffusers --------------------------------------------------------------------


def test_flow_euler_matches_flow_match_euler_discrete_step_for_step():
    """FlowMatchEulerDiscreteScheduler (shift 3) against DiffusersSampler on it and our FlowEuler on its σ's: same
    x at every step (≤ 1e-5; diffusers casts the sample to float32 inside step())."""
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(12)
    x_T = randn((D,), make_generators(range(4)), dtype=F64)
    x, ref = x_T.clone(), []
    for t in sch.timesteps:
        x = sch.step(_toy(x, t.expand(len(x))), t, x).prev_sample
        ref.append(x)
    den = Denoiser(_toy, FlowSchedule(), "flow_prediction")
    ours = _trajectory(den, DiffusersSampler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), 12), x_T)
    assert _max_diff(ours, ref) < 1e-5
    ours = _trajectory(den, FlowEuler(times=sch.sigmas[:-1]), x_T)
    assert _max_diff(ours, ref) < 1e-5


def _sigma_space_loop(sch, x_vp, n_steps, gens=None):
    """diffusers' own loop on x_σ = √(1 + σ_0²)·x_vp (our VP x_T) with an ε-network of the VP input."""
    sch.set_timesteps(n_steps)
    x, ref = x_vp * (1 + float(sch.sigmas[0]) ** 2) ** 0.5, []
    for t in sch.timesteps:
        eps = _toy_eps(sch.scale_model_input(x, t), t.expand(len(x)))
        x = sch.step(eps, t, x, **({"generator": gens} if gens else {})).prev_sample
        ref.append(x)
    return ref


SIGMA_SPACE = {
    "euler": lambda: diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ),
    "euler-karras": lambda: diffusers.EulerDiscreteScheduler(use_karras_sigmas=True, timestep_spacing="leading"),
    "euler-ancestral": lambda: diffusers.EulerAncestralDiscreteScheduler(),
    "heun": lambda: diffusers.HeunDiscreteScheduler(),
    "lms": lambda: diffusers.LMSDiscreteScheduler(),
}


@pytest.mark.parametrize("name", list(SIGMA_SPACE))
def test_diffusers_sigma_space_schedulers_match_their_own_loop(name):
    """Our VP state x_vp = x_σ/√(1 + σ²) through DiffusersSampler equals diffusers' loop on x_σ step for step
    (compared in VP units, ≤ 1e-5), with the same per-sample noise for the ancestral sampler."""
    make, n = SIGMA_SPACE[name], 10
    x_T = randn((D,), make_generators(range(4)), dtype=F64)
    takes_gen = "generator" in inspect.signature(make().step).parameters
    ref = _sigma_space_loop(make(), x_T, n, gens=make_generators(range(10, 14)) if takes_gen else None)
    sampler = DiffusersSampler(make(), n)
    den = Denoiser(_toy_eps, sampler.schedule, "epsilon")
    ours = _trajectory(den, sampler, x_T, generators=make_generators(range(10, 14)))
    k = [(1 + float(s) ** 2) ** 0.5 for s in sampler.scheduler.sigmas[1:]]
    assert _max_diff([x * kk for x, kk in zip(ours, k, strict=True)], ref, k) < 1e-5


@pytest.mark.parametrize("cls", [EDMEuler, EDMHeun])
def test_edm_euler_and_heun_match_euler_and_heun_discrete_step_for_step(cls):
    """Our VE samplers on a scheduler's σ's, with the same network seen as D(x_σ; σ), against EulerDiscrete/
    HeunDiscreteScheduler: same x_σ at every step (VP units, ≤ 1e-5)."""
    make = diffusers.EulerDiscreteScheduler if cls is EDMEuler else diffusers.HeunDiscreteScheduler
    x_T = randn((D,), make_generators(range(4)), dtype=F64)
    ref = _sigma_space_loop(sch := make(), x_T, 10)
    sig = sch.sigmas.to(F64)
    t_of = dict(zip(sig.tolist(), sch.timesteps.tolist(), strict=False))  # σ_i → the scheduler's timestep

    def net(x, s):  # the VP ε-network seen as a VE one: ε(x_σ/√(1 + σ²), t(σ))
        s0 = float(s[0])
        return _toy_eps(x / (1 + s0**2) ** 0.5, torch.full_like(s, t_of[s0]))

    sampler = cls(SigmaSchedule(), times=torch.unique_consecutive(sig[:-1]))
    ours = _trajectory(Denoiser(net, SigmaSchedule(), "epsilon"), sampler, x_T * (1 + float(sig[0]) ** 2) ** 0.5)
    k = [(1 + float(s) ** 2) ** 0.5 for s in sch.sigmas[1:]]
    assert len(ours) == len(sch.timesteps)
    assert _max_diff(ours, ref, k) < 1e-5


@pytest.mark.parametrize("kind", ["EDMHeun", "HeunDiscreteScheduler"])
def test_heun_carries_a_correction_added_to_its_predictor_output(kind):
    """With a constant ε the Heun correction (σ' − σ)·(d' − d)/2 vanishes, so the corrector returns exactly the
    predictor's x̃ plus whatever guidance added to it (diffusers' Heun would restart from its stored x_i)."""
    sampler = (
        EDMHeun(SigmaSchedule(), 5) if kind == "EDMHeun" else DiffusersSampler(diffusers.HeunDiscreteScheduler(), 5)
    )
    sampler.reset()
    gens = make_generators(range(2))
    eps = randn((D,), gens, dtype=F64)
    x = randn((D,), gens, dtype=F64) * sampler.scales(0)[0]
    a, s = sampler.levels(0)[:2]
    x_pred = sampler.step(x, (x - s * eps) / a, eps, 0, gens)
    x_c = x_pred + 0.1
    a, s = sampler.levels(1)[:2]
    torch.testing.assert_close(sampler.step(x_c, (x_c - s * eps) / a, eps, 1, gens), x_c, rtol=0, atol=1e-9)


# -- exact sampling of a Gaussian ------------------------------------------------------------------------------

MU, S0 = torch.tensor([1.0, -0.5, 0.25], dtype=F64), 0.3  # data N(μ, s0²·I)


def _gaussian_denoiser(schedule):
    """The exact x0-network E[x0 | x_t] = μ + α·s0²/(α²s0² + σ²)·(x_t − α·μ) of N(μ, s0²·I), for any (α, σ)."""

    def net(x, tt):
        t = float(tt[0]) / (schedule.num_train_timesteps if schedule.family == "flow" else 1)
        a, s = schedule.alpha(t), schedule.sigma(t)
        return MU + a * S0**2 / (a**2 * S0**2 + s**2) * (x - a * MU)

    return Denoiser(net, schedule, "sample")


DETERMINISTIC = {
    "flow-euler": lambda: FlowEuler(FlowSchedule(), 100),
    "flow-euler-shift3": lambda: FlowEuler(FlowSchedule(shift=3.0), 100),
    "diffusers-flow-match": lambda: DiffusersSampler(diffusers.FlowMatchEulerDiscreteScheduler(), 100),
    "edm-euler": lambda: EDMEuler(SigmaSchedule(), 100),
    "edm-heun": lambda: EDMHeun(SigmaSchedule(), 40),
}


def _x_T(sampler, n):
    """z and x_T = k_T·z as sample() draws them from seeds 0..n−1 (k = √(α² + σ²): 1 on flow, √(1 + σ_max²) on VE)."""
    z = randn((D,), make_generators(range(n)), dtype=F64)
    return z, z * sampler.schedule.scale(sampler.timestep(0))


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_samplers_reproduce_a_gaussian(name):
    """With the exact denoiser of N(μ, s0²I) the probability-flow ODE keeps ẑ = (x_t − α_t·μ)/√(α_t²s0² + σ_t²)
    constant, so it maps x_T to μ + s0·ẑ_T. 4000 samples: each is μ + λ·s0·ẑ_T with |λ − 1| ≤ 5% (Euler's per-step
    contraction cos Δθ of (α·s0, σ) sums to ≈ 2% at n = 100), so the mean is μ within 4 standard errors (s0/√n)
    and the variance s0² within 4 standard errors (s0²·√(2/n)) + 10%."""
    sampler, n = DETERMINISTIC[name](), 4000
    _, x_T = _x_T(sampler, n)  # what sample() draws from these seeds
    x = sample(_gaussian_denoiser(sampler.schedule), sampler, shape=(D,), seeds=range(n), dtype=F64).x0
    t = sampler.timestep(0)
    a, s = sampler.schedule.alpha(t), sampler.schedule.sigma(t)
    z = (x_T - a * MU) / (a**2 * S0**2 + s**2) ** 0.5
    assert ((x - MU - S0 * z).abs() <= 0.05 * S0 * z.abs() + 1e-9).all()
    assert ((x.mean(0) - MU).abs() < 4 * S0 / n**0.5).all()
    assert ((x.var(0) - S0**2).abs() < 4 * S0**2 * (2 / n) ** 0.5 + 0.1 * S0**2).all()


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_stochastic_flow_ddim_has_the_exact_gaussian_recursion(eta):
    """DDIM(η) on rectified flow with the exact denoiser is linear-Gaussian: x_{t'} − α_{t'}μ = A·(x_t − α_t·μ) + c·z,
    A = α_{t'}·g + √(σ_{t'}² − c²)·(1 − α_t·g)/σ_t, g = α_t·s0²/(α_t²s0² + σ_t²), so Var' = A²·Var + c². 2000 samples
    have that variance within 4 standard errors (v·√(2/n)), mean μ within 4 standard errors, and it is s0² within 25%
    (ancestral sampling with E[x0|x_t] loses O(1/n) variance: 10–16% at n = 50)."""
    sampler, n = DDIM(FlowSchedule(), 50, eta=eta), 2000
    _, x_T = _x_T(sampler, n)
    x = sample(_gaussian_denoiser(sampler.schedule), sampler, x_T=x_T, seeds=range(n), dtype=F64).x0
    var = 1.0
    for i in range(len(sampler)):
        a, s, a_p, s_p = sampler.levels(i)
        c, g = sampler.sigma(i), a * S0**2 / (a**2 * S0**2 + s**2)
        A = a_p * g + max(s_p**2 - c**2, 0.0) ** 0.5 * (1 - a * g) / s
        var = A**2 * var + c**2
    assert abs(var - S0**2) < 0.25 * S0**2
    assert ((x.var(0) - var).abs() < 4 * var * (2 / n) ** 0.5).all(), (x.var(0), var)
    assert ((x.mean(0) - MU).abs() < 4 * var**0.5 / n**0.5).all()


def _noisy_likelihood(schedule, A, y, tau):
    """ℓ(x_t, t) = −log p(y | x_t) (up to a constant) for y = A·x0 + N(0, τ²): p(x0 | x_t) is N(x0_hat, v·I),
    v = s0²σ²/(α²s0² + σ²), so y | x_t ~ N(A·x0_hat, v·AAᵀ + τ²I)."""

    def loss(x_t, t):
        a, s = schedule.alpha(t), schedule.sigma(t)
        x0 = MU + a * S0**2 / (a**2 * S0**2 + s**2) * (x_t - a * MU)
        v = S0**2 * s**2 / (a**2 * S0**2 + s**2)
        cov = v * A @ A.T + tau**2 * torch.eye(len(y), dtype=F64)
        r = y - x0 @ A.T
        return 0.5 * (r @ torch.linalg.inv(cov) * r).sum(1)

    return loss


@pytest.mark.parametrize("make", [lambda: FlowEuler(FlowSchedule(), 100), lambda: EDMHeun(SigmaSchedule(), 25)],
                         ids=["flow-euler", "edm-heun"])  # fmt: skip
def test_exact_likelihood_guidance_samples_the_gaussian_posterior(make):
    """cg with the exact −log p(y | x_t) makes ε_hat the exact conditional ε, so the ODE samples p(x0 | y) for
    y = A·x* + N(0, τ²): 2000 samples match the posterior mean within 4 standard errors + 0.01 (the ODE's
    discretisation) and its covariance within 0.005, where unguided samples miss the mean by > 0.3 (Heun is guided
    at both of its evaluations)."""
    sampler, n = make(), 2000
    A = torch.randn(2, D, generator=torch.Generator().manual_seed(5), dtype=F64)
    tau = 0.1
    y = (MU + 2 * S0) @ A.T
    post_cov = torch.linalg.inv(torch.eye(D, dtype=F64) / S0**2 + A.T @ A / tau**2)
    post_mean = post_cov @ (MU / S0**2 + A.T @ y / tau**2)
    _, x_T = _x_T(sampler, n)
    den = _gaussian_denoiser(sampler.schedule)
    x = sample(den, sampler, preset("cg"), _noisy_likelihood(sampler.schedule, A, y, tau), x_T=x_T, dtype=F64).x0
    se = (post_cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - post_mean).abs() < 4 * se + 0.01).all(), (x.mean(0), post_mean)
    torch.testing.assert_close(torch.cov(x.T), post_cov, rtol=0, atol=0.005)
    plain = sample(den, make(), x_T=x_T, dtype=F64).x0
    assert float((plain.mean(0) - post_mean).norm()) > 0.3


@pytest.mark.parametrize("method", ["freedom", "tfg"])
def test_time_travel_and_x0_guidance_run_on_flow(method):
    """Time travel (n_recur = 3) and an x0-space loss drive FlowEuler: finite samples, guided toward the target
    (TFG's 1/√α_t is infinite at t = 1, where α_t = ᾱ_t/ᾱ_{t'} = 0: its ρ step there is 0)."""
    den = _gaussian_denoiser(FlowSchedule())
    target = torch.tensor([0.5, 0.0, 0.0], dtype=F64)
    loss = lambda x0: ((x0 - target) ** 2).sum(1)  # noqa: E731
    run = dict(x_T=randn((D,), make_generators(range(64)), dtype=F64), dtype=F64)
    cfg = preset(method, **({"scale": 0.5} if method == "freedom" else {"rho": 0.3}), n_recur=3)
    cfg = cfg.replace(recur_window=(0.3, 0.8))
    res = sample(den, FlowEuler(num_steps=20), cfg, loss, **run)
    plain = sample(den, FlowEuler(num_steps=20), **run).x0
    assert res.stats.nfe > 20 and torch.isfinite(res.x0).all()
    assert float(loss(res.x0).mean()) < float(loss(plain).mean()) - 0.05


# -- diffusers adapters ----------------------------------------------------------------------------------------


class _FakeTransformer(torch.nn.Module):
    """A stand-in for SD3's transformer: ``timestep`` comes after other inputs, so it must go by keyword."""

    class config:  # noqa: N801
        in_channels = None

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), dtype=F64))

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None):
        from types import SimpleNamespace

        return SimpleNamespace(sample=self.w * _toy(hidden_states, timestep))


def test_from_diffusers_reads_a_flow_match_scheduler():
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    den = from_diffusers(_FakeTransformer(), sch)
    assert den.family == "flow" and den.prediction_type == "flow_prediction" and den.schedule.shift == 3.0
    x = torch.randn(2, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = den(x, 0.4)
    torch.testing.assert_close(out.eps - out.x0_hat, _toy(x, torch.full((2,), 400.0, dtype=F64)))
    assert from_diffusers(_FakeTransformer(), diffusers.EulerDiscreteScheduler()).family == "vp"
