"""Autoguidance (Karras et al. 2024) on the Gaussian-mixture oracle: the exact denoiser guided by a worse one.

The "bad" model is the same mixture with every covariance inflated by 2.25 (standard deviations × 1.5), built with
the oracle's own classes, so both denoisers are exact for their mixtures and share the schedule.
"""

import pytest
import torch

import lossguide as lg
from lossguide import presets
from lossguide.augment import GaussianJitter
from lossguide.autoguidance import AutoGuided, autoguidance, same_schedule
from lossguide.harness.settings import load as load_settings
from lossguide.harness.tasks import method_loss
from lossguide.oracle import GaussianMixture, class_task
from lossguide.schedule import NoiseSchedule

INFLATE = 2.25
#: each preset's step parameter on the oracle's class task (the shipped settings store, `lossguide oracle --tune`;
#: tfg's mu follows its rho by default)
ORACLE_CLASS = load_settings()["oracle-class"]


@pytest.fixture(scope="module")
def bad_prior(prior):
    return GaussianMixture(prior.means, prior.covs * INFLATE, prior.weights)


@pytest.fixture(scope="module")
def pair(prior, bad_prior, schedule):
    return prior.denoiser(schedule), bad_prior.denoiser(schedule)


def _run(den, sampler, seeds, guidance=None, loss=None):
    return lg.sample(den, sampler, guidance, loss, shape=(8,), seeds=seeds, dtype=torch.float64,
                     augment=GaussianJitter(0.05))  # fmt: skip


def _spread(prior, x):
    """Mean of (x − m_k)ᵀ C_k⁻¹ (x − m_k)/d over samples, k the good model's most likely component (1: exact
    samples), and the share of samples per component."""
    k = prior.component_log_posterior(x, 1.0).argmax(1)
    diff = x - prior.means[k]
    maha = (diff * torch.linalg.solve(prior.covs[k], diff.unsqueeze(-1)).squeeze(-1)).sum(1) / prior.dim
    return float(maha.mean()), torch.bincount(k, minlength=prior.n_components).double() / len(x)


def test_the_combination_is_eq2_on_x0_and_eps_and_stays_consistent_with_x_t(pair, schedule):
    good, bad = pair
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t, w = 400, 2.5
    out, g, b = autoguidance(good, bad, w)(x, t), good(x, t), bad(x, t)
    torch.testing.assert_close(out.x0_hat, b.x0_hat + w * (g.x0_hat - b.x0_hat), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.eps, b.eps + w * (g.eps - b.eps), rtol=0, atol=1e-12)
    a, s = schedule.alpha(t), schedule.sigma(t)
    torch.testing.assert_close(a * out.x0_hat + s * out.eps, x, rtol=0, atol=1e-12)
    assert (out.x0_hat - g.x0_hat).abs().max() > 1e-3  # the bad model does change the estimate


def test_w1_is_the_good_model_and_w0_the_bad_model_bit_for_bit(pair, prior, schedule):
    """Guided stochastic sampling (FreeDoM through the denoiser, DDPM noise from per-sample generators)."""
    good, bad = pair
    task = class_task(prior, schedule)
    cfg = presets.get("freedom", **ORACLE_CLASS["freedom"])
    for w, ref in ((1.0, good), (0.0, bad)):
        ag = autoguidance(good, bad, w)
        got = _run(ag, lg.DDPM(schedule, 40), range(16), cfg, task.loss)
        want = _run(ref, lg.DDPM(schedule, 40), range(16), cfg, task.loss)
        assert torch.equal(got.x0, want.x0), w
        assert ag.net_calls == got.stats.nfe  # one network per call at w ∈ {0, 1}


def test_autoguidance_concentrates_each_component_without_moving_the_mixture_weights(pair, prior):
    """Exact samples have spread 1 (DDIM-50 gives the good model 0.85); the bad model's is ≈ 2.25× that; w > 1
    shrinks it below the good model's, more so as w grows, while the share of each component stays put."""
    good, bad = pair
    schedule = good.schedule
    spread, share = {}, {}
    for w in (0.0, 1.0, 2.0, 3.0):
        x = _run(autoguidance(good, bad, w), lg.DDIM(schedule, 50), range(1024)).x0
        spread[w], share[w] = _spread(prior, x)
    assert 0.75 < spread[1.0] < 0.95, spread
    assert 2.0 < spread[0.0] / spread[1.0] < 2.7, spread
    assert spread[2.0] < 0.55 * spread[1.0], spread
    assert spread[3.0] < 0.6 * spread[2.0], spread
    assert (share[2.0] - share[1.0]).abs().max() < 0.03, share
    assert (share[1.0] - prior.weights).abs().max() < 0.03, share


