"""Metrics against analytic answers, and every experiment's --quick run against structural facts."""

import json
import math

import numpy as np
import pytest
import torch

from lossguide import metrics
from lossguide.experiments import oracle_exp


def test_frechet_distance_matches_the_gaussian_formula():
    # N(0, I) vs N(m, 4I) in d = 3: FID = |m|² + Tr(I + 4I − 2·2I) = |m|² + 3
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    b = 2 * torch.randn(200_000, 3, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0, -1.0])
    assert metrics.frechet_distance(a, b) == pytest.approx(2 + 3, rel=0.02)
    assert metrics.frechet_distance(a[:1000], a[:1000]) == pytest.approx(0, abs=1e-6)


def test_kid_is_unbiased_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    kid_same, std_same = metrics.kernel_inception_distance(a, b, n_subsets=20, subset_size=200)
    kid_diff, _ = metrics.kernel_inception_distance(a, b + 0.5, n_subsets=20, subset_size=200)
    assert abs(kid_same) < 3 * std_same + 1e-3
    assert kid_diff > 10 * max(abs(kid_same), 1e-4)


def test_kid_equals_the_unbiased_mmd_by_hand():
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.0], [0.0, 0.5], [1.0, -1.0]], dtype=torch.float64)

    def k(x, y):
        return (x @ y / 2 + 1) ** 3

    m = 3
    kxx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / m**2
    kid, _ = metrics.kernel_inception_distance(a, b, n_subsets=3, subset_size=3)
    assert kid == pytest.approx(float(kxx + kyy - 2 * kxy), rel=1e-9)


