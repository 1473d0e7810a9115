"""USB docks through udev (pyudev): a USB filesystem is a camera only if an allowlist entry
holds; then it is mounted read-only (mount.py) and reported Docked.

What udev says about a device (its properties, its USB parent's sysfs attributes) decides
everything: a device that is not a camera is never opened, let alone mounted — the allowlist,
the camera id and the filesystem type are judged from udev's facts alone, and only then does
anything touch the device.

The netlink monitor is non-blocking and fed into the event loop with `loop.add_reader`; each
wake-up drains `poll(timeout=0)` until it returns None. Work on one device (a mount, an unmount)
runs in that device's own lane, in the order udev told it: a slow mount in one bay never holds
up another bay, and a device's remove never overtakes its add.

A mount is undone on every path: when the daemon releases the camera (its session ended), when
the device goes (after the daemon let go of it, or `mount_timeout` later at the latest, lazily),
at stop, and at start for mounts a killed daemon left under `mount_dir`.

Clearing (`camera.clear = "after_upload"`, the Clearable capability): once the read-only mount
is gone, the daemon may ask for a read-write mount of the same camera, at its own point
`<mount_dir>/<serial>@clear` (`@` is never in a camera id). It is made only while the device that
was docked is still there — udev asked afresh: same serial, same filesystem type and UUID, same
device node — in that device's lane, and never while the read-only mount is still up (one
filesystem, one driver at a time). It is synced and unmounted when the daemon closes it, and like
any mount on undock (lazily) and at stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockd.config import UdevMatch
from dockd.config import UdevSource as UdevConfig
from dockd.errors import SourceError
from dockd.ids import CAMERA_ID_RE, CameraId, camera_id
from dockd.observers.log import get as get_log
from dockd.sources.base import ClearRoot, Docked, Refused, SourceEvent, Undocked
from dockd.sources.mount import (
    CAMERA_OPTIONS,
    CLEAR_OPTIONS,
    Mounted,
    MountError,
    UnmountError,
    check_device,
    clean_stale,
    mount_camera,
    prepare_point,
    sync_camera,
    unmount,
)

SOURCE = "udev"
FS_TYPE_RE = re.compile(r"^[a-z0-9_.-]{1,32}$")
CLEAR_SUFFIX = "@clear"  # the clear step's mount point: `@` cannot be in a camera id
FAT_TYPES = frozenset({"vfat", "msdos", "fat"})
LABEL_KEPT = (
    "the FAT volume label, which the FUSE driver shows as an empty file: removing it would "
    "erase the label"
)


@dataclass(frozen=True)
class BlockDevice:
    """What udev says about one block device: its properties and its USB parent's attributes.
    Nothing here was read from the device itself."""

    devpath: str
    sysname: str
    devname: str | None = None
    devtype: str | None = None  # "partition" | "disk"
    bus: str | None = None  # ID_BUS
    fs_type: str | None = None
    fs_usage: str | None = None
    fs_label: str | None = None
    fs_label_enc: str | None = None  # ID_FS_LABEL_ENC: the label with \xNN escapes, not mangled
    fs_uuid: str | None = None
    serial: str | None = None  # ID_SERIAL_SHORT
    vendor_id: str | None = None  # 4 hex digits, lower case
    model_id: str | None = None
    major: int | None = None
    minor: int | None = None

    @property
    def candidate(self) -> bool:
        """A filesystem on USB storage: a partition, or a whole disk holding a filesystem (a
        camera that presents its card without a partition table)."""
        return self.bus == "usb" and (
            self.devtype == "partition" or (self.devtype == "disk" and self.fs_type is not None)
        )

    @property
    def identity(self) -> tuple[str | None, ...]:
        """What makes it the same medium: a `change` that keeps it is not a new docking."""
        return (self.fs_type, self.fs_uuid, self.fs_label, self.serial, self.vendor_id)


def describe(device: Any) -> BlockDevice:
    """The narrow boundary to pyudev (untyped): a `pyudev.Device` to plain facts."""
    props = device.properties

    def prop(key: str) -> str | None:
        value = props.get(key)
        return str(value) if value else None

    vendor = model = None
    with contextlib.suppress(LookupError, OSError, ValueError):  # a removed device has no sysfs
        parent = device.find_parent("usb", "usb_device")
        if parent is not None:
            vendor = _attribute(parent, "idVendor")
            model = _attribute(parent, "idProduct")
    vendor = vendor or prop("ID_VENDOR_ID")
    model = model or prop("ID_MODEL_ID")
    return BlockDevice(
        devpath=str(device.device_path),
        sysname=str(device.sys_name),
        devname=prop("DEVNAME"),
        devtype=prop("DEVTYPE"),
        bus=prop("ID_BUS"),
        fs_type=prop("ID_FS_TYPE"),
        fs_usage=prop("ID_FS_USAGE"),
        fs_label=prop("ID_FS_LABEL"),
        fs_label_enc=prop("ID_FS_LABEL_ENC"),
        fs_uuid=prop("ID_FS_UUID"),
        serial=prop("ID_SERIAL_SHORT"),
        vendor_id=vendor.lower() if vendor else None,
        model_id=model.lower() if model else None,
        major=_int(prop("MAJOR")),
        minor=_int(prop("MINOR")),
    )


def _attribute(device: Any, name: str) -> str | None:
    try:
        return str(device.attributes.asstring(name)).strip() or None
    except (KeyError, UnicodeDecodeError):
        return None


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _unescape_enc(value: str) -> str:
    r"""udev's `_ENC` form: bytes outside a safe set as \xNN; decoded as UTF-8."""
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), value.encode())
    return raw.decode("utf-8", "replace")


