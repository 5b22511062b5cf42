"""The sampling loop: x_T ~ N(0, k_T²I), then guided steps with time travel (Shen et al. 2024, Alg. 3).

k_T = √(α_T² + σ_T²) is 1 on VP and rectified flow (t = 1) and √(1 + σ_max²) on VE (:mod:`lossguide.schedule`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lossguide.denoiser import Denoiser
from lossguide.guidance import GuidanceConfig, GuidanceEngine, GuidanceStats, check_window
from lossguide.rng import check_generators, make_generators, randn
from lossguide.samplers import Sampler
from lossguide.schedule import mismatch

log = logging.getLogger(__name__)

#: per family, the samplers that can repeat a step (time travel): those without a multistep history
TIME_TRAVEL_SAMPLERS = {
    "vp": "lossguide.DDIM or DDPM",
    "flow": "lossguide.FlowEuler or DDIM on the FlowSchedule",
    "ve": "lossguide.EDMEuler or DDIM on the SigmaSchedule",
}


@dataclass
class SampleResult:
    """Final samples x0 ``[B, ...]`` and the run's counters."""

    x0: torch.Tensor
    stats: GuidanceStats


def sample(
    denoiser: Denoiser,
    sampler: Sampler,
    guidance: GuidanceConfig | None = None,
    loss: Callable | None = None,
    *,
    shape: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    x_T: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    augment: Callable | None = None,
) -> SampleResult:
    """Draw guided samples.

    Args:
        denoiser: the model (:mod:`lossguide.denoiser`).
        sampler: DDIM, DDPM or a diffusers scheduler (:mod:`lossguide.samplers`).
        guidance: a config from :mod:`lossguide.presets` (None: unguided).
        loss: per-sample loss ``loss(x0) -> [B]`` (``loss(x_t, t)`` for noise-aware guidance).
        shape: per-sample shape, e.g. ``(1, 28, 28)``; not needed when ``x_T`` is given.
        seeds / generators: one per sample; every random draw of sample k uses only its generator.
        x_T: initial noise; drawn from the generators when None, as k_T·z with k_T = ``sampler.scales(0)[0]``
            (1 on VP and flow, √(1 + σ_max²) on VE).
        progress: show a tqdm bar with the mean guidance loss.
        callback: called after every step with ``{"i", "t", "x", "stats"}``.
        augment: the data's augmentation, used where ``guidance`` asks for copies (``n_aug > 0``) and
            names none (presets never pick one: e.g. ``LoadedDenoiser.augment``).

    Logs one warning at the end where guidance did nothing (zero gradient), skipped steps or overflowed
    (:func:`guidance_summary` of :class:`~lossguide.guidance.GuidanceStats`).
    """
    engine = GuidanceEngine(guidance, loss, augment=augment)
    check_window(engine.config, sampler)
    why = mismatch(denoiser.schedule, sampler.schedule)
    if why:
        raise ValueError(f"{why}; build {type(sampler).__name__} on denoiser.schedule (or the model's own scheduler)")
    if seeds is not None and generators is not None:
        raise ValueError("pass either seeds or generators, not both (the generators would silently win)")
    if seeds is not None and hasattr(seeds, "__len__") and not isinstance(seeds, (str, bytes)) and not len(seeds):
        raise ValueError("seeds must name at least one sample, got an empty sequence")
    if x_T is not None and shape is not None and tuple(x_T.shape[1:]) != tuple(shape):
        raise ValueError(f"x_T has per-sample shape {tuple(x_T.shape[1:])} but shape={tuple(shape)}; pass one of them")
    _check_channels(denoiser, tuple(shape) if x_T is None and shape is not None else None, x_T)
    if generators is None:
        if seeds is None:
            n = x_T.shape[0] if x_T is not None else None
            if n is None:
                raise ValueError("pass seeds=[...] (one per sample), generators=[...], or x_T")
            seeds = range(n)
        generators = make_generators(seeds)
    generators = list(generators)
    if x_T is None:
        if shape is None:
            raise ValueError("pass shape=(C, H, W) (per sample) or x_T")
        x = randn(tuple(shape), generators, dtype=dtype, device=device)
        k_T = sampler.scales(0)[0]
        if k_T != 1.0:
            x = k_T * x
    else:
        x = x_T.to(device=device, dtype=dtype)
    check_generators(generators, x.shape[0])
    if engine.config.n_recur > 1 and sampler.stateful:
        raise ValueError(
            f"time travel (n_recur={engine.config.n_recur}) repeats steps, which a stateful multistep sampler "
            f"({type(sampler).__name__}) cannot do; use {TIME_TRAVEL_SAMPLERS[sampler.schedule.family]} or set "
            "n_recur=1"
        )
    sampler.reset()  # a multistep scheduler's history from an earlier call would silently change this one
    cfg = engine.config
    if cfg.rho is not None and cfg.rho_target == "x_prev":
        lost = [i for i in range(len(sampler)) if engine.active(sampler, i) and sampler.overwrites_x_prev(i)]
        if lost:
            name = type(getattr(sampler, "scheduler", sampler)).__name__
            raise ValueError(
                f"{name}'s corrector recomputes x_{{t'}} and would silently discard the guidance '{cfg.name}' adds "
                f"to it (rho_target='x_prev') at {len(lost)} steps; build it with {name}(..., "
                f"disable_corrector=list(range({len(sampler)}))) or use another scheduler (DDIM, DPMSolver)"
            )
    stats = GuidanceStats()
    stats.init(x.shape[0])
    bar = tqdm(range(len(sampler)), disable=not progress, unit="step", ncols=79, ascii=True, desc=engine.config.name)
    for i in bar:
        reps = engine.recurrences(sampler, i)
        for r in range(reps):
            x_prev = engine.step(denoiser, sampler, x, i, generators, stats)
            if r < reps - 1:
                x = sampler.renoise(x_prev, i, generators)
        x = x_prev
        if progress and engine.active(sampler, i):
            bar.set_postfix(loss=f"{float(stats.last_loss.nanmean()):.4g}")
        if callback is not None:
            callback({"i": i, "t": sampler.timestep(i), "x": x, "stats": stats})
    summary = guidance_summary(stats)
    if summary:
        log.warning("guidance '%s': %s", cfg.name, summary)
    return SampleResult(x0=x, stats=stats)


