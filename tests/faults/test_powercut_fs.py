"""The power-cut layer itself (powercut_fs.py): what survives a cut is exactly what was fsynced,
by the POSIX rules — file data by the file's fsync, names by their directory's fsync — and a
database that commits with fsync (SQLite, synchronous=FULL, WAL: the journal's settings) keeps
every commit, while one that does not (synchronous=OFF) loses them. Without these, a campaign
run on the layer would prove nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from powercut_fs import PowerCutFS


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[PowerCutFS]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    fs = PowerCutFS(tmp_path / "backing", tmp_path / "mnt")
    (tmp_path / "backing" / "old.txt").write_bytes(b"there before the mount")
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()


def power_cycle(fs: PowerCutFS) -> None:
    fs.cut()
    fs.unmount()
    fs.rebuild()
    fs.mount()


def fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(p: Path, data: bytes, *, sync: bool) -> None:
    with open(p, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def test_what_was_there_at_the_mount_is_durable(layer: PowerCutFS) -> None:
    mnt = layer.mountpoint
    (mnt / "old.txt").write_bytes(b"overwritten, never fsynced")
    power_cycle(layer)
    assert (mnt / "old.txt").read_bytes() == b"there before the mount"


def test_unsynced_file_is_gone_and_synced_data_without_its_directory_too(
    layer: PowerCutFS,
) -> None:
    mnt = layer.mountpoint
    write(mnt / "a", b"never fsynced", sync=False)
    write(mnt / "b", b"fsynced, directory not", sync=True)
    power_cycle(layer)
    assert sorted(os.listdir(mnt)) == ["old.txt"]


def test_data_and_directory_fsynced_survive_exactly(layer: PowerCutFS) -> None:
    mnt = layer.mountpoint
    write(mnt / "a", b"x" * 100_000, sync=True)
    (mnt / "sub").mkdir()
    write(mnt / "sub" / "c", b"in a new directory", sync=True)
    fsync_path(mnt / "sub")
    fsync_path(mnt)
    with open(mnt / "a", "r+b") as f:  # later, unsynced: rolled back
        f.seek(10)
        f.write(b"LATER")
    power_cycle(layer)
    assert (mnt / "a").read_bytes() == b"x" * 100_000
    assert (mnt / "sub" / "c").read_bytes() == b"in a new directory"


def test_name_durable_data_not_comes_back_empty(layer: PowerCutFS) -> None:
    mnt = layer.mountpoint
    write(mnt / "a", b"data never fsynced", sync=False)
    fsync_path(mnt)
    power_cycle(layer)
    assert (mnt / "a").read_bytes() == b""


def test_rename_is_durable_only_with_its_directory(layer: PowerCutFS) -> None:
    mnt = layer.mountpoint
    write(mnt / "f.partial", b"payload", sync=True)
    fsync_path(mnt)
    os.rename(mnt / "f.partial", mnt / "f")
    power_cycle(layer)
    assert sorted(os.listdir(mnt)) == ["f.partial", "old.txt"]
    os.rename(mnt / "f.partial", mnt / "f")
    fsync_path(mnt)
    power_cycle(layer)
    assert (mnt / "f").read_bytes() == b"payload"
    assert not (mnt / "f.partial").exists()


def test_truncate_and_growth_follow_the_fsync(layer: PowerCutFS) -> None:
    mnt = layer.mountpoint
    write(mnt / "a", b"0123456789", sync=True)
    fsync_path(mnt)
    with open(mnt / "a", "r+b") as f:
        f.truncate(4)
        f.flush()
        os.fsync(f.fileno())
        f.seek(0, 2)
        f.write(b"tail never synced")
    power_cycle(layer)
    assert (mnt / "a").read_bytes() == b"0123"


def test_armed_cut_runs_the_callback_and_applies_nothing_after(layer: PowerCutFS) -> None:
    mnt = layer.mountpoint
    seen: list[str] = []
    layer.arm(lambda op: op.name == "fsync", lambda: seen.append("cut"))
    fd = os.open(mnt / "a", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"written before the cut")
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
    finally:
        with contextlib.suppress(OSError):  # the close's flush fails too: the power is off
            os.close(fd)
    assert exc.value.errno == errno.EIO
    assert seen == ["cut"] and layer.dead and layer.last_cut is not None
    with pytest.raises(OSError):
        (mnt / "b").write_bytes(b"after the cut")
    layer.unmount()
    layer.rebuild()
    layer.mount()
    assert sorted(os.listdir(mnt)) == ["old.txt"]


def test_freeze_without_drop_keeps_everything(layer: PowerCutFS) -> None:
    mnt = layer.mountpoint
    write(mnt / "a", b"kept: a kill -9 loses nothing written", sync=False)
    layer.arm(lambda op: op.name == "unlink", lambda: None, drop=False)
    with pytest.raises(OSError):
        os.unlink(mnt / "a")
    layer.unmount()
    layer.rebuild()
    layer.mount()
    assert (mnt / "a").read_bytes() == b"kept: a kill -9 loses nothing written"


def _db(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


@pytest.mark.parametrize(("synchronous", "kept"), [("FULL", 20), ("OFF", 0)])
def test_sqlite_wal_commits_survive_only_when_fsynced(
    layer: PowerCutFS, synchronous: str, kept: int
) -> None:
    db = layer.mountpoint / "j.sqlite3"
    conn = _db(db, "FULL")
    conn.execute("CREATE TABLE t (n INTEGER)")
    conn.close()  # checkpointed and fsynced: the table is durable
    conn = _db(db, synchronous)
    for n in range(20):
        conn.execute("INSERT INTO t VALUES (?)", (n,))
    # the daemon is killed with its connection open: nothing more is written
    power_cycle(layer)
    conn.close()  # its file descriptors are dead (the mount they were on is gone)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == kept
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_hook_changes_the_world_then_serves_the_request(layer: PowerCutFS) -> None:
    mnt = layer.mountpoint
    (mnt / "d").mkdir()
    seen: list[str] = []
    layer.hook(
        lambda op: op.name == "opendir" and op.path == "d",
        lambda op: seen.append(op.name) or (layer.backing / "d" / "new").write_bytes(b"x"),
    )
    assert os.listdir(mnt / "d") == ["new"]  # made by the hook, just before the listing
    assert seen == ["opendir"] and not layer.dead
