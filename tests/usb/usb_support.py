"""USB docking for real: camera images on real loop devices, udev emulated by umockdev, and a
real `dockd run` process whose real pyudev code sees the emulated devices.

- `Devices` makes camera images (ext4 with `mkfs.ext4 -d`, FAT32 with `mkfs.vfat` + `mcopy -m`,
  exFAT with `mkfs.exfat` filled through `mount.exfat-fuse`) and attaches them to loop devices.
  Teardown unmounts whatever is mounted from the test's loop devices or under its directory, then
  detaches exactly the loop devices it attached.
- `Testbed` is an umockdev testbed held by a small process under `umockdev-wrapper`
  (usb_testbed.py: umockdev's uevent sender needs the preload in the process that sends). A camera
  docks when its USB device and block device are added (that emits `add`), and undocks with a
  `remove` uevent and the devices' removal. The block device's DEVNAME is the real loop device.
- `Dock` runs `umockdev-wrapper python -m dockd run` with UMOCKDEV_DIR passed explicitly (it is
  set at C level in the testbed process, so no environment inherits it) and reads its JSON log.
  `wait_for` blocks on log lines, never on sleeps; `at(event, signal)` sends a signal to the
  daemon from the log reader the moment a line is read, which freezes (SIGSTOP) or kills it
  (SIGKILL) at that point of its work — well before it can go on to the next step that matters.

Needs root, loop devices, /dev/fuse, umockdev and the filesystem tools; each is checked and a
test that cannot run here is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
DOCKD = [sys.executable, "-m", "dockd"]
OPTIONS = ("ro", "nosuid", "nodev", "noexec", "noatime")
WAIT_S = 30.0
VENDOR = "2a2b"
MODEL = "0001"
CRASH_EVENTS = ("session_crashed", "task_crashed", "daemon_failed", "udev_event_failed")
FILE_MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z; even seconds (FAT keeps 2 s)

LogEvent = dict[str, Any]
Predicate = Callable[[LogEvent], bool]


# --------------------------------------------------------------------------------------------
# running tools (never under the umockdev preload)
# --------------------------------------------------------------------------------------------


def tool_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "UMOCKDEV_DIR")}


def run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        env=tool_env(),
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def need(*tools: str, fuse: bool = False) -> None:
    """Skip (with the reason) unless this machine can run the test."""
    if os.geteuid() != 0:
        pytest.skip("needs root: loop devices and mounts")
    if not Path("/dev/loop-control").exists():
        pytest.skip("no /dev/loop-control: this kernel cannot make loop devices")
    if fuse and not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse: FAT32/exFAT cameras need a FUSE driver on this kernel")
    missing = [t for t in ("losetup", "mount", "umount", *tools) if shutil.which(t) is None]
    if missing:
        pytest.skip(
            f"missing tools {missing} (Debian packages: util-linux mount e2fsprogs dosfstools "
            "mtools exfatprogs exfat-fuse fusefat umockdev; scripts/setup installs them)"
        )


# --------------------------------------------------------------------------------------------
# /proc/self/mountinfo, read here independently of dockd's own parser
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    point: str
    options: tuple[str, ...]
    fs_type: str
    source: str
    device: str  # major:minor


def mounts() -> list[Mount]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split(" ")
        sep = f.index("-", 6)
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), f[4])
        out.append(Mount(point, tuple(f[5].split(",")), f[sep + 1], f[sep + 2], f[2]))
    return out


def mounts_under(directory: Path) -> list[Mount]:
    d = str(directory).rstrip("/") + "/"
    return [m for m in mounts() if m.point.startswith(d)]


def mount_at(point: Path) -> Mount | None:
    found = [m for m in mounts() if m.point == str(point)]
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------
# camera images on loop devices
# --------------------------------------------------------------------------------------------


def content(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class CameraImage:
    serial: str
    fs: str  # udev ID_FS_TYPE: ext4 | vfat | exfat
    label: str
    uuid: str
    image: Path
    loop: str  # /dev/loopN
    files: dict[str, bytes]  # what must reach the store: path as the camera shows it -> bytes

    @property
    def minor(self) -> int:
        return os.minor(os.stat(self.loop).st_rdev)

    @property
    def major(self) -> int:
        return os.major(os.stat(self.loop).st_rdev)


class Devices:
    """Images and loop devices of one test; torn down by the devices it made."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.loops: list[str] = []
        self._n = 0

    def _attach(self, image: Path) -> str:
        dev = run("losetup", "-f", "--show", str(image)).stdout.strip()
        self.loops.append(dev)
        return dev

    def _src(
        self,
        files: dict[str, bytes],
        mtimes: dict[str, int] | None = None,
        symlinks: dict[str, str] | None = None,
    ) -> Path:
        self._n += 1
        src = self.base / f"src{self._n}"
        for rel, data in files.items():
            p = src / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            t = (mtimes or {}).get(rel, FILE_MTIME)
            os.utime(p, (t, t))
        for rel, target in (symlinks or {}).items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).symlink_to(target)
        src.mkdir(exist_ok=True)
        return src

    def _image(self, name: str, size_mib: int) -> Path:
        image = self.base / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(size_mib * 1024**2)
        return image

    def ext4(
        self,
        serial: str,
        files: dict[str, bytes],
        size_mib: int = 96,
        *,
        mtimes: dict[str, int] | None = None,
        symlinks: dict[str, str] | None = None,
    ) -> CameraImage:
        """ext4 filled with `mkfs.ext4 -d` (mtimes to the nanosecond; symlinks kept)."""
        need("mkfs.ext4")
        src = self._src(files, mtimes, symlinks)
        image = self._image(serial, size_mib)
        uuid = "5e1f2a3b-0000-4000-8000-00000000000" + str(self._n % 10)
        run("mkfs.ext4", "-q", "-F", "-L", "CAMERA", "-U", uuid, "-d", str(src), str(image))
        return CameraImage(serial, "ext4", "CAMERA", uuid, image, self._attach(image), files)

    def fat32(
        self,
        serial: str,
        files: dict[str, bytes],
        label: str = "BODYCAM",
        *,
        mtimes: dict[str, int] | None = None,
    ) -> CameraImage:
        """FAT32 filled with mtools (no mount); names 8.3 upper case, as cameras write them.
        fusefat shows the volume label as an empty file in the root: it is on the camera as
        the daemon sees it, so it is expected in the store too."""
        need("mkfs.vfat", "mmd", "mcopy", "fusefat", fuse=True)
        src = self._src(files, mtimes)
        image = self._image(serial, 48)
        volid = f"{self._n:08X}"
        run("mkfs.vfat", "-F", "32", "-n", label, "-i", volid, str(image))
        dirs = sorted({str(Path(rel).parent) for rel in files} - {"."})
        for d in dirs:
            parts = Path(d).parts
            for i in range(1, len(parts) + 1):
                run("mmd", "-D", "s", "-i", str(image), "::/" + "/".join(parts[:i]), check=False)
        for rel in files:
            run("mcopy", "-m", "-i", str(image), str(src / rel), "::/" + rel)
        expected = dict(files)
        expected[label] = b""
        uuid = f"{volid[:4]}-{volid[4:]}"
        return CameraImage(serial, "vfat", label, uuid, image, self._attach(image), expected)

    def exfat(
        self,
        serial: str,
        files: dict[str, bytes],
        label: str = "CAMX",
        *,
        mtimes: dict[str, int] | None = None,
    ) -> CameraImage:
        """exFAT filled through exfat-fuse mounted read-write, then unmounted."""
        need("mkfs.exfat", "mount.exfat-fuse", fuse=True)
        src = self._src(files, mtimes)
        image = self._image(serial, 48)
        run("mkfs.exfat", "-L", label, str(image))
        loop = self._attach(image)
        fill = self.base / f"fill{self._n}"
        fill.mkdir()
        run("mount.exfat-fuse", loop, str(fill))
        try:
            for rel in files:
                (fill / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, fill / rel)
        finally:
            run("umount", str(fill))
        blkid = run("blkid", "-o", "value", "-s", "UUID", str(image), check=False)
        uuid = blkid.stdout.strip() or "1234-ABCD"
        return CameraImage(serial, "exfat", label, uuid, image, loop, dict(files))

    def close(self) -> None:
        # every mount under this test's directory, or of its loop devices, deepest first
        for _ in range(3):
            ours = [m for m in mounts() if m.point.startswith(str(self.base) + "/")]
            ours += [m for m in mounts() if m.source in self.loops and m not in ours]
            if not ours:
                break
            for m in sorted(ours, key=lambda m: m.point.count("/"), reverse=True):
                run("umount", "-l", m.point, check=False)
        for dev in self.loops:
            run("losetup", "-d", dev, check=False)
        self.loops.clear()


