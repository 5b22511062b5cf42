"""Issue 26, items 2 and 3: experiments never write into each other's folders, and a method parameter that has
no effect in the resolved configuration (or a window without a guided step) is refused, naming the fix."""

import logging
import re

import pytest
import torch
import yaml

import lossguide as lg
from lossguide import experiments, guidance, models, presets
from lossguide.cli import main
from lossguide.denoiser import Denoiser
from lossguide.guidance import GuidanceConfig
from lossguide.harness import settings
from lossguide.harness.methods import method_config, parse_method
from lossguide.schedule import NoiseSchedule
from lossguide.steps import Constant

shipped = pytest.mark.skipif(not (models.WEIGHTS / "mnist-ddpm" / "unet").exists(), reason="shipped weights missing")


# -- item 2: experiments and their folders ---------------------------------------------------------------------
def _fake_experiments(monkeypatch):
    """Stand-ins for the registered experiments that write the files they share (report.md, results.csv, ...)."""

    def fake(name):
        def run(out, quick=False, **kw):
            (out / "report.md").write_text(f"# {name}\n")
            (out / "results.csv").write_text(f"{name}\n")
            if name == "layout":
                (out / "tuning.csv").write_text("layout\n")
            return {"headline": name}

        return run

    real_get = experiments.get
    monkeypatch.setattr(experiments, "get", lambda name: (real_get(name), fake(name))[1])


def test_cli_appends_the_experiment_name_to_out(monkeypatch, tmp_path, capsys):
    _fake_experiments(monkeypatch)
    assert main(["experiment", "layout", "--out", str(tmp_path / "X")]) == 0
    assert main(["experiment", "distill", "--out", str(tmp_path / "X")]) == 0
    assert (tmp_path / "X" / "layout" / "report.md").read_text() == "# layout\n"
    assert (tmp_path / "X" / "layout" / "tuning.csv").exists()
    assert (tmp_path / "X" / "distill" / "report.md").read_text() == "# distill\n"
    assert not (tmp_path / "X" / "distill" / "tuning.csv").exists()
    assert not (tmp_path / "X" / "report.md").exists()
    assert str(tmp_path / "X" / "distill") in capsys.readouterr().out


def test_api_refuses_a_folder_of_another_experiment(monkeypatch, tmp_path):
    _fake_experiments(monkeypatch)
    experiments.run("layout", tmp_path / "X", quick=True)
    experiments.run("layout", tmp_path / "X", quick=True)  # the same experiment again: fine
    with pytest.raises(ValueError, match=r"holds the files of experiment 'layout'.*pass another folder"):
        experiments.run("distill", tmp_path / "X", quick=True)
    assert (tmp_path / "X" / "report.md").read_text() == "# layout\n"
    experiments.run("loss-curves", tmp_path / "Y", quick=True)
    with pytest.raises(ValueError, match=r"experiment 'loss-curves'.*loss-curves-feature"):
        experiments.run("loss-curves", tmp_path / "Y", quick=True, loss="feature")


# -- item 3: parameters without effect -------------------------------------------------------------------------
#: (spec, --set items, what the message must say: the parameter, what blocks it, the fix)
IGNORED = [
    ("shen2024", ["scale=2"], r"scale=2 has no effect with polyak=True; it takes effect with polyak=False"),
    ("shen2024", ["polyak=false", "eta=0.1"], r"eta=0.1 has no effect with polyak=False; .* with polyak=True"),
    ("shen2024", ["loss_floor=0.5"], r"loss_floor=0.5 has no effect with polyak_gap='eps'; .* polyak_gap='loss'"),
    ("shen2024", ["n_recur=1", "recur_window=0.2,0.9"], r"recur_window=\(0.2, 0.9\) has no effect with n_recur=1; "
     r"it takes effect with n_recur=3"),
    ("ugd", ["n_iter=0", "backward_scale=0.5"], r"backward_scale=0.5 has no effect with n_iter=0; .* n_iter=1"),
    ("freedom+polyak", ["scale=3"], r"scale=3 has no effect with the \+polyak modifier; .*without \+polyak"),
    ("shen2024-polyak", ["eta=0.1"], r"eta=0.1 has no effect with the -polyak modifier"),
    ("tfg", ["rho=0", "rho_schedule=decrease"], r"rho_schedule='decrease' has no effect with rho=0; .* rho=0.05"),
]  # fmt: skip


@pytest.mark.parametrize("spec,items,match", IGNORED)
def test_sample_refuses_an_ignored_set(spec, items, match, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sample", "--method", spec, "--out", str(out), "--quiet"] + [a for i in items for a in ("--set", i)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lossguide sample: error: ") and err.count("\n") == 1
    assert f"method {spec!r}: " in err
    assert re.search(match, err), err
    assert not out.exists()


@pytest.mark.parametrize("spec,items,match", IGNORED)
def test_method_specs_refuse_an_ignored_parameter(spec, items, match):
    from lossguide.run_sample import parse_params

    with pytest.raises(ValueError, match=match):
        method_config(spec, **parse_params(items))  # what bench, the experiments and recipes build


