"""``lossguide experiment particles``: particle methods (TDS, Wu et al. 2023; FK steering, Singhal et al. 2025)
against the Gaussian-mixture oracle's exact posterior as K grows, beside best-of-N at equal K, the single-particle
presets at their stored settings and the noise floor of n exact posterior samples."""

from __future__ import annotations

import logging
import math
import time

import torch

from lossguide.experiments import command_line, one_thread
from lossguide.harness.tasks import oracle as oracle_task
from lossguide.harness.tasks.oracle import POSTERIOR_SEED, oracle_tasks, posterior_samples
from lossguide.metrics import sliced_wasserstein
from lossguide.samplers import DDIM
from lossguide.sampling import sample
from lossguide.schedule import NoiseSchedule
from lossguide.smc import particle_method
from lossguide.writers import md_table, pyplot, save_fig, write_csv, write_report

log = logging.getLogger(__name__)

#: particles per seed K (best-of-N: N = K)
KS = (1, 4, 16, 64, 256)
QUICK_KS = (1, 4)
PARTICLE = ("tds", "fk")
#: single-particle presets at their stored oracle settings, DDIM η = 0
SINGLE = ("shen2024", "dps", "freedom", "mpgd", "lgd_mc", "cg")
#: DDIM η of the particle methods and of best-of-N (smc needs a stochastic sampler)
ETA = 1.0
#: rows of particles per denoiser call
CHUNK = 4096
#: best-of-N candidate j of seed s has seed s + j·CANDIDATE_STRIDE (as ``lossguide bench --best-of``)
CANDIDATE_STRIDE = 1_000_000
#: full run only: the linear task's particle rows at the largest K values and the single-particle presets again on
#: the seed sets starting here (n seeds each), for the spread of one seed set's SW
REPEAT_STARTS = (256, 512)
REPEAT_KS = (64, 256)
#: the noise floor: this many independent draws of n exact posterior samples (seeds FLOOR_SEED0 + r)
FLOOR_DRAWS = 16
FLOOR_SEED0 = 1000


def _row(task, method: str, K: int, n: int, x: torch.Tensor, post, nfe: int, wall: float, **extra) -> dict:
    finite = torch.isfinite(x).all(dim=1)
    return {"task": task.name, "method": method, "K": K, "n_seeds": n,
            "sw_to_posterior": sliced_wasserstein(x[finite], post) if finite.all() else float("inf"),
            "loss": float(task.loss(x[finite]).mean()) if finite.any() else float("inf"),
            "nfe_per_seed": nfe, "wall_ms_per_seed": 1e3 * wall / n, **extra}  # fmt: skip


def particle_row(task, name: str, K: int, seeds, steps: int, post) -> dict:
    """TDS or FK (:func:`~lossguide.smc.particle_method`, λ = 1) with K particles per seed, DDIM-``steps`` η = 1."""
    schedule = NoiseSchedule.linear()
    den = task.prior.denoiser(schedule)
    t0 = time.perf_counter()
    r = particle_method(name).run(den, DDIM(schedule, steps, eta=ETA), task.loss, particles=K, shape=(task.prior.dim,),
                                  seeds=seeds, dtype=torch.float64, chunk=CHUNK)  # fmt: skip
    wall = time.perf_counter() - t0
    final_ess = float(r.stats.ess[-1].mean()) if r.stats.ess else None
    return _row(task, name, K, len(seeds), r.x0, post, K * r.stats.nfe, wall, final_ess_mean=final_ess)


def best_of_row(task, N: int, seeds, steps: int, post) -> dict:
    """Best-of-N: N unguided DDIM-``steps`` η = 1 candidates per seed, the one of lowest ℓ(x0) kept."""
    schedule = NoiseSchedule.linear()
    den = task.prior.denoiser(schedule)
    cand = [s + j * CANDIDATE_STRIDE for s in seeds for j in range(N)]
    t0 = time.perf_counter()
    res = sample(den, DDIM(schedule, steps, eta=ETA), None, None, shape=(task.prior.dim,), seeds=cand,
                 dtype=torch.float64)  # fmt: skip
    with torch.no_grad():
        L = task.loss(res.x0).view(len(seeds), N)
    x = res.x0.view(len(seeds), N, -1)[torch.arange(len(seeds)), L.argmin(1)]
    wall = time.perf_counter() - t0
    return _row(task, "best-of-N", N, len(seeds), x, post, N * res.stats.nfe, wall)


