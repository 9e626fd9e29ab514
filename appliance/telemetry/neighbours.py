"""Devices appear in the gateway's neighbour table when they first talk to it: a netlink socket
subscribed to neighbour events, read on the loop (no thread), and one dump of the table at
start. Each neighbour in the LAN is reported through `on_seen(mac, ip)`."""
from __future__ import annotations

import asyncio
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
RTM_NEWNEIGH = 28
NDA_DST, NDA_LLADDR = 1, 2


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
                 loop: asyncio.AbstractEventLoop):
        self.ifname = ifname
        self._net = ipaddress.IPv4Network(lan)
        self._on_seen = on_seen
        self._loop = loop
        self._sock: socket.socket | None = None
        self._ifindex = 0

    def start(self) -> None:
        try:
            self._ifindex = socket.if_nametoindex(self.ifname)
        except OSError:
            log.warning("neighbour monitor: no interface %s", self.ifname)
            return
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                             socket.NETLINK_ROUTE)
        sock.bind((0, RTMGRP_NEIGH))
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._readable)
        out = subprocess.run(["ip", "-j", "neigh", "show", "dev", self.ifname],
                             capture_output=True, text=True)
        for n in json.loads(out.stdout or "[]"):
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
        try:
            data = self._sock.recv(65536)
        except BlockingIOError:
            return
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
