"""The Prometheus endpoint of `[metrics]`: scraped over HTTP from a `dockd run` process, its
numbers are the journal's numbers; the counters' incremental reading of the custody chain agrees
with a full recount; a listen address in use never stops the daemon."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from systemd_support import Dock, DockdProcess, free_port

from dockd.ids import CameraId, SessionId
from dockd.journal import FileRow, FileState, Journal
from dockd.journal.status import EvidenceTotals
from dockd.offload.walk import Found


def scrape(listen: str) -> dict[str, float]:
    """Every sample as `name{label="v"}` -> value."""
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_scraped_metrics_match_the_journal_after_a_session_uploads(
    dock: Dock, start_dockd: Callable[..., DockdProcess]
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    dock.configure(extra=f'[metrics]\nenabled = true\nlisten = "{listen}"\n')
    d = start_dockd(dock.config_file)
    d.wait_log("daemon_ready")
    d.wait_log("metrics_listening")

    before = scrape(listen)  # the counters' snapshot: nothing offloaded yet
    assert before["dockd_offloaded_files_total"] == 0
    assert before["dockd_metrics_journal_ok"] == 1
    assert before['dockd_build_info{version="0.1.0"}'] == 1

    files = dock.camera(
        "X6METRICS",
        {"DCIM/0001.MP4": 300_000, "DCIM/0002.MP4": 70_000, "DCIM/100/0003.MP4": 5},
    )
    dock.dock_camera("X6METRICS")
    d.wait_log("session_uploaded", lambda e: e["camera"] == "X6METRICS")
    # the dock summary after the upload (queue empty) is what the daemon-side gauges show
    d.wait_log("dock_status", lambda e: e["queue_sessions"] == 0 and e["store_reachable"])

    m = scrape(listen)
    ((off_n, off_b),) = dock.query(
        "SELECT count(*), sum(size) FROM files WHERE state IN ('verified', 'stored', 'cleared')"
    )
    ((up_n, up_b),) = dock.query(
        "SELECT count(*), sum(size) FROM files WHERE state IN ('stored', 'cleared')"
    )
    ((sessions,),) = dock.query("SELECT count(*) FROM sessions WHERE state = 'uploaded'")
    ((custody,),) = dock.query("SELECT count(*) FROM custody")
    assert (off_n, off_b) == (up_n, up_b) == (3, sum(len(v) for v in files.values()))
    assert m["dockd_offloaded_files_total"] == off_n
    assert m["dockd_offloaded_bytes_total"] == off_b
    assert m["dockd_uploaded_files_total"] == up_n
    assert m["dockd_uploaded_bytes_total"] == up_b
    assert m["dockd_sessions_uploaded_total"] == sessions == 1
    for kind in ("file_failed", "file_unstable", "upload_failed"):
        assert m[f'dockd_failures_total{{kind="{kind}"}}'] == 0
    for gauge in ("sessions", "files", "bytes", "failed_sessions", "oldest_age_seconds"):
        assert m[f"dockd_queue_{gauge}"] == 0
    assert m["dockd_custody_records"] == custody
    assert m["dockd_cameras_docked"] == 1
    assert m["dockd_store_reachable"] == 1
    assert m['dockd_state{state="idle"}'] == 1 and m['dockd_state{state="degraded"}'] == 0
    assert m["dockd_problems"] == 0
    assert m["dockd_staging_free_bytes"] > 0
    assert m["process_resident_memory_bytes"] > 0


def _journal_with_every_kind_of_outcome(path: Path) -> Journal:
    j = Journal.open(path, "dock")
    cam = CameraId("X6TOTALS")

    def session(names: dict[str, int]) -> tuple[SessionId, dict[str, FileRow]]:
        s, _ = j.open_session(cam, None, None, None, "/cam")
        j.record_found(s, [Found(n.encode(), n, None, size, 1) for n, size in names.items()])
        return s.id, {f.path: f for f in j.session_files(s.id)}

    # a session uploaded, with a file that failed and one that kept changing
    sid, f = session({"a": 10, "b": 20, "c": 30, "d": 40})
    j.files_verified([(f["a"], "0" * 64, "t"), (f["b"], "1" * 64, "t")])
    j.file_given_up(f["c"], FileState.FAILED, "EIO")
    j.file_given_up(f["d"], FileState.UNSTABLE, "kept changing")
    j.finish_offload(sid, False)
    for name in ("a", "b"):
        row = {r.path: r for r in j.session_files(sid)}[name]
        j.file_stored(row, f"k/{name}", row.sha256 or "", "readback")
    j.seal(sid)
    j.session_uploaded(sid, "k/manifest.json", "2" * 64)
    # a session whose upload failed (a store conflict), one file verified, not stored
    sid2, f2 = session({"e": 50})
    j.files_verified([(f2["e"], "3" * 64, "t")])
    j.finish_offload(sid2, False)
    j.session_upload_failed(sid2, "conflict")
    return j


def test_counters_moved_on_by_the_custody_chain_equal_a_full_recount(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    Journal.open(path, "dock").close()
    ro = Journal.open_readonly(path, "dock")
    start = ro.evidence_totals()
    assert start == EvidenceTotals(seq=0)

    _journal_with_every_kind_of_outcome(path).close()

    moved = ro.evidence_since(start)
    assert moved == ro.evidence_totals()
    assert moved == EvidenceTotals(
        seq=ro.custody_count(),
        offloaded_files=3,
        offloaded_bytes=10 + 20 + 50,
        uploaded_files=2,
        uploaded_bytes=10 + 20,
        sessions_uploaded=1,
        files_failed=1,
        files_unstable=1,
        uploads_failed=1,
    )
    assert ro.evidence_since(moved) == moved  # nothing new: nothing changes
    ro.close()


def test_a_metrics_port_in_use_is_logged_and_the_daemon_works_on(
    dock: Dock, start_dockd: Callable[..., DockdProcess]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        dock.configure(extra=f'[metrics]\nenabled = true\nlisten = "{listen}"\n')
        d = start_dockd(dock.config_file)
        failed = d.wait_log("metrics_listen_failed")
        assert failed["listen"] == listen and failed["level"] == "error"
        d.wait_log("daemon_ready")
        dock.camera("X6NOMETRICS", {"DCIM/0001.MP4": 1_000})
        dock.dock_camera("X6NOMETRICS")
        d.wait_log("session_uploaded", lambda e: e["camera"] == "X6NOMETRICS")
