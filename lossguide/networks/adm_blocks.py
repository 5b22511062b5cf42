"""The building blocks of the ADM UNet (Dhariwal & Nichol 2021, §3 and App. A): sinusoidal timestep
embedding, GroupNorm32, residual blocks with scale-shift norm and optional up/down-sampling, and
multi-head self-attention in the legacy and the new q/k/v channel order.

Parameter names follow the state-dict layout of the released checkpoints (``in_layers``,
``emb_layers``, ``out_layers``, ``skip_connection``, ``qkv``, ``proj_out``, ``op``, ``conv``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t·ω_i), sin(t·ω_i)] with ω_i = max_period^(−i/half), i < half = dim//2 (ADM's order: cos first)."""
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.reshape(-1, 1).float() * omega[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 and cast back to the input's dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class TimestepSequential(nn.Sequential):
    """A sequence of layers; residual blocks among them also receive the embedding e(t, y)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """×2 nearest-neighbour upsampling, optionally followed by a 3×3 convolution (``conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """×½ downsampling: a stride-2 3×3 convolution (``op``) or 2×2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.op = (
            nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
            if use_conv
            else nn.AvgPool2d(2, stride=2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))); h = GN(h)·(1 + s) + b with (s, b) = Linear(SiLU(e)) (scale-shift norm,
    ADM §3) or h = GN(h + Linear(SiLU(e))); out = skip(x) + conv(Dropout(SiLU(h))). With ``up``/``down``
    both branches are resampled (without convolution) before the first convolution."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(qᵀk/√d)·v over positions, for q, k, v of shape [N, d, T] (the softmax in float32)."""
    s = q.shape[1] ** -0.25  # √d split between q and k, as the reference does, for fp16 headroom
    w = torch.einsum("nct,ncs->nts", q * s, k * s)
    w = torch.softmax(w.float(), dim=-1).to(w.dtype)
    return torch.einsum("nts,ncs->nct", w, v)


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention on qkv [B, 3·H·d, T] read per head first: [B·H, 3·d, T] → (q, k, v)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        b, width, length = qkv.shape
        d = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(b * self.n_heads, 3 * d, length).split(d, dim=1)
        return _attend(q, k, v).reshape(b, -1, length)


class QKVAttention(nn.Module):
    """Multi-head attention on qkv [B, 3·H·d, T] split into q, k, v first, then each into H heads."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        b, width, length = qkv.shape
        d = width // (3 * self.n_heads)
        q, k, v = (z.reshape(b * self.n_heads, d, length) for z in qkv.chunk(3, dim=1))
        return _attend(q, k, v).reshape(b, -1, length)


def n_heads_for(channels: int, num_heads: int, num_head_channels: int, heads_flag: str = "num_heads") -> int:
    """H = channels / num_head_channels when a head width is given (≠ −1), else ``num_heads``; H must divide
    the channels (``heads_flag`` names the head-count flag in the error, e.g. ``num_heads_upsample``)."""
    if num_head_channels != -1:
        if not isinstance(num_head_channels, int) or num_head_channels < 1:
            raise ValueError(f"num_head_channels={num_head_channels!r} is not a positive int; pass e.g. 64, or -1 "
                             f"to split by {heads_flag}")  # fmt: skip
        if channels % num_head_channels:
            raise ValueError(f"an attention layer's {channels} channels are not divisible by num_head_channels="
                             f"{num_head_channels}; pass a head width that divides every attention layer's "
                             "channels (the published checkpoints use 64)")  # fmt: skip
        return channels // num_head_channels
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{heads_flag}={num_heads!r} is not a positive int; pass a head count or num_head_channels")
    if channels % num_heads:
        raise ValueError(f"an attention layer's {channels} channels are not divisible by {heads_flag}={num_heads}; "
                         "pass a head count that divides every attention layer's channels, or a "
                         "num_head_channels")  # fmt: skip
    return num_heads


class AttentionBlock(nn.Module):
    """x + proj_out(Attention(qkv(GN(x)))) over the H·W positions."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        new_order: bool = False,
        heads_flag: str = "num_heads",
    ):
        super().__init__()
        heads = n_heads_for(channels, num_heads, num_head_channels, heads_flag)
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.attention = QKVAttention(heads) if new_order else QKVAttentionLegacy(heads)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)
