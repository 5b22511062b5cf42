"""The ``lossguide`` command line: each subcommand parses, resolves a config and calls one function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("lossguide")


def _fmt_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return ",".join(f"{k}={v2:g}" if isinstance(v2, (int, float)) else f"{k}={v2}"
                            for k, v2 in v.items()) or "-"  # fmt: skip
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def cmd_oracle(args) -> int:
    from lossguide import oracle_bench
    from lossguide.harness.tasks import oracle as oracle_task
    from lossguide.io import atomic_write_json

    _check_oracle_args(args)
    if args.tune:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
        settings, trace = oracle_bench.tune(n=args.tune_n, steps=args.steps, methods=methods)
        print(json.dumps(settings, indent=2))
        if args.write_settings:
            print(f"wrote {oracle_task.save_settings(settings)}")
        if args.json:
            atomic_write_json(args.json, {"settings": settings, "trace": trace})
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(oracle_task.METHODS)
    particles = {}
    if args.particles is not None:
        refused = _not_proposals(methods, lambda m: oracle_task.method_config(m, {}), args.steps)
        if refused and args.methods:
            m, why = next(iter(refused.items()))
            raise ValueError(f"--particles: {m} cannot be the proposal: {why.split(';')[0]}; drop it from --methods")
        _say_skipped(refused)
        methods = [m for m in methods if m not in refused]
        particles = {"particles": args.particles, "potential": args.potential}
    rows = oracle_task.evaluate(n=args.n, steps=args.steps, methods=methods, **particles)
    return _print_oracle(args, rows)


def _check_oracle_args(args) -> None:
    """Refuse flags that would be ignored or fail only after the run (a one-line ValueError naming the flag)."""
    defaults = vars(build_parser().parse_args(["oracle"]))
    given = {k for k in ("n", "tune_n", "methods") if getattr(args, k) != defaults[k]}
    if args.tune:
        if "n" in given:
            raise ValueError("--n does not apply with --tune; --tune-n sets the samples per tuning run")
    else:
        if args.write_settings:
            raise ValueError("--write-settings stores the settings --tune chooses; add --tune, or drop it")
        if "tune_n" in given:
            raise ValueError("--tune-n applies with --tune only; use --n for the samples per method")
    for flag, v in (("--n", args.n), ("--tune-n", args.tune_n)):
        if v < 1:
            raise ValueError(f"{flag} must be ≥ 1, got {v}")
    if args.particles is not None and args.tune:
        raise ValueError("--particles does not apply with --tune (the tuner runs single particles); drop one")
    if args.particles is not None and args.particles < 1:
        raise ValueError(f"--particles must be ≥ 1 (particles per seed), got {args.particles}")
    if args.potential != "tds" and args.particles is None:
        raise ValueError("--potential weighs particles; add --particles K, or drop it")
    if not 1 <= args.steps <= 1000:
        raise ValueError(f"--steps must be ≥ 1 and at most the oracle's 1000 training timesteps, got {args.steps}")
    if args.methods is not None and not any(m.strip() for m in args.methods.split(",")):
        raise ValueError(f"--methods {args.methods!r} names no method; e.g. --methods dps,shen2024")
    if args.json is not None:
        check_file_out(args.json, "--json")


def check_file_out(path: Path, flag: str) -> None:
    """A one-line ValueError where the output file ``path`` cannot be written: a folder, a file in the way of its
    folder, or a folder that is not writable (checked before a long run, not after it)."""
    import os

    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; pass a file path, e.g. {path / 'out.json'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder; pass another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {parent} is not writable; make it writable or pass another path")


def _one_thread(fn):
    """Run ``fn`` with one torch thread: the oracle's tensors are tiny and threads only add overhead."""

    def wrapped(args):
        import torch

        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(args)
        finally:
            torch.set_num_threads(n)

    return wrapped


