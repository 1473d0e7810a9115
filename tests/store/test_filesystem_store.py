"""The filesystem store on real directories and real mounts: never overwrite, verify by
read-back, read-only objects, and a store that is away (missing, read-only, full).

Root ignores permission bits, so "read-only" and "full" are real: a small tmpfs mounted for
the test, remounted read-only or filled up. Teardown always unmounts it.
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

from dockd.errors import IntegrityError, StoreConflict, StoreError, StoreUnavailable
from dockd.store.base import ObjectInfo
from dockd.store.filesystem import INCOMING, FilesystemStore

KEY = "CAM01/20261124T174900Z-CAM01-3f2a/files/DCIM/100CAM/0001.MP4"
DATA = b"footage " * 1000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def incoming(root: Path) -> list[str]:
    d = root / INCOMING
    return sorted(os.listdir(d)) if d.is_dir() else []


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "evidence"
    r.mkdir()
    return r


@pytest.fixture
def store(root: Path) -> FilesystemStore:
    return FilesystemStore(root)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to mount a tmpfs")
    where.mkdir()
    try:
        _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc.stderr.decode().strip()}")
    try:
        yield where
    finally:
        _run("umount", str(where))


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted in teardown whatever the test did to it."""
    yield from _tmpfs(tmp_path / "mnt", "1m")


# --- put and verify ----------------------------------------------------------------------------


def test_store_put_bytes_then_verify_reads_it_back(store: FilesystemStore, root: Path) -> None:
    store.put_bytes(KEY, DATA, sha(DATA))

    assert (root / KEY).read_bytes() == DATA
    assert store.verify(KEY, sha(DATA), len(DATA)) == "readback"
    assert store.stat(KEY) == ObjectInfo(KEY, len(DATA))
    with store.open(KEY) as f:
        assert f.read() == DATA


def test_store_put_file_then_verify_reads_it_back(
    store: FilesystemStore, root: Path, tmp_path: Path
) -> None:
    src = tmp_path / "staged"
    data = os.urandom(9 * 1024 * 1024 + 7)  # more than two chunks
    src.write_bytes(data)

    store.put_file(KEY, src, sha(data), len(data))

    assert store.verify(KEY, sha(data), len(data)) == "readback"
    assert (root / KEY).read_bytes() == data
    assert src.read_bytes() == data  # the staged copy is left for the caller


def test_store_object_is_read_only_0440_and_its_directories_0750(
    store: FilesystemStore, root: Path
) -> None:
    store.put_bytes(KEY, DATA, sha(DATA))

    assert mode(root / KEY) == 0o440
    d = (root / KEY).parent
    while d != root:
        assert mode(d) == 0o750, d
        d = d.parent


def test_store_put_leaves_no_temporaries(store: FilesystemStore, root: Path) -> None:
    store.put_bytes(KEY, DATA, sha(DATA))
    store.put_bytes("CAM01/s/manifest.json", b"{}", sha(b"{}"))

    assert incoming(root) == []
    assert tree(root) == sorted(
        [
            INCOMING,
            "CAM01",
            "CAM01/s",
            "CAM01/s/manifest.json",
            "CAM01/20261124T174900Z-CAM01-3f2a",
            "CAM01/20261124T174900Z-CAM01-3f2a/files",
            "CAM01/20261124T174900Z-CAM01-3f2a/files/DCIM",
            "CAM01/20261124T174900Z-CAM01-3f2a/files/DCIM/100CAM",
            KEY,
        ]
    )


def test_store_put_of_the_same_bytes_twice_is_a_successful_retry(
    store: FilesystemStore, root: Path
) -> None:
    store.put_bytes(KEY, DATA, sha(DATA))
    before = (root / KEY).stat()

    store.put_bytes(KEY, DATA, sha(DATA))

    after = (root / KEY).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert incoming(root) == []


