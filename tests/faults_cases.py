"""The hostile-input and fault cases of tests/test_faults.py (issue #12 and #20): no traceback and no silent wrong
result for bad input.

Each :class:`Case` declares what it expects: ``ok`` (exit 0 and the stated effect, checked by ``check``) or
``error`` (exit ≠ 0, exactly one line on stderr matching ``match``, a regex naming the cause, no "Traceback" and
no file written or changed; for the Python API: an exception whose one-line message matches). :func:`verdict`
names what went wrong, in the words of the old benchmarks/faults.py report:

- ``traceback``: an exception escaped ``lossguide.cli.main`` (or stderr shows a Python traceback; for the API,
  an exception of a bug's type: KeyError, AttributeError, IndexError, ...);
- ``silent``: an expected error exited 0 (or returned), or an ``ok`` case ran without its stated effect;
- ``unclear``: an error, but not one line, or its message does not match ``match``;
- ``other``: anything else (an ``ok`` case that failed, an error that wrote files first, ...).

CLI cases run in this process through ``lossguide.cli.main(argv)`` with stdout/stderr captured; only signals use
subprocesses. Read-only folders and full disks are small tmpfs mounts where this process may mount them, and are
otherwise simulated by monkeypatching ``os.open``/``os.mkdir`` (EROFS) and ``os.fsync`` (ENOSPC).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUG_TYPES = (KeyError, AttributeError, IndexError, NameError, AssertionError, ZeroDivisionError, UnboundLocalError,
             StopIteration, RecursionError, MemoryError)  # fmt: skip


@dataclass
class Case:
    id: str
    group: str
    expect: str  # "ok" or "error"
    argv: list[str] | None = None  # a CLI call; "{d}" is the case's folder, "{ro}" read-only, "{full}" a full disk
    api: Callable | None = None  # api(ctx): a Python API call (raises for an error)
    proc: Callable | None = None  # proc(ctx) -> Result: a subprocess (signals)
    setup: Callable | None = None  # setup(ctx): files the case needs
    match: str | None = None  # regex that the one stderr line / the exception message must match
    check: Callable | None = None  # check(ctx, res) -> None or why the stated effect is missing
    nowrite: bool = False  # an error case: ``{d}/run`` must not exist afterwards (validated before any write)
    writes: bool = False  # an error case that may leave files (an interrupted or out-of-space run keeps its progress)
    needs: tuple[str, ...] = ()  # "ro", "full": the fixtures it needs


@dataclass
class Result:
    rc: int | None = None
    out: str = ""
    err: str = ""
    exc: BaseException | None = None
    tb: str = ""
    value: object = None
    wall: float = 0.0


@dataclass
class Ctx:
    d: Path
    shared: dict
    stack: contextlib.ExitStack
    ro: Path | None = None
    full: Path | None = None

    def fmt(self, s: str) -> str:
        return s.format(d=self.d, ro=self.ro, full=self.full, rgb=self.shared.get("rgb", ""), py=sys.executable)


# -- fixtures: tiny models, read-only folders, full disks ------------------------------------------------
def _mount(path: Path, opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.name != "posix" or shutil.which("mount") is None:
        return False
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    return p.returncode == 0


def _umount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class ReadOnly:
    """A read-only folder: a tmpfs mounted ro, else a chmod 555 folder (enough unless root), else a patch."""

    def __init__(self, path: Path):
        self.path = path
        self.mounted = _mount(path, "ro,size=1m")
        if not self.mounted:
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o555)
        self.patch = not self.mounted and os.geteuid() == 0 if hasattr(os, "geteuid") else False

    @contextlib.contextmanager
    def active(self):
        if not self.patch:
            yield
            return
        real_open, real_mkdir, root = os.open, os.mkdir, str(self.path)

        def refuse(p):
            if str(os.path.abspath(p)).startswith(root):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))

        def fake_open(p, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(p)
            return real_open(p, flags, *a, **k)

        def fake_mkdir(p, *a, **k):
            refuse(p)
            return real_mkdir(p, *a, **k)

        os.open, os.mkdir = fake_open, fake_mkdir
        try:
            yield
        finally:
            os.open, os.mkdir = real_open, real_mkdir

    def close(self):
        if self.mounted:
            _umount(self.path)
        elif self.path.exists():
            self.path.chmod(0o755)


class FullDisk:
    """A folder on a nearly full disk: a 64 KiB tmpfs with ``free_pages`` pages left, else os.fsync raising
    ENOSPC from its ``free_pages``-th call on (in this process only)."""

    def __init__(self, path: Path, free_pages: int = 3):
        self.path, self.free = path, free_pages
        self.mounted = _mount(path, "size=64k")
        if self.mounted:
            self._fill()
        self.calls = 0

    def _fill(self):
        """Fill the disk until ``free`` pages are left (the last write may hit ENOSPC: that is the point)."""
        with open(self.path / ".filler", "wb", buffering=0) as f:
            for _ in range(16 - self.free):
                try:
                    f.write(b"\0" * 4096)
                except OSError:
                    break

    def make_room(self):
        (self.path / ".filler").unlink(missing_ok=True)
        self.free = 10**6

    @contextlib.contextmanager
    def active(self):
        if self.mounted:
            yield
            return
        real = os.fsync

        def fake(fd):
            self.calls += 1
            if self.calls >= self.free:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd)

        os.fsync = fake
        try:
            yield
        finally:
            os.fsync = real

    def close(self):
        if self.mounted:
            _umount(self.path)


def tiny_rgb_model(path: Path) -> Path:
    """A random 3×8×8 diffusers UNet with its scheduler (a model that is not MNIST)."""
    import diffusers

    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )  # fmt: skip
    unet.save_pretrained(path / "unet")
    diffusers.DDPMScheduler(clip_sample=False).save_pretrained(path / "scheduler")
    return path


def tiny_ddim_checkpoint(path: Path) -> Path:
    """A random DDIM-codebase UNet checkpoint (ch 32, resolution 8) as a .pt state dict."""
    import torch

    from lossguide.networks import build_network

    net = build_network("ddim_unet", DDIM_FLAGS)
    torch.save(net.state_dict(), path)
    return path


DDIM_FLAGS = dict(ch=32, out_ch=3, ch_mult=[1], num_res_blocks=1, attn_resolutions=[], resolution=8,
                  in_channels=3, dropout=0.0)  # fmt: skip


# -- running one case -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _cli_streams(out: io.StringIO, err: io.StringIO):
    """stdout/stderr into ``out``/``err`` as a fresh ``lossguide`` process would see them: a root logger without
    handlers (main() binds its own to this stderr) and warnings printed to stderr, not recorded by pytest."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda m, cat, f, ln, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(m, cat, f, ln, line)
            )
            yield
    finally:
        for h in root.handlers:
            if h not in saved:
                h.close()
        root.handlers[:] = saved
        root.setLevel(level)


def run_cli(argv: list[str]) -> Result:
    out, err = io.StringIO(), io.StringIO()
    res = Result()
    t0 = time.perf_counter()
    try:
        with _cli_streams(out, err):
            from lossguide.cli import main  # an import error counts as a traceback too

            try:
                res.rc = main(argv)
            except SystemExit as e:  # argparse, --version
                res.rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - an exception escaping main() is what we count
        res.exc, res.tb = e, traceback.format_exc()
    res.wall = time.perf_counter() - t0
    res.out, res.err = out.getvalue(), err.getvalue()
    return res


def run_api(fn, ctx) -> Result:
    res = Result()
    err = io.StringIO()
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = [logging.StreamHandler(err)]
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err):
            res.value = fn(ctx)
    except Exception as e:  # noqa: BLE001
        res.exc, res.tb = e, traceback.format_exc()
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    res.wall = time.perf_counter() - t0
    res.err = err.getvalue()
    return res


def snapshot(*folders: Path | None) -> dict[str, tuple[int, int]]:
    """Every file under ``folders``: path -> (size, mtime_ns)."""
    snap = {}
    for top in folders:
        if top is not None and top.exists():
            for p in top.rglob("*"):
                if p.is_file():
                    st = p.stat()
                    snap[str(p)] = (st.st_size, st.st_mtime_ns)
    return snap


def _changed(before: dict, after: dict) -> list[str]:
    return sorted({k for k in before.keys() | after.keys() if before.get(k) != after.get(k)})


@contextlib.contextmanager
def case_context(case: Case, tmp: Path, rgb: str):
    """The case's folder ``tmp/case`` with its fixtures (read-only folder, full disk) active, set up."""
    with contextlib.ExitStack() as stack:
        ctx = Ctx(d=tmp / "case", shared={"rgb": rgb}, stack=stack)
        ctx.d.mkdir(parents=True)
        if "ro" in case.needs:
            ro = ReadOnly(tmp / "ro")
            stack.callback(ro.close)
            stack.enter_context(ro.active())
            ctx.ro = ro.path
        if "full" in case.needs:
            fd = FullDisk(tmp / "full")
            stack.callback(fd.close)
            stack.enter_context(fd.active())
            ctx.full, ctx.shared["fulldisk"] = fd.path, fd
        if case.setup:
            case.setup(ctx)
        yield ctx


def call(case: Case, ctx: Ctx) -> Result:
    if case.api is not None:
        return run_api(case.api, ctx)
    if case.proc is not None:
        return case.proc(ctx)
    return run_cli([ctx.fmt(a) for a in case.argv])