def _check_channels(denoiser: Denoiser, shape, x_T) -> None:
    """A 2-D UNet's input channels (``denoiser.channels``, where known) against the per-sample shape."""
    C = getattr(denoiser, "channels", None)
    if C is None:
        return
    per = shape if x_T is None else tuple(x_T.shape[1:])
    if per is not None and (len(per) != 3 or per[0] != C):
        what = f"shape={per}" if x_T is None else f"x_T of per-sample shape {per}"
        raise ValueError(f"{what} does not fit the model, which takes ({C}, H, W) samples ({C} channels); "
                         f"pass shape=({C}, H, W)")  # fmt: skip
    m = getattr(denoiser, "size_multiple", None)
    if per is not None and m and (per[1] % m or per[2] % m):
        what = f"shape={per}" if x_T is None else f"x_T of per-sample shape {per}"
        H, W = (-(-n // m) * m for n in per[1:])
        raise ValueError(f"{what} does not fit the model, whose UNet halves H and W {m.bit_length() - 1} times: H "
                         f"and W must be multiples of {m}; pass e.g. shape=({C}, {H}, {W})")  # fmt: skip


def guidance_summary(stats: GuidanceStats) -> str:
    """One line on every nonzero per-sample counter of ``stats`` (zero gradient, skipped, overflow), or ''."""
    B = len(stats.skipped)
    parts = []

    def counted(c: torch.Tensor | None, what: str, of: str, field: str) -> None:
        if c is not None and int(c.sum()):
            parts.append(f"{what} in {int((c > 0).sum())} of {B} samples, on up to {int(c.max())} of their {of} "
                         f"({int(c.sum())} in all; per-sample counts in stats.{field})")  # fmt: skip

    guided = f"{stats.loss_grads} guided steps"
    counted(stats.zero_grad, "guidance did nothing (zero gradient)", guided, "zero_grad")
    counted(stats.skipped, "guided steps were skipped (non-finite loss, gradient or step size)", guided, "skipped")
    counted(stats.overflow, f"|x| exceeded {stats.max_abs:g} or turned non-finite", f"{stats.nfe} steps", "overflow")
    return "; ".join(parts)
