"""The project's small MNIST networks (28×28, one channel, inputs in [−1, 1])."""

from __future__ import annotations

import math

import torch
from torch import nn


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class GuideCNN(nn.Module):
    """The guide classifier: a plain VGG-style CNN (five conv-BN-ReLU layers, two max-pools, global average
    pooling), an off-the-shelf-style network."""

    def __init__(self, width: int = 32, n_classes: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(1, w), *_conv_bn(w, w), nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(4 * w, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.skip(x))


class JudgeResNet(nn.Module):
    """The judge: a small ResNet (BatchNorm, strided residual blocks), a different architecture from the
    guide, trained on a disjoint split. ``features`` gives the 128-d penultimate features used for FID/KID."""

    def __init__(self, width: int = 32, n_classes: int = 10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.blocks = nn.Sequential(_ResBlock(w, w, 1), _ResBlock(w, 2 * w, 2), _ResBlock(2 * w, 4 * w, 2))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, n_classes)

    def features(self, x):
        return self.pool(self.blocks(self.stem(x)))

    def forward(self, x):
        return self.head(self.features(x))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().view(-1, 1) * freqs.view(1, -1)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class NoiseAwareCNN(nn.Module):
    """p(y | x_t, t): the guide CNN's layout with FiLM conditioning on a timestep embedding
    (the noise-aware classifier of classifier guidance, Dhariwal & Nichol 2021)."""

    def __init__(self, width: int = 32, n_classes: int = 10, t_dim: int = 64):
        super().__init__()
        w = width
        self.t_dim = t_dim
        chans = [(1, w), (w, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in chans)
        self.films = nn.ModuleList(nn.Linear(t_dim, 2 * b) for _, b in chans)
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim), nn.SiLU())
        self.head = nn.Linear(4 * w, n_classes)

    def forward(self, x, t):
        e = self.t_mlp(timestep_embedding(t, self.t_dim))
        h = x
        for k, (conv, film) in enumerate(zip(self.convs, self.films, strict=True)):
            scale, shift = film(e).chunk(2, dim=1)
            h = torch.relu(conv(h) * (1 + scale[..., None, None]) + shift[..., None, None])
            if k in (1, 3):
                h = torch.max_pool2d(h, 2)
        return self.head(h.mean(dim=(2, 3)))


ARCHS = {"GuideCNN": GuideCNN, "JudgeResNet": JudgeResNet, "NoiseAwareCNN": NoiseAwareCNN}
