"""Reading the papers' checkpoint files: unwrapping the state dict, telling the architecture from its keys,
and a strict load whose one-line error names the first mismatching keys and the flag that explains them.

A flag is named only when the network rebuilt with that one flag changed (on the meta device: shapes, no
memory) fits the checkpoint's keys and shapes exactly; otherwise the error says no single flag change fits
(a corrupt file, another layout, or several wrong flags). The ADM attention head split and q/k/v order leave
no trace in the shapes: a load needs ``num_heads`` or ``num_head_channels`` given, and a checkpoint with the
shapes of a published one (:data:`~lossguide.networks.flags.PUBLISHED_LAYOUTS`) must use its attention flags.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lossguide.networks.adm import POOLS, ADMClassifier, ADMUNet, AttentionPool2d
from lossguide.networks.adm_blocks import AttentionBlock, QKVAttention
from lossguide.networks.ddim_unet import DDIMUNet
from lossguide.networks.flags import PUBLISHED_LAYOUTS, network_kwargs

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema")


NETWORK_CLASSES = {"adm_unet": ADMUNet, "adm_classifier": ADMClassifier, "ddim_unet": DDIMUNet}


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the network built from the given flags: its keys or shapes, or the
    attention flags of the published checkpoint whose shapes it has."""


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
    damaged = "the file is truncated or damaged: download or export it again"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return unwrap_state_dict(load_file(str(path)))
        except Exception as e:  # safetensors' own error type for a bad header or a short file
            why = " ".join(str(e).split())[:160]
            raise ValueError(f"{path} is not a readable .safetensors file ({why}); {damaged}") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e) or "can still be loaded" in str(e):  # a pickle of objects beyond tensors
            raise ValueError(
                f"{path} holds Python objects beyond tensors ({e.__class__.__name__}); re-save it as "
                "torch.save(model.state_dict(), path) in the environment that wrote it"
            ) from e
        raise ValueError(f"{path} is not a readable torch checkpoint ({e.__class__.__name__}); {damaged}") from e
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


_INIT_FUNCTIONS = {getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")}
_INIT_METHODS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_}


