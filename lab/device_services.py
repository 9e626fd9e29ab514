"""Services an emulated IoT device runs inside its lab network namespace.

An HTTP API with a login (like a camera or smart plug), a telnet-like login
port, and optional MQTT telemetry.  Deliberately weak the way real devices
are (default credentials, no lockout) so the gateway has something to protect.

    python -m lab.device_services --name cam1 --type camera --bind 0.0.0.0
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import secrets
import signal
from collections.abc import Iterable

log = logging.getLogger("kalki.device")

HEAD_LIMIT = 16 * 1024
BODY_LIMIT = 64 * 1024
LINE_LIMIT = 1024
READ_TIMEOUT = 10.0
MAX_TOKENS = 256
BACKLOG = 1024  # brute-force tests open hundreds of connections at once

DEFAULT_STATES: dict[str, dict] = {
    "light": {"on": False, "brightness": 100},
    "plug": {"on": True, "power_w": 12.5},
    "motion": {"motion": False},
    "motion_sensor": {"motion": False},
    "door_sensor": {"open": False},
    "thermostat": {"temperature": 21.0, "setpoint": 21.0},
    "camera": {"recording": True},
}

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large"}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Device:
    """State, credentials, tokens and lab counters of one emulated device."""

    def __init__(self, name: str, type: str, user: str = "admin", password: str = "admin",
                 hue_user: str | None = None):
        self.name = name
        self.type = type
        self.hue_user = hue_user    # a Hue-style /api/<user>/lights when set
        self.user = user
        self.password = password
        self.state: dict = dict(DEFAULT_STATES.get(type, {"on": False}))
        self.stats = {"http_requests": 0, "logins_ok": 0, "logins_failed": 0, "telnet_sessions": 0}
        self._tokens: dict[str, None] = {}  # insertion-ordered, so the oldest can be evicted

    def check_login(self, user: str, password: str) -> bool:
        ok = (hmac.compare_digest(user.encode(), self.user.encode())
              & hmac.compare_digest(password.encode(), self.password.encode()))
        self.stats["logins_ok" if ok else "logins_failed"] += 1
        return bool(ok)

    def new_token(self) -> str:
        token = secrets.token_hex(16)
        self._tokens[token] = None
        while len(self._tokens) > MAX_TOKENS:
            del self._tokens[next(iter(self._tokens))]
        return token

    def token_valid(self, token: str) -> bool:
        return token in self._tokens

    def apply(self, update: object) -> dict:
        """Update known state fields; raise BadRequest on anything else."""
        if not isinstance(update, dict):
            raise BadRequest("state update must be a JSON object")
        for key, value in update.items():
            if key not in self.state:
                continue  # unknown fields are ignored, like lenient device firmware
            current = self.state[key]
            if isinstance(current, bool):
                if not isinstance(value, bool):
                    raise BadRequest(f"{key} must be a boolean")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadRequest(f"{key} must be a number")
        for key in update.keys() & self.state.keys():
            self.state[key] = update[key]
        return self.state


# ---------------------------------------------------------------- HTTP

def http_response(status: int, body: object, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    payload = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
             "Content-Type: application/json",
             f"Content-Length: {len(payload)}",
             "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def parse_head(raw: bytes) -> tuple[str, str, dict[str, str]]:
    try:
        text = raw.decode("latin-1")
        request_line, *header_lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError:
        raise BadRequest("malformed request line") from None
    if not version.startswith("HTTP/"):
        raise BadRequest("malformed request line")
    headers = {}
    for line in header_lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest("malformed header")
        headers[name.strip().lower()] = value.strip()
    return method, target.split("?", 1)[0], headers


def basic_credentials(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None


class HttpApi:
    def __init__(self, device: Device):
        self.device = device

    def authorized(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return self.device.token_valid(auth[7:].strip())
        creds = basic_credentials(auth)
        return creds is not None and self.device.check_login(*creds)

    def route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        device = self.device
        if path == "/_lab/stats":
            return http_response(200, device.stats)
        device.stats["http_requests"] += 1
        if path.startswith("/api/") and device.hue_user:
            return self.hue(method, path, body)
        if path == "/":
            return http_response(200, {"device": device.name, "type": device.type})
        if path == "/login":
            if method != "POST":
                return http_response(405, {"ok": False, "error": "use POST"})
            creds = basic_credentials(headers.get("authorization", ""))
            if creds is None:
                data = parse_json(body)
                if not isinstance(data, dict):
                    raise BadRequest("login body must be a JSON object")
                creds = (str(data.get("user", "")), str(data.get("password", "")))
            if device.check_login(*creds):
                return http_response(200, {"ok": True, "token": device.new_token()})
            return http_response(401, {"ok": False})
        if path in ("/status", "/state"):
            if not self.authorized(headers):
                return http_response(401, {"ok": False},
                                     [("WWW-Authenticate", f'Basic realm="{device.name}"')])
            if path == "/status" and method == "GET":
                return http_response(200, device.state)
            if path == "/state" and method == "PUT":
                return http_response(200, device.apply(parse_json(body)))
            return http_response(405, {"ok": False, "error": "method not allowed"})
        return http_response(404, {"ok": False, "error": "not found"})

    def hue(self, method: str, path: str, body: bytes) -> bytes:
        """A Hue-bridge-style API, the way such lights are polled: /api/<username>/lights.
        A wrong username (the API's token) is answered as a real bridge answers it: status 200
        and Hue's error object "unauthorized user" (the gate's token_guard finds it by its
        failure_text, not by a status)."""
        device = self.device
        parts = path.strip("/").split("/")
        if len(parts) < 2 or not hmac.compare_digest(parts[1].encode(), (device.hue_user or "").encode()):
            device.stats["logins_failed"] += 1      # a wrong token is a failed login
            return http_response(200, [{"error": {"type": 1, "address": path,
                                                  "description": "unauthorized user"}}])
        if len(parts) < 3 or parts[2] != "lights":
            return http_response(200, [{"error": {"type": 3, "address": path,
                                                  "description": "resource not available"}}])
        if len(parts) == 3 and method == "GET":
            state = {"on": bool(device.state.get("on")),
                     "bri": max(1, round(device.state.get("brightness", 100) * 254 / 100))}
            return http_response(200, {"1": {"name": device.name, "state": state}})
        if parts[3:] == ["1", "state"] and method == "PUT":
            data = parse_json(body)
            if not isinstance(data, dict):
                raise BadRequest("state must be a JSON object")
            update = {}
            if "on" in data:
                update["on"] = data["on"]
            if "bri" in data:
                if isinstance(data["bri"], bool) or not isinstance(data["bri"], int):
                    raise BadRequest("bri must be an integer 1-254")
                update["brightness"] = round(min(254, max(1, data["bri"])) * 100 / 254)
            device.apply(update)
            return http_response(200, [{"success": {f"/lights/1/state/{k}": v}} for k, v in data.items()])
        return http_response(200, [{"error": {"type": 3, "address": path,
                                              "description": "resource not available"}}])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per connection, or several when each asks for it (Connection:
        keep-alive): the lab's one-shot clients read to the end of the connection."""
        try:
            keep_alive, first = True, True
            while keep_alive:
                keep_alive = False
                try:
                    try:
                        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
                    except (asyncio.IncompleteReadError, TimeoutError) as exc:
                        if first or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                            raise
                        return      # a kept-open connection closed or left idle
                    first = False
                    method, path, headers = parse_head(head[:-4])
                    if "chunked" in headers.get("transfer-encoding", "").lower():
                        raise BadRequest("chunked bodies are not supported")
                    try:
                        length = int(headers.get("content-length", "0"))
                    except ValueError:
                        raise BadRequest("bad Content-Length") from None
                    if not 0 <= length <= BODY_LIMIT:
                        raise BadRequest("body too large", 413)
                    body = await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT)
                    response = self.route(method, path, headers, body)
                    keep_alive = headers.get("connection", "").lower() == "keep-alive"
                    if keep_alive:
                        response = response.replace(b"\r\nConnection: close\r\n",
                                                    b"\r\nConnection: keep-alive\r\n", 1)
                except BadRequest as exc:
                    response = http_response(exc.status, {"ok": False, "error": str(exc)})
                except (asyncio.LimitOverrunError, ValueError):
                    response = http_response(400, {"ok": False, "error": "request head too large"})
                except TimeoutError:
                    response = http_response(408, {"ok": False, "error": "timeout"})
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # client went away; nothing to answer
        except Exception:
            log.exception("http handler failed")
        finally:
            writer.close()


