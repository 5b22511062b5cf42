"""The DDPM UNet ε_θ(x_t, t) of Ho et al. (2020, App. B) in the layout of the DDIM codebase
(Song et al. 2021, ``models.diffusion.Model``), which SDEdit's and FreeDoM's CelebA-HQ checkpoints use.

``attn_resolutions`` are pixel resolutions (the feature map's side), counted from ``resolution``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(t·ω_i), cos(t·ω_i)] with ω_i = 10000^(−i/(half−1)), i < half = dim//2 (Transformer-style, sin first)."""
    half = dim // 2
    omega = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=t.device))
    arg = t.reshape(-1, 1).float() * omega[None]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class Upsample(nn.Module):
    """×2 nearest-neighbour upsampling, then a 3×3 convolution when ``with_conv``."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """×½: a stride-2 3×3 convolution after zero-padding right and bottom by one, or 2×2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2, stride=2)


class ResnetBlock(nn.Module):
    """h = conv1(swish(GN(x))) + W·swish(e); out = shortcut(x) + conv2(Dropout(swish(GN(h))))."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float,
                 conv_shortcut: bool = False):  # fmt: skip
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut_name = None
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 3, padding=1)
                self.shortcut_name = "conv_shortcut"
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
                self.shortcut_name = "nin_shortcut"

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = h + self.temb_proj(_swish(temb))[:, :, None, None]
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if self.shortcut_name is not None:
            x = getattr(self, self.shortcut_name)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over positions: x + proj_out(v·softmax(qᵀk/√C)ᵀ) on GN(x)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, c, hh * ww) for m in (self.q, self.k, self.v))
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=2)  # [b, query i, key j]
        out = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class _Level(nn.Module):
    """One resolution level: its residual blocks, their attention blocks and the resampler (``block``,
    ``attn``, ``downsample``/``upsample`` in the state dict)."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, temb_channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, temb_channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, temb_channels, dropout)


class DDIMUNet(nn.Module):
    """``forward(x, t)`` → ε_hat [B, out_ch, H, W]; the DDIM codebase's ``Model`` from its config flags
    (``type="bayesian"`` adds the per-timestep ``logvar`` parameter, unused in the forward pass)."""

    def __init__(
        self,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        in_channels: int = 3,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        type: str = "simple",  # noqa: A002 - the codebase's config name
        num_diffusion_timesteps: int = 1000,
    ):
        super().__init__()
        if type not in ("simple", "bayesian"):
            raise ValueError(f"unknown model type {type!r}; the DDIM codebase has 'simple' and 'bayesian'")
        self.ch, self.in_channels, self.out_channels = ch, in_channels, out_ch
        self.num_res_blocks, self.resolution = num_res_blocks, resolution
        self.ch_mult, self.attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        if type == "bayesian":
            self.logvar = nn.Parameter(torch.zeros(num_diffusion_timesteps))
        temb_ch = 4 * ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *self.ch_mult)
        n_levels = len(self.ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(n_levels):
            level = _Level()
            block_in, block_out = ch * in_mult[i], ch * self.ch_mult[i]
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, temb_ch, dropout))
                block_in = block_out
                if res in self.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != n_levels - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, temb_ch, dropout)
        ups = []
        for i in reversed(range(n_levels)):
            level = _Level()
            block_out = ch * self.ch_mult[i]
            for j in range(num_res_blocks + 1):
                skip_in = ch * (in_mult[i] if j == num_res_blocks else self.ch_mult[i])
                level.block.append(ResnetBlock(block_in + skip_in, block_out, temb_ch, dropout))
                block_in = block_out
                if res in self.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            ups.insert(0, level)
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb.dense[1](_swish(self.temb.dense[0](timestep_embedding(t, self.ch))))
        n_levels = len(self.ch_mult)
        hs = [self.conv_in(x)]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if i != n_levels - 1:
                hs.append(level.downsample(hs[-1]))
        h = hs[-1]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)
        for i in reversed(range(n_levels)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))
