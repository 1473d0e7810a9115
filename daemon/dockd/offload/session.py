"""One docked camera's offload: open (or resume) its session, walk, copy and verify every new
file into staging, record each in the journal, and hand the session to the upload queue.

The session only schedules and records; copying runs in the offload thread pool (copy.py).
An undock sets `cancel`: the copy thread stops at the next chunk, the partial file is removed,
and the session is recorded as interrupted. Nothing is reported verified before its journal
record is committed.

Files of at most GROUP_MAX_BYTES are copied and renamed without an fsync or a read-back of their
own; they are recorded in groups (FLUSH_FILES / FLUSH_SECONDS), each group made durable by one
syncfs and one directory fsync and then read back file by file before its one journal
transaction (copy.settle_group). A grouped file whose read-back fails is copied again on the
per-file path (fsync, rename, read-back), within `offload.copy_attempts`. A group not yet
settled when the camera is undocked (or the daemon stops) is not recorded: its copies are
removed, and the next docking copies those files again, as it would after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from dockd.durable import fsync_dir, open_dir
from dockd.errors import (
    CameraGone,
    IntegrityError,
    ReadFailed,
    SourceChanged,
    StagingFull,
)
from dockd.events import CameraStatus, Notice
from dockd.events import Progress as ProgressEvent
from dockd.ids import CameraId, SessionId, utc_now
from dockd.journal import FileRow, FileState, SessionRow, SessionState
from dockd.journal.offload import Verified
from dockd.observers.log import get as get_log
from dockd.offload.copy import CopyJob, Owed, Progress, copy_file, settle_group
from dockd.offload.walk import Filter, Found, Skipped, walk
from dockd.runtime import Runtime, free_bytes
from dockd.sources.base import Docked

WALK_BATCH = 500
PAGE = 500
# journal commits of verified files are batched: a large file was fsynced and read back before
# it joins a batch; a small one (at most GROUP_MAX_BYTES) owes both to the batch's flush
FLUSH_FILES = 64
# how far ahead of the copies a small file's read-ahead is started (files)
PREFETCH_AHEAD = 8
FLUSH_SECONDS = 0.25
# at most this size a file is made durable and read back with its group, not on its own: its
# fsync would cost far more than its copy, while a large file's copy hides its read-back
GROUP_MAX_BYTES = 1024**2
PROGRESS_SECONDS = 0.25
SPACE_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class _Done:
    """A file copied into staging, waiting in the batch for its journal record. `job` is set
    while its durability and read-back are still owed (a grouped small file)."""

    verified: Verified
    job: CopyJob | None = None


def staged_path(staging: Path, session_id: str, file_id: int) -> Path:
    """Staging names are file ids, not camera names: camera names are untrusted and may not fit
    this filesystem (a 255-character FAT name can be 765 bytes of UTF-8)."""
    return staging / session_id / str(file_id)


class CameraSession:
    def __init__(self, rt: Runtime, docked: Docked, camera: CameraId) -> None:
        self.rt = rt
        self.docked = docked
        self.camera = camera
        self.cancel = threading.Event()  # seen by the copy thread at every chunk
        self._cancelled = asyncio.Event()  # the same, for waits on the loop
        self.session_id: SessionId | None = None
        self.state: SessionState | None = None
        self._progresses: list[Progress] = []  # one per copy worker (one writer each)
        self._batch: list[_Done] = []
        # file id -> the camera path whose read-ahead its copy starts (files in the queue only)
        self._prefetch: dict[int, bytes] = {}
        self._dir_fd = -1  # the session's staging folder, open for syncfs while copying
        self._workers_left = 0
        self._recording: asyncio.Task[None] | None = None  # the last batch's journal transaction
        self._last_flush = 0.0
        self._files_total = 0
        self._bytes_total = 0
        self._files_done = 0
        self._bytes_before = 0  # bytes of files finished, so progress never goes down
        self._parking = False
        # ended early because staging filled up: the daemon starts the next session for the
        # same docked camera, which takes only what this one did not
        self.split = False
        self._verified_count = 0
        self._log = get_log(dock_id=rt.config.dock.id, camera=camera)
        # Test seam (CopyJob.before_readback for every copy of this session, grouped or not):
        # called with a staged copy once it is durable, before it is read back.
        self.before_readback: Callable[[Path], None] | None = None

    def undock(self) -> None:
        self.cancel.set()
        self._cancelled.set()

    @property
    def parked(self) -> bool:
        return self._parking

    def park(self) -> None:
        """Daemon shutdown: stop after the chunk in hand and leave the session offloading in the
        journal, so the next start resumes it if the camera is still docked."""
        self._parking = True
        self.cancel.set()
        self._cancelled.set()

    async def run(self) -> SessionState:
        rt = self.rt
        officer = rt.config.officer(self.camera)
        session, resumed = await rt.journal(
            rt.journal.journal.open_session,
            self.camera,
            self.docked.vendor_id,
            self.docked.model_id,
            officer,
            self.docked.location,
            self.docked.mount,
        )
        self.session_id = session.id
        self._log = self._log.bind(session_id=session.id)
        self._log.info("session_opened", resumed=resumed, root=str(self.docked.root))
        self._status("docked")
        interrupted = False
        async with rt.camera_slots:
            try:
                if not self.cancel.is_set():
                    await self._wait_for_space()
                    await self._offload(session)
            except CameraGone as exc:
                self._log.warning("camera_gone", error=str(exc))
                interrupted = True
        if self._parking:
            self._log.info("session_parked")
            return SessionState.OFFLOADING
        interrupted = interrupted or self.cancel.is_set()
        self.state = await rt.journal(rt.journal.journal.finish_offload, session.id, interrupted)
        if self.state == SessionState.EMPTY:
            # nothing was taken, so no upload will ever release its staging folder
            await asyncio.to_thread(_remove_session_dir, rt.staging / session.id)
        await self._announce_end(interrupted)
        rt.upload_wakeup.set()
        return self.state

    async def _offload(self, session: SessionRow) -> None:
        """Copy every pending file with `offload.copy_workers` files in flight: while one file is
        read back from staging, the next is read from the camera, so neither the disk nor the
        second core waits on the other."""
        rt = self.rt
        session_dir = rt.staging / session.id
        await asyncio.to_thread(_make_session_dir, session_dir)
        await self._record_walk(session)
        # opened before the first copy: a syncfs through it reports any writeback error of the
        # staging filesystem since, so none of this session's copies can fall before it
        self._dir_fd = await asyncio.to_thread(open_dir, session_dir)
        try:
            await self._copy_all(session, session_dir)
        finally:
            os.close(self._dir_fd)
            self._dir_fd = -1
        if self.cancel.is_set():
            raise CameraGone("camera undocked during the offload")

    async def _copy_all(self, session: SessionRow, session_dir: Path) -> None:
        rt = self.rt
        totals = await rt.journal(rt.journal.journal.pending_totals, session.id)
        self._files_total, self._bytes_total = totals
        self._status("offloading")
        workers = max(1, min(rt.config.offload.copy_workers, self._files_total))
        queue: asyncio.Queue[FileRow | None] = asyncio.Queue(maxsize=2 * workers)
        self._batch = []
        self._last_flush = time.monotonic()
        # batches go to one flusher, so the copy workers never wait on a group's sync, read-back
        # or journal transaction; one batch waits while one is flushed (bounded memory)
        groups: asyncio.Queue[list[_Done] | None] = asyncio.Queue(maxsize=1)
        self._workers_left = workers
        ticker = asyncio.create_task(self._tick_progress())
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._feed(queue, session.id, workers))
                tg.create_task(self._flusher(groups, session_dir))
                for _ in range(workers):
                    tg.create_task(self._copy_worker(queue, groups, session_dir))
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            if self._batch:
                buf = bytearray(self._group_buffer_size())
                while self._batch:  # left by a failure: record what is verified
                    await self._flush(self._take_batch(), session_dir, buf, Progress())
            await self._recorded()

    async def _feed(
        self, queue: asyncio.Queue[FileRow | None], session_id: SessionId, workers: int
    ) -> None:
        """Pending files in path order, a page at a time (memory bounded by the page). Each file
        handed out names a small file PREFETCH_AHEAD places later, whose read-ahead its copy
        starts: a small file's cold read from the camera was the largest share of the copy
        threads' time, one at a time per worker."""
        j = self.rt.journal.journal
        after = ""
        while not self.cancel.is_set():
            page = await self.rt.journal(j.pending_page, session_id, after, PAGE)
            if not page:
                break
            for i, f in enumerate(page):
                after = f.path
                if self.cancel.is_set():
                    break
                ahead = page[i + PREFETCH_AHEAD] if i + PREFETCH_AHEAD < len(page) else None
                if ahead is not None and ahead.size <= GROUP_MAX_BYTES:
                    self._prefetch[f.id] = self._source(ahead)
                await queue.put(f)
        for _ in range(workers):
            await queue.put(None)

    def _source(self, f: FileRow) -> bytes:
        return os.path.join(os.fsencode(self.docked.root), f.raw_path or f.path.encode())

    async def _copy_worker(
        self,
        queue: asyncio.Queue[FileRow | None],
        groups: asyncio.Queue[list[_Done] | None],
        session_dir: Path,
    ) -> None:
        buf = bytearray(self.rt.config.offload.chunk_size)  # one per worker, reused per file
        progress = Progress()
        self._progresses.append(progress)
        while (f := await queue.get()) is not None:
            if self.cancel.is_set():
                continue  # drain to the sentinel; nothing more is copied
            await self._take(f, session_dir, buf, progress)
            if self._batch and (
                len(self._batch) >= FLUSH_FILES
                or time.monotonic() - self._last_flush > FLUSH_SECONDS
            ):
                await groups.put(self._take_batch())
        self._workers_left -= 1
        if self._workers_left == 0:  # the last one out hands over the rest and ends the flusher
            if self._batch:
                await groups.put(self._take_batch())
            await groups.put(None)

    async def _flusher(self, groups: asyncio.Queue[list[_Done] | None], session_dir: Path) -> None:
        buf = bytearray(self._group_buffer_size())  # for read-backs and copies again
        progress = Progress()
        while (batch := await groups.get()) is not None:
            await self._flush(batch, session_dir, buf, progress)
        while self._batch:  # what failed its read-back in the last group, copied again
            await self._flush(self._take_batch(), session_dir, buf, progress)
        await self._recorded()

    def _group_buffer_size(self) -> int:
        # A group holds only small files (read back, or copied again when that failed), so its
        # buffer need not be a chunk: a third chunk-sized buffer per camera cost 8 MiB each,
        # +34 MiB of peak RSS at 4 cameras (bench/memory.py)
        return min(self.rt.config.offload.chunk_size, GROUP_MAX_BYTES)

    def _take_batch(self) -> list[_Done]:
        batch, self._batch = self._batch, []
        self._last_flush = time.monotonic()
        return batch

    async def _take(
        self,
        f: FileRow,
        session_dir: Path,
        buf: bytearray,
        progress: Progress,
        *,
        again: bool = False,
    ) -> None:
        """Copy one file into the batch (or record it failed). `again`: a grouped copy whose
        read-back failed, copied once more on the per-file path; counted in progress already."""
        try:
            done = await self._copy_one(f, session_dir, buf, progress, again=again)
        except CameraGone:
            # every worker's copy stops at its next chunk; the session reports the undock
            self.cancel.set()
            self._cancelled.set()
            return
        except StagingSplit as exc:
            self._log.warning("session_split_staging_full", reason=str(exc))
            self.split = True
            self.cancel.set()
            self._cancelled.set()
            return
        if not again:
            self._bytes_before += f.size
            progress.bytes_done = 0
            self._files_done += 1
        if done is not None:
            self._batch.append(done)
            self._verified_count += 1

    async def _flush(
        self, batch: list[_Done], session_dir: Path, buf: bytearray, progress: Progress
    ) -> None:
        """Record a batch verified: first make it durable, then one journal transaction
        (started here, awaited by the next flush or `_recorded`: the next group's sync and
        read-back overlap this one's transaction, and transactions keep their order).

        Large files were fsynced and read back one by one: one directory fsync for their
        renames. Small ones owe both: one syncfs and one directory fsync for the group, then
        each read back (copy.settle_group, in the offload pool). A small file that fails its
        read-back is copied again on the per-file path and joins the next batch. A group not
        settled before an undock or a stop is not recorded (unless the session is ending to
        split on a full staging: the camera is still docked and its copies are whole)."""
        rt = self.rt
        owed = [d for d in batch if d.job is not None]
        ready = [d.verified for d in batch if d.job is None]
        again: list[FileRow] = []
        if owed and self.cancel.is_set() and not self.split:
            await asyncio.to_thread(_remove_copies, [d.job.staged for d in owed if d.job])
            self._verified_count -= len(owed)
            owed = []
        if owed:
            ok = await asyncio.get_running_loop().run_in_executor(
                rt.offload_pool,
                settle_group,
                self._dir_fd,
                [Owed(d.job.staged, d.verified[1], d.job.before_readback) for d in owed if d.job],
                buf,
            )
            for d, good in zip(owed, ok, strict=True):
                if good:
                    ready.append(d.verified)
                    continue
                f = d.verified[0]
                self._verified_count -= 1
                self._log.error(
                    "staging_readback_mismatch",
                    path=f.path,
                    error=f"{session_dir / str(f.id)}: group read-back differs from the copy"
                    " (or the group's sync failed)",
                )
                again.append(f)
        elif ready:
            await asyncio.to_thread(fsync_dir, session_dir)
        await self._recorded()
        if ready:
            self._recording = asyncio.create_task(self._record(ready))
        for f in again:
            if not self.cancel.is_set():
                await self._take(f, session_dir, buf, progress, again=True)

    async def _record(self, ready: list[Verified]) -> None:
        rt = self.rt
        await rt.journal(rt.journal.journal.files_verified, ready)
        for f, *_ in ready:
            rt.bus.publish(
                Notice(
                    "file_verified", self.camera, self.session_id, {"path": f.path, "size": f.size}
                )
            )
        self._publish_progress()

    async def _recorded(self) -> None:
        """Wait for the last batch's journal transaction (raising what it raised)."""
        if self._recording is not None:
            recording, self._recording = self._recording, None
            await recording

    async def _record_walk(self, session: SessionRow) -> None:
        rt = self.rt
        filt = Filter(rt.config.offload.include, rt.config.offload.exclude)
        entries = walk(os.fsencode(self.docked.root), filt)
        added = skipped = 0
        while True:
            try:
                batch = await asyncio.to_thread(_take, entries, WALK_BATCH)
            except OSError as exc:  # the camera root itself: gone (unmounted, yanked) or dead
                raise CameraGone(f"{self.docked.root}: cannot be read ({exc.strerror})") from exc
            if not batch:
                break
            a, s = await rt.journal(rt.journal.journal.record_found, session, batch)
            added, skipped = added + a, skipped + s
            if self.cancel.is_set():
                raise CameraGone("camera undocked during the walk")
        self._log.info("camera_walked", new_files=added, skipped=skipped)

    async def _copy_one(
        self,
        f: FileRow,
        session_dir: Path,
        buf: bytearray,
        progress: Progress,
        *,
        again: bool = False,
    ) -> _Done | None:
        """Copy one file with its retries. Returns what to record as verified (and, for a
        small file, what its group still owes), or None when the file was recorded
        failed/unstable. Raises CameraGone. `again`: its grouped copy failed the read-back,
        which spent one attempt; the next ones take the per-file path."""
        rt = self.rt
        cfg = rt.config.offload
        source = self._source(f)
        prefetch = self._prefetch.pop(f.id, None)
        attempts = 1 if again else 0
        per_file = again
        loop = asyncio.get_running_loop()
        if again and attempts >= cfg.copy_attempts:
            await self._give_up(f, FileState.FAILED, "staging read-back: the copy differs")
            return None
        while True:
            grouped = not per_file and f.size <= GROUP_MAX_BYTES
            job = CopyJob(
                source=source,
                staged=session_dir / str(f.id),
                size=f.size,
                mtime_ns=f.mtime_ns,
                verify_source=cfg.verify == "source-and-readback",
                read_attempts=cfg.read_attempts,
                sync_dir=False,  # the batch flush fsyncs the directory once, before recording
                durable=not grouped,  # grouped: the batch flush syncs and reads back
                before_readback=self.before_readback,
                prefetch=prefetch,
            )
            prefetch = None  # a retry need not ask again
            progress.bytes_done = 0
            try:
                copied = await loop.run_in_executor(
                    rt.offload_pool, copy_file, job, buf, progress, self.cancel
                )
                verified = (f, copied.sha256, utc_now(), copied.xxh128)
                return _Done(verified, job if grouped else None)
            except CameraGone:
                raise
            except StagingFull as exc:
                if self._verified_count:
                    # what this session holds can only leave staging once it is uploaded, and
                    # a session is uploaded only once its offload ends: end it now (split)
                    raise StagingSplit(
                        f"staging full after {self._verified_count} file(s)"
                    ) from exc
                await self._wait_for_space(full=True)
            except SourceChanged as exc:
                attempts += 1
                if self.cancel.is_set():
                    raise CameraGone("camera undocked") from exc
                now = await asyncio.to_thread(_lstat, source)
                if now is None and not await asyncio.to_thread(self.docked.root.is_dir):
                    # the whole camera went (a source may report the undock a moment later)
                    raise CameraGone(f"{self.docked.root}: camera gone") from exc
                if now is None:
                    await self._give_up(f, FileState.FAILED, f"disappeared during copy: {exc}")
                    return None
                if attempts >= cfg.copy_attempts:
                    await self._give_up(f, FileState.UNSTABLE, str(exc))
                    return None
                self._log.info("file_changed_copying_again", path=f.path, attempt=attempts)
                f = await rt.journal(rt.journal.journal.file_restat, f, *now)
            except ReadFailed as exc:
                if self.cancel.is_set():
                    raise CameraGone("camera undocked") from exc
                await self._give_up(f, FileState.FAILED, str(exc))
                return None
            except IntegrityError as exc:
                attempts += 1
                per_file = True
                self._log.error("staging_readback_mismatch", path=f.path, error=str(exc))
                if attempts >= cfg.copy_attempts:
                    await self._give_up(f, FileState.FAILED, f"staging read-back: {exc}")
                    return None
            except OSError as exc:
                if self.cancel.is_set():
                    raise CameraGone("camera undocked") from exc
                await self._give_up(f, FileState.FAILED, f"{exc.strerror or exc}")
                return None

    async def _give_up(self, f: FileRow, state: FileState, error: str) -> None:
        # logged once, by the log observer, from the notice
        await self.rt.journal(self.rt.journal.journal.file_given_up, f, state, error)
        self.rt.bus.publish(
            Notice(f"file_{state}", self.camera, self.session_id, {"path": f.path, "error": error})
        )

    async def _wait_for_space(self, full: bool = False) -> None:
        """Hold the offload while staging is below `min_free_staging` (or full), telling why."""
        try:
            await self._wait_for_space_loop(full)
        finally:
            # the problem is re-raised within a poll by any other session still waiting
            self.rt.problems.clear("staging")

    async def _wait_for_space_loop(self, full: bool) -> None:
        rt = self.rt
        need = rt.config.offload.min_free_staging
        while True:
            free = await asyncio.to_thread(free_bytes, rt.staging)
            if free >= need and not full:
                rt.problems.clear("staging")
                return
            rt.problems.set(
                "staging",
                f"staging low: {free} bytes free, offload.min_free_staging is {need}; "
                "offloads wait for uploads to release space",
            )
            self._status("docked", error="waiting for staging space")
            rt.space_freed.clear()
            waits = [
                asyncio.create_task(rt.space_freed.wait()),
                asyncio.create_task(self._cancelled.wait()),
            ]
            _, pending = await asyncio.wait(
                waits, timeout=SPACE_POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            for t in pending:
                t.cancel()
            if self.cancel.is_set():
                raise CameraGone("camera undocked while waiting for staging space")
            full = False

    async def _tick_progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_SECONDS)
            self._publish_progress()

    def _publish_progress(self) -> None:
        if self.session_id is None:
            return
        self.rt.bus.publish(
            ProgressEvent(
                self.camera,
                self.session_id,
                "offload",
                self._files_total,
                self._files_done,
                self._bytes_total,
                min(
                    self._bytes_total,
                    self._bytes_before + sum(p.bytes_done for p in self._progresses),
                ),
            )
        )

    def _status(self, state: str, *, safe: bool = False, error: str | None = None) -> None:
        self.rt.bus.publish(
            CameraStatus(
                self.camera,
                state,
                self.session_id,
                self._files_total,
                self._files_done,
                self._bytes_total,
                min(self._bytes_total, self._bytes_before),
                safe,
                error,
            )
        )

    async def _announce_end(self, interrupted: bool) -> None:
        state = self.state
        if self.split:
            self._status("docked", error="staging full: the rest follows once uploads free space")
            return
        if interrupted:
            self._status("undocked", error="undocked before the offload finished")
            return
        assert self.session_id is not None
        bad = await self.rt.journal(self.rt.journal.journal.bad_count, self.session_id)
        error = f"{bad} file(s) could not be offloaded; left on the camera" if bad else None
        self._status("offloaded", safe=True, error=error)
        self.rt.bus.publish(
            Notice("safe_to_undock", self.camera, self.session_id, {"outcome": str(state)})
        )


def _make_session_dir(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
        fsync_dir(path.parent)
    except FileExistsError:
        for leftover in path.glob("*.partial"):  # a crash mid-copy; never reported verified
            leftover.unlink()


class StagingSplit(Exception):
    """Staging is full and this session already holds verified files: end it so they can be
    uploaded and their space released, instead of waiting for space that only it could free."""


def _remove_copies(paths: list[Path]) -> None:
    """Copies never recorded verified must not stay under their final names."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _remove_session_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
        fsync_dir(path.parent)


def _take(it: Iterator[Found | Skipped], n: int) -> list[Found | Skipped]:
    return list(islice(it, n))


def _lstat(path: bytes) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns
