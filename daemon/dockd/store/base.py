"""The Store protocol: the handful of operations the upload worker and `dockd verify` need.

Everything else — retries, manifests, ordering, verification policy — lives above it, once.
Keys are relative to the store root (`<camera>/<session_id>/...`); a backend adds its own prefix.
Implementations are blocking; callers run them in worker threads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from dockd.errors import IntegrityError, StoreError


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


@dataclass(frozen=True)
class PutItem:
    """One staged file of a batch: its store key, its staged copy, and what the journal says."""

    key: str
    source: Path
    sha256: str
    size: int


# what a batch put says of one item: the verification method ("readback", ...) once the object
# is durable in the store and verified there, or the error that costs this item only
PutOutcome = str | StoreError | IntegrityError


@runtime_checkable
class BatchStore(Protocol):
    """Optional: a backend that puts many small files at once, cheaper than one by one.

    `put_files` does for every item what `put_file` then `verify` do for one (whole or not at
    all, never over other bytes, durable, then read back and checked) and returns one outcome
    per item, in order: the verification method, or the error that costs that item alone
    (StoreConflict: the key holds other bytes; StoreRefused: the store cannot hold the name;
    IntegrityError: the staged copy or the stored object does not hash to `sha256`). A store
    that is away raises (StoreUnavailable, StoreError, OSError) for the whole batch, which is
    then retried whole: items already in with these bytes are success again. A backend without
    it is sent one file at a time (`put_file`, `verify`); see `batch_store`.
    """

    def put_files(self, items: Sequence[PutItem]) -> list[PutOutcome]: ...


def batch_store(store: object) -> BatchStore | None:
    """The store's batch interface, if its own class has one. Looked up on the class, not the
    instance: a wrapper that forwards unknown attributes (`__getattr__`) to a store inside must
    not have its own `put_file` bypassed by the inner store's batch method."""
    if callable(getattr(type(store), "put_files", None)) and isinstance(store, BatchStore):
        return store
    return None
