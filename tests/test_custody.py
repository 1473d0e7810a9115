"""The custody hash chain (SPEC §6), on records appended through a real journal on disk.

Tampering is done the way an attacker with the database file would: a second, raw sqlite3
connection to the same file, dropping the append-only triggers first.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockd.custody import (
    GENESIS,
    CustodyRecord,
    SliceSummary,
    check_chain,
    check_slice,
    record_hash,
    summarize,
)
from dockd.errors import CustodyError
from dockd.ids import CameraId, SessionId
from dockd.journal import Journal

DOCK = "dock-a"


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal.open(tmp_path / "state" / "journal.sqlite3", DOCK)
    yield j
    j.close()


def _session(j: Journal, camera: str) -> SessionId:
    s, _ = j.open_session(CameraId(camera), "2a2b", "0001", None, f"/srv/dock/{camera}")
    return s.id


def _raw(j: Journal) -> sqlite3.Connection:
    """A second connection to the journal file, in autocommit mode."""
    return sqlite3.connect(j.path, isolation_level=None)


def _drop_triggers(conn: sqlite3.Connection) -> None:
    conn.execute("DROP TRIGGER custody_no_update")
    conn.execute("DROP TRIGGER custody_no_delete")


def _dock_chain(j: Journal) -> list[CustodyRecord]:
    """Six records: a dock event, a session's docking and four file events."""
    j.custody_event("daemon_started", None, version="test", pid=1)
    sid = _session(j, "CAM01")
    for n in range(1, 5):
        j.custody_event("note", sid, n=n, path=f"DCIM/{n:04}.MP4")
    records = list(j.custody_records())
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    return records


def _error(records: list[CustodyRecord]) -> str:
    with pytest.raises(CustodyError) as info:
        check_chain(records)
    return str(info.value)


# --- the chain as written ----------------------------------------------------------------------


def test_custody_chain_appended_through_the_journal_checks_from_genesis(journal: Journal) -> None:
    records = _dock_chain(journal)

    assert check_chain(records) == 6
    assert records[0].prev_hash == GENESIS
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    assert all(r.dock_id == DOCK for r in records)


def test_custody_record_hash_is_sha256_of_canonical_json_without_the_hash(
    journal: Journal,
) -> None:
    r = _dock_chain(journal)[2]
    body = {k: v for k, v in dataclasses.asdict(r).items() if k != "hash"}

    assert r.hash == record_hash(**body)
    assert re.fullmatch(r"[0-9a-f]{64}", r.hash)


def test_custody_records_survive_a_jsonl_round_trip_and_still_check(journal: Journal) -> None:
    records = _dock_chain(journal)
    lines = [r.to_json() for r in records]

    assert check_chain([CustodyRecord.from_json(line) for line in lines]) == 6
    assert all(json.loads(line)["hash"] == r.hash for line, r in zip(lines, records, strict=True))


def test_custody_chain_survives_closing_and_reopening_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    j = Journal.open(path, DOCK)
    _dock_chain(j)
    j.close()
    j = Journal.open(path, DOCK)
    try:
        j.custody_event("daemon_started", None, version="test", pid=2)
        assert check_chain(j.custody_records()) == 7
    finally:
        j.close()


def test_custody_unreadable_jsonl_line_is_a_custody_error() -> None:
    with pytest.raises(CustodyError, match="not readable"):
        CustodyRecord.from_json('{"seq": 1')
    with pytest.raises(CustodyError, match="not readable"):
        CustodyRecord.from_json('{"seq": 1, "extra": true}')


def test_custody_empty_chain_checks_as_zero_records() -> None:
    assert check_chain([]) == 0


# --- the database refuses edits ----------------------------------------------------------------


def test_custody_update_is_refused_by_the_database_while_its_triggers_stand(
    journal: Journal,
) -> None:
    _dock_chain(journal)
    conn = _raw(journal)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE custody SET details = '{}' WHERE seq = 3")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM custody WHERE seq = 3")
    finally:
        conn.close()

    assert check_chain(journal.custody_records()) == 6


# --- tampering found, naming the record --------------------------------------------------------


def test_custody_record_edited_in_journal_breaks_the_chain_at_that_record(
    journal: Journal,
) -> None:
    _dock_chain(journal)
    conn = _raw(journal)
    try:
        _drop_triggers(conn)
        conn.execute(
            "UPDATE custody SET details = ? WHERE seq = 4",
            (json.dumps({"n": 2, "path": "DCIM/9999.MP4"}),),
        )
    finally:
        conn.close()

    assert _error(list(journal.custody_records())) == (
        "custody record 4 was altered: its hash does not match"
    )


