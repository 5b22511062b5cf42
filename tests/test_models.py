"""Model loading: diffusers folders (any prediction type), clear errors for missing checkpoints,
and the shipped MNIST models against their manifest."""

import json
import time

import pytest
import torch

import lossguide as lg
from lossguide import models
from lossguide.models import ModelNotFoundError, load_classifier, load_denoiser

diffusers = pytest.importorskip("diffusers")


def _tiny_folder(tmp_path, prediction_type):
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )  # fmt: skip
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(prediction_type=prediction_type, clip_sample=False).save_pretrained(tmp_path / "scheduler")
    return unet.eval()


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_local_diffusers_folder_loads_with_its_prediction_type(tmp_path, pred):
    unet = _tiny_folder(tmp_path, pred)
    m = load_denoiser(str(tmp_path))
    assert m.sample_shape == (1, 8, 8) and m.denoiser.prediction_type == pred
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = 300
    ab = float(m.scheduler.alphas_cumprod[t])
    with torch.no_grad():
        raw = unet(x, torch.full((2,), t)).sample
        out = m.denoiser(x, t)
    want_x0 = {"epsilon": (x - (1 - ab) ** 0.5 * raw) / ab**0.5, "sample": raw,
               "v_prediction": ab**0.5 * x - (1 - ab) ** 0.5 * raw}[pred]  # fmt: skip
    torch.testing.assert_close(out.x0_hat, want_x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ab**0.5 * out.x0_hat + (1 - ab) ** 0.5 * out.eps, x, rtol=1e-4, atol=1e-4)


def test_guided_sampling_on_a_diffusers_unet_lowers_the_loss(tmp_path):
    _tiny_folder(tmp_path, "v_prediction")
    m = load_denoiser(str(tmp_path))

    def loss(x0):
        return (x0 - 0.5).pow(2).flatten(1).sum(1)

    sampler = lg.DDIM(m.denoiser.schedule, 8)
    base = loss(lg.sample(m.denoiser, sampler, shape=m.sample_shape, seeds=range(3)).x0)
    for name, p in [("freedom", dict(scale=0.05)), ("dps", dict(scale=0.3)), ("mpgd", dict(scale=0.2))]:
        got = loss(lg.sample(m.denoiser, sampler, lg.preset(name, **p), loss, shape=m.sample_shape, seeds=range(3)).x0)
        assert (got < base).all(), (name, got, base)


