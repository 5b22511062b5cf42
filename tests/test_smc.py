"""The particle layer (lossguide.smc): resampling schemes, per-seed randomness and chunks, the refusal of deterministic
samplers, and exactness: a 1-D Gaussian prior whose sampler posterior and evidence are closed-form, and the
Gaussian-mixture oracle's linear and class tasks."""

import math

import pytest
import torch

from lossguide.harness.tasks import oracle as oracle_task
from lossguide.harness.tasks.oracle import oracle_tasks, posterior_samples
from lossguide.metrics import sliced_wasserstein
from lossguide.oracle import GaussianMixture, linear_measurement_loss, linear_task
from lossguide.samplers import DDIM, DDPM, EDMHeun
from lossguide.sampling import sample
from lossguide.schedule import FlowSchedule, NoiseSchedule, SigmaSchedule
from lossguide.smc import (
    PARTICLE_METHODS,
    RESAMPLERS,
    NoiseVarianceStep,
    ess,
    particle_method,
    particle_seed,
    resample_seed,
    smc,
)
from lossguide.steps import StepContext

F64 = torch.float64


# -- resampling ----------------------------------------------------------------------------------------
W = torch.tensor([0.05, 0.3, 0.0, 0.15, 0.4, 0.1], dtype=F64)
DRAWS = 4000


@pytest.fixture(scope="module")
def counts():
    """Each scheme's counts [DRAWS, K] of W's K = 6 particles."""
    out = {}
    for name, scheme in RESAMPLERS.items():
        g = torch.Generator().manual_seed(0)
        out[name] = torch.stack([torch.bincount(scheme(W, len(W), g), minlength=len(W)) for _ in range(DRAWS)])
    return {name: c.double() for name, c in out.items()}


@pytest.mark.parametrize("name", list(RESAMPLERS))
def test_resampling_is_unbiased(counts, name):
    """E[counts] = K·w, within 5 standard errors of the multinomial variance K·w(1 − w) (the largest of the three)."""
    c, K = counts[name], len(W)
    assert (c.sum(1) == K).all()
    assert (c[:, 2] == 0).all()  # a zero weight is never drawn
    se = (K * W * (1 - W) / DRAWS).sqrt()
    assert ((c.mean(0) - K * W).abs() <= 5 * se + 1e-12).all(), (c.mean(0), K * W)


def test_systematic_and_residual_have_lower_variance(counts):
    """Summed count variance over 4,000 draws, measured: multinomial 4.33 (K·Σw(1 − w) = 4.35), residual 2.30,
    systematic 0.94."""
    var = {name: float(c.var(0).sum()) for name, c in counts.items()}
    assert abs(var["multinomial"] - len(W) * float((W * (1 - W)).sum())) < 0.4
    assert var["residual"] < 0.7 * var["multinomial"]
    assert var["systematic"] < 0.4 * var["multinomial"]


def test_residual_keeps_the_integer_parts(counts):
    assert (counts["residual"] >= torch.floor(len(W) * W)).all()


def test_ess():
    assert torch.allclose(ess(torch.zeros(2, 8, dtype=F64)), torch.full((2,), 8.0, dtype=F64))
    assert float(ess(torch.tensor([[0.0] + [-math.inf] * 7], dtype=F64))[0]) == pytest.approx(1.0)


def test_streams_are_distinct():
    seeds = {particle_seed(s, k) for s in range(20) for k in range(1, 50)} | {resample_seed(s) for s in range(20)}
    assert len(seeds) == 20 * 49 + 20 and not seeds & set(range(20))
    assert particle_seed(7, 0) == 7


# -- per-seed randomness and chunks ----------------------------------------------------------------------
def _tds(task, schedule, seeds, **kw):
    m = particle_method("tds")
    kw = {"particles": 8, "ess_threshold": 1.0, **kw}  # resample at every step
    return m.run(task.prior.denoiser(schedule), DDIM(schedule, 10, eta=1.0), task.loss, shape=(8,), seeds=seeds,
                 dtype=F64, **kw)  # fmt: skip


