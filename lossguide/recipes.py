"""Recipes: a YAML file that names a model, a loss, a preset and a sampler, run by ``lossguide sample --config``.

A recipe resolves to (denoiser, sampler, guidance, loss, per-sample shape) and runs into a folder
(:class:`~lossguide.runfolder.RunFolder`) with one PNG per seed, ``grid.png``, the resolved ``config.yaml`` and
``metrics.json`` (all written atomically); seeds are the unit of work, so rerunning resumes, and every batch has
``batch`` rows (a short one is padded), so a seed's numbers never depend on which seeds share its batch.
Paths in a recipe (models, reference images) are taken relative to the recipe file when such a file exists
there; anything else is a diffusers/transformers folder or hub id (fetched once with ``huggingface-cli
download`` and then read from the local cache).

Schema (``recipes/*.yaml`` are commented examples)::

    name: celebahq-text
    model: {kind: pixel | latent, path: ..., dtype: fp32 | bf16 | fp16, ...}
    loss: {kind: clip_text | clip_image | clip_style | classifier | feature_match | identity | none, ...}
    method: shen2024            # any preset
    params: {eta: 0.001, ...}   # its parameters
    sampler: {steps: 100, eta: 1.0, spacing: leading, steps_offset: 0}
    seeds: 0-7
    batch: 4
    device: cuda
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lossguide import net_losses
from lossguide.guidance import check_window
from lossguide.harness.methods import method_config
from lossguide.harness.tasks import method_loss
from lossguide.runfolder import RunFolder, fixed_batches
from lossguide.samplers import DDIM
from lossguide.sampling import sample

log = logging.getLogger(__name__)

TOP_KEYS = {
    "name", "description", "model", "loss", "method", "params", "window", "sampler", "seeds", "batch", "device",
    "notes",
}  # fmt: skip
LOSS_KINDS = ("clip_text", "clip_image", "clip_style", "classifier", "feature_match", "identity", "measurement", "none")
#: the linear operators A of ``measurement`` losses (inverse problems, DPS): y = A(reference) + noise_sigma·z
OPERATORS = ("super_resolution", "box_inpainting")
#: (required, optional) keys of each loss kind besides ``kind``
LOSS_KEYS: dict[str, tuple[set, set]] = {
    "clip_text": ({"text"}, {"clip", "metric"}),
    "clip_image": ({"reference"}, {"clip", "metric"}),
    "clip_style": ({"reference"}, {"clip", "layer"}),
    "classifier": ({"network", "target"}, {"preprocess"}),
    "feature_match": ({"network", "reference"}, {"preprocess"}),
    "identity": ({"network", "reference"}, {"preprocess", "metric"}),
    "measurement": ({"reference", "operator"}, {"factor", "box", "norm", "noise_sigma", "noise_seed"}),
    "none": (set(), set()),
}
SAMPLER_KEYS = {"steps", "eta", "spacing", "steps_offset"}
NETWORK_KINDS = ("transformers", "torchscript", "factory")
MODEL_KEYS = {
    "pixel": {"kind", "path", "dtype", "state_dtype", "flags"},
    "latent": {
        "kind", "path", "dtype", "prompt", "negative_prompt", "cfg_scale", "height", "width", "decode_scale",
        "gradient_checkpointing", "autocast",
    },
}  # fmt: skip


def _fail(path, msg: str):
    raise ValueError(f"recipe {path}: {msg}")


def load(path: str | Path) -> dict:
    """Read and validate a recipe; unknown keys and kinds are one-line errors naming the fix."""
    import yaml

    from lossguide.runfolder import seeds_from

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no recipe {path}; the shipped ones are in recipes/ of the repository")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        _fail(path, "is not a text (YAML) file; pass a recipe such as recipes/celebahq-text.yaml")
    r = yaml.safe_load(text)
    if r is None:
        _fail(path, "is empty; a recipe names at least model and loss (see recipes/ for examples)")
    if not isinstance(r, dict):
        _fail(path, "must be a mapping of keys (name, model, loss, method, ...)")
    if "guidance" in r and isinstance(r.get("model"), dict):
        _fail(path, "is the config.yaml a recipe run wrote (it has a 'guidance' block), not a recipe; rerun the "
              "recipe file it came from (with --out set to this run's folder to resume it)")  # fmt: skip
    bad = set(r) - TOP_KEYS
    if bad:
        _fail(path, f"unknown keys {sorted(bad)}; allowed: {sorted(TOP_KEYS)}")
    for key in ("model", "loss"):
        if not isinstance(r.get(key), dict) or "kind" not in r[key]:
            _fail(path, f"'{key}' must be a mapping with a 'kind'")
    kind = r["model"]["kind"]
    if kind not in MODEL_KEYS:
        _fail(path, f"model kind {kind!r} unknown; choose pixel or latent")
    bad = set(r["model"]) - MODEL_KEYS[kind]
    if bad:
        _fail(path, f"{kind} model has no keys {sorted(bad)}; allowed: {sorted(MODEL_KEYS[kind])}")
    if r["loss"]["kind"] not in LOSS_KINDS:
        _fail(path, f"loss kind {r['loss']['kind']!r} unknown; choose one of {', '.join(LOSS_KINDS)}")
    _check_model(path, r["model"])
    _check_loss(path, r["loss"])
    r.setdefault("name", path.stem)
    if not isinstance(r["name"], str) or not r["name"]:
        _fail(path, f"name must be a string (the default run folder is runs/<name>), got {r['name']!r}")
    r.setdefault("method", "shen2024")
    r.setdefault("params", {})
    if r["params"] is not None and not isinstance(r["params"], dict):
        _fail(path, f"params must be a mapping of the preset's parameters (e.g. {{eta: 0.1}}), got {r['params']!r}")
    r.setdefault("sampler", {})
    _check_sampler(path, r["sampler"])
    r.setdefault("batch", 4)
    if isinstance(r["batch"], bool) or not isinstance(r["batch"], int) or r["batch"] < 1:
        _fail(path, f"batch must be an integer ≥ 1, got {r['batch']!r}")
    r.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(r["device"], str):
        _fail(path, f"device must be a string such as cpu or cuda, got {r['device']!r}")
    w = r.get("window")
    if w is not None and not (isinstance(w, list) and len(w) == 2 and all(_is_number(v) for v in w)):
        _fail(path, f"window must be a pair [lo, hi] of fractions of t/T with 0 ≤ lo ≤ hi ≤ 1, got {w!r}")
    try:
        r["seeds"] = seeds_from(r.get("seeds", "0-3"))
    except ValueError as e:
        _fail(path, str(e))
    _guidance(r)  # unknown methods/parameters fail now, not after loading models
    r["_dir"] = str(path.resolve().parent)
    return r


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_model(path, m: dict) -> None:
    """A model section's path, dtypes and flags, before anything is loaded."""
    from lossguide.models import parse_dtype

    if not isinstance(m.get("path"), str) or not m["path"]:
        _fail(path, f"{m['kind']} model needs a 'path' (a shipped name, a diffusers folder or hub id, or a checkpoint "
              f"file), got {m.get('path')!r}")  # fmt: skip
    for key in ("dtype", "state_dtype", "autocast"):
        if m.get(key) is not None:
            try:
                parse_dtype(m[key])
            except ValueError as e:
                _fail(path, f"model {key}: {e}")
    if m.get("flags") is not None and not isinstance(m["flags"], dict):
        _fail(path, f"model flags must be a mapping of the checkpoint's constructor flags, got {m['flags']!r}")


