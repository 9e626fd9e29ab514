#!/usr/bin/env python3
"""What the rules cost a telemetry report, at 100 and 1,000 devices.

The supervisor as it runs (its store in a temporary directory, its rules, its telemetry
memory, `Supervisor.on_telemetry`), on the tests' FakeDataplane: no kernel, since nothing
here changes a posture. Devices as the lab names them (camera, plug, light, motion sensor in
turn), the policy's clock after hours on a Wednesday, so the built-in site-wide intrusion
rule (motion within 5 minutes with every light off -> every camera suspicious) gets past its
time condition and reads the motion sensors and the lights.

Per size, each light and each motion sensor reports once per round, as they do every second
on a site, and the loop's time per report is taken (time.perf_counter_ns around
on_telemetry):
- `report_us_<n>`: the steady state: each repeats its previous value (lights off, no
  motion);
- `report_changed_us_<n>`: the lights come on, each after a round with them off, so the
  intrusion rule is read on each light's report (and each reads every motion sensor);
- `report_rule_off_us_<n>`: the steady state with the intrusion rule switched off.
`rules_skipped_per_report_<n>` is the supervisor's own counter of global rule evaluations a
report did not need (`kalki status`: rules_skipped), which shows which path was taken.
Interleaved rounds; median and p99 of the reports' times, with the load average.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
from common import emit, median, percentile

BENCH = "rules"
SIZES = [int(x) for x in os.environ.get("KALKI_BENCH_RULES_SIZES", "100,1000").split(",")]
ROUNDS = int(os.environ.get("KALKI_BENCH_RULES_ROUNDS", 6))
TYPES = ("camera", "plug", "light", "motion_sensor")      # as lab.topology names them
AFTER_HOURS = "2024-05-15T23:00:00+00:00"                 # a Wednesday, 23:00 UTC


def site(directory: Path, n: int):
    import fakes
    devices = {}
    for i in range(n):
        t = TYPES[i % len(TYPES)]
        devices[f"{t}{i // len(TYPES) + 1}"] = (f"02:42:cd:00:{i >> 8:02x}:{i & 0xff:02x}",
                                               common.fake_device(i)[1], t)
    sup = fakes.supervisor(directory, **devices)
    sup.clock.set(AFTER_HOURS)
    return sup


def reporters(sup) -> list[tuple[str, str]]:
    return [(name, "on" if d.get("type") == "light" else "motion")
            for name, d in sup.known.items() if d.get("type") in ("light", "motion_sensor")]


def one_round(sup, who: list[tuple[str, str]], changed: bool) -> list[float]:
    """Each light and motion sensor reports once: no motion, the lights off (`changed`: on,
    after a round with them off)."""
    out = []
    for name, field in who:
        value = changed and field == "on"
        t0 = time.perf_counter_ns()
        sup.on_telemetry(name, {field: value})
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def main() -> int:
    common.install_signal_handlers()
    logging.disable(logging.WARNING)     # the rule switched off and on, logged each time
    for n in SIZES:
        with tempfile.TemporaryDirectory(prefix="kalki-bench-rules-") as tmp:
            from appliance.supervisor.ops import Ops
            sup = site(Path(tmp), n)
            ops = Ops(sup)
            who = reporters(sup)
            one_round(sup, who, False)       # every sensor has a first value
            loads = common.Loads()
            cases: dict[str, list[float]] = {"report": [], "report_changed": [], "report_rule_off": []}
            skipped: dict[str, list[int]] = {k: [] for k in cases}
            for _ in range(ROUNDS):
                for case in cases:
                    ops.set_rule_enabled("physical-intrusion", case != "report_rule_off")
                    one_round(sup, who, False)       # back to the steady state
                    before = sup.engine.skipped
                    cases[case] += one_round(sup, who, case == "report_changed")
                    skipped[case].append(sup.engine.skipped - before)
                loads.sample()
            load = loads.kw()
            for case, xs in cases.items():
                emit(BENCH, f"{case}_us_{n}", round(median(xs), 1), "us", p99=round(percentile(xs, 99), 1),
                     n=len(xs), devices=n, reporting=len(who), **load)
                emit(BENCH, f"rules_skipped_per_report_{case}_{n}",
                     round(sum(skipped[case]) / len(cases[case]), 2), "count", devices=n, **load)
            emit(BENCH, f"ratio_report_over_rule_off_{n}",
                 round(median(cases["report"]) / median(cases["report_rule_off"]), 2), "ratio",
                 of=f"report_us_{n}/report_rule_off_us_{n}", devices=n, **load,
                 what="steady-state report with the intrusion rule / without")
            sup.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
