"""Report writers for every app (experiments, bench, benchmarks): Markdown tables, figures, CSV/JSON, all atomic."""

from __future__ import annotations

import csv
import io
import shlex
import sys
from pathlib import Path

from lossguide.io import atomic_write_bytes, atomic_write_json, atomic_write_text


def fmt(v, digits: int = 4) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt(x)}" for k, x in v.items()) or "-"
    return str(v)


def md_table(rows: list[dict], cols: list[str], headers: list[str] | None = None) -> str:
    """A Markdown table of ``rows`` restricted to ``cols``."""
    head = headers or cols
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows (dicts) as CSV with the union of their keys as columns, written atomically."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (fmt(v, 8) if isinstance(v, dict) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def save_fig(fig, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure as PNG, written atomically, then closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(out: Path, title: str, command: str, body: list[str], data: dict) -> None:
    """``report.md`` (title, the command, the body) and ``results.json`` (``data`` plus the command)."""
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    text = [f"# {title}", "", f"Made by `{command}`.", "", *body, ""]
    atomic_write_text(out / "report.md", "\n".join(text))
    atomic_write_json(out / "results.json", {"command": command, "argv": argv, **data})
