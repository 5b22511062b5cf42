"""Canvases of MNIST-5k digits for the conditional model and its layout tests.

- :class:`TwoDigitCanvas`: two digits side by side (1×28×56, background −1) with the condition
  ``tokens = (left class, right class)``, the training data of :mod:`lossguide.training.cond_ddpm`; a half may
  be empty, with the class :data:`BLANK` (so "a 3 on the left, nothing on the right" is a condition);
- :func:`place_digits` / :class:`PlacedDigitCanvas`: digits resized into given boxes on a larger canvas,
  for layout tests (is the digit where the box says?).

Every draw is a function of its seed alone: sample k uses ``torch.Generator().manual_seed(seeds[k])`` and
nothing else (no global RNG), so a canvas does not depend on the batch it is drawn in.

Boxes are ``(x0, y0, x1, y1)`` fractions of the canvas width (x) and height (y), x0 < x1, y0 < y1, as in
:mod:`lossguide.layout`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lossguide.data.mnist import load_mnist

DIGIT = 28
CANVAS_SHAPE = (1, DIGIT, 2 * DIGIT)
#: the class of an empty half
BLANK = 10
#: box of the left and right digit of a :class:`TwoDigitCanvas`
LEFT_BOX = (0.0, 0.0, 0.5, 1.0)
RIGHT_BOX = (0.5, 0.0, 1.0, 1.0)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class TwoDigitCanvas:
    """Two MNIST digits side by side: x [B, 1, 28, 56] in [−1, 1], tokens [B, 2] = (left class, right class).

    Args:
        split: the MNIST-5k split the digits come from (``gen``, the diffusion model's, by default).
        x, y: digits [N, 1, 28, 28] in [−1, 1] and their classes [N], instead of a split (tests).
        p_blank: the probability that a half of a :meth:`draw` is empty (class :data:`BLANK`), each half
            independently.
    """

    def __init__(
        self, split: str = "gen", x: torch.Tensor | None = None, y: torch.Tensor | None = None, p_blank: float = 0.0
    ):
        if not 0 <= p_blank < 1:
            raise ValueError(f"p_blank must be in [0, 1), got {p_blank}")
        self.p_blank = float(p_blank)
        if (x is None) != (y is None):
            raise ValueError("pass both x and y (digits and classes), or neither to load a split")
        if x is None:
            x, y = load_mnist(split)
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, DIGIT, DIGIT) or y.shape != (x.shape[0],):
            raise ValueError(f"digits must be [N, 1, 28, 28] with classes [N], got {tuple(x.shape)}, {tuple(y.shape)}")
        self.x, self.y = x, y.long()
        self.by_class = [torch.nonzero(self.y == c).flatten() for c in range(10)]

    def __len__(self) -> int:
        return self.x.shape[0]

    def compose(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """The canvases of digits ``left[k]`` and ``right[k]`` (indices into the split, −1: an empty half)."""
        blank = torch.full((1, 1, DIGIT, DIGIT), -1.0, dtype=self.x.dtype)
        halves = [torch.where((i < 0).view(-1, 1, 1, 1), blank, self.x[i.clamp_min(0)]) for i in (left, right)]
        return torch.cat(halves, dim=-1)

    def draw(self, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(canvases [B, 1, 28, 56], tokens [B, 2]): two uniformly drawn digits per seed, each half empty
        (token :data:`BLANK`) with probability ``p_blank``."""
        picks = []
        for s in seeds:
            g = _generator(s)
            idx = torch.randint(0, len(self), (2,), generator=g)
            if self.p_blank:  # an extra draw only when blanks are on, so p_blank = 0 keeps the old canvases
                idx = torch.where(torch.rand(2, generator=g) < self.p_blank, -1, idx)
            picks.append(idx)
        idx = torch.stack(picks)
        tokens = torch.where(idx < 0, BLANK, self.y[idx.clamp_min(0)])
        return self.compose(idx[:, 0], idx[:, 1]), tokens

    def with_classes(self, tokens: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """Canvases [B, 1, 28, 56] showing the classes ``tokens`` [B, 2] (a random digit of each class per seed,
        an empty half for :data:`BLANK`): real references for a condition."""
        tokens = torch.as_tensor(tokens).long()
        if tokens.shape != (len(seeds), 2) or tokens.min() < 0 or tokens.max() > BLANK:
            raise ValueError(f"tokens must be [{len(seeds)}, 2] classes 0–9 or {BLANK} (blank), got "
                             f"{tuple(tokens.shape)} {tokens.tolist()}")  # fmt: skip
        picks = []
        for row, s in zip(tokens.tolist(), seeds, strict=True):
            g = _generator(s)
            pick = []
            for c in row:
                i = self.by_class[c][torch.randint(0, len(self.by_class[c]), (1,), generator=g)] if c != BLANK else None
                pick.append(torch.tensor([-1]) if i is None else i)
            picks.append(torch.cat(pick))
        idx = torch.stack(picks)
        return self.compose(idx[:, 0], idx[:, 1])


def box_pixels(box: Sequence[float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) pixel bounds of a fractional box on an H×W canvas (rounded, at least 1 px)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"a box is (x0, y0, x1, y1) fractions with 0 ≤ x0 < x1 ≤ 1, 0 ≤ y0 < y1 ≤ 1; got {box}")
    H, W = size
    top, left = min(round(y0 * H), H - 1), min(round(x0 * W), W - 1)
    bottom, right = max(round(y1 * H), top + 1), max(round(x1 * W), left + 1)
    return top, left, bottom, right


def place_digits(digits: torch.Tensor, boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> torch.Tensor:
    """One canvas [1, H, W] (background −1) with ``digits[k]`` [1, 28, 28] resized (bilinear, antialiased) into
    ``boxes[k]``; where boxes overlap the brighter pixel wins."""
    if len(digits) != len(boxes):
        raise ValueError(f"{len(digits)} digits for {len(boxes)} boxes")
    canvas = torch.full((1, *size), -1.0, dtype=digits.dtype)
    for d, box in zip(digits, boxes, strict=True):
        top, left, bottom, right = box_pixels(box, size)
        patch = F.interpolate(d[None], size=(bottom - top, right - left), mode="bilinear", antialias=True)[0]
        region = canvas[:, top:bottom, left:right]
        canvas[:, top:bottom, left:right] = torch.maximum(region, patch.clamp(-1, 1))
    return canvas


class PlacedDigitCanvas:
    """One digit per canvas at a given or random box: x [B, 1, H, W], the classes [B] and the boxes [B, 4].

    Args:
        size: (H, W) of the canvas.
        split / x, y: the digits, as for :class:`TwoDigitCanvas`.
        scale: (lo, hi) range of the random box's side as a fraction of min(H, W) (square boxes).
    """

    def __init__(
        self,
        size: tuple[int, int] = (56, 56),
        split: str = "gen",
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        scale: tuple[float, float] = (0.4, 0.7),
    ):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo ≤ hi ≤ 1, got {scale}")
        self.digits = TwoDigitCanvas(split, x, y)
        self.size = tuple(size)
        self.scale = scale

    def random_box(self, g: torch.Generator) -> tuple[float, float, float, float]:
        H, W = self.size
        lo, hi = self.scale
        side = (lo + (hi - lo) * torch.rand((), generator=g).item()) * min(H, W)
        w, h = side / W, side / H
        x0 = torch.rand((), generator=g).item() * (1 - w)
        y0 = torch.rand((), generator=g).item() * (1 - h)
        return (x0, y0, x0 + w, y0 + h)

    def draw(
        self, seeds: Sequence[int], boxes: Sequence[Sequence[float]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(canvases [B, 1, H, W], classes [B], boxes [B, 4]): a random digit per seed, at ``boxes[k]`` or at
        a random square box."""
        if boxes is not None and len(boxes) != len(seeds):
            raise ValueError(f"{len(boxes)} boxes for {len(seeds)} seeds")
        xs, ys, bs = [], [], []
        for k, s in enumerate(seeds):
            g = _generator(s)
            i = int(torch.randint(0, len(self.digits), (1,), generator=g))
            box = tuple(float(v) for v in boxes[k]) if boxes is not None else self.random_box(g)
            xs.append(place_digits(self.digits.x[i : i + 1], [box], self.size))
            ys.append(self.digits.y[i])
            bs.append(box)
        return torch.stack(xs), torch.stack(ys), torch.tensor(bs, dtype=torch.float32)
