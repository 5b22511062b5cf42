"""Unguided samplers: the update x_{t'} = step(x_t, x0_hat, ε_hat, i) and nothing else.

A sampler never knows guidance exists: the guidance engine hands it a (possibly corrected) x0_hat and
ε_hat and may add a correction to what it returns. Time travel uses :meth:`Sampler.renoise`.

Every sampler works on x_t = α_t·x0 + σ_t·ε (:mod:`lossguide.schedule`) and steps from the x_t consistent with
(x0_hat, ε_hat), α_t·x0_hat + σ_t·ε_hat, so x0- and ε-corrections reach every update alike. The formulas are
written in the VP-equivalent ᾱ and the scale k = √(α² + σ²) (x_t/k_t is VP), which is k = 1 and the
literal DDIM/DDPM arithmetic on a VP schedule.
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch

from lossguide.rng import Generators, randn
from lossguide.schedule import FlowSchedule, NoiseSchedule, SigmaSchedule, spaced_timesteps


class Sampler:
    """Base class: descending ``timesteps`` and, per step i, the levels (α_t, σ_t) → (α_{t'}, σ_{t'})."""

    timesteps: torch.Tensor  # int64 training timesteps (VP) or float64 t (flow) / σ (VE)
    schedule: NoiseSchedule | FlowSchedule | SigmaSchedule
    #: a stateful sampler (multistep solvers) cannot repeat a step, so it cannot time-travel
    stateful: bool = False

    def __len__(self) -> int:
        return len(self.timesteps)

    def timestep(self, i: int) -> int | float:
        """t of step i, what the denoiser is called with (an int for discrete VP timesteps)."""
        v = self.timesteps[i]
        return float(v) if v.is_floating_point() else int(v)

    def prev_timestep(self, i: int) -> int | float:
        """t' of step i: the next timestep, or the schedule's ``t_end`` after the last (−1 for VP, 0 otherwise)."""
        return self.timestep(i + 1) if i + 1 < len(self.timesteps) else self.schedule.t_end

    def levels(self, i: int) -> tuple[float, float, float, float]:
        """(α_t, σ_t, α_{t'}, σ_{t'}) of step i."""
        t, tp = self.timestep(i), self.prev_timestep(i)
        return self.schedule.alpha(t), self.schedule.sigma(t), self.schedule.alpha(tp), self.schedule.sigma(tp)

    def scales(self, i: int) -> tuple[float, float]:
        """(k_t, k_{t'}) with k = √(α² + σ²), the factor that makes x_t VP (1 on a VP schedule)."""
        return self.schedule.scale(self.timestep(i)), self.schedule.scale(self.prev_timestep(i))

    def alpha_bars(self, i: int) -> tuple[float, float]:
        """(ᾱ_t, ᾱ_{t'}) for step i: VP-equivalent α²/(α² + σ²) (ᾱ_{−1} = final ᾱ on a VP schedule)."""
        return self.schedule.at(self.timestep(i)), self.schedule.at(self.prev_timestep(i))

    def alpha_bar_pairs(self) -> list[tuple[float, float]]:
        """(ᾱ_t, ᾱ_{t'}) of every step, computed once."""
        cached = getattr(self, "_pairs", None)
        if cached is None or len(cached) != len(self.timesteps):
            cached = self._pairs = [self.alpha_bars(j) for j in range(len(self.timesteps))]
        return cached

    def level_list(self) -> list[tuple[float, float, float, float]]:
        """(α_t, σ_t, α_{t'}, σ_{t'}) of every step, computed once."""
        cached = getattr(self, "_levels", None)
        if cached is None or len(cached) != len(self.timesteps):
            cached = self._levels = [self.levels(j) for j in range(len(self.timesteps))]
        return cached

    def fraction(self, i: int) -> float:
        """Where step i sits in [0, 1] (t/T on VP, t on flow, σ/(1 + σ) on VE), for guidance windows."""
        return self.schedule.fraction(self.timestep(i))

    def reset(self) -> None:
        """Start a fresh trajectory (called by ``sample()`` at every call; a no-op for stateless samplers)."""

    def overwrites_x_prev(self, i: int) -> bool:
        """Whether a corrector recomputes step i's x_{t'} at step i + 1, discarding a correction added to it."""
        return False

    def step(self, x_t, x0_hat, eps, i: int, generators: Generators) -> torch.Tensor:
        raise NotImplementedError

    def renoise(self, x_prev: torch.Tensor, i: int, generators: Generators) -> torch.Tensor:
        """Time travel (Shen et al. 2024, Alg. 3), t' → t: x_t = r·x_{t'} + √(σ_t² − r²σ_{t'}²)·z, r = α_t/α_{t'}.

        Computed as x_t = (k_t/k_{t'})·√a·x_{t'} + k_t·√(1 − a)·z with a = ᾱ_t/ᾱ_{t'}: the VP rule
        √a·x_{t'} + √(1 − a)·z on x/k, so x_t ~ α_t·x0 + σ_t·ε when x_{t'} ~ α_{t'}·x0 + σ_{t'}·ε.
        """
        ab_t, ab_prev = self.alpha_bars(i)
        k_t, k_prev = self.scales(i)
        a = ab_t / ab_prev
        z = randn(x_prev.shape[1:], generators, dtype=x_prev.dtype, device=x_prev.device)
        return k_t / k_prev * a**0.5 * x_prev + k_t * (1 - a) ** 0.5 * z


def _times(schedule, num_steps: int, times) -> torch.Tensor:
    """Descending inference t of a continuous schedule: ``times`` as given, or the schedule's default spacing."""
    t = schedule.times(num_steps) if times is None else torch.as_tensor(times, dtype=torch.float64).flatten().cpu()
    if len(t) < 1 or not (t[1:] < t[:-1]).all() or t[-1] <= schedule.t_end:
        raise ValueError(f"inference times must be strictly decreasing and above {schedule.t_end}, got {t.tolist()}")
    return t.to(torch.float64)


def _require(schedule, family: str, who: str) -> None:
    if schedule.family != family:
        raise ValueError(
            f"{who} steps a {family!r} schedule, got a {schedule.family!r} one ({type(schedule).__name__})"
        )


class DDIM(Sampler):
    """DDIM (Song et al. 2021, eq. 12) on any family: x_{t'} = α_{t'}·x0 + √(σ_{t'}² − c²)·ε + c·z.

    c = η·σ_{t'}·√(1 − λ_t/λ_{t'}), λ = α²/σ² (the signal-to-noise ratio); on VP this is
    c = η·√((1−ᾱ_{t'})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t'}). η = 0 is deterministic (the Euler step of the probability-flow
    ODE in x/α against σ/α, Karras et al. 2022, so flow Euler and EDM Euler as well), η = 1 the DDPM posterior.
    Discrete VP timesteps are spaced as diffusers' ``timestep_spacing``; a flow or VE schedule uses its own
    ``times(num_steps)`` unless ``times`` (descending t or σ) is given.
    """

    def __init__(
        self,
        schedule: NoiseSchedule | FlowSchedule | SigmaSchedule,
        num_steps: int = 50,
        eta: float = 0.0,
        spacing: str = "leading",
        steps_offset: int = 0,
        times=None,
    ):
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"DDIM eta must be a finite number ≥ 0 (0 deterministic, 1 DDPM-like), got {eta!r}")
        self.schedule = schedule
        self.eta = float(eta)
        if schedule.family == "vp" and times is None:
            self.timesteps = spaced_timesteps(schedule.num_train_timesteps, num_steps, spacing, steps_offset)
        elif schedule.family == "vp":
            self.timesteps = torch.as_tensor(times).to(torch.int64).cpu()
        else:
            self.timesteps = _times(schedule, num_steps, times)

    def sigma(self, i: int) -> float:
        """c, the standard deviation of the fresh noise of step i."""
        ab_t, ab_prev = self.alpha_bars(i)
        return self.scales(i)[1] * self._sigma_vp(ab_t, ab_prev)

    def _sigma_vp(self, ab_t: float, ab_prev: float) -> float:
        return self.eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5

    def step(self, x_t, x0_hat, eps, i, generators):
        ab_t, ab_prev = self.alpha_bars(i)
        a_prev, k_prev = self.levels(i)[2], self.scales(i)[1]
        c = self._sigma_vp(ab_t, ab_prev)  # c/k_{t'}
        x_prev = a_prev * x0_hat + k_prev * max(1 - ab_prev - c**2, 0.0) ** 0.5 * eps
        if self.eta > 0:  # drawn at every step (as diffusers does), so streams stay aligned
            z = randn(x_t.shape[1:], generators, dtype=x_t.dtype, device=x_t.device)
            x_prev = x_prev + k_prev * c * z
        return x_prev


class DDPM(DDIM):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) with the posterior variance β̃_t.

    With x0_hat and ε_hat consistent with x_t this is exactly DDIM with η = 1; by default it visits
    every training timestep.
    """

    def __init__(self, schedule: NoiseSchedule, num_steps: int | None = None, spacing: str = "leading"):
        super().__init__(schedule, num_steps or schedule.num_train_timesteps, eta=1.0, spacing=spacing)


class FlowEuler(Sampler):
    """Rectified-flow Euler (the ODE dx_t/dt = u): x_{t'} = x_t + (t' − t)·u, u = ε_hat − x0_hat.

    x_t is the point α_t·x0_hat + σ_t·ε_hat, so the step equals α_{t'}·x0_hat + σ_{t'}·ε_hat (DDIM with
    η = 0); diffusers' ``FlowMatchEulerDiscreteScheduler`` takes the same step. For a stochastic flow sampler
    use ``DDIM(FlowSchedule(), n, eta=...)``.
    """

    def __init__(self, schedule: FlowSchedule | None = None, num_steps: int = 50, times=None):
        self.schedule = schedule or FlowSchedule()
        _require(self.schedule, "flow", "FlowEuler")
        self.timesteps = _times(self.schedule, num_steps, times)

    def step(self, x_t, x0_hat, eps, i, generators):
        t, t_prev = self.timestep(i), self.prev_timestep(i)
        x = (1 - t) * x0_hat + t * eps
        return x + (t_prev - t) * (eps - x0_hat)


class EDMEuler(Sampler):
    """Euler on the EDM ODE (Karras et al. 2022, Alg. 1 without its correction): x_{σ'} = x_σ + (σ' − σ)·d,
    d = (x_σ − x0_hat)/σ = ε_hat, with x_σ = x0_hat + σ·ε_hat (σ' = 0 after the last step)."""

    def __init__(self, schedule: SigmaSchedule | None = None, num_steps: int = 18, times=None):
        self.schedule = schedule or SigmaSchedule()
        _require(self.schedule, "ve", "EDMEuler")
        self.timesteps = _times(self.schedule, num_steps, times)

    def step(self, x_t, x0_hat, eps, i, generators):
        sigma, sigma_prev = self.timestep(i), self.prev_timestep(i)
        x = x0_hat + sigma * eps
        d = (x - x0_hat) / sigma
        return x + (sigma_prev - sigma) * d


class EDMHeun(Sampler):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1): two denoiser evaluations per σ-step.

    Steps alternate: a predictor at (x_i, σ_i) returns the Euler point x̃ = x_i + (σ_{i+1} − σ_i)·d_i at
    σ_{i+1}; a corrector at (x̃, σ_{i+1}) returns x_{i+1} = x̃ + (σ_{i+1} − σ_i)·(d' − d_i)/2, i.e.
    x_i + (σ_{i+1} − σ_i)·(d_i + d')/2; the last step, to σ = 0, is Euler alone (2n − 1 evaluations). Guidance sees
    both evaluations as ordinary steps: x0_hat/ε_hat corrections enter both slopes d_i and d' (Heun integrates the
    guided ODE), and an x_{t'} correction added to the predictor's x̃ is carried into x_{i+1}, so x_{t'} rules act
    twice per σ-step. The corrector's (t, t') are (σ_{i+1}, σ_{i+1}). Stateful: no time travel.
    """

    stateful = True

    def __init__(self, schedule: SigmaSchedule | None = None, num_steps: int = 18, times=None):
        self.schedule = schedule or SigmaSchedule()
        _require(self.schedule, "ve", "EDMHeun")
        sig = _times(self.schedule, num_steps, times)
        self.timesteps = torch.cat([sig[:1], sig[1:].repeat_interleave(2)])  # σ_0, σ_1, σ_1, σ_2, σ_2, ...
        self._prev = torch.cat([sig[1:].repeat_interleave(2), torch.zeros(1, dtype=torch.float64)])
        self.reset()

    def reset(self) -> None:
        self._d = self._dt = None

    def is_corrector(self, i: int) -> bool:
        return i % 2 == 1

    def prev_timestep(self, i: int) -> float:
        return float(self._prev[i])

    def step(self, x_t, x0_hat, eps, i, generators):
        sigma = self.timestep(i)
        x = x0_hat + sigma * eps
        d = (x - x0_hat) / sigma
        if self.is_corrector(i):
            return x + self._dt * (d - self._d) / 2
        self._d, self._dt = d, self.prev_timestep(i) - sigma
        return x + self._dt * d


#: diffusers schedulers that step x_σ = x0 + σ·ε (VP under the hood: x_σ = √(1 + σ²)·x_vp)
SIGMA_SPACE = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
)


class DiffusersSampler(Sampler):
    """Steps through a diffusers scheduler whose ``step()`` returns ``prev_sample``.

    Three kinds of scheduler, in the coordinates of their model:

    - VP (DDIM, DDPM, DPMSolver, UniPC, PNDM, DEIS, ...): the state is x_t, timesteps are training timesteps.
    - σ-space (:data:`SIGMA_SPACE`): the scheduler steps x_σ = x0 + σ·ε, its model sees x_σ/√(1 + σ²), the VP x_t
      with ᾱ = 1/(1 + σ²) (``scale_model_input``). The state here stays VP, x_vp = x_σ/√(1 + σ²), at the
      scheduler's (fractional) timesteps, with (α, σ_vp) = (1, σ)/√(1 + σ²) read from its ``sigmas``; each step
      hands it x_σ = x0_hat + σ·ε_hat and divides ``prev_sample`` by √(1 + σ'²). The initial x_T ~ N(0, I) is
      x_σ = √(1 + σ_max²)·z (diffusers' ``init_noise_sigma`` is σ_max for 'linspace'/'trailing', dropping the
      signal term).
    - rectified flow (``FlowMatchEulerDiscreteScheduler``): the state is x_t = (1 − t)·x0 + t·ε with t its
      ``sigmas``; the scheduler gets the velocity u = ε_hat − x0_hat.

    The scheduler is called with the model output rebuilt from (x0_hat, ε_hat) in its own ``prediction_type``,
    on the x_t consistent with them, so x0- and ε-corrections reach it. :meth:`reset` re-runs ``set_timesteps``
    (with ``timestep_kwargs``, e.g. ``mu`` for dynamic shifting), which clears a multistep scheduler's history, so
    one sampler can serve many ``sample()`` calls. ``HeunDiscreteScheduler`` is guided at both of its evaluations
    as :class:`EDMHeun` is: a correction added to the predictor's output is carried into the corrector's.
    """

    def __init__(self, scheduler, num_steps: int = 50, timestep_kwargs: dict | None = None, **step_kwargs):
        name = type(scheduler).__name__
        sigma0 = float(getattr(scheduler, "init_noise_sigma", 1.0))
        if "FlowMatch" in name:
            if name != "FlowMatchEulerDiscreteScheduler":
                raise ValueError(
                    f"{name} is not supported; use FlowMatchEulerDiscreteScheduler or lossguide's FlowEuler"
                )
            self.space = "flow"
            self.schedule = FlowSchedule.from_diffusers(scheduler)
        elif name in SIGMA_SPACE:
            if scheduler.config.get("timestep_type", "discrete") != "discrete":
                raise ValueError(f"{name} with timestep_type={scheduler.config.timestep_type!r} is not supported")
            self.space = "sigma"
            self.schedule = NoiseSchedule.from_diffusers(scheduler)
        elif abs(sigma0 - 1.0) > 1e-6:
            raise ValueError(
                f"{name} works in σ-space (init_noise_sigma={sigma0:g}) and is not one lossguide steps; use one of "
                f"{', '.join(SIGMA_SPACE)}, a VP scheduler (DDIM, DPMSolver, UniPC, ...) or EDMEuler/EDMHeun"
            )
        else:
            if scheduler.config.get("use_flow_sigmas") or scheduler.config.get("prediction_type") == "flow_prediction":
                raise ValueError(
                    f"{name} with flow sigmas is not supported; use FlowMatchEulerDiscreteScheduler or FlowEuler"
                )
            self.space = "vp"
            self.schedule = NoiseSchedule.from_diffusers(scheduler)
        cfg = scheduler.config
        if cfg.get("clip_sample") or cfg.get("thresholding"):
            raise ValueError(
                f"{name} has clip_sample/thresholding on: it would clamp x0_hat and silently "
                "cancel x0-space guidance; rebuild it with clip_sample=False, thresholding=False"
            )
        self.scheduler = scheduler
        self.num_steps = num_steps
        self.timestep_kwargs = dict(timestep_kwargs or {})
        self.reset()
        self.prediction_type = "flow_prediction" if self.space == "flow" else cfg.get("prediction_type", "epsilon")
        self.step_kwargs = step_kwargs
        self._takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        self.stateful = any(hasattr(scheduler, a) for a in ("model_outputs", "ets", "derivatives", "_step_index"))
        self._heun = hasattr(scheduler, "state_in_first_order")

    def reset(self) -> None:
        """``set_timesteps`` again: diffusers clears the multistep state there (model_outputs, ets, step index)."""
        self.scheduler.set_timesteps(self.num_steps, **self.timestep_kwargs)
        ts = torch.as_tensor(self.scheduler.timesteps).cpu()
        self._scheduler_t = ts
        if self.space == "vp":
            self.timesteps = ts.to(torch.int64)
        else:
            self._sigmas = torch.as_tensor(self.scheduler.sigmas).cpu().to(torch.float64)
            self.timesteps = self._sigmas[: len(ts)].clone() if self.space == "flow" else ts.to(torch.float64)
        self._pairs = self._levels = None
        self._returned = None

    def prev_timestep(self, i: int):
        if self.space == "flow":
            return float(self._sigmas[i + 1])
        return super().prev_timestep(i)

    def _vp_sigmas(self, i: int) -> tuple[float, float]:
        return float(self._sigmas[i]), float(self._sigmas[i + 1])

    def levels(self, i: int) -> tuple[float, float, float, float]:
        if self.space != "sigma":
            return super().levels(i)
        s, s_prev = self._vp_sigmas(i)
        k, k_prev = math.hypot(1.0, s), math.hypot(1.0, s_prev)
        return 1 / k, s / k, 1 / k_prev, s_prev / k_prev

    def scales(self, i: int) -> tuple[float, float]:
        return (1.0, 1.0) if self.space == "sigma" else super().scales(i)

    def alpha_bars(self, i: int) -> tuple[float, float]:
        if self.space != "sigma":
            return super().alpha_bars(i)
        s, s_prev = self._vp_sigmas(i)
        return 1 / (1 + s**2), 1 / (1 + s_prev**2)

    def overwrites_x_prev(self, i: int) -> bool:
        """UniPC's corrector rebuilds x_{t'} of step i from step i's input unless i is in ``disable_corrector``."""
        off = getattr(self.scheduler, "disable_corrector", None)
        return off is not None and i + 1 < len(self.timesteps) and i not in off

    def step(self, x_t, x0_hat, eps, i, generators):
        a, s = self.levels(i)[:2]
        kw = dict(self.step_kwargs)
        if self._takes_generator:
            kw["generator"] = list(generators)
        if self.space == "vp":
            return self._step(self._model_output(x0_hat, eps, a, s), self.timesteps[i], a * x0_hat + s * eps, kw)
        if self.space == "flow":
            sample = a * x0_hat + s * eps
            return self._step(eps - x0_hat, self._scheduler_t[i], sample, kw)
        sig, sig_prev = self._vp_sigmas(i)
        sample = x0_hat + sig * eps  # x_σ = √(1 + σ²)·x_vp
        if self._heun and not self.scheduler.state_in_first_order and self._returned is not None:
            # carry a correction added to the predictor's output: Heun restarts from its stored x_i
            self.scheduler.sample = self.scheduler.sample + (sample - self._returned)
        self.scheduler.scale_model_input(sample, self._scheduler_t[i])  # = x_vp, what the model saw; sets step index
        prev = self._step(self._model_output(x0_hat, eps, a, s), self._scheduler_t[i], sample, kw)
        self._returned = prev if self._heun and not self.scheduler.state_in_first_order else None
        return prev / math.hypot(1.0, sig_prev)

    def _model_output(self, x0_hat, eps, a, s):
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0_hat
        return a * eps - s * x0_hat

    def _step(self, out, t, sample, kw):
        return self.scheduler.step(out, t, sample, return_dict=True, **kw).prev_sample
