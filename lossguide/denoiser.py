"""The denoiser contract: a noise schedule plus a network that predicts ε, x0 or v.

From the network's output at (x_t, t) the denoiser returns ε_hat and the Tweedie estimate
x0_hat = (x_t − √(1−ᾱ_t)·ε_hat)/√ᾱ_t (Efron 2011; Chung et al. 2023, eq. 9). Adapters wrap a plain
``torch.nn.Module``, a diffusers ``UNet2DModel``/``UNet2DConditionModel`` with its scheduler, and any
callable (the Gaussian-mixture oracle).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lossguide.schedule import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass
class DenoiserOutput:
    """ε_hat and x0_hat at one (x_t, t)."""

    eps: torch.Tensor
    x0_hat: torch.Tensor


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and ``requires_grad_(False)``: gradients flow to inputs, never into weights."""
    return module.eval().requires_grad_(False)


class Denoiser:
    """(x_t, t) → (ε_hat, x0_hat) for a network whose output is ε, x0 or v (diffusers' names).

    Args:
        net: callable ``net(x_t, t) -> output`` with ``t`` a long tensor ``[B]`` of training timesteps.
        schedule: the ᾱ the network was trained with.
        prediction_type: ``"epsilon"``, ``"sample"`` (x0) or ``"v_prediction"`` (v = √ᾱ·ε − √(1−ᾱ)·x0).
    """

    def __init__(self, net: Callable, schedule: NoiseSchedule, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None

    def _check_input(self, x_t: torch.Tensor) -> None:
        if self.dtype is not None and x_t.dtype != self.dtype:
            raise TypeError(
                f"x_t is {x_t.dtype} but the model's weights are {self.dtype}; "
                f"pass dtype={self.dtype} to sample() or cast the model with .to({x_t.dtype})"
            )
        if self.device is not None and x_t.device.type != self.device.type:
            raise RuntimeError(
                f"x_t is on {x_t.device} but the model is on {self.device}; pass device='{self.device}' to sample()"
            )

    def __call__(self, x_t: torch.Tensor, t: int) -> DenoiserOutput:
        self._check_input(x_t)
        tt = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        out = self.net(x_t, tt)
        if out.shape != x_t.shape:
            raise ValueError(
                f"the network returned shape {tuple(out.shape)} for input {tuple(x_t.shape)}; a denoiser must "
                "return one prediction of the input's shape (split a learned variance off in the adapter)"
            )
        ab = self.schedule.at(int(t))
        a, s = ab**0.5, (1 - ab) ** 0.5
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x_t - s * eps) / a
        elif self.prediction_type == "sample":
            x0 = out
            eps = (x_t - a * x0) / s
        else:  # v = a·ε − s·x0
            x0 = a * x_t - s * out
            eps = s * x_t + a * out
        return DenoiserOutput(eps=eps, x0_hat=x0)

    def score(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """∇ log p_t(x_t) = −ε_hat / √(1−ᾱ_t)."""
        return -self(x_t, t).eps / (1 - self.schedule.at(int(t))) ** 0.5


def from_module(
    module: torch.nn.Module, schedule: NoiseSchedule, prediction_type: str = "epsilon", **net_kwargs
) -> Denoiser:
    """Wrap a frozen ``module(x_t, t, **net_kwargs)`` that returns a tensor."""
    freeze(module)
    d = Denoiser(lambda x, t: module(x, t, **net_kwargs), schedule, prediction_type)
    _record_param_dtype(d, module)
    return d


def from_diffusers(
    unet: torch.nn.Module, scheduler, state_dtype: torch.dtype | None = None, **unet_kwargs
) -> Denoiser:
    """Wrap a diffusers UNet (``.sample`` output) with the ᾱ and ``prediction_type`` of its scheduler.

    ``unet_kwargs`` (e.g. ``encoder_hidden_states`` for a ``UNet2DConditionModel``) are passed to every
    call. A UNet trained with a learned variance (2× output channels) keeps the first half.
    ``state_dtype`` (mixed precision): x_t, ε_hat and x0_hat stay in this dtype (e.g. float32) while the
    UNet runs in its weights' dtype (bf16/fp16); None keeps everything in the weights' dtype.
    """
    freeze(unet)
    pred = getattr(scheduler.config, "prediction_type", "epsilon")
    schedule = NoiseSchedule.from_diffusers(scheduler)
    in_ch = getattr(unet.config, "in_channels", None)
    p = next(iter(unet.parameters()), None)
    w_dtype = p.dtype if p is not None else None

    def net(x, t):
        out = unet(x if w_dtype is None else x.to(w_dtype), t, **unet_kwargs).sample
        if in_ch is not None and out.shape[1] == 2 * in_ch:
            out = out[:, :in_ch]
        return out.to(x.dtype)

    d = Denoiser(net, schedule, pred)
    _record_param_dtype(d, unet)
    if state_dtype is not None:
        d.dtype = state_dtype
    return d


def _record_param_dtype(d: Denoiser, module: torch.nn.Module) -> None:
    p = next(iter(module.parameters()), None)
    if p is not None:
        d.dtype, d.device = p.dtype, p.device
