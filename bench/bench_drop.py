"""One UDP flood from the attacker namespace to a device, dropped three ways at the gateway's
uplink by the same per-device policy, side by side in one run (rounds interleaved):

  xdp      the XDP dispatcher on up0 (xdp_to_devices): the device looked up by its address,
           the attacker's address in the kernel drop set, the per-device drop_set counter
  netdev   XDP off on up0; table netdev kbench, ingress on up0, the same policy in nftables:
           `ip daddr vmap @dev_by_ip` -> the device's chain: `ip saddr @drop_set counter drop`,
           then `counter accept` (the pass counter)
  forward  XDP off on up0; table inet kbench, forward hook (priority -10): the same chains

The CPU the flood costs, measured on one CPU. The sender (trafgen -P 1: one worker, packet-mmap
TX ring) pins its worker to one CPU itself (CPU 0); this process finds that CPU (the affinity of
trafgen's busiest task, which must be a single CPU) and moves itself, and the nft and ip it
runs, to the others. On veth, every step of the flood's receive side runs on the CPU that transmitted it (a
veth transmit queues to its peer on that CPU and raises NET_RX there: the bridge, up0, XDP or
nftables all run in that CPU's softirq), so everything the flood costs is the runtime of the
sender's tasks, which runs the softirqs raised in its context, plus that CPU's ksoftirqd:
  cpu_ns_per_packet   (sender's runtime + ksoftirqd/<cpu>'s) / packets dropped, both from the
                      scheduler's exact sum_exec_runtime (/proc/<pid>/task/*/schedstat), not
                      ticks: this kernel has no IRQ_TIME_ACCOUNTING, so softirq time spent in a
                      task's context is in its runtime
  cpu_stat_ns_per_packet  cross-check: that CPU's busy time from /proc/stat (tick-sampled,
                      HZ=250), other processes that ran there included
  pps                 packets dropped per second (the XDP counter / the nft drop rule's counter)
  xdp_prog_ns_per_packet  the dispatcher's own run time per packet (bpf_prog_info.run_time_ns /
                      run_cnt), in a second window with BPF run-time stats on (BPF_ENABLE_STATS;
                      they add two clock reads per run, so the main window runs without)
The sender is saturated, so cpu_ns_per_packet is close to 1 CPU / pps: it is what sending
and dropping one packet costs together; the sending part is the same in every case.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time

import common
from common import bpf, dataplane, emit, loader, median

BENCH = "drop"
ROUNDS = int(os.environ.get("KALKI_BENCH_ROUNDS", 3))
WINDOW = float(os.environ.get("KALKI_BENCH_WINDOW", 3.0))
ALL_CPUS = os.sched_getaffinity(0)
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


def nft_dropped(ns: str, family: str) -> int:
    """Packets counted by the table's drop rules."""
    out = json.loads(nft(ns, args=["-j", "list", "table", family, "kbench"]))
    total = 0
    for item in out["nftables"]:
        exprs = item.get("rule", {}).get("expr", [])
        if any("drop" in e for e in exprs):
            total += sum(e["counter"]["packets"] for e in exprs if "counter" in e)
    return total


def nft_table(case: str, attacker: str, devices: list[tuple[int, str]]) -> str:
    """The dispatcher's to-devices policy for this flood, in nftables: the device by its
    address, then the drop set, each device with its own counters."""
    family, hook = (("netdev", 'type filter hook ingress device "up0" priority 0;')
                    if case == "netdev" else ("inet", "type filter hook forward priority -10;"))
    chains = "".join(f" chain dev_{i} {{\n  ip saddr @drop_set counter drop\n  counter accept\n }}\n"
                     for i, _ in devices)
    elements = ", ".join(f"{common.lab_only(ip)} : jump dev_{i}" for i, ip in devices)
    source = common.lab_only(attacker)
    return (f"table {family} kbench {{\n"
            f" set drop_set {{\n  type ipv4_addr; flags timeout;\n  elements = {{ {source} }}\n }}\n"
            f"{chains}"
            f" map dev_by_ip {{\n  type ipv4_addr : verdict;\n  elements = {{ {elements} }}\n }}\n"
            f" chain hook_{case} {{\n  {hook} policy accept;\n  ip daddr vmap @dev_by_ip\n }}\n}}\n")


