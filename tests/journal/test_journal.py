"""The journal on a real SQLite file: schema, durability settings, permissions, and the life of
sessions and files as the offload and upload sides write it."""

from __future__ import annotations

import itertools
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockd.custody import check_chain
from dockd.errors import JournalError
from dockd.ids import SESSION_ID_RE, CameraId, SessionId
from dockd.journal import FileRow, FileState, Journal, QueueSummary, SessionRow, SessionState
from dockd.journal.db import Db
from dockd.journal.schema import MIGRATIONS
from dockd.journal.states import (
    FILE_TRANSITIONS,
    SESSION_TRANSITIONS,
    check_file,
    check_session,
)
from dockd.offload.walk import Found, Skipped, encode_path

DOCK = "dock-a"
CAM = CameraId("CAM01")
SHA = "ab" * 32


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite3"


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    j = Journal.open(path, DOCK)
    yield j
    j.close()


def found(rel: str | bytes, size: int = 100, mtime_ns: int = 1_700_000_000_000_000_000) -> Found:
    raw = rel if isinstance(rel, bytes) else rel.encode()
    p, raw_path = encode_path(raw)
    return Found(raw, p, raw_path, size, mtime_ns)


def open_session(j: Journal, camera: CameraId = CAM) -> SessionRow:
    s, _ = j.open_session(camera, "2a2b", "0001", "badge-1", f"/srv/dock/{camera}")
    return s


def files(j: Journal, session_id: str) -> dict[str, FileRow]:
    return {f.path: f for f in j.session_files(session_id)}


def verify_all(j: Journal, session_id: str) -> None:
    j.files_verified(
        (f, SHA, "2026-01-01T00:00:00Z")
        for f in j.session_files(session_id)
        if f.state == FileState.PENDING
    )


def offloaded_session(
    j: Journal, camera: CameraId = CAM, paths: tuple[str, ...] = ("a.MP4", "b.MP4")
) -> SessionRow:
    s = open_session(j, camera)
    j.record_found(s, [found(p) for p in paths])
    verify_all(j, s.id)
    assert j.finish_offload(s.id, interrupted=False) == SessionState.OFFLOADED
    row = j.session(s.id)
    assert row is not None
    return row


def uploaded_session(j: Journal, camera: CameraId = CAM) -> SessionRow:
    s = offloaded_session(j, camera)
    for f in j.session_files(s.id):
        j.file_stored(f, f"{camera}/{s.id}/files/{f.path}", SHA, "readback")
    j.seal(s.id)
    j.session_uploaded(s.id, f"{camera}/{s.id}/manifest.json", SHA)
    row = j.session(s.id)
    assert row is not None and row.state == SessionState.UPLOADED
    return row


def custody_count(j: Journal) -> int:
    n: int = j.scalar("SELECT count(*) FROM custody")
    return n


# --- schema ------------------------------------------------------------------------------------


