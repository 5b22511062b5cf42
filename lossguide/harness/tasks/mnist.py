"""The MNIST tasks on the shipped models: the kit (DDPM and classifiers, loaded once) and the harness task over it.

Class-guided sample sets use seed k with target class ``k mod 10``, so every set of n ≥ 10 seeds is
class-balanced like the held-out reference set (100 digits per class) that FID/KID compare against; inverse
problems take the held-out digit ``perm[seed mod 1000]`` as reference (its class is the judge's target).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lossguide import losses, metrics
from lossguide.guidance import GuidanceConfig
from lossguide.harness.tasks import CLASS_TASKS, MNIST_TASKS, NORM_TASKS, applicable, method_loss
from lossguide.samplers import DDIM
from lossguide.sampling import sample

MNIST_SHAPE = (1, 28, 28)  # what the guide, the judge and the reference digits take


def targets_for(seeds: Sequence[int]) -> list[int]:
    """Target class of each seed: ``seed mod 10``."""
    return [int(s) % 10 for s in seeds]


def task_loss(kind: str, guide, target, reference: torch.Tensor | None = None, means: torch.Tensor | None = None,
              norm: str = "squared"):  # fmt: skip
    """The guidance loss of MNIST task ``kind`` (one definition for sample, bench and experiments): the guide's
    feature distance ‖f(x0) − μ_y‖ (``class-feature``, ``means`` = μ), its cross-entropy (``class``), the residual to
    ``reference`` of a sketch, the upper half (``inpaint``) or a ×4 downsampling (``sr``) in ``norm``, or
    cross-entropy + 0.1 · sketch (``class+sketch``). ``target`` is one class or one per sample, ``reference``
    [1 or B, 1, 28, 28]."""
    if kind == "class-feature":
        return losses.FeatureDistanceLoss(guide.features, means, target)
    if kind == "class":
        return losses.ClassLoss(guide, target)
    if kind not in MNIST_TASKS:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(MNIST_TASKS)}")
    if kind == "sketch":
        return losses.SketchLoss(reference, norm=norm)
    if kind == "inpaint":
        mask = torch.ones_like(reference[:1])
        mask[..., reference.shape[-2] // 2 :, :] = 0  # the lower half is unknown
        return losses.InpaintLoss(reference, mask, norm=norm)
    if kind == "sr":
        return losses.SuperResLoss(reference, factor=4, norm=norm)
    return losses.WeightedSum([(1.0, losses.ClassLoss(guide, target)), (0.1, losses.SketchLoss(reference, norm=norm))])


@dataclass
class Generated:
    """A generated set: samples in [−1, 1], their targets, the guide loss ℓ(x0_hat) per guided step
    (``loss_trace[j]`` is ``(i, t, ℓ [N])``), compute counters and wall time."""

    x: torch.Tensor
    targets: torch.Tensor
    nfe: int
    denoiser_grads: int
    loss_evals: int
    wall_s: float
    loss_trace: list = field(default_factory=list)
    skipped: int = 0
    kind: str = "ce"  # the class loss that guided (MnistKit.loss)


class MnistKit:
    """The shipped DDPM and classifiers, loaded once."""

    def __init__(self, device: str = "cpu", noise_aware: str = "mnist-noise-aware"):
        """``noise_aware``: the noise-aware classifier (one of :data:`~lossguide.models.NOISE_AWARE`) that
        ``loss("noise-aware", ...)`` and so ``cg`` guide with."""
        from lossguide.data import load_mnist
        from lossguide.models import NOISE_AWARE, load_classifier, load_denoiser

        if noise_aware not in NOISE_AWARE:
            raise ValueError(f"{noise_aware!r} is not a noise-aware classifier; choose one of "
                             f"{', '.join(NOISE_AWARE)}")
        self.device, self.noise_aware = device, noise_aware
        self.model = load_denoiser("mnist-ddpm", device=device)
        self.nets = {name: load_classifier(f"mnist-{name}", device=device) for name in ("guide", "judge", "robust")}
        self.nets["noise-aware"] = load_classifier(noise_aware, device=device)
        x, y = load_mnist("heldout")
        self.real_x, self.real_y = x.to(device), y.to(device)
        self._real_features = None
        self._means: dict[str, torch.Tensor] = {}

    # -- losses ----------------------------------------------------------------------------------------
    def class_means(self, net: str) -> torch.Tensor:
        """μ_y of ``net``'s features on its own training split (cached)."""
        from lossguide.models import class_means

        if net not in self._means:
            self._means[net] = class_means(f"mnist-{net}", device=self.device, net=self.nets[net])
        return self._means[net]

    def loss(self, net: str, targets: Sequence[int], kind: str = "ce"):
        """Per-sample class loss of ``net`` (guide, robust, judge): cross-entropy (``kind="ce"``) or the unsquared
        feature distance ‖f(x0) − μ_y‖ (``"feature"``); the noise-aware net gives −log p(y|x_t, t)."""
        if net == "noise-aware":
            return losses.NoisyClassLoss(self.nets[net], list(targets))
        if kind == "feature":
            return losses.FeatureDistanceLoss(self.nets[net].features, self.class_means(net), list(targets))
        if kind != "ce":
            raise ValueError(f"unknown class loss kind {kind!r}; choose 'ce' or 'feature'")
        return losses.ClassLoss(self.nets[net], list(targets))

    # -- generation ------------------------------------------------------------------------------------
    def generate(
        self,
        guidance: GuidanceConfig,
        seeds: Sequence[int],
        steps: int = 50,
        net: str = "guide",
        batch: int = 64,
        targets: Sequence[int] | None = None,
        kind: str = "ce",
        ddim_eta: float = 0.0,
    ) -> Generated:
        """Samples for ``seeds`` (targets ``seed mod 10`` unless given) guided by class net ``net`` with loss
        ``kind`` (see :meth:`loss`), DDIM(``ddim_eta``); each method gets its loss by the tasks' one rule
        (:func:`~lossguide.harness.tasks.method_loss`: cg the noise-aware classifier whatever ``net`` says,
        naive_grad ``net``'s loss read at x_t). Augmentation is the model's (``digits``)."""
        seeds = list(seeds)
        targets = targets_for(seeds) if targets is None else list(targets)
        sampler = DDIM(self.model.denoiser.schedule, steps, eta=ddim_eta)
        xs, traces = [], []
        nfe = grads = evals = skipped = 0
        t0 = time.perf_counter()
        for b in range(0, len(seeds), batch):
            sl = slice(b, b + batch)
            res = sample(
                self.model.denoiser,
                sampler,
                guidance,
                method_loss(guidance, self.loss(net, targets[sl], kind), lambda sl=sl: self.loss("noise-aware",
                            targets[sl])) if guidance.enabled else None,  # fmt: skip
                shape=self.model.sample_shape,
                seeds=seeds[sl],
                device=self.device,
                augment=self.model.augment,
            )
            xs.append(res.x0.clamp(-1, 1).detach())
            traces.append(res.stats.loss_trace)
            nfe, grads, evals = res.stats.nfe, res.stats.denoiser_grads, res.stats.loss_evals
            skipped += int(res.stats.skipped.sum())
        wall = time.perf_counter() - t0
        trace = [(i, t, torch.cat([tr[j][2] for tr in traces])) for j, (i, t, _) in enumerate(traces[0])]
        return Generated(
            x=torch.cat(xs),
            targets=torch.tensor(targets),
            nfe=nfe,
            denoiser_grads=grads,
            loss_evals=evals,
            wall_s=wall,
            loss_trace=trace,
            skipped=skipped,
            kind=kind,
        )

    # -- evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def class_loss(self, net: str, x: torch.Tensor, targets: torch.Tensor, kind: str = "ce") -> torch.Tensor:
        """Per-sample loss of clean images under ``net`` (guide, robust, judge): cross-entropy, or with
        ``kind="feature"`` the feature distance ‖f(x) − μ_y‖ to ``net``'s own class mean."""
        if kind == "feature":
            return self.loss(net, targets.tolist(), "feature")(x).double()
        p = metrics.classify(self.nets[net], x)
        return -torch.log(p[torch.arange(len(x)), targets.long()].clamp_min(1e-30)).double()

    @torch.no_grad()
    def validity(self, net: str, x: torch.Tensor, targets: torch.Tensor) -> float:
        """Share of samples that ``net`` labels as their target."""
        return float((metrics.classify(self.nets[net], x).argmax(1).cpu() == targets.cpu()).double().mean())

    def real_features(self) -> torch.Tensor:
        if self._real_features is None:
            self._real_features = metrics.features(self.nets["judge"], self.real_x)
        return self._real_features

    def fid_kid(self, x: torch.Tensor, seed: int = 0) -> dict:
        """FID and KID (×10³) of ``x`` against the 1,000 held-out digits, on the judge's 128-d features."""
        return self.feature_fid_kid(metrics.features(self.nets["judge"], x), seed)

    def feature_fid_kid(self, f: torch.Tensor, seed: int = 0) -> dict:
        """FID and KID (×10³) of judge features ``f`` against the held-out digits'."""
        kid, kid_std = metrics.kernel_inception_distance(f, self.real_features(), n_subsets=50, seed=seed)
        return {"fid": metrics.frechet_distance(f, self.real_features()), "kid_x1e3": 1e3 * kid,
                "kid_std_x1e3": 1e3 * kid_std}  # fmt: skip

    def evaluate(self, gen: Generated, fid: bool = True) -> dict:
        """Judge validity, guide loss, FID/KID, NFE and wall time of a generated set."""
        row = {
            "n": len(gen.x),
            "judge_validity": self.validity("judge", gen.x, gen.targets),
            "guide_validity": self.validity("guide", gen.x, gen.targets),
            "guide_loss": float(self.class_loss("guide", gen.x, gen.targets, gen.kind).mean()),
            "noise_like": float(metrics.noise_like(gen.x, self.real_x).double().mean()),
            "nfe": gen.nfe,
            "denoiser_grads": gen.denoiser_grads,
            "wall_s_per_sample": gen.wall_s / len(gen.x),
            "skipped_steps": gen.skipped,
        }
        if fid:
            row.update(self.fid_kid(gen.x))
        return row


