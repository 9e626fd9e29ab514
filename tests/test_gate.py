"""Authentication gate in front of an emulated device, all on loopback."""

import asyncio
import base64
import json
import os
import shlex
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from appliance.dataplane import gate as gate_mod
from appliance.dataplane.gate import (
    Credentials,
    FailureTracker,
    Gate,
    command_blocker,
    device_head,
    hash_password,
    original_destination,
)
from lab.device_services import Device
from lab.device_services import serve as serve_device

REPO = Path(__file__).resolve().parents[1]
GATE_USER, GATE_PASSWORD = "kalki", "gate-pass"
DEVICE_PASSWORD = "dev-pass"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- FailureTracker

def test_tracker_blocks_after_max_failures_and_calls_on_block_once():
    clock, calls = FakeClock(), []
    tracker = FailureTracker(3, window=60, block_seconds=300, on_block=lambda *a: calls.append(a),
                             clock=clock)
    assert [tracker.record_failure("10.0.0.9") for _ in range(3)] == [False] * 3
    assert not tracker.is_blocked("10.0.0.9")
    assert tracker.record_failure("10.0.0.9") is True
    assert tracker.is_blocked("10.0.0.9") and not tracker.is_blocked("10.0.0.8")
    assert calls == [("10.0.0.9", 300)]
    clock.now += 299
    assert tracker.is_blocked("10.0.0.9")
    clock.now += 1
    assert not tracker.is_blocked("10.0.0.9")


def test_tracker_window_expiry():
    clock = FakeClock()
    tracker = FailureTracker(3, window=60, clock=clock)
    for _ in range(3):
        tracker.record_failure("10.0.0.9")
        clock.now += 10
    clock.now += 31  # the first failure is now 61 s old
    assert tracker.failures("10.0.0.9") == 2
    assert tracker.record_failure("10.0.0.9") is False
    assert tracker.record_failure("10.0.0.9") is True


def test_tracker_runs_block_callback_once_per_window():
    clock, calls = FakeClock(), []
    tracker = FailureTracker(1, window=60, block_seconds=10, on_block=lambda *a: calls.append(a), clock=clock)
    assert tracker.record_failure("ip") is False and tracker.record_failure("ip") is True
    clock.now += 20  # block over, same window: blocked again but no second command
    tracker.record_failure("ip")
    assert tracker.record_failure("ip") is True and len(calls) == 1
    clock.now += 60
    tracker.record_failure("ip")
    assert tracker.record_failure("ip") is True and len(calls) == 2


# ---------------------------------------------------------------- helpers

def test_original_destination_parses_sockaddr_in():
    class FakeSocket:
        def getsockopt(self, level, option, size):
            assert (level, option, size) == (socket.SOL_IP, 80, 16)
            return struct.pack("!HH4s8x", socket.AF_INET, 8080, socket.inet_aton("192.168.50.7"))

    assert original_destination(FakeSocket()) == ("192.168.50.7", 8080)


def test_device_head_strips_gate_auth_and_renames_device_auth():
    lines = [b"GET /status HTTP/1.1", b"Host: cam", b"Authorization: Basic Z2F0ZQ==",
             b"X-Device-Authorization: Bearer t0k"]
    assert device_head(lines) == b"GET /status HTTP/1.1\r\nHost: cam\r\nAuthorization: Bearer t0k\r\n\r\n"
    assert device_head(lines[:3]) == b"GET /status HTTP/1.1\r\nHost: cam\r\n\r\n"


def test_command_blocker_runs_argv_without_shell(tmp_path):
    out = tmp_path / "blocked"
    script = "import sys; open(sys.argv[1], 'w').write(' '.join(sys.argv[2:]))"
    template = shlex.join([sys.executable, "-c", script, str(out)]) + " {ip} {seconds}"

    async def main():
        command_blocker(template)("10.0.0.9; rm -rf /", 300)
        for _ in range(200):
            if out.exists():
                return
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert out.read_text() == "10.0.0.9; rm -rf / 300"


# ---------------------------------------------------------------- gate end to end

