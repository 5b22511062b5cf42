"""Rectified-flow latent stacks: Stable Diffusion 3 (:class:`SD3Stack`) and FLUX.1 (:class:`FluxStack`, packed
latents)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lossguide.denoiser import Denoiser, freeze
from lossguide.latent.base import _cfg, _expand, _prep, _VAEStack
from lossguide.latent.losses import _autocast, _param
from lossguide.samplers import FlowEuler
from lossguide.schedule import FlowSchedule
from lossguide.validate import finite_weight


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
