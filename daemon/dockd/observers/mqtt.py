"""MQTT status for dashboards (SPEC §7): the dock summary, each camera bay, one-off events and
availability, fed from the event bus and never able to slow, stop or fail an offload or upload.

Why paho's own network thread (`loop_start`) and not the socket driven from asyncio: paho's
connect (DNS, TCP connect, TLS handshake) blocks, for seconds against a blackholed broker, and its
reconnect-with-backoff lives in `loop_forever`; in its thread both are away from the event loop,
with no hand-written reader/writer/misc plumbing. The event loop only ever calls `publish`, which
queues a packet and wakes the thread (non-blocking), and paho's callbacks only hand their facts
back to the loop with `call_soon_threadsafe`. All state lives on the loop; nothing here waits on
the broker except a clean stop (bounded by STOP_FLUSH_S).

Memory stays bounded however long the broker is away (`Outbox`): the latest payload of each
retained topic, a bounded backlog of events (the oldest dropped and counted, reported as an
`events_dropped` event), and nothing handed to paho unless connected. paho resends unacknowledged
QoS 1 messages itself after a reconnect; so that such a stale resend can never overwrite a newer
retained payload, a retained topic has at most one message in flight, and its newer payload goes
out only after the older one is acknowledged. Every (re)connect republishes `availability` and
every retained topic: a restarted broker without persistence has lost them.

Nothing private goes out: no footage, no hash (keys naming one are dropped, 64-hex and base64
SHA-256 runs in free text are blanked), no officer unless `mqtt.publish_officer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from dockd import __version__
from dockd.config import Config
from dockd.events import CameraStatus, DockStatus, Event, Notice, Progress, Subscription
from dockd.ids import utc_now
from dockd.observers import homeassistant
from dockd.observers.log import get as get_log

QOS = 1
KEEPALIVE_S = 30
RECONNECT_MIN_S = 1  # paho doubles the wait after each failure, up to the max
RECONNECT_MAX_S = 30
EVENTS_BACKLOG = 1000  # events kept while the broker is away; older ones are dropped, counted
EVENTS_IN_FLIGHT = 100  # events handed to paho and not yet acknowledged (a window, as TCP)
STOP_FLUSH_S = 3.0  # a clean stop waits this long for `offline` to be acknowledged
RATE_TAU_S = 5.0  # time constant of the smoothed transfer rate
COMPLAIN_EVERY_S = 600.0  # the same connection failure is logged again after this long
NOT_AUTHORIZED = (134, 135)  # "Bad user name or password", "Not authorized" (3.1.1: 4, 5)

# camera state -> the phase its counters count; states not here keep the phase they were in
PHASE = {
    "docked": "offload",
    "offloading": "offload",
    "offloaded": "offload",
    "uploading": "upload",
    "uploaded": "upload",
    "clearing": "clear",
    "cleared": "clear",
}
MOVING = {"offloading", "uploading", "clearing"}
FINISHED = {"offloaded", "uploaded", "cleared"}
OFFLOAD_ACTIVE = {"docked", "offloading"}

_HASH_KEY = re.compile(r"sha|hash|digest|checksum", re.IGNORECASE)
_OFFICER_KEY = re.compile(r"officer", re.IGNORECASE)
_HEX_HASH = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64,}(?![0-9A-Fa-f])")
_B64_SHA256 = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}=")

Json = dict[str, Any]


# ---- what is said: pure functions over events -------------------------------------------------


@dataclass(frozen=True)
class Privacy:
    """What may not leave the dock: hashes always; officer ids unless `publish_officer`."""

    publish_officer: bool = False
    officers: tuple[str, ...] = ()  # the configured officer ids, blanked in free text

    @classmethod
    def of(cls, config: Config) -> Privacy:
        if config.mqtt.publish_officer:
            return cls(True)
        return cls(False, tuple(f.officer for f in config.cameras.values() if f.officer))


def scrub(text: str, privacy: Privacy = Privacy()) -> str:
    """Free text with hashes (and officer ids, unless published) blanked."""
    text = _B64_SHA256.sub("[hash removed]", _HEX_HASH.sub("[hash removed]", text))
    for officer in privacy.officers:
        if len(officer) >= 3:
            text = text.replace(officer, "[officer removed]")
    return text


def clean(value: Any, privacy: Privacy = Privacy()) -> Any:
    """`value` as JSON data without private keys or hashes (event details come from anywhere
    in the daemon; this is the one place that decides what of them may leave the dock)."""
    if isinstance(value, str):
        return scrub(value, privacy)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {
            str(k): clean(v, privacy)
            for k, v in value.items()
            if not _HASH_KEY.search(str(k))
            and (privacy.publish_officer or not _OFFICER_KEY.search(str(k)))
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [clean(v, privacy) for v in value]
    return scrub(str(value), privacy)


def _seconds(at: str) -> float:
    try:
        return datetime.fromisoformat(at).timestamp()
    except ValueError:
        return time.time()


@dataclass
class RateMeter:
    """Bytes per second, smoothed exponentially with time constant `tau` over irregular
    samples (the bus coalesces progress, so samples come when they come)."""

    tau: float = RATE_TAU_S
    bps: float | None = None
    _t: float | None = None
    _done: int = 0

    def reset(self) -> None:
        self.bps, self._t, self._done = None, None, 0

    def sample(self, t: float, done: int) -> None:
        if self._t is not None:
            dt = t - self._t
            if dt <= 0:
                return
            now = max(0, done - self._done) / dt
            weight = 1 - math.exp(-dt / self.tau)
            self.bps = now if self.bps is None else self.bps + weight * (now - self.bps)
        self._t, self._done = t, done


@dataclass
class CameraView:
    """What the camera topic says about one bay, folded from its status and progress events."""

    camera: str
    state: str = "docked"
    session_id: str | None = None
    phase: str = "offload"
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    safe_to_undock: bool = False
    error: str | None = None
    updated_at: str = ""
    rate: RateMeter = field(default_factory=RateMeter)

    def apply_status(self, ev: CameraStatus) -> bool | None:
        """Fold a state change in: True if the state (session, safety, error) changed, False
        if it repeats the current one, None if it is ignored: it is about an older session of
        this camera while a new one is being offloaded (the bay shows the camera in it)."""
        if (
            self.session_id is not None
            and ev.session_id != self.session_id
            and self.state in OFFLOAD_ACTIVE
            and ev.state not in OFFLOAD_ACTIVE
        ):
            return None
        before = (self.state, self.session_id, self.safe_to_undock, self.error)
        same_session = ev.session_id == self.session_id
        phase = PHASE.get(ev.state, self.phase if same_session else "offload")
        self._counters(ev.session_id, phase, ev)
        self.state, self.safe_to_undock, self.error = ev.state, ev.safe_to_undock, ev.error
        self.updated_at = ev.at
        return (self.state, self.session_id, self.safe_to_undock, self.error) != before

    def apply_progress(self, ev: Progress) -> bool:
        """Fold progress in; False unless it counts this bay's current, unfinished phase."""
        fresh = self.session_id is None
        if not fresh and (ev.session_id != self.session_id or ev.phase != self.phase):
            return False
        if not fresh and self.state not in MOVING | OFFLOAD_ACTIVE:
            return False
        if fresh:  # the observer (re)started mid-phase: the state follows from the phase
            self.state = "offloading" if ev.phase == "offload" else "uploading"
            self.safe_to_undock = ev.phase != "offload"
        self._counters(ev.session_id, ev.phase, ev)
        self.updated_at = ev.at
        return True

    def _counters(self, session_id: str | None, phase: str, ev: CameraStatus | Progress) -> None:
        if session_id != self.session_id or phase != self.phase:
            self.session_id, self.phase = session_id, phase
            self.files_done = self.bytes_done = self.files_total = self.bytes_total = 0
            self.rate.reset()
        # within a phase the counters never go down (SPEC §7); totals arrive after the walk
        self.files_total = ev.files_total or self.files_total
        self.bytes_total = ev.bytes_total or self.bytes_total
        self.files_done = max(self.files_done, ev.files_done)
        self.bytes_done = max(self.bytes_done, ev.bytes_done)
        self.rate.sample(_seconds(ev.at), self.bytes_done)

    def payload(self, officer: str | None = None, with_officer: bool = False) -> Json:
        rate: int | None = 0
        eta: int | None = None
        if self.state in MOVING:
            bps = self.rate.bps
            rate = None if bps is None else round(bps)
            if bps:
                eta = math.ceil(max(0, self.bytes_total - self.bytes_done) / bps)
        elif self.state in FINISHED:
            eta = 0
        out: Json = {
            "state": self.state,
            "session_id": self.session_id,
            "files_total": self.files_total,
            "files_done": self.files_done,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "rate_bps": rate,
            "eta_s": eta,
            "safe_to_undock": self.safe_to_undock,
            "error": self.error,
            "updated_at": self.updated_at,
        }
        if with_officer:
            out["officer"] = officer
        return out