# -- deciding ---------------------------------------------------------------------------------


def holds(entry: UdevMatch, dev: BlockDevice) -> bool:
    """All the fields an allowlist entry gives hold for `dev` (regexes as written: search)."""
    if dev.vendor_id != entry.vendor_id:
        return False
    if entry.model_id is not None and dev.model_id != entry.model_id:
        return False
    if entry.serial is not None and (dev.serial is None or not entry.serial.search(dev.serial)):
        return False
    return entry.fs_label is None or (
        dev.fs_label is not None and entry.fs_label.search(dev.fs_label) is not None
    )


def refusal(dev: BlockDevice, allowlist: Sequence[UdevMatch]) -> str | None:
    """Why `dev` (a candidate) is not a camera to mount, or None if it is one."""
    if not any(holds(entry, dev) for entry in allowlist):
        # the USB ids say what it is; a stranger's volume label or serial is none of our business
        ids = f"vendor_id {dev.vendor_id or '?'}, model_id {dev.model_id or '?'}"
        return f"no [[sources.udev.match]] entry holds ({ids})"
    if dev.fs_type is None:
        return "no filesystem udev recognises on it (ID_FS_TYPE unset)"
    if dev.fs_usage not in (None, "filesystem"):
        return f"holds {dev.fs_usage} ({dev.fs_type}), not a filesystem"
    if not FS_TYPE_RE.fullmatch(dev.fs_type):
        return f"filesystem type {dev.fs_type[:40]!r} is not one dockd can name to mount"
    if dev.serial is None:
        return "no USB serial (ID_SERIAL_SHORT): a camera is named by its serial"
    if camera_id(dev.serial) is None:
        return (
            f"serial {dev.serial[:64]!r} is not a usable camera id "
            f"(must match {CAMERA_ID_RE.pattern})"
        )
    if dev.devname is None or not dev.devname.startswith("/dev/"):
        return "no device node (DEVNAME)"
    return None


def same_medium(then: BlockDevice, now: BlockDevice | None) -> str | None:
    """Why the device udev describes now is not the one that was docked (None: it is): the
    clear step writes only to the medium whose files were offloaded."""
    if now is None:
        return "the device is gone"
    if now.serial != then.serial:
        return f"the device's serial is {now.serial!r} now"
    if now.fs_type != then.fs_type:
        return f"the device holds {now.fs_type or 'no filesystem'} now, not {then.fs_type}"
    if then.fs_uuid is not None and now.fs_uuid != then.fs_uuid:
        return f"another filesystem (UUID {now.fs_uuid}, was {then.fs_uuid}): another medium"
    if (now.devname, now.major, now.minor) != (then.devname, then.major, then.minor):
        return f"the device node changed ({now.devname}, was {then.devname})"
    return None


