"""Analytic test bed for gradient guidance as optimisation (Guo et al. 2024): data on a linear subspace of R^d.

x0 = A·u with A ∈ R^{d×k} orthonormal columns (AᵀA = I_k) and u ~ Σ_j π_j N(μ_j, Σ_j) in R^k (the paper's
Assumption 1, X = AU; their simulations use u ~ N(0, I_k), d = 64, k = 16). The data's support is span(A); P = AAᵀ
projects on it and ‖(I − P)x‖ is a sample's off-subspace energy.

Every family is VP after dividing by k_t = √(α_t² + σ_t²) (:mod:`lossguide.schedule`). On the VP x = x_t/k_t at
ᾱ = α_t²/(α_t² + σ_t²), the in-subspace part Aᵀx = √ᾱ·u + √(1−ᾱ)·ε_k is the noisy latent mixture and the
off-subspace part (I − P)x = √(1−ᾱ)·ε_⊥ is pure noise, independent of it. So

    E[x0 | x_t] = A·E[u | Aᵀx],        E[ε | x_t] = A·E[ε_k | Aᵀx] + (I − P)x/√(1−ᾱ),

with the latent quantities those of :class:`~lossguide.oracle.GaussianMixture` in k dimensions: closed-form in every
family, differentiable in x_t, and E[x0 | x_t] lies in span(A) exactly (up to the rounding of one product with A).

Objectives (maximised, as in the paper; a guidance loss is −f) with known optima: :class:`LinearObjective`
f(x) = θᵀx and :class:`QuadraticObjective` f(x) = −‖x − x*‖² (concave; x* may lie off the subspace, its optimum
over the support is P·x*). :meth:`SubspaceMixture.regularized_optimum` is the fixed point of Algorithm 1 of the paper
on this test bed (derived in its docstring).
"""

from __future__ import annotations

import torch

from lossguide.denoiser import Denoiser, DenoiserOutput
from lossguide.oracle import GaussianMixture, _OracleDenoiser
from lossguide.schedule import FlowSchedule, NoiseSchedule, SigmaSchedule

Schedule = NoiseSchedule | FlowSchedule | SigmaSchedule

_DT = torch.float64
#: AᵀA must equal I_k to this tolerance (orthonormal columns)
ORTHO_TOL = 1e-10