KERNEL_OR_FUSE = {"ext4": None, "vfat": "fusefat", "exfat": "mount.exfat-fuse"}


@contextlib.contextmanager
def own_mount(cam: CameraImage, point: Path, writable: bool = False) -> Iterator[Path]:
    """The test's own mount of a camera's loop device (never while the daemon has it mounted):
    the kernel's driver if it has one, else the same FUSE driver the daemon uses. Read-only
    unless `writable`; on leaving, unmounted and the device's buffers pushed to the image."""
    point.mkdir(parents=True, exist_ok=True)
    mode = "rw" if writable else "ro"
    if run("mount", "-i", "-t", cam.fs, "-o", mode, cam.loop, str(point), check=False).returncode:
        helper = KERNEL_OR_FUSE[cam.fs]
        assert helper is not None, f"cannot mount {cam.fs} {cam.loop}"
        fuse_mode = "rw+" if (writable and helper == "fusefat") else mode
        run(helper, "-o", fuse_mode, cam.loop, str(point))
    try:
        yield point
    finally:
        run("umount", str(point))
        run("sync", cam.loop)  # fusefat writes through the device's page cache


def read_tree(root: Path) -> dict[str, bytes | str]:
    """Every file under `root` (path -> bytes) and symlink (path -> "-> target")."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirs, names in os.walk(root):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else p.read_bytes()
    return out


def camera_tree(cam: CameraImage, point: Path) -> dict[str, bytes | str]:
    """What is on the camera now, read through the test's own read-only mount."""
    with own_mount(cam, point) as root:
        return read_tree(root)


