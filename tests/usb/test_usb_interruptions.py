"""USB cameras interrupted: undocked mid-file, the daemon killed (-9) or stopped while a camera is
mounted. Whatever happens, the mount is undone (now, or by the next start), and every file ends
verified in the store exactly once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from usb_support import (
    Devices,
    Dock,
    Testbed,
    UsbCamera,
    assert_each_file_once,
    assert_mounted_as_asked,
    content,
    mount_at,
    mounts_under,
)

BIG = "DCIM/100CAM/0002.MP4"
FILES = {
    "DCIM/100CAM/0001.MP4": content("i1", 300_000),
    BIG: content("i2", 40 * 1024**2 + 3),
    "DCIM/100CAM/0003.MP4": content("i3", 70_000),
}


def wait_partial(staging: Path, larger_than: int, timeout: float = 30) -> Path:
    """The staging copy in progress (`<id>.partial`) once it holds more than `larger_than`
    bytes: the daemon is mid-file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for partial in staging.glob("*/*.partial"):
            try:
                if partial.stat().st_size > larger_than:
                    return partial
            except FileNotFoundError:
                continue
        time.sleep(0.001)
    raise AssertionError(f"no copy in progress in {staging} within {timeout} s")


def fuse_helpers_of(loop: str) -> list[int]:
    """Pids of FUSE driver processes serving `loop`."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if loop.encode() in argv and any(b"fusefat" in a or b"exfat" in a for a in argv[:1]):
                pids.append(int(d.name))
    return pids


def test_undock_mid_file_then_redock_verifies_every_file_once(
    dock: Dock, testbed: Testbed, devices: Devices
) -> None:
    img = devices.ext4("X6U000001", FILES)
    cam = UsbCamera(img, bay=1, serial=img.serial)
    proc = dock.start()
    testbed.dock(cam)
    partial = wait_partial(dock.state / "staging", 1024**2)
    os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        size = partial.stat().st_size
        assert 0 < size < len(FILES[BIG]), "not mid-file"
        mark = proc.mark()
        testbed.undock(cam)  # the remove uevent waits in the daemon's socket
    finally:
        proc.resume()
    proc.wait_for("camera_gone", after=mark)
    gone = proc.wait_for("camera_unmounted", lambda e: e["camera"] == cam.serial, after=mark)
    assert gone["how"] == "detached"  # the device is gone: lazily, whatever still held it
    assert mounts_under(dock.mount_dir) == []
    assert not list((dock.state / "staging").glob("*/*.partial")), "partial copy left"
    (first,) = dock.sessions(cam.serial)
    assert first["state"] != "offloading", first

    mark = proc.mark()
    testbed.dock(cam)
    proc.wait_for("camera_mounted", after=mark)
    dock.wait_uploaded(proc, cam.serial, sessions=2)
    proc.wait_for("camera_unmounted", after=mark)
    assert_each_file_once(dock, img)
    assert proc.sigterm() == 0


def test_stale_mount_left_by_kill9_is_cleaned_at_the_next_start(
    dock: Dock, testbed: Testbed, devices: Devices
) -> None:
    """FAT32 through fusefat: the FUSE driver outlives the killed daemon, its mount too."""
    files = {k: v for k, v in FILES.items() if k != BIG}
    img = devices.fat32("X6K000001", files)
    cam = UsbCamera(img, bay=2, serial=img.serial)
    point = dock.mount_dir / cam.serial
    first = dock.start()
    killed = first.at("camera_mounted", signal.SIGKILL)
    testbed.dock(cam)
    assert killed.wait(30), first.tail()
    assert first.wait_exit() == -signal.SIGKILL
    assert mount_at(point) is not None, "nothing left mounted to clean"

    second = dock.start(ready=False)
    stale = second.wait_for("stale_mount_removed")
    assert Path(stale["mount_point"]) == point
    line = second.wait_for("camera_mounted")
    assert line["camera"] == cam.serial
    dock.wait_uploaded(second, cam.serial)
    second.wait_for("camera_unmounted", lambda e: e["camera"] == cam.serial)
    assert mount_at(point) is None
    assert_each_file_once(dock, img)
    assert second.sigterm() == 0
    assert mounts_under(dock.mount_dir) == []
    deadline = time.monotonic() + 10
    while fuse_helpers_of(img.loop) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fuse_helpers_of(img.loop) == [], "a FUSE driver still serves the camera"


def test_sigterm_while_mounted_unmounts_and_the_next_start_finishes(
    dock: Dock, testbed: Testbed, devices: Devices
) -> None:
    img = devices.exfat("X6T000001", {k: v for k, v in FILES.items() if k != BIG})
    cam = UsbCamera(img, bay=3, serial=img.serial)
    proc = dock.start()
    frozen = proc.at("camera_mounted", signal.SIGSTOP)
    testbed.dock(cam)
    assert frozen.wait(30)
    assert_mounted_as_asked(dock.mount_dir / cam.serial, "exfat")
    proc.proc.send_signal(signal.SIGTERM)
    proc.resume()
    assert proc.wait_exit() == 0
    stopped = proc.wait_for("camera_unmounted", lambda e: e["camera"] == cam.serial)
    assert stopped["why"] in ("stopping", "released")
    assert mounts_under(dock.mount_dir) == []

    again = dock.start()
    dock.wait_uploaded(again, cam.serial)
    again.wait_for("camera_unmounted", lambda e: e["camera"] == cam.serial)
    assert_each_file_once(dock, img)
    assert again.sigterm() == 0
