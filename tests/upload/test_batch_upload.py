"""Batched upload of small files, end to end in one event loop: a real journal (SQLite, on its
own thread), real staged copies, the real filesystem store and the real upload workers. Only
the camera is left out: sessions are brought to "verified in staging" through the journal API,
as an offload leaves them.

The store is `FilesystemStore` itself or a subclass that counts calls or, once, plays a store
that goes away after its objects were linked (a fault a directory cannot be told to produce on
cue). Nothing sleeps: every wait is on a notice of the bus, with a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dockd.config import parse_config
from dockd.custody import check_chain
from dockd.errors import StoreUnavailable
from dockd.events import EventBus, Notice
from dockd.evidence import keys
from dockd.ids import CameraId
from dockd.journal import FileState, Journal, SessionRow, SessionState
from dockd.journal.thread import JournalThread
from dockd.offload.session import staged_path
from dockd.offload.walk import Found
from dockd.runtime import Problems, Runtime
from dockd.store.base import PutItem, PutOutcome
from dockd.store.filesystem import INCOMING, FilesystemStore
from dockd.upload.queue import BATCH_FILES, SMALL_FILE
from dockd.upload.worker import Uploader

DOCK = "batch-dock"
WAIT_S = 60.0
KIB = 1024


def content(seed: str, size: int) -> bytes:
    block = hashlib.sha256(seed.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


class CountingStore(FilesystemStore):
    """The filesystem store, counting what the workers ask of it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.batches: list[int] = []
        self.singles: list[str] = []
        self._lock = threading.Lock()

    def put_files(self, items: Sequence[PutItem]) -> list[PutOutcome]:
        with self._lock:
            self.batches.append(len(items))
        return super().put_files(items)

    def put_file(self, key: str, source: Path, sha256: str, size: int) -> None:
        with self._lock:
            self.singles.append(key)
        super().put_file(key, source, sha256, size)


class GoneAfterLinking(CountingStore):
    """The first batch goes in whole (durable, linked, verified), then the store is "away"
    before the worker hears back: the worker must try the batch again."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failed = 0

    def put_files(self, items: Sequence[PutItem]) -> list[PutOutcome]:
        out = super().put_files(items)
        with self._lock:
            if self.failed == 0:
                self.failed += 1
                raise StoreUnavailable("store away after the links (test)")
        return out


class Bed:
    """A dock's journal, staging and store, and upload workers to run over them."""

    def __init__(self, base: Path, store_root: Path | None = None) -> None:
        self.base = base
        self.state = base / "state"
        self.evidence = store_root or base / "evidence"
        self.evidence.mkdir(exist_ok=True)
        self.config = parse_config(
            {
                "dock": {"id": DOCK, "state_dir": str(self.state)},
                "sources": {"directory": {"enabled": True, "path": str(base / "dock")}},
                "store": {"kind": "filesystem", "path": str(self.evidence)},
                "upload": {"concurrency": 2, "backoff_initial": "1ms", "backoff_max": "5ms"},
                "mqtt": {"enabled": False},
            }
        )
        self.journal = Journal.open(self.state / "journal.sqlite3", DOCK)
        self.store: FilesystemStore = CountingStore(self.evidence)

    def session(self, camera: str, sizes: dict[str, int]) -> tuple[SessionRow, dict[str, bytes]]:
        """A session verified in staging: its files' staged copies written, the journal told."""
        j = self.journal
        s, _ = j.open_session(CameraId(camera), None, None, None, f"/srv/dock/{camera}")
        j.record_found(s, [Found(p.encode(), p, None, n, 1) for p, n in sizes.items()])
        data = {p: content(f"{camera}/{p}", n) for p, n in sizes.items()}
        rows = j.session_files(s.id)
        for f in rows:
            p = staged_path(self.config.staging_dir, s.id, f.id)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data[f.path])
        j.files_verified([(f, hashlib.sha256(data[f.path]).hexdigest(), "t") for f in rows])
        j.finish_offload(s.id, False)
        row = j.session(s.id)
        assert row is not None
        return row, data

    async def upload(self, until: Callable[[list[Notice]], bool]) -> list[Notice]:
        """Run the upload workers until the notices so far satisfy `until`; return them."""
        bus = EventBus()
        sub = bus.subscribe("test")
        rt = Runtime(
            config=self.config,
            journal=JournalThread(self.journal),
            bus=bus,
            store=self.store,
            problems=Problems(),
            offload_pool=ThreadPoolExecutor(1),
            upload_pool=ThreadPoolExecutor(1),
            camera_slots=asyncio.Semaphore(1),
        )
        uploader = Uploader(rt)
        task = asyncio.create_task(uploader.run())
        seen: list[Notice] = []

        async def watch() -> None:
            async for e in _events(sub):
                if isinstance(e, Notice):
                    seen.append(e)
                    if until(seen):
                        return

        try:
            await asyncio.wait_for(watch(), WAIT_S)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            rt.journal._executor.shutdown(wait=True)  # the journal stays open for the test
            rt.upload_pool.shutdown(wait=True)
            rt.offload_pool.shutdown(wait=True)
        return seen

    def states(self, session_id: str) -> dict[str, tuple[FileState, str | None]]:
        return {f.path: (f.state, f.error) for f in self.journal.session_files(session_id)}

    def stored_records(self, session_id: str) -> list[dict[str, object]]:
        return [
            dict(r.details)
            for r in self.journal.custody_records(session_id)
            if r.event == "file_stored"
        ]

    def incoming(self) -> list[str]:
        d = self.evidence / INCOMING
        return sorted(os.listdir(d)) if d.is_dir() else []


