"""The canvas task of the layout experiment: move a digit to the other half of a two-digit canvas.

Seed s asks for digit a = s mod 10: the condition is (a, blank), "a on the left, nothing on the right", and the
layout asks for the opposite, token 0 (the digit) in the right half and token 1 (the blank) in the left
(:data:`TARGETS`). Each sample is scored by the share of its ink in the right half, the judge on each half, and
the tuners' objective [right half judged a] × ink share (Patel & Serkh 2024's task on ``mnist-cond``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lossguide import metrics
from lossguide.data.canvas import BLANK, LEFT_BOX, RIGHT_BOX
from lossguide.layout.evaluate import halves, judge_halves
from lossguide.layout.losses import ink_fraction

#: the layout asked for: token position → region
TARGETS = {0: RIGHT_BOX, 1: LEFT_BOX}


def conditions(seeds: Sequence[int], swap: bool = False) -> torch.Tensor:
    """tokens [B, 2]: (a, blank) with a = seed mod 10, or (blank, a) with ``swap``."""
    rows = [[BLANK, s % 10] if swap else [s % 10, BLANK] for s in seeds]
    return torch.tensor(rows, dtype=torch.long)


def score(kit, x: torch.Tensor, seeds: Sequence[int], fid: bool = False) -> dict:
    """Ink share in the right half, judge validity of the right half and of the layout, the tuning objective
    (mean of [right half judged a] × ink share), and with ``fid`` the FID of the right halves."""
    a = torch.tensor([s % 10 for s in seeds])
    share = ink_fraction(x, RIGHT_BOX).cpu().double()
    classes, p = judge_halves(kit.nets["judge"], x)
    box_ok = classes[:, 1] == a
    layout_ok = box_ok & (classes[:, 0] == BLANK)
    n = len(x)
    row = {"n": n, "ink_share": float(share.mean()), "box_validity": float(box_ok.double().mean()),
           "box_validity_ci": "[{:.2f}, {:.2f}]".format(*metrics.wilson_interval(int(box_ok.sum()), n)),
           "layout_validity": float(layout_ok.double().mean()),
           "judge_p_a_right": float(p[:, 1].gather(-1, a[:, None]).mean()),
           "objective": float((box_ok.double() * share).mean()),
           "per_sample": (box_ok.double() * share).tolist()}  # fmt: skip
    if fid:
        row.update(kit.fid_kid(halves(x)[:, 1].to(kit.device)))
    return row
