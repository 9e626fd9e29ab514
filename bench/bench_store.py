#!/usr/bin/env python3
"""The store with its logs at their retention limits: what they cost the supervisor.

A gateway with KALKI_BENCH_DEVICES devices [1000] that has run long enough: 200 posture-history
records per device, 5,000 alerts and 5,000 decisions (each moving 25 cameras, as the intrusion
rule does). Written once into a temporary directory, then opened by a fresh Python process that
reports:
- `load_s`: how long opening the store takes (the supervisor does this at start-up, before it
  enforces anything);
- `rss_logs_mb`: resident memory the open store adds over the same process before opening it;
- `query_ms_*`: a device's posture history (20), the newest alerts (50), a device's decisions
  (50), median of 20;
- `trim_ms`: the posture change that takes one device 10% over its history bound (its oldest
  records go); `flush_after_trim_ms`: the next flush (the file keeps the trimmed lines until a
  quarter of it is removed records); `rewrite_ms`: a flush that rewrites the whole history file
  then (fsynced, renamed), on the caller's thread; `rewrite_behind_ms`: the same rewrite through
  `Store.flush_behind()`, as the supervisor flushes, with the writing in a worker thread, and
  `rewrite_behind_loop_gap_ms`: the longest the event loop went without running meanwhile;
- `state_write_ms_<n>`: a posture change in a state file (kalki.json) of 100 and of
  KALKI_BENCH_DEVICES devices: TinyDB's update, the whole file written (the unchanged
  documents' text reused) to a temporary file, fsynced and renamed (median and max of 30, on
  the caller's thread: the supervisor's loop does this once per decision);
- `posture_batch_ms_<n>`: 25 devices' postures changed in one batch, as a rule that moves 25
  cameras does after enforcing them (each device's record, its history line and its audit
  line, then one write), in a state file of 100 and of KALKI_BENCH_DEVICES devices; with
  `young_objects`, the containers the batch left for the collector's next young collection
  (the supervisor runs it from its ticker, on the loop).

No network, no namespaces: only files in a temporary directory, removed at the end.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, emit, install_signal_handlers

from appliance.store.logs import LogTable
from appliance.store.state import Retention

BENCH = "store"
DEVICES = int(os.environ.get("KALKI_BENCH_DEVICES", "1000"))

CHILD = r"""
import json, statistics, sys, time
from pathlib import Path
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
import asyncio
from appliance.store.state import Store
directory, devices = Path(sys.argv[1]), int(sys.argv[2])
before = rss()
t = time.perf_counter()
store = Store(directory)
load = time.perf_counter() - t
after = rss()
def timed(f):
    runs = []
    for _ in range(20):
        t = time.perf_counter(); f(); runs.append((time.perf_counter() - t) * 1e3)
    return statistics.median(runs)
out = {"load_s": load, "rss_logs_mb": after - before, "rss_total_mb": after,
       "query_ms_history": timed(lambda: store.posture_history(f"dev{devices // 2}", limit=20)),
       "query_ms_alerts": timed(lambda: store.alerts(limit=50)),
       "query_ms_decisions": timed(lambda: store.decisions(device="cam7", limit=50))}
store.upsert_device("dev1", "02:00:00:00:00:01")
for n in range(20):             # dev1 at its bound + 10%: the next record trims it
    store.record_posture("dev1", "normal", "bench")
store.flush()
t = time.perf_counter()
store.record_posture("dev1", "normal", "bench")
out["trim_s"] = time.perf_counter() - t
t = time.perf_counter()
store.flush()                   # the new line appended; the trimmed lines stay until a quarter is dead
out["flush_s"] = time.perf_counter() - t
store._logs["history"]._rewrite = True     # what a flush costs when that quarter is reached
t = time.perf_counter()
store.flush()
out["rewrite_s"] = time.perf_counter() - t
store._logs["history"]._rewrite = True     # the same, as the supervisor does it: behind the loop
async def behind():
    gaps, done = [], False
    async def ticker():
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    t = time.perf_counter()
    await store.flush_behind()
    wall = time.perf_counter() - t
    done = True
    await tick
    return wall, max(gaps)
