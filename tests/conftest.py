"""Shared fixtures: real devices with real faults.

`bad_block_camera` is an ext4 camera whose blocks under one file's tail and under one directory
fail with EIO, from the block layer, the way a worn card's bad sectors do. Two ways to build it:

- "device-mapper": the image on a loop device, under a dm table that maps it linearly except
  the bad blocks, which use dm's `error` target (needs `dmsetup` and a kernel with device-mapper;
  skipped with the reason otherwise);
- "nested-loop": for kernels without device-mapper. The camera image is a file on a "carrier"
  ext4 filesystem laid out so that the camera's bad blocks are the carrier's last ones; after both
  are mounted, the carrier's loop device is shrunk (`losetup -c`) below them. The camera's loop
  device then gets EIO for exactly those blocks, from the carrier's device, like a bad sector.

Both need root, `mkfs.ext4`/`debugfs`/`dumpe2fs` (e2fsprogs) and `losetup`/`mount` (util-linux).
Setup never reads the camera before the test does: a fresh mount has nothing cached.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

CAMERA_MOUNT_OPTIONS = "ro,nosuid,nodev,noexec,noatime"
BLOCK = 4096
SECTORS_PER_BLOCK = BLOCK // 512
IMAGE_SIZE = 16 * 1024**2  # one ext4 block group: all metadata sits before the files

BAD_FILE = "DCIM/100CAM/0009.MP4"
BAD_FILE_SIZE = 512 * 1024
BAD_OFFSET = 128 * 1024  # first unreadable byte of BAD_FILE (a block boundary)
BAD_DIR = "DCIM/102CAM"
GOOD_SIZES = {
    "DCIM/100CAM/0001.MP4": 300_000,
    "DCIM/100CAM/0002.MP4": 5_000,
    "DCIM/101CAM/0001.MP4": 1_000,
    "MISC/VERSION.TXT": 12,
}


@dataclass(frozen=True)
class BadBlockCamera:
    root: Path  # the mountpoint, mounted with CAMERA_MOUNT_OPTIONS
    bad_file: str  # relative path of the file whose bytes from bad_offset on are unreadable
    bad_size: int
    bad_offset: int
    bad_dir: str  # relative path of a directory whose entries are unreadable
    good: dict[str, bytes]  # every readable file: relative path -> content
    method: str  # "device-mapper" or "nested-loop"


def _run(*cmd: str, stdin: str | None = None) -> str:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _require(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: loop devices and mounts")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no /dev/loop-control: this kernel has no loop devices")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing tools {missing} (packages e2fsprogs, util-linux, mount, dmsetup)")


def _mkfs(src: Path, image: Path) -> None:
    """ext4 in `image` (an existing file), filled from `src`; no journal, errors=continue."""
    opts = ["-q", "-F", "-b", str(BLOCK), "-O", "^has_journal", "-e", "continue"]
    _run("mkfs.ext4", *opts, "-d", str(src), str(image))


def _blocks(image: Path, path: str) -> list[int]:
    """Physical blocks of `path` in `image`, in logical order."""
    out = _run("debugfs", "-R", f"blocks /{path}", str(image))
    return [int(b) for b in out.split()]


def _used_blocks(image: Path) -> set[int]:
    """Every allocated block of a one-group ext4 image (metadata included)."""
    out = _run("dumpe2fs", str(image))
    count = int(re.search(r"^Block count:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    used = set(range(count))
    for line in re.findall(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, (p.strip() for p in line.split(","))):
            lo, _, hi = part.partition("-")
            used -= set(range(int(lo), int(hi or lo) + 1))
    return used


def _loop_attach(stack: ExitStack, backing: Path, *, read_only: bool) -> str:
    cmd = ["losetup", "-f", "--show", *(["-r"] if read_only else []), str(backing)]
    dev = _run(*cmd).strip()
    stack.callback(_run, "losetup", "-d", dev)
    return dev


def _mount(stack: ExitStack, dev: str, where: Path, options: str) -> None:
    where.mkdir()
    _run("mount", "-t", "ext4", "-o", options, dev, str(where))
    stack.callback(_run, "umount", str(where))


def _make_camera_image(tmp: Path) -> tuple[Path, dict[str, bytes], set[int], int]:
    """The camera image, its good files, its bad blocks and the first bad block.

    The good files go in with `mkfs.ext4 -d`; the bad file, then the bad directory (with a file
    in it) are added afterwards with debugfs, which allocates them after everything else, so the
    bad blocks are the image's last allocated ones. That is checked, not assumed.
    """
    rng = random.Random(20261124)  # fixed: the same camera every run
    src = tmp / "camera-src"
    good: dict[str, bytes] = {}
    for rel, size in GOOD_SIZES.items():
        good[rel] = rng.randbytes(size)
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(good[rel])
    (src / BAD_DIR).parent.mkdir(parents=True, exist_ok=True)
    bad_data = tmp / "bad.bin"
    bad_data.write_bytes(rng.randbytes(BAD_FILE_SIZE))  # random: no block is a hole
    inner = tmp / "inner.bin"
    inner.write_bytes(rng.randbytes(2 * BLOCK))

    image = tmp / "camera.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    _mkfs(src, image)
    bad_parent, bad_name = BAD_FILE.rsplit("/", 1)
    script = [
        f"cd /{bad_parent}",
        f"write {bad_data} {bad_name}",
        f"mkdir /{BAD_DIR}",
        f"cd /{BAD_DIR}",
        f"write {inner} 0003.MP4",
    ]
    _run("debugfs", "-w", "-f", "-", str(image), stdin="\n".join(script) + "\n")

    file_blocks = _blocks(image, BAD_FILE)
    assert len(file_blocks) == BAD_FILE_SIZE // BLOCK, "debugfs did not write the bad file"
    bad = set(file_blocks[BAD_OFFSET // BLOCK :])
    bad |= set(_blocks(image, BAD_DIR)) | set(_blocks(image, BAD_DIR + "/0003.MP4"))
    first_bad = min(bad)
    assert first_bad == file_blocks[BAD_OFFSET // BLOCK], "bad file is not laid out as planned"
    used = _used_blocks(image)
    assert bad <= used
    assert {b for b in used if b >= first_bad} == bad, "a good block lies among the bad ones"
    return image, good, bad, first_bad


def _dm_table(loop: str, bad: set[int]) -> str:
    """linear over `loop`, except runs of bad blocks, which go to the error target."""
    total = IMAGE_SIZE // 512
    lines: list[str] = []
    start = 0  # sector
    for block in sorted(bad):
        sector = block * SECTORS_PER_BLOCK
        if lines and lines[-1].endswith(" error") and start == sector:
            s, n, _ = lines[-1].split()
            lines[-1] = f"{s} {int(n) + SECTORS_PER_BLOCK} error"
        else:
            if sector > start:
                lines.append(f"{start} {sector - start} linear {loop} {start}")
            lines.append(f"{sector} {SECTORS_PER_BLOCK} error")
        start = sector + SECTORS_PER_BLOCK
    if start < total:
        lines.append(f"{start} {total - start} linear {loop} {start}")
    return "\n".join(lines) + "\n"


def _require_device_mapper() -> None:
    _require("dmsetup")
    probe = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no output"])[0]
        pytest.skip(f"kernel has no device-mapper ({reason}); the nested-loop variant covers it")
    if not any(line.split()[:1] == ["error"] for line in probe.stdout.splitlines()):
        pytest.skip("device-mapper has no `error` target; the nested-loop variant covers it")


def _device_mapper(stack: ExitStack, tmp: Path, image: Path, bad: set[int]) -> Path:
    loop = _loop_attach(stack, image, read_only=False)
    name = f"dockd-test-{uuid.uuid4().hex[:12]}"
    _run("dmsetup", "create", "--noudevsync", name, stdin=_dm_table(loop, bad))
    stack.callback(_run, "dmsetup", "remove", "--noudevsync", "--retry", name)
    _run("dmsetup", "mknodes", name)  # no udev here to make /dev/mapper/<name>
    root = tmp / "camera"
    _mount(stack, f"/dev/mapper/{name}", root, CAMERA_MOUNT_OPTIONS)
    return root


def _nested_loop(stack: ExitStack, tmp: Path, image: Path, bad: set[int], first_bad: int) -> Path:
    carrier_src = tmp / "carrier-src"
    carrier_src.mkdir()
    shutil.copyfile(image, carrier_src / "camera.img")
    carrier = tmp / "carrier.img"
    with open(carrier, "wb") as f:
        f.truncate(2 * IMAGE_SIZE)
    _mkfs(carrier_src, carrier)

    # Where each used camera block sits in the carrier (0: a hole, all zeros, never read).
    used = sorted(_used_blocks(image))
    script = "".join(f"bmap /camera.img {b}\n" for b in used)
    out = _run("debugfs", "-f", "-", str(carrier), stdin=script)
    phys = [int(x) for x in re.findall(r"^(\d+)$", out, re.M)]
    assert len(phys) == len(used), out
    where = dict(zip(used, phys, strict=True))
    cut = where[first_bad]
    assert all(where[b] >= cut for b in bad), "a bad camera block lies before the cut"
    assert all(where[b] < cut for b in used if b not in bad), "a good block lies after the cut"
    bad_phys = {where[b] for b in bad}
    assert {b for b in _used_blocks(carrier) if b >= cut} <= bad_phys, "carrier tail not bad"

    carrier_loop = _loop_attach(stack, carrier, read_only=True)
    _mount(stack, carrier_loop, tmp / "carrier", "ro")
    camera_loop = _loop_attach(stack, tmp / "carrier" / "camera.img", read_only=True)
    root = tmp / "camera"
    _mount(stack, camera_loop, root, CAMERA_MOUNT_OPTIONS)
    # Now the carrier's device ends where the bad blocks begin.
    with open(carrier, "r+b") as f:
        f.truncate(cut * BLOCK)
    _run("losetup", "-c", carrier_loop)
    size = int(_run("blockdev", "--getsize64", carrier_loop))
    assert size == cut * BLOCK, f"{carrier_loop} is {size} bytes after losetup -c"
    return root


@pytest.fixture(params=["device-mapper", "nested-loop"])
def bad_block_camera(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BadBlockCamera]:
    """A mounted ext4 camera with bad blocks under BAD_FILE's tail and under BAD_DIR.

    Teardown unmounts and detaches (dm device, loop devices) exactly what this setup made,
    in reverse order, even when setup failed half-way."""
    _require("mkfs.ext4", "debugfs", "dumpe2fs", "losetup", "mount", "umount", "blockdev")
    method: str = request.param
    if method == "device-mapper":
        _require_device_mapper()
    with ExitStack() as stack:
        image, good, bad, first_bad = _make_camera_image(tmp_path)
        if method == "device-mapper":
            root = _device_mapper(stack, tmp_path, image, bad)
        else:
            root = _nested_loop(stack, tmp_path, image, bad, first_bad)
        yield BadBlockCamera(root, BAD_FILE, BAD_FILE_SIZE, BAD_OFFSET, BAD_DIR, good, method)
