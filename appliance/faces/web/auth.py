"""The web page's sessions and the limit on guessing. The admin password and the API tokens
are the supervisor's (appliance.supervisor.accounts), reached through the ops.

Holding the button resets the password, which bumps the ops' `auth_epoch` and so ends every
session.
"""
from __future__ import annotations

import collections
import secrets
import time
from dataclasses import dataclass, field

SESSION_IDLE_S = 12 * 3600
MAX_SESSIONS = 2000


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
