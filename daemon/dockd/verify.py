"""`dockd verify`: re-read evidence from the store and check it against the manifests.

Works from the store alone: sessions are found by their manifests, every object is re-read
and hashed, the custody slice in `custody.jsonl` is checked on its own and against the
manifest, and the ASC MHL history (`ascmhl/`) must be listed, intact and consistent with its
chain file. When this dock's journal is at hand, its whole custody chain is checked too, and each
session's records in the store must be the journal's own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dockd.custody import CustodyRecord, SliceSummary, check_chain, check_slice
from dockd.errors import CustodyError, JournalError, StoreError
from dockd.evidence import keys, mhl, sums
from dockd.evidence.manifest import FORMAT, SIGNATURE
from dockd.evidence.signing import TrustedKey, check_signature
from dockd.journal.db import Db
from dockd.store.base import Store

CHUNK = 4 * 1024 * 1024


@dataclass
class SessionReport:
    session_id: str
    camera: str = ""
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    signature: str = "not checked"  # ok | not checked | BAD
    chain: str = "not checked"  # ok | BAD
    ascmhl: str = "not checked"  # ok | missing | BAD

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "camera": self.camera,
            "files": self.files,
            "bytes": self.bytes,
            "signature": self.signature,
            "chain": self.chain,
            "ascmhl": self.ascmhl,
            "result": "ok" if self.ok else "FAILED",
            "problems": self.problems,
        }


def manifest_key_for(session_id: str) -> str:
    """`<camera>/<session_id>/manifest.json`: the camera is the middle of the session id."""
    head, _, _suffix = session_id.rpartition("-")
    _stamp, _, camera = head.partition("-")
    if not camera:
        raise StoreError(f"{session_id!r}: not a session id")
    return keys.sidecar_key(camera, session_id, keys.MANIFEST)


def _hash_object(store: Store, key: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with store.open(key) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _read(store: Store, key: str) -> bytes:
    with store.open(key) as f:
        return f.read()


def verify_session(
    store: Store,
    manifest_key: str,
    journal: Db | None = None,
    trusted: dict[str, TrustedKey] | None = None,
) -> SessionReport:
    session_id = manifest_key.split("/")[-2] if "/" in manifest_key else manifest_key
    report = SessionReport(session_id)
    try:
        raw = _read(store, manifest_key)
    except StoreError as exc:
        report.problems.append(f"manifest missing: {exc}")
        return report
    try:
        m = json.loads(raw)
    except ValueError as exc:
        report.problems.append(f"manifest is not JSON: {exc}")
        return report
    try:
        _check_manifest(store, m, manifest_key, report, journal)
        if trusted is not None:
            _check_signature(store, raw, m, manifest_key, report, trusted)
        return report
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        # an altered manifest is a finding to report, not a crash that stops the whole run
        report.problems.append(f"manifest is malformed: {type(exc).__name__}: {exc}")
        return report


def _check_manifest(
    store: Store, m: Any, manifest_key: str, report: SessionReport, journal: Db | None
) -> SessionReport:
    session_id = report.session_id
    if m.get("format") != FORMAT:
        report.problems.append(f"manifest format {m.get('format')!r}, expected {FORMAT!r}")
        return report
    report.camera = m["camera"]["id"]
    prefix = manifest_key.rsplit("/", 1)[0]
    if m.get("session_id") != session_id or prefix != keys.session_prefix(
        report.camera, session_id
    ):
        report.problems.append(
            f"manifest names session {m.get('session_id')!r} of camera "
            f"{report.camera!r} but sits at {prefix!r}"
        )
    verified = [f for f in m["files"] if f["status"] == "verified"]
    for f in verified:
        report.files += 1
        report.bytes += f["size"]
        expected_key = keys.file_key(report.camera, session_id, f["path"])
        if f["key"] != expected_key:
            # a key pointing elsewhere could make one stored object vouch for another file
            report.problems.append(f"{f['path']}: key {f['key']!r}, expected {expected_key!r}")
        report.problems.extend(_check_object(store, f["key"], f["size"], f["sha256"]))
    if journal is not None:
        recorded = journal.scalar("SELECT manifest_sha256 FROM sessions WHERE id = ?", session_id)
        if recorded is not None:
            got = hashlib.sha256(_read(store, manifest_key)).hexdigest()
            if not hmac.compare_digest(got, recorded):
                report.problems.append("manifest differs from the one this dock wrote (journal)")
    sidecars: dict[str, bytes] = {}
    for sc in m.get("sidecars", []):
        if not _sidecar_name_ok(sc["name"]):
            # a name reaching outside the session could make another object vouch for it
            report.problems.append(f"sidecar {sc['name']!r}: not a session folder object")
            continue
        key = f"{prefix}/{sc['name']}"
        problems = _check_object(store, key, sc["size"], sc["sha256"])
        report.problems.extend(problems)
        if not problems:
            sidecars[sc["name"]] = _read(store, key)
    if keys.SUMS in sidecars:
        expected = sums.render((f["sha256"], f["path"]) for f in verified)
        if sidecars[keys.SUMS] != expected:
            report.problems.append("SHA256SUMS does not list exactly the manifest's files")
    if keys.CUSTODY in sidecars:
        custody_problems = _check_custody(sidecars[keys.CUSTODY], m, session_id, journal)
        report.chain = "BAD" if custody_problems else "ok"
        report.problems.extend(custody_problems)
    elif not any(sc["name"] == keys.CUSTODY for sc in m.get("sidecars", [])):
        report.problems.append("custody.jsonl is not among the manifest's sidecars")
    # else: listed but missing or altered, which _check_object has reported above
    report.ascmhl, mhl_problems = _check_ascmhl(m, sidecars)
    report.problems.extend(mhl_problems)
    return report


def _sidecar_name_ok(name: str) -> bool:
    if name in (keys.SUMS, keys.CUSTODY):
        return True
    folder, _, file = name.partition("/")
    return folder == keys.ASCMHL and file not in ("", ".", "..") and "/" not in file


def _check_ascmhl(m: dict[str, Any], intact: dict[str, bytes]) -> tuple[str, list[str]]:
    """("ok" | "missing" | "BAD", problems): the history is listed (chain and hash lists), and
    the chain names exactly the listed hash lists with their C4 ids. Contents were checked by
    SHA-256 like every sidecar; one missing or altered is reported there, not again here."""
    listed = [
        sc["name"] for sc in m.get("sidecars", []) if sc["name"].startswith(keys.ASCMHL + "/")
    ]
    lists = sorted(n for n in listed if n.endswith(".mhl"))
    if not listed:
        return "missing", ["the ASC MHL history (ascmhl/) is not among the manifest's sidecars"]
    if mhl.CHAIN not in listed or not lists:
        return "BAD", [f"ascmhl/: the manifest lists {sorted(listed)}, not a chain and hash list"]
    if any(n not in intact for n in listed):
        return "BAD", []  # reported as missing or altered
    try:
        root = ET.fromstring(intact[mhl.CHAIN])
        ns = "{urn:ASC:MHL:DIRECTORY:v2.0}"
        named = {
            f"{keys.ASCMHL}/{h.findtext(ns + 'path', '')}": h.findtext(ns + "c4", "")
            for h in root.iter(ns + "hashlist")
        }
    except ET.ParseError as exc:
        return "BAD", [f"{mhl.CHAIN}: not readable XML ({exc})"]
    if sorted(named) != lists:
        return "BAD", [f"{mhl.CHAIN} names {sorted(named)}, the manifest lists {lists}"]
    problems = [
        f"{n}: its C4 id is not the one {mhl.CHAIN} names"
        for n in lists
        if mhl.c4(intact[n]) != named[n]
    ]
    return ("BAD" if problems else "ok"), problems


def _check_object(store: Store, key: str, size: int, sha256: str) -> list[str]:
    try:
        got, n = _hash_object(store, key)
    except StoreError:
        return [f"{key}: missing from the store"]
    except OSError as exc:
        return [f"{key}: unreadable ({exc.strerror})"]
    if n != size:
        return [f"{key}: {n} bytes, manifest says {size}"]
    if not hmac.compare_digest(got, sha256):
        return [f"{key}: content does not match its SHA-256 (altered)"]
    return []


def _check_custody(
    body: bytes, m: dict[str, Any], session_id: str, journal: Db | None
) -> list[str]:
    try:
        # split on "\n" only: str.splitlines() also splits at U+2028/U+2029/U+0085, which a
        # camera file name may hold and JSON (ensure_ascii=False) keeps raw
        records = [CustodyRecord.from_json(line) for line in body.decode().split("\n") if line]
        summary = SliceSummary(**m["custody"])
        check_slice(records, session_id, summary)
    except (CustodyError, TypeError, KeyError, UnicodeDecodeError) as exc:
        return [f"custody: {exc}"]
    if journal is not None:
        mine = {r.seq: r.hash for r in journal.custody_records(session_id)}
        if mine and any(mine.get(r.seq) != r.hash for r in records):
            return ["custody: the store's records differ from this dock's journal"]
    return []


def check_journal_chain(journal: Db) -> list[str]:
    try:
        check_chain(journal.custody_records())
    except CustodyError as exc:
        return [f"journal custody chain: {exc}"]
    except JournalError as exc:
        return [f"journal: {exc}"]
    return []


def _check_signature(
    store: Store,
    raw: bytes,
    m: dict[str, Any],
    manifest_key: str,
    report: SessionReport,
    trusted: dict[str, TrustedKey],
) -> None:
    """The manifest's bytes are signed by a trusted dock: a writer with store access who edits
    the manifest (and re-hashes everything under it) cannot re-sign it."""
    report.signature = "BAD"
    if not m.get("signing"):
        report.problems.append("manifest is not signed")
        return
    sig_key = f"{manifest_key.rsplit('/', 1)[0]}/{SIGNATURE}"
    try:
        sig = _read(store, sig_key)
    except StoreError:
        report.problems.append(f"{sig_key}: signature missing from the store")
        return
    problem = check_signature(raw, sig, trusted)
    if problem is not None:
        if not trusted:
            problem += " (no trusted dock keys: signing.trusted_keys_dir holds none)"
        report.problems.append(problem)
        return
    report.signature = "ok"


def verify(
    store: Store,
    sessions: Iterable[str] = (),
    journal: Db | None = None,
    trusted: dict[str, TrustedKey] | None = None,
) -> Iterator[SessionReport]:
    wanted = list(sessions)
    manifest_keys: Iterable[str] = (
        [manifest_key_for(s) for s in wanted] if wanted else store.manifests()
    )
    for key in manifest_keys:
        yield verify_session(store, key, journal, trusted)
