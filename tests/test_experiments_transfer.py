"""The transfer experiment: its --quick run (the shipped TGDP set, no training) and the verdict rule."""

import json

import lossguide.experiments
from lossguide.experiments.transfer import _verdict, coverage, summarise


def test_transfer_quick_writes_files_and_tgdp_adds_ink(tmp_path):
    """Quick run (16 samples, DDIM-10): TGDP at scale 1 raises the ink share over the unadapted source (measured
    +0.035 to +0.055 on five 16-seed sets; bound +0.02, as tests/test_transfer.py), scale 2 raises it further."""
    lossguide.experiments.run("transfer", tmp_path, quick=True)
    for name in ("report.md", "fid_vs_n.png", "results.csv", "results.json"):
        assert (tmp_path / name).is_file(), name
    data = json.loads((tmp_path / "results.json").read_text())
    by = {r["method"]: r for r in data["summary"]}
    assert set(by) == {"source", "tgdp", "tgdp×2"}
    assert by["tgdp"]["ink"] > by["source"]["ink"] + 0.02
    assert by["tgdp×2"]["ink"] > by["tgdp"]["ink"]
    assert len(data["fid_floor"]) == 5 and all(f > 0 for f in data["fid_floor"])


def _rows(method, n, fids):
    return [{"method": method, "N": n, "seed": s, "fid": f, "kid_x1e3": 0.0, "ink": 0.2, "classes_covered": 10,
             "class_tv": 0.1, "train_s": 1.0, "sample_s_per_sample": 0.1} for s, f in enumerate(fids)]  # fmt: skip


def test_the_verdict_needs_every_seed_on_one_side():
    """Confirmed only if every seed's TGDP FID is below every seed's fine-tuning FID; overlap is undecided."""

    def verdict(tgdp, ft):
        return _verdict(summarise(_rows("tgdp", 10, tgdp) + _rows("finetune", 10, ft) + _rows("tgdp", 100, [1.0])))

    assert "**confirmed**" in verdict([5.0, 6.0, 7.0], [7.5, 8.0, 9.0])
    assert "not decided" in verdict([5.0, 6.0, 8.0], [7.5, 8.0, 9.0])
    assert "not confirmed" in verdict([9.5, 10.0, 11.0], [7.5, 8.0, 9.0])


def test_coverage_counts_classes_and_tv():
    import torch

    c = coverage(torch.tensor([0] * 50 + [1] * 50))
    assert c["classes_covered"] == 2 and abs(c["class_tv"] - 0.8) < 1e-12
    assert coverage(torch.arange(100) % 10)["class_tv"] < 1e-12


def test_the_experiment_trains_a_set_through_the_training_command(tmp_path):
    """_train_tgdp runs ``python -m lossguide.training tgdp`` (tiny iterations here): the set is exported, its record
    holds the command with every flag the experiment passed, and a second call reuses the set."""
    from lossguide.experiments.transfer import _train_tgdp

    regs = {"conditional": True, "consistency": 1.0, "iters_domain": 3, "iters_ratio": 3}
    meta = _train_tgdp(tmp_path / "t", 10, 1, regs)
    assert meta["conditional"] and meta["n_target"] == 10 and meta["seed"] == 1
    for flag in ("--conditional", "--consistency 1.0", "--iters-domain 3", "--iters-ratio 3", "--seed 1"):
        assert flag in meta["command"], (flag, meta["command"])
    stamp = (tmp_path / "t" / "set" / "ratio.safetensors").stat().st_mtime_ns
    assert _train_tgdp(tmp_path / "t", 10, 1, regs) == meta
    assert (tmp_path / "t" / "set" / "ratio.safetensors").stat().st_mtime_ns == stamp
