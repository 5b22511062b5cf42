"""Plug-and-play guide distillation (Hsiao et al. 2024, "Plug-and-Play Diffusion Distillation"): a small guide
network g, trained with the base UNet frozen, whose residuals make ONE conditional pass of the base reproduce
the two-pass classifier-free guidance output ε̃ = ε_∅ + w·(ε_c − ε_∅) (Ho & Salimans 2022, eq. 6):

    ε_θ(x_t, t, c; g(x_t, t, c, w)) ≈ ε̃(x_t, t, c, w),

the residuals entering the base as a ControlNet's do (Zhang et al. 2023): added to every skip connection of the
down path (``down_block_additional_residuals``) and to the mid block's output
(``mid_block_additional_residual``). The base is never changed, so the same guide plugs into fine-tuned copies
of it (same architecture) without retraining.

:class:`GuideNet`: a small conv trunk, one stage per resolution of the base (stride-2 convolutions reproduce
its down path's grid sizes), FiLM-conditioned (Perez et al. 2018) on an embedding of (sinusoidal t, the
flattened encoder_hidden_states, sinusoidal w); every residual comes out of a zero-initialised 1×1 convolution,
so an untrained guide leaves the base's output bit-identical. With ``w_gate`` the residuals are multiplied by
(w − 1): at w = 1, where ε̃ = ε_c, the guide is exactly off.

A saved guide is a folder: ``guide.safetensors`` (fp16 weights) and ``guide.json`` (its :class:`GuideConfig`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lossguide.denoiser import Denoiser, freeze
from lossguide.schedule import NoiseSchedule
from lossguide.validate import finite_weight

WEIGHTS_FILE = "guide.safetensors"
CONFIG_FILE = "guide.json"
#: the down blocks whose res samples :func:`residual_spec` knows: resnets, then one stride-2 conv downsampler
SUPPORTED_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")


def sinusoidal(x: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """[B] → [B, dim]: (cos, sin) of x·ω_k, ω_k = max_period^(−k/(dim/2)) (Vaswani et al. 2017; DDPM's t-embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[:, None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def residual_spec(config) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(channels, resolution level) of each of a ``UNet2DConditionModel``'s down_block_res_samples, and the mid
    block's channels, from its config: conv_in's output, then per down block its resnets' outputs and (all
    but the last block) its downsampler's, one level lower."""
    types = tuple(config.down_block_types)
    bad = [b for b in types if b not in SUPPORTED_DOWN_BLOCKS]
    if bad:
        raise ValueError(f"GuideNet knows the res samples of {SUPPORTED_DOWN_BLOCKS} only, the UNet has {bad}")
    if getattr(config, "downsample_padding", 1) != 1:
        raise ValueError(f"GuideNet's stride-2 convolutions pad by 1, the UNet's downsamplers by "
                         f"{config.downsample_padding}")  # fmt: skip
    widths = tuple(config.block_out_channels)
    layers = config.layers_per_block
    layers = (layers,) * len(types) if isinstance(layers, int) else tuple(layers)
    channels, levels = [widths[0]], [0]
    for i, c in enumerate(widths):
        channels += [c] * layers[i]
        levels += [i] * layers[i]
        if i < len(widths) - 1:
            channels.append(c)
            levels.append(i + 1)
    return tuple(channels), tuple(levels), widths[-1]


