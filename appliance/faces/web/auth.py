"""Who may use the web page: the admin password (scrypt), sessions, API tokens, and the limit on
guessing.

There is no default password. The first admin is set on the claim page while the claim window
is open (a short press of the button on the box); holding the button resets it, which bumps
`sup.auth_epoch` and so ends every session.
"""
from __future__ import annotations

import base64
import collections
import datetime
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from appliance.errors import ConfigError

SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}
MIN_PASSWORD = 10
MAX_PASSWORD = 1024
TOKENS_SETTING = "api_tokens"
SESSION_IDLE_S = 12 * 3600
MAX_SESSIONS = 2000


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str, **params) -> dict:
    """{"salt", "hash", "n", "r", "p", "dklen"}: scrypt with a fresh salt, parameters kept
    with the hash so they can be raised later without breaking old hashes."""
    p = {**SCRYPT, **params}
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=p["n"], r=p["r"], p=p["p"],
                            dklen=p["dklen"], maxmem=128 * 1024 * 1024)
    return {"salt": _b64(salt), "hash": _b64(digest), **p}


def verify_password(password: str, stored: dict) -> bool:
    try:
        salt, expected = base64.b64decode(stored["salt"]), base64.b64decode(stored["hash"])
        digest = hashlib.scrypt(password.encode(), salt=salt, n=int(stored["n"]),
                                r=int(stored["r"]), p=int(stored["p"]), dklen=len(expected),
                                maxmem=128 * 1024 * 1024)
    except (KeyError, TypeError, ValueError):
        return False
    return hmac.compare_digest(digest, expected)


def check_new_credentials(user, password, confirm) -> str:
    """The checked user name; raises ConfigError naming what is wrong."""
    if not isinstance(user, str) or not 1 <= len(user.strip()) <= 64 or not user.strip().isprintable():
        raise ConfigError("user: 1 to 64 printable characters")
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise ConfigError(f"password: at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ConfigError(f"password: at most {MAX_PASSWORD} characters")
    if password != confirm:
        raise ConfigError("password: the two entries differ")
    return user.strip()


@dataclass
class Session:
    id: str
    csrf: str
    user: str | None          # None: not logged in (the login and claim forms' CSRF token)
    epoch: int
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)
    flash: list = field(default_factory=list)


class Sessions:
    """In memory: a restart of the supervisor logs everyone out, which is fine."""

    def __init__(self, idle_s: float = SESSION_IDLE_S, clock=time.monotonic):
        self._by_id: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self.idle_s = idle_s
        self.clock = clock

    def new(self, user: str | None, epoch: int) -> Session:
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), user, epoch,
                    self.clock(), self.clock())
        self._by_id[s.id] = s
        while len(self._by_id) > MAX_SESSIONS:     # anonymous ones first
            victim = next((k for k, v in self._by_id.items() if v.user is None),
                          next(iter(self._by_id)))
            del self._by_id[victim]
        return s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        now = self.clock()
        if now - s.seen > self.idle_s:
            self.drop(sid)
            return None
        s.seen = now
        return s

    def drop(self, sid: str) -> None:
        self._by_id.pop(sid, None)

    def drop_users(self) -> None:
        for sid in [k for k, v in self._by_id.items() if v.user is not None]:
            del self._by_id[sid]

    def __len__(self):
        return len(self._by_id)


class RateLimiter:
    """At most `limit` failures per client address in `window` seconds; then refused (429)
    until the oldest failure leaves the window."""

    def __init__(self, limit: int = 5, window: float = 60.0, clock=time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self._failures: dict[str, collections.deque] = {}

    def _recent(self, addr: str) -> collections.deque:
        q = self._failures.get(addr)
        if q is None:
            return collections.deque()
        cutoff = self.clock() - self.window
        while q and q[0] <= cutoff:
            q.popleft()
        if not q:
            del self._failures[addr]
        return q

    def retry_after(self, addr: str) -> int | None:
        q = self._recent(addr)
        if len(q) < self.limit:
            return None
        return max(1, int(q[0] + self.window - self.clock()) + 1)

    def fail(self, addr: str) -> None:
        self._failures.setdefault(addr, collections.deque()).append(self.clock())
        if len(self._failures) > 10000:      # bounded: forget the quietest addresses
            for k in list(self._failures)[:1000]:
                del self._failures[k]

    def clear(self, addr: str) -> None:
        self._failures.pop(addr, None)


# -- API tokens (stored hashed in the store's settings) --------------------------------------

def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def list_tokens(store) -> list[dict]:
    return [{k: v for k, v in t.items() if k != "sha256"}
            for t in (store.get_setting(TOKENS_SETTING) or [])]


def create_token(store, name, now: datetime.datetime) -> tuple[str, dict]:
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 64 or not name.strip().isprintable():
        raise ConfigError("token name: 1 to 64 printable characters")
    tokens = store.get_setting(TOKENS_SETTING) or []
    if any(t["name"] == name.strip() for t in tokens):
        raise ConfigError(f"token name: {name.strip()!r} exists already")
    if len(tokens) >= 50:
        raise ConfigError("token: at most 50 tokens; delete one first")
    token = "kalki_" + secrets.token_urlsafe(32)
    rec = {"id": secrets.token_hex(6), "name": name.strip(), "sha256": _token_hash(token),
           "created": now.isoformat(timespec="seconds")}
    store.set_setting(TOKENS_SETTING, tokens + [rec])
    return token, {k: v for k, v in rec.items() if k != "sha256"}


def delete_token(store, token_id: str) -> dict:
    tokens = store.get_setting(TOKENS_SETTING) or []
    gone = next((t for t in tokens if t["id"] == token_id), None)
    if gone is None:
        raise ConfigError(f"token {token_id!r} does not exist")
    store.set_setting(TOKENS_SETTING, [t for t in tokens if t["id"] != token_id])
    return {k: v for k, v in gone.items() if k != "sha256"}


def token_owner(store, token: str) -> dict | None:
    digest = _token_hash(token)
    found = None
    for t in store.get_setting(TOKENS_SETTING) or []:
        if hmac.compare_digest(t["sha256"], digest):
            found = t
    return found
