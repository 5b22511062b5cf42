"""The main job end to end on the shipped model: files, metrics, resume, errors."""

import json

import numpy as np
import pytest
from PIL import Image

from lossguide import models
from lossguide.cli import main
from lossguide.run_sample import SampleConfig, parse_params, parse_seeds, run

shipped = pytest.mark.skipif(
    not (models.WEIGHTS / "mnist-ddpm" / "unet").exists() or "mnist-judge" not in models.manifest(),
    reason="shipped MNIST weights missing",
)


def test_parse_seeds_and_params():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    with pytest.raises(ValueError, match="no seed twice"):
        parse_seeds("0-3,2")
    assert parse_params(["eta=0.5", "n_aug=10", "recur_window=0.3,0.8", "polyak=false"]) == {
        "eta": 0.5,
        "n_aug": 10,
        "recur_window": (0.3, 0.8),
        "polyak": False,
    }


def test_parse_seeds_refuses_non_integers_and_huge_specs():
    assert parse_seeds(" 5 , 7-8") == [5, 7, 8]
    for spec in ("0.5", "0-2.5", "1e3", "-3", "a-b"):
        with pytest.raises(ValueError, match="seeds are integers ≥ 0"):
            parse_seeds(spec)
    assert len(parse_seeds("0-999999")) == 1_000_000
    with pytest.raises(ValueError, match=r"name 1,000,001 seeds, more than 1,000,000"):
        parse_seeds("0-499999,500000-1000000")
    with pytest.raises(ValueError, match="more than 1,000,000"):
        parse_seeds("0-999999999999999")  # counted, not built: fails at once instead of a MemoryError


@shipped
def test_tiny_sample_run_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    args = [
        "sample",
        "--steps",
        "4",
        "--seeds",
        "0-2",
        "--batch",
        "2",
        "--out",
        str(out),
        "--quiet",
        "--set",
        "n_aug=2",
        "--set",
        "n_recur=1",
    ]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    recs = m["per_sample"]
    assert [r["seed"] for r in recs] == [0, 1, 2]
    assert m["judge_validity"] == sum(r["judge_label"] == 3 for r in recs) / 3
    assert m["nfe"] == 4 and all(0 <= r["judge_confidence"] <= 1 for r in recs)
    for s in range(3):
        img = np.array(Image.open(out / f"{s:06d}.png"))
        assert img.shape == (28, 28) and img.dtype == np.uint8
    grid = np.array(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 30 + 2, 2 * 30 + 2)
    assert "method: shen2024" in (out / "config.yaml").read_text()
    # rerunning the same command skips every finished seed: records are untouched
    before = {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()} == before
    # a different config in the same folder is refused, not mixed
    assert main(args[:-4] + ["--set", "n_aug=3", "--set", "n_recur=1"]) == 2


@shipped
def test_sample_run_is_batch_invariant(tmp_path):
    cfg = dict(steps=3, params={"n_aug": 2, "n_recur": 1}, seeds=[5, 6])
    a = run(SampleConfig(batch=2, **cfg), tmp_path / "a", progress=False)
    b = run(SampleConfig(batch=1, **cfg), tmp_path / "b", progress=False)
    for ra, rb in zip(a["per_sample"], b["per_sample"], strict=True):
        assert ra["guide_loss"] == pytest.approx(rb["guide_loss"], rel=1e-4, abs=1e-5)


@shipped
def test_cg_reports_the_guide_loss(tmp_path):
    """cg steers with the noise-aware classifier but reports the guide's −log p(y|x0), like every method."""
    m = run(SampleConfig(method="cg", steps=3, seeds=[0]), tmp_path / "cg", progress=False)
    assert m["per_sample"][0]["guide_loss"] >= 0 and m["nfe"] == 3


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["sample", "--seeds", "3-1", "--out", str(tmp_path)]) == 2
    assert "bad seed range" in capsys.readouterr().err
    assert main(["sample", "--set", "bogus=1", "--out", str(tmp_path)]) == 2
    assert "has no parameter 'bogus'" in capsys.readouterr().err
