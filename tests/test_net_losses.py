"""Losses with networks on tiny random networks: CLIP (transformers CLIPModel and CLIPTokenizer built
locally), any classifier, feature matching and identity; values, gradients and guided sampling."""

import json
import time

import pytest
import torch

import lossguide as lg
from lossguide import net_losses as nl
from lossguide.models import ModelNotFoundError

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
diffusers = pytest.importorskip("diffusers")

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "face", "smiling", "person"]


def tiny_clip_folder(folder) -> str:
    """A random CLIPModel (32² images, 8² patches) and a CLIPTokenizer with a 10-word vocabulary, saved
    as a from_pretrained folder."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in WORDS:
        vocab[w + "</w>"] = len(vocab)
    for c in sorted(set("".join(WORDS))):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return nl.CLIP.from_pretrained(tiny_clip_folder(tmp_path_factory.mktemp("clip")))


def _images(n=2, size=24, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _descend(loss, x, lr, steps=10):
    x = x.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(loss(x).sum(), x)
        x = (x - lr * g).detach()
    return x


def test_preprocess_maps_range_resizes_and_normalises():
    p = nl.Preprocess(size=8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    y = p(torch.zeros(2, 3, 16, 16))  # 0 in [−1, 1] is 0.5 in [0, 1]
    assert y.shape == (2, 3, 8, 8)
    torch.testing.assert_close(y[:, :, 0, 0], torch.tensor([[0.0, 1.0, 0.5]] * 2))
    with pytest.raises(ValueError, match="3 channels but the images have 1"):
        p(torch.zeros(1, 1, 8, 8))


def test_clip_loads_from_a_folder_and_embeds(clip):
    e = clip.text_embeds(["a photo of a cat", "a red dog"])
    assert e.shape == (2, 16) and not torch.allclose(e[0], e[1])
    x = _images()
    assert clip.image_embeds(x).shape == (2, 16)
    # the preprocessing resizes to the vision tower's 32²: any input size works
    assert clip.image_embeds(_images(size=40)).shape == (2, 16)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_clip_text_loss_descends_and_raises_the_clip_score(clip, metric):
    loss = nl.CLIPTextLoss(clip, "a smiling face", metric=metric)
    x = _images()
    before = loss(x)
    assert before.shape == (2,)
    lr = 3.0 if metric == "cosine" else 0.5
    x2 = _descend(loss, x, lr)
    assert (loss(x2) < before).all()
    target = clip.text_embeds("a smiling face")
    assert (nl.clip_similarity(clip, x2, target) > nl.clip_similarity(clip, x, target)).all()
    # the cosine loss is 1 − cos; precomputed embeddings give the same value
    same = nl.CLIPTextLoss(clip, text_embeds=target, metric=metric)
    torch.testing.assert_close(same(x), before)
    if metric == "l2":
        torch.testing.assert_close(before, (clip.image_embeds(x) - target).norm(dim=-1))


def test_clip_image_and_style_losses_are_zero_at_the_reference_and_descend(clip):
    ref = _images(1, seed=5)[0]
    for loss, lr in [(nl.CLIPImageLoss(clip, ref), 3.0), (nl.CLIPStyleLoss(clip, ref), 3.0)]:
        assert float(loss(ref.unsqueeze(0))[0]) == pytest.approx(0.0, abs=1e-5)
        x = _images()
        assert (loss(_descend(loss, x, lr / max(float(loss(x).max()), 1e-6))) < loss(x)).all()


def test_guided_sampling_with_clip_raises_the_clip_similarity(clip):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )  # fmt: skip
    den = lg.from_diffusers(unet, diffusers.DDPMScheduler(clip_sample=False))
    sampler = lg.DDIM(den.schedule, 10)
    target = clip.text_embeds("a photo of a dog")
    loss = nl.CLIPTextLoss(clip, text_embeds=target)
    seeds = range(3)
    base = nl.clip_similarity(clip, lg.sample(den, sampler, shape=(3, 16, 16), seeds=seeds).x0, target)
    # (DiffAugment copies, n_aug > 0, help a trained CLIP; on this random 32² CLIP they mostly cancel out)
    presets = [("freedom", dict(scale=20.0)), ("shen2024", dict(eta=1.0, n_aug=0, n_recur=2)),
               ("ugd", dict(scale=5.0)), ("lgd_mc", dict(scale=20.0, n_mc=2))]  # fmt: skip
    for name, params in presets:
        res = lg.sample(den, sampler, lg.preset(name, **params), loss, shape=(3, 16, 16), seeds=seeds)
        got = nl.clip_similarity(clip, res.x0, target)
        assert (got > base).all(), (name, got, base)


def test_clip_from_a_missing_hub_id_is_a_clear_error_within_seconds(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download"):
        nl.CLIP.from_pretrained("openai/clip-vit-base-patch16")
    assert time.time() - t0 < 5


class _HFStyle(torch.nn.Module):
    """A classifier returning an object with ``.logits`` (as transformers models do)."""

    def __init__(self, n_out=5, pool=4):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, n_out, 3, padding=1)
        self.pool = pool

    def forward(self, x):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.nn.functional.adaptive_avg_pool2d(self.conv(x), self.pool).mean((2, 3)))


def test_classifier_loss_is_the_cross_entropy_after_preprocessing():
    net = _HFStyle()
    pre = nl.Preprocess(size=12)
    loss = nl.ClassifierLoss(net, target=[1, 3], preprocess=pre)
    x = _images()
    want = torch.nn.functional.cross_entropy(net(pre(x)).logits, torch.tensor([1, 3]), reduction="none")
    torch.testing.assert_close(loss(x), want)
    assert all(not p.requires_grad for p in net.parameters()) and not net.training
    assert (loss(_descend(loss, x, 1.0)) < loss(x)).all()


class _Seg(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_feature_match_loss_zero_at_reference_and_clear_size_error():
    ref = _images(1, size=16, seed=3)[0]
    loss = nl.FeatureMatchLoss(_Seg(), ref)
    assert loss.expected_size == (16, 16)
    assert float(loss(ref.unsqueeze(0))[0]) == pytest.approx(0.0, abs=1e-6)
    x = _images(2, size=16)
    assert (loss(x) > 0).all() and (loss(_descend(loss, x, 0.01)) < loss(x)).all()
    with pytest.raises(ValueError, match=r"\(4, 8, 8\) but the reference's have \(4, 16, 16\)"):
        loss(_images(2, size=8))
    resized = nl.FeatureMatchLoss(_Seg(), ref, preprocess=nl.Preprocess(size=16))
    assert resized.expected_size is None and resized(_images(2, size=8)).shape == (2,)


def test_identity_loss_cosine_between_embeddings():
    embed = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2), torch.nn.Flatten())
    ref = _images(1, size=16, seed=4)[0]
    loss = nl.IdentityLoss(embed, ref, preprocess=nl.Preprocess(size=16, mean=None, std=None))
    assert float(loss(ref.unsqueeze(0))[0]) == pytest.approx(0.0, abs=1e-6)
    x = _images(2, size=16)
    e, r = embed((x + 1) / 2), embed((ref.unsqueeze(0) + 1) / 2)
    torch.testing.assert_close(loss(x), 1 - torch.nn.functional.cosine_similarity(e, r))
    with pytest.raises(ValueError, match="unknown metric"):
        nl.IdentityLoss(embed, ref, metric="l1")
