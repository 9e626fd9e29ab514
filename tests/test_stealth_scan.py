"""Stealth scans in XDP: TCP flags no connection sends (NULL, FIN, XMAS, FIN+URG, SYN+FIN,
SYN+RST) are dropped and reported as `stealth_scan` by the port_scan umbox, towards a device and
from it, and count in the port-scan window; FIN+ACK (Maimon) only as part of a scan. Crafted
packets first, then nmap's -sX, -sN, -sF and -sM from the attacker and from a device."""
import shutil
import subprocess
import time

import pytest
from labutil import http, send_raw, tcp_packet, wait_until

from appliance.telemetry.kernel import alert_kind
from lab.topology import ATTACKER_IP, INET_IP

pytestmark = pytest.mark.lab

BASE = {"anti_spoof": {}}
# name -> flags, as labutil.tcp_packet spells them
SIGNATURES = {"null": "", "fin": "F", "xmas": "FPU", "fin-urg": "FU", "fin-psh": "FP",
              "syn-fin": "SF", "syn-rst": "SR", "syn-fin-ack": "SFA"}
NMAP = shutil.which("nmap")
needs_nmap = pytest.mark.skipif(NMAP is None, reason="nmap is not installed (scripts/setup.sh installs it)")


def collect(dp, seconds=0.6):
    """Every event the ring holds now and for `seconds` more."""
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out += dp.events(timeout=0.1)
    return out


def packets(dp, name, reason):
    return dp.counters(name).get(reason, {}).get("packets", 0)


# The scans' own window: one second, so each test's scan starts with an empty one.
SCAN = {"port_scan": {"ports": 10, "window_ms": 1000, "block_seconds": 60}}


def grown(dp, before, name="camera1"):
    """{reason: packets} the device's counters grew by since `before` (pass left out)."""
    after = dp.counters(name)
    return {r: c["packets"] - before.get(r, {}).get("packets", 0) for r, c in after.items()
            if r != "pass" and c["packets"] > before.get(r, {}).get("packets", 0)}


