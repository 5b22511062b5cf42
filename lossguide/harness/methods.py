"""The method grammar of every harness command: a preset name (:mod:`lossguide.presets`) plus modifiers.

``+ra``, ``+polyak``, ``+tt`` switch one of Shen et al.'s techniques on (random augmentation, Polyak step,
time travel), ``-ra``, ``-polyak``, ``-tt`` switch one of ``shen2024``'s off, and ``+lossgap`` gives a Polyak
step the classical gap ℓ. Each spec has one step parameter (:func:`tuned_param`) that the tuners search,
starting from :data:`DEFAULTS`.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import replace as dc_replace

from lossguide import presets
from lossguide.augment import GaussianJitter
from lossguide.guidance import GuidanceConfig
from lossguide.steps import Polyak

#: every preset is a method (a new preset in :data:`lossguide.presets.PRESETS` needs only its tuner start below)
METHODS = tuple(presets.PRESETS)
MODIFIERS = ("+ra", "+polyak", "+tt", "+lossgap", "-ra", "-polyak", "-tt")
#: how tables and figures name each modifier's technique (:func:`label`)
TECHNIQUE_LABELS = {"ra": "RA", "polyak": "Polyak", "tt": "time travel", "lossgap": "loss gap"}
#: method → (step parameter, MNIST start, oracle start) of the tuners; an MNIST start of None is the preset's own
#: default (its signature: shen2024's η is written once, in presets.py); a Polyak step (``+polyak``) starts at
#: shen2024's η, ``shen2024-polyak`` at FreeDoM's scale
DEFAULTS: dict[str, tuple[str, float | None, float]] = {
    "dps": ("scale", None, 0.03),
    "freedom": ("scale", 3.0, 0.01),
    "ugd": ("scale", None, 0.03),
    "lgd_mc": ("scale", None, 0.03),
    "mpgd": ("scale", None, 0.01),
    "tfg": ("rho", 1.0, 0.003),
    "shen2024": ("eta", None, 0.3),
    "cg": ("scale", 30.0, 1.0),
    "dreamguider": ("scale", None, 1.0),  # its empirical scale: 1 is the paper's "no tuning" claim
    "figd": ("scale", None, 0.1),  # the oracle's tuned value (both tasks), its preset default
    "ggdm": ("scale", None, 1.0),  # Lemma 1's β_t at scale 1 (Guo et al. 2024)
    "naive_grad": ("scale", None, 1.0),
}
LOSSGAP_ETA0 = 0.1  # the classical gap η·ℓ/‖g‖² (+lossgap): dimensionless, one start for every task
ORACLE_JITTER = 0.05  # the oracle's augmentation (vectors): Gaussian jitter of this std


def parse_method(spec: str) -> tuple[str, list[str]]:
    """``"freedom+polyak+ra"`` → ("freedom", ["+polyak", "+ra"]); unknown names and modifiers raise."""
    parts = re.split(r"(?=[+-])", spec)
    base, mods = parts[0], parts[1:]
    if base not in METHODS:
        raise ValueError(f"unknown method {base!r} in {spec!r}; choose one of {', '.join(METHODS)}")
    bad = [m for m in mods if m not in MODIFIERS]
    if bad:
        raise ValueError(f"unknown modifier {bad[0]!r} in {spec!r}; modifiers are {', '.join(MODIFIERS)}")
    if base == "none" and mods:
        raise ValueError("'none' takes no modifiers")
    return base, mods


def label(spec: str) -> str:
    """The display label of method ``spec``, derived from it: ``"freedom+ra"`` → "freedom + RA", ``"shen2024-tt"`` →
    "shen2024 − time travel"."""
    base, mods = parse_method(spec)
    return " ".join([base, *(f"{'+' if m[0] == '+' else '−'} {TECHNIQUE_LABELS[m[1:]]}" for m in mods)])


def tuned_param(spec: str, oracle: bool = False) -> tuple[str, float] | None:
    """(name, start value) of the step parameter the tuners search for ``spec``; None for ``none``."""
    base, mods = parse_method(spec)
    if base == "none":
        return None
    if "+lossgap" in mods and ("+polyak" in mods or (base == "shen2024" and "-polyak" not in mods)):
        return "eta", LOSSGAP_ETA0
    if "+polyak" in mods:
        return "eta", _start("shen2024", oracle)
    if base == "shen2024" and "-polyak" in mods:
        return "scale", _start("freedom", oracle)
    return DEFAULTS[base][0], _start(base, oracle)


def _start(base: str, oracle: bool) -> float:
    name, mnist, on_oracle = DEFAULTS[base]
    if oracle:
        return on_oracle
    return inspect.signature(presets.PRESETS[base]).parameters[name].default if mnist is None else mnist


def method_config(spec: str, value: float | None = None, oracle: bool = False, **params) -> GuidanceConfig:
    """The guidance config of ``spec`` with its step parameter at ``value`` (or given by name in ``params``;
    neither: the preset's default, a Polyak step's start) and further preset parameters ``params``; the
    augmentation is ``params["augment"]``, else the oracle's jitter, else None (the task's data supplies it).

    A parameter that the resolved config does not read (``scale`` of ``freedom+polyak``, ``eta`` with
    ``polyak=False``, ...) is a one-line error naming what would make it take effect
    (:func:`lossguide.presets.check_effect`); ``augment`` is the data's, used only where the spec asks for copies."""
    cfg = _build(spec, value, oracle, params)
    base, mods = parse_method(spec)
    given = {k: v for k, v in params.items() if k != "augment"}
    aug = {"augment": params["augment"]} if "augment" in params else {}
    fn = presets.PRESETS[base]
    def without(m: str):
        rest = spec.replace(m, "", 1)
        return (None, f"the {m} modifier", f"{rest} (without {m})",
                lambda p: _build(rest, None, oracle, {**p, **aug}), lambda p: p)  # fmt: skip

    enablers = presets.param_enablers(fn) + [without(m) for m in mods]
    presets.check_effect(lambda p: _build(spec, value, oracle, {**p, **aug}), given, presets.defaults(fn),
                         where=f"method {spec!r}: ", enablers=enablers)  # fmt: skip
    return cfg


