"""Real-checkpoint code paths on tiny random models of the same classes (as diffusers' own tests do):
pixel UNet2DModel folders in every prediction type and dtype with every preset, and a Stable-Diffusion
stack (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer) with classifier-free guidance,
a loss on the VAE-decoded x0_hat, gradient checkpointing and clear errors."""

import json
import math
import time
from pathlib import Path

import pytest
import torch

import lossguide as lg
from lossguide import losses, recipes
from lossguide.augment import GaussianJitter
from lossguide.latent import DecodedLoss, LatentStack, load_stable_diffusion
from lossguide.models import ModelNotFoundError, load_denoiser

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()


def _target_loss(x0):
    return (x0 - 0.5).pow(2).flatten(1).mean(1)


# -- pixel models --------------------------------------------------------------------------------------
def _pixel_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pixel_folders(tmp_path_factory):
    """Pipeline-layout folders (unet/, scheduler/) per prediction type, and one bare model folder
    (config.json + scheduler_config.json at the root, the layout of google/ddpm-ema-celebahq-256)."""
    root = tmp_path_factory.mktemp("pixel")
    unet = _pixel_unet()
    out = {}
    for pred in ("epsilon", "v_prediction", "sample"):
        unet.save_pretrained(root / pred / "unet")
        diffusers.DDPMScheduler(prediction_type=pred, clip_sample=False).save_pretrained(root / pred / "scheduler")
        out[pred] = str(root / pred)
    unet.save_pretrained(root / "bare")
    diffusers.DDPMScheduler(clip_sample=True).save_pretrained(root / "bare")  # as the google/ddpm-* repos ship
    out["bare"] = str(root / "bare")
    return out


# Step sizes for this random tiny UNet and _target_loss, per prediction type (a random network's
# Jacobian differs per parametrisation). Augmentation is Gaussian jitter: DiffAugment's colour shifts and
# cutout change a pixel-value target's minimiser. For x0-prediction the random x0_hat barely depends on
# x_t, so presets that only step through the denoiser (freedom, dps, lgd_mc) are run but not asserted.
_JIT = dict(n_aug=2, augment=GaussianJitter(0.05))
PIXEL_PRESETS = {
    "epsilon": {
        "freedom": dict(scale=2.0), "dps": dict(scale=1.0), "ugd": dict(scale=0.05, backward_scale=2.0),
        "lgd_mc": dict(scale=0.3, n_mc=2), "mpgd": dict(scale=2.0), "tfg": dict(rho=0.3, mu=0.3, n_iter=1),
        "shen2024": dict(polyak=False, scale=2.0, n_recur=2, **_JIT),
    },
    "v_prediction": {
        "freedom": dict(scale=5.0), "dps": dict(scale=1.0), "ugd": dict(scale=0.05, backward_scale=2.0),
        "lgd_mc": dict(scale=5.0, n_mc=2), "mpgd": dict(scale=5.0), "tfg": dict(rho=3.0, mu=3.0, n_iter=1),
        "shen2024": dict(eta=0.03, n_recur=2, **_JIT),  # the paper's Polyak rule is inversely scaled in ℓ
    },
    "sample": {
        "ugd": dict(scale=0.5, backward_scale=5.0), "mpgd": dict(scale=5.0), "tfg": dict(rho=3.0, mu=3.0, n_iter=1),
        "shen2024": dict(eta=0.3, n_aug=0, n_recur=1), "freedom": None, "dps": None, "lgd_mc": None,
    },
}  # fmt: skip


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_every_preset_guides_a_pixel_unet_in_every_prediction_type(pixel_folders, pred):
    m = load_denoiser(pixel_folders[pred])
    assert m.sample_shape == (3, 8, 8) and m.denoiser.prediction_type == pred
    sampler = lg.DDIM(m.denoiser.schedule, 6)
    seeds = range(2)
    base = _target_loss(lg.sample(m.denoiser, sampler, shape=m.sample_shape, seeds=seeds).x0)
    for name, params in PIXEL_PRESETS[pred].items():
        guide = lg.preset(name, **(params or {}))
        res = lg.sample(m.denoiser, sampler, guide, _target_loss, shape=m.sample_shape, seeds=seeds)
        assert torch.isfinite(res.x0).all() and int(res.stats.skipped.sum()) == 0
        if params is not None:
            assert (_target_loss(res.x0) < base).all(), (pred, name, _target_loss(res.x0), base)
    # classifier guidance takes a noise-aware loss ℓ(x_t, t): here the same target on x_t
    res = lg.sample(
        m.denoiser,
        sampler,
        lg.preset("cg", scale=2.0),
        lambda x, t: _target_loss(x),
        shape=m.sample_shape,
        seeds=seeds,
    )
    assert torch.isfinite(res.x0).all()


