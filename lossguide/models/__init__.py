"""Model registry: the project's shipped MNIST models by name, diffusers folders and hub ids by path.

``load_denoiser("mnist-ddpm")`` takes the same path a diffusers user takes (``UNet2DModel`` and its
scheduler via ``from_pretrained``) on the folder shipped inside this package; a local diffusers folder or
a hub id works the same way. ``load_classifier("mnist-guide")`` returns a frozen classifier. Shipped files
are listed with their hashes, training commands and held-out metrics in ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lossguide.denoiser import Denoiser, freeze, from_diffusers

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).with_name("weights")
MANIFEST = Path(__file__).with_name("manifest.json")
DENOISERS = {
    "mnist-ddpm": WEIGHTS / "mnist-ddpm",
    "mnist-ddpm-bad": WEIGHTS / "mnist-ddpm-bad",
    "mnist-flow": WEIGHTS / "mnist-flow",
}
#: the two-digit conditional models (:class:`lossguide.layout.CondDigitModel` folders) and the distilled CFG guide
CONDITIONAL = {
    "mnist-cond": WEIGHTS / "mnist-cond",
    "mnist-cond-thick": WEIGHTS / "mnist-cond-thick",
}
GUIDES = {"mnist-cond-guide": WEIGHTS / "mnist-cond-guide"}
CLASSIFIERS = ("mnist-guide", "mnist-judge", "mnist-noise-aware", "mnist-robust")
HUB_HOST = ("huggingface.co", 443)


class ModelNotFoundError(FileNotFoundError):
    """A model name, folder or hub id that cannot be loaded here; the message says what to pass instead."""


#: the augmentation policy (lossguide.augment.policy) that fits each shipped model's data
AUGMENT_POLICY = {"mnist-ddpm": "digits", "mnist-ddpm-bad": "digits", "mnist-flow": "digits"}


@dataclass
class LoadedDenoiser:
    """A denoiser with what a sampler needs: its diffusers scheduler, the per-sample shape, and the
    augmentation that fits its data (``digits`` for the shipped MNIST model, the paper's ``photo``
    DiffAugment for other image models), for ``sample(..., augment=loaded.augment)``."""

    denoiser: Denoiser
    scheduler: object
    sample_shape: tuple[int, ...]
    source: str
    augment: object = None


def manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds (DNS included)."""
    ok = []

    def probe():
        try:
            with socket.create_connection(HUB_HOST, timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout)
    return bool(ok)


def _resolve(name_or_path: str) -> tuple[str, bool]:
    """(source, local_files_only) for a registry name, a local folder or a hub id; raises a clear error."""
    if name_or_path in DENOISERS:
        folder = DENOISERS[name_or_path]
        if not (folder / "unet").exists():
            script = "flow" if name_or_path == "mnist-flow" else "ddpm"
            raise ModelNotFoundError(
                f"the shipped model {name_or_path!r} is missing from {folder}; reinstall lossguide or retrain it "
                f"with `python -m lossguide.training {script}` (see the manifest)"
            )
        return str(folder), True
    p = Path(name_or_path).expanduser()
    if p.exists():
        return str(p), True
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"no model {name_or_path!r}: not a shipped name ({', '.join(DENOISERS)}), not an existing folder, "
            "and not a hub id of the form owner/name"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        return name_or_path, True  # the local cache is the only chance; _load turns a miss into a clear error
    return name_or_path, False


DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip


