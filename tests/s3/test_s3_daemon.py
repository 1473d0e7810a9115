"""The whole daemon (in-process, directory source) uploading sessions to the real S3 server:
keys and checksums as SPEC §6 says, `dockd verify` passing and then catching an altered
object and a missing manifest, and an upload that survives the server stopping mid-way."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dockd.config import parse_config
from dockd.daemon import Daemon
from dockd.events import EventBus, Notice
from dockd.journal import Journal

MIB = 1024 * 1024
CAMERA = "CAM7"


def _camera(tmp_path: Path, sizes: dict[str, int]) -> Path:
    """A camera built aside; renaming it into the dock is the docking."""
    root = tmp_path / "aside" / CAMERA
    for rel, size in sizes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(os.urandom(size))
    return root


def _config(s3: Any, tmp_path: Path, bucket: str, **upload: Any) -> dict[str, Any]:
    (tmp_path / "dock").mkdir(exist_ok=True)
    return {
        "dock": {"id": "t", "state_dir": str(tmp_path / "state")},
        "sources": {"directory": {"enabled": True, "path": str(tmp_path / "dock")}},
        "offload": {"min_free_staging": "16MiB"},
        "store": s3.store_config(tmp_path, bucket, prefix="evidence/"),
        "upload": {"backoff_initial": "200ms", "backoff_max": "1s", **upload},
        "mqtt": {"enabled": False},
        "log": {"level": "warning"},
    }


def _toml(data: dict[str, Any], table: str = "") -> str:
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


async def _upload_session(
    config: dict[str, Any],
    tmp_path: Path,
    camera: Path,
    during: Callable[[], Any] | None = None,
) -> str:
    """Dock `camera`, wait until its session is in the store; returns the session id.
    `during`, if given, runs (in a thread) once the camera is docked."""
    bus = EventBus()
    sub = bus.subscribe("test", maxsize=100_000)
    daemon = Daemon(parse_config(config), bus=bus)
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.ready.wait(), 20)
        os.rename(camera, tmp_path / "dock" / CAMERA)
        side = asyncio.create_task(asyncio.to_thread(during)) if during else None
        async with asyncio.timeout(120):
            async for event in sub:
                if isinstance(event, Notice) and event.event == "upload_failed":
                    raise AssertionError(f"upload failed: {event.details}")
                if isinstance(event, Notice) and event.event == "session_uploaded":
                    assert event.session_id is not None
                    session_id = event.session_id
                    break
        if side is not None:
            await side
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 30)
    return session_id


def _verify(path: Path, *sessions: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dockd", "verify", "-c", str(path), *sessions],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_a_session_in_s3_is_verified_then_an_altered_object_is_caught(
    s3: Any, tmp_path: Path
) -> None:
    bucket = s3.bucket(versioned=True)
    config = _config(s3, tmp_path, bucket)
    camera = _camera(
        tmp_path,
        {"DCIM/100CAM/0001.MP4": 700_000, "DCIM/100CAM/0002.MP4": 5_000, "MISC/V.TXT": 12},
    )
    session_id = await _upload_session(config, tmp_path, camera)

    c = s3.client()
    base = f"evidence/{CAMERA}/{session_id}"
    manifest = json.loads(c.get_object(Bucket=bucket, Key=f"{base}/manifest.json")["Body"].read())
    assert [f["path"] for f in manifest["files"]] == [
        "DCIM/100CAM/0001.MP4",
        "DCIM/100CAM/0002.MP4",
        "MISC/V.TXT",
    ]
    expected = {f"evidence/{f['key']}": f["sha256"] for f in manifest["files"]}
    expected |= {f"{base}/{sc['name']}": sc["sha256"] for sc in manifest["sidecars"]}
    for key, digest in expected.items():
        assert key.startswith(f"{base}/")
        head = c.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == base64.b64encode(bytes.fromhex(digest)).decode(), key

    path = tmp_path / "dockd.toml"
    path.write_text(_toml(config))
    ok = _verify(path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 session(s) checked: all good" in ok.stdout

    # a different body put by hand under a file key: a new current version; verify reads it
    altered = f"{base}/files/DCIM/100CAM/0002.MP4"
    c.put_object(Bucket=bucket, Key=altered, Body=os.urandom(5_000))
    bad = _verify(path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"{CAMERA}/{session_id}/files/DCIM/100CAM/0002.MP4" in bad.stdout
    assert "altered" in bad.stdout

    # the manifest deleted (a delete marker on top): the session named by id is reported
    c.delete_object(Bucket=bucket, Key=f"{base}/manifest.json")
    gone = _verify(path, session_id)
    assert gone.returncode == 1, gone.stdout + gone.stderr
    assert "manifest missing" in gone.stdout


def _multipart_started(s3: Any, bucket: str) -> bool:
    return bool(s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads"))


async def test_server_stopped_mid_upload_then_started_the_session_completes(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dockd.store.s3.MULTIPART_THRESHOLD", 5 * MIB)
    monkeypatch.setattr("dockd.store.s3.PART_SIZE", 5 * MIB)
    bucket = s3.bucket(versioned=True)
    # 4 MiB/s: the 16 MiB file's parts go out over about four seconds
    config = _config(s3, tmp_path, bucket, bandwidth_limit="4MiB/s")
    camera = _camera(tmp_path, {"DCIM/100CAM/0001.MP4": 16 * MIB, "DCIM/100CAM/0002.MP4": 1000})
    outage = {"stopped_during_upload": False}

    def restart_mid_upload() -> None:
        for _ in range(600):
            if _multipart_started(s3, bucket):
                break
            import time

            time.sleep(0.05)  # polling the server for the upload to begin
        else:
            raise AssertionError("no multipart upload began")
        s3.stop()
        outage["stopped_during_upload"] = True
        s3.start()

    session_id = await _upload_session(config, tmp_path, camera, during=restart_mid_upload)
    assert outage["stopped_during_upload"]

    c = s3.client()
    assert c.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    versions = c.list_object_versions(Bucket=bucket)["Versions"]
    keys = [v["Key"] for v in versions]
    assert len(keys) == len(set(keys)), "an object was stored twice"
    base = f"evidence/{CAMERA}/{session_id}"
    assert f"{base}/files/DCIM/100CAM/0001.MP4" in keys and f"{base}/manifest.json" in keys

    journal = Journal.open(tmp_path / "state" / "journal.sqlite3", "t")
    try:
        states = {r["state"] for r in journal.all("SELECT state FROM files")}
    finally:
        journal.close()
    assert states == {"stored"}

    path = tmp_path / "dockd.toml"
    path.write_text(_toml(config))
    ok = _verify(path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
