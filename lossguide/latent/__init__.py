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

Layout: ``base`` (what every stack shares, CFG), ``vp`` (SD 1.x/2.x, SDXL), ``flow`` (SD3, FLUX.1), ``losses``
(:class:`DecodedLoss`, :class:`DecodeThenAugment`), ``loaders`` (``load_*`` from folders or hub ids,
the family tables).
"""

from lossguide.latent.flow import FluxStack, SD3Stack, flow_shift_mu, latent_image_ids, pack_latents, unpack_latents
from lossguide.latent.loaders import (
    FAMILIES,
    INDEX_FILE,
    LOADERS,
    load_flux,
    load_latent,
    load_sd3,
    load_sdxl,
    load_stable_diffusion,
)
from lossguide.latent.losses import DecodedLoss, DecodeThenAugment, expected_size
from lossguide.latent.vp import LatentStack, SDXLStack, sdxl_time_ids

__all__ = [
    "DecodeThenAugment",
    "DecodedLoss",
    "FAMILIES",
    "FluxStack",
    "INDEX_FILE",
    "LOADERS",
    "LatentStack",
    "SD3Stack",
    "SDXLStack",
    "expected_size",
    "flow_shift_mu",
    "latent_image_ids",
    "load_flux",
    "load_latent",
    "load_sd3",
    "load_sdxl",
    "load_stable_diffusion",
    "pack_latents",
    "sdxl_time_ids",
    "unpack_latents",
]
