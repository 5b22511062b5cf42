"""A sampler must step the schedule its model was trained on: a VP ᾱ table or a flow time scale that differs is a
one-line error naming both (issue 20, item 2); the time-travel refusal names the samplers of the sampler's own
family (item 6); the one obvious way to list presets and the autoguidance combinator are top-level (item 8)."""

import diffusers
import pytest
import torch

import lossguide as lg
from lossguide.schedule import describe, mismatch

F64 = torch.float64
LINEAR = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def _sample(prior, sampler, **kw):
    return lg.sample(prior.denoiser(lg.NoiseSchedule.linear()), sampler, shape=(prior.dim,), seeds=[0, 1], dtype=F64,
                     **kw)  # fmt: skip


@pytest.mark.parametrize(
    "make",
    [
        lambda: lg.DiffusersSampler(diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear"), 10),
        lambda: lg.DiffusersSampler(diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False), 10),
        lambda: lg.DDIM(lg.NoiseSchedule.scaled_linear(), 10),
        lambda: lg.DDIM(lg.NoiseSchedule.linear(500), 10),
    ],
    ids=["euler-scaled-linear", "ddim-diffusers-cosine", "ddim-scaled-linear", "ddim-T500"],
)
def test_a_sampler_on_another_vp_table_is_refused_with_both_named(prior, make):
    with pytest.raises(ValueError, match=r"trained on VP linear β 1e-4\.\.0\.02 over T = 1000 but the sampler steps"):
        _sample(prior, make())


def test_the_same_table_from_diffusers_float32_is_accepted(prior):
    """A diffusers scheduler's float32 ᾱ of the model's own schedule (≤ 4e-7 relative) steps it."""
    x = _sample(prior, lg.DiffusersSampler(diffusers.DDIMScheduler(**LINEAR, clip_sample=False), 10)).x0
    assert torch.isfinite(x).all()
    assert describe(lg.NoiseSchedule.from_diffusers(diffusers.DDPMScheduler(**LINEAR))) == describe(
        lg.NoiseSchedule.linear()
    )


def test_flow_time_scale_must_agree_and_inference_choices_are_not_compared():
    assert "network time t·1000" in mismatch(lg.FlowSchedule(1000), lg.FlowSchedule(1))
    assert mismatch(lg.FlowSchedule(1000, shift=1.0), lg.FlowSchedule(1000, shift=3.0)) is None  # spacing only
    assert mismatch(lg.SigmaSchedule(), lg.SigmaSchedule(sigma_max=160.0)) is None  # the sampler's σ range
    assert "VE" in mismatch(lg.SigmaSchedule(), lg.FlowSchedule())


@pytest.mark.parametrize(
    "scheduler, advice",
    [
        (diffusers.FlowMatchEulerDiscreteScheduler(), "FlowEuler or DDIM on the FlowSchedule"),
        (diffusers.DPMSolverMultistepScheduler(**LINEAR), "DDIM or DDPM"),
    ],
)
def test_time_travel_refusal_names_the_samplers_of_the_family(prior, scheduler, advice):
    sampler = lg.DiffusersSampler(scheduler, 10)
    schedule = sampler.schedule
    loss = lambda x0: (x0**2).sum(1)  # noqa: E731
    with pytest.raises(ValueError, match="time travel") as err:
        lg.sample(prior.denoiser(schedule), sampler, lg.preset("freedom", n_recur=2), loss, shape=(prior.dim,),
                  seeds=[0], dtype=F64)  # fmt: skip
    assert advice in str(err.value)
    if schedule.family != "vp":
        assert "DDPM" not in str(err.value)


def test_presets_are_listed_and_autoguidance_is_top_level():
    from lossguide.autoguidance import autoguidance

    listed = lg.list_presets()
    assert list(listed) == list(lg.PRESETS)
    assert all(len(v) > 10 and "\n" not in v for v in listed.values())
    assert listed["shen2024"].startswith("Shen et al. (2024)")
    assert lg.autoguidance is autoguidance
