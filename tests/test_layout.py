"""Layout control on a tiny random UNet2DConditionModel: capture leaves the forward unchanged, the maps are
attention distributions, the region energy on constructed maps, modulation, the x_t layout loss under the
engine, and the conditional model's training script (resume, export, load)."""

import pytest
import torch

from lossguide import presets
from lossguide.layout import (
    AttentionControl,
    CondDigitModel,
    LayoutAttnProcessor,
    LayoutLoss,
    Region,
    TokenEncoder,
    as_region,
    box_map,
    layer_grid,
    region_energy,
)
from lossguide.samplers import DDIM
from lossguide.sampling import sample
from lossguide.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
from tiny_sd import tiny_config  # noqa: E402
from tiny_sd import tiny_unet as _tiny_unet  # noqa: E402

SIZE = (16, 32)
CONFIG = tiny_config(SIZE)
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)


def tiny_unet(seed: int = 0):
    return _tiny_unet(SIZE, seed)


def inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, *SIZE, generator=g)
    ehs = torch.randn(B, 2, 8, generator=g)
    return x, torch.full((B,), 700), ehs


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture
def control(unet):
    c = AttentionControl().install(unet)
    yield c
    c.remove()


# -- capture -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["default", "AttnProcessor"])
def test_capture_leaves_the_forward_bit_for_bit_unchanged(base):
    unet = tiny_unet()
    if base == "AttnProcessor":
        unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor())
    x, t, ehs = inputs()
    ref = unet(x, t, encoder_hidden_states=ehs).sample
    kinds = {n: type(p) for n, p in unet.attn_processors.items()}
    control = AttentionControl().install(unet)
    assert sum(isinstance(p, LayoutAttnProcessor) for p in unet.attn_processors.values()) == 7  # the attn2 layers
    assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.processor.__class__ is not LayoutAttnProcessor
    with control.capturing():
        out = unet(x, t, encoder_hidden_states=ehs).sample
    assert torch.equal(out, ref)
    assert len(control.maps) == 7
    assert torch.equal(unet(x, t, encoder_hidden_states=ehs).sample, ref)  # capture off: the wrapped processor
    control.remove()
    assert {n: type(p) for n, p in unet.attn_processors.items()} == kinds


def test_maps_are_attention_distributions_over_tokens(unet, control):
    x, t, ehs = inputs()
    with control.capturing():
        unet(x, t, encoder_hidden_states=ehs)
    grids = {tuple(m.shape[2:4]) for m in control.maps.values()}
    assert grids == {(8, 16), (4, 8)}
    for name, m in control.maps.items():
        assert m.shape[:2] == (2, 2) and m.shape[-1] == 2, name  # [B, heads, h, w, tokens]
        assert torch.allclose(m.sum(-1), torch.ones(()), atol=1e-6)
        assert (m >= 0).all()
    # capture outside the block is off
    unet(x, t, encoder_hidden_states=ehs)
    assert control.maps == {}


def test_chosen_tokens_only():
    unet = tiny_unet()
    control = AttentionControl(tokens=[1]).install(unet)
    x, t, ehs = inputs()
    with control.capturing():
        unet(x, t, encoder_hidden_states=ehs)
    assert all(m.shape[-1] == 1 for m in control.maps.values())
    with pytest.raises(ValueError, match="token 0 was not captured"):
        region_energy(control.maps, {0: LEFT}, control.tokens)
    control.remove()


def test_layer_grid():
    assert layer_grid(28 * 56, (28, 56)) == (28, 56)
    assert layer_grid(14 * 28, (28, 56)) == (14, 28)
    assert layer_grid(7 * 14, (28, 56)) == (7, 14)
    assert layer_grid(4 * 7, (14, 26)) == (4, 7)  # stride-2 convolutions round up
    with pytest.raises(ValueError, match="cannot place"):
        layer_grid(50, (28, 56))