def test_journal_new_file_is_migrated_to_the_latest_schema_version(
    journal: Journal, path: Path
) -> None:
    assert journal.scalar("PRAGMA user_version") == len(MIGRATIONS)
    tables = {r[0] for r in journal.all("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"cameras", "sessions", "files", "skipped", "custody", "dock"} <= tables
    triggers = {r[0] for r in journal.all("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    assert triggers == {"custody_no_update", "custody_no_delete"}


def test_journal_reopening_is_idempotent_and_keeps_its_rows(path: Path) -> None:
    j = Journal.open(path, DOCK)
    s = open_session(j)
    j.close()

    for _ in range(2):
        j = Journal.open(path, DOCK)
        try:
            assert j.scalar("PRAGMA user_version") == len(MIGRATIONS)
            assert j.session(s.id) == s
            assert check_chain(j.custody_records()) == 1
        finally:
            j.close()


def test_journal_with_a_newer_schema_version_is_refused(path: Path) -> None:
    Journal.open(path, DOCK).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()

    with pytest.raises(JournalError, match="newer than this dockd knows"):
        Journal.open(path, DOCK)
    with pytest.raises(JournalError, match="schema version"):
        Db.open_readonly(path, DOCK)


def test_journal_read_only_open_of_a_missing_journal_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="does not exist"):
        Db.open_readonly(tmp_path / "nothing.sqlite3", DOCK)
    assert not (tmp_path / "nothing.sqlite3").exists()


def test_journal_read_only_connection_cannot_write(journal: Journal, path: Path) -> None:
    open_session(journal)
    ro = Db.open_readonly(path, DOCK)
    try:
        assert check_chain(ro.custody_records()) == 1
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro.conn.execute("DELETE FROM dock")
    finally:
        ro.close()


def test_journal_uses_wal_and_synchronous_full(journal: Journal) -> None:
    assert journal.scalar("PRAGMA journal_mode") == "wal"
    assert journal.scalar("PRAGMA synchronous") == 2  # FULL
    assert journal.scalar("PRAGMA foreign_keys") == 1


def test_journal_files_are_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    path = tmp_path / "state" / "journal.sqlite3"
    old = os.umask(0)
    try:
        j = Journal.open(path, DOCK)
        try:
            open_session(j)  # a write: -wal and -shm exist while the journal is open
            created = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            assert all(p.exists() for p in created)
            assert {p.name: _mode(p) for p in created} == {p.name: 0o600 for p in created}
            assert _mode(path.parent) == 0o700
        finally:
            j.close()
    finally:
        os.umask(old)


def test_journal_nested_transaction_is_refused(journal: Journal) -> None:
    with journal.tx(), pytest.raises(JournalError, match="nested"), journal.tx():
        pass


def test_journal_custody_outside_a_transaction_is_refused(journal: Journal) -> None:
    with pytest.raises(JournalError, match="inside a transaction"):
        journal.custody("note")
    assert custody_count(journal) == 0


def test_journal_failed_write_rolls_back_state_and_custody_together(journal: Journal) -> None:
    s = open_session(journal)
    before = custody_count(journal)

    with pytest.raises(RuntimeError), journal.tx():
        journal.conn.execute("UPDATE sessions SET officer = 'x' WHERE id = ?", (s.id,))
        journal.custody("note", s.id)
        raise RuntimeError("crash mid-transaction")

    assert custody_count(journal) == before
    assert journal.session(s.id) == s


# --- sessions ----------------------------------------------------------------------------------


def test_journal_open_session_creates_then_resumes_the_offloading_session(
    journal: Journal,
) -> None:
    first, resumed = journal.open_session(CAM, "2a2b", "0001", "badge-1", "/srv/dock/CAM01")
    assert not resumed
    assert SESSION_ID_RE.fullmatch(first.id)
    assert first.camera == CAM and first.state == SessionState.OFFLOADING
    assert (first.vendor_id, first.model_id, first.officer) == ("2a2b", "0001", "badge-1")

    again, resumed = journal.open_session(CAM, "2a2b", "0001", "badge-1", "/srv/dock/CAM01")
    assert resumed
    assert again == first
    assert journal.offloading_sessions() == [first]
    docked = [r for r in journal.custody_records(first.id) if r.event == "docked"]
    assert len(docked) == 2 and docked[1].details["resumed"] is True


def test_journal_open_session_after_the_offload_finished_starts_a_new_session(
    journal: Journal,
) -> None:
    first = offloaded_session(journal)
    second, resumed = journal.open_session(CAM, None, None, None, "/srv/dock/CAM01")

    assert not resumed
    assert second.id != first.id
    assert journal.offloading_sessions() == [second]


def test_journal_open_session_of_another_camera_is_its_own(journal: Journal) -> None:
    a = open_session(journal, CameraId("CAM-A"))
    b, resumed = journal.open_session(CameraId("CAM-B"), None, None, None, "/b")

    assert not resumed and b.id != a.id
    assert {s.id for s in journal.offloading_sessions()} == {a.id, b.id}


# --- files found -------------------------------------------------------------------------------


def test_journal_record_found_adds_files_and_skipped_entries(journal: Journal) -> None:
    s = open_session(journal)
    added, skipped = journal.record_found(
        s,
        [
            found("DCIM/0001.MP4", 10),
            found("DCIM/0002.MP4", 20),
            Skipped(b"link.MP4", "link.MP4", None, "symlink"),
        ],
    )

    assert (added, skipped) == (2, 1)
    assert journal.pending_totals(s.id) == (2, 30)
    assert [f.state for f in journal.session_files(s.id)] == [FileState.PENDING] * 2
    assert [(k.path, k.reason) for k in journal.session_skipped(s.id)] == [("link.MP4", "symlink")]


def test_journal_record_found_again_on_resume_adds_nothing_twice(journal: Journal) -> None:
    s = open_session(journal)
    entries: list[Found | Skipped] = [
        found("DCIM/0001.MP4"),
        Skipped(b"fifo", "fifo", None, "fifo"),
    ]
    journal.record_found(s, entries)

    assert journal.record_found(s, entries) == (0, 0)
    assert len(journal.session_files(s.id)) == 1


def test_journal_record_found_on_resume_takes_a_pending_files_new_size(journal: Journal) -> None:
    s = open_session(journal)
    journal.record_found(s, [found("DCIM/0001.MP4", 10)])
    journal.record_found(s, [found("DCIM/0001.MP4", 15, mtime_ns=5)])

    f = files(journal, s.id)["DCIM/0001.MP4"]
    assert (f.size, f.mtime_ns, f.state) == (15, 5, FileState.PENDING)


def test_journal_record_found_dedupes_files_already_verified_for_the_camera(
    journal: Journal,
) -> None:
    offloaded_session(journal, paths=("DCIM/0001.MP4",))
    s2 = open_session(journal)

    assert journal.record_found(s2, [found("DCIM/0001.MP4")]) == (0, 0)
    assert journal.session_files(s2.id) == []


def test_journal_record_found_takes_a_file_again_when_its_size_differs(journal: Journal) -> None:
    offloaded_session(journal, paths=("DCIM/0001.MP4",))
    s2 = open_session(journal)

    assert journal.record_found(s2, [found("DCIM/0001.MP4", size=101)]) == (1, 0)


def test_journal_record_found_takes_a_file_again_when_its_mtime_differs(journal: Journal) -> None:
    offloaded_session(journal, paths=("DCIM/0001.MP4",))
    s2 = open_session(journal)

    assert journal.record_found(s2, [found("DCIM/0001.MP4", mtime_ns=1)]) == (1, 0)


def test_journal_record_found_does_not_dedupe_against_another_camera(journal: Journal) -> None:
    offloaded_session(journal, CameraId("CAM-A"), paths=("DCIM/0001.MP4",))
    s = open_session(journal, CameraId("CAM-B"))

    assert journal.record_found(s, [found("DCIM/0001.MP4")]) == (1, 0)


@pytest.mark.parametrize("state", [FileState.FAILED, FileState.UNSTABLE, FileState.ABANDONED])
def test_journal_record_found_takes_again_a_file_that_never_verified(
    journal: Journal, state: FileState
) -> None:
    s = open_session(journal)
    journal.record_found(s, [found("DCIM/0001.MP4")])
    f = files(journal, s.id)["DCIM/0001.MP4"]
    if state == FileState.ABANDONED:
        journal.finish_offload(s.id, interrupted=True)
    else:
        journal.file_given_up(f, state, "read error")
        journal.finish_offload(s.id, interrupted=False)
    s2 = open_session(journal)

    assert journal.record_found(s2, [found("DCIM/0001.MP4")]) == (1, 0)


def test_journal_name_collision_of_raw_and_literal_percent_name_is_skipped(
    journal: Journal,
) -> None:
    s = open_session(journal)
    raw = found(b"a\xff")
    literal = found("a%FF")
    assert raw.path == literal.path == "a%FF"
    assert (raw.raw_path, literal.raw_path) == (b"a\xff", None)

    assert journal.record_found(s, [raw, literal]) == (1, 1)

    (f,) = journal.session_files(s.id)
    assert (f.path, f.raw_path) == ("a%FF", b"a\xff")
    (k,) = journal.session_skipped(s.id)
    assert (k.path, k.raw_path, k.reason) == ("a%FF", None, "name_collision")


def test_journal_name_collision_the_other_way_round_keeps_the_first_seen(
    journal: Journal,
) -> None:
    s = open_session(journal)

    assert journal.record_found(s, [found("a%FF"), found(b"a\xff")]) == (1, 1)
    (f,) = journal.session_files(s.id)
    assert f.raw_path is None
    (k,) = journal.session_skipped(s.id)
    assert (k.raw_path, k.reason) == (b"a\xff", "name_collision")


# --- files verified ----------------------------------------------------------------------------


def test_journal_files_verified_writes_two_custody_records_per_file(journal: Journal) -> None:
    s = open_session(journal)
    journal.record_found(s, [found("a.MP4", 10), found("b.MP4", 20)])
    before = custody_count(journal)

    verify_all(journal, s.id)

    new = [r for r in journal.custody_records(s.id) if r.seq > before]
    assert [(r.event, r.details["path"]) for r in new] == [
        ("file_offloaded", "a.MP4"),
        ("file_verified", "a.MP4"),
        ("file_offloaded", "b.MP4"),
        ("file_verified", "b.MP4"),
    ]
    assert new[0].details == {
        "path": "a.MP4",
        "size": 10,
        "sha256": SHA,
        "at": "2026-01-01T00:00:00Z",
    }
    assert new[1].details == {"path": "a.MP4", "sha256": SHA, "method": "readback"}
    for f in journal.session_files(s.id):
        assert (f.state, f.sha256) == (FileState.VERIFIED, SHA)
    assert journal.pending_totals(s.id) == (0, 0)
    assert check_chain(journal.custody_records()) == custody_count(journal)


def test_journal_file_given_up_records_the_error_and_counts_as_bad(journal: Journal) -> None:
    s = open_session(journal)
    journal.record_found(s, [found("a.MP4"), found("b.MP4")])
    fs = files(journal, s.id)
    journal.file_given_up(fs["a.MP4"], FileState.FAILED, "EIO at 4096")
    journal.file_given_up(fs["b.MP4"], FileState.UNSTABLE, "kept changing")

    assert journal.bad_count(s.id) == 2
    after = files(journal, s.id)
    assert (after["a.MP4"].state, after["a.MP4"].error) == (FileState.FAILED, "EIO at 4096")
    last = list(journal.custody_records(s.id))[-1]
    assert (last.event, last.details["outcome"]) == ("error", "unstable")


# --- finishing the offload ---------------------------------------------------------------------


def test_journal_finish_offload_with_everything_verified_is_offloaded(journal: Journal) -> None:
    s = offloaded_session(journal)

    assert s.state == SessionState.OFFLOADED
    assert s.offloaded_at is not None
    last = list(journal.custody_records(s.id))[-1]
    assert last.event == "offloaded"
    assert last.details == {"outcome": "offloaded", "files": {"verified": 2}}


def test_journal_finish_offload_abandons_pending_files_and_is_interrupted(
    journal: Journal,
) -> None:
    s = open_session(journal)
    journal.record_found(s, [found("a.MP4"), found("b.MP4")])
    journal.files_verified([(files(journal, s.id)["a.MP4"], SHA, "t")])

    assert journal.finish_offload(s.id, interrupted=False) == SessionState.INTERRUPTED
    states = {p: f.state for p, f in files(journal, s.id).items()}
    assert states == {"a.MP4": FileState.VERIFIED, "b.MP4": FileState.ABANDONED}
    last = list(journal.custody_records(s.id))[-1]
    assert last.details == {
        "outcome": "interrupted",
        "files": {"abandoned": 1, "verified": 1},
    }


def test_journal_finish_offload_told_interrupted_is_interrupted_even_with_none_pending(
    journal: Journal,
) -> None:
    s = open_session(journal)
    journal.record_found(s, [found("a.MP4")])
    verify_all(journal, s.id)

    assert journal.finish_offload(s.id, interrupted=True) == SessionState.INTERRUPTED


def test_journal_finish_offload_with_a_failed_file_is_offloaded_with_errors(
    journal: Journal,
) -> None:
    s = open_session(journal)
    journal.record_found(s, [found("a.MP4"), found("b.MP4")])
    journal.file_given_up(files(journal, s.id)["b.MP4"], FileState.FAILED, "EIO")
    verify_all(journal, s.id)

    assert journal.finish_offload(s.id, interrupted=False) == (SessionState.OFFLOADED_WITH_ERRORS)


def test_journal_finish_offload_of_a_camera_with_nothing_new_is_empty_and_not_queued(
    journal: Journal,
) -> None:
    s = open_session(journal)

    assert journal.finish_offload(s.id, interrupted=False) == SessionState.EMPTY
    assert journal.queued_sessions() == []


def test_journal_finish_offload_undocked_before_any_copy_is_empty_not_interrupted(
    journal: Journal,
) -> None:
    s = open_session(journal)
    journal.record_found(s, [found("a.MP4")])

    assert journal.finish_offload(s.id, interrupted=True) == SessionState.EMPTY
    assert journal.queued_sessions() == []


def test_journal_finish_offload_is_idempotent(journal: Journal) -> None:
    s = open_session(journal)
    journal.record_found(s, [found("a.MP4"), found("b.MP4")])
    journal.files_verified([(files(journal, s.id)["a.MP4"], SHA, "t")])
    assert journal.finish_offload(s.id, interrupted=True) == SessionState.INTERRUPTED
    before = custody_count(journal)
    row = journal.session(s.id)

    # finishing again, even told otherwise, changes nothing and records nothing
    assert journal.finish_offload(s.id, interrupted=False) == SessionState.INTERRUPTED
    assert custody_count(journal) == before
    assert journal.session(s.id) == row


# --- transitions -------------------------------------------------------------------------------


def test_journal_every_file_transition_outside_the_table_is_refused() -> None:
    for old, new in itertools.product(FileState, FileState):
        if new == old or new in FILE_TRANSITIONS[old]:
            check_file(old, new, "f")
        else:
            with pytest.raises(JournalError, match=f"file cannot go from {old} to {new}"):
                check_file(old, new, "f")


def test_journal_every_session_transition_outside_the_table_is_refused() -> None:
    for old, new in itertools.product(SessionState, SessionState):
        if new == old or new in SESSION_TRANSITIONS[old]:
            check_session(old, new, "s")
        else:
            with pytest.raises(JournalError, match=f"session cannot go from {old} to {new}"):
                check_session(old, new, "s")


def test_journal_file_given_up_after_it_verified_is_refused_and_nothing_written(
    journal: Journal,
) -> None:
    s = open_session(journal)
    journal.record_found(s, [found("a.MP4")])
    verify_all(journal, s.id)
    before = custody_count(journal)
    f = files(journal, s.id)["a.MP4"]

    # (verified -> failed is allowed: the store may refuse a name it cannot hold)
    with pytest.raises(JournalError, match="file cannot go from verified to unstable"):
        journal.file_given_up(f, FileState.UNSTABLE, "late error")

    assert custody_count(journal) == before
    assert files(journal, s.id)["a.MP4"] == f


def test_journal_file_verified_after_it_was_abandoned_is_refused(journal: Journal) -> None:
    s = open_session(journal)
    journal.record_found(s, [found("a.MP4")])
    journal.finish_offload(s.id, interrupted=True)
    f = files(journal, s.id)["a.MP4"]

    with pytest.raises(JournalError, match="file cannot go from abandoned to verified"):
        journal.files_verified([(f, SHA, "t")])
    assert files(journal, s.id)["a.MP4"].state == FileState.ABANDONED


def test_journal_file_stored_before_it_verified_is_refused(journal: Journal) -> None:
    s = open_session(journal)
    journal.record_found(s, [found("a.MP4")])
    f = files(journal, s.id)["a.MP4"]

    with pytest.raises(JournalError, match="file cannot go from pending to stored"):
        journal.file_stored(f, "k", SHA, "readback")


def test_journal_seal_of_a_session_still_offloading_is_refused(journal: Journal) -> None:
    s = open_session(journal)
    before = custody_count(journal)

    with pytest.raises(JournalError, match="session cannot go from offloading to sealed"):
        journal.seal(s.id)
    assert custody_count(journal) == before


def test_journal_seal_with_files_not_stored_is_refused(journal: Journal) -> None:
    s = offloaded_session(journal)

    with pytest.raises(JournalError, match="cannot seal with files not stored"):
        journal.seal(s.id)


def test_journal_upload_life_of_a_session_records_each_step(journal: Journal) -> None:
    s = uploaded_session(journal)

    events = [r.event for r in journal.custody_records(s.id)]
    assert events[-4:] == ["file_stored", "file_stored", "sealed", "uploaded"]
    assert s.sealed_at is not None and s.custody_last_seq is not None
    # a retry after a crash records nothing twice
    n = custody_count(journal)
    journal.session_uploaded(s.id, "k", SHA)
    journal.file_stored(journal.session_files(s.id)[0], "k", SHA, "readback")
    assert custody_count(journal) == n
    with pytest.raises(JournalError, match="session cannot go from uploaded to upload_failed"):
        journal.session_upload_failed(s.id, "late")


# --- queue -------------------------------------------------------------------------------------


def test_journal_queued_sessions_are_oldest_first(journal: Journal) -> None:
    a = offloaded_session(journal, CameraId("CAM-A"))
    b = offloaded_session(journal, CameraId("CAM-B"))
    c = offloaded_session(journal, CameraId("CAM-C"))
    open_session(journal, CameraId("CAM-D"))  # still offloading: not queued
    assert a.docked_at < b.docked_at < c.docked_at

    assert [s.id for s in journal.queued_sessions()] == [a.id, b.id, c.id]


def test_journal_prioritize_moves_a_session_first_and_the_latest_mark_wins(
    journal: Journal,
) -> None:
    a = offloaded_session(journal, CameraId("CAM-A"))
    b = offloaded_session(journal, CameraId("CAM-B"))
    c = offloaded_session(journal, CameraId("CAM-C"))

    assert journal.prioritize(c.id).priority > 0
    assert [s.id for s in journal.queued_sessions()] == [c.id, a.id, b.id]
    journal.prioritize(b.id)
    assert [s.id for s in journal.queued_sessions()] == [b.id, c.id, a.id]
    assert list(journal.custody_records(b.id))[-1].event == "prioritized"


def test_journal_prioritize_an_offloading_session_is_allowed(journal: Journal) -> None:
    s = open_session(journal)

    assert journal.prioritize(s.id).priority == 1


def test_journal_prioritize_an_unknown_session_is_refused(journal: Journal) -> None:
    offloaded_session(journal)
    before = custody_count(journal)

    with pytest.raises(JournalError, match="unknown"):
        journal.prioritize(SessionId("20260101T000000Z-NOPE-0000"))
    assert custody_count(journal) == before


def test_journal_prioritize_an_uploaded_session_is_refused(journal: Journal) -> None:
    s = uploaded_session(journal)
    before = custody_count(journal)

    with pytest.raises(JournalError, match="not waiting for upload"):
        journal.prioritize(s.id)
    assert custody_count(journal) == before
    row = journal.session(s.id)
    assert row is not None and row.priority == 0


def test_journal_prioritize_an_upload_failed_session_is_refused(journal: Journal) -> None:
    s = offloaded_session(journal)
    journal.session_upload_failed(s.id, "conflict")

    with pytest.raises(JournalError, match="not waiting for upload"):
        journal.prioritize(s.id)


def test_journal_queue_summary_counts_sessions_files_bytes_and_failures(
    journal: Journal,
) -> None:
    assert journal.queue_summary() == QueueSummary(0, 0, 0, 0)

    a = open_session(journal, CameraId("CAM-A"))  # 3 files, 2 verified, one stored later
    journal.record_found(a, [found("1", 10), found("2", 20), found("3", 40)])
    fa = files(journal, a.id)
    journal.files_verified([(fa["1"], SHA, "t"), (fa["2"], SHA, "t")])
    journal.finish_offload(a.id, interrupted=False)  # "3" abandoned
    journal.file_stored(files(journal, a.id)["1"], "k1", SHA, "readback")

    b = open_session(journal, CameraId("CAM-B"))  # still offloading: not in the queue
    journal.record_found(b, [found("x", 1000)])
    verify_all(journal, b.id)

    c = offloaded_session(journal, CameraId("CAM-C"))  # upload failed
    journal.session_upload_failed(c.id, "conflict")

    uploaded_session(journal, CameraId("CAM-D"))  # done: not in the queue

    e = open_session(journal, CameraId("CAM-E"))  # nothing new: empty, never queued
    assert journal.finish_offload(e.id, interrupted=False) == SessionState.EMPTY

    assert journal.queue_summary() == QueueSummary(sessions=1, files=1, bytes=20, failed=1)


def test_journal_raw_name_is_not_deduped_against_a_verified_literal_percent_name(
    journal: Journal,
) -> None:
    """A literal "a%FF" and a raw b"a\\xff" encode alike but are different camera files."""
    offloaded_session(journal, paths=("a%FF",))
    s2 = open_session(journal)

    assert journal.record_found(s2, [found(b"a\xff")]) == (1, 0)
    (f,) = journal.session_files(s2.id)
    assert f.raw_path == b"a\xff"
    # and the literal name itself is still recognised as done
    assert journal.record_found(s2, [found("a%FF")]) == (0, 0)
    assert len(journal.session_files(s2.id)) == 1
