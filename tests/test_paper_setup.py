"""The paper's set-up as its authors used it: data-fitted augmentation, distance losses, Polyak semantics."""

import math

import pytest
import torch

import lossguide as lg
from lossguide import losses, presets
from lossguide.augment import DiffAugment, policy
from lossguide.rng import make_generators
from lossguide.steps import Polyak, StepContext


def test_translation_pads_with_the_fill_value():
    """A shifted copy holds the data's background (fill) in the uncovered band, not zero."""
    x = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    aug = DiffAugment(policy=("translation",), translation=0.25, fill=-1.0)
    y = aug(x, make_generators([0]), 64)
    assert set(y.unique().tolist()) <= {-1.0, 1.0}  # integer shifts: no blending
    assert ((y == -1).flatten(1).sum(1) > 0).any()
    zero = DiffAugment(policy=("translation",), translation=0.25)(x, make_generators([0]), 64)
    torch.testing.assert_close((zero == 0).double(), (y == -1).double())  # same draws, other fill


def test_cutout_writes_the_fill_value_and_zoom_out_pads_with_it():
    x = torch.full((1, 1, 10, 10), 0.5, dtype=torch.float64)
    y = DiffAugment(policy=("cutout",), cutout=0.4, fill=-1.0)(x, make_generators([1]), 4)
    n_cut = (y == -1).flatten(1).sum(1)  # a 4×4 square, clipped where its random centre lies near a border
    assert (n_cut > 0).all() and (n_cut <= 16).all() and (n_cut == 16).any()
    assert set(y.unique().tolist()) == {-1.0, 0.5}
    z = DiffAugment(policy=("resize",), resize=(0.5, 0.5), fill=-1.0)(x, make_generators([1]), 1)
    assert z[0, 0, 0, 0] == -1 and z[0, 0, 5, 5] == pytest.approx(0.5)


def test_digits_policy_keeps_a_blank_digit_blank():
    """On the MNIST background (−1 everywhere) the digits policy is the identity; photo's zero fill is not."""
    x = -torch.ones(2, 1, 28, 28)
    torch.testing.assert_close(policy("digits")(x, make_generators([0, 1]), 10), -torch.ones(20, 1, 28, 28))
    assert (policy("photo")(x, make_generators([0, 1]), 10) > -0.99).any()
    with pytest.raises(ValueError, match="photo, digits"):
        policy("cifar")


def test_presets_name_no_augmentation_and_sample_asks_the_data():
    cfg = presets.shen2024(n_recur=1)
    assert cfg.augment is None and cfg.n_aug == 10
    with pytest.raises(ValueError, match="no augmentation was given.*policy"):
        lg.GuidanceEngine(cfg, lambda x: x.flatten(1).sum(1))
    aug = policy("digits")
    assert lg.GuidanceEngine(cfg, lambda x: x.sum(), augment=aug).config.augment is aug


def test_feature_distance_is_the_unsquared_norm_to_the_class_mean():
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)  # f(x) = W x, D = 3

    def f(x):
        return x.flatten(1) @ W.T

    xs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    ys = torch.tensor([0, 0, 1, 1])
    means = losses.class_feature_means(f, xs, ys)
    torch.testing.assert_close(means.double(), torch.stack([f(xs[:2]).mean(0), f(xs[2:]).mean(0)]))
    x = torch.tensor([[3.0, -1.0], [0.5, 0.5]], dtype=torch.float64, requires_grad=True)
    L = losses.FeatureDistanceLoss(f, means.double(), [1, 0])(x)
    r0 = f(x[:1]) - means[1].double()
    torch.testing.assert_close(L[0], r0.norm())
    (g,) = torch.autograd.grad(L[0], x)  # ∇‖Wx − μ‖ = Wᵀ(Wx − μ)/‖Wx − μ‖: unit-norm residual direction
    torch.testing.assert_close(g[0], (W.T @ r0[0]) / r0.norm())
    with pytest.raises(ValueError, match="not one of the 2 classes"):
        losses.FeatureDistanceLoss(f, means, 5)


@pytest.mark.parametrize("name", ["sketch", "inpaint", "sr"])
def test_l2_residual_losses_are_the_square_root_of_the_squared_ones(name):
    g = torch.Generator().manual_seed(0)
    ref, x = torch.rand(1, 1, 8, 8, generator=g), torch.rand(3, 1, 8, 8, generator=g)
    mask = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float()
    make = {
        "sketch": lambda n: losses.SketchLoss(ref, norm=n),
        "inpaint": lambda n: losses.InpaintLoss(ref, mask, norm=n),
        "sr": lambda n: losses.SuperResLoss(ref, factor=2, norm=n),
    }[name]
    torch.testing.assert_close(make("l2")(x), make("squared")(x).sqrt())
    with pytest.raises(ValueError, match="squared.*l2"):
        make("l1")