def state_payload(status: DockStatus) -> Json:
    return {
        "state": status.state,
        "cameras_docked": len(status.cameras_docked),
        "cameras": list(status.cameras_docked),
        "queue": {
            "sessions": status.queue.sessions,
            "files": status.queue.files,
            "bytes": status.queue.bytes,
            "failed": status.queue.failed,
            "prioritized": list(status.queue.prioritized),
        },
        "staging_free_bytes": status.staging_free_bytes,
        "store_reachable": status.store_reachable,
        "problems": list(status.problems),
        "version": status.version,
        "updated_at": status.at,
    }


def event_payload(notice: Notice, officer: str | None = None, with_officer: bool = False) -> Json:
    """`event`, `at`, `camera`, `session_id`, then the notice's details as further keys."""
    out: Json = {
        "event": notice.event,
        "at": notice.at,
        "camera": notice.camera,
        "session_id": notice.session_id,
    }
    for key, value in notice.details.items():
        out.setdefault(key, value)
    if with_officer and notice.camera is not None:
        out["officer"] = officer
    return out


def encode(payload: Json, privacy: Privacy = Privacy()) -> bytes:
    """The wire form of every JSON payload: cleaned, then compact UTF-8."""
    data = clean(payload, privacy)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


# ---- what is still to be said: bounded bookkeeping ---------------------------------------------


