"""No silent wrong answers: defaults that work, and one-line errors where a call cannot mean what it says."""

import functools
import warnings

import pytest
import torch

import lossguide as lg
from lossguide import models, oracle_bench, presets
from lossguide.steps import TFGSchedule


def _target_loss(x0):
    return ((x0 - 0.7) ** 2).flatten(1).sum(1)


def test_tfg_ties_mu_to_rho_unless_set():
    cfg = presets.tfg(rho=0.1)
    assert isinstance(cfg.mu, TFGSchedule) and cfg.mu.scale == 0.1 and cfg.rho.scale == 0.1
    assert presets.tfg(rho=0.1, mu=0.5).mu.scale == 0.5
    assert presets.tfg(rho=0.1, mu=0).mu is None
    assert presets.get("tfg", rho=0.03).mu.scale == 0.03
    # the benchmarks tie them themselves and keep doing so
    assert oracle_bench.method_config("tfg", {"rho": 0.01}).mu.scale == 0.01
    from lossguide import bench

    assert bench.method_config("tfg", 0.02).mu.scale == 0.02


def test_a_noise_aware_method_refuses_a_loss_of_x0_alone(prior, schedule):
    den, sampler = prior.denoiser(schedule), lg.DDIM(schedule, 4)
    run = dict(shape=(prior.dim,), seeds=range(2), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"calls loss\(x_t, t\), but _target_loss does not take"):
        lg.sample(den, sampler, lg.preset("cg"), _target_loss, **run)
    with pytest.raises(ValueError, match="method 'cg'"):
        lg.sample(den, sampler, lg.preset("freedom"), lambda x_t, t: _target_loss(x_t), **run)
    # loss(x_t, t) in any callable form runs and guides (the same samples, not the unguided ones)
    plain = lg.sample(den, sampler, **run).x0
    forms = (lambda x, t: _target_loss(x), functools.partial(lambda x, t, w: w * _target_loss(x), w=1.0))
    a, b = (lg.sample(den, sampler, lg.preset("cg", scale=0.01), loss, **run).x0 for loss in forms)
    assert torch.equal(a, b) and not torch.allclose(a, plain)
    # a loss whose signature cannot be read (a module's forward(*args)) is left to the call
    lg.GuidanceEngine(lg.preset("cg"), torch.nn.Identity())


def test_augmentations_are_exported():
    assert lg.GaussianJitter is lg.augment.GaussianJitter and lg.DiffAugment is lg.augment.DiffAugment
    assert {"GaussianJitter", "DiffAugment"} <= set(lg.__all__)


def test_hub_probe_warns_nothing(monkeypatch):
    """Resolving a hub id (offline and online paths) raises no deprecation or other warnings."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models._resolve("owner/name") == ("owner/name", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(models, "HUB_HOST", ("127.0.0.1", 9))  # discard port: refused at once
        assert models._hub_reachable(timeout=0.5) is False
        assert models._resolve("owner/name") == ("owner/name", True)
