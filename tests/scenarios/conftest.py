"""Whole-daemon scenarios: a real `dockd run -c FILE` process, real directories, real faults.

The harness:

- `Site` lays out one dock PC in a temporary directory (`dock/` watched by the directory source,
  `aside/` where cameras are built and parked while undocked, `evidence/` the filesystem store,
  `state/`), writes the configuration, starts daemons and runs the other CLI commands.
- `DockdProcess` runs the daemon and reads its JSON log lines (stdout) in a background thread;
  `wait_for(event, predicate)` blocks until a matching line appears. Tests wait on events, never
  on sleeps.
- Faults are placed at exact points of the daemon's work, with nothing about the daemon patched:
  - a FUSE camera (`Site.fuse_camera`, served by scenario_fusecam from this process): a read of
    a chosen file is held at a chosen byte until the test lets it go, or answered with an error
    (EIO: a worn card; ENOTCONN: the device is gone); a file can grow while it is copied;
  - `Gate`: a kernel file lease (fcntl F_SETLEASE, F_WRLCK) on a file the daemon opens without
    O_NONBLOCK (a staged copy the uploader sends): its open(2) blocks until the gate is
    released, and the kernel tells us with SIGIO. (The daemon opens camera files with
    O_NONBLOCK, where a lease makes the open fail at once; on a camera, a gate only proves that
    a file was never opened.)
  That holds the daemon (say: file 1 verified, file 2 half copied) for as long as a test needs,
  to kill it, stop it or undock the camera there.
- A camera docks when its folder, built aside, is renamed into `dock/` (atomic, as the directory
  source requires); it undocks when renamed back out.

Every daemon started is killed at teardown, every FUSE camera and tmpfs unmounted; a log line
telling of a crashed task fails the test. Needs root (mounts); what cannot run here is skipped.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from scenario_fusecam import FuseCamera, Hold

DOCKD = [sys.executable, "-m", "dockd"]
# `dockd run`, as `python -m dockd`, exec'd (same pid) after asking the kernel to SIGKILL it when
# this test process dies: a killed test run leaves no daemon behind.
RUN_DOCKD = [
    sys.executable,
    "-c",
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9)"  # PR_SET_PDEATHSIG, SIGKILL
    "; os.execv(sys.executable, [sys.executable, '-m', 'dockd', *sys.argv[1:]])",
]
DOCK_ID = "scenario-dock"
WAIT_S = 60.0
# The daemon commits verified files to its journal in batches: after 64 files or once 0.25 s have
# passed since the last commit (dockd.offload.session.FLUSH_SECONDS). A read held longer than
# that makes the commit after the held file certain.
FLUSH_HOLD_S = 0.4
CRASH_EVENTS = ("session_crashed", "task_crashed", "daemon_failed")

F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)

LogEvent = dict[str, Any]
Predicate = Callable[[LogEvent], bool]


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are TOML's too
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []

    def table(prefix: str, body: dict[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        subtables = {k: v for k, v in body.items() if isinstance(v, dict)}
        if prefix and (scalars or not subtables):
            lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subtables.items():
            table(f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k), v)

    table("", data)
    return "\n".join(lines).lstrip() + "\n"


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --------------------------------------------------------------------------------------------
# cameras
# --------------------------------------------------------------------------------------------


def content(seed: int | str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_path(rel: bytes) -> str:
    """The manifest/store form of a camera path (SPEC §5): bytes that are not UTF-8 as %XX."""
    try:
        return rel.decode("utf-8")
    except UnicodeDecodeError:
        text = rel.decode("utf-8", errors="surrogateescape")
        return "".join(f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text)


@dataclass
class Camera:
    """A camera folder built aside, docked by renaming it into the dock directory."""

    name: str
    site: Site
    files: dict[bytes, bytes]  # relative path (bytes) -> content: what must reach the store
    skipped: dict[str, str] = field(default_factory=dict)  # manifest path -> reason
    excluded: list[bytes] = field(default_factory=list)  # never offloaded (hidden)
    fuse: FuseCamera | None = None  # serves the files under `fuse_dir`
    fuse_dir: bytes = b""

    @property
    def aside_root(self) -> Path:
        return self.site.aside / self.name

    @property
    def docked_root(self) -> Path:
        return self.site.dock / self.name

    @property
    def docked(self) -> bool:
        return self.docked_root.exists()

    @property
    def root(self) -> Path:
        return self.docked_root if self.docked else self.aside_root

    def dock(self) -> None:
        os.rename(self.aside_root, self.docked_root)

    def undock(self) -> None:
        os.rename(self.docked_root, self.aside_root)

    def path(self, rel: bytes) -> bytes:
        return os.path.join(os.fsencode(self.root), rel)

    def expected(self) -> dict[str, str]:
        """manifest path -> sha256 of every file that must end in the store."""
        return {encode_path(rel): sha256(data) for rel, data in self.files.items()}

    def in_path_order(self) -> list[bytes]:
        """Camera files in the order the daemon copies and uploads them (manifest path order)."""
        return sorted(self.files, key=encode_path)

    def gate(self, rel: bytes) -> Gate:
        return self.site.gates.gate(self.path(rel))

    def hold(self, rel: bytes, offset: int = 0) -> Hold:
        """Hold the daemon's read of `rel` (a file under the FUSE part) at byte `offset`."""
        assert self.fuse is not None and rel.startswith(self.fuse_dir + b"/"), rel
        return self.fuse.hold(rel[len(self.fuse_dir) + 1 :], offset)


