"""The streamed seal (`dockd.evidence.seal`) against the in-memory seal dockd had before it.

Sessions of every awkward shape are written into a real journal and sealed by its own `seal`;
then every object the streamed seal writes to disk must be the bytes the old in-memory code
(`seal_reference`, a frozen copy) builds from the same journal. A session sealed before an
upgrade may be rebuilt after it, and the store refuses other bytes under a key it holds. The
signature is the one object that differs by design (it now signs the manifest's SHA-512): it
is checked by verifying it, and the old one must still verify against the new manifest.

And the point of streaming: the memory a seal takes must not grow with its session's files.
"""

from __future__ import annotations

import hashlib
import json
import stat
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import seal_reference
from sealed_sessions import Session, Skip, Spec, journal_with
from synthetic import make_sealed_session

from dockd.evidence import keys, seal
from dockd.evidence.manifest import SIGNATURE
from dockd.evidence.signing import DockKey, check_signature, load_or_create, trusted_keys
from dockd.journal import FileState, Journal

DOCK_ID = "station9-dock-s"
TWICE = ("2026-11-24T17:50:01.000001Z", "2026-11-24T17:58:30.000002Z")

AWKWARD = Session(
    "20261124T174900Z-X6039B2A3-0001",
    officer="Off. O'Brien <4711>",
    vendor_id="2e8a",
    model_id="0042",
    files=[
        Spec("DCIM/100CAM/0001.MP4", b"clip one" * 1000),
        Spec("DCIM/100CAM/0002.MP4", b"copied twice", copied_at=TWICE),  # the last copy counts
        Spec("DCIM/100CAM/0006.MP4", b"no time", copied_at=(TWICE[1], None)),  # one with a time
        Spec("DCIM/100CAM/EMPTY.MP4", b""),
        Spec("DCIM/101CAM/deep/er/0001.MP4", b"nested"),
        # by path "b-c/y" < "b.c/z" < "b/x"; as a tree b/ comes first, and folders before files
        Spec("b/x", b"bx"),
        Spec("b-c/y", b"bcy"),
        Spec("b.c/z", b"bcz"),
        Spec("a.txt", b"a"),
        Spec("a/inner.txt", b"ai"),
        Spec("a-b", b"ab"),
        # SHA256SUMS escapes these; XML escapes some
        Spec("back\\slash.MP4", b"bs"),
        Spec("new\nline.MP4", b"nl"),
        Spec("carriage\rreturn.MP4", b"cr"),
        Spec("tab\there/R&D <draft> \"q\" 'a'.MP4", b"esc"),
        Spec("Ünïcødé ✓ 📹.MP4", b"u"),
        Spec("ü/x.MP4", b"ux"),
        # XML 1.0 cannot name these: left out of the list, still in the folder hashes
        Spec("bell\x07.MP4", b"ding"),
        Spec("DIR\x01/inside.MP4", b"in a folder XML cannot name"),
        # ignored names: left out of the MHL (a folder of only ignored entries still there)
        Spec(".DS_Store", b"mac"),
        Spec("EXPORT/manifest.json", b"a camera's own manifest"),
        Spec("EXPORT/keep.txt", b"k"),
        Spec("ONLY/manifest.json.sig", b"the only file of its folder"),
        Spec("ascmhl/0001_x.mhl", b"a camera's own history"),
        Spec("sub/ascmhl/deeper/f.MP4", b"below an ignored folder"),
        # a name that was not UTF-8, percent-encoded, its bytes kept
        Spec("caf%E9/cl%FFip.MP4", b"raw", raw_path=b"caf\xe9/cl\xffip.MP4"),
        Spec("MISC/VERSION.TXT", b"4.2.1\n", state=FileState.CLEARED),
        Spec("MISC/before-1970.TXT", b"old clock", mtime_ns=-86_400_000_000_000),
        Spec("DCIM/100CAM/0003.MP4", state=FileState.FAILED),
        Spec("DCIM/100CAM/0004.MP4", state=FileState.UNSTABLE),
        Spec("DCIM/100CAM/0005.MP4", state=FileState.ABANDONED),
        Spec("DCIM/100CAM/0009.MP4", state=FileState.ABANDONED),
        Spec("A/first.MP4", state=FileState.ABANDONED),
    ],
    skipped=[
        Skip("DCIM/100CAM/fifo", "special_file"),
        Skip("lost%FF", "special_file", raw_path=b"lost\xff"),
        Skip("DCIM/100CAM/0009.MP4", "symlink"),  # a tie with an abandoned file: skipped first
        Skip("zzz/last", "unreadable_directory"),
    ],
)
NO_XXH128 = Session(
    "20261124T174900Z-X6039B2A3-0002",
    files=[Spec("DCIM/0001.MP4", b"new"), Spec("DCIM/0000.MP4", b"from schema 1", xxh=False)],
)
NOTHING_STORED = Session(
    "20261124T174900Z-X6039B2A3-0003",
    files=[
        Spec("DCIM/0001.MP4", state=FileState.FAILED),
        Spec("DCIM/0002.MP4", state=FileState.ABANDONED),
    ],
    skipped=[Skip("DCIM/fifo")],
)
NO_FILES_AT_ALL = Session("20261124T174900Z-X6039B2A3-0004", skipped=[Skip("only/a/fifo")])
MANY_IN_ONE_FOLDER = Session(
    "20261124T174900Z-X6039B2A3-0005",
    camera="CAM-B",
    files=[Spec(f"DCIM/100CAM/{n:04d}.MP4", n.to_bytes(4, "big")) for n in range(1500, 0, -1)],
)
SESSIONS = [AWKWARD, NO_XXH128, NOTHING_STORED, NO_FILES_AT_ALL, MANY_IN_ONE_FOLDER]


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("state") / "journal.sqlite3"
    journal_with(path, DOCK_ID, SESSIONS)
    return path


