"""The package's import graph: no cycle between modules or packages, and no import that runs up the layers.

The graph is read from the source (every ``import``, also those inside functions and ``TYPE_CHECKING`` blocks), so a
lazy import that closes a circle fails here too. ``LAYERS`` is the README's picture of the house (section "Design"):
each module imports only from its own layer or below, and an app (layer ``apps``) imports no other app.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lossguide"

#: bottom to top; an entry names a module or a package (all its modules)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("io", "rng", "validate", "schedule")),
    (
        "engine",
        (
            "denoiser",
            "samplers",
            "steps",
            "figd",
            "dreamguider",
            "augment",
            "guidance",
            "sampling",
            "presets",
            "optimize",
            "smc",
            "autoguidance",
            "",
        ),
    ),  # fmt: skip
    (
        "domain",
        (
            "losses",
            "metrics",
            "oracle",
            "subspace",
            "data",
            "networks",
            "models",
            "net_losses",
            "latent",
            "layout",
            "motion",
            "transfer",
        ),
    ),  # fmt: skip
    ("writers", ("writers", "runfolder")),
    ("harness", ("harness",)),
    ("trainers", ("training",)),
    ("apps", ("run_sample", "recipes", "oracle_bench", "experiments")),
    ("cli", ("cli",)),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from a import b`` counts as ``a.b`` where that is a module)."""
    edges = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names]
                out |= {t for t in targets if t in mods} or ({base} if base in mods else set())
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in mods}
        edges[name] = out - {name}
    return edges


MODULES = _modules()
EDGES = _imports(MODULES)


def _unit(module: str) -> str:
    """The top-level module or package ``module`` belongs to (``lossguide.harness.tasks.mnist`` -> ``harness``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer_of() -> dict[str, int]:
    return {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    """The reader sees known imports, lazy ones included (else every check below passes vacuously)."""
    assert "lossguide.guidance" in EDGES["lossguide.sampling"]
    assert "lossguide.smc" in EDGES["lossguide.harness.tasks.oracle"]  # imported inside a function
    assert "lossguide.writers" in EDGES["lossguide.harness.report"]


def test_every_module_has_a_layer():
    layer = _layer_of()
    missing = sorted({_unit(m) for m in MODULES} - set(layer))
    assert not missing, f"place {missing} in a layer of LAYERS (and the README's picture)"


def test_no_module_imports_in_a_circle():
    assert _cycles(EDGES) == []


def test_no_package_imports_in_a_circle():
    units: dict[str, set[str]] = {}
    for m, targets in EDGES.items():
        units.setdefault(_unit(m), set()).update(_unit(t) for t in targets if _unit(t) != _unit(m))
    assert _cycles(units) == []


@pytest.mark.parametrize("layer", [name for name, _ in LAYERS])
def test_no_import_runs_up_the_layers(layer):
    level = _layer_of()
    apps = set(dict(LAYERS)["apps"])
    bad = []
    for m, targets in EDGES.items():
        if LAYERS[level[_unit(m)]][0] != layer:
            continue
        for t in targets:
            a, b = _unit(m), _unit(t)
            if level[b] > level[a] or (a in apps and b in apps and a != b):
                bad.append(f"{m} -> {t}")
    assert bad == []
