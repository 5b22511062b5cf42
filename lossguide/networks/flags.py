"""Constructor flags for the papers' networks, from either the reference constructors' keyword arguments or
guided-diffusion's command-line flags (``--num_channels 256 --attention_resolutions 32,16,8 ...``) or the
DDIM codebase's YAML config (``model:``, ``data:``, ``diffusion:`` sections, or the ``model:`` keys flat).

Conventions: ``attention_resolutions`` as a list/tuple are downsample rates ds (constructor style); as a
string ("32,16,8") or a single int they are pixel resolutions (command-line style), ds = image_size // res.
``channel_mult`` "" or None is guided-diffusion's default for ``image_size``. ``learn_sigma`` gives
out_channels = 2·in_channels, ``class_cond`` gives num_classes = 1000 unless ``num_classes`` is set.
Missing flags take the reference constructor's defaults, or the command line's defaults when the
command-line width flag ``num_channels`` (``classifier_width`` for a classifier) is present.
"""

from __future__ import annotations

import math

ARCHITECTURES = ("adm_unet", "adm_classifier", "ddim_unet")

# guided-diffusion's UNetModel / EncoderUNetModel keyword arguments
_ADM_CTOR = {
    "image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
    "dropout", "channel_mult", "conv_resample", "dims", "num_classes", "use_checkpoint", "use_fp16",
    "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
    "use_new_attention_order", "pool",
}  # fmt: skip
# script_util's model, classifier and diffusion flags, and the sampling/training scripts' other flags
_ADM_CLI = {
    "num_channels", "learn_sigma", "class_cond", "classifier_use_fp16", "classifier_width", "classifier_depth",
    "classifier_attention_resolutions", "classifier_use_scale_shift_norm", "classifier_resblock_updown",
    "classifier_pool", "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
    "rescale_timesteps", "rescale_learned_sigmas", "sigma_small", "model_path", "classifier_path",
    "classifier_scale", "clip_denoised", "num_samples", "batch_size", "use_ddim", "data_dir",
    "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps", "microbatch", "ema_rate", "log_interval",
    "save_interval", "resume_checkpoint", "fp16_scale_growth", "noised", "iterations", "anneal_lr",
    "eval_interval",
}  # fmt: skip
_DDIM_MODEL = {
    "type", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
    "resamp_with_conv", "var_type", "ema_rate", "ema", "resolution", "image_size", "num_diffusion_timesteps",
}  # fmt: skip

# guided-diffusion script_util defaults (model_and_diffusion_defaults, classifier_defaults)
_CLI_UNET_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1, num_head_channels=-1,
    attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False, use_scale_shift_norm=True,
    resblock_updown=False, use_new_attention_order=False, learn_sigma=False,
)  # fmt: skip
_CLI_CLASSIFIER_DEFAULTS = dict(
    image_size=64, classifier_width=128, classifier_depth=2, classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True, classifier_resblock_updown=True, classifier_pool="attention",
)  # fmt: skip
_CTOR_DEFAULTS = dict(
    in_channels=3, dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True, num_heads=1, num_head_channels=-1,
    num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False,
)  # fmt: skip
_CLASSIFIER_CLI = set(_CLI_CLASSIFIER_DEFAULTS) - {"image_size"}
NUM_CLASSES = 1000


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """guided-diffusion's channel_mult for an image side (its ``channel_mult=""``)."""
    table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    if image_size not in table:
        raise ValueError(f"no default channel_mult for image_size {image_size}; pass channel_mult explicitly")
    return table[image_size]


def _ints(value, name: str) -> tuple:
    """The positive numbers of a flag given as "1,2,4", a number or a list; a one-line error for anything else."""
    if isinstance(value, str):
        try:
            out = tuple(float(v) if "." in v else int(v) for v in value.replace(" ", "").split(",") if v)
        except ValueError:
            out = None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out = (value,)
    else:
        try:
            out = tuple(value)
        except TypeError:
            out = None
    ok = out is not None and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in out
    )
    if not ok:
        raise ValueError(f"{name}={value!r} is not a list of positive numbers; give it as the reference command "
                         f"line does, e.g. {name}=\"{EXAMPLES.get(name, '1,2,4')}\"")  # fmt: skip
    return out


#: an example value of each list flag, quoted in its error
EXAMPLES = {"channel_mult": "1,2,2,4", "attention_resolutions": "32,16,8", "ch_mult": "1,2,2,2"}