async def _events(sub: object) -> AsyncIterator[object]:
    async for e in sub:  # type: ignore[attr-defined]
        yield e


def ended(session_id: str) -> Callable[[list[Notice]], bool]:
    return lambda seen: any(
        n.session_id == session_id and n.event in ("session_uploaded", "upload_failed")
        for n in seen
    )


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[Bed]:
    b = Bed(tmp_path)
    yield b
    b.journal.close()


def small_sizes(n: int, prefix: str = "DCIM/100CAM") -> dict[str, int]:
    return {f"{prefix}/{k // 50:02d}/IMG{k:04d}.JPG": 4 * KIB + 97 * k for k in range(n)}


def assert_in_store_once(bed: Bed, s: SessionRow, data: dict[str, bytes]) -> None:
    """Every file stored, under its key, with its bytes, recorded once with its custody."""
    assert bed.states(s.id) == dict.fromkeys(data, (FileState.STORED, None))
    records = bed.stored_records(s.id)
    assert sorted(r["path"] for r in records) == sorted(data)  # each once
    for r in records:
        path = str(r["path"])
        assert r["key"] == keys.file_key(s.camera, s.id, path)
        assert r["sha256"] == hashlib.sha256(data[path]).hexdigest()
        assert r["verified_by"] == "readback"
        assert (bed.evidence / str(r["key"])).read_bytes() == data[path]
    check_chain(bed.journal.custody_records())
    assert bed.incoming() == []