def test_polyak_exact_rule_and_inverse_scaling():
    """max_ratio=None is η‖ε‖/‖g‖² exactly; ℓ → cℓ shrinks the paper's update by 1/c, the classical one's not."""
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(2, 6, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 6, generator=g, dtype=torch.float64)
    loss = torch.tensor([0.3, 2.0], dtype=torch.float64)

    def update(rule, c):
        ctx = StepContext(0, [(0.5, 1.0)], eps, c * grad, c * loss)
        return (rule(ctx).view(-1, 1) * c * grad).norm(dim=1)

    paper = Polyak(eta=0.2)
    torch.testing.assert_close(paper(StepContext(0, [(0.5, 1.0)], eps, grad, loss)),
                               0.2 * eps.norm(dim=1) / grad.norm(dim=1) ** 2)  # fmt: skip
    torch.testing.assert_close(update(paper, 10.0), update(paper, 1.0) / 10)
    classical = Polyak(eta=0.2, gap="loss")
    torch.testing.assert_close(update(classical, 10.0), update(classical, 1.0))
    floor = Polyak(eta=0.2, gap="loss", loss_floor=0.5)(StepContext(0, [(0.5, 1.0)], eps, grad, loss))
    assert floor[0] == 0 and floor[1] == pytest.approx(0.2 * 1.5 / float(grad[1].norm()) ** 2)


@pytest.mark.parametrize("bad", [dict(eta=float("nan")), dict(eta=-1.0), dict(max_ratio=0.0), dict(gap="ell")])
def test_polyak_rejects_bad_parameters(bad):
    with pytest.raises(ValueError):
        Polyak(**bad)


def test_shen2024_takes_the_paper_settings_as_parameters():
    cfg = presets.shen2024(eta=0.5, window=(0.1, 1.0), max_ratio=2.0, polyak_gap="loss", loss_floor=0.1, n_aug=0)
    assert cfg.window == (0.1, 1.0) and cfg.augment is None and cfg.n_aug == 0
    assert (cfg.rho.eta, cfg.rho.max_ratio, cfg.rho.gap, cfg.rho.loss_floor) == (0.5, 2.0, "loss", 0.1)
    assert presets.shen2024().rho.max_ratio is None  # the paper's rule unless capped


def test_window_switches_off_the_last_steps(prior, schedule):
    """window=(0.1, 1) guides only where t/T > 0.1: the loss trace has no step at t ≤ 100."""
    task_loss = lambda x0: x0.pow(2).sum(1)  # noqa: E731
    cfg = presets.shen2024(n_aug=0, n_recur=1, window=(0.1, 1.0))
    res = lg.sample(prior.denoiser(schedule), lg.DDIM(schedule, 20), cfg, task_loss, shape=(prior.dim,),
                    seeds=range(2), dtype=torch.float64)  # fmt: skip
    ts = [t for _, t, _ in res.stats.loss_trace]
    assert ts and min(ts) > 100 and len(ts) == sum(1 for t in lg.DDIM(schedule, 20).timesteps if t > 100)
    assert math.isfinite(float(res.x0.sum()))


def test_bench_grammar_lossgap_and_data_supplied_augmentation():
    from lossguide.harness.methods import method_config

    cfg = method_config("freedom+polyak+lossgap", 0.2)
    assert isinstance(cfg.rho, Polyak) and cfg.rho.gap == "loss" and cfg.rho.eta == 0.2
    assert method_config("shen2024+lossgap", 0.1).rho.gap == "loss"
    assert method_config("shen2024", 0.03).augment is None  # the MNIST task supplies digits
    with pytest.raises(ValueError, match="lossgap"):
        method_config("freedom+lossgap", 1.0)


def test_wilson_interval_and_fid_ceiling_objective():
    from lossguide import metrics
    from lossguide.harness.tasks.mnist import MnistTask

    lo, hi = metrics.wilson_interval(95, 100)
    assert lo == pytest.approx(0.8882, abs=1e-3) and hi == pytest.approx(0.9785, abs=1e-3)
    assert metrics.wilson_interval(0, 10)[0] == 0.0 and metrics.wilson_interval(10, 10)[1] == 1.0
    task = MnistTask.__new__(MnistTask)
    task.kind = "class-feature"
    good = {"judge_validity": 0.9, "guide_loss": 1.0, "fid": 5.0, "noise_like": 0.0}
    bad = {"judge_validity": 1.0, "guide_loss": 1.0, "fid": 50.0, "noise_like": 0.1}
    assert task.objective(good, fid_ceiling=10.0) > task.objective(bad, fid_ceiling=10.0)
    assert task.objective(bad) > task.objective(good) - 1  # without a ceiling only the noise-like share counts
