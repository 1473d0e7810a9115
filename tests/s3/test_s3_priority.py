"""Priority upload on the real S3 server: a session prioritized while ten others wait is the
first to reach the store (SPEC §3 `dockd prioritize`, §6 upload order)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from test_s3_daemon import _config

from dockd.config import parse_config
from dockd.daemon import Daemon
from dockd.events import EventBus, Notice
from dockd.journal import Journal

CAMERAS = [f"CAM{n:02d}" for n in range(11)]


async def _run_until(
    config: dict[str, Any], tmp_path: Path, event: str, count: int, dock: bool
) -> list[str]:
    """Run the daemon until `count` notices `event` arrived; returns their session ids."""
    bus = EventBus()
    sub = bus.subscribe("test", maxsize=100_000)
    daemon = Daemon(parse_config(config), bus=bus)
    task = asyncio.create_task(daemon.run())
    seen: list[str] = []
    try:
        await asyncio.wait_for(daemon.ready.wait(), 20)
        if dock:
            for cam in CAMERAS:
                os.rename(tmp_path / "aside" / cam, tmp_path / "dock" / cam)
        async with asyncio.timeout(120):
            async for e in sub:
                if isinstance(e, Notice) and e.event == "upload_failed":
                    raise AssertionError(f"upload failed: {e.details}")
                if isinstance(e, Notice) and e.event == event and e.session_id is not None:
                    seen.append(e.session_id)
                    if len(seen) == count:
                        break
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 30)
    return seen


async def test_a_session_prioritized_while_ten_others_wait_reaches_the_store_first(
    s3: Any, tmp_path: Path
) -> None:
    bucket = s3.bucket()
    for n, cam in enumerate(CAMERAS):
        root = tmp_path / "aside" / cam / "DCIM"
        root.mkdir(parents=True)
        (root / "0001.MP4").write_bytes(os.urandom(20_000 + n))
    config = _config(s3, tmp_path, bucket, concurrency=1)
    # first the store is away (nothing listens there): all eleven offload and wait in the queue
    away = {**config, "store": {**config["store"], "endpoint_url": "http://127.0.0.1:9"}}
    away["upload"] = {**config["upload"], "backoff_initial": "50ms", "backoff_max": "100ms"}
    offloaded = await _run_until(away, tmp_path, "safe_to_undock", len(CAMERAS), dock=True)
    assert len(set(offloaded)) == len(CAMERAS)
    journal = Journal.open(tmp_path / "state" / "journal.sqlite3", "t")
    try:
        waiting = [s.id for s in journal.queued_sessions()]
        assert len(waiting) == len(CAMERAS)
        chosen = waiting[7]  # neither first nor last in docking order
        journal.prioritize(chosen)
        assert journal.queued_sessions()[0].id == chosen
    finally:
        journal.close()
    # the store is back: the prioritized session is the first one completed in it
    uploaded = await _run_until(config, tmp_path, "session_uploaded", 2, dock=False)
    assert uploaded[0] == chosen
    keys = s3.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert any(k["Key"].endswith(f"{chosen}/manifest.json") for k in keys)
