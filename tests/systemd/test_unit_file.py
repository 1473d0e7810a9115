"""systemd/dockd.service: `systemd-analyze verify` has nothing to say about it (it exits 0 on
warnings, so the test requires empty output), its key settings are the ones the daemon relies
on, and docs/install.md reports the `systemd-analyze security` score it really has."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "systemd" / "dockd.service"
INSTALL_DOC = ROOT / "docs" / "install.md"
EXEC_START = "ExecStart=/opt/dockd/venv/bin/dockd run"
SHUTDOWN_PARK_S = 30  # daemon.py `_shutdown`: sessions get this long to park
MAX_EXPOSURE = 3.0


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze not found: install the `systemd` package (scripts/setup)")
    return tool


def _settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _testable_copy(tmp_path: Path, unit_text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this venv's dockd: verify wants the binary to exist."""
    text = unit_text if unit_text is not None else UNIT.read_text()
    assert EXEC_START in text
    dockd = Path(sys.executable).parent / "dockd"
    assert dockd.exists(), f"{dockd}: dockd is not installed in this venv"
    copy = tmp_path / "dockd.service"
    copy.write_text(text.replace(EXEC_START, f"ExecStart={dockd} run"))
    return copy


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_systemd_analyze(), "verify", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        cwd=unit.parent,
    )


def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    result = _verify(_testable_copy(tmp_path))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The check above is not vacuous: an unknown key makes verify speak (and still exit 0)."""
    typo = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict")
    result = _verify(_testable_copy(tmp_path, typo))
    assert "ProtectSytem" in result.stdout + result.stderr


def test_unit_settings_the_daemon_relies_on() -> None:
    s = _settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == [EXEC_START.removeprefix("ExecStart=")]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["78"]  # EX_CONFIG: a restart cannot fix it
    for d in ("StateDirectory", "RuntimeDirectory", "ConfigurationDirectory"):
        assert s[d] == ["dockd"]
    (watchdog,) = s["WatchdogSec"]
    assert re.fullmatch(r"\d+s", watchdog)
    (stop,) = s["TimeoutStopSec"]
    assert int(stop.removesuffix("s")) > SHUTDOWN_PARK_S
    assert s["KillMode"] == ["mixed"]
    assert s["UMask"] == ["0077"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert s["SystemCallFilter"][0] == "@system-service @mount"
    assert s["DeviceAllow"] == ["block-sd r", "/dev/fuse rw"]
    assert set(s["CapabilityBoundingSet"][0].split()) == {"CAP_SYS_ADMIN", "CAP_DAC_READ_SEARCH"}


def test_security_score_is_the_one_install_md_reports(tmp_path: Path) -> None:
    result = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", str(_testable_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"Overall exposure level for dockd\.service: (\d+\.\d) (\w+)", result.stdout)
    assert m, result.stdout[-2000:] + result.stderr
    score, verdict = m.group(1), m.group(2)
    assert float(score) <= MAX_EXPOSURE, f"hardening regressed: exposure {score} {verdict}"
    assert f"exposure level {score} ({verdict})" in INSTALL_DOC.read_text(), (
        f"docs/install.md must report the score: exposure level {score} ({verdict})"
    )
