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

import h11

from appliance.dataplane import gate as gate_mod
from appliance.dataplane import gatepolicy
from appliance.dataplane.gate import (
    Credentials,
    FailureTracker,
    Gate,
    command_blocker,
    device_headers,
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


def test_device_headers_strip_gate_auth_and_rename_device_auth():
    headers = [(b"Host", b"cam"), (b"Authorization", b"Basic Z2F0ZQ=="),
               (b"X-Device-Authorization", b"Bearer t0k"), (b"Expect", b"100-continue")]
    assert device_headers(headers, auth=True, drop_expect=True) == [
        (b"Host", b"cam"), (b"Authorization", b"Bearer t0k")]
    assert device_headers(headers[:2], auth=True) == [(b"Host", b"cam")]
    # without auth_gate the client's own Authorization is the device's business
    assert device_headers(headers, auth=False) == headers


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
        status, _, _ = await request(port, b"GET / HTTP/1.1\r\nHost: cam1\r\nX-Pad: " + b"a" * 20000
                                     + b"\r\n\r\n")
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


# ---------------------------------------------------------------- api_filter, token_guard, policies

def test_rules_and_request_paths():
    rule = gatepolicy.compile_rule("PUT /api/*/lights/*/state")
    assert rule.matches("PUT", "/api/u1/lights/1/state")
    assert not rule.matches("GET", "/api/u1/lights/1/state")
    assert not rule.matches("PUT", "/api/u1/x/lights/1/state")        # * stays within a segment
    assert not rule.matches("PUT", "/api/u1/lights/1/state/x")
    assert gatepolicy.compile_rule("GET *").matches("GET", "/any/where")
    assert gatepolicy.compile_rule("* /api/**").matches("DELETE", "/api/a/b/c")
    assert not gatepolicy.compile_rule("GET /").matches("HEAD", "/")    # GET does not imply HEAD
    for bad in ("GET", "get /", "GET api", "GET /a/../b", "GET /a//b", "GET /a?x=1", "GET /***", 7):
        try:
            gatepolicy.compile_rule(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
    assert gatepolicy.request_path("/api/u%31/lights?x=/..") == "/api/u1/lights"
    assert gatepolicy.request_path("http://light1/api/x") == "/api/x"
    for unsafe in ("/api/../x", "/api/%2e%2e/x", "/a//b", "/a%2f..%2fb", "/a\\b", "/%00", "light1:80",
                   "/%ff"):
        assert gatepolicy.request_path(unsafe) is None, unsafe


async def read_response(reader: asyncio.StreamReader, to_head: bool = False) -> tuple[int, dict, bytes]:
    """One response off a kept-open connection (Content-Length or chunked; `to_head`: a HEAD's)."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = raw[:-4].decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    status = int(status_line.split()[1])
    if to_head or status in (204, 304) or 100 <= status < 200:
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")      # (no trailers in these tests)
        return status, headers, body
    return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))


def http_request(method: str, path: str, body: bytes = b"", keep_alive: bool = True, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: dev1"]
    lines.append(f"Connection: {'keep-alive' if keep_alive else 'close'}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class EchoDevice:
    """A fake device that speaks real HTTP/1.1 (h11): keep-alive, chunked bodies both ways.
    It answers each request with what it received, as JSON, chunked when asked (?chunked),
    and with any status it is asked for (?status=401)."""

    def __init__(self):
        self.requests: list[dict] = []

    async def handle(self, reader, writer):
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = None, b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                target = request.target.decode()
                seen = {"method": request.method.decode(), "target": target, "body": body.decode("latin-1"),
                        "headers": [[k.decode(), v.decode()] for k, v in request.headers.raw_items()]}
                self.requests.append(seen)
                payload = json.dumps(seen).encode()
                status = int(target.split("status=")[1][:3]) if "status=" in target else 200
                if "chunked" in target:
                    head = [("Transfer-Encoding", "chunked")]
                    parts = [payload[:10], payload[10:]]
                else:
                    head, parts = [("Content-Length", str(len(payload)))], [payload]
                if request.method == b"HEAD":
                    parts = []
                writer.write(conn.send(h11.Response(status_code=status, headers=head)))
                for part in parts:
                    writer.write(conn.send(h11.Data(data=part)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            pass
        finally:
            writer.close()


def run_policy_gate(tmp_path, scenario, policy: dict | None, device=None, **gate_args):
    """A gate with a policy directory in front of `device` (the lab's Device, or an
    EchoDevice); `policy` (or nothing, None) is the device's policy file."""
    async def main():
        the_device = device or Device("light1", "light", "admin", DEVICE_PASSWORD, hue_user="hue-right")
        if isinstance(the_device, EchoDevice):
            server = await asyncio.start_server(the_device.handle, "127.0.0.1", 0)
        else:
            server = (await serve_device(the_device, "127.0.0.1", 0, services=["http"]))["http"]
        target = ("127.0.0.1", server.sockets[0].getsockname()[1])
        files = gatepolicy.PolicyFiles(tmp_path / "policy")
        if policy is not None:
            files.write("127.0.0.1", {"port": target[1], **policy})
        seen = {"alerts": [], "token_blocks": [], "auth_blocks": []}
        tracker = FailureTracker(5, 60, 300, on_block=lambda *a: seen["auth_blocks"].append(a))
        gate = Gate(Credentials(GATE_USER, hash_password(GATE_PASSWORD)), tracker, target_override=target,
                    policies=files, on_alert=lambda *a: seen["alerts"].append(a),
                    on_token_block=lambda *a: seen["token_blocks"].append(a), **gate_args)
        gate_server = await gate_mod.serve(gate, "127.0.0.1", 0)
        port = gate_server.sockets[0].getsockname()[1]
        try:
            return await scenario(port, the_device, gate, seen, files, target)
        finally:
            gate_server.close()
            server.close()
    return asyncio.run(main())


async def at_eof(reader) -> bool:
    """Whether the gate has closed the connection (read nothing more, then the end)."""
    return await asyncio.wait_for(reader.read(), 5) == b""


def test_api_filter_checks_every_request_on_a_keep_alive_connection(tmp_path):
    async def scenario(port, device, gate, seen, files, target):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(http_request("GET", "/"))
        status, headers, body = await read_response(reader)
        assert status == 200 and json.loads(body)["device"] == "light1"
        assert headers["connection"] == "keep-alive"
        writer.write(http_request("GET", "/"))          # the same connection, still allowed
        assert (await read_response(reader))[0] == 200
        writer.write(http_request("PUT", "/state", b'{"on": true}'))
        status, headers, _ = await read_response(reader)
        assert status == 403 and headers["connection"] == "close"
        assert await at_eof(reader)
        writer.close()
        assert device.stats["http_requests"] == 2 and device.state["on"] is False   # never saw the PUT
        assert seen["alerts"] == [("api-denied", "127.0.0.1", f"127.0.0.1:{target[1]}",
                                   {"method": "PUT", "path": "/state", "device": "", "count": 1})]
        assert gate.stats["api-denied"] == 1 and gate.stats["allowed"] == 2
    run_policy_gate(tmp_path, scenario, {"allow": ["GET *"]})


def test_api_filter_checks_pipelined_requests_too(tmp_path):
    async def scenario(port, device, gate, seen, files, target):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(http_request("GET", "/") + http_request("PUT", "/state", b'{"on": true}')
                     + http_request("GET", "/"))
        assert (await read_response(reader))[0] == 200
        assert (await read_response(reader))[0] == 403
        assert await at_eof(reader)
        writer.close()
        assert device.stats["http_requests"] == 1 and device.state["on"] is False
    run_policy_gate(tmp_path, scenario, {"allow": ["GET *"]})


def test_api_filter_lets_the_hue_state_change_through_and_nothing_near_it(tmp_path):
    async def scenario(port, device, gate, seen, files, target):
        async def put(path):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(http_request("PUT", path, b'{"on": true}', keep_alive=False))
            status = (await read_response(reader))[0]
            writer.close()
            return status
        for path in ("/api/hue-right/lights/1/state/../../../config", "/api/hue-right/lights/1/%2e%2e/state",
                     "/api/hue-right//lights/1/state", "/api/hue-right/lights/1/state/x"):
            assert await put(path) == 403, path
        assert device.stats["http_requests"] == 0
        assert await put("/api/hue-right/lights/1/state") == 200 and device.state["on"] is True
        # one alert per source and device a minute, the rest counted for the next one
        assert len(seen["alerts"]) == 1 and gate.stats["api-denied"] == 4
    run_policy_gate(tmp_path, scenario, {"allow": ["GET *", "PUT /api/*/lights/*/state"]})


def test_alerts_are_limited_per_source_and_device_and_count_the_rest():
    clock, alerts = FakeClock(), []
    gate = Gate(None, FailureTracker(), on_alert=lambda *a: alerts.append(a), clock=clock)
    for _ in range(3):
        gate.alert("api-denied", "10.0.0.9", "10.0.0.2:80", {"path": "/x"})
    gate.alert("api-denied", "10.0.0.8", "10.0.0.2:80", {"path": "/x"})
    clock.now += gate_mod.ALERT_INTERVAL
    gate.alert("api-denied", "10.0.0.9", "10.0.0.2:80", {"path": "/y"})
    assert [(a[1], a[3]["count"]) for a in alerts] == [("10.0.0.9", 1), ("10.0.0.8", 1), ("10.0.0.9", 3)]


def test_content_length_and_chunked_bodies_pass_intact(tmp_path):
    async def scenario(port, device, gate, seen, files, target):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = bytes(range(256)) * 300      # 76,800 bytes, more than one read
        writer.write(http_request("POST", "/upload", body))
        status, _, answer = await read_response(reader)
        assert status == 200 and json.loads(answer)["body"] == body.decode("latin-1")
        # chunked, with a chunk extension and an empty trailer section, and a chunked answer
        writer.write(b"POST /upload?chunked HTTP/1.1\r\nHost: dev1\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        status, headers, answer = await read_response(reader)
        assert status == 200 and headers["transfer-encoding"] == "chunked"
        got = json.loads(answer)
        assert got["body"] == "hello world" and ["Transfer-Encoding", "chunked"] in got["headers"]
        # HEAD: headers only, and the connection goes on
        writer.write(http_request("HEAD", "/"))
        status, headers, _ = await read_response(reader, to_head=True)
        assert status == 200 and int(headers["content-length"]) > 0
        # Expect: 100-continue is answered by the gate once the request is allowed
        writer.write(b"POST /late HTTP/1.1\r\nHost: dev1\r\nContent-Length: 4\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert (await read_response(reader))[0] == 100
        writer.write(b"late")
        status, _, answer = await read_response(reader)
        assert status == 200 and json.loads(answer)["body"] == "late"
        writer.close()
        assert [r["method"] for r in device.requests] == ["POST", "POST", "HEAD", "POST"]
    run_policy_gate(tmp_path, scenario, {"allow": ["* *"]}, device=EchoDevice())


def test_request_smuggling_is_refused(tmp_path):
    attempts = [
        # both framings: the device might believe the other one
        b"POST / HTTP/1.1\r\nHost: dev1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: dev1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: dev1\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: dev1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: dev1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: dev1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: dev1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: dev1\r\nContent-Length : 4\r\n\r\nabcd",
    ]

    async def scenario(port, device, gate, seen, files, target):
        for attempt in attempts:
            status, _, _ = await request(port, attempt)
            assert status == 400, attempt
        assert [r["body"] for r in device.requests] == []    # nothing of them reached the device
        # a request hidden in a body is that body, never a request of its own
        hidden = b"GET /admin HTTP/1.1\r\nHost: dev1\r\n\r\n"
        status, _, answer = await request(port, http_request("POST", "/", hidden, keep_alive=False))
        assert status == 200 and json.loads(answer)["body"] == hidden.decode()
        assert [r["target"] for r in device.requests] == ["/"]
        assert gate.stats["bad-request"] == len(attempts)
    run_policy_gate(tmp_path, scenario, {"allow": ["* *"]}, device=EchoDevice())


def test_token_guessing_on_one_kept_open_connection_is_blocked(tmp_path):
    async def scenario(port, device, gate, seen, files, target):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(3):
            writer.write(http_request("GET", f"/api/guess{i}/lights"))
            status, _, body = await read_response(reader)
            # as a real Hue bridge answers a wrong token: 200 and an error in the body
            assert status == 200 and json.loads(body)[0]["error"]["description"] == "unauthorized user"
            assert seen["token_blocks"] == []
        writer.write(http_request("GET", "/api/hue-right/lights"))  # a right one is no failure
        assert (await read_response(reader))[0] == 200 and seen["token_blocks"] == []
        writer.write(http_request("GET", "/api/guess3/lights"))     # past the threshold
        assert (await read_response(reader))[0] == 200
        assert seen["token_blocks"] == [("127.0.0.1", 300, f"127.0.0.1:{target[1]}")]
        writer.write(http_request("GET", "/api/hue-right/lights"))  # even the right token, now
        assert (await read_response(reader))[0] == 403
        writer.close()
        assert device.stats["logins_failed"] == 4 and gate.stats["token-failures"] == 4
        # another connection: still refused, without asking the device
        status, _, _ = await request(port, http_request("GET", "/api/hue-right/lights", keep_alive=False))
        assert status == 403 and device.stats["http_requests"] == 5
    run_policy_gate(tmp_path, scenario, {"token_guard": {
        "max_failures": 3, "window_ms": 60000, "block_seconds": 300, "statuses": [401, 403],
        "failure_text": "unauthorized user"}})


def test_token_guard_counts_failed_statuses_and_only_them(tmp_path):
    """An API that says no with its status (401/403): counted by the status line; a 200
    without the failure text is not a failure."""
    async def scenario(port, device, gate, seen, files, target):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(5):
            writer.write(http_request("GET", "/ok"))
            assert (await read_response(reader))[0] == 200
        for i in range(4):
            writer.write(http_request("GET", f"/token{i}?status=401"))
            assert (await read_response(reader))[0] == 401
        writer.close()
        assert gate.stats["token-failures"] == 4
        assert seen["token_blocks"] == [("127.0.0.1", 60, f"127.0.0.1:{target[1]}")]
    run_policy_gate(tmp_path, scenario, {"token_guard": {"max_failures": 3, "window_ms": 60000,
                                                         "block_seconds": 60, "statuses": [401],
                                                         "failure_text": "unauthorized user"}},
                    device=EchoDevice())


def test_auth_gate_and_api_filter_combined(tmp_path):
    gate_auth = basic(GATE_USER, GATE_PASSWORD)

    async def scenario(port, device, gate, seen, files, target):
        assert (await request(port, http_request("GET", "/", keep_alive=False)))[0] == 401
        assert (await request(port, http_request("PUT", "/state", b"{}", keep_alive=False)))[0] == 401
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(http_request("GET", "/", Authorization=gate_auth))
        assert (await read_response(reader))[0] == 200
        # every request is checked: without the credentials the next one is refused
        writer.write(http_request("GET", "/"))
        assert (await read_response(reader))[0] == 401
        writer.close()
        status, _, _ = await request(port, http_request("PUT", "/state", b"{}", keep_alive=False,
                                                        Authorization=gate_auth))
        assert status == 403 and seen["alerts"][0][0] == "api-denied"
        assert device.stats["http_requests"] == 1
        assert gate.stats["auth-failed"] == 3 and gate.stats["api-denied"] == 1
    run_policy_gate(tmp_path, scenario, {"auth": True, "allow": ["GET *"]})


def test_api_filter_alone_asks_no_credentials_and_passes_the_devices_own(tmp_path):
    async def scenario(port, device, gate, seen, files, target):
        status, _, body = await request(port, http_request(
            "GET", "/status", keep_alive=False, Authorization=basic("admin", DEVICE_PASSWORD)))
        assert status == 200 and json.loads(body) == {"on": False, "brightness": 100}
    run_policy_gate(tmp_path, scenario, {"allow": ["GET *"]})


def test_a_missing_or_unusable_policy_fails_closed_and_a_new_one_applies_at_once(tmp_path):
    async def scenario(port, device, gate, seen, files, target):
        get_root = http_request("GET", "/", keep_alive=False)
        assert (await request(port, get_root))[0] == 502            # no policy file
        files.directory.mkdir(parents=True, exist_ok=True)
        for broken in ("{not json", json.dumps({"port": target[1], "allow": ["get /"]}),
                       json.dumps({"port": target[1], "allow": None, "future": True}),
                       json.dumps({"port": target[1] + 1, "allow": None})):     # another port's
            files.path("127.0.0.1").write_text(broken)
            assert (await request(port, get_root))[0] == 502, broken
        assert device.stats["http_requests"] == 0 and gate.stats["no-policy"] == 5
        files.write("127.0.0.1", {"port": target[1], "allow": ["GET *"]})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(http_request("GET", "/"))
        assert (await read_response(reader))[0] == 200
        files.write("127.0.0.1", {"port": target[1], "allow": ["GET /status"]})   # a posture change
        writer.write(http_request("GET", "/"))
        assert (await read_response(reader))[0] == 403                # on the open connection too
        writer.close()
        files.remove("127.0.0.1")
        assert (await request(port, get_root))[0] == 502
    run_policy_gate(tmp_path, scenario, None)


def test_reporters_block_token_guessers_and_report_the_rest(tmp_path):
    out = tmp_path / "calls"
    script = "import sys; open(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + '\\n')"
    prefix = shlex.join([sys.executable, "-c", script, str(out)])
    on_alert, on_token_block = gate_mod.reporters(
        f"{prefix} block {{ip}} {{seconds}} --reason {{reason}} --target {{target}}",
        f"{prefix} alert {{kind}} --source {{ip}} --target {{target}} --details {{details}}")

    async def main():
        on_token_block("10.0.0.9", 300, "10.0.0.2:80")
        on_token_block("10.0.0.8", 0, "10.0.0.2:80")        # block_seconds 0: reported only
        on_alert("api-denied", "10.0.0.7", "10.0.0.2:80", {"path": "/{ip}"})
        for _ in range(200):
            if out.exists() and len(out.read_text().splitlines()) == 3:
                return
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert sorted(out.read_text().splitlines()) == [
        'alert api-denied --source 10.0.0.7 --target 10.0.0.2 --details {"path": "/{ip}"}',
        'alert token-brute-force --source 10.0.0.8 --target 10.0.0.2 --details {"seconds": 0}',
        "block 10.0.0.9 300 --reason token-brute-force --target 10.0.0.2"]


def test_the_supervisor_records_an_alert_the_gate_raises(tmp_path):
    from fakes import supervisor

    from appliance.errors import ConfigError
    from appliance.supervisor.ops import Ops
    sup = supervisor(tmp_path, light1=("02:00:00:00:00:31", "198.18.0.31", "light"))
    ops = Ops(sup)
    ops.raise_alert("api-denied", source="198.19.0.66", target="198.18.0.31", by="gate",
                    details='{"method": "PUT", "path": "/state", "count": 2}')
    alert, = [a for a in sup.store.alerts() if a["type"] == "api-denied"]
    assert alert["device"] == "light1" and alert["source"] == "gate" and alert["severity"] == "warning"
    assert alert["details"] == {"method": "PUT", "path": "/state", "count": 2, "source": "198.19.0.66"}
    for bad in ({"kind": "Bad Kind"}, {"kind": "x", "by": "nobody"}, {"kind": "x", "source": "nope"},
                {"kind": "x", "details": "[1]"}, {"kind": "x", "details": "{" + '"a": "b",' * 300 + "}"}):
        try:
            ops.raise_alert(**bad)
        except ConfigError:
            continue
        raise AssertionError(f"{bad} accepted")


def test_the_data_path_writes_one_policy_file_per_gated_device(tmp_path):
    from appliance.dataplane import umbox
    from appliance.dataplane.api import Dataplane, DeviceSpec, GatewaySettings
    dp = Dataplane("x", settings=GatewaySettings(gate_policy_dir=str(tmp_path / "gate")))  # (no kernel)
    files = gatepolicy.PolicyFiles(tmp_path / "gate")
    spec = DeviceSpec("light1", "02:00:00:00:00:31", "198.18.0.31")
    gated = umbox.compile_stack({"api_filter": {"allow": ["GET *"]}, "token_guard": {}})
    dp._write_gate_policy(spec, gated)
    policy, why = files.load("198.18.0.31", 80)
    assert why == "" and policy.device == "light1" and policy.allows("GET", "/") and policy.token_guard
    assert files.load("198.18.0.31", 8080)[0] is None          # another port of the device
    moved = DeviceSpec("light1", spec.mac, "198.18.0.32")
    dp._write_gate_policy(moved, gated, old_ip=spec.ip)        # a new address: the old file goes
    assert sorted(p.name for p in (tmp_path / "gate").iterdir()) == ["198.18.0.32.json"]
    dp._write_gate_policy(moved, umbox.compile_stack({"anti_spoof": {}}))   # no gate umbox any more
    assert list((tmp_path / "gate").iterdir()) == []


# ---------------------------------------------------------------- the admin account for auth_gate

def test_the_gate_checks_the_admin_account_the_supervisor_writes(tmp_path):
    """On the appliance the gate's credentials are the admin account (scrypt), written by the
    supervisor whenever it changes; before the box is claimed there are none."""
    from fakes import supervisor

    from appliance.vocab import hash_password as scrypt_hash
    sup = supervisor(tmp_path)
    path = tmp_path / "gate-credentials.json"
    creds = gate_mod.CredentialsFile(str(path))
    try:
        sup.sync_gate_credentials()
        assert not path.exists() and not creds.check("admin", "correct horse 1")   # not claimed
        sup.store.set_setting("admin", {"user": "admin", "scrypt": scrypt_hash("correct horse 1")})
        sup.sync_gate_credentials()
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert creds.check("admin", "correct horse 1")
        assert creds.check("admin", "correct horse 1")          # remembered: no second scrypt
        assert not creds.check("admin", "wrong horse 1") and not creds.check("root", "correct horse 1")
        sup.store.set_setting("admin", {"user": "admin", "scrypt": scrypt_hash("another pass 2")})
        sup.sync_gate_credentials()
        assert not creds.check("admin", "correct horse 1")      # the file changed: forgotten
        assert creds.check("admin", "another pass 2")
        sup.store.set_setting("admin", None)                      # a reset: no admin, no entry
        sup.sync_gate_credentials()
        assert not path.exists() and not creds.check("admin", "another pass 2")
    finally:
        sup.store.close()


def test_the_lab_s_sha256_credentials_still_load_and_garbage_refuses(tmp_path):
    path = tmp_path / "gate.json"
    path.write_text(json.dumps({"user": GATE_USER, "password_sha256": hash_password(GATE_PASSWORD)}))
    creds = gate_mod.CredentialsFile(str(path))
    assert creds.check(GATE_USER, GATE_PASSWORD) and not creds.check(GATE_USER, "nope")
    path.write_text("{not json")
    assert not creds.check(GATE_USER, GATE_PASSWORD)
