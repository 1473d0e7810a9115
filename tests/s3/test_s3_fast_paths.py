"""The S3 store's fast paths, on the real S3 server, each with the guarantee it must keep:
no HEAD before a PutObject where the server honours If-None-Match (its 412 is the "taken"
check), verify answered from the server's own checksum in the put's response, multipart parts
sent several at a time from the staged file, paced by the bandwidth limit, and no multipart
upload left behind by a part that fails.

Which requests the store makes is observed with botocore's own event hooks on its client; the
few hooks that change a request (a wrong part checksum, an If-None-Match header dropped) do so
before it is signed and sent, so it is the real server that refuses or ignores it."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from dockd.config import StoreConfig
from dockd.errors import IntegrityError, StoreConflict, StoreUnavailable
from dockd.store.s3 import PROBE_KEY, S3Store
from dockd.store.s3_client import PARTS_IN_FLIGHT, composite_sha256
from dockd.upload.throttle import TokenBucket

SESSION = "CAM01/20261124T174900Z-CAM01-3f2a"
KEY = f"{SESSION}/files/DCIM/100CAM/0001.MP4"
MIB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def staged(tmp_path: Path, data: bytes, name: str = "staged.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def make_store(s3: Any, tmp_path: Path, bucket: str, **kwargs: Any) -> S3Store:
    return S3Store.from_config(StoreConfig(**s3.store_config(tmp_path, bucket)), **kwargs)


def probed(store: S3Store) -> S3Store:
    """The store with its once-per-process probe done: this server honours If-None-Match."""
    assert store._conditional_writes() is True
    return store


def uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return got


class Requests:
    """The S3 operations a store's client sends, in order, and the most UploadParts at once."""

    def __init__(self, store: S3Store) -> None:
        self.names: list[str] = []
        self.parts_now = 0
        self.parts_max = 0
        self._lock = threading.Lock()
        events = store._s3.meta.events
        events.register("before-call.s3", self._before)
        events.register("after-call.s3.UploadPart", self._after_part)

    def _before(self, model: Any, **_: Any) -> None:
        with self._lock:
            self.names.append(model.name)
            if model.name == "UploadPart":
                self.parts_now += 1
                self.parts_max = max(self.parts_max, self.parts_now)

    def _after_part(self, **_: Any) -> None:
        with self._lock:
            self.parts_now -= 1

    def take(self) -> list[str]:
        with self._lock:
            names, self.names = self.names, []
        return names


def test_an_existing_key_with_other_bytes_is_a_conflict_and_kept_with_no_head_first(
    s3: Any, tmp_path: Path
) -> None:
    bucket = s3.bucket()
    theirs, ours = os.urandom(3000), os.urandom(3000)
    s3.client().put_object(Bucket=bucket, Key=KEY, Body=theirs, ChecksumAlgorithm="SHA256")
    store = probed(make_store(s3, tmp_path, bucket))
    seen = Requests(store)
    with pytest.raises(StoreConflict):
        store.put_file(KEY, staged(tmp_path, ours), sha(ours), len(ours))
    # the PutObject the server refuses (412), then the HEAD that compares
    assert seen.take() == ["PutObject", "HeadObject"]
    with pytest.raises(StoreConflict):
        store.put_bytes(KEY, ours, sha(ours))
    assert seen.take() == ["PutObject", "HeadObject"]
    assert s3.client().get_object(Bucket=bucket, Key=KEY)["Body"].read() == theirs


def test_a_retried_put_of_bytes_the_key_already_holds_is_success(s3: Any, tmp_path: Path) -> None:
    """A crash after the PUT, before the journal knew: the restarted dock puts again."""
    bucket = s3.bucket()
    data = os.urandom(5000)
    src = staged(tmp_path, data)
    make_store(s3, tmp_path, bucket).put_file(KEY, src, sha(data), len(data))
    again = make_store(s3, tmp_path, bucket)
    seen = Requests(again)
    again.put_file(KEY, src, sha(data), len(data))
    # the probe (412: the first store's probe object is there), the put (412), the HEAD
    assert seen.take() == ["PutObject", "PutObject", "HeadObject"]
    # the HEAD compared the server's checksum: verify right after needs no request
    assert again.verify(KEY, sha(data), len(data)) == "checksum"
    assert seen.take() == []
    assert s3.client().get_object(Bucket=bucket, Key=KEY)["Body"].read() == data