def delete_kbench(ns: str) -> None:
    for family in ("netdev", "inet"):
        subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "nft", "delete", "table", family, "kbench"],
                       capture_output=True)


def tx_packets(ns: str, ifname: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", ifname], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)[0]["stats64"]["tx"]["packets"]


def flood_cpu(sender) -> int:
    """The one CPU trafgen's sending task is pinned to (trafgen pins worker i to CPU i): the
    task that has run the most."""
    busiest = max(common.tasks(sender.pid), key=lambda t: t[1])
    cpus = os.sched_getaffinity(busiest[0])
    if len(cpus) != 1:
        raise RuntimeError(f"trafgen's sending task {busiest[0]} may run on CPUs {sorted(cpus)}")
    return next(iter(cpus))


def measure(case, lab, dp, device, trafgen_cmd, prog_fd) -> dict:
    gw, atk = lab.namespaces["gw"], lab.namespaces["atk"]
    if case == "xdp":
        read = lambda: dp.counters(device).get("drop_set", {}).get("packets", 0)
    else:
        family = "netdev" if case == "netdev" else "inet"
        read = lambda: nft_dropped(gw, family)
    sender = common.ns_popen(atk, trafgen_cmd, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(WARMUP)
        cpu = flood_cpu(sender)
        soft = common.ksoftirqd_pid(cpu)
        away = ALL_CPUS - {cpu}
        if not away:
            raise RuntimeError(f"the flood runs on CPU {cpu}, and there is no other")
        os.sched_setaffinity(0, away)     # this process (and the nft/ip it runs) off the flood's CPU

        def snap():
            return (common.task_runtime_ns(sender.pid), common.task_runtime_ns(soft), common.cpu_times(cpu),
                    read(), tx_packets(atk, "eth0"), time.monotonic())
        r0, k0, c0, p0, x0, t0 = snap()
        time.sleep(WINDOW)
        r1, k1, c1, p1, x1, t1 = snap()
        prog = None
        if case == "xdp":      # the dispatcher's own time, in a window of its own
            stats_fd = common.enable_bpf_stats()
            try:
                ns0, n0 = common.prog_run_stats(prog_fd)
                time.sleep(WINDOW / 2)
                ns1, n1 = common.prog_run_stats(prog_fd)
            finally:
                os.close(stats_fd)
            prog = (ns1 - ns0) / max(1, n1 - n0)
        if sender.poll() is not None:
            raise RuntimeError(f"trafgen exited early with {sender.returncode}")
    finally:
        common.stop(sender, signal.SIGINT)
    dropped = p1 - p0
    if dropped <= 0:
        raise RuntimeError(f"{case}: nothing dropped in the window")
    return {"pps": dropped / (t1 - t0), "dropped": dropped, "sent": x1 - x0, "cpu": cpu,
            "cpu_ns": (r1 - r0 + k1 - k0) / dropped,
            "sender_ns": (r1 - r0) / dropped, "ksoftirqd_ns": (k1 - k0) / dropped,
            "stat_ns": (c1["busy"] - c0["busy"]) / dropped,
            "stat_softirq_share": (c1["softirq"] - c0["softirq"]) / max(1, c1["busy"] - c0["busy"]),
            "stat_steal_ns": (c1["steal"] - c0["steal"]) / dropped,
            "window_cpu_share": (r1 - r0 + k1 - k0) / ((t1 - t0) * 1e9),
            "prog_ns": prog}


def main() -> int:
    results: dict[str, list[dict]] = {c: [] for c in CASES}
    loads = common.Loads()
    if len(ALL_CPUS) < 2:
        raise SystemExit(f"needs two CPUs, one for the flood and one for this process: {sorted(ALL_CPUS)}")
    with common.lab("dr", devices=1) as (lab, dp), tempfile.TemporaryDirectory() as tmp:
        gw, atk = lab.namespaces["gw"], lab.namespaces["atk"]
        dev = lab.devices[0]
        attacker = common.lab_only(lab.gateway["attacker_ip"])
        dp.apply(dataplane.DeviceSpec(dev.name, dev.mac, dev.ip, {"anti_spoof": {}, "lateral_block": {}}))
        dp.block_source(attacker, 0)
        devices = [(dp.device_id(dev.name), dev.ip)]
        cfg = os.path.join(tmp, "flood.cfg")
        with open(cfg, "w") as f:
            f.write(trafgen_config(common.link_mac(gw, "up0"), common.link_mac(atk, "eth0"),
                                   attacker, dev.ip))
        # -P 1: one sender process; --no-sock-mem: leave the sysctls for socket memory alone.
        trafgen_cmd = ["trafgen", "-i", cfg, "-o", "eth0", "-P", "1", "--no-sock-mem"]
        prog_fd = bpf.obj_get(f"{dp.pin_dir}/xdp_to_devices")
        try:
            for _ in range(ROUNDS):
                for case in CASES:
                    if case == "xdp":
                        loader.run_child(dp.pin_dir, {"xdp_to_devices": "up0"}, gw, only_reattach=True)
                    else:
                        subprocess.run(["ip", "-n", gw, "link", "set", "dev", "up0", "xdp", "off"],
                                       check=True)
                        nft(gw, nft_table(case, attacker, devices))
                    try:
                        results[case].append(measure(case, lab, dp, dev.name, trafgen_cmd, prog_fd))
                    finally:
                        delete_kbench(gw)
                    loads.sample()
        finally:
            os.sched_setaffinity(0, ALL_CPUS)
            os.close(prog_fd)
            delete_kbench(gw)
    load = loads.kw()
    keys = [k for k in results["xdp"][0] if k not in ("cpu", "prog_ns")]
    med = {c: {k: median([r[k] for r in results[c]]) for k in keys} for c in CASES}
    cpu = results["xdp"][0]["cpu"]
    for c in CASES:
        m = med[c]
        emit(BENCH, f"pps_{c}", round(m["pps"]), "packets/s", n=ROUNDS, window_s=WINDOW,
             sent_per_s=round(m["sent"] / WINDOW), **load)
        emit(BENCH, f"cpu_ns_per_packet_{c}", round(m["cpu_ns"], 1), "ns", n=ROUNDS, flood_cpu=cpu,
             sender_ns=round(m["sender_ns"], 1), ksoftirqd_ns=round(m["ksoftirqd_ns"], 1),
             cpu_share=round(m["window_cpu_share"], 3),
             what="exact runtime of the sender's tasks + ksoftirqd on the flood's CPU, per dropped packet",
             **load)
        emit(BENCH, f"cpu_stat_ns_per_packet_{c}", round(m["stat_ns"], 1), "ns", n=ROUNDS, flood_cpu=cpu,
             softirq_share=round(m["stat_softirq_share"], 3), steal_ns=round(m["stat_steal_ns"], 1),
             what="the flood CPU's busy time in /proc/stat (tick-sampled) per dropped packet", **load)
    prog = [r["prog_ns"] for r in results["xdp"] if r["prog_ns"] is not None]
    if prog:
        emit(BENCH, "xdp_prog_ns_per_packet", round(median(prog), 1), "ns", n=len(prog),
             what="xdp_to_devices' run_time_ns / run_cnt (BPF_ENABLE_STATS, its own window)", **load)
    for other in ("netdev", "forward"):
        pairs = list(zip(results["xdp"], results[other]))
        emit(BENCH, f"ratio_pps_xdp_over_{other}", round(median([a["pps"] / b["pps"] for a, b in pairs]), 3),
             "ratio", n=ROUNDS, **load)
        emit(BENCH, f"ratio_cpu_xdp_over_{other}",
             round(median([a["cpu_ns"] / b["cpu_ns"] for a, b in pairs]), 3), "ratio", n=ROUNDS,
             what="CPU per dropped packet, XDP / nft with the same per-device policy (below 1: XDP cheaper)",
             **load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
