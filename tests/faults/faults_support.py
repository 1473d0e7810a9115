"""What the fault campaign shares: the project's own harnesses (imported, never copied), views of
the evidence store, and the invariants checked after every fault and at the end of every run.

The harnesses live in other test directories, each with its own `conftest.py`, so `from conftest
import` cannot reach them from here. Their uniquely named modules (scenario_fusecam, usb_support,
mqtt_harness) are imported by name, their directories appended to `sys.path`; the three conftest
files whose contents are needed (the scenario Site and DockdProcess, the SeaweedFS S3Server, the
bad-block camera of tests/conftest.py) are loaded by path under names of their own.

The invariants (SPEC §2, §5, §6; issue 9 item 4), each counted every time it is checked:

- verified_means_verified / stored_means_stored: at every crash point, every file the journal
  holds `verified` has exactly its bytes in staging, every `stored` one is in the store whole;
- manifest_complete: a manifest in the store (at a crash point or at the end) never comes
  before its files: every file it lists verified is there with its SHA-256, and its sidecars
  match what it says of them;
- told_*: nothing is told before it is true: each `file_verified`, `file_stored`,
  `safe_to_undock`, `session_uploaded` log line (and MQTT event, and camera topic saying
  `safe_to_undock`/`uploaded`) is backed by the custody record that makes it so in the journal
  *as it is after the crash* — with the power-cut layer, after the unsynced writes are gone —
  recorded no later than the telling;
- custody_order: per session, `file_stored` after `file_verified` (same path), `uploaded` after
  every `file_stored`, `staging_released` after `uploaded`, `clearing_from_camera` and
  `cleared_from_camera` after `file_stored`, `offloaded` after every `file_verified`;
- once_in_store: at the end, every camera file is `verified` in exactly one manifest of its
  camera with the right bytes in the store (or ends `failed`/`unstable` when the run made it
  so), and nothing else is;
- camera_clear: a file gone from a camera is verified in the store with the bytes it had, and a
  session with a failed or unstable file never cleared anything; clear_recorded: and its
  removal has its custody record (`clearing_from_camera`, the intent journalled before the
  unlink, or `cleared_from_camera`);
- custody_export / dockd_verify: `dockd custody export SID` exits 0 for every session of the
  journal, `dockd verify` exits 0 on the whole store;
- staging_released / store_temporaries / s3_uploads_finished: nothing left in staging, in the
  store's `.incoming/` or as an unfinished S3 multipart upload at the end (staging_leaked: the
  folder of a session already uploaded or found empty, told apart; staging_leaked_empty: the
  empty folder of a session closed `empty`); no_crash: no `session_crashed`, `task_crashed`,
  `daemon_failed`.

Checks named in KNOWN_BUGS fail for daemon bugs already pinned by test_campaign_findings.py
(xfail, strict): the campaign counts and reports them apart, and the CI part does not fail on
them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
for _d in ("scenarios", "usb", "mqtt"):
    if str(TESTS / _d) not in sys.path:
        sys.path.append(str(TESTS / _d))


def _load(name: str, path: Path) -> ModuleType:
    """A conftest.py loaded by path under a name of its own (its fixtures are not registered:
    only its classes and functions are used)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


scen = _load("faults_scenario_harness", TESTS / "scenarios" / "conftest.py")
s3h = _load("faults_s3_harness", TESTS / "s3" / "conftest.py")
rooth = _load("faults_root_harness", TESTS / "conftest.py")

# check name -> the daemon bug, still open, that a violation of it is (pinned by an xfail in
# test_campaign_findings.py). The others the campaign found are fixed: regression tests now.
KNOWN_BUGS: dict[str, str] = {}
CRASH_EVENTS = ("session_crashed", "task_crashed", "daemon_failed", "udev_event_failed")
FINAL_STATES = ("uploaded", "cleared", "empty")
DOCKD = [sys.executable, "-m", "dockd"]

LogEvent = dict[str, Any]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --------------------------------------------------------------------------------------------
# the evidence store, read back independently of dockd's own store code
# --------------------------------------------------------------------------------------------


class StoreView(Protocol):
    def keys(self) -> set[str]: ...
    def read(self, key: str) -> bytes | None: ...
    def temporaries(self) -> list[str]: ...


@dataclass
class FsStoreView:
    root: Path

    def keys(self) -> set[str]:
        out: set[str] = set()
        if not self.root.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            if rel == ".incoming" or rel.startswith(".incoming/"):
                continue
            for f in files:
                out.add(f if rel == "." else f"{rel}/{f}")
        return out

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def temporaries(self) -> list[str]:
        inc = self.root / ".incoming"
        return sorted(p.name for p in inc.iterdir()) if inc.is_dir() else []


