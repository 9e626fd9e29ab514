"""A decision is timed from its stimulus itself: a kernel alert from the event's own
bpf_ktime_get_ns() (CLOCK_MONOTONIC, as time.monotonic_ns()), not from when the supervisor read
the ring buffer; and the record carries its moments on that clock, so a measurement can start
elsewhere (bench/bench_supervisor.py: at the device's publish). Lab-free: the real supervisor
and store with a fake data path."""
from __future__ import annotations

import time

import pytest
from fakes import supervisor

from appliance.supervisor.core import event_ns

CAMERA = ("02:42:aa:00:00:01", "198.18.0.10", "camera")
BRUTE_FORCE = {"reason": "brute_force", "umbox": "brute_force", "src": "198.19.0.66",
               "dst": "198.18.0.10", "dst_port": 23, "proto": 6, "action": "dropped", "count": 10}


@pytest.fixture
def sup(tmp_path):
    s = supervisor(tmp_path, camera1=CAMERA)
    yield s
    s.store.close()


def attack_decision(sup) -> dict:
    return next(d for d in sup.store.decisions(limit=20, kind="decision")
                if d.get("rule") == "device-under-attack")


def test_a_kernel_alert_is_timed_from_the_event_s_own_time(sup):
    ts = time.monotonic_ns() - 3_000_000          # the packet, 3 ms before the ring was read
    sup.on_kernel_alerts([("camera1", "brute-force", {**BRUTE_FORCE, "ts_ns": ts})])
    assert sup.posture("camera1") == "attack"
    d = attack_decision(sup)
    clock, timing = d["monotonic_ns"], d["timing_ms"]
    assert clock["stimulus"] == ts
    assert ts < clock["xdp"] <= clock["enforce"] <= time.monotonic_ns()
    assert timing["decide"] >= 3.0 and timing["enforce"] >= 3.0
    assert timing["enforce"] == round((clock["enforce"] - ts) / 1e6, 3)


def test_without_a_usable_event_time_the_reading_is_the_stimulus(sup):
    before = time.monotonic_ns()
    sup.on_kernel_alerts([("camera1", "brute-force", dict(BRUTE_FORCE))])      # no ts_ns
    assert before <= attack_decision(sup)["monotonic_ns"]["stimulus"] <= time.monotonic_ns()


@pytest.mark.parametrize("event, expected", [
    ({"ts_ns": 900}, 900),
    ({}, 1000),                     # no time: the reading
    ({"ts_ns": 0}, 1000),           # never set
    ({"ts_ns": 1001}, 1000),        # later than its reading: not this clock
    ({"ts_ns": True}, 1000),
    ({"ts_ns": "900"}, 1000),
])
def test_event_ns(event, expected):
    assert event_ns(event, 1000) == expected
