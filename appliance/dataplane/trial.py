"""`kalki profile test`: what a device type's stack would do with a capture of a device, flow
by flow, as the real XDP dispatcher decides it.

Nothing is sent on any network. A throwaway gateway is made in a network namespace of its own
(`kalki-pt-<suffix>`, two dummy interfaces, or veth pairs where the kernel has no dummy
driver): the dispatcher compiled, loaded, pinned
(/sys/fs/bpf/kalki/pt-<suffix>) and attached as on the appliance, the device applied with the
stack. Each packet of the capture is then handed to the dispatcher's program with
BPF_PROG_TEST_RUN, which runs the program once on a copy of the packet in memory and returns
its verdict; the packet goes nowhere. Everything made is removed afterwards, also on error.

- Packets from the device's MAC run through `xdp_from_devices`, IPv4 packets to its address
  through `xdp_to_devices` (as if they came in on the uplink). The verdict is the program's
  return code, the reason the counter of the device it grew (`Dataplane.counters`), and the
  events it reported (detectors, egress anomalies) are counted too.
- DNS answers to the device (UDP from port 53) are handed to `Dataplane.answer` before their
  own run, as the gateway's resolver does before it delivers them, so the names a profile
  allows open the addresses the device was given.
- Time: the dispatcher's windows and buckets read the kernel's clock, which runs far faster
  through a test run than the capture did. Between packets the state they keep (rate-limit
  buckets, SYN and scan windows, brute-force windows, the drop set, the name bindings) is
  aged by the capture's time that the test run skipped, so they see the capture's pace. (When
  the capture is faster than the test run, within bursts, it is not: there the limits see the
  packets a little more spread out than they were.)
- A TCP flow from the device that the capture joins after its SYN would pass whatever the
  stack (the dispatcher checks destinations at the SYN; nftables' conntrack drops TCP that no
  SYN opened): for it a SYN made from its first packet is run too, and reported as `opening`.
- nftables' part of the stack (conn_limit, auth_gate) is set up but not exercised.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import ipaddress
import os
import secrets
import struct
import subprocess
import time

import dpkt

from appliance.dataplane import bpf, capture, maps
from appliance.dataplane.api import BPFFS, Dataplane, DeviceSpec, GatewaySettings, remove_pins
from appliance.dataplane.resolver import read_answer
from appliance.errors import DataplaneError
from appliance.vocab import POSTURE_CODES, check_mac

DEVICE = "trial"
XDP_VERDICTS = {0: "aborted", 1: "dropped", 2: "passed", 3: "tx", 4: "redirect"}
EVENTS_PER_SEC = 1_000_000  # every event counted (the appliance limits how many it reports)
CLOCK_MONOTONIC_COARSE = 6  # the dispatcher's clock (bpf_ktime_get_coarse_ns)


def addresses(packets: list[capture.Packet], mac: str, device_ip: str | None = None,
              source: str = "capture") -> tuple[str, str, str]:
    """(device address, gateway address, lan) of the trial gateway, from the capture: the
    address the device sends from; the address of the router it sends to the internet through,
    if the capture shows it on the device's /24, else the /24's .1 (.254 if that is the
    device); the lan is the device's /24."""
    device = device_ip or capture.device_ip(packets, mac, source)
    try:
        lan = ipaddress.IPv4Network(f"{device}/24", strict=False)
    except ValueError:
        raise DataplaneError(f"device address {device!r} is not an IPv4 address") from None
    gateway = capture.router(packets, mac, device)
    if gateway is None or gateway == device:
        first = str(lan.network_address + 1)
        gateway = first if first != device else str(lan.network_address + 254)
    return device, gateway, str(lan)


