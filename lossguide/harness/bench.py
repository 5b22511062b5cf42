"""``lossguide bench``: every method on every task and budget, tuned fairly, evaluated on disjoint seeds.

Seeds are the unit of work. A *shard* is one (phase, task, method, step value, DDIM steps, seed chunk) under one
*key*, the hash of every other setting that changes its numbers (the resolved guidance config, DDIM η, best-of-N,
the residual norm, the device); its per-sample records are written atomically to ``out/shards/...json`` (samples
beside it), and a shard whose file exists with its key is never recomputed, so a run killed at any point (SIGKILL
included) continues where it stopped and ends with the same numbers, and no run reads another config's shard.
Shards are spread over processes by rank (``torchrun --nproc_per_node N``:
gloo on CPU, NCCL on GPUs); the ranks meet at a barrier after each tuning round and before the summary.

Tuning (TFG's multiplicative beam search, ``../shared/docs/method.md`` §2.6, in both directions): each method's
step parameter starts at its default (:data:`lossguide.harness.methods.DEFAULTS`), candidates multiply the
``width`` best values by ``factor^±1``, for ``rounds`` rounds, on tuning seeds (``tune_seeds("bench", n)``: from
10,000, disjoint from the evaluation seeds 0..n−1). Objective: the task's (:mod:`lossguide.harness.tasks`): judge
validity (class tasks; ties by lower guide loss), PSNR to the reference (inverse problems), minus the sliced W2
distance to the exact posterior (oracle). Tables and figures: :mod:`lossguide.harness.report`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lossguide.harness import settings as store
from lossguide.harness.methods import METHODS, method_config, parse_method, tuned_param
from lossguide.harness.report import per_seed, write_outputs
from lossguide.harness.tasks import (
    CLASS_TASKS,
    NOISE_AWARE_METHODS,
    NORM_TASKS,
    ORACLE_TASKS,
    TASKS,
    applicable,
    method_loss,
)
from lossguide.harness.tasks.mnist import MnistKit, MnistTask
from lossguide.harness.tasks.oracle import OracleTaskAdapter
from lossguide.harness.tuning import beam_search, tune_seeds
from lossguide.io import atomic_write_bytes, atomic_write_json
from lossguide.runfolder import Folder
from lossguide.samplers import DDIM
from lossguide.sampling import sample
from lossguide.smc import proposal_refusal, smc

log = logging.getLogger(__name__)

#: the tuner's quality ceiling on class tasks: FID ≤ this × the unguided model's FID on the tuning seeds
FID_CEILING = 1.5
CG_REFERENCE = "mnist-noise-aware"  # cg's noise-aware classifier unless --cg-reference names another


# -- config, ranks, shards ------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """A benchmark grid; everything that changes the numbers (written to ``config.json``)."""

    tasks: list[str] = field(default_factory=lambda: ["class"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: list[int] = field(default_factory=lambda: [50])
    n_eval: int = 100
    eval_seed0: int = 0  # evaluation seeds eval_seed0 .. eval_seed0 + n_eval − 1
    n_tune: int = 32
    tune: bool = True
    tune_steps: int = 50
    beam_factor: float = 3.0
    beam_width: int = 2
    beam_rounds: int = 2
    best_of: int = 1
    batch: int = 50
    device: str = "cpu"
    ddim_eta: float = 0.0  # 0: deterministic DDIM; 1: stochastic, as the paper's code
    settings_file: str | None = None  # step parameters from an earlier run's settings.json (no tuning)
    norm: str = "squared"  # the NORM_TASKS' residual: ‖r‖² or ‖r‖ ("l2", the paper's code)
    particles: int | None = None  # K weighted particles per seed (lossguide.smc), each method their proposal
    potential: str | None = None  # the particles' potential (smc.POTENTIALS; None: tds)
    cg_reference: str = CG_REFERENCE  # the noise-aware classifier cg guides with on the MNIST tasks

    def to_dict(self) -> dict:
        """The config as ``config.json`` holds it: a single-particle run's has no particle keys (as before them)."""
        d = asdict(self)
        if self.particles is None:
            del d["particles"], d["potential"]
        if self.eval_seed0 == 0:  # as before the field: the folders and shard keys of earlier runs stay valid
            del d["eval_seed0"]
        if self.cg_reference == CG_REFERENCE:  # likewise
            del d["cg_reference"]
        return d

    def eval_seeds(self) -> list[int]:
        """The evaluation seeds (target class ``seed mod 10`` on class tasks)."""
        return list(range(self.eval_seed0, self.eval_seed0 + self.n_eval))

    def validate(self) -> None:
        """One-line errors naming the flag: unknown tasks/methods, counts out of range, an unreadable --settings."""
        if not self.tasks or not self.methods:
            raise ValueError(f"--{'tasks' if not self.tasks else 'methods'} names nothing; give at least one")
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
        for m in self.methods:
            method_config(m, 1.0)
        cells = [(t, m) for t in self.tasks for m in self.methods if applicable(t, m)]
        if not cells:
            raise ValueError(f"no method of --methods {','.join(self.methods)} applies to --tasks "
                             f"{','.join(self.tasks)} (cg guides with the noise-aware classifier: class and oracle "
                             "tasks only); 0 cells")  # fmt: skip
        if self.norm != "squared" and not set(self.tasks) & set(NORM_TASKS):
            raise ValueError(f"--norm {self.norm} has no effect on --tasks {','.join(self.tasks)}: it sets the "
                             f"residual of {', '.join(NORM_TASKS)}; drop it")  # fmt: skip
        if self.settings_file is not None and not self.tune:
            raise ValueError("--no-tune and --settings both replace tuning (--no-tune: each method's default step "
                             "parameter; --settings: the file's); pass one of them")  # fmt: skip
        for flag, v, lo in (("--n-eval", self.n_eval, 1), ("--n-tune", self.n_tune, 1), ("--batch", self.batch, 1),
                            ("--best-of", self.best_of, 1), ("--beam-rounds", self.beam_rounds, 0)):  # fmt: skip
            if v < lo:
                raise ValueError(f"{flag} must be ≥ {lo}, got {v}")
        if self.eval_seed0 < 0:
            raise ValueError(f"--eval-seed0 must be ≥ 0, got {self.eval_seed0}")
        tune = tune_seeds("bench", self.n_tune)
        tuned_here = self.tune and self.settings_file is None
        if tuned_here and self.eval_seed0 < tune.stop and tune.start < self.eval_seed0 + self.n_eval:
            last = self.eval_seed0 + self.n_eval - 1
            raise ValueError(f"evaluation seeds {self.eval_seed0}–{last} overlap the tuning seeds {tune.start}–"
                             f"{tune.stop - 1}; move --eval-seed0 past {tune.stop - 1}")  # fmt: skip
        for s in self.steps:
            if not 1 <= s <= 1000:
                raise ValueError(f"--steps must be ≥ 1 and at most the models' 1000 training timesteps, got {s}")
        if not 1 <= self.tune_steps <= 1000:
            raise ValueError(f"--tune-steps must be ≥ 1 and at most the models' 1000 training timesteps, got "
                             f"{self.tune_steps}")  # fmt: skip
        if self.tune_steps != BenchConfig.tune_steps and not tuned_here:
            raise ValueError(f"--tune-steps {self.tune_steps} has no effect with --no-tune or --settings (nothing is "
                             "tuned); drop it")  # fmt: skip
        if not (math.isfinite(self.ddim_eta) and self.ddim_eta >= 0):
            raise ValueError(f"--ddim-eta must be a finite number ≥ 0, got {self.ddim_eta}")
        if self.settings_file is not None:
            read_settings(self.settings_file)
        self._check_particles()
        self._check_cg_reference()

    def _check_cg_reference(self) -> None:
        """--cg-reference: a shipped noise-aware classifier, and a run that has cg on an MNIST class task."""
        from lossguide.models import NOISE_AWARE

        if self.cg_reference == CG_REFERENCE:
            return
        if self.cg_reference not in NOISE_AWARE:
            raise ValueError(f"--cg-reference {self.cg_reference!r} is not a noise-aware classifier; choose one of "
                             f"{', '.join(NOISE_AWARE)}")  # fmt: skip
        if not any(_guides_noise_aware(m) and t in CLASS_TASKS for t in self.tasks for m in self.methods):
            raise ValueError(f"--cg-reference {self.cg_reference} changes only cg on the MNIST class tasks, which "
                             "this run does not have; drop it")  # fmt: skip

    def _check_particles(self) -> None:
        """--particles K: every method must be a Gaussian proposal (:func:`~lossguide.smc.proposal_refusal`), on a
        stochastic DDIM, with no second way of spending compute (--best-of)."""
        from lossguide.smc import POTENTIALS

        K = self.particles
        if K is None:
            if self.potential is not None:
                raise ValueError(f"--potential {self.potential} weighs particles: add --particles K, or drop it")
            return
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"--particles must be an integer ≥ 1 (particles per seed), got {K!r}")
        if self.potential is not None and self.potential not in POTENTIALS:
            raise ValueError(f"--potential must be one of {', '.join(POTENTIALS)}, got {self.potential!r}")
        if not self.ddim_eta > 0:
            raise ValueError(f"--particles weighs each step by its Gaussian density, but DDIM η = {self.ddim_eta:g} "
                             "is deterministic; add --ddim-eta 1")  # fmt: skip
        if self.best_of > 1:
            raise ValueError("--best-of and --particles are two ways to spend a seed's compute; pass one of them")
        for m in self.methods:
            why = proposal_refusal(method_config(m, None), min(self.steps))
            if why is not None:
                raise ValueError(f"--particles: {m} cannot be the proposal: {why.split(';')[0]}; drop it from "
                                 "--methods")  # fmt: skip

    @staticmethod
    def quick() -> BenchConfig:
        return BenchConfig(tasks=["class", "sketch", "oracle-class"], methods=["none", "dps", "freedom", "shen2024",
                           "cg"], steps=[5], n_eval=8, n_tune=4, tune_steps=5, beam_rounds=1, batch=8)  # fmt: skip


