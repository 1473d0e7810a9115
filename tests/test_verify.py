"""`dockd verify` against a store the real daemon wrote.

The store is built once per module by running the daemon in-process: two cameras are docked
(renamed into the dock directory) and the test waits for both `session_uploaded` notices. Each
test works on its own copy of the store and journal, tampers with it the way someone with write
access would (stored objects are 0440; root writes them anyway), and checks what verify reports.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from dockd.config import parse_config
from dockd.custody import CustodyRecord, record_hash
from dockd.daemon import Daemon
from dockd.events import Notice
from dockd.evidence import keys
from dockd.journal import Journal, SessionState
from dockd.journal.db import Db
from dockd.store.filesystem import FilesystemStore
from dockd.verify import SessionReport, check_journal_chain, verify

DOCK_ID = "test-dock"
CAMERAS: dict[str, dict[str, int]] = {
    "CAM-A": {"DCIM/100CAM/0001.MP4": 300_000, "DCIM/100CAM/0002.MP4": 5_000, "MISC/V.TXT": 12},
    "CAM-B": {"DCIM/100CAM/0001.MP4": 70_000},
}


@dataclass(frozen=True)
class Built:
    store_root: Path
    journal_path: Path
    sessions: dict[str, str]  # camera -> session id
    content: dict[str, dict[str, bytes]]  # camera -> path -> bytes

    def manifest_key(self, camera: str) -> str:
        return keys.sidecar_key(camera, self.sessions[camera], keys.MANIFEST)

    def file_key(self, camera: str, path: str) -> str:
        return keys.file_key(camera, self.sessions[camera], path)

    def path(self, key: str) -> Path:
        return self.store_root / key

    def manifest(self, camera: str) -> dict[str, Any]:
        m: dict[str, Any] = json.loads(self.path(self.manifest_key(camera)).read_bytes())
        return m

    def write_manifest(self, camera: str, m: dict[str, Any]) -> None:
        self.path(self.manifest_key(camera)).write_text(json.dumps(m, indent=2))


async def _run_daemon(tmp: Path, content: dict[str, dict[str, bytes]]) -> dict[str, str]:
    dock = tmp / "dock"
    dock.mkdir()
    (tmp / "evidence").mkdir()
    cfg = parse_config(
        {
            "dock": {"id": DOCK_ID, "state_dir": str(tmp / "state")},
            "sources": {"directory": {"enabled": True, "path": str(dock)}},
            "store": {"kind": "filesystem", "path": str(tmp / "evidence")},
            "mqtt": {"enabled": False},
            "offload": {"min_free_staging": "1KiB"},
        }
    )
    for camera, files in content.items():
        for rel, data in files.items():
            p = tmp / "cameras" / camera / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)

    daemon = Daemon(cfg)
    sub = daemon.bus.subscribe("t")
    task = asyncio.create_task(daemon.run())
    uploaded: dict[str, str] = {}
    try:
        async with asyncio.timeout(60):
            await daemon.ready.wait()
            for camera in content:  # docking is a rename: the folder appears whole
                os.rename(tmp / "cameras" / camera, dock / camera)
            async for event in sub:
                if isinstance(event, Notice) and event.event == "session_uploaded":
                    assert event.camera is not None and event.session_id is not None
                    uploaded[event.camera] = event.session_id
                    if len(uploaded) == len(content):
                        break
    finally:
        daemon.stop()
        await task
    return uploaded


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("daemon")
    rng = random.Random(20261124)
    content = {
        cam: {rel: rng.randbytes(size) for rel, size in files.items()}
        for cam, files in CAMERAS.items()
    }
    sessions = asyncio.run(_run_daemon(tmp, content))
    assert set(sessions) == set(CAMERAS)
    return Built(tmp / "evidence", tmp / "state" / "journal.sqlite3", sessions, content)


@pytest.fixture
def built(pristine: Built, tmp_path: Path) -> Built:
    """This test's own copy of the store and journal (modes kept: objects stay 0440)."""
    shutil.copytree(pristine.store_root, tmp_path / "evidence")
    shutil.copytree(pristine.journal_path.parent, tmp_path / "state")
    return replace(
        pristine,
        store_root=tmp_path / "evidence",
        journal_path=tmp_path / "state" / pristine.journal_path.name,
    )


