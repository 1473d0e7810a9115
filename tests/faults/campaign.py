#!/usr/bin/env python3
"""The long fault campaign: `.venv/bin/python tests/faults/campaign.py --runs 200 --report
campaign-report.md` (as root). Plans `--runs` runs from `--seed` (about half kill9 runs, the
rest every other fault kind in turn; more kill9 runs are added until the plan holds
`--min-kills` kill -9), runs them one after the other, and writes the Markdown report: runs,
faults by kind, where the kill -9 landed, invariant checks performed, violations, time taken.
The report is rewritten after every run, so an interrupted campaign still leaves one.

Exit status: 0 when no invariant was violated (daemon bugs already pinned by
tests/faults/test_campaign_findings.py are reported apart), 1 otherwise, 2 on a harness error.
See docs/faults.md.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faults_campaign import KINDS, Campaign, Services, plan, planned_kills, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=20261129)
    ap.add_argument("--min-kills", type=int, default=200, help="kill -9 the plan holds at least")
    ap.add_argument("--kinds", default="", help=f"comma-separated subset of {','.join(KINDS)}")
    ap.add_argument("--report", type=Path, default=Path("campaign-report.md"))
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temp dir")
    ap.add_argument("--keep", action="store_true", help="keep each run's directory")
    args = ap.parse_args(argv)

    specs = plan(args.runs, args.seed, args.min_kills)
    if args.kinds:
        wanted = set(args.kinds.split(","))
        unknown = wanted - set(KINDS)
        if unknown:
            ap.error(f"unknown kinds: {sorted(unknown)}")
        specs = [s for s in specs if s.kind in wanted]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dockd-campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "python tests/faults/campaign.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    print(
        f"campaign: {len(specs)} runs, {sum(planned_kills(s) for s in specs)} kill -9 planned, "
        f"work in {work}",
        flush=True,
    )
    campaign = Campaign()
    services = Services(work / "services")
    # SIGTERM: unwind (each run's mounts and daemons, the S3 server) and keep the report
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    try:
        for i, spec in enumerate(specs, 1):
            base = work / f"run{i:04d}"
            result = run(spec, services, base)
            campaign.results.append(result)
            campaign.seconds = time.monotonic() - t0
            print(f"[{i}/{len(specs)}] {result.summary()}", flush=True)
            for v in result.violations:
                print(f"    VIOLATION {v.splitlines()[0][:300]}", flush=True)
            if result.error:
                print(f"    HARNESS ERROR {result.error}", flush=True)
            if not args.keep and not result.violations and not result.error:
                shutil.rmtree(base, ignore_errors=True)
            args.report.write_text(campaign.report("Fault campaign", command))
    finally:
        services.close()
        campaign.seconds = time.monotonic() - t0
        args.report.write_text(campaign.report("Fault campaign", command))
    faults, checks, _ = campaign.totals()
    print(
        f"campaign: {len(campaign.results)} runs, {faults['kill9']} kill -9, "
        f"{sum(checks.values())} checks, {len(campaign.violations)} violations "
        f"({len(campaign.known)} of known bugs), {campaign.seconds:.0f} s; report {args.report}"
    )
    if any(r.error for r in campaign.results):
        return 2
    return 1 if campaign.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