def _check_loss(path, spec: dict) -> None:
    """A loss section's keys: every key its kind requires, and none it would ignore."""
    kind = spec["kind"]
    required, optional = LOSS_KEYS[kind]
    missing = sorted(required - set(spec))
    if missing:
        _fail(path, f"loss kind {kind} needs the key(s) {missing}")
    bad = sorted(set(spec) - required - optional - {"kind"})
    if bad:
        _fail(path, f"loss kind {kind} has no keys {bad}; allowed: {sorted(required | optional | {'kind'})}")
    if kind == "measurement":
        if spec["operator"] not in OPERATORS:
            _fail(path, f"measurement operator {spec['operator']!r} unknown; choose one of {', '.join(OPERATORS)}")
        box = spec.get("box")
        if box is not None and not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)):
            _fail(path, f"measurement box must be [top, left, height, width] in pixels, got {box!r}")
        if spec["operator"] == "box_inpainting" and box is None:
            _fail(path, "measurement operator box_inpainting needs box: [top, left, height, width]")
        sig = spec.get("noise_sigma", 0.05)
        if isinstance(sig, bool) or not isinstance(sig, (int, float)) or not 0 <= sig < float("inf"):
            _fail(path, f"measurement noise_sigma must be a number ≥ 0, got {sig!r}")
        f = spec.get("factor", 4)
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:
            _fail(path, f"measurement factor must be an integer ≥ 1, got {f!r}")
    net = spec.get("network")
    if "network" in spec and not (isinstance(net, dict) and any(k in net for k in NETWORK_KINDS)):
        _fail(path, "loss network must be a mapping {transformers: id}, {torchscript: file} or "
              f"{{factory: 'module:function'}}, got {net!r}")  # fmt: skip


