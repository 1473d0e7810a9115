"""The ASC MHL history dockd writes, checked against the reference implementation (PyPI `ascmhl`).

Each test lays out a session folder on disk, writes dockd's history for it from the hashes alone
(as the daemon does from its journal), and lets the reference tools judge it: `verify` and
`verify --directory_hash`, the XSD check, and — for the directory hashes and ignore rules —
`create` on a copy of the same folder, whose hash list must say the same.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from mhl_reference import ascmhl, reference_verify, xsd_check

from dockd.evidence import mhl
from dockd.ids import CameraId, SessionId
from dockd.journal.rows import FileRow, SessionRow
from dockd.journal.states import FileState, SessionState

hashlist_xml_parser = pytest.importorskip("ascmhl.hashlist_xml_parser")
ascmhl_hasher = pytest.importorskip("ascmhl.hasher")

SESSION = SessionId("20261124T174900Z-X6039B2A3-3f2a")
SEALED = "2026-11-24T17:52:07.123456Z"
MTIME_NS = 1_795_510_931_000_000_000  # 2026-11-24T09:02:11Z

# a session folder as the store holds it, manifest and signature included
FOLDER: dict[str, bytes] = {
    "files/DCIM/100CAM/0001.MP4": b"\x00\x01clip one" * 1000,
    "files/DCIM/100CAM/0002.MP4": b"clip two",
    "files/DCIM/100CAM/EMPTY.MP4": b"",
    "files/DCIM/101CAM/deep/er/0001.MP4": b"nested",
    "files/caf%E9/cl%FFip.MP4": b"a name that was not UTF-8, percent-encoded",
    "files/MISC/VERSION.TXT": b"4.2.1\n",
    "SHA256SUMS": b"(sums)\n",
    "custody.jsonl": b'{"seq":1}\n',
    "manifest.json": b"{}\n",
    "manifest.json.sig": b"dockd-ed25519 x y\n",
}
LATER = ("manifest.json", "manifest.json.sig")  # written after the history


def lay_out(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def entries(files: dict[str, bytes]) -> list[mhl.Entry]:
    return [
        mhl.Entry(rel, len(data), mhl.xxh128(data), "2026-11-24T09:02:11Z")
        for rel, data in files.items()
        if rel not in LATER
    ]


def write_history(root: Path, files: dict[str, bytes]) -> Path:
    """dockd's history for `files`, written into `root/ascmhl/`; returns the .mhl file."""
    name = mhl.hash_list_name(root.name, SEALED)
    body = mhl.hash_list(entries(files), created="2026-11-24T17:52:07Z", hostname="dock-a")
    (root / "ascmhl").mkdir()
    (root / name).write_bytes(body)
    (root / mhl.CHAIN).write_bytes(mhl.chain([(name, body)]))
    return root / name


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return lay_out(tmp_path / SESSION, FOLDER)


def reference_create(tmp_path: Path, files: dict[str, bytes]) -> object:
    """The reference implementation's own hash list of the same folder (xxh128, the same
    ignore patterns), parsed by its own parser."""
    root = lay_out(tmp_path / "reference" / SESSION, files)
    done = ascmhl("create", "-h", "xxh128", "-i", "manifest.json", "-i", "manifest.json.sig", root)
    assert done.returncode == 0, done.stdout + done.stderr
    (generation,) = (root / "ascmhl").glob("*.mhl")
    return hashlist_xml_parser.parse(str(generation))


def hashes(hash_list: object) -> dict[str, tuple[str, ...]]:
    """path -> (xxh128,) for files, (content, structure) for folders and the root ('.')."""
    out: dict[str, tuple[str, ...]] = {}
    root = hash_list.process_info.root_media_hash  # type: ignore[attr-defined]
    for m in [*hash_list.media_hashes, root]:  # type: ignore[attr-defined]
        (e,) = m.hash_entries
        assert e.hash_format == "xxh128"
        path = "." if m is root else m.path
        out[path] = (e.hash_string, e.structure_hash_string) if m.is_directory else (e.hash_string,)
    return out


