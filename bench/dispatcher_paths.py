"""The XDP dispatcher's named paths: for each, the packet, the device and its umboxes, the
program, and the verdict and the one per-reason counter it must end in. bench_dispatcher.py
times them; tests/test_dispatcher_paths.py proves each takes the branch it names. One table for
both, so they cannot drift apart.

Pin dirs (each its own compile of ebpf/dispatcher.bpf.c, attached nowhere, maps written
directly; see common.PinnedPath), all with ATTACKER in kalki_drop_set:
  one         device 1 alone, with stack(): every in-kernel umbox but quarantine
  distinct    device 1 among 1,000 devices, each with its own allow-list (4,999 prefixes)
  no_stealth  as `one`, compiled with -DKALKI_NO_STEALTH_SCAN (the stealth-scan check out)

Varied destinations, and why they are measured one packet per test run. port_scan keeps, per
device, the last flow it counted (source, destination, port | proto << 16, in kalki_dev_state)
and returns at once for a packet of that flow. BPF_PROG_TEST_RUN runs ONE packet `repeat`
times, and its first run writes that packet's own flow into the cache, so every later repeat
hits it: no packet, and no window, makes the repeats miss (the entry goes stale only when the
scan window passes on the coarse clock: one packet in many thousands). So `varied_dst` is 16
UDP flows to 16 allowed destinations, sent round-robin, one test run of repeat 1 each: the
cache then always holds the previous packet's flow, which has another destination, so every
measured packet misses it and goes on to kalki_scan_seen (a hit: the flow was counted within
the window, as a device's steady traffic to a few places is). A run of repeat 1 also times the
test run's own clock reads and starts with the caches the syscall left, so it is compared with
the `udp` packet measured the same way (`udp_run1`: every run a cache hit, else the same path):
varied_dst - udp_run1 is what a cache miss adds.

New sources. `syn_new_source` is syn_login's SYN from 131,070 sources in turn (198.18.0.0/15
but the device and ATTACKER), one test run each, the turn carried on from run to run: each
source comes back only after twice as many others as the detectors' tables have slots, so
every packet is a source they do not hold, as in an attack from many (spoofed) sources.
brute_force and port_scan each start a window for it, and port_scan records its flow. Its
baseline is `syn_login_run1`, syn_login's one source measured the same way.
"""
from __future__ import annotations

import ctypes
import ipaddress
import sys
from dataclasses import dataclass

import common
from common import XDP_DROP, XDP_PASS, bpf, dataplane, maps
from labutil import tcp_packet, udp_packet

DEV_MAC, DEV_IP = "02:42:aa:00:00:01", "198.18.0.10"
GW_DEV_MAC, GW_UP_MAC = "02:42:aa:ff:00:01", "02:42:aa:ff:00:02"
UPLINK_PEER_MAC = "02:42:aa:ff:00:03"
DST, DST_PORT = "198.19.8.1", 443          # in the allow-list (198.19.8.0/24, any)
NOT_ALLOWED = "198.19.200.1"               # outside the LAN and every allow-list
REMOTE = "198.19.8.2"                      # a source on the uplink
ATTACKER = "198.19.0.66"                   # a source on the uplink, in kalki_drop_set
SPOOFED = "198.18.0.99"                    # another address than device 1's, from its MAC
LOGIN_PORT = 22                            # in brute_force's ports
VARIED = [f"198.19.8.{10 + i}" for i in range(16)]
DISTINCT_DEVICES = 1000
NEW_SOURCES = 2 * 65536     # twice the slots of the detectors' tables (dispatcher.bpf.c)

PIN_DIRS: dict[str, dict | None] = {
    "one": None,
    "distinct": None,
    "no_stealth": {"KALKI_NO_STEALTH_SCAN": None},
}


def stack(count_window_ms: int = 1, destinations=None) -> dict:
    """Every in-kernel umbox but quarantine (which short-circuits): common.all_on_stack, with
    the detectors' thresholds at their catalogue maxima and the SYN and login-attempt windows
    `count_window_ms` long. With 1 ms (the benchmark's), the coarse clock's tick (4 ms at
    HZ=250) restarts them, so at most a tick's worth of packets count (tens of thousands) and
    1e6 repeats never reach 10 M SYNs or 1 M attempts; the test uses an hour, so that its
    counts are exact. block_seconds > 0: a detector that fired anyway would drop (and fail the
    counter check) instead of reporting and passing unseen."""
    s = common.all_on_stack(destinations)
    s["port_scan"] = {"ports": 65_535, "window_ms": 1000, "block_seconds": 60}
    s["syn_flood"] = {"syns": 10_000_000, "window_ms": count_window_ms, "block_seconds": 60}
    s["brute_force"] = {"attempts": 1_000_000, "window_ms": count_window_ms,
                        "ports": [LOGIN_PORT, 23], "block_seconds": 60}
    return s


