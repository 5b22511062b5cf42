"""Train the two-digit conditional DDPM (Ho et al. 2020, Alg. 1, with the v target of Salimans & Ho 2022 by
default) on 1×28×56 canvases of MNIST-5k ``gen`` digits (:class:`lossguide.data.canvas.TwoDigitCanvas`),
cross-attending to the tokens (left class, right class), a half empty (class 10) with probability ``--p-blank``;
the condition is dropped to (null, null) with probability ``--p-uncond`` for classifier-free guidance (Ho &
Salimans 2022).

Resumable: a checkpoint (UNet + token encoder, EMA, optimiser, data generator) is written atomically every
``--ckpt-every`` iterations; rerunning the same command continues from it and ends with the same weights.
The EMA weights are exported (fp16) as a diffusers folder (``unet/``, ``scheduler/``) with the token
embedding (``token_embedding.safetensors``): load it with :meth:`lossguide.layout.CondDigitModel.from_pretrained`.

    python -m lossguide.training cond-ddpm --out runs/train-cond --iters 2600 --block-channels 16,32,64 \
        --norm-groups 16 --threads 1 --export runs/cond-digits

made the shipped ``mnist-cond`` (≈ 0.98 s/iteration on one thread, 42.5 min; its metrics and the tolerance a
retrained copy must meet are in the manifest: ``evaluate-cond --check mnist-cond``). The target is v by default:
an ε-prediction run of the same network diverged in sampling after 500 iterations (its ε error at t ≈ T,
MSE 0.004 against the DDPM's 0.0002, becomes an x0_hat error of ±20 through 1/√ᾱ_T ≈ 150), where the v run gave
digits after 300.

A fine-tuned copy starts from an exported model (``--init DIR``: its architecture and weights, the EMA's too)
and may train on restyled canvases (``--style NAME``, :data:`lossguide.data.styles.STYLES`), e.g.

    python -m lossguide.training cond-ddpm --init runs/cond-digits --style thick --iters 300 --lr 2e-4 \
        --warmup 20 --out runs/train-cond-thick --threads 1 --export runs/cond-digits-thick
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lossguide.data.canvas import BLANK, CANVAS_SHAPE, TwoDigitCanvas
from lossguide.data.styles import STYLES
from lossguide.layout.model import NULL_TOKEN, TOKEN_FILE, CondDigitModel, TokenEncoder
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
from lossguide.training.ddpm import SCHEDULER_CONFIG, lr_at
from lossguide.training.ddpm import UNET_CONFIG as DDPM_UNET_CONFIG

log = logging.getLogger("lossguide.training.cond_ddpm")

UNET_CONFIG = {k: DDPM_UNET_CONFIG[k] for k in ("in_channels", "out_channels", "layers_per_block")} | dict(
    sample_size=CANVAS_SHAPE[1:],
    block_out_channels=(32, 64, 64),
    # no attention at 28×56: its self-attention would cost more than the rest of the network
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,  # diffusers' name for the number of heads: 2 heads of 32 channels
    norm_num_groups=32,
)


def unet_config(
    block_channels: tuple[int, ...] | None = None,
    norm_groups: int | None = None,
    heads: int | None = None,
    token_dim: int | None = None,
) -> dict:
    """:data:`UNET_CONFIG` with other widths, GroupNorm groups, heads or token dimension (None: the default's)."""
    cfg = dict(UNET_CONFIG)
    if block_channels is not None:
        n = len(UNET_CONFIG["block_out_channels"])
        if len(block_channels) != n:
            raise ValueError(f"--block-channels needs {n} widths (one per level), got {block_channels}")
        cfg["block_out_channels"] = tuple(block_channels)
    changes = {"norm_num_groups": norm_groups, "attention_head_dim": heads, "cross_attention_dim": token_dim}
    for key, v in changes.items():
        if v is not None:
            cfg[key] = v
    bad = [c for c in cfg["block_out_channels"] if c % cfg["norm_num_groups"] or c % cfg["attention_head_dim"]]
    if bad:
        raise ValueError(f"every width must be divisible by --norm-groups {cfg['norm_num_groups']} and --heads "
                         f"{cfg['attention_head_dim']}, got {bad}")  # fmt: skip
    return cfg


class CondDiffusion(torch.nn.Module):
    """The trained pair: the UNet and the token encoder whose hidden states it cross-attends to."""

    def __init__(self, config: dict):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(**config)
        self.tokens = TokenEncoder(dim=config["cross_attention_dim"])

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=self.tokens(tokens)).sample