def _check_sampler(path, s) -> None:
    """The sampler section: a mapping of steps (integer ≥ 1), eta (finite ≥ 0), spacing and steps_offset."""
    if s is None:
        return
    if not isinstance(s, dict):
        _fail(path, f"sampler must be a mapping such as {{steps: 100, eta: 0.0}}, got {s!r}")
    bad = sorted(set(s) - SAMPLER_KEYS)
    if bad:
        _fail(path, f"sampler has no keys {bad}; allowed: {sorted(SAMPLER_KEYS)}")
    for key, lo in (("steps", 1), ("steps_offset", 0)):
        v = s.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            _fail(path, f"sampler {key} must be an integer ≥ {lo}, got {v!r}")
    eta = s.get("eta")
    if eta is not None and not (_is_number(eta) and eta >= 0):
        _fail(path, f"sampler eta must be a finite number ≥ 0 (0 deterministic, 1 DDPM-like), got {eta!r}")


def _params(r: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (r.get("params") or {}).items()}


def _guidance(r: dict):
    """The preset with its parameters; ``window: [lo, hi]`` (guidance where lo < t/T ≤ hi) on any preset."""
    g = method_config(r["method"], **_params(r))  # a preset or a spec such as shen2024-ra
    if r.get("window") is not None:
        w = g.replace(window=tuple(float(v) for v in r["window"]))
        if w.read() == g.read() and w.window != g.window:
            raise ValueError(f"window {r['window']} has no effect: method {r['method']!r} guides nowhere; drop it")
        g = w
    return g


def _local(r: dict, p: str) -> str:
    """``p`` relative to the recipe's folder when that exists, else ``p`` itself (a folder or a hub id)."""
    q = Path(p).expanduser()
    if not q.is_absolute():
        cand = Path(r.get("_dir", ".")) / q
        if cand.exists():
            return str(cand)
    return str(q) if q.exists() else p


