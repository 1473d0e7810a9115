"""Whole-daemon scenarios of SPEC §6 "Interruptions": the daemon killed (-9) or stopped
(SIGTERM) at chosen points, the camera undocked mid-file. Whatever happens: nothing lost,
nothing reported verified that is not, each file in the store exactly once, the work resumes.

The points are placed exactly: the camera's DCIM is a FUSE filesystem the test serves, which can
hold the daemon's read of a file at a chosen byte and answer it with an error; the upload is held
with a kernel lease on a staged copy (see conftest).
"""

from __future__ import annotations

import errno
import stat
import time
from pathlib import Path

import pytest
from scenario_fusecam import Hold

from conftest import (
    FLUSH_HOLD_S,
    Camera,
    DockdProcess,
    Site,
    assert_each_file_once_in_store,
    assert_store_and_custody_ok,
    encode_path,
    sha256,
    wait_all_uploaded,
)

KIB = 1024
MIB = 1024 * KIB
FILE1 = b"DCIM/100CAM/0001.MP4"
FILE2 = b"DCIM/100CAM/0002.MP4"
HOLD2_AT = 1 * MIB + 64 * KIB  # where file 2's copy is held: well inside it
# A read error is retried with a backoff that an undock or a stop cuts short; with this many
# attempts the backoff outlasts the moment the daemon takes to notice either (it logs nothing
# then), so the copy can only end through the undock or the stop.
READ_ATTEMPTS = 20


def interrupted_camera(site: Site, name: str, seed: int) -> Camera:
    # two files copied at once (the default), pinned: the holds below count on it
    site.configure(offload={"copy_workers": 2})
    return site.fuse_camera(
        name,
        {
            "100CAM/0001.MP4": 2 * MIB,
            "100CAM/0002.MP4": 3 * MIB + 17,
            "100CAM/0003.MP4": 1 * MIB,
            "101CAM/0004.MP4": 512 * KIB,
            "GPS/0001.json": 2_000,
        },
        symlinks={"LATEST.MP4": "DCIM/100CAM/0001.MP4"},
        seed=seed,
    )


def dock_and_hold_mid_file2(proc: DockdProcess, cam: Camera) -> tuple[str, list[Hold]]:
    """Dock `cam` and hold the daemon with file 1 verified and committed to the journal, one
    copy worker in the middle of file 2 and the other at the first read of file 3. Every later
    file is held at its first byte too, so nothing moves until the test says so. Returns (session
    id, the holds on files 2 and after)."""
    order = cam.in_path_order()
    assert order[:2] == [FILE1, FILE2]
    h1 = cam.hold(FILE1, 0)
    rest = [cam.hold(FILE2, HOLD2_AT)] + [cam.hold(p, 0) for p in order[2:]]
    cam.dock()
    h1.wait()
    rest[0].wait()
    time.sleep(FLUSH_HOLD_S)  # makes the journal commit after file 1 certain (see conftest)
    h1.release()
    rest[1].wait()  # the worker done with file 1 took file 3
    e = proc.wait_for("file_verified", lambda e: e["path"] == encode_path(FILE1))
    assert not proc.all("file_verified", lambda e: e["path"] != encode_path(FILE1))
    return e["session_id"], rest


def staged(site: Site, session_id: str, path: str) -> Path:
    rows = site.query("SELECT id FROM files WHERE session_id = ? AND path = ?", session_id, path)
    return site.state / "staging" / session_id / str(rows[0]["id"])


def assert_verified_means_verified(site: Site, cam: Camera, session_id: str) -> None:
    """Every file the journal holds verified has its whole, right bytes in staging."""
    expected = cam.expected()
    for r in site.query(
        "SELECT id, path, sha256 FROM files WHERE session_id = ? AND state = 'verified'",
        session_id,
    ):
        assert r["sha256"] == expected[r["path"]], r["path"]
        p = site.state / "staging" / session_id / str(r["id"])
        assert sha256(p.read_bytes()) == r["sha256"], f"{p}: not what was verified"
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


