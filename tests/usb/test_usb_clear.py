"""Clearing USB cameras (`camera.clear = "after_upload"`): a real `dockd run` under umockdev,
cameras on real loop devices.

After the upload the daemon mounts the same device read-write at its own point
(`<mount_dir>/<serial>@clear`), removes the stored files that are unchanged (size, mtime, exact
name, SHA-256), syncs and unmounts. What stays on the camera is read afterwards through the
test's own read-only mount, and the filesystem is checked with its fsck.

Determinism: the store directory is missing until the test has done what it must do between
the offload (and its unmount) and the upload: altering a file, undocking the camera, or changing
what udev says about the device. The uploads wait for the store, then go on by themselves.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from usb_support import (
    FILE_MTIME,
    WAIT_S,
    CameraImage,
    Devices,
    Dock,
    DockdProcess,
    Testbed,
    UsbCamera,
    camera_tree,
    content,
    fsck_clean,
    mount_at,
    mounts_under,
    own_mount,
    read_tree,
    run,
    sha256,
)

from dockd.sources.mount import (
    CLEAR_OPTIONS,
    MountError,
    kernel_has,
    mount_camera,
    prepare_point,
    unmount,
)

HELPERS = {"vfat": "fusefat", "exfat": "mount.exfat-fuse"}
CHANGED = "DCIM/100CAM/0002.MP4"
FILES = {
    "DCIM/100CAM/0001.MP4": content("c1", 300_000),
    CHANGED: content("c2", 70_000),
    "DCIM/101CAM/0003.MP4": content("c3", 5_000),
    "GPS/TRACK.LOG": b"",
    "MISC/KEEP.TXT": b"not footage\n",  # excluded: never offloaded, never removed
}
EXCLUDE = [".*", "**/.*", "MISC/**"]
ODD = FILE_MTIME + 1  # an odd second: FAT keeps 2 s, exFAT and ext4 keep it


def image(devices: Devices, fs: str, serial: str, files: dict[str, bytes]) -> CameraImage:
    mtimes = {"DCIM/101CAM/0003.MP4": ODD}
    if fs == "ext4":
        return devices.ext4(serial, files, mtimes=mtimes)
    if fs == "vfat":
        return devices.fat32(serial, files, mtimes=mtimes)
    return devices.exfat(serial, files, mtimes=mtimes)


def start_with_store_away(dock: Dock, **settings: dict[str, Any]) -> DockdProcess:
    """The daemon with clearing on and the store missing: uploads wait until it is made."""
    dock.settings = {"camera": {"clear": "after_upload"}, **settings}
    dock.evidence.rmdir()
    return dock.start()


def offloaded_and_released(proc: DockdProcess, serial: str) -> str:
    """Wait until the camera's files are verified in staging and its read-only mount is gone:
    from then on nothing of the daemon's has the device until the store comes back."""
    sid = str(proc.wait_for("safe_to_undock", lambda e: e.get("camera") == serial)["session_id"])
    gone = proc.wait_for("camera_unmounted", lambda e: e["camera"] == serial)
    assert gone["why"] == "released"
    proc.wait_for("store_unreachable")
    return sid


def file_states(dock: Dock, sid: str) -> dict[str, str]:
    rows = dock.query("SELECT path, state FROM files WHERE session_id = ?", sid)
    return {r["path"]: r["state"] for r in rows}


def session_state(dock: Dock, sid: str) -> str:
    return str(dock.query("SELECT state FROM sessions WHERE id = ?", sid)[0]["state"])