# --------------------------------------------------------------------------------------------
# gates: kernel file leases
# --------------------------------------------------------------------------------------------


class Gate:
    """A write lease on one file: another process's open(2) of it blocks until `release()`."""

    def __init__(self, path: bytes | Path, woken: threading.Event) -> None:
        self.path = path
        self._woken = woken
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self._fd, F_SETLEASE, fcntl.F_WRLCK)
        except OSError as exc:
            os.close(self._fd)
            self._fd = None
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EACCES):
                pytest.skip(f"file leases unavailable here ({exc.strerror})")
            raise

    @property
    def broken(self) -> bool:
        """True once someone tried to open the file (the kernel is breaking the lease)."""
        assert self._fd is not None, "gate already released"
        return bool(fcntl.fcntl(self._fd, F_GETLEASE) != fcntl.F_WRLCK)

    def wait_blocked(self, timeout: float = WAIT_S) -> None:
        """Block until the daemon is held at this file's open(2)."""
        deadline = time.monotonic() + timeout
        while True:
            self._woken.clear()
            if self.broken:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"nobody opened {self.path!r} within {timeout} s")
            # SIGIO from the kernel sets it. The harness's threads block SIGIO so that it reaches
            # the main thread (whose wait it interrupts); the recheck bounds what a signal taken
            # by some other thread could cost.
            self._woken.wait(min(remaining, 0.2))

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
            os.close(fd)


