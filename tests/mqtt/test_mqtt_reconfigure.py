"""`MqttObserver.reconfigure` (for SIGHUP): what can change in place does; a new broker or
topic prefix is a clean goodbye on the old one and a full republish on the new."""

from __future__ import annotations

import asyncio
from typing import Any

from mqtt_harness import Broker, Recorder, Site, snapshot

from dockd.events import CameraStatus, EventBus
from dockd.observers.mqtt import MqttObserver


async def test_reconfigure_applies_in_place_or_moves_to_the_new_topics(
    broker: Broker, site: Site, recorders: Any
) -> None:
    old, new = site.base, f"moved/{site.dock_id}"
    discovery = f"homeassistant/+/{site.dock_id}/#"
    rec: Recorder = recorders(broker.port, (f"{old}/#", f"{new}/#", discovery))
    bus = EventBus()
    observer = MqttObserver(site.config(broker.port))
    task = asyncio.create_task(observer.run(bus.subscribe("mqtt")))
    try:
        await rec.until(lambda m: m.topic == f"{old}/availability" and m.text == "online")
        bus.publish(CameraStatus("CAMA", "offloading", "s1", 10, 0, 1000, 0))
        first = await rec.until(lambda m: m.topic == f"{old}/cameras/CAMA")
        assert "officer" not in first.json

        await observer.reconfigure(site.config(broker.port, publish_officer=True))
        again = await rec.until(lambda m: m.topic == f"{old}/cameras/CAMA" and m.n > first.n)
        assert again.json["officer"] == "badge-0042"

        moved = site.config(
            broker.port, publish_officer=True, topic_prefix="moved", homeassistant_discovery=True
        )
        await observer.reconfigure(moved)
        await rec.until(lambda m: m.topic == f"{old}/availability" and m.text == "offline")
        await rec.until(lambda m: m.topic == f"{new}/availability" and m.text == "online")
        cam = await rec.until(lambda m: m.topic == f"{new}/cameras/CAMA")
        assert cam.json["state"] == "offloading" and cam.json["officer"] == "badge-0042"
        await rec.until(lambda m: m.topic.endswith("/camera_CAMA_safe_to_undock/config"))

        await observer.reconfigure(moved.model_copy(update={"mqtt": moved.mqtt.model_copy(
            update={"homeassistant_discovery": False})}))  # fmt: skip
        await rec.until(lambda m: m.topic.startswith("homeassistant/") and m.payload == b"")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    retained = await asyncio.to_thread(snapshot, broker.port, (f"{new}/#", discovery))
    assert retained[f"{new}/availability"].text == "offline"
    assert not [t for t in retained if t.startswith("homeassistant/")]