out["rewrite_behind_s"], out["rewrite_behind_loop_gap_s"] = asyncio.run(behind())
out["history_after_trim"] = len(store.posture_history("dev1", limit=1000))
store.close()
print(json.dumps(out))
"""


def fill(directory: Path, devices: int, retention: Retention) -> dict:
    actions = [{"action": "set_posture", "target": f"cam{i}", "posture": "suspicious",
                "enforced": True} for i in range(25)]
    base = datetime.now(UTC) - timedelta(days=3)    # young enough for the age limit

    def stamp(seconds: int) -> str:
        return (base + timedelta(seconds=seconds)).isoformat(timespec="microseconds")

    sizes = {}
    history = LogTable(directory / "history.jsonl")
    for n in range(retention.history_per_device):
        for d in range(devices):
            history.insert({"device": f"dev{d}", "posture": "normal" if n % 2 else "suspicious",
                            "reason": "rule physical-intrusion", "at": stamp(n * devices + d)})
        history.flush()
    alerts = LogTable(directory / "alerts.jsonl")
    for n in range(retention.alerts):
        alerts.insert({"device": f"dev{n % devices}", "type": "brute-force", "source": "kernel",
                       "severity": "high", "details": {"source": "198.19.0.66", "port": 23},
                       "at": stamp(n)})
    alerts.flush()
    decisions = LogTable(directory / "decisions.jsonl")
    for n in range(retention.decisions):
        decisions.insert({"kind": "decision", "device": f"cam{n % 25}", "rule": "physical-intrusion",
                          "stimulus": {"kind": "telemetry", "device": "motion1", "data": {"motion": True}},
                          "actions": actions, "timing_ms": {"decide": 0.3, "xdp": 2.0, "enforce": 4.5},
                          "at": stamp(n)})
    decisions.flush()
    for table in (history, alerts, decisions):
        sizes[table.path.name] = table.path.stat().st_size
        table.close()
    return sizes


def main() -> int:
    install_signal_handlers()
    retention = Retention()
    with tempfile.TemporaryDirectory(prefix="kalki-bench-store-") as tmp:
        sizes = fill(Path(tmp), DEVICES, retention)
        records = DEVICES * retention.history_per_device + retention.alerts + retention.decisions
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", CHILD, tmp, str(DEVICES)], env=env,
                             capture_output=True, text=True, timeout=600)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        r = json.loads(out.stdout)
    common = {"devices": DEVICES, "records": records}
    emit(BENCH, "log_files_mb", round(sum(sizes.values()) / 2**20, 1), "MB",
         files={k: round(v / 2**20, 1) for k, v in sizes.items()}, **common)
    emit(BENCH, "load_s", round(r["load_s"], 2), "s", **common)
    emit(BENCH, "rss_logs_mb", round(r["rss_logs_mb"], 1), "MB",
         bytes_per_record=round(r["rss_logs_mb"] * 2**20 / records), process_mb=round(r["rss_total_mb"], 1),
         **common)
    for q in ("history", "alerts", "decisions"):
        emit(BENCH, f"query_ms_{q}", round(r[f"query_ms_{q}"], 2), "ms", n=20, **common)
    emit(BENCH, "trim_ms", round(r["trim_s"] * 1e3, 1), "ms", history_left=r["history_after_trim"],
         how="the posture change that takes one device 10% over its history bound", **common)
    emit(BENCH, "flush_after_trim_ms", round(r["flush_s"] * 1e3, 1), "ms",
         how="the next flush: the new line appended, the trimmed ones left in the file", **common)
    emit(BENCH, "rewrite_ms", round(r["rewrite_s"] * 1e3, 1), "ms",
         how="a flush once a quarter of the history file is removed records: the file rewritten",
         **common)
    emit(BENCH, "rewrite_behind_ms", round(r["rewrite_behind_s"] * 1e3, 1), "ms",
         how="the same rewrite by Store.flush_behind(), as the supervisor flushes: wall time", **common)
    emit(BENCH, "rewrite_behind_loop_gap_ms", round(r["rewrite_behind_loop_gap_s"] * 1e3, 1), "ms",
         how="the longest the event loop went without running during that rewrite (a task "
             "sleeping 1 ms in a loop; 1.1 ms means never held)", **common)
    for n in sorted({100, DEVICES}):
        median_ms, max_ms, kb = state_write(n)
        emit(BENCH, f"state_write_ms_{n}", round(median_ms, 2), "ms", max_ms=round(max_ms, 2),
             state_file_kb=kb, devices=n, n=30,
             how="update_device(posture=...) in a store of n approved devices: one atomic write")
    for n in sorted({100, DEVICES}):
        r = posture_batch(n)
        emit(BENCH, f"posture_batch_ms_{n}", round(r["median_ms"], 2), "ms", max_ms=round(r["max_ms"], 2),
             young_objects=r["young_objects"], devices=n, moved=25, n=20,
             how="25 devices' posture, history and audit in one store batch: one atomic write")
    return 0


def _filled_store(tmp: str, devices: int):
    from appliance.store.state import Store
    store = Store(Path(tmp))
    with store.batch():
        for i in range(devices):
            store.upsert_device(f"dev{i}", "02:4b:00:%02x:%02x:%02x" % (i >> 16 & 255, i >> 8 & 255,
                                                                        i & 255),
                                ip=f"198.18.{i // 250}.{i % 250 + 1}", type="camera",
                                approved=True, posture="normal")
    return store


def posture_batch(devices: int) -> dict:
    import gc
    import statistics
    import time
    with tempfile.TemporaryDirectory(prefix="kalki-bench-state-") as tmp:
        store = _filled_store(tmp, devices)
        runs, young = [], []
        gc.disable()
        try:
            for k in range(20):
                posture = "suspicious" if k % 2 == 0 else "normal"
                gc.collect()
                t = time.perf_counter()
                with store.batch():
                    for i in range(25):
                        name = f"dev{(k // 2 * 25 + i) % devices}"    # up, then back down
                        store.update_device(name, posture=posture, posture_expires=None,
                                            posture_revert_to=None, posture_after=[])
                        store.record_posture(name, posture, "rule bench")
                        store.audit("posture", "rule bench", {"device": name, "posture": posture})
                runs.append((time.perf_counter() - t) * 1e3)
                young.append(len(gc.get_objects(generation=0)))
        finally:
            gc.enable()
        store.close()
    return {"median_ms": statistics.median(runs), "max_ms": max(runs),
            "young_objects": int(statistics.median(young))}


def state_write(devices: int) -> tuple[float, float, int]:
    import statistics
    import time

    with tempfile.TemporaryDirectory(prefix="kalki-bench-state-") as tmp:
        store = _filled_store(tmp, devices)
        runs = []
        for k in range(30):
            t = time.perf_counter()
            store.update_device(f"dev{k}", posture="suspicious" if k % 2 else "attack")
            runs.append((time.perf_counter() - t) * 1e3)
        kb = (Path(tmp) / "kalki.json").stat().st_size // 1024
        store.close()
    return statistics.median(runs), max(runs), kb


if __name__ == "__main__":
    sys.exit(main())
