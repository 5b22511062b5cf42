"""The ADM networks of guided-diffusion (Dhariwal & Nichol 2021): the UNet ε_θ(x_t, t[, y]) with learned
Σ (Nichol & Dhariwal 2021, eq. 15) and the noise-aware classifier p_φ(y | x_t, t) (its encoder half).

``attention_resolutions`` are downsample rates ds (1 at the input, ×2 per level), as in the reference
constructors; :mod:`lossguide.networks.flags` converts command-line pixel resolutions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lossguide.networks.adm_blocks import (
    AttentionBlock,
    Downsample,
    GroupNorm32,
    QKVAttention,
    ResBlock,
    TimestepSequential,
    Upsample,
    n_heads_for,
    timestep_embedding,
)


class _Encoder(nn.Module):
    """The shared first half: e = MLP(emb(t)) [+ E_y], the input blocks and the middle block."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float,
        channel_mult: Sequence[float],
        conv_resample: bool,
        num_heads: int,
        num_head_channels: int,
        use_scale_shift_norm: bool,
        resblock_updown: bool,
        use_new_attention_order: bool,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        emb_ch = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        self._block_args = (emb_ch, dropout, use_scale_shift_norm)  # for _res
        res = self._res

        def attn(c):
            return AttentionBlock(c, num_heads, num_head_channels, use_new_attention_order)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        self.skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepSequential(down))
                self.skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.ch, self.ds = ch, ds

    def _res(self, c_in: int, c_out: int, up: bool = False, down: bool = False) -> ResBlock:
        emb_ch, dropout, scale_shift = self._block_args
        return ResBlock(c_in, emb_ch, dropout, c_out, use_scale_shift_norm=scale_shift, up=up, down=down)

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(timestep_embedding(t, self.model_channels))


class ADMUNet(_Encoder):
    """guided-diffusion's ``UNetModel``: ``forward(x, t, y=None)`` → [B, out_channels, H, W]; with learned
    Σ (out_channels = 2C) channels :C are ε and C: the interpolation v of log Σ between β_t and β̃_t."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
    ):
        super().__init__(
            in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, num_heads, num_head_channels, use_scale_shift_norm, resblock_updown,
            use_new_attention_order,
        )  # fmt: skip
        self.image_size = image_size
        self.out_channels = out_channels
        self.num_classes = num_classes
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, 4 * model_channels)
        heads_up, up_flag = num_heads, "num_heads"
        if num_heads_upsample != -1:
            heads_up, up_flag = num_heads_upsample, "num_heads_upsample"
        res = self._res
        ch, ds, skips = self.ch, self.ds, list(self.skip_channels)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                c_out = int(mult * model_channels)
                layers = [res(ch + skips.pop(), c_out)]
                ch = c_out
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, heads_up, num_head_channels, use_new_attention_order, up_flag))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "this UNet is class-conditional: pass labels y"
                if y is None
                else "this UNet is unconditional (num_classes=None): do not pass y"
            )
        emb = self.embed(t)
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the spatial mean token (plus a learned positional embedding) attends
    to all positions; ``c_proj`` maps its output to ``output_dim``."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(embed_dim, spatial_dim**2 + 1))
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.attention = QKVAttention(n_heads_for(embed_dim, 1, num_head_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        return self.c_proj(self.attention(self.qkv_proj(x)))[:, :, 0]


POOLS = ("attention", "adaptive", "spatial", "spatial_v2")


class ADMClassifier(_Encoder):
    """guided-diffusion's ``EncoderUNetModel``: the UNet's encoder half and a pooling head;
    ``forward(x, t)`` → logits [B, out_channels] of p_φ(y | x_t, t) (ADM §4, classifier guidance)."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ):
        super().__init__(
            in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, num_heads, num_head_channels, use_scale_shift_norm, resblock_updown,
            use_new_attention_order,
        )  # fmt: skip
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
        self.image_size, self.out_channels, self.pool = image_size, out_channels, pool
        ch = self.ch
        if pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels (the reference uses 64)")
            if image_size % self.ds:
                raise ValueError(f"image_size {image_size} is not divisible by the total downsampling {self.ds}")
            self.out = nn.Sequential(
                GroupNorm32(ch), nn.SiLU(), AttentionPool2d(image_size // self.ds, ch, num_head_channels, out_channels)
            )
        elif pool == "adaptive":
            self.out = nn.Sequential(
                GroupNorm32(ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, out_channels, 1), nn.Flatten()
            )
        else:  # spatial pools: the spatial means of every input block's and the middle block's output
            feat = sum(self.skip_channels) + ch
            if pool == "spatial":
                self.out = nn.Sequential(nn.Linear(feat, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
            else:
                self.out = nn.Sequential(
                    nn.Linear(feat, 2048), GroupNorm32(2048), nn.SiLU(), nn.Linear(2048, out_channels)
                )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(t)
        means, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            means.append(h.mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if self.pool.startswith("spatial"):
            return self.out(torch.cat([*means, h.mean(dim=(2, 3))], dim=-1).to(x.dtype))
        return self.out(h.to(x.dtype))
