"""A camera filesystem the test controls: a read-only FUSE filesystem served from memory, spoken
straight to /dev/fuse (the kernel protocol, no libfuse), so a scenario can act at an exact byte
of an offload.

- `hold(path, offset)`: the first read of `path` that reaches `offset` is held (the daemon's copy
  thread blocks in read(2) mid-file) until `release()`; `wait()` returns once it is held.
- `release(error=errno.EIO)` answers the held read, and every later read of that file from
  `offset` on, with that error: a worn card (EIO, which the daemon retries) or a camera whose
  device went away (ENOTCONN, as a FUSE driver that lost its device answers).
- `grow(path, at, by, times)`: a camera still recording into a file: each time a read reaches
  byte `at` (once per pass over the file), the file grows by `by` bytes and its mtime moves on,
  the first `times` times (None: every time).

Files are served with FOPEN_DIRECT_IO, so every read(2) of the daemon is one request here (no
page cache, no readahead in between): a hold is exactly where the daemon's copy is. Attributes
are not cached by the kernel either, so a stat sees a file's size and mtime as they are now.

Needs root and /dev/fuse. Only what a walk and a copy use is implemented; the rest is ENOSYS.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import select
import signal
import stat
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

# opcodes (linux/fuse.h)
LOOKUP, FORGET, GETATTR = 1, 2, 3
OPEN, READ, STATFS, RELEASE = 14, 15, 17, 18
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 25, 26, 27, 28, 29
ACCESS, INTERRUPT, DESTROY, BATCH_FORGET = 34, 36, 38, 42
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

IN_HEADER = struct.Struct("<IIQQIIII")  # len opcode unique nodeid uid gid pid extlen/padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # 88 bytes (protocol 7.9+)
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
READ_IN = struct.Struct("<QQII")  # fh offset size read_flags (lock_owner, flags follow)
DIRENT = struct.Struct("<QQII")  # ino off namelen type
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64 bytes
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # 80 bytes

FOPEN_DIRECT_IO = 1
MAX_WRITE = 128 * 1024
BUF_SIZE = MAX_WRITE + 64 * 1024
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_NOATIME = 1, 2, 4, 8, 1024
MNT_DETACH = 2
VALID_S = 0  # entry and attribute cache timeouts: none

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class _Node:
    ino: int
    name: bytes
    data: bytes | None  # None: a directory
    mtime_ns: int = 0
    children: dict[bytes, int] = field(default_factory=dict)


@dataclass
class Growth:
    node: int
    at: int
    by: int
    times: int | None  # None: for ever
    grown: int = 0  # how often it grew


class Hold:
    def __init__(self, node: int, offset: int) -> None:
        self.node = node
        self.offset = offset
        self.held = threading.Event()  # a read is held now
        self.released = threading.Event()
        self.error: int | None = None

    def wait(self, timeout: float = 60) -> None:
        if not self.held.wait(timeout):
            raise AssertionError(f"the daemon never read up to byte {self.offset} (hold)")

    def release(self, error: int | None = None) -> None:
        """Let the held read go on (error None), or fail it and every later read from the hold
        offset on with `error`."""
        self.error = error
        self.released.set()


class FuseCamera:
    """An in-memory read-only filesystem mounted at `mountpoint` while running."""

    def __init__(self, mountpoint: Path, files: dict[bytes, bytes], mtime_ns: int) -> None:
        self.mountpoint = mountpoint
        self.mtime_ns = mtime_ns
        self.reads: list[tuple[bytes, int, int]] = []  # (path, offset, size), for asserts
        self._nodes: dict[int, _Node] = {1: _Node(1, b"", None, mtime_ns)}
        self._growths: list[Growth] = []
        self._paths: dict[int, bytes] = {1: b""}
        self._holds: list[Hold] = []
        self._lock = threading.Lock()
        for rel, data in files.items():
            self._add(rel, data)
        self._fd: int | None = None
        self._dev = 0
        self._fd_lock = threading.Lock()
        self._stopping = threading.Event()
        self._initialized = threading.Event()
        self._thread: threading.Thread | None = None

    def _add(self, rel: bytes, data: bytes) -> None:
        parent = 1
        parts = rel.split(b"/")
        for i, part in enumerate(parts):
            node = self._nodes[parent]
            is_file = i == len(parts) - 1
            if part not in node.children:
                ino = len(self._nodes) + 1
                self._nodes[ino] = _Node(ino, part, data if is_file else None, self.mtime_ns)
                self._paths[ino] = b"/".join(parts[: i + 1])
                node.children[part] = ino
            parent = node.children[part]

    def _ino(self, rel: bytes) -> int:
        ino = 1
        for part in rel.split(b"/"):
            ino = self._nodes[ino].children[part]
        return ino

    # -- control -----------------------------------------------------------------------------

    def hold(self, rel: bytes, offset: int = 0) -> Hold:
        h = Hold(self._ino(rel), offset)
        with self._lock:
            self._holds.append(h)
        return h

    def grow(self, rel: bytes, at: int, by: int, times: int | None = None) -> Growth:
        g = Growth(self._ino(rel), at, by, times)
        with self._lock:
            self._growths.append(g)
        return g

    def data(self, rel: bytes) -> bytes:
        """What the file holds now."""
        node = self._nodes[self._ino(rel)]
        assert node.data is not None
        return node.data

    def reset(self) -> None:
        """Drop every hold (a held read gets its data): the camera reads normally again."""
        with self._lock:
            holds, self._holds = self._holds, []
        for h in holds:
            if not h.released.is_set():
                h.release()

    def start(self) -> None:
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        opts = f"fd={self._fd},rootmode=40555,user_id=0,group_id=0,allow_other"
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME
        rc = _libc.mount(
            b"scenario-camera", os.fsencode(self.mountpoint), b"fuse", flags, opts.encode()
        )
        if rc != 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            self._fd = None
            raise OSError(err, f"mount fuse at {self.mountpoint}: {os.strerror(err)}")
        # serve first: the kernel answers nothing on the mount (a stat included) before INIT
        self._thread = threading.Thread(target=self._serve, name="fusecam", daemon=True)
        self._thread.start()
        if not self._initialized.wait(10):
            self._stopping.set()
            self._thread.join(5)
            with self._fd_lock:
                os.close(self._fd)  # aborts the connection: nothing can hang on it
                self._fd = None
            _libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH)
            raise OSError(errno.ETIMEDOUT, "the kernel never sent FUSE_INIT")
        self._dev = os.stat(self.mountpoint).st_dev

    def where(self) -> bytes | None:
        """Where the filesystem is mounted now: the camera folder it is in may have been renamed
        (docked, undocked) since it was mounted."""
        want = f"{os.major(self._dev)}:{os.minor(self._dev)}"
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if fields[2].decode() == want:
                    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4])
        return None

    def stop(self) -> None:
        """Answer every held read, unmount, stop serving and close the device. Closing it aborts
        the connection: whoever still has a file open on it gets ENOTCONN instead of waiting
        forever for a server that is gone. Kill the daemon under test first, so that its exit
        (which flushes its open files here) is served."""
        with self._lock:
            for h in self._holds:
                if not h.released.is_set():
                    h.release(errno.ENOTCONN)
        if self._fd is None:
            return
        where = self.where()
        if where is not None:
            _libc.umount2(where, MNT_DETACH)
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._fd_lock:
            os.close(self._fd)
            self._fd = None

    # -- the protocol ------------------------------------------------------------------------

    def _serve(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})  # for the main thread's waits
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
            _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(buf)
            body = buf[IN_HEADER.size :]
            if opcode in NO_REPLY:
                continue
            try:
                error, payload = self._handle(opcode, unique, nodeid, body)
            except Exception:  # a bug here must not hang the daemon under test
                error, payload = errno.EIO, b""
            if error is None:
                continue  # answered later (a held read)
            self._reply(unique, error, payload)
            if opcode == INIT:
                self._initialized.set()
            elif opcode == DESTROY:
                return

    def _reply(self, unique: int, error: int, payload: bytes = b"") -> None:
        out = OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique) + payload
        with self._fd_lock:  # never write to an fd number closed (and maybe reused) meanwhile
            if self._fd is None:
                return
            with contextlib.suppress(OSError):  # ENOENT: the request was interrupted
                os.write(self._fd, out)

    def _attr(self, node: _Node) -> bytes:
        if node.data is None:
            mode, size, nlink = stat.S_IFDIR | 0o555, 4096, 2
        else:
            mode, size, nlink = stat.S_IFREG | 0o444, len(node.data), 1
        sec, nsec = divmod(node.mtime_ns, 10**9)
        return ATTR.pack(
            node.ino, size, (size + 511) // 512, sec, sec, sec, nsec, nsec, nsec,
            mode, nlink, 0, 0, 0, 4096, 0,
        )  # fmt: skip

    def _handle(
        self, opcode: int, unique: int, nodeid: int, body: bytes
    ) -> tuple[int | None, bytes]:
        if opcode == INIT:
            _major, minor, readahead, _flags = INIT_IN.unpack_from(body)
            out = INIT_OUT.pack(7, min(minor, 31), readahead, 0, 16, 12, MAX_WRITE, 1, 0, 0, 0)
            return 0, out
        if opcode == LOOKUP:
            name = body.split(b"\0", 1)[0]
            parent = self._nodes.get(nodeid)
            ino = parent.children.get(name) if parent else None
            if ino is None:
                return errno.ENOENT, b""
            node = self._nodes[ino]
            return 0, ENTRY_OUT.pack(ino, 0, VALID_S, VALID_S, 0, 0) + self._attr(node)
        if opcode == GETATTR:
            node = self._nodes.get(nodeid)
            if node is None:
                return errno.ENOENT, b""
            return 0, ATTR_OUT.pack(VALID_S, 0, 0) + self._attr(node)
        if opcode in (OPEN, OPENDIR):
            node = self._nodes.get(nodeid)
            if node is None:
                return errno.ENOENT, b""
            flags = struct.unpack_from("<I", body)[0]
            if opcode == OPEN and flags & os.O_ACCMODE != os.O_RDONLY:
                return errno.EROFS, b""
            return 0, OPEN_OUT.pack(nodeid, FOPEN_DIRECT_IO if opcode == OPEN else 0, 0)
        if opcode == READ:
            return self._read(unique, nodeid, body)
        if opcode == READDIR:
            _fh, offset, size, _ = READ_IN.unpack_from(body)
            node = self._nodes[nodeid]
            out = b""
            for i, (name, ino) in enumerate(sorted(node.children.items())):
                if i < offset:
                    continue
                kind = 4 if self._nodes[ino].data is None else 8  # DT_DIR, DT_REG
                ent = DIRENT.pack(ino, i + 1, len(name), kind) + name
                ent += b"\0" * (-len(ent) % 8)
                if len(out) + len(ent) > size:
                    break
                out += ent
            return 0, out
        if opcode == STATFS:
            return 0, STATFS_OUT.pack(1 << 20, 0, 0, len(self._nodes), 0, 4096, 255, 4096)
        if opcode in (RELEASE, RELEASEDIR, FLUSH, ACCESS, DESTROY):
            return 0, b""
        return errno.ENOSYS, b""

    def _read(self, unique: int, nodeid: int, body: bytes) -> tuple[int | None, bytes]:
        _fh, offset, size, _ = READ_IN.unpack_from(body)
        node = self._nodes[nodeid]
        assert node.data is not None
        with self._lock:
            self.reads.append((self._paths[nodeid], offset, size))
            for g in self._growths:
                if g.node == nodeid and offset <= g.at < offset + size and g.times != g.grown:
                    # the camera writes on: more bytes, a later mtime
                    node.data += bytes((g.grown + i) % 251 for i in range(g.by))
                    node.mtime_ns += 10**9
                    g.grown += 1
            hold = next(
                (h for h in self._holds if h.node == nodeid and offset + size > h.offset), None
            )
            if hold is not None and hold.released.is_set() and hold.error is None:
                self._holds.remove(hold)
                hold = None
        data = node.data[offset : offset + size]
        if hold is None:
            return 0, data
        if hold.released.is_set():
            assert hold.error is not None
            return hold.error, b""

        def answer_later(h: Hold = hold) -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})
            h.held.set()
            h.released.wait()
            if h.error is None:
                self._reply(unique, 0, data)
            else:
                self._reply(unique, h.error, b"")

        threading.Thread(target=answer_later, name="fusecam-hold", daemon=True).start()
        return None, b""
