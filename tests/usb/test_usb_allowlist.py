"""The allowlist and the other judgements made from udev's facts alone, before anything touches a
device (SPEC §4 `[[sources.udev.match]]`, §5 camera ids)."""

from __future__ import annotations

from typing import Any

import pytest

from dockd.config import UdevMatch, parse_config
from dockd.errors import ConfigError
from dockd.sources.udev import BlockDevice, holds, refusal

CAMERA = BlockDevice(
    devpath="/devices/usb1/1-1/block/sdb/sdb1",
    sysname="sdb1",
    devname="/dev/sdb1",
    devtype="partition",
    bus="usb",
    fs_type="vfat",
    fs_usage="filesystem",
    fs_label="CAMERA",
    fs_uuid="1234-ABCD",
    serial="X6039B2A3",
    vendor_id="2a2b",
    model_id="0001",
)


def entry(**fields: Any) -> UdevMatch:
    return UdevMatch.model_validate(fields)


def dev(**changes: Any) -> BlockDevice:
    return BlockDevice(**{**CAMERA.__dict__, **changes})


def test_every_given_field_must_hold() -> None:
    full = entry(vendor_id="2A2B", model_id="0001", serial="^X6[0-9A-F]{7}$", fs_label="^CAMERA$")
    assert holds(full, CAMERA)
    assert not holds(full, dev(vendor_id="2a2c"))
    assert not holds(full, dev(model_id="0002"))
    assert not holds(full, dev(serial="Y6039B2A3"))
    assert not holds(full, dev(serial=None))
    assert not holds(full, dev(fs_label="NO_NAME"))
    assert not holds(full, dev(fs_label=None))


def test_fields_left_out_match_anything() -> None:
    assert holds(entry(vendor_id="2a2b"), dev(model_id=None, serial=None, fs_label=None))


def test_a_device_is_a_camera_if_any_entry_holds() -> None:
    entries = [entry(vendor_id="1111"), entry(vendor_id="2a2b", model_id="0001")]
    assert refusal(CAMERA, entries) is None
    why = refusal(dev(vendor_id="0781", model_id="5567"), entries)
    assert why is not None and "no [[sources.udev.match]] entry holds" in why
    assert "vendor_id 0781" in why and "model_id 5567" in why


def test_regexes_are_searched_as_written() -> None:
    assert holds(entry(vendor_id="2a2b", serial="39B"), CAMERA)
    assert not holds(entry(vendor_id="2a2b", serial="^39B"), CAMERA)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"serial": "X6 BAD/../1"}, "is not a usable camera id"),
        ({"serial": "."}, "is not a usable camera id"),
        ({"serial": "x" * 65}, "is not a usable camera id"),
        ({"serial": None}, "no USB serial"),
        ({"fs_type": None}, "no filesystem udev recognises"),
        ({"fs_usage": "crypto", "fs_type": "crypto_LUKS"}, "not a filesystem"),
        ({"fs_type": "ext4 -o rw"}, "not one dockd can name"),
        ({"devname": None}, "no device node"),
    ],
)
def test_an_allowlisted_device_that_cannot_be_a_camera_is_refused(
    changes: dict[str, Any], reason: str
) -> None:
    why = refusal(dev(**changes), [entry(vendor_id="2a2b")])
    assert why is not None and reason in why


def test_candidates_are_usb_filesystems_partitions_or_whole_disks() -> None:
    assert CAMERA.candidate
    assert dev(devtype="disk").candidate  # a card without a partition table
    assert not dev(devtype="disk", fs_type=None).candidate  # the disk holding partitions
    assert not dev(bus="ata").candidate and not dev(bus=None).candidate


def test_udev_keys_have_defaults_and_are_checked() -> None:
    base = {"sources": {"udev": {"enabled": True, "match": [{"vendor_id": "2a2b"}]}}}
    cfg = parse_config(base)
    assert str(cfg.sources.udev.mount_dir) == "/run/dockd/mounts"
    assert cfg.sources.udev.fuse_helpers == {"vfat": "fusefat", "exfat": "mount.exfat-fuse"}
    assert cfg.sources.udev.mount_timeout == 30.0
    for bad, key in [
        ({"mount_dir": "mounts"}, "sources.udev.mount_dir"),
        ({"mount_timeout": "0s"}, "sources.udev.mount_timeout"),
        ({"fuse_helpers": {"vfat": " "}}, "sources.udev.fuse_helpers"),
        ({"fuse_helpers": {"V FAT": "fusefat"}}, "sources.udev.fuse_helpers"),
    ]:
        data = {"sources": {"udev": {**base["sources"]["udev"], **bad}}}
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_config(data)