def verdict(case: Case, ctx: Ctx, res: Result, before: dict) -> tuple[str, str] | None:
    """None for the expected outcome, else (category, detail)."""
    if case.api is not None:
        if res.exc is not None:
            msg = str(res.exc)
            if isinstance(res.exc, BUG_TYPES):
                return "traceback", res.tb
            if case.expect == "ok":
                return "other", f"raised {type(res.exc).__name__}: {msg}"
            if "\n" in msg.strip() or not (case.match and re.search(case.match, msg)):
                return "unclear", f"{type(res.exc).__name__}: {msg}"
            if case.nowrite and (ctx.d / "run").exists():
                return "other", f"wrote {ctx.d / 'run'} before failing: {msg}"
            return None
        if case.expect == "error":
            return "silent", f"no exception (returned {res.value!r:.200})"
        why = case.check(ctx, res) if case.check else None
        return ("silent", why) if why else None
    if res.exc is not None:
        return "traceback", res.tb
    if "Traceback (most recent call last)" in res.err:
        return "traceback", res.err
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    if case.expect == "ok":
        if res.rc != 0:
            return "other", f"exit {res.rc}: {' | '.join(lines[-3:])}"
        why = case.check(ctx, res) if case.check else None
        return ("silent", why) if why else None
    if res.rc == 0:
        return "silent", f"exit 0; stdout: {res.out.strip()[-200:]}"
    if len(lines) != 1:
        return "unclear", f"exit {res.rc}, {len(lines)} stderr lines: {' | '.join(lines)[-400:]}"
    if not (case.match and re.search(case.match, lines[0])):
        return "unclear", f"exit {res.rc}: {lines[0]!r} does not match {case.match!r}"
    if case.nowrite and (ctx.d / "run").exists():
        return "other", f"wrote {ctx.d / 'run'} before failing: {lines[0]}"
    changed = [] if case.writes else _changed(before, snapshot(ctx.d, ctx.ro))
    if changed:
        return "other", f"wrote or changed {changed[:5]} before failing: {lines[0]}"
    why = case.check(ctx, res) if case.check else None
    return ("other", why) if why else None


# -- helpers to write the cases ------------------------------------------------------------------------
CASES: list[Case] = []


def case(id, group, expect, argv=None, **kw) -> None:
    if any(c.id == id for c in CASES):
        raise ValueError(f"duplicate case id {id}")
    CASES.append(Case(id, group, expect, argv, **kw))


def S(*extra, out="{d}/run", fast=False) -> list[str]:
    """A tiny ``lossguide sample`` call (2 steps, seeds 0-1, batch 2) plus ``extra``."""
    base = ["sample", "--steps", "2", "--seeds", "0-1", "--batch", "2", "--quiet", "--out", out]
    return base + (["--set", "n_aug=2", "--set", "n_recur=1"] if fast else []) + list(extra)


def over(argv: list[str], **flags) -> list[str]:
    """``argv`` with ``--flag value`` replaced (or added); None removes the flag."""
    argv = list(argv)
    for k, v in flags.items():
        f = "--" + k.replace("_", "-")
        if f in argv:
            i = argv.index(f)
            del argv[i : i + 2]
        if v is not None:
            argv += [f, str(v)]
    return argv


def write(rel: str, text: str | bytes):
    def setup(ctx):
        p = ctx.d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(ctx.fmt(text) if isinstance(text, str) else text)

    return setup


def yaml_file(rel: str, obj):
    import yaml

    return write(rel, yaml.safe_dump(obj, sort_keys=False).replace("{", "{{").replace("}", "}}"))


def seq(*fns):
    def setup(ctx):
        for f in fns:
            f(ctx)

    return setup


def files(ctx, pattern="run/*.png") -> list[str]:
    return sorted(p.name for p in ctx.d.glob(pattern))


def metrics(ctx, rel="run/metrics.json") -> dict:
    return json.loads((ctx.d / rel).read_text())


def need(cond: bool, why: str):
    return None if cond else why


def prior_run(*extra, rel="run"):
    """Setup: a finished tiny run in ``{d}/<rel>``."""

    def setup(ctx):
        r = run_cli([ctx.fmt(a) for a in S(*extra, out=f"{{d}}/{rel}", fast=True)])
        if r.rc != 0 or r.exc is not None:
            raise RuntimeError(f"the prior run failed: {r.err or r.exc}")

    return setup


# == lossguide sample: flags ===============================================================================
G = "sample"
for v, m in [
    ("10", r"--target must be a digit class 0\.\.9, got 10"),
    ("-1", r"--target must be a digit class"),
    ("abc", r"argument --target: invalid int value: 'abc'"),
    ("3.5", r"--target: invalid int value"),
]:
    case(f"target-{v}", G, "error", S("--target", v), match=m, nowrite=True)
case("target-7-eta-1e-3", G, "ok", S("--target", "7", "--set", "eta=1e-3", "--set", "n_aug=2", "--set", "n_recur=1"),
     check=lambda c, r: need(metrics(c)["target"] == 7 and "eta: 0.001" in (c.d / "run/config.yaml").read_text(),
                             "target 7 / eta 0.001 not in the run"))  # fmt: skip
for v, m in [("0.5", r"bad seed '0\.5'"), ("[]", r"bad seed '\[\]'"), ("5-3", r"bad seed range '5-3'"),
             ("0-99999999", r"more than 1,000,000"), ("", r"at least one seed"), (",", r"at least one seed"),
             ("0-3,2", r"no seed twice"), ("-3", r"seeds are integers ≥ 0"), ("a-b", r"bad seed 'a'"),
             ("0-999999999999999999999", r"more than 1,000,000"), ("1e3", r"bad seed '1e3'")]:  # fmt: skip
    case(f"seeds-{v or 'empty'}", G, "error", over(S(), seeds=v), match=m, nowrite=True)
case(
    "seeds-3-alone",
    G,
    "ok",
    over(S(fast=True), seeds="3"),
    check=lambda c, r: need(files(c, "run/records/*.json") == ["000003.json"], f"records {files(c, 'run/records/*')}"),
)
for v, m in [("0", r"--steps must be ≥ 1, got 0"), ("-1", r"--steps must be ≥ 1, got -1"),
             ("abc", r"argument --steps: invalid int value: 'abc'"), ("1e9", r"argument --steps: invalid int value"),
             ("2.5", r"argument --steps: invalid int value"),
             ("1000000000", r"--steps 1000000000 .*1000")]:  # fmt: skip
    case(f"steps-{v}", G, "error", over(S(), steps=v), match=m, nowrite=True)
for v, m in [
    ("-1", r"--ddim-eta must be a finite number ≥ 0.*got -1"),
    ("nan", r"--ddim-eta must be a finite"),
    ("inf", r"--ddim-eta must be a finite"),
    ("x", r"argument --ddim-eta: invalid float value: 'x'"),
]:
    case(f"ddim-eta-{v}", G, "error", S("--ddim-eta", v), match=m, nowrite=True)
for v, m in [
    ("0", r"--batch must be ≥ 1, got 0"),
    ("-2", r"--batch must be ≥ 1, got -2"),
    ("x", r"argument --batch: invalid int value: 'x'"),
]:
    case(f"batch-{v}", G, "error", over(S(), batch=v), match=m, nowrite=True)
case("method-unknown", G, "error", S("--method", "bogus"), match=r"argument --method: unknown method 'bogus'")
case(
    "method-cg-sketch",
    G,
    "error",
    S("--method", "cg", "--loss", "sketch"),
    match=r"--method cg .*class loss",
    nowrite=True,
)
case(
    "method-none-with-eta",
    G,
    "error",
    S("--method", "none", "--set", "eta=1"),
    match=r"method 'none' has no parameter 'eta'",
    nowrite=True,
)
case(
    "method-none",
    G,
    "ok",
    S("--method", "none"),
    check=lambda c, r: need(metrics(c)["method"] == "none" and metrics(c)["nfe"] == 2, "not an unguided 2-step run"),
)
SETS = [
    ("eta=nan", r"eta must be a finite number > 0, got nan"), ("eta=inf", r"eta must be a finite number > 0, got inf"),
    ("eta=-inf", r"eta must be a finite number > 0, got -inf"),
    ("eta=abc", r"eta must be a finite number > 0, got 'abc'"),
    ("eta=", r"eta must be a finite number > 0, got ''"), ("eta=0", r"eta must be a finite number > 0, got 0"),
    ("bogus=1", r"has no parameter 'bogus'"), ("eta", r"--set expects key=value, got 'eta'"),
    ("=3", r"has no parameter ''"), ("n_aug=2.5", r"n_aug must be an integer ≥ 0, got 2\.5"),
    ("n_aug=2.0", r"write n_aug=2\b"), ("n_aug=-1", r"n_aug must be an integer ≥ 0, got -1"),
    ("n_aug=abc", r"n_aug must be an integer ≥ 0, got 'abc'"), ("n_aug=1e1", r"write n_aug=10\b"),
    ("n_aug=nan", r"n_aug must be an integer"), ("n_recur=0", r"n_recur must be an integer ≥ 1, got 0"),
    ("n_recur=1.5", r"n_recur must be an integer ≥ 1, got 1\.5"), ("n_recur=inf", r"n_recur must be an integer"),
    ("recur_window=0.8,0.3", r"recur_window must be a pair"), ("recur_window=0.3", r"recur_window must be a pair"),
    ("window=0,1.5", r"window must be a pair"), ("polyak=yes", r"polyak must be true or false, got 'yes'"),
    ("polyak=1", r"polyak must be true or false, got 1"),
    ("polyak_gap=ell", r"polyak_gap must be one of 'eps', 'loss'"),
    ("augment=photo", r"augment must be a callable"), ("max_ratio=0", r"max_ratio must be a finite number > 0"),
    ("loss_floor=nan", r"loss_floor must be a finite number"),
]  # fmt: skip
for s, m in SETS:
    case(f"set-{s}", G, "error", S("--set", s), match=m, nowrite=True)