def label_files(dev: BlockDevice, mounted: Mounted) -> frozenset[str]:
    """Root entries that are a FAT volume label, not a file: fusefat lists the label as an empty
    file, and its unlink erases the label (measured). Only FAT through a FUSE driver."""
    if dev.fs_type not in FAT_TYPES or not mounted.driver.startswith("fuse:"):
        return frozenset()
    names = {dev.fs_label, _unescape_enc(dev.fs_label_enc) if dev.fs_label_enc else None}
    return frozenset(n.strip() for n in names if n and n.strip() and "/" not in n)


def clear_point(mount_dir: Path, camera: str) -> Path:
    return mount_dir / f"{camera}{CLEAR_SUFFIX}"


# -- the source -------------------------------------------------------------------------------


@dataclass(eq=False)
class _Camera:
    """A mount of a camera: the offload's (read-only) or the clear step's (read-write)."""

    dev: BlockDevice
    docked: Docked
    mounted: Mounted
    gone: bool = False  # the device was removed (or its medium changed): unmount lazily
    unmounted: asyncio.Event = field(default_factory=asyncio.Event)
    unmounting: asyncio.Task[None] | None = None


class UdevSource:
    name = SOURCE

    def __init__(self, config: UdevConfig, *, dock_id: str | None = None) -> None:
        self.config = config
        self.mount_dir = config.mount_dir
        self._monitor: Any = None
        self._fd: int | None = None
        self._out: asyncio.Queue[SourceEvent] | None = None
        self._lanes: dict[str, asyncio.Task[None]] = {}  # devpath -> its latest work
        self._present: dict[str, _Camera] = {}  # devpath -> camera reported Docked
        self._mounts: dict[CameraId, _Camera] = {}  # camera -> its mount, until undone
        self._clearing: dict[CameraId, _Camera] = {}  # camera -> its read-write mount
        self._refused: dict[str, tuple[tuple[str | None, ...], str]] = {}  # told once per medium
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._log = get_log(dock_id=dock_id, source=SOURCE)

    # -- Source protocol ---------------------------------------------------------------------

    async def start(self, out: asyncio.Queue[SourceEvent]) -> None:
        self._out = out
        try:
            await asyncio.to_thread(self.mount_dir.mkdir, 0o700, True, True)
            await asyncio.to_thread(os.chmod, self.mount_dir, 0o700)
        except OSError as exc:
            raise SourceError(
                f"sources.udev.mount_dir {self.mount_dir}: cannot make it ({exc.strerror})"
            ) from None
        await self._clean_stale()
        try:
            import pyudev
        except ImportError:
            raise SourceError("sources.udev: pyudev is not installed") from None
        try:
            context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(context)
            monitor.filter_by("block")
            monitor.start()  # also sets O_NONBLOCK: poll(timeout=0) never waits
        except (OSError, pyudev.DeviceError) as exc:
            raise SourceError(f"sources.udev: cannot listen to udev: {exc}") from None
        self._monitor = monitor
        self._fd = int(monitor.fileno())
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)
        # after the monitor is listening: a device arriving now is seen here or as an event,
        # and its lane makes seeing it twice harmless
        await asyncio.gather(*await self._rescan())

    async def release(self, docked: Docked) -> None:
        cam = self._mounts.get(CameraId(docked.camera))
        if cam is not None and cam.docked == docked:
            await self._unmount(cam, "released")

    async def open_for_clearing(self, docked: Docked) -> ClearRoot:
        """Mount the camera read-write for the clear step, at its own point; see the module's
        docstring. Raises SourceError (MountError) with the reason when it cannot."""
        cam_id = CameraId(docked.camera)
        camera = next((c for c in self._present.values() if c.docked == docked), None)
        if self._stopping:
            raise SourceError("the daemon is stopping")
        if camera is None or camera.gone:
            raise SourceError("the camera is no longer docked")
        if cam_id in self._clearing:
            raise SourceError("the camera is being cleared already")
        reading = self._mounts.get(cam_id)
        if reading is not None and reading.unmounting is not None:
            # the session that just ended is letting go of it
            with contextlib.suppress(UnmountError):
                await asyncio.shield(reading.unmounting)
        if cam_id in self._mounts:
            raise SourceError("the camera is still mounted for reading")
        got: list[ClearRoot] = []

        async def work() -> None:
            got.append(await self._mount_for_clearing(camera))

        await self._in_lane(camera.dev, work)
        return got[0]

    async def _mount_for_clearing(self, camera: _Camera) -> ClearRoot:
        """In the device's lane: after every udev event told before about it."""
        dev = camera.dev
        cam_id = CameraId(camera.docked.camera)
        if camera.gone or self._present.get(dev.devpath) is not camera or self._stopping:
            raise SourceError("the camera is no longer docked")
        if cam_id in self._mounts or cam_id in self._clearing:
            raise SourceError("the camera is mounted already")
        try:
            now = await asyncio.to_thread(_lookup, dev.devpath)
        except OSError as exc:
            raise SourceError(f"cannot ask udev about {dev.sysname}: {exc}") from None
        why = same_medium(dev, now)
        if why is not None:
            raise SourceError(f"not the device that was offloaded: {why}")
        assert dev.devname is not None and dev.fs_type is not None
        point = clear_point(self.mount_dir, cam_id)
        try:
            mounted = await self._mount(dev, point, writable=True)
        except (MountError, OSError) as exc:
            self._log.error(
                "camera_mount_failed",
                camera=cam_id,
                device=dev.sysname,
                devname=dev.devname,
                fs_type=dev.fs_type,
                purpose="clear",
                error=str(exc),
            )
            raise SourceError(f"read-write mount failed: {exc}") from None
        clearing = _Camera(dev, camera.docked, mounted)
        self._clearing[cam_id] = clearing
        self._log.info(
            "camera_mounted",
            camera=cam_id,
            device=dev.sysname,
            devname=dev.devname,
            mount_point=str(point),
            fs_type=dev.fs_type,
            driver=mounted.driver,
            mount_type=mounted.mount_type,
            purpose="clear",
            asked=",".join(CLEAR_OPTIONS),
            honoured=",".join(mounted.honoured),
            dropped=",".join(o for o in CLEAR_OPTIONS if o not in mounted.honoured),
            remounted=mounted.remounted,
            options=",".join(mounted.options),
        )
        if mounted.driver != camera.mounted.driver or self._stopping:
            # another driver may show other mtimes (FAT: local time, fusefat a month late):
            # every file would look changed; better not to clear at all than to guess
            why = (
                "the daemon is stopping"
                if self._stopping
                else f"mounted read-write by {mounted.driver}, but offloaded through "
                f"{camera.mounted.driver}: their file times may differ"
            )
            with contextlib.suppress(UnmountError):
                await self._unmount(clearing, "not cleared")
            raise SourceError(why)
        keep = label_files(dev, mounted)
        return ClearRoot(point, keep, LABEL_KEPT if keep else "")

    async def close_after_clearing(self, docked: Docked) -> None:
        """Sync what the clear step wrote, then unmount (lazily if the device went meanwhile).
        Raises UnmountError if the mount cannot be undone."""
        clearing = self._clearing.get(CameraId(docked.camera))
        if clearing is not None and clearing.docked == docked:
            await self._unmount(clearing, "clear_ended")

    async def stop(self) -> None:
        """Stop watching. A camera the daemon still reads is unmounted once it lets go of it:
        at its release, or at the latest when the event loop ends (asyncio.run cancels what is
        left, and the unmount runs then). Unmounting at once would pull the camera from under a
        session: the daemon parks its sessions only after its sources have stopped."""
        self._stopping = True
        if self._fd is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = None
        self._monitor = None  # pyudev closes the socket when the monitor goes
        pending = [*self._lanes.values(), *self._tasks]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=self.config.mount_timeout + 10)
        for cam in [*self._mounts.values(), *self._clearing.values()]:
            self._spawn(self._unmount_when_done(cam))

    async def _unmount_when_done(self, cam: _Camera) -> None:
        try:
            await cam.unmounted.wait()
        finally:  # released, or the loop is ending: nothing reads the camera any more
            if not cam.unmounted.is_set():
                with contextlib.suppress(UnmountError):  # logged in _do_unmount
                    await self._unmount(cam, "stopping")

    # -- udev events -------------------------------------------------------------------------

    def _on_readable(self) -> None:
        while self._monitor is not None:
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped events: look again
                    self._log.warning("udev_events_lost", error=str(exc))
                    self._spawn(self._resync())
                    continue
                # not a loss of events but a broken socket: stop listening rather than spin
                self._log.error("udev_monitor_failed", error=str(exc))
                if self._fd is not None:
                    asyncio.get_running_loop().remove_reader(self._fd)
                    self._fd = None
                return
            if device is None:
                return
            action = str(device.action)
            dev = describe(device)
            known = dev.devpath in self._present or dev.devpath in self._refused
            if action in ("add", "change", "remove") and (dev.candidate or known):
                self._submit(action, dev)

    def _submit(self, action: str, dev: BlockDevice) -> asyncio.Task[None]:
        """Queue `action` in `dev`'s lane: after everything udev told before about it."""
        previous = self._lanes.get(dev.devpath)
        return self._enqueue(dev, self._lane(previous, action, dev))

    async def _in_lane(self, dev: BlockDevice, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` in `dev`'s lane (after the events queued before it) and wait for it;
        its exceptions are the caller's."""
        previous = self._lanes.get(dev.devpath)

        async def run() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            await work()

        task = self._enqueue(dev, run())
        await asyncio.wait([task])
        if task.cancelled():  # the source is stopping
            raise SourceError("the daemon is stopping")
        task.result()

    def _enqueue(self, dev: BlockDevice, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"udev-{dev.sysname}")
        self._lanes[dev.devpath] = task

        def done(t: asyncio.Task[None], devpath: str = dev.devpath) -> None:
            if self._lanes.get(devpath) is t:
                del self._lanes[devpath]

        task.add_done_callback(done)
        return task

    async def _lane(
        self, previous: asyncio.Task[None] | None, action: str, dev: BlockDevice
    ) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        if self._stopping:
            return
        try:
            if action == "remove":
                await self._removed(dev)
            elif action == "change":
                await self._changed(dev)
            else:
                await self._added(dev)
        except asyncio.CancelledError:
            raise
        except Exception:  # supervisor of one device's work: the others go on
            self._log.exception("udev_event_failed", action=action, device=dev.sysname)

    async def _rescan(self) -> list[asyncio.Task[None]]:
        """Every candidate present now is added; whatever we hold that is gone is removed."""
        try:
            found = await asyncio.to_thread(_enumerate)
        except OSError as exc:
            raise SourceError(f"sources.udev: cannot list block devices: {exc}") from None
        seen = {d.devpath for d in found}
        tasks = [self._submit("add", d) for d in found if d.candidate]
        tasks += [self._submit("remove", c.dev) for p, c in self._present.items() if p not in seen]
        return tasks

    async def _resync(self) -> None:
        try:
            await asyncio.wait(await self._rescan())
        except SourceError as exc:
            self._log.error("udev_resync_failed", error=str(exc))

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _emit(self, event: SourceEvent) -> None:
        assert self._out is not None
        self._out.put_nowait(event)

    # -- what happens to a device ------------------------------------------------------------

    async def _added(self, dev: BlockDevice) -> None:
        if dev.devpath in self._present:
            return
        reason = refusal(dev, self.config.match)
        if reason is None:
            assert dev.serial is not None
            other = self._mounts.get(CameraId(dev.serial))
            if other is not None and not other.gone:
                reason = (
                    f"camera {dev.serial} is already docked from {other.dev.sysname}; "
                    "one filesystem per camera"
                )
            elif other is not None:  # the same camera back before its old mount was undone
                await self._unmount_when_let_go(other)
            clearing = self._clearing.get(CameraId(dev.serial))
            if reason is None and clearing is not None:
                if clearing.gone:  # the clear step's mount of it, from before it went
                    await self._unmount_when_let_go(clearing)
                else:
                    reason = (
                        f"camera {dev.serial} is being cleared from {clearing.dev.sysname}; "
                        "one filesystem per camera"
                    )
        if reason is not None:
            self._refuse(dev, reason)
            return
        assert dev.serial is not None and dev.fs_type is not None and dev.devname is not None
        cam = CameraId(dev.serial)
        point = self.mount_dir / cam
        try:
            mounted = await self._mount(dev, point, writable=False)
        except (MountError, OSError) as exc:
            self._log.error(
                "camera_mount_failed",
                camera=cam,
                device=dev.sysname,
                devname=dev.devname,
                fs_type=dev.fs_type,
                error=str(exc),
            )
            self._refuse(dev, f"mount failed: {exc}")
            return
        self._log.info(
            "camera_mounted",
            camera=cam,
            device=dev.sysname,
            devname=dev.devname,
            mount_point=str(point),
            fs_type=dev.fs_type,
            driver=mounted.driver,
            mount_type=mounted.mount_type,
            asked=",".join(CAMERA_OPTIONS),
            honoured=",".join(mounted.honoured),
            dropped=",".join(o for o in CAMERA_OPTIONS if o not in mounted.honoured),
            remounted=mounted.remounted,
            options=",".join(mounted.options),
        )
        docked = Docked(
            SOURCE,
            cam,
            point,
            dev.devname,
            dev.vendor_id,
            dev.model_id,
            mount={
                "device": dev.sysname,
                "fs_type": str(dev.fs_type),
                "driver": str(mounted.driver),
                "options": ",".join(mounted.options),
            },
        )
        camera = _Camera(dev, docked, mounted)
        self._mounts[cam] = camera
        if self._stopping:
            await self._unmount(camera, "stopping")
            return
        self._present[dev.devpath] = camera
        self._emit(docked)

    async def _mount(self, dev: BlockDevice, point: Path, *, writable: bool) -> Mounted:
        """Check the device node is the one udev named, make the private mount point and mount
        (read-only for the offload, `writable` for the clear step). On failure the point is
        removed again and the error raised for the caller to log and report."""
        assert dev.devname is not None and dev.fs_type is not None
        try:
            await asyncio.to_thread(check_device, dev.devname, dev.major, dev.minor)
            await asyncio.to_thread(prepare_point, point)
            return await mount_camera(
                dev.devname,
                dev.fs_type,
                point,
                fuse_helpers=self.config.fuse_helpers,
                limit_s=self.config.mount_timeout,
                writable=writable,
            )
        except (MountError, OSError):
            with contextlib.suppress(OSError):
                await asyncio.to_thread(os.rmdir, point)
            raise

    def _refuse(self, dev: BlockDevice, reason: str) -> None:
        if self._refused.get(dev.devpath) == (dev.identity, reason):
            return  # told already, for this medium
        self._refused[dev.devpath] = (dev.identity, reason)
        self._emit(Refused(SOURCE, dev.sysname, reason))

    async def _changed(self, dev: BlockDevice) -> None:
        """A `change`: media inserted, removed or swapped in a card reader, or udev re-probing
        (a FUSE driver closing the device it opened read-write makes one). The same medium is
        no news; another one, or none, undocks what was there."""
        cam = self._present.get(dev.devpath)
        if cam is None:
            refused = self._refused.get(dev.devpath)
            if refused is not None and refused[0] == dev.identity:
                return
            self._refused.pop(dev.devpath, None)
            if dev.candidate:
                await self._added(dev)
            return
        if dev.identity == cam.dev.identity and dev.fs_type is not None:
            return
        await self._removed(dev)
        if dev.candidate:
            await self._added(dev)

    async def _removed(self, dev: BlockDevice) -> None:
        self._refused.pop(dev.devpath, None)
        cam = self._present.pop(dev.devpath, None)
        if cam is None:
            return
        cam.gone = True
        clearing = self._clearing.get(CameraId(cam.docked.camera))
        if clearing is not None and clearing.dev.devpath == dev.devpath:
            clearing.gone = True
        self._emit(Undocked(SOURCE, cam.docked.camera, cam.docked.location))
        await self._unmount_when_let_go(cam)
        if clearing is not None and clearing.gone:
            await self._unmount_when_let_go(clearing)

    async def _unmount_when_let_go(self, cam: _Camera) -> None:
        """The daemon releases an undocked camera once its session has stopped reading; if it
        does not within `mount_timeout`, the mount is detached anyway."""
        try:
            await asyncio.wait_for(cam.unmounted.wait(), self.config.mount_timeout)
        except TimeoutError:
            self._log.warning("camera_not_released", camera=cam.docked.camera)
        with contextlib.suppress(UnmountError):  # logged in _do_unmount
            await self._unmount(cam, "undocked")

    async def _unmount(self, cam: _Camera, why: str) -> None:
        """Undo `cam`'s mount, once, whoever asks (release, undock, stop)."""
        if cam.unmounted.is_set():
            return
        if cam.unmounting is None or cam.unmounting.done():
            cam.unmounting = asyncio.create_task(self._do_unmount(cam, why))
        await asyncio.shield(cam.unmounting)

    async def _do_unmount(self, cam: _Camera, why: str) -> None:
        point = cam.mounted.point
        limit = self.config.mount_timeout
        device = cam.dev.devname if cam.mounted.writable and not cam.gone else None
        if device is not None:
            failed = await sync_camera(point, device, limit_s=limit)
            if failed:
                self._log.error("camera_sync_failed", camera=cam.docked.camera, errors=failed)
        try:
            how = await unmount(point, limit_s=limit, lazy=cam.gone)
        except UnmountError as exc:
            self._log.error(
                "camera_unmount_failed", camera=cam.docked.camera, point=str(point), error=str(exc)
            )
            raise
        if device is not None:
            # what a FUSE driver wrote as it let go (plain FUSE: umount does not wait for it)
            failed = await sync_camera(None, device, limit_s=limit)
            if failed:
                self._log.error("camera_sync_failed", camera=cam.docked.camera, errors=failed)
        cam_id = CameraId(cam.docked.camera)
        if self._mounts.get(cam_id) is cam:
            del self._mounts[cam_id]
        if self._clearing.get(cam_id) is cam:
            del self._clearing[cam_id]
        cam.unmounted.set()
        self._log.info(
            "camera_unmounted",
            camera=cam.docked.camera,
            device=cam.dev.sysname,
            mount_point=str(point),
            how=how,
            why=why,
        )

    async def _clean_stale(self) -> None:
        try:
            stale = await clean_stale(self.mount_dir, limit_s=self.config.mount_timeout)
        except UnmountError as exc:
            # the camera whose mount point it is cannot be mounted until it goes; the dock
            # works on for the others
            self._log.error("stale_mount_not_removed", error=str(exc))
            return
        for entry in stale:
            self._log.warning(
                "stale_mount_removed",
                mount_point=str(entry.point),
                devname=entry.source,
                mount_type=entry.fs_type,
            )


def _lookup(devpath: str) -> BlockDevice | None:
    """What udev says about `devpath` now, or None if it is gone (a thread: its own context)."""
    import pyudev

    try:
        device = pyudev.Devices.from_path(pyudev.Context(), devpath)
    except pyudev.DeviceNotFoundError:
        return None
    return describe(device)


def _enumerate() -> list[BlockDevice]:
    """Block devices present now (its own pyudev context: this runs in a worker thread)."""
    import pyudev

    context = pyudev.Context()
    return [describe(d) for d in context.list_devices(subsystem="block")]
