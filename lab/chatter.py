"""What real devices do on a normal day, from lab devices, with real sockets.

Real devices (see tests/data/captures and ../shared/real-devices) look their cloud up by name
and connect with TLS, ask an NTP pool for the time, announce themselves by mDNS and SSDP, and
broadcast vendor discovery (Tuya's UDP 6667). Each lab device does the same, per simulated
minute: resolve its cloud (`cloud.<type>.example`, through the gateway, honouring the answer's
TTL like a real stub resolver), open TLS to it, send an NTP request every minute to the pool
(resolved every 10 minutes), and six times each an mDNS announcement, an SSDP NOTIFY and a
vendor broadcast. Simulated time: `seconds_per_minute` of real time per minute.

Lab addresses only: names resolve to the lab's internet host (198.19.64.0/18); broadcast and
link-local multicast stay on the device side.
"""
from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

from dnslib import QTYPE, RR, A, DNSRecord

from appliance import netns
from lab.topology import GATEWAY_LAN_IP, LabState

CLOUD_PORT = {"door_sensor": 8883, "motion_sensor": 8883}     # sensors speak MQTT over TLS
NTP_POOL = "pool.ntp.org"


def cloud_name(device_type: str) -> str:
    return f"cloud.{device_type.replace('_', '-')}.example"


@dataclass
class Day:
    """What one device did, by kind, and what failed."""
    device: str
    done: dict = field(default_factory=lambda: {"dns": 0, "tls": 0, "ntp": 0, "mdns": 0, "ssdp": 0,
                                                "broadcast": 0})
    failed: list = field(default_factory=list)


class _Device:
    def __init__(self, lab: LabState, name: str, device_type: str):
        self.ns = lab.device(name).namespace
        self.name, self.type = name, device_type
        self.cache: dict[str, tuple[str, float]] = {}
        self.day = Day(name)

    def _socket(self, kind: int) -> socket.socket:
        with netns.entered(self.ns):
            s = socket.socket(socket.AF_INET, kind)
        s.settimeout(2)
        return s

    def resolve(self, hostname: str, now: float) -> str | None:
        """The first address of `hostname`, from the cache while its TTL lasts (simulated)."""
        cached = self.cache.get(hostname)
        if cached and cached[1] > now:
            return cached[0]
        s = self._socket(socket.SOCK_DGRAM)
        try:
            s.sendto(DNSRecord.question(hostname).pack(), (GATEWAY_LAN_IP, 53))
            answer = DNSRecord.parse(s.recv(4096))
        except OSError as e:
            self.day.failed.append(f"dns {hostname}: {e}")
            return None
        finally:
            s.close()
        self.day.done["dns"] += 1
        records = [r for r in answer.rr if r.rtype == QTYPE.A]
        if not records:
            self.day.failed.append(f"dns {hostname}: no address")
            return None
        self.cache[hostname] = (str(records[0].rdata), now + records[0].ttl)
        return str(records[0].rdata)

    def cloud(self, now: float) -> None:
        address = self.resolve(cloud_name(self.type), now)
        if address is None:
            return
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE     # as many IoT devices do
        s = self._socket(socket.SOCK_STREAM)
        try:
            s.connect((address, CLOUD_PORT.get(self.type, 443)))
            with ctx.wrap_socket(s, server_hostname=cloud_name(self.type)) as tls:
                tls.sendall(b'{"state": "ok"}\n')
                tls.recv(64)
            self.day.done["tls"] += 1
        except OSError as e:
            self.day.failed.append(f"tls {address}: {e}")
        finally:
            s.close()

    def ntp(self, now: float) -> None:
        address = self.resolve(NTP_POOL, now)
        if address is None:
            return
        s = self._socket(socket.SOCK_DGRAM)
        try:
            s.sendto(b"\x1b" + 47 * b"\0", (address, 123))     # a client request, mode 3
            self.day.done["ntp"] += 1
        finally:
            s.close()

    def announce(self) -> None:
        s = self._socket(socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            mdns = DNSRecord()
            mdns.header.qr, mdns.header.aa = 1, 1
            mdns.add_answer(RR(f"{self.name}.local", QTYPE.A, rdata=A("198.18.0.1"), ttl=120))
            s.sendto(mdns.pack(), ("224.0.0.251", 5353))
            self.day.done["mdns"] += 1
            s.sendto(b"NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nNT: upnp:rootdevice\r\n"
                     b"NTS: ssdp:alive\r\n\r\n", ("239.255.255.250", 1900))
            self.day.done["ssdp"] += 1
            s.sendto(b'{"gwId":"kalki-lab","active":2}', ("255.255.255.255", 6667))
            self.day.done["broadcast"] += 1
        finally:
            s.close()


def run(lab: LabState, devices: dict[str, str], minutes: int = 60,
        seconds_per_minute: float = 1.0) -> dict[str, Day]:
    """{device: type} chatter for `minutes` simulated minutes, all devices at once."""
    chatty = [_Device(lab, name, t) for name, t in devices.items()]

    def one(d: _Device) -> None:
        start = time.monotonic()
        for minute in range(minutes):
            now = minute * 60.0          # simulated seconds: the DNS cache follows them
            d.cloud(now)
            d.ntp(now)
            for _ in range(6):
                d.announce()
            pause = start + (minute + 1) * seconds_per_minute - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    threads = [threading.Thread(target=one, args=(d,), daemon=True) for d in chatty]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {d.name: d.day for d in chatty}


FOREVER = 10 ** 9       # minutes: until `kalki lab down` stops the process


def start(lab: LabState, seconds_per_minute: float = 60.0) -> int:
    """Every device of the lab chatters in the background, in real time by default, until the
    lab goes down (its process group is the lab's, see topology.down). Returns the pid."""
    import subprocess
    import sys
    from pathlib import Path

    from lab import topology
    log = topology.state_path(lab.name).parent / "chatter.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lab.chatter", "--lab", lab.name,
                                 "--seconds-per-minute", str(seconds_per_minute)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]))
    lab.pids["chatter"] = proc.pid
    topology._save(lab)
    return proc.pid


def main(argv: list[str] | None = None) -> None:
    import argparse

    from lab import topology
    ap = argparse.ArgumentParser(prog="python -m lab.chatter", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", required=True)
    ap.add_argument("--seconds-per-minute", type=float, default=60.0)
    ap.add_argument("--minutes", type=int, default=FOREVER)
    args = ap.parse_args(argv)
    lab = topology.load(args.lab)
    devices = {d.name: d.type for d in lab.devices[:64] if not d.compromised}
    days = run(lab, devices, minutes=args.minutes, seconds_per_minute=args.seconds_per_minute)
    for name, day in days.items():
        print(name, day.done, flush=True)


if __name__ == "__main__":
    main()
