"""Making writes durable: the primitives staging and the filesystem store share.

A group of files is made durable with one syncfs(2) only where that is known to reach the disk:
ext2/3/4, XFS and btrfs, where it writes back every dirty inode of the filesystem, commits the
journal and flushes the device cache (and, since Linux 5.8, reports a writeback error of any of
them). Elsewhere each file is fsynced: on FUSE the kernel does not pass syncfs on to the server
(only virtiofs gets FUSE_SYNCFS), so a FUSE filesystem's own durability — a NAS gateway, the
test suite's power-cut layer — never hears of it; NFS and SMB are left to their own fsync.
The fault campaign found the first version of the staging path relying on syncfs alone: on a
FUSE staging filesystem a power cut lost files the journal held verified.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# statfs f_type of the local disk filesystems where syncfs(2) makes every file durable at once
SYNCFS_TYPES = frozenset({0xEF53, 0x58465342, 0x9123683E})  # ext2/3/4, XFS, btrfs

_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
# errno of a sync_file_range(2) that cannot be used here (not of a write that failed)
_RANGE_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP})


def fsync_dir(path: Path) -> None:
    """Make a rename or create in `path` durable."""
    fd = open_dir(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def syncfs(fd: int) -> bool:
    """syncfs(2) on the filesystem of `fd` where it is known to reach the disk: True when done.
    False where it is not available or not trusted (see above): the caller fsyncs each file.
    Raises OSError when it fails (a writeback error of the filesystem since `fd` was opened)."""
    if _syncfs is None or fs_type(fd) not in SYNCFS_TYPES:
        return False
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, f"syncfs: {os.strerror(err)}")
    return True


def sync_fds(dir_fd: int, fds: Sequence[int]) -> None:
    """Every open file in `fds` (on the filesystem of `dir_fd`) durable: one syncfs where it
    reaches the disk, else writeback started on all (so one journal commit tends to cover them)
    and then each fsynced. The directory entries are the caller's (fsync of the directory)."""
    if not fds or syncfs(dir_fd):
        return
    if _sync_file_range is not None:
        for fd in fds:
            _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # only a head start
    for fd in fds:
        os.fsync(fd)


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Start writing `length` bytes of `fd` from `offset` to the device without waiting: True
    when started, False where sync_file_range(2) is not available (nothing was done). Raises
    OSError for a writeback error (EIO, ENOSPC): the range may have consumed the error that a
    later fsync of this descriptor would have reported, so it must not be ignored."""
    return _file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def wait_written(fd: int, offset: int, length: int) -> bool:
    """Write the range to the device and wait until it is there: its pages are then clean, so
    POSIX_FADV_DONTNEED evicts them and a read comes from the device. Not durability: neither
    the file's metadata nor the device's write cache is flushed (an fsync does that). Returns
    and raises as `start_writeback`."""
    flags = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
    return _file_range(fd, offset, length, flags)


def _file_range(fd: int, offset: int, length: int, flags: int) -> bool:
    if _sync_file_range is None:
        return False
    if _sync_file_range(fd, offset, length, flags) != 0:
        err = ctypes.get_errno()
        if err in _RANGE_UNSUPPORTED:
            return False
        raise OSError(err, f"sync_file_range: {os.strerror(err)}")
    return True


def sync_paths(dir_fd: int, paths: Sequence[Path]) -> None:
    """`sync_fds` for files named by path (opened only where each must be fsynced)."""
    if not paths or syncfs(dir_fd):
        return
    for p in paths:
        f = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(f)
        finally:
            os.close(f)


def fs_type(fd: int) -> int | None:
    """statfs f_type of the filesystem holding `fd`, None if it cannot be told."""
    if _fstatfs is None:
        return None
    buf = _StatFs()
    if _fstatfs(fd, ctypes.byref(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF


class _StatFs(ctypes.Structure):
    # only the leading field is read; the buffer is big enough for the whole struct statfs
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def _libc_fn(name: str, *argtypes: type[ctypes._SimpleCData[Any]]) -> Any:
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [*argtypes]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _libc_fn("syncfs", ctypes.c_int)
_fstatfs = _libc_fn("fstatfs", ctypes.c_int, ctypes.c_void_p)
_sync_file_range = _libc_fn(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)
