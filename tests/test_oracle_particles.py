"""``lossguide oracle --particles K``: each preset as the proposal of lg.smc on the oracle tasks."""

import json

import pytest
import torch

from lossguide.cli import main
from lossguide.harness.tasks import oracle as oracle_task
from lossguide.harness.tasks.oracle import oracle_tasks, posterior_samples
from lossguide.samplers import DDIM
from lossguide.sampling import sample
from lossguide.schedule import NoiseSchedule


def test_one_particle_is_the_guided_sampler_at_eta_one():
    """K = 1 (no resampling possible) draws what lg.sample draws with DDIM η = 1 on the same seeds: the same SW
    (the window leaves out the noise-free last step, which smc takes unguided)."""
    schedule = NoiseSchedule.linear()
    task = oracle_tasks(schedule)[1]
    post = posterior_samples(task)
    cfg = oracle_task.method_config("freedom", {"scale": 0.03}).replace(window=(1e-3, 1.0))
    row = oracle_task.run_config(task, "freedom", cfg, schedule, range(16), 8, post, particles=1)
    x = sample(task.prior.denoiser(schedule), DDIM(schedule, 8, eta=1.0), cfg, task.loss, shape=(task.prior.dim,),
               seeds=range(16), dtype=torch.float64).x0  # fmt: skip
    from lossguide.metrics import sliced_wasserstein

    assert row["sw_to_posterior"] == sliced_wasserstein(x, post)
    assert row["particles"] == 1 and row["potential"] == "tds"


def test_the_cli_runs_k_particles_per_seed(tmp_path, capsys):
    """--particles 4: the rows say K and count 4× the NFE of one particle; refused proposals are skipped by name."""
    out = tmp_path / "o.json"
    assert main(["oracle", "--methods", "freedom,mpgd", "--n", "8", "--steps", "6", "--particles", "4",
                 "--potential", "fk", "--json", str(out)]) == 0  # fmt: skip
    one = tmp_path / "one.json"
    assert main(["oracle", "--methods", "freedom,mpgd", "--n", "8", "--steps", "6", "--particles", "1",
                 "--json", str(one)]) == 0  # fmt: skip
    rows, rows1 = json.loads(out.read_text())["rows"], json.loads(one.read_text())["rows"]
    assert {(r["method"], r["particles"], r["potential"]) for r in rows} == {("freedom", 4, "fk"), ("mpgd", 4, "fk")}
    for r, r1 in zip(rows, rows1, strict=True):
        assert r["nfe"] == 4 * r1["nfe"]
    assert json.loads(out.read_text())["meta"]["sampler"] == "DDIM eta=1"
    assert main(["oracle", "--n", "4", "--steps", "4", "--particles", "2"]) == 0
    assert "skipping shen2024, cg" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--particles", "0"], "--particles must be ≥ 1"),
    (["--particles", "2", "--tune"], "does not apply with --tune"),
    (["--potential", "fk"], "add --particles K"),
    (["--particles", "2", "--methods", "cg"], "cg cannot be the proposal"),
])  # fmt: skip
def test_bad_particle_flags_are_one_line_errors(argv, match, capsys):
    assert main(["oracle", "--n", "4", "--steps", "4", *argv]) != 0
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
