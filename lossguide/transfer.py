"""Transfer by guidance: the Transfer Guided Diffusion Process (TGDP; Ouyang, Xie, Zha & Cheng, NeurIPS 2024).

A source model p and a few target samples from q. Thm 3.1: ∇ log q_t(x_t) = ∇ log p_t(x_t) + ∇ log h*(x_t, t) with
h*(x_t, t) = E_{p(x0|x_t)}[q(x0)/p(x0)] = q_t(x_t)/p_t(x_t). The density ratio w(x0) = q(x0)/p(x0) comes from a
domain classifier c(x0) = P(target | x0) trained on balanced batches (w = c/(1−c)); h_ψ(x_t, t) regresses w(x0) on
noised source samples (the conditional expectation minimises E‖h(x_t, t) − w(x0)‖², Lemma 3.2), optionally with
the two regularisers of §3.3 (:mod:`lossguide.training.tgdp`). Sampling is the frozen source model with the
classifier-guidance step of ℓ = −log h_ψ (:class:`lossguide.losses.DensityRatioLoss`, :func:`tgdp_config`), so it
runs through the engine under every sampler and family.

This module holds the pieces' networks, the target data, and the export/load of a trained set.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from lossguide.denoiser import freeze
from lossguide.guidance import GuidanceConfig
from lossguide.models.nets import GuideCNN, NoiseAwareCNN

#: the widths of the TGDP networks (small: the shipped set is ~0.3 MB in fp16)
WIDTH = 16
FILES = {"ratio": "ratio.safetensors", "domain": "domain.safetensors"}
META = "tgdp.json"


def ratio_net(n_out: int = 1) -> NoiseAwareCNN:
    """h_ψ(x_t, t) as log h: the noise-aware CNN layout with one output (10 for the conditional version, one
    log h_y per class)."""
    return NoiseAwareCNN(width=WIDTH, n_classes=n_out)


def domain_net(n_out: int = 1) -> GuideCNN:
    """c(x0) as the logit of P(target | x0): the guide CNN layout with one output (10 for the conditional version's
    joint c(x0, y), one logit per class)."""
    return GuideCNN(width=WIDTH, n_classes=n_out)


def noisy_domain_net() -> NoiseAwareCNN:
    """c'(x_t, t) as the logit of P(target | x_t, t), for the cycle regulariser."""
    return NoiseAwareCNN(width=WIDTH, n_classes=1)


class LogRatio(torch.nn.Module):
    """log h_ψ(x_t, t) ``[B]`` from a :func:`ratio_net`; for a conditional one, log h_y of ``target`` (one class for
    every sample or one per sample; consecutive rows of a sample inherit its class, as in
    :class:`lossguide.losses.NoisyClassLoss`)."""

    def __init__(self, net: torch.nn.Module, target=None):
        super().__init__()
        self.net = net
        self.target = None if target is None else torch.as_tensor(target).long().view(-1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(x_t, t)
        if out.shape[1] == 1:
            if self.target is not None:
                raise ValueError("this TGDP set is unconditional (one output); drop the target class")
            return out[:, 0]
        if self.target is None:
            raise ValueError(f"this TGDP set is conditional ({out.shape[1]} classes); pass the target class")
        from lossguide.losses import target_rows

        return out.gather(1, target_rows(self.target, len(x_t), out.device)[:, None])[:, 0]


def tgdp_config(scale: float = 1.0) -> GuidanceConfig:
    """TGDP's sampling step: ε̂ = ε − scale·σ_t·∇_{x_t} log h_ψ(x_t, t), the classifier-guidance step (``cg``) of
    ℓ = −log h_ψ; scale = 1 is Thm 3.1's exact target score."""
    from lossguide.presets import cg

    return dataclasses.replace(cg(scale), name="tgdp")


def target_indices(n: int, seed: int, split_size: int, labels: torch.Tensor) -> torch.Tensor:
    """n indices into a split with ``labels``, stratified: n // 10 per class, the remainder from random classes
    (one per class), drawn by ``seed``; sorted."""
    if not 1 <= n <= split_size:
        raise ValueError(f"the target set needs 1 ≤ N ≤ {split_size} digits, got N={n}")
    rng = np.random.default_rng(int(seed))
    y = labels.numpy()
    per, extra = divmod(n, 10)
    bonus = set(rng.permutation(10)[:extra].tolist())
    out = []
    for c in range(10):
        pool = rng.permutation(np.flatnonzero(y == c))
        out.append(pool[: per + (c in bonus)])
    return torch.from_numpy(np.sort(np.concatenate(out)))


def target_digits(n: int, seed: int, style: str = "thick") -> tuple[torch.Tensor, torch.Tensor]:
    """The N target samples: digits of the ``gen`` split (disjoint from the held-out evaluation digits) restyled by
    ``style`` (:data:`lossguide.data.styles.STYLES`), chosen by :func:`target_indices`; (x [N,1,28,28], y [N])."""
    from lossguide.data import load_mnist
    from lossguide.data.styles import STYLES

    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {sorted(STYLES)}")
    x, y = load_mnist("gen")
    idx = target_indices(n, seed, len(x), y)
    return STYLES[style](x[idx]), y[idx]


def export(folder: Path, ratio: torch.nn.Module, domain: torch.nn.Module, meta: dict) -> None:
    """Write a trained set (fp16 safetensors of h_ψ and c, and ``tgdp.json``), each file atomically."""
    from safetensors.torch import save_file

    from lossguide.io import atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key, net in (("ratio", ratio), ("domain", domain)):
        path = folder / FILES[key]
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in net.state_dict().items()}, str(tmp))  # fmt: skip
        tmp.replace(path)
    atomic_write_json(folder / META, meta)