class Outbox:
    """The latest payload per retained topic, a bounded event backlog, and what is in flight."""

    def __init__(self, backlog: int) -> None:
        self.retained: dict[str, bytes] = {}  # insertion order is publication order
        self.dropped = 0  # events dropped and not yet reported
        self._backlog = backlog
        self._dirty: dict[str, None] = {}
        self._events: deque[bytes] = deque()
        self._in_flight: dict[int, str | None] = {}  # mid -> retained topic, None: an event
        self._busy: set[str] = set()

    def set_retained(self, topic: str, payload: bytes) -> None:
        if self.retained.get(topic) != payload:
            self.retained[topic] = payload
            self._dirty[topic] = None

    def add_event(self, payload: bytes) -> None:
        if len(self._events) >= self._backlog:
            self._events.popleft()
            self.dropped += 1
        self._events.append(payload)

    def reconnected(self) -> None:
        self._dirty = dict.fromkeys(self.retained)

    def forget_in_flight(self) -> None:
        """A new client: the old one's unacknowledged messages went with it."""
        self._in_flight.clear()
        self._busy.clear()

    def take_retained(self) -> list[tuple[str, bytes]]:
        ready = [t for t in self._dirty if t not in self._busy]
        for topic in ready:
            del self._dirty[topic]
        return [(t, self.retained[t]) for t in ready]

    def take_events(self) -> list[bytes]:
        room = EVENTS_IN_FLIGHT - sum(1 for t in self._in_flight.values() if t is None)
        out: list[bytes] = []
        if self.dropped and room > 0:
            note = {"event": "events_dropped", "at": utc_now(), "camera": None}
            out.append(encode({**note, "session_id": None, "count": self.dropped}))
            self.dropped = 0
        while self._events and len(out) < room:
            out.append(self._events.popleft())
        return out

    def sent(self, mid: int | None, topic: str | None) -> None:
        if mid is None:  # refused by the client: try a retained topic again on the next pump
            if topic is not None:
                self._dirty[topic] = None
            return
        self._in_flight[mid] = topic
        if topic is not None:
            self._busy.add(topic)

    def acked(self, mid: int) -> None:
        topic = self._in_flight.pop(mid, None)
        if topic is not None:
            self._busy.discard(topic)

    def events_only(self) -> Outbox:
        """A new outbox for a new connection (or topics): the pending events carried over."""
        new = Outbox(self._backlog)
        new._events, new.dropped = self._events, self.dropped
        return new

    @property
    def idle(self) -> bool:
        return not (self._in_flight or self._dirty or self._events)


