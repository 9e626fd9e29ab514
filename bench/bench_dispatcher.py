"""Dispatcher cost per packet on each of its named paths, through BPF_PROG_TEST_RUN (no
traffic, no attachment).

The paths (packets, devices, expected verdict and reason) are bench/dispatcher_paths.py's
table, which tests/test_dispatcher_paths.py also runs to prove each takes the branch it names:
  syn_login             TCP SYN from the uplink to a login port: syn_flood, brute_force, port_scan
  syn_login_no_stealth  the same, dispatcher compiled with -DKALKI_NO_STEALTH_SCAN
  established           TCP ACK from the device
  udp                   UDP from the device to an allowed destination (was from_1)
  allowlist_miss        UDP from the device to a destination outside its list: DROP, allowlist
  spoofed               UDP from the device's MAC with another source address: DROP, spoof
  drop_set              TCP SYN from a source in kalki_drop_set: DROP, drop_set
  varied_dst            UDP to 16 destinations in turn, one test run each (every packet misses
                        port_scan's last-flow cache; dispatcher_paths says why it cannot be done
                        with repeats), against udp_run1 and bare_run1 measured the same way
  syn_new_source        syn_login's SYN from 131,070 sources in turn, one test run each: every
                        packet from a source the detectors do not hold (an attack from many
                        sources), against syn_login_run1, syn_login measured the same way
  udp_1000_distinct     udp, device 1 among 1,000 devices each with its own allow-list
  to_1                  UDP from the uplink to the device
  bare, bare_run1       a trivial XDP_PASS program: the test run's own cost
  xdp_filter_syn, xdp_filter_udp
                        the peer: xdp-tools' xdp-filter, every feature on, on syn_login's and
                        udp's packets (both pass its deny lists, so every lookup is made);
                        xdp_filter_syn_new_source on syn_new_source's packets, as it is run
Cases run interleaved round by round, so the noisy shared machine hits all alike; each figure
is the median over rounds, each ratio the median of per-round ratios. After every run the
verdict is checked and device 1's per-reason counters must have grown by exactly the packets
run, under the case's reason and no other. The load average is beside each figure.
Targets: udp and established <= 3x bare; udp_1000_distinct <= 1.1x udp; syn_login <= 1x
xdp_filter_syn.
"""
from __future__ import annotations

import os

import common
import dispatcher_paths as paths
from common import bpf, emit, median

BENCH = "dispatcher"
REPEAT = int(os.environ.get("KALKI_BENCH_REPEAT", 1_000_000))
ROUNDS = int(os.environ.get("KALKI_BENCH_ROUNDS", 9))
RUNS = int(os.environ.get("KALKI_BENCH_RUNS", 20_000))    # test runs of repeat 1, per round
WARM = 1000


def bare_xdp_pass():
    """A trivial XDP_PASS program, compiled with bcc in this process (fine for a benchmark)."""
    from bcc import BPF
    b = BPF(text=b"int bare_pass(struct xdp_md *ctx) { return XDP_PASS; }")
    fn = b.load_func(b"bare_pass", BPF.XDP)
    return b, fn.fd


