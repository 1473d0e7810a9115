"""What the parts of a running daemon share: configuration, journal, bus, store, thread pools,
and the dock's current problems. Built once by `daemon.py`; no part reaches for globals."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dockd.config import Config
from dockd.events import EventBus
from dockd.evidence.signing import DockKey
from dockd.journal.thread import JournalThread
from dockd.store.base import Store


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Problems:
    """Short strings an operator should see (`dockd status`, MQTT `problems`), keyed by cause.

    A change sets `changed`; the daemon's status task then publishes the whole dock summary.
    """

    def __init__(self) -> None:
        self._items: dict[str, str] = {}
        self.store_reachable: bool | None = None
        self.changed = asyncio.Event()

    def set(self, key: str, text: str) -> None:
        if self._items.get(key) != text:
            self._items[key] = text
            self._publish()

    def clear(self, key: str) -> None:
        if self._items.pop(key, None) is not None:
            self._publish()

    def store(self, reachable: bool, why: str = "") -> None:
        if reachable:
            self.clear("store")
        else:
            self.set("store", f"evidence store unavailable: {why}")
        if self.store_reachable != reachable:
            self.store_reachable = reachable
            self._publish()

    @property
    def items(self) -> tuple[str, ...]:
        return tuple(self._items.values())

    def _publish(self) -> None:
        self.changed.set()


@dataclass
class Runtime:
    config: Config
    journal: JournalThread
    bus: EventBus
    store: Store
    problems: Problems
    offload_pool: ThreadPoolExecutor
    upload_pool: ThreadPoolExecutor
    camera_slots: asyncio.Semaphore
    dock_key: DockKey | None = None  # signs manifests
    upload_wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    space_freed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def staging(self) -> Path:
        return self.config.staging_dir