@pytest.fixture
def store(built: Built) -> FilesystemStore:
    return FilesystemStore(built.store_root)


@pytest.fixture
def journal(built: Built) -> Iterator[Db]:
    j = Db.open_readonly(built.journal_path, DOCK_ID)
    yield j
    j.close()


def reports(store: FilesystemStore, journal: Db | None = None) -> dict[str, SessionReport]:
    return {r.camera: r for r in verify(store, journal=journal)}


def reports_by_session(store: FilesystemStore, built: Built) -> dict[str, SessionReport]:
    """By camera, from the session id: a report that failed early has no camera."""
    by_id = {v: k for k, v in built.sessions.items()}
    return {by_id[r.session_id]: r for r in verify(store)}


def flip_byte(p: Path, offset: int) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def custody_lines(built: Built, camera: str) -> list[str]:
    key = keys.sidecar_key(camera, built.sessions[camera], keys.CUSTODY)
    return built.path(key).read_text().splitlines()


def rewrite_custody(built: Built, camera: str, lines: list[str], *, relist: bool) -> None:
    """Write custody.jsonl anew; with `relist`, also fix its size and SHA-256 in the manifest,
    as a forger who knows the format would."""
    key = keys.sidecar_key(camera, built.sessions[camera], keys.CUSTODY)
    body = "".join(line + "\n" for line in lines).encode()
    built.path(key).write_bytes(body)
    if relist:
        m = built.manifest(camera)
        (sc,) = [s for s in m["sidecars"] if s["name"] == keys.CUSTODY]
        sc["size"], sc["sha256"] = len(body), hashlib.sha256(body).hexdigest()
        built.write_manifest(camera, m)


# --- what the daemon wrote ---------------------------------------------------------------------


def test_verify_store_written_by_the_daemon_passes(built: Built, store: FilesystemStore) -> None:
    found = reports(store)

    assert set(found) == set(CAMERAS)
    for camera, files in built.content.items():
        r = found[camera]
        assert r.ok, r.problems
        assert r.session_id == built.sessions[camera]
        assert (r.files, r.bytes) == (len(files), sum(len(d) for d in files.values()))
        assert r.as_dict()["result"] == "ok"
        for rel, data in files.items():
            assert built.path(built.file_key(camera, rel)).read_bytes() == data


def test_verify_store_written_by_the_daemon_matches_its_journal(
    built: Built, store: FilesystemStore, journal: Db
) -> None:
    assert all(r.ok for r in reports(store, journal).values())
    assert check_journal_chain(journal) == []


def test_verify_daemon_manifest_lists_files_sidecars_and_the_custody_slice(
    built: Built,
) -> None:
    j = Journal.open(built.journal_path, DOCK_ID)
    try:
        for camera, files in built.content.items():
            sid = built.sessions[camera]
            m = built.manifest(camera)
            s = j.session(sid)
            assert s is not None and s.state == SessionState.UPLOADED
            assert (m["session_id"], m["dock_id"], m["camera"]["id"]) == (sid, DOCK_ID, camera)
            assert [(f["path"], f["status"]) for f in m["files"]] == [
                (p, "verified") for p in sorted(files)
            ]
            for f in m["files"]:
                data = files[f["path"]]
                assert f["size"] == len(data)
                assert f["sha256"] == hashlib.sha256(data).hexdigest()
                assert f["key"] == built.file_key(camera, f["path"])
            names = [sc["name"] for sc in m["sidecars"]]
            assert names[:2] == [keys.SUMS, keys.CUSTODY]  # then the ASC MHL history
            assert names[2].startswith(f"ascmhl/0001_{sid}_")
            assert names[3:] == ["ascmhl/ascmhl_chain.xml"]
            records = [r for r in j.custody_records(sid) if r.seq <= m["custody"]["last_seq"]]
            assert m["custody"] == {
                "first_seq": records[0].seq,
                "last_seq": s.custody_last_seq,
                "prev_hash": records[0].prev_hash,
                "head": records[-1].hash,
            }
            assert custody_lines(built, camera) == [r.to_json() for r in records]
            assert oct(built.path(built.manifest_key(camera)).stat().st_mode & 0o777) == "0o440"
    finally:
        j.close()