def block_sigio() -> None:
    """In a thread the harness starts: leave SIGIO (a lease break notice) to the main thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})


class Gates:
    """Every gate of a test, and the SIGIO handler the kernel's lease-break notice needs (its
    default action would kill the test process)."""

    def __init__(self) -> None:
        self.woken = threading.Event()
        self._gates: list[Gate] = []
        self._old: Any = None

    def gate(self, path: bytes | Path) -> Gate:
        if self._old is None:
            self._old = signal.signal(signal.SIGIO, lambda *_: self.woken.set())
        g = Gate(path, self.woken)
        self._gates.append(g)
        return g

    def release_all(self) -> None:
        for g in self._gates:
            g.release()

    def close(self) -> None:
        self.release_all()
        if self._old is not None:
            signal.signal(signal.SIGIO, self._old)
            self._old = None


# --------------------------------------------------------------------------------------------
# the daemon process
# --------------------------------------------------------------------------------------------


class DockdProcess:
    """One `dockd run` process and the JSON lines it logs."""

    def __init__(
        self, config: Path, log_file: Path, cwd: Path, release: Callable[[], None]
    ) -> None:
        self.config = config
        self.log_file = log_file
        self._release = release
        self.events: list[LogEvent] = []
        self._cond = threading.Condition()
        self._eof = False
        env = {k: v for k, v in os.environ.items() if k != "DOCKD_CONFIG"}
        env["PYTHONUNBUFFERED"] = "1"
        self._stderr = open(log_file.with_suffix(".stderr"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*RUN_DOCKD, "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=cwd,
            env=env,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name=f"dockd-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        block_sigio()
        assert self.proc.stdout is not None
        with open(self.log_file, "ab") as log:
            for raw in self.proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode("utf-8", "replace").rstrip("\n")
                try:
                    event = json.loads(line)
                    if not isinstance(event, dict):
                        raise ValueError
                except ValueError:
                    event = {"event": "_unparsed", "line": line}
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # -- reading the log ---------------------------------------------------------------------

    def mark(self) -> int:
        """An index into the log: `wait_for(..., after=mark)` looks only at lines after it."""
        with self._cond:
            return len(self.events)

    def wait_for(
        self,
        event: str,
        predicate: Predicate | None = None,
        timeout: float = WAIT_S,
        after: int = 0,
    ) -> LogEvent:
        """The first line (from `after` on) named `event` that `predicate` accepts; blocks until
        it is logged. Fails at once if the daemon exits first."""
        deadline = time.monotonic() + timeout
        i = after
        with self._cond:
            while True:
                while i < len(self.events):
                    e = self.events[i]
                    i += 1
                    if e.get("event") == event and (predicate is None or predicate(e)):
                        return e
                if self._eof:
                    raise AssertionError(
                        f"dockd exited (rc {self.proc.poll()}) before logging {event!r}\n"
                        + self.tail()
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"dockd did not log {event!r} within {timeout} s\n" + self.tail()
                    )
                self._cond.wait(remaining)

    def all(self, event: str, predicate: Predicate | None = None) -> list[LogEvent]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.get("event") == event and (predicate is None or predicate(e))
            ]

    def tail(self, n: int = 40) -> str:
        with self._cond:
            lines = [json.dumps(e)[:400] for e in self.events[-n:]]
        try:
            err = self.log_file.with_suffix(".stderr").read_text(errors="replace")[-3000:]
        except OSError:
            err = ""
        return "--- last log lines:\n" + "\n".join(lines) + "\n--- stderr:\n" + err

    # -- ending it ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_exit(self, timeout: float = WAIT_S) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dockd still running after {timeout} s\n" + self.tail()) from None
        self._reader.join(10)
        return rc

    def kill9(self) -> None:
        """SIGKILL. A thread held in a read of a FUSE camera dies only once the read is answered
        (the kernel waits uninterruptibly for a request the server has), so every hold and gate
        is released after the signal, before the wait."""
        self.proc.kill()
        self._release()
        self.wait_exit(30)

    def terminate(self) -> None:
        """Send SIGTERM and return at once (see `sigterm` to wait for the exit)."""
        self.proc.send_signal(signal.SIGTERM)

    def sigterm(self, timeout: float = 30) -> int:
        self.terminate()
        return self.wait_exit(timeout)

    def close(self) -> None:
        if self.running:
            self.proc.kill()
        self._release()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def crashes(self) -> list[LogEvent]:
        with self._cond:
            return [e for e in self.events if e.get("event") in CRASH_EVENTS]


# --------------------------------------------------------------------------------------------
# the site: one dock PC in a temporary directory
# --------------------------------------------------------------------------------------------


class Site:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.dock = base / "dock"
        self.aside = base / "aside"
        self.evidence = base / "evidence"
        self.state = base / "state"
        self.config = base / "dockd.toml"
        for d in (self.dock, self.aside, self.evidence):
            d.mkdir()
        self.gates = Gates()
        self.processes: list[DockdProcess] = []
        self.fuse_cameras: list[FuseCamera] = []
        self._overrides: dict[str, Any] = {}
        self.configure()

    # -- configuration -----------------------------------------------------------------------

    def base_config(self) -> dict[str, Any]:
        return {
            "dock": {"id": DOCK_ID, "state_dir": str(self.state)},
            "sources": {"directory": {"enabled": True, "path": str(self.dock)}},
            "offload": {"min_free_staging": "1KiB", "chunk_size": "64KiB"},
            "store": {"kind": "filesystem", "path": str(self.evidence)},
            "upload": {"backoff_initial": "100ms", "backoff_max": "1s"},
            "mqtt": {"enabled": False},
        }

    def configure(self, **sections: Any) -> Path:
        """(Re)write the configuration: the base one with `sections` merged in."""
        self._overrides = merge(self._overrides, sections)
        self.config.write_text(to_toml(merge(self.base_config(), self._overrides)))
        return self.config

    # -- processes ---------------------------------------------------------------------------

    def start(self, ready: bool = True) -> DockdProcess:
        n = len(self.processes) + 1
        p = DockdProcess(self.config, self.base / f"dockd-{n}.log", self.base, self.release_all)
        self.processes.append(p)
        if ready:
            p.wait_for("daemon_ready")
        return p

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "DOCKD_CONFIG"}
        return subprocess.run(
            [*DOCKD, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base,
            env=env,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def status(self) -> dict[str, Any]:
        r = self.cli("status", "-c", str(self.config), "--json")
        assert r.returncode == 0, r.stderr
        data: dict[str, Any] = json.loads(r.stdout)
        return data

    def wait_status(
        self, check: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        """`dockd status --json` until `check` holds. The daemon writes what only it knows (store
        reachability, problems) to the journal a moment after it logs it, and no log line tells
        when that write is done: asking again is the only way to see it."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if check(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"dockd status never showed it: {json.dumps(st)[:2000]}")
            time.sleep(0.1)

    def verify(self, *sessions: str) -> tuple[int, dict[str, Any]]:
        r = self.cli("verify", "-c", str(self.config), "--json", *sessions)
        try:
            data: dict[str, Any] = json.loads(r.stdout)
        except ValueError:
            raise AssertionError(f"dockd verify printed no JSON: {r.stdout} {r.stderr}") from None
        return r.returncode, data

    def custody(self, session_id: str) -> tuple[int, list[dict[str, Any]], str]:
        r = self.cli("custody", "export", "-c", str(self.config), session_id)
        records = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
        return r.returncode, records, r.stderr

    def release_all(self) -> None:
        """Let go of every gate and every held read (held reads get their data)."""
        self.gates.release_all()
        for fc in self.fuse_cameras:
            fc.reset()

    def kill_all(self) -> None:
        for p in self.processes:
            if p.running:
                p.proc.kill()
        for p in self.processes:
            p.close()

    def close(self) -> None:
        self.kill_all()
        for fc in self.fuse_cameras:
            fc.stop()
        self.gates.close()
        left = [fc.mountpoint for fc in self.fuse_cameras if fc.where() is not None]
        assert not left, f"FUSE cameras still mounted: {left}"

    # -- cameras -----------------------------------------------------------------------------

    def camera(
        self,
        name: str,
        files: dict[bytes | str, int | bytes],
        *,
        symlinks: dict[str, str] | None = None,
        fifos: list[str] | None = None,
        hidden: dict[str, int] | None = None,
        seed: int = 0,
    ) -> Camera:
        """Build a camera folder aside: `files` maps a relative path to its size (random
        content, seeded) or its content. Symlinks and FIFOs must be skipped, hidden files
        excluded (the default `.*` patterns)."""
        root = self.aside / name
        root.mkdir()
        made: dict[bytes, bytes] = {}
        for rel, spec in files.items():
            rel_b = os.fsencode(rel)
            data = spec if isinstance(spec, bytes) else content(f"{seed}:{rel_b!r}", spec)
            path = os.path.join(os.fsencode(root), rel_b)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            made[rel_b] = data
        cam = Camera(name, self, made)
        for rel, target in (symlinks or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).symlink_to(target)
            cam.skipped[rel] = "symlink"
        for rel in fifos or []:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.mkfifo(root / rel)
            cam.skipped[rel] = "fifo"
        for rel, size in (hidden or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content(f"{seed}:hidden:{rel}", size))
            cam.excluded.append(os.fsencode(rel))
        return cam

    def fuse_camera(
        self,
        name: str,
        fuse_files: dict[bytes | str, int],
        *,
        fuse_dir: str = "DCIM",
        seed: int = 0,
        **real: Any,
    ) -> Camera:
        """A camera whose `fuse_dir` is a FUSE filesystem this test controls (holds, read
        errors), beside ordinary entries given as for `camera()`."""
        if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
            pytest.skip("needs root and /dev/fuse for a FUSE camera")
        cam = self.camera(name, real.pop("files", {}), seed=seed, **real)
        mount = cam.aside_root / fuse_dir
        mount.mkdir(parents=True)
        served: dict[bytes, bytes] = {}
        for rel, size in fuse_files.items():
            rel_b = os.fsencode(rel)
            data = content(f"{seed}:fuse:{rel_b!r}", size)
            served[rel_b] = data
            cam.files[os.fsencode(fuse_dir) + b"/" + rel_b] = data
        fc = FuseCamera(mount, served, time.time_ns() - 3600 * 10**9)
        try:
            fc.start()
        except OSError as exc:
            pytest.skip(f"cannot mount a FUSE camera here: {exc}")
        self.fuse_cameras.append(fc)
        cam.fuse, cam.fuse_dir = fc, os.fsencode(fuse_dir)
        return cam

    # -- journal -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def journal(self) -> Iterator[sqlite3.Connection]:
        """The journal, read-only (the daemon may be running)."""
        conn = sqlite3.connect(
            f"file:{self.state / 'journal.sqlite3'}?mode=ro", uri=True, timeout=30
        )
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self.journal() as conn:
            return [dict(r) for r in conn.execute(sql, args).fetchall()]

    def sessions(self, camera: str | None = None) -> list[dict[str, Any]]:
        if camera is None:
            return self.query("SELECT * FROM sessions ORDER BY id")
        return self.query("SELECT * FROM sessions WHERE camera = ? ORDER BY id", camera)

    def session_state(self, session_id: str) -> str:
        rows = self.query("SELECT state FROM sessions WHERE id = ?", session_id)
        assert rows, f"no session {session_id} in the journal"
        return str(rows[0]["state"])

    def file_states(self, session_id: str) -> dict[str, str]:
        rows = self.query("SELECT path, state FROM files WHERE session_id = ?", session_id)
        return {r["path"]: r["state"] for r in rows}

    def custody_rows(self, session_id: str | None = None) -> list[dict[str, Any]]:
        if session_id is None:
            rows = self.query("SELECT * FROM custody ORDER BY seq")
        else:
            rows = self.query("SELECT * FROM custody WHERE session_id = ? ORDER BY seq", session_id)
        for r in rows:
            r["details"] = json.loads(r["details"])
        return rows

    # -- store -------------------------------------------------------------------------------

    def session_dir(self, camera: str, session_id: str) -> Path:
        return self.evidence / camera / session_id

    def manifest(self, camera: str, session_id: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            (self.session_dir(camera, session_id) / "manifest.json").read_bytes()
        )
        return data

    def manifests(self, camera: str) -> dict[str, dict[str, Any]]:
        """session id -> manifest, for every session of `camera` complete in the store."""
        out = {}
        cam_dir = self.evidence / camera
        if cam_dir.is_dir():
            for d in sorted(cam_dir.iterdir()):
                if (d / "manifest.json").is_file():
                    out[d.name] = json.loads((d / "manifest.json").read_bytes())
        return out

    def incoming(self) -> list[Path]:
        inc = self.evidence / ".incoming"
        return sorted(inc.iterdir()) if inc.is_dir() else []

    def staging_leftovers(self) -> list[Path]:
        staging = self.state / "staging"
        return sorted(staging.rglob("*")) if staging.is_dir() else []


