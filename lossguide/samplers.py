"""Unguided samplers: the update x_{t'} = step(x_t, x0_hat, ε_hat, i) and nothing else.

A sampler never knows guidance exists: the guidance engine hands it a (possibly corrected) x0_hat and
ε_hat and may add a correction to what it returns. Time travel uses :meth:`Sampler.renoise`.
"""

from __future__ import annotations

import inspect

import torch

from lossguide.rng import Generators, randn
from lossguide.schedule import NoiseSchedule, spaced_timesteps


class Sampler:
    """Base class: descending ``timesteps`` and the ᾱ pair (ᾱ_t, ᾱ_{t'}) of step ``i``."""

    timesteps: torch.Tensor
    schedule: NoiseSchedule
    #: a stateful sampler (multistep solvers) cannot repeat a step, so it cannot time-travel
    stateful: bool = False

    def __len__(self) -> int:
        return len(self.timesteps)

    def prev_timestep(self, i: int) -> int:
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def alpha_bars(self, i: int) -> tuple[float, float]:
        """(ᾱ_t, ᾱ_{t'}) for step i, with t' the next timestep (ᾱ_{−1} = final ᾱ)."""
        return self.schedule.at(int(self.timesteps[i])), self.schedule.at(self.prev_timestep(i))

    def alpha_bar_pairs(self) -> list[tuple[float, float]]:
        """(ᾱ_t, ᾱ_{t'}) of every step, computed once."""
        cached = getattr(self, "_pairs", None)
        if cached is None or len(cached) != len(self.timesteps):
            cached = self._pairs = [self.alpha_bars(j) for j in range(len(self.timesteps))]
        return cached

    def reset(self) -> None:
        """Start a fresh trajectory (called by ``sample()`` at every call; a no-op for stateless samplers)."""

    def overwrites_x_prev(self, i: int) -> bool:
        """Whether a corrector recomputes step i's x_{t'} at step i + 1, discarding a correction added to it."""
        return False

    def step(self, x_t, x0_hat, eps, i: int, generators: Generators) -> torch.Tensor:
        raise NotImplementedError

    def renoise(self, x_prev: torch.Tensor, i: int, generators: Generators) -> torch.Tensor:
        """Time travel (Shen et al. 2024, Alg. 3): x_t = √(ᾱ_t/ᾱ_{t'})·x_{t'} + √(1 − ᾱ_t/ᾱ_{t'})·z."""
        ab_t, ab_prev = self.alpha_bars(i)
        a = ab_t / ab_prev
        z = randn(x_prev.shape[1:], generators, dtype=x_prev.dtype, device=x_prev.device)
        return a**0.5 * x_prev + (1 - a) ** 0.5 * z


class DDIM(Sampler):
    """DDIM (Song et al. 2021, eq. 12): x_{t'} = √ᾱ_{t'}·x0 + √(1−ᾱ_{t'}−σ²)·ε + σ·z.

    σ = η·√((1−ᾱ_{t'})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t'}); η = 0 is deterministic, η = 1 is the DDPM posterior.
    Timesteps are spaced as diffusers' ``timestep_spacing``; t' is the next timestep of the sequence.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int = 50,
        eta: float = 0.0,
        spacing: str = "leading",
        steps_offset: int = 0,
    ):
        if eta < 0:
            raise ValueError(f"DDIM eta must be ≥ 0, got {eta}")
        self.schedule = schedule
        self.eta = float(eta)
        self.timesteps = spaced_timesteps(schedule.num_train_timesteps, num_steps, spacing, steps_offset)

    def sigma(self, i: int) -> float:
        ab_t, ab_prev = self.alpha_bars(i)
        return self.eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5

    def step(self, x_t, x0_hat, eps, i, generators):
        _, ab_prev = self.alpha_bars(i)
        sigma = self.sigma(i)
        x_prev = ab_prev**0.5 * x0_hat + max(1 - ab_prev - sigma**2, 0.0) ** 0.5 * eps
        if self.eta > 0:  # drawn at every step (as diffusers does), so streams stay aligned
            z = randn(x_t.shape[1:], generators, dtype=x_t.dtype, device=x_t.device)
            x_prev = x_prev + sigma * z
        return x_prev


class DDPM(DDIM):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) with the posterior variance β̃_t.

    With x0_hat and ε_hat consistent with x_t this is exactly DDIM with η = 1; by default it visits
    every training timestep.
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int | None = None, spacing: str = "leading"):
        super().__init__(schedule, num_steps or schedule.num_train_timesteps, eta=1.0, spacing=spacing)


class DiffusersSampler(Sampler):
    """Steps through a diffusers scheduler whose ``step()`` returns ``prev_sample`` (VP schedulers).

    The scheduler is called with the model output rebuilt from (x0_hat, ε_hat) in its own
    ``prediction_type``, on the x_t consistent with them, so x0- and ε-corrections reach it.
    :meth:`reset` re-runs ``set_timesteps``, which clears a multistep scheduler's history, so one
    sampler can serve many ``sample()`` calls.
    """

    def __init__(self, scheduler, num_steps: int = 50, **step_kwargs):
        sigma0 = float(getattr(scheduler, "init_noise_sigma", 1.0))
        if abs(sigma0 - 1.0) > 1e-6:
            raise ValueError(
                f"{type(scheduler).__name__} works in σ-space (init_noise_sigma={sigma0:g}); lossguide steps VP "
                "schedulers only: use DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPC, ..."
            )
        cfg = scheduler.config
        if cfg.get("clip_sample") or cfg.get("thresholding"):
            raise ValueError(
                f"{type(scheduler).__name__} has clip_sample/thresholding on: it would clamp x0_hat and silently "
                "cancel x0-space guidance; rebuild it with clip_sample=False, thresholding=False"
            )
        self.scheduler = scheduler
        self.schedule = NoiseSchedule.from_diffusers(scheduler)
        self.num_steps = num_steps
        self.reset()
        self.prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
        self.step_kwargs = step_kwargs
        self._takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        self.stateful = any(hasattr(scheduler, a) for a in ("model_outputs", "ets", "_step_index"))

    def reset(self) -> None:
        """``set_timesteps`` again: diffusers clears the multistep state there (model_outputs, ets, step index)."""
        self.scheduler.set_timesteps(self.num_steps)
        self.timesteps = torch.as_tensor(self.scheduler.timesteps).to(torch.int64).cpu()
        self._pairs = None

    def overwrites_x_prev(self, i: int) -> bool:
        """UniPC's corrector rebuilds x_{t'} of step i from step i's input unless i is in ``disable_corrector``."""
        off = getattr(self.scheduler, "disable_corrector", None)
        return off is not None and i + 1 < len(self.timesteps) and i not in off

    def step(self, x_t, x0_hat, eps, i, generators):
        t = int(self.timesteps[i])
        ab = self.schedule.at(t)
        a, s = ab**0.5, (1 - ab) ** 0.5
        sample = a * x0_hat + s * eps
        if self.prediction_type == "epsilon":
            out = eps
        elif self.prediction_type == "sample":
            out = x0_hat
        else:
            out = a * eps - s * x0_hat
        kw = dict(self.step_kwargs)
        if self._takes_generator:
            kw["generator"] = list(generators)
        return self.scheduler.step(out, self.timesteps[i], sample, return_dict=True, **kw).prev_sample
