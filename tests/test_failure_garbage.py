"""A failed poll or login try leaves no exception, traceback, frame or task for the collector.
A light that is unplugged or refuses is polled again and again (backing off to a minute), and
the default-login check tries every port of every new device; each failure used to leave them
in a cycle: 55 objects a poll, about 1,500 every 15 s at 1,000 devices (bench_supervisor),
which the supervisor's full collections then walked. (Python 3.11's selector transport keeps
a bound method of itself: 8 small objects per connection made, answered or not, which this
project cannot break without reaching into asyncio.)

Real sockets on loopback only: a port nobody listens on, a listener that never answers, one
that answers an error status."""
from __future__ import annotations

import asyncio
import gc
import socket
import threading

import pytest

from appliance.supervisor import logins
from appliance.telemetry import adapters

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


HEAVY = ("frame", "traceback", "Task", "Future", "coroutine", "Context")


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
    monkeypatch.setattr(logins, "TRY_SECONDS", 0.05)
    outcomes = []

    async def step():
        outcomes.append((await logins.try_login({"service": service, "port": port, "user": "admin",
                                                 "password": "admin", "path": "/"}, "127.0.0.1"))["outcome"])
    found = garbage_after(step)
    assert set(outcomes) == {"unreachable" if kind == "refused" else "inconclusive"}
    assert found == {}, f"in cycles after {POLLS} failed tries ({kind}, {service}): {found}"
