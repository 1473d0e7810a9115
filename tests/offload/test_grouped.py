"""Grouped durability of small files: a whole CameraSession on real files and a real journal.

Files of at most GROUP_MAX_BYTES are copied and renamed without an fsync or a read-back of their
own; a group is made durable by one syncfs and one directory fsync, read back, then recorded in
one journal transaction. These tests hold the promise: nothing is recorded verified before the
sync that covers it and a read-back past the cache; a flipped bit is caught and copied again (or
ends failed); an undock mid-group records none of that group; a crash between rename and record
resumes by copying again. Mid-run events are placed with the session's test seams
(`before_readback`, called in the offload thread after the group's sync) and the group's size
bound: no sleeps. The journal flush's time bound is set out of reach so groups are made of
FLUSH_FILES files exactly.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import mmap
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dockd import durable
from dockd.config import parse_config
from dockd.custody import check_chain
from dockd.durable import open_dir
from dockd.events import EventBus
from dockd.ids import CameraId
from dockd.journal import FileState, Journal, SessionState
from dockd.journal.thread import JournalThread
from dockd.offload import copy as copy_mod
from dockd.offload import session as session_mod
from dockd.offload.copy import Owed, settle_group
from dockd.offload.session import GROUP_MAX_BYTES, CameraSession
from dockd.runtime import Problems, Runtime
from dockd.sources.base import Docked
from dockd.store import build_store

CAMERA = "X6GROUP0001"
GROUP = 4  # FLUSH_FILES for these tests


class Crash(Exception):
    """Stands for a kill -9: raised out of the session, which then records nothing more."""


def _file_id(path: Path) -> int:
    """The journal id a staged copy is named by; the per-file path shows the seam its
    `.partial` (it is proven before it gets its name)."""
    return int(path.name.removesuffix(".partial"))


@pytest.fixture(autouse=True)
def small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_mod, "FLUSH_FILES", GROUP)
    monkeypatch.setattr(session_mod, "FLUSH_SECONDS", 3600.0)  # groups by size only


class Site:
    def __init__(self, base: Path, *, copy_attempts: int = 3) -> None:
        self.base = base
        self.camera = base / "camera"
        (base / "evidence").mkdir()
        self.config = parse_config(
            {
                "dock": {"id": "group-dock", "state_dir": str(base / "state")},
                "sources": {"directory": {"enabled": True, "path": str(base / "dock")}},
                "store": {"kind": "filesystem", "path": str(base / "evidence")},
                "mqtt": {"enabled": False},
                "offload": {
                    "min_free_staging": "1KiB",
                    "copy_attempts": copy_attempts,
                    "copy_workers": 1,
                    "chunk_size": "64KiB",
                },
            }
        )
        self.config.staging_dir.mkdir(parents=True)
        self.files: dict[str, bytes] = {}

    def add(self, rel: str, data: bytes) -> None:
        p = self.camera / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        self.files[rel] = data

    def add_small(self, n: int, size: int = 5000) -> None:
        for i in range(n):
            self.add(f"DCIM/100CAM/{i:04d}.JPG", os.urandom(size - i))

    def run(self, make: Callable[[Runtime, Docked], CameraSession] | None = None) -> SessionState:
        return asyncio.run(self._run(make))

    async def _run(self, make: Callable[[Runtime, Docked], CameraSession] | None) -> SessionState:
        cfg = self.config
        journal = Journal.open(cfg.journal_path, cfg.dock.id)
        jt = JournalThread(journal)
        rt = Runtime(
            config=cfg,
            journal=jt,
            bus=EventBus(),
            store=build_store(cfg),
            problems=Problems(),
            offload_pool=ThreadPoolExecutor(2, "offload"),
            upload_pool=ThreadPoolExecutor(1, "upload"),
            camera_slots=asyncio.Semaphore(1),
        )
        docked = Docked("directory", CAMERA, self.camera, str(self.camera), writable=True)
        await jt(journal.camera_docked, CameraId(CAMERA), "directory", str(self.camera), None, None)
        session = (make or _plain)(rt, docked)
        try:
            return await session.run()
        finally:
            rt.offload_pool.shutdown(wait=True)
            rt.upload_pool.shutdown()
            jt.close()

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.config.journal_path)
        conn.row_factory = sqlite3.Row
        return conn

    def states(self) -> dict[str, list[str]]:
        """Camera path -> its states, one per session, oldest first."""
        out: dict[str, list[str]] = {}
        with self.db() as conn:
            for r in conn.execute("SELECT path, state FROM files ORDER BY id"):
                out.setdefault(r["path"], []).append(r["state"])
        return out

    def staged(self) -> dict[str, bytes]:
        """Camera path -> the bytes of its verified copy in staging."""
        out: dict[str, bytes] = {}
        with self.db() as conn:
            rows = conn.execute(
                "SELECT session_id, id, path, sha256 FROM files WHERE state = ?",
                (FileState.VERIFIED,),
            ).fetchall()
        for r in rows:
            data = (self.config.staging_dir / r["session_id"] / str(r["id"])).read_bytes()
            assert hashlib.sha256(data).hexdigest() == r["sha256"], r["path"]
            out[r["path"]] = data
        return out

    def leftovers(self) -> set[str]:
        """Names in staging that are not the copy of a verified file."""
        with self.db() as conn:
            verified = {
                f"{r[0]}/{r[1]}"
                for r in conn.execute(
                    "SELECT session_id, id FROM files WHERE state = ?", (FileState.VERIFIED,)
                )
            }
        staging = self.config.staging_dir
        names = {str(p.relative_to(staging)) for p in staging.glob("*/*")}
        return names - verified

    def chain_ok(self) -> None:
        journal = Journal.open(self.config.journal_path, self.config.dock.id)
        try:
            check_chain(journal.custody_records())
        finally:
            journal.close()


def _plain(rt: Runtime, docked: Docked) -> CameraSession:
    return CameraSession(rt, docked, CameraId(CAMERA))


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def _flip_one_bit(path: Path) -> None:
    with open(path, "r+b") as f:
        at = os.fstat(f.fileno()).st_size // 2
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))
        f.flush()
        os.fsync(f.fileno())


def _verified_ids(conn: sqlite3.Connection) -> set[int]:
    rows = conn.execute("SELECT id FROM files WHERE state = ?", (FileState.VERIFIED,))
    return {r[0] for r in rows}


# --------------------------------------------------------------------------------------------
# the promise: durable first, read back past the cache, then recorded
# --------------------------------------------------------------------------------------------


def test_small_files_are_recorded_verified_only_after_a_syncfs_that_covered_their_copies(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spy around the real syncfs(2) notes, at each call, which copies are staged and which
    files the journal holds verified. Every verified file must have been staged (renamed) and
    not yet recorded at some syncfs: recorded only after a sync that covered it."""
    site.add_small(10)
    real = durable.syncfs
    seen: list[tuple[set[int], set[int]]] = []  # per syncfs: (staged ids, verified ids)

    def spy(fd: int) -> bool:
        names = [p.name for p in Path(f"/proc/self/fd/{fd}").resolve().iterdir()]
        staged = {int(n) for n in names if n.isdigit()}  # not a `.partial` being written
        with site.db() as conn:
            seen.append((staged, _verified_ids(conn)))
        assert real(fd), "syncfs must be available on this machine for this test"
        return True

    monkeypatch.setattr(durable, "syncfs", spy)
    assert site.run() == SessionState.OFFLOADED
    with site.db() as conn:
        verified = _verified_ids(conn)
    assert len(verified) == 10
    assert len(seen) == 3  # groups of 4, 4 and 2: one syncfs each
    for fid in verified:
        assert any(fid in staged and fid not in done for staged, done in seen), fid
    assert site.staged() == site.files
    assert site.leftovers() == set()
    site.chain_ok()


