"""Whole-daemon scenarios of the evidence store being away: read-only, full, missing; and the
upload queue's order with `dockd prioritize` while it waits."""

from __future__ import annotations

from typing import Any

from conftest import (
    Site,
    TmpfsStore,
    assert_each_file_once_in_store,
    assert_store_and_custody_ok,
)

KIB = 1024
MIB = 1024 * KIB


def _queued(st: dict[str, Any]) -> list[dict[str, Any]]:
    """The sessions of `dockd status --json` still waiting for upload, in its order."""
    return [s for s in st["sessions"] if s["state"] not in ("uploaded", "cleared", "empty")]


def test_store_read_only_then_writable_again_resumes_upload(
    site: Site, tmpfs_store: TmpfsStore
) -> None:
    tmpfs_store.remount("ro")
    cam = site.camera(
        "X6STORE01",
        {"DCIM/0001.MP4": 1 * MIB, "DCIM/0002.MP4": 300 * KIB, "DCIM/sub/0003.MP4": 10 * KIB},
        seed=90,
    )
    proc = site.start()
    cam.dock()
    sid = proc.wait_for("safe_to_undock")["session_id"]
    err = proc.wait_for("store_unreachable")
    assert err["level"] == "warning" and err["error"]

    st = site.wait_status(lambda st: st["daemon"].get("store_reachable") is False)
    assert any("store" in p for p in st["problems"]), st["problems"]
    assert [s["id"] for s in _queued(st)] == [sid]
    assert st["queue"]["sessions"] == 1 and st["queue"]["files"] == 3
    assert st["queue"]["bytes"] == sum(len(d) for d in cam.files.values())
    assert list(site.evidence.iterdir()) == []  # nothing got into a read-only store
    assert site.session_state(sid) == "offloaded"
    assert set(site.file_states(sid).values()) == {"verified"}  # kept in staging meanwhile

    tmpfs_store.remount("rw")
    proc.wait_for("session_uploaded", lambda e: e.get("session_id") == sid)
    st = site.wait_status(lambda st: st["daemon"].get("store_reachable") is True)
    assert st["problems"] == []
    assert st["queue"]["sessions"] == 0
    assert_each_file_once_in_store(site, cam)
    assert_store_and_custody_ok(site, [sid])


def test_store_full_then_grown_resumes_upload(site: Site, tmpfs_store: TmpfsStore) -> None:
    tmpfs_store.remount("size=1m")
    cam = site.camera(
        "X6STORE02",
        {"DCIM/0001.MP4": 100 * KIB, "DCIM/0002.MP4": 2 * MIB, "DCIM/0003.MP4": 200 * KIB},
        seed=91,
    )
    proc = site.start()
    cam.dock()
    sid = proc.wait_for("safe_to_undock")["session_id"]
    proc.wait_for("store_unreachable", lambda e: "0002.MP4" in e["error"])
    # a write that ran out of space left nothing under its key, nor in .incoming
    assert not (site.evidence / cam.name / sid / "files/DCIM/0002.MP4").exists()
    assert not (site.evidence / cam.name / sid / "manifest.json").exists()
    assert site.session_state(sid) == "offloaded"

    tmpfs_store.remount("size=32m")
    proc.wait_for("session_uploaded", lambda e: e.get("session_id") == sid)
    assert_each_file_once_in_store(site, cam)
    assert_store_and_custody_ok(site, [sid])


def test_prioritize_puts_session_first_and_status_shows_it(site: Site) -> None:
    site.configure(upload={"concurrency": 1})  # one upload at a time: the order is observable
    first = site.camera("X6PRIO00A", {"DCIM/0001.MP4": 300 * KIB, "DCIM/0002.MP4": 100 * KIB},
                        seed=80)  # fmt: skip
    second = site.camera("X6PRIO00B", {"DCIM/0001.MP4": 200 * KIB, "DCIM/0002.MP4": 1}, seed=81)
    away = site.base / "evidence.away"
    site.evidence.rename(away)  # the store is away (a NAS not mounted)
    proc = site.start()
    first.dock()
    sa = proc.wait_for("safe_to_undock", lambda e: e.get("camera") == first.name)["session_id"]
    second.dock()
    sb = proc.wait_for("safe_to_undock", lambda e: e.get("camera") == second.name)["session_id"]
    proc.wait_for("store_unreachable")

    st = site.status()
    assert [(s["id"], s["prioritized"]) for s in _queued(st)] == [(sa, False), (sb, False)]

    r = site.cli("prioritize", "-c", str(site.config), sb)
    assert r.returncode == 0, r.stderr
    assert sb in r.stdout
    st = site.status()
    assert [(s["id"], s["prioritized"]) for s in _queued(st)] == [(sb, True), (sa, False)]
    r = site.cli("prioritize", "-c", str(site.config), "20260101T000000Z-X6NOPE-abcd")
    assert r.returncode == 1
    assert "unknown" in r.stderr
    assert [r["event"] for r in site.custody_rows(sb)].count("prioritized") == 1

    away.rename(site.evidence)
    for sid in (sa, sb):
        proc.wait_for("session_uploaded", lambda e, sid=sid: e.get("session_id") == sid)

    def seqs(sid: str, event: str) -> list[int]:
        return [r["seq"] for r in site.custody_rows(sid) if r["event"] == event]

    # the prioritized session went in whole, manifest included, before the other one's rest
    # (the other's first file was already in hand, retrying, when it was prioritized)
    assert seqs(sb, "uploaded")[0] < seqs(sa, "uploaded")[0]
    assert max(seqs(sb, "file_stored")) < max(seqs(sa, "file_stored"))
    assert len(seqs(sa, "file_stored")) == 2 and len(seqs(sb, "file_stored")) == 2

    # an uploaded session cannot be prioritized
    r = site.cli("prioritize", "-c", str(site.config), sa)
    assert r.returncode == 1, r.stdout
    for cam in (first, second):
        assert_each_file_once_in_store(site, cam)
    assert_store_and_custody_ok(site, [sa, sb])
