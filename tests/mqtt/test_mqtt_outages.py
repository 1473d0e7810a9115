"""A broker that comes and goes: offloads are not slowed, memory stays bounded, retained topics
are republished, and the Last Will tells the dashboards when the daemon dies."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from mqtt_harness import (
    Broker,
    Cut,
    Recorder,
    Site,
    dockd_run,
    free_port,
    running,
    snapshot,
    to_toml,
    until,
)

from dockd.config import parse_config
from dockd.events import CameraStatus, DockStatus, EventBus, Notice, Progress, QueueFacts
from dockd.observers.mqtt import MqttObserver

FILES, SIZE = 800, 16 * 1024  # 1-3 s of offload here; a reconnect takes ~1 s


def _offloading(e: object) -> bool:
    return isinstance(e, CameraStatus) and e.state == "offloading"


def _offloaded(e: object) -> bool:
    return isinstance(e, CameraStatus) and e.state == "offloaded"


def _uploaded(e: object) -> bool:
    return isinstance(e, Notice) and e.event == "session_uploaded"


async def _offload_time(site: Site, **mqtt: Any) -> float:
    """Seconds from docking to every file verified in staging, with this [mqtt] section."""
    site.camera("CAMX", FILES, SIZE)
    async with running(site.config(**mqtt)) as (_, sub):
        t0 = time.monotonic()
        site.dock("CAMX")
        await until(sub, _offloaded)
        return time.monotonic() - t0


async def test_broker_restarted_during_an_offload_costs_it_nothing_and_loses_no_retained_topic(
    own_broker: Broker, tmp_path: Path, recorders: Any
) -> None:
    # the same offload three times in one run: MQTT off, the broker away throughout, and the
    # broker stopped when the offload starts and started again while it runs
    off = await _offload_time(Site(tmp_path / "off"), port=own_broker.port, enabled=False)
    away = await _offload_time(Site(tmp_path / "away"), port=free_port())

    site = Site(tmp_path / "bounce")
    base = site.base
    rec: Recorder = recorders(own_broker.port, (f"{base}/#",))
    site.camera("CAMX", FILES, SIZE)
    async with running(site.config(own_broker.port)) as (_, sub):
        await rec.until(lambda m: m.topic == f"{base}/availability" and m.text == "online")
        t0 = time.monotonic()
        site.dock("CAMX")
        await until(sub, _offloading)
        await asyncio.to_thread(own_broker.stop)
        await until(sub, lambda e: isinstance(e, Progress) and e.files_done >= FILES // 10)
        await asyncio.to_thread(own_broker.start)  # persistence false: every retained is lost
        mark = len(rec.messages)
        await until(sub, _offloaded)
        bounce = time.monotonic() - t0
        back = await rec.until(lambda m: m.topic == f"{base}/cameras/CAMX", after=mark)
        await until(sub, _uploaded)
        await rec.until(
            lambda m: m.topic == f"{base}/cameras/CAMX" and m.json["state"] == "uploaded"
        )
        await rec.until(
            lambda m: (
                m.topic == f"{base}/state"
                and m.json["state"] == "idle"
                and m.json["store_reachable"] is True  # not the moment before the session began
            )
        )
        retained = await asyncio.to_thread(snapshot, own_broker.port, (f"{base}/#",))

    print(
        f"\noffload of {FILES} x {SIZE // 1024} KiB: mqtt off {off:.2f} s, broker away "
        f"{away:.2f} s ({away / off:.2f}x), broker restarted mid-offload {bounce:.2f} s "
        f"({bounce / off:.2f}x); first camera state after the restart: {back.json['state']}"
    )
    assert bounce / off < 3
    assert away / off < 3
    # the restarted broker knew nothing; the daemon told it everything again
    assert retained[f"{base}/availability"].text == "online"
    cam = retained[f"{base}/cameras/CAMX"].json
    assert cam["state"] == "uploaded"
    assert cam["files_done"] == cam["files_total"] == FILES
    assert cam["bytes_done"] == cam["bytes_total"] == FILES * SIZE
    assert cam["safe_to_undock"] is True
    state = retained[f"{base}/state"].json
    assert state["state"] == "idle" and state["queue"]["sessions"] == 0
    assert state["cameras"] == ["CAMX"]


async def test_a_network_outage_keeps_the_latest_states_and_a_bounded_event_backlog(
    broker: Broker, site: Site, recorders: Any
) -> None:
    cut = Cut(broker.port)
    await cut.start()
    base = site.base
    rec: Recorder = recorders(broker.port, (f"{base}/#",))
    bus = EventBus()
    observer = MqttObserver(site.config(cut.port), backlog=5)
    task = asyncio.create_task(observer.run(bus.subscribe("mqtt")))
    try:
        await rec.until(lambda m: m.topic == f"{base}/availability" and m.text == "online")
        bus.publish(_dock("busy"))
        bus.publish(CameraStatus("CAMZ", "offloading", "s1", 100, 0, 10_000, 0))
        await rec.until(lambda m: m.topic == f"{base}/cameras/CAMZ")

        cut.cut()
        # the broker saw the dock's connection drop: the Last Will
        await rec.until(lambda m: m.topic == f"{base}/availability" and m.text == "offline")
        await cut.refused.wait()  # the daemon tried again and was refused: it knows it is away
        for n in range(30):
            bus.publish(Notice("file_verified", "CAMZ", "s1", {"path": f"f{n}", "size": 1}))
        for n in range(1, 101):
            bus.publish(Progress("CAMZ", "s1", "offload", 100, n, 10_000, n * 100))
        bus.publish(CameraStatus("CAMZ", "offloaded", "s1", 100, 100, 10_000, 10_000, True))
        bus.publish(_dock("idle"))
        mark = len(rec.messages)
        cut.restore()

        dropped = await rec.until(lambda m: m.topic.endswith("/events") and "dropped" in m.text)
        assert dropped.json["count"] == 25
        await rec.until(lambda m: m.topic.endswith("/events") and '"f29"' in m.text)
        await rec.until(lambda m: m.topic == f"{base}/state" and m.json["state"] == "idle")
        # a message in flight when the network went is resent first, then the latest state
        await rec.until(
            lambda m: m.topic == f"{base}/cameras/CAMZ" and m.json["state"] == "offloaded",
            after=mark,
        )
        after = rec.messages[mark:]
        events = [m.json for m in after if m.topic.endswith("/events")]
        assert [e.get("path") for e in events] == [None, "f25", "f26", "f27", "f28", "f29"]
        cams = [m.json for m in after if m.topic.endswith("/cameras/CAMZ")]
        assert cams[-1]["files_done"] == 100 and cams[-1]["safe_to_undock"] is True
        assert any(m.text == "online" for m in after if m.topic.endswith("/availability"))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await cut.close()
    retained = await asyncio.to_thread(snapshot, broker.port, (f"{base}/#",))
    assert retained[f"{base}/availability"].text == "offline"
    assert retained[f"{base}/cameras/CAMZ"].json["state"] == "offloaded"
    assert retained[f"{base}/state"].json["state"] == "idle"


def _dock(state: str) -> DockStatus:
    return DockStatus(state, ("CAMZ",), QueueFacts(), 10**9, True, (), "test")


async def test_the_last_will_says_offline_when_the_daemon_is_killed(
    broker: Broker, site: Site, recorders: Any, tmp_path: Path
) -> None:
    base = site.base
    data = site.data(broker.port)
    parse_config(data)  # what is written is valid
    config_file = tmp_path / "dockd.toml"
    config_file.write_text(to_toml(data))
    rec: Recorder = recorders(broker.port, (f"{base}/#",))
    log = tmp_path / "dockd.log"
    proc = dockd_run(config_file, log)
    try:
        await rec.until(lambda m: m.topic == f"{base}/availability" and m.text == "online")
        await rec.until(lambda m: m.topic == f"{base}/state")
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        await rec.until(lambda m: m.topic == f"{base}/availability" and m.text == "offline")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    retained = await asyncio.to_thread(snapshot, broker.port, (f"{base}/#",))
    assert retained[f"{base}/availability"].text == "offline"
    assert retained[f"{base}/availability"].qos == 1
    assert "mqtt_not_built" not in log.read_text()
