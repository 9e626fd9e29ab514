"""Destinations by name: the addresses the gateway's resolver gave each device for the names
its profile allows, kept in the kernel's kalki_name_allow.

An answer is bound before it reaches the device (appliance.names.resolver calls `answer()`
first), so the device's first connection never races it. A binding lasts the answer's TTL
plus a grace, and the kernel stretches it while the device keeps opening flows to it: real
devices reconnect to cloud addresses they resolved hours before. Bindings are kept per device
by the names they answered for, so a posture change re-derives their (proto, port) rules from
the new posture's names, and they outlive a restart through `snapshot()` / `restore()`.

This module holds no sockets and parses no DNS: it is the bookkeeping between answers and the
map. It is called from the resolver's threads and from the supervisor's loop, hence the lock.
"""
from __future__ import annotations

import collections
import ctypes
import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.dataplane import maps
from appliance.dataplane.umbox import Destination

DEFAULT_GRACE_S = 300       # past the answer's TTL: a device's lookup and its connection race
DEFAULT_KEEP_S = 3600       # a flow opened to the address keeps it at least this long
MAX_TTL_S = 7 * 86400       # an answer's TTL is the upstream's to say, but not forever
REFUSED_KEPT = 64           # names asked for and refused, remembered per device
SEEN_KEPT = 512             # addresses answered, with their question, remembered per device


@dataclass
class Binding:
    names: set[str]
    expires: float          # wall clock, seconds
    rules: tuple = ()       # ((proto, port), ...) now in the kernel

    def to_json(self, device: str, mac: str, address: str) -> dict:
        return {"device": device, "mac": mac, "address": address,
                "names": sorted(self.names), "expires": round(self.expires, 3)}


@dataclass
class _Device:
    name: str
    mac: str
    destinations: list[Destination] = field(default_factory=list)
    bindings: dict[str, Binding] = field(default_factory=dict)      # by address
    refused: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    # every answer's addresses, allowed or not, with the question: what names a flow was for
    seen: collections.OrderedDict = field(default_factory=collections.OrderedDict)


