"""Opening the journal: one SQLite file (WAL, synchronous=FULL), migrated forward, and the
transaction + custody-append primitive every write goes through.

The journal is the truth. A state change and the custody record that tells of it are written
in one transaction, before anything acts on them.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from dockd.custody import GENESIS, CustodyRecord, canonical_details, hash_with_details_json
from dockd.errors import JournalError
from dockd.ids import utc_now
from dockd.journal.schema import MIGRATIONS

BUSY_TIMEOUT_S = 30.0


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the pragmas every user of the journal needs."""
    try:
        if readonly:
            uri = f"file:{path}?mode=ro"
            conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        else:
            conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        conn.row_factory = sqlite3.Row
        if not readonly:
            # WAL lets `dockd status` read while the daemon writes; FULL makes each commit
            # durable before it returns, which "journal before acting" relies on.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn
    except sqlite3.Error as exc:
        raise JournalError(f"journal {path}: cannot open ({exc})") from None


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Apply every migration not yet applied, each in its own transaction. Returns the version."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise JournalError(
            f"journal {path}: schema version {version} is newer than this dockd knows "
            f"({len(MIGRATIONS)}); upgrade dockd or restore a matching journal"
        )
    for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise JournalError(f"journal {path}: migration {number} failed ({exc})") from None
    return len(MIGRATIONS)


def _statements(sql: str) -> Iterator[str]:
    """Split a migration into statements; triggers hold semicolons, so use sqlite's own test."""
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip():
        yield buf


class Db:
    """A journal connection plus the primitives all journal queries build on."""

    def __init__(self, conn: sqlite3.Connection, path: Path, dock_id: str) -> None:
        self.conn = conn
        self.path = path
        self.dock_id = dock_id
        self._in_tx = False

    @classmethod
    def open(cls, path: Path, dock_id: str) -> Self:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        old_umask = os.umask(0o077)  # journal, -wal and -shm private to the service user
        try:
            conn = connect(path)
            migrate(conn, path)
        finally:
            os.umask(old_umask)
        return cls(conn, path, dock_id)

    @classmethod
    def open_readonly(cls, path: Path, dock_id: str) -> Self:
        if not path.exists():
            raise JournalError(f"journal {path}: does not exist (has the daemon ever run?)")
        conn = connect(path, readonly=True)
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != len(MIGRATIONS):
            raise JournalError(
                f"journal {path}: schema version {version}, this dockd expects {len(MIGRATIONS)}"
            )
        return cls(conn, path, dock_id)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front, so the custody head
        read inside cannot be raced by another process (a CLI command) appending too."""
        if self._in_tx:
            raise JournalError("nested journal transaction")
        self._in_tx = True
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: write failed ({exc})") from exc
        finally:
            self._in_tx = False

    def custody(self, event: str, session_id: str | None = None, **details: Any) -> CustodyRecord:
        """Append one custody record. Must be called inside `tx()`."""
        if not self._in_tx:
            raise JournalError("custody records are appended inside a transaction only")
        return append_custody(self.conn, self.dock_id, event, session_id, details)

    def custody_run(
        self, records: Sequence[tuple[str, str | None, Mapping[str, Any]]]
    ) -> list[CustodyRecord]:
        """Append custody records (event, session id, details) in order, the chain heads read
        once for the run (a batch of files), not twice per record. Must be called inside
        `tx()`."""
        if not self._in_tx:
            raise JournalError("custody records are appended inside a transaction only")
        return append_custody_run(self.conn, self.dock_id, records)

    def one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(sql, args).fetchone()
        return row

    def all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self.conn.execute(sql, args).fetchall()

    def scalar(self, sql: str, *args: Any) -> Any:
        row = self.conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def custody_records(self, session_id: str | None = None) -> Iterator[CustodyRecord]:
        if session_id is None:
            cur = self.conn.execute("SELECT * FROM custody ORDER BY seq")
        else:
            cur = self.conn.execute(
                "SELECT * FROM custody WHERE session_id = ? ORDER BY seq", (session_id,)
            )
        for row in cur:
            yield row_to_record(row)


def row_to_record(row: sqlite3.Row) -> CustodyRecord:
    return CustodyRecord(
        seq=row["seq"],
        at=row["at"],
        dock_id=row["dock_id"],
        session_id=row["session_id"],
        event=row["event"],
        details=json.loads(row["details"]),
        prev_hash=row["prev_hash"],
        session_prev=row["session_prev"],
        hash=row["hash"],
    )


def append_custody(
    conn: sqlite3.Connection,
    dock_id: str,
    event: str,
    session_id: str | None,
    details: Mapping[str, Any],
) -> CustodyRecord:
    return append_custody_run(conn, dock_id, [(event, session_id, details)])[0]


def append_custody_run(
    conn: sqlite3.Connection,
    dock_id: str,
    records: Sequence[tuple[str, str | None, Mapping[str, Any]]],
) -> list[CustodyRecord]:
    """Append custody records (event, session id, details) in order, each linked to the dock
    chain's head and to its session's last record. The heads are read once for the run, not
    per record: callers are inside a write transaction (BEGIN IMMEDIATE), so no other writer
    can move them meanwhile."""
    head = conn.execute("SELECT seq, hash FROM custody ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (0, GENESIS) if head is None else (head[0], head[1])
    session_heads: dict[str, str | None] = {}
    out: list[CustodyRecord] = []
    rows: list[tuple[Any, ...]] = []
    at = utc_now()  # one transaction, one instant; `seq` orders the records
    for event, session_id, details in records:
        session_prev: str | None = None
        if session_id is not None:
            if session_id not in session_heads:
                last = conn.execute(
                    "SELECT hash FROM custody WHERE session_id = ? ORDER BY seq DESC LIMIT 1",
                    (session_id,),
                ).fetchone()
                session_heads[session_id] = None if last is None else last[0]
            session_prev = session_heads[session_id]
        seq += 1
        # serialized once: this text is what is hashed and stored, and what is returned is
        # read back from it (a value JSON cannot hold exactly is stored as its str)
        text = canonical_details(details)
        digest = hash_with_details_json(
            seq=seq,
            at=at,
            dock_id=dock_id,
            session_id=session_id,
            event=event,
            details_json=text,
            prev_hash=prev,
            session_prev=session_prev,
        )
        out.append(
            CustodyRecord(
                seq, at, dock_id, session_id, event, json.loads(text), prev, session_prev, digest
            )
        )
        rows.append((seq, at, dock_id, session_id, event, text, prev, session_prev, digest))
        prev = digest
        if session_id is not None:
            session_heads[session_id] = digest
    conn.executemany(
        "INSERT INTO custody (seq, at, dock_id, session_id, event, details, prev_hash,"
        " session_prev, hash) VALUES (?,?,?,?,?,?,?,?,?)",
        rows,
    )
    return out