def from_device(ip_packet: bytes, mac: str = DEV_MAC) -> bytes:
    return common.eth(GW_DEV_MAC, mac, ip_packet)


def from_uplink(ip_packet: bytes) -> bytes:
    return common.eth(GW_UP_MAC, UPLINK_PEER_MAC, ip_packet)


@dataclass(frozen=True)
class Case:
    name: str
    pin_dir: str                    # a key of PIN_DIRS
    program: str                    # xdp_from_devices or xdp_to_devices
    packets: tuple[bytes, ...]
    verdict: int                    # XDP_PASS or XDP_DROP
    reason: maps.Reason             # the only counter of device 1 that grows, by one a packet
    what: str
    detectors: tuple[str, ...] = ()  # SYN-path detectors that run on every packet of the case
    per_run: bool = False           # one test run of repeat 1 per packet, round-robin

    @property
    def method(self) -> str:
        return "one packet per test run, round-robin" if self.per_run else "one packet repeated"


def with_source(frame: bytes, src: int) -> bytes:
    """The frame from another IPv4 source (the checksum is left: XDP does not check it)."""
    return frame[:26] + src.to_bytes(4, "big") + frame[30:]


def new_sources(frame: bytes) -> tuple[bytes, ...]:
    first = int(ipaddress.IPv4Address("198.18.0.0"))
    skip = {int(ipaddress.IPv4Address(a)) for a in (DEV_IP, ATTACKER)}
    return tuple(with_source(frame, a) for a in range(first, first + NEW_SOURCES) if a not in skip)


def cases() -> list[Case]:
    syn_login = from_uplink(tcp_packet(REMOTE, DEV_IP, 40000, LOGIN_PORT, "S"))
    udp = from_device(udp_packet(DEV_IP, DST, 40000, DST_PORT, b"kalki-bench"))
    syn_detectors = ("syn_flood", "brute_force", "port_scan")
    return [
        Case("syn_login", "one", "xdp_to_devices", (syn_login,), XDP_PASS, maps.Reason.PASS,
             "TCP SYN from the uplink to the device's login port 22: syn_flood, brute_force "
             "and port_scan all count it", syn_detectors),
        Case("syn_new_source", "one", "xdp_to_devices", new_sources(syn_login), XDP_PASS,
             maps.Reason.PASS, f"syn_login's SYN from {NEW_SOURCES - 2:,} sources in turn, one "
             "test run each: every packet from a source the detectors do not hold",
             syn_detectors, per_run=True),
        Case("syn_login_run1", "one", "xdp_to_devices", (syn_login,), XDP_PASS, maps.Reason.PASS,
             "the syn_login packet measured as syn_new_source is: its baseline", syn_detectors,
             per_run=True),
        Case("syn_login_no_stealth", "no_stealth", "xdp_to_devices", (syn_login,), XDP_PASS,
             maps.Reason.PASS, "syn_login, dispatcher compiled with -DKALKI_NO_STEALTH_SCAN",
             syn_detectors),
        Case("established", "one", "xdp_from_devices",
             (from_device(tcp_packet(DEV_IP, DST, 40000, DST_PORT, "A", ack=1)),), XDP_PASS,
             maps.Reason.PASS, "TCP ACK (no SYN) from the device: opens nothing, no detector, "
             "no allow-list"),
        Case("udp", "one", "xdp_from_devices", (udp,), XDP_PASS, maps.Reason.PASS,
             "UDP from the device to an allowed destination (was from_1): port_scan (last-flow "
             "cache hit), allow-list hit (the flow's verdict remembered: kalki_allow_seen)",
             ("port_scan",)),
        Case("allowlist_miss", "one", "xdp_from_devices",
             (from_device(udp_packet(DEV_IP, NOT_ALLOWED, 40000, DST_PORT, b"kalki-bench")),),
             XDP_DROP, maps.Reason.ALLOWLIST, "UDP from the device to a destination outside "
             "its allow-list (an egress_anomaly event, limited)", ("port_scan",)),
        Case("spoofed", "one", "xdp_from_devices",
             (from_device(udp_packet(SPOOFED, DST, 40000, DST_PORT, b"kalki-bench")),),
             XDP_DROP, maps.Reason.SPOOF, "UDP from the device's MAC with another source "
             "address: anti_spoof"),
        Case("drop_set", "one", "xdp_to_devices",
             (from_uplink(tcp_packet(ATTACKER, DEV_IP, 40000, LOGIN_PORT, "S")),), XDP_DROP,
             maps.Reason.DROP_SET, "TCP SYN to the login port from a source in kalki_drop_set"),
        Case("varied_dst", "one", "xdp_from_devices",
             tuple(from_device(udp_packet(DEV_IP, d, 40000, DST_PORT, b"kalki-bench"))
                   for d in VARIED), XDP_PASS, maps.Reason.PASS,
             f"UDP from the device to {len(VARIED)} allowed destinations in turn: every packet "
             "misses port_scan's last-flow cache and the allow-list's remembered verdict",
             ("port_scan",), per_run=True),
        Case("udp_run1", "one", "xdp_from_devices", (udp,), XDP_PASS, maps.Reason.PASS,
             "the udp packet measured as varied_dst is (every run a cache hit): its baseline",
             ("port_scan",), per_run=True),
        Case("udp_1000_distinct", "distinct", "xdp_from_devices", (udp,), XDP_PASS,
             maps.Reason.PASS, "the udp packet, device 1 among 1,000 devices each with its own "
             "allow-list (was from_1000_distinct_lists)", ("port_scan",)),
        Case("to_1", "one", "xdp_to_devices",
             (from_uplink(udp_packet(REMOTE, DEV_IP, DST_PORT, 40000, b"kalki-bench")),),
             XDP_PASS, maps.Reason.PASS, "UDP from the uplink to the device: port_scan",
             ("port_scan",)),
    ]


