"""The motion experiment's paired Table 3 analysis (``lossguide.experiments.motion.paired_loss_tests``) recomputed
from a finished run's per-motion ``results.csv``, so that a run made before the analysis grew a column need not be
sampled again:

    python benchmarks/motion_paired.py runs/motion/results.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from lossguide.experiments.motion import paired_loss_tests
from lossguide.writers import md_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path, help="results.csv of `lossguide experiment motion`")
    args = ap.parse_args()
    per: dict[str, list[float]] = {}
    with open(args.csv, newline="") as f:
        for r in csv.DictReader(f):  # one row per motion, every method in the same motion order
            per.setdefault(r["method"], []).append(float(r["target_mse"]) + float(r["avoid"]))
    rows, text = paired_loss_tests(per)
    print(md_table(rows, list(rows[0])), "", text, sep="\n")


if __name__ == "__main__":
    main()