def try_profile(stack: dict, packets: list[capture.Packet], mac: str, device_ip: str | None = None,
                instance_suffix: str | None = None, settings: GatewaySettings | None = None,
                source: str = "capture", mud_url: str | None = None) -> list[dict]:
    """Runs the capture's packets of `mac` through the dispatcher with `stack` as the device's
    "normal" posture; one dict per flow (capture.flows), in the order of their first packets:
    direction, proto, peer, port, packets, passed, dropped, reasons {reason: packets},
    first_verdict, names (the device resolved the peer's address for), events {reason:
    reported}, opening (None, or the verdict on a SYN for a TCP flow joined after its SYN).
    `settings` gives the site's settings (controllers, names); its addresses are replaced by
    the capture's (addresses()). `source` names the capture in errors; `mud_url` is the
    device's MUD URL (its my-controller entries; no other device is there for same-manufacturer)."""
    mac = check_mac(mac, f"{source}: --mac", unicast=True)
    device, gateway, lan = addresses(packets, mac, device_ip, source)
    groups = capture.flows(packets, mac, device, source)
    suffix = instance_suffix or secrets.token_hex(3)
    namespace, instance = f"kalki-pt-{suffix}", f"pt-{suffix}"
    if os.path.exists(f"/run/netns/{namespace}") or os.path.exists(f"{BPFFS}/kalki/{instance}"):
        raise DataplaneError(f"namespace {namespace} or pins {instance} exist already: another run?")
    gw = dataclasses.replace(settings or GatewaySettings(), gateway_ip=gateway, lan=lan,
                             events_per_sec=EVENTS_PER_SEC)
    dp = None
    made = False
    try:
        _ip("netns", "add", namespace)
        made = True
        for ifname in (gw.devices_if, gw.uplink_if):
            _link(namespace, ifname)
        dp = Dataplane.open(instance, namespace, gw, defines={"KALKI_SLOTS_LOG2": _SLOTS_LOG2})
        dp.apply(DeviceSpec(DEVICE, mac, device, stack, POSTURE_CODES["normal"], mud_url=mud_url))
        return _Replay(dp, device).run(groups)
    finally:
        if dp is not None:
            with contextlib.suppress(Exception):    # what it leaves goes with the pins and netns
                dp.destroy()
        remove_pins(instance)
        if made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise DataplaneError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _link(namespace: str, ifname: str) -> None:
    """An interface for the program to attach to: a dummy, or where the kernel has no dummy
    driver a veth pair (its peer, <ifname>p, in the namespace too)."""
    try:
        _ip("-n", namespace, "link", "add", ifname, "type", "dummy")
    except DataplaneError:
        _ip("-n", namespace, "link", "add", ifname, "type", "veth", "peer", "name", f"{ifname}p")
        _ip("-n", namespace, "link", "set", f"{ifname}p", "up")
    _ip("-n", namespace, "link", "set", ifname, "up")


