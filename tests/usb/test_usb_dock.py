"""USB docking end to end: a real `dockd run` under umockdev, cameras on real loop devices.

Docked → mounted read-only with exactly `ro,nosuid,nodev,noexec,noatime` (read in
/proc/self/mountinfo while the daemon is frozen right after it logged the mount) → offloaded →
uploaded → unmounted; for ext4 (the kernel's driver), FAT32 (fusefat here) and exFAT (exfat-fuse,
remounted for the options it drops). Devices that are not cameras are never opened or mounted.
"""

from __future__ import annotations

import signal
import stat
from pathlib import Path

from usb_support import (
    OPTIONS,
    Devices,
    Dock,
    Inotify,
    Testbed,
    UsbCamera,
    assert_each_file_once,
    assert_mounted_as_asked,
    content,
    mount_at,
    mounts,
    mounts_under,
    run,
)

FILES = {
    "DCIM/100CAM/0001.MP4": content("d1", 700_000),
    "DCIM/100CAM/0002.MP4": content("d2", 64 * 1024 + 7),
    "DCIM/101CAM/0003.MP4": content("d3", 5_000),
    "GPS/TRACK.LOG": b"",
}


def dock_and_check_mount(
    dock: Dock, testbed: Testbed, cam: UsbCamera, fs_type: str
) -> tuple[dict[str, object], object]:
    """Start the daemon, dock `cam`, freeze the daemon the moment it logs the mount, check the
    mount in /proc/self/mountinfo, and let it go on. Returns the log line and the process."""
    proc = dock.start()
    frozen = proc.at("camera_mounted", signal.SIGSTOP)
    testbed.dock(cam)
    line = proc.wait_for("camera_mounted")
    assert frozen.wait(5)
    point = dock.mount_dir / cam.serial
    try:
        assert Path(line["mount_point"]) == point
        m = assert_mounted_as_asked(point, fs_type)
        # the point shows the camera's root now; what guards it is mount_dir, root's alone
        assert stat.S_IMODE(dock.mount_dir.stat().st_mode) == 0o700
        assert set(line["options"].split(",")) == set(OPTIONS)
        assert line["camera"] == cam.serial and line["device"] == cam.sysname
    finally:
        proc.resume()
    return line, (proc, m)


def test_ext4_camera_is_mounted_read_only_offloaded_uploaded_and_unmounted(
    dock: Dock, testbed: Testbed, devices: Devices
) -> None:
    img = devices.ext4("X6E000001", FILES)
    cam = UsbCamera(img, bay=1, serial=img.serial)
    line, (proc, m) = dock_and_check_mount(dock, testbed, cam, "ext4")
    assert (line["driver"], line["mount_type"], line["remounted"]) == ("kernel", "ext4", False)
    assert line["honoured"] == ",".join(OPTIONS) and line["dropped"] == ""
    assert m.source == img.loop  # type: ignore[attr-defined]

    dock.wait_uploaded(proc, cam.serial)
    gone = proc.wait_for("camera_unmounted", lambda e: e["camera"] == cam.serial)
    assert gone["why"] == "released" and gone["how"] == "unmounted"
    assert mount_at(dock.mount_dir / cam.serial) is None
    assert mounts_under(dock.mount_dir) == []
    manifests = assert_each_file_once(dock, img)
    (m1,) = manifests.values()
    assert m1["camera"]["vendor_id"] == "2a2b" and m1["camera"]["model_id"] == "0001"
    assert {f["mtime"] for f in m1["files"]} == {"2023-11-14T22:13:20Z"}
    assert proc.sigterm() == 0


