"""Prop. 3.3's experiment: the closed-form Lipschitz constant of ε̃ = ε + w∇ℓ_t against autograd, and the quick
run's errors falling with the step count for every loss setting."""

import json

import torch

import lossguide.experiments
from lossguide.experiments import contraction as c
from lossguide.experiments import solver_error as se
from lossguide.oracle import linear_measurement_loss
from lossguide.schedule import NoiseSchedule


def test_lipschitz_is_the_norm_of_the_guided_eps_jacobian():
    prior, A, y = c.gaussian_problem()
    schedule = NoiseSchedule.linear()
    den = prior.denoiser(schedule)
    loss = linear_measurement_loss(A, y, c.TAU)
    for t, w in ((100, 0.0), (100, 1.0), (700, 0.3)):

        def eps_tilde(x, t=t, w=w):
            x = x if x.requires_grad else x.requires_grad_(True)
            out = den(x, t)
            (g,) = torch.autograd.grad(loss(out.x0_hat).sum(), x, create_graph=True)
            return out.eps + w * g

        x = torch.randn(1, c.DIM, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        J = torch.autograd.functional.jacobian(eps_tilde, x).reshape(c.DIM, c.DIM)
        expect = se.lipschitz(prior, A, w, schedule.at(t))
        assert abs(float(torch.linalg.matrix_norm(J, ord=2)) - expect) < 1e-9 * expect, (t, w)


def test_quick_run_errors_fall_with_steps(tmp_path):
    summary = lossguide.experiments.run("solver-error", tmp_path, quick=True)
    assert all(v["error_falls_with_M_for_every_L"] for v in summary["verdicts"].values())
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {r["loss"] for r in rows} == {"quadratic", "oscillating"}
    assert len(rows) == (len(se.WEIGHTS) + len(se.FREQS)) * len(se.QUICK_MS)
    # the oscillating loss's Lipschitz bound grows linearly in k
    osc = {r["param"]: r["L"] for r in rows if r["loss"] == "oscillating" and r["M"] == se.QUICK_MS[0]}
    assert osc["k=100"] > 10 * osc["k=3"]
