"""Captures for `kalki profile test`: a pcap or pcapng file read into Ethernet frames (Linux
cooked captures, `tcpdump -i any`, converted), the device in it found, its packets grouped
into flows.

Only reads: frames are parsed with dpkt, nothing here touches the kernel or a network.
"""
from __future__ import annotations

import collections
import functools
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

import dpkt

from appliance.errors import ConfigError
from appliance.vocab import check_mac

DLT_EN10MB, DLT_LINUX_SLL, DLT_LINUX_SLL2 = 1, 113, 276
LINK_TYPES = {0: "NULL (BSD loopback)", 101: "RAW (IP without a link layer)", 105: "IEEE 802.11",
              127: "IEEE 802.11 radiotap", 228: "IPv4 without a link layer"}


@dataclass
class Packet:
    n: int              # its place in the capture, from 0
    ts: float           # seconds, as the capture gives them
    frame: bytes        # an Ethernet frame

    @functools.cached_property
    def eth(self) -> dpkt.ethernet.Ethernet | None:
        """The frame parsed (once), or None if it is not even Ethernet."""
        try:
            return dpkt.ethernet.Ethernet(self.frame)
        except (dpkt.UnpackError, struct.error):
            return None


@dataclass
class Flow:
    direction: str      # "from-device" (by source MAC) or "to-device" (IPv4 to its address)
    proto: str          # tcp, udp, icmp, ip-N (other IPv4), arp, ipv6, or 0xNNNN (ethertype)
    peer: str           # the other end's address (a MAC for what has no IP address)
    port: int | None    # the peer's TCP or UDP port
    packets: list[Packet] = field(default_factory=list)
    syn: bool = False   # a TCP SYN without ACK among them: the capture saw the flow open


class _Truncated(Exception):
    pass


class _Strict:
    """A file whose reads come back whole or not at all: dpkt's pcap reader takes a record
    cut short for a short packet."""

    def __init__(self, f):
        self._f = f
        self.name = getattr(f, "name", "")

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if n > 0 and 0 < len(data) < n:
            raise _Truncated
        return data


def read_packets(path) -> list[Packet]:
    """Every frame of a pcap or pcapng file, as Ethernet, in capture order; a ConfigError
    naming the file when it is not a capture, is cut short, or has another link type."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            f.seek(0)
            try:
                if magic == b"\x0a\x0d\x0d\x0a":
                    reader = dpkt.pcapng.Reader(_Strict(f))
                else:
                    reader = dpkt.pcap.Reader(_Strict(f))
            except (ValueError, dpkt.UnpackError, _Truncated):
                raise ConfigError(f"{path}: not a pcap or pcapng capture") from None
            link = reader.datalink()
            if link not in (DLT_EN10MB, DLT_LINUX_SLL, DLT_LINUX_SLL2):
                raise ConfigError(f"{path}: link type {LINK_TYPES.get(link, link)}: only Ethernet "
                                  "(and Linux cooked) captures carry the devices' MAC addresses")
            out = []
            try:
                for n, (ts, buf) in enumerate(reader):
                    if not buf:
                        raise _Truncated
                    frame = bytes(buf) if link == DLT_EN10MB else _cooked_to_ethernet(bytes(buf), link)
                    out.append(Packet(n, float(ts), frame))
            except (_Truncated, dpkt.UnpackError, struct.error):
                raise ConfigError(f"{path}: the capture is cut short after {len(out)} packets") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    if not out:
        raise ConfigError(f"{path}: the capture holds no packets")
    return out


def _cooked_to_ethernet(buf: bytes, link: int) -> bytes:
    """A Linux cooked (SLL or SLL2) frame as Ethernet: the sender's address is kept; the
    destination's is not in the capture (broadcast and multicast say so, the rest is zeros)."""
    if link == DLT_LINUX_SLL:
        kind, _, alen, addr, proto = struct.unpack_from("!HHH8sH", buf)
        rest = buf[16:]
    else:
        proto, _, _, _, kind, alen, addr = struct.unpack_from("!HHIHBB8s", buf)
        rest = buf[20:]
    src = addr[:6] if alen == 6 else bytes(6)
    dst = {1: b"\xff" * 6, 2: b"\x01\x00\x5e\x00\x00\x00"}.get(kind, bytes(6))
    return dst + src + struct.pack("!H", proto) + rest


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _ipv4(p: Packet):
    """(Ethernet, IP) of an IPv4 frame, or (Ethernet or None, None)."""
    eth = p.eth
    return eth, eth.data if eth is not None and isinstance(eth.data, dpkt.ip.IP) else None


def _unicast(raw: bytes) -> bool:
    a = ipaddress.IPv4Address(raw)
    return not a.is_multicast and raw != b"\xff" * 4