def parse_dtype(dtype) -> torch.dtype:
    """A torch dtype from a dtype or one of ``fp32``, ``fp16``, ``bf16`` (and their long names)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, fp16, bf16")
    return DTYPES[dtype]


def _subfolder(src: str, name: str) -> str | None:
    """``name`` for a pipeline folder (``unet/``, ``scheduler/``) and None for a bare model folder."""
    if Path(src).exists():
        return name if (Path(src) / name).is_dir() else None
    return name  # a hub id: pipelines (and google/ddpm-*) repos differ; the loader tries both


def _load_unet_and_scheduler(diffusers, name_or_path, src, local_only, dtype, kw):
    """The UNet and DDPM scheduler of a diffusers folder or hub id; load errors become ModelNotFoundError."""
    try:
        sub = _subfolder(src, "unet")
        try:
            cfg = diffusers.UNet2DModel.load_config(src, subfolder=sub, **kw)
        except (OSError, ValueError):
            if sub is None or Path(src).exists():
                raise
            sub = None  # a hub repo with the model at its root (google/ddpm-ema-celebahq-256)
            cfg = diffusers.UNet2DModel.load_config(src, **kw)
        unet_cls = getattr(diffusers, cfg.get("_class_name", "UNet2DModel"))
        unet = unet_cls.from_pretrained(src, subfolder=sub, torch_dtype=dtype, low_cpu_mem_usage=False, **kw)
        sched_sub = "scheduler" if sub is not None else None
        # an ε-UNet served as a flow model (flow_wrapper.json) keeps a FlowMatchEulerDiscreteScheduler config
        sched_cls = diffusers.FlowMatchEulerDiscreteScheduler if _flow_wrapper(src) else diffusers.DDPMScheduler
        scheduler = sched_cls.from_pretrained(src, subfolder=sched_sub, **kw)
    except (OSError, ValueError) as e:
        hint = "pass a local diffusers folder (with unet/ and scheduler/, or config.json and scheduler_config.json)"
        if local_only and not Path(src).exists():
            raise ModelNotFoundError(
                f"cannot load {name_or_path!r}: the hub is not reachable from here and it is not in the local "
                f"cache; download it once with `huggingface-cli download {name_or_path}` where the hub is "
                f"reachable, or {hint}"
            ) from e
        raise ModelNotFoundError(
            f"cannot load {name_or_path!r} as a diffusers model ({e.__class__.__name__}); {hint}"
        ) from e
    return unet, scheduler


#: file suffixes read as the papers' original checkpoints (:func:`load_network`), not diffusers folders
CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".pth", ".safetensors")


def load_denoiser(
    name_or_path: str = "mnist-ddpm", device="cpu", dtype=torch.float32, state_dtype=None, flags: dict | None = None
) -> LoadedDenoiser:
    """Load a diffusers UNet and scheduler: a pipeline folder (``unet/``, ``scheduler/``), a bare model
    folder (``config.json``, ``scheduler_config.json``), a hub id or a shipped name; or an original
    guided-diffusion / DDIM-codebase checkpoint file (``.pt``, ``.ckpt``, ...) with its reference ``flags``
    (see :func:`load_network`; the schedule from ``noise_schedule``/``diffusion_steps`` or the DDIM config).

    ``dtype`` is the weights' dtype (fp32, fp16, bf16); ``state_dtype`` (e.g. fp32) keeps the sampler
    state in another dtype while the UNet runs in ``dtype`` (mixed precision; see ``from_diffusers``).
    """
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("loading diffusion models needs diffusers: pip install 'lossguide[diffusers]'") from e
    dtype = parse_dtype(dtype)
    state_dtype = None if state_dtype is None else parse_dtype(state_dtype)
    _check_flags(flags)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"the model must be a shipped name, a folder, a hub id or a checkpoint path, got "
                        f"{name_or_path!r}")  # fmt: skip
    if str(name_or_path).endswith(CHECKPOINT_SUFFIXES):
        return _load_checkpoint_denoiser(diffusers, Path(name_or_path).expanduser(), flags or {}, device, dtype)
    if flags:
        raise ValueError(f"flags are for original checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}); "
                         f"{name_or_path!r} is read as a diffusers model, which carries its own config")  # fmt: skip
    src, local_only = _resolve(name_or_path)
    kw = dict(local_files_only=local_only)
    with warnings.catch_warnings():
        # diffusers' load_config passes huggingface_hub a deprecated argument, which warns on every load
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        unet, scheduler = _load_unet_and_scheduler(diffusers, name_or_path, src, local_only, dtype, kw)
    unet = unet.to(device)
    wrapper = _flow_wrapper(src)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    from lossguide.augment import policy

    shape = (unet.config.in_channels, *size)
    aug = AUGMENT_POLICY.get(name_or_path, "photo" if len(shape) == 3 else None)
    if wrapper is not None:
        den = _flow_denoiser(unet, wrapper, src, state_dtype)
    else:
        den = from_diffusers(unet, scheduler, state_dtype=state_dtype)
    return LoadedDenoiser(
        denoiser=den,
        scheduler=scheduler,
        sample_shape=shape,
        source=src,
        augment=policy(aug) if aug else None,
    )


def _flow_wrapper(src: str) -> dict | None:
    """The ``flow_wrapper.json`` of a local folder (an ε-UNet served as a rectified-flow model), or None."""
    from lossguide.models.flowwrap import WRAPPER_FILE

    path = Path(src) / WRAPPER_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _flow_denoiser(unet, desc: dict, src: str, state_dtype) -> Denoiser:
    """A ``flow_prediction`` Denoiser over a FlowSchedule: the ε-UNet inside the exact VP→flow wrapper
    (:class:`lossguide.models.flowwrap.FlowFromEps`) that ``desc`` (the folder's ``flow_wrapper.json``) describes."""
    from lossguide.denoiser import _record_param_dtype
    from lossguide.models.flowwrap import FlowFromEps, vp_alpha_bar
    from lossguide.schedule import FlowSchedule

    if desc.get("kind") != "FlowFromEps":
        raise ModelNotFoundError(f"{src}: unknown flow wrapper kind {desc.get('kind')!r} (expected 'FlowFromEps')")
    fs = desc["flow_schedule"]
    schedule = FlowSchedule(int(fs["num_train_timesteps"]), float(fs.get("shift", 1.0)))
    net = FlowFromEps(freeze(unet), vp_alpha_bar(desc), schedule.num_train_timesteps)

    def velocity(x, t):
        return net(x, t).to(x.dtype)

    den = Denoiser(velocity, schedule, "flow_prediction")
    _record_param_dtype(den, unet)
    if state_dtype is not None:
        den.dtype = state_dtype
    return den


def _load_checkpoint_denoiser(diffusers, path: Path, flags: dict, device, dtype) -> LoadedDenoiser:
    """An unconditional ADM or DDIM-codebase checkpoint as a denoiser, with a DDPMScheduler of its schedule."""
    from lossguide.augment import policy
    from lossguide.networks import ADMClassifier, denoiser_from_network

    net = load_network(path, flags).to(device=device, dtype=dtype)
    if isinstance(net, ADMClassifier):
        raise ValueError(f"{path} is a noise-aware classifier, not a denoiser: load it with load_network")
    if getattr(net, "num_classes", None):
        raise ValueError(f"{path} is class-conditional: build its denoiser with lossguide.networks."
                         "denoiser_from_network(load_network(path, flags), schedule, y=labels)")  # fmt: skip
    diff = flags.get("diffusion") if isinstance(flags.get("diffusion"), dict) else {}
    T = int(diff.get("num_diffusion_timesteps", flags.get("diffusion_steps", 1000)))
    kind = str(diff.get("beta_schedule", flags.get("noise_schedule", "linear")))
    if kind == "linear":
        scale = 1000 / T  # guided-diffusion scales the linear β range with T; the DDIM config gives it
        start = float(diff.get("beta_start", scale * 1e-4))
        end = float(diff.get("beta_end", scale * 0.02))
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=start,
                                            beta_end=end, clip_sample=False)  # fmt: skip
    elif kind == "cosine":
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    else:
        raise ValueError(f"unknown noise schedule {kind!r} in the flags; lossguide reads 'linear' and 'cosine'")
    from lossguide.schedule import NoiseSchedule

    den = denoiser_from_network(net, NoiseSchedule.from_diffusers(scheduler))
    data = flags.get("data") if isinstance(flags.get("data"), dict) else {}
    size = int(flags.get("image_size", data.get("image_size", flags.get("resolution", 256))))
    shape = (int(net.in_channels), size, size)
    return LoadedDenoiser(denoiser=den, scheduler=scheduler, sample_shape=shape, source=str(path),
                          augment=policy("photo"))  # fmt: skip


