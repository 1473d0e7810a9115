"""Upload workers: put one object, verify it in the store, record it; then, for a session whose
files are all in, seal it and write SHA256SUMS, custody.jsonl and the manifest — last.

Retries live here, above the Store protocol: a store that is away is waited for with
exponential backoff and jitter (forever, or `upload.max_attempts` times); a conflict (the key
holds other bytes) or a mismatch is never retried and never "fixed": the session is recorded
`upload_failed` for a person to look at. Staging is released only after the manifest is in.

Small files go in batches when the store can take them (`store.base.batch_store`): one claim,
one `put_files` (each object durable and verified), one journal transaction recording them all
with a custody record each. A name the store refuses costs only that file; other bytes under a
key (or a staged copy that is not what was verified) fail the session, after the batch's files
that did go in are recorded; a store that is away has the whole batch retried.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dockd.durable import fsync_dir
from dockd.errors import (
    IntegrityError,
    StoreConflict,
    StoreError,
    StoreRefused,
    StoreUnavailable,
)
from dockd.events import CameraStatus, Notice
from dockd.events import Progress as ProgressEvent
from dockd.evidence import keys, seal
from dockd.journal import FileRow, FileState, SessionRow
from dockd.observers.log import get as get_log
from dockd.offload.session import staged_path
from dockd.runtime import Runtime
from dockd.store.base import PutItem, PutOutcome, Store, batch_store
from dockd.upload.queue import BATCH_FILES, BatchJob, Claims, FileJob, Job, SealJob, next_job


class PermanentUploadError(Exception):
    """Retrying cannot help (conflict, integrity); the session needs a person."""


class FileRefused(Exception):
    """The store cannot hold this one file (its name): it costs only itself."""


class _HandBack(Exception):
    """A worker retired by `resize` gives its job back between two attempts."""


@dataclass
class _Counters:
    files_total: int
    bytes_total: int
    files_done: int = 0
    bytes_done: int = 0


class Uploader:
    def __init__(
        self, rt: Runtime, on_uploaded: Callable[[SessionRow], Awaitable[None]] | None = None
    ) -> None:
        self.rt = rt
        self.claims = Claims()
        self._on_uploaded = on_uploaded
        self._counters: dict[str, _Counters] = {}
        self._log = get_log(dock_id=rt.config.dock.id)
        self._target = 0  # workers wanted
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._pool_size = 0

    @property
    def workers(self) -> int:
        """Workers running now (those past a shrink included, until their job is done)."""
        return len(self._workers)

    async def run(self) -> None:
        """Run `upload.concurrency` workers until cancelled; `resize` changes how many."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self.resize(self.rt.config.upload.concurrency)
        finally:
            self._group = None
            self._workers.clear()

    def resize(self, n: int) -> None:
        """Run `n` workers from now on (SIGHUP with a new `upload.concurrency`). More: started
        at once, with a thread pool big enough for them. Fewer: a worker past `n` finishes the
        job in hand, or gives it back between two attempts, then ends; no claimed job is dropped
        (a claim is only memory: a job given back is found again by the next `next_job`)."""
        was, self._target = self._target, n
        if n > self._pool_size:
            old, self.rt.upload_pool = self.rt.upload_pool, ThreadPoolExecutor(n, "upload")
            old.shutdown(wait=False)  # its threads end after the call each has in hand
            self._pool_size = n
        if self._group is not None:
            for i in range(n):
                if i not in self._workers:  # one retiring but not yet gone just carries on
                    task = self._group.create_task(self._worker(i), name=f"upload-worker-{i}")
                    self._workers[i] = task
        self.rt.upload_wakeup.set()  # idle workers past n see the new size and end
        if was and was != n:
            self._log.info("upload_workers_resized", workers=n, was=was)

    def _retiring(self) -> bool:
        me = asyncio.current_task()
        return any(t is me for i, t in self._workers.items() if i >= self._target)

    async def _worker(self, n: int) -> None:
        """Claim a job, run it, release it; over and over. A batch is run in two stages: its
        put (store), then its record (journal); the record of one batch runs while the next
        batch is put, so the store and the journal are both busy (the claims of a batch are
        held until it is recorded, so no other worker takes its files and no seal comes
        before it)."""
        rt = self.rt
        pending: tuple[BatchJob, list[PutOutcome]] | None = None  # put, not yet recorded
        try:
            while n < self._target or pending is not None:
                rt.upload_wakeup.clear()
                job = None
                if n < self._target:
                    batch = BATCH_FILES if batch_store(rt.store) is not None else 1
                    job = await rt.journal(next_job, rt.journal.journal, self.claims, batch)
                if job is None:
                    if pending is not None:  # recorded and released, there may be a seal
                        await self._record_batch(*pending)
                        pending = None
                        continue
                    await rt.upload_wakeup.wait()
                    continue
                if isinstance(job, BatchJob):
                    put = asyncio.create_task(self._put_batch(job))
                    try:
                        if pending is not None:
                            await self._record_batch(*pending)
                            pending = None
                        outcomes = await put
                    except BaseException:
                        put.cancel()
                        raise
                    if outcomes is not None:
                        pending = (job, outcomes)
                    continue
                if pending is not None:
                    await self._record_batch(*pending)
                    pending = None
                try:
                    await self._run_job(job)
                except _HandBack:
                    pass  # released below; another worker takes it up
                finally:
                    await rt.journal(_release, self.claims, job)
                    rt.upload_wakeup.set()  # a finished file may make its session ready to seal
        finally:
            if self._workers.get(n) is asyncio.current_task():
                del self._workers[n]

    async def _run_job(self, job: FileJob | SealJob) -> None:
        session = job.session
        log = self._log.bind(camera=session.camera, session_id=session.id)
        try:
            if isinstance(job, FileJob):
                await self._start_session(session)
                try:
                    await self._retrying(lambda: self._upload_file(job), log, job.file.path)
                except FileRefused as exc:
                    # recorded failed (left on the camera, listed in the manifest with the
                    # reason); the session's other files and its manifest go on
                    await self._refused(job.file, session, str(exc))
                    return
                self._progress(session, [job.file])
            else:
                await self._retrying(lambda: self._finish_session(job), log, "manifest")
        except PermanentUploadError as exc:
            await self._failed(session, exc)

    async def _failed(self, session: SessionRow, exc: PermanentUploadError) -> None:
        self._log.bind(camera=session.camera, session_id=session.id).error(
            "upload_failed", error=str(exc)
        )
        await self.rt.journal(self.rt.journal.journal.session_upload_failed, session.id, str(exc))
        self._counters.pop(session.id, None)
        self.rt.problems.changed.set()
        self.rt.bus.publish(CameraStatus(session.camera, "error", session.id, error=str(exc)))
        self.rt.bus.publish(
            Notice("upload_failed", session.camera, session.id, {"error": str(exc)})
        )

    async def _put_batch(self, job: BatchJob) -> list[PutOutcome] | None:
        """The store stage of a batch, retried while the store is away. Returns the outcomes
        (the claims still held, for `_record_batch`), or None when the job ended here (the
        session failed, or the job was handed back), its claims released."""
        session = job.session
        log = self._log.bind(camera=session.camera, session_id=session.id)
        outcomes: list[PutOutcome] = []

        async def attempt() -> None:
            outcomes[:] = await self._put_batch_once(job)

        try:
            await self._start_session(session)
            what = f"{job.files[0].path} (a batch of {len(job.files)})"
            try:
                await self._retrying(attempt, log, what)
            except FileRefused as exc:  # per file, never for a whole batch; were it so
                raise PermanentUploadError(str(exc)) from exc
            return outcomes
        except (PermanentUploadError, _HandBack) as exc:
            await self.rt.journal(_release, self.claims, job)
            self.rt.upload_wakeup.set()
            if isinstance(exc, PermanentUploadError):
                await self._failed(session, exc)
            return None

    async def _refused(self, f: FileRow, session: SessionRow, error: str) -> None:
        await self.rt.journal(
            self.rt.journal.journal.file_given_up,
            f,
            FileState.FAILED,
            f"the store cannot hold it: {error}",
        )
        self.rt.bus.publish(
            Notice(
                "file_store_refused",
                session.camera,
                session.id,
                {"path": f.path, "error": error},
            )
        )

    def _progress(self, session: SessionRow, files: list[FileRow]) -> None:
        c = self._counters.get(session.id)
        if c is not None and files:
            c.files_done += len(files)
            c.bytes_done += sum(f.size for f in files)
            self.rt.bus.publish(
                ProgressEvent(
                    session.camera,
                    session.id,
                    "upload",
                    c.files_total,
                    c.files_done,
                    c.bytes_total,
                    c.bytes_done,
                )
            )

    async def _start_session(self, session: SessionRow) -> None:
        if session.id in self._counters:
            return
        # claimed before the await, so two workers starting on one session announce it once
        c = self._counters[session.id] = _Counters(0, 0)
        totals = await self.rt.journal(self.rt.journal.journal.upload_totals, session.id)
        c.files_total, c.bytes_total, done_files, done_bytes = totals
        c.files_done += done_files
        c.bytes_done += done_bytes
        self.rt.bus.publish(
            CameraStatus(
                session.camera,
                "uploading",
                session.id,
                c.files_total,
                c.files_done,
                c.bytes_total,
                c.bytes_done,
                True,
            )
        )

    async def _retrying(
        self, attempt: Callable[[], Awaitable[None]], log: object, what: str
    ) -> None:
        cfg = self.rt.config.upload
        tries = 0
        while True:
            try:
                await attempt()
                self.rt.problems.store(True)
                return
            except StoreRefused as exc:
                raise FileRefused(str(exc)) from exc
            except (StoreConflict, IntegrityError) as exc:
                raise PermanentUploadError(str(exc)) from exc
            except (StoreUnavailable, StoreError, OSError) as exc:
                tries += 1
                self.rt.problems.store(False, str(exc))
                if cfg.max_attempts and tries >= cfg.max_attempts:
                    raise PermanentUploadError(
                        f"{what}: gave up after {tries} attempts: {exc}"
                    ) from exc
                if self._retiring():
                    raise _HandBack(what) from exc
                delay = backoff(tries, cfg.backoff_initial, cfg.backoff_max)
                self._log.warning(
                    "store_unreachable",
                    what=what,
                    attempt=tries,
                    retry_in_s=round(delay, 2),
                    error=str(exc),
                )
                await asyncio.sleep(delay)

    async def _upload_file(self, job: FileJob) -> None:
        rt = self.rt
        f, s = job.file, job.session
        assert f.sha256 is not None
        key = keys.file_key(s.camera, s.id, f.path)
        src = staged_path(rt.staging, s.id, f.id)
        if not await asyncio.to_thread(src.is_file):
            # not the store's fault: never let it read as "store unreachable" and spin
            raise PermanentUploadError(f"{f.path}: staged copy {src} is missing")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(rt.upload_pool, rt.store.put_file, key, src, f.sha256, f.size)
        method = await loop.run_in_executor(rt.upload_pool, rt.store.verify, key, f.sha256, f.size)
        await rt.journal(rt.journal.journal.file_stored, f, key, f.sha256, method)
        rt.bus.publish(Notice("file_stored", s.camera, s.id, {"path": f.path, "size": f.size}))

    async def _put_batch_once(self, job: BatchJob) -> list[PutOutcome]:
        """One attempt at putting a batch: every file durable in the store and verified there,
        or its own error. A store away raises out of here and the batch is tried again (what
        went in the last time is found whole and is success), holding one file only."""
        rt = self.rt
        s = job.session
        items = []
        for f in job.files:
            assert f.sha256 is not None
            items.append(
                PutItem(
                    keys.file_key(s.camera, s.id, f.path),
                    staged_path(rt.staging, s.id, f.id),
                    f.sha256,
                    f.size,
                )
            )
        missing = await asyncio.to_thread(
            lambda: [i.source for i in items if not i.source.is_file()]
        )
        if missing:
            # not the store's fault: never let it read as "store unreachable" and spin
            raise PermanentUploadError(f"staged copy {missing[0]} is missing")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(rt.upload_pool, _put_files, rt.store, items)
        except (StoreUnavailable, StoreError, OSError):
            if len(job.files) > 1:  # the store is away: hold one file only while it is
                await rt.journal(_shrink, self.claims, job)
            raise

    async def _record_batch(self, job: BatchJob, outcomes: list[PutOutcome]) -> None:
        """The journal stage of a batch: the files in the store recorded in one transaction
        (a custody record each), their notices; then the refused ones failed; then a conflict
        or a mismatch, if any, fails the session. The batch's claims are released last."""
        rt = self.rt
        s = job.session
        try:
            stored = [
                (f, keys.file_key(s.camera, s.id, f.path), f.sha256 or "", o)
                for f, o in zip(job.files, outcomes, strict=True)
                if isinstance(o, str)
            ]
            await rt.journal(rt.journal.journal.files_stored, stored)
            for f, _, _, _ in stored:
                rt.bus.publish(
                    Notice("file_stored", s.camera, s.id, {"path": f.path, "size": f.size})
                )
            self._progress(s, [f for f, _, _, _ in stored])
            permanent: list[str] = []
            for f, o in zip(job.files, outcomes, strict=True):
                if isinstance(o, StoreRefused):
                    await self._refused(f, s, str(o))
                elif not isinstance(o, str):
                    permanent.append(str(o))
            if permanent:
                await self._failed(s, PermanentUploadError(permanent[0]))
        finally:
            await rt.journal(_release, self.claims, job)
            rt.upload_wakeup.set()

    async def _finish_session(self, job: SealJob) -> None:
        rt = self.rt
        j = rt.journal.journal
        session = await rt.journal(j.seal, job.session.id)
        loop = asyncio.get_running_loop()
        # written to staging in an upload thread, on a read connection of its own: a session of
        # 100 000 files is seconds of reading that the journal thread (every camera's offload
        # records) must not wait for, and a size no memory should hold
        objects = await loop.run_in_executor(
            rt.upload_pool,
            seal.write_session_objects,
            j.path,
            rt.config.dock.id,
            session.id,
            seal.seal_dir(rt.staging, session.id),
            rt.dock_key,
        )
        for o in objects:  # signature, then manifest.json: the manifest is last
            key = keys.sidecar_key(session.camera, session.id, o.name)
            await loop.run_in_executor(
                rt.upload_pool, rt.store.put_file, key, o.path, o.sha256, o.size
            )
            await loop.run_in_executor(rt.upload_pool, rt.store.verify, key, o.sha256, o.size)
        manifest_key = keys.sidecar_key(session.camera, session.id, keys.MANIFEST)
        await rt.journal(j.session_uploaded, session.id, manifest_key, objects[-1].sha256)
        await asyncio.to_thread(_release_staging, rt.staging / session.id)
        await rt.journal(j.staging_released, session.id)
        rt.space_freed.set()
        rt.problems.changed.set()  # the queue shrank: the dock summary changes
        c = self._counters.pop(session.id, None)
        self.rt.bus.publish(
            CameraStatus(
                session.camera,
                "uploaded",
                session.id,
                c.files_total if c else 0,
                c.files_total if c else 0,
                c.bytes_total if c else 0,
                c.bytes_total if c else 0,
                True,
            )
        )
        self.rt.bus.publish(
            Notice("session_uploaded", session.camera, session.id, {"manifest": manifest_key})
        )
        uploaded = await rt.journal(j.session, session.id)
        if self._on_uploaded is not None and uploaded is not None:
            await self._on_uploaded(uploaded)