def test_two_network_calls_per_evaluation_and_gradients_flow_through_both(pair, schedule):
    good, bad = pair
    w, t = 2.0, 300
    ag = autoguidance(good, bad, w)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (g_ag,) = torch.autograd.grad((ag(x, t).x0_hat * v).sum(), x)
    (g_good,) = torch.autograd.grad((good(x, t).x0_hat * v).sum(), x)
    (g_bad,) = torch.autograd.grad((bad(x, t).x0_hat * v).sum(), x)
    torch.testing.assert_close(g_ag, g_bad + w * (g_good - g_bad), rtol=0, atol=1e-10)
    assert ag.net_calls == 2
    assert (g_good - g_bad).abs().max() > 1e-3


def test_levels_from_the_sampler_reach_both_models(schedule):
    seen = []

    class Recorder:
        def __init__(self, name):
            self.name, self.schedule = name, schedule

        def __call__(self, x_t, t, alpha=None, sigma=None):
            seen.append((self.name, t, alpha, sigma))
            return lg.DenoiserOutput(eps=torch.zeros_like(x_t), x0_hat=x_t / alpha)

    ag = autoguidance(Recorder("good"), Recorder("bad"), 1.5)
    ag(torch.ones(2, 3), 7, alpha=0.5, sigma=0.75)
    assert seen == [("good", 7, 0.5, 0.75), ("bad", 7, 0.5, 0.75)]


def test_different_schedules_or_bad_weights_are_clear_errors(prior, schedule):
    good = prior.denoiser(schedule)
    with pytest.raises(ValueError, match="one noise schedule"):
        autoguidance(good, prior.denoiser(NoiseSchedule.cosine()), 2.0)
    with pytest.raises(ValueError, match="one noise schedule"):
        autoguidance(good, prior.denoiser(NoiseSchedule.linear(final_alpha_bar=0.9999)), 2.0)
    assert same_schedule(schedule, NoiseSchedule.linear())  # an equal schedule built separately is accepted
    for w in (float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="finite number"):
            autoguidance(good, good, w)
    with pytest.raises(TypeError, match="must be a denoiser"):
        autoguidance(good, lambda x, t: x, 2.0)


SAMPLERS = {
    "ddim": lambda s: lg.DDIM(s, 20),
    "ddim-eta1": lambda s: lg.DDIM(s, 20, eta=1.0),
    "ddpm": lambda s: lg.DDPM(s, 20),
    "dpmsolver": lambda s: lg.DiffusersSampler(
        __import__("diffusers").DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), 20
    ),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_the_autoguided_prior_with_per_sample_streams(pair, prior, schedule, name):
    """Guided by MPGD (an x0 step, which every sampler takes, the stateful multistep solver included): a sample's
    numbers do not depend on its batch-mates, and the guidance still reaches the target component."""
    good, bad = pair
    task = class_task(prior, schedule)
    target = int(task.name.split("-")[1])
    cfg = presets.get("mpgd", **ORACLE_CLASS["mpgd"])
    ag = autoguidance(good, bad, 2.0)
    full = _run(ag, SAMPLERS[name](schedule), range(8), cfg, task.loss)
    alone = _run(ag, SAMPLERS[name](schedule), [5], cfg, task.loss)
    torch.testing.assert_close(alone.x0[0], full.x0[5], rtol=0, atol=1e-10)
    assert ag.net_calls == 2 * (full.stats.nfe + alone.stats.nfe)
    hit = prior.component_log_posterior(full.x0, 1.0).argmax(1) == target
    assert hit.double().mean() >= 0.75, name


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_preset_guides_the_autoguided_prior(pair, prior, schedule, name):
    """Class task, 64 samples, DDIM-25, each preset at its oracle setting: the target share rises above the
    unguided autoguided prior's, and a preset that backpropagates does so through the combination."""
    good, bad = pair
    task = class_task(prior, schedule)
    target = int(task.name.split("-")[1])
    cfg = presets.get(name, **ORACLE_CLASS.get(name, {}))
    loss = method_loss(cfg, task.loss, lambda: task.noisy_loss)  # the task decides: cg noise-aware, naive_grad ℓ(x_t)
    ag = autoguidance(good, bad, 2.0)
    res = _run(ag, lg.DDIM(schedule, 25), range(64), cfg if cfg.enabled else None, loss if cfg.enabled else None)
    assert torch.isfinite(res.x0).all()
    assert ag.net_calls == 2 * res.stats.nfe
    share = float((prior.component_log_posterior(res.x0, 1.0).argmax(1) == target).double().mean())
    if name == "none":
        assert share < 0.35, share  # the target is the least likely component (weight ≈ 0.19)
    else:
        assert share >= 0.6, (name, share)
    single = _run(good, lg.DDIM(schedule, 25), range(64), cfg if cfg.enabled else None, loss if cfg.enabled else None)
    assert res.stats.denoiser_grads == single.stats.denoiser_grads
    assert res.stats.nfe == single.stats.nfe