def _mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class NameBindings:
    """The (device, address) bindings learnt from DNS answers, mirrored in `table`."""

    def __init__(self, table, grace_s: int = DEFAULT_GRACE_S, keep_s: int = DEFAULT_KEEP_S,
                 clock: Callable[[], float] = time.time, mono_ns: Callable[[], int] = _mono_ns):
        self._table = table
        self.grace_s = grace_s
        self.keep_s = keep_s
        self._clock = clock
        self._mono_ns = mono_ns
        self._lock = threading.Lock()
        self._devices: dict[int, _Device] = {}
        self.counts: collections.Counter[str] = collections.Counter()   # bound, refused, expired, ...

    # -- the devices, from Dataplane.apply / remove ----------------------------------------
    def set_device(self, device_id: int, name: str, mac: str, destinations: list[Destination]) -> None:
        """The device's name destinations in its posture now; its bindings follow them."""
        with self._lock:
            d = self._devices.get(device_id)
            if d is None or d.mac != mac:
                d = self._devices[device_id] = _Device(name, mac)
            d.name, d.destinations = name, list(destinations)
            for address, b in list(d.bindings.items()):
                self._write(device_id, d, address, b)

    def forget_device(self, device_id: int) -> None:
        with self._lock:
            d = self._devices.pop(device_id, None)
            for address in (d.bindings if d else ()):
                self._table.delete(self._key(device_id, address))

    # -- answers, from the resolver -------------------------------------------------------
    def answer(self, device_id: int, chain: list[str], addresses: list[str], ttl: int) -> bool:
        """Binds `addresses`, the answer to chain[0] through the CNAMEs chain[1:], if the
        device's posture allows any name of the chain; records a refusal otherwise. Returns
        whether anything was bound."""
        chain = [n.lower().rstrip(".") for n in chain]
        with self._lock:
            d = self._devices.get(device_id)
            if d is None:
                self.counts["not-a-device"] += 1
                return False
            for address in addresses:
                d.seen.pop(address, None)
                d.seen[address] = chain[0]
            while len(d.seen) > SEEN_KEPT:
                d.seen.popitem(last=False)
            if not self._rules(d, chain):
                self._refuse(d, chain[0])
                return False
            expires = self._clock() + min(max(ttl, 0), MAX_TTL_S) + self.grace_s
            for address in addresses:
                b = d.bindings.get(address)
                if b is None:
                    b = d.bindings[address] = Binding(set(), expires)
                b.names.update(chain)
                b.expires = max(b.expires, expires)
                self._write(device_id, d, address, b)
            self.counts["bound"] += len(addresses)
            return bool(addresses)

    def _refuse(self, d: _Device, name: str) -> None:
        self.counts["refused"] += 1
        d.refused[name] = d.refused.pop(name, 0) + 1
        while len(d.refused) > REFUSED_KEPT:
            d.refused.popitem(last=False)

    @staticmethod
    def _rules(d: _Device, names) -> tuple:
        """The (proto, port) rules of the device's destinations that name any of `names`."""
        out: list = []
        for dst in d.destinations:
            if any(dst.matches_name(n) for n in names) and (dst.proto, dst.port) not in out:
                out.append((dst.proto, dst.port))
        return tuple(out[:maps.ALLOW_RULES])

    def _write(self, device_id: int, d: _Device, address: str, b: Binding) -> None:
        rules = self._rules(d, b.names)
        key = self._key(device_id, address)
        if not rules:       # the posture now names none of them: the binding is not in force
            if b.rules:
                self._table.delete(key)
            b.rules = ()
            return
        value = maps.NameValue(keep_s=self.keep_s, count=len(rules))
        value.expires_ns = max(0, self._mono_ns() + int((b.expires - self._clock()) * 1e9))
        for i, (proto, port) in enumerate(rules):
            value.rules[i].proto, value.rules[i].port = proto, port
        self._table.update(key, value)
        b.rules = rules

    @staticmethod
    def _key(device_id: int, address: str) -> maps.NameKey:
        # network order read as a host (little-endian) u32, as every address in the maps
        return maps.NameKey(device=device_id,
                            addr=int.from_bytes(ipaddress.IPv4Address(address).packed, "little"))

    # -- time -----------------------------------------------------------------------------
    def expire(self) -> int:
        """Deletes the bindings past their time; the kernel's stretch (flows still opened)
        counts. Returns how many went."""
        gone = 0
        with self._lock:
            now, mono = self._clock(), self._mono_ns()
            for device_id, d in self._devices.items():
                for address, b in list(d.bindings.items()):
                    if b.expires > now:
                        continue
                    kernel = self._table.lookup(self._key(device_id, address)) if b.rules else None
                    if kernel is not None and kernel.expires_ns > mono:
                        b.expires = now + (kernel.expires_ns - mono) / 1e9
                        continue
                    if kernel is not None:
                        self._table.delete(self._key(device_id, address))
                    del d.bindings[address]
                    gone += 1
            self.counts["expired"] += gone
        return gone

    # -- what the operator sees, and what outlives a restart -------------------------------
    def of_device(self, device_id: int) -> dict:
        with self._lock:
            d = self._devices.get(device_id)
            if d is None:
                return {"bound": [], "refused": {}}
            now = self._clock()
            return {"bound": [{"address": a, "names": sorted(b.names),
                               "in_force": bool(b.rules),
                               "expires_in_s": max(0, round(b.expires - now))}
                              for a, b in sorted(d.bindings.items())],
                    "refused": dict(d.refused)}

    def resolved(self, device_id: int, address: str) -> list[str]:
        """The names the device asked for that were answered with `address` (bound or not)."""
        with self._lock:
            d = self._devices.get(device_id)
            if d is None:
                return []
            names = [d.seen[address]] if address in d.seen else []
            b = d.bindings.get(address)
            return sorted(set(names) | (b.names if b else set()), key=lambda n: (n not in names, n))

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [b.to_json(d.name, d.mac, a) for d in self._devices.values()
                    for a, b in d.bindings.items()]

    def restore(self, entries: list[dict]) -> int:
        """Puts back the bindings of a snapshot whose time has not run out, for the devices
        (by MAC) that are here now. Returns how many."""
        now = self._clock()
        by_mac = {d.mac: device_id for device_id, d in self._devices.items()}
        restored = 0
        for e in entries:
            device_id = by_mac.get(str(e.get("mac")))
            if device_id is None or not e.get("expires", 0) > now:
                continue
            with self._lock:
                d = self._devices[device_id]
                b = d.bindings.setdefault(e["address"], Binding(set(), e["expires"]))
                b.names.update(e.get("names", []))
                b.expires = max(b.expires, e["expires"])
                self._write(device_id, d, e["address"], b)
            restored += 1
        return restored

    def prune(self) -> int:
        """Deletes the kernel's bindings that nobody here knows of (an earlier process's that
        its snapshot did not carry): their names, and so their rules, are unknown."""
        with self._lock:
            known = {(device_id, a) for device_id, d in self._devices.items()
                     for a, b in d.bindings.items() if b.rules}
            stale = [k for k in self._table.keys() if (k.device, address_of(k.addr)) not in known]
            for k in stale:
                self._table.delete(k)
        return len(stale)


def address_of(raw: int) -> str:
    """A kalki_name_key address (network order in a little-endian u32) as text."""
    return str(ipaddress.IPv4Address(ctypes.c_uint32(raw).value.to_bytes(4, "little")))
