"""Emulated device services, exercised in-process and as a CLI on loopback."""

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from lab.device_services import Device, MqttTelemetry, serve

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "s3cret"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def raw_http(port: int, data: bytes) -> tuple[int, dict, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, body


async def http(port: int, method: str, path: str, body=None, headers=None) -> tuple[int, object]:
    payload = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    lines = [f"{method} {path} HTTP/1.1", "Host: dev", f"Content-Length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    status, _, data = await raw_http(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    return status, json.loads(data)


def run_device(scenario, type="camera"):
    async def main():
        device = Device("dev1", type, "admin", PASSWORD)
        servers = await serve(device, "127.0.0.1", 0, 0)
        ports = {name: s.sockets[0].getsockname()[1] for name, s in servers.items()}
        try:
            return await scenario(device, ports)
        finally:
            for s in servers.values():
                s.close()
    return asyncio.run(main())


def test_root_and_unknown_path():
    async def scenario(device, ports):
        assert await http(ports["http"], "GET", "/") == (200, {"device": "dev1", "type": "camera"})
        status, body = await http(ports["http"], "GET", "/nope")
        assert status == 404
    run_device(scenario)


def test_login_token_and_status():
    async def scenario(device, ports):
        port = ports["http"]
        status, body = await http(port, "POST", "/login", {"user": "admin", "password": PASSWORD})
        assert status == 200 and body["ok"] is True
        token = body["token"]
        assert await http(port, "GET", "/status", headers={"Authorization": f"Bearer {token}"}) == (
            200, {"recording": True})
        assert (await http(port, "GET", "/status", headers={"Authorization": "Bearer forged"}))[0] == 401
        assert (await http(port, "GET", "/status"))[0] == 401
        assert (await http(port, "GET", "/status",
                           headers={"Authorization": basic("admin", PASSWORD)}))[0] == 200
        status, body = await http(port, "POST", "/login", headers={"Authorization": basic("admin", PASSWORD)})
        assert status == 200 and body["token"] != token
    run_device(scenario)


def test_login_failed():
    async def scenario(device, ports):
        port = ports["http"]
        assert await http(port, "POST", "/login", {"user": "admin", "password": "admin"}) == (401,
                                                                                              {"ok": False})
        assert await http(port, "POST", "/login", headers={"Authorization": basic("root", PASSWORD)}) == (
            401, {"ok": False})
        assert device.stats["logins_failed"] == 2 and device.stats["logins_ok"] == 0
    run_device(scenario)


def test_state_update_turns_light_on():
    async def scenario(device, ports):
        port, auth = ports["http"], {"Authorization": basic("admin", PASSWORD)}
        assert await http(port, "PUT", "/state", {"on": True, "colour": "red"}, auth) == (
            200, {"on": True, "brightness": 100})
        assert (await http(port, "PUT", "/state", {"brightness": "max"}, auth))[0] == 400
        assert (await http(port, "PUT", "/state", {"on": False}))[0] == 401
        assert await http(port, "GET", "/status", headers=auth) == (200, {"on": True, "brightness": 100})
    run_device(scenario, type="light")


def test_bad_json_and_garbage():
    async def scenario(device, ports):
        port = ports["http"]
        status, body = await http(port, "POST", "/login", b"{not json")
        assert status == 400 and "invalid JSON" in body["error"]
        status, _, _ = await raw_http(port, b"\x00\xff\xfegarbage\r\n\r\n")
        assert status == 400
        status, _, _ = await raw_http(port, b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")
        assert status == 400
        status, _, _ = await raw_http(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        assert status == 400
        assert (await http(port, "GET", "/"))[0] == 200  # still serving
    run_device(scenario)


def test_stats_and_many_connections():
    async def scenario(device, ports):
        port = ports["http"]
        results = await asyncio.gather(*(
            http(port, "POST", "/login", {"user": "admin", "password": f"guess{i}"}) for i in range(100)))
        assert all(status == 401 for status, _ in results)
        await http(port, "POST", "/login", {"user": "admin", "password": PASSWORD})
        status, stats = await http(port, "GET", "/_lab/stats")
        assert status == 200
        assert stats == {"http_requests": 101, "logins_ok": 1, "logins_failed": 100, "telnet_sessions": 0}
    run_device(scenario)


async def read_until(reader, marker: bytes) -> bytes:
    return await asyncio.wait_for(reader.readuntil(marker), 5)


def test_telnet_login_ok_echoes_until_exit():
    async def scenario(device, ports):
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["telnet"])
        await read_until(reader, b"login: ")
        writer.write(b"admin\r\n")
        await read_until(reader, b"password: ")
        writer.write(PASSWORD.encode() + b"\r\n")
        assert await read_until(reader, b"$ ") == b"welcome\n$ "
        writer.write(b"uname -a\n")
        assert await read_until(reader, b"$ ") == b"uname -a\n$ "
        writer.write(b"exit\n")
        assert await asyncio.wait_for(reader.read(), 5) == b"bye\n"
        writer.close()
        assert device.stats["telnet_sessions"] == 1 and device.stats["logins_ok"] == 1
    run_device(scenario)


def test_telnet_login_failed():
    async def scenario(device, ports):
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["telnet"])
        await read_until(reader, b"login: ")
        # three tries on one connection, as busybox's login gives; lines end as telnet
        # clients end them (LF, CR LF, CR NUL)
        writer.write(b"admin\npassword\nadmin\r\nwrong\r\x00admin\r\x00bad\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == \
            b"password: Login incorrect\nlogin: password: Login incorrect\n" \
            b"login: password: Login incorrect\n"
        writer.close()
        assert device.stats["logins_failed"] == 3
    run_device(scenario)


def test_mqtt_commands_apply_to_state_without_broker():
    closed_port = free_port()

    async def main():
        device = Device("plug1", "plug")
        telemetry = MqttTelemetry(device, "127.0.0.1", closed_port, interval=0.05)
        telemetry.handle_command(b'{"on": false}')
        telemetry.handle_command(b"{broken")
        telemetry.handle_command(b'{"power_w": "lots"}')
        await asyncio.sleep(0.1)  # publisher loop keeps running while disconnected
        await telemetry.close()
        return device.state

    assert asyncio.run(main()) == {"on": False, "power_w": 12.5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_ready_file_and_sigterm(tmp_path):
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.device_services", "--name", "cam1", "--type", "camera",
         "--bind", "127.0.0.1", "--http-port", "0", "--services", "http",
         "--mqtt-host", "127.0.0.1", "--mqtt-port", str(free_port()),  # nothing listens there
         "--ready-file", str(ready)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 5
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid and set(info["ports"]) == {"http"}
        assert asyncio.run(http(info["ports"]["http"], "GET", "/")) == (200, {"device": "cam1",
                                                                              "type": "camera"})
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