# --------------------------------------------------------------------------------------------
# checks shared by the scenarios
# --------------------------------------------------------------------------------------------


FINAL_STATES = ("uploaded", "cleared", "empty")


def wait_all_uploaded(site: Site, proc: DockdProcess, camera: str) -> list[str]:
    """Wait until every session of `camera` in the journal is done: uploaded, or `empty` (a
    docking that found nothing new stays out of the store). Returns the uploaded ones' ids."""
    for s in site.sessions(camera):
        if s["state"] == "offloading":
            proc.wait_for("safe_to_undock", lambda e, sid=s["id"]: e.get("session_id") == sid)
    for s in site.sessions(camera):
        if s["state"] not in FINAL_STATES:
            proc.wait_for("session_uploaded", lambda e, sid=s["id"]: e.get("session_id") == sid)
    states = {s["id"]: s["state"] for s in site.sessions(camera)}
    assert all(st in FINAL_STATES for st in states.values()), states
    return [sid for sid, st in states.items() if st != "empty"]


def assert_each_file_once_in_store(site: Site, cam: Camera) -> dict[str, dict[str, Any]]:
    """Every camera file is `verified` in exactly one manifest of the camera, with its SHA-256,
    and the store object under its key holds exactly those bytes (mode 0440). Nothing else is
    reported verified. Returns the manifests."""
    manifests = site.manifests(cam.name)
    assert manifests, f"no manifest in the store for {cam.name}"
    expected = cam.expected()
    seen: Counter[str] = Counter()
    for sid, m in manifests.items():
        assert m["session_id"] == sid
        for f in m["files"]:
            if f["status"] != "verified":
                continue
            seen[f["path"]] += 1
            assert f["path"] in expected, f"{sid}: {f['path']} reported verified, not on camera"
            assert f["sha256"] == expected[f["path"]], f"{sid}: {f['path']} has a wrong sha256"
            assert f["key"] == f"{cam.name}/{sid}/files/{f['path']}"
            obj = site.evidence / f["key"]
            assert sha256(obj.read_bytes()) == expected[f["path"]], f"{obj}: altered"
            assert obj.stat().st_mode & 0o777 == 0o440, f"{obj}: mode {obj.stat().st_mode:o}"
        files_dir = site.session_dir(cam.name, sid) / "files"
        in_store = {
            f"{cam.name}/{sid}/files/{p.relative_to(files_dir)}"
            for p in files_dir.rglob("*")
            if not p.is_dir()
        }
        keys = {f["key"] for f in m["files"] if f["status"] == "verified"}
        assert in_store == keys, f"{sid}: objects not in the manifest: {in_store - keys}"
    missing = sorted(set(expected) - set(seen))
    repeated = sorted(p for p, n in seen.items() if n > 1)
    assert dict(seen) == dict.fromkeys(expected, 1), (
        f"files not exactly once across manifests: missing {missing}, repeated {repeated}"
    )
    # the journal agrees: each camera path stored once
    rows = site.query(
        "SELECT path, count(*) AS n FROM files WHERE camera = ? AND state IN ('stored', 'cleared')"
        " GROUP BY path",
        cam.name,
    )
    assert {r["path"]: r["n"] for r in rows} == dict.fromkeys(expected, 1)
    return manifests