# -- regions and the region energy -------------------------------------------------------------------
def test_box_map_is_area_coverage():
    m = box_map(torch.tensor([[0.0, 0.0, 0.5, 1.0]]), (4, 8))[0]
    assert torch.equal(m[:, :4], torch.ones(4, 4)) and torch.equal(m[:, 4:], torch.zeros(4, 4))
    m = box_map(torch.tensor([[0.1, 0.0, 0.6, 0.5]]), (2, 4))[0]  # x from 0.4 to 2.4 cells
    assert torch.allclose(m[0], torch.tensor([0.6, 1.0, 0.4, 0.0])) and torch.equal(m[1], torch.zeros(4))
    assert torch.allclose(box_map(torch.tensor([[0.1, 0.0, 0.6, 0.5]]), (16, 16)).mean(), torch.tensor(0.25))
    with pytest.raises(ValueError, match="0 ≤ x0 < x1 ≤ 1"):
        Region(boxes=torch.tensor([0.5, 0.0, 0.5, 1.0]))


def test_mask_regions_are_area_averaged():
    mask = torch.zeros(16, 32)
    mask[:, :16] = 1
    r = as_region(mask)
    assert r.mask is not None and torch.equal(r.at((4, 8))[0], box_map(torch.tensor([LEFT]), (4, 8))[0])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        Region(mask=2 * mask)


