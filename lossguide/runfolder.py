"""Run folders: one writer, config after validation, atomic files.

:class:`Folder` is every app's run folder: it takes a lock (``.lock``, the writer's PID) so that two processes
never write one folder, removes the ``.*.tmp`` files a killed writer left, refuses a folder that another config's
outputs occupy, writes its config file only when the caller has built and checked everything, and turns every
OSError into one line naming the path. :class:`RunFolder` is the folder of ``lossguide sample`` and recipes:
``config.yaml``, one ``{seed:06d}.png`` and ``records/{seed:06d}.json`` per finished seed, ``grid.png`` and
``metrics.json``; ``lossguide bench``'s is :class:`~lossguide.harness.bench.BenchFolder`.
Seeds run in batches of one fixed shape (:func:`fixed_batches`), so a seed's numbers do not depend on which
seeds share its batch, and a resumed run equals an uninterrupted one. Seed specs (:func:`parse_seeds`) and the
PNG helpers (:func:`to_uint8`, :func:`png_bytes`, :func:`grid`) live here too.
"""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from lossguide.io import atomic_write_bytes, atomic_write_json, atomic_write_text

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

log = logging.getLogger(__name__)

LOCK = ".lock"
#: a seed record's checksums: of its PNG's bytes and of the config.yaml text it was made under
PNG_SHA, CONFIG_SHA = "png_sha256", "config_sha256"
_SEED_FILE = re.compile(r"\d{6,}\.(png|json)")


class RunFolderError(OSError):
    """A run folder that cannot be used, as one line naming the path and the fix."""


