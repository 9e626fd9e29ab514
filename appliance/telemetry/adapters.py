"""Polling adapters: devices with an HTTP API and no MQTT. The adapter polls the device,
publishes its state under the device's own topic the way an MQTT device would (so rules, Home
Assistant and the web page see no difference), and carries out the commands rules send it.

One kind today: "hue", a Hue-bridge-style light API (GET /api/<user>/lights,
PUT /api/<user>/lights/1/state). A profile selects it with `[adapter] kind = "hue"`; the
per-device username comes from the credentials file (config adapters.credentials_file).
"""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from appliance.errors import ConfigError, KalkiError

log = logging.getLogger("kalki.adapters")
TIMEOUT = 2.0


async def http(method: str, ip: str, path: str, body: dict | None = None, port: int = 80):
    """One small HTTP/1.1 exchange (Connection: close); returns the decoded JSON body."""
    payload = json.dumps(body).encode() if body is not None else b""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), TIMEOUT)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                     .encode() + payload)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(1 << 16), TIMEOUT)
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        raise KalkiError(f"{ip}{path}: {status}")
    return json.loads(rest)


class HueAdapter:
    """Polls devices with a Hue-style HTTP API and no MQTT. It reads the devices through
    `devices()` ({name: device record}) and `profile(type)`, and reports upward only through
    `on_report(name, payload)` and `on_availability(name, state)`, wired in appliance.run."""

    def __init__(self, credentials: dict[str, dict], *, devices, profile, on_report, on_availability,
                 loop: asyncio.AbstractEventLoop):
        self.credentials = credentials
        self._devices, self._profile = devices, profile
        self._on_report, self._on_availability = on_report, on_availability
        self._loop = loop
        self._available: dict[str, str] = {}
        self._task: asyncio.Task | None = None

    def handles(self, device: str) -> bool:
        d = self._devices().get(device)
        profile = self._profile(d.get("type")) if d else None
        return bool(profile and profile.adapter and profile.adapter["kind"] == "hue"
                    and device in self.credentials)

    def start(self) -> None:
        self._task = self._loop.create_task(self._poll_forever())

    def close(self) -> None:
        if self._task:
            self._task.cancel()
            self._task = None

    def _availability(self, name: str, state: str) -> None:
        self._available[name] = state
        self._on_availability(name, state)

    async def _poll_forever(self) -> None:
        while True:
            period = 2.0
            for name in [n for n in list(self._devices()) if self.handles(n)]:
                d = self._devices().get(name)
                if not d or not d.get("approved") or d["posture"] == "quarantine":
                    continue
                period = min(period, self._profile(d["type"]).adapter["poll_seconds"])
                try:
                    await self.poll(name)
                except (TimeoutError, OSError, ValueError, KalkiError) as e:
                    if self._available.get(name) != "offline":
                        log.warning("polling %s: %s", name, e)
                    self._availability(name, "offline")
            await asyncio.sleep(period)

    async def poll(self, name: str) -> dict:
        d = self._devices()[name]
        user = self.credentials[name]["user"]
        lights = await http("GET", d["ip"], f"/api/{user}/lights")
        if isinstance(lights, list):     # Hue answers errors as a list with status 200
            raise KalkiError(f"{name}: {lights[0].get('error', {}).get('description', lights)}")
        state = lights["1"]["state"]
        payload = {"on": bool(state["on"]), "brightness": round(int(state["bri"]) * 100 / 254)}
        self._availability(name, "online")
        self._on_report(name, payload)
        return payload

    async def command(self, name: str, payload: dict) -> None:
        d = self._devices()[name]
        user = self.credentials[name]["user"]
        body: dict[str, bool | int] = {}
        if "on" in payload:
            body["on"] = bool(payload["on"])
        if "brightness" in payload:
            body["bri"] = max(1, min(254, round(int(payload["brightness"]) * 254 / 100)))
        result = await http("PUT", d["ip"], f"/api/{user}/lights/1/state", body)
        if any("error" in r for r in result):
            raise KalkiError(f"{name}: the light refused {body}: {result}")


def load_credentials(path: str) -> dict[str, dict]:
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) and isinstance(v.get("user"), str)
                                             for v in data.values()):
        raise ConfigError(f'{path}: expected {{"device": {{"user": "..."}}}}')
    return data
