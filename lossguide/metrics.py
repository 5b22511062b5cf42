"""Sample-set distances and summary metrics."""

from __future__ import annotations

import torch


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance √(E_θ W₂²(θᵀx, θᵀy)) over ``n_proj`` random unit directions
    (Rabin et al. 2011); 1-D W₂ from quantiles at common levels, so the set sizes may differ."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample sets differ in dimension: {x.shape[1]} vs {y.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values
    n = max(len(px), len(py))
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    qx = torch.quantile(px, levels, dim=0)
    qy = torch.quantile(py, levels, dim=0)
    return float(((qx - qy) ** 2).mean().sqrt())
