"""SIGHUP to a `dockd run` process (what `systemctl reload dockd` sends): a changed
`upload.concurrency` is applied live, a broken file is refused while the running configuration
keeps working, and what needs a restart is said in the log."""

from __future__ import annotations

import signal
from collections.abc import Callable

from systemd_support import Dock, DockdProcess


def test_sighup_applies_upload_concurrency_and_refuses_a_broken_config(
    dock: Dock, start_dockd: Callable[..., DockdProcess]
) -> None:
    dock.configure(concurrency=1)
    d = start_dockd(dock.config_file)
    d.wait_log("daemon_ready")

    mark = d.mark()
    dock.configure(concurrency=4)
    d.signal(signal.SIGHUP)
    reloaded = d.wait_log("config_reloaded", after=mark)
    assert reloaded["applied"] == ["upload"]
    assert reloaded["needs_restart"] == []
    resized = d.wait_log("upload_workers_resized", after=mark)
    assert (resized["was"], resized["workers"]) == (1, 4)

    mark = d.mark()
    dock.configure(concurrency=4, broken=True)
    d.signal(signal.SIGHUP)
    refused = d.wait_log("reload_refused", after=mark)
    assert "not valid TOML" in refused["error"]
    assert refused["level"] == "error"

    # the running configuration (4 workers) was kept: the same file again changes nothing
    mark = d.mark()
    dock.configure(concurrency=4, extra='[metrics]\nlisten = "127.0.0.1:9999"\n')
    d.signal(signal.SIGHUP)
    again = d.wait_log("config_reloaded", after=mark)
    assert again["applied"] == []
    assert again["needs_restart"] == ["metrics"]

    # and the daemon still works: a camera docked now ends in the store
    mark = d.mark()
    files = dock.camera("X6AFTERHUP", {"DCIM/0001.MP4": 120_000, "DCIM/0002.MP4": 3_000})
    dock.dock_camera("X6AFTERHUP")
    done = d.wait_log("session_uploaded", lambda e: e.get("camera") == "X6AFTERHUP", after=mark)
    stored = dock.evidence / "X6AFTERHUP" / done["session_id"] / "files"
    assert {p: (stored / p).read_bytes() for p in files} == files
    assert (dock.evidence / done["manifest"]).is_file()
    assert d.proc.poll() is None

    d.signal(signal.SIGTERM)
    assert d.proc.wait(60) == 0
