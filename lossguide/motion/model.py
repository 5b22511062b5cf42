"""A small motion diffusion model: a transformer encoder over frames that predicts x0 (as MDM,
Tevet et al. 2023, §3), on per-feature normalised windows ``[L, 61]`` (:mod:`lossguide.motion.data`).

The shipped weights (``lossguide/models/weights/motion-mdm.safetensors``) hold the network in fp16 and
the normalisation statistics in fp32; the file's metadata carries the configuration (architecture,
noise schedule, frame rate, window, clips). ``load_model()`` returns a :class:`MotionModel` whose
``denoiser`` plugs into :func:`lossguide.sampling.sample`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lossguide.denoiser import Denoiser, freeze, from_module
from lossguide.motion.data import FPS, LOCOMOTION, N_FEATURES, WINDOW, positions_to_velocity, velocity_to_positions
from lossguide.schedule import NoiseSchedule

WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights" / "motion-mdm.safetensors"


@dataclass
class MotionNetConfig:
    """Architecture and data configuration of :class:`MotionTransformer`."""

    n_features: int = N_FEATURES
    window: int = WINDOW
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.1
    T: int = 1000
    schedule: str = "cosine"
    prediction_type: str = "sample"
    fps: int = FPS
    clips: list[str] = field(default_factory=lambda: list(LOCOMOTION))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``[B]`` (Vaswani et al. 2017, §3.5) → ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class MotionTransformer(nn.Module):
    """x0_hat = f(x_t, t): frames → tokens, a timestep token prepended (MDM's layout), pre-norm encoder."""

    def __init__(self, cfg: MotionNetConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.inp = nn.Linear(cfg.n_features, d)
        self.pos = nn.Parameter(torch.zeros(1, cfg.window + 1, d))
        nn.init.normal_(self.pos, std=0.02)
        self.time = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        layer = nn.TransformerEncoderLayer(
            d, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.n_features)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.ndim != 3 or x_t.shape[1:] != (self.cfg.window, self.cfg.n_features):
            raise ValueError(
                f"the motion model takes windows [B, {self.cfg.window}, {self.cfg.n_features}], "
                f"got {tuple(x_t.shape)}; pass shape=({self.cfg.window}, {self.cfg.n_features}) to sample()"
            )
        temb = self.time(timestep_embedding(t, self.cfg.d_model).to(x_t.dtype)).unsqueeze(1)
        h = torch.cat([temb, self.inp(x_t)], dim=1) + self.pos
        h = self.encoder(h)
        return self.out(self.norm(h[:, 1:]))


def make_schedule(cfg: MotionNetConfig) -> NoiseSchedule:
    if cfg.schedule == "cosine":
        return NoiseSchedule.cosine(cfg.T)
    if cfg.schedule == "linear":
        return NoiseSchedule.linear(cfg.T)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use 'cosine' or 'linear'")


@dataclass
class MotionModel:
    """A frozen motion diffusion model with its schedule and feature normalisation.

    Diffusion runs on z = (v(x) − mean)/std, where v(x) replaces the root's ground positions by its
    ground velocity in the root's heading frame (:func:`~lossguide.motion.data.positions_to_velocity`:
    the same statistics in every frame and at every heading, which a small model learns far more
    easily than integrated world positions);
    :meth:`to_motion` maps samples back to features x with positions (a differentiable cumulative sum).
    """

    net: MotionTransformer
    mean: torch.Tensor
    std: torch.Tensor
    config: MotionNetConfig
    meta: dict

    @property
    def schedule(self) -> NoiseSchedule:
        return make_schedule(self.config)

    @property
    def denoiser(self) -> Denoiser:
        return from_module(self.net, self.schedule, self.config.prediction_type)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.config.window, self.config.n_features)

    def to_motion(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised samples z ``[B, L, 61]`` → features x (differentiable)."""
        return velocity_to_positions(z * self.std.to(z) + self.mean.to(z), self.config.fps)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Features x (root positions) → normalised z (root velocities)."""
        return (positions_to_velocity(x, self.config.fps) - self.mean.to(x)) / self.std.to(x)


def save_model(path: Path, net: MotionTransformer, mean: torch.Tensor, std: torch.Tensor, meta: dict) -> bytes:
    """Serialise to safetensors bytes: fp16 network, fp32 mean/std, config and ``meta`` as metadata."""
    from safetensors.torch import save

    tensors = {f"net.{k}": v.detach().half().contiguous() for k, v in net.state_dict().items()}
    tensors["mean"] = mean.float().contiguous()
    tensors["std"] = std.float().contiguous()
    return save(tensors, metadata={"config": json.dumps(asdict(net.cfg)), "meta": json.dumps(meta)})


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> MotionModel:
    """The shipped motion model (or the safetensors file at ``path``), frozen, in ``dtype``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; train it with `python -m lossguide.training motion` (see models/manifest.json)"
        )
    with safe_open(str(path), "pt") as f:
        md = f.metadata() or {}
    if "config" not in md:
        raise ValueError(f"{path} has no motion-model config in its metadata; was it written by save_model?")
    cfg = MotionNetConfig(**json.loads(md["config"]))
    tensors = load_file(str(path))
    net = MotionTransformer(cfg)
    net.load_state_dict({k[4:]: v.to(dtype) for k, v in tensors.items() if k.startswith("net.")})
    net = freeze(net.to(dtype))
    meta = json.loads(md.get("meta", "{}"))
    return MotionModel(net, tensors["mean"].to(dtype), tensors["std"].to(dtype), cfg, meta)