def _resident_pages(path: Path) -> int:
    """Pages of `path` in the page cache (mincore(2) over a read-only mapping)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_grouped_small_file_is_clean_at_its_read_back_so_it_is_read_from_the_device(
    site: Site,
) -> None:
    """At the group's read-back each copy has no dirty page left (the sync came first), so
    POSIX_FADV_DONTNEED empties the cache of it and the read-back reads the device. A dirty page
    would stay resident after DONTNEED: the probe drops and counts what is left."""
    site.add_small(6, size=40_000)
    left: list[int] = []

    def probe(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        left.append(_resident_pages(path))

    def make(rt: Runtime, docked: Docked) -> CameraSession:
        s = CameraSession(rt, docked, CameraId(CAMERA))
        s.before_readback = probe
        return s

    assert site.run(make) == SessionState.OFFLOADED
    assert left == [0] * 6
    assert site.staged() == site.files


def test_a_dirty_copy_stays_in_the_cache_after_dontneed_so_the_probe_above_means_something(
    tmp_path: Path,
) -> None:
    p = tmp_path / "dirty"
    p.write_bytes(os.urandom(40_000))  # written, not synced
    fd = os.open(p, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if _resident_pages(p) == 0:
        pytest.skip("this filesystem wrote the pages back at once: the probe cannot tell")
    os.sync()
    fd = os.open(p, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert _resident_pages(p) == 0


def test_large_files_keep_the_per_file_fsync_and_read_back_beside_grouped_small_ones(
    site: Site,
) -> None:
    site.add_small(5)
    site.add("DCIM/100CAM/CLIP0001.MP4", os.urandom(GROUP_MAX_BYTES + 1))
    site.add("DCIM/100CAM/CLIP0002.MP4", os.urandom(GROUP_MAX_BYTES))  # at the bound: grouped
    grouped: list[str] = []

    def note(path: Path) -> None:
        grouped.append(path.name)

    def make(rt: Runtime, docked: Docked) -> CameraSession:
        s = CameraSession(rt, docked, CameraId(CAMERA))
        s.before_readback = note
        return s

    assert site.run(make) == SessionState.OFFLOADED
    assert site.staged() == site.files
    assert len(grouped) == 7  # every copy is read back once, grouped or not
    site.chain_ok()


# --------------------------------------------------------------------------------------------
# a bit flipped in staging between the group's sync and its read-back
# --------------------------------------------------------------------------------------------


def test_bit_flipped_in_a_grouped_small_file_is_caught_and_the_file_copied_again(
    site: Site,
) -> None:
    site.add_small(6)
    victim = "DCIM/100CAM/0002.JPG"
    flips: list[str] = []
    reads: list[str] = []

    def make(rt: Runtime, docked: Docked) -> CameraSession:
        s = CameraSession(rt, docked, CameraId(CAMERA))

        def flip_first(path: Path) -> None:
            reads.append(str(_file_id(path)))
            with sqlite3.connect(site.config.journal_path) as conn:
                (rel,) = conn.execute("SELECT path FROM files WHERE id = ?", (_file_id(path),))
                rel = rel[0]
            if rel == victim and not flips:
                flips.append(str(_file_id(path)))
                _flip_one_bit(path)

        s.before_readback = flip_first
        return s

    assert site.run(make) == SessionState.OFFLOADED
    assert flips  # the flip happened, on the group path
    assert reads.count(flips[0]) == 2  # read back flipped, then copied again and read back
    assert site.staged() == site.files  # the camera's bytes, not the flipped ones
    assert all(s == ["verified"] for s in site.states().values())
    assert site.leftovers() == set()
    site.chain_ok()


def test_grouped_small_file_flipped_on_every_attempt_ends_failed_and_leaves_no_copy(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path, copy_attempts=3)
    site.add_small(5)
    victim_id: list[int] = []

    def make(rt: Runtime, docked: Docked) -> CameraSession:
        s = CameraSession(rt, docked, CameraId(CAMERA))

        def flip(path: Path) -> None:
            with sqlite3.connect(site.config.journal_path) as conn:
                (rel,) = conn.execute("SELECT path FROM files WHERE id = ?", (_file_id(path),))
            if rel[0] == "DCIM/100CAM/0003.JPG":
                victim_id.append(_file_id(path))
                _flip_one_bit(path)

        s.before_readback = flip
        return s

    assert site.run(make) == SessionState.OFFLOADED_WITH_ERRORS
    assert len(victim_id) == 3  # the grouped copy, then two per-file copies: copy_attempts
    states = site.states()
    assert states.pop("DCIM/100CAM/0003.JPG") == ["failed"]
    assert all(s == ["verified"] for s in states.values())
    assert site.leftovers() == set()  # the flipped copy is not under its final name
    with site.db() as conn:
        (err,) = conn.execute("SELECT error FROM files WHERE id = ?", (victim_id[0],)).fetchone()
    assert "read-back" in err
    site.chain_ok()


# --------------------------------------------------------------------------------------------
# undock and crash
# --------------------------------------------------------------------------------------------


class UndockAfter(CameraSession):
    """Undocks once `n` files were copied: between two copies, as a real undock may land."""

    def __init__(self, rt: Runtime, docked: Docked, n: int) -> None:
        super().__init__(rt, docked, CameraId(CAMERA))
        self._n = n

    async def _take(self, *args: Any, **kwargs: Any) -> None:
        await super()._take(*args, **kwargs)
        if self._files_done == self._n:
            self.undock()


def test_undock_mid_group_records_none_of_the_groups_unrecorded_files(site: Site) -> None:
    """Ten small files, groups of four: undocked after the sixth copy. The first group was
    settled and recorded; the second (files 5 and 6, copied, renamed, not yet synced) is not
    recorded and its copies are removed; the next docking copies the rest."""
    site.add_small(10)
    assert site.run(lambda rt, d: UndockAfter(rt, d, 6)) == SessionState.INTERRUPTED
    states = site.states()
    names = sorted(site.files)
    assert [states[n] for n in names[:4]] == [["verified"]] * 4
    assert [states[n] for n in names[4:]] == [["abandoned"]] * 6
    assert site.leftovers() == set()  # no unverified copy under a final name
    # docked again: a new session takes the six, and only them
    assert site.run() == SessionState.OFFLOADED
    states = site.states()
    assert [states[n] for n in names[4:]] == [["abandoned", "verified"]] * 6
    assert site.staged() == site.files
    site.chain_ok()


def test_session_resumes_after_a_crash_with_small_files_renamed_but_unrecorded(
    site: Site,
) -> None:
    """Killed during the second group's read-back: group one recorded, group two (and what was
    copied meanwhile) renamed into staging (one copy torn, as a power cut may leave it, one
    `.partial` beside) but not recorded. The next run resumes the same session and copies
    group two and the rest again, over the names a crash left."""
    site.add_small(10)
    crashed: list[Path] = []

    def make(rt: Runtime, docked: Docked) -> CameraSession:
        s = CameraSession(rt, docked, CameraId(CAMERA))
        count = iter(range(100))

        def crash_in_group_two(path: Path) -> None:
            if next(count) == GROUP:  # the first read-back of the second group
                crashed.append(path)
                raise Crash

        s.before_readback = crash_in_group_two
        return s

    with pytest.raises(ExceptionGroup) as info:
        site.run(make)
    assert info.group_contains(Crash)
    session_dir = crashed[0].parent
    with site.db() as conn:
        (state,) = conn.execute("SELECT state FROM sessions").fetchone()
        unrecorded = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM files WHERE state = ? ORDER BY id", (FileState.PENDING,)
            )
        ]
    assert state == SessionState.OFFLOADING
    on_disk = {p.name for p in session_dir.iterdir()}
    renamed = [i for i in unrecorded if str(i) in on_disk]
    # group two renamed and synced, and what the copy worker took meanwhile: never recorded
    assert GROUP <= len(renamed) <= 10 - GROUP
    os.truncate(session_dir / str(renamed[0]), 0)  # a torn copy under a final name
    (session_dir / f"{renamed[1]}.partial").write_bytes(b"half")

    assert site.run() == SessionState.OFFLOADED
    with site.db() as conn:
        assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 1  # resumed
    assert all(s == ["verified"] for s in site.states().values())
    assert site.staged() == site.files
    assert site.leftovers() == set()
    site.chain_ok()


# --------------------------------------------------------------------------------------------
# settle_group on its own
# --------------------------------------------------------------------------------------------


@pytest.fixture
def group_dir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    d = tmp_path / "staging"
    d.mkdir()
    fd = open_dir(d)
    try:
        yield d, fd
    finally:
        os.close(fd)


def _write_group(d: Path, n: int) -> list[Owed]:
    owed = []
    for i in range(n):
        data = os.urandom(1000 + i)
        (d / str(i)).write_bytes(data)
        owed.append(Owed(d / str(i), hashlib.sha256(data).hexdigest()))
    return owed


def test_settle_group_without_syncfs_fsyncs_each_file_and_still_verifies(
    group_dir: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, fd = group_dir
    monkeypatch.setattr(durable, "_syncfs", None)  # an old libc: no syncfs symbol
    owed = _write_group(d, 3)
    assert settle_group(fd, owed, bytearray(4096)) == [True, True, True]


def test_settle_group_removes_a_copy_that_differs_and_one_that_cannot_be_read(
    group_dir: tuple[Path, int],
) -> None:
    d, fd = group_dir
    owed = _write_group(d, 3)
    owed[1] = Owed(owed[1].staged, owed[1].sha256, before_readback=_flip_one_bit)
    owed[2] = Owed(owed[2].staged, owed[2].sha256, before_readback=lambda p: p.unlink())
    assert settle_group(fd, owed, bytearray(4096)) == [True, False, False]
    assert sorted(p.name for p in d.iterdir()) == ["0"]


def test_settle_group_whose_sync_fails_removes_every_copy_of_the_group(
    group_dir: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed syncfs (a writeback error since the session opened its folder) leaves no copy
    of the group under a final name: they are all copied again on the per-file path."""
    d, fd = group_dir

    class Failing:
        def __call__(self, fd: int) -> int:
            ctypes.set_errno(5)  # EIO, as syncfs reports a writeback error
            return -1

    monkeypatch.setattr(durable, "SYNCFS_TYPES", frozenset({durable.fs_type(fd)}))
    monkeypatch.setattr(durable, "_syncfs", Failing())
    owed = _write_group(d, 2)
    assert settle_group(fd, owed, bytearray(4096)) == [False, False]
    assert list(d.iterdir()) == []


