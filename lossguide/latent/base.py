"""What every latent stack shares: the VAE around the network, classifier-free guidance (Ho & Salimans 2022,
eq. 6), autocast and the embedding checks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lossguide.denoiser import Denoiser
from lossguide.latent.losses import DecodedLoss


def _expand(e: torch.Tensor, B: int, what: str = "prompt embeddings") -> torch.Tensor:
    """``e`` [1 or B, ...] as [B, ...]."""
    if e.shape[0] == B:
        return e
    if e.shape[0] != 1:
        raise ValueError(f"{e.shape[0]} {what} for a batch of {B}; pass one, or one per sample")
    return e.expand(B, *e.shape[1:])


def _prep(e: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor | None:
    """A conditioning tensor detached onto the network's device and dtype."""
    return None if e is None else torch.as_tensor(e).detach().to(p.device, p.dtype)


def _cat(u, c):
    """torch.cat([u, c]) of tensors, or of dicts of tensors key by key (``added_cond_kwargs``)."""
    if isinstance(c, dict):
        return {k: _cat(u[k], c[k]) for k in c}
    return torch.cat([u, c])


def _cfg(call: Callable, z: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict | None, w: float, batch: bool):
    """out_∅ + w·(out_c − out_∅) of ``call(z, t, **kwargs)``: one call when ``uncond`` is None, else a batch of
    2B (unconditional first, as diffusers' pipelines) or two calls of B (``batch=False``: half the peak memory)."""
    if uncond is None:
        return call(z, t, **cond)
    if batch:
        both = {k: _cat(uncond[k], cond[k]) for k in cond}
        out_u, out_c = call(torch.cat([z, z]), torch.cat([t, t]), **both).chunk(2)
    else:
        out_u, out_c = call(z, t, **uncond), call(z, t, **cond)
    return out_u + w * (out_c - out_u)


class _VAEStack:
    """What every family shares: the VAE's geometry, the decoded loss, gradient checkpointing."""

    vae: torch.nn.Module
    #: latent height and width must be multiples of this (Flux: 2, its 2×2 packing)
    latent_multiple: int = 1

    @property
    def vae_factor(self) -> int:
        """Pixels per latent pixel: 2^(number of VAE blocks − 1) (8 for every released model)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a ``height``×``width`` image; both must be multiples of the VAE factor
        (times 2 for Flux's packing)."""
        f = self.vae_factor * self.latent_multiple
        if height % f or width % f:
            what = f"the VAE factor {self.vae_factor}" + (
                f" × {self.latent_multiple} (latent packing)" if self.latent_multiple > 1 else ""
            )
            raise ValueError(
                f"image size {height}×{width} is not a multiple of {what}; use e.g. {height // f * f}×{width // f * f}"
            )
        return (self.latent_channels, height // self.vae_factor, width // self.vae_factor)

    def loss(self, pixel_loss: Callable, **kw) -> DecodedLoss:
        """:class:`DecodedLoss` of ``pixel_loss`` through this stack's VAE (x = D(z/scaling + shift))."""
        return DecodedLoss(self.vae, pixel_loss, **kw)

    def _checkpoint(self, model: torch.nn.Module, on_model: bool, on_vae: bool) -> None:
        for on, m in ((on_model, model), (on_vae, self.vae)):
            if on:
                m.enable_gradient_checkpointing()
            elif getattr(m, "is_gradient_checkpointing", False):
                m.disable_gradient_checkpointing()

    @staticmethod
    def _finish(d: Denoiser, p: torch.Tensor, state_dtype: torch.dtype) -> Denoiser:
        d.dtype, d.device = state_dtype, p.device
        return d
