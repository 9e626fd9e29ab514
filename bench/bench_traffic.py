#!/usr/bin/env python3
"""The traffic charts' rings (appliance/supervisor/traffic.py): what they cost the supervisor.

For 100 and KALKI_BENCH_DEVICES [1000] devices, each in a fresh Python process (so that one
count's allocations do not hide in the other's), with every slot of both rings written and three
drop reasons per device (a day of traffic with drops; fewer reasons cost less):
- `rings_traced_mb`: what tracemalloc counts for the Traffic object and its rings;
- `rings_rss_mb`: resident memory grown by building them (VmRSS after minus before);
- `pass_ms`: one sampling pass, every device read once (Traffic.record of a counters() answer
  as the data path gives it), median of 5; with a fake data path, so the kernel's 16 map lookups
  per device are not in it: `lookups_per_pass` says how many a real one adds;
- `tick_max_ms`: the longest single tick of the supervisor's ticker over a 10-s window, the
  readings spread over it (what the loop is held for at most), median of 5 windows;
- `series_ms`: ops.traffic's work for one device and a day; `overview_ms`: the overview's
  small charts of every device (60 points of the hour), made afresh (then kept for the 10-s
  window);
- `payload_ms`: the rings to bytes, the part of a save done on the loop; `save_ms`: all of a
  save, compressed and written (fsync, rename), and `file_kb`, the file's size.

Every line also carries os.getloadavg() as `load`: these are timings on a shared machine.
No network, no namespaces: only a temporary directory, removed at the end.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, emit, install_signal_handlers

BENCH = "traffic"
DEVICES = int(os.environ.get("KALKI_BENCH_DEVICES", "1000"))

CHILD = r"""
import json, statistics, sys, time, tracemalloc
from pathlib import Path

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

from appliance.supervisor import traffic
from appliance.supervisor.traffic import DAY, HOUR, STEP, Traffic

devices, directory = int(sys.argv[1]), Path(sys.argv[2])
names = [f"device-{i:04d}" for i in range(devices)]
T0 = (int(time.time()) // DAY.seconds) * DAY.seconds

def answer(k, i):
    # Dataplane.counters() of device i after k windows: passes and three drop reasons
    return {"pass": {"umbox": None, "packets": 100 * k + i, "bytes": 9000 * k + i},
            "allowlist": {"umbox": "allowlist", "packets": 3 * k, "bytes": 180 * k},
            "port_scan": {"umbox": "port_scan", "packets": k, "bytes": 60 * k},
            "quarantine": {"umbox": "quarantine", "packets": 2 * k, "bytes": 120 * k}}

before = rss_mb()
# Everything a device's rings hold is allocated by its first two readings (the arrays, a
# reason's at its first drop); filling the slots after that allocates nothing that stays.
tracemalloc.start()
t = Traffic(directory / "traffic.bin")
for k in range(2):
    for i, name in enumerate(names):
        t.record(name, answer(k, i), T0 + STEP * k, float(STEP * k))
traced = tracemalloc.get_traced_memory()[0]
tracemalloc.stop()
# a whole day of readings would take long: the hour ring is filled by its readings, and the day
# ring's every slot written as its readings would write it
for k in range(2, HOUR.slots + 1):
    for i, name in enumerate(names):
        t.record(name, answer(k, i), T0 + STEP * k, float(STEP * k))
for d in t.devices.values():
    for slot in range(DAY.slots):
        d.day.add(T0 // DAY.step + slot, traffic.reading(answer(1, 0)))
after = rss_mb()

class Held:
    def __init__(self):
        self.devices = dict.fromkeys(names)
        self.k = HOUR.slots + 1
    def counters(self, name):
        return answer(self.k, 0)

dp = Held()
passes, ticks = [], []
now = T0 + STEP * (HOUR.slots + 1)
for w in range(5):
    dp.k += 1
    started = time.perf_counter()
    t._read(dp, names, now, float(now - T0))
    passes.append((time.perf_counter() - started) * 1e3)
    now += STEP
for w in range(5):
    dp.k += 1
    longest = 0.0
    for j in range(40):          # the supervisor's ticks, every 0.25 s
        at = now + 0.25 * j
        started = time.perf_counter()
        t.tick(dp, at, float(at - T0))
        longest = max(longest, (time.perf_counter() - started) * 1e3)
    ticks.append(longest)
    now += STEP

def timed(fn, runs=20):
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1e3)
    return statistics.median(out)

series_ms = timed(lambda: json.dumps(t.series(names[0], DAY, now)))

def overview():
    t._overview = None          # made afresh: what the first page to ask in a window costs
    json.dumps(t.overview(names, HOUR, now, 60))
overview_ms = timed(overview, runs=5)
payload_ms = timed(t._payload, runs=3)
save_ms = timed(t.save, runs=3)
print(json.dumps({"rings_traced_mb": traced / 2 ** 20, "rings_rss_mb": after - before,
                  "pass_ms": statistics.median(passes), "tick_max_ms": statistics.median(ticks),
                  "series_ms": series_ms, "overview_ms": overview_ms, "payload_ms": payload_ms,
                  "save_ms": save_ms,
                  "file_kb": (directory / "traffic.bin").stat().st_size / 1024}))
"""

UNITS = {"rings_traced_mb": "MB", "rings_rss_mb": "MB", "pass_ms": "ms", "tick_max_ms": "ms",
         "series_ms": "ms", "overview_ms": "ms", "payload_ms": "ms", "save_ms": "ms", "file_kb": "KB"}


def measure(devices: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="kalki-bench-traffic-") as directory:
        done = subprocess.run([sys.executable, "-c", CHILD, str(devices), directory], cwd=ROOT,
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    install_signal_handlers()
    for devices in sorted({100, DEVICES}):
        figures = measure(devices)
        load = [round(x, 2) for x in os.getloadavg()]
        for metric, value in figures.items():
            emit(BENCH, metric, round(value, 3), UNITS[metric], devices=devices, load=load,
                 **({"lookups_per_pass": 16 * devices} if metric == "pass_ms" else {}))


if __name__ == "__main__":
    main()
