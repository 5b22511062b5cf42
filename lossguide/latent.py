"""Latent diffusion models under the denoiser contract, and pixel losses on decoded latents.

The denoiser runs in latent space: z_t → (ε_hat, z0_hat) of a text-conditioned network, with classifier-free
guidance out = out_∅ + w·(out_c − out_∅) (Ho & Salimans 2022, eq. 6; applied to the raw output of any
``prediction_type``, as diffusers does). A pixel-space loss ℓ(x0) becomes a latent loss ℓ(D(z0_hat/s + shift))
through :class:`DecodedLoss`: the VAE decoder D runs inside the autograd graph, so the gradient reaches z_t
through decoder and network. Memory options: gradient checkpointing of network and decoder
(``enable_gradient_checkpointing``), autocast, and decoding a downsampled z0_hat for the loss (``decode_scale``).

One stack per model family, all on the same engine (:func:`lossguide.sample` with any preset):

- :class:`LatentStack`: Stable Diffusion 1.x/2.x, ``UNet2DConditionModel`` on a VP schedule, ε or v-prediction
  (SD 2.x 768-v) as its scheduler says (:func:`load_stable_diffusion`);
- :class:`SDXLStack`: SDXL, the same UNet with ``addition_embed_type="text_time"`` (pooled text embeddings and
  the six size/crop time ids as ``added_cond_kwargs``) (:func:`load_sdxl`);
- :class:`SD3Stack`: Stable Diffusion 3 / 3.5, ``SD3Transformer2DModel`` on rectified flow (velocity prediction,
  called with t·1000), 16-channel VAE with ``shift_factor`` (:func:`load_sd3`);
- :class:`FluxStack`: FLUX.1, ``FluxTransformer2DModel`` on rectified flow with 2×2-packed latents (called with
  t ∈ [0, 1]), the guidance-distilled dev model's embedded guidance value, optional true CFG (:func:`load_flux`).

Every flow stack samples its pipeline's own inference times with ``stack.sampler(num_steps, height, width)`` (a
:class:`~lossguide.samplers.FlowEuler`, which is diffusers' ``FlowMatchEulerDiscreteScheduler`` step). The state
is always the unpacked latent [B, C, h, w]: Flux packs and unpacks inside its denoiser, so a :class:`DecodedLoss`
and ``sample(shape=stack.latent_shape(H, W))`` work the same for every family. Text encoders are optional: every
``denoiser`` takes precomputed embeddings; ``encode_prompt`` (where the encoders were loaded) runs diffusers'
own pipeline encoding.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lossguide.denoiser import Denoiser, freeze
from lossguide.samplers import FlowEuler
from lossguide.schedule import FlowSchedule, NoiseSchedule
from lossguide.validate import finite_weight

log = logging.getLogger(__name__)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _param(module: torch.nn.Module) -> torch.Tensor:
    return next(iter(module.parameters()))


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


@dataclass
class LatentStack(_VAEStack):
    """The components of a Stable Diffusion 1.x/2.x pipeline (frozen on construction).

    Args:
        unet: ``UNet2DConditionModel`` (ε, v or x0 prediction, as its scheduler says: SD 2.x 768-v models are
            v-prediction).
        vae: ``AutoencoderKL``; latents are ``s·(E(x) − shift)`` with s = ``vae.config.scaling_factor``.
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
    def schedule(self) -> NoiseSchedule:
        """The VP schedule of the scheduler (build samplers on it: ``DDIM(stack.schedule, n)``)."""
        return NoiseSchedule.from_diffusers(self.scheduler)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    def enable_gradient_checkpointing(self, unet: bool = True, vae: bool = True) -> None:
        """Recompute UNet and VAE-decoder activations in the backward pass instead of storing them
        (diffusers' per-block checkpointing; active under autograd even in eval mode)."""
        self._checkpoint(self.unet, unet, vae)

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
        cfg_batch: bool = True,
    ) -> Denoiser:
        """z_t → (ε_hat, z0_hat) with classifier-free guidance ε̃ = ε_∅ + w·(ε_c − ε_∅), w = ``guidance_scale``.

        Args:
            prompt_embeds: [1 or B, L, D] (one prompt for all samples, or one per sample).
            negative_embeds: the unconditional (null or negative prompt) embeddings; None with w ≠ 1
                encodes the empty prompt.
            guidance_scale: w; 1 is the conditional model alone (one UNet call per step instead of two).
            state_dtype: dtype of z_t, ε_hat and z0_hat (the UNet runs in its weights' dtype).
            autocast_dtype: run the UNet under ``torch.autocast`` (e.g. bf16 with fp32 weights).
            cfg_batch: both CFG branches in one batch of 2B (False: two calls of B, half the peak memory).
        """
        if self.unet.config.get("addition_embed_type") == "text_time":
            raise ValueError(
                "this UNet takes SDXL's pooled embeddings and time ids (addition_embed_type='text_time'): "
                "use SDXLStack / load_sdxl"
            )
        w = finite_weight(guidance_scale)
        if w != 1.0 and negative_embeds is None:
            negative_embeds = self.encode_prompt("")
        p = _param(self.unet)
        cond = {"encoder_hidden_states": _prep(prompt_embeds, p)}
        uncond = None if w == 1.0 else {"encoder_hidden_states": _prep(negative_embeds, p)}
        return self._unet_denoiser(cond, uncond, w, state_dtype, autocast_dtype, cfg_batch)

    def _unet_denoiser(self, cond, uncond, w, state_dtype, autocast_dtype, cfg_batch, per_batch=None) -> Denoiser:
        unet, p = self.unet, _param(self.unet)

        def call(z, t, **kw):
            return unet(z.to(p.dtype), t, **kw).sample

        def expanded(kw, B, z):
            out = {k: ({kk: _expand(vv, B) for kk, vv in v.items()} if isinstance(v, dict) else _expand(v, B))
                   for k, v in kw.items()}  # fmt: skip
            return per_batch(out, z) if per_batch is not None else out

        def net(z, t):
            B = z.shape[0]
            with _autocast(z.device, autocast_dtype):
                c = expanded(cond, B, z)
                u = None if uncond is None else expanded(uncond, B, z)
                out = _cfg(call, z, t, c, u, w, cfg_batch)
            return out.to(z.dtype)

        return self._finish(Denoiser(net, self.schedule, self.prediction_type), p, state_dtype)


