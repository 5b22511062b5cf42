"""Motion guidance (issue #7): forward kinematics, windows, losses, augmentation, the shipped model and
the ``lossguide experiment motion --quick`` run."""

import math

import pytest
import torch

pytest.importorskip("pybullet", reason="motion data needs the pybullet package (pip install 'lossguide[motion]')")

from lossguide.motion import data as md  # noqa: E402
from lossguide.motion.augment import MotionAugment, time_shift  # noqa: E402
from lossguide.motion.losses import ObstacleLoss, PathLoss, TargetLoss, WeightedSum  # noqa: E402
from lossguide.rng import make_generators  # noqa: E402


def _walk_frame(k: int = 5) -> md.Clip:
    import json

    import numpy as np

    d = json.loads((md.pybullet_data_path() / "data" / "motions" / "humanoid3d_walk.txt").read_text())
    rp, rq, sq, rv = md._parse_frames(np.asarray(d["Frames"][k : k + 1], dtype=np.float64))
    return md.Clip("walk", rp, rq, sq, rv, False)


def test_fk_rest_pose_by_hand():
    """Identity rotations: the right ankle hangs 0.25·(1.686184 + 1.639480) m below the hip, 0.25·0.339548 m aside."""
    x = torch.zeros(1, md.N_FEATURES, dtype=torch.float64)
    x[0, 2] = 0.85
    eye6 = torch.tensor([1.0, 0, 0, 0, 1, 0], dtype=torch.float64)
    x[0, 3:9] = eye6
    x[0, 9 : 9 + 6 * len(md.SPHERICAL)] = eye6.repeat(len(md.SPHERICAL))
    p = md.forward_kinematics(x)[0]
    ankle = p[md.POINTS.index("right_ankle")]
    expected = torch.tensor([0.0, 0.85 - 0.25 * (1.686184 + 1.639480), 0.25 * 0.339548], dtype=torch.float64)
    torch.testing.assert_close(ankle, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(p[md.POINTS.index("chest"), 1], torch.tensor(0.85 + 0.25 * 0.944604).double())


def test_fk_matches_pybullet_on_a_walk_frame():
    """Our FK of frame 5 of humanoid3d_walk equals pybullet's own link positions (globalScaling 0.25)."""
    import pybullet as p

    clip = _walk_frame(5)
    ours = md.forward_kinematics(md.clip_features(clip))[0]
    # pybullet's numbers for this frame, recorded once (and re-checked live below)
    recorded = {"right_ankle": (0.2515, 0.0555, 0.0340), "left_elbow": (0.2133, 1.0751, -0.2457)}
    for name, xyz in recorded.items():
        torch.testing.assert_close(ours[md.POINTS.index(name)], torch.tensor(xyz).double(), rtol=0, atol=1e-4)
    cid = p.connect(p.DIRECT)
    try:
        h = p.loadURDF(
            str(md.pybullet_data_path() / "humanoid" / "humanoid.urdf"), globalScaling=0.25, physicsClientId=cid
        )
        q = clip.root_q[0]
        p.resetBasePositionAndOrientation(h, clip.root_pos[0].tolist(), [q[1], q[2], q[3], q[0]], physicsClientId=cid)
        index = {
            p.getJointInfo(h, j, physicsClientId=cid)[1].decode(): j
            for j in range(p.getNumJoints(h, physicsClientId=cid))
        }
        si = ri = 0
        for name, kind in md.JOINTS:
            if kind == "spherical":
                w, a, b, c = clip.sph_q[0, si]
                p.resetJointStateMultiDof(h, index[name], [a, b, c, w], physicsClientId=cid)
                si += 1
            else:
                p.resetJointState(h, index[name], clip.rev[0, ri], physicsClientId=cid)
                ri += 1
        for name in ("chest", "neck", "right_knee", "right_ankle", "left_shoulder", "left_elbow", "right_wrist"):
            ref = p.getLinkState(h, index[name], computeForwardKinematics=1, physicsClientId=cid)[4]
            torch.testing.assert_close(ours[md.POINTS.index(name)], torch.tensor(ref).double(), rtol=0, atol=1e-5)
    finally:
        p.disconnect(cid)


@pytest.fixture(scope="module")
def windows():
    data = md.MotionData.build(n_sequences=4, seconds=8.0, seed=0)
    return data.windows(16, torch.Generator().manual_seed(0)).double()


def test_mirror_and_heading_rotation_act_on_joint_positions(windows):
    x = windows
    P = md.forward_kinematics(x)
    swap = [md.POINTS.index(n.replace("right", "L").replace("left", "right").replace("L", "left")) for n in md.POINTS]
    reflect = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(md.forward_kinematics(md.mirror(x)), (P * reflect)[:, :, swap])
    a = 0.7
    R = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=torch.float64)
    rotated = md.forward_kinematics(md.rotate_heading(x, torch.full((len(x),), a, dtype=torch.float64)))
    torch.testing.assert_close(rotated, P @ R.T, rtol=0, atol=1e-5)  # windows are float32 data


