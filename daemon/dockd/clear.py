"""Clearing a camera (SPEC §2 step 7, `camera.clear = "after_upload"`): remove from the camera
only files that are verified in the evidence store and unchanged since they were offloaded.

"Unchanged" is proved, not assumed, file by file, on the root the camera's source opened for
clearing (a USB camera: its own read-write mount, not the offload's read-only one):
- the file is still a regular file at the path the walk recorded, and that exact name is in its
  directory's listing: on FAT and exFAT a lookup ignores case, so `clip.mp4` would find
  `CLIP.MP4`; only the name as it was recorded is ever removed, never a case-folded guess;
- same size and same mtime, to the nanosecond. No tolerance: the same driver shows the same
  medium with the same times (measured for ext4, FAT32 through fusefat and exFAT through
  exfat-fuse, read-only then read-write, docs/usb.md); a camera read through another driver or
  in another time zone shows other times, and its files are then kept, never guessed equal;
- the bytes on the camera hash to the SHA-256 that is in the store — the final word;
- the file opened for hashing is the one the name showed (same inode, size and mtime), and
  right before the unlink the name still shows a regular file of that size and mtime.

A session with a failed or unstable file is never cleared: the camera still holds evidence we do
not have. Which files to try, and whether to try at all, are pure functions below; the I/O is in
`changed_on_camera` and `clear_session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from dockd.events import CameraStatus, Notice
from dockd.journal import FileRow, FileState, SessionRow
from dockd.observers.log import get as get_log
from dockd.runtime import Runtime
from dockd.sources.base import ClearRoot

CHUNK = 4 * 1024 * 1024

# -- decisions (pure) -------------------------------------------------------------------------


def refusal(files: Sequence[FileRow]) -> str | None:
    """Why this session's camera may not be cleared, or None if it may."""
    bad = [f for f in files if f.state in (FileState.FAILED, FileState.UNSTABLE)]
    if bad:
        return f"{len(bad)} file(s) failed or kept changing; the camera keeps everything"
    if any(f.state in (FileState.PENDING, FileState.VERIFIED) for f in files):
        return "not every file is in the store yet"
    return None


def why_not_now(*, docked: bool, reading: bool, clearable: bool) -> str | None:
    """Why the camera of a just-uploaded session cannot be cleared now (None: try). The files
    then stay on the camera; a later docking does not offload them again (they are verified for
    that camera), and no later step clears them."""
    if not docked:
        return "the camera was undocked before its upload was complete; nothing removed"
    if reading:
        return "the camera is being offloaded again (a new session); nothing removed"
    if not clearable:
        return "the camera's source cannot delete from it; nothing removed"
    return None


@dataclass(frozen=True)
class Plan:
    clear: tuple[FileRow, ...]  # stored: to be checked, and removed if unchanged
    keep: tuple[FileRow, ...]  # stored, but not the camera's files (ClearRoot.keep)


def plan(files: Sequence[FileRow], keep: frozenset[str] = frozenset()) -> Plan:
    """Only STORED files are candidates (a CLEARED one is gone already; anything else is not in
    the store). Paths the source names in `keep` are never touched."""
    stored = [f for f in files if f.state == FileState.STORED]
    return Plan(
        clear=tuple(f for f in stored if f.path not in keep),
        keep=tuple(f for f in stored if f.path in keep),
    )


def stat_differs(st: os.stat_result, f: FileRow) -> str | None:
    """What says, from its metadata alone, that the camera's file is not the one offloaded."""
    if not stat.S_ISREG(st.st_mode):
        return "no longer a regular file"
    if st.st_size != f.size:
        return f"size changed ({f.size} -> {st.st_size})"
    if st.st_mtime_ns != f.mtime_ns:
        return f"mtime changed ({f.mtime_ns} -> {st.st_mtime_ns} ns)"
    return None


def camera_path(root: bytes, f: FileRow) -> bytes:
    """The file's path on the camera: the walk's own bytes (raw when they were not UTF-8)."""
    return os.path.join(root, f.raw_path or f.path.encode())


# -- I/O --------------------------------------------------------------------------------------


class Listings:
    """Directory listings, read once per directory during one clear."""

    def __init__(self) -> None:
        self._names: dict[bytes, frozenset[bytes]] = {}

    def has(self, path: bytes) -> bool:
        parent, name = os.path.split(path)
        names = self._names.get(parent)
        if names is None:
            names = self._names[parent] = frozenset(os.listdir(parent))
        return name in names


def changed_on_camera(path: bytes, f: FileRow, listings: Listings | None = None) -> str | None:
    """None if the camera's file at `path` is still the one stored (name, size, mtime, SHA-256),
    else what differs."""
    try:
        st = os.lstat(path)
        if (why := stat_differs(st, f)) is not None:
            return why
        if listings is not None and not listings.has(path):
            return "not under this exact name (another case?)"
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return "gone from the camera"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    try:
        if not _same_file(os.fstat(fd), st):
            return "replaced while it was checked"
        h = hashlib.sha256()
        while chunk := os.read(fd, CHUNK):
            h.update(chunk)
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    finally:
        os.close(fd)
    if f.sha256 is None or not hmac.compare_digest(h.hexdigest(), f.sha256):
        return "its bytes differ from the stored copy"
    return None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (
        b.st_dev,
        b.st_ino,
        b.st_size,
        b.st_mtime_ns,
    )


