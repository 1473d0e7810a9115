"""The custody hash chain (SPEC §6): how a record is hashed, appended and checked.

One chain per dock: each record holds the hash of the record before it (`prev_hash`). A session's
records also link to each other (`session_prev`: the hash of the session's previous record, None
for its first), so the slice of one session — `custody.jsonl` in the store — is checkable on its
own, without the records of other cameras that were docked at the same time.

A record's hash is SHA-256 over its canonical JSON (sorted keys, no spaces, UTF-8) without `hash`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from json.encoder import encode_basestring
from typing import Any

from dockd.errors import CustodyError

GENESIS = "0" * 64


@dataclass(frozen=True)
class CustodyRecord:
    seq: int
    at: str
    dock_id: str
    session_id: str | None
    event: str
    details: Mapping[str, Any]
    prev_hash: str
    session_prev: str | None
    hash: str

    def to_json(self) -> str:
        return canonical(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> CustodyRecord:
        try:
            data = json.loads(line)
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise CustodyError(f"custody record is not readable: {exc}") from None


def canonical(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_details(details: Mapping[str, Any]) -> str:
    """A record's details as stored and hashed: canonical JSON, a value JSON has no type for
    (a path, a datetime) written as its str. Keys are the caller's strings."""
    return json.dumps(
        dict(details), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )


def record_hash(
    *,
    seq: int,
    at: str,
    dock_id: str,
    session_id: str | None,
    event: str,
    details: Mapping[str, Any],
    prev_hash: str,
    session_prev: str | None,
) -> str:
    return hash_with_details_json(
        seq=seq,
        at=at,
        dock_id=dock_id,
        session_id=session_id,
        event=event,
        details_json=canonical(details),
        prev_hash=prev_hash,
        session_prev=session_prev,
    )


def hash_with_details_json(
    *,
    seq: int,
    at: str,
    dock_id: str,
    session_id: str | None,
    event: str,
    details_json: str,
    prev_hash: str,
    session_prev: str | None,
) -> str:
    """`record_hash` with the details already in canonical JSON: the journal serializes each
    record's details once and hashes and stores that same text. The body is the canonical JSON
    of the record without `hash`, written out in its sorted key order (tests hold it equal to
    `canonical` of the dict)."""
    body = (
        f'{{"at":{_str(at)},"details":{details_json},"dock_id":{_str(dock_id)},'
        f'"event":{_str(event)},"prev_hash":{_str(prev_hash)},"seq":{int(seq)},'
        f'"session_id":{_opt(session_id)},"session_prev":{_opt(session_prev)}}}'
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _str(value: str) -> str:
    out: str = encode_basestring(value)  # json.dumps(value, ensure_ascii=False), without the call
    return out


def _opt(value: str | None) -> str:
    return "null" if value is None else _str(value)


def _own_hash_ok(r: CustodyRecord) -> bool:
    expected = record_hash(
        seq=r.seq,
        at=r.at,
        dock_id=r.dock_id,
        session_id=r.session_id,
        event=r.event,
        details=r.details,
        prev_hash=r.prev_hash,
        session_prev=r.session_prev,
    )
    return hmac.compare_digest(expected, r.hash)


def check_chain(records: Iterable[CustodyRecord]) -> int:
    """Check the whole dock chain from its first record. Returns the record count.

    Raises CustodyError naming the first record that does not hold.
    """
    prev = GENESIS
    expected_seq = 1
    count = 0
    for r in records:
        if r.seq != expected_seq:
            raise CustodyError(f"custody record {expected_seq} is missing (found seq {r.seq})")
        if not _own_hash_ok(r):
            raise CustodyError(f"custody record {r.seq} was altered: its hash does not match")
        if r.prev_hash != prev:
            raise CustodyError(f"custody record {r.seq} does not link to record {r.seq - 1}")
        prev = r.hash
        expected_seq += 1
        count += 1
    return count


@dataclass(frozen=True)
class SliceSummary:
    """What a manifest says of its session's records (`custody` in SPEC §6)."""

    first_seq: int
    last_seq: int
    prev_hash: str
    head: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(records: list[CustodyRecord]) -> SliceSummary:
    if not records:
        raise CustodyError("a session has no custody records")
    return SliceSummary(records[0].seq, records[-1].seq, records[0].prev_hash, records[-1].hash)


def check_slice(
    records: list[CustodyRecord], session_id: str, expected: SliceSummary | None = None
) -> SliceSummary:
    """Check one session's records on their own, and against the manifest's summary if given."""
    if not records:
        raise CustodyError(f"session {session_id}: no custody records")
    session_prev: str | None = None
    last_seq = 0
    for r in records:
        if r.session_id != session_id:
            raise CustodyError(f"custody record {r.seq} belongs to session {r.session_id}")
        if r.seq <= last_seq:
            raise CustodyError(f"custody record {r.seq} is out of order")
        if not _own_hash_ok(r):
            raise CustodyError(f"custody record {r.seq} was altered: its hash does not match")
        if r.session_prev != session_prev:
            raise CustodyError(
                f"custody record {r.seq} does not link to the session's previous record"
            )
        session_prev = r.hash
        last_seq = r.seq
    found = summarize(records)
    if expected is not None and found != expected:
        raise CustodyError(
            f"session {session_id}: custody records do not match the manifest "
            f"(manifest {expected.first_seq}..{expected.last_seq} head {expected.head[:12]}, "
            f"records {found.first_seq}..{found.last_seq} head {found.head[:12]})"
        )
    return found