@dataclasses.dataclass(frozen=True)
class GuideConfig:
    """A :class:`GuideNet`'s architecture: the base's input channels, token count × dimension and residual
    spec (:func:`residual_spec`), and the guide's own sizes."""

    in_channels: int
    hidden_tokens: int
    hidden_dim: int
    residual_channels: tuple[int, ...]
    residual_levels: tuple[int, ...]
    mid_channels: int
    width: int = 10
    emb_dim: int = 16
    t_dim: int = 16
    w_dim: int = 8
    norm_groups: int = 2
    w_gate: bool = True

    def __post_init__(self):
        for f in ("residual_channels", "residual_levels"):
            object.__setattr__(self, f, tuple(int(v) for v in getattr(self, f)))
        if len(self.residual_channels) != len(self.residual_levels) or not self.residual_channels:
            raise ValueError("residual_channels and residual_levels must be non-empty and of one length, got "
                             f"{self.residual_channels} and {self.residual_levels}")  # fmt: skip
        if self.width % self.norm_groups:
            raise ValueError(f"the guide's width {self.width} must be divisible by its norm_groups {self.norm_groups}")
        if self.t_dim % 2 or self.w_dim % 2:
            raise ValueError(f"t_dim and w_dim must be even (cos, sin pairs), got {self.t_dim}, {self.w_dim}")

    @property
    def levels(self) -> int:
        return max(self.residual_levels) + 1

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class GuideNet(torch.nn.Module):
    """(x_t [B, C, H, W], t [B], encoder_hidden_states [B, L, D], w [B]) → (down residuals, mid residual) for the
    base UNet (module docstring); build one with :meth:`for_unet`.

    Args:
        config: the architecture.
        seed: the parameter initialisation's seed (a private RNG: the global one is untouched).
    """

    def __init__(self, config: GuideConfig, seed: int = 0):
        super().__init__()
        self.config = c = config
        C, E = c.width, c.emb_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.emb = torch.nn.Sequential(
                torch.nn.Linear(c.t_dim + c.w_dim + c.hidden_tokens * c.hidden_dim, E),
                torch.nn.SiLU(),
                torch.nn.Linear(E, E),
                torch.nn.SiLU(),
            )
            self.conv_in = torch.nn.Conv2d(c.in_channels, C, 3, padding=1)
            down = [torch.nn.Conv2d(C, C, 3, stride=2, padding=1) for _ in range(c.levels - 1)]
            self.down = torch.nn.ModuleList(down)
            self.conv = torch.nn.ModuleList([torch.nn.Conv2d(C, C, 3, padding=1) for _ in range(c.levels)])
            self.norm = torch.nn.ModuleList([torch.nn.GroupNorm(c.norm_groups, C) for _ in range(c.levels)])
            self.film = torch.nn.ModuleList([torch.nn.Linear(E, 2 * C) for _ in range(c.levels)])
            self.out = torch.nn.ModuleList([torch.nn.Conv2d(C, ch, 1) for ch in c.residual_channels])
            self.mid_out = torch.nn.Conv2d(C, c.mid_channels, 1)
        for conv in (*self.out, self.mid_out):  # zero outputs: an untrained guide leaves the base unchanged
            torch.nn.init.zeros_(conv.weight)
            torch.nn.init.zeros_(conv.bias)

    @classmethod
    def for_unet(cls, unet, hidden_tokens: int = 2, seed: int = 0, **sizes) -> GuideNet:
        """A guide for ``unet`` (a ``UNet2DConditionModel``) cross-attending to ``hidden_tokens`` tokens;
        ``sizes``: width, emb_dim, t_dim, w_dim, norm_groups, w_gate (:class:`GuideConfig`)."""
        channels, levels, mid = residual_spec(unet.config)
        config = GuideConfig(in_channels=unet.config.in_channels, hidden_tokens=hidden_tokens,
                             hidden_dim=unet.config.cross_attention_dim, residual_channels=channels,
                             residual_levels=levels, mid_channels=mid, **sizes)  # fmt: skip
        return cls(config, seed=seed)

    def check_fits(self, unet) -> None:
        """Raise ValueError unless the guide's residuals fit ``unet`` (the base or a fine-tuned copy of it)."""
        c = self.config
        channels, levels, mid = residual_spec(unet.config)
        ours = (c.in_channels, c.hidden_dim, c.residual_channels, c.residual_levels, c.mid_channels)
        theirs = (unet.config.in_channels, unet.config.cross_attention_dim, channels, levels, mid)
        if ours != theirs:
            raise ValueError(f"this guide was built for a UNet with (in_channels, cross_attention_dim, residual "
                             f"channels, levels, mid channels) = {ours}, the UNet has {theirs}; train a guide for "
                             "it (python -m lossguide.training guide --base DIR)")  # fmt: skip

    def embed(self, t: torch.Tensor, hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The conditioning embedding [B, emb_dim] of (sinusoidal t, flattened hidden states, sinusoidal w)."""
        c = self.config
        if hidden.shape[1:] != (c.hidden_tokens, c.hidden_dim):
            raise ValueError(f"encoder_hidden_states must be [B, {c.hidden_tokens}, {c.hidden_dim}], got "
                             f"{tuple(hidden.shape)}")  # fmt: skip
        dtype = self.conv_in.weight.dtype
        feats = [sinusoidal(t, c.t_dim, 10_000.0).to(dtype), hidden.flatten(1).to(dtype),
                 sinusoidal(w, c.w_dim, 100.0).to(dtype)]  # fmt: skip
        return self.emb(torch.cat(feats, dim=-1))

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, w: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(down_block_additional_residuals, mid_block_additional_residual) at (x_t, t, c, w)."""
        B = x_t.shape[0]
        t, w = _per_sample(t, B, x_t.device), _per_sample(w, B, x_t.device)
        hidden = hidden.expand(B, *hidden.shape[1:]) if hidden.shape[0] == 1 else hidden
        if hidden.shape[0] != B:
            raise ValueError(f"{hidden.shape[0]} encoder_hidden_states for a batch of {B}; pass one, or one per "
                             "sample")
        emb = self.embed(t, hidden, w)
        h = self.conv_in(x_t.to(emb.dtype))
        feats = []
        for level in range(self.config.levels):
            if level:
                h = self.down[level - 1](h)
            gamma, beta = self.film[level](emb)[:, :, None, None].chunk(2, dim=1)
            h = h + F.silu(self.norm[level](self.conv[level](h)) * (1 + gamma) + beta)
            feats.append(h)
        gate = (w - 1).to(emb.dtype).view(-1, 1, 1, 1) if self.config.w_gate else None
        down = tuple(out(feats[lv]) for out, lv in zip(self.out, self.config.residual_levels, strict=True))
        mid = self.mid_out(feats[-1])
        if gate is not None:
            down, mid = tuple(r * gate for r in down), mid * gate
        return down, mid

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        """Write the folder ``path``: ``guide.safetensors`` (weights in ``dtype``) and ``guide.json``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_FILE))
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> GuideNet:
        """A guide saved with :meth:`save`, cast to ``dtype``."""
        from safetensors.torch import load_file

        path = Path(path)
        missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE) if not (path / n).exists()]
        if missing:
            raise FileNotFoundError(f"{path} is not a saved guide: no {', '.join(missing)} (train one with "
                                    "`python -m lossguide.training guide --base DIR --export DIR`)")  # fmt: skip
        guide = cls(GuideConfig(**json.loads((path / CONFIG_FILE).read_text())))
        guide.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        return guide.to(device=device, dtype=dtype)


def _per_sample(v, B: int, device) -> torch.Tensor:
    """A scalar or [B] (or [1]) value as a [B] tensor."""
    v = torch.as_tensor(v, device=device)
    if v.ndim == 0 or v.numel() == 1:
        return v.reshape(1).expand(B)
    if v.shape != (B,):
        raise ValueError(f"expected a scalar or [{B}] values, got shape {tuple(v.shape)}")
    return v


def distilled_eps(unet, guide: GuideNet, x_t: torch.Tensor, t, hidden: torch.Tensor, w) -> torch.Tensor:
    """ε_θ(x_t, t, c; g(x_t, t, c, w)): one pass of the base with the guide's residuals (the student of the
    distillation; gradients reach the guide through the frozen base's activations)."""
    guide.check_fits(unet)
    B = x_t.shape[0]
    p = next(iter(unet.parameters()))
    hidden = hidden.expand(B, *hidden.shape[1:]) if hidden.shape[0] == 1 else hidden
    t = _per_sample(t, B, x_t.device)
    down, mid = guide(x_t, t, hidden, w)
    down = tuple(r.to(p.dtype) for r in down)
    out = unet(x_t.to(p.dtype), t, encoder_hidden_states=hidden.to(p.dtype), down_block_additional_residuals=down,
               mid_block_additional_residual=mid.to(p.dtype)).sample  # fmt: skip
    return out


def cfg_parts(unet, x_t: torch.Tensor, t, hidden_c: torch.Tensor, hidden_null: torch.Tensor):
    """(ε_c, ε_∅): the conditional and unconditional passes of the base, no gradient."""
    B = x_t.shape[0]
    t = _per_sample(t, B, x_t.device)
    with torch.no_grad():
        eps_c = unet(x_t, t, encoder_hidden_states=hidden_c.expand(B, *hidden_c.shape[1:])).sample
        eps_u = unet(x_t, t, encoder_hidden_states=hidden_null.expand(B, *hidden_null.shape[1:])).sample
    return eps_c, eps_u


def cfg_target(unet, x_t: torch.Tensor, t, hidden_c: torch.Tensor, hidden_null: torch.Tensor, w) -> torch.Tensor:
    """ε̃ = ε_∅ + w·(ε_c − ε_∅) (Ho & Salimans 2022, eq. 6), w a scalar or [B], no gradient: the distillation target."""
    eps_c, eps_u = cfg_parts(unet, x_t, t, hidden_c, hidden_null)
    w = _per_sample(w, x_t.shape[0], x_t.device).to(eps_c.dtype).view(-1, 1, 1, 1)
    return eps_u + w * (eps_c - eps_u)


def guided_denoiser(
    model,
    guide: GuideNet,
    tokens,
    guidance_scale: float = 1.0,
    control=None,
    state_dtype: torch.dtype = torch.float32,
) -> Denoiser:
    """x_t → (ε_hat, x0_hat) under tokens [1 or B, 2] with ε_hat = ε_θ(x_t, t, c; g(x_t, t, c, w)), w =
    ``guidance_scale``: :meth:`lossguide.layout.CondDigitModel.denoiser`'s guided ε̃ in one pass.

    ``model`` is a :class:`~lossguide.layout.CondDigitModel` (the base, or a fine-tuned copy of it); ``guide`` is
    frozen. The one pass is the conditional one, so an :class:`~lossguide.layout.AttentionControl` installed on
    the model's UNet captures and modulates it as it does the two-pass denoiser's conditional half (the guide
    has no attention layers).
    """
    unet, w = model.unet, finite_weight(guidance_scale)
    guide = freeze(guide)
    guide.check_fits(unet)
    p = next(iter(unet.parameters()))
    cond = model.embed(tokens).to(p.device, p.dtype)
    if control is not None and control.installed_on is not unet:
        raise ValueError("control is not installed on this model's UNet; make it with model.attention_control()")

    def net(x, t):
        B = x.shape[0]
        if cond.shape[0] not in (1, B):
            raise ValueError(f"{cond.shape[0]} conditions for a batch of {B}; pass one, or one per sample")
        return distilled_eps(unet, guide, x.to(p.dtype), t, cond, w).to(x.dtype)

    d = Denoiser(net, NoiseSchedule.from_diffusers(model.scheduler), model.scheduler.config.prediction_type)
    d.dtype, d.device = state_dtype, p.device
    return d
