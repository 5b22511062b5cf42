"""Gradient guidance from an optimisation perspective (Guo, Yuan, Yang, Chen & Wang, NeurIPS 2024, arXiv 2404.14743).

The paper's guidance for maximising an objective f with a pretrained model is G_loss (their Definition 1):

    G_loss(x_t, t) = −β_t·∇_{x_t} (y − gᵀ E[x0 | x_t])²,

added to the score, with g = ∇f at an earlier sample z and the target y = gᵀz + δ (a "look-ahead" loss: the
linearised objective of the denoiser's estimate should gain δ). Because the gradient runs through E[x0 | x_t], its
Jacobian confines G_loss to the data's subspace when the data lie on one (Theorem 1), which ∇f added to the score
(naive gradient guidance) does not. In the engine G_loss is the ``ggdm`` preset: ε̂ = ε + β_t·σ_t·∇_{x_t}ℓ(x0_hat)
with ℓ = (y − gᵀx0)² (:class:`LookAheadLoss`) and β_t the rule :class:`~lossguide.steps.LookAheadStep`; naive guidance is
``naive_grad``.

Algorithm 1 repeats it: each round queries g_k = ∇f at the previous round's samples and samples again with
y_k = g_kᵀz_k + δ; Algorithm 2 also fine-tunes the score network on the guided samples each round. Both are
:func:`optimize`, a loop over :func:`~lossguide.sampling.sample`. On the analytic test bed
(:mod:`lossguide.subspace`) the fine-tuning is done in closed form (:func:`refit_prior`: the mean and covariance a
perfectly trained score network would learn); a neural denoiser takes a user ``fine_tune`` callback.

What was available here of the paper: its abstract, the released simulation code (GGDMOptim: ``diffusion.py``'s
G_loss and β_t, ``main.py``'s rounds and fine-tuning) and a review page's figure captions; the theorem statements
were not. Choices this module makes, each a parameter: the gradient is queried at the round's sample mean
(``query="mean"``, one (g, y) per round) or per sample (``"sample"``, the released code's default: independent
chains); fine-tuning uses the samples the gradient was queried at, before the round's sampling (the code's order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lossguide.guidance import GuidanceConfig, GuidanceStats
from lossguide.rng import make_generators
from lossguide.samplers import Sampler
from lossguide.sampling import sample
from lossguide.steps import _check_number

QUERIES = ("mean", "sample")


class LookAheadLoss:
    """ℓ(x0) = (y − ⟨g, x0⟩)² per sample: the paper's look-ahead loss, one (g, y) per sample (or one for all).

    ``g`` is [B, ...] (or [1, ...], shared) and ``y`` [B] (or [1]); a batch of B·n rows (the engine's augmented or
    Monte-Carlo copies, grouped per sample) uses each sample's (g, y) for its n copies.
    """

    def __init__(self, g: torch.Tensor, y: torch.Tensor):
        self.g = g.detach().flatten(1)
        self.y = torch.as_tensor(y, dtype=g.dtype).detach().reshape(-1)
        if self.y.shape[0] != self.g.shape[0]:
            raise ValueError(f"got {self.g.shape[0]} gradients and {self.y.shape[0]} targets; pass one y per g")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        n = x0.shape[0]
        g, y = self.g.to(x0.dtype), self.y.to(x0.dtype)
        if g.shape[0] > 1:
            if n % g.shape[0]:
                raise ValueError(f"the look-ahead loss holds {g.shape[0]} samples' (g, y) but got {n} inputs")
            rep = n // g.shape[0]
            g, y = g.repeat_interleave(rep, 0), y.repeat_interleave(rep, 0)
        return (y - (x0.flatten(1) * g).sum(1)) ** 2


class LinearisedLoss:
    """ℓ(x_t, t) = −⟨g, x_t⟩ per sample: the linearised objective for a noise-aware method (``naive_grad``, whose
    step then adds scale·g to the score, the direction of the released code's naive guidance G)."""

    def __init__(self, g: torch.Tensor):
        self.g = g.detach().flatten(1)

    def __call__(self, x_t: torch.Tensor, t) -> torch.Tensor:
        g = self.g.to(x_t.dtype)
        if g.shape[0] > 1 and g.shape[0] != x_t.shape[0]:
            raise ValueError(f"the linearised loss holds {g.shape[0]} gradients but got {x_t.shape[0]} inputs")
        return -(x_t.flatten(1) * g).sum(1)


def on_x_t(loss: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """A clean loss ℓ(x) evaluated at x_t, as ``naive_grad`` (``loss_input="x_t"``) calls it: (x_t, t) → ℓ(x_t)."""

    def at_x_t(x_t, t):
        return loss(x_t)

    at_x_t.__name__ = f"on_x_t({getattr(loss, '__name__', type(loss).__name__)})"
    return at_x_t


def refit_prior(weight: float = 1.0, covariance: bool = True) -> Callable:
    """Algorithm 2's fine-tuning for an analytic denoiser (``denoiser.prior.refit``, :mod:`lossguide.subspace`): the
    Gaussian a perfectly trained score network would learn from (1 − w)·the current model + w·the samples, in closed
    form (``covariance=False`` refits the mean only)."""

    def fine_tune(denoiser, samples: torch.Tensor, k: int):
        prior = getattr(denoiser, "prior", None)
        if prior is None or not hasattr(prior, "refit"):
            raise TypeError(f"refit_prior fine-tunes an analytic denoiser (SubspaceMixture.denoiser); "
                            f"{type(denoiser).__name__} has no .prior.refit: pass your own fine_tune")  # fmt: skip
        return prior.refit(samples, weight=weight, covariance=covariance).denoiser(denoiser.schedule)

    return fine_tune


@dataclass
class Round:
    """One round: its samples z_k, their objective values f(z_k), the (g, y) that guided them (None for round 0)."""

    k: int
    samples: torch.Tensor
    values: torch.Tensor
    g: torch.Tensor | None
    y: torch.Tensor | None
    stats: GuidanceStats | None


@dataclass
class OptimizeResult:
    """Every round (round 0 is the unguided model's samples) and the denoiser after the last fine-tuning."""

    rounds: list[Round]
    denoiser: object
    info: dict = field(default_factory=dict)

    @property
    def values(self) -> torch.Tensor:
        """f per round and sample [K+1, B]."""
        return torch.stack([r.values for r in self.rounds])

    @property
    def mean_values(self) -> torch.Tensor:
        """Mean f per round [K+1]."""
        return self.values.mean(1)

    @property
    def means(self) -> torch.Tensor:
        """The sample mean per round [K+1, ...]."""
        return torch.stack([r.samples.mean(0) for r in self.rounds])

    @property
    def samples(self) -> list[torch.Tensor]:
        return [r.samples for r in self.rounds]


def _objective_grad(objective: Callable, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(z) [B], ∇f(z) [B, ...]) per sample."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        f = objective(zz)
        if not isinstance(f, torch.Tensor) or f.shape != (z.shape[0],):
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"the objective returned {got} for {z.shape[0]} inputs; it must return [B], one value "
                             "per sample (f(x), maximised)")  # fmt: skip
        if not f.requires_grad:
            raise ValueError("the objective does not depend on its input (no gradient); build it with torch ops")
        (g,) = torch.autograd.grad(f.sum(), zz)
    return f.detach(), g.detach()


def optimize(
    denoiser,
    sampler: Sampler,
    method: GuidanceConfig | str,
    objective: Callable[[torch.Tensor], torch.Tensor],
    *,
    rounds: int,
    shape: Sequence[int],
    seeds: Sequence[int],
    delta: float = 0.1,
    adapt: bool = False,
    fine_tune: Callable | None = None,
    query: str = "mean",
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    augment: Callable | None = None,
    callback: Callable[[dict], None] | None = None,
) -> OptimizeResult:
    """Algorithm 1 (``adapt=False``) or 2 (``adapt=True``) of Guo et al. (2024): ``rounds`` rounds of guided sampling,
    each guided by the objective's gradient at the previous round's samples.

    Round 0 samples the model unguided. Round k ≥ 1: g = ∇f at z_{k−1} (at their mean for ``query="mean"``, per
    sample for ``"sample"``), y = gᵀz_{k−1} + ``delta``; with ``adapt`` the model is first fine-tuned on z_{k−1}
    (``fine_tune(denoiser, z_{k−1}, k) -> denoiser``; default :func:`refit_prior` for an analytic denoiser); then
    z_k = sample(denoiser, sampler, method, ℓ_k) with ℓ_k the look-ahead loss (y − gᵀx0)² for a method that guides
    through x0_hat (``ggdm``, and any preset with ``loss_input="x0"``) or the linearised objective −gᵀx_t for a
    noise-aware one (``naive_grad``).

    Args:
        denoiser, sampler: as for :func:`~lossguide.sampling.sample`.
        method: a :class:`~lossguide.guidance.GuidanceConfig` or a preset name (``"ggdm"``).
        objective: f(x) -> [B], *maximised* (the paper's convention; the guidance losses built from it are minimised).
        rounds: K ≥ 1 guided rounds.
        shape, seeds: per-sample shape; one seed per sample: sample i draws every round's noise from one generator
            seeded with seeds[i], so with ``query="sample"`` its chain is the same alone or in a batch.
        delta: δ > 0, the gain in the linearised objective each round asks for.
        adapt, fine_tune: Algorithm 2 and its fine-tuning step (see above); ``fine_tune`` without ``adapt`` is an
            error, not ignored.
        query: ``"mean"`` or ``"sample"`` (see above).
        callback: called after each round with ``{"k", "samples", "values", "denoiser"}``.
    """
    if isinstance(method, str):
        from lossguide import presets

        method = presets.get(method)
    if not isinstance(method, GuidanceConfig) or not method.enabled:
        raise ValueError(f"optimize needs a guidance method that takes a gradient step, got {method!r}; "
                         "pass e.g. lossguide.preset('ggdm')")  # fmt: skip
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer ≥ 1, got {rounds!r}")
    _check_number("delta", delta, positive=True)
    if query not in QUERIES:
        raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
    if fine_tune is not None and not adapt:
        raise ValueError("fine_tune is Algorithm 2's step: pass adapt=True with it (or drop it for Algorithm 1)")
    if adapt and fine_tune is None:
        if not hasattr(getattr(denoiser, "prior", None), "refit"):
            raise ValueError(f"adapt=True fine-tunes the model each round; {type(denoiser).__name__} is not an "
                             "analytic denoiser with a closed-form refit: pass fine_tune=callable(denoiser, samples, "
                             "k) -> denoiser (e.g. a few score-matching steps on the samples)")  # fmt: skip
        fine_tune = refit_prior()
    generators = make_generators(seeds)
    kw = dict(shape=tuple(shape), generators=generators, dtype=dtype, device=device, augment=augment)
    z = sample(denoiser, sampler, None, None, **kw).x0
    f, _ = _objective_grad(objective, z)
    history = [Round(0, z.detach(), f, None, None, None)]
    if callback is not None:
        callback({"k": 0, "samples": z, "values": f, "denoiser": denoiser})
    for k in range(1, rounds + 1):
        if query == "mean":
            zq = z.mean(0, keepdim=True)
            _, g = _objective_grad(objective, zq)
            y = (g.flatten(1) * zq.flatten(1)).sum(1) + delta
        else:
            _, g = _objective_grad(objective, z)
            y = (g.flatten(1) * z.flatten(1)).sum(1) + delta
        if adapt:
            denoiser = fine_tune(denoiser, z.detach(), k)
        loss = LinearisedLoss(g) if method.loss_input == "x_t" else LookAheadLoss(g, y)
        res = sample(denoiser, sampler, method, loss, **kw)
        z = res.x0.detach()
        f, _ = _objective_grad(objective, z)
        history.append(Round(k, z, f, g, y, res.stats))
        if callback is not None:
            callback({"k": k, "samples": z, "values": f, "denoiser": denoiser})
    info = {"method": method.name, "rounds": rounds, "delta": delta, "adapt": adapt, "query": query}
    return OptimizeResult(rounds=history, denoiser=denoiser, info=info)
