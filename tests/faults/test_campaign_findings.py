"""What the fault campaign and the untrusted-content fuzzing found in the daemon, each pinned by
the smallest real run that shows it.

Each was fixed in the daemon; the tests stay as regression tests:
- a kill -9 between `uploaded` (or `empty`) and the removal of the session's staging folder
  left the folder for ever;
- two cameras that fit staging alone but not together waited for each other for ever;
- a kill -9 between removing a file from the camera and recording it left no custody record
  of the removal (now the intent, `clearing_from_camera`, is recorded first);
- a name holding U+2028/U+2029/U+0085 made `dockd verify` misread custody.jsonl;
- a camera file name the store cannot hold (percent-encoded longer than NAME_MAX) failed the
  whole session; now only that file is recorded failed (left on the camera, named in the
  manifest) and the rest is uploaded;
- a filesystem of its own mounted at state_dir/staging lost its `lost+found` at every start;
- a session a crash left offloading, closed `empty` at the next start because its camera was
  gone, kept its (empty) staging folder until the start after;
- a store that went away in the middle of a put kept the put's temporary in `.incoming/`
  until the next start (it was unlinked by a path that no longer led to it);
- the start-up release of finished sessions' staging took the daemon down (exit 1 before it
  was ready) when a folder it was removing vanished meanwhile (the session that owns it
  removed it itself): a race the long campaign hit, pinned at the exact point.

The exact points are placed with the power-cut layer used as a freeze (`arm(..., drop=False)`):
a kill -9 of the daemon at one exact filesystem operation, that operation not done, nothing
else lost — no sleeps, no races.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults_support import FsStoreView, JournalView, scen
from powercut_fs import Op, PowerCutFS

KIB = 1024
MIB = 1024 * KIB


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Any]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    s = scen.Site(tmp_path)
    layers: list[PowerCutFS] = []
    s.layers = layers
    try:
        yield s
    finally:
        s.kill_all()
        for fc in s.fuse_cameras:
            fc.stop()
        for layer in layers:
            layer.unmount()
        s.gates.close()


def layer_at(site: Any, backing: Path, mountpoint: Path) -> PowerCutFS:
    layer = PowerCutFS(backing, mountpoint)
    layer.mount()
    site.layers.append(layer)
    return layer


def freeze_and_kill(layer: PowerCutFS, proc: Any, when: Any) -> None:
    """Arm: at the first op `when` accepts, SIGKILL the daemon (that op not done)."""
    layer.arm(when, lambda: os.kill(proc.pid, signal.SIGKILL), drop=False)


def settle(layer: PowerCutFS, proc: Any, now_at: Path | None = None) -> None:
    """After the freeze: the daemon dead, the layer mounted again (at `now_at` if the folder
    holding it was renamed meanwhile)."""
    assert layer.cut_event.wait(60), "the daemon never reached the operation"
    proc.kill9()
    layer.unmount()  # a freeze, not a cut: everything written stays
    layer.rebuild()
    if now_at is not None:
        layer.mountpoint = now_at
    layer.mount()


def small_ext4_at(where: Path, image: Path, size: int = 6 * MIB) -> None:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 missing")
    where.mkdir(parents=True, mode=0o700, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "0", "-b", "1024", str(image)],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True)


def wait_stored(site: Any, cameras: dict[str, Any], timeout: float = 30) -> None:
    """Until every file of these cameras is stored and every session is finished."""
    j = JournalView(site.state / "journal.sqlite3")
    want = {(c, scen.encode_path(rel)) for c, cam in cameras.items() for rel in cam.files}
    deadline = time.monotonic() + timeout
    while True:
        rows = j.query("SELECT camera, path FROM files WHERE state IN ('stored', 'cleared')")
        busy = j.query(
            "SELECT id FROM sessions WHERE state NOT IN ('uploaded', 'cleared', 'empty')"
        )
        if want <= {(r["camera"], r["path"]) for r in rows} and not busy:
            return
        assert time.monotonic() < deadline, f"not all stored in {timeout} s: {busy}"
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------
# fixed: regression tests
# --------------------------------------------------------------------------------------------


def test_kill9_between_uploaded_and_staging_release_still_releases_staging(site: Any) -> None:
    layer = layer_at(site, site.base / "state.backing", site.state)
    cam = site.camera("X6LEAK001", {"DCIM/0001.MP4": 300 * KIB, "DCIM/0002.MP4": 5_000}, seed=1)
    proc = site.start()

    def release_starts(op: Op) -> bool:  # rmtree's first unlink in staging/<session>/
        return op.name == "unlink" and op.path.startswith("staging/")

    freeze_and_kill(layer, proc, release_starts)
    cam.dock()
    settle(layer, proc)
    j = JournalView(site.state / "journal.sqlite3")
    (s,) = j.query("SELECT id, state FROM sessions")
    assert s["state"] == "uploaded"  # the manifest is in the store: the session is complete
    assert [p.name for p in (site.state / "staging").iterdir()] == [s["id"]]
    proc = site.start()
    proc.wait_for("staging_released_after_restart", lambda e: e["session_id"] == s["id"])
    assert proc.sigterm() == 0
    left = [p for p in site.staging_leftovers() if p.parent.name != "staging"]
    assert left == [] and not (site.state / "staging" / s["id"]).exists()
    assert any(r["event"] == "staging_released" and r["session_id"] == s["id"] for r in j.custody())


def test_two_cameras_filling_staging_together_both_finish(site: Any) -> None:
    staging = site.state / "staging"
    small_ext4_at(staging, site.base / "staging.img")
    try:
        free = shutil.disk_usage(staging).free
        a = site.camera("X6DEADA", {f"DCIM/{i}.MP4": free // 5 for i in range(4)}, seed=3)
        b = site.camera("X6DEADB", {f"DCIM/{i}.MP4": free // 5 for i in range(4)}, seed=4)
        site.start()
        a.dock()
        b.dock()
        wait_stored(site, {"X6DEADA": a, "X6DEADB": b})
    finally:
        site.kill_all()
        subprocess.run(["umount", str(staging)], check=False)


def test_kill9_mid_clear_leaves_every_removed_file_in_custody(site: Any) -> None:
    site.configure(camera={"clear": "after_upload"})
    cam = site.camera("X6CLEAR01", {"MISC/VER.TXT": 12}, seed=5)
    files = {"0001.MP4": os.urandom(200 * KIB), "0002.MP4": os.urandom(3 * KIB)}
    backing = site.base / "camera-dcim"
    backing.mkdir()
    for name, data in files.items():
        (backing / name).write_bytes(data)
    (cam.aside_root / "DCIM").mkdir()
    layer = layer_at(site, backing, cam.aside_root / "DCIM")  # the camera's DCIM, passed through
    proc = site.start()
    # the first file's removal is done; the daemon dies as it fsyncs the camera directory
    freeze_and_kill(layer, proc, lambda op: op.name == "fsyncdir")
    cam.dock()
    settle(layer, proc, cam.root / "DCIM")
    gone = sorted(n for n in files if not (cam.root / "DCIM" / n).exists())
    assert gone, "nothing was removed before the kill"
    store = FsStoreView(site.evidence)
    keys = store.keys()
    for n in gone:  # no evidence lost: each removed file is in the store
        assert any(k.endswith(f"/files/DCIM/{n}") and store.read(k) == files[n] for k in keys)
    proc = site.start()
    proc.wait_for("dock_status")
    assert proc.sigterm() == 0
    told = {
        r["details"]["path"]
        for r in JournalView(site.state / "journal.sqlite3").custody()
        if r["event"] in ("clearing_from_camera", "cleared_from_camera")
    }
    assert {f"DCIM/{n}" for n in gone} <= told, "a removal from the camera has no record"


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\u0085"])
def test_name_with_a_unicode_line_separator_verifies(site: Any, sep: str) -> None:
    cam = site.camera("X6SEP0001", {f"DCIM/a{sep}b.MP4": 100, "DCIM/0001.MP4": 10}, seed=6)
    proc = site.start()
    cam.dock()
    proc.wait_for("session_uploaded")
    rc, report = site.verify()
    assert rc == 0 and report["ok"] is True, report


# --------------------------------------------------------------------------------------------
def test_a_name_the_store_cannot_hold_costs_only_itself(site: Any) -> None:
    name = b"DCIM/" + b"\xff" * 100 + b".MP4"  # 104 bytes on the camera, 305 encoded
    cam = site.camera("X6LONG001", {name: 1000, b"DCIM/0001.MP4": 10}, seed=2)
    proc = site.start()
    cam.dock()
    sid = proc.wait_for("safe_to_undock")["session_id"]
    end = proc.wait_for(  # uploaded, or in error (upload_failed)
        "camera_state", lambda e: e["session_id"] == sid and e["state"] in ("uploaded", "error")
    )
    assert end["state"] == "uploaded", end
    m = site.manifest("X6LONG001", sid)
    assert [f["path"] for f in m["files"] if f["status"] == "verified"] == ["DCIM/0001.MP4"]
    (long,) = [f for f in m["files"] if f["status"] != "verified"]
    assert long["status"] == "failed" and "store" in long["error"], long
    assert long["path"] == scen.encode_path(name)
    assert (cam.root / os.fsdecode(name)).is_file()  # left on the camera
    rc, report = site.verify()
    assert rc == 0 and report["ok"] is True, report


def test_a_staging_filesystem_keeps_its_lost_and_found(site: Any) -> None:
    staging = site.state / "staging"
    small_ext4_at(staging, site.base / "staging.img")
    try:
        assert (staging / "lost+found").is_dir()
        proc = site.start()
        assert proc.sigterm() == 0
        assert (staging / "lost+found").is_dir(), "lost+found of the staging filesystem removed"
    finally:
        site.kill_all()
        subprocess.run(["umount", str(staging)], check=False)


def test_orphan_session_closed_empty_at_start_leaves_no_staging_folder(site: Any) -> None:
    layer = layer_at(site, site.base / "state.backing", site.state)
    cam = site.camera("X6ORPH001", {"DCIM/0001.MP4": 300 * KIB}, seed=7)
    proc = site.start()
    # the session's folder is made; the daemon dies as it creates the first copy in it
    freeze_and_kill(layer, proc, lambda op: op.name == "create" and op.path.startswith("staging"))
    cam.dock()
    settle(layer, proc)
    cam.undock()  # taken out while the daemon is down
    (s,) = JournalView(site.state / "journal.sqlite3").query("SELECT id, state FROM sessions")
    assert s["state"] == "offloading" and (site.state / "staging" / s["id"]).is_dir()
    proc = site.start()
    proc.wait_for("session_closed_after_restart", lambda e: e["session_id"] == s["id"])
    assert proc.sigterm() == 0
    assert not (site.state / "staging" / s["id"]).exists(), "staging folder of an empty session"


# --------------------------------------------------------------------------------------------
# still open
# --------------------------------------------------------------------------------------------


def test_store_away_mid_put_leaves_no_temporary_behind(site: Any) -> None:
    # a slow upload (bandwidth_limit) keeps the put's temporary open for seconds
    site.configure(upload={"bandwidth_limit": "300KB/s", "concurrency": 1})
    cam = site.camera("X6TEMP001", {"DCIM/0001.MP4": 1 * MIB}, seed=8)
    proc = site.start()
    cam.dock()
    incoming = site.evidence / ".incoming"
    deadline = time.monotonic() + 30
    while not (incoming.is_dir() and any(incoming.glob("*.tmp"))):
        assert time.monotonic() < deadline, "no upload began"
        time.sleep(0.01)
    away = site.base / "evidence.away"
    mark = proc.mark()
    site.evidence.rename(away)  # mid-put
    proc.wait_for("store_unreachable", after=mark)
    away.rename(site.evidence)
    proc.wait_for("session_uploaded")
    assert proc.sigterm() == 0
    assert site.incoming() == [], "a temporary of an interrupted put left in the store"


def test_a_staging_folder_gone_during_the_startup_release_does_not_stop_the_daemon(
    site: Any,
) -> None:
    layer = layer_at(site, site.base / "state.backing", site.state)
    # nothing new on the camera the second time: its second session ends `empty`
    cam = site.camera("X6RACE001", {"DCIM/0001.MP4": 10_000}, seed=9)
    proc = site.start()
    cam.dock()
    proc.wait_for("session_uploaded")
    cam.undock()
    proc.wait_for("camera_state", lambda e: e["state"] == "undocked")
    # the empty session's folder is left by a kill -9 as it starts removing it
    freeze_and_kill(layer, proc, lambda op: op.name in ("rmdir", "unlink"))
    cam.dock()
    settle(layer, proc)
    j = JournalView(site.state / "journal.sqlite3")
    empty = [s["id"] for s in j.query("SELECT id FROM sessions WHERE state = 'empty'")]
    assert len(empty) == 1 and (site.state / "staging" / empty[0]).is_dir()
    backing = site.base / "state.backing" / "staging" / empty[0]
    # at the next start the release opens the folder to remove it; meanwhile it is gone
    layer.hook(
        lambda op: op.name == "opendir" and op.path == f"staging/{empty[0]}",
        lambda op: backing.rmdir(),
    )
    proc = site.start()  # fails today: dockd exits 1 before it is ready
    assert proc.sigterm() == 0
