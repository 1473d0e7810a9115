"""A session folder is evidence anyone can check without dockd (issue 9, "Must show").

The store is built once per module by the real daemon, in-process: two cameras (one with a
nested folder, an empty file and a name that is not UTF-8) are docked by renaming them into the
dock directory, and the test waits for both `session_uploaded` notices. Then, as a custodian
would, each test copies a session folder (or the whole store) somewhere else and checks it with
tools nobody here wrote — `sha256sum -c`, the ASC MHL reference implementation's verify and XSD
check — and with `dockd verify` run from a configuration that has the store and the dock's public
key only: no journal.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import seal_reference
from mhl_reference import reference_verify, xsd_check

from dockd import __version__
from dockd.cli import main as dockd_main
from dockd.config import parse_config
from dockd.daemon import Daemon
from dockd.events import Notice
from dockd.evidence import keys, mhl, seal
from dockd.evidence.manifest import SIGNATURE
from dockd.evidence.signing import check_signature, load, parse_public_line, trusted_keys
from dockd.ids import rfc3339_from_ns
from dockd.journal import Journal

hashlist_xml_parser = pytest.importorskip("ascmhl.hashlist_xml_parser")

DOCK_ID = "station9-dock-t"
BASE_MTIME_NS = 1_795_510_931_000_000_000  # 2026-11-24T09:02:11Z: the camera's clock
NOT_UTF8 = b"DCIM/caf\xe9/cl\xffip.MP4"
NOT_UTF8_STORED = "DCIM/caf%E9/cl%FFip.MP4"  # the stored path percent-encodes the bad bytes
CAMERAS: dict[str, dict[bytes, int]] = {
    "CAM-A": {
        b"DCIM/100CAM/0001.MP4": 200_000,
        b"DCIM/100CAM/EMPTY.MP4": 0,
        b"DCIM/101CAM/night/ir/0002.MP4": 3_000,
        NOT_UTF8: 1_234,
        b"MISC/VERSION.TXT": 12,
    },
    "CAM-B": {b"DCIM/100CAM/0001.MP4": 50_000},
}
MHL_NS = "{urn:ASC:MHL:v2.0}"


@dataclass(frozen=True)
class Built:
    root: Path  # the daemon's directory: state/, evidence/, dockd.toml
    sessions: dict[str, str]  # camera -> session id
    content: dict[str, dict[str, bytes]]  # camera -> stored path -> bytes

    @property
    def store(self) -> Path:
        return self.root / "evidence"

    @property
    def config(self) -> Path:
        return self.root / "dockd.toml"

    def folder(self, camera: str) -> Path:
        return self.store / keys.session_prefix(camera, self.sessions[camera])

    def manifest(self, camera: str) -> dict[str, Any]:
        m: dict[str, Any] = json.loads((self.folder(camera) / keys.MANIFEST).read_bytes())
        return m


def _toml(d: dict[str, dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        return json.dumps(v) if isinstance(v, str | bool | int) else str(v)

    out = []
    for section, entries in d.items():
        out.append(f"[{section}]")
        out += [f"{k} = {value(v)}" for k, v in entries.items()]
    return "\n".join(out) + "\n"


def _config(root: Path, store: Path, trusted: Path | None = None) -> dict[str, dict[str, Any]]:
    (root / "dock").mkdir(parents=True, exist_ok=True)
    cfg: dict[str, dict[str, Any]] = {
        "dock": {"id": DOCK_ID, "state_dir": str(root / "state")},
        "sources.directory": {"enabled": True, "path": str(root / "dock")},
        "store": {"kind": "filesystem", "path": str(store)},
        "mqtt": {"enabled": False},
        "offload": {"min_free_staging": "1KiB"},
    }
    if trusted is not None:
        cfg["signing"] = {"trusted_keys_dir": str(trusted)}
    return cfg


def _make_cameras(root: Path, cameras: dict[str, dict[bytes, bytes]]) -> None:
    for camera, files in cameras.items():
        for n, (rel, data) in enumerate(sorted(files.items())):
            p = os.path.join(bytes(root / "cameras" / camera), rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
            os.utime(p, ns=(BASE_MTIME_NS, BASE_MTIME_NS + n * 1_000_000_000))


async def _run_daemon(root: Path, cameras: dict[str, dict[bytes, bytes]]) -> dict[str, str]:
    (root / "evidence").mkdir()
    flat = _config(root, root / "evidence")
    root.joinpath("dockd.toml").write_text(_toml(flat))
    nested: dict[str, Any] = {k: v for k, v in flat.items() if "." not in k}
    nested["sources"] = {"directory": flat["sources.directory"]}
    daemon = Daemon(parse_config(nested))
    sub = daemon.bus.subscribe("t")
    task = asyncio.create_task(daemon.run())
    uploaded: dict[str, str] = {}
    try:
        async with asyncio.timeout(60):
            await daemon.ready.wait()
            for camera in cameras:  # docking is a rename: the folder appears whole
                os.rename(root / "cameras" / camera, root / "dock" / camera)
            async for event in sub:
                if isinstance(event, Notice) and event.event == "upload_failed":
                    raise AssertionError(f"upload failed: {event.details}")
                if isinstance(event, Notice) and event.event == "session_uploaded":
                    assert event.camera is not None and event.session_id is not None
                    uploaded[event.camera] = event.session_id
                    if len(uploaded) == len(cameras):
                        break
    finally:
        daemon.stop()
        await task
    return uploaded


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("daemon")
    raw = {
        cam: {rel: hashlib.shake_256(cam.encode() + rel).digest(size) for rel, size in f.items()}
        for cam, f in CAMERAS.items()
    }
    _make_cameras(root, raw)
    sessions = asyncio.run(_run_daemon(root, raw))
    assert set(sessions) == set(CAMERAS)
    content = {
        cam: {(NOT_UTF8_STORED if rel == NOT_UTF8 else rel.decode()): d for rel, d in f.items()}
        for cam, f in raw.items()
    }
    return Built(root, sessions, content)


def copy_out(src: Path, dest: Path) -> Path:
    """As a download would: the bytes, in files of the downloader's own (writable) mode."""
    shutil.copytree(src, dest, copy_function=shutil.copyfile)
    return dest


