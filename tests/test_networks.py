"""The papers' own networks (lossguide.networks): exact parity with the reference implementations on the
shared layout fixtures, strict loading with clear errors, flag conventions, and the Denoiser wrapper."""

import json
from pathlib import Path

import pytest
import torch

from lossguide.denoiser import Denoiser
from lossguide.models import ModelNotFoundError, load_network
from lossguide.networks import (
    ADMClassifier,
    ADMUNet,
    CheckpointMismatchError,
    DDIMUNet,
    denoiser_from_network,
    detect_architecture,
)
from lossguide.networks.checkpoint import read_state_dict, unwrap_state_dict
from lossguide.schedule import NoiseSchedule

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "checkpoints"
ARCH = {
    "adm_imagenet256_uncond_layout": (ADMUNet, "adm_unet"),
    "adm_ffhq256_dps_layout": (ADMUNet, "adm_unet"),
    "adm_imagenet64_cond_layout": (ADMUNet, "adm_unet"),
    "adm_classifier64_layout": (ADMClassifier, "adm_classifier"),
    "ddim_celebahq_sdedit_layout": (DDIMUNet, "ddim_unet"),
}
# measured max |ours - reference| over the five fixtures: 5.8e-6 (batch of one, 1 or 2 threads); README: <= 2e-5
TOL = 2e-5

needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"the shared checkpoint fixtures are absent ({FIXTURES} is not a folder)"
)


def _fixture(name):
    from safetensors.torch import load_file

    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return meta, load_file(str(FIXTURES / f"{name}.safetensors"))


def _args(io):
    return [io["input.x"], io["input.t"]] + ([io["input.y"]] if "input.y" in io else [])


def _max_err(net, io):
    with torch.no_grad():
        out = net(*_args(io))
    assert out.shape == io["output"].shape
    return (out - io["output"]).abs().max().item()


@needs_fixtures
@pytest.mark.parametrize("name", list(ARCH))
def test_matches_the_reference_output(name):
    meta, io = _fixture(name)
    net = load_network(FIXTURES / f"{name}.pt", meta["constructor_kwargs"])  # architecture told from the keys
    assert isinstance(net, ARCH[name][0])
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert _max_err(net, io) <= TOL


@needs_fixtures
@pytest.mark.parametrize("name", list(ARCH))
def test_architecture_is_told_from_the_keys(name):
    assert detect_architecture(read_state_dict(FIXTURES / f"{name}.pt")) == ARCH[name][1]


@needs_fixtures
def test_explicit_architecture_that_contradicts_the_keys_is_refused():
    with pytest.raises(CheckpointMismatchError, match="those of 'adm_unet'"):
        load_network(FIXTURES / "adm_imagenet256_uncond_layout.pt", {"architecture": "adm_classifier"})


@needs_fixtures
def test_flipped_attention_order_loads_but_changes_the_output():
    """Both q/k/v orders have the same parameters, so only the output can tell them apart."""
    name = "adm_imagenet64_cond_layout"
    meta, io = _fixture(name)
    flags = dict(meta["constructor_kwargs"], architecture="adm_unet")
    flags["use_new_attention_order"] = not flags["use_new_attention_order"]
    assert _max_err(load_network(FIXTURES / f"{name}.pt", flags), io) > 1e-3