KILL_POINTS = [
    "offload_started",  # session open, walked, held in the first read of file 1
    "mid_file",  # file 1 verified and journalled, held in the middle of file 2
    "safe_to_undock",  # every file verified in staging, none in the store (store away)
    "mid_upload",  # file 1 in the store, held at the upload's open of file 2's staged copy
    "session_uploaded",  # all done
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill9_at_several_points_then_restart_finishes_every_file_verified_once(
    site: Site, point: str
) -> None:
    site.configure(upload={"concurrency": 1})
    cam = interrupted_camera(site, "X6KILL001", seed=20)
    order = [encode_path(p) for p in cam.in_path_order()]
    away = site.base / "evidence.away"
    proc = site.start()

    if point == "offload_started":
        holds = [cam.hold(p, 0) for p in cam.in_path_order()]
        cam.dock()
        holds[0].wait()
        holds[1].wait()
        sid = proc.wait_for("camera_walked")["session_id"]
        assert set(site.file_states(sid).values()) == {"pending"}
    elif point == "mid_file":
        sid, _ = dock_and_hold_mid_file2(proc, cam)
        states = site.file_states(sid)
        assert states.pop(order[0]) == "verified"
        assert set(states.values()) == {"pending"}
    elif point in ("safe_to_undock", "mid_upload"):
        site.evidence.rename(away)
        cam.dock()
        sid = proc.wait_for("safe_to_undock")["session_id"]
        proc.wait_for("store_unreachable")
        assert set(site.file_states(sid).values()) == {"verified"}
        if point == "mid_upload":
            assert_verified_means_verified(site, cam, sid)  # (reads the copy about to be gated)
            g = site.gates.gate(staged(site, sid, order[1]))
            away.rename(site.evidence)
            g.wait_blocked()
            states = site.file_states(sid)
            assert states.pop(order[0]) == "stored"
            assert set(states.values()) == {"verified"}
            assert (site.evidence / cam.name / sid / "files" / order[0]).is_file()
            assert not (site.evidence / cam.name / sid / "files" / order[1]).exists()
    else:
        cam.dock()
        sid = proc.wait_for("session_uploaded")["session_id"]
    if point != "mid_upload":  # (see above: opening the gated copy would wait on the gate)
        assert_verified_means_verified(site, cam, sid)
    before = site.session_state(sid)

    proc.kill9()
    if point == "mid_file":  # the copies in hand were left as they were, under temporary names
        partial = staged(site, sid, order[1]).with_suffix(".partial")
        assert 0 < partial.stat().st_size <= HOLD2_AT
        assert staged(site, sid, order[2]).with_suffix(".partial").stat().st_size == 0
    if away.exists():
        away.rename(site.evidence)

    proc = site.start()
    opened = proc.wait_for("session_opened", lambda e: e.get("camera") == cam.name)
    if before == "offloading":  # camera still docked: the same session goes on
        assert opened["resumed"] is True
        assert opened["session_id"] == sid
    else:  # a new session, with nothing new to offload (it stays out of the store)
        assert opened["resumed"] is False
        assert opened["session_id"] != sid
        walked = proc.wait_for("camera_walked", lambda e: e["session_id"] == opened["session_id"])
        assert walked["new_files"] == 0
        end = proc.wait_for("safe_to_undock", lambda e: e["session_id"] == opened["session_id"])
        assert end["outcome"] == "empty"
    ids = wait_all_uploaded(site, proc, cam.name)
    assert ids == [sid]

    manifests = assert_each_file_once_in_store(site, cam)
    for m in manifests.values():
        assert {(s["path"], s["reason"]) for s in m["skipped"]} == {("LATEST.MP4", "symlink")}
    # the custody log tells of each file verified once, with the bytes that are in the store
    expected = cam.expected()
    verified_records = [
        r for s in ids for r in site.custody_rows(s) if r["event"] == "file_verified"
    ]
    assert sorted(r["details"]["path"] for r in verified_records) == sorted(expected)
    assert all(r["details"]["sha256"] == expected[r["details"]["path"]] for r in verified_records)
    assert_store_and_custody_ok(site, ids)


@pytest.mark.parametrize("how", ["renamed_away", "device_gone"])
def test_undock_mid_file_then_redock_offloads_the_rest_exactly_once(site: Site, how: str) -> None:
    """The camera leaves in the middle of file 2. "renamed_away": its folder disappears and its
    reads fail (EIO) until the daemon notices; "device_gone": its reads fail as a FUSE driver's
    do when the device is gone (ENOTCONN), and its folder disappears too."""
    site.configure(offload={"read_attempts": READ_ATTEMPTS})
    cam = interrupted_camera(site, "X6UNDOCK1", seed=30)
    order = [encode_path(p) for p in cam.in_path_order()]
    proc = site.start()
    sid1, holds = dock_and_hold_mid_file2(proc, cam)
    # hold uploads too, so the interrupted session can be looked at before it is uploaded
    away = site.base / "evidence.away"
    site.evidence.rename(away)

    cam.undock()
    for h in holds:
        h.release(errno.EIO if how == "renamed_away" else errno.ENOTCONN)
    proc.wait_for("camera_gone", lambda e: e["session_id"] == sid1)
    proc.wait_for("camera_state", lambda e: e["session_id"] == sid1 and e["state"] == "undocked")

    # ended interrupted with what was verified; the rest is abandoned, not failed
    assert site.session_state(sid1) == "interrupted"
    states = site.file_states(sid1)
    assert states == {order[0]: "verified", **dict.fromkeys(order[1:], "abandoned")}
    assert not proc.all("file_failed")
    assert_verified_means_verified(site, cam, sid1)
    staging = site.state / "staging" / sid1
    assert [p.name for p in staging.iterdir()] == [staged(site, sid1, order[0]).name], (
        "a partial or unverified copy was left in staging"
    )
    assert stat.S_IMODE(staging.stat().st_mode) == 0o700
    offloaded = [r for r in site.custody_rows(sid1) if r["event"] == "offloaded"]
    assert [r["details"]["outcome"] for r in offloaded] == ["interrupted"]
    proc.wait_for("store_unreachable")
    # the source reports the undock (after watchdog's wait for a matching rename)
    site.wait_status(lambda st: st["cameras_docked"] == [])
    assert len([r for r in site.custody_rows(sid1) if r["event"] == "undocked"]) == 1

    # the store comes back: the interrupted session is uploaded with what was verified
    away.rename(site.evidence)
    proc.wait_for("session_uploaded", lambda e: e.get("session_id") == sid1)
    m1 = site.manifest(cam.name, sid1)
    assert m1["outcome"] == "interrupted"
    assert [f["path"] for f in m1["files"]] == [order[0]]
    assert {(s["path"], s["reason"]) for s in m1["skipped"]} == {
        ("LATEST.MP4", "symlink"),
        *((p, "camera_undocked_before_copy") for p in order[1:]),
    }

    # docked again (the camera reads well again): a new session takes only what was not verified
    assert cam.fuse is not None
    cam.fuse.reset()
    mark = proc.mark()
    cam.dock()
    opened = proc.wait_for("session_opened", after=mark)
    sid2 = opened["session_id"]
    assert sid2 != sid1 and opened["resumed"] is False
    walked = proc.wait_for("camera_walked", lambda e: e["session_id"] == sid2)
    assert walked["new_files"] == len(order) - 1
    proc.wait_for("session_uploaded", lambda e: e.get("session_id") == sid2)
    m2 = site.manifest(cam.name, sid2)
    assert m2["outcome"] == "complete"
    assert [f["path"] for f in m2["files"]] == order[1:]

    assert_each_file_once_in_store(site, cam)
    assert_store_and_custody_ok(site, [sid1, sid2])


def test_sigterm_mid_offload_exits_0_and_restart_resumes_same_session(site: Site) -> None:
    site.configure(offload={"read_attempts": READ_ATTEMPTS})
    cam = interrupted_camera(site, "X6TERM001", seed=40)
    order = [encode_path(p) for p in cam.in_path_order()]
    proc = site.start()
    sid, holds = dock_and_hold_mid_file2(proc, cam)

    started = time.monotonic()
    proc.terminate()
    proc.wait_for("daemon_stopping")
    # the reads in hand fail (and are retried) until the stop reaches the session
    for h in holds:
        h.release(errno.EIO)
    rc = proc.wait_exit(30)
    assert rc == 0, proc.tail()
    assert time.monotonic() - started < 30
    proc.wait_for("session_parked", lambda e: e["session_id"] == sid)
    proc.wait_for("daemon_stopped")
    assert site.session_state(sid) == "offloading"
    assert site.file_states(sid) == {order[0]: "verified", **dict.fromkeys(order[1:], "pending")}
    assert_verified_means_verified(site, cam, sid)
    assert not list((site.state / "staging" / sid).glob("*.partial"))

    assert cam.fuse is not None
    cam.fuse.reset()
    proc = site.start()
    opened = proc.wait_for("session_opened")
    assert opened["session_id"] == sid
    assert opened["resumed"] is True
    proc.wait_for("safe_to_undock", lambda e: e["session_id"] == sid)
    proc.wait_for("session_uploaded", lambda e: e.get("session_id") == sid)
    assert [s["id"] for s in site.sessions()] == [sid]
    docked = [r for r in site.custody_rows(sid) if r["event"] == "docked"]
    assert [r["details"].get("resumed", False) for r in docked] == [False, True]
    # each file was read from the camera and verified once
    verified = [
        r["details"]["path"] for r in site.custody_rows(sid) if r["event"] == "file_verified"
    ]
    assert sorted(verified) == sorted(order)
    assert_each_file_once_in_store(site, cam)
    assert_store_and_custody_ok(site, [sid])


def test_redock_with_nothing_new_leaves_no_staging_folder_behind(site: Site) -> None:
    cam = site.camera("X6REDOCK1", {"DCIM/0001.MP4": 10_000}, seed=50)
    proc = site.start()
    cam.dock()
    sid1 = proc.wait_for("session_uploaded")["session_id"]
    cam.undock()
    proc.wait_for("camera_state", lambda e: e["state"] == "undocked")
    mark = proc.mark()
    cam.dock()
    end = proc.wait_for("safe_to_undock", after=mark)
    assert end["outcome"] == "empty" and end["session_id"] != sid1
    assert site.session_state(end["session_id"]) == "empty"
    assert site.staging_leftovers() == []


def test_files_of_a_camera_just_undocked_are_abandoned_not_failed(site: Site) -> None:
    cam = interrupted_camera(site, "X6VANISH1", seed=60)
    order = [encode_path(p) for p in cam.in_path_order()]
    proc = site.start()
    sid, holds = dock_and_hold_mid_file2(proc, cam)
    cam.undock()
    # the camera is gone; the copy of file 3 (opened before) still completes, then the worker
    # takes file 4 before the daemon has heard of the undock
    holds[0].release(errno.EIO)
    holds[1].release()
    for h in holds[2:]:
        h.release()
    proc.wait_for("camera_gone", lambda e: e["session_id"] == sid)
    # the session is closed (pending files abandoned) before it says the camera is undocked
    proc.wait_for(
        "camera_state", lambda e: e.get("session_id") == sid and e.get("state") == "undocked"
    )
    states = site.file_states(sid)
    assert not proc.all("file_failed"), [e["path"] for e in proc.all("file_failed")]
    assert {p for p, st in states.items() if st == "failed"} == set()
    assert states[order[3]] == "abandoned"
