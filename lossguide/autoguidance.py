"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", §3).

D_w(x_t) = D_bad(x_t) + w·(D_good(x_t) − D_bad(x_t)), the guidance rule of their eq. 2 with the guiding model D_0
a bad version of the main one: the good denoiser extrapolated away from a smaller and/or
shorter-trained version of itself. :func:`autoguidance` returns a denoiser (the :class:`~lossguide.denoiser.Denoiser`
call contract: ``d(x_t, t, alpha=, sigma=) -> DenoiserOutput``, ``d.schedule``), so the autoguided prior goes into
every sampler and under every guidance preset unchanged: loss guidance through x0_hat backpropagates through both
networks. The same weights combine x0_hat and ε_hat; since both models share one schedule, x_t = α_t·x0_hat + σ_t·ε_hat
holds for the combination, and extrapolating ε_hat is extrapolating the score (−ε_hat/σ_t), as in the paper.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

import torch

from lossguide.denoiser import DenoiserOutput


def same_schedule(a, b) -> bool:
    """Whether two schedules are the same family with equal parameters (tensors compared exactly)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if not dataclasses.is_dataclass(a):
        return a == b
    for f in dataclasses.fields(a):
        u, v = getattr(a, f.name), getattr(b, f.name)
        if isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
            if not (isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) and u.shape == v.shape):
                return False
            if not torch.equal(u.cpu(), v.cpu()):
                return False
        elif u != v:
            return False
    return True


def _extrapolate(bad: torch.Tensor, good: torch.Tensor, w: float) -> torch.Tensor:
    """bad + w·(good − bad), evaluated from the nearer end (torch.lerp's rule), so w = 0 and w = 1 are exact."""
    if w < 0.5:
        return bad + w * (good - bad)
    return good - (1.0 - w) * (good - bad)


class AutoGuided:
    """D_w = D_bad + w·(D_good − D_bad) (Karras et al. 2024, eq. 2 with D_0 the bad model) as a denoiser.

    Each call evaluates both denoisers on the same (x_t, t) (two network evaluations: ``net_calls`` counts them;
    ``GuidanceStats.nfe`` counts combined calls), except w = 1 (the good model alone, returned unchanged) and
    w = 0 (the bad model alone). It draws no random numbers, so per-sample generators see exactly the draws they
    see with one model. Gradients flow through both networks to x_t (freeze the networks themselves:
    ``lossguide.denoiser.freeze``).
    """

    def __init__(self, good, bad, w: float):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"autoguidance weight w must be a finite number (1: the good model alone), got {w!r}")
        for name, d in (("good", good), ("bad", bad)):
            if not callable(d) or not hasattr(d, "schedule"):
                raise TypeError(f"the {name} model must be a denoiser (d(x_t, t) with d.schedule), got {d!r}")
        if not same_schedule(good.schedule, bad.schedule):
            raise ValueError(
                "autoguidance needs both denoisers on one noise schedule (the combination of their x0_hat and ε_hat "
                f"is only consistent with x_t then); good has {_describe(good.schedule)}, bad has "
                f"{_describe(bad.schedule)}"
            )
        cg, cb = getattr(good, "channels", None), getattr(bad, "channels", None)
        if cg is not None and cb is not None and cg != cb:
            raise ValueError(f"the good model takes {cg}-channel samples but the bad model {cb}-channel ones; "
                             "autoguidance needs a bad version of the same model (same data, same sample shape)")
        if w < 0:
            warnings.warn(f"autoguidance weight w={w:g} < 0 steps towards the bad model, past it; autoguidance is "
                          "w > 1 (0 < w < 1 interpolates between the two)", stacklevel=3)  # fmt: skip
        for attr in ("dtype", "device"):
            u, v = getattr(good, attr, None), getattr(bad, attr, None)
            if u is not None and v is not None and (u != v if attr == "dtype" else u.type != v.type):
                raise ValueError(f"the good model's {attr} is {u} but the bad model's is {v}; load both alike")
        self.good, self.bad, self.w = good, bad, float(w)
        self.schedule = good.schedule
        self.prediction_type = getattr(good, "prediction_type", None)
        self.dtype = getattr(good, "dtype", None) or getattr(bad, "dtype", None)
        self.device = getattr(good, "device", None) or getattr(bad, "device", None)
        self.net_calls = 0

    @property
    def family(self) -> str:
        return self.schedule.family

    def _eval(self, d, x_t, t, alpha, sigma) -> DenoiserOutput:
        self.net_calls += 1
        if alpha is None and sigma is None:
            return d(x_t, t)
        return d(x_t, t, alpha=alpha, sigma=sigma)

    def __call__(self, x_t: torch.Tensor, t, alpha: float | None = None, sigma: float | None = None) -> DenoiserOutput:
        """ε_hat and x0_hat of D_w at (x_t, t); (α_t, σ_t) are passed on to both models."""
        if self.w == 1.0:
            return self._eval(self.good, x_t, t, alpha, sigma)
        if self.w == 0.0:
            return self._eval(self.bad, x_t, t, alpha, sigma)
        g = self._eval(self.good, x_t, t, alpha, sigma)
        b = self._eval(self.bad, x_t, t, alpha, sigma)
        return DenoiserOutput(eps=_extrapolate(b.eps, g.eps, self.w), x0_hat=_extrapolate(b.x0_hat, g.x0_hat, self.w))

    def score(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """∇ log p_t of D_w: −ε_hat/σ_t."""
        return -self(x_t, t).eps / self.schedule.sigma(t)

    def __repr__(self) -> str:
        return f"AutoGuided(w={self.w:g})"


def autoguidance(good, bad, w: float) -> AutoGuided:
    """Autoguidance (Karras et al. 2024, §3): the denoiser D_bad + w·(D_good − D_bad); w = 1 is ``good``."""
    return AutoGuided(good, bad, w)


def _describe(schedule) -> str:
    name = type(schedule).__name__
    ab = getattr(schedule, "alpha_bar", None)
    if isinstance(ab, torch.Tensor):
        return f"{name}(T={len(ab)}, ᾱ_0={float(ab[0]):.6g}, ᾱ_T-1={float(ab[-1]):.6g})"
    return repr(schedule) if dataclasses.is_dataclass(schedule) else name