def test_verify_one_session_by_its_id(built: Built, store: FilesystemStore) -> None:
    (r,) = verify(store, [built.sessions["CAM-B"]])

    assert (r.camera, r.ok, r.files) == ("CAM-B", True, 1)


def test_verify_a_session_whose_manifest_is_absent_is_reported(
    built: Built, store: FilesystemStore
) -> None:
    built.path(built.manifest_key("CAM-B")).unlink()

    (r,) = verify(store, [built.sessions["CAM-B"]])
    assert not r.ok
    assert r.problems[0].startswith("manifest missing")
    # found from the store alone, a session without a manifest is not complete: not listed
    assert set(reports(store)) == {"CAM-A"}


# --- tampering ---------------------------------------------------------------------------------


def test_verify_flipped_byte_in_a_stored_file_names_its_key(
    built: Built, store: FilesystemStore
) -> None:
    key = built.file_key("CAM-A", "DCIM/100CAM/0002.MP4")
    flip_byte(built.path(key), 1234)

    found = reports(store)

    assert found["CAM-A"].problems == [f"{key}: content does not match its SHA-256 (altered)"]
    assert found["CAM-B"].ok


def test_verify_missing_object_is_named_missing(built: Built, store: FilesystemStore) -> None:
    key = built.file_key("CAM-A", "MISC/V.TXT")
    built.path(key).unlink()

    found = reports(store)

    assert found["CAM-A"].problems == [f"{key}: missing from the store"]
    assert found["CAM-B"].ok


def test_verify_truncated_object_names_its_size(built: Built, store: FilesystemStore) -> None:
    key = built.file_key("CAM-B", "DCIM/100CAM/0001.MP4")
    os.truncate(built.path(key), 69_999)

    assert reports(store)["CAM-B"].problems == [f"{key}: 69999 bytes, manifest says 70000"]


def test_verify_edited_custody_jsonl_line_is_a_custody_problem(
    built: Built, store: FilesystemStore
) -> None:
    lines = custody_lines(built, "CAM-A")
    n = next(i for i, line in enumerate(lines) if '"event":"file_verified"' in line)
    lines[n] = lines[n].replace('"method":"readback"', '"method":"none"')
    rewrite_custody(built, "CAM-A", lines, relist=False)
    key = keys.sidecar_key("CAM-A", built.sessions["CAM-A"], keys.CUSTODY)

    found = reports(store)

    # the line is 4 bytes shorter; and nothing claims custody.jsonl is not listed: it is
    size = built.path(key).stat().st_size
    assert found["CAM-A"].problems == [f"{key}: {size} bytes, manifest says {size + 4}"]
    assert found["CAM-B"].ok


def test_verify_edited_custody_jsonl_of_the_same_size_is_altered(
    built: Built, store: FilesystemStore
) -> None:
    lines = custody_lines(built, "CAM-A")
    n = next(i for i, line in enumerate(lines) if '"event":"file_verified"' in line)
    lines[n] = lines[n].replace('"method":"readback"', '"method":"readbacK"')
    rewrite_custody(built, "CAM-A", lines, relist=False)
    key = keys.sidecar_key("CAM-A", built.sessions["CAM-A"], keys.CUSTODY)

    assert reports(store)["CAM-A"].problems == [
        f"{key}: content does not match its SHA-256 (altered)"
    ]