def backoff(attempt: int, initial: float, cap: float) -> float:
    """Exponential backoff with full jitter: spreads retries of many workers after an outage."""
    return random.uniform(0, min(cap, initial * 2 ** min(attempt - 1, 30)))


def _put_files(store: Store, items: list[PutItem]) -> list[PutOutcome]:
    """The store's batch put, or (a store swapped for one without it since the claim) one by
    one, with the same outcomes."""
    batch = batch_store(store)
    if batch is not None:
        return batch.put_files(items)
    out: list[PutOutcome] = []
    for it in items:
        try:
            store.put_file(it.key, it.source, it.sha256, it.size)
            out.append(store.verify(it.key, it.sha256, it.size))
        except (StoreRefused, StoreConflict, IntegrityError) as exc:
            out.append(exc)
    return out


def _shrink(claims: Claims, job: BatchJob) -> None:
    """Give back every file of the batch but the first (in the journal thread, as claims are)."""
    for f in job.files[1:]:
        claims.files.pop(f.id, None)
    job.files = job.files[:1]


def _release(claims: Claims, job: Job) -> None:
    if isinstance(job, FileJob):
        claims.files.pop(job.file.id, None)
    elif isinstance(job, BatchJob):
        for f in job.files:
            claims.files.pop(f.id, None)
    else:
        claims.sealing.discard(job.session.id)


def _release_staging(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
        fsync_dir(path.parent)
