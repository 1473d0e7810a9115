"""Real mosquitto brokers for the MQTT tests, a subscriber that records what they carry, and a
dock site (directory source, filesystem store) to run the daemon on.

- `Broker` runs `mosquitto -c FILE` on a free loopback port from a config file written here
  (`user root`: as root it would otherwise drop to `mosquitto` and not read our 0700 tmp dir;
  `persistence false`: a restarted broker has lost every retained message). It is ready when it
  logs "running"; it is stopped by its pid. `restart()` keeps the port.
- `Recorder` is a separate paho client subscribed (QoS 2, so a message arrives with the QoS it
  was published with) to the topics under test. It records topic, payload, QoS and retain flag.
  `barrier()` publishes a marker and waits for it: everything the broker had queued for the
  recorder before (retained messages on subscribe included) has then arrived.
- `Cut` is a TCP relay between the daemon and a broker: `cut()` is a network outage (the broker
  and the recorder stay up), `restore()` ends it. A fake of the network, not of the broker.

Every wait is on a message, a log line or an event, with a timeout; never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from dockd.config import Config, parse_config
from dockd.daemon import Daemon
from dockd.events import Event, EventBus, Subscription

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
WAIT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------------
# the broker
# --------------------------------------------------------------------------------------------


class Broker:
    def __init__(self, workdir: Path, extra: str = "", name: str = "broker") -> None:
        if not Path(MOSQUITTO).exists():
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.name = name
        self.conf = self.dir / f"{name}.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "user root\npersistence false\nlog_dest stderr\nlog_type all\n" + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.reader: threading.Thread | None = None
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        mark = len(self.lines)
        self.reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self.reader.start()
        self.wait_log("running", after=mark)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:  # drained to the end: a full pipe would stall the broker
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip())
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<exited>")
            self._cond.notify_all()

    def wait_log(self, text: str, after: int = 0, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    if text in line:
                        return line
                    if line == "<exited>":
                        raise AssertionError("mosquitto exited:\n" + "\n".join(self.lines[-20:]))
                if not self._cond.wait(deadline - time.monotonic()):
                    raise AssertionError(f"mosquitto did not log {text!r}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        os.kill(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait(10)
        # The old broker's "<exited>" line must be in `lines` before a restart takes its mark,
        # or the new broker's wait would read the old one's exit as its own.
        if self.reader is not None:
            self.reader.join(10)
            self.reader = None

    def restart(self) -> None:
        self.stop()
        self.start()


AUTH_USER = "dock"
AUTH_PASSWORD = "s3cret-Pa55"


# --------------------------------------------------------------------------------------------
# a subscriber that records
# --------------------------------------------------------------------------------------------


@dataclass
class Msg:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    n: int  # its place among the recorder's messages
    at: float = field(default_factory=time.monotonic)

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8")

    @property
    def json(self) -> Any:
        return json.loads(self.payload)


class Recorder:
    def __init__(
        self,
        port: int,
        topics: tuple[str, ...] = ("#",),
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.topics = topics
        self.messages: list[Msg] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._marker = f"test/barrier/{uuid.uuid4().hex}"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"rec-{uuid.uuid4().hex}")
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("the recorder could not subscribe")

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        # again after a reconnect: a restarted broker has forgotten the subscription
        c.subscribe([(t, 2) for t in (*self.topics, self._marker)])

    def _on_message(self, c: Any, u: Any, m: paho.MQTTMessage) -> None:
        with self._cond:
            n = len(self.messages)
            self.messages.append(Msg(m.topic, bytes(m.payload), m.qos, bool(m.retain), n))
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[Msg], bool], timeout: float = WAIT_S, after: int = 0) -> Msg:
        deadline = time.monotonic() + timeout
        with self._cond:
            i = after
            while True:
                while i < len(self.messages):
                    if pred(self.messages[i]):
                        return self.messages[i]
                    i += 1
                if not self._cond.wait(deadline - time.monotonic()):
                    seen = "\n".join(f"{m.topic} {m.text[:200]}" for m in self.messages[-15:])
                    raise AssertionError(f"no matching message within {timeout} s; last:\n{seen}")

    async def until(
        self, pred: Callable[[Msg], bool], within: float = WAIT_S, after: int = 0
    ) -> Msg:
        return await asyncio.to_thread(self.wait_for, pred, within, after)

    def barrier(self) -> None:
        mark = len(self.messages)
        self.client.publish(self._marker, b"barrier", qos=1)
        self.wait_for(lambda m: m.topic == self._marker, after=mark)

    def on(self, topic: str) -> list[Msg]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def snapshot(port: int, topics: tuple[str, ...], **auth: str) -> dict[str, Msg]:
    """The retained messages under `topics`, as a new subscriber gets them."""
    rec = Recorder(port, topics, **auth)
    try:
        rec.barrier()
        retained: dict[str, Msg] = {}
        for m in rec.messages:  # live messages may follow; the retained ones come first
            if m.retain and not m.topic.startswith("test/barrier/"):
                retained.setdefault(m.topic, m)
        return retained
    finally:
        rec.close()


# --------------------------------------------------------------------------------------------
# a network that can be cut
# --------------------------------------------------------------------------------------------


class Cut:
    """A TCP relay to a broker on the test's event loop; `cut()` drops every connection and
    refuses new ones (they are accepted and closed at once) until `restore()`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.refused = asyncio.Event()
        self._down = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            self.refused.set()
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}
        self._tasks.discard(task)

    def cut(self) -> None:
        self._down = True
        self.refused.clear()
        for w in self._writers:
            w.transport.abort()

    def restore(self) -> None:
        self._down = False

    async def close(self) -> None:
        self.cut()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# --------------------------------------------------------------------------------------------
