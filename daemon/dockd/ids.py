"""Identifiers: camera ids (from the device), session ids (made here)."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import NewType

CameraId = NewType("CameraId", str)
SessionId = NewType("SessionId", str)

CAMERA_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DOCK_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SESSION_ID_RE = re.compile(r"^\d{8}T\d{6}Z-[A-Za-z0-9._-]{1,64}-[0-9a-f]{4,}$")


def camera_id(raw: str) -> CameraId | None:
    """The camera id for `raw`, or None if it cannot be one (it would be unsafe in paths/topics).

    "." and ".." match the character class but are path components, never ids.
    """
    if not CAMERA_ID_RE.fullmatch(raw) or raw in {".", ".."}:
        return None
    return CameraId(raw)


def new_session_id(camera: CameraId, now: datetime | None = None) -> SessionId:
    """Sortable by time, safe in file names and store keys, unique by a random suffix."""
    at = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return SessionId(f"{at}-{camera}-{secrets.token_hex(3)}")


def utc_now() -> str:
    """RFC 3339 UTC with a Z, second precision plus microseconds for ordering."""
    return rfc3339(datetime.now(UTC))


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339_from_ns(ns: int) -> str:
    """A file mtime (ns since epoch) as RFC 3339 UTC, whole seconds (cameras keep no finer)."""
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
