"""Schedules and timestep spacing against diffusers; the denoiser's ε/x0/v conversions against the oracle."""

import pytest
import torch

from lossguide.denoiser import Denoiser
from lossguide.schedule import NoiseSchedule, spaced_timesteps

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedules_match_diffusers(beta_schedule):
    betas = {"scaled_linear": dict(beta_start=0.00085, beta_end=0.012)}.get(beta_schedule, {})
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, **betas)
    ours = {
        "linear": NoiseSchedule.linear,
        "scaled_linear": NoiseSchedule.scaled_linear,
        "squaredcos_cap_v2": NoiseSchedule.cosine,
    }[beta_schedule]()
    torch.testing.assert_close(ours.alpha_bar.float(), sch.alphas_cumprod, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [10, 50, 61, 103, 333])
def test_spacing_matches_diffusers(spacing, n):
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    sch.set_timesteps(n)
    ours = spaced_timesteps(1000, n, spacing).tolist()
    # diffusers' float "trailing" arange appends a bogus t = −1 for some n (61, 103, ...); ours has n steps
    assert ours == [t for t in sch.timesteps.tolist() if t >= 0] and len(ours) == n


def test_bad_schedule_and_spacing_errors():
    with pytest.raises(ValueError, match="non-increasing"):
        NoiseSchedule(torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="timestep spacing"):
        spaced_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="num_steps"):
        spaced_timesteps(1000, 0)


@pytest.mark.parametrize("pred", ["sample", "v_prediction"])
def test_prediction_types_give_the_same_eps_and_x0(prior, schedule, pred):
    """An x0- or v-network that is exact gives the exact ε and Tweedie x0_hat."""
    x = torch.randn(16, prior.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = 400
    ab = schedule.at(t)
    ref = prior.denoiser(schedule)(x, t)

    def net(x_t, tt):
        eps = prior.eps(x_t, ab)
        x0 = prior.x0_mean(x_t, ab)
        return x0 if pred == "sample" else ab**0.5 * eps - (1 - ab) ** 0.5 * x0

    out = Denoiser(net, schedule, pred)(x, t)
    torch.testing.assert_close(out.eps, ref.eps)
    torch.testing.assert_close(out.x0_hat, ref.x0_hat)
    # Tweedie: x0_hat = (x_t + (1 − ᾱ)∇log p_t)/√ᾱ with the score from autograd of log p_t
    xg = x.clone().requires_grad_(True)
    score = torch.autograd.grad(prior.log_prob_t(xg, ab).sum(), xg)[0]
    torch.testing.assert_close(ref.x0_hat, (x + (1 - ab) * score) / ab**0.5)


def test_denoiser_rejects_wrong_output_shape_and_dtype(schedule, tiny_net):
    from lossguide.denoiser import from_module

    d = from_module(tiny_net, schedule)
    with pytest.raises(TypeError, match="dtype"):
        d(torch.zeros(2, 1, 8, 8, dtype=torch.float64), 10)
    bad = Denoiser(lambda x, t: x[:, :1], schedule)
    with pytest.raises(ValueError, match="returned shape"):
        bad(torch.zeros(2, 3), 10)
    assert not any(p.requires_grad for p in tiny_net.parameters()) and not tiny_net.training
