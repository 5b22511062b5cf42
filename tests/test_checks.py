"""No silent wrong answers: defaults that work, and one-line errors where a call cannot mean what it says."""

import functools
import re
import warnings

import pytest
import torch

import lossguide as lg
from lossguide import models, presets
from lossguide.harness.tasks import oracle as oracle_task
from lossguide.steps import Constant, TFGSchedule


def _target_loss(x0):
    return ((x0 - 0.7) ** 2).flatten(1).sum(1)


def test_tfg_ties_mu_to_rho_unless_set():
    cfg = presets.tfg(rho=0.1)
    assert isinstance(cfg.mu, TFGSchedule) and cfg.mu.scale == 0.1 and cfg.rho.scale == 0.1
    assert presets.tfg(rho=0.1, mu=0.5).mu.scale == 0.5
    assert presets.tfg(rho=0.1, mu=0).mu is None
    assert presets.get("tfg", rho=0.03).mu.scale == 0.03
    # the benchmarks tie them themselves and keep doing so
    assert oracle_task.method_config("tfg", {"rho": 0.01}).mu.scale == 0.01
    from lossguide.harness.methods import method_config

    assert method_config("tfg", 0.02).mu.scale == 0.02


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
        assert models.resolve("owner/name") == ("owner/name", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(models, "HUB_HOST", ("127.0.0.1", 9))  # discard port: refused at once
        assert models._hub_reachable(timeout=0.5) is False
        assert models.resolve("owner/name") == ("owner/name", True)


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

    def mine(step: float = 1.0, n_copies: int = 2, on: bool = True, span=(0.2, 0.4)):  # every parameter is read
        return lg.GuidanceConfig(name="mine", rho=Constant(step) if on else None, n_aug=n_copies, window=span)

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


# -- issue #12: the fault list's regressions (benchmarks/faults.py) ------------------------------------------
def _vec(prior, schedule, **kw):
    den, sampler = prior.denoiser(schedule), lg.DDIM(schedule, 3)
    return lg.sample(den, sampler, **{"shape": (prior.dim,), "seeds": range(2), "dtype": torch.float64, **kw})


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(generators=[torch.Generator().manual_seed(5)] * 2), "pass either seeds or generators, not both"),
        (dict(seeds=[]), "seeds must name at least one sample"),  # was "torch.cat(): expected a non-empty list"
        (dict(seeds=[0.5, 1]), r"seed 0\.5 \(float\) is not an integer"),  # was seed 0, silently
        (dict(seeds=[True, False]), r"seed True \(bool\) is not an integer"),
        (dict(seeds="0-3"), r"got the string '0-3'; parse a spec .*parse_seeds"),
        (dict(x_T=torch.zeros(2, 5, dtype=torch.float64)), r"x_T has per-sample shape \(5,\) but shape=\(8,\)"),
    ],
)
def test_sample_refuses_seeds_and_shapes_it_would_silently_reinterpret(prior, schedule, kw, match):
    with pytest.raises(ValueError, match=match):
        _vec(prior, schedule, **kw)


def test_a_diffusers_unet_checks_the_per_sample_shape(schedule):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    den = lg.from_diffusers(unet, diffusers.DDPMScheduler(clip_sample=False))
    sampler = lg.DDIM(den.schedule, 2)
    for shape in ((8, 8), (1, 8, 8)):  # was torch's "expected input[1, 1, 8, 8] to have 3 channels" from inside conv
        msg = re.escape(f"shape={shape} does not fit the model, which takes (3, H, W)")
        with pytest.raises(ValueError, match=msg):
            lg.sample(den, sampler, shape=shape, seeds=[0])
    assert lg.sample(den, sampler, shape=(3, 8, 8), seeds=[0]).x0.shape == (1, 3, 8, 8)


def test_ddim_refuses_a_nan_eta_and_a_fractional_step_count(schedule):
    for eta in (float("nan"), float("inf"), -0.5):  # nan once passed `eta < 0` and made NaN samples
        with pytest.raises(ValueError, match="DDIM eta must be a finite number ≥ 0"):
            lg.DDIM(schedule, 5, eta=eta)
    with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 1000\], got 2\.5"):
        lg.DDIM(schedule, 2.5)