@dataclass
class S3StoreView:
    client: Any
    bucket: str
    prefix: str = ""

    def keys(self) -> set[str]:
        out: set[str] = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix
        ):
            for obj in page.get("Contents", []):
                out.add(obj["Key"][len(self.prefix) :])
        return out

    def read(self, key: str) -> bytes | None:
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)[
                "Body"
            ].read()
        except self.client.exceptions.NoSuchKey:
            return None
        return body

    def temporaries(self) -> list[str]:
        ups = self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        return [u["Key"] for u in ups]


def manifests(store: StoreView, keys: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """session id -> manifest, for every session complete in the store."""
    out = {}
    for k in sorted(keys if keys is not None else store.keys()):
        parts = k.split("/")
        if len(parts) == 3 and parts[2] == "manifest.json":
            body = store.read(k)
            if body is not None:
                out[parts[1]] = json.loads(body)
    return out


# --------------------------------------------------------------------------------------------
# the journal, read-only
# --------------------------------------------------------------------------------------------


@dataclass
class JournalView:
    path: Path

    def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, args).fetchall()]
        finally:
            conn.close()

    def custody(self) -> list[dict[str, Any]]:
        rows = self.query("SELECT * FROM custody ORDER BY seq")
        for r in rows:
            r["details"] = json.loads(r["details"])
        return rows


# --------------------------------------------------------------------------------------------
# what must end where
# --------------------------------------------------------------------------------------------


@dataclass
class CamModel:
    """One camera as the run made it: what must end verified in the store (manifest path ->
    bytes), what must end failed or unstable, and where it is now (for the clear check)."""

    name: str
    expected: dict[str, bytes]
    failed: set[str] = field(default_factory=set)
    unstable: set[str] = field(default_factory=set)
    # either outcome is right (a race the run set up: a file appended to all the time may be
    # copied whole between two appends); each verified copy is checked by `snapshot`
    maybe: set[str] = field(default_factory=set)
    root: Path | None = None  # where its files are now (None: not checked for clearing)
    raw: dict[str, bytes] = field(default_factory=dict)  # manifest path -> name on the camera
    snapshot: Callable[[str, bytes], bool] | None = None  # is this a version the file had?


# --------------------------------------------------------------------------------------------
# the checker
# --------------------------------------------------------------------------------------------


