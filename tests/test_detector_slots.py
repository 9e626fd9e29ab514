"""The detectors' memory of sources (ebpf/dispatcher.bpf.c): tables of slot pairs indexed by a
keyed hash, each slot holding its key; a key not in its pair takes the pair's least recently
used slot (in one tick of the coarse clock, the one counting less). Checked on the kernel,
through BPF_PROG_TEST_RUN, with the seed fixed so that the sources which share a pair can be
found here: an attacker's count survives a crowd of other sources, a newcomer takes the idle
slot of the pair and not the busy one, and the loader draws a fresh seed at each compile."""
from __future__ import annotations

import ctypes
import ipaddress
import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import dispatcher_paths as paths  # noqa: E402
from common import PinnedPath, bpf, dataplane, maps  # noqa: E402
from labutil import tcp_packet  # noqa: E402

from appliance.dataplane import loader, trial  # noqa: E402

pytestmark = pytest.mark.lab

SEED = 0x2545F491
ATTEMPTS = 10
SLOTS_LOG2 = 16


def slot_pair(a: int, b: int, seed: int = SEED) -> int:
    """dispatcher.bpf.c's slot_pair, in Python."""
    m = 0xFFFFFFFF
    h = ((a ^ seed) * 0x9E3779B1) & m
    h = ((h ^ (h >> 16) ^ b) * 0x85EBCA77) & m
    h ^= h >> 13
    return (h >> (32 - SLOTS_LOG2)) & ~1


def as_kernel_reads(ip: str) -> int:
    """The source address as the program reads it: network-order bytes in a host u32."""
    return int.from_bytes(ipaddress.IPv4Address(ip).packed, sys.byteorder)


def brute_force_pair(ip: str) -> int:
    return slot_pair(as_kernel_reads(ip), 1 | maps.Reason.BRUTE_FORCE << 16)


@pytest.fixture
def pinned():
    instance = f"tds{secrets.token_hex(3)}"
    path = None
    try:
        path = PinnedPath(instance, defines={"KALKI_SLOT_SEED": f"{SEED:#x}u"})
        stack = {"brute_force": {"attempts": ATTEMPTS, "window_ms": 3_600_000,
                                 "ports": [paths.LOGIN_PORT], "block_seconds": 60}}
        path.add_device(1, dataplane.DeviceSpec("dev1", paths.DEV_MAC, paths.DEV_IP, stack))
        windows = trial._pin_windows(path.prog_fds["xdp_to_devices"], path.pin_dir)
        yield path, windows["kalki_windows"]
    finally:
        if path is not None:
            path.close()
        dataplane.remove_pins(instance)


def attempt(path, src: str) -> int:
    frame = paths.from_uplink(tcp_packet(src, paths.DEV_IP, 40000, paths.LOGIN_PORT, "S"))
    verdict, _ = bpf.prog_test_run(path.prog_fds["xdp_to_devices"], frame, 1)
    return verdict


def sharing_one_pair(n: int) -> list[str]:
    """n sources of 198.18.0.0/15 whose brute-force windows for device 1 share one pair."""
    by_pair: dict[int, list[str]] = {}
    for i in range(1, 1 << 17):
        ip = str(ipaddress.IPv4Address("198.18.0.0") + i)
        if ip in (paths.DEV_IP, paths.ATTACKER):
            continue
        group = by_pair.setdefault(brute_force_pair(ip), [])
        group.append(ip)
        if len(group) == n:
            return group
    raise AssertionError("no pair shared by enough sources")


def window(windows, src: str):
    """(slot, count) of the source's brute-force window, or None."""
    pair = brute_force_pair(src)
    for slot in (pair, pair + 1):
        w = windows.lookup(ctypes.c_uint32(slot))
        if w.src == as_kernel_reads(src) and w.device_kind == 1 | maps.Reason.BRUTE_FORCE << 16:
            return slot, w.count
    return None


def test_python_finds_the_kernels_pair(pinned):
    path, windows = pinned
    src = "198.19.1.7"
    assert attempt(path, src) == paths.XDP_PASS
    assert window(windows, src) is not None and window(windows, src)[1] == 1


def test_a_newcomer_takes_the_idle_slot_of_the_pair_not_the_busy_one(pinned):
    path, windows = pinned
    busy, idle, newcomer = sharing_one_pair(3)
    for _ in range(ATTEMPTS - 2):
        assert attempt(path, busy) == paths.XDP_PASS
    assert attempt(path, idle) == paths.XDP_PASS
    assert attempt(path, busy) == paths.XDP_PASS       # used last (or in the same tick, more)
    assert attempt(path, newcomer) == paths.XDP_PASS
    assert window(windows, idle) is None                # pushed out
    assert window(windows, busy)[1] == ATTEMPTS - 1
    assert window(windows, newcomer)[1] == 1
    before = path.counter(1, maps.Reason.BRUTE_FORCE)
    assert attempt(path, busy) == paths.XDP_PASS        # the 10th: at the limit
    assert attempt(path, busy) == paths.XDP_DROP        # the 11th: blocked
    assert path.counter(1, maps.Reason.BRUTE_FORCE) == before + 1
    assert path.maps["kalki_drop_set"].lookup(ctypes.c_uint32(as_kernel_reads(busy))) is not None


def test_an_attacker_among_a_crowd_of_sources_is_blocked_at_its_limit(pinned):
    """3,000 other sources try the login port between each two of the attacker's attempts."""
    path, _ = pinned
    attacker = "198.19.200.200"
    crowd = (str(ipaddress.IPv4Address("198.18.16.0") + i) for i in range(40_000))
    for n in range(1, ATTEMPTS + 2):
        for _ in range(3_000):
            assert attempt(path, next(crowd)) == paths.XDP_PASS
        assert attempt(path, attacker) == (paths.XDP_PASS if n <= ATTEMPTS else paths.XDP_DROP), n


def test_the_loader_draws_a_seed_at_each_compile_unless_given():
    def seed(flags):
        return next(f for f in flags if f.startswith("-DKALKI_SLOT_SEED="))

    drawn = {seed(loader.cflags()) for _ in range(8)}
    assert len(drawn) == 8
    assert seed(loader.cflags({"KALKI_SLOT_SEED": "0x1u"})) == "-DKALKI_SLOT_SEED=0x1u"
