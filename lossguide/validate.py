"""Validation at the door: a preset's parameters checked against its signature's types and the ranges below.

The type of each parameter comes from its annotation (or, where it has none, from its default): ``float`` is a
finite real number, ``int`` an integer (an integral float such as 2.0 from YAML is refused, not rounded: write 2),
``bool`` only True/False, ``str`` a string (from :data:`CHOICES` where the name is listed), ``Callable`` any
callable, ``tuple[float, float]`` a pair of finite numbers, and ``X | None`` also None. The range comes from
:data:`RANGES` by parameter name (a preset may override one, see :func:`check_params`); an unlisted ``int`` must be
≥ 0 and an unlisted ``float`` only finite. A parameter named ``*window`` is a pair (lo, hi) with 0 ≤ lo ≤ hi ≤ 1.
A new preset is so checked from its signature alone.
"""

from __future__ import annotations

import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """lo ≤ v ≤ hi (lo < v where ``lo_open``); None is no bound."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def __contains__(self, v) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
        if self.lo is not None:
            return f" {'>' if self.lo_open else '≥'} {self.lo:g}"
        return f" ≤ {self.hi:g}" if self.hi is not None else ""


#: the range of a preset parameter, by name
RANGES: dict[str, Range] = {
    "eta": Range(0, lo_open=True),
    "max_ratio": Range(0, lo_open=True),
    "scale": Range(0),
    "backward_scale": Range(0),
    "rho": Range(0),
    "mu": Range(0),
    "power": Range(0),
    "gamma": Range(0),
    "mc_sigma": Range(0),
    "n_aug": Range(0),
    "n_iter": Range(1),
    "n_mc": Range(1),
    "n_recur": Range(1),
}

#: the allowed values of a string parameter, by name
CHOICES: dict[str, tuple[str, ...]] = {
    "polyak_gap": ("eps", "loss"),
    "rho_schedule": ("increase", "decrease", "constant"),
    "mu_schedule": ("increase", "decrease", "constant"),
    "gamma_schedule": ("decrease", "constant"),
}


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _kind(annotation, default) -> tuple[object, bool]:
    """(the base type, whether None is allowed) of an annotation, or of the default where there is none."""
    if annotation is inspect.Parameter.empty:
        if default is None or default is inspect.Parameter.empty:
            return None, True
        if isinstance(default, tuple):
            return tuple, False
        return type(default), False
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else None
    origin = typing.get_origin(annotation)
    if annotation is Callable or origin is Callable:
        return Callable, optional
    if annotation is tuple or origin is tuple:
        return tuple, optional
    return annotation, optional


def check_value(name: str, value, annotation=inspect.Parameter.empty, default=inspect.Parameter.empty,
                bound: Range | None = None, where: str = "") -> None:  # fmt: skip
    """A one-line ValueError naming ``name``, ``value`` and the fix where ``value`` does not fit the parameter."""
    kind, optional = _kind(annotation, default)
    if value is None and optional:
        return

    def fail(need: str) -> None:
        if kind is int and _is_real(value) and not _is_int(value) and float(value).is_integer():
            fix = f"write {name}={int(value)} (an integer, not {value!r})"
        elif default is not inspect.Parameter.empty:
            fix = f"pass e.g. {name}={default!r} (its default)"
        else:
            fix = f"pass {name} as {need}"
        raise ValueError(f"{where}{name} must be {need}, got {value!r} ({type(value).__name__}); {fix}")

    bound = bound if bound is not None else RANGES.get(name)
    none = " or None" if optional else ""
    if name.endswith("window"):
        ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_real(v) for v in value)
        if not ok or not 0 <= value[0] <= value[1] <= 1:
            fail(f"a pair (lo, hi) of fractions of t/T with 0 ≤ lo ≤ hi ≤ 1{none}")
    elif kind is bool:
        if not isinstance(value, bool):
            fail(f"true or false{none}")
    elif kind is int:
        bound = bound or Range(0)
        if not _is_int(value) or value not in bound:
            fail(f"an integer{bound.describe()}{none}")
    elif kind is float:
        bound = bound or Range()
        if not _is_real(value) or not math.isfinite(value) or value not in bound:
            fail(f"a finite number{bound.describe()}{none}")
    elif kind is str:
        choices = CHOICES.get(name)
        if not isinstance(value, str) or (choices and value not in choices):
            fail(f"one of {', '.join(map(repr, choices))}{none}" if choices else f"a string{none}")
    elif kind is Callable:
        if not callable(value):
            fail(f"a callable{none}")
    elif kind is tuple:
        if not isinstance(value, (tuple, list)) or not all(_is_real(v) and math.isfinite(v) for v in value):
            fail(f"a tuple of finite numbers{none}")


def check_params(fn: Callable, params: dict, ranges: dict[str, Range] | None = None, where: str = "") -> None:
    """Check every given ``params`` entry against ``fn``'s signature (types) and :data:`RANGES` (or ``ranges``)."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # an annotation that does not resolve, or no function: check by defaults
        hints = {}
    ranges = ranges or {}
    for name, value in params.items():
        p = sig.parameters.get(name)
        if p is not None and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            check_value(name, value, hints.get(name, inspect.Parameter.empty), p.default, ranges.get(name), where)


def finite_weight(value, name: str = "guidance_scale") -> float:
    """A guidance weight as a float; a one-line ValueError for a non-number, NaN or ±∞ (which would turn every sample
    non-finite)."""
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (1: the conditional model alone), got {value!r}")
    return float(value)
