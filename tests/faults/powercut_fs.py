"""A power cut for the daemon's state directory: a FUSE passthrough filesystem that remembers what
an fsync made durable, and can throw away everything else.

This kernel has no device-mapper (no `log-writes`, no `flakey`), so the power cut is modelled one
layer up. `PowerCutFS` mounts a pure-Python FUSE filesystem (spoken straight to /dev/fuse, as
tests/scenarios/scenario_fusecam.py does for cameras) at the daemon's `state_dir`. Every request
is passed through to a backing directory at once — the daemon sees an ordinary, coherent
filesystem — and beside it the layer keeps a *durable image* of what a disk would still hold
after losing power, by the POSIX rules, taken strictly:

- a file's data (writes, truncation, its size) is durable once the file is fsynced (FSYNC, data
  or not); before that, what survives is what the last fsync saw — nothing, for a file never
  fsynced;
- a directory's entries (create, mkdir, unlink, rename, link in it) are durable once the
  directory itself is fsynced (FSYNCDIR): its whole listing at that moment. A rename is durable
  in a directory only when that directory is fsynced (both, across two);
- a file's mode is taken with its data or its directory, whichever is fsynced later.

`cut()` (or an armed op count or predicate, `arm`) is the power going: from that request on, none
is applied and each is answered EIO; `on_cut` runs first, in the server thread, before the
request that tripped it is answered (the campaign sends SIGKILL there, so no thread of the daemon
runs another instruction in user space after the cut point). Then `unmount()`, `rebuild()` —
the backing directory is replaced by the durable image: names never made durable are gone, data
never fsynced is gone (a durable name whose data never was comes back empty) — and `mount()`
again, and the daemon restarts on what a real disk would have kept.

`arm(..., drop=False)` is the same freeze without the loss: a kill -9 placed at an exact
filesystem operation (say, the first unlink of the staging release), the op itself not done.
`hook(when, action)` runs `action` at an exact operation and then serves it: the world changes
(another party removes a folder, say) just before the daemon's operation reaches the disk.

What it does not model: torn writes inside one write(2) (a write is all or nothing here, and
SQLite's WAL checksums would catch a torn frame anyway), reordering of fsynced data (an fsync is a
barrier, as it is on a disk with a working flush), ext4's habit of also committing other files'
metadata with an fsync (strict POSIX here: harsher than ext4, never milder), and the page cache of
the real disk under the backing directory (it is never cut). Attribute/entry caching in the
kernel is on (1 s) and file pages are kept (FOPEN_KEEP_CACHE): every change goes through this
mount, so the kernel's caches are never stale; they are dropped with the mount at a cut.

Inodes are pinned (an O_PATH fd is kept for every inode seen during a mount), so the backing
filesystem cannot reuse an inode number whose durable image the layer still holds.

Needs root and /dev/fuse.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import resource
import select
import shutil
import signal
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# opcodes (linux/fuse.h)
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK = 8, 9, 10, 11, 12, 13
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = 21, 22, 23, 24, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 27, 28, 29, 30
ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE = 34, 35, 36, 38, 42, 43
RENAME2 = 45
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})
NAMES = {
    LOOKUP: "lookup", GETATTR: "getattr", SETATTR: "setattr", READLINK: "readlink",
    SYMLINK: "symlink", MKNOD: "mknod", MKDIR: "mkdir", UNLINK: "unlink", RMDIR: "rmdir",
    RENAME: "rename", LINK: "link", OPEN: "open", READ: "read", WRITE: "write",
    STATFS: "statfs", RELEASE: "release", FSYNC: "fsync", FLUSH: "flush", INIT: "init",
    OPENDIR: "opendir", READDIR: "readdir", RELEASEDIR: "releasedir", FSYNCDIR: "fsyncdir",
    ACCESS: "access", CREATE: "create", DESTROY: "destroy", FALLOCATE: "fallocate",
    RENAME2: "rename",
}  # fmt: skip
# what changes the filesystem (or makes a change durable): the ops a cut can fall before
MUTATING = frozenset(
    {SETATTR, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, RENAME2, LINK, WRITE, FSYNC}
    | {FSYNCDIR, CREATE, FALLOCATE}
)

IN_HEADER = struct.Struct("<IIQQIIII")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")
ATTR_OUT = struct.Struct("<QII")
OPEN_OUT = struct.Struct("<QII")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
READ_IN = struct.Struct("<QQII")
WRITE_IN = struct.Struct("<QQIIQII")  # 40 bytes
WRITE_OUT = struct.Struct("<II")
FSYNC_IN = struct.Struct("<QII")
RELEASE_IN = struct.Struct("<QIIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # 88 bytes
FALLOCATE_IN = struct.Struct("<QQQII")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
DIRENT = struct.Struct("<QQII")
INIT_IN = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")

FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 16, 32, 128, 256
FUSE_BIG_WRITES = 1 << 5
FOPEN_KEEP_CACHE = 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
MAX_WRITE = 128 * 1024
BUF_SIZE = MAX_WRITE + 64 * 1024
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2
VALID_S = 1  # entry and attribute cache: every change goes through this mount

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
_libc.renameat2.argtypes += [ctypes.c_uint]

Key = tuple[int, int]  # (st_dev, st_ino) of the backing inode


@dataclass
class Op:
    """One request, as a predicate given to `arm` sees it."""

    n: int  # 1, 2, 3… mutating ops since the mount
    name: str  # "write", "fsync", "unlink", …
    path: str  # the node's path relative to the mount ("" for the root), best effort
    name_arg: bytes = b""  # the entry name for lookups, creates, unlinks, renames
    pid: int = 0


@dataclass
class _Node:
    fd: int  # O_PATH, pinned for the mount's life
    key: Key
    nlookup: int = 0


@dataclass
class Durable:
    """What a disk would still hold: by inode, and each directory's last fsynced listing."""

    data: dict[Key, bytearray] = field(default_factory=dict)
    mode: dict[Key, int] = field(default_factory=dict)
    dirs: dict[Key, dict[bytes, Key]] = field(default_factory=dict)
    links: dict[Key, bytes] = field(default_factory=dict)
    kind: dict[Key, str] = field(default_factory=dict)  # "f", "d", "l"
    dirty: dict[Key, list[tuple[int, int]]] = field(default_factory=dict)


