"""The settings store: the shipped step parameters of every harness command, one JSON file, a section per task.

``settings.json`` maps task → method spec → preset parameters (``{"scale": 3.0}``): sections ``class`` and
``class-feature`` are the MNIST experiments' (``lossguide experiment``), ``oracle-class`` and ``oracle-linear``
the oracle command's (``lossguide oracle``), ``motion`` the motion experiment's (by its method labels); keys
starting with ``_`` are notes. A ``lossguide bench`` run's own
``settings.json`` (``--settings``) maps task → method → the value of its step parameter; both read the same.
"""

from __future__ import annotations

import json
from pathlib import Path

from lossguide.harness.methods import tuned_param
from lossguide.io import atomic_write_json

SHIPPED = Path(__file__).with_name("settings.json")


def load(path: str | Path | None = None) -> dict:
    """The store at ``path`` (the shipped one when None)."""
    return json.loads((SHIPPED if path is None else Path(path)).read_text())


def params(task: str, method: str, store: dict | None = None, oracle: bool = False) -> dict:
    """Step parameters ``{name: value}`` of ``method`` on ``task`` in ``store`` (the shipped one when None)."""
    v = (load() if store is None else store).get(task, {}).get(method, {})
    return dict(v) if isinstance(v, dict) else {tuned_param(method, oracle)[0]: v}


def step_value(task: str, method: str, store: dict | None = None, oracle: bool = False) -> float | None:
    """The value of ``method``'s step parameter on ``task`` (None: unset, or ``none``); other parameters raise."""
    p = tuned_param(method, oracle)
    if p is None:
        return None
    kw = params(task, method, store, oracle)
    if set(kw) - {p[0]}:
        raise ValueError(f"settings of {method!r} on {task!r} fix {kw}; only its step parameter {p[0]} can be taken")
    return kw.get(p[0])


def step_or_start(task: str, method: str, store: dict | None = None, oracle: bool = False) -> float:
    """``method``'s stored step value on ``task``, else its tuner start (:data:`~lossguide.harness.methods.DEFAULTS`):
    the one fallback of the apps that read a step parameter (only the step parameter is read)."""
    v = params(task, method, store, oracle).get(tuned_param(method, oracle)[0])
    return tuned_param(method, oracle)[1] if v is None else v


def save(sections: dict, path: str | Path | None = None) -> Path:
    """Replace ``sections`` (task → method → parameters) in the store at ``path`` (the shipped one when None)."""
    path = SHIPPED if path is None else Path(path)
    atomic_write_json(path, {**(load(path) if path.exists() else {}), **sections})
    return path
