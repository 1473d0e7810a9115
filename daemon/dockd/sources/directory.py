"""Directory source: each subdirectory of `sources.directory.path` is a docked camera named by
its serial. It must appear atomically (a rename or a mount); removing or renaming it away is an
undock. Used for external automounters, network shares and tests.

watchdog's observer thread hands events to the loop with call_soon_threadsafe; nothing here
blocks the loop.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from dockd.errors import SourceError
from dockd.sources.base import ClearRoot, Docked, SourceEvent, Undocked


class DirectorySource:
    name = "directory"

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()  # watchdog reports absolute paths
        self._observer: Any = None
        self._present: set[str] = set()

    async def start(self, out: asyncio.Queue[SourceEvent]) -> None:
        if not self.path.is_dir():
            raise SourceError(f"sources.directory.path {self.path}: not a directory")
        loop = asyncio.get_running_loop()
        handler = _Handler(self, loop, out)
        observer = Observer()
        observer.schedule(handler, os.fspath(self.path), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer
        # after the watch is in place: a camera arriving now is seen either here or as an event,
        # and _docked() makes seeing it twice harmless
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                self._docked(entry.name, out)

    async def release(self, docked: Docked) -> None:
        """Nothing to undo: the directory is not ours."""

    async def open_for_clearing(self, docked: Docked) -> ClearRoot:
        """The camera's directory as it is, while it is still there."""
        if docked.camera not in self._present:
            raise SourceError(f"{docked.root}: the camera's directory is gone")
        return ClearRoot(docked.root)

    async def close_after_clearing(self, docked: Docked) -> None:
        """Nothing to undo."""

    async def stop(self) -> None:
        if self._observer is not None:
            observer, self._observer = self._observer, None
            observer.stop()
            await asyncio.to_thread(observer.join, 5)

    def _docked(self, name: str, out: asyncio.Queue[SourceEvent]) -> None:
        if name in self._present:
            return
        self._present.add(name)
        root = self.path / name
        out.put_nowait(Docked(self.name, name, root, str(root), writable=True))

    def _undocked(self, name: str, out: asyncio.Queue[SourceEvent]) -> None:
        if name not in self._present:
            return
        self._present.discard(name)
        out.put_nowait(Undocked(self.name, name, str(self.path / name)))

    def on_event(self, event: FileSystemEvent, out: asyncio.Queue[SourceEvent]) -> None:
        src = _child(self.path, event.src_path)
        if isinstance(event, DirCreatedEvent) and src is not None:
            self._docked(src, out)
        elif isinstance(event, DirDeletedEvent) and src is not None:
            self._undocked(src, out)
        elif isinstance(event, DirMovedEvent):
            if src is not None:
                self._undocked(src, out)
            dest = _child(self.path, event.dest_path)
            if dest is not None:
                self._docked(dest, out)


def _child(root: Path, raw: str | bytes) -> str | None:
    """The name of `raw` if it is a direct child of `root`, else None."""
    p = Path(os.fsdecode(raw))
    return p.name if p.parent == root else None


class _Handler(FileSystemEventHandler):
    def __init__(
        self,
        source: DirectorySource,
        loop: asyncio.AbstractEventLoop,
        out: asyncio.Queue[SourceEvent],
    ) -> None:
        self._source = source
        self._loop = loop
        self._out = out

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._loop.call_soon_threadsafe(self._source.on_event, event, self._out)
