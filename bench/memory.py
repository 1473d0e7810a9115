"""Memory: the daemon's peak RSS with 8 cameras of N small files docked at once, for N and 2N.

    sudo .venv/bin/python bench/memory.py [--cams 8] [--files N] [--json-out PATH]

Each camera is a folder of N files (1-8 KiB, nested folders of 100 files, 1000 a top folder)
renamed into the directory source's dock directory at the same instant; the daemon is the real
one (bench/_dockd.py) with the shipped defaults (parallel_cameras 4, so cameras 5-8 wait for a
slot) and a filesystem store, and uploads run as sessions finish, as on a dock. The clock and
the memory figures run from docking to the last camera's `safe_to_undock`:

  peak RSS     VmHWM of the daemon process, reset (clear_refs) at docking: everything the
               daemon held at once, Python heap, thread stacks, the copy buffers (8 MiB per copy
               worker: 8 workers = 64 MiB when all are busy), sqlite's page cache
  growth       peak RSS at 2N minus peak RSS at N: what each file costs if something is kept
               per file (a list, a dict, a log buffer); ~0 when walks are streamed and memory
               is bounded by pages and windows
  journal      bytes on disk per file (journal after the run, closed, minus an empty journal)

The cameras share their files' inodes (hard links of one generated tree), so only one copy of
the data is generated; every camera is still walked, read, copied, verified and journalled on
its own. The harness in the child keeps nothing per file (no time split) so that its own memory
does not grow with N.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "daemon"))

from _common import (  # noqa: E402
    DataGen,
    MiB,
    block_device_of,
    clean,
    fs_type,
    host_facts,
    is_root,
    make_workdir,
    ratio_row,
    verdict,
    write_json,
)
from _dockd import Cam, Spec, run_daemon  # noqa: E402
from _profile import PySpy  # noqa: E402

TARGET_PEAK_MIB = 150.0
TARGET_GROWTH = 0.10  # peak(2N) <= 1.10 x peak(N)


def generate(tree: Path, n: int, seed: int, lo: int, hi: int) -> int:
    gen = DataGen(seed)
    rng = random.Random(seed)
    total = 0
    for k in range(n):
        size = rng.randint(lo, hi)
        gen.write(tree / f"DCIM/{100 + k // 1000}BWC/{(k // 100) % 10:02d}/IMG{k:06d}.JPG", size)
        total += size
    return total


def fresh_journal_bytes(work: Path) -> int:
    from dockd.journal import Journal

    d = work / "fresh-journal"
    j = Journal.open(d / "journal.sqlite3", "bench-dock")
    j.close()
    n = sum(p.stat().st_size for p in d.iterdir())
    shutil.rmtree(d)
    return n


def one_run(
    work: Path, tree: Path, cams: int, n: int, nbytes: int, args: argparse.Namespace
) -> dict[str, Any]:
    base = work / f"run-{n}"
    incoming = base / "incoming"
    dock = base / "dock"
    dock.mkdir(parents=True)
    (base / "store").mkdir()
    cam_list = []
    t = time.perf_counter()
    for i in range(1, cams + 1):
        cid = f"MEM{i:02d}"
        (incoming / cid).mkdir(parents=True)
        subprocess.run(["cp", "-al", str(tree / "DCIM"), str(incoming / cid / "DCIM")], check=True)
        cam_list.append(Cam(cid, dock / cid, rename_from=incoming / cid, files=n, bytes=nbytes))
    link_s = time.perf_counter() - t
    disk = block_device_of(work)
    offload: dict[str, Any] = {}
    if args.parallel:
        offload["parallel_cameras"] = args.parallel
    store: dict[str, Any] = {
        "kind": "filesystem",
        "path": str(base / "store" if args.upload else base / "x"),
    }
    if args.s3 is not None:
        client = args.s3.client()
        store = args.s3.store_config(args.s3.bucket(client, f"mem{n}"), base / "s3-secret")
    if args.chunk_mib:
        offload["chunk_size"] = args.chunk_mib * 1024 * 1024
    spec = Spec(
        work=base,
        dock_dir=dock,
        cams=cam_list,
        store=store,
        offload=offload,
        can_drop=is_root(),
        devices=[d for d in [disk] if d],
        disk=disk,
        log_level=args.log_level,
        log_file=work / "dockd.log",
        time_split=False,
        timeout=4 * 3600,
        lag_trace_ms=args.lag_trace_ms,
    )
    prof = None
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        prof = PySpy(args.profile / f"memory-{n}.txt", gil=args.profile_gil)
    try:
        out = run_daemon(spec, on_start=prof.start if prof else None)
    finally:
        if prof:
            prof.stop()
        clean(base)
    if prof:
        out["profile"] = prof.summary()
    if out["files_verified"] != cams * n:
        raise RuntimeError(f"dockd verified {out['files_verified']} of {cams * n} files")
    out["link_s"] = link_s
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cams", type=int, default=8)
    ap.add_argument("--files", type=int, default=2500, help="N files per camera (2500)")
    ap.add_argument("--no-double", action="store_true", help="run N only, not N and 2N")
    ap.add_argument("--min-kib", type=int, default=1)
    ap.add_argument("--max-kib", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=0, help="offload.parallel_cameras (default)")
    ap.add_argument(
        "--no-upload",
        dest="upload",
        action="store_false",
        help="no uploads while offloading (store away)",
    )
    ap.add_argument(
        "--s3",
        action="store_true",
        help="upload to a local SeaweedFS S3 server (upload.py's) instead of a directory",
    )
    ap.add_argument("--chunk-mib", type=int, default=0, help="offload.chunk_size (default 8)")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--lag-trace-ms", type=float, default=0.0, help="diagnosis: see _dockd.py")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy the daemon into DIR")
    ap.add_argument("--profile-gil", action="store_true", help="py-spy --gil instead of --idle")
    args = ap.parse_args(argv)
    work = make_workdir(args.dir, "dockd-memory-")
    t_all = time.perf_counter()
    s3 = None
    if args.s3:
        from upload import SeaweedFS

        s3 = SeaweedFS(work / "s3")
        if why := s3.available():
            print(f"memory: --s3: {why}")
            return 1
        s3.start()
    args.s3 = s3
    sizes = [args.files] if args.no_double else [args.files, 2 * args.files]
    runs = []
    try:
        t = time.perf_counter()
        trees = {}
        per_n_bytes = {}
        for n in sizes:
            trees[n] = work / f"tree-{n}"
            per_n_bytes[n] = generate(
                trees[n], n, args.seed, args.min_kib * 1024, args.max_kib * 1024
            )
        gen_s = time.perf_counter() - t
        fresh = fresh_journal_bytes(work)
        disk = block_device_of(work)
        print(f"memory benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  {host_facts()}")
        print(f"work dir : {work} on /dev/{disk} ({fs_type(work)})")
        print(
            f"cameras  : {args.cams} folders of N files ({args.min_kib}-{args.max_kib} KiB), "
            f"N = {', '.join(map(str, sizes))}; hard links of one generated tree per N "
            f"(generated in {gen_s:.1f} s); uploads {'on' if args.upload else 'off'}"
            + (" to SeaweedFS S3" if s3 else "")
            + (f"; offload.chunk_size {args.chunk_mib} MiB" if args.chunk_mib else "")
        )
        sys.stdout.flush()
        for n in sizes:
            t = time.perf_counter()
            out = one_run(work, trees[n], args.cams, n, per_n_bytes[n], args)
            files = args.cams * n
            secs = out["offload_s"]
            cpu = out["offload_cpu_user_s"] + out["offload_cpu_sys_s"]
            samples = out["rss_samples"]
            run = {
                "files_per_camera": n,
                "cameras": args.cams,
                "files": files,
                "bytes": args.cams * per_n_bytes[n],
                "seconds": secs,
                "files_s": files / secs,
                "rss_before_mib": out["rss_before"] / MiB,
                "peak_rss_mib": (out["offload_peak_rss"] or 0) / MiB,
                "rss_p50_mib": sorted(r for _, r in samples)[len(samples) // 2] / MiB
                if samples
                else None,
                "rss_at_quarters_mib": [
                    samples[min(len(samples) - 1, int(q * len(samples)))][1] / MiB
                    for q in (0.25, 0.5, 0.75, 1.0)
                ]
                if samples
                else [],
                "journal_bytes_per_file": max(0, out["journal_bytes_after"] - fresh) / files,
                "journal_commits": out["offload_journal"]["commits"],
                "journal_commits_per_s": out["offload_journal"]["commits"] / secs,
                "journal_written_per_file": out["offload_journal"]["write_bytes"] / files,
                "lag_max_ms": out["offload_lag"]["max_ms"],
                "lag_p99_ms": out["offload_lag"]["p99_ms"],
                "control_lag_max_ms": out["control_lag"]["max_ms"],
                "control_lag_p99_ms": out["control_lag"]["p99_ms"],
                "cpu_s": cpu,
                "cpu_ms_per_file": 1000 * cpu / files,
                "dropped_notices": out["dropped_notices"],
            }
            runs.append(run)
            if "profile" in out:
                print(out["profile"]["text"])
                run["profile"] = out["profile"]
            for key, count, worst in out.get("lag_trace", []):
                print(f"    loop late x{count} (worst {worst:.0f} ms) at: {key}")
            print(
                f"  {args.cams} x {n} files: {secs:.1f} s ({run['files_s']:.0f} files/s), "
                f"peak RSS {run['peak_rss_mib']:.1f} MiB (idle before docking "
                f"{run['rss_before_mib']:.1f}), RSS at 1/4, 1/2, 3/4, end: "
                + ", ".join(f"{x:.0f}" for x in run["rss_at_quarters_mib"])
                + f" MiB; journal {run['journal_bytes_per_file']:.0f} B/file on disk, "
                f"{run['journal_written_per_file']:.0f} B/file written, "
                f"{run['journal_commits_per_s']:.1f} commits/s; lag max "
                f"{run['lag_max_ms']:.1f} ms p99 {run['lag_p99_ms']:.1f} ms (control process: "
                f"max {run['control_lag_max_ms']:.1f} p99 {run['control_lag_p99_ms']:.1f}); "
                f"{run['cpu_ms_per_file']:.2f} CPU-ms/file "
                f"({time.perf_counter() - t:.1f} s with setup)",
                flush=True,
            )
        rows = []
        big = runs[-1]
        rows.append(
            ratio_row(
                "memory.peak_rss_mib",
                f"memory: peak RSS at {big['cameras']} cameras x {big['files_per_camera']} files "
                "(MiB)",
                big["peak_rss_mib"],
                f"< {TARGET_PEAK_MIB:g} MiB",
                big["peak_rss_mib"] < TARGET_PEAK_MIB,
                f"{big['peak_rss_mib']:.1f} MiB",
                f"idle {big['rss_before_mib']:.1f} MiB",
            )
        )
        if len(runs) == 2:
            a, b = runs
            growth = b["peak_rss_mib"] / a["peak_rss_mib"]
            per_file = (b["peak_rss_mib"] - a["peak_rss_mib"]) * MiB / (b["files"] - a["files"])
            rows.append(
                ratio_row(
                    "memory.growth_2n_over_n",
                    f"memory: peak RSS at 2N / at N (N = {a['files_per_camera']} per camera)",
                    growth,
                    f"<= {1 + TARGET_GROWTH:.2f} (does not grow with files)",
                    growth <= 1 + TARGET_GROWTH,
                    f"{b['peak_rss_mib']:.1f} MiB at 2N",
                    f"{a['peak_rss_mib']:.1f} MiB at N",
                    f"{per_file:+.0f} bytes per extra file",
                )
            )
        print()
        for row in rows:
            print(
                f"  {row['what']}: {row['value']:.2f} (target {row['target']}) -> "
                f"{verdict(row['met'])}  [{row['dockd']}; {row['baseline']}]"
                + (f" ({row['note']})" if row["note"] else "")
            )
        if args.json_out:
            write_json(
                args.json_out,
                {
                    "bench": "memory",
                    "seconds": time.perf_counter() - t_all,
                    "host": host_facts(),
                    "runs": runs,
                    "ratios": rows,
                    "upload": args.upload,
                },
            )
    finally:
        if s3 is not None:
            s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
