"""A sealed session's objects, written to disk streamed from the journal.

Once every file of a session is in the store, the session gets SHA256SUMS, custody.jsonl, its
ASC MHL history, the manifest and the manifest's signature. A session may hold 100 000 files,
and a dock seals several at once, so nothing here holds a list of a session's files or custody
records: each object is written to a file as its rows are read, a page at a time, and hashed on
the way. What grows is bounded by the session's largest folder (`mhl.HashListBody`).

The bytes are the same however often they are rebuilt (and the same as dockd wrote before it
streamed them): a restart between two objects rebuilds them all, and the store refuses other
bytes under a key it holds. So every value comes from the journal as `seal` froze it, read in
one transaction (one snapshot), on a connection of its own: this runs in an upload thread for
seconds, and the journal thread must not wait for it (it serves every camera's offload).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO

import xxhash

from dockd import __version__
from dockd.custody import CustodyRecord, SliceSummary, canonical
from dockd.errors import CustodyError, JournalError
from dockd.evidence import keys, manifest, mhl, sums
from dockd.evidence.signing import DockKey
from dockd.journal.db import Db, row_to_record
from dockd.journal.rows import FileRow, SessionRow, SkippedRow
from dockd.journal.states import MANIFEST_STATUS, FileState

SEAL_DIR = ".seal"  # in the session's staging folder, whose staged files are named by integers
_PAGE = 1000  # rows fetched at a time
_CHUNK = 1024 * 1024  # bytes hashed and written at a time
_ALL = 2**63 - 1  # no upper bound on a custody seq
_STORED = (FileState.STORED, FileState.CLEARED)
_LISTED = tuple(MANIFEST_STATUS)
_BODY = ".hashlist-body"  # the hash list's elements, before the header that sums them up

Out = Callable[[bytes], object]


@dataclass(frozen=True)
class SealedObject:
    name: str  # relative to the session folder, as `keys.sidecar_key` takes it
    path: Path  # its bytes, on disk
    size: int
    sha256: str


def seal_dir(staging: Path, session_id: str) -> Path:
    return staging / session_id / SEAL_DIR


def write_session_objects(
    journal_path: Path, dock_id: str, session_id: str, out_dir: Path, key: DockKey | None
) -> list[SealedObject]:
    """Write the session's sealed objects into `out_dir` (made afresh, 0700; files 0600) and
    return them in upload order: SHA256SUMS, custody.jsonl, the ASC MHL hash list and chain
    (when there is a history), the signature (with a key), then manifest.json, always last.

    Nothing is fsynced: these are derived from the journal, and a crash leaves at worst a part
    that the next run removes and rebuilds to the same bytes; the store makes what it receives
    durable. Blocking: run it in a worker thread."""
    db = Db.open_readonly(journal_path, dock_id)
    try:
        conn = db.conn
        # temporary tables and sorts on disk, not in memory: they hold a row per file
        conn.execute("PRAGMA temp_store = FILE")
        conn.create_function("dockd_tree_key", 1, mhl.tree_key, deterministic=True)
        _fresh(out_dir)
        conn.execute("BEGIN")  # one snapshot for every object
        row = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise JournalError(f"session {session_id}: unknown")
        objects = _Seal(conn, SessionRow.of(row), dock_id, out_dir).write(key)
        conn.execute("COMMIT")
        return objects
    except sqlite3.Error as exc:
        raise JournalError(
            f"journal {journal_path}: session {session_id}: cannot read it to seal ({exc})"
        ) from exc
    finally:
        db.close()


def _fresh(out_dir: Path) -> None:
    """An empty `out_dir`: what an earlier run (before a crash or a retry) left is rebuilt."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    out_dir.mkdir(mode=0o700)


@dataclass(frozen=True)
class _Written:
    size: int
    sha256: str
    xxh128: str | None  # when asked for: the hash list's own hash of a sidecar
    sha512: bytes | None  # when asked for: a C4 id, or what the signature signs