class _Replay:
    def __init__(self, dp: Dataplane, device_ip: str):
        self.dp = dp
        self.device_ip = device_ip
        self.names: dict[str, list[str]] = {}   # address -> the names the device was given it for
        self.progs: dict[str, int] = {}
        # The device's counters (Dataplane.counters' slots), read one by one: a run grows one,
        # most often `pass`, and reading all sixteen after every run would slow the replay.
        self.counters = bpf.Map(f"{dp.pin_dir}/kalki_counters", *maps.MAPS["kalki_counters"])
        self.slot = dp.device_id(DEVICE) * maps.REASON_SLOTS
        self.seen = {r: self._packets(r) for r in maps.Reason}
        self.clock: _Clock | None = None

    def run(self, groups: list[capture.Flow]) -> list[dict]:
        results = {id(f): _result(f) for f in groups}
        order = sorted((p.n, p, f) for f in groups for p in f.packets)
        first = {f.packets[0].n for f in groups}
        try:
            for direction, prog in (("from-device", "xdp_from_devices"), ("to-device", "xdp_to_devices")):
                self.progs[direction] = bpf.obj_get(f"{self.dp.pin_dir}/{prog}")
            self.clock = clock = _Clock(self.dp, self.progs["from-device"])
            for n, p, f in order:
                r = results[id(f)]
                clock.catch_up(p.ts - order[0][1].ts)
                if f.direction == "to-device" and f.proto == "udp" and f.port == 53:
                    self._dns(p)
                if n in first and f.direction == "from-device" and f.proto == "tcp" and not f.syn:
                    syn = _as_syn(p.frame)
                    if syn is not None:
                        verdict, reason, events = self._run(f.direction, syn, n)
                        r["opening"] = {"verdict": verdict, "reason": reason,
                                        "events": {e: events.count(e) for e in events}}
                verdict, reason, events = self._run(f.direction, p.frame, n)
                r["first_verdict"] = r["first_verdict"] or verdict
                r["passed" if verdict == "passed" else "dropped"] += 1
                r["reasons"][reason] = r["reasons"].get(reason, 0) + 1
                for e in events:
                    r["events"][e] = r["events"].get(e, 0) + 1
        finally:
            if self.clock is not None:
                self.clock.close()
            for fd in self.progs.values():
                os.close(fd)
            self.counters.close()
        out = [results[id(f)] for f in groups]
        for r in out:
            r["names"] = self.names.get(r["peer"], [])
        return out

    def _run(self, direction: str, frame: bytes, n: int) -> tuple[str, str, list[str]]:
        try:
            ret, _ = bpf.prog_test_run(self.progs[direction], frame, 1)
        except OSError as e:
            raise DataplaneError(f"packet {n + 1}: {e}") from None
        verdict = XDP_VERDICTS.get(ret, str(ret))
        events = [e for e in self.dp.events() if e["device"] == DEVICE]
        if self.clock is not None and any(e["action"] == "blocked" for e in events):
            self.clock.blocked = True
        return verdict, self._grew(verdict), [e["reason"] for e in events]

    def _packets(self, reason: maps.Reason) -> int:
        per_cpu = self.counters.lookup(ctypes.c_uint32(self.slot + reason))
        return sum(c.packets for c in per_cpu) if per_cpu else 0

    def _grew(self, verdict: str) -> str:
        """The reason whose counter the run grew ("uncounted": none)."""
        likely = [maps.Reason.PASS] if verdict == "passed" else []
        for reason in [*likely, *maps.Reason]:
            n = self._packets(reason)
            if n > self.seen[reason]:
                self.seen[reason] = n
                return reason.name.lower()
        return "uncounted"

    def _dns(self, p: capture.Packet) -> None:
        """An answer to the device, bound as the gateway's resolver binds it (a bad one is
        passed on unbound, as there)."""
        udp = p.eth.data.data if p.eth is not None else None
        if not isinstance(udp, dpkt.udp.UDP):
            return
        try:
            answer = read_answer(bytes(udp.data))
        except Exception:       # whatever dnspython makes of a malformed answer
            return
        if not answer or not answer[1]:
            return
        chain, found, ttl = answer
        for address in found:
            known = self.names.setdefault(address, [])
            known += [name for name in chain if name not in known]
        if self.dp.answer(self.device_ip, chain, found, ttl) and self.clock is not None:
            self.clock.bound = True


def _result(f: capture.Flow) -> dict:
    return {"direction": f.direction, "proto": f.proto, "peer": f.peer, "port": f.port,
            "packets": len(f.packets), "passed": 0, "dropped": 0, "reasons": {},
            "first_verdict": None, "names": [], "events": {}, "opening": None}


def _as_syn(frame: bytes) -> bytes | None:
    """The TCP/IPv4 frame's headers as a SYN opening its connection (no payload)."""
    if len(frame) < 34:
        return None
    t = 14 + (frame[14] & 0x0F) * 4
    if len(frame) < t + 20:
        return None
    end = t + max(20, (frame[t + 12] >> 4) * 4)
    syn = bytearray(frame[:end].ljust(end, b"\0"))
    syn[t + 13] = 0x02                                    # SYN, no ACK
    struct.pack_into("!H", syn, 16, end - 14)             # IPv4 total length
    return bytes(syn)


