"""Journal writes of the offload side: cameras docking, sessions opening, files verified."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dockd.errors import JournalError
from dockd.ids import CameraId, SessionId, new_session_id, utc_now
from dockd.journal.db import Db
from dockd.journal.rows import FileRow, SessionRow, SkippedRow
from dockd.journal.states import FileState, SessionState, check_file, check_session
from dockd.offload.walk import Found, Skipped

# what the offload records of a verified file: (row, sha256, copied_at[, xxh128])
Verified = tuple[FileRow, str, str] | tuple[FileRow, str, str, str]

# a file already verified for a camera (same path, size, mtime) is not offloaded again
_DONE_STATES = (FileState.VERIFIED, FileState.STORED, FileState.CLEARED)


class OffloadJournal(Db):
    def reset_docked(self) -> None:
        """At start-up nothing is docked until a source says so again."""
        with self.tx():
            self.conn.execute("UPDATE cameras SET docked = 0 WHERE docked = 1")

    def camera_docked(
        self,
        camera: CameraId,
        source: str,
        location: str,
        vendor_id: str | None,
        model_id: str | None,
    ) -> None:
        now = utc_now()
        with self.tx():
            self.conn.execute(
                "INSERT INTO cameras (id, source, location, vendor_id, model_id, docked, docked_at)"
                " VALUES (?,?,?,?,?,1,?) ON CONFLICT (id) DO UPDATE SET source=excluded.source,"
                " location=excluded.location, vendor_id=excluded.vendor_id,"
                " model_id=excluded.model_id, docked=1, docked_at=excluded.docked_at",
                (camera, source, location, vendor_id, model_id, now),
            )

    def camera_undocked(self, camera: CameraId, session_id: SessionId | None) -> None:
        with self.tx():
            self.conn.execute(
                "UPDATE cameras SET docked = 0, undocked_at = ? WHERE id = ?", (utc_now(), camera)
            )
            self.custody("undocked", session_id, camera=camera)

    def session(self, session_id: str) -> SessionRow | None:
        row = self.one("SELECT * FROM sessions WHERE id = ?", session_id)
        return None if row is None else SessionRow.of(row)

    def offloading_sessions(self) -> list[SessionRow]:
        rows = self.all(
            "SELECT * FROM sessions WHERE state = ? ORDER BY id", SessionState.OFFLOADING
        )
        return [SessionRow.of(r) for r in rows]

    def open_session(
        self,
        camera: CameraId,
        vendor_id: str | None,
        model_id: str | None,
        officer: str | None,
        location: str,
        mount: Mapping[str, str] | None = None,
    ) -> tuple[SessionRow, bool]:
        """The camera's session: the one a crash left offloading (resumed), else a new one.

        Returns (session, resumed).
        """
        with self.tx():
            row = self.one(
                "SELECT * FROM sessions WHERE camera = ? AND state = ? ORDER BY id DESC LIMIT 1",
                camera,
                SessionState.OFFLOADING,
            )
            if row is not None:
                self.custody(
                    "docked",
                    row["id"],
                    camera=camera,
                    location=location,
                    resumed=True,
                    mount=dict(mount or {}),
                )
                return SessionRow.of(row), True
            session_id = new_session_id(camera)
            now = utc_now()
            self.conn.execute(
                "INSERT INTO sessions (id, camera, state, docked_at, vendor_id, model_id, officer)"
                " VALUES (?,?,?,?,?,?,?)",
                (session_id, camera, SessionState.OFFLOADING, now, vendor_id, model_id, officer),
            )
            self.custody(
                "docked",
                session_id,
                camera=camera,
                location=location,
                vendor_id=vendor_id,
                model_id=model_id,
                mount=dict(mount or {}),
            )
            created = self.one("SELECT * FROM sessions WHERE id = ?", session_id)
            assert created is not None
            return SessionRow.of(created), False

    def custody_event(self, event: str, session_id: SessionId | None, **details: object) -> None:
        with self.tx():
            self.custody(event, session_id, **details)

    def record_found(
        self, session: SessionRow, entries: Iterable[Found | Skipped]
    ) -> tuple[int, int]:
        """Record a batch of walked entries. A file already verified for this camera with the
        same path, size and mtime is left out. Returns (files added, entries skipped)."""
        added = skipped = 0
        with self.tx():
            for e in entries:
                if isinstance(e, Skipped):
                    cur = self.conn.execute(
                        "INSERT OR IGNORE INTO skipped (session_id, path, raw_path, reason)"
                        " VALUES (?,?,?,?)",
                        (session.id, e.path, e.raw_path, e.reason),
                    )
                    skipped += cur.rowcount
                    continue
                # raw_path too: a literal "a%FF" and a raw b"a\xff" share `path` but are
                # different files on the camera
                done = self.one(
                    "SELECT 1 FROM files WHERE camera = ? AND path = ? AND raw_path IS ?"
                    " AND size = ? AND mtime_ns = ?"
                    " AND state IN (?,?,?) LIMIT 1",
                    session.camera,
                    e.path,
                    e.raw_path,
                    e.size,
                    e.mtime_ns,
                    *_DONE_STATES,
                )
                if done is not None:
                    continue
                clash = self.one(
                    "SELECT raw_path, size, mtime_ns, state FROM files"
                    " WHERE session_id = ? AND path = ?",
                    session.id,
                    e.path,
                )
                if clash is None:
                    self.conn.execute(
                        "INSERT INTO files (session_id, camera, path, raw_path, size, mtime_ns,"
                        " state) VALUES (?,?,?,?,?,?,?)",
                        (
                            session.id,
                            session.camera,
                            e.path,
                            e.raw_path,
                            e.size,
                            e.mtime_ns,
                            FileState.PENDING,
                        ),
                    )
                    added += 1
                elif clash["raw_path"] != e.raw_path:
                    # two names that encode alike (a literal "%FF" beside a raw 0xFF byte)
                    self.conn.execute(
                        "INSERT OR IGNORE INTO skipped (session_id, path, raw_path, reason)"
                        " VALUES (?,?,?,?)",
                        (session.id, e.path, e.raw_path, "name_collision"),
                    )
                    skipped += 1
                elif clash["state"] == FileState.PENDING and (
                    clash["size"] != e.size or clash["mtime_ns"] != e.mtime_ns
                ):
                    # resumed after a crash and the file moved on since: copy what is there now
                    self.conn.execute(
                        "UPDATE files SET size = ?, mtime_ns = ? WHERE session_id = ? AND path = ?",
                        (e.size, e.mtime_ns, session.id, e.path),
                    )
        return added, skipped

    def pending_page(self, session_id: SessionId, after: str, limit: int) -> list[FileRow]:
        """Pending files in path order, a page at a time: memory stays bounded by `limit`."""
        rows = self.all(
            "SELECT * FROM files WHERE session_id = ? AND state = ? AND path > ?"
            " ORDER BY path LIMIT ?",
            session_id,
            FileState.PENDING,
            after,
            limit,
        )
        return [FileRow.of(r) for r in rows]

    def pending_totals(self, session_id: SessionId) -> tuple[int, int]:
        """(files, bytes) still to offload."""
        row = self.one(
            "SELECT count(*), coalesce(sum(size), 0) FROM files WHERE session_id = ? AND state = ?",
            session_id,
            FileState.PENDING,
        )
        assert row is not None
        return int(row[0]), int(row[1])

    def bad_count(self, session_id: SessionId) -> int:
        """Files of the session that failed or kept changing."""
        n: int = self.scalar(
            "SELECT count(*) FROM files WHERE session_id = ? AND state IN (?,?)",
            session_id,
            FileState.FAILED,
            FileState.UNSTABLE,
        )
        return n

    def session_files(self, session_id: str) -> list[FileRow]:
        rows = self.all("SELECT * FROM files WHERE session_id = ? ORDER BY path", session_id)
        return [FileRow.of(r) for r in rows]

    def session_skipped(self, session_id: str) -> list[SkippedRow]:
        rows = self.all(
            "SELECT path, raw_path, reason FROM skipped WHERE session_id = ? ORDER BY path",
            session_id,
        )
        return [SkippedRow(r["path"], r["raw_path"], r["reason"]) for r in rows]

    def file_restat(self, f: FileRow, size: int, mtime_ns: int) -> FileRow:
        """The file changed before or during a copy: the next attempt copies what is there now."""
        with self.tx():
            self.conn.execute(
                "UPDATE files SET size = ?, mtime_ns = ?, attempts = attempts + 1 WHERE id = ?",
                (size, mtime_ns, f.id),
            )
        row = self.one("SELECT * FROM files WHERE id = ?", f.id)
        assert row is not None
        return FileRow.of(row)

    def files_verified(self, done: Iterable[Verified]) -> None:
        """Mark files verified in staging: (row, sha256, copied_at[, xxh128]). One transaction
        for the batch; each file's data and directory entry were made durable and read back
        before this is called. The batch's states are read in one query and its custody records
        appended with the chain heads read once (`custody_run`): this is the journal's
        busiest write, one per FLUSH_FILES files."""
        done = list(done)
        if not done:
            return
        now = utc_now()
        with self.tx():
            states: dict[int, str] = {}
            ids = [f.id for f, *_ in done]
            for i in range(0, len(ids), 500):  # below SQLite's bound on parameters
                part = ids[i : i + 500]
                marks = ",".join("?" * len(part))
                rows = self.conn.execute(
                    f"SELECT id, state FROM files WHERE id IN ({marks})", part
                ).fetchall()
                states.update((r[0], r[1]) for r in rows)
            updates = []
            records: list[tuple[str, str, dict[str, Any]]] = []
            for f, sha256, copied_at, *more in done:
                xxh128 = more[0] if more else None
                check_file(FileState(states[f.id]), FileState.VERIFIED, f"{f.session_id}/{f.path}")
                states[f.id] = FileState.VERIFIED  # the same file twice in a batch is refused
                updates.append((FileState.VERIFIED, sha256, xxh128, now, f.id))
                records.append(
                    (
                        "file_offloaded",
                        f.session_id,
                        {"path": f.path, "size": f.size, "sha256": sha256, "at": copied_at},
                    )
                )
                records.append(
                    (
                        "file_verified",
                        f.session_id,
                        {"path": f.path, "sha256": sha256, "method": "readback"},
                    )
                )
            self.conn.executemany(
                "UPDATE files SET state = ?, sha256 = ?, xxh128 = ?, verified_at = ?,"
                " error = NULL WHERE id = ?",
                updates,
            )
            self.custody_run(records)

    def file_given_up(self, f: FileRow, state: FileState, error: str) -> None:
        with self.tx():
            self._set_file(f, state)
            self.conn.execute(
                "UPDATE files SET state = ?, error = ? WHERE id = ?", (state, error, f.id)
            )
            self.custody("error", f.session_id, path=f.path, outcome=str(state), error=error)

    def finish_offload(self, session_id: SessionId, interrupted: bool) -> SessionState:
        """Close the offload; files not verified by now are abandoned (a re-dock picks them up)."""
        with self.tx():
            row = self.one("SELECT state FROM sessions WHERE id = ?", session_id)
            if row is None:
                raise JournalError(f"session {session_id}: unknown")
            old = SessionState(row["state"])
            if old != SessionState.OFFLOADING:
                return old  # already finished: finishing is idempotent
            pending = self.scalar(
                "SELECT count(*) FROM files WHERE session_id = ? AND state = ?",
                session_id,
                FileState.PENDING,
            )
            bad = self.scalar(
                "SELECT count(*) FROM files WHERE session_id = ? AND state IN (?,?)",
                session_id,
                FileState.FAILED,
                FileState.UNSTABLE,
            )
            taken = self.scalar(
                "SELECT count(*) FROM files WHERE session_id = ? AND state != ?",
                session_id,
                FileState.PENDING,
            )
            if not taken:
                # a docking that found nothing new, or was undocked before any copy: the
                # custody records tell of it; an empty folder in the store would be clutter
                new = SessionState.EMPTY
            elif interrupted or pending:
                new = SessionState.INTERRUPTED
            elif bad:
                new = SessionState.OFFLOADED_WITH_ERRORS
            else:
                new = SessionState.OFFLOADED
            check_session(old, new, session_id)
            self.conn.execute(
                "UPDATE files SET state = ? WHERE session_id = ? AND state = ?",
                (FileState.ABANDONED, session_id, FileState.PENDING),
            )
            self.conn.execute(
                "UPDATE sessions SET state = ?, offloaded_at = ? WHERE id = ?",
                (new, utc_now(), session_id),
            )
            counts = dict(
                self.conn.execute(
                    "SELECT state, count(*) FROM files WHERE session_id = ? GROUP BY state",
                    (session_id,),
                ).fetchall()
            )
            self.custody("offloaded", session_id, outcome=str(new), files=counts)
            return new

    def _set_file(self, f: FileRow, new: FileState) -> None:
        row = self.one("SELECT state FROM files WHERE id = ?", f.id)
        assert row is not None
        check_file(FileState(row["state"]), new, f"{f.session_id}/{f.path}")
