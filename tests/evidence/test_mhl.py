"""The ASC MHL history dockd writes, checked against the reference implementation (PyPI `ascmhl`).

Each test lays out a session folder on disk, writes dockd's history for it from the hashes alone
(as the daemon does from its journal), and lets the reference tools judge it: `verify` and
`verify --directory_hash`, the XSD check, and — for the directory hashes and ignore rules —
`create` on a copy of the same folder, whose hash list must say the same.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import pytest
import seal_reference
import xxhash
from mhl_reference import ascmhl, reference_verify, xsd_check
from sealed_sessions import Session, Spec, journal_with

from dockd.evidence import mhl, seal
from dockd.ids import SessionId

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


def hash_list(entries: list[mhl.Entry], created: str, hostname: str, **more: str) -> bytes:
    """A hash list as the seal writes one: the elements streamed in tree order, then the
    header (with the root hash) put before them."""
    body = bytearray()
    stream = mhl.HashListBody(body.extend)
    for e in sorted(entries, key=lambda e: mhl.tree_key(e.path)):
        stream.add(e)
    content, structure = stream.finish()
    head = mhl.header(
        root_content=content, root_structure=structure, created=created, hostname=hostname, **more
    )
    return head + bytes(body) + mhl.FOOTER


def write_history(root: Path, files: dict[str, bytes]) -> Path:
    """dockd's history for `files`, written into `root/ascmhl/`; returns the .mhl file."""
    name = mhl.hash_list_name(root.name, SEALED)
    body = hash_list(entries(files), created="2026-11-24T17:52:07Z", hostname="dock-a")
    (root / "ascmhl").mkdir()
    (root / name).write_bytes(body)
    (root / mhl.CHAIN).write_bytes(mhl.chain([(name, mhl.c4(body))]))
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


# --- the stream against the tree dockd built before ----------------------------------------------

NAMES = ("a", "b", "a-b", "a.b", "a b", "b-c", "B", "ab", "ä", "📹", "x\x01", "bell\x07", "R&D")
IGNORED = (".DS_Store", "ascmhl", "manifest.json", "manifest.json.sig")


@pytest.mark.parametrize("seed", range(60))
def test_streamed_hash_list_is_the_bytes_of_the_tree_built_one(seed: int) -> None:
    """Random folders of names that sort differently as path components than as paths, that
    XML cannot hold, that are ignored, or a name that is a file and a folder both: the stream
    in `tree_key` order writes exactly what the in-memory tree of the old seal wrote."""
    rng = random.Random(seed)
    names = NAMES + IGNORED
    paths = {"SHA256SUMS", "custody.jsonl"}
    for _ in range(rng.randint(1, 80)):
        parts = [rng.choice(names) for _ in range(rng.randint(1, 4))]
        paths.add("/".join(["files", *parts] if rng.random() < 0.9 else parts))
    entries = [
        mhl.Entry(
            p,
            rng.randint(0, 10**6),
            rng.randbytes(16).hex(),
            rng.choice([None, "2026-11-24T09:02:11Z"]),
            rng.choice([None, "2026-11-24T17:50:01.000001Z"]),
        )
        for p in sorted(paths)
    ]
    rng.shuffle(entries)
    more = {"comment": "camera <X> & co", "tool_version": "1.2.3"}
    old_entries = [seal_reference.Entry(*astuple(e)) for e in entries]

    ours = hash_list(entries, created="2026-11-24T17:52:07Z", hostname="dock-a", **more)
    theirs = seal_reference.hash_list(
        old_entries, created="2026-11-24T17:52:07Z", hostname="dock-a", **more
    )

    assert ours == theirs


def test_what_xml_can_carry_is_decided_as_before_for_every_code_point() -> None:
    text = "".join(map(chr, range(0x110000)))
    assert [mhl.representable(c) for c in text] == [seal_reference.representable(c) for c in text]