def test_fat32_camera_through_fuse_and_a_redock_offloads_nothing_twice(
    dock: Dock, testbed: Testbed, devices: Devices
) -> None:
    """A FAT32 card without a partition table (DEVTYPE=disk), as body cameras present it. The
    dedupe on (path, size, mtime) holds across dockings: the same driver shows the same mtimes."""
    img = devices.fat32("X6F000001", FILES)
    cam = UsbCamera(img, bay=2, serial=img.serial, whole_disk=True)
    line, (proc, _) = dock_and_check_mount(dock, testbed, cam, "vfat")
    if line["driver"] != "kernel":
        assert (line["driver"], line["mount_type"]) == ("fuse:fusefat", "fuse.fusefat")
        assert line["honoured"] == ",".join(OPTIONS) and not line["remounted"]
    dock.wait_uploaded(proc, cam.serial)
    proc.wait_for("camera_unmounted", lambda e: e["camera"] == cam.serial)
    first = assert_each_file_once(dock, img)
    mtimes = {f["path"]: f["mtime"] for m in first.values() for f in m["files"]}

    testbed.undock(cam)
    proc.wait_for("camera_state", lambda e: e.get("state") == "undocked")
    mark = proc.mark()
    testbed.dock(cam)
    proc.wait_for("camera_mounted", after=mark)
    proc.wait_for("camera_unmounted", after=mark)
    sessions = dock.sessions(cam.serial)
    assert [s["state"] for s in sessions] == ["uploaded", "empty"], sessions
    assert assert_each_file_once(dock, img) == first  # no new manifest, nothing twice
    if line["driver"] == "fuse:fusefat":
        # FAT keeps local times, 2 s apart. fusefat (Debian 12's 0.1a) shows every date one
        # month late; it always does, so the dedupe holds (the empty second session above).
        assert {mtimes[rel] for rel in FILES} == {"2023-12-14T22:13:20Z"}
    assert proc.sigterm() == 0


def test_exfat_camera_is_remounted_for_the_options_its_driver_drops(
    dock: Dock, testbed: Testbed, devices: Devices
) -> None:
    img = devices.exfat("X6X000001", FILES)
    cam = UsbCamera(img, bay=3, serial=img.serial)
    line, (proc, _) = dock_and_check_mount(dock, testbed, cam, "exfat")
    if line["driver"] != "kernel":
        assert (line["driver"], line["mount_type"]) == ("fuse:mount.exfat-fuse", "fuseblk")
        assert line["honoured"] == "ro,nosuid,nodev" and line["dropped"] == "noexec,noatime"
        assert line["remounted"] is True
    dock.wait_uploaded(proc, cam.serial)
    proc.wait_for("camera_unmounted", lambda e: e["camera"] == cam.serial)
    assert mounts_under(dock.mount_dir) == []
    manifests = assert_each_file_once(dock, img)
    (m1,) = manifests.values()
    assert {f["mtime"] for f in m1["files"]} == {"2023-11-14T22:13:20Z"}
    assert proc.sigterm() == 0


def test_devices_that_are_not_cameras_are_never_opened_nor_mounted(
    dock: Dock, testbed: Testbed, devices: Devices
) -> None:
    dock.matches = [{"vendor_id": "2a2b", "model_id": "0001"}]  # any serial: the id is judged
    stick = devices.ext4("STICK0001", FILES)
    bad = devices.ext4("BADSERIAL", FILES)
    good = devices.ext4("X6G000001", FILES)
    watch = Inotify(stick.loop, bad.loop)
    proc = dock.start()
    try:
        testbed.dock(UsbCamera(stick, bay=4, serial="4C530001", vendor="0781", model="5567"))
        testbed.dock(UsbCamera(bad, bay=5, serial="X6 BAD/../1"))
        testbed.dock(UsbCamera(good, bay=6, serial=good.serial))  # the dock works on
        refused = [
            proc.wait_for("camera_refused", lambda e: e.get("device") == "sde1"),
            proc.wait_for("camera_refused", lambda e: e.get("device") == "sdf1"),
        ]
        assert "no [[sources.udev.match]] entry holds" in refused[0]["reason"]
        assert "vendor_id 0781" in refused[0]["reason"]
        assert "is not a usable camera id" in refused[1]["reason"]
        dock.wait_uploaded(proc, good.serial)
        assert watch.events() == 0, "a refused device node was opened"
    finally:
        watch.close()
    assert proc.all("camera_mounted", lambda e: e["camera"] != good.serial) == []
    assert not [m for m in mounts() if m.source in (stick.loop, bad.loop)]
    assert sorted(p.name for p in dock.mount_dir.iterdir()) == []
    custody = dock.query("SELECT details FROM custody WHERE event = 'camera_refused'")
    assert len(custody) == 2
    assert proc.sigterm() == 0