def test_verify_right_after_a_put_uses_the_checksum_the_server_answered_with(
    s3: Any, tmp_path: Path
) -> None:
    bucket = s3.bucket()
    store = probed(make_store(s3, tmp_path, bucket))
    data = os.urandom(40_000)
    seen = Requests(store)
    store.put_file(KEY, staged(tmp_path, data), sha(data), len(data))
    assert seen.take() == ["PutObject"]  # no HEAD before, none after
    assert store.verify(KEY, sha(data), len(data)) == "checksum"
    assert seen.take() == []
    # the memo answers once, for exactly what was confirmed; anything else asks the server
    assert store.verify(KEY, sha(data), len(data)) == "checksum"
    assert seen.take() == ["HeadObject"]
    store.put_bytes(f"{SESSION}/manifest.json", b"{}", sha(b"{}"))
    with pytest.raises(IntegrityError):
        store.verify(f"{SESSION}/manifest.json", sha(b"{ }"), 2)
    assert seen.take() == ["PutObject", "HeadObject"]
    # a fresh process (`dockd verify`) asks the server too
    fresh = make_store(s3, tmp_path, bucket)
    assert fresh.verify(KEY, sha(data), len(data)) == "checksum"


def test_a_server_that_ignores_if_none_match_is_found_by_the_probe_and_headed_first(
    s3: Any, tmp_path: Path
) -> None:
    """The header is dropped before signing, so the real server never sees it: as a server or
    proxy that ignores conditional writes. The probe finds that out by writing its own object
    twice, and every PutObject then has a HEAD before it: nothing is ever put over evidence."""
    bucket = s3.bucket()
    theirs, ours = b"theirs", b"ours!!"
    s3.client().put_object(Bucket=bucket, Key=KEY, Body=theirs, ChecksumAlgorithm="SHA256")
    store = make_store(s3, tmp_path, bucket)

    def drop_if_none_match(request: Any, **_: Any) -> None:
        del request.headers["If-None-Match"]  # all of them; absent is no error

    store._s3.meta.events.register("before-sign.s3.PutObject", drop_if_none_match)
    seen = Requests(store)
    with pytest.raises(StoreConflict):
        store.put_bytes(KEY, ours, sha(ours))
    assert seen.take() == ["PutObject", "PutObject", "HeadObject"]  # probe twice, then HEAD
    assert store._conditional is False
    assert s3.client().get_object(Bucket=bucket, Key=KEY)["Body"].read() == theirs
    new = f"{SESSION}/files/new.bin"
    store.put_bytes(new, ours, sha(ours))
    assert seen.take() == ["HeadObject", "PutObject"]
    assert store.verify(new, sha(ours), len(ours)) == "checksum"
    got = s3.client().get_object(Bucket=bucket, Key=f"{PROBE_KEY}")["Body"].read()
    assert got.startswith(b"dockd: probe")