def fsck_clean(cam: CameraImage) -> None:
    """The camera's filesystem is consistent (checked read-only, on the loop device)."""
    run("sync", cam.loop)
    tool = {"ext4": ["e2fsck", "-fn"], "vfat": ["fsck.vfat", "-n"], "exfat": ["fsck.exfat", "-n"]}
    ran = run(*tool[cam.fs], cam.loop, check=False)
    assert ran.returncode == 0, f"{cam.fs} on {cam.loop} not clean:\n{ran.stdout}{ran.stderr}"


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[Devices]:
    d = Devices(tmp_path)
    try:
        yield d
    finally:
        d.close()


# --------------------------------------------------------------------------------------------
# the udev testbed
# --------------------------------------------------------------------------------------------


@dataclass
class UsbCamera:
    """A camera as udev sees it: a USB device in a bay, with its filesystem below."""

    image: CameraImage
    bay: int
    serial: str  # ID_SERIAL_SHORT as udev reports it (may differ from image.serial in tests)
    vendor: str = VENDOR
    model: str = MODEL
    whole_disk: bool = False  # a filesystem without a partition table (DEVTYPE=disk)

    @property
    def usb_path(self) -> str:
        return f"/devices/pci0000:00/0000:00:14.0/usb1/1-{self.bay}"

    @property
    def sysname(self) -> str:
        disk = f"sd{chr(ord('a') + self.bay)}"
        return disk if self.whole_disk else disk + "1"

    @property
    def block_path(self) -> str:
        b = self.bay
        disk = f"sd{chr(ord('a') + b)}"
        tail = f"block/{disk}" + ("" if self.whole_disk else f"/{disk}1")
        return f"{self.usb_path}/1-{b}:1.0/host{b}/target{b}:0:0/{b}:0:0:0/{tail}"

    def record(self) -> str:
        img = self.image
        return (
            f"P: {self.usb_path}\n"
            "E: SUBSYSTEM=usb\n"
            "E: DEVTYPE=usb_device\n"
            f"A: idVendor={self.vendor}\n"
            f"A: idProduct={self.model}\n"
            f"A: serial={self.serial}\n"
            "\n"
            f"P: {self.block_path}\n"
            "E: SUBSYSTEM=block\n"
            f"E: DEVTYPE={'disk' if self.whole_disk else 'partition'}\n"
            f"E: DEVNAME={img.loop}\n"
            f"E: MAJOR={img.major}\n"
            f"E: MINOR={img.minor}\n"
            f"A: dev={img.major}:{img.minor}\n"
            "E: ID_BUS=usb\n"
            f"E: ID_VENDOR_ID={self.vendor}\n"
            f"E: ID_MODEL_ID={self.model}\n"
            f"E: ID_SERIAL_SHORT={self.serial}\n"
            f"E: ID_FS_TYPE={img.fs}\n"
            "E: ID_FS_USAGE=filesystem\n"
            f"E: ID_FS_LABEL={img.label}\n"
            f"E: ID_FS_UUID={img.uuid}\n"
        )


