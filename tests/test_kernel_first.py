"""Kernel events go before the work queued ahead of them on the loop: the supervisor asks
before each telemetry report and each of the ticker's steps (`Supervisor.kernel_first`, wired
by appliance.run), and the ring buffer answers from its shared pages (`RingBuffer.pending`)."""
from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path

import pytest
from fakes import supervisor
from test_web import aiotest

from appliance import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

CAMERA = ("02:4b:00:00:00:01", "198.18.0.10", "camera")
ATTACK = {"device": "camera1", "reason": "brute_force", "action": "blocked", "src": "198.19.0.66",
          "dst": "198.18.0.10", "dst_port": 23, "proto": 6, "count": 11, "suppressed": 0}


@pytest.fixture
def sup(tmp_path):
    s = supervisor(tmp_path, camera1=CAMERA)
    s.kernel_first = run.kernel_first(s, s.dp)
    yield s
    s.store.close()


def test_an_attack_waiting_in_the_ring_is_enforced_before_the_next_report(sup):
    seen: list[str] = []
    evaluate = sup._evaluate
    sup._evaluate = lambda stimulus: (seen.append(stimulus.kind), evaluate(stimulus))[1]
    sup.dp.waiting_events = [ATTACK]
    sup.on_telemetry("camera1", {"recording": True})
    assert seen[0] == "alert" and seen[-1] == "telemetry"     # (the posture's own in between)
    assert sup.posture("camera1") == "attack"
    assert not sup.dp.events_pending()


def test_without_events_waiting_a_report_reads_nothing(sup):
    reads = []
    sup.dp.events = lambda **kw: reads.append(kw) or []
    sup.on_telemetry("camera1", {"recording": True})
    assert reads == [] and sup.posture("camera1") == "normal"


def test_a_report_handled_while_the_events_are_read_does_not_read_them_again(sup):
    """Acting on an event may hand the loop a report (a rule's command answered at once by an
    adapter): the ring is read once, not from inside its own reading."""
    calls = []
    on_alerts = sup.on_kernel_alerts

    def alerts(batch):
        batch = list(batch)
        calls.append(batch)
        sup.dp.waiting_events = [ATTACK]
        sup.on_telemetry("camera1", {"recording": True})
        on_alerts(batch)
    sup.on_kernel_alerts = alerts
    sup.dp.waiting_events = [ATTACK]
    sup.on_telemetry("camera1", {"recording": True})
    assert len(calls) == 1


@aiotest
async def test_an_attack_arriving_during_a_ticker_step_waits_for_that_step_only(sup, monkeypatch):
    """The ticker's steps ran as one callback of the loop (4-6 ms at 1,000 devices): an attack
    seen during the first step is acted on before the second, not after the tick."""
    order: list[str] = []

    def first_step():
        order.append("postures")
        sup.dp.waiting_events = [ATTACK]        # the kernel reports meanwhile
    monkeypatch.setattr(sup, "_expire_postures", first_step)
    monkeypatch.setattr(sup, "_expire_polls", lambda: order.append("polls"))
    on_alerts = sup.on_kernel_alerts
    monkeypatch.setattr(sup, "on_kernel_alerts", lambda alerts: (order.append("attack"), on_alerts(alerts)))
    ticker = asyncio.ensure_future(sup._ticker())
    try:
        await asyncio.sleep(0.4)
    finally:
        sup._stop.set()
        await asyncio.wait_for(ticker, 2)
    assert order[:3] == ["postures", "attack", "polls"]
    assert sup.posture("camera1") == "attack"


def test_a_failing_read_of_the_ring_neither_stops_the_report_nor_the_ticker(sup, caplog):
    def broken(**kw):
        raise OSError(9, "Bad file descriptor")
    sup.dp.waiting_events = [ATTACK]
    sup.dp.events = broken
    sup.on_telemetry("camera1", {"recording": True})
    assert sup.counters["telemetry"] == 1
    assert "reading them before other work failed" in caplog.text


def test_the_traffic_charts_read_each_device_after_the_kernel_events(sup, tmp_path):
    """The charts' reading is a tick's longest step at 1,000 devices (28 devices, 1-2 ms)."""
    from appliance.supervisor.traffic import Traffic
    for i in range(4):
        sup.dp.apply(type(sup.dp.devices["camera1"])(f"cam{i}", f"02:4b:00:00:01:{i:02x}",
                                                     f"198.18.1.{i + 1}", {}))
    asked = []
    charts = Traffic(tmp_path / "traffic.bin")
    charts.tick(sup.dp, 1_000_009.0, 1.0, lambda: asked.append(1))    # late in its window: all due
    assert len(asked) == len(sup.dp.devices) >= 5


@pytest.mark.lab
def test_the_ring_says_it_holds_events_until_they_are_read():
    import dispatcher_paths as paths
    from common import PinnedPath, bpf, dataplane, maps
    instance = f"tkf{secrets.token_hex(3)}"
    path = None
    try:
        path = PinnedPath(instance)
        paths.prepare("one", path)
        ring = bpf.RingBuffer(f"{path.pin_dir}/{maps.RINGBUF}")
        try:
            assert not ring.pending()
            spoofed = next(c for c in paths.cases() if c.name == "spoofed")
            bpf.prog_test_run(path.prog_fds[spoofed.program], spoofed.packets[0], 1)   # reports
            assert ring.pending()
            assert len(ring.drain(consume=False)) == 1
            assert not ring.pending()           # read, not yet given back: nothing new
            ring.consume_read()
            assert not ring.pending()
            bpf.prog_test_run(path.prog_fds[spoofed.program], spoofed.packets[0], 1)
            assert ring.pending()
        finally:
            ring.close()
    finally:
        if path is not None:
            path.close()
        dataplane.remove_pins(instance)


def test_the_supervisor_takes_the_gil_back_within_half_a_millisecond(monkeypatch):
    """`kalki run` shortens the interval after which a thread holding the GIL must give it to
    the loop (5 ms by default): an enforcement lets it go at each system call."""
    monkeypatch.setattr(run, "load", lambda path: object())
    monkeypatch.setattr(run, "one_malloc_arena", lambda: None)
    monkeypatch.setattr(run.logging, "basicConfig", lambda **kw: None)
    monkeypatch.setattr(run.asyncio, "run", lambda coro: coro.close())
    monkeypatch.setattr(run, "serve", lambda cfg: asyncio.sleep(0))
    before = sys.getswitchinterval()
    try:
        assert run.main("kalki.toml") == 0
        assert sys.getswitchinterval() == pytest.approx(run.SWITCH_INTERVAL_S) == 0.0005
    finally:
        sys.setswitchinterval(before)
