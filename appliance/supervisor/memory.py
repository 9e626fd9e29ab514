"""What the rules see of the recent past, kept in memory only: each device's last telemetry
reports and the last alerts. Not worth a write to the SD card; a restart starts it afresh."""
from __future__ import annotations

import asyncio
import collections
import ctypes
import datetime

TELEMETRY_KEPT = 64     # reports per device: what rules' windows and aggregates see
ALERTS_KEPT = 20000


class Recent:
    def __init__(self) -> None:
        # Per device its last reports: when (POSIX seconds: a float is half a datetime) and
        # what, in two rings kept the same length. Not (when, what) pairs: the collector never
        # untracks a tuple that holds a dict, and 64 of them per device were 64,000 objects
        # every full collection walked at 1,000 devices.
        self._telemetry: dict[str, tuple[collections.deque, collections.deque]] = {}
        self._alerts: collections.deque = collections.deque(maxlen=ALERTS_KEPT)

    def add_telemetry(self, device: str, payload: dict, at: datetime.datetime) -> dict:
        """Keeps a report; returns the payload kept (an equal earlier one is shared)."""
        kept = self._telemetry.get(device)
        if kept is None:
            kept = self._telemetry[device] = (collections.deque(maxlen=TELEMETRY_KEPT),
                                              collections.deque(maxlen=TELEMETRY_KEPT))
        elif kept[1][-1] == payload:     # (a ring is never empty once made)
            payload = kept[1][-1]    # the same report again (most sensors repeat themselves): share it
        times, payloads = kept
        times.append(at.timestamp())
        payloads.append(payload)
        return payload

    def add_alert(self, at: datetime.datetime, device: str | None, kind: str) -> None:
        self._alerts.append((at, device, kind))

    def rename(self, device: str, new: str) -> None:
        """A device renamed: its reports and alerts are the new name's."""
        if device in self._telemetry:
            self._telemetry[new] = self._telemetry.pop(device)
        if any(dev == device for _, dev, _ in self._alerts):
            self._alerts = collections.deque(((at, new if dev == device else dev, kind)
                                              for at, dev, kind in self._alerts), maxlen=ALERTS_KEPT)

    def alerts(self, device, types, since) -> int:
        # newest first, stopping at the window's start
        count = 0
        for at, dev, typ in reversed(self._alerts):
            if at < since:
                break
            if (device is None or dev == device) and (types is None or typ in types):
                count += 1
        return count

    def telemetry(self, device, field, last=None, since=None) -> list:
        # newest first, stopping as soon as the window or the count is full: this runs for
        # every rule on every report
        values: list = []
        kept = self._telemetry.get(device)
        if kept is None:
            return values
        since_s = since.timestamp() if since is not None else None
        for at, payload in zip(reversed(kept[0]), reversed(kept[1])):
            if since_s is not None and at < since_s:
                break
            if field in payload:
                values.append(payload[field])
                if last is not None and len(values) >= last:
                    break
        values.reverse()
        return values

    def reports(self, device: str, limit: int, tz) -> list[tuple[datetime.datetime, dict]]:
        """The device's last reports, newest first, for people to read."""
        kept = self._telemetry.get(device)
        rows = list(zip(kept[0], kept[1]))[-limit:] if kept else []
        return [(datetime.datetime.fromtimestamp(at, tz), payload) for at, payload in reversed(rows)]


class Listeners:
    """The live view's and the LEDs' queues of events: {"kind": "posture"|"alert"|"decision"|
    "device"|"panel", ...}. A stalled reader loses events, never the supervisor."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue] = set()

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1000)
        self._queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._queues.discard(q)

    def __len__(self) -> int:
        return len(self._queues)

    def notify(self, event: dict) -> None:
        for q in list(self._queues):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                pass


def _glibc(name: str):
    """A glibc function by name, or None under another C library."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None


_MALLOC_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")
M_ARENA_MAX = -8        # glibc's mallopt parameter


def one_malloc_arena() -> bool:
    """Every thread allocates from the main C heap. glibc gives each thread that allocates
    an arena of its own (paho's, the store's writer, the executor's workers), each keeping
    its own free pages; the threads hardly run at once (the GIL), so one arena costs nothing
    and saved 2-3 MB of a 100-device supervisor. Called before any thread starts. False
    where the C library cannot."""
    return _MALLOPT is not None and bool(_MALLOPT(M_ARENA_MAX, 1))


def give_back_free_memory() -> bool:
    """Hands the pages the C heap holds free back to the system. A burst of posture changes
    (nftables' answers, the state file's text, 2,600 decisions) leaves megabytes free inside
    the heap, resident until something reuses them: about 2 MB of a 100-device supervisor
    after a burst. False where the C library cannot."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
