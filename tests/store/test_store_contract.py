"""One contract, every backend: the same cases run against FilesystemStore and S3Store (on the
real S3 server), as base.Store's docstring states it — whole or nothing, never over an existing
object, a retry of the same bytes is success, other bytes a conflict, verify catches content
that is not what was put, manifests found from the store alone.

Backend-specific facts (0440 files, multipart composite checksums, Object Lock) are tested in
tests/store/test_filesystem_store.py and tests/s3/.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dockd.config import StoreConfig
from dockd.errors import IntegrityError, StoreConflict, StoreError, StoreUnavailable
from dockd.store.base import Store
from dockd.store.filesystem import FilesystemStore
from dockd.upload.throttle import TokenBucket

SESSION = "CAM01/20261124T174900Z-CAM01-3f2a"
KEY = f"{SESSION}/files/DCIM/100CAM/0001.MP4"
MIB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Backend:
    kind: str
    make: Callable[..., Store]  # make(throttle=None, verify="checksum", multipart_mib=None)
    plant: Callable[[str, bytes], None]  # put bytes under a key behind the store's back
    absent: Callable[[], Store]  # a store whose directory/bucket does not exist

    @property
    def store(self) -> Store:
        return self.make()


class Recorder(TokenBucket):
    """A bucket that never waits and counts what it was asked for (a fake: the real bucket's
    timing is tested with a fake clock in tests/upload/test_throttle.py)."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.taken = 0

    def take(self, n: int) -> float:
        self.taken += n
        return 0.0


def _filesystem(tmp_path: Path) -> Backend:
    root = tmp_path / "evidence"
    root.mkdir()

    def make(throttle: TokenBucket | None = None, **_: Any) -> Store:
        return FilesystemStore(root, throttle=throttle)

    def plant(key: str, data: bytes) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return Backend("filesystem", make, plant, lambda: FilesystemStore(tmp_path / "not-mounted"))


def _s3(tmp_path: Path, server: Any) -> Backend:
    from dockd.store.s3 import S3Store

    bucket = server.bucket()
    base = server.store_config(tmp_path, bucket)

    def make(
        throttle: TokenBucket | None = None, verify: str = "checksum", multipart_mib: int = 0
    ) -> Store:
        store = S3Store.from_config(StoreConfig(**{**base, "verify": verify}), throttle=throttle)
        if multipart_mib:
            store.multipart_threshold = store.part_size = multipart_mib * MIB
        return store

    def plant(key: str, data: bytes) -> None:
        server.client().put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256")

    def absent() -> Store:
        return S3Store.from_config(StoreConfig(**{**base, "bucket": f"{bucket}-gone"}))

    return Backend("s3", make, plant, absent)


