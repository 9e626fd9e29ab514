"""The neighbour monitor when more events come at once than its socket holds: the kernel drops
the rest and says ENOBUFS once; the monitor reads the whole table again, so every device is
still reported. Real netlink in a namespace of the test's own, 198.18.200.0/23 on a veth."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import socket
import subprocess
import time

import pytest

from appliance import netns
from appliance.telemetry.neighbours import NeighbourMonitor

pytestmark = pytest.mark.lab

NEIGHBOURS = 300


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def namespace(run_suffix):
    name = f"kt-nb{run_suffix}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        sh("ip", "-n", name, "addr", "add", "198.18.200.1/23", "dev", "v0")
        sh("ip", "-n", name, "link", "set", "v0", "up")
        sh("ip", "-n", name, "link", "set", "v1", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def neighbours(first: int = 0, count: int = NEIGHBOURS) -> dict[str, str]:
    base = int(ipaddress.IPv4Address("198.18.200.10"))
    return {f"02:4e:00:00:{i // 256:02x}:{i % 256:02x}": str(ipaddress.IPv4Address(base + i))
            for i in range(first, first + count)}


def add(wanted: dict[str, str]) -> None:
    batch = "".join(f"neigh add {ip} lladdr {mac} dev v0 nud permanent\n" for mac, ip in wanted.items())
    subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)


def until_seen(loop, seen: dict, wanted: dict, seconds: float = 5.0) -> None:
    async def wait():
        deadline = time.monotonic() + seconds
        while seen != wanted and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    loop.run_until_complete(wait())


@contextlib.contextmanager
def monitor_in(namespace: str, shrink: bool):
    """A started monitor in the namespace (the test runs in it meanwhile), what it reported."""
    seen: dict[str, str] = {}
    with netns.entered(namespace):
        loop = asyncio.new_event_loop()
        monitor = NeighbourMonitor("v0", "198.18.200.0/23", lambda mac, ip: seen.__setitem__(mac, ip),
                                   loop, counters=collections.Counter(elsewhere=1))
        try:
            monitor.start()
            assert monitor._sock is not None
            if shrink:      # the smallest buffer the kernel allows: a burst cannot fit
                monitor._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            yield monitor, seen, loop
        finally:
            monitor.close()
            loop.close()


def test_a_burst_larger_than_the_socket_is_read_again_whole(namespace):
    with monitor_in(namespace, shrink=True) as (monitor, seen, loop):
        add(neighbours())
        until_seen(loop, seen, neighbours())
        assert seen == neighbours()
        assert monitor.overflows >= 1
        # counted where it was given (the supervisor's counters, shown by its status)
        assert monitor.counters == {"elsewhere": 1, "neighbour_overflows": monitor.overflows}


def test_events_after_an_overflow_are_kept(namespace):
    """The socket drops every event without a word until its queue is empty: a burst that
    comes after the overflow was seen, while the queue still held the first, is reported too."""
    first, second = neighbours(0, 150), neighbours(150, 150)
    with monitor_in(namespace, shrink=True) as (monitor, seen, loop):
        add(first)
        monitor._readable()         # the overflow said, the queue still full
        assert monitor.overflows == 1
        add(second)
        until_seen(loop, seen, {**first, **second})
        assert seen == {**first, **second}


def test_the_monitor_s_own_buffer_holds_a_burst(namespace):
    with monitor_in(namespace, shrink=False) as (monitor, seen, loop):
        add(neighbours())
        until_seen(loop, seen, neighbours())
        assert seen == neighbours()
        assert monitor.overflows == 0