def read_image(path: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An RGB image file as [3, H, W] in [−1, 1], resized (bicubic, antialiased) to ``size`` if given."""
    import numpy as np
    from PIL import Image

    if not Path(path).exists():
        raise FileNotFoundError(f"reference image {path} does not exist; see the recipe's notes for where to get it")
    im = Image.open(path).convert("RGB")
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = torch.nn.functional.interpolate(x[None], size=size, mode="bicubic", antialias=True)[0].clamp(-1, 1)
    return x


def load_network(spec: dict, r: dict, device) -> torch.nn.Module:
    """A user network from ``{transformers: id, class: AutoModel...}``, ``{torchscript: file}`` or
    ``{factory: "module:function", kwargs: {...}}`` (any code that returns a torch module)."""
    if "transformers" in spec:
        import transformers

        from lossguide.models import ModelNotFoundError, resolve

        cls = getattr(transformers, spec.get("class", "AutoModel"))
        src, local_only = resolve(_local(r, spec["transformers"]))
        try:
            net = cls.from_pretrained(src, local_files_only=local_only)
        except OSError as e:
            raise ModelNotFoundError(
                f"cannot load {spec['transformers']!r}: download it with `huggingface-cli download "
                f"{spec['transformers']}` on a machine with network access, or give a local folder"
            ) from e
    elif "torchscript" in spec:
        f = _local(r, spec["torchscript"])
        if not Path(f).exists():
            from lossguide.models import ModelNotFoundError

            raise ModelNotFoundError(f"no TorchScript file {f}; export your network with torch.jit.script/trace")
        net = torch.jit.load(f, map_location="cpu")
    elif "factory" in spec:
        mod, _, fn = spec["factory"].partition(":")
        if not fn:
            raise ValueError(f"factory must be 'module:function', got {spec['factory']!r}")
        try:
            module = importlib.import_module(mod)
        except ImportError as e:
            raise ValueError(f"network factory {spec['factory']!r}: no module {mod!r} ({e}); name an importable "
                             "module, e.g. 'mypackage.nets:build'") from e  # fmt: skip
        make = getattr(module, fn, None)
        if not callable(make):
            raise ValueError(f"network factory {spec['factory']!r}: module {mod!r} has no function {fn!r}; name one "
                             "that returns a torch module")  # fmt: skip
        kwargs = spec.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise ValueError(f"network factory kwargs must be a mapping, got {kwargs!r}")
        net = make(**kwargs)
        if not isinstance(net, torch.nn.Module):
            raise ValueError(f"network factory {spec['factory']!r} returned a {type(net).__name__}, not a torch "
                             "module; return the network (an nn.Module)")  # fmt: skip
    else:
        raise ValueError("a network is {transformers: id}, {torchscript: file} or {factory: 'module:function'}")
    return net.to(device)


def _preprocess(spec: dict | None, default: net_losses.Preprocess) -> net_losses.Preprocess:
    if not spec:
        return default
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items()}
    return net_losses.Preprocess(**kw)


def build_pixel_loss(r: dict, image_size: tuple[int, int], device):
    """The pixel-space loss ℓ(x0) of the recipe's ``loss`` section."""
    spec = dict(r["loss"])
    kind = spec.pop("kind")
    if kind == "none":
        return None
    ref = spec.get("reference")
    ref_img = read_image(_local(r, ref), image_size).to(device) if ref else None
    if kind == "measurement":
        return measurement_loss(spec, ref_img)
    if kind.startswith("clip"):
        clip = net_losses.CLIP.from_pretrained(_local(r, spec.get("clip", "openai/clip-vit-base-patch16")), device)
        if kind == "clip_text":
            return net_losses.CLIPTextLoss(clip, spec["text"], metric=spec.get("metric", "cosine"))
        if ref_img is None:
            raise ValueError(f"loss {kind} needs reference: an image file")
        if kind == "clip_image":
            return net_losses.CLIPImageLoss(clip, ref_img, metric=spec.get("metric", "cosine"))
        return net_losses.CLIPStyleLoss(clip, ref_img, layer=int(spec.get("layer", -3)))
    net = load_network(spec.get("network") or {}, r, device)
    pre = _preprocess(spec.get("preprocess"), net_losses.Preprocess())
    if kind == "classifier":
        return net_losses.ClassifierLoss(net, spec["target"], preprocess=pre)
    if ref_img is None:
        raise ValueError(f"loss {kind} needs reference: an image file")
    if kind == "feature_match":
        return net_losses.FeatureMatchLoss(net, ref_img, preprocess=pre)
    return net_losses.IdentityLoss(net, ref_img, preprocess=pre, metric=spec.get("metric", "cosine"))


def measurement_loss(spec: dict, ref_img: torch.Tensor):
    """A noisy linear inverse problem (DPS, Chung et al. 2023): y = A(reference) + σ_y·z with a seeded z, and the
    loss ‖A(x0) − y‖ (``norm``: ``l2``, DPS's, or ``squared``); A is ``factor``× average pooling or a box mask."""
    from lossguide import losses

    ref = ref_img[None]
    sigma, norm = float(spec.get("noise_sigma", 0.05)), spec.get("norm", "l2")
    g = torch.Generator().manual_seed(int(spec.get("noise_seed", 0)))
    if spec["operator"] == "super_resolution":
        f = int(spec.get("factor", 4))
        y = torch.nn.functional.avg_pool2d(ref, f)
        y = y + sigma * torch.randn(y.shape, generator=g).to(y)
        return losses.SuperResLoss(y, factor=f, reference_is_lowres=True, norm=norm)
    top, left, h, w = spec["box"]
    mask = torch.ones_like(ref[:, :1])
    mask[..., top : top + h, left : left + w] = 0
    y = (ref + sigma * torch.randn(ref.shape, generator=g).to(ref)) * mask
    return losses.InpaintLoss(y, mask.expand_as(ref), norm=norm)


@dataclass
class Built:
    """What a recipe resolves to."""

    denoiser: object
    sampler: object
    guidance: object
    loss: object
    shape: tuple[int, ...]
    to_image: object  # x0 [B, ...] -> images [B, 3, H, W] in [−1, 1], without gradients
    final_loss: object  # the guidance loss of the final samples (pixel models: on x0 clamped to [−1, 1])


def build(r: dict) -> Built:
    """Load the recipe's model and loss and build sampler and guidance."""
    from lossguide.models import load_denoiser, parse_dtype

    device = r["device"]
    m = r["model"]
    s = r.get("sampler") or {}
    guidance = _guidance(r)
    if m["kind"] == "pixel":
        ld = load_denoiser(_local(r, m["path"]), device=device, dtype=m.get("dtype", "fp32"),
                           state_dtype=m.get("state_dtype", "fp32"), flags=m.get("flags"))  # fmt: skip
        den, shape = ld.denoiser, ld.sample_shape
        if guidance.n_aug > 0 and guidance.augment is None:  # the model's data supplies the augmentation
            guidance = guidance.replace(augment=ld.augment)
        pixel_loss = build_pixel_loss(r, tuple(shape[-2:]), device)
        loss = pixel_loss

        def to_image(x):
            return x.float()

        def final_loss(x):
            return pixel_loss(x.clamp(-1, 1))

    else:
        from lossguide.latent import load_stable_diffusion

        stack = load_stable_diffusion(_local(r, m["path"]), device=device, dtype=m.get("dtype", "fp32"))
        H, W = int(m.get("height", 512)), int(m.get("width", 512))
        shape = stack.latent_shape(H, W)
        if m.get("gradient_checkpointing", False):
            stack.enable_gradient_checkpointing()
        ac = m.get("autocast")
        ac = parse_dtype(ac) if ac else None
        cond = stack.encode_prompt(m.get("prompt", ""))
        neg = stack.encode_prompt(m.get("negative_prompt", "")) if float(m.get("cfg_scale", 7.5)) != 1 else None
        den = stack.denoiser(cond, neg, guidance_scale=float(m.get("cfg_scale", 7.5)), autocast_dtype=ac)
        ds = float(m.get("decode_scale", 1.0))
        size = tuple(int(round(v / stack.vae_factor * ds)) * stack.vae_factor for v in (H, W))
        pixel_loss = build_pixel_loss(r, size, device)
        loss = None if pixel_loss is None else stack.loss(pixel_loss, decode_scale=ds, autocast_dtype=ac)
        if loss is not None and guidance.n_aug > 0:  # augment the decoded image: one decode, |T| loss copies
            from lossguide.latent import DecodeThenAugment

            guidance = guidance.replace(augment=DecodeThenAugment(loss, guidance.augment))
        full = stack.loss(lambda x: x.flatten(1).sum(1))
        final_loss = loss

        def to_image(x):
            with torch.no_grad():
                return full.decode(x).float()

    sampler = DDIM(
        den.schedule, int(s.get("steps", 100)), eta=float(s.get("eta", 0.0)), spacing=s.get("spacing", "leading"),
        steps_offset=int(s.get("steps_offset", 0)),
    )  # fmt: skip
    check_window(guidance, sampler)  # a window without a guided step fails here, before the first write
    if guidance.enabled and loss is None:
        raise ValueError(f"method {r['method']!r} needs a loss; the recipe has loss kind 'none'")
    if loss is not None:  # the tasks' one rule: naive_grad reads the loss at x_t; a recipe has no noise-aware net

        def noise_aware():
            raise ValueError(f"method {r['method']!r} guides with a noise-aware classifier p(y | x_t, t), which a "
                             "recipe's loss is not; use a method that guides through x0_hat (dps, freedom, "
                             "shen2024, ...) or naive_grad (the loss read at x_t)")  # fmt: skip

        loss = method_loss(guidance, loss, noise_aware)
    return Built(den, sampler, guidance, loss, tuple(shape), to_image, final_loss)


def _config_text(r: dict, guidance) -> str:
    import yaml

    d = {k: v for k, v in r.items() if not k.startswith("_")}
    d["guidance"] = guidance.to_dict()
    return yaml.safe_dump(json.loads(json.dumps(d, default=list)), sort_keys=False, allow_unicode=True)


def run(recipe: str | Path | dict, out: str | Path | None = None, overwrite: bool = False, progress: bool = True):
    """Run a recipe into ``out`` (default ``runs/<name>``), resuming finished seeds; returns the metrics."""
    from lossguide.runfolder import png_bytes, to_uint8

    r = load(recipe) if not isinstance(recipe, dict) else copy.deepcopy(recipe)
    out = Path(out or Path("runs") / r["name"])
    guidance = _guidance(r)
    text = _config_text(r, guidance)
    folder = RunFolder(out, overwrite=overwrite)
    folder.check(text)  # a folder of another config is refused before any model is loaded
    finished = not overwrite and (out / "config.yaml").is_file() and not folder.todo(r["seeds"])
    b = None if finished else build(r)  # everything is built and checked before the first write
    with folder.open(text):
        todo = folder.todo(r["seeds"])
        if not todo:
            log.info("all %d seeds already done in %s", len(r["seeds"]), out)
            return finalize(r, folder)
        b = b or build(r)
        dtype = b.denoiser.dtype or torch.float32
        for seeds, n in fixed_batches(todo, int(r["batch"])):
            if n < len(seeds):
                log.info("padding %d seeds to a batch of %d rows (the padding is dropped)", n, len(seeds))
            t0 = time.perf_counter()
            res = sample(b.denoiser, b.sampler, b.guidance, b.loss, shape=b.shape, seeds=seeds, dtype=dtype,
                         device=r["device"], progress=progress)  # fmt: skip
            wall = time.perf_counter() - t0
            img = b.to_image(res.x0)
            with torch.no_grad():
                L = b.final_loss(res.x0) if b.loss is not None else torch.full((len(seeds),), float("nan"))
            for j, s in enumerate(seeds[:n]):
                folder.write_seed(s, png_bytes(to_uint8(img[j].cpu())), {
                    "seed": s, "loss": float(L[j]), "skipped_steps": int(res.stats.skipped[j]),
                    "nfe": res.stats.nfe, "denoiser_grads": res.stats.denoiser_grads,
                    "wall_s_per_sample": wall / n,
                })  # fmt: skip
        return finalize(r, folder)


def finalize(r: dict, out: Path | RunFolder) -> dict:
    """Aggregate per-seed records into ``metrics.json`` and draw ``grid.png``."""
    from lossguide.runfolder import grid, png_bytes

    folder = out if isinstance(out, RunFolder) else RunFolder(out)
    recs = folder.read_records(r["seeds"])
    n = len(recs)
    metrics = {
        "name": r["name"], "method": r["method"], "n_samples": n,
        "mean_loss": sum(x["loss"] for x in recs) / n, "nfe": recs[0]["nfe"],
        "denoiser_grads": recs[0]["denoiser_grads"], "skipped_steps": sum(x["skipped_steps"] for x in recs),
        "wall_s_per_sample": sum(x["wall_s_per_sample"] for x in recs) / n, "per_sample": recs,
    }  # fmt: skip
    folder.write_bytes("grid.png", png_bytes(grid([folder.read_png(s) for s in r["seeds"]])))
    folder.write_json("metrics.json", metrics)
    return metrics
