"""`dockd run`: wires sources, sessions, uploader and observers, and supervises their tasks.

Start-up order matters: open the journal (recovery reads it), reset what memory-only facts it
holds (nothing is docked until a source says so), start the sources (they report cameras already
present and return), close sessions a crash left offloading whose camera is gone, then upload.
Every background task runs under `supervise`: a crash is logged and the task restarted with
backoff; a task that keeps crashing stops the daemon with a non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from dockd import __version__, clear
from dockd.config import Config, load_config
from dockd.durable import fsync_dir
from dockd.errors import ConfigError, DockdError, SourceError
from dockd.events import (
    CameraStatus,
    DockStatus,
    EventBus,
    Notice,
    QueueFacts,
    Subscription,
)
from dockd.evidence.signing import load_or_create
from dockd.ids import SESSION_ID_RE, CameraId, camera_id
from dockd.journal import Journal, SessionRow, SessionState
from dockd.journal.states import FINISHED_STATES
from dockd.journal.thread import JournalThread
from dockd.observers import Observer, build_observers
from dockd.observers.log import get as get_log
from dockd.offload.session import CameraSession
from dockd.runtime import Problems, Runtime, free_bytes
from dockd.sources import build_sources
from dockd.sources.base import Clearable, Docked, Refused, Source, SourceEvent, Undocked
from dockd.store import build_store
from dockd.store import start_up as store_start_up
from dockd.store.base import Store
from dockd.store.filesystem import FilesystemStore

if TYPE_CHECKING:
    from dockd.upload.worker import Uploader

MAX_CRASHES = 5
CRASH_WINDOW_S = 300.0


class DaemonFailed(DockdError):
    """A supervised task kept crashing; the daemon stopped rather than run without it."""


# Sections a SIGHUP applies to a running daemon; the rest needs a restart. `upload`: the
# uploader resizes its workers to `concurrency`; retries read the rest as they go.
LIVE_SECTIONS = ("log", "cameras", "camera", "upload", "mqtt")


class Daemon:
    def __init__(
        self, config: Config, *, bus: EventBus | None = None, config_file: Path | None = None
    ) -> None:
        self.config = config
        self.config_file = config_file
        self.bus = bus or EventBus()
        self.log = get_log(dock_id=config.dock.id)
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.sessions: dict[CameraId, CameraSession] = {}
        self.docked: dict[CameraId, Docked] = {}
        self._session_tasks: dict[CameraId, asyncio.Task[None]] = {}
        self._failure: BaseException | None = None
        self.rt: Runtime | None = None
        self._last_status: DockStatus | None = None
        self._sources: dict[str, Source] = {}
        self.observers: list[Observer] = []
        self._background: set[asyncio.Task[None]] = set()
        self.uploader: Uploader | None = None

    async def run(self) -> int:
        cfg = self.config
        _prepare_state_dir(cfg)
        dock_key = await asyncio.to_thread(load_or_create, cfg.key_file, cfg.dock.id)
        journal = await asyncio.to_thread(Journal.open, cfg.journal_path, cfg.dock.id)
        jt = JournalThread(journal)
        # boto3's import and client set-up take most of a second: not on the loop
        store = await asyncio.to_thread(build_store, cfg)
        problems = Problems()
        rt = self.rt = Runtime(
            config=cfg,
            journal=jt,
            bus=self.bus,
            store=store,
            problems=problems,
            offload_pool=ThreadPoolExecutor(
                cfg.offload.parallel_cameras * cfg.offload.copy_workers, "offload"
            ),
            upload_pool=ThreadPoolExecutor(cfg.upload.concurrency, "upload"),
            camera_slots=asyncio.Semaphore(cfg.offload.parallel_cameras),
            dock_key=dock_key,
        )
        sources = build_sources(cfg)
        self._sources = {s.name: s for s in sources}
        queue: asyncio.Queue[SourceEvent] = asyncio.Queue()
        observers = self.observers = build_observers(cfg)
        subs = [self.bus.subscribe(o.name) for o in observers]
        try:
            async with asyncio.TaskGroup() as tg:
                for observer, sub in zip(observers, subs, strict=True):
                    tg.create_task(
                        self._supervise(f"observer-{observer.name}", _observe(observer, sub)),
                        name=f"observer-{observer.name}",
                    )
                await self._recover(rt, store)
                await jt(
                    journal.custody_event,
                    "daemon_started",
                    None,
                    version=__version__,
                    pid=os.getpid(),
                )
                for source in sources:
                    await source.start(queue)
                # cameras present at start are on the queue; dock them before judging sessions
                while not queue.empty():
                    await self._on_source_event(queue.get_nowait())
                await self._close_orphans(rt)
                await self._release_finished_staging(rt)  # orphans closed empty just now
                tg.create_task(self._supervise("sources", lambda: self._consume(queue)))
                tg.create_task(self._supervise("uploader", self._uploader(rt)))
                tg.create_task(self._supervise("status", self._status_writer))
                self._write_status_soon()
                self.ready.set()
                self.bus.publish(Notice("daemon_ready", details={"version": __version__}))
                self.log.info(
                    "daemon_ready",
                    version=__version__,
                    sources=[s.name for s in sources],
                    store=store.name,
                )
                await self.stopping.wait()
                await self._shutdown(sources)
                raise _Stop
        except* _Stop:
            pass
        finally:
            for sub in subs:
                self.bus.unsubscribe(sub)
            # parked copies end at their next chunk; waited for off the loop, so the watchdog
            # and the observers' last words are not held up behind them
            for pool in (rt.offload_pool, rt.upload_pool):
                await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
            jt.close()
        if self._failure is not None:
            raise DaemonFailed(f"stopped: {self._failure}")
        self.log.info("daemon_stopped")
        return 0

    def stop(self) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def preflight(self) -> None:
        """Refuse, before anything starts, what this build cannot do (exit 78)."""
        # a lock configured on a bucket without Object Lock: refused here, nothing written
        store_start_up(build_store(self.config))
        build_sources(self.config)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; apply what can be applied live, keep the old
        configuration if the new one is bad, and say what needs a restart."""
        if self.config_file is None:
            self.log.warning("reload_ignored", reason="no configuration file")
            return
        try:
            new = load_config(self.config_file)
        except ConfigError as exc:
            self.log.error("reload_refused", error=str(exc), keeping="the running configuration")
            return
        old = self.config
        live = {k: getattr(new, k) for k in LIVE_SECTIONS if getattr(new, k) != getattr(old, k)}
        restart = [
            k
            for k in type(old).model_fields
            if k not in LIVE_SECTIONS and getattr(new, k) != getattr(old, k)
        ]
        if "upload" in live and new.upload.bandwidth_limit != old.upload.bandwidth_limit:
            # the bandwidth token bucket is built with the store, once: not live (yet)
            live["upload"] = new.upload.model_copy(
                update={"bandwidth_limit": old.upload.bandwidth_limit}
            )
            restart.append("upload.bandwidth_limit")
            if live["upload"] == old.upload:
                del live["upload"]
        self.config = old.model_copy(update=live)
        if self.rt is not None:
            self.rt.config = self.config
        if "upload" in live and self.uploader is not None:
            self.uploader.resize(self.config.upload.concurrency)
        if "log" in live:
            from dockd.observers.log import setup

            setup(self.config.log.level)
        if "mqtt" in live and old.mqtt.enabled != new.mqtt.enabled:
            restart.append("mqtt.enabled")  # an observer is started or not at start-up only
        for observer in self.observers:
            reconfigure = getattr(observer, "reconfigure", None)
            if reconfigure is not None and ("mqtt" in live or "cameras" in live):
                task = asyncio.get_running_loop().create_task(reconfigure(self.config))
                self._background.add(task)
                task.add_done_callback(self._reconfigured)
        self.log.info("config_reloaded", applied=sorted(live), needs_restart=restart)

    def _reconfigured(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("reconfigure_failed", error=str(task.exception()))

    async def _recover(self, rt: Runtime, store: Store) -> None:
        j = rt.journal.journal
        await rt.journal(j.reset_docked)
        if isinstance(store, FilesystemStore):
            with contextlib.suppress(OSError):
                n = await asyncio.to_thread(store.clean_incoming)
                if n:
                    self.log.info("store_temporaries_removed", count=n)
        await self._release_finished_staging(rt)

    async def _release_finished_staging(self, rt: Runtime) -> None:
        """A crash between recording a session uploaded (or empty) and removing its staging
        folder leaves the folder behind; nothing else would ever remove it. Folders of sessions
        the journal never heard of hold nothing that was recorded verified: removed too."""
        j = rt.journal.journal
        try:
            names = await asyncio.to_thread(lambda: sorted(p.name for p in rt.staging.iterdir()))
        except OSError:
            return
        for name in names:
            if not SESSION_ID_RE.match(name):
                continue  # not ours (lost+found of a staging filesystem, an admin's file)
            s = await rt.journal(j.session, name)
            if s is not None and s.state not in FINISHED_STATES:
                continue
            await asyncio.to_thread(_remove_tree, rt.staging / name)
            if s is not None and s.state != SessionState.EMPTY:
                released = await rt.journal(j.staging_was_released, s.id)
                if not released:
                    await rt.journal(j.staging_released, s.id)
            self.log.info(
                "staging_released_after_restart",
                session_id=name,
                state=None if s is None else str(s.state),
            )

    async def _close_orphans(self, rt: Runtime) -> None:
        """Sessions a crash left offloading, for cameras not docked now: finish them with what
        was verified (their camera's next docking starts a new session for the rest)."""
        j = rt.journal.journal
        for s in await rt.journal(j.offloading_sessions):
            if s.camera not in self.docked:
                state = await rt.journal(j.finish_offload, s.id, True)
                # dashboards still hold its last retained state from before the crash
                self.bus.publish(CameraStatus(s.camera, "undocked", s.id))
                self.log.info(
                    "session_closed_after_restart",
                    camera=s.camera,
                    session_id=s.id,
                    state=str(state),
                )
        rt.upload_wakeup.set()

    async def _consume(self, queue: asyncio.Queue[SourceEvent]) -> None:
        while True:
            await self._on_source_event(await queue.get())

    async def _on_source_event(self, event: SourceEvent) -> None:
        if isinstance(event, Docked):
            await self._on_docked(event)
        elif isinstance(event, Undocked):
            await self._on_undocked(event)
        else:
            await self._on_refused(event)

    async def _on_refused(self, event: Refused) -> None:
        """Never mounted, never read: logged, told to the dashboards, kept in custody."""
        assert self.rt is not None
        self.log.warning(
            "camera_refused", device=event.device, reason=event.reason, source=event.source
        )
        self.bus.publish(
            Notice("camera_refused", None, None, {"device": event.device, "reason": event.reason})
        )
        await self.rt.journal(
            self.rt.journal.journal.custody_event,
            "camera_refused",
            None,
            device=event.device,
            reason=event.reason,
            source=event.source,
        )

    async def _on_docked(self, event: Docked) -> None:
        assert self.rt is not None
        rt = self.rt
        cam = camera_id(event.camera)
        if cam is None:
            self.log.warning(
                "camera_refused",
                reason="camera id not allowed",
                raw_id=event.camera[:80],
                location=event.location,
            )
            rt.bus.publish(
                Notice(
                    "camera_refused",
                    None,
                    None,
                    {
                        "reason": "camera id must match [A-Za-z0-9._-]{1,64}",
                        "location": event.location,
                    },
                )
            )
            await rt.journal(
                rt.journal.journal.custody_event,
                "camera_refused",
                None,
                raw_id=event.camera,
                location=event.location,
            )
            return
        if cam in self.docked:
            return
        self.docked[cam] = event
        j = rt.journal.journal
        await rt.journal(
            j.camera_docked, cam, event.source, event.location, event.vendor_id, event.model_id
        )
        self._start_session(event, cam)
        self._write_status_soon()

    def _start_session(self, docked: Docked, cam: CameraId) -> None:
        assert self.rt is not None
        session = CameraSession(self.rt, docked, cam)
        self.sessions[cam] = session
        task = asyncio.create_task(self._run_session(session), name=f"session-{cam}")
        self._session_tasks[cam] = task

    async def _run_session(self, session: CameraSession) -> None:
        try:
            await session.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # supervisor boundary: one camera's crash is not the dock's
            self.log.exception(
                "session_crashed", camera=session.camera, session_id=session.session_id
            )
            assert self.rt is not None
            self.rt.bus.publish(
                CameraStatus(
                    session.camera, "error", session.session_id, error=f"internal error: {exc}"
                )
            )
        finally:
            self._session_tasks.pop(session.camera, None)
            again = (
                session.split
                and not self.stopping.is_set()
                and self.docked.get(session.camera) is session.docked
            )
            if again:  # staging filled up: the next session takes the rest of this camera
                self._start_session(session.docked, session.camera)
            source = self._sources.get(session.docked.source)
            if source is not None and not session.parked and not again:
                try:
                    await source.release(session.docked)
                except SourceError as exc:
                    self.log.error("camera_release_failed", camera=session.camera, error=str(exc))
            self._write_status_soon()

    async def _on_undocked(self, event: Undocked) -> None:
        assert self.rt is not None
        cam = camera_id(event.camera)
        if cam is None or cam not in self.docked:
            return
        del self.docked[cam]
        session = self.sessions.pop(cam, None)
        if session is not None:
            session.undock()
        task = self._session_tasks.get(cam)
        if task is not None:
            # the session records itself interrupted and says so; wait, so that "undocked" is
            # journalled after it
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        session_id = session.session_id if session else None
        await self.rt.journal(self.rt.journal.journal.camera_undocked, cam, session_id)
        if task is None:
            self.bus.publish(CameraStatus(cam, "undocked", session_id))
        self._write_status_soon()

    def _uploader(self, rt: Runtime) -> Callable[[], Awaitable[None]]:
        from dockd.upload.worker import Uploader

        async def run() -> None:
            self.uploader = Uploader(rt, self._after_upload)
            await self.uploader.run()

        return run

    async def _after_upload(self, session: SessionRow) -> None:
        """`camera.clear = "after_upload"`: clear the camera of what this session stored, if it
        is still docked, through a root its source opens for the clear step only (a USB camera:
        a read-write mount of the same device, synced and unmounted right after). What may be
        removed, and whether to try at all, is decided in clear.py."""
        assert self.rt is not None
        if self.config.camera.clear != "after_upload":
            return
        cam = session.camera
        current = self.sessions.get(cam)
        task = self._session_tasks.get(cam)
        if task is not None and current is not None and current.session_id == session.id:
            # its own offload is letting go of the camera (the read-only mount): wait for that
            await asyncio.wait([task])
            task = self._session_tasks.get(cam)
        docked = self.docked.get(cam)
        source = self._sources.get(docked.source) if docked is not None else None
        why = clear.why_not_now(
            docked=docked is not None,
            reading=task is not None,
            clearable=isinstance(source, Clearable),
        )
        if why is not None:
            self._clear_not_possible(session, why)
            return
        assert docked is not None and isinstance(source, Clearable)
        files = await clear.clearable_files(self.rt, session)
        if files is None:
            return
        try:
            target = await source.open_for_clearing(docked)
        except SourceError as exc:
            self._clear_not_possible(session, f"{exc}; nothing removed")
            return
        try:
            await clear.clear_session(
                self.rt, session, target, files, still_docked=lambda: self.docked.get(cam) is docked
            )
        finally:
            try:
                await source.close_after_clearing(docked)
            except SourceError as exc:
                self.log.error(
                    "clear_close_failed", camera=cam, session_id=session.id, error=str(exc)
                )

    def _clear_not_possible(self, session: SessionRow, reason: str) -> None:
        """Told to the dashboards; the log observer logs it."""
        self.bus.publish(
            Notice("clear_not_possible", session.camera, session.id, {"reason": reason})
        )

    async def _status_writer(self) -> None:
        """Publishes the dock summary on every change (and every 30 s, for staging space), and
        keeps what only the daemon knows (problems, pid) in the journal for `dockd status`."""
        assert self.rt is not None
        rt = self.rt
        while True:
            rt.problems.changed.clear()
            summary = await rt.journal(rt.journal.journal.queue_summary)
            prioritized = await rt.journal(rt.journal.journal.prioritized_sessions)
            try:
                staging_free: int | None = await asyncio.to_thread(free_bytes, rt.staging)
            except OSError:
                staging_free = None
            problems = rt.problems.items
            busy = bool(self._session_tasks) or summary.sessions > 0
            status = DockStatus(
                state="degraded" if problems else "busy" if busy else "idle",
                cameras_docked=tuple(sorted(self.docked)),
                queue=QueueFacts(
                    summary.sessions,
                    summary.files,
                    summary.bytes,
                    summary.failed,
                    tuple(prioritized),
                ),
                staging_free_bytes=staging_free,
                store_reachable=rt.problems.store_reachable,
                problems=problems,
                version=__version__,
            )
            if _differs(status, self._last_status):
                self.bus.publish(status)
                self._last_status = status
            await rt.journal(
                rt.journal.journal.set_daemon_status,
                pid=os.getpid(),
                version=__version__,
                state=status.state,
                problems=list(problems),
                store_reachable=rt.problems.store_reachable,
                docked=sorted(self.docked),
                offloading=sorted(self._session_tasks),
            )
            # not wait_for: on 3.11 it swallows a cancel that lands as the event is set, and the
            # shutdown (TaskGroup cancel) would then wait on this task for ever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    await rt.problems.changed.wait()

    def _write_status_soon(self) -> None:
        if self.rt is not None:
            self.rt.problems.changed.set()

    async def _supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        crashes: list[float] = []
        while True:
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # supervisor boundary
                now = time.monotonic()
                crashes = [t for t in crashes if now - t < CRASH_WINDOW_S] + [now]
                self.log.exception("task_crashed", task=name, crashes=len(crashes))
                if len(crashes) >= MAX_CRASHES:
                    self._failure = exc
                    self.stop()
                    return
                await asyncio.sleep(min(60.0, 2.0 ** len(crashes)))

    async def _shutdown(self, sources: list[Source]) -> None:
        """Park every session (its copy stops after the chunk in hand, the partial file is
        discarded, the session stays `offloading` for the next start to resume), wait for them,
        and only then stop the sources: a source's stop unmounts, which must not pull a camera
        out from under a session still reading it."""
        self.log.info("daemon_stopping")
        for session in self.sessions.values():
            session.park()
        # sd_notify STOPPING=1: from here on no camera file is read past the chunk in hand
        self.bus.publish(Notice("daemon_stopping"))
        tasks = list(self._session_tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        for source in sources:
            with contextlib.suppress(SourceError, OSError):
                await source.stop()


def _observe(observer: Observer, sub: Subscription) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await observer.run(sub)

    return run


def _remove_tree(path: Path) -> None:
    """Remove a staging folder. Gone already (or going, entry by entry) is what was asked:
    a session that ends `empty` during start-up removes its own folder while this runs."""

    def gone_is_fine(func: object, p: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise exc

    if not path.is_dir():
        path.unlink(missing_ok=True)
    elif sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=gone_is_fine)
    else:
        shutil.rmtree(path, onerror=lambda f, p, info: gone_is_fine(f, p, info[1]))
    fsync_dir(path.parent)


def _differs(a: DockStatus, b: DockStatus | None) -> bool:
    """Everything but the timestamp."""
    return b is None or dataclasses.replace(a, at="") != dataclasses.replace(b, at="")


class _Stop(Exception):
    """Raised inside the task group to cancel every task at shutdown."""


def _prepare_state_dir(cfg: Config) -> None:
    for d in (cfg.dock.state_dir, cfg.staging_dir):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(d, 0o700)


def state_paths(cfg: Config) -> tuple[Path, Path]:
    return cfg.journal_path, cfg.staging_dir
