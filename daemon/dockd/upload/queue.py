"""What to upload next: the one decision of the queue, made in the journal thread.

Sessions in queue order (prioritized first, then oldest); within a session, files in path
order; once every file of a session is in the store and none is in flight, the session's
sidecars and manifest — last. What is in flight is memory only: after a restart nothing is,
and a file whose store write had finished before the crash is found there whole and recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dockd.journal import FileRow, Journal, SessionRow


@dataclass(frozen=True)
class FileJob:
    session: SessionRow
    file: FileRow


@dataclass(frozen=True)
class SealJob:
    session: SessionRow


Job = FileJob | SealJob


@dataclass
class Claims:
    """What workers hold right now."""

    files: dict[int, str] = field(default_factory=dict)  # file id -> session id
    sealing: set[str] = field(default_factory=set)

    def busy(self, session_id: str) -> bool:
        return session_id in self.sealing or session_id in self.files.values()


def next_job(journal: Journal, claims: Claims) -> Job | None:
    """Claim and return the next job, or None if there is nothing to do now."""
    for session in journal.queued_sessions():
        if session.id in claims.sealing:
            continue
        files = journal.next_files(session.id, claims.files.keys(), 1)
        if files:
            claims.files[files[0].id] = session.id
            return FileJob(session, files[0])
        if not claims.busy(session.id) and journal.unstored_count(session.id) == 0:
            claims.sealing.add(session.id)
            return SealJob(session)
    return None