class SubspaceMixture:
    """x0 = A·u, u ~ ``latent`` (a k-dimensional :class:`~lossguide.oracle.GaussianMixture`), in d = A.shape[0] dims.

    Args:
        A: [d, k] with orthonormal columns, k < d (a one-line error otherwise).
        latent: the distribution of u, in k dimensions.
    """

    def __init__(self, A: torch.Tensor, latent: GaussianMixture):
        A = torch.as_tensor(A, dtype=_DT)
        if A.ndim != 2 or not A.shape[1] < A.shape[0]:
            raise ValueError(f"A must be [d, k] with k < d (a proper subspace), got shape {tuple(A.shape)}")
        err = float((A.T @ A - torch.eye(A.shape[1], dtype=_DT)).abs().max())
        if err > ORTHO_TOL:
            raise ValueError(f"A's columns must be orthonormal (AᵀA = I, max error {err:.2g}); "
                             "orthonormalise it first, e.g. torch.linalg.qr(A)[0]")  # fmt: skip
        if latent.dim != A.shape[1]:
            raise ValueError(f"the latent mixture has {latent.dim} dimensions but A spans {A.shape[1]}")
        self.A = A
        self.latent = latent

    @property
    def dim(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def projector(self) -> torch.Tensor:
        """P = AAᵀ [d, d]."""
        return self.A @ self.A.T

    # -- geometry -----------------------------------------------------------------------------------------------
    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Aᵀx [B, k] (the coordinates of P·x in the basis A)."""
        return x.to(_DT) @ self.A

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """P·x [B, d]."""
        return self.to_latent(x) @ self.A.T

    def off_subspace(self, x: torch.Tensor) -> torch.Tensor:
        """‖(I − P)x‖ per sample [B]: the energy that leaves the data's support."""
        x = x.to(_DT)
        return (x - self.project(x)).norm(dim=1)

    # -- the distribution ----------------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact samples [n, d] and their latent components [n]."""
        u, k = self.latent.sample(n, generator)
        return u @ self.A.T, k

    def mean(self) -> torch.Tensor:
        """E[x0] [d]."""
        return self.A @ self.latent.mean()

    def latent_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[u] [k], Cov[u] [k, k]) of the whole latent mixture."""
        w, m, C = self.latent.weights, self.latent.means, self.latent.covs
        mean = w @ m
        second = (w.view(-1, 1, 1) * (C + m.unsqueeze(-1) * m.unsqueeze(-2))).sum(0)
        return mean, second - torch.outer(mean, mean)

    def covariance(self) -> torch.Tensor:
        """Cov[x0] = A·Cov[u]·Aᵀ [d, d] (rank k)."""
        return self.A @ self.latent_moments()[1] @ self.A.T

    # -- exact diffusion quantities on the VP x = x_t/k at ᾱ --------------------------------------------------------
    def x0_mean(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """E[x0 | x] [B, d] for the VP x = √ᾱ·x0 + √(1−ᾱ)·ε: A·E[u | Aᵀx], in span(A)."""
        return self.latent.x0_mean(self.to_latent(x), alpha_bar) @ self.A.T

    def eps(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """E[ε | x] [B, d] = (x − √ᾱ·E[x0 | x])/√(1−ᾱ) (ᾱ < 1: at ᾱ = 1 there is no noise to predict)."""
        if not alpha_bar < 1:
            raise ValueError(f"E[ε | x_t] needs noise: ᾱ = {alpha_bar} (the denoiser is never called at ᾱ = 1)")
        x = x.to(_DT)
        return (x - alpha_bar**0.5 * self.x0_mean(x, alpha_bar)) / (1 - alpha_bar) ** 0.5

    def score(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """∇ log p_t(x) [B, d] = −E[ε | x]/√(1−ᾱ)."""
        return -self.eps(x, alpha_bar) / (1 - alpha_bar) ** 0.5

    def denoiser(self, schedule: Schedule) -> Denoiser:
        """The exact denoiser under ``schedule`` of any family (samples of shape [B, d]): x0_hat = E[x0 | x_t] in
        span(A), ε_hat = (x_t − α_t·x0_hat)/σ_t, at whatever (α_t, σ_t) it is called with (as the oracle's)."""
        return _SubspaceDenoiser(self, schedule)

    # -- conditioning and refitting --------------------------------------------------------------------------------
    def condition_linear(self, g: torch.Tensor, y: float, noise_std: float) -> SubspaceMixture:
        """p(x0 | y) for y = gᵀx0 + n, n ~ N(0, s²): the latent mixture conditioned on y = (Aᵀg)ᵀu + n."""
        g = torch.as_tensor(g, dtype=_DT).reshape(1, -1)
        if g.shape[1] != self.dim:
            raise ValueError(f"g has {g.shape[1]} entries for data of dimension {self.dim}")
        y = torch.as_tensor(y, dtype=_DT).reshape(1)
        return SubspaceMixture(self.A, self.latent.condition_linear(g @ self.A, y, noise_std))

    def refit(self, samples: torch.Tensor, weight: float = 1.0, covariance: bool = True) -> SubspaceMixture:
        """One Gaussian on span(A) moment-matched to (1 − w)·self + w·(the empirical distribution of ``samples``).

        A score network trained to optimality on that data, within the Gaussian family, learns exactly this
        (maximum likelihood: the mean and the 1/n covariance); w = 1 is training on the samples alone. The samples
        are read in the subspace (Aᵀx). ``covariance=False`` keeps this distribution's covariance and refits the mean.
        """
        if not 0 < weight <= 1:
            raise ValueError(f"refit weight must be in (0, 1], got {weight!r}")
        u = self.to_latent(samples)
        n, k = u.shape
        if covariance and n <= k:
            raise ValueError(f"refitting a {k}-dimensional covariance needs more than {k} samples, got {n}; "
                             "pass more seeds or covariance=False")  # fmt: skip
        m0, C0 = self.latent_moments()
        m1 = u.mean(0)
        C1 = (u - m1).T @ (u - m1) / n
        mean = (1 - weight) * m0 + weight * m1
        if covariance:
            d0, d1 = m0 - mean, m1 - mean
            cov = (1 - weight) * (C0 + torch.outer(d0, d0)) + weight * (C1 + torch.outer(d1, d1))
        else:
            cov = C0
        cov = 0.5 * (cov + cov.T)
        return SubspaceMixture(self.A, GaussianMixture(mean.view(1, k), cov.view(1, k, k), torch.ones(1, dtype=_DT)))

    # -- Algorithm 1's fixed point -----------------------------------------------------------------------------------
    def regularized_optimum(self, objective, delta: float, noise_std: float) -> torch.Tensor:
        """z_reg [d] = argmax over the support m + span(A) of  f(z) − (σ²/(2δ))·(z − m)ᵀ C⁺ (z − m),  for a single
        Gaussian N(m, C = AΣAᵀ), δ = ``delta`` and σ = ``noise_std``.

        Why: one round of Algorithm 1 with the gradient g = ∇f(z) queried at z and the target y = gᵀz + δ samples
        p(x0 | y) for y = gᵀx0 + n, n ~ N(0, σ²) (what G_loss with Lemma 1's β_t samples exactly on this test bed
        with Σ = I). Its mean is m + Cg·(gᵀ(z − m) + δ)/(σ² + gᵀCg); a fixed point z satisfies
        z − m = (δ/σ²)·C·∇f(z), which is the stationarity condition above. Closed forms:
        linear f = θᵀx: z_reg = m + (δ/σ²)·Cθ; quadratic f = −‖x − x*‖²: z_reg = m + (I + λC)⁻¹λC(x* − m), λ = 2δ/σ².
        """
        if self.latent.n_components != 1:
            raise ValueError("the regularised optimum is closed-form for a single Gaussian; this mixture has "
                             f"{self.latent.n_components} components")  # fmt: skip
        if not delta > 0 or not noise_std > 0:
            raise ValueError(f"delta and noise_std must be > 0, got {delta!r}, {noise_std!r}")
        m, C = self.mean(), self.covariance()
        if isinstance(objective, LinearObjective):
            return m + (delta / noise_std**2) * C @ objective.theta
        if isinstance(objective, QuadraticObjective):
            lam = 2 * delta / noise_std**2
            eye = torch.eye(self.dim, dtype=_DT)
            return m + torch.linalg.solve(eye + lam * C, lam * C @ (objective.x_star - m))
        raise TypeError(f"no closed form for {type(objective).__name__}; use LinearObjective or QuadraticObjective")


class _SubspaceDenoiser(_OracleDenoiser):
    """:meth:`SubspaceMixture.denoiser`: the oracle's exact denoiser, with x0_hat = A·E[u | Aᵀx] computed in span(A)
    (exactly on the subspace) and ε_hat = (x_t − α·x0_hat)/σ."""

    def _posterior(self, x_t, x, ab: float, a: float, s: float) -> DenoiserOutput:
        if a > 0:
            x0 = self.prior.x0_mean(x, ab).to(x_t.dtype)
        else:  # pure noise: E[x0 | x_t] = E[x0], a function of x_t with zero derivative (as the oracle's)
            x0 = self.prior.mean().to(x_t.dtype).expand_as(x_t) + 0 * x_t
        return DenoiserOutput(eps=(x_t - a * x0) / s, x0_hat=x0)


class LinearObjective:
    """f(x) = θᵀx per sample (maximised; unbounded, so only its regularised optimum exists)."""

    def __init__(self, theta: torch.Tensor):
        self.theta = torch.as_tensor(theta, dtype=_DT).reshape(-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(_DT) @ self.theta).to(x.dtype)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.to(x.dtype).expand_as(x)


class QuadraticObjective:
    """f(x) = −‖x − x*‖² per sample (concave): maximum 0 at x*, and −‖(I − P)x*‖² at P·x* over span(A)."""

    def __init__(self, x_star: torch.Tensor):
        self.x_star = torch.as_tensor(x_star, dtype=_DT).reshape(-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return -((x.to(_DT) - self.x_star) ** 2).sum(1).to(x.dtype)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return -2 * (x - self.x_star.to(x.dtype))

    def subspace_optimum(self, prior: SubspaceMixture) -> torch.Tensor:
        """argmax of f over the data's support span(A): P·x*."""
        return prior.project(self.x_star.view(1, -1))[0]


def random_subspace(dim: int, rank: int, seed: int = 0) -> torch.Tensor:
    """A [dim, rank] with orthonormal columns, drawn uniformly (QR of a Gaussian matrix, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=_DT))
    return Q * torch.sign(torch.diagonal(R)).view(1, -1)


def default_subspace(dim: int = 16, rank: int = 4, n_components: int = 1, seed: int = 0) -> SubspaceMixture:
    """The test bed: a uniformly drawn ``rank``-dimensional subspace of R^``dim`` carrying u ~ N(0, I_k) (the
    paper's simulation data), or with ``n_components`` > 1 an equal-weight mixture of N(μ_j, 0.25·I_k), ‖μ_j‖ = 2."""
    A = random_subspace(dim, rank, seed)
    if n_components == 1:
        latent = GaussianMixture(torch.zeros(1, rank, dtype=_DT), torch.eye(rank, dtype=_DT).view(1, rank, rank),
                                 torch.ones(1, dtype=_DT))  # fmt: skip
    else:
        g = torch.Generator().manual_seed(seed + 1)
        means = torch.randn(n_components, rank, generator=g, dtype=_DT)
        latent = GaussianMixture.isotropic(2 * means / means.norm(dim=1, keepdim=True), 0.5)
    return SubspaceMixture(A, latent)


def off_subspace_direction(prior: SubspaceMixture, ratio: float, seed: int = 0) -> torch.Tensor:
    """A unit vector whose off-/on-subspace norm ratio ‖(I − P)v‖/‖Pv‖ is ``ratio`` (the code's r_off; 9 there)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(prior.dim, generator=g, dtype=_DT)
    par = prior.project(v.view(1, -1))[0]
    perp = v - par
    v = ratio * perp / perp.norm() + par / par.norm()
    return v / v.norm()
