"""py-spy around a dockd child process, and a short text summary of where its time went.

`PySpy(out).start(pid)` runs `py-spy record --pid PID --threads --idle --format raw` (collapsed
stacks, one line per distinct stack with its sample count) with `--nonblocking`, so the daemon
is not paused to be sampled; `stop()` waits for py-spy to write its file once the process has
exited. `summary()` reads the stacks back:

- by thread role (event loop, offload/copy threads, journal thread, upload threads, other) and
  how many of their samples were idle (py-spy's --idle: the thread was waiting, not running);
- the busiest leaf lines (function, file:line) among samples that were not idle: the line tells
  which call it was (a preadv, a write, an fsync, a hash update);
- a coarse split of the copy threads' time by step of copy_file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

PYSPY = Path(sys.executable).with_name("py-spy")


class PySpy:
    def __init__(self, out: Path, rate: int = 100, gil: bool = False) -> None:
        self.out = out
        self.rate = rate
        self.gil = gil  # only samples of the thread holding the GIL: who keeps it how long
        self.proc: subprocess.Popen[bytes] | None = None
        self.error = ""

    @staticmethod
    def available() -> bool:
        return PYSPY.exists()

    def start(self, pid: int) -> None:
        if not self.available():
            self.error = f"py-spy not found at {PYSPY}"
            return
        self.proc = subprocess.Popen(
            [
                str(PYSPY),
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(self.rate),
                "--threads",
                *(["--gil"] if self.gil else ["--idle"]),
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(self.out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(str(self.out) + ".log", "wb"),  # noqa: SIM115 - py-spy owns it
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=30)  # it ends when the process it samples ends
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=30)

    def summary(self, top: int = 12) -> dict[str, Any]:
        if self.error or not self.out.exists():
            return {"text": f"    (no profile: {self.error or 'py-spy wrote nothing'})"}
        return summarize(self.out.read_text(), top)


DAEMON = Path(__file__).resolve().parent.parent / "daemon"
IDLE_LEAVES = (
    "_worker (concurrent/futures/thread.py",  # a pool thread waiting for its next job
    "Condition.wait (",
    "Event.wait (",
    "Queue.get (",
    "do_poll (",  # watchdog's inotify thread, blocked in poll()
    "Inotify.__init__.<locals>.do_poll (",
    "select (selectors.py",
    "EpollSelector.select (",
    "DelayedQueue.get (",
    "Thread._wait_for_tstate_lock (",  # joining a thread: the process is exiting
)


def _role(thread: str, frames: list[str]) -> str:
    name = thread.split(": ", 1)[-1]
    if name == "MainThread":
        if not any(f.startswith("_child (") for f in frames):
            return "start-up (imports) and exit"
        return "event loop (MainThread)"
    for prefix, role in (
        ("offload_", "offload pool (copy_file)"),
        ("journal_", "journal thread"),
        ("upload_", "upload pool (store)"),
        ("asyncio_", "asyncio.to_thread pool (walk, dir fsync)"),
        ("Thread-", "watchdog (directory source)"),
    ):
        if name.startswith(prefix):
            return role
    if name.startswith("thread ("):  # no name left: the main thread while the process exits
        return "start-up (imports) and exit"
    return name


def _is_idle(frames: list[str]) -> bool:
    leaf = frames[-1] if frames else ""
    return any(leaf.startswith(w) or w in leaf for w in IDLE_LEAVES)


_SOURCES: dict[str, list[Path]] = {}


def source_line(frame: str) -> str:
    """The source text of a frame 'fn (path/file.py:LINE)', for dockd's own files."""
    import linecache

    try:
        fn, loc = frame.rsplit(" (", 1)
        path, line = loc.rstrip(")").rsplit(":", 1)
    except ValueError:
        return ""
    if not _SOURCES:
        for f in DAEMON.rglob("*.py"):
            _SOURCES.setdefault(f.name, []).append(f)
    name = Path(path).name
    cands = [c for c in _SOURCES.get(name, []) if str(c).endswith(path)]
    short = fn.split(".")[-1]
    for c in cands:
        if f"def {short}(" in c.read_text():
            return linecache.getline(str(c), int(line)).strip()
    return ""


def summarize(raw: str, top: int = 12) -> dict[str, Any]:
    samples = 0
    by_role: Counter[str] = Counter()
    idle_by_role: Counter[str] = Counter()
    threads_by_role: dict[str, set[str]] = defaultdict(set)
    leaves: Counter[str] = Counter()
    copy_leaves: Counter[str] = Counter()
    role_leaves: dict[str, Counter[str]] = defaultdict(Counter)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        thread, *frames = stack.split(";")
        role = _role(thread, frames)
        threads_by_role[role].add(thread)
        samples += n
        by_role[role] += n
        if not frames or _is_idle(frames):
            idle_by_role[role] += n
            continue
        leaves[frames[-1]] += n
        role_leaves[role][_dockd_frame(frames)] += n
        if role.startswith("offload"):
            copy_leaves[frames[-1]] += n
    if not samples:
        return {"text": "    (py-spy recorded no samples)"}
    busy = samples - sum(idle_by_role.values())
    lines = [
        f"    {samples} samples at 100 Hz; {busy} of them in a thread that was running or "
        "blocked in a call (the rest: threads waiting for work). By thread:"
    ]
    for role, n in by_role.most_common():
        idle = idle_by_role[role]
        lines.append(
            f"      {role:<42} {len(threads_by_role[role]):>2} thr {n - idle:>6} busy samples "
            f"({(n - idle) / 100:6.1f} thread-s), {idle:>6} waiting"
        )
    lines.append(f"    busiest lines (% of the {busy} busy samples):")
    for leaf, n in leaves.most_common(top):
        src = source_line(leaf)
        lines.append(f"      {100 * n / busy:5.1f}%  {leaf}" + (f"   | {src}" if src else ""))
    copy_total = sum(copy_leaves.values())
    if copy_total:
        lines.append(f"    inside the offload pool ({copy_total} busy samples):")
        for leaf, n in copy_leaves.most_common(8):
            src = source_line(leaf)
            lines.append(
                f"      {100 * n / copy_total:5.1f}%  {leaf}" + (f"   | {src}" if src else "")
            )
    for role in ("journal thread", "event loop (MainThread)", "upload pool (store)"):
        got = role_leaves.get(role)
        if not got:
            continue
        total = sum(got.values())
        lines.append(f"    {role} ({total} busy samples), by the innermost dockd function:")
        for fn, n in got.most_common(6):
            lines.append(f"      {100 * n / total:5.1f}%  {fn}")
    return {
        "text": "\n".join(lines),
        "samples": samples,
        "busy": busy,
        "by_role": dict(by_role),
        "idle_by_role": dict(idle_by_role),
        "top_lines": [(k, v, source_line(k)) for k, v in leaves.most_common(top)],
        "copy_lines": [(k, v, source_line(k)) for k, v in copy_leaves.most_common(8)],
    }


def _dockd_frame(frames: list[str]) -> str:
    """The innermost frame in dockd's own code (where in dockd the time went, whatever library
    it was in below it), with the leaf function beside it when the leaf is elsewhere."""
    for f in reversed(frames):
        path = f.rsplit(" (", 1)[-1]
        if "dockd/" in path or path.startswith(("copy.py", "session.py")):
            leaf = frames[-1]
            return f if leaf == f else f"{f} > {leaf.split(' (')[0]}"
    return frames[-1].split(" (")[0] + " (outside dockd)"
