"""The journal's schema as forward migrations. `PRAGMA user_version` is the applied count.

A migration is never edited once released: a change is a new entry at the end.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: cameras, sessions, files, skipped entries, the custody chain, dock facts
    """
    CREATE TABLE cameras (
        id          TEXT PRIMARY KEY,
        source      TEXT NOT NULL,
        location    TEXT NOT NULL,
        vendor_id   TEXT,
        model_id    TEXT,
        docked      INTEGER NOT NULL DEFAULT 0,
        docked_at   TEXT,
        undocked_at TEXT
    ) STRICT;

    CREATE TABLE sessions (
        id              TEXT PRIMARY KEY,
        camera          TEXT NOT NULL,
        state           TEXT NOT NULL,
        docked_at       TEXT NOT NULL,
        offloaded_at    TEXT,
        sealed_at       TEXT,
        uploaded_at     TEXT,
        cleared_at      TEXT,
        vendor_id       TEXT,
        model_id        TEXT,
        officer         TEXT,
        priority        INTEGER NOT NULL DEFAULT 0,
        custody_last_seq INTEGER,
        manifest_sha256 TEXT,
        error           TEXT
    ) STRICT;
    CREATE INDEX sessions_by_camera ON sessions (camera, state);
    CREATE INDEX sessions_by_state ON sessions (state, priority DESC, docked_at, id);

    CREATE TABLE files (
        id          INTEGER PRIMARY KEY,
        session_id  TEXT NOT NULL REFERENCES sessions (id),
        camera      TEXT NOT NULL,
        path        TEXT NOT NULL,
        raw_path    BLOB,
        size        INTEGER NOT NULL,
        mtime_ns    INTEGER NOT NULL,
        state       TEXT NOT NULL,
        sha256      TEXT,
        key         TEXT,
        attempts    INTEGER NOT NULL DEFAULT 0,
        error       TEXT,
        verified_at TEXT,
        stored_at   TEXT,
        UNIQUE (session_id, path)
    ) STRICT;
    CREATE INDEX files_by_camera_path ON files (camera, path, size, mtime_ns, state);
    CREATE INDEX files_by_session_state ON files (session_id, state, path);

    CREATE TABLE skipped (
        session_id TEXT NOT NULL REFERENCES sessions (id),
        path       TEXT NOT NULL,
        raw_path   BLOB,
        reason     TEXT NOT NULL,
        PRIMARY KEY (session_id, path)
    ) STRICT;

    CREATE TABLE custody (
        seq          INTEGER PRIMARY KEY,
        at           TEXT NOT NULL,
        dock_id      TEXT NOT NULL,
        session_id   TEXT,
        event        TEXT NOT NULL,
        details      TEXT NOT NULL,
        prev_hash    TEXT NOT NULL,
        session_prev TEXT,
        hash         TEXT NOT NULL UNIQUE
    ) STRICT;
    CREATE INDEX custody_by_session ON custody (session_id, seq);
    -- append-only is enforced by the database, not only by our code
    CREATE TRIGGER custody_no_update BEFORE UPDATE ON custody
        BEGIN SELECT RAISE(ABORT, 'custody log is append-only'); END;
    CREATE TRIGGER custody_no_delete BEFORE DELETE ON custody
        BEGIN SELECT RAISE(ABORT, 'custody log is append-only'); END;

    CREATE TABLE dock (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;
    """,
    # 2: the xxh128 of each file, computed inline while copying, for the ASC MHL history
    """
    ALTER TABLE files ADD COLUMN xxh128 TEXT;
    """,
)