# ---- the broker connection: paho in its own thread ----------------------------------------------


class Link:
    """One paho client and its network thread. Connection facts reach the observer on the
    event loop; failures are logged once per kind (again after COMPLAIN_EVERY_S)."""

    def __init__(self, config: Config, base: str, loop: asyncio.AbstractEventLoop) -> None:
        cfg = config.mqtt
        self.base = base
        self.host, self.port = cfg.host, cfg.port
        self.broker = f"{cfg.host}:{cfg.port}"
        self.client_id = f"dockd-{config.dock.id}"
        self.connected = False
        self.on_up: Callable[[Link], None] = lambda link: None
        self.on_ack: Callable[[Link, int], None] = lambda link, mid: None
        self._loop = loop
        self._log = get_log(dock_id=config.dock.id, broker=self.broker)
        self._complaint: str | None = None
        self._complained_at = 0.0
        self._failures = 0
        self._down_since: float | None = time.monotonic()
        c = self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
        )
        c.will_set(f"{base}/availability", "offline", qos=QOS, retain=True)
        c.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        c.max_inflight_messages_set(0)  # the Outbox bounds what is in flight
        if cfg.username or cfg.password_file:
            password = None
            if cfg.password_file is not None:
                lines = cfg.password_file.read_text(encoding="utf-8").splitlines()
                password = lines[0] if lines else ""
            c.username_pw_set(cfg.username, password)
        if cfg.tls:
            c.tls_set(
                ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                certfile=str(cfg.cert_file) if cfg.cert_file else None,
                keyfile=str(cfg.key_file) if cfg.key_file else None,
            )
        c.on_connect = self._paho_connect
        c.on_disconnect = self._paho_disconnect
        c.on_connect_fail = self._paho_connect_fail
        c.on_publish = self._paho_publish

    def start(self) -> None:
        """Starts the network thread, which connects, and reconnects with backoff."""
        self.client.connect_async(self.host, self.port, KEEPALIVE_S)
        self.client.loop_start()

    def close(self) -> None:
        """Blocking: a clean DISCONNECT (the broker then drops the Last Will), thread joined."""
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, retain: bool) -> int | None:
        try:
            info = self.client.publish(topic, payload, qos=QOS, retain=retain)
        except ValueError as exc:  # a topic or payload MQTT cannot carry
            self._log.error("mqtt_publish_refused", topic=topic, error=str(exc))
            return None
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._log.warning("mqtt_publish_refused", topic=topic, error=paho.error_string(info.rc))
            return None
        return info.mid  # NO_CONN: paho keeps a QoS 1 message and sends it on reconnect

    # paho's thread: hand the fact to the loop, nothing else

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon has ended
            self._loop.call_soon_threadsafe(fn, *args)

    def _paho_connect(self, c: Any, u: Any, flags: Any, reason: ReasonCode, p: Any) -> None:
        if reason.is_failure:
            self._post(self._refused, str(reason), reason.value)
        else:
            self._post(self._up)

    def _paho_disconnect(self, c: Any, u: Any, flags: Any, reason: ReasonCode, p: Any) -> None:
        self._post(self._down, str(reason))

    def _paho_connect_fail(self, c: Any, u: Any) -> None:
        self._post(self._unreachable)

    def _paho_publish(self, c: Any, u: Any, mid: int, reason: ReasonCode, p: Any) -> None:
        self._post(self.on_ack, self, mid)

    # the event loop

    def _up(self) -> None:
        self.connected = True
        down_s = None if self._down_since is None else time.monotonic() - self._down_since
        self._log.info(
            "mqtt_connected",
            client_id=self.client_id,
            failed_attempts=self._failures,
            after_s=None if down_s is None else round(down_s, 1),
        )
        self._complaint, self._failures, self._down_since = None, 0, None
        self.on_up(self)

    def _down(self, reason: str) -> None:
        if self.connected:
            self._log.warning("mqtt_disconnected", reason=reason, retrying=True)
            self._down_since = time.monotonic()
        self.connected = False

    def _refused(self, reason: str, code: int) -> None:
        self.connected = False
        if code in NOT_AUTHORIZED:
            self._complain(
                "mqtt_not_authorized",
                f"broker {self.broker} refused the connection: not authorized (MQTT reason "
                f"{code}, {reason!r}); check mqtt.username and mqtt.password_file",
            )
        else:
            self._complain("mqtt_refused", f"broker {self.broker} refused the connection: {reason}")

    def _unreachable(self) -> None:
        self._complain("mqtt_unreachable", f"cannot connect to broker {self.broker}", warn=True)

    def _complain(self, event: str, error: str, warn: bool = False) -> None:
        self._failures += 1
        now = time.monotonic()
        if event == self._complaint and now - self._complained_at < COMPLAIN_EVERY_S:
            return
        self._complaint, self._complained_at = event, now
        log = self._log.warning if warn else self._log.error
        log(event, error=error, attempts=self._failures, offloads="unaffected; retrying")