def test_seed_alone_equals_seed_in_batch(prior, schedule):
    task = linear_task(prior, schedule)
    alone, batch = _tds(task, schedule, [5]), _tds(task, schedule, [3, 5, 7])
    assert (alone.x0[0] - batch.x0[1]).abs().max() <= 1e-12
    assert abs(float(alone.log_z[0] - batch.log_z[1])) <= 1e-10
    assert all(abs(float(a[0] - b[1])) <= 1e-9 for a, b in zip(alone.stats.ess, batch.stats.ess, strict=True))
    assert (batch.x0[0] - batch.x0[2]).abs().max() > 1e-3  # the seeds differ
    assert min(float(e.min()) for e in batch.stats.ess) < 7  # and the weights do something


@pytest.mark.parametrize("resample", ["systematic", "residual"])
def test_chunks_do_not_change_results(prior, schedule, resample):
    task = linear_task(prior, schedule)
    whole = _tds(task, schedule, [3, 5, 7], resample=resample)
    chunked = _tds(task, schedule, [3, 5, 7], resample=resample, chunk=5)  # chunks cut across seeds
    assert (whole.x0 - chunked.x0).abs().max() <= 1e-12
    assert (whole.log_z - chunked.log_z).abs().max() <= 1e-10
    # per particle: 10 twist passes + 9 passes with gradient (the noise-free last step is unguided)
    assert whole.stats.nfe == chunked.stats.nfe == 19
    assert whole.stats.loss_grads == chunked.stats.loss_grads == 9
    assert len(whole.stats.ess) == 11 and whole.stats.ess[0].shape == (3,)


def test_one_particle_is_sample(prior, schedule):
    """K = 1 never resamples, and particle 0 of seed s draws from seed s: smc is sample() (the window leaves out the
    noise-free last step, which smc takes unguided)."""
    task = linear_task(prior, schedule)
    cfg = particle_method("fk", proposal="ugd", scale=0.3, n_iter=0).guidance.replace(window=(1e-3, 1.0))
    sampler, den = DDIM(schedule, 10, eta=1.0), task.prior.denoiser(schedule)
    a = smc(den, sampler, cfg, task.loss, particles=1, shape=(8,), seeds=[4, 9], dtype=F64)
    b = sample(den, sampler, cfg, task.loss, shape=(8,), seeds=[4, 9], dtype=F64)
    assert (a.x0 - b.x0).abs().max() <= 1e-12


# -- refusals and the method table -------------------------------------------------------------------------
def test_deterministic_sampler_is_refused(prior, schedule):
    task = linear_task(prior, schedule)
    den, m = task.prior.denoiser(schedule), particle_method("tds")
    with pytest.raises(ValueError) as e:
        m.run(den, DDIM(schedule, 10), task.loss, particles=2, shape=(8,), seeds=[0])
    msg = str(e.value)
    assert "\n" not in msg and "deterministic" in msg and "DDPM(schedule)" in msg and "eta=1.0" in msg
    # no guidance (FK with the plain sampler): q = p, so any sampler will do
    smc(den, DDIM(schedule, 5), None, task.loss, particles=2, shape=(8,), seeds=[0], potential="fk")


def test_other_refusals(prior, schedule):
    task = linear_task(prior, schedule)
    den = task.prior.denoiser(schedule)
    tt = particle_method("fk", proposal="freedom", scale=0.01).guidance.replace(n_recur=2, recur_window=(0, 1))
    with pytest.raises(ValueError, match="n_recur=1"):
        smc(den, DDPM(schedule, 10), tt, task.loss, particles=2, shape=(8,), seeds=[0])
    with pytest.raises(ValueError, match="stateful"):
        smc(prior.denoiser(SigmaSchedule()), EDMHeun(num_steps=4), None, task.loss, particles=2, shape=(8,),
            seeds=[0])  # fmt: skip
    with pytest.raises(ValueError, match="ess_threshold"):
        smc(den, DDPM(schedule, 10), None, task.loss, shape=(8,), seeds=[0], ess_threshold=1.5)
    with pytest.raises(ValueError, match="unknown particle method"):
        particle_method("smc")
    with pytest.raises(ValueError, match="no parameter 'scale'"):
        particle_method("tds", scale=2.0)