def _print_oracle(args, rows) -> int:
    from lossguide.io import atomic_write_json

    print(
        _fmt_table(
            rows,
            ["task", "method", "params", "sw_to_posterior", "validity", "loss", "nfe", "denoiser_grads", "wall_s"],
        )
    )
    if args.json:
        meta = {
            "distance": "sliced 2-Wasserstein (256 directions) to 4096 exact posterior samples",
            "n": args.n,
            "steps": args.steps,
            "sampler": "DDIM eta=0" if args.particles is None else "DDIM eta=1",
            "seeds": f"0..{args.n - 1}",
        }
        if args.particles is not None:
            meta.update(particles=args.particles, potential=args.potential, nfe="per seed: K × per particle")
        atomic_write_json(args.json, {"meta": meta, "rows": rows})
        print(f"wrote {args.json}")
    return 0


def _check_sample_models(cfg) -> None:
    """Refuse an original checkpoint file as ``--model`` (it needs constructor flags, which a recipe carries) and warn
    where the judge is the guide (the validity it reports is then the guided objective, not an independent check)."""
    from pathlib import Path

    from lossguide.models import CHECKPOINT_SUFFIXES, load_network

    model = str(cfg.model)
    if model.endswith(CHECKPOINT_SUFFIXES):
        if not Path(model).expanduser().is_file():
            load_network(model)  # raises its one-line "no checkpoint file" error
        raise ValueError(
            f"--model {model} is an original checkpoint file, which needs its constructor flags (image_size, "
            "num_channels, ...), and `lossguide sample` takes none: write a recipe with model: {kind: pixel, path: "
            f"{model}, flags: {{...}}}} (see recipes/dps-ffhq-sr.yaml) and run `lossguide sample --config RECIPE.yaml`"
        )
    if cfg.judge == cfg.guide:
        logging.getLogger("lossguide").warning(
            "the judge is the guide (%s): its validity measures the guided objective, not an independent check; "
            "pass --judge mnist-judge", cfg.judge)  # fmt: skip


def cmd_sample(args) -> int:
    from lossguide import run_sample
    from lossguide.runfolder import parse_seeds

    expect = None
    if args.config is not None:
        _check_config_flags(args)
        d = _read_yaml_or_none(args.config)
        if not run_sample.is_sample_config(d):
            return cmd_recipe(args)
        cfg = run_sample.config_from_yaml(d, args.config)  # a config.yaml a `lossguide sample` run wrote
        expect = d.get("guidance")
        check_device(str(cfg.device), what=f"the device of {args.config}")
    else:
        check_device(args.device)
        cfg = run_sample.SampleConfig(
            model=args.model, guide=args.guide, judge=args.judge, loss=args.loss, norm=args.norm, target=args.target,
            reference=args.reference, method=args.method, params=run_sample.parse_params(args.set),
            steps=args.steps, ddim_eta=args.ddim_eta, seeds=parse_seeds(args.seeds), batch=args.batch,
            device=args.device, dtype=args.dtype, particles=args.particles, potential=args.potential,
        )  # fmt: skip
    _check_sample_models(cfg)
    m = run_sample.run(cfg, args.out, progress=not args.quiet, overwrite=args.overwrite, expect_guidance=expect)
    if "not_applicable" in m:  # not MNIST digits: no guide or judge numbers
        print(
            f"{m['n_samples']} unguided samples, NFE {m['nfe']}, {m['wall_s_per_sample']:.2f} s/sample -> {args.out}"
        )
        return 0
    print(
        f"{m['n_samples']} samples of class {m['target']} with {m['method']}: judge validity "
        f"{m['judge_validity']:.1%}, guide validity {m['guide_validity']:.1%}, mean guide loss "
        f"{m['mean_guide_loss']:.3g}, NFE {m['nfe']}, {m['wall_s_per_sample']:.2f} s/sample -> {args.out}"
    )
    return 0