@needs_fixtures
@pytest.mark.parametrize(
    "name, change, flag",
    [
        ("adm_imagenet256_uncond_layout", {"num_res_blocks": 1}, "num_res_blocks=2 fits"),
        ("adm_imagenet256_uncond_layout", {"attention_resolutions": [16, 32]}, "attention_resolutions"),
        ("adm_imagenet256_uncond_layout", {"resblock_updown": False}, "resblock_updown"),
        ("adm_imagenet256_uncond_layout", {"use_scale_shift_norm": False}, "use_scale_shift_norm"),
        ("adm_imagenet256_uncond_layout", {"out_channels": 3}, "learn_sigma"),
        ("adm_imagenet64_cond_layout", {"num_classes": None}, "class-conditional, 10 classes"),
        ("adm_classifier64_layout", {"pool": "adaptive"}, "pool"),
        ("adm_classifier64_layout", {"image_size": 128}, "image_size"),
        ("ddim_celebahq_sdedit_layout", {"num_res_blocks": 1}, "num_res_blocks"),
        ("ddim_celebahq_sdedit_layout", {"attn_resolutions": [32]}, "attn_resolutions"),
        ("ddim_celebahq_sdedit_layout", {"resamp_with_conv": False}, "resamp_with_conv"),
        ("ddim_celebahq_sdedit_layout", {"ch_mult": [1, 2, 2, 2, 4, 4]}, "ch_mult=[1, 1, 2, 2, 4, 4] fits"),
        ("ddim_celebahq_sdedit_layout", {"ch_mult": [1, 1, 2, 2, 4]}, "ch_mult=[1, 1, 2, 2, 4, 4] fits"),
        ("adm_imagenet256_uncond_layout", {"channel_mult": [1, 2, 2, 2, 4, 4]}, "channel_mult=[1, 1, 2, 2, 4, 4]"),
        ("adm_imagenet256_uncond_layout", {"model_channels": 64}, "model_channels=32 fits"),
    ],
)
def test_wrong_flag_is_a_one_line_load_error_naming_it(name, change, flag):
    meta, _ = _fixture(name)
    flags = json.loads(json.dumps(meta["constructor_kwargs"]))
    (flags["model"] if "model" in flags else flags).update(change)
    with pytest.raises(CheckpointMismatchError) as e:
        load_network(FIXTURES / f"{name}.pt", flags)
    msg = str(e.value)
    assert "\n" not in msg and "probably wrong flag: " in msg and flag in msg.split("probably wrong flag: ")[1]


def test_missing_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="pass the path"):
        load_network(tmp_path / "256x256_diffusion_uncond.pt", {"architecture": "adm_unet"})


def test_unknown_flag_is_refused():
    from lossguide.networks import build_network

    with pytest.raises(ValueError, match="num_head_channel"):
        flags = dict(image_size=64, model_channels=32, num_res_blocks=1, attention_resolutions=[2], out_channels=3)
        build_network("adm_unet", {**flags, "num_head_channel": 16})


@needs_fixtures
def test_command_line_flags_match_the_constructor_flags():
    """guided-diffusion's command line: pixel attention resolutions, channel_mult "" and learn_sigma."""
    name = "adm_imagenet256_uncond_layout"
    _, io = _fixture(name)
    cli = dict(
        image_size=256, num_channels=32, num_res_blocks=2, attention_resolutions="32,16,8", channel_mult="",
        learn_sigma=True, class_cond=False, num_head_channels=16, resblock_updown=True, use_scale_shift_norm=True,
        use_fp16=True, diffusion_steps=1000, noise_schedule="linear", model_path="256x256_diffusion_uncond.pt",
    )  # fmt: skip
    assert _max_err(load_network(FIXTURES / f"{name}.pt", cli), io) <= TOL


@needs_fixtures
def test_checkpoint_wrappers_are_unwrapped(tmp_path):
    name = "ddim_celebahq_sdedit_layout"
    meta, io = _fixture(name)
    sd = torch.load(FIXTURES / f"{name}.pt", map_location="cpu", weights_only=True)
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    assert unwrap_state_dict({"state_dict": sd}).keys() == sd.keys()
    assert unwrap_state_dict(prefixed).keys() == sd.keys()
    path = tmp_path / "ckpt.pth"  # the DDIM codebase's [model, optimizer, epoch, step, ema]
    torch.save([prefixed, {"state": {}, "param_groups": []}, 10, 1000], path)
    assert _max_err(load_network(path, meta["constructor_kwargs"]), io) <= TOL


@needs_fixtures
def test_denoiser_gives_eps_and_the_tweedie_x0():
    """ε_hat is the UNet's first C channels; x0_hat = (x − √(1−ᾱ)ε_hat)/√ᾱ (cosine schedule, labels y)."""
    name = "adm_imagenet64_cond_layout"
    meta, io = _fixture(name)
    net = load_network(FIXTURES / f"{name}.pt", meta["constructor_kwargs"])
    sched = NoiseSchedule.cosine(1000)
    for i in range(2):
        x, t, y = io["input.x"][i : i + 1], int(io["input.t"][i]), io["input.y"][i : i + 1]
        d = denoiser_from_network(net, "cosine", y=y)
        assert isinstance(d, Denoiser) and d.prediction_type == "epsilon"
        with torch.no_grad():
            out = d(x, t)
        eps = io["output"][i : i + 1, :3]
        ab = sched.at(t)
        assert (out.eps - eps).abs().max().item() <= TOL
        x0 = (x - (1 - ab) ** 0.5 * eps) / ab**0.5
        assert (out.x0_hat - x0).abs().max().item() <= TOL / ab**0.5