def main() -> int:
    table = {c.name: c for c in paths.cases()}
    with common.pinned_path("d1") as one, common.pinned_path("dd") as distinct, \
            common.pinned_path("dn", defines=paths.PIN_DIRS["no_stealth"]) as no_stealth, \
            common.xdp_filter_peer() as (peer_fd, peer_name):
        pins = {"one": one, "distinct": distinct, "no_stealth": no_stealth}
        assert set(pins) == set(paths.PIN_DIRS)
        for name, path in pins.items():
            paths.prepare(name, path)
        emit(BENCH, "entries_devices", len(list(distinct.maps["kalki_devices"].keys())), "count",
             case="udp_1000_distinct")
        emit(BENCH, "entries_allow_lists", len(list(distinct.maps["kalki_allow_list_ids"].items())),
             "count", case="udp_1000_distinct")
        bcc_obj, bare_fd = bare_xdp_pass()
        bare_pkt = table["udp"].packets[0]
        counted = {n: 0 for n in table}
        peer_packets = {"xdp_filter_syn": table["syn_login"].packets[0],
                        "xdp_filter_udp": table["udp"].packets[0]}
        peer_per_run = {"xdp_filter_syn_new_source": table["syn_new_source"]}
        if peer_fd is None:
            emit(BENCH, "peer_xdp_filter", None, "skipped", why=peer_name)
            peer_packets, peer_per_run = {}, {}

        def measure(name: str, n: int) -> float:
            if name == "bare":
                return float(bpf.prog_test_run(bare_fd, bare_pkt, n)[1])
            if name == "bare_run1":
                return sum(bpf.prog_test_run(bare_fd, bare_pkt, 1)[1] for _ in range(n)) / n
            if name in peer_packets:
                verdict, took = bpf.prog_test_run(peer_fd, peer_packets[name], n)
                assert verdict == common.XDP_PASS, f"{peer_name} gave {verdict} on {name}"
                return float(took)
            if name in peer_per_run:
                verdicts, per_packet = paths.run_fd(peer_fd, name, peer_per_run[name].packets, n)
                assert verdicts == {common.XDP_PASS}, f"{peer_name} gave {verdicts} on {name}"
                return per_packet
            case = table[name]
            path = pins[case.pin_dir]
            before = paths.counts(path)
            verdicts, ns = paths.run(path, case, n)
            paths.check(case, verdicts, before, paths.counts(path), n)
            counted[name] += n
            return ns

        names = ["bare", "bare_run1", *table, *peer_packets, *peer_per_run]
        per_run = {n: n == "bare_run1" or n in peer_per_run or (n in table and table[n].per_run)
                   for n in names}
        size = {n: RUNS if per_run[n] else REPEAT for n in names}
        for name in names:      # warm-up: scan windows made, caches filled, paths checked
            measure(name, min(WARM, size[name]))
        ns: dict[str, list[float]] = {n: [] for n in names}
        loads = []
        for _ in range(ROUNDS):
            for name in names:
                ns[name].append(measure(name, size[name]))
            loads.append(os.getloadavg()[0])
        load = {"load1": round(median(loads), 2), "load1_max": round(max(loads), 2)}

        for name in names:
            case = table.get(name)
            extra = {"verdict": common.VERDICTS[case.verdict], "reason": case.reason.name.lower(),
                     "counted": counted[name], "method": case.method} if case else \
                {"peer": peer_name} if name in peer_packets or name in peer_per_run else {}
            per = "runs" if per_run[name] else "repeat"
            emit(BENCH, f"ns_per_packet_{name}", round(median(ns[name]), 1), "ns", n=ROUNDS,
                 **{per: size[name]}, min=round(min(ns[name]), 1), max=round(max(ns[name]), 1),
                 **extra, **load)
        for name in names:
            if name in ("bare", "bare_run1", *peer_packets, *peer_per_run):
                continue
            base = "bare_run1" if per_run[name] else "bare"
            emit(BENCH, f"ns_per_packet_{name}_minus_{base}",
                 round(median([a - b for a, b in zip(ns[name], ns[base])]), 1), "ns", n=ROUNDS,
                 **load)

        def ratio(metric: str, top: str, bottom: str, target: float | None = None) -> None:
            r = round(median([a / b for a, b in zip(ns[top], ns[bottom])]), 3)
            kw = {"target": f"<= {target}", "met": r <= target} if target is not None else {}
            emit(BENCH, metric, r, "ratio", n=ROUNDS, of=f"{top}/{bottom}", **kw, **load)

        ratio("ratio_syn_login_over_bare", "syn_login", "bare")
        ratio("ratio_udp_over_bare", "udp", "bare", 3.0)
        ratio("ratio_established_over_bare", "established", "bare", 3.0)
        ratio("ratio_stealth_on_over_off", "syn_login", "syn_login_no_stealth")
        ratio("ratio_distinct_1000_over_1", "udp_1000_distinct", "udp", 1.1)
        ratio("ratio_varied_dst_over_udp_run1", "varied_dst", "udp_run1")
        ratio("ratio_syn_new_source_over_syn_login_run1", "syn_new_source", "syn_login_run1")
        if peer_packets:
            ratio("ratio_syn_login_over_xdp_filter", "syn_login", "xdp_filter_syn", 1.0)
            ratio("ratio_udp_over_xdp_filter", "udp", "xdp_filter_udp")
            ratio("ratio_syn_new_source_over_xdp_filter_run1", "syn_new_source",
                  "xdp_filter_syn_new_source")
            emit(BENCH, "syn_new_source_minus_xdp_filter_ns",
                 round(median([a - b for a, b in zip(ns["syn_new_source"],
                                                     ns["xdp_filter_syn_new_source"])]), 1),
                 "ns", n=ROUNDS, of="syn_new_source - xdp_filter_syn_new_source", **load)
        emit(BENCH, "varied_dst_cache_miss_ns",
             round(median([a - b for a, b in zip(ns["varied_dst"], ns["udp_run1"])]), 1), "ns",
             n=ROUNDS, of="varied_dst - udp_run1", **load)
        emit(BENCH, "new_source_ns",
             round(median([a - b for a, b in zip(ns["syn_new_source"], ns["syn_login_run1"])]), 1),
             "ns", n=ROUNDS, of="syn_new_source - syn_login_run1", **load)
        emit(BENCH, "stealth_check_ns",
             round(median([a - b for a, b in zip(ns["syn_login"], ns["syn_login_no_stealth"])]), 1),
             "ns", n=ROUNDS, of="syn_login - syn_login_no_stealth", **load)
        emit(BENCH, "counters_checked_packets", sum(counted.values()), "packets",
             cases=len(table), **load)
        emit(BENCH, "compile_seconds_child", one.load_report.get("compile_seconds"), "s",
             peak_rss_mb=one.load_report.get("peak_rss_mb"))
        del bcc_obj
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
