"""The two-digit conditional model: a ``UNet2DConditionModel`` on 1×28×56 canvases, cross-attending to two
digit tokens, under the denoiser contract with classifier-free guidance.

The condition (left class, right class) becomes encoder_hidden_states [B, 2, D] = e[class] + p[slot] (a learned
embedding of the 10 classes, the blank half (token 10) and a null token (11), plus one learned vector per slot, so
"3 left, 7 right" and "7 left, 3 right" differ). Training drops the whole condition to (null, null) with probability 0.1
(:mod:`lossguide.training.cond_ddpm`), so ε_∅ exists and ε̃ = ε_∅ + w·(ε_c − ε_∅) (Ho & Salimans 2022, eq. 6).

An exported model is a folder: ``unet/`` and ``scheduler/`` (diffusers), ``token_embedding.safetensors``
(``embedding`` [12, D], ``position`` [2, D]) and ``training.json``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lossguide.data.canvas import BLANK
from lossguide.denoiser import Denoiser, freeze
from lossguide.layout.attention import AttentionControl
from lossguide.layout.losses import LayoutLoss
from lossguide.schedule import NoiseSchedule
from lossguide.validate import finite_weight

NUM_CLASSES = 10
BLANK_TOKEN = BLANK  # an empty half
NULL_TOKEN = NUM_CLASSES + 1  # the dropped condition's token
SLOTS = 2  # left, right
TOKEN_FILE = "token_embedding.safetensors"


class TokenEncoder(torch.nn.Module):
    """tokens [B, 2] (classes 0–9, :data:`BLANK_TOKEN` or :data:`NULL_TOKEN`) → encoder_hidden_states [B, 2, D] =
    e[token] + p[slot]."""

    def __init__(self, dim: int = 32, num_tokens: int = NULL_TOKEN + 1, slots: int = SLOTS):
        super().__init__()
        self.embedding = torch.nn.Embedding(num_tokens, dim)
        self.position = torch.nn.Parameter(torch.zeros(slots, dim))
        torch.nn.init.normal_(self.embedding.weight, std=1.0)
        torch.nn.init.normal_(self.position, std=0.1)

    @property
    def dim(self) -> int:
        return self.embedding.embedding_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, device=self.position.device).long()
        if tokens.ndim != 2 or tokens.shape[1] != self.position.shape[0]:
            raise ValueError(f"tokens must be [B, {self.position.shape[0]}], got {tuple(tokens.shape)}")
        if tokens.min() < 0 or tokens.max() >= self.embedding.num_embeddings:
            raise ValueError(f"tokens must lie in 0..{self.embedding.num_embeddings - 1}, got {tokens.tolist()}")
        return self.embedding(tokens) + self.position

    def null(self, batch: int) -> torch.Tensor:
        """The unconditional hidden states [B, 2, D] of (null, null)."""
        return self(torch.full((batch, self.position.shape[0]), NULL_TOKEN, device=self.position.device))

    def save(self, path: Path, dtype: torch.dtype = torch.float16) -> None:
        from safetensors.torch import save_file

        tensors = {"embedding": self.embedding.weight, "position": self.position}
        save_file({k: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"null_token": str(NULL_TOKEN)})  # fmt: skip

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype = torch.float32, device="cpu") -> TokenEncoder:
        from safetensors.torch import load_file

        t = load_file(str(path))
        enc = cls(dim=t["embedding"].shape[1], num_tokens=t["embedding"].shape[0], slots=t["position"].shape[0])
        with torch.no_grad():
            enc.embedding.weight.copy_(t["embedding"])
            enc.position.copy_(t["position"])
        return enc.to(device=device, dtype=dtype)


class CondDigitModel:
    """The conditional UNet, its scheduler and token encoder (all frozen).

    Args:
        unet: ``UNet2DConditionModel`` with ``cross_attention_dim`` = the encoder's D.
        scheduler: the VP diffusers scheduler it was trained with.
        encoder: the :class:`TokenEncoder`.
    """

    def __init__(self, unet: torch.nn.Module, scheduler, encoder: TokenEncoder):
        if unet.config.cross_attention_dim != encoder.dim:
            raise ValueError(f"the UNet cross-attends to {unet.config.cross_attention_dim}-d tokens, the encoder "
                             f"makes {encoder.dim}-d ones")  # fmt: skip
        self.unet, self.scheduler, self.encoder = freeze(unet), scheduler, freeze(encoder)

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> CondDigitModel:
        """Load an exported folder (module docstring); fp16 weights are cast to ``dtype``."""
        from diffusers import DDPMScheduler, UNet2DConditionModel

        path = Path(path)
        missing = [n for n in ("unet", "scheduler", TOKEN_FILE) if not (path / n).exists()]
        if missing:
            raise FileNotFoundError(f"{path} is not an exported conditional model: no {', '.join(missing)} (train one "
                                    "with `python -m lossguide.training.cond_ddpm --export DIR`)")  # fmt: skip
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype, low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
        encoder = TokenEncoder.load(path / TOKEN_FILE, dtype=dtype, device=device)
        return cls(unet.to(device), scheduler, encoder)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return (self.unet.config.in_channels, h, w)

    def embed(self, tokens) -> torch.Tensor:
        """encoder_hidden_states [B, 2, D] of tokens [B, 2] (no gradient)."""
        with torch.no_grad():
            return self.encoder(tokens)

    def attention_control(self, tokens=None) -> AttentionControl:
        """A new :class:`AttentionControl` installed on this model's UNet (``remove()`` it when done)."""
        return AttentionControl(tokens, self.scheduler.config.num_train_timesteps).install(self.unet)

    def denoiser(
        self,
        tokens,
        guidance_scale: float = 1.0,
        control: AttentionControl | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> Denoiser:
        """x_t → (ε_hat, x0_hat) under tokens [1 or B, 2] with ε̃ = ε_∅ + w·(ε_c − ε_∅), w = ``guidance_scale``.

        The conditional and unconditional halves are separate UNet calls; with ``control`` given, the
        unconditional one runs under ``control.disabled()`` (its null tokens are neither modulated nor captured).
        """
        unet, w = self.unet, finite_weight(guidance_scale)
        p = next(iter(unet.parameters()))
        cond = self.embed(tokens).to(p.device, p.dtype)
        uncond = None if w == 1.0 else self.encoder.null(1).detach().to(p.device, p.dtype)

        def expand(e, B):
            if e.shape[0] == B:
                return e
            if e.shape[0] != 1:
                raise ValueError(f"{e.shape[0]} conditions for a batch of {B}; pass one, or one per sample")
            return e.expand(B, *e.shape[1:])

        def net(x, t):
            B = x.shape[0]
            xin = x.to(p.dtype)
            out = unet(xin, t, encoder_hidden_states=expand(cond, B)).sample
            if uncond is not None:
                with control.disabled() if control is not None else contextlib.nullcontext():
                    out_u = unet(xin, t, encoder_hidden_states=expand(uncond, B)).sample
                out = out_u + w * (out - out_u)
            return out.to(x.dtype)

        d = Denoiser(net, NoiseSchedule.from_diffusers(self.scheduler), self.scheduler.config.prediction_type)
        d.dtype, d.device = state_dtype, p.device
        return d

    def layout_loss(
        self, tokens, targets, control: AttentionControl, layers=None, modulated: bool = False
    ) -> LayoutLoss:
        """:class:`~lossguide.layout.losses.LayoutLoss` ℓ(x_t, t) of ``targets`` ``{token position: region}``
        under tokens [1 or B, 2]."""
        return LayoutLoss(self.unet, control, self.embed(tokens), targets, layers, modulated)