_SAMPLE_FLAGS = ("model", "guide", "judge", "loss", "norm", "target", "reference", "method", "set", "steps",
                 "ddim_eta", "seeds", "batch", "device", "dtype", "particles", "potential")  # fmt: skip


def _check_config_flags(args) -> None:
    """With --config only --out, --overwrite and --quiet apply: refuse any other sample flag that was set."""
    defaults = vars(build_parser().parse_args(["sample"]))
    given = ["--" + k.replace("_", "-") for k in _SAMPLE_FLAGS if getattr(args, k) != defaults[k]]
    if given:
        raise ValueError(
            f"{', '.join(given)} cannot be combined with --config (only --out, --overwrite and --quiet apply); "
            f"set them in {args.config}, or drop --config"
        )


def _read_yaml_or_none(path: Path):
    """The parsed YAML file, or None where it is missing or does not parse (the recipe loader reports that)."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def cmd_recipe(args) -> int:
    """``lossguide sample --config FILE``: a recipe (model, loss, method, sampler, seeds) from a YAML file."""
    from lossguide import recipes

    out = None if args.out == Path("runs/sample") else args.out  # default: runs/<recipe name>
    try:
        r = recipes.load(args.config)
    except yaml_errors() as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or _one_line(e)
        raise ValueError(f"recipe {args.config} is not valid YAML{where}: {problem}; fix the file") from e
    check_device(str(r["device"]), what="the recipe's device")
    out = out or Path("runs") / r["name"]
    check_out(out)
    m = recipes.run(r, out, overwrite=args.overwrite, progress=not args.quiet)
    print(
        f"{m['n_samples']} samples of recipe {m['name']} with {m['method']}: mean loss {m['mean_loss']:.4g}, "
        f"NFE {m['nfe']}, {m['wall_s_per_sample']:.2f} s/sample -> {out}"
    )
    return 0


def cmd_experiment(args) -> int:
    from lossguide import experiments

    if args.name == "all":
        names = list(experiments.EXPERIMENTS) if args.loss == "ce" else list(experiments.LOSS_AWARE)
    else:
        names = [args.name]
    for name in names:
        experiments.get(name)  # fail fast on an unknown name
        if args.loss != "ce" and name not in experiments.LOSS_AWARE:
            raise ValueError(f"experiment {name!r} has no class loss to switch; --loss applies to "
                             f"{', '.join(experiments.LOSS_AWARE)}")  # fmt: skip
    for name in names:
        out = args.out / experiments.folder_name(name, args.loss)  # NAME appended: experiments never share files
        summary = experiments.run(name, out, quick=args.quick, loss=args.loss)
        print(f"{name}: {summary.get('headline', 'done')} -> {out}")
    return 0


def cmd_bench(args) -> int:
    from lossguide.harness import bench

    cfg = bench.BenchConfig.quick() if args.quick else bench.BenchConfig()
    for name in ("tasks", "methods"):
        spec = getattr(args, name)
        if spec is not None:
            vals = [v.strip() for v in spec.split(",") if v.strip()]
            if not vals:
                raise ValueError(f"--{name} {spec!r} names no {name[:-1]}; e.g. --{name} "
                                 f"{'class,sketch' if name == 'tasks' else 'dps,shen2024'}")  # fmt: skip
            setattr(cfg, name, vals)
    if args.steps is not None:
        try:
            cfg.steps = [int(v) for v in args.steps.split(",")]
        except ValueError:
            raise ValueError(f"--steps {args.steps!r} must be comma-separated integers, e.g. 20,50,100") from None
    for name in ("n_eval", "eval_seed0", "n_tune", "tune_steps", "best_of", "batch", "beam_rounds"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.no_tune:
        cfg.tune = False
    if args.ddim_eta is not None:
        cfg.ddim_eta = args.ddim_eta
    if args.settings is not None:
        cfg.settings_file = str(args.settings)
    if args.norm is not None:
        cfg.norm = args.norm
    if args.cg_reference is not None:
        cfg.cg_reference = args.cg_reference
    cfg.particles, cfg.potential, refused = args.particles, args.potential, []
    if args.particles is not None and args.methods is None:  # the default list: the methods that can propose
        refused = _not_proposals(cfg.methods, lambda m: bench.method_config(m, None), min(cfg.steps))
        cfg.methods = [m for m in cfg.methods if m not in refused]
    check_device(args.device)
    cfg.device = args.device
    cfg.validate()
    _say_skipped(refused)
    b = bench.Bench(cfg, args.out)
    try:
        b.fixed_settings()  # a --settings file that lacks a cell is refused before anything is written
        with bench.open_folder(cfg, args.out, b.ranks, overwrite=args.overwrite):
            rows = b.run()
    finally:
        b.ranks.close()
    if b.ranks.rank == 0:
        print((args.out / "tables.md").read_text())
        print(f"{len(rows)} cells -> {args.out}")
    return 0


def _not_proposals(methods, config, steps: int) -> dict[str, str]:
    """The methods of ``methods`` that :func:`~lossguide.smc.smc` cannot take as proposals, with smc's reason."""
    from lossguide.smc import proposal_refusal

    return {m: why for m in methods if (why := proposal_refusal(config(m), steps)) is not None}


