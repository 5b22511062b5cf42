"""The tuners of every harness command (a grid, TFG's multiplicative beam search), their grids and tuning seeds.

Seed convention: evaluation seeds are 0..n−1; a command tunes on ``tune_seeds(command, n)`` =
``TUNE_SEED0[command] + 0..n−1``, a block beyond every evaluation set of that command, so no value is tuned on
the seeds it is scored on. The starts are the ones each command has always used: changing one changes its
tuned values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

#: first tuning seed of each command: ``lossguide bench``; the MNIST experiments (``experiments.mnist.tune_all``,
#: the shipped class settings); ``lossguide oracle --tune``; ``lossguide experiment motion`` (plus 100,000 per
#: scenario, as its evaluation seeds); ``lossguide experiment transfer`` (TGDP's guidance scale)
TUNE_SEED0 = {"bench": 10_000, "experiments": 1000, "oracle": 1_000_000, "motion": 1000, "transfer": 9000}


def tune_seeds(command: str, n: int) -> range:
    """The ``n`` tuning seeds of ``command`` (see the module docstring)."""
    return range(TUNE_SEED0[command], TUNE_SEED0[command] + n)


def half_decades(lo: float, hi: float) -> list[float]:
    """The grid of the 1–3–10 rule from ``lo`` to ``hi`` (both of the form 1·10^k or 3·10^k): every value a power of
    ten or three times one, so the ratio of neighbours alternates 3 and 10/3 (√10 on average, two points a decade).
    Each value is parsed from its decimal form, so ``half_decades(0.003, 0.3)`` is exactly ``[0.003, 0.01, ...]``."""
    out, k = [], math.floor(math.log10(lo)) - 1
    while True:
        for m in (1, 3):
            v = float(f"{m}e{k}")
            if v > hi * (1 + 1e-9):
                return out
            if v >= lo * (1 - 1e-9):
                out.append(v)
        k += 1


def doublings(lo: float, hi: float) -> list[float]:
    """``lo``, 2·lo, 4·lo, ... up to ``hi``: a grid of factor 2 (exact in binary floating point)."""
    out = [float(lo)]
    while out[-1] * 2 <= hi * (1 + 1e-9):
        out.append(out[-1] * 2)
    return out


def grid_search(evaluate: Callable, values: Sequence[float]) -> tuple[float, list]:
    """The value with the highest ``evaluate(v)`` (the first of equals) and every score, in the order of ``values``."""
    scores = [evaluate(v) for v in values]
    return values[max(range(len(values)), key=lambda i: scores[i])], scores


def tune_each(grids: Mapping[str, Sequence], score: Callable[[str, object], object]) -> dict:
    """The one tuning loop of the grid tuners: ``{name: the best value of grids[name]}`` by :func:`grid_search` of
    ``score(name, value)``, names in order (``lossguide oracle --tune``, the MNIST, motion and layout experiments)."""
    return {name: grid_search(lambda v, name=name: score(name, v), values)[0] for name, values in grids.items()}


def _key(v: float) -> float:
    return float(f"{v:.6g}")


def beam_search(
    evaluate: Callable[[list[float]], list[float]],
    init: float,
    factor: float = 3.0,
    width: int = 2,
    rounds: int = 3,
    lo: float = 1e-6,
    hi: float = 1e6,
) -> tuple[float, list[dict]]:
    """Multiplicative beam search maximising ``evaluate`` over the grid init·factor^k: round 0 scores ``init``;
    each round scores the neighbours k ± 1 of the ``width`` best points so far (no point twice: points are
    keyed by the integer k, so 3·(1/3) is the same point as 1). ``evaluate`` takes a list of values and returns
    their scores, so a round can run in parallel. Returns (best value, trace)."""
    scores: dict[int, float] = {}
    trace: list[dict] = []

    def value(k: int) -> float:
        return _key(init * factor**k)

    frontier = [0]
    for r in range(rounds + 1):
        todo = [k for k in dict.fromkeys(frontier) if k not in scores and lo <= value(k) <= hi]
        if not todo:
            break
        for k, s in zip(todo, evaluate([value(k) for k in todo]), strict=True):
            scores[k] = s
            trace.append({"round": r, "value": value(k), "score": s})
        best = sorted(scores, key=lambda k: -scores[k])[:width]
        frontier = [k + d for k in best for d in (1, -1)]
    return value(max(scores, key=lambda k: scores[k])), trace
