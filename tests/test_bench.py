"""The benchmark harness: tuner on a known objective, method specs, and a tiny grid that must give the same
numbers after a SIGKILL + resume and when sharded over 2 processes."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lossguide.harness.methods import label, method_config, parse_method, tuned_param
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


def test_grids_follow_their_rule_to_the_last_bit():
    from lossguide.harness.tuning import doublings, half_decades

    # every value equals its decimal literal (the hand-typed grids these replaced), neighbours alternate ×3, ×10/3
    assert half_decades(0.003, 1.0) == [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    assert half_decades(0.0003, 0.03) == [0.0003, 0.001, 0.003, 0.01, 0.03]
    assert half_decades(1e2, 1e5) == [100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0, 100000.0]
    assert half_decades(3.0, 3.0) == [3.0] and half_decades(2.0, 2.5) == []
    assert doublings(0.5, 16.0) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0] and doublings(1.0, 1.5) == [1.0]


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
    assert [label(s) for s in ("freedom", "freedom+polyak+ra", "shen2024-tt", "freedom+lossgap")] == [
        "freedom", "freedom + Polyak + RA", "shen2024 − time travel", "freedom + loss gap"]  # fmt: skip
    with pytest.raises(ValueError, match="unknown modifier"):
        label("dps+x")


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
    # per-seed outcomes behind the paired tests: judge validity per seed averages to the cell's validity
    for r in rows:
        if r["task"] == "class":
            assert r["per_seed"]["seeds"] == [0, 1, 2, 3]
            assert sum(r["per_seed"]["values"]) / 4 == r["judge_validity"]
        else:
            assert "per_seed" not in r  # the oracle's SW belongs to the whole set
    # the class task's two methods: one row pairs the other with the best (the oracle's SW has no per-seed test)
    sections = (reference_run / "tables.md").read_text().split("## ")
    assert sections[1].split("Paired against the best")[1].count("| McNemar |") == 1
    assert "Paired against" not in sections[2]
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


def test_evaluation_seeds_can_start_anywhere_and_give_each_seed_its_own_sample(reference_run, tmp_path):
    from lossguide.cli import main

    out = tmp_path / "moved"
    args = ["bench", *TINY, "--settings", str(reference_run / "settings.json"), "--eval-seed0", "2", "--out", str(out)]
    args[args.index("--n-eval") + 1] = "2"
    args.remove("--beam-rounds"), args.remove("1")
    assert main(args) == 0
    ref = json.loads((reference_run / "results.json").read_text())["rows"]
    got = json.loads((out / "results.json").read_text())["rows"]
    assert json.loads((out / "config.json").read_text())["eval_seed0"] == 2
    assert "eval_seed0" not in json.loads((reference_run / "config.json").read_text())  # older folders stay valid
    assert "Evaluation seeds 2–3;" in (out / "tables.md").read_text()
    for r in (r for r in got if r["task"] == "class"):
        want = next(q for q in ref if (q["task"], q["method"]) == ("class", r["method"]))["per_seed"]
        assert r["per_seed"] == {**want, "seeds": [2, 3], "values": want["values"][2:4]}


def test_a_different_config_in_the_same_folder_is_refused(reference_run, capsys):
    from lossguide.cli import main

    args = ["bench", *TINY, "--out", str(reference_run)]
    args[args.index("--n-eval") + 1] = "6"
    assert main(args) == 2
    assert "different config" in capsys.readouterr().err


# -- issue 26: a shard's key holds every setting that changes its numbers; --overwrite never mixes runs -------
ORACLE_TINY = ["bench", "--tasks", "oracle-class", "--methods", "none,freedom", "--steps", "3", "--n-eval", "4",
               "--n-tune", "2", "--beam-rounds", "1", "--batch", "2"]  # fmt: skip


def _cli_rows(out: Path, *extra) -> list[dict]:
    from lossguide.cli import main

    assert main([*ORACLE_TINY, "--out", str(out), *extra]) == 0
    return _rows(out)


@pytest.mark.parametrize("change", [["--ddim-eta", "1"], ["--best-of", "2"]])
def test_overwrite_with_another_config_gives_that_configs_numbers(change, tmp_path, capsys):
    before = _cli_rows(tmp_path / "run")
    after = _cli_rows(tmp_path / "run", *change, "--overwrite")
    fresh = _cli_rows(tmp_path / "fresh", *change)
    assert after == fresh and after != before
    nfe = {r["method"]: r["nfe"] for r in json.loads((tmp_path / "run" / "results.json").read_text())["rows"]}
    assert nfe == ({"none": 6, "freedom": 6} if change[0] == "--best-of" else {"none": 3, "freedom": 3})
    assert f'"{change[0][2:].replace("-", "_")}": {change[1]}' in (tmp_path / "run" / "config.json").read_text()
    shards = list((tmp_path / "run" / "shards").rglob("*.json"))
    assert shards and all(json.loads(p.read_text())["settings"][change[0][2:].replace("-", "_")] == float(change[1])
                          for p in shards if "/eval/" in str(p) or change[0] == "--ddim-eta")  # fmt: skip


def test_shard_keys_hold_every_setting_that_changes_numbers():
    from lossguide.harness.bench import Bench, BenchConfig

    def key(phase="eval", task="sketch", method="freedom", value=1.0, methods_extra=False, **cfg):
        methods = [method, "cg"] if methods_extra else [method]  # a run with cg, so --cg-reference applies
        return Bench(BenchConfig(tasks=["sketch", task], methods=methods, **cfg), Path("unused")).shard_key(
            phase, task, method, value)  # fmt: skip

    base = key()
    for change in (dict(ddim_eta=1.0), dict(best_of=2), dict(norm="l2"), dict(value=2.0), dict(method="dps")):
        assert key(**change) != base, change
    assert key(phase="tune", best_of=2) == key(phase="tune")  # tuning draws one candidate per seed
    assert key(task="oracle-class", norm="l2") == key(task="oracle-class")  # the oracle has no residual
    long = dict(task="class", method="cg", cg_reference="mnist-noise-aware-long")
    assert key(**long) != key(task="class", method="cg")  # cg's classifier changes its numbers
    assert key(task="class", method="dps", cg_reference="mnist-noise-aware-long", methods_extra=True) == key(
        task="class", method="dps", methods_extra=True)  # and no other method's
    assert "cg_reference" not in BenchConfig().to_dict()  # the default adds no key: earlier folders stay valid


def test_a_damaged_or_foreign_shard_is_computed_again(tmp_path):
    ref = _cli_rows(tmp_path / "run")
    shards = sorted((tmp_path / "run" / "shards" / "eval").rglob("*.json"))
    shards[0].write_text("{}")
    shards[1].write_text('{"shard": ')  # truncated
    (tmp_path / "run" / "results.json").unlink()
    assert _cli_rows(tmp_path / "run") == ref


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "sketch", "--methods", "cg"], r"no method of --methods cg applies to --tasks sketch .*0 cells"),
    (["--tasks", "oracle-linear", "--norm", "l2"], r"--norm l2 has no effect on --tasks oracle-linear: .*drop it"),
    (["--no-tune", "--settings", "s.json"], r"--no-tune and --settings both replace tuning .*pass one of them"),
    (["--particles", "2"], r"DDIM η = 0 is deterministic; add --ddim-eta 1"),
    (["--particles", "0", "--ddim-eta", "1"], r"--particles must be an integer ≥ 1 .*got 0"),
    (["--potential", "fk"], r"--potential fk weighs particles: add --particles K, or drop it"),
    (["--particles", "2", "--ddim-eta", "1", "--best-of", "2"], r"--best-of and --particles .*pass one of them"),
    (["--eval-seed0", "10010", "--n-eval", "4"], r"evaluation seeds 10010–10013 overlap the tuning seeds 10000–10031"),
    (["--eval-seed0", "-1"], r"--eval-seed0 must be ≥ 0, got -1"),
    (["--no-tune", "--tune-steps", "20"], r"--tune-steps 20 has no effect with --no-tune or --settings .*drop it"),
    (["--tasks", "sketch", "--methods", "dps", "--cg-reference", "mnist-noise-aware-long"],
     r"--cg-reference mnist-noise-aware-long changes only cg on the MNIST class tasks, .*drop it"),
    (["--particles", "2", "--ddim-eta", "1", "--methods", "none,shen2024"],
     r"--particles: shen2024 cannot be the proposal: 'shen2024' time-travels .*drop it from --methods"),
])  # fmt: skip
def test_bench_settings_without_effect_are_refused(extra, message, tmp_path, capsys, monkeypatch):
    from lossguide.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.json").write_text('{"class": {}}')
    assert main(["bench", "--steps", "3", *extra, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_diverged_cell_scores_inf_fid_and_ranks_last():
    """A tuning candidate whose samples turned NaN once crashed the whole bench in scipy's sqrtm."""
    import torch

    from lossguide import metrics
    from lossguide.harness.tasks.mnist import MnistKit, MnistTask

    f = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    bad = f.clone()
    bad[3, 2] = float("nan")
    assert metrics.frechet_distance(bad, f) == math.inf and metrics.kernel_inception_distance(bad, f)[0] == math.inf
    assert metrics.bootstrap_fid_interval(bad, f, n_boot=4) == (math.inf, math.inf)
    task = MnistTask("class", MnistKit("cpu"))
    x = torch.zeros(4, 1, 28, 28)
    x[1] = float("nan")
    recs = task.records(x, [0, 1, 2, 3])
    assert [r["judge_label"] == -1 for r in recs] == [False, True, False, False] and recs[1]["noise_like"]
    s = task.summary(recs)
    assert s["diverged"] == 0.25 and s["fid"] == math.inf and task.objective(s, 10.0) == -math.inf


