"""Assemble the experiments' reports into one results page with its figures.

``python -m lossguide.experiments.collect RUNS DOCS [--summary FILE]`` reads ``RUNS/<name>/report.md`` (and
``RUNS/<name>-feature/report.md``, the ``--loss feature`` run) for every registered experiment that has one, copies its PNG/GIF figures to ``DOCS/results/<name>/`` and writes
``DOCS/results.md``: the optional hand-written summary first, then each report with its heading demoted one
level and its figure links pointing at the copies.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from lossguide.experiments import EXPERIMENTS
from lossguide.io import atomic_write_text


def collect(runs: Path, docs: Path, summary: str = "") -> Path:
    parts = ["# Results of `lossguide experiment`", "", summary.strip(), ""] if summary else [
        "# Results of `lossguide experiment`", ""]  # fmt: skip
    folders = [f for n in EXPERIMENTS for f in (n, f"{n}-feature")]  # a --loss feature run follows its ce run
    for name in folders:
        report = runs / name / "report.md"
        if not report.exists():
            continue
        fig_dir = docs / "results" / name
        fig_dir.mkdir(parents=True, exist_ok=True)
        for f in (runs / name).iterdir():
            if f.suffix in (".png", ".gif"):
                shutil.copyfile(f, fig_dir / f.name)
        text = report.read_text()
        text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)
        text = re.sub(r"\]\((?!http)([^)/]+\.(?:png|gif))\)", lambda m, n=name: f"](results/{n}/{m.group(1)})", text)
        parts += [text.strip(), ""]
    out = docs / "results.md"
    atomic_write_text(out, "\n".join(parts))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("docs", type=Path)
    ap.add_argument("--summary", type=Path, default=None, help="Markdown placed before the reports")
    a = ap.parse_args(argv)
    print(collect(a.runs, a.docs, a.summary.read_text() if a.summary else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
