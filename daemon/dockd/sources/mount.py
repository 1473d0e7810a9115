"""Mounting a camera read-only, and always unmounting it: bounded in time, checked, logged.
For the clear step only, a camera is mounted read-write (`writable=True`, CLEAR_OPTIONS) the same
way, at its own mount point, and synced before it is unmounted.

The options of SPEC §2 (`ro,nosuid,nodev,noexec,noatime`) are asked for, then *checked* in
/proc/self/mountinfo: a FUSE driver may silently drop some (exfat-fuse drops noexec and
noatime), and then the mount is remounted with them and checked again. What each filesystem
honoured is returned, for the log.

The kernel's driver is tried first (`mount -i`: no /sbin/mount.<type> helper may stand in for
it). Only when that fails and the kernel still lists no driver for the type in /proc/filesystems
(a missing module is loaded by the mount attempt itself, so this is asked afterwards) is the
FUSE helper configured for the type used.

Every tool runs as an asyncio subprocess with a deadline: in its own session (a terminal's
Ctrl-C must not reach a FUSE driver serving a camera), with a fixed minimal environment (nothing
of the daemon's own environment leaks into privileged helpers, and messages are in the C
locale), and with its output in a temporary file, not a pipe: a FUSE helper daemonizes and would
hold a pipe open long after the mount is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dockd.errors import SourceError

CAMERA_OPTIONS = ("ro", "nosuid", "nodev", "noexec", "noatime")
# the clear step's mount: read-write, and otherwise as guarded as the offload's
CLEAR_OPTIONS = ("rw", "nosuid", "nodev", "noexec", "noatime")
# FUSE helpers (by program name) that write only when asked with their own word for "rw":
# fusefat mounts read-only unless given `-o rw+` (its write support is called experimental)
FUSE_RW_OPTION = {"fusefat": "rw+"}
MOUNTINFO = Path("/proc/self/mountinfo")
FILESYSTEMS = Path("/proc/filesystems")
KILL_WAIT_S = 5.0  # after a deadline: how long a killed tool gets to go
OUTPUT_LIMIT = 2000  # characters of a tool's output kept for an error message


class MountError(SourceError):
    """A camera could not be mounted as required (read-only, with every option of SPEC §2)."""


class MountTimeout(MountError):
    """A mount tool did not finish in `sources.udev.mount_timeout`; it was killed."""


class UnmountError(SourceError):
    """A camera's mount could not be undone."""


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    device: str  # major:minor
    point: Path
    options: tuple[str, ...]  # per-mount options: what the VFS enforces
    fs_type: str
    source: str
    super_options: tuple[str, ...]


@dataclass(frozen=True)
class Mounted:
    """A camera mounted at `point`, and how."""

    point: Path
    device: str
    fs_type: str  # as udev named it (ID_FS_TYPE)
    driver: str  # "kernel" or "fuse:<helper>"
    mount_type: str  # as the kernel shows it (ext4, fuse.fusefat, fuseblk)
    honoured: tuple[str, ...]  # the options asked for that the first mount put in force
    remounted: bool  # a remount was needed to put the rest in force
    options: tuple[str, ...]  # per-mount options in force at the end
    writable: bool = False  # mounted read-write for the clear step (CLEAR_OPTIONS)


@dataclass(frozen=True)
class _Ran:
    returncode: int
    output: str


# -- /proc ------------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        c = field[i]
        if c == "\\" and len(field) >= i + 4 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries: list[MountEntry] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    device=fields[2],
                    point=Path(_unescape(fields[4])),
                    options=tuple(fields[5].split(",")),
                    fs_type=fields[sep + 1],
                    source=_unescape(fields[sep + 2]),
                    super_options=tuple(fields[sep + 3].split(",")),
                )
            )
        except (ValueError, IndexError):
            continue  # not a line of the documented shape: nothing of ours
    return entries


def read_mountinfo(path: Path = MOUNTINFO) -> list[MountEntry]:
    return parse_mountinfo(path.read_text(errors="surrogateescape"))


def mount_at(point: Path, path: Path = MOUNTINFO) -> MountEntry | None:
    """The mount on top at `point`, if any."""
    found = [e for e in read_mountinfo(path) if e.point == point]
    return found[-1] if found else None


def kernel_has(fs_type: str, path: Path = FILESYSTEMS) -> bool:
    """The kernel has a driver for `fs_type` loaded (nodev pseudo filesystems aside)."""
    try:
        text = path.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[-1] == fs_type and not (len(parts) == 2 and parts[0] == "nodev"):
            return True
    return False


def missing_options(entry: MountEntry, wanted: Sequence[str] = CAMERA_OPTIONS) -> tuple[str, ...]:
    return tuple(o for o in wanted if o not in entry.options)


def helper_options(helper: str, wanted: Sequence[str]) -> str:
    """The `-o` argument for a FUSE helper: its own word for read-write where it has one."""
    words = shlex.split(helper)
    rw = FUSE_RW_OPTION.get(os.path.basename(words[0])) if words else None
    return ",".join(rw if (o == "rw" and rw) else o for o in wanted)