def test_windows_start_at_origin_with_uniform_headings(windows):
    assert windows.shape == (16, md.WINDOW, md.N_FEATURES)
    torch.testing.assert_close(windows[:, 0, 0:2], torch.zeros(16, 2, dtype=torch.float64), rtol=0, atol=1e-6)
    h = md.window_heading(windows)
    assert h.std() > 1.0  # uniform on the circle has std ≈ 1.8
    canon = md.canonicalize(windows)
    torch.testing.assert_close(md.window_heading(canon), torch.zeros(16, dtype=torch.float64), rtol=0, atol=1e-5)


def _motion(root_xz) -> torch.Tensor:
    x = torch.zeros(1, len(root_xz), md.N_FEATURES, dtype=torch.float64)
    x[0, :, 0:2] = torch.tensor(root_xz, dtype=torch.float64)
    return x.requires_grad_(True)


def test_target_loss_value_and_gradient():
    x = _motion([[0.0, 0.0], [1.0, 2.0]])
    L = TargetLoss([4.0, 6.0])(x)
    assert L.shape == (1,) and float(L.detach()) == pytest.approx(25.0)
    (g,) = torch.autograd.grad(L.sum(), x)
    torch.testing.assert_close(g[0, 1, 0:2], torch.tensor([-6.0, -8.0], dtype=torch.float64))
    assert float(g.abs().sum()) == pytest.approx(14.0)  # only the last frame's root moves the loss


def test_obstacle_loss_eq8_value_and_gradient():
    """Frame 0 at the centre, frame 1 on the rim (d = r): mean of 100·σ(25) and 100·σ(0)."""
    x = _motion([[1.0, 1.0], [1.5, 1.0]])
    L = ObstacleLoss([[1.0, 1.0]], radius=0.5)(x)
    expected = (100 * torch.sigmoid(torch.tensor(25.0)).item() + 50.0) / 2
    assert float(L.detach()) == pytest.approx(expected, rel=1e-9)
    (g,) = torch.autograd.grad(L.sum(), x)
    # d/dp of 100·σ(−50(d − r))/2 at d = r: −100·50·¼/2 along the outward normal (+x)
    torch.testing.assert_close(g[0, 1, 0:2], torch.tensor([-625.0, 0.0], dtype=torch.float64))
    # deep inside the cylinder the sigmoid saturates: no push outwards (and no NaN at the centre itself)
    inside = _motion([[1.0, 1.0], [1.1, 1.0]])
    (g_in,) = torch.autograd.grad(ObstacleLoss([[1.0, 1.0]], radius=0.5)(inside).sum(), inside)
    assert torch.isfinite(g_in).all() and float(g_in.abs().max()) < 1e-5
    far = ObstacleLoss([[1.0, 1.0]], radius=0.5)(_motion([[5.0, 5.0], [6.0, 5.0]]))
    assert float(far.detach()) < 1e-100


def test_path_loss_and_weighted_sum():
    x = _motion([[1.0, 0.5], [3.0, 0.0]])
    path = PathLoss([[0.0, 0.0], [2.0, 0.0]])
    L = path(x)
    assert float(L.detach()) == pytest.approx((0.25 + 1.0) / 2)
    (g,) = torch.autograd.grad(L.sum(), x)
    torch.testing.assert_close(g[0, :, 0:2], torch.tensor([[0.0, 0.5], [1.0, 0.0]], dtype=torch.float64))
    total = WeightedSum([(2.0, path), (1.0, TargetLoss([3.0, 4.0]))])(x)
    assert float(total.detach()) == pytest.approx(2 * 0.625 + 16.0)


