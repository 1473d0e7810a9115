"""Helpers shared by the benchmarks in bench/ (factored out of offload.py, which imports them).

Host facts (cache dropping, /proc/diskstats, RSS, CPU), the per-run `Meter` and `Result`, data
generation, and `patched` (wrap a name dockd looks up at call time; dockd's code is unchanged).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
CHUNK = 8 * MiB  # dd bs=8M; dockd's default offload.chunk_size is the same


# --------------------------------------------------------------------------------------------
# host facts: cache dropping, disk counters, memory, CPU


def is_root() -> bool:
    return os.geteuid() == 0


def drop_caches(enabled: bool) -> None:
    os.sync()
    if enabled:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def block_device_of(path: Path) -> str | None:
    """Kernel name (as in /proc/diskstats) of the block device holding `path`, if any."""
    st = os.stat(path)
    link = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    try:
        return link.resolve().name
    except OSError:
        return None


@dataclass
class DiskSample:
    read_bytes: int = 0
    write_bytes: int = 0
    busy_ms: int = 0


def disk_sample(dev: str | None) -> DiskSample | None:
    if dev is None:
        return None
    with open("/proc/diskstats") as f:
        for line in f:
            p = line.split()
            if len(p) >= 13 and p[2] == dev:
                # fields: reads, merged, sectors read, ms, writes, merged, sectors written, ms,
                # in flight, io_ticks (ms the device had I/O in flight), ...
                return DiskSample(int(p[5]) * 512, int(p[9]) * 512, int(p[12]))
    return None


def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5\n")
        return True
    except OSError:
        return False


def cpu_seconds() -> tuple[float, float]:
    """(this process, waited-for children) user+sys CPU seconds."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, ch.ru_utime + ch.ru_stime


