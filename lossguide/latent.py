"""Latent diffusion (Stable Diffusion) under the denoiser contract, and pixel losses on decoded latents.

The denoiser runs in latent space: z_t → (ε_hat, z0_hat) of a text-conditioned ``UNet2DConditionModel``
with classifier-free guidance ε̃ = ε_∅ + w·(ε_c − ε_∅) (Ho & Salimans 2022, eq. 6; applied to the raw
output of any ``prediction_type``, as diffusers does). A pixel-space loss ℓ(x0) becomes a latent loss
ℓ(D(z0_hat / s)) through :class:`DecodedLoss`: the VAE decoder D runs inside the autograd graph, so the
gradient reaches z_t through decoder and UNet. Memory options: gradient checkpointing of UNet and
decoder (:meth:`LatentStack.enable_gradient_checkpointing`), autocast, and decoding a downsampled z0_hat
for the loss (``decode_scale``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lossguide.denoiser import Denoiser, freeze
from lossguide.schedule import NoiseSchedule

log = logging.getLogger(__name__)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _param(module: torch.nn.Module) -> torch.Tensor:
    return next(iter(module.parameters()))


@dataclass
class LatentStack:
    """The components of a Stable-Diffusion-like pipeline (frozen on construction).

    Args:
        unet: ``UNet2DConditionModel`` (ε, v or x0 prediction, as its scheduler says).
        vae: ``AutoencoderKL``; latents are ``s·E(x)`` with s = ``vae.config.scaling_factor``.
        scheduler: a VP diffusers scheduler (ᾱ and ``prediction_type``).
        text_encoder, tokenizer: a ``CLIPTextModel`` and its tokenizer (optional when prompt embeddings
            are passed precomputed).
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    text_encoder: torch.nn.Module | None = None
    tokenizer: Callable | None = None

    def __post_init__(self):
        for m in (self.unet, self.vae, self.text_encoder):
            if m is not None:
                freeze(m)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent pixel: 2^(number of VAE blocks − 1) (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a ``height``×``width`` image; both must be multiples of the VAE factor."""
        f = self.vae_factor
        if height % f or width % f:
            raise ValueError(
                f"image size {height}×{width} is not a multiple of the VAE factor {f}; use e.g. "
                f"{height // f * f}×{width // f * f}"
            )
        return (self.latent_channels, height // f, width // f)

    def enable_gradient_checkpointing(self, unet: bool = True, vae: bool = True) -> None:
        """Recompute UNet and VAE-decoder activations in the backward pass instead of storing them
        (diffusers' per-block checkpointing; active under autograd even in eval mode)."""
        for on, m in ((unet, self.unet), (vae, self.vae)):
            if on:
                m.enable_gradient_checkpointing()
            elif getattr(m, "is_gradient_checkpointing", False):
                m.disable_gradient_checkpointing()

    def encode_prompt(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states [N, L, D] of the prompts, without gradients ("" is the null prompt)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this stack has no text encoder/tokenizer: pass prompt_embeds=tensor [1 or B, L, D]")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        p = _param(self.text_encoder)
        max_len = getattr(self.tokenizer, "model_max_length", None)
        if max_len is None or max_len > 100_000:  # a tokenizer saved without its length: the encoder's
            max_len = self.text_encoder.config.max_position_embeddings
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        with torch.no_grad():
            return self.text_encoder(ids["input_ids"].to(p.device))[0]

    def denoiser(
        self,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None = None,
        guidance_scale: float = 7.5,
        state_dtype: torch.dtype = torch.float32,
        autocast_dtype: torch.dtype | None = None,
    ) -> Denoiser:
        """z_t → (ε_hat, z0_hat) with classifier-free guidance ε̃ = ε_∅ + w·(ε_c − ε_∅), w = ``guidance_scale``.

        Args:
            prompt_embeds: [1 or B, L, D] (one prompt for all samples, or one per sample).
            negative_embeds: the unconditional (null or negative prompt) embeddings; None with w ≠ 1
                encodes the empty prompt.
            guidance_scale: w; 1 is the conditional model alone (one UNet call per step instead of two).
            state_dtype: dtype of z_t, ε_hat and z0_hat (the UNet runs in its weights' dtype).
            autocast_dtype: run the UNet under ``torch.autocast`` (e.g. bf16 with fp32 weights).
        """
        unet = self.unet
        w = float(guidance_scale)
        if w != 1.0 and negative_embeds is None:
            negative_embeds = self.encode_prompt("")
        p = _param(unet)
        cond = prompt_embeds.detach().to(p.device, p.dtype)
        uncond = None if w == 1.0 else negative_embeds.detach().to(p.device, p.dtype)

        def expand(e, B):
            if e.shape[0] == B:
                return e
            if e.shape[0] != 1:
                raise ValueError(f"{e.shape[0]} prompt embeddings for a batch of {B}; pass one, or one per sample")
            return e.expand(B, *e.shape[1:])

        def net(z, t):
            B = z.shape[0]
            with _autocast(z.device, autocast_dtype):
                if uncond is None:
                    out = unet(z.to(p.dtype), t, encoder_hidden_states=expand(cond, B)).sample
                else:
                    zz = torch.cat([z, z]).to(p.dtype)
                    ee = torch.cat([expand(uncond, B), expand(cond, B)])
                    out_u, out_c = unet(zz, torch.cat([t, t]), encoder_hidden_states=ee).sample.chunk(2)
                    out = out_u + w * (out_c - out_u)
            return out.to(z.dtype)

        d = Denoiser(net, NoiseSchedule.from_diffusers(self.scheduler), self.scheduler.config.prediction_type)
        d.dtype, d.device = state_dtype, p.device
        return d

    def loss(self, pixel_loss: Callable, **kw) -> DecodedLoss:
        """:class:`DecodedLoss` of ``pixel_loss`` through this stack's VAE."""
        return DecodedLoss(self.vae, pixel_loss, **kw)


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


def load_stable_diffusion(
    name_or_path: str, device="cpu", dtype=torch.float32, scheduler: str = "DDIMScheduler"
) -> LatentStack:
    """Load a Stable-Diffusion pipeline folder or hub id (``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/``) into a :class:`LatentStack`; missing files are a clear error."""
    from lossguide.models import ModelNotFoundError, _resolve, parse_dtype
    from lossguide.net_losses import hf_dtype_kwargs

    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise ImportError("latent models need diffusers and transformers: pip install 'lossguide[all]'") from e
    dtype = parse_dtype(dtype)
    src, local_only = _resolve(name_or_path)
    kw = dict(local_files_only=local_only)
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(
            src, subfolder="unet", torch_dtype=dtype, low_cpu_mem_usage=False, **kw
        )
        vae = diffusers.AutoencoderKL.from_pretrained(
            src, subfolder="vae", torch_dtype=dtype, low_cpu_mem_usage=False, **kw
        )
        text_encoder = transformers.CLIPTextModel.from_pretrained(
            src, subfolder="text_encoder", **hf_dtype_kwargs(dtype), **kw
        )
        tokenizer = transformers.CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        sched = getattr(diffusers, scheduler).from_pretrained(src, subfolder="scheduler", **kw)
    except (OSError, ValueError, AttributeError) as e:
        where = "the hub is not reachable from here and it is not in the local cache; " if local_only else ""
        raise ModelNotFoundError(
            f"cannot load {name_or_path!r} as a Stable Diffusion pipeline ({e.__class__.__name__}): {where}pass a "
            "local folder with unet/, vae/, text_encoder/, tokenizer/ and scheduler/ (e.g. from "
            f"`huggingface-cli download {name_or_path}` on a machine with network access)"
        ) from e
    return LatentStack(unet.to(device), vae.to(device), sched, text_encoder.to(device), tokenizer)
