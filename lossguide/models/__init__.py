"""Model registry: the project's shipped MNIST models by name, diffusers folders and hub ids by path.

``load_denoiser("mnist-ddpm")`` takes the same path a diffusers user takes (``UNet2DModel`` and its
scheduler via ``from_pretrained``) on the folder shipped inside this package; a local diffusers folder or
a hub id works the same way. ``load_classifier("mnist-guide")`` returns a frozen classifier. Shipped files
are listed with their hashes, training commands and held-out metrics in ``manifest.json``.
"""

from __future__ import annotations

import contextlib
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
from lossguide.models.folder import ModelFolderError, read_json

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
#: the noise-aware classifiers p(y | x_t, t) (cg's references): the shipped one and the long-trained one (issue 23)
NOISE_AWARE = ("mnist-noise-aware", "mnist-noise-aware-long")
CLASSIFIERS = ("mnist-guide", "mnist-judge", "mnist-robust", *NOISE_AWARE)
HUB_HOST = ("huggingface.co", 443)


class ModelNotFoundError(FileNotFoundError):
    """A model name, folder or hub id that cannot be loaded here; the message says what to pass instead."""


def refit_hint(folder: Path, script: str = "the script that wrote it") -> str:
    """How to write ``folder`` again: the manifest's command for a shipped folder, the command in its
    ``training.json``, or ``script``."""
    try:
        shipped = manifest()
    except ModelFolderError:
        shipped = {}  # a broken manifest is reported where it is read for its own sake
    for entry in shipped.values():
        if not (isinstance(entry, dict) and isinstance(entry.get("folder"), str)):
            continue
        if WEIGHTS / entry["folder"] == Path(folder) and isinstance(entry.get("command"), str):
            return f"reinstall lossguide, or retrain it with `{entry['command']}`"
    meta = Path(folder) / "training.json"
    try:
        command = json.loads(meta.read_text()).get("command") if meta.is_file() else None
    except (OSError, ValueError, AttributeError):
        command = None
    if isinstance(command, str):
        return f"or export it again with `{command}` (its training.json's command)"
    return f"or export the folder again with {script}"


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
    """The shipped models' manifest (``manifest.json``), or {} in a checkout without weights."""
    return read_json(MANIFEST, REINSTALL) if MANIFEST.exists() else {}


REINSTALL = "reinstall lossguide (manifest.json ships with the weights it lists)"


