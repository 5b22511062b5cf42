"""An ε-prediction VP network as a rectified-flow velocity model: the exact VP→flow reparameterisation.

On the flow path x = (1 − t)·x0 + t·ε, dividing by k = √((1 − t)² + t²) gives the VP point
x/k = √ᾱ·x0 + √(1 − ᾱ)·ε with √ᾱ = (1 − t)/k, √(1 − ᾱ) = t/k, i.e. ᾱ(t) = (1 − t)²/k² (log-SNR
λ(t) = 2·log((1 − t)/t)). :class:`FlowFromEps` calls the ε-network on x/k at the VP timestep τ(t) whose ᾱ_τ is
ᾱ(t) — a fractional training timestep, linear interpolation of τ between the two integer timesteps that bracket
λ(t) (the UNet's sinusoidal time embedding takes fractional τ) — and returns the velocity u = ε_hat − x0_hat with
x0_hat = (x − t·ε_hat)/(1 − t) (= (x/k − √(1−ᾱ)·ε_hat)/√ᾱ, the VP Tweedie estimate), which simplifies to
u = (ε_hat − x)/(1 − t).

The stable form at t → 1. The VP network was trained on ᾱ ∈ [ᾱ_{T−1}, ᾱ_0] only, i.e. on flow times
t ∈ [t_lo, t_hi] with t = 1/(1 + √(ᾱ/(1 − ᾱ))) (t_hi ≈ 0.99365 for the linear β schedule); beyond t_hi the
division by 1 − t multiplies the error of ε_hat by t/(1 − t) → ∞ (and is 0/0 at t = 1, where the sampler starts).
For t > t_hi the wrapper evaluates the network at τ = T − 1 and reads x0_hat with that level's ᾱ_c = ᾱ_{T−1}:
x0_hat = (x/k − √(1 − ᾱ_c)·ε_hat)/√ᾱ_c (amplification 1/√ᾱ_c ≈ 157, the DDPM's own at its noisiest step), and
takes the velocity consistent with x, u = (x − x0_hat)/t (from ε_flow = (x − (1 − t)·x0_hat)/t), which is finite
at t = 1 (u = x − x0_hat, the form of the exact u = x − E[x0] there). Both forms agree at t = t_hi (there
x = (1 − t)·x0_hat + t·ε_hat holds exactly), so u is continuous in t. For t < t_lo (ᾱ above ᾱ_0) the network sees
τ = 0 and x0_hat uses the true ᾱ(t): at that little noise the division by 1 − t ≈ 1 is harmless. Within
[t_lo, t_hi] the wrapper is exactly the VP model on the flow path: a Denoiser over a FlowSchedule with
``flow_prediction`` gives back the ε-network's own ε_hat and x0_hat (at fractional τ between training timesteps).

The schedule arithmetic is float64; the network runs in its weights' dtype and u is returned in float32 (or the
input's dtype when that is float64).
"""

from __future__ import annotations

import math

import torch

from lossguide.schedule import NoiseSchedule

#: the wrapper's JSON description (``flow_wrapper.json`` in an exported folder), for the shipped mnist-flow
WRAPPER_FILE = "flow_wrapper.json"


