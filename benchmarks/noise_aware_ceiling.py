"""How accurate can p(y | x_t, t) be on MNIST under the shipped linear-β schedule? Two near-Bayes references
beside the shipped noise-aware classifiers (``mnist-noise-aware``, the ``cg`` reference, and
``mnist-noise-aware-long``, the same network trained 400 epochs), on the 1,000 held-out digits noised once per t
with the same draws for every classifier:

- **KDE**: the exact posterior of the training digits' empirical distribution,
  p(y | x_t) ∝ Σ_{i: y_i = y} N(x_t; √ᾱ_t x_i, (1 − ᾱ_t) I), on split A (what the noise-aware classifier trained on)
  and on split gen (twice the digits);
- **KDE in-sample**: the same posterior on 1,000 digits drawn from split gen itself, i.e. the Bayes accuracy of the
  empirical distribution of split gen (Monte Carlo over digits and noise only, nothing fitted): where it agrees with
  the held-out KDE, the smoothed empirical distribution is a good stand-in for the smoothed data distribution;
- **LDA**: Gaussian class-conditionals N(μ_y, Σ) fitted on split gen, so that x_t | y ~ N(√ᾱ_t μ_y,
  ᾱ_t Σ + (1 − ᾱ_t) I): the Bayes classifier of that model, exact in closed form.

Neither is a proof of the Bayes rate of real digits, but both classifiers are near-optimal estimates of it; where
they sit far below a target accuracy, no trained network should be expected to reach that target.

    python benchmarks/noise_aware_ceiling.py [--ts 0,200,400,500,600,700,800] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from lossguide.data import load_mnist
from lossguide.models import NOISE_AWARE, load_classifier
from lossguide.schedule import NoiseSchedule
from lossguide.writers import md_table


def kde_log_posterior(x_t: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """log p(y | x_t) up to a constant under the empirical distribution of (x0, y0): [N, 10]."""
    log_k = -torch.cdist(x_t, alpha_bar**0.5 * x0) ** 2 / (2 * (1 - alpha_bar))
    return torch.stack([torch.logsumexp(log_k[:, y0 == c], 1) for c in range(10)], 1)


def lda_log_posterior(x_t: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """log p(y | x_t) up to a constant for x_t | y ~ N(√ᾱ μ_y, ᾱ Σ + (1 − ᾱ) I), equal class priors: [N, 10]."""
    c_inv = torch.linalg.inv(alpha_bar * sigma + (1 - alpha_bar) * torch.eye(len(sigma), dtype=sigma.dtype))
    m = alpha_bar**0.5 * mu
    return x_t @ c_inv @ m.T - 0.5 * ((m @ c_inv) * m).sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ts", default="0,200,400,500,600,700,800", help="comma-separated timesteps")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()

    schedule = NoiseSchedule.linear()
    xh, yh = load_mnist("heldout")
    xa, ya = load_mnist("A")
    xg, yg = load_mnist("gen")
    nets = {name: load_classifier(name) for name in NOISE_AWARE}
    flat = {k: v.flatten(1).double() for k, v in (("h", xh), ("a", xa), ("g", xg))}
    mu = torch.stack([flat["g"][yg == c].mean(0) for c in range(10)])
    centred = flat["g"] - mu[yg]
    sigma = centred.T @ centred / len(centred)
    gen = torch.Generator().manual_seed(args.seed)
    gen_in = torch.Generator().manual_seed(args.seed + 1)  # its own stream: the other columns' draws are unchanged
    pick = torch.randperm(len(xg), generator=gen_in)[: len(xh)]
    rows = []
    for t in (int(s) for s in args.ts.split(",")):
        ab = float(schedule.at(t))
        eps = torch.randn(xh.shape, generator=gen, dtype=torch.float64)
        x_t = ab**0.5 * xh.double() + (1 - ab) ** 0.5 * eps
        flat_t = x_t.flatten(1)
        t_batch = torch.full((len(x_t),), t, dtype=torch.long)

        def acc(logp, y=yh):
            return float((logp.argmax(1) == y).double().mean())

        eps_in = torch.randn((len(pick), flat["g"].shape[1]), generator=gen_in, dtype=torch.float64)
        x_in = ab**0.5 * flat["g"][pick] + (1 - ab) ** 0.5 * eps_in

        with torch.no_grad():
            net_acc = {name: acc(net(x_t.float(), t_batch)) for name, net in nets.items()}
        rows.append({"t": t, "alpha_bar": ab, **net_acc,
                     "KDE split A": acc(kde_log_posterior(flat_t, flat["a"], ya, ab)),
                     "KDE split gen": acc(kde_log_posterior(flat_t, flat["g"], yg, ab)),
                     "KDE in-sample, split gen": acc(kde_log_posterior(x_in, flat["g"], yg, ab), yg[pick]),
                     "LDA split gen": acc(lda_log_posterior(flat_t, mu, sigma, ab))})  # fmt: skip
    print(md_table(rows, list(rows[0])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
