"""Run every benchmark and write one short report: bench/report.md and bench/report.json.

    sudo .venv/bin/python bench/run_all.py              # ~10 min on the 2-core dev VM
    sudo .venv/bin/python bench/run_all.py --quick      # ~3 min smoke run, small sizes
    sudo .venv/bin/python bench/run_all.py --only files,bays --small-files 100000

The benchmarks run one after the other, each in its own process, on one machine that may be
shared: every ratio compares dockd with a baseline measured in the same benchmark run, on the
same data, never with a figure from another run. Each benchmark's full output goes to the
console and to bench/report.log; the report keeps the ratios, the machine's figures beside
them, and the profile. See bench/README.md, "Reading the report".

  machine  a few seconds of probes: SHA-256 and xxh128 on one core, sequential write + fsync,
           O_DIRECT read, a small file's fsync on 1 and 4 threads
  files    (1) single large files and (2) many small files: dockd vs cp+sync+sha256sum, vs
           rclone copy --checksum + check --download, vs the I/O bound (files.py); py-spy of
           dockd's runs
  bays     (3) 1, 2, 4, 8 cameras at 35 and 300 MB/s each (bays.py)
  memory   (4) peak RSS at 8 cameras x N and 2N files (memory.py)
  upload   (5) filesystem store vs cp, S3 (SeaweedFS) vs boto3 (upload.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "daemon"))

from _common import host_facts, is_root, machine_figures, verdict, write_json  # noqa: E402

BENCHES = ("files", "bays", "memory", "upload")


def bench_args(name: str, args: argparse.Namespace, prof: Path) -> list[str]:
    if name == "files":
        a = ["--small-files", str(args.small_files), "--size-mib", str(args.big_mib)]
        a += ["--files", str(args.big_files)]
        return a + ([] if args.no_profile else ["--profile", str(prof)])
    if name == "bays":
        return ["--files", str(args.bay_files), "--file-mib", str(args.bay_file_mib)]
    if name == "memory":
        return ["--files", str(args.memory_files)]
    if name == "upload":
        return [
            "--big-files",
            str(args.upload_big_files),
            "--big-mib",
            str(args.upload_big_mib),
            "--small-files",
            str(args.upload_small_files),
        ]
    raise ValueError(name)


def run_bench(name: str, extra: list[str], out: Path, log: Any) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), *extra, "--json-out", str(out)]
    line = f"\n===== {' '.join(cmd)}\n"
    print(line, end="", flush=True)
    log.write(line)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for text in proc.stdout:
        sys.stdout.write(text)
        sys.stdout.flush()
        log.write(text)
    rc = proc.wait()
    wall = time.perf_counter() - t
    if rc != 0 or not out.exists():
        return {"bench": name, "error": f"exit {rc}", "seconds": wall, "ratios": []}
    data: dict[str, Any] = json.loads(out.read_text())
    data["wall_s"] = wall
    data["command"] = " ".join(["bench/" + name + ".py", *extra])
    return data


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    h = report["host"]
    m = report.get("machine", {})
    out = ["# dockd benchmark report", ""]
    out.append(
        f"`{report['command']}` — {report['when']}, {report['minutes']:.1f} min. Host "
        f"`{h['node']}`: {h['cpus']} x {h['cpu_model']}, {h['mem_gib']} GiB, kernel "
        f"{h['kernel']}, Python {h['python']}; load average at start "
        f"{' '.join(f'{x:.2f}' for x in h['load'])} (shared machine: the ratios compare runs "
        "made minutes apart on the same data; absolute figures drift)."
    )
    out += ["", "## Targets", ""]
    out.append("| | what | value | target | verdict | dockd | baseline / bound | note |")
    out.append("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(report["ratios"], 1):
        out.append(
            f"| {i} | {r['what']} | **{r['value']:.2f}** | {r['target']} | "
            f"{verdict(r['met'])} | {r['dockd']} | {r['baseline']} | {r.get('note', '')} |"
        )
    met = sum(1 for r in report["ratios"] if r["met"])
    out.append("")
    out.append(f"{met} of {len(report['ratios'])} targets met.")
    if m:
        out += ["", "## The machine's own figures", ""]
        out.append("| probe | value |")
        out.append("|---|---|")
        labels = {
            "sha256_mb_s_one_core": ("SHA-256, one core", "MB/s"),
            "xxh128_mb_s_one_core": ("xxh128, one core", "MB/s"),
            "seq_write_fsync_mb_s": ("sequential write 512 MiB + fsync", "MB/s"),
            "direct_read_mb_s": ("O_DIRECT read of it", "MB/s"),
            "fsync_16k_file_ms": ("create + write 16 KiB + fsync, one file", "ms"),
            "fsync_16k_files_s_1_thread": ("the same in a loop, 1 thread", "files/s"),
            "fsync_16k_files_s_4_threads": ("the same, 4 threads at once", "files/s"),
        }
        for k, v in m.items():
            label, unit = labels.get(k, (k, ""))
            out.append(
                f"| {label} | {v:.1f} {unit} |" if isinstance(v, float) else f"| {k} | {v} |"
            )
    b = report["benches"]
    if "files" in b and "figures" in b["files"]:
        f = b["files"]
        out += ["", "## 1-2. Large and small files (`files.py`)", ""]
        out.append(f"`{f.get('command', '')}`; camera: {f.get('camera', '')}; {f.get('rclone')}")
        out.append("")
        out.append("| case | method | seconds | MB/s | files/s | CPU % (200 = both cores) |")
        out.append("|---|---|---|---|---|---|")
        for r in f["results"]:
            out.append(
                f"| {r['case']} | {r['method']} | {r['seconds']:.2f} | {r['mb_s']:.1f} | "
                f"{r['files_s']:.0f} | {100 * r['cpu_s'] / r['seconds']:.0f} |"
            )
        for case in ("big", "small"):
            d = f["figures"].get(f"dockd_{case}")
            if not d:
                continue
            out.append("")
            out.append(
                f"dockd [{case}]: {d['files']} files, {d['files_s']:.0f} files/s, "
                f"{d['mb_s']:.0f} MB/s; journal {d['journal_commits']} write transactions "
                f"= **{d['journal_commits_per_s']:.1f}/s** "
                f"({d['files_per_commit']:.1f} files each), "
                f"**{d['journal_bytes_per_file']:.0f} bytes per file** on disk, "
                f"{d['journal_written_per_file']:.0f} bytes written per file (WAL + "
                f"checkpoints); CPU "
                f"{d['cpu_s_per_gb']:.1f} s/GB; copy_file in flight {d['copy_wall_s']:.1f} s of "
                f"{d['seconds']:.1f} s ({d['copy_thread_s']:.1f} thread-s); journal thread busy "
                f"{d['journal_busy_s']:.1f} s; loop lag max {d['lag_max_ms']:.0f} ms "
                f"(p99 {d['lag_p99_ms']:.0f}; control process {d['control_lag_max_ms']:.0f}/"
                f"{d['control_lag_p99_ms']:.0f}); peak RSS {d['peak_rss_mib']:.0f} MiB."
            )
    if "bays" in b and "runs" in b["bays"]:
        x = b["bays"]
        out += ["", "## 3. Several bays (`bays.py`)", ""]
        out.append(
            f"Throttle: {x['throttle']}. Per camera {x['camera']['files']} x "
            f"{x['camera']['file_mib']} MiB. Disk bound (bare I/O of the offload, 4 cameras on 4 "
            f"threads, unthrottled): {x['disk_bound']['mb_s']:.0f} MB/s."
        )
        out.append("")
        out.append(
            "| MB/s per camera | cameras | parallel_cameras | aggregate MB/s | expected | "
            "ratio | lag max / p99 ms | control lag max / p99 ms | CPU-s/GB | CPU % | "
            "peak RSS MiB |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in x["runs"]:
            out.append(
                f"| {r['rate_mb_s']} | {r['cameras']} | {r['parallel_cameras']} | "
                f"{r['aggregate_mb_s']:.1f} | {r['expected_mb_s']:.0f} | {r['ratio']:.2f} | "
                f"{r['lag_max_ms']:.0f} / {r['lag_p99_ms']:.0f} | "
                f"{r['control_lag_max_ms']:.0f} / {r['control_lag_p99_ms']:.0f} | "
                f"{r['cpu_s_per_gb']:.1f} | "
                f"{r['cpu_pct']:.0f} | {r['peak_rss_mib']:.0f} |"
            )
    if "memory" in b and "runs" in b["memory"]:
        out += ["", "## 4. Memory (`memory.py`)", ""]
        out.append(
            "| cameras x files | files/s | peak RSS MiB | idle RSS MiB | RSS at 1/4, 1/2, 3/4, "
            "end | journal bytes/file on disk | written/file | journal commits/s | lag max / p99 "
            "ms | control lag max / p99 ms |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in b["memory"]["runs"]:
            q = ", ".join(f"{v:.0f}" for v in r["rss_at_quarters_mib"])
            out.append(
                f"| {r['cameras']} x {r['files_per_camera']} | {r['files_s']:.0f} | "
                f"{r['peak_rss_mib']:.1f} | {r['rss_before_mib']:.1f} | {q} | "
                f"{r['journal_bytes_per_file']:.0f} | {r['journal_written_per_file']:.0f} | "
                f"{r['journal_commits_per_s']:.1f} | "
                f"{r['lag_max_ms']:.0f} / {r['lag_p99_ms']:.0f} | "
                f"{r['control_lag_max_ms']:.0f} / {r['control_lag_p99_ms']:.0f} |"
            )
    if "upload" in b and "results" in b["upload"]:
        out += ["", "## 5. Upload (`upload.py`)", ""]
        out.append("| case | method | seconds | MB/s | files/s | CPU % | journal commits |")
        out.append("|---|---|---|---|---|---|---|")
        for r in b["upload"]["results"]:
            out.append(
                f"| {r['case']} | {r['method']} | {r['seconds']:.2f} | {r['mb_s']:.1f} | "
                f"{r['files_s']:.0f} | {100 * r['cpu_s'] / r['seconds']:.0f} | "
                f"{r.get('journal_commits', '')} |"
            )
    profiles = b.get("files", {}).get("profiles") or {}
    if profiles:
        out += ["", "## Profile: where dockd's offload time goes (py-spy)", ""]
        out.append(
            "py-spy record --threads --idle --nonblocking at 100 Hz on the dockd process during "
            "the files benchmark's dockd runs (whole process life: start-up included). A line "
            "is where a thread was: running Python or blocked in a system call on that line."
        )
        for case, p in profiles.items():
            out += ["", f"### {case}", "", "```", p.get("text", ""), "```"]
    for name in BENCHES:
        e = b.get(name, {})
        if e.get("error") or e.get("skipped"):
            out += ["", f"**{name}: {e.get('error') or e.get('skipped')}** (see bench/report.log)"]
    notes = [n for e in b.values() for n in e.get("notes", [])]
    if notes:
        out += ["", "Notes: " + "; ".join(notes)]
    out += ["", "Full output of every benchmark: `bench/report.log`.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default=",".join(BENCHES))
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--big-files", type=int, default=4)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--small-files", type=int, default=20000)
    ap.add_argument("--bay-files", type=int, default=4)
    ap.add_argument("--bay-file-mib", type=int, default=64)
    ap.add_argument("--memory-files", type=int, default=2000, help="N per camera (and 2N)")
    ap.add_argument("--upload-big-files", type=int, default=4)
    ap.add_argument("--upload-big-mib", type=int, default=128)
    ap.add_argument("--upload-small-files", type=int, default=1000)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE, help="where report.* go (bench/)")
    args = ap.parse_args(argv)
    if args.quick:
        args.big_mib, args.small_files, args.bay_file_mib = 64, 2000, 16
        args.memory_files, args.upload_big_mib, args.upload_small_files = 300, 80, 200
    only = [x for x in args.only.split(",") if x]
    if not is_root():
        print("run_all: not root: no loop devices, no cache drops, no throttling; figures are warm")
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(["bench/run_all.py", *(argv if argv is not None else sys.argv[1:])]),
        "host": host_facts(),
        "benches": {},
        "ratios": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="dockd-runall-", dir="/var/tmp") as tmp,
        open(args.out / "report.log", "w") as log,
    ):
        tmpd = Path(tmp)
        print("machine probes ...", flush=True)
        report["machine"] = machine_figures(tmpd, is_root())
        log.write(f"machine: {json.dumps(report['machine'])}\n")
        print(json.dumps(report["machine"], indent=1))
        for name in BENCHES:
            if name not in only:
                continue
            extra = bench_args(name, args, args.out / "report.profiles")
            data = run_bench(name, extra, tmpd / f"{name}.json", log)
            report["benches"][name] = data
            report["ratios"] += data.get("ratios", [])
    report["minutes"] = (time.perf_counter() - t0) / 60
    write_json(args.out / "report.json", report)
    md = markdown(report)
    (args.out / "report.md").write_text(md)
    print("\n" + md)
    print(f"wrote {args.out / 'report.md'}, {args.out / 'report.json'}, {args.out / 'report.log'}")
    os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
