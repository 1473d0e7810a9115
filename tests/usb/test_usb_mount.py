"""sources/mount.py against real filesystems on real loop devices: the options asked for are the
options in force (checked in /proc/self/mountinfo), FUSE drivers stand in where the kernel has
none, a remount puts back what a driver dropped, every tool is bounded in time, and unmounting
always leaves nothing behind."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from usb_support import (
    OPTIONS,
    Devices,
    assert_mounted_as_asked,
    content,
    mount_at,
    mounts_under,
    need,
    run,
)

from dockd.sources.mount import (
    CAMERA_OPTIONS,
    MountError,
    MountTimeout,
    check_device,
    clean_stale,
    kernel_has,
    mount_camera,
    parse_mountinfo,
    prepare_point,
    unmount,
)

HELPERS = {"vfat": "fusefat", "exfat": "mount.exfat-fuse"}
FILES = {"DCIM/100CAM/0001.MP4": content("m1", 100_000), "MISC/VERSION.TXT": b"v1.2\n"}


def test_mountinfo_lines_are_parsed_with_their_escapes() -> None:
    text = (
        "42 27 7:0 / /run/dockd/mounts/X6\\040A ro,nosuid,nodev,noexec,noatime - ext4 /dev/loop0 "
        "ro\n"
        "43 27 0:41 / /tmp/a\\134b rw,relatime shared:1 - fuse.fusefat fusefat ro,user_id=0\n"
        "garbage\n"
    )
    a, b = parse_mountinfo(text)
    assert a.point == Path("/run/dockd/mounts/X6 A") and a.fs_type == "ext4"
    assert a.options == CAMERA_OPTIONS and a.source == "/dev/loop0" and a.device == "7:0"
    assert b.point == Path("/tmp/a\\b") and b.fs_type == "fuse.fusefat" and b.source == "fusefat"
    assert b.super_options == ("ro", "user_id=0")


def test_kernel_drivers_are_read_from_proc_filesystems(tmp_path: Path) -> None:
    fs = tmp_path / "filesystems"
    fs.write_text("nodev\tsysfs\nnodev\tfuse\n\text4\n\tvfat\n")
    assert kernel_has("ext4", fs) and kernel_has("vfat", fs)
    assert not kernel_has("sysfs", fs) and not kernel_has("exfat", fs)
    assert not kernel_has("ext4", tmp_path / "missing")


async def test_ext4_is_mounted_by_the_kernel_with_every_option_then_unmounted(
    devices: Devices, tmp_path: Path
) -> None:
    cam = devices.ext4("X6M0001", FILES)
    point = tmp_path / "mounts" / "X6M0001"
    prepare_point(point)
    assert stat.S_IMODE(point.stat().st_mode) == 0o700
    assert stat.S_IMODE(point.parent.stat().st_mode) == 0o700

    m = await mount_camera(cam.loop, "ext4", point, fuse_helpers=HELPERS, limit_s=20)
    assert_mounted_as_asked(point, "ext4")
    assert (m.driver, m.mount_type, m.remounted) == ("kernel", "ext4", False)
    assert m.honoured == CAMERA_OPTIONS
    assert (point / "DCIM/100CAM/0001.MP4").read_bytes() == FILES["DCIM/100CAM/0001.MP4"]
    with pytest.raises(OSError):
        (point / "new").write_bytes(b"x")

    assert await unmount(point, limit_s=20) == "unmounted"
    assert mount_at(point) is None and not point.exists()
    assert await unmount(point, limit_s=20) == "not mounted"  # idempotent


async def test_fat32_falls_back_to_fusefat_where_the_kernel_has_no_vfat(
    devices: Devices, tmp_path: Path
) -> None:
    cam = devices.fat32("X6M0002", FILES)
    point = tmp_path / "mounts" / "X6M0002"
    prepare_point(point)
    m = await mount_camera(cam.loop, "vfat", point, fuse_helpers=HELPERS, limit_s=20)
    try:
        mounted = assert_mounted_as_asked(point, "vfat")
        if kernel_has("vfat"):
            assert m.driver == "kernel"
        else:
            # fusefat honours all five options itself
            assert (m.driver, mounted.fs_type) == ("fuse:fusefat", "fuse.fusefat")
            assert (m.honoured, m.remounted) == (CAMERA_OPTIONS, False)
        got = (point / "DCIM/100CAM/0001.MP4").read_bytes()
        assert got == FILES["DCIM/100CAM/0001.MP4"]
    finally:
        await unmount(point, limit_s=20)
    assert mount_at(point) is None


async def test_exfat_fuse_drops_noexec_and_noatime_and_a_remount_puts_them_back(
    devices: Devices, tmp_path: Path
) -> None:
    cam = devices.exfat("X6M0003", FILES)
    point = tmp_path / "mounts" / "X6M0003"
    prepare_point(point)
    m = await mount_camera(cam.loop, "exfat", point, fuse_helpers=HELPERS, limit_s=20)
    try:
        assert_mounted_as_asked(point, "exfat")
        assert set(m.options) == set(OPTIONS)
        if m.driver == "fuse:mount.exfat-fuse":
            assert m.mount_type == "fuseblk"
            assert m.honoured == ("ro", "nosuid", "nodev") and m.remounted
        assert (point / "MISC/VERSION.TXT").read_bytes() == b"v1.2\n"
    finally:
        await unmount(point, limit_s=20)


async def test_a_mount_that_fails_names_the_device_and_leaves_nothing_mounted(
    devices: Devices, tmp_path: Path
) -> None:
    need()
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(4 * 1024**2))
    loop = run("losetup", "-f", "--show", str(blank)).stdout.strip()
    devices.loops.append(loop)
    point = tmp_path / "mounts" / "BLANK"
    prepare_point(point)
    with pytest.raises(MountError, match=loop):
        await mount_camera(loop, "ext4", point, fuse_helpers=HELPERS, limit_s=20)
    assert mount_at(point) is None


async def test_a_helper_that_hangs_is_killed_at_the_deadline(
    devices: Devices, tmp_path: Path
) -> None:
    cam = devices.ext4("X6M0004", FILES)
    hang = tmp_path / "hanging-helper"
    pidfile = tmp_path / "helper.pid"
    hang.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    hang.chmod(0o755)
    point = tmp_path / "mounts" / "X6M0004"
    prepare_point(point)
    started = time.monotonic()
    with pytest.raises(MountTimeout, match="did not finish within 1 s"):
        # a type no kernel has: the kernel attempt fails at once and the helper is used
        await mount_camera(
            cam.loop, "dockdtestfs", point, fuse_helpers={"dockdtestfs": str(hang)}, limit_s=1
        )
    assert time.monotonic() - started < 8
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert mount_at(point) is None


async def test_unknown_filesystem_without_helper_is_a_clear_error(
    devices: Devices, tmp_path: Path
) -> None:
    cam = devices.ext4("X6M0005", FILES)
    point = tmp_path / "mounts" / "X6M0005"
    prepare_point(point)
    with pytest.raises(MountError, match="unknown filesystem type"):
        await mount_camera(cam.loop, "dockdtestfs", point, fuse_helpers={}, limit_s=20)


async def test_a_busy_mount_is_detached_lazily(devices: Devices, tmp_path: Path) -> None:
    cam = devices.ext4("X6M0006", FILES)
    point = tmp_path / "mounts" / "X6M0006"
    prepare_point(point)
    await mount_camera(cam.loop, "ext4", point, fuse_helpers=HELPERS, limit_s=20)
    held = os.open(point / "MISC/VERSION.TXT", os.O_RDONLY)  # a copy in progress
    try:
        assert await unmount(point, limit_s=20) == "detached"
        assert mount_at(point) is None
        assert os.read(held, 100) == b"v1.2\n"  # what was open stays readable until closed
    finally:
        os.close(held)


async def test_stale_mounts_under_mount_dir_are_removed_and_nothing_else(
    devices: Devices, tmp_path: Path
) -> None:
    mount_dir = tmp_path / "mounts"
    a = devices.ext4("X6M0007", FILES)
    b = devices.ext4("X6M0008", FILES)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    prepare_point(mount_dir / "X6M0007")
    run("mount", "-o", "ro", a.loop, str(mount_dir / "X6M0007"))  # what a kill -9 leaves
    (mount_dir / "EMPTYDIR").mkdir()
    run("mount", "-o", "ro", b.loop, str(outside))
    try:
        removed = await clean_stale(mount_dir, limit_s=20)
        assert [e.point for e in removed] == [mount_dir / "X6M0007"]
        assert mounts_under(mount_dir) == [] and list(mount_dir.iterdir()) == []
        assert mount_at(outside) is not None
    finally:
        run("umount", str(outside))


async def test_device_node_is_checked_against_udev_without_opening_it(
    devices: Devices,
) -> None:
    cam = devices.ext4("X6M0009", FILES)
    check_device(cam.loop, cam.major, cam.minor)
    with pytest.raises(MountError, match="udev said"):
        check_device(cam.loop, cam.major, cam.minor + 1000)
    with pytest.raises(MountError, match="not a block device"):
        check_device("/dev/null", None, None)