def test_custody_record_edited_and_rehashed_breaks_the_link_of_the_next_record(
    journal: Journal,
) -> None:
    records = _dock_chain(journal)
    forged = dataclasses.replace(records[3], details={"n": 2, "path": "DCIM/9999.MP4"})
    body = {k: v for k, v in dataclasses.asdict(forged).items() if k != "hash"}
    new_hash = record_hash(**body)
    conn = _raw(journal)
    try:
        _drop_triggers(conn)
        conn.execute(
            "UPDATE custody SET details = ?, hash = ? WHERE seq = 4",
            (json.dumps(forged.details, sort_keys=True), new_hash),
        )
    finally:
        conn.close()

    assert _error(list(journal.custody_records())) == ("custody record 5 does not link to record 4")


def test_custody_record_deleted_from_journal_is_named_missing(journal: Journal) -> None:
    _dock_chain(journal)
    conn = _raw(journal)
    try:
        _drop_triggers(conn)
        conn.execute("DELETE FROM custody WHERE seq = 3")
    finally:
        conn.close()

    assert _error(list(journal.custody_records())) == ("custody record 3 is missing (found seq 4)")


def test_custody_last_record_deleted_is_not_visible_to_the_chain_alone(journal: Journal) -> None:
    """Truncating the tail leaves a valid shorter chain: only a manifest's head can tell."""
    records = _dock_chain(journal)
    conn = _raw(journal)
    try:
        _drop_triggers(conn)
        conn.execute("DELETE FROM custody WHERE seq = 6")
    finally:
        conn.close()

    assert check_chain(journal.custody_records()) == 5
    sid = records[1].session_id
    assert sid is not None
    with pytest.raises(CustodyError, match="do not match the manifest"):
        check_slice(list(journal.custody_records(sid)), sid, summarize(records[1:]))


def test_custody_records_reordered_in_the_journal_are_named(journal: Journal) -> None:
    _dock_chain(journal)
    conn = _raw(journal)
    try:
        _drop_triggers(conn)
        # swap records 3 and 4 (hash is UNIQUE, seq the key: via a free seq)
        conn.execute("BEGIN")
        conn.execute("UPDATE custody SET seq = -1 WHERE seq = 3")
        conn.execute("UPDATE custody SET seq = 3 WHERE seq = 4")
        conn.execute("UPDATE custody SET seq = 4 WHERE seq = -1")
        conn.execute("COMMIT")
    finally:
        conn.close()

    assert _error(list(journal.custody_records())) == (
        "custody record 3 was altered: its hash does not match"
    )


def test_custody_records_given_out_of_order_are_named_missing(journal: Journal) -> None:
    r = _dock_chain(journal)

    assert _error([r[0], r[1], r[3], r[2], r[4], r[5]]) == (
        "custody record 3 is missing (found seq 4)"
    )


def test_custody_chain_not_starting_at_genesis_is_refused(journal: Journal) -> None:
    r = _dock_chain(journal)

    assert _error(r[1:]) == "custody record 1 is missing (found seq 2)"


def test_custody_record_from_another_chain_does_not_link(tmp_path: Path) -> None:
    a = Journal.open(tmp_path / "a.sqlite3", DOCK)
    b = Journal.open(tmp_path / "b.sqlite3", DOCK)
    try:
        ra, rb = _dock_chain(a), _dock_chain(b)
    finally:
        a.close()
        b.close()

    # same seq, own hash right, but its prev_hash is the other chain's
    assert _error([*ra[:3], rb[3], *ra[4:]]) == "custody record 4 does not link to record 3"


# --- one session's slice -----------------------------------------------------------------------


@pytest.fixture
def two_sessions(journal: Journal) -> tuple[SessionId, SessionId]:
    """Two cameras docked at once, their records interleaved in the one dock chain."""
    a = _session(journal, "CAM-A")
    b = _session(journal, "CAM-B")
    for n in range(1, 4):
        journal.custody_event("note", a, n=n)
        journal.custody_event("note", None, n=n)  # a dock event between them
        journal.custody_event("note", b, n=n)
    return a, b


def test_custody_slice_of_interleaved_sessions_checks_on_its_own(
    journal: Journal, two_sessions: tuple[SessionId, SessionId]
) -> None:
    a, b = two_sessions
    ra = list(journal.custody_records(a))
    rb = list(journal.custody_records(b))

    assert [r.seq for r in ra] == [1, 3, 6, 9]
    assert [r.seq for r in rb] == [2, 5, 8, 11]
    summary_a = check_slice(ra, a)
    summary_b = check_slice(rb, b)
    assert summary_a == SliceSummary(1, 9, GENESIS, ra[-1].hash)
    assert summary_b == SliceSummary(2, 11, ra[0].hash, rb[-1].hash)
    assert check_slice(ra, a, summary_a) == summary_a
    assert check_chain(journal.custody_records()) == 11
    # a slice's first record has no session predecessor; each later one links to the previous
    assert ra[0].session_prev is None
    assert [r.session_prev for r in ra[1:]] == [r.hash for r in ra[:-1]]


