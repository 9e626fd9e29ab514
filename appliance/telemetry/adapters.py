"""Polling adapters: devices with an HTTP API and no MQTT. The adapter polls the device,
publishes its state under the device's own topic the way an MQTT device would (so rules, Home
Assistant and the web page see no difference), and carries out the commands rules send it.

One kind today: "hue", a Hue-bridge-style light API (GET /api/<user>/lights,
PUT /api/<user>/lights/1/state). A profile selects it with `[adapter] kind = "hue"`; the
per-device username comes from the credentials file (config adapters.credentials_file).

Each device is polled every `poll_seconds` of its profile, unless the supervisor has set its own
interval (`set_interval`, the rule action `poll`) until it puts it back. A device that does not
answer is polled less often, twice the wait after each failure up to BACKOFF_SECONDS, and at its
interval again once it answers (or once set_interval asks for it). Devices are polled side
by side, up to MAX_POLLS_AT_ONCE at a time, so one that times out delays no other.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from pathlib import Path

from appliance.errors import ConfigError, KalkiError

log = logging.getLogger("kalki.adapters")
TIMEOUT = 2.0
IDLE_SECONDS = 2.0      # the longest the loop sleeps: a new device is polled within it
# An unplugged light polled every second cost the loop a failed connection a second (250
# lights: 2.4 ms collections at 1,000 devices, bench_supervisor, when each failure still
# left its exception in a cycle).
BACKOFF_SECONDS = 60.0
MAX_POLLS_AT_ONCE = 32  # connections open at once; the rest wait for one to end


async def http(method: str, ip: str, path: str, body: dict | None = None, port: int = 80):
    """One small HTTP/1.1 exchange (Connection: close); returns the decoded JSON body."""
    payload = json.dumps(body).encode() if body is not None else b""
    # asyncio.timeout, not wait_for: wait_for's frame keeps the task that holds a failure,
    # and the failure's traceback keeps that frame, a cycle for the collector per failed poll
    # (55 objects: frames, tracebacks, tasks; tests/test_garbage.py).
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(ip, port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
                     .encode() + payload)
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            raw = await reader.read(1 << 16)
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
        self._intervals: dict[str, float] = {}   # set_interval's, over the profile's poll_seconds
        self._due: dict[str, float] = {}         # time.monotonic() when each device is next polled
        self._failures: dict[str, int] = {}      # polls failed in a row, per device
        self._wake = asyncio.Event()             # an interval changed: the loop looks again

    def handles(self, device: str) -> bool:
        d = self._devices().get(device)
        profile = self._profile(d.get("type")) if d else None
        return bool(profile and profile.adapter and profile.adapter["kind"] == "hue"
                    and self._user(device) is not None)

    def _user(self, device: str) -> str | None:
        """The device's user on its API: the credentials file names a device as it was set up,
        which a renamed device keeps as its mqtt_user."""
        d = self._devices().get(device) or {}
        found = self.credentials.get(d.get("mqtt_user") or device)
        return found["user"] if found else None

    def interval(self, device: str) -> float:
        """Seconds between two polls of the device: set_interval's, or its profile's."""
        if device in self._intervals:
            return self._intervals[device]
        d = self._devices().get(device)
        profile = self._profile(d.get("type")) if d else None
        return float(profile.adapter["poll_seconds"]) if profile and profile.adapter else IDLE_SECONDS

    def backoff(self, device: str, failed: int) -> float:
        """Seconds to the next poll of a device after `failed` polls failed in a row."""
        interval = self.interval(device)
        return max(interval, min(BACKOFF_SECONDS, interval * 2 ** min(failed, 16)))

    def set_interval(self, device: str, seconds: float | None) -> None:
        """Polls the device every `seconds` from now on (None: its profile's interval again).
        At once: the next poll comes within the new interval, or when it was due if sooner."""
        if seconds is None:
            self._intervals.pop(device, None)
        else:
            self._intervals[device] = float(seconds)
        self._failures.pop(device, None)
        if device in self._due:
            self._due[device] = min(self._due[device], time.monotonic() + self.interval(device))
        self._wake.set()

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
        """Starts each due device's poll beside the others (at most MAX_POLLS_AT_ONCE, one per
        device): polled one after another, a light that did not answer held every other
        light's poll back by its time-out."""
        in_flight: dict[str, asyncio.Task] = {}

        def finished(name: str, _task: asyncio.Task) -> None:
            in_flight.pop(name, None)
            self._wake.set()

        try:
            while True:
                self._wake.clear()
                active = []
                for name in [n for n in list(self._devices()) if self.handles(n)]:
                    d = self._devices().get(name)
                    if not d or not d.get("approved") or d["posture"] == "quarantine":
                        continue
                    active.append(name)
                    if (name in in_flight or self._due.get(name, 0.0) > time.monotonic()
                            or len(in_flight) >= MAX_POLLS_AT_ONCE):
                        continue
                    self._due[name] = time.monotonic() + self.interval(name)
                    task = in_flight[name] = asyncio.get_running_loop().create_task(self._poll_one(name))
                    task.add_done_callback(functools.partial(finished, name))
                self._due = {name: self._due[name] for name in active if name in self._due}
                self._failures = {name: n for name, n in self._failures.items() if name in self._due}
                waiting = [due - time.monotonic() for name, due in self._due.items() if name not in in_flight]
                wait = min([IDLE_SECONDS, *waiting])
                if len(in_flight) >= MAX_POLLS_AT_ONCE:
                    wait = IDLE_SECONDS         # a poll that ends wakes the loop
                try:
                    await asyncio.wait_for(self._wake.wait(), max(wait, 0.05))
                except TimeoutError:
                    pass
        finally:
            for task in in_flight.values():
                task.cancel()

    async def _poll_one(self, name: str) -> None:
        try:
            await self.poll(name)
            self._failures.pop(name, None)
            return
        except KeyError as missing:
            if name not in self._devices():
                return      # removed (or renamed) between its poll being started and its running
            why = f"{name}: its answer has no {missing}"
        except (TimeoutError, OSError, ValueError, TypeError, KalkiError) as failure:
            # its words only: the failure kept in this frame, which its traceback holds,
            # would be a cycle left to the collector
            why = str(failure) or type(failure).__name__
        if self._available.get(name) != "offline":
            log.warning("polling %s: %s", name, why)
        self._availability(name, "offline")
        failed = self._failures[name] = self._failures.get(name, 0) + 1
        self._due[name] = time.monotonic() + self.backoff(name, failed)

    async def poll(self, name: str) -> dict:
        d = self._devices()[name]
        user = self._user(name)
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
        user = self._user(name)
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