def test_float32_and_a_bad_potential(prior, schedule):
    task = linear_task(prior, schedule)
    den, m = task.prior.denoiser(schedule), particle_method("tds")
    r = m.run(den, DDPM(schedule, 10), task.loss, particles=4, shape=(8,), seeds=[0, 1], chunk=3)
    assert r.x0.dtype == torch.float32 and r.x0.shape == (2, 8) and torch.isfinite(r.log_z).all()
    assert r.stats.last_loss.shape == (2,) and len(r.stats.loss_trace) == 9 and r.stats.skipped.shape == (2,)
    with pytest.raises(ValueError, match="potential returned"):
        smc(den, DDPM(schedule, 10), None, task.loss, particles=2, shape=(8,), seeds=[0],
            potential=lambda new, old, final: new.sum())  # fmt: skip


def test_particle_methods():
    assert set(PARTICLE_METHODS) == {"tds", "fk"}
    tds = particle_method("tds", twist_scale=0.5)
    assert tds.guidance.rho == NoiseVarianceStep(0.5) and tds.guidance.rho_target == "x_prev"
    assert (tds.potential.scale, tds.potential.final_scale) == (0.5, 1.0)
    fk = particle_method("fk", lam=2.0)
    assert not fk.guidance.enabled and fk.potential.scale == fk.potential.final_scale == 2.0
    assert particle_method("fk", proposal="dps", scale=0.1).guidance.name == "dps"


@pytest.mark.parametrize("sampler", [DDIM(NoiseSchedule.linear(), 20, eta=0.5), DDPM(NoiseSchedule.linear(), 30),
                                     DDIM(FlowSchedule(), 12, eta=1.0)], ids=["ddim", "ddpm", "flow"])  # fmt: skip
def test_noise_variance_step_is_the_samplers_noise(sampler):
    """TDS's shift c²·∇ log p̃ reads c² off the schedule; it is the sampler's own fresh-noise variance."""
    rule = NoiseVarianceStep(1.0, eta=sampler.eta)
    pairs, levels = sampler.alpha_bar_pairs(), sampler.level_list()
    for i in range(len(sampler)):
        ctx = StepContext(i=i, alpha_bars=pairs, eps=torch.zeros(1, 1), grad=torch.zeros(1, 1),
                          loss=torch.zeros(1), levels=levels)  # fmt: skip
        assert float(rule(ctx)[0]) == pytest.approx(sampler.sigma(i) ** 2, rel=1e-12, abs=1e-15)


# -- exactness: a 1-D Gaussian prior, whose sampler posterior and evidence are closed-form ------------------------
Y, S = 2.0, 0.5  # y = x0 + n, n ~ N(0, S²), prior N(0, 1): y lies 2 prior std out


def _model_posterior(sampler: DDIM) -> tuple[float, float, float]:
    """(mean, variance, log Z) of p(x0)·exp(−ℓ(x0)) for p the sampler's own x0 law on the exact N(0, 1) denoiser:
    each step is x_{t'} = A·x_t + c·z (x0_hat = √ᾱ·x_t, ε_hat = √(1−ᾱ)·x_t), so p = N(0, v)."""
    v = 1.0
    for i in range(len(sampler)):
        ab, ab_prev = sampler.alpha_bars(i)
        c = sampler.eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
        A = ab_prev**0.5 * ab**0.5 + max(1 - ab_prev - c * c, 0.0) ** 0.5 * (1 - ab) ** 0.5
        v = A * A * v + c * c
    post_var = 1 / (1 / v + 1 / S**2)
    log_z = math.log(S) - 0.5 * math.log(v + S**2) - Y**2 / (2 * (v + S**2))  # log ∫ N(x; 0, v)·exp(−ℓ(x)) dx
    return post_var * Y / S**2, post_var, log_z


