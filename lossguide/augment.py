"""Random augmentation of x0_hat (Shen et al. 2024, Alg. 1): |T| differentiable copies per sample.

An augmentation is any callable ``aug(x [B, ...], generators, n) -> [B·n, ...]`` whose rows are
sample-major (row ``b·n + k`` is copy k of sample b) and whose random draws for sample b come only from
``generators[b]``, a fixed number of them per copy. Images use :class:`DiffAugment`; other data (motion)
brings its own callable.

Which augmentation fits is a property of the data, not of the method: a preset never picks one. The data's
adapter (``LoadedDenoiser.augment``, the MNIST task, a recipe) supplies it, and :func:`policy` names the two
image policies: ``photo`` (the paper's DiffAugment, for natural images) and ``digits`` (small shifts and zooms
on a −1 background, for MNIST).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lossguide.rng import Generators, check_generators, rand, randn

POLICIES = ("color", "translation", "resize", "cutout")
_DRAWS_PER_COPY = 8  # u[0..7]: brightness, saturation, contrast, tx, ty, resize, cutout cy, cutout cx


@dataclass(frozen=True)
class DiffAugment:
    """DiffAugment (Zhao et al. 2020) for images in [−1, 1]: color, translation, resize, cutout, in that order.

    Every parameter is drawn per copy from the sample's own generator (the reference code shares one
    resize ratio across the batch; here nothing couples samples). Translation and resize are one
    bilinear ``grid_sample`` with zero padding (integer shifts are exact); cutout multiplies by a mask,
    so the map is differentiable almost everywhere.

    Args:
        policy: subset of ``("color", "translation", "resize", "cutout")``.
        brightness: x + U(−b, b).
        saturation: (x − mean_c)·U(lo, hi) + mean_c (a no-op on one channel).
        contrast: (x − mean_chw)·U(lo, hi) + mean_chw.
        translation: integer shift of up to ``round(ratio·side)`` pixels in each direction.
        resize: zoom about the centre by U(lo, hi).
        cutout: set a square of side ``round(ratio·side)`` at a random centre to ``fill``.
        fill: the value that padding (translation, zoom-out) and cutout write: the data's background.
            0 is the reference code's zero padding, which is mid-grey for images in [−1, 1]; digits on a
            black background want −1.
    """

    policy: tuple[str, ...] = POLICIES
    brightness: float = 0.5
    saturation: tuple[float, float] = (0.0, 2.0)
    contrast: tuple[float, float] = (0.5, 1.5)
    translation: float = 0.125
    resize: tuple[float, float] = (0.8, 1.2)
    cutout: float = 0.5
    fill: float = 0.0

    def __post_init__(self):
        bad = [p for p in self.policy if p not in POLICIES]
        if bad:
            raise ValueError(f"unknown DiffAugment policy {bad}; choose from {POLICIES}")
        numbers = (self.brightness, self.translation, self.cutout, self.fill)
        if not all(isinstance(v, (int, float)) and abs(v) < float("inf") for v in numbers):
            raise ValueError(f"DiffAugment's brightness, translation, cutout and fill must be finite, got {numbers}")
        if not (0 <= self.translation < 1 and 0 <= self.cutout <= 1):
            raise ValueError(f"DiffAugment translation and cutout are fractions of the side in [0, 1), got "
                             f"{self.translation} and {self.cutout}")  # fmt: skip
        lo, hi = self.resize
        if not 0 < lo <= hi:
            raise ValueError(f"DiffAugment resize must be (lo, hi) with 0 < lo ≤ hi, got {self.resize}")

    @classmethod
    def photo(cls) -> DiffAugment:
        """The paper's DiffAugment for natural images: colour, translation 1/8, zoom 0.8–1.2, cutout 1/2,
        zero fill (Shen et al. 2024, §4.1; Zhao et al. 2020)."""
        return cls()

    @classmethod
    def digits(cls) -> DiffAugment:
        """For 28×28 digits in [−1, 1] on a black background: translation ±2 px, zoom 0.9–1.1, fill −1; no colour
        (one channel, and brightness would move the background) and no cutout (half the side erases the digit)."""
        return cls(policy=("translation", "resize"), translation=2 / 28, resize=(0.9, 1.1), fill=-1.0)

    def to_dict(self) -> dict:
        return {"name": "diffaugment", **asdict(self)}

    def __call__(self, x: torch.Tensor, generators: Generators, n: int) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(
                f"DiffAugment expects images [B, C, H, W], got shape {tuple(x.shape)}; "
                "pass an augmentation for your data type (see lossguide.augment)"
            )
        B, C, H, W = x.shape
        check_generators(generators, B)
        u = rand((n, _DRAWS_PER_COPY), generators, dtype=torch.float64).reshape(B * n, _DRAWS_PER_COPY)
        u = u.to(device=x.device, dtype=x.dtype)
        x = x.repeat_interleave(n, dim=0)
        view = (-1, 1, 1, 1)
        if "color" in self.policy:
            x = x + ((u[:, 0] * 2 - 1) * self.brightness).view(view)
            lo, hi = self.saturation
            m = x.mean(dim=1, keepdim=True)
            x = (x - m) * (lo + u[:, 1] * (hi - lo)).view(view) + m
            lo, hi = self.contrast
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - m) * (lo + u[:, 2] * (hi - lo)).view(view) + m
        has_t, has_r = "translation" in self.policy, "resize" in self.policy
        if has_t or has_r:
            theta = torch.zeros(B * n, 2, 3, dtype=x.dtype, device=x.device)
            inv_r = torch.ones(B * n, dtype=x.dtype, device=x.device)
            if has_r:
                lo, hi = self.resize
                inv_r = 1 / (lo + u[:, 5] * (hi - lo))
            theta[:, 0, 0] = inv_r
            theta[:, 1, 1] = inv_r
            if has_t:
                sx, sy = int(W * self.translation + 0.5), int(H * self.translation + 0.5)
                shift_x = torch.floor(u[:, 3] * (2 * sx + 1)).clamp(max=2 * sx) - sx
                shift_y = torch.floor(u[:, 4] * (2 * sy + 1)).clamp(max=2 * sy) - sy
                theta[:, 0, 2] = -2 * shift_x / W
                theta[:, 1, 2] = -2 * shift_y / H
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x - self.fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            x = x + self.fill
        if "cutout" in self.policy:
            ch, cw = int(H * self.cutout + 0.5), int(W * self.cutout + 0.5)
            cy = torch.floor(u[:, 6] * (H + 1 - ch % 2)).clamp(max=H - ch % 2)
            cx = torch.floor(u[:, 7] * (W + 1 - cw % 2)).clamp(max=W - cw % 2)
            rows = torch.arange(H, device=x.device, dtype=x.dtype).view(1, H)
            cols = torch.arange(W, device=x.device, dtype=x.dtype).view(1, W)
            top, left = (cy - ch // 2).view(-1, 1), (cx - cw // 2).view(-1, 1)
            in_r = (rows >= top) & (rows < top + ch)
            in_c = (cols >= left) & (cols < left + cw)
            mask = ~(in_r.unsqueeze(2) & in_c.unsqueeze(1))
            keep = mask.unsqueeze(1).to(x.dtype)
            x = x * keep + self.fill * (1 - keep)
        return x


POLICY_NAMES = ("photo", "digits")


def policy(name: str) -> DiffAugment:
    """A named image augmentation: ``photo`` (the paper's DiffAugment) or ``digits`` (see :class:`DiffAugment`)."""
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown augmentation policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    return getattr(DiffAugment, name)()


def augmentation_to_dict(aug) -> dict | None:
    """A serialisable description of an augmentation (its ``to_dict`` or its type name)."""
    if aug is None:
        return None
    if hasattr(aug, "to_dict"):
        return aug.to_dict()
    return {"name": type(aug).__name__}


@dataclass(frozen=True)
class GaussianJitter:
    """x + std·δ per copy, δ ~ N(0, I): an augmentation for any data shape (vectors, motion, latents).

    Its expectation is the Gaussian smoothing of Prop. 3.2 / 4.1 of Shen et al. (2024), averaged
    (Alg. 1) rather than log-sum-exp'ed (LGD-MC).
    """

    std: float = 0.1

    def to_dict(self) -> dict:
        return {"name": "gaussian_jitter", **asdict(self)}

    def __call__(self, x: torch.Tensor, generators: Generators, n: int) -> torch.Tensor:
        check_generators(generators, x.shape[0])
        noise = randn((n, *x.shape[1:]), generators, dtype=x.dtype, device=x.device)
        return (x.unsqueeze(1) + self.std * noise).reshape(x.shape[0] * n, *x.shape[1:])
