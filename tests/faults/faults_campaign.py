"""The fault campaign: runs of a real `dockd run` under faults chosen by a seeded RNG, each run
ending with every invariant of faults_support checked. Used by test_campaign.py (the CI-sized
part) and campaign.py (the long campaign and its Markdown report).

A run is a `RunSpec`: a kind, a seed, and what else the seed turned on (S3 store, MQTT with a
real mosquitto, `camera.clear = "after_upload"`, how many kill -9). The kinds:

kill9           1-3 directory cameras docked/undocked/filled at random moments, the daemon
                killed (SIGKILL) at random points — the n-th line of a random log event, or a
                random delay bounded by the observed run length — and restarted, again and again
undock          a FUSE camera's read held at a random byte of a random file, the camera undocked
                there (renamed away; reads then fail EIO or ENOTCONN), maybe a kill -9 while it
                is away, docked again
staging_full    state_dir/staging on its own small loop-mounted ext4; a second camera docked
                while the first one's staging is held (store away), so its copies hit ENOSPC
store_readonly  the store (its own tmpfs) remounted read-only mid-upload, maybe a kill -9, back
store_away      the store directory renamed away mid-upload (an unmounted NAS), back
store_full      the store's tmpfs too small for the camera, grown once uploads fail
broker_restart  MQTT on, mosquitto restarted at random moments; what it carried is checked too
growing         a FUSE camera file grows once while copied (copied again), another for ever
                (unstable); or a plain camera file appended to all the time (clear refused)
bad_sectors     a FUSE camera answering EIO from a byte of a file on (failed, retried first);
                or (bad_blocks) the bad-block ext4 camera of tests/conftest.py (real EIO from
                a shrunk nested loop device, bind-mounted into a camera folder)
powercut        state_dir on the power-cut layer (powercut_fs): cut at a random filesystem op
                or at a chosen kind of op, unsynced writes dropped, restarted on what a disk
                would have kept
usb             a USB camera (umockdev + a real ext4 on a loop device, `dockd run` under
                umockdev-wrapper), killed at random log lines and undocked mid-offload
bitflip         in-process Daemon: a byte of the staged copy flipped between copy and read-back
                (CopyJob.before_readback); every flip must be caught, never reported verified
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from faults_support import (
    FINAL_STATES,
    KNOWN_BUGS,
    CamModel,
    Checker,
    FsStoreView,
    JournalView,
    S3StoreView,
    StoreView,
    rooth,
    s3h,
    scen,
    sessions_of,
)
from powercut_fs import CutReport, Op, PowerCutFS

KIB = 1024
MIB = 1024 * KIB
WAIT_DONE_S = 120.0
IDLE_S = 1.0  # a kill waiting for a log line that does not come kills when the daemon is idle

KINDS = (
    "kill9", "undock", "staging_full", "store_readonly", "store_away", "store_full",
    "broker_restart", "growing", "bad_sectors", "powercut", "usb", "bitflip",
)  # fmt: skip

# log events a kill -9 may be placed at (the n-th one of a kind after the restart)
KILLABLE = frozenset(
    {
        "session_opened", "camera_walked", "camera_state", "file_verified", "safe_to_undock",
        "file_stored", "session_uploaded", "dock_status", "file_changed_copying_again",
        "store_unreachable", "file_failed", "file_unstable", "camera_gone",
    }
)  # fmt: skip


def kill_point(
    rng: random.Random, reference: list[dict[str, Any]], est_s: float
) -> tuple[str, int] | float:
    """Where the next kill -9 lands: (event, n) — the n-th `event` line from now — picked
    uniformly among the lines of a reference lifetime of the daemon (what it logged last
    time it had work), or, one time in three, a delay up to that lifetime's length."""
    seq = [e for e in reference if e.get("event") in KILLABLE]
    if len(seq) >= 3 and rng.random() < 0.67:
        i = rng.randrange(len(seq))
        name = seq[i]["event"]
        return name, sum(1 for e in seq[: i + 1] if e["event"] == name)
    if len(seq) >= 2:
        with contextlib.suppress(KeyError, ValueError):
            t0, t1 = (
                datetime.fromisoformat(seq[k]["timestamp"].replace("Z", "+00:00")) for k in (0, -1)
            )
            est_s = max(0.05, (t1 - t0).total_seconds())
    return rng.uniform(0, 1.2 * est_s)


def wait_kill_point(proc: Any, where: tuple[str, int] | float, after: int) -> str:
    """Block until the kill point is reached (or the daemon stays idle IDLE_S); its label."""
    if isinstance(where, float):
        time.sleep(where)
        return "delay"
    event, nth = where
    seen = [0]

    def pred(_: dict[str, Any]) -> bool:
        seen[0] += 1
        return seen[0] >= nth

    try:
        proc.wait_for(event, pred, timeout=IDLE_S, after=after)
    except AssertionError:
        return "idle"
    return f"log:{event}"


class Skip(Exception):
    """This machine cannot run the kind (a missing tool); the reason says which."""


@dataclass
class RunSpec:
    kind: str
    seed: int
    store: str = "fs"  # fs | s3
    clear: bool = False
    mqtt: bool = False
    kills: int = 0
    variant: str = ""

    @property
    def label(self) -> str:
        extra = [self.store]
        if self.clear:
            extra.append("clear")
        if self.mqtt:
            extra.append("mqtt")
        if self.variant:
            extra.append(self.variant)
        return f"{self.kind}[{self.seed}:{'+'.join(extra)}:k{self.kills}]"


@dataclass
class RunResult:
    spec: RunSpec
    seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    points: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None  # the harness failed (not a finding about dockd)

    @property
    def new_violations(self) -> list[str]:
        """Violations that are not of a daemon bug already pinned (KNOWN_BUGS)."""
        return [v for v in self.violations if v.split(":", 1)[0] not in KNOWN_BUGS]

    @property
    def known_violations(self) -> list[str]:
        return [v for v in self.violations if v.split(":", 1)[0] in KNOWN_BUGS]

    def summary(self) -> str:
        return (
            f"{self.spec.label}: {self.seconds:.1f}s faults={dict(self.faults)} "
            f"checks={sum(self.checks.values())} violations={len(self.new_violations)}"
            f" known={len(self.known_violations)}"
            + (f" skipped={self.skipped}" if self.skipped else "")
            + (f" error={self.error}" if self.error else "")
        )


class Services:
    """What runs share: the S3 server (started on first use, or handed in by a fixture)."""

    def __init__(self, workdir: Path, s3: Any = None) -> None:
        self.workdir = workdir
        self._s3 = s3
        self._own_s3 = False
        self.est_run_s = 1.0  # how long a run's work takes; bounds the delay of a delay kill
        self.est_ops = 150  # mutating filesystem ops of a power-cut run's daemon, after a restart
        # a daemon lifetime with work in it: the log lines the next kill point is drawn from
        # (to begin with, what one camera's session logs)
        self.reference: list[dict[str, Any]] = [
            {"event": e}
            for e in ["session_opened", "camera_state", "camera_walked", "camera_state"]
            + ["file_verified"] * 4
            + ["safe_to_undock", "camera_state", "camera_state"]
            + ["file_stored"] * 4
            + ["session_uploaded", "camera_state", "dock_status"]
        ]

    def learn(self, events: list[dict[str, Any]]) -> None:
        """Keep a daemon's log as the reference lifetime if it did some work."""
        if sum(1 for e in events if e.get("event") in ("file_verified", "file_stored")) >= 3:
            self.reference = list(events)

    def s3(self) -> Any:
        if self._s3 is None:
            script = s3h._s3_server_script()
            if script is None:
                raise Skip("no s3-server script")
            server = s3h.S3Server(script, self.workdir / "s3-server", {})
            server.data_dir.mkdir(parents=True, exist_ok=True)
            for attempt in range(3):  # another server starting on this machine can race it
                try:
                    server.start()
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
                    time.sleep(5)
            self._s3, self._own_s3 = server, True
        return self._s3

    def close(self) -> None:
        if self._own_s3 and self._s3 is not None:
            with contextlib.suppress(Exception):
                self._s3.stop()


