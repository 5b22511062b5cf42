"""The second embedded default, ``mnist-flow``: the exact VP→flow wrapper of an ε-DDPM (lossguide.models.flowwrap),
its training script (resume, export, load) and the shipped model against its manifest."""

import math

import pytest
import torch

import lossguide as lg
from lossguide import models
from lossguide.denoiser import Denoiser
from lossguide.models.flowwrap import FlowFromEps, flow_time_of
from lossguide.samplers import DDIM
from lossguide.schedule import FlowSchedule, NoiseSchedule

diffusers = pytest.importorskip("diffusers")
F64 = torch.float64
VP = NoiseSchedule.linear()
DDPM_FOLDER = models.DENOISERS["mnist-ddpm"]
needs_ddpm = pytest.mark.skipif(not (DDPM_FOLDER / "unet").exists(), reason="no shipped mnist-ddpm in this checkout")
needs_flow = pytest.mark.skipif(
    "mnist-flow" not in models.manifest() or not (models.DENOISERS["mnist-flow"] / "unet").exists(),
    reason="no shipped mnist-flow in this checkout",
)


@pytest.fixture(scope="module")
def ddpm_unet():
    unet = diffusers.UNet2DModel.from_pretrained(DDPM_FOLDER / "unet", torch_dtype=torch.float32,
                                                 low_cpu_mem_usage=False)  # fmt: skip
    return unet.double().eval().requires_grad_(False)


@needs_ddpm
def test_wrapped_ddpm_is_the_ddpm_on_the_flow_path(ddpm_unet):
    """At every flow time t in the DDPM's range the wrapper's ε_hat and x0_hat are the DDPM's at the matching VP
    level: x/k at τ(t) with ᾱ_τ = ᾱ(t) (exact at the training timesteps, linear in log-SNR between them), and
    u = ε_hat − x0_hat; beyond the DDPM's noisiest level u stays finite up to t = 1 and is continuous at t_hi."""
    w = FlowFromEps(ddpm_unet, VP.alpha_bar)
    den = Denoiser(w, FlowSchedule(), "flow_prediction")
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=F64)  # the VP point x/k
    for tau in (0, 10, 250, 500, 980, 999):
        ab = VP.at(tau)
        t = flow_time_of(ab)
        assert abs(float(w.vp_timestep(torch.tensor([t], dtype=F64))) - tau) < 1e-6
        with torch.no_grad():
            eps = ddpm_unet(x, torch.full((3,), float(tau), dtype=F64)).sample
            out = den(x * math.hypot(1 - t, t), t)
        x0 = (x - (1 - ab) ** 0.5 * eps) / ab**0.5
        torch.testing.assert_close(out.eps, eps, rtol=0, atol=1e-10)
        torch.testing.assert_close(out.x0_hat, x0, rtol=0, atol=1e-10 * max(1.0, float(x0.abs().max())))
    t = 0.5  # between training timesteps: the DDPM at the fractional τ whose ᾱ is ᾱ(0.5) = 0.5
    tau = float(w.vp_timestep(torch.tensor([t], dtype=F64)))
    assert VP.at(int(tau) + 1) < 0.5 < VP.at(int(tau))
    with torch.no_grad():
        eps = ddpm_unet(x, torch.full((3,), tau, dtype=F64)).sample
        torch.testing.assert_close(den(x * math.hypot(0.5, 0.5), t).eps, eps, rtol=0, atol=1e-10)
        u = [w(x, torch.full((3,), s * 1000, dtype=F64)) for s in (w.t_hi - 1e-9, w.t_hi + 1e-9, 0.999, 1.0)]
    assert all(torch.isfinite(v).all() for v in u)
    assert float((u[0] - u[1]).abs().max()) < 1e-4


@needs_ddpm
def test_wrapped_ddpm_samples_the_ddpm_trajectory(ddpm_unet):
    """DDIM on the FlowSchedule at the flow times of the DDPM's DDIM-50 timesteps, with the wrapped DDPM, is the
    VP DDIM-50 of the DDPM itself (x_flow = k·x_vp at every step): at initialisation mnist-flow is the DDPM."""
    vp_sampler = DDIM(VP, 8)
    times = [flow_time_of(VP.at(int(t))) for t in vp_sampler.timesteps]
    flow_sampler = DDIM(FlowSchedule(), times=times)
    w = FlowFromEps(ddpm_unet, VP.alpha_bar)
    vp_den = Denoiser(lambda x, t: ddpm_unet(x, t.to(F64)).sample, VP, "epsilon")
    z = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        a = lg.sample(vp_den, vp_sampler, x_T=z, dtype=F64).x0
        b = lg.sample(Denoiser(w, FlowSchedule(), "flow_prediction"), flow_sampler, x_T=z * math.hypot(
            1 - times[0], times[0]), dtype=F64).x0  # fmt: skip
    torch.testing.assert_close(b, a, rtol=0, atol=1e-8)


