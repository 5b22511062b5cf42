"""The main job end to end on the shipped model: files, metrics, resume, errors."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lossguide import models, run_sample
from lossguide.cli import main
from lossguide.harness.tasks import mnist as mnist_task
from lossguide.run_sample import SampleConfig, parse_params, run
from lossguide.runfolder import parse_seeds

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
def test_sample_run_is_batch_invariant_in_float64(tmp_path):
    """--dtype float64: a seed's guide loss is the same at --batch 1 and 2 to 1e-9 relative (measured: ≤ 4.5e-16,
    1 and 2 threads). In float32 conv and linear kernels round differently for another batch shape (2.9e-6 in the
    guide's logits here, B = 1 vs 2) and guidance amplifies it: 4e-7 relative in this loss on one CPU, 8e-4 on
    another; the float32 guarantee is per --batch (padded batches: the next test, bit-identical)."""
    cfg = dict(steps=3, params={"n_aug": 2, "n_recur": 1}, seeds=[5, 6], dtype="float64")
    a = run(SampleConfig(batch=2, **cfg), tmp_path / "a", progress=False)
    b = run(SampleConfig(batch=1, **cfg), tmp_path / "b", progress=False)
    for ra, rb in zip(a["per_sample"], b["per_sample"], strict=True):
        assert ra["guide_loss"] == pytest.approx(rb["guide_loss"], rel=1e-9, abs=0)


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


def _files(out):
    """A run folder's PNG bytes, metrics.json without wall times and config.yaml."""
    m = json.loads((out / "metrics.json").read_text())
    for r in (m, *m["per_sample"]):
        r.pop("wall_s_per_sample")
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}, m, (out / "config.yaml").read_text()


def _record(out, seed):
    r = json.loads((out / "records" / f"{seed:06d}.json").read_text())
    r.pop("wall_s_per_sample")
    r.pop("config_sha256")  # the runs' seed specs differ
    return r


@shipped
def test_a_seed_alone_equals_the_seed_in_a_batch_of_8(tmp_path):
    """CPU float32 kernels depend on the batch shape and guidance amplifies it: every batch has --batch rows."""
    args = ["sample", "--steps", "3", "--batch", "8", "--quiet"]
    assert main(args + ["--seeds", "0-7", "--out", str(tmp_path / "eight")]) == 0
    assert main(args + ["--seeds", "3-3", "--out", str(tmp_path / "one")]) == 0  # padded to 8 rows
    assert (tmp_path / "one" / "000003.png").read_bytes() == (tmp_path / "eight" / "000003.png").read_bytes()
    assert _record(tmp_path / "one", 3) == _record(tmp_path / "eight", 3)  # exact floats: loss, confidence, ...


KILL_INSIDE_A_BATCH = """
import os, signal, sys
calls, replace = [], os.replace

def replace_then_die(src, dst):
    if os.path.basename(os.path.dirname(dst)) == "records":
        calls.append(dst)
        if len(calls) == 2:  # seed 0 is done, seed 1 has its PNG and half its record: SIGKILL, no cleanup
            os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)

os.replace = replace_then_die
from lossguide.cli import main
sys.exit(main(sys.argv[1:]))
"""


