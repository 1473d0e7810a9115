"""files_verified writes a batch's custody records with the chain heads read once per
transaction: the chain, each session's slice, and every record's content must be exactly what
one-by-one appends (db.append_custody) give."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockd.custody import check_chain, check_slice
from dockd.errors import JournalError
from dockd.ids import CameraId, utc_now
from dockd.journal import FileState, Journal
from dockd.journal.rows import FileRow
from dockd.offload.walk import Found


def _session_with_files(j: Journal, camera: str, n: int) -> tuple[str, list[FileRow]]:
    cam = CameraId(camera)
    j.camera_docked(cam, "directory", "/x", None, None)
    s, _ = j.open_session(cam, None, None, None, "/x")
    j.record_found(s, [Found(b"x", f"DCIM/{i:04d}.JPG", None, 100 + i, 7) for i in range(n)])
    return s.id, j.pending_page(s.id, "", 1000)


def _verified(rows: list[FileRow]) -> list[tuple[FileRow, str, str, str]]:
    return [(r, f"{r.id:064x}", utc_now(), f"{r.id:032x}") for r in rows]


def test_batched_custody_records_chain_like_one_by_one_appends_across_two_sessions(
    tmp_path: Path,
) -> None:
    j = Journal.open(tmp_path / "j.sqlite3", "dock")
    try:
        sa, fa = _session_with_files(j, "X6BATCHA01", 5)
        sb, fb = _session_with_files(j, "X6BATCHB01", 3)
        j.files_verified(_verified(fa[:2]))
        j.custody_event("prioritized", sb)  # another session's record between two batches
        j.files_verified(_verified([fa[2], fb[0], fa[3], fb[1]]))  # sessions interleaved
        j.files_verified([])  # nothing: no transaction, no record
        j.files_verified(_verified([fa[4], fb[2]]))
        records = list(j.custody_records())
        assert check_chain(records) == len(records)
        for sid, files in ((sa, fa), (sb, fb)):
            mine = [r for r in records if r.session_id == sid]
            check_slice(mine, sid)
            offloaded = [r.details for r in mine if r.event == "file_offloaded"]
            verified = [r.details for r in mine if r.event == "file_verified"]
            assert [d["path"] for d in offloaded] == [f.path for f in files]
            assert [d["size"] for d in offloaded] == [f.size for f in files]
            assert verified == [
                {"path": f.path, "sha256": f"{f.id:064x}", "method": "readback"} for f in files
            ]
        assert {f.state for f in j.session_files(sa) + j.session_files(sb)} == {FileState.VERIFIED}
        # one-by-one appends after the batches still link to what the batches wrote
        j.custody_event("undocked", sa)
        records = list(j.custody_records())
        assert check_chain(records) == len(records)
        check_slice([r for r in records if r.session_id == sa], sa)
    finally:
        j.close()


def test_a_batch_with_a_file_that_cannot_become_verified_is_refused_whole(
    tmp_path: Path,
) -> None:
    """The batch's states are read in one query, but each file's transition is still checked:
    a file given up meanwhile refuses the whole transaction, and nothing of it is written."""
    j = Journal.open(tmp_path / "j.sqlite3", "dock")
    try:
        sid, files = _session_with_files(j, "X6BATCHC01", 3)
        j.file_given_up(files[1], FileState.FAILED, "worn card")
        before = len(list(j.custody_records()))
        with pytest.raises(JournalError, match="cannot go from failed to verified"):
            j.files_verified(_verified(files))
        assert len(list(j.custody_records())) == before
        assert [f.state for f in j.session_files(sid)] == [
            FileState.PENDING,
            FileState.FAILED,
            FileState.PENDING,
        ]
    finally:
        j.close()
