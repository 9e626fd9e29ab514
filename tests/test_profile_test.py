"""`kalki profile test TYPE CAPTURE`: a capture's flows through the real XDP dispatcher, by
BPF_PROG_TEST_RUN in a throwaway namespace (appliance/dataplane/trial.py). The captures are
written here with dpkt; every address is in 198.18.0.0/15, and nothing is sent anywhere: a
test run only runs the program on a buffer. Root and bcc needed (lab)."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
from pathlib import Path

import dns.message
import dns.rrset
import dpkt
import pytest

from appliance import cli
from appliance.dataplane import bpf, capture, trial
from appliance.errors import ConfigError, DataplaneError

pytestmark = pytest.mark.lab

DEV_MAC, GW_MAC = "02:00:00:00:00:20", "02:00:00:00:00:01"
DEV, GW, CLOUD, OTHER = "198.18.0.20", "198.18.0.1", "198.19.64.10", "198.19.64.11"
BY_NAME = {"allowlist": {"destinations": ["cloud.example.com:443/tcp"]}}


def frame(src_mac, dst_mac, src, dst, l4, proto) -> bytes:
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst), p=proto, data=l4, ttl=64)
    return bytes(dpkt.ethernet.Ethernet(src=bytes.fromhex(src_mac.replace(":", "")),
                                        dst=bytes.fromhex(dst_mac.replace(":", "")),
                                        type=dpkt.ethernet.ETH_TYPE_IP, data=ip))


def syn(dst, port, sport=40000, flags=dpkt.tcp.TH_SYN) -> bytes:
    return frame(DEV_MAC, GW_MAC, DEV, dst, dpkt.tcp.TCP(sport=sport, dport=port, flags=flags), 6)


def udp(dst, port, data=b"hello", dst_mac=GW_MAC) -> bytes:
    return frame(DEV_MAC, dst_mac, DEV, dst, dpkt.udp.UDP(sport=50000, dport=port, data=data), 17)


def dns_answer(name, address, ttl=300) -> bytes:
    query = dns.message.make_query(name, "A")
    answer = dns.message.make_response(query)
    answer.answer.append(dns.rrset.from_text(name + ".", ttl, "IN", "A", address))
    return frame(GW_MAC, DEV_MAC, GW, DEV, dpkt.udp.UDP(sport=53, dport=50001, data=answer.to_wire()), 17)


def write_pcap(path: Path, frames, start=1_700_000_000.0, gap=0.01) -> Path:
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f)
        for i, item in enumerate(frames):
            ts, buf = item if isinstance(item, tuple) else (start + i * gap, item)
            w.writepkt(buf, ts)
    return path


def mixed() -> list[bytes]:
    """Discovery broadcasts, a SYN to the cloud before and after its name was answered, a SYN
    to an address nobody answered, a lookup, and the cloud's reply."""
    query = dns.message.make_query("cloud.example.com", "A").to_wire()
    return [udp("255.255.255.255", 6667, dst_mac="ff:ff:ff:ff:ff:ff"),
            syn(CLOUD, 443),
            udp(GW, 53, query),
            dns_answer("cloud.example.com", CLOUD),
            syn(CLOUD, 443, sport=40001),
            syn(OTHER, 443),
            frame(GW_MAC, DEV_MAC, CLOUD, DEV,
                  dpkt.tcp.TCP(sport=443, dport=40001, flags=dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK), 6),
            udp("255.255.255.255", 6667, dst_mac="ff:ff:ff:ff:ff:ff"),
            udp("255.255.255.255", 6667, dst_mac="ff:ff:ff:ff:ff:ff")]


def by_key(rows) -> dict:
    return {(r["direction"], r["proto"], r["peer"], r["port"]): r for r in rows}


