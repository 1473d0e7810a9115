"""Clearing a camera (SPEC §2 step 7, `camera.clear = "after_upload"`): remove from the camera
only files that are verified in the evidence store and unchanged since they were offloaded.

"Unchanged" is proved, not assumed: same size, same mtime, and the bytes on the camera hash to
what is in the store. A session with a failed or unstable file is never cleared: the camera
still holds evidence we do not have.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections.abc import Sequence
from pathlib import Path

from dockd.events import CameraStatus, Notice
from dockd.journal import FileRow, FileState, SessionRow
from dockd.observers.log import get as get_log
from dockd.runtime import Runtime

CHUNK = 4 * 1024 * 1024


def refusal(files: Sequence[FileRow]) -> str | None:
    """Why this session's camera may not be cleared, or None if it may."""
    bad = [f for f in files if f.state in (FileState.FAILED, FileState.UNSTABLE)]
    if bad:
        return f"{len(bad)} file(s) failed or kept changing; the camera keeps everything"
    if any(f.state in (FileState.PENDING, FileState.VERIFIED) for f in files):
        return "not every file is in the store yet"
    return None


def unchanged_on_camera(path: bytes, f: FileRow) -> bool:
    """The camera's file is still the one we stored (size, mtime and SHA-256)."""
    try:
        st = os.lstat(path)
        if st.st_size != f.size or st.st_mtime_ns != f.mtime_ns:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, CHUNK):
            h.update(chunk)
    except OSError:
        return False
    finally:
        os.close(fd)
    return f.sha256 is not None and hmac.compare_digest(h.hexdigest(), f.sha256)


def _remove(path: bytes) -> None:
    os.unlink(path)
    dir_fd = os.open(os.path.dirname(path) or b".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


async def clear_session(rt: Runtime, session: SessionRow, root: Path) -> None:
    j = rt.journal.journal
    log = get_log(dock_id=rt.config.dock.id, camera=session.camera, session_id=session.id)
    files = await rt.journal(j.session_files, session.id)
    why = refusal(files)
    if why is not None:
        log.info("clear_refused", reason=why)
        rt.bus.publish(Notice("clear_refused", session.camera, session.id, {"reason": why}))
        return
    stored = [f for f in files if f.state == FileState.STORED]
    rt.bus.publish(
        CameraStatus(
            session.camera,
            "clearing",
            session.id,
            len(stored),
            0,
            sum(f.size for f in stored),
            0,
            True,
        )
    )
    kept = 0
    for f in stored:
        path = os.path.join(os.fsencode(root), f.raw_path or f.path.encode())
        if not await asyncio.to_thread(unchanged_on_camera, path, f):
            kept += 1
            log.warning("clear_skipped_changed", path=f.path)
            continue
        try:
            await asyncio.to_thread(_remove, path)
        except OSError as exc:
            kept += 1
            log.warning("clear_failed", path=f.path, error=exc.strerror)
            continue
        await rt.journal(j.file_cleared, f)
    if kept == 0:
        await rt.journal(j.session_cleared, session.id)
    rt.bus.publish(
        CameraStatus(
            session.camera,
            "cleared",
            session.id,
            len(stored),
            len(stored) - kept,
            0,
            0,
            True,
            f"{kept} file(s) left on the camera" if kept else None,
        )
    )
