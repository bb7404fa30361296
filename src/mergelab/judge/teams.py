"""Team tokens for the service (``judge team add/revoke``, ``judge serve``).

A token is ``mlj_KEY_SECRET``: ``KEY`` (12 hex digits) names the database row, ``SECRET`` is 32
random bytes (URL-safe base64). ``team add`` prints it once; the database keeps only a random
salt and ``scrypt(token, salt)`` (N=2^14, r=8, p=1), so a copy of the database does not let anyone
submit. Checking a token costs one scrypt (~50 ms); :class:`TokenChecker` remembers the tokens it
has verified (by their sha256, in memory only) so that a team's next requests cost one SELECT,
which also sees a revocation made meanwhile by another process (``judge team revoke``).
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from mergelab.judge.db import connect, transaction
from mergelab.judge.home import Home, JudgeError
from mergelab.run.manifest import now_iso

TEAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_TOKEN = re.compile(r"mlj_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_SCRYPT = {"n": 1 << 14, "r": 8, "p": 1, "dklen": 32}


@dataclass(frozen=True)
class Team:
    name: str
    key: str


def _hash(token: str, salt: bytes) -> bytes:
    return hashlib.scrypt(token.encode(), salt=salt, **_SCRYPT)


def check_team_name(name: str) -> str:
    if not TEAM_NAME.fullmatch(name or ""):
        raise JudgeError(f"team name {name!r} is not allowed",
                         hint="1-64 characters: letters, digits, '-' and '_', starting with a letter or digit")
    return name


def add_team(root: str | Path, name: str) -> str:
    """A new token for team ``name`` (returned once, never stored); refused while one is active."""
    home = Home(Path(root))
    home.load()
    check_team_name(name)
    key, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    token = f"mlj_{key}_{secret}"
    salt = secrets.token_bytes(16)
    digest = _hash(token, salt)
    conn = connect(home.database)
    try:
        with transaction(conn):
            if conn.execute("SELECT 1 FROM tokens WHERE team = ? AND revoked IS NULL", (name,)).fetchone():
                raise JudgeError(f"team {name} already has an active token",
                                 hint=f"`mergelab judge team revoke {home.root} {name}` first to issue a new one")
            conn.execute("INSERT INTO tokens (key, team, salt, hash, created) VALUES (?, ?, ?, ?, ?)",
                         (key, name, salt, digest, now_iso()))
    finally:
        conn.close()
    return token


def revoke_team(root: str | Path, name: str) -> int:
    """Revoke every active token of team ``name``; returns how many (0: none was active)."""
    home = Home(Path(root))
    home.load()
    conn = connect(home.database)
    try:
        with transaction(conn):
            return conn.execute("UPDATE tokens SET revoked = ? WHERE team = ? AND revoked IS NULL",
                                (now_iso(), name)).rowcount
    finally:
        conn.close()


def list_teams(root: str | Path) -> list[dict]:
    """``[{team, created, revoked}]`` (no hashes, no keys)."""
    home = Home(Path(root))
    conn = connect(home.database)
    try:
        return [dict(r) for r in conn.execute("SELECT team, created, revoked FROM tokens ORDER BY team, created")]
    finally:
        conn.close()


def token_key(token: str) -> str | None:
    """The public key part of a well-formed token, else None (nothing of the token is kept)."""
    m = _TOKEN.fullmatch(token or "")
    return m.group(1) if m else None


class TokenChecker:
    """``check(conn, token)`` → the :class:`Team`, or None for a missing, wrong or revoked token."""

    def __init__(self) -> None:
        self._verified: dict[str, str] = {}      # sha256(token) -> key
        self._lock = threading.Lock()

    def check(self, conn, token: str | None) -> Team | None:
        key = token_key(token or "")
        if key is None:
            return None
        row = conn.execute("SELECT team, salt, hash FROM tokens WHERE key = ? AND revoked IS NULL", (key,)).fetchone()
        if row is None:
            return None
        seen = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            known = self._verified.get(seen) == key
        if not known:
            if not hmac.compare_digest(_hash(token, bytes(row["salt"])), bytes(row["hash"])):
                return None
            with self._lock:
                self._verified[seen] = key
        return Team(row["team"], key)