class FlowFromEps(torch.nn.Module):
    """``u = FlowFromEps(eps_net, alpha_bar)(x, t·T)``: the velocity of an ε-network trained on VP ``alpha_bar``.

    Args:
        eps_net: ``eps_net(x_vp, tau).sample`` (a diffusers UNet2DModel) or a plain tensor-returning module.
        alpha_bar: the VP training schedule's ᾱ_τ, τ = 0..T−1 (decreasing).
        num_train_timesteps: the flow network's time scale: it is called with t·``num_train_timesteps``
            (diffusers' flow convention, as :class:`~lossguide.schedule.FlowSchedule` passes it).
    """

    def __init__(self, eps_net: torch.nn.Module, alpha_bar: torch.Tensor, num_train_timesteps: int = 1000):
        super().__init__()
        self.eps_net = eps_net
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64).cpu()
        NoiseSchedule(ab)  # validates: 1-D, in (0, 1], non-increasing
        self.num_train_timesteps = int(num_train_timesteps)
        self.register_buffer("log_snr", (ab / (1 - ab)).log(), persistent=False)  # decreasing in τ
        self.ab_min = float(ab[-1])
        self.t_lo = flow_time_of(float(ab[0]))
        self.t_hi = flow_time_of(self.ab_min)

    def vp_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """τ(t) ∈ [0, T − 1], float64: linear in τ between the training timesteps that bracket λ(t), clamped."""
        t = t.to(torch.float64).clamp(0, 1)
        lam = 2 * (torch.log1p(-t) - torch.log(t))  # λ(t) = log ᾱ/(1 − ᾱ); +inf at t = 0, −inf at t = 1
        ls = self.log_snr.to(t.device)
        T = len(ls)
        # ls is decreasing: the number of entries > λ is the index i with ls[i-1] > λ ≥ ls[i]
        i = torch.searchsorted(-ls, -lam, right=False).clamp(1, T - 1)
        lo, hi = ls[i - 1], ls[i]
        frac = ((lo - lam) / (lo - hi)).clamp(0, 1)
        tau = (i - 1).to(torch.float64) + frac
        return torch.where(
            lam >= ls[0], torch.zeros_like(tau), torch.where(lam <= ls[-1], torch.full_like(tau, T - 1), tau)
        )

    def eps(self, x_vp: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        p = next(iter(self.eps_net.parameters()), None)
        w_dtype = x_vp.dtype if p is None else p.dtype
        tt = tau.to(torch.float32 if w_dtype != torch.float64 else torch.float64)
        out = self.eps_net(x_vp.to(w_dtype), tt)
        out = out.sample if hasattr(out, "sample") else out
        return out

    def forward(self, x: torch.Tensor, timestep) -> torch.Tensor:
        """u(x, t) for ``timestep`` = t·T (a scalar or ``[B]``)."""
        B = x.shape[0]
        t = (
            torch.as_tensor(timestep, device=x.device).to(torch.float64).reshape(-1).expand(B)
            / self.num_train_timesteps
        )
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xs = x.to(out_dtype)
        view = (B,) + (1,) * (x.dim() - 1)
        tv = t.view(view)
        k = torch.sqrt((1 - tv) ** 2 + tv**2)
        eps = self.eps(xs / k.to(out_dtype), self.vp_timestep(t)).to(out_dtype)
        clamped = tv > self.t_hi  # beyond the VP model's noisiest level: read x0 at ᾱ_{T−1}
        u_exact = (eps - xs) / (1 - tv).clamp_min(1e-12).to(out_dtype)
        a_c, s_c = math.sqrt(self.ab_min), math.sqrt(1 - self.ab_min)
        x0_c = (xs / k.to(out_dtype) - s_c * eps) / a_c
        u_clamped = (xs - x0_c) / tv.clamp_min(1e-12).to(out_dtype)
        return torch.where(clamped, u_clamped, u_exact)


def flow_time_of(alpha_bar: float) -> float:
    """The flow time t with ᾱ(t) = ``alpha_bar``: (1 − t)/t = √(ᾱ/(1 − ᾱ))."""
    return 1.0 / (1.0 + math.sqrt(alpha_bar / (1 - alpha_bar)))


def describe(vp_scheduler_config: dict, num_train_timesteps: int = 1000) -> dict:
    """The JSON description of a :class:`FlowFromEps` wrapper, as written next to ``unet/``."""
    return {
        "kind": "FlowFromEps",
        "module": "lossguide.models.flowwrap",
        "prediction_type": "flow_prediction",
        "flow_schedule": {"num_train_timesteps": num_train_timesteps, "shift": 1.0},
        "vp_schedule": {
            k: vp_scheduler_config[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
        },
        "inner_prediction_type": "epsilon",
        "math": (
            "x = (1-t)x0 + t eps; k = sqrt((1-t)^2 + t^2); abar(t) = (1-t)^2/k^2; the UNet predicts eps from x/k at "
            "the VP timestep tau(t) whose abar matches (linear interpolation of tau between the training timesteps "
            "bracketing log-SNR, clamped to [0, T-1]); u = (eps - x)/(1-t) = eps - x0_hat for t <= t_hi (the flow "
            "time of abar_{T-1}); for t > t_hi x0_hat = (x/k - sqrt(1-abar_{T-1}) eps)/sqrt(abar_{T-1}) and "
            "u = (x - x0_hat)/t"
        ),
    }


def vp_alpha_bar(desc: dict) -> torch.Tensor:
    """ᾱ of the VP schedule in a wrapper description (linear β, as the shipped DDPM)."""
    vp = desc["vp_schedule"]
    if vp["beta_schedule"] != "linear":
        raise ValueError(f"FlowFromEps reads a linear β schedule, got {vp['beta_schedule']!r}")
    return NoiseSchedule.linear(
        int(vp["num_train_timesteps"]), float(vp["beta_start"]), float(vp["beta_end"])
    ).alpha_bar


#: the command that writes a flow folder (unet/, scheduler/, flow_wrapper.json, training.json)
EXPORT = "python -m lossguide.training flow --export DIR"
#: the wrapper description of the shipped mnist-flow, quoted in the errors of :func:`read_wrapper` as the example
EXAMPLE = describe({"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02})


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 2


#: (block, key) → (is the value right, what it must be); None as the block is the top level
CHECKS = {
    (None, "kind"): (lambda v: v == "FlowFromEps", '"FlowFromEps" (the one wrapper lossguide has)'),
    (None, "prediction_type"): (lambda v: v == "flow_prediction", '"flow_prediction"'),
    (None, "inner_prediction_type"): (lambda v: v == "epsilon", '"epsilon" (FlowFromEps wraps an ε-network)'),
    ("flow_schedule", "num_train_timesteps"): (_count, "an integer ≥ 2, the flow network's time scale"),
    ("flow_schedule", "shift"): (lambda v: _number(v) and v > 0, "a positive number (1.0: no shift)"),
    ("vp_schedule", "num_train_timesteps"): (_count, "an integer ≥ 2, the ε-network's training timesteps"),
    ("vp_schedule", "beta_schedule"): (lambda v: v == "linear", '"linear" (FlowFromEps reads a linear β schedule)'),
    ("vp_schedule", "beta_start"): (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
    ("vp_schedule", "beta_end"): (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
}
OPTIONAL = {(None, "prediction_type"), (None, "inner_prediction_type"), ("flow_schedule", "shift")}


def read_wrapper(path, again: str = f"or export the folder again with `{EXPORT}`"):
    """The checked wrapper description in ``path`` (a ``flow_wrapper.json``): a one-line
    :class:`~lossguide.models.folder.ModelFolderError` names the file, the missing or wrong key and the fix (``again``
    says how to write the folder anew)."""
    import json

    from lossguide.models.folder import ModelFolderError, read_json

    desc = read_json(path, f"fix the file as {describe.__module__}.describe writes it, {again}")

    def fail(block, key, need):
        name = f'"{key}" in "{block}"' if block else f'"{key}"'
        where = desc[block] if block else desc
        got = f" has no {name}, which" if key not in where else f": {name} is {where[key]!r}, but it"
        example = json.dumps({key: EXAMPLE[block][key] if block else EXAMPLE.get(key)})
        raise ModelFolderError(f"{path}{got} must be {need}; set it as in the shipped mnist-flow ({example}), "
                               f"{again}")  # fmt: skip

    for block in ("flow_schedule", "vp_schedule"):
        if block not in desc:
            raise ModelFolderError(f'{path} has no "{block}" key; add "{block}": {json.dumps(EXAMPLE[block])} '
                                   f"(the shipped mnist-flow's), {again}")  # fmt: skip
        if not isinstance(desc[block], dict):
            raise ModelFolderError(f'{path}: "{block}" is {desc[block]!r}, not a mapping; make it '
                                   f"{json.dumps(EXAMPLE[block])} (the shipped mnist-flow's), {again}")  # fmt: skip
    for (block, key), (ok, need) in CHECKS.items():
        where = desc[block] if block else desc
        if (key not in where and (block, key) not in OPTIONAL) or (key in where and not ok(where[key])):
            fail(block, key, need)
    vp = desc["vp_schedule"]
    if vp["beta_start"] >= vp["beta_end"]:
        start, end = vp["beta_start"], vp["beta_end"]
        raise ModelFolderError(f'{path}: "vp_schedule" has "beta_start" {start} ≥ "beta_end" {end}; a linear β '
                               f"schedule rises (e.g. 0.0001 to 0.02), {again}")  # fmt: skip
    return desc
