"""The CLI turns expected failures into one line on stderr and a non-zero exit code; -v shows the traceback."""

import pytest
import torch

import lossguide
from lossguide import models, run_sample
from lossguide.cli import main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lossguide sample: "), err
    return err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"lossguide {lossguide.__version__}\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_fails_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sample", "--device", "cuda", "--out", str(out)]) == 2
    assert "--device 'cuda': cuda is not available here" in _one_error_line(capsys)
    assert not out.exists()
    assert main(["sample", "--device", "gpu0", "--out", str(out)]) == 2
    assert "'gpu0' is not a torch device" in _one_error_line(capsys)


def test_recipe_that_does_not_parse(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {kind: pixel\n  bad: [\n")
    assert main(["sample", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = _one_error_line(capsys)
    assert f"recipe {bad} is not valid YAML at line 3" in err and "fix the file" in err


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("not a folder")
    assert main(["sample", "--out", str(f)]) == 2
    assert f"--out {f} is an existing file, not a folder" in _one_error_line(capsys)
    assert f.read_text() == "not a folder"


def test_bad_seeds(tmp_path, capsys):
    assert main(["sample", "--seeds", "0.5", "--out", str(tmp_path)]) == 2
    assert "bad seed '0.5'" in _one_error_line(capsys)
    assert main(["sample", "--seeds", "0-99999999", "--out", str(tmp_path)]) == 2
    assert "more than 1,000,000" in _one_error_line(capsys)


@pytest.mark.parametrize(
    "exc, code, message",
    [
        (
            PermissionError(13, "Permission denied", "/data/run/config.yaml"),
            2,
            "Permission denied: /data/run/config.yaml",
        ),
        (
            RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB"),
            2,
            "CUDA out of memory. Tried to allocate 2 GiB",
        ),
        (KeyboardInterrupt(), 130, "interrupted; rerun the same command to resume"),
    ],
)
def test_runtime_failures_are_one_line(tmp_path, capsys, monkeypatch, exc, code, message):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(run_sample, "run", fail)
    assert main(["sample", "--out", str(tmp_path / "run"), "--quiet"]) == code
    assert message in _one_error_line(capsys)
    for verbose in (["-v", "sample"], ["sample", "-v"]):  # before or after the subcommand: the traceback
        with pytest.raises(type(exc)):
            main([*verbose, "--out", str(tmp_path / "run"), "--quiet"])


def test_a_bug_is_not_hidden(tmp_path, monkeypatch):
    """Only expected failures become one line: a KeyError from a bug keeps its traceback."""

    def bug(*args, **kwargs):
        raise KeyError("judge_label")

    monkeypatch.setattr(run_sample, "run", bug)
    with pytest.raises(KeyError):
        main(["sample", "--out", str(tmp_path / "run"), "--quiet"])


# -- issue #12: the fault list's regressions (benchmarks/faults.py) ------------------------------------------
def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lossguide {command}: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--steps", "abc"], "lossguide sample: error: argument --steps: invalid int value: 'abc'"),
        (["sample", "--method", "bogus"], "argument --method: unknown method 'bogus'"),
        (["oracle", "--n", "x"], "lossguide oracle: error: argument --n: invalid int value: 'x'"),
        (["experiment"], "the following arguments are required: name"),
    ],
)
def test_a_usage_error_is_one_line_without_the_usage_block(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err and "--help)" in err, err


def _no_models(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_denoiser", fail)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--set", "eta=0.1", "--set", "eta=0.2"], "--set eta given twice; keep one"),
        (["--ddim-eta", "nan"], "--ddim-eta must be a finite number ≥ 0"),
        (["--ddim-eta", "-1"], "--ddim-eta must be a finite number ≥ 0"),
        (["--loss", "class", "--norm", "l2"], "--norm l2 sets the residual of a reference loss, and --loss class has"),
        (["--loss", "class", "--reference", "5"], "--reference 5 picks a held-out digit that --loss class does not"),
        (["--device", "meta"], "--device 'meta': meta tensors hold no data"),
        (["--seeds", "0-999999999999999999999"], "more than 1,000,000"),  # once an OverflowError traceback
    ],
)
def test_sample_flags_that_were_ignored_or_crashed_fail_at_the_door(tmp_path, capsys, monkeypatch, flags, message):
    _no_models(monkeypatch)
    out = tmp_path / "run"
    assert main(["sample", "--steps", "2", "--quiet", "--out", str(out), *flags]) == 2
    assert message in _one_line(capsys, "sample") and not out.exists()


def _yaml(path, obj):
    import yaml

    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return str(path)


SAMPLE_CFG = {"steps": 2, "seeds": "0-1", "batch": 2}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"guidance": [1]}, "the guidance block must be a mapping"),  # was AttributeError
        ({"target": 3.0}, "--target must be an integer, got 3.0 (float)"),  # was IndexError
        ({"steps": "abc"}, "--steps must be an integer, got 'abc' (str)"),
        ({"batch": True}, "--batch must be an integer, got True (bool)"),  # was batch 1, silently
        ({"ddim_eta": float("nan")}, "--ddim-eta must be a finite number ≥ 0"),  # was NaN samples, exit 0
        ({"stpes": 3}, "unknown keys ['stpes'] in a lossguide sample config"),  # was checked as a recipe
        ({"model": None}, "--model must be a string, got None"),
    ],
)
def test_a_bad_sample_config_is_one_line(tmp_path, capsys, monkeypatch, changes, message):
    _no_models(monkeypatch)
    cfg = _yaml(tmp_path / "c.yaml", {**SAMPLE_CFG, **changes})
    assert main(["sample", "--config", cfg, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert message in _one_line(capsys, "sample") and not (tmp_path / "run").exists()


RECIPE = {"name": "tiny", "model": {"kind": "pixel", "path": "mnist-ddpm"}, "loss": {"kind": "none"},
          "method": "none", "sampler": {"steps": 2}, "seeds": "0-1", "batch": 2, "device": "cpu"}  # fmt: skip


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": {"kind": "pixel"}}, "pixel model needs a 'path'"),  # was KeyError
        ({"params": ["eta", 0.1]}, "params must be a mapping"),  # was AttributeError
        ({"sampler": 100}, "sampler must be a mapping"),  # was AttributeError
        ({"sampler": {"stesp": 10}}, "sampler has no keys ['stesp']"),  # was ignored: 100 steps
        ({"sampler": {"steps": "abc"}}, "sampler steps must be an integer ≥ 1, got 'abc'"),
        ({"sampler": {"eta": float("nan")}}, "sampler eta must be a finite number ≥ 0"),
        ({"loss": {"kind": "none", "metrc": "l2"}}, "loss kind none has no keys ['metrc']"),  # was ignored
        ({"loss": {"kind": "clip_text"}}, "loss kind clip_text needs the key(s) ['text']"),
        ({"model": {"kind": "pixel", "path": "x.pt", "flags": ["a"]}}, "model flags must be a mapping"),
        ({"model": {"kind": "pixel", "path": "mnist-ddpm", "dtype": "float64"}}, "model dtype: unknown dtype"),
        ({"seeds": [0, 0]}, "no seed twice"),  # was two copies of seed 0
        ({"seeds": [0.5]}, "bad seeds [0.5]"),  # was seed 0
        ({"batch": True}, "batch must be an integer ≥ 1, got True"),
        ({"window": 0.5}, "window must be a pair [lo, hi]"),  # was "'float' object is not iterable"
        ({"name": 123}, "name must be a string"),
    ],
)
def test_a_bad_recipe_is_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch, changes, message):
    _no_models(monkeypatch)
    r = _yaml(tmp_path / "r.yaml", {**RECIPE, **changes})
    assert main(["sample", "--config", r, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = _one_line(capsys, "sample")
    assert f"recipe {r}: " in err and message in err and not (tmp_path / "run").exists()


def test_an_empty_or_binary_config_is_named(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "bin.yaml").write_bytes(b"\x89PNG\x00\xff")
    assert main(["sample", "--config", str(tmp_path / "empty.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "empty.yaml: is empty" in _one_line(capsys, "sample")
    assert main(["sample", "--config", str(tmp_path / "bin.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "bin.yaml: is not a text (YAML) file" in _one_line(capsys, "sample")


BENCH = ["bench", "--tasks", "oracle-class", "--methods", "none,dps", "--steps", "2", "--n-eval", "4", "--n-tune",
         "2", "--beam-rounds", "0", "--batch", "4"]  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tasks", ","], "--tasks ',' names no task"),  # was a run of 0 cells, exit 0
        (["--methods", ","], "--methods ',' names no method"),
        (["--n-tune", "0"], "--n-tune must be ≥ 1, got 0"),  # was IndexError
        (["--n-eval", "0"], "--n-eval must be ≥ 1, got 0"),  # was "--steps, --n-eval, --batch and --best-of"
        (["--steps", "abc"], "--steps 'abc' must be comma-separated integers"),
        (["--steps", "0"], "--steps must be ≥ 1"),
        (["--beam-rounds", "-1"], "--beam-rounds must be ≥ 0, got -1"),  # was "max() arg is an empty sequence"
        (["--ddim-eta", "nan"], "--ddim-eta must be a finite number ≥ 0, got nan"),  # was inf distances, exit 0
    ],
)
def test_bench_flags_are_checked_at_the_door(tmp_path, capsys, flags, message):
    out = tmp_path / "b"
    assert main([*BENCH, "--out", str(out), *flags]) == 2
    assert message in _one_line(capsys, "bench") and not out.exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{oops", "is not valid JSON"),
        ("[1]", "must be a mapping task → method → step value"),  # was AttributeError
        ('{"oracle-class": {"freedom": 0.1}}', "has no step parameter for 'dps' on 'oracle-class'"),
        ('{"oracle-class": {"dps": "big"}}', "the step parameter scale of 'dps' on 'oracle-class' must be a finite"),
    ],
)
def test_a_bad_bench_settings_file_is_named(tmp_path, capsys, text, message):
    s = tmp_path / "s.json"
    s.write_text(text)
    assert main([*BENCH, "--out", str(tmp_path / "b"), "--settings", str(s)]) == 2
    err = _one_line(capsys, "bench")
    assert f"--settings {s}" in err and message in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--write-settings"], "--write-settings stores the settings --tune chooses"),  # was ignored
        (["--tune-n", "5"], "--tune-n applies with --tune only"),
        (["--tune", "--methods", "cg"], "--tune has no grid for 'cg'; it tunes dps,"),  # --methods picks grids
        (["--n", "0"], "--n must be ≥ 1, got 0"),  # was "torch.cat(): expected a non-empty list of Tensors"
        (["--steps", "0"], "--steps must be ≥ 1"),
        (["--methods", ","], "--methods ',' names no method"),
    ],
)
def test_oracle_flags_are_checked_before_the_run(capsys, flags, message):
    argv = ["oracle", *flags] if "--steps" in flags else ["oracle", "--steps", "2", *flags]
    assert main(argv) == 2
    assert message in _one_line(capsys, "oracle")


def test_oracle_json_that_cannot_be_written_fails_before_the_run(tmp_path, capsys, monkeypatch):
    import inspect

    from lossguide.harness.tasks import oracle as oracle_task

    def refuse(**k):
        pytest.fail("ran before checking --json")

    refuse.__signature__ = inspect.signature(oracle_task.evaluate)  # the parser reads the oracle flags' defaults
    monkeypatch.setattr(oracle_task, "evaluate", refuse)
    (tmp_path / "f").write_text("x")
    assert main(["oracle", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder" in _one_line(capsys, "oracle")
    assert main(["oracle", "--json", str(tmp_path / "f" / "o.json")]) == 2
    assert f"{tmp_path / 'f'} is a file, not a folder" in _one_line(capsys, "oracle")


def test_a_full_disk_names_the_file(tmp_path, capsys, monkeypatch):
    """ENOSPC from write/fsync carries no file name: the one line now names the output that failed."""
    import errno
    import os

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "o.json"
    assert main(["oracle", "--n", "2", "--steps", "1", "--methods", "none", "--json", str(out)]) == 2
    assert f"No space left on device: {out}" in _one_line(capsys, "oracle")
    assert not list(tmp_path.iterdir())  # no temporary file left behind