# ---------------------------------------------------------------- telnet

LOGIN_TRIES = 3


class TelnetLogin:
    def __init__(self, device: Device):
        self.device = device

    async def _prompt(self, reader, writer, prompt: str, after_cr: list[bool]) -> str | None:
        """The line typed after the prompt. A line ends at CR or LF: telnet clients end theirs
        with CR NUL or CR LF (RFC 854), and the byte after a CR belongs to the same end."""
        writer.write(prompt.encode())
        await writer.drain()
        line = bytearray()
        while True:
            b = await asyncio.wait_for(reader.read(1), READ_TIMEOUT)
            if not b:
                return None
            if after_cr[0] and b in (b"\0", b"\n"):
                after_cr[0] = False
                continue
            after_cr[0] = b == b"\r"
            if b in (b"\r", b"\n"):
                break
            line += b
            if len(line) > LINE_LIMIT:
                raise ValueError("overlong line")
        # Real telnet clients send IAC negotiation bytes (>= 0xF0); keep printable ASCII.
        return "".join(chr(c) for c in line if 0x20 <= c < 0x7F).strip()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.device.stats["telnet_sessions"] += 1
        after_cr = [False]
        try:
            # Like busybox's login: three tries on one connection, then it hangs up. Tools such
            # as hydra expect the prompt again after a failure.
            for _ in range(LOGIN_TRIES):
                user = await self._prompt(reader, writer, "login: ", after_cr)
                if user is None:
                    return
                password = await self._prompt(reader, writer, "password: ", after_cr)
                if password is None:
                    return
                if self.device.check_login(user, password):
                    break
                writer.write(b"Login incorrect\n")
                await writer.drain()
            else:
                return
            command = await self._prompt(reader, writer, "welcome\n$ ", after_cr)
            while command is not None and command != "exit":
                command = await self._prompt(reader, writer, f"{command}\n$ ", after_cr)
            if command == "exit":
                writer.write(b"bye\n")
                await writer.drain()
        except (TimeoutError, ValueError, ConnectionError):
            pass  # stuck, overlong or vanished client: just hang up
        except Exception:
            log.exception("telnet handler failed")
        finally:
            writer.close()