# a dock site
# --------------------------------------------------------------------------------------------


class Site:
    """dock/ (watched), aside/ (cameras built and parked), evidence/ (the store), state/."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dock_id = f"dock-{uuid.uuid4().hex[:8]}"
        for d in ("dock", "aside", "evidence"):
            (root / d).mkdir(parents=True)
        self.files: dict[str, bytes] = {}  # every file put on any camera, by camera/rel path

    def camera(self, name: str, files: int, size: int, seed: int = 0) -> Path:
        root = self.root / "aside" / name
        (root / "DCIM").mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"{name}-{seed}")
        for n in range(files):
            data = rng.randbytes(size)
            (root / "DCIM" / f"{seed:02d}{n:04d}.MP4").write_bytes(data)
            self.files[f"{name}/DCIM/{seed:02d}{n:04d}.MP4"] = data
        return root

    def dock(self, name: str) -> None:
        os.rename(self.root / "aside" / name, self.root / "dock" / name)

    def undock(self, name: str) -> None:
        os.rename(self.root / "dock" / name, self.root / "aside" / name)

    def data(self, port: int, **mqtt: Any) -> dict[str, Any]:
        return {
            "dock": {"id": self.dock_id, "state_dir": str(self.root / "state")},
            "sources": {"directory": {"enabled": True, "path": str(self.root / "dock")}},
            "store": {"kind": "filesystem", "path": str(self.root / "evidence")},
            "offload": {"min_free_staging": "1MiB"},
            "upload": {"backoff_initial": "100ms", "backoff_max": "1s"},
            "cameras": {"CAMA": {"officer": "badge-0042"}, "CAMB": {"officer": "badge-0077"}},
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port, **mqtt},
            "log": {"level": "info"},
        }

    def config(self, port: int, **mqtt: Any) -> Config:
        return parse_config(self.data(port, **mqtt))

    @property
    def base(self) -> str:
        return f"dockd/{self.dock_id}"


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[Daemon, Subscription]]:
    """The real daemon in this process, and a subscription to its event bus."""
    bus = EventBus()
    sub = bus.subscribe("test", maxsize=1_000_000)
    daemon = Daemon(config, bus=bus)
    task = asyncio.create_task(daemon.run(), name="daemon")
    try:
        async with asyncio.timeout(20):
            await daemon.ready.wait()
        yield daemon, sub
    finally:
        daemon.stop()
        async with asyncio.timeout(30):
            await task


async def until(sub: Subscription, pred: Callable[[Event], bool], within: float = WAIT_S) -> Event:
    async with asyncio.timeout(within):
        async for event in sub:
            if pred(event):
                return event
    raise AssertionError("the bus closed")


def dockd_run(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "DOCKD_CONFIG"}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "dockd", "run", "-c", str(config_file)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for a dockd configuration: nested tables of strings, numbers, booleans."""
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    out = [f"[{prefix}]"] if prefix and scalars else []
    for k, v in scalars.items():
        out.append(f"{k} = {json.dumps(v)}")  # JSON strings, numbers and booleans are TOML's
    for k, v in tables.items():
        name = k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)
        out.append(to_toml(v, f"{prefix}.{name}" if prefix else name))
    return "\n".join(out) + "\n"
