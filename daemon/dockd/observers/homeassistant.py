"""Home Assistant MQTT discovery configs for the dock and each camera bay it has seen.

Pure functions from (dock id, base topic, version, camera) to `(topic, config)` pairs; the MQTT
observer publishes them retained. Each config names the dock as its `device`, carries a
`unique_id`, and uses `<base>/availability`, so a stock Home Assistant shows the dock and every
bay with no YAML, and greys them out when the dock goes offline (the Last Will).
"""

from __future__ import annotations

import re
import zlib
from typing import Any

DISCOVERY_PREFIX = "homeassistant"

# Topic levels Home Assistant accepts for node_id / object_id.
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

Config = dict[str, Any]

_NUMBER = {"state_class": "measurement"}
_BYTES = {"device_class": "data_size", "unit_of_measurement": "B", "state_class": "measurement"}


def _on_off(expr: str) -> str:
    """A binary sensor template: "None" (Home Assistant's "unknown") when the value is null."""
    return f"{{{{ 'None' if ({expr}) is none else ('ON' if ({expr}) else 'OFF') }}}}"


def object_id(text: str) -> str:
    """`text` as a discovery topic level; a camera id with other characters (such as `.`) gets
    a checksum suffix so that two cameras never share an entity."""
    safe = _UNSAFE.sub("_", text)
    if safe != text:
        safe = f"{safe}_{zlib.crc32(text.encode()):08x}"
    return safe


def _device(dock_id: str, version: str) -> Config:
    return {
        "identifiers": [dock_id],
        "name": f"Dock {dock_id}",
        "manufacturer": "dockd",
        "model": "Body-worn camera dock",
        "sw_version": version,
    }


def _config(
    component: str,
    dock_id: str,
    base: str,
    version: str,
    oid: str,
    name: str,
    state_topic: str,
    value_template: str,
    **extra: Any,
) -> tuple[str, Config]:
    topic = f"{DISCOVERY_PREFIX}/{component}/{dock_id}/{oid}/config"
    config: Config = {
        "name": name,
        "unique_id": f"dockd_{dock_id}_{oid}",
        "state_topic": state_topic,
        "value_template": value_template,
        "availability_topic": f"{base}/availability",
        "payload_available": "online",
        "payload_not_available": "offline",
        "qos": 1,
        "device": _device(dock_id, version),
        "origin": {"name": "dockd", "sw_version": version},
        **extra,
    }
    return topic, config


def dock_configs(dock_id: str, base: str, version: str) -> list[tuple[str, Config]]:
    """The dock's own entities, fed by `<base>/state`."""
    state = f"{base}/state"

    def sensor(oid: str, name: str, template: str, **extra: Any) -> tuple[str, Config]:
        return _config("sensor", dock_id, base, version, oid, name, state, template, **extra)

    def binary(oid: str, name: str, template: str, **extra: Any) -> tuple[str, Config]:
        return _config("binary_sensor", dock_id, base, version, oid, name, state, template, **extra)

    return [
        sensor(
            "state",
            "State",
            "{{ value_json.state }}",
            json_attributes_topic=state,
            icon="mdi:server",
        ),
        sensor("cameras_docked", "Cameras docked", "{{ value_json.cameras_docked }}", **_NUMBER),
        sensor("queue_sessions", "Queued sessions", "{{ value_json.queue.sessions }}", **_NUMBER),
        sensor("queue_files", "Queued files", "{{ value_json.queue.files }}", **_NUMBER),
        sensor("queue_bytes", "Queued bytes", "{{ value_json.queue.bytes }}", **_BYTES),
        sensor("queue_failed", "Failed sessions", "{{ value_json.queue.failed }}", **_NUMBER),
        sensor("staging_free", "Staging free", "{{ value_json.staging_free_bytes }}", **_BYTES),
        binary(
            "store_reachable",
            "Evidence store",
            _on_off("value_json.store_reachable"),
            device_class="connectivity",
        ),
        binary(
            "problem",
            "Problem",
            "{{ 'ON' if value_json.problems else 'OFF' }}",
            device_class="problem",
        ),
    ]


def camera_configs(dock_id: str, base: str, version: str, camera: str) -> list[tuple[str, Config]]:
    """A bay's entities, fed by `<base>/cameras/<camera>`: its state (every field as an
    attribute), progress of the current phase in %, and whether it is safe to undock."""
    topic = f"{base}/cameras/{camera}"
    cid = object_id(camera)
    progress = (
        "{{ ((100 * value_json.bytes_done / value_json.bytes_total) "
        "if value_json.bytes_total else 0) | round(1) }}"
    )
    return [
        _config(
            "sensor",
            dock_id,
            base,
            version,
            f"camera_{cid}_state",
            f"{camera} state",
            topic,
            "{{ value_json.state }}",
            json_attributes_topic=topic,
            icon="mdi:cctv",
        ),
        _config(
            "sensor",
            dock_id,
            base,
            version,
            f"camera_{cid}_progress",
            f"{camera} progress",
            topic,
            progress,
            unit_of_measurement="%",
            state_class="measurement",
            icon="mdi:progress-upload",
        ),
        _config(
            "binary_sensor",
            dock_id,
            base,
            version,
            f"camera_{cid}_safe_to_undock",
            f"{camera} safe to undock",
            topic,
            "{{ 'ON' if value_json.safe_to_undock else 'OFF' }}",
            icon="mdi:eject",
        ),
    ]