def single_row(task, name: str, params: dict, seeds, steps: int, post) -> dict:
    """A single-particle preset at its stored oracle settings, DDIM-``steps`` η = 0 (:func:`oracle_task.run_one`)."""
    r = oracle_task.run_one(task, name, params, NoiseSchedule.linear(), seeds, steps, post)
    return {"task": task.name, "method": name, "K": 1, "n_seeds": len(seeds), "sw_to_posterior": r["sw_to_posterior"],
            "loss": r["loss"], "nfe_per_seed": r["nfe"], "wall_ms_per_seed": 1e3 * r["wall_s"] / len(seeds),
            "params": dict(params)}  # fmt: skip


def floor_row(task, n: int, post) -> dict:
    """The noise floor: SW between n exact posterior samples and the 4,096 reference, over FLOOR_DRAWS draws."""
    sws, losses, wall = [], [], 0.0
    for r in range(FLOOR_DRAWS):
        t0 = time.perf_counter()
        x = task.posterior.sample(n, torch.Generator().manual_seed(FLOOR_SEED0 + r))[0]
        wall += (time.perf_counter() - t0) / FLOOR_DRAWS  # sampling only, as for the other rows
        sws.append(sliced_wasserstein(x, post))
        losses.append(float(task.loss(x).mean()))
    return {"task": task.name, "method": "exact posterior (floor)", "K": 1, "n_seeds": n,
            "sw_to_posterior": sum(sws) / len(sws), "sw_min": min(sws), "sw_max": max(sws),
            "loss": sum(losses) / len(losses), "nfe_per_seed": 0, "wall_ms_per_seed": 1e3 * wall / n}  # fmt: skip


def loglog_slope(ks, sws) -> float:
    """Least-squares slope of log SW against log K."""
    lx, ly = [math.log(k) for k in ks], [math.log(s) for s in sws]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den if den else float("nan")


def run(out, quick: bool = False) -> dict:
    """Particles experiment: TDS and FK SW vs K on the oracle tasks; report in ``out``."""
    with one_thread():
        return _run(out, quick)


