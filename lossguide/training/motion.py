"""Train the motion diffusion model (x0-prediction, as MDM, Tevet et al. 2023, eq. 2 + geometric losses).

Data: windows of pybullet's humanoid clips (:mod:`lossguide.motion.data`), stitched, mirrored and
rotated to random headings. Loss per batch: ‖x0_hat − x0‖² on normalised features (the root as its
ground velocity), plus MDM's geometric terms on forward-kinematics joint positions (metres) and their
velocities (m/s). Resumable: a checkpoint (model, EMA, optimiser, data generator) is written
atomically every ``--ckpt-every`` iterations; rerunning the same command continues from it. The EMA
weights are exported to a single safetensors file (fp16 network, fp32 normalisation, config in its
metadata).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lossguide.io import atomic_write_bytes
from lossguide.motion.data import (
    DATA_SEED,
    FPS,
    LOCOMOTION,
    MotionData,
    feature_stats,
    forward_kinematics,
    positions_to_velocity,
    velocity_to_positions,
)
from lossguide.motion.model import WEIGHTS, MotionNetConfig, MotionTransformer, make_schedule, save_model
from lossguide.training.common import (
    EMA,
    add_run_args,
    atomic_save,
    checkpoint_state,
    optimizer_step,
    resume,
    setup_logging,
)
from lossguide.training.ddpm import lr_at

log = logging.getLogger("lossguide.training.motion")

STATS_SEED = 1  # the windows that fix the normalisation


def geometric_loss(x_hat: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MDM's position and velocity losses (Tevet et al. 2023, eq. 3–4) on forward-kinematics joints.

    Positions are taken relative to the root (the root path is already in the x0 term), velocities are
    world velocities in m/s (so foot sliding costs); both are weighted per sample by ``weight`` (ᾱ_t:
    the geometry of a very noisy sample's x0_hat is not the point).
    """
    p_hat, p0 = forward_kinematics(x_hat), forward_kinematics(x0)
    w = weight.view(-1, 1, 1, 1)
    pos = (w * ((p_hat - p_hat[..., :1, :]) - (p0 - p0[..., :1, :])).square()).mean()
    vel = (w * ((p_hat[:, 1:] - p_hat[:, :-1]) * FPS - (p0[:, 1:] - p0[:, :-1]) * FPS).square()).mean()
    return pos, vel


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, "runs/train-motion", f"safetensors file for the EMA weights ({WEIGHTS})", iters=6000, batch=32, lr=5e-4, warmup=200)
    ap.add_argument("--w-pos", type=float, default=10.0, help="weight of the FK position loss (m²)")
    ap.add_argument("--w-vel", type=float, default=0.2, help="weight of the FK velocity loss ((m/s)²)")
    ap.add_argument(
        "--stop-at", type=int, default=None, help="stop (and export) at this iteration of the --iters schedule"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup_logging(args.out / "train.log")

    cfg = MotionNetConfig()
    data = MotionData.build(cfg.clips, seed=DATA_SEED, window=cfg.window)
    mean, std = feature_stats(positions_to_velocity(data.windows(4096, torch.Generator().manual_seed(STATS_SEED))))
    torch.manual_seed(args.seed)  # parameter init only; every later draw uses `gen`
    model = MotionTransformer(cfg)
    log.info("parameters: %d", sum(p.numel() for p in model.parameters()))
    ema = EMA(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    alpha_bar = make_schedule(cfg).alpha_bar.float()
    ckpt = args.out / "ckpt.pt"
    step, elapsed = resume(ckpt, model, ema, opt, gen)
    model.train()
    t0, avg = time.time(), None
    stop = args.iters if args.stop_at is None else min(args.stop_at, args.iters)
    while step < stop:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.iters)
        x0 = data.windows(args.batch, gen)
        z0 = (positions_to_velocity(x0) - mean) / std
        t = torch.randint(0, cfg.T, (args.batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        ab = alpha_bar[t].view(-1, 1, 1)
        z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        z_hat = model(z_t, t)
        l_x0 = F.mse_loss(z_hat, z0)
        l_pos, l_vel = geometric_loss(velocity_to_positions(z_hat * std + mean), x0, ab.view(-1))
        loss = l_x0 + args.w_pos * l_pos + args.w_vel * l_vel
        optimizer_step(model, opt, ema, loss)
        step += 1
        parts = torch.stack([loss, l_x0, l_pos, l_vel]).detach()
        avg = parts if avg is None else 0.98 * avg + 0.02 * parts
        if step % 50 == 0:
            log.info(
                "it %d loss %.4f (x0 %.4f, pos %.5f m², vel %.4f) %.2f it/s",
                step,
                *avg.tolist(),
                50 / (time.time() - t0 + 1e-9),
            )
            elapsed += time.time() - t0
            t0 = time.time()
        if step % args.ckpt_every == 0 or step == stop:
            elapsed += time.time() - t0
            t0 = time.time()
            state = checkpoint_state(model, ema, opt, gen, step, elapsed, avg=avg)
            atomic_save(state, ckpt)
    if avg is None and ckpt.exists():
        avg = torch.load(ckpt, weights_only=False).get("avg")
    cmd = f"python -m lossguide.training motion --out {args.out} --iters {args.iters} --threads {args.threads}"
    if args.stop_at is not None:
        cmd += f" --stop-at {args.stop_at}"
    if args.export is not None:
        cmd += f" --export {args.export}"
    meta = {
        "command": cmd,
        "iters": args.iters,
        "stopped_at": stop,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "data_seed": DATA_SEED,
        "stats_seed": STATS_SEED,
        "ema": args.ema,
        "w_pos": args.w_pos,
        "w_vel": args.w_vel,
        "threads": args.threads,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(elapsed, 1),
        "final_loss_ema": None if avg is None else dict(zip(("total", "x0", "pos", "vel"), avg.tolist(), strict=True)),
        "data": f"{len(data.sequences)} sequences × {len(data.sequences[0]) / FPS:.0f} s from {', '.join(LOCOMOTION)}",
    }
    if args.export is not None:
        atomic_write_bytes(args.export, save_model(args.export, ema.model, mean, std, meta))
        log.info("exported EMA weights to %s", args.export)
    log.info("done: %s", json.dumps(meta))


if __name__ == "__main__":
    main()