def sdxl_time_ids(
    original_size: tuple[int, int], crops_coords_top_left: tuple[int, int] = (0, 0), target_size=None
) -> torch.Tensor:
    """SDXL's micro-conditioning [1, 6] = (original H, W, crop top, left, target H, W) (Podell et al. 2023, §2.2;
    diffusers' ``_get_add_time_ids``); ``target_size`` defaults to ``original_size``."""
    target_size = original_size if target_size is None else target_size
    return torch.tensor([list(original_size) + list(crops_coords_top_left) + list(target_size)], dtype=torch.float32)


@dataclass
class SDXLStack(LatentStack):
    """Stable Diffusion XL: a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``, which takes the
    pooled embedding of the second text encoder and six size/crop ids (``added_cond_kwargs``).

    Args:
        text_encoder_2, tokenizer_2: the ``CLIPTextModelWithProjection`` and its tokenizer (optional, as the
            first pair: ``denoiser`` takes precomputed embeddings).
        force_zeros_for_empty_prompt: the unconditional branch without a negative prompt is all zeros (SDXL base's
            pipeline setting) rather than the encoded "".
    """

    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Callable | None = None
    force_zeros_for_empty_prompt: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.unet.config.get("addition_embed_type") != "text_time":
            raise ValueError(
                "SDXLStack needs a UNet with addition_embed_type='text_time' (SDXL); this one has "
                f"{self.unet.config.get('addition_embed_type')!r}: use LatentStack"
            )
        if self.text_encoder_2 is not None:
            freeze(self.text_encoder_2)

    def encode_prompt(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [N, L, D₁ + D₂], pooled [N, D_pool]) of both text encoders, by diffusers' own
        ``StableDiffusionXLPipeline.encode_prompt``."""
        import diffusers

        if None in (self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2):
            raise ValueError(
                "this SDXL stack has no text encoders: pass prompt_embeds [1 or B, L, D] and pooled_embeds [1 or B, D]"
            )
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet, scheduler=self.scheduler,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
        )  # fmt: skip
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with torch.no_grad():
            e, _, pooled, _ = pipe.encode_prompt(prompts, device=_param(self.text_encoder).device,
                                                 do_classifier_free_guidance=False)  # fmt: skip
        return e, pooled

    def denoiser(
        self,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None = None,
        guidance_scale: float = 5.0,
        state_dtype: torch.dtype = torch.float32,
        autocast_dtype: torch.dtype | None = None,
        cfg_batch: bool = True,
        *,
        pooled_embeds: torch.Tensor,
        negative_pooled_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        negative_time_ids: torch.Tensor | None = None,
    ) -> Denoiser:
        """z_t → (ε_hat, z0_hat) of SDXL with classifier-free guidance (w = ``guidance_scale``).

        Args:
            prompt_embeds: [1 or B, L, D₁ + D₂], both encoders' penultimate hidden states concatenated.
            pooled_embeds: [1 or B, D_pool], the second encoder's projected pooled output (``text_embeds``).
            negative_embeds, negative_pooled_embeds: the unconditional branch; None with w ≠ 1: zeros
                (``force_zeros_for_empty_prompt``) or the encoded "".
            time_ids: [1 or B, 6] (:func:`sdxl_time_ids`); None: (H, W, 0, 0, H, W) of the decoded image size.
            negative_time_ids: the unconditional branch's (default: ``time_ids``).
            other arguments: as :meth:`LatentStack.denoiser`.
        """
        w = finite_weight(guidance_scale)
        p = _param(self.unet)
        if w != 1.0 and negative_embeds is None:
            if self.force_zeros_for_empty_prompt:
                negative_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_embeds = torch.zeros_like(pooled_embeds)
            else:
                negative_embeds, negative_pooled_embeds = self.encode_prompt("")
        if w != 1.0 and negative_pooled_embeds is None:
            raise ValueError("negative_embeds given without negative_pooled_embeds; pass both (or neither)")
        f = self.vae_factor

        def branch(e, pooled, ids):
            added = {"text_embeds": _prep(pooled, p)}
            if ids is not None:
                added["time_ids"] = _prep(ids, p)
            return {"encoder_hidden_states": _prep(e, p), "added_cond_kwargs": added}

        def default_ids(kw, z):  # (H, W, 0, 0, H, W) of the image these latents decode to
            if "time_ids" not in kw["added_cond_kwargs"]:
                ids = sdxl_time_ids((z.shape[-2] * f, z.shape[-1] * f)).to(p.device, p.dtype)
                kw["added_cond_kwargs"] = dict(kw["added_cond_kwargs"], time_ids=_expand(ids, z.shape[0]))
            return kw

        cond = branch(prompt_embeds, pooled_embeds, time_ids)
        uncond = None
        if w != 1.0:
            uncond = branch(negative_embeds, negative_pooled_embeds,
                            time_ids if negative_time_ids is None else negative_time_ids)  # fmt: skip
        return self._unet_denoiser(cond, uncond, w, state_dtype, autocast_dtype, cfg_batch, per_batch=default_ids)


def flow_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """μ of the resolution-dependent shift, linear in the number of image tokens (diffusers' ``calculate_shift``,
    used by Flux and by SD3 with ``use_dynamic_shifting``); the times are then t ← e^μ·t/(1 + (e^μ − 1)·t)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


