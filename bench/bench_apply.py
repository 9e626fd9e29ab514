"""Applying devices one by one up to 4,000, reconciling them unchanged, compiling, and memory.

  apply       Dataplane.apply of one DeviceSpec after another with its profile's normal stack
              (2 real lab devices, the rest map/nft entries with made-up MACs 02:42:bb:.. and
              addresses from 198.18.1.0): the curve, one JSON line per block of 100 devices
              (median, mean and max ms per device in the block, first block to last), and the
              running total at 1,000 devices (target <= 0.5 s) and at 4,000
  reconcile   a fresh Dataplane.open + reconcile of the same devices (nothing to change), at
              1,000 and at 4,000
  compile     appliance.dataplane.loader.run_child into a separate pin dir, attached nowhere:
              compile seconds and the child's peak RSS (ru_maxrss)
  rss         VmRSS / VmHWM of this long-lived process holding an open Dataplane with all the
              devices (bcc/LLVM is never imported here)
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import common
from common import dataplane, emit, loader, median, topology

BENCH = "apply"
DEVICES = int(os.environ.get("KALKI_BENCH_DEVICES", 1000))          # the target's size
DEVICES_MAX = int(os.environ.get("KALKI_BENCH_DEVICES_MAX", 4000))  # the curve goes on to here
BLOCK = int(os.environ.get("KALKI_BENCH_BLOCK", 100))
COMPILES = int(os.environ.get("KALKI_BENCH_COMPILES", 3))
TARGET_S = 0.5                                                      # 1,000 devices


def specs(lab, n: int) -> list:
    from appliance.policy import profiles
    known = profiles.load_all()
    types = sorted(known)
    out = [dataplane.DeviceSpec(d.name, d.mac, d.ip, known[d.type].stack("normal")) for d in lab.devices]
    for i in range(n - len(out)):
        mac, ip = common.fake_device(i)
        t = types[i % len(types)]
        out.append(dataplane.DeviceSpec(f"fake-{t}-{i}", mac, ip, known[t].stack("normal")))
    return out


def compile_runs() -> list[dict]:
    out = []
    for _ in range(COMPILES):
        instance = f"bcomp{common.suffix()}"
        try:
            t0 = time.monotonic()
            r = loader.run_child(f"{dataplane.BPFFS}/kalki/{instance}", {}, None)
            r["wall_seconds"] = time.monotonic() - t0
            out.append(r)
        finally:
            dataplane.remove_pins(instance)
    return out


def reconcile(lab, wanted, loads) -> None:
    # (lab(in_gateway=True) keeps this thread in the gateway's namespace)
    dp2 = dataplane.Dataplane.open(lab.name, None if common.IN_GATEWAY else lab.namespaces["gw"],
                                   topology.gateway_settings(lab))
    try:
        t0 = time.perf_counter()
        rep = dp2.reconcile(wanted)
        t_rec = time.perf_counter() - t0
    finally:
        dp2.close()
    loads.sample()
    emit(BENCH, f"reconcile_unchanged_{len(wanted)}", round(t_rec, 3), "s", n=len(wanted),
         unchanged=len(rep["unchanged"]), fixed=len(rep["fixed"]), added=len(rep["added"]),
         removed=len(rep["removed"]), reattached=len(rep["reattached"]), **loads.kw())


def main() -> int:
    assert "bcc" not in sys.modules
    loads = common.Loads()
    top = max(DEVICES, DEVICES_MAX)
    common.emit_where(BENCH)
    with common.lab("ap", devices=2, in_gateway=common.IN_GATEWAY) as (lab, dp):
        wanted = specs(lab, top)
        rss_before = common.vm_status()
        per: list[float] = []
        total = 0.0
        for k, s in enumerate(wanted, 1):
            t0 = time.perf_counter()
            dp.apply(s)
            dt = time.perf_counter() - t0
            per.append(dt)
            total += dt
            if k % BLOCK == 0 or k == len(wanted):
                loads.sample()
                block = per[-(k - (k - 1) // BLOCK * BLOCK):]
                emit(BENCH, "apply_block_ms_per_device", round(median(block) * 1000, 3), "ms",
                     devices=f"{(k - 1) // BLOCK * BLOCK + 1}-{k}", n=len(block),
                     mean_ms=round(statistics.fmean(block) * 1000, 3),
                     max_ms=round(max(block) * 1000, 2), total_so_far_s=round(total, 3), **loads.kw())
            if k == DEVICES:
                emit(BENCH, f"apply_total_{k}", round(total, 3), "s", n=k, target=f"<= {TARGET_S}",
                     met=total <= TARGET_S, first_block_ms=round(median(per[:BLOCK]) * 1000, 3),
                     last_block_ms=round(median(per[-BLOCK:]) * 1000, 3), **loads.kw())
                reconcile(lab, wanted[:k], loads)
        first, last = median(per[:BLOCK]), median(per[-BLOCK:])
        emit(BENCH, f"apply_total_{len(wanted)}", round(total, 3), "s", n=len(wanted),
             first_block_ms=round(first * 1000, 3), last_block_ms=round(last * 1000, 3),
             growth_last_over_first=round(last / first, 2), max_ms=round(max(per) * 1000, 2),
             **loads.kw())
        rss = common.vm_status()
        emit(BENCH, f"rss_dataplane_{len(wanted)}_devices", round(rss["VmRSS"] / 1024, 1), "MB",
             hwm_mb=round(rss["VmHWM"] / 1024, 1), rss_before_apply_mb=round(rss_before["VmRSS"] / 1024, 1),
             bcc_imported="bcc" in sys.modules, **loads.kw())
        if len(wanted) != DEVICES:
            reconcile(lab, wanted, loads)

    runs = compile_runs()
    loads.sample()
    emit(BENCH, "compile", round(median([r["compile_seconds"] for r in runs]), 3), "s", n=len(runs),
         wall_seconds_with_child_start=round(median([r["wall_seconds"] for r in runs]), 3), **loads.kw())
    emit(BENCH, "compile_peak_rss", round(median([r["peak_rss_mb"] for r in runs]), 1), "MB", n=len(runs),
         what="ru_maxrss of the loader child (bcc + LLVM)", **loads.kw())
    emit(BENCH, "rss_this_process_end", round(common.vm_status()["VmRSS"] / 1024, 1), "MB",
         bcc_imported="bcc" in sys.modules, **loads.kw())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
