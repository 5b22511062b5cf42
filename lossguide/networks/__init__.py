"""The training-free-guidance papers' own networks: guided-diffusion's ADM UNet and noise-aware classifier
(Dhariwal & Nichol 2021) and the DDIM codebase's DDPM UNet (Ho et al. 2020), built from their reference
flags, loaded strictly from their checkpoints, and wrapped as :class:`~lossguide.denoiser.Denoiser`.

``lossguide.models.load_network(path, flags)`` is the entry point; ``flags['architecture']`` is one of
``adm_unet``, ``adm_classifier``, ``ddim_unet`` or absent (told from the checkpoint's keys).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lossguide.denoiser import Denoiser
from lossguide.networks.adm import ADMClassifier, ADMUNet
from lossguide.networks.checkpoint import (
    NETWORK_CLASSES,
    CheckpointMismatchError,
    assign_weights,
    check_attention,
    check_fit,
    detect_architecture,
    read_state_dict,
    skeleton,
)
from lossguide.networks.ddim_unet import DDIMUNet
from lossguide.networks.flags import ARCHITECTURES, head_flags_given, network_kwargs
from lossguide.schedule import NoiseSchedule

__all__ = [
    "ADMClassifier", "ADMUNet", "ARCHITECTURES", "CheckpointMismatchError", "DDIMUNet", "build_network",
    "denoiser_from_network", "detect_architecture", "load_network_file", "read_state_dict", "schedule_named",
]  # fmt: skip

CLASSES = NETWORK_CLASSES


def build_network(architecture: str, flags: dict) -> nn.Module:
    """The network ``architecture`` with random weights, from reference flags (see :mod:`.flags`)."""
    return CLASSES[architecture](**network_kwargs(architecture, flags))


def _use_ema(flags: dict) -> bool:
    model = flags.get("model") if isinstance(flags.get("model"), dict) else flags
    return bool(model.get("ema", False))


def load_network_file(path: str | Path, flags: dict | None = None) -> nn.Module:
    """The frozen network (eval mode, no parameter gradients) of the checkpoint at ``path``: its keys and shapes
    must be those of the flags' network, and an ADM network's head split must be given (``num_heads`` or
    ``num_head_channels``) or confirmed by a published checkpoint's layout (see :mod:`.checkpoint`)."""
    flags = dict(flags or {})
    arch = flags.pop("architecture", None)
    sd = read_state_dict(path, use_ema=_use_ema(flags))
    if arch is None:
        arch = detect_architecture(sd)
    else:
        try:
            found = detect_architecture(sd)
        except ValueError:
            found = arch
        if found != arch:
            raise CheckpointMismatchError(
                f"flags['architecture'] is {arch!r} but the checkpoint's keys are those of {found!r}; "
                f"pass {found!r} or drop the flag to tell it from the keys"
            )
    kwargs = network_kwargs(arch, flags)
    check_fit(sd, arch, kwargs)  # keys and shapes first: the one-line error names the flag that explains them
    net = skeleton(arch, kwargs)  # on the meta device: the checkpoint's tensors become its parameters
    check_attention(net, sd, arch, head_flags_given(flags, arch))
    return assign_weights(net, sd).eval().requires_grad_(False)


def schedule_named(name: str, T: int = 1000) -> NoiseSchedule:
    """``linear`` (DDPM's β 1e-4..0.02, scaled by 1000/T as guided-diffusion does) or ``cosine`` (Nichol-Dhariwal)."""
    if not (isinstance(T, int) and not isinstance(T, bool) and T >= 2):
        raise ValueError(f"diffusion_steps={T!r}: it must be an integer ≥ 2, the number of timesteps the model was "
                         "trained with (1000 for the published checkpoints)")  # fmt: skip
    if name == "linear":
        scale = 1000 / T
        return NoiseSchedule.linear(T, scale * 1e-4, scale * 0.02)
    if name == "cosine":
        return NoiseSchedule.cosine(T)
    raise ValueError(f"unknown schedule {name!r}; pass 'linear', 'cosine' or a NoiseSchedule")


def denoiser_from_network(
    module: nn.Module, schedule: str | NoiseSchedule, learned_sigma: bool | None = None, **net_kwargs
) -> Denoiser:
    """An ε-prediction :class:`Denoiser` over a loaded network; with a learned variance (out = 2C channels,
    told from the module when ``learned_sigma`` is None) it keeps ε, the first C channels. ``net_kwargs``
    (e.g. ``y=labels`` for a class-conditional UNet) go to every call."""
    if isinstance(schedule, str):
        schedule = schedule_named(schedule)
    c_in = getattr(module, "in_channels", None)
    if learned_sigma is None:
        c_out = getattr(module, "out_channels", None)
        if c_in is None or c_out is None:
            raise ValueError("cannot tell whether the network learns Σ; pass learned_sigma=True or False")
        if c_out not in (c_in, 2 * c_in):
            raise ValueError(f"a network with {c_in} input and {c_out} output channels is not an ε-network")
        learned_sigma = c_out == 2 * c_in
    module.eval().requires_grad_(False)

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = module(x, t, **net_kwargs)
        return out[:, : x.shape[1]] if learned_sigma else out

    d = Denoiser(net, schedule, "epsilon")
    p = next(iter(module.parameters()), None)
    if p is not None:
        d.dtype, d.device = p.dtype, p.device
    return d
