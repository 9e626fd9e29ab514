"""Which XDP program an interface of the gateway runs: one rtnetlink request per interface
(RTM_GETLINK by name), decoded here. The tamper watch asks twice a second, and `ip -j link
show` in a child process cost it 1.5 ms a look, its JSON parsed holding the GIL the loop
waits for. (Importing pyroute2 for it would cost the supervisor 7-20 MB, as nft.Generation
says.)"""
from __future__ import annotations

import errno
import os
import socket
import struct
import threading

from appliance import netns
from appliance.errors import DataplaneError

RTM_NEWLINK, RTM_GETLINK = 16, 18
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
IFLA_IFNAME, IFLA_EXT_MASK, IFLA_XDP = 3, 29, 43
IFLA_XDP_ATTACHED, IFLA_XDP_PROG_ID = 2, 4
RTEXT_FILTER_SKIP_STATS = 1 << 3
_HEADER = "=IHHII"      # nlmsghdr
_IFINFO = "=BxHiII"     # ifinfomsg
ABSENT = object()       # programs(): the interface is not there


def _attr(kind: int, value: bytes) -> bytes:
    out = struct.pack("=HH", 4 + len(value), kind) + value
    return out + bytes(-len(out) % 4)


def _attrs(data: bytes, offset: int = 0):
    """(kind, value) of each netlink attribute from `offset`."""
    while offset + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, offset)
        if size < 4:
            return
        yield kind & 0x3FFF, data[offset + 4:offset + size]
        offset += (size + 3) & ~3


def xdp_program(reply: bytes) -> int | None:
    """The XDP program id an RTM_NEWLINK body (ifinfomsg and attributes) names; None if none
    is attached."""
    for kind, value in _attrs(reply, struct.calcsize(_IFINFO)):
        if kind != IFLA_XDP:
            continue
        nested = dict(_attrs(value))
        attached = nested.get(IFLA_XDP_ATTACHED, b"\0")[:1]
        prog = nested.get(IFLA_XDP_PROG_ID)
        if attached == b"\0" or prog is None or len(prog) < 4:
            return None
        return struct.unpack_from("=I", prog)[0]
    return None


class XdpLinks:
    """An rtnetlink socket in one network namespace, for what XDP program each interface runs.
    Safe in two threads (the tamper watch's worker and the loop)."""

    def __init__(self, namespace: str | None):
        with netns.entered(namespace):
            self._sock: socket.socket | None = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._sock.settimeout(1.0)
        self._seq = 0
        self._lock = threading.Lock()

    def programs(self, ifnames) -> dict[str, int | None]:
        """{interface: its XDP program id, or None}; an interface that is not there is left
        out. A DataplaneError names the interface the kernel would not answer for."""
        out: dict[str, int | None] = {}
        with self._lock:
            for name in ifnames:
                prog = self._ask(name)
                if prog is not ABSENT:
                    out[name] = prog
        return out

    def _ask(self, name: str):
        if self._sock is None:
            raise DataplaneError(f"interface {name}: the netlink socket is closed")
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        body = (struct.pack(_IFINFO, socket.AF_UNSPEC, 0, 0, 0, 0)
                + _attr(IFLA_IFNAME, name.encode() + b"\0")
                + _attr(IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS)))
        request = struct.pack(_HEADER, 16 + len(body), RTM_GETLINK, NLM_F_REQUEST, self._seq, 0) + body
        try:
            self._sock.send(request)
            while True:
                reply = self._sock.recv(65536)
                _, kind, _, seq, _ = struct.unpack_from(_HEADER, reply)
                if seq == self._seq:
                    break
        except (OSError, struct.error) as e:
            raise DataplaneError(f"interface {name}: asking netlink for its XDP program: {e}") from None
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", reply, 16)[0]
            if code == errno.ENODEV:
                return ABSENT
            raise DataplaneError(f"interface {name}: netlink: {os.strerror(code)}")
        if kind != RTM_NEWLINK:
            raise DataplaneError(f"interface {name}: netlink answered message type {kind}")
        return xdp_program(reply[16:])

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
