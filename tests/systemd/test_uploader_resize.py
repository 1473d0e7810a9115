"""A reload with a new `upload.concurrency` changes how many files go to the store at once, in a
running daemon: more workers start at once; fewer finish the job in hand first (or, while the
store is away, give it back between two attempts), none dropped.

The store is the real filesystem store, seen through `HeldStore`, which counts the puts in flight
and holds each until the test lets go: the only way to see how many workers write at once. It
changes nothing that reaches the store. `AwayStore` also plays a store that is away (a fault a
real directory cannot be told to produce on cue) until the test brings it back.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from systemd_support import WAIT_S, Dock, running_daemon, watch_notice

from dockd.errors import StoreUnavailable
from dockd.store.base import Store


class HeldStore:
    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.name = inner.name
        self.in_flight = 0
        self.most = 0
        self._cond = threading.Condition()
        self._open = False

    def put_file(self, key: str, source: Path, sha256: str, size: int) -> None:
        with self._cond:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._open, WAIT_S)
        try:
            self.inner.put_file(key, source, sha256, size)
        finally:
            with self._cond:
                self.in_flight -= 1
                self._cond.notify_all()

    def wait_in_flight(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.in_flight >= n, WAIT_S), (
                f"{self.in_flight} puts in flight, waited for {n}"
            )

    def release(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_reload_grows_then_shrinks_upload_workers_without_dropping_a_job(
    dock: Dock,
) -> None:
    dock.configure(concurrency=1)
    async with running_daemon(dock.config(), dock.config_file) as daemon:
        assert daemon.rt is not None and daemon.uploader is not None
        held = HeldStore(daemon.rt.store)
        daemon.rt.store = held
        uploaded = watch_notice(daemon, "session_uploaded")
        files = dock.camera("X6RESIZE1", {f"DCIM/{i:04d}.MP4": 50_000 for i in range(6)})
        dock.dock_camera("X6RESIZE1")

        await asyncio.to_thread(held.wait_in_flight, 1)
        assert held.most == 1 and daemon.uploader.workers == 1

        dock.configure(concurrency=3)
        daemon.reload()  # what SIGHUP calls
        assert daemon.config.upload.concurrency == 3
        await asyncio.to_thread(held.wait_in_flight, 3)
        assert daemon.uploader.workers == 3

        # fewer workers while three puts are held: each finishes the file it holds
        retiring = [t for n, t in daemon.uploader._workers.items() if n >= 1]
        dock.configure(concurrency=1)
        daemon.reload()
        assert daemon.uploader.workers == 3  # nobody walked away from a claimed file
        held.release()
        await asyncio.wait_for(uploaded, WAIT_S)
        await asyncio.wait_for(asyncio.gather(*retiring), WAIT_S)
        assert daemon.uploader.workers == 1
        assert held.most == 3

        states = dock.query("SELECT path, state, key FROM files WHERE camera = 'X6RESIZE1'")
        assert {p: s for p, s, _ in states} == dict.fromkeys(files, "stored")
        for path, _, key in states:
            assert (dock.evidence / key).read_bytes() == files[path]


class AwayStore(HeldStore):
    """The store away (StoreUnavailable) until `back()`: workers sit in their retry loops."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.attempts: dict[str, int] = {}
        self._back = False
        self.release()

    def put_file(self, key: str, source: Path, sha256: str, size: int) -> None:
        with self._cond:
            self.attempts[key] = self.attempts.get(key, 0) + 1
            self._cond.notify_all()
            away = not self._back
        if away:
            raise StoreUnavailable(f"{key}: store away (test)")
        super().put_file(key, source, sha256, size)

    def wait_retrying(self, keys: int) -> None:
        """Until `keys` different files have each failed at least twice."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum(n >= 2 for n in self.attempts.values()) >= keys, WAIT_S
            )
            assert ok, self.attempts

    def back(self) -> None:
        with self._cond:
            self._back = True


async def test_a_worker_retired_while_the_store_is_away_gives_its_file_back(dock: Dock) -> None:
    dock.configure(concurrency=2, upload='backoff_initial = "10ms"\nbackoff_max = "50ms"\n')
    async with running_daemon(dock.config(), dock.config_file) as daemon:
        assert daemon.rt is not None and daemon.uploader is not None
        away = AwayStore(daemon.rt.store)
        daemon.rt.store = away
        uploaded = watch_notice(daemon, "session_uploaded")
        files = dock.camera("X6RESIZE2", {"DCIM/0001.MP4": 1_000, "DCIM/0002.MP4": 2_000})
        dock.dock_camera("X6RESIZE2")
        await asyncio.to_thread(away.wait_retrying, 2)  # both workers retrying a file each

        retiring = daemon.uploader._workers[1]
        dock.configure(concurrency=1, upload='backoff_initial = "10ms"\nbackoff_max = "50ms"\n')
        daemon.reload()
        # it does not wait for the store: it gives its file back at its next attempt and ends
        await asyncio.wait_for(retiring, WAIT_S)
        assert daemon.uploader.workers == 1
        assert not uploaded.done()

        away.back()
        await asyncio.wait_for(uploaded, WAIT_S)
        states = dock.query("SELECT path, state, key FROM files WHERE camera = 'X6RESIZE2'")
        assert {p: s for p, s, _ in states} == dict.fromkeys(files, "stored")
        for path, _, key in states:
            assert (dock.evidence / key).read_bytes() == files[path]
