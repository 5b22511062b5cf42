"""Analytic test bed: a Gaussian-mixture data distribution whose every guidance quantity is exact.

For p0 = Σ_k π_k N(m_k, C_k) and x_t = √ᾱ·x0 + √(1−ᾱ)·ε, the noisy marginal is
p_t = Σ_k π_k N(√ᾱ m_k, S_k) with S_k = ᾱ C_k + (1−ᾱ) I, so the score, ε, E[x0|x_t] (Tweedie), the
component posterior p(k|x_t) (the exact noise-aware classifier; at ᾱ = 1 the clean classifier), and the
posterior of a linear measurement y = A x0 + n, n ~ N(0, s² I) (again a Gaussian mixture) are closed-form.
Everything runs in float64 and is differentiable in x.

Every schedule family (:mod:`lossguide.schedule`) is VP after dividing by k_t = √(α_t² + σ_t²): x_t/k_t =
√ᾱ·x0 + √(1−ᾱ)·ε at the VP-equivalent ᾱ = α_t²/(α_t² + σ_t²). So the exact denoiser and the noise-aware losses
under a rectified-flow or VE schedule are the VP formulas at that ᾱ, on x_t/k_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lossguide.denoiser import Denoiser, DenoiserOutput
from lossguide.schedule import FlowSchedule, NoiseSchedule, SigmaSchedule

Schedule = NoiseSchedule | FlowSchedule | SigmaSchedule

_DT = torch.float64


def _mvn_logpdf(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N(x; mean_k, cov_k) for x [B, d], mean [K, d] (or [B, K, d]), cov [K, d, d] → [B, K]."""
    L = torch.linalg.cholesky(cov)  # [K, d, d]
    diff = x.unsqueeze(1) - mean  # [B, K, d]
    z = torch.linalg.solve_triangular(L.unsqueeze(0), diff.unsqueeze(-1), upper=False).squeeze(-1)
    logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # [K]
    d = x.shape[-1]
    return -0.5 * (z**2).sum(-1) - 0.5 * logdet - 0.5 * d * math.log(2 * math.pi)


