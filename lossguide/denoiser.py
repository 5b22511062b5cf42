"""The denoiser contract: a noise schedule plus a network that predicts ε, x0, v or a flow velocity.

On x_t = α_t·x0 + σ_t·ε (any family of :mod:`lossguide.schedule`) the denoiser turns the network's output at
(x_t, t) into ε_hat and the Tweedie estimate x0_hat = (x_t − σ_t·ε_hat)/α_t (Efron 2011; Chung et al. 2023,
eq. 9), always with x_t = α_t·x0_hat + σ_t·ε_hat. Adapters wrap a plain ``torch.nn.Module``, a diffusers
``UNet2DModel``/``UNet2DConditionModel``/transformer with its scheduler (VP, σ-space or flow matching), and any
callable (the Gaussian-mixture oracle).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lossguide.schedule import FlowSchedule, NoiseSchedule, SigmaSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


@dataclass
class DenoiserOutput:
    """ε_hat and x0_hat at one (x_t, t)."""

    eps: torch.Tensor
    x0_hat: torch.Tensor


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and ``requires_grad_(False)``: gradients flow to inputs, never into weights."""
    return module.eval().requires_grad_(False)


class Denoiser:
    """(x_t, t) → (ε_hat, x0_hat) for a network whose output is ε, x0, v or u (diffusers' names).

    Args:
        net: callable ``net(x_t, t) -> output``; ``t`` is ``[B]``: a long tensor of training timesteps (VP), or
            floats: t·T on a flow schedule (diffusers' convention), σ on a VE one, fractional VP timesteps.
        schedule: the family and (α_t, σ_t) the network was trained with (:mod:`lossguide.schedule`).
        prediction_type: ``"epsilon"``, ``"sample"`` (x0), ``"v_prediction"`` (v = √ᾱ·ε − √(1−ᾱ)·x0 of the VP
            x_t/k, Salimans & Ho 2022) or ``"flow_prediction"`` (the rectified-flow velocity u = dx_t/dt = ε − x0).
    """

    def __init__(
        self,
        net: Callable,
        schedule: NoiseSchedule | FlowSchedule | SigmaSchedule,
        prediction_type: str = "epsilon",
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.channels: int | None = None  # per-sample input channels of a 2-D UNet, where known

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

    @property
    def family(self) -> str:
        return self.schedule.family

    def __call__(
        self, x_t: torch.Tensor, t: int | float, alpha: float | None = None, sigma: float | None = None
    ) -> DenoiserOutput:
        """ε_hat, x0_hat at (x_t, t); (α_t, σ_t) are the schedule's unless given (a sampler whose levels are not
        the schedule's own, e.g. diffusers' σ-space schedulers at fractional timesteps, passes them)."""
        self._check_input(x_t)
        out = self.net(x_t, self._net_time(x_t, t))
        if out.shape != x_t.shape:
            raise ValueError(
                f"the network returned shape {tuple(out.shape)} for input {tuple(x_t.shape)}; a denoiser must "
                "return one prediction of the input's shape (split a learned variance off in the adapter)"
            )
        a = self.schedule.alpha(t) if alpha is None else alpha
        s = self.schedule.sigma(t) if sigma is None else sigma
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x_t - s * eps) / a
        elif self.prediction_type == "sample":
            x0 = out
            eps = (x_t - a * x0) / s
        elif self.prediction_type == "v_prediction":  # v = (α·ε − σ·x0)/k, the VP v of x_t/k
            k = 1.0 if self.family == "vp" else math.hypot(a, s)
            x_vp, a, s = x_t / k, a / k, s / k
            x0 = a * x_vp - s * out
            eps = s * x_vp + a * out
        else:  # u = ε − x0, so x_t = (α + σ)·x0 + σ·u
            x0 = (x_t - s * out) / (a + s)
            eps = (x_t + a * out) / (a + s)
        return DenoiserOutput(eps=eps, x0_hat=x0)

    def _net_time(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """``[B]`` timesteps for the network: long for an integer VP t, floats otherwise."""
        if self.family == "vp" and float(t) == int(t) and not isinstance(t, float):
            return torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        dtype = x_t.dtype if x_t.dtype == torch.float64 else torch.float32
        return torch.full((x_t.shape[0],), float(self.schedule.net_time(t)), dtype=dtype, device=x_t.device)

    def score(self, x_t: torch.Tensor, t: int | float) -> torch.Tensor:
        """∇ log p_t(x_t) = −ε_hat/σ_t."""
        return -self(x_t, t).eps / self.schedule.sigma(t)


def from_module(
    module: torch.nn.Module,
    schedule: NoiseSchedule | FlowSchedule | SigmaSchedule,
    prediction_type: str = "epsilon",
    **net_kwargs,
) -> Denoiser:
    """Wrap a frozen ``module(x_t, t, **net_kwargs)`` that returns a tensor."""
    freeze(module)
    d = Denoiser(lambda x, t: module(x, t, **net_kwargs), schedule, prediction_type)
    _record_param_dtype(d, module)
    return d


def from_diffusers(
    unet: torch.nn.Module, scheduler, state_dtype: torch.dtype | None = None, **unet_kwargs
) -> Denoiser:
    """Wrap a diffusers UNet or transformer (``.sample`` output) with the schedule and prediction of its scheduler.

    A ``FlowMatchEulerDiscreteScheduler`` gives a :class:`~lossguide.schedule.FlowSchedule` and the velocity
    prediction (``"flow_prediction"``, the model called with t·T); any scheduler with ``alphas_cumprod``, σ-space
    ones (Euler, Heun, LMS, ...) included, gives the VP :class:`~lossguide.schedule.NoiseSchedule` the model was
    trained on and its ``prediction_type``. ``unet_kwargs`` (e.g. ``encoder_hidden_states`` for a
    ``UNet2DConditionModel``) are passed to every call. A UNet trained with a learned variance (2× output
    channels) keeps the first half. ``state_dtype`` (mixed precision): x_t, ε_hat and x0_hat stay in this dtype
    (e.g. float32) while the UNet runs in its weights' dtype (bf16/fp16); None keeps everything in the weights'
    dtype.
    """
    freeze(unet)
    if "FlowMatch" in type(scheduler).__name__:
        schedule, pred = FlowSchedule.from_diffusers(scheduler), "flow_prediction"
    else:
        schedule = NoiseSchedule.from_diffusers(scheduler)
        pred = getattr(scheduler.config, "prediction_type", "epsilon")
    in_ch = getattr(unet.config, "in_channels", None)
    p = next(iter(unet.parameters()), None)
    w_dtype = p.dtype if p is not None else None
    t_kw = _timestep_keyword(unet)

    def net(x, t):
        xin = x if w_dtype is None else x.to(w_dtype)
        out = (unet(xin, timestep=t, **unet_kwargs) if t_kw else unet(xin, t, **unet_kwargs)).sample
        if in_ch is not None and out.shape[1] == 2 * in_ch:
            out = out[:, :in_ch]
        return out.to(x.dtype)

    d = Denoiser(net, schedule, pred)
    if type(unet).__name__.startswith("UNet2D") and in_ch is not None:
        d.channels = int(in_ch)  # samples are (C, H, W): sample() checks the shape it is given
        blocks = getattr(getattr(unet, "config", None), "block_out_channels", None)
        if blocks:
            d.size_multiple = 2 ** (len(blocks) - 1)  # each block but the last halves H and W
    _record_param_dtype(d, unet)
    if state_dtype is not None:
        d.dtype = state_dtype
    return d


def _timestep_keyword(module) -> bool:
    """Whether ``timestep`` must go by keyword: transformers (SD3, Flux) take it after other inputs."""
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return "timestep" in names and names.index("timestep") != 1


def _record_param_dtype(d: Denoiser, module: torch.nn.Module) -> None:
    p = next(iter(module.parameters()), None)
    if p is not None:
        d.dtype, d.device = p.dtype, p.device
