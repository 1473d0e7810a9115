"""The session manifest (`dockd.manifest/1`, SPEC §6): built from journal rows, written last.

Its bytes must be the same however often it is rebuilt (a restart between writing it and
recording that), so it holds only what the journal froze at sealing, and is serialized canonically.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from dockd.custody import SliceSummary
from dockd.evidence.keys import file_key
from dockd.ids import rfc3339_from_ns
from dockd.journal.rows import FileRow, SessionRow, SkippedRow
from dockd.journal.states import MANIFEST_STATUS, FileState

FORMAT = "dockd.manifest/1"
SIGNATURE = "manifest.json.sig"


def _raw(raw: bytes | None) -> dict[str, str]:
    return {} if raw is None else {"raw_path_b64": base64.b64encode(raw).decode("ascii")}


def build(
    *,
    session: SessionRow,
    dock_id: str,
    files: Sequence[FileRow],
    skipped: Sequence[SkippedRow],
    sidecars: Sequence[tuple[str, int, str]],
    custody: SliceSummary,
    key_id: str | None = None,
) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []
    not_taken: list[dict[str, Any]] = [
        {"path": s.path, "reason": s.reason, **_raw(s.raw_path)} for s in skipped
    ]
    for f in files:
        status = MANIFEST_STATUS.get(f.state)
        if status is None:
            if f.state == FileState.ABANDONED:
                not_taken.append(
                    {"path": f.path, "reason": "camera_undocked_before_copy", **_raw(f.raw_path)}
                )
            continue
        entry: dict[str, Any] = {
            "path": f.path,
            "size": f.size,
            "mtime": rfc3339_from_ns(f.mtime_ns),
            **_raw(f.raw_path),
            "status": status,
        }
        if status == "verified":
            entry["sha256"] = f.sha256
            entry["key"] = f.key or file_key(session.camera, session.id, f.path)
        elif f.error:
            entry["error"] = f.error
        entries.append(entry)
    camera: dict[str, Any] = {
        "id": session.camera,
        "vendor_id": session.vendor_id,
        "model_id": session.model_id,
    }
    if session.officer is not None:
        camera["officer"] = session.officer
    return {
        "format": FORMAT,
        "session_id": session.id,
        "dock_id": dock_id,
        "camera": camera,
        "docked_at": _z(session.docked_at),
        "offloaded_at": _z(session.offloaded_at),
        "uploaded_at": _z(session.uploaded_at),
        "outcome": _outcome(files),
        "files": sorted(entries, key=lambda e: e["path"]),
        "skipped": sorted(not_taken, key=lambda e: e["path"]),
        "sidecars": [{"name": n, "size": size, "sha256": h} for n, size, h in sidecars],
        "custody": custody.as_dict(),
        "signing": None
        if key_id is None
        else {"algorithm": "ed25519", "key_id": key_id, "signature": SIGNATURE},
    }


def _outcome(files: Sequence[FileRow]) -> str:
    states = {f.state for f in files}
    if FileState.ABANDONED in states:
        return "interrupted"
    if states & {FileState.FAILED, FileState.UNSTABLE}:
        return "offloaded_with_errors"
    return "complete"


def _z(at: str | None) -> str | None:
    """Journal times carry microseconds for ordering; the manifest shows whole seconds."""
    return None if at is None else at[:19] + "Z"


def dumps(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode()