def test_verify_custody_jsonl_deleted_from_the_store_is_named_missing(
    built: Built, store: FilesystemStore
) -> None:
    key = keys.sidecar_key("CAM-B", built.sessions["CAM-B"], keys.CUSTODY)
    built.path(key).unlink()

    assert reports(store)["CAM-B"].problems == [f"{key}: missing from the store"]


def test_verify_manifest_not_listing_custody_jsonl_is_reported(
    built: Built, store: FilesystemStore
) -> None:
    m = built.manifest("CAM-B")
    m["sidecars"] = [sc for sc in m["sidecars"] if sc["name"] != keys.CUSTODY]
    built.write_manifest("CAM-B", m)

    assert reports(store)["CAM-B"].problems == [
        "custody.jsonl is not among the manifest's sidecars"
    ]


def test_verify_edited_custody_jsonl_relisted_in_the_manifest_names_the_record(
    built: Built, store: FilesystemStore
) -> None:
    lines = custody_lines(built, "CAM-A")
    n = next(i for i, line in enumerate(lines) if '"event":"file_verified"' in line)
    seq = CustodyRecord.from_json(lines[n]).seq
    lines[n] = lines[n].replace('"method":"readback"', '"method":"none"')
    rewrite_custody(built, "CAM-A", lines, relist=True)

    assert reports(store)["CAM-A"].problems == [
        f"custody: custody record {seq} was altered: its hash does not match"
    ]


def test_verify_custody_record_removed_from_jsonl_breaks_the_slice(
    built: Built, store: FilesystemStore
) -> None:
    lines = custody_lines(built, "CAM-B")
    after = CustodyRecord.from_json(lines[2]).seq
    del lines[1]
    rewrite_custody(built, "CAM-B", lines, relist=True)

    assert reports(store)["CAM-B"].problems == [
        f"custody: custody record {after} does not link to the session's previous record"
    ]


def test_verify_forgery_consistent_within_the_store_is_caught_by_the_journal(
    built: Built, store: FilesystemStore, journal: Db
) -> None:
    """Rewrite the session's last record with its hash recomputed and the manifest's head
    moved to match: the store alone cannot tell (no signature here), this dock's journal can."""
    lines = custody_lines(built, "CAM-B")
    last = CustodyRecord.from_json(lines[-1])
    forged = replace(last, at="2020-01-01T00:00:00.000000Z")
    body = {k: v for k, v in json.loads(forged.to_json()).items() if k != "hash"}
    forged = replace(forged, hash=record_hash(**body))
    lines[-1] = forged.to_json()
    rewrite_custody(built, "CAM-B", lines, relist=True)
    m = built.manifest("CAM-B")
    m["custody"]["head"] = forged.hash
    built.write_manifest("CAM-B", m)

    assert reports(store)["CAM-B"].ok
    with_journal = reports(store, journal)
    assert sorted(with_journal["CAM-B"].problems) == [
        "custody: the store's records differ from this dock's journal",
        "manifest differs from the one this dock wrote (journal)",
    ]
    assert with_journal["CAM-A"].ok


def test_verify_manifest_custody_summary_altered_is_a_custody_problem(
    built: Built, store: FilesystemStore
) -> None:
    m = built.manifest("CAM-A")
    m["custody"]["last_seq"] += 1
    built.write_manifest("CAM-A", m)

    (problem,) = reports(store)["CAM-A"].problems
    assert problem.startswith(
        f"custody: session {built.sessions['CAM-A']}: custody records do not match the manifest"
    )