# ---------------------------------------------------------------- MQTT

class MqttTelemetry:
    """Publishes state and applies commands; paho's own thread retries connects."""

    def __init__(self, device: Device, host: str, port: int = 1883, user: str | None = None,
                 password: str | None = None, base: str = "kalki", interval: float = 1.0):
        import paho.mqtt.client as mqtt

        self.device = device
        self.interval = interval
        self.topic = f"{base}/{device.name}"
        self.availability = f"{self.topic}/availability"
        self.set_topic = f"{self.topic}/set"
        self._loop = asyncio.get_running_loop()
        # the broker takes a client id that is the user name (or starts with it and "-")
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device.name)
        if user:
            self.client.username_pw_set(user, password)
        self.client.will_set(self.availability, "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(host, port)
        self.client.loop_start()
        self._task = asyncio.create_task(self._publish_forever())

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("mqtt connect refused: %s", reason_code)
            return
        client.publish(self.availability, "online", qos=1, retain=True)
        client.subscribe(self.set_topic, qos=1)

    def _on_message(self, client, userdata, message) -> None:
        # paho calls this from its own thread; the state belongs to the event loop.
        self._loop.call_soon_threadsafe(self.handle_command, message.payload)

    def handle_command(self, payload: bytes) -> None:
        try:
            self.device.apply(parse_json(payload))
        except BadRequest as exc:
            log.warning("ignored mqtt command: %s", exc)
            return
        self.publish_state()

    def publish_state(self) -> None:
        self.client.publish(self.topic, json.dumps(self.device.state))

    async def _publish_forever(self) -> None:
        while True:
            if self.client.is_connected():
                self.publish_state()
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        self._task.cancel()
        if self.client.is_connected():
            info = self.client.publish(self.availability, "offline", qos=1, retain=True)
            await asyncio.to_thread(info.wait_for_publish, 2.0)
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------- entry points

async def serve(device: Device, bind: str = "127.0.0.1", http_port: int = 80,
                telnet_port: int = 23,
                services: Iterable[str] = ("http", "telnet")) -> dict[str, asyncio.Server]:
    """Start the chosen services; returns {"http": server, "telnet": server}."""
    servers = {}
    services = set(services)
    if "http" in services:
        servers["http"] = await asyncio.start_server(
            HttpApi(device).handle, bind, http_port, limit=HEAD_LIMIT, backlog=BACKLOG)
    if "telnet" in services:
        servers["telnet"] = await asyncio.start_server(
            TelnetLogin(device).handle, bind, telnet_port, limit=LINE_LIMIT, backlog=BACKLOG)
    return servers


def write_ready_file(path: str, servers: dict[str, asyncio.Server]) -> None:
    ports = {name: s.sockets[0].getsockname()[1] for name, s in servers.items()}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "ports": ports}, f)
    os.replace(tmp, path)  # the lab polls for the file, so it must appear complete


async def run(args: argparse.Namespace) -> None:
    device = Device(args.name, args.type, args.user, args.password, args.hue_user)
    servers = await serve(device, args.bind, args.http_port, args.telnet_port,
                          [s.strip() for s in args.services.split(",") if s.strip()])
    telemetry = None
    if args.mqtt_host:
        telemetry = MqttTelemetry(device, args.mqtt_host, args.mqtt_port, args.mqtt_user,
                                  args.mqtt_password, args.mqtt_base, args.telemetry_interval)
    if args.ready_file:
        write_ready_file(args.ready_file, servers)
    log.info("%s (%s) serving %s", device.name, device.type,
             {n: s.sockets[0].getsockname()[1] for n, s in servers.items()})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    for server in servers.values():
        server.close()
    if telemetry:
        await telemetry.close()
    # Newer Pythons wait for open sessions here; do not let one hold up shutdown.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in servers.values())), 2.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--type", required=True, help="light, plug, motion or camera")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--telnet-port", type=int, default=23)
    p.add_argument("--services", default="http,telnet")
    p.add_argument("--user", default="admin")
    p.add_argument("--password", default="admin")
    p.add_argument("--hue-user", help="serve a Hue-style API at /api/<this>/lights")
    p.add_argument("--mqtt-host")
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--mqtt-user")
    p.add_argument("--mqtt-password")
    p.add_argument("--mqtt-base", default="kalki")
    p.add_argument("--telemetry-interval", type=float, default=1.0)
    p.add_argument("--ready-file")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