def test_losses_take_per_sample_tasks_and_augmented_copies():
    x = torch.zeros(4, 3, md.N_FEATURES, dtype=torch.float64)  # 2 samples × 2 copies, sample-major
    loss = TargetLoss([[1.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(loss(x), torch.tensor([1.0, 1.0, 4.0, 4.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="one for all samples or one per sample"):
        TargetLoss([[1.0, 0.0], [0.0, 2.0], [0, 0]])(x)
    with pytest.raises(ValueError, match=r"\[2\] or \[B, 2\]"):
        TargetLoss([1.0, 2.0, 3.0])


def test_motion_augment_follows_the_engine_interface(windows):
    z = windows[:3]
    ident = MotionAugment(max_shift=0.0, max_angle=0.0)(z, make_generators([0, 1, 2]), 4)
    torch.testing.assert_close(ident, z.repeat_interleave(4, dim=0))
    aug = MotionAugment(max_shift=2.0, max_angle=0.2)
    batch = aug(z, make_generators([5, 6, 7]), 3)
    alone = aug(z[1:2], make_generators([6]), 3)
    torch.testing.assert_close(batch[3:6], alone)  # sample 1's copies depend only on its generator
    shifted = time_shift(z, torch.ones(3, dtype=z.dtype))
    torch.testing.assert_close(shifted[:, :-1], z[:, 1:])
    torch.testing.assert_close(shifted[:, -1], z[:, -1])


def test_velocity_representation_round_trip(windows):
    v = md.positions_to_velocity(windows)
    step = (windows[:, 1, 0:2] - windows[:, 0, 0:2]) * md.FPS
    torch.testing.assert_close(v[:, 1, 0:2].norm(dim=-1), step.norm(dim=-1))  # a rotation into the heading frame
    assert float(v[..., 0].mean()) > 5 * float(v[..., 1].abs().mean())  # the clips walk forward, not sideways
    torch.testing.assert_close(md.velocity_to_positions(v), windows, rtol=0, atol=1e-9)


# -- the shipped model and the experiment ------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from lossguide.motion.model import WEIGHTS, load_model

    if not WEIGHTS.exists():
        pytest.skip("no shipped motion model in this checkout")
    return load_model()


def test_shipped_motion_model_matches_manifest_and_its_samples_look_like_the_data(model):
    """Hash against the manifest; 32 unguided DDIM-50 samples against 256 training windows.

    Root speed and foot contact match the data; joint speed is within 2× (the model's legs jitter); skating
    is far above the data's 0.3 m/s (2.3 m/s over 128 seeds, docs/motion.md), so it is only held below
    3.5 m/s as a regression guard.
    """
    from lossguide import models
    from lossguide.motion.stats import unguided_realism, window_stats

    entry = models.manifest()["motion-mdm"]
    assert models.sha256(models.WEIGHTS / entry["file"]) == entry["sha256"]
    torch.set_num_threads(1)
    data = md.MotionData.build(seed=0)
    ref = window_stats(data.windows(256, torch.Generator().manual_seed(2)))
    r = unguided_realism(model, range(5000, 5032), steps=50, reference=ref)
    s, d = r["samples"], r["data"]
    assert 0.67 * d["root_speed"]["mean"] < s["root_speed"]["mean"] < 1.5 * d["root_speed"]["mean"]
    assert r["w1"]["root_speed"] < 0.4
    assert 0.5 < s["contact"]["mean"] <= 1.0 and r["w1"]["contact"] < 0.25
    assert 0.5 * d["joint_speed"]["mean"] < s["joint_speed"]["mean"] < 2.0 * d["joint_speed"]["mean"]
    assert s["skating"]["mean"] < 3.5


def test_experiment_quick_guidance_reduces_target_mse(model, tmp_path):
    """`lossguide experiment motion --quick`: every guided method's target MSE is below half of unguided's.

    --quick runs in float64, so the cell is the same on every CPU: a one-ulp change of x_T moves a sample's target
    MSE by ≤ 1e-7 (measured). In float32 another CPU's kernels gave another trajectory (lgd_mc 0.64 of unguided
    against 0.19 here), and over other 4-sample seed sets the ratio spreads to 0.05-0.98 (float32) and 0.09-3.3
    (float64, shen2024 worst): 4 samples decide nothing, so the bound holds for these seeds only. Measured here
    (float64, seeds 0-1 × 2 scenarios): freedom 0.11, dps 0.15, lgd_mc 0.09, shen2024 0.09."""
    from lossguide.experiments import run

    summary = run("motion", tmp_path, quick=True)
    for name in ("report.md", "results.json", "results.csv", "trajectories.png", "realism.png", "guided.gif"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = {r["method"]: r for r in summary["table"]}
    base = rows["none"]["target_mse"]
    for name in ("freedom", "dps", "lgd_mc", "shen2024"):
        assert rows[name]["target_mse"] < 0.5 * base, (name, rows[name]["target_mse"], base)
    assert "headline" in summary and "motion" in summary["headline"]


def test_motion_task_maps_seeds_to_scenarios_and_scores_eq8_by_hand(model):
    """The harness's motion task: seed s + 100000·j is draw s of scenario j, each row's loss is its own scenario's
    eq. 8 (a batch of mixed scenarios equals each row alone), and the objective honours the realism guard."""
    from lossguide.harness.tasks.motion import GUIDE_MARGIN, SCENARIOS, MotionTask, evaluate

    task = MotionTask(model, SCENARIOS[:2])
    seeds, names = task.seeds([3, 7])
    assert seeds == [3, 7, 100_003, 100_007] and names == ["ahead 2.5 m"] * 2 + ["left 3 m"] * 2
    with pytest.raises(ValueError, match="motion draws must lie in 0..99999"):
        task.seeds([100_000])
    # a motion standing still at the origin: target MSE = |goal|², the obstacle (centre goal/2) is ≥ r + margin away
    x = torch.zeros(4, 8, 61, dtype=torch.float64)  # features [B, L, 61], root x z first
    m = evaluate(x, *task._targets(seeds))
    assert m["target_mse"].tolist() == pytest.approx([2.5**2] * 2 + [3.0**2] * 2)
    assert 0 <= m["avoid"].min() and m["avoid"].max() < 1e-12  # far outside r: eq. 8's soft penalty is ~0
    near = evaluate(x, *task._targets(seeds)[:2], torch.full((4,), 1.25 + GUIDE_MARGIN))["avoid"]
    assert near[0] > 1e3 * m["avoid"][0]  # inside the radius the penalty is felt
    z = torch.randn((4, *task.shape), generator=torch.Generator().manual_seed(0), dtype=model.mean.dtype)
    whole = task.loss(seeds)(z)
    alone = torch.cat([task.loss([s])(z[i : i + 1]) for i, s in enumerate(seeds)])
    assert torch.equal(whole, alone) and not torch.equal(whole[:2], whole[2:])
    score = {"target_mse": torch.tensor([1.0, 3.0]), "avoid": torch.tensor([0.0, 2.0]), "skating": torch.tensor([1.0])}
    assert MotionTask.objective(score, unguided_skating=1.0) == -3.0
    assert MotionTask.objective(score, unguided_skating=0.6) == -math.inf  # 1.0 > 1.5 × 0.6


def test_paired_loss_tests_follow_the_table3_rule():
    """The reference lower on every motion than freedom and lgd_mc: confirmed; lgd_mc lower on most: not; a
    reference lower on most motions but with a heavy tail: the sign test says lower, the mean difference the
    reverse, and the tail column counts the failed motions."""
    from lossguide.experiments.motion import paired_loss_tests

    ref = [1.0] * 30
    per = {"none": [9.0] * 30, "shen2024 − RA": ref, "freedom": [2.0] * 30, "lgd_mc": [1.5] * 29 + [0.5]}
    rows, text = paired_loss_tests(per)
    assert [r["motions where reference lower"] for r in rows] == [30, 29]
    assert "Verdict: **confirmed**" in text and "every other guided row: **yes**" in text
    assert rows[0]["mean difference [95% CI]"] == "-1.00 [-1.00, -1.00]"
    per["lgd_mc"] = [0.5] * 25 + [1.5] * 5
    rows, text = paired_loss_tests(per)
    assert rows[1]["verdict"] == "lgd_mc lower" and "Verdict: **not confirmed**" in text
    per = {"none": [9.0] * 30, "shen2024 − RA": [1.0] * 25 + [40.0] * 5, "freedom": [2.0] * 30}
    rows, text = paired_loss_tests(per)
    assert rows[0]["verdict"] == "shen2024 − RA lower"  # 25 of 30 motions
    assert rows[0]["mean Loss (reference / method)"] == "7.50 / 2.00"
    assert rows[0]["mean difference [95% CI]"].startswith("+5.50 [+")  # the interval excludes 0 on the other side
    assert rows[0]["motions ≥ unguided median (reference / method)"] == "5 / 0"
