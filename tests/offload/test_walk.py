"""walk(): what gets copied from a camera, on real files and a real faulty device."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dockd.offload.walk import Filter, Found, Skipped, encode_path, glob_regex, walk

if TYPE_CHECKING:
    from conftest import BadBlockCamera

# SPEC §4 defaults
DEFAULTS = Filter(["**/*"], [".*", "**/.*", "System Volume Information/**"])


def listing(root: Path | bytes, filt: Filter = DEFAULTS) -> list[tuple[str, str]]:
    """(path, "file" or the skip reason) for each entry, in walk order."""
    root = os.fsencode(root)
    return [(e.path, "file" if isinstance(e, Found) else e.reason) for e in walk(root, filt)]


def touch(root: Path | bytes, *rels: str | bytes, data: bytes = b"x") -> None:
    for rel in rels:
        path = os.path.join(os.fsencode(root), os.fsencode(rel))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def test_default_globs_list_camera_files_and_prune_hidden_dirs_and_system_volume_information(
    tmp_path: Path,
) -> None:
    touch(
        tmp_path,
        "DCIM/100CAM/0001.MP4",
        "DCIM/100CAM/0001.JPG",
        "DCIM/100CAM/.0001.MP4.tmp",
        "DCIM/.thumbs/0001.jpg",
        "DCIM/.thumbs/deeper/0002.jpg",
        ".Trashes/501/0003.MP4",
        ".hidden",
        "System Volume Information/IndexerVolumeGuid",
        "System Volume Information/sub/x.dat",
        "MISC/VERSION.TXT",
        "notes.txt",
    )
    assert listing(tmp_path) == [
        ("notes.txt", "file"),
        ("DCIM/100CAM/0001.JPG", "file"),
        ("DCIM/100CAM/0001.MP4", "file"),
        ("MISC/VERSION.TXT", "file"),
    ]
    # "DCIM/.thumbs/0001.jpg" matches no exclude pattern by itself ("**/.*" wants the dot in the
    # last name): it is missing only because the hidden directory was pruned, not descended.
    assert not DEFAULTS.excluded("DCIM/.thumbs/0001.jpg")


def test_include_and_exclude_globs_select_by_pattern(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "0000.MP4",
        "DCIM/0001.MP4",
        "DCIM/100CAM/0002.MP4",
        "DCIM/100CAM/0002.JPG",
        "DCIM/100CAM/0003_TMP.MP4",
        "DCIM/100CAM/sub/0004.MP4",
    )
    os.symlink("0002.MP4", tmp_path / "DCIM/100CAM/link.MP4")
    os.symlink("0002.JPG", tmp_path / "DCIM/100CAM/link.JPG")  # not wanted: not even listed
    filt = Filter(["DCIM/**/*.MP4"], ["**/*_TMP.MP4"])
    assert listing(tmp_path, filt) == [
        ("DCIM/0001.MP4", "file"),
        ("DCIM/100CAM/0002.MP4", "file"),
        ("DCIM/100CAM/link.MP4", "symlink"),
        ("DCIM/100CAM/sub/0004.MP4", "file"),
    ]


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*.MP4", "a.MP4", True),
        ("*.MP4", "DCIM/a.MP4", False),  # * stays within one name
        ("**/*.MP4", "a.MP4", True),  # **/ may be empty
        ("**/*.MP4", "DCIM/100CAM/a.MP4", True),
        ("DCIM/**", "DCIM/100CAM/a.MP4", True),
        ("DCIM/**", "DCIMX/a.MP4", False),
        ("?.MP4", "a.MP4", True),
        ("?.MP4", "ab.MP4", False),
        ("?", "/", False),
        ("[!0-9]*.MP4", "a1.MP4", True),
        ("[!0-9]*.MP4", "1a.MP4", False),
        ("[0-9][0-9].MP4", "42.MP4", True),
        ("a[", "a[", True),  # an unclosed bracket is literal
        ("a+b(1).MP4", "a+b(1).MP4", True),  # regex metacharacters are literal
        ("a+b(1).MP4", "aab1.MP4", False),
        (".*", ".Trashes", True),
        (".*", "DCIM/.thumbs", False),
        ("**/.*", "DCIM/.thumbs", True),
        ("**/.*", ".Trashes", True),
        ("System Volume Information/**", "System Volume Information/sub/x", True),
        ("*", "line\nbreak", True),  # names may hold any byte but "/" and NUL
    ],
)
def test_glob_regex_semantics(pattern: str, path: str, matches: bool) -> None:
    assert bool(glob_regex(pattern).match(path)) is matches


def test_symlinks_to_file_and_directory_are_skipped_and_never_followed(tmp_path: Path) -> None:
    touch(tmp_path, "real/clip.MP4")
    os.makedirs(tmp_path / "DCIM")
    os.symlink("../real/clip.MP4", tmp_path / "DCIM/link.MP4")
    os.symlink("../real", tmp_path / "DCIM/linkdir")
    os.symlink("/etc", tmp_path / "DCIM/outside")  # out of the camera altogether
    os.symlink("missing.MP4", tmp_path / "DCIM/dangling.MP4")
    os.symlink("loop", tmp_path / "DCIM/loop")  # a link to itself
    entries = list(walk(os.fsencode(tmp_path), DEFAULTS))
    assert [(e.path, "file" if isinstance(e, Found) else e.reason) for e in entries] == [
        ("DCIM/dangling.MP4", "symlink"),
        ("DCIM/link.MP4", "symlink"),
        ("DCIM/linkdir", "symlink"),
        ("DCIM/loop", "symlink"),
        ("DCIM/outside", "symlink"),
        ("real/clip.MP4", "file"),
    ]
    assert all(isinstance(e, Skipped) for e in entries if e.path.startswith("DCIM/"))


def test_fifo_socket_and_device_nodes_are_skipped_with_reason_and_never_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod of device nodes needs root")
    cam = tmp_path / "cam"
    (cam / "DEV").mkdir(parents=True)
    os.mkfifo(cam / "DEV/fifo.MP4")  # opening it for reading would block: the walk must not
    os.mknod(cam / "DEV/char.MP4", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(cam / "DEV/block.MP4", 0o600 | stat.S_IFBLK, os.makedev(7, 250))
    monkeypatch.chdir(cam / "DEV")  # a relative bind keeps clear of the 108-byte sun_path limit
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind("sock.MP4")
        touch(cam, "DEV/real.MP4")
        assert listing(cam) == [
            ("DEV/block.MP4", "device"),
            ("DEV/char.MP4", "device"),
            ("DEV/fifo.MP4", "fifo"),
            ("DEV/real.MP4", "file"),
            ("DEV/sock.MP4", "socket"),
        ]


def test_non_utf8_name_is_percent_encoded_and_its_raw_bytes_kept(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path)
    touch(root, b"clip\xff.MP4", b"DIR\xfe/a.MP4", "café.MP4", "100%.MP4")
    os.symlink(b"clip\xff.MP4", os.path.join(root, b"link\xff.MP4"))
    entries = {e.path: e for e in walk(root, DEFAULTS)}
    assert set(entries) == {"100%.MP4", "café.MP4", "clip%FF.MP4", "link%FF.MP4", "DIR%FE/a.MP4"}

    clip = entries["clip%FF.MP4"]
    assert isinstance(clip, Found)
    assert (clip.rel, clip.raw_path) == (b"clip\xff.MP4", b"clip\xff.MP4")
    with open(os.path.join(root, clip.rel), "rb") as f:  # rel reaches the file
        assert f.read() == b"x"
    nested = entries["DIR%FE/a.MP4"]
    assert (nested.rel, nested.raw_path) == (b"DIR\xfe/a.MP4", b"DIR\xfe/a.MP4")
    link = entries["link%FF.MP4"]
    assert isinstance(link, Skipped)
    assert (link.reason, link.raw_path) == ("symlink", b"link\xff.MP4")
    # valid UTF-8 names are kept as they are, with no raw bytes beside them
    assert entries["café.MP4"].raw_path is None
    assert entries["café.MP4"].rel == "café.MP4".encode()
    assert entries["100%.MP4"].raw_path is None


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (b"clip\xff.MP4", "clip%FF.MP4"),
        (b"\x80", "%80"),
        (b"caf\xc3\xa9\xff", "café%FF"),  # only the offending byte is encoded
        (b"\xed\xa0\x80", "%ED%A0%80"),  # an encoded surrogate is not UTF-8
        (b"\xc3", "%C3"),  # truncated sequence
    ],
)
def test_encode_path_percent_encodes_only_invalid_bytes(raw: bytes, path: str) -> None:
    assert encode_path(raw) == (path, raw)


def test_encode_path_keeps_utf8_as_is() -> None:
    assert encode_path("DCIM/é/100%.MP4".encode()) == ("DCIM/é/100%.MP4", None)


def test_walk_order_is_byte_order_files_first_then_subdirectories_depth_first_and_stable(
    tmp_path: Path,
) -> None:
    expected = [
        "B.MP4",
        "_x.MP4",
        "a.MP4",
        "b.MP4",
        "é.MP4",
        "A/2.MP4",
        "A/a.MP4",
        "A/A/4.MP4",
        "A/B/3.MP4",
        "A/B/C/D/E/6.MP4",
        "Z/1.MP4",
        "a/5.MP4",
    ]
    for rel in reversed(expected):  # creation order must not matter
        touch(tmp_path, rel)
    first = listing(tmp_path)
    assert [p for p, _ in first] == expected
    assert listing(tmp_path) == first


def test_found_carries_the_files_own_size_and_mtime(tmp_path: Path) -> None:
    touch(tmp_path, "DCIM/0001.MP4", data=b"y" * 12345)
    os.utime(tmp_path / "DCIM/0001.MP4", ns=(1_700_000_000_123_456_789, 1_600_000_000_987_654_321))
    (found,) = walk(os.fsencode(tmp_path), DEFAULTS)
    assert isinstance(found, Found)
    assert (found.size, found.mtime_ns) == (12345, 1_600_000_000_987_654_321)


def test_empty_directories_yield_nothing(tmp_path: Path) -> None:
    (tmp_path / "DCIM/100CAM").mkdir(parents=True)
    assert listing(tmp_path) == []


def test_missing_camera_root_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(walk(os.fsencode(tmp_path / "gone"), DEFAULTS))


def test_unreadable_subdirectory_is_reported_skipped_and_the_walk_goes_on(
    bad_block_camera: BadBlockCamera,
) -> None:
    cam = bad_block_camera
    entries = list(walk(os.fsencode(cam.root), DEFAULTS))
    assert [(e.path, "file" if isinstance(e, Found) else e.reason) for e in entries] == [
        ("DCIM/100CAM/0001.MP4", "file"),
        ("DCIM/100CAM/0002.MP4", "file"),
        (cam.bad_file, "file"),  # its inode is readable; its data is not
        ("DCIM/101CAM/0001.MP4", "file"),
        (cam.bad_dir, "unreadable_directory: Input/output error"),
        ("MISC/VERSION.TXT", "file"),
    ]
    sizes = {e.path: e.size for e in entries if isinstance(e, Found)}
    assert sizes == {**{p: len(d) for p, d in cam.good.items()}, cam.bad_file: cam.bad_size}
