"""Single large files and many small files: dockd's verified offload against every baseline.

    sudo .venv/bin/python bench/files.py [--size-mib 256] [--files 4] [--small-files 20000]
                                         [--cases big,small] [--only dd,io,cp,rclone,dockd]
                                         [--json-out PATH] [--profile DIR]

One camera, one run, every method on the same generated data, each from a cold page cache:

  dd      the bare I/O bound with `dd` (read, write conv=fsync, direct read-back); big case only
          by default (with thousands of small files it measures fork/exec, not I/O)
  io      the same three steps as syscalls from this process (offload.py's `io`)
  cp      `cp -r && sync && sha256sum` of source and copy (offload.py's baseline (a))
  rclone  Debian's rclone: `rclone copy --checksum src dst && sync && rclone check --download
          src dst` (baseline (b)); rclone copies 4 files at once (its default --transfers)
  dockd   the real daemon (bench/_dockd.py): the camera folder is renamed into the directory
          source's dock directory and the clock stops at `safe_to_undock`
  batch   a what-if, not dockd (small case only, not in any ratio): copy_file's steps with
          durability per group of 64 files (one syncfs + one directory fsync) instead of per
          file: what grouped durability would give on this disk

The camera is offload.py's: an ext4 image on a loop device (direct I/O), mounted, on the same
filesystem as every destination. Reused from offload.py: the camera, `dd`, `io`, `cp`.

Besides the ratios this reports, for dockd: journal write transactions per second and per file,
the journal's size per file, where the time went (walk, copy threads, journal flushes) and the
event loop's lag. With --profile DIR, py-spy samples the dockd child during its run and a
summary of where the time goes is printed (raw stacks kept in DIR).
"""

from __future__ import annotations

import argparse
import os
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
    Meter,
    MiB,
    Result,
    block_device_of,
    fs_type,
    host_facts,
    is_root,
    make_workdir,
    patched,
    ratio_row,
    shq,
    verdict,
    write_json,
)
from _dockd import Cam, Spec, run_daemon  # noqa: E402
from _profile import PySpy  # noqa: E402

import offload  # noqa: E402  (the colleague's benchmark: camera image, dd, io, cp)

METHODS = ("dd", "io", "cp", "rclone", "dockd", "batch")
TARGET_VS_CP = 3.0
TARGET_VS_RCLONE = 1.0
TARGET_VS_IO = 1.15
RCLONE = ["rclone", "--config", "/dev/null", "-q"]


def make_cases(args: argparse.Namespace) -> list[offload.Case]:
    rng = random.Random(args.seed)
    cases = []
    if "big" in args.cases and args.files > 0:
        big = [
            (f"DCIM/100BWC/CLIP{n:04d}.MP4", args.size_mib * MiB) for n in range(1, args.files + 1)
        ]
        cases.append(offload.Case("big", "BENCHBIG01", big))
    if "small" in args.cases and args.small_files > 0:
        small = []
        for n in range(args.small_files):
            # nested like photo/metadata sidecars: DCIM/1NNBWC/DD/ of 100 files, 1000 a folder
            folder = f"DCIM/{100 + n // 1000}BWC/{(n // 100) % 10:02d}"
            size = rng.randint(args.small_min_kib * 1024, args.small_max_kib * 1024)
            ext = "JPG" if n % 4 else "JSON"
            small.append((f"{folder}/IMG{n:06d}.{ext}", size))
        cases.append(offload.Case("small", "BENCHSMALL1", small))
    return cases