case("set-twice", G, "error", S("--set", "eta=0.1", "--set", "eta=0.2"), match=r"--set eta given twice", nowrite=True)
for meth, s, m in [("tfg", "n_iter=0", r"n_iter must be an integer ≥ 1, got 0"),
                   ("tfg", "n_iter=2.5", r"n_iter must be an integer ≥ 1, got 2\.5"),
                   ("tfg", "n_recur=2.0", r"write n_recur=2\b"),
                   ("ugd", "n_iter=-1", r"n_iter must be an integer ≥ 0"),
                   ("lgd_mc", "n_mc=0", r"n_mc must be an integer ≥ 1, got 0"),
                   ("lgd_mc", "mc_sigma=nan", r"mc_sigma must be a finite number ≥ 0, got nan"),
                   ("dps", "scale=-1", r"scale must be a finite number ≥ 0, got -1"),
                   ("tfg", "rho_schedule=up", r"rho_schedule must be one of"),
                   ("cg", "scale=inf", r"scale must be a finite number ≥ 0, got inf")]:  # fmt: skip
    case(f"set-{meth}-{s}", G, "error", S("--method", meth, "--set", s), match=m, nowrite=True)
case("loss-unknown", G, "error", S("--loss", "bogus"), match=r"argument --loss: invalid choice: 'bogus'")
case(
    "reference-huge",
    G,
    "error",
    S("--loss", "sketch", "--reference", "99999"),
    match=r"--reference must be in \[0, \d+\]",
    nowrite=True,
)
case(
    "reference-negative",
    G,
    "error",
    S("--loss", "sketch", "--reference", "-1"),
    match=r"--reference must be (in \[0, \d+\]|≥ 0), got -1",
    nowrite=True,
)
case(
    "reference-ignored",
    G,
    "error",
    S("--loss", "class", "--reference", "5"),
    match=r"--reference .*--loss class",
    nowrite=True,
)
case("norm-unknown", G, "error", S("--norm", "l1"), match=r"argument --norm: invalid choice: 'l1'")
case("norm-ignored", G, "error", S("--loss", "class", "--norm", "l2"), match=r"--norm .*--loss class", nowrite=True)
case("model-missing-folder", G, "error", S("--model", "{d}/nope"), match=r"no model '.*nope'", nowrite=True)
case("model-missing-name", G, "error", S("--model", "mnist-ddpm2"), match=r"no model 'mnist-ddpm2'", nowrite=True)
case(
    "model-hub-offline",
    G,
    "error",
    S("--model", "owner/name"),
    match=r"cannot load 'owner/name'.*huggingface-cli download",
    nowrite=True,
)
case(
    "model-a-file",
    G,
    "error",
    S("--model", "{d}/model.txt"),
    setup=write("model.txt", "hello"),
    match=r"cannot load '.*model\.txt'",
    nowrite=True,
)
case(
    "model-empty-folder",
    G,
    "error",
    S("--model", "{d}/empty"),
    setup=lambda c: (c.d / "empty").mkdir(),
    match=r"cannot load '.*empty'|/empty/config\.json is missing, so .*/empty is no diffusers model folder",
    nowrite=True,
)
case(
    "model-bad-config",
    G,
    "error",
    S("--model", "{d}/m"),
    setup=write("m/unet/config.json", "{{not json"),
    match=r"cannot load '.*/m'|/m/unet/config\.json is not valid JSON",
    nowrite=True,
)
case(
    "model-missing-pt", G, "error", S("--model", "{d}/ckpt.pt"), match=r"no checkpoint file '.*ckpt\.pt'", nowrite=True
)
case("model-rgb-guided", G, "error", S("--model", "{rgb}"), match=r"makes samples of shape \(3, 8, 8\)", nowrite=True)
case(
    "model-rgb-none",
    G,
    "ok",
    S("--model", "{rgb}", "--method", "none"),
    check=lambda c, r: need("not_applicable" in metrics(c) and "unguided" in r.out, "no not_applicable metrics"),
)
for v, m in [("cuda", r"--device 'cuda': cuda is not available here"),
             ("gpu0", r"--device 'gpu0' is not a torch device"),
             ("cuda:5", r"--device 'cuda:5'"), ("mps", r"--device 'mps': mps is not available"),
             ("", r"--device '' is not a torch device"), ("meta", r"--device 'meta'"),
             ("CPU", r"--device 'CPU' is not a torch device")]:  # fmt: skip
    case(f"device-{v or 'empty'}", G, "error", S("--device", v), match=m, nowrite=True)
case("out-a-file", G, "error", S(out="{d}/f"), setup=write("f", "x"), match=r"--out .*/f is an existing file")
case(
    "out-under-a-file", G, "error", S(out="{d}/f/run"), setup=write("f", "x"), match=r"/f/run.*(Not a directory|file)"
)
case(
    "out-read-only",
    G,
    "error",
    S(out="{ro}/run"),
    needs=("ro",),
    match=r"cannot create the run folder .*/run: .*(Read-only|Permission).*writable",
)
case(
    "out-other-config",
    G,
    "error",
    S("--set", "n_aug=3", "--set", "n_recur=1"),
    setup=prior_run(),
    match=r"holds a run with a different config; .*--overwrite",
)
case("out-overwrite", G, "ok", over(S("--set", "n_aug=3", "--set", "n_recur=1", "--overwrite"), seeds="0"),
     setup=prior_run(),
     check=lambda c, r: need(files(c) == ["000000.png", "grid.png"]
                             and "n_aug: 3" in (c.d / "run/config.yaml").read_text(),
                             f"after --overwrite: {files(c)}"))  # fmt: skip


def _same_records(c, r):
    recs = {p.name: p.stat().st_mtime_ns for p in (c.d / "run/records").iterdir()}
    return need(recs == c.shared.get(f"mtimes-{c.d.name}"), "finished seeds were recomputed")


def _prior_and_mtimes(c):
    prior_run()(c)
    c.shared[f"mtimes-{c.d.name}"] = {p.name: p.stat().st_mtime_ns for p in (c.d / "run/records").iterdir()}


case("out-resume-same", G, "ok", S(fast=True), setup=_prior_and_mtimes, check=_same_records)
case("version", G, "ok", ["--version"], check=lambda c, r: need(r.out.startswith("lossguide "), "no version"))
case("no-subcommand", G, "error", [], match=r"(the following arguments are required|required): command")
case("unknown-subcommand", G, "error", ["sampel"], match=r"invalid choice: 'sampel'")
case("unknown-flag", G, "error", S("--stpes", "3"), match=r"unrecognized arguments: --stpes 3")

# == lossguide sample --config: a sample config =============================================================
G = "config"
CFG = {"steps": 2, "seeds": "0-1", "batch": 2, "params": {"n_aug": 2, "n_recur": 1}}


def cfg_case(id, expect, match=None, drop=(), **changes):
    d = {**CFG, **changes}
    for k in drop:
        d.pop(k, None)
    case(
        f"cfg-{id}",
        G,
        expect,
        ["sample", "--config", "{d}/c.yaml", "--out", "{d}/run", "--quiet"],
        setup=yaml_file("c.yaml", d),
        match=match,
        nowrite=expect == "error",
    )


cfg_case("ok", "ok")
cfg_case("params-list", "error", r"params must be a mapping", params=["eta", 0.1])
cfg_case("params-string", "error", r"params must be a mapping", params="eta=0.1")
cfg_case("typo-key", "error", r"unknown keys? \['stpes'\]", stpes=3)
cfg_case("steps-string", "error", r"steps must be an integer", steps="abc")
cfg_case("steps-zero", "error", r"steps must be ≥ 1, got 0", steps=0)
cfg_case("batch-float", "error", r"batch must be an integer", batch=2.5)
cfg_case("batch-bool", "error", r"batch must be an integer", batch=True)
cfg_case("target-float", "error", r"target must be an integer", target=3.0)
cfg_case("target-string", "error", r"target must be an integer", target="3")
cfg_case("seeds-dup", "error", r"no seed twice", seeds=[0, 0])
cfg_case("seeds-float", "error", r"bad seed", seeds=[0.5])
cfg_case("seeds-negative", "error", r"bad seed|seeds are integers", seeds=[-1])
cfg_case("seeds-empty", "error", r"at least one seed", seeds=[])
cfg_case("guidance-list", "error", r"guidance .*mapping", guidance=[1])
cfg_case("guidance-string", "error", r"guidance .*mapping", guidance="shen2024")
cfg_case("ddim-eta-nan", "error", r"ddim.eta must be a finite number", ddim_eta=float("nan"))
cfg_case("ddim-eta-string", "error", r"ddim.eta must be a finite number", ddim_eta="0.5")
cfg_case("device-cuda", "error", r"cuda is not available here", device="cuda")
cfg_case("device-int", "error", r"device", device=5)
cfg_case("method-bogus", "error", r"unknown method 'bogus'", method="bogus")
cfg_case("method-list", "error", r"method must be a string|unknown method", method=["shen2024"])
cfg_case("loss-bogus", "error", r"unknown loss 'bogus'", loss="bogus")
cfg_case("norm-bogus", "error", r"norm must be one of", norm="l3")
cfg_case("params-eta-nan", "error", r"eta must be a finite number > 0, got nan", params={"eta": float("nan")})
cfg_case("params-unknown", "error", r"has no parameter 'etaa'", params={"etaa": 0.1})
cfg_case("model-null", "error", r"model must be a string|no model", model=None)
case(
    "cfg-with-steps-flag",
    G,
    "error",
    ["sample", "--config", "{d}/c.yaml", "--steps", "3", "--out", "{d}/run"],
    setup=yaml_file("c.yaml", CFG),
    match=r"--steps cannot be combined with --config",
)
case(
    "cfg-invalid-yaml",
    G,
    "error",
    ["sample", "--config", "{d}/c.yaml", "--out", "{d}/run"],
    setup=write("c.yaml", "steps: 2\nparams: {{eta: [\n"),
    match=r"is not valid YAML at line \d+",
)
case(
    "cfg-missing-file",
    G,
    "error",
    ["sample", "--config", "{d}/nope.yaml", "--out", "{d}/run"],
    match=r"no recipe .*nope\.yaml",
)
case(
    "cfg-empty-file",
    G,
    "error",
    ["sample", "--config", "{d}/c.yaml", "--out", "{d}/run"],
    setup=write("c.yaml", ""),
    match=r"c\.yaml.* empty",
)
case(
    "cfg-top-list",
    G,
    "error",
    ["sample", "--config", "{d}/c.yaml", "--out", "{d}/run"],
    setup=write("c.yaml", "- 1\n- 2\n"),
    match=r"must be a mapping",
)
case("cfg-a-folder", G, "error", ["sample", "--config", "{d}", "--out", "{d}/run"], match=r"is a folder|directory")
case(
    "cfg-binary",
    G,
    "error",
    ["sample", "--config", "{d}/c.yaml", "--out", "{d}/run"],
    setup=write("c.yaml", b"\x89PNG\x00\xff\xfe"),
    match=r"c\.yaml",
)