@dataclass
class CutReport:
    """What a rebuild threw away (live, not durable), for the campaign's report."""

    names_lost: int = 0  # live entries whose name was never made durable
    files_rolled_back: int = 0  # files whose live bytes differ from the durable ones
    bytes_lost: int = 0  # sum over those of |live size - durable size| (a lower bound)
    lost: list[str] = field(default_factory=list)  # some paths, for a message


class PowerCutFS:
    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        backing.mkdir(parents=True, exist_ok=True)
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.durable = Durable()
        self.ops = 0  # mutating ops since the mount
        self.counts: dict[str, int] = {}
        self.cuts = 0
        self.last_cut: Op | None = None
        self._nodes: dict[int, _Node] = {}
        self._by_key: dict[Key, int] = {}
        self._next_node = 2
        self._handles: dict[int, int] = {}  # fh -> real fd
        self._dir_lists: dict[int, list[tuple[bytes, int, int]]] = {}
        self._next_fh = 1
        self._dead = False  # cut: nothing is applied any more
        self._drop = True  # a cut drops what was not durable (False: a freeze, a kill -9)
        self._armed: tuple[Callable[[Op], bool], Callable[[], None], bool] | None = None
        self._hook: tuple[Callable[[Op], bool], Callable[[Op], None]] | None = None
        self.cut_event = threading.Event()
        self._fd: int | None = None
        self._fd_lock = threading.Lock()
        self._stopping = threading.Event()
        self._initialized = threading.Event()
        self._thread: threading.Thread | None = None
        self._dev = 0
        _raise_fd_limit()

    # -- control -----------------------------------------------------------------------------

    def arm(
        self,
        when: int | Callable[[Op], bool],
        on_cut: Callable[[], None],
        *,
        drop: bool = True,
    ) -> None:
        """Cut at the `when`-th mutating op from now (an int), or at the first mutating op that
        `when(op)` accepts. `on_cut` runs in the server thread before that op is answered (EIO,
        not applied). `drop=False`: the same freeze, but `rebuild` keeps everything (a kill -9
        at an exact point, not a power cut)."""
        if isinstance(when, int):
            target = self.ops + max(1, when)

            def pred(op: Op) -> bool:
                return op.n >= target

        else:
            pred = when
        self.cut_event.clear()
        self._armed = (pred, on_cut, drop)

    def disarm(self) -> None:
        self._armed = None

    def hook(self, when: Callable[[Op], bool], action: Callable[[Op], None]) -> None:
        """Run `action(op)` in the server thread at the first request of any kind (`op.n`:
        the mutating ops so far) that `when` accepts, then serve that request as usual: the
        world changed just before the daemon's operation reached the disk."""
        self._hook = (when, action)

    def cut(self) -> None:
        """The power goes now (from another thread)."""
        self._armed = None
        self.last_cut = None
        self._dead = True
        self._drop = True
        self.cuts += 1
        self.cut_event.set()

    @property
    def dead(self) -> bool:
        return self._dead

    def mount(self) -> None:
        """Mount, taking everything in the backing directory as durable."""
        self._reset_model()
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = f"fd={self._fd},rootmode={stat.S_IFDIR | 0o755:o},user_id=0,group_id=0"
        opts += ",allow_other,default_permissions"
        rc = _libc.mount(
            b"dockd-powercut", os.fsencode(self.mountpoint), b"fuse", MS_NOSUID | MS_NODEV,
            opts.encode(),
        )  # fmt: skip
        if rc != 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            self._fd = None
            raise OSError(err, f"mount fuse at {self.mountpoint}: {os.strerror(err)}")
        self._stopping.clear()
        self._initialized.clear()
        self._thread = threading.Thread(target=self._serve, name="powercut-fs", daemon=True)
        self._thread.start()
        if not self._initialized.wait(10):
            self.unmount()
            raise OSError(errno.ETIMEDOUT, "the kernel never sent FUSE_INIT")
        self._dev = os.stat(self.mountpoint).st_dev

    def where(self) -> bytes | None:
        """Where it is mounted now (a camera folder holding it may have been renamed)."""
        if self._fd is None:
            return None
        want = f"{os.major(self._dev)}:{os.minor(self._dev)}"
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if fields[2].decode() == want:
                    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4])
        return None

    def unmount(self) -> None:
        """Unmount and stop serving (whoever still holds a file gets ENOTCONN)."""
        if self._fd is None:
            return
        where = self.where()
        if where is not None and _libc.umount2(where, 0) != 0:
            _libc.umount2(where, MNT_DETACH)
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._fd_lock:
            os.close(self._fd)
            self._fd = None
        for fd in self._handles.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._handles.clear()
        for node in self._nodes.values():
            with contextlib.suppress(OSError):
                os.close(node.fd)
        self._nodes.clear()
        self._by_key.clear()

    def rebuild(self) -> CutReport:
        """Unmounted, after a cut: the backing directory becomes the durable image. With a
        freeze that did not drop (`arm(drop=False)`), nothing changes."""
        assert self._fd is None, "unmount first"
        report = CutReport()
        if not self._drop:
            self._dead = False
            return report
        image = self.backing.with_name(self.backing.name + ".durable")
        if image.exists():
            shutil.rmtree(image)
        image.mkdir()
        root = self._root_key
        os.chmod(image, self.durable.mode.get(root, 0o755))
        made: dict[Key, bytes] = {}
        self._make(root, os.fsencode(image), made)
        self._compare(os.fsencode(self.backing), os.fsencode(image), report, b"")
        shutil.rmtree(self.backing)
        os.rename(image, self.backing)
        self._dead = False
        return report

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    # -- the durable image -------------------------------------------------------------------

    def _reset_model(self) -> None:
        self.durable = Durable()
        self.ops = 0
        self._dead = False
        self._drop = True
        self._armed = None
        st = os.lstat(self.backing)
        self._root_key = (st.st_dev, st.st_ino)
        self._snapshot_tree(os.fsencode(self.backing), self._root_key, st)

    def _snapshot_tree(self, path: bytes, key: Key, st: os.stat_result) -> None:
        d = self.durable
        d.kind[key] = "d"
        d.mode[key] = stat.S_IMODE(st.st_mode)
        listing: dict[bytes, Key] = {}
        for name in os.listdir(path):
            p = os.path.join(path, name)
            cst = os.lstat(p)
            ck = (cst.st_dev, cst.st_ino)
            listing[name] = ck
            if stat.S_ISDIR(cst.st_mode):
                self._snapshot_tree(p, ck, cst)
            elif stat.S_ISLNK(cst.st_mode):
                d.kind[ck] = "l"
                d.links[ck] = os.readlink(p)
            elif stat.S_ISREG(cst.st_mode):
                d.kind[ck] = "f"
                d.mode[ck] = stat.S_IMODE(cst.st_mode)
                with open(p, "rb") as f:
                    d.data[ck] = bytearray(f.read())
        d.dirs[key] = listing

    def _make(self, key: Key, path: bytes, made: dict[Key, bytes]) -> None:
        d = self.durable
        for name, child in sorted(d.dirs.get(key, {}).items()):
            p = os.path.join(path, name)
            kind = d.kind.get(child)
            if kind == "d":
                if child in made:  # a directory cannot be in two places; keep the first
                    continue
                os.mkdir(p)
                os.chmod(p, d.mode.get(child, 0o700))
                made[child] = p
                self._make(child, p, made)
            elif kind == "l":
                os.symlink(d.links.get(child, b""), p)
            elif kind == "f":
                if child in made:
                    os.link(made[child], p)
                    continue
                with open(p, "wb") as f:
                    f.write(d.data.get(child, b""))
                os.chmod(p, d.mode.get(child, 0o600))
                made[child] = p

    def _compare(self, live: bytes, image: bytes, report: CutReport, rel: bytes) -> None:
        try:
            names = os.listdir(live)
        except OSError:
            return
        for name in names:
            lp, ip = os.path.join(live, name), os.path.join(image, name)
            r = os.path.join(rel, name) if rel else name
            lst = os.lstat(lp)
            try:
                ist = os.lstat(ip)
            except FileNotFoundError:
                report.names_lost += 1
                if len(report.lost) < 20:
                    report.lost.append(os.fsdecode(r) + " (name)")
                continue
            if stat.S_ISDIR(lst.st_mode) and stat.S_ISDIR(ist.st_mode):
                self._compare(lp, ip, report, r)
            elif (
                stat.S_ISREG(lst.st_mode)
                and stat.S_ISREG(ist.st_mode)
                and (lst.st_size != ist.st_size or _read(lp) != _read(ip))
            ):
                report.files_rolled_back += 1
                report.bytes_lost += abs(lst.st_size - ist.st_size)
                if len(report.lost) < 20:
                    report.lost.append(os.fsdecode(r) + " (data)")

    def _fsync_file(self, key: Key, fd: int) -> None:
        d = self.durable
        live = self._reopen(fd, os.O_RDONLY)
        try:
            st = os.fstat(live)
            size = st.st_size
            old = d.data.get(key)
            if old is None:
                buf = bytearray(_pread_all(live, size, 0))
            else:
                buf = old
                ranges = d.dirty.get(key, [])
                if len(buf) < size:
                    ranges = [*ranges, (len(buf), size - len(buf))]
                del buf[size:]
                if len(buf) < size:
                    buf.extend(bytes(size - len(buf)))
                for off, n in _merge(ranges):
                    end = min(size, off + n)
                    if off < end:
                        buf[off:end] = _pread_all(live, end - off, off)
            d.data[key] = buf
            d.mode[key] = stat.S_IMODE(st.st_mode)
            d.kind[key] = "f"
            d.dirty.pop(key, None)
        finally:
            os.close(live)

    def _fsync_dir(self, key: Key, fd: int) -> None:
        d = self.durable
        path = f"/proc/self/fd/{fd}"
        listing: dict[bytes, Key] = {}
        for name in os.listdir(os.fsencode(path)):
            cst = os.stat(name, dir_fd=fd, follow_symlinks=False)
            ck = (cst.st_dev, cst.st_ino)
            listing[name] = ck
            if stat.S_ISDIR(cst.st_mode):
                d.kind[ck] = "d"
                d.mode[ck] = stat.S_IMODE(cst.st_mode)
            elif stat.S_ISLNK(cst.st_mode):
                d.kind[ck] = "l"
                d.links[ck] = os.readlink(name, dir_fd=fd)
            elif stat.S_ISREG(cst.st_mode):
                d.kind[ck] = "f"
                d.mode[ck] = stat.S_IMODE(cst.st_mode)
        d.dirs[key] = listing
        d.mode[key] = stat.S_IMODE(os.fstat(fd).st_mode)
        d.kind[key] = "d"

    def _dirty(self, key: Key, off: int, n: int) -> None:
        ranges = self.durable.dirty.setdefault(key, [])
        ranges.append((off, n))
        if len(ranges) > 256:
            self.durable.dirty[key] = _merge(ranges)

    # -- the protocol ------------------------------------------------------------------------

    def _serve(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})
        assert self._fd is not None
        fd = self._fd
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(100):
                continue
            try:
                buf = os.read(fd, BUF_SIZE)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                return  # ENODEV: unmounted
            if len(buf) < IN_HEADER.size:
                continue
            _, opcode, unique, nodeid, _uid, _gid, pid, _ = IN_HEADER.unpack_from(buf)
            body = memoryview(buf)[IN_HEADER.size :]
            if opcode == FORGET:
                self._forget(nodeid, FORGET_IN.unpack_from(body)[0])
                continue
            if opcode == BATCH_FORGET:
                count = BATCH_FORGET_IN.unpack_from(body)[0]
                for i in range(count):
                    nid, n = FORGET_ONE.unpack_from(body, BATCH_FORGET_IN.size + i * 16)
                    self._forget(nid, n)
                continue
            if opcode in NO_REPLY:
                continue
            try:
                error, payload = self._dispatch(opcode, nodeid, body, pid)
            except OSError as exc:
                error, payload = exc.errno or errno.EIO, b""
            except Exception:  # a bug here must not hang the daemon under test
                error, payload = errno.EIO, b""
            self._reply(unique, error, payload)
            if opcode == INIT:
                self._initialized.set()
            elif opcode == DESTROY:
                return

    def _reply(self, unique: int, error: int, payload: bytes = b"") -> None:
        out = OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique) + payload
        with self._fd_lock:
            if self._fd is None:
                return
            with contextlib.suppress(OSError):
                os.write(self._fd, out)

    def _dispatch(self, opcode: int, nodeid: int, body: memoryview, pid: int) -> tuple[int, bytes]:
        name = NAMES.get(opcode, str(opcode))
        self.counts[name] = self.counts.get(name, 0) + 1
        if opcode == INIT:
            _major, minor, readahead, flags = INIT_IN.unpack_from(body)
            out = INIT_OUT.pack(
                7, min(minor, 31), readahead, flags & FUSE_BIG_WRITES, 16, 12, MAX_WRITE, 1,
                0, 0, 0,
            )  # fmt: skip
            return 0, out
        if opcode == DESTROY:
            return 0, b""
        if opcode in (RELEASE, RELEASEDIR):
            fh = RELEASE_IN.unpack_from(body)[0]
            real = self._handles.pop(fh, None)
            if real is not None:
                os.close(real)
            self._dir_lists.pop(fh, None)
            return 0, b""
        if self._dead:
            return errno.EIO, b""
        if self._hook is not None:
            op = Op(self.ops, name, self._relpath(nodeid), _first_name(opcode, body), pid)
            if self._hook[0](op):
                action, self._hook = self._hook[1], None
                action(op)
        if opcode in MUTATING:
            self.ops += 1
            armed = self._armed
            if armed is not None:
                pred, on_cut, drop = armed
                op = Op(self.ops, name, self._relpath(nodeid), _first_name(opcode, body), pid)
                if pred(op):
                    self._armed = None
                    self._dead = True
                    self._drop = drop
                    self.cuts += 1
                    self.last_cut = op
                    try:
                        on_cut()
                    finally:
                        self.cut_event.set()
                    return errno.EIO, b""
        node = self._nodes.get(nodeid) if nodeid != 1 else self._root()
        if node is None:
            return errno.ENOENT, b""
        return self._handle(opcode, node, body)

    def _root(self) -> _Node:
        node = self._nodes.get(1)
        if node is None:
            fd = os.open(self.backing, os.O_PATH | os.O_CLOEXEC)
            st = os.fstat(fd)
            node = _Node(fd, (st.st_dev, st.st_ino), 1)
            self._nodes[1] = node
            self._by_key[node.key] = 1
        return node

    def _relpath(self, nodeid: int) -> str:
        node = self._nodes.get(nodeid)
        if node is None:
            return ""
        try:
            p = os.readlink(f"/proc/self/fd/{node.fd}")
        except OSError:
            return ""
        base = str(self.backing)
        return p[len(base) + 1 :] if p.startswith(base + "/") else ""

    def _forget(self, nodeid: int, n: int) -> None:
        node = self._nodes.get(nodeid)
        if node is not None and nodeid != 1:
            node.nlookup = max(0, node.nlookup - n)  # the fd stays: inodes are pinned

    def _entry(self, parent: _Node, name: bytes) -> bytes:
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        key = (st.st_dev, st.st_ino)
        nodeid = self._by_key.get(key)
        if nodeid is None:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
            nodeid = self._next_node
            self._next_node += 1
            self._nodes[nodeid] = _Node(fd, key)
            self._by_key[key] = nodeid
        node = self._nodes[nodeid]
        node.nlookup += 1
        return ENTRY_OUT.pack(nodeid, 0, VALID_S, VALID_S, 0, 0) + _attr(st)

    def _reopen(self, fd: int, flags: int) -> int:
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)

    def _handle(self, opcode: int, node: _Node, body: memoryview) -> tuple[int, bytes]:
        if opcode == LOOKUP:
            return 0, self._entry(node, _cstr(body))
        if opcode == GETATTR:
            return 0, ATTR_OUT.pack(VALID_S, 0, 0) + _attr(os.fstat(node.fd))
        if opcode == SETATTR:
            return self._setattr(node, body)
        if opcode == READLINK:
            return 0, os.readlink(f"/proc/self/fd/{node.fd}".encode())
        if opcode == SYMLINK:
            name, target = bytes(body).split(b"\0")[:2]
            os.symlink(target, name, dir_fd=node.fd)
            return 0, self._entry(node, name)
        if opcode == MKNOD:
            mode, rdev, _umask, _ = MKNOD_IN.unpack_from(body)
            name = _cstr(body[MKNOD_IN.size :])
            if stat.S_ISREG(mode):
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=node.fd)
                os.fchmod(fd, stat.S_IMODE(mode))
                os.close(fd)
            else:
                os.mknod(name, mode, rdev, dir_fd=node.fd)
            return 0, self._entry(node, name)
        if opcode == MKDIR:
            mode, _umask = MKDIR_IN.unpack_from(body)
            name = _cstr(body[MKDIR_IN.size :])
            os.mkdir(name, 0o700, dir_fd=node.fd)
            os.chmod(name, stat.S_IMODE(mode), dir_fd=node.fd)
            return 0, self._entry(node, name)
        if opcode == UNLINK:
            os.unlink(_cstr(body), dir_fd=node.fd)
            return 0, b""
        if opcode == RMDIR:
            os.rmdir(_cstr(body), dir_fd=node.fd)
            return 0, b""
        if opcode in (RENAME, RENAME2):
            if opcode == RENAME:
                newdir, flags, rest = RENAME_IN.unpack_from(body)[0], 0, body[RENAME_IN.size :]
            else:
                newdir, flags, _ = RENAME2_IN.unpack_from(body)
                rest = body[RENAME2_IN.size :]
            old, new = bytes(rest).split(b"\0")[:2]
            target = self._nodes.get(newdir) if newdir != 1 else self._root()
            if target is None:
                return errno.ENOENT, b""
            if flags:
                if _libc.renameat2(node.fd, old, target.fd, new, flags) != 0:
                    return ctypes.get_errno(), b""
            else:
                os.rename(old, new, src_dir_fd=node.fd, dst_dir_fd=target.fd)
            return 0, b""
        if opcode == LINK:
            old_id = LINK_IN.unpack_from(body)[0]
            name = _cstr(body[LINK_IN.size :])
            src = self._nodes.get(old_id)
            if src is None:
                return errno.ENOENT, b""
            os.link(f"/proc/self/fd/{src.fd}", name, dst_dir_fd=node.fd, follow_symlinks=True)
            return 0, self._entry(node, name)
        if opcode == OPEN:
            flags = OPEN_IN.unpack_from(body)[0]
            fd = self._reopen(node.fd, _open_flags(flags))
            return 0, OPEN_OUT.pack(self._new_handle(fd), FOPEN_KEEP_CACHE, 0)
        if opcode == CREATE:
            flags, mode, _umask, _ = CREATE_IN.unpack_from(body)
            name = _cstr(body[CREATE_IN.size :])
            fd = os.open(name, _open_flags(flags) | os.O_CREAT, 0o600, dir_fd=node.fd)
            os.fchmod(fd, stat.S_IMODE(mode))
            entry = self._entry(node, name)
            return 0, entry + OPEN_OUT.pack(self._new_handle(fd), FOPEN_KEEP_CACHE, 0)
        if opcode == READ:
            fh, offset, size, _ = READ_IN.unpack_from(body)
            return 0, os.pread(self._handles[fh], size, offset)
        if opcode == WRITE:
            fh, offset, size, *_ = WRITE_IN.unpack_from(body)
            data = body[WRITE_IN.size : WRITE_IN.size + size]
            n = os.pwrite(self._handles[fh], data, offset)
            self._dirty(node.key, offset, n)
            return 0, WRITE_OUT.pack(n, 0)
        if opcode == FSYNC:
            self._fsync_file(node.key, node.fd)
            return 0, b""
        if opcode == FSYNCDIR:
            self._fsync_dir(node.key, node.fd)
            return 0, b""
        if opcode == FALLOCATE:
            fh, offset, length, mode, _ = FALLOCATE_IN.unpack_from(body)
            if mode != 0:
                return errno.EOPNOTSUPP, b""
            os.posix_fallocate(self._handles[fh], offset, length)
            self._dirty(node.key, offset, length)
            return 0, b""
        if opcode == FLUSH:
            return 0, b""
        if opcode == OPENDIR:
            fh = self._next_fh
            self._next_fh += 1
            entries = []
            for name in sorted(os.listdir(f"/proc/self/fd/{node.fd}".encode())):
                cst = os.stat(name, dir_fd=node.fd, follow_symlinks=False)
                entries.append((name, cst.st_ino, stat.S_IFMT(cst.st_mode) >> 12))
            self._dir_lists[fh] = entries
            return 0, OPEN_OUT.pack(fh, 0, 0)
        if opcode == READDIR:
            fh, offset, size, _ = READ_IN.unpack_from(body)
            out = b""
            for i, (name, ino, kind) in enumerate(self._dir_lists.get(fh, [])):
                if i < offset:
                    continue
                ent = DIRENT.pack(ino, i + 1, len(name), kind) + name
                ent += b"\0" * (-len(ent) % 8)
                if len(out) + len(ent) > size:
                    break
                out += ent
            return 0, out
        if opcode == STATFS:
            sv = os.statvfs(f"/proc/self/fd/{node.fd}")
            out = STATFS_OUT.pack(
                sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree, sv.f_bsize,
                sv.f_namemax, sv.f_frsize, 0,
            )  # fmt: skip
            return 0, out
        if opcode == ACCESS:
            return 0, b""
        return errno.ENOSYS, b""

    def _setattr(self, node: _Node, body: memoryview) -> tuple[int, bytes]:
        (valid, _, _fh, size, _lo, atime, mtime, _ct, atimens, mtimens, _ctn, mode, _, uid, gid,
         _) = SETATTR_IN.unpack_from(body)  # fmt: skip
        path = f"/proc/self/fd/{node.fd}"
        if valid & FATTR_MODE:
            os.chmod(path, stat.S_IMODE(mode))
        if valid & (FATTR_UID | FATTR_GID):
            os.chown(path, uid if valid & FATTR_UID else -1, gid if valid & FATTR_GID else -1)
        if valid & FATTR_SIZE:
            os.truncate(path, size)
            self._dirty(node.key, size, 0)
        if valid & (FATTR_ATIME | FATTR_MTIME):
            st = os.fstat(node.fd)
            now = time.time_ns()
            a = st.st_atime_ns
            m = st.st_mtime_ns
            if valid & FATTR_ATIME:
                a = now if valid & FATTR_ATIME_NOW else atime * 10**9 + atimens
            if valid & FATTR_MTIME:
                m = now if valid & FATTR_MTIME_NOW else mtime * 10**9 + mtimens
            os.utime(path, ns=(a, m))
        return 0, ATTR_OUT.pack(VALID_S, 0, 0) + _attr(os.fstat(node.fd))

    def _new_handle(self, fd: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = fd
        return fh


def _cstr(body: memoryview | bytes) -> bytes:
    raw = bytes(body)
    return raw.split(b"\0", 1)[0]


def _first_name(opcode: int, body: memoryview) -> bytes:
    skip = {MKNOD: MKNOD_IN.size, MKDIR: MKDIR_IN.size, CREATE: CREATE_IN.size,
            RENAME: RENAME_IN.size, RENAME2: RENAME2_IN.size, LINK: LINK_IN.size}  # fmt: skip
    if opcode in (UNLINK, RMDIR, SYMLINK) or opcode in skip:
        return _cstr(body[skip.get(opcode, 0) :])
    return b""


def _open_flags(flags: int) -> int:
    drop = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NOCTTY | os.O_DIRECT
    drop |= os.O_NOFOLLOW  # the node is reopened through /proc/self/fd: a magic link
    return (flags & ~drop) | os.O_CLOEXEC


def _attr(st: os.stat_result) -> bytes:
    return ATTR.pack(
        st.st_ino, st.st_size, st.st_blocks, int(st.st_atime), int(st.st_mtime),
        int(st.st_ctime), st.st_atime_ns % 10**9, st.st_mtime_ns % 10**9,
        st.st_ctime_ns % 10**9, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev,
        4096, 0,
    )  # fmt: skip


def _pread_all(fd: int, n: int, off: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), off + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        end = off + n
        if out and off <= out[-1][0] + out[-1][1]:
            o, m = out[-1]
            out[-1] = (o, max(o + m, end) - o)
        else:
            out.append((off, n))
    return out


def _read(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
