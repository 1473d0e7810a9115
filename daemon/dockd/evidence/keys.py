"""Store keys of a session (SPEC §6), relative to the store root."""

from __future__ import annotations

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
CUSTODY = "custody.jsonl"
ASCMHL = "ascmhl"  # folder of the ASC MHL history: `ascmhl/*.mhl`, `ascmhl/ascmhl_chain.xml`


def session_prefix(camera: str, session_id: str) -> str:
    return f"{camera}/{session_id}"


def file_key(camera: str, session_id: str, path: str) -> str:
    return f"{camera}/{session_id}/files/{path}"


def sidecar_key(camera: str, session_id: str, name: str) -> str:
    return f"{camera}/{session_id}/{name}"
