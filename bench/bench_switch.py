"""Posture switch latency: Dataplane.set_stack switching a device between a passing stack and
quarantine, while the device sends a steady UDP stream through the gateway.

A sender in the device's namespace sends UDP probes to the inet namespace every GAP_US, each
carrying its sequence number and send time (CLOCK_MONOTONIC, the same clock in every
namespace); a receiver in the inet namespace records what arrives. Per switch:

  call          duration of the set_stack call (time.perf_counter_ns around it)
  effect        from the start of the call to the first probe handled under the new posture:
                to quarantine: send time of the first probe that no longer arrived (the last
                arrived one + one gap); to pass: send time of the first probe that arrived again.
                Resolution: one gap.
  counter_seen  from the start of the call until this process, polling the per-CPU counter of
                the new verdict (quarantine / pass) after the call returned, sees it move.

Two stacks for "passing": the camera profile's normal posture (has conn_limit, so every switch
also rewrites the device's nftables chain) and an XDP-only stack (no nftables change).
Target: switch p99 <= 1 ms.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import tempfile
import time
from array import array

import common
from common import dataplane, emit, maps, percentile

BENCH = "switch"
SWITCHES = int(os.environ.get("KALKI_BENCH_SWITCHES", 300))
HOLD_MS = 12
GAP_US = 25
PORT = 9999
DST = "198.19.8.1"

RECEIVER = r"""
import array, signal, socket, struct, sys
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 25)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.settimeout(0.1)
open(sys.argv[1] + ".ready", "w").close()
seqs, ts = array.array("q"), array.array("q")
while not stop:
    try:
        data = s.recv(64)
    except (socket.timeout, InterruptedError):
        continue
    q, t = struct.unpack_from("!qq", data)
    seqs.append(q); ts.append(t)
with open(sys.argv[1], "wb") as f:
    seqs.tofile(f); ts.tofile(f)
"""

SENDER = r"""
import os, signal, socket, struct, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst = (sys.argv[1], int(sys.argv[2])); gap = int(sys.argv[3]) * 1000
mono, pack, send = time.monotonic_ns, struct.pack, s.sendto
seq = 0; nxt = mono()
while not stop:
    now = mono()
    if now < nxt:
        os.sched_yield()    # paced by spinning, but let the other processes of this 2-CPU box run
        continue
    try:
        send(pack("!qq", seq, now), dst)
    except OSError:
        pass
    seq += 1; nxt += gap
    if now - nxt > 10 * gap:
        nxt = now
"""


def counter(dp, device_id: int, reason: int) -> int:
    per_cpu = dp._maps["kalki_counters"].lookup(ctypes.c_uint32(device_id * maps.REASON_SLOTS + reason))
    return sum(c.packets for c in per_cpu)


def run_variant(dp, dev, passing: dict, quarantine: dict):
    """Returns per-switch records (direction, t_start, call_ns, counter_seen_ns)."""
    device_id = dp.device_id(dev.name)
    dp.set_stack(dev.name, passing)
    time.sleep(0.05)
    records = []
    to_q = True
    for _ in range(SWITCHES):
        stack, reason = (quarantine, maps.Reason.QUARANTINE) if to_q else (passing, maps.Reason.PASS)
        before = counter(dp, device_id, reason)
        t0 = time.monotonic_ns()
        p0 = time.perf_counter_ns()
        dp.set_stack(dev.name, stack)
        call = time.perf_counter_ns() - p0
        seen = None
        deadline = t0 + 200_000_000
        while True:
            now = time.monotonic_ns()
            if counter(dp, device_id, reason) > before:
                seen = now - t0
                break
            if now > deadline:
                break
            os.sched_yield()
        records.append(("to_quarantine" if to_q else "to_pass", t0, call, seen))
        time.sleep(max(0.0, (t0 + HOLD_MS * 1_000_000 - time.monotonic_ns()) / 1e9))
        to_q = not to_q
    dp.set_stack(dev.name, passing)
    return records


def effects(records, seqs, ts, gap_ns):
    """Effect latency per switch from the receiver's record (sorted by send time)."""
    import bisect
    order = sorted(range(len(ts)), key=ts.__getitem__)
    sent = [ts[i] for i in order]
    out = {"to_quarantine": [], "to_pass": []}
    for k, (direction, t0, _call, _seen) in enumerate(records):
        t_next = records[k + 1][1] if k + 1 < len(records) else t0 + HOLD_MS * 1_000_000
        if direction == "to_quarantine":
            j = bisect.bisect_left(sent, t_next) - 1        # last arrived before the next switch
            if j >= 0:
                out[direction].append(max(0, sent[j] + gap_ns - t0))
        else:
            j = bisect.bisect_left(sent, t0)                 # first arrived after the call began
            if j < len(sent) and sent[j] < t_next:
                out[direction].append(sent[j] - t0)
    return out


