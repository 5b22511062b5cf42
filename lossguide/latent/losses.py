"""Pixel losses on decoded latents: ℓ(D(z0_hat/s + shift)) with the decoder inside the autograd graph."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lossguide.denoiser import freeze


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _param(module: torch.nn.Module) -> torch.Tensor:
    return next(iter(module.parameters()))


def expected_size(loss) -> tuple[int, int] | None:
    """The (H, W) a pixel loss needs, where it says (``expected_size``, or its reference image); else None."""
    from lossguide import losses

    size = getattr(loss, "expected_size", None)
    if size is not None:
        return tuple(size)
    if isinstance(loss, losses.SketchLoss):
        return tuple(loss.ref_edges.shape[-2:])
    if isinstance(loss, losses.InpaintLoss):
        return tuple(loss.ref.shape[-2:])
    if isinstance(loss, losses.SuperResLoss):
        return tuple(s * loss.factor for s in loss.y.shape[-2:])
    if isinstance(loss, losses.WeightedSum):
        sizes = {expected_size(term) for _, term in loss.terms} - {None}
        return sizes.pop() if len(sizes) == 1 else None
    return None


class DecodedLoss:
    """ℓ(D(z0_hat / s)): a pixel loss on the VAE-decoded latent x0_hat, inside the autograd graph.

    Args:
        vae: ``AutoencoderKL`` (frozen here).
        pixel_loss: ``ℓ(x0 [B, 3, H, W] in [−1, 1]) -> [B]``.
        decode_scale: resize z0_hat by this factor (bilinear) before decoding: 0.5 decodes a quarter of
            the pixels, for a loss that does not need full resolution (CLIP resizes to 224² anyway).
        autocast_dtype: decode under ``torch.autocast`` (e.g. bf16).
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        pixel_loss: Callable,
        decode_scale: float = 1.0,
        autocast_dtype: torch.dtype | None = None,
    ):
        if not 0 < decode_scale <= 1:
            raise ValueError(f"decode_scale must be in (0, 1], got {decode_scale}")
        self.vae = freeze(vae)
        self.pixel_loss = pixel_loss
        self.decode_scale = float(decode_scale)
        self.autocast_dtype = autocast_dtype
        cfg = vae.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.expected_size = expected_size(pixel_loss)

    def decoded_size(self, h: int, w: int) -> tuple[int, int]:
        """(H, W) of the decoded image for an h×w latent."""
        if self.decode_scale != 1:
            h, w = max(1, round(h * self.decode_scale)), max(1, round(w * self.decode_scale))
        return h * self.factor, w * self.factor

    def check(self, latent_shape: Sequence[int]) -> None:
        """Clear errors for a pixel-space input or a pixel loss of the wrong size."""
        C, h, w = latent_shape[-3:]
        if C != self.latent_channels:
            raise ValueError(
                f"DecodedLoss got inputs with {C} channels but the VAE's latents have {self.latent_channels}: it "
                "guides a latent model; give a pixel model its pixel loss directly"
            )
        size = self.decoded_size(h, w)
        if self.expected_size is not None and tuple(self.expected_size) != size:
            H, W = self.expected_size
            raise ValueError(
                f"the pixel loss expects {H}×{W} images but {h}×{w} latents decode to {size[0]}×{size[1]} "
                f"(VAE factor {self.factor}, decode_scale {self.decode_scale:g}); give the loss a {size[0]}×{size[1]} "
                f"reference, or sample latents of {H // self.factor}×{W // self.factor} with decode_scale=1"
            )

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """x0 = D(z0/s + shift) in [−1, 1] (unclamped), differentiable in z0."""
        z = z0 / self.scaling_factor + self.shift_factor
        if self.decode_scale != 1:
            h, w = (max(1, round(s * self.decode_scale)) for s in z.shape[-2:])
            z = F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        p = _param(self.vae)
        with _autocast(z.device, self.autocast_dtype):
            x = self.vae.decode(z.to(p.dtype)).sample
        return x.to(z0.dtype)

    def __call__(self, z0: torch.Tensor) -> torch.Tensor:
        if getattr(z0, "_lossguide_decoded", False):  # already decoded by DecodeThenAugment
            return self.pixel_loss(z0)
        self.check(z0.shape)
        return self.pixel_loss(self.decode(z0))


class DecodeThenAugment:
    """Random augmentation of a latent model's x0_hat in pixel space (Shen et al. 2024, Alg. 1 on D(z0)):
    decode once, then |T| augmented copies of the image, so |T| costs |T| loss evaluations and one decode.

    Pass it as the preset's ``augment`` together with the :class:`DecodedLoss` it decodes for, e.g.
    ``preset("shen2024", n_aug=10, augment=DecodeThenAugment(loss))``; the loss then receives the
    augmented images (marked as decoded) instead of latents.
    """

    def __init__(self, loss: DecodedLoss, augment: Callable | None = None):
        from lossguide.augment import policy

        if not isinstance(loss, DecodedLoss):
            raise TypeError(f"DecodeThenAugment needs the DecodedLoss it decodes for, got {type(loss).__name__}")
        self.loss = loss
        self.augment = augment or policy("photo")  # decoded images are photos: the paper's DiffAugment

    def to_dict(self) -> dict:
        from lossguide.augment import augmentation_to_dict

        return {"name": "decode_then_augment", "augment": augmentation_to_dict(self.augment)}

    def __call__(self, z: torch.Tensor, generators, n: int) -> torch.Tensor:
        self.loss.check(z.shape)
        x = self.augment(self.loss.decode(z), generators, n)
        x._lossguide_decoded = True
        return x
