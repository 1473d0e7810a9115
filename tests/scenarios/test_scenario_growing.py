"""Whole-daemon scenario of SPEC §5: a file whose size or mtime changes while it is copied is
copied again; if it keeps changing it is recorded `unstable` and left on the camera.

The camera is a FUSE filesystem this test serves (see scenario_fusecam): a file "grows" exactly
when the daemon's copy reads past a chosen byte, as a camera still recording into it would. So
the change falls inside the copy, every time, with no race.
"""

from __future__ import annotations

from conftest import (
    Site,
    assert_each_file_once_in_store,
    assert_manifest_shape,
    assert_store_and_custody_ok,
    sha256,
    sha256sum_check,
)

KIB = 1024
ONCE = b"DCIM/100CAM/0001.MP4"  # grows during its first copy only: copied again, verified
EVER = b"DCIM/100CAM/0002.MP4"  # grows during every copy: unstable
STILL = b"DCIM/100CAM/0003.MP4"


def test_file_growing_during_copy_is_copied_again_then_recorded_unstable(site: Site) -> None:
    site.configure(offload={"copy_attempts": 3}, camera={"clear": "after_upload"})
    cam = site.fuse_camera(
        "X6GROW001",
        {"100CAM/0001.MP4": 1024 * KIB, "100CAM/0002.MP4": 1024 * KIB, "100CAM/0003.MP4": 300_000},
        seed=70,
    )
    assert cam.fuse is not None
    cam.fuse.grow(b"100CAM/0001.MP4", at=512 * KIB, by=64 * KIB, times=1)
    cam.fuse.grow(b"100CAM/0002.MP4", at=512 * KIB, by=64 * KIB)
    proc = site.start()
    cam.dock()
    safe = proc.wait_for("safe_to_undock")
    sid = safe["session_id"]
    assert safe["outcome"] == "offloaded_with_errors"

    again = [(e["path"], e["attempt"]) for e in proc.all("file_changed_copying_again")]
    assert sorted(again) == [("DCIM/100CAM/0001.MP4", 1), ("DCIM/100CAM/0002.MP4", 1),
                             ("DCIM/100CAM/0002.MP4", 2)]  # fmt: skip
    unstable = proc.wait_for("file_unstable", lambda e: e.get("path") == "DCIM/100CAM/0002.MP4")
    assert "expected" in unstable["error"] or "changed" in unstable["error"]
    # each copy was a whole pass over the file from its first byte
    starts = [p for p, offset, _ in cam.fuse.reads if offset == 0]
    assert starts.count(b"100CAM/0001.MP4") == 2
    assert starts.count(b"100CAM/0002.MP4") == 3
    assert starts.count(b"100CAM/0003.MP4") == 1

    # the journal: the file that settled is verified with what the camera holds now
    rows = {r["path"]: r for r in site.query("SELECT * FROM files WHERE session_id = ?", sid)}
    once_now = cam.fuse.data(b"100CAM/0001.MP4")
    assert len(once_now) == 1024 * KIB + 64 * KIB
    assert rows["DCIM/100CAM/0001.MP4"]["sha256"] == sha256(once_now)
    assert rows["DCIM/100CAM/0001.MP4"]["size"] == len(once_now)
    assert rows["DCIM/100CAM/0002.MP4"]["state"] == "unstable"
    assert rows["DCIM/100CAM/0002.MP4"]["sha256"] is None
    offloaded = [r for r in site.custody_rows(sid) if r["event"] == "offloaded"]
    assert [r["details"]["outcome"] for r in offloaded] == ["offloaded_with_errors"]

    proc.wait_for("session_uploaded", lambda e: e.get("session_id") == sid)
    m = site.manifest(cam.name, sid)
    cam.files[ONCE] = once_now  # what the store must hold for it
    del cam.files[EVER]  # never in the store
    assert_manifest_shape(m, cam)
    assert m["outcome"] == "offloaded_with_errors"
    by_path = {f["path"]: f for f in m["files"]}
    ever = by_path["DCIM/100CAM/0002.MP4"]
    assert ever["status"] == "unstable"
    assert "key" not in ever and "sha256" not in ever
    assert ever["error"]
    assert by_path["DCIM/100CAM/0001.MP4"]["status"] == "verified"
    assert by_path["DCIM/100CAM/0001.MP4"]["size"] == len(once_now)
    session_dir = site.session_dir(cam.name, sid)
    assert not (session_dir / "files" / "DCIM/100CAM/0002.MP4").exists()
    assert b"0002.MP4" not in (session_dir / "SHA256SUMS").read_bytes()
    check = sha256sum_check(session_dir)
    assert check.returncode == 0, check.stdout + check.stderr
    assert_each_file_once_in_store(site, cam)

    # the camera keeps everything: a session with an unstable file is never cleared
    refused = proc.wait_for("clear_refused", lambda e: e.get("session_id") == sid)
    assert "changing" in refused["reason"] or "failed" in refused["reason"]
    assert site.file_states(sid)["DCIM/100CAM/0003.MP4"] == "stored"
    assert site.session_state(sid) == "uploaded"
    assert len(cam.fuse.data(b"100CAM/0002.MP4")) == 1024 * KIB + 3 * 64 * KIB
    with open(cam.path(EVER), "rb") as f:  # still there, and readable, on the camera
        assert f.read() == cam.fuse.data(b"100CAM/0002.MP4")
    assert_store_and_custody_ok(site, [sid])
