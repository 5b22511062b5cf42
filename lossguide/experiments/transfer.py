"""``lossguide experiment transfer``: transfer the shipped MNIST model to a new style from N target digits by
guidance (TGDP, Ouyang et al. 2024, :mod:`lossguide.transfer`) against fine-tuning, training from scratch, and the
unadapted source.

Source: ``mnist-ddpm`` (trained on the ``gen`` split). Target: thick digits (:func:`lossguide.data.styles.thicken`,
radius 1); the N target digits are N digits of the ``gen`` split, stratified by class
(:func:`lossguide.transfer.target_digits`), so the evaluation digits (the 1,000 held-out digits, thickened) are
disjoint from everything any method trains on. Methods at each N:

- ``source``: the unadapted source model;
- ``tgdp``: the source model guided by the trained ratio network h_ψ (``cg`` step of −log h_ψ) at Thm 3.1's scale 1,
  and ``tgdp-tuned`` at the scale of :data:`SCALES` with the lowest FID on the tuning seeds; h_ψ is trained with
  both regularisers (:data:`TGDP`), and ``tgdp-noreg`` (L_guidance alone, at the middle N) is their ablation;
- ``finetune``: the source model fine-tuned on the N digits (``python -m lossguide.training ddpm --init mnist-ddpm
  --style thick --n-target N``, :data:`FINETUNE`);
- ``scratch``: a UNet trained from scratch on the N digits (:data:`SCRATCH`: the smaller widths of
  ``mnist-ddpm-bad``, as N ≤ 1,000 digits carry no more);
- at the middle N, class y = seed mod 10: ``tgdp-cond``, the conditional version (:data:`TGDP_CONDITIONAL`);
  ``tgdp+cg``, the unconditional set plus the shipped noise-aware classifier (Bayes' rule, :func:`class_samples`);
  ``source+cg``, that classifier alone (at the shipped cg scale of the class task); scored by the judge's class
  validity as well.

Metrics on n evaluation samples (DDIM, η = 0): FID/KID on the judge's features against the 1,000 thickened held-out
digits, beside the floor (FID of n real thick digits of the gen split against the same reference, 5 draws); ink (the
share of pixels > 0: 0.134 for the held-out digits, 0.267 thickened); class coverage (the judge's labels: classes
holding ≥ 5% of the samples, and the total-variation distance of their histogram to uniform); training seconds and
sampling seconds per sample. Every trained piece is written under ``OUT/train`` and every cell's numbers under
``OUT/cells``, so a stopped run resumes where it stopped.

``--quick`` trains nothing: the shipped set ``mnist-tgdp-thick-100`` (N = 100, seed 0) against the unadapted source
on 16 samples, DDIM-10 (a smoke run of the sampling and scoring path; its numbers mean little at n = 16).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from lossguide import losses, metrics, transfer
from lossguide.data.styles import thicken
from lossguide.experiments import command_line
from lossguide.harness.tuning import grid_search, tune_seeds
from lossguide.io import atomic_write_json
from lossguide.layout.evaluate import fid_floor, styled_features
from lossguide.samplers import DDIM
from lossguide.sampling import sample
from lossguide.writers import md_table, pyplot, save_fig, write_csv, write_report

log = logging.getLogger(__name__)

SHIPPED = "mnist-tgdp-thick-100"
STYLE = "thick"
FULL = {"ns": (10, 100, 1000), "seeds_small_n": (0, 1, 2), "n_eval": 500, "n_tune": 100, "steps": 20}
QUICK = {"n_eval": 16, "steps": 10}
EVAL_SEED0 = 0
#: TGDP guidance scales searched on the tuning seeds (1: Thm 3.1's)
SCALES = (1.0, 2.0, 4.0)
#: TGDP training: the regularisers' weights (η₁ cycle, η₂ consistency; :mod:`lossguide.training.tgdp`)
TGDP = {"cycle": 0.1, "consistency": 1.0}
#: the conditional version's (no cycle regulariser: :mod:`lossguide.training.tgdp`)
TGDP_CONDITIONAL = {"conditional": True, "consistency": 1.0}
FINETUNE = ["--init", "mnist-ddpm", "--iters", "300", "--lr", "2e-4", "--warmup", "20"]
SCRATCH = ["--iters", "600", "--block-channels", "16,32,64", "--norm-groups", "8", "--ema", "0.995"]
BATCH = 100


def ink(x: torch.Tensor) -> float:
    return float((x > 0).float().mean())


def coverage(labels: torch.Tensor) -> dict:
    """Classes holding ≥ 5% of the samples, and the TV distance of the label histogram to uniform."""
    p = torch.bincount(labels.long().view(-1), minlength=10).double() / len(labels)
    return {"classes_covered": int((p >= 0.05).sum()), "class_tv": float(0.5 * (p - 0.1).abs().sum())}


class Scorer:
    """The judge's features of the thickened held-out digits, and the scores of a generated set against them."""

    def __init__(self):
        from lossguide.harness.tasks.mnist import MnistKit

        self.kit = MnistKit()
        self.judge = self.kit.nets["judge"]
        self.real = styled_features(self.kit, thicken)

    def score(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        """FID/KID, ink and coverage; with ``targets``, the judge's validity (label = target) too."""
        x = x.clamp(-1, 1)
        f = metrics.features(self.judge, x)
        kid, kid_std = metrics.kernel_inception_distance(f, self.real, n_subsets=50, seed=0)
        labels = _labels(self.judge, x)
        row = {"n": len(x), "fid": metrics.frechet_distance(f, self.real), "kid_x1e3": 1e3 * kid,
               "kid_std_x1e3": 1e3 * kid_std, "ink": ink(x), **coverage(labels)}  # fmt: skip
        if targets is not None:
            row["validity"] = float((labels == targets).float().mean())
        return row


def _labels(judge, x: torch.Tensor) -> torch.Tensor:
    return metrics.classify(judge, x).argmax(1)


def generate(den, seeds, steps: int, guidance=None, loss=None) -> tuple[torch.Tensor, float]:
    """Samples of ``den`` (DDIM-``steps``, η = 0) on ``seeds``, in batches of :data:`BATCH`; (x0, seconds)."""
    t0, xs = time.perf_counter(), []
    for i in range(0, len(seeds), BATCH):
        r = sample(den, DDIM(den.schedule, steps), guidance, loss, shape=(1, 28, 28), seeds=seeds[i : i + BATCH])
        xs.append(r.x0.detach())
    return torch.cat(xs), time.perf_counter() - t0


def tgdp_samples(den, folder, seeds, steps: int, scale: float) -> tuple[torch.Tensor, float]:
    h, _, _ = transfer.load(folder)
    return generate(den, seeds, steps, transfer.tgdp_config(scale), losses.DensityRatioLoss(h, den.schedule))


def class_samples(den, seeds, steps: int, folder=None, with_cg: bool = False) -> tuple[torch.Tensor, float]:
    """Class y = seed mod 10 on every seed, by the ``cg`` step: the conditional TGDP set in ``folder``
    (ℓ = −log h_y, scale 1), or the unconditional set in ``folder`` plus the shipped noise-aware classifier
    (``with_cg``: ℓ = −log h − s·log p(y | x_t), Bayes' rule q_t(x_t | y) ∝ q_t(x_t)·q_t(y | x_t) with the
    style-invariant label posterior q_t(y | x_t) ≈ p_t(y | x_t), s the shipped cg scale of the MNIST class task),
    or (``folder`` None) the source model with that classifier alone at s."""
    from lossguide import presets
    from lossguide.harness.settings import step_value
    from lossguide.models import load_classifier

    s_cg = step_value("class", "cg")
    t0, xs = time.perf_counter(), []
    noise_aware = load_classifier("mnist-noise-aware") if folder is None or with_cg else None
    ratio_net = transfer.load(folder)[0].net if folder is not None else None
    for i in range(0, len(seeds), BATCH):
        part = seeds[i : i + BATCH]
        y = torch.tensor(part) % 10
        cg = losses.NoisyClassLoss(noise_aware, y, den.schedule) if noise_aware is not None else None
        if folder is None:
            loss = cg
        else:
            ratio = losses.DensityRatioLoss(transfer.LogRatio(ratio_net, None if with_cg else y), den.schedule)
            loss = (lambda x_t, t, r=ratio, c=cg: r(x_t, t) + s_cg * c(x_t, t)) if with_cg else ratio
        cfg = presets.cg(s_cg) if folder is None else transfer.tgdp_config(1.0)
        xs.append(sample(den, DDIM(den.schedule, steps), cfg, loss, shape=(1, 28, 28), seeds=part).x0.detach())
    return torch.cat(xs), time.perf_counter() - t0


def set_stats(meta: dict) -> dict:
    """A TGDP set's record: its domain classifier's balanced accuracy on held-out thin vs thick digits, and the
    effective sample size (Σw)²/Σw² of w over the 4,000 source digits, in % of them."""
    return {"domain_acc": meta["stages"]["domain"]["heldout_balanced_acc"],
            "w_ess_pct": 100 * meta["weight_ess_fraction"]}  # fmt: skip


def _train_tgdp(folder: Path, n: int, seed: int, regs: dict = TGDP) -> dict:
    """The TGDP set of (N, seed) with regularisers ``regs``, trained by its command unless already there."""
    from lossguide.training import tgdp

    if not (folder / "set" / transfer.META).is_file():
        flags = []
        for k, v in regs.items():  # True: a switch; 0: the default, left out
            if v:
                flags += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
        tgdp.main(["--n-target", str(n), "--seed", str(seed), *flags, "--out", str(folder),
                   "--export", str(folder / "set")])  # fmt: skip
    return json.loads((folder / "set" / transfer.META).read_text())


def _train_ddpm(folder: Path, args: list[str], n: int, seed: int) -> dict:
    from lossguide.training import ddpm

    model = folder / "model"
    if not (model / "training.json").is_file():
        ddpm.main([*args, "--style", STYLE, "--n-target", str(n), "--target-seed", str(seed), "--seed", str(seed),
                   "--out", str(folder), "--export", str(model)])  # fmt: skip
    return json.loads((model / "training.json").read_text())


class Cells:
    """The experiment's cells: cell ``label``'s numbers are read from ``out/cells`` if a run already made them, else
    ``make(*args)``'s (samples, seconds) are scored (against ``targets`` too if given), with ``extra``, and stored
    atomically."""

    def __init__(self, out: Path, scorer: Scorer):
        self.out, self.scorer = out, scorer

    def __call__(self, label: str, make, *args, targets=None, **extra) -> dict:
        path = self.out / "cells" / f"{label}.json"
        if path.is_file():
            return json.loads(path.read_text())
        x, wall = make(*args)
        row = {**extra, **self.scorer.score(x, targets), "sample_s_per_sample": wall / len(x)}
        atomic_write_json(path, row)
        return row


def run(out, quick: bool = False) -> dict:
    from lossguide.models import load_denoiser

    out = Path(out)
    cfg = QUICK if quick else FULL
    scorer = Scorer()
    cell = Cells(out, scorer)
    source = load_denoiser("mnist-ddpm").denoiser
    seeds = list(range(EVAL_SEED0, EVAL_SEED0 + cfg["n_eval"]))
    steps = cfg["steps"]
    rows = [cell("source", generate, source, seeds, steps, method="source", N=0, seed=0, train_s=0.0)]
    if quick:
        meta = transfer.load(SHIPPED)[2]
        for s in (1.0, 2.0):
            rows.append({**cell(f"tgdp-shipped-{s:g}", tgdp_samples, source, SHIPPED, seeds, steps, s,
                                method="tgdp" if s == 1 else f"tgdp×{s:g}", N=100, seed=0, scale=s,
                                train_s=meta.get("train_seconds", math.nan)), **set_stats(meta)})  # fmt: skip
    else:
        tune = list(tune_seeds("transfer", cfg["n_tune"]))
        for n in cfg["ns"]:
            for seed in cfg["seeds_small_n"] if n == min(cfg["ns"]) else (0,):
                tag = f"N{n}-s{seed}"
                folder = out / "train" / f"tgdp-{tag}"
                meta = _train_tgdp(folder, n, seed)
                best, neg_fids = grid_search(lambda s, tag=tag, folder=folder: -cell(
                    f"tune-tgdp-{tag}-{s:g}", tgdp_samples, source, folder / "set", tune, steps, s, scale=s)["fid"],
                    SCALES)  # fmt: skip
                fids = {s: -v for s, v in zip(SCALES, neg_fids, strict=True)}
                for label, s in (("tgdp", 1.0), ("tgdp-tuned", best)):
                    rows.append({**cell(f"{label}-{tag}", tgdp_samples, source, folder / "set", seeds, steps, s,
                                        method=label, N=n, seed=seed, scale=s, train_s=meta["train_seconds"],
                                        tune_fids={str(k): v for k, v in fids.items()}),
                                 **set_stats(meta)})  # fmt: skip
                for method, args in (("finetune", FINETUNE), ("scratch", SCRATCH)):
                    folder = out / "train" / f"{method}-{tag}"
                    info = _train_ddpm(folder, args, n, seed)
                    den = load_denoiser(str(folder / "model")).denoiser
                    rows.append(cell(f"{method}-{tag}", generate, den, seeds, steps, method=method, N=n,
                                      seed=seed, train_s=info.get("train_seconds", math.nan)))  # fmt: skip
        # the regularisers' ablation at the middle N: TGDP with L_guidance alone, Thm 3.1's scale
        n = cfg["ns"][len(cfg["ns"]) // 2]
        folder = out / "train" / f"tgdp-noreg-N{n}-s0"
        meta = _train_tgdp(folder, n, 0, {"cycle": 0.0, "consistency": 0.0})
        rows.append({**cell(f"tgdp-noreg-N{n}-s0", tgdp_samples, source, folder / "set", seeds, steps, 1.0,
                            method="tgdp-noreg", N=n, seed=0, scale=1.0, train_s=meta["train_seconds"]),
                     **set_stats(meta)})  # fmt: skip
        # the conditional version at the middle N (class y = seed mod 10), beside the source with cg
        folder = out / "train" / f"tgdp-cond-N{n}-s0"
        meta = _train_tgdp(folder, n, 0, TGDP_CONDITIONAL)
        y = torch.tensor(seeds) % 10
        uncond = out / "train" / f"tgdp-N{n}-s0"
        cond = [("tgdp-cond", folder / "set", False, meta),
                ("tgdp+cg", uncond / "set", True, _train_tgdp(uncond, n, 0)),
                ("source+cg", None, False, None)]  # fmt: skip
        for method, where, with_cg, m in cond:
            label = f"{method}-N{n}-s0" if where is not None else "source+cg"
            rows.append({**cell(label, class_samples, source, seeds, steps, where, with_cg, targets=y,
                                method=method, N=n if where is not None else 0, seed=0, scale=1.0,
                                train_s=m["train_seconds"] if m else 0.0), **(set_stats(m) if m else {})})  # fmt: skip
    floor = fid_floor(scorer.kit, cfg["n_eval"], style=thicken)
    summary = summarise(rows)
    write_csv(out / "results.csv", rows)
    _figure(summary, floor, out)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    write_report(out, "Transfer by guidance (TGDP) vs fine-tuning: MNIST → thick digits",
                 command_line("transfer", quick), _body(summary, floor, cfg, quick),
                 {"rows": rows, "summary": summary, "fid_floor": floor, "config": config})  # fmt: skip
    return {"summary": summary, "fid_floor": floor}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean, min and max of each metric over training seeds, per (method, N)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["N"]), []).append(r)
    out = []
    for (method, n), rs in groups.items():
        row = {"method": method, "N": n, "seeds": len(rs)}
        for k in ("fid", "kid_x1e3", "ink", "classes_covered", "class_tv", "validity", "domain_acc", "w_ess_pct",
                  "train_s", "sample_s_per_sample"):  # fmt: skip
            if k not in rs[0]:
                continue
            v = [float(r[k]) for r in rs]
            row[k] = sum(v) / len(v)
            if len(v) > 1:
                row[f"{k}_min"], row[f"{k}_max"] = min(v), max(v)
        out.append(row)
    return out


