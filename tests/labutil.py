"""Real traffic between the lab's namespaces, from the test process.

Sockets are made with the calling thread inside the namespace (appliance.netns), so they live
there; only lab addresses (198.18.0.0/15) are ever used.
"""
from __future__ import annotations

import base64
import contextlib
import ipaddress
import socket
import struct
import subprocess
import time

from appliance import netns

LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")


# LAN broadcast and link-local multicast stay on the lab's own device side (nothing routes them).
LAN_ONLY = (ipaddress.IPv4Network("255.255.255.255/32"), ipaddress.IPv4Network("224.0.0.0/24"),
            ipaddress.IPv4Network("239.255.255.250/32"))


def _lab_only(ip: str) -> str:
    address = ipaddress.IPv4Address(ip)
    assert address in LAB_RANGE or any(address in n for n in LAN_ONLY), f"{ip} is outside the lab range"
    return ip


def connect(ns: str, ip: str, port: int, timeout: float = 1.0) -> bool:
    """A TCP handshake from `ns` to ip:port completes."""
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((_lab_only(ip), port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def open_connection(ns: str, ip: str, port: int, timeout: float = 2.0) -> socket.socket:
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((_lab_only(ip), port))
    return s


def ping(ns: str, ip: str, count: int = 1, wait: float = 1.0, interval: float | None = None) -> int:
    """Number of echo replies received."""
    args = ["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-W", str(wait)]
    if interval is not None:
        args += ["-i", str(interval)]
    out = subprocess.run(args + [_lab_only(ip)], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    return 0


def http(ns: str, ip: str, path: str = "/", port: int = 80, auth: tuple[str, str] | None = None,
         timeout: float = 2.0) -> tuple[int, bytes] | None:
    """(status, body) of a GET, or None when no connection could be made."""
    try:
        s = open_connection(ns, ip, port, timeout)
    except OSError:
        return None
    head = f"GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n"
    if auth:
        head += "Authorization: Basic " + base64.b64encode(":".join(auth).encode()).decode() + "\r\n"
    try:
        s.sendall((head + "\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    finally:
        s.close()
    if not data.startswith(b"HTTP/"):
        return (0, data)
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[-1]


def udp_send(ns: str, ip: str, port: int, count: int, size: int = 64) -> None:
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _ in range(count):
            try:
                s.sendto(b"x" * size, (_lab_only(ip), port))
            except OSError:
                pass
    finally:
        s.close()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_packet(src: str, dst: str, proto: int, l4: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0x1234, 0, 64, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + l4


def tcp_syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 8192, 0, 0)
    pseudo = struct.pack("!4s4sBBH", socket.inet_aton(src), socket.inet_aton(dst), 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    return ipv4_packet(src, dst, 6, tcp)


TCP_FLAGS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20}


def tcp_packet(src: str, dst: str, sport: int, dport: int, flags: str, seq: int = 1000,
               ack: int = 0) -> bytes:
    """A TCP segment with any flags, as letters: "" (none), "F", "FPU", "SF", "FA", ..."""
    bits = sum(TCP_FLAGS[f] for f in flags)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, bits, 8192, 0, 0)
    pseudo = struct.pack("!4s4sBBH", socket.inet_aton(src), socket.inet_aton(dst), 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    return ipv4_packet(src, dst, 6, tcp)


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes = b"kalki") -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return ipv4_packet(src, dst, 17, udp)


def send_raw(ns: str, packets: list[bytes]) -> None:
    """Sends hand-made IPv4 packets (any source address) from `ns`."""
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        for p in packets:
            dst = socket.inet_ntoa(p[16:20])
            s.sendto(p, (_lab_only(dst), 0))
    finally:
        s.close()


def wait_until(predicate, timeout: float = 3.0, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


@contextlib.contextmanager
def listening(ns: str, port: int):
    """A TCP port open on every address of `ns` (it accepts and closes), for as long as the block runs."""
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    try:
        yield s
    finally:
        s.close()


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@contextlib.contextmanager
def headless_chromium(capabilities: dict | None = None):
    """Headless Chromium through Selenium, with a profile of its own, removed afterwards (the
    browser tests' one way to start it)."""
    import shutil
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="kalki-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900"):
        opts.add_argument(arg)
    for name, value in (capabilities or {}).items():
        opts.set_capability(name, value)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
