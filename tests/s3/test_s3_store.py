"""The S3 store's own promises on the real S3 server (what the contract suite in
tests/store/test_store_contract.py cannot say for every backend): keys under the prefix, the
SHA-256 the server stores, multipart COMPOSITE checksums, no multipart upload left behind,
Object Lock on every object and refused on a bucket without it, credentials and outages sorted
into "wait and retry", secrets kept out of messages and logs."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from dockd.config import StoreConfig, parse_config
from dockd.daemon import Daemon
from dockd.errors import ConfigError, IntegrityError, StoreConflict, StoreUnavailable
from dockd.observers.log import setup as setup_log
from dockd.store.s3 import PROBE_KEY, S3Store
from dockd.store.s3_client import composite_sha256, make_client, make_session

SESSION = "CAM01/20261124T174900Z-CAM01-3f2a"
KEY = f"{SESSION}/files/DCIM/100CAM/0001.MP4"
MIB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def staged(tmp_path: Path, data: bytes, name: str = "staged.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def make_store(s3: Any, tmp_path: Path, bucket: str, **store: Any) -> S3Store:
    return S3Store.from_config(StoreConfig(**s3.store_config(tmp_path, bucket, **store)))


def uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return got


def test_keys_are_the_prefix_joined_verbatim(s3: Any, tmp_path: Path) -> None:
    bucket = s3.bucket()
    for prefix in ("evidence/", "station1-"):
        store = make_store(s3, tmp_path, bucket, prefix=prefix)
        store.put_bytes(f"{SESSION}/manifest.json", b"{}", sha(b"{}"))
        assert list(store.manifests()) == [f"{SESSION}/manifest.json"]
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    # beside the evidence, only the conditional-write probe (one key of one segment) is there
    assert sorted(keys) == [
        f"evidence/{PROBE_KEY}",
        f"evidence/{SESSION}/manifest.json",
        f"station1-{PROBE_KEY}",
        f"station1-{SESSION}/manifest.json",
    ]


def test_the_server_stores_the_sha256_sent_with_every_object(s3: Any, tmp_path: Path) -> None:
    bucket = s3.bucket()
    store = make_store(s3, tmp_path, bucket)
    data = os.urandom(70_000)
    store.put_file(KEY, staged(tmp_path, data), sha(data), len(data))
    store.put_bytes(f"{SESSION}/SHA256SUMS", b"sums\n", sha(b"sums\n"))
    c = s3.client()
    head = c.head_object(Bucket=bucket, Key=KEY, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == b64sha(data)
    head = c.head_object(Bucket=bucket, Key=f"{SESSION}/SHA256SUMS", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == b64sha(b"sums\n")
    assert store.verify(KEY, sha(data), len(data)) == "checksum"


def test_multipart_upload_has_the_composite_of_our_parts(s3: Any, tmp_path: Path) -> None:
    bucket = s3.bucket()
    store = make_store(s3, tmp_path, bucket)
    store.multipart_threshold = store.part_size = 5 * MIB
    data = os.urandom(11 * MIB + 7)
    store.put_file(KEY, staged(tmp_path, data), sha(data), len(data))
    parts = [data[i : i + 5 * MIB] for i in range(0, len(data), 5 * MIB)]
    expected = composite_sha256([hashlib.sha256(p).digest() for p in parts])
    head = s3.client().head_object(Bucket=bucket, Key=KEY, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == expected and expected.endswith("-3")
    assert head.get("ChecksumType") == "COMPOSITE"
    assert store.verify(KEY, sha(data), len(data)) == "checksum"
    # a restarted dock no longer knows its parts: it reads the object back instead
    assert make_store(s3, tmp_path, bucket).verify(KEY, sha(data), len(data)) == "readback"
    assert uploads(s3, bucket) == []


def test_multipart_of_a_damaged_staged_copy_is_abandoned(s3: Any, tmp_path: Path) -> None:
    bucket = s3.bucket()
    store = make_store(s3, tmp_path, bucket)
    store.multipart_threshold = store.part_size = 5 * MIB
    data = bytearray(os.urandom(6 * MIB))
    journal_sha = sha(bytes(data))
    data[-1] ^= 0xFF  # in the last part: every part before it is already sent
    with pytest.raises(IntegrityError, match="journal says"):
        store.put_file(KEY, staged(tmp_path, bytes(data)), journal_sha, len(data))
    assert store.stat(KEY) is None
    assert uploads(s3, bucket) == []


def test_an_unfinished_upload_of_the_key_is_aborted_before_a_new_one(
    s3: Any, tmp_path: Path
) -> None:
    """What a crash mid-upload leaves; the next attempt at the key clears it."""
    bucket = s3.bucket()
    c = s3.client()
    left = c.create_multipart_upload(Bucket=bucket, Key=KEY, ChecksumAlgorithm="SHA256")
    part = os.urandom(5 * MIB)
    c.upload_part(
        Bucket=bucket,
        Key=KEY,
        UploadId=left["UploadId"],
        PartNumber=1,
        Body=part,
        ChecksumSHA256=b64sha(part),
    )
    other = c.create_multipart_upload(Bucket=bucket, Key=f"{KEY}.other")
    outside = c.create_multipart_upload(Bucket=bucket, Key="elsewhere/x")
    store = make_store(s3, tmp_path, bucket, prefix="")
    store.multipart_threshold = store.part_size = 5 * MIB
    data = os.urandom(6 * MIB)
    store.put_file(KEY, staged(tmp_path, data), sha(data), len(data))
    assert {u["UploadId"] for u in uploads(s3, bucket)} == {
        other["UploadId"],
        outside["UploadId"],
    }
    # at start-up only old uploads under the prefix are aborted: another dock may share it
    prefixed = make_store(s3, tmp_path, bucket, prefix=f"{SESSION}/")
    assert prefixed.abort_stale_uploads() == 0
    assert prefixed.abort_stale_uploads(older_than=0) == 1
    assert [u["UploadId"] for u in uploads(s3, bucket)] == [outside["UploadId"]]


@pytest.mark.parametrize("size", [1000, 6 * MIB], ids=["put", "multipart"])
def test_a_key_taken_between_head_and_put_is_refused_by_the_server(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """The race the HEAD before a put leaves open: the key taken after it. The server's
    If-None-Match refuses the write (412) and the object there is compared. Faked is only the
    HEAD's answer that the key is free, which the real server cannot be made to give.
    A PutObject HEADs first only where the server ignores If-None-Match (the probe says so);
    that is forced here, as this server honours it (tests/s3/test_s3_fast_paths.py)."""
    bucket = s3.bucket()
    store = make_store(s3, tmp_path, bucket)
    store._conditional = False
    store.multipart_threshold = store.part_size = 5 * MIB
    ours, other = os.urandom(size), os.urandom(size)
    src = staged(tmp_path, ours)
    store.put_file(KEY, src, sha(ours), size)
    real = store._existing
    calls: list[object] = []

    def free_at_first(*args: Any, **kwargs: Any) -> bool:
        calls.append(args)
        return False if len(calls) == 1 else real(*args, **kwargs)

    monkeypatch.setattr(store, "_existing", free_at_first)
    store.put_file(KEY, src, sha(ours), size)  # the same bytes: success
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(StoreConflict):
        store.put_file(KEY, staged(tmp_path, other, "other.bin"), sha(other), size)
    assert len(calls) == 2
    assert s3.client().get_object(Bucket=bucket, Key=KEY)["Body"].read() == ours
    assert uploads(s3, bucket) == []


def test_readback_mode_reads_the_object_back(s3: Any, tmp_path: Path) -> None:
    store = make_store(s3, tmp_path, s3.bucket(), verify="readback")
    store.put_bytes(KEY, b"footage", sha(b"footage"))
    assert store.verify(KEY, sha(b"footage"), 7) == "readback"


def test_an_object_without_a_stored_sha256_is_read_back(s3: Any, tmp_path: Path) -> None:
    bucket = s3.bucket()
    s3.client().put_object(Bucket=bucket, Key=KEY, Body=b"footage")  # CRC32 only
    store = make_store(s3, tmp_path, bucket)
    assert store.verify(KEY, sha(b"footage"), 7) == "readback"
    store.put_bytes(KEY, b"footage", sha(b"footage"))  # the same bytes: success


def test_storage_class_is_sent(s3: Any, tmp_path: Path) -> None:
    store = make_store(s3, tmp_path, s3.bucket(), storage_class="STANDARD")
    store.put_bytes(KEY, b"x", sha(b"x"))
    store.verify(KEY, sha(b"x"), 1)


def _retention(s3: Any, bucket: str, key: str) -> tuple[str, datetime]:
    got = s3.client().get_object_retention(Bucket=bucket, Key=key)["Retention"]
    return got["Mode"], got["RetainUntilDate"]


def test_object_lock_covers_every_object(s3: Any, tmp_path: Path) -> None:
    bucket = s3.bucket(lock=True)
    store = make_store(s3, tmp_path, bucket, object_lock_mode="GOVERNANCE", object_lock_days=30)
    store.start_up()  # a bucket with Object Lock passes
    store.multipart_threshold = store.part_size = 5 * MIB
    small, large = os.urandom(1000), os.urandom(6 * MIB)
    store.put_file(KEY, staged(tmp_path, small), sha(small), len(small))
    store.put_file(f"{KEY}.2", staged(tmp_path, large, "l.bin"), sha(large), len(large))
    store.put_bytes(f"{SESSION}/manifest.json", b"{}", sha(b"{}"))
    soon = datetime.now(UTC) + timedelta(days=30)
    for key in (KEY, f"{KEY}.2", f"{SESSION}/manifest.json"):
        mode, until = _retention(s3, bucket, key)
        assert mode == "GOVERNANCE"
        assert abs(until - soon) < timedelta(minutes=5)


def test_a_locked_version_cannot_be_deleted(s3: Any, tmp_path: Path) -> None:
    bucket = s3.bucket(lock=True)
    store = make_store(s3, tmp_path, bucket, object_lock_mode="COMPLIANCE", object_lock_days=1)
    store.put_bytes(KEY, b"footage", sha(b"footage"))
    c = s3.client()
    version = c.head_object(Bucket=bucket, Key=KEY)["VersionId"]
    with pytest.raises(ClientError) as refused:
        c.delete_object(Bucket=bucket, Key=KEY, VersionId=version, BypassGovernanceRetention=True)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    assert c.get_object(Bucket=bucket, Key=KEY)["Body"].read() == b"footage"


def test_lock_configured_on_a_bucket_without_object_lock_is_refused(
    s3: Any, tmp_path: Path
) -> None:
    bucket = s3.bucket()
    store = make_store(s3, tmp_path, bucket, object_lock_mode="GOVERNANCE", object_lock_days=7)
    with pytest.raises(ConfigError, match=r"store\.object_lock_mode"):
        store.start_up()
    # a daemon that could not check at start: its first put is held back, named the same way
    with pytest.raises(StoreUnavailable, match=r"store\.object_lock_mode"):
        make_store(
            s3, tmp_path, bucket, object_lock_mode="GOVERNANCE", object_lock_days=7
        ).put_bytes(KEY, b"x", sha(b"x"))
    assert "Contents" not in s3.client().list_objects_v2(Bucket=bucket)


def _config(s3: Any, tmp_path: Path, bucket: str, **store: Any) -> dict[str, Any]:
    (tmp_path / "dock").mkdir(exist_ok=True)
    return {
        "dock": {"id": "t", "state_dir": str(tmp_path / "state")},
        "sources": {"directory": {"enabled": True, "path": str(tmp_path / "dock")}},
        "store": s3.store_config(tmp_path, bucket, **store),
        "mqtt": {"enabled": False},
    }


def _toml(data: dict[str, Any], table: str = "") -> str:
    """Enough TOML for a dockd config: nested tables of strings, numbers and booleans."""
    scalars, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append(_toml(v, f"{table}.{k}" if table else k))
        elif isinstance(v, bool):
            scalars.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, int):
            scalars.append(f"{k} = {v}")
        else:
            scalars.append(f'{k} = "{v}"')
    head = f"[{table}]\n" if table and scalars else ""
    return head + "".join(s + "\n" for s in scalars) + "".join(tables)


def test_dockd_run_exits_78_naming_the_key_and_writes_nothing(s3: Any, tmp_path: Path) -> None:
    bucket = s3.bucket()
    config = _config(s3, tmp_path, bucket, object_lock_mode="COMPLIANCE", object_lock_days=3650)
    with pytest.raises(ConfigError, match=r"store\.object_lock_mode"):
        Daemon(parse_config(config)).preflight()
    path = tmp_path / "dockd.toml"
    path.write_text(_toml(config))
    proc = subprocess.run(
        [sys.executable, "-m", "dockd", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 78, proc.stderr
    assert "store.object_lock_mode" in proc.stderr
    assert not (tmp_path / "state").exists()
    assert "Contents" not in s3.client().list_objects_v2(Bucket=bucket)


def test_refused_credentials_are_waited_out_and_never_shown(s3: Any, tmp_path: Path) -> None:
    bucket = s3.bucket()
    wrong = "wrong-" + s3.env["AWS_SECRET_ACCESS_KEY"][::-1]
    cfg = StoreConfig(**s3.store_config(tmp_path, bucket))
    assert cfg.secret_access_key_file is not None
    cfg.secret_access_key_file.write_text(wrong + "\n")
    log = io.StringIO()
    setup_log("debug", stream=log)
    try:
        store = S3Store.from_config(cfg)
        with pytest.raises(StoreUnavailable, match=r"store\.secret_access_key_file") as put:
            store.put_bytes(KEY, b"x", sha(b"x"))
        with pytest.raises(StoreUnavailable) as check:
            store.check()
        store.start_up()  # not a config error: a person may fix the key while the queue waits
    finally:
        setup_log("info")
    for text in (str(put.value), str(check.value), repr(store), store.name, log.getvalue()):
        assert wrong not in text
        assert s3.env["AWS_SECRET_ACCESS_KEY"] not in text
    assert "Contents" not in s3.client().list_objects_v2(Bucket=bucket)


def test_an_unreachable_endpoint_is_away_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("not-needed\n")
    cfg = StoreConfig(
        kind="s3",
        endpoint_url="http://127.0.0.1:9",  # discard: nothing listens there
        bucket="evidence",
        access_key_id="AKIAEXAMPLE",
        secret_access_key_file=tmp_path / "secret",
    )
    store = S3Store(make_client(make_session(cfg), cfg, max_attempts=1), "evidence")
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.put_bytes(KEY, b"x", sha(b"x"))
    with pytest.raises(StoreUnavailable):
        store.check()
    with pytest.raises(StoreUnavailable):
        list(store.manifests())
    store.start_up()  # the dock starts without its network


def test_key_without_secret_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"store\.secret_access_key_file"):
        S3Store.from_config(StoreConfig(kind="s3", bucket="b", access_key_id="AKIA"))