def leftovers(suffix: str) -> list[str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out = [f"netns kalki-pt-{suffix}"] if f"kalki-pt-{suffix}" in netns else []
    return out + ([f"pins pt-{suffix}"] if os.path.exists(f"/sys/fs/bpf/kalki/pt-{suffix}") else [])


def our_namespaces() -> set[str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in netns.splitlines() if line.startswith("kalki-pt-")}


def test_the_dispatcher_decides_each_flow_and_dns_answers_open_names(tmp_path):
    packets = capture.read_packets(write_pcap(tmp_path / "mixed.pcap", mixed()))
    assert capture.device_mac(packets) == DEV_MAC
    assert trial.addresses(packets, DEV_MAC) == (DEV, GW, "198.18.0.0/24")
    suffix = "t" + os.urandom(2).hex()
    rows = trial.try_profile(BY_NAME, packets, DEV_MAC, instance_suffix=suffix)
    assert leftovers(suffix) == []
    flows = by_key(rows)
    assert [(r["direction"], r["proto"], r["peer"], r["port"]) for r in rows] == [
        ("from-device", "udp", "255.255.255.255", 6667), ("from-device", "tcp", CLOUD, 443),
        ("from-device", "udp", GW, 53), ("to-device", "udp", GW, 53),
        ("from-device", "tcp", OTHER, 443), ("to-device", "tcp", CLOUD, 443)]
    broadcast = flows[("from-device", "udp", "255.255.255.255", 6667)]
    assert (broadcast["packets"], broadcast["passed"], broadcast["reasons"]) == (3, 3, {"pass": 3})
    # Before the answer the address is closed; the answer opens it for the name's port.
    cloud = flows[("from-device", "tcp", CLOUD, 443)]
    assert (cloud["passed"], cloud["dropped"], cloud["first_verdict"]) == (1, 1, "dropped")
    assert cloud["reasons"] == {"allowlist": 1, "pass": 1}
    assert cloud["names"] == ["cloud.example.com"] and cloud["opening"] is None
    other = flows[("from-device", "tcp", OTHER, 443)]
    assert (other["dropped"], other["reasons"], other["names"]) == (1, {"allowlist": 1}, [])
    assert flows[("from-device", "udp", GW, 53)]["reasons"] == {"pass": 1}
    assert flows[("to-device", "tcp", CLOUD, 443)]["reasons"] == {"pass": 1}


def test_detectors_see_the_capture_s_pace_not_the_test_run_s(tmp_path):
    """30 destinations one second apart are no port scan (2 s window); 15 more within 15 ms
    are, and the scan's block then drops the device's own packets (drop set)."""
    start = 1_700_000_000.0
    frames = [(start + i, udp(f"198.19.65.{i + 1}", 9000)) for i in range(30)]
    frames += [(start + 40 + i * 0.001, udp(f"198.19.66.{i + 1}", 9000)) for i in range(15)]
    packets = capture.read_packets(write_pcap(tmp_path / "pace.pcap", frames))
    stack = {"port_scan": {"ports": 10, "window_ms": 2000, "block_seconds": 300}}
    rows = trial.try_profile(stack, packets, DEV_MAC)
    assert all(r["reasons"] == {"pass": 1} for r in rows[:30]), rows[:30]
    burst = [next(iter(r["reasons"])) for r in rows[30:]]
    assert burst[:9] == ["pass"] * 9 and "port_scan" in burst, burst
    assert burst[-1] == "drop_set" and rows[-1]["first_verdict"] == "dropped"


def test_a_tcp_flow_joined_after_its_syn_gets_a_syn_tried(tmp_path):
    ack = dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH
    frames = [syn(CLOUD, 8886, flags=ack), syn(CLOUD, 8886, flags=ack), syn(OTHER, 443, flags=ack)]
    packets = capture.read_packets(write_pcap(tmp_path / "joined.pcap", frames))
    rows = by_key(trial.try_profile({"allowlist": {"destinations": [f"{CLOUD}:8886/tcp"]}},
                                    packets, DEV_MAC, device_ip=DEV))
    allowed, denied = rows[("from-device", "tcp", CLOUD, 8886)], rows[("from-device", "tcp", OTHER, 443)]
    assert allowed["passed"] == 2 and allowed["opening"]["verdict"] == "passed"
    # the dispatcher passes the rest of a connection; its SYN would have been dropped
    assert denied["passed"] == 1
    assert (denied["opening"]["verdict"], denied["opening"]["reason"]) == ("dropped", "allowlist")


def config(tmp_path: Path, stack_toml: str) -> Path:
    """A configuration whose state directory holds one installed profile, `trialcloud`."""
    state = tmp_path / "state"
    (state / "profiles").mkdir(parents=True)
    (state / "profiles" / "trialcloud.toml").write_text(
        f'type = "trialcloud"\n\n[postures.normal]\n{stack_toml}\n')
    path = tmp_path / "kalki.toml"
    path.write_text(f'[state]\ndirectory = "{state}"\n')
    return path


def test_the_command_prints_a_table_or_json_and_exits_by_the_device_s_flows(tmp_path, capsys):
    cfg = config(tmp_path, 'allowlist = { destinations = ["cloud.example.com:443/tcp"] }')
    before = our_namespaces()
    query = dns.message.make_query("cloud.example.com", "A").to_wire()
    good = write_pcap(tmp_path / "good.pcap", [udp("255.255.255.255", 6667, dst_mac="ff:ff:ff:ff:ff:ff"),
                                               udp(GW, 53, query), dns_answer("cloud.example.com", CLOUD),
                                               syn(CLOUD, 443)])
    assert cli.main(["profile", "test", "trialcloud", str(good), "--config", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"trialcloud (normal) on {good}: device {DEV_MAC} at {DEV}, gateway {GW}")
    lines = [" ".join(line.split()) for line in out[1:]]
    assert "from-device udp 255.255.255.255:6667 1 packets passed" in lines
    assert f"from-device tcp {CLOUD}:443 1 packets passed [cloud.example.com]" in lines
    assert lines[-1] == "every flow from the device passed"

    bad = write_pcap(tmp_path / "mixed.pcap", mixed())
    assert cli.main(["profile", "test", "trialcloud", str(bad), "--config", str(cfg),
                     "--mac", DEV_MAC.upper()]) == 1
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert f"from-device tcp {OTHER}:443 1 packets DROPPED (allowlist 1)" in lines
    assert f"from-device tcp {CLOUD}:443 2 packets DROPPED (allowlist 1) [cloud.example.com]" in lines

    assert cli.main(["profile", "test", "trialcloud", str(bad), "--config", str(cfg), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and len(rows) == 6
    assert by_key(rows)[("from-device", "tcp", OTHER, 443)]["reasons"] == {"allowlist": 1}
    assert our_namespaces() == before


def test_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    cfg = config(tmp_path, "anti_spoof = {}")
    text = tmp_path / "notes.pcap"
    text.write_text("not a capture at all\n")
    assert cli.main(["profile", "test", "trialcloud", str(text), "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == f"kalki: {text}: not a pcap or pcapng capture"
    whole = write_pcap(tmp_path / "whole.pcap", mixed()).read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(whole[:-10])
    assert cli.main(["profile", "test", "trialcloud", str(cut), "--config", str(cfg)]) == 2
    assert f"{cut}: the capture is cut short after 8 packets" in capsys.readouterr().err
    assert cli.main(["profile", "test", "trialcloud", str(tmp_path / "gone.pcap"), "--config", str(cfg)]) == 2
    assert "gone.pcap" in capsys.readouterr().err
    assert cli.main(["profile", "test", "nosuchtype", str(cut), "--config", str(cfg)]) == 2
    assert "no such device type" in capsys.readouterr().err
    good = write_pcap(tmp_path / "good.pcap", mixed())
    assert cli.main(["profile", "test", "trialcloud", str(good), "--config", str(cfg),
                     "--mac", "02:00:00:00:00:99"]) == 2
    assert capsys.readouterr().err.strip() == f"kalki: {good}: no IPv4 packets from or to 02:00:00:00:00:99"
    with pytest.raises(ConfigError, match="no packets from 02:00:00:00:00:99"):
        capture.flows(capture.read_packets(write_pcap(tmp_path / "m.pcap", mixed())), "02:00:00:00:00:99",
                      DEV, source="m.pcap")


def test_pcapng_and_linux_cooked_captures_read_as_ethernet(tmp_path):
    frames = mixed()
    path = tmp_path / "mixed.pcapng"
    with open(path, "wb") as f:
        w = dpkt.pcapng.Writer(f)
        for i, buf in enumerate(frames):
            w.writepkt(buf, 1_700_000_000 + i)
    assert [p.frame for p in capture.read_packets(path)] == frames
    sll = tmp_path / "cooked.pcap"
    with open(sll, "wb") as f:
        w = dpkt.pcap.Writer(f, linktype=capture.DLT_LINUX_SLL)
        for i, buf in enumerate(frames):
            kind = 1 if buf[:6] == b"\xff" * 6 else 0
            w.writepkt(struct.pack("!HHH8s", kind, 1, 6, buf[6:12]) + buf[12:], 1_700_000_000 + i)
    cooked = capture.read_packets(sll)
    assert [p.frame[6:] for p in cooked] == [buf[6:] for buf in frames]     # sender, type, packet
    assert cooked[0].frame[:6] == b"\xff" * 6
    assert capture.device_mac(cooked) == DEV_MAC
    raw = tmp_path / "raw.pcap"
    with open(raw, "wb") as f:
        dpkt.pcap.Writer(f, linktype=101).writepkt(frames[1][14:], 1_700_000_000)
    with pytest.raises(ConfigError, match=f"{raw}: link type RAW"):
        capture.read_packets(raw)


def test_namespace_and_pins_are_removed_when_the_run_fails(tmp_path, monkeypatch):
    packets = capture.read_packets(write_pcap(tmp_path / "mixed.pcap", mixed()))

    def broken(prog_fd, packet, repeat):
        raise OSError(22, "BPF_PROG_TEST_RUN: Invalid argument")
    monkeypatch.setattr(bpf, "prog_test_run", broken)
    suffix = "f" + os.urandom(2).hex()
    with pytest.raises(DataplaneError, match="packet 1: "):
        trial.try_profile(BY_NAME, packets, DEV_MAC, instance_suffix=suffix)
    assert leftovers(suffix) == []
    with pytest.raises(ConfigError, match="not a destination"):    # refused after the load
        trial.try_profile({"allowlist": {"destinations": ["not a destination!"]}}, packets, DEV_MAC,
                          instance_suffix=suffix)
    assert leftovers(suffix) == []
