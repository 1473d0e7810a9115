"""Authentication and TLS against real brokers: a user name with `password_file`'s first line;
a wrong password refused with a clear error while offloads go on; client certificates."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import structlog
from mqtt_harness import (
    AUTH_PASSWORD,
    AUTH_USER,
    Broker,
    Recorder,
    Site,
    free_port,
    running,
    snapshot,
    until,
)

from dockd.events import CameraStatus, DockStatus, EventBus, Notice, QueueFacts
from dockd.observers.mqtt import MqttObserver


def _uploaded(e: object) -> bool:
    return isinstance(e, Notice) and e.event == "session_uploaded"


async def test_a_wrong_password_is_refused_with_a_clear_error_and_the_offload_goes_on(
    auth_broker: Broker, site: Site, tmp_path: Path
) -> None:
    secret = tmp_path / "mqtt.password"
    secret.write_text("not-the-password\n")
    config = site.config(auth_broker.port, username=AUTH_USER, password_file=str(secret))
    site.camera("CAMA", files=5, size=4096)
    mark = len(auth_broker.lines)
    with structlog.testing.capture_logs() as logs:
        async with running(config) as (_, sub):
            site.dock("CAMA")
            offloaded = await until(
                sub, lambda e: isinstance(e, CameraStatus) and e.state == "offloaded"
            )
            await until(sub, _uploaded)
            await asyncio.to_thread(auth_broker.wait_log, "not authorised", mark)
    assert isinstance(offloaded, CameraStatus) and offloaded.safe_to_undock
    assert offloaded.files_done == 5
    refused = [e for e in logs if e["event"] == "mqtt_not_authorized"]
    assert len(refused) == 1, refused  # said once, not once per retry
    line = refused[0]
    assert line["log_level"] == "error"
    broker = f"127.0.0.1:{auth_broker.port}"
    assert line["broker"] == broker
    assert f"broker {broker}" in line["error"] and "not authorized" in line["error"]
    print(f"\nlogged: {line}")
    assert not any("not-the-password" in repr(e) for e in logs)
    assert not any(e["event"] == "mqtt_connected" for e in logs)
    # and nothing reached the broker
    retained = await asyncio.to_thread(
        snapshot,
        auth_broker.port,
        (f"{site.base}/#",),
        username=AUTH_USER,
        password=AUTH_PASSWORD,
    )
    assert retained == {}


async def test_the_first_line_of_password_file_authenticates(
    auth_broker: Broker, site: Site, tmp_path: Path, recorders: Any
) -> None:
    secret = tmp_path / "mqtt.password"
    secret.write_text(f"{AUTH_PASSWORD}\nthe second line is not the password\n")
    config = site.config(auth_broker.port, username=AUTH_USER, password_file=str(secret))
    rec: Recorder = recorders(
        auth_broker.port, (f"{site.base}/#",), username=AUTH_USER, password=AUTH_PASSWORD
    )
    async with running(config):
        await rec.until(lambda m: m.topic == f"{site.base}/availability" and m.text == "online")
        await rec.until(lambda m: m.topic == f"{site.base}/state")
    await rec.until(lambda m: m.topic == f"{site.base}/availability" and m.text == "offline")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _certificates(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all from it."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.crt",
             "-days", "2", "-subj", "/CN=dockd test CA")  # fmt: skip
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("client", "DNS:dock")):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("req", *ec, "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr",
                 "-subj", f"/CN={name}")  # fmt: skip
        _openssl("x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/ca.crt",
                 "-CAkey", f"{d}/ca.key", "-CAcreateserial", "-out", f"{d}/{name}.crt",
                 "-days", "2", "-extfile", f"{d}/{name}.ext")  # fmt: skip


async def test_tls_with_a_client_certificate(tmp_path: Path, recorders: Any) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = tmp_path / "certs"
    certs.mkdir()
    await asyncio.to_thread(_certificates, certs)
    tls_port = free_port()
    broker = Broker(
        tmp_path / "mosquitto",
        "allow_anonymous true\n"
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {certs}/ca.crt\ncertfile {certs}/server.crt\nkeyfile {certs}/server.key\n"
        "require_certificate true\n",
        name="tls",
    )
    broker.start()
    try:
        site = Site(tmp_path / "site")
        config = site.config(
            tls_port,
            tls=True,
            ca_file=str(certs / "ca.crt"),
            cert_file=str(certs / "client.crt"),
            key_file=str(certs / "client.key"),
        )
        rec: Recorder = recorders(broker.port, (f"{site.base}/#",))  # the plain listener
        bus = EventBus()
        task = asyncio.create_task(MqttObserver(config).run(bus.subscribe("mqtt")))
        try:
            await rec.until(lambda m: m.topic == f"{site.base}/availability" and m.text == "online")
            bus.publish(DockStatus("idle", (), QueueFacts(), 1, True, (), "test"))
            state = await rec.until(lambda m: m.topic == f"{site.base}/state")
            assert state.json["state"] == "idle"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await rec.until(lambda m: m.topic == f"{site.base}/availability" and m.text == "offline")
    finally:
        broker.stop()


async def test_a_corrected_password_file_is_taken_up_by_reconfigure(
    auth_broker: Broker, site: Site, tmp_path: Path, recorders: Any
) -> None:
    secret = tmp_path / "mqtt.password"
    secret.write_text("wrong\n")
    config = site.config(auth_broker.port, username=AUTH_USER, password_file=str(secret))
    rec: Recorder = recorders(
        auth_broker.port, (f"{site.base}/#",), username=AUTH_USER, password=AUTH_PASSWORD
    )
    observer = MqttObserver(config)
    mark = len(auth_broker.lines)
    task = asyncio.create_task(observer.run(EventBus().subscribe("mqtt")))
    try:
        await asyncio.to_thread(auth_broker.wait_log, "not authorised", mark)
        secret.write_text(f"{AUTH_PASSWORD}\n")  # the admin fixes the file and sends SIGHUP
        await observer.reconfigure(config)
        await rec.until(lambda m: m.topic == f"{site.base}/availability" and m.text == "online")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
