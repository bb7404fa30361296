"""The judge's SQLite database: submissions, rounds, results, predictions and fingerprints.

Every change that matters is one transaction, so a judge killed at any instant leaves either the
whole result of a judged run or none of it; ``judge round`` then finishes what is missing.
"""
from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS submissions (
    id TEXT PRIMARY KEY,            -- sha256 of the submission's files
    team TEXT NOT NULL,
    received TEXT NOT NULL,         -- ISO time (UTC)
    seq INTEGER NOT NULL,           -- order of arrival
    status TEXT NOT NULL,           -- received | rejected | judging | scored | over_time | failed
    reasons TEXT NOT NULL DEFAULT '[]',
    round INTEGER,                  -- the round that judges (or judged) it
    recipe TEXT,                    -- the recipe as submitted (JSON)
    content TEXT,                   -- sha256 of the files: the store folder
    models TEXT                     -- identity of each model: hub repo@sha or sha256 of the files (JSON)
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    started TEXT NOT NULL,
    finished TEXT
);
CREATE TABLE IF NOT EXISTS results (
    submission TEXT PRIMARY KEY REFERENCES submissions(id),
    round INTEGER NOT NULL,
    status TEXT NOT NULL,
    public_score REAL,
    private_score REAL,
    tasks TEXT NOT NULL DEFAULT '{}',    -- {task: {"public": score, "private": score, ...}}
    wall_s REAL,
    peak_mem_mb REAL,
    limit_s REAL,
    manifest TEXT,
    log_tail TEXT,
    isolation TEXT,
    detail TEXT,
    finished TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS predictions (
    submission TEXT NOT NULL,
    task TEXT NOT NULL,
    row_id TEXT NOT NULL,
    prediction TEXT NOT NULL,
    correct REAL,
    PRIMARY KEY (submission, task, row_id)
);
CREATE TABLE IF NOT EXISTS fingerprints (
    submission TEXT PRIMARY KEY,
    vector TEXT NOT NULL               -- JSON list of floats
);
CREATE TABLE IF NOT EXISTS tokens (
    key TEXT PRIMARY KEY,              -- the public part of a team token (mlj_KEY_SECRET)
    team TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,                -- scrypt(token, salt): the token itself is never stored
    created TEXT NOT NULL,
    revoked TEXT
);
CREATE INDEX IF NOT EXISTS submissions_team ON submissions (team, received);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating when needed) the database; rows come back as ``sqlite3.Row``."""
    conn = sqlite3.connect(str(path), timeout=60, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(SCHEMA)
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def loads(text: str | None, default: Any = None) -> Any:
    return json.loads(text) if text else default


def get_state(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    return row["value"] if row else default
