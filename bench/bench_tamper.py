"""The tamper watch's cost: Dataplane.drift(), which the supervisor runs twice a second, at
100 and 1,000 devices (2 real lab devices, the rest map and nft entries as in bench_apply),
and a restore() after the table was deleted by hand.

  drift_ms      one drift() with nothing changed: median and p99 of 50, and the share of a
                second it costs at two calls a second (the load it adds to one core)
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

BENCH = "tamper"
SIZES = [int(x) for x in os.environ.get("KALKI_BENCH_TAMPER_SIZES", "100,1000").split(",")]


def main() -> int:
    for n in SIZES:
        with common.lab("tw", devices=2) as (lab, dp):
            wanted = specs(lab, n)
            dp.reconcile(wanted)
            assert not dp.drift(), dp.drift()
            times = []
            for _ in range(50):
                t0 = time.perf_counter()
                problems = dp.drift()
                times.append((time.perf_counter() - t0) * 1e3)
                assert not problems, problems
            emit(BENCH, "drift_ms", round(median(times), 2), "ms", devices=n, n=len(times),
                 p99_ms=round(percentile(times, 99), 2),
                 core_share_at_2_per_s=round(2 * median(times) / 1000, 4),
                 loadavg=os.getloadavg()[0])
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