@needs_fixtures
def test_denoiser_keeps_a_plain_eps_network_whole():
    name = "ddim_celebahq_sdedit_layout"
    meta, io = _fixture(name)
    d = denoiser_from_network(load_network(FIXTURES / f"{name}.pt", meta["constructor_kwargs"]), "linear")
    with torch.no_grad():
        out = d(io["input.x"][1:], int(io["input.t"][1]))
    assert (out.eps - io["output"][1:]).abs().max().item() <= TOL


@needs_fixtures
def test_load_denoiser_reads_an_original_checkpoint_file():
    """load_denoiser (and recipes) take the same .pt file and flags as load_network: ε = the reference's first
    3 output channels, the schedule is guided-diffusion's linear β, the shape comes from the flags."""
    from safetensors.torch import load_file

    from lossguide.models import load_denoiser

    name = "adm_imagenet256_uncond_layout"
    flags = json.loads((FIXTURES / f"{name}.json").read_text())["constructor_kwargs"]
    ref = load_file(str(FIXTURES / f"{name}.safetensors"))
    ld = load_denoiser(str(FIXTURES / f"{name}.pt"), flags=dict(flags, image_size=64))
    assert ld.sample_shape == (3, 64, 64)
    ab = ld.denoiser.schedule.alpha_bar
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(ab, torch.cumprod(1 - betas, 0), rtol=1e-6, atol=0)
    x, t = ref["input.x"], ref["input.t"]
    for k in range(len(t)):
        out = ld.denoiser(x[k : k + 1], int(t[k]))
        assert (out.eps - ref["output"][k : k + 1, :3]).abs().max() <= TOL


@needs_fixtures
def test_load_denoiser_refuses_flags_for_a_diffusers_model_and_a_classifier_file():
    from lossguide.models import load_denoiser

    with pytest.raises(ValueError, match="flags are for original checkpoint files"):
        load_denoiser("mnist-ddpm", flags={"num_channels": 128})
    name = "adm_classifier64_layout"
    flags = json.loads((FIXTURES / f"{name}.json").read_text())["constructor_kwargs"]
    with pytest.raises(ValueError, match="noise-aware classifier"):
        load_denoiser(str(FIXTURES / f"{name}.pt"), flags=flags)


UNETS = [n for n, (_, arch) in ARCH.items() if arch == "adm_unet"]


@needs_fixtures
@pytest.mark.parametrize("name", UNETS)
def test_head_split_left_to_the_defaults_is_refused(name):
    """The head split changes no parameter shape (a wrong one loads and is off by ~0.4), so it must be given."""
    meta, _ = _fixture(name)
    flags = {k: v for k, v in meta["constructor_kwargs"].items() if k not in ("num_heads", "num_head_channels")}
    with pytest.raises(ValueError, match="pass num_head_channels or num_heads") as e:
        load_network(FIXTURES / f"{name}.pt", flags)
    assert "\n" not in str(e.value)


def _published_state_dict(name):
    """A state dict of meta tensors with the keys and shapes of the published checkpoint ``name``."""
    from lossguide.networks.checkpoint import skeleton
    from lossguide.networks.flags import PUBLISHED_LAYOUTS, network_kwargs

    flags = dict(PUBLISHED_LAYOUTS[name][0])
    arch = flags.pop("architecture")
    return skeleton(arch, network_kwargs(arch, flags)).state_dict()


def _published_flags(name, **change):
    from lossguide.networks.flags import PUBLISHED_LAYOUTS

    flags = {k: v for k, v in PUBLISHED_LAYOUTS[name][0].items() if k not in ("num_heads", "num_head_channels")}
    return {k: v for k, v in {**flags, **change}.items() if v is not None}