@dataclass
class _FlowStack(_VAEStack):
    """A rectified-flow transformer stack: transformer, VAE, ``FlowMatchEulerDiscreteScheduler`` and optional text
    encoders (``text_encoders``: the pipeline's component names → modules, e.g. ``text_encoder``, ``tokenizer_2``)."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    text_encoders: dict = field(default_factory=dict)

    _pipeline_class = ""  # the diffusers pipeline whose encode_prompt and inference times this stack follows
    _max_shift = 1.15  # that pipeline's default max_shift of calculate_shift

    def __post_init__(self):
        name = type(self.scheduler).__name__
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"{type(self).__name__} needs a FlowMatchEulerDiscreteScheduler, got {name}")
        for m in (self.transformer, self.vae, *self.text_encoders.values()):
            if isinstance(m, torch.nn.Module):
                freeze(m)

    @property
    def schedule(self) -> FlowSchedule:
        """x_t = (1 − t)·z0 + t·ε, t ∈ [0, 1] (T and the static shift of the scheduler)."""
        return FlowSchedule.from_diffusers(self.scheduler)

    def enable_gradient_checkpointing(self, transformer: bool = True, vae: bool = True) -> None:
        """Recompute transformer-block and VAE-decoder activations in the backward pass instead of storing them."""
        self._checkpoint(self.transformer, transformer, vae)

    def _seq_len(self, h: int, w: int) -> int:
        raise NotImplementedError

    def _pipeline_sigmas(self, num_steps: int):
        return None

    def inference_times(self, num_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The descending t (the scheduler's σ's, without the final 0) the diffusers pipeline steps through at
        ``num_steps`` for a ``height``×``width`` image (needed where the shift depends on resolution)."""
        sch = copy.deepcopy(self.scheduler)
        kw = {}
        cfg = sch.config
        if cfg.get("use_dynamic_shifting"):
            if height is None or width is None:
                raise ValueError(
                    f"this {self._pipeline_class} scheduler shifts its times by resolution (use_dynamic_shifting): "
                    "pass height= and width= of the image"
                )
            _, h, w = self.latent_shape(height, width)
            kw["mu"] = flow_shift_mu(
                self._seq_len(h, w), cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5), cfg.get("max_shift", self._max_shift),
            )  # fmt: skip
        sigmas = self._pipeline_sigmas(num_steps)
        if sigmas is None:
            sch.set_timesteps(num_steps, **kw)
        else:
            sch.set_timesteps(sigmas=sigmas, **kw)
        return torch.as_tensor(sch.sigmas, dtype=torch.float64)[:-1].cpu()

    def sampler(self, num_steps: int = 28, height: int | None = None, width: int | None = None) -> FlowEuler:
        """:class:`~lossguide.samplers.FlowEuler` on the pipeline's own inference times (:meth:`inference_times`):
        unguided, it takes the diffusers pipeline's steps exactly."""
        return FlowEuler(self.schedule, times=self.inference_times(num_steps, height, width))

    def _pipeline(self):
        import diffusers

        if not self.text_encoders:
            raise ValueError(
                f"this {type(self).__name__} has no text encoders: pass prompt_embeds [1 or B, L, D] and "
                "pooled_embeds [1 or B, D] precomputed, or load the stack with text_encoders=True"
            )
        cls = getattr(diffusers, self._pipeline_class)
        return cls(transformer=self.transformer, vae=self.vae, scheduler=self.scheduler, **self.text_encoders)


