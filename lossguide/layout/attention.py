"""Capture and modulation of a diffusers UNet's cross-attention maps, through its attention processors.

:meth:`AttentionControl.install` gives every cross-attention layer of a ``UNet2DConditionModel`` a
:class:`LayoutAttnProcessor` that wraps the layer's own processor:

- with nothing to do (capture off, no modulation) it calls the wrapped processor unchanged, so the UNet's
  output is bit-for-bit the default's;
- with capture on it still takes the output from the wrapped processor and computes the attention
  probabilities P = softmax(QKᵀ/√d) beside it, with the layer's own ``to_q``, ``to_k`` and
  ``get_attention_scores`` as diffusers' ``AttnProcessor`` does, and stores P of the chosen tokens
  (``control.maps[layer]``: [B, heads, h, w, tokens], in the autograd graph);
- with a modulation it computes the attention itself as ``AttnProcessor`` does, with the logits of a
  token raised by s_t inside its region and lowered by s_t outside (s_t = strength·(t/T)^power, so the
  push fades as t → 0; a simplified, additive form of the attention modulation of DenseDiffusion, Kim et al. 2023).
  softmax(QKᵀ/√d + b) is computed as P·eᵇ renormalised, from the layer's own P.

A forward pre-hook on the UNet records each call's sample size and timesteps (the per-sample t of the
decay, the grid of each layer's queries) and clears the maps of the previous call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lossguide.layout.regions import Region, as_region


@dataclass
class Modulation:
    """Raise token ``token``'s logits by s_t inside ``region`` and lower them by s_t outside,
    s_t = strength·(t/T)^power (soft regions interpolate: b = s_t·(2m − 1))."""

    token: int
    region: Region
    strength: float
    power: float = 1.0


def layer_grid(n_queries: int, size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with ``n_queries`` queries in a UNet on H×W inputs: H×W halved (rounding up, as a
    stride-2 convolution with padding 1 does) until the count matches."""
    h, w = size
    while h * w > n_queries:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != n_queries:
        raise ValueError(f"cannot place {n_queries} queries on a grid of an {size[0]}×{size[1]} input")
    return h, w


class AttentionControl:
    """What the :class:`LayoutAttnProcessor` of one UNet capture and modulate.

    Args:
        tokens: key positions (indices into ``encoder_hidden_states``' sequence) whose maps are captured;
            None captures all.
        num_train_timesteps: T of the modulation's decay (t/T).

    Use: ``control = AttentionControl().install(unet)``; ``with control.capturing(): unet(...)`` fills
    ``control.maps``; :meth:`modulate` adds a modulation; ``with control.disabled():`` runs a call (e.g. the
    unconditional half of classifier-free guidance) as if nothing were installed; :meth:`remove` restores the
    UNet's processors.
    """

    def __init__(self, tokens: Sequence[int] | None = None, num_train_timesteps: int = 1000):
        self.tokens = None if tokens is None else [int(k) for k in tokens]
        self.num_train_timesteps = int(num_train_timesteps)
        self.capture = False
        self.enabled = True
        self.modulations: list[Modulation] = []
        self.maps: dict[str, torch.Tensor] = {}
        self.sample_size: tuple[int, int] | None = None
        self.timesteps: torch.Tensor | None = None
        self._unet = None
        self._saved = None
        self._hook = None

    # -- installation -------------------------------------------------------------------------------
    def install(self, unet: torch.nn.Module) -> AttentionControl:
        """Wrap the processor of every cross-attention layer of ``unet``; returns self."""
        if self._unet is not None:
            raise RuntimeError("this AttentionControl is installed on a UNet already; remove() it first")
        saved = dict(unet.attn_processors)
        if any(isinstance(p, LayoutAttnProcessor) for p in saved.values()):
            raise RuntimeError("this UNet already carries another AttentionControl's processors; remove() that one "
                               "first (one control per UNet)")  # fmt: skip
        cross = {f"{name}.processor" for name, m in unet.named_modules() if getattr(m, "is_cross_attention", False)}
        if not cross:
            raise ValueError(f"{type(unet).__name__} has no cross-attention layers to capture")
        for name, m in unet.named_modules():
            if f"{name}.processor" in cross and getattr(m, "norm_q", None) is not None:
                raise ValueError(f"{name} normalises q/k (qk_norm), which LayoutAttnProcessor does not implement")
        procs = {
            name: LayoutAttnProcessor(self, name.removesuffix(".processor"), p) if name in cross else p
            for name, p in saved.items()
        }
        unet.set_attn_processor(procs)
        self._hook = unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._unet, self._saved = unet, saved
        return self

    def remove(self) -> None:
        """Restore the UNet's own processors and drop the hook."""
        if self._unet is None:
            return
        self._unet.set_attn_processor(self._saved)
        self._hook.remove()
        self._unet = self._saved = self._hook = None

    @property
    def installed_on(self) -> torch.nn.Module | None:
        """The UNet this control is installed on (None before :meth:`install` and after :meth:`remove`)."""
        return self._unet

    @property
    def layers(self) -> list[str]:
        """Names of the wrapped cross-attention layers (installed UNet only)."""
        if self._unet is None:
            return []
        return [n.removesuffix(".processor") for n, p in self._unet.attn_processors.items()
                if isinstance(p, LayoutAttnProcessor)]  # fmt: skip

    def _pre_forward(self, module, args, kwargs):
        if not self.enabled:  # a call under disabled() keeps the maps and timesteps of the last enabled one
            return
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        t = torch.as_tensor(t, device=sample.device)
        self.sample_size = tuple(sample.shape[-2:])
        self.timesteps = t.flatten().expand(sample.shape[0]) if t.numel() == 1 else t.flatten()
        self.maps = {}

    # -- switches -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def capturing(self):
        """Capture the maps of the UNet calls inside the block."""
        old, self.capture = self.capture, True
        try:
            yield self
        finally:
            self.capture = old

    @contextlib.contextmanager
    def disabled(self):
        """Neither capture nor modulate inside the block (the wrapped processors run as they are)."""
        old, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = old

    @contextlib.contextmanager
    def unmodulated(self, off: bool = True):
        """Inside the block, no modulation applies (capture stays as it is); ``off=False`` changes nothing."""
        old = self.modulations
        if off:
            self.modulations = []
        try:
            yield self
        finally:
            self.modulations = old

    def modulate(self, token: int, region, strength: float = 2.0, power: float = 1.0) -> AttentionControl:
        """Add a :class:`Modulation` of ``token`` to ``region`` (a box (x0, y0, x1, y1), boxes [B, 4] or a mask
        [B or 1, H, W]); returns self."""
        if strength < 0 or not math.isfinite(strength):
            raise ValueError(f"strength must be finite and ≥ 0, got {strength}")
        self.modulations.append(Modulation(int(token), as_region(region), float(strength), float(power)))
        return self

    def clear_modulations(self) -> None:
        self.modulations = []

    # -- used by the processors ---------------------------------------------------------------------
    def strength_at(self, mod: Modulation, batch: int, device) -> torch.Tensor:
        """s_t [B] of a modulation at the current call's timesteps."""
        if self.timesteps is None:
            raise RuntimeError("no timesteps recorded: call the UNet the control is installed on")
        frac = (self.timesteps.to(device=device, dtype=torch.float32) / self.num_train_timesteps).clamp(0, 1)
        s = mod.strength * frac.pow(mod.power)
        return s.expand(batch) if s.numel() == 1 else s

    def grid(self, n_queries: int) -> tuple[int, int]:
        if self.sample_size is None:
            raise RuntimeError("no sample size recorded: call the UNet the control is installed on")
        return layer_grid(n_queries, self.sample_size)


