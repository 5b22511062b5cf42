"""The particles experiment's MNIST part: quality against compute of K weighted particles (``lg.smc``, TDS potential,
a guided proposal) beside best-of-N of the same proposal, on the shipped models through the benchmark harness
(:class:`~lossguide.harness.bench.Bench`: its tasks, records and resumable shards)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lossguide.harness.bench import Bench, BenchConfig
from lossguide.harness.methods import tuned_param
from lossguide.harness.tasks.mnist import MnistKit
from lossguide.layout.evaluate import fid_floor
from lossguide.metrics import mcnemar, sign_test
from lossguide.writers import md_table, pyplot, save_fig

log = logging.getLogger(__name__)

TASKS = ("class-feature", "inpaint")
#: the proposal of every particle and of every best-of-N candidate, at its stored step value on the task
PROPOSAL = "freedom"
KS, QUICK_KS = (1, 4, 16), (1, 2)
#: best-of-N beside K particles: N = NFE_MATCH·K candidates, so both spend the same denoiser passes per seed within
#: 6% (TDS costs 2·steps − 1 passes per particle, the proposal's and the twist's, a candidate ``steps``)
NFE_MATCH = 2
STEPS, QUICK_STEPS = 10, 5
N, QUICK_N = 200, 10
#: the proposal's step value is tuned once per task, single-particle at DDIM-steps η = 1, by the harness's tuner
#: (beam search, factor 3, on its tuning seeds, disjoint from the evaluation seeds); quick: the tuner's start
N_TUNE = 32
#: DDIM η of particles and candidates alike (the particle weights need a stochastic step)
ETA = 1.0
#: real-digit FID draws at the evaluation size (:func:`lossguide.layout.evaluate.fid_floor`)
FID_FLOOR_DRAWS, QUICK_FID_FLOOR_DRAWS = 5, 1


def _cell(out: Path, task: str, K: int, n: int, steps: int, settings: dict, particles: bool, kit: MnistKit) -> dict:
    """One harness cell: K particles per seed (``particles``) or best-of-K candidates, DDIM-``steps`` η = 1."""
    cfg = BenchConfig(tasks=[task], methods=[PROPOSAL], steps=[steps], n_eval=n, tune=False, ddim_eta=ETA,
                      batch=min(n, 50), particles=K if particles else None, potential="tds" if particles else None,
                      best_of=1 if particles else K)  # fmt: skip
    folder = out / f"{task}-{'particles' if particles else 'best-of'}-{K}"
    bench = Bench(cfg, folder, kit)
    folder.mkdir(parents=True, exist_ok=True)
    (row,) = bench.evaluate(settings)
    return {"task": task, "method": f"particles (tds, {PROPOSAL})" if particles else f"best-of-N ({PROPOSAL})",
            "K": K, "steps": steps, "n": row["n"], "judge_validity": row["judge_validity"], "psnr": row.get("psnr"),
            "fid": row.get("fid"), "guide_loss": row["guide_loss"], "noise_like": row["noise_like"],
            "nfe_per_seed": row["nfe"], "wall_s_per_seed": row["wall_s_per_sample"],
            "param": row["param"], "per_seed": row["per_seed"]}  # fmt: skip


def run(out: Path, quick: bool) -> tuple[list[dict], list[float], list[str]]:
    """Rows (task × K × particles/best-of), the real-digit FID spread at n, and the report's section."""
    ks, steps, n = (QUICK_KS, QUICK_STEPS, QUICK_N) if quick else (KS, STEPS, N)
    out = Path(out) / "mnist"
    settings, traces, kit = {}, {}, MnistKit()
    for task in TASKS:
        if quick:  # the tuner's start (the harness's tuning has its own tests)
            settings[task] = {PROPOSAL: tuned_param(PROPOSAL)[1]}
            traces[task] = {"seeds": "none (quick: the tuner's start)"}
            continue
        cfg = BenchConfig(tasks=[task], methods=[PROPOSAL], steps=[steps], n_tune=N_TUNE, tune_steps=steps,
                          beam_rounds=2, ddim_eta=ETA, batch=50)  # fmt: skip
        folder = out / f"{task}-tune"
        folder.mkdir(parents=True, exist_ok=True)
        settings[task] = {PROPOSAL: Bench(cfg, folder, kit).tune()[task][PROPOSAL]}
        traces[task] = json.loads((folder / "tuning.json").read_text())
    rows = []
    for task in TASKS:
        for K in ks:
            for particles, k in ((True, K), (False, NFE_MATCH * K)):
                rows.append(_cell(out, task, k, n, steps, settings, particles, kit))
                log.info("mnist %s %s K=%d: %s", task, rows[-1]["method"], k, rows[-1])
    draws = QUICK_FID_FLOOR_DRAWS if quick else FID_FLOOR_DRAWS
    floor = fid_floor(kit, n, seeds=range(draws))
    _figure(out.parent, rows)
    body = [
        "## MNIST: quality against compute",
        "",
        f"Tasks {', '.join(f'`{t}`' for t in TASKS)} on the shipped models through the benchmark harness, seeds "
        f"0–{n - 1}, DDIM-{steps} η = {ETA}. **particles**: K weighted particles per seed (`lg.smc`, TDS potential "
        f"exp(−ℓ(x0_hat)), {PROPOSAL} as the proposal at a step value tuned once per task for one particle at "
        f"this DDIM-{steps} η = {ETA} by the harness's tuner (`Bench.tune`: beam search ×3 from its start, tuning "
        f"seeds {', '.join(t + ' ' + traces[t]['seeds'] for t in TASKS)}, disjoint from the evaluation seeds): "
        f"{', '.join(f'{t}: {settings[t][PROPOSAL]:g}' for t in TASKS)}, reused at every K and by best-of-N; "
        f"**best-of-N**: N = {NFE_MATCH}K {PROPOSAL} candidates per seed (η = {ETA}), the one of lowest guide "
        f"loss kept: the same denoiser passes per seed as K TDS particles (2·{steps} − 1 per particle, {steps} per "
        "candidate). K = 1 is the single-particle proposal; the K column holds N on best-of-N rows. NFE per seed "
        "counts every particle or candidate; wall "
        f"time per seed on one CPU thread. Real digits at n = {n} score FID {min(floor):.2f}–{max(floor):.2f} "
        f"({draws} draws of the gen split against the held-out digits): FID gaps inside that range are "
        "noise.",
        "",
        md_table(
            rows,
            [
                "task",
                "method",
                "K",
                "n",
                "judge_validity",
                "psnr",
                "fid",
                "guide_loss",
                "nfe_per_seed",
                "wall_s_per_seed",
            ],
        ),  # fmt: skip
        "",
        "![quality vs compute](quality_vs_compute.png)",
        "",
        _reading(rows, ks, floor),
        "",
    ]
    return rows, floor, body