# --------------------------------------------------------------------------------------------
# the mount itself: read-write with the same guards, and the same times as the read-only one
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fs", ["ext4", "vfat", "exfat"])
async def test_read_write_mount_shows_the_times_the_read_only_mount_showed(
    fs: str, devices: Devices, tmp_path: Path
) -> None:
    """What "unchanged since offload" compares: the offload's (size, mtime_ns) through the
    read-only mount must be what the clear step's read-write mount shows, to the nanosecond."""
    cam = image(devices, fs, f"X6T{fs.upper()}", FILES)
    ro, rw = tmp_path / "mounts" / "ro", tmp_path / "mounts" / "rw@clear"
    seen = []
    for point, writable in ((ro, False), (rw, True)):
        prepare_point(point)
        m = await mount_camera(
            cam.loop, fs, point, fuse_helpers=HELPERS, limit_s=20, writable=writable
        )
        try:
            entry = mount_at(point)
            assert entry is not None
            if writable:
                assert set(entry.options) == set(CLEAR_OPTIONS), entry.options
                assert m.writable and set(m.options) == set(CLEAR_OPTIONS)
            stats = {}
            for rel in FILES:
                if rel.startswith("MISC/"):
                    continue
                st = os.stat(point / rel)
                stats[rel] = (st.st_size, st.st_mtime_ns)
            seen.append((m.driver, stats))
        finally:
            await unmount(point, limit_s=20)
    (ro_driver, ro_stats), (rw_driver, rw_stats) = seen
    assert ro_driver == rw_driver
    assert ro_stats == rw_stats  # no tolerance needed: the same driver, the same times
    mtimes = {rel: mt for rel, (_, mt) in ro_stats.items()}
    s = 1_000_000_000
    if fs == "vfat" and ro_driver == "fuse:fusefat":
        # local times kept to 2 s (the odd second rounded down), and fusefat's month-late dates
        # (30 days here), read the same way read-only and read-write
        assert set(mtimes.values()) == {(FILE_MTIME + 30 * 86400) * s}
    elif fs == "vfat":
        assert mtimes["DCIM/101CAM/0003.MP4"] == FILE_MTIME * s
    else:
        assert mtimes["DCIM/101CAM/0003.MP4"] == ODD * s
        assert mtimes["DCIM/100CAM/0001.MP4"] == FILE_MTIME * s


@pytest.mark.parametrize("fs", ["ext4", "vfat", "exfat"])
async def test_a_write_protected_camera_is_never_written(
    fs: str, devices: Devices, tmp_path: Path
) -> None:
    """A card with its lock switch on (a read-only loop device): the kernel and exfat-fuse mount
    it read-only, which the check refuses; fusefat mounts it "rw" and every write fails (EPERM),
    so the clear step can only keep the file."""
    cam = image(devices, fs, f"X6W{fs.upper()}", FILES)
    run("losetup", "-d", cam.loop)
    devices.loops.remove(cam.loop)
    cam.loop = run("losetup", "-r", "-f", "--show", str(cam.image)).stdout.strip()
    devices.loops.append(cam.loop)
    point = tmp_path / "mounts" / "wp@clear"
    prepare_point(point)
    try:
        m = await mount_camera(cam.loop, fs, point, fuse_helpers=HELPERS, limit_s=20, writable=True)
    except MountError as exc:
        assert refuses_read_only_device(fs), f"{fs}: {exc}"
        assert "write-protected" in str(exc) or "read-only" in str(exc)
        assert mount_at(point) is None
        return
    try:
        assert m.driver == "fuse:fusefat", m
        with pytest.raises(PermissionError):
            os.unlink(point / "DCIM/100CAM/0001.MP4")
        assert (point / "DCIM/100CAM/0001.MP4").is_file()
    finally:
        await unmount(point, limit_s=20)


def refuses_read_only_device(fs: str) -> bool:
    return fs in ("ext4", "exfat") or kernel_has("vfat")


