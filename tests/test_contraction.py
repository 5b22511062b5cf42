"""Prop. 3.1 on the exact Gaussian problem: the closed-form constants against autograd through the exact denoiser,
and the descent-lemma bound (a theorem) holding on every draw."""

import json

import torch

import lossguide.experiments
from lossguide.experiments import contraction as c
from lossguide.schedule import NoiseSchedule


def test_denoiser_jacobian_is_sqrt_alpha_bar_cov_over_sigma2():
    """∂x0_hat/∂x_t = √ᾱ Cov[x0 | x_t]/σ² (second-order Tweedie): its extreme eigenvalues are the constants'."""
    prior, A, _ = c.gaussian_problem()
    schedule = NoiseSchedule.linear()
    den = prior.denoiser(schedule)
    for t in (50, 400, 900):
        ab = schedule.at(t)
        x = torch.randn(1, c.DIM, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        J = torch.autograd.functional.jacobian(lambda v, t=t: den(v, t).x0_hat, x).reshape(c.DIM, c.DIM)
        k = c.constants(prior, A, ab)
        eig = torch.linalg.eigvalsh(0.5 * (J + J.T))
        assert torch.allclose(J, J.T, atol=1e-12)
        assert abs(float(eig[0]) - k["J_min"]) < 1e-10 * max(1.0, k["J_min"])
        assert abs(float(eig[0]) - ab**0.5 * k["lambda_min"] / (1 - ab)) < 1e-10 * max(1.0, k["J_min"])


def test_quick_run_descent_bound_holds_and_printed_kappa_is_off_by_alpha_bar_squared(tmp_path):
    summary = lossguide.experiments.run("contraction", tmp_path, quick=True)
    v = summary["verdicts"]
    assert v["descent_checked"] == v["claim1_steps"] == c.QUICK_STEPS
    assert v["descent_bound_holds_at"] == v["descent_checked"]
    one = json.loads((tmp_path / "results.json").read_text())["claim1"]
    for r in one:
        ratio = r["kappa1"] / r["kappa_descent"]
        assert abs(ratio * r["alpha_bar"] ** 2 * (1 - r["eta_L_t"] / 2) - 1) < 1e-9, r
        assert 0 < 1 - r["ratio_max"] and r["ratio_median"] <= r["ratio_max"] <= 1
    # at the noisiest step the printed κ₁ claims a contraction the step does not reach
    assert one[0]["kappa1"] > 100 * (1 - one[0]["ratio_max"])
    assert (tmp_path / "contraction.png").is_file() and "Reading" in (tmp_path / "report.md").read_text()