@pytest.fixture(scope="module")
def dock_key(tmp_path_factory: pytest.TempPathFactory) -> DockKey:
    return load_or_create(tmp_path_factory.mktemp("key") / "dock.key", DOCK_ID)


def reference(journal: Path, session_id: str, key: DockKey | None) -> dict[str, bytes]:
    j = Journal.open(journal, DOCK_ID)
    try:
        session = j.session(session_id)
        assert session is not None
        return dict(seal_reference._session_objects(j, session, DOCK_ID, key))
    finally:
        j.close()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("session", SESSIONS, ids=lambda s: s.id[-4:])
def test_streamed_objects_are_the_bytes_the_in_memory_seal_built(
    journal: Path, dock_key: DockKey, tmp_path: Path, session: Session, signed: bool
) -> None:
    key = dock_key if signed else None
    expected = reference(journal, session.id, key)

    objects = seal.write_session_objects(
        journal, DOCK_ID, session.id, seal.seal_dir(tmp_path, session.id), key
    )

    assert [o.name for o in objects] == list(expected)  # the same objects, in upload order
    assert objects[-1].name == keys.MANIFEST
    for o in objects:
        data = o.path.read_bytes()
        assert (o.size, o.sha256) == (len(data), hashlib.sha256(data).hexdigest()), o.name
        if o.name != SIGNATURE:
            assert data == expected[o.name], o.name
    if signed:
        manifest = objects[-1].path.read_bytes()
        new_sig = objects[-2].path.read_bytes()
        assert new_sig.startswith(b"dockd-ed25519-sha512 ")
        trusted = trusted_keys(None, dock_key)
        assert check_signature(manifest, new_sig, trusted) is None
        assert check_signature(manifest, expected[SIGNATURE], trusted) is None  # the old one


def test_the_awkward_session_has_what_it_is_meant_to_test(journal: Path, tmp_path: Path) -> None:
    """Guards the fixture: the cases above are really in the objects compared."""
    objects = seal.write_session_objects(journal, DOCK_ID, AWKWARD.id, tmp_path / "s", None)
    by_name = {o.name: o.path.read_bytes() for o in objects}
    (hash_list,) = (n for n in by_name if n.endswith(".mhl"))
    xml = by_name[hash_list].decode()
    for name in ("0002", "0006"):
        element = xml[xml.index(f"files/DCIM/100CAM/{name}.MP4</path>") :].split("</hash>")[0]
        assert f'hashdate="{TWICE[1]}"' in element, name
    assert "<path>files/EXPORT</path>" in xml and "<path>files/ONLY</path>" in xml
    assert "EXPORT/manifest.json" not in xml and "deeper" not in xml and "bell" not in xml
    assert xml.index("<path>files/b</path>") < xml.index("<path>files/b-c</path>")
    sums = by_name[keys.SUMS].splitlines()
    assert any(line.startswith(b"\\") and line.endswith(b"  back\\\\slash.MP4") for line in sums)
    m = json.loads(by_name[keys.MANIFEST])
    assert m["outcome"] == "interrupted"
    tie = [e["reason"] for e in m["skipped"] if e["path"] == "DCIM/100CAM/0009.MP4"]
    assert tie == ["symlink", "camera_undocked_before_copy"]
    assert {e["status"] for e in m["files"]} == {"verified", "failed", "unstable"}
    assert by_name[keys.CUSTODY].count(b'"event":"sealed"') == 1
    assert b'"event":"uploaded"' not in by_name[keys.CUSTODY]  # after the seal: not its slice