@pytest.fixture(params=["filesystem", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "filesystem":
        return _filesystem(tmp_path)
    return _s3(tmp_path, request.getfixturevalue("s3_server"))


def staged(tmp_path: Path, data: bytes, name: str = "staged.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read(store: Store, key: str) -> bytes:
    with store.open(key) as f:
        return f.read()


def test_put_file_then_verify_and_read_back(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    data = os.urandom(300_000)
    store.put_file(KEY, staged(tmp_path, data), sha(data), len(data))
    assert store.verify(KEY, sha(data), len(data)) in ("checksum", "readback")
    info = store.stat(KEY)
    assert info is not None and info.size == len(data)
    assert read(store, KEY) == data


def test_put_bytes_then_verify(backend: Backend) -> None:
    store = backend.store
    body = b'{"format": "dockd.manifest/1"}\n'
    store.put_bytes(f"{SESSION}/manifest.json", body, sha(body))
    store.verify(f"{SESSION}/manifest.json", sha(body), len(body))
    assert read(store, f"{SESSION}/manifest.json") == body


def test_empty_file_is_an_object(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    store.put_file(KEY, staged(tmp_path, b""), sha(b""), 0)
    store.verify(KEY, sha(b""), 0)
    assert read(store, KEY) == b""


def test_same_bytes_again_is_success(backend: Backend, tmp_path: Path) -> None:
    """A retry after a crash between the put and the journal's record of it."""
    store = backend.store
    data = os.urandom(10_000)
    src = staged(tmp_path, data)
    store.put_file(KEY, src, sha(data), len(data))
    store.put_file(KEY, src, sha(data), len(data))
    backend.make().put_file(KEY, src, sha(data), len(data))  # a new process, too
    store.put_bytes(KEY, data, sha(data))
    assert read(store, KEY) == data


def test_other_bytes_under_a_taken_key_are_a_conflict_and_nothing_changes(
    backend: Backend, tmp_path: Path
) -> None:
    store = backend.store
    first, other = os.urandom(10_000), os.urandom(10_000)
    store.put_file(KEY, staged(tmp_path, first), sha(first), len(first))
    with pytest.raises(StoreConflict):
        store.put_file(KEY, staged(tmp_path, other, "other.bin"), sha(other), len(other))
    with pytest.raises(StoreConflict):
        store.put_bytes(KEY, other[:5], sha(other[:5]))
    assert read(store, KEY) == first


def test_an_object_placed_by_hand_is_never_replaced(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    planted, ours = b"not the footage" * 100, os.urandom(1500)
    backend.plant(KEY, planted)
    with pytest.raises(StoreConflict, match="other content"):
        store.put_file(KEY, staged(tmp_path, ours), sha(ours), len(ours))
    assert read(store, KEY) == planted


def test_missing_key(backend: Backend) -> None:
    store = backend.store
    assert store.stat(KEY) is None
    with pytest.raises(StoreError) as verify_err:
        store.verify(KEY, sha(b"x"), 1)
    assert not isinstance(verify_err.value, StoreUnavailable)
    with pytest.raises(StoreError):
        store.open(KEY)


@pytest.mark.parametrize("verify", ["checksum", "readback"])
def test_content_other_than_put_is_caught_by_verify(backend: Backend, verify: str) -> None:
    """An object whose bytes differ from what the journal says, same size: one flipped byte.
    (On S3 bytes cannot be flipped in place; the altered copy is placed by hand.)"""
    store = backend.make(verify=verify)
    data = os.urandom(50_000)
    altered = bytearray(data)
    altered[12_345] ^= 0x01
    backend.plant(KEY, bytes(altered))
    with pytest.raises(IntegrityError):
        store.verify(KEY, sha(data), len(data))
    with pytest.raises(IntegrityError):
        store.verify(KEY, sha(bytes(altered)), len(data) + 1)  # size is checked too
    assert store.verify(KEY, sha(bytes(altered)), len(data)) in ("checksum", "readback")


def test_staged_copy_not_what_the_journal_says_is_never_stored(
    backend: Backend, tmp_path: Path
) -> None:
    store = backend.store
    data = os.urandom(20_000)
    damaged = bytearray(data)
    damaged[7] ^= 0x80
    with pytest.raises(IntegrityError):
        store.put_file(KEY, staged(tmp_path, bytes(damaged)), sha(data), len(data))
    assert store.stat(KEY) is None


def test_staged_copy_missing_is_an_integrity_error(backend: Backend, tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="missing"):
        backend.store.put_file(KEY, tmp_path / "gone.bin", sha(b""), 0)


def test_large_file_goes_in_whole(backend: Backend, tmp_path: Path) -> None:
    """Above the S3 multipart threshold (5 MiB here): parts, then one object."""
    store = backend.make(multipart_mib=5)
    data = os.urandom(11 * MIB + 123)
    store.put_file(KEY, staged(tmp_path, data), sha(data), len(data))
    assert store.verify(KEY, sha(data), len(data)) in ("checksum", "readback")
    assert read(store, KEY) == data
    store.put_file(KEY, staged(tmp_path, data), sha(data), len(data))  # retry: success
    other = os.urandom(len(data))
    with pytest.raises(StoreConflict):
        store.put_file(KEY, staged(tmp_path, other, "other.bin"), sha(other), len(other))
    assert read(store, KEY) == data


def test_manifests_are_found_from_the_store_alone(backend: Backend) -> None:
    store = backend.store
    body = b"{}"
    for key in (
        "CAM01/20261124T174900Z-CAM01-3f2a/manifest.json",
        "CAM01/20261125T080000Z-CAM01-0b1c/manifest.json",
        "CAM02/20261124T180000Z-CAM02-aaaa/manifest.json",
        "CAM02/20261124T190000Z-CAM02-bbbb/files/manifest.json",  # a camera file, not one
        "CAM02/20261124T190000Z-CAM02-bbbb/SHA256SUMS",  # a session without its manifest yet
    ):
        store.put_bytes(key, body, sha(body))
    assert sorted(store.manifests()) == [
        "CAM01/20261124T174900Z-CAM01-3f2a/manifest.json",
        "CAM01/20261125T080000Z-CAM01-0b1c/manifest.json",
        "CAM02/20261124T180000Z-CAM02-aaaa/manifest.json",
    ]


def test_unsafe_keys_are_refused(backend: Backend) -> None:
    store = backend.store
    for key in ("", "/abs/key", "CAM01/../escape", "CAM01//x", "CAM01/./x"):
        with pytest.raises(StoreError):
            store.put_bytes(key, b"x", sha(b"x"))


def test_check_passes_on_the_store_and_a_missing_one_is_away(backend: Backend) -> None:
    backend.store.check()
    with pytest.raises(StoreUnavailable):
        backend.absent().check()
    if backend.kind == "s3":
        return  # SeaweedFS makes a missing bucket on a put, where AWS answers NoSuchBucket
    with pytest.raises(StoreUnavailable):
        backend.absent().put_bytes(KEY, b"x", sha(b"x"))


def test_every_byte_written_goes_through_the_bandwidth_bucket(
    backend: Backend, tmp_path: Path
) -> None:
    bucket = Recorder()
    store = backend.make(throttle=bucket, multipart_mib=5)
    small, large = os.urandom(100_000), os.urandom(6 * MIB)
    store.put_file(KEY, staged(tmp_path, small), sha(small), len(small))
    store.put_file(f"{KEY}.2", staged(tmp_path, large, "large.bin"), sha(large), len(large))
    store.put_bytes(f"{SESSION}/manifest.json", b"{}", sha(b"{}"))
    assert bucket.taken == len(small) + len(large) + 2
