"""The seal as dockd built it before it was streamed: every object of a session in memory.

A frozen copy of `_session_objects` (dockd.upload.worker) and the builders it used
(`mhl.history`, `manifest.build`, `sums.render`) as of commit c41bd8c, before `dockd.evidence.seal`,
kept as the oracle the streamed seal is held byte-identical to: a session sealed by an older
dockd may be rebuilt by a newer one after a restart, and the store refuses other bytes under a
key it holds. Do not "fix" anything here; it is what was written into stores. The one output
that differs by design is the signature (`dockd-ed25519` over the raw manifest here), which
the tests compare by verifying it, not by its bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import xxhash

from dockd import __version__
from dockd.custody import CustodyRecord, SliceSummary, canonical, summarize
from dockd.evidence import keys
from dockd.evidence.keys import ASCMHL, MANIFEST, file_key
from dockd.evidence.signing import DockKey
from dockd.ids import rfc3339_from_ns
from dockd.journal import Journal
from dockd.journal.rows import FileRow, SessionRow, SkippedRow
from dockd.journal.states import MANIFEST_STATUS, FileState

FORMAT = "dockd.manifest/1"
SIGNATURE = "manifest.json.sig"

CHAIN = f"{ASCMHL}/ascmhl_chain.xml"
TOOL = "dockd"
HASH_FORMAT = "xxh128"
FILES = "files"
# The reference implementation's defaults, then what is written after the history. Patterns
# without a slash match a name at any depth: the only form its verify honours, as it matches
# patterns against absolute paths. So a camera file named like one of these is not in the MHL
# (SHA256SUMS and the manifest still cover it).
IGNORE_PATTERNS = (".DS_Store", "ascmhl", "ascmhl/", MANIFEST, SIGNATURE)
_IGNORED_NAMES = frozenset(p.rstrip("/") for p in IGNORE_PATTERNS)

_C4_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    xxh128: str
    mtime: str | None = None
    hashdate: str | None = None


def sums_line(sha256: str, path: str) -> str:
    if any(c in path for c in "\\\n\r"):
        escaped = path.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{sha256}  {escaped}\n"
    return f"{sha256}  {path}\n"


def sums_render(entries: Iterable[tuple[str, str]]) -> bytes:
    return "".join(sums_line(h, p) for h, p in sorted(entries, key=lambda e: e[1])).encode()


def sign_raw(key: DockKey, data: bytes) -> bytes:
    """The signature line as dockd wrote it before the prehashed scheme."""
    sig = base64.b64encode(key.private.sign(data)).decode()
    return f"dockd-ed25519 {key.key_id} {sig}\n".encode()


@dataclass
class _Dir:
    dirs: dict[str, _Dir] = field(default_factory=dict)
    files: dict[str, Entry] = field(default_factory=dict)


def history(
    session: SessionRow,
    dock_id: str,
    files: Sequence[FileRow],
    sidecars: Sequence[tuple[str, bytes]],
    records: Sequence[CustodyRecord],
) -> list[tuple[str, bytes]]:
    """The history's objects, (name relative to the session root, bytes), the hash list first.

    `files` are the session's files in the store; `sidecars` the objects written beside
    `files/` (SHA256SUMS, custody.jsonl); `records` the session's custody slice. Empty when a
    file has no xxh128 (offloaded by a dockd that did not compute it): a history leaving out
    files would read as "new file" to every verifier, and the footage is not read again.
    """
    if any(f.xxh128 is None for f in files):
        return []
    sealed = session.sealed_at or session.uploaded_at or session.docked_at
    copied = _copy_times(records)
    entries = [
        Entry(
            f"{FILES}/{f.path}",
            f.size,
            f.xxh128 or "",
            _mtime(f.mtime_ns),
            copied.get(f.path),
        )
        for f in files
    ]
    entries += [
        Entry(name, len(body), xxh128(body), _seconds(sealed), sealed) for name, body in sidecars
    ]
    name = hash_list_name(session.id, sealed)
    version = next(
        (
            str(r.details["dockd_version"])
            for r in records
            if r.event == "sealed" and "dockd_version" in r.details
        ),
        __version__,
    )
    body = hash_list(
        entries,
        created=_seconds(sealed),
        hostname=dock_id,
        tool_version=version,
        comment=f"dockd offload of camera {session.camera}, session {session.id}, dock {dock_id}",
    )
    return [(name, body), (CHAIN, chain([(name, body)]))]


def hash_list_name(session_id: str, sealed: str) -> str:
    """`ascmhl/0001_<folder>_<date>Z.mhl`: the reference implementation's naming, with the
    session folder's name and its sealing time (UTC) instead of now()."""
    at = datetime.fromisoformat(sealed.replace("Z", "+00:00")).astimezone(UTC)
    return f"{ASCMHL}/0001_{session_id}_{at.strftime('%Y-%m-%d_%H%M%S')}Z.mhl"


