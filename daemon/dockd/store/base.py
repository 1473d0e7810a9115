"""The Store protocol: the handful of operations the upload worker and `dockd verify` need.

Everything else — retries, manifests, ordering, verification policy — lives above it, once.
Keys are relative to the store root (`<camera>/<session_id>/...`); a backend adds its own prefix.
Implementations are blocking; callers run them in worker threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class Store(Protocol):
    """Contract of every backend.

    - `put_file`/`put_bytes`: the object appears under `key` whole or not at all, never over an
      existing object. If `key` already holds exactly these bytes (a retry after a crash), that
      is success; other bytes raise StoreConflict and nothing is changed. A store that is away
      (unreachable, read-only, full) raises StoreUnavailable.
    - `verify`: read what the store holds under `key` and check it hashes to `sha256` with
      `size` bytes; returns the method used ("readback", "checksum"). Raises IntegrityError on a
      mismatch, StoreError if missing.
    - `open`: the object's bytes for reading; FileNotFoundError-like StoreError if missing.
    - `stat`: size of the object, None if absent.
    - `manifests`: keys of every `manifest.json`, found in the store alone (no journal).
    - `check`: raises StoreUnavailable if the store cannot be written now.
    """

    name: str

    def put_file(self, key: str, source: Path, sha256: str, size: int) -> None: ...

    def put_bytes(self, key: str, data: bytes, sha256: str) -> None: ...

    def verify(self, key: str, sha256: str, size: int) -> str: ...

    def open(self, key: str) -> BinaryIO: ...

    def stat(self, key: str) -> ObjectInfo | None: ...

    def manifests(self) -> Iterator[str]: ...

    def check(self) -> None: ...
