"""The project's own exceptions. Each carries the exit code the CLI uses when it escapes.

Catch these narrowly; `except Exception` belongs only to a task supervisor.
"""

from __future__ import annotations

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 2
EX_SOFTWARE = 70
EX_CONFIG = 78


class DockdError(Exception):
    """Something dockd could not do."""

    exit_code = EX_SOFTWARE


class ConfigError(DockdError):
    """The configuration is not usable; the message names the key, value and what was expected."""

    exit_code = EX_CONFIG


class JournalError(DockdError):
    """The journal could not be opened, migrated or written."""


class CustodyError(DockdError):
    """The custody hash chain does not check out."""

    exit_code = EX_FAIL


class SourceError(DockdError):
    """A camera source (directory, USB) failed or a camera could not be read."""


class CameraGone(SourceError):
    """The camera was undocked (or its mount vanished) while it was being read."""


class SourceChanged(SourceError):
    """A camera file changed size or mtime while it was being copied."""


class ReadFailed(SourceError):
    """A camera file could not be read."""


class StagingError(DockdError):
    """Local staging could not hold or verify a copy."""


class StagingFull(StagingError):
    """Staging ran out of space (ENOSPC) or is below `offload.min_free_staging`."""


class IntegrityError(DockdError):
    """Bytes read back do not hash to what was copied."""

    exit_code = EX_FAIL


class StoreError(DockdError):
    """The evidence store refused or failed an operation."""


class StoreUnavailable(StoreError):
    """The store is away (unreachable, read-only, full); waiting and retrying is right."""


class StoreRefused(StoreError):
    """The store cannot hold this key at all (a name too long for it); retrying cannot help."""


class StoreConflict(StoreError):
    """A store key already holds other content. Never overwritten: recorded and left for a human."""