def test_store_put_of_other_bytes_under_an_existing_key_conflicts_and_leaves_the_original(
    store: FilesystemStore, root: Path, tmp_path: Path
) -> None:
    store.put_bytes(KEY, DATA, sha(DATA))
    before = (root / KEY).stat()
    other = DATA[:-1] + b"!"

    with pytest.raises(StoreConflict, match="already in the store with other content"):
        store.put_bytes(KEY, other, sha(other))
    src = tmp_path / "other"
    src.write_bytes(other)
    with pytest.raises(StoreConflict):
        store.put_file(KEY, src, sha(other), len(other))

    assert (root / KEY).read_bytes() == DATA
    after = (root / KEY).stat()
    assert (after.st_ino, after.st_mtime_ns, mode(root / KEY)) == (
        before.st_ino,
        before.st_mtime_ns,
        0o440,
    )
    assert incoming(root) == []


def test_store_put_of_bytes_not_matching_their_sha256_is_refused_and_nothing_stored(
    store: FilesystemStore, root: Path
) -> None:
    with pytest.raises(IntegrityError, match="staged copy hashes to"):
        store.put_bytes(KEY, DATA, sha(b"what the journal verified"))

    assert not (root / KEY).exists()
    assert store.stat(KEY) is None
    assert incoming(root) == []


def test_store_put_file_of_a_missing_staged_file_is_not_a_store_outage(
    store: FilesystemStore, root: Path, tmp_path: Path
) -> None:
    """ENOENT of the staged copy must not read as the store being away: the upload worker would
    report the store unreachable and retry forever. No retry brings it back: an integrity
    problem for a person."""
    with pytest.raises(IntegrityError, match=r"staged copy .* is missing"):
        store.put_file(KEY, tmp_path / "gone", sha(DATA), len(DATA))

    assert not (root / KEY).exists()
    assert tree(root) == []


# --- verify ------------------------------------------------------------------------------------


def test_store_verify_of_a_flipped_byte_is_an_integrity_error(
    store: FilesystemStore, root: Path
) -> None:
    store.put_bytes(KEY, DATA, sha(DATA))
    with open(root / KEY, "r+b") as f:  # 0440, but root writes anyway
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0x01]))

    with pytest.raises(IntegrityError, match="store copy hashes to"):
        store.verify(KEY, sha(DATA), len(DATA))


def test_store_verify_of_a_truncated_object_is_an_integrity_error(
    store: FilesystemStore, root: Path
) -> None:
    store.put_bytes(KEY, DATA, sha(DATA))
    os.truncate(root / KEY, len(DATA) - 1)

    with pytest.raises(IntegrityError, match=f"{len(DATA) - 1} bytes in the store"):
        store.verify(KEY, sha(DATA), len(DATA))


def test_store_verify_of_a_missing_object_is_a_store_error_not_integrity(
    store: FilesystemStore,
) -> None:
    with pytest.raises(StoreError, match="missing from the store") as info:
        store.verify(KEY, sha(DATA), len(DATA))
    assert not isinstance(info.value, IntegrityError | StoreUnavailable)
    with pytest.raises(StoreError, match="missing from the store"):
        store.open(KEY)
    assert store.stat(KEY) is None


# --- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["../x", "/abs", "a//b", "", "a/./b", "a/..", "a/b/", ".", "CAM01/../../etc/passwd"]
)
def test_store_unsafe_key_is_refused_everywhere(
    store: FilesystemStore, root: Path, tmp_path: Path, key: str
) -> None:
    src = tmp_path / "src"
    src.write_bytes(DATA)
    before = tree(tmp_path)

    with pytest.raises(StoreError, match="not a safe store key"):
        store.put_bytes(key, DATA, sha(DATA))
    with pytest.raises(StoreError, match="not a safe store key"):
        store.put_file(key, src, sha(DATA), len(DATA))
    with pytest.raises(StoreError, match="not a safe store key"):
        store.verify(key, sha(DATA), len(DATA))
    with pytest.raises(StoreError, match="not a safe store key"):
        store.open(key)
    with pytest.raises(StoreError, match="not a safe store key"):
        store.stat(key)

    assert tree(tmp_path) == before


# --- a store that is away ----------------------------------------------------------------------


def test_store_missing_root_is_unavailable_and_nothing_is_created(tmp_path: Path) -> None:
    nas = tmp_path / "nas"  # a NAS mount point whose share is not mounted: not even the dir
    store = FilesystemStore(nas)

    with pytest.raises(StoreUnavailable, match="missing"):
        store.check()
    with pytest.raises(StoreUnavailable):
        store.put_bytes(KEY, DATA, sha(DATA))
    with pytest.raises(StoreUnavailable):
        list(store.manifests())

    assert not nas.exists()
    assert os.listdir(tmp_path) == []