def manifest_entry(name: str, *keys: str) -> dict:
    """The manifest's entry of the shipped model ``name`` with string values for ``keys``; a one-line
    :class:`ModelFolderError` naming the manifest, the entry and the key otherwise."""
    entry = manifest().get(name)
    if not isinstance(entry, dict):
        raise ModelFolderError(f"{MANIFEST} has no entry {name!r} (a mapping of its file, hashes and training "
                               f"command); {REINSTALL}")  # fmt: skip
    for key in keys:
        if not isinstance(entry.get(key), str) or not entry[key]:
            got = "has no" if key not in entry else f"has {entry[key]!r} as"
            raise ModelFolderError(f'{MANIFEST}: the entry {name!r} {got} "{key}", which must be a non-empty string; '
                                   f"{REINSTALL}")  # fmt: skip
    return entry


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def hide_hub_symlink_warning():
    """Hide one warning: diffusers' ``load_config`` passes huggingface_hub the deprecated ``local_dir_use_symlinks``
    on every hub load (lossguide's own probe of a hub id calls huggingface_hub without it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        yield


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


def resolve(name_or_path: str) -> tuple[str, bool]:
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
    other = {**{n: "a class-conditional (layout) model: load it with load_conditional; `lossguide experiment layout` "
                   "samples it" for n in CONDITIONAL},
             **{n: "a distilled CFG guide: load it with load_guide" for n in GUIDES},
             **{n: "a classifier (a guide or a judge, never a denoiser): load it with load_classifier"
                for n in CLASSIFIERS}}  # fmt: skip
    if name_or_path in other:
        raise ModelNotFoundError(f"{name_or_path!r} is a shipped model but not an unconditional denoiser: it is "
                                 f"{other[name_or_path]}; the denoisers are {', '.join(DENOISERS)}")  # fmt: skip
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


#: the keys of a UNet's config.json that lossguide reads itself (diffusers' defaults apply to the others)
UNET_KEYS = {
    "sample_size": ("the image size as an integer or [H, W]", "28"),
    "in_channels": ("a positive integer", "1"),
}
#: scheduler_config.json values that lossguide reads: key → the values diffusers' VP schedulers accept
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _unit(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1


def _size_ok(v) -> bool:
    return _positive_int(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(_positive_int(s) for s in v))


def _folder_files(src: Path) -> tuple[Path, Path]:
    """(the UNet's folder, the scheduler's config file) of a pipeline folder (unet/, scheduler/) or a bare one."""
    if (src / "unet").is_dir():
        return src / "unet", src / "scheduler" / "scheduler_config.json"
    return src, src / "scheduler_config.json"


def check_model_folder(src: Path, what: str = "diffusers model folder", flow: bool = False, script=None) -> None:
    """One-line errors for a local diffusers folder whose UNet config, weights or scheduler config is missing,
    or has a missing or wrong key that lossguide reads, naming the file, the key and the fix (``script``: the
    command that writes such a folder, where the folder records none)."""
    import diffusers

    src = Path(src)
    unet_dir, sched_file = _folder_files(src)
    again = refit_hint(src, *([script] if script else []))
    layout = ("pass a folder with unet/config.json, unet/diffusion_pytorch_model.safetensors and "
              "scheduler/scheduler_config.json (as save_pretrained writes them)")  # fmt: skip
    cfg_file = unet_dir / "config.json"
    if not cfg_file.is_file():
        raise ModelNotFoundError(f"{cfg_file} is missing, so {src} is no {what}; {layout}, {again}")
    cfg = read_json(cfg_file, f"fix the file, {again}")
    cls_name = cfg.get("_class_name", "UNet2DModel")
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ModelFolderError(f'{cfg_file}: "_class_name" is {cls_name!r}, not a diffusers model class; set it to '
                               f'"UNet2DModel" (or the class the weights were saved from), {again}')  # fmt: skip
    for key, (need, example) in UNET_KEYS.items():
        if key not in cfg:
            raise ModelFolderError(f'{cfg_file} has no "{key}" key; add "{key}": {example} ({need}), {again}')
        if not _size_ok(cfg[key]) if key == "sample_size" else not _positive_int(cfg[key]):
            raise ModelFolderError(f'{cfg_file}: "{key}" is {cfg[key]!r}, but it must be {need} (e.g. {example}); '
                                   f"fix it, {again}")  # fmt: skip
    if not any(f.name.startswith("diffusion_pytorch_model") for f in unet_dir.iterdir()):
        raise ModelNotFoundError(f"{unet_dir} has no weights (diffusion_pytorch_model.safetensors); {layout}, {again}")
    if not sched_file.is_file():
        raise ModelNotFoundError(f"{sched_file} is missing; write the scheduler the model was trained with there "
                                 f"(e.g. DDPMScheduler().save_pretrained({sched_file.parent})), {again}")  # fmt: skip
    sched = read_json(sched_file, f"fix the file, {again}")
    checks = [("num_train_timesteps", _positive_int, "a positive integer (e.g. 1000)")]
    if not flow and "FlowMatch" not in str(sched.get("_class_name", "")):
        checks += [
            ("beta_schedule", lambda v: v in BETA_SCHEDULES, f"one of {', '.join(BETA_SCHEDULES)}"),
            ("prediction_type", lambda v: v in VP_PREDICTIONS, f"one of {', '.join(VP_PREDICTIONS)}"),
            ("beta_start", _unit, "a number in (0, 1) (e.g. 0.0001)"),
            ("beta_end", _unit, "a number in (0, 1) (e.g. 0.02)"),
        ]
    for key, ok, need in checks:
        if key in sched and not ok(sched[key]):
            raise ModelFolderError(f'{sched_file}: "{key}" is {sched[key]!r}, but it must be {need}; fix it to what '
                                   f"the model was trained with, {again}")  # fmt: skip


def _load_unet_and_scheduler(diffusers, name_or_path, src, local_only, dtype, kw):
    """The UNet and scheduler of a local folder (:func:`_load_local_unet_and_scheduler`) or hub id; a hub id that
    cannot be loaded is a ModelNotFoundError."""
    if Path(src).is_file():
        raise ModelNotFoundError(
            f"cannot load {name_or_path!r}: it is a file, not a diffusers model folder; pass a folder with unet/ "
            f"and scheduler/ (as save_pretrained writes it), or an original checkpoint ending in "
            f"{', '.join(CHECKPOINT_SUFFIXES)}"
        )
    if Path(src).exists():
        return _load_local_unet_and_scheduler(diffusers, Path(src), dtype)
    try:
        sub = "unet"
        try:
            cfg = diffusers.UNet2DModel.load_config(src, subfolder=sub, **kw)
        except (OSError, ValueError):
            sub = None  # a hub repo with the model at its root (google/ddpm-ema-celebahq-256)
            cfg = diffusers.UNet2DModel.load_config(src, **kw)
        unet_cls = getattr(diffusers, cfg.get("_class_name", "UNet2DModel"))
        unet = unet_cls.from_pretrained(src, subfolder=sub, torch_dtype=dtype, low_cpu_mem_usage=False, **kw)
        sched_sub = "scheduler" if sub is not None else None
        sched_cfg = diffusers.DDPMScheduler.load_config(src, subfolder=sched_sub, **kw)
        flow = "FlowMatch" in str(sched_cfg.get("_class_name", ""))
        sched_cls = diffusers.FlowMatchEulerDiscreteScheduler if flow else diffusers.DDPMScheduler
        scheduler = sched_cls.from_pretrained(src, subfolder=sched_sub, **kw)
    except (OSError, ValueError, AttributeError) as e:
        hint = "pass a local diffusers folder (with unet/ and scheduler/, or config.json and scheduler_config.json)"
        if local_only:
            raise ModelNotFoundError(
                f"cannot load {name_or_path!r}: the hub is not reachable from here and it is not in the local "
                f"cache; download it once with `huggingface-cli download {name_or_path}` where the hub is "
                f"reachable, or {hint}"
            ) from e
        raise ModelNotFoundError(
            f"cannot load {name_or_path!r} as a diffusers model ({e.__class__.__name__}); {hint}"
        ) from e
    return unet, scheduler


def _first_line(e: BaseException) -> str:
    """The error's class and the start of its message, on one line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:240]}" if text else type(e).__name__