# -- issue 25: --particles on bench -------------------------------------------------------------------------
PARTICLE_TINY = ["bench", "--tasks", "oracle-linear", "--steps", "3", "--n-eval", "4", "--batch", "2", "--no-tune",
                 "--ddim-eta", "1"]  # fmt: skip


def _particle_rows(out: Path, *extra) -> dict:
    from lossguide.cli import main

    assert main([*PARTICLE_TINY, "--out", str(out), *extra]) == 0
    return {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}


def test_bench_particles_one_fk_particle_is_the_plain_run_and_k_multiplies_nfe(tmp_path):
    """fk's potential over the unguided prior with K = 1 never resamples: the cell is the plain cell (same seeds,
    DDIM η = 1); K = 4 costs 4 × the NFE, draws other samples, and its shards and config name the particles."""
    plain = _particle_rows(tmp_path / "plain", "--methods", "none")["none"]
    one = _particle_rows(tmp_path / "one", "--methods", "none", "--particles", "1", "--potential", "fk")["none"]
    four = _particle_rows(tmp_path / "four", "--methods", "none", "--particles", "4", "--potential", "fk")["none"]
    assert one["sw_to_posterior"] == pytest.approx(plain["sw_to_posterior"], rel=1e-12)
    assert one["nfe"] == plain["nfe"] == 3 and four["nfe"] == 4 * one["nfe"]
    assert four["sw_to_posterior"] != pytest.approx(one["sw_to_posterior"], rel=1e-6)
    shards = list((tmp_path / "four" / "shards").rglob("*.json"))
    assert shards and all(json.loads(p.read_text())["settings"]["particles"] == 4 for p in shards)
    config = json.loads((tmp_path / "four" / "config.json").read_text())
    assert config["particles"] == 4 and config["potential"] == "fk"
    assert "particles" not in json.loads((tmp_path / "plain" / "config.json").read_text())  # old runs resume


