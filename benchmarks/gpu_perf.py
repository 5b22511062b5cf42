"""Speed and memory of guided sampling at real model sizes (random weights: speed does not depend on them).

Two stacks, as issue #6 asks:

* pixel: a CelebA-HQ-256-sized ``UNet2DModel`` (google/ddpm-ema-celebahq-256's config, 114M parameters)
  guided by a CLIP ViT-B/16-sized vision tower (CLIPTextLoss, cosine, to a random text embedding);
* latent: a Stable-Diffusion-1.5-sized stack (``UNet2DConditionModel`` 860M, ``AutoencoderKL`` 84M, 64²×4
  latents → 512² images) with classifier-free guidance (w = 7.5, precomputed random 77×768 prompt
  embeddings) and the same CLIP loss on the VAE-decoded x0_hat.

For each stack, guided DDIM with ``--steps`` steps and batch ``--batch``: seconds per image for ``none``,
``freedom`` and ``shen2024`` (|T| = 10 DiffAugment copies, Polyak step, no time travel so every method
makes the same number of denoiser calls; on the latent stack the copies are of the decoded image,
``DecodeThenAugment``), in fp32 and bf16 (weights in bf16, sampler state in fp32), with
and without ``torch.compile`` and gradient checkpointing; peak GPU memory; and one guided step (freedom)
against its floor, one denoiser forward+backward plus one loss forward+backward timed separately.

    python benchmarks/gpu_perf.py --device cuda --json perf.json           # the issue's sizes
    python benchmarks/gpu_perf.py --small --device cpu --json perf.json    # reduced sizes for a CPU

``--small`` shrinks every network (channels ÷4, 64² pixel images, 128² latent-stack images, a 4-layer
CLIP at 112²) and defaults to batch 2 and 3 steps, so the figures measure the code path, not the sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import lossguide as lg
from lossguide import net_losses as nl
from lossguide.augment import policy
from lossguide.guidance import GuidanceEngine, GuidanceStats
from lossguide.latent import DecodeThenAugment, LatentStack


def clip_model(small: bool, dtype):
    from transformers import CLIPConfig, CLIPModel

    vision = dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12)  # fmt: skip
    if small:
        vision.update(
            image_size=112, hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3
        )
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).to(dtype)


def clip_loss(small, dtype, device):
    clip = nl.CLIP(clip_model(small, dtype).to(device))
    target = torch.randn(1, 512, generator=torch.Generator().manual_seed(1)).to(device)
    return nl.CLIPTextLoss(clip, text_embeds=target, metric="cosine"), clip


def pixel_stack(small: bool, dtype, device):
    from diffusers import DDPMScheduler, UNet2DModel

    ch = (128, 128, 256, 256, 512, 512)
    res = 256
    if small:
        ch, res = tuple(c // 4 for c in ch), 64
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=res, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=ch,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        norm_num_groups=32 if not small else 8,
    ).to(device, dtype)  # fmt: skip
    den = lg.from_diffusers(unet, DDPMScheduler(clip_sample=False), state_dtype=torch.float32)
    loss, clip = clip_loss(small, dtype, device)
    return dict(den=den, loss=loss, shape=(3, res, res), ckpt=[unet], compile=[unet, clip.model.vision_model])


def latent_stack(small: bool, dtype, device):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    u_ch, v_ch, ctx, res, heads = (320, 640, 1280, 1280), (128, 256, 512, 512), 768, 512, 8
    if small:
        u_ch, v_ch, ctx, res = tuple(c // 4 for c in u_ch), tuple(c // 4 for c in v_ch), 192, 128
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=res // 8, block_out_channels=u_ch, cross_attention_dim=ctx, attention_head_dim=heads,
        norm_num_groups=32 if not small else 8,
    ).to(device, dtype)  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=v_ch, layers_per_block=2, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32 if not small else 8, sample_size=res,
    ).to(device, dtype)  # fmt: skip
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    stack = LatentStack(unet, vae, sched)
    g = torch.Generator().manual_seed(2)
    cond, null = (torch.randn(1, 77, ctx, generator=g).to(device) for _ in range(2))
    den = stack.denoiser(cond, null, guidance_scale=7.5)
    pixel_loss, clip = clip_loss(small, dtype, device)
    return dict(den=den, loss=stack.loss(pixel_loss), shape=stack.latent_shape(res, res), stack=stack,
                ckpt=[unet, vae], compile=[unet, vae.decoder, clip.model.vision_model])  # fmt: skip


METHODS = {
    "none": lambda: lg.preset("none"),
    "freedom": lambda: lg.preset("freedom", scale=1.0),
    "shen2024": lambda: lg.preset("shen2024", eta=0.1, n_aug=10, n_recur=1),
}


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(model: str, dtype_name: str, compiled: bool, ckpt: bool, methods, args) -> list[dict]:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    dev = args.device
    m = (pixel_stack if model == "pixel" else latent_stack)(args.small, dtype, dev)
    if ckpt:
        for mod in m["ckpt"]:
            mod.enable_gradient_checkpointing()
    if compiled:
        for mod in m["compile"]:
            mod.compile()
    den, loss, shape = m["den"], m["loss"], m["shape"]
    sampler = lg.DDIM(den.schedule, args.steps)
    B = args.batch
    rows = []
    base = dict(model=model, dtype=dtype_name, compile=compiled, checkpointing=ckpt, batch=B, steps=args.steps)
    for name in methods:
        if name == "none" and ckpt:
            continue  # no backward pass: checkpointing changes nothing
        cfg = METHODS[name]()
        if model == "latent" and cfg.n_aug:  # augment the decoded image: one VAE decode, |T| CLIP copies
            cfg = cfg.replace(augment=DecodeThenAugment(loss, cfg.augment))

        def run(steps=None, cfg=cfg):
            s = sampler if steps is None else lg.DDIM(den.schedule, steps)
            lg.sample(den, s, cfg, loss if cfg.enabled else None, shape=shape, seeds=range(B), device=dev,
                      augment=policy("photo"))

        run(steps=2)  # warm-up (and compilation)
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        walls = []
        for _ in range(args.runs):
            sync(dev)
            t0 = time.perf_counter()
            run()
            sync(dev)
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        row = dict(base, method=name, s_per_image=wall / B, wall_s=wall, runs=walls)
        if dev.startswith("cuda"):
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        print(json.dumps(row), flush=True)
    if "freedom" in methods:
        rows.append(dict(base, **floor_ratio(den, loss, shape, sampler, args)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def floor_ratio(den, loss, shape, sampler, args) -> dict:
    """One guided step (freedom) against denoiser fwd+bwd + loss fwd+bwd at the middle step."""
    dev, B = args.device, args.batch
    x = torch.randn(B, *shape, generator=torch.Generator().manual_seed(0)).to(dev)
    i = len(sampler) // 2
    t = int(sampler.timesteps[i])
    gens = lg.make_generators(range(B))
    x0 = den(x, t).x0_hat.detach()

    def den_fb():
        xi = x.detach().requires_grad_(True)
        torch.autograd.grad(den(xi, t).x0_hat.sum(), xi)

    def loss_fb():
        xi = x0.detach().requires_grad_(True)
        torch.autograd.grad(loss(xi).sum(), xi)

    engine = GuidanceEngine(lg.preset("freedom"), loss)

    def step():
        st = GuidanceStats()
        st.init(B)
        engine.step(den, sampler, x, i, gens, st)

    t_den = median_time(den_fb, dev, args.reps)
    t_loss = median_time(loss_fb, dev, args.reps)
    t_step = median_time(step, dev, args.reps)
    return dict(method="floor", denoiser_fwd_bwd_s=t_den, loss_fwd_bwd_s=t_loss, guided_step_s=t_step,
                guided_over_floor=t_step / (t_den + t_loss))  # fmt: skip


def saved_tensor_gib(model: str, dtype_name: str, ckpt: bool, batch: int) -> dict:
    """Estimate, not a measurement: GiB of tensors saved for the backward pass of one guided step
    (denoiser + loss forward at full size), counted by ``saved_tensors_hooks`` on the meta device (shapes
    only, no compute), and the weights' GiB. Inside checkpointed blocks torch's own hooks win, so the
    block inputs that checkpointing keeps and the recomputation's transient peak are not counted; SDPA on
    the meta device takes the math path, which saves the attention matrix (flash attention does not)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    m = (pixel_stack if model == "pixel" else latent_stack)(False, dtype, "meta")
    if ckpt:
        for mod in m["ckpt"]:
            mod.enable_gradient_checkpointing()
    weights = sum(p.numel() * p.element_size() for mod in m["compile"] for p in mod.parameters())
    if model == "latent":  # the VAE encoder is not used; count the whole VAE anyway
        weights = sum(
            p.numel() * p.element_size() for mod in (m["stack"].unet, m["stack"].vae) for p in mod.parameters()
        )
        weights += sum(p.numel() * p.element_size() for p in m["compile"][2].parameters())
    seen, total = {}, [0]  # id -> tensor: holding meta tensors costs nothing and keeps ids unique

    def pack(t):
        if id(t) not in seen:
            seen[id(t)] = t
            total[0] += t.numel() * t.element_size()

    x = torch.randn(batch, *m["shape"], device="meta").requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        m["loss"](m["den"](x, 500).x0_hat)
    return dict(model=model, dtype=dtype_name, checkpointing=ckpt, batch=batch, saved_gib=total[0] / 2**30,
                weights_gib=weights / 2**30)  # fmt: skip


