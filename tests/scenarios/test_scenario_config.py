"""Whole-daemon scenario of SPEC §3/§4: a bad configuration is refused before anything starts,
exit 78, with a message naming the key (unit tests of every rule live in tests/test_config.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import Site

EX_CONFIG = 78

BAD = {
    # case: (sections merged into a good configuration, what the message must name)
    "size": ({"offload": {"chunk_size": "lots"}}, "offload.chunk_size"),
    "unknown_key": ({"upload": {"concurency": 2}}, "upload.concurency"),
    "dock_id": ({"dock": {"id": "bad id!"}}, "dock.id"),
    "store_is_a_file": ({"store": {"path": "FILE"}}, "store.path"),
}


@pytest.mark.parametrize("command", ["run", "check-config"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_exits_78_naming_the_key(site: Site, case: str, command: str) -> None:
    sections: dict[str, Any] = json.loads(json.dumps(BAD[case][0]))
    key = BAD[case][1]
    if sections.get("store", {}).get("path") == "FILE":
        a_file = site.base / "not-a-directory"
        a_file.write_text("x")
        sections["store"]["path"] = str(a_file)
    site.configure(**sections)
    r = site.cli(command, "-c", str(site.config), timeout=30)
    assert r.returncode == EX_CONFIG, (r.stdout, r.stderr)
    assert key in r.stderr, r.stderr
    assert r.stdout == ""  # nothing started: not one log line
    assert not site.state.exists()  # nothing created either


@pytest.mark.parametrize("command", ["run", "check-config", "status"])
def test_missing_config_file_exits_78(site: Site, command: str) -> None:
    missing = site.base / "nowhere" / "dockd.toml"
    r = site.cli(command, "-c", str(missing), timeout=30)
    assert r.returncode == EX_CONFIG, (r.stdout, r.stderr)
    assert str(missing) in r.stderr


def test_check_config_prints_the_effective_configuration(site: Site) -> None:
    r = site.cli("check-config", "-c", str(site.config), timeout=30)
    assert r.returncode == 0, r.stderr
    eff = json.loads(r.stdout)
    assert eff["dock"]["id"] == "scenario-dock"
    assert Path(eff["dock"]["state_dir"]) == site.state
    assert eff["offload"]["chunk_size"] == 64 * 1024
    assert eff["offload"]["min_free_staging"] == 1024
    assert eff["upload"]["backoff_initial"] == pytest.approx(0.1)
    assert eff["mqtt"]["enabled"] is False
    assert eff["offload"]["include"] == ["**/*"]  # a default filled in
    assert not site.state.exists()
