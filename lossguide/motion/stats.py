"""Realism statistics of motions ``[N, L, 61]`` from forward kinematics (metres, seconds).

Per window: mean root speed on the ground plane, foot-contact share (a foot is in contact when its
lowest point, ankle or toe, is below ``CONTACT_HEIGHT``), foot skating (mean horizontal speed of feet in
contact, as the foot-skating measures of motion-generation papers), and mean joint speed. Against the
training windows we report the 1-D Wasserstein-1 distance of each per-window statistic's distribution.
"""

from __future__ import annotations

import torch

from lossguide.motion.data import DATA_SEED, FPS, POINTS, MotionData, forward_kinematics

CONTACT_HEIGHT = 0.03  # metres; the data's toes rest at ≈ 0.01 m
FOOT_POINTS = {"right": ("right_ankle", "right_toe"), "left": ("left_ankle", "left_toe")}
STAT_NAMES = ("root_speed", "contact", "skating", "joint_speed")


@torch.no_grad()
def window_stats(x: torch.Tensor, fps: int = FPS) -> dict[str, torch.Tensor]:
    """Per-window statistics ``{name: [N]}`` (see the module docstring)."""
    x = x.double()
    p = forward_kinematics(x)  # [N, L, P, 3]
    root = x[..., 0:2]
    root_speed = ((root[:, 1:] - root[:, :-1]).norm(dim=-1) * fps).mean(1)
    contacts, slides = [], []
    for pts in FOOT_POINTS.values():
        idx = [POINTS.index(n) for n in pts]
        fp = p[:, :, idx]  # [N, L, 2, 3]
        low = fp[..., 1].argmin(dim=-1)  # the lower of ankle/toe per frame
        y = fp[..., 1].gather(2, low.unsqueeze(-1)).squeeze(-1)
        xz = fp[..., [0, 2]].gather(2, low.view(*low.shape, 1, 1).expand(-1, -1, 1, 2)).squeeze(2)
        c = (y < CONTACT_HEIGHT)[:, 1:] & (y < CONTACT_HEIGHT)[:, :-1]
        v = (xz[:, 1:] - xz[:, :-1]).norm(dim=-1) * fps
        contacts.append(c.double())
        slides.append(v * c)
    c = torch.stack(contacts).sum(0)  # contacts per frame [N, L−1]
    skating = torch.stack(slides).sum(0).sum(1) / c.sum(1).clamp_min(1)
    contact = (c > 0).double().mean(1)
    joint_speed = ((p[:, 1:] - p[:, :-1]).norm(dim=-1) * fps).mean(dim=(1, 2))
    return {"root_speed": root_speed, "contact": contact, "skating": skating, "joint_speed": joint_speed}


def wasserstein1(a: torch.Tensor, b: torch.Tensor) -> float:
    """W1 between two 1-D empirical distributions (∫|F_a⁻¹ − F_b⁻¹| on a common quantile grid)."""
    q = torch.linspace(0, 1, 201, dtype=torch.float64)
    return float((torch.quantile(a.double(), q) - torch.quantile(b.double(), q)).abs().mean())


def summarize(stats: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Mean, std and 10/50/90% quantiles of each statistic."""
    out = {}
    for k, v in stats.items():
        v = v.double()
        qs = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        out[k] = {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0, "q10": qs[0]}
        out[k].update({"q50": qs[1], "q90": qs[2]})
    return out


def compare(samples: dict[str, torch.Tensor], data: dict[str, torch.Tensor]) -> dict[str, float]:
    """W1 of every per-window statistic between samples and data (same units as the statistic)."""
    return {k: wasserstein1(samples[k], data[k]) for k in STAT_NAMES}


def data_reference(n: int = 1024, seed: int = 2):
    """Statistics of ``n`` training windows (the shipped model's data recipe; ``seed`` picks the windows)."""
    data = MotionData.build(seed=DATA_SEED)
    x = data.windows(n, torch.Generator().manual_seed(seed))
    return window_stats(x), x


def unguided_realism(model, seeds, steps: int = 50, reference: dict | None = None) -> dict:
    """Unguided DDIM samples of ``model`` against the training windows: summaries and W1 per statistic."""
    from lossguide.samplers import DDIM
    from lossguide.sampling import sample

    ref = reference if reference is not None else data_reference()[0]
    z = sample(model.denoiser, DDIM(model.schedule, steps), shape=model.shape, seeds=list(seeds)).x0
    s = window_stats(model.to_motion(z))
    return {"samples": summarize(s), "data": summarize(ref), "w1": compare(s, ref), "stats": s}