def _shipped_folder(name_or_path, table: dict, what: str) -> Path:
    """The folder of a shipped name in ``table``, or ``name_or_path`` as a folder; a one-line error if neither."""
    path = table.get(str(name_or_path), Path(str(name_or_path)).expanduser())
    if not path.exists():
        entry = manifest().get(str(name_or_path), {})
        fix = f"pass one of {', '.join(table)} or a folder"
        if "command" in entry:
            fix = f"retrain it with `{entry['command']}`"
        raise ModelNotFoundError(f"{what} {name_or_path!r} not found at {path}; {fix}")
    return path


def load_conditional(name_or_path: str = "mnist-cond", device="cpu", dtype=torch.float32):
    """A :class:`~lossguide.layout.CondDigitModel` (frozen) by shipped name or exported folder."""
    from lossguide.layout.model import CondDigitModel

    return CondDigitModel.from_pretrained(_shipped_folder(name_or_path, CONDITIONAL, "conditional model"), device,
                                          parse_dtype(dtype))  # fmt: skip


def load_guide(name_or_path: str = "mnist-cond-guide", device="cpu"):
    """A distilled CFG guide (:class:`~lossguide.layout.distill.GuideNet`, frozen) by shipped name or folder."""
    from lossguide.denoiser import freeze
    from lossguide.layout.distill import GuideNet

    return freeze(GuideNet.load(_shipped_folder(name_or_path, GUIDES, "guide")).to(device))


