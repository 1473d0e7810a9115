"""`dockd demo`: the whole job on embedded defaults, in a temporary directory.

Three synthetic cameras with real files (footage of varied sizes, a GPS sidecar, a symlink and a
FIFO that must be skipped) are docked one after another through the directory source, offloaded
and verified into staging, uploaded to a filesystem store, and checked again with `verify` —
the same code `dockd run` uses, with live progress bars fed from the event bus.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from dockd.config import Config, parse_config
from dockd.daemon import Daemon
from dockd.events import CameraStatus, EventBus, Notice
from dockd.events import Progress as ProgressEvent
from dockd.evidence.signing import load, trusted_keys
from dockd.journal import Journal
from dockd.observers.log import setup as setup_logging
from dockd.store import build_store
from dockd.units import format_size
from dockd.verify import check_journal_chain, verify

CAMERAS = {
    "X6039B2A3": [24, 9, 3, 1],  # MiB of each clip
    "X6039B2B7": [16, 12, 2],
    "X60A11F07": [30, 6, 4, 2, 1],
}
TIMEOUT_S = 120


def make_camera(root: Path, serial: str, clip_mib: list[int], rng: random.Random) -> None:
    """A camera as body-worn cameras lay it out: DCIM clips, GPS sidecars, some clutter."""
    dcim = root / "DCIM" / "100BWC"
    dcim.mkdir(parents=True)
    for n, mib in enumerate(clip_mib, start=1):
        (dcim / f"{serial[-4:]}{n:04d}.MP4").write_bytes(rng.randbytes(mib * 1024 * 1024))
        track = {"clip": n, "fixes": [[51.5 + rng.random() / 100, -0.12] for _ in range(20)]}
        (dcim / f"{serial[-4:]}{n:04d}.GPS.json").write_text(json.dumps(track))
    (root / "LOG").mkdir()
    (root / "LOG" / "device.log").write_text(f"serial={serial}\nfirmware=4.2.1\n")
    (root / ".Trashes").mkdir()  # excluded by the default `.*` pattern
    (root / ".Trashes" / "junk").write_bytes(b"x")
    (root / "LATEST.MP4").symlink_to(f"DCIM/100BWC/{serial[-4:]}0001.MP4")  # never followed
    os.mkfifo(root / "pipe")  # never opened


def demo_config(base: Path) -> Config:
    return parse_config(
        {
            "dock": {"id": "demo-dock", "state_dir": str(base / "state")},
            "sources": {"directory": {"enabled": True, "path": str(base / "dock")}},
            "offload": {"chunk_size": "1MiB", "min_free_staging": "16MiB", "parallel_cameras": 2},
            "store": {"kind": "filesystem", "path": str(base / "evidence")},
            "upload": {"concurrency": 2, "backoff_initial": "200ms", "backoff_max": "2s"},
            "cameras": {"X6039B2A3": {"officer": "badge-1234"}},
            "mqtt": {"enabled": False},
            "log": {"level": "warning"},
        },
        origin="demo",
    )


async def _drive(config: Config, base: Path, console: Console) -> None:
    bus = EventBus()
    daemon = Daemon(config, bus=bus)
    sub = bus.subscribe("demo", maxsize=10_000)
    task = asyncio.create_task(daemon.run(), name="daemon")
    await daemon.ready.wait()
    bars: dict[str, TaskID] = {}
    uploaded: set[str] = set()
    columns = (
        TextColumn("{task.fields[camera]:<10}"),
        TextColumn("{task.fields[phase]:<10}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:

        async def dock_all() -> None:
            for serial in CAMERAS:
                # a camera appears atomically: built aside, renamed into the dock
                os.rename(base / "incoming" / serial, base / "dock" / serial)
                await asyncio.sleep(0.5)

        docking = asyncio.create_task(dock_all())
        async with asyncio.timeout(TIMEOUT_S):
            async for event in sub:
                if isinstance(event, CameraStatus | ProgressEvent):
                    cam = event.camera
                    if cam not in bars:
                        bars[cam] = progress.add_task("", camera=cam, phase="docked", total=None)
                    phase = event.state if isinstance(event, CameraStatus) else event.phase
                    total = event.bytes_total or None
                    progress.update(bars[cam], phase=phase, total=total, completed=event.bytes_done)
                elif isinstance(event, Notice) and event.event == "session_uploaded":
                    uploaded.add(event.camera or "")
                    if event.camera in bars:
                        done = progress.tasks[bars[event.camera]].total
                        progress.update(bars[event.camera], phase="uploaded", completed=done)
                    if uploaded >= set(CAMERAS):
                        break
                elif isinstance(event, Notice) and event.event in ("upload_failed",):
                    raise RuntimeError(f"upload failed: {event.details}")
        await docking
    daemon.stop()
    await task


def _summary(config: Config, console: Console) -> bool:
    journal = Journal.open(config.journal_path, config.dock.id)
    try:
        st = journal.dock_status()
        table = Table(title="dockd status")
        for col in ("session", "camera", "state", "files", "size", "stored", "skipped"):
            table.add_column(col, no_wrap=True)
        for s in st.sessions:
            skipped = len(journal.session_skipped(s["id"]))
            table.add_row(
                s["id"],
                s["camera"],
                s["state"],
                str(s["files"]),
                format_size(s["bytes"]),
                str(s["stored"] or 0),
                str(skipped),
            )
        console.print(table)
        store = build_store(config)
        problems = check_journal_chain(journal)
        trusted = trusted_keys(None, load(config.key_file, config.dock.id))
        reports = list(verify(store, (), journal, trusted))
    finally:
        journal.close()
    for r in reports:
        mark = "[green]ok[/]" if r.ok else "[red]FAILED[/]"
        console.print(
            f"verify {mark} {r.session_id}: {r.files} files, {format_size(r.bytes)}, "
            f"signature {r.signature}, custody chain {r.chain}"
        )
        for p in r.problems:
            console.print(f"   {p}")
    for p in problems:
        console.print(f"[red]{p}[/]")
    return not problems and len(reports) == len(CAMERAS) and all(r.ok for r in reports)


def run_demo(keep: bool = False) -> int:
    console = Console(width=max(Console().width, 110))  # session ids are long
    base = Path(tempfile.mkdtemp(prefix="dockd-demo-"))
    try:
        setup_logging("warning")
        rng = random.Random(20261124)
        (base / "dock").mkdir()
        (base / "evidence").mkdir()
        for serial, clips in CAMERAS.items():
            make_camera(base / "incoming" / serial, serial, clips, rng)
        config = demo_config(base)
        console.print(
            f"[bold]dockd demo[/] in {base}: {len(CAMERAS)} cameras, store {config.store.path}"
        )
        asyncio.run(_drive(config, base, console))
        ok = _summary(config, console)
        console.print(
            "[bold green]demo complete: every file verified in the store[/]"
            if ok
            else "[bold red]demo found problems[/]"
        )
        if keep:
            console.print(f"kept: {base}")
        return 0 if ok else 1
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