def nmap(ns, scan, target, ports="1-200"):
    """nmap from namespace `ns`. -Pn: every port is probed, whatever host discovery finds;
    --min-rate and one retry: about 2 s a scan instead of 20 (every probe goes unanswered)."""
    assert target.startswith("198.1"), target          # lab addresses only (198.18.0.0/15)
    proc = subprocess.run(["ip", "netns", "exec", ns, NMAP, scan, "-Pn", "-n", "-T4", "--max-retries", "1",
                           "--min-rate", "1000", "-p", ports, target],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_each_signature_towards_a_device_is_dropped_and_reported(lab, fresh):
    cam = lab.device("camera1")
    fresh.set_stack("camera1", {**BASE, "port_scan": {"ports": 50, "window_ms": 5000}})
    src = "198.19.0.71"     # a source of its own: no other test's scan window
    for i, (name, flags) in enumerate(SIGNATURES.items()):
        before = packets(fresh, "camera1", "stealth_scan")
        send_raw(lab.namespaces["atk"], [tcp_packet(src, cam.ip, 45000, 3000 + i, flags)])
        assert wait_until(lambda: packets(fresh, "camera1", "stealth_scan") == before + 1), name
        events = collect(fresh, 0.3)
        assert [(e["reason"], e["action"], e["dst_port"], e["src"], e["dst"], e["device"], e["umbox"])
                for e in events] == [("stealth_scan", "dropped", 3000 + i, src, cam.ip, "camera1",
                                      "port_scan")], name
        assert alert_kind(events[0], cam.ip) == "stealth-scan"
    assert packets(fresh, "camera1", "port_scan") == 0 and fresh.drop_set() == []


def test_signatures_count_in_the_port_scan_window(lab, fresh):
    cam = lab.device("camera1")
    fresh.set_stack("camera1", {**BASE, "port_scan": {"ports": 5, "window_ms": 5000, "block_seconds": 60}})
    src = "198.19.0.72"
    before = packets(fresh, "camera1", "drop_set")
    send_raw(lab.namespaces["atk"], [tcp_packet(src, cam.ip, 45000, port, "FPU") for port in range(1, 21)])
    assert wait_until(lambda: src in [e["source"] for e in fresh.drop_set()])
    events = collect(fresh)
    scans = [e for e in events if e["reason"] == "port_scan"]
    assert [(e["action"], e["count"], e["src"]) for e in scans] == [("blocked", 6, src)]
    assert len([e for e in events if e["reason"] == "stealth_scan"]) == 6
    # the other 14: the source is blocked
    assert wait_until(lambda: packets(fresh, "camera1", "drop_set") == before + 14)


def test_fin_ack_alone_passes_and_counts_only_as_part_of_a_scan(lab, fresh):
    """Maimon's probe is FIN+ACK, which is also how a connection closes: one passes unreported
    (nftables drops it if it closes nothing); past `ports` distinct ports they are a scan."""
    cam = lab.device("camera1")
    fresh.set_stack("camera1", {**BASE, "port_scan": {"ports": 5, "window_ms": 5000}})
    src = "198.19.0.73"
    atk = lab.namespaces["atk"]
    before = packets(fresh, "camera1", "stealth_scan")
    send_raw(atk, [tcp_packet(src, cam.ip, 45000, 4000, "FA", ack=1)])
    time.sleep(0.2)
    assert collect(fresh, 0.3) == []
    assert packets(fresh, "camera1", "stealth_scan") == before
    send_raw(atk, [tcp_packet(src, cam.ip, 45000, port, "FA", ack=1) for port in range(4001, 4011)])
    # the 6th distinct port onwards (4005 to 4010) is a scan: dropped, and reported both ways
    assert wait_until(lambda: packets(fresh, "camera1", "stealth_scan") == before + 6)
    events = collect(fresh)
    stealth = [e for e in events if e["reason"] == "stealth_scan"]
    assert [e["dst_port"] for e in stealth] == list(range(4005, 4011))
    assert all(e["action"] == "dropped" and e["src"] == src for e in stealth)
    assert [e["count"] for e in events if e["reason"] == "port_scan"] == [6, 7, 8, 9, 10, 11]
    assert fresh.drop_set() == []                               # report only


def test_connections_and_their_closes_raise_nothing(lab, fresh):
    """Full connections, each closed with FIN+ACK both ways, to the camera's web page and from the
    camera to the internet: the server's FIN+ACK goes to a new client port every time, and must
    not count as a scan (a threshold of 3 would see 8 otherwise)."""
    cam = lab.device("camera1")
    fresh.set_stack("camera1", {**BASE, "port_scan": {"ports": 3, "window_ms": 10000, "block_seconds": 60}})
    before = fresh.counters("camera1")
    for _ in range(8):
        assert http(lab.namespaces["atk"], cam.ip) is not None
        assert http(cam.namespace, INET_IP) is not None
    time.sleep(0.3)
    after = fresh.counters("camera1")
    for reason in ("stealth_scan", "port_scan", "drop_set"):
        assert after.get(reason, {}).get("packets", 0) == before.get(reason, {}).get("packets", 0), reason
    assert [e for e in collect(fresh, 0.3) if e["device"] == "camera1"] == []
    assert fresh.drop_set() == []


@needs_nmap
@pytest.mark.parametrize("scan", ["-sX", "-sN", "-sF", "-sM"])
def test_nmap_from_the_attacker(lab, fresh, scan):
    cam = lab.device("camera1")
    fresh.set_stack("camera1", {**BASE, **SCAN})
    time.sleep(1.1)                 # the last test's window is over
    before = fresh.counters("camera1")
    nmap(lab.namespaces["atk"], scan, cam.ip)
    events = collect(fresh)
    stealth = [e for e in events if e["reason"] == "stealth_scan"]
    blocked = [e for e in events if e["reason"] == "port_scan"]
    print(f"nmap {scan} towards camera1: {len(stealth)} stealth_scan events, port_scan events "
          f"{[(e['action'], e['count']) for e in blocked]}, packets {grown(fresh, before)}")
    assert stealth and all(e["src"] == ATTACKER_IP and e["device"] == "camera1" and
                           e["action"] == "dropped" and 1 <= e["dst_port"] <= 200 for e in stealth)
    assert {alert_kind(e, cam.ip) for e in stealth} == {"stealth-scan"}
    # 11 distinct ports block the attacker. Each probe up to then is reported; Maimon's FIN+ACKs
    # only from the one that made the window a scan.
    assert [(e["action"], e["src"], e["count"]) for e in blocked] == [("blocked", ATTACKER_IP, 11)]
    assert (len(stealth) == 1) if scan == "-sM" else (len(stealth) >= 11), len(stealth)
    assert [e["source"] for e in fresh.drop_set()] == [ATTACKER_IP]
    assert http(lab.namespaces["inet"], cam.ip) is not None       # others still reach it


@needs_nmap
@pytest.mark.parametrize("target", ["plug1", "inet"])
def test_nmap_from_a_compromised_device(lab, fresh, target):
    cam = lab.device("camera1")
    dst = INET_IP if target == "inet" else lab.device(target).ip
    fresh.set_stack("camera1", {**BASE, **SCAN})
    time.sleep(1.1)                 # the last test's window is over
    before = fresh.counters("camera1")
    nmap(cam.namespace, "-sX", dst)
    events = collect(fresh)
    stealth = [e for e in events if e["reason"] == "stealth_scan"]
    print(f"nmap -sX from camera1 towards {target}: {len(stealth)} stealth_scan events, port_scan events "
          f"{[(e['action'], e['count']) for e in events if e['reason'] == 'port_scan']}, "
          f"packets {grown(fresh, before)}")
    assert stealth and all(e["device"] == "camera1" and e["src"] == cam.ip and e["dst"] == dst
                           for e in stealth)
    assert {alert_kind(e, cam.ip) for e in stealth} == {"port-scan-outbound"}
    assert len(stealth) >= 11
    assert cam.ip in [e["source"] for e in fresh.drop_set()]

