"""Fixtures for the MQTT tests: real mosquitto brokers (see mqtt_harness), recorders, a site."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mqtt_harness import AUTH_PASSWORD, AUTH_USER, Broker, Recorder, Site


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One anonymous broker for the session; each test uses its own dock id (own topics)."""
    b = Broker(tmp_path_factory.mktemp("mosquitto"), "allow_anonymous true\n")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker this test may stop and start."""
    b = Broker(tmp_path / "mosquitto", "allow_anonymous true\n")
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker that needs a user name and password (made with `mosquitto_passwd -b`)."""
    workdir = tmp_path_factory.mktemp("mosquitto-auth")
    passwd = workdir / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), AUTH_USER, AUTH_PASSWORD],
        check=True,
        capture_output=True,
    )
    b = Broker(workdir, f"allow_anonymous false\npassword_file {passwd}\n", name="auth")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def recorders() -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(port: int, topics: tuple[str, ...] = ("#",), **auth: str) -> Recorder:
        rec = Recorder(port, topics, **auth)
        made.append(rec)
        return rec

    yield make
    for rec in made:
        rec.close()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)