def _fid_text(r: dict) -> str:
    return f"{r['fid']:.2f}" + (f" [{r['fid_min']:.2f}, {r['fid_max']:.2f}]" if "fid_min" in r else "")


def _body(summary, floor, cfg, quick) -> list[str]:
    table = [{**r, "fid_text": _fid_text(r)} for r in summary]
    body = [md_table(table, ["method", "N", "seeds", "fid_text", "kid_x1e3", "ink", "classes_covered", "class_tv",
                             "validity", "domain_acc", "w_ess_pct", "train_s", "sample_s_per_sample"],
                     ["method", "N", "training seeds", "FID (mean [min, max] over seeds)", "KID×10³", "ink",
                      "classes ≥5%", "class TV", "class validity", "c accuracy", "w ESS %", "train s",
                      "sample s"]),  # fmt: skip
            "",
            f"n = {cfg['n_eval']} samples per cell, DDIM-{cfg['steps']} (η = 0). Reference: the 1,000 held-out digits "
            f"thickened; ink 0.134 thin, 0.267 thick. Real thick digits score FID {min(floor):.2f}–{max(floor):.2f} "
            f"at this n (5 draws of the gen split): the floor.", "", "![FID vs N](fid_vs_n.png)"]  # fmt: skip
    if quick:
        body += ["", "Quick run: the shipped TGDP set only, n = 16; a smoke run of the code path."]
    else:
        body += ["", _verdict(summary)]
    return body


