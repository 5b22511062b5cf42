"""Reading the papers' checkpoint files: unwrapping the state dict, telling the architecture from its keys,
and a strict load whose one-line error names the first mismatching keys and the flag that is probably wrong."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the network built from the given flags."""


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a state dict, a list/tuple of them (the DDIM codebase's
    ``[model, optimizer, epoch, step, ema]``: the first, or the last with ``use_ema``), or a dict wrapping one
    under ``state_dict``/``model``/...; a ``module.`` prefix (DataParallel) is removed."""
    if isinstance(obj, (list, tuple)):
        dicts = [o for o in obj if isinstance(o, dict)]
        if not dicts:
            raise ValueError("the checkpoint is a list without a state dict in it")
        obj = dicts[-1] if use_ema else obj[0]
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for k in WRAPPER_KEYS:
            if _is_state_dict(obj.get(k)):
                obj = obj[k]
                break
    if not _is_state_dict(obj):
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"no state dict found in the checkpoint (top level: {keys}); save model.state_dict()")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in a ``.pt``/``.ckpt``/``.pth`` file (read with ``weights_only``) or a ``.safetensors``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(str(path)))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with objects beyond tensors and containers
        raise ValueError(
            f"{path} cannot be read as plain tensors ({e.__class__.__name__}); re-save it as "
            "torch.save(model.state_dict(), path) in the environment that wrote it"
        ) from e
    return unwrap_state_dict(obj, use_ema)


def detect_architecture(sd: dict) -> str:
    """``ddim_unet`` (``temb.dense.*``), ``adm_unet`` (``output_blocks.*``) or ``adm_classifier``
    (``input_blocks.*`` and a pooling head ``out.*`` without output blocks)."""
    keys = set(sd)
    if "temb.dense.0.weight" in keys:
        return "ddim_unet"
    if any(k.startswith("output_blocks.") for k in keys):
        return "adm_unet"
    if any(k.startswith("input_blocks.") for k in keys) and any(k.startswith("out.") for k in keys):
        return "adm_classifier"
    raise ValueError(
        f"cannot tell the architecture from the checkpoint's keys (first: {sorted(keys)[:3]}); "
        "pass flags['architecture'] = 'adm_unet', 'adm_classifier' or 'ddim_unet'"
    )


def _count(keys, pattern: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def _adm_hint(missing, unexpected, shapes, ckpt, module) -> str:
    """The flag that most probably explains the first mismatch in an ADM state dict."""
    model = module.state_dict()
    added = set(missing) | set(unexpected)
    if "label_emb.weight" in unexpected:
        n = ckpt["label_emb.weight"].shape[0]
        return f"num_classes/class_cond (the checkpoint is class-conditional, {n} classes)"
    if "label_emb.weight" in missing:
        return "num_classes/class_cond (the checkpoint is unconditional: num_classes=None)"
    if "label_emb.weight" in shapes:
        return f"num_classes (the checkpoint has {ckpt['label_emb.weight'].shape[0]})"
    if "time_embed.0.weight" in shapes:
        return f"model_channels/num_channels (the checkpoint has {ckpt['time_embed.0.weight'].shape[1]})"
    if "input_blocks.0.0.weight" in shapes:
        return f"in_channels (the checkpoint has {ckpt['input_blocks.0.0.weight'].shape[1]})"
    n_ck, n_md = _count(ckpt, r"input_blocks\.(\d+)\."), _count(model, r"input_blocks\.(\d+)\.")
    if n_ck != n_md:  # L levels give L·(num_res_blocks + 1) input blocks
        levels = len(module.channel_mult)
        fit = f"; num_res_blocks={n_ck // levels - 1} fits this channel_mult" if n_ck % levels == 0 else ""
        return f"num_res_blocks or channel_mult (the checkpoint has {n_ck} input blocks, these flags give {n_md}{fit})"
    if any(re.search(r"\.(op|conv)\.(weight|bias)$", k) for k in added):
        return "resblock_updown (or conv_resample)"
    if any(k.startswith("out.") for k in added):
        return "pool (the classifier's head)"
    if "out.2.positional_embedding" in shapes:
        return "image_size (the attention pool's grid is image_size / total downsampling) or channel_mult"
    for k in ("out.2.weight", "out.2.c_proj.weight", "out.3.weight"):
        if k in shapes and ckpt[k].shape[1:] == model[k].shape[1:]:
            what = (
                "out_channels/learn_sigma"
                if hasattr(module, "output_blocks")
                else "out_channels, the number of classes,"
            )
            return f"{what} (the checkpoint has {ckpt[k].shape[0]})"
    if any(re.search(r"\.(qkv|proj_out|norm)\.", k) for k in added):
        return "attention_resolutions (ds = image_size // pixel resolution)"
    for k in shapes:
        if k.endswith("emb_layers.1.weight") and k.replace("emb_layers.1", "out_layers.3") not in shapes:
            return "use_scale_shift_norm"
    return "channel_mult"


def _ddim_hint(missing, unexpected, shapes, ckpt, module) -> str:
    """The flag that most probably explains the first mismatch in a DDIM-codebase state dict."""
    model = module.state_dict()
    diff = set(missing) | set(unexpected) | set(shapes)
    if "logvar" in diff:
        return "type ('bayesian' has a logvar parameter, 'simple' has none)"
    if "temb.dense.0.weight" in shapes:
        return f"ch (the checkpoint has {ckpt['temb.dense.0.weight'].shape[1]})"
    if "conv_in.weight" in shapes:
        return f"in_channels (the checkpoint has {ckpt['conv_in.weight'].shape[1]})"
    if "conv_out.weight" in shapes:
        return f"out_ch (the checkpoint has {ckpt['conv_out.weight'].shape[0]})"
    n_ck, n_md = _count(ckpt, r"down\.(\d+)\."), _count(model, r"down\.(\d+)\.")
    if n_ck != n_md:
        return f"ch_mult (the checkpoint has {n_ck} levels, these flags give {n_md})"
    n_ck, n_md = _count(ckpt, r"down\.0\.block\.(\d+)\."), _count(model, r"down\.0\.block\.(\d+)\.")
    if n_ck != n_md:
        return f"num_res_blocks (the checkpoint has {n_ck})"
    if any(re.search(r"(downsample|upsample)\.conv\.", k) for k in diff):
        return "resamp_with_conv"
    if any(".attn." in k for k in diff):
        return "attn_resolutions (pixel sides) or resolution/image_size"
    return "ch_mult"


def _names(keys, n: int = 3) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_strict(module: nn.Module, sd: dict, arch: str) -> nn.Module:
    """``module.load_state_dict(sd, strict=True)``, or a one-line :class:`CheckpointMismatchError`."""
    model = module.state_dict()
    missing = [k for k in model if k not in sd]
    unexpected = [k for k in sd if k not in model]
    shapes = {k: (tuple(sd[k].shape), tuple(v.shape)) for k, v in model.items() if k in sd and sd[k].shape != v.shape}
    if missing or unexpected or shapes:
        hint = (_ddim_hint if arch == "ddim_unet" else _adm_hint)(missing, unexpected, shapes, sd, module)
        parts = []
        if missing:
            parts.append(f"missing keys {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_names(unexpected)}")
        if shapes:
            k, (a, b) = next(iter(shapes.items()))
            parts.append(
                f"shape mismatch {k}: checkpoint {a} vs flags {b}"
                + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else "")
            )
        raise CheckpointMismatchError(
            f"the checkpoint does not fit {arch} built from these flags: {'; '.join(parts)}; "
            f"probably wrong flag: {hint}"
        )
    module.load_state_dict({k: v.to(model[k].dtype) for k, v in sd.items()}, strict=True)
    return module