def run(spec: RunSpec, services: Services, base: Path) -> RunResult:
    """One run, whatever happens: a harness error is reported, not raised."""
    result = RunResult(spec)
    t0 = time.monotonic()
    base.mkdir(parents=True, exist_ok=True)
    try:
        if spec.kind == "bitflip":
            BitflipRun(spec, services, base, result).run()
        elif spec.kind == "usb":
            UsbRun(spec, services, base, result).run()
        else:
            DaemonRun(spec, services, base, result).run()
    except Skip as exc:
        result.skipped = str(exc)
    except Exception as exc:  # the harness, not dockd: say so, with where
        import traceback

        result.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
    result.seconds = time.monotonic() - t0
    return result


# --------------------------------------------------------------------------------------------
# cameras
# --------------------------------------------------------------------------------------------


def random_files(rng: random.Random, n: int, prefix: str = "") -> dict[str, int]:
    dirs = ["DCIM/100CAM", "DCIM/101CAM", "GPS", "DCIM/100CAM/deep/er", "MISC"]
    sizes = [
        lambda: 0,
        lambda: rng.randint(1, 4000),
        lambda: rng.randint(60_000, 300_000),
        lambda: rng.randint(500_000, 1_200_000),
    ]
    return {f"{rng.choice(dirs)}/{prefix}{i:04d}.MP4": rng.choice(sizes)() for i in range(n)}


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"mount {' '.join(args)}: {r.stderr.strip()}")


def _remount(path: str, how: str, within: float = 15.0) -> None:
    """`mount -o remount,<how>`; a read-only remount is refused (EBUSY) while a file is open
    for writing there (the daemon writing an object), so it is asked again until it goes."""
    deadline = time.monotonic() + within
    while True:
        r = subprocess.run(
            ["mount", "-o", f"remount,{how}", path], capture_output=True, text=True, check=False
        )
        if r.returncode == 0:
            return
        if "busy" not in r.stderr or time.monotonic() > deadline:
            raise RuntimeError(f"mount -o remount,{how} {path}: {r.stderr.strip()}")
        time.sleep(0.02)