def test_no_history_without_xxh128_and_one_of_sidecars_only_with_nothing_stored(
    journal: Path, tmp_path: Path
) -> None:
    names = [
        [o.name for o in seal.write_session_objects(journal, DOCK_ID, s.id, tmp_path / s.id, None)]
        for s in (NO_XXH128, NOTHING_STORED)
    ]
    assert names[0] == [keys.SUMS, keys.CUSTODY, keys.MANIFEST]
    assert names[1][2].startswith("ascmhl/") and len(names[1]) == 5


def test_objects_are_private_and_an_earlier_seal_is_rebuilt_not_reused(
    journal: Path, tmp_path: Path
) -> None:
    out = seal.seal_dir(tmp_path / "staging", AWKWARD.id)
    first = seal.write_session_objects(journal, DOCK_ID, AWKWARD.id, out, None)
    first[0].path.write_bytes(b"left by a crash halfway")
    (out / "stray").write_bytes(b"")

    again = seal.write_session_objects(journal, DOCK_ID, AWKWARD.id, out, None)

    assert out == tmp_path / "staging" / AWKWARD.id / ".seal"
    on_disk = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
    # the objects, and the hash list's body (left for the staging folder's release)
    assert set(on_disk) == {o.name for o in again} | {".hashlist-body"}
    assert again == first  # the same sizes and digests: the same bytes
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / keys.ASCMHL).stat().st_mode) == 0o700
    for name, p in on_disk.items():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, name


def test_seal_reads_one_snapshot_while_the_journal_is_written(
    journal: Path, tmp_path: Path
) -> None:
    """Its own read-only connection: the journal thread goes on writing meanwhile."""
    writer = Journal.open(journal, DOCK_ID)
    try:
        with writer.tx():
            writer.custody("prioritized", None)
            objects = seal.write_session_objects(journal, DOCK_ID, AWKWARD.id, tmp_path, None)
    finally:
        writer.close()
    assert objects[-1].name == keys.MANIFEST


# --- memory ------------------------------------------------------------------------------------

SMALL, LARGE = 1_000, 6_000


@pytest.fixture(scope="module")
def synthetic_journal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "journal.sqlite3"
    for n in (SMALL, LARGE):
        make_sealed_session(path, DOCK_ID, n)
    return path


@pytest.fixture
def small_buffers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The seal's fixed costs (a write chunk, a page of rows) made small, so that a cost per
    file would stand out against them at these sizes."""
    monkeypatch.setattr(seal, "_CHUNK", 64 * 1024)
    monkeypatch.setattr(seal, "_PAGE", 100)
    yield


def peak_of_seal(journal: Path, files: int, out: Path, key: DockKey) -> int:
    session_id = f"20261124T174900Z-CAM-SYN-{files:06d}"
    tracemalloc.start()
    try:
        objects = seal.write_session_objects(journal, DOCK_ID, session_id, out, key)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(o.size for o in objects) > 1000 * files  # it did write them all
    return peak


def test_memory_of_a_seal_does_not_grow_with_its_files(
    synthetic_journal: Path, tmp_path: Path, dock_key: DockKey, small_buffers: None
) -> None:
    """Six times the files, the same memory: the in-memory seal held every row, record and
    object at once (about 7 KB a file: 35 MB more here), the streamed one a page of rows and a
    chunk of bytes (and, for the hash list, the hashes of one folder's children: 100 here)."""
    small = peak_of_seal(synthetic_journal, SMALL, tmp_path / "small", dock_key)
    large = peak_of_seal(synthetic_journal, LARGE, tmp_path / "large", dock_key)

    assert large - small < 256 * 1024, (small, large)
    assert large < 2 * 1024 * 1024, large
