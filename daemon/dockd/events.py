"""Status events and the bus that carries them to observers (logs, MQTT, sd_notify, metrics).

The data path publishes and never waits: `publish` is synchronous and O(1). Each subscriber has
its own bounded buffer. Progress is coalesced per camera (only the latest matters); state changes
and notices are kept in order, and if a subscriber falls so far behind that its buffer is full,
the oldest notices are dropped and counted — memory stays bounded however long an observer is
away. Camera state changes are never dropped: at most one per camera is pending, the latest.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from dockd.ids import utc_now


@dataclass(frozen=True)
class CameraStatus:
    """A camera changed state (SPEC §7 camera states)."""

    camera: str
    # docked offloading offloaded uploading uploaded clearing cleared undocked refused error
    state: str
    session_id: str | None = None
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    safe_to_undock: bool = False
    error: str | None = None
    at: str = field(default_factory=utc_now)


@dataclass(frozen=True)
class Progress:
    """Counters of the current phase of a camera's session; coalesced, may be dropped."""

    camera: str
    session_id: str
    phase: str  # "offload" | "upload"
    files_total: int
    files_done: int
    bytes_total: int
    bytes_done: int
    at: str = field(default_factory=utc_now)


@dataclass(frozen=True)
class Notice:
    """A one-off event: file_verified, session_uploaded, camera_refused, store_unreachable, …"""

    event: str
    camera: str | None = None
    session_id: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    at: str = field(default_factory=utc_now)


@dataclass(frozen=True)
class QueueFacts:
    sessions: int = 0
    files: int = 0
    bytes: int = 0
    failed: int = 0
    prioritized: tuple[str, ...] = ()


@dataclass(frozen=True)
class DockStatus:
    """The dock summary (SPEC §7 `<base>/state`), published on every change and periodically."""

    state: str  # idle | busy | degraded
    cameras_docked: tuple[str, ...]
    queue: QueueFacts
    staging_free_bytes: int | None
    store_reachable: bool | None
    problems: tuple[str, ...]
    version: str
    at: str = field(default_factory=utc_now)


Event = CameraStatus | Progress | Notice | DockStatus


class Subscription:
    """One observer's view of the bus: an async iterator of events."""

    def __init__(self, name: str, maxsize: int) -> None:
        self.name = name
        self.dropped = 0
        self._maxsize = maxsize
        self._latest: OrderedDict[tuple[str, str], Event] = OrderedDict()
        self._notices: deque[Notice] = deque()
        self._wake = asyncio.Event()
        self._closed = False

    def _offer(self, event: Event) -> None:
        if isinstance(event, Notice):
            if len(self._notices) >= self._maxsize:
                self._notices.popleft()
                self.dropped += 1
            self._notices.append(event)
        else:
            key = _key(event)
            # a camera state change supersedes that camera's pending progress
            if isinstance(event, CameraStatus):
                self._latest.pop(("progress", event.camera), None)
            self._latest.pop(key, None)
            self._latest[key] = event
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def drain(self) -> list[Event]:
        """Everything pending, notices first (they happened before the latest states)."""
        out: list[Event] = [*self._notices, *self._latest.values()]
        self._notices.clear()
        self._latest.clear()
        self._wake.clear()
        return out

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            if not self._closed:
                await self._wake.wait()
            batch = self.drain()
            for event in batch:
                yield event
            if self._closed and not batch:
                return


def _key(event: CameraStatus | Progress | DockStatus) -> tuple[str, str]:
    if isinstance(event, CameraStatus):
        return ("state", event.camera)
    if isinstance(event, Progress):
        return ("progress", event.camera)
    return ("dock", "")


class EventBus:
    def __init__(self) -> None:
        self._subs: list[Subscription] = []

    def subscribe(self, name: str, maxsize: int = 1000) -> Subscription:
        sub = Subscription(name, maxsize)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        if sub in self._subs:
            self._subs.remove(sub)

    def publish(self, event: Event) -> None:
        for sub in self._subs:
            sub._offer(event)

    def close(self) -> None:
        for sub in self._subs:
            sub.close()
