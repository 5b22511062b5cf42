"""The main job, ``lossguide sample``: guided samples from the default MNIST model, written to a run folder.

The folder (:class:`~lossguide.runfolder.RunFolder`) holds one PNG per seed (``{seed:06d}.png``), ``grid.png``,
the resolved ``config.yaml`` and ``metrics.json``; every file is written atomically. Seeds are the unit of work:
a per-seed record is written after each batch, and rerunning the same command skips the seeds already done.
Every batch has ``--batch`` rows (a short one is padded), so a seed's numbers depend on ``--batch`` but never on
which seeds share its batch: a resumed run equals an uninterrupted one, and seed k alone equals seed k among others.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from lossguide.guidance import GuidanceEngine, check_window, resolve_augment
from lossguide.harness.methods import method_config, parse_method
from lossguide.harness.tasks import MNIST_TASKS, NORM_TASKS
from lossguide.harness.tasks.mnist import MNIST_SHAPE, TargetTask
from lossguide.losses import NORMS
from lossguide.runfolder import RunFolder, fixed_batches, grid, png_bytes, seeds_from, to_uint8
from lossguide.samplers import DDIM
from lossguide.sampling import sample
from lossguide.smc import PARTICLE_METHODS, POTENTIALS, check_sampler, particle_method, smc

log = logging.getLogger(__name__)

MNIST_METRICS = ("judge_validity", "guide_validity", "mean_guide_loss", "mean_judge_confidence", "noise_like")


@dataclass
class SampleConfig:
    """Everything ``lossguide sample`` does, as named parameters (written to ``config.yaml``)."""

    model: str = "mnist-ddpm"
    guide: str = "mnist-guide"
    judge: str = "mnist-judge"
    loss: str = "class-feature"
    norm: str = "squared"  # residual losses (sketch, inpaint, sr): ‖r‖² or ‖r‖ ("l2", the paper's code)
    target: int = 3
    reference: int = 0  # index into the held-out split's digits of class `target` (sketch/inpaint/sr)
    method: str = "shen2024"
    params: dict = field(default_factory=dict)
    steps: int = 50
    ddim_eta: float = 0.0
    seeds: list[int] = field(default_factory=lambda: list(range(16)))
    batch: int = 16
    device: str = "cpu"
    dtype: str = "float32"  # of the models and the sampler state: float64 makes a seed's numbers batch-size-free
    particles: int | None = None  # K weighted particles per seed (lossguide.smc), the method as their proposal
    potential: str | None = None  # the particles' potential (smc.POTENTIALS; None: tds, or a particle method's own)

    def resolved_params(self) -> dict:
        """The preset's parameters as given (its defaults fill the rest and are written to config.yaml)."""
        return dict(self.params)