class _ExactTwist:
    """The exact twist p(y | x_t) of the N(0, 1) prior: exp(−λ_t·ℓ(x0_hat)) with λ_t = S²/(S² + 1 − ᾱ_t) (x0's
    posterior variance 1 − ᾱ_t widens the likelihood), then ℓ(x0). Called once per step, in order."""

    def __init__(self, sampler):
        self.lam = [S**2 / (S**2 + 1 - sampler.alpha_bars(i)[0]) for i in range(len(sampler))]
        self.i = 0

    def __call__(self, new, old, final):
        out = -(1.0 if final else self.lam[self.i]) * new
        if old is not None:
            out = out + self.lam[self.i - 1] * old
        self.i += 1
        return out


def _gauss(guidance, potential, K: int, n_seeds: int = 512, steps: int = 20):
    """(drawn x0 [n], Ẑ [n], the closed form) of smc on the 1-D task, DDIM-``steps`` with η = 1."""
    schedule = NoiseSchedule.linear()
    sampler = DDIM(schedule, steps, eta=1.0)
    if potential is _ExactTwist:
        potential = _ExactTwist(sampler)
    prior = GaussianMixture.isotropic([[0.0]], 1.0)
    r = smc(prior.denoiser(schedule), sampler, guidance, linear_measurement_loss([[1.0]], [Y], S), particles=K,
            shape=(1,), seeds=range(n_seeds), potential=potential, dtype=F64)  # fmt: skip
    return r.x0[:, 0], r.log_z.exp(), _model_posterior(sampler)


def _assert_evidence(Z: torch.Tensor, log_z: float) -> None:
    """Ẑ is unbiased for any proposal and K: its mean within 4 standard errors (+1%) of Z."""
    se = float(Z.std()) / len(Z) ** 0.5
    assert abs(float(Z.mean()) - math.exp(log_z)) < 4 * se + 0.01 * math.exp(log_z), (float(Z.mean()), math.exp(log_z))


def test_gaussian_exact_twist_plain_proposal():
    """Exact twist, plain proposal, K = 32: the drawn particles have the model posterior's mean and variance.
    Measured (512 seeds, DDIM-20): mean 1.452 (closed form 1.480 ± 0.019), var 0.182 (0.185), Ẑ 0.0639 ± 0.0011
    (0.0636)."""
    x, Z, (mean, var, log_z) = _gauss(None, _ExactTwist, 32)
    assert abs(float(x.mean()) - mean) < 4 * (var / len(x)) ** 0.5
    assert abs(float(x.var()) / var - 1) < 0.15
    _assert_evidence(Z, log_z)


def test_gaussian_tds_weights_correct_the_proposal():
    """TDS: its proposal alone (K = 1) overshoots toward y; 32 particles remove most of the error, and Ẑ is unbiased
    (which fails by ×12 without the p/q ratio of the proposal and by ×2e5 with it doubled). Measured (512 seeds,
    DDIM-20): mean 1.896 at K = 1, 1.585 at K = 32 (closed form 1.480); Ẑ 0.0630 ± 0.0048 (0.0636)."""
    tds = particle_method("tds")
    x1, _, (mean, _, log_z) = _gauss(tds.guidance, tds.potential, 1)
    x32, Z, _ = _gauss(tds.guidance, tds.potential, 32)
    err1, err32 = float(x1.mean()) - mean, float(x32.mean()) - mean
    assert err1 > 0.3 and abs(err32) < 0.4 * err1, (err1, err32)
    _assert_evidence(Z, log_z)