def _reading(rows: list[dict], ks, floor: list[float]) -> str:
    """Particles against best-of-N at each K, from the rows (metric, NFE and wall time side by side)."""
    parts = []
    for task in TASKS:
        key, unit = ("judge_validity", "validity") if task.startswith("class") else ("psnr", "PSNR")

        def get(K, particles, task=task):
            return next(r for r in rows if r["task"] == task and r["K"] == K
                        and r["method"].startswith("particles") == particles)  # fmt: skip

        one = get(ks[0], True)
        txt = [f"**{task}**: one particle {unit} {one[key]:.3f}, FID {one['fid']:.2f}"]
        for K in ks:
            p, b = get(K, True), get(NFE_MATCH * K, False)
            better = "particles" if p[key] > b[key] else "best-of-N" if b[key] > p[key] else "neither"
            a, c = p["per_seed"]["values"], b["per_seed"]["values"]
            if key == "judge_validity":
                t = mcnemar(a, c)
                pair = f"McNemar {t['a_only']}/{t['b_only']} seeds, p = {t['p']:.2g}"
            else:
                t = sign_test(a, c)
                pair = f"sign test {t['a_wins']}/{t['b_wins']} seeds, p = {t['p']:.2g}"
            txt.append(f"K = {K} particles {p[key]:.3f} (FID {p['fid']:.2f}, NFE {p['nfe_per_seed']}, "
                       f"{p['wall_s_per_seed']:.2f} s) vs best-of-{NFE_MATCH * K} {b[key]:.3f} (FID {b['fid']:.2f}, "
                       f"NFE {b['nfe_per_seed']}, {b['wall_s_per_seed']:.2f} s): higher {unit}: {better} "
                       f"({pair})")  # fmt: skip
        parts.append("; ".join(txt) + ".")
    n = len(rows[0]["per_seed"]["values"])
    return (" ".join(parts) + f" FID differences within the real-digit spread {min(floor):.2f}–{max(floor):.2f} "
            f"are noise. Paired tests on the {n} shared seeds: the counts are the seeds where only the particles / "
            "only best-of-N are valid (McNemar), or where each has the higher PSNR (sign test).")  # fmt: skip


def _figure(out: Path, rows: list[dict]) -> None:
    plt = pyplot()
    metrics = [("judge_validity", "judge validity"), ("psnr", "PSNR (dB)"), ("fid", "FID")]
    fig, axes = plt.subplots(len(TASKS), 2, figsize=(9, 3.2 * len(TASKS)), squeeze=False)
    for i, task in enumerate(TASKS):
        key, label = metrics[0] if task.startswith("class") else metrics[1]
        for j, (k, lab) in enumerate(((key, label), metrics[2])):
            ax = axes[i][j]
            for method, st in (("particles", "o-"), ("best-of-N", "^--")):
                rr = [r for r in rows if r["task"] == task and r["method"].startswith(method)]
                rr.sort(key=lambda r: r["wall_s_per_seed"])
                ax.plot([r["wall_s_per_seed"] for r in rr], [r[k] for r in rr], st, label=method)
                for r in rr:
                    ax.annotate(f"{'K' if method == 'particles' else 'N'}={r['K']}", (r["wall_s_per_seed"], r[k]),
                                fontsize=6)  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel("wall s per seed")
            ax.set_ylabel(lab)
            ax.set_title(task)
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_fig(fig, out / "quality_vs_compute.png")
