"""VP latent stacks: Stable Diffusion 1.x/2.x (:class:`LatentStack`) and SDXL (:class:`SDXLStack`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lossguide.denoiser import Denoiser, freeze
from lossguide.latent.base import _cfg, _expand, _prep, _VAEStack
from lossguide.latent.losses import _autocast, _param
from lossguide.schedule import NoiseSchedule
from lossguide.validate import finite_weight


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
