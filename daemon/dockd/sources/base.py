"""The Source protocol: a camera source yields Docked and Undocked, nothing else.

A source reports what it sees, raw; deciding whether a camera id is acceptable is the daemon's
job, once, for every source. `start` returns after the source has reported every camera already
present, so the daemon knows when start-up recovery may close sessions whose camera is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


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
    # whether clearing (`camera.clear`) can delete from it: a read-only mount cannot
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