def hash_list(
    entries: Iterable[Entry],
    *,
    created: str,
    hostname: str,
    comment: str | None = None,
    process: str = "transfer",
    tool_version: str = __version__,
) -> bytes:
    """The bytes of one generation (`<hashlist version="2.0">`), deterministic."""
    root = _tree(entries)
    body: list[str] = []
    root_content, root_structure = _emit(root, "", body)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<hashlist version="2.0" xmlns="urn:ASC:MHL:v2.0">',
        "  <creatorinfo>",
        f"    <creationdate>{_text(created)}</creationdate>",
        f"    <hostname>{_text(hostname)}</hostname>",
        f'    <tool version="{_attr(tool_version)}">{TOOL}</tool>',
    ]
    if comment:
        out.append(f"    <comment>{_text(comment)}</comment>")
    out += [
        "  </creatorinfo>",
        "  <processinfo>",
        f"    <process>{process}</process>",
        "    <roothash>",
        *_dir_hashes(root_content, root_structure, "      "),
        "    </roothash>",
        "    <ignore>",
        *(f"      <pattern>{_text(p)}</pattern>" for p in IGNORE_PATTERNS),
        "    </ignore>",
        "  </processinfo>",
        "  <hashes>",
        *body,
        "  </hashes>",
        "</hashlist>",
    ]
    return ("\n".join(out) + "\n").encode("utf-8")


def chain(generations: Sequence[tuple[str, bytes]]) -> bytes:
    """`ascmhl_chain.xml`: each generation's file name and C4 id, in order."""
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<ascmhldirectory xmlns="urn:ASC:MHL:DIRECTORY:v2.0">',
    ]
    for n, (name, body) in enumerate(generations, start=1):
        out += [
            f'  <hashlist sequencenr="{n}">',
            f"    <path>{_text(name.rpartition('/')[2])}</path>",
            f"    <c4>{c4(body)}</c4>",
            "  </hashlist>",
        ]
    out.append("</ascmhldirectory>")
    return ("\n".join(out) + "\n").encode("utf-8")