class _SkipInit(TorchFunctionMode):
    """Parameter initialisation as a no-op (meta tensors hold no values; a meta normal_ is slow to set up)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INIT_FUNCTIONS or func in _INIT_METHODS:
            return args[0] if args else next(iter((kwargs or {}).values()))
        return func(*args, **(kwargs or {}))


def skeleton(arch: str, kwargs: dict) -> nn.Module:
    """The network ``arch`` from constructor ``kwargs`` on the meta device: its parameters' names and shapes
    without memory or initialisation."""
    with torch.device("meta"), _SkipInit():
        return NETWORK_CLASSES[arch](**kwargs)


def _neutral_heads(arch: str, kwargs: dict) -> dict:
    """``kwargs`` with a head split that fits any width: the head flags do not change a parameter shape."""
    if arch == "ddim_unet":
        return kwargs
    return {**kwargs, "num_heads": 1, "num_head_channels": 1, "num_heads_upsample": -1}


def _shapes(sd: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _fits(arch: str, kwargs: dict, target: dict) -> bool:
    try:
        net = skeleton(arch, _neutral_heads(arch, kwargs))
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError):  # flags that build no network
        return False
    return _shapes(net.state_dict()) == target


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _adm_candidates(kw: dict, ckpt: dict, arch: str):
    """(flag, change, note) for the one-flag changes of ADM constructor ``kw`` that the checkpoint suggests."""
    unet = arch == "adm_unet"
    mc, nrb, levels = kw["model_channels"], kw["num_res_blocks"], len(kw["channel_mult"])
    if unet:
        n = ckpt["label_emb.weight"][0] if "label_emb.weight" in ckpt else None
        note = f"the checkpoint is class-conditional, {n} classes" if n else "the checkpoint is unconditional"
        yield "num_classes/class_cond", {"num_classes": n}, note
    if len(ckpt.get("time_embed.0.weight", ())) == 2:
        flag = "model_channels/num_channels" if unet else "model_channels/classifier_width"
        yield flag, {"model_channels": ckpt["time_embed.0.weight"][1]}, None
    if len(ckpt.get("input_blocks.0.0.weight", ())) == 4:
        yield "in_channels", {"in_channels": ckpt["input_blocks.0.0.weight"][1]}, None
    for k in ("out.2.weight", "out.3.weight", "out.2.c_proj.weight"):
        if k in ckpt:
            flag = "out_channels/learn_sigma" if unet else "out_channels"
            yield flag, {"out_channels": ckpt[k][0]}, None if unet else "the number of classes"
    n_in = _count(ckpt, r"input_blocks\.(\d+)\.")  # L levels give L·(num_res_blocks + 1) input blocks
    if n_in % levels == 0 and n_in > levels:
        yield f"num_res_blocks{'' if unet else '/classifier_depth'}", {"num_res_blocks": n_in // levels - 1}, None
    if n_in % (nrb + 1) == 0:
        first = [f"input_blocks.{1 + lv * (nrb + 1)}.0.out_layers.3.weight" for lv in range(n_in // (nrb + 1))]
        if all(k in ckpt for k in first):
            mult = tuple(_number(ckpt[k][0] / mc) for k in first)
            yield "channel_mult", {"channel_mult": mult}, "with channel_mult='' it follows image_size"
    ds = [2**lv for lv in range(levels) if f"input_blocks.{1 + lv * (nrb + 1)}.1.qkv.weight" in ckpt]
    px = ",".join(str(kw["image_size"] // d) for d in sorted(ds))
    note = f"as downsample rates, i.e. {px!r} in pixels at image_size {kw['image_size']}" if ds else None
    flag = "attention_resolutions" if unet else "attention_resolutions/classifier_attention_resolutions"
    yield flag, {"attention_resolutions": tuple(ds)}, note
    for flag in ("resblock_updown", "conv_resample", "use_scale_shift_norm"):
        label = flag if unet or flag == "conv_resample" else f"{flag}/classifier_{flag}"
        yield label, {flag: not kw.get(flag, flag == "conv_resample")}, None
    if not unet:
        for v in POOLS:
            yield "pool/classifier_pool", {"pool": v}, None
        pos = ckpt.get("out.2.positional_embedding", ())
        side = round((pos[1] - 1) ** 0.5) if len(pos) == 2 else 0
        if side:
            note = "the attention pool's grid is image_size / total downsampling"
            yield "image_size", {"image_size": side * 2 ** (levels - 1)}, note


def _ddim_candidates(kw: dict, ckpt: dict):
    """(flag, change, note) for the one-flag changes of DDIM-codebase constructor ``kw`` the checkpoint suggests."""
    ch, res = kw["ch"], kw["resolution"]
    v = "bayesian" if "logvar" in ckpt else "simple"
    yield "type", {"type": v}, "'bayesian' has a logvar parameter, 'simple' has none"
    if len(ckpt.get("logvar", ())) == 1:
        yield "num_diffusion_timesteps", {"num_diffusion_timesteps": ckpt["logvar"][0]}, None
    for key, flag, dim in (("temb.dense.0.weight", "ch", 1), ("conv_in.weight", "in_channels", 1),
                           ("conv_out.weight", "out_ch", 0)):  # fmt: skip
        if len(ckpt.get(key, ())) > dim:
            yield flag, {flag: ckpt[key][dim]}, None
    levels = _count(ckpt, r"down\.(\d+)\.")
    first = [f"down.{lv}.block.0.conv1.weight" for lv in range(levels)]
    if levels and all(k in ckpt for k in first):
        yield "ch_mult", {"ch_mult": tuple(_number(ckpt[k][0] / ch) for k in first)}, None
    n = _count(ckpt, r"down\.0\.block\.(\d+)\.")
    if n:
        yield "num_res_blocks", {"num_res_blocks": n}, None
    attn = [lv for lv in range(levels) if any(k.startswith(f"down.{lv}.attn.") for k in ckpt)]
    yield "attn_resolutions", {"attn_resolutions": tuple(res // 2**lv for lv in attn)}, "pixel sides"
    for v in sorted({r * 2**lv for r in kw["attn_resolutions"] for lv in attn}):
        yield "resolution/image_size", {"resolution": v}, None
    yield "resamp_with_conv", {"resamp_with_conv": not kw.get("resamp_with_conv", True)}, None


def _show(v) -> str:
    return repr(list(v) if isinstance(v, tuple) else v)


def flag_hint(arch: str, kwargs: dict, ckpt_shapes: dict) -> str | None:
    """The one-flag changes of ``kwargs`` under which ``arch`` fits the checkpoint's shapes exactly, as
    ``flag (flag=value fits the checkpoint; note)`` joined by "or"; None when no such change exists."""
    if arch == "ddim_unet":
        cands = _ddim_candidates(kwargs, ckpt_shapes)
    else:
        cands = _adm_candidates(kwargs, ckpt_shapes, arch)
    fits, seen = [], []
    for flag, change, note in cands:
        if change in seen or all(kwargs.get(k) == v for k, v in change.items()):
            continue
        seen.append(change)
        if _fits(arch, {**kwargs, **change}, ckpt_shapes):
            value = ", ".join(f"{k}={_show(v)}" for k, v in change.items())
            fits.append(f"{flag} ({value} fits the checkpoint{'; ' + note if note else ''})")
    return " or ".join(fits) or None


def _names(keys, n: int = 3) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_fit(sd: dict, arch: str, kwargs: dict) -> None:
    """Nothing when ``arch`` built from ``kwargs`` has exactly the checkpoint's keys and shapes, else a
    one-line :class:`CheckpointMismatchError` naming the first differences and the flag that explains them."""
    model = _shapes(skeleton(arch, _neutral_heads(arch, kwargs)).state_dict())
    ckpt = _shapes(sd)
    missing = [k for k in model if k not in ckpt]
    unexpected = [k for k in ckpt if k not in model]
    shapes = {k: (ckpt[k], v) for k, v in model.items() if k in ckpt and ckpt[k] != v}
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_names(unexpected)}")
    if shapes:
        k, (a, b) = next(iter(shapes.items()))
        more = f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""
        parts.append(f"shape mismatch {k}: checkpoint {a} vs flags {b}{more}")
    hint = flag_hint(arch, kwargs, ckpt)
    why = (
        f"probably wrong flag: {hint}"
        if hint
        else "the checkpoint does not match any single flag change: the file may be corrupt or of another "
        "layout, or more than one flag is wrong"
    )
    raise CheckpointMismatchError(f"the checkpoint does not fit {arch} built from these flags: {'; '.join(parts)}; "
                                  f"{why}")  # fmt: skip


def attention_layout(module: nn.Module) -> tuple:
    """(heads, q/k/v order) of every ADM attention layer in ``module``, in order: what the keys cannot show."""
    out = []
    for m in module.modules():
        if isinstance(m, AttentionBlock):
            out.append((m.attention.n_heads, "new" if isinstance(m.attention, QKVAttention) else "legacy"))
        elif isinstance(m, AttentionPool2d):
            out.append((m.attention.n_heads, "pool"))
    return tuple(out)


@functools.cache
def _published(name: str) -> tuple[str, dict, tuple, str]:
    """(arch, shapes, attention layout, attention flags) of the published checkpoint ``name``."""
    flags, heads = PUBLISHED_LAYOUTS[name]
    f = dict(flags)
    arch = f.pop("architecture")
    net = skeleton(arch, network_kwargs(arch, f))
    return arch, _shapes(net.state_dict()), attention_layout(net), heads


def published_layout(sd: dict, arch: str) -> tuple[str, tuple, str] | None:
    """(name, attention layout, attention flags) of the published checkpoint whose keys and shapes ``sd`` has;
    only the entries of the checkpoint's architecture and width are built."""
    te = sd.get("time_embed.0.weight")
    if arch == "ddim_unet" or te is None or te.ndim != 2:
        return None
    ckpt = _shapes(sd)
    for name, (flags, _) in PUBLISHED_LAYOUTS.items():
        f = dict(flags)
        if f.pop("architecture") != arch or network_kwargs(arch, f)["model_channels"] != te.shape[1]:
            continue
        _, shapes, layout, heads = _published(name)
        if shapes == ckpt:
            return name, layout, heads
    return None


