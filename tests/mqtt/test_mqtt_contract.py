"""SPEC §7 as a separate subscriber sees it, from one real daemon run against a real broker.

The run (once for this module): a camera docked, offloaded, uploaded; undocked; new footage put
on it and docked again (a second session); then a clean stop. A recorder subscribed before the
daemon started keeps every message; snapshots (new subscribers) show what is retained, while
running and after the stop.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from mqtt_harness import Broker, Msg, Recorder, Site, running, snapshot, until

from dockd.events import CameraStatus, Notice

INTERVAL = 0.3  # mqtt.progress_interval for this run
STATE_KEYS = {
    "state",
    "cameras_docked",
    "cameras",
    "queue",
    "staging_free_bytes",
    "store_reachable",
    "problems",
    "version",
    "updated_at",
}
QUEUE_KEYS = {"sessions", "files", "bytes", "failed", "prioritized"}
CAMERA_KEYS = {
    "state",
    "session_id",
    "files_total",
    "files_done",
    "bytes_total",
    "bytes_done",
    "rate_bps",
    "eta_s",
    "safe_to_undock",
    "error",
    "updated_at",
}
CAMERA_STATES = {
    "docked",
    "offloading",
    "offloaded",
    "uploading",
    "uploaded",
    "clearing",
    "cleared",
    "undocked",
    "refused",
    "error",
}
PHASE = {"docked": "offload", "offloading": "offload", "offloaded": "offload"}
PHASE |= {"uploading": "upload", "uploaded": "upload"}


@dataclass
class Run:
    site: Site
    live: list[Msg]
    running: dict[str, Msg]  # retained, after both sessions were uploaded
    stopped: dict[str, Msg]  # retained, after a clean stop
    sessions: list[str]

    @property
    def base(self) -> str:
        return self.site.base

    def camera_msgs(self, camera: str = "CAMA") -> list[Msg]:
        return [m for m in self.live if m.topic == f"{self.base}/cameras/{camera}"]


async def _scenario(broker: Broker, site: Site) -> Run:
    topics = (f"{site.base}/#", f"homeassistant/+/{site.dock_id}/#")
    rec = Recorder(broker.port, topics)
    config = site.config(
        broker.port, progress_interval=f"{int(INTERVAL * 1000)}ms", homeassistant_discovery=True
    )
    site.camera("CAMA", files=300, size=48 * 1024)
    sessions: list[str] = []
    try:
        async with running(config) as (_, sub):
            await rec.until(lambda m: m.topic == f"{site.base}/availability" and m.text == "online")
            for seed in (0, 1):
                if seed:
                    site.camera("CAMA", files=80, size=48 * 1024, seed=seed)
                site.dock("CAMA")
                opened = await until(
                    sub, lambda e: isinstance(e, CameraStatus) and e.session_id not in sessions
                )
                assert isinstance(opened, CameraStatus) and opened.session_id
                sessions.append(opened.session_id)
                await until(
                    sub,
                    lambda e: (
                        isinstance(e, Notice)
                        and e.event == "session_uploaded"
                        and e.session_id == sessions[-1]
                    ),
                )
                await rec.until(
                    lambda m: (
                        m.topic.endswith("/cameras/CAMA")
                        and m.json["session_id"] == sessions[-1]
                        and m.json["state"] == "uploaded"
                    )
                )
                site.undock("CAMA")
                await until(sub, lambda e: isinstance(e, CameraStatus) and e.state == "undocked")
            await rec.until(
                lambda m: m.topic.endswith("/cameras/CAMA") and m.json["state"] == "undocked"
            )
            await rec.until(
                lambda m: (
                    m.topic == f"{site.base}/state"
                    and m.json["state"] == "idle"
                    and m.json["cameras_docked"] == 0
                )
            )
            held = await asyncio.to_thread(snapshot, broker.port, topics)
        await rec.until(lambda m: m.topic == f"{site.base}/availability" and m.text == "offline")
        after = await asyncio.to_thread(snapshot, broker.port, topics)
        await asyncio.to_thread(rec.barrier)
        live = [m for m in rec.messages if not m.topic.startswith("test/")]
    finally:
        rec.close()
    return Run(site, live, held, after, sessions)


@pytest.fixture(scope="module")
def run(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Run:
    site = Site(tmp_path_factory.mktemp("contract"))
    return asyncio.run(_scenario(broker, site))


def _rfc3339_utc(text: str) -> bool:
    return text.endswith("Z") and datetime.fromisoformat(text).utcoffset() is not None


def test_retained_topics_are_availability_state_cameras_and_discovery_with_qos1(run: Run) -> None:
    base = run.base
    dock_topics = {t for t in run.running if t.startswith(base)}
    assert dock_topics == {f"{base}/availability", f"{base}/state", f"{base}/cameras/CAMA"}
    for topic, msg in run.running.items():
        assert msg.retain, topic
        assert msg.qos == 1, topic
    assert run.running[f"{base}/availability"].text == "online"
    # events are not retained: a new subscriber gets none
    assert f"{base}/events" not in run.running


def test_every_live_message_is_qos1_and_json_with_the_contract_keys(run: Run) -> None:
    base = run.base
    assert all(m.qos == 1 for m in run.live)
    states = [m.json for m in run.live if m.topic == f"{base}/state"]
    assert states
    for s in states:
        assert set(s) == STATE_KEYS
        assert set(s["queue"]) == QUEUE_KEYS
        assert s["state"] in {"idle", "busy", "degraded"}
        assert s["cameras_docked"] == len(s["cameras"])
        assert isinstance(s["problems"], list)
        assert _rfc3339_utc(s["updated_at"])
    assert any(s["cameras"] == ["CAMA"] and s["state"] == "busy" for s in states)
    cams = [m.json for m in run.camera_msgs()]
    for c in cams:
        assert set(c) == CAMERA_KEYS
        assert c["state"] in CAMERA_STATES
        assert _rfc3339_utc(c["updated_at"])
        assert 0 <= c["files_done"] <= c["files_total"]
        assert 0 <= c["bytes_done"] <= c["bytes_total"]
    final = run.running[f"{base}/cameras/CAMA"].json
    assert final["state"] == "undocked"
    assert final["session_id"] == run.sessions[1]
    assert final["files_done"] == final["files_total"] == 80
    events = [m for m in run.live if m.topic == f"{base}/events"]
    names = {m.json["event"] for m in events}
    assert {"daemon_ready", "file_verified", "safe_to_undock", "session_uploaded"} <= names
    for m in events:
        assert not m.retain
        e = m.json
        assert {"event", "at", "camera", "session_id"} <= set(e)
        assert _rfc3339_utc(e["at"])
    verified = [m.json for m in events if m.json["event"] == "file_verified"]
    assert len(verified) == 300 + 80
    assert all(v["camera"] == "CAMA" and v["session_id"] in run.sessions for v in verified)
    assert {"path", "size"} <= set(verified[0])


def test_safe_to_undock_is_false_while_offloading_true_once_verified_false_for_a_new_session(
    run: Run,
) -> None:
    seen: list[tuple[str, str, bool]] = []
    for m in run.camera_msgs():
        c = m.json
        seen.append((c["session_id"], c["state"], c["safe_to_undock"]))
        if c["state"] in ("docked", "offloading"):
            assert c["safe_to_undock"] is False, c
        if c["state"] in ("offloaded", "uploading", "uploaded"):
            assert c["safe_to_undock"] is True, c
    first, second = run.sessions
    assert (first, "offloading", False) in seen
    assert (first, "offloaded", True) in seen or (first, "uploading", True) in seen
    # the new session starts unsafe again, after the first was safe
    i_safe = next(i for i, s in enumerate(seen) if s[0] == first and s[2])
    i_new = next(i for i, s in enumerate(seen) if s[0] == second)
    assert i_safe < i_new
    assert seen[i_new][2] is False
    assert any(s[0] == second and s[2] for s in seen[i_new:])


def test_progress_is_throttled_per_camera_and_counts_never_go_down_within_a_phase(
    run: Run,
) -> None:
    msgs = run.camera_msgs()
    last: dict[tuple[str, str], tuple[int, int]] = {}
    for m in msgs:
        c = m.json
        phase = PHASE.get(c["state"])
        if phase is None:
            continue
        key = (c["session_id"], phase)
        files, size = last.get(key, (0, 0))
        assert c["files_done"] >= files and c["bytes_done"] >= size, (key, c)
        last[key] = (c["files_done"], c["bytes_done"])
    # a message with the state of the one before it is a progress update: those are spaced by
    # the interval (half of it allowed for delivery jitter); state changes go out at once
    gaps = [
        b.at - a.at
        for a, b in itertools.pairwise(msgs)
        if (a.json["state"], a.json["session_id"]) == (b.json["state"], b.json["session_id"])
        and b.json["state"] in ("offloading", "uploading")
    ]
    print(f"progress gaps (s): {[round(g, 2) for g in gaps]}")
    assert len(gaps) >= 2
    assert min(gaps) >= INTERVAL / 2
    moving = [m.json for m in msgs if m.json["state"] in ("offloading", "uploading")]
    assert any(c["rate_bps"] and c["rate_bps"] > 0 and c["eta_s"] is not None for c in moving)
    done = [m.json for m in msgs if m.json["state"] in ("offloaded", "uploaded")]
    assert all(c["eta_s"] == 0 for c in done)


HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def test_nothing_private_goes_out_by_default(run: Run) -> None:
    hashes = {hashlib.sha256(data).hexdigest() for data in run.site.files.values()}
    for m in [*run.live, *run.running.values()]:
        text = m.text
        assert not HEX64.search(text), (m.topic, text)
        assert not any(h in text.lower() for h in hashes)
        assert "badge-0042" not in text  # CAMA's officer
        assert "officer" not in text
        assert "sha256" not in text.lower() and "hash" not in text.lower()
    # and no footage: no payload carries the bytes of a file
    biggest = max(len(m.payload) for m in run.live)
    assert biggest < 8 * 1024


def test_home_assistant_discovery_describes_the_dock_and_each_bay(run: Run) -> None:
    base, dock = run.base, run.site.dock_id
    configs = {t: m for t, m in run.running.items() if t.startswith("homeassistant/")}
    ids = set()
    published = {m.topic for m in run.live}
    for topic, msg in configs.items():
        assert msg.retain and msg.qos == 1
        component, node, object_id, leaf = topic.split("/")[1:]
        assert component in ("sensor", "binary_sensor")
        assert node == dock and leaf == "config"
        assert re.fullmatch(r"[A-Za-z0-9_-]+", object_id)
        c = msg.json
        assert c["unique_id"] not in ids
        ids.add(c["unique_id"])
        assert c["availability_topic"] == f"{base}/availability"
        assert c["device"]["identifiers"] == [dock]
        assert c["device"]["name"] and c["device"]["sw_version"]
        assert c["state_topic"] in published
        assert c["value_template"].startswith(("{{", "{%"))
    objects = {t.split("/")[3] for t in configs}
    assert {
        "state",
        "queue_sessions",
        "queue_files",
        "queue_bytes",
        "staging_free",
        "store_reachable",
        "camera_CAMA_state",
        "camera_CAMA_progress",
        "camera_CAMA_safe_to_undock",
    } <= objects
    assert f"homeassistant/binary_sensor/{dock}/store_reachable/config" in configs
    assert f"homeassistant/binary_sensor/{dock}/camera_CAMA_safe_to_undock/config" in configs


def test_a_clean_stop_leaves_offline_retained_and_the_last_states(run: Run) -> None:
    base = run.base
    assert run.stopped[f"{base}/availability"].text == "offline"
    assert run.stopped[f"{base}/availability"].retain
    assert run.stopped[f"{base}/cameras/CAMA"].json == run.running[f"{base}/cameras/CAMA"].json


async def test_officer_goes_out_only_with_publish_officer(
    broker: Broker, site: Site, recorders: Any
) -> None:
    rec: Recorder = recorders(broker.port, (f"{site.base}/#",))
    site.camera("CAMB", files=3, size=4096)
    async with running(site.config(broker.port, publish_officer=True)) as (_, sub):
        site.dock("CAMB")
        await until(sub, lambda e: isinstance(e, Notice) and e.event == "session_uploaded")
        await rec.until(
            lambda m: m.topic.endswith("/cameras/CAMB") and m.json["state"] == "uploaded"
        )
        await rec.until(
            lambda m: m.topic.endswith("/events") and m.json["event"] == "session_uploaded"
        )
    cams = [m.json for m in rec.on(f"{site.base}/cameras/CAMB")]
    assert cams and all(c["officer"] == "badge-0077" for c in cams)
    events = [m.json for m in rec.on(f"{site.base}/events")]
    assert all(e["officer"] == "badge-0077" for e in events if e["camera"] == "CAMB")
    assert all("officer" not in e for e in events if e["camera"] is None)
    for m in rec.messages:
        assert not HEX64.search(m.text)