def _say_skipped(refused) -> None:
    if refused:
        print(f"--particles: skipping {', '.join(refused)} (no Gaussian proposal density: noise-aware or "
              "time-travelling)", file=sys.stderr)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line on stderr (exit 2), like every other lossguide error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _folder(text: str) -> Path:
    """An ``--out`` folder; an empty or blank one (which would write into the current directory) is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"--out {text!r} names no folder (it would write into the current "
                                         "directory); pass a folder path, e.g. --out runs/mine")  # fmt: skip
    return Path(text)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, only where the help does not state its default and there is one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def _defaults(fn) -> dict:
    """The keyword defaults of ``fn`` (the oracle flags take theirs from the functions they call)."""
    import inspect

    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="lossguide", description="Training-free loss-based diffusion guidance.")
    from lossguide import __version__

    ap.add_argument("-v", "--verbose", action="store_true", help="log progress; show an error's traceback")
    ap.add_argument("--version", action="version", version=f"lossguide {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    from lossguide.harness.tasks import MNIST_TASKS
    from lossguide.losses import NORMS
    from lossguide.models import NOISE_AWARE
    from lossguide.presets import PRESETS
    from lossguide.run_sample import DTYPES, SampleConfig
    from lossguide.runfolder import format_seeds
    from lossguide.smc import POTENTIALS

    S = SampleConfig()  # the sample flags' defaults are the config's
    P = _defaults(PRESETS["shen2024"])  # the help quotes the preset's signature

    p = sub.add_parser(
        "sample",
        formatter_class=_Help,
        help="guided samples from the default MNIST model (the main job)",
        description="Sample digits with training-free guidance and write PNGs, grid.png, config.yaml and "
        "metrics.json to --out. Rerunning the same command resumes; finished seeds are skipped.",
    )
    p.add_argument("--model", default=S.model, help="shipped name, diffusers folder or hub id")
    p.add_argument("--guide", default=S.guide, help="classifier that guides (shipped name)")
    p.add_argument("--judge", default=S.judge, help="classifier that evaluates (never guides)")
    p.add_argument("--loss", default=S.loss, choices=MNIST_TASKS,
                   help="guidance loss: class-feature is ‖guide features − target class mean‖ (the default), class "
                   "the guide's cross-entropy (saturating: pair it with --set polyak_gap=loss)")  # fmt: skip
    p.add_argument("--norm", default=S.norm, choices=NORMS,
                   help="sketch/inpaint/sr residual: ‖r‖² or ‖r‖ (l2, as the paper's code)")  # fmt: skip
    p.add_argument("--target", type=int, default=S.target, help="target digit class")
    p.add_argument("--reference", type=int, default=S.reference, help="held-out reference digit (sketch/inpaint/sr)")
    p.add_argument(
        "--method",
        default=S.method,
        type=_method_spec,
        help=f"a preset ({', '.join(PRESETS)}) with modifiers, e.g. freedom+polyak or shen2024-ra; with --particles "
        "also a particle method: tds (twisted diffusion sampler) or fk (Feynman-Kac steering)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="preset parameter, e.g. --set eta=0.02 --set n_aug=10 (repeatable); shen2024's defaults (eta="
        f"{P['eta']:g}, |T| = {P['n_aug']} digit augmentations, time travel s = {P['n_recur']} in t/T ∈ "
        f"[{P['recur_window'][0]:g}, {P['recur_window'][1]:g}]) were chosen on the shipped model",
    )
    p.add_argument("--steps", type=int, default=S.steps, help="DDIM steps")
    p.add_argument("--ddim-eta", type=float, default=S.ddim_eta, help="DDIM η (0 deterministic, 1 DDPM-like)")
    p.add_argument("--seeds", default=format_seeds(S.seeds), help="seeds, e.g. 0-15 or 0-7,100")
    p.add_argument("--batch", type=int, default=S.batch, help="rows per batch; a short batch is padded to it, so a "
                   "seed's numbers depend on --batch but not on which seeds share its batch")  # fmt: skip
    p.add_argument("--particles", type=int, default=S.particles, metavar="K",
                   help="K weighted particles per seed (lossguide.smc; needs --ddim-eta > 0): the method is their "
                   "proposal, each seed's sample the drawn particle; NFE per seed = K × per particle")  # fmt: skip
    p.add_argument("--potential", choices=tuple(POTENTIALS), default=S.potential,
                   help="the particles' potential (default: tds, or a particle method's own)")  # fmt: skip
    p.add_argument("--out", type=_folder, default=Path("runs/sample"), help="run folder")
    p.add_argument("--device", default=S.device, help="torch device")
    p.add_argument("--dtype", default=S.dtype, choices=DTYPES,
                   help="models and sampler state; float64 makes a seed's numbers the same at any --batch (float32 "
                   "kernels round differently for another batch size, and guidance amplifies it)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a run folder with a different config")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="run a recipe instead (YAML: model, loss, method, sampler, seeds; see recipes/), or re-run the "
        "config.yaml of a sample run; only --out (default runs/<recipe name>), --overwrite and --quiet apply",
    )
    p.set_defaults(func=cmd_sample)

    from lossguide.harness.tasks.oracle import evaluate
    from lossguide.oracle_bench import tune

    O, T = _defaults(evaluate), _defaults(tune)  # the oracle flags' defaults are the functions'
    if O["steps"] != T["steps"]:
        raise AssertionError("lossguide oracle's --steps serves evaluate and tune: give them one default")
    p = sub.add_parser(
        "oracle",
        formatter_class=_Help,
        help="every preset on the Gaussian-mixture oracle vs the exact posterior",
        description="Run every preset on two fixed Gaussian-mixture tasks and print each "
        "method's sliced-Wasserstein distance to exact posterior samples and its NFE.",
    )
    p.add_argument(
        "--json",
        type=Path,
        nargs="?",
        const=Path("oracle.json"),
        default=None,
        help="also write the rows as JSON (default file: oracle.json)",
    )
    p.add_argument("--n", type=int, default=O["n"], help="samples per method (seeds 0..n-1)")
    p.add_argument("--steps", type=int, default=O["steps"], help="DDIM steps")
    p.add_argument("--methods", default=None, help="comma-separated subset of the presets")
    p.add_argument("--tune", action="store_true",
                   help="grid-search each method's step (with --methods: those) on tuning seeds instead")  # fmt: skip
    p.add_argument("--tune-n", type=int, default=T["n"], help="samples per tuning run")
    p.add_argument("--write-settings", action="store_true", help="with --tune: store the chosen settings")
    p.add_argument("--particles", type=int, default=None,
                   help="K particles per seed: each method is the proposal of lg.smc (DDIM eta=1)")  # fmt: skip
    p.add_argument("--potential", choices=tuple(POTENTIALS), default="tds",
                   help="the particles' potential (--particles)")  # fmt: skip
    p.set_defaults(func=_one_thread(cmd_oracle))

    p = sub.add_parser(
        "experiment",
        formatter_class=_Help,
        help="the paper's analysis experiments (report.md, figures, raw numbers)",
        description="Run one of the paper's analysis experiments on the shipped MNIST models or the "
        "Gaussian-mixture oracle; writes report.md, PNG figures and JSON/CSV numbers to the run folder.",
    )
    from lossguide.experiments import EXPERIMENTS

    p.add_argument("name", help=f"one of {', '.join(EXPERIMENTS)}, or all")
    p.add_argument("--out", type=_folder, default=Path("runs/experiments"), help="folder (NAME is appended)")
    p.add_argument("--quick", action="store_true", help="few samples (for tests); numbers are not meaningful")
    p.add_argument(
        "--loss",
        choices=("ce", "feature"),
        default="ce",
        help="class loss of the understanding experiments: the guide's cross-entropy (saturating) or "
        "the paper-style feature distance ‖f(x0_hat) − μ_y‖ (folder NAME-feature)",
    )
    p.set_defaults(func=cmd_experiment)

    from lossguide.harness.bench import BenchConfig

    B = BenchConfig()  # the bench flags' defaults (None: keep the config's) are stated from the config
    p = sub.add_parser(
        "bench",
        formatter_class=_Help,
        help="every method × task × budget, tuned on tuning seeds, evaluated on disjoint seeds",
        description="Tune each method's step parameter (multiplicative beam search on seeds from 10,000), then "
        "evaluate it on seeds 0..n-1; writes results.csv/json, tables.md, Pareto plots and sample grids. Resumable "
        "(rerun the same command); shard over processes with torchrun --nproc_per_node N -m lossguide.cli bench.",
    )
    p.add_argument("--tasks", default=None, help="comma-separated: class, class-feature, sketch, inpaint, sr, "
                   f"class+sketch, oracle-class, oracle-linear (default: {','.join(B.tasks)})")  # fmt: skip
    p.add_argument("--methods", default=None, help="presets, optionally with +ra/+polyak/+tt (or shen2024-ra, "
                   "-polyak, -tt), e.g. freedom+polyak (default: every preset)")  # fmt: skip
    p.add_argument("--steps", default=None,
                   help=f"DDIM budgets, e.g. 20,50,100 (default: {','.join(map(str, B.steps))})")  # fmt: skip
    p.add_argument("--n-eval", type=int, default=None, help=f"number of evaluation seeds (default {B.n_eval})")
    p.add_argument("--eval-seed0", type=int, default=None,
                   help=f"first evaluation seed: seeds eval-seed0 .. eval-seed0 + n-eval − 1 "
                   f"(default {B.eval_seed0})")  # fmt: skip
    p.add_argument("--n-tune", type=int, default=None, help=f"tuning seeds per candidate (default {B.n_tune})")
    p.add_argument("--beam-rounds", type=int, default=None, help=f"beam-search rounds (default {B.beam_rounds})")
    p.add_argument("--tune-steps", type=int, default=None,
                   help=f"DDIM steps the tuner samples with; tune per budget by one run per --steps value with "
                   f"--tune-steps equal to it (default {B.tune_steps})")  # fmt: skip
    p.add_argument("--no-tune", action="store_true", help="use each method's default step parameter")
    p.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="settings.json of an earlier bench run: evaluate with its step parameters, no tuning",
    )
    p.add_argument("--ddim-eta", type=float, default=None,
                   help=f"DDIM η (0 deterministic, 1 stochastic; default {B.ddim_eta:g})")  # fmt: skip
    p.add_argument("--norm", default=None, choices=NORMS,
                   help="sketch/inpaint/sr (and class+sketch's sketch term) residual: ‖r‖² (squared) or ‖r‖ "
                   f"(l2, the paper's code); default {B.norm}")  # fmt: skip
    p.add_argument("--best-of", type=int, default=None, help="keep the lowest-loss of N candidates per seed")
    p.add_argument("--cg-reference", default=None, choices=NOISE_AWARE,
                   help=f"the noise-aware classifier cg guides with on the MNIST class tasks (default "
                   f"{B.cg_reference})")  # fmt: skip
    p.add_argument("--particles", type=int, default=None, metavar="K",
                   help="K weighted particles per seed (lossguide.smc; needs --ddim-eta > 0), each method their "
                   "proposal; NFE per seed = K × per particle; tuning runs with the particles too")  # fmt: skip
    p.add_argument("--potential", choices=tuple(POTENTIALS), default=None,
                   help="the particles' potential (default tds)")  # fmt: skip
    p.add_argument("--batch", type=int, default=None, help=f"seeds per shard and batch (default {B.batch})")
    p.add_argument("--quick", action="store_true", help="a tiny grid for CI (numbers are not meaningful)")
    p.add_argument("--out", type=_folder, default=Path("runs/bench"), help="run folder")
    p.add_argument("--device", default=B.device, help="torch device")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in a folder that holds another config (its shards and outputs are deleted)",
    )
    p.set_defaults(func=cmd_bench)
    for p in sub.choices.values():  # -v also after the subcommand; SUPPRESS keeps a -v given before it
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as lossguide -v")
    return ap


def yaml_errors() -> tuple[type[BaseException], ...]:
    """PyYAML's error class, or () where PyYAML is not installed."""
    try:
        import yaml
    except ImportError:
        return ()
    return (yaml.YAMLError,)


