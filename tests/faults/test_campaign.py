"""The CI-sized fault campaign (issue 9 item 4): fixed seeds, at least 30 kill -9 and at least
one run of every other fault kind, each run a real `dockd run` (or, for the flipped bit, the
Daemon in-process) followed by every invariant of faults_support. The long campaign, with its
report, is `.venv/bin/python tests/faults/campaign.py --runs 200 --report FILE` (docs/faults.md).

Each run is one test. A run fails on any violation of an invariant that is not a daemon bug
already pinned by test_campaign_findings.py (those are reported in the run's report line); a
kind this machine cannot run (no FUSE, no umockdev...) is skipped with the reason. The campaign's
Markdown report for this session is written to `<pytest basetemp>/faults-campaign-report.md`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_campaign import KINDS, Campaign, RunResult, RunSpec, Services, planned_kills, run

CI_PLAN = [
    RunSpec("kill9", 101, kills=4),
    RunSpec("kill9", 102, kills=4, clear=True),
    RunSpec("kill9", 103, kills=4, store="s3"),
    RunSpec("kill9", 104, kills=4),
    RunSpec("kill9", 105, kills=4, mqtt=True),
    RunSpec("kill9", 106, kills=4, clear=True),
    RunSpec("kill9", 107, kills=4, store="s3", clear=True),
    RunSpec("kill9", 108, kills=4),
    RunSpec("undock", 201, kills=1),
    RunSpec("staging_full", 202, kills=1),
    RunSpec("store_readonly", 203, kills=1),
    RunSpec("store_away", 204, kills=1),
    RunSpec("store_full", 205, kills=1),
    RunSpec("broker_restart", 206, kills=1, mqtt=True),
    RunSpec("growing", 207, kills=1),
    RunSpec("growing", 208, kills=1, clear=True, variant="writer"),
    RunSpec("bad_sectors", 209, kills=1),
    RunSpec("bad_sectors", 210, variant="bad_blocks"),
    RunSpec("powercut", 211, kills=3),
    RunSpec("usb", 212, kills=3, clear=True),
    RunSpec("bitflip", 213),
    RunSpec("bitflip", 214),
]

CAMPAIGN = Campaign()


def test_ci_plan_has_30_kills_and_every_fault_kind() -> None:
    assert sum(planned_kills(s) for s in CI_PLAN) >= 30
    assert {s.kind for s in CI_PLAN} == set(KINDS)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    s = Services(tmp_path_factory.mktemp("faults-services"))
    t0 = time.monotonic()
    try:
        yield s
    finally:
        s.close()
        CAMPAIGN.seconds = time.monotonic() - t0
        report = tmp_path_factory.getbasetemp() / "faults-campaign-report.md"
        report.write_text(CAMPAIGN.report("Fault campaign (CI part)", "pytest tests/faults"))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("spec", CI_PLAN, ids=lambda s: s.label)
def test_fault_run_keeps_every_invariant(spec: RunSpec, services: Services, tmp_path: Path) -> None:
    result: RunResult = run(spec, services, tmp_path / "run")
    CAMPAIGN.results.append(result)
    if result.skipped:
        pytest.skip(result.skipped)
    assert result.error is None, result.error
    assert not result.new_violations, "\n".join([result.summary(), *result.new_violations])
    assert sum(result.checks.values()) > 0
    if spec.kind == "bitflip":
        assert result.faults["bitflip"] > 0
        assert result.faults["bitflip_caught"] == result.faults["bitflip"]
    else:
        assert result.faults["kill9"] >= planned_kills(spec), result.summary()