def _umount(path: Path | str) -> None:
    r = subprocess.run(["umount", str(path)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


# --------------------------------------------------------------------------------------------
# a real `dockd run` on a Site
# --------------------------------------------------------------------------------------------


class DaemonRun:
    def __init__(self, spec: RunSpec, services: Services, base: Path, result: RunResult) -> None:
        if os.geteuid() != 0:
            raise Skip("needs root (mounts, FUSE)")
        self.spec = spec
        self.services = services
        self.rng = random.Random(spec.seed)
        self.base = base
        self.result = result
        self.ck = Checker(context=f"{spec.label} ")
        self.stack = ExitStack()
        self.site: Any = None
        self.proc: Any = None
        self.cams: list[Any] = []
        self.failed: dict[str, set[str]] = {}
        self.unstable: dict[str, set[str]] = {}
        self.maybe: dict[str, set[str]] = {}
        self.snapshots: dict[str, Callable[[str, bytes], bool]] = {}
        self.store: StoreView | None = None
        self.store_view_now: StoreView | None = None  # where the store is now (None: away)
        self.broker: Any = None
        self.recorder: Any = None
        self.mqtt_seen = 0
        self.layer: PowerCutFS | None = None
        self._release_wait = 0.0
        self.cuts: list[CutReport] = []
        self._names = 0

    @property
    def faults(self) -> Counter[str]:
        return self.result.faults

    # -- setting up ----------------------------------------------------------------------------

    def run(self) -> None:
        with self.stack:
            self.site = scen.Site(self.base)
            self.stack.callback(self._close_site)
            self._configure()
            getattr(self, f"kind_{self.spec.kind}")()
            self._finish()
        self.result.checks.update(self.ck.checks)
        self.result.violations.extend(self.ck.violations)

    def _close_site(self) -> None:
        if self.site is not None:
            self.site.kill_all()
            for fc in self.site.fuse_cameras:
                fc.stop()
            self.site.gates.close()

    def _configure(self) -> None:
        rng, spec = self.rng, self.spec
        self.site.configure(
            upload={"concurrency": rng.choice([1, 2])},
            offload={
                "copy_workers": rng.choice([1, 2]),
                "chunk_size": rng.choice(["64KiB", "256KiB"]),
                "read_attempts": 2,
            },
        )
        if spec.clear:
            self.site.configure(camera={"clear": "after_upload"})
        if spec.store == "s3":
            s3 = self.services.s3()
            bucket = s3.bucket()
            self.site.configure(store=s3.store_config(self.base, bucket, prefix="ev/"))
            self.store = S3StoreView(s3.client(), bucket, "ev/")
        else:
            self.store = FsStoreView(self.site.evidence)
        self.store_view_now = self.store
        if spec.mqtt:
            import mqtt_harness

            self.broker = mqtt_harness.Broker(self.base / "mqtt", "allow_anonymous true\n")
            self.broker.start()
            self.stack.callback(self.broker.stop)
            self.recorder = mqtt_harness.Recorder(self.broker.port, ("dockd/#",))
            self.stack.callback(self.recorder.close)
            self.site.configure(
                mqtt={"enabled": True, "host": "127.0.0.1", "port": self.broker.port}
            )

    def _name(self) -> str:
        self._names += 1
        return f"X6{self.spec.kind[:4].upper()}{self.spec.seed % 10000:04d}{self._names}"

    def camera(self, n: int | None = None, **kw: Any) -> Any:
        files = random_files(self.rng, n if n is not None else self.rng.randint(3, 7))
        if self.rng.random() < 0.3:
            kw.setdefault("symlinks", {"LATEST.MP4": "DCIM/100CAM/0000.MP4"})
        cam = self.site.camera(self._name(), files, seed=self.rng.randrange(1 << 30), **kw)
        self.cams.append(cam)
        return cam

    def fuse_camera(self, fuse_files: dict[str, int], **kw: Any) -> Any:
        try:
            cam = self.site.fuse_camera(
                self._name(), fuse_files, seed=self.rng.randrange(1 << 30), **kw
            )
        except BaseException as exc:  # pytest.skip raises a BaseException
            if type(exc).__name__ == "Skipped":
                raise Skip(str(exc)) from None
            raise
        self.cams.append(cam)
        return cam

    def start(self) -> Any:
        """Start `dockd run` and wait for it to be ready. A daemon that exits before it is
        ready is a violation (`daemon_started`); it is started again, as systemd would
        (Restart=on-failure), up to three times."""
        for attempt in range(3):
            try:
                self.proc = self.site.start()
                return self.proc
            except AssertionError:
                p = self.site.processes[-1]
                if p.running or attempt == 2:
                    raise
                self.proc = p
                p.wait_exit(30)
                err = p.log_file.with_suffix(".stderr").read_text(errors="replace")
                last = [ln for ln in err.splitlines() if ln.strip()][-1:] or ["(nothing)"]
                self.ck.check(
                    "daemon_started",
                    False,
                    f"dockd exited (rc {p.proc.returncode}) before it was ready: {last[0].strip()}",
                )
        raise AssertionError("unreachable")

    # -- faults ------------------------------------------------------------------------------

    def kill9(self, point: str | None = None) -> None:
        """SIGKILL at a random point (or now, `point` naming why), then the crash-point
        checks; the daemon is not restarted here."""
        proc = self.proc
        if point is None:
            mark = proc.mark()
            where = kill_point(self.rng, self.services.reference, self.services.est_run_s)
            point = wait_kill_point(proc, where, mark)
        if not proc.running:
            self.ck.check("daemon_alive", False, f"the daemon exited by itself\n{proc.tail()}")
        proc.kill9()
        self.faults["kill9"] += 1
        self.result.points[point] += 1
        self.services.learn(proc.events)
        self.crash_point()

    def crash_point(self) -> None:
        """The daemon is dead: what its journal says is so, and all it told is backed."""
        j = JournalView(self.site.state / "journal.sqlite3")
        store = self.store_view_now  # None while the store is away: checks leave it out
        self.ck.durable_state(j, store, self.site.state / "staging")
        self.ck.told(j, store, self.proc.events, self._mqtt_new())
        if store is not None:
            self.ck.camera_clear(j, store, self.models(docked_only=True))

    def _mqtt_new(self) -> list[tuple[str, Any]]:
        if self.recorder is None:
            return []
        with self.recorder._cond:
            msgs = self.recorder.messages[self.mqtt_seen :]
            self.mqtt_seen += len(msgs)
        out = []
        for m in msgs:
            with contextlib.suppress(ValueError):
                out.append((m.topic, json.loads(m.payload)))
        return out

    def camera_action(self, *, running: bool) -> None:
        """Dock an undocked camera, undock a docked one, or give one aside new files."""
        rng = self.rng
        plain = [c for c in self.cams if c.fuse is None]
        if not plain:
            return
        cam = rng.choice(plain)
        roll = rng.random()
        if not cam.docked:
            if roll < 0.3:
                self._add_files(cam)
            cam.dock()
        elif roll < 0.5:
            cam.undock()
            if running:
                self.faults["undock_random"] += 1
            if rng.random() < 0.5:
                self._add_files(cam)

    def _add_files(self, cam: Any) -> None:
        for rel, size in random_files(self.rng, self.rng.randint(1, 3), prefix="n").items():
            rel_b = os.fsencode(rel)
            if rel_b in cam.files:
                continue
            data = self.rng.randbytes(size)
            path = cam.aside_root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            cam.files[rel_b] = data

    # -- finishing ---------------------------------------------------------------------------

    def models(self, docked_only: bool = False) -> list[CamModel]:
        out = []
        for cam in self.cams:
            expected = {scen.encode_path(rel): data for rel, data in cam.files.items()}
            failed = self.failed.get(cam.name, set())
            unstable = self.unstable.get(cam.name, set())
            for p in failed | unstable:
                expected.pop(p, None)
            root = cam.root if self.spec.clear and cam.fuse is None else None
            if docked_only and root is not None and not cam.docked:
                root = cam.aside_root
            out.append(
                CamModel(
                    cam.name,
                    expected,
                    failed,
                    unstable,
                    self.maybe.get(cam.name, set()),
                    root,
                    {scen.encode_path(rel): rel for rel in cam.files},
                    self.snapshots.get(cam.name),
                )
            )
        return out

    def wait_done(self, timeout: float = WAIT_DONE_S) -> bool:
        """Until every session is uploaded (or empty), every camera file is in the store and
        every file meant to fail has failed. A session `upload_failed` is a violation."""
        t0 = time.monotonic()
        self._release_wait = 0.0
        j = JournalView(self.site.state / "journal.sqlite3")
        models = self.models()
        while True:
            if not self.proc.running:
                self.ck.check("daemon_alive", False, f"exited\n{self.proc.tail()}")
                return False
            try:
                done = self._done(j, models)
            except Exception as exc:  # the journal busy a moment: ask again
                done = None if "locked" in str(exc) else False
            if done:
                self.services.est_run_s = 0.7 * self.services.est_run_s + 0.3 * (
                    time.monotonic() - t0
                )
                return True
            if time.monotonic() - t0 > timeout:
                self.ck.check("finished", False, f"not done in {timeout} s\n{self.proc.tail()}")
                return False
            time.sleep(0.15)

    def _done(self, j: JournalView, models: list[CamModel]) -> bool:
        sessions = sessions_of(j)
        failed = [s for s in sessions if s["state"] == "upload_failed"]
        if failed:
            self.ck.check("finished", False, f"sessions upload_failed: {failed}")
            return True
        if any(s["state"] not in FINAL_STATES for s in sessions):
            return False
        # and each finished session's staging released (a stop in between is undone at start;
        # one left for 5 s is left for the final check to report)
        staging = self.site.state / "staging"
        if staging.is_dir() and {p.name for p in staging.iterdir()} & {s["id"] for s in sessions}:
            self._release_wait = self._release_wait or time.monotonic()
            if time.monotonic() - self._release_wait < 5.0:
                return False
        rows = j.query("SELECT camera, path, state FROM files")
        have: dict[tuple[str, str], set[str]] = {}
        for r in rows:
            have.setdefault((r["camera"], r["path"]), set()).add(r["state"])
        for m in models:
            for p in m.expected:
                if p in m.maybe:
                    continue
                if not have.get((m.name, p), set()) & {"stored", "cleared"}:
                    return False
            for p in m.failed | m.unstable:
                if p in m.maybe:
                    continue
                want = "failed" if p in m.failed else "unstable"
                if want not in have.get((m.name, p), set()):
                    return False
        return True

    def settle(self, quiet: float = 0.6, limit: float = 10.0) -> None:
        """Until the daemon has logged nothing for `quiet` seconds (a clear after an upload)."""
        t0 = time.monotonic()
        n = self.proc.mark()
        last = time.monotonic()
        while time.monotonic() - t0 < limit:
            time.sleep(0.1)
            m = self.proc.mark()
            if m != n:
                n, last = m, time.monotonic()
            elif time.monotonic() - last >= quiet:
                return

    def _finish(self) -> None:
        if self.proc is None or not self.proc.running:
            self.start()
        mark = self.proc.mark()
        docked_now = [cam for cam in self.cams if not cam.docked]
        for cam in docked_now:
            cam.dock()
        for cam in docked_now:  # its session is open before "all done" can be judged
            with contextlib.suppress(AssertionError):
                self.proc.wait_for(
                    "session_opened", lambda e, c=cam.name: e.get("camera") == c, after=mark
                )
        self.wait_done()
        self.settle(quiet=0.6 if self.spec.clear else 0.3)
        if self.proc.running:
            rc = self.proc.sigterm()
            self.ck.check("graceful_stop", rc == 0, f"SIGTERM exit {rc}")
        self.final_checks()

    def final_checks(self) -> None:
        assert self.store is not None
        j = JournalView(self.site.state / "journal.sqlite3")
        events = [e for p in self.site.processes for e in p.events]
        self.ck.no_crash(events)
        self.ck.told(j, self.store, self.proc.events, self._mqtt_new())
        self.ck.durable_state(j, self.store, self.site.state / "staging")
        self.ck.custody_order(j)
        models = self.models()
        self.ck.once_in_store(self.store, models)
        self.ck.camera_clear(j, self.store, models)
        self.ck.leftovers(self.site.state / "staging", self.store, j)
        self.ck.cli(self.site.config, [s["id"] for s in sessions_of(j)])

    # -- the kinds -----------------------------------------------------------------------------

    def kind_kill9(self) -> None:
        rng = self.rng
        for _ in range(rng.randint(1, 3)):
            self.camera()
        self.cams[0].dock()
        self.start()
        for _ in range(self.spec.kills):
            if rng.random() < 0.3:
                self.camera_action(running=True)
            self.more_work()
            self.kill9()
            if rng.random() < 0.25:
                self.camera_action(running=False)
            self.start()

    def more_work(self) -> None:
        """If the daemon has nothing left to do (and now and then anyway), give it something:
        new files on a camera, docked again; the next kill then lands in the middle of work."""
        j = JournalView(self.site.state / "journal.sqlite3")
        with contextlib.suppress(Exception):
            if not self._done(j, self.models()) and self.rng.random() < 0.6:
                return
        plain = [c for c in self.cams if c.fuse is None]
        if not plain:
            return
        cam = self.rng.choice(plain)
        if cam.docked:
            cam.undock()
        self._add_files(cam)
        cam.dock()

    def _kills(self, during: str, again: Callable[[], None] | None = None) -> None:
        """The run's kill -9s, while its fault holds (a random moment of it each). A kill
        releases the FUSE cameras' holds; `again` puts a lasting fault back before the
        restart."""
        for _ in range(self.spec.kills):
            time.sleep(self.rng.uniform(0, 1.0))
            self.kill9(f"during:{during}")
            if again is not None:
                again()
            self.start()

    def kind_undock(self) -> None:
        rng = self.rng
        sizes = {f"100CAM/{i:04d}.MP4": rng.randint(200_000, 1_500_000) for i in range(4)}
        cam = self.fuse_camera(sizes, files={"MISC/VER.TXT": 12})
        if rng.random() < 0.5:
            self.camera().dock()  # another camera at work beside it
        self.start()
        order = sorted(sizes)
        target = rng.choice(order)
        at = rng.randrange(0, sizes[target])
        holds = [cam.hold(f"DCIM/{target}".encode(), at)]
        mark = self.proc.mark()
        cam.dock()
        holds[0].wait()
        cam.undock()
        self.faults["undock_mid_file"] += 1
        self.result.notes.append(f"undocked in {target} at byte {at}")
        err = rng.choice([errno.EIO, errno.ENOTCONN, None])
        for h in holds:
            h.release(err)
        with contextlib.suppress(AssertionError):
            self.proc.wait_for(
                "camera_state", lambda e: e.get("state") == "undocked", after=mark, timeout=20
            )
        assert cam.fuse is not None
        cam.fuse.reset()
        if self.spec.kills:
            self._kills("undocked")
        cam.dock()

    def kind_staging_full(self) -> None:
        if shutil.which("mkfs.ext4") is None:
            raise Skip("mkfs.ext4 missing")
        staging = self.site.state / "staging"
        staging.mkdir(parents=True, mode=0o700)
        image = self.base / "staging.img"
        with open(image, "wb") as f:
            f.truncate(6 * MIB)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "0", "-b", "1024", str(image)],
            check=True, capture_output=True,
        )  # fmt: skip
        _mount("-o", "loop", str(image), str(staging))
        self.stack.callback(_umount, staging)
        self.stack.callback(self.site.kill_all)
        free = shutil.disk_usage(staging).free
        a = self.site.camera(self._name(), {f"DCIM/{i:04d}.MP4": free // 5 for i in range(3)})
        b = self.site.camera(self._name(), {f"DCIM/{i:04d}.MP4": free // 5 for i in range(3)})
        self.cams += [a, b]
        away = self.base / "evidence.away"
        if self.spec.store == "fs":
            self.site.evidence.rename(away)  # A's staging is held: B's copies find it full
        self.start()
        mark = self.proc.mark()
        a.dock()
        self.proc.wait_for("safe_to_undock", after=mark, timeout=60)
        b.dock()
        full = None
        with contextlib.suppress(AssertionError):
            full = self.proc.wait_for(
                "camera_state",
                lambda e: "staging" in str(e.get("error") or ""),
                after=mark,
                timeout=20,
            )
        self.ck.check("fault_happened", full is not None or self.spec.store == "s3",
                      "staging never filled up")  # fmt: skip
        if full is not None:
            self.faults["staging_full"] += 1
        if self.spec.kills:
            self._kills("staging_full")
        if away.exists():
            away.rename(self.site.evidence)
        self.stack.callback(self._staging_fs_untouched, staging)

    def _staging_fs_untouched(self, staging: Path) -> None:
        """The staging filesystem's own `lost+found` is still there (run at teardown: after
        the final checks, before the unmount)."""
        self.ck.check(
            "staging_fs_untouched",
            (staging / "lost+found").is_dir(),
            "lost+found of the filesystem mounted at state_dir/staging was removed",
        )

    def _tmpfs_store(self, size: str = "64m") -> None:
        _mount(
            "-t", "tmpfs", "-o", f"size={size},mode=0755", "dockd-faults", str(self.site.evidence)
        )
        self.stack.callback(_umount, self.site.evidence)
        self.stack.callback(self.site.kill_all)

    def _store_fault(
        self,
        start: Callable[[], None],
        end: Callable[[], None],
        name: str,
        meanwhile: StoreView | None = None,
    ) -> None:
        """Cameras at work, then the store fault from a random moment, kills while it lasts,
        then the store back. `meanwhile`: where the crash-point checks read the store while
        it is away (None: they leave the store out)."""
        for _ in range(self.rng.randint(1, 2)):
            self.camera().dock()
        self.start()
        event = self.rng.choice(["file_verified", "safe_to_undock", "file_stored"])
        with contextlib.suppress(AssertionError):
            self.proc.wait_for(event, timeout=30)
        ended = [False]

        def back() -> None:
            if not ended[0]:
                ended[0] = True
                end()
                self.store_view_now = self.store

        self.stack.callback(back)  # whatever happens, the store comes back (S3: the server)
        mark = self.proc.mark()
        start()
        self.store_view_now = meanwhile
        self.camera().dock()  # work for the store while it is away, whatever was done before
        self.faults[name] += 1
        seen = None
        with contextlib.suppress(AssertionError):
            seen = self.proc.wait_for("store_unreachable", after=mark, timeout=20)
        self.ck.check("fault_happened", seen is not None, f"{name}: the daemon never noticed")
        if self.spec.kills:
            self._kills(name)
        back()

    def kind_store_readonly(self) -> None:
        if self.spec.store != "fs":
            raise Skip("a read-only store is a filesystem store fault")
        self._tmpfs_store()
        ev = str(self.site.evidence)
        self._store_fault(
            lambda: _remount(ev, "ro"),
            lambda: _remount(ev, "rw"),
            "store_readonly",
            self.store,
        )

    def kind_store_away(self) -> None:
        if self.spec.store == "s3":
            # a network outage between the dock and the S3 server (mqtt_harness.Cut, a TCP
            # relay): the server stays up for the other runs and for the checks
            relay = Relay(self.services.s3().endpoint_url)
            self.stack.callback(relay.close)
            self.site.configure(store={"endpoint_url": relay.url})
            self._store_fault(relay.cut, relay.restore, "store_away", self.store)
            return
        away = self.base / "evidence.away"
        self._store_fault(
            lambda: self.site.evidence.rename(away),
            lambda: away.rename(self.site.evidence),
            "store_away",
            FsStoreView(away),
        )

    def kind_store_full(self) -> None:
        if self.spec.store != "fs":
            raise Skip("a full store is a filesystem store fault")
        self._tmpfs_store("1m")
        cam = self.site.camera(
            self._name(),
            {f"DCIM/{i:04d}.MP4": self.rng.randint(400_000, 900_000) for i in range(4)},
        )
        self.cams.append(cam)
        self.start()
        cam.dock()
        with contextlib.suppress(AssertionError):
            e = self.proc.wait_for(
                "store_unreachable",
                lambda e: (
                    "full" in str(e.get("error")).lower() or "space" in str(e.get("error")).lower()
                ),
                timeout=30,
            )
            self.faults["store_full"] += 1
            self.result.notes.append(f"store full: {str(e.get('error'))[:80]}")
        if self.spec.kills:
            self._kills("store_full")
        _mount("-o", "remount,size=64m", str(self.site.evidence))

    def kind_broker_restart(self) -> None:
        if self.broker is None:
            raise Skip("broker_restart needs mqtt on")
        for _ in range(self.rng.randint(1, 2)):
            self.camera().dock()
        self.start()
        for _ in range(self.rng.randint(1, 2)):
            event = self.rng.choice(
                ["file_verified", "safe_to_undock", "file_stored", "camera_state"]
            )
            with contextlib.suppress(AssertionError):
                self.proc.wait_for(event, after=self.proc.mark(), timeout=10)
            self.broker.restart()
            self.faults["broker_restart"] += 1
        if self.spec.kills:
            self._kills("broker_restart")
        self.camera().dock()

    def kind_growing(self) -> None:
        rng = self.rng
        if self.spec.variant == "writer":
            return self._growing_writer()
        sizes = {f"100CAM/{i:04d}.MP4": rng.randint(300_000, 1_000_000) for i in range(3)}
        cam = self.fuse_camera(sizes)
        assert cam.fuse is not None
        once, ever = rng.sample(sorted(sizes), 2)
        cam.fuse.grow(
            once.encode(), at=rng.randrange(sizes[once]), by=rng.randint(1, 70_000), times=1
        )
        if rng.random() < 0.6:
            cam.fuse.grow(ever.encode(), at=rng.randrange(sizes[ever]), by=4096)
            self.unstable.setdefault(cam.name, set()).add(f"DCIM/{ever}")
        self.start()
        cam.dock()
        self.faults["growing"] += 1
        if self.spec.kills:
            mark = self.proc.mark()
            with contextlib.suppress(AssertionError):
                self.proc.wait_for("file_changed_copying_again", after=mark, timeout=20)
            self.kill9("log:file_changed_copying_again")
            self.start()
        self.proc.wait_for("safe_to_undock", timeout=60)
        cam.files[f"DCIM/{once}".encode()] = cam.fuse.data(once.encode())
        if f"DCIM/{ever}" not in self.unstable.get(cam.name, set()):
            cam.files[f"DCIM/{ever}".encode()] = cam.fuse.data(ever.encode())

    def _growing_writer(self) -> None:
        """A plain camera file appended to while the daemon runs: never stable, and its
        session's camera is never cleared (with clear on)."""
        cam = self.camera()
        rel = b"DCIM/100CAM/LIVE.MP4"
        path = cam.aside_root / "DCIM/100CAM/LIVE.MP4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.rng.randbytes(400_000))
        prefix = path.read_bytes()
        cam.files[rel] = b""
        self.unstable.setdefault(cam.name, set()).add("DCIM/100CAM/LIVE.MP4")
        self.maybe.setdefault(cam.name, set()).add("DCIM/100CAM/LIVE.MP4")

        def snapshot(_: str, body: bytes) -> bool:
            tail = body[len(prefix) :]
            return body.startswith(prefix) and tail == b"x" * len(tail) and len(tail) % 512 == 0

        self.snapshots[cam.name] = snapshot
        stop = threading.Event()

        def write() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    p = cam.root / "DCIM/100CAM/LIVE.MP4"
                    with open(p, "ab") as f:
                        f.write(b"x" * 512)
                stop.wait(0.002)

        t = threading.Thread(target=write, daemon=True)
        t.start()
        self.stack.callback(t.join, 5)
        self.stack.callback(stop.set)
        self.start()
        cam.dock()
        self.faults["growing"] += 1
        if self.spec.kills:
            self._kills("growing")

    def kind_bad_sectors(self) -> None:
        if self.spec.variant == "bad_blocks":
            return self._bad_blocks()
        rng = self.rng
        sizes = {f"100CAM/{i:04d}.MP4": rng.randint(200_000, 800_000) for i in range(3)}
        cam = self.fuse_camera(sizes, files={"MISC/VER.TXT": 12})
        bad = rng.choice(sorted(sizes))
        at = rng.randrange(sizes[bad])
        hold = cam.hold(f"DCIM/{bad}".encode(), at)
        self.failed.setdefault(cam.name, set()).add(f"DCIM/{bad}")
        self.start()
        cam.dock()
        hold.wait()
        hold.release(errno.EIO)  # this read and every later one from `at` on: a bad sector
        self.faults["unreadable_fuse_eio"] += 1
        if self.spec.kills:
            self._kills(
                "unreadable", lambda: cam.hold(f"DCIM/{bad}".encode(), at).release(errno.EIO)
            )

    def _bad_blocks(self) -> None:
        try:
            rooth._require("mkfs.ext4", "debugfs", "dumpe2fs", "losetup", "mount", "umount",
                           "blockdev")  # fmt: skip
        except BaseException as exc:
            raise Skip(str(exc)) from None
        tmp = self.base / "badblocks"
        tmp.mkdir()
        image, good, bad, first_bad = rooth._make_camera_image(tmp)
        root = rooth._nested_loop(self.stack, tmp, image, bad, first_bad)
        cam = self.site.camera(self._name(), {"MISC/VER.TXT": 12})
        (cam.aside_root / "DCIM").mkdir()
        _mount("--bind", "-o", "ro", str(root), str(cam.aside_root / "DCIM"))
        self.stack.callback(lambda: _umount(cam.root / "DCIM"))
        self.stack.callback(self.site.kill_all)
        for rel, data in good.items():
            cam.files[b"DCIM/" + rel.encode()] = data
        self.cams.append(cam)
        self.failed.setdefault(cam.name, set()).add("DCIM/" + rooth.BAD_FILE)
        self.start()
        cam.dock()
        self.faults["unreadable_bad_blocks"] += 1
        if self.spec.kills:
            self._kills("bad_blocks")

    def kind_powercut(self) -> None:
        if not os.path.exists("/dev/fuse"):
            raise Skip("no /dev/fuse")
        layer = self.layer = PowerCutFS(self.base / "state.backing", self.site.state)
        layer.mount()
        self.stack.callback(layer.unmount)
        self.stack.callback(self.site.kill_all)
        rng = self.rng
        for _ in range(rng.randint(1, 2)):
            self.camera()
        self.cams[0].dock()
        self.start()
        for i in range(max(1, self.spec.kills)):
            if i and rng.random() < 0.4:
                self.camera_action(running=True)
            self.more_work()
            when, label = self._cut_point()
            pid = self.proc.pid
            layer.arm(when, lambda pid=pid: os.kill(pid, signal.SIGKILL))
            if not layer.cut_event.wait(min(20.0, max(3.0, 2 * self.services.est_run_s))):
                layer.cut()  # the op never came (the work was done first): cut now
                os.kill(pid, signal.SIGKILL)
                self.result.notes.append(f"{label} never came")
                label = "time"
            self.proc.kill9()
            ops_now = layer.ops
            if label == "time" and i:  # a restarted lifetime's ops: the next op-n cut's range
                self.services.est_ops = max(30, ops_now)
            layer.unmount()
            report = layer.rebuild()
            layer.mount()
            self.cuts.append(report)
            self.faults["powercut"] += 1
            self.faults["kill9"] += 1
            self.result.points[f"cut:{label}"] += 1
            op = layer.last_cut if label != "time" else None
            what = f"{op.name} {op.path}" if op else "idle"
            self.result.notes.append(
                f"cut at {label}, op {ops_now} ({what}): dropped {report.names_lost} names, "
                f"rolled back {report.files_rolled_back} files"
            )
            self.result.faults["powercut_names_dropped"] += report.names_lost
            self.result.faults["powercut_files_rolled_back"] += report.files_rolled_back
            self.crash_point()
            self.start()

    def _cut_point(self) -> tuple[int | Callable[[Op], bool], str]:
        rng = self.rng
        if rng.random() < 0.55:
            return rng.randint(1, self.services.est_ops), "op-n"

        def staging(*ops: str) -> Callable[[Op], bool]:
            return lambda op: op.name in ops and op.path.startswith("staging")

        def journal(op_name: str, suffix: str) -> Callable[[Op], bool]:
            return lambda op: op.name == op_name and op.path.endswith(suffix)

        kinds: list[tuple[str, Callable[[Op], bool]]] = [
            ("staging-fsyncdir", staging("fsyncdir")),
            ("staging-rename", staging("rename")),
            ("staging-fsync", staging("fsync")),
            ("staging-unlink", staging("unlink", "rmdir")),
            ("wal-fsync", journal("fsync", "-wal")),
            ("wal-write", journal("write", "-wal")),
        ]  # fmt: skip
        label, pred = rng.choice(kinds)
        nth = rng.randint(1, 6)
        seen = [0]

        def nth_pred(op: Op) -> bool:
            if pred(op):
                seen[0] += 1
            return seen[0] >= nth

        return nth_pred, label


class Relay:
    """mqtt_harness.Cut (a TCP relay that can drop every connection and refuse new ones) on an
    event loop of its own thread, in front of an HTTP endpoint."""

    def __init__(self, endpoint: str) -> None:
        import mqtt_harness

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._cut = mqtt_harness.Cut(int(endpoint.rsplit(":", 1)[1].strip("/")))
        asyncio.run_coroutine_threadsafe(self._cut.start(), self._loop).result(10)
        self.url = f"http://127.0.0.1:{self._cut.port}"

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._cut.cut)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(self._cut.restore)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._cut.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# --------------------------------------------------------------------------------------------
# USB: umockdev + loop devices
# --------------------------------------------------------------------------------------------


class UsbRun:
    def __init__(self, spec: RunSpec, services: Services, base: Path, result: RunResult) -> None:
        if os.geteuid() != 0 or shutil.which("umockdev-wrapper") is None:
            raise Skip("needs root and umockdev-wrapper")
        self.spec, self.rng, self.base, self.result = spec, random.Random(spec.seed), base, result
        self.services = services
        self.ck = Checker(context=f"{spec.label} ")

    def run(self) -> None:
        import usb_support as us

        with ExitStack() as stack:
            try:
                bed = us.Testbed()
            except BaseException as exc:
                if type(exc).__name__ == "Skipped":
                    raise Skip(str(exc)) from None
                raise
            stack.callback(bed.close)
            (self.base / "devices").mkdir()
            devs = us.Devices(self.base / "devices")
            stack.callback(devs.close)
            (self.base / "site").mkdir()
            dock = us.Dock(self.base / "site", bed)
            if self.spec.clear:  # cleared through a read-write mount made for that step only
                dock.settings = {"camera": {"clear": "after_upload"}}
            stack.callback(dock.close)
            rng = self.rng
            serial = f"X6USB{self.spec.seed % 100000:05d}"
            files = {
                f"DCIM/100CAM/{i:04d}.MP4": rng.randbytes(rng.randint(100_000, 1_500_000))
                for i in range(rng.randint(3, 6))
            }
            try:
                image = devs.ext4(serial, files, size_mib=32)
            except BaseException as exc:
                if type(exc).__name__ == "Skipped":
                    raise Skip(str(exc)) from None
                raise
            cam = us.UsbCamera(image, bay=1, serial=serial)
            proc = dock.start()
            bed.dock(cam)
            for _ in range(self.spec.kills):
                if rng.random() < 0.3:
                    mark = proc.mark()
                    with contextlib.suppress(AssertionError):
                        proc.wait_for(rng.choice(["file_verified", "session_opened"]), after=mark)
                    bed.undock(cam)
                    self.result.faults["undock_usb"] += 1
                    with contextlib.suppress(AssertionError):
                        proc.wait_for("camera_state", lambda e: e.get("state") == "undocked",
                                      after=mark, timeout=8)  # fmt: skip
                    bed.dock(cam)
                mark = proc.mark()
                where = kill_point(rng, self.services.reference, 1.0)
                point = wait_kill_point(proc, where, mark)
                proc.proc.kill()
                proc.wait_exit(30)
                self.services.learn(proc.events)
                self.result.faults["kill9"] += 1
                self.result.points[point] += 1
                j = JournalView(dock.state / "journal.sqlite3")
                store = FsStoreView(dock.evidence)
                self.ck.durable_state(j, store, dock.state / "staging")
                self.ck.told(j, store, proc.events)
                proc = dock.start()
            self._wait_done(dock, proc, serial, set(files))
            if self.spec.clear:  # until the clear is done: nothing logged for a second
                t0, n, last = time.monotonic(), proc.mark(), time.monotonic()
                while time.monotonic() - t0 < 20 and time.monotonic() - last < 1.0:
                    time.sleep(0.1)
                    if proc.mark() != n:
                        n, last = proc.mark(), time.monotonic()
            rc = proc.sigterm()
            self.ck.check("graceful_stop", rc == 0, f"SIGTERM exit {rc}")
            j = JournalView(dock.state / "journal.sqlite3")
            store = FsStoreView(dock.evidence)
            self.ck.no_crash([e for p in dock.processes for e in p.events])
            self.ck.told(j, store, proc.events)
            self.ck.durable_state(j, store, dock.state / "staging")
            self.ck.custody_order(j)
            model = CamModel(serial, dict(image.files))
            self.ck.once_in_store(store, [model])
            if self.spec.clear:  # what is left on the camera, read from its image
                seen = self.base / "camera-after"
                seen.mkdir()
                us.run("mount", "-o", "ro,noload", image.loop, str(seen))
                try:
                    model.root = seen
                    self.ck.camera_clear(j, store, [model])
                    self.result.notes.append(
                        f"{sum(1 for p in seen.rglob('*') if p.is_file())} files left on camera"
                    )
                finally:
                    us.run("umount", str(seen), check=False)
            self.ck.leftovers(dock.state / "staging", store, j)
            env = {k: v for k, v in us.tool_env().items() if k != "DOCKD_CONFIG"}
            self.ck.cli(dock.config, [s["id"] for s in sessions_of(j)], env)
            left = us.mounts_under(dock.mount_dir)
            self.ck.check("usb_unmounted", not left, f"mounts left: {left}")
        self.result.checks.update(self.ck.checks)
        self.result.violations.extend(self.ck.violations)

    def _wait_done(self, dock: Any, proc: Any, serial: str, paths: set[str]) -> None:
        """Every session of the camera finished (uploaded, cleared or empty), every file in the
        store."""
        j = JournalView(dock.state / "journal.sqlite3")
        deadline = time.monotonic() + WAIT_DONE_S
        while True:
            states = {s["id"]: s["state"] for s in dock.sessions(serial)}
            stored = {
                r["path"]
                for r in j.query(
                    "SELECT path FROM files WHERE camera = ? AND state IN ('stored', 'cleared')",
                    serial,
                )
            }
            if states and set(states.values()) <= set(FINAL_STATES) and paths <= stored:
                return
            if "upload_failed" in states.values() or time.monotonic() > deadline:
                self.ck.check("finished", False, f"{states}\n{proc.tail()}")
                return
            time.sleep(0.15)


# --------------------------------------------------------------------------------------------
# a bit flipped in staging between copy and read-back (in-process daemon)
# --------------------------------------------------------------------------------------------


class BitflipRun:
    """The read-back must catch every flipped byte: `before_readback` (the CopyJob test seam)
    flips one bit of the staged copy on chosen attempts. A file flipped on every attempt ends
    `failed`; any other ends verified with the camera's bytes; no flipped byte is ever recorded
    verified, stored or listed in a manifest."""

    def __init__(self, spec: RunSpec, services: Services, base: Path, result: RunResult) -> None:
        self.spec, self.rng, self.base, self.result = spec, random.Random(spec.seed), base, result
        self.ck = Checker(context=f"{spec.label} ")

    def run(self) -> None:
        from unittest import mock

        import structlog

        from dockd.config import parse_config
        from dockd.errors import IntegrityError
        from dockd.observers.log import setup
        from dockd.offload import copy as copy_mod
        from dockd.offload import session as session_mod

        rng, base = self.rng, self.base
        attempts = 3
        cams: dict[str, dict[str, bytes]] = {}
        for c in range(rng.randint(1, 2)):
            cams[f"X6FLIP{self.spec.seed % 10000:04d}{c}"] = {
                f"DCIM/100CAM/{i:04d}.MP4": rng.randbytes(rng.randint(1, 400_000))
                for i in range(rng.randint(3, 6))
            }
        plan: dict[bytes, set[int]] = {}  # camera file -> attempts (1-based) whose copy is flipped
        doomed: set[tuple[str, str]] = set()
        for cam, files in cams.items():
            for rel in files:
                src = os.fsencode(base / "dock" / cam / rel)
                roll = rng.random()
                if roll < 0.15:
                    plan[src] = set(range(1, attempts + 1))
                    doomed.add((cam, rel))
                elif roll < 0.65:
                    plan[src] = set(rng.sample(range(1, attempts), rng.randint(1, attempts - 1)))
        flips: list[tuple[bytes, int]] = []
        caught: list[tuple[bytes, int]] = []
        tries: Counter[bytes] = Counter()
        lock = threading.Lock()
        real_copy = copy_mod.copy_file

        def flip(path: Path) -> None:
            with open(path, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    f.write(b"\x01")  # an empty copy gains a byte: also a change
                    return
                at = rng.randrange(size)
                f.seek(at)
                b = f.read(1)
                f.seek(at)
                f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
                f.flush()
                os.fsync(f.fileno())

        class FlippingJob(copy_mod.CopyJob):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                with lock:
                    tries[self.source] += 1
                    n = tries[self.source]
                if n in plan.get(self.source, set()):
                    src = self.source

                    def hook(path: Path, src: bytes = src, n: int = n) -> None:
                        flip(path)
                        with lock:
                            flips.append((src, n))
                            flipped_at[path] = (src, n)

                    self.before_readback = hook

        # small files are read back by their group (settle_group), not by copy_file: a copy
        # the group reports unverified after a flip is a flip caught
        flipped_at: dict[Path, tuple[bytes, int]] = {}
        real_settle = session_mod.settle_group

        def counting_settle(dir_fd: int, owed: Any, buf: Any) -> Any:
            ok = real_settle(dir_fd, owed, buf)
            with lock:
                for o, good in zip(owed, ok, strict=True):
                    if o.staged in flipped_at:
                        hit = flipped_at.pop(o.staged)
                        if not good:
                            caught.append(hit)
            return ok

        def counting_copy(job: Any, *a: Any) -> Any:
            try:
                return real_copy(job, *a)
            except IntegrityError:
                with lock:
                    caught.append((job.source, tries[job.source]))
                raise

        dock = base / "dock"
        dock.mkdir()
        (base / "evidence").mkdir()
        for cam, files in cams.items():
            for rel, data in files.items():
                p = base / "aside" / cam / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
        data = {
            "dock": {"id": "bitflip-dock", "state_dir": str(base / "state")},
            "sources": {"directory": {"enabled": True, "path": str(dock)}},
            "store": {"kind": "filesystem", "path": str(base / "evidence")},
            "mqtt": {"enabled": False},
            "offload": {"min_free_staging": "1KiB", "copy_attempts": attempts,
                        "chunk_size": "64KiB"},
            "upload": {"backoff_initial": "100ms", "backoff_max": "1s"},
        }  # fmt: skip
        config_file = base / "dockd.toml"
        config_file.write_text(scen.to_toml(data))
        cfg = parse_config(data)
        log = io.StringIO()
        setup("info", stream=log)
        try:
            with (
                mock.patch.object(session_mod, "CopyJob", FlippingJob),
                mock.patch.object(session_mod, "copy_file", counting_copy),
                mock.patch.object(session_mod, "settle_group", counting_settle),
            ):
                asyncio.run(self._daemon(cfg, cams))
        finally:
            structlog.reset_defaults()
        events = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
        self.result.faults["bitflip"] += len(flips)
        self.result.faults["bitflip_caught"] += len(caught)
        self.ck.check(
            "bitflip_caught",
            sorted(flips) == sorted(caught),
            f"flipped {len(flips)}, caught {len(caught)}: "
            f"missed {sorted(set(flips) - set(caught))}",
        )
        j = JournalView(base / "state" / "journal.sqlite3")
        store = FsStoreView(base / "evidence")
        models = []
        for cam, files in cams.items():
            failed = {rel for (c, rel) in doomed if c == cam}
            models.append(
                CamModel(cam, {r: d for r, d in files.items() if r not in failed}, failed)
            )
        self.ck.no_crash(events)
        self.ck.told(j, store, events)
        self.ck.durable_state(j, store, base / "state" / "staging")
        self.ck.custody_order(j)
        self.ck.once_in_store(store, models)
        self.ck.leftovers(base / "state" / "staging", store, j)
        self.ck.cli(config_file, [s["id"] for s in sessions_of(j)])
        self.result.checks.update(self.ck.checks)
        self.result.violations.extend(self.ck.violations)

    async def _daemon(self, cfg: Any, cams: dict[str, dict[str, bytes]]) -> None:
        from dockd.daemon import Daemon
        from dockd.events import Notice

        daemon = Daemon(cfg)
        sub = daemon.bus.subscribe("campaign")
        task = asyncio.create_task(daemon.run())
        uploaded: set[str] = set()
        try:
            async with asyncio.timeout(90):
                await daemon.ready.wait()
                for cam in cams:
                    os.rename(self.base / "aside" / cam, self.base / "dock" / cam)
                async for event in sub:
                    if isinstance(event, Notice) and event.event == "session_uploaded":
                        uploaded.add(str(event.camera))
                        if uploaded == set(cams):
                            break
        except TimeoutError:
            self.ck.check("finished", False, f"uploaded only {sorted(uploaded)}")
        finally:
            daemon.stop()
            await task


# --------------------------------------------------------------------------------------------
# plans and the report
# --------------------------------------------------------------------------------------------


def plan(runs: int, seed: int, min_kills: int = 0) -> list[RunSpec]:
    """`runs` runs: a kill9 run about every other one, each other kind in turn between, with
    S3 / MQTT / clear / extra kills drawn from `seed`; then more kill9 runs until the plan holds
    `min_kills` kill -9."""
    rng = random.Random(seed)
    others = [k for k in KINDS if k != "kill9"]
    specs: list[RunSpec] = []
    i = 0
    while len(specs) < runs:
        s = rng.randrange(1 << 31)
        if len(specs) % 2 == 0:
            specs.append(
                RunSpec(
                    "kill9",
                    s,
                    store="s3" if rng.random() < 0.25 else "fs",
                    clear=rng.random() < 0.3,
                    mqtt=rng.random() < 0.15,
                    kills=rng.randint(2, 5),
                )
            )
        else:
            kind = others[i % len(others)]
            i += 1
            specs.append(other_spec(kind, s, rng))
    while sum(planned_kills(s) for s in specs) < min_kills:
        specs.append(RunSpec("kill9", rng.randrange(1 << 31), kills=rng.randint(3, 5)))
    return specs


def other_spec(kind: str, seed: int, rng: random.Random) -> RunSpec:
    store = "s3" if kind in ("store_away", "broker_restart") and rng.random() < 0.4 else "fs"
    variant = ""
    if kind == "growing" and rng.random() < 0.4:
        variant = "writer"
    if kind == "bad_sectors" and rng.random() < 0.3:
        variant = "bad_blocks"
    kills = {"bitflip": 0, "powercut": rng.randint(1, 3), "usb": rng.randint(2, 4)}.get(
        kind, rng.choice([0, 1, 1, 2])
    )
    return RunSpec(
        kind,
        seed,
        store=store,
        clear=(kind == "growing" and variant == "writer") or rng.random() < 0.15,
        mqtt=kind == "broker_restart",
        kills=kills,
        variant=variant,
    )


def planned_kills(s: RunSpec) -> int:
    if s.kind == "bitflip":
        return 0
    if s.kind == "powercut":
        return max(1, s.kills)
    if s.kind == "growing" and s.variant != "writer":
        return 1 if s.kills else 0
    return s.kills


@dataclass
class Campaign:
    results: list[RunResult] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    seconds: float = 0.0

    def totals(self) -> tuple[Counter[str], Counter[str], Counter[str]]:
        faults: Counter[str] = Counter()
        checks: Counter[str] = Counter()
        points: Counter[str] = Counter()
        for r in self.results:
            faults.update(r.faults)
            checks.update(r.checks)
            points.update(r.points)
        return faults, checks, points

    @property
    def violations(self) -> list[str]:
        """Violations of the invariants not explained by a daemon bug already pinned."""
        return [v for r in self.results for v in r.new_violations]

    @property
    def known(self) -> list[str]:
        return [v for r in self.results for v in r.known_violations]

    def report(self, title: str = "Fault campaign", command: str = "") -> str:
        faults, checks, points = self.totals()
        by_kind: dict[str, list[RunResult]] = {}
        for r in self.results:
            by_kind.setdefault(r.spec.kind, []).append(r)
        out = [f"# {title}", ""]
        if command:
            out += [f"Command: `{command}`", ""]
        ran = [r for r in self.results if not r.skipped and not r.error]
        out += [
            f"- Started: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.started))}",
            f"- Runs: {len(self.results)} ({len(ran)} ran, "
            f"{sum(1 for r in self.results if r.skipped)} skipped, "
            f"{sum(1 for r in self.results if r.error)} harness errors)",
            f"- Time taken: {self.seconds:.0f} s ({self.seconds / 60:.1f} min)",
            f"- kill -9 faults: {faults['kill9']}",
            f"- Invariant checks performed: {sum(checks.values())}",
            f"- **Violations: {len(self.violations)}**",
            f"- Known daemon bugs hit (already pinned by tests/faults/test_campaign_findings.py, "
            f"counted apart): {len(self.known)}",
            "",
            "## Runs by kind",
            "",
            "| kind | runs | kill -9 | time (s) | violations |",
            "|---|---:|---:|---:|---:|",
        ]
        for kind in KINDS:
            rs = by_kind.get(kind, [])
            if not rs:
                continue
            out.append(
                f"| {kind} | {len(rs)} | {sum(r.faults['kill9'] for r in rs)} | "
                f"{sum(r.seconds for r in rs):.0f} | {sum(len(r.violations) for r in rs)} |"
            )
        out += ["", "## Faults injected, by kind", "", "| fault | count |", "|---|---:|"]
        for k, n in sorted(faults.items()):
            out.append(f"| {k} | {n} |")
        out += ["", "## Where the kill -9 landed", "", "| point | count |", "|---|---:|"]
        for k, n in sorted(points.items(), key=lambda kv: -kv[1]):
            out.append(f"| {k} | {n} |")
        out += ["", "## Invariant checks performed", "", "| check | count |", "|---|---:|"]
        for k, n in sorted(checks.items()):
            out.append(f"| {k} | {n} |")
        out += ["", "## Violations", ""]
        if self.violations:
            for r in self.results:
                for v in r.new_violations:
                    out.append(f"- `{r.spec.label}`: {v.splitlines()[0][:400]}")
        else:
            out.append("None.")
        out += ["", "## Known daemon bugs hit", ""]
        if self.known:
            for r in self.results:
                for v in r.known_violations:
                    bug = KNOWN_BUGS[v.split(":", 1)[0]]
                    out.append(f"- `{r.spec.label}`: {v.splitlines()[0][:300]} (pinned: `{bug}`)")
        else:
            out.append("None.")
        skipped = [r for r in self.results if r.skipped or r.error]
        if skipped:
            out += ["", "## Skipped or failed to set up", ""]
            for r in skipped:
                why = r.skipped or (r.error or "").splitlines()[0]
                out.append(f"- `{r.spec.label}`: {why[:300]}")
        out += ["", "## Runs", "", "| run | s | faults | checks | violations |",
                "|---|---:|---|---:|---:|"]  # fmt: skip
        for r in self.results:
            f = ", ".join(f"{k} {v}" for k, v in sorted(r.faults.items()))
            known = f" (+{len(r.known_violations)} known)" if r.known_violations else ""
            out.append(
                f"| `{r.spec.label}` | {r.seconds:.1f} | {f} | {sum(r.checks.values())} | "
                f"{len(r.new_violations)}{known} |"
            )
        return "\n".join(out) + "\n"