def manifest_entry(folder: Path, meta: dict) -> dict:
    """The manifest record of an exported set under ``lossguide/models/weights`` (as the other shipped models'):
    folder, kind, SHA-256 of every file, seed, source, N, style, the command and the training record."""
    import hashlib

    folder = Path(folder)
    kind = "conditional " if meta.get("conditional") else ""
    per_class = " per class" if kind else ""
    return {
        "folder": folder.name,
        "kind": f"TGDP {kind}transfer set (lossguide.transfer): ratio network h_psi(x_t, t) as log h (NoiseAwareCNN, "
                f"width {WIDTH}) and domain classifier c(x0) (GuideCNN, width {WIDTH}, one logit{per_class}), fp16, "
                f"for {meta['source']} -> {meta['style']} digits from N={meta['n_target']} target digits",
        "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()},
        **{k: meta[k] for k in ("seed", "source", "n_target", "style", "command")},
        "training": {k: meta[k] for k in ("stages", "weight_ess_fraction", "weight_max", "train_seconds",
                                          "conditional", "cycle", "consistency", "batch", "lr")},
    }  # fmt: skip


def _folder(name_or_path) -> Path:
    from lossguide.models import WEIGHTS, ModelNotFoundError, manifest

    entry = manifest().get(str(name_or_path))
    folder = WEIGHTS / entry["folder"] if entry and "folder" in entry else Path(name_or_path).expanduser()
    if not (folder / FILES["ratio"]).is_file():
        shipped = [k for k, v in manifest().items() if str(v.get("kind", "")).startswith("TGDP")]
        raise ModelNotFoundError(
            f"no TGDP set at {str(name_or_path)!r} (it needs {FILES['ratio']}); pass a folder written by "
            f"`python -m lossguide.training tgdp ... --export DIR` or a shipped set ({', '.join(shipped) or 'none'})"
        )
    return folder


def load(name_or_path, device="cpu", target=None) -> tuple[LogRatio, torch.nn.Module, dict]:
    """A trained set by shipped name or folder: (log h_ψ, the domain classifier c, its metadata), frozen, fp32;
    ``target``: the class(es) of a conditional set."""
    from safetensors.torch import load_file

    folder = _folder(name_or_path)
    meta = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
    n_out = 10 if meta.get("conditional") else 1
    nets = {"ratio": ratio_net(n_out), "domain": domain_net(n_out)}
    for key, net in nets.items():
        state = load_file(str(folder / FILES[key]))
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return freeze(LogRatio(nets["ratio"], target).to(device)), freeze(nets["domain"].to(device)), meta
