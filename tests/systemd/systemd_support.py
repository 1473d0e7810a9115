"""Harness for the systemd-facing tests: dockd run as systemd would run it, without systemd.

- `NotifyListener` is what systemd's notify socket is: a real AF_UNIX datagram socket, bound
  where `$NOTIFY_SOCKET` points (a path, or `@name` in the abstract namespace). A thread receives
  every datagram and stamps it with the time it arrived, so a test can wait on a message, or
  show that none arrived in a span of time, while the daemon's event loop is blocked.
- `Dock` lays out one dock in a temporary directory (`dock/` watched by the directory source,
  `aside/` where cameras are built, `evidence/` the filesystem store, `state/`) and writes its
  configuration; a camera docks by being renamed into `dock/`, atomically, as the source wants.
- `DockdProcess` is one `dockd run -c FILE` process; a thread reads its JSON log lines and
  `wait_log(event, ...)` blocks until a matching one is logged.
- `running_daemon` runs a `Daemon` in the test's own event loop, for what needs the loop itself
  (blocking it, resizing the uploader).

Everything waits on a datagram, a log line or an event, never on a sleep. Every process, socket
and daemon started is stopped at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dockd.config import Config, load_config
from dockd.daemon import Daemon
from dockd.events import Notice

WAIT_S = 30.0
DOCK_ID = "systemd-test-dock"

LogEvent = dict[str, Any]


# --------------------------------------------------------------------------------------------
# the notify socket
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Datagram:
    at: float  # time.monotonic() when it arrived
    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")

    def has(self, line: str) -> bool:
        return line in self.lines

    @property
    def status(self) -> str | None:
        for line in self.lines:
            if line.startswith("STATUS="):
                return line.removeprefix("STATUS=")
        return None


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str, on_message: Callable[[Datagram], None] | None = None) -> None:
        self.address = address  # as $NOTIFY_SOCKET spells it
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(0.1)  # lets the thread see `close`
        self.messages: list[Datagram] = []
        self.on_message = on_message
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, name="notify-listener", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            msg = Datagram(time.monotonic(), data.decode())
            if self.on_message is not None:
                self.on_message(msg)
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def wait_for(
        self, predicate: Callable[[Datagram], bool], timeout: float = WAIT_S, after: int = 0
    ) -> Datagram:
        """The first datagram (from index `after` on) that `predicate` accepts."""
        deadline = time.monotonic() + timeout
        i = after
        with self._cond:
            while True:
                while i < len(self.messages):
                    if predicate(self.messages[i]):
                        return self.messages[i]
                    i += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [m.text for m in self.messages[after:]][-20:]
                    raise AssertionError(f"no such datagram within {timeout} s; last: {seen}")
                self._cond.wait(remaining)

    def wait_line(self, line: str, timeout: float = WAIT_S, after: int = 0) -> Datagram:
        return self.wait_for(lambda m: m.has(line), timeout, after)

    def wait_count(self, line: str, n: int, timeout: float = WAIT_S, after: int = 0) -> Datagram:
        """The `n`th datagram with `line` from index `after` on."""
        seen = 0

        def nth(m: Datagram) -> bool:
            nonlocal seen
            seen += m.has(line)
            return seen >= n

        return self.wait_for(nth, timeout, after)

    def since(self, after: int) -> list[Datagram]:
        with self._cond:
            return list(self.messages[after:])

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()


@pytest.fixture
def abstract_notify_socket() -> Iterator[NotifyListener]:
    listener = NotifyListener(f"@dockd-test-{uuid.uuid4().hex}")
    yield listener
    listener.close()


# --------------------------------------------------------------------------------------------
# a dock laid out in a temporary directory
# --------------------------------------------------------------------------------------------


def content(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Dock:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.dock = base / "dock"
        self.aside = base / "aside"
        self.evidence = base / "evidence"
        self.state = base / "state"
        for d in (self.dock, self.aside, self.evidence):
            d.mkdir()
        self.config_file = base / "dockd.toml"
        self.configure()

    def configure(
        self, *, concurrency: int = 2, upload: str = "", extra: str = "", broken: bool = False
    ) -> Path:
        """Write the configuration file (atomically: a SIGHUP never reads half a file)."""
        text = (
            f'[dock]\nid = "{DOCK_ID}"\nstate_dir = "{self.state}"\n'
            f'[sources.directory]\nenabled = true\npath = "{self.dock}"\n'
            f'[store]\nkind = "filesystem"\npath = "{self.evidence}"\n'
            f"[upload]\nconcurrency = {concurrency}\n{upload}"
            "[mqtt]\nenabled = false\n" + extra
        )
        if broken:
            text += "[upload]\nconcurrency = 0\n"  # a duplicate table: not even valid TOML
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_file)
        return self.config_file

    def config(self) -> Config:
        return load_config(self.config_file)

    def camera(self, name: str, files: dict[str, int]) -> dict[str, bytes]:
        """Build camera `name` aside with files of the given sizes; returns path -> content."""
        made: dict[str, bytes] = {}
        for rel, size in files.items():
            data = content(f"{name}/{rel}", size)
            p = self.aside / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            made[rel] = data
        return made

    def dock_camera(self, name: str) -> None:
        os.rename(self.aside / name, self.dock / name)

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.state / 'journal.sqlite3'}?mode=ro", uri=True)
        try:
            return list(conn.execute(sql, args).fetchall())
        finally:
            conn.close()


@pytest.fixture
def dock(tmp_path: Path) -> Dock:
    return Dock(tmp_path)


# --------------------------------------------------------------------------------------------
# `dockd run` as a process
# --------------------------------------------------------------------------------------------


class DockdProcess:
    """One `dockd run -c FILE` process and the JSON lines it logs."""

    def __init__(self, config: Path, env: dict[str, str], log_file: Path) -> None:
        full = {k: v for k, v in os.environ.items() if k not in ("DOCKD_CONFIG", "NOTIFY_SOCKET")}
        full.update(env)
        full["PYTHONUNBUFFERED"] = "1"
        self.events: list[LogEvent] = []
        self._cond = threading.Condition()
        self._eof = False
        self.log_file = log_file
        self._stderr = open(log_file.with_suffix(".stderr"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dockd", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=full,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_file, "ab") as log:
            for raw in self.proc.stdout:
                log.write(raw)
                line = raw.decode("utf-8", "replace").rstrip("\n")
                try:
                    event = json.loads(line)
                    if not isinstance(event, dict):
                        raise ValueError
                except ValueError:
                    event = {"event": "_unparsed", "line": line}
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def wait_log(
        self,
        event: str,
        predicate: Callable[[LogEvent], bool] | None = None,
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
                        f"dockd exited ({self.proc.poll()}) before logging {event}; "
                        f"stderr: {self.log_file.with_suffix('.stderr').read_text()[-2000:]}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"dockd did not log {event} within {timeout} s")
                self._cond.wait(remaining)

    def logged(self, event: str) -> list[LogEvent]:
        with self._cond:
            return [e for e in self.events if e.get("event") == event]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        self._stderr.close()


@pytest.fixture
def start_dockd(tmp_path: Path) -> Iterator[Callable[..., DockdProcess]]:
    started: list[DockdProcess] = []

    def start(config: Path, **env: str) -> DockdProcess:
        p = DockdProcess(config, env, tmp_path / f"dockd-{len(started)}.log")
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


# --------------------------------------------------------------------------------------------
# a Daemon in the test's event loop
# --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_daemon(config: Config, config_file: Path | None = None) -> AsyncIterator[Daemon]:
    """Run a Daemon as `dockd run` does, in this event loop; stop it (as SIGTERM) at the end."""
    daemon = Daemon(config, config_file=config_file)
    daemon.preflight()
    task = asyncio.create_task(daemon.run(), name="daemon")
    ready = asyncio.create_task(daemon.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=WAIT_S, return_when="FIRST_COMPLETED")
    if task in done:
        ready.cancel()
        task.result()  # raises what stopped it
        raise AssertionError("the daemon returned before it was ready")
    assert ready in done, "the daemon was not ready in time"
    try:
        yield daemon
    finally:
        daemon.stop()
        assert await asyncio.wait_for(task, WAIT_S) == 0


def watch_notice(
    daemon: Daemon, event: str, predicate: Callable[[Notice], bool] | None = None
) -> asyncio.Task[Notice]:
    """A task that ends with the next notice named `event` on the daemon's bus. Subscribed at
    once: call it before whatever makes the notice."""
    sub = daemon.bus.subscribe(f"test-{event}")

    async def wait() -> Notice:
        try:
            async for e in sub:
                if (
                    isinstance(e, Notice)
                    and e.event == event
                    and (predicate is None or predicate(e))
                ):
                    return e
        finally:
            daemon.bus.unsubscribe(sub)
        raise AssertionError(f"the bus closed before {event}")

    return asyncio.create_task(wait(), name=f"watch-{event}")