# ---- the observer ------------------------------------------------------------------------------


class MqttObserver:
    name = "mqtt"

    def __init__(self, config: Config, *, backlog: int = EVENTS_BACKLOG) -> None:
        self._config = config
        self._privacy = Privacy.of(config)
        self._backlog = backlog
        self._log = get_log(dock_id=config.dock.id)
        self._views: dict[str, CameraView] = {}
        self._dock: DockStatus | None = None
        self._out = Outbox(backlog)
        self._link: Link | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._shown_at: dict[str, float] = {}
        self._bus_dropped = 0
        self._idle = asyncio.Event()
        self._running = False

    @property
    def base(self) -> str:
        return f"{self._config.mqtt.topic_prefix}/{self._config.dock.id}"

    async def run(self, sub: Subscription) -> None:
        self._render_all()
        self._running = True
        try:
            await self._start_link()
            async for event in sub:
                self._take(event)
                self._out.dropped += sub.dropped - self._bus_dropped
                self._bus_dropped = sub.dropped
                self._pump()
        finally:
            self._running = False
            for event in sub.drain():  # the last states before a stop
                self._take(event)
            await self._stop_link()

    async def reconfigure(self, config: Config) -> None:
        """SIGHUP: take a new configuration. Broker, credentials, TLS or topics changed, or the
        connection is not up (a rotated password, a fixed certificate): say `offline` where
        possible and connect afresh; anything else (progress_interval, publish_officer,
        homeassistant_discovery, officers) applies in place."""
        old, self._config = self._config, config
        self._privacy = Privacy.of(config)
        self._log = get_log(dock_id=config.dock.id)
        if not self._running:
            return  # `run` starts with this configuration
        link = self._link
        if _link_settings(old) != _link_settings(config) or link is None or not link.connected:
            await self._stop_link()
            self._out = self._out.events_only()
            self._render_all()
            if config.mqtt.enabled:
                await self._start_link()
        else:
            if not config.mqtt.homeassistant_discovery:
                for topic in self._out.retained:
                    if topic.startswith(homeassistant.DISCOVERY_PREFIX + "/"):
                        self._out.set_retained(topic, b"")  # an empty retained message deletes
            self._render_all()
        self._pump()

    # events in

    def _take(self, event: Event) -> None:
        try:
            self._on_event(event)
        except Exception:  # boundary: a bad payload must not crash-loop the observer (and with
            # it stop the daemon); the event is logged and the next one goes out
            self._log.exception("mqtt_event_not_published", kind=type(event).__name__)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, DockStatus):
            self._dock = event
            self._show_state()
        elif isinstance(event, CameraStatus):
            changed = self._view(event.camera).apply_status(event)
            if changed is not None:
                self._show_camera(event.camera, at_once=changed)
        elif isinstance(event, Progress):
            if self._view(event.camera).apply_progress(event):
                self._show_camera(event.camera, at_once=False)
        else:
            pub = self._config.mqtt.publish_officer
            officer = self._config.officer(event.camera) if event.camera else None
            self._out.add_event(encode(event_payload(event, officer, pub), self._privacy))

    def _view(self, camera: str) -> CameraView:
        view = self._views.get(camera)
        if view is None:
            view = self._views[camera] = CameraView(camera)
            self._show_discovery(camera)
        return view

    # payloads

    def _render_all(self) -> None:
        self._out.set_retained(f"{self.base}/availability", b"online")
        self._show_discovery(None)
        self._show_state()
        for camera in self._views:
            self._show_discovery(camera)
            self._show_camera(camera, at_once=True)

    def _show_discovery(self, camera: str | None) -> None:
        if not self._config.mqtt.homeassistant_discovery:
            return
        dock = self._config.dock.id
        if camera is None:
            configs = homeassistant.dock_configs(dock, self.base, __version__)
        else:
            configs = homeassistant.camera_configs(dock, self.base, __version__, camera)
        for topic, config in configs:
            self._out.set_retained(topic, encode(config))

    def _show_state(self) -> None:
        if self._dock is not None:
            payload = encode(state_payload(self._dock), self._privacy)
            self._out.set_retained(f"{self.base}/state", payload)

    def _show_camera(self, camera: str, at_once: bool) -> None:
        """State changes at once; progress at most once per `progress_interval` per camera."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        wait = self._shown_at.get(camera, -math.inf) + self._config.mqtt.progress_interval - now
        if not at_once and wait > 0:
            if camera not in self._timers:
                self._timers[camera] = loop.call_later(wait, self._show_later, camera)
            return
        timer = self._timers.pop(camera, None)
        if timer is not None:
            timer.cancel()
        self._shown_at[camera] = now
        pub = self._config.mqtt.publish_officer
        payload = self._views[camera].payload(self._config.officer(camera), pub)
        self._out.set_retained(f"{self.base}/cameras/{camera}", encode(payload, self._privacy))

    def _show_later(self, camera: str) -> None:
        self._timers.pop(camera, None)
        self._show_camera(camera, at_once=True)
        self._pump()

    # the broker

    def _pump(self) -> None:
        link = self._link
        if link is not None and link.connected:
            for topic, payload in self._out.take_retained():
                self._out.sent(link.publish(topic, payload, retain=True), topic)
            for payload in self._out.take_events():
                self._out.sent(link.publish(f"{self.base}/events", payload, retain=False), None)
        if self._out.idle:
            self._idle.set()
        else:
            self._idle.clear()

    def _link_up(self, link: Link) -> None:
        if link is self._link:
            self._out.reconnected()
            self._pump()

    def _acked(self, link: Link, mid: int) -> None:
        if link is self._link:
            self._out.acked(mid)
            self._pump()

    async def _start_link(self) -> None:
        loop = asyncio.get_running_loop()
        mqtt = self._config.mqtt
        try:  # reads password_file and the TLS files: off the loop
            link = await asyncio.to_thread(Link, self._config, self.base, loop)
            link.on_up, link.on_ack = self._link_up, self._acked
            link.start()  # only starts the network thread, which connects
        except (OSError, ValueError) as exc:  # unreadable password_file, bad TLS files, host
            self._log.error(
                "mqtt_not_started",
                broker=f"{mqtt.host}:{mqtt.port}",
                error=str(exc),
                offloads="unaffected; status stays in the logs and `dockd status`",
            )
            return
        self._out.forget_in_flight()
        self._link = link

    async def _stop_link(self) -> None:
        """Say `offline` (retained, acknowledged within STOP_FLUSH_S) and disconnect cleanly."""
        link, timers = self._link, list(self._timers.values())
        for timer in timers:
            timer.cancel()
        self._timers.clear()
        if link is None:
            return
        self._out.set_retained(f"{link.base}/availability", b"offline")
        if link.connected:
            self._pump()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_FLUSH_S):
                    await self._idle.wait()
        self._link = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_FLUSH_S + 5):
                await asyncio.to_thread(link.close)
        self._log.info("mqtt_stopped", broker=link.broker)


def _link_settings(config: Config) -> tuple[Any, ...]:
    m = config.mqtt
    return (
        config.dock.id,
        m.enabled,
        m.host,
        m.port,
        m.tls,
        m.ca_file,
        m.cert_file,
        m.key_file,
        m.username,
        m.password_file,
        m.topic_prefix,
    )