def parse_params(items: list[str]) -> dict:
    """``["eta=0.5", "n_aug=10", "recur_window=0.3,0.8"]`` → typed values."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        vals = [_num(x) for x in v.split(",")]
        if k.strip() in out:
            raise ValueError(f"--set {k.strip()} given twice; keep one")
        out[k.strip()] = tuple(vals) if len(vals) > 1 else vals[0]
    return out


def _num(s: str):
    s = s.strip()
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(s.lower(), s)


def _config_yaml(cfg: SampleConfig, guidance_dict: dict) -> str:
    import yaml

    d = asdict(cfg)
    if cfg.particles is None:  # a single-particle run writes the config.yaml it always wrote
        del d["particles"], d["potential"]
    d["params"] = cfg.resolved_params()
    d["guidance"] = guidance_dict
    return yaml.safe_dump(json.loads(json.dumps(d, default=list)), sort_keys=False)


#: SampleConfig fields that no recipe has: a file with one of them is a sample config (whatever its other keys)
SAMPLE_ONLY = ("guide", "judge", "norm", "target", "reference", "steps", "ddim_eta")
DTYPES = ("float32", "float64")


def is_sample_config(d) -> bool:
    """``d`` (a parsed YAML file) is a ``lossguide sample`` config: SampleConfig fields (plus the ``guidance``
    block of a written ``config.yaml``), not a recipe, whose ``model`` is a mapping with a ``kind``. A key only a
    sample config has (:data:`SAMPLE_ONLY`) makes it one, so a misspelt key is reported as such."""
    if not isinstance(d, dict) or not d or isinstance(d.get("model"), dict):
        return False
    return "guidance" in d or set(d) <= {f.name for f in fields(SampleConfig)} or bool(set(d) & set(SAMPLE_ONLY))


def config_from_yaml(d: dict, source) -> SampleConfig:
    """The :class:`SampleConfig` of a parsed ``config.yaml`` that ``lossguide sample`` wrote (or its fields)."""
    names = [f.name for f in fields(SampleConfig)]
    bad = set(d) - set(names) - {"guidance"}
    if bad:
        raise ValueError(f"{source}: unknown keys {sorted(bad)} in a lossguide sample config; allowed: {names}")
    kw = {k: d[k] for k in names if k in d}
    if "guidance" in d and d["guidance"] is not None and not isinstance(d["guidance"], dict):
        raise ValueError(f"{source}: the guidance block must be a mapping (as a lossguide sample run writes it), got "
                         f"{d['guidance']!r}; delete it to run method and params as they are")  # fmt: skip
    params = kw.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{source}: params must be a mapping of preset parameters, got {params!r}")
    kw["params"] = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    kw["seeds"] = seeds_from(kw.get("seeds", SampleConfig().seeds))  # the same checks as --seeds
    return SampleConfig(**kw)


def check_config(cfg: SampleConfig) -> None:
    """One-line errors naming the flag (the config key) where a field has the wrong type or range, or is a flag
    the chosen loss would ignore (--norm, --reference), before anything is loaded or written."""
    import math

    def fail(flag: str, need: str, v) -> None:
        raise ValueError(f"{flag} must be {need}, got {v!r} ({type(v).__name__})")

    for name in ("model", "guide", "judge", "loss", "norm", "method", "device", "dtype"):
        v = getattr(cfg, name)
        if not isinstance(v, str):
            fail(f"--{name}", "a string", v)
    for name, lo in (("target", 0), ("reference", 0), ("steps", 1), ("batch", 1)):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int):
            fail(f"--{name}", "an integer", v)
        if name != "target" and v < lo:
            raise ValueError(f"--{name} must be ≥ {lo}, got {v}")
    eta = cfg.ddim_eta
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta >= 0):
        fail("--ddim-eta", "a finite number ≥ 0 (0 deterministic, 1 DDPM-like)", eta)
    if not isinstance(cfg.params, dict):
        fail("params", "a mapping of preset parameters (--set KEY=VALUE)", cfg.params)
    seeds = cfg.seeds
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__"):
        fail("--seeds", "a list of seeds (parse a spec such as '0-15' with lossguide.runfolder.parse_seeds)", seeds)
    if not len(seeds):
        raise ValueError("--seeds must name at least one seed, got []")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad or len(set(seeds)) != len(seeds):
        what = f"bad seed {bad[0]!r}" if bad else "a seed named twice"
        raise ValueError(f"--seeds must be distinct integers ≥ 0 ({what}); e.g. 0-15 or 0-7,100")
    _check_particles(cfg)
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if cfg.loss not in MNIST_TASKS:
        raise ValueError(f"unknown loss {cfg.loss!r}; choose one of {', '.join(MNIST_TASKS)}")
    if cfg.norm not in NORMS:
        raise ValueError(f"--norm must be one of {', '.join(NORMS)}, got {cfg.norm!r}")
    if not 0 <= cfg.target <= 9:
        raise ValueError(f"--target must be a digit class 0..9, got {cfg.target}")
    if cfg.loss not in NORM_TASKS:
        uses = f"only {', '.join(NORM_TASKS)} use it"
        if cfg.norm != SampleConfig.norm:
            raise ValueError(f"--norm {cfg.norm} sets the residual of a reference loss, and --loss {cfg.loss} has "
                             f"none ({uses}); drop --norm")  # fmt: skip
        if cfg.reference != SampleConfig.reference:
            raise ValueError(f"--reference {cfg.reference} picks a held-out digit that --loss {cfg.loss} does not "
                             f"use ({uses}); drop --reference")  # fmt: skip


def _check_particles(cfg: SampleConfig) -> None:
    """--particles, --potential and the particle methods (tds, fk): one-line errors naming the fix."""
    K = cfg.particles
    if K is not None and (isinstance(K, bool) or not isinstance(K, int) or K < 1):
        raise ValueError(f"--particles must be an integer ≥ 1, got {K!r}")
    if cfg.potential is not None and cfg.potential not in POTENTIALS:
        raise ValueError(f"--potential must be one of {', '.join(POTENTIALS)}, got {cfg.potential!r}")
    if cfg.method in PARTICLE_METHODS and K is None:
        raise ValueError(f"--method {cfg.method} is a particle method (lossguide.smc): add --particles K, e.g. 16")
    if K is None:
        if cfg.potential is not None:
            raise ValueError(f"--potential {cfg.potential} weighs particles: add --particles K, or drop it")
        return
    own = PARTICLE_METHODS.get(cfg.method, {}).get("potential")
    if own is not None and cfg.potential not in (None, own):
        raise ValueError(f"--method {cfg.method} brings its own potential ({own}); drop --potential, or use "
                         f"--method none with --potential {cfg.potential}")  # fmt: skip
    if not cfg.ddim_eta > 0:
        raise ValueError(f"--particles weighs each step by its Gaussian density, but DDIM η = {cfg.ddim_eta:g} is "
                         "deterministic; add --ddim-eta 1")  # fmt: skip


def _guidance(cfg: SampleConfig):
    """(the method's guidance config, the particles' potential or None): a method spec such as freedom+polyak, or a
    particle method of :data:`lossguide.smc.PARTICLE_METHODS` (its proposal and potential)."""
    if cfg.method in PARTICLE_METHODS:
        m = particle_method(cfg.method, **cfg.resolved_params())
        return m.guidance, m.potential
    guidance = method_config(cfg.method, **cfg.resolved_params())  # a preset or a spec such as freedom+polyak
    return guidance, (None if cfg.particles is None else POTENTIALS[cfg.potential or "tds"]())


def _plain(d):
    return json.loads(json.dumps(d, default=list))


def run(
    cfg: SampleConfig, out: Path, progress: bool = True, overwrite: bool = False, expect_guidance: dict | None = None
) -> dict:
    """Sample ``cfg.seeds`` into ``out`` (resuming finished seeds) and return the aggregate metrics.

    Everything (parameters, models, loss, sampler) is built and checked before anything is written.
    ``expect_guidance`` (the ``guidance`` block of a ``config.yaml`` being re-run) must be what ``cfg`` builds."""
    from lossguide.models import load_denoiser

    check_config(cfg)
    guidance, potential = _guidance(cfg)
    base = cfg.method if cfg.method in PARTICLE_METHODS else parse_method(cfg.method)[0]
    dtype = getattr(torch, cfg.dtype)
    model = load_denoiser(cfg.model, device=cfg.device, dtype=dtype)
    T = getattr(model.denoiser.schedule, "num_train_timesteps", None)
    if T is not None and cfg.steps > T:
        raise ValueError(f"--steps {cfg.steps} exceeds the {T} training timesteps of --model {cfg.model}; use "
                         f"--steps 1..{T}")  # fmt: skip
    guidance = resolve_augment(guidance, model.augment)
    if expect_guidance is not None and _plain(expect_guidance) != _plain(guidance.to_dict()):
        now, was = _plain(guidance.to_dict()), _plain(expect_guidance)
        diff = sorted(k for k in set(now) | set(was) if now.get(k) != was.get(k))
        raise ValueError(
            f"the config's guidance block differs in {diff} from what method {cfg.method!r} with params "
            f"{cfg.resolved_params()} builds in this lossguide version, so the run cannot be repeated exactly; "
            "delete the guidance block to run method and params as they are now"
        )
    shape = tuple(model.sample_shape)
    if shape != MNIST_SHAPE:  # the MNIST guide, judge and reference digits cannot apply
        if base != "none":
            raise ValueError(
                f"--model {cfg.model} makes samples of shape {shape}, but --loss {cfg.loss} needs the MNIST guide or "
                f"reference digits of shape {MNIST_SHAPE}; use --method none for unguided samples from it, or a "
                "recipe (lossguide sample --config recipes/...) for a loss that fits it"
            )
        log.warning(
            "--model %s makes samples of shape %s, not MNIST digits: no guide or judge metrics (%s) are computed; "
            "metrics.json lists them under not_applicable", cfg.model, shape, ", ".join(MNIST_METRICS),
        )  # fmt: skip
        sampler = DDIM(model.denoiser.schedule, cfg.steps, eta=cfg.ddim_eta)
        check_window(guidance, sampler)
        with RunFolder(out, overwrite=overwrite).open(_config_yaml(cfg, guidance.to_dict())) as folder:
            _sample_seeds(cfg, folder, model, sampler, guidance, None, None, progress)
            return finalize(cfg, folder)
    task = TargetTask(cfg.loss, cfg.target, cfg.reference, cfg.guide, cfg.judge, cfg.norm, cfg.device, dtype)
    loss = task.method_loss(guidance, cfg.method, model.denoiser.schedule, particles=potential is not None)
    sampler = DDIM(model.denoiser.schedule, cfg.steps, eta=cfg.ddim_eta)
    check_window(guidance, sampler)  # a window without a guided step fails before the first write
    if potential is not None:
        check_sampler(GuidanceEngine(guidance, loss), sampler)  # time travel, cg: refused before the first write

    config_text = _config_yaml(cfg, guidance.to_dict())
    with RunFolder(out, overwrite=overwrite).open(config_text) as folder:  # the first write
        _sample_seeds(cfg, folder, model, sampler, guidance, loss, task, progress, potential)
        return finalize(cfg, folder)


def _sample_seeds(cfg, folder, model, sampler, guidance, loss, task, progress, potential=None):
    """The seeds not done yet, in batches of exactly ``cfg.batch`` rows; each seed's PNG and record (the MNIST
    ``task``'s judge record where there is one). With ``potential``, each seed is the drawn particle of
    ``cfg.particles`` (:func:`~lossguide.smc.smc`)."""
    did_nothing = []  # per batch: every guided step of every sample had a zero gradient
    for seeds, n in fixed_batches(folder.todo(cfg.seeds), cfg.batch):
        if n < len(seeds):
            log.info("padding %d seeds to a batch of --batch %d rows (the padding is dropped)", n, len(seeds))
        t0 = time.perf_counter()
        kw = {"shape": model.sample_shape, "seeds": seeds, "device": cfg.device, "dtype": getattr(torch, cfg.dtype)}
        if potential is None:
            res = sample(model.denoiser, sampler, guidance, loss, progress=progress, **kw)
        else:
            res = smc(model.denoiser, sampler, guidance, loss, particles=cfg.particles, potential=potential, **kw)
        K = cfg.particles or 1
        wall = time.perf_counter() - t0
        x = res.x0.clamp(-1, 1)
        if res.stats.loss_grads:
            did_nothing.append(bool((res.stats.zero_grad[:n] == res.stats.loss_grads).all()))
        scores = task.records(x) if task is not None else None  # the whole batch: batch-invariant numbers
        for k, s in enumerate(seeds[:n]):
            rec = {"seed": s}
            if scores is not None:
                rec.update({key: v for key, v in scores[k].items() if key != "noise_like"})
            rec.update({
                "skipped_steps": int(res.stats.skipped[k]),
                "zero_grad_steps": int(res.stats.zero_grad[k]),
                "overflow_steps": int(res.stats.overflow[k]),
                **({"noise_like": scores[k]["noise_like"]} if scores is not None else {}),
                "nfe": res.stats.nfe * K,  # a seed's cost: K particles
                "denoiser_grads": res.stats.denoiser_grads * K,
                **({"particles": K, "final_ess": float(res.stats.ess[-1][k])} if potential is not None else {}),
                "wall_s_per_sample": wall / n,  # the padding's time included: it is what the seeds cost
            })  # fmt: skip
            folder.write_seed(s, png_bytes(to_uint8(x[k])), rec)
    if did_nothing and all(did_nothing):
        log.warning(
            "method %s did nothing: every guided step of every sample had a zero gradient of --loss %s, so these are "
            "unguided samples; check that the loss depends on the sample, or use --set polyak_gap=loss with a "
            "saturating loss", cfg.method, cfg.loss,
        )  # fmt: skip


def finalize(cfg: SampleConfig, out: Path | RunFolder) -> dict:
    """Aggregate the per-seed records into ``metrics.json`` and draw ``grid.png``."""
    folder = out if isinstance(out, RunFolder) else RunFolder(out)
    recs = folder.read_records(cfg.seeds)
    n = len(recs)
    metrics = {"n_samples": n, "target": cfg.target, "method": cfg.method}
    if all("judge_label" in r for r in recs):
        metrics.update({
            "judge_validity": sum(r["judge_label"] == cfg.target for r in recs) / n,
            "guide_validity": sum(r["guide_label"] == cfg.target for r in recs) / n,
            "mean_guide_loss": sum(r["guide_loss"] for r in recs) / n,
            "mean_judge_confidence": sum(r["judge_confidence"] for r in recs) / n,
        })  # fmt: skip
    else:
        metrics["not_applicable"] = {
            "metrics": list(MNIST_METRICS),
            "reason": f"the model's samples are not MNIST digits of shape {MNIST_SHAPE}, so the MNIST guide and "
            "judge do not apply",
        }
    metrics.update({
        "nfe": recs[0]["nfe"],
        "denoiser_grads": recs[0]["denoiser_grads"],
        "wall_s_per_sample": sum(r["wall_s_per_sample"] for r in recs) / n,
        "skipped_steps": sum(r["skipped_steps"] for r in recs),
        "zero_grad_steps": sum(r.get("zero_grad_steps", 0) for r in recs),
        "overflow_steps": sum(r.get("overflow_steps", 0) for r in recs),
    })  # fmt: skip
    if "not_applicable" not in metrics:
        metrics["noise_like"] = sum(r.get("noise_like", False) for r in recs) / n
    metrics["per_sample"] = recs
    folder.write_bytes("grid.png", png_bytes(grid([folder.read_png(s) for s in cfg.seeds])))
    folder.write_json("metrics.json", metrics)
    return metrics
