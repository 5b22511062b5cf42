"""Domain losses: values and gradients on inputs whose answers are known."""

import pytest
import torch
import torch.nn.functional as F

from lossguide import losses


def _grad(loss, x):
    x = x.clone().requires_grad_(True)
    L = loss(x)
    return L.detach(), torch.autograd.grad(L.sum(), x)[0]


def test_class_loss_is_cross_entropy_with_the_softmax_gradient():
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(12.0).view(3, 4) / 10)
        lin.bias.zero_()
    x = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.5, 0.5]])
    L, g = _grad(losses.ClassLoss(lin, 2), x)
    logits = x @ lin.weight.T
    torch.testing.assert_close(L, -torch.log_softmax(logits, 1)[:, 2])
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(g, (p - F.one_hot(torch.tensor([2, 2]), 3)) @ lin.weight)
    per_sample = losses.ClassLoss(lin, [0, 1])(x.repeat_interleave(3, 0))  # 3 augmented copies each
    torch.testing.assert_close(per_sample[:3], -torch.log_softmax(logits, 1)[0, 0].expand(3))
    torch.testing.assert_close(per_sample[3:], -torch.log_softmax(logits, 1)[1, 1].expand(3))
    assert not any(p.requires_grad for p in lin.parameters())


def test_sobel_edges_of_a_step_edge():
    x = torch.zeros(1, 1, 6, 6)
    x[..., 3:] = 1.0  # vertical edge between columns 2 and 3
    e = losses.sobel_edges(x)
    # kernel /8: a unit step gives 4/8 = 0.5 on the two columns next to the edge, ~0 elsewhere
    torch.testing.assert_close(e[0, 0, :, 2:4], torch.full((6, 2), 0.5), atol=1e-3, rtol=0)
    assert e[0, 0, :, [0, 5]].max() < 1e-3


def test_sketch_loss_is_zero_at_the_reference_and_positive_elsewhere():
    ref = torch.zeros(1, 6, 6)
    ref[:, :, 3:] = 1.0
    loss = losses.SketchLoss(ref)
    flat, shifted = torch.zeros(1, 6, 6), torch.zeros(1, 6, 6)
    shifted[:, :, 4:] = 1.0
    L, g = _grad(loss, torch.stack([ref, flat, shifted]))
    assert L[0] < 1e-10 and L[1] == pytest.approx(12 * 0.25, rel=1e-3)  # 2 columns × 6 rows of 0.5²
    assert L[2] == pytest.approx(12 * 0.25, rel=1e-3)  # edge columns {2,3} vs {3,4}: 0.5² at columns 2 and 4
    assert g[0].abs().max() < 1e-3 and g[2].abs().max() > 0.1


def test_inpaint_loss_value_and_gradient():
    ref = torch.ones(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    x = torch.zeros(2, 1, 4, 4)
    L, g = _grad(losses.InpaintLoss(ref, mask), x)
    torch.testing.assert_close(L, torch.tensor([8.0, 8.0]))
    torch.testing.assert_close(g, (2 * mask * (x - ref)).expand(2, -1, -1, -1))


def test_super_resolution_loss_value_and_gradient():
    ref = torch.arange(64.0).view(1, 1, 8, 8)
    loss = losses.SuperResLoss(ref, factor=4)
    assert loss.y.shape == (1, 1, 2, 2)
    x = ref + 1.0  # every 4×4 block mean off by 1
    L, g = _grad(loss, x)
    torch.testing.assert_close(L, torch.tensor([4.0]))
    torch.testing.assert_close(g, torch.full((1, 1, 8, 8), 2.0 / 16))


def test_weighted_sum_and_reference_shape_errors():
    a = losses.InpaintLoss(torch.ones(1, 2, 2), torch.ones(1, 2, 2))
    b = losses.SuperResLoss(torch.zeros(1, 4, 4), factor=2)
    s = losses.WeightedSum([(2.0, a), (0.5, b)])
    x = torch.zeros(3, 1, 4, 4)[..., :2, :2]
    x4 = torch.zeros(3, 1, 4, 4)
    assert s.terms and a(x).shape == (3,) and b(x4).shape == (3,)
    torch.testing.assert_close(losses.WeightedSum([(2.0, a)])(x), 2 * a(x))
    with pytest.raises(ValueError, match="reference"):
        losses.SketchLoss(torch.zeros(1, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="2 references for 3 inputs"):
        losses.SketchLoss(torch.zeros(2, 1, 4, 4))(torch.zeros(3, 1, 4, 4))


def test_per_sample_references_follow_their_samples_and_augmented_copies():
    refs = torch.stack([torch.full((1, 2, 2), float(v)) for v in (0.0, 1.0)])
    loss = losses.InpaintLoss(refs, torch.ones(1, 2, 2))
    x = torch.zeros(2, 1, 2, 2)
    torch.testing.assert_close(loss(x), torch.tensor([0.0, 4.0]))
    # 3 consecutive copies per sample (the engine's augmentation layout) inherit their sample's reference
    torch.testing.assert_close(loss(x.repeat_interleave(3, 0)), torch.tensor([0.0] * 3 + [4.0] * 3))
    with pytest.raises(ValueError, match="at least one"):
        losses.WeightedSum([])