class LayoutAttnProcessor:
    """The processor of one cross-attention layer under an :class:`AttentionControl` (module docstring)."""

    def __init__(self, control: AttentionControl, name: str, base):
        self.control = control
        self.name = name
        self.base = base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        c = self.control
        modulate = c.enabled and bool(c.modulations)
        capture = c.enabled and c.capture
        if encoder_hidden_states is None or not (modulate or capture):
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)
        if not modulate:  # the output exactly as the wrapped processor computes it; P beside it
            out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)
            probs, _, grid = self._probs(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            self._store(attn, probs, grid)
            return out
        return self._modulated(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    # the steps of diffusers' AttnProcessor, through the layer's own modules and methods
    def _inputs(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4 = None
        if hidden_states.ndim == 4:
            shape4 = hidden_states.shape
            B, C, H, W = shape4
            hidden_states = hidden_states.view(B, C, H * W).transpose(1, 2)
        batch, seq_len, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        return hidden_states, encoder_hidden_states, attention_mask, shape4

    def _probs(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        hs, ehs, mask, shape4 = self._inputs(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        query = attn.head_to_batch_dim(attn.to_q(hs))
        key = attn.head_to_batch_dim(attn.to_k(ehs))
        probs = attn.get_attention_scores(query, key, mask)  # [B·heads, Q, K]
        grid = tuple(shape4[-2:]) if shape4 is not None else self.control.grid(probs.shape[1])
        return probs, (hs, ehs, shape4), grid

    def _store(self, attn, probs: torch.Tensor, grid: tuple[int, int]) -> None:
        heads = attn.heads
        B = probs.shape[0] // heads
        p = probs.view(B, heads, probs.shape[1], probs.shape[2])
        if self.control.tokens is not None:
            p = p[..., self.control.tokens]
        self.control.maps[self.name] = p.reshape(B, heads, *grid, p.shape[-1])

    def _modulated(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        c = self.control
        residual = hidden_states
        probs, (hs, ehs, shape4), grid = self._probs(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        heads = attn.heads
        B = probs.shape[0] // heads
        K = probs.shape[-1]
        bias = torch.zeros(B, probs.shape[1], K, device=probs.device, dtype=torch.float32)
        for mod in c.modulations:
            if not 0 <= mod.token < K:
                raise ValueError(f"modulated token {mod.token} is not one of the {K} keys of {self.name}")
            m = mod.region.at(grid, B, probs.device).flatten(1)  # [B or 1, Q] in [0, 1]
            s = c.strength_at(mod, B, probs.device)[:, None]
            bias[:, :, mod.token] += s * (2 * m - 1)
        bias = bias.repeat_interleave(heads, dim=0)
        w = probs.float() * bias.exp()  # softmax(logits + b) = P·eᵇ / Σ_k P·eᵇ
        probs = (w / w.sum(dim=-1, keepdim=True)).to(probs.dtype)
        if c.capture:
            self._store(attn, probs, grid)
        value = attn.head_to_batch_dim(attn.to_v(ehs))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if shape4 is not None:
            out = out.transpose(-1, -2).reshape(shape4)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
