"""Train the rectified-flow MNIST model ``mnist-flow`` on the MNIST-5k ``gen`` split (the DDPM's data).

The velocity model is the shipped DDPM's UNet2DModel wrapped in the exact VP→flow reparameterisation
(:class:`lossguide.models.flowwrap.FlowFromEps`: the ε-network sees x/k at the VP timestep whose ᾱ matches the flow
time's, and u = ε_hat − x0_hat), initialised from the ``mnist-ddpm`` weights, so at iteration 0 it *is* the DDPM
on the flow path. It is then fine-tuned with the conditional flow-matching loss (Lipman et al. 2023; Liu et al.
2023): x_t = (1 − t)·x0 + t·ε, t ~ U(0, 1) (``--t-sampling uniform``, the default; ``logit-normal`` draws
t = sigmoid(N(0, 1)), Esser et al. 2024), target u = ε − x0, loss ‖u_hat(x_t, t) − u‖².

Resumable: a checkpoint (model, EMA, optimiser, data generator) is written atomically every ``--ckpt-every``
iterations; rerunning the same command continues from it and ends with the same weights. The EMA UNet is exported
(fp16) as a diffusers-style folder: ``unet/``, ``scheduler/`` (a FlowMatchEulerDiscreteScheduler config),
``flow_wrapper.json`` (the wrapper) and ``training.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from lossguide.data import load_mnist
from lossguide.models import flowwrap
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
from lossguide.training.ddpm import SCHEDULER_CONFIG, lr_at

log = logging.getLogger("lossguide.training.flow")

T_SAMPLING = ("uniform", "logit-normal")
FLOW_T = 1000  # the flow network is called with t·1000 (diffusers' flow-matching convention)


def init_unet(init: Path):
    """The ε-UNet initialised from a diffusers folder (the shipped mnist-ddpm), in float32."""
    from diffusers import UNet2DModel

    src = init / "unet" if (init / "unet").is_dir() else init
    unet = UNet2DModel.from_pretrained(str(src), torch_dtype=torch.float32, low_cpu_mem_usage=False)
    return unet.float()


def wrap(unet) -> flowwrap.FlowFromEps:
    return flowwrap.FlowFromEps(unet, flowwrap.vp_alpha_bar(flowwrap.describe(SCHEDULER_CONFIG)), FLOW_T)


def draw_t(n: int, how: str, gen: torch.Generator) -> torch.Tensor:
    if how == "uniform":
        return torch.rand(n, generator=gen)
    if how == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    raise ValueError(f"unknown --t-sampling {how!r}; choose one of {T_SAMPLING}")


def flow_loss(model: flowwrap.FlowFromEps, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample conditional flow-matching loss ‖u_hat(x_t, t) − (ε − x0)‖² (mean over pixels)."""
    tv = t.view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1 - tv) * x0 + tv * eps
    return ((model(x_t, t * FLOW_T) - (eps - x0)) ** 2).flatten(1).mean(1)


def export(ema_unet, out: Path, meta: dict) -> None:
    """Write the EMA UNet (fp16 safetensors), a FlowMatchEulerDiscreteScheduler config, the wrapper and meta."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(ema_unet).to(torch.float16)  # the init's architecture (the shipped DDPM's by default)
    half.save_pretrained(out / "unet", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=FLOW_T, shift=1.0).save_pretrained(out / "scheduler")
    desc = flowwrap.describe(SCHEDULER_CONFIG, FLOW_T)
    (out / flowwrap.WRAPPER_FILE).write_text(json.dumps(desc, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, "runs/train-flow", "folder for the final EMA weights", iters=550, batch=64, lr=1e-4, warmup=50,
                 ema=0.995)  # fmt: skip
    ap.add_argument("--init", type=Path, default=None,
                    help="diffusers folder of the ε-DDPM to start from (default: the shipped mnist-ddpm)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--t-sampling", choices=T_SAMPLING, default="uniform")
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop (with a checkpoint) at this iteration, no export; rerun to continue")  # fmt: skip
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging(args.out / "train.log")
    from lossguide.models import DENOISERS, sha256

    init = args.init or DENOISERS["mnist-ddpm"]
    x_data, _ = load_mnist("gen")
    unet = init_unet(init)
    model = wrap(unet)
    ema = EMA(unet, args.ema)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    ckpt = args.out / "ckpt.pt"
    step, elapsed = resume(ckpt, unet, ema, opt, gen)
    loss_avg = torch.load(ckpt, weights_only=False).get("loss_avg") if step else None  # the curve goes on
    unet.train()
    t0 = time.time()
    stop = args.iters if args.stop_at is None else min(args.stop_at, args.iters)
    while step < stop:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.iters)
        idx = torch.randint(0, len(x_data), (args.batch,), generator=gen)
        x0 = x_data[idx]
        t = draw_t(args.batch, args.t_sampling, gen)
        eps = torch.randn(x0.shape, generator=gen)
        loss = flow_loss(model, x0, t, eps).mean()
        optimizer_step(unet, opt, ema, loss)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 25 == 0:
            log.info("it %d loss %.4f (batch %.4f, %.2f s/it)", step, loss_avg, loss.item(), (time.time() - t0) / 25)
            elapsed += time.time() - t0
            t0 = time.time()
        if step % args.ckpt_every == 0 or step == stop:
            elapsed += time.time() - t0
            t0 = time.time()
            atomic_save(checkpoint_state(unet, ema, opt, gen, step, elapsed, loss_avg=loss_avg), ckpt)
    if step < args.iters:
        log.info("stopped at iteration %d of %d (--stop-at); rerun without it to continue", step, args.iters)
        return
    init_w = Path(init) / "unet" / "diffusion_pytorch_model.safetensors"
    init_label = "mnist-ddpm (shipped)" if args.init is None else str(init)
    options = ("batch", "lr", "warmup", "ema", "seed", "t_sampling", "init")
    meta = {
        **run_meta(ap, args, "python -m lossguide.training flow", options, elapsed),
        "warmup": args.warmup,
        "lr_schedule": f"linear warm-up over {args.warmup}, cosine to 1e-5 over {args.iters}",
        "t_sampling": args.t_sampling,
        "loss": "conditional flow matching: x_t = (1-t) x0 + t eps, target u = eps - x0, mean squared error",
        "init": init_label,
        "init_sha256": sha256(init_w) if init_w.exists() else None,
        "made": f"initialised from {init_label.split(' (')[0]} through the exact VP->flow reparameterisation, "
        f"fine-tuned {args.iters} iterations with the flow-matching loss",
        "final_loss_ema": loss_avg,  # restored from the checkpoint when the run only exported a finished one
        "data": "MNIST-5k gen split (4000)",
    }
    finish(unet, ema, args.export, meta, export)


if __name__ == "__main__":
    main()
