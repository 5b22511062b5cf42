"""Per-sample random streams: one ``torch.Generator`` per sample for every draw.

Sample k draws only from ``generators[k]``, always the same number of values in the same order,
so its result does not depend on the batch it runs in. Nothing here touches the global RNG.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

Generators = Sequence[torch.Generator]


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed (CPU streams are the same on every device); a seed that is not an integer
    (0.5, True, a spec string such as "0-3") is a one-line error, not silently truncated."""
    if isinstance(seeds, (str, bytes)):
        raise ValueError(f"seeds must be a sequence of integers, got the string {seeds!r}; parse a spec such as "
                         "'0-15' with lossguide.runfolder.parse_seeds")  # fmt: skip
    out = []
    for s in seeds:
        try:
            if isinstance(s, bool):
                raise TypeError
            k = operator.index(s)
        except TypeError:
            raise ValueError(f"seed {s!r} ({type(s).__name__}) is not an integer; seeds must be integers") from None
        if not -(2**63) <= k < 2**64:
            raise ValueError(f"seed {k} does not fit a torch.Generator's 64 bits; seeds must be in [−2**63, 2**64)")
        out.append(torch.Generator("cpu").manual_seed(k))
    return out


def randn(shape: Sequence[int], generators: Generators, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Standard normal of ``[len(generators), *shape]``; row k drawn from ``generators[k]``.

    Row k is ``torch.randn((1, *shape), generator=generators[k])``, the convention of diffusers'
    ``randn_tensor`` with a list of generators, so the streams match diffusers' schedulers.
    """
    rows = [torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators]
    return torch.cat(rows).to(device)


def rand(shape: Sequence[int], generators: Generators, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Uniform [0, 1) of ``[len(generators), *shape]``; row k drawn from ``generators[k]``."""
    rows = [torch.rand((1, *shape), generator=g, dtype=dtype) for g in generators]
    return torch.cat(rows).to(device)


def check_generators(generators: Generators, batch: int) -> None:
    if len(generators) != batch:
        raise ValueError(
            f"got {len(generators)} generators for a batch of {batch}; pass one torch.Generator per sample "
            "(lossguide.rng.make_generators(seeds))"
        )