def test_python_api_refuses_an_ignored_parameter():
    with pytest.raises(ValueError, match=r"method 'shen2024': scale=2.0 has no effect with polyak=True"):
        lg.preset("shen2024", scale=2.0)
    with pytest.raises(ValueError, match=r"loss_floor=0.1 has no effect with polyak=False and polyak_gap='eps'; "
                                         r"it takes effect with polyak=True and polyak_gap='loss'"):  # fmt: skip
        lg.preset("shen2024", polyak=False, loss_floor=0.1)
    with pytest.raises(ValueError, match=r"method 'freedom': recur_window=\(0.1, 0.9\) has no effect with n_recur=1"):
        lg.preset("freedom", recur_window=(0.1, 0.9))
    with pytest.raises(ValueError, match=r"method 'ugd': backward_scale=0.3 has no effect with n_iter=0"):
        lg.preset("ugd", n_iter=0, backward_scale=0.3)


def test_harmless_settings_only_warn(caplog):
    with caplog.at_level(logging.WARNING):
        lg.preset("shen2024", scale=1.0)  # its default
        lg.preset("ugd", n_iter=0, backward_scale=0.0)  # both switch the backward step off
        lg.preset("shen2024", eta=0.05, polyak_gap="loss", loss_floor=0.2)  # every one read
    text = caplog.text
    assert "scale=1.0 has no effect with polyak=True" in text
    assert "backward_scale=0.0 has no effect beyond what n_iter=0 already does" in text
    assert "loss_floor" not in text and "eta" not in text


def test_the_check_covers_a_new_preset(monkeypatch):
    """One general check on the resolved config, not a list of cases: a new preset's unused parameter is caught."""

    def toy(scale: float = 1.0, n_recur: int = 1, recur_window: tuple[float, float] = (0.3, 0.8), unused: float = 0.5):
        return GuidanceConfig(name="toy", rho=Constant(scale), n_recur=n_recur, recur_window=recur_window)

    monkeypatch.setitem(presets.PRESETS, "toy", toy)
    with pytest.raises(ValueError, match=r"method 'toy': unused=2.0 has no effect on the resolved guidance; drop it"):
        presets.get("toy", unused=2.0)
    with pytest.raises(ValueError, match=r"recur_window=\(0.1, 0.2\) has no effect with n_recur=1; .* n_recur=2"):
        presets.get("toy", recur_window=(0.1, 0.2))
    presets.get("toy", n_recur=2, recur_window=(0.1, 0.2))


def test_a_recipe_refuses_an_ignored_parameter(tmp_path, capsys):
    r = {"name": "tiny", "model": {"kind": "pixel", "path": "mnist-ddpm"}, "loss": {"kind": "none"},
         "method": "shen2024", "params": {"scale": 2.0}, "sampler": {"steps": 2}, "seeds": "0-1", "batch": 2,
         "device": "cpu"}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["sample", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "scale=2.0 has no effect with polyak=True; it takes effect with polyak=False" in capsys.readouterr().err
    r.update(method="none", params={}, window=[0.2, 1.0])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["sample", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "window [0.2, 1.0] has no effect: method 'none' guides nowhere" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- item 3: a window without a guided step --------------------------------------------------------------------
def test_a_window_without_a_guided_step_is_an_error():
    sampler = lg.DDIM(NoiseSchedule.linear(), 50)
    with pytest.raises(ValueError, match=r"window=\(0.5, 0.5\) holds none of the 50 sampler steps \(the nearest is "
                                         r"at t/T = 0.5\), so nothing would be guided; widen window"):  # fmt: skip
        guidance.check_window(lg.preset("freedom").replace(window=(0.5, 0.5)), sampler)
    guidance.check_window(lg.preset("freedom").replace(window=(0.45, 0.5)), sampler)  # t/T = 0.5 is guided
    guidance.check_window(lg.preset("none"), sampler)


def test_sample_api_refuses_a_window_without_a_guided_step():
    sched = NoiseSchedule.linear()
    den = Denoiser(lambda x, t: torch.zeros_like(x), sched)
    with pytest.raises(ValueError, match=r"window=\(0.5, 0.5\) holds none of the 4 sampler steps"):
        lg.sample(den, lg.DDIM(sched, 4), lg.preset("freedom").replace(window=(0.5, 0.5)),
                  lambda x0: x0.flatten(1).sum(1), shape=(2,), seeds=[0])  # fmt: skip


def test_an_empty_recur_window_warns(caplog):
    sampler = lg.DDIM(NoiseSchedule.linear(), 2)
    with caplog.at_level(logging.WARNING):
        guidance.check_window(lg.preset("shen2024", recur_window=(0.3, 0.4)), sampler)
    assert "recur_window=(0.3, 0.4) holds none of the 2 guided steps" in caplog.text
    assert "set n_recur=1" in caplog.text


@shipped
def test_sample_cli_refuses_a_window_without_a_guided_step(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sample", "--method", "shen2024", "--set", "window=0.5,0.5", "--steps", "10", "--seeds", "0", "--batch",
            "1", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "window=(0.5, 0.5) holds none of the 10 sampler steps" in err and "widen window" in err
    assert not (out / "config.yaml").exists()


# -- what ships does not trip the check ------------------------------------------------------------------------
def test_shipped_settings_and_recipes_have_no_ignored_parameter(caplog):
    from pathlib import Path

    from lossguide import recipes

    store = settings.load()
    with caplog.at_level(logging.WARNING):
        for task, section in store.items():
            if task.startswith("_") or not isinstance(section, dict):
                continue
            oracle = task.startswith("oracle")
            for spec in section:
                try:
                    parse_method(spec)
                except ValueError:  # a label (the motion section), not a spec
                    continue
                method_config(spec, oracle=oracle, **settings.params(task, spec, store, oracle))
        for name in presets.PRESETS:
            presets.get(name)
        for f in sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")):
            recipes.load(f)
    assert "no effect" not in caplog.text
