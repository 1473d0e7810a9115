"""Run the real dockd daemon in a fresh child process and measure it from the inside.

`run_daemon(spec)` starts a spawn child (so memory, CPU and the event loop are the daemon's own,
not the harness's), builds `dockd.daemon.Daemon` there as `dockd run` does (directory source,
the given store, `mqtt.enabled=false`, otherwise the shipped defaults unless the spec overrides
them), docks the cameras of the spec at one instant and returns what it measured:

- wall time from docking to the last `safe_to_undock` (every file verified in staging and in the
  journal), and optionally on to the last `session_uploaded`;
- CPU seconds of the daemon process (all its threads), peak RSS (VmHWM reset at docking) and an
  RSS sample every second;
- the event loop's lag, from a task that sleeps 10 ms in a loop beside the daemon's tasks;
- journal write transactions (COMMITs, counted with sqlite's trace callback on the daemon's own
  connection), time the journal thread was busy, and the journal's size on disk;
- thread-seconds inside copy_file and waiting for journal flushes (wrapping the names the
  session looks up at call time, as offload.py does).

Cameras are docked either by renaming a folder into the directory source's dock directory (the
real path of the directory source), or, for cameras that are filesystems of their own (a loop
device each), by handing the daemon the same `Docked` event a source hands it
(`Daemon._on_source_event`, the one entry point every source goes through). dockd's code is not
modified.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import resource
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@dataclass
class Cam:
    id: str
    root: Path  # where the daemon reads the camera
    rename_from: Path | None = None  # dock by renaming this folder to `root` (directory source)
    files: int = 0
    bytes: int = 0


@dataclass
class Spec:
    work: Path  # daemon state goes to work/state unless state_dir is given
    dock_dir: Path  # the directory source's path
    cams: list[Cam]
    store: dict[str, Any]
    offload: dict[str, Any] = field(default_factory=dict)
    upload: dict[str, Any] = field(default_factory=dict)
    state_dir: Path | None = None
    wait_upload: bool = False  # after the offload, wait for every session_uploaded too
    upload_only: int = 0  # dock nothing: wait for this many session_uploaded (queued earlier)
    cold: bool = True  # drop the page cache right before docking
    can_drop: bool = True
    devices: list[str] = field(default_factory=list)  # block devices to count I/O on
    disk: str | None = None
    cgroup_procs: Path | None = None  # join this cgroup first (ReadThrottle)
    log_level: str = "info"
    log_file: Path | None = None
    time_split: bool = True  # keeps one tuple per copy: off for the memory benchmark
    lag_trace_ms: float = 0.0  # diagnosis: record the loop thread's stack when this late
    # what-if experiments: "FILE.py:FUNCTION", run in the child before the daemon is built
    # (to patch dockd in that process only; dockd's files are not touched)
    setup: str | None = None
    timeout: float = 3600.0
    keep_state: bool = True


def run_daemon(spec: Spec, on_start: Any = None) -> dict[str, Any]:
    """Run the spec in a spawn child; `on_start(pid)` is called once it runs (py-spy)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, spec), name="dockd-bench")
    control = _ControlSleeper()
    proc.start()
    child.close()
    if on_start is not None:
        on_start(proc.pid)
    try:
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", "the dockd child process died without a result"
    finally:
        control.stop()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"dockd run failed:\n{payload}")
    result: dict[str, Any] = payload
    result["control_lag"] = control.stats()
    return result


class _ControlSleeper:
    """The same 10 ms sleeper as the daemon's lag monitor, in this (idle) harness process, for
    the child's whole life: how late a thread that does nothing wakes on this machine. A daemon
    lag far above it is the daemon's; a lag the control shares is the machine's (other jobs on
    the shared cores)."""

    def __init__(self, interval: float = 0.010) -> None:
        from _common import LagMonitor

        self.mon = LagMonitor(interval)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="control-sleeper", daemon=True)
        self._t.start()

    def _run(self) -> None:
        mon = self.mon
        while not self._stop.is_set():
            t = time.perf_counter()
            time.sleep(mon.interval)
            over = max(0.0, time.perf_counter() - t - mon.interval)
            mon.n += 1
            mon.total += over
            mon.max = max(mon.max, over)
            mon.hist[min(mon.BINS, int(over / mon.BIN_S))] += 1

    def stop(self) -> None:
        self._stop.set()
        self._t.join()

    def stats(self) -> dict[str, float]:
        return self.mon.stats()