def test_bare_model_folder_loads_like_the_google_ddpm_repos(pixel_folders):
    m = load_denoiser(pixel_folders["bare"])
    ref = load_denoiser(pixel_folders["epsilon"])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(m.denoiser(x, 500).x0_hat, ref.denoiser(x, 500).x0_hat)
    # the scheduler's clip_sample=True is ignored: lossguide's DDIM never clamps x0_hat
    res = lg.sample(m.denoiser, lg.DDIM(m.denoiser.schedule, 4), lg.preset("freedom", scale=2.0), _target_loss,
                    shape=m.sample_shape, seeds=[0])  # fmt: skip
    assert torch.isfinite(res.x0).all()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_weights_pure_and_mixed(pixel_folders, dtype):
    folder = pixel_folders["v_prediction"]
    ref = load_denoiser(folder)
    sampler = lg.DDIM(ref.denoiser.schedule, 6)
    g = lg.preset("freedom", scale=2.0)
    want = lg.sample(ref.denoiser, sampler, g, _target_loss, shape=(3, 8, 8), seeds=range(2)).x0
    half = load_denoiser(folder, dtype=dtype)
    tdt = half.denoiser.dtype
    assert tdt == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    with pytest.raises(TypeError, match="pass dtype="):
        lg.sample(half.denoiser, sampler, g, _target_loss, shape=(3, 8, 8), seeds=range(2))
    pure = lg.sample(half.denoiser, sampler, g, _target_loss, shape=(3, 8, 8), seeds=range(2), dtype=tdt).x0
    mixed_m = load_denoiser(folder, dtype=dtype, state_dtype="fp32")
    mixed = lg.sample(mixed_m.denoiser, sampler, g, _target_loss, shape=(3, 8, 8), seeds=range(2)).x0
    assert pure.dtype == tdt and mixed.dtype == torch.float32
    tol = 0.1 if dtype == "bf16" else 0.02  # bf16 keeps 8 bits of mantissa
    assert (pure.float() - want).abs().max() < tol
    assert (mixed - want).abs().max() < tol
    assert (mixed - want).abs().max() <= (pure.float() - want).abs().max() + 1e-3


# -- latent models -------------------------------------------------------------------------------------
def _tiny_tokenizer(folder):
    words = ["a", "photo", "of", "cat", "dog", "face", "smiling"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in words:
        vocab[w + "</w>"] = len(vocab)
    for c in sorted(set("".join(words))):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=12)


