"""`offload.min_free_staging`: below it no offload starts, and the reason is visible."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from dockd.config import parse_config
from dockd.daemon import Daemon
from dockd.events import CameraStatus, DockStatus, EventBus, Subscription
from dockd.journal import Journal


async def _until(sub: Subscription, pred: object) -> object:
    async with asyncio.timeout(20):
        async for event in sub:
            if pred(event):  # type: ignore[operator]
                return event
    raise AssertionError("subscription ended")


async def test_staging_below_minimum_holds_the_offload_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "dock").mkdir()
    (tmp_path / "evidence").mkdir()
    cam = tmp_path / "aside" / "CAM7"
    cam.mkdir(parents=True)
    (cam / "clip.MP4").write_bytes(os.urandom(4096))
    config = parse_config(
        {
            "dock": {"id": "t", "state_dir": str(tmp_path / "state")},
            "sources": {"directory": {"enabled": True, "path": str(tmp_path / "dock")}},
            "store": {"path": str(tmp_path / "evidence")},
            "offload": {"min_free_staging": "900TB"},  # more than any test disk has free
            "mqtt": {"enabled": False},
        }
    )
    bus = EventBus()
    sub = bus.subscribe("test")
    daemon = Daemon(config, bus=bus)
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.ready.wait(), 20)
        os.rename(cam, tmp_path / "dock" / "CAM7")
        status = await _until(sub, lambda e: isinstance(e, DockStatus) and e.problems)
        assert isinstance(status, DockStatus)
        assert "min_free_staging" in status.problems[0]
        waiting = await _until(sub, lambda e: isinstance(e, CameraStatus) and e.error is not None)
        assert isinstance(waiting, CameraStatus)
        assert waiting.state == "docked"
        assert not waiting.safe_to_undock
        # `dockd status` reads the journal (no daemon connection) and shows why
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "dockd", "status", "--json", "-c", str(_write(tmp_path))],
            capture_output=True,
            text=True,
            check=True,
        )
        problems = json.loads(out.stdout)["problems"]
        assert any("min_free_staging" in p for p in problems)
        # undocked while waiting: the session ends interrupted, nothing was copied
        os.rename(tmp_path / "dock" / "CAM7", cam)
        await _until(sub, lambda e: isinstance(e, CameraStatus) and e.state == "undocked")
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 30)
    journal = Journal.open(config.journal_path, "t")
    try:
        # undocked before any copy: nothing was taken, so nothing is queued for the store
        assert [r["state"] for r in journal.all("SELECT state FROM sessions")] == ["empty"]
        assert journal.queued_sessions() == []
        assert journal.all("SELECT * FROM files WHERE state = 'verified'") == []
    finally:
        journal.close()


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "dockd.toml"
    path.write_text(
        f'[dock]\nid = "t"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[sources.directory]\nenabled = true\npath = "{tmp_path / "dock"}"\n'
        f'[store]\npath = "{tmp_path / "evidence"}"\n'
        '[offload]\nmin_free_staging = "900TB"\n[mqtt]\nenabled = false\n'
    )
    return path
