"""Per-sample guidance losses ``ℓ(x0) -> [B]`` and their combinators.

Every loss returns one value per sample and is differentiable in its input; networks are passed in
(frozen: eval mode, no parameter gradients). Any callable ``x0 -> [B]`` is a loss too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lossguide.denoiser import freeze

Loss = Callable[[torch.Tensor], torch.Tensor]


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(1)


class ClassLoss:
    """Cross-entropy −log p(y | x0) under any classifier ``logits = classifier(x0)``.

    A *saturating* loss: once a sample is confidently classified, ℓ and ∇ℓ vanish together (‖g‖ below 1e-6
    on about a third of the steps on MNIST), so the paper's Polyak step η‖ε‖/‖g‖² explodes on it; use
    :class:`FeatureDistanceLoss` or ``Polyak(gap="loss")`` with that rule.

    ``target`` is one class for every sample, or one per sample (augmented copies of sample b,
    which the engine passes as consecutive rows, inherit target b).
    """

    def __init__(self, classifier: torch.nn.Module, target: int | Sequence[int]):
        self.classifier = freeze(classifier)
        self.target = torch.as_tensor(target).long().view(-1)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x0)
        y = target_rows(self.target, len(x0), logits.device)
        return F.cross_entropy(logits.float(), y, reduction="none").to(x0.dtype)


def target_rows(target: torch.Tensor, n: int, device=None) -> torch.Tensor:
    """Class targets for n input rows: one class for all, or target b for the consecutive rows of sample b
    (augmented copies); a one-line error where n is not a multiple of the targets."""
    k = len(target)
    if n % k:
        raise ValueError(f"{k} targets for {n} inputs; pass one target per sample or a single class")
    return target.to(device).repeat_interleave(n // k)


class _VPTimestepInput:
    """Maps the sampler's (x_t, t) to the VP point and integer timestep a network trained on VP x_t sees: on a
    rectified-flow or VE ``schedule``, x_t/k_t at the training timestep of ``train_schedule`` (default: the linear β
    schedule of the shipped DDPM) whose ᾱ is nearest (in log-SNR) the VP-equivalent ᾱ_t of t; None or VP: x_t
    and t as given."""

    def __init__(self, schedule=None, train_schedule=None):
        self.schedule = schedule
        if schedule is not None and schedule.family != "vp":
            from lossguide.schedule import NoiseSchedule

            ab = (train_schedule or NoiseSchedule.linear()).alpha_bar
            self._log_snr = (ab / (1 - ab)).log()

    def _vp_input(self, x_t: torch.Tensor, t) -> tuple[torch.Tensor, int]:
        if self.schedule is None or self.schedule.family == "vp":
            return x_t, int(t)
        import math

        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        lam = math.inf if s == 0 else (-math.inf if a == 0 else 2 * math.log(a / s))
        if math.isfinite(lam):
            tau = int((self._log_snr - lam).abs().argmin())
        else:  # t' = 0 (no noise) or α = 0 (pure noise): the least or the most noisy training timestep
            tau = 0 if lam > 0 else len(self._log_snr) - 1
        return x_t / math.hypot(a, s), tau

    def _timesteps(self, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        x_in, tau = self._vp_input(x_t, t)
        return x_in, torch.full((len(x_t),), tau, dtype=torch.long, device=x_t.device)


class NoisyClassLoss(_VPTimestepInput):
    """−log p(y | x_t, t) under a noise-aware classifier ``classifier(x_t, t)``: the loss of ``cg``.

    ``target`` is one class for every sample or one per sample. The classifier was trained on VP x_t at the integer
    timesteps of ``classifier_schedule`` (default: the linear β schedule of the shipped DDPM and mnist-noise-aware).
    ``schedule`` is the sampler's: on a rectified-flow or VE schedule the classifier sees the VP point x_t/k_t at
    the training timestep whose ᾱ is nearest (in log-SNR) the VP-equivalent ᾱ_t of t (None or VP: x_t and t as
    given)."""

    def __init__(self, classifier: torch.nn.Module, target: int | Sequence[int], schedule=None,
                 classifier_schedule=None):  # fmt: skip
        super().__init__(schedule, classifier_schedule)
        self.classifier = freeze(classifier)
        self.target = torch.as_tensor(target).long().view(-1)

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        x_in, tt = self._timesteps(x_t, t)
        logits = self.classifier(x_in, tt)
        y = target_rows(self.target, len(x_t), logits.device)
        return F.cross_entropy(logits.float(), y, reduction="none").to(x_t.dtype)


class DensityRatioLoss(_VPTimestepInput):
    """−log h_ψ(x_t, t), h_ψ ≈ E_p[q(x0)/p(x0) | x_t] = q_t(x_t)/p_t(x_t): the transfer guidance of TGDP (Ouyang et
    al. 2024, Thm 3.1: ∇ log q_t = ∇ log p_t + ∇ log E_p[q/p | x_t]); with ``cg`` at scale 1 the source model's ε̂
    becomes the target domain's. ``log_ratio(x_t, t)`` returns log h per sample ``[B]`` or ``[B, 1]`` (a network
    trained on VP x_t at the timesteps of ``train_schedule``; ``schedule``: the sampler's, as for
    :class:`NoisyClassLoss`)."""

    def __init__(self, log_ratio: Callable, schedule=None, train_schedule=None):
        super().__init__(schedule, train_schedule)
        self.log_ratio = freeze(log_ratio) if isinstance(log_ratio, torch.nn.Module) else log_ratio

    def __call__(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        x_in, tt = self._timesteps(x_t, t)
        log_h = self.log_ratio(x_in, tt)
        if log_h.shape not in ((len(x_t),), (len(x_t), 1)):
            raise ValueError(f"log_ratio must return one value per sample ([{len(x_t)}] or [{len(x_t)}, 1]), got "
                             f"shape {tuple(log_h.shape)}")  # fmt: skip
        return -log_h.reshape(len(x_t)).to(x_t.dtype)


class FeatureDistanceLoss:
    """‖f(x0) − μ_y‖₂ (unsquared): distance of a network's features to the mean feature of class y.

    The class-guidance analogue of the paper's distance losses (‖E(x0) − E(reference)‖ of CLIP, sketch or
    segmentation networks); unlike cross-entropy it does not saturate, so ‖g‖ stays of order one. ``means``
    ``[K, D]`` come from :func:`class_feature_means` on the network's own training split (never on the digits
    used for evaluation). ``target`` is one class or one per sample.
    """

    def __init__(self, features: Callable, means: torch.Tensor, target: int | Sequence[int]):
        if isinstance(features, torch.nn.Module):
            freeze(features)
        self.features = features
        self.means = means.detach()
        self.target = torch.as_tensor(target).long().view(-1)
        if self.means.ndim != 2:
            raise ValueError(f"means must be [classes, features], got shape {tuple(self.means.shape)}")
        bad = [int(y) for y in self.target if not 0 <= int(y) < len(self.means)]
        if bad:
            raise ValueError(f"target {bad[0]} is not one of the {len(self.means)} classes of the feature means")

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        f = self.features(x0).flatten(1)
        mu = self.means.to(f)[target_rows(self.target, len(x0), f.device)]
        return _norm(f - mu, "l2")


@torch.no_grad()
def class_feature_means(features: Callable, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """μ_y = mean of ``features(x)`` over the examples of each class y, ``[K, D]`` in float32."""
    f = torch.cat([features(x[i : i + batch]).flatten(1).float() for i in range(0, len(x), batch)])
    classes = int(y.max()) + 1
    return torch.stack([f[y.to(f.device) == c].mean(0) for c in range(classes)])


NORMS = ("squared", "l2")


def _norm(r: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample ‖r‖² (``"squared"``) or ‖r‖₂ (``"l2"``, the paper's code) over all dimensions but the batch."""
    if norm == "squared":
        return _per_sample(r**2)
    if norm == "l2":
        return torch.linalg.vector_norm(r.flatten(1), dim=1)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be 'squared' (‖r‖²) or 'l2' (‖r‖, the paper's code), got {norm!r}")
    return norm


def sobel_edges(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude √(G_x² + G_y² + ε) of each channel with 3×3 Sobel kernels (replicate padding)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device) / 8
    k = torch.stack([kx, kx.T]).unsqueeze(1)  # [2, 1, 3, 3]
    B, C, H, W = x.shape
    g = F.conv2d(F.pad(x.reshape(B * C, 1, H, W), (1, 1, 1, 1), mode="replicate"), k)
    return (g.pow(2).sum(1) + 1e-8).sqrt().reshape(B, C, H, W)


class SketchLoss:
    """Distance between Sobel edge maps of x0 and of a reference image: ‖r‖² (``norm="squared"``) or ‖r‖₂
    (``"l2"``, the paper's code)."""

    def __init__(self, reference: torch.Tensor, norm: str = "squared"):
        self.ref_edges = sobel_edges(_as_batch(reference))
        self.norm = _check_norm(norm)

    def __call__(self, x0):
        return _norm(sobel_edges(x0) - _rows(self.ref_edges, len(x0)).to(x0), self.norm)


class InpaintLoss:
    """Distance to a reference on the known pixels (mask = 1 where known): Σ mask·(x0 − ref)²
    (``norm="squared"``) or its square root (``"l2"``, the paper's code)."""

    def __init__(self, reference: torch.Tensor, mask: torch.Tensor, norm: str = "squared"):
        self.ref = _as_batch(reference)
        self.mask = _as_batch(mask)
        self.norm = _check_norm(norm)
        if self.mask.shape[-2:] != self.ref.shape[-2:]:
            raise ValueError(f"mask {tuple(self.mask.shape)} and reference {tuple(self.ref.shape)} differ in size")

    def __call__(self, x0):
        w = _rows(self.mask, len(x0)).to(x0).clamp_min(0).sqrt()  # Σ mask·r² = ‖√mask·r‖² for soft masks too
        return _norm(w * (x0 - _rows(self.ref, len(x0)).to(x0)), self.norm)


class SuperResLoss:
    """Distance after ``factor``× average pooling: ‖A(x0) − y‖² (``norm="squared"``) or ‖A(x0) − y‖₂ (``"l2"``)
    with A = avg-pool, y = A(reference)."""

    def __init__(self, reference: torch.Tensor, factor: int = 4, reference_is_lowres: bool = False,
                 norm: str = "squared"):  # fmt: skip
        ref = _as_batch(reference)
        self.factor = factor
        self.norm = _check_norm(norm)
        self.y = ref if reference_is_lowres else F.avg_pool2d(ref, factor)

    def __call__(self, x0):
        return _norm(F.avg_pool2d(x0, self.factor) - _rows(self.y, len(x0)).to(x0), self.norm)


class WeightedSum:
    """Σ_i w_i·ℓ_i(x0), per sample."""

    def __init__(self, terms: Sequence[tuple[float, Loss]]):
        if not terms:
            raise ValueError("WeightedSum needs at least one (weight, loss) term")
        self.terms = list(terms)

    def __call__(self, x0):
        return sum(w * loss(x0) for w, loss in self.terms)


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    """One reference [C, H, W] / [1, C, H, W] for every sample, or one per sample [B, C, H, W]."""
    x = torch.as_tensor(x)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected reference images [C, H, W] or [B, C, H, W], got {tuple(x.shape)}")
    return x.detach()


def _rows(ref: torch.Tensor, n: int) -> torch.Tensor:
    """Reference rows for n inputs: one shared row, or row b for the consecutive copies of sample b."""
    k = ref.shape[0]
    if k == 1:
        return ref
    if n % k:
        raise ValueError(f"{k} references for {n} inputs; pass one reference per sample or a single one")
    return ref.repeat_interleave(n // k, dim=0)