def test_verify_record_edited_in_the_journal_is_reported_by_the_journal_chain_check(
    built: Built, store: FilesystemStore
) -> None:
    conn = sqlite3.connect(built.journal_path)
    try:
        conn.execute("DROP TRIGGER custody_no_update")
        (seq,) = conn.execute(
            "SELECT min(seq) FROM custody WHERE event = 'file_verified'"
        ).fetchone()
        conn.execute(
            "UPDATE custody SET details = json_set(details, '$.method', 'none') WHERE seq = ?",
            (seq,),
        )
        conn.commit()
    finally:
        conn.close()
    journal = Db.open_readonly(built.journal_path, DOCK_ID)
    try:
        assert check_journal_chain(journal) == [
            f"journal custody chain: custody record {seq} was altered: its hash does not match"
        ]
        # the store is untouched and still checks
        assert all(r.ok for r in reports(store).values())
    finally:
        journal.close()


def test_verify_manifest_with_a_files_size_altered_reports_it(
    built: Built, store: FilesystemStore
) -> None:
    m = built.manifest("CAM-A")
    entry = m["files"][0]
    entry["size"] += 1
    built.write_manifest("CAM-A", m)

    found = reports(store)

    assert found["CAM-A"].problems == [
        f"{entry['key']}: {entry['size'] - 1} bytes, manifest says {entry['size']}"
    ]
    assert found["CAM-A"].bytes == sum(len(d) for d in built.content["CAM-A"].values()) + 1
    assert found["CAM-B"].ok


def test_verify_manifest_with_a_files_sha256_altered_reports_it_and_the_sums_mismatch(
    built: Built, store: FilesystemStore
) -> None:
    m = built.manifest("CAM-A")
    entry = m["files"][1]
    entry["sha256"] = "0" * 64
    built.write_manifest("CAM-A", m)

    assert reports(store)["CAM-A"].problems == [
        f"{entry['key']}: content does not match its SHA-256 (altered)",
        "SHA256SUMS does not list exactly the manifest's files",
    ]


def test_verify_manifest_dropping_a_file_is_caught_by_sha256sums(
    built: Built, store: FilesystemStore
) -> None:
    m = built.manifest("CAM-A")
    del m["files"][0]
    built.write_manifest("CAM-A", m)

    assert reports(store)["CAM-A"].problems == [
        "SHA256SUMS does not list exactly the manifest's files"
    ]


def test_verify_manifest_that_is_not_json_is_reported(built: Built, store: FilesystemStore) -> None:
    built.path(built.manifest_key("CAM-B")).write_bytes(b'{"format": "dockd.manifest/1",')

    (problem,) = reports_by_session(store, built)["CAM-B"].problems
    assert problem.startswith("manifest is not JSON")


def test_verify_manifest_of_another_format_is_reported(
    built: Built, store: FilesystemStore
) -> None:
    m = built.manifest("CAM-B")
    m["format"] = "dockd.manifest/2"
    built.write_manifest("CAM-B", m)

    assert reports_by_session(store, built)["CAM-B"].problems == [
        "manifest format 'dockd.manifest/2', expected 'dockd.manifest/1'"
    ]


@pytest.mark.parametrize(
    ("what", "alter"),
    [
        ("no camera", lambda m: m.pop("camera")),
        ("no files", lambda m: m.pop("files")),
        ("a file without its key", lambda m: m["files"][0].pop("key")),
        ("a size that is text", lambda m: m["files"][0].update(size="70000")),
        ("sidecars that are not a list of tables", lambda m: m.update(sidecars=["x"])),
    ],
)
def test_verify_malformed_manifest_is_reported_not_a_crash(
    built: Built, store: FilesystemStore, what: str, alter: Any
) -> None:
    m = built.manifest("CAM-B")
    alter(m)
    built.write_manifest("CAM-B", m)

    found = reports_by_session(store, built)

    (problem,) = found["CAM-B"].problems
    assert problem.startswith("manifest is malformed"), what
    assert found["CAM-A"].ok  # the other sessions are still checked


def test_verify_manifest_that_is_a_json_list_is_reported_not_a_crash(
    built: Built, store: FilesystemStore
) -> None:
    built.path(built.manifest_key("CAM-B")).write_bytes(b"[]")

    (problem,) = reports_by_session(store, built)["CAM-B"].problems
    assert problem.startswith("manifest is malformed")