def _verdict(summary: list[dict]) -> str:
    """The paper's claim at the smallest N: TGDP's FID below fine-tuning's on every training seed."""
    by = {(r["method"], r["N"]): r for r in summary}
    n = min(r["N"] for r in summary if r["N"] > 0)
    lines = []
    for name in ("tgdp", "tgdp-tuned"):
        t, f = by.get((name, n)), by.get(("finetune", n))
        if not (t and f):
            continue
        t_hi, f_lo = t.get("fid_max", t["fid"]), f.get("fid_min", f["fid"])
        if t_hi < f_lo:
            word = "confirmed"
        elif t.get("fid_min", t["fid"]) > f.get("fid_max", f["fid"]):
            word = "not confirmed (fine-tuning is better on every seed)"
        else:
            word = "not decided (the seed ranges overlap)"
        lines.append(f"At N = {n}, {name} FID {_fid_text(t)} vs fine-tuning {_fid_text(f)}: the paper's claim "
                     f"(guidance beats fine-tuning at small N) is **{word}** (rule: every seed's FID of one below "
                     f"every seed's of the other).")  # fmt: skip
    return "\n\n".join(lines)


def _figure(summary: list[dict], floor: list[float], out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    src = [r for r in summary if r["method"] == "source"]
    ns = sorted({r["N"] for r in summary if r["N"] > 0})
    main = ("tgdp", "tgdp-tuned", "finetune", "scratch")
    for method in [
        m for m in dict.fromkeys(r["method"] for r in summary if r["N"] > 0) if m in main or m.startswith("tgdp×")
    ]:
        rs = sorted((r for r in summary if r["method"] == method), key=lambda r: r["N"])
        if rs:
            ax.errorbar([r["N"] for r in rs], [r["fid"] for r in rs], marker="o", label=method, capsize=3,
                        yerr=[[r["fid"] - r.get("fid_min", r["fid"]) for r in rs],
                              [r.get("fid_max", r["fid"]) - r["fid"] for r in rs]])  # fmt: skip
    if src and ns:
        ax.axhline(src[0]["fid"], color="k", ls="--", lw=1, label="source (unadapted)")
    ax.axhspan(min(floor), max(floor), color="0.85", label="real thick digits (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N target digits")
    ax.set_ylabel("FID vs thick held-out digits")
    ax.legend(fontsize=7, loc="center right")
    save_fig(fig, out / "fid_vs_n.png")