class Ranks:
    """This process's rank and world size (torchrun's env), with a barrier (gloo on CPU, NCCL on GPU)."""

    def __init__(self, device: str = "cpu"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.dist = None
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
            self.dist = dist

    def mine(self, jobs: list) -> list:
        return [j for i, j in enumerate(jobs) if i % self.world == self.rank]

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def close(self) -> None:
        if self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()


@dataclass(frozen=True)
class Shard:
    phase: str  # "tune" or "eval"
    task: str
    method: str
    value: float | None
    steps: int
    seeds: tuple[int, ...]
    key: str = ""  # the hash of everything else that changes the shard's numbers (Bench.shard_key)

    def path(self, out: Path) -> Path:
        v = "default" if self.value is None else f"{self.value:.6g}"
        name = f"{self.seeds[0]:06d}-{self.seeds[-1]:06d}"
        return out / "shards" / self.phase / self.task / self.method.replace("+", "_") / f"v{v}" / f"s{self.steps}" / (
            f"k{self.key}" if self.key else "") / (name + ".json")  # fmt: skip


def _guides_noise_aware(method: str) -> bool:
    """Whether ``method`` guides with the task's noise-aware classifier (cg and its variants)."""
    return parse_method(method)[0] in NOISE_AWARE_METHODS


def _peak_mem_mb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak so far


class Bench:
    """Runs a :class:`BenchConfig` into a folder; see the module docstring."""

    def __init__(self, cfg: BenchConfig, out: Path, kit: MnistKit | None = None):
        """``kit``: the MNIST models, loaded once and shared by the benches of one run (None: loaded when needed)."""
        cfg.validate()
        skipped = [f"{m} on {t}" for t in cfg.tasks for m in cfg.methods if not applicable(t, m)]
        if skipped:
            log.warning("skipped (not applicable): %s", ", ".join(skipped))
        self.cfg, self.out = cfg, Path(out)
        self.ranks = Ranks(cfg.device)
        self._tasks: dict = {}
        self._kit = kit

    # -- tasks
    def task(self, name: str):
        if name not in self._tasks:
            if name in ORACLE_TASKS:
                self._tasks[name] = OracleTaskAdapter(name)
            else:
                if self._kit is None:
                    self._kit = MnistKit(self.cfg.device, noise_aware=self.cfg.cg_reference)
                guides_cg = any(_guides_noise_aware(m) for m in self.cfg.methods)
                if guides_cg and self._kit.noise_aware != self.cfg.cg_reference:
                    raise ValueError(
                        f"the shared MnistKit guides cg with {self._kit.noise_aware}, the config with "
                        f"{self.cfg.cg_reference}; build the kit with noise_aware=cfg.cg_reference"
                    )
                self._tasks[name] = MnistTask(name, self._kit, self.cfg.norm)
        return self._tasks[name]

    def shard_settings(self, phase: str, task: str, method: str, value: float | None) -> dict:
        """Every setting besides the shard's own fields that changes its numbers (hashed into its key)."""
        oracle = task in ORACLE_TASKS
        K = self.cfg.particles
        return {
            "guidance": method_config(method, value, oracle).to_dict(),
            "ddim_eta": self.cfg.ddim_eta,
            "best_of": self.cfg.best_of if phase == "eval" else 1,
            "norm": self.cfg.norm if task in NORM_TASKS else None,
            "device": "cpu" if oracle else str(self.cfg.device),
            **(
                {} if K is None else {"particles": K, "potential": self.cfg.potential or "tds"}
            ),  # single-particle keys unchanged
            # the default reference adds no key (earlier shards stay valid)
            **(
                {"cg_reference": self.cfg.cg_reference}
                if self.cfg.cg_reference != CG_REFERENCE and _guides_noise_aware(method) and not oracle
                else {}
            ),
        }

    def shard_key(self, phase: str, task: str, method: str, value: float | None) -> str:
        text = json.dumps(self.shard_settings(phase, task, method, value), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @staticmethod
    def step_value(settings: dict, task: str, method: str) -> float | None:
        """The step value of ``method`` on ``task`` in ``settings`` (a run's settings.json or the shipped store)."""
        return store.step_value(task, method, settings, task in ORACLE_TASKS)

    # -- one shard
    def run_shard(self, sh: Shard) -> dict:
        """Sample and record one shard (or read it when its file exists)."""
        path = sh.path(self.out)
        if path.exists():
            rec = _read_shard(path, sh)
            if rec is not None:
                return rec
        task = self.task(sh.task)
        cfg = method_config(sh.method, sh.value, task.oracle)
        n_cand = self.cfg.best_of if sh.phase == "eval" else 1
        seeds = list(sh.seeds)
        cand_seeds = [s + j * 1_000_000 for s in seeds for j in range(n_cand)]  # candidate j of seed s
        dtype = torch.float64 if task.oracle else torch.float32
        device = "cpu" if task.oracle else self.cfg.device
        if str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        denoiser = task.denoiser()
        rows = [s for s in seeds for _ in range(n_cand)]
        K = self.cfg.particles
        sampler = DDIM(denoiser.schedule, sh.steps, eta=self.cfg.ddim_eta)
        kw = {"shape": task.shape, "seeds": cand_seeds, "dtype": dtype, "device": device, "augment": task.augment}
        t0 = time.perf_counter()
        if K is None:
            loss = method_loss(cfg, task.loss(rows), lambda: task.loss(rows, noise_aware=True))
            res = sample(denoiser, sampler, cfg, loss if cfg.enabled else None, **kw)
        else:  # the method proposes, the clean loss of each particle's seed weighs (rows: seed-major, as smc's)
            loss = task.loss([s for s in rows for _ in range(K)])
            res = smc(denoiser, sampler, cfg if cfg.enabled else None, loss, particles=K,
                      potential=self.cfg.potential or "tds", **kw)  # fmt: skip
        wall = time.perf_counter() - t0
        x = res.x0 if task.oracle else res.x0.clamp(-1, 1)
        if n_cand > 1:  # best-of-N: the candidate with the lowest guide loss; NFE counts every candidate
            with torch.no_grad():
                L = task.loss([s for s in seeds for _ in range(n_cand)])(x).view(len(seeds), n_cand)
            x = x.view(len(seeds), n_cand, *x.shape[1:])[torch.arange(len(seeds)), L.argmin(1)]
        runs = n_cand * (K or 1)  # what a seed costs: its candidates or its particles
        rec = {
            "shard": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(sh).items()},
            "config": cfg.to_dict(),
            "settings": self.shard_settings(sh.phase, sh.task, sh.method, sh.value),
            "nfe_per_sample": res.stats.nfe * runs,
            "denoiser_grads_per_sample": res.stats.denoiser_grads * runs,
            "loss_grads_per_sample": res.stats.loss_grads * runs,
            "skipped_steps": int(res.stats.skipped.sum()),
            "wall_s": wall,
            "peak_mem_mb": _peak_mem_mb(device),
            "records": task.records(x, seeds),
        }
        if not task.oracle:  # samples beside the record (the record is the completion marker)
            buf = io.BytesIO()
            torch.save(((x + 1) * 127.5).round().to(torch.uint8).cpu(), buf)
            atomic_write_bytes(path.with_suffix(".pt"), buf.getvalue())
        atomic_write_json(path, rec)
        return rec

    def run_shards(self, shards: list[Shard]) -> list[dict]:
        """Run this rank's share of ``shards``, meet at the barrier, then read all of them."""
        for sh in self.ranks.mine(shards):
            if _read_shard(sh.path(self.out), sh) is None:
                log.info("shard %s", sh)
                self.run_shard(sh)
        self.ranks.barrier()
        recs = [_read_shard(sh.path(self.out), sh) for sh in shards]
        missing = [sh.path(self.out) for sh, r in zip(shards, recs, strict=True) if r is None]
        if missing:
            raise RuntimeError(f"shard {missing[0]} is missing or unreadable after every rank finished; rerun")
        return recs

    def shards(self, phase, task, method, value, steps, seeds) -> list[Shard]:
        b, key = self.cfg.batch, self.shard_key(phase, task, method, value)
        return [Shard(phase, task, method, value, steps, tuple(seeds[i : i + b]), key)
                for i in range(0, len(seeds), b)]  # fmt: skip

    def cell(self, recs: list[dict], task: str) -> dict:
        """Set metrics of a cell from its shards' records, plus per-sample cost."""
        t = self.task(task)
        all_recs = [r for rec in recs for r in rec["records"]]
        out = t.summary(all_recs)
        out.update(
            nfe=recs[0]["nfe_per_sample"],
            denoiser_grads=recs[0]["denoiser_grads_per_sample"],
            loss_grads=recs[0]["loss_grads_per_sample"],
            skipped_steps=sum(r["skipped_steps"] for r in recs),
            wall_s_per_sample=sum(r["wall_s"] for r in recs) / len(all_recs),
            peak_mem_mb=max(r["peak_mem_mb"] for r in recs),
        )
        return out

    # -- phases
    def fixed_settings(self) -> dict | None:
        """The ``--settings`` file's step values, checked for every (task, method) this run tunes (None: tune)."""
        cfg = self.cfg
        if cfg.settings_file is not None:
            path = Path(cfg.settings_file)
            settings = read_settings(path)
            needed = [(t, m) for t in cfg.tasks for m in cfg.methods
                      if tuned_param(m, t in ORACLE_TASKS) and applicable(t, m)]  # fmt: skip
            missing = [(t, m) for t, m in needed if self.step_value(settings, t, m) is None]
            if missing:
                raise ValueError(f"--settings {path} has no step parameter for {missing[0][1]!r} on {missing[0][0]!r}")
            for t, m in needed:
                v = self.step_value(settings, t, m)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"--settings {path}: the step parameter {tuned_param(m)[0]} of {m!r} on {t!r} "
                                     f"must be a finite number, got {v!r}")  # fmt: skip
            return settings
        return None

    def tune(self) -> dict:
        """Beam-search each (task, method)'s step parameter; writes ``tuning.json`` and ``settings.json``."""
        cfg = self.cfg
        fixed = self.fixed_settings()
        if fixed is not None:
            return fixed
        settings: dict = {}
        trace: list[dict] = []
        seeds = list(tune_seeds("bench", cfg.n_tune))
        for task in cfg.tasks:
            oracle = task in ORACLE_TASKS
            ceiling = None
            if task in CLASS_TASKS and cfg.tune:  # the quality bound from the unguided model on the tuning seeds
                none = self.cell(self.run_shards(self.shards("tune", task, "none", None, cfg.tune_steps, seeds)), task)
                ceiling = FID_CEILING * none["fid"]
                settings.setdefault("_fid_ceiling", {})[task] = ceiling
            for method in cfg.methods:
                p = tuned_param(method, oracle)
                if p is None or not applicable(task, method):
                    continue
                if not cfg.tune:
                    settings.setdefault(task, {})[method] = p[1]
                    continue

                def evaluate(values, task=task, method=method, ceiling=ceiling):
                    shards = [self.shards("tune", task, method, v, cfg.tune_steps, seeds) for v in values]
                    recs = self.run_shards([s for group in shards for s in group])
                    out, i = [], 0
                    for group in shards:
                        cell = self.cell(recs[i : i + len(group)], task)
                        i += len(group)
                        out.append(self.task(task).objective(cell, ceiling))
                    return out

                best, tr = beam_search(evaluate, p[1], cfg.beam_factor, cfg.beam_width, cfg.beam_rounds)
                settings.setdefault(task, {})[method] = best
                trace += [{"task": task, "method": method, "param": p[0], **row} for row in tr]
        if self.ranks.rank == 0:
            atomic_write_json(self.out / "tuning.json", {"seeds": f"{seeds[0]}..{seeds[-1]}", "trace": trace})
            atomic_write_json(self.out / "settings.json", settings)
        return settings

    def evaluate(self, settings: dict) -> list[dict]:
        cfg = self.cfg
        seeds = cfg.eval_seeds()
        cells, shards = [], []
        for task in cfg.tasks:
            for method in cfg.methods:
                if not applicable(task, method):
                    continue
                v = self.step_value(settings, task, method)
                for steps in cfg.steps:
                    group = self.shards("eval", task, method, v, steps, seeds)
                    cells.append((task, method, v, steps, len(shards), len(group)))
                    shards += group
        recs = self.run_shards(shards)
        rows = []
        for task, method, v, steps, i, n in cells:
            p = tuned_param(method, task in ORACLE_TASKS)
            row = {"task": task, "method": method, "steps": steps,
                   "param": f"{p[0]}={v:.4g}" if p else "-", **self.cell(recs[i : i + n], task)}  # fmt: skip
            outcome = per_seed(task, [r for rec in recs[i : i + n] for r in rec["records"]])
            if outcome is not None:
                row["per_seed"] = outcome
            rows.append(row)
        return rows

    def run(self) -> list[dict]:
        self.out.mkdir(parents=True, exist_ok=True)
        settings = self.tune()
        rows = self.evaluate(settings)
        if self.ranks.rank == 0:
            write_outputs(self, rows, settings)
        self.ranks.barrier()
        return rows


