"""What to upload next: the one decision of the queue, made in the journal thread.

Sessions in queue order (prioritized first, then oldest); within a session, files in path
order; once every file of a session is in the store and none is in flight, the session's
sidecars and manifest — last. What is in flight is memory only: after a restart nothing is,
and a file whose store write had finished before the crash is found there whole and recorded.

For a store that takes batches (`store.base.BatchStore`), consecutive small files of a session
(in path order, up to BATCH_FILES of them or BATCH_BYTES) are claimed together as one job: the
store makes them durable and verifies them as a group, and the journal records them in one
transaction. A big file, or a small one alone, is a job of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dockd.journal import FileRow, Journal, SessionRow


@dataclass(frozen=True)
class FileJob:
    session: SessionRow
    file: FileRow


@dataclass
class BatchJob:
    """Small files of one session, in path order, put and recorded together. While the store
    is away the worker keeps only the first (`files` shrinks to it, the others' claims are
    given back), as one file alone would be held: nothing else is kept from other workers or
    from a new queue order (`dockd prioritize`) for as long as the store stays away."""

    session: SessionRow
    files: tuple[FileRow, ...]


@dataclass(frozen=True)
class SealJob:
    session: SessionRow


Job = FileJob | BatchJob | SealJob

# At or below SMALL_FILE a file is batched. 64 files or 8 MiB a batch: one syncfs and one
# journal transaction cover them; 128 measured no faster (bench/upload.py, 2000 small files),
# and a smaller batch is less to redo after the store goes away mid-batch.
SMALL_FILE = 1024 * 1024
BATCH_FILES = 64
BATCH_BYTES = 8 * 1024 * 1024


@dataclass
class Claims:
    """What workers hold right now."""

    files: dict[int, str] = field(default_factory=dict)  # file id -> session id
    sealing: set[str] = field(default_factory=set)

    def busy(self, session_id: str) -> bool:
        return session_id in self.sealing or session_id in self.files.values()


def next_job(
    journal: Journal, claims: Claims, batch_files: int = 1, batch_bytes: int = BATCH_BYTES
) -> Job | None:
    """Claim and return the next job, or None if there is nothing to do now. With
    `batch_files` > 1, a run of small files in path order is claimed as one BatchJob."""
    for session in journal.queued_sessions():
        if session.id in claims.sealing:
            continue
        files = journal.next_files(session.id, claims.files.keys(), max(1, batch_files))
        if files:
            take = files[:1]
            if files[0].size <= SMALL_FILE:
                total = files[0].size
                for f in files[1:]:
                    if f.size > SMALL_FILE or total + f.size > batch_bytes:
                        break
                    take.append(f)
                    total += f.size
            for f in take:
                claims.files[f.id] = session.id
            if len(take) == 1:
                return FileJob(session, take[0])
            return BatchJob(session, tuple(take))
        if not claims.busy(session.id) and journal.unstored_count(session.id) == 0:
            claims.sealing.add(session.id)
            return SealJob(session)
    return None
