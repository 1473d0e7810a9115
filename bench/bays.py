"""Several bays: 1, 2, 4, 8 cameras docked at once, each a USB-like source of a capped rate.

    sudo .venv/bin/python bench/bays.py [--rates 35,300] [--cams 1,2,4,8] [--files 4]
                                        [--file-mib 64] [--what-if-parallel 8] [--json-out PATH]

Each camera is an ext4 image of its own on a loop device of its own (direct I/O), mounted
read-only, as dockd's USB source mounts a camera. The rate of each camera is capped with the
block layer's throttle for the daemon's process: cgroup v2 `io.max` (`MAJ:MIN rbps=N`) where
the v2 hierarchy has the io controller, else cgroup v1 `blkio.throttle.read_bps_device` (the
same blk-throttle), one limit per loop device, in a cgroup made for the benchmark that the dockd
child process joins before it starts. The output says which one was used and why.

The daemon is the real one (bench/_dockd.py), with the shipped defaults (parallel_cameras 4,
copy_workers 2, 8 MiB chunks, verify=readback) and a filesystem store; the cameras are docked
at the same instant through the daemon's source entry point, and the clock runs until the last
camera's `safe_to_undock`. For each run:

  aggregate  camera bytes / wall time (MB = 10^6 bytes)
  expected   min(cameras x rate, disk bound), the disk bound measured in the same run: the
             bare I/O of the offload (read the source, write + fsync, O_DIRECT read-back; no
             hashing) over 4 cameras on 4 threads at once, unthrottled
  ratio      aggregate / expected (target >= 0.9)
  lag        the daemon's event loop, from a task sleeping 10 ms in a loop in the daemon's
             process: max and p99 of how late it woke (target: max < 50 ms)
  CPU/GB     CPU seconds of the daemon process (all threads) per GB offloaded

With 8 cameras and parallel_cameras = 4 (the default), four cameras wait for a slot; the
what-if run (--what-if-parallel 8) shows what parallel_cameras = 8 gives.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "daemon"))

from _common import (  # noqa: E402
    CHUNK,
    DataGen,
    LoopMount,
    Meter,
    MiB,
    ReadThrottle,
    block_device_of,
    clean,
    drop_caches,
    fs_type,
    host_facts,
    is_root,
    make_workdir,
    mkfs_from,
    ratio_row,
    verdict,
    write_json,
)
from _dockd import Cam, Spec, run_daemon  # noqa: E402

TARGET_RATIO = 0.90
TARGET_LAG_MS = 50.0


def build_cameras(work: Path, args: argparse.Namespace) -> tuple[list[LoopMount], list[Cam]]:
    gen = DataGen(args.seed)
    tree = work / "gen"
    files = [(f"DCIM/100BWC/CLIP{n:04d}.MP4", args.file_mib * MiB) for n in range(args.files)]
    for rel, size in files:
        gen.write(tree / rel, size)
    nbytes = sum(s for _, s in files)
    first = work / "bay01.img"
    mkfs_from(tree, first, nbytes, len(files))
    shutil.rmtree(tree)
    mounts, cams = [], []
    for i in range(1, max(args.cams) + 1):
        img = work / f"bay{i:02d}.img"
        if i > 1:
            shutil.copyfile(first, img)  # same content, its own image, device and page cache
        m = LoopMount(img, work / "mnt" / f"BAY{i:02d}", readonly=True)
        m.open()
        mounts.append(m)
        cams.append(Cam(f"BAY{i:02d}", m.mountpoint, files=len(files), bytes=nbytes))
    os.sync()
    return mounts, cams


def disk_bound(cams: list[Cam], work: Path, can_drop: bool, threads: int = 4) -> dict[str, Any]:
    """The offload's bare I/O, `threads` cameras at once, unthrottled: per file a buffered read
    of the source, a write of the copy + fsync, an O_DIRECT read-back of the copy."""
    dst = work / "dst-bound"
    dst.mkdir()
    use = cams[:threads]

    def one(cam: Cam) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        abuf = mmap.mmap(-1, CHUNK)
        for k, f in enumerate(sorted((cam.root / "DCIM/100BWC").iterdir())):
            out = dst / f"{cam.id}-{k}"
            fd = os.open(f, os.O_RDONLY)
            wfd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                while n := os.readv(fd, [view]):
                    chunk = view[:n]
                    while chunk:
                        chunk = chunk[os.write(wfd, chunk) :]
                os.fsync(wfd)
            finally:
                os.close(fd)
                os.close(wfd)
            rfd = os.open(out, os.O_RDONLY | os.O_DIRECT)
            try:
                while os.readv(rfd, [abuf]):
                    pass
            finally:
                os.close(rfd)
        abuf.close()

    drop_caches(can_drop)
    ts = [threading.Thread(target=one, args=(c,)) for c in use]
    with Meter([block_device_of(work)]) as m:
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    nbytes = sum(c.bytes for c in use)
    clean(dst)
    return {"threads": threads, "seconds": m.seconds, "mb_s": nbytes / m.seconds / 1e6}


def one_run(
    work: Path,
    cams: list[Cam],
    throttle: ReadThrottle,
    args: argparse.Namespace,
    parallel: int | None,
    disk: str | None,
) -> dict[str, Any]:
    base = work / "run"
    (base / "store").mkdir(parents=True)
    (base / "dock").mkdir()
    offload_cfg: dict[str, Any] = {}
    if parallel is not None:
        offload_cfg["parallel_cameras"] = parallel
    spec = Spec(
        work=base,
        dock_dir=base / "dock",
        cams=cams,
        store={"kind": "filesystem", "path": str(base / "store")},
        offload=offload_cfg,
        can_drop=is_root(),
        devices=[d for d in [disk] if d],
        disk=disk,
        cgroup_procs=throttle.procs if throttle.available else None,
        lag_trace_ms=args.lag_trace_ms,
        setup=args.setup,
        log_level=args.log_level,
        log_file=work / "dockd.log",
        time_split=True,
    )
    try:
        out = run_daemon(spec)
    finally:
        clean(base)
    want = sum(c.files for c in cams)
    if out["files_verified"] != want:
        raise RuntimeError(f"dockd verified {out['files_verified']} of {want} files")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", default="35,300", help="per-camera read rates, MB/s (35,300)")
    ap.add_argument("--cams", default="1,2,4,8", help="cameras docked at once (1,2,4,8)")
    ap.add_argument("--files", type=int, default=4, help="files per camera (4)")
    ap.add_argument("--file-mib", type=int, default=64, help="size of each file (64 MiB)")
    ap.add_argument(
        "--what-if-parallel",
        type=int,
        default=8,
        help="also run the largest camera count with offload.parallel_cameras = N (0: no)",
    )
    ap.add_argument("--what-if-rates", default="35", help="rates for the what-if run (35)")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument(
        "--lag-trace-ms",
        type=float,
        default=0.0,
        help="diagnosis: print the loop thread's stack whenever it is this late (_dockd.py)",
    )
    ap.add_argument(
        "--setup",
        default=None,
        help="what-if: FILE.py:FUNCTION run in the daemon's process first (as files.py's)",
    )
    args = ap.parse_args(argv)
    rates = [int(x) for x in args.rates.split(",") if x]
    args.cams = [int(x) for x in args.cams.split(",") if x]
    what_if_rates = [int(x) for x in args.what_if_rates.split(",") if x]
    if not is_root():
        print("bays: needs root (loop devices, mounts, cgroups); skipped")
        if args.json_out:
            write_json(args.json_out, {"bench": "bays", "skipped": "not root", "ratios": []})
        return 0
    work = make_workdir(args.dir, "dockd-bays-")
    throttle = ReadThrottle(f"dockd-bench-{os.getpid()}")
    mounts: list[LoopMount] = []
    t_all = time.perf_counter()
    runs: list[dict[str, Any]] = []
    try:
        t = time.perf_counter()
        mounts, cams = build_cameras(work, args)
        setup_s = time.perf_counter() - t
        disk = block_device_of(work)
        print(f"bays benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  {host_facts()}")
        print(f"work dir  : {work} on /dev/{disk} ({fs_type(work)})")
        print(
            f"cameras   : {len(cams)} ext4 images, each {args.files} x {args.file_mib} MiB "
            f"({cams[0].bytes / 1e6:.0f} MB), on their own loop device (direct-io="
            f"{mounts[0].direct}), mounted ro: "
            + " ".join(f"{c.id}=/dev/{m.name}" for c, m in zip(cams, mounts, strict=True))
            + f" (built in {setup_s:.1f} s)"
        )
        if throttle.available:
            print(f"throttle  : {throttle.kind}, cgroup {throttle.path}")
            if throttle.note:
                print(f"            (why not io.max: {throttle.note})")
        else:
            print(f"throttle  : NONE AVAILABLE ({throttle.why_not}); sources are unthrottled")
        sys.stdout.flush()
        bound = disk_bound(cams, work, True, threads=min(4, len(cams)))
        print(
            f"disk bound: {bound['mb_s']:.0f} MB/s (read + write/fsync + direct read-back of "
            f"{bound['threads']} cameras on {bound['threads']} threads, unthrottled, no hashing)"
        )
        plan: list[tuple[int, int, int | None]] = [(r, n, None) for r in rates for n in args.cams]
        if args.what_if_parallel:
            plan += [(r, max(args.cams), args.what_if_parallel) for r in what_if_rates]
        for rate, n, parallel in plan:
            if throttle.available:
                for m in mounts:
                    throttle.limit(m.majmin, rate * 1_000_000)
            t = time.perf_counter()
            out = one_run(work, cams[:n], throttle, args, parallel, disk)
            nbytes = sum(c.bytes for c in cams[:n])
            agg = nbytes / out["offload_s"] / 1e6
            p_eff = parallel or 4
            expected = min(n * rate, bound["mb_s"])
            cfg_cap = min(min(n, p_eff) * rate, bound["mb_s"])
            cpu = out["offload_cpu_user_s"] + out["offload_cpu_sys_s"]
            safe = [m.get("safe_to_undock", 0.0) for m in out["marks"].values()]
            d = out["offload_meter"]["disk"].get(disk or "", {})
            run = {
                "rate_mb_s": rate,
                "cameras": n,
                "parallel_cameras": p_eff,
                "what_if": parallel is not None,
                "bytes": nbytes,
                "seconds": out["offload_s"],
                "aggregate_mb_s": agg,
                "sum_of_sources_mb_s": n * rate,
                "disk_bound_mb_s": bound["mb_s"],
                "expected_mb_s": expected,
                "config_cap_mb_s": cfg_cap,
                "ratio": agg / expected,
                "lag_max_ms": out["offload_lag"]["max_ms"],
                "lag_p99_ms": out["offload_lag"]["p99_ms"],
                "lag_samples": out["offload_lag"]["samples"],
                "control_lag_max_ms": out["control_lag"]["max_ms"],
                "control_lag_p99_ms": out["control_lag"]["p99_ms"],
                "cpu_s": cpu,
                "cpu_pct": 100 * cpu / out["offload_s"],
                "cpu_s_per_gb": cpu / (nbytes / 1e9),
                "peak_rss_mib": (out["offload_peak_rss"] or 0) / MiB,
                "first_safe_s": min(safe),
                "last_safe_s": max(safe),
                "disk_busy_pct": 100 * d.get("busy_ms", 0) / 1000 / out["offload_s"],
                "iowait_pct": out["offload_meter"]["iowait_pct"],
                "journal_commits": out["offload_journal"]["commits"],
            }
            runs.append(run)
            for key, count, worst in out.get("lag_trace", []):
                print(f"      loop late x{count} (worst {worst:.0f} ms) at: {key}")
            print(
                f"  {rate:>4} MB/s x {n} cam{'s' if n > 1 else ' '}"
                + (f" (parallel_cameras={parallel})" if parallel else "")
                + f": {out['offload_s']:6.2f} s, {agg:6.1f} MB/s of {expected:.0f} expected "
                f"({agg / expected:.2f}); lag max {run['lag_max_ms']:.1f} ms p99 "
                f"{run['lag_p99_ms']:.1f} ms (control {run['control_lag_max_ms']:.1f}/"
                f"{run['control_lag_p99_ms']:.1f}); {run['cpu_s_per_gb']:.1f} CPU-s/GB "
                f"({time.perf_counter() - t:.1f} s with setup)",
                flush=True,
            )
        print()
        hdr = (
            f"{'MB/s/cam':>8} {'cams':>4} {'par':>3} {'seconds':>8} {'aggr MB/s':>9} "
            f"{'expected':>8} {'ratio':>6} {'cfg cap':>7} {'lag max':>7} {'lag p99':>7} "
            f"{'cpu%':>5} {'CPU-s/GB':>8} {'RSS MiB':>7} {'busy%':>5} {'iowait%':>7}"
        )
        print(hdr)
        print("-" * len(hdr))
        for r in runs:
            print(
                f"{r['rate_mb_s']:>8} {r['cameras']:>4} {r['parallel_cameras']:>3} "
                f"{r['seconds']:>8.2f} {r['aggregate_mb_s']:>9.1f} {r['expected_mb_s']:>8.0f} "
                f"{r['ratio']:>6.2f} {r['config_cap_mb_s']:>7.0f} {r['lag_max_ms']:>7.1f} "
                f"{r['lag_p99_ms']:>7.1f} {r['cpu_pct']:>5.0f} {r['cpu_s_per_gb']:>8.1f} "
                f"{r['peak_rss_mib']:>7.0f} {r['disk_busy_pct']:>5.0f} {r['iowait_pct']:>7.0f}"
            )
        print(
            "(expected = min(cameras x rate, disk bound); cfg cap = the same with only "
            "parallel_cameras cameras at once; lag in ms)"
        )
        rows = []
        for r in runs:
            tag = f"{r['rate_mb_s']}MBs.x{r['cameras']}" + (
                f".par{r['parallel_cameras']}" if r["what_if"] else ""
            )
            note = ""
            if r["config_cap_mb_s"] < r["expected_mb_s"] * 0.999:
                note = (
                    f"offload.parallel_cameras={r['parallel_cameras']} lets only "
                    f"{r['parallel_cameras']} of {r['cameras']} cameras offload at once: "
                    f"{r['config_cap_mb_s']:.0f} MB/s at most"
                )
            rows.append(
                ratio_row(
                    f"bays.{tag}.aggregate",
                    f"bays: {r['cameras']} x {r['rate_mb_s']} MB/s"
                    + (f" (parallel_cameras={r['parallel_cameras']})" if r["what_if"] else "")
                    + ": aggregate / min(sum of sources, disk bound)",
                    r["ratio"],
                    f">= {TARGET_RATIO}",
                    r["ratio"] >= TARGET_RATIO,
                    f"{r['aggregate_mb_s']:.0f} MB/s",
                    f"{r['expected_mb_s']:.0f} MB/s (sources {r['sum_of_sources_mb_s']}, "
                    f"disk {r['disk_bound_mb_s']:.0f})",
                    note,
                )
            )
        worst = max(runs, key=lambda r: r["lag_max_ms"])
        rows.append(
            ratio_row(
                "bays.lag_max_ms",
                "bays: event loop lag, worst max over all runs (ms)",
                worst["lag_max_ms"],
                f"< {TARGET_LAG_MS:g} ms",
                worst["lag_max_ms"] < TARGET_LAG_MS,
                f"max {worst['lag_max_ms']:.1f} ms, p99 {max(r['lag_p99_ms'] for r in runs):.1f}"
                f" ms (worst run: {worst['cameras']} x {worst['rate_mb_s']} MB/s)",
                f"control process, same runs: max "
                f"{max(r['control_lag_max_ms'] for r in runs):.1f} ms, p99 "
                f"{max(r['control_lag_p99_ms'] for r in runs):.1f} ms",
            )
        )
        print()
        for row in rows:
            print(
                f"  {row['what']}: {row['value']:.2f} (target {row['target']}) -> "
                f"{verdict(row['met'])}  [dockd {row['dockd']}; bound {row['baseline']}]"
                + (f"  ({row['note']})" if row["note"] else "")
            )
        if args.json_out:
            write_json(
                args.json_out,
                {
                    "bench": "bays",
                    "seconds": time.perf_counter() - t_all,
                    "host": host_facts(),
                    "throttle": throttle.kind or f"none: {throttle.why_not}",
                    "throttle_note": throttle.note,
                    "camera": {"files": args.files, "file_mib": args.file_mib},
                    "disk_bound": bound,
                    "runs": runs,
                    "ratios": rows,
                },
            )
    finally:
        for m in mounts:
            m.close()
        throttle.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
