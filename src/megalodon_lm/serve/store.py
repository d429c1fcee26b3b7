"""The session store: SQLite (standard library) in WAL mode.

One row per session holds its latest committed turn: the stream state (safetensors bytes of
`StreamState.to_dict()`, never pickle), the pending tokens, the tail text, the sampler's generator state,
the token count and the model fingerprint. Messages are rows of their own. `commit_turn` writes all of a
turn in one transaction, guarded by the turn number it started from, so a turn is either wholly there or
not at all: a crash, a kill -9 or a dropped client leaves the previous turn. synchronous=NORMAL: with WAL
a committed turn survives a killed process; a power cut may lose the last turns, never consistency.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..models import StreamState
from ..training.checkpoint import unaliased_cpu

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    state BLOB,
    state_bytes INTEGER NOT NULL DEFAULT 0,
    pending TEXT NOT NULL DEFAULT '[]',
    tail TEXT NOT NULL DEFAULT '',
    rng BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (owner, updated);
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    turn INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
);
"""


@dataclass
class SessionInfo:
    """A session's metadata (no state)."""

    id: str
    owner: str
    fingerprint: str
    created: float
    updated: float
    turns: int
    tokens: int
    state_bytes: int
    messages: int


@dataclass
class SessionSnapshot:
    """A committed turn's resumable state: the stream state (None before the first turn), the tokens not yet
    fed (pending), the text the model wrote after its last reply (tail) and the generator state."""

    state: StreamState | None
    pending: list[int]
    tail: str
    rng: bytes
    turns: int


def state_to_bytes(state: StreamState) -> bytes:
    return st_save(unaliased_cpu(state.to_dict()))


def state_from_bytes(data: bytes) -> StreamState:
    return StreamState.from_dict(st_load(data))


def state_nbytes(state: StreamState | None) -> int:
    return 0 if state is None else state.nbytes()


class SessionStore:
    """Thread-safe (one connection behind a lock; every call is short)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def size_bytes(self) -> int:
        """Database file plus its write-ahead log."""
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    # ------------------------------------------------------------------ sessions
    def create(self, session_id: str, owner: str, fingerprint: str, rng: bytes) -> SessionInfo:
        now = time.time()
        with self._lock:
            self._db.execute("INSERT INTO sessions (id, owner, fingerprint, created, updated, rng) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (session_id, owner, fingerprint, now, now, rng))
        return SessionInfo(session_id, owner, fingerprint, now, now, 0, 0, 0, 0)

    _INFO = ("SELECT s.id, s.owner, s.fingerprint, s.created, s.updated, s.turns, s.tokens, s.state_bytes, "
             "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) FROM sessions s")

    def info(self, session_id: str) -> SessionInfo | None:
        with self._lock:
            row = self._db.execute(self._INFO + " WHERE s.id = ?", (session_id,)).fetchone()
        return None if row is None else SessionInfo(*row)

    def list(self, owner: str, limit: int = 100) -> list[SessionInfo]:
        """The owner's sessions, most recently updated first."""
        with self._lock:
            rows = self._db.execute(self._INFO + " WHERE s.owner = ? ORDER BY s.updated DESC LIMIT ?",
                                    (owner, limit)).fetchall()
        return [SessionInfo(*r) for r in rows]

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def snapshot(self, session_id: str) -> SessionSnapshot | None:
        with self._lock:
            row = self._db.execute("SELECT state, pending, tail, rng, turns FROM sessions WHERE id = ?",
                                   (session_id,)).fetchone()
        if row is None:
            return None
        state = None if row[0] is None else state_from_bytes(row[0])
        return SessionSnapshot(state, json.loads(row[1]), row[2], bytes(row[3]), row[4])

    def messages(self, session_id: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT role, content, turn, created FROM messages WHERE session_id = ? "
                                    "ORDER BY seq", (session_id,)).fetchall()
        return [{"role": r, "content": c, "turn": t, "created": int(cr)} for r, c, t, cr in rows]

    def commit_turn(self, session_id: str, snap: SessionSnapshot, messages: list[tuple[str, str]]) -> bool:
        """Write a finished turn (snap.turns = the new turn number) and its messages in one transaction.
        False (nothing written) when the session is gone or another turn was committed meanwhile."""
        assert snap.state is not None
        blob = state_to_bytes(snap.state)
        tokens = int(snap.state.positions[0])
        now = time.time()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute(
                    "UPDATE sessions SET state = ?, state_bytes = ?, tokens = ?, pending = ?, tail = ?, rng = ?, "
                    "turns = ?, updated = ? WHERE id = ? AND turns = ?",
                    (blob, snap.state.nbytes(), tokens, json.dumps(snap.pending), snap.tail, snap.rng, snap.turns,
                     now, session_id, snap.turns - 1))
                if cur.rowcount != 1:
                    self._db.execute("ROLLBACK")
                    return False
                seq = self._db.execute("SELECT COALESCE(MAX(seq), -1) FROM messages WHERE session_id = ?",
                                       (session_id,)).fetchone()[0]
                self._db.executemany(
                    "INSERT INTO messages (session_id, seq, turn, role, content, created) VALUES (?, ?, ?, ?, ?, ?)",
                    [(session_id, seq + 1 + i, snap.turns, role, content, now)
                     for i, (role, content) in enumerate(messages)])
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return True

