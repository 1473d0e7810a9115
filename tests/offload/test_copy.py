"""copy_file(): one file from camera to staging, on real files, real filesystems, real faults.

Mid-copy events are placed deterministically, with no sleeps: the copy thread reports each chunk
through `Progress.bytes_done`, so a Progress whose setter runs a hook acts at an exact point
between two chunks, in the copy thread itself. The retry backoff runs on the cancel event's
`wait`, so an Event whose `wait` returns at once fakes the clock (the read errors stay real).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import xxhash

from dockd.errors import CameraGone, IntegrityError, ReadFailed, SourceChanged, StagingFull
from dockd.offload.copy import Copied, CopyJob, Progress, copy_file

if TYPE_CHECKING:
    from conftest import BadBlockCamera

CHUNK = 64 * 1024


class HookedProgress(Progress):
    """Progress that calls `hook(bytes_done)` each time the copy thread reports a chunk."""

    __slots__ = ("_done", "_hook", "reports")

    def __init__(self, hook: Callable[[int], None] = lambda done: None) -> None:
        self._done = 0
        self._hook = hook
        self.reports: list[int] = []

    @property  # type: ignore[override]
    def bytes_done(self) -> int:
        return self._done

    @bytes_done.setter
    def bytes_done(self, value: int) -> None:
        self._done = value
        self.reports.append(value)
        self._hook(value)


class FakeClockCancel(threading.Event):
    """A cancel event whose wait() (the retry backoff) records its timeout and returns at once;
    with `undock_on_wait=n` the n-th wait finds the camera undocked (the event set)."""

    def __init__(self, undock_on_wait: int | None = None) -> None:
        super().__init__()
        self.waits: list[float | None] = []
        self._undock_on_wait = undock_on_wait

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if self._undock_on_wait is not None and len(self.waits) >= self._undock_on_wait:
            self.set()
        return self.is_set()


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    d = tmp_path / "staging"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def camera(tmp_path: Path) -> Path:
    d = tmp_path / "camera"
    d.mkdir()
    return d


def put(camera: Path, size: int, name: str = "0001.MP4", seed: int = 1) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    path = camera / name
    path.write_bytes(data)
    return path, data


def job_for(source: Path, staging: Path, **kw: object) -> CopyJob:
    """A job as the session makes one: size and mtime as the walk saw them (now)."""
    st = os.lstat(source)
    return CopyJob(
        source=os.fsencode(source),
        staged=staging / "1",
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        **kw,  # type: ignore[arg-type]
    )


def run(
    job: CopyJob, progress: Progress | None = None, cancel: threading.Event | None = None
) -> Copied:
    return copy_file(job, bytearray(CHUNK), progress or Progress(), cancel or threading.Event())


def leftovers(staging: Path) -> list[str]:
    return sorted(os.listdir(staging))


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17],
    ids=["empty", "one-byte", "chunk-1", "chunk", "chunk+1", "several-chunks"],
)
def test_copy_is_whole_hashed_0600_and_leaves_no_partial(
    size: int, camera: Path, staging: Path
) -> None:
    source, data = put(camera, size)
    job = job_for(source, staging)
    progress = Progress()
    copied = run(job, progress)
    assert copied == Copied(
        hashlib.sha256(data).hexdigest(), xxhash.xxh3_128_hexdigest(data), size, job.mtime_ns
    )
    assert job.staged.read_bytes() == data
    assert stat.S_IMODE(os.stat(job.staged).st_mode) == 0o600
    assert leftovers(staging) == ["1"]
    assert progress.bytes_done == size
    assert source.read_bytes() == data  # the camera is only read


def test_copy_reports_progress_once_per_chunk(camera: Path, staging: Path) -> None:
    source, _ = put(camera, 3 * CHUNK + 17)
    progress = HookedProgress()
    run(job_for(source, staging), progress)
    assert progress.reports == [CHUNK, 2 * CHUNK, 3 * CHUNK, 3 * CHUNK + 17]


def test_file_changed_between_walk_and_copy_raises_source_changed_and_leaves_nothing(
    camera: Path, staging: Path
) -> None:
    source, _ = put(camera, 2 * CHUNK)
    job = job_for(source, staging)
    with open(source, "ab") as f:
        f.write(b"more")
    with pytest.raises(SourceChanged, match="changed while copied"):
        run(job)
    assert leftovers(staging) == []


def test_file_growing_during_copy_raises_source_changed_and_leaves_nothing(
    camera: Path, staging: Path
) -> None:
    source, _ = put(camera, 3 * CHUNK)

    def grow(done: int) -> None:
        if done == CHUNK:  # after the first chunk, before the second is read
            with open(source, "ab") as f:
                f.write(b"recording goes on")

    progress = HookedProgress(grow)
    with pytest.raises(SourceChanged):
        run(job_for(source, staging), progress)
    assert leftovers(staging) == []
    assert CHUNK in progress.reports  # the change did land mid-copy


def test_file_truncated_during_copy_raises_source_changed_and_leaves_nothing(
    camera: Path, staging: Path
) -> None:
    source, _ = put(camera, 3 * CHUNK)

    def shrink(done: int) -> None:
        if done == CHUNK:
            os.truncate(source, CHUNK + 10)

    with pytest.raises(SourceChanged):
        run(job_for(source, staging), HookedProgress(shrink))
    assert leftovers(staging) == []


def test_file_rewritten_in_place_during_copy_raises_source_changed_and_leaves_nothing(
    camera: Path, staging: Path
) -> None:
    source, _ = put(camera, 3 * CHUNK)
    job = job_for(source, staging)

    def rewrite(done: int) -> None:
        if done == CHUNK:
            with open(source, "r+b") as f:  # same size, new bytes, a new mtime
                f.write(b"\0" * 10)
            os.utime(source, ns=(job.mtime_ns, job.mtime_ns + 1))

    with pytest.raises(SourceChanged, match="mtime"):
        run(job, HookedProgress(rewrite))
    assert leftovers(staging) == []


def test_cancel_before_copy_raises_camera_gone_and_leaves_nothing(
    camera: Path, staging: Path
) -> None:
    source, _ = put(camera, 2 * CHUNK)
    cancel = threading.Event()
    cancel.set()
    progress = Progress()
    with pytest.raises(CameraGone):
        run(job_for(source, staging), progress, cancel)
    assert leftovers(staging) == []
    assert progress.bytes_done == 0


def test_cancel_during_copy_stops_at_the_next_chunk_raises_camera_gone_and_leaves_nothing(
    camera: Path, staging: Path
) -> None:
    source, _ = put(camera, 4 * CHUNK)
    cancel = threading.Event()

    def undock(done: int) -> None:
        if done == CHUNK:
            cancel.set()

    progress = HookedProgress(undock)
    with pytest.raises(CameraGone):
        run(job_for(source, staging), progress, cancel)
    assert leftovers(staging) == []
    assert progress.reports == [CHUNK]  # not one more chunk read


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """mount(options) -> a fresh tmpfs; every one is unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"{options},mode=0700", "tmpfs", str(where)],
            check=True,
            capture_output=True,
        )
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", str(where)], check=True)


