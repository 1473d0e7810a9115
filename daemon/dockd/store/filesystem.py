"""The filesystem store: a directory, local or a NAS mount.

An object is written under a temporary name in `<root>/.incoming/`, fsynced, made read-only
(0440), then hard-linked to its final name — link(2) fails if the name exists, which makes "never
overwrite" atomic — and the directory fsynced. The store root itself is never created: if a NAS
is not mounted, writing into the empty mount point would look like success on the local disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from dockd.errors import (
    IntegrityError,
    StoreConflict,
    StoreError,
    StoreRefused,
    StoreUnavailable,
)
from dockd.offload.copy import fsync_dir
from dockd.store.base import ObjectInfo
from dockd.upload.throttle import TokenBucket

CHUNK = 4 * 1024 * 1024
OBJECT_MODE = 0o440
DIR_MODE = 0o750
INCOMING = ".incoming"

# a store that is away: wait and retry rather than give up on the file
_AWAY = frozenset(
    {
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENOENT,
        errno.EIO,
        errno.ENOTCONN,
        errno.ESTALE,
        errno.EHOSTDOWN,
        errno.ETIMEDOUT,
    }
)


class FilesystemStore:
    def __init__(self, root: Path, throttle: TokenBucket | None = None) -> None:
        self.root = root
        self.name = f"filesystem:{root}"
        self.throttle = throttle  # upload.bandwidth_limit, shared with the other workers

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"{key!r}: not a safe store key")
        return self.root.joinpath(*parts)

    def check(self) -> None:
        if not self.root.is_dir():
            raise StoreUnavailable(f"{self.root}: store directory is missing (not mounted?)")
        if not os.access(self.root, os.W_OK):
            raise StoreUnavailable(f"{self.root}: store directory is not writable")

    def put_file(self, key: str, source: Path, sha256: str, size: int) -> None:
        self._path(key)
        # Opened before the store's errors are classified: a staged copy that is gone is not the
        # store being away (ENOENT there means an unmounted NAS), and no retry can bring it back.
        try:
            f = open(source, "rb")  # noqa: SIM115 - closed below, after the last chunk
        except FileNotFoundError:
            raise IntegrityError(
                f"{key}: staged copy {source} is missing; nothing verified to send"
            ) from None
        with f:

            def chunks() -> Iterator[bytes]:
                while chunk := f.read(CHUNK):
                    yield chunk

            self._put(key, chunks(), sha256)

    def put_bytes(self, key: str, data: bytes, sha256: str) -> None:
        self._put(key, iter([data]), sha256)

    def _put(self, key: str, chunks: Iterator[bytes], sha256: str) -> None:
        dest = self._path(key)
        self.check()
        try:
            self._mkdirs(dest.parent)
            incoming = self.root / INCOMING
            incoming.mkdir(mode=DIR_MODE, exist_ok=True)
            # The temporary is named relative to a descriptor of `.incoming/`, so it is removed
            # even if the store's path goes away mid-put (an unmounted share, a moved folder):
            # by path, the unlink would miss it and leave it there until the next start.
            dir_fd = os.open(incoming, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._put_via(dir_fd, key, dest, chunks, sha256)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise self._classify(exc, key) from exc

    def _put_via(
        self, dir_fd: int, key: str, dest: Path, chunks: Iterator[bytes], sha256: str
    ) -> None:
        tmp = f"{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        try:
            h = hashlib.sha256()
            try:
                for chunk in chunks:
                    if self.throttle is not None:
                        self.throttle.take(len(chunk))
                    h.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fsync(fd)
                os.fchmod(fd, OBJECT_MODE)
            finally:
                os.close(fd)
            if not hmac.compare_digest(h.hexdigest(), sha256):
                # staging no longer holds what was verified: never send it on
                raise IntegrityError(
                    f"{key}: staged copy hashes to {h.hexdigest()[:16]}…, journal says "
                    f"{sha256[:16]}…"
                )
            try:
                os.link(tmp, dest, src_dir_fd=dir_fd)
            except FileExistsError:
                self._same_or_conflict(key, dest, sha256)
                return
            fsync_dir(dest.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)

    def _mkdirs(self, path: Path) -> None:
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=DIR_MODE)
            except FileExistsError:
                continue
            fsync_dir(d.parent)

    def _same_or_conflict(self, key: str, dest: Path, sha256: str) -> None:
        existing = _hash_path(dest)
        if not hmac.compare_digest(existing, sha256):
            raise StoreConflict(
                f"{key}: already in the store with other content (sha256 {existing[:16]}…); "
                "left as it is"
            )

    def verify(self, key: str, sha256: str, size: int) -> str:
        dest = self._path(key)
        try:
            st = dest.stat()
            if st.st_size != size:
                raise IntegrityError(f"{key}: {st.st_size} bytes in the store, expected {size}")
            got = _hash_path(dest, drop_cache=True)
        except FileNotFoundError:
            raise StoreError(f"{key}: missing from the store") from None
        except OSError as exc:
            raise self._classify(exc, key) from exc
        if not hmac.compare_digest(got, sha256):
            raise IntegrityError(
                f"{key}: store copy hashes to {got[:16]}…, expected {sha256[:16]}…"
            )
        return "readback"

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise StoreError(f"{key}: missing from the store") from None

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            return ObjectInfo(key, self._path(key).stat().st_size)
        except FileNotFoundError:
            return None

    def manifests(self) -> Iterator[str]:
        if not self.root.is_dir():
            raise StoreUnavailable(f"{self.root}: store directory is missing")
        for camera in sorted(self.root.iterdir()):
            if camera.name.startswith(".") or not camera.is_dir():
                continue
            for session in sorted(camera.iterdir()):
                if (session / "manifest.json").is_file():
                    yield f"{camera.name}/{session.name}/manifest.json"

    def clean_incoming(self) -> int:
        """Remove temporaries a crash left in `.incoming/` (never evidence: not yet linked)."""
        n = 0
        incoming = self.root / INCOMING
        if incoming.is_dir():
            for tmp in incoming.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
                n += 1
        return n

    def _classify(self, exc: OSError, key: str) -> StoreError:
        if exc.errno == errno.ENAMETOOLONG:
            return StoreRefused(f"{key}: the store's filesystem cannot hold this name (too long)")
        if exc.errno in _AWAY:
            return StoreUnavailable(f"{key}: store unavailable ({exc.strerror})")
        return StoreError(f"{key}: {exc.strerror or exc}")


def _hash_path(path: Path, drop_cache: bool = False) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        h = hashlib.sha256()
        while chunk := os.read(fd, CHUNK):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)
