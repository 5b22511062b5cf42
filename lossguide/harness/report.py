"""``lossguide bench``'s outputs: results.csv/json, tables.md, Pareto plots, sample grids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from lossguide.harness.tasks import ORACLE_TASKS, applicable
from lossguide.harness.tuning import TUNE_SEED0
from lossguide.io import atomic_write_json, atomic_write_text
from lossguide.metrics import mcnemar, sign_test
from lossguide.writers import md_table, pyplot, save_fig, write_csv


class Bench(Protocol):
    """What the writers read of a :class:`~lossguide.harness.bench.Bench` (a protocol: report sits below bench)."""

    out: Path
    cfg: Any

    def step_value(self, settings: dict, task: str, method: str): ...

    def shards(self, phase: str, task: str, method: str, value, steps: int, seeds: list[int]) -> list: ...


TIMING_KEYS = ("wall_s_per_sample", "peak_mem_mb")
TABLE_COLS = {
    "mnist": ["method", "steps", "param", "judge_validity", "worst_class_validity", "guide_loss", "fid", "kid_x1e3",
              "nfe", "denoiser_grads", "wall_s_per_sample"],
    "inverse": ["method", "steps", "param", "psnr", "ssim", "judge_validity", "guide_loss", "kid_x1e3", "nfe",
                "denoiser_grads", "wall_s_per_sample"],
    "oracle": ["method", "steps", "param", "sw_to_posterior", "validity", "nfe", "denoiser_grads",
               "wall_s_per_sample"],
}  # fmt: skip


PAIRED_COLS = ["method", "steps", "metric", "vs", "delta_vs_best", "test", "best_better", "method_better", "p_paired"]


def _table_kind(task: str) -> str:
    return "oracle" if task in ORACLE_TASKS else ("inverse" if task in ("sketch", "inpaint", "sr") else "mnist")


def per_seed(task: str, records: list[dict]) -> dict | None:
    """The per-seed outcome that the paired tests compare, in seed order: judge validity on the MNIST class tasks,
    PSNR on the inverse problems; None on the oracle (its SW is a property of the whole set)."""
    if task in ORACLE_TASKS:
        return None
    recs = sorted(records, key=lambda r: r["seed"])
    seeds = [r["seed"] for r in recs]
    if _table_kind(task) == "inverse":
        return {"metric": "psnr", "seeds": seeds, "values": [r["psnr"] for r in recs]}
    return {"metric": "judge_validity", "seeds": seeds, "values": [int(r["judge_label"] == r["target"]) for r in recs]}


def paired_against_best(rows: list[dict]) -> list[dict]:
    """Each method against the best at the same budget on the same seeds (rows of one task, best = highest mean
    of the per-seed outcome): the difference of means, the exact McNemar test for validity, the exact sign test
    for PSNR (counts of seeds where each side is better, two-sided p)."""
    out = []
    for steps in sorted({r["steps"] for r in rows}):
        cells = [r for r in rows if r["steps"] == steps and r.get("per_seed")]
        if len(cells) < 2:
            continue
        mean = {id(r): sum(r["per_seed"]["values"]) / len(r["per_seed"]["values"]) for r in cells}
        best = max(cells, key=lambda r: mean[id(r)])
        for r in cells:
            if r is best:
                continue
            t = paired_test(best, r)
            out.append({"method": r["method"], "steps": steps, "metric": r["per_seed"]["metric"], "vs": best["method"],
                        "delta_vs_best": mean[id(r)] - mean[id(best)], "test": t["test"],
                        "best_better": t["ref_better"], "method_better": t["other_better"],
                        "p_paired": t["p"]})  # fmt: skip
    return out


def paired_test(ref: dict, other: dict) -> dict:
    """Two cells' per-seed outcomes on the same seeds: McNemar's exact test on validity, the exact sign test on
    PSNR; the counts of seeds better for each side and the two-sided p."""
    if other["per_seed"]["seeds"] != ref["per_seed"]["seeds"]:
        raise ValueError(f"paired test of {other['method']} against {ref['method']}: the seed lists differ")
    a, b = ref["per_seed"]["values"], other["per_seed"]["values"]
    if ref["per_seed"]["metric"] == "judge_validity":
        t = mcnemar(a, b)
        return {"test": "McNemar", "ref_better": t["a_only"], "other_better": t["b_only"], "p": t["p"]}
    t = sign_test(a, b)
    return {"test": "sign", "ref_better": t["a_wins"], "other_better": t["b_wins"], "p": t["p"]}


def write_outputs(bench: Bench, rows: list[dict], settings: dict) -> None:
    """results.csv/json, tables.md, Pareto plots and sample grids."""
    out, cfg = bench.out, bench.cfg
    s0 = TUNE_SEED0["bench"]
    flat = [{k: v for k, v in r.items() if k not in ("per_class_validity", "per_seed")} for r in rows]
    write_csv(out / "results.csv", flat)
    atomic_write_json(out / "results.json", {"config": cfg.to_dict(), "settings": settings, "rows": rows})
    lines = ["# lossguide bench", "", f"Config: `{json.dumps(cfg.to_dict())}`", "",
             f"Evaluation seeds {cfg.eval_seed0}–{cfg.eval_seed0 + cfg.n_eval - 1}; tuning seeds {s0}–"
             f"{s0 + cfg.n_tune - 1}; NFE and gradients are per sample (best-of-N counts every candidate).",
             ""]  # fmt: skip
    for task in cfg.tasks:
        tr = [r for r in rows if r["task"] == task]
        if not tr:
            continue
        key = "sw_to_posterior" if task in ORACLE_TASKS else ("psnr" if _table_kind(task) == "inverse" else None)
        if key == "sw_to_posterior":
            tr = sorted(tr, key=lambda r: (r["steps"], r[key]))
        elif key:
            tr = sorted(tr, key=lambda r: (r["steps"], -r[key]))
        else:
            tr = sorted(tr, key=lambda r: (r["steps"], -r["judge_validity"], r.get("fid", 0)))
        lines += [f"## {task}", "", md_table(tr, TABLE_COLS[_table_kind(task)]), ""]
        paired = paired_against_best(tr)
        if paired:
            lines += ["Paired against the best method at each budget (same seeds; McNemar's exact test on judge "
                      "validity, the exact sign test on PSNR; `best_better` / `method_better`: seeds where only "
                      "that side is valid, or where its PSNR is higher):", "", md_table(paired, PAIRED_COLS),
                      ""]  # fmt: skip
    atomic_write_text(out / "tables.md", "\n".join(lines))
    plt = pyplot()
    for task in [t for t in cfg.tasks if t not in ORACLE_TASKS]:
        tr = [r for r in rows if r["task"] == task and "fid" in r]
        if not tr:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, xkey, xlabel in ((axes[0], "fid", "FID (judge features) ↓"),
                                 (axes[1], "wall_s_per_sample", "wall s / sample ↓")):  # fmt: skip
            pts = [(r[xkey], r["judge_validity"], f"{r['method']}@{r['steps']}") for r in tr]
            for x, y, lab in pts:
                ax.scatter(x, y, s=14)
                ax.annotate(lab, (x, y), fontsize=6)
            front = sorted(p for p in pts if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in pts))
            ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("judge validity ↑")
            ax.legend(fontsize=7)
        fig.suptitle(f"{task}")
        save_fig(fig, out / f"pareto_{task.replace('+', '_')}.png")
        _sample_grid(bench, task, settings, out / f"samples_{task.replace('+', '_')}.png")


def _sample_grid(bench: Bench, task: str, settings: dict, path: Path, per_method: int = 10) -> None:
    """One row of the first evaluation samples per (method, steps)."""
    cfg = bench.cfg
    rows = []
    for method in cfg.methods:
        if not applicable(task, method):
            continue
        v = bench.step_value(settings, task, method)
        for steps in cfg.steps:
            sh = bench.shards("eval", task, method, v, steps, cfg.eval_seeds())[0]
            pt = sh.path(bench.out).with_suffix(".pt")
            if pt.exists():
                rows.append((f"{method}@{steps}", torch.load(pt)[:per_method]))
    if not rows:
        return
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), per_method, figsize=(per_method * 0.8, len(rows) * 0.85), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(per_method):
            ax = axes[r, c]
            if c < len(imgs):
                ax.imshow(imgs[c, 0].numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    save_fig(fig, path)


def comparable(rows: Sequence[dict]) -> list[dict]:
    """Rows without timing and memory (what a resumed or sharded run must reproduce exactly)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
