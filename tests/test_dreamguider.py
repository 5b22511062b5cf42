"""The dreamguider preset (Nair & Patel 2024): no backprop through the denoiser, its step rule, and on the oracle
it moves samples toward the exact posterior."""

import pytest
import torch

import lossguide as lg
from lossguide import presets
from lossguide.augment import GaussianJitter
from lossguide.dreamguider import DreamguiderStep
from lossguide.metrics import sliced_wasserstein
from lossguide.oracle import class_task, linear_task
from lossguide.steps import StepContext

JITTER = GaussianJitter(0.05)


def _sample(den, schedule, cfg, loss, seeds, steps=50):
    return lg.sample(den, lg.DDIM(schedule, steps), cfg, loss, shape=(8,), seeds=seeds, dtype=torch.float64,
                     augment=JITTER)  # fmt: skip


def test_dreamguider_never_differentiates_through_the_denoiser(prior, schedule):
    """Zero denoiser backward passes (the stats counter), the denoiser always runs without autograd, and each of
    the 50 steps takes one x0-space gradient of ℓ averaged over 4 augmented copies."""
    task = class_task(prior, schedule)
    base = prior.denoiser(schedule)
    grad_modes = []

    def watched(x_t, t, **kw):
        grad_modes.append(torch.is_grad_enabled() or x_t.requires_grad)
        return base(x_t, t, **kw)

    watched.schedule = base.schedule
    res = _sample(watched, schedule, presets.get("dreamguider"), task.loss, range(32))
    assert res.stats.denoiser_grads == 0
    assert not any(grad_modes) and len(grad_modes) == 50
    assert res.stats.nfe == 50 and res.stats.loss_grads == 50 and res.stats.loss_evals == 50 * 4


@pytest.mark.parametrize("make", [class_task, linear_task])
def test_dreamguider_moves_samples_toward_the_exact_posterior(prior, schedule, make):
    """Sliced W2 to 4,096 exact posterior samples, 256 samples, DDIM-50, default parameters: the class task's
    distance falls by at least 3× (unguided ≈ 0.65 → ≈ 0.10) and its target share rises from ≈ 0.20 to ≥ 0.85
    (0.89); the linear task's falls by at least 20% (≈ 0.20 → ≈ 0.13), its mean loss by at least 3× (2.5 → 0.3)."""
    task = make(prior, schedule)
    post = task.posterior.sample(4096, torch.Generator().manual_seed(123))[0]
    den = prior.denoiser(schedule)
    none = _sample(den, schedule, None, None, range(256)).x0
    dg = _sample(den, schedule, presets.get("dreamguider"), task.loss, range(256)).x0
    sw_none, sw_dg = sliced_wasserstein(none, post), sliced_wasserstein(dg, post)
    if task.name.startswith("class"):
        assert sw_dg < sw_none / 3, (sw_dg, sw_none)
        target = int(task.name.split("-")[1])
        share = lambda x: float((prior.component_log_posterior(x, 1.0).argmax(1) == target).double().mean())  # noqa: E731
        assert share(none) < 0.3 and share(dg) >= 0.85, (share(none), share(dg))
    else:
        assert sw_dg < 0.8 * sw_none, (sw_dg, sw_none)
        assert float(task.loss(dg).mean()) < float(task.loss(none).mean()) / 3


def test_the_update_does_not_depend_on_the_loss_units(prior, schedule):
    """ℓ → 100·ℓ scales every gradient and their running RMS alike: the same samples (the empirical scale)."""
    task = linear_task(prior, schedule)
    cfg = presets.get("dreamguider", n_aug=0)
    a = _sample(prior.denoiser(schedule), schedule, cfg, task.loss, range(16), steps=20).x0
    b = _sample(prior.denoiser(schedule), schedule, cfg, lambda x: 100.0 * task.loss(x), range(16), steps=20).x0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    none = _sample(prior.denoiser(schedule), schedule, None, None, range(16), steps=20).x0
    assert (a - none).abs().max() > 0.05  # and guidance did act


def test_a_sample_does_not_depend_on_its_batch_or_on_an_earlier_run(prior, schedule):
    task = class_task(prior, schedule)
    cfg = presets.get("dreamguider")
    den = prior.denoiser(schedule)
    full = _sample(den, schedule, cfg, task.loss, range(8), steps=20).x0
    alone = _sample(den, schedule, cfg, task.loss, [6], steps=20).x0  # the rule's history restarts here
    again = _sample(den, schedule, cfg, task.loss, range(8), steps=20).x0
    torch.testing.assert_close(alone[0], full[6], rtol=0, atol=1e-12)
    assert torch.equal(full, again)


def _ctx(i, grad, eps, schedule, steps=50):
    sampler = lg.DDIM(schedule, steps)
    return StepContext(i=i, alpha_bars=sampler.alpha_bar_pairs(), eps=eps, grad=grad, loss=torch.zeros(len(grad)),
                       levels=sampler.level_list())  # fmt: skip