def _attention_ds(value, image_size: int | None) -> tuple[int, ...]:
    """ds values from a list (already ds) or from a string/int of pixel resolutions."""
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in _ints(value, "attention_resolutions"))
    if image_size is None:
        raise ValueError("attention_resolutions given in pixels (a string or an int) needs image_size")
    pixels = _ints(value, "attention_resolutions")
    bad = [r for r in pixels if int(r) != r or image_size % int(r)]
    if bad:
        raise ValueError(f"attention_resolutions={value!r}: {bad[0]} px does not divide image_size {image_size}; "
                         f"give the feature-map sides in pixels where attention sits, e.g. \"32,16,8\"")  # fmt: skip
    return tuple(image_size // int(r) for r in pixels)


def _check_known(flags: dict, known: set, arch: str) -> None:
    unknown = sorted(set(flags) - known - {"architecture"})
    if unknown:
        raise ValueError(
            f"unknown {arch} flag(s) {', '.join(unknown)}; accepted: the reference constructor's keyword "
            "arguments or guided-diffusion's/the DDIM codebase's command-line and config names"
        )


def _require(kw: dict, names: list[str], arch: str) -> None:
    missing = [n for n in names if kw.get(n) is None]
    if missing:
        raise ValueError(f"{arch} needs the flag(s) {', '.join(missing)}")


def adm_kwargs(flags: dict, arch: str) -> dict:
    """``ADMUNet``/``ADMClassifier`` keyword arguments from constructor-style or command-line flags."""
    _check_known(flags, _ADM_CTOR | _ADM_CLI, arch)
    f = dict(flags)
    if f.get("dims", 2) != 2:
        raise ValueError(f"only 2-D networks are supported (dims={f['dims']})")
    if arch == "adm_classifier" and set(f) & _CLASSIFIER_CLI:
        # create_classifier's mapping; the model's own flags in the same namespace do not apply to it
        f = {**_CLI_CLASSIFIER_DEFAULTS, **f}
        f = dict(
            image_size=f["image_size"], in_channels=3, model_channels=f["classifier_width"],
            out_channels=NUM_CLASSES, num_res_blocks=f["classifier_depth"],
            attention_resolutions=f["classifier_attention_resolutions"], channel_mult="", num_head_channels=64,
            use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
            resblock_updown=f["classifier_resblock_updown"], pool=f["classifier_pool"],
        )  # fmt: skip
    elif "num_channels" in f and "model_channels" not in f:  # create_model's mapping
        f = {**_CLI_UNET_DEFAULTS, **f}
        f["model_channels"] = f.pop("num_channels")
    kw = {**_CTOR_DEFAULTS, **{k: v for k, v in f.items() if k in _ADM_CTOR}}
    image_size = kw.get("image_size")
    if kw.get("channel_mult") in ("", None):
        _require(kw, ["image_size"], arch)
        kw["channel_mult"] = default_channel_mult(int(image_size))
    else:
        kw["channel_mult"] = _ints(kw["channel_mult"], "channel_mult")
    if kw.get("attention_resolutions") is not None:
        kw["attention_resolutions"] = _attention_ds(kw["attention_resolutions"], image_size)
    if arch == "adm_unet":
        learn_sigma = f.get("learn_sigma")
        if kw.get("out_channels") is None:
            kw["out_channels"] = kw["in_channels"] * (2 if learn_sigma else 1)
        elif learn_sigma is not None and kw["out_channels"] != kw["in_channels"] * (2 if learn_sigma else 1):
            raise ValueError(
                f"out_channels={kw['out_channels']} contradicts learn_sigma={learn_sigma} "
                f"for in_channels={kw['in_channels']}"
            )
        if f.get("class_cond") and kw.get("num_classes") is None:
            kw["num_classes"] = NUM_CLASSES
        elif f.get("class_cond") is False and kw.get("num_classes") is not None:
            raise ValueError(f"class_cond=False contradicts num_classes={kw['num_classes']}")
        kw.pop("pool", None)
    else:
        kw.pop("num_classes", None)
        kw.setdefault("pool", "adaptive")
    for k in ("use_checkpoint", "use_fp16", "dims"):  # no effect on a float32 forward pass
        kw.pop(k, None)
    _require(kw, ["image_size", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions"], arch)
    return kw


def ddim_kwargs(flags: dict) -> dict:
    """``DDIMUNet`` keyword arguments from a DDIM-codebase config (nested sections or the model keys flat)."""
    if isinstance(flags.get("model"), dict):
        model = dict(flags["model"])
        _check_known(model, _DDIM_MODEL, "ddim_unet model")
        data, diffusion = flags.get("data") or {}, flags.get("diffusion") or {}
        if "image_size" in data:
            model.setdefault("resolution", data["image_size"])
        if "num_diffusion_timesteps" in diffusion:
            model.setdefault("num_diffusion_timesteps", diffusion["num_diffusion_timesteps"])
    else:
        model = dict(flags)
        _check_known(model, _DDIM_MODEL, "ddim_unet")
    if "image_size" in model:
        model.setdefault("resolution", model.pop("image_size"))
    kw = {k: model[k] for k in ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution",
                                "in_channels", "dropout", "resamp_with_conv", "type", "num_diffusion_timesteps")
          if k in model}  # fmt: skip
    _require(kw, ["ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution"], "ddim_unet")
    kw["ch_mult"] = _ints(kw["ch_mult"], "ch_mult")
    kw["attn_resolutions"] = tuple(int(r) for r in _ints(kw["attn_resolutions"], "attn_resolutions"))
    return kw


def head_flags_given(flags: dict, arch: str) -> bool:
    """Whether ``flags`` fix the ADM attention head split: ``num_heads`` or ``num_head_channels`` given, or a
    classifier from ``classifier_*`` flags (create_classifier fixes num_head_channels=64)."""
    if any(flags.get(k) is not None for k in ("num_heads", "num_head_channels")):
        return True
    return arch == "adm_classifier" and bool(set(flags) & _CLASSIFIER_CLI)


_GD_UNET = dict(
    architecture="adm_unet", attention_resolutions="32,16,8", diffusion_steps=1000, image_size=256,
    learn_sigma=True, num_channels=256, num_head_channels=64, num_res_blocks=2, resblock_updown=True,
    use_scale_shift_norm=True,
)  # fmt: skip
_GD_CLASSIFIER = dict(
    architecture="adm_classifier", classifier_attention_resolutions="32,16,8", classifier_depth=2,
    classifier_width=128, classifier_pool="attention", classifier_resblock_updown=True,
    classifier_use_scale_shift_norm=True,
)  # fmt: skip

#: The published ADM checkpoints' flags (guided-diffusion's README, DPS's configs/model_config.yaml) and the
#: attention flags they were trained with, as they should be passed. The keys cannot show the head split or
#: the q/k/v order, so a checkpoint with the shapes of one of these is refused under another (checkpoint.py).
PUBLISHED_LAYOUTS = {
    "64x64_diffusion.pt": (
        dict(_GD_UNET, image_size=64, class_cond=True, num_channels=192, num_res_blocks=3,
             use_new_attention_order=True, noise_schedule="cosine"),
        "num_head_channels=64, use_new_attention_order=True",
    ),
    "128x128_diffusion.pt": (
        dict(_GD_UNET, image_size=128, class_cond=True, num_heads=4, num_head_channels=-1),
        "num_heads=4 (num_head_channels=-1)",
    ),
    "256x256_diffusion.pt": (dict(_GD_UNET, class_cond=True), "num_head_channels=64"),
    "256x256_diffusion_uncond.pt (or an LSUN model)": (dict(_GD_UNET, class_cond=False), "num_head_channels=64"),
    "512x512_diffusion.pt": (dict(_GD_UNET, image_size=512, class_cond=True), "num_head_channels=64"),
    "DPS's ffhq_10m.pt": (
        dict(_GD_UNET, num_channels=128, num_res_blocks=1, attention_resolutions="16", class_cond=False,
             num_heads=4),
        "num_heads=4, num_head_channels=64",
    ),
    "64x64_classifier.pt": (dict(_GD_CLASSIFIER, image_size=64, classifier_depth=4), "num_head_channels=64"),
    "128x128_classifier.pt": (dict(_GD_CLASSIFIER, image_size=128), "num_head_channels=64"),
    "256x256_classifier.pt": (dict(_GD_CLASSIFIER, image_size=256), "num_head_channels=64"),
    "512x512_classifier.pt": (dict(_GD_CLASSIFIER, image_size=512), "num_head_channels=64"),
}  # fmt: skip


def network_kwargs(arch: str, flags: dict) -> dict:
    """The constructor's keyword arguments for ``arch`` (one of :data:`ARCHITECTURES`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ddim_kwargs(flags) if arch == "ddim_unet" else adm_kwargs(flags, arch)