class MnistTask:
    """An MNIST harness task on a :class:`MnistKit`: class guidance (target = seed mod 10) or an inverse problem /
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
        return torch.tensor(targets_for(seeds)) if self.kind in CLASS_TASKS else self.reference(seeds)[1]

    def loss(self, seeds, noise_aware: bool = False):
        t = self.targets(seeds).tolist()
        if noise_aware:
            if self.kind not in CLASS_TASKS:
                raise ValueError("cg guides with the noise-aware classifier: it applies to the class tasks only")
            return self.kit.loss("noise-aware", t)
        guide = self.kit.nets["guide"]
        if self.kind in CLASS_TASKS:
            means = self.kit.class_means("guide") if self.kind == "class-feature" else None
            return task_loss(self.kind, guide, t, means=means)
        return task_loss(self.kind, guide, t, self.reference(seeds)[0], norm=self.norm)

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
        finite = torch.isfinite(x.flatten(1)).all(1)  # a diverged sample: never valid, noise-like, PSNR −inf
        for k, s in enumerate(seeds):
            ok = bool(finite[k])
            r = {"seed": s, "target": int(y[k]), "judge_label": int(probs[k].argmax()) if ok else -1,
                 "noise_like": bool(noise[k]) or not ok, "finite": ok,
                 "guide_loss": float(task_loss[k]) if ok else float("inf"),
                 "features": [round(float(f), 6) for f in feats[k]]}  # fmt: skip
            if ref is not None:
                r.update(psnr=float(psnr[k]) if ok else float("-inf"), ssim=float(ssim[k]) if ok else float("nan"))
            out.append(r)
        return out

    def summary(self, recs: list[dict]) -> dict:
        n = len(recs)
        valid = [r["judge_label"] == r["target"] for r in recs]
        out = {"n": n, "judge_validity": sum(valid) / n, "guide_loss": sum(r["guide_loss"] for r in recs) / n}
        out["judge_validity_ci"] = list(metrics.wilson_interval(sum(valid), n))
        out["noise_like"] = sum(r.get("noise_like", False) for r in recs) / n
        out["diverged"] = sum(not r.get("finite", True) for r in recs) / n
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
            d = self.kit.feature_fid_kid(f)
            out["fid"] = d.pop("fid")
            if n >= 50:
                out["fid_ci"] = list(metrics.bootstrap_fid_interval(f, self.kit.real_features()))
            out.update(d)
        return out

    def objective(self, summary: dict, fid_ceiling: float | None = None) -> float:
        """PSNR for inverse problems; judge validity otherwise, minus 1 when FID exceeds ``fid_ceiling`` (the
        quality bound: 1.5× the unguided FID on the same seeds) and minus the noise-like share."""
        if "psnr" in summary and self.kind != "class+sketch":
            v = summary["psnr"]
        else:
            over = fid_ceiling is not None and summary.get("fid", 0.0) > fid_ceiling
            v = summary["judge_validity"] - summary.get("noise_like", 0.0) - float(over) - 1e-3 * summary["guide_loss"]
        return v if math.isfinite(v) else float("-inf")  # a diverged cell ranks last (NaN would compare as neither)


def reference_digit(target: int, index: int) -> torch.Tensor:
    """The ``index``-th held-out digit of class ``target`` (never from the generative training split)."""
    from lossguide.data import load_mnist

    x, y = load_mnist("heldout")
    pool = x[y == target]
    if not 0 <= index < len(pool):
        raise ValueError(f"--reference must be in [0, {len(pool) - 1}] for class {target}")
    return pool[index : index + 1]


def image_classifier(flag: str, name: str, net: torch.nn.Module) -> torch.nn.Module:
    """``net`` where it maps MNIST digits ``[B, 1, 28, 28]`` to 10 logits (a noise-aware classifier takes (x_t, t)
    and fails only after sampling), else a one-line error naming ``flag`` before anything is written."""
    p = next(net.parameters(), None)
    x = torch.zeros(2, *MNIST_SHAPE, dtype=p.dtype if p is not None else torch.float32,
                    device=p.device if p is not None else "cpu")  # fmt: skip
    try:
        with torch.no_grad():
            out = net(x)
        ok = isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 10)
    except (TypeError, RuntimeError, ValueError):
        ok = False
    if not ok:
        from lossguide.models import CLASSIFIERS, NOISE_AWARE

        fits = [c for c in CLASSIFIERS if c not in NOISE_AWARE]
        raise ValueError(f"{flag} {name} does not map digits [B, 1, 28, 28] to 10 class logits (a noise-aware "
                         f"classifier takes (x_t, t)); pass an image classifier: {', '.join(fits)}")  # fmt: skip
    return net


class TargetTask:
    """``lossguide sample``'s MNIST task: one target class for every seed (and, for the residual tasks, one held-out
    reference digit), a chosen guide and judge; the guide loss reported for every method (:attr:`loss`), the loss
    each method gets (:meth:`method_loss`) and each sample's judge record (:meth:`records`)."""

    def __init__(self, kind: str, target: int, reference: int = 0, guide: str = "mnist-guide",
                 judge: str = "mnist-judge", norm: str = "squared", device="cpu", dtype=torch.float32):  # fmt: skip
        from lossguide.data import load_mnist
        from lossguide.models import class_means, load_classifier

        self.kind, self.target, self.device, self.dtype = kind, target, device, dtype
        guide_net = image_classifier("--guide", guide, load_classifier(guide, device=device))
        self.judge = image_classifier("--judge", judge, load_classifier(judge, device=device).to(dtype))
        ref = reference_digit(target, reference).to(device, dtype) if kind in NORM_TASKS else None
        means = class_means(guide, device=device, net=guide_net).to(dtype) if kind == "class-feature" else None
        self.guide = guide_net.to(dtype)  # after μ_y, which the float32 guide computes on its training split
        self.loss = task_loss(kind, self.guide, target, ref, means=means, norm=norm)
        self.real = load_mnist("heldout")[0]

    def method_loss(self, guidance: GuidanceConfig, method: str, schedule, particles: bool = False):
        """The loss ``guidance`` (method spec ``method``) gets: :func:`~lossguide.harness.tasks.method_loss` with the
        noise-aware classifier toward the target for cg (a flow model's t is read as VP: x_t/k, τ); cg on a task
        without a class is refused (with ``particles`` the particle layer refuses it instead)."""
        from lossguide.models import load_classifier

        if not particles and not applicable(self.kind, method):
            raise ValueError(f"--method {method} guides with the noise-aware classifier: use it with a class loss")

        def noise_aware():
            net = load_classifier("mnist-noise-aware", device=self.device).to(self.dtype)
            return losses.NoisyClassLoss(net, self.target, schedule=schedule)

        return method_loss(guidance, self.loss, noise_aware)

    @torch.no_grad()
    def records(self, x: torch.Tensor) -> list[dict]:
        """Per sample of ``x`` (the whole fixed-shape batch, so the numbers are batch-invariant too): guide loss and
        label, the judge's label, confidence and p(target), and whether it is noise-like."""
        probs = torch.softmax(self.judge(x), dim=1)
        guide_loss, guide_label = self.loss(x), self.guide(x).argmax(1)
        noise = metrics.noise_like(x, self.real)
        return [{"guide_loss": float(guide_loss[k]), "guide_label": int(guide_label[k]),
                 "judge_label": int(probs[k].argmax()), "judge_confidence": float(probs[k].max()),
                 "judge_p_target": float(probs[k, self.target]), "noise_like": bool(noise[k])}
                for k in range(len(x))]  # fmt: skip
