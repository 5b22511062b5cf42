"""Train the pieces of TGDP (Ouyang et al. 2024; :mod:`lossguide.transfer`) for a source model and N target samples.

Stages (each resumable: a checkpoint every ``--ckpt-every`` iterations, written atomically; a finished stage is
loaded, not retrained; every draw of a stage comes from its own generator, seeded by ``--seed`` and the stage):

1. ``domain``: c(x0) = P(target | x0), binary cross-entropy on balanced batches (half source digits of the ``gen``
   split, half the N target digits, both shifted by up to 2 pixels), so w(x0) = c/(1−c) estimates q(x0)/p(x0);
2. ``noisy-domain`` (only with ``--cycle``): c'(x_t, t), the same on noised digits, for the cycle regulariser;
3. ``ratio``: h_ψ(x_t, t) by L_guidance = E_{x0~p, t, ε} (h_ψ(x_t, t) − w(x0))² (its minimiser is
   E_p[w(x0) | x_t] = q_t/p_t, Lemma 3.2), w normalised to mean 1 over the source digits (∇ log h is unchanged),
   plus ``--cycle`` η₁ · E_{x'_t ~ q_t}(log h_ψ(x'_t, t) − log(c'/(1−c')))² (in log space: the target is a
   function of x'_t, so the minimiser is the same as in ratio space, and q_t/p_t reaches e¹⁵ at low noise) and
   ``--consistency`` η₂ · the target's denoising score matching with the guided score, in ε units:
   E_{x0' ~ q} ‖ε_p(x'_t, t) − σ_t ∇ log h_ψ(x'_t, t) − ε‖² / D (the source model's ε_p, frozen; §3.3's regularisers).

``--conditional`` (the conditional version, for class y of the target domain, on the unconditional source model):
q(x0 | y)/p(x0) = w(x0, y)·p(y | x0)/q(y) with the joint ratio w(x0, y) = q(x0, y)/p(x0, y), so
∇ log q_t(x_t | y) = ∇ log p_t(x_t) + ∇ log E_p[w(x0, y)·p(y | x0)/q(y) | x_t]. The domain classifier is joint,
c(x0, y) (one logit per class, trained on labelled source and target digits), w is normalised within each class
(E_p[w | y] = q(y)/p(y) = 1: both sets are class-balanced), a digit's label gives p(y | x0), q(y) = 1/10; h_ψ has ten
outputs, output y regressing 10·w(x0, y)·1[label(x0) = y], and the consistency regulariser uses each target digit's
own class.

The target digits are :func:`lossguide.transfer.target_digits` (N digits of the ``gen`` split, stratified by
class, restyled). ``--export DIR`` writes the set (:func:`lossguide.transfer.export`), ``--manifest FILE`` its
entry; the shipped set::

    python -m lossguide.training tgdp --n-target 100 --cycle 0.1 --consistency 1 --out runs/tgdp-100 \
        --export lossguide/models/weights/mnist-tgdp-thick-100 --manifest lossguide/models/manifest.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lossguide import transfer
from lossguide.data import load_mnist
from lossguide.data.styles import STYLES
from lossguide.schedule import NoiseSchedule
from lossguide.training.classifiers import random_shift
from lossguide.training.common import atomic_save, setup_logging
from lossguide.training.ddpm import lr_at

log = logging.getLogger("lossguide.training.tgdp")

STAGES = ("domain", "noisy-domain", "ratio")
LOGIT_CLAMP = 15.0  # |logit c| ≤ 15: w ∈ [3e-7, 3.3e6] before normalisation


def run_stage(name: str, net: torch.nn.Module, loss_fn, iters: int, lr: float, gen: torch.Generator, out: Path,
              every: int = 250, warmup: int = 50) -> dict:  # fmt: skip
    """Adam with warm-up and cosine decay on ``loss_fn(net, gen) -> (loss, logs)`` for ``iters`` iterations;
    resumes from ``out/<name>.pt``. Returns the stage's record (iterations, seconds, last logs)."""
    ckpt = out / f"{name}.pt"
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    step, elapsed, logs = 0, 0.0, {}
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, elapsed, logs = state["step"], state["elapsed"], state["logs"]
        log.info("%s: resumed at iteration %d of %d", name, step, iters)
    net.train()
    t0 = time.time()
    while step < iters:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, warmup, iters, lr_min=lr / 100)
        loss, logs = loss_fn(net, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            log.info("%s it %d/%d %s", name, step, iters, " ".join(f"{k} {v:.4g}" for k, v in logs.items()))
        if step % every == 0 or step == iters:
            elapsed += time.time() - t0
            t0 = time.time()
            atomic_save({"net": net.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": step,
                         "elapsed": elapsed, "logs": logs}, ckpt)  # fmt: skip
    net.eval()
    return {"iters": iters, "seconds": round(elapsed, 1), **{k: round(v, 5) for k, v in logs.items()}}


def _balanced(x_src, x_tgt, batch, gen, labels=None):
    """Half source, half target digits, shifted; (x, domain label 1 = target, class labels or None)."""
    i = torch.randint(0, len(x_src), (batch // 2,), generator=gen)
    j = torch.randint(0, len(x_tgt), (batch - batch // 2,), generator=gen)
    x = random_shift(torch.cat([x_src[i], x_tgt[j]]), gen)
    d = torch.cat([torch.zeros(len(i)), torch.ones(len(j))])
    return x, d, None if labels is None else torch.cat([labels[0][i], labels[1][j]])


def _logit(out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The domain logit: the one output, or (the joint classifier c(x0, y) of the conditional version) output y."""
    return out.view(-1) if y is None else out.gather(1, y[:, None])[:, 0]


def _noised(x0, alpha_bar, gen):
    t = torch.randint(0, len(alpha_bar), (len(x0),), generator=gen)
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=gen)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, eps, ab


@torch.no_grad()
def source_weights(domain: torch.nn.Module, x_src: torch.Tensor, y_src: torch.Tensor | None = None) -> torch.Tensor:
    """w(x0) = c/(1−c) = exp(logit c) on the source digits, normalised to mean 1; with labels (the joint ratio
    q(x0, y)/p(x0, y) of the conditional version), normalised to mean 1 within each class (E_p[w | y] = q(y)/p(y)
    = 1 for the class-balanced source and target)."""
    logit = torch.cat([_logit(domain(x), None if y_src is None else y_src[k : k + 500])
                       for k, x in zip(range(0, len(x_src), 500), x_src.split(500), strict=True)])  # fmt: skip
    w = logit.clamp(-LOGIT_CLAMP, LOGIT_CLAMP).double().exp()
    if y_src is None:
        return (w / w.mean()).float()
    means = torch.zeros(10, dtype=w.dtype).index_add_(0, y_src, w) / torch.bincount(y_src, minlength=10)
    return (w / means[y_src]).float()


@torch.no_grad()
def domain_accuracy(domain: torch.nn.Module, style: str, conditional: bool = False) -> float:
    """Balanced accuracy of c on the held-out digits (never trained on): as they are (source) vs restyled."""
    x, y = load_mnist("heldout")
    y = y if conditional else None
    src = (_logit(domain(x), y) < 0).float().mean()
    tgt = (_logit(domain(STYLES[style](x)), y) > 0).float().mean()
    return float((src + tgt) / 2)


def train(n_target: int, out: Path, seed: int = 0, target_seed: int | None = None, style: str = "thick",
          source: str = "mnist-ddpm", iters_domain: int = 600, iters_ratio: int = 1500, cycle: float = 0.0,
          consistency: float = 0.0, batch: int = 64, lr: float = 1e-3, every: int = 250,
          conditional: bool = False) -> tuple:  # fmt: skip
    """Every stage in turn; returns (log h_ψ module, c, metadata). ``conditional``: the joint domain classifier
    c(x0, y) and h_ψ with one output per class y (the module docstring)."""
    if conditional and cycle > 0:
        raise ValueError("the cycle regulariser has no conditional form here (its noisy classifier is unconditional); "
                         "drop --cycle with --conditional")  # fmt: skip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target_seed = seed if target_seed is None else target_seed
    x_src, y_src = load_mnist("gen")
    x_tgt, y_tgt = transfer.target_digits(n_target, target_seed, style)
    alpha_bar = NoiseSchedule.linear().alpha_bar.float()
    stage_gen = {s: torch.Generator().manual_seed(1000 * seed + k) for k, s in enumerate(STAGES)}
    records = {}

    torch.manual_seed(seed)  # parameter init only
    domain = transfer.domain_net(10 if conditional else 1)
    labels = (y_src, y_tgt) if conditional else None

    def domain_loss(net, gen):
        x, d, y = _balanced(x_src, x_tgt, batch, gen, labels)
        loss = F.binary_cross_entropy_with_logits(_logit(net(x), y), d)
        return loss, {"bce": loss.item()}

    records["domain"] = run_stage("domain", domain, domain_loss, iters_domain, lr, stage_gen["domain"], out, every)
    records["domain"]["heldout_balanced_acc"] = round(domain_accuracy(domain, style, conditional), 4)
    w = source_weights(domain, x_src, y_src if conditional else None)

    noisy = None
    if cycle > 0:
        torch.manual_seed(seed + 1)
        noisy = transfer.noisy_domain_net()

        def noisy_loss(net, gen):
            x, d, _ = _balanced(x_src, x_tgt, batch, gen)
            x_t, t, _, _ = _noised(x, alpha_bar, gen)
            loss = F.binary_cross_entropy_with_logits(net(x_t, t).view(-1), d)
            return loss, {"bce": loss.item()}

        records["noisy-domain"] = run_stage("noisy-domain", noisy, noisy_loss, iters_domain, lr,
                                            stage_gen["noisy-domain"], out, every)  # fmt: skip
        noisy.requires_grad_(False)
    eps_source = None
    if consistency > 0:
        from lossguide.models import load_denoiser

        den = load_denoiser(source).denoiser
        if den.prediction_type != "epsilon" or den.schedule.family != "vp":
            raise ValueError(f"--consistency needs a VP ε-prediction source model; {source} is "
                             f"{den.schedule.family} {den.prediction_type}")  # fmt: skip
        eps_source = den.net  # the frozen source ε-network, net(x_t, t [B])
    torch.manual_seed(seed + 2)
    ratio = transfer.ratio_net(10 if conditional else 1)
    h = transfer.LogRatio(ratio)
    n_cls = 10 if conditional else 1

    def log_h(x, t, y=None):  # log h_y per sample (the one output when unconditional)
        out = ratio(x, t)
        return out[:, 0] if not conditional else out.gather(1, y[:, None])[:, 0]

    n_tgt = max(1, batch // 4)

    def ratio_loss(net, gen):
        i = torch.randint(0, len(x_src), (batch,), generator=gen)
        x_t, t, _, _ = _noised(x_src[i], alpha_bar, gen)
        if conditional:  # E_p[w(x0, y)·p(y|x0)/q(y) | x_t] with p(y|x0) = 1[label(x0) = y], q(y) = 1/10
            target = n_cls * w[i, None] * F.one_hot(y_src[i], n_cls)
            loss = l_guid = ((ratio(x_t, t).exp() - target) ** 2).mean()
        else:
            loss = l_guid = ((h(x_t, t).exp() - w[i]) ** 2).mean()
        logs = {"guidance": l_guid.item()}
        if cycle > 0 or consistency > 0:
            j = torch.randint(0, len(x_tgt), (n_tgt,), generator=gen)
            xq_t, tq, eps, ab = _noised(x_tgt[j], alpha_bar, gen)
        if cycle > 0:
            with torch.no_grad():
                log_r = noisy(xq_t, tq).view(-1).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
            l_cyc = ((h(xq_t, tq) - log_r) ** 2).mean()
            loss = loss + cycle * l_cyc
            logs["cycle"] = l_cyc.item()
        if consistency > 0:
            with torch.no_grad():
                e_p = eps_source(xq_t, tq)
            xq = xq_t.requires_grad_(True)
            (grad,) = torch.autograd.grad(log_h(xq, tq, y_tgt[j]).sum(), xq, create_graph=True)
            l_con = ((e_p - (1 - ab).sqrt() * grad - eps) ** 2).mean()
            loss = loss + consistency * l_con
            logs["consistency"] = l_con.item()
        return loss, logs

    records["ratio"] = run_stage("ratio", ratio, ratio_loss, iters_ratio, lr, stage_gen["ratio"], out, every)
    meta = {
        "n_target": n_target, "target_seed": target_seed, "style": style, "seed": seed, "source": source,
        "source_data": "MNIST-5k gen split (4000)", "target_classes": torch.bincount(y_tgt, minlength=10).tolist(),
        "conditional": conditional, "cycle": cycle, "consistency": consistency, "batch": batch, "lr": lr,
        "stages": records,
        "weight_ess_fraction": round(float(w.sum() ** 2 / (w**2).sum() / len(w)), 5),
        "weight_max": round(float(w.max()), 3),
        "train_seconds": round(sum(r["seconds"] for r in records.values()), 1),
    }  # fmt: skip
    return h, domain, meta


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-target", type=int, required=True, help="N, the number of target digits")
    ap.add_argument("--out", type=Path, default=None, help="checkpoint/log folder (default runs/tgdp-N-sSEED)")
    ap.add_argument("--export", type=Path, default=None, help="folder for the trained set (fp16) and tgdp.json")
    ap.add_argument(
        "--manifest",
        type=Path,
        default=None,
        help="also write the set's entry (named as the --export folder) into this manifest.json",
    )
    ap.add_argument("--seed", type=int, default=0, help="network initialisation and every training draw")
    ap.add_argument("--target-seed", type=int, default=None, help="which N digits (default: --seed)")
    ap.add_argument("--style", choices=sorted(STYLES), default="thick")
    ap.add_argument("--source", default="mnist-ddpm", help="the source model (for --consistency)")
    ap.add_argument("--iters-domain", type=int, default=600)
    ap.add_argument("--iters-ratio", type=int, default=1500)
    ap.add_argument("--cycle", type=float, default=0.0, help="η₁, the cycle regulariser's weight")
    ap.add_argument("--consistency", type=float, default=0.0, help="η₂, the consistency regulariser's weight")
    ap.add_argument(
        "--conditional",
        action="store_true",
        help="one h_y per class: sample class y of the target domain (no --cycle)",
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.n_target < 1 or args.n_target > 4000:
        ap.error(f"--n-target must be in 1..4000 (the gen split's digits), got {args.n_target}")
    if min(args.iters_domain, args.iters_ratio, args.batch) < 1 or min(args.cycle, args.consistency) < 0:
        ap.error("iterations and --batch must be ≥ 1, --cycle and --consistency ≥ 0")
    if args.manifest is not None and args.export is None:
        ap.error("--manifest records an exported set; add --export DIR")
    if args.conditional and args.cycle:
        ap.error("--cycle has no conditional form here (its noisy classifier is unconditional); drop it")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path(f"runs/tgdp-{args.n_target}-s{args.seed}")
    setup_logging(out / "train.log")
    h, domain, meta = train(args.n_target, out, args.seed, args.target_seed, args.style, args.source,
                            args.iters_domain, args.iters_ratio, args.cycle, args.consistency, args.batch, args.lr,
                            args.ckpt_every, args.conditional)  # fmt: skip
    opts = "".join(f" --{k.replace('_', '-')}" + ("" if isinstance(getattr(args, k), bool) else f" {getattr(args, k)}")
                   for k in
                   ("seed", "target_seed", "style", "iters_domain", "iters_ratio", "cycle", "consistency",
                    "conditional")
                   if getattr(args, k) != ap.get_default(k))  # fmt: skip
    meta["command"] = f"python -m lossguide.training tgdp --n-target {args.n_target}{opts} --export {args.export}"
    if args.export is not None:
        transfer.export(args.export, h.net, domain, meta)
        log.info("exported the TGDP set to %s", args.export)
        if args.manifest is not None:
            from lossguide.training.classifiers import update_manifest

            update_manifest(args.manifest, args.export.name, transfer.manifest_entry(args.export, meta))
            log.info("wrote the manifest entry %r in %s", args.export.name, args.manifest)
    log.info("done: %s", json.dumps(meta))


if __name__ == "__main__":
    main()