def iowait_ticks() -> tuple[int, int]:
    """(iowait, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    return parts[4], sum(parts)


# --------------------------------------------------------------------------------------------
# results


@dataclass
class Result:
    case: str
    method: str
    label: str
    seconds: float
    bytes: int
    files: int
    cpu_s: float = 0.0
    disk_read: int | None = None
    disk_write: int | None = None
    disk_busy_ms: int | None = None
    iowait_pct: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rep: int = 0

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else float("inf")


class Meter:
    """Wall time, CPU (self + children), block-device counters and iowait around one run."""

    def __init__(self, devices: list[str | None]) -> None:
        self.devices = [d for d in devices if d]

    def __enter__(self) -> Meter:
        self._cpu = cpu_seconds()
        self._disk = {d: disk_sample(d) for d in self.devices}
        self._iow = iowait_ticks()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t
        cpu = cpu_seconds()
        self.cpu_s = (cpu[0] - self._cpu[0]) + (cpu[1] - self._cpu[1])
        iow = iowait_ticks()
        total = iow[1] - self._iow[1]
        self.iowait_pct = 100.0 * (iow[0] - self._iow[0]) / total if total else None
        self.disk: dict[str, DiskSample] = {}
        for d, before in self._disk.items():
            after = disk_sample(d)
            if before and after:
                self.disk[d] = DiskSample(
                    after.read_bytes - before.read_bytes,
                    after.write_bytes - before.write_bytes,
                    after.busy_ms - before.busy_ms,
                )

    def result(
        self,
        case: str,
        method: str,
        label: str,
        nbytes: int,
        nfiles: int,
        disk_dev: str | None,
        **extra: Any,
    ) -> Result:
        d = self.disk.get(disk_dev or "")
        return Result(
            case,
            method,
            label,
            self.seconds,
            nbytes,
            nfiles,
            self.cpu_s,
            d.read_bytes if d else None,
            d.write_bytes if d else None,
            d.busy_ms if d else None,
            self.iowait_pct,
            dict(extra),
        )


# --------------------------------------------------------------------------------------------
# files and shell quoting


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, CHUNK)
            f.write(os.urandom(n))
            left -= n


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


def shq(p: Path | str) -> str:
    return "'" + str(p).replace("'", "'\\''") + "'"


@contextlib.contextmanager
def patched(target: Any, **names: Any) -> Iterator[None]:
    """Replace attributes of a module or class for the duration; dockd's code runs unchanged,
    its global-name lookups just find the wrappers."""
    saved = {name: getattr(target, name) for name in names}
    for name, value in names.items():
        setattr(target, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(target, name, value)


# --------------------------------------------------------------------------------------------
# fast incompressible data: os.urandom runs at ~130 MB/s here, slower than the disk


class DataGen:
    """Random bytes at memory speed: slices of a 32 MiB urandom pool at random offsets, each
    file starting with its own 16 random bytes. Nothing on the path compresses or deduplicates
    (ext4, loop, S3 server), so this is as good as urandom for the benchmarks and 10x faster."""

    POOL = 32 * MiB

    def __init__(self, seed: int) -> None:
        import random

        self.rng = random.Random(seed)
        self.pool = memoryview(os.urandom(self.POOL))

    def write(self, path: Path, size: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            head = os.urandom(min(16, size))
            f.write(head)
            left = size - len(head)
            while left:
                n = min(left, CHUNK, self.POOL)
                off = self.rng.randrange(0, self.POOL - n + 1)
                f.write(self.pool[off : off + n])
                left -= n


# --------------------------------------------------------------------------------------------
# loop-mounted ext4 images: a camera on a block device of its own


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def image_size_for(data_bytes: int, nfiles: int) -> int:
    return int(data_bytes * 1.08) + nfiles * 8192 + 64 * MiB


def mkfs_from(tree: Path, image: Path, data_bytes: int, nfiles: int) -> None:
    """An ext4 image holding `tree` (mkfs.ext4 -d: no read-write mount needed, mtimes kept)."""
    size = image_size_for(data_bytes, nfiles)
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",
            "-N",
            str(nfiles + 4096),
            "-d",
            str(tree),
            str(image),
            f"{size // 1024}k",
        ]
    )


class LoopMount:
    """`image` on a loop device of its own (direct I/O, so reads reach the disk and not the page
    cache of the image file) mounted at `mountpoint`. Read-only like a USB camera (dockd mounts
    cameras ro), or read-write where docking is a rename inside the camera filesystem."""

    def __init__(self, image: Path, mountpoint: Path, *, readonly: bool = True) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.readonly = readonly
        self.dev: str | None = None
        self.mounted = False
        self.direct = "on"

    def __enter__(self) -> LoopMount:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        ro = ["--read-only"] if self.readonly else []
        try:
            self.dev = run(
                ["losetup", "--find", "--show", "--direct-io=on", *ro, str(self.image)]
            ).stdout.strip()
        except subprocess.CalledProcessError:
            self.direct = "off"
            self.dev = run(["losetup", "--find", "--show", *ro, str(self.image)]).stdout.strip()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        opts = "ro,noload,noatime" if self.readonly else "noatime"
        run(["mount", "-t", "ext4", "-o", opts, self.dev, str(self.mountpoint)])
        self.mounted = True

    @property
    def name(self) -> str:
        assert self.dev is not None
        return Path(self.dev).name

    @property
    def majmin(self) -> str:
        assert self.dev is not None
        st = os.stat(self.dev)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    def close(self) -> None:
        if self.mounted:
            r = subprocess.run(["umount", str(self.mountpoint)], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
            self.mounted = False
        if self.dev:
            subprocess.run(["losetup", "-d", self.dev], capture_output=True)
            self.dev = None


# --------------------------------------------------------------------------------------------
# a USB-like source: the read rate of each camera's loop device, capped for the daemon alone


class ReadThrottle:
    """Caps reads of given block devices for the processes in a cgroup made for the benchmark.

    cgroup v2 `io.max` (`MAJ:MIN rbps=N`) where the v2 hierarchy has the io controller;
    otherwise cgroup v1 `blkio.throttle.read_bps_device` (`MAJ:MIN N`), the same block-layer
    throttle (blk-throttle) behind the older interface. Both limit per cgroup per device, so
    each camera gets a loop device of its own and one limit each, in the one cgroup the daemon
    process runs in. Reads are throttled as they are submitted by the reading thread (buffered
    reads and readahead included), so the daemon sees a camera that delivers at most N bytes/s.
    """

    def __init__(self, name: str) -> None:
        self.path: Path | None = None
        self.kind = ""
        self.why_not = ""
        mounts = _cgroup_mounts()
        v2 = next((m for m, (t, _) in mounts.items() if t == "cgroup2"), None)
        v1 = next((m for m, (t, o) in mounts.items() if t == "cgroup" and "blkio" in o), None)
        reasons = []
        if v2 is not None:
            ctrl = (v2 / "cgroup.controllers").read_text().split()
            if "io" in ctrl:
                try:
                    with open(v2 / "cgroup.subtree_control", "w") as f:
                        f.write("+io\n")
                    self.path = v2 / name
                    self.path.mkdir(exist_ok=True)
                    self.kind = f"cgroup v2 io.max ({v2})"
                except OSError as exc:
                    reasons.append(f"cgroup2 at {v2}: cannot enable io ({exc.strerror})")
            else:
                reasons.append(
                    f"cgroup2 at {v2} has no io controller (controllers: {' '.join(ctrl) or '-'};"
                    " io is bound to the v1 blkio hierarchy)"
                )
        else:
            reasons.append("no cgroup2 mount")
        if self.path is None and v1 is not None:
            try:
                self.path = v1 / name
                self.path.mkdir(exist_ok=True)
                if not (self.path / "blkio.throttle.read_bps_device").exists():
                    raise OSError(0, "no blkio.throttle.read_bps_device")
                self.kind = f"cgroup v1 blkio.throttle.read_bps_device ({v1})"
            except OSError as exc:
                reasons.append(f"cgroup v1 blkio at {v1}: {exc.strerror or exc}")
                self.path = None
        if self.path is None:
            self.why_not = "; ".join(reasons)
        self.note = "; ".join(reasons)

    @property
    def available(self) -> bool:
        return self.path is not None

    def limit(self, majmin: str, bytes_per_s: int | None) -> None:
        assert self.path is not None
        if self.kind.startswith("cgroup v2"):
            value = f"{majmin} rbps={bytes_per_s or 'max'}\n"
            (self.path / "io.max").write_text(value)
        else:
            (self.path / "blkio.throttle.read_bps_device").write_text(
                f"{majmin} {bytes_per_s or 0}\n"
            )

    @property
    def procs(self) -> Path:
        assert self.path is not None
        return self.path / "cgroup.procs"

    def close(self) -> None:
        if self.path is None:
            return
        parent = self.path.parent / "cgroup.procs"
        with contextlib.suppress(OSError):
            for pid in self.procs.read_text().split():
                with contextlib.suppress(OSError):
                    parent.write_text(pid + "\n")
        for _ in range(50):
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        self.path = None


def _cgroup_mounts() -> dict[Path, tuple[str, set[str]]]:
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _src, opts = [*right.split(), "", "", ""][:3]
            if fstype in ("cgroup", "cgroup2"):
                out[Path(left.split()[4])] = (fstype, set(opts.split(",")))
    return out


def join_cgroup(procs: Path) -> None:
    with open(procs, "w") as f:
        f.write(f"{os.getpid()}\n")


# --------------------------------------------------------------------------------------------
# the event loop's lag, measured from inside the daemon's process


class LagMonitor:
    """A task on the daemon's event loop that sleeps `interval` in a loop and records how late
    it wakes up: anything that holds the loop (a blocking call, a long callback) shows here.
    Fixed memory (a histogram of 0.1 ms bins up to 2 s), so it can run for hours."""

    BIN_S = 0.0001
    BINS = 20000

    def __init__(self, interval: float = 0.010) -> None:
        self.interval = interval
        self.reset()

    def reset(self) -> None:
        self.hist = [0] * (self.BINS + 1)
        self.n = 0
        self.max = 0.0
        self.total = 0.0

    async def run(self) -> None:
        import asyncio

        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.interval)
            over = max(0.0, time.perf_counter() - t - self.interval)
            self.n += 1
            self.total += over
            if over > self.max:
                self.max = over
            self.hist[min(self.BINS, int(over / self.BIN_S))] += 1

    def quantile(self, q: float) -> float:
        if not self.n:
            return 0.0
        want = q * self.n
        seen = 0
        for i, c in enumerate(self.hist):
            seen += c
            if seen >= want:
                return (i + 1) * self.BIN_S
        return self.max

    def stats(self) -> dict[str, float]:
        return {
            "samples": self.n,
            "max_ms": 1000 * self.max,
            "p99_ms": 1000 * self.quantile(0.99),
            "p50_ms": 1000 * self.quantile(0.50),
            "mean_ms": 1000 * self.total / self.n if self.n else 0.0,
        }


# --------------------------------------------------------------------------------------------
# small statistics and formatting


def fmt_rate(x: float, unit: str = "MB/s") -> str:
    return f"{x:.0f} {unit}" if x >= 100 else f"{x:.1f} {unit}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "MISSED")


def ratio_row(
    rid: str,
    what: str,
    value: float,
    target: str,
    met: bool | None,
    dockd: str,
    baseline: str,
    note: str = "",
) -> dict[str, Any]:
    """One line of the report: a ratio, its target, and the absolute figures it came from."""
    return {
        "id": rid,
        "what": what,
        "value": value,
        "target": target,
        "met": met,
        "dockd": dockd,
        "baseline": baseline,
        "note": note,
    }


def write_json(path: Path, data: Any) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def host_facts() -> dict[str, Any]:
    import platform

    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = proc_meminfo("MemTotal")
    return {
        "node": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem / 1024**3, 1),
        "python": platform.python_version(),
        "load": os.getloadavg(),
    }


def proc_meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def fs_type(path: Path) -> str:
    r = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)], capture_output=True, text=True
    )
    return r.stdout.strip() or "?"


def make_workdir(base: Path | None, prefix: str) -> Path:
    import tempfile

    base = base or Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base)).resolve()


# --------------------------------------------------------------------------------------------
# the machine's own figures, to read the ratios against


def machine_figures(work: Path, can_drop: bool) -> dict[str, Any]:
    """A few seconds of probes: hashing speed on one core, the disk's sequential write + fsync
    and direct read rates, the cost of a small file's fsync alone and with 4 threads at once."""
    import hashlib
    import mmap
    import threading

    out: dict[str, Any] = {}
    data = os.urandom(64 * MiB)
    t = time.perf_counter()
    for _ in range(4):
        hashlib.sha256(data).digest()
    out["sha256_mb_s_one_core"] = 4 * len(data) / (time.perf_counter() - t) / 1e6
    try:
        import xxhash

        t = time.perf_counter()
        for _ in range(4):
            xxhash.xxh3_128(data).digest()
        out["xxh128_mb_s_one_core"] = 4 * len(data) / (time.perf_counter() - t) / 1e6
    except ImportError:
        pass
    d = work / "machine-probe"
    d.mkdir(parents=True, exist_ok=True)
    big = d / "seq"
    size = 512 * MiB
    drop_caches(can_drop)
    t = time.perf_counter()
    fd = os.open(big, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    view = memoryview(data)
    written = 0
    while written < size:
        written += os.write(fd, view[: min(CHUNK, size - written)])
    os.fsync(fd)
    os.close(fd)
    out["seq_write_fsync_mb_s"] = size / (time.perf_counter() - t) / 1e6
    abuf = mmap.mmap(-1, CHUNK)
    drop_caches(can_drop)
    t = time.perf_counter()
    fd = os.open(big, os.O_RDONLY | os.O_DIRECT)
    while os.readv(fd, [abuf]):
        pass
    os.close(fd)
    out["direct_read_mb_s"] = size / (time.perf_counter() - t) / 1e6
    abuf.close()
    big.unlink()
    small = data[: 16 * 1024]

    def fsync_files(prefix: str, n: int) -> None:
        for i in range(n):
            fd = os.open(d / f"{prefix}-{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, small)
            os.fsync(fd)
            os.close(fd)

    n = 400
    t = time.perf_counter()
    fsync_files("one", n)
    dt = time.perf_counter() - t
    out["fsync_16k_file_ms"] = 1000 * dt / n
    out["fsync_16k_files_s_1_thread"] = n / dt
    ts = [threading.Thread(target=fsync_files, args=(f"t{k}", n // 4)) for k in range(4)]
    t = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    out["fsync_16k_files_s_4_threads"] = n / (time.perf_counter() - t)
    shutil.rmtree(d)
    os.sync()
    return out
