"""Type=notify against a real datagram socket, with the daemon running in this event loop:
READY=1 only after recovery, STATUS= lines, WATCHDOG=1 from the loop itself — and none while the
loop is blocked."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import statistics
import time

import pytest
from systemd_support import WAIT_S, Datagram, Dock, NotifyListener, running_daemon, watch_notice

from dockd.daemon import Daemon
from dockd.ids import CameraId
from dockd.journal import Journal

WATCHDOG_USEC = 200_000  # WATCHDOG=1 every 100 ms


@pytest.fixture
def notify_env(notify_socket: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> NotifyListener:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    return notify_socket


async def test_ready_only_after_recovery_then_status_lines_and_periodic_watchdog(
    dock: Dock, notify_env: NotifyListener
) -> None:
    cfg = dock.config()
    # a crash left a session offloading, and its camera is gone: recovery must close it
    j = Journal.open(cfg.journal_path, cfg.dock.id)
    j.camera_docked(CameraId("X6CRASHED"), "directory", "/gone", None, None)
    orphan, _ = j.open_session(CameraId("X6CRASHED"), None, None, None, "/gone")
    j.close()

    # what the journal says at the instant READY=1 arrives (read in the listener's thread)
    at_ready: dict[str, object] = {}

    def on_message(m: Datagram) -> None:
        if m.has("READY=1") and not at_ready:
            conn = sqlite3.connect(f"file:{cfg.journal_path}?mode=ro", uri=True)
            at_ready["orphan"] = conn.execute(
                "SELECT state FROM sessions WHERE id = ?", (orphan.id,)
            ).fetchone()[0]
            at_ready["started"] = conn.execute(
                "SELECT count(*) FROM custody WHERE event = 'daemon_started'"
            ).fetchone()[0]
            conn.close()

    notify_env.on_message = on_message

    # Hold the journal's write lock: the daemon opens the journal, but its recovery cannot
    # write until we let go. The event loop runs all the while (WATCHDOG=1 keeps coming).
    lock = sqlite3.connect(cfg.journal_path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    daemon = Daemon(cfg, config_file=dock.config_file)
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.to_thread(notify_env.wait_count, "WATCHDOG=1", 3)
        assert not any(m.has("READY=1") for m in notify_env.messages)
        assert notify_env.messages[0].status == "starting: journal open, recovering"
        lock.rollback()

        ready = await asyncio.to_thread(notify_env.wait_line, "READY=1")
        assert at_ready == {"orphan": "empty", "started": 1}, "READY=1 came before recovery"
        after_ready = notify_env.messages.index(ready)

        uploaded = watch_notice(daemon, "session_uploaded")
        dock.camera("X6039B2A3", {"DCIM/0001.MP4": 200_000, "DCIM/0002.MP4": 1_000})
        dock.dock_camera("X6039B2A3")
        await asyncio.wait_for(uploaded, WAIT_S)
        final = "1 camera docked, queue empty"
        await asyncio.to_thread(
            notify_env.wait_for, lambda m: m.status == final, WAIT_S, after_ready
        )

        # WATCHDOG=1 every half of WATCHDOG_USEC, before READY=1 and after
        await asyncio.to_thread(notify_env.wait_count, "WATCHDOG=1", 5, WAIT_S, after_ready)
        beats = [m.at for m in notify_env.since(0) if m.has("WATCHDOG=1")]
        gap = statistics.median(b - a for a, b in itertools.pairwise(beats))
        assert 0.05 <= gap <= 0.5, gap
    finally:
        lock.close()
        daemon.stop()
        assert await asyncio.wait_for(task, WAIT_S) == 0
    notify_env.wait_line("STOPPING=1")


async def test_watchdog_stops_while_the_event_loop_is_blocked_then_resumes(
    dock: Dock, notify_env: NotifyListener
) -> None:
    async with running_daemon(dock.config(), dock.config_file):
        start = notify_env.mark()
        await asyncio.to_thread(notify_env.wait_count, "WATCHDOG=1", 3, WAIT_S, start)

        span: dict[str, float] = {}

        def block() -> None:  # a stuck callback: what a hung loop looks like from outside
            span["from"] = time.monotonic()
            time.sleep(1.5)
            span["to"] = time.monotonic()

        asyncio.get_running_loop().call_soon(block)
        await asyncio.sleep(0)  # the loop runs `block` before it comes back here
        assert span, "the blocking call did not run"

        # a datagram sent just before the block may be stamped a moment into it
        during = [
            m.at - span["from"]
            for m in notify_env.since(start)
            if m.has("WATCHDOG=1") and span["from"] + 0.05 < m.at < span["to"]
        ]
        assert during == [], f"WATCHDOG=1 while the loop was blocked, at {during} s"
        after = await asyncio.to_thread(
            notify_env.wait_for, lambda m: m.has("WATCHDOG=1") and m.at > span["to"]
        )
        assert after.at - span["to"] < 1.0
        await asyncio.to_thread(
            notify_env.wait_count, "WATCHDOG=1", 3, WAIT_S, notify_env.messages.index(after)
        )