def test_seed_specs_do_not_overflow_or_take_non_strings():
    from lossguide.runfolder import parse_seeds, seeds_from

    with pytest.raises(ValueError, match="more than 1,000,000"):  # was OverflowError from len(range)
        parse_seeds("0-999999999999999999999")
    with pytest.raises(ValueError, match="seeds must be a spec string"):
        parse_seeds(None)
    assert seeds_from([3, 1]) == [3, 1] and seeds_from(5) == [5] and seeds_from("0-2") == [0, 1, 2]
    for bad in ([0.5], ["a"], [True], {"a": 1}):
        with pytest.raises(ValueError, match="bad seeds"):
            seeds_from(bad)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(steps="2"), r"--steps must be an integer, got '2' \(str\)"),
        (dict(seeds=[0.5]), r"--seeds must be distinct integers ≥ 0 \(bad seed 0\.5\)"),  # was a format-code error
        (dict(seeds=[]), r"--seeds must name at least one seed"),  # was ZeroDivisionError
        (dict(params=[1]), "params must be a mapping"),
        (dict(ddim_eta=float("nan")), "--ddim-eta must be a finite number ≥ 0"),
        (dict(loss="class", norm="l2"), "--norm l2 sets the residual of a reference loss"),
    ],
)
def test_run_sample_checks_its_config_before_loading_anything(changes, match):
    from lossguide import run_sample

    with pytest.raises(ValueError, match=match):
        run_sample.check_config(run_sample.SampleConfig(**changes))


def test_class_plus_sketch_takes_the_norm():
    """--loss class+sketch --norm l2 once ignored the norm (its sketch term was always squared)."""
    from lossguide import losses
    from lossguide.harness.tasks.mnist import task_loss

    loss = task_loss("class+sketch", torch.nn.Identity(), 3, torch.zeros(1, 1, 28, 28), norm="l2")
    assert [t.norm for _, t in loss.terms if isinstance(t, losses.SketchLoss)] == ["l2"]


def test_load_network_and_load_denoiser_refuse_flags_that_are_not_a_mapping(tmp_path):
    (tmp_path / "net.pt").write_bytes(b"")
    with pytest.raises(TypeError, match="flags must be a mapping of the checkpoint's constructor flags"):
        models.load_network(tmp_path / "net.pt", ["ch", 8])  # was "dictionary update sequence element #0 ..."
    with pytest.raises(TypeError, match="flags must be a mapping"):
        models.load_denoiser(str(tmp_path / "net.pt"), flags=["ch", 8])


def test_a_damaged_seed_in_a_resumed_run_folder_is_redone(tmp_path, caplog):
    """A truncated PNG or record (not written by the folder's atomic writes) once failed the whole resume."""
    from lossguide.runfolder import RunFolder, png_bytes, to_uint8

    with RunFolder(tmp_path / "run").open("a: 1\n") as f:
        for s in range(3):
            f.write_seed(s, png_bytes(to_uint8(torch.zeros(1, 4, 4))), {"seed": s})
        assert f.todo([0, 1, 2]) == []
        png = f.png(0).read_bytes()
        f.png(0).write_bytes(png[: len(png) // 2])
        f.record(2).write_text('{"seed": 2, "lo')
        with caplog.at_level("WARNING", logger="lossguide.runfolder"):
            assert f.todo([0, 1, 2]) == [0, 2]
    msgs = [r.getMessage() for r in caplog.records if "redoing it" in r.getMessage()]
    assert len(msgs) == 2 and "does not match its record's checksum" in msgs[0] and "unreadable" in msgs[1], msgs


def test_an_atomic_write_that_fails_names_the_target_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno
    import os

    from lossguide.io import atomic_write_json

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        atomic_write_json(tmp_path / "o.json", {"a": 1})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "o.json")
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError) as e:  # os.replace onto a folder: the target, not the .tmp, is named
        atomic_write_json(tmp_path / "d", {})
    assert e.value.filename == str(tmp_path / "d") and list(tmp_path.iterdir()) == [tmp_path / "d"]