def rclone_version() -> str | None:
    if shutil.which("rclone") is None:
        return None
    out = subprocess.run(["rclone", "version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "rclone"


def run_rclone(case: offload.Case, src: Path, dst: Path, env: offload.Env) -> Result:
    r = " ".join(RCLONE)
    cmd = (
        f"{r} copy --checksum {shq(src)} {shq(dst)} && sync && "
        f"{r} check --download {shq(src)} {shq(dst)}"
    )
    env.cold()
    with Meter(env.devices) as m:
        subprocess.run(["bash", "-c", cmd], check=True)
    res = m.result(
        case.name,
        "rclone",
        "rclone copy --checksum && sync && rclone check --download",
        case.nbytes,
        len(case.files),
        env.disk,
    )
    offload.clean(dst)
    return res


def run_batch(case: offload.Case, src: Path, dst: Path, env: offload.Env) -> Result:
    """What-if, not dockd: the same per-file work as dockd's copy_file (open with O_NOFOLLOW,
    SHA-256 + xxh128 inline, write to `.partial`, rename, read-back after POSIX_FADV_DONTNEED
    compared with the inline hash) but durability per group of 64 files instead of per file:
    write the group, one syncfs(2) for the staging filesystem, rename the group, one directory
    fsync, then read the group back. Nothing is "verified" before the syncfs that covers it,
    so the journal could record the group in one transaction after it, as dockd does now.
    One thread. Shows what grouped durability would give on this disk."""
    import ctypes
    import hashlib

    import xxhash

    libc = ctypes.CDLL(None, use_errno=True)
    group = 64
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    dst.mkdir(parents=True)
    jobs = [(src / rel, dst / str(i)) for i, (rel, _) in enumerate(case.files)]
    env.cold()
    with Meter(env.devices) as m:
        dfd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for g in range(0, len(jobs), group):
                batch = jobs[g : g + group]
                digests = []
                for s_path, d_path in batch:
                    fd = os.open(s_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    out = os.open(
                        str(d_path) + ".partial", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
                    )
                    try:
                        os.fstat(fd)
                        h, x, off = hashlib.sha256(), xxhash.xxh3_128(), 0
                        while n := os.preadv(fd, [view], off):
                            chunk = view[:n]
                            h.update(chunk)
                            x.update(chunk)
                            while chunk:
                                chunk = chunk[os.write(out, chunk) :]
                            off += n
                        os.fstat(fd)
                        digests.append(h.hexdigest())
                    finally:
                        os.close(out)
                        os.close(fd)
                if libc.syncfs(dfd) != 0:
                    raise OSError(ctypes.get_errno(), "syncfs")
                for _, d_path in batch:
                    os.rename(str(d_path) + ".partial", d_path)
                os.fsync(dfd)
                for (_, d_path), want in zip(batch, digests, strict=True):
                    fd = os.open(d_path, os.O_RDONLY | os.O_NOFOLLOW)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        h = hashlib.sha256()
                        while n := os.readv(fd, [view]):
                            h.update(view[:n])
                    finally:
                        os.close(fd)
                    if h.hexdigest() != want:
                        raise RuntimeError(f"{d_path}: read back differs")
        finally:
            os.close(dfd)
    res = m.result(
        case.name,
        "batch",
        "what-if, not dockd: copy_file's steps, one syncfs + dir fsync per 64 files",
        case.nbytes,
        len(case.files),
        env.disk,
    )
    offload.clean(dst)
    return res


def fresh_journal_bytes(work: Path) -> int:
    """Size of a journal with the schema and nothing else, to take off dockd's."""
    from dockd.journal import Journal

    d = work / "fresh-journal"
    j = Journal.open(d / "journal.sqlite3", "bench-dock")
    j.close()
    n = sum(p.stat().st_size for p in d.iterdir() if p.name.startswith("journal.sqlite3"))
    shutil.rmtree(d)
    return n


def run_dockd(
    case: offload.Case, env: offload.Env, args: argparse.Namespace, profile: PySpy | None
) -> Result:
    base = env.work / f"dockd-{case.name}"
    (base / "store").mkdir(parents=True)
    dock = env.camera.dock_dir()
    spec = Spec(
        work=base,
        dock_dir=dock,
        cams=[Cam(case.camera, dock / case.camera, rename_from=env.camera.src(case))],
        # out of reach, so that no upload starts in the profile after safe_to_undock (the
        # upload is measured by upload.py; here the clock stops at safe_to_undock anyway)
        store={"kind": "filesystem", "path": str(base / "store-not-mounted")},
        can_drop=env.can_drop,
        devices=[d for d in env.devices if d],
        disk=env.disk,
        log_level=args.log_level,
        log_file=env.work / "dockd.log",
        setup=getattr(args, "setup", None),
        offload={
            **({"chunk_size": args.chunk_mib * MiB} if getattr(args, "chunk_mib", 0) else {}),
            **({"copy_workers": args.copy_workers} if getattr(args, "copy_workers", 0) else {}),
        },
    )
    try:
        out = run_daemon(spec, on_start=profile.start if profile else None)
    finally:
        if profile:
            profile.stop()
        docked = dock / case.camera
        if docked.exists():
            os.rename(docked, env.camera.src(case))
        offload.clean(base)
    if out["files_verified"] != len(case.files):
        raise RuntimeError(f"dockd verified {out['files_verified']} of {len(case.files)} files")
    meter = out["offload_meter"]
    d = meter["disk"].get(env.disk or "", {})
    cpu = out["offload_cpu_user_s"] + out["offload_cpu_sys_s"]
    res = Result(
        case.name,
        "dockd",
        "dockd: dock -> safe_to_undock (verified offload, journal)",
        out["offload_s"],
        case.nbytes,
        len(case.files),
        cpu,
        d.get("read_bytes"),
        d.get("write_bytes"),
        d.get("busy_ms"),
        meter["iowait_pct"],
    )
    j = out["offload_journal"]
    res.extra = {
        "journal_commits": j["commits"],
        "journal_busy_s": j["busy_s"],
        "journal_by_fn": j["by_fn"],
        "journal_write_bytes": j["write_bytes"],
        "journal_bytes_after": out["journal_bytes_after"],
        "lag": out["offload_lag"],
        "control_lag": out["control_lag"],
        "peak_rss": out["offload_peak_rss"],
        "walked_at": out["marks"][case.camera].get("state offloading"),
        "copy_wall_s": out["copy_wall_s"],
        "copy_thread_s": out["copy_thread_s"],
        "flush_wall_s": out["flush_wall_s"],
        "flush_calls": out["flush_calls"],
        "cpu_user_s": out["offload_cpu_user_s"],
        "cpu_sys_s": out["offload_cpu_sys_s"],
    }
    return res


def print_table(results: list[Result], env: offload.Env) -> None:
    print()
    hdr = (
        f"{'case':<6} {'method':<7} {'seconds':>8} {'MB/s':>8} {'files/s':>8} {'cpu%':>5} "
        f"{'diskR MiB':>9} {'diskW MiB':>9} {'busy%':>6} {'iowait%':>7}  what"
    )
    print(hdr)
    print("-" * (len(hdr) + 30))
    for r in results:
        busy = (
            f"{100 * r.disk_busy_ms / 1000 / r.seconds:.0f}" if r.disk_busy_ms is not None else "-"
        )
        iow = f"{r.iowait_pct:.0f}" if r.iowait_pct is not None else "-"
        print(
            f"{r.case:<6} {r.method:<7} {r.seconds:>8.2f} {r.mb_s:>8.1f} "
            f"{r.files / r.seconds:>8.0f} {100 * r.cpu_s / r.seconds:>5.0f} "
            f"{offload.fmt_mib(r.disk_read):>9} {offload.fmt_mib(r.disk_write):>9} {busy:>6} "
            f"{iow:>7}  {r.label}"
        )
    print(
        f"(cpu% = CPU seconds / wall, 100 = one core of {os.cpu_count()}; disk = "
        f"/dev/{env.disk or '?'}: the destination, and the camera image's backing file)"
    )


def ratios_for(case: str, by: dict[str, Result], fresh_journal: int) -> list[dict[str, Any]]:
    d = by.get("dockd")
    if d is None:
        return []
    rows = []
    unit, per = ("MB/s", lambda r: r.mb_s) if case == "big" else ("files/s", files_s)
    fig = lambda r: f"{per(r):.0f} {unit} ({r.seconds:.1f} s)"  # noqa: E731
    if "cp" in by:
        x = by["cp"].seconds / d.seconds
        rows.append(
            ratio_row(
                f"{case}.vs_cp",
                f"{case}: dockd vs cp+sync+sha256sum (speedup)",
                x,
                f">= {TARGET_VS_CP:g}x",
                x >= TARGET_VS_CP,
                fig(d),
                fig(by["cp"]),
            )
        )
    if "rclone" in by:
        x = by["rclone"].seconds / d.seconds
        rows.append(
            ratio_row(
                f"{case}.vs_rclone",
                f"{case}: dockd vs rclone copy --checksum + check --download (speedup)",
                x,
                f"> {TARGET_VS_RCLONE:g}x (ahead)",
                x > TARGET_VS_RCLONE,
                fig(d),
                fig(by["rclone"]),
            )
        )
    bounds = [by[m] for m in ("dd", "io") if m in by]
    if bounds:
        b = min(bounds, key=lambda r: r.seconds)
        x = d.seconds / b.seconds
        rows.append(
            ratio_row(
                f"{case}.vs_io_bound",
                f"{case}: dockd time / I/O bound time ({b.method}: read, write+fsync, "
                "direct read-back, no hashing)",
                x,
                f"<= {TARGET_VS_IO}",
                x <= TARGET_VS_IO,
                fig(d),
                fig(b),
            )
        )
    return rows


def files_s(r: Result) -> float:
    return r.files / r.seconds


def dockd_figures(case: offload.Case, d: Result, fresh_journal: int) -> dict[str, Any]:
    e = d.extra
    commits = e["journal_commits"]
    jbytes = max(0, e["journal_bytes_after"] - fresh_journal)
    n = len(case.files)
    return {
        "files": n,
        "seconds": d.seconds,
        "mb_s": d.mb_s,
        "files_s": n / d.seconds,
        "journal_commits": commits,
        "journal_commits_per_s": commits / d.seconds,
        "files_per_commit": n / commits if commits else None,
        "journal_bytes_per_file": jbytes / n,
        "journal_written_per_file": e["journal_write_bytes"] / n,
        "journal_written_mb_s": e["journal_write_bytes"] / d.seconds / 1e6,
        "journal_busy_s": e["journal_busy_s"],
        "walk_s": e["walked_at"],
        "copy_wall_s": e["copy_wall_s"],
        "copy_thread_s": e["copy_thread_s"],
        "flush_wall_s": e["flush_wall_s"],
        "cpu_s": d.cpu_s,
        "cpu_user_s": e["cpu_user_s"],
        "cpu_sys_s": e["cpu_sys_s"],
        "cpu_s_per_gb": d.cpu_s / (case.nbytes / 1e9),
        "lag_max_ms": e["lag"]["max_ms"],
        "lag_p99_ms": e["lag"]["p99_ms"],
        "control_lag_max_ms": e["control_lag"]["max_ms"],
        "control_lag_p99_ms": e["control_lag"]["p99_ms"],
        "peak_rss_mib": e["peak_rss"] / MiB if e["peak_rss"] else None,
        "journal_top_calls": sorted(
            ((k, v[0], v[1]) for k, v in e["journal_by_fn"].items()), key=lambda t: -t[2]
        )[:5],
    }


def print_dockd(case: str, f: dict[str, Any]) -> None:
    print(
        f"  dockd [{case}]: {f['files']} files in {f['seconds']:.2f} s = {f['files_s']:.0f} "
        f"files/s, {f['mb_s']:.0f} MB/s; CPU {f['cpu_s']:.1f} s ({f['cpu_user_s']:.1f} user + "
        f"{f['cpu_sys_s']:.1f} sys) = {f['cpu_s_per_gb']:.1f} CPU-s/GB; peak RSS "
        f"{f['peak_rss_mib']:.0f} MiB (with the harness's time-split spans, ~0.1 KiB a file; "
        "memory.py measures memory without them)"
    )
    fpc = f["files_per_commit"]
    print(
        f"    journal: {f['journal_commits']} write transactions = "
        f"{f['journal_commits_per_s']:.1f}/s ({fpc:.1f} files per transaction); "
        f"{f['journal_bytes_per_file']:.0f} bytes per file on disk, "
        f"{f['journal_written_per_file']:.0f} bytes written per file (WAL + checkpoints, "
        f"{f['journal_written_mb_s']:.1f} MB/s); journal thread busy "
        f"{f['journal_busy_s']:.2f} s ({100 * f['journal_busy_s'] / f['seconds']:.0f}% of wall)"
    )
    print(
        "    busiest journal calls: "
        + ", ".join(f"{k} {n}x {t:.2f}s" for k, n, t in f["journal_top_calls"])
    )
    print(
        f"    time: walked at {f['walk_s']:.2f} s; a copy_file in flight {f['copy_wall_s']:.2f} s "
        f"of the wall ({f['copy_thread_s']:.2f} thread-seconds in copy_file over the "
        f"{f['copy_thread_s'] / max(f['copy_wall_s'], 1e-9):.2f} copies in flight on average); "
        f"in journal flushes {f['flush_wall_s']:.2f} s; event loop lag max "
        f"{f['lag_max_ms']:.1f} ms, p99 {f['lag_p99_ms']:.1f} ms (control process: max "
        f"{f['control_lag_max_ms']:.1f}, p99 {f['control_lag_p99_ms']:.1f})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="size of each big file (256)")
    ap.add_argument("--files", type=int, default=4, help="number of big files (4)")
    ap.add_argument("--small-files", type=int, default=20000, help="number of small files")
    ap.add_argument("--small-min-kib", type=int, default=4)
    ap.add_argument("--small-max-kib", type=int, default=64)
    ap.add_argument("--cases", default="big,small")
    ap.add_argument("--only", default=",".join(METHODS), help=",".join(METHODS))
    ap.add_argument("--dd-small", action="store_true", help="also run dd on the small case")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--seed", type=int, default=20261124)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--profile", type=Path, default=None, help="py-spy the dockd runs into DIR")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--chunk-mib", type=int, default=0, help="what-if: offload.chunk_size")
    ap.add_argument("--copy-workers", type=int, default=0, help="what-if: offload.copy_workers")
    ap.add_argument(
        "--setup",
        default=None,
        help="what-if: FILE.py:FUNCTION run in the dockd child first (patch dockd there)",
    )
    args = ap.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    rclone = rclone_version()
    notes = []
    if "rclone" in only and rclone is None:
        only.remove("rclone")
        notes.append("rclone not installed (apt-get install -y rclone): baseline (b) skipped")
    root = is_root()
    work = make_workdir(args.dir, "dockd-files-")
    cases = make_cases(args)
    why_not = "" if root else "not root: no loop device"
    camera = offload.Camera(work, cases, want_loop=not why_not, why_not=why_not)
    gen = DataGen(args.seed)
    results: list[Result] = []
    t_all = time.perf_counter()
    try:
        t = time.perf_counter()

        def write_random(path: Path, size: int) -> None:
            gen.write(path, size)

        with patched(offload, write_random=write_random):
            camera.build()
        gen_s = time.perf_counter() - t
        disk = block_device_of(work)
        loop = Path(camera.loop_dev).name if camera.loop_dev else None
        env = offload.Env(work, camera, [disk, loop], disk, root, args.log_level)
        fresh = fresh_journal_bytes(work)
        print(f"files benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  {host_facts()}")
        print(f"work dir : {work} on /dev/{disk} ({fs_type(work)})")
        print(f"camera   : {camera.note}")
        print(
            "data     : "
            + "; ".join(f"{c.name}: {len(c.files)} files, {c.nbytes / MiB:.0f} MiB" for c in cases)
            + f" (generated + image built in {gen_s:.1f} s)"
        )
        print(f"rclone   : {rclone or 'not installed'}")
        print("cache    : dropped before every measured run" if root else "cache: NOT dropped")
        sys.stdout.flush()
        for case in cases:
            src = camera.src(case)
            for method in METHODS:
                if method == "batch" and case.name != "small":
                    continue
                if method not in only or (method == "dd" and case.name == "small"):
                    if method == "dd" and case.name == "small" and args.dd_small:
                        pass
                    else:
                        continue
                dst = work / f"dst-{method}-{case.name}"
                t = time.perf_counter()
                if method == "dd":
                    r = offload.run_dd(case, src, dst, env)
                elif method == "io":
                    r = offload.run_io(case, src, dst, env)
                elif method == "cp":
                    r = offload.run_cp(case, src, dst, env)
                elif method == "rclone":
                    r = run_rclone(case, src, dst, env)
                elif method == "batch":
                    r = run_batch(case, src, dst, env)
                else:
                    prof = None
                    if args.profile:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        prof = PySpy(args.profile / f"dockd-{case.name}.txt")
                    r = run_dockd(case, env, args, prof)
                    if prof:
                        r.extra["profile"] = prof.summary()
                results.append(r)
                print(
                    f"  {case.name:<6} {method:<7} {r.seconds:7.2f} s  "
                    f"({time.perf_counter() - t:.1f} s with setup)",
                    flush=True,
                )
        print_table(results, env)
        rows: list[dict[str, Any]] = []
        figures: dict[str, Any] = {}
        for case in cases:
            by = {r.method: r for r in results if r.case == case.name}
            rows += ratios_for(case.name, by, fresh)
            if "dockd" in by:
                figures[f"dockd_{case.name}"] = dockd_figures(case, by["dockd"], fresh)
            figures[f"methods_{case.name}"] = {
                m: {
                    "seconds": r.seconds,
                    "mb_s": r.mb_s,
                    "files_s": files_s(r),
                    "cpu_pct": 100 * r.cpu_s / r.seconds,
                }
                for m, r in by.items()
            }
        print()
        for row in rows:
            print(
                f"  {row['what']}: {row['value']:.2f} (target {row['target']}) -> "
                f"{verdict(row['met'])}   [dockd {row['dockd']}; baseline {row['baseline']}]"
            )
        for case in cases:
            f = figures.get(f"dockd_{case.name}")
            if f:
                print_dockd(case.name, f)
            d = next((r for r in results if r.case == case.name and r.method == "dockd"), None)
            if d is not None and "profile" in d.extra:
                print(f"  py-spy profile of the dockd run [{case.name}]:")
                print(d.extra["profile"]["text"])
        for n in notes:
            print(f"  note: {n}")
        if args.json_out:
            write_json(
                args.json_out,
                {
                    "bench": "files",
                    "seconds": time.perf_counter() - t_all,
                    "host": host_facts(),
                    "camera": camera.note,
                    "rclone": rclone,
                    "cases": [
                        {"name": c.name, "files": len(c.files), "bytes": c.nbytes} for c in cases
                    ],
                    "results": [
                        {k: v for k, v in r.__dict__.items() if k != "extra"}
                        | {"mb_s": r.mb_s, "files_s": files_s(r)}
                        for r in results
                    ],
                    "ratios": rows,
                    "figures": figures,
                    "profiles": {
                        r.case: r.extra["profile"] for r in results if "profile" in r.extra
                    },
                    "notes": notes,
                },
            )
    finally:
        camera.close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