def test_parallel_multipart_upload_stores_the_composite_and_the_same_bytes(
    s3: Any, tmp_path: Path
) -> None:
    bucket = s3.bucket()
    store = make_store(s3, tmp_path, bucket)
    store.multipart_threshold = store.part_size = 5 * MIB
    data = os.urandom(8 * 5 * MIB + 12345)  # 9 parts, the last short
    seen = Requests(store)
    store.put_file(KEY, staged(tmp_path, data), sha(data), len(data))
    names = seen.take()
    assert names.count("UploadPart") == 9
    assert 1 < seen.parts_max <= PARTS_IN_FLIGHT
    parts = [data[i : i + 5 * MIB] for i in range(0, len(data), 5 * MIB)]
    expected = composite_sha256([hashlib.sha256(p).digest() for p in parts])
    head = s3.client().head_object(Bucket=bucket, Key=KEY, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == expected and expected.endswith("-9")
    assert head.get("ChecksumType") == "COMPOSITE"
    assert head["ContentLength"] == len(data)
    assert s3.client().get_object(Bucket=bucket, Key=KEY)["Body"].read() == data
    # CompleteMultipartUpload answered with that composite: verify needs no request
    assert store.verify(KEY, sha(data), len(data)) == "checksum"
    assert seen.take() == []
    assert uploads(s3, bucket) == []


def test_a_part_failing_midway_leaves_no_multipart_upload_after_the_queue_retries(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part 4 of 9 is refused by the server (its checksum altered before signing: BadDigest).
    The attempt fails as "store unavailable", which the upload queue retries; once with its
    own abort lost (as when the dock dies then), once with it; the retry that succeeds
    leaves no multipart upload in the bucket, and the object is whole."""
    bucket = s3.bucket()
    store = make_store(s3, tmp_path, bucket)
    store.multipart_threshold = store.part_size = 5 * MIB
    data = os.urandom(8 * 5 * MIB + 1)
    src = staged(tmp_path, data)
    spoil = {"on": True}

    def damage_part_4(request: Any, params: Any = None, **_: Any) -> None:
        if spoil["on"] and "partNumber=4" in request.url:
            del request.headers["x-amz-checksum-sha256"]
            request.headers["x-amz-checksum-sha256"] = "A" * 43 + "="

    store._s3.meta.events.register("before-sign.s3.UploadPart", damage_part_4)
    real_abort = store._abort_quietly
    monkeypatch.setattr(store, "_abort_quietly", lambda full, upload_id: None)
    with pytest.raises(StoreUnavailable, match="part 4 arrived damaged"):
        store.put_file(KEY, src, sha(data), len(data))
    assert len(uploads(s3, bucket)) == 1  # left behind: the abort never ran
    monkeypatch.setattr(store, "_abort_quietly", real_abort)
    with pytest.raises(StoreUnavailable, match="part 4 arrived damaged"):
        store.put_file(KEY, src, sha(data), len(data))
    assert uploads(s3, bucket) == []  # the earlier one aborted first, its own after the failure
    assert store.stat(KEY) is None
    spoil["on"] = False
    store.put_file(KEY, src, sha(data), len(data))
    assert store.verify(KEY, sha(data), len(data)) == "checksum"
    assert uploads(s3, bucket) == []
    assert s3.client().get_object(Bucket=bucket, Key=KEY)["Body"].read() == data


class CountingBucket(TokenBucket):
    def __init__(self, rate: float) -> None:
        super().__init__(rate)
        self.taken = 0
        self._count = threading.Lock()

    def take(self, n: int) -> float:
        with self._count:
            self.taken += n
        return super().take(n)


def test_the_bandwidth_limit_paces_every_byte_of_parts_sent_in_parallel(
    s3: Any, tmp_path: Path
) -> None:
    import time

    bucket = s3.bucket()
    bucket_limit = CountingBucket(40 * MIB)
    store = make_store(s3, tmp_path, bucket, throttle=bucket_limit)
    store.multipart_threshold = store.part_size = 5 * MIB
    data = os.urandom(4 * 5 * MIB)
    t0 = time.monotonic()
    store.put_file(KEY, staged(tmp_path, data), sha(data), len(data))
    took = time.monotonic() - t0
    assert bucket_limit.taken >= len(data)  # more only if botocore resent a part
    # 20 MiB at 40 MiB/s, less the 10 MiB burst the bucket starts with
    assert took >= (len(data) - bucket_limit.burst) / bucket_limit.rate * 0.9
    assert s3.client().get_object(Bucket=bucket, Key=KEY)["Body"].read() == data


def test_a_put_while_another_worker_probes_heads_first_instead_of_waiting(
    s3: Any, tmp_path: Path
) -> None:
    bucket = s3.bucket()
    theirs, ours = b"theirs", b"ours!!"
    s3.client().put_object(Bucket=bucket, Key=KEY, Body=theirs, ChecksumAlgorithm="SHA256")
    store = make_store(s3, tmp_path, bucket)
    seen = Requests(store)
    with store._probe_mutex:  # as while another worker's probe is out
        with pytest.raises(StoreConflict):
            store.put_bytes(KEY, ours, sha(ours))
        assert seen.take() == ["HeadObject"]  # taken: found by the HEAD, nothing put
        new = f"{SESSION}/files/new.bin"
        store.put_bytes(new, ours, sha(ours))
        assert seen.take() == ["HeadObject", "PutObject"]
        assert store._conditional is None
    assert store.verify(new, sha(ours), len(ours)) == "checksum"
    assert s3.client().get_object(Bucket=bucket, Key=KEY)["Body"].read() == theirs
    store.put_bytes(f"{SESSION}/files/later.bin", ours, sha(ours))
    assert store._conditional is True


def test_a_batch_of_small_files_is_put_several_at_once_with_one_outcome_each(
    s3: Any, tmp_path: Path
) -> None:
    """The upload worker's batch (store/base.py BatchStore): every item put and verified, in
    parallel; a key holding other bytes and a missing staged copy cost their item alone."""
    from dockd.store.base import PutItem, batch_store
    from dockd.store.s3_client import BATCH_IN_FLIGHT

    bucket = s3.bucket()
    store = probed(make_store(s3, tmp_path, bucket))
    assert batch_store(store) is store
    datas = [os.urandom(1000 + i) for i in range(20)]
    items = [
        PutItem(f"{SESSION}/files/{i}.bin", staged(tmp_path, d, f"{i}.bin"), sha(d), len(d))
        for i, d in enumerate(datas)
    ]
    s3.client().put_object(
        Bucket=bucket, Key=items[3].key, Body=b"other", ChecksumAlgorithm="SHA256"
    )
    store.put_file(items[5].key, items[5].source, items[5].sha256, items[5].size)  # a retry
    items[7].source.unlink()
    seen = Requests(store)
    lock = threading.Lock()
    now = {"n": 0, "max": 0}

    def before_put(**_: Any) -> None:
        with lock:
            now["n"] += 1
            now["max"] = max(now["max"], now["n"])

    def after_put(**_: Any) -> None:
        with lock:
            now["n"] -= 1

    store._s3.meta.events.register("before-call.s3.PutObject", before_put)
    store._s3.meta.events.register("after-call.s3.PutObject", after_put)
    out = store.put_files(items)
    assert isinstance(out[3], StoreConflict)
    assert isinstance(out[7], IntegrityError)
    assert [o for i, o in enumerate(out) if i not in (3, 7)] == ["checksum"] * 18
    names = seen.take()
    assert names.count("PutObject") == 19 and names.count("HeadObject") == 2  # 412s: 3 and 5
    assert 1 < now["max"] <= BATCH_IN_FLIGHT
    c = s3.client()
    for i, d in enumerate(datas):
        if i not in (3, 7):
            assert c.get_object(Bucket=bucket, Key=items[i].key)["Body"].read() == d
    assert c.get_object(Bucket=bucket, Key=items[3].key)["Body"].read() == b"other"
    assert store.stat(items[7].key) is None


def test_a_batch_against_a_store_that_is_away_raises_for_the_whole_batch(tmp_path: Path) -> None:
    from dockd.store.base import PutItem
    from dockd.store.s3_client import make_client, make_session

    (tmp_path / "secret").write_text("not-needed\n")
    cfg = StoreConfig(
        kind="s3",
        endpoint_url="http://127.0.0.1:9",  # discard: nothing listens there
        bucket="evidence",
        access_key_id="AKIAEXAMPLE",
        secret_access_key_file=tmp_path / "secret",
    )
    store = S3Store(make_client(make_session(cfg), cfg, max_attempts=1), "evidence")
    items = [
        PutItem(f"{SESSION}/files/{i}.bin", staged(tmp_path, b"x", f"{i}.bin"), sha(b"x"), 1)
        for i in range(12)
    ]
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.put_files(items)


@pytest.mark.parametrize("concurrency", [1, 2, 8, 64])
def test_the_connection_pool_holds_every_request_the_workers_can_have_out(
    concurrency: int,
) -> None:
    """Each upload worker has up to PARTS_IN_FLIGHT parts or BATCH_IN_FLIGHT small files out;
    a request finding the pool full would open a connection and throw it away (urllib3 warns)."""
    from dockd.store.s3_client import BATCH_IN_FLIGHT, pool_connections

    per_worker = max(PARTS_IN_FLIGHT, BATCH_IN_FLIGHT)
    assert pool_connections(concurrency) >= concurrency * per_worker + 1
