"""Dispatcher cost per packet, through BPF_PROG_TEST_RUN (no traffic, no attachment).

Cases, measured interleaved round by round so the noisy shared machine hits all alike:
  bare       a trivial XDP_PASS program (the test-run loop's own cost)
  from_1     xdp_from_devices, 1 device, every umbox on but quarantine, UDP to an allowed place
  from_1000  the same packet and device with 1,000 devices in the maps (separate pin dir)
  to_1       xdp_to_devices, a UDP packet from the uplink to the device
  part_*     breakdown: the from_1 packet from devices with fewer umboxes (no umbox; all but
             allowlist+egress_anomaly; all but rate_limit)
Targets: from_1 <= 100 ns/packet; from_1000 / from_1 <= 1.10.
"""
from __future__ import annotations

import os

import common
from common import bpf, dataplane, emit, maps, median

BENCH = "dispatcher"
REPEAT = int(os.environ.get("KALKI_BENCH_REPEAT", 1_000_000))
ROUNDS = int(os.environ.get("KALKI_BENCH_ROUNDS", 9))
DEVICES = 1000

DEV_MAC, DEV_IP = "02:42:aa:00:00:01", "198.18.0.10"
GW_DEV_MAC, GW_UP_MAC = "02:42:aa:ff:00:01", "02:42:aa:ff:00:02"
DST, DST_PORT = "198.19.8.1", 443           # in the allow-list (198.19.8.0/24, any)
REMOTE = "198.19.8.2"                       # a source on the uplink


def bare_xdp_pass():
    """A trivial XDP_PASS program, compiled with bcc in this process (fine for a benchmark)."""
    from bcc import BPF
    b = BPF(text=b"int bare_pass(struct xdp_md *ctx) { return XDP_PASS; }")
    fn = b.load_func(b"bare_pass", BPF.XDP)
    return b, fn.fd


def fill(path: common.PinnedPath, n: int, distinct_lists: bool = False) -> int:
    """n devices; the measured one gets id 1 and is placed among them. Devices of one type
    share one allow-list; with distinct_lists each device has its own (the worst case)."""
    stack = common.all_on_stack()
    path.add_device(1, dataplane.DeviceSpec("dev1", DEV_MAC, DEV_IP, stack))
    for i in range(1, n):
        mac, ip = common.fake_device(i)
        own = common.all_on_stack(list(common.ALLOWED) + [f"198.19.{16 + i // 256}.{i % 256}/32"]) \
            if distinct_lists else stack
        path.add_device(i + 1, dataplane.DeviceSpec(f"f{i}", mac, ip, own))
    return 1


def main() -> int:
    from_pkt = common.udp_frame(DEV_MAC, GW_DEV_MAC, DEV_IP, DST, 40000, DST_PORT)
    to_pkt = common.udp_frame(GW_UP_MAC, "02:42:aa:ff:00:03", REMOTE, DEV_IP, 443, 40000)
    with common.pinned_path("d1") as one, common.pinned_path("dk") as many, \
            common.pinned_path("dd") as distinct, common.pinned_path("db") as parts:
        fill(one, 1)
        fill(many, DEVICES)
        fill(distinct, DEVICES, distinct_lists=True)
        # Breakdown (not the headline): the same packet from devices with fewer umboxes on.
        no_lists = {k: v for k, v in common.all_on_stack().items()
                    if k not in ("allowlist", "egress_anomaly")}
        no_rate = {k: v for k, v in common.all_on_stack().items() if k != "rate_limit"}
        part_stacks = {"part_no_umbox": {}, "part_no_allow_egress": no_lists,
                       "part_no_rate_limit": no_rate}
        part_pkts = {}
        for i, (pname, stack) in enumerate(part_stacks.items()):
            mac = f"02:42:aa:00:01:{i + 1:02x}"
            ip = f"198.18.0.{20 + i}"
            parts.add_device(i + 1, dataplane.DeviceSpec(pname.replace("_", "-"), mac, ip, stack))
            part_pkts[pname] = common.udp_frame(mac, GW_DEV_MAC, ip, DST, 40000, DST_PORT)
        emit(BENCH, "entries_devices", len(list(many.maps["kalki_devices"].keys())), "count",
             case="from_1000")
        emit(BENCH, "entries_allow_prefixes", len(list(many.maps["kalki_allow"].keys())), "count",
             case="from_1000")
        emit(BENCH, "entries_allow_prefixes", len(list(distinct.maps["kalki_allow"].keys())),
             "count", case="from_1000_distinct_lists")
        bcc_obj, bare_fd = bare_xdp_pass()
        cases = {
            "bare": (bare_fd, from_pkt),
            "from_1": (one.prog_fds["xdp_from_devices"], from_pkt),
            "from_1000": (many.prog_fds["xdp_from_devices"], from_pkt),
            "from_1000_distinct_lists": (distinct.prog_fds["xdp_from_devices"], from_pkt),
            "to_1": (one.prog_fds["xdp_to_devices"], to_pkt),
            **{p: (parts.prog_fds["xdp_from_devices"], pkt) for p, pkt in part_pkts.items()},
        }
        # warm-up: creates the scan windows, fills caches; checks the verdicts
        verdicts = {}
        for name, (fd, pkt) in cases.items():
            verdicts[name] = bpf.prog_test_run(fd, pkt, 1000)[0]
        ns = {name: [] for name in cases}
        for _ in range(ROUNDS):
            for name, (fd, pkt) in cases.items():
                v, t = bpf.prog_test_run(fd, pkt, REPEAT)
                verdicts[name] = v
                ns[name].append(t)
        for name in cases:
            assert verdicts[name] == common.XDP_PASS, f"{name}: verdict {common.VERDICTS[verdicts[name]]}"
        # Counters prove the path ran to the PASS at its end, not a shortcut.
        passed_1 = one.counter(1, maps.Reason.PASS)
        passed_k = many.counter(1, maps.Reason.PASS)
        dropped_1 = sum(one.counter(1, r) for r in maps.Reason if r != maps.Reason.PASS)
        for name in cases:
            emit(BENCH, f"ns_per_packet_{name}", median(ns[name]), "ns", n=ROUNDS, repeat=REPEAT,
                 verdict=common.VERDICTS[verdicts[name]], min=min(ns[name]), max=max(ns[name]))
        for name in [n for n in cases if n != "bare"]:
            emit(BENCH, f"ns_per_packet_{name}_minus_bare",
                 median([a - b for a, b in zip(ns[name], ns["bare"])]), "ns", n=ROUNDS)
        ratios = [k / o for k, o in zip(ns["from_1000"], ns["from_1"])]
        emit(BENCH, "ratio_from_1000_over_1", round(median(ratios), 3), "ratio", n=ROUNDS,
             target="<= 1.10")
        ratios = [k / o for k, o in zip(ns["from_1000_distinct_lists"], ns["from_1"])]
        emit(BENCH, "ratio_from_1000_distinct_lists_over_1", round(median(ratios), 3), "ratio",
             n=ROUNDS)
        emit(BENCH, "target_all_umboxes_le_100ns", median(ns["from_1"]) <= 100, "bool",
             value_ns=median(ns["from_1"]))
        emit(BENCH, "pass_counter_device1", passed_1 + passed_k, "packets",
             non_pass_reasons_1=dropped_1)
        emit(BENCH, "compile_seconds_child", one.load_report.get("compile_seconds"), "s",
             peak_rss_mb=one.load_report.get("peak_rss_mb"))
        del bcc_obj
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