def test_syncfs_is_used_on_a_local_disk_filesystem_and_declined_on_tmpfs(
    group_dir: tuple[Path, int],
) -> None:
    _, fd = group_dir
    assert durable._syncfs is not None, "libc has syncfs on this machine"
    assert durable.syncfs(fd) is (durable.fs_type(fd) in durable.SYNCFS_TYPES)
    shm = open_dir(Path("/dev/shm"))  # tmpfs: nothing a syncfs could make durable
    try:
        assert durable.syncfs(shm) is False
    finally:
        os.close(shm)


def test_syncfs_is_not_trusted_on_fuse_so_each_copy_is_fsynced(
    group_dir: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel does not pass syncfs on to a FUSE server: a power cut on the fault campaign's
    FUSE staging lost copies recorded verified when the group trusted it there."""
    d, fd = group_dir
    monkeypatch.setattr(durable, "fs_type", lambda fd: 0x65735546)  # FUSE_SUPER_MAGIC
    fsynced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(durable.os, "fsync", lambda f: fsynced.append(f) or real_fsync(f))
    owed = _write_group(d, 3)
    assert settle_group(fd, owed, bytearray(4096)) == [True, True, True]
    assert len(fsynced) >= 3  # one per copy (the directory's own comes after, in copy.py)


def test_syncfs_error_is_raised_as_oserror_with_its_errno(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "fs_type", lambda fd: 0xEF53)  # ext4
    with pytest.raises(OSError) as info:
        durable.syncfs(987654)  # not an open fd: EBADF
    assert info.value.errno == 9


# --------------------------------------------------------------------------------------------
# read-ahead of the small files to come
# --------------------------------------------------------------------------------------------


def test_each_small_copy_starts_the_read_ahead_of_the_file_prefetch_ahead_places_later(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.add_small(20)
    site.add("DCIM/zz-big.MP4", os.urandom(GROUP_MAX_BYTES + 1))  # last in path order
    asked: list[str] = []
    real = copy_mod._start_readahead

    def spy(path: bytes) -> None:
        asked.append(os.fsdecode(path))
        real(path)

    monkeypatch.setattr(copy_mod, "_start_readahead", spy)
    assert site.run() == SessionState.OFFLOADED
    in_order = sorted(str(p) for p in site.camera.rglob("*") if p.is_file())
    small = [p for p in in_order if not p.endswith("zz-big.MP4")]
    # each file from the PREFETCH_AHEAD-th on is asked for once, by the copy that many before
    # it; a big file is never asked for (the kernel's own read-ahead serves its stream)
    assert sorted(asked) == small[session_mod.PREFETCH_AHEAD :]
    assert site.staged() == site.files
