"""A sealed session of many files, written straight into a real journal.

An offload of 50 000 files takes minutes; the seal only reads the journal, so the rows an
offload and an upload would leave are inserted directly: the session, its files (stored, with
SHA-256 and xxh128), a `file_offloaded` and a `file_stored` custody record per file through the
journal's own chain code, then the journal's real `seal`. Laid out like a body camera's photo
folders (`DCIM/1NNBWC/DD/`, 100 files a folder), as bench/ does. Used by the memory test and by
the before/after measurement of the seal.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dockd.ids import SessionId
from dockd.journal import Journal

CAMERA = "CAM-SYN"
MTIME_NS = 1_795_510_931_000_000_000
_CHUNK = 5_000


def synthetic_path(k: int) -> str:
    return f"DCIM/{100 + k // 1000}BWC/{(k // 100) % 10:02d}/IMG{k:06d}.JPG"


def make_sealed_session(journal_path: Path, dock_id: str, files: int) -> SessionId:
    """A journal at `journal_path` holding one sealed session of `files` stored files."""
    session_id = SessionId(f"20261124T174900Z-{CAMERA}-{files:06d}")
    j = Journal.open(journal_path, dock_id)
    try:
        with j.tx() as conn:
            conn.execute(
                "INSERT INTO sessions (id, camera, state, docked_at, offloaded_at)"
                " VALUES (?, ?, 'offloaded', ?, ?)",
                (session_id, CAMERA, "2026-11-24T17:49:00.000001Z", "2026-11-24T17:51:00.000001Z"),
            )
            j.custody("docked", session_id, camera=CAMERA)
        for start in range(0, files, _CHUNK):
            rows = []
            records: list[tuple[str, str | None, dict[str, object]]] = []
            for k in range(start, min(files, start + _CHUNK)):
                path = synthetic_path(k)
                seed = path.encode()
                sha = hashlib.sha256(seed).hexdigest()
                xxh = hashlib.md5(seed).hexdigest()  # any 32 hex digits will do for the seal
                key = f"{CAMERA}/{session_id}/files/{path}"
                rows.append((session_id, CAMERA, path, 1000 + k, MTIME_NS + k, sha, xxh, key))
                at = f"2026-11-24T17:50:{k % 60:02d}.{k % 1_000_000:06d}Z"
                records.append(
                    (
                        "file_offloaded",
                        session_id,
                        {"path": path, "size": 1000 + k, "sha256": sha, "at": at},
                    )
                )
                records.append(
                    ("file_stored", session_id, {"path": path, "key": key, "sha256": sha})
                )
            with j.tx() as conn:
                conn.executemany(
                    "INSERT INTO files (session_id, camera, path, size, mtime_ns, state, sha256,"
                    " xxh128, key) VALUES (?, ?, ?, ?, ?, 'stored', ?, ?, ?)",
                    rows,
                )
                j.custody_run(records)
        j.seal(session_id)
    finally:
        j.close()
    return session_id