async def request(port: int, data: bytes) -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def get(path: str, **headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: cam1"] + [f"{k.replace('_', '-')}: {v}" for k,
                                                      v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def run_gate(scenario, max_failures=5, head_timeout=10.0):
    async def main():
        device = Device("cam1", "camera", "admin", DEVICE_PASSWORD)
        device_server = (await serve_device(device, "127.0.0.1", 0, services=["http"]))["http"]
        calls = []
        tracker = FailureTracker(max_failures, 60, 300, on_block=lambda *a: calls.append(a))
        gate = Gate(Credentials(GATE_USER, hash_password(GATE_PASSWORD)), tracker,
                    target_override=("127.0.0.1", device_server.sockets[0].getsockname()[1]),
                    head_timeout=head_timeout)
        gate_server = await gate_mod.serve(gate, "127.0.0.1", 0)
        try:
            return await scenario(gate_server.sockets[0].getsockname()[1], device, calls)
        finally:
            gate_server.close()
            device_server.close()
    return asyncio.run(main())


def test_gate_without_or_with_wrong_credentials_answers_401():
    async def scenario(port, device, calls):
        status, headers, _ = await request(port, get("/"))
        assert status == 401 and headers["www-authenticate"] == 'Basic realm="kalki-gate"'
        status, _, _ = await request(port, get("/", Authorization=basic(GATE_USER, "wrong")))
        assert status == 401
        status, _, _ = await request(port, get("/", Authorization="Bearer nope"))
        assert status == 401
        assert device.stats["http_requests"] == 0  # nothing reached the device
    run_gate(scenario)


def test_gate_with_right_credentials_proxies_to_device():
    async def scenario(port, device, calls):
        gate_auth = basic(GATE_USER, GATE_PASSWORD)
        status, _, body = await request(port, get("/", Authorization=gate_auth))
        assert status == 200 and json.loads(body) == {"device": "cam1", "type": "camera"}
        # The gate's credentials are not passed on, so the device itself says no ...
        status, _, _ = await request(port, get("/status", Authorization=gate_auth))
        assert status == 401
        # ... unless the client supplies the device's own credentials separately.
        status, _, body = await request(port, get("/status", Authorization=gate_auth,
                                                  X_Device_Authorization=basic("admin", DEVICE_PASSWORD)))
        assert status == 200 and json.loads(body) == {"recording": True}
        assert device.stats["http_requests"] == 3
    run_gate(scenario)


def test_gate_proxies_request_body():
    async def scenario(port, device, calls):
        body = json.dumps({"user": "admin", "password": DEVICE_PASSWORD}).encode()
        head = (f"POST /login HTTP/1.1\r\nHost: cam1\r\nAuthorization: {basic(GATE_USER, GATE_PASSWORD)}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        status, _, data = await request(port, head + body)
        assert status == 200 and json.loads(data)["ok"] is True
    run_gate(scenario)


def test_gate_blocks_after_repeated_failures():
    async def scenario(port, device, calls):
        wrong = get("/", Authorization=basic(GATE_USER, "guess"))
        assert [(await request(port, wrong))[0] for _ in range(3)] == [401, 401, 403]
        assert calls == [("127.0.0.1", 300)]
        status, _, _ = await request(port, get("/", Authorization=basic(GATE_USER, GATE_PASSWORD)))
        assert status == 403  # even the right password, while blocked
        assert calls == [("127.0.0.1", 300)] and device.stats["http_requests"] == 0
    run_gate(scenario, max_failures=2)


def test_gate_rejects_oversized_head_and_slow_head():
    async def scenario(port, device, calls):
        status, _, _ = await request(port, b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n")
        assert status == 400
        status, _, _ = await request(port, b"GET / HTTP/1.1\r\n")  # never finishes the head
        assert status == 408
    run_gate(scenario, head_timeout=0.2)


def test_gate_without_original_destination_answers_502():
    async def main():
        gate = Gate(Credentials(GATE_USER, hash_password(GATE_PASSWORD)), FailureTracker())
        server = await gate_mod.serve(gate, "127.0.0.1", 0)
        try:
            return await request(server.sockets[0].getsockname()[1],
                                 get("/", Authorization=basic(GATE_USER, GATE_PASSWORD)))
        finally:
            server.close()
    assert asyncio.run(main())[0] == 502


def test_gate_cli_proxies_and_exits_on_sigterm(tmp_path):
    async def start_device():
        device = Device("plug1", "plug")
        return (await serve_device(device, "127.0.0.1", 0, services=["http"]))["http"]

    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"user": GATE_USER, "password_sha256": hash_password(GATE_PASSWORD)}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gate_port = s.getsockname()[1]

    async def main():
        device_server = await start_device()
        device_port = device_server.sockets[0].getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "appliance.dataplane.gate", "--listen", f"127.0.0.1:{gate_port}",
            "--credentials-file", str(creds), "--target-override", f"127.0.0.1:{device_port}",
            cwd=REPO, stderr=asyncio.subprocess.PIPE)
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    status, _, body = await request(gate_port, get("/", Authorization=basic(GATE_USER,
                                                                                            GATE_PASSWORD)))
                    break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            assert status == 200 and json.loads(body)["device"] == "plug1"
            os.kill(proc.pid, signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 5) == 0
            log = (await proc.stderr.read()).decode()
            assert "allowed client=127.0.0.1" in log
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            device_server.close()

    asyncio.run(main())