# == recipes =======================================================================================
G = "recipe"
RECIPE = {"name": "tiny", "model": {"kind": "pixel", "path": "mnist-ddpm"}, "loss": {"kind": "none"},
          "method": "none", "sampler": {"steps": 2}, "seeds": "0-1", "batch": 2, "device": "cpu"}  # fmt: skip
DROP = object()


def recipe_case(id, expect, match=None, check=None, **changes):
    r = json.loads(json.dumps(RECIPE))
    for k, v in changes.items():
        if v is DROP:
            r.pop(k, None)
        else:
            r[k] = v
    case(
        f"recipe-{id}",
        G,
        expect,
        ["sample", "--config", "{d}/r.yaml", "--out", "{d}/run", "--quiet"],
        setup=yaml_file("r.yaml", r),
        match=match,
        check=check,
        nowrite=expect == "error",
    )


recipe_case("ok", "ok", check=lambda c, r: need(metrics(c)["n_samples"] == 2, "not 2 samples"))
recipe_case("model-no-path", "error", r"model .*'path'", model={"kind": "pixel"})
recipe_case("latent-no-path", "error", r"model .*'path'", model={"kind": "latent"})
recipe_case("model-path-missing", "error", r"no model '.*nope'", model={"kind": "pixel", "path": "./nope"})
recipe_case("model-missing", "error", r"'model' must be a mapping with a 'kind'", model=DROP)
recipe_case("model-kind-bogus", "error", r"model kind 'bogus' unknown", model={"kind": "bogus", "path": "x"})
recipe_case(
    "model-unknown-key",
    "error",
    r"pixel model has no keys \['bogus'\]",
    model={"kind": "pixel", "path": "mnist-ddpm", "bogus": 1},
)
recipe_case("unknown-key", "error", r"unknown keys \['bogus'\]", bogus=1)
recipe_case("loss-kind-bogus", "error", r"loss kind 'bogus' unknown", loss={"kind": "bogus"})
recipe_case("loss-missing", "error", r"'loss' must be a mapping with a 'kind'", loss=DROP)
recipe_case("loss-unknown-key", "error", r"loss .*\['metrc'\]", loss={"kind": "none", "metrc": "l2"})
recipe_case("clip-text-no-text", "error", r"clip_text .*'text'", loss={"kind": "clip_text"})
recipe_case("classifier-no-network", "error", r"classifier .*'network'", loss={"kind": "classifier", "target": 1})
recipe_case(
    "classifier-no-target",
    "error",
    r"classifier .*'target'",
    loss={"kind": "classifier", "network": {"torchscript": "x.pt"}},
)
recipe_case(
    "feature-no-reference",
    "error",
    r"feature_match .*'reference'",
    loss={"kind": "feature_match", "network": {"torchscript": "x.pt"}},
)
recipe_case(
    "reference-missing",
    "error",
    r"reference image .*nope\.png does not exist",
    loss={"kind": "clip_image", "reference": "nope.png"},
    method="shen2024",
)
recipe_case(
    "network-not-mapping",
    "error",
    r"network .*mapping|a network is",
    loss={"kind": "classifier", "target": 1, "network": "resnet"},
)
recipe_case("method-needs-loss", "error", r"method 'shen2024' needs a loss", method="shen2024")
recipe_case("method-bogus", "error", r"unknown method 'bogus'", method="bogus")
recipe_case("params-list", "error", r"params must be a mapping", params=["eta", 0.1])
recipe_case("params-string", "error", r"params must be a mapping", params="eta=0.1")
recipe_case(
    "params-eta-nan",
    "error",
    r"eta must be a finite number > 0, got nan",
    method="shen2024",
    params={"eta": float("nan")},
)
recipe_case(
    "flags-not-mapping",
    "error",
    r"flags must be a mapping",
    model={"kind": "pixel", "path": "x.pt", "flags": ["a", "b"]},
)
recipe_case(
    "flags-on-diffusers",
    "error",
    r"flags are for original checkpoint files",
    model={"kind": "pixel", "path": "mnist-ddpm", "flags": {"ch": 8}},
)
recipe_case("dtype-bogus", "error", r"unknown dtype 'float64'", model={"kind": "pixel", "path": "mnist-ddpm",
            "dtype": "float64"})  # fmt: skip
recipe_case("state-dtype-bogus", "error", r"unknown dtype 'int8'", model={"kind": "pixel", "path": "mnist-ddpm",
            "state_dtype": "int8"})  # fmt: skip
recipe_case("dtype-number", "error", r"unknown dtype 16", model={"kind": "pixel", "path": "mnist-ddpm", "dtype": 16})
recipe_case("sampler-unknown-key", "error", r"sampler .*\['stesp'\]", sampler={"stesp": 10})
recipe_case(
    "sampler-steps-string", "error", r"sampler.*steps.*'abc'|steps must be an integer", sampler={"steps": "abc"}
)
recipe_case(
    "sampler-steps-zero", "error", r"steps must be|num_steps must be in \[1, 1000\], got 0", sampler={"steps": 0}
)
recipe_case("sampler-not-mapping", "error", r"sampler must be a mapping", sampler=100)
recipe_case("sampler-spacing-bogus", "error", r"spacing 'bogus'", sampler={"steps": 2, "spacing": "bogus"})
recipe_case("sampler-eta-negative", "error", r"eta must be .*≥ 0", sampler={"steps": 2, "eta": -1})
recipe_case("sampler-eta-nan", "error", r"eta must be a finite number", sampler={"steps": 2, "eta": float("nan")})
recipe_case("seeds-dup", "error", r"no seed twice", seeds=[0, 0])
recipe_case("seeds-negative", "error", r"bad seed|seeds are integers", seeds=[-1])
recipe_case("seeds-string-items", "error", r"bad seed", seeds=["a"])
recipe_case("seeds-float", "error", r"bad seed", seeds=[0.5])
recipe_case("batch-zero", "error", r"batch must be an integer ≥ 1, got 0", batch=0)
recipe_case("batch-bool", "error", r"batch must be an integer ≥ 1, got True", batch=True)
recipe_case("window-scalar", "error", r"window must be", window=0.5)
recipe_case("window-reversed", "error", r"window must be", window=[0.8, 0.2])
recipe_case("name-int", "error", r"name must be a string", name=123)
recipe_case("device-cuda", "error", r"cuda is not available here", device="cuda")
case(
    "recipe-run-config",
    G,
    "error",
    ["sample", "--config", "{d}/config.yaml", "--out", "{d}/run2"],
    setup=yaml_file("config.yaml", {**RECIPE, "guidance": {"name": "none"}}),
    match=r"is the config\.yaml a recipe run wrote",
)

# == lossguide bench ================================================================================
G = "bench"
BENCH = ["bench", "--tasks", "oracle-class", "--methods", "none,dps", "--steps", "2", "--n-eval", "4", "--n-tune", "2",
         "--beam-rounds", "0", "--batch", "4", "--out", "{d}/b"]  # fmt: skip


def bench_case(id, expect, match=None, setup=None, check=None, **flags):
    case(f"bench-{id}", G, expect, over(BENCH, **flags), match=match, setup=setup, check=check)


bench_case("ok", "ok", check=lambda c, r: need((c.d / "b/tables.md").is_file() and "cells" in r.out, "no tables.md"))
bench_case("tasks-comma", "error", r"--tasks ',' names no task", tasks=",")
bench_case("tasks-bogus", "error", r"unknown task 'bogus'", tasks="bogus")
bench_case("methods-bogus", "error", r"unknown method 'bogus'", methods="bogus")
bench_case("methods-comma", "error", r"--methods ',' names no method", methods=",")
bench_case("modifier-bogus", "error", r"unknown modifier '\+bogus'", methods="freedom+bogus")
bench_case("none-modifier", "error", r"'none' takes no modifiers", methods="none+ra")
bench_case("minus-on-dps", "error", r"'-' modifiers switch techniques of shen2024 off", methods="dps-ra")
bench_case("n-tune-0", "error", r"--n-tune must be ≥ 1, got 0", n_tune=0)
bench_case("n-tune-negative", "error", r"--n-tune must be ≥ 1, got -3", n_tune=-3)
bench_case("n-eval-0", "error", r"--n-eval must be ≥ 1, got 0", n_eval=0)
bench_case("steps-0", "error", r"--steps must be ≥ 1.*got 0", steps=0)
bench_case("steps-abc", "error", r"--steps .*'abc'", steps="abc")
bench_case("steps-trailing-comma", "error", r"--steps '2,'", steps="2,")
bench_case("steps-huge", "error", r"--steps .*1000|num_steps must be in \[1, 1000\]", steps=5000)
bench_case("tune-steps-0", "error", r"--tune-steps must be ≥ 1 .*got 0", tune_steps=0)
bench_case("tune-steps-huge", "error", r"--tune-steps must be ≥ 1 .*got 5000", tune_steps=5000)
bench_case("batch-0", "error", r"--batch must be ≥ 1, got 0", batch=0)
bench_case("best-of-0", "error", r"--best-of must be ≥ 1, got 0", best_of=0)
bench_case("beam-rounds-negative", "error", r"--beam-rounds must be ≥ 0, got -1", beam_rounds=-1)
bench_case("ddim-eta-nan", "error", r"--ddim-eta must be a finite number ≥ 0", ddim_eta="nan")
bench_case("ddim-eta-negative", "error", r"--ddim-eta must be a finite number ≥ 0", ddim_eta=-1)
bench_case("settings-missing", "error", r"--settings .*nope\.json: no such file", settings="{d}/nope.json")
bench_case(
    "settings-invalid-json",
    "error",
    r"--settings .*s\.json is not valid JSON",
    settings="{d}/s.json",
    setup=write("s.json", "{{oops"),
)
bench_case(
    "settings-list", "error", r"--settings .*s\.json .*mapping", settings="{d}/s.json", setup=write("s.json", "[1]")
)
bench_case(
    "settings-lacks-method",
    "error",
    r"has no step parameter for 'dps' on 'oracle-class'",
    settings="{d}/s.json",
    setup=write("s.json", '{{"oracle-class": {{"freedom": 0.1}}}}'),
)
bench_case("settings-a-folder", "error", r"--settings .*: no such file", settings="{d}")
bench_case(
    "settings-bad-value",
    "error",
    r"scale must be a finite number.*'big'|--settings .*'big'",
    settings="{d}/s.json",
    setup=write("s.json", '{{"oracle-class": {{"dps": "big"}}}}'),
)
bench_case("out-a-file", "error", r"--out .*/f is an existing file", out="{d}/f", setup=write("f", "x"))
bench_case("device-cuda", "error", r"--device 'cuda': cuda is not available", device="cuda")
bench_case("norm-bogus", "error", r"argument --norm: invalid choice", norm="l1")
bench_case("n-eval-abc", "error", r"argument --n-eval: invalid int value", n_eval="abc")
case("bench-out-read-only", G, "error", over(BENCH, out="{ro}/b"), needs=("ro",),
     match=r"cannot create the run folder .*/b: .*(Read-only|Permission).*writable")  # fmt: skip
