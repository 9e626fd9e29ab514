"""What the supervisor does over and over leaves nothing for the collector: no exception,
traceback, frame, task or closure in a cycle. A light that is unplugged or refuses is polled
again and again (backing off to a minute), the default-login check tries every port of every
new device, and every device report is an MQTT message; each used to leave a cycle (55
objects a failed poll, 43 a refused login try, a closure and its cells per message), which
the supervisor's collections then walked (bench_supervisor at 1,000 devices: about 1,500
objects every 15 s from the polls, 37,482 closures in one run from the messages). (Python
3.11's selector transport keeps a bound method of itself: 8 small objects per connection
made, answered or not, which this project cannot break without reaching into asyncio.)
"""
from __future__ import annotations

import asyncio
import gc
import socket
import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.matcher import MQTTMatcher

from appliance.supervisor import logins
from appliance.telemetry import adapters, mqtt

POLLS = 5


class Device:
    """What the adapter needs of the supervisor: one light at 127.0.0.1, its availability."""

    def __init__(self):
        self.availability: list[str] = []
        self.adapter = adapters.HueAdapter(
            {"light1": {"user": "kalki"}},
            devices=lambda: {"light1": {"ip": "127.0.0.1", "type": "light", "approved": True,
                                        "posture": "normal"}},
            profile=lambda _t: None, on_report=lambda *_: None,
            on_availability=lambda _n, state: self.availability.append(state), loop=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_listener():
    """Accepts connections (the kernel's backlog does) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def error_server():
    """Answers every request with 503."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    stop = threading.Event()

    def serve():
        s.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = s.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield s.getsockname()[1]
    stop.set()
    t.join()
    s.close()


HEAVY = ("frame", "traceback", "Task", "Future", "coroutine", "Context", "function", "cell")


def garbage_after(step) -> dict:
    """{kind: count} of the heavy objects the collector finds after POLLS runs of step()."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(step())     # warm: first-use caches
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)      # what a pass finds is kept in gc.garbage to be named
        try:
            for _ in range(POLLS):
                loop.run_until_complete(step())
            gc.collect()
            found: dict[str, int] = {}
            for o in gc.garbage:
                kind = "exception" if isinstance(o, BaseException) else type(o).__name__
                if kind in HEAVY or kind == "exception":
                    found[kind] = found.get(kind, 0) + 1
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    finally:
        loop.close()
    return found


def port_of(kind: str, request) -> int:
    return {"refused": free_port,
            "timed out": lambda: request.getfixturevalue("silent_listener"),
            "error status": lambda: request.getfixturevalue("error_server")}[kind]()


@pytest.mark.parametrize("kind", ["refused", "timed out", "error status"])
def test_a_failed_poll_leaves_no_cycle_and_the_light_is_offline(monkeypatch, kind, request):
    port = port_of(kind, request)
    real = adapters.http
    monkeypatch.setattr(adapters, "http", lambda method, ip, path, body=None, port_=80:
                        real(method, ip, path, body, port=port))
    monkeypatch.setattr(adapters, "TIMEOUT", 0.05)
    device = Device()
    found = garbage_after(lambda: device.adapter._poll_one("light1"))
    assert device.availability and set(device.availability) == {"offline"}
    assert device.adapter._failures["light1"] == POLLS + 1
    assert found == {}, f"in cycles after {POLLS} failed polls ({kind}): {found}"


@pytest.mark.parametrize("service", ["telnet", "http_form"])
@pytest.mark.parametrize("kind", ["refused", "timed out"])
def test_a_failed_login_try_leaves_no_cycle(monkeypatch, kind, service, request):
    port = port_of(kind, request)
    # a refused port is said at once: a try's time long enough that a stall on a busy machine
    # cannot make it "inconclusive"; a silent one waits the whole of it
    monkeypatch.setattr(logins, "TRY_SECONDS", 2.0 if kind == "refused" else 0.05)
    outcomes = []

    async def step():
        outcomes.append((await logins.try_login({"service": service, "port": port, "user": "admin",
                                                 "password": "admin", "path": "/"}, "127.0.0.1"))["outcome"])
    found = garbage_after(step)
    assert set(outcomes) == {"unreachable" if kind == "refused" else "inconclusive"}
    assert found == {}, f"in cycles after {POLLS} failed tries ({kind}, {service}): {found}"


FILTERS = ["a/b", "a/+", "a/#", "#", "+/b", "+/+", "a/b/c", "$SYS/#", "$SYS/+", "+/+/c", "a//b"]
TOPICS = ["a/b", "a/b/c", "a", "x/b", "$SYS/broker", "$SYS", "a//b", "a/b/c/d", "/b", "kalki/light1"]


def test_the_bus_s_matcher_answers_as_paho_s():
    theirs, ours = MQTTMatcher(), mqtt._Matcher()
    for f in FILTERS:
        theirs[f] = ours[f] = f
    for topic in TOPICS:
        assert sorted(ours.iter_match(topic)) == sorted(theirs.iter_match(topic)), topic
    del theirs["a/#"], ours["a/#"]
    assert sorted(ours.iter_match("a/b/c")) == sorted(theirs.iter_match("a/b/c"))


def test_a_device_report_through_paho_leaves_no_cycle():
    """paho's own dispatch of a received message (its _handle_on_message, which asks the
    matcher), then the bus's checks and the supervisor's callback, for device reports."""
    reports = []
    bus = mqtt.Bus("127.0.0.1", free_port(), "kalki", "x", known_device=lambda name: True,
                   on_telemetry=lambda device, data: reports.append(device),
                   on_availability=lambda *a: None)
    try:
        assert isinstance(bus.client._on_message_filtered, mqtt._Matcher)

        async def step():
            for i in range(20):
                message = paho.MQTTMessage(topic=f"kalki/light{i}".encode())
                message.payload = b'{"on": true, "brightness": 40}'
                bus.client._handle_on_message(message)
        found = garbage_after(step)
    finally:
        bus.close()
    assert len(reports) == 20 * (POLLS + 1)
    assert found == {}, f"in cycles after {20 * POLLS} reports: {found}"