@pytest.mark.parametrize("offline", ["1", "0"])
def test_unreachable_hub_id_fails_fast_with_a_clear_error(monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    t0 = time.time()
    with pytest.raises(ModelNotFoundError, match="local diffusers folder"):
        load_denoiser("google/ddpm-ema-celebahq-256")
    assert time.time() - t0 < 10


def test_unknown_names_are_clear_errors():
    with pytest.raises(ModelNotFoundError, match="not a shipped name"):
        load_denoiser("no-such-model")
    with pytest.raises(ModelNotFoundError, match="unknown classifier"):
        load_classifier("mnist-nope")


# -- the shipped models ---------------------------------------------------------------------------------
MANIFEST = models.manifest()
needs_weights = pytest.mark.skipif(not MANIFEST, reason="no shipped weights in this checkout")


@needs_weights
@pytest.mark.parametrize("name", [n for n in models.CLASSIFIERS if n in MANIFEST])
def test_shipped_classifier_matches_its_manifest(name):
    from lossguide.data import load_mnist
    from lossguide.schedule import NoiseSchedule
    from lossguide.training.classifiers import accuracy

    entry = MANIFEST[name]
    assert models.sha256(models.WEIGHTS / entry["file"]) == entry["sha256"]
    model = load_classifier(name, check_hash=True)
    x, y = load_mnist("heldout")
    if entry["kind"] == "noise_aware_classifier":
        gen = torch.Generator().manual_seed(12345)
        for t in [int(k.removeprefix("heldout_acc_t")) for k in entry["metrics"]]:  # measured order
            got = accuracy(model, x, y, t, gen, NoiseSchedule.linear())
            assert got == pytest.approx(entry["metrics"][f"heldout_acc_t{t}"], abs=2e-4)
    else:
        assert accuracy(model, x, y) == pytest.approx(entry["metrics"]["heldout_acc"], abs=2e-4)
    if name in ("mnist-guide", "mnist-judge"):
        assert entry["metrics"]["heldout_acc"] >= 0.97


@needs_weights
def test_shipped_weights_are_small():
    total = sum(p.stat().st_size for p in models.WEIGHTS.rglob("*") if p.is_file())
    assert total <= 21e6, total  # 10.7 MB before mnist-flow (fp16, 5.1 MB, the DDPM's size) was added
    assert json.loads(models.MANIFEST.read_text())


@needs_weights
def test_shipped_ddpm_matches_its_manifest():
    """File hashes, and the judge's labels of the first 64 unguided DDIM-50 samples (seeds 0..63)."""
    entry = MANIFEST["mnist-ddpm"]
    folder = models.DENOISERS["mnist-ddpm"]
    for rel, digest in entry["files"].items():
        assert models.sha256(folder / rel) == digest, rel
    m = load_denoiser("mnist-ddpm")
    judge = load_classifier("mnist-judge")
    x = lg.sample(m.denoiser, lg.DDIM(m.denoiser.schedule, 50), shape=m.sample_shape, seeds=range(64)).x0
    with torch.no_grad():
        labels = judge(x.clamp(-1, 1)).argmax(1).tolist()
    same = sum(a == b for a, b in zip(labels, entry["metrics"]["judge_labels_first64"], strict=True))
    assert same >= 63  # float rounding may flip one borderline digit across machines


def test_conditional_and_guide_loaders_name_the_fix(tmp_path):
    from lossguide.models import load_conditional, load_guide

    with pytest.raises(ModelNotFoundError, match="conditional model .*nowhere.* not found.*pass one of mnist-cond"):
        load_conditional(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="guide .* not found"):
        load_guide(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an exported conditional model: no unet, scheduler"):
        load_conditional(str(tmp_path / "empty"))


# -- a model folder's files: every missing or wrong key is one line naming the file, the key and the fix ------------
def _flow_folder(path, command=None):
    """A tiny exported flow folder as ``python -m lossguide.training flow --export`` writes it."""
    from lossguide.models import flowwrap

    unet = diffusers.UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    unet.save_pretrained(path / "unet")
    diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(path / "scheduler")
    vp = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    (path / flowwrap.WRAPPER_FILE).write_text(json.dumps(flowwrap.describe(vp)))
    if command:
        (path / "training.json").write_text(json.dumps({"command": command}))
    return path


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


WRAPPER = "flow_wrapper.json"
UNET_CFG = "unet/config.json"
SCHED_CFG = "scheduler/scheduler_config.json"
BROKEN = {  # name: (file, how it is broken, what the one line must say: the key and the fix)
    "no flow_schedule": (WRAPPER, lambda d: d.pop("flow_schedule"),
                         ['has no "flow_schedule" key', 'add "flow_schedule": {"num_train_timesteps": 1000']),
    "no vp_schedule": (WRAPPER, lambda d: d.pop("vp_schedule"), ['has no "vp_schedule" key', '"beta_end": 0.02']),
    "flow_schedule not a mapping": (WRAPPER, lambda d: d.update(flow_schedule=[1000]),
                                    ['"flow_schedule" is [1000], not a mapping', "make it {"]),
    "no beta_end": (WRAPPER, lambda d: d["vp_schedule"].pop("beta_end"),
                    ['no "beta_end" in "vp_schedule"', 'set it as in the shipped mnist-flow ({"beta_end": 0.02})']),
    "cosine vp": (WRAPPER, lambda d: d["vp_schedule"].update(beta_schedule="cosine"),
                  ['"beta_schedule" in "vp_schedule" is \'cosine\'', 'must be "linear"']),
    "timesteps not a number": (WRAPPER, lambda d: d["flow_schedule"].update(num_train_timesteps="x"),
                               ['"num_train_timesteps" in "flow_schedule" is \'x\'', "an integer ≥ 2"]),
    "other kind": (WRAPPER, lambda d: d.update(kind="Other"), ['"kind" is \'Other\'', '"FlowFromEps"']),
    "unknown unet class": (UNET_CFG, lambda d: d.update(_class_name="NoSuchNet"),
                           ['"_class_name" is \'NoSuchNet\', not a diffusers model class', 'set it to "UNet2DModel"']),
    "no sample_size": (UNET_CFG, lambda d: d.pop("sample_size"), ['has no "sample_size" key', '"sample_size": 28']),
    "in_channels a string": (UNET_CFG, lambda d: d.update(in_channels="one"),
                             ['"in_channels" is \'one\'', "a positive integer"]),
    "unknown prediction": (SCHED_CFG, lambda d: d.update(prediction_type="x0"),
                           ['"prediction_type" is \'x0\'', "one of epsilon, v_prediction, sample"]),
    "unknown beta schedule": (SCHED_CFG, lambda d: d.update(beta_schedule="cosine"),
                              ['"beta_schedule" is \'cosine\'', "one of linear, scaled_linear, squaredcos_cap_v2"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_model_folder_is_one_line_naming_the_file_key_and_fix(tmp_path, capsys, case):
    """``lossguide sample --model FOLDER`` with a missing or wrong key in flow_wrapper.json, unet/config.json or
    scheduler_config.json: exit code 2 and one line on stderr that names the file, the key and the fix (the
    folder's own training.json command where it has one), before anything is written."""
    from lossguide.cli import main

    rel, change, wants = BROKEN[case]
    folder = _flow_folder(tmp_path / "model", command="python -m lossguide.training flow --export model")
    if rel == SCHED_CFG:  # the VP scheduler's keys: a DDPM folder
        (folder / WRAPPER).unlink()
        diffusers.DDPMScheduler().save_pretrained(folder / "scheduler")
    _edit(folder / rel, change)
    out = tmp_path / "run"
    assert main(["sample", "--model", str(folder), "--out", str(out), "--method", "none", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lossguide sample: error: "), err
    assert str(folder / rel) in err, err
    for want in [*wants, "`python -m lossguide.training flow --export model` (its training.json's command)"]:
        assert want in err, (want, err)
    assert not out.exists()


@pytest.mark.parametrize(
    "breakage, wants",
    [
        ("no scheduler", ["scheduler/scheduler_config.json is missing", "DDPMScheduler().save_pretrained("]),
        ("no weights", ["unet has no weights (diffusion_pytorch_model.safetensors)", "pass a folder with"]),
        ("bad json", ["flow_wrapper.json is not valid JSON (", "fix the file as lossguide.models.flowwrap.describe"]),
        ("weights do not fit", ["unet does not load as a UNet2DModel (RuntimeError: Error(s) in loading state_dict",
                                "fix the key it names in", "config.json"]),
    ],
)  # fmt: skip
def test_missing_files_of_a_model_folder_are_one_line(tmp_path, capsys, breakage, wants):
    from lossguide.cli import main

    folder = _flow_folder(tmp_path / "model")
    if breakage == "no scheduler":
        (folder / SCHED_CFG).unlink()
    elif breakage == "no weights":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    elif breakage == "bad json":
        (folder / WRAPPER).write_text('{"kind": "FlowFromEps",')
    else:
        _edit(folder / UNET_CFG, lambda d: d.update(block_out_channels=[8, 32]))
    assert main(["sample", "--model", str(folder), "--out", str(tmp_path / "run"), "--method", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for want in [*wants, "`python -m lossguide.training flow --export DIR`"]:
        assert want in err, (want, err)


def test_a_valid_exported_flow_folder_still_loads(tmp_path):
    m = load_denoiser(str(_flow_folder(tmp_path / "model")))
    assert m.denoiser.prediction_type == "flow_prediction" and m.sample_shape == (1, 28, 28)


@needs_weights
@pytest.mark.parametrize("key", ["arch", "file"])
def test_a_broken_manifest_entry_is_one_line(tmp_path, capsys, monkeypatch, key):
    """A shipped classifier whose manifest entry lacks a key (or names an unknown architecture): one line naming
    manifest.json, the entry and the key, and the fix (reinstall)."""
    from lossguide.cli import main

    data = models.manifest()
    data["mnist-guide"].pop(key)
    broken = tmp_path / "manifest.json"
    broken.write_text(json.dumps(data))
    monkeypatch.setattr(models, "MANIFEST", broken)
    assert main(["sample", "--out", str(tmp_path / "run"), "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{broken}: the entry 'mnist-guide' has no \"{key}\"" in err and "reinstall lossguide" in err, err
    if key == "arch":
        data["mnist-guide"]["arch"] = "NoSuchNet"
        broken.write_text(json.dumps(data))
        with pytest.raises(models.ModelFolderError, match="'mnist-guide' has \"arch\" 'NoSuchNet'.*GuideCNN"):
            load_classifier("mnist-guide")