class Testbed:
    """An umockdev testbed in a helper process under umockdev-wrapper (see usb_testbed.py)."""

    __test__ = False  # not a test class, whatever its name says

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["umockdev-wrapper", sys.executable, str(HERE / "usb_testbed.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=tool_env(),
        )
        assert self.proc.stdout is not None
        self.root = self.proc.stdout.readline().strip()
        if not self.root or not Path(self.root).is_dir():
            self.close()
            pytest.skip(f"umockdev testbed did not start (got {self.root!r})")
        self.docked: dict[str, UsbCamera] = {}

    def _call(self, **req: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer != "ok":
            raise RuntimeError(f"testbed {req['op']}: {answer or 'no answer (it died?)'}")

    def dock(self, cam: UsbCamera) -> None:
        """Both devices appear; umockdev emits their `add` uevents."""
        self._call(op="add", text=cam.record())
        self.docked[cam.block_path] = cam

    def undock(self, cam: UsbCamera) -> None:
        """A `remove` uevent for the block device, then both devices go (as on a real unplug)."""
        self._call(op="uevent", path="/sys" + cam.block_path, action="remove")
        self._call(op="remove", path="/sys" + cam.block_path)
        self._call(op="uevent", path="/sys" + cam.usb_path, action="remove")
        self._call(op="remove", path="/sys" + cam.usb_path)
        self.docked.pop(cam.block_path, None)

    def uevent(self, cam: UsbCamera, action: str) -> None:
        self._call(op="uevent", path="/sys" + cam.block_path, action=action)

    def set_property(self, cam: UsbCamera, name: str, value: str) -> None:
        """Change what udev says about the block device (a `change` uevent tells it)."""
        self._call(op="property", path="/sys" + cam.block_path, name=name, value=value)

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def testbed() -> Iterator[Testbed]:
    if shutil.which("umockdev-wrapper") is None:
        pytest.skip("umockdev-wrapper missing (Debian package umockdev)")
    bed = Testbed()
    try:
        yield bed
    finally:
        bed.close()


# --------------------------------------------------------------------------------------------
# the daemon
# --------------------------------------------------------------------------------------------


class DockdProcess:
    """`umockdev-wrapper python -m dockd run -c FILE` and the JSON lines it logs."""

    def __init__(self, config: Path, log: Path, umockdev_dir: str) -> None:
        self.log = log
        self.events: list[LogEvent] = []
        self._cond = threading.Condition()
        self._eof = False
        self._signals: list[tuple[str, Predicate | None, int, threading.Event]] = []
        env = {k: v for k, v in tool_env().items() if k != "DOCKD_CONFIG"}
        env["PYTHONUNBUFFERED"] = "1"
        env["UMOCKDEV_DIR"] = umockdev_dir
        self._stderr = open(log.with_suffix(".stderr"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["umockdev-wrapper", *DOCKD, "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log, "ab") as out:
            for raw in self.proc.stdout:
                try:
                    event = json.loads(raw)
                    assert isinstance(event, dict)
                except (ValueError, AssertionError):
                    event = {"event": "_unparsed", "line": raw.decode(errors="replace")}
                # first the signal, so the daemon is held before anyone hears of the line
                with self._cond:
                    hooks = list(self._signals)
                for name, pred, sig, done in hooks:
                    if (
                        not done.is_set()
                        and event.get("event") == name
                        and (pred is None or pred(event))
                    ):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.proc.pid, sig)
                        done.set()
                out.write(raw)
                out.flush()
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def at(self, event: str, sig: int, predicate: Predicate | None = None) -> threading.Event:
        """Send `sig` to the daemon the moment it logs `event` (once). Set when sent."""
        done = threading.Event()
        with self._cond:
            self._signals.append((event, predicate, sig, done))
        return done

    def wait_for(
        self,
        event: str,
        predicate: Predicate | None = None,
        timeout: float = WAIT_S,
        after: int = 0,
    ) -> LogEvent:
        deadline = time.monotonic() + timeout
        i = after
        with self._cond:
            while True:
                while i < len(self.events):
                    e = self.events[i]
                    i += 1
                    if e.get("event") == event and (predicate is None or predicate(e)):
                        return e
                if self._eof:
                    raise AssertionError(
                        f"dockd exited (rc {self.proc.poll()}) before logging {event!r}\n"
                        + self.tail()
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"dockd did not log {event!r} in {timeout} s\n" + self.tail()
                    )
                self._cond.wait(remaining)

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def all(self, event: str, predicate: Predicate | None = None) -> list[LogEvent]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.get("event") == event and (predicate is None or predicate(e))
            ]

    def tail(self, n: int = 40) -> str:
        with self._cond:
            lines = [json.dumps(e)[:500] for e in self.events[-n:]]
        err = self.log.with_suffix(".stderr").read_text(errors="replace")[-3000:]
        return "--- log:\n" + "\n".join(lines) + "\n--- stderr:\n" + err

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def wait_exit(self, timeout: float = WAIT_S) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dockd still running after {timeout} s\n" + self.tail()) from None
        self._reader.join(10)
        return rc

    def sigterm(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def crashes(self) -> list[LogEvent]:
        with self._cond:
            return [e for e in self.events if e.get("event") in CRASH_EVENTS]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | list):
        return json.dumps(value)
    return repr(value)


@dataclass
class Dock:
    """One dock PC in a temporary directory: configuration, state, store, mount directory."""

    base: Path
    testbed: Testbed
    matches: list[dict[str, str]] = field(
        default_factory=lambda: [{"vendor_id": VENDOR, "serial": "^X6[0-9A-Z]+$"}]
    )
    # more keys per section, e.g. {"camera": {"clear": "after_upload"}}
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    processes: list[DockdProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = self.base / "state"
        self.evidence = self.base / "evidence"
        self.mount_dir = self.base / "mounts"
        self.config = self.base / "dockd.toml"
        self.evidence.mkdir()

    def write_config(self) -> None:
        lines = [
            "[dock]",
            'id = "usb-dock"',
            f"state_dir = {_toml(str(self.state))}",
            "[sources.udev]",
            "enabled = true",
            f"mount_dir = {_toml(str(self.mount_dir))}",
            'mount_timeout = "20s"',
            "[sources.directory]",
            "enabled = false",
            "[offload]",
            'min_free_staging = "1KiB"',
            'chunk_size = "64KiB"',
            "[store]",
            'kind = "filesystem"',
            f"path = {_toml(str(self.evidence))}",
            "[upload]",
            'backoff_initial = "100ms"',
            'backoff_max = "1s"',
            "[mqtt]",
            "enabled = false",
        ]
        for section, values in self.settings.items():
            header = f"[{section}]"
            at = lines.index(header) + 1 if header in lines else len(lines)
            if header not in lines:
                lines.append(header)
                at += 1
            lines[at:at] = [f"{k} = {_toml(v)}" for k, v in values.items()]
        for m in self.matches:
            lines.append("[[sources.udev.match]]")
            lines += [f"{k} = {_toml(v)}" for k, v in m.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, ready: bool = True) -> DockdProcess:
        self.write_config()
        n = len(self.processes) + 1
        p = DockdProcess(self.config, self.base / f"dockd-{n}.log", self.testbed.root)
        self.processes.append(p)
        if ready:
            p.wait_for("daemon_ready")
        return p

    # -- journal and store ---------------------------------------------------------------------

    def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        conn = sqlite3.connect(f"file:{self.state / 'journal.sqlite3'}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, args).fetchall()]
        finally:
            conn.close()

    def sessions(self, camera: str) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM sessions WHERE camera = ? ORDER BY docked_at, id", camera)

    def manifests(self, camera: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        cam_dir = self.evidence / camera
        if cam_dir.is_dir():
            for d in sorted(cam_dir.iterdir()):
                if (d / "manifest.json").is_file():
                    out[d.name] = json.loads((d / "manifest.json").read_bytes())
        return out

    def wait_uploaded(self, proc: DockdProcess, camera: str, sessions: int = 1) -> list[str]:
        """At least `sessions` sessions of `camera`, and every one ends uploaded (or empty:
        nothing new). Returns the ids of the uploaded ones."""
        deadline = time.monotonic() + WAIT_S
        while True:
            states = {s["id"]: s["state"] for s in self.sessions(camera)}
            done = all(st in ("uploaded", "empty") for st in states.values())
            if len(states) >= sessions and done:
                return [sid for sid, st in states.items() if st == "uploaded"]
            if time.monotonic() > deadline:
                raise AssertionError(f"sessions of {camera} not uploaded: {states}\n" + proc.tail())
            mark = proc.mark()
            with contextlib.suppress(AssertionError):
                proc.wait_for("session_uploaded", timeout=1.0, after=mark)

    def close(self) -> None:
        for p in self.processes:
            p.close()


@pytest.fixture
def dock(tmp_path: Path, testbed: Testbed, devices: Devices) -> Iterator[Dock]:
    d = Dock(tmp_path, testbed)
    try:
        yield d
    finally:
        d.close()
        left = mounts_under(d.mount_dir)
        crashed = [e for p in d.processes for e in p.crashes()]
    # checked before `devices` tears down (it undoes whatever a failed test left)
    assert not crashed, f"the daemon logged crashes: {json.dumps(crashed)[:3000]}"
    assert not left, f"mounts left under mount_dir after the daemon stopped: {left}"


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def assert_each_file_once(dock: Dock, cam: CameraImage) -> dict[str, dict[str, Any]]:
    """Every camera file is `verified` in exactly one manifest, with its SHA-256, and the store
    object holds exactly those bytes. Nothing else is reported verified."""
    manifests = dock.manifests(cam.serial)
    assert manifests, f"no manifest in the store for {cam.serial}"
    expected = {rel: sha256(data) for rel, data in cam.files.items()}
    seen: Counter[str] = Counter()
    for sid, m in manifests.items():
        for f in m["files"]:
            assert f["status"] == "verified", f
            seen[f["path"]] += 1
            assert f["path"] in expected, f"{sid}: {f['path']} verified, not on the camera"
            assert f["sha256"] == expected[f["path"]], f"{sid}: {f['path']}: wrong sha256"
            assert sha256((dock.evidence / f["key"]).read_bytes()) == expected[f["path"]]
    assert dict(seen) == dict.fromkeys(expected, 1), (
        f"not exactly once: missing {sorted(set(expected) - set(seen))}, "
        f"repeated {sorted(p for p, n in seen.items() if n > 1)}"
    )
    return manifests


def assert_mounted_as_asked(point: Path, fs_type: str) -> Mount:
    m = mount_at(point)
    assert m is not None, f"nothing mounted at {point}: {mounts()}"
    assert set(m.options) == set(OPTIONS), f"{fs_type} at {point}: options {m.options}"
    return m


class Inotify:
    """Who opens a device node: IN_OPEN / IN_ACCESS on /dev/loopN (never opened = no event)."""

    IN_ACCESS, IN_OPEN, IN_NONBLOCK = 0x1, 0x20, 0o4000

    def __init__(self, *paths: str) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(self.IN_NONBLOCK)
        if self.fd < 0:
            pytest.skip(f"inotify unavailable: {os.strerror(ctypes.get_errno())}")
        for p in paths:
            if self._libc.inotify_add_watch(self.fd, p.encode(), self.IN_OPEN | self.IN_ACCESS) < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {p}")

    def events(self) -> int:
        try:
            return len(os.read(self.fd, 65536))
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.fd)
