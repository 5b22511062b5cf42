"""The benchmark harness: tuner on a known objective, method specs, and a tiny grid that must give the same
numbers after a SIGKILL + resume and when sharded over 2 processes."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lossguide.harness.methods import method_config, parse_method, tuned_param
from lossguide.harness.report import comparable
from lossguide.harness.tuning import beam_search

TINY = ["--tasks", "class,oracle-class", "--methods", "none,freedom", "--steps", "3", "--n-eval", "4",
        "--n-tune", "2", "--beam-rounds", "1", "--batch", "2"]  # fmt: skip


def test_beam_search_finds_the_best_grid_point_of_a_known_objective():
    calls = []

    def evaluate(values):
        calls.append(list(values))
        return [-((math.log10(v) - math.log10(0.3)) ** 2) for v in values]  # peak at 0.3

    best, trace = beam_search(evaluate, init=1.0, factor=3.0, width=2, rounds=4)
    assert best == pytest.approx(1 / 3, rel=1e-5)  # the 3^k grid point nearest 0.3
    values = sorted(r["value"] for r in trace)
    # no point is evaluated twice, not even as 3·(1/3) = 0.999999 next to 1
    assert all(b / a > 1.5 for a, b in zip(values, values[1:], strict=False))
    assert calls[0] == [1.0]


def test_method_specs_parse_and_fail_clearly():
    cfg = method_config("freedom+polyak+ra", 0.05)
    assert cfg.rho.to_dict()["eta"] == 0.05 and cfg.n_aug == 10
    off = method_config("shen2024-tt", 0.01)
    assert off.n_recur == 1 and off.n_aug == 10
    assert tuned_param("shen2024-polyak")[0] == "scale"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_method("nope+ra")
    with pytest.raises(ValueError, match="unknown modifier '\\+x'"):
        parse_method("dps+x")


def _bench(out: Path, *extra, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "lossguide.cli", "bench", *TINY, "--out", str(out), *extra]
    return subprocess.Popen([sys.executable, *cmd] if not launcher else cmd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def _rows(out: Path):
    return comparable(json.loads((out / "results.json").read_text())["rows"])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "ref"
    p = _bench(out)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    return out


def test_tiny_grid_outputs(reference_run):
    rows = json.loads((reference_run / "results.json").read_text())["rows"]
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in ("class", "oracle-class")
                                                      for m in ("none", "freedom")}  # fmt: skip
    assert all(r["n"] == 4 for r in rows)
    guided = next(r for r in rows if r["task"] == "class" and r["method"] == "freedom")
    assert guided["denoiser_grads"] == 3 and guided["nfe"] == 3
    tuning = json.loads((reference_run / "tuning.json").read_text())["trace"]
    assert {t["method"] for t in tuning} == {"freedom"}  # 'none' has nothing to tune
    assert (reference_run / "tables.md").read_text().count("## ") == 2
    assert (reference_run / "pareto_class.png").exists() and (reference_run / "samples_class.png").exists()


def test_killed_run_resumes_to_identical_numbers(reference_run, tmp_path):
    out = tmp_path / "killed"
    p = _bench(out)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (out / "shards").exists() and list((out / "shards").rglob("*.json")):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_done = len(list((out / "shards").rglob("*.json")))
    assert not (out / "results.json").exists() and n_done >= 1
    p = _bench(out)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    assert _rows(out) == _rows(reference_run)
    assert not list(out.rglob("*.tmp"))  # no half-written files left behind


def test_two_processes_equal_one(reference_run, tmp_path):
    out = tmp_path / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p = _bench(out, launcher=launcher)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-3000:]
    assert _rows(out) == _rows(reference_run)


def test_a_different_config_in_the_same_folder_is_refused(reference_run, capsys):
    from lossguide.cli import main

    args = ["bench", *TINY, "--out", str(reference_run)]
    args[args.index("--n-eval") + 1] = "6"
    assert main(args) == 2
    assert "different config" in capsys.readouterr().err