#: what diffusers raises on a config or weights file it cannot build a model or scheduler from
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError)


def _load_local_unet_and_scheduler(diffusers, src: Path, dtype):
    """The UNet and scheduler of a local folder, checked first (:func:`check_model_folder`); a file diffusers
    still cannot read is a one-line :class:`ModelFolderError` naming it."""
    from lossguide.models.flowwrap import EXPORT, WRAPPER_FILE

    script = f"`{EXPORT}`" if (src / WRAPPER_FILE).is_file() else None
    wrapper = _flow_wrapper(str(src))  # checked: a bad flow_wrapper.json fails before the weights load
    check_model_folder(src, flow=wrapper is not None, script=script)
    unet_dir, sched_file = _folder_files(src)
    again = refit_hint(src, *([script] if script else []))
    cls_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name", "UNet2DModel")
    try:
        unet = getattr(diffusers, cls_name).from_pretrained(unet_dir, torch_dtype=dtype, low_cpu_mem_usage=False)
    except LOAD_ERRORS as e:
        raise ModelFolderError(f"{unet_dir} does not load as a {cls_name} ({_first_line(e)}); fix the key it names in "
                               f"{unet_dir / 'config.json'} or the weights file, {again}") from e  # fmt: skip
    sched_cfg = json.loads(sched_file.read_text())
    flow = wrapper is not None or "FlowMatch" in str(sched_cfg.get("_class_name", ""))
    sched_cls = diffusers.FlowMatchEulerDiscreteScheduler if flow else diffusers.DDPMScheduler
    try:
        scheduler = sched_cls.from_pretrained(sched_file.parent)
    except LOAD_ERRORS + (NotImplementedError,) as e:
        raise ModelFolderError(f"{sched_file} does not load as a {sched_cls.__name__} ({_first_line(e)}); fix the key "
                               f"it names, {again}") from e  # fmt: skip
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
    src, local_only = resolve(name_or_path)
    kw = dict(local_files_only=local_only)
    with hide_hub_symlink_warning():
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
    """The checked ``flow_wrapper.json`` of a local folder (an ε-UNet served as a rectified-flow model), or None."""
    from lossguide.models.flowwrap import EXPORT, WRAPPER_FILE, read_wrapper

    path = Path(src) / WRAPPER_FILE
    return read_wrapper(path, refit_hint(Path(src), f"`{EXPORT}`")) if path.is_file() else None


def _flow_denoiser(unet, desc: dict, src: str, state_dtype) -> Denoiser:
    """A ``flow_prediction`` Denoiser over a FlowSchedule: the ε-UNet inside the exact VP→flow wrapper
    (:class:`lossguide.models.flowwrap.FlowFromEps`) that ``desc`` (the folder's ``flow_wrapper.json``) describes."""
    from lossguide.denoiser import _record_param_dtype
    from lossguide.models.flowwrap import FlowFromEps, vp_alpha_bar
    from lossguide.schedule import FlowSchedule

    fs = desc["flow_schedule"]  # read_wrapper checked every key
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
    names = [n for n in ("num_diffusion_timesteps", "diffusion_steps") if n in flags]  # the DDIM and ADM names
    name = "diffusion.num_diffusion_timesteps" if "num_diffusion_timesteps" in diff else (names or ["T"])[0]
    T = diff.get("num_diffusion_timesteps", flags[names[0]] if names else 1000)
    if not (isinstance(T, int) and not isinstance(T, bool) and T >= 2):
        raise ValueError(f"flags {name}={T!r}: it must be an integer ≥ 2, the number of timesteps the model was "
                         "trained with (1000 for the published checkpoints)")  # fmt: skip
    kind = str(diff.get("beta_schedule", flags.get("noise_schedule", "linear")))
    if kind == "linear":
        scale = 1000 / T  # guided-diffusion scales the linear β range with T; the DDIM config gives it
        start = float(diff.get("beta_start", scale * 1e-4))
        end = float(diff.get("beta_end", scale * 0.02))
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=start,
                                            beta_end=end, clip_sample=False)  # fmt: skip
    elif kind == "cosine":
        scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", clip_sample=False
        )
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
        if isinstance(entry, dict) and isinstance(entry.get("command"), str):
            fix = f"retrain it with `{entry['command']}`"
        raise ModelNotFoundError(f"{what} {name_or_path!r} not found at {path}; {fix}")
    return path