def test_repr_and_attributes(pair):
    good, bad = pair
    ag = autoguidance(good, bad, 1.5)
    assert isinstance(ag, AutoGuided) and repr(ag) == "AutoGuided(w=1.5)"
    assert ag.schedule is good.schedule and ag.family == "vp" and ag.prediction_type == "epsilon"


# -- the shipped bad MNIST model ----------------------------------------------------------------------------------
def _bad_shipped():
    from lossguide import models

    return "mnist-ddpm-bad" in models.manifest() and (models.DENOISERS["mnist-ddpm-bad"] / "unet").exists()


needs_bad = pytest.mark.skipif(not _bad_shipped(), reason="mnist-ddpm-bad is not shipped in this checkout")


@needs_bad
def test_shipped_bad_model_matches_its_manifest_and_is_a_smaller_earlier_mnist_ddpm():
    from lossguide import models

    entry = models.manifest()["mnist-ddpm-bad"]
    folder = models.DENOISERS["mnist-ddpm-bad"]
    for rel, digest in entry["files"].items():
        assert models.sha256(folder / rel) == digest, rel
    good, bad = models.load_denoiser("mnist-ddpm"), models.load_denoiser("mnist-ddpm-bad")
    assert same_schedule(good.denoiser.schedule, bad.denoiser.schedule)
    assert bad.sample_shape == good.sample_shape and bad.augment == good.augment
    from diffusers import UNet2DModel

    def n_params(name):
        return sum(p.numel() for p in UNet2DModel.from_pretrained(models.DENOISERS[name] / "unet").parameters())

    assert n_params("mnist-ddpm-bad") == entry["training"]["parameters"]
    assert 3 * n_params("mnist-ddpm-bad") < n_params("mnist-ddpm")  # smaller ...
    assert 4 * entry["training"]["iters"] < models.manifest()["mnist-ddpm"]["training"]["iters"]  # ... and earlier
    # autoguidance of the two: w = 1 is the shipped model exactly, w = 2 moves the samples
    sampler = lg.DDIM(good.denoiser.schedule, 5)
    ref = lg.sample(good.denoiser, sampler, shape=good.sample_shape, seeds=[0, 1]).x0
    ag1 = lg.sample(autoguidance(good.denoiser, bad.denoiser, 1.0), sampler, shape=good.sample_shape, seeds=[0, 1]).x0
    ag2 = lg.sample(autoguidance(good.denoiser, bad.denoiser, 2.0), sampler, shape=good.sample_shape, seeds=[0, 1]).x0
    assert torch.equal(ag1, ref)
    assert (ag2 - ref).abs().mean() > 0.01


@needs_bad
def test_autoguidance_experiment_quick(tmp_path):
    import json

    from lossguide import experiments

    summary = experiments.run("autoguidance", tmp_path / "ag", quick=True)
    out = tmp_path / "ag"
    report = (out / "report.md").read_text()
    assert "lossguide experiment autoguidance --quick" in report and "**Reading.**" in report
    for f in ("results.json", "results.csv", "autoguidance.png", "samples.png"):
        assert (out / f).exists(), f
    rows = json.loads((out / "results.json").read_text())["rows"]
    un = {r["w"]: r for r in rows if r["part"] == "unguided"}
    assert set(un) == {0.0, 1.0, 2.0}
    assert un[1.0]["net_calls_per_sample"] == 10 and un[2.0]["net_calls_per_sample"] == 20
    guided = [r for r in rows if r["part"] == "class-feature"]
    assert {(r["method"], r["w"]) for r in guided} == {(m, w) for m in ("shen2024", "dreamguider") for w in (1.0, 2.0)}
    for r in guided:
        assert (r["denoiser_grads"] > 0) == (r["method"] == "shen2024")
        assert 0.0 <= r["judge_validity"] <= 1.0
    assert summary["fid_w1"] == un[1.0]["fid"]