def test_store_read_only_mount_is_unavailable_then_writable_again_works(
    small_mount: Path,
) -> None:
    store = FilesystemStore(small_mount)
    store.put_bytes("CAM01/s/files/first", b"first", sha(b"first"))
    _run("mount", "-o", "remount,ro", str(small_mount))

    with pytest.raises(StoreUnavailable, match="not writable"):
        store.check()
    with pytest.raises(StoreUnavailable):
        store.put_bytes(KEY, DATA, sha(DATA))
    # what is there can still be read and verified
    assert store.verify("CAM01/s/files/first", sha(b"first"), 5) == "readback"

    _run("mount", "-o", "remount,rw", str(small_mount))
    store.check()
    store.put_bytes(KEY, DATA, sha(DATA))
    assert store.verify(KEY, sha(DATA), len(DATA)) == "readback"
    assert incoming(small_mount) == []


def test_store_read_only_between_mkdir_and_write_is_unavailable(small_mount: Path) -> None:
    """check() passes, then the write itself meets EROFS: classified as away, not an error."""
    store = FilesystemStore(small_mount)
    store.put_bytes("CAM01/s/files/first", b"first", sha(b"first"))
    _run("mount", "-o", "remount,ro", str(small_mount))
    store.check = lambda: None  # type: ignore[method-assign]

    with pytest.raises(StoreUnavailable, match="Read-only file system"):
        store.put_bytes(KEY, DATA, sha(DATA))


def test_store_full_is_unavailable_and_leaves_no_partial_object(small_mount: Path) -> None:
    store = FilesystemStore(small_mount)
    big = os.urandom(2 * 1024 * 1024)

    with pytest.raises(StoreUnavailable, match="No space left on device"):
        store.put_bytes(KEY, big, sha(big))

    assert not (small_mount / KEY).exists()
    assert incoming(small_mount) == []
    # the space came back: a small object still goes in
    store.put_bytes(KEY, DATA, sha(DATA))
    assert store.verify(KEY, sha(DATA), len(DATA)) == "readback"


# --- finding manifests, cleaning up ------------------------------------------------------------


def test_store_manifests_finds_only_camera_session_manifest_json(root: Path) -> None:
    def touch(rel: str) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}")

    touch("CAM02/s2/manifest.json")
    touch("CAM01/s1/manifest.json")
    touch("CAM01/s0/manifest.json")
    touch("CAM01/s3/SHA256SUMS")  # a session without a manifest: not complete
    touch("CAM01/s4/files/manifest.json")  # too deep: footage named manifest.json
    touch("CAM01/manifest.json")  # too shallow
    touch("manifest.json")
    touch(".incoming/s/manifest.json")  # hidden
    touch(".hidden/s/manifest.json")
    (root / "CAM01" / "s5" / "manifest.json").mkdir(parents=True)  # not a file
    touch("README")

    assert list(FilesystemStore(root).manifests()) == [
        "CAM01/s0/manifest.json",
        "CAM01/s1/manifest.json",
        "CAM02/s2/manifest.json",
    ]


def test_store_manifests_of_an_empty_store_is_empty(store: FilesystemStore) -> None:
    assert list(store.manifests()) == []


def test_store_clean_incoming_removes_only_temporaries(store: FilesystemStore, root: Path) -> None:
    store.put_bytes(KEY, DATA, sha(DATA))
    (root / INCOMING / "0123abcd.tmp").write_bytes(b"half an object")
    (root / INCOMING / "4567cdef.tmp").write_bytes(b"")
    (root / INCOMING / "note.txt").write_text("not ours")

    assert store.clean_incoming() == 2

    assert incoming(root) == ["note.txt"]
    assert (root / KEY).read_bytes() == DATA
    assert store.clean_incoming() == 0


def test_store_clean_incoming_without_an_incoming_dir_is_nothing(
    store: FilesystemStore, root: Path
) -> None:
    assert store.clean_incoming() == 0
    assert not (root / INCOMING).exists()
