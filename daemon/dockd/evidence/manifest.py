"""The session manifest (`dockd.manifest/1`, SPEC §6): built from journal rows, written last.

Its bytes must be the same however often it is rebuilt (a restart between writing it and
recording that), so it holds only what the journal froze at sealing, and is serialized canonically.
It is written as a stream (`write`): a session may list 100 000 files.
"""

from __future__ import annotations

import base64
import heapq
import json
from collections.abc import Callable, Collection, Iterable, Sequence
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


def write(
    out: Callable[[bytes], object],
    *,
    session: SessionRow,
    dock_id: str,
    states: Collection[FileState],
    files: Iterable[FileRow],
    abandoned: Iterable[FileRow],
    skipped: Iterable[SkippedRow],
    sidecars: Sequence[tuple[str, int, str]],
    custody: SliceSummary,
    key_id: str | None = None,
) -> None:
    """Write the manifest's bytes to `out`, a file entry at a time.

    `states` are the states the session's files are in; `files` its files listed under `files`
    (a state in MANIFEST_STATUS), `abandoned` those in ABANDONED, `skipped` what the walk left
    out: each in path order. The bytes are those of `json.dumps(manifest, indent=2,
    ensure_ascii=False)` and a newline, as dockd has always written them (a manifest rebuilt
    after an upgrade must be the same bytes), laid out here piece by piece so that no list of
    a session's files is ever held whole.
    """
    camera: dict[str, Any] = {
        "id": session.camera,
        "vendor_id": session.vendor_id,
        "model_id": session.model_id,
    }
    if session.officer is not None:
        camera["officer"] = session.officer
    not_taken = heapq.merge(  # stable: on a tie the skipped entry first, as sorted() had it
        (_skipped(s) for s in skipped), (_abandoned(f) for f in abandoned), key=_path
    )
    fields: list[tuple[str, Any]] = [
        ("format", FORMAT),
        ("session_id", session.id),
        ("dock_id", dock_id),
        ("camera", camera),
        ("docked_at", _z(session.docked_at)),
        ("offloaded_at", _z(session.offloaded_at)),
        ("uploaded_at", _z(session.uploaded_at)),
        ("outcome", outcome(states)),
        ("files", _Items(_entry(session, f) for f in files)),
        ("skipped", _Items(not_taken)),
        ("sidecars", [{"name": n, "size": size, "sha256": h} for n, size, h in sidecars]),
        ("custody", custody.as_dict()),
        (
            "signing",
            None
            if key_id is None
            else {"algorithm": "ed25519", "key_id": key_id, "signature": SIGNATURE},
        ),
    ]
    out(b"{\n")
    for n, (name, value) in enumerate(fields):
        out(_key(name, n))
        if isinstance(value, _Items):
            _write_items(out, value)
        else:
            out(_dumps(value).replace("\n", "\n  ").encode())
    out(b"\n}\n")


class _Items:
    """A list the manifest writes an item at a time."""

    def __init__(self, items: Iterable[dict[str, Any]]) -> None:
        self.items = items


def _write_items(out: Callable[[bytes], object], value: _Items) -> None:
    first = True
    for item in value.items:
        out((b"[\n    " if first else b",\n    ") + _dumps(item).replace("\n", "\n    ").encode())
        first = False
    out(b"[]" if first else b"\n  ]")


def _key(name: str, n: int) -> bytes:
    return (",\n  " if n else "  ").encode() + _dumps(name).encode() + b": "


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _path(entry: dict[str, Any]) -> str:
    path: str = entry["path"]
    return path


def _entry(session: SessionRow, f: FileRow) -> dict[str, Any]:
    status = MANIFEST_STATUS[f.state]
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
    return entry


def _skipped(s: SkippedRow) -> dict[str, Any]:
    return {"path": s.path, "reason": s.reason, **_raw(s.raw_path)}


def _abandoned(f: FileRow) -> dict[str, Any]:
    return {"path": f.path, "reason": "camera_undocked_before_copy", **_raw(f.raw_path)}


def outcome(states: Collection[FileState]) -> str:
    if FileState.ABANDONED in states:
        return "interrupted"
    if set(states) & {FileState.FAILED, FileState.UNSTABLE}:
        return "offloaded_with_errors"
    return "complete"


def _z(at: str | None) -> str | None:
    """Journal times carry microseconds for ordering; the manifest shows whole seconds."""
    return None if at is None else at[:19] + "Z"