case(
    "bench-other-config",
    G,
    "error",
    over(BENCH, n_eval=3),
    setup=lambda c: run_cli([c.fmt(a) for a in BENCH]),
    match=r"holds a bench run with a different config",
)

# == lossguide oracle ======================================================================================
G = "oracle"
ORACLE = ["oracle", "--n", "8", "--steps", "2", "--methods", "none,dps"]
case(
    "oracle-ok",
    G,
    "ok",
    ORACLE + ["--json", "{d}/o.json"],
    check=lambda c, r: need(len(json.loads((c.d / "o.json").read_text())["rows"]) == 4, "not 4 rows"),
)
case(
    "oracle-json-read-only",
    G,
    "error",
    ORACLE + ["--json", "{ro}/o.json"],
    needs=("ro",),
    match=r"--json .*/o\.json(?![.\w]).*(Read-only|Permission|writable)"  # checked before the run, or
    r"|(Read-only|Permission)[^:]*: .*/o\.json(?![.\w])",  # (a simulated read-only folder) the write names it
)
case("oracle-json-a-folder", G, "error", ORACLE + ["--json", "{d}"], match=r"--json .* is a folder")
case(
    "oracle-json-under-a-file",
    G,
    "error",
    ORACLE + ["--json", "{d}/f/o.json"],
    setup=write("f", "x"),
    match=r"--json .*/f/o\.json",
)
case("oracle-write-settings-no-tune", G, "error", ORACLE + ["--write-settings"], match=r"--write-settings .*--tune")
case("oracle-tune-n-no-tune", G, "error", ORACLE + ["--tune-n", "5"], match=r"--tune-n .*--tune")
case("oracle-methods-with-tune", G, "error", ["oracle", "--tune", "--methods", "none"], match=r"no grid for .none.")
case("oracle-n-with-tune", G, "error", ["oracle", "--tune", "--n", "8"], match=r"--n .*--tune.*--tune-n")
for v, m in [
    ("0", r"--n must be ≥ 1, got 0"),
    ("-5", r"--n must be ≥ 1, got -5"),
    ("abc", r"argument --n: invalid int value: 'abc'"),
]:
    case(f"oracle-n-{v}", G, "error", over(ORACLE, n=v), match=m)
case("oracle-tune-n-0", G, "error", ["oracle", "--tune", "--tune-n", "0"], match=r"--tune-n must be ≥ 1, got 0")
case("oracle-steps-0", G, "error", over(ORACLE, steps=0), match=r"--steps must be ≥ 1.*got 0")
case("oracle-steps-huge", G, "error", over(ORACLE, steps=5000), match=r"--steps .*1000")
case("oracle-methods-bogus", G, "error", over(ORACLE, methods="bogus"), match=r"unknown method 'bogus'")
case("oracle-methods-comma", G, "error", over(ORACLE, methods=","), match=r"--methods ',' names no method")
case(
    "oracle-methods-modifier",
    G,
    "ok",
    over(ORACLE, methods="freedom+polyak"),
    check=lambda c, r: need("freedom+polyak" in r.out, "no freedom+polyak row"),
)

# == lossguide experiment ==================================================================================
G = "experiment"
case("exp-unknown", G, "error", ["experiment", "bogus", "--out", "{d}/e"], match=r"unknown experiment 'bogus'")
case("exp-empty-name", G, "error", ["experiment", "", "--out", "{d}/e"], match=r"unknown experiment ''")
case("exp-loss-bad", G, "error", ["experiment", "oracle", "--loss", "mse"], match=r"argument --loss: invalid choice")
case(
    "exp-loss-feature-oracle",
    G,
    "error",
    ["experiment", "oracle", "--loss", "feature", "--out", "{d}/e"],
    match=r"experiment 'oracle' has no class loss to switch",
)
case(
    "exp-loss-feature-motion",
    G,
    "error",
    ["experiment", "motion", "--loss", "feature", "--out", "{d}/e"],
    match=r"experiment 'motion' has no class loss to switch",
)
case(
    "exp-out-a-file",
    G,
    "error",
    ["experiment", "oracle", "--out", "{d}/f"],
    setup=write("f", "x"),
    match=r"--out .*/f is an existing file",
)
case("exp-missing-name", G, "error", ["experiment"], match=r"required: name")


# == the Python API ========================================================================================
G = "api"


def _lg():
    import lossguide as lg

    return lg


def _prior():
    from lossguide.oracle import default_mixture

    return default_mixture()


def _oracle_run(guidance=None, loss=None, sampler=None, **kw):
    import torch

    lg = _lg()
    sch = lg.NoiseSchedule.linear()
    p = _prior()
    kw = {"shape": (p.dim,), "seeds": range(2), "dtype": torch.float64, **kw}
    return lg.sample(p.denoiser(sch), sampler or lg.DDIM(sch, 4), guidance, loss, **kw)


def _target(x0):
    return ((x0 - 0.7) ** 2).flatten(1).sum(1)


def _rgb_denoiser(ctx):
    lg = _lg()
    from lossguide.models import load_denoiser

    return load_denoiser(ctx.shared["rgb"]).denoiser, lg


def api_case(id, expect, fn, match=None, check=None, nowrite=False):
    case(f"api-{id}", G, expect, api=fn, match=match, check=check, nowrite=nowrite)


def _shape(shape):
    def fn(ctx):
        den, lg = _rgb_denoiser(ctx)
        return lg.sample(den, lg.DDIM(den.schedule, 2), shape=shape, seeds=[0])

    return fn


api_case("shape-2d", "error", _shape((8, 8)), r"shape=\(8, 8\).*\(3, H, W\)|3 channels")
api_case("shape-1-channel", "error", _shape((1, 8, 8)), r"shape=\(1, 8, 8\).*3 channels")
api_case(
    "shape-ok", "ok", _shape((3, 8, 8)), check=lambda c, r: need(tuple(r.value.x0.shape) == (1, 3, 8, 8), "shape")
)


def _xt_and_shape(ctx):
    import torch

    den, lg = _rgb_denoiser(ctx)
    return lg.sample(den, lg.DDIM(den.schedule, 2), shape=(3, 16, 16), x_T=torch.zeros(1, 3, 8, 8), seeds=[0])


api_case("shape-and-x_T-disagree", "error", _xt_and_shape, r"x_T .*\(3, 8, 8\).*shape=\(3, 16, 16\)")


def _seeds_vs_xT(ctx):
    import torch

    return _oracle_run(seeds=range(3), x_T=torch.zeros(2, 8, dtype=torch.float64), shape=None)


api_case("seeds-vs-x_T", "error", _seeds_vs_xT, r"got 3 generators for a batch of 2")


def _gens_vs_xT(ctx):
    import torch

    g = [torch.Generator().manual_seed(0)]
    return _oracle_run(seeds=None, generators=g, x_T=torch.zeros(2, 8, dtype=torch.float64), shape=None)


api_case("generators-vs-x_T", "error", _gens_vs_xT, r"got 1 generators for a batch of 2")


def _seeds_and_gens(ctx):
    import torch

    return _oracle_run(seeds=range(2), generators=[torch.Generator().manual_seed(5) for _ in range(2)])


api_case("seeds-and-generators", "error", _seeds_and_gens, r"seeds .*generators.*not both|either seeds or generators")
api_case("seeds-empty", "error", lambda c: _oracle_run(seeds=[]), r"seeds .*at least one|empty")
api_case("seeds-float", "error", lambda c: _oracle_run(seeds=[0.5, 1]), r"seed.*0\.5.*integer")
api_case("seeds-string", "error", lambda c: _oracle_run(seeds="0-3"), r"seeds .*'0-3'.*parse_seeds|a string")
api_case("seeds-bool", "error", lambda c: _oracle_run(seeds=[True, False]), r"seed.*True.*integer")
api_case("no-shape", "error", lambda c: _oracle_run(shape=None), r"pass shape=")
api_case("no-seeds", "error", lambda c: _oracle_run(seeds=None), r"pass seeds=")


def _g(name="freedom", **p):
    return _lg().preset(name, **p)