@dataclass
class SD3Stack(_FlowStack):
    """Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` predicting the velocity u = ε − z0 at t·1000, joint
    attention over the text tokens, the pooled CLIP embeddings as ``pooled_projections``; 16-channel VAE, latents
    s·(E(x) − shift) (Esser et al. 2024)."""

    _pipeline_class = "StableDiffusion3Pipeline"
    _max_shift = 1.16

    def _seq_len(self, h, w):
        p = self.transformer.config.patch_size
        return (h // p) * (w // p)

    def encode_prompt(self, prompts: str | Sequence[str], max_sequence_length: int = 256):
        """(prompt_embeds [N, L, D], pooled [N, D_pool]) of the three text encoders, by diffusers'
        ``StableDiffusion3Pipeline.encode_prompt`` (a missing T5 gives zeros, as there)."""
        pipe = self._pipeline()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with torch.no_grad():
            e, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=pipe._execution_device,
                                                 do_classifier_free_guidance=False,
                                                 max_sequence_length=max_sequence_length)  # fmt: skip
        return e, pooled

    def denoiser(
        self,
        prompt_embeds: torch.Tensor,
        pooled_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None = None,
        negative_pooled_embeds: torch.Tensor | None = None,
        guidance_scale: float = 7.0,
        state_dtype: torch.dtype = torch.float32,
        autocast_dtype: torch.dtype | None = None,
        cfg_batch: bool = True,
    ) -> Denoiser:
        """z_t → (ε_hat, z0_hat) with classifier-free guidance u = u_∅ + w·(u_c − u_∅) on the velocity.

        Args:
            prompt_embeds: [1 or B, L, D] (CLIP-L ⊕ CLIP-G padded, then T5 tokens, as the pipeline builds them).
            pooled_embeds: [1 or B, D_pool] (the CLIP pooled outputs concatenated).
            negative_embeds, negative_pooled_embeds: the unconditional branch; None with w ≠ 1 encodes "".
            guidance_scale: w (the pipeline's default 7.0; w = 1 is one transformer call per step).
            state_dtype, autocast_dtype: as :meth:`LatentStack.denoiser`.
            cfg_batch: both branches in one batch of 2B, as the pipeline (False: two calls of B).
        """
        w = finite_weight(guidance_scale)
        tr, p = self.transformer, _param(self.transformer)
        if w != 1.0 and negative_embeds is None:
            negative_embeds, negative_pooled_embeds = self.encode_prompt("")
        if w != 1.0 and negative_pooled_embeds is None:
            raise ValueError("negative_embeds given without negative_pooled_embeds; pass both (or neither)")
        cond = {"encoder_hidden_states": _prep(prompt_embeds, p), "pooled_projections": _prep(pooled_embeds, p)}
        uncond = None
        if w != 1.0:
            uncond = {"encoder_hidden_states": _prep(negative_embeds, p),
                      "pooled_projections": _prep(negative_pooled_embeds, p)}  # fmt: skip
        if (
            uncond is not None
            and cfg_batch
            and uncond["encoder_hidden_states"].shape[1:] != cond["encoder_hidden_states"].shape[1:]
        ):
            cfg_batch = False  # prompts of different lengths cannot share a batch

        def call(z, t, encoder_hidden_states, pooled_projections):
            B = z.shape[0]
            return tr(hidden_states=z.to(p.dtype), timestep=t.to(torch.float32),
                      encoder_hidden_states=_expand(encoder_hidden_states, B),
                      pooled_projections=_expand(pooled_projections, B, "pooled embeddings")).sample  # fmt: skip

        def net(z, t):  # t = t_flow·1000, the pipeline's timestep
            with _autocast(z.device, autocast_dtype):
                c = {k: _expand(v, z.shape[0]) for k, v in cond.items()}
                u = None if uncond is None else {k: _expand(v, z.shape[0]) for k, v in uncond.items()}
                out = _cfg(call, z, t, c, u, w, cfg_batch)
            return out.to(z.dtype)

        return self._finish(Denoiser(net, self.schedule, "flow_prediction"), p, state_dtype)


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """Flux's 2×2 patchification [B, C, h, w] → [B, (h/2)·(w/2), 4C] (diffusers' ``FluxPipeline._pack_latents``)."""
    B, C, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux packs 2×2 latent patches: latent height and width must be even, got {h}×{w}")
    return z.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: [B, (h/2)·(w/2), 4C] → [B, C, h, w]."""
    B, n, D = x.shape
    if n != (h // 2) * (w // 2) or D % 4 or h % 2 or w % 2:
        raise ValueError(f"cannot unpack {tuple(x.shape)} into {h}×{w} latents (need {(h // 2) * (w // 2)} tokens)")
    return x.reshape(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Flux's rotary position ids [(h/2)·(w/2), 3] = (0, row, column) of each packed token
    (``FluxPipeline._prepare_latent_image_ids`` for the packed grid)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass
class FluxStack(_FlowStack):
    """FLUX.1 [dev] / [schnell]: ``FluxTransformer2DModel`` predicting the velocity on 2×2-packed latents, called
    with t ∈ [0, 1] (the pipeline's timestep/1000), T5 tokens (``encoder_hidden_states``, position ids
    ``txt_ids`` = 0), the CLIP pooled embedding (``pooled_projections``) and, for the guidance-distilled dev model
    (``guidance_embeds``), the embedded guidance value; 16-channel VAE with shift and scale.

    The sampler's state is the unpacked latent [B, 16, h, w]; the denoiser packs it for the transformer and unpacks
    the velocity, so pixel losses, shapes and seeds work as for every other family.
    """

    _pipeline_class = "FluxPipeline"
    _max_shift = 1.15
    latent_multiple = 2

    def _seq_len(self, h, w):
        return (h // 2) * (w // 2)

    def _pipeline_sigmas(self, num_steps):
        return np.linspace(1.0, 1 / num_steps, num_steps)  # FluxPipeline's default σ's, then the shift

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer is guidance-distilled (dev: takes the guidance value; schnell: does not)."""
        return bool(self.transformer.config.get("guidance_embeds", False))

    def encode_prompt(self, prompts: str | Sequence[str], max_sequence_length: int = 512):
        """(prompt_embeds [N, L, D] of T5, pooled [N, D_pool] of CLIP), by diffusers' FluxPipeline.encode_prompt."""
        pipe = self._pipeline()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with torch.no_grad():
            e, pooled, _ = pipe.encode_prompt(prompts, None, device=pipe._execution_device,
                                              max_sequence_length=max_sequence_length)  # fmt: skip
        return e, pooled

    def denoiser(
        self,
        prompt_embeds: torch.Tensor,
        pooled_embeds: torch.Tensor,
        guidance: float | None = None,
        negative_embeds: torch.Tensor | None = None,
        negative_pooled_embeds: torch.Tensor | None = None,
        true_cfg_scale: float = 1.0,
        state_dtype: torch.dtype = torch.float32,
        autocast_dtype: torch.dtype | None = None,
    ) -> Denoiser:
        """z_t [B, C, h, w] → (ε_hat, z0_hat).

        Args:
            prompt_embeds: [1 or B, L, D] (T5), pooled_embeds: [1 or B, D_pool] (CLIP).
            guidance: the embedded guidance value of a guidance-distilled model (the pipeline's
                ``guidance_scale``; None: 3.5, its default). Not classifier-free guidance: one call per step. A model
                without ``guidance_embeds`` (schnell) takes none.
            negative_embeds, negative_pooled_embeds, true_cfg_scale: optional true classifier-free guidance
                u = u_neg + w·(u_c − u_neg), two transformer calls per step (``FluxPipeline(true_cfg_scale=w)``);
                w = 1 (default) is off.
            state_dtype, autocast_dtype: as :meth:`LatentStack.denoiser`.
        """
        tr, p = self.transformer, _param(self.transformer)
        g = None
        if self.guidance_embeds:
            g = 3.5 if guidance is None else float(guidance)
        elif guidance is not None:
            raise ValueError(
                "this Flux transformer has no guidance embedding (guidance_embeds=False, e.g. FLUX.1 schnell): "
                "pass guidance=None, or true_cfg_scale with negative embeddings for classifier-free guidance"
            )
        w = float(true_cfg_scale)
        if w != 1.0 and (negative_embeds is None or negative_pooled_embeds is None):
            raise ValueError("true_cfg_scale ≠ 1 needs negative_embeds and negative_pooled_embeds")
        cond = {"encoder_hidden_states": _prep(prompt_embeds, p), "pooled_projections": _prep(pooled_embeds, p)}
        uncond = None
        if w != 1.0:
            uncond = {"encoder_hidden_states": _prep(negative_embeds, p),
                      "pooled_projections": _prep(negative_pooled_embeds, p)}  # fmt: skip
        ids_cache: dict = {}

        def call(z, t, encoder_hidden_states, pooled_projections):
            B, _, h, w_ = z.shape
            key = (h, w_, z.device)
            if key not in ids_cache:
                ids_cache[key] = latent_image_ids(h, w_, z.device, p.dtype)
            e = _expand(encoder_hidden_states, B)
            out = tr(
                hidden_states=pack_latents(z.to(p.dtype)),
                timestep=t.to(p.dtype) / 1000,  # the pipeline's timestep/1000: t ∈ [0, 1]
                guidance=torch.full((B,), g, device=z.device, dtype=torch.float32) if self.guidance_embeds else None,
                pooled_projections=_expand(pooled_projections, B, "pooled embeddings"),
                encoder_hidden_states=e,
                txt_ids=torch.zeros(e.shape[1], 3, device=z.device, dtype=p.dtype),
                img_ids=ids_cache[key],
            ).sample
            return unpack_latents(out, h, w_)

        def net(z, t):  # t = t_flow·1000
            with _autocast(z.device, autocast_dtype):
                out = _cfg(call, z, t, cond, uncond, w, batch=False)  # two passes, as FluxPipeline
            return out.to(z.dtype)

        return self._finish(Denoiser(net, self.schedule, "flow_prediction"), p, state_dtype)


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


