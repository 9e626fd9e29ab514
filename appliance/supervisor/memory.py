"""What the rules see of the recent past, kept in memory only: each device's last telemetry
reports and the last alerts. Not worth a write to the SD card; a restart starts it afresh."""
from __future__ import annotations

import asyncio
import collections
import ctypes
import datetime
import gc
import time
from collections.abc import Callable

TELEMETRY_KEPT = 64     # reports per device: what rules' windows and aggregates see
ALERTS_KEPT = 20000
FULL_EVERY_TICKS = 60   # a full pass every 60 of the ticker's steps (15 s)
WHOLE_HEAP_SECONDS = 600.0
# gc.get_freeze_count() walks the frozen objects one by one (about 75,000 at 1,000 devices):
# the status, which the web page asks at every posture change, counts them this often at most
FROZEN_COUNT_SECONDS = 10.0


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


class Collector:
    """The supervisor's garbage collection, run by its ticker between events (appliance.run
    switches the automatic one off). The young generations on every tick; every
    FULL_EVERY_TICKS a full pass, after which what survived it is frozen: the next full pass
    walks only what was made since. At 1,000 devices reporting once a second a full pass
    over the whole heap took 18-37 ms, one over what was not frozen 0.8-2.4 ms once the lab
    had settled; a kernel event that came during one waited that long.

    Freezing hides one thing from the collector: a cycle of frozen objects that becomes
    garbage. Every WHOLE_HEAP_SECONDS the whole heap is thawed, collected and frozen again
    (39-56 ms at 1,000 devices), so such garbage lives that long at most; `whole_found_last`
    says how much the last such pass found (objects unreachable, frozen ones among them),
    `frozen` how many are frozen. Measured with a whole pass every minute at 1,000 devices:
    each found 1,500-3,000 objects where a full pass finds about 1,500 (what 15 s make), and
    the frozen count stayed at 75,700-76,000 over five minutes.
    Without `freezing` (a supervisor inside another program, as in the tests) every full pass
    is over the whole heap and nothing is frozen: freezing is the process's to decide
    (appliance.run, which also switches the automatic collection off)."""

    def __init__(self, freezing: bool = False, whole_every: float = WHOLE_HEAP_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.freezing = freezing
        self.pause_max_ms = [0.0, 0.0, 0.0]     # per generation ([0] unused): young, full
        self.whole_pause_max_ms = 0.0
        self.full_passes = 0
        self.whole_passes = 0
        self.whole_found_last: int | None = None
        self.full_found_last: int | None = None
        self.full_pause_last_ms: float | None = None
        self._whole_every = whole_every
        self._clock = clock
        self._whole_at = clock()
        self._ticks = 0
        self._frozen: tuple[float, int] | None = None    # (when, how many) as last counted

    def tick(self) -> int:
        """One tick's collection; returns the generation collected (2: a full pass)."""
        self._ticks += 1
        if self._ticks % FULL_EVERY_TICKS:
            self._timed(1)
            return 1
        if not self.freezing:
            self.full_found_last = self._timed(2)
            self.full_passes += 1
            return 2
        if self._clock() - self._whole_at >= self._whole_every:
            self._whole_at = self._clock()
            gc.unfreeze()
            self._frozen = None
            self.whole_found_last = self._timed(2, whole=True)
            self.whole_passes += 1
        else:
            self.full_found_last = self._timed(2)
        gc.freeze()
        self._frozen = None
        self.full_passes += 1
        return 2

    def _timed(self, generation: int, whole: bool = False) -> int:
        started = time.perf_counter()
        found = gc.collect(generation)
        pause_ms = (time.perf_counter() - started) * 1e3
        if whole:       # kept apart: the whole heap's pause would hide the usual full pass
            self.whole_pause_max_ms = max(self.whole_pause_max_ms, pause_ms)
            return found
        self.pause_max_ms[generation] = max(self.pause_max_ms[generation], pause_ms)
        if generation == 2:
            self.full_pause_last_ms = pause_ms
        return found

    @property
    def frozen(self) -> int:
        """How many objects are frozen: counted again after this collector froze or thawed,
        else at most every FROZEN_COUNT_SECONDS (appliance.run freezes once at start too)."""
        now = self._clock()
        if self._frozen is None or now - self._frozen[0] >= FROZEN_COUNT_SECONDS:
            self._frozen = (now, gc.get_freeze_count())
        return self._frozen[1]

    def status(self) -> dict:
        return {"gc_pause_max_ms": [round(x, 2) for x in self.pause_max_ms],
                "gc_whole_heap_pause_max_ms": round(self.whole_pause_max_ms, 2),
                "full_collections": self.full_passes, "gc_full_found_last": self.full_found_last,
                "gc_full_pause_last_ms": None if self.full_pause_last_ms is None
                else round(self.full_pause_last_ms, 2),
                "gc_whole_heap_passes": self.whole_passes,
                "gc_whole_heap_found_last": self.whole_found_last, "gc_frozen": self.frozen}
