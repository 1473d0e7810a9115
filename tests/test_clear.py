"""Clearing decisions (clear.py, and the udev source's medium and label checks): pure functions,
no camera, no daemon. The end-to-end behaviour on real filesystems is in tests/usb/test_usb_clear.py
and tests/scenarios/test_scenario_offload.py."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from dockd.clear import (
    Listings,
    camera_path,
    changed_on_camera,
    plan,
    refusal,
    stat_differs,
    why_not_now,
)
from dockd.ids import CameraId, SessionId
from dockd.journal import FileRow, FileState
from dockd.sources.mount import Mounted
from dockd.sources.udev import BlockDevice, clear_point, label_files, same_medium

NS = 1_700_000_000_000_000_000


def row(path: str, state: FileState = FileState.STORED, **kw: object) -> FileRow:
    fields: dict[str, object] = {
        "id": 1,
        "session_id": SessionId("S"),
        "camera": CameraId("X6"),
        "path": path,
        "raw_path": None,
        "size": 10,
        "mtime_ns": NS,
        "state": state,
        "sha256": "0" * 64,
        "key": None,
        "error": None,
    }
    fields.update(kw)
    return FileRow(**fields)  # type: ignore[arg-type]


def st(mode: int = stat.S_IFREG | 0o600, size: int = 10, mtime_ns: int = NS) -> os.stat_result:
    s = mtime_ns // 10**9
    # (mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime) + float times + ns times
    return os.stat_result(
        (mode, 1, 1, 1, 0, 0, size, s, s, s, float(s), float(s), float(s), NS, mtime_ns, NS)
    )


# -- whether to clear at all ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [FileState.FAILED, FileState.UNSTABLE])
def test_a_session_with_a_failed_or_unstable_file_is_never_cleared(bad: FileState) -> None:
    why = refusal([row("a"), row("b", bad)])
    assert why is not None and "camera keeps everything" in why


@pytest.mark.parametrize("waiting", [FileState.PENDING, FileState.VERIFIED])
def test_a_session_not_all_in_the_store_is_not_cleared(waiting: FileState) -> None:
    assert refusal([row("a"), row("b", waiting)]) == "not every file is in the store yet"


def test_stored_cleared_and_abandoned_files_allow_clearing() -> None:
    # abandoned: never copied (undocked first), never removed either; the next docking has it
    states = [FileState.STORED, FileState.CLEARED, FileState.ABANDONED]
    assert refusal([row(str(i), s) for i, s in enumerate(states)]) is None
    assert refusal([]) is None


def test_why_not_now() -> None:
    assert why_not_now(docked=True, reading=False, clearable=True) is None
    gone = why_not_now(docked=False, reading=False, clearable=True)
    assert gone is not None and "undocked" in gone
    busy = why_not_now(docked=True, reading=True, clearable=True)
    assert busy is not None and "offloaded again" in busy
    cannot = why_not_now(docked=True, reading=False, clearable=False)
    assert cannot is not None and "cannot delete" in cannot
    # undocked wins: it is what the operator can act on
    assert why_not_now(docked=False, reading=True, clearable=False) == gone


# -- which files ------------------------------------------------------------------------------


def test_only_stored_files_are_candidates_and_kept_paths_are_never_touched() -> None:
    files = [
        row("DCIM/1.MP4"),
        row("DCIM/2.MP4", FileState.CLEARED),  # gone already
        row("DCIM/3.MP4", FileState.ABANDONED),  # not in the store
        row("BODYCAM", size=0),  # the label as fusefat shows it
    ]
    p = plan(files, frozenset({"BODYCAM"}))
    assert [f.path for f in p.clear] == ["DCIM/1.MP4"]
    assert [f.path for f in p.keep] == ["BODYCAM"]
    assert [f.path for f in plan(files).clear] == ["DCIM/1.MP4", "BODYCAM"]


def test_the_recorded_path_is_used_as_it_is_never_case_folded() -> None:
    assert camera_path(b"/m/X6@clear", row("DCIM/CLIP.MP4")) == b"/m/X6@clear/DCIM/CLIP.MP4"
    raw = row("DCIM/%FF.MP4", raw_path=b"DCIM/\xff.MP4")
    assert camera_path(b"/m", raw) == b"/m/DCIM/\xff.MP4"


def test_metadata_that_differs_from_the_offload() -> None:
    f = row("a")
    assert stat_differs(st(), f) is None
    assert stat_differs(st(size=11), f) == "size changed (10 -> 11)"
    assert stat_differs(st(mtime_ns=NS + 2 * 10**9), f) is not None  # FAT's 2 s: not equal
    assert stat_differs(st(mtime_ns=NS + 1), f) is not None  # no tolerance at all
    assert stat_differs(st(mode=stat.S_IFLNK | 0o777), f) == "no longer a regular file"


# -- the file check (a temporary directory: ext4/tmpfs, names case-sensitive) -------------------


def test_changed_on_camera_checks_name_size_mtime_and_sha256(tmp_path: Path) -> None:
    data = b"footage" * 100
    p = tmp_path / "CLIP.MP4"
    p.write_bytes(data)
    s = os.stat(p)
    f = row(
        "CLIP.MP4", size=len(data), mtime_ns=s.st_mtime_ns, sha256=hashlib.sha256(data).hexdigest()
    )
    path = camera_path(os.fsencode(tmp_path), f)
    assert changed_on_camera(path, f, Listings()) is None

    other = bytes(b ^ 1 for b in data)  # same size, same mtime, other bytes
    p.write_bytes(other)
    os.utime(p, ns=(s.st_atime_ns, s.st_mtime_ns))
    assert changed_on_camera(path, f) == "its bytes differ from the stored copy"

    p.unlink()
    (tmp_path / "clip.mp4").write_bytes(data)  # another name: not the recorded one
    assert changed_on_camera(path, f) == "gone from the camera"
    os.symlink("clip.mp4", p)
    assert changed_on_camera(path, f) == "no longer a regular file"


def test_a_name_missing_from_its_directory_listing_is_not_the_recorded_file(
    tmp_path: Path,
) -> None:
    """What a case-insensitive filesystem does (a lookup of `A.MP4` finding `a.mp4`), made here
    with a listing read before the rename: the exact name must be in the listing."""
    data = b"x" * 10
    (tmp_path / "A.MP4").write_bytes(data)
    s = os.stat(tmp_path / "A.MP4")
    f = row("A.MP4", size=10, mtime_ns=s.st_mtime_ns, sha256=hashlib.sha256(data).hexdigest())
    path = camera_path(os.fsencode(tmp_path), f)
    listings = Listings()
    assert listings.has(path)
    assert not listings.has(os.path.join(os.fsencode(tmp_path), b"a.mp4"))


# -- the udev source: same medium, label, mount point --------------------------------------------


def dev(**kw: object) -> BlockDevice:
    fields: dict[str, object] = {
        "devpath": "/devices/x/sdb/sdb1",
        "sysname": "sdb1",
        "devname": "/dev/sdb1",
        "fs_type": "vfat",
        "fs_uuid": "1234-ABCD",
        "fs_label": "BODYCAM",
        "serial": "X6039B2A3",
        "major": 8,
        "minor": 17,
    }
    fields.update(kw)
    return BlockDevice(**fields)  # type: ignore[arg-type]


def test_only_the_same_medium_is_written_to() -> None:
    then = dev()
    assert same_medium(then, dev()) is None
    assert same_medium(then, None) == "the device is gone"
    assert "serial" in (same_medium(then, dev(serial="X6000000")) or "")
    assert "UUID" in (same_medium(then, dev(fs_uuid="9999-0000")) or "")
    assert "no filesystem" in (same_medium(then, dev(fs_type=None)) or "")
    assert "device node" in (same_medium(then, dev(devname="/dev/sdc1")) or "")
    assert "device node" in (same_medium(then, dev(minor=33)) or "")
    # a medium udev gave no UUID: serial, type and node must do
    assert same_medium(dev(fs_uuid=None), dev(fs_uuid=None)) is None


def mounted(driver: str) -> Mounted:
    return Mounted(Path("/m/X6@clear"), "/dev/sdb1", "vfat", driver, "x", (), False, (), True)


def test_the_fat_label_fusefat_shows_as_a_file_is_kept() -> None:
    assert label_files(dev(), mounted("fuse:fusefat")) == {"BODYCAM"}
    # udev's ID_FS_LABEL mangles blanks; the _ENC form has the label as it is
    spaced = dev(fs_label="MY_CAM", fs_label_enc="MY\\x20CAM")
    assert label_files(spaced, mounted("fuse:fusefat")) == {"MY_CAM", "MY CAM"}
    assert label_files(dev(), mounted("kernel")) == frozenset()  # the kernel lists no label
    assert label_files(dev(fs_type="exfat"), mounted("fuse:mount.exfat-fuse")) == frozenset()
    assert label_files(dev(fs_label=None), mounted("fuse:fusefat")) == frozenset()


def test_the_clear_mount_point_cannot_be_a_camera_mount_point() -> None:
    p = clear_point(Path("/run/dockd/mounts"), "X6039B2A3")
    assert p == Path("/run/dockd/mounts/X6039B2A3@clear")
    from dockd.ids import camera_id

    assert camera_id(p.name) is None  # no camera can be named like it