# -- loaders ---------------------------------------------------------------------------------------------------

#: per family: the pipeline class, the network, and the text components (name → (library, class)), as in the
#: released pipelines' model_index.json; a folder's own model_index.json overrides the classes and drops null ones
FAMILIES = {
    "sd": dict(
        pipeline="StableDiffusionPipeline",
        parts={"unet": ("diffusers", "UNet2DConditionModel")},
        text={"text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer")},
    ),
    "sdxl": dict(
        pipeline="StableDiffusionXLPipeline",
        parts={"unet": ("diffusers", "UNet2DConditionModel")},
        text={"text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
              "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
              "tokenizer_2": ("transformers", "CLIPTokenizer")},
    ),
    "sd3": dict(
        pipeline="StableDiffusion3Pipeline",
        parts={"transformer": ("diffusers", "SD3Transformer2DModel")},
        text={"text_encoder": ("transformers", "CLIPTextModelWithProjection"),
              "tokenizer": ("transformers", "CLIPTokenizer"),
              "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
              "tokenizer_2": ("transformers", "CLIPTokenizer"),
              "text_encoder_3": ("transformers", "T5EncoderModel"),
              "tokenizer_3": ("transformers", "T5TokenizerFast")},
    ),
    "flux": dict(
        pipeline="FluxPipeline",
        parts={"transformer": ("diffusers", "FluxTransformer2DModel")},
        text={"text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
              "text_encoder_2": ("transformers", "T5EncoderModel"),
              "tokenizer_2": ("transformers", "T5TokenizerFast")},
    ),
}  # fmt: skip
_SCHEDULERS = {"sd": "DDIMScheduler", "sdxl": "DDIMScheduler", "sd3": "FlowMatchEulerDiscreteScheduler",
               "flux": "FlowMatchEulerDiscreteScheduler"}  # fmt: skip