def load_classifier(name: str, device="cpu", check_hash: bool = False) -> torch.nn.Module:
    """A shipped classifier by name, frozen (eval mode, no parameter gradients)."""
    from safetensors.torch import load_file

    from lossguide.models.nets import ARCHS

    entry = manifest().get(name)
    if name not in CLASSIFIERS or entry is None:
        raise ModelNotFoundError(f"unknown classifier {name!r}; shipped: {', '.join(CLASSIFIERS)}")
    path = WEIGHTS / entry["file"]
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing; retrain with `{entry['command']}`")
    if check_hash and sha256(path) != entry["sha256"]:
        raise ValueError(f"{path} does not match the manifest's sha256; retrain with `{entry['command']}`")
    model = ARCHS[entry["arch"]]()
    model.load_state_dict(load_file(str(path)))
    return freeze(model.to(device))


def class_means(name: str, device="cpu", net: torch.nn.Module | None = None) -> torch.Tensor:
    """μ_y ``[10, D]``: the shipped classifier ``name``'s mean penultimate feature per class, over its own
    training split (from the manifest; never the held-out digits), for
    :class:`~lossguide.losses.FeatureDistanceLoss`; ``net`` is that classifier when already loaded."""
    from lossguide.data import load_mnist
    from lossguide.losses import class_feature_means

    net = load_classifier(name, device=device) if net is None else net
    if not hasattr(net, "features"):
        raise ValueError(f"classifier {name!r} has no .features(x) to take class means of")
    x, y = load_mnist(manifest()[name]["split"])
    return class_feature_means(net.features, x.to(device), y.to(device))


def _check_flags(flags) -> None:
    if flags is not None and not isinstance(flags, dict):
        raise TypeError(f"flags must be a mapping of the checkpoint's constructor flags (e.g. {{'image_size': 256, "
                        f"...}}), got {flags!r}")  # fmt: skip


def load_network(path, flags: dict | None = None) -> torch.nn.Module:
    """A frozen network of the papers' own checkpoints (guided-diffusion ADM UNet or classifier, DDIM-codebase
    UNet) from its file and its reference flags (``flags['architecture']`` or told from the keys); it returns
    what the reference returns (``net(x, t)`` or ``net(x, t, y)``). See :mod:`lossguide.networks`."""
    _check_flags(flags)
    if not Path(path).expanduser().is_file():
        raise ModelNotFoundError(
            f"no checkpoint file {str(path)!r}; pass the path of the .pt/.ckpt/.safetensors file (e.g. "
            "guided-diffusion's 256x256_diffusion_uncond.pt or SDEdit's celeba_hq.ckpt) and its constructor "
            "flags; for shipped or diffusers models use load_denoiser/load_classifier"
        )
    from lossguide.networks import load_network_file

    return load_network_file(Path(path).expanduser(), flags)


def load(name: str, device="cpu"):
    """Convenience: a :class:`LoadedDenoiser` for diffusion models, a frozen module for classifiers."""
    if name in CLASSIFIERS:
        return load_classifier(name, device)
    return load_denoiser(name, device)