async def test_a_session_of_many_small_files_uploads_in_batches_each_verified_with_custody(
    bed: Bed,
) -> None:
    sizes = small_sizes(150) | {"DCIM/100CAM/BIG.MP4": SMALL_FILE + 1}
    s, data = bed.session("X6BATCH01", sizes)

    seen = await bed.upload(ended(s.id))

    assert [n.event for n in seen if n.event in ("session_uploaded", "upload_failed")] == [
        "session_uploaded"
    ]
    assert_in_store_once(bed, s, data)
    assert isinstance(bed.store, CountingStore)
    # small files in a few batches, the big one alone
    assert sum(bed.store.batches) == 150 and max(bed.store.batches) <= BATCH_FILES
    assert len(bed.store.batches) <= 150 // BATCH_FILES + 3
    files_alone = [k for k in bed.store.singles if k.startswith(keys.file_key(s.camera, s.id, ""))]
    assert files_alone == [keys.file_key(s.camera, s.id, "DCIM/100CAM/BIG.MP4")]
    # then the sealed session's objects, one by one from their staged files, the manifest last
    # (no key and no xxh128 here: no signature, no ASC MHL history)
    assert bed.store.singles[len(files_alone) :] == [
        keys.sidecar_key(s.camera, s.id, name) for name in (keys.SUMS, keys.CUSTODY, keys.MANIFEST)
    ]
    assert not (bed.config.staging_dir / s.id).exists()  # staged files and sealed objects gone
    # a notice per file, as one by one
    assert sorted(str(n.details["path"]) for n in seen if n.event == "file_stored") == sorted(data)
    # the custody records read as those of the per-file path: one per file, same fields
    for r in bed.stored_records(s.id):
        assert set(r) == {"path", "key", "sha256", "verified_by"}
    row = bed.journal.session(s.id)
    assert row is not None and row.state == SessionState.UPLOADED


async def test_a_batch_with_a_name_the_store_refuses_stores_the_others_and_fails_that_one(
    bed: Bed,
) -> None:
    long = "DCIM/100CAM/" + "x" * 300 + ".JPG"  # more than NAME_MAX in the store
    sizes = small_sizes(20) | {long: 5000}
    s, data = bed.session("X6BATCH02", sizes)

    seen = await bed.upload(ended(s.id))

    assert "session_uploaded" in [n.event for n in seen]
    refused = [n for n in seen if n.event == "file_store_refused"]
    assert [n.details["path"] for n in refused] == [long]
    states = bed.states(s.id)
    state, error = states.pop(long)
    assert state == FileState.FAILED and error is not None and "store cannot hold" in error
    del data[long]
    assert states == dict.fromkeys(data, (FileState.STORED, None))
    assert sorted(str(r["path"]) for r in bed.stored_records(s.id)) == sorted(data)
    assert isinstance(bed.store, CountingStore) and bed.store.batches  # it went in a batch
    assert bed.incoming() == []


async def test_a_key_holding_other_bytes_mid_batch_fails_the_session_and_is_left_as_it_is(
    bed: Bed,
) -> None:
    """As one by one: other bytes under a key are a conflict, never retried or overwritten;
    the session is `upload_failed` for a person. The batch's other files went in: they are
    recorded stored."""
    sizes = small_sizes(30)
    s, data = bed.session("X6BATCH03", sizes)
    taken_path = sorted(data)[12]
    taken = bed.evidence / keys.file_key(s.camera, s.id, taken_path)
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"other bytes")

    seen = await bed.upload(ended(s.id))

    failed = [n for n in seen if n.event == "upload_failed"]
    assert len(failed) == 1 and "other content" in str(failed[0].details["error"])
    row = bed.journal.session(s.id)
    assert row is not None and row.state == SessionState.UPLOAD_FAILED
    assert taken.read_bytes() == b"other bytes"
    states = bed.states(s.id)
    assert states.pop(taken_path)[0] == FileState.VERIFIED  # not stored, left for a person
    stored = {p for p, (st, _) in states.items() if st == FileState.STORED}
    assert stored  # the others of its batch
    for p in stored:
        assert (bed.evidence / keys.file_key(s.camera, s.id, p)).read_bytes() == data[p]
    assert sorted(str(r["path"]) for r in bed.stored_records(s.id)) == sorted(stored)
    assert bed.incoming() == []


async def test_store_away_after_a_batch_was_linked_then_back_stores_everything_once(
    tmp_path: Path,
) -> None:
    bed = Bed(tmp_path)
    try:
        bed.store = GoneAfterLinking(bed.evidence)
        s, data = bed.session("X6BATCH04", small_sizes(100))

        seen = await bed.upload(ended(s.id))

        assert "session_uploaded" in [n.event for n in seen]
        assert bed.store.failed == 1
        assert_in_store_once(bed, s, data)
    finally:
        bed.journal.close()


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


