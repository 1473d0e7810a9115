"""The lives of a file and of a session: their states and the only transitions allowed.

Every state write goes through `check_file` / `check_session`, so a reader finds the whole life
of a piece of evidence here, and a bug that would skip a step fails loudly instead.
"""

from __future__ import annotations

from enum import StrEnum

from dockd.errors import JournalError


class FileState(StrEnum):
    PENDING = "pending"  # found on the camera, not yet verified in staging
    VERIFIED = "verified"  # copied, fsynced and read back in staging: safe to undock
    FAILED = "failed"  # read errors past the retry bound; left on the camera
    UNSTABLE = "unstable"  # kept changing while copied; left on the camera
    ABANDONED = "abandoned"  # never copied: the camera left first (picked up on re-dock)
    STORED = "stored"  # copied to the evidence store and verified there
    CLEARED = "cleared"  # removed from the camera after it was stored


FILE_TRANSITIONS: dict[FileState, frozenset[FileState]] = {
    FileState.PENDING: frozenset(
        {FileState.VERIFIED, FileState.FAILED, FileState.UNSTABLE, FileState.ABANDONED}
    ),
    # FAILED from VERIFIED: the store cannot hold it at all (a name too long); the camera keeps it
    FileState.VERIFIED: frozenset({FileState.STORED, FileState.FAILED}),
    FileState.STORED: frozenset({FileState.CLEARED}),
    FileState.FAILED: frozenset(),
    FileState.UNSTABLE: frozenset(),
    FileState.ABANDONED: frozenset(),
    FileState.CLEARED: frozenset(),
}

# The manifest's word for a file, by journal state; states absent here are not in `files`.
MANIFEST_STATUS: dict[FileState, str] = {
    FileState.VERIFIED: "verified",
    FileState.STORED: "verified",
    FileState.CLEARED: "verified",
    FileState.FAILED: "failed",
    FileState.UNSTABLE: "unstable",
}


class SessionState(StrEnum):
    OFFLOADING = "offloading"  # the camera is being read
    OFFLOADED = "offloaded"  # every file verified in staging; queued for upload
    OFFLOADED_WITH_ERRORS = "offloaded_with_errors"  # some files failed/unstable; queued
    INTERRUPTED = "interrupted"  # undocked mid-offload; what was verified is queued
    SEALED = "sealed"  # every file in the store; manifest contents fixed, being written
    UPLOADED = "uploaded"  # manifest in the store: the session is complete there
    UPLOAD_FAILED = "upload_failed"  # a store conflict or max_attempts: needs a person
    CLEARED = "cleared"  # stored files removed from the camera
    EMPTY = "empty"  # nothing offloaded (nothing new, or undocked first): nothing to upload


QUEUED_STATES = frozenset(
    {
        SessionState.OFFLOADED,
        SessionState.OFFLOADED_WITH_ERRORS,
        SessionState.INTERRUPTED,
        SessionState.SEALED,
    }
)

# sessions whose staging folder must be gone: everything is in the store, or nothing was taken
FINISHED_STATES = frozenset({SessionState.UPLOADED, SessionState.CLEARED, SessionState.EMPTY})

SESSION_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.OFFLOADING: frozenset(
        {
            SessionState.OFFLOADED,
            SessionState.OFFLOADED_WITH_ERRORS,
            SessionState.INTERRUPTED,
            SessionState.EMPTY,
        }
    ),
    SessionState.OFFLOADED: frozenset({SessionState.SEALED, SessionState.UPLOAD_FAILED}),
    SessionState.OFFLOADED_WITH_ERRORS: frozenset(
        {SessionState.SEALED, SessionState.UPLOAD_FAILED}
    ),
    SessionState.INTERRUPTED: frozenset({SessionState.SEALED, SessionState.UPLOAD_FAILED}),
    SessionState.SEALED: frozenset({SessionState.UPLOADED, SessionState.UPLOAD_FAILED}),
    SessionState.UPLOADED: frozenset({SessionState.CLEARED}),
    SessionState.UPLOAD_FAILED: frozenset(),
    SessionState.CLEARED: frozenset(),
    SessionState.EMPTY: frozenset(),
}


def check_file(old: FileState, new: FileState, what: str) -> None:
    if new != old and new not in FILE_TRANSITIONS[old]:
        raise JournalError(f"{what}: file cannot go from {old} to {new}")


def check_session(old: SessionState, new: SessionState, what: str) -> None:
    if new != old and new not in SESSION_TRANSITIONS[old]:
        raise JournalError(f"{what}: session cannot go from {old} to {new}")
