"""Layout losses on captured cross-attention maps, and the noise-aware layout loss ℓ(x_t, t) for the engine.

The box energy of token k in region m (the backward-guidance energy of Chen, Laina & Vedaldi 2024, "Training-free
layout control with cross-attention guidance", there squared) is, per sample,

    E = mean over (k, m), layers and heads of 1 − Σ_q m(q)·A_k(q) / Σ_q A_k(q),

with A_k(q) the attention probability of query q on token k and m the region's coverage at the layer's grid
(:mod:`lossguide.layout.regions`; a mask is the soft version of a box). E = 0 when all of the token's
attention lies inside its region, 1 when none does. Unsquared, so its gradient does not vanish near E = 0.

The maps depend on x_t through the UNet, not on x0_hat: :class:`LayoutLoss` is a loss of (x_t, t) and guides
with any configuration whose ``loss_input`` is ``"x_t"`` (``presets.cg(scale)``, or
``GuidanceConfig(rho=..., rho_target="x_prev", loss_input="x_t")``). The x0-space presets (DPS, FreeDoM, MPGD,
...) call ``loss(x0)`` and cannot take it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lossguide.layout.attention import AttentionControl
from lossguide.layout.regions import Region, as_region, regions


def select_layers(maps: dict[str, torch.Tensor], layers: Sequence[str] | None) -> list[str]:
    """The captured layers whose names contain one of ``layers`` (None: all)."""
    names = [n for n in maps if layers is None or any(s in n for s in layers)]
    if not names:
        raise ValueError(f"no captured layer matches {list(layers or [])}; captured: {list(maps)}")
    return names


def region_energy(
    maps: dict[str, torch.Tensor],
    targets,
    tokens: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
) -> torch.Tensor:
    """E [B] (module docstring) of captured maps ``{layer: [B, heads, h, w, n]}``.

    Args:
        maps: :attr:`AttentionControl.maps` of one UNet call.
        targets: ``{token: region}`` or ``[(token, region)]``; a region is a box (x0, y0, x1, y1), boxes [B, 4], a
            mask [B or 1, H, W] or a :class:`~lossguide.layout.regions.Region`.
        tokens: the key positions the maps hold (``AttentionControl.tokens``; None: all, in order).
        layers: name substrings of the layers to average over (None: all captured).
    """
    names = select_layers(maps, layers)
    per_target = []
    for k, region in regions(targets):
        if tokens is not None and k not in tokens:
            raise ValueError(f"token {k} was not captured (captured tokens: {list(tokens)})")
        j = k if tokens is None else list(tokens).index(k)
        per_layer = []
        for name in names:
            A = maps[name]
            if not 0 <= j < A.shape[-1]:
                raise ValueError(f"token {k} is not one of the {A.shape[-1]} captured tokens of {name}")
            A = A[..., j]  # [B, heads, h, w]
            m = region.at(tuple(A.shape[-2:]), A.shape[0], A.device).to(A.dtype)[:, None]
            inside = (A * m).sum(dim=(-2, -1))
            total = A.sum(dim=(-2, -1)).clamp_min(torch.finfo(A.dtype).tiny)
            per_layer.append((1 - inside / total).mean(dim=1))
        per_target.append(torch.stack(per_layer).mean(dim=0))
    return torch.stack(per_target).mean(dim=0)


#: pixels darker than this (x in [−1, 1], background −1) carry no ink: a sampler's background noise (std ≤ 0.1)
#: never reaches it, a digit's stroke (x ≈ 1) always does
INK_CUTOFF = -0.5


def ink_map(x: torch.Tensor) -> torch.Tensor:
    """[..., H, W] → ink per pixel: (x + 1)/2 clamped to [0, 1] where x > :data:`INK_CUTOFF`, else 0."""
    return torch.where(x > INK_CUTOFF, ((x + 1) / 2).clamp(0, 1), torch.zeros_like(x))


def ink_fraction(x: torch.Tensor, region) -> torch.Tensor:
    """[B]: the share of a sample's ink (:func:`ink_map`, x in [−1, 1] on a −1 background) that lies in
    ``region``: where the digit actually is, for evaluating layout control on samples (0 for a sample
    without ink)."""
    r = as_region(region)
    ink = ink_map(x).flatten(1, -3).sum(dim=1)  # [B, H, W]
    m = r.at(tuple(ink.shape[-2:]), ink.shape[0], ink.device).to(ink.dtype)
    return (ink * m).sum(dim=(-2, -1)) / ink.sum(dim=(-2, -1)).clamp_min(1e-12)


class LayoutLoss:
    """ℓ(x_t, t) [B]: the region energy of the UNet's cross-attention maps at (x_t, t) under a condition.

    A noise-aware loss (``loss_input="x_t"``): it runs the conditional UNet with capture on and returns E of
    :func:`region_energy`, differentiable in x_t through the UNet's attention.

    Args:
        unet: a ``UNet2DConditionModel`` (frozen) with ``control`` installed.
        control: the :class:`~lossguide.layout.attention.AttentionControl` installed on ``unet``.
        encoder_hidden_states: the condition [1 or B, L, D].
        targets: ``{token: region}`` (see :func:`region_energy`).
        layers: name substrings of the layers to use (None: all cross-attention layers).
        modulated: whether the loss sees the maps with the control's modulations applied; by default it sees the
            model's own maps (modulations are switched off for its UNet call), so that combining the loss with
            modulation does not hide from the loss what it has to move.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        control: AttentionControl,
        encoder_hidden_states: torch.Tensor,
        targets,
        layers: Sequence[str] | None = None,
        modulated: bool = False,
    ):
        if control.installed_on is not unet:
            raise ValueError("install the AttentionControl on this UNet first: control.install(unet)")
        self.unet = unet
        self.control = control
        self.encoder_hidden_states = encoder_hidden_states.detach()
        self.targets: list[tuple[int, Region]] = regions(targets)
        self.layers = None if layers is None else list(layers)
        self.modulated = bool(modulated)

    def maps(self, x_t: torch.Tensor, t) -> dict[str, torch.Tensor]:
        """The captured maps of one conditional UNet call at (x_t, t)."""
        B = x_t.shape[0]
        p = next(iter(self.unet.parameters()))
        e = self.encoder_hidden_states.to(p.device, p.dtype)
        if e.shape[0] != B:
            if e.shape[0] != 1:
                raise ValueError(f"{e.shape[0]} conditions for a batch of {B}; pass one, or one per sample")
            e = e.expand(B, *e.shape[1:])
        tt = torch.as_tensor(t, device=x_t.device)
        tt = tt.expand(B) if tt.ndim == 0 else tt
        if not tt.is_floating_point():
            tt = tt.long()
        with self.control.capturing(), self.control.unmodulated(off=not self.modulated):
            self.unet(x_t.to(p.dtype), tt, encoder_hidden_states=e)
        return self.control.maps

    def __call__(self, x_t: torch.Tensor, t) -> torch.Tensor:
        maps = self.maps(x_t, t)
        return region_energy(maps, self.targets, self.control.tokens, self.layers).to(x_t.dtype)
