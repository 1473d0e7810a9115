"""observers/notify.py on its own: the datagram, the socket address forms, the watchdog interval,
and the STATUS line made from bus events."""

from __future__ import annotations

import asyncio
import os

from systemd_support import NotifyListener

from dockd.events import CameraStatus, DockStatus, EventBus, Notice, Progress, QueueFacts
from dockd.observers.notify import DockActivity, Notifier, NotifyObserver


def test_without_notify_socket_every_send_is_a_no_op() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert n.watchdog_interval is None
    assert n.send("READY=1") is False


def test_a_path_socket_gets_one_datagram_per_message(notify_socket: NotifyListener) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address})
    assert n.send("READY=1", "STATUS=ready") is True
    msg = notify_socket.wait_line("READY=1")
    assert msg.lines == ["READY=1", "STATUS=ready"]
    n.close()


def test_an_abstract_socket_is_spelled_with_an_at_sign(
    abstract_notify_socket: NotifyListener,
) -> None:
    assert abstract_notify_socket.address.startswith("@")
    n = Notifier.from_env({"NOTIFY_SOCKET": abstract_notify_socket.address})
    assert n.send("WATCHDOG=1")
    abstract_notify_socket.wait_line("WATCHDOG=1")
    n.close()


def test_a_socket_nobody_listens_on_is_not_an_error(tmp_path: object) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "@dockd-test-nobody-listens-here"})
    assert n.send("READY=1") is False  # logged at debug, never raised


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval == 15.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "junk"}).watchdog_interval is None
    assert Notifier.from_env({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None


def _dock(
    cameras: tuple[str, ...], sessions: int, size: int, problems: tuple[str, ...] = ()
) -> DockStatus:
    return DockStatus(
        state="degraded" if problems else "busy",
        cameras_docked=cameras,
        queue=QueueFacts(sessions, 7, size),
        staging_free_bytes=10**10,
        store_reachable=not problems,
        problems=problems,
        version="0",
    )


def test_status_line_says_what_the_dock_is_doing() -> None:
    a = DockActivity()
    assert a.line().startswith("starting")
    a.ready = True
    a.apply(_dock(("X6039B2A3", "X6000001"), 3, int(1.2 * 1024**3)))
    a.apply(Progress("X6039B2A3", "s1", "offload", 10, 4, 1000, 410))
    assert a.line() == "2 cameras docked, offloading X6039B2A3 41%, queue 3 sessions 1.2 GiB"
    a.apply(CameraStatus("X6039B2A3", "offloaded", "s1"))
    a.apply(CameraStatus("X6000001", "uploading", "s0", 2, 1, 100, 50))
    assert a.line() == "2 cameras docked, uploading X6000001 50%, queue 3 sessions 1.2 GiB"
    a.apply(_dock((), 0, 0, ("evidence store unavailable: /srv/evidence missing",)))
    a.apply(CameraStatus("X6000001", "uploaded", "s0"))
    assert a.line() == (
        "degraded (evidence store unavailable: /srv/evidence missing):"
        " 0 cameras docked, queue empty"
    )
    a.stopping = True
    assert a.line().startswith("stopping")


async def test_observer_sends_ready_status_and_stopping_in_order(
    notify_socket: NotifyListener,
) -> None:
    bus = EventBus()
    sub = bus.subscribe("notify")
    observer = NotifyObserver(Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address}))
    task = asyncio.create_task(observer.run(sub))
    bus.publish(Notice("daemon_ready"))
    bus.publish(_dock(("X6039B2A3",), 1, 2048))
    line = "STATUS=1 camera docked, queue 1 session 2.0 KiB"
    await asyncio.to_thread(notify_socket.wait_line, line)
    bus.publish(Notice("daemon_stopping"))
    await asyncio.to_thread(notify_socket.wait_line, "STOPPING=1")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    texts = [m.text for m in notify_socket.messages]
    assert texts[0] == "STATUS=starting: journal open, recovering"
    assert texts[1].startswith("READY=1\nSTATUS=")
    assert line in texts
    assert texts[-1].startswith("STOPPING=1\nSTATUS=stopping")
    assert sum("STOPPING=1" in t for t in texts) == 1  # not again when cancelled


async def test_cancelled_observer_says_stopping_once(notify_socket: NotifyListener) -> None:
    bus = EventBus()
    observer = NotifyObserver(Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address}))
    task = asyncio.create_task(observer.run(bus.subscribe("notify")))
    bus.publish(Notice("daemon_ready"))
    await asyncio.to_thread(notify_socket.wait_line, "READY=1")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    notify_socket.wait_line("STOPPING=1")