@pytest.fixture
def session_copy(built: Built, tmp_path: Path) -> Path:
    return copy_out(built.folder("CAM-A"), tmp_path / "downloads" / built.sessions["CAM-A"])


def flip_byte(p: Path, offset: int = 0) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


# --- sha256sum ---------------------------------------------------------------------------------


def sha256sum_check(folder: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("sha256sum") is None:
        pytest.skip("no sha256sum (coreutils)")
    return subprocess.run(
        ["sha256sum", "--strict", "-c", "../SHA256SUMS"],
        cwd=folder / "files",
        capture_output=True,
        text=True,
        check=False,
    )


def test_sha256sum_checks_a_session_copied_out_of_the_store(
    built: Built, session_copy: Path
) -> None:
    done = sha256sum_check(session_copy)

    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(
        f"{path}: OK" for path in built.content["CAM-A"]
    )
    flip_byte(session_copy / "files" / NOT_UTF8_STORED)
    done = sha256sum_check(session_copy)
    assert done.returncode == 1
    assert f"{NOT_UTF8_STORED}: FAILED" in done.stdout


# --- the ASC MHL reference implementation -------------------------------------------------------


@pytest.mark.parametrize("camera", sorted(CAMERAS))
def test_reference_verify_passes_on_a_session_copied_out_of_the_store(
    built: Built, tmp_path: Path, camera: str
) -> None:
    folder = copy_out(built.folder(camera), tmp_path / built.sessions[camera])

    for options in ((), ("--directory_hash",)):
        done = reference_verify(folder, "-v", *options)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "verification of root folder   OK" in done.stdout


@pytest.mark.parametrize(
    ("change", "path", "exit_code"),
    [
        ("flip", "files/DCIM/100CAM/0001.MP4", 11),
        ("flip", f"files/{NOT_UTF8_STORED}", 11),
        ("flip", "custody.jsonl", 11),
        ("flip", "SHA256SUMS", 11),
        ("remove", "files/DCIM/101CAM/night/ir/0002.MP4", 10),
        ("remove", "files/DCIM/100CAM/EMPTY.MP4", 10),
        ("remove", "custody.jsonl", 10),
        ("add", "files/DCIM/100CAM/0003.MP4", 21),
        ("add", "files/DCIM/101CAM/night/ir/planted.MP4", 21),
        ("add", "README.txt", 21),
    ],
)
def test_reference_verify_fails_on_a_changed_session(
    session_copy: Path, change: str, path: str, exit_code: int
) -> None:
    """Exit codes of `ascmhl-debug verify`: 11 hash mismatch, 10 missing file, 21 new file."""
    target = session_copy / path
    if change == "flip":
        flip_byte(target, target.stat().st_size // 2)
    elif change == "remove":
        target.unlink()
    else:
        target.write_bytes(b"planted")

    done = reference_verify(session_copy)

    assert done.returncode == exit_code, done.stdout + done.stderr
    assert path.rpartition("/")[2] in done.stdout + done.stderr  # and it names the file


@pytest.mark.parametrize("camera", sorted(CAMERAS))
def test_ascmhl_files_validate_against_the_xsd(built: Built, camera: str) -> None:
    files = sorted((built.folder(camera) / keys.ASCMHL).iterdir())

    assert [f.name.endswith(".mhl") for f in files] == [True, False]
    assert files[1].name == "ascmhl_chain.xml"
    for f in files:
        done = xsd_check(f)
        assert done.returncode == 0, done.stdout + done.stderr


def test_hash_list_records_every_stored_file_with_size_camera_mtime_and_xxh128(
    built: Built,
) -> None:
    folder = built.folder("CAM-A")
    m = built.manifest("CAM-A")
    (generation,) = (folder / keys.ASCMHL).glob("*.mhl")
    parsed = hashlist_xml_parser.parse(str(generation))
    hashes = {h.path: h for h in parsed.media_hashes if not h.is_directory}
    tree = ET.parse(generation)
    mtimes = {
        p.text: p.get("lastmodificationdate")
        for p in tree.iter(f"{MHL_NS}path")
        if p.get("size") is not None
    }

    assert set(hashes) == {f"files/{f['path']}" for f in m["files"]} | {
        keys.SUMS,
        keys.CUSTODY,
    }
    assert f"files/{NOT_UTF8_STORED}" in hashes  # the same path as the store's and manifest's
    for f in m["files"]:
        h = hashes[f"files/{f['path']}"]
        data = built.content["CAM-A"][f["path"]]
        assert h.file_size == len(data) == f["size"]
        assert [(e.hash_format, e.hash_string, e.action) for e in h.hash_entries] == [
            ("xxh128", mhl.xxh128(data), "original")
        ]
        assert mtimes[h.path] == f["mtime"]  # the camera's mtime, UTC
    mtimes_on_camera = {rfc3339_from_ns(BASE_MTIME_NS + n * 10**9) for n in range(5)}
    assert {f["mtime"] for f in m["files"]} == mtimes_on_camera
    for name in (keys.SUMS, keys.CUSTODY):
        data = (folder / name).read_bytes()
        assert hashes[name].hash_entries[0].hash_string == mhl.xxh128(data)
    creator = parsed.creator_info
    assert (creator.tool.name, creator.tool.version) == ("dockd", __version__)
    assert creator.host_name == DOCK_ID
    assert creator.creation_date == m["uploaded_at"]  # sealed: not the time of a rebuild
    assert generation.name == mhl.hash_list_name(m["session_id"], m["uploaded_at"]).split("/")[1]
    patterns = parsed.process_info.ignore_spec.get_pattern_list()
    assert {keys.MANIFEST, "manifest.json.sig"} <= set(patterns)


def test_manifest_lists_the_ascmhl_sidecars_by_size_and_sha256(built: Built) -> None:
    for camera in CAMERAS:
        folder = built.folder(camera)
        listed = {sc["name"]: sc for sc in built.manifest(camera)["sidecars"]}
        on_disk = sorted(f"{keys.ASCMHL}/{p.name}" for p in (folder / keys.ASCMHL).iterdir())
        assert sorted(n for n in listed if n.startswith("ascmhl/")) == on_disk
        assert "manifest.json.sig" not in listed
        for name in on_disk:
            data = (folder / name).read_bytes()
            assert (listed[name]["size"], listed[name]["sha256"]) == (
                len(data),
                hashlib.sha256(data).hexdigest(),
            )


def test_rebuilding_from_the_journal_gives_the_stored_bytes(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart between two objects of a session rebuilds them all: the store refuses other
    bytes under a key it holds, so every one must come out the same, whatever the time and the
    time zone — and the same as the in-memory seal of earlier dockd versions wrote them, for a
    session sealed before an upgrade (its signature differs by design: it still verifies)."""
    import time

    state = tmp_path / "state"
    shutil.copytree(built.root / "state", state)
    monkeypatch.setenv("TZ", "Pacific/Auckland")
    time.tzset()
    j = Journal.open(state / "journal.sqlite3", DOCK_ID)
    try:
        key = load(state / "dock.key", DOCK_ID)
        assert key is not None
        trusted = trusted_keys(None, key)
        for camera, session_id in built.sessions.items():
            out = seal.seal_dir(tmp_path / "staging", session_id)
            objects = seal.write_session_objects(
                state / "journal.sqlite3", DOCK_ID, session_id, out, key
            )
            names = [o.name for o in objects]
            assert names[-2:] == ["manifest.json.sig", "manifest.json"]  # signed, then last
            assert names[2].startswith("ascmhl/") and names[3] == mhl.CHAIN  # before those
            for o in objects:
                assert (built.folder(camera) / o.name).read_bytes() == o.path.read_bytes(), o.name
            session = j.session(session_id)
            assert session is not None
            before = dict(seal_reference._session_objects(j, session, DOCK_ID, key))
            assert list(before) == names
            for o in objects[:-2]:
                assert o.path.read_bytes() == before[o.name], o.name
            manifest_bytes = objects[-1].path.read_bytes()
            assert manifest_bytes == before[keys.MANIFEST]
            assert check_signature(manifest_bytes, before[SIGNATURE], trusted) is None
    finally:
        j.close()
        monkeypatch.undo()
        time.tzset()


# --- the manifest's signature ------------------------------------------------------------------


def key_show_line(built: Built) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dockd", "key", "show", "-c", str(built.config)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()[0]


def _edit_value(raw: bytes) -> bytes:
    m = json.loads(raw)
    m["files"][0]["size"] += 1
    return (json.dumps(m, indent=2, ensure_ascii=False) + "\n").encode()


@pytest.mark.parametrize(
    ("what", "edit"),
    [
        ("a digit of a file's SHA-256", lambda b: b.replace(b'"sha256": "', b'"sha256": "0', 1)),
        ("a file's size", _edit_value),
        ("one space more", lambda b: b.replace(b": ", b":  ", 1)),
        ("the final newline gone", lambda b: b.rstrip(b"\n")),
        ("the same JSON, compact", lambda b: json.dumps(json.loads(b)).encode()),
        ("the officer added", lambda b: b.replace(b'"id": "CAM-A"', b'"id": "CAM-A", "x": 1')),
    ],
)
def test_manifest_signature_fails_after_any_edit(
    built: Built, session_copy: Path, what: str, edit: Any
) -> None:
    key = parse_public_line(key_show_line(built), "dockd key show")
    trusted = {key.key_id: key}
    raw = (session_copy / keys.MANIFEST).read_bytes()
    sig = (session_copy / "manifest.json.sig").read_bytes()
    assert check_signature(raw, sig, trusted) is None

    edited = edit(raw)

    assert edited != raw, what
    problem = check_signature(edited, sig, trusted)
    assert problem == f"signature by key {key.key_id} does not match the manifest (altered)"


def documented_signature_check() -> str:
    """Step 1 of "Checking a session without dockd" in docs/evidence.md, as printed there."""
    doc = (Path(__file__).parents[2] / "docs" / "evidence.md").read_text()
    step = doc[doc.index("**1. The manifest is the dock's own.**") :]
    return step[step.index("```sh\n") + 6 : step.index("\n```\n")]


def test_the_documented_openssl_check_verifies_the_signature_and_fails_after_an_edit(
    built: Built, session_copy: Path
) -> None:
    if shutil.which("openssl") is None or shutil.which("sh") is None:
        pytest.skip("no openssl or sh")
    (session_copy.parent / "station1-dock-a.pub").write_text(key_show_line(built) + "\n")
    script = documented_signature_check()

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", script], cwd=session_copy, capture_output=True, text=True, check=False
        )

    done = run()
    assert (done.returncode, done.stdout) == (0, "Signature Verified Successfully\n"), done.stderr
    flip_byte(session_copy / keys.MANIFEST, 40)
    done = run()
    assert (done.returncode, done.stdout) == (1, "Signature Verification Failure\n")


# --- dockd verify on a store copied elsewhere, with no journal ----------------------------------


@dataclass(frozen=True)
class Custodian:
    config: Path
    store: Path
    trusted: Path
    state: Path


@pytest.fixture
def custodian(built: Built, tmp_path: Path) -> Iterator[Custodian]:
    """The whole store copied to another place, and a configuration with the store and a
    trusted-keys directory holding the `dockd key show` line; its state_dir has no journal."""
    root = tmp_path / "custodian"
    store = root / "evidence"
    shutil.copytree(built.store, store)  # modes kept: objects stay 0440
    trusted = root / "trusted"
    trusted.mkdir()
    (trusted / f"{DOCK_ID}.pub").write_text(key_show_line(built) + "\n")
    config = root / "dockd.toml"
    config.write_text(_toml(_config(root, store, trusted)))
    (root / "state").mkdir()
    yield Custodian(config, store, trusted, root / "state")
    assert list((root / "state").iterdir()) == []  # verify wrote no journal, no key


def dockd_verify(c: Custodian, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dockd", "verify", "-c", str(c.config), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def verify_json(c: Custodian) -> tuple[int, dict[str, Any]]:
    done = dockd_verify(c, "--json")
    assert done.stderr == ""
    out: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, out


def by_camera(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["camera"]: s for s in out["sessions"]}


def test_dockd_verify_passes_on_a_copied_store_with_only_the_trusted_key(
    built: Built, custodian: Custodian
) -> None:
    code, out = verify_json(custodian)

    assert code == 0, out
    assert out["ok"] is True
    assert out["journal_chain"] == "no journal"
    sessions = by_camera(out)
    assert set(sessions) == set(CAMERAS)
    for camera, s in sessions.items():
        assert s["session_id"] == built.sessions[camera]
        assert (s["signature"], s["chain"], s["ascmhl"], s["result"]) == ("ok", "ok", "ok", "ok")
        assert s["files"] == len(CAMERAS[camera])
        assert s["bytes"] == sum(CAMERAS[camera].values())
        assert s["problems"] == []


def test_dockd_verify_with_no_trusted_key_names_the_untrusted_key(
    built: Built, custodian: Custodian
) -> None:
    for f in custodian.trusted.iterdir():
        f.unlink()
    key_id = key_show_line(built).split()[1]

    code, out = verify_json(custodian)

    assert code == 1
    assert out["ok"] is False
    for s in out["sessions"]:
        assert s["signature"] == "BAD" and s["result"] == "FAILED"
        assert s["problems"] == [
            f"signed by key {key_id}, which is not trusted "
            "(no trusted dock keys: signing.trusted_keys_dir holds none)"
        ]


def test_dockd_verify_names_a_file_with_a_flipped_byte(built: Built, custodian: Custodian) -> None:
    key = keys.file_key("CAM-A", built.sessions["CAM-A"], NOT_UTF8_STORED)
    target = custodian.store / key
    target.chmod(0o640)
    flip_byte(target, 600)

    code, out = verify_json(custodian)

    assert code == 1
    sessions = by_camera(out)
    assert sessions["CAM-A"]["problems"] == [f"{key}: content does not match its SHA-256 (altered)"]
    assert sessions["CAM-A"]["signature"] == "ok"  # the manifest is still the dock's own
    assert sessions["CAM-B"]["result"] == "ok"


def test_dockd_verify_names_a_missing_or_unlisted_ascmhl_history(
    built: Built, custodian: Custodian
) -> None:
    folder_a = custodian.store / keys.session_prefix("CAM-A", built.sessions["CAM-A"])
    (generation,) = (folder_a / keys.ASCMHL).glob("*.mhl")
    generation.unlink()

    code, out = verify_json(custodian)

    assert code == 1
    key = f"{keys.session_prefix('CAM-A', built.sessions['CAM-A'])}/ascmhl/{generation.name}"
    sessions = by_camera(out)
    assert sessions["CAM-A"]["problems"] == [f"{key}: missing from the store"]
    assert sessions["CAM-A"]["ascmhl"] == "BAD"
    assert sessions["CAM-B"]["result"] == "ok"


def test_dockd_verify_prints_a_table_and_names_each_problem(
    built: Built, custodian: Custodian
) -> None:
    key = keys.file_key("CAM-B", built.sessions["CAM-B"], "DCIM/100CAM/0001.MP4")
    (custodian.store / key).unlink()

    done = dockd_verify(custodian)  # stdout is a pipe: plain text

    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "session",
        "camera",
        "files",
        "bytes",
        "signature",
        "chain",
        "ascmhl",
        "result",
    ]
    rows = {line.split()[1]: line.split() for line in lines[1:3]}
    assert rows["CAM-A"][0] == built.sessions["CAM-A"] and rows["CAM-A"][-1] == "ok"
    assert rows["CAM-B"][-1] == "FAILED"
    assert f"PROBLEM {built.sessions['CAM-B']}: {key}: missing from the store" in lines
    assert lines[-1] == "2 session(s) checked: 1 PROBLEM(S)"
    assert "\x1b[" not in done.stdout  # no colours into a pipe


def test_dockd_verify_on_a_terminal_is_a_rich_table(
    built: Built, custodian: Custodian, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")

    code = dockd_main(["verify", "-c", str(custodian.config)])

    out = capsys.readouterr().out
    assert code == 0
    assert "┏" in out and "\x1b[" in out  # a box-drawn table, in colour
    for camera, session_id in built.sessions.items():
        assert session_id in out and camera in out
    assert "2 session(s) checked: all good" in out