_NAMES = {"sd": "a Stable Diffusion", "sdxl": "an SDXL", "sd3": "a Stable Diffusion 3", "flux": "a FLUX.1"}
INDEX_FILE = "model_index.json"


def _libraries():
    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise ImportError("latent models need diffusers and transformers: pip install 'lossguide[all]'") from e
    return diffusers, transformers


def _folders(family: str, text_encoders: bool) -> str:
    """The subfolders a ``family`` pipeline folder needs, as text ("unet/, vae/, ... and scheduler/")."""
    spec = FAMILIES[family]
    names = [*spec["parts"], "vae", *(spec["text"] if text_encoders else ()), "scheduler"]
    return ", ".join(f"{n}/" for n in names[:-1]) + f" and {names[-1]}/"


def _read_index(name_or_path: str, src: str, local_only: bool, fix: str = "pass a local pipeline folder") -> dict:
    """The hub probe: a pipeline's ``model_index.json`` as a dict ({} where it has none), read from a local folder or
    fetched with ``huggingface_hub.hf_hub_download`` for a hub id (diffusers' ``load_config`` would pass it the
    deprecated ``local_dir_use_symlinks``, which warns)."""
    import json
    from pathlib import Path

    from lossguide.models import ModelNotFoundError, read_json

    if Path(src).exists():
        path = Path(src) / INDEX_FILE
        return read_json(path, "fix it, or save the pipeline again with save_pretrained") if path.is_file() else {}
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = huggingface_hub.hf_hub_download(src, INDEX_FILE, local_files_only=local_only)
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"cannot load {name_or_path!r}: the hub is not reachable from here and it is not in the local cache; "
            f"download it once with `huggingface-cli download {name_or_path}` on a machine with network access, "
            f"or {fix}"
        ) from e
    except EntryNotFoundError:
        return {}  # a repository without model_index.json: the family's default classes
    except (OSError, ValueError) as e:
        why = " ".join(str(e).split())[:200]
        raise ModelNotFoundError(
            f"cannot load {name_or_path!r} from the hub ({type(e).__name__}: {why}); {fix}"
        ) from e
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"the {INDEX_FILE} of {name_or_path!r} in the local cache is not valid JSON; delete "
                                 f"it from the cache and download it again") from e  # fmt: skip


