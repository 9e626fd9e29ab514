"""Devices appear in the gateway's neighbour table when they first talk to it: a netlink socket
subscribed to neighbour events, read on the loop (no thread), and one dump of the table at
start. Each neighbour in the LAN is reported through `on_seen(mac, ip)`.

When more events come at once than the socket holds (a site's devices all powered on together),
the kernel drops the rest and says so once (ENOBUFS): the table is read again whole, so a device
seen or moved meanwhile is still reported. The buffer is made large enough that it is rare."""
from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import json
import logging
import socket
import struct
import subprocess
from collections.abc import Callable

from appliance.errors import KalkiError

log = logging.getLogger("kalki.neighbours")

RTMGRP_NEIGH = 0x4
# 1 MB: about 8,000 events of 120 bytes (the default, 208 KB, held the events of a
# 1,000-device lab's start only in part: bench_supervisor met ENOBUFS four times)
RECEIVE_BUFFER = 1 << 20
DRAIN_AT_ONCE = 256     # messages thrown away per loop turn after an overflow
RTM_NEWNEIGH = 28
NDA_DST, NDA_LLADDR = 1, 2
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def parse_neighbour(body: bytes):
    """(ifindex, MAC, IPv4) of an RTM_NEWNEIGH body (struct ndmsg + attributes), or None.
    Decoded by hand: importing pyroute2 for this would cost the supervisor 20 MB."""
    if len(body) < 12:
        return None
    family, ifindex = body[0], struct.unpack_from("=i", body, 4)[0]
    if family != socket.AF_INET:
        return None
    mac = ip = None
    offset = 12
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        if length < 4:
            break
        value = body[offset + 4:offset + length]
        if kind == NDA_DST and len(value) == 4:
            ip = socket.inet_ntoa(value)
        elif kind == NDA_LLADDR and len(value) == 6:
            mac = ":".join(f"{b:02x}" for b in value)
        offset += (length + 3) & ~3
    return (ifindex, mac, ip) if mac and ip else None


class NeighbourMonitor:
    def __init__(self, ifname: str, lan: str, on_seen: Callable[[str, str], None],
                 loop: asyncio.AbstractEventLoop, counters: collections.Counter | None = None):
        """counters: where the overflows are counted, as `neighbour_overflows` (the
        supervisor's, which its status shows: a site whose devices often come at once has its
        neighbour table read whole each time, and the operator sees how often)."""
        self.ifname = ifname
        self._net = ipaddress.IPv4Network(lan)
        self._on_seen = on_seen
        self._loop = loop
        self._sock: socket.socket | None = None
        self._ifindex = 0
        self.counters: collections.Counter = collections.Counter() if counters is None else counters
        self._resync = False    # emptying the queue after an overflow, the table read next

    @property
    def overflows(self) -> int:
        """Times the kernel dropped events, each followed by a full read."""
        return self.counters["neighbour_overflows"]

    def start(self) -> None:
        try:
            self._ifindex = socket.if_nametoindex(self.ifname)
        except OSError:
            log.warning("neighbour monitor: no interface %s", self.ifname)
            return
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                             socket.NETLINK_ROUTE)
        sock.bind((0, RTMGRP_NEIGH))
        try:        # as root, past net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._readable)
        self._read_table()

    def _read_table(self) -> None:
        out = subprocess.run(["ip", "-j", "neigh", "show", "dev", self.ifname],
                             capture_output=True, text=True)
        try:
            table = json.loads(out.stdout or "[]")
        except ValueError:
            log.warning("neighbour monitor: ip neigh show gave no table: %s", out.stderr.strip())
            return
        for n in table:
            self._seen(n.get("lladdr"), n.get("dst"))

    def close(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _seen(self, mac, ip) -> None:
        try:
            if mac and ip and ipaddress.IPv4Address(ip) in self._net:
                self._on_seen(mac, ip)
        except (ValueError, KalkiError) as e:
            log.warning("neighbour %s %s: %s", mac, ip, e)

    def _readable(self) -> None:
        assert self._sock is not None
        if self._resync:
            self._resync_step()
            return
        try:
            data = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                log.warning("neighbour monitor: reading %s's events: %s", self.ifname, e.strerror)
                return
            self.counters["neighbour_overflows"] += 1
            log.warning("neighbour monitor: the kernel dropped events on %s (more at once than "
                        "the socket holds): reading the whole table again", self.ifname)
            self._resync = True
            self._resync_step()
            return
        self._handle(data)

    def _resync_step(self) -> None:
        """Empties the socket's queue, then reads the table. The socket stays congested,
        dropping every new event without a word, until its queue is empty; and what the queue
        holds is older than the table. At most DRAIN_AT_ONCE messages a loop turn: the
        reader is called again while more wait."""
        assert self._sock is not None
        for _ in range(DRAIN_AT_ONCE):
            try:
                self._sock.recv(65536)
            except BlockingIOError:
                break       # empty
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.counters["neighbour_overflows"] += 1
                    continue
                log.warning("neighbour monitor: reading %s's events: %s", self.ifname, e.strerror)
                break
        else:
            return          # more wait
        self._resync = False
        self._read_table()

    def _handle(self, data: bytes) -> None:
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if length < 16:
                break
            if kind == RTM_NEWNEIGH:
                neighbour = parse_neighbour(data[offset + 16:offset + length])
                if neighbour and neighbour[0] == self._ifindex:
                    self._seen(neighbour[1], neighbour[2])
            offset += (length + 3) & ~3
