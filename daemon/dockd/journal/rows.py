"""Journal rows as frozen dataclasses: what the rest of dockd sees of the database."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from dockd.ids import CameraId, SessionId
from dockd.journal.states import FileState, SessionState


@dataclass(frozen=True)
class SessionRow:
    id: SessionId
    camera: CameraId
    state: SessionState
    docked_at: str
    offloaded_at: str | None
    sealed_at: str | None
    uploaded_at: str | None
    vendor_id: str | None
    model_id: str | None
    officer: str | None
    priority: int
    custody_last_seq: int | None
    error: str | None

    @classmethod
    def of(cls, row: sqlite3.Row) -> SessionRow:
        return cls(
            id=SessionId(row["id"]),
            camera=CameraId(row["camera"]),
            state=SessionState(row["state"]),
            docked_at=row["docked_at"],
            offloaded_at=row["offloaded_at"],
            sealed_at=row["sealed_at"],
            uploaded_at=row["uploaded_at"],
            vendor_id=row["vendor_id"],
            model_id=row["model_id"],
            officer=row["officer"],
            priority=row["priority"],
            custody_last_seq=row["custody_last_seq"],
            error=row["error"],
        )


@dataclass(frozen=True)
class FileRow:
    id: int
    session_id: SessionId
    camera: CameraId
    path: str  # UTF-8; bytes that were not are percent-encoded
    raw_path: bytes | None  # the name's original bytes when they were not UTF-8
    size: int
    mtime_ns: int
    state: FileState
    sha256: str | None
    key: str | None
    error: str | None
    xxh128: str | None = None

    @classmethod
    def of(cls, row: sqlite3.Row) -> FileRow:
        return cls(
            id=row["id"],
            session_id=SessionId(row["session_id"]),
            camera=CameraId(row["camera"]),
            path=row["path"],
            raw_path=row["raw_path"],
            size=row["size"],
            mtime_ns=row["mtime_ns"],
            state=FileState(row["state"]),
            sha256=row["sha256"],
            key=row["key"],
            error=row["error"],
            xxh128=row["xxh128"],
        )


@dataclass(frozen=True)
class SkippedRow:
    path: str
    raw_path: bytes | None
    reason: str