def test_tree_key_orders_folders_first_then_files_by_name_component_by_component() -> None:
    paths = ["b-c/y", "a.txt", "b/x", "a/z", "b/.DS_Store/q", "b/a/ascmhl", "a-"]
    assert sorted(paths, key=mhl.tree_key) == [
        "a/z",
        "b/.DS_Store/q",  # only opens b/ (nothing below an ignored name)
        "b/a/ascmhl",  # only opens b/a/
        "b/x",
        "b-c/y",
        "a-",
        "a.txt",
    ]


def test_entries_out_of_tree_order_are_refused() -> None:
    stream = mhl.HashListBody(lambda _: None)
    stream.add(mhl.Entry("files/b/x", 1, "0" * 32))
    with pytest.raises(ValueError, match="tree order"):
        stream.add(mhl.Entry("files/a/x", 1, "0" * 32))


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


def journal_session(tmp_path: Path, xxh: bool = True) -> Path:
    """A journal holding FOLDER's camera files as one sealed session (sealed at SEALED)."""
    files = [
        Spec(rel.removeprefix("files/"), data, xxh=xxh)
        for rel, data in FOLDER.items()
        if rel.startswith("files/")
    ]
    path = tmp_path / "state" / "journal.sqlite3"
    journal_with(path, "dock-a", [Session(SESSION, files=files, sealed_at=SEALED)])
    return path


def sealed(journal: Path, out: Path) -> list[seal.SealedObject]:
    return seal.write_session_objects(journal, "dock-a", SESSION, out, None)


def test_history_from_the_journal_is_named_after_the_sealing_and_verifies(
    folder: Path, tmp_path: Path
) -> None:
    objects = sealed(journal_session(tmp_path), tmp_path / "seal")

    assert [o.name for o in objects][2:4] == [
        f"ascmhl/0001_{SESSION}_2026-11-24_175207Z.mhl",
        "ascmhl/ascmhl_chain.xml",
    ]
    (folder / "ascmhl").mkdir()
    for o in objects:  # the session's own SHA256SUMS, custody.jsonl, manifest and history
        shutil.copyfile(o.path, folder / o.name)
    text = objects[2].path.read_text()
    assert "<creationdate>2026-11-24T17:52:07Z</creationdate>" in text
    assert "<hostname>dock-a</hostname>" in text
    assert '<tool version="' in text and ">dockd</tool>" in text
    assert 'lastmodificationdate="2026-11-24T09:02:11Z"' in text  # the camera's mtime, UTC
    assert 'hashdate="2026-11-24T17:50:01.000001Z"' in text  # when it was copied
    assert reference_verify(folder, "--directory_hash").returncode == 0
    assert reference_verify(folder).returncode == 0


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


def test_chain_names_the_hash_list_by_its_c4(folder: Path) -> None:
    generation = write_history(folder, FOLDER)
    chain = (folder / mhl.CHAIN).read_text()
    assert f"<path>{generation.name}</path>" in chain
    assert f"<c4>{ascmhl_hasher.C4.hash_file(str(generation))}</c4>" in chain
    shutil.rmtree(folder / "files" / "MISC")  # and the reference notices a file gone
    assert reference_verify(folder).returncode == 10


def test_history_is_the_same_bytes_on_every_rebuild_in_any_time_zone(
    other_time_zone: None, tmp_path: Path
) -> None:
    journal = journal_session(tmp_path)
    first = {o.name: o.path.read_bytes() for o in sealed(journal, tmp_path / "first")}
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    again = {o.name: o.path.read_bytes() for o in sealed(journal, tmp_path / "again")}
    assert again == first
    assert any(name.endswith(".mhl") for name in first)


def test_no_history_for_files_offloaded_without_an_xxh128(tmp_path: Path) -> None:
    """A journal from before schema 2: the footage is not read again to make one up."""
    objects = sealed(journal_session(tmp_path, xxh=False), tmp_path / "seal")
    assert [o.name for o in objects] == ["SHA256SUMS", "custody.jsonl", "manifest.json"]
