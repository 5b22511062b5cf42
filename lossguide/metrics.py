"""Sample-set distances and summary metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence

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


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Fréchet distance ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}) between Gaussian fits of two feature sets
    (Heusel et al. 2017, FID); biased upward for small sets, so report KID beside it. A set with a non-finite
    feature (a diverged sample) is at distance inf."""
    import numpy as np
    from scipy import linalg

    a, b = f1.double().cpu().numpy(), f2.double().cpu().numpy()
    if a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"need two sets of ≥ 2 feature vectors of one dimension, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: regularise as the reference implementation does
        off = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kernel_inception_distance(
    f1: torch.Tensor, f2: torch.Tensor, n_subsets: int = 50, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD² with the kernel k(x, y) = (xᵀy/d + 1)³, averaged over
    ``n_subsets`` random subsets of ``min(subset_size, |f1|, |f2|)``; returns (mean, std). Unbiased at any n; a
    set with a non-finite feature (a diverged sample) gives (inf, 0)."""
    a, b = f1.double().cpu(), f2.double().cpu()
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {len(a)} and {len(b)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf"), 0.0
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n_subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]
        y = b[torch.randperm(len(b), generator=g)[:m]]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = 1 - torch.eye(m, dtype=torch.float64)
        mmd = (kxx * off).sum() / (m * (m - 1)) + (kyy * off).sum() / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(float(mmd))
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(vals) > 1 else 0.0


@torch.no_grad()
def features(net: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Penultimate features ``net.features(x)`` in batches (the judge's 128-d features for FID/KID)."""
    return torch.cat([net.features(x[i : i + batch]) for i in range(0, len(x), batch)]).float()


@torch.no_grad()
def classify(net: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Softmax probabilities of a classifier in batches."""
    return torch.cat([torch.softmax(net(x[i : i + batch]).float(), 1) for i in range(0, len(x), batch)])


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample PSNR 10·log10(range² / MSE) in dB (images in [−1, 1]: range 2)."""
    mse = ((x.double() - ref.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def ssim(
    x: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0, window: int = 7, sigma: float = 1.5
) -> torch.Tensor:
    """Per-sample mean SSIM (Wang et al. 2004) with a Gaussian window, K1 = 0.01, K2 = 0.03, per channel."""
    import torch.nn.functional as F

    x, ref = x.double(), ref.double()
    C = x.shape[1]
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(C, 1, window, window)

    def blur(z):
        return F.conv2d(z, w, groups=C)

    mu_x, mu_y = blur(x), blur(ref)
    sxx, syy, sxy = blur(x * x) - mu_x**2, blur(ref * ref) - mu_y**2, blur(x * ref) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per image, mean |x[i+1, j] − x[i, j]| + mean |x[i, j+1] − x[i, j]|, ``[N]``.

    A noise field has several times the TV of any real digit, whatever a (possibly fooled) classifier says."""
    x = x.double()
    return (x.diff(dim=-2).abs().flatten(1).mean(1) + x.diff(dim=-1).abs().flatten(1).mean(1)).cpu()


def noise_like(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Boolean ``[N]``: the sample's total variation exceeds the largest of the real images' (``real``)."""
    return total_variation(x) > total_variation(real).max()


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (95% at z = 1.96)."""
    if n < 1:
        raise ValueError(f"a proportion needs n ≥ 1 trials, got {n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` heads in ``n`` fair coin flips: min(1, 2·P(X ≤ min(k, n − k))), X ~ Bin(n, ½).
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 ≤ k ≤ n, got k={k}, n={n}")
    m = min(k, n - k)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(m + 1)) / 2**n) if n else 1.0


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of paired binary outcomes ``a``, ``b`` on the same seeds: the discordant counts
    (``a_only``: a right and b wrong, ``b_only``: the reverse) and the exact binomial p-value of their split."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    a_only = sum(bool(x) and not bool(y) for x, y in zip(a, b, strict=True))
    b_only = sum(bool(y) and not bool(x) for x, y in zip(a, b, strict=True))
    return {"a_only": a_only, "b_only": b_only, "p": binomial_two_sided(a_only, a_only + b_only)}


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Exact sign test of paired values ``a``, ``b`` on the same seeds (ties dropped): how often each is larger and
    the binomial p-value; pairs with a non-finite value count for the finite side (both non-finite: a tie)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")

    def key(v: float) -> float:
        return -math.inf if math.isnan(v) else v

    a_wins = sum(key(x) > key(y) for x, y in zip(a, b, strict=True))
    b_wins = sum(key(y) > key(x) for x, y in zip(a, b, strict=True))
    return {"a_wins": a_wins, "b_wins": b_wins, "p": binomial_two_sided(a_wins, a_wins + b_wins)}


def holm(p: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values of one family of tests (Holm 1979), in the input order: sorted ascending,
    the i-th (0-based) of m is min(1, max over j ≤ i of (m − j)·p_(j)); reject where adjusted p < α."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def bootstrap_fid_interval(f: torch.Tensor, real: torch.Tensor, n_boot: int = 200, seed: int = 0,
                           level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """Bootstrap interval of the FID of ``f`` against fixed ``real`` features, centred on the estimate.

    Resampling with replacement duplicates samples, which shrinks their covariance and biases every bootstrap
    FID upward (the plain percentile interval can exclude the estimate itself), so the percentiles are shifted
    by the bootstrap mean's bias: [F + q_lo − mean_b, F + q_hi − mean_b], clipped at 0; (inf, inf) for a set with
    a non-finite feature."""
    if not torch.isfinite(f).all():
        return float("inf"), float("inf")
    g = torch.Generator().manual_seed(seed)
    vals = sorted(
        frechet_distance(f[torch.randint(0, len(f), (len(f),), generator=g)], real) for _ in range(n_boot)
    )
    est, bias = frechet_distance(f, real), sum(vals) / n_boot
    lo = vals[int((1 - level) / 2 * n_boot)]
    hi = vals[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return max(0.0, est + lo - bias), est + hi - bias