def _run(out, quick: bool) -> dict:
    t_start = time.perf_counter()
    n, steps, ks = (32, 10, QUICK_KS) if quick else (256, 50, KS)
    seeds = list(range(n))
    schedule = NoiseSchedule.linear()
    settings = oracle_task.load_settings()
    rows: list[dict] = []
    summary: dict = {}
    for task in oracle_tasks(schedule):
        kind = task.name.split("-")[0]
        post = posterior_samples(task)
        task_rows = [floor_row(task, n, post)]
        for name in SINGLE:
            task_rows.append(single_row(task, name, settings.get(kind, {}).get(name, {}), seeds, steps, post))
        for K in ks:
            for name in PARTICLE:
                task_rows.append(particle_row(task, name, K, seeds, steps, post))
            task_rows.append(best_of_row(task, K, seeds, steps, post))
        for r in task_rows:
            log.info("%s %s K=%d SW %.4f (%.2f ms/seed)", r["task"], r["method"], r["K"], r["sw_to_posterior"],
                     r["wall_ms_per_seed"])  # fmt: skip
        rows += task_rows

        def sw(method, K=1, rr=task_rows):
            return next(r["sw_to_posterior"] for r in rr if r["method"] == method and r["K"] == K)

        single = {m: sw(m) for m in SINGLE}
        best_single = min(single, key=single.get)
        training_free = {m: v for m, v in single.items() if m != "cg"}
        fr = next(r for r in task_rows if r["method"] == "exact posterior (floor)")
        s = {"floor": fr["sw_to_posterior"], "floor_range": [fr["sw_min"], fr["sw_max"]], "single": single,
             "best_single": best_single,
             "best_training_free": min(training_free, key=training_free.get),
             "slope": {m: loglog_slope(ks, [sw(m, K) for K in ks]) for m in (*PARTICLE, "best-of-N")},
             "sw": {m: {K: sw(m, K) for K in ks} for m in (*PARTICLE, "best-of-N")}}  # fmt: skip
        kmax = ks[-1]
        for m in PARTICLE:
            s[f"{m}_kmax_over_floor"] = s["sw"][m][kmax] / s["floor"]
            s[f"{m}_kmax_beats_every_single"] = all(s["sw"][m][kmax] < v for v in single.values())
            beats = [K for K in ks if all(s["sw"][m][K] < v for v in single.values())]
            s[f"{m}_K_beating_every_single"] = beats
        summary[kind] = s

    lin = summary["linear"]
    target = lin["tds_kmax_over_floor"] <= 1.5 and lin["tds_kmax_beats_every_single"]
    repeat_rows = [] if quick else _repeat(n, steps, settings)
    rep = _repeat_summary(rows, repeat_rows, summary["linear"]["floor"]) if repeat_rows else None
    write_csv(out / "results.csv", rows)
    _figure(out, rows, summary, ks)
    runtime = time.perf_counter() - t_start

    cols = ["task", "method", "K", "n_seeds", "sw_to_posterior", "loss", "nfe_per_seed", "wall_ms_per_seed"]
    body = [
        f"Gaussian-mixture oracle (d = 8, 4 components), tasks `class` and `linear` "
        f"(`oracle_tasks(NoiseSchedule.linear())`), float64. Distance: sliced W2 (256 directions) to 4,096 exact "
        f"posterior samples (seed {POSTERIOR_SEED}). {n} seeds (0–{n - 1}) for every row and every K"
        + ("" if quick else " (K = 256 included: the full run fits the time budget without reducing seeds)")
        + ".",
        "",
        f"- **tds / fk**: `lg.smc` via `particle_method(name)` (λ = 1, systematic resampling at ESS < K/2), "
        f"DDIM-{steps} η = {ETA}, K ∈ {{{', '.join(map(str, ks))}}} particles per seed, chunk {CHUNK} rows.",
        f"- **best-of-N**: N = K unguided DDIM-{steps} η = {ETA} candidates per seed (candidate j of seed s has seed "
        f"s + j·{CANDIDATE_STRIDE:,}), the one of lowest ℓ(x0) kept.",
        f"- **single-particle presets** {', '.join(SINGLE)} at their stored oracle settings "
        f"(`oracle_task.load_settings()`), DDIM-{steps} η = 0 (`oracle_task.run_one`); cg is the exact "
        "noise-aware classifier, not training-free.",
        f"- **floor**: SW of n = {n} exact posterior samples to the reference, mean over {FLOOR_DRAWS} draws "
        f"(seeds {FLOOR_SEED0}–{FLOOR_SEED0 + FLOOR_DRAWS - 1}); min–max in the CSV/JSON.",
        "",
        "NFE per seed = K × smc's `stats.nfe` (TDS's count includes the twist's denoiser pass of every step), "
        "N × 50 for best-of-N; wall time per seed on one CPU thread.",
        "",
        "## Results",
        "",
        md_table(rows, cols),
        "",
        "![SW vs K](sw_vs_k.png)",
        "",
        "## Slopes of log SW vs log K (least squares over K)",
        "",
        md_table([{"task": k, **{m: v["slope"][m] for m in v["slope"]}} for k, v in summary.items()],
                 ["task", "tds", "fk", "best-of-N"]),
        "",
        *(["## Seed-set check (linear task)", "",
           f"The linear task's TDS and FK at K ∈ {{{', '.join(map(str, REPEAT_KS))}}} and the single-particle "
           f"presets again on seed sets {', '.join(f'{a}–{a + n - 1}' for a in REPEAT_STARTS)} ({n} seeds each); "
           "`mean` is over these and the main set 0–" + f"{n - 1}.", "",
           md_table(rep["rows"], ["method", "K", *[f"sw_seeds_{a}" for a in (0, *REPEAT_STARTS)], "mean"]), ""]
          if rep else []),
        "## Reading",
        "",
        _reading(summary, ks, n, quick, target, rep),
    ]
    data = {"n_seeds": n, "seeds": [0, n - 1], "steps": steps, "eta": ETA, "K": list(ks), "chunk": CHUNK,
            "floor_draws": FLOOR_DRAWS, "rows": rows, "summary": summary, "target_holds": target,
            "repeat_rows": repeat_rows, "repeat_summary": rep,
            "runtime_s": runtime}  # fmt: skip
    write_report(out, "Particles (TDS, FK) against the exact posterior", command_line("particles", quick), body, data)
    log.info("particles: %.1f s", runtime)
    return {"headline": f"linear TDS K={ks[-1]}: SW {lin['sw']['tds'][ks[-1]]:.4f}, floor {lin['floor']:.4f}, "
                        f"best single {lin['best_single']} {lin['single'][lin['best_single']]:.4f}; target holds: "
                        f"{target}", "target_holds": target, "runtime_s": runtime}  # fmt: skip