class _WindowSlot(ctypes.Structure):
    _fields_ = [("device_kind", ctypes.c_uint32), ("src", ctypes.c_uint32), ("count", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("window_ns", ctypes.c_uint64), ("used_ns", ctypes.c_uint64)]


class _SeenSlot(ctypes.Structure):
    _fields_ = [("device", ctypes.c_uint32), ("src", ctypes.c_uint32), ("dst", ctypes.c_uint32),
                ("port", ctypes.c_uint32), ("seen_ns", ctypes.c_uint64)]


# The detectors' slot tables (ebpf/dispatcher.bpf.c), which the loader does not pin: the
# kernel's name (15 characters at most) -> (value, the field that is 0 in an empty slot, its
# time stamps). A trial has one device: 4,096 slots, not the appliance's 65,536, so that aging
# them between packets reads little.
_SLOTS_LOG2 = 12
_WINDOW_MAPS = {"kalki_windows": (_WindowSlot, "device_kind", ("window_ns", "used_ns")),
                "kalki_scan_seen": (_SeenSlot, "device", ("seen_ns",))}


class _Clock:
    """Ages the dispatcher's time-stamped state by the capture's time the test run skipped.
    Walking a hash map costs its size in buckets, empty or not: the maps are walked only once
    something can be in them."""

    STEP_NS = 5_000_000     # about a jiffy: the coarse clock does not see much finer

    def __init__(self, dp: Dataplane, prog_fd: int):
        pin = dp.pin_dir
        self.device = ctypes.c_uint32(dp.device_id(DEVICE))
        self.maps = {name: bpf.Map(f"{pin}/{name}", *maps.MAPS[name])
                     for name in ("kalki_devices", "kalki_dev_state", "kalki_drop_set", "kalki_name_allow")}
        entry = self.maps["kalki_devices"].lookup(self.device)
        if entry is None or entry.flags & (maps.Flag.PORT_SCAN | maps.Flag.BRUTE_FORCE):
            self.maps.update(_pin_windows(prog_fd, pin))
        # A window older than its length counts as none: older entries are deleted, not aged.
        self.horizon_ns = (max(entry.scan_window_ms, entry.bf_window_ms, entry.syn_window_ms)
                           + 1000) * 1_000_000 if entry is not None else 1 << 62
        self.bound = False      # a name was bound (kalki_name_allow has entries)
        self.blocked = False    # a detector blocked a source (kalki_drop_set has entries)
        self.start: int | None = None
        self.aged = 0

    def catch_up(self, capture_s: float) -> None:
        now = time.monotonic_ns()
        if self.start is None:
            self.start = now
        lag = int(capture_s * 1e9) - (now - self.start) - self.aged
        if lag >= self.STEP_NS:
            self._age(lag)
            self.aged += lag

    def _age(self, ns: int) -> None:
        st = self.maps["kalki_dev_state"].lookup(self.device)
        if st is not None:
            for f in ("packet_tat", "byte_tat", "syn_window_ns", "scan_seen_ns"):
                setattr(st, f, max(0, getattr(st, f) - ns))
            self.maps["kalki_dev_state"].update(self.device, st)
        for k, v in list(self.maps["kalki_name_allow"].items()) if self.bound else ():
            v.expires_ns = max(0, v.expires_ns - ns)
            self.maps["kalki_name_allow"].update(k, v)
        for k, v in list(self.maps["kalki_drop_set"].items()) if self.blocked else ():
            if v.expires_ns:        # 0: until unblocked
                v.expires_ns = max(1, v.expires_ns - ns)
                self.maps["kalki_drop_set"].update(k, v)
        now = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
        for name, (_, key, stamps) in _WINDOW_MAPS.items():
            m = self.maps.get(name)
            if m is None:
                continue
            slots = m.first_values(m.max_entries)
            if slots is None:
                slots = [m.lookup(ctypes.c_uint32(i)) for i in range(m.max_entries)]
            for i, slot in enumerate(slots):
                if not getattr(slot, key):
                    continue
                for field in stamps:
                    setattr(slot, field, max(0, getattr(slot, field) - ns))
                if now - getattr(slot, stamps[0]) > self.horizon_ns:
                    slot = type(slot)()     # older than any window: an empty slot
                m.update(ctypes.c_uint32(i), slot)

    def close(self) -> None:
        for m in self.maps.values():
            m.close()


def _pin_windows(prog_fd: int, pin_dir: str) -> dict[str, bpf.Map]:
    """The detectors' window maps the program uses, pinned beside the others (and removed with
    them) so that they can be opened."""
    out = {}
    for map_id in bpf.prog_map_ids(prog_fd):
        try:
            fd = bpf.map_fd_by_id(map_id)
        except OSError as e:
            raise DataplaneError(str(e)) from None
        try:
            name = bpf.map_info(fd).name.decode()
            if name in _WINDOW_MAPS:
                bpf.obj_pin(fd, f"{pin_dir}/{name}")
                out[name] = bpf.Map(f"{pin_dir}/{name}", ctypes.c_uint32, _WINDOW_MAPS[name][0])
        finally:
            os.close(fd)
    return out