def _build(spec: str, value: float | None, oracle: bool, params: dict) -> GuidanceConfig:
    """:func:`method_config` without the check that every parameter has an effect."""
    params = dict(params)
    base, mods = parse_method(spec)
    param = tuned_param(spec, oracle)
    if param is None:
        value = None  # ``none`` has no step
    elif param[0] in params:
        if value is not None:
            raise ValueError(f"{spec!r}: give its step parameter {param[0]} once")
        value = params.pop(param[0])
    aug = params.pop("augment", GaussianJitter(ORACLE_JITTER) if oracle else None)
    if "augment" in inspect.signature(presets.PRESETS[base]).parameters:  # the presets that augment
        params["augment"] = aug
    if base == "shen2024":
        if "-polyak" in mods:
            params["polyak"] = False
        if "-ra" in mods:
            params["n_aug"] = 0
        if "-tt" in mods:
            params["n_recur"] = 1
    elif any(m.startswith("-") for m in mods):
        raise ValueError(f"'-' modifiers switch techniques of shen2024 off; {spec!r} has none to switch off")
    if value is not None and "+polyak" not in mods:
        params[param[0]] = value
    if base == "tfg" and value is not None:
        params.setdefault("mu", value)
    cfg = presets.build(base, **params)
    if "+polyak" in mods:
        cfg = presets.with_techniques(cfg, polyak=param[1] if value is None else value)
    if "+ra" in mods:
        cfg = presets.with_techniques(cfg, n_aug=10, augment=aug)
    if "+tt" in mods:
        cfg = presets.with_techniques(cfg, n_recur=3, recur_window=(0.3, 0.8))
    if "+lossgap" in mods:
        rules = {k: getattr(cfg, k) for k in ("rho", "mu") if isinstance(getattr(cfg, k), Polyak)}
        if not rules:
            raise ValueError(f"+lossgap changes a Polyak step's gap; {spec!r} has none (add +polyak)")
        cfg = cfg.replace(**{k: dc_replace(r, gap="loss") for k, r in rules.items()})
    return cfg.replace(name=spec)