def report(variant: str, records, eff) -> None:
    us = lambda xs: [x / 1000 for x in xs]
    calls = us([r[2] for r in records])
    seen = us([r[3] for r in records if r[3] is not None])
    missed = sum(1 for r in records if r[3] is None)
    for metric, xs in (("call", calls), ("counter_seen", seen)):
        emit(BENCH, f"{metric}_p50_{variant}", round(percentile(xs, 50), 1), "us", n=len(xs))
        emit(BENCH, f"{metric}_p99_{variant}", round(percentile(xs, 99), 1), "us", n=len(xs),
             **({"never_seen": missed} if metric == "counter_seen" else {}))
    both = us(eff["to_quarantine"] + eff["to_pass"])
    for name, xs in (("effect", both), ("effect_to_quarantine", us(eff["to_quarantine"])),
                     ("effect_to_pass", us(eff["to_pass"]))):
        emit(BENCH, f"{name}_p50_{variant}", round(percentile(xs, 50), 1), "us", n=len(xs),
             resolution_us=GAP_US)
        emit(BENCH, f"{name}_p99_{variant}", round(percentile(xs, 99), 1), "us", n=len(xs),
             resolution_us=GAP_US, **({"target": "<= 1000"} if name == "effect" else {}))


def main() -> int:
    from appliance.policy import profiles
    camera_normal = profiles.load_all()["camera"].stack("normal")
    xdp_only = {k: v for k, v in camera_normal.items() if k not in ("conn_limit", "auth_gate")}
    quarantine = {"quarantine": {"management": True}}
    variants = {"profile": camera_normal, "xdp_only": xdp_only}
    with common.lab("sw", devices=1) as (lab, dp), tempfile.TemporaryDirectory() as tmp:
        dev = lab.devices[0]
        dp.apply(dataplane.DeviceSpec(dev.name, dev.mac, dev.ip, camera_normal))
        for variant, passing in variants.items():
            out = os.path.join(tmp, f"recv-{variant}")
            receiver = sender = None
            try:
                receiver = common.ns_popen(lab.namespaces["inet"], [sys.executable, "-c", RECEIVER, out,
                                                                   str(PORT)], start_new_session=True)
                deadline = time.monotonic() + 10
                while not os.path.exists(out + ".ready") and time.monotonic() < deadline:
                    time.sleep(0.02)
                sender = common.ns_popen(dev.namespace, [sys.executable, "-c", SENDER, common.lab_only(DST),
                                                        str(PORT), str(GAP_US)], start_new_session=True)
                time.sleep(0.5)     # ARP, conntrack entry, steady state
                records = run_variant(dp, dev, passing, quarantine)
                time.sleep(0.05)
            finally:
                common.stop(sender, signal.SIGTERM)
                common.stop(receiver, signal.SIGTERM)
            raw = array("q")
            with open(out, "rb") as f:
                raw.frombytes(f.read())
            half = len(raw) // 2
            seqs, ts = raw[:half], raw[half:]
            eff = effects(records, seqs, ts, GAP_US * 1000)
            sent_total = (max(seqs) + 1) if seqs else 0
            emit(BENCH, f"probes_{variant}", len(seqs), "packets", sent=sent_total,
                 duration_s=round((records[-1][1] - records[0][1]) / 1e9, 2))
            report(variant, records, eff)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
