"""Human motion data: pybullet's humanoid motion-capture clips, forward kinematics, training windows.

The clips ship inside the ``pybullet`` package (``pybullet_data/data/motions/humanoid3d_*.txt`` and
``walker/*.txt``, DeepMimic's format) and are read from there, never copied. A frame is
``[duration, root xyz (3), root quaternion (w, x, y, z), then per joint a quaternion (spherical) or an
angle (revolute knee/elbow)]``; the world is y-up with the ground plane x–z, and the character faces +x.
Positions are in metres; the skeleton's offsets (``humanoid/humanoid.urdf``) are in the URDF's units,
which pybullet's DeepMimic environment loads with ``globalScaling=0.25``.

Representation (per frame, :data:`N_FEATURES` = 61 numbers; a window is ``[L, 61]``):
root ground position (x, z) relative to the window's first frame, root height y, root rotation as the
6-D representation of Zhou et al. (2019) (first two columns of the matrix; it carries the heading),
the 8 spherical joints' local rotations in 6-D, and the 4 revolute angles. Rotations (not joint
positions) keep bone lengths exact, and :func:`forward_kinematics` turns any window, generated or
real, into joint positions in metres for losses and plots; absolute root coordinates make target and
obstacle losses plain functions of x0.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

FPS = 20  # HumanML3D's rate (Guo et al. 2022), as MDM
WINDOW = 60  # 3 s
DATA_SEED = 0  # the stitched sequences of the shipped model (training and realism statistics)
URDF_SCALE = 0.25

# (name, kind) in the order of a DeepMimic frame after the root
JOINTS = (
    ("chest", "spherical"),
    ("neck", "spherical"),
    ("right_hip", "spherical"),
    ("right_knee", "revolute"),
    ("right_ankle", "spherical"),
    ("right_shoulder", "spherical"),
    ("right_elbow", "revolute"),
    ("left_hip", "spherical"),
    ("left_knee", "revolute"),
    ("left_ankle", "spherical"),
    ("left_shoulder", "spherical"),
    ("left_elbow", "revolute"),
)
SPHERICAL = tuple(n for n, k in JOINTS if k == "spherical")
REVOLUTE = tuple(n for n, k in JOINTS if k == "revolute")
N_FEATURES = 2 + 1 + 6 + 6 * len(SPHERICAL) + len(REVOLUTE)  # 61
MIRROR = {n: n.replace("right", "left") if "right" in n else n.replace("left", "right") for n, _ in JOINTS}

# Points computed by FK: every joint, plus wrists, head and toes (positions in the parent link's frame).
POINTS = (
    "root",
    "chest",
    "neck",
    "head",
    "right_hip",
    "right_knee",
    "right_ankle",
    "right_toe",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_hip",
    "left_knee",
    "left_ankle",
    "left_toe",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
)
BONES = (
    ("root", "chest"),
    ("chest", "neck"),
    ("neck", "head"),
    ("root", "right_hip"),
    ("right_hip", "right_knee"),
    ("right_knee", "right_ankle"),
    ("right_ankle", "right_toe"),
    ("root", "left_hip"),
    ("left_hip", "left_knee"),
    ("left_knee", "left_ankle"),
    ("left_ankle", "left_toe"),
    ("chest", "right_shoulder"),
    ("right_shoulder", "right_elbow"),
    ("right_elbow", "right_wrist"),
    ("chest", "left_shoulder"),
    ("left_shoulder", "left_elbow"),
    ("left_elbow", "left_wrist"),
)
# head, toes: end sites not in the URDF's joints; the link geometry gives them (neck sphere centre at
# y = 0.7, foot box centre (0.18, −0.09) with half-size (0.354, 0.11)), in URDF units
_END_SITES = {"head": ("neck", (0.0, 0.7, 0.0)), "right_toe": ("right_ankle", (0.45, -0.2, 0.0))}
_END_SITES["left_toe"] = ("left_ankle", (0.45, -0.2, 0.0))

# Clips used by default: the looping, upright clips. Floor-bound (crawl, roll, get-up), acrobatic
# (backflip, cartwheel) and one-shot (kick, punch) clips are single examples a small model cannot learn
# and are far from the goal-reaching task; ``load_clips(names)`` takes any of them.
LOCOMOTION = (
    "humanoid3d_walk",
    "humanoid3d_run",
    "humanoid3d_jump",
    "humanoid3d_spin",
    "humanoid3d_dance_a",
    "humanoid3d_dance_b",
    "walker/0walk_forward",
    "walker/turn_left0",
    "walker/turn_left1",
    "walker/turn_right0",
    "walker/turn_right1",
)


def pybullet_data_path() -> Path:
    """The installed ``pybullet_data`` folder (the clips and the humanoid's URDF are read from it)."""
    try:
        import pybullet_data
    except ImportError as e:
        raise ImportError("motion data comes from the pybullet package: pip install 'lossguide[motion]'") from e
    return Path(pybullet_data.getDataPath())


# --------------------------------------------------------------------------------------------------
# Skeleton and forward kinematics


@dataclass(frozen=True)
class Skeleton:
    """Offsets (metres) of every point in its parent's frame, in :data:`POINTS` order."""

    parents: tuple[int, ...]  # −1 for the root
    offsets: torch.Tensor  # [P, 3] float64
    rotation_of: tuple[int, ...]  # index into the per-joint rotations (0 = root) that a point's frame uses


@lru_cache(maxsize=1)
def skeleton() -> Skeleton:
    """The humanoid's skeleton from ``pybullet_data/humanoid/humanoid.urdf`` (joint origins × 0.25)."""
    text = (pybullet_data_path() / "humanoid" / "humanoid.urdf").read_bytes().decode("latin-1")
    joints = {}
    for m in re.finditer(r'<joint name="(\w+)" type="(\w+)"\s*>(.*?)</joint>', text, re.S):
        body = m.group(3)
        parent = re.search(r'parent link\s*=\s*"(\w+)"', body).group(1)
        xyz = re.search(r'origin[^>]*xyz\s*=\s*"([^"]+)"', body).group(1)
        joints[m.group(1)] = (parent, [float(v) for v in xyz.split()])
    missing = [n for n, _ in JOINTS if n not in joints]
    if missing:
        raise ValueError(f"humanoid.urdf lacks joints {missing}; is pybullet_data the DeepMimic humanoid?")
    joints["right_wrist"] = joints.get("right_wrist", ("right_elbow", [0, -1.035788, 0]))
    joints["left_wrist"] = joints.get("left_wrist", ("left_elbow", [0, -1.035788, 0]))
    for site, (parent, off) in _END_SITES.items():
        joints[site] = (parent, list(off))
    rot_index = {"root": 0, **{n: i + 1 for i, (n, _) in enumerate(JOINTS)}}
    parents, offsets, rot_of = [], [], []
    for p in POINTS:
        if p == "root":
            parents.append(-1)
            offsets.append([0.0, 0.0, 0.0])
            rot_of.append(0)
            continue
        parent, off = joints[p]
        parents.append(POINTS.index(parent))
        offsets.append([v * URDF_SCALE for v in off])
        rot_of.append(rot_index[p] if p in rot_index else rot_index[parent])
    return Skeleton(tuple(parents), torch.tensor(offsets, dtype=torch.float64), tuple(rot_of))


def rot6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """6-D rotation (Zhou et al. 2019, §4.2: Gram–Schmidt on two columns) → matrix ``[..., 3, 3]``."""
    a1, a2 = d6[..., 0:3], d6[..., 3:6]
    b1 = a1 / a1.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    a2 = a2 - (b1 * a2).sum(-1, keepdim=True) * b1
    b2 = a2 / a2.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_rot6d(R: torch.Tensor) -> torch.Tensor:
    """First two columns of ``R`` ``[..., 3, 3]`` → ``[..., 6]``."""
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternion (w, x, y, z) ``[..., 4]`` → rotation matrix ``[..., 3, 3]``."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def rot_z(angle: torch.Tensor) -> torch.Tensor:
    """Rotation about z by ``angle`` ``[...]`` → ``[..., 3, 3]`` (the knees' and elbows' axis)."""
    c, s = torch.cos(angle), torch.sin(angle)
    o, i = torch.zeros_like(angle), torch.ones_like(angle)
    return torch.stack([c, -s, o, s, c, o, o, o, i], dim=-1).reshape(*angle.shape, 3, 3)


def unpack(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split features ``[..., 61]`` into root ground xz, height, rotation matrices ``[..., 13, 3, 3]``."""
    if x.shape[-1] != N_FEATURES:
        raise ValueError(f"motion features have {N_FEATURES} channels in the last axis, got shape {tuple(x.shape)}")
    k = len(SPHERICAL)
    root_rot = rot6d_to_matrix(x[..., 3:9])
    sph = rot6d_to_matrix(x[..., 9 : 9 + 6 * k].reshape(*x.shape[:-1], k, 6))
    rev = rot_z(x[..., 9 + 6 * k :])
    mats, si, ri = [root_rot], 0, 0
    for _, kind in JOINTS:
        if kind == "spherical":
            mats.append(sph[..., si, :, :])
            si += 1
        else:
            mats.append(rev[..., ri, :, :])
            ri += 1
    return {"root_xz": x[..., 0:2], "root_y": x[..., 2], "rotations": torch.stack(mats, dim=-3)}


def forward_kinematics(x: torch.Tensor) -> torch.Tensor:
    """Joint positions in metres ``[..., P, 3]`` (P = len(POINTS)) from motion features ``[..., 61]``."""
    sk = skeleton()
    parts = unpack(x)
    R = parts["rotations"]
    root = torch.stack([parts["root_xz"][..., 0], parts["root_y"], parts["root_xz"][..., 1]], dim=-1)
    offsets = sk.offsets.to(dtype=x.dtype, device=x.device)
    glob_R: list[torch.Tensor | None] = [None] * R.shape[-3]
    glob_R[0] = R[..., 0, :, :]
    pos: list[torch.Tensor] = []
    # joint frames: a joint's global rotation is its parent point's frame times its local rotation
    frame_R: list[torch.Tensor] = []
    for p, name in enumerate(POINTS):
        par = sk.parents[p]
        if par < 0:
            pos.append(root)
            frame_R.append(R[..., 0, :, :])
            continue
        p_R = frame_R[par]
        pos.append(pos[par] + (p_R @ offsets[p].unsqueeze(-1)).squeeze(-1))
        r = sk.rotation_of[p]
        own = name in dict(JOINTS)
        frame_R.append(p_R @ R[..., r, :, :] if own else p_R)
    return torch.stack(pos, dim=-2)


# --------------------------------------------------------------------------------------------------
# Quaternion helpers (numpy, w x y z) for reading and stitching clips


def _qmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def _qy(angle) -> np.ndarray:
    """Rotation about y (the vertical) as a quaternion."""
    angle = np.asarray(angle, dtype=np.float64)
    z = np.zeros_like(angle)
    return np.stack([np.cos(angle / 2), z, np.sin(angle / 2), z], axis=-1)


def _slerp(a: np.ndarray, b: np.ndarray, w) -> np.ndarray:
    """Spherical interpolation between unit quaternions (shortest arc); ``w`` broadcasts over ``[...]``."""
    w = np.asarray(w, dtype=np.float64)[..., None]
    dot = (a * b).sum(-1, keepdims=True)
    b = np.where(dot < 0, -b, b)
    dot = np.abs(dot).clip(max=1.0)
    theta = np.arccos(dot)
    s = np.sin(theta)
    small = s < 1e-6
    wa = np.where(small, 1 - w, np.sin((1 - w) * theta) / np.where(small, 1, s))
    wb = np.where(small, w, np.sin(w * theta) / np.where(small, 1, s))
    q = wa * a + wb * b
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def heading(q: np.ndarray) -> np.ndarray:
    """Heading angle about y of root quaternions (w, x, y, z): the forward axis +x projected on x–z."""
    w, x, y, z = np.moveaxis(q, -1, 0)
    fx = 1 - 2 * (y * y + z * z)
    fz = 2 * (x * z - w * y)
    return np.arctan2(-fz, fx)


@dataclass
class Clip:
    """A clip at :data:`FPS`: root position ``[N, 3]``, root quaternion ``[N, 4]``, local rotations
    (quaternions ``[N, 8, 4]`` for the spherical joints, angles ``[N, 4]`` for the revolute ones)."""

    name: str
    root_pos: np.ndarray
    root_q: np.ndarray
    sph_q: np.ndarray
    rev: np.ndarray
    loop: bool

    def __len__(self) -> int:
        return len(self.root_pos)

    def slice(self, a: int, b: int) -> Clip:
        return Clip(self.name, self.root_pos[a:b], self.root_q[a:b], self.sph_q[a:b], self.rev[a:b], self.loop)


def _parse_frames(frames: np.ndarray):
    root_pos, root_q = frames[:, 1:4], frames[:, 4:8]
    sph, rev, i = [], [], 8
    for _, kind in JOINTS:
        if kind == "spherical":
            sph.append(frames[:, i : i + 4])
            i += 4
        else:
            rev.append(frames[:, i])
            i += 1
    return root_pos, root_q, np.stack(sph, axis=1), np.stack(rev, axis=1)


def _normalize(q: np.ndarray) -> np.ndarray:
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def read_clip(name: str, fps: int = FPS) -> Clip:
    """Read ``data/motions/{name}.txt`` from pybullet_data and resample it to ``fps`` (slerp)."""
    path = pybullet_data_path() / "data" / "motions" / f"{name}.txt"
    if not path.exists():
        raise ValueError(f"no motion clip {name!r} in {path.parent}; names look like 'humanoid3d_walk'")
    d = json.loads(path.read_text())
    frames = np.asarray(d["Frames"], dtype=np.float64)
    if frames.shape[1] != 44:
        raise ValueError(f"{name}: expected DeepMimic humanoid frames of 44 numbers, got {frames.shape[1]}")
    loop = d.get("Loop", "none") == "wrap"
    durations = frames[:-1, 0]
    t_src = np.concatenate([[0.0], np.cumsum(durations)])
    root_pos, root_q, sph_q, rev = _parse_frames(frames)
    root_q, sph_q = _normalize(root_q), _normalize(sph_q)
    t_new = np.arange(0.0, t_src[-1] + 1e-9, 1.0 / fps)
    j = np.clip(np.searchsorted(t_src, t_new, side="right") - 1, 0, len(t_src) - 2)
    w = (t_new - t_src[j]) / np.maximum(t_src[j + 1] - t_src[j], 1e-9)
    w = w.clip(0, 1)
    return Clip(
        name,
        root_pos[j] + w[:, None] * (root_pos[j + 1] - root_pos[j]),
        _slerp(root_q[j], root_q[j + 1], w),
        _slerp(sph_q[j], sph_q[j + 1], w[:, None]),
        rev[j] + w[:, None] * (rev[j + 1] - rev[j]),
        loop,
    )


def _align(seg: Clip, pos_xz: np.ndarray, head: float) -> Clip:
    """Rotate ``seg`` about y and translate it so its first frame stands at ``pos_xz`` facing ``head``."""
    dtheta = head - heading(seg.root_q[0])
    qy = _qy(dtheta)
    c, s = math.cos(dtheta), math.sin(dtheta)
    rel = seg.root_pos - seg.root_pos[:1]
    # rotation about y by θ: (x, z) → (c·x + s·z, −s·x + c·z)
    new = np.stack([c * rel[:, 0] + s * rel[:, 2], rel[:, 1] + seg.root_pos[0, 1], -s * rel[:, 0] + c * rel[:, 2]], 1)
    new[:, 0] += pos_xz[0]
    new[:, 2] += pos_xz[1]
    return Clip(seg.name, new, _qmul(np.broadcast_to(qy, seg.root_q.shape), seg.root_q), seg.sph_q, seg.rev, seg.loop)


def looped(clip: Clip, n_frames: int) -> Clip:
    """Repeat a looping clip (its last frame is the next cycle's first) to at least ``n_frames`` frames,
    carrying the root's displacement and heading change from cycle to cycle."""
    out = clip
    while len(out) < n_frames:
        nxt = _align(clip, out.root_pos[-1, [0, 2]], float(heading(out.root_q[-1])))
        out = _concat(out, nxt.slice(1, len(nxt)))
    return out


def _concat(a: Clip, b: Clip) -> Clip:
    return Clip(
        a.name,
        np.concatenate([a.root_pos, b.root_pos]),
        np.concatenate([a.root_q, b.root_q]),
        np.concatenate([a.sph_q, b.sph_q]),
        np.concatenate([a.rev, b.rev]),
        a.loop,
    )


def load_clips(names=LOCOMOTION, fps: int = FPS) -> list[Clip]:
    """The named clips, resampled to ``fps``."""
    return [read_clip(n, fps) for n in names]


def stitch(clips: list[Clip], n_frames: int, rng: np.random.Generator, blend: int = 5) -> Clip:
    """A sequence of ≥ ``n_frames`` from random segments (1–4 s) of random looping clips.

    Each segment starts at the frame of its clip whose pose is closest to the previous segment's last
    pose, is aligned to the previous root position and heading, and its joint rotations are blended in
    over ``blend`` frames (slerp from the previous pose), so trajectories turn and change speed.
    """
    loops = [c for c in clips if c.loop]
    if not loops:
        raise ValueError("stitching needs looping clips (Loop: wrap)")
    long = [looped(c, len(c) + 5 * FPS) for c in loops]
    out = None
    while out is None or len(out) < n_frames:
        k = int(rng.integers(len(long)))
        src, cycle = long[k], len(loops[k]) - 1
        m = int(rng.integers(FPS, 4 * FPS + 1))
        if out is None:
            start = int(rng.integers(max(cycle, 1)))
            out = src.slice(start, start + m)
            continue
        # closest pose in one cycle (chordal distance of the local quaternions, sign-invariant)
        cand = src.sph_q[: max(cycle, 1)]
        dist = (1 - np.abs((cand * out.sph_q[-1]).sum(-1))).sum(-1)
        dist = dist + 0.1 * np.abs(src.rev[: max(cycle, 1)] - out.rev[-1]).sum(-1)
        start = int(np.argmin(dist))
        seg = _align(src.slice(start, start + m + 1), out.root_pos[-1, [0, 2]], float(heading(out.root_q[-1])))
        w = np.minimum(np.arange(1, len(seg) + 1) / (blend + 1), 1.0)
        seg.sph_q = _slerp(np.broadcast_to(out.sph_q[-1], seg.sph_q.shape), seg.sph_q, w[:, None])
        seg.rev = out.rev[-1] + w[:, None] * (seg.rev - out.rev[-1])
        seg.root_pos[:, 1] = out.root_pos[-1, 1] + w * (seg.root_pos[:, 1] - out.root_pos[-1, 1])
        out = _concat(out, seg.slice(1, len(seg)))
    return out


def clip_features(clip: Clip) -> torch.Tensor:
    """Features ``[N, 61]`` (float64) of a clip in world coordinates (root xz not yet re-centred)."""
    root_R = quat_to_matrix(torch.from_numpy(clip.root_q))
    sph_R = quat_to_matrix(torch.from_numpy(clip.sph_q))
    N = len(clip)
    return torch.cat(
        [
            torch.from_numpy(clip.root_pos[:, [0, 2]]),
            torch.from_numpy(clip.root_pos[:, 1:2]),
            matrix_to_rot6d(root_R),
            matrix_to_rot6d(sph_R).reshape(N, -1),
            torch.from_numpy(clip.rev),
        ],
        dim=1,
    )


# --------------------------------------------------------------------------------------------------
# Windows and their augmentations (feature space, batched torch)


def rotate_heading(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate windows ``[B, L, 61]`` about the vertical through the origin by ``angle`` ``[B]``."""
    c, s = torch.cos(angle).view(-1, 1), torch.sin(angle).view(-1, 1)
    out = x.clone()
    px, pz = x[..., 0], x[..., 1]
    out[..., 0] = c * px + s * pz
    out[..., 1] = -s * px + c * pz
    for col in (3, 6):  # the root matrix's two stored columns: R ← R_y(angle)·R
        vx, vz = x[..., col], x[..., col + 2]
        out[..., col] = c * vx + s * vz
        out[..., col + 2] = -s * vx + c * vz
    return out


def window_heading(x: torch.Tensor) -> torch.Tensor:
    """Heading of the first frame of windows ``[B, L, 61]``: the root's +x axis projected on x–z."""
    return torch.atan2(-x[:, 0, 5], x[:, 0, 3])


def canonicalize(x: torch.Tensor) -> torch.Tensor:
    """Move windows so frame 0's root is above the origin and faces +x."""
    x = x.clone()
    x[..., 0:2] = x[..., 0:2] - x[:, :1, 0:2]
    return rotate_heading(x, -window_heading(x))


def mirror(x: torch.Tensor) -> torch.Tensor:
    """Reflect windows ``[..., 61]`` through the x–y plane (z → −z) and swap left and right.

    A rotation R becomes M·R·M with M = diag(1, 1, −1): both stored columns get their z negated.
    The revolute joints turn about z, which the reflection keeps.
    """
    k = len(SPHERICAL)
    out = x.clone()
    out[..., 1] = -x[..., 1]
    out[..., 5] = -x[..., 5]
    out[..., 8] = -x[..., 8]
    sph = x[..., 9 : 9 + 6 * k].reshape(*x.shape[:-1], k, 6).clone()
    sph[..., 2] = -sph[..., 2]
    sph[..., 5] = -sph[..., 5]
    perm_s = [SPHERICAL.index(MIRROR[n]) for n in SPHERICAL]
    out[..., 9 : 9 + 6 * k] = sph[..., perm_s, :].reshape(*x.shape[:-1], 6 * k)
    perm_r = [REVOLUTE.index(MIRROR[n]) for n in REVOLUTE]
    out[..., 9 + 6 * k :] = x[..., 9 + 6 * k :][..., perm_r]
    return out


@dataclass
class MotionData:
    """Long stitched sequences (features, float32) from which training windows are cut."""

    sequences: list[torch.Tensor]
    window: int = WINDOW

    @classmethod
    def build(
        cls,
        names=LOCOMOTION,
        n_sequences: int = 48,
        seconds: float = 30.0,
        seed: int = 0,
        window: int = WINDOW,
        plain_share: float = 0.5,
    ) -> MotionData:
        """``n_sequences`` sequences of ``seconds``: the first ``plain_share`` loop one clip each (in turn),
        the rest are stitched from random clips; ``seed`` fixes everything."""
        clips = load_clips(names)
        loops = [c for c in clips if c.loop]
        rng = np.random.default_rng(seed)
        n = int(seconds * FPS)
        seqs = []
        for i in range(n_sequences):
            if i < plain_share * n_sequences:
                seq = looped(loops[i % len(loops)], n)
            else:
                seq = stitch(clips, n, rng)
            seqs.append(clip_features(seq).float())
        return cls(seqs, window)

    def windows(self, n: int, generator: torch.Generator, augment: bool = True) -> torch.Tensor:
        """``n`` random windows ``[n, L, 61]``: random sequence and offset, canonicalized, then (if
        ``augment``) mirrored with probability 1/2 and rotated to a uniform random heading."""
        L = self.window
        lens = torch.tensor([len(s) - L for s in self.sequences], dtype=torch.float64)
        which = torch.multinomial(lens / lens.sum(), n, replacement=True, generator=generator)
        u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
        out = []
        for i in range(n):
            s = self.sequences[int(which[i])]
            a = int(u[i, 0] * (len(s) - L))
            out.append(s[a : a + L])
        x = canonicalize(torch.stack(out))
        if augment:
            flip = u[:, 1] < 0.5
            x[flip] = mirror(x[flip])
            x = rotate_heading(x, (u[:, 2] * 2 * math.pi).to(x.dtype))
        return x


def _rotate_xz(v: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate ground-plane vectors (x, z) ``[..., 2]`` about the vertical by ``angle`` ``[...]``."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([c * v[..., 0] + s * v[..., 1], -s * v[..., 0] + c * v[..., 1]], dim=-1)


def frame_heading(x: torch.Tensor) -> torch.Tensor:
    """Heading of every frame ``[..., L]``: the root's +x axis (6-D column 0) projected on x–z."""
    return torch.atan2(-x[..., 5], x[..., 3])


def positions_to_velocity(x: torch.Tensor, fps: int = FPS) -> torch.Tensor:
    """The model's representation (as HumanML3D's root velocity, Guo et al. 2022): channels 0:2 become the
    root's ground velocity (m/s) in the frame's own heading frame, v_i = R(−θ_i)·(p_i − p_{i−1})·fps for
    i ≥ 1 and v_0 = v_1 (windows ``[..., L, 61]``). Walking forward is then +x whatever the heading."""
    v = (x[..., 1:, 0:2] - x[..., :-1, 0:2]) * fps
    v = _rotate_xz(v, -frame_heading(x[..., 1:, :]))
    return torch.cat([torch.cat([v[..., :1, :], v], dim=-2), x[..., 2:]], dim=-1)


def velocity_to_positions(x: torch.Tensor, fps: int = FPS) -> torch.Tensor:
    """Inverse of :func:`positions_to_velocity` with p_0 = 0: p_i = Σ_{j=1..i} R(θ_j)·v_j / fps (differentiable)."""
    v = _rotate_xz(x[..., 1:, 0:2], frame_heading(x[..., 1:, :])) / fps
    p = torch.cat([torch.zeros_like(v[..., :1, :]), torch.cumsum(v, dim=-2)], dim=-2)
    return torch.cat([p, x[..., 2:]], dim=-1)


def feature_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std over windows ``[N, L, 61]`` (std floored at 1e-2 for near-constant ones)."""
    flat = x.reshape(-1, x.shape[-1]).double()
    return flat.mean(0).float(), flat.std(0).clamp_min(1e-2).float()