# -- running tools ----------------------------------------------------------------------------


def _environment() -> dict[str, str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    tz = os.environ.get("TZ")
    if tz is not None:  # FAT times are local times: a FUSE driver reads them in this zone
        env["TZ"] = tz
    return env


async def _run(argv: Sequence[str], limit_s: float, what: str, *, error: type[SourceError]) -> _Ran:
    """Run `argv` to its end within `limit_s` seconds, or kill it and raise a timeout error."""
    with tempfile.TemporaryFile() as out:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=_environment(),
                start_new_session=True,
            )
        except OSError as exc:
            raise error(f"{what}: cannot run {argv[0]}: {exc.strerror or exc}") from None
        try:
            returncode = await asyncio.wait_for(proc.wait(), limit_s)
        except BaseException as exc:  # the deadline, or the caller cancelled: never leave it
            await _kill(proc)
            if isinstance(exc, TimeoutError):
                cls = MountTimeout if issubclass(error, MountError) else error
                raise cls(
                    f"{what}: {argv[0]} did not finish within {limit_s:g} s; killed"
                ) from None
            raise
        out.seek(0)
        text = out.read(64 * 1024).decode("utf-8", "replace").strip()
    return _Ran(returncode, text[-OUTPUT_LIMIT:])


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    # a tool stuck in the kernel (D state) cannot die: do not wait for it forever
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), KILL_WAIT_S)


def _say(ran: _Ran) -> str:
    return f"exit {ran.returncode}: {ran.output or 'no message'}"


# -- mount ------------------------------------------------------------------------------------


def prepare_point(point: Path) -> None:
    """The mount point: a directory only root can enter (0700), inside a 0700 mount_dir."""
    point.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(point.parent, 0o700)
    point.mkdir(mode=0o700, exist_ok=True)
    os.chmod(point, 0o700)


