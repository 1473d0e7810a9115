"""Untrusted camera content (issue 9 item 5): a camera is a directory tree anyone could have
written. Hypothesis builds such trees — odd names (bytes that are not UTF-8, newlines,
backslashes, '%', control characters, right-to-left marks, names up to NAME_MAX), names that
collide after case folding, Unicode normalisation or percent-encoding (a literal "%FF" beside a
raw 0xFF byte), `..`-like names that are legal ("..a", ".. ", "..."), deep nesting, many files,
zero-length files, and entries that are not regular files (symlinks pointing out of the camera,
at "/", at themselves, dangling; FIFOs; sockets; device nodes) — and runs the real offload and
upload (the Daemon in-process, as tests/test_verify.py does) on each. Then:

- nothing outside staging, the journal and the store was written: the example's directory,
  the camera itself and a "victim" directory the symlinks point at are byte-for-byte as before,
  and nothing appeared beside the example's directory;
- no session crashed (no `session_crashed`/`task_crashed`);
- every regular file is either `verified` in the manifest exactly once, with its bytes under its
  key in the store (its original name in `raw_path_b64` when not UTF-8), or listed `skipped`
  with a reason (a name that collides after percent-encoding); every other entry is listed
  skipped with a reason and never read; nothing else is verified;
- `dockd verify` (its own `main`) passes on the store.

A name whose percent-encoded form is longer than NAME_MAX (more than about 85 bytes that are
not UTF-8) cannot be a store key on a filesystem store: that file alone must end `failed`, with
the reason, left on the camera, and the rest of the session uploaded. Two classes of names were
left out of the strategy while the daemon bugs they showed were open (both fixed; the switches
PERCENT_ENCODED_FITS and LINE_SEPARATORS_SAFE stay): those long names, which failed the whole
session, and names holding U+0085, U+2028 or U+2029, which made `dockd verify` misread
custody.jsonl (found by this test).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults_support import scen

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CAMERA = "X6FUZZ0001"
NAME_MAX = 255
# a name whose percent-encoded form is longer than NAME_MAX once failed the whole session (a
# daemon bug this campaign found, fixed since): now that file alone is recorded failed
PERCENT_ENCODED_FITS = True
# U+0085, U+2028, U+2029 in a name made `dockd verify` misread custody.jsonl (a daemon bug
# this test found, fixed since; test_campaign_findings.py keeps it fixed)
LINE_SEPARATORS_SAFE = True
LINE_SEPARATORS = ("\u0085", "\u2028", "\u2029")
encode_path = scen.encode_path

SPECIAL = [
    b"..a", b".. ", b"...", b"..\xff", b" ", b"  lead", b"trail ", b"a b", b"%", b"%25",
    b"%FF", b"%ff", b"%2F", b"%2e%2e", b"a\\b", b"\\", b"a\nb", b"a\rb", b"\t", b"-", b"-rf",
    b"~", b"*", b"?", b"[x]", b"{a,b}", b"#1", b"$HOME", b"`id`", b";", b"CON", b"nul",
    b"COM1.MP4", b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf",
    b"caf\xc3\xa9", b"cafe\xcc\x81", b"\xef\xbb\xbfbom", b"\x01\x02", b"\x1b[31m", b"\x7f",
    b"a\xe2\x80\xaeb.MP4", b"A.MP4", b"a.mp4", b"A.mp4", b"x" * NAME_MAX,
    ("\u00e9" * 127).encode(), ("\U0001f4f9" * 63).encode(), b"\xff" * 20, b"%FF" * 85,
    b"\xfe" * 90 + b".MP4", b"\xff" * 255,
]  # fmt: skip


def legal(name: bytes) -> bool:
    return bool(name) and b"/" not in name and b"\0" not in name and name not in (b".", b"..")


def fits(name: bytes) -> bool:
    if not LINE_SEPARATORS_SAFE and any(c in encode_path(name) for c in LINE_SEPARATORS):
        return False
    return PERCENT_ENCODED_FITS or len(encode_path(name).encode()) <= NAME_MAX


names = st.one_of(
    st.sampled_from(SPECIAL),
    st.binary(min_size=1, max_size=24),
    st.text(min_size=1, max_size=24).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(100, NAME_MAX).map(lambda n: b"L" * n),
).filter(lambda n: legal(n) and fits(n) and len(n) <= NAME_MAX)

KINDS = ["file", "file", "file", "file", "empty", "symlink", "fifo", "socket", "device"]


@st.composite
def trees(draw: Any) -> dict[str, Any]:
    """Entries (directory parts, name, kind, size) plus a few shapes: a deep chain, many
    files in one folder, names colliding after case folding / NFC-NFD / percent-encoding."""
    pool = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    entries = []
    for _ in range(draw(st.integers(1, 25))):
        depth = draw(st.integers(0, 3))
        parts = [draw(st.sampled_from(pool)) for _ in range(depth)]
        entries.append(
            (parts, draw(names), draw(st.sampled_from(KINDS)), draw(st.integers(0, 70_000)))
        )
    deep = draw(st.integers(0, 40)) if draw(st.booleans()) else 0
    many = draw(st.sampled_from([0, 0, 50, 300]))
    collide = draw(st.booleans())
    targets = draw(st.lists(st.sampled_from(["victim", "../../victim", "/", "self", "nowhere",
                                            "/etc/passwd", "../.."]), max_size=3))  # fmt: skip
    return {"entries": entries, "deep": deep, "many": many, "collide": collide,
            "targets": targets}  # fmt: skip


def build(camera: bytes, victim: bytes, tree: dict[str, Any], seed: int) -> None:
    """Make the tree; an entry whose path runs into an earlier one of another kind is left
    out (a name cannot be a file and a folder at once)."""
    rnd = hashlib.sha256(str(seed).encode()).digest()

    def data(n: int, salt: bytes) -> bytes:
        out = b""
        block = hashlib.sha256(rnd + salt).digest()
        while len(out) < n:
            out += block
            block = hashlib.sha256(block).digest()
        return out[:n]

    def put(rel: bytes, kind: str, size: int) -> None:
        path = os.path.join(camera, rel)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.lexists(path):
                return
            if kind == "file":
                with open(path, "wb") as f:
                    f.write(data(size, rel))
            elif kind == "empty":
                open(path, "wb").close()
            elif kind == "symlink":
                target = [victim + b"/secret.txt", b"../../victim", b"/", path, b"nowhere"][
                    size % 5
                ]
                os.symlink(target, path)
            elif kind == "fifo":
                os.mkfifo(path)
            elif kind == "socket":
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.bind(path)
                except OSError:  # a path too long for sun_path: no socket, then
                    return
                finally:
                    s.close()
            elif kind == "device":
                os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            return
        except OSError as exc:  # a path beyond PATH_MAX: the camera cannot hold it either
            if exc.errno != 36:  # ENAMETOOLONG
                raise

    put(b"DCIM/0001.MP4", "file", 5_000)  # always one ordinary file: a manifest is written
    for parts, name, kind, size in tree["entries"]:
        put(b"/".join([*parts, name]), kind, size)
    if tree["deep"]:
        put(b"/".join([b"d%d" % i for i in range(tree["deep"])] + [b"deep.MP4"]), "file", 300)
    for i in range(tree["many"]):
        put(b"MANY/%04d.MP4" % i, "empty" if i % 3 else "file", i)
    if tree["collide"]:
        for rel in (b"C/A.MP4", b"C/a.mp4", b"C/%FF", b"C/\xff", b"C/caf\xc3\xa9",
                    b"C/cafe\xcc\x81", b"C/x%FFy", b"C/x\xffy"):  # fmt: skip
            put(rel, "file", len(rel) * 100)
    for i, t in enumerate(tree["targets"]):
        name = b"L/link%d" % i
        path = os.path.join(camera, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        target = {"victim": victim, "self": path}.get(t, t.encode())
        with contextlib.suppress(FileExistsError):
            os.symlink(target, path)


def snapshot(root: bytes, skip: tuple[bytes, ...]) -> dict[bytes, tuple[Any, ...]]:
    """Every entry under `root` (but `skip`): kind, mode, size, mtime, content hash / link."""
    out: dict[bytes, tuple[Any, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir.split(b"/")[0] in skip:
            dirs[:] = []
            continue
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            rel = os.path.normpath(os.path.join(rel_dir, n))
            if rel.split(b"/")[0] in skip:
                continue
            s = os.lstat(p)
            what: Any = None
            if stat.S_ISDIR(s.st_mode):  # its entries are compared one by one
                out[rel] = (stat.S_IFMT(s.st_mode), s.st_mode)
                continue
            if stat.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(s.st_mode):
                what = os.readlink(p)
            out[rel] = (stat.S_IFMT(s.st_mode), s.st_mode, s.st_size, s.st_mtime_ns, what)
    return out


def camera_entries(camera: bytes) -> tuple[dict[bytes, bytes], dict[bytes, str]]:
    """Regular files (relative path -> bytes) and every other entry (-> its kind)."""
    files: dict[bytes, bytes] = {}
    others: dict[bytes, str] = {}
    for dirpath, dirs, names_ in os.walk(camera):
        for n in dirs + names_:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, camera)
            m = os.lstat(p).st_mode
            if stat.S_ISREG(m):
                with open(p, "rb") as f:
                    files[rel] = f.read()
            elif not stat.S_ISDIR(m):
                others[rel] = "other"
    return files, others


async def run_daemon(cfg: Any, camera_aside: Path, dock: Path) -> list[str]:
    from dockd.daemon import Daemon
    from dockd.events import Notice

    daemon = Daemon(cfg)
    sub = daemon.bus.subscribe("fuzz")
    task = asyncio.create_task(daemon.run())
    seen: list[str] = []
    try:
        async with asyncio.timeout(60):
            await daemon.ready.wait()
            os.rename(camera_aside, dock / CAMERA)
            async for event in sub:
                if isinstance(event, Notice) and event.camera == CAMERA:
                    seen.append(event.event)
                    if event.event in ("session_uploaded", "upload_failed"):
                        break
                    if event.event == "safe_to_undock" and event.details.get("outcome") == "empty":
                        break
    finally:
        daemon.stop()
        await task
    return seen


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    import structlog

    from dockd.observers.log import setup

    buf = io.StringIO()
    setup("info", stream=buf)
    try:
        yield buf
    finally:
        structlog.reset_defaults()


def offload_untrusted(tree: dict[str, Any], work: Path, seed: int) -> None:
    from dockd.cli import main as dockd_main
    from dockd.config import parse_config

    work.mkdir()
    root = os.fsencode(work)
    aside, dock, victim = work / "aside", work / "dock", work / "victim"
    for d in (aside, dock, work / "evidence", victim):
        d.mkdir()
    (victim / "secret.txt").write_bytes(b"not camera content")
    camera = aside / CAMERA
    camera.mkdir()
    build(os.fsencode(camera), os.fsencode(victim), tree, seed)
    files, others = camera_entries(os.fsencode(camera))
    before = snapshot(root, (b"state", b"evidence"))
    before = {
        (b"dock" + k[len(b"aside") :] if k.startswith(b"aside/" + CAMERA.encode()) else k): v
        for k, v in before.items()
    }
    siblings = sorted(os.listdir(work.parent))
    data = {
        "dock": {"id": "fuzz-dock", "state_dir": str(work / "state")},
        "sources": {"directory": {"enabled": True, "path": str(dock)}},
        "store": {"kind": "filesystem", "path": str(work / "evidence")},
        "mqtt": {"enabled": False},
        "offload": {"min_free_staging": "1KiB", "include": ["**/*"], "exclude": []},
        "upload": {"backoff_initial": "100ms", "backoff_max": "1s"},
    }
    (work / "dockd.toml").write_text(scen.to_toml(data))
    with captured_logs() as logs:
        seen = asyncio.run(run_daemon(parse_config(data), camera, dock))
    events = [json.loads(x) for x in logs.getvalue().splitlines() if x.startswith("{")]

    # no crash, and the session ended uploaded
    crashed = [e for e in events if e.get("event") in ("session_crashed", "task_crashed")]
    assert not crashed, json.dumps(crashed)[:3000]
    assert "session_uploaded" in seen, (seen, [e for e in events if "fail" in e["event"]][:5])

    # nothing written outside staging, the journal and the store
    after = snapshot(root, (b"state", b"evidence", b"dockd.toml"))
    before.pop(b"dockd.toml", None)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"written outside staging/store: {changed[:10]}"
    assert sorted(os.listdir(work.parent)) == siblings
    state = work / "state"
    allowed = {"journal.sqlite3", "journal.sqlite3-wal", "journal.sqlite3-shm", "dock.key"}
    assert {p.name for p in state.iterdir()} - {"staging"} <= allowed
    assert list((state / "staging").iterdir()) == []  # released after the upload

    # every regular file once in the store with its bytes, or skipped with a reason
    store = work / "evidence"
    (cam_dir,) = list((store / CAMERA).iterdir())
    m = json.loads((cam_dir / "manifest.json").read_bytes())
    verified: dict[tuple[str, bytes | None], list[dict[str, Any]]] = {}
    refused: set[str] = set()
    for f in m["files"]:
        if f["status"] == "failed" and "store" in f.get("error", ""):
            # nothing here is unreadable or changing: only a key the store cannot hold fails
            assert any(len(part.encode()) > NAME_MAX for part in f["path"].split("/")), f
            refused.add(f["path"])
            continue
        assert f["status"] == "verified", f
        raw = base64.b64decode(f["raw_path_b64"]) if "raw_path_b64" in f else None
        verified.setdefault((f["path"], raw), []).append(f)
    skipped: dict[str, list[str]] = {}
    for s in m["skipped"]:
        assert s["reason"], s
        skipped.setdefault(s["path"], []).append(s["reason"])
    for rel, body in files.items():
        path = encode_path(rel)
        raw = None if _utf8(rel) else rel
        got = verified.pop((path, raw), [])
        if got:
            assert len(got) == 1, (rel, got)
            f = got[0]
            assert f["sha256"] == hashlib.sha256(body).hexdigest(), rel
            assert f["key"] == f"{CAMERA}/{m['session_id']}/files/{path}"
            obj = store / f["key"]
            assert obj.read_bytes() == body, rel
        elif path in refused:  # failed with the reason, and left on the camera
            assert os.path.isfile(os.path.join(os.fsencode(dock / CAMERA), rel))
        else:
            assert path in skipped, f"{rel!r}: neither verified nor skipped"
    assert not verified, f"verified, yet not a regular file of the camera: {list(verified)[:5]}"
    for rel in others:
        assert encode_path(rel) in skipped, f"{rel!r} (not a regular file) not listed skipped"
    for obj in store.rglob("*"):  # every object inside the session's folder
        rel_obj = obj.relative_to(store)
        assert rel_obj.parts[0] in (CAMERA, ".incoming"), rel_obj
    assert not (store / ".incoming").exists() or not any((store / ".incoming").iterdir())

    # `dockd verify`, its own main, on the whole store
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = dockd_main(["verify", "-c", str(work / "dockd.toml"), "--json"])
    report = json.loads(out.getvalue())
    assert rc == 0 and report["ok"] is True, json.dumps(report)[:3000]


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root: device nodes on the camera")
    return tmp_path_factory.mktemp("untrusted")


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(tree=trees())
def test_untrusted_camera_tree_is_offloaded_whole_and_nothing_escapes(
    workspace: Path, tree: dict[str, Any]
) -> None:
    work = Path(tempfile.mkdtemp(dir=workspace))
    try:
        offload_untrusted(tree, work / "w", seed=len(os.listdir(workspace)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_colliding_and_hostile_names_all_at_once(workspace: Path) -> None:
    """A fixed tree with every special name and every kind of entry, in one camera."""
    entries = [([b"DCIM"], n, "file", 1000 + i) for i, n in enumerate(SPECIAL) if fits(n)]
    entries += [([n], b"in.MP4", "file", 10) for n in SPECIAL[:20] if fits(n)]
    entries += [([b"X"], b"e%d" % i, k, i) for i, k in enumerate(KINDS)]
    targets = ["victim", "../../victim", "/", "self", "nowhere", "/etc/passwd"]
    tree = {"entries": entries, "deep": 40, "many": 50, "collide": True, "targets": targets}
    work = Path(tempfile.mkdtemp(dir=workspace))
    try:
        offload_untrusted(tree, work / "w", seed=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_thousands_of_files_in_one_folder(workspace: Path) -> None:
    """A camera holding a thousand files (most of them empty) in one folder. (3000 took 30 s
    here, fsync-bound: every file is fsynced in staging and in the store, and journalled.)"""
    tree = {"entries": [], "deep": 0, "many": 1000, "collide": False, "targets": []}
    work = Path(tempfile.mkdtemp(dir=workspace))
    try:
        offload_untrusted(tree, work / "w", seed=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