def _repeat(n: int, steps: int, settings: dict) -> list[dict]:
    """The linear task's TDS/FK at REPEAT_KS and the single-particle presets on the seed sets of REPEAT_STARTS."""
    task = next(t for t in oracle_tasks(NoiseSchedule.linear()) if t.name.startswith("linear"))
    post = posterior_samples(task)
    out = []
    for a in REPEAT_STARTS:
        seeds = list(range(a, a + n))
        for name in SINGLE:
            out.append({**single_row(task, name, settings.get("linear", {}).get(name, {}), seeds, steps, post),
                        "seed_start": a})  # fmt: skip
        for K in REPEAT_KS:
            for name in PARTICLE:
                out.append({**particle_row(task, name, K, seeds, steps, post), "seed_start": a})
    for r in out:
        log.info("repeat %s K=%d seeds %d+: SW %.4f", r["method"], r["K"], r["seed_start"], r["sw_to_posterior"])
    return out


def _repeat_summary(rows: list[dict], repeat_rows: list[dict], floor: float) -> dict:
    """Per (method, K): SW on each seed set and the mean; the target re-checked on the means."""
    table = []
    for r in repeat_rows:
        if r["seed_start"] != REPEAT_STARTS[0]:
            continue
        m, K = r["method"], r["K"]
        main = next(x["sw_to_posterior"] for x in rows if x["task"] == "linear" and x["method"] == m and x["K"] == K)
        sws = [main] + [x["sw_to_posterior"] for a in REPEAT_STARTS for x in repeat_rows
                        if x["seed_start"] == a and x["method"] == m and x["K"] == K]  # fmt: skip
        per_set = {f"sw_seeds_{a}": v for a, v in zip((0, *REPEAT_STARTS), sws, strict=True)}
        table.append({"method": m, "K": K, **per_set, "mean": sum(sws) / len(sws)})
    mean = {(r["method"], r["K"]): r["mean"] for r in table}
    single = {m: mean[(m, 1)] for m in SINGLE}
    tds = mean[("tds", REPEAT_KS[-1])]
    return {"rows": table, "tds_kmax_mean": tds, "tds_kmax_mean_over_floor": tds / floor,
            "best_single_mean": min(single, key=single.get), "single_mean": single,
            "target_holds_on_means": tds <= 1.5 * floor and all(tds < v for v in single.values())}  # fmt: skip


