"""One UDP flood from the attacker namespace to a device, dropped three ways at the gateway's
uplink, side by side in one run (rounds interleaved):

  xdp      the XDP dispatcher on up0: the attacker's address in the kernel drop set
  netdev   XDP off on up0; table netdev kbench, chain ingress on up0: ip saddr ... drop
  forward  XDP off on up0; table inet kbench, forward hook (priority -10): ip saddr ... drop

For each: packets received-and-dropped per second (from the XDP / nft counters over a steady
window of the flood) and system-wide CPU per dropped packet (/proc/stat busy and softirq
time over the same window; the sender's own CPU is in "busy" too, the same in every case).
The sender is trafgen (netsniff-ng), one process, packet-mmap TX ring, on the attacker's eth0.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time

import common
from common import dataplane, emit, loader, median

BENCH = "drop"
ROUNDS = int(os.environ.get("KALKI_BENCH_ROUNDS", 3))
WINDOW = float(os.environ.get("KALKI_BENCH_WINDOW", 3.0))
WARMUP = 0.7
PAYLOAD = 18                      # 14 + 20 + 8 + 18 = 60-byte frames (64 on the wire with FCS)
CASES = ("xdp", "netdev", "forward")


def trafgen_config(dst_mac, src_mac, src, dst) -> str:
    return ("{\n"
            f"  eth(da={dst_mac}, sa={src_mac}, type=0x0800),\n"
            f"  ipv4(saddr={common.lab_only(src)}, daddr={common.lab_only(dst)}, ttl=64, id=1),\n"
            "  udp(sport=40000, dport=9),\n"
            f"  fill(0x41, {PAYLOAD}),\n"
            "}\n")


def nft(ns: str, script: str | None = None, args: list[str] | None = None) -> str:
    cmd = ["nft", *(args or ["-f", "-"])]
    p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *cmd], input=script,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"nft {' '.join(cmd)}: {p.stderr.strip()}")
    return p.stdout


def nft_rule_packets(ns: str, family: str) -> int:
    out = json.loads(nft(ns, args=["-j", "list", "table", family, "kbench"]))
    total = 0
    for item in out["nftables"]:
        for e in item.get("rule", {}).get("expr", []):
            if "counter" in e:
                total += e["counter"]["packets"]
    return total


def nft_table(ns: str, case: str, attacker: str) -> str:
    if case == "netdev":
        return ("table netdev kbench {\n chain ingress {\n  type filter hook ingress device \"up0\" "
                f"priority 0; policy accept;\n  ip saddr {attacker} counter drop\n }}\n}}\n")
    return ("table inet kbench {\n chain forward {\n  type filter hook forward priority -10; "
            f"policy accept;\n  ip saddr {attacker} counter drop\n }}\n}}\n")


def delete_kbench(ns: str) -> None:
    for family in ("netdev", "inet"):
        subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "nft", "delete", "table", family, "kbench"],
                       capture_output=True)


def proc_cpu_ns(pid: int) -> int:
    """utime + stime of pid and its descendants (trafgen forks its sender workers)."""
    total = 0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) * 1_000_000_000 // common.CLK_TCK
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(proc_cpu_ns(int(c)) for c in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total


def measure(case, lab, dp, device, trafgen_cmd) -> dict:
    gw = lab.namespaces["gw"]
    if case == "xdp":
        read = lambda: dp.counters(device).get("drop_set", {}).get("packets", 0)
    else:
        family = "netdev" if case == "netdev" else "inet"
        read = lambda: nft_rule_packets(gw, family)
    sender = common.ns_popen(lab.namespaces["atk"], trafgen_cmd, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(WARMUP)
        c0, s0, n0 = common.cpu_times(), proc_cpu_ns(sender.pid), common.net_rx_softirqs()
        p0, t0 = read(), time.monotonic()
        time.sleep(WINDOW)
        c1, s1, n1 = common.cpu_times(), proc_cpu_ns(sender.pid), common.net_rx_softirqs()
        p1, t1 = read(), time.monotonic()
        if sender.poll() is not None:
            raise RuntimeError(f"trafgen exited early with {sender.returncode}")
    finally:
        common.stop(sender, signal.SIGINT)
    dropped = p1 - p0
    if dropped <= 0:
        raise RuntimeError(f"{case}: nothing dropped in the window")
    return {"pps": dropped / (t1 - t0), "dropped": dropped,
            "busy_ns": (c1["busy"] - c0["busy"]) / dropped,
            "softirq_ns": (c1["softirq"] - c0["softirq"]) / dropped,
            "sender_ns": (s1 - s0) / dropped,
            "net_rx_per_pkt": (n1 - n0) / dropped,
            "steal_ns": (c1["steal"] - c0["steal"]) / dropped}


def main() -> int:
    results = {c: [] for c in CASES}
    with common.lab("dr", devices=1) as (lab, dp), tempfile.TemporaryDirectory() as tmp:
        gw, atk = lab.namespaces["gw"], lab.namespaces["atk"]
        dev = lab.devices[0]
        attacker = common.lab_only(lab.gateway["attacker_ip"])
        dp.apply(dataplane.DeviceSpec(dev.name, dev.mac, dev.ip, {"anti_spoof": {}, "lateral_block": {}}))
        dp.block_source(attacker, 0)
        cfg = os.path.join(tmp, "flood.cfg")
        with open(cfg, "w") as f:
            f.write(trafgen_config(common.link_mac(gw, "up0"), common.link_mac(atk, "eth0"),
                                   attacker, dev.ip))
        # -P 1: one sender process; --no-sock-mem: leave the sysctls for socket memory alone.
        trafgen_cmd = ["trafgen", "-i", cfg, "-o", "eth0", "-P", "1", "--no-sock-mem"]
        try:
            for _ in range(ROUNDS):
                for case in CASES:
                    if case == "xdp":
                        loader.run_child(dp.pin_dir, {"xdp_to_devices": "up0"}, gw, only_reattach=True)
                    else:
                        subprocess.run(["ip", "-n", gw, "link", "set", "dev", "up0", "xdp", "off"],
                                       check=True)
                        nft(gw, nft_table(gw, case, attacker))
                    try:
                        results[case].append(measure(case, lab, dp, dev.name, trafgen_cmd))
                    finally:
                        delete_kbench(gw)
        finally:
            delete_kbench(gw)
    med = {c: {k: median([r[k] for r in results[c]]) for k in results[c][0]} for c in CASES}
    for c in CASES:
        m = med[c]
        emit(BENCH, f"pps_{c}", round(m["pps"]), "packets/s", n=ROUNDS, window_s=WINDOW)
        emit(BENCH, f"cpu_ns_per_packet_{c}", round(m["busy_ns"], 1), "ns", n=ROUNDS,
             softirq_ns=round(m["softirq_ns"], 1), sender_process_ns=round(m["sender_ns"], 1),
             steal_ns=round(m["steal_ns"], 1), net_rx_softirqs_per_packet=round(m["net_rx_per_pkt"], 3),
             what="system-wide busy CPU (user+system+irq+softirq, sender included) per dropped packet")
    for other in ("netdev", "forward"):
        emit(BENCH, f"ratio_pps_xdp_over_{other}",
             round(median([a["pps"] / b["pps"] for a, b in zip(results["xdp"], results[other])]), 3),
             "ratio", n=ROUNDS)
        emit(BENCH, f"ratio_cpu_xdp_over_{other}",
             round(median([a["busy_ns"] / b["busy_ns"] for a, b in zip(results["xdp"], results[other])]), 3),
             "ratio", n=ROUNDS, what="CPU per dropped packet, XDP / nft (below 1: XDP cheaper)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