def test_custody_slice_against_another_sessions_summary_fails(
    journal: Journal, two_sessions: tuple[SessionId, SessionId]
) -> None:
    a, b = two_sessions
    ra = list(journal.custody_records(a))
    summary_b = summarize(list(journal.custody_records(b)))

    with pytest.raises(CustodyError, match=f"session {a}: custody records do not match"):
        check_slice(ra, a, summary_b)


@pytest.mark.parametrize("field", ["first_seq", "last_seq", "prev_hash", "head"])
def test_custody_slice_against_a_wrong_manifest_summary_fails(
    journal: Journal, two_sessions: tuple[SessionId, SessionId], field: str
) -> None:
    a, _ = two_sessions
    ra = list(journal.custody_records(a))
    right = summarize(ra)
    wrong_value: Any = getattr(right, field) + 1 if field.endswith("seq") else "f" * 64
    wrong = dataclasses.replace(right, **{field: wrong_value})

    with pytest.raises(CustodyError, match="do not match the manifest"):
        check_slice(ra, a, wrong)


def test_custody_slice_holding_another_sessions_record_names_it(
    journal: Journal, two_sessions: tuple[SessionId, SessionId]
) -> None:
    a, b = two_sessions
    mixed = sorted(
        [*journal.custody_records(a), next(iter(journal.custody_records(b)))],
        key=lambda r: r.seq,
    )

    with pytest.raises(CustodyError, match=f"custody record 2 belongs to session {b}"):
        check_slice(mixed, a)


def test_custody_slice_missing_a_middle_record_does_not_link(
    journal: Journal, two_sessions: tuple[SessionId, SessionId]
) -> None:
    a, _ = two_sessions
    ra = list(journal.custody_records(a))
    del ra[1]  # seq 3

    with pytest.raises(
        CustodyError, match="custody record 6 does not link to the session's previous record"
    ):
        check_slice(ra, a)


def test_custody_slice_out_of_order_is_refused(
    journal: Journal, two_sessions: tuple[SessionId, SessionId]
) -> None:
    a, _ = two_sessions
    ra = list(journal.custody_records(a))
    ra[1], ra[2] = ra[2], ra[1]  # seq 1, 6, 3, 9

    with pytest.raises(
        CustodyError, match="custody record 6 does not link to the session's previous record"
    ):
        check_slice(ra, a)


def test_custody_slice_with_a_record_repeated_is_out_of_order(
    journal: Journal, two_sessions: tuple[SessionId, SessionId]
) -> None:
    a, _ = two_sessions
    ra = list(journal.custody_records(a))
    ra.insert(2, ra[1])  # seq 1, 3, 3, 6, 9

    with pytest.raises(CustodyError, match="custody record 3 is out of order"):
        check_slice(ra, a)


def test_custody_slice_with_an_edited_record_names_it(
    journal: Journal, two_sessions: tuple[SessionId, SessionId]
) -> None:
    a, _ = two_sessions
    ra = list(journal.custody_records(a))
    ra[2] = dataclasses.replace(ra[2], details={"n": 99})

    with pytest.raises(CustodyError, match="custody record 6 was altered"):
        check_slice(ra, a)


def test_custody_empty_slice_is_refused(journal: Journal) -> None:
    with pytest.raises(CustodyError, match="no custody records"):
        check_slice([], "nothing")
    with pytest.raises(CustodyError, match="no custody records"):
        summarize([])


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        'quote " and backslash \\ and slash /',
        "controls \x00\x01\x1f\t\n\r and DEL \x7f",
        "non-ASCII: Ärztin 警察 🚓",
        "line separators \u2028\u2029",
    ],
)
def test_record_hash_written_out_in_key_order_equals_the_hash_of_the_canonical_dict(
    text: str,
) -> None:
    # The journal hashes a body it writes out field by field (one serialization per record);
    # `dockd verify` and any third party hash canonical JSON of the dict. Both must agree.
    import hashlib

    from dockd.custody import canonical

    for session_id, session_prev in [(text, "ab" * 32), (None, None)]:
        body = {
            "seq": 12345678901,
            "at": text,
            "dock_id": text,
            "session_id": session_id,
            "event": text,
            "details": {"path": text, "size": 3, "nested": {"z": [1, None, 2.5], "a": text}},
            "prev_hash": "cd" * 32,
            "session_prev": session_prev,
        }
        want = hashlib.sha256(canonical(body).encode("utf-8")).hexdigest()
        assert record_hash(**body) == want  # type: ignore[arg-type]
