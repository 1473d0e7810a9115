"""The filesystem store's batch put (`put_files`) on real directories and real mounts: every
object of a batch durable, linked under its name and read back; what costs one item (a name the
store cannot hold, a key holding other bytes, a staged copy that changed) costs only that item;
a store that is away fails the whole batch, which a retry then completes, with nothing left in
`.incoming/`.

Root ignores permission bits, so "full" is real: a small tmpfs, filled up, then grown.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockd import durable
from dockd.errors import IntegrityError, StoreConflict, StoreRefused, StoreUnavailable
from dockd.store.base import BatchStore, PutItem, batch_store
from dockd.store.filesystem import INCOMING, FilesystemStore

PREFIX = "CAM01/20261124T174900Z-CAM01-3f2a/files"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def incoming(root: Path) -> list[str]:
    d = root / INCOMING
    return sorted(os.listdir(d)) if d.is_dir() else []


def staged(tmp_path: Path, files: dict[str, bytes]) -> list[PutItem]:
    """Staged copies of `files` (store path -> bytes), as PutItems in the given order."""
    src = tmp_path / "staging"
    src.mkdir(exist_ok=True)
    items = []
    for n, (path, data) in enumerate(files.items()):
        p = src / f"{len(os.listdir(src))}-{n}"
        p.write_bytes(data)
        items.append(PutItem(f"{PREFIX}/{path}", p, sha(data), len(data)))
    return items


def small_files(n: int, size: int = 5000, dirs: int = 3) -> dict[str, bytes]:
    return {
        f"DCIM/{k % dirs:03d}/IMG{k:05d}.JPG": hashlib.sha256(str(k).encode()).digest()
        * (size // 32)
        for k in range(n)
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "evidence"
    r.mkdir()
    return r


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted in teardown whatever the test did to it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to mount a tmpfs")
    where = tmp_path / "mnt"
    where.mkdir()
    try:
        _run("mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(where))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc.stderr.decode().strip()}")
    try:
        yield where
    finally:
        _run("umount", str(where))


def test_the_filesystem_store_takes_batches_and_a_forwarding_wrapper_does_not() -> None:
    store = FilesystemStore(Path("/nonexistent"))
    assert isinstance(store, BatchStore) and batch_store(store) is store

    class Forwarding:  # a test double that forwards what it does not define (tests/systemd)
        def __init__(self, inner: FilesystemStore) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    assert batch_store(Forwarding(store)) is None


@pytest.mark.parametrize("durability", ["syncfs", "fsync_each"])
def test_a_batch_of_small_files_is_stored_read_only_verified_and_leaves_no_temporaries(
    tmp_path: Path, root: Path, durability: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if durability == "fsync_each":  # as on a NAS or FUSE mount, whatever this filesystem is
        monkeypatch.setattr(durable, "SYNCFS_TYPES", frozenset())
    files = small_files(40)
    items = staged(tmp_path, files)

    outcomes = FilesystemStore(root).put_files(items)

    assert outcomes == ["readback"] * len(items)
    for it, data in zip(items, files.values(), strict=True):
        obj = root / it.key
        assert obj.read_bytes() == data
        assert stat.S_IMODE(obj.stat().st_mode) == 0o440
    assert incoming(root) == []


def test_a_name_the_store_refuses_costs_only_itself_in_a_batch(tmp_path: Path, root: Path) -> None:
    pairs = list(small_files(6).items())
    files = dict([*pairs[:3], ("DCIM/" + "x" * 300 + ".JPG", b"long"), *pairs[3:]])
    items = staged(tmp_path, files)

    outcomes = FilesystemStore(root).put_files(items)

    assert isinstance(outcomes[3], StoreRefused)
    assert outcomes[:3] + outcomes[4:] == ["readback"] * 6
    for it in items[:3] + items[4:]:
        assert (root / it.key).is_file()
    assert incoming(root) == []


def test_other_bytes_under_a_key_mid_batch_are_a_conflict_for_that_key_only(
    tmp_path: Path, root: Path
) -> None:
    files = small_files(9)
    items = staged(tmp_path, files)
    taken = root / items[4].key
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"someone else's bytes")

    outcomes = FilesystemStore(root).put_files(items)

    assert isinstance(outcomes[4], StoreConflict)
    assert outcomes[:4] + outcomes[5:] == ["readback"] * 8
    assert taken.read_bytes() == b"someone else's bytes"  # never overwritten
    assert incoming(root) == []


def test_a_batch_put_again_after_a_crash_finds_the_same_bytes_and_succeeds(
    tmp_path: Path, root: Path
) -> None:
    """A kill between the links and the journal record: the next attempt at the same batch
    finds every object whole, with the journal's bytes."""
    items = staged(tmp_path, small_files(12))
    store = FilesystemStore(root)
    assert store.put_files(items[:7]) == ["readback"] * 7  # linked, never recorded

    assert store.put_files(items) == ["readback"] * 12
    assert incoming(root) == []


def test_a_staged_copy_that_changed_is_an_integrity_error_for_that_file_only(
    tmp_path: Path, root: Path
) -> None:
    items = staged(tmp_path, small_files(5))
    items[2].source.write_bytes(b"not what was verified")

    outcomes = FilesystemStore(root).put_files(items)

    assert isinstance(outcomes[2], IntegrityError)
    assert not (root / items[2].key).exists()  # never sent on
    assert outcomes[:2] + outcomes[3:] == ["readback"] * 4
    assert incoming(root) == []


def test_a_store_that_is_missing_fails_the_whole_batch_as_away(tmp_path: Path) -> None:
    items = staged(tmp_path, small_files(3))
    with pytest.raises(StoreUnavailable):
        FilesystemStore(tmp_path / "not-mounted").put_files(items)
    assert not (tmp_path / "not-mounted").exists()


def test_a_store_full_mid_batch_is_away_then_grown_the_retry_stores_all(
    tmp_path: Path, small_mount: Path
) -> None:
    files = small_files(24, size=16 * 1024)  # 384 KiB into 256 KiB
    items = staged(tmp_path, files)
    store = FilesystemStore(small_mount)

    with pytest.raises(StoreUnavailable):
        store.put_files(items)
    assert incoming(small_mount) == []  # the temporaries written before it filled are gone

    _run("mount", "-o", "remount,size=2m", str(small_mount))
    assert store.put_files(items) == ["readback"] * len(items)
    for it, data in zip(items, files.values(), strict=True):
        assert (small_mount / it.key).read_bytes() == data
    assert incoming(small_mount) == []
