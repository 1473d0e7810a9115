"""Read models for `dockd status` and the dashboards: summaries over journal rows."""

from __future__ import annotations

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
