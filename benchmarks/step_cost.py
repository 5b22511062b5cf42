"""Cost of one guided step against its floor, and the extra cost of random augmentation (Table 6 analogue).

floor = one denoiser forward+backward (to its input) + one loss forward+backward (to its input), timed
separately; a guided step (``freedom``: gradient through the denoiser) should cost ≤ 1.10× the floor.
Then ``shen2024`` steps with |T| = 0, 1, 10, 20 augmented copies (no time travel), as seconds per step
and extra cost over |T| = 0. The denoiser is the default MNIST UNet layout with random weights (speed
does not depend on the weights), the loss the guide CNN's cross-entropy. Medians over ``--reps``.

    python benchmarks/step_cost.py [--batch 16] [--reps 20] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import lossguide as lg
from lossguide.augment import policy
from lossguide.guidance import GuidanceEngine, GuidanceStats
from lossguide.losses import ClassLoss
from lossguide.models.nets import GuideCNN
from lossguide.training.ddpm import SCHEDULER_CONFIG, build_unet


def timed(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = args.device
    torch.manual_seed(0)
    from diffusers import DDPMScheduler

    unet = build_unet().to(dev)
    den = lg.from_diffusers(unet, DDPMScheduler(**SCHEDULER_CONFIG))
    loss = ClassLoss(GuideCNN().to(dev), 3)
    sampler = lg.DDIM(den.schedule, 50)
    gens = lg.make_generators(range(args.batch))
    x = torch.randn(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(dev)
    i = 25
    t = int(sampler.timesteps[i])

    def denoiser_fb():
        xi = x.detach().requires_grad_(True)
        out = den(xi, t).x0_hat
        torch.autograd.grad(out.sum(), xi)

    def loss_fb():
        xi = x.detach().requires_grad_(True)
        torch.autograd.grad(loss(xi).sum(), xi)

    def guided(cfg):
        engine = GuidanceEngine(cfg, loss, augment=policy("digits"))

        def run():
            st = GuidanceStats()
            st.init(args.batch)
            engine.step(den, sampler, x, i, gens, st)

        return run

    def sync(fn):
        def run():
            fn()
            if dev.startswith("cuda"):
                torch.cuda.synchronize()

        return run

    t_den = timed(sync(denoiser_fb), args.reps)
    t_loss = timed(sync(loss_fb), args.reps)
    t_none = timed(sync(guided(lg.preset("none"))), args.reps)
    t_guided = timed(sync(guided(lg.preset("freedom"))), args.reps)
    floor = t_den + t_loss
    aug = {}
    for n_aug in (0, 1, 10, 20):
        aug[n_aug] = timed(sync(guided(lg.preset("shen2024", n_aug=n_aug, n_recur=1))), args.reps)
    res = {
        "device": dev if dev == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "denoiser_fwd_bwd_s": t_den,
        "loss_fwd_bwd_s": t_loss,
        "floor_s": floor,
        "unguided_step_s": t_none,
        "guided_step_s": t_guided,
        "guided_over_floor": t_guided / floor,
        "shen2024_step_s_by_n_aug": aug,
        "aug_extra_pct": {k: 100 * (v / aug[0] - 1) for k, v in aug.items()},
    }
    print(f"device {res['device']}, {res['threads']} threads, batch {args.batch}, median of {args.reps}")
    print(f"denoiser fwd+bwd {t_den * 1e3:.1f} ms + loss fwd+bwd {t_loss * 1e3:.1f} ms = floor {floor * 1e3:.1f} ms")
    print(
        f"unguided step {t_none * 1e3:.1f} ms; guided step (freedom) {t_guided * 1e3:.1f} ms "
        f"= {t_guided / floor:.3f}x floor (target <= 1.10x)"
    )
    for k, v in aug.items():
        print(f"shen2024 |T|={k:2d}: {v * 1e3:.1f} ms/step ({res['aug_extra_pct'][k]:+.1f}% vs |T|=0)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
