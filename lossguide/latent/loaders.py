"""Loaders of the latent families from local pipeline folders or hub ids (diffusers' ``from_pretrained``)."""

from __future__ import annotations

import torch

from lossguide.latent.flow import FluxStack, SD3Stack
from lossguide.latent.vp import LatentStack, SDXLStack

#: per family: the pipeline class, the network, and the text components (name → (library, class)), as in the
#: released pipelines' model_index.json; a folder's own model_index.json overrides the classes and drops null ones
FAMILIES = {
    "sd": dict(
        pipeline="StableDiffusionPipeline",
        parts={"unet": ("diffusers", "UNet2DConditionModel")},
        text={"text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer")},
    ),
    "sdxl": dict(
        pipeline="StableDiffusionXLPipeline",
        parts={"unet": ("diffusers", "UNet2DConditionModel")},
        text={"text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
              "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
              "tokenizer_2": ("transformers", "CLIPTokenizer")},
    ),
    "sd3": dict(
        pipeline="StableDiffusion3Pipeline",
        parts={"transformer": ("diffusers", "SD3Transformer2DModel")},
        text={"text_encoder": ("transformers", "CLIPTextModelWithProjection"),
              "tokenizer": ("transformers", "CLIPTokenizer"),
              "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
              "tokenizer_2": ("transformers", "CLIPTokenizer"),
              "text_encoder_3": ("transformers", "T5EncoderModel"),
              "tokenizer_3": ("transformers", "T5TokenizerFast")},
    ),
    "flux": dict(
        pipeline="FluxPipeline",
        parts={"transformer": ("diffusers", "FluxTransformer2DModel")},
        text={"text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
              "text_encoder_2": ("transformers", "T5EncoderModel"),
              "tokenizer_2": ("transformers", "T5TokenizerFast")},
    ),
}  # fmt: skip
_SCHEDULERS = {"sd": "DDIMScheduler", "sdxl": "DDIMScheduler", "sd3": "FlowMatchEulerDiscreteScheduler",
               "flux": "FlowMatchEulerDiscreteScheduler"}  # fmt: skip
_NAMES = {"sd": "a Stable Diffusion", "sdxl": "an SDXL", "sd3": "a Stable Diffusion 3", "flux": "a FLUX.1"}
INDEX_FILE = "model_index.json"


def _libraries():
    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise ImportError("latent models need diffusers and transformers: pip install 'lossguide[all]'") from e
    return diffusers, transformers


def _folders(family: str, text_encoders: bool) -> str:
    """The subfolders a ``family`` pipeline folder needs, as text ("unet/, vae/, ... and scheduler/")."""
    spec = FAMILIES[family]
    names = [*spec["parts"], "vae", *(spec["text"] if text_encoders else ()), "scheduler"]
    return ", ".join(f"{n}/" for n in names[:-1]) + f" and {names[-1]}/"


def _read_index(name_or_path: str, src: str, local_only: bool, fix: str = "pass a local pipeline folder") -> dict:
    """The hub probe: a pipeline's ``model_index.json`` as a dict ({} where it has none), read from a local folder or
    fetched with ``huggingface_hub.hf_hub_download`` for a hub id (diffusers' ``load_config`` would pass it the
    deprecated ``local_dir_use_symlinks``, which warns)."""
    import json
    from pathlib import Path

    from lossguide.models import ModelNotFoundError, read_json

    if Path(src).exists():
        path = Path(src) / INDEX_FILE
        return read_json(path, "fix it, or save the pipeline again with save_pretrained") if path.is_file() else {}
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = huggingface_hub.hf_hub_download(src, INDEX_FILE, local_files_only=local_only)
    except LocalEntryNotFoundError as e:
        raise ModelNotFoundError(
            f"cannot load {name_or_path!r}: the hub is not reachable from here and it is not in the local cache; "
            f"download it once with `huggingface-cli download {name_or_path}` on a machine with network access, "
            f"or {fix}"
        ) from e
    except EntryNotFoundError:
        return {}  # a repository without model_index.json: the family's default classes
    except (OSError, ValueError) as e:
        why = " ".join(str(e).split())[:200]
        raise ModelNotFoundError(
            f"cannot load {name_or_path!r} from the hub ({type(e).__name__}: {why}); {fix}"
        ) from e
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"the {INDEX_FILE} of {name_or_path!r} in the local cache is not valid JSON; delete "
                                 f"it from the cache and download it again") from e  # fmt: skip


