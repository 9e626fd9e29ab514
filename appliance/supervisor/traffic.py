"""Each device's traffic over the last hour and the last day, for the page's charts: packets and
bytes passed and dropped, and the drops by reason, from the kernel's per-device counters
(DataplanePort.counters).

The counters only grow, so a reading is kept as what they grew by since the reading before, in
rings of fixed slots: the hour in 360 slots of 10 s, the day in 288 slots of 5 minutes (every
10-s reading is added to its 5-minute slot as well). The slots are arrays of machine integers,
never an object per sample: a device costs about 13 KB whatever its traffic, plus about 2.6 KB
for each reason it ever dropped packets for. A slot's place is its time (slot number = epoch
seconds // step), so a ring needs no more bookkeeping than the newest slot written; a slot
nobody wrote reads as "no data" (a gap in the chart: the supervisor was stopped, the device was
not in the data path yet), which is not the same as zero (nothing passed).

The readings of a 10-s window are spread over its first 9 seconds, a few devices each tick of
the supervisor, instead of all at once: a reading is 16 kernel map lookups, and a thousand
devices read together would hold the loop for a noticeable time.

The rings are saved whole in one file beside the store (traffic.bin) every few minutes and at a
clean stop; the counters are not, so the first reading after a start is only a baseline. A file
that cannot be read (torn, damaged, another program's, another layout) is ignored with a
warning: the charts start empty, and protection never waits for them.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import threading
import zlib
from array import array
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from appliance.dataplane import maps
from appliance.errors import KalkiError
from appliance.store.storage import fsync_dir
from appliance.supervisor.explain import DROP_REASONS
from appliance.vocab import DEVICE_NAME

log = logging.getLogger("kalki.traffic")

# The kernel's reasons (ebpf/kalki.h's KALKI_R_*), by code: "pass" is the only pass, every
# other reason is a drop (the dispatcher counts each with XDP_DROP).
REASONS = tuple(r.name.lower() for r in maps.Reason)
REASON_CODES = {name: code for code, name in enumerate(REASONS)}
PASS = maps.Reason.PASS
WIDTH = len(REASONS)            # a cumulative reading: packets [0:WIDTH], bytes [WIDTH:2*WIDTH]

# Why the kernel dropped a device's packets, for people: the detectors' words are the drop
# set's (explain.DROP_REASONS), the rest are said here.
REASON_WORDS = {
    "drop_set": "the source was in the drop set (blocked by a detector or by hand)",
    "quarantine": "quarantine",
    "unknown_device": "a device not approved yet",
    "spoof": "a forged sender address (anti-spoofing)",
    "lateral": "towards another device (lateral block)",
    "allowlist": "a destination outside its allow-list",
    "egress_anomaly": "a destination outside its profile (egress watch)",
    "rate_packets": "over its packet rate limit",
    "rate_bytes": "over its byte rate limit",
    "port_scan": DROP_REASONS["port_scan"],
    "syn_flood": DROP_REASONS["syn_flood"],
    "brute_force": DROP_REASONS["brute_force"],
    "not_ipv4": "not IPv4 (the gateway forwards IPv4 only)",
    "gateway": "the gateway's own services, which it may not use",
    "stealth_scan": DROP_REASONS["stealth_scan"],
}

# "No data" in a slot is the type's largest value; a real count stops one below it.
NO_DATA = {"I": 2 ** 32 - 1, "Q": 2 ** 64 - 1}
# Faster than any link a Pi has: a counter that grew more than this between two readings is
# another counter (a slot given to another device behind our back), not traffic.
MAX_BYTES_PER_SECOND = 10 ** 10 // 8
MAX_PACKETS_PER_SECOND = 20_000_000
SPREAD = 0.9                    # the readings of a window are done in its first 90%
MAX_FILE_BYTES = 32 * 1024 * 1024
MAGIC = b"KALKI-TRAFFIC-1\n"


@dataclasses.dataclass(frozen=True)
class Span:
    name: str
    slots: int
    step: int               # seconds per slot
    bytes_type: str         # array typecode of the byte counts (10 s of a gigabit fit in 32 bits)

    @property
    def seconds(self) -> int:
        return self.slots * self.step


HOUR = Span("hour", 360, 10, "I")
DAY = Span("day", 288, 300, "Q")
SPANS = {s.name: s for s in (HOUR, DAY)}
STEP = HOUR.step            # one reading per device per window of this many seconds
MAX_GAP = 3 * STEP          # a reading longer after the one before is a new baseline


def _filled(typecode: str, value: int, count: int) -> array:
    return array(typecode, [value]) * count


class Ring:
    """One device's slots of one span: passed and dropped packets and bytes (columns of
    `slots` each: passed first), and dropped packets per reason, made at its first drop."""

    __slots__ = ("span", "newest", "packets", "bytes", "reasons")

    def __init__(self, span: Span):
        self.span = span
        self.newest: int | None = None          # the newest slot number written
        self.packets = _filled("I", NO_DATA["I"], 2 * span.slots)
        self.bytes = _filled(span.bytes_type, NO_DATA[span.bytes_type], 2 * span.slots)
        self.reasons: dict[int, array] = {}

    def _clear(self, first: int, count: int) -> None:
        """Slot numbers first .. first+count-1 back to no data (count <= slots)."""
        n = self.span.slots
        start = first % n
        pieces = [(start, min(n, start + count))]
        if start + count > n:
            pieces.append((0, start + count - n))
        columns = [(self.packets, 0, NO_DATA["I"]), (self.packets, n, NO_DATA["I"]),
                   (self.bytes, 0, NO_DATA[self.span.bytes_type]),
                   (self.bytes, n, NO_DATA[self.span.bytes_type])]
        columns += [(r, 0, 0) for r in self.reasons.values()]
        for arr, base, value in columns:
            for lo, hi in pieces:
                arr[base + lo:base + hi] = _filled(arr.typecode, value, hi - lo)
        for code in [c for c, r in self.reasons.items() if not any(r)]:
            del self.reasons[code]

    def _index(self, slot: int) -> int:
        """Where slot number `slot` goes, the ring moved on to it if it is newer. A slot more
        than a span away from the newest (the clock jumped) starts the ring afresh; one a
        little older (the clock went back a little) is still in the ring and kept."""
        n = self.span.slots
        if self.newest is None or abs(slot - self.newest) >= n:
            self._clear(0, n)
            self.reasons = {}
            self.newest = slot
        elif slot > self.newest:
            self._clear(self.newest + 1, slot - self.newest)
            self.newest = slot
        return slot % n

    def add(self, slot: int, delta: array) -> None:
        """Adds a reading's growth (packets [0:WIDTH], bytes [WIDTH:]) to slot number `slot`."""
        n = self.span.slots
        i = self._index(slot)
        p, b = self.packets, self.bytes
        top_p, top_b = NO_DATA["I"] - 1, NO_DATA[self.span.bytes_type] - 1
        if p[i] == NO_DATA["I"]:
            p[i] = p[n + i] = b[i] = b[n + i] = 0
        passed_p, passed_b = delta[PASS], delta[WIDTH + PASS]
        p[i] = min(top_p, p[i] + passed_p)
        p[n + i] = min(top_p, p[n + i] + sum(delta[1:WIDTH]))
        b[i] = min(top_b, b[i] + passed_b)
        b[n + i] = min(top_b, b[n + i] + sum(delta[WIDTH + 1:]))
        for code in range(1, WIDTH):
            if delta[code]:
                r = self.reasons.get(code)
                if r is None:
                    r = self.reasons[code] = _filled("I", 0, n)
                r[i] = min(top_p, r[i] + delta[code])

    def column(self, arr: array, base: int, first: int, last: int) -> array:
        """Slot numbers first .. last (at most a span) of one column of `arr` (starting at
        `base`), in time order; no data where the ring holds none of them."""
        n = self.span.slots
        out = _filled(arr.typecode, NO_DATA[arr.typecode], last - first + 1)
        if self.newest is None:
            return out
        lo, hi = max(first, self.newest - n + 1), min(last, self.newest)
        if lo > hi:
            return out
        start, count = lo % n, hi - lo + 1
        if start + count <= n:
            piece = arr[base + start:base + start + count]
        else:
            piece = arr[base + start:base + n] + arr[base:base + start + count - n]
        out[lo - first:lo - first + count] = piece
        return out

    def values(self, last: int) -> dict[str, Any]:
        """The slots numbered last-slots+1 .. last, oldest first: {"passed_packets",
        "dropped_packets", "passed_bytes", "dropped_bytes": [count or None], "reasons":
        {reason: [dropped packets or None]}}; None where there is no data."""
        n = self.span.slots
        first = last - n + 1
        passed = self.column(self.packets, 0, first, last)
        no_p, no_b = NO_DATA["I"], NO_DATA[self.span.bytes_type]
        has = [v != no_p for v in passed]
        out: dict[str, Any] = {
            "passed_packets": [v if h else None for v, h in zip(passed, has)],
            "dropped_packets": [v if h else None
                                for v, h in zip(self.column(self.packets, n, first, last), has)]}
        for key, base in (("passed_bytes", 0), ("dropped_bytes", n)):
            out[key] = [None if v == no_b else v for v in self.column(self.bytes, base, first, last)]
        out["reasons"] = {REASONS[c]: [v if h else None for v, h in zip(self.column(r, 0, first, last), has)]
                          for c, r in sorted(self.reasons.items())}
        return out

    def rates(self, last: int, per: int, buckets: int) -> tuple[list, list]:
        """Passed and dropped packets per second in `buckets` buckets of `per` slots up to slot
        number `last`: each bucket's packets over the seconds its slots with data cover (a
        bucket still filling does not dip), None where none has data."""
        first, no, step = last - buckets * per + 1, NO_DATA["I"], self.span.step
        passed = self.column(self.packets, 0, first, last)
        # groups of `per` slots, made and summed in C: the overview does this for every device
        groups = list(zip(*[iter(passed)] * per))
        missing = [g.count(no) for g in groups] if no in passed else [0] * buckets
        dropped = self.column(self.packets, self.span.slots, first, last)
        out = []
        for column in (groups, list(zip(*[iter(dropped)] * per))):
            out.append([round((sum(g) - m * no) / ((per - m) * step), 3) if m < per else None
                        for g, m in zip(column, missing)])
        return out[0], out[1]

    def arrays(self) -> list[array]:
        return [self.packets, self.bytes, *(self.reasons[c] for c in sorted(self.reasons))]


