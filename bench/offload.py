"""Offload benchmark: dockd's verified offload against `cp` + `sha256sum` and against the bare I/O.

    .venv/bin/python bench/offload.py [--size-mib N] [--files N] [--small-files N] [--dir DIR]
                                      [--json] [--repeat N] [--cases big,small]
                                      [--only dd,io,cp,copyfile,copyfile2,dockd] [--no-upload]

Everything runs on the same generated data (random, incompressible) in one run, each measured run
starting from a cold page cache. Two cases:

  big    N footage files of --size-mib MiB each (default 4 x 256 MiB)
  small  many small files (default 2000 of 4-64 KiB)

and, for each case:

  dd        the bare I/O bound with `dd`: read the source (bs=8M), write the copy with
            conv=fsync, read the copy back with iflag=direct. No hashing, no rename, no journal.
  io        the same three steps as syscalls from this process (no fork/exec per file: with
            thousands of small files, spawning 3 dd processes per file dominates `dd`).
  cp        baseline: `cp -r src dst && sync && sha256sum` of every source and copied file.
  copyfile  dockd.offload.copy.copy_file called in a loop (no daemon, no journal), with a
            per-syscall time breakdown.
  copyfile2 copy_file on 2 threads, two files at a time: not what dockd does for one camera,
            a measure of what file-level parallelism (the second core) would give.
  dockd     the real daemon path: dockd.daemon.Daemon run in-process (in a fresh child
            interpreter, so its peak RSS is its own) with a directory source and a filesystem
            store; the camera folder is renamed into the dock directory and the clock stops at
            the "safe_to_undock" notice (every file verified in staging). The upload that
            follows is timed separately (warm cache) unless --no-upload.

When run as root the "camera" is a separate ext4 image (`mkfs.ext4 -d`) attached to a loop
device (direct I/O) and mounted, so source reads go through a real block device; the image file
lives on the same filesystem as the destination. Otherwise a plain directory is used and the
output says so. See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mmap
import multiprocessing
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "daemon"))  # runnable from a checkout without installing

from _common import (  # noqa: E402  (helpers shared by the benchmarks in bench/)
    CHUNK,
    Meter,
    MiB,
    Result,
    block_device_of,
    clean,
    cpu_seconds,
    drop_caches,
    is_root,
    patched,
    proc_status,
    reset_peak_rss,
    shq,
    write_random,
)

import dockd.offload.copy as copy_mod  # noqa: E402
from dockd.config import parse_config  # noqa: E402
from dockd.daemon import Daemon  # noqa: E402
from dockd.events import CameraStatus, EventBus, Notice  # noqa: E402
from dockd.observers.log import setup as setup_logging  # noqa: E402
from dockd.offload.copy import CopyJob, Progress, copy_file  # noqa: E402

TARGET_SPEEDUP_VS_CP = 3.0
TARGET_RATIO_VS_IO = 1.15
SMALL_PER_DIR = 500  # cameras number folders 100XXXXX, 101XXXXX, ... of a few hundred files
DOCKD_TIMEOUT_S = 900.0
METHODS = ("dd", "io", "cp", "copyfile", "copyfile2", "dockd")


# --------------------------------------------------------------------------------------------
# the camera: generated files, an ext4 image on a loop device when we can


@dataclass
class Case:
    name: str
    camera: str  # camera id = folder name
    files: list[tuple[str, int]]  # (relative path, size)

    @property
    def nbytes(self) -> int:
        return sum(s for _, s in self.files)


def make_cases(args: argparse.Namespace) -> list[Case]:
    rng = random.Random(args.seed)
    cases = []
    if "big" in args.cases and args.files > 0:
        big = [
            (f"DCIM/100BWC/CLIP{n:04d}.MP4", args.size_mib * MiB) for n in range(1, args.files + 1)
        ]
        cases.append(Case("big", "BENCHBIG01", big))
    if "small" in args.cases and args.small_files > 0:
        small = []
        for n in range(args.small_files):
            folder = f"DCIM/{100 + n // SMALL_PER_DIR}BWC"
            size = rng.randint(args.small_min_kib * 1024, args.small_max_kib * 1024)
            small.append((f"{folder}/IMG{n:05d}.JPG", size))
        cases.append(Case("small", "BENCHSMALL1", small))
    return cases


class Camera:
    """Source tree `<root>/incoming/<camera>/...` beside an empty `<root>/dock/`, so docking is a
    rename inside the camera filesystem (a mount point cannot be renamed)."""

    def __init__(self, work: Path, cases: list[Case], want_loop: bool, why_not: str) -> None:
        self.work = work
        self.cases = cases
        self.want_loop = want_loop
        self.loop_dev: str | None = None
        self.mounted = False
        self.root = work / "camera"
        self.image = work / "camera.img"
        self.note = ""
        self.why_not = why_not

    def src(self, case: Case) -> Path:
        return self.root / "incoming" / case.camera

    def dock_dir(self) -> Path:
        return self.root / "dock"

    def build(self) -> None:
        gen = self.work / "gen" if self.want_loop else self.root
        for case in self.cases:
            for rel, size in case.files:
                write_random(gen / "incoming" / case.camera / rel, size)
        (gen / "dock").mkdir(parents=True, exist_ok=True)
        if not self.want_loop:
            self.note = f"plain directory on the destination filesystem ({self.why_not})"
            return
        try:
            self._build_image(gen)
        except (OSError, subprocess.CalledProcessError) as exc:
            self.close()
            shutil.rmtree(self.root, ignore_errors=True)
            os.rename(gen, self.root)
            self.note = f"plain directory on the destination filesystem (loop image failed: {exc})"
            return
        shutil.rmtree(gen)

    def _build_image(self, gen: Path) -> None:
        data = sum(-(-s // 4096) * 4096 for c in self.cases for _, s in c.files)
        nfiles = sum(len(c.files) for c in self.cases)
        size = int(data * 1.08) + nfiles * 8192 + 64 * MiB
        subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",
                "-N",
                str(nfiles + 4096),
                "-d",
                str(gen),
                str(self.image),
                f"{size // 1024}k",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        direct = "on"
        try:
            out = subprocess.run(
                ["losetup", "--find", "--show", "--direct-io=on", str(self.image)],
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError:
            direct = "off"
            out = subprocess.run(
                ["losetup", "--find", "--show", str(self.image)],
                check=True,
                capture_output=True,
                text=True,
            )
        self.loop_dev = out.stdout.strip()
        self.root.mkdir(exist_ok=True)
        subprocess.run(
            ["mount", "-t", "ext4", "-o", "noatime", self.loop_dev, str(self.root)],
            check=True,
            capture_output=True,
            text=True,
        )
        self.mounted = True
        self.note = (
            f"ext4 image {self.image.name} ({size / MiB:.0f} MiB) on {self.loop_dev} "
            f"(direct-io={direct}), mounted at {self.root}"
        )

    def close(self) -> None:
        if self.mounted:
            r = subprocess.run(["umount", str(self.root)], capture_output=True, text=True)
            if r.returncode != 0:  # something still holds it; try lazily so we can detach
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True, text=True)
            self.mounted = False
        if self.loop_dev:
            subprocess.run(["losetup", "-d", self.loop_dev], capture_output=True, text=True)
            self.loop_dev = None


# --------------------------------------------------------------------------------------------
# (c) the I/O bound


def run_dd(case: Case, src: Path, dst: Path, env: Env) -> Result:
    """Per file: dd read (bs=8M), dd write conv=fsync (source now cached), dd direct read-back."""
    lines = ["set -e"]
    for i, (rel, _) in enumerate(case.files):
        s, d = shq(src / rel), shq(dst / str(i))
        lines.append(f"dd if={s} of=/dev/null bs=8M status=none")
        lines.append(f"dd if={s} of={d} bs=8M conv=fsync status=none")
        lines.append(f"dd if={d} of=/dev/null bs=8M iflag=direct status=none")
    script = env.work / f"dd-{case.name}.sh"
    script.write_text("\n".join(lines) + "\n")
    dst.mkdir(parents=True)
    env.cold()
    with Meter(env.devices) as m:
        subprocess.run(["bash", str(script)], check=True)
    r = m.result(
        case.name,
        "dd",
        "I/O bound: dd read + dd write fsync + dd direct read-back",
        case.nbytes,
        len(case.files),
        env.disk,
    )
    clean(dst)
    return r


def run_io(case: Case, src: Path, dst: Path, env: Env) -> Result:
    """The dd steps as syscalls from this process: read, write + fsync, O_DIRECT read-back."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    abuf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    dst.mkdir(parents=True)
    env.cold()
    with Meter(env.devices) as m:
        for i, (rel, _) in enumerate(case.files):
            fd = os.open(src / rel, os.O_RDONLY)
            try:
                while os.readv(fd, [view]):
                    pass
                os.lseek(fd, 0, os.SEEK_SET)
                out = os.open(dst / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    while n := os.readv(fd, [view]):
                        chunk = view[:n]
                        while chunk:
                            chunk = chunk[os.write(out, chunk) :]
                    os.fsync(out)
                finally:
                    os.close(out)
            finally:
                os.close(fd)
            fd = os.open(dst / str(i), os.O_RDONLY | os.O_DIRECT)
            try:
                while os.readv(fd, [abuf]):
                    pass
            finally:
                os.close(fd)
    abuf.close()
    r = m.result(
        case.name,
        "io",
        "I/O bound: same syscalls in-process (no fork/exec)",
        case.nbytes,
        len(case.files),
        env.disk,
    )
    clean(dst)
    return r


# --------------------------------------------------------------------------------------------
# (b) the cp baseline


def run_cp(case: Case, src: Path, dst: Path, env: Env) -> Result:
    cmd = (
        f"cp -r {shq(src)} {shq(dst)} && sync && "
        f"find {shq(src)} {shq(dst)} -type f -print0 | xargs -0 sha256sum > /dev/null"
    )
    env.cold()
    with Meter(env.devices) as m:
        subprocess.run(["bash", "-c", cmd], check=True)
    r = m.result(
        case.name,
        "cp",
        "baseline: cp -r && sync && sha256sum src+dst",
        case.nbytes,
        len(case.files),
        env.disk,
    )
    clean(dst)
    return r


# --------------------------------------------------------------------------------------------
# copy_file alone, with a per-syscall breakdown


class _Clock:
    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)
        self.phase = "inline"

    def timed(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t[key] += time.perf_counter() - t
                self.n[key] += 1

        return wrapper


class _OsShim:
    """Stands in for `os` inside dockd.offload.copy while copy_file runs in the loop: times each
    syscall copy_file makes and passes everything through unchanged."""

    def __init__(self, clock: _Clock) -> None:
        self._clock = clock
        self._dirs: set[int] = set()
        self.preadv = clock.timed("source read (preadv)", os.preadv)
        self.write = clock.timed("staging write", os.write)
        self.readv = clock.timed("read-back read (readv)", os.readv)
        self.posix_fadvise = clock.timed("fadvise DONTNEED", os.posix_fadvise)
        self.rename = clock.timed("open/stat/rename/close", os.rename)
        self.fstat = clock.timed("open/stat/rename/close", os.fstat)
        self._open = clock.timed("open/stat/rename/close", os.open)
        self._close = clock.timed("open/stat/rename/close", os.close)
        self._fsync_file = clock.timed("fsync file", os.fsync)
        self._fsync_dir = clock.timed("fsync dir", os.fsync)

    def open(self, path: Any, flags: int, *a: Any, **kw: Any) -> int:
        fd: int = self._open(path, flags, *a, **kw)
        if flags & os.O_DIRECTORY:
            self._dirs.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self._dirs.discard(fd)
        self._close(fd)

    def fsync(self, fd: int) -> None:
        (self._fsync_dir if fd in self._dirs else self._fsync_file)(fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


class _HashlibShim:
    def __init__(self, clock: _Clock) -> None:
        self._clock = clock

    def sha256(self) -> Any:
        import hashlib

        clock = self._clock
        h = hashlib.sha256()

        class _H:
            def update(self, data: Any) -> None:
                t = time.perf_counter()
                h.update(data)
                key = f"SHA-256 {clock.phase}"
                clock.t[key] += time.perf_counter() - t
                clock.n[key] += 1

            def hexdigest(self) -> str:
                return h.hexdigest()

        return _H()


def instrumented_copy_module(clock: _Clock) -> contextlib.AbstractContextManager[None]:
    real_hash_file = copy_mod.hash_file

    def hash_file(*a: Any, **kw: Any) -> str:
        clock.phase = "read-back"
        try:
            return real_hash_file(*a, **kw)
        finally:
            clock.phase = "inline"

    return patched(copy_mod, os=_OsShim(clock), hashlib=_HashlibShim(clock), hash_file=hash_file)


def run_copyfile(case: Case, src: Path, dst: Path, env: Env) -> Result:
    buf = bytearray(CHUNK)
    progress = Progress()
    cancel = threading.Event()
    jobs = []
    for i, (rel, size) in enumerate(case.files):
        st = os.stat(src / rel)
        assert st.st_size == size
        jobs.append(CopyJob(os.fsencode(src / rel), dst / str(i), size, st.st_mtime_ns))
    dst.mkdir(parents=True)
    clock = _Clock()
    env.cold()
    with instrumented_copy_module(clock), Meter(env.devices) as m:
        for job in jobs:
            copy_file(job, buf, progress, cancel)
    # what one timed call costs, to say how much of the breakdown is the shim itself
    probe = clock.timed("probe", lambda: None)
    t = time.perf_counter()
    for _ in range(10000):
        probe()
    per_call = (time.perf_counter() - t) / 10000
    calls = sum(v for k, v in clock.n.items() if k != "probe")
    breakdown = {k: v for k, v in clock.t.items() if k != "probe"}
    breakdown["python + other (rest)"] = max(0.0, m.seconds - sum(breakdown.values()))
    r = m.result(
        case.name,
        "copyfile",
        "copy_file() in a loop (no daemon, no journal)",
        case.nbytes,
        len(case.files),
        env.disk,
        breakdown=breakdown,
        calls=dict(clock.n),
        shim_overhead_s=calls * per_call,
    )
    clean(dst)
    return r


def run_copyfile2(case: Case, src: Path, dst: Path, env: Env) -> Result:
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()
    cancel = threading.Event()

    def one(job: CopyJob) -> None:
        if not hasattr(local, "buf"):
            local.buf = bytearray(CHUNK)
        copy_file(job, local.buf, Progress(), cancel)

    jobs = []
    for i, (rel, size) in enumerate(case.files):
        st = os.stat(src / rel)
        jobs.append(CopyJob(os.fsencode(src / rel), dst / str(i), size, st.st_mtime_ns))
    dst.mkdir(parents=True)
    env.cold()
    with ThreadPoolExecutor(2) as pool, Meter(env.devices) as m:
        list(pool.map(one, jobs))
    r = m.result(
        case.name,
        "copyfile2",
        "copy_file() on 2 threads (what-if: 2 files at a time)",
        case.nbytes,
        len(case.files),
        env.disk,
    )
    clean(dst)
    return r


# --------------------------------------------------------------------------------------------
# (a) dockd, the real daemon path


class _Intervals:
    """Wall-clock intervals spent inside a wrapped function (one at a time in dockd's session)."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    def total(self) -> float:
        return sum(b - a for a, b in self.spans)


@contextlib.contextmanager
def instrumented_session(copies: _Intervals, flushes: _Intervals) -> Iterator[None]:
    """Time copy_file calls and journal flush awaits inside dockd's CameraSession, by wrapping
    the names it looks up at call time; dockd's code runs unchanged."""
    import dockd.offload.session as session_mod

    real_copy = getattr(session_mod, "copy_file")  # noqa: B009
    real_flush = session_mod.CameraSession._flush

    def copy_file_timed(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return real_copy(*a, **kw)
        finally:
            copies.spans.append((t, time.perf_counter()))

    async def flush_timed(self: Any, batch: Any) -> None:
        t = time.perf_counter()
        try:
            await real_flush(self, batch)
        finally:
            flushes.spans.append((t, time.perf_counter()))

    with (
        patched(session_mod, copy_file=copy_file_timed),
        patched(session_mod.CameraSession, _flush=flush_timed),
    ):
        yield


async def _drive_dockd(case: Case, env: Env, base: Path, upload: bool) -> dict[str, Any]:
    config = parse_config(
        {
            "dock": {"id": "bench-dock", "state_dir": str(base / "state")},
            "sources": {"directory": {"enabled": True, "path": str(env.camera.dock_dir())}},
            "store": {"kind": "filesystem", "path": str(base / "store")},
            "mqtt": {"enabled": False},
            "log": {"level": env.log_level},
        },
        origin="bench",
    )
    bus = EventBus()
    daemon = Daemon(config, bus=bus)
    sub = bus.subscribe("bench", maxsize=1_000_000)
    task = asyncio.create_task(daemon.run(), name="daemon")
    ready = asyncio.ensure_future(daemon.ready.wait())
    await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises why the daemon did not start
    sub.drain()
    marks: dict[str, float] = {}
    info: dict[str, Any] = {}
    try:
        env.cold()
        cpu0 = cpu_seconds()[0]
        rss_before = proc_status("VmRSS")
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        info["hwm_startup"] = proc_status("VmHWM")
        hwm_reset = reset_peak_rss()
        meter = Meter(env.devices).__enter__()
        t0 = info["t0"] = time.perf_counter()
        os.rename(env.camera.src(case), env.camera.dock_dir() / case.camera)
        verified = 0
        async with asyncio.timeout(DOCKD_TIMEOUT_S):
            async for ev in sub:
                now = time.perf_counter() - t0
                if isinstance(ev, CameraStatus) and ev.camera == case.camera:
                    marks.setdefault(f"state {ev.state}", now)
                    if ev.state == "error":
                        raise RuntimeError(f"dockd: camera error: {ev.error}")
                elif isinstance(ev, Notice) and ev.event == "file_verified":
                    verified += 1
                    marks.setdefault("first file_verified", now)
                    marks["last file_verified"] = now
                elif isinstance(ev, Notice) and ev.event == "safe_to_undock":
                    meter.__exit__(None, None, None)
                    marks["safe_to_undock"] = now
                    info["offload_cpu_s"] = cpu_seconds()[0] - cpu0
                    info["outcome"] = ev.details.get("outcome")
                    break
                elif isinstance(ev, Notice) and ev.event.startswith("file_"):
                    raise RuntimeError(f"dockd: {ev.event}: {dict(ev.details)}")
        info["peak_rss"] = proc_status("VmHWM") if hwm_reset else None
        info["rss_before"] = rss_before
        info["maxrss_before"] = maxrss_before
        info["maxrss_after"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        info["files_verified"] = verified
        info["meter"] = meter
        if upload:
            t1 = time.perf_counter()
            async with asyncio.timeout(DOCKD_TIMEOUT_S):
                async for ev in sub:
                    if isinstance(ev, Notice) and ev.event == "session_uploaded":
                        info["upload_s"] = time.perf_counter() - t1
                        info["peak_rss_upload"] = proc_status("VmHWM") if hwm_reset else None
                        break
                    if isinstance(ev, Notice) and ev.event == "upload_failed":
                        raise RuntimeError(f"dockd upload failed: {dict(ev.details)}")
        info["dropped_notices"] = sub.dropped
    finally:
        daemon.stop()
        await task
        docked = env.camera.dock_dir() / case.camera
        if docked.exists():
            os.rename(docked, env.camera.src(case))
    info["marks"] = marks
    return info


def run_dockd(case: Case, env: Env, upload: bool) -> list[Result]:
    """dockd in a fresh child interpreter (spawn), so the peak RSS reported is the daemon's own
    and not this harness's; the Daemon runs in-process there, as `dockd run` runs it."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_dockd_child, args=(child, case, env, upload), name="dockd-bench")
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", "the dockd child process died without a result"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"dockd run failed:\n{payload}")
    return [Result(**d) for d in payload]


def _dockd_child(conn: Any, case: Case, env: Env, upload: bool) -> None:
    try:
        with open(env.work / "dockd.log", "a") as log:
            setup_logging(env.log_level, stream=log)
            results = _run_dockd_here(case, env, upload)
        conn.send(("ok", [asdict(r) for r in results]))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _run_dockd_here(case: Case, env: Env, upload: bool) -> list[Result]:
    base = env.work / f"dockd-{case.name}"
    (base / "store").mkdir(parents=True)
    copies, flushes = _Intervals(), _Intervals()
    try:
        with instrumented_session(copies, flushes):
            info = asyncio.run(_drive_dockd(case, env, base, upload))
    finally:
        clean(base)
    m: Meter = info.pop("meter")
    marks = info.pop("marks")
    if info["files_verified"] != len(case.files):
        raise RuntimeError(f"dockd verified {info['files_verified']} of {len(case.files)} files")
    m.seconds = marks["safe_to_undock"]
    m.cpu_s = info["offload_cpu_s"]
    t0 = info.pop("t0")
    end = t0 + m.seconds
    info["in_copy_file_s"] = sum(min(b, end) - a for a, b in copies.spans if a < end)
    info["in_journal_flush_s"] = sum(min(b, end) - a for a, b in flushes.spans if a < end)
    results = [
        m.result(
            case.name,
            "dockd",
            "dockd: dock -> safe_to_undock (verified offload)",
            case.nbytes,
            len(case.files),
            env.disk,
            marks=marks,
            **info,
        )
    ]
    if "upload_s" in info:
        results.append(
            Result(
                case.name,
                "upload",
                "dockd upload to filesystem store (separate, warm cache; not in the offload time)",
                info["upload_s"],
                case.nbytes,
                len(case.files),
            )
        )
    return results


# --------------------------------------------------------------------------------------------
# driver


@dataclass
class Env:
    work: Path
    camera: Camera
    devices: list[str | None]
    disk: str | None  # the device the destination lives on (where the loop image lives too)
    can_drop: bool
    log_level: str

    def cold(self) -> None:
        drop_caches(self.can_drop)


def best(results: list[Result]) -> Result:
    return min(results, key=lambda r: r.seconds)


def fmt_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f}"


def print_table(
    results: list[Result], env: Env, spread: dict[tuple[str, str], list[float]]
) -> None:
    print()
    many = any(len(v) > 1 for v in spread.values())
    hdr = (
        f"{'case':<6} {'method':<9} {'seconds':>8} {'MB/s':>8} {'cpu%':>6} "
        f"{'diskR MiB':>9} {'diskW MiB':>9} {'busy%':>6} {'iowait%':>7}  "
        + ("runs (min-max s)  " if many else "")
        + "what"
    )
    print(hdr)
    print("-" * len(hdr) + "-" * 30)
    for r in results:
        cpu = f"{100 * r.cpu_s / r.seconds:.0f}" if r.method != "upload" else "-"
        busy = (
            f"{100 * r.disk_busy_ms / 1000 / r.seconds:.0f}" if r.disk_busy_ms is not None else "-"
        )
        iow = f"{r.iowait_pct:.0f}" if r.iowait_pct is not None else "-"
        runs = spread.get((r.case, r.method), [])
        sp = f"{len(runs)} ({min(runs):.2f}-{max(runs):.2f})" if runs else ""
        print(
            f"{r.case:<6} {r.method:<9} {r.seconds:>8.2f} {r.mb_s:>8.1f} {cpu:>6} "
            f"{fmt_mib(r.disk_read):>9} {fmt_mib(r.disk_write):>9} {busy:>6} {iow:>7}  "
            + (f"{sp:<18}" if many else "")
            + r.label
        )
    print(
        f"(cpu% = CPU seconds of this process and its children / wall; 100 = one core of "
        f"{os.cpu_count()}. disk = /dev/{env.disk or '?'}; busy% = its io_ticks / wall; "
        f"iowait% over all CPUs)"
    )


def paired(results: list[Result], case: str, num: str, den: tuple[str, ...]) -> list[float]:
    """Per repetition: time of `num` over the fastest of `den` in the same repetition."""
    out = []
    for rep in sorted({r.rep for r in results}):
        a = [r.seconds for r in results if (r.case, r.method, r.rep) == (case, num, rep)]
        b = [r.seconds for r in results if r.case == case and r.method in den and r.rep == rep]
        if a and b:
            out.append(a[0] / min(b))
    return out


def verdicts(by: dict[tuple[str, str], Result], results: list[Result]) -> list[dict[str, Any]]:
    out = []
    for case in dict.fromkeys(c for c, _ in by):
        d = by.get((case, "dockd"))
        if d is None:
            continue
        v: dict[str, Any] = {"case": case, "dockd_s": d.seconds}
        cp = by.get((case, "cp"))
        if cp:
            v["speedup_vs_cp"] = cp.seconds / d.seconds
            v["cp_target_met"] = v["speedup_vs_cp"] >= TARGET_SPEEDUP_VS_CP
        bounds = [r for r in (by.get((case, "dd")), by.get((case, "io"))) if r]
        if bounds:
            io = min(bounds, key=lambda r: r.seconds)
            v["io_bound_s"], v["io_bound_method"] = io.seconds, io.method
            v["ratio_vs_io"] = d.seconds / io.seconds
            v["io_target_met"] = v["ratio_vs_io"] <= TARGET_RATIO_VS_IO
            dd = by.get((case, "dd"))
            if dd:
                v["ratio_vs_dd"] = d.seconds / dd.seconds
        if len({r.rep for r in results}) > 1:
            v["per_run_speedup_vs_cp"] = [1 / x for x in paired(results, case, "dockd", ("cp",))]
            v["per_run_ratio_vs_io"] = paired(results, case, "dockd", ("dd", "io"))
        cf = by.get((case, "copyfile"))
        if cf:
            v["copyfile_s"] = cf.seconds
            v["orchestration_s"] = d.seconds - cf.seconds
        out.append(v)
    return out


def print_verdicts(vs: list[dict[str, Any]], by: dict[tuple[str, str], Result]) -> None:
    def mark(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print()
    for v in vs:
        case = v["case"]
        print(f"[{case}] dockd offload {v['dockd_s']:.2f} s")
        if "speedup_vs_cp" in v:
            print(
                f"  vs cp baseline : speedup {v['speedup_vs_cp']:.2f}x "
                f"(baseline_time/dockd_time; target >= {TARGET_SPEEDUP_VS_CP:.0f}x) "
                f"-> {mark(v['cp_target_met'])}"
            )
        if "ratio_vs_io" in v:
            extra = (
                f"; vs dd alone {v['ratio_vs_dd']:.2f}x"
                if "ratio_vs_dd" in v and v["io_bound_method"] != "dd"
                else ""
            )
            print(
                f"  vs I/O bound   : {v['ratio_vs_io']:.3f}x the time of the tighter bound "
                f"({v['io_bound_method']}, {v['io_bound_s']:.2f} s{extra}; target <= "
                f"{TARGET_RATIO_VS_IO}) -> {mark(v['io_target_met'])}"
            )
        for key, what in (
            ("per_run_speedup_vs_cp", "speedup vs cp"),
            ("per_run_ratio_vs_io", "ratio vs I/O bound"),
        ):
            xs = v.get(key)
            if xs:
                med = statistics.median(xs)
                print(
                    f"  {what}, run by run (same repetition): "
                    + ", ".join(f"{x:.2f}" for x in xs)
                    + f" (median {med:.2f})"
                )
        if "copyfile_s" in v:
            o = v["orchestration_s"]
            print(
                f"  daemon/journal overhead: dockd - copy_file loop = {o:+.2f} s "
                f"({100 * o / v['dockd_s']:+.0f}% of dockd)"
            )
        d = by[(case, "dockd")]
        marks = d.extra.get("marks", {})
        if marks:
            order = sorted(marks.items(), key=lambda kv: kv[1])
            print(
                "  dockd timeline (s after the rename): "
                + ", ".join(f"{k} {t:.2f}" for k, t in order)
            )
        if "in_copy_file_s" in d.extra:
            walk = marks.get("state offloading", 0.0)
            cf_s, fl_s = d.extra["in_copy_file_s"], d.extra["in_journal_flush_s"]
            rest = d.seconds - walk - cf_s - fl_s
            n = max(1, d.files)
            print(
                f"  dockd time split: dock->walked {walk:.2f} s | inside copy_file {cf_s:.2f} s "
                f"({100 * cf_s / d.seconds:.0f}%) | awaiting journal flushes {fl_s:.2f} s "
                f"({100 * fl_s / d.seconds:.0f}%) | between copies (loop/executor hops, "
                f"progress, logging) {rest:.2f} s ({100 * rest / d.seconds:.0f}%, "
                f"{1000 * rest / n:.2f} ms/file)"
            )
        rss = d.extra.get("peak_rss")
        if rss is not None:
            print(
                f"  dockd process memory: peak RSS {rss / MiB:.1f} MiB from docking to "
                f"safe_to_undock (VmHWM reset at docking, when RSS was "
                f"{d.extra['rss_before'] / MiB:.1f} MiB; start-up peak "
                f"{d.extra['hwm_startup'] / MiB:.1f} MiB)"
                + (
                    f"; peak through the upload {d.extra['peak_rss_upload'] / MiB:.1f} MiB"
                    if d.extra.get("peak_rss_upload")
                    else ""
                )
            )
        else:
            print(
                f"  peak RSS: ru_maxrss {d.extra['maxrss_before'] / MiB:.1f} -> "
                f"{d.extra['maxrss_after'] / MiB:.1f} MiB (process-lifetime high-water mark)"
            )
        cf = by.get((case, "copyfile"))
        if cf and "breakdown" in cf.extra:
            print(
                f"  copy_file loop {cf.seconds:.2f} s, where the time goes "
                f"(shim overhead ~{cf.extra['shim_overhead_s'] * 1000:.0f} ms):"
            )
            for k, t in sorted(cf.extra["breakdown"].items(), key=lambda kv: -kv[1]):
                n = cf.extra["calls"].get(k)
                calls = f"{n} calls" if n else ""
                print(f"    {k:<26} {t:7.2f} s {100 * t / cf.seconds:5.1f}%  {calls}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="size of each big file (256)")
    ap.add_argument("--files", type=int, default=4, help="number of big files (4)")
    ap.add_argument("--small-files", type=int, default=2000, help="number of small files (2000)")
    ap.add_argument("--small-min-kib", type=int, default=4)
    ap.add_argument("--small-max-kib", type=int, default=64)
    ap.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="work directory (default: a new one under /var/tmp); the destination "
        "and the camera image go here, so pick the filesystem staging uses",
    )
    ap.add_argument("--cases", default="big,small", help="big,small")
    ap.add_argument("--only", default=",".join(METHODS), help=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest is kept")
    ap.add_argument("--no-upload", action="store_true", help="do not time dockd's upload")
    ap.add_argument("--no-loop", action="store_true", help="plain directory camera, no loop image")
    ap.add_argument(
        "--log-level",
        default="info",
        help="dockd log level (info, as shipped); log lines go to <dir>/dockd.log",
    )
    ap.add_argument("--seed", type=int, default=20261124)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", action="store_true", help=f"also write {HERE / 'report.json'}")
    args = ap.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    for m in only:
        if m not in METHODS:
            ap.error(f"--only: unknown method {m!r}")

    root = is_root()
    if args.dir is None:
        work = Path(tempfile.mkdtemp(prefix="dockd-bench-", dir="/var/tmp"))
    else:
        args.dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="dockd-bench-", dir=args.dir))
    work = work.resolve()
    cases = make_cases(args)
    why_not = (
        "not root: no loop device"
        if not root
        else "--no-loop"
        if args.no_loop
        else "mkfs.ext4 or losetup not found"
        if not (shutil.which("mkfs.ext4") and shutil.which("losetup"))
        else ""
    )
    camera = Camera(work, cases, want_loop=not why_not, why_not=why_not)
    results: list[Result] = []
    try:
        t = time.perf_counter()
        camera.build()
        gen_s = time.perf_counter() - t
        disk = block_device_of(work)
        loop = Path(camera.loop_dev).name if camera.loop_dev else None
        env = Env(work, camera, [disk, loop], disk, root, args.log_level)
        total = sum(c.nbytes for c in cases)
        print(
            f"dockd offload benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  "
            f"{platform.node()}  {platform.release()}  {os.cpu_count()} CPUs  "
            f"python {platform.python_version()}"
        )
        fstype = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE", "-T", str(work)], capture_output=True, text=True
        ).stdout.strip()
        print(f"work dir  : {work} on /dev/{disk or '?'} ({fstype or '?'})")
        if disk is None or fstype == "tmpfs":
            print(
                "            WARNING: not a block device; dockd's read-back and the direct "
                "read-backs cannot reach a device here, the figures mean little"
            )
        print(f"camera    : {camera.note}")
        print(
            "data      : "
            + "; ".join(f"{c.name}: {len(c.files)} files, {c.nbytes / MiB:.0f} MiB" for c in cases)
            + f" (random; generated in {gen_s:.1f} s)"
        )
        print(
            "cache     : "
            + (
                "dropped before every measured run (sync; echo 3 > /proc/sys/vm/drop_caches)"
                if root
                else "NOT dropped (not root): every run is warm-cache, numbers are "
                "optimistic and not comparable"
            )
        )
        load = os.getloadavg()
        print(
            f"load      : {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start (the disk and CPUs "
            f"are shared: other work on this host shows up as noise; use --repeat)"
        )
        print(
            f"dockd     : default offload config (chunk_size 8 MiB, verify=readback), "
            f"log level {args.log_level} -> {work / 'dockd.log'}"
        )
        del total
        sys.stdout.flush()
        for case in cases:
            src = camera.src(case)
            for rep in range(args.repeat):
                for method in METHODS:
                    if method not in only:
                        continue
                    dst = work / f"dst-{method}-{case.name}"
                    t = time.perf_counter()
                    if method == "dd":
                        rs = [run_dd(case, src, dst, env)]
                    elif method == "io":
                        rs = [run_io(case, src, dst, env)]
                    elif method == "cp":
                        rs = [run_cp(case, src, dst, env)]
                    elif method == "copyfile":
                        rs = [run_copyfile(case, src, dst, env)]
                    elif method == "copyfile2":
                        rs = [run_copyfile2(case, src, dst, env)]
                    else:
                        rs = run_dockd(case, env, upload=not args.no_upload)
                    for r in rs:
                        r.rep = rep
                    results.extend(rs)
                    print(
                        f"  {case.name:<6} {method:<9} run {rep + 1}: {rs[0].seconds:7.2f} s"
                        f"  ({time.perf_counter() - t:.1f} s with setup)",
                        flush=True,
                    )
        by: dict[tuple[str, str], Result] = {}
        for key in dict.fromkeys((r.case, r.method) for r in results):
            by[key] = best([r for r in results if (r.case, r.method) == key])
        table = list(by.values())
        spread = {k: [r.seconds for r in results if (r.case, r.method) == k] for k in by}
        print_table(table, env, spread)
        vs = verdicts(by, results)
        print_verdicts(vs, by)
        if args.json:
            report = {
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "host": {
                    "node": platform.node(),
                    "kernel": platform.release(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                },
                "work_dir": str(work),
                "disk": disk,
                "camera": camera.note,
                "cache_dropped": root,
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "cases": [
                    {"name": c.name, "files": len(c.files), "bytes": c.nbytes} for c in cases
                ],
                "results": [asdict(r) | {"mb_s": r.mb_s} for r in table],
                "all_runs": [asdict(r) | {"mb_s": r.mb_s} for r in results],
                "verdicts": vs,
                "targets": {
                    "speedup_vs_cp_min": TARGET_SPEEDUP_VS_CP,
                    "ratio_vs_io_max": TARGET_RATIO_VS_IO,
                },
            }
            out = HERE / "report.json"
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"\nwrote {out}")
    finally:
        camera.close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