@shipped
def test_a_run_killed_inside_a_batch_resumes_to_the_same_files(tmp_path):
    args = ["sample", "--steps", "2", "--seeds", "0-5", "--batch", "4", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0  # batches [0 1 2 3] [4 5 +2 padding]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # this process's thread count (conftest)
    p = subprocess.run([sys.executable, "-c", KILL_INSIDE_A_BATCH, *args, "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert [f.name for f in (out / "records").glob("*.json")] == ["000000.json"]
    assert list((out / "records").glob(".000001.json.*.tmp")) and (out / ".lock").exists()  # what SIGKILL leaves
    assert main(args + ["--out", str(out)]) == 0  # resumes 1-5: batches [1 2 3 4] [5 +3 padding]
    assert not list(out.rglob("*.tmp")) and not (out / ".lock").exists()
    assert _files(out) == _files(tmp_path / "whole")


@shipped
def test_overwrite_with_fewer_seeds_leaves_no_stale_outputs(tmp_path):
    out = tmp_path / "run"
    args = ["sample", "--steps", "2", "--batch", "2", "--quiet", "--out", str(out)]
    assert main(args + ["--seeds", "0-3"]) == 0
    assert main(args + ["--seeds", "0-1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "grid.png"]
    assert sorted(p.name for p in (out / "records").iterdir()) == ["000000.json", "000001.json"]


@shipped
def test_a_second_process_on_the_same_out_is_one_line(tmp_path, capsys):
    from test_runfolder import hold_lock

    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        assert main(["sample", "--steps", "2", "--seeds", "0-0", "--batch", "1", "--out", str(out), "--quiet"]) == 2
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"in use by process {holder.pid} (lock file {out / '.lock'})" in err
    assert "(a stale lock), delete" in err


@shipped
def test_a_written_config_yaml_reruns_bit_identically(tmp_path, capsys):
    a = tmp_path / "a"
    assert main(["sample", "--steps", "2", "--seeds", "0-2", "--batch", "2", "--set", "n_aug=2", "--out", str(a),
                 "--quiet"]) == 0  # fmt: skip
    assert main(["sample", "--config", str(a / "config.yaml"), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert _files(tmp_path / "b") == _files(a)
    before = {p.name: p.stat().st_mtime_ns for p in (a / "records").iterdir()}
    assert main(["sample", "--config", str(a / "config.yaml"), "--out", str(a), "--quiet"]) == 0  # its own folder
    assert {p.name: p.stat().st_mtime_ns for p in (a / "records").iterdir()} == before  # nothing left to do
    capsys.readouterr()
    assert main(["sample", "--config", str(a / "config.yaml"), "--steps", "3", "--out", str(tmp_path / "c")]) == 2
    assert "--steps cannot be combined with --config" in capsys.readouterr().err
    edited = tmp_path / "edited.yaml"  # params say n_aug 3, the guidance block (written by a run) says 2
    edited.write_text((a / "config.yaml").read_text().replace("n_aug: 2", "n_aug: 3", 1))
    assert main(["sample", "--config", str(edited), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "guidance block differs in ['n_aug']" in capsys.readouterr().err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "abc", "-1"])
def test_a_bad_preset_value_fails_before_any_model_loads_or_file_is_written(tmp_path, capsys, monkeypatch, value):
    """--set eta=nan once ran fully unguided and exited 0; now it is a one-line error naming eta."""

    def no_models(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_denoiser", no_models)
    out = tmp_path / "run"
    assert main(["sample", "--set", f"eta={value}", "--steps", "1", "--out", str(out), "--quiet"]) != 0
    err = capsys.readouterr().err
    shown = repr(value) if value == "abc" else value
    assert err.count("\n") == 1 and f"eta must be a finite number > 0, got {shown}" in err and not out.exists()
    assert main(["sample", "--set", "n_aug=2.5", "--out", str(out)]) == 2 and not out.exists()
    assert "n_aug must be an integer ≥ 0, got 2.5" in capsys.readouterr().err


def _tiny_rgb_unet(path):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )  # fmt: skip
    unet.save_pretrained(path / "unet")
    diffusers.DDPMScheduler(clip_sample=False).save_pretrained(path / "scheduler")
    return path


def test_a_non_mnist_model_samples_unguided_and_refuses_mnist_losses(tmp_path, capsys, caplog):
    """A diffusers model of another shape: MNIST losses are refused before sampling; --method none runs, no judge."""
    model = str(_tiny_rgb_unet(tmp_path / "model"))
    out = tmp_path / "run"
    base = ["sample", "--model", model, "--steps", "2", "--seeds", "0-2", "--batch", "2", "--quiet", "--out", str(out)]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "makes samples of shape (3, 8, 8), but --loss class-feature" in err
    assert "use --method none" in err and not out.exists()
    with caplog.at_level("WARNING", logger="lossguide.run_sample"):
        assert main([*base, "--method", "none"]) == 0
    assert any("not MNIST digits: no guide or judge metrics" in r.getMessage() for r in caplog.records)
    m = json.loads((out / "metrics.json").read_text())
    assert "judge_validity" not in m and "judge_validity" in m["not_applicable"]["metrics"]
    assert m["nfe"] == 2 and [r["seed"] for r in m["per_sample"]] == [0, 1, 2]
    assert all(r["overflow_steps"] == 0 and "judge_label" not in r for r in m["per_sample"])
    assert np.array(Image.open(out / "000000.png")).shape == (8, 8, 3)
    assert "3 unguided samples" in capsys.readouterr().out


@shipped
def test_guidance_that_did_nothing_is_warned_on_the_cli(tmp_path, caplog, monkeypatch):
    """Every guided step of every sample had a zero gradient: the CLI warns; a normal run does not."""
    args = ["sample", "--steps", "2", "--seeds", "0-1", "--batch", "2", "--quiet", "--set", "n_aug=0",
            "--set", "n_recur=1"]  # fmt: skip
    with caplog.at_level("WARNING"):
        assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert not any("did nothing" in r.getMessage() for r in caplog.records)
    rec = json.loads((tmp_path / "a" / "records" / "000000.json").read_text())
    assert rec["zero_grad_steps"] == 0 and rec["overflow_steps"] == 0
    monkeypatch.setattr(mnist_task, "task_loss", lambda *a, **k: lambda x0: x0.flatten(1).sum(1) * 0)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main([*args, "--out", str(tmp_path / "b")]) == 0
    (cli,) = [r.getMessage() for r in caplog.records if r.name == "lossguide.run_sample"]
    assert "method shen2024 did nothing: every guided step of every sample had a zero gradient" in cli
    rec = json.loads((tmp_path / "b" / "records" / "000000.json").read_text())
    assert rec["zero_grad_steps"] == 2


@shipped
def test_sample_and_recipes_take_method_specs(tmp_path):
    """`lossguide sample --method freedom+polyak` and a recipe with `method: shen2024-ra` run the harness's method
    grammar: the guidance block is the spec's (a Polyak ρ rule on FreeDoM; shen2024 without augmentation)."""
    import yaml

    out = tmp_path / "spec"
    args = ["sample", "--method", "freedom+polyak", "--steps", "3", "--seeds", "0-1", "--batch", "2", "--quiet"]
    assert main(args + ["--out", str(out)]) == 0
    g = yaml.safe_load((out / "config.yaml").read_text())["guidance"]
    assert g["name"] == "freedom+polyak" and g["rho"]["rule"] == "Polyak"
    assert json.loads((out / "metrics.json").read_text())["method"] == "freedom+polyak"
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(tmp_path / "ref.png")
    recipe = {"name": "spec", "model": {"kind": "pixel", "path": "mnist-ddpm"},
              "loss": {"kind": "measurement", "operator": "super_resolution", "reference": "ref.png", "factor": 4},
              "method": "shen2024-ra", "params": {"n_recur": 1}, "sampler": {"steps": 3}, "seeds": "0-1", "batch": 2,
              "device": "cpu"}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["sample", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "rec"), "--quiet"]) == 0
    g = yaml.safe_load((tmp_path / "rec" / "config.yaml").read_text())["guidance"]
    assert g["name"] == "shen2024-ra" and g["n_aug"] == 0 and g["rho"]["rule"] == "Polyak"


# -- issue 26 items 4, 5: a damaged run folder is not trusted; errors come before config.yaml ---------------------
TINY_RUN = ["sample", "--steps", "2", "--seeds", "0-1", "--batch", "2", "--quiet"]


@shipped
def test_a_folder_without_its_config_is_not_reported_as_another_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    (out / "config.yaml").unlink()
    assert main(TINY_RUN + ["--method", "dps", "--target", "7", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds 4 seed files (000000.png, ...) but no config.yaml" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before and not (out / "config.yaml").exists()
    assert main(TINY_RUN + ["--method", "dps", "--target", "7", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["method"] == "dps"


@shipped
@pytest.mark.parametrize("damage", ["empty record", "flipped PNG byte", "record of another config"])
def test_a_damaged_seed_is_redone(damage, tmp_path, caplog):
    out = tmp_path / "run"
    assert main(TINY_RUN + ["--out", str(out)]) == 0
    whole = _files(out)
    if damage == "empty record":
        (out / "records" / "000001.json").write_text("{}")
    elif damage == "flipped PNG byte":
        png = bytearray((out / "000001.png").read_bytes())
        png[60] ^= 0x01  # inside the image data: the file still opens
        (out / "000001.png").write_bytes(bytes(png))
    else:
        rec = json.loads((out / "records" / "000001.json").read_text())
        (out / "records" / "000001.json").write_text(json.dumps({**rec, "config_sha256": "0" * 64}))
    (out / "metrics.json").unlink()
    assert main(TINY_RUN + ["--out", str(out)]) == 0
    assert "seed 1 in" in caplog.text and "redoing it" in caplog.text and "seed 0 in" not in caplog.text
    assert _files(out) == whole


@shipped
@pytest.mark.parametrize("flags,message", [
    (["--out", ""], r"--out '' names no folder"),
    (["--seeds", "18446744073709551616"], r"seed 18446744073709551616 .* above the largest seed, 2\*\*63 − 1"),
    (["--judge", "mnist-noise-aware"], r"--judge mnist-noise-aware does not map digits .* pass an image classifier"),
    (["--guide", "mnist-noise-aware"], r"--guide mnist-noise-aware does not map digits"),
    (["--method", "tds"], r"--method tds is a particle method .* add --particles K"),
    (["--particles", "0", "--ddim-eta", "1"], r"--particles must be an integer ≥ 1, got 0"),
    (["--potential", "fk"], r"--potential fk weighs particles: add --particles K"),
    (["--particles", "2"], r"DDIM η = 0 is deterministic; add --ddim-eta 1"),
    (["--method", "fk", "--particles", "2", "--ddim-eta", "1", "--potential", "tds"], r"own potential \(fk\)"),
    (["--method", "shen2024", "--particles", "2", "--ddim-eta", "1"], r"'shen2024' time-travels .* set n_recur=1"),
    (["--method", "cg", "--particles", "2", "--ddim-eta", "1"], r"'cg' reads its loss at x_t"),
    (["--method", "fk", "--particles", "2", "--ddim-eta", "1", "--set", "bogus=1"],
     r"particle method 'fk' \(proposal 'none'\): .*no parameter 'bogus'.*fk itself takes lam, proposal"),
])  # fmt: skip
def test_bad_seeds_out_and_classifiers_fail_before_the_first_write(flags, message, tmp_path, capsys, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "run")] if "--out" not in flags else []
    try:
        rc = main(TINY_RUN + flags + out)
    except SystemExit as e:  # argparse's usage error
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written, so the corrected command runs in the same folder


def test_a_config_without_seeds_is_replaced(tmp_path):
    """A run that failed before its first seed blocks nothing: its config.yaml alone is replaced."""
    from lossguide.runfolder import RunFolder

    with RunFolder(tmp_path / "run").open("method: a\n"):
        pass
    with RunFolder(tmp_path / "run").open("method: b\n") as f:
        f.write_seed(0, b"\x89PNG", {"seed": 0})
    assert (tmp_path / "run" / "config.yaml").read_text() == "method: b\n"
    with pytest.raises(ValueError, match="holds a run with a different config"):
        RunFolder(tmp_path / "run").open("method: c\n")


def test_the_sample_flags_defaults_are_the_config_s(tmp_path, monkeypatch):
    """`lossguide sample` with no flags runs exactly SampleConfig() (the CLI states no default of its own)."""
    got = {}

    def fake_run(cfg, out, **kw):
        got["cfg"] = cfg
        return {"not_applicable": True, "n_samples": 0, "nfe": 0, "wall_s_per_sample": 0.0}

    monkeypatch.setattr(run_sample, "run", fake_run)
    assert main(["sample", "--out", str(tmp_path / "run")]) == 0
    assert got["cfg"] == SampleConfig()


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2], [3, 5, 6, 7, 100], [9, 4, 5, 1]])
def test_format_seeds_is_read_back_by_parse_seeds(seeds):
    from lossguide.runfolder import format_seeds

    spec = format_seeds(seeds)
    assert parse_seeds(spec) == seeds and len(spec) <= len(",".join(map(str, seeds)))


# -- issue 25: --particles on sample ---------------------------------------------------------------------------
PARTICLES = dict(steps=3, ddim_eta=1.0, dtype="float64")


@shipped
def test_particles_on_sample_are_per_seed_and_count_k_times_the_work(tmp_path):
    """--method tds --particles 3 (float64): seed 6 alone equals seed 6 beside seed 5 (its K particles, weights and
    draw are its own), and a seed's NFE is 3 × one particle's."""
    cfg = dict(method="tds", particles=3, **PARTICLES)
    pair = run(SampleConfig(seeds=[5, 6], batch=2, **cfg), tmp_path / "pair", progress=False)["per_sample"]
    alone = run(SampleConfig(seeds=[6], batch=1, **cfg), tmp_path / "alone", progress=False)["per_sample"]
    one = run(SampleConfig(seeds=[6], batch=1, **{**cfg, "particles": 1}), tmp_path / "one", progress=False)
    assert alone[0]["guide_loss"] == pytest.approx(pair[1]["guide_loss"], rel=1e-9, abs=0)
    assert alone[0]["final_ess"] == pytest.approx(pair[1]["final_ess"], rel=1e-9, abs=0)
    assert pair[0]["guide_loss"] != pytest.approx(pair[1]["guide_loss"], rel=1e-3)  # the seeds differ
    r1 = one["per_sample"][0]
    assert alone[0]["particles"] == 3 and r1["particles"] == 1 and r1["final_ess"] == 1.0
    assert alone[0]["nfe"] == 3 * r1["nfe"] > 0 and alone[0]["denoiser_grads"] == 3 * r1["denoiser_grads"] > 0
    assert 1.0 <= alone[0]["final_ess"] <= 3.0
    import yaml

    written = yaml.safe_load((tmp_path / "alone" / "config.yaml").read_text())
    assert written["particles"] == 3 and written["guidance"]["name"] == "tds"


@shipped
def test_one_fk_particle_is_the_unguided_run(tmp_path):
    """fk's proposal is the prior, and one particle never resamples: --method fk --particles 1 is --method none
    (float64, the same seeds), and a single-particle config.yaml carries no particle keys."""
    fk = run(
        SampleConfig(method="fk", particles=1, seeds=[2, 3], batch=2, **PARTICLES), tmp_path / "fk", progress=False
    )
    none = run(SampleConfig(method="none", seeds=[2, 3], batch=2, **PARTICLES), tmp_path / "none", progress=False)
    for a, b in zip(fk["per_sample"], none["per_sample"], strict=True):
        assert a["guide_loss"] == pytest.approx(b["guide_loss"], rel=1e-9, abs=0)
    assert "particles" not in (tmp_path / "none" / "config.yaml").read_text()
