"""The filesystem store: a directory, local or a NAS mount.

An object is written under a temporary name in `<root>/.incoming/`, fsynced, made read-only
(0440), then hard-linked to its final name — link(2) fails if the name exists, which makes "never
overwrite" atomic — and the directory fsynced. The store root itself is never created: if a NAS
is not mounted, writing into the empty mount point would look like success on the local disk.

Small files go in batches (`put_files`): every temporary is written first, then all are made
durable at once — one syncfs(2) on a local disk filesystem (ext4, XFS, btrfs), where a single
journal commit covers them all, or elsewhere (a NAS, FUSE: syncfs may not reach the server)
writeback started on all, then an fsync of each — then each is linked, each distinct directory
fsynced once, and every object read back from the device (page cache dropped) and hashed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from dockd import durable
from dockd.durable import fsync_dir
from dockd.errors import (
    IntegrityError,
    StoreConflict,
    StoreError,
    StoreRefused,
    StoreUnavailable,
)
from dockd.store.base import ObjectInfo, PutItem, PutOutcome
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
            # the store cannot hold it under that name: costs this file only, never retried
            raise StoreRefused(f"{key!r}: not a safe store key")
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
            try:
                got = self._write(fd, chunks)
                os.fsync(fd)
                os.fchmod(fd, OBJECT_MODE)
            finally:
                os.close(fd)
            if not hmac.compare_digest(got, sha256):
                # staging no longer holds what was verified: never send it on
                raise IntegrityError(
                    f"{key}: staged copy hashes to {got[:16]}…, journal says {sha256[:16]}…"
                )
            try:
                os.link(tmp, dest, src_dir_fd=dir_fd)
            except FileExistsError:
                # a retry after a crash between link and journal record: these very bytes are
                # success, made durable again in case that try was cut short before its syncs
                self._same_or_conflict(key, dest, sha256)
                _fsync_path(dest)
            fsync_dir(dest.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)

    def put_files(self, items: Sequence[PutItem]) -> list[PutOutcome]:
        """Put and verify a batch of (small) staged files; see `base.BatchStore`."""
        dests = [self._path(it.key) for it in items]
        self.check()
        out: list[PutOutcome | None] = [None] * len(items)
        try:
            for parent in dict.fromkeys(d.parent for d in dests):
                try:
                    self._mkdirs(parent)
                except OSError as exc:
                    err = self._classify(exc, str(parent.relative_to(self.root)))
                    if not isinstance(err, StoreRefused):
                        raise
                    for i, d in enumerate(dests):
                        if d.parent == parent:
                            out[i] = StoreRefused(f"{items[i].key}: {err}")
            incoming = self.root / INCOMING
            incoming.mkdir(mode=DIR_MODE, exist_ok=True)
            dir_fd = os.open(incoming, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                self._put_batch_via(dir_fd, items, dests, out)
            finally:
                os.close(dir_fd)
            todo = [i for i, o in enumerate(out) if o is None]
            for i, o in zip(
                todo, self._readback([dests[i] for i in todo], items, todo), strict=True
            ):
                out[i] = o
        except OSError as exc:
            raise self._classify(exc, items[0].key if items else str(self.root)) from exc
        assert all(o is not None for o in out)
        return [o for o in out if o is not None]

    def _put_batch_via(
        self, dir_fd: int, items: Sequence[PutItem], dests: list[Path], out: list[PutOutcome | None]
    ) -> None:
        temps: dict[int, str] = {}  # item index -> temporary's name in .incoming/
        fds: dict[int, int] = {}
        srcs: dict[int, BinaryIO] = {}
        try:
            # every staged copy opened and its read-ahead asked for first: the staging disk
            # then serves the whole batch in one queue, not one small read after another
            for i, it in enumerate(items):
                if out[i] is not None:
                    continue
                try:
                    srcs[i] = open(it.source, "rb")  # noqa: SIM115 - closed in `finally`
                except FileNotFoundError:
                    out[i] = IntegrityError(
                        f"{it.key}: staged copy {it.source} is missing; nothing verified to send"
                    )
                    continue
                with contextlib.suppress(OSError):
                    os.posix_fadvise(srcs[i].fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
            for i, src in srcs.items():
                it = items[i]
                tmp = f"{secrets.token_hex(8)}.tmp"
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                fds[i] = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
                temps[i] = tmp
                got = self._write(fds[i], iter(functools.partial(src.read, CHUNK), b""))
                os.fchmod(fds[i], OBJECT_MODE)
                if not hmac.compare_digest(got, it.sha256):
                    out[i] = IntegrityError(
                        f"{it.key}: staged copy hashes to {got[:16]}…, journal says "
                        f"{it.sha256[:16]}…"
                    )
            durable.sync_fds(dir_fd, [fds[i] for i in fds if out[i] is None])
            for fd in fds.values():
                os.close(fd)
            fds.clear()
            dirs: dict[Path, None] = {}
            for i, tmp in temps.items():
                if out[i] is not None:
                    continue
                try:
                    os.link(tmp, dests[i], src_dir_fd=dir_fd)
                except FileExistsError:
                    # a retry (store away mid-batch, a crash before the journal record): these
                    # very bytes are success, made durable again in case the last try was cut
                    # short before its sync; other bytes are a conflict for this file
                    try:
                        self._same_or_conflict(items[i].key, dests[i], items[i].sha256)
                    except StoreConflict as exc:
                        out[i] = exc
                        continue
                    _fsync_path(dests[i])
                except OSError as exc:
                    err = self._classify(exc, items[i].key)
                    if not isinstance(err, StoreRefused):
                        raise
                    out[i] = err
                    continue
                dirs[dests[i].parent] = None
            for d in dirs:
                fsync_dir(d)
        finally:
            for src in srcs.values():
                src.close()
            for fd in fds.values():
                os.close(fd)
            for tmp in temps.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dir_fd)

    def _write(self, fd: int, chunks: Iterable[bytes]) -> str:
        """Write every chunk to `fd` (paced by the bandwidth limit); the SHA-256 of them."""
        h = hashlib.sha256()
        for chunk in chunks:
            if self.throttle is not None:
                self.throttle.take(len(chunk))
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        return h.hexdigest()

    def _readback(
        self, paths: list[Path], items: Sequence[PutItem], index: list[int]
    ) -> list[PutOutcome]:
        """Read every object back from the device and check it. The page cache is dropped
        for all first, then read-ahead asked for all, so the device serves them in one queue."""
        fds: list[int] = []
        try:
            for n, p in enumerate(paths):
                try:
                    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise StoreError(f"{items[index[n]].key}: missing from the store") from None
                fds.append(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            for fd in fds:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            out: list[PutOutcome] = []
            for n, fd in enumerate(fds):
                it = items[index[n]]
                size = os.fstat(fd).st_size
                if size != it.size:
                    out.append(
                        IntegrityError(f"{it.key}: {size} bytes in the store, expected {it.size}")
                    )
                    continue
                h = hashlib.sha256()
                while chunk := os.read(fd, CHUNK):
                    h.update(chunk)
                got = h.hexdigest()
                if hmac.compare_digest(got, it.sha256):
                    out.append("readback")
                else:
                    out.append(
                        IntegrityError(
                            f"{it.key}: store copy hashes to {got[:16]}…, expected "
                            f"{it.sha256[:16]}…"
                        )
                    )
            return out
        finally:
            for fd in fds:
                os.close(fd)

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


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