def _fix(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "free disk space, then rerun the same command to resume"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "make the folder writable or pass another --out"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in the way: pass a folder path as --out"
    return "check the path, or pass another --out"


@contextmanager
def os_errors(path: Path, what: str) -> Iterator[None]:
    """Re-raise an OSError of the block as a :class:`RunFolderError` naming ``path`` and the fix."""
    try:
        yield
    except RunFolderError:
        raise
    except OSError as e:
        err = RunFolderError(f"cannot {what} {path}: {e.strerror or type(e).__name__}; {_fix(e)}")
        err.errno = e.errno
        raise err from e


def fixed_batches(seeds: Sequence[int], batch: int) -> Iterator[tuple[list[int], int]]:
    """``(rows, n)``: ``seeds`` in batches of exactly ``batch`` rows; a short last batch is padded with copies
    of its first seed, whose outputs (rows ``n:``) are dropped. CPU/GPU kernels depend on the batch shape,
    so one shape makes each seed's numbers independent of its companions (their rows never interact)."""
    if batch < 1:
        raise ValueError(f"the batch must be ≥ 1 rows, got {batch}")
    seeds = list(seeds)
    for b in range(0, len(seeds), batch):
        rows = seeds[b : b + batch]
        n = len(rows)
        yield rows + [rows[0]] * (batch - n), n


class Folder:
    """A run's folder, for every app that writes one: a lock, cleanup after a killed writer, the config file checked
    against the folder's and written first, ``--overwrite``, and atomic writes that fail in one line.

    Subclasses name their config file (:attr:`CONFIG`), what the run writes (:meth:`outputs`) and where a killed
    writer can leave temporary files (:meth:`tmp_files`)."""

    CONFIG = "config.yaml"
    #: how refusals name the run, and what ``--overwrite`` does to it
    WHAT, REPLACE = "run", "--overwrite to replace it"

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self._fd: int | None = None
        self._config_sha: str | None = None  # of the config text this run writes (set by check)

    def outputs(self) -> list[Path]:
        """The files and folders an earlier run wrote here (besides its config), in a stable order."""
        return []

    def tmp_files(self) -> list[Path]:
        """The ``.*.tmp`` files of an atomic write that a killed run never finished."""
        return list(self.path.glob(".*.tmp")) if self.path.is_dir() else []

    # -- opening ---------------------------------------------------------------------------------------
    def check(self, config_text: str) -> None:
        """Refuse (without writing anything) a path that is a file, or a folder whose outputs another config (or an
        unknown one) wrote; a config file without outputs (a run that failed before its first) is replaced."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--out {self.path} is an existing file, not a folder; pass a folder path")
        self._config_sha = _sha256(config_text.encode())
        cfg = self.path / self.CONFIG
        with os_errors(cfg, "read"):
            has_config = cfg.is_file()
            differs = has_config and cfg.read_text() != config_text
        if self.overwrite or not (differs or not has_config):
            return
        with os_errors(self.path, "read"):
            old = self.outputs()
        if differs and old:
            raise ValueError(self._other(cfg.read_text(), config_text))
        if not has_config and old:
            raise ValueError(self._unknown(old))

    def _other(self, old_config: str, new_config: str) -> str:
        """The refusal of a folder whose outputs another config (``old_config``) wrote."""
        return f"{self.path} holds a {self.WHAT} with a different config; pass another --out, or {self.REPLACE}"

    def _unknown(self, old: list[Path]) -> str:
        return (f"{self.path} holds {old[0].name}, ... but no {self.CONFIG}, so the run that made them is unknown; "
                "pass another --out, or --overwrite to replace them")  # fmt: skip

    def open(self, config_text: str) -> Folder:
        """Take the lock, clean up after a killed writer, check the config, apply ``--overwrite``, write config.

        Call it after everything (parameters, models, loss) is built and checked: it is the first write."""
        with os_errors(self.path, "create the run folder"):
            self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._clean_tmp()
            self.check(config_text)  # under the lock: a running writer is reported as such, not as a config
            if self.overwrite:
                self._remove_outputs()
            self.write_text(self.CONFIG, config_text)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Release the lock (and remove the lock file)."""
        if self._fd is None:
            return
        try:
            (self.path / LOCK).unlink(missing_ok=True)  # before closing: a waiting opener sees a new file
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lock(self) -> None:
        lock = self.path / LOCK
        if fcntl is None:
            log.warning("no file locks on this platform: nothing stops a second writer on %s", self.path)
            return
        while True:
            with os_errors(lock, "open the lock file"):
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunFolderError(f"cannot lock {lock}: {e.strerror}; {_fix(e)}") from e
                who = f"process {holder}" if holder else "another process"
                raise RunFolderError(
                    f"{self.path} is in use by {who} (lock file {lock}); wait for it to finish, or if no lossguide "
                    f"process writes there any more (a stale lock), delete {lock} and rerun"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed it meanwhile: lock the new file
        stale = _read_pid(fd)
        if stale and stale != os.getpid():
            log.info("took over the lock of process %d, which has exited", stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _clean_tmp(self) -> None:
        """Remove the ``.*.tmp`` files of an atomic write that a killed run never finished."""
        n = 0
        for f in self.tmp_files():
            with os_errors(f, "remove the orphaned temporary file"):
                f.unlink(missing_ok=True)
            n += 1
        if n:
            log.info("removed %d orphaned temporary files in %s", n, self.path)

    def _remove_outputs(self) -> None:
        """``--overwrite``: remove what the old run wrote (:meth:`outputs`) and its config (other files are kept)."""
        import shutil

        old = [f for f in [*self.outputs(), self.path / self.CONFIG] if f.exists()]
        for f in old:
            with os_errors(f, "remove the old output"):
                shutil.rmtree(f) if f.is_dir() else f.unlink(missing_ok=True)
        if old:
            log.info("--overwrite: removed %d old outputs of %s", len(old), self.path)

    def write_bytes(self, name: str, data: bytes) -> None:
        p = self.path / name
        with os_errors(p, "write"):
            atomic_write_bytes(p, data)

    def write_text(self, name: str, text: str) -> None:
        p = self.path / name
        with os_errors(p, "write"):
            atomic_write_text(p, text)

    def write_json(self, name: str, obj) -> None:
        p = self.path / name
        with os_errors(p, "write"):
            atomic_write_json(p, obj)


class RunFolder(Folder):
    """The folder of ``lossguide sample`` and recipes: one PNG and one record per seed, ``grid.png``,
    ``metrics.json``; a seed is done when both files exist and the record holds the PNG's and the config's hash."""

    def __init__(self, path: str | Path, overwrite: bool = False):
        super().__init__(path, overwrite)
        self.records = self.path / "records"

    def outputs(self) -> list[Path]:
        return self._seed_files() + [f for f in (self.path / "grid.png", self.path / "metrics.json") if f.is_file()]

    def tmp_files(self) -> list[Path]:
        return super().tmp_files() + (list(self.records.glob(".*.tmp")) if self.records.is_dir() else [])

    def _unknown(self, old: list[Path]) -> str:
        seeds = self._seed_files()
        if not seeds:  # a grid.png or metrics.json alone
            return super()._unknown(old)
        return (f"{self.path} holds {len(seeds)} seed files ({seeds[0].name}, ...) but no config.yaml, so the run "
                "that made them is unknown; pass another --out, or --overwrite to replace them")  # fmt: skip

    def _seed_files(self) -> list[Path]:
        """The seed PNGs and records in the folder."""
        files = [f for f in self.path.glob("*.png") if _SEED_FILE.fullmatch(f.name)] if self.path.is_dir() else []
        if self.records.is_dir():
            files += [f for f in self.records.glob("*.json") if _SEED_FILE.fullmatch(f.name)]
        return sorted(files)

    # -- files -----------------------------------------------------------------------------------------
    def png(self, seed: int) -> Path:
        return self.path / f"{seed:06d}.png"

    def record(self, seed: int) -> Path:
        return self.records / f"{seed:06d}.json"

    def done(self, seed: int) -> bool:
        """The seed has its record and its PNG (the PNG is written first)."""
        return self.record(seed).is_file() and self.png(seed).is_file()

    def todo(self, seeds: Sequence[int]) -> list[int]:
        """The seeds not done yet, in order (logged when some are); a done seed whose PNG or record is damaged
        (truncated, not parseable: written by something other than this folder's atomic writes) is redone."""
        todo = [s for s in seeds if not self.done(s) or self._damaged(s)]
        if len(todo) < len(seeds):
            log.info("resuming %s: %d of %d seeds already done", self.path, len(seeds) - len(todo), len(seeds))
        return todo

    def _damaged(self, seed: int) -> bool:
        """The seed's record is not a JSON object holding its PNG's SHA-256 (a flipped byte, a truncated or foreign
        file, a record such as ``{}``), or it was written under another config than this run's."""
        import json

        why = None
        try:
            png = self.png(seed).read_bytes()
            rec = json.loads(self.record(seed).read_text())
        except (OSError, ValueError):
            why = "an unreadable PNG or record"
        else:
            if not isinstance(rec, dict) or rec.get(PNG_SHA) != _sha256(png):
                why = "a PNG that does not match its record's checksum (damaged, or written by an older lossguide)"
            elif self._config_sha is not None and rec.get(CONFIG_SHA) != self._config_sha:
                why = "a record written under another config"
        if why:
            log.warning("seed %d in %s has %s (%s, %s): redoing it", seed, self.path, why, self.png(seed).name,
                        self.record(seed).name)  # fmt: skip
        return why is not None

    def write_seed(self, seed: int, png: bytes, record: dict) -> None:
        """A finished seed: its PNG, then its record (which marks it done) with the PNG's and the config's SHA-256."""
        self.write_bytes(self.png(seed).name, png)
        p = self.record(seed)
        with os_errors(p, "write"):
            atomic_write_json(p, {**record, PNG_SHA: _sha256(png), CONFIG_SHA: self._config_sha})

    def read_records(self, seeds: Sequence[int]) -> list[dict]:
        import json

        out = []
        for s in seeds:
            p = self.record(s)
            with os_errors(p, "read"):
                rec = json.loads(p.read_text())
            if not isinstance(rec, dict):
                raise RunFolderError(f"{p} is not a record (a JSON object); delete it and rerun to redo seed {s}")
            out.append({k: v for k, v in rec.items() if k not in (PNG_SHA, CONFIG_SHA)})
        return out

    def read_png(self, seed: int):
        """Seed ``seed``'s image as a [C, H, W] uint8 tensor."""
        import numpy as np
        from PIL import Image

        p = self.png(seed)
        with os_errors(p, "read"):
            with Image.open(p) as im:
                arr = torch.from_numpy(np.array(im))
        return arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def format_seeds(seeds: list[int]) -> str:
    """The shortest spec :func:`parse_seeds` reads back as ``seeds`` (runs of consecutive seeds as ``a-b``)."""
    runs: list[list[int]] = []
    for s in seeds:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


#: the largest seed (a torch.Generator takes 64-bit seeds; bench adds multiples of 10⁶ for best-of-N candidates)
MAX_SEED = 2**63 - 1


def parse_seeds(spec: str, max_seeds: int = 1_000_000) -> list[int]:
    """``"0-15,100"`` → [0, 1, ..., 15, 100] (as EDM's ``--seeds``), at most ``max_seeds`` seeds."""

    if not isinstance(spec, str):
        raise ValueError(f"seeds must be a spec string such as '0-15' or '0-7,100', got {spec!r}")

    def seed(s: str, part: str) -> int:
        s = s.strip()
        if not (s.isascii() and s.isdigit()):
            raise ValueError(f"bad seed {s!r} in {part!r}: seeds are integers ≥ 0, e.g. 0-15 or 0-7,100")
        if len(s) > 4000:  # int() refuses longer digit strings
            raise ValueError(f"seed {s[:12]}... in {part[:40]!r} is above the largest seed, 2**63 − 1 = {MAX_SEED}")
        return int(s)

    ranges: list[range] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        a, dash, b = part.partition("-")
        lo = seed(a, part)
        r = range(lo, seed(b, part) + 1) if dash else range(lo, lo + 1)
        if not r:
            raise ValueError(f"bad seed range {part!r}: the end is before the start")
        ranges.append(r)
    n = sum(r.stop - r.start for r in ranges)  # counted before any list is built (len() overflows past 2**63)
    if n > max_seeds:
        raise ValueError(f"seeds {spec!r} name {n:,} seeds, more than {max_seeds:,}; split the run into smaller specs")
    big = max((r.stop - 1 for r in ranges), default=0)
    if big > MAX_SEED:
        raise ValueError(f"seed {big} in {spec!r} is above the largest seed, 2**63 − 1 = {MAX_SEED}; pick a smaller "
                         "one")
    out = [s for r in ranges for s in r]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"seeds {spec!r} must name at least one seed and no seed twice")
    return out


def seeds_from(value, max_seeds: int = 1_000_000) -> list[int]:
    """The seeds of a config file's ``seeds:``: a spec string ("0-15,100"), one integer, or a list of integers,
    with :func:`parse_seeds`'s checks (integers ≥ 0, none twice, at least one)."""
    if isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        return parse_seeds(",".join(map(str, value)), max_seeds)
    if isinstance(value, int) and not isinstance(value, bool):
        return parse_seeds(str(value), max_seeds)
    if isinstance(value, str):
        return parse_seeds(value, max_seeds)
    raise ValueError(f"bad seeds {value!r}: seeds are integers ≥ 0, as a spec such as 0-15 or 0-7,100 or a list")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] → uint8 in [0, 255]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def png_bytes(img: torch.Tensor) -> bytes:
    """[C, H, W] uint8 → PNG bytes."""
    from PIL import Image

    arr = img.permute(1, 2, 0).cpu().numpy()
    im = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def grid(images: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Square-ish grid of [C, H, W] uint8 images."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    C, H, W = images[0].shape
    out = torch.zeros(C, rows * (H + pad) + pad, cols * (W + pad) + pad, dtype=torch.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        out[:, pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = img
    return out
