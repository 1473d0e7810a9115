"""Read models for `dockd status` and the dashboards: summaries over journal rows."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from dockd.ids import utc_now
from dockd.journal.db import Db
from dockd.journal.states import QUEUED_STATES, FileState, SessionState

_QUEUED = tuple(str(s) for s in QUEUED_STATES)
_Q_MARKS = ",".join("?" * len(_QUEUED))


@dataclass(frozen=True)
class QueueSummary:
    sessions: int
    files: int
    bytes: int
    failed: int  # sessions whose upload needs a person (conflict, attempts exhausted)


@dataclass(frozen=True)
class EvidenceTotals:
    """What has happened to evidence on this dock, ever, as of custody record `seq`: counts that
    only grow (file and session states only move forward), for the metrics endpoint."""

    seq: int = 0
    offloaded_files: int = 0  # verified in staging
    offloaded_bytes: int = 0
    uploaded_files: int = 0  # verified in the store
    uploaded_bytes: int = 0
    sessions_uploaded: int = 0  # manifest in the store
    files_failed: int = 0  # unreadable, or the staged copy never read back right
    files_unstable: int = 0  # kept changing while copied
    uploads_failed: int = 0  # sessions that went to upload_failed


@dataclass(frozen=True)
class DockStatus:
    cameras: list[dict[str, Any]]
    sessions: list[dict[str, Any]]
    queue: QueueSummary
    daemon: dict[str, Any] = field(default_factory=dict)


class StatusJournal(Db):
    def queue_summary(self) -> QueueSummary:
        row = self.one(
            f"SELECT count(DISTINCT s.id), count(f.id), coalesce(sum(f.size), 0) FROM sessions s"
            f" LEFT JOIN files f ON f.session_id = s.id AND f.state = ?"
            f" WHERE s.state IN ({_Q_MARKS})",
            FileState.VERIFIED,
            *_QUEUED,
        )
        assert row is not None
        failed: int = self.scalar(
            "SELECT count(*) FROM sessions WHERE state = ?", SessionState.UPLOAD_FAILED
        )
        return QueueSummary(row[0], row[1], row[2], failed)

    def prioritized_sessions(self) -> list[str]:
        """Queued sessions a supervisor moved to the front, first first."""
        rows = self.all(
            f"SELECT id FROM sessions WHERE priority > 0 AND state IN ({_Q_MARKS})"
            " ORDER BY priority DESC",
            *_QUEUED,
        )
        return [r[0] for r in rows]

    def set_daemon_status(self, **facts: Any) -> None:
        """What only the running daemon knows (problems, pid), for `dockd status` to read."""
        facts["updated_at"] = utc_now()
        with self.tx():
            self.conn.execute(
                "INSERT INTO dock (key, value) VALUES ('daemon', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (json.dumps(facts, default=str),),
            )

    def daemon_status(self) -> dict[str, Any]:
        raw = self.scalar("SELECT value FROM dock WHERE key = 'daemon'")
        return {} if raw is None else dict(json.loads(raw))

    def dock_status(self, recent: int = 20) -> DockStatus:
        cameras = [
            dict(r)
            for r in self.all(
                "SELECT id, source, location, vendor_id, model_id, docked_at FROM cameras"
                " WHERE docked = 1 ORDER BY id"
            )
        ]
        sessions = []
        for r in self.all(
            "SELECT s.id, s.camera, s.state, s.priority, s.docked_at, s.uploaded_at, s.error,"
            " count(f.id) AS files, coalesce(sum(f.size), 0) AS bytes,"
            " sum(f.state = 'verified') AS to_upload,"
            " sum(f.state IN ('stored', 'cleared')) AS stored,"
            " sum(f.state IN ('failed', 'unstable')) AS bad"
            " FROM sessions s LEFT JOIN files f ON f.session_id = s.id"
            f" WHERE s.state NOT IN ('uploaded', 'cleared') OR s.id IN"
            f" (SELECT id FROM sessions ORDER BY id DESC LIMIT ?)"
            f" GROUP BY s.id ORDER BY s.state IN ({_Q_MARKS}) DESC,"
            " s.priority DESC, s.docked_at, s.id",
            recent,
            *_QUEUED,
        ):
            d = dict(r)
            d["prioritized"] = bool(d.pop("priority"))
            sessions.append(d)
        return DockStatus(cameras, sessions, self.queue_summary(), self.daemon_status())

    # -- read-only queries for the metrics endpoint (observers/metrics.py) ----------------------

    def oldest_queued_docked_at(self) -> str | None:
        """When the camera of the oldest session still waiting for upload was docked."""
        docked_at: str | None = self.scalar(
            f"SELECT min(docked_at) FROM sessions WHERE state IN ({_Q_MARKS})", *_QUEUED
        )
        return docked_at

    def custody_count(self) -> int:
        """Custody records in the chain. `seq` runs from 1 without gaps and nothing is ever
        deleted (a trigger forbids it), so max(seq) is count(*) without a scan of the chain."""
        n: int = self.scalar("SELECT coalesce(max(seq), 0) FROM custody")
        return n

    def cameras_docked_count(self) -> int:
        n: int = self.scalar("SELECT count(*) FROM cameras WHERE docked = 1")
        return n

    def evidence_totals(self) -> EvidenceTotals:
        """The totals from the files and sessions tables, with the custody seq they are as of.

        One statement is one snapshot, and each counted state change commits together with its
        custody record, so the totals and `seq` agree exactly. It reads every file row: for the
        first scrape only; `evidence_since` moves the totals on from there."""
        done = (FileState.VERIFIED, FileState.STORED, FileState.CLEARED)
        stored = (FileState.STORED, FileState.CLEARED)
        row = self.one(
            "WITH f AS (SELECT"
            "  coalesce(sum(state IN (?,?,?)), 0) AS offloaded_files,"
            "  coalesce(sum(CASE WHEN state IN (?,?,?) THEN size END), 0) AS offloaded_bytes,"
            "  coalesce(sum(state IN (?,?)), 0) AS uploaded_files,"
            "  coalesce(sum(CASE WHEN state IN (?,?) THEN size END), 0) AS uploaded_bytes,"
            "  coalesce(sum(state = ?), 0) AS files_failed,"
            "  coalesce(sum(state = ?), 0) AS files_unstable FROM files),"
            " s AS (SELECT coalesce(sum(state IN (?,?)), 0) AS sessions_uploaded,"
            "  coalesce(sum(state = ?), 0) AS uploads_failed FROM sessions)"
            " SELECT (SELECT coalesce(max(seq), 0) FROM custody) AS seq, f.*, s.* FROM f, s",
            *done,
            *done,
            *stored,
            *stored,
            FileState.FAILED,
            FileState.UNSTABLE,
            SessionState.UPLOADED,
            SessionState.CLEARED,
            SessionState.UPLOAD_FAILED,
        )
        assert row is not None
        return EvidenceTotals(**{k: int(v) for k, v in dict(row).items()})

    def evidence_since(self, totals: EvidenceTotals) -> EvidenceTotals:
        """`totals` moved on by the custody records appended after `totals.seq`.

        Each change a total counts is committed with exactly one custody record: a file
        verified in staging with `file_offloaded` (which carries its size), a file verified in
        the store with `file_stored`, a file given up with `error` (`outcome` failed or
        unstable), a session's upload failing with `error` (`stage` upload), a session in the
        store with `uploaded`. Counting the records since a snapshot keeps the totals exact
        while reading only what is new."""
        rows = self.all(
            "SELECT c.seq, c.event, json_extract(c.details, '$.size') AS size,"
            " json_extract(c.details, '$.outcome') AS outcome,"
            " json_extract(c.details, '$.stage') AS stage, f.size AS stored_size"
            " FROM custody c LEFT JOIN files f ON c.event = 'file_stored'"
            " AND f.session_id = c.session_id AND f.path = json_extract(c.details, '$.path')"
            " WHERE c.seq > ? ORDER BY c.seq",
            totals.seq,
        )
        if not rows:
            return totals
        t = dataclasses.asdict(totals)
        for r in rows:
            event = r["event"]
            if event == "file_offloaded":
                t["offloaded_files"] += 1
                t["offloaded_bytes"] += int(r["size"] or 0)
            elif event == "file_stored":
                t["uploaded_files"] += 1
                t["uploaded_bytes"] += int(r["stored_size"] or 0)
            elif event == "uploaded":
                t["sessions_uploaded"] += 1
            elif event == "error" and r["stage"] == "upload":
                t["uploads_failed"] += 1
            elif event == "error" and r["outcome"] == FileState.FAILED:
                t["files_failed"] += 1
            elif event == "error" and r["outcome"] == FileState.UNSTABLE:
                t["files_unstable"] += 1
        t["seq"] = rows[-1]["seq"]
        return EvidenceTotals(**t)