def assert_store_and_custody_ok(site: Site, session_ids: list[str]) -> None:
    """`dockd verify` passes on the whole store, each session's custody export checks out, and
    no temporaries are left in the store's `.incoming/` nor anything in staging."""
    rc, report = site.verify()
    assert rc == 0, json.dumps(report, indent=2)
    assert report["ok"] is True
    assert report["journal_chain"] == "ok"
    verified = {s["session_id"] for s in report["sessions"] if s["result"] == "ok"}
    assert set(session_ids) <= verified, report
    for sid in session_ids:
        rc, records, err = site.custody(sid)
        assert rc == 0, err
        assert records and all(r["session_id"] == sid for r in records)
        assert records[0]["event"] == "docked"
    assert site.incoming() == [], f"store temporaries left: {site.incoming()}"
    left = site.staging_leftovers()
    assert left == [], f"staging not released: {left}"


def assert_manifest_shape(m: dict[str, Any], cam: Camera, dock_id: str = DOCK_ID) -> None:
    """SPEC §6 manifest fields."""
    rfc3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
    assert m["format"] == "dockd.manifest/1"
    assert re.fullmatch(rf"\d{{8}}T\d{{6}}Z-{re.escape(cam.name)}-[0-9a-f]{{4,}}", m["session_id"])
    assert m["dock_id"] == dock_id
    assert m["camera"]["id"] == cam.name
    for k in ("docked_at", "offloaded_at", "uploaded_at"):
        assert rfc3339.match(m[k]), (k, m[k])
    assert m["docked_at"] <= m["offloaded_at"] <= m["uploaded_at"]
    paths = [f["path"] for f in m["files"]]
    assert paths == sorted(paths)
    for f in m["files"]:
        assert f["status"] in ("verified", "failed", "unstable")
        assert isinstance(f["size"], int) and rfc3339.match(f["mtime"])
        if f["status"] == "verified":
            assert re.fullmatch(r"[0-9a-f]{64}", f["sha256"])
        else:
            assert "key" not in f
        if "raw_path_b64" in f:
            assert encode_path(base64.b64decode(f["raw_path_b64"])) == f["path"]
    c = m["custody"]
    assert 1 <= c["first_seq"] <= c["last_seq"]
    assert re.fullmatch(r"[0-9a-f]{64}", c["prev_hash"]) and re.fullmatch(
        r"[0-9a-f]{64}", c["head"]
    )
    names = [s["name"] for s in m["sidecars"]]
    assert {"SHA256SUMS", "custody.jsonl"} <= set(names)
    assert "manifest.json" not in names and "manifest.json.sig" not in names