def _reading(summary: dict, ks, n: int, quick: bool, target: bool, rep: dict | None = None) -> str:
    kmax = ks[-1]
    parts = []
    for kind, s in summary.items():
        bs, btf = s["best_single"], s["best_training_free"]
        tf = "" if bs == btf else f" (best training-free: {btf} {s['single'][btf]:.3f})"
        lo, hi = s["floor_range"]
        txt = [f"**{kind}**: floor {s['floor']:.3f} at n = {n} ({lo:.3f}–{hi:.3f} over {FLOOR_DRAWS} draws: the "
               f"spread of one {n}-sample SW); best single-particle preset {bs} "
               f"{s['single'][bs]:.3f}{tf}"]
        for m in PARTICLE:
            sw = s["sw"][m]
            beats = s[f"{m}_K_beating_every_single"]
            vs = (f"beats every single-particle preset at K ∈ {{{', '.join(map(str, beats))}}} only" if beats
                  else f"does NOT beat every single-particle preset at any K (best {bs} {s['single'][bs]:.3f})")
            txt.append(f"{m.upper()} {sw[ks[0]]:.3f} at K = {ks[0]} → {sw[kmax]:.3f} at K = {kmax} "
                       f"(slope {s['slope'][m]:+.3f}, {s[f'{m}_kmax_over_floor']:.2f}× the floor; {vs})")  # fmt: skip
        bo = s["sw"]["best-of-N"]
        n_best = min(bo, key=bo.get)
        rises = bo[kmax] > bo[n_best]
        txt.append(f"best-of-N {bo[ks[0]]:.3f} at N = {ks[0]} → {bo[kmax]:.3f} at N = {kmax}, lowest {bo[n_best]:.3f} "
                   f"at N = {n_best} (slope {s['slope']['best-of-N']:+.3f}"
                   + ("; past it, keeping the lowest-loss candidate collapses onto the likelihood's mode and moves "
                      "away from the posterior)" if rises else ")"))  # fmt: skip
        parts.append("; ".join(txt) + ".")
    lin = summary["linear"]
    tsw = lin["sw"]["tds"][kmax]
    verdict = (f"Issue target (linear task, TDS at K = 256 within 1.5× of the floor and better than every "
               f"single-particle method): TDS at K = {kmax} scores {tsw:.3f} = {lin['tds_kmax_over_floor']:.2f}× the "
               f"floor {lin['floor']:.3f} ({'within' if lin['tds_kmax_over_floor'] <= 1.5 else 'NOT within'} 1.5×), "
               f"and {'beats' if lin['tds_kmax_beats_every_single'] else 'does NOT beat'} every single-particle "
               f"method (best {lin['best_single']} {lin['single'][lin['best_single']]:.3f}): the target "
               f"**{'holds' if target else 'does not hold'}**.")  # fmt: skip
    if rep:
        bm = rep["best_single_mean"]
        verdict += (f" Over the three seed sets, TDS at K = {REPEAT_KS[-1]} averages {rep['tds_kmax_mean']:.3f} = "
                    f"{rep['tds_kmax_mean_over_floor']:.2f}× the floor, against {bm} {rep['single_mean'][bm]:.3f} "
                    f"(best single-particle mean): on the means the target "
                    f"**{'holds' if rep['target_holds_on_means'] else 'does not hold'}**.")  # fmt: skip
    if quick:
        verdict += f" (Quick run: K ≤ {kmax}, {n} seeds, DDIM-10; the target is about the full run.)"
    tail = ("SMC targets p(x0)·exp(−ℓ(x0)) with p the DDIM sampler's own distribution, so as K grows the particle "
            "methods approach that distribution, not the exact posterior: the sampler's discretisation bias stays, "
            "and the floor is what an exact sampler scores with the same n.")
    return " ".join(parts) + " " + verdict + " " + tail


def _figure(out, rows: list[dict], summary: dict, ks) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 3.4), squeeze=False)
    styles = {"tds": ("o-", "tab:blue"), "fk": ("s-", "tab:orange"), "best-of-N": ("^--", "tab:gray")}
    for ax, (kind, s) in zip(axes[0], summary.items(), strict=True):
        for m, (st, color) in styles.items():
            ax.loglog(list(ks), [s["sw"][m][K] for K in ks], st, color=color,
                      label=f"{m} (slope {s['slope'][m]:+.2f})")  # fmt: skip
        bs = s["best_single"]
        ax.axhline(s["single"][bs], color="tab:green", ls="-.", label=f"best single: {bs}")
        fr = next(r for r in rows if r["task"].startswith(kind) and r["method"].startswith("exact"))
        ax.axhline(fr["sw_to_posterior"], color="k", ls=":", label="floor (exact, n seeds)")
        ax.axhspan(fr["sw_min"], fr["sw_max"], color="k", alpha=0.08)
        ax.set_xticks(list(ks), [str(k) for k in ks], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_xlabel("K particles (best-of-N: N)")
        ax.set_ylabel("SW to exact posterior")
        ax.set_title(kind)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_fig(fig, out / "sw_vs_k.png")
