"""The Source protocol: a camera source yields Docked and Undocked, nothing else.

A source reports what it sees, raw; deciding whether a camera id is acceptable is the daemon's
job, once, for every source. `start` returns after the source has reported every camera already
present, so the daemon knows when start-up recovery may close sessions whose camera is gone.

A source that can let the daemon delete from a camera (`camera.clear = "after_upload"`) also
implements `Clearable`: it hands out a writable root for the clear step only, and takes it back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Docked:
    source: str  # "directory" | "udev"
    camera: str  # the raw id (serial or directory name), not yet validated
    root: Path  # where the camera's files are readable
    location: str  # what an operator recognises: a path, a device node
    vendor_id: str | None = None
    model_id: str | None = None
    # how the camera was made readable (driver, options in force), for the custody record
    mount: Mapping[str, str] = field(default_factory=dict)
    # whether `root` itself can be deleted from (a directory); a read-only mount cannot, and its
    # source offers a separate writable root for the clear step instead (Clearable)
    writable: bool = False


@dataclass(frozen=True)
class Undocked:
    source: str
    camera: str
    location: str


@dataclass(frozen=True)
class Refused:
    """A device that is not a camera (no allowlist entry holds) or cannot be one. It was never
    mounted or read. `device` is what names it safely (a sysfs name): its own id may be bad."""

    source: str
    device: str
    reason: str


SourceEvent = Docked | Undocked | Refused


class Source(Protocol):
    name: str

    async def start(self, out: asyncio.Queue[SourceEvent]) -> None:
        """Begin watching; put every camera already present on `out`, then return."""

    async def release(self, docked: Docked) -> None:
        """The daemon is done reading this camera (its session ended): undo what `Docked`
        needed (a mount). Idempotent; also done by the source itself on undock and stop."""

    async def stop(self) -> None:
        """Stop watching and release what the source holds."""


@dataclass(frozen=True)
class ClearRoot:
    """Where the clear step may delete a camera's files from, and what it must leave alone."""

    root: Path
    # paths (as the walk recorded them) that look like files but are not the camera's: fusefat
    # shows a FAT volume label as an empty file in the root, and unlinking it erases the label
    keep: frozenset[str] = frozenset()
    why_keep: str = ""


@runtime_checkable
class Clearable(Protocol):
    """Optional capability of a Source: a writable root for clearing a docked camera."""

    async def open_for_clearing(self, docked: Docked) -> ClearRoot:
        """A root the daemon may delete this camera's files from. Raises SourceError, with the
        reason, when the camera cannot be cleared now (no longer docked, another medium, still
        being read, a read-write mount that failed); nothing is left to close then."""

    async def close_after_clearing(self, docked: Docked) -> None:
        """The clear step is over: sync what it wrote and undo what `open_for_clearing` did.
        Idempotent; also done by the source itself on undock and stop."""