def _load_parts(family: str, name_or_path: str, dtype, text_encoders: bool, scheduler: str | None) -> dict:
    """The components of a ``family`` pipeline folder or hub id; any load failure is a ModelNotFoundError that
    names the component (a local folder: its subfolder) and, for a text component, suggests
    ``text_encoders=False``."""
    import json
    from pathlib import Path

    from lossguide.models import ModelFolderError, ModelNotFoundError, hide_hub_symlink_warning, parse_dtype, resolve
    from lossguide.net_losses import hf_dtype_kwargs

    diffusers, transformers = _libraries()
    libs = {"diffusers": diffusers, "transformers": transformers}
    spec = FAMILIES[family]
    dtype = parse_dtype(dtype)
    sched_name = scheduler or _SCHEDULERS[family]
    if not isinstance(getattr(diffusers, sched_name, None), type):
        raise ValueError(f"scheduler={sched_name!r} is not a diffusers scheduler class; pass one such as "
                         f"{_SCHEDULERS[family]!r}")  # fmt: skip
    src, local_only = resolve(name_or_path)
    local = Path(src).exists()
    kw = dict(local_files_only=local_only)
    wanted = {**spec["parts"], "vae": ("diffusers", "AutoencoderKL"), "scheduler": ("diffusers", sched_name)}
    text = dict(spec["text"]) if text_encoders else {}
    no_text = "; or pass text_encoders=False to load it without text encoders and give prompt embeddings"
    fix = f"pass a local folder with {_folders(family, text_encoders)}{no_text if text_encoders else ''}"
    index = _read_index(name_or_path, src, local_only, fix)
    for name in [*spec["parts"], *spec["text"]]:
        entry = index.get(name)
        if entry is not None and not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            where = Path(src) / INDEX_FILE if local else f"the {INDEX_FILE} of {name_or_path!r}"
            example = json.dumps(list((spec["parts"] | spec["text"])[name]))
            raise ModelFolderError(f'{where}: "{name}" is {entry!r}, not [library, class] (e.g. {example}); fix the '
                                   "entry")  # fmt: skip
    for name in list(text):
        entry = index.get(name)
        if entry is not None and (entry[0] is None or entry[1] is None):
            del text[name]  # e.g. SD3 shipped without T5
        elif entry is not None:
            text[name] = tuple(entry)
    for name in spec["parts"]:
        if index.get(name) and index[name][1]:
            wanted[name] = tuple(index[name])
    out = {"_index": index}
    low_mem = _has_accelerate()
    for name, (lib, cls_name) in {**wanted, **text}.items():
        hint = no_text if name in text else ""
        cls = getattr(libs.get(lib, diffusers), cls_name, None)
        if not isinstance(cls, type):
            where = f"{Path(src) / INDEX_FILE}" if local else f"the {INDEX_FILE} of {name_or_path!r}"
            raise ModelFolderError(f'{where}: "{name}" names {lib}.{cls_name}, which {lib} does not have; fix the '
                                   f"entry or update {lib}{hint}")  # fmt: skip
        if local and not (Path(src) / name).is_dir():
            raise ModelNotFoundError(
                f"cannot load {name_or_path!r} as {_NAMES[family]} pipeline: {src} has no {name}/ subfolder (its "
                f"{cls_name}); add it{hint}"
            )
        try:
            with hide_hub_symlink_warning():
                if name == "scheduler" or name.startswith("tokenizer"):
                    out[name] = cls.from_pretrained(src, subfolder=name, **kw)
                elif lib == "transformers":
                    out[name] = cls.from_pretrained(src, subfolder=name, **hf_dtype_kwargs(dtype), **kw)
                else:
                    out[name] = cls.from_pretrained(
                        src, subfolder=name, torch_dtype=dtype, low_cpu_mem_usage=low_mem, **kw
                    )
        except (OSError, ValueError, AttributeError, KeyError, TypeError, RuntimeError) as e:
            why = " ".join(str(e).split())[:200]
            if local:
                raise ModelNotFoundError(
                    f"cannot load {name_or_path!r} as {_NAMES[family]} pipeline: {Path(src) / name}/ does not load "
                    f"as a {cls_name} ({e.__class__.__name__}: {why}); fix or replace that subfolder{hint}"
                ) from e
            where = "the hub is not reachable from here and it is not in the local cache; " if local_only else ""
            raise ModelNotFoundError(
                f"cannot load {name_or_path!r} as {_NAMES[family]} pipeline: its {name}/ failed "
                f"({e.__class__.__name__}: {why}): {where}pass a local folder with {_folders(family, text_encoders)} "
                f"(e.g. from `huggingface-cli download {name_or_path}` on a machine with network access){hint}"
            ) from e
    return out


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _to(parts: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.nn.Module) else v) for k, v in parts.items()}


