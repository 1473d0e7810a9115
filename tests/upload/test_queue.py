"""The upload queue's one decision, `next_job`, over a real journal: sessions oldest first (a
prioritized one before all), files in path order, the seal (manifest) last and only once every
file is in the store and none is in flight."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dockd.ids import CameraId
from dockd.journal import FileState, Journal, SessionRow, SessionState
from dockd.offload.walk import Found
from dockd.upload.queue import Claims, FileJob, SealJob, next_job

SHA = "cd" * 32


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal.open(tmp_path / "journal.sqlite3", "dock-a")
    yield j
    j.close()


def session(
    j: Journal,
    camera: str,
    paths: list[str],
    *,
    fail: tuple[str, ...] = (),
    interrupted: bool = False,
) -> SessionRow:
    """A session brought to its end of offload through the journal API, as a camera would."""
    s, _ = j.open_session(CameraId(camera), None, None, None, f"/srv/dock/{camera}")
    j.record_found(s, [Found(p.encode(), p, None, 10, 1) for p in paths])
    rows = j.session_files(s.id)
    for f in rows:
        if f.path in fail:
            j.file_given_up(f, FileState.FAILED, "EIO")
    j.files_verified([(f, SHA, "t") for f in rows if f.path not in fail])
    j.finish_offload(s.id, interrupted)
    row = j.session(s.id)
    assert row is not None
    return row


def file_job(job: object) -> tuple[str, str]:
    assert isinstance(job, FileJob), job
    return job.session.camera, job.file.path


def store(j: Journal, job: object, claims: Claims) -> None:
    """What a worker does with a file job: record it stored, then release its claim."""
    assert isinstance(job, FileJob)
    j.file_stored(job.file, f"key/{job.file.path}", SHA, "readback")
    claims.files.pop(job.file.id)


def test_queue_gives_the_oldest_sessions_files_first_in_path_order(journal: Journal) -> None:
    a = session(journal, "CAM-A", ["b/2.MP4", "a/1.MP4", "b/10.MP4"])
    b = session(journal, "CAM-B", ["0.MP4"])
    claims = Claims()

    taken = [file_job(next_job(journal, claims)) for _ in range(4)]

    assert taken == [
        ("CAM-A", "a/1.MP4"),
        ("CAM-A", "b/10.MP4"),
        ("CAM-A", "b/2.MP4"),
        ("CAM-B", "0.MP4"),
    ]
    assert sorted(claims.files.values()) == sorted([a.id] * 3 + [b.id])
    # everything is claimed, nothing stored: no seal, nothing to do
    assert next_job(journal, claims) is None


def test_queue_skips_files_claimed_by_other_workers(journal: Journal) -> None:
    s = session(journal, "CAM-A", ["1.MP4", "2.MP4", "3.MP4"])
    files = {f.path: f for f in journal.session_files(s.id)}
    claims = Claims(files={files["1.MP4"].id: s.id, files["3.MP4"].id: s.id})

    job = next_job(journal, claims)

    assert file_job(job) == ("CAM-A", "2.MP4")
    assert isinstance(job, FileJob) and claims.files[job.file.id] == s.id
    assert next_job(journal, claims) is None


def test_queue_seals_a_session_only_when_all_its_files_are_stored(journal: Journal) -> None:
    s = session(journal, "CAM-A", ["1.MP4", "2.MP4"])
    claims = Claims()
    first = next_job(journal, claims)
    second = next_job(journal, claims)

    store(journal, first, claims)
    # one file stored, one in flight: not yet
    assert next_job(journal, claims) is None

    # the other worker gives its file back (a failed attempt): it is offered again, not the seal
    assert isinstance(second, FileJob)
    claims.files.pop(second.file.id)
    again = next_job(journal, claims)
    assert file_job(again) == ("CAM-A", "2.MP4")

    store(journal, again, claims)
    seal = next_job(journal, claims)
    assert isinstance(seal, SealJob) and seal.session.id == s.id
    assert claims.sealing == {s.id}
    # sealing is claimed: no second seal job for the same session
    assert next_job(journal, claims) is None


def test_queue_does_not_seal_while_a_file_is_in_flight_even_if_stored(journal: Journal) -> None:
    """A retry after a crash may find a file stored while its worker still holds it."""
    s = session(journal, "CAM-A", ["1.MP4"])
    claims = Claims()
    job = next_job(journal, claims)
    assert isinstance(job, FileJob)
    journal.file_stored(job.file, "k", SHA, "readback")  # recorded, claim not yet released

    assert journal.unstored_count(s.id) == 0
    assert next_job(journal, claims) is None
    claims.files.pop(job.file.id)
    assert isinstance(next_job(journal, claims), SealJob)


def test_queue_moves_to_the_next_session_while_one_waits_for_its_files(
    journal: Journal,
) -> None:
    session(journal, "CAM-A", ["1.MP4"])
    session(journal, "CAM-B", ["1.MP4"])
    claims = Claims()

    assert file_job(next_job(journal, claims)) == ("CAM-A", "1.MP4")
    assert file_job(next_job(journal, claims)) == ("CAM-B", "1.MP4")


def test_queue_whole_order_is_files_then_seal_session_by_session(journal: Journal) -> None:
    a = session(journal, "CAM-A", ["2", "1"])
    b = session(journal, "CAM-B", ["x"])
    claims = Claims()
    order: list[object] = []

    while (job := next_job(journal, claims)) is not None:
        if isinstance(job, FileJob):
            order.append(file_job(job))
            store(journal, job, claims)
        else:
            order.append(("seal", job.session.camera))
            journal.seal(job.session.id)
            journal.session_uploaded(job.session.id, "m", SHA)
            claims.sealing.discard(job.session.id)

    assert order == [
        ("CAM-A", "1"),
        ("CAM-A", "2"),
        ("seal", "CAM-A"),
        ("CAM-B", "x"),
        ("seal", "CAM-B"),
    ]
    for s in (a, b):
        row = journal.session(s.id)
        assert row is not None and row.state == SessionState.UPLOADED
    assert journal.queued_sessions() == []


def test_queue_prioritized_session_comes_first(journal: Journal) -> None:
    session(journal, "CAM-A", ["1.MP4"])
    session(journal, "CAM-B", ["1.MP4"])
    c = session(journal, "CAM-C", ["1.MP4", "2.MP4"])
    journal.prioritize(c.id)
    claims = Claims()

    taken = [file_job(next_job(journal, claims)) for _ in range(4)]

    assert taken == [
        ("CAM-C", "1.MP4"),
        ("CAM-C", "2.MP4"),
        ("CAM-A", "1.MP4"),
        ("CAM-B", "1.MP4"),
    ]


def test_queue_prioritized_while_another_session_is_half_uploaded_goes_next(
    journal: Journal,
) -> None:
    session(journal, "CAM-A", ["1", "2", "3"])
    b = session(journal, "CAM-B", ["1"])
    claims = Claims()
    store(journal, next_job(journal, claims), claims)  # CAM-A/1 done

    journal.prioritize(b.id)

    assert file_job(next_job(journal, claims)) == ("CAM-B", "1")
    assert file_job(next_job(journal, claims)) == ("CAM-A", "2")


def test_queue_seals_a_session_with_no_file_to_upload_at_once(journal: Journal) -> None:
    """Every file failed: the manifest still goes to the store, saying so."""
    s = session(journal, "CAM-A", ["1.MP4"], fail=("1.MP4",))
    assert s.state == SessionState.OFFLOADED_WITH_ERRORS

    job = next_job(journal, Claims())

    assert isinstance(job, SealJob) and job.session.id == s.id


def test_queue_uploads_what_an_interrupted_session_verified(journal: Journal) -> None:
    s, _ = journal.open_session(CameraId("CAM-A"), None, None, None, "/a")
    journal.record_found(s, [Found(p.encode(), p, None, 10, 1) for p in ("1", "2")])
    first = journal.session_files(s.id)[0]
    journal.files_verified([(first, SHA, "t")])
    assert journal.finish_offload(s.id, interrupted=True) == SessionState.INTERRUPTED
    claims = Claims()

    assert file_job(next_job(journal, claims)) == ("CAM-A", "1")
    assert next_job(journal, claims) is None  # "2" was abandoned: never offered


def test_queue_ignores_sessions_still_offloading_or_failed(journal: Journal) -> None:
    journal.open_session(CameraId("CAM-A"), None, None, None, "/a")  # offloading
    failed = session(journal, "CAM-B", ["1"])
    journal.session_upload_failed(failed.id, "conflict")

    assert next_job(journal, Claims()) is None