@pytest.mark.parametrize(
    "name, change, fine",
    [
        ("256x256_diffusion_uncond.pt (or an LSUN model)", dict(num_head_channels=64), True),
        ("256x256_diffusion_uncond.pt (or an LSUN model)", dict(num_head_channels=32), False),
        ("256x256_diffusion_uncond.pt (or an LSUN model)", dict(num_heads=8), False),
        ("256x256_diffusion_uncond.pt (or an LSUN model)", dict(), False),  # the command line's num_heads=4
        ("128x128_diffusion.pt", dict(), True),  # the command line's default num_heads=4 is its split
        ("128x128_diffusion.pt", dict(num_head_channels=64), False),
        ("64x64_diffusion.pt", dict(num_head_channels=64), True),
        ("64x64_diffusion.pt", dict(num_head_channels=64, use_new_attention_order=False), False),
        ("DPS's ffhq_10m.pt", dict(num_heads=4, num_head_channels=64), True),
        ("DPS's ffhq_10m.pt", dict(num_heads=4), False),
        ("64x64_classifier.pt", dict(), True),  # create_classifier fixes num_head_channels=64
    ],
)
def test_published_checkpoints_attention_flags_are_checked(tmp_path, monkeypatch, name, change, fine):
    """A checkpoint with a published one's keys and shapes loads only under that checkpoint's head split and
    q/k/v order (meta tensors stand in for the real file)."""
    import lossguide.networks as networks

    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"")
    sd = _published_state_dict(name)
    monkeypatch.setattr(networks, "read_state_dict", lambda *a, **k: sd)
    flags = _published_flags(name, **change)
    if fine:
        net = load_network(path, flags)
        assert next(net.parameters()).is_meta
    else:
        with pytest.raises(CheckpointMismatchError, match="keys and shapes of " + name.split(" ")[0]) as e:
            load_network(path, flags)
        assert "\n" not in str(e.value) and "pass " + networks.flags.PUBLISHED_LAYOUTS[name][1] in str(e.value)


@needs_fixtures
@pytest.mark.parametrize(
    "corrupt",
    ["reshape", "delete_qkv_bias", "delete_skip"],
)
def test_a_corrupt_checkpoint_names_no_flag(tmp_path, corrupt):
    """One reshaped tensor or one deleted key is what no flag change produces: the error says so."""
    name = "adm_imagenet256_uncond_layout"
    meta, _ = _fixture(name)
    sd = torch.load(FIXTURES / f"{name}.pt", map_location="cpu", weights_only=True)
    if corrupt == "reshape":
        k = "input_blocks.4.0.in_layers.2.weight"
        sd[k] = sd[k].reshape(sd[k].shape[0] // 2, -1, *sd[k].shape[2:])
    elif corrupt == "delete_qkv_bias":
        del sd[next(k for k in sd if k.endswith(".qkv.bias"))]
    else:
        del sd[next(k for k in sd if k.endswith("skip_connection.weight"))]
    torch.save(sd, tmp_path / "corrupt.pt")
    with pytest.raises(CheckpointMismatchError) as e:
        load_network(tmp_path / "corrupt.pt", meta["constructor_kwargs"])
    msg = str(e.value)
    assert "\n" not in msg and "probably wrong flag" not in msg
    assert "does not match any single flag change" in msg and "may be corrupt or of another layout" in msg


@needs_fixtures
def test_a_corrupt_ddim_checkpoint_names_no_flag(tmp_path):
    name = "ddim_celebahq_sdedit_layout"
    meta, _ = _fixture(name)
    sd = torch.load(FIXTURES / f"{name}.pt", map_location="cpu", weights_only=True)
    sd["down.1.block.0.conv1.weight"] = sd["down.1.block.0.conv1.weight"][:16]
    torch.save(sd, tmp_path / "corrupt.pt")
    with pytest.raises(CheckpointMismatchError, match="does not match any single flag change") as e:
        load_network(tmp_path / "corrupt.pt", meta["constructor_kwargs"])
    assert "probably wrong flag" not in str(e.value)


@pytest.mark.parametrize(
    "heads, message",
    [
        (dict(num_heads=3), "not divisible by num_heads=3"),
        (dict(num_heads=2, num_heads_upsample=3), "not divisible by num_heads_upsample=3"),
        (dict(num_head_channels=24), "not divisible by num_head_channels=24; pass a head width"),
        (dict(num_heads=0), "num_heads=0 is not a positive int"),
    ],
)
def test_a_head_split_that_does_not_divide_the_channels_is_refused(heads, message):
    from lossguide.networks import build_network

    flags = dict(image_size=64, model_channels=32, num_res_blocks=1, attention_resolutions=[2], out_channels=3)
    with pytest.raises(ValueError, match=message):
        build_network("adm_unet", {**flags, **heads})