def _child(conn: Any, spec: Spec) -> None:
    try:
        import sys

        sys.path.insert(0, str(HERE.parent / "daemon"))
        if spec.cgroup_procs is not None:
            from _common import join_cgroup

            join_cgroup(spec.cgroup_procs)
        from dockd.observers.log import setup as setup_logging

        if spec.setup:
            import runpy

            path, _, fn = spec.setup.rpartition(":")
            runpy.run_path(path)[fn]()

        log_path = spec.log_file or spec.work / "dockd.log"
        with open(log_path, "a") as log:
            setup_logging(spec.log_level, stream=log)
            result = asyncio.run(_drive(spec))
        conn.send(("ok", result))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class _JournalCounter:
    """COMMITs on the daemon's journal connection, and the time its thread spends in calls."""

    def __init__(self) -> None:
        self.commits = 0
        self.statements = 0
        self.busy_s = 0.0
        self.calls = 0
        self.by_fn: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def trace(self, sql: str) -> None:
        self.statements += 1
        if sql.lstrip()[:6].upper() == "COMMIT":
            self.commits += 1

    def reset(self) -> None:
        self.commits = self.statements = self.calls = 0
        self.busy_s = 0.0
        self.by_fn = {}


@contextlib.contextmanager
def _instrument_journal(counter: _JournalCounter) -> Any:
    import functools

    from _common import patched

    import dockd.journal.db as db_mod
    from dockd.journal.thread import JournalThread

    real_connect = db_mod.connect
    real_call = JournalThread.__call__

    def connect(path: Path, *, readonly: bool = False) -> Any:
        conn = real_connect(path, readonly=readonly)
        if not readonly:
            conn.set_trace_callback(counter.trace)
        return conn

    async def call(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(fn, "__name__", type(fn).__name__)

        def timed() -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                counter.busy_s += dt
                counter.calls += 1
                slot = counter.by_fn.setdefault(name, [0, 0.0])
                slot[0] += 1
                slot[1] += dt

        return await real_call(self, functools.partial(timed))

    with patched(db_mod, connect=connect), patched(JournalThread, __call__=call):
        yield


class LagTracer:
    """Diagnosis (spec.lag_trace_ms): a thread that notes the event loop's heartbeat every ms
    and, when the loop is later than the threshold, records the main thread's Python stack at
    that moment. A stack inside a callback means the loop itself was busy; a stack at the
    selector means the loop thread was ready but waiting for the GIL (other threads running
    Python code)."""

    def __init__(self, threshold_ms: float) -> None:
        self.threshold = threshold_ms / 1000
        self.beat = time.perf_counter()
        self.stacks: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._main = threading.main_thread().ident

    async def heartbeat(self) -> None:
        while True:
            self.beat = time.perf_counter()
            await asyncio.sleep(0.001)

    def start(self) -> None:
        threading.Thread(target=self._run, name="lag-tracer", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import sys
        import traceback as tb

        last_beat = 0.0
        while not self._stop.wait(0.002):
            late = time.perf_counter() - self.beat
            if late > self.threshold and self.beat != last_beat:
                last_beat = self.beat
                frame = sys._current_frames().get(self._main or 0)
                if frame is None:
                    continue
                stack = tb.extract_stack(frame)[-6:]
                key = " <- ".join(
                    f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack)
                )
                slot = self.stacks.setdefault(key, [0, 0.0])
                slot[0] += 1
                slot[1] = max(slot[1], late)


def _journal_bytes(state: Path) -> int:
    total = 0
    for name in ("journal.sqlite3", "journal.sqlite3-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += (state / name).stat().st_size
    return total


def _thread_io(prefix: str) -> dict[str, int]:
    """/proc/self/task/<tid>/io of the threads named `prefix*`: wchar = bytes handed to write(),
    syscw = write calls. For the journal thread that is every byte sqlite wrote (WAL frames and
    checkpoints), its fsyncs aside."""
    total = {"wchar": 0, "syscw": 0}
    for t in threading.enumerate():
        if t.name.startswith(prefix) and t.native_id is not None:
            with contextlib.suppress(OSError), open(f"/proc/self/task/{t.native_id}/io") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in total:
                        total[k] += int(v)
    return total


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


async def _drive(spec: Spec) -> dict[str, Any]:
    from _common import (
        LagMonitor,
        Meter,
        drop_caches,
        patched,
        proc_status,
        reset_peak_rss,
    )

    from dockd.config import parse_config
    from dockd.daemon import Daemon
    from dockd.events import CameraStatus, EventBus, Notice
    from dockd.sources.base import Docked

    state = spec.state_dir or spec.work / "state"
    config = parse_config(
        {
            "dock": {"id": "bench-dock", "state_dir": str(state)},
            "sources": {"directory": {"enabled": True, "path": str(spec.dock_dir)}},
            "store": spec.store,
            "offload": spec.offload,
            "upload": spec.upload,
            "mqtt": {"enabled": False},
            "log": {"level": spec.log_level},
        },
        origin="bench",
    )
    counter = _JournalCounter()
    copies: list[tuple[float, float]] = []
    flushes: list[tuple[float, float]] = []
    copy_sum = [0.0, 0]
    stack = contextlib.ExitStack()
    stack.enter_context(_instrument_journal(counter))
    if spec.time_split:
        import dockd.offload.session as session_mod

        real_copy = session_mod.copy_file
        real_flush = session_mod.CameraSession._flush

        def copy_file_timed(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return real_copy(*a, **kw)
            finally:
                copies.append((t, time.perf_counter()))

        async def flush_timed(self: Any, *a: Any) -> None:
            t = time.perf_counter()
            try:
                await real_flush(self, *a)
            finally:
                flushes.append((t, time.perf_counter()))

        stack.enter_context(patched(session_mod, copy_file=copy_file_timed))
        stack.enter_context(patched(session_mod.CameraSession, _flush=flush_timed))
    else:
        import dockd.offload.session as session_mod

        real_copy = session_mod.copy_file

        def copy_file_counted(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return real_copy(*a, **kw)
            finally:
                copy_sum[0] += time.perf_counter() - t
                copy_sum[1] += 1

        stack.enter_context(patched(session_mod, copy_file=copy_file_counted))

    out: dict[str, Any] = {"pid": os.getpid()}
    lag = LagMonitor()
    rss_samples: list[tuple[float, int]] = []
    with stack:
        bus = EventBus()
        sub = bus.subscribe("bench", maxsize=1_000_000)
        daemon = Daemon(config, bus=bus)
        if spec.upload_only and spec.cold:
            drop_caches(spec.can_drop)  # staging is read from the disk, as after a restart
        t_start = time.perf_counter()
        task = asyncio.create_task(daemon.run(), name="daemon")
        lag_task = asyncio.create_task(lag.run(), name="lag-monitor")
        tracer = LagTracer(spec.lag_trace_ms) if spec.lag_trace_ms else None
        if tracer is not None:
            beat_task = asyncio.create_task(tracer.heartbeat(), name="lag-tracer")
            tracer.start()
        ready = asyncio.ensure_future(daemon.ready.wait())
        await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises why the daemon did not start
        out["startup_s"] = time.perf_counter() - t_start
        out["journal_bytes_before"] = _journal_bytes(state)
        sampling = True
        rss_task: asyncio.Task[None] | None = None

        async def sample_rss(t0: float) -> None:
            while sampling:
                rss_samples.append((time.perf_counter() - t0, proc_status("VmRSS")))
                await asyncio.sleep(1.0)

        try:
            if spec.upload_only:
                t0 = t_start  # the daemon was started on a cold cache (see _child)
                out["startup_lag"] = lag.stats()  # Daemon.run before ready (store built, ...)
                lag.reset()
                counter.reset()
                out["rss_before"] = proc_status("VmRSS")
                hwm_reset = reset_peak_rss()
                jio0 = _thread_io("journal_")
                cpu0 = _cpu()
                meter = Meter(spec.devices).__enter__()
            else:
                sub.drain()
                if spec.cold:
                    drop_caches(spec.can_drop)
                # the harness itself just held the loop (drop_caches): let the lag sample that
                # spans it finish before the counters start
                await asyncio.sleep(3 * lag.interval)
                out["rss_before"] = proc_status("VmRSS")
                hwm_reset = reset_peak_rss()
                lag.reset()
                counter.reset()
                jio0 = _thread_io("journal_")
                cpu0 = _cpu()
                meter = Meter(spec.devices).__enter__()
                t0 = time.perf_counter()
                for cam in spec.cams:
                    if cam.rename_from is not None:
                        os.rename(cam.rename_from, cam.root)
                    else:
                        await daemon._on_source_event(
                            Docked("bench", cam.id, cam.root, str(cam.root), writable=False)
                        )
            rss_task = asyncio.create_task(sample_rss(t0))
            marks: dict[str, dict[str, float]] = {c.id: {} for c in spec.cams}
            verified = 0
            waiting = {c.id for c in spec.cams}
            uploads_left = spec.upload_only or (len(spec.cams) if spec.wait_upload else 0)
            offload_done = not waiting
            async with asyncio.timeout(spec.timeout):
                if offload_done:
                    out["offload_s"] = 0.0
                async for ev in sub:
                    if not (waiting or uploads_left):
                        break
                    now = time.perf_counter() - t0
                    cam_id = getattr(ev, "camera", None)
                    if os.environ.get("DOCKD_BENCH_TRACE"):
                        print(
                            f"{now:8.3f} {type(ev).__name__} {cam_id} "
                            f"{getattr(ev, 'event', getattr(ev, 'state', ''))} {sorted(waiting)}",
                            file=sys.stderr,
                            flush=True,
                        )
                    if isinstance(ev, CameraStatus) and cam_id in marks:
                        marks[cam_id].setdefault(f"state {ev.state}", now)
                        if ev.state == "error":
                            raise RuntimeError(f"dockd: camera {cam_id} error: {ev.error}")
                    elif isinstance(ev, Notice) and ev.event == "file_verified":
                        verified += 1
                    elif isinstance(ev, Notice) and ev.event == "safe_to_undock":
                        if cam_id in waiting:
                            waiting.discard(cam_id)
                            marks[cam_id]["safe_to_undock"] = now
                            if not waiting:
                                meter.__exit__(None, None, None)
                                cpu1 = _cpu()
                                out["offload_s"] = now
                                out["offload_cpu_user_s"] = cpu1[0] - cpu0[0]
                                out["offload_cpu_sys_s"] = cpu1[1] - cpu0[1]
                                out["offload_peak_rss"] = (
                                    proc_status("VmHWM") if hwm_reset else None
                                )
                                out["offload_lag"] = lag.stats()
                                out["offload_journal"] = {
                                    "commits": counter.commits,
                                    "statements": counter.statements,
                                    "calls": counter.calls,
                                    "busy_s": counter.busy_s,
                                    "by_fn": {k: list(v) for k, v in counter.by_fn.items()},
                                    "write_bytes": _thread_io("journal_")["wchar"] - jio0["wchar"],
                                    "write_calls": _thread_io("journal_")["syscw"] - jio0["syscw"],
                                }
                                out["offload_meter"] = _meter_dict(meter, spec.disk)
                                lag.reset()
                                cpu_up = cpu1
                    elif isinstance(ev, Notice) and ev.event == "session_uploaded":
                        if cam_id in marks:
                            marks[cam_id]["session_uploaded"] = now
                        if uploads_left > 0:  # not waited for: sessions of cameras offloaded
                            uploads_left -= 1  # first upload while others still offload
                            if uploads_left == 0:
                                out["upload_end_s"] = now
                    elif isinstance(ev, Notice) and ev.event in (
                        "upload_failed",
                        "file_failed",
                        "file_unstable",
                    ):
                        raise RuntimeError(f"dockd: {ev.event}: {dict(ev.details)}")
                    if not (waiting or uploads_left):
                        break
            if spec.upload_only:
                meter.__exit__(None, None, None)
                cpu1 = _cpu()
                out["upload_meter"] = _meter_dict(meter, spec.disk)
                out["upload_cpu_s"] = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
                out["upload_lag"] = lag.stats()
                out["upload_ready_s"] = out["startup_s"]
                out["upload_journal"] = {
                    "commits": counter.commits,
                    "busy_s": counter.busy_s,
                    "write_bytes": _thread_io("journal_")["wchar"] - jio0["wchar"],
                }
            elif uploads_left == 0 and "upload_end_s" in out:
                cpu2 = _cpu()
                out["upload_cpu_s"] = (cpu2[0] - cpu_up[0]) + (cpu2[1] - cpu_up[1])
                out["upload_lag"] = lag.stats()
            out["peak_rss"] = proc_status("VmHWM") if hwm_reset else None
            out["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out["files_verified"] = verified
            out["marks"] = marks
            out["dropped_notices"] = sub.dropped
            out["journal"] = {
                "commits": counter.commits,
                "statements": counter.statements,
                "busy_s": counter.busy_s,
            }
        finally:
            sampling = False
            if rss_task is not None:
                rss_task.cancel()
            daemon.stop()
            await task
            lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag_task
            if tracer is not None:
                tracer.stop()
                beat_task.cancel()
                out["lag_trace"] = sorted(
                    ((k, v[0], v[1] * 1000) for k, v in tracer.stacks.items()), key=lambda t: -t[1]
                )[:15]
        out["journal_bytes_after"] = _journal_bytes(state)  # closed: the WAL is checkpointed
        out["rss_samples"] = rss_samples
        end = t0 + out.get("offload_s", 0.0)
        if spec.time_split:
            out["copy_thread_s"] = sum(min(b, end) - a for a, b in copies if a < end)
            out["copy_wall_s"] = _union(copies, end)
            out["copy_calls"] = len(copies)
            out["flush_wall_s"] = _union(flushes, end)
            out["flush_calls"] = len(flushes)
        else:
            out["copy_thread_s"], out["copy_calls"] = copy_sum
    return out


def _union(spans: list[tuple[float, float]], end: float) -> float:
    total = 0.0
    cur_a = cur_b = None
    for a, b in sorted(spans):
        if a >= end:
            break
        b = min(b, end)
        if cur_b is None or a > cur_b:
            if cur_b is not None and cur_a is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_a is not None and cur_b is not None:
        total += cur_b - cur_a
    return total


def _meter_dict(m: Any, disk: str | None) -> dict[str, Any]:
    d = {k: asdict(v) for k, v in getattr(m, "disk", {}).items()}
    return {"iowait_pct": m.iowait_pct, "disk": d, "disk_dev": disk}