def assert_sidecars_match(site: Site, cam: Camera, m: dict[str, Any]) -> None:
    d = site.session_dir(cam.name, m["session_id"])
    for sc in m["sidecars"]:
        body = (d / sc["name"]).read_bytes()
        assert len(body) == sc["size"] and sha256(body) == sc["sha256"], sc["name"]


def sha256sum_check(session_dir: Path) -> subprocess.CompletedProcess[str]:
    """coreutils' own check of SHA256SUMS, run inside `files/` as an investigator would."""
    return subprocess.run(
        ["sha256sum", "--check", "--strict", str(session_dir / "SHA256SUMS")],
        cwd=session_dir / "files",
        capture_output=True,
        text=True,
        check=False,
    )


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.close()
    crashed = [e for p in s.processes for e in p.crashes()]
    if crashed:
        pytest.fail(f"the daemon logged crashes: {json.dumps(crashed)[:3000]}")


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")


@dataclass
class TmpfsStore:
    path: Path

    def remount(self, options: str) -> None:
        _run("mount", "-o", f"remount,{options}", str(self.path))


@pytest.fixture
def tmpfs_store(site: Site) -> Iterator[TmpfsStore]:
    """The evidence store on its own small tmpfs, mounted here and always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs store")
    try:
        _run(
            "mount", "-t", "tmpfs", "-o", "size=32m,mode=0755", "dockd-scenario", str(site.evidence)
        )
    except RuntimeError as exc:
        pytest.skip(f"cannot mount tmpfs: {exc}")
    try:
        yield TmpfsStore(site.evidence)
    finally:
        site.kill_all()  # nothing may hold the store when it goes
        try:
            _run("umount", str(site.evidence))
        except RuntimeError:
            _run("umount", "-l", str(site.evidence))