def _maps(where: str, B=2, heads=2, grid=(4, 8)):
    """Constructed maps of token 0: all of its attention in the left half, the right half, or uniform."""
    h, w = grid
    a = torch.zeros(B, heads, h, w)
    if where == "left":
        a[..., : w // 2] = 0.7
    elif where == "right":
        a[..., w // 2 :] = 0.7
    else:
        a[:] = 0.7
    return torch.stack([a, 1 - a], dim=-1)  # token 1 takes the rest


def test_region_energy_on_constructed_maps():
    for where, expect in (("left", 0.0), ("right", 1.0), ("uniform", 0.5)):
        maps = {"a": _maps(where), "b": _maps(where, grid=(2, 4))}
        for region in (LEFT, torch.tensor([LEFT, LEFT]), (torch.arange(32) < 16).float().expand(16, 32)):
            E = region_energy(maps, {0: region})
            assert E.shape == (2,) and torch.allclose(E, torch.full((2,), expect), atol=1e-6), (where, region)
    # per-sample boxes: sample 0 asked for the left half, sample 1 for the right
    E = region_energy({"a": _maps("left")}, {0: torch.tensor([LEFT, RIGHT])})
    assert torch.allclose(E, torch.tensor([0.0, 1.0]))
    # mean over targets and layers
    E = region_energy({"a": _maps("left")}, {0: LEFT, 1: LEFT})
    inside = 0.3 * 16 / (0.3 * 16 + 1.0 * 16)  # token 1: 0.3 on the left, 1 on the right
    assert torch.allclose(E, torch.full((2,), (0.0 + (1 - inside)) / 2))
    assert torch.allclose(region_energy({"a": _maps("left"), "bb": _maps("right")}, {0: LEFT}, layers=["bb"]),
                          torch.ones(2))  # fmt: skip


def test_layout_loss_has_a_finite_nonzero_gradient_in_x_t(unet, control):
    x, t, ehs = inputs()
    loss = LayoutLoss(unet, control, ehs, {0: LEFT, 1: RIGHT})
    x = x.requires_grad_(True)
    L = loss(x, 700)
    assert L.shape == (2,) and ((L > 0) & (L < 1)).all()
    (g,) = torch.autograd.grad(L.sum(), x)
    assert torch.isfinite(g).all() and g.flatten(1).norm(dim=1).min() > 0
    assert not any(p.grad is not None for p in unet.parameters())


# -- modulation --------------------------------------------------------------------------------------
def test_modulation_moves_the_tokens_attention_into_its_box(unet, control):
    x, t, ehs = inputs()
    loss = LayoutLoss(unet, control, ehs, {0: LEFT}, modulated=True)
    own = LayoutLoss(unet, control, ehs, {0: LEFT})  # the default: the model's own, unmodulated maps
    with torch.no_grad():
        inside0 = 1 - loss(x, 999)  # the share of token 0's attention inside its box
        control.modulate(0, LEFT, strength=3.0)
        inside1 = 1 - loss(x, 999)
        maps = control.maps
        inside_half = 1 - loss(x, 500)  # s_t halves at t = T/2 (power 1)
        assert torch.equal(1 - own(x, 999), inside0) and len(control.modulations) == 1
    # a random UNet attends uniformly (≈ 0.5 inside the left half); logits +3 inside, −3 outside make it
    # e³/(e³ + e⁻³·…) ≈ 0.95
    assert torch.allclose(inside0, torch.full((2,), 0.5), atol=0.02)
    assert (inside1 > 0.93).all() and (inside0 + 0.02 < inside_half).all() and (inside_half + 0.1 < inside1).all()
    for m in maps.values():
        assert torch.allclose(m.sum(-1), torch.ones(()), atol=1e-6)  # still distributions
    control.clear_modulations()


def test_modulation_changes_the_output_and_fades_to_zero_at_t0(unet, control):
    x, _, ehs = inputs()
    t0, tT = torch.zeros(2, dtype=torch.long), torch.full((2,), 999)
    plain0 = unet(x, t0, encoder_hidden_states=ehs).sample
    plainT = unet(x, tT, encoder_hidden_states=ehs).sample
    control.modulate(0, LEFT, strength=3.0)
    mod0 = unet(x, t0, encoder_hidden_states=ehs).sample
    modT = unet(x, tT, encoder_hidden_states=ehs).sample
    control.clear_modulations()
    assert torch.allclose(mod0, plain0, atol=1e-5)
    assert (modT - plainT).abs().max() > 1e-3


# -- the engine --------------------------------------------------------------------------------------
def _engine_setup(unet, control):
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    _, _, ehs = inputs(B=4, seed=3)
    from lossguide.denoiser import from_diffusers

    den = from_diffusers(unet, sched, encoder_hidden_states=ehs)
    loss = LayoutLoss(unet, control, ehs, {0: LEFT, 1: RIGHT})
    return den, loss


def test_one_guided_step_lowers_the_layout_loss(unet, control):
    """cg-style guidance (ε̂ = ε + s·σ_t·∇ℓ(x_t, t)) on the first DDIM step: the layout loss at x_{t'} is lower
    than the unguided step's from the same x_T, per sample."""
    den, loss = _engine_setup(unet, control)
    sampler = DDIM(NoiseSchedule.from_diffusers(diffusers.DDPMScheduler()), num_steps=2)  # t = 500 → 0
    x_T = torch.randn(4, 1, *SIZE, generator=torch.Generator().manual_seed(5))
    after = {}
    for name, cfg in (("none", presets.none()), ("cg", presets.cg(scale=100.0))):
        xs = []
        sample(den, sampler, cfg, loss if name == "cg" else None, x_T=x_T,
               callback=lambda d, xs=xs: xs.append(d["x"]) if d["i"] == 0 else None)  # fmt: skip
        with torch.no_grad():
            after[name] = loss(xs[0], sampler.timestep(1))
    # a random UNet's attention is near uniform (ℓ ≈ 0.5) and its gradient small: the drop is ~1e-3, linear in
    # the scale, on every sample
    assert (after["none"] - after["cg"] > 5e-4).all(), after


def test_x0_presets_refuse_the_layout_loss(unet, control):
    den, loss = _engine_setup(unet, control)
    sampler = DDIM(NoiseSchedule.from_diffusers(diffusers.DDPMScheduler()), num_steps=2)
    with pytest.raises(ValueError, match="calls loss\\(x0\\)"):
        sample(den, sampler, presets.freedom(), loss, x_T=torch.randn(4, 1, *SIZE))


def test_cfg_denoiser_modulates_and_captures_the_conditional_half_only(unet):
    """ε̃ = ε_∅ + w·(ε_c − ε_∅) with the modulation applied to ε_c alone; the maps are the conditional call's."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        enc = TokenEncoder(dim=8)
    model = CondDigitModel(unet, diffusers.DDPMScheduler(), enc)
    tokens = torch.tensor([[3, 7], [1, 2]])
    x, t, _ = inputs()
    control = model.attention_control()
    control.modulate(0, LEFT, strength=3.0)
    with torch.no_grad(), control.capturing():
        got = model.denoiser(tokens, guidance_scale=3.0, control=control).net(x, t)
        maps = dict(control.maps)
        eps_c = unet(x, t, encoder_hidden_states=model.embed(tokens)).sample
        cond_maps = dict(control.maps)
        with control.disabled():
            eps_u = unet(x, t, encoder_hidden_states=enc.null(2)).sample
    control.remove()
    assert torch.allclose(got, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5)
    assert maps.keys() == cond_maps.keys() and all(torch.equal(maps[k], cond_maps[k]) for k in maps)


# -- the conditional model: training script, export, loading --------------------------------------------
TINY_ARGS = ["--block-channels", "8,16,16", "--norm-groups", "8", "--heads", "2", "--token-dim", "8",
             "--batch", "4", "--threads", "1", "--log-every", "1"]  # fmt: skip


def test_training_resumes_to_the_same_weights_and_exports(tmp_path, restore_logging):
    pytest.importorskip("mlxtend")
    from lossguide.training import cond_ddpm

    cond_ddpm.main(["--out", str(tmp_path / "a"), "--iters", "4", "--ckpt-every", "2", *TINY_ARGS])
    cond_ddpm.main(["--out", str(tmp_path / "b"), "--iters", "2", "--ckpt-every", "2", *TINY_ARGS])
    cond_ddpm.main(["--out", str(tmp_path / "b"), "--iters", "4", "--ckpt-every", "2", *TINY_ARGS,
                    "--export", str(tmp_path / "export")])  # fmt: skip
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k, v in a["ema"]["model"].items():
        assert torch.equal(v, b["ema"]["model"][k]), k

    model = CondDigitModel.from_pretrained(tmp_path / "export")
    assert model.sample_shape == (1, 28, 56)
    assert model.scheduler.config.prediction_type == "v_prediction"  # the default target
    assert next(model.unet.parameters()).dtype == torch.float32
    ref = {k: v.half().float() for k, v in a["ema"]["model"].items()}
    assert torch.equal(model.encoder.embedding.weight, ref["tokens.embedding.weight"])
    tokens = torch.tensor([[3, 7], [1, 2]])
    control = model.attention_control()
    control.modulate(0, LEFT, strength=2.0)
    den = model.denoiser(tokens, guidance_scale=3.0, control=control)
    sampler = DDIM(den.schedule, num_steps=3)
    loss = model.layout_loss(tokens, {0: LEFT, 1: RIGHT}, control)
    out = sample(den, sampler, presets.cg(1.0), loss, shape=model.sample_shape, seeds=[0, 1])
    assert out.x0.shape == (2, 1, 28, 56) and torch.isfinite(out.x0).all()
    assert out.stats.loss_evals == 3
    control.remove()


def test_token_encoder_slots_differ_and_null():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        enc = TokenEncoder(dim=8)
    e = enc(torch.tensor([[3, 7], [7, 3]]))
    assert e.shape == (2, 2, 8) and not torch.equal(e[0], e[1].flip(0))  # slot embeddings tell left from right
    assert enc.null(3).shape == (3, 2, 8)
    with pytest.raises(ValueError, match="tokens must lie in"):
        enc(torch.tensor([[3, 12]]))


def test_v_target_is_what_the_denoiser_inverts():
    """batch(prediction="v_prediction") gives v = √ᾱ·ε − √(1−ᾱ)·x0, which the v-prediction Denoiser maps back to
    the batch's x0 and ε exactly (up to float32)."""
    from diffusers import DDPMScheduler

    from lossguide.data.canvas import TwoDigitCanvas
    from lossguide.denoiser import Denoiser
    from lossguide.schedule import NoiseSchedule
    from lossguide.training.cond_ddpm import SCHEDULER_CONFIG, batch

    x, y = torch.rand(20, 1, 28, 28) * 2 - 1, torch.arange(20) % 10
    data = TwoDigitCanvas(x=x, y=y)
    sched = NoiseSchedule.from_diffusers(DDPMScheduler(**SCHEDULER_CONFIG))
    ab = sched.alpha_bar.float()
    x_t, t, _, eps = batch(data, 6, torch.Generator().manual_seed(3), 0.0, ab)
    x_t2, t2, _, v = batch(data, 6, torch.Generator().manual_seed(3), 0.0, ab, prediction="v_prediction")
    assert torch.equal(x_t, x_t2) and torch.equal(t, t2)
    x0 = data.draw(torch.randint(0, 2**62, (6,), generator=torch.Generator().manual_seed(3)).tolist())[0]
    for k in range(6):
        den = Denoiser(lambda xx, tt, k=k: v[k : k + 1], sched, "v_prediction")
        out = den(x_t[k : k + 1], int(t[k]))
        assert torch.allclose(out.x0_hat, x0[k : k + 1], atol=2e-4)
        assert torch.allclose(out.eps, eps[k : k + 1], atol=2e-4)
    with pytest.raises(ValueError, match="prediction"):
        batch(data, 2, torch.Generator(), 0.0, ab, prediction="x0")