def test_flow_training_resumes_to_the_same_weights_and_exports_a_loadable_flow_model(tmp_path, restore_logging):
    """A tiny ε-UNet (``--init``) fine-tuned 4 iterations in one run and in 2 + 2 (resumed) ends with identical EMA
    weights; the export loads as a flow_prediction Denoiser over a FlowSchedule and samples."""
    from lossguide.training import flow

    init = tmp_path / "init"
    diffusers.UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).save_pretrained(init / "unet")  # fmt: skip
    common = ["--init", str(init), "--batch", "4", "--warmup", "1", "--ckpt-every", "2", "--threads", "1"]
    flow.main(["--out", str(tmp_path / "a"), "--iters", "4", *common])
    flow.main(["--out", str(tmp_path / "b"), "--iters", "4", "--stop-at", "2", *common])
    assert not (tmp_path / "export").exists()
    flow.main(["--out", str(tmp_path / "b"), "--iters", "4", *common, "--export", str(tmp_path / "export")])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 4 and a["loss_avg"] == b["loss_avg"]
    for k, v in a["ema"]["model"].items():
        assert torch.equal(v, b["ema"]["model"][k]), k
    m = models.load_denoiser(str(tmp_path / "export"))
    assert isinstance(m.denoiser.schedule, FlowSchedule) and m.denoiser.prediction_type == "flow_prediction"
    assert type(m.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and m.sample_shape == (1, 28, 28)
    x = lg.sample(m.denoiser, DDIM(m.denoiser.schedule, 3), shape=m.sample_shape, seeds=[0, 1]).x0
    assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all()


@needs_flow
def test_shipped_flow_model_matches_its_manifest():
    """load_denoiser("mnist-flow"): a flow_prediction Denoiser over a FlowSchedule with the digits augmentation;
    file hashes, and the judge's labels of the first 32 unguided DDIM-50 samples (seeds 0..31)."""
    entry = models.manifest()["mnist-flow"]
    folder = models.DENOISERS["mnist-flow"]
    for rel, digest in entry["files"].items():
        assert models.sha256(folder / rel) == digest, rel
    m = models.load_denoiser("mnist-flow")
    assert isinstance(m.denoiser.schedule, FlowSchedule) and m.denoiser.prediction_type == "flow_prediction"
    assert m.sample_shape == (1, 28, 28) and m.augment is not None
    assert models.AUGMENT_POLICY["mnist-flow"] == "digits"
    judge = models.load_classifier("mnist-judge")
    x = lg.sample(m.denoiser, DDIM(m.denoiser.schedule, 50), shape=m.sample_shape, seeds=range(32)).x0
    with torch.no_grad():
        labels = judge(x.clamp(-1, 1)).argmax(1).tolist()
    same = sum(a == b for a, b in zip(labels, entry["metrics"]["judge_labels_first64"][:32], strict=True))
    assert same >= 31  # float rounding may flip one borderline digit across machines


def test_noise_aware_class_loss_reads_flow_times_as_vp():
    """cg's NoisyClassLoss on a flow model: the VP classifier sees x_t/k at the training timestep of the matching ᾱ
    (nearest in log-SNR), not int(t) of a flow time in [0, 1]; on VP it sees x_t and t as given."""
    from lossguide.losses import NoisyClassLoss

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, t):
            seen.append((x, t))
            return torch.zeros(len(x), 10)

    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for tau in (0, 400, 999):
        t = flow_time_of(VP.at(tau))
        NoisyClassLoss(Probe(), 3, schedule=FlowSchedule())(x, t)
        torch.testing.assert_close(seen[-1][0], x / math.hypot(1 - t, t))
        assert seen[-1][1].tolist() == [tau, tau]
    NoisyClassLoss(Probe(), 3, schedule=FlowSchedule())(x, 1.0)
    assert seen[-1][1].tolist() == [999, 999]
    NoisyClassLoss(Probe(), 3, schedule=VP)(x, 250)
    assert torch.equal(seen[-1][0], x) and seen[-1][1].tolist() == [250, 250]