def _method_spec(spec: str) -> str:
    """A method spec of :mod:`lossguide.harness.methods`' grammar or a particle method (tds, fk), checked while
    parsing."""
    from lossguide.harness.methods import parse_method
    from lossguide.smc import PARTICLE_METHODS

    if spec in PARTICLE_METHODS:
        return spec

    try:
        parse_method(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def check_device(spec: str, what: str = "--device") -> None:
    """A one-line ValueError naming the fix where ``spec`` is no torch device or is not available here."""
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{what} {spec!r} is not a torch device; use cpu, cuda, cuda:1, mps, ...") from e
    if dev.type == "meta":
        raise ValueError(f"{what} {spec!r}: meta tensors hold no data, so nothing can be sampled on them; use cpu")
    if dev.type == "cpu":
        return
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    if not getattr(backend, "is_available", lambda: False)():  # no allocation: torchrun ranks share cuda:0
        raise ValueError(f"{what} {spec!r}: {dev.type} is not available here (torch {torch.__version__}); use cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"{what} {spec!r}: there are only {count} {dev.type} devices here; use {dev.type}:0 to {count - 1}"
        )


def check_out(out: Path) -> None:
    """A one-line error where the run folder ``out`` is an existing file."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a folder; pass a folder path")


def _one_line(e: BaseException) -> str:
    """The error as one line; an OSError names its path."""
    if isinstance(e, OSError) and e.filename is not None:
        msg = f"{e.strerror or type(e).__name__}: {e.filename}"
        if e.filename2 is not None:
            msg += f" -> {e.filename2}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    expected = (ValueError, TypeError, ImportError, OSError, RuntimeError, *yaml_errors())
    try:
        if isinstance(getattr(args, "out", None), Path):
            check_out(args.out)
        return args.func(args)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        resume = "; rerun the same command to resume" if args.command in ("sample", "bench") else ""
        print(f"lossguide {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except expected as e:
        if args.verbose:
            raise
        print(f"lossguide {args.command}: error: {_one_line(e)} (rerun with -v for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