def test_gaussian_exact_twist_guided_proposal():
    """Exact twist with TDS's guided proposal, K = 32: the p/q ratio keeps the target. Measured: mean 1.536 (1.480 ±
    0.019; 1.896 for the proposal alone), var 0.174 (0.185), Ẑ 0.0652 ± 0.0015 (0.0636)."""
    x, Z, (mean, var, log_z) = _gauss(particle_method("tds").guidance, _ExactTwist, 32)
    assert abs(float(x.mean()) - mean) < 0.1
    assert abs(float(x.var()) / var - 1) < 0.15
    _assert_evidence(Z, log_z)


# -- the oracle ---------------------------------------------------------------------------------------------
def _oracle_sw(task, method: str, K: int, seeds, steps: int = 50) -> float:
    schedule = NoiseSchedule.linear()
    m = particle_method(method)
    r = m.run(task.prior.denoiser(schedule), DDIM(schedule, steps, eta=1.0), task.loss, particles=K, shape=(8,),
              seeds=seeds, dtype=F64)  # fmt: skip
    return sliced_wasserstein(r.x0, posterior_samples(task))


@pytest.fixture(scope="module")
def tasks():
    return {t.name.split("-")[0]: t for t in oracle_tasks(NoiseSchedule.linear())}


def test_oracle_particles_beat_one(tasks):
    """SW to 4,096 exact posterior samples of 256 seeds, DDIM-50 η = 1, measured on the seed sets from 0/256/512
    (this test runs the first): linear TDS K = 1: 0.146/0.130/0.172, K = 16: 0.088/0.067/0.117; linear FK (plain
    proposal) K = 1: 0.175/0.188/0.177, K = 4: 0.066/0.068/0.054; class FK K = 1: 0.632/0.649/0.611, K = 4:
    0.056/0.060/0.057. 256 exact posterior samples score 0.059 (0.045–0.083) on linear, 0.029 on class."""
    seeds = range(256)
    tds1, tds16 = _oracle_sw(tasks["linear"], "tds", 1, seeds), _oracle_sw(tasks["linear"], "tds", 16, seeds)
    assert tds1 > 0.12 and tds16 < 0.13 and tds16 < 0.8 * tds1, (tds1, tds16)
    fk1, fk4 = _oracle_sw(tasks["linear"], "fk", 1, seeds), _oracle_sw(tasks["linear"], "fk", 4, seeds)
    assert fk4 < 0.5 * fk1, (fk1, fk4)
    assert _oracle_sw(tasks["class"], "fk", 4, seeds) < 0.08


def test_oracle_tds_sw_decreases_with_k(tasks):
    """Linear task, TDS, SW over 3 seed sets of 256 (starts 0/256/512), DDIM-50 η = 1, measured:
    K = 1: 0.146/0.130/0.172 (mean 0.150), 4: 0.110/0.119/0.080 (0.103), 16: 0.088/0.067/0.117 (0.091),
    64: 0.060/0.083/0.076 (0.073); the best single-particle training-free preset at its stored settings (DDIM-50
    η = 0), shen2024: 0.070/0.077/0.100 (0.082) (cg, the exact noise-aware classifier: 0.068/0.057/0.066). The mean
    decreases at every K, but within one seed set it need not (the spread is ±0.02); the SIR limit of the η = 1
    sampler's own posterior is 0.083 ± 0.01 at 256 samples, so K = 64 is already at it."""
    task, sets = tasks["linear"], [range(s, s + 256) for s in (0, 256, 512)]
    sw = {K: sum(_oracle_sw(task, "tds", K, s) for s in sets) / len(sets) for K in (1, 4, 16, 64)}
    assert sw[4] < sw[1] and sw[16] < sw[4] and sw[64] < sw[16] and sw[64] < 0.6 * sw[1], sw
    best = oracle_task.load_settings()["linear"]["shen2024"]
    ref = sum(oracle_task.run_one(task, "shen2024", best, NoiseSchedule.linear(), s, 50, posterior_samples(task))
              ["sw_to_posterior"] for s in sets) / len(sets)  # fmt: skip
    assert sw[64] < ref, (sw, ref)