def check_device(device: str, major: int | None, minor: int | None) -> None:
    """`device` is the block device udev named (a stat of the node, never an open)."""
    try:
        st = os.stat(device)
    except OSError as exc:
        raise MountError(f"{device}: cannot stat the device node: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise MountError(f"{device}: not a block device")
    if major is not None and minor is not None:
        got = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if got != (major, minor):
            raise MountError(
                f"{device}: is device {got[0]}:{got[1]}, udev said {major}:{minor}; not mounted"
            )


async def mount_camera(
    device: str,
    fs_type: str,
    point: Path,
    *,
    fuse_helpers: Mapping[str, str],
    limit_s: float,
    writable: bool = False,
) -> Mounted:
    """Mount `device` (udev's `fs_type`) at `point` with CAMERA_OPTIONS in force, checked (with
    `writable`: CLEAR_OPTIONS, for the clear step). Raises MountError (MountTimeout); on any
    error nothing is left mounted at `point`."""
    if await asyncio.to_thread(mount_at, point) is not None:
        raise MountError(f"{point}: something is already mounted there")
    wanted = CLEAR_OPTIONS if writable else CAMERA_OPTIONS
    options = ",".join(wanted)
    what = f"mount {device} ({fs_type}) {'read-write ' if writable else ''}at {point}"
    # -w: util-linux would otherwise fall back to read-only on a write-protected device
    rw_flag = ["-w"] if writable else []
    ran = await _run(
        ["mount", "-i", *rw_flag, "-t", fs_type, "-o", options, device, str(point)],
        limit_s,
        what,
        error=MountError,
    )
    driver = "kernel"
    if ran.returncode != 0:
        helper = fuse_helpers.get(fs_type)
        if helper is None or await asyncio.to_thread(kernel_has, fs_type):
            raise MountError(f"{what}: {_say(ran)}")
        driver = f"fuse:{helper}"
        argv = [*shlex.split(helper), "-o", helper_options(helper, wanted), device, str(point)]
        ran = await _run(argv, limit_s, f"{what} with {helper}", error=MountError)
        if ran.returncode != 0:
            await _undo(point, limit_s)
            raise MountError(f"{what} with {helper}: {_say(ran)}")
    try:
        return await _check(device, fs_type, point, driver, limit_s, writable)
    except BaseException:
        await _undo(point, limit_s)
        raise


async def _check(
    device: str, fs_type: str, point: Path, driver: str, limit_s: float, writable: bool
) -> Mounted:
    wanted = CLEAR_OPTIONS if writable else CAMERA_OPTIONS
    entry = await asyncio.to_thread(mount_at, point)
    if entry is None:
        raise MountError(f"{device} at {point}: the mount tool succeeded but nothing is mounted")
    first = entry
    remounted = False
    if missing_options(entry, wanted):
        remounted = True
        ran = await _run(
            ["mount", "-i", "-o", "remount," + ",".join(wanted), str(point)],
            limit_s,
            f"remount {point} with {','.join(missing_options(entry, wanted))}",
            error=MountError,
        )
        entry = await asyncio.to_thread(mount_at, point) or entry
        if ran.returncode != 0 or missing_options(entry, wanted):
            raise MountError(
                f"{device} at {point} ({driver}): options "
                f"{','.join(missing_options(entry, wanted))} not in force after a remount "
                f"({_say(ran)}); unmounted"
            )
    if writable and "rw" not in entry.super_options:
        # the mount is rw but the filesystem under it is not (a write-protected card)
        raise MountError(
            f"{device} at {point} ({driver}): the filesystem is read-only "
            f"({','.join(entry.super_options)}); unmounted"
        )
    return Mounted(
        point=point,
        device=device,
        fs_type=fs_type,
        driver=driver,
        mount_type=entry.fs_type,
        honoured=tuple(o for o in wanted if o in first.options),
        remounted=remounted,
        options=entry.options,
        writable=writable,
    )


async def _undo(point: Path, limit_s: float) -> None:
    """Best effort after a failed mount: whatever got mounted goes, lazily."""
    with contextlib.suppress(SourceError, OSError):
        await unmount(point, limit_s=limit_s, lazy=True)


# -- sync -------------------------------------------------------------------------------------


async def sync_camera(point: Path | None, device: str | None, *, limit_s: float) -> list[str]:
    """Push what a read-write mount wrote to the device: `sync -f` (syncfs) on the mount, then
    `sync DEVICE` (fsync of the block device: a FUSE driver such as fusefat writes through the
    device's page cache and never flushes it itself; the kernel would only at its last close).
    Bounded like every tool; returns what failed (empty when all went through)."""
    failed: list[str] = []
    steps = [["sync", "-f", str(point)]] if point is not None else []
    if device is not None:
        steps.append(["sync", device])
    for argv in steps:
        what = " ".join(argv)
        try:
            ran = await _run(argv, limit_s, what, error=UnmountError)
        except UnmountError as exc:
            failed.append(str(exc))
            continue
        if ran.returncode != 0:
            failed.append(f"{what}: {_say(ran)}")
    return failed


# -- unmount ----------------------------------------------------------------------------------


async def unmount(point: Path, *, limit_s: float, lazy: bool = False) -> str:
    """Unmount everything at `point` and remove the directory. A busy or gone device is
    detached lazily (`umount -l`: open files stay readable until closed, the mount is gone at
    once). Returns how: "not mounted", "unmounted" or "detached". Raises UnmountError."""
    how = "not mounted"
    for _ in range(8):  # mounts stacked on the point: each goes (bounded)
        if await asyncio.to_thread(mount_at, point) is None:
            break
        if not lazy:
            ran = await _run(
                ["umount", "-i", str(point)], limit_s, f"umount {point}", error=UnmountError
            )
            if ran.returncode == 0:
                how = "unmounted" if how != "detached" else how
                continue
        ran = await _run(
            ["umount", "-i", "-l", str(point)], limit_s, f"umount -l {point}", error=UnmountError
        )
        if ran.returncode != 0 and await asyncio.to_thread(mount_at, point) is not None:
            raise UnmountError(f"umount -l {point}: {_say(ran)}")
        how = "detached"
    else:
        raise UnmountError(f"{point}: still mounted after 8 unmounts")
    # a directory that will not go is left for the next start's clean-up: the mount is gone
    with contextlib.suppress(OSError):
        await asyncio.to_thread(os.rmdir, point)
    return how


def ours(mount_dir: Path, entries: Sequence[MountEntry]) -> list[MountEntry]:
    """Mounts under `mount_dir` (not at it), deepest first."""
    under = [e for e in entries if e.point != mount_dir and e.point.is_relative_to(mount_dir)]
    return sorted(under, key=lambda e: (len(e.point.parts), e.mount_id), reverse=True)


async def clean_stale(mount_dir: Path, *, limit_s: float) -> list[MountEntry]:
    """Unmount every mount under `mount_dir` (left by a daemon killed with its cameras mounted)
    and remove the empty directories. A read-write one (killed during a clear) is synced first,
    as far as its mountinfo names the device. Returns what was unmounted. Raises UnmountError."""
    entries = ours(mount_dir, await asyncio.to_thread(read_mountinfo))
    for entry in entries:
        if "rw" in entry.options:
            device = entry.source if entry.source.startswith("/dev/") else None
            await sync_camera(entry.point, device, limit_s=limit_s)  # best effort
        await unmount(entry.point, limit_s=limit_s, lazy=True)
    await asyncio.to_thread(_remove_empty_dirs, mount_dir)
    return entries


def _remove_empty_dirs(mount_dir: Path) -> None:
    try:
        children = list(os.scandir(mount_dir))
    except FileNotFoundError:
        return
    for child in children:
        if child.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError):  # not empty, or a mount point: left alone
                os.rmdir(child.path)
