"""Judging two-digit canvases half by half: the judge's class of each 28×28 half, an empty half read as
:data:`~lossguide.data.canvas.BLANK`, and the quality of a set of canvases against its conditions.

A half is empty when its ink (:func:`ink`: Σ (x + 1)/2 over its pixels brighter than x = −0.5) is below
:data:`BLANK_INK` = 10, a third of the least ink of any of the 1,000 held-out MNIST digits (29.7; median 97.5);
background noise of std 0.1 adds no ink.
"""

from __future__ import annotations

import time

import torch

from lossguide import metrics
from lossguide.data.canvas import BLANK, DIGIT
from lossguide.layout.losses import ink_map

#: ink below which a half counts as empty
BLANK_INK = 10.0
#: samples per sampling batch
BATCH = 64


def halves(x: torch.Tensor) -> torch.Tensor:
    """[B, 2, C, 28, 28]: the left and right 28×28 halves of canvases [B, C, 28, 56]."""
    if x.ndim != 4 or tuple(x.shape[-2:]) != (DIGIT, 2 * DIGIT):
        raise ValueError(f"canvases must be [B, C, {DIGIT}, {2 * DIGIT}], got {tuple(x.shape)}")
    return torch.stack([x[..., :DIGIT], x[..., DIGIT:]], dim=1)


def ink(x: torch.Tensor) -> torch.Tensor:
    """[...]: the ink Σ ink_map(x) of images [..., C, H, W] in [−1, 1] (:func:`lossguide.layout.losses.ink_map`:
    (x + 1)/2 on pixels brighter than x = −0.5, so background noise adds none)."""
    return ink_map(x).sum(dim=(-3, -2, -1))


def judge_halves(judge: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes [B, 2], probabilities [B, 2, 10]) of the judge on each half; an empty half's class is BLANK."""
    h = halves(x.clamp(-1, 1))
    B = h.shape[0]
    p = metrics.classify(judge, h.flatten(0, 1)).view(B, 2, -1)
    classes = torch.where(ink(h).to(p.device) < BLANK_INK, BLANK, p.argmax(-1))
    return classes.cpu(), p.cpu()


def styled_features(kit, style) -> torch.Tensor:
    """The judge's features of the held-out digits in ``style`` (cached on the kit, per style)."""
    cache = kit.__dict__.setdefault("_styled_features", {})
    if style not in cache:
        cache[style] = metrics.features(kit.nets["judge"], style(kit.real_x))
    return cache[style]


def fid_floor(kit, n: int, seeds=range(5), style=None) -> list[float]:
    """FIDs of n real digits of the ``gen`` split (which the held-out reference does not contain), drawn at random
    once per seed, against the 1,000 held-out digits: what FID reads for real digits at this sample size, the
    floor under which FID differences are noise. With ``style`` (a transform such as
    :func:`lossguide.data.styles.thicken`), both sets are in that style."""
    from lossguide.data import load_mnist

    x, _ = load_mnist("gen")
    x = x.to(kit.device) if style is None else style(x.to(kit.device))
    f = metrics.features(kit.nets["judge"], x)
    out = []
    for s in seeds:
        idx = torch.randperm(len(f), generator=torch.Generator().manual_seed(int(s)))[:n]
        if style is None:
            out.append(kit.feature_fid_kid(f[idx])["fid"])
        else:
            out.append(metrics.frechet_distance(f[idx], styled_features(kit, style)))
    return out


def canvas_quality(kit, x: torch.Tensor, tokens: torch.Tensor, fid: bool = True, style=None) -> dict:
    """Judge validity of canvases ``x`` under conditions ``tokens`` [B, 2] (both halves right, per half, and per
    kind of half), the judge's mean p(class) on the digit halves, and FID/KID of the digit halves on the judge's
    features against the held-out digits (``kit``: a :class:`~lossguide.harness.tasks.mnist.MnistKit`), or
    against the held-out digits in ``style`` (a transform such as :func:`lossguide.data.styles.thicken`)."""
    tokens = torch.as_tensor(tokens).long().cpu()
    if tokens.shape != (x.shape[0], 2):
        raise ValueError(f"tokens must be [{x.shape[0]}, 2], got {tuple(tokens.shape)}")
    classes, p = judge_halves(kit.nets["judge"], x)
    ok = classes == tokens
    digit = tokens != BLANK
    row = {
        "n": len(x),
        "validity": float(ok.all(1).double().mean()),
        "half_validity": float(ok.double().mean()),
        "digit_half_validity": float(ok[digit].double().mean()) if digit.any() else float("nan"),
        "blank_half_validity": float(ok[~digit].double().mean()) if (~digit).any() else float("nan"),
    }
    if digit.any():
        row["judge_p_class"] = float(p[digit].gather(-1, tokens[digit][:, None]).mean())
        if fid:
            f = metrics.features(kit.nets["judge"], halves(x.clamp(-1, 1))[digit].to(kit.device))
            if style is None:
                row.update(kit.feature_fid_kid(f))
            else:
                real = styled_features(kit, style)
                kid, kid_std = metrics.kernel_inception_distance(f, real, n_subsets=50, seed=0)
                row.update({"fid": metrics.frechet_distance(f, real), "kid_x1e3": 1e3 * kid,
                            "kid_std_x1e3": 1e3 * kid_std})  # fmt: skip
    return row


def eval_conditions(seeds) -> torch.Tensor:
    """tokens [B, 2] of the evaluation set: seed s asks for (s mod 11, ⌊s/11⌋ mod 11), 10 = blank, so seeds
    0–120 hold every pair of two halves (blank ones included) once."""
    return torch.tensor([[s % 11, (s // 11) % 11] for s in seeds], dtype=torch.long)


def generate(model, tokens: torch.Tensor, seeds, steps: int = 25, w: float = 1.0, guide=None, batch: int = BATCH,
             control=None) -> tuple[torch.Tensor, float]:  # fmt: skip
    """(canvases [B, 1, 28, 56] in [−1, 1], wall seconds): DDIM-``steps`` (η = 0) of ``model`` (a
    :class:`~lossguide.layout.CondDigitModel`) under ``tokens`` with classifier-free guidance at ``w``: two
    UNet passes per step, or one with a distilled ``guide`` (:func:`lossguide.layout.distill.guided_denoiser`)."""
    from lossguide.samplers import DDIM
    from lossguide.sampling import sample

    seeds, xs = list(seeds), []
    if not seeds or len(tokens) != len(seeds):
        raise ValueError(f"need one condition per seed and at least one seed, got {len(tokens)} for {len(seeds)}")
    t0 = time.perf_counter()
    for b in range(0, len(seeds), batch):
        part = seeds[b : b + batch]
        tok = tokens[b : b + batch]
        if guide is None:
            den = model.denoiser(tok, w, control=control)
        else:
            from lossguide.layout.distill import guided_denoiser

            den = guided_denoiser(model, guide, tok, w, control=control)
        res = sample(den, DDIM(den.schedule, steps), shape=model.sample_shape, seeds=part)
        xs.append(res.x0.detach().clamp(-1, 1))
    return torch.cat(xs), time.perf_counter() - t0