def _tiny_stack(folder, prediction_type="epsilon") -> LatentStack:
    """A Stable-Diffusion-shaped stack with random weights: 8×8×4 latents decode to 16×16 RGB (VAE factor 2)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16,
    )  # fmt: skip
    tok = _tiny_tokenizer(folder / "tokenizer")
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )  # fmt: skip
    sched = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )  # fmt: skip
    return LatentStack(unet, vae, sched, text, tok)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    s = _tiny_stack(root)
    s.unet.save_pretrained(root / "unet")
    s.vae.save_pretrained(root / "vae")
    s.text_encoder.save_pretrained(root / "text_encoder")
    s.scheduler.save_pretrained(root / "scheduler")
    s.tokenizer.save_pretrained(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def stack(sd_folder):
    return load_stable_diffusion(str(sd_folder))


def test_classifier_free_guidance_scale_is_a_parameter(stack):
    cond = stack.encode_prompt("a photo of a cat")
    null = stack.encode_prompt("")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = 500
    tt = torch.full((2,), t)
    with torch.no_grad():
        e_c = stack.unet(z, tt, encoder_hidden_states=cond.expand(2, -1, -1)).sample
        e_u = stack.unet(z, tt, encoder_hidden_states=null.expand(2, -1, -1)).sample
        for w in (1.0, 3.0, 7.5):
            got = stack.denoiser(cond, guidance_scale=w)(z, t).eps
            torch.testing.assert_close(got, e_u + w * (e_c - e_u), rtol=1e-4, atol=1e-5)


def test_latent_guided_sampling_with_several_presets_lowers_the_decoded_loss(stack):
    cond = stack.encode_prompt("a smiling face")
    den = stack.denoiser(cond, guidance_scale=3.0)
    loss = stack.loss(_target_loss)
    sampler = lg.DDIM(den.schedule, 6, steps_offset=1)
    shape = stack.latent_shape(16, 16)
    assert shape == (4, 8, 8)
    seeds = range(2)
    base = loss(lg.sample(den, sampler, shape=shape, seeds=seeds).x0)
    for name, params in [("freedom", dict(scale=20.0)), ("dps", dict(scale=2.0)), ("mpgd", dict(scale=20.0)),
                         ("shen2024", dict(eta=0.3, n_aug=0, n_recur=2))]:  # fmt: skip
        res = lg.sample(den, sampler, lg.preset(name, **params), loss, shape=shape, seeds=seeds)
        with torch.no_grad():
            got = loss(res.x0)
        assert (got < base).all(), (name, got, base)


def test_gradient_checkpointing_gives_the_same_gradient(sd_folder):
    stack = load_stable_diffusion(str(sd_folder))
    den = stack.denoiser(stack.encode_prompt("a dog"), guidance_scale=2.0)
    loss = stack.loss(_target_loss)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def grad():
        x = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(den(x, 400).x0_hat).sum(), x)
        return g

    plain = grad()
    stack.enable_gradient_checkpointing(unet=True, vae=True)
    assert stack.unet.is_gradient_checkpointing and stack.vae.is_gradient_checkpointing
    ckpt = grad()
    assert plain.abs().max() > 0
    torch.testing.assert_close(ckpt, plain, rtol=1e-4, atol=1e-6)


def test_decode_scale_and_autocast(stack):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    half = DecodedLoss(stack.vae, _target_loss, decode_scale=0.5)
    assert half.decode(z).shape == (2, 3, 8, 8)
    bf = DecodedLoss(stack.vae, _target_loss, autocast_dtype=torch.bfloat16)
    full = DecodedLoss(stack.vae, _target_loss)
    L_bf, L = bf(z), full(z)
    assert L_bf.dtype == torch.float32 and (L_bf - L).abs().max() < 0.05 * L.abs().max()
    (g,) = torch.autograd.grad(L_bf.sum(), z)
    assert torch.isfinite(g).all() and g.abs().max() > 0


def test_wrong_size_pixel_loss_is_a_clear_error(stack):
    ref = torch.zeros(3, 64, 64)
    loss = stack.loss(losses.SketchLoss(ref))
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"expects 64×64 images but 8×8 latents decode to 16×16"):
        loss(z)
    with pytest.raises(ValueError, match="decode to 8×8"):
        stack.loss(losses.SketchLoss(torch.zeros(3, 16, 16)), decode_scale=0.5)(z)
    assert stack.loss(losses.SketchLoss(torch.zeros(3, 16, 16)))(z).shape == (1,)
    with pytest.raises(ValueError, match="3 channels but the VAE's latents have 4"):
        loss(torch.randn(1, 3, 64, 64))  # a pixel image handed to the latent loss
    with pytest.raises(ValueError, match="not a multiple of the VAE factor 2"):
        stack.latent_shape(15, 16)


def test_missing_stable_diffusion_is_a_clear_error_within_seconds(tmp_path, monkeypatch):
    t0 = time.time()
    with pytest.raises(ModelNotFoundError, match="unet/, vae/, text_encoder/, tokenizer/ and scheduler/"):
        load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match="as a Stable Diffusion pipeline"):
        load_stable_diffusion(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the 3-second hub probe, then the local cache
    with pytest.raises(ModelNotFoundError, match="not reachable"):
        load_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert time.time() - t0 < 10


# -- recipes -------------------------------------------------------------------------------------------
RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path):
    r = recipes.load(path)
    assert r["name"] == path.stem and r["model"]["kind"] in ("pixel", "latent")
    assert r["sampler"]["steps"] in (50, 100, 1000)  # 1000: DPS's DDPM


def test_recipe_errors_name_the_fix(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: {kind: pixel, path: x}\nloss: {kind: clip_text, text: a face}\nmethod: freedom\nparams: {eta: 1}\n")
    with pytest.raises(ValueError, match="method 'freedom' has no parameter 'eta'"):
        recipes.load(f)
    f.write_text("model: {kind: pixel, path: x, prompt: y}\nloss: {kind: none}\n")
    with pytest.raises(ValueError, match=r"pixel model has no keys \['prompt'\]"):
        recipes.load(f)


def test_recipe_writes_nothing_before_its_models_load_and_refuses_its_own_config_yaml(tmp_path):
    from lossguide.models import ModelNotFoundError

    f = tmp_path / "r.yaml"
    f.write_text("model: {kind: pixel, path: no-such-model}\nloss: {kind: none}\nmethod: none\ndevice: cpu\n")
    with pytest.raises(ModelNotFoundError):
        recipes.run(f, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # config.yaml only after everything is built
    f.write_text(f.read_text() + "guidance: {name: none}\n")  # what a recipe run writes to its config.yaml
    with pytest.raises(ValueError, match="is the config.yaml a recipe run wrote .* rerun the recipe file"):
        recipes.load(f)


def _write_recipe(folder, model: str, extra_model: str = "") -> Path:
    f = folder / "r.yaml"
    f.write_text(
        f"name: tiny\nmodel: {{kind: {model}, path: model{extra_model}}}\n"
        "loss: {kind: clip_text, clip: clip, text: a photo of a dog, metric: l2}\n"
        "method: freedom\nparams: {scale: 2.0}\nsampler: {steps: 4, eta: 1.0}\nseeds: 0-2\nbatch: 2\ndevice: cpu\n"
    )
    return f


def test_pixel_recipe_runs_from_the_cli_and_resumes(tmp_path, pixel_folders, monkeypatch):
    import shutil

    from test_net_losses import tiny_clip_folder

    from lossguide.cli import main

    shutil.copytree(pixel_folders["epsilon"], tmp_path / "model")
    (tmp_path / "clip").mkdir()
    tiny_clip_folder(tmp_path / "clip")
    f = _write_recipe(tmp_path, "pixel")
    out = tmp_path / "run"
    assert main(["sample", "--config", str(f), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_samples"] == 3 and m["nfe"] == 4 and m["denoiser_grads"] == 4
    assert all(math.isfinite(r["loss"]) for r in m["per_sample"])
    assert {p.name for p in out.glob("*.png")} == {"000000.png", "000001.png", "000002.png", "grid.png"}
    assert "guidance:" in (out / "config.yaml").read_text()
    monkeypatch.setattr(recipes, "build", lambda r: pytest.fail("a finished run must not load models again"))
    assert main(["sample", "--config", str(f), "--out", str(out), "--quiet"]) == 0
    f.write_text(f.read_text().replace("scale: 2.0", "scale: 3.0"))
    assert main(["sample", "--config", str(f), "--out", str(out), "--quiet"]) == 2  # a different config: refused


def test_latent_recipe_runs_with_cfg_and_a_decoded_clip_loss(tmp_path, sd_folder):
    import shutil

    from test_net_losses import tiny_clip_folder

    shutil.copytree(sd_folder, tmp_path / "model")
    (tmp_path / "clip").mkdir()
    tiny_clip_folder(tmp_path / "clip")
    extra = ", prompt: a cat, cfg_scale: 3.0, height: 16, width: 16, gradient_checkpointing: true, autocast: bf16"
    f = _write_recipe(tmp_path, "latent", extra)  # shen2024 with |T| = 2 copies of the decoded image
    f.write_text(
        f.read_text().replace(
            "method: freedom\nparams: {scale: 2.0}", "method: shen2024\nparams: {eta: 0.3, n_aug: 2, n_recur: 1}"
        )
    )
    assert "n_aug: 2" in f.read_text()
    m = recipes.run(f, tmp_path / "run", progress=False)
    assert m["n_samples"] == 3 and m["nfe"] == 4
    from PIL import Image

    assert Image.open(tmp_path / "run" / "000000.png").size == (16, 16)


def test_decode_then_augment_decodes_once_and_augments_pixels(stack):
    from lossguide.augment import DiffAugment
    from lossguide.latent import DecodeThenAugment
    from lossguide.rng import make_generators

    loss = stack.loss(_target_loss)
    aug = DecodeThenAugment(loss, DiffAugment())
    calls = []
    decode = stack.vae.decode
    stack.vae.decode = lambda z: (calls.append(z.shape[0]), decode(z))[1]
    try:
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        x = aug(z, make_generators([0, 1]), 3)
        assert x.shape == (6, 3, 16, 16) and calls == [2]  # one decode of the batch, 3 pixel copies each
        want = DiffAugment()(loss.decode(z), make_generators([0, 1]), 3)
        torch.testing.assert_close(loss(x), _target_loss(want))
        den = stack.denoiser(stack.encode_prompt("a cat"), guidance_scale=2.0)
        calls.clear()
        g = lg.preset("shen2024", eta=0.3, n_aug=4, n_recur=1, augment=aug)
        res = lg.sample(den, lg.DDIM(den.schedule, 3), g, loss, shape=(4, 8, 8), seeds=range(2))
        assert res.stats.loss_evals == 3 * 4 and calls == [2, 2, 2]
    finally:
        stack.vae.decode = decode


def test_segmentation_recipe_with_a_transformers_parser_and_a_reference_image(tmp_path, pixel_folders):
    """The celebahq-seg layout: a SegFormer parser (tiny, random) from a local folder, a reference PNG
    resized to the sample size, a guidance window."""
    import shutil

    from PIL import Image

    shutil.copytree(pixel_folders["epsilon"], tmp_path / "model")
    torch.manual_seed(0)
    seg = transformers.SegformerForSemanticSegmentation(
        transformers.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=19,
        )
    )  # fmt: skip
    seg.save_pretrained(tmp_path / "parser")
    rgb = (torch.rand(20, 20, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(rgb).save(tmp_path / "reference-face.png")
    f = tmp_path / "seg.yaml"
    f.write_text(
        "name: seg\nmodel: {kind: pixel, path: model}\n"
        "loss: {kind: feature_match, reference: reference-face.png,\n"
        "       network: {transformers: parser, class: SegformerForSemanticSegmentation},\n"
        "       preprocess: {size: 32, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}\n"
        "method: shen2024\nparams: {eta: 0.5, n_aug: 0, n_recur: 1}\nwindow: [0.2, 1.0]\n"
        "sampler: {steps: 5, eta: 0.5}\nseeds: 0-1\nbatch: 2\ndevice: cpu\n"
    )
    b = recipes.build(recipes.load(f))
    assert b.guidance.window == (0.2, 1.0) and b.loss.target.shape == (1, 19, 8, 8)
    m = recipes.run(f, tmp_path / "run", progress=False)
    assert m["nfe"] == 5 and m["denoiser_grads"] == 3  # t = 800, 600, 400 guided; 200 and 0 (t/T ≤ 0.2) not
    assert all(r["loss"] > 0 for r in m["per_sample"])


def test_classifier_loss_with_a_transformers_classifier():
    from lossguide.net_losses import ClassifierLoss, Preprocess

    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(
        transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, num_labels=5)
    )  # fmt: skip
    loss = ClassifierLoss(vit, target=2, preprocess=Preprocess(size=16, mean=(0.5,) * 3, std=(0.5,) * 3))
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    logits = vit(torch.nn.functional.interpolate((x + 1) / 2, size=16, mode="bilinear", antialias=True) * 2 - 1).logits
    torch.testing.assert_close(
        loss(x), torch.nn.functional.cross_entropy(logits, torch.tensor([2, 2]), reduction="none")
    )


def test_checkpointing_gives_the_same_guided_samples(sd_folder, pixel_folders):
    """Whole guided trajectories (freedom, DDIM-3) agree with and without gradient checkpointing."""

    def run(den, loss, shape, scale):
        g = lg.preset("freedom", scale=scale)
        return lg.sample(den, lg.DDIM(den.schedule, 3), g, loss, shape=shape, seeds=range(2)).x0

    stack = load_stable_diffusion(str(sd_folder))
    den = stack.denoiser(stack.encode_prompt("a dog"), guidance_scale=2.0)
    plain = run(den, stack.loss(_target_loss), (4, 8, 8), 20.0)
    stack.enable_gradient_checkpointing(unet=True, vae=True)
    torch.testing.assert_close(run(den, stack.loss(_target_loss), (4, 8, 8), 20.0), plain, rtol=1e-4, atol=1e-5)

    unet = diffusers.UNet2DModel.from_pretrained(pixel_folders["epsilon"], subfolder="unet")
    den = lg.from_diffusers(
        unet, diffusers.DDPMScheduler.from_pretrained(pixel_folders["epsilon"], subfolder="scheduler")
    )
    plain = run(den, _target_loss, (3, 8, 8), 2.0)
    unet.enable_gradient_checkpointing()
    torch.testing.assert_close(run(den, _target_loss, (3, 8, 8), 2.0), plain, rtol=1e-4, atol=1e-5)


def test_measurement_loss_is_the_dps_residual():
    """y = A(ref) + σ·z: with σ = 0 the reference has zero loss; box inpainting ignores the box's content; the
    noise is seeded (the same y every run) and the loss is the unsquared ‖A(x0) − y‖ by default."""
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 16, 16, generator=g) * 2 - 1
    sr = recipes.measurement_loss({"operator": "super_resolution", "factor": 4, "noise_sigma": 0.0}, ref)
    assert float(sr(ref[None])) < 1e-6 and float(sr(-ref[None])) > 0.5
    box = {"operator": "box_inpainting", "box": [4, 4, 8, 8], "noise_sigma": 0.0}
    inp = recipes.measurement_loss(box, ref)
    x = ref[None].clone()
    x[..., 4:12, 4:12] = 5.0
    assert float(inp(x)) < 1e-6 and float(inp(x + 0.1)) > 0.1
    noisy = {"operator": "super_resolution", "factor": 4, "noise_sigma": 0.05}
    a, b = recipes.measurement_loss(noisy, ref), recipes.measurement_loss(noisy, ref)
    assert float(a(ref[None])) == float(b(ref[None])) and abs(float(a(ref[None])) - 0.05 * (3 * 16) ** 0.5) < 0.05