api_case(
    "loss-shape-B1",
    "error",
    lambda c: _oracle_run(_g(), lambda x: _target(x)[:, None]),
    r"the loss returned shape \(2, 1\) for 2 inputs",
)
api_case("loss-scalar", "error", lambda c: _oracle_run(_g(), lambda x: _target(x).mean()), r"a scalar: did you reduce")
api_case("loss-float", "error", lambda c: _oracle_run(_g(), lambda x: 1.0), r"the loss returned float")
api_case(
    "loss-no-grad", "error", lambda c: _oracle_run(_g(), lambda x: _target(x.detach())), r"the loss does not depend on"
)
api_case(
    "loss-nan",
    "ok",
    lambda c: _oracle_run(_g(), lambda x: _target(x) * float("nan")),
    check=lambda c, r: need(
        int(r.value.stats.skipped.sum()) > 0 and "skipped" in r.err, "NaN loss not counted/warned"
    ),
)
api_case("loss-arity-cg", "error", lambda c: _oracle_run(_g("cg"), _target), r"calls loss\(x_t, t\), but _target")
api_case(
    "loss-arity-freedom",
    "error",
    lambda c: _oracle_run(_g(), lambda x, t: _target(x)),
    r"calls loss\(x0\) with one argument",
)
api_case("loss-missing", "error", lambda c: _oracle_run(_g(), None), r"needs a loss")
api_case("preset-eta-0", "error", lambda c: _g("shen2024", eta=0), r"eta must be a finite number > 0, got 0")
api_case("preset-n-aug-neg", "error", lambda c: _g("shen2024", n_aug=-2), r"n_aug must be an integer ≥ 0, got -2")
api_case("preset-window", "error", lambda c: _g("shen2024", window=(0.5, 0.2)), r"window must be a pair")
api_case("preset-unknown", "error", lambda c: _lg().presets.get("bogus"), r"unknown method 'bogus'")
api_case("preset-unknown-param", "error", lambda c: _g("dps", bogus=1), r"method 'dps' has no parameter 'bogus'")
api_case(
    "augment-missing",
    "error",
    lambda c: _oracle_run(_g("shen2024", n_recur=1), _target),
    r"asks for n_aug=10 augmented copies but no augmentation",
)


def _load_denoiser(path, **kw):
    def fn(ctx):
        from lossguide.models import load_denoiser

        return load_denoiser(ctx.fmt(path), **kw)

    return fn


api_case("load-denoiser-missing", "error", _load_denoiser("{d}/nope"), r"no model '.*nope'")
api_case("load-denoiser-missing-pt", "error", _load_denoiser("{d}/nope.pt"), r"no checkpoint file")
api_case("load-denoiser-dtype", "error", _load_denoiser("mnist-ddpm", dtype="fp8"), r"unknown dtype 'fp8'")
api_case(
    "load-denoiser-flags-diffusers",
    "error",
    _load_denoiser("mnist-ddpm", flags={"ch": 8}),
    r"flags are for original checkpoint files",
)


def _load_network(flags, make=True):
    def fn(ctx):
        from lossguide.models import load_network

        p = ctx.d / "net.pt"
        if make:
            tiny_ddim_checkpoint(p)
        return load_network(p, flags)

    return fn


api_case("load-network-missing", "error", _load_network({}, make=False), r"no checkpoint file")
api_case("load-network-ok", "ok", _load_network(DDIM_FLAGS), check=lambda c, r: need(r.value is not None, "no net"))
api_case(
    "load-network-arch-bogus",
    "error",
    _load_network({**DDIM_FLAGS, "architecture": "bogus"}),
    r"architecture'\] is 'bogus'",
)
api_case("load-network-flags-list", "error", _load_network(["ch", 8]), r"flags must be a mapping")
api_case(
    "load-network-flag-typo", "error", _load_network({**DDIM_FLAGS, "chh": 8}), r"unknown ddim_unet flag\(s\) chh"
)
api_case("load-network-wrong-width", "error", _load_network({**DDIM_FLAGS, "ch": 64}), r"ch|mismatch|shape")
api_case(
    "load-network-missing-flag",
    "error",
    _load_network({k: v for k, v in DDIM_FLAGS.items() if k != "ch"}),
    r"needs the flag\(s\) ch",
)


def _reuse(make):
    def fn(ctx):
        import torch

        lg = _lg()
        s1 = make()
        p = _prior()
        kw = dict(shape=(p.dim,), seeds=range(3), dtype=torch.float64)
        den = p.denoiser(s1.schedule)
        g = lg.preset("dps", scale=0.1)
        a = lg.sample(den, s1, g, _target, **kw).x0
        b = lg.sample(den, s1, g, _target, **kw).x0  # the same sampler object again
        c2 = lg.sample(den, make(), g, _target, **kw).x0  # a fresh one
        return a, b, c2

    return fn


def _same3(c, r):
    import torch

    a, b, c2 = r.value
    return need(torch.equal(a, b) and torch.equal(a, c2) and torch.isfinite(a).all(), "reused sampler differs")


def _diffusers(name, **kw):
    def make():
        import diffusers

        lg = _lg()
        return lg.DiffusersSampler(getattr(diffusers, name)(clip_sample=False, **kw) if name in ("DDIMScheduler",)
                                   else getattr(diffusers, name)(**kw), 6)  # fmt: skip

    return make


api_case("reuse-ddim", "ok", _reuse(lambda: _lg().DDIM(_lg().NoiseSchedule.linear(), 5, eta=1.0)), check=_same3)
api_case("reuse-dpmsolver", "ok", _reuse(_diffusers("DPMSolverMultistepScheduler")), check=_same3)
api_case(
    "reuse-unipc", "ok", _reuse(_diffusers("UniPCMultistepScheduler", disable_corrector=list(range(6)))), check=_same3
)
api_case("reuse-pndm", "ok", _reuse(_diffusers("PNDMScheduler", skip_prk_steps=True)), check=_same3)
api_case("reuse-ddim-diffusers", "ok", _reuse(_diffusers("DDIMScheduler")), check=_same3)


def _unipc_xprev(ctx):
    import diffusers

    lg = _lg()
    return _oracle_run(_g("dps"), _target, sampler=lg.DiffusersSampler(diffusers.UniPCMultistepScheduler(), 5))


api_case("unipc-corrector", "error", _unipc_xprev, r"corrector recomputes .*disable_corrector")


def _clip_sample(ctx):
    import diffusers

    return _lg().DiffusersSampler(diffusers.DDIMScheduler(clip_sample=True), 5)


api_case("diffusers-clip-sample", "error", _clip_sample, r"clip_sample/thresholding on")


def _tt_stateful(ctx):
    import diffusers

    lg = _lg()
    return _oracle_run(_g("freedom", n_recur=2, recur_window=(0, 1)), _target,
                       sampler=lg.DiffusersSampler(diffusers.DPMSolverMultistepScheduler(), 5))  # fmt: skip


api_case("time-travel-stateful", "error", _tt_stateful, r"time travel \(n_recur=2\).*stateful")
api_case(
    "flow-euler-on-vp",
    "error",
    lambda c: _lg().FlowEuler(_lg().NoiseSchedule.linear(), 5),
    r"FlowEuler steps a 'flow' schedule, got a 'vp' one",
)
api_case("edm-on-flow", "error", lambda c: _lg().EDMEuler(_lg().FlowSchedule(), 5), r"EDMEuler steps a 've' schedule")


def _vp_den_flow_sampler(ctx):
    lg = _lg()
    return _oracle_run(sampler=lg.FlowEuler(lg.FlowSchedule(), 4))


api_case(
    "vp-denoiser-flow-sampler",
    "error",
    _vp_den_flow_sampler,
    r"denoiser's schedule is 'vp' but FlowEuler"
    r"|model's schedule is VP .* but the sampler steps rectified flow.*FlowEuler",  # the schedule check's wording
)
api_case(
    "ddim-eta-nan",
    "error",
    lambda c: _lg().DDIM(_lg().NoiseSchedule.linear(), 5, eta=float("nan")),
    r"eta must be a finite number ≥ 0.*got nan",
)
api_case(
    "ddim-eta-negative",
    "error",
    lambda c: _lg().DDIM(_lg().NoiseSchedule.linear(), 5, eta=-0.5),
    r"eta must be .*≥ 0.*got -0\.5",
)
api_case(
    "ddim-steps-0",
    "error",
    lambda c: _lg().DDIM(_lg().NoiseSchedule.linear(), 0),
    r"num_steps must be an integer in \[1, 1000\], got 0",
)
api_case(
    "ddim-steps-float",
    "error",
    lambda c: _lg().DDIM(_lg().NoiseSchedule.linear(), 2.5),
    r"num_steps must be an integer|num_steps .*2\.5",
)
api_case("dtype-mismatch", "error", lambda c: _shape_dtype(c), r"x_t is torch\.float64 but the model's weights")


def _shape_dtype(ctx):
    import torch

    den, lg = _rgb_denoiser(ctx)
    return lg.sample(den, lg.DDIM(den.schedule, 2), shape=(3, 8, 8), seeds=[0], dtype=torch.float64)


def _run_sample_cfg(**kw):
    def fn(ctx):
        from lossguide import run_sample

        cfg = run_sample.SampleConfig(**{"steps": 2, "seeds": [0], "batch": 1, "params": {"n_aug": 2, "n_recur": 1},
                                         **kw})  # fmt: skip
        return run_sample.run(cfg, ctx.d / "run", progress=False)

    return fn


api_case("run-sample-steps-string", "error", _run_sample_cfg(steps="2"), r"steps must be an integer", nowrite=True)
api_case("run-sample-seeds-float", "error", _run_sample_cfg(seeds=[0.5]), r"seed.*0\.5|seeds must be", nowrite=True)
api_case("run-sample-seeds-empty", "error", _run_sample_cfg(seeds=[]), r"seeds .*at least one", nowrite=True)
api_case("run-sample-params-list", "error", _run_sample_cfg(params=[1]), r"params must be a mapping", nowrite=True)