def _read_shard(path: Path, sh: Shard) -> dict | None:
    """The record of shard ``sh`` at ``path``, or None where it is missing, unreadable or another shard's."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("shard %s is unreadable; it is computed again", path)
        return None
    want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(sh).items()}
    if not isinstance(rec, dict) or rec.get("shard") != want or not isinstance(rec.get("records"), list):
        log.warning("shard %s holds another shard's record; it is computed again", path)
        return None
    return rec


#: what a bench run writes at the top of its folder besides config.json (removed by --overwrite)
OUTPUTS = ("shards", "tuning.json", "settings.json", "results.csv", "results.json", "tables.md")
OUTPUT_GLOBS = ("pareto_*.png", "samples_*.png")


def read_settings(path: str | Path) -> dict:
    """A bench run's ``settings.json`` (``--settings``), or a one-line error naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--settings {path}: no such file (a settings.json of lossguide bench)")
    try:
        settings = store.load(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--settings {path} is not valid JSON ({e}); pass the settings.json of a bench run") from None
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for k, v in settings.items() if k[:1] != "_"):
        raise ValueError(f"--settings {path} must be a mapping task → method → step value, as a bench run writes it")
    return settings


class BenchFolder(Folder):
    """A bench run's folder (:class:`~lossguide.runfolder.Folder`): ``config.json``, the shards and
    :data:`OUTPUTS`; ``--overwrite`` deletes that run's shards and outputs, leaving other files alone."""

    CONFIG = "config.json"
    WHAT, REPLACE = "bench run", "--overwrite (which deletes that run's shards and outputs)"

    def outputs(self) -> list[Path]:
        found = [self.path / name for name in OUTPUTS if (self.path / name).exists()]
        return found + sorted(p for g in OUTPUT_GLOBS for p in self.path.glob(g))

    def tmp_files(self) -> list[Path]:
        return list(self.path.rglob(".*.tmp")) if self.path.is_dir() else []


def config_text(cfg: BenchConfig) -> str:
    """``config.json`` of ``cfg`` (the folder's identity)."""
    return json.dumps(cfg.to_dict(), indent=2) + "\n"


def open_folder(cfg: BenchConfig, out: Path, ranks: Ranks, overwrite: bool = False) -> BenchFolder:
    """Rank 0 opens the run's folder (lock, cleanup, config check, ``overwrite``, config.json) while the other ranks
    wait at the barrier, so no shard is written before the folder is checked. Refuses to mix two configs."""
    folder = BenchFolder(out, overwrite)
    if ranks.rank == 0:
        folder.open(config_text(cfg))
    ranks.barrier()
    return folder