# --- hashes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"x", b"\x00" * 70_000, os.urandom(4097)])
def test_xxh128_and_c4_are_the_reference_implementations(data: bytes) -> None:
    assert mhl.xxh128(data) == ascmhl_hasher.XXH128.hash_data(data)
    assert mhl.xxh128(data) == xxhash.xxh3_128(data).hexdigest()  # what the offload computes
    assert mhl.c4(data) == ascmhl_hasher.C4.hash_data(data)
    assert len(mhl.c4(data)) == 90


# --- against the reference tools ---------------------------------------------------------------


def test_reference_verify_passes_on_the_folder_with_files_and_folder_hashes(
    folder: Path,
) -> None:
    generation = write_history(folder, FOLDER)

    for options in ((), ("--directory_hash",)):
        done = reference_verify(folder, "-v", *options)
        assert done.returncode == 0, done.stdout + done.stderr
    done = reference_verify(folder, "--directory_hash", "-v")
    assert "verification of root folder   OK" in done.stdout
    assert xsd_check(generation).returncode == 0
    assert xsd_check(folder / mhl.CHAIN).returncode == 0


def test_hash_list_says_what_the_reference_create_says(folder: Path, tmp_path: Path) -> None:
    write_history(folder, FOLDER)

    ours = hashlist_xml_parser.parse(str(next((folder / "ascmhl").glob("*.mhl"))))
    theirs = reference_create(tmp_path, FOLDER)

    assert hashes(ours) == hashes(theirs)
    assert ours.process_info.ignore_spec.get_pattern_list() == (
        theirs.process_info.ignore_spec.get_pattern_list()  # type: ignore[attr-defined]
    )
    # and in the reference's order: sub-folders, then a folder's files, then the folder
    assert [m.path for m in ours.media_hashes] == [
        m.path
        for m in theirs.media_hashes  # type: ignore[attr-defined]
    ]


def test_a_camera_file_named_like_an_ignore_pattern_is_left_out_as_the_reference_does(
    tmp_path: Path,
) -> None:
    """Its ignore patterns match a name at any depth (they are matched against absolute paths,
    so `/manifest.json` would match nothing): a camera's own `manifest.json` is not in the MHL,
    and its folder's hashes are those of a folder without it."""
    files = {
        **FOLDER,
        "files/EXPORT/manifest.json": b"a camera's own manifest",
        "files/ONLY/manifest.json.sig": b"the only file of its folder",
    }
    root = lay_out(tmp_path / SESSION, files)
    write_history(root, files)

    ours = hashlist_xml_parser.parse(str(next((root / "ascmhl").glob("*.mhl"))))
    paths = {m.path for m in ours.media_hashes}
    assert "files/EXPORT/manifest.json" not in paths
    assert {"files/EXPORT", "files/ONLY"} <= paths  # hashed as the walk sees them
    assert hashes(ours) == hashes(reference_create(tmp_path, files))
    assert reference_verify(root, "--directory_hash").returncode == 0


def test_names_xml_must_escape_come_back_whole_through_the_reference_parser(
    tmp_path: Path,
) -> None:
    files = {
        "files/R&D <draft> \"q\" 'a'.MP4": b"1",
        "files/tab\there/line\nbreak\rreturn.MP4": b"2",
        "files/Ünïcødé ✓ 📹.MP4": b"3",
        "SHA256SUMS": b"",
        "custody.jsonl": b"{}\n",
    }
    root = lay_out(tmp_path / SESSION, files)
    generation = write_history(root, files)

    assert xsd_check(generation).returncode == 0
    done = reference_verify(root, "--directory_hash")
    assert done.returncode == 0, done.stdout + done.stderr
    assert reference_verify(root).returncode == 0
    listed = {m.path for m in hashlist_xml_parser.parse(str(generation)).media_hashes}
    assert set(files) - {"SHA256SUMS", "custody.jsonl"} <= listed
    # (the reference's own `create` is no yardstick here: its writer indents the line after a
    # newline in a name, and so lists a path that is not on the disk)


