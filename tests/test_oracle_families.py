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
