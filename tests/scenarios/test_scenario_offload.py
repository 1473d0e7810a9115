"""Whole-daemon scenarios of the ordinary job: a camera docked, offloaded, uploaded, verified;
a camera refused; a camera cleared after upload."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat

from conftest import (
    DOCK_ID,
    Site,
    assert_each_file_once_in_store,
    assert_manifest_shape,
    assert_sidecars_match,
    assert_store_and_custody_ok,
    encode_path,
    sha256,
    sha256sum_check,
)

MIB = 1024 * 1024
NON_UTF8 = b"DCIM/100CAM/caf\xe9.MP4"  # Latin-1 e-acute, as an old FAT camera writes it


def test_camera_docked_is_offloaded_uploaded_and_verifies(site: Site) -> None:
    cam = site.camera(
        "X6039B2A3",
        {
            "DCIM/100CAM/0001.MP4": 3 * MIB,
            "DCIM/100CAM/0002.MP4": 5 * MIB + 123,
            NON_UTF8: 200_000,
            "DCIM/101CAM/deep/er/0003.MP4": 70_000,
            "GPS/track 1.json": 1_234,
            "EMPTY.LOG": 0,
        },
        symlinks={"LATEST.MP4": "DCIM/100CAM/0001.MP4", "DCIM/dangling": "/nonexistent"},
        fifos=["pipe"],
        hidden={".Trashes/junk": 10, "DCIM/.thumb": 10},
        seed=1,
    )
    site.configure(cameras={cam.name: {"officer": "badge-1234"}})
    proc = site.start()
    cam.dock()

    opened = proc.wait_for("session_opened", lambda e: e.get("camera") == cam.name)
    sid = opened["session_id"]
    assert opened["resumed"] is False
    walked = proc.wait_for("camera_walked", lambda e: e.get("session_id") == sid)
    assert walked["new_files"] == len(cam.files)
    assert walked["skipped"] == len(cam.skipped)
    safe = proc.wait_for("safe_to_undock", lambda e: e.get("session_id") == sid)
    assert safe["outcome"] == "offloaded"
    # safe to undock means every file verified in staging, and said so before
    verified = {e["path"] for e in proc.all("file_verified", lambda e: e["session_id"] == sid)}
    assert verified == set(cam.expected())
    proc.wait_for("session_uploaded", lambda e: e.get("session_id") == sid)

    # -- the store ---------------------------------------------------------------------------
    m = site.manifest(cam.name, sid)
    assert_manifest_shape(m, cam)
    assert m["camera"]["officer"] == "badge-1234"
    assert m["outcome"] == "complete"
    by_path = {f["path"]: f for f in m["files"]}
    assert set(by_path) == set(cam.expected())
    for rel, data in cam.files.items():
        f = by_path[encode_path(rel)]
        st = os.lstat(cam.path(rel))
        assert f["status"] == "verified"
        assert f["size"] == len(data)
        assert f["sha256"] == sha256(data)
        assert f["mtime"] == _utc_seconds(st.st_mtime_ns)
    odd = by_path["DCIM/100CAM/caf%E9.MP4"]
    assert base64.b64decode(odd["raw_path_b64"]) == NON_UTF8
    assert (site.evidence / odd["key"]).read_bytes() == cam.files[NON_UTF8]
    assert all("raw_path_b64" not in f for p, f in by_path.items() if "%" not in p)
    assert {(s["path"], s["reason"]) for s in m["skipped"]} == set(cam.skipped.items())
    assert not any(".Trashes" in f["path"] or ".thumb" in f["path"] for f in m["files"])
    assert_sidecars_match(site, cam, m)
    assert_each_file_once_in_store(site, cam)

    session_dir = site.session_dir(cam.name, sid)
    check = sha256sum_check(session_dir)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == len(cam.files)
    for p in session_dir.rglob("*"):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o440, p
        else:
            assert p.is_dir() and not p.is_symlink(), p

    # custody.jsonl in the store is the journal's slice up to sealing
    rc, records, err = site.custody(sid)
    assert rc == 0, err
    sidecar = [
        json.loads(line) for line in (session_dir / "custody.jsonl").read_text().splitlines()
    ]
    assert sidecar == records[: len(sidecar)]
    assert m["custody"]["first_seq"] == records[0]["seq"]
    assert m["custody"]["last_seq"] == records[len(sidecar) - 1]["seq"]
    events = [r["event"] for r in records]
    assert events[0] == "docked"
    assert events.count("file_verified") == len(cam.files)
    assert events.count("file_stored") == len(cam.files)
    assert events.index("sealed") < events.index("uploaded")

    # -- the dock ----------------------------------------------------------------------------
    assert site.session_state(sid) == "uploaded"
    assert set(site.file_states(sid).values()) == {"stored"}
    assert not (site.state / "staging" / sid).exists()
    assert stat.S_IMODE((site.state / "staging").stat().st_mode) == 0o700
    st = site.status()
    assert st["dock_id"] == DOCK_ID
    assert [c["id"] for c in st["cameras_docked"]] == [cam.name]
    assert st["queue"] == {"sessions": 0, "files": 0, "bytes": 0, "failed": 0}
    assert [(s["id"], s["state"]) for s in st["sessions"]] == [(sid, "uploaded")]
    # clear = "never": the camera keeps everything
    for rel, data in cam.files.items():
        with open(cam.path(rel), "rb") as f:
            assert f.read() == data
    assert_store_and_custody_ok(site, [sid])

    assert proc.sigterm() == 0
    proc.wait_for("daemon_stopped")


def _utc_seconds(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns // 10**9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_camera_with_bad_id_is_refused_and_not_read(site: Site) -> None:
    bad = site.camera("bad name!", {"DCIM/0001.MP4": 100_000}, seed=7)
    good = site.camera("X60A11F07", {"DCIM/0001.MP4": 50_000}, seed=8)
    # a lease on the bad camera's file: any open(2) of it, by anyone, would break it
    lease = bad.gate(b"DCIM/0001.MP4")
    proc = site.start()
    bad.dock()
    refused = proc.wait_for("camera_refused")
    assert refused["raw_id"] == "bad name!"
    assert refused["level"] == "warning"
    # the daemon goes on with the next camera
    good.dock()
    opened = proc.wait_for("session_opened")
    assert opened["camera"] == good.name
    proc.wait_for("session_uploaded", lambda e: e.get("session_id") == opened["session_id"])

    assert not lease.broken, "the refused camera's file was opened"
    sessions = site.sessions()
    assert [s["camera"] for s in sessions] == [good.name]
    assert site.query("SELECT count(*) AS n FROM files WHERE camera = 'bad name!'")[0]["n"] == 0
    assert site.query("SELECT id FROM cameras") == [{"id": good.name}]
    refusals = [r for r in site.custody_rows() if r["event"] == "camera_refused"]
    assert len(refusals) == 1 and refusals[0]["details"]["raw_id"] == "bad name!"
    assert refusals[0]["session_id"] is None
    assert [d.name for d in site.evidence.iterdir() if not d.name.startswith(".")] == [good.name]
    assert not proc.all("session_opened", lambda e: e.get("camera") == "bad name!")
    assert_store_and_custody_ok(site, [opened["session_id"]])


def test_clear_after_upload_removes_only_stored_unchanged_files(site: Site) -> None:
    site.configure(camera={"clear": "after_upload"})
    changed = site.camera(
        "X6CLEAR01",
        {
            "DCIM/0001.MP4": 300_000,
            "DCIM/0002.MP4": 200_000,  # appended to after the offload
            "DCIM/0003.MP4": 100_000,  # same size and mtime after the offload, other bytes
            "DCIM/sub/0004.MP4": 50_000,
        },
        symlinks={"LATEST.MP4": "DCIM/0001.MP4"},
        fifos=["pipe"],
        hidden={".hidden": 10},
        seed=10,
    )
    untouched = site.camera("X6CLEAR02", {"DCIM/0001.MP4": 80_000, "0002.MP4": 1}, seed=11)
    # hold the uploads: the store is away until the camera has been changed
    away = site.base / "evidence.away"
    site.evidence.rename(away)
    proc = site.start()
    changed.dock()
    untouched.dock()
    sids = {}
    for cam in (changed, untouched):
        e = proc.wait_for("safe_to_undock", lambda e, c=cam.name: e.get("camera") == c)
        sids[cam.name] = e["session_id"]
    proc.wait_for("store_unreachable")

    # the camera records on after its footage was offloaded
    p2 = changed.path(b"DCIM/0002.MP4")
    with open(p2, "ab") as f:
        f.write(b"more footage")
    new2 = changed.files[b"DCIM/0002.MP4"] + b"more footage"
    p3 = changed.path(b"DCIM/0003.MP4")
    st3 = os.stat(p3)
    new3 = bytes(b ^ 0xFF for b in changed.files[b"DCIM/0003.MP4"])
    with open(p3, "r+b") as f:
        f.write(new3)
    os.utime(p3, ns=(st3.st_atime_ns, st3.st_mtime_ns))  # a change that size and mtime hide
    assert os.stat(p3).st_mtime_ns == st3.st_mtime_ns

    away.rename(site.evidence)
    for cam in (changed, untouched):
        proc.wait_for(
            "camera_state", lambda e, c=cam.name: e.get("camera") == c and e["state"] == "cleared"
        )
    skipped_changed = {e["path"] for e in proc.all("clear_skipped_changed")}
    assert skipped_changed == {"DCIM/0002.MP4", "DCIM/0003.MP4"}

    # on the changed camera: only the stored, unchanged files are gone
    root = changed.docked_root
    assert not (root / "DCIM/0001.MP4").exists()
    assert not (root / "DCIM/sub/0004.MP4").exists()
    assert (root / "DCIM/0002.MP4").read_bytes() == new2
    assert (root / "DCIM/0003.MP4").read_bytes() == new3
    assert (root / "LATEST.MP4").is_symlink()
    assert stat.S_ISFIFO(os.lstat(root / "pipe").st_mode)
    assert (root / ".hidden").exists()
    assert (root / "DCIM/sub").is_dir()
    assert site.file_states(sids[changed.name]) == {
        "DCIM/0001.MP4": "cleared",
        "DCIM/0002.MP4": "stored",
        "DCIM/0003.MP4": "stored",
        "DCIM/sub/0004.MP4": "cleared",
    }
    assert site.session_state(sids[changed.name]) == "uploaded"  # not all of it cleared
    # the untouched camera is emptied of its footage, and its session is cleared
    assert sorted(p.name for p in untouched.docked_root.rglob("*") if p.is_file()) == []
    assert set(site.file_states(sids[untouched.name]).values()) == {"cleared"}
    assert site.session_state(sids[untouched.name]) == "cleared"

    cleared = [
        r["details"]["path"]
        for r in site.custody_rows(sids[changed.name])
        if r["event"] == "cleared_from_camera"
    ]
    assert sorted(cleared) == ["DCIM/0001.MP4", "DCIM/sub/0004.MP4"]
    # the store keeps what was offloaded, the originals
    for cam in (changed, untouched):
        assert_each_file_once_in_store(site, cam)
    assert_store_and_custody_ok(site, list(sids.values()))
