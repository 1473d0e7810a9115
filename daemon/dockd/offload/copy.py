"""One file from camera to staging: chunked copy, SHA-256 inline, fsync, rename, read-back.

Runs whole in one worker thread (one hop per file); the event loop only schedules and records.
The steps, and why each is there:

1. open the source with O_NOFOLLOW (and O_NONBLOCK, so a FIFO swapped in cannot hang the open)
   and check it is still a regular file (the walk saw it, but camera content is untrusted and a
   directory source can change under us);
2. read chunk by chunk into one reused buffer, hash, write to `<id>.partial` (O_EXCL, 0600);
3. fstat the source again: a size or mtime that moved means the copy is of a moving target;
4. as it goes, start each chunk's write-back, and read the chunk before it back from the device
   (its write-back waited for, its pages dropped: POSIX_FADV_DONTNEED evicts clean pages) into
   a second SHA-256 (`_ReadBack`), so the disk writes while the source is read;
5. fsync the data, read back the rest, and compare the read-back's hash with the inline one;
   only then rename to the final name and fsync the directory, so the final name never points
   at bytes that are not on disk or not proven. On filesystems without a page cache of their
   own (tmpfs) there is nothing to drop and the read-back proves only what memory holds;
   staging belongs on a real disk.

Small files (`CopyJob.durable=False`, chosen by the session) stop after the rename: steps 4 and
5 are owed, and `settle_group` pays them for a whole group at once: one syncfs(2) of
the staging filesystem where that reaches the disk (`dockd.durable`; an fsync per copy
elsewhere) and one directory fsync, then each file read back past the cache. A
per-file fsync costs a journal commit of the filesystem each (about 1 300/s on a fast SSD), which
bounded the offload of thousands of small files; the group pays one. The final name may point at
bytes that are not on disk yet in between, but nothing under it is recorded verified until the
group is settled, and after a crash an unrecorded file is simply copied again over it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import mmap
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash

from dockd import durable
from dockd.durable import fsync_dir
from dockd.errors import CameraGone, IntegrityError, ReadFailed, SourceChanged, StagingFull

_PAGE = mmap.PAGESIZE

# chunks written but not yet read back, per copy: their write-back runs while the source is read
READBACK_LAG = 1

# errno values that mean the device went away rather than that one file is bad
_GONE = frozenset({errno.ENODEV, errno.ENXIO, errno.ESHUTDOWN, errno.ENOTCONN})


class Progress:
    """Bytes copied so far, written by the copy thread and sampled by the event loop.

    A plain int attribute: one writer, readers tolerate a stale value, and the GIL makes the
    store atomic. No lock, no callback into the loop from the copy path.
    """

    __slots__ = ("bytes_done",)

    def __init__(self) -> None:
        self.bytes_done = 0


@dataclass(frozen=True)
class Copied:
    sha256: str
    xxh128: str  # for the ASC MHL history, which has no SHA-256 format; computed inline
    size: int
    mtime_ns: int


@dataclass
class CopyJob:
    source: bytes  # absolute path on the camera
    staged: Path  # final staging path; `.partial` beside it while copying
    size: int  # as the walk saw it
    mtime_ns: int
    verify_source: bool = False
    read_attempts: int = 3
    # False when the caller fsyncs the directory itself before recording the file (batching)
    sync_dir: bool = True
    # False: copy, hash and rename only; the fsyncs and the read-back are owed to settle_group
    durable: bool = True
    # Test seam for faults a real disk cannot produce on demand (a bit flipped at rest in
    # staging): called after the rename (and, for a grouped file, after the group's sync), before
    # the read-back.
    before_readback: Callable[[Path], None] | None = None
    # another (small) camera file, soon to be copied, whose read-ahead is started first
    prefetch: bytes | None = None


def copy_file(job: CopyJob, buf: bytearray, progress: Progress, cancel: threading.Event) -> Copied:
    """Copy, hash, fsync, read back, rename. Raises CameraGone, SourceChanged, ReadFailed,
    StagingFull or IntegrityError; on any of them no file is left under the final name.

    With `job.durable` False: copy, hash, rename (replacing what a crash may have left under the
    final name), and the source re-read if asked; the rest is owed to `settle_group`."""
    partial = job.staged.with_name(job.staged.name + ".partial")
    if job.prefetch is not None:
        _start_readahead(job.prefetch)
    try:
        digest, xxh128 = _copy(job, partial, buf, progress, cancel)
        os.rename(partial, job.staged)
    except BaseException:
        _unlink_quietly(partial)
        raise
    if job.durable and job.sync_dir:
        try:
            fsync_dir(job.staged.parent)
        except BaseException:
            _unlink_quietly(job.staged)  # its name is not durable: not evidence yet
            raise
    if job.verify_source:
        _check_source_again(job, buf, cancel, digest)
    return Copied(digest, xxh128, job.size, job.mtime_ns)


def _check_source_again(job: CopyJob, buf: bytearray, cancel: threading.Event, digest: str) -> None:
    try:
        again = _hash_source(job, buf, cancel)
    except BaseException:
        _unlink_quietly(job.staged)
        raise
    if not hmac.compare_digest(again, digest):
        _unlink_quietly(job.staged)
        raise SourceChanged(f"{job.source!r}: source re-read hashes differently from the copy")


def _copy(
    job: CopyJob, partial: Path, buf: bytearray, progress: Progress, cancel: threading.Event
) -> tuple[str, str]:
    """Returns (SHA-256, xxh128) of the bytes written; for a durable job, only once they are
    fsynced and read back from the device as the same SHA-256 (else IntegrityError)."""
    src = _open_source(job, cancel)
    try:
        before = os.fstat(src)
        _check_unchanged(job, before)
        dst = _create_partial(partial)
        try:
            h = hashlib.sha256()
            x = xxhash.xxh3_128()
            view = memoryview(buf)
            back = _ReadBack(dst, partial, job.before_readback) if job.durable else None
            offset = 0
            while True:
                if cancel.is_set():
                    raise CameraGone(f"{job.source!r}: camera undocked during copy")
                n = _read_at(src, view, offset, job, cancel)
                if n == 0:
                    break
                chunk = view[:n]
                h.update(chunk)
                x.update(chunk)
                _write_all(dst, chunk, partial)
                offset += n
                progress.bytes_done += n
                if back is not None:
                    back.written(offset, view)  # the chunk is written: `buf` is free again
            after = os.fstat(src)
            if offset != job.size:
                raise SourceChanged(f"{job.source!r}: read {offset} bytes, expected {job.size}")
            _check_unchanged(job, after)
            digest = h.hexdigest()
            if back is not None:
                try:
                    os.fsync(dst)
                except OSError as exc:
                    raise _staging_error(exc, partial) from exc
                got = back.finish(offset, view)
                if not hmac.compare_digest(got, digest):
                    raise IntegrityError(
                        f"{job.staged}: read back from staging as {got[:16]}…, "
                        f"copied as {digest[:16]}…"
                    )
            return digest, x.hexdigest()
        finally:
            os.close(dst)
    finally:
        os.close(src)


class _ReadBack:
    """A durable copy's read-back from the device, a chunk behind its writes.

    After each chunk is written its write-back is started (sync_file_range), and the chunk
    written before it, whose write-back has had a whole chunk's copy to run, is waited for,
    evicted from the page cache (clean pages are evicted by POSIX_FADV_DONTNEED) and read back
    into the SHA-256 of the read-back. The disk then writes while the source is read instead
    of all at once at the fsync, and only the last chunk is read back after it: a file's
    fsync-and-read-back tail, which nothing else overlaps at the end of a camera, shrinks from
    the whole file to one chunk. The fsync still comes before the copy counts as verified
    (the caller compares only after `finish`). Where sync_file_range cannot be used, every
    byte is read back after the fsync, as a whole-file read-back would.
    """

    __slots__ = ("_behind", "_done", "_fd", "_path", "_seam", "_sha", "_started", "_streaming")

    def __init__(self, fd: int, path: Path, seam: Callable[[Path], None] | None) -> None:
        self._fd, self._path, self._seam = fd, path, seam
        self._sha = hashlib.sha256()
        self._done = 0  # bytes read back
        self._started = 0  # bytes whose write-back was started
        self._behind: deque[int] = deque()  # ends of the written chunks not yet read back
        self._streaming = True

    def written(self, end: int, view: memoryview) -> None:
        """Bytes up to `end` are written."""
        # Ranges end on a page boundary: POSIX_FADV_DONTNEED leaves a page only partly inside
        # its range in the cache, and a short read from the source must not leave a page
        # that is read back from memory.
        end -= end % _PAGE
        if not self._streaming or end <= self._started:
            return
        try:
            # this chunk's write-back queued first, so the disk has it while an older one's is
            # waited for and read back
            if not durable.start_writeback(self._fd, self._started, end - self._started):
                self._streaming = False
                return
            self._started = end
            self._behind.append(end)
            while len(self._behind) > READBACK_LAG:
                upto = self._behind.popleft()
                if not durable.wait_written(self._fd, self._done, upto - self._done):
                    self._streaming = False
                    return
                self._read_back(upto, view)
        except OSError as exc:
            raise _staging_error(exc, self._path) from exc

    def finish(self, end: int, view: memoryview) -> str:
        """After the fsync: read back the rest; the SHA-256 of every byte read back."""
        self._read_back(end, view)
        return self._sha.hexdigest()

    def _read_back(self, end: int, view: memoryview) -> None:
        if self._seam is not None:  # test seam: between the write and the first read-back
            seam, self._seam = self._seam, None
            seam(self._path)
        os.posix_fadvise(self._fd, self._done, end - self._done, os.POSIX_FADV_DONTNEED)
        while self._done < end:
            n = os.preadv(self._fd, [view[: end - self._done]], self._done)
            if n == 0:
                raise IntegrityError(f"{self._path}: shorter when read back than written")
            self._sha.update(view[:n])
            self._done += n


def _create_partial(partial: Path) -> int:
    """Create `<id>.partial` (O_EXCL, 0600). One left by an earlier attempt or a crash is never
    evidence: it is removed and the create tried once more. (copy_file removes its own partial
    on every failure and the session removes a crash's on resume, so the common path spends no
    unlink on a name that is not there.)"""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC  # read: the read-back
    try:
        try:
            return os.open(partial, flags, 0o600)
        except FileExistsError:
            _unlink_quietly(partial)
            return os.open(partial, flags, 0o600)
    except OSError as exc:
        raise _staging_error(exc, partial) from exc


def _open_source(job: CopyJob, cancel: threading.Event) -> int:
    """Open with a bounded retry of EWOULDBLOCK (a file under another process's lease)."""
    for attempt in range(1, job.read_attempts + 1):
        try:
            return _open_source_once(job, cancel)
        except BlockingIOError as exc:
            if attempt == job.read_attempts:
                raise ReadFailed(
                    f"{job.source!r}: held by another process (lease) through {attempt} attempts"
                ) from exc
            if cancel.wait(min(0.1 * 2**attempt, 2.0)):
                raise CameraGone(f"{job.source!r}: camera undocked during copy") from exc
    raise AssertionError("unreachable")


def _start_readahead(path: bytes) -> None:
    """Ask the kernel to start reading a camera file that will be copied soon, so small files'
    reads are in flight together instead of one cold read per file per worker. Advisory only:
    any failure is left for that file's own copy to meet and report. Opened as a copy opens
    its source (no symlink, no blocking on a FIFO), and only a regular file is advised."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_source_once(job: CopyJob, cancel: threading.Event) -> int:
    # O_NONBLOCK: a FIFO put where the file was must not hang the open waiting for a writer. It
    # changes nothing for a regular file and is cleared once the source is known to be one; a
    # file under a lease answers EWOULDBLOCK instead of blocking, and the caller retries.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(job.source, flags)
    except BlockingIOError:
        raise
    except OSError as exc:
        if cancel.is_set():
            raise CameraGone(f"{job.source!r}: camera gone ({exc.strerror})") from exc
        if exc.errno == errno.ELOOP:
            raise SourceChanged(f"{job.source!r}: became a symlink") from exc
        if exc.errno == errno.ENOENT:
            raise SourceChanged(f"{job.source!r}: disappeared") from exc
        if _not_regular(job.source):  # a socket (ENXIO) or a device node (nodev: EACCES)
            raise SourceChanged(f"{job.source!r}: is no longer a regular file") from exc
        if exc.errno in _GONE:
            raise CameraGone(f"{job.source!r}: camera gone ({exc.strerror})") from exc
        raise ReadFailed(f"{job.source!r}: cannot open ({exc.strerror})") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SourceChanged(f"{job.source!r}: is no longer a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _not_regular(path: bytes) -> bool:
    """True when `path` is there but is not a regular file (False when it cannot be seen)."""
    try:
        return not stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _check_unchanged(job: CopyJob, st: os.stat_result) -> None:
    if st.st_size != job.size or st.st_mtime_ns != job.mtime_ns:
        raise SourceChanged(
            f"{job.source!r}: changed while copied (size {job.size}→{st.st_size}, "
            f"mtime {job.mtime_ns}→{st.st_mtime_ns})"
        )


def _read_at(fd: int, view: memoryview, offset: int, job: CopyJob, cancel: threading.Event) -> int:
    """pread into `view`, retrying a failed read with a bounded backoff; an undock wakes it."""
    for attempt in range(1, job.read_attempts + 1):
        try:
            return os.preadv(fd, [view], offset)
        except OSError as exc:
            if cancel.is_set() or exc.errno in _GONE:
                raise CameraGone(f"{job.source!r}: camera gone ({exc.strerror})") from exc
            if attempt == job.read_attempts:
                raise ReadFailed(
                    f"{job.source!r}: read at byte {offset} failed {attempt} times ({exc.strerror})"
                ) from exc
            if cancel.wait(min(0.1 * 2**attempt, 2.0)):
                raise CameraGone(f"{job.source!r}: camera undocked during copy") from exc
    raise AssertionError("unreachable")


def _write_all(fd: int, data: memoryview, path: Path) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except OSError as exc:
            raise _staging_error(exc, path) from exc
        data = data[n:]


def _staging_error(exc: OSError, path: Path) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StagingFull(f"{path}: staging is full")
    return exc


def _hash_source(job: CopyJob, buf: bytearray, cancel: threading.Event) -> str:
    src = _open_source(job, cancel)
    try:
        with contextlib.suppress(OSError):  # advisory; a FUSE camera may not support it
            os.posix_fadvise(src, 0, 0, os.POSIX_FADV_DONTNEED)
        h = hashlib.sha256()
        view = memoryview(buf)
        offset = 0
        while n := _read_at(src, view, offset, job, cancel):
            h.update(view[:n])
            offset += n
        return h.hexdigest()
    finally:
        os.close(src)


def _hash_fd(fd: int, buf: bytearray) -> str:
    h = hashlib.sha256()
    view = memoryview(buf)
    while n := os.readv(fd, [view]):
        h.update(view[:n])
    return h.hexdigest()


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@dataclass(frozen=True)
class Owed:
    """A copy renamed into staging whose durability and read-back are still owed (a small file
    of a group): its final path, the SHA-256 it was copied with, and the read-back test seam."""

    staged: Path
    sha256: str
    before_readback: Callable[[Path], None] | None = None


def settle_group(dir_fd: int, owed: Sequence[Owed], buf: bytearray) -> list[bool]:
    """Pay what a group of copies in one directory owes before it can be recorded verified: make
    their bytes and renames durable (`durable.sync_paths`: one syncfs of the staging filesystem
    where that reaches the disk, else an fsync per copy; then one fsync of the directory open
    as `dir_fd`), then read each back from the device past the page cache and compare with its
    inline SHA-256. The sync comes first because POSIX_FADV_DONTNEED does not drop dirty
    pages: a read-back before it would read memory.

    Returns, per copy, whether it is verified. A copy that is not (its hash differs, or it could
    not be read back) is removed from under its final name. A failed sync fails the whole group:
    every copy is removed and reported unverified, to be copied again one by one (whose per-file
    fsync reports the error where it belongs)."""
    paths = [o.staged for o in owed]
    try:
        durable.sync_paths(dir_fd, paths)
        os.fsync(dir_fd)
    except OSError:
        for p in paths:
            _unlink_quietly(p)
        return [False] * len(owed)
    # Drop every copy's pages, and ask the device for all of them at once (WILLNEED starts the
    # reads): the group's reads queue together instead of paying one file's latency after
    # another. The bytes hashed below are still the device's: the cache held none of them.
    fds: list[int | None] = []
    try:
        for o in owed:
            fds.append(_open_dropped(o))
        ok: list[bool] = []
        for o, fd in zip(owed, fds, strict=True):
            good = False
            if fd is not None:
                with contextlib.suppress(OSError):
                    good = hmac.compare_digest(_hash_fd(fd, buf), o.sha256)
            if not good:
                _unlink_quietly(o.staged)
            ok.append(good)
        return ok
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)


def _open_dropped(o: Owed) -> int | None:
    """Open a settled copy for its read-back with its pages dropped and its read started;
    None when it cannot be (it then counts as not verified)."""
    try:
        if o.before_readback is not None:
            o.before_readback(o.staged)
        fd = os.open(o.staged, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        os.close(fd)
        return None
    with contextlib.suppress(OSError):  # advisory: without it the read just comes later
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    return fd