def test_media_change_in_a_card_reader_undocks_and_redocks(
    dock: Dock, testbed: Testbed, devices: Devices
) -> None:
    """A card reader keeps its USB device; the card comes and goes as `change` events of the
    disk. A `change` that keeps the same medium (udev re-probing) is no news."""
    img = devices.ext4("X6C000001", FILES)
    cam = UsbCamera(img, bay=7, serial=img.serial, whole_disk=True)
    proc = dock.start()
    testbed.dock(cam)
    dock.wait_uploaded(proc, cam.serial)
    proc.wait_for("camera_unmounted", lambda e: e["camera"] == cam.serial)
    mark = proc.mark()
    testbed.uevent(cam, "change")  # same card: nothing happens
    testbed.set_property(cam, "ID_FS_TYPE", "")  # the card is taken out
    testbed.uevent(cam, "change")
    proc.wait_for("camera_state", lambda e: e.get("state") == "undocked", after=mark)
    assert proc.all("camera_mounted")[1:] == [], "the same card was docked twice"
    assert proc.all("camera_refused") == []

    testbed.set_property(cam, "ID_FS_TYPE", "ext4")  # and put back
    testbed.uevent(cam, "change")
    proc.wait_for("camera_mounted", after=mark)
    proc.wait_for("camera_unmounted", after=mark)
    assert [s["state"] for s in dock.sessions(cam.serial)] == ["uploaded", "empty"]
    assert_each_file_once(dock, img)
    assert proc.sigterm() == 0


def test_two_bays_docked_at_once_and_undocked_in_any_order(
    dock: Dock, testbed: Testbed, devices: Devices
) -> None:
    a = devices.ext4("X6A000001", FILES)
    b = devices.fat32("X6B000001", FILES)
    cam_a = UsbCamera(a, bay=1, serial=a.serial)
    cam_b = UsbCamera(b, bay=2, serial=b.serial)
    proc = dock.start()
    testbed.dock(cam_a)
    testbed.dock(cam_b)
    both = [
        proc.wait_for("camera_mounted", lambda e, c=c: e["camera"] == c)
        for c in (a.serial, b.serial)
    ]
    assert {e["device"] for e in both} == {"sdb1", "sdc1"}
    for img in (a, b):
        dock.wait_uploaded(proc, img.serial)
        proc.wait_for("camera_unmounted", lambda e, c=img.serial: e["camera"] == c)
        assert_each_file_once(dock, img)
    testbed.undock(cam_b)
    testbed.undock(cam_a)
    for c in (b.serial, a.serial):
        proc.wait_for("camera_state", lambda e, c=c: e["camera"] == c and e["state"] == "undocked")
    assert mounts_under(dock.mount_dir) == []
    assert proc.sigterm() == 0


def test_a_camera_that_will_not_mount_is_refused_with_the_reason(
    dock: Dock, testbed: Testbed, devices: Devices, tmp_path: Path
) -> None:
    """udev says ext4, the device holds nothing: the mount fails, clearly and in bounded time,
    and the dashboards are told (camera_refused) rather than left waiting."""
    img = devices.ext4("X6Z000001", FILES)
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(8 * 1024**2))
    img.loop = run("losetup", "-f", "--show", str(blank)).stdout.strip()
    devices.loops.append(img.loop)
    proc = dock.start()
    testbed.dock(UsbCamera(img, bay=8, serial=img.serial))
    failed = proc.wait_for("camera_mount_failed")
    assert img.loop in failed["error"]
    refused = proc.wait_for("camera_refused", lambda e: e.get("device") == "sdi1")
    assert refused["reason"].startswith("mount failed: ")
    assert mount_at(dock.mount_dir / img.serial) is None
    assert not (dock.mount_dir / img.serial).exists()
    assert proc.sigterm() == 0