def test_full_staging_raises_staging_full_and_leaves_no_partial(
    camera: Path, small_tmpfs: Callable[[str], Path]
) -> None:
    full = small_tmpfs("size=1m")
    source, _ = put(camera, 2 * 1024 * 1024)
    with pytest.raises(StagingFull):
        run(job_for(source, full))
    assert leftovers(full) == []
    assert os.statvfs(full).f_bfree == os.statvfs(full).f_blocks  # the space is given back


def test_staging_out_of_inodes_raises_staging_full(
    camera: Path, small_tmpfs: Callable[[str], Path]
) -> None:
    full = small_tmpfs("size=1m,nr_inodes=1")  # the root directory takes the only inode
    source, _ = put(camera, 10)
    with pytest.raises(StagingFull):
        run(job_for(source, full))
    assert leftovers(full) == []


def test_bit_flipped_in_staging_before_readback_raises_integrity_error_and_removes_it(
    camera: Path, staging: Path
) -> None:
    source, _ = put(camera, 2 * CHUNK + 5)
    seen: list[Path] = []

    def flip(staged: Path) -> None:
        seen.append(staged)
        with open(staged, "r+b") as f:
            f.seek(CHUNK + 3)
            byte = f.read(1)[0]
            f.seek(CHUNK + 3)
            f.write(bytes([byte ^ 0x10]))

    job = job_for(source, staging, before_readback=flip)
    with pytest.raises(IntegrityError):
        run(job)
    assert seen == [job.staged.with_name("1.partial")]  # proven before it gets its name
    assert leftovers(staging) == []


def test_read_back_of_a_big_copy_runs_one_chunk_behind_its_writes(
    camera: Path, staging: Path
) -> None:
    # The read-back starts while the source is still being read: when chunk 1 is written,
    # chunk 0 (its write-back waited for, its pages dropped) is read back. A file's tail after
    # its last read is then one chunk's fsync and read-back, not the whole file's.
    source, data = put(camera, 5 * CHUNK + 7)
    progress = HookedProgress()
    at_first_readback: list[int] = []
    job = job_for(
        source, staging, before_readback=lambda _p: at_first_readback.append(progress.bytes_done)
    )
    copied = run(job, progress)
    assert at_first_readback == [2 * CHUNK]
    assert copied.sha256 == hashlib.sha256(data).hexdigest()
    assert job.staged.read_bytes() == data