def test_a_name_xml_cannot_hold_is_left_out_of_the_list_but_not_of_the_folder_hashes(
    tmp_path: Path,
) -> None:
    """XML 1.0 has no place for most control characters. Such a file cannot be listed (the
    reference verify then reports it as new, exit 21: documented), but the hash list stays valid
    and its folder hashes are still the ones the reference computes from the disk."""
    files = {**FOLDER, "files/DCIM/bell\x07.MP4": b"ding"}
    root = lay_out(tmp_path / SESSION, files)
    generation = write_history(root, files)

    assert "bell" not in generation.read_text()
    assert xsd_check(generation).returncode == 0
    assert reference_verify(root, "--directory_hash").returncode == 0
    assert reference_verify(root).returncode == 21


# --- from the journal --------------------------------------------------------------------------


def session_row() -> SessionRow:
    return SessionRow(
        id=SESSION,
        camera=CameraId("X6039B2A3"),
        state=SessionState.SEALED,
        docked_at="2026-11-24T17:49:00.000001Z",
        offloaded_at="2026-11-24T17:51:00.000001Z",
        sealed_at=SEALED,
        uploaded_at=SEALED,
        vendor_id=None,
        model_id=None,
        officer=None,
        priority=0,
        custody_last_seq=9,
        error=None,
    )


def file_rows(xxh: bool = True) -> list[FileRow]:
    return [
        FileRow(
            id=n,
            session_id=SESSION,
            camera=CameraId("X6039B2A3"),
            path=rel.removeprefix("files/"),
            raw_path=None,
            size=len(data),
            mtime_ns=MTIME_NS,
            state=FileState.STORED,
            sha256=hashlib.sha256(data).hexdigest(),
            key=None,
            error=None,
            xxh128=mhl.xxh128(data) if xxh else None,
        )
        for n, (rel, data) in enumerate(FOLDER.items())
        if rel.startswith("files/")
    ]


SIDECARS = [("SHA256SUMS", FOLDER["SHA256SUMS"]), ("custody.jsonl", FOLDER["custody.jsonl"])]


@pytest.fixture
def other_time_zone() -> Iterator[None]:
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def test_history_from_journal_rows_is_named_after_the_sealing_and_verifies(
    folder: Path,
) -> None:
    objects = mhl.history(session_row(), "dock-a", file_rows(), SIDECARS, [])

    assert [name for name, _ in objects] == [
        f"ascmhl/0001_{SESSION}_2026-11-24_175207Z.mhl",
        "ascmhl/ascmhl_chain.xml",
    ]
    (folder / "ascmhl").mkdir()
    for name, body in objects:
        (folder / name).write_bytes(body)
    text = objects[0][1].decode()
    assert "<creationdate>2026-11-24T17:52:07Z</creationdate>" in text
    assert "<hostname>dock-a</hostname>" in text
    assert '<tool version="' in text and ">dockd</tool>" in text
    assert 'lastmodificationdate="2026-11-24T09:02:11Z"' in text  # the camera's mtime, UTC
    assert reference_verify(folder, "--directory_hash").returncode == 0
    assert reference_verify(folder).returncode == 0


def test_history_is_the_same_bytes_on_every_rebuild_in_any_time_zone(
    other_time_zone: None,
) -> None:
    first = mhl.history(session_row(), "dock-a", file_rows(), SIDECARS, [])
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    assert mhl.history(session_row(), "dock-a", file_rows(), SIDECARS, []) == first


def test_no_history_for_files_offloaded_without_an_xxh128() -> None:
    """A journal from before schema 2: the footage is not read again to make one up."""
    assert mhl.history(session_row(), "dock-a", file_rows(xxh=False), SIDECARS, []) == []


def test_chain_names_the_hash_list_by_its_c4(folder: Path) -> None:
    generation = write_history(folder, FOLDER)
    chain = (folder / mhl.CHAIN).read_text()
    assert f"<path>{generation.name}</path>" in chain
    assert f"<c4>{ascmhl_hasher.C4.hash_file(str(generation))}</c4>" in chain
    shutil.rmtree(folder / "files" / "MISC")  # and the reference notices a file gone
    assert reference_verify(folder).returncode == 10