def _class_sketch_l2(ctx):
    from lossguide import losses
    from lossguide.harness.tasks.mnist import TargetTask

    loss = TargetTask("class+sketch", 3, 0, norm="l2").loss
    return [term for _, term in loss.terms if isinstance(term, losses.SketchLoss)] if hasattr(loss, "terms") else loss


def _l2_check(c, r):
    terms = r.value if isinstance(r.value, list) else []
    return need(terms and all(getattr(t, "norm", None) == "l2" for t in terms), "class+sketch ignores --norm l2")


api_case("class-sketch-norm-l2", "ok", _class_sketch_l2, check=_l2_check)
api_case(
    "parse-seeds-none",
    "error",
    lambda c: __import__("lossguide.runfolder").runfolder.parse_seeds(None),
    r"seeds must be a spec string.*got None",
)


# == faults: disks, signals, damaged run folders ===========================================================
G = "faults"


def _disk_full_then_resume(c, r):
    left = [p.name for p in (c.full / "run").rglob("*.tmp")] if (c.full / "run").exists() else []
    if left:
        return f"left temporary files {left}"
    c.shared["fulldisk"].make_room()
    r2 = run_cli([c.fmt(a) for a in S(out="{full}/run", fast=True)])
    return need(r2.rc == 0 and (c.full / "run/metrics.json").is_file(), f"the resumed run failed: {r2.err.strip()}")


case(
    "disk-full-sample",
    G,
    "error",
    S(out="{full}/run", fast=True),
    needs=("full",),
    match=r"No space left on device.*free disk space, then rerun",
    check=_disk_full_then_resume,
)
case("disk-full-bench", G, "error", over(BENCH, out="{full}/b"), needs=("full",), match=r"No space left on device.*/b")
case(
    "disk-full-oracle-json",
    G,
    "error",
    ORACLE + ["--json", "{full}/o.json"],
    needs=("full",),
    setup=lambda c: setattr(c.shared["fulldisk"], "free", 0) or _fill_all(c),
    match=r"No space left on device.*o\.json",
)


def _fill_all(c):
    fd = c.shared["fulldisk"]
    if fd.mounted:
        (fd.path / ".filler").unlink(missing_ok=True)
        fd._fill()


def _recipe_full(c):
    yaml_file("r.yaml", RECIPE)(c)


case(
    "disk-full-recipe",
    G,
    "error",
    ["sample", "--config", "{d}/r.yaml", "--out", "{full}/run", "--quiet"],
    needs=("full",),
    setup=_recipe_full,
    match=r"No space left on device.*free disk space",
)


def _subprocess_cli(argv, cwd, wait_for: Callable, sig=signal.SIGINT, timeout=300) -> Result:
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "lossguide.cli", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and not wait_for():
        time.sleep(0.05)
    if p.poll() is None:
        p.send_signal(sig)
    try:
        out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return Result(rc=p.returncode, out=out, err=err, wall=time.perf_counter() - t0)


SIG_ARGS = [
    "sample",
    "--steps",
    "20",
    "--seeds",
    "0-15",
    "--batch",
    "2",
    "--quiet",
    "--set",
    "n_aug=2",
    "--set",
    "n_recur=1",
]


def _sigint_sample(c):
    out = c.d / "run"
    return _subprocess_cli(
        [*SIG_ARGS, "--out", str(out)],
        ROOT,
        lambda: (out / "records").is_dir() and any((out / "records").glob("*.json")),
    )


def _after_sigint(c, r):
    out = c.d / "run"
    if (out / ".lock").exists() or list(out.rglob("*.tmp")):
        return "the interrupted run left its lock or .tmp files"
    r2 = run_cli([*SIG_ARGS, "--out", str(out)])  # the same command resumes
    return need(r2.rc == 0, f"rerun after SIGINT failed: {r2.err.strip()}")


case(
    "sigint-sample",
    G,
    "error",
    proc=_sigint_sample,
    match=r"^lossguide sample: interrupted; rerun the same command",
    check=_after_sigint,
    writes=True,
)


def _sigint_bench(c):
    out = c.d / "b"
    return _subprocess_cli(over(BENCH, out=str(out), n_eval=2000, steps=50, methods="dps", batch=50), ROOT,
                           lambda: (out / "shards").is_dir() and any((out / "shards").rglob("*.json")))  # fmt: skip


case(
    "sigint-bench",
    G,
    "error",
    proc=_sigint_bench,
    match=r"^lossguide bench: interrupted; rerun the same command",
    writes=True,
)


def _sigint_oracle(c):
    return _subprocess_cli(["oracle", "--tune"], c.d, lambda: time.sleep(8) or True)  # tuning takes ~40 s


case("sigint-oracle", G, "error", proc=_sigint_oracle, match=r"^lossguide oracle: interrupted$", writes=True)


def _sigterm_then_resume(c):
    out = c.d / "run"
    r = _subprocess_cli(
        [*SIG_ARGS, "--out", str(out)],
        ROOT,
        lambda: (out / "records").is_dir() and any((out / "records").glob("*.json")),
        sig=signal.SIGTERM,
    )
    c.shared["sigterm-rc"] = r.rc
    return run_cli([*SIG_ARGS, "--out", str(out)])


case("sigterm-then-resume", G, "ok", proc=_sigterm_then_resume,
     check=lambda c, r: need((c.d / "run/metrics.json").is_file() and not (c.d / "run/.lock").exists(),
                             "the resumed run did not finish"))  # fmt: skip


def _damage(kind):
    def setup(c):
        prior_run()(c)
        run = c.d / "run"
        if kind == "png":
            b = (run / "000000.png").read_bytes()
            (run / "000000.png").write_bytes(b[: len(b) // 2])
        elif kind == "png-empty":
            (run / "000001.png").write_bytes(b"")
        elif kind == "record":
            (run / "records/000000.json").write_text('{"seed": 0, "guide_lo')
        elif kind == "png-missing":
            (run / "000001.png").unlink()
        elif kind == "stale-lock":
            (run / ".lock").write_text("999999\n")
        elif kind == "garbage-lock":
            (run / ".lock").write_text("not a pid")
        elif kind == "orphan-tmp":
            (run / ".000000.png.deadbeef.tmp").write_bytes(b"half")
            (run / "records/.000001.json.cafe0000.tmp").write_text("{")
            (run / "records/000001.json").unlink()
        elif kind == "metrics-damaged":
            (run / "metrics.json").write_text("{")
        elif kind == "config-damaged":
            (run / "config.yaml").write_text("steps: [\n")

    return setup


def _valid_run(c, r):
    from PIL import Image

    run = c.d / "run"
    try:
        for s in (0, 1):
            with Image.open(run / f"{s:06d}.png") as im:
                im.load()
            json.loads((run / f"records/{s:06d}.json").read_text())
        m = metrics(c)
    except Exception as e:  # noqa: BLE001
        return f"the resumed run is still damaged: {type(e).__name__}: {e}"
    if list(run.rglob("*.tmp")) or (run / ".lock").exists():
        return "tmp files or the lock are left"
    return need(m["n_samples"] == 2, "metrics.json does not count 2 samples")


for kind in ("png", "png-empty", "record", "png-missing", "stale-lock", "garbage-lock", "orphan-tmp",
             "metrics-damaged"):  # fmt: skip
    case(f"resume-{kind}", G, "ok", S(fast=True), setup=_damage(kind), check=_valid_run)
case(
    "resume-config-damaged",
    G,
    "error",
    S(fast=True),
    setup=_damage("config-damaged"),
    match=r"holds a run with a different config",
)


def _hold_lock(c):
    """Setup: a second process holds the lock of ``{d}/run`` until the case ends."""
    from test_runfolder import hold_lock  # tests/ is on sys.path under pytest

    holder = hold_lock(c.d / "run")

    def release():
        holder.stdin.close()
        holder.wait(timeout=30)

    c.stack.callback(release)


case(
    "live-second-writer",
    G,
    "error",
    S(fast=True),
    setup=_hold_lock,
    match=r"in use by process \d+ \(lock file .*\.lock\)",
)


# -- issue 26 items 6 and 7: the tracebacks and unclear errors of the second hostile-user audit -------------------
G = "audit2"
recipe_case(
    "factory-missing-function",
    "error",
    r"network factory 'os:nonexistent_fn': module 'os' has no function 'nonexistent_fn'",
    loss={"kind": "classifier", "target": 1, "network": {"factory": "os:nonexistent_fn"}},
    method="dps",
)
recipe_case(
    "factory-missing-module",
    "error",
    r"network factory 'no_such_module_xyz:f': no module 'no_such_module_xyz'",
    loss={"kind": "classifier", "target": 1, "network": {"factory": "no_such_module_xyz:f"}},
    method="dps",
)
recipe_case(
    "factory-not-a-module",
    "error",
    r"network factory 'os:getcwd' returned a str, not a torch module",
    loss={"kind": "classifier", "target": 1, "network": {"factory": "os:getcwd"}},
    method="dps",
)
for _k, _v, _m in [
    ("attn_resolutions", "0", r"attn_resolutions='0' is not a list of positive numbers"),
    ("ch_mult", "a,b", r"ch_mult='a,b' is not a list of positive numbers; .* e\.g\. ch_mult=\"1,2,2,2\""),
    ("ch_mult", "1,0", r"ch_mult='1,0' is not a list of positive numbers"),
]:
    api_case(f"load-network-{_k}-{_v}", "error", _load_network({**DDIM_FLAGS, _k: _v}), _m)


def _adm_flags(**change):
    def fn(ctx):
        from lossguide.models import load_network

        name = "adm_imagenet256_uncond_layout"
        fix = ROOT.parent / "shared" / "fixtures" / "checkpoints"
        need(fix.is_dir(), "no ../shared/fixtures (the checkpoint fixtures)")
        flags = json.loads((fix / f"{name}.json").read_text())["constructor_kwargs"]
        return load_network(fix / f"{name}.pt", {**flags, **change})

    return fn


api_case("adm-attention-0", "error", _adm_flags(attention_resolutions="0"), r"attention_resolutions='0' is not a list")
api_case("adm-attention-3px", "error", _adm_flags(attention_resolutions="3"), r"3 px does not divide image_size 256")
api_case("adm-channel-mult-ab", "error", _adm_flags(channel_mult="a,b"), r"channel_mult='a,b' is not a list")


def _ckpt_denoiser(**flags):
    def fn(ctx):
        from lossguide.models import load_denoiser

        p = ctx.d / "net.pt"
        tiny_ddim_checkpoint(p)
        return load_denoiser(str(p), flags={**DDIM_FLAGS, **flags})

    return fn


for _v in (0, -5, "1000"):
    api_case(f"ckpt-diffusion-steps-{_v}", "error", _ckpt_denoiser(num_diffusion_timesteps=_v),
             rf"num_diffusion_timesteps={_v!r}: it must be an integer ≥ 2")  # fmt: skip
api_case(
    "ckpt-flat-timesteps-read",
    "ok",
    _ckpt_denoiser(num_diffusion_timesteps=500),
    check=lambda c, r: need(len(r.value.denoiser.schedule.alpha_bar) == 500, "num_diffusion_timesteps=500 ignored"),
)
api_case(
    "schedule-named-T-0",
    "error",
    lambda c: __import__("lossguide.networks", fromlist=["x"]).schedule_named("linear", 0),
    r"diffusion_steps=0: it must be an integer ≥ 2",
)


def _damaged_weights(name: str, data: bytes):
    def fn(ctx):
        from lossguide.models import load_network

        p = ctx.d / name
        p.write_bytes(data)
        return load_network(p, DDIM_FLAGS)

    return fn


api_case("safetensors-garbage", "error", _damaged_weights("w.safetensors", b"\x00garbage" * 64),
         r"w\.safetensors is not a readable \.safetensors file .*download or export it again")  # fmt: skip
api_case("pt-garbage", "error", _damaged_weights("w.pt", b"\x00garbage" * 64),
         r"w\.pt is not a readable torch checkpoint \(UnpicklingError\); the file is truncated or "
         r"damaged")  # fmt: skip


def _truncated_safetensors(ctx):
    import torch
    from safetensors.torch import save_file

    from lossguide.models import load_network

    p = ctx.d / "w.safetensors"
    save_file({"a": torch.zeros(64, 64)}, str(p))
    p.write_bytes(p.read_bytes()[:200])
    return load_network(p, DDIM_FLAGS)


api_case("safetensors-truncated", "error", _truncated_safetensors, r"w\.safetensors is not a readable \.safetensors")


def _damaged_diffusers_weights(ctx):
    from lossguide.models import load_denoiser

    folder = tiny_rgb_model(ctx.d / "m")
    w = folder / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:300])
    return load_denoiser(str(folder))


