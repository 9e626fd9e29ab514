"""The tamper watch's cost: Dataplane.drift(), which the supervisor runs twice a second, at
100 and 1,000 devices (2 real lab devices, the rest map and nft entries as in bench_apply),
and a restore() after the table was deleted by hand.

  drift_ms      one drift() with nothing changed: median and p99 of 50, and the share of a
                second it costs at two calls a second (the load it adds to one core). The
                table is not listed: nftables' generation says only we committed.
  drift_full_ms the same, the table listed every time (what drift() costs once a minute, and
                after anybody else commits to nftables); ratio_full_over_steady beside it
  drift_slots_ms
                the same, kalki_mac_slots read too (every MAC_SLOTS_CHECK_SECONDS, 10 s)
  restore_ms    `nft delete table inet kalki`, then drift() + restore(): how long until the
                table is back with every device (what the watch adds to its 0.5 s period)
Each line carries the load average, read beside the figure.
"""
from __future__ import annotations

import os
import subprocess
import time

import common
from bench_apply import specs
from common import emit, median, percentile

from appliance.dataplane import api, nft

BENCH = "tamper"
SIZES = [int(x) for x in os.environ.get("KALKI_BENCH_TAMPER_SIZES", "100,1000").split(",")]


def main() -> int:
    for n in SIZES:
        with common.lab("tw", devices=2) as (lab, dp):
            wanted = specs(lab, n)
            dp.reconcile(wanted)
            assert not dp.drift(), dp.drift()
            times: dict[str, list[float]] = {"steady": [], "full": [], "slots": []}
            for _ in range(50):      # interleaved, so all see the same machine
                for kind in times:
                    nft.FULL_LOOK_SECONDS = 0.0 if kind == "full" else 60.0
                    if kind == "slots":
                        dp._slots_checked_at = -api.MAC_SLOTS_CHECK_SECONDS
                    t0 = time.perf_counter()
                    problems = dp.drift()
                    times[kind].append((time.perf_counter() - t0) * 1e3)
                    assert not problems, problems
            nft.FULL_LOOK_SECONDS = 60.0
            for kind, metric in (("steady", "drift_ms"), ("full", "drift_full_ms"),
                                 ("slots", "drift_slots_ms")):
                emit(BENCH, metric, round(median(times[kind]), 2), "ms", devices=n,
                     n=len(times[kind]), p99_ms=round(percentile(times[kind], 99), 2),
                     core_share_at_2_per_s=round(2 * median(times[kind]) / 1000, 4),
                     loadavg=os.getloadavg()[0])
            emit(BENCH, "ratio_full_over_steady", round(median(times["full"]) / median(times["steady"]), 1),
                 "ratio", devices=n, loadavg=os.getloadavg()[0])
            subprocess.run(["ip", "netns", "exec", lab.namespaces["gw"], "nft", "delete", "table", "inet",
                            "kalki"], check=True)
            t0 = time.perf_counter()
            problems = dp.drift()
            report = dp.restore(wanted)
            restore_ms = (time.perf_counter() - t0) * 1e3
            assert problems and not dp.drift()
            emit(BENCH, "restore_ms", round(restore_ms, 1), "ms", devices=n, fixed=len(report["fixed"]),
                 problems=problems, loadavg=os.getloadavg()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