class DeviceTraffic:
    __slots__ = ("hour", "day", "last", "last_mono")

    def __init__(self) -> None:
        self.hour = Ring(HOUR)
        self.day = Ring(DAY)
        self.last: array | None = None     # the last reading, cumulative (packets, then bytes)
        self.last_mono = 0.0                # and when it was taken (time.monotonic())

    def ring(self, span: Span) -> Ring:
        return self.hour if span is HOUR else self.day


def reading(counters: Mapping[str, Mapping]) -> array:
    """Dataplane.counters() as one cumulative vector: packets by reason code, then bytes."""
    out = _filled("Q", 0, 2 * WIDTH)
    for reason, c in counters.items():
        code = REASON_CODES.get(reason)
        if code is None or not isinstance(c, Mapping):
            continue
        out[code] = max(0, min(NO_DATA["Q"], int(c.get("packets") or 0)))
        out[WIDTH + code] = max(0, min(NO_DATA["Q"], int(c.get("bytes") or 0)))
    return out


class Traffic:
    """The rings of every device, fed by tick() from the supervisor's ticker."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.devices: dict[str, DeviceTraffic] = {}
        self._window: int | None = None     # the window being read (epoch seconds // STEP)
        self._order: list[str] = []         # the devices to read in it, in turn
        self._cursor = 0
        self.readings = 0                   # counter readings taken since start
        self._overview: tuple[tuple, dict] | None = None    # see overview()
        # One writer of the file at a time, and never an older snapshot over a newer one: a
        # clean stop's save may meet one still being written behind.
        self._writing = threading.Lock()
        self._snapshots = self._written = 0

    # -- reading the counters ---------------------------------------------------------------
    def tick(self, dp, now: float, mono: float, between: Callable[[], None] | None = None) -> int:
        """Reads the counters of the devices whose turn it is; returns how many were read.
        `now`: epoch seconds (the slots' clock), `mono`: time.monotonic(). `between` is called
        before each device's read (the supervisor's kernel_first: at 1,000 devices a tick
        reads about 28, 1-2 ms in all)."""
        window = int(now // STEP)
        read = 0
        if window != self._window:
            if self._window is not None:     # the late ones of the window before, in it
                read += self._read(dp, self._order[self._cursor:], self._window * STEP, mono, between)
            self._window, self._order, self._cursor = window, list(dp.devices), 0
        due = math.ceil(len(self._order) * min(1.0, (now - window * STEP) / (STEP * SPREAD)))
        if due > self._cursor:
            read += self._read(dp, self._order[self._cursor:due], now, mono, between)
            self._cursor = due
        return read

    def _read(self, dp, names: list[str], at: float, mono: float,
              between: Callable[[], None] | None = None) -> int:
        if not names:
            return 0
        held = dp.devices
        read = 0
        for name in names:
            if name not in held:             # removed or renamed since the window began
                continue
            if between is not None:
                between()
            try:
                counters = dp.counters(name)
            except KalkiError as e:
                log.debug("traffic: %s's counters: %s", name, e)
                continue
            self.record(name, counters, at, mono)
            read += 1
        return read

    def record(self, name: str, counters: Mapping[str, Mapping], at: float, mono: float) -> bool:
        """One reading of a device's counters, taken at `mono` for the slot of `at`; True if
        it was added to the rings, False if it is a baseline (the first, one after a gap, or
        after counters that make no sense)."""
        now = reading(counters)
        d = self.devices.get(name)
        if d is None:
            d = self.devices[name] = DeviceTraffic()
        before, elapsed = d.last, mono - d.last_mono
        d.last, d.last_mono = now, mono
        self.readings += 1
        if before is None or not 0 < elapsed <= MAX_GAP:
            return False
        if any(x < y for x, y in zip(now, before)):
            # The counters started again (the device's slot emptied and re-used, the data path
            # reloaded): what they hold now is what came since.
            delta = now
        else:
            delta = array("Q", [x - y for x, y in zip(now, before)])
        if (sum(delta[WIDTH:]) > MAX_BYTES_PER_SECOND * elapsed
                or sum(delta[:WIDTH]) > MAX_PACKETS_PER_SECOND * elapsed):
            log.warning("traffic: %s's counters grew by %d packets in %.0f s: not this device's "
                        "traffic; taken as a new start", name, sum(delta[:WIDTH]), elapsed)
            return False
        d.hour.add(int(at // HOUR.step), delta)
        d.day.add(int(at // DAY.step), delta)
        return True

    # -- the devices' life -------------------------------------------------------------------
    def forget(self, name: str) -> None:
        self.devices.pop(name, None)

    def rename(self, name: str, new: str) -> None:
        if name in self.devices:
            self.devices[new] = self.devices.pop(name)

    def keep(self, names: Iterable[str]) -> None:
        """Only these devices' rings stay."""
        wanted = set(names)
        for name in [n for n in self.devices if n not in wanted]:
            del self.devices[name]

    # -- what the page shows ----------------------------------------------------------------
    def series(self, name: str, span: Span, now: float) -> dict:
        """The device's last `span.slots` slots up to the one `now` is in, oldest first:
        {"span", "step", "at" (each slot's start, epoch seconds), "passed_packets",
        "dropped_packets", "passed_bytes", "dropped_bytes" ([count or None]), "reasons"
        ({reason: [dropped packets or None]}), "totals" (sums over the span), "last_seconds"
        (how many seconds the last slot's readings cover so far: a day's slot of 5 minutes
        fills over 30 readings, an hour's is one reading)}."""
        last = int(now // span.step)
        d = self.devices.get(name)
        values = d.ring(span).values(last) if d else Ring(span).values(last)
        first = last - span.slots + 1
        totals = {k: sum(v for v in values[k] if v is not None)
                  for k in ("passed_packets", "dropped_packets", "passed_bytes", "dropped_bytes")}
        totals["reasons"] = {r: sum(v for v in vs if v is not None) for r, vs in values["reasons"].items()}
        readings = int((now - last * span.step) // STEP) + 1
        return {"span": span.name, "step": span.step, "last_seconds": min(span.step, readings * STEP),
                "at": [(first + k) * span.step for k in range(span.slots)], **values, "totals": totals}

    def overview(self, names: Iterable[str], span: Span, now: float, points: int) -> dict:
        """Every device's passed and dropped packets per second in `points` buckets of the span
        up to now, for small charts: each bucket's packets over the time its slots with data
        cover (so that a bucket still filling does not dip), None where none has data. Made
        once a 10-s window however many pages ask (at 1000 devices it takes tens of ms)."""
        names = tuple(names)
        key = (names, span.name, points, int(now // STEP))
        if self._overview is not None and self._overview[0] == key:
            return self._overview[1]
        per = max(1, span.slots // points)
        buckets = span.slots // per
        last = int(now // span.step)
        first = last - buckets * per + 1
        out: dict[str, dict] = {}
        nothing = [None] * buckets
        for name in names:
            d = self.devices.get(name)
            passed, dropped = d.ring(span).rates(last, per, buckets) if d else (nothing, nothing)
            out[name] = {"passed_packets": passed, "dropped_packets": dropped}
        result = {"span": span.name, "step": span.step * per, "per_second": True,
                  "at": [(first + k * per) * span.step for k in range(buckets)], "devices": out}
        self._overview = (key, result)
        return result

    # -- kept on the data partition ---------------------------------------------------------
    def _payload(self) -> tuple[int, bytes]:
        """The rings as bytes, numbered (taken on the loop, so that they are of one moment)."""
        devices, blobs = [], []
        for name, d in self.devices.items():
            devices.append([name, d.hour.newest, d.day.newest, sorted(d.hour.reasons),
                            sorted(d.day.reasons)])
            for ring in (d.hour, d.day):
                blobs += [a.tobytes() for a in ring.arrays()]
        header = json.dumps({"layout": _layout(), "byteorder": sys.byteorder,
                             "devices": devices}).encode()
        self._snapshots += 1
        return self._snapshots, b"".join([len(header).to_bytes(4, "big"), header, *blobs])

    def _write(self, snapshot: tuple[int, bytes]) -> bool:
        number, payload = snapshot
        body = zlib.compress(payload, 1)
        if len(body) + len(MAGIC) + 32 > MAX_FILE_BYTES:
            log.warning("%s: not saved: %d bytes is over its bound of %d", self.path, len(body),
                        MAX_FILE_BYTES)
            return False
        temp = self.path.with_name("." + self.path.name + ".tmp")
        with self._writing:
            if number < self._written:
                return True
            self._written = number
            return self._replace(temp, MAGIC + hashlib.sha256(body).digest() + body)

    def _replace(self, temp: Path, content: bytes) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(temp, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            log.warning("%s: the traffic history was not saved: %s", self.path, e)
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            return False
        return True

    def save(self) -> bool:
        return self._write(self._payload())

    async def save_behind(self) -> bool:
        """save(), with the compressing and the writing off the loop (the SD card may stall)."""
        return await asyncio.to_thread(self._write, self._payload())

    def load(self) -> None:
        """The rings saved last, if the file is there and whole; otherwise none, and a warning
        that names the file. Never raises."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("%s: not read (%s): the traffic charts start empty", self.path, e)
            return
        try:
            self.devices = _parse(raw)
        except (ValueError, KeyError, TypeError, IndexError, zlib.error, OverflowError) as e:
            log.warning("%s: not a traffic history this version can read (%s): the traffic charts "
                        "start empty", self.path, e)
            self.devices = {}


def _layout() -> dict:
    return {s.name: [s.slots, s.step, s.bytes_type] for s in SPANS.values()}


def _parse(raw: bytes) -> dict[str, DeviceTraffic]:
    """A saved file's rings; ValueError (or another of load()'s) when it is not one."""
    if len(raw) > MAX_FILE_BYTES:
        raise ValueError(f"over {MAX_FILE_BYTES} bytes")
    if not raw.startswith(MAGIC):
        raise ValueError("it does not begin as a traffic history does")
    digest, body = raw[len(MAGIC):len(MAGIC) + 32], raw[len(MAGIC) + 32:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError("its checksum does not match (torn or damaged)")
    unpack = zlib.decompressobj()
    size = int.from_bytes(unpack.decompress(body, 4), "big")
    if size > 1024 * 1024:
        raise ValueError("its header is too big")
    header = json.loads(unpack.decompress(unpack.unconsumed_tail, size))
    if not isinstance(header, dict):
        raise ValueError("its header is not a table")
    if header.get("layout") != _layout():
        raise ValueError(f"another layout of slots: {header.get('layout')}")
    if header.get("byteorder") != sys.byteorder:     # written by another kind of machine
        raise ValueError(f"its numbers are {header.get('byteorder')}-endian")
    entries = header["devices"]
    if not isinstance(entries, list) or len(entries) > maps.MAX_DEVICES:
        raise ValueError("its list of devices is not one")
    plan = []
    for entry in entries:
        name, hour, day, hour_reasons, day_reasons = entry
        if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
            raise ValueError(f"device name {name!r}")
        for newest in (hour, day):
            if newest is not None and (not isinstance(newest, int) or isinstance(newest, bool)):
                raise ValueError(f"{name}: slot {newest!r}")
        for codes in (hour_reasons, day_reasons):
            if (not isinstance(codes, list) or len(set(codes)) != len(codes)
                    or any(not isinstance(c, int) or not 0 < c < WIDTH for c in codes)):
                raise ValueError(f"{name}: reasons {codes!r}")
        plan.append((name, ((HOUR, hour, hour_reasons), (DAY, day, day_reasons))))
    if len({name for name, _ in plan}) != len(plan):
        raise ValueError("a device twice")
    expected = sum(_ring_bytes(span, len(codes)) for _, rings in plan for span, _, codes in rings)
    data = unpack.decompress(unpack.unconsumed_tail, expected + 1)
    if len(data) != expected or not unpack.eof and unpack.decompress(unpack.unconsumed_tail, 1):
        raise ValueError(f"{len(data)} bytes of rings where {expected} were announced")
    at = 0

    def take(typecode: str, count: int) -> array:
        nonlocal at
        arr = array(typecode)
        arr.frombytes(data[at:at + count * arr.itemsize])
        at += count * arr.itemsize
        return arr
    devices: dict[str, DeviceTraffic] = {}
    for name, rings in plan:
        d = devices[name] = DeviceTraffic()
        for span, newest, codes in rings:
            ring = d.ring(span)
            ring.newest = newest
            ring.packets = take("I", 2 * span.slots)
            ring.bytes = take(span.bytes_type, 2 * span.slots)
            ring.reasons = {code: take("I", span.slots) for code in codes}
    return devices


def _ring_bytes(span: Span, reasons: int) -> int:
    return (2 * span.slots * 4 + 2 * span.slots * array(span.bytes_type).itemsize
            + reasons * span.slots * 4)
