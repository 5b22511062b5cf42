"""Train a plug-and-play guide (Hsiao et al. 2024; :mod:`lossguide.layout.distill`) for an exported two-digit
conditional model: with the base frozen (float32), minimise

    E_{x0, c, t, ε, w} ‖ε_θ(x_t, t, c; g(x_t, t, c, w)) − [ε_∅ + w·(ε_c − ε_∅)]‖²

over the guide g alone, x_t noised at uniform t with the base's DDPM schedule from the base's training data
(:class:`lossguide.data.canvas.TwoDigitCanvas`, the ``gen`` split), w ~ U[--w-min, --w-max] per sample; the
target is the base's two-pass classifier-free guidance output (no gradient), the student its one pass with the
guide's residuals (gradients reach g through the frozen base's activations).

Resumable like the other training scripts: a checkpoint (guide, EMA, optimiser, data generator, step) is written
atomically every ``--ckpt-every`` iterations; rerunning the same command continues from it and ends with the same
weights. The EMA guide is exported (fp16) with :meth:`lossguide.layout.distill.GuideNet.save` plus a
``training.json``; use it with :func:`lossguide.layout.distill.guided_denoiser`.

    python -m lossguide.training guide --base runs/cond-digits --out runs/train-guide --iters 1200 \
        --threads 1 --export runs/guide-digits

made the shipped ``mnist-cond-guide`` for ``mnist-cond``: the default guide has 10,066 parameters, 0.97 % of the
base's 1,039,185; 1.40 s/iteration at batch 32 on one thread, 28 min; the loss ratio (below) fell from 1.00 to
0.40 by iteration 375 and to 0.34 at 1,200 (the guide reproduces two thirds of the guidance correction in MSE).

The log's ``no-guide`` is the loss of the base's conditional pass alone (the guide off), so ``ratio`` = loss /
no-guide is the share of the guidance correction (w − 1)·(ε_c − ε_∅) the guide still misses.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lossguide.data.canvas import TwoDigitCanvas
from lossguide.layout.distill import GuideNet, cfg_parts, distilled_eps
from lossguide.layout.model import SLOTS, CondDigitModel
from lossguide.training.common import (
    EMA,
    add_run_args,
    atomic_save,
    checkpoint_state,
    finish,
    optimizer_step,
    resume,
    run_meta,
    setup_logging,
)
from lossguide.training.cond_ddpm import batch
from lossguide.training.ddpm import lr_at

log = logging.getLogger("lossguide.training.guide")


def export(ema_guide: GuideNet, out: Path, meta: dict) -> None:
    """Write the EMA guide (fp16 safetensors + its config) and ``training.json``."""
    ema_guide.save(out, dtype=torch.float16)
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def base_p_blank(base: Path) -> float:
    """The ``p_blank`` the base was trained with: its training.json's ``p_blank``, else its command's
    ``--p-blank`` (the command lists every option that differs from its default), else cond-ddpm's default."""
    default = 0.1
    path = base / "training.json"
    if not path.exists():
        return default
    meta = json.loads(path.read_text())
    if "p_blank" in meta:
        return float(meta["p_blank"])
    words = str(meta.get("command", "")).split()
    return float(words[words.index("--p-blank") + 1]) if "--p-blank" in words[:-1] else default


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, "runs/train-guide", "folder for the guide's EMA weights", iters=1500, batch=32, lr=1e-3,
                 warmup=50)  # fmt: skip
    ap.add_argument("--base", type=Path, default=None, required=True,
                    help="the exported base model (cond-ddpm --export)")  # fmt: skip
    ap.add_argument("--w-min", type=float, default=1.0, help="smallest guidance scale w drawn")
    ap.add_argument("--w-max", type=float, default=4.0, help="largest guidance scale w drawn")
    ap.add_argument("--p-blank", type=float, default=None, help="probability of an empty half (default: the base's)")
    ap.add_argument("--width", type=int, default=10, help="the guide's channels at every resolution")
    ap.add_argument("--emb-dim", type=int, default=16, help="the guide's conditioning embedding size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if not args.w_min <= args.w_max:
        ap.error(f"--w-min must be ≤ --w-max, got {args.w_min} and {args.w_max}")
    if args.p_blank is not None and not 0 <= args.p_blank < 1:
        ap.error(f"--p-blank must be in [0, 1), got {args.p_blank}")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging(args.out / "train.log")

    base = CondDigitModel.from_pretrained(args.base, dtype=torch.float32)  # frozen: eval, no weight gradients
    unet = base.unet
    p_blank = base_p_blank(args.base) if args.p_blank is None else args.p_blank
    data = TwoDigitCanvas("gen", p_blank=p_blank)
    guide = GuideNet.for_unet(unet, hidden_tokens=SLOTS, seed=args.seed, width=args.width, emb_dim=args.emb_dim)
    ema = EMA(guide, args.ema)
    opt = torch.optim.AdamW(guide.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    alpha_bar = base.scheduler.alphas_cumprod.float()
    hidden_null = base.encoder.null(1).detach()
    ckpt = args.out / "ckpt.pt"
    step, elapsed = resume(ckpt, guide, ema, opt, gen)
    guide.train()
    n_guide = sum(p.numel() for p in guide.parameters())
    n_base = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in base.encoder.parameters())
    log.info("guide: %d parameters, %.2f%% of the base's %d", n_guide, 100 * n_guide / n_base, n_base)
    t0, cpu0, loss_avg, ratio_avg, window, window0 = time.time(), time.process_time(), None, None, [], []
    while step < args.iters:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.iters)
        x_t, t, tokens, _ = batch(data, args.batch, gen, 0.0, alpha_bar)
        w = args.w_min + (args.w_max - args.w_min) * torch.rand(args.batch, generator=gen)
        hidden = base.embed(tokens)
        eps_c, eps_u = cfg_parts(unet, x_t, t, hidden, hidden_null)
        wv = w.view(-1, 1, 1, 1)
        target = eps_u + wv * (eps_c - eps_u)  # cfg_target, from the passes the no-guide loss needs too
        loss = F.mse_loss(distilled_eps(unet, guide, x_t, t, hidden, w), target)
        optimizer_step(guide, opt, ema, loss)
        step += 1
        no_guide = F.mse_loss(eps_c, target).item()  # the guide off: ε_c for ε̃
        window.append(loss.item())
        window0.append(no_guide)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        ratio = loss.item() / max(no_guide, 1e-12)
        ratio_avg = ratio if ratio_avg is None else 0.98 * ratio_avg + 0.02 * ratio
        if step % args.log_every == 0 or step == args.iters:
            dt, cpu = time.time() - t0, time.process_time() - cpu0
            elapsed += dt
            t0, cpu0 = time.time(), time.process_time()
            n = len(window)
            mean, mean0 = sum(window) / n, sum(window0) / n
            log.info("it %d loss %.5f (mean of last %d %.5f, no-guide %.5f, ratio %.3f, ema %.5f) %.2f s/it, "
                     "%.2f cpu s/it", step, window[-1], n, mean, mean0, mean / max(mean0, 1e-12), loss_avg, dt / n,
                     cpu / n)  # fmt: skip
            window, window0 = [], []
        if step % args.ckpt_every == 0 or step == args.iters:
            elapsed += time.time() - t0
            t0 = time.time()
            atomic_save(checkpoint_state(guide, ema, opt, gen, step, elapsed), ckpt)
    options = ("base", "batch", "lr", "warmup", "ema", "w_min", "w_max", "p_blank", "width", "emb_dim", "seed")
    meta = {
        **run_meta(ap, args, "python -m lossguide.training guide", options, elapsed),
        "base": str(args.base),
        "w_range": [args.w_min, args.w_max],
        "p_blank": p_blank,
        "seconds_per_iter": round(elapsed / max(step, 1), 3),
        "final_loss_ema": loss_avg,  # None when the run only exported a finished checkpoint
        "final_ratio_ema": ratio_avg,  # loss / the guide-off loss
        "guide": guide.config.to_json(),
        "guide_parameters": n_guide,
        "base_parameters": n_base,
        "parameter_share": n_guide / n_base,
    }
    finish(guide, ema, args.export, meta, export)


if __name__ == "__main__":
    main()