def prepare(pin_dir: str, path: common.PinnedPath, count_window_ms: int = 1) -> None:
    """Device 1 (and, for `distinct`, 999 more with their own lists), ATTACKER in the drop set."""
    own = stack(count_window_ms)
    path.add_device(1, dataplane.DeviceSpec("dev1", DEV_MAC, DEV_IP, own))
    if pin_dir == "distinct":
        for i in range(1, DISTINCT_DEVICES):
            mac, ip = common.fake_device(i)
            mine = stack(count_window_ms, [*common.ALLOWED, f"198.19.{16 + i // 256}.{i % 256}/32"])
            path.add_device(i + 1, dataplane.DeviceSpec(f"f{i}", mac, ip, mine))
    path._helper.block_source(ATTACKER, 0)


def counts(path: common.PinnedPath, device: int = 1) -> list[int]:
    """Packets counted for the device, by reason."""
    return [path.counter(device, r) for r in maps.Reason]


def grown(before: list[int], after: list[int]) -> dict[str, int]:
    """{reason name: packets} that grew between two `counts`."""
    return {maps.Reason(r).name.lower(): a - b for r, (b, a) in enumerate(zip(before, after)) if a != b}


_turn: dict[str, int] = {}     # per-run cases: the next packet, carried on from run to run


def run(path: common.PinnedPath, case: Case, n: int) -> tuple[set[int], float]:
    """n packets of the case through its program: (verdicts seen, ns per packet by the test
    run's own clock). Repeated: one test run of repeat n. Per run: n test runs of repeat 1,
    the case's packets in turn from where its last run stopped, ns the mean of the n runs."""
    fd = path.prog_fds[case.program]
    if not case.per_run:
        verdict, ns = bpf.prog_test_run(fd, case.packets[0], n)
        return {verdict}, float(ns)
    return run_fd(fd, case.name, case.packets, n)


def run_fd(fd: int, turn: str, packets: tuple[bytes, ...], n: int) -> tuple[set[int], float]:
    """n test runs of repeat 1 of the program, the packets in turn from where the last run of
    `turn` stopped: (verdicts seen, mean ns)."""
    verdicts, total, k, start = set(), 0, len(packets), _turn.get(turn, 0)
    for i in range(start, start + n):
        verdict, ns = bpf.prog_test_run(fd, packets[i % k], 1)
        verdicts.add(verdict)
        total += ns
    _turn[turn] = (start + n) % k
    return verdicts, total / n


def last_packet(case: Case) -> bytes:
    """The packet `run` ran last for the case."""
    return case.packets[(_turn.get(case.name, 1) - 1) % len(case.packets)]


def check(case: Case, verdicts: set[int], before: list[int], after: list[int], n: int) -> None:
    """Every packet got the case's verdict and was counted under its reason, and nothing else."""
    if verdicts != {case.verdict}:
        raise AssertionError(f"{case.name}: verdicts {sorted(common.VERDICTS[v] for v in verdicts)}, "
                             f"expected {common.VERDICTS[case.verdict]}")
    want = {case.reason.name.lower(): n}
    if grown(before, after) != want:
        raise AssertionError(f"{case.name}: counters grew by {grown(before, after)}, expected {want}")


def flow(frame: bytes) -> tuple[int, int, int]:
    """(scan_src, scan_dst, scan_port) as port_scan's last-flow cache in kalki_dev_state holds
    them for this frame (addresses in network order read as host u32; port | proto << 16)."""
    ip = frame[14:]
    l4 = ip[(ip[0] & 0x0F) * 4:]
    return (int.from_bytes(ip[12:16], sys.byteorder), int.from_bytes(ip[16:20], sys.byteorder),
            int.from_bytes(l4[2:4], "big") | ip[9] << 16)


def dev_state(path: common.PinnedPath, device: int = 1) -> maps.DevState:
    return path.maps["kalki_dev_state"].lookup(ctypes.c_uint32(device))