def xxh128(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def c4(data: bytes) -> str:
    """The C4 id (SMPTE ST 2114) of `data`: SHA-512 in base 58, 90 characters, "c4" first."""
    n = int.from_bytes(hashlib.sha512(data).digest(), "big")
    digits = ""
    while n:
        n, r = divmod(n, 58)
        digits = _C4_ALPHABET[r] + digits
    return "c4" + digits.rjust(88, "1")


def representable(text: str) -> bool:
    """True if XML 1.0 can carry `text` (it has no place for most control characters)."""
    return all(
        c in "\t\n\r" or "\x20" <= c <= "\ud7ff" or "\ue000" <= c <= "\ufffd" or c >= "\U00010000"
        for c in text
    )


def ignored(path: str) -> bool:
    """True if the reference implementation's verify skips `path` (relative to the root)."""
    return any(part in _IGNORED_NAMES for part in path.split("/"))


# --- directory hashes, as ascmhl.hasher.DirectoryHashContext computes them ---------------------


def _hash_of_hashes(hashes: list[str]) -> str:
    h = xxhash.xxh3_128()
    for s in sorted(hashes):
        h.update(binascii.unhexlify(s))
    return h.hexdigest()


def _structure(name: str, digest: str) -> str:
    return xxh128(name.encode("utf-8") + binascii.unhexlify(digest))


def _tree(entries: Iterable[Entry]) -> _Dir:
    """The folder as the reference verify walks it: ignored names (and all below) left out,
    but a folder holding only ignored files is still there."""
    root = _Dir()
    for e in entries:
        *dirs, name = e.path.split("/")
        d = root
        for part in dirs:
            if part in _IGNORED_NAMES:
                break
            d = d.dirs.setdefault(part, _Dir())
        else:
            if name not in _IGNORED_NAMES:
                d.files[name] = e
    return root


def _emit(d: _Dir, prefix: str, out: list[str]) -> tuple[str, str]:
    """Append the `<hash>`/`<directoryhash>` elements below `d` in the reference's order
    (post-order, by name: sub-folders, then the folder's files, then the folder itself);
    returns d's (content, structure) hashes."""
    content: list[str] = []
    structure: list[str] = []
    for name in sorted(d.dirs):
        path = prefix + name
        c, s = _emit(d.dirs[name], path + "/", out)
        content.append(c)
        structure.append(_structure(name, s))
        if representable(path):
            out += [
                "    <directoryhash>",
                f"      <path>{_text(path)}</path>",
                *_dir_hashes(c, s, "      "),
                "    </directoryhash>",
            ]
    for name in sorted(d.files):
        e = d.files[name]
        content.append(e.xxh128)
        structure.append(_structure(name, e.xxh128))
        if representable(e.path):
            out += _file_hash(e)
    return _hash_of_hashes(content), _hash_of_hashes(structure)


def _file_hash(e: Entry) -> list[str]:
    attrs = f' size="{e.size}"'
    if e.mtime:
        attrs += f' lastmodificationdate="{_attr(e.mtime)}"'
    hashdate = f' hashdate="{_attr(e.hashdate)}"' if e.hashdate else ""
    return [
        "    <hash>",
        f"      <path{attrs}>{_text(e.path)}</path>",
        f'      <{HASH_FORMAT} action="original"{hashdate}>{e.xxh128}</{HASH_FORMAT}>',
        "    </hash>",
    ]


def _dir_hashes(content: str, structure: str, indent: str) -> list[str]:
    return [
        f"{indent}<content>",
        f"{indent}  <{HASH_FORMAT}>{content}</{HASH_FORMAT}>",
        f"{indent}</content>",
        f"{indent}<structure>",
        f"{indent}  <{HASH_FORMAT}>{structure}</{HASH_FORMAT}>",
        f"{indent}</structure>",
    ]


# --- values -------------------------------------------------------------------------------------


def _copy_times(records: Sequence[CustodyRecord]) -> Mapping[str, str]:
    """Path -> when its copy (and so its xxh128) was made, from `file_offloaded` records."""
    out: dict[str, str] = {}
    for r in records:
        if r.event == "file_offloaded":
            path, at = r.details.get("path"), r.details.get("at")
            if isinstance(path, str) and isinstance(at, str):
                out[path] = at
    return out


def _mtime(ns: int) -> str | None:
    try:
        return rfc3339_from_ns(ns)
    except (ValueError, OverflowError, OSError):  # a camera clock far off: no date at all
        return None


def _seconds(at: str) -> str:
    """Journal times carry microseconds; the hash list's own dates show whole seconds."""
    return at[:19] + "Z"


def _text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _attr(s: str) -> str:
    return _text(s).replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")


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


def _session_objects(
    j: Journal, session: SessionRow, dock_id: str, key: DockKey | None = None
) -> list[tuple[str, bytes]]:
    """The sidecars, signature and manifest of a sealed session, rebuilt byte-identically every
    time (Ed25519 signatures are deterministic, so a restart re-signs to the same bytes): the
    ASC MHL history comes from the journal (xxh128 of each file, sealing time), not from now()."""
    files = j.session_files(session.id)
    stored = [f for f in files if f.state in (FileState.STORED, FileState.CLEARED)]
    sums_body = sums_render((f.sha256 or "", f.path) for f in stored)
    records = [
        r
        for r in j.custody_records(session.id)
        if session.custody_last_seq is None or r.seq <= session.custody_last_seq
    ]
    custody_body = "".join(_custody_line(r) for r in records).encode()
    sidecars = [(keys.SUMS, sums_body), (keys.CUSTODY, custody_body)]
    sidecars += history(session, dock_id, stored, sidecars, records)
    m = build(
        session=session,
        dock_id=dock_id,
        files=files,
        skipped=j.session_skipped(session.id),
        sidecars=[(n, len(b), hashlib.sha256(b).hexdigest()) for n, b in sidecars],
        custody=summarize(records),
        key_id=None if key is None else key.key_id,
    )
    body = dumps(m)
    signed = [] if key is None else [(SIGNATURE, sign_raw(key, body))]
    return [*sidecars, *signed, (keys.MANIFEST, body)]


_RECORD_FIELDS = tuple(f.name for f in fields(CustodyRecord))


def _custody_line(r: CustodyRecord) -> str:
    """`r.to_json()` and a newline, byte for byte, without `dataclasses.asdict`'s deep copy of
    every record (most of the time of a seal of thousands of files): the same fields, the same
    canonical JSON."""
    return canonical({name: getattr(r, name) for name in _RECORD_FIELDS}) + "\n"