@dataclass
class Checker:
    checks: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    context: str = ""

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks[name] += 1
        if not ok:
            self.violations.append(f"{name}: {self.context}{detail}")
        return ok

    # -- at every crash point and at the end ---------------------------------------------------

    def durable_state(self, j: JournalView, store: StoreView | None, staging: Path) -> None:
        """What the journal says verified/stored is so, on disk and in the store (left out
        when `store` is None: it is away)."""
        keys = store.keys() if store is not None else set()
        rows = j.query(
            "SELECT f.id, f.session_id, f.camera, f.path, f.state, f.sha256, s.state AS ss"
            " FROM files f JOIN sessions s ON s.id = f.session_id"
            " WHERE f.state IN ('verified', 'stored', 'cleared')"
        )
        for r in rows:
            where = f"{r['session_id']}/{r['path']}"
            if r["state"] == "verified":
                p = staging / r["session_id"] / str(r["id"])
                try:
                    got = sha256(p.read_bytes())
                except OSError as exc:
                    got = f"unreadable ({exc.strerror})"
                self.check(
                    "verified_means_verified",
                    got == r["sha256"],
                    f"{where}: journal says verified {str(r['sha256'])[:12]}…, staging {got[:16]}",
                )
            elif store is not None:
                key = f"{r['camera']}/{r['session_id']}/files/{r['path']}"
                body = store.read(key) if key in keys else None
                self.check(
                    "stored_means_stored",
                    body is not None and sha256(body) == r["sha256"],
                    f"{where}: journal says {r['state']}, store has "
                    + ("nothing" if body is None else sha256(body)[:12]),
                )
        if store is not None:
            self.manifests_complete(store, keys)

    def manifests_complete(self, store: StoreView, keys: set[str] | None = None) -> None:
        keys = store.keys() if keys is None else keys
        for sid, m in manifests(store, keys).items():
            cam = m.get("camera", {}).get("id", "?")
            listed = set()
            for f in m["files"]:
                if f["status"] != "verified":
                    continue
                listed.add(f["key"])
                body = store.read(f["key"]) if f["key"] in keys else None
                self.check(
                    "manifest_complete",
                    body is not None and sha256(body) == f["sha256"],
                    f"{sid}: manifest lists {f['path']} verified, store has "
                    + ("nothing" if body is None else "other bytes"),
                )
            for sc in m.get("sidecars", []):
                body = store.read(f"{cam}/{sid}/{sc['name']}")
                self.check(
                    "manifest_complete",
                    body is not None and len(body) == sc["size"] and sha256(body) == sc["sha256"],
                    f"{sid}: sidecar {sc['name']} missing or not as listed",
                )
            under = {k for k in keys if k.startswith(f"{cam}/{sid}/files/")}
            self.check(
                "manifest_complete",
                under == listed,
                f"{sid}: objects not in the manifest {sorted(under - listed)[:5]}",
            )

    def told(
        self,
        j: JournalView,
        store: StoreView | None,
        events: Iterable[LogEvent],
        mqtt: Iterable[tuple[str, Any]] = (),
    ) -> None:
        """Everything the daemon told (logs, MQTT) is backed by the journal as it is now (and,
        for an upload, by the manifest in the store, unless `store` is None: away)."""
        recs: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in j.custody():
            if r["session_id"] is None:
                continue
            recs[(r["session_id"], r["event"], str(r["details"].get("path", "")))].append(r)
        keys = store.keys() if store is not None else None

        def backed(name: str, sid: Any, event: str, path: str, at: str | None, ok=None) -> None:
            found = recs.get((str(sid), event, path), [])
            if ok is not None:
                found = [r for r in found if ok(r)]
            good = bool(found)
            detail = f"{sid} {path}: told, but no custody `{event}` in the journal"
            if good and at:
                good = when(found[0]["at"]) <= when(at)
                detail = f"{sid} {path}: told at {at}, custody `{event}` at {found[0]['at']}"
            self.check(name, good, detail)

        def not_interrupted(r: dict[str, Any]) -> bool:
            """An `offloaded` record that makes a camera safe to undock: not interrupted, and
            no file of the session left pending (every one verified, or given up)."""
            d = r["details"]
            return d.get("outcome") != "interrupted" and not d.get("files", {}).get("pending")

        for e in events:
            ev, sid, at = e.get("event"), e.get("session_id"), e.get("timestamp")
            if ev == "file_verified":
                backed("told_file_verified", sid, "file_verified", e.get("path", ""), at)
            elif ev == "file_stored":
                backed("told_file_stored", sid, "file_stored", e.get("path", ""), at)
            elif ev == "safe_to_undock":
                backed("told_safe_to_undock", sid, "offloaded", "", at, not_interrupted)
            elif ev == "session_uploaded":
                backed("told_uploaded", sid, "uploaded", "", at)
                cam = e.get("camera")
                if keys is not None:
                    self.check(
                        "told_uploaded",
                        f"{cam}/{sid}/manifest.json" in keys,
                        f"{sid}: told uploaded, no manifest in the store",
                    )
            elif ev == "camera_state" and sid:
                if e.get("state") == "uploaded":
                    backed("told_uploaded", sid, "uploaded", "", at)
                elif e.get("state") == "offloaded" and e.get("safe_to_undock"):
                    backed("told_safe_to_undock", sid, "offloaded", "", at, not_interrupted)
        for topic, p in mqtt:
            if not isinstance(p, dict):
                continue
            sid, at = p.get("session_id"), p.get("at") or p.get("updated_at")
            if topic.endswith("/events"):
                ev = p.get("event")
                if ev == "safe_to_undock":
                    backed("told_mqtt", sid, "offloaded", "", at, not_interrupted)
                elif ev == "session_uploaded":
                    backed("told_mqtt", sid, "uploaded", "", at)
                elif ev in ("file_verified", "file_stored"):
                    backed("told_mqtt", sid, ev, p.get("path", ""), at)
            elif "/cameras/" in topic and sid:
                if p.get("state") == "uploaded":
                    backed("told_mqtt", sid, "uploaded", "", at)
                elif p.get("safe_to_undock") and p.get("state") == "offloaded":
                    backed("told_mqtt", sid, "offloaded", "", at, not_interrupted)

    # -- at the end ---------------------------------------------------------------------------

    def custody_order(self, j: JournalView) -> None:
        by_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in j.custody():
            if r["session_id"] is not None:
                by_session[r["session_id"]].append(r)
        for sid, rs in by_session.items():
            first: dict[tuple[str, str], int] = {}
            last: dict[str, int] = {}
            for r in rs:
                k = (r["event"], str(r["details"].get("path", "")))
                first.setdefault(k, r["seq"])
                last[r["event"]] = r["seq"]
            for (ev, path), seq in first.items():
                if ev == "file_stored":
                    v = first.get(("file_verified", path))
                    self.check(
                        "custody_order",
                        v is not None and v < seq,
                        f"{sid} {path}: file_stored without an earlier file_verified",
                    )
                if ev in ("cleared_from_camera", "clearing_from_camera"):
                    s = first.get(("file_stored", path))
                    self.check(
                        "custody_order",
                        s is not None and s < seq,
                        f"{sid} {path}: cleared from the camera before stored",
                    )
            for ev, after in (
                ("uploaded", ("file_stored", "sealed")),
                ("staging_released", ("uploaded", "file_stored")),
                ("offloaded", ("file_verified",)),
            ):
                if ev not in last:
                    continue
                seq = first[(ev, "")]
                for a in after:
                    if a in last:
                        self.check(
                            "custody_order",
                            last[a] < seq,
                            f"{sid}: `{ev}` (seq {seq}) before a `{a}` (seq {last[a]})",
                        )
            if "staging_released" in last:
                self.check(
                    "custody_order", "uploaded" in last, f"{sid}: staging released, not uploaded"
                )

    def once_in_store(self, store: StoreView, cams: Iterable[CamModel]) -> None:
        keys = store.keys()
        ms = manifests(store, keys)
        for cam in cams:
            seen: Counter[str] = Counter()
            outcome: dict[str, set[str]] = defaultdict(set)
            for sid, m in ms.items():
                if m["camera"]["id"] != cam.name:
                    continue
                for f in m["files"]:
                    outcome[f["path"]].add(f["status"])
                    if f["status"] != "verified":
                        continue
                    seen[f["path"]] += 1
                    want = cam.expected.get(f["path"])
                    body = store.read(f["key"])
                    if f["path"] in cam.maybe and cam.snapshot is not None:
                        self.check(
                            "once_in_store",
                            body is not None
                            and sha256(body) == f["sha256"]
                            and cam.snapshot(f["path"], body),
                            f"{cam.name}/{sid}: {f['path']}: not a version the camera had",
                        )
                    self.check(
                        "once_in_store",
                        f["path"] in cam.expected or f["path"] in cam.maybe,
                        f"{cam.name}/{sid}: {f['path']} verified, not a file the camera had",
                    )
                    if want is not None:
                        self.check(
                            "once_in_store",
                            f["sha256"] == sha256(want) and body is not None and body == want,
                            f"{cam.name}/{sid}: {f['path']}: not the camera's bytes",
                        )
            for path in cam.expected:
                self.check(
                    "once_in_store",
                    seen[path] == 1,
                    f"{cam.name}: {path} verified {seen[path]} times across manifests",
                )
            for path in cam.failed | cam.unstable:
                want = "failed" if path in cam.failed else "unstable"
                ok = want in outcome[path] and seen[path] == 0
                if path in cam.maybe:  # a race the run set: copied whole at a quiet moment
                    ok = bool(outcome[path])
                self.check(
                    "once_in_store",
                    ok,
                    f"{cam.name}: {path} should end {want}, manifests say {sorted(outcome[path])}",
                )

    def camera_clear(self, j: JournalView, store: StoreView, cams: Iterable[CamModel]) -> None:
        stored: dict[tuple[str, str], str] = {}
        for r in j.query(
            "SELECT camera, path, sha256 FROM files WHERE state IN ('stored','cleared')"
        ):
            stored[(r["camera"], r["path"])] = r["sha256"]
        cleared_by_session: dict[str, int] = Counter()
        bad_sessions = set()
        for r in j.custody():
            if r["event"] in ("cleared_from_camera", "clearing_from_camera"):
                cleared_by_session[r["session_id"]] += 1
            if r["event"] == "error" and r["details"].get("outcome") in ("failed", "unstable"):
                bad_sessions.add(r["session_id"])
        for sid in bad_sessions:
            self.check(
                "camera_clear",
                cleared_by_session[sid] == 0,
                f"{sid}: a file failed or was unstable, yet {cleared_by_session[sid]} cleared",
            )
        recorded = {
            (r["camera"], r["path"])
            for r in j.query(
                "SELECT s.camera, json_extract(c.details, '$.path') AS path FROM custody c"
                " JOIN sessions s ON s.id = c.session_id"
                " WHERE c.event IN ('cleared_from_camera', 'clearing_from_camera')"
            )
        }
        for cam in cams:
            if cam.root is None:
                continue
            for path, data in cam.expected.items():
                name = cam.raw.get(path, path.encode())
                if os.path.lexists(os.path.join(os.fsencode(cam.root), name)):
                    continue
                self.check(
                    "camera_clear",
                    stored.get((cam.name, path)) == sha256(data),
                    f"{cam.name}: {path} gone from the camera, not verified in the store",
                )
                self.check(
                    "clear_recorded",
                    (cam.name, path) in recorded,
                    f"{cam.name}: {path} gone from the camera, no custody record of its removal",
                )

    def leftovers(self, staging: Path, store: StoreView, j: JournalView | None = None) -> None:
        """Nothing left in staging (lost+found: the staging filesystem's own, when it has one)
        nor in the store's temporaries. A session folder left behind by a session that is
        `uploaded` with no `staging_released` record is told apart (`staging_leaked`): the
        release was interrupted and never retried (a bug the campaign found, fixed since: the
        start releases them); `staging_leaked_empty` when it is the empty folder of a session
        that ended `empty` (an orphan closed at start: a known bug); anything else left is
        `staging_released`."""
        dirs = []
        if staging.is_dir():
            dirs = sorted(p.name for p in staging.iterdir() if p.name != "lost+found")
        leaked: dict[str, str] = {}
        if j is not None and dirs:
            finished = {
                s["id"]: s["state"]
                for s in j.query(
                    "SELECT id, state FROM sessions WHERE state IN ('uploaded', 'cleared', 'empty')"
                )
            }
            released = {r["session_id"] for r in j.custody() if r["event"] == "staging_released"}
            leaked = {d: finished[d] for d in dirs if d in finished and d not in released}
        for d, state in sorted(leaked.items()):
            n = len(list((staging / d).iterdir()))
            name = "staging_leaked_empty" if state == "empty" and n == 0 else "staging_leaked"
            self.check(
                name,
                False,
                f"staging/{d} ({n} files) left behind by a session that is {state}",
            )
        left = [d for d in dirs if d not in leaked]
        self.check("staging_released", left == [], f"staging not released: {left[:8]}")
        tmps = store.temporaries()
        if isinstance(store, S3StoreView):
            self.check("s3_uploads_finished", tmps == [], f"multipart uploads left: {tmps[:8]}")
        else:
            self.check("store_temporaries", tmps == [], f"store temporaries left: {tmps[:8]}")

    def no_crash(self, events: Iterable[LogEvent]) -> None:
        crashed = [e for e in events if e.get("event") in CRASH_EVENTS]
        self.check("no_crash", not crashed, json.dumps(crashed)[:1500])

    def cli(self, config: Path, sessions: list[str], env: dict[str, str] | None = None) -> None:
        """`dockd verify --json` on the whole store, and `dockd custody export` for every
        session of the journal (the CLI's own `main`, in one process for all of them)."""
        e = {k: v for k, v in (env or os.environ).items() if k != "DOCKD_CONFIG"}
        r = subprocess.run(
            [*DOCKD, "verify", "-c", str(config), "--json"],
            capture_output=True, text=True, env=e, check=False, timeout=300,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            report = json.loads(r.stdout)
        except ValueError:
            report = {}
        bad = [s for s in report.get("sessions", []) if s.get("result") != "ok"]
        self.check(
            "dockd_verify",
            r.returncode == 0 and report.get("ok") is True,
            f"exit {r.returncode}: {json.dumps(bad)[:1500]} {r.stderr[-800:]}",
        )
        if not sessions:
            return
        script = (
            "import contextlib, io, sys\n"
            "from dockd.cli import main\n"
            "for sid in sys.argv[2:]:\n"
            "    out, err = io.StringIO(), io.StringIO()\n"
            "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
            "        rc = main(['custody', 'export', '-c', sys.argv[1], sid])\n"
            "    lines = [x for x in out.getvalue().splitlines() if x.strip()]\n"
            "    print(sid, rc, len(lines), err.getvalue().strip().replace('\\n', ' '))\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", script, str(config), *sessions],
            capture_output=True, text=True, env=e, check=False, timeout=300,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        results = {ln.split(" ", 1)[0]: ln for ln in r.stdout.splitlines() if ln.strip()}
        for sid in sessions:
            line = results.get(sid, "")
            parts = line.split(" ", 3)
            ok = len(parts) >= 3 and parts[1] == "0" and int(parts[2]) > 0
            self.check("custody_export", ok, f"{sid}: {line or r.stderr[-500:]}")


def sessions_of(j: JournalView) -> list[dict[str, Any]]:
    return j.query("SELECT id, camera, state FROM sessions ORDER BY id")


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
