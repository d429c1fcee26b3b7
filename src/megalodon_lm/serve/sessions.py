"""Sessions: ownership, one turn at a time, and a bounded in-memory set of recent states.

Every committed turn is in the database (store.py), so the in-memory cache is only a read cache: when it
holds `max_cached` sessions the least recently used one is dropped and, when needed again, read back
from the database. Memory therefore does not grow with the number of sessions, and a session's own
state has a size fixed by the model.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict

from .protocol import ApiError
from .sampling import new_generator, rng_bytes
from .store import SessionInfo, SessionSnapshot, SessionStore


def owner_of(api_key: str | None) -> str:
    """What the store keeps for a key: a digest, never the key itself ("" without keys)."""
    return "" if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()[:32]


def not_found(session_id: str) -> ApiError:
    return ApiError(404, f"no session {session_id!r}", "session_not_found", "session_id")


class SessionManager:
    def __init__(self, store: SessionStore, fingerprint: str, max_cached: int = 64) -> None:
        if max_cached < 1:
            raise ValueError(f"max_cached must be >= 1, got {max_cached}")
        self.store, self.fingerprint, self.max_cached = store, fingerprint, max_cached
        self._cache: OrderedDict[str, SessionSnapshot] = OrderedDict()
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def cached_ids(self) -> list[str]:
        with self._lock:
            return list(self._cache)

    def create(self, owner: str, seed: int | None) -> SessionInfo:
        return self.store.create("sess-" + secrets.token_hex(12), owner, self.fingerprint,
                                 rng_bytes(new_generator(seed)))

    def info(self, session_id: str, owner: str) -> SessionInfo:
        """The session's metadata; 404 for an unknown session or another key's (no hint that it exists)."""
        info = self.store.info(session_id)
        if info is None or info.owner != owner:
            raise not_found(session_id)
        return info

    def _check_model(self, info: SessionInfo) -> None:
        if info.fingerprint != self.fingerprint:
            raise ApiError(409, f"session {info.id!r} was created under another model (fingerprint "
                                f"{info.fingerprint}, this server's is {self.fingerprint}); its state does not "
                                "apply here", "model_mismatch", "session_id")

    def acquire(self, session_id: str, owner: str) -> SessionSnapshot:
        """Start a turn: the last committed snapshot. One turn per session at a time (else 409)."""
        info = self.info(session_id, owner)
        self._check_model(info)
        with self._lock:
            if session_id in self._busy:
                raise ApiError(409, f"session {session_id!r} is busy with another request; retry when it ends",
                               "session_busy", "session_id")
            self._busy.add(session_id)
            snap = self._cache.get(session_id)
            if snap is not None:
                self._cache.move_to_end(session_id)
        if snap is None or snap.turns != info.turns:
            try:
                snap = self.store.snapshot(session_id)
            except BaseException:
                self.release(session_id)
                raise
            if snap is None:
                self.release(session_id)
                raise not_found(session_id)
            self._remember(session_id, snap)
        return snap

    def release(self, session_id: str) -> None:
        with self._lock:
            self._busy.discard(session_id)

    def commit(self, session_id: str, snap: SessionSnapshot, messages: list[tuple[str, str]]) -> bool:
        """Write the turn (one transaction); on success it becomes the cached snapshot."""
        ok = self.store.commit_turn(session_id, snap, messages)
        if ok:
            self._remember(session_id, snap)
        return ok

    def delete(self, session_id: str, owner: str) -> None:
        self.info(session_id, owner)
        with self._lock:
            if session_id in self._busy:
                raise ApiError(409, f"session {session_id!r} is busy; delete it when its request ends",
                               "session_busy", "session_id")
            self._cache.pop(session_id, None)
        self.store.delete(session_id)

    def _remember(self, session_id: str, snap: SessionSnapshot) -> None:
        with self._lock:
            self._cache[session_id] = snap
            self._cache.move_to_end(session_id)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