# --------------------------------------------------------------------------------------------
# the daemon
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fs", ["ext4", "vfat", "exfat"])
def test_stored_unchanged_files_are_cleared_a_changed_one_stays(
    fs: str, dock: Dock, testbed: Testbed, devices: Devices, tmp_path: Path
) -> None:
    img = image(devices, fs, f"X6K{fs.upper()}", FILES)
    cam = UsbCamera(img, bay=1, serial=img.serial, whole_disk=fs == "vfat")
    proc = start_with_store_away(dock, offload={"exclude": EXCLUDE})
    testbed.dock(cam)
    sid = offloaded_and_released(proc, img.serial)

    # the camera's file gets other bytes: same size, same mtime (put back where the driver
    # lets it; fusefat does not even move it on a write): only the SHA-256 can tell
    altered = bytes(b ^ 0x5A for b in FILES[CHANGED])
    with own_mount(img, tmp_path / "alter", writable=True) as root:
        before = os.stat(root / CHANGED)
        with open(root / CHANGED, "r+b") as f:
            f.write(altered)
        os.utime(root / CHANGED, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(root / CHANGED)
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    mark = proc.mark()
    dock.evidence.mkdir()
    proc.wait_for("session_uploaded", lambda e: e.get("session_id") == sid)
    mounted = proc.wait_for("camera_mounted", lambda e: e.get("purpose") == "clear", after=mark)
    assert mounted["mount_point"] == str(dock.mount_dir / f"{img.serial}@clear")
    assert set(mounted["options"].split(",")) == set(CLEAR_OPTIONS)
    done = proc.wait_for("clear_done", after=mark)
    gone = proc.wait_for("camera_unmounted", lambda e: e.get("why") == "clear_ended", after=mark)
    assert gone["how"] == "unmounted"
    assert mounts_under(dock.mount_dir) == []
    assert not proc.all("camera_sync_failed") and not proc.all("clear_failed")

    # only the changed file was kept, and only for its bytes
    (skipped,) = proc.all("clear_skipped_changed")
    assert skipped["path"] == CHANGED
    assert skipped["reason"] == "its bytes differ from the stored copy"
    stored = {rel for rel in img.files if not rel.startswith("MISC/")}
    label = {img.label} if fs == "vfat" and mounted["driver"] == "fuse:fusefat" else set()
    assert done["removed"] == len(stored) - 1 - len(label) and done["kept"] == 1
    assert file_states(dock, sid) == {
        rel: ("stored" if rel == CHANGED or rel in label else "cleared") for rel in stored
    }
    assert session_state(dock, sid) == "uploaded"  # not all of it could be cleared
    cleared = dock.query(
        "SELECT details FROM custody WHERE session_id = ? AND event = 'cleared_from_camera'", sid
    )
    assert len(cleared) == done["removed"]

    # on the camera: the changed file, the excluded one, and (fusefat) the volume label
    left = camera_tree(img, tmp_path / "check")
    expect: dict[str, bytes | str] = {CHANGED: altered, "MISC/KEEP.TXT": FILES["MISC/KEEP.TXT"]}
    expect.update(dict.fromkeys(label, b""))
    assert left == expect
    fsck_clean(img)
    if fs == "vfat":  # the label is still the volume's label, not only a name fusefat shows
        probe = run("blkid", "-p", "-o", "value", "-s", "LABEL", img.loop, check=False)
        assert probe.stdout.strip() == img.label
    # the store keeps what was offloaded: the original bytes
    manifest = dock.manifests(img.serial)[sid]
    by_path = {f["path"]: f for f in manifest["files"]}
    assert by_path[CHANGED]["sha256"] == sha256(FILES[CHANGED])
    assert proc.sigterm() == 0


def test_only_the_exact_stored_name_is_removed_never_a_case_folded_one(
    dock: Dock, testbed: Testbed, devices: Devices, tmp_path: Path
) -> None:
    """ext4 holds `CLIP.MP4` and `clip.mp4` side by side, same bytes and times; only the first
    is offloaded (the exclude glob is case-sensitive), so only it may go. A symlink is a skipped
    entry: it stays too."""
    same = content("clip", 40_000)
    files = {"DCIM/CLIP.MP4": same, "DCIM/clip.mp4": same, "DCIM/0001.MP4": content("o", 9)}
    img = devices.ext4("X6CASE001", files, symlinks={"LATEST.MP4": "DCIM/CLIP.MP4"})
    proc = start_with_store_away(dock, offload={"exclude": [*EXCLUDE, "**/*.mp4"]})
    testbed.dock(UsbCamera(img, bay=2, serial=img.serial))
    sid = offloaded_and_released(proc, img.serial)
    dock.evidence.mkdir()
    proc.wait_for("camera_unmounted", lambda e: e.get("why") == "clear_ended")
    assert file_states(dock, sid) == {"DCIM/CLIP.MP4": "cleared", "DCIM/0001.MP4": "cleared"}
    assert session_state(dock, sid) == "cleared"
    skipped = dock.query("SELECT path, reason FROM skipped WHERE session_id = ?", sid)
    assert skipped == [{"path": "LATEST.MP4", "reason": "symlink"}]
    assert camera_tree(img, tmp_path / "check") == {
        "DCIM/clip.mp4": same,
        "LATEST.MP4": "-> DCIM/CLIP.MP4",
    }
    fsck_clean(img)
    assert proc.sigterm() == 0


def test_a_file_renamed_in_case_only_is_not_found_under_its_recorded_name(
    dock: Dock, testbed: Testbed, devices: Devices, tmp_path: Path
) -> None:
    """exFAT keeps case but looks names up without it: after `0001.MP4` became `0001.mp4`, a
    lookup of the recorded name still finds the file, same bytes and times. The clear removes
    only names it finds as recorded in the directory listing: this one stays."""
    files = {"DCIM/0001.MP4": content("r1", 20_000), "DCIM/0002.MP4": content("r2", 30_000)}
    img = devices.exfat("X6RENAME1", files)
    proc = start_with_store_away(dock)
    testbed.dock(UsbCamera(img, bay=3, serial=img.serial))
    sid = offloaded_and_released(proc, img.serial)
    with own_mount(img, tmp_path / "alter", writable=True) as root:
        os.rename(root / "DCIM/0001.MP4", root / "DCIM/0001.mp4")
        assert (root / "DCIM/0001.MP4").exists()  # the lookup ignores case
    dock.evidence.mkdir()
    proc.wait_for("camera_unmounted", lambda e: e.get("why") == "clear_ended")
    (skipped,) = proc.all("clear_skipped_changed")
    assert skipped["path"] == "DCIM/0001.MP4"
    assert skipped["reason"].startswith("not under this exact name")
    assert file_states(dock, sid) == {"DCIM/0001.MP4": "stored", "DCIM/0002.MP4": "cleared"}
    assert camera_tree(img, tmp_path / "check") == {"DCIM/0001.mp4": files["DCIM/0001.MP4"]}
    fsck_clean(img)
    assert proc.sigterm() == 0


def test_a_camera_undocked_before_its_upload_is_not_cleared(
    dock: Dock, testbed: Testbed, devices: Devices, tmp_path: Path
) -> None:
    img = devices.fat32("X6UNDOCK1", FILES)
    cam = UsbCamera(img, bay=4, serial=img.serial, whole_disk=True)
    proc = start_with_store_away(dock)
    testbed.dock(cam)
    sid = offloaded_and_released(proc, img.serial)
    testbed.undock(cam)
    proc.wait_for("camera_state", lambda e: e.get("state") == "undocked")
    mark = proc.mark()
    dock.evidence.mkdir()
    proc.wait_for("session_uploaded", lambda e: e.get("session_id") == sid)
    told = proc.wait_for("clear_not_possible", after=mark)
    assert told["session_id"] == sid and "undocked" in told["reason"]
    assert not proc.all("camera_mounted", lambda e: e.get("purpose") == "clear")
    assert set(file_states(dock, sid).values()) == {"stored"}
    assert mounts_under(dock.mount_dir) == []
    assert proc.sigterm() == 0
    assert proc.crashes() == []
    with own_mount(img, tmp_path / "check") as root:
        left = read_tree(root)
    assert {rel: left[rel] for rel in FILES} == FILES  # everything is still on the camera
    fsck_clean(img)


def test_another_medium_behind_the_same_serial_is_not_cleared(
    dock: Dock, testbed: Testbed, devices: Devices, tmp_path: Path
) -> None:
    """Before it mounts read-write, the daemon asks udev afresh: a filesystem UUID that is no
    longer the one offloaded (another card, reformatted) is not written to."""
    img = devices.ext4("X6UUID001", FILES)
    cam = UsbCamera(img, bay=5, serial=img.serial)
    proc = start_with_store_away(dock)
    testbed.dock(cam)
    sid = offloaded_and_released(proc, img.serial)
    testbed.set_property(cam, "ID_FS_UUID", "0badc0de-0000-4000-8000-000000000000")  # no event
    dock.evidence.mkdir()
    told = proc.wait_for("clear_not_possible")
    assert told["session_id"] == sid
    assert "not the device that was offloaded" in told["reason"] and "UUID" in told["reason"]
    assert not proc.all("camera_mounted", lambda e: e.get("purpose") == "clear")
    assert set(file_states(dock, sid).values()) == {"stored"}
    assert mount_at(dock.mount_dir / f"{img.serial}@clear") is None
    assert proc.sigterm() == 0
    assert camera_tree(img, tmp_path / "check") == FILES


def test_sigterm_during_the_clear_leaves_journal_and_camera_agreeing(
    dock: Dock, testbed: Testbed, devices: Devices, tmp_path: Path
) -> None:
    """The daemon is stopped while it clears (held with SIGSTOP at its first `file_cleared`, then
    SIGTERM):
    however far it got, a file is `cleared` in the journal exactly when it is gone from the
    camera, the read-write mount is synced and gone, and the FAT is consistent."""
    files = {f"DCIM/100CAM/{i:04d}.MP4": content(f"t{i}", 30_000) for i in range(12)}
    img = devices.fat32("X6TERM001", files)
    cam = UsbCamera(img, bay=6, serial=img.serial, whole_disk=True)
    proc = start_with_store_away(dock)
    testbed.dock(cam)
    sid = offloaded_and_released(proc, img.serial)
    held = proc.at("file_cleared", signal.SIGSTOP)  # the first file is gone, 11 are not
    dock.evidence.mkdir()
    proc.wait_for("file_cleared")
    assert held.wait(5)
    os.kill(proc.proc.pid, signal.SIGTERM)
    proc.resume()
    assert proc.wait_exit() == 0
    assert mounts_under(dock.mount_dir) == []
    assert proc.crashes() == []
    states = file_states(dock, sid)
    assert "cleared" in states.values() and states["BODYCAM"] == "stored"
    left = camera_tree(img, tmp_path / "check")
    assert img.label in left  # the label, as fusefat shows it, is never removed
    for rel in files:
        assert (states[rel] == "cleared") == (rel not in left), (rel, states[rel])
        assert rel not in left or left[rel] == files[rel]
    fsck_clean(img)


def test_undocked_during_the_clear_stops_it_and_detaches_the_mount(
    dock: Dock, testbed: Testbed, devices: Devices, tmp_path: Path
) -> None:
    """Taken out after the first file went: the clear stops, the read-write mount is detached,
    and the journal says `cleared` of exactly the files that are gone from the camera."""
    files = {f"DCIM/{i:04d}.MP4": content(f"u{i}", 20_000) for i in range(20)}
    img = devices.ext4("X6YANK001", files)
    cam = UsbCamera(img, bay=7, serial=img.serial)
    proc = start_with_store_away(dock)
    testbed.dock(cam)
    sid = offloaded_and_released(proc, img.serial)
    held = proc.at("file_cleared", signal.SIGSTOP)
    dock.evidence.mkdir()
    proc.wait_for("file_cleared")
    assert held.wait(5)
    testbed.undock(cam)
    proc.resume()
    gone = proc.wait_for("camera_unmounted", lambda e: e["mount_point"].endswith("@clear"))
    assert gone["why"] in ("clear_ended", "undocked")
    proc.wait_for("camera_state", lambda e: e.get("state") == "undocked")
    assert mounts_under(dock.mount_dir) == []
    assert proc.sigterm() == 0
    states = file_states(dock, sid)
    left = camera_tree(img, tmp_path / "check")
    for rel in files:
        assert (states[rel] == "cleared") == (rel not in left), (rel, states[rel])
    cleared = list(states.values()).count("cleared")
    # how far it got depends on when the loop hears of the undock; the record always agrees
    if proc.all("clear_stopped"):
        assert 1 <= cleared < len(files) and session_state(dock, sid) == "uploaded"
    else:
        assert cleared == len(files)
    fsck_clean(img)


def test_kill9_during_the_clear_leaves_a_stale_rw_mount_the_next_start_removes(
    dock: Dock, testbed: Testbed, devices: Devices, tmp_path: Path
) -> None:
    """Killed in the middle of a clear, its fusefat still serving the read-write mount: the next
    start syncs and removes it. A file the journal calls `cleared` is gone from the camera; at
    most the one in flight is gone without its record (the kill leaves no time for it)."""
    files = {f"DCIM/{i:04d}.MP4": content(f"k{i}", 20_000) for i in range(12)}
    img = devices.fat32("X6KILL001", files)
    cam = UsbCamera(img, bay=8, serial=img.serial, whole_disk=True)
    proc = start_with_store_away(dock)
    testbed.dock(cam)
    sid = offloaded_and_released(proc, img.serial)
    killed = proc.at("file_cleared", signal.SIGKILL)
    dock.evidence.mkdir()
    assert killed.wait(WAIT_S)
    proc.wait_exit()
    point = dock.mount_dir / f"{img.serial}@clear"
    assert mount_at(point) is not None  # the FUSE driver outlived the daemon

    testbed.undock(cam)  # so the next start does not offload it again meanwhile
    again = dock.start()
    stale = again.wait_for("stale_mount_removed")
    assert stale["mount_point"] == str(point)
    assert mounts_under(dock.mount_dir) == []
    assert again.sigterm() == 0
    states = file_states(dock, sid)
    left = camera_tree(img, tmp_path / "check")
    for rel in files:
        if states[rel] == "cleared":
            assert rel not in left, rel
    unrecorded = [rel for rel in files if states[rel] == "stored" and rel not in left]
    assert len(unrecorded) <= 1, unrecorded
    fsck_clean(img)