def _remove(path: bytes, f: FileRow) -> tuple[str | None, str | None]:
    """Unlink a file `changed_on_camera` found unchanged, if its name still shows it, and fsync
    its directory. Returns (why it stays, or None when removed; the fsync's error, if any).
    Raises OSError when the unlink fails (then nothing was removed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "gone from the camera", None
    if stat_differs(st, f) is not None:
        return "changed while it was checked", None
    os.unlink(path)
    try:
        dir_fd = os.open(os.path.dirname(path) or b".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:  # the unlink happened: it is recorded all the same
        return None, exc.strerror or str(exc)
    return None, None


async def _remove_and_record(rt: Runtime, path: bytes, f: FileRow) -> str | None:
    # the intent is journalled before the unlink: a kill -9 between the two must not leave a
    # file gone from the camera with no custody record of the step that removed it
    await rt.journal(
        rt.journal.journal.custody_event_tx,
        "clearing_from_camera",
        f.session_id,
        path=f.path,
        sha256=f.sha256,
    )
    why, fsync_error = await asyncio.to_thread(_remove, path, f)
    if why is None:
        await rt.journal(rt.journal.journal.file_cleared, f)
        if fsync_error is not None:
            log = get_log(dock_id=rt.config.dock.id, camera=f.camera, session_id=f.session_id)
            log.warning("clear_dir_fsync_failed", path=f.path, error=fsync_error)
    return why


async def _uncancelled(work: Coroutine[Any, Any, str | None]) -> str | None:
    """Run `work` to its end even if the caller is cancelled meanwhile (then re-raised after
    it): a file is never removed from the camera without the journal recording it."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


async def clearable_files(rt: Runtime, session: SessionRow) -> list[FileRow] | None:
    """The session's files, or None (logged and told) when the camera may not be cleared."""
    files = await rt.journal(rt.journal.journal.session_files, session.id)
    why = refusal(files)
    if why is not None:  # the log observer logs the notice
        rt.bus.publish(Notice("clear_refused", session.camera, session.id, {"reason": why}))
        return None
    return files


async def clear_session(
    rt: Runtime,
    session: SessionRow,
    target: ClearRoot,
    files: Sequence[FileRow] | None = None,
    *,
    still_docked: Callable[[], bool] = lambda: True,
) -> None:
    """Remove the session's stored, unchanged files from `target.root`. Stops, leaving the rest,
    as soon as `still_docked()` is false."""
    j = rt.journal.journal
    log = get_log(dock_id=rt.config.dock.id, camera=session.camera, session_id=session.id)
    if files is None:
        files = await clearable_files(rt, session)
        if files is None:
            return
    elif (why := refusal(files)) is not None:  # the caller's list: judged all the same
        rt.bus.publish(Notice("clear_refused", session.camera, session.id, {"reason": why}))
        return
    todo = plan(files, target.keep)
    for f in todo.keep:
        log.info("clear_kept", path=f.path, reason=target.why_keep or "kept by the source")
    total = sum(f.size for f in todo.clear)
    log.info("clear_started", root=str(target.root), files=len(todo.clear), bytes=total)
    rt.bus.publish(
        CameraStatus(session.camera, "clearing", session.id, len(todo.clear), 0, total, 0, True)
    )
    root = os.fsencode(target.root)
    listings = Listings()
    kept = 0
    removed = 0
    removed_bytes = 0
    for f in todo.clear:
        if not still_docked():
            left = len(todo.clear) - removed - kept
            log.warning("clear_stopped", reason="the camera was undocked", left_on_camera=left)
            return
        path = camera_path(root, f)
        why = await asyncio.to_thread(changed_on_camera, path, f, listings)
        if why is None:
            try:
                why = await _uncancelled(_remove_and_record(rt, path, f))
            except OSError as exc:
                kept += 1
                log.warning("clear_failed", path=f.path, error=exc.strerror or str(exc))
                continue
        if why is not None:
            kept += 1
            log.warning("clear_skipped_changed", path=f.path, reason=why)
            continue
        removed += 1
        removed_bytes += f.size
        log.info("file_cleared", path=f.path, size=f.size)
    if kept == 0:
        await rt.journal(j.session_cleared, session.id)
    log.info("clear_done", removed=removed, kept=kept, not_camera_files=len(todo.keep))
    rt.bus.publish(
        CameraStatus(
            session.camera,
            "cleared",
            session.id,
            len(todo.clear),
            removed,
            total,
            removed_bytes,
            True,
            f"{kept} file(s) left on the camera" if kept else None,
        )
    )