@pytest.mark.parametrize("where", ["first chunk", "chunk being written", "last byte"])
def test_byte_flipped_in_any_chunk_not_yet_read_back_raises_integrity_error(
    where: str, camera: Path, staging: Path
) -> None:
    # The seam runs just before the first read-back (chunk 0), when chunks 0 and 1 are written;
    # a flip anywhere from there on is read back later and caught. The last byte is flipped
    # once the copy has written it (the last progress report), before its read-back.
    size = 4 * CHUNK + 9
    source, _ = put(camera, size)

    def flip_at(path: Path, at: int) -> None:
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ 0x01]))

    progress = HookedProgress()
    if where == "last byte":
        staged = staging / "1.partial"
        progress = HookedProgress(lambda done: flip_at(staged, size - 1) if done == size else None)
        job = job_for(source, staging)
    else:
        at = 0 if where == "first chunk" else CHUNK + CHUNK // 2
        job = job_for(source, staging, before_readback=lambda p: flip_at(p, at))
    with pytest.raises(IntegrityError, match="read back from staging"):
        run(job, progress)
    assert leftovers(staging) == []


def test_without_sync_file_range_every_byte_is_read_back_after_the_fsync(
    camera: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dockd import durable

    monkeypatch.setattr(durable, "_sync_file_range", None)  # as on a libc without it
    source, data = put(camera, 3 * CHUNK + 1)
    progress = HookedProgress()
    at_readback: list[int] = []

    def flip_first_byte(path: Path) -> None:
        at_readback.append(progress.bytes_done)
        with open(path, "r+b") as f:
            f.write(bytes([data[0] ^ 0x80]))

    with pytest.raises(IntegrityError):
        run(job_for(source, staging, before_readback=flip_first_byte), progress)
    assert at_readback == [len(data)]  # nothing was read back before the whole file was written
    assert leftovers(staging) == []
    copied = run(job_for(source, staging), HookedProgress())
    assert copied.sha256 == hashlib.sha256(data).hexdigest()


def test_writeback_error_met_by_the_streamed_read_back_fails_the_copy_and_leaves_nothing(
    camera: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A writeback error reported by sync_file_range may be consumed there (a later fsync of
    # the descriptor would not see it), so it must fail the copy, never be skipped. The kernel
    # cannot be made to fail one writeback on demand here: the call answers EIO instead.
    import errno

    from dockd import durable

    calls = 0

    def failing(fd: int, offset: int, length: int) -> bool:
        nonlocal calls
        calls += 1
        raise OSError(errno.EIO, "sync_file_range: Input/output error")

    monkeypatch.setattr(durable, "wait_written", failing)
    source, _ = put(camera, 3 * CHUNK)
    with pytest.raises(OSError, match="Input/output error"):
        run(job_for(source, staging))
    assert calls == 1
    assert leftovers(staging) == []


def test_verify_source_succeeds_on_a_stable_file(camera: Path, staging: Path) -> None:
    source, data = put(camera, 3 * CHUNK + 1)
    job = job_for(source, staging, verify_source=True)
    copied = run(job)
    assert copied.sha256 == hashlib.sha256(data).hexdigest()
    assert job.staged.read_bytes() == data


def test_verify_source_catches_a_source_rewritten_with_its_size_and_mtime_kept(
    camera: Path, staging: Path
) -> None:
    source, _ = put(camera, 3 * CHUNK)
    job = job_for(source, staging, verify_source=True)

    def rewrite_source(_staged: Path) -> None:  # after the copy, before both re-reads
        with open(source, "r+b") as f:
            f.write(b"\0" * 10)
        os.utime(source, ns=(job.mtime_ns, job.mtime_ns))

    job.before_readback = rewrite_source
    with pytest.raises(SourceChanged, match="re-read"):
        run(job)
    assert leftovers(staging) == []


def test_symlink_source_raises_source_changed_and_is_not_followed(
    camera: Path, staging: Path
) -> None:
    target, _ = put(camera, 100, name="real.MP4")
    link = camera / "link.MP4"
    os.symlink("real.MP4", link)
    job = job_for(target, staging)  # sized as the file...
    job.source = os.fsencode(link)  # ...but a link is what is there now
    with pytest.raises(SourceChanged, match="symlink"):
        run(job)
    assert leftovers(staging) == []


def test_source_replaced_by_a_fifo_raises_source_changed_without_blocking(
    camera: Path, staging: Path
) -> None:
    source, _ = put(camera, 100)
    job = job_for(source, staging)
    source.unlink()
    os.mkfifo(source)
    outcome: list[BaseException | Copied] = []

    def copy() -> None:
        try:
            outcome.append(run(job))
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=copy)
    t.start()
    t.join(timeout=30)  # a bound on failure only: without the fix the open never returns
    if t.is_alive():
        os.close(os.open(source, os.O_WRONLY | os.O_NONBLOCK))  # let the open go, then fail
        t.join()
        pytest.fail("copy_file blocked opening a FIFO")
    assert len(outcome) == 1
    assert isinstance(outcome[0], SourceChanged)
    assert leftovers(staging) == []


def test_source_replaced_by_a_socket_raises_source_changed_not_camera_gone(
    camera: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, _ = put(camera, 100)
    job = job_for(source, staging)
    source.unlink()
    monkeypatch.chdir(camera)  # a relative bind keeps clear of the 108-byte sun_path limit
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(source.name)  # open() of a socket fails with ENXIO, which also means "gone"
        with pytest.raises(SourceChanged, match="no longer a regular file"):
            run(job)
    assert leftovers(staging) == []


def test_source_replaced_by_a_directory_raises_source_changed(camera: Path, staging: Path) -> None:
    source, _ = put(camera, 100)
    job = job_for(source, staging)
    source.unlink()
    source.mkdir()
    with pytest.raises(SourceChanged, match="no longer a regular file"):
        run(job)
    assert leftovers(staging) == []


def test_vanished_source_raises_source_changed(camera: Path, staging: Path) -> None:
    source, _ = put(camera, 100)
    job = job_for(source, staging)
    source.unlink()
    with pytest.raises(SourceChanged, match="disappeared"):
        run(job)
    assert leftovers(staging) == []


@pytest.mark.parametrize("attempts", [1, 3])
def test_file_on_bad_blocks_raises_read_failed_after_read_attempts_and_leaves_nothing(
    attempts: int, bad_block_camera: BadBlockCamera, staging: Path
) -> None:
    cam = bad_block_camera
    job = job_for(cam.root / cam.bad_file, staging, read_attempts=attempts)
    cancel = FakeClockCancel()
    progress = Progress()
    with pytest.raises(
        ReadFailed, match=rf"read at byte {cam.bad_offset} failed {attempts} times \(Input/output"
    ):
        run(job, progress, cancel)
    # one backoff between two attempts, doubling
    assert cancel.waits == [0.2, 0.4][: attempts - 1]
    assert progress.bytes_done == cam.bad_offset  # what lay before the bad blocks was read
    assert leftovers(staging) == []


def test_good_files_on_a_camera_with_bad_blocks_copy_fine(
    bad_block_camera: BadBlockCamera, staging: Path
) -> None:
    cam = bad_block_camera
    for i, (rel, data) in enumerate(sorted(cam.good.items())):
        job = job_for(cam.root / rel, staging, verify_source=True)
        job.staged = staging / str(i)
        copied = run(job)
        assert copied.sha256 == hashlib.sha256(data).hexdigest()
        assert job.staged.read_bytes() == data
    assert leftovers(staging) == [str(i) for i in range(len(cam.good))]


def test_undock_during_read_retry_backoff_raises_camera_gone_and_leaves_nothing(
    bad_block_camera: BadBlockCamera, staging: Path
) -> None:
    cam = bad_block_camera
    job = job_for(cam.root / cam.bad_file, staging, read_attempts=5)
    cancel = FakeClockCancel(undock_on_wait=2)
    with pytest.raises(CameraGone, match="undocked"):
        run(job, cancel=cancel)
    assert len(cancel.waits) == 2  # no third attempt once undocked
    assert leftovers(staging) == []


def test_read_ahead_is_asked_only_for_a_regular_file_and_never_blocks_or_fails_the_copy(
    camera: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file named in `prefetch` is camera content like any other: a FIFO must not hang the
    open, a symlink is not followed, and nothing about it can fail the copy in hand."""
    source, data = put(camera, 3 * CHUNK)
    regular, _ = put(camera, 1000, name="next.MP4", seed=2)
    fifo = camera / "fifo.MP4"
    os.mkfifo(fifo)
    link = camera / "link.MP4"
    link.symlink_to(regular)
    advised: list[str] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    for n, target in enumerate([regular, fifo, link, camera / "gone.MP4", camera]):
        job = job_for(source, staging, prefetch=os.fsencode(target))
        job.staged = staging / str(n)
        assert run(job).sha256 == hashlib.sha256(data).hexdigest()
    assert advised == [str(regular)]


def test_chunks_not_on_page_boundaries_are_read_back_whole_and_in_order(
    camera: Path, staging: Path
) -> None:
    # A buffer of an odd size makes every chunk end mid-page (as a short read from a camera
    # would): the streamed read-back stops at the last whole page and the rest follows later,
    # so every byte is read back exactly once, in order.
    source, data = put(camera, 7 * CHUNK + 333)
    job = job_for(source, staging)
    copied = copy_file(job, bytearray(CHUNK + 1000), Progress(), threading.Event())
    assert copied.sha256 == hashlib.sha256(data).hexdigest()
    assert job.staged.read_bytes() == data
