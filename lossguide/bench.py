"""``lossguide bench``: every method on every task and budget, tuned fairly, evaluated on disjoint seeds.

Seeds are the unit of work. A *shard* is one (phase, task, method, step value, DDIM steps, seed chunk); its
per-sample records are written atomically to ``out/shards/...json`` (samples beside it), and a shard whose
file exists is never recomputed, so a run killed at any point (SIGKILL included) continues where it stopped
and ends with the same numbers. Shards are spread over processes by rank (``torchrun --nproc_per_node N``:
gloo on CPU, NCCL on GPUs); the ranks meet at a barrier after each tuning round and before the summary.

Tuning (TFG's multiplicative beam search, ``../shared/docs/method.md`` §2.6, in both directions): each method's
step parameter starts at its default, candidates multiply the ``width`` best values by ``factor^±1``, for
``rounds`` rounds, on tuning seeds (from 10,000, disjoint from the evaluation seeds 0..n−1). Objective: judge
validity (class tasks; ties by lower guide loss), PSNR to the reference (inverse problems), minus the sliced
W2 distance to the exact posterior (oracle).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path

import torch

from lossguide import losses, metrics, presets
from lossguide.augment import GaussianJitter
from lossguide.guidance import GuidanceConfig
from lossguide.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lossguide.samplers import DDIM
from lossguide.sampling import sample
from lossguide.steps import Polyak

log = logging.getLogger(__name__)

MNIST_TASKS = ("class", "class-feature", "sketch", "inpaint", "sr", "class+sketch")
CLASS_TASKS = ("class", "class-feature")  # target = seed mod 10
#: the tuner's quality ceiling on class tasks: FID ≤ this × the unguided model's FID on the tuning seeds
FID_CEILING = 1.5
ORACLE_TASKS = ("oracle-class", "oracle-linear")
TASKS = MNIST_TASKS + ORACLE_TASKS
METHODS = ("none", "dps", "freedom", "ugd", "lgd_mc", "mpgd", "tfg", "shen2024", "cg")
MODIFIERS = ("+ra", "+polyak", "+tt", "+lossgap", "-ra", "-polyak", "-tt")
TUNE_SEED0 = 10_000
#: default step parameter of each preset (start of the beam search); Polyak variants start at η
DEFAULT_PARAM = {
    "dps": ("scale", 1.0),
    "freedom": ("scale", 3.0),
    "ugd": ("scale", 1.0),
    "lgd_mc": ("scale", 1.0),
    "mpgd": ("scale", 1.0),
    "tfg": ("rho", 1.0),
    "shen2024": ("eta", 0.03),
    "cg": ("scale", 30.0),
}
ORACLE_DEFAULT_PARAM = {"dps": 0.03, "freedom": 0.01, "ugd": 0.03, "lgd_mc": 0.03, "mpgd": 0.01, "tfg": 0.003,
                        "shen2024": 0.3, "cg": 1.0}  # fmt: skip
POLYAK_ETA0 = 0.03
LOSSGAP_ETA0 = 0.1  # the classical gap η·ℓ/‖g‖² (+lossgap): dimensionless

# -- methods --------------------------------------------------------------------------------------------
def parse_method(spec: str) -> tuple[str, list[str]]:
    """``"freedom+polyak+ra"`` → ("freedom", ["+polyak", "+ra"]); ``-ra``/``-polyak``/``-tt`` switch a
    technique of ``shen2024`` off; ``+lossgap`` gives a Polyak step (``+polyak`` or shen2024's) the classical gap ℓ."""
    parts = re.split(r"(?=[+-])", spec)
    base, mods = parts[0], parts[1:]
    if base not in METHODS:
        raise ValueError(f"unknown method {base!r} in {spec!r}; choose one of {', '.join(METHODS)}")
    bad = [m for m in mods if m not in MODIFIERS]
    if bad:
        raise ValueError(f"unknown modifier {bad[0]!r} in {spec!r}; modifiers are {', '.join(MODIFIERS)}")
    if base == "none" and mods:
        raise ValueError("'none' takes no modifiers")
    return base, mods


def tuned_param(spec: str, oracle: bool = False) -> tuple[str, float] | None:
    """(name, start value) of the step parameter the tuner searches for ``spec``; None for ``none``."""
    base, mods = parse_method(spec)
    if base == "none":
        return None
    if "+lossgap" in mods and ("+polyak" in mods or (base == "shen2024" and "-polyak" not in mods)):
        return "eta", LOSSGAP_ETA0
    if "+polyak" in mods:
        return "eta", POLYAK_ETA0 if not oracle else ORACLE_DEFAULT_PARAM["shen2024"]
    if base == "shen2024" and "-polyak" in mods:
        return "scale", ORACLE_DEFAULT_PARAM["freedom"] if oracle else DEFAULT_PARAM["freedom"][1]
    name, v = DEFAULT_PARAM[base]
    return name, ORACLE_DEFAULT_PARAM[base] if oracle else v


def method_config(spec: str, value: float | None, oracle: bool = False) -> GuidanceConfig:
    """The guidance config of ``spec`` with its step parameter at ``value``."""
    base, mods = parse_method(spec)
    aug = GaussianJitter(0.05) if oracle else None  # None: the task's data supplies it (digits for MNIST)
    param = tuned_param(spec, oracle)
    kw: dict = {}
    if base == "shen2024":
        kw["augment"] = aug
        if "-polyak" in mods:
            kw["polyak"] = False
        if "-ra" in mods:
            kw["n_aug"] = 0
        if "-tt" in mods:
            kw["n_recur"] = 1
    elif any(m.startswith("-") for m in mods):
        raise ValueError(f"'-' modifiers switch techniques of shen2024 off; {spec!r} has none to switch off")
    if param and "+polyak" not in mods:
        kw[param[0]] = value
    if base == "tfg" and param:
        kw["mu"] = value
    cfg = presets.get(base, **kw)
    if "+polyak" in mods:
        cfg = presets.with_techniques(cfg, polyak=value)
    if "+ra" in mods:
        cfg = presets.with_techniques(cfg, n_aug=10, augment=aug)
    if "+tt" in mods:
        cfg = presets.with_techniques(cfg, n_recur=3, recur_window=(0.3, 0.8))
    if "+lossgap" in mods:
        rules = {k: getattr(cfg, k) for k in ("rho", "mu") if isinstance(getattr(cfg, k), Polyak)}
        if not rules:
            raise ValueError(f"+lossgap changes a Polyak step's gap; {spec!r} has none (add +polyak)")
        cfg = cfg.replace(**{k: dc_replace(r, gap="loss") for k, r in rules.items()})
    return cfg.replace(name=spec)


# -- tuning ---------------------------------------------------------------------------------------------
def _key(v: float) -> float:
    return float(f"{v:.6g}")


def beam_search(
    evaluate: Callable[[list[float]], list[float]],
    init: float,
    factor: float = 3.0,
    width: int = 2,
    rounds: int = 3,
    lo: float = 1e-6,
    hi: float = 1e6,
) -> tuple[float, list[dict]]:
    """Multiplicative beam search maximising ``evaluate`` over the grid init·factor^k: round 0 scores ``init``;
    each round scores the neighbours k ± 1 of the ``width`` best points so far (no point twice: points are
    keyed by the integer k, so 3·(1/3) is the same point as 1). ``evaluate`` takes a list of values and returns
    their scores, so a round can run in parallel. Returns (best value, trace)."""
    scores: dict[int, float] = {}
    trace: list[dict] = []

    def value(k: int) -> float:
        return _key(init * factor**k)

    frontier = [0]
    for r in range(rounds + 1):
        todo = [k for k in dict.fromkeys(frontier) if k not in scores and lo <= value(k) <= hi]
        if not todo:
            break
        for k, s in zip(todo, evaluate([value(k) for k in todo]), strict=True):
            scores[k] = s
            trace.append({"round": r, "value": value(k), "score": s})
        best = sorted(scores, key=lambda k: -scores[k])[:width]
        frontier = [k + d for k in best for d in (1, -1)]
    return value(max(scores, key=lambda k: scores[k])), trace


# -- tasks ----------------------------------------------------------------------------------------------
class MnistTask:
    """An MNIST task on the shipped models: class guidance (target = seed mod 10) or an inverse problem /
    combined loss on the held-out digit ``perm[seed mod 1000]`` (its class is the judge's target)."""

    oracle = False

    def __init__(self, kind: str, kit, norm: str = "squared"):
        self.kind, self.kit, self.norm = kind, kit, norm
        self.perm = torch.randperm(len(kit.real_x), generator=torch.Generator().manual_seed(0))
        self.shape = kit.model.sample_shape

    def reference(self, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.perm[torch.tensor([s % len(self.perm) for s in seeds])]
        return self.kit.real_x[idx], self.kit.real_y[idx].cpu()

    def targets(self, seeds) -> torch.Tensor:
        return torch.tensor([s % 10 for s in seeds]) if self.kind in CLASS_TASKS else self.reference(seeds)[1]

    def loss(self, seeds, noise_aware: bool = False):
        t = self.targets(seeds).tolist()
        if noise_aware:
            if self.kind not in CLASS_TASKS:
                raise ValueError("cg guides with the noise-aware classifier: it applies to the class tasks only")
            return self.kit.loss("noise-aware", t)
        if self.kind in CLASS_TASKS:
            return self.kit.loss("guide", t, "feature" if self.kind == "class-feature" else "ce")
        ref, _ = self.reference(seeds)
        if self.kind == "sketch":
            return losses.SketchLoss(ref, norm=self.norm)
        if self.kind == "inpaint":
            mask = torch.ones_like(ref[:1])
            mask[..., ref.shape[-2] // 2 :, :] = 0  # the lower half is unknown
            return losses.InpaintLoss(ref, mask, norm=self.norm)
        if self.kind == "sr":
            return losses.SuperResLoss(ref, factor=4, norm=self.norm)
        return losses.WeightedSum([(1.0, self.kit.loss("guide", t)), (0.1, losses.SketchLoss(ref))])

    def denoiser(self):
        return self.kit.model.denoiser

    @property
    def augment(self):
        return self.kit.model.augment

    @torch.no_grad()
    def records(self, x: torch.Tensor, seeds) -> list[dict]:
        y = self.targets(seeds)
        probs = metrics.classify(self.kit.nets["judge"], x)
        feats = metrics.features(self.kit.nets["judge"], x)
        task_loss = self.loss(seeds)(x)
        out = []
        ref = self.reference(seeds)[0] if self.kind not in CLASS_TASKS else None
        noise = metrics.noise_like(x, self.kit.real_x)
        psnr = metrics.psnr(x, ref) if ref is not None else None
        ssim = metrics.ssim(x, ref) if ref is not None else None
        for k, s in enumerate(seeds):
            r = {"seed": s, "target": int(y[k]), "judge_label": int(probs[k].argmax()), "noise_like": bool(noise[k]),
                 "guide_loss": float(task_loss[k]), "features": [round(float(f), 6) for f in feats[k]]}  # fmt: skip
            if ref is not None:
                r.update(psnr=float(psnr[k]), ssim=float(ssim[k]))
            out.append(r)
        return out

    def summary(self, recs: list[dict]) -> dict:
        n = len(recs)
        valid = [r["judge_label"] == r["target"] for r in recs]
        out = {"n": n, "judge_validity": sum(valid) / n, "guide_loss": sum(r["guide_loss"] for r in recs) / n}
        out["judge_validity_ci"] = list(metrics.wilson_interval(sum(valid), n))
        out["noise_like"] = sum(r.get("noise_like", False) for r in recs) / n
        per_class = {}
        for c in range(10):
            v = [ok for ok, r in zip(valid, recs, strict=True) if r["target"] == c]
            if v:
                per_class[c] = sum(v) / len(v)
        out["worst_class_validity"] = min(per_class.values())
        out["per_class_validity"] = per_class
        if "psnr" in recs[0]:
            out["psnr"] = sum(r["psnr"] for r in recs) / n
            out["ssim"] = sum(r["ssim"] for r in recs) / n
        if n >= 2:
            f = torch.tensor([r["features"] for r in recs])
            out["fid"] = metrics.frechet_distance(f, self.kit.real_features())
            if n >= 50:
                out["fid_ci"] = list(metrics.bootstrap_fid_interval(f, self.kit.real_features()))
            kid, kid_std = metrics.kernel_inception_distance(f, self.kit.real_features(), n_subsets=50)
            out["kid_x1e3"], out["kid_std_x1e3"] = 1e3 * kid, 1e3 * kid_std
        return out

    def objective(self, summary: dict, fid_ceiling: float | None = None) -> float:
        """PSNR for inverse problems; judge validity otherwise, minus 1 when FID exceeds ``fid_ceiling`` (the
        quality bound: 1.5× the unguided FID on the same seeds) and minus the noise-like share."""
        if "psnr" in summary and self.kind != "class+sketch":
            return summary["psnr"]
        over = fid_ceiling is not None and summary.get("fid", 0.0) > fid_ceiling
        return summary["judge_validity"] - summary.get("noise_like", 0.0) - float(over) - 1e-3 * summary["guide_loss"]


class OracleTaskAdapter:
    """An oracle task: the exact mixture denoiser, the task's loss, and the exact posterior to score against."""

    oracle = True

    def __init__(self, kind: str):
        from lossguide import oracle_bench
        from lossguide.schedule import NoiseSchedule

        self.kind = kind
        self.schedule = NoiseSchedule.linear()
        tasks = {t.name.split("-")[0]: t for t in oracle_bench.oracle_tasks(self.schedule)}
        self.task = tasks[kind.split("-")[1]]
        self.posterior_x = oracle_bench._posterior_samples(self.task)
        self.shape = (self.task.prior.dim,)

    def loss(self, seeds, noise_aware: bool = False):
        return self.task.noisy_loss if noise_aware else self.task.loss

    def denoiser(self):
        return self.task.prior.denoiser(self.schedule)

    augment = GaussianJitter(0.05)

    def records(self, x: torch.Tensor, seeds) -> list[dict]:
        L = self.task.loss(x)
        lab = self.task.prior.component_log_posterior(x, 1.0).argmax(1)
        return [{"seed": s, "x": [float(v) for v in x[k]], "guide_loss": float(L[k]), "label": int(lab[k])}
                for k, s in enumerate(seeds)]  # fmt: skip

    def summary(self, recs: list[dict]) -> dict:
        x = torch.tensor([r["x"] for r in recs], dtype=torch.float64)
        finite = torch.isfinite(x).all(1)
        out = {"n": len(recs), "guide_loss": sum(r["guide_loss"] for r in recs) / len(recs),
               "sw_to_posterior": metrics.sliced_wasserstein(x[finite], self.posterior_x) if finite.all()
               else float("inf")}  # fmt: skip
        if self.task.name.startswith("class-"):
            target = int(self.task.name.split("-")[1])
            out["validity"] = sum(r["label"] == target for r in recs) / len(recs)
        return out

    def objective(self, summary: dict, fid_ceiling: float | None = None) -> float:
        return -summary["sw_to_posterior"]


# -- config, ranks, shards ------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """A benchmark grid; everything that changes the numbers (written to ``config.json``)."""

    tasks: list[str] = field(default_factory=lambda: ["class"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: list[int] = field(default_factory=lambda: [50])
    n_eval: int = 100
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
    norm: str = "squared"  # sketch/inpaint/sr residual: ‖r‖² or ‖r‖ ("l2", the paper's code)

    def validate(self) -> None:
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
        for m in self.methods:
            method_config(m, 1.0)
        if min(self.steps) < 1 or self.n_eval < 1 or self.batch < 1 or self.best_of < 1:
            raise ValueError("--steps, --n-eval, --batch and --best-of must be ≥ 1")

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

    def path(self, out: Path) -> Path:
        v = "default" if self.value is None else f"{self.value:.6g}"
        name = f"{self.seeds[0]:06d}-{self.seeds[-1]:06d}"
        return out / "shards" / self.phase / self.task / self.method.replace("+", "_") / f"v{v}" / f"s{self.steps}" / (
            name + ".json")  # fmt: skip


def _peak_mem_mb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak so far


class Bench:
    """Runs a :class:`BenchConfig` into a folder; see the module docstring."""

    def __init__(self, cfg: BenchConfig, out: Path):
        cfg.validate()
        self.cfg, self.out = cfg, Path(out)
        self.ranks = Ranks(cfg.device)
        self._tasks: dict = {}
        self._kit = None

    # -- tasks
    def task(self, name: str):
        if name not in self._tasks:
            if name in ORACLE_TASKS:
                self._tasks[name] = OracleTaskAdapter(name)
            else:
                if self._kit is None:
                    from lossguide.experiments.mnist import MnistKit

                    self._kit = MnistKit(self.cfg.device)
                self._tasks[name] = MnistTask(name, self._kit, self.cfg.norm)
        return self._tasks[name]

    def applicable(self, task: str, method: str) -> bool:
        return parse_method(method)[0] != "cg" or task in (*CLASS_TASKS, *ORACLE_TASKS)

    # -- one shard
    def run_shard(self, sh: Shard) -> dict:
        """Sample and record one shard (or read it when its file exists)."""
        path = sh.path(self.out)
        if path.exists():
            return json.loads(path.read_text())
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
        t0 = time.perf_counter()
        res = sample(
            denoiser,
            DDIM(denoiser.schedule, sh.steps, eta=self.cfg.ddim_eta),
            cfg,
            task.loss([s for s in seeds for _ in range(n_cand)], cfg.loss_input == "x_t") if cfg.enabled else None,
            shape=task.shape,
            seeds=cand_seeds,
            dtype=dtype,
            device=device,
            augment=task.augment,
        )
        wall = time.perf_counter() - t0
        x = res.x0 if task.oracle else res.x0.clamp(-1, 1)
        if n_cand > 1:  # best-of-N: the candidate with the lowest guide loss; NFE counts every candidate
            with torch.no_grad():
                L = task.loss([s for s in seeds for _ in range(n_cand)])(x).view(len(seeds), n_cand)
            x = x.view(len(seeds), n_cand, *x.shape[1:])[torch.arange(len(seeds)), L.argmin(1)]
        rec = {
            "shard": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(sh).items()},
            "config": cfg.to_dict(),
            "nfe_per_sample": res.stats.nfe * n_cand,
            "denoiser_grads_per_sample": res.stats.denoiser_grads * n_cand,
            "loss_grads_per_sample": res.stats.loss_grads * n_cand,
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
            if not sh.path(self.out).exists():
                log.info("shard %s", sh)
                self.run_shard(sh)
        self.ranks.barrier()
        return [json.loads(sh.path(self.out).read_text()) for sh in shards]

    def shards(self, phase, task, method, value, steps, seeds) -> list[Shard]:
        b = self.cfg.batch
        return [Shard(phase, task, method, value, steps, tuple(seeds[i : i + b])) for i in range(0, len(seeds), b)]

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
    def tune(self) -> dict:
        """Beam-search each (task, method)'s step parameter; writes ``tuning.json`` and ``settings.json``."""
        cfg = self.cfg
        if cfg.settings_file is not None:
            path = Path(cfg.settings_file)
            if not path.is_file():
                raise FileNotFoundError(f"--settings {path}: no such file (a settings.json of lossguide bench)")
            settings = json.loads(path.read_text())
            missing = [(t, m) for t in cfg.tasks for m in cfg.methods if tuned_param(m, t in ORACLE_TASKS)
                       and self.applicable(t, m) and m not in settings.get(t, {})]  # fmt: skip
            if missing:
                raise ValueError(f"--settings {path} has no step parameter for {missing[0][1]!r} on {missing[0][0]!r}")
            return settings
        settings: dict = {}
        trace: list[dict] = []
        seeds = list(range(TUNE_SEED0, TUNE_SEED0 + cfg.n_tune))
        for task in cfg.tasks:
            oracle = task in ORACLE_TASKS
            ceiling = None
            if task in CLASS_TASKS and cfg.tune:  # the quality bound from the unguided model on the tuning seeds
                none = self.cell(self.run_shards(self.shards("tune", task, "none", None, cfg.tune_steps, seeds)), task)
                ceiling = FID_CEILING * none["fid"]
                settings.setdefault("_fid_ceiling", {})[task] = ceiling
            for method in cfg.methods:
                p = tuned_param(method, oracle)
                if p is None or not self.applicable(task, method):
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
        seeds = list(range(cfg.n_eval))
        cells, shards = [], []
        for task in cfg.tasks:
            for method in cfg.methods:
                if not self.applicable(task, method):
                    continue
                v = settings.get(task, {}).get(method)
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


# -- outputs --------------------------------------------------------------------------------------------
TIMING_KEYS = ("wall_s_per_sample", "peak_mem_mb")
TABLE_COLS = {
    "mnist": ["method", "steps", "param", "judge_validity", "worst_class_validity", "guide_loss", "fid", "kid_x1e3",
              "nfe", "denoiser_grads", "wall_s_per_sample"],
    "inverse": ["method", "steps", "param", "psnr", "ssim", "judge_validity", "guide_loss", "kid_x1e3", "nfe",
                "denoiser_grads", "wall_s_per_sample"],
    "oracle": ["method", "steps", "param", "sw_to_posterior", "validity", "nfe", "denoiser_grads",
               "wall_s_per_sample"],
}  # fmt: skip


def _table_kind(task: str) -> str:
    return "oracle" if task in ORACLE_TASKS else ("inverse" if task in ("sketch", "inpaint", "sr") else "mnist")


def write_outputs(bench: Bench, rows: list[dict], settings: dict) -> None:
    """results.csv/json, tables.md, Pareto plots and sample grids."""
    from lossguide.experiments.report import md_table, pyplot, save_fig, write_csv

    out, cfg = bench.out, bench.cfg
    flat = [{k: v for k, v in r.items() if k != "per_class_validity"} for r in rows]
    write_csv(out / "results.csv", flat)
    atomic_write_json(out / "results.json", {"config": asdict(cfg), "settings": settings, "rows": rows})
    lines = ["# lossguide bench", "", f"Config: `{json.dumps(asdict(cfg))}`", "",
             f"Evaluation seeds 0–{cfg.n_eval - 1}; tuning seeds {TUNE_SEED0}–{TUNE_SEED0 + cfg.n_tune - 1}; "
             "NFE and gradients are per sample (best-of-N counts every candidate).", ""]  # fmt: skip
    for task in cfg.tasks:
        tr = [r for r in rows if r["task"] == task]
        if not tr:
            continue
        key = "sw_to_posterior" if task in ORACLE_TASKS else ("psnr" if _table_kind(task) == "inverse" else None)
        if key == "sw_to_posterior":
            tr = sorted(tr, key=lambda r: (r["steps"], r[key]))
        elif key:
            tr = sorted(tr, key=lambda r: (r["steps"], -r[key]))
        else:
            tr = sorted(tr, key=lambda r: (r["steps"], -r["judge_validity"], r.get("fid", 0)))
        lines += [f"## {task}", "", md_table(tr, TABLE_COLS[_table_kind(task)]), ""]
    atomic_write_text(out / "tables.md", "\n".join(lines))
    plt = pyplot()
    for task in [t for t in cfg.tasks if t not in ORACLE_TASKS]:
        tr = [r for r in rows if r["task"] == task and "fid" in r]
        if not tr:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, xkey, xlabel in ((axes[0], "fid", "FID (judge features) ↓"),
                                 (axes[1], "wall_s_per_sample", "wall s / sample ↓")):  # fmt: skip
            pts = [(r[xkey], r["judge_validity"], f"{r['method']}@{r['steps']}") for r in tr]
            for x, y, lab in pts:
                ax.scatter(x, y, s=14)
                ax.annotate(lab, (x, y), fontsize=6)
            front = sorted(p for p in pts if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in pts))
            ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("judge validity ↑")
            ax.legend(fontsize=7)
        fig.suptitle(f"{task}")
        save_fig(fig, out / f"pareto_{task.replace('+', '_')}.png")
        _sample_grid(bench, task, settings, out / f"samples_{task.replace('+', '_')}.png")


def _sample_grid(bench: Bench, task: str, settings: dict, path: Path, per_method: int = 10) -> None:
    """One row of the first evaluation samples per (method, steps)."""
    from lossguide.experiments.report import pyplot, save_fig

    cfg = bench.cfg
    rows = []
    for method in cfg.methods:
        if not bench.applicable(task, method):
            continue
        v = settings.get(task, {}).get(method)
        for steps in cfg.steps:
            sh = bench.shards("eval", task, method, v, steps, list(range(cfg.n_eval)))[0]
            pt = sh.path(bench.out).with_suffix(".pt")
            if pt.exists():
                rows.append((f"{method}@{steps}", torch.load(pt)[:per_method]))
    if not rows:
        return
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), per_method, figsize=(per_method * 0.8, len(rows) * 0.85), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(per_method):
            ax = axes[r, c]
            if c < len(imgs):
                ax.imshow(imgs[c, 0].numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    save_fig(fig, path)


def check_config(cfg: BenchConfig, out: Path, overwrite: bool = False) -> None:
    """Refuse to mix two configs in one folder (shards would be reused across them)."""
    f = Path(out) / "config.json"
    text = json.dumps(asdict(cfg), indent=2) + "\n"
    if f.exists() and f.read_text() != text and not overwrite:
        raise ValueError(f"{out} holds a bench run with a different config; pass another --out, or --overwrite")
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(f, text)


def comparable(rows: Sequence[dict]) -> list[dict]:
    """Rows without timing and memory (what a resumed or sharded run must reproduce exactly)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
