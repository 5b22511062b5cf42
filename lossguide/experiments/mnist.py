"""The shipped MNIST models as one kit for experiments and benchmarks: generate, evaluate, FID/KID.

Class-guided sample sets use seed k with target class ``k mod 10``, so every set of n ≥ 10 seeds is
class-balanced like the held-out reference set (100 digits per class) that FID/KID compare against.
Step parameters of each method for the class task are stored in ``mnist_settings.json`` (chosen by
:func:`tune_scale` on tuning seeds ≥ 1000, disjoint from every evaluation seed set used here).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lossguide import losses, metrics, presets
from lossguide.guidance import GuidanceConfig
from lossguide.samplers import DDIM
from lossguide.sampling import sample

log = logging.getLogger(__name__)

SETTINGS_FILE = Path(__file__).with_name("mnist_settings.json")
TUNE_SEED0 = 1000


def targets_for(seeds: Sequence[int]) -> list[int]:
    """Target class of each seed: ``seed mod 10``."""
    return [int(s) % 10 for s in seeds]


def load_settings() -> dict:
    return json.loads(SETTINGS_FILE.read_text()) if SETTINGS_FILE.exists() else {}


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

    def __init__(self, device: str = "cpu"):
        from lossguide.data import load_mnist
        from lossguide.models import load_classifier, load_denoiser

        self.device = device
        self.model = load_denoiser("mnist-ddpm", device=device)
        self.nets = {
            name: load_classifier(f"mnist-{name}", device=device)
            for name in ("guide", "judge", "noise-aware", "robust")
        }
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
        ``kind`` (see :meth:`loss`), DDIM(``ddim_eta``); ``cg`` presets (loss on x_t) use the noise-aware
        classifier whatever ``net`` says. Augmentation is the model's (``digits``)."""
        seeds = list(seeds)
        targets = targets_for(seeds) if targets is None else list(targets)
        if guidance.loss_input == "x_t":
            net = "noise-aware"
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
                self.loss(net, targets[sl], kind) if guidance.enabled else None,
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
        f = metrics.features(self.nets["judge"], x)
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


#: the step parameter of each method on the MNIST class task and its multiplicative grid
TUNE_GRIDS: dict[str, tuple[str, list[float]]] = {
    "freedom": ("scale", [1.0, 3.0, 10.0, 30.0]),
    "freedom+polyak": ("eta", [0.003, 0.01, 0.03, 0.1]),
    "cg": ("scale", [3.0, 10.0, 30.0, 100.0]),
}


def config(name: str, task: str = "class", **overrides) -> GuidanceConfig:
    """A preset, or ``"<preset>+polyak"`` (the preset with the paper's Polyak step), with stored settings."""
    base, _, extra = name.partition("+")
    params = dict(load_settings().get(task, {}).get(name, {}))
    params.update(overrides)
    if extra == "polyak":
        eta = params.pop("eta", 0.01)
        return presets.with_techniques(presets.get(base, **params), polyak=eta).replace(name=name)
    if extra:
        raise ValueError(f"unknown variant {name!r}: use a preset name or '<preset>+polyak'")
    return presets.get(base, **params)


def tune_all(kit: MnistKit, names: Sequence[str], n: int = 40, steps: int = 50) -> tuple[dict, list[dict]]:
    """Tune each of ``names`` on its :data:`TUNE_GRIDS` grid; returns (settings for the class task, trace)."""
    settings = load_settings()
    trace = []
    for name in names:
        param, grid = TUNE_GRIDS[name]
        rows = []
        for v in grid:
            row = kit.evaluate(kit.generate(config(name, **{param: v}), range(TUNE_SEED0, TUNE_SEED0 + n), steps),
                               fid=False)  # fmt: skip
            row.update({"method": name, "param": param, "value": v})
            rows.append(row)
            log.info("tune %s %s=%g: validity %.3f loss %.3f", name, param, v, row["judge_validity"],
                     row["guide_loss"])  # fmt: skip
        best = max(rows, key=lambda r: (r["judge_validity"], -r["guide_loss"]))
        settings.setdefault("class", {})[name] = {param: best["value"]}
        trace += rows
    return settings, trace
