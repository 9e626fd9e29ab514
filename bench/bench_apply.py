"""Applying 1,000 devices, reconciling 1,000 unchanged devices, compiling, and memory.

  apply       Dataplane.apply of 1,000 DeviceSpecs with their profile's normal stack (2 real
              lab devices, the rest map/nft entries with made-up MACs 02:42:bb:.. and
              addresses in 198.18.0.0/20): total seconds, per-device ms (median, first and
              last 100, to show growth with the table size)
  reconcile   a fresh Dataplane.open + reconcile of the same 1,000 (nothing to change)
  compile     appliance.dataplane.loader.run_child into a separate pin dir, attached nowhere:
              compile seconds and the child's peak RSS (ru_maxrss)
  rss         VmRSS / VmHWM of this long-lived process holding an open Dataplane with
              1,000 devices (bcc/LLVM is never imported here)
"""
from __future__ import annotations

import os
import sys
import time

import common
from common import dataplane, emit, loader, median, topology

BENCH = "apply"
DEVICES = int(os.environ.get("KALKI_BENCH_DEVICES", 1000))
COMPILES = int(os.environ.get("KALKI_BENCH_COMPILES", 3))


def specs(lab) -> list:
    from appliance.policy import profiles
    known = profiles.load_all()
    types = sorted(known)
    out = [dataplane.DeviceSpec(d.name, d.mac, d.ip, known[d.type].stack("normal")) for d in lab.devices]
    for i in range(DEVICES - len(out)):
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


def main() -> int:
    assert "bcc" not in sys.modules
    with common.lab("ap", devices=2) as (lab, dp):
        wanted = specs(lab)
        rss_before = common.vm_status()
        per = []
        t_all = time.perf_counter()
        for s in wanted:
            t0 = time.perf_counter()
            dp.apply(s)
            per.append(time.perf_counter() - t0)
        total = time.perf_counter() - t_all
        emit(BENCH, "apply_total", round(total, 2), "s", n=len(wanted))
        emit(BENCH, "apply_per_device", round(median(per) * 1000, 2), "ms", n=len(wanted),
             first100_ms=round(median(per[:100]) * 1000, 2), last100_ms=round(median(per[-100:]) * 1000, 2),
             max_ms=round(max(per) * 1000, 1))
        rss = common.vm_status()
        emit(BENCH, "rss_dataplane_1000_devices", round(rss["VmRSS"] / 1024, 1), "MB",
             hwm_mb=round(rss["VmHWM"] / 1024, 1), rss_before_apply_mb=round(rss_before["VmRSS"] / 1024, 1),
             bcc_imported="bcc" in sys.modules)

        dp2 = dataplane.Dataplane.open(lab.name, lab.namespaces["gw"], topology.gateway_settings(lab))
        try:
            t0 = time.perf_counter()
            rep = dp2.reconcile(wanted)
            t_rec = time.perf_counter() - t0
        finally:
            dp2.close()
        emit(BENCH, "reconcile_unchanged", round(t_rec, 2), "s", n=len(wanted),
             unchanged=len(rep["unchanged"]), fixed=len(rep["fixed"]), added=len(rep["added"]),
             removed=len(rep["removed"]), reattached=len(rep["reattached"]))

    runs = compile_runs()
    emit(BENCH, "compile", round(median([r["compile_seconds"] for r in runs]), 3), "s", n=len(runs),
         wall_seconds_with_child_start=round(median([r["wall_seconds"] for r in runs]), 3))
    emit(BENCH, "compile_peak_rss", round(median([r["peak_rss_mb"] for r in runs]), 1), "MB", n=len(runs),
         what="ru_maxrss of the loader child (bcc + LLVM)")
    emit(BENCH, "rss_this_process_end", round(common.vm_status()["VmRSS"] / 1024, 1), "MB",
         bcc_imported="bcc" in sys.modules)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
