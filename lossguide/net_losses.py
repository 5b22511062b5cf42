"""Guidance losses with networks: CLIP text/image/style, any classifier, feature matching, face identity.

Every loss takes x0 ``[B, 3, H, W]`` in the diffusion model's range [−1, 1] and returns ``[B]``. Input
handling is done once, by :class:`Preprocess`: x0 ∈ [−1, 1] → [0, 1] → bilinear (antialiased) resize to
the network's input size → ``(x − mean)/std``. Networks are frozen (eval mode, no parameter gradients);
gradients flow to x0 only. CLIP uses ``transformers.CLIPModel`` (no torchvision needed); the other
losses accept any ``torch.nn.Module`` (torchvision, timm, transformers) whose output is a tensor or has
``.logits``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lossguide.denoiser import freeze

#: CLIP's image normalisation (OpenAI CLIP ``preprocess``; the CLIPImageProcessor defaults)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: torchvision / timm ImageNet normalisation
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """x0 ∈ [−1, 1] → [0, 1] → resize to ``size`` (bilinear, antialiased) → (x − mean)/std.

    Args:
        size: (H, W) or one int for a square network input; None keeps the input size.
        mean, std: per-channel normalisation applied after scaling to [0, 1]; None skips it.
        input_range: (lo, hi) of x0 (default the diffusion range [−1, 1]).
    """

    size: int | tuple[int, int] | None = None
    mean: Sequence[float] | None = IMAGENET_MEAN
    std: Sequence[float] | None = IMAGENET_STD
    input_range: tuple[float, float] = (-1.0, 1.0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        lo, hi = self.input_range
        x = (x - lo) / (hi - lo)
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        if self.mean is not None:
            C = x.shape[1]
            if len(self.mean) != C:
                raise ValueError(
                    f"the network's normalisation has {len(self.mean)} channels but the images have {C}; "
                    "pass Preprocess(mean=..., std=...) for your data"
                )
            mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x


def hf_dtype_kwargs(dtype: torch.dtype) -> dict:
    """The dtype argument of transformers' ``from_pretrained``: ``dtype`` from 4.56 on, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _logits(out) -> torch.Tensor:
    """A network's output tensor: the tensor itself, ``.logits`` (transformers) or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot read logits from a {type(out).__name__}; wrap the network to return a tensor")


def _net_dtype(net: torch.nn.Module, x: torch.Tensor) -> torch.dtype:
    p = next(iter(net.parameters()), None)
    return x.dtype if p is None else p.dtype


def _as_images(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    return x.unsqueeze(0) if x.ndim == 3 else x


# -- CLIP --------------------------------------------------------------------------------------------
class CLIP:
    """A frozen ``transformers.CLIPModel`` with its tokenizer: image and text embeddings, differentiable in
    the image. ``CLIP.from_pretrained("openai/clip-vit-base-patch16")`` is the paper's guide network.

    Args:
        model: a ``CLIPModel``.
        tokenizer: any callable ``tokenizer(texts, padding=..., return_tensors="pt")`` (a CLIPTokenizer);
            optional when text embeddings are passed precomputed.
        preprocess: defaults to CLIP's normalisation at the vision tower's ``image_size``.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Callable | None = None, preprocess: Preprocess | None = None
    ):
        self.model = freeze(model)
        self.tokenizer = tokenizer
        size = int(model.config.vision_config.image_size)
        self.preprocess = preprocess or Preprocess(size=size, mean=CLIP_MEAN, std=CLIP_STD)

    @classmethod
    def from_pretrained(cls, name_or_path: str, device="cpu", dtype=torch.float32) -> CLIP:
        """Load ``CLIPModel`` and ``CLIPTokenizer`` from a local folder or hub id (clear error if missing)."""
        from lossguide.models import ModelNotFoundError, resolve

        try:
            from transformers import CLIPModel, CLIPTokenizer
        except ImportError as e:
            raise ImportError("CLIP losses need transformers: pip install 'lossguide[clip]'") from e
        src, local_only = resolve(name_or_path)
        try:
            model = CLIPModel.from_pretrained(src, local_files_only=local_only, **hf_dtype_kwargs(dtype))
            tok = CLIPTokenizer.from_pretrained(src, local_files_only=local_only)
        except (OSError, ValueError) as e:
            raise ModelNotFoundError(
                f"cannot load CLIP {name_or_path!r} ({e.__class__.__name__}); download it once with "
                f"`huggingface-cli download {name_or_path}` on a machine with network access, or pass a local folder "
                "holding config.json, the weights, vocab.json and merges.txt"
            ) from e
        return cls(model.to(device), tok)

    def image_embeds(self, x: torch.Tensor, hidden_layer: int | None = None):
        """Projected image embedding e_img(x) [B, D] (unnormalised); with ``hidden_layer``, also that
        layer's patch tokens [B, N, W] (the class token dropped)."""
        px = self.preprocess(x).to(_net_dtype(self.model, x))
        out = self.model.vision_model(pixel_values=px, output_hidden_states=hidden_layer is not None)
        emb = self.model.visual_projection(out.pooler_output)
        if hidden_layer is None:
            return emb
        return emb, out.hidden_states[hidden_layer][:, 1:]

    def text_embeds(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Projected text embedding e_txt [N, D] (unnormalised), without gradients."""
        if self.tokenizer is None:
            raise ValueError(
                "this CLIP has no tokenizer: pass tokenizer=CLIPTokenizer.from_pretrained(...) or text_embeds"
            )
        texts = [texts] if isinstance(texts, str) else list(texts)
        device = next(self.model.parameters()).device
        max_len = self.model.config.text_config.max_position_embeddings
        tok = self.tokenizer(texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
        ids = tok["input_ids"].to(device)
        mask = tok.get("attention_mask")
        mask = None if mask is None else mask[:, : ids.shape[1]].to(device)
        with torch.no_grad():
            out = self.model.text_model(input_ids=ids, attention_mask=mask)
            return self.model.text_projection(out.pooler_output)


def _embedding_distance(e: torch.Tensor, ref: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-sample distance: ``"cosine"`` 1 − cos(e, ref) or ``"l2"`` ‖e − ref‖₂ (unnormalised)."""
    ref = ref.to(e)
    if ref.shape[0] not in (1, e.shape[0]):
        n = e.shape[0]
        if n % ref.shape[0]:
            raise ValueError(f"{ref.shape[0]} references for {n} inputs; pass one, or one per sample")
        ref = ref.repeat_interleave(n // ref.shape[0], dim=0)  # augmented copies of sample b inherit ref b
    if metric == "cosine":
        return 1 - F.cosine_similarity(e.float(), ref.float(), dim=-1)
    if metric == "l2":
        return (e.float() - ref.float()).norm(dim=-1)
    raise ValueError(f"unknown metric {metric!r}; choose 'cosine' (normalised embeddings) or 'l2' (the paper's)")


class CLIPTextLoss:
    """Text guidance: 1 − cos(e_img(x0), e_txt) (``metric="cosine"``, the paper's ImageNet task) or
    ‖e_img − e_txt‖₂ of unnormalised embeddings (``metric="l2"``, its CelebA-HQ text task, after FreeDoM).

    ``text`` is one prompt or one per sample; ``text_embeds`` [1 or B, D] skips the tokenizer.
    """

    def __init__(self, clip: CLIP, text: str | Sequence[str] | None = None, *, text_embeds=None, metric="cosine"):
        if (text is None) == (text_embeds is None):
            raise ValueError("pass exactly one of text='...' or text_embeds=tensor [1 or B, D]")
        self.clip = clip
        self.metric = metric
        self.target = clip.text_embeds(text) if text_embeds is None else torch.as_tensor(text_embeds).detach()
        _embedding_distance(self.target[:1], self.target[:1], metric)  # validate the metric now

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return _embedding_distance(self.clip.image_embeds(x0), self.target, self.metric).to(x0.dtype)


class CLIPImageLoss:
    """Image guidance: the same distances as :class:`CLIPTextLoss` to a reference image's embedding."""

    def __init__(self, clip: CLIP, reference: torch.Tensor, metric: str = "cosine"):
        self.clip = clip
        self.metric = metric
        with torch.no_grad():
            self.target = clip.image_embeds(_as_images(reference))
        _embedding_distance(self.target[:1], self.target[:1], metric)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return _embedding_distance(self.clip.image_embeds(x0), self.target, self.metric).to(x0.dtype)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix G = FᵀF / N of patch features F [B, N, W] (Gatys et al. 2016, eq. 3, as in FreeDoM's style)."""
    f = features.float()
    return f.transpose(1, 2) @ f / f.shape[1]


class CLIPStyleLoss:
    """Style guidance: ‖G(x0) − G(ref)‖²_F of Gram matrices of CLIP patch features at ``layer``
    (a hidden-state index of the vision tower; default the third from last)."""

    def __init__(self, clip: CLIP, style_image: torch.Tensor, layer: int = -3):
        self.clip = clip
        self.layer = layer
        with torch.no_grad():
            _, feats = clip.image_embeds(_as_images(style_image), hidden_layer=layer)
            self.target = gram(feats)[:1]

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        _, feats = self.clip.image_embeds(x0, hidden_layer=self.layer)
        return (gram(feats) - self.target.to(feats.device)).pow(2).flatten(1).sum(1).to(x0.dtype)


def clip_similarity(clip: CLIP, x0: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """cos(e_img(x0), e) per sample [B], without gradients (e: text or image embeddings, [1 or B, D])."""
    with torch.no_grad():
        return 1 - _embedding_distance(clip.image_embeds(x0), embeds, "cosine")


# -- any network -------------------------------------------------------------------------------------
class ClassifierLoss:
    """−log p(y | x0) under any classifier (torchvision, timm, transformers: a tensor or ``.logits``),
    with its input :class:`Preprocess` (default: ImageNet normalisation at the input size).

    ``target`` is one class for every sample or one per sample (augmented copies inherit their sample's).
    """

    def __init__(self, classifier: torch.nn.Module, target: int | Sequence[int], preprocess: Preprocess | None = None):
        self.classifier = freeze(classifier)
        self.target = torch.as_tensor(target).long().view(-1)
        self.preprocess = preprocess or Preprocess()

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x0).to(_net_dtype(self.classifier, x0))
        logits = _logits(self.classifier(x)).float()
        n, k = len(x0), len(self.target)
        if n % k:
            raise ValueError(f"{k} targets for {n} inputs; pass one target per sample or a single class")
        y = self.target.to(logits.device).repeat_interleave(n // k)
        return F.cross_entropy(logits, y, reduction="none").to(x0.dtype)


class FeatureMatchLoss:
    """‖f(x0) − f(ref)‖² summed over features: segmentation (the paper's face parsing: the logits of a
    parsing network), sketch or any feature network ``f`` (a tensor or ``.logits`` output).

    Pass a reference image (its features are computed once) or ``target`` features directly.
    ``expected_size`` is the reference's (H, W): a latent model checks its decoded size against it.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        reference: torch.Tensor | None = None,
        *,
        target: torch.Tensor | None = None,
        preprocess: Preprocess | None = None,
    ):
        if (reference is None) == (target is None):
            raise ValueError("pass exactly one of reference=image [C, H, W] or target=features")
        self.net = freeze(net)
        self.preprocess = preprocess or Preprocess()
        self.expected_size = None
        if reference is not None:
            reference = _as_images(reference)
            if self.preprocess.size is None:
                self.expected_size = tuple(reference.shape[-2:])
            with torch.no_grad():
                target = self.features(reference)
        self.target = torch.as_tensor(target).detach()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.net(self.preprocess(x).to(_net_dtype(self.net, x)))).float()

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        f = self.features(x0)
        if f.shape[1:] != self.target.shape[1:]:
            raise ValueError(
                f"features of x0 have shape {tuple(f.shape[1:])} but the reference's have "
                f"{tuple(self.target.shape[1:])}; give the reference the samples' size or set Preprocess(size=...)"
            )
        return (f - self.target.to(f.device)).pow(2).flatten(1).sum(1).to(x0.dtype)


class IdentityLoss:
    """Face identity: 1 − cos(e(x0), e(ref)) (``"cosine"``, ArcFace-style) or ‖e(x0) − e(ref)‖₂ for any
    embedding network ``e`` (an ArcFace/FaceNet torch module), with its input :class:`Preprocess`."""

    def __init__(
        self, embed: torch.nn.Module, reference: torch.Tensor, preprocess: Preprocess | None = None, metric="cosine"
    ):
        self.embed = freeze(embed)
        self.preprocess = preprocess or Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.metric = metric
        with torch.no_grad():
            self.target = self.embeddings(_as_images(reference))
        _embedding_distance(self.target[:1], self.target[:1], metric)

    def embeddings(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.embed(self.preprocess(x).to(_net_dtype(self.embed, x)))).flatten(1)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        return _embedding_distance(self.embeddings(x0), self.target, self.metric).to(x0.dtype)
