"""sd_notify: tells systemd (`Type=notify`) when dockd is ready, what it is doing, that its event
loop is alive, and that it is stopping.

Why our own twenty lines rather than a library: the protocol is one datagram of `KEY=VALUE`
lines to the AF_UNIX socket named in `$NOTIFY_SOCKET` (a leading `@` means the Linux abstract
namespace); the kernel adds the sender's credentials itself. The python-systemd binding needs
libsystemd's headers and a compiler to install, for one call; a pure-Python package would be a
dependency for less code than this module, and still not know our event loop.

- `READY=1` is sent on the daemon's `daemon_ready` notice, which the daemon publishes once the
  journal is open, crash recovery is done and the sources run.
- `STATUS=` is one line of what the dock is doing, sent whenever it changes.
- `WATCHDOG=1` is sent by a task on the event loop every half of `$WATCHDOG_USEC`: a blocked
  loop sends nothing, and systemd (`WatchdogSec=`) restarts the service.
- `STOPPING=1` when the daemon has begun its shutdown: sources stopped, every session told to
  park after the chunk in hand (the `daemon_stopping` notice); at the latest when this observer
  is cancelled by the shutdown.

Without `$NOTIFY_SOCKET` every send is a no-op. The socket is non-blocking: a message systemd
cannot take at once is dropped, never waited for on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from dockd.events import CameraStatus, DockStatus, Event, Notice, Progress, Subscription
from dockd.observers.log import get as get_log
from dockd.units import format_size

STATUS_CAMERAS_SHOWN = 3  # the STATUS line stays short enough for `systemctl status`
_ACTIVE_STATES = {"offloading", "uploading"}
_IDLE_STATES = {"offloaded", "uploaded", "cleared", "undocked", "refused", "error", "docked"}


class Notifier:
    """One datagram per message to `$NOTIFY_SOCKET`; a no-op when it is unset."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = _socket_address(address) if address else None
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._log = get_log()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None, _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two WATCHDOG=1: half the timeout, as sd_watchdog_enabled(3) advises."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def send(self, *lines: str) -> bool:
        """Send `lines` as one message. True if it was sent."""
        if self.address is None:
            return False
        message = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message, self.address)
        except OSError as exc:  # systemd away or its queue full: status must never stop us
            self._log.debug("sd_notify_failed", error=str(exc), message=lines[0][:40])
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(raw: str) -> str:
    """`@name` is the abstract namespace: Python spells it with a leading NUL."""
    return "\0" + raw[1:] if raw.startswith("@") else raw


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """`$WATCHDOG_USEC`, if it is meant for this process (`$WATCHDOG_PID` unset or ours)."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


@dataclass
class DockActivity:
    """What the STATUS line is made of: the latest dock summary and each camera's phase."""

    ready: bool = False
    stopping: bool = False
    dock: DockStatus | None = None
    # camera -> (phase, percent); only cameras offloading or uploading
    active: dict[str, tuple[str, int | None]] = field(default_factory=dict)

    def apply(self, event: Event) -> None:
        if isinstance(event, DockStatus):
            self.dock = event
        elif isinstance(event, CameraStatus):
            if event.state in _ACTIVE_STATES:
                pct = _percent(event.bytes_done, event.bytes_total)
                self.active[event.camera] = (event.state, pct)
            elif event.state in _IDLE_STATES:
                self.active.pop(event.camera, None)
        elif isinstance(event, Progress):
            phase = "offloading" if event.phase == "offload" else "uploading"
            self.active[event.camera] = (phase, _percent(event.bytes_done, event.bytes_total))

    def line(self) -> str:
        """e.g. "2 cameras docked, offloading X6039B2A3 41%, queue 3 sessions 1.2 GiB"."""
        if self.stopping:
            return "stopping: parking offloads, closing the journal"
        if not self.ready:
            return "starting: journal open, recovering"
        parts: list[str] = []
        dock = self.dock
        if dock is not None:
            n = len(dock.cameras_docked)
            parts.append(f"{n} camera{'' if n == 1 else 's'} docked")
        for camera, (phase, pct) in sorted(self.active.items())[:STATUS_CAMERAS_SHOWN]:
            parts.append(f"{phase} {camera}" + ("" if pct is None else f" {pct}%"))
        if len(self.active) > STATUS_CAMERAS_SHOWN:
            parts.append(f"+{len(self.active) - STATUS_CAMERAS_SHOWN} more")
        if dock is not None:
            q = dock.queue
            if q.sessions:
                s = "session" if q.sessions == 1 else "sessions"
                parts.append(f"queue {q.sessions} {s} {format_size(q.bytes)}")
            else:
                parts.append("queue empty")
            if q.failed:
                parts.append(f"{q.failed} upload{'' if q.failed == 1 else 's'} failed")
        text = ", ".join(parts) or "ready"
        if dock is not None and dock.problems:
            text = f"degraded ({'; '.join(dock.problems)}): {text}"
        return text


def _percent(done: int, total: int) -> int | None:
    if total <= 0:
        return None
    return min(100, done * 100 // total)


class NotifyObserver:
    name = "notify"

    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier.from_env()
        self.activity = DockActivity()
        self._last_status: str | None = None
        self._stopping_sent = False

    async def run(self, sub: Subscription) -> None:
        if not self.notifier.enabled:
            async for _ in sub:  # keep the subscription drained; nothing to tell
                pass
            return
        interval = self.notifier.watchdog_interval
        watchdog = asyncio.create_task(self._watchdog(interval)) if interval else None
        try:
            if self.activity.ready:  # restarted by the supervisor after a crash
                self.notifier.send("READY=1")
            self._status()
            async for event in sub:
                self._on_event(event)
        except asyncio.CancelledError:
            # the daemon cancels its observers only when it goes down
            self._stopping()
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Notice):
            if event.event == "daemon_ready":
                self.activity.ready = True
                self._last_status = self.activity.line()
                self.notifier.send("READY=1", f"STATUS={self._last_status}")
                return
            if event.event == "daemon_stopping":
                self._stopping()
                return
        self.activity.apply(event)
        self._status()

    def _status(self) -> None:
        line = self.activity.line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.send(f"STATUS={line}")

    def _stopping(self) -> None:
        if self._stopping_sent:
            return
        self._stopping_sent = True
        self.activity.stopping = True
        self._last_status = self.activity.line()
        self.notifier.send("STOPPING=1", f"STATUS={self._last_status}")

    async def _watchdog(self, interval: float) -> None:
        """Runs on the event loop: if the loop is blocked, no WATCHDOG=1 goes out."""
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)