def load_stable_diffusion(
    name_or_path: str,
    device="cpu",
    dtype=torch.float32,
    scheduler: str = "DDIMScheduler",
    text_encoders: bool = True,
) -> LatentStack:
    """Load a Stable Diffusion 1.x/2.x pipeline folder or hub id (``unet/``, ``vae/``, ``scheduler/`` and, with
    ``text_encoders``, ``text_encoder/`` and ``tokenizer/``) into a :class:`LatentStack`; anything missing is a
    :class:`~lossguide.models.ModelNotFoundError`. ``scheduler`` names the diffusers class read from
    ``scheduler/`` (any VP one)."""
    parts = _to(_load_parts("sd", name_or_path, dtype, text_encoders, scheduler), device)
    return LatentStack(parts["unet"], parts["vae"], parts["scheduler"], parts.get("text_encoder"),
                       parts.get("tokenizer"))  # fmt: skip


def load_sdxl(
    name_or_path: str,
    device="cpu",
    dtype=torch.float32,
    scheduler: str = "DDIMScheduler",
    text_encoders: bool = True,
) -> SDXLStack:
    """Load an SDXL pipeline folder or hub id (``unet/``, ``vae/``, ``scheduler/`` and, with ``text_encoders``,
    ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``) into an :class:`SDXLStack`; anything
    missing is a :class:`~lossguide.models.ModelNotFoundError`. ``scheduler`` names the diffusers class read from
    ``scheduler/`` (any VP one: DDIM, Euler, DPMSolver, ...)."""
    parts = _to(_load_parts("sdxl", name_or_path, dtype, text_encoders, scheduler), device)
    index = parts.pop("_index")
    return SDXLStack(
        parts["unet"], parts["vae"], parts["scheduler"], parts.get("text_encoder"), parts.get("tokenizer"),
        parts.get("text_encoder_2"), parts.get("tokenizer_2"),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )  # fmt: skip


def load_sd3(name_or_path: str, device="cpu", dtype=torch.float32, text_encoders: bool = True) -> SD3Stack:
    """Load a Stable Diffusion 3 / 3.5 pipeline folder or hub id (``transformer/``, ``vae/``, ``scheduler/`` and,
    with ``text_encoders``, the two CLIP and the T5 encoder with their tokenizers) into an :class:`SD3Stack`;
    anything missing is a :class:`~lossguide.models.ModelNotFoundError`."""
    parts = _to(_load_parts("sd3", name_or_path, dtype, text_encoders, None), device)
    parts.pop("_index")
    tr, vae, sch = parts.pop("transformer"), parts.pop("vae"), parts.pop("scheduler")
    return SD3Stack(tr, vae, sch, parts)


def load_flux(name_or_path: str, device="cpu", dtype=torch.bfloat16, text_encoders: bool = True) -> FluxStack:
    """Load a FLUX.1 pipeline folder or hub id (``transformer/``, ``vae/``, ``scheduler/`` and, with
    ``text_encoders``, CLIP and T5 with their tokenizers) into a :class:`FluxStack`; anything missing is a
    :class:`~lossguide.models.ModelNotFoundError`. bf16 by default: the 12B transformer is 48 GB in fp32."""
    parts = _to(_load_parts("flux", name_or_path, dtype, text_encoders, None), device)
    parts.pop("_index")
    tr, vae, sch = parts.pop("transformer"), parts.pop("vae"), parts.pop("scheduler")
    return FluxStack(tr, vae, sch, parts)


#: model_index.json's _class_name → the loader of that family
LOADERS = {
    "StableDiffusionPipeline": "load_stable_diffusion",
    "StableDiffusionXLPipeline": "load_sdxl",
    "StableDiffusion3Pipeline": "load_sd3",
    "FluxPipeline": "load_flux",
}


def load_latent(name_or_path: str, device="cpu", dtype=None, **kw):
    """The stack of whatever family a pipeline folder or hub id is (its ``model_index.json``'s ``_class_name``):
    :func:`load_stable_diffusion`, :func:`load_sdxl`, :func:`load_sd3` or :func:`load_flux`."""
    from pathlib import Path

    from lossguide.models import ModelNotFoundError, resolve

    _libraries()
    src, local_only = resolve(name_or_path)
    index = _read_index(name_or_path, src, local_only)
    cls_name = index.get("_class_name")
    if not isinstance(cls_name, str):
        where = Path(src) / INDEX_FILE if Path(src).exists() else f"the {INDEX_FILE} of {name_or_path!r}"
        got = "is missing" if not index else 'has no "_class_name"'
        raise ModelNotFoundError(
            f"cannot read the pipeline class of {name_or_path!r}: {where} {got}; pass a diffusers pipeline folder "
            "with its model_index.json, or call load_stable_diffusion/load_sdxl/load_sd3/load_flux"
        )
    if cls_name not in LOADERS:
        raise ValueError(f"{name_or_path!r} is a {cls_name}; lossguide loads {', '.join(LOADERS)}")
    loader = globals()[LOADERS[cls_name]]
    if dtype is not None:
        kw["dtype"] = dtype
    return loader(name_or_path, device=device, **kw)