api_case("diffusers-weights-truncated", "error", _damaged_diffusers_weights,
         r"unet does not load as a UNet2DModel .*diffusion_pytorch_model|unet.*(safetensors|weights)")  # fmt: skip
case("model-conditional-name", G, "error", S("--model", "mnist-cond"),
     match=r"'mnist-cond' is a shipped model but not an unconditional denoiser: .*load_conditional",
     nowrite=True)  # fmt: skip
case("model-classifier-name", G, "error", S("--model", "mnist-judge"),
     match=r"'mnist-judge' is .* a classifier", nowrite=True)  # fmt: skip
case("model-checkpoint-needs-recipe", G, "error", S("--model", "{d}/net.pt"),
     setup=lambda c: tiny_ddim_checkpoint(c.d / "net.pt"),
     match=r"original checkpoint file, which needs its constructor flags.*lossguide sample --config",
     nowrite=True)  # fmt: skip
case(
    "judge-is-guide", G, "ok", S("--judge", "mnist-guide", "--seeds", "0", "--steps", "2", "--method", "none"),
    check=lambda c, r: need("the judge is the guide" in r.err, "no warning that the judge is the guide"),
)  # fmt: skip
case(
    "oracle-methods-with-spaces", G, "ok", ["oracle", "--n", "8", "--steps", "2", "--methods", "none, dps"],
    check=lambda c, r: need("dps" in r.out and "none" in r.out, "the spaced method list did not run both"),
)  # fmt: skip
for _cmd in ("bench", "sample", "oracle", "experiment"):
    case(f"help-{_cmd}-one-default", G, "ok", [_cmd, "--help"],
         check=lambda c, r: need(r.out.count("(default: ") and "(default: None)" not in r.out
                                 and not re.search(r"\(default[^)]*\) \(default", r.out),
                                 "a doubled or None default"))  # fmt: skip
case("help-experiment-names", G, "ok", ["experiment", "--help"],
     check=lambda c, r: need("loss-curves" in r.out and "optimization" in r.out,
                             "experiment --help lists no names"))  # fmt: skip


def _autoguidance(good_channels, bad_channels, w=2.0):
    def fn(ctx):
        import diffusers

        import lossguide as lg
        from lossguide.denoiser import from_diffusers

        def den(c):
            unet = diffusers.UNet2DModel(
                sample_size=8, in_channels=c, out_channels=c, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4,
            )  # fmt: skip
            return from_diffusers(unet, diffusers.DDPMScheduler())

        return lg.autoguidance(den(good_channels), den(bad_channels), w)

    return fn


api_case("autoguidance-channels", "error", _autoguidance(1, 3),
         r"good model takes 1-channel samples but the bad model 3-channel")  # fmt: skip


def _warns(fn, pattern):
    def run(ctx):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fn(ctx)
        need(any(re.search(pattern, str(w.message)) for w in seen), f"no warning matching {pattern!r}")

    return run


api_case("autoguidance-negative-w", "ok", _warns(_autoguidance(1, 1, -0.5), r"w=-0\.5 < 0 steps towards the bad"))
api_case("shape-not-a-multiple", "error", _shape((3, 7, 7)),
         r"shape=\(3, 7, 7\) .* H and W must be multiples of 2; pass e\.g\. shape=\(3, 8, 8\)")  # fmt: skip
for _k, _v in (("sigma_max", float("inf")), ("sigma_min", float("nan")), ("rho", float("inf"))):
    api_case(f"sigma-schedule-{_k}-{_v}", "error", lambda c, k=_k, v=_v: _lg().SigmaSchedule(**{k: v}),
             r"sigma_min < sigma_max < ∞|rho must be a finite number")  # fmt: skip
api_case("flow-shift-inf", "error", lambda c: _lg().FlowSchedule(shift=float("inf")), r"shift must be a finite number")


def _cfg_w(w):
    def fn(ctx):
        from lossguide.validate import finite_weight

        return finite_weight(w)

    return fn


for _w in (float("nan"), float("inf"), "2"):
    api_case(f"cfg-w-{_w}", "error", _cfg_w(_w), r"guidance_scale must be a finite number")


def _cond_w(ctx):
    import torch

    from lossguide.models import load_conditional

    m = load_conditional("mnist-cond")
    return m.denoiser(torch.tensor([[3, 7]]), guidance_scale=float("nan"))


api_case("cond-model-w-nan", "error", _cond_w, r"guidance_scale must be a finite number .* got nan")


# -- issue 26 items 1-5: settings without effect, damaged folders, errors before the first write ------------------
G = "audit2-door"
_B = ["bench", "--steps", "2", "--n-eval", "2", "--n-tune", "2", "--out", "{d}/run"]
case("bench-cg-on-sketch", G, "error", _B + ["--tasks", "sketch", "--methods", "cg"],
     match=r"no method of --methods cg applies to --tasks sketch", nowrite=True)
case("bench-norm-on-oracle", G, "error", _B + ["--tasks", "oracle-linear", "--norm", "l2"],
     match=r"--norm l2 has no effect on --tasks oracle-linear", nowrite=True)
case("bench-no-tune-and-settings", G, "error", _B + ["--no-tune", "--settings", "{d}/run/settings.json"],
     match=r"--no-tune and --settings both replace tuning", nowrite=True)
case("sample-out-empty", G, "error", S(out=""), match=r"--out '' names no folder")
case("sample-seed-2-64", G, "error", over(S(), seeds="18446744073709551616"),
     match=r"above the largest seed, 2\*\*63 − 1", nowrite=True)
case("sample-judge-noise-aware", G, "error", S("--judge", "mnist-noise-aware"),
     match=r"--judge mnist-noise-aware does not map digits .* pass an image classifier", nowrite=True)
case("sample-scale-under-polyak", G, "error", S("--set", "scale=2"),
     match=r"scale=2 has no effect with polyak=True; it takes effect with polyak=False", nowrite=True)
case("sample-eta-without-polyak", G, "error", S("--set", "polyak=false", "--set", "eta=0.1"),
     match=r"eta=0.1 has no effect with polyak=False", nowrite=True)
case("sample-loss-floor-eps-gap", G, "error", S("--set", "loss_floor=0.5"),
     match=r"loss_floor=0.5 has no effect with polyak_gap='eps'", nowrite=True)
case("sample-empty-window", G, "error", S("--set", "window=0.5,0.5"),
     match=r"window=\(0.5, 0.5\) holds none of the 2 sampler steps", nowrite=True)
case("sample-recur-window-no-recur", G, "error", S("--set", "n_recur=1", "--set", "recur_window=0.2,0.9"),
     match=r"recur_window=\(0.2, 0.9\) has no effect with n_recur=1", nowrite=True)
case("sample-ugd-backward-no-iter", G, "error", S("--method", "ugd", "--set", "n_iter=0", "--set",
     "backward_scale=0.5"), match=r"backward_scale=0.5 has no effect with n_iter=0", nowrite=True)  # fmt: skip
