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


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("shen2024", dict(eta=float("nan")), r"eta must be a finite number > 0, got nan"),
        ("shen2024", dict(eta=float("inf")), r"eta must be a finite number > 0, got inf"),
        ("shen2024", dict(eta="abc"), r"eta must be a finite number > 0, got 'abc' \(str\)"),
        ("shen2024", dict(eta=-1), r"eta must be a finite number > 0, got -1"),
        ("shen2024", dict(n_aug=2.0), r"n_aug must be an integer ≥ 0, got 2.0 \(float\); write n_aug=2"),
        ("shen2024", dict(n_recur=2.5), r"n_recur must be an integer ≥ 1, got 2.5"),
        ("tfg", dict(n_iter=0), r"n_iter must be an integer ≥ 1, got 0"),
        ("shen2024", dict(recur_window=(0.8, 0.3)), r"recur_window must be a pair \(lo, hi\) .* got \(0.8, 0.3\)"),
        ("shen2024", dict(window=(0.0, 1.5)), r"window must be a pair \(lo, hi\) .*0 ≤ lo ≤ hi ≤ 1"),
        ("shen2024", dict(window=(-0.1, 1.0)), r"window must be a pair"),
        ("dps", dict(scale=True), r"scale must be a finite number ≥ 0, got True \(bool\)"),
        ("shen2024", dict(polyak=1), r"polyak must be true or false, got 1"),
        ("shen2024", dict(polyak_gap="ell"), r"polyak_gap must be one of 'eps', 'loss'"),
        ("tfg", dict(mu=float("nan")), r"mu must be a finite number ≥ 0 or None, got nan"),
        ("shen2024", dict(augment=3), r"augment must be a callable or None"),
    ],
)
def test_preset_parameters_are_checked_at_the_door(name, params, match):
    """presets.get (the CLI's --set, recipes' params, lg.preset) refuses a bad value in one line naming it."""
    with pytest.raises(ValueError, match=match) as e:
        lg.preset(name, **params)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"method {name!r}: {next(iter(params))} ") and "; " in msg


def test_valid_preset_parameters_pass_and_a_new_preset_is_checked_from_its_signature(monkeypatch):
    lg.preset("ugd", n_iter=0, backward_scale=0.0)  # ugd's n_iter=0 switches backward guidance off
    lg.preset("tfg", mu=None, rho=0)
    lg.preset("shen2024", eta=1, max_ratio=None, window=[0.1, 1.0], n_aug=0, augment=None)

    def mine(step: float = 1.0, n_copies: int = 2, on: bool = True, span=(0.2, 0.4)):
        return presets.none()

    monkeypatch.setitem(presets.PRESETS, "mine", mine)
    lg.preset("mine", step=0.5, n_copies=0, span=(0.1, 0.2))
    for bad in (dict(step=float("nan")), dict(n_copies=-1), dict(n_copies=1.5), dict(on="yes"), dict(span=(0, "a"))):
        with pytest.raises(ValueError, match=f"^method 'mine': {next(iter(bad))} must be"):
            lg.preset("mine", **bad)


@pytest.mark.parametrize("field", ["n_iter", "n_mc", "n_recur", "n_aug"])
def test_guidance_config_refuses_non_integral_counts(field):
    with pytest.raises(ValueError, match=f"{field} must be an integer"):
        lg.GuidanceConfig(**{field: 2.5})
    with pytest.raises(ValueError, match="mc_sigma must be a finite number ≥ 0, got nan"):
        lg.GuidanceConfig(mc_sigma=float("nan"))
