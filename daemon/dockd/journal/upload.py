"""Journal side of the upload queue: what to upload next, and recording what reached the store.

Queue order (SPEC §6): prioritized sessions first (latest mark first), then oldest docked first;
within a session files in path order; the manifest last.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from dockd import __version__
from dockd.errors import JournalError
from dockd.ids import SessionId, utc_now
from dockd.journal.db import Db
from dockd.journal.rows import FileRow, SessionRow
from dockd.journal.states import (
    QUEUED_STATES,
    FileState,
    SessionState,
    check_file,
    check_session,
)

_QUEUED = tuple(str(s) for s in QUEUED_STATES)
_Q_MARKS = ",".join("?" * len(_QUEUED))
QUEUE_ORDER = "priority DESC, docked_at, id"


class UploadJournal(Db):
    def queued_sessions(self) -> list[SessionRow]:
        rows = self.all(
            f"SELECT * FROM sessions WHERE state IN ({_Q_MARKS}) ORDER BY {QUEUE_ORDER}", *_QUEUED
        )
        return [SessionRow.of(r) for r in rows]

    def next_files(
        self, session_id: SessionId, exclude: Collection[int], limit: int
    ) -> list[FileRow]:
        """Verified files of a session not yet in the store, in path order."""
        # NOT IN (NULL) would match nothing: leave the clause out when nothing is excluded
        skip = f" AND id NOT IN ({','.join('?' * len(exclude))})" if exclude else ""
        rows = self.all(
            f"SELECT * FROM files WHERE session_id = ? AND state = ?{skip} ORDER BY path LIMIT ?",
            session_id,
            FileState.VERIFIED,
            *exclude,
            limit,
        )
        return [FileRow.of(r) for r in rows]

    def unstored_count(self, session_id: SessionId) -> int:
        n: int = self.scalar(
            "SELECT count(*) FROM files WHERE session_id = ? AND state = ?",
            session_id,
            FileState.VERIFIED,
        )
        return n

    def upload_totals(self, session_id: SessionId) -> tuple[int, int, int, int]:
        """(files, bytes) to be in the store for this session, and (files, bytes) already are."""
        row = self.one(
            "SELECT count(*), coalesce(sum(size), 0),"
            " coalesce(sum(state = ?), 0), coalesce(sum(CASE WHEN state = ? THEN size END), 0)"
            " FROM files WHERE session_id = ? AND state IN (?, ?)",
            FileState.STORED,
            FileState.STORED,
            session_id,
            FileState.VERIFIED,
            FileState.STORED,
        )
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def file_stored(self, f: FileRow, key: str, sha256: str, method: str) -> None:
        with self.tx():
            self._file_stored(f, key, sha256, method)

    def files_stored(self, stored: Sequence[tuple[FileRow, str, str, str]]) -> None:
        """`file_stored` for a batch of (file, key, sha256, method), in one transaction: the
        same state changes and the same custody records, one per file, in this order."""
        if not stored:
            return
        with self.tx():
            ids = [f.id for f, _, _, _ in stored]
            rows = self.all(
                f"SELECT id, state FROM files WHERE id IN ({','.join('?' * len(ids))})", *ids
            )
            was = {r["id"]: FileState(r["state"]) for r in rows}
            todo = []
            for f, key, sha256, method in stored:
                old = was[f.id]
                if old in (FileState.STORED, FileState.CLEARED):
                    continue  # a retry after a crash between store write and this record
                check_file(old, FileState.STORED, f"{f.session_id}/{f.path}")
                todo.append((f, key, sha256, method))
            now = utc_now()
            self.conn.executemany(
                "UPDATE files SET state = ?, key = ?, stored_at = ?, error = NULL WHERE id = ?",
                [(FileState.STORED, key, now, f.id) for f, key, _, _ in todo],
            )
            self.custody_run(
                [
                    (
                        "file_stored",
                        f.session_id,
                        {"path": f.path, "key": key, "sha256": sha256, "verified_by": method},
                    )
                    for f, key, sha256, method in todo
                ]
            )

    def _file_stored(self, f: FileRow, key: str, sha256: str, method: str) -> None:
        row = self.one("SELECT state FROM files WHERE id = ?", f.id)
        assert row is not None
        old = FileState(row["state"])
        if old in (FileState.STORED, FileState.CLEARED):
            return  # a retry after a crash between store write and this record
        check_file(old, FileState.STORED, f"{f.session_id}/{f.path}")
        self.conn.execute(
            "UPDATE files SET state = ?, key = ?, stored_at = ?, error = NULL WHERE id = ?",
            (FileState.STORED, key, utc_now(), f.id),
        )
        self.custody(
            "file_stored", f.session_id, path=f.path, key=key, sha256=sha256, verified_by=method
        )

    def file_upload_error(self, f: FileRow, error: str) -> None:
        with self.tx():
            self.conn.execute(
                "UPDATE files SET error = ?, attempts = attempts + 1 WHERE id = ?", (error, f.id)
            )

    def seal(self, session_id: SessionId) -> SessionRow:
        """Fix what the manifest will say: every file is in the store, so the custody range and
        the upload time are frozen here, and a restart rebuilds byte-identical sidecars."""
        with self.tx():
            s = self._session(session_id)
            if s.state == SessionState.SEALED:
                return s
            if self.unstored_count(session_id):
                raise JournalError(f"session {session_id}: cannot seal with files not stored")
            check_session(s.state, SessionState.SEALED, session_id)
            # the version goes into the ASC MHL; from here, not from the running code, so an
            # upgrade between sealing and the manifest still rebuilds identical bytes
            rec = self.custody("sealed", session_id, dockd_version=__version__)
            self.conn.execute(
                "UPDATE sessions SET state = ?, sealed_at = ?, uploaded_at = ?,"
                " custody_last_seq = ? WHERE id = ?",
                (SessionState.SEALED, rec.at, rec.at, rec.seq, session_id),
            )
        return self._session(session_id)

    def session_uploaded(
        self, session_id: SessionId, manifest_key: str, manifest_sha256: str
    ) -> None:
        with self.tx():
            s = self._session(session_id)
            if s.state in (SessionState.UPLOADED, SessionState.CLEARED):
                return
            check_session(s.state, SessionState.UPLOADED, session_id)
            self.conn.execute(
                "UPDATE sessions SET state = ?, manifest_sha256 = ?, error = NULL WHERE id = ?",
                (SessionState.UPLOADED, manifest_sha256, session_id),
            )
            self.custody("uploaded", session_id, manifest=manifest_key, sha256=manifest_sha256)

    def session_upload_failed(self, session_id: SessionId, error: str) -> None:
        with self.tx():
            s = self._session(session_id)
            check_session(s.state, SessionState.UPLOAD_FAILED, session_id)
            self.conn.execute(
                "UPDATE sessions SET state = ?, error = ? WHERE id = ?",
                (SessionState.UPLOAD_FAILED, error, session_id),
            )
            self.custody("error", session_id, stage="upload", error=error)

    def staging_was_released(self, session_id: str) -> bool:
        return (
            self.one(
                "SELECT 1 FROM custody WHERE session_id = ? AND event = 'staging_released'",
                session_id,
            )
            is not None
        )

    def staging_released(self, session_id: SessionId) -> None:
        self.custody_event_tx("staging_released", session_id)

    def custody_event_tx(self, event: str, session_id: SessionId | None, **details: object) -> None:
        with self.tx():
            self.custody(event, session_id, **details)

    def file_cleared(self, f: FileRow) -> None:
        with self.tx():
            row = self.one("SELECT state FROM files WHERE id = ?", f.id)
            assert row is not None
            check_file(FileState(row["state"]), FileState.CLEARED, f"{f.session_id}/{f.path}")
            self.conn.execute("UPDATE files SET state = ? WHERE id = ?", (FileState.CLEARED, f.id))
            self.custody("cleared_from_camera", f.session_id, path=f.path, sha256=f.sha256)

    def session_cleared(self, session_id: SessionId) -> None:
        with self.tx():
            s = self._session(session_id)
            check_session(s.state, SessionState.CLEARED, session_id)
            self.conn.execute(
                "UPDATE sessions SET state = ?, cleared_at = ? WHERE id = ?",
                (SessionState.CLEARED, utc_now(), session_id),
            )

    def prioritize(self, session_id: str) -> SessionRow:
        """Move a queued session to the front. Raises JournalError if unknown or not queued."""
        with self.tx():
            row = self.one("SELECT * FROM sessions WHERE id = ?", session_id)
            if row is None:
                raise JournalError(f"session {session_id}: unknown")
            s = SessionRow.of(row)
            if s.state not in QUEUED_STATES and s.state != SessionState.OFFLOADING:
                raise JournalError(
                    f"session {session_id}: not waiting for upload (state {s.state})"
                )
            top: int = self.scalar("SELECT coalesce(max(priority), 0) FROM sessions")
            self.conn.execute(
                "UPDATE sessions SET priority = ? WHERE id = ?", (top + 1, session_id)
            )
            self.custody("prioritized", session_id)
        return self._session(session_id)

    def _session(self, session_id: str) -> SessionRow:
        row = self.one("SELECT * FROM sessions WHERE id = ?", session_id)
        if row is None:
            raise JournalError(f"session {session_id}: unknown")
        return SessionRow.of(row)