def _split(heads: int, order: str) -> str:
    return f"{heads} heads" + ("" if order == "pool" else f" in the {order} q/k/v order")


def check_attention(module: nn.Module, sd: dict, arch: str, heads_given: bool) -> None:
    """Refuse an ADM head split (or q/k/v order) that the checkpoint cannot confirm: one that contradicts the
    published checkpoint whose shapes ``sd`` has, or one left to the defaults for any other checkpoint."""
    if arch == "ddim_unet":
        return
    known = published_layout(sd, arch)
    if known is not None:
        name, layout, heads = known
        ours = attention_layout(module)
        if ours != layout:
            i = next(j for j, (a, b) in enumerate(zip(ours, layout, strict=True)) if a != b)
            raise CheckpointMismatchError(
                f"the checkpoint has the keys and shapes of {name}, whose attention layer {i} has "
                f"{_split(*layout[i])}, but these flags give {_split(*ours[i])} (the keys cannot show the head "
                f"split or the q/k/v order, only the output can); pass {heads}"
            )
        return
    if not heads_given:
        raise ValueError(
            f"the {arch}'s attention head split cannot be seen in the checkpoint's keys and a wrong one loads "
            "silently: pass num_head_channels or num_heads as in the checkpoint's published flags "
            "(guided-diffusion 64x64, 256x256 and 512x512: num_head_channels=64; 128x128: num_heads=4; the "
            "classifiers: num_head_channels=64; DPS's ffhq_10m: num_heads=4, num_head_channels=64)"
        )


def assign_weights(module: nn.Module, sd: dict) -> nn.Module:
    """``module.load_state_dict(sd, strict=True)`` in the module's dtype; a meta ``module`` (a :func:`skeleton`)
    takes the checkpoint's tensors as its parameters."""
    model = module.state_dict()
    meta = any(v.is_meta for v in model.values())
    module.load_state_dict({k: v.to(model[k].dtype) for k, v in sd.items()}, strict=True, assign=meta)
    return module

