"""Train the default ε-prediction DDPM (Ho et al. 2020, Alg. 1) on the MNIST-5k ``gen`` split.

Resumable: a checkpoint (model, EMA, optimiser, data generator) is written atomically every
``--ckpt-every`` iterations; rerunning the same command continues from it and ends with the
same weights. The EMA weights are exported as a diffusers folder (``unet/``, ``scheduler/``).
``--block-channels`` and ``--norm-groups`` change the UNet's widths (same layout, data, schedule and seed): with a
shorter ``--iters`` they make the smaller, earlier "bad" model that autoguidance guides with (``mnist-ddpm-bad``;
its exact command is in the manifest).

Transfer baselines (``lossguide experiment transfer``): ``--n-target N`` trains on N digits of the gen split chosen
by :func:`lossguide.transfer.target_digits` (``--target-seed``), ``--style NAME`` restyles the training digits
(:data:`lossguide.data.styles.STYLES`), and ``--init MODEL`` starts from an exported model (a shipped name or a
diffusers folder: its architecture and weights, the EMA's too), i.e. fine-tuning; without ``--init`` the run
trains from scratch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lossguide.data import load_mnist
from lossguide.data.styles import STYLES
from lossguide.training.common import (
    EMA,
    add_run_args,
    atomic_save,
    checkpoint_state,
    finish,
    optimizer_step,
    parse_widths,
    resume,
    run_meta,
    setup_logging,
)

log = logging.getLogger("lossguide.training.ddpm")

UNET_CONFIG = dict(
    sample_size=28,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=False,
)


def unet_config(block_channels: tuple[int, ...] | None = None, norm_groups: int | None = None) -> dict:
    """:data:`UNET_CONFIG` with other per-level widths and GroupNorm groups (None: the shipped model's)."""
    cfg = dict(UNET_CONFIG)
    if block_channels is not None:
        if len(block_channels) != len(UNET_CONFIG["block_out_channels"]):
            n = len(UNET_CONFIG["block_out_channels"])
            raise ValueError(f"--block-channels needs {n} widths (one per level), got {block_channels}")
        cfg["block_out_channels"] = tuple(block_channels)
    if norm_groups is not None:
        cfg["norm_num_groups"] = norm_groups
    bad = [c for c in cfg["block_out_channels"] if c % cfg["norm_num_groups"]]
    if bad:
        raise ValueError(f"every width must be divisible by --norm-groups {cfg['norm_num_groups']}, got {bad}")
    return cfg


def build_unet(config: dict | None = None):
    from diffusers import UNet2DModel

    return UNet2DModel(**(config or UNET_CONFIG))


def init_unet(name_or_path: str):
    """The UNet of an exported model (a shipped name or a diffusers folder), in fp32."""
    from diffusers import UNet2DModel

    from lossguide.models import resolve

    path, _ = resolve(name_or_path)
    folder = Path(path)
    return UNet2DModel.from_pretrained(folder / "unet" if (folder / "unet").is_dir() else folder).float()


def lr_at(step: int, lr: float, warmup: int, total: int, lr_min: float = 1e-5) -> float:
    """Linear warm-up, then cosine decay to ``lr_min``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * p))


def export(ema_model, out: Path, meta: dict, config: dict | None = None) -> None:
    """Write the EMA UNet (fp16 safetensors) and its DDPMScheduler config as a diffusers folder."""
    from diffusers import DDPMScheduler

    out.mkdir(parents=True, exist_ok=True)
    half = build_unet(config)
    half.load_state_dict(ema_model.state_dict())
    half.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, "runs/train-ddpm", "diffusers folder for the final EMA weights", iters=5000, batch=64, lr=1e-3, warmup=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--block-channels", type=parse_widths, default=None,
                    help="UNet widths per level, e.g. 16,32,64 (default: the shipped 32,64,128)")  # fmt: skip
    ap.add_argument("--norm-groups", type=int, default=None, help="GroupNorm groups (default: the shipped 16)")
    ap.add_argument("--init", default=None, help="start from this model (shipped name or diffusers folder)")
    ap.add_argument("--style", choices=sorted(STYLES), default=None, help="restyle the training digits")
    ap.add_argument("--n-target", type=int, default=None, help="train on N digits of the gen split (transfer)")
    ap.add_argument("--target-seed", type=int, default=0, help="which N digits (with --n-target)")
    args = ap.parse_args(argv)
    init = None
    if args.init is not None:
        if args.block_channels is not None or args.norm_groups is not None:
            ap.error(f"--init takes the architecture from {args.init}; drop --block-channels/--norm-groups")
        init = init_unet(args.init)
        config = {k: (tuple(v) if isinstance(v, list) else v) for k, v in init.config.items() if k in UNET_CONFIG}
    else:
        config = unet_config(args.block_channels, args.norm_groups)
    if args.n_target is not None and not 1 <= args.n_target <= 4000:
        ap.error(f"--n-target must be in 1..4000 (the gen split's digits), got {args.n_target}")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging(args.out / "train.log")

    if args.n_target is not None:
        from lossguide.transfer import target_digits

        x_data, _ = target_digits(args.n_target, args.target_seed, args.style or "thick")
    else:
        x_data, _ = load_mnist("gen")
        x_data = STYLES[args.style](x_data) if args.style else x_data
    torch.manual_seed(args.seed)  # parameter init only; every later draw uses `gen`
    model = build_unet(config)
    if init is not None:
        model.load_state_dict(init.state_dict())
    ema = EMA(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    betas = torch.linspace(SCHEDULER_CONFIG["beta_start"], SCHEDULER_CONFIG["beta_end"], 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0).float()
    ckpt = args.out / "ckpt.pt"
    step, elapsed = resume(ckpt, model, ema, opt, gen)
    model.train()
    t0, loss_avg = time.time(), None
    while step < args.iters:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.iters)
        idx = torch.randint(0, len(x_data), (args.batch,), generator=gen)
        x0 = x_data[idx]
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        loss = F.mse_loss(model(x_t, t).sample, eps)
        optimizer_step(model, opt, ema, loss)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 50 == 0:
            log.info("it %d loss %.4f (%.2f it/s)", step, loss_avg, 50 / (time.time() - t0 + 1e-9))
            elapsed += time.time() - t0
            t0 = time.time()
        if step % args.ckpt_every == 0 or step == args.iters:
            elapsed += time.time() - t0
            t0 = time.time()
            atomic_save(
                checkpoint_state(model, ema, opt, gen, step, elapsed),
                ckpt,
            )
    options = ("batch", "lr", "warmup", "ema", "seed", "block_channels", "norm_groups", "init", "style", "n_target",
               "target_seed")
    meta = {
        **run_meta(ap, args, "python -m lossguide.training ddpm", options, elapsed),
        "final_loss_ema": loss_avg,  # None when the run only exported a finished checkpoint
        "data": (f"{args.n_target} digits of the MNIST-5k gen split (target_digits, seed {args.target_seed})"
                 if args.n_target else "MNIST-5k gen split (4000)") + (f", style {args.style}" if args.style else ""),
        "init": args.init,
        "block_out_channels": list(config["block_out_channels"]),
        "norm_num_groups": config["norm_num_groups"],
    }
    finish(model, ema, args.export, meta, export, config)


if __name__ == "__main__":
    main()