def test_smoothed_step_gradient_lipschitz_is_phi1_over_sigma2():
    # ℓ = 1[x > 0] smoothed by N(0, σ²) is Φ(x/σ); |ℓ̂''| peaks at x = ±σ with φ(1)/σ² = 0.242/σ², above the
    # paper's 2C/σ for small σ and under the Stein bound 0.484/σ²
    sigma = 0.05
    eps = torch.randn(400_000, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = torch.tensor([[sigma]], dtype=torch.float64)
    lip = oracle_exp._smoothed_grad_lipschitz(lambda z: (z[:, 0] > 0).double(), x, sigma, eps, 1e-3, seed=0)
    exact = math.exp(-0.5) / math.sqrt(2 * math.pi) / sigma**2
    assert float(lip[0]) == pytest.approx(exact, rel=0.1)
    assert exact > 2 / sigma and exact < oracle_exp.STEIN_CONST / (2 * sigma**2)


@pytest.fixture(scope="module")
def kit():
    from lossguide.experiments import understanding

    return understanding.kit()


def test_noise_aware_classifier_guidance_beats_unguided(kit):
    from lossguide import presets
    from lossguide.experiments.mnist import config

    seeds = range(20)
    cg = kit.generate(config("cg"), seeds, steps=20)
    none = kit.generate(presets.none(), seeds, steps=20)
    assert kit.validity("judge", cg.x, cg.targets) >= kit.validity("judge", none.x, none.targets) + 0.3


def _run(name, tmp_path):
    from lossguide import experiments

    summary = experiments.run(name, tmp_path / name, quick=True)
    report = (tmp_path / name / "report.md").read_text()
    data = json.loads((tmp_path / name / "results.json").read_text())
    assert f"lossguide experiment {name} --quick" in report and "**Reading.**" in report
    assert (tmp_path / name / "results.csv").exists()
    return summary, data


def test_loss_curves_quick(kit, tmp_path):
    _, data = _run("loss-curves", tmp_path)
    t = data["t"]
    assert t == sorted(t, reverse=True) and len(t) == 10
    assert data["real_guide_loss_median"] < 0.1  # the guide classifies held-out digits confidently
    n = sum(g["n"] for g in data["groups"].values())
    assert n == 10


def test_gradients_quick(kit, tmp_path):
    summary, _ = _run("gradients", tmp_path)
    by = {r["guided by"]: r for r in summary["rows"]}
    # each network lowers its own loss most: the plain guide's loss is lowest after plain-guide steps
    assert by["plain"]["plain-guide loss"] < by["robust"]["plain-guide loss"]
    assert by["robust"]["robust loss"] < by["plain"]["robust loss"]


def test_adversarial_gap_quick(kit, tmp_path):
    summary, data = _run("adversarial-gap", tmp_path)
    rows = {(r["evaluated by"], r["metric"]): r for r in summary["rows"]}
    assert rows[("judge", "validity")]["real held-out"] > 0.95
    assert set(rows[("robust", "loss")]) >= {"plain", "plain + RA", "robust", "real held-out"}
    st, (lo, hi) = data["ra_sign_test"], data["gap_share_left"]
    assert st["a_wins"] + st["b_wins"] <= len(data["seeds"]) == 10 and data["seeds"][0] == 50000
    assert lo <= hi


def test_gap_ratio_interval_is_exact_when_the_ratio_is_fixed():
    """RA leaving exactly 30% of every seed's gap to a constant real loss: every bootstrap resample gives 0.3; with
    noisy real losses the interval still holds the ratio of the means."""
    from lossguide.experiments.understanding import gap_ratio_interval

    g = torch.Generator().manual_seed(0)
    plain = 2.0 + torch.rand(200, generator=g, dtype=torch.float64)
    real = torch.full((100,), 0.5, dtype=torch.float64)
    ra = 0.5 + 0.3 * (plain - 0.5)
    assert gap_ratio_interval(plain, ra, real, n_boot=200) == pytest.approx((0.3, 0.3), abs=1e-12)
    real = 0.5 + 0.1 * torch.randn(100, generator=g, dtype=torch.float64)
    lo, hi = gap_ratio_interval(plain, ra, real, n_boot=500)
    point = float((ra.mean() - real.mean()) / (plain.mean() - real.mean()))
    assert lo < point < hi and hi - lo < 0.2


def test_ablation_and_ra_cost_quick(kit, tmp_path):
    summary, _ = _run("ablation", tmp_path)
    nfe = {r["variant"]: r["nfe"] for r in summary["rows"]}
    assert nfe["full (RA + Polyak + time travel)"] > nfe["− time travel"] == nfe["FreeDoM (all off)"]
    summary, _ = _run("ra-cost", tmp_path)
    assert [r["n_aug"] for r in summary["rows"]] == [0, 1]
    assert all(r["s_per_step"] > 0 for r in summary["rows"])


def test_oracle_quick(tmp_path):
    summary, data = _run("oracle", tmp_path)
    assert summary["cg_beats_none"]
    assert summary["stein_bound_holds"]
    sharp = [r for r in data["smoothing_gaussian"] if r["classifier"].startswith("sharpened")]
    assert sharp[0]["lipschitz_max"] > 100 * sharp[-1]["lipschitz_max"]  # smoothing tames the brittle loss


def test_unknown_experiment_is_a_clear_error(capsys):
    from lossguide.cli import main

    assert main(["experiment", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err


def test_loss_curves_feature_quick(kit, tmp_path):
    """--loss feature: the loss along the trajectory and of real digits is the guide's feature distance."""
    from lossguide import experiments

    experiments.run("loss-curves", tmp_path / "f", quick=True, loss="feature")
    data = json.loads((tmp_path / "f" / "results.json").read_text())
    report = (tmp_path / "f" / "report.md").read_text()
    assert "lossguide experiment loss-curves --quick --loss feature" in report
    # the text names the scale the run used (the class-feature setting), not the cross-entropy section's (issue 23)
    from lossguide.experiments.mnist import config

    assert f"FreeDoM (scale {config('freedom', 'class-feature').rho.scale:g}, the class-feature setting" in report
    assert config("freedom", "class-feature").rho.scale != config("freedom", "class").rho.scale
    real = kit.class_loss("guide", kit.real_x, kit.real_y, "feature")
    ce = kit.class_loss("guide", kit.real_x, kit.real_y)
    assert abs(data["real_guide_loss_median"] - float(np.median(real.numpy()))) < 1e-6
    assert float(real.median()) > 10 * float(ce.median())  # a distance in feature units, not a saturated CE


def test_loss_switch_refused_where_there_is_no_class_loss(capsys):
    from lossguide.cli import main

    assert main(["experiment", "oracle", "--loss", "feature"]) == 2
    assert "has no class loss to switch" in capsys.readouterr().err


def test_collect_only_replaces_the_named_sections(tmp_path):
    """``collect --only``: one rerun report replaces its own section; the summary and other sections stay."""
    from lossguide.experiments.collect import collect

    runs, docs = tmp_path / "runs", tmp_path / "docs"
    for name, body in (("gradients", "old grad"), ("ablation", "ablation text"), ("gradients-feature", "old feat")):
        (runs / name).mkdir(parents=True)
        (runs / name / "report.md").write_text(f"# {name} title\n\n{body}\n\n## sub\n\nmore {body}\n")
    collect(runs, docs, summary="## Summary\n\nsome words")
    (runs / "gradients" / "report.md").write_text("# gradients title\n\nnew g\n")
    (runs / "gradients" / "fig.png").write_bytes(b"png")
    page = collect(runs, docs, only=["gradients"]).read_text()
    assert "new g" in page and "old grad" not in page
    assert "more old feat" in page and "ablation text" in page and "## Summary\n\nsome words" in page
    assert (docs / "results" / "gradients" / "fig.png").read_bytes() == b"png"
    with pytest.raises(ValueError, match="no section '## distill title'"):
        (runs / "distill").mkdir()
        (runs / "distill" / "report.md").write_text("# distill title\n")
        collect(runs, docs, only=["distill"])
    page = collect(runs, docs, summary="## Summary\n\nnew words", only=[]).read_text()  # the summary alone
    assert "new words" in page and "some words" not in page and "new g" in page and "more old feat" in page
    collect(runs, docs, summary="## Summary\n\n## gradients title\n\nquoted in the summary", only=[])
    (runs / "gradients" / "report.md").write_text("# gradients title\n\nnewer g\n")
    page = collect(runs, docs, only=["gradients"]).read_text()  # the report's section, not the summary's line
    assert "quoted in the summary" in page and "newer g" in page and "new g\n" not in page