def _load_parts(family: str, name_or_path: str, dtype, text_encoders: bool, scheduler: str | None) -> dict:
    """The components of a ``family`` pipeline folder or hub id; any load failure is a ModelNotFoundError that
    names the component (a local folder: its subfolder) and, for a text component, suggests
    ``text_encoders=False``."""
    import json
    from pathlib import Path

    from lossguide.models import ModelFolderError, ModelNotFoundError, hide_hub_symlink_warning, parse_dtype, resolve
    from lossguide.net_losses import hf_dtype_kwargs

    diffusers, transformers = _libraries()
    libs = {"diffusers": diffusers, "transformers": transformers}
    spec = FAMILIES[family]
    dtype = parse_dtype(dtype)
    sched_name = scheduler or _SCHEDULERS[family]
    if not isinstance(getattr(diffusers, sched_name, None), type):
        raise ValueError(f"scheduler={sched_name!r} is not a diffusers scheduler class; pass one such as "
                         f"{_SCHEDULERS[family]!r}")  # fmt: skip
    src, local_only = resolve(name_or_path)
    local = Path(src).exists()
    kw = dict(local_files_only=local_only)
    wanted = {**spec["parts"], "vae": ("diffusers", "AutoencoderKL"), "scheduler": ("diffusers", sched_name)}
    text = dict(spec["text"]) if text_encoders else {}
    no_text = "; or pass text_encoders=False to load it without text encoders and give prompt embeddings"
    fix = f"pass a local folder with {_folders(family, text_encoders)}{no_text if text_encoders else ''}"
    index = _read_index(name_or_path, src, local_only, fix)
    for name in [*spec["parts"], *spec["text"]]:
        entry = index.get(name)
        if entry is not None and not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            where = Path(src) / INDEX_FILE if local else f"the {INDEX_FILE} of {name_or_path!r}"
            example = json.dumps(list((spec["parts"] | spec["text"])[name]))
            raise ModelFolderError(f'{where}: "{name}" is {entry!r}, not [library, class] (e.g. {example}); fix the '
                                   "entry")  # fmt: skip
    for name in list(text):
        entry = index.get(name)
        if entry is not None and (entry[0] is None or entry[1] is None):
            del text[name]  # e.g. SD3 shipped without T5
        elif entry is not None:
            text[name] = tuple(entry)
    for name in spec["parts"]:
        if index.get(name) and index[name][1]:
            wanted[name] = tuple(index[name])
    out = {"_index": index}
    low_mem = _has_accelerate()
    for name, (lib, cls_name) in {**wanted, **text}.items():
        hint = no_text if name in text else ""
        cls = getattr(libs.get(lib, diffusers), cls_name, None)
        if not isinstance(cls, type):
            where = f"{Path(src) / INDEX_FILE}" if local else f"the {INDEX_FILE} of {name_or_path!r}"
            raise ModelFolderError(f'{where}: "{name}" names {lib}.{cls_name}, which {lib} does not have; fix the '
                                   f"entry or update {lib}{hint}")  # fmt: skip
        if local and not (Path(src) / name).is_dir():
            raise ModelNotFoundError(
                f"cannot load {name_or_path!r} as {_NAMES[family]} pipeline: {src} has no {name}/ subfolder (its "
                f"{cls_name}); add it{hint}"
            )
        try:
            with hide_hub_symlink_warning():
                if name == "scheduler" or name.startswith("tokenizer"):
                    out[name] = cls.from_pretrained(src, subfolder=name, **kw)
                elif lib == "transformers":
                    out[name] = cls.from_pretrained(src, subfolder=name, **hf_dtype_kwargs(dtype), **kw)
                else:
                    out[name] = cls.from_pretrained(
                        src, subfolder=name, torch_dtype=dtype, low_cpu_mem_usage=low_mem, **kw
                    )
        except (OSError, ValueError, AttributeError, KeyError, TypeError, RuntimeError) as e:
            why = " ".join(str(e).split())[:200]
            if local:
                raise ModelNotFoundError(
                    f"cannot load {name_or_path!r} as {_NAMES[family]} pipeline: {Path(src) / name}/ does not load "
                    f"as a {cls_name} ({e.__class__.__name__}: {why}); fix or replace that subfolder{hint}"
                ) from e
            where = "the hub is not reachable from here and it is not in the local cache; " if local_only else ""
            raise ModelNotFoundError(
                f"cannot load {name_or_path!r} as {_NAMES[family]} pipeline: its {name}/ failed "
                f"({e.__class__.__name__}: {why}): {where}pass a local folder with {_folders(family, text_encoders)} "
                f"(e.g. from `huggingface-cli download {name_or_path}` on a machine with network access){hint}"
            ) from e
    return out


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _to(parts: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.nn.Module) else v) for k, v in parts.items()}


