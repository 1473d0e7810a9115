"""Sessions of any shape in a real journal, sealed by the journal's own `seal`.

An offload cannot be asked for a file that failed, one that was abandoned, a name the walk
skipped, a file copied twice or one without an xxh128, all in one session; the rows it would
leave can be. Each file gets the custody records an offload and an upload append for it
(`file_offloaded` — twice for a file copied twice, with two copy times —, `file_verified`,
`file_stored`, or an `error`), through the journal's chain code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from dockd.ids import SessionId
from dockd.journal import FileState, Journal

MTIME_NS = 1_795_510_931_000_000_000  # 2026-11-24T09:02:11Z


@dataclass(frozen=True)
class Spec:
    """One file of a session: its path (relative to files/), its content, its end state."""

    path: str
    data: bytes = b""
    state: FileState = FileState.STORED
    xxh: bool = True  # False: offloaded by a dockd without the xxh128 column
    raw_path: bytes | None = None
    # one `file_offloaded` per copy; the last with a time counts (None: a record without one)
    copied_at: Sequence[str | None] = ("2026-11-24T17:50:01.000001Z",)
    mtime_ns: int = MTIME_NS


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str = "special_file"
    raw_path: bytes | None = None


@dataclass(frozen=True)
class Session:
    id: str
    camera: str = "X6039B2A3"
    files: Sequence[Spec] = ()
    skipped: Sequence[Skip] = ()
    officer: str | None = None
    vendor_id: str | None = None
    model_id: str | None = None
    sealed_at: str | None = None  # else the seal's own time
    after: Sequence[str] = field(default=("uploaded", "staging_released"))  # records past it


def add_session(j: Journal, s: Session) -> SessionId:
    """Write `s` into the journal, seal it, then append the records a session gets after its
    seal (which its custody.jsonl must leave out)."""
    sid = SessionId(s.id)
    states = {f.state for f in s.files}
    end = (
        "interrupted"
        if FileState.ABANDONED in states
        else "offloaded_with_errors"
        if states & {FileState.FAILED, FileState.UNSTABLE}
        else "offloaded"
    )
    with j.tx() as conn:
        conn.execute(
            "INSERT INTO sessions (id, camera, state, docked_at, offloaded_at, vendor_id,"
            " model_id, officer) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                sid,
                s.camera,
                end,
                "2026-11-24T17:49:00.000001Z",
                "2026-11-24T17:51:00.000001Z",
                s.vendor_id,
                s.model_id,
                s.officer,
            ),
        )
        j.custody("docked", sid, camera=s.camera, location="bay 1")
        for k in s.skipped:
            conn.execute(
                "INSERT INTO skipped (session_id, path, raw_path, reason) VALUES (?, ?, ?, ?)",
                (sid, k.path, k.raw_path, k.reason),
            )
            j.custody("skipped", sid, path=k.path, reason=k.reason)
        for f in s.files:
            sha = hashlib.sha256(f.data).hexdigest()
            copied = f.state in (FileState.STORED, FileState.CLEARED)
            key = f"{s.camera}/{sid}/files/{f.path}" if copied else None
            error = {
                FileState.FAILED: "read error: Input/output error",
                FileState.UNSTABLE: "kept changing while copied",
            }.get(f.state)
            conn.execute(
                "INSERT INTO files (session_id, camera, path, raw_path, size, mtime_ns, state,"
                " sha256, key, error, xxh128) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sid,
                    s.camera,
                    f.path,
                    f.raw_path,
                    len(f.data),
                    f.mtime_ns,
                    f.state,
                    sha if copied else None,
                    key,
                    error,
                    xxhash.xxh3_128(f.data).hexdigest() if copied and f.xxh else None,
                ),
            )
            if copied:
                for at in f.copied_at:
                    j.custody(
                        "file_offloaded", sid, path=f.path, size=len(f.data), sha256=sha, at=at
                    )
                    j.custody("file_verified", sid, path=f.path, sha256=sha, method="readback")
                j.custody(
                    "file_stored", sid, path=f.path, key=key, sha256=sha, verified_by="readback"
                )
            elif error is not None:
                j.custody("error", sid, path=f.path, outcome=str(f.state), error=error)
    j.seal(sid)
    if s.sealed_at is not None:
        with j.tx() as conn:
            conn.execute(
                "UPDATE sessions SET sealed_at = ?, uploaded_at = ? WHERE id = ?",
                (s.sealed_at, s.sealed_at, sid),
            )
    for event in s.after:
        j.custody_event(event, sid)
    return sid


def journal_with(path: Path, dock_id: str, sessions: Sequence[Session]) -> list[SessionId]:
    j = Journal.open(path, dock_id)
    try:
        return [add_session(j, s) for s in sessions]
    finally:
        j.close()
