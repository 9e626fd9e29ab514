"""Re-enacting a real device's capture from a lab device, with real sockets.

Every address of the capture is mapped into the lab's range first (`address_map`): the device
to the lab device's address, its gateway to the lab gateway's, every other unicast address,
consistently, into 198.19.96.0/19 (inside INET_ANY, which the internet host answers for all
of); broadcast and multicast stay on the device side. The same map rewrites the device's MUD
file (`map_text`), so the profile and the flows agree. Nothing is ever sent to a capture's
original address.

What is re-enacted: each flow the device opened, once: a TCP connection (the peer's port must
be listened on, as the tests do on the internet host), a UDP datagram (broadcast with
SO_BROADCAST). ARP is the kernel's own business and is left out.
"""
from __future__ import annotations

import ipaddress
import re
import socket

from appliance import netns
from appliance.dataplane import capture
from lab.topology import GATEWAY_LAN_IP, LabState

MAPPED_PUBLIC = ipaddress.IPv4Network("198.19.96.0/19")
LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
_ADDRESS = re.compile(r"\b(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})\b")


def _kept(a: ipaddress.IPv4Address) -> bool:
    """Addresses that never leave the device side: broadcast, multicast, unspecified."""
    return a.is_multicast or a == ipaddress.IPv4Address("255.255.255.255") or a.is_unspecified


def address_map(packets: list[capture.Packet], mac: str, lab_device_ip: str) -> dict[str, str]:
    """{capture address: lab address} for every IPv4 address the capture holds."""
    device = capture.device_ip(packets, mac)
    gateway = capture.router(packets, mac, device)
    mapping = {device: lab_device_ip, **({gateway: GATEWAY_LAN_IP} if gateway else {})}
    seen: set[str] = set()
    for p in packets:
        ip = getattr(p.eth, "data", None)
        if ip is not None and hasattr(ip, "src") and hasattr(ip, "dst") and len(ip.src) == 4:
            seen |= {socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst)}
    hosts = MAPPED_PUBLIC.hosts()
    for address in sorted(seen, key=lambda a: ipaddress.IPv4Address(a)):
        if address not in mapping and not _kept(ipaddress.IPv4Address(address)):
            mapping[address] = str(next(hosts))
    for address in seen:
        mapping.setdefault(address, address)
    return mapping


def map_text(text: str, mapping: dict[str, str]) -> str:
    """A text (a MUD file) with every address of the map replaced, /prefixes kept."""
    return _ADDRESS.sub(lambda m: mapping.get(m.group(1), m.group(1)), text)


def _lab_only(address: str) -> str:
    a = ipaddress.IPv4Address(address)
    assert a in LAB_RANGE or _kept(a), f"{address} is outside the lab's range: map it first"
    return address


def reenact(lab: LabState, device: str, flows: list[capture.Flow], mapping: dict[str, str],
            timeout: float = 1.0) -> list[dict]:
    """Opens, from the lab device `device`, each flow the captured device opened. Returns one
    result per flow: {proto, peer (mapped), port, opened (TCP: handshake done; UDP: sent)}."""
    ns = lab.device(device).namespace
    out = []
    for f in flows:
        if f.direction != "from-device" or f.proto not in ("tcp", "udp") or f.port is None:
            continue
        peer = _lab_only(mapping.get(f.peer, f.peer))
        if peer == GATEWAY_LAN_IP and f.proto == "udp" and f.port in (53, 67, 123):
            continue        # the gateway's own services: re-enacted by the lab's DHCP/DNS/NTP
        with netns.entered(ns):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if f.proto == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            if f.proto == "tcp":
                try:
                    s.connect((peer, f.port))
                    opened = True
                except OSError:
                    opened = False
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                s.sendto(b"kalki re-enactment", (peer, f.port))
                opened = True
        finally:
            s.close()
        out.append({"proto": f.proto, "peer": peer, "port": f.port, "opened": opened,
                    "captured_packets": len(f.packets)})
    return out