def _create(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb", buffering=0)


class _Sink:
    """A new file, hashed as it is written: SHA-256 (for the store and the manifest), and
    xxh128 or SHA-512 if asked. Small writes are gathered into chunks, so that each byte is
    hashed and written in a few large calls, not one per line."""

    def __init__(self, path: Path, *, xxh128: bool = False, sha512: bool = False) -> None:
        self._file = _create(path)
        self._buf = bytearray()
        self._size = 0
        self._sha256 = hashlib.sha256()
        self._xxh128 = xxhash.xxh3_128() if xxh128 else None
        self._sha512 = hashlib.sha512() if sha512 else None

    def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= _CHUNK:
            self._flush()

    def close(self) -> _Written:
        try:
            self._flush()
        finally:
            self._file.close()
        return _Written(
            self._size,
            self._sha256.hexdigest(),
            None if self._xxh128 is None else self._xxh128.hexdigest(),
            None if self._sha512 is None else self._sha512.digest(),
        )

    def _flush(self) -> None:
        data = self._buf
        self._sha256.update(data)
        if self._xxh128 is not None:
            self._xxh128.update(data)
        if self._sha512 is not None:
            self._sha512.update(data)
        self._file.write(data)
        self._size += len(data)
        self._buf = bytearray()


class _Seal:
    """One session's objects, from one connection inside one read transaction."""

    def __init__(
        self, conn: sqlite3.Connection, session: SessionRow, dock_id: str, out_dir: Path
    ) -> None:
        self.conn = conn
        self.session = session
        self.dock_id = dock_id
        self.out_dir = out_dir
        self.last_seq = _ALL if session.custody_last_seq is None else session.custody_last_seq

    def write(self, key: DockKey | None) -> list[SealedObject]:
        sums_w = self._object(keys.SUMS, self._write_sums, xxh128=True)
        history = self._history_possible()
        slice_, tool_version, custody_w = self._custody(copy_times=history)
        sidecars = [(keys.SUMS, sums_w), (keys.CUSTODY, custody_w)]
        if history:
            sidecars += self._history(sidecars, tool_version)
        m = self._manifest(sidecars, slice_, key)
        signed = []
        if key is not None:
            digest = m.sha512
            assert digest is not None
            sig = self._object(manifest.SIGNATURE, lambda out: out(key.sign_sha512(digest)))
            signed.append((manifest.SIGNATURE, sig))
        return [
            SealedObject(name, self.out_dir / name, w.size, w.sha256)
            for name, w in [*sidecars, *signed, (keys.MANIFEST, m)]
        ]

    # --- one object each ---------------------------------------------------------------------

    def _object(
        self,
        name: str,
        fill: Callable[[Out], object],
        *,
        xxh128: bool = False,
        sha512: bool = False,
    ) -> _Written:
        sink = _Sink(self.out_dir / name, xxh128=xxh128, sha512=sha512)
        try:
            fill(sink.write)
        finally:
            written = sink.close()
        return written

    def _write_sums(self, out: Out) -> None:
        # SQLite's BINARY order of UTF-8 is code point order: Python's sort of the paths
        for row in self._rows(
            "SELECT sha256, path FROM files WHERE session_id = ? AND state IN (?, ?) ORDER BY path",
            self.session.id,
            *_STORED,
        ):
            out(sums.sums_line(row[0] or "", row[1]).encode())

    def _custody(self, *, copy_times: bool) -> tuple[SliceSummary, str, _Written]:
        """custody.jsonl, and on the way what else needs the records: the manifest's summary of
        them, the dockd version that sealed and, for the hash list, each file's copy time."""
        first: CustodyRecord | None = None
        last: CustodyRecord | None = None
        tool_version: str | None = None
        copies: list[tuple[str, str]] = []
        if copy_times:
            self._copy_times_table()
        sink = _Sink(self.out_dir / keys.CUSTODY, xxh128=True)
        try:
            for row in self._rows(
                "SELECT * FROM custody WHERE session_id = ? AND seq <= ? ORDER BY seq",
                self.session.id,
                self.last_seq,
            ):
                r = row_to_record(row)
                sink.write(_custody_line(r).encode())
                first = first or r
                last = r
                if tool_version is None and r.event == "sealed" and "dockd_version" in r.details:
                    tool_version = str(r.details["dockd_version"])
                if copy_times and r.event == "file_offloaded":
                    path, at = r.details.get("path"), r.details.get("at")
                    if isinstance(path, str) and isinstance(at, str):
                        copies.append((path, at))
                        if len(copies) >= _PAGE:
                            self._copied(copies)
            if copy_times:
                self._copied(copies)
        finally:
            written = sink.close()
        if first is None or last is None:
            raise CustodyError(f"session {self.session.id}: no custody records")
        summary = SliceSummary(first.seq, last.seq, first.prev_hash, last.hash)
        return summary, tool_version or __version__, written

    def _history_possible(self) -> bool:
        """No ASC MHL history when a stored file has no xxh128 (offloaded by a dockd that did
        not compute it): a history leaving out files would read as "new file" to every
        verifier, and the footage is not read again."""
        missing = self.conn.execute(
            "SELECT 1 FROM files WHERE session_id = ? AND state IN (?, ?) AND xxh128 IS NULL"
            " LIMIT 1",
            (self.session.id, *_STORED),
        ).fetchone()
        return missing is None

    def _copy_times_table(self) -> None:
        """Path -> the `at` of its last `file_offloaded` record (the copy its xxh128 was made
        in), filled while custody.jsonl is written: a temporary table (on disk), not a dict of
        every path."""
        self.conn.execute("DROP TABLE IF EXISTS temp.seal_copied")
        self.conn.execute(
            "CREATE TEMP TABLE seal_copied (path TEXT PRIMARY KEY, at TEXT NOT NULL) WITHOUT ROWID"
        )

    def _copied(self, copies: list[tuple[str, str]]) -> None:
        # in seq order: a later copy of a path replaces the earlier one
        self.conn.executemany(
            "INSERT OR REPLACE INTO temp.seal_copied (path, at) VALUES (?, ?)", copies
        )
        copies.clear()

    def _history(
        self, sidecars: list[tuple[str, _Written]], tool_version: str
    ) -> list[tuple[str, _Written]]:
        """The ASC MHL hash list and its chain."""
        s = self.session
        sealed = mhl.sealing_time(s)
        body_path = self.out_dir / _BODY
        with io.BufferedWriter(_create(body_path), _CHUNK) as body_file:
            body = mhl.HashListBody(body_file.write)
            for row in self._history_rows():
                body.add(mhl.file_entry(row[0], row[1], row[2], row[3], row[4]))
            # root files, after `files/` and everything in it (tree order: folders first)
            for name, w in sorted(sidecars, key=lambda sc: mhl.tree_key(sc[0])):
                assert w.xxh128 is not None
                body.add(mhl.sidecar_entry(name, w.size, w.xxh128, sealed))
            content, structure = body.finish()
        name = mhl.hash_list_name(s.id, sealed)
        (self.out_dir / keys.ASCMHL).mkdir(mode=0o700)
        head = mhl.header(
            root_content=content,
            root_structure=structure,
            created=mhl.seconds(sealed),
            hostname=self.dock_id,
            tool_version=tool_version,
            comment=mhl.comment(s, self.dock_id),
        )

        def assemble(out: Out) -> None:
            out(head)
            with body_path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    out(chunk)
            out(mhl.FOOTER)

        # the body stays until the staging folder goes, after the upload: nothing under staging
        # is removed before then, so the first removal there is its release (a crash test's
        # marker), and a rebuild starts from an empty folder anyway
        hash_list = self._object(name, assemble, sha512=True)
        assert hash_list.sha512 is not None
        c4_id = mhl.c4_of_sha512(hash_list.sha512)
        chain = self._object(mhl.CHAIN, lambda out: out(mhl.chain([(name, c4_id)])))
        return [(name, hash_list), (mhl.CHAIN, chain)]

    def _history_rows(self) -> Iterator[sqlite3.Row]:
        """The stored files in the hash list's order, each with its copy time."""
        return self._rows(
            "SELECT f.path, f.size, f.xxh128, f.mtime_ns, c.at FROM files AS f"
            " LEFT JOIN temp.seal_copied AS c ON c.path = f.path"
            " WHERE f.session_id = ? AND f.state IN (?, ?)"
            " ORDER BY dockd_tree_key('files/' || f.path)",
            self.session.id,
            *_STORED,
        )

    def _manifest(
        self, sidecars: list[tuple[str, _Written]], custody: SliceSummary, key: DockKey | None
    ) -> _Written:
        sid = self.session.id
        states = {
            FileState(r[0])
            for r in self.conn.execute(
                "SELECT DISTINCT state FROM files WHERE session_id = ?", (sid,)
            )
        }
        marks = ",".join("?" * len(_LISTED))
        files = (
            FileRow.of(r)
            for r in self._rows(
                f"SELECT * FROM files WHERE session_id = ? AND state IN ({marks}) ORDER BY path",
                sid,
                *_LISTED,
            )
        )
        abandoned = (
            FileRow.of(r)
            for r in self._rows(
                "SELECT * FROM files WHERE session_id = ? AND state = ? ORDER BY path",
                sid,
                FileState.ABANDONED,
            )
        )
        skipped = (
            SkippedRow(r[0], r[1], r[2])
            for r in self._rows(
                "SELECT path, raw_path, reason FROM skipped WHERE session_id = ? ORDER BY path",
                sid,
            )
        )
        return self._object(
            keys.MANIFEST,
            lambda out: manifest.write(
                out,
                session=self.session,
                dock_id=self.dock_id,
                states=states,
                files=files,
                abandoned=abandoned,
                skipped=skipped,
                sidecars=[(n, w.size, w.sha256) for n, w in sidecars],
                custody=custody,
                key_id=None if key is None else key.key_id,
            ),
            sha512=True,
        )

    def _rows(self, sql: str, *args: object) -> Iterator[sqlite3.Row]:
        cur = self.conn.execute(sql, args)
        while page := cur.fetchmany(_PAGE):
            yield from page


_RECORD_FIELDS = tuple(f.name for f in fields(CustodyRecord))


def _custody_line(r: CustodyRecord) -> str:
    """`r.to_json()` and a newline, byte for byte, without `dataclasses.asdict`'s deep copy of
    every record (most of the time of a seal of thousands of files): the same fields, the same
    canonical JSON."""
    return canonical({name: getattr(r, name) for name in _RECORD_FIELDS}) + "\n"
