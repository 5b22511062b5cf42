"""The run folder: one writer (lock), stale locks and orphaned tmp files, file modes, --overwrite, OSErrors."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from lossguide import io
from lossguide.runfolder import LOCK, RunFolder, RunFolderError, fixed_batches

HOLDER = textwrap.dedent(
    """
    import sys
    from lossguide.runfolder import RunFolder
    with RunFolder(sys.argv[1]).open("a: 1\\n"):
        print("locked", flush=True)
        sys.stdin.read()  # hold the lock until the test closes stdin
    """
)


def hold_lock(path):
    """A second process that holds the lock of ``path`` until its stdin is closed."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)  # fmt: skip
    assert p.stdout.readline().strip() == "locked"
    return p


def test_fixed_batches_pad_the_last_batch():
    assert list(fixed_batches([5, 6, 7], 2)) == [([5, 6], 2), ([7, 7], 1)]
    assert list(fixed_batches([1, 2], 2)) == [([1, 2], 2)]
    assert list(fixed_batches([], 4)) == []
    with pytest.raises(ValueError, match="must be ≥ 1"):
        list(fixed_batches([1], 0))


def test_a_second_writer_is_refused_naming_the_lock(tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        with pytest.raises(RunFolderError) as e:
            RunFolder(out).open("a: 1\n")
        msg = str(e.value)
        assert f"in use by process {holder.pid}" in msg and f"delete {out / LOCK}" in msg and "\n" not in msg
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with RunFolder(out).open("a: 1\n"):  # released: the next writer gets it
        assert (out / LOCK).read_text() == f"{os.getpid()}\n"
    assert not (out / LOCK).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(dead.stdout)  # what a SIGKILLed writer leaves
    with RunFolder(out).open("a: 1\n"):
        assert (out / LOCK).read_text() == f"{os.getpid()}\n"


def test_orphaned_tmp_files_are_removed(tmp_path):
    out = tmp_path / "run"
    (out / "records").mkdir(parents=True)
    orphans = [out / ".000001.png.k3j2x9_a.tmp", out / "records" / ".000001.json.0a1b2c3d.tmp"]
    for f in orphans:
        f.write_bytes(b"half a file")
    (out / "notes.tmp").write_text("the user's")
    with RunFolder(out).open("a: 1\n"):
        pass
    assert not any(f.exists() for f in orphans) and (out / "notes.tmp").exists()


def test_files_have_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with RunFolder(tmp_path / "run").open("a: 1\n") as f:
            f.write_seed(3, b"png", {"seed": 3})
            f.write_json("metrics.json", {})
        for p in (f.png(3), f.record(3), f.path / "config.yaml", f.path / "metrics.json"):
            assert oct(p.stat().st_mode & 0o777) == "0o644", p
    finally:
        os.umask(old)


def test_overwrite_removes_every_old_output(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out).open("seeds: 0-5\n") as f:
        for s in range(6):
            f.write_seed(s, b"png", {"seed": s})
        f.write_bytes("grid.png", b"grid")
        f.write_json("metrics.json", {})
        f.write_text("notes.txt", "kept")
    with pytest.raises(ValueError, match="different config; pass another --out, or --overwrite"):
        RunFolder(out).open("seeds: 0-1\n")
    with RunFolder(out, overwrite=True).open("seeds: 0-1\n") as f:
        assert f.todo(range(2)) == [0, 1]
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt", "records"]
    assert list((out / "records").iterdir()) == []


def test_an_out_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "taken"
    f.write_text("not a folder")
    with pytest.raises(RunFolderError, match="is an existing file, not a folder; pass a folder path"):
        RunFolder(f).check("a: 1\n")
    with pytest.raises(RunFolderError, match=f"cannot create the run folder {f}: .*; a file is in the way"):
        RunFolder(f).open("a: 1\n")
    with pytest.raises(RunFolderError, match=f"cannot create the run folder {f / 'run'}: .*; a file is in the way"):
        RunFolder(f / "run").open("a: 1\n")
    assert f.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(RunFolderError, match=f"cannot .* {out}.*: Permission denied; make the folder writable"):
            RunFolder(out).open("a: 1\n")
    finally:
        out.chmod(0o755)


@pytest.mark.parametrize(
    "code, fix",
    [
        (errno.EROFS, "make the folder writable or pass another --out"),
        (errno.ENOSPC, "free disk space, then rerun the same command to resume"),
    ],
)
def test_write_failures_name_the_path_and_the_fix(tmp_path, monkeypatch, code, fix):
    """A read-only mount (EROFS, which stops root too) or a full disk, injected where the file is created."""
    with RunFolder(tmp_path / "run").open("a: 1\n") as f:

        def fail(path):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(io, "_new_tmp", fail)
        with pytest.raises(RunFolderError) as e:
            f.write_seed(7, b"png", {"seed": 7})
    assert str(e.value) == f"cannot write {f.png(7)}: {os.strerror(code)}; {fix}"
    assert e.value.errno == code


def test_outputs_without_a_config_are_refused_even_without_seed_files(tmp_path):
    """A grid.png left with no config.yaml and no seed file is an unknown run's output: a one-line refusal."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "grid.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"holds grid.png, ... but no config.yaml, so the run that made them"):
        RunFolder(tmp_path / "run").open("a: 1\n")