def load_stable_diffusion(
    name_or_path: str,
    device="cpu",
    dtype=torch.float32,
    scheduler: str = "DDIMScheduler",
    text_encoders: bool = True,
) -> LatentStack:
    """Load a Stable Diffusion 1.x/2.x pipeline folder or hub id (``unet/``, ``vae/``, ``scheduler/`` and, with
    ``text_encoders``, ``text_encoder/`` and ``tokenizer/``) into a :class:`LatentStack`; anything missing is a
    :class:`~lossguide.models.ModelNotFoundError`. ``scheduler`` names the diffusers class read from
    ``scheduler/`` (any VP one)."""
    parts = _to(_load_parts("sd", name_or_path, dtype, text_encoders, scheduler), device)
    return LatentStack(parts["unet"], parts["vae"], parts["scheduler"], parts.get("text_encoder"),
                       parts.get("tokenizer"))  # fmt: skip


def load_sdxl(
    name_or_path: str,
    device="cpu",
    dtype=torch.float32,
    scheduler: str = "DDIMScheduler",
    text_encoders: bool = True,
) -> SDXLStack:
    """Load an SDXL pipeline folder or hub id (``unet/``, ``vae/``, ``scheduler/`` and, with ``text_encoders``,
    ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``) into an :class:`SDXLStack`; anything
    missing is a :class:`~lossguide.models.ModelNotFoundError`. ``scheduler`` names the diffusers class read from
    ``scheduler/`` (any VP one: DDIM, Euler, DPMSolver, ...)."""
    parts = _to(_load_parts("sdxl", name_or_path, dtype, text_encoders, scheduler), device)
    index = parts.pop("_index")
    return SDXLStack(
        parts["unet"], parts["vae"], parts["scheduler"], parts.get("text_encoder"), parts.get("tokenizer"),
        parts.get("text_encoder_2"), parts.get("tokenizer_2"),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )  # fmt: skip


def load_sd3(name_or_path: str, device="cpu", dtype=torch.float32, text_encoders: bool = True) -> SD3Stack:
    """Load a Stable Diffusion 3 / 3.5 pipeline folder or hub id (``transformer/``, ``vae/``, ``scheduler/`` and,
    with ``text_encoders``, the two CLIP and the T5 encoder with their tokenizers) into an :class:`SD3Stack`;
    anything missing is a :class:`~lossguide.models.ModelNotFoundError`."""
    parts = _to(_load_parts("sd3", name_or_path, dtype, text_encoders, None), device)
    parts.pop("_index")
    tr, vae, sch = parts.pop("transformer"), parts.pop("vae"), parts.pop("scheduler")
    return SD3Stack(tr, vae, sch, parts)


def load_flux(name_or_path: str, device="cpu", dtype=torch.bfloat16, text_encoders: bool = True) -> FluxStack:
    """Load a FLUX.1 pipeline folder or hub id (``transformer/``, ``vae/``, ``scheduler/`` and, with
    ``text_encoders``, CLIP and T5 with their tokenizers) into a :class:`FluxStack`; anything missing is a
    :class:`~lossguide.models.ModelNotFoundError`. bf16 by default: the 12B transformer is 48 GB in fp32."""
    parts = _to(_load_parts("flux", name_or_path, dtype, text_encoders, None), device)
    parts.pop("_index")
    tr, vae, sch = parts.pop("transformer"), parts.pop("vae"), parts.pop("scheduler")
    return FluxStack(tr, vae, sch, parts)


#: model_index.json's _class_name → the loader of that family
LOADERS = {
    "StableDiffusionPipeline": "load_stable_diffusion",
    "StableDiffusionXLPipeline": "load_sdxl",
    "StableDiffusion3Pipeline": "load_sd3",
    "FluxPipeline": "load_flux",
}


def load_latent(name_or_path: str, device="cpu", dtype=None, **kw):
    """The stack of whatever family a pipeline folder or hub id is (its ``model_index.json``'s ``_class_name``):
    :func:`load_stable_diffusion`, :func:`load_sdxl`, :func:`load_sd3` or :func:`load_flux`."""
    from pathlib import Path

    from lossguide.models import ModelNotFoundError, resolve

    _libraries()
    src, local_only = resolve(name_or_path)
    index = _read_index(name_or_path, src, local_only)
    cls_name = index.get("_class_name")
    if not isinstance(cls_name, str):
        where = Path(src) / INDEX_FILE if Path(src).exists() else f"the {INDEX_FILE} of {name_or_path!r}"
        got = "is missing" if not index else 'has no "_class_name"'
        raise ModelNotFoundError(
            f"cannot read the pipeline class of {name_or_path!r}: {where} {got}; pass a diffusers pipeline folder "
            "with its model_index.json, or call load_stable_diffusion/load_sdxl/load_sd3/load_flux"
        )
    if cls_name not in LOADERS:
        raise ValueError(f"{name_or_path!r} is a {cls_name}; lossguide loads {', '.join(LOADERS)}")
    loader = globals()[LOADERS[cls_name]]
    if dtype is not None:
        kw["dtype"] = dtype
    return loader(name_or_path, device=device, **kw)