class GaussianMixture:
    """p0(x) = Σ_k π_k N(m_k, C_k) in ``dim`` dimensions, with exact diffusion quantities."""

    def __init__(self, means: torch.Tensor, covs: torch.Tensor, weights: torch.Tensor):
        self.means = torch.as_tensor(means, dtype=_DT)
        self.covs = torch.as_tensor(covs, dtype=_DT)
        w = torch.as_tensor(weights, dtype=_DT)
        K, d = self.means.shape
        if self.covs.shape != (K, d, d) or w.shape != (K,):
            raise ValueError(
                f"means [K, d], covs [K, d, d], weights [K] expected; got {self.means.shape}, "
                f"{self.covs.shape}, {w.shape}"
            )
        if (w <= 0).any():
            raise ValueError("mixture weights must be positive")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @classmethod
    def isotropic(cls, means, std, weights=None) -> GaussianMixture:
        means = torch.as_tensor(means, dtype=_DT)
        K, d = means.shape
        std = torch.as_tensor(std, dtype=_DT).expand(K)
        covs = torch.eye(d, dtype=_DT).expand(K, d, d) * (std**2).view(K, 1, 1)
        return cls(means, covs, torch.ones(K, dtype=_DT) if weights is None else weights)

    # -- the noisy marginal ------------------------------------------------------------------------
    def _noisy(self, alpha_bar: float):
        eye = torch.eye(self.dim, dtype=_DT)
        S = alpha_bar * self.covs + (1 - alpha_bar) * eye
        return alpha_bar**0.5 * self.means, S

    def log_prob_t(self, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """log p_t(x_t) [B]."""
        m, S = self._noisy(alpha_bar)
        return torch.logsumexp(_mvn_logpdf(x_t.to(_DT), m, S) + self.weights.log(), dim=1)

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        return self.log_prob_t(x0, 1.0)

    def component_log_posterior(self, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """log p(k | x_t) [B, K]: the exact noise-aware classifier (the clean one at ᾱ = 1)."""
        m, S = self._noisy(alpha_bar)
        lp = _mvn_logpdf(x_t.to(_DT), m, S) + self.weights.log()
        return lp - torch.logsumexp(lp, dim=1, keepdim=True)

    def score(self, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """∇ log p_t(x_t) = Σ_k p(k|x_t)·(−S_k⁻¹(x_t − √ᾱ m_k))."""
        m, S = self._noisy(alpha_bar)
        x = x_t.to(_DT)
        w = self.component_log_posterior(x, alpha_bar).exp()  # [B, K]
        diff = x.unsqueeze(1) - m  # [B, K, d]
        sol = torch.linalg.solve(S.unsqueeze(0), diff.unsqueeze(-1)).squeeze(-1)
        return -(w.unsqueeze(-1) * sol).sum(1)

    def eps(self, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """The exact ε-prediction E[ε|x_t] = −√(1−ᾱ)·∇ log p_t."""
        return -((1 - alpha_bar) ** 0.5) * self.score(x_t, alpha_bar)

    def x0_mean(self, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """E[x0 | x_t] (Tweedie)."""
        return (x_t.to(_DT) + (1 - alpha_bar) * self.score(x_t, alpha_bar)) / alpha_bar**0.5

    def denoiser(self, schedule: Schedule) -> Denoiser:
        """The exact ε-denoiser under ``schedule`` of any family (for samples of shape [B, dim]).

        ε_hat = E[ε | x_t] at the VP-equivalent ᾱ = α²/(α² + σ²) of the levels (α_t, σ_t) it is called with (the
        schedule's at t, or the ones a sampler passes, e.g. a σ-space scheduler's at fractional timesteps), on
        x_t/k_t, and x0_hat = (x_t − σ_t·ε_hat)/α_t = E[x0 | x_t]; at α_t = 0 (rectified flow's t = 1) x0_hat = E[x0].
        """
        return _OracleDenoiser(self, schedule)

    def mean(self) -> torch.Tensor:
        """E[x0] [dim]."""
        return self.weights @ self.means

    # -- sampling and conditioning ------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact samples and their components."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=_DT)
        L = torch.linalg.cholesky(self.covs)
        return self.means[k] + (L[k] @ z.unsqueeze(-1)).squeeze(-1), k

    def component(self, k: int) -> GaussianMixture:
        """p0(x | y = k): component k alone, the exact class-conditional."""
        return GaussianMixture(self.means[k : k + 1], self.covs[k : k + 1], torch.ones(1, dtype=_DT))

    def condition_linear(self, A: torch.Tensor, y: torch.Tensor, noise_std: float) -> GaussianMixture:
        """p0(x | y) for y = A x + n, n ~ N(0, s² I): a mixture with C'_k = (C_k⁻¹ + AᵀA/s²)⁻¹,
        m'_k = C'_k(C_k⁻¹ m_k + Aᵀy/s²), π'_k ∝ π_k N(y; A m_k, A C_k Aᵀ + s² I)."""
        A, y = torch.as_tensor(A, dtype=_DT), torch.as_tensor(y, dtype=_DT)
        if noise_std <= 0:
            raise ValueError(f"noise_std must be > 0 (a noiseless measurement has no density), got {noise_std}")
        s2 = noise_std**2
        Cinv = torch.linalg.inv(self.covs)
        post_cov = torch.linalg.inv(Cinv + (A.T @ A) / s2)
        post_cov = 0.5 * (post_cov + post_cov.transpose(-1, -2))
        rhs = (Cinv @ self.means.unsqueeze(-1)).squeeze(-1) + (A.T @ y) / s2
        post_mean = (post_cov @ rhs.unsqueeze(-1)).squeeze(-1)
        ycov = A @ self.covs @ A.T + s2 * torch.eye(A.shape[0], dtype=_DT)
        logw = self.weights.log() + _mvn_logpdf(y.view(1, -1), self.means @ A.T, ycov)[0]
        return GaussianMixture(post_mean, post_cov, torch.softmax(logw, 0))

    # -- exact losses ----------------------------------------------------------------------------------
    def _check_class(self, y: int) -> int:
        if not 0 <= int(y) < self.n_components:
            raise ValueError(f"class {y} out of range: the mixture has components 0..{self.n_components - 1}")
        return int(y)

    def class_loss(self, y: int):
        """ℓ(x0) = −log p(y | x0): the exact clean classifier's cross-entropy, per sample."""
        y = self._check_class(y)

        def loss(x0):
            return -self.component_log_posterior(x0, 1.0)[:, y].to(x0.dtype)

        return loss

    def noisy_class_loss(self, y: int, schedule: Schedule):
        """ℓ(x_t, t) = −log p(y | x_t): the exact noise-aware classifier, for ``cg`` (any schedule family)."""
        y = self._check_class(y)

        def loss(x_t, t):
            ab, x = _vp_input(schedule, x_t, t, "noisy_class_loss")
            return -self.component_log_posterior(x, ab)[:, y].to(x_t.dtype)

        return loss

    def noisy_linear_loss(self, A, y, noise_std: float, schedule: Schedule):
        """ℓ(x_t, t) = −log p(y | x_t), exact: p(y|x_t) = Σ_k p(k|x_t) N(y; A μ_k(x_t), A Σ_k Aᵀ + s² I)
        with μ_k, Σ_k the Gaussian posterior of x0 given x_t within component k."""
        A, y = torch.as_tensor(A, dtype=_DT), torch.as_tensor(y, dtype=_DT)

        def loss(x_t, t):
            ab, x = _vp_input(schedule, x_t, t, "noisy_linear_loss")
            x = x.to(_DT)
            m, S = self._noisy(ab)
            gain = ab**0.5 * self.covs @ torch.linalg.inv(S)  # C_k √ᾱ S_k⁻¹ [K, d, d]
            mu = self.means + (gain.unsqueeze(0) @ (x.unsqueeze(1) - m).unsqueeze(-1)).squeeze(-1)  # [B, K, d]
            cov = self.covs - gain @ (ab**0.5 * self.covs)  # [K, d, d]
            ycov = A @ cov @ A.T + noise_std**2 * torch.eye(A.shape[0], dtype=_DT)
            ycov = 0.5 * (ycov + ycov.transpose(-1, -2))
            lik = _mvn_logpdf(y.expand(x.shape[0], -1), mu @ A.T, ycov)  # [B, K]
            return -torch.logsumexp(lik + self.component_log_posterior(x, ab), dim=1).to(x_t.dtype)

        return loss


def _vp_input(schedule: Schedule, x_t: torch.Tensor, t, who: str) -> tuple[float, torch.Tensor]:
    """(ᾱ_t, x_t/k_t): the VP-equivalent ᾱ at the sampler's t and the VP input (k = 1 on VP: x_t unchanged)."""
    try:
        ab = schedule.at(t)
    except ValueError as e:
        raise ValueError(
            f"the oracle's {who} ℓ(x_t, t) reads ᾱ at t = {t}, which is not a training timestep of the VP schedule "
            "(a σ-space scheduler's fractional timestep); use DDIM/DDPM/DiffusersSampler with a VP scheduler, or a "
            "FlowSchedule/SigmaSchedule sampler"
        ) from e
    k = schedule.scale(t)
    return ab, (x_t if k == 1.0 else x_t / k)


class _OracleDenoiser(Denoiser):
    """:meth:`GaussianMixture.denoiser`: exact at whatever (α_t, σ_t) it is called with."""

    def __init__(self, prior: GaussianMixture, schedule: Schedule):
        super().__init__(self._net, schedule, "epsilon")
        self.prior = prior

    def _net(self, x, tt):
        """ε_hat at the network time ``tt`` (as ``Denoiser.net``): t on VP, t·T on flow, σ on VE."""
        if not (tt == tt[0]).all():
            raise ValueError("the oracle denoiser expects one timestep per call")
        t = float(tt[0])
        if self.family == "flow":
            t = t / self.schedule.num_train_timesteps
        elif self.family == "vp":
            t = int(t) if t == int(t) else t
        ab, xv = _vp_input(self.schedule, x, t, "denoiser")
        return self.prior.eps(xv, ab).to(x.dtype)

    def __call__(self, x_t, t, alpha=None, sigma=None) -> DenoiserOutput:
        self._check_input(x_t)
        sch = self.schedule
        a = sch.alpha(t) if alpha is None else alpha
        s = sch.sigma(t) if sigma is None else sigma
        if self.family == "vp" and float(t) == int(t) and (a, s) == (sch.alpha(t), sch.sigma(t)):
            ab, x = sch.at(int(t)), x_t  # the schedule's own level: its ᾱ exactly, k = 1
        else:
            ab, x = a**2 / (a**2 + s**2), x_t / math.hypot(a, s)
        return self._posterior(x_t, x, ab, a, s)

    def _posterior(self, x_t, x, ab: float, a: float, s: float) -> DenoiserOutput:
        """(ε_hat, x0_hat) at level (α, σ) from the VP-equivalent input x = x_t/k at ᾱ: ε from the prior's score."""
        eps = self.prior.eps(x, ab).to(x_t.dtype)
        if a > 0:
            x0 = (x_t - s * eps) / a
        else:  # pure noise: x_t carries no signal, E[x0 | x_t] = E[x0], whose derivative in x_t is exactly 0;
            # `+ 0·x_t` keeps it a function of x_t, so guidance through the denoiser sees that zero gradient
            # (a zero step) instead of refusing a loss with no gradient
            x0 = self.prior.mean().to(x_t.dtype).expand_as(x_t) + 0 * x_t
        return DenoiserOutput(eps=eps, x0_hat=x0)


def linear_measurement_loss(A: torch.Tensor, y: torch.Tensor, noise_std: float):
    """ℓ(x0) = ‖y − A x0‖²/(2s²), so exp(−ℓ) is the likelihood and p0·exp(−ℓ) the exact posterior."""
    A, y = torch.as_tensor(A, dtype=_DT), torch.as_tensor(y, dtype=_DT)
    if noise_std <= 0:
        raise ValueError(f"noise_std must be > 0, got {noise_std}")

    def loss(x0):
        r = y - x0.to(_DT) @ A.T
        return ((r**2).sum(1) / (2 * noise_std**2)).to(x0.dtype)

    return loss


@dataclass
class OracleTask:
    """A guidance task on the oracle: the prior, the loss, its exact noise-aware form and the exact posterior."""

    name: str
    prior: GaussianMixture
    loss: object
    noisy_loss: object
    posterior: GaussianMixture


def default_mixture(dim: int = 8, n_components: int = 4, seed: int = 0) -> GaussianMixture:
    """The fixed test-bed prior: ``n_components`` well-separated components of norm ≈ 1.5 and
    anisotropic covariances (std 0.15–0.4), in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_components, dim, generator=g, dtype=_DT)
    means = 1.5 * means / means.norm(dim=1, keepdim=True)
    Q = torch.linalg.qr(torch.randn(n_components, dim, dim, generator=g, dtype=_DT))[0]
    std = 0.15 + 0.25 * torch.rand(n_components, dim, generator=g, dtype=_DT)
    covs = Q @ torch.diag_embed(std**2) @ Q.transpose(-1, -2)
    weights = 0.5 + torch.rand(n_components, generator=g, dtype=_DT)
    return GaussianMixture(means, 0.5 * (covs + covs.transpose(-1, -2)), weights)


def class_task(prior: GaussianMixture, schedule: Schedule, target: int | None = None) -> OracleTask:
    """Guide toward component ``target`` (default: the least likely one) with the exact clean classifier."""
    if target is None:
        target = int(prior.weights.argmin())
    return OracleTask(
        name=f"class-{target}",
        prior=prior,
        loss=prior.class_loss(target),
        noisy_loss=prior.noisy_class_loss(target, schedule),
        posterior=prior.component(target),
    )


def linear_task(
    prior: GaussianMixture, schedule: Schedule, n_meas: int = 2, noise_std: float = 0.2, seed: int = 1
) -> OracleTask:
    """Guide toward p0(x | y) for a random linear measurement y = A x* + n of a prior draw x*."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n_meas, prior.dim, generator=g, dtype=_DT) / prior.dim**0.5
    x_star, _ = prior.sample(1, g)
    y = (x_star @ A.T)[0] + noise_std * torch.randn(n_meas, generator=g, dtype=_DT)
    return OracleTask(
        name="linear",
        prior=prior,
        loss=linear_measurement_loss(A, y, noise_std),
        noisy_loss=prior.noisy_linear_loss(A, y, noise_std, schedule),
        posterior=prior.condition_linear(A, y, noise_std),
    )
