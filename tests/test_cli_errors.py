"""The CLI turns expected failures into one line on stderr and a non-zero exit code; -v shows the traceback."""

import pytest
import torch

import lossguide
from lossguide import run_sample
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