def export(ema_model: CondDiffusion, out: Path, meta: dict, config: dict, prediction: str = "v_prediction") -> None:
    """Write the EMA UNet (fp16 safetensors), its DDPMScheduler config (``prediction_type``) and the token
    embedding (fp16)."""
    from diffusers import DDPMScheduler

    out.mkdir(parents=True, exist_ok=True)
    half = CondDiffusion(config)
    half.load_state_dict(ema_model.state_dict())
    half.unet.half().save_pretrained(out / "unet", safe_serialization=True)
    half.tokens.save(out / TOKEN_FILE, dtype=torch.float16)
    DDPMScheduler(**(SCHEDULER_CONFIG | {"prediction_type": prediction})).save_pretrained(out / "scheduler")
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def batch(
    data: TwoDigitCanvas, n: int, gen: torch.Generator, p_uncond: float, alpha_bar: torch.Tensor, style=None,
    prediction: str = "epsilon",
) -> tuple[torch.Tensor, ...]:
    """(x_t, t, tokens, target) of one training batch, the target ε or, for ``prediction="v_prediction"``,
    v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022); the canvases restyled by ``style`` (a transform of
    :data:`lossguide.data.styles.STYLES`) if given; every draw comes from ``gen``."""
    seeds = torch.randint(0, 2**62, (n,), generator=gen).tolist()
    x0, tokens = data.draw(seeds)
    if style is not None:
        x0 = style(x0)
    drop = torch.rand(n, generator=gen) < p_uncond
    tokens = torch.where(drop[:, None], torch.full_like(tokens, NULL_TOKEN), tokens)
    t = torch.randint(0, len(alpha_bar), (n,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    if prediction == "epsilon":
        return x_t, t, tokens, eps
    if prediction == "v_prediction":
        return x_t, t, tokens, ab.sqrt() * eps - (1 - ab).sqrt() * x0
    raise ValueError(f"prediction must be 'epsilon' or 'v_prediction', got {prediction!r}")


def init_config(path: Path) -> tuple[dict, CondDigitModel]:
    """The UNet config (:data:`UNET_CONFIG`'s keys) and the float32 weights of the exported model at ``path``."""
    init = CondDigitModel.from_pretrained(path)
    return {k: init.unet.config[k] for k in UNET_CONFIG}, init


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap, "runs/train-cond", "diffusers folder for the final EMA weights", iters=2000, batch=32, lr=1e-3,
                 warmup=100)  # fmt: skip
    ap.add_argument("--p-uncond", type=float, default=0.1, help="probability of dropping the condition")
    ap.add_argument("--p-blank", type=float, default=0.1, help="probability that a half of a canvas is empty")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--block-channels", type=parse_widths, default=None,
                    help="UNet widths per level (default 32,64,64)")  # fmt: skip
    ap.add_argument("--norm-groups", type=int, default=None, help="GroupNorm groups (default 32)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default 2)")
    ap.add_argument("--token-dim", type=int, default=None, help="token embedding / cross-attention dim (default 32)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from this exported model's architecture and weights (the EMA too), not random ones")
    ap.add_argument("--style", choices=sorted(STYLES), default=None, help="restyle the training canvases")
    ap.add_argument("--prediction", choices=("v_prediction", "epsilon"), default=None,
                    help="the network's target (default v_prediction, or --init's): ε-prediction needs the network "
                         "to reproduce x_t/√(1−ᾱ) to 1e-4 at t ≈ T, where x0_hat = (x_t − √(1−ᾱ)ε)/√ᾱ amplifies its "
                         "error 150×; a 500-iteration ε run diverged in sampling for that reason")
    args = ap.parse_args(argv)
    if not 0 <= args.p_uncond < 1:
        ap.error(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    arch = {"--block-channels": args.block_channels, "--norm-groups": args.norm_groups, "--heads": args.heads,
            "--token-dim": args.token_dim}  # fmt: skip
    if args.init is not None and any(v is not None for v in arch.values()):
        given = [k for k, v in arch.items() if v is not None]
        ap.error(f"--init takes the architecture from {args.init}; drop {', '.join(given)}")
    init = None
    if args.init is not None:
        config, init = init_config(args.init)
        init_prediction = init.scheduler.config.prediction_type
        if args.prediction not in (None, init_prediction):
            ap.error(f"--init {args.init} predicts {init_prediction}; drop --prediction {args.prediction}")
        args.prediction = init_prediction
    else:
        config = unet_config(args.block_channels, args.norm_groups, args.heads, args.token_dim)
    if args.prediction is None:
        args.prediction = "v_prediction"
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging(args.out / "train.log")

    if not 0 <= args.p_blank < 1:
        ap.error(f"--p-blank must be in [0, 1), got {args.p_blank}")
    data = TwoDigitCanvas("gen", p_blank=args.p_blank)
    torch.manual_seed(args.seed)  # parameter init only; every later draw uses `gen`
    model = CondDiffusion(config)
    if init is not None:
        model.unet.load_state_dict(init.unet.state_dict())
        model.tokens.load_state_dict(init.encoder.state_dict())
    ema = EMA(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    T = SCHEDULER_CONFIG["num_train_timesteps"]
    betas = torch.linspace(SCHEDULER_CONFIG["beta_start"], SCHEDULER_CONFIG["beta_end"], T, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0).float()
    style = STYLES[args.style] if args.style is not None else None
    ckpt = args.out / "ckpt.pt"
    step, elapsed = resume(ckpt, model, ema, opt, gen)
    model.train()
    t0, cpu0, loss_avg, window = time.time(), time.process_time(), None, []
    while step < args.iters:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.iters)
        x_t, t, tokens, target = batch(data, args.batch, gen, args.p_uncond, alpha_bar, style, args.prediction)
        loss = F.mse_loss(model(x_t, t, tokens), target)
        optimizer_step(model, opt, ema, loss)
        step += 1
        window.append(loss.item())
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % args.log_every == 0 or step == args.iters:
            dt, cpu = time.time() - t0, time.process_time() - cpu0
            elapsed += dt
            t0, cpu0 = time.time(), time.process_time()
            n = len(window)
            # CPU seconds per iteration is what an iteration costs on an idle machine (one thread)
            log.info("it %d loss %.4f (mean of last %d %.4f, ema %.4f) %.2f s/it, %.2f cpu s/it", step, window[-1], n,
                     sum(window) / n, loss_avg, dt / n, cpu / n)  # fmt: skip
            window = []
        if step % args.ckpt_every == 0 or step == args.iters:
            elapsed += time.time() - t0
            t0 = time.time()
            atomic_save(checkpoint_state(model, ema, opt, gen, step, elapsed), ckpt)
    options = ("batch", "lr", "warmup", "ema", "p_uncond", "p_blank", "seed", "block_channels", "norm_groups", "heads",
               "token_dim", "init", "style", "prediction")
    meta = {
        **run_meta(ap, args, "python -m lossguide.training cond-ddpm", options, elapsed),
        "p_uncond": args.p_uncond,
        "p_blank": args.p_blank,
        "seconds_per_iter": round(elapsed / max(step, 1), 3),
        "final_loss_ema": loss_avg,  # None when the run only exported a finished checkpoint
        "data": "two-digit canvases (1x28x56) of the MNIST-5k gen split (4000 digits), a half empty with "
                f"p={args.p_blank}" + (f", style {args.style!r}" if args.style else ""),
        "init": None if args.init is None else str(args.init),
        "style": args.style,
        "prediction": args.prediction,
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "token_dim": config["cross_attention_dim"],
        "null_token": NULL_TOKEN,
        "blank_token": BLANK,
    }
    finish(model, ema, args.export, meta, export, config, args.prediction)


if __name__ == "__main__":
    main()