def test_bench_particles_skip_the_default_methods_that_cannot_propose(tmp_path, capsys):
    """Without --methods, --particles runs every preset with a Gaussian proposal density and names the rest."""
    from lossguide.harness.methods import METHODS
    from lossguide.smc import proposal_refusal

    rows = _particle_rows(tmp_path / "all", "--particles", "2", "--n-eval", "2")
    refused = {m for m in METHODS if proposal_refusal(method_config(m, None), 3)}
    assert refused == {"cg", "shen2024", "naive_grad"}  # noise-aware, time-travelling, ℓ read at x_t
    assert set(rows) == set(METHODS) - refused
    assert all(r["nfe"] % 2 == 0 for r in rows.values())
    err = capsys.readouterr().err
    assert "--particles: skipping" in err and all(m in err for m in refused)


def test_a_bench_folder_in_use_is_refused_and_a_killed_writers_tmp_files_go(tmp_path, capsys):
    """The bench's folder is a runfolder.Folder: a second writer is refused while the first holds the lock, and the
    temporary files a killed writer left in its shards are removed when the next run opens the folder."""
    from lossguide.cli import main
    from lossguide.harness.bench import BenchFolder

    out = tmp_path / "run"
    with BenchFolder(out).open("{}\n"):
        assert main([*ORACLE_TINY, "--out", str(out)]) == 2
    assert "is in use by process" in capsys.readouterr().err
    out.joinpath("config.json").unlink()  # that run wrote nothing else: the folder is free
    first = _cli_rows(out)
    stale = next((out / "shards" / "eval").rglob("*.json")).with_name(".half-written.json.tmp")
    stale.write_text("{")
    assert _cli_rows(out) == first  # the same command resumes: every shard read, nothing recomputed
    assert not stale.exists() and not (out / ".lock").exists()


def test_tune_steps_sets_the_tuners_budget_apart_from_the_evaluated_one(tmp_path):
    """--tune-steps 2 with --steps 3: every tuning shard samples 2 DDIM steps (its path and its NFE say so), every
    evaluation shard 3, so a run per budget tunes at that budget."""
    from lossguide.cli import main

    out = tmp_path / "b"
    args = ["bench", "--tasks", "oracle-class", "--methods", "dps", "--steps", "3", "--tune-steps", "2", "--n-eval",
            "2", "--n-tune", "2", "--beam-rounds", "0", "--batch", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    tune = list((out / "shards" / "tune").rglob("*.json"))
    evals = list((out / "shards" / "eval").rglob("*.json"))
    assert tune and evals
    assert {p.relative_to(out).parts[5] for p in tune} == {"s2"}
    assert {json.loads(p.read_text())["nfe_per_sample"] for p in tune} == {2}
    assert {json.loads(p.read_text())["nfe_per_sample"] for p in evals} == {3}
    assert json.loads((out / "config.json").read_text())["tune_steps"] == 2