async def test_store_full_mid_batch_then_grown_stores_everything_once_no_temporaries(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to mount a tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        _run("mount", "-t", "tmpfs", "-o", "size=128k,mode=0755", "tmpfs", str(mnt))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc.stderr.decode().strip()}")
    bed = Bed(tmp_path, store_root=mnt)
    try:
        s, data = bed.session("X6BATCH05", small_sizes(60))  # ~420 KiB into 128 KiB

        grown = threading.Event()

        class GrowWhenFull(CountingStore):
            def put_files(self, items: Sequence[PutItem]) -> list[PutOutcome]:
                try:
                    return super().put_files(items)
                except StoreUnavailable:
                    if not grown.is_set():  # the next attempt finds room
                        _run("mount", "-o", "remount,size=4m", str(mnt))
                        grown.set()
                    raise

        bed.store = GrowWhenFull(mnt)

        seen = await bed.upload(ended(s.id))

        assert grown.is_set(), "the store never filled up"
        assert "session_uploaded" in [n.event for n in seen]
        assert_in_store_once(bed, s, data)
    finally:
        bed.journal.close()
        _run("umount", str(mnt))


async def test_a_kill_between_link_and_journal_record_resumes_as_the_same_content(
    bed: Bed,
) -> None:
    """The objects of a batch were linked and made durable, then the daemon died before the
    journal heard of them: the next run finds them whole, records each once, and goes on."""
    s, data = bed.session("X6BATCH06", small_sizes(90))
    files = bed.journal.session_files(s.id)[:BATCH_FILES]
    items = [
        PutItem(
            keys.file_key(s.camera, s.id, f.path),
            staged_path(bed.config.staging_dir, s.id, f.id),
            f.sha256 or "",
            f.size,
        )
        for f in files
    ]
    assert FilesystemStore(bed.evidence).put_files(items) == ["readback"] * len(items)
    assert set(bed.states(s.id).values()) == {(FileState.VERIFIED, None)}  # none recorded

    seen = await bed.upload(ended(s.id))

    assert "session_uploaded" in [n.event for n in seen]
    assert "upload_failed" not in [n.event for n in seen]
    assert_in_store_once(bed, s, data)


class AwayForAWhile(CountingStore):
    """Away (StoreUnavailable, before writing anything) for the first `away` calls."""

    def __init__(self, root: Path, away: int) -> None:
        super().__init__(root)
        self.away = away
        self.calls: list[int] = []

    def put_files(self, items: Sequence[PutItem]) -> list[PutOutcome]:
        with self._lock:
            self.calls.append(len(items))
            away = len(self.calls) <= self.away
        if away:
            raise StoreUnavailable("store away (test)")
        return super().put_files(items)


async def test_while_the_store_is_away_each_worker_holds_one_file_then_batches_resume(
    tmp_path: Path,
) -> None:
    """A batch that meets a store away keeps its first file only (the rest given back), as a
    file alone would be held: nothing else is kept from the queue's order while it is away.
    Once back, everything goes in once, in batches again."""
    bed = Bed(tmp_path)
    try:
        store = AwayForAWhile(bed.evidence, away=4)
        bed.store = store
        s, data = bed.session("X6BATCH07", small_sizes(2 * BATCH_FILES + 2))

        seen = await bed.upload(ended(s.id))

        assert "session_uploaded" in [n.event for n in seen]
        # two workers: each claimed a full batch, met the store away, then retried one file
        assert sorted(store.calls[:4]) == [1, 1, BATCH_FILES, BATCH_FILES]
        assert max(store.calls[4:]) > 1  # batches again once the store is back
        assert_in_store_once(bed, s, data)
    finally:
        bed.journal.close()
