"""The journal: one SQLite database, the only source of truth for sessions, files, queue and
custody. Memory elsewhere is a cache of it; a restart rebuilds everything from here."""

from __future__ import annotations

from dockd.journal.offload import OffloadJournal
from dockd.journal.rows import FileRow, SessionRow, SkippedRow
from dockd.journal.states import FileState, SessionState
from dockd.journal.status import DockStatus, QueueSummary, StatusJournal
from dockd.journal.upload import UploadJournal


class Journal(OffloadJournal, UploadJournal, StatusJournal):
    """Every journal query, on one connection."""


__all__ = [
    "DockStatus",
    "FileRow",
    "FileState",
    "Journal",
    "QueueSummary",
    "SessionRow",
    "SessionState",
    "SkippedRow",
]
