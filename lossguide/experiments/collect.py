"""Assemble the experiments' reports into one results page with its figures.

``python -m lossguide.experiments.collect RUNS DOCS [--summary FILE]`` reads ``RUNS/<name>/report.md`` (and
``RUNS/<name>-feature/report.md``, the ``--loss feature`` run) for every registered experiment that has one,
copies its PNG/GIF figures to ``DOCS/results/<name>/`` and writes
``DOCS/results.md``: the optional hand-written summary first, then each report with its heading demoted one
level and its figure links pointing at the copies. ``--only NAME,...`` replaces just those reports' sections
(and, with ``--summary``, the summary before them).
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from lossguide.experiments import EXPERIMENTS
from lossguide.io import atomic_write_text

TITLE = "# Results of `lossguide experiment`"
#: where the summary ends and the reports begin (so that ``--only`` can replace the summary too)
REPORTS = "<!-- the experiments' reports follow (python -m lossguide.experiments.collect) -->"


def _section(runs: Path, docs: Path, name: str) -> str | None:
    """Report ``name`` with its heading demoted and figure links at their copies (copied), or None if not run."""
    report = runs / name / "report.md"
    if not report.exists():
        return None
    fig_dir = docs / "results" / name
    fig_dir.mkdir(parents=True, exist_ok=True)
    for f in (runs / name).iterdir():
        if f.suffix in (".png", ".gif"):
            shutil.copyfile(f, fig_dir / f.name)
    text = report.read_text()
    text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)
    text = re.sub(r"\]\((?!http)([^)/]+\.(?:png|gif))\)", lambda m, n=name: f"](results/{n}/{m.group(1)})", text)
    return text.strip()


def collect(runs: Path, docs: Path, summary: str = "", only: list[str] | None = None) -> Path:
    """Write ``DOCS/results.md`` from every report in ``runs``; with ``only`` (folder names such as
    ``gradients-feature``), replace just those reports' sections of the existing page (same heading), keeping the
    rest, so that one rerun experiment updates the page without the others' run folders; a ``summary`` given with
    ``only`` replaces the page's summary as well."""
    out = docs / "results.md"
    if only is not None:
        text = out.read_text()
        if summary:
            if REPORTS not in text:
                raise ValueError(f"{out} has no '{REPORTS}' line after its summary; rebuild the whole page instead")
            text = "\n".join([TITLE, "", summary.strip(), "", REPORTS]) + text[text.index(REPORTS) + len(REPORTS) :]
        for name in only:
            new = _section(runs, docs, name)
            if new is None:
                raise FileNotFoundError(f"{runs / name / 'report.md'}: no report to put into {out}")
            head = new.splitlines()[0]
            start = text.find(head + "\n", text.find(REPORTS) if REPORTS in text else 0)  # not in the summary
            if start < 0:
                raise ValueError(f"{out} has no section {head!r} to replace; rebuild the whole page instead")
            end = text.find("\n## ", start + len(head))
            text = text[:start] + new + ("\n" + text[end:] if end >= 0 else "\n")
        atomic_write_text(out, text)
        return out
    parts = [TITLE, "", summary.strip(), "", REPORTS, ""] if summary else [TITLE, "", REPORTS, ""]
    folders = [f for n in EXPERIMENTS for f in (n, f"{n}-feature")]  # a --loss feature run follows its ce run
    for name in folders:
        section = _section(runs, docs, name)
        if section is not None:
            parts += [section, ""]
    atomic_write_text(out, "\n".join(parts))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("docs", type=Path)
    ap.add_argument("--summary", type=Path, default=None, help="Markdown placed before the reports")
    ap.add_argument("--only", default=None, help="comma-separated folder names: replace just their sections")
    a = ap.parse_args(argv)
    only = None if a.only is None else [v for v in a.only.split(",") if v]
    print(collect(a.runs, a.docs, a.summary.read_text() if a.summary else "", only))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