def test_step_rule_is_c_plus_d_delta_rho_times_noise_norm_over_running_rms(schedule):
    rule = DreamguiderStep(eps_weight=0.1, x0_weight=0.03)
    eps = torch.full((2, 4), 0.5, dtype=torch.float64)  # ‖ε‖ = 1
    g1 = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]], dtype=torch.float64)
    sampler = lg.DDIM(schedule, 50)
    for i, g, rms in ((0, g1, [1.0, 2.0]), (1, 3 * g1, [5**0.5, 2 * 5**0.5])):
        a, s, ap, sp = sampler.levels(i)
        want = (0.03 + 0.1 * (s / a - sp / ap)) / torch.tensor(rms, dtype=torch.float64)
        torch.testing.assert_close(rule(_ctx(i, g, eps, schedule)), want, rtol=1e-12, atol=0)
    # the ε-term dominates the first step and the x0-term the last (the time-varying regulation)
    first = [sampler.levels(0)[j] for j in range(4)]
    last = [sampler.levels(49)[j] for j in range(4)]
    assert 0.1 * (first[1] / first[0] - first[3] / first[2]) > 30 * 0.03
    assert 0.1 * (last[1] / last[0] - last[3] / last[2]) < 0.03
    # a new trajectory (step index back to 0) forgets the history; a zero gradient takes no step
    zero = torch.zeros(2, 4, dtype=torch.float64)
    ctx = _ctx(0, torch.cat([g1[:1], zero[:1]]), eps, schedule)
    step = rule(ctx)
    assert float(step[0]) == pytest.approx((0.03 + 0.1 * (first[1] / first[0] - first[3] / first[2])) / 1.0)
    assert float(step[1]) == 0.0 and ctx.stats["zero_grad"].tolist() == [False, True]


def test_preset_parameters_are_checked(schedule):
    with pytest.raises(ValueError, match="eps_weight"):
        presets.get("dreamguider", eps_weight=-1.0)
    with pytest.raises(ValueError, match="n_aug"):
        presets.get("dreamguider", n_aug=-1)
    with pytest.raises(ValueError, match="no augmentation was given"):
        lg.sample(_dummy(schedule), lg.DDIM(schedule, 2), presets.get("dreamguider"), lambda x: x.pow(2).sum(1),
                  shape=(3,), seeds=[0])  # fmt: skip
    cfg = presets.get("dreamguider", n_aug=0, eps_weight=0.2)
    assert cfg.name == "dreamguider" and cfg.rho is None and cfg.mu_hold == "eps" and cfg.n_aug == 0
    assert cfg.to_dict()["mu"] == {"rule": "DreamguiderStep", "eps_weight": 0.2, "x0_weight": 0.03,
                                   "min_grad_norm": 1e-12, "noise_margin": 5.0}  # fmt: skip


def _dummy(schedule):
    return lg.Denoiser(lambda x, t: torch.zeros_like(x), schedule)


def test_the_noise_norm_is_capped_at_sqrt_d_plus_the_margin(schedule):
    """Off the data ε_hat grows with |x_t|/σ_t: the rule's "distance" is min(‖ε_hat‖, √D + noise_margin), so a
    sample with ‖ε_hat‖ = 100·√D steps as one with √D + 5; below the cap the rule is unchanged."""
    sampler = lg.DDIM(schedule, 50)
    a, s, ap, sp = sampler.levels(10)
    factor = 0.03 + 0.1 * (s / a - sp / ap)
    g = torch.ones(2, 4, dtype=torch.float64)  # ‖g‖ = 2 = the running RMS at the first step
    eps = torch.stack([torch.full((4,), 50.0), torch.full((4,), 0.25)]).double()  # ‖ε‖ = 100 and 0.5; √D = 2
    for margin, want in ((5.0, [7.0, 0.5]), (None, [100.0, 0.5])):
        rule = DreamguiderStep(eps_weight=0.1, x0_weight=0.03, noise_margin=margin)
        got = rule(_ctx(10, g, eps, schedule))
        torch.testing.assert_close(got, factor * torch.tensor(want, dtype=torch.float64) / 2, rtol=1e-12, atol=0)


def _families():
    import diffusers

    from lossguide.schedule import FlowSchedule, SigmaSchedule

    linear = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    return {
        "ve-edm-euler": lambda: lg.EDMEuler(SigmaSchedule(), 50),
        "sigma-euler-diffusers": lambda: lg.DiffusersSampler(diffusers.EulerDiscreteScheduler(**linear), 50),
        "vp-dpmsolver-diffusers": lambda: lg.DiffusersSampler(diffusers.DPMSolverMultistepScheduler(**linear), 50),
        "flow-ddim": lambda: lg.DDIM(FlowSchedule(), 50),
    }


#: max |x| of 256 samples at scale 10 (oracle linear task, seeds 0-255 / 256-511; the data's |x| ≤ 2.5): EDM Euler
#: 2.2 / 2.5, σ-space Euler 7.9, DPMSolver 12, flow DDIM 2.2 / 2.5; uncapped (noise_margin=None, seeds 0-255): 8.2,
#: 185, 3.0e3 and 791
MAX_ABS_AT_SCALE_10 = 30.0


@pytest.mark.filterwarnings("ignore:.*guidance did nothing")
@pytest.mark.parametrize("family", list(_families()))
def test_dreamguider_at_ten_times_its_scale_stays_bounded_in_every_family(prior, family):
    """The guard holds in every family: at scale 10 (over-scaled: SW to the posterior 0.2-0.9 against 0.13 at
    scale 1) no sample leaves |x| ≤ 30 on EDM Euler, diffusers' σ-space Euler and DPMSolver, and flow DDIM."""
    from lossguide.oracle import linear_task

    sampler = _families()[family]()
    task = linear_task(prior, sampler.schedule)
    cfg = presets.get("dreamguider", scale=10.0)
    x = lg.sample(prior.denoiser(sampler.schedule), sampler, cfg, task.loss, shape=(prior.dim,), seeds=range(256),
                  dtype=torch.float64, augment=JITTER).x0  # fmt: skip
    assert torch.isfinite(x).all() and float(x.norm(dim=1).max()) < MAX_ABS_AT_SCALE_10, family