def device_mac(packets: list[Packet], source: str = "capture") -> str:
    """The MAC that sends most unicast IPv4 from a private address, routers left out (a MAC
    that also sends from a public address: traffic it forwards). A tie is an error."""
    sent: collections.Counter[bytes] = collections.Counter()
    routers = set()
    for p in packets:
        eth, ip = _ipv4(p)
        if ip is None or eth is None:
            continue
        if not ipaddress.IPv4Address(ip.src).is_private:
            routers.add(eth.src)
        elif ip.src != bytes(4) and _unicast(ip.dst) and not eth.src[0] & 1:
            sent[eth.src] += 1
    ranked = [(n, mac) for mac, n in sent.most_common() if mac not in routers]
    if not ranked:
        raise ConfigError(f"{source}: no host sends unicast IPv4 from a private address: "
                          "give the device's MAC (--mac)")
    if len(ranked) > 1 and ranked[1][0] == ranked[0][0]:
        tied = ", ".join(mac_text(m) for n, m in ranked if n == ranked[0][0])
        raise ConfigError(f"{source}: which device? {tied} send as much: give its MAC (--mac)")
    return mac_text(ranked[0][1])


def device_ip(packets: list[Packet], mac: str, source: str = "capture") -> str:
    """The address the device sends from most (its DHCP 0.0.0.0 aside), else the one most
    sent to its MAC."""
    raw = bytes.fromhex(mac.replace(":", ""))
    sent: collections.Counter[bytes] = collections.Counter()
    got: collections.Counter[bytes] = collections.Counter()
    for p in packets:
        eth, ip = _ipv4(p)
        if ip is None or eth is None:
            continue
        if eth.src == raw and ip.src != bytes(4):
            sent[ip.src] += 1
        elif eth.dst == raw and _unicast(ip.dst):
            got[ip.dst] += 1
    best = (sent or got).most_common(1)
    if not best:
        raise ConfigError(f"{source}: no IPv4 packets from or to {mac}")
    return socket.inet_ntoa(best[0][0])


def router(packets: list[Packet], mac: str, device_address: str) -> str | None:
    """The address of the device's router in the capture: the MAC it sends most IPv4 to
    addresses outside its /24 through, and the address that MAC uses on the /24 (in ARP, or
    as an IPv4 source). None if the capture does not tell."""
    raw = bytes.fromhex(mac.replace(":", ""))
    net = ipaddress.IPv4Network(f"{device_address}/24", strict=False)
    via: collections.Counter[bytes] = collections.Counter()
    for p in packets:
        eth, ip = _ipv4(p)
        if ip is not None and eth is not None and eth.src == raw and not eth.dst[0] & 1 \
                and _unicast(ip.dst) and ipaddress.IPv4Address(ip.dst) not in net:
            via[eth.dst] += 1
    if not via:
        return None
    gw_mac = via.most_common(1)[0][0]
    used: collections.Counter[str] = collections.Counter()
    for p in packets:
        eth = p.eth
        if eth is None or eth.src != gw_mac:
            continue
        if isinstance(eth.data, dpkt.arp.ARP):
            addr = eth.data.spa
        elif isinstance(eth.data, dpkt.ip.IP):
            addr = eth.data.src
        else:
            continue
        if len(addr) == 4 and ipaddress.IPv4Address(addr) in net and addr != bytes(4):
            used[socket.inet_ntoa(addr)] += 1
    return used.most_common(1)[0][0] if used else None


def flows(packets: list[Packet], mac: str, device_address: str | None = None,
          source: str = "capture") -> list[Flow]:
    """The device's packets as flows, in the order of each flow's first packet: from the
    device (by source MAC: everything it sends) and to it (IPv4 to its address from another
    MAC), grouped by (direction, proto, peer address, peer port)."""
    mac = check_mac(mac, f"{source}: --mac", unicast=True)
    address = device_address or device_ip(packets, mac, source)
    raw, ip_raw = bytes.fromhex(mac.replace(":", "")), socket.inet_aton(address)
    out: dict[tuple, Flow] = {}
    for p in packets:
        eth = p.eth
        if eth is None:
            continue
        data = eth.data
        if eth.src == raw:
            direction = "from-device"
        elif isinstance(data, dpkt.ip.IP) and data.dst == ip_raw:
            direction = "to-device"
        else:
            continue
        syn = False
        port: int | None = None
        if isinstance(data, dpkt.ip.IP):
            peer = socket.inet_ntoa(data.dst if direction == "from-device" else data.src)
            proto = {6: "tcp", 17: "udp", 1: "icmp"}.get(data.p, f"ip-{data.p}")
            l4 = data.data
            if isinstance(l4, (dpkt.tcp.TCP, dpkt.udp.UDP)):
                port = l4.dport if direction == "from-device" else l4.sport
                syn = isinstance(l4, dpkt.tcp.TCP) and l4.flags & 0x12 == 0x02
        elif isinstance(data, dpkt.arp.ARP):
            proto, peer = "arp", socket.inet_ntoa(data.tpa) if len(data.tpa) == 4 else "?"
        elif isinstance(data, dpkt.ip6.IP6):
            proto, peer = "ipv6", str(ipaddress.IPv6Address(data.dst))
        else:
            proto, peer = f"0x{eth.type:04x}", mac_text(eth.dst)
        key = (direction, proto, peer, port)
        flow = out.get(key)
        if flow is None:
            flow = out[key] = Flow(direction, proto, peer, port)
        flow.packets.append(p)
        flow.syn = flow.syn or syn
    if not any(f.direction == "from-device" for f in out.values()):
        raise ConfigError(f"{source}: no packets from {mac}")
    return list(out.values())