def load_conditional(name_or_path: str = "mnist-cond", device="cpu", dtype=torch.float32):
    """A :class:`~lossguide.layout.CondDigitModel` (frozen) by shipped name or exported folder."""
    from lossguide.layout.model import CondDigitModel

    path = _shipped_folder(name_or_path, CONDITIONAL, "conditional model")
    if (path / "unet").is_dir() and (path / "scheduler").is_dir():  # else from_pretrained names what is missing
        check_model_folder(path, "exported conditional model")
    try:
        return CondDigitModel.from_pretrained(path, device, parse_dtype(dtype))
    except FileNotFoundError:
        raise
    except LOAD_ERRORS + (NotImplementedError,) as e:
        raise ModelFolderError(f"{path} does not load as a conditional model ({_first_line(e)}); fix the file it "
                               f"names, {refit_hint(path)}") from e  # fmt: skip


def load_guide(name_or_path: str = "mnist-cond-guide", device="cpu"):
    """A distilled CFG guide (:class:`~lossguide.layout.distill.GuideNet`, frozen) by shipped name or folder."""
    import dataclasses

    from lossguide.layout.distill import CONFIG_FILE, GuideConfig, GuideNet

    path = _shipped_folder(name_or_path, GUIDES, "guide")
    again = refit_hint(path, "`python -m lossguide.training guide --base DIR --export DIR`")
    if (path / CONFIG_FILE).is_file():  # else GuideNet.load names what is missing
        cfg = read_json(path / CONFIG_FILE, f"fix the file, {again}")
        fields = {f.name: f for f in dataclasses.fields(GuideConfig)}
        unknown = sorted(set(cfg) - set(fields))
        missing = [n for n, f in fields.items() if n not in cfg and f.default is dataclasses.MISSING]
        if unknown or missing:
            what = f'no "{missing[0]}" key' if missing else f'an unknown key "{unknown[0]}"'
            raise ModelFolderError(f"{path / CONFIG_FILE} has {what} (a GuideConfig has {', '.join(fields)}); "
                                   f"fix the file, {again}")  # fmt: skip
    try:
        return freeze(GuideNet.load(path).to(device))
    except FileNotFoundError:
        raise
    except LOAD_ERRORS as e:
        raise ModelFolderError(f"{path} does not load as a guide ({_first_line(e)}); fix the file it names, "
                               f"{again}") from e  # fmt: skip


def load_classifier(name: str, device="cpu", check_hash: bool = False) -> torch.nn.Module:
    """A shipped classifier by name, frozen (eval mode, no parameter gradients)."""
    from safetensors.torch import load_file

    from lossguide.models.nets import ARCHS

    if name not in CLASSIFIERS:
        raise ModelNotFoundError(f"unknown classifier {name!r}; shipped: {', '.join(CLASSIFIERS)}")
    entry = manifest_entry(name, "file", "arch", "command", *(("sha256",) if check_hash else ()))
    path = WEIGHTS / entry["file"]
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing; retrain with `{entry['command']}`")
    if check_hash and sha256(path) != entry["sha256"]:
        raise ValueError(f"{path} does not match the manifest's sha256; retrain with `{entry['command']}`")
    if entry["arch"] not in ARCHS:
        raise ModelFolderError(f'{MANIFEST}: the entry {name!r} has "arch" {entry["arch"]!r}, which lossguide does '
                               f"not know (it has {', '.join(ARCHS)}); {REINSTALL}")  # fmt: skip
    model = ARCHS[entry["arch"]]()
    try:
        model.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as e:
        raise ModelFolderError(f"{path} does not hold the weights of a {entry['arch']} ({_first_line(e)}); retrain "
                               f"with `{entry['command']}`, or {REINSTALL}") from e  # fmt: skip
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
    x, y = load_mnist(manifest_entry(name, "split")["split"])
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
