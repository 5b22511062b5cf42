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
        for t in (0, 200, 400, 600, 800):
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