def to_markdown(meta: dict, rows: list[dict]) -> str:
    """Tables for docs/benchmarks.md: seconds per image, bf16 speed-up, and the guided step against its floor."""
    out = [
        f"device {meta['device']} ({meta['cpu']}, {meta['threads']} torch threads), torch {meta['torch']}, "
        f"{'reduced sizes (--small)' if meta['small'] else 'full sizes'}, DDIM-{meta['steps']}, "
        f"batch {meta['batch']}, median of {meta.get('runs', 1)} runs",
        "",
        "| model | dtype | compile | ckpt | none s/img | freedom s/img | shen2024 s/img | peak GiB (freedom) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["model"], r["dtype"], r["compile"], r["checkpointing"])  # noqa: E731
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["method"]] = r
    for (model, dt, comp, ck), g in groups.items():
        cell = {m: f"{g[m]['s_per_image']:.3f}" if m in g else "–" for m in ("none", "freedom", "shen2024")}
        peak = g.get("freedom", {}).get("peak_gib")
        out.append(
            f"| {model} | {dt} | {'on' if comp else 'off'} | {'on' if ck else 'off'} | {cell['none']} | "
            f"{cell['freedom']} | {cell['shen2024']} | {'n/a' if peak is None else f'{peak:.2f}'} |"
        )
    out += ["", "| model | dtype | compile | ckpt | denoiser f+b s | loss f+b s | guided step s | step / floor |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (model, dt, comp, ck), g in groups.items():
        f = g.get("floor")
        if f:
            flags = f"{'on' if comp else 'off'} | {'on' if ck else 'off'}"
            out.append(
                f"| {model} | {dt} | {flags} | {f['denoiser_fwd_bwd_s']:.3f} "
                f"| {f['loss_fwd_bwd_s']:.3f} | {f['guided_step_s']:.3f} | {f['guided_over_floor']:.2f} |"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="reduced sizes (for a CPU)")
    ap.add_argument("--models", default="pixel,latent")
    ap.add_argument("--methods", default="none,freedom,shen2024")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--compile", default="off,on", help="off, on or off,on")
    ap.add_argument("--checkpointing", default="off,on", help="off, on or off,on")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 100; 3 with --small)")
    ap.add_argument("--batch", type=int, default=None, help="batch (default 8; 2 with --small)")
    ap.add_argument("--runs", type=int, default=3, help="timed sampling runs per setting (median)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the floor timings (median)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--saved-memory", action="store_true", help="only estimate saved-for-backward GiB (meta device)")
    ap.add_argument("--markdown", default=None, metavar="JSON", help="only print the tables of an earlier --json")
    args = ap.parse_args()
    if args.markdown:
        with open(args.markdown) as f:
            d = json.load(f)
        print(to_markdown(d["meta"], d["rows"]))
        return
    if args.saved_memory:
        print("| model | dtype | ckpt | batch | saved for backward GiB | weights GiB |\n|---|---|---|---|---|---|")
        for model in args.models.split(","):
            for dt in args.dtypes.split(","):
                for ck in (False, True):
                    r = saved_tensor_gib(model, dt, ck, args.batch or 8)
                    print(f"| {model} | {dt} | {'on' if ck else 'off'} | {r['batch']} | {r['saved_gib']:.2f} | "
                          f"{r['weights_gib']:.2f} |", flush=True)  # fmt: skip
        return
    args.steps = args.steps or (3 if args.small else 100)
    args.batch = args.batch or (2 if args.small else 8)
    on_off = {"off": [False], "on": [True], "off,on": [False, True], "on,off": [True, False]}
    meta = dict(
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(), torch=torch.__version__,
        small=args.small, steps=args.steps, batch=args.batch, runs=args.runs, reps=args.reps,
    )  # fmt: skip
    print(json.dumps(meta), flush=True)
    rows = []
    for model in args.models.split(","):
        for dt in args.dtypes.split(","):
            for comp in on_off[args.compile]:
                for ck in on_off[args.checkpointing]:
                    methods = args.methods.split(",")
                    if ck:
                        methods = [m for m in methods if m != "none"]
                    rows += measure(model, dt, comp, ck, methods, args)
    print(to_markdown(meta, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
