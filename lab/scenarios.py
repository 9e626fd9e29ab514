"""Demo scenarios on a running lab with its supervisor: real packets, real MQTT, real postures.

    kalki lab up --scenario intrusion|attack|scan|all

- intrusion: after hours (the lab's fake clock), motion while the lights are off: the camera
  turns suspicious and the lights are switched on.
- attack: the attacker guesses passwords on the camera's telnet port: the camera goes to attack.
- scan: a compromised light scans its neighbours: it goes to quarantine.
- all: the three in turn, with every device reset to normal before each.

Each step says in plain words what happens, then waits (polling the control socket) for the
posture change it announced; if that does not come, it says so and what to look at.
"""
from __future__ import annotations

import base64
import ctypes
import datetime
import json
import socket
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass

from appliance import client, netns
from appliance.errors import KalkiError, LabError
from lab import topology

AFTER_HOURS = "2026-11-28T23:00:00+01:00"      # a Saturday night at the lab's site (Berlin)
SCENARIOS = ("intrusion", "attack", "scan", "probe")
NEEDS = {"intrusion": ("camera", "light", "motion_sensor"), "attack": ("camera",),
         "scan": ("light", "plug"), "probe": ("plug",)}
WAIT = 10.0          # seconds to wait for an announced posture change
IN_WORDS = {"normal": "back to normal", "suspicious": "suspicious", "attack": "in the attack posture",
            "quarantine": "in quarantine"}


@dataclass
class Step:
    scenario: str
    device: str
    expected: str
    posture: str       # what it was when the wait ended
    ok: bool
    seconds: float
    message: str = ""


class Failed(Exception):
    pass


def check_lab_args(which: str, no_supervisor: bool, no_services: bool, devices: int,
                   fake_time: str) -> str:
    """For `kalki lab up --scenario`: refuses what cannot work before building anything and
    returns the fake time the lab needs (after hours, for the intrusion)."""
    if which not in (*SCENARIOS, "all"):
        raise LabError(f"--scenario: one of {', '.join(SCENARIOS)} or all, got {which!r}")
    if no_supervisor or no_services:
        raise LabError("--scenario needs the supervisor and the device services "
                       "(drop --no-supervisor / --no-services)")
    if devices < 4:
        raise LabError("--scenario needs at least 4 devices (a camera, a plug, a light and a "
                       "motion sensor)")
    if which in ("intrusion", "all") and not fake_time:
        return AFTER_HOURS
    return fake_time


class _Demo:
    def __init__(self, lab: topology.LabState, say: Callable[[str], None], wait: float):
        if not lab.gateway.get("supervisor"):
            raise LabError(f"lab {lab.name} runs without a supervisor: the scenarios need one "
                           f"(`kalki lab up` without --no-supervisor)")
        self.lab = lab
        self.say = say
        self.wait = wait
        self.steps: list[Step] = []

    # -- the control socket and the devices' own APIs -------------------------------------
    def ask(self, op: str, **args):
        return client.request(self.lab.gateway["socket"], op, **args)

    def devices(self) -> dict[str, dict]:
        return {d["name"]: d for d in self.ask("devices")}

    def first(self, dtype: str) -> topology.LabDevice:
        for d in self.lab.devices:
            if d.type == dtype:
                return d
        raise Failed(f"the lab has no {dtype.replace('_', ' ')}; build it with 4 devices or more")

    def device_api(self, dev: topology.LabDevice, method: str, path: str, body=None) -> dict:
        """The emulated device's HTTP API, from inside its namespace (as the device's app)."""
        auth = base64.b64encode(f"admin:{topology.DEVICE_PASSWORD}".encode()).decode()
        req = urllib.request.Request(f"http://{dev.ip}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Basic {auth}",
                                              "Content-Type": "application/json"})
        try:
            with netns.entered(dev.namespace), urllib.request.urlopen(req, timeout=3) as r:
                return json.load(r)
        except OSError as e:
            raise Failed(f"{dev.name}'s API at {dev.ip} did not answer {method} {path}: {e}") from None

    def connect(self, ns: str, ip: str, port: int, timeout: float) -> bool:
        with netns.entered(ns):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect((ip, port))
            return True
        except OSError:
            return False
        finally:
            s.close()

    # -- waiting for what was announced ---------------------------------------------------
    def until(self, what: str, predicate, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.wait)
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise Failed(f"{what} did not happen within {timeout or self.wait:.0f} s")
            time.sleep(0.1)

    def expect(self, scenario: str, device: str, posture: str, started: float) -> Step:
        """Waits for `device` to reach `posture`; `started` is when the stimulus began."""
        deadline = time.monotonic() + self.wait
        seen = None
        while time.monotonic() < deadline:
            seen = self.devices().get(device, {}).get("posture")
            if seen == posture:
                break
            time.sleep(0.1)
        took = round(time.monotonic() - started, 2)
        if seen == posture:
            step = Step(scenario, device, posture, seen, True, took)
            self.say(f"   -> {device} is now {IN_WORDS.get(posture, posture)} "
                     f"({took:.1f} s after it began).")
        else:
            log = topology.state_path(self.lab.name).parent / "supervisor.log"
            step = Step(scenario, device, posture, seen or "missing", False, took,
                        f"{device} did not become {posture} within {self.wait:.0f} s "
                        f"(it is {seen or 'missing'}). Look at `kalki --lab {self.lab.name} "
                        f"alerts`, `kalki --lab {self.lab.name} decisions` and {log}.")
            self.say(f"   !! {step.message}")
        self.steps.append(step)
        return step

    def leds(self) -> None:
        try:
            p = self.ask("panel")
        except KalkiError:
            return
        if p.get("enabled"):
            self.say(f"   The appliance's LEDs: {p['shows']} ({p['pattern']}): {p['meaning']}")

    def reset(self) -> None:
        """Every approved device back to normal (the operator's posture_reset)."""
        for name, d in sorted(self.devices().items()):
            if d.get("approved") and d.get("posture") != "normal":
                self.ask("posture_reset", name=name)
                self.say(f"   (reset {name} from {d['posture']} to normal)")

    # -- the scenarios --------------------------------------------------------------------
    def intrusion(self) -> None:
        cam, light, motion = (self.first(t) for t in NEEDS["intrusion"])
        site = datetime.datetime.fromisoformat(AFTER_HOURS).tzinfo
        try:
            now = self.ask("clock_set", time=AFTER_HOURS)["policy_time"]
            when = datetime.datetime.fromisoformat(now).astimezone(site).strftime("%A %H:%M")
            self.say(f"1. It is {when} at the site (the lab's clock): outside business hours.")
        except KalkiError:
            now = self.ask("status")["policy_time"]
            when = datetime.datetime.fromisoformat(now).astimezone(site).strftime("%A %H:%M")
            self.say(f"1. This lab's supervisor runs on the real clock ({when}); the "
                     f"intrusion rule only fires outside business hours (start the lab with "
                     f"--fake-time {AFTER_HOURS} to be sure).")
        try:
            self.until(f"reports from {light.name} and {motion.name}", lambda: all(
                self.devices().get(d.name, {}).get("availability") == "online"
                for d in (light, motion)))
        except Failed as e:      # go on: the posture wait below says whether it mattered
            self.say(f"   (not yet online: {e}; trying anyway)")
        self.say(f"2. The office is dark: {light.name} is off and {motion.name} sees nobody.")
        self.device_api(motion, "PUT", "/state", {"motion": False})
        self.device_api(light, "PUT", "/state", {"on": False})
        time.sleep(1.2)              # two telemetry rounds, so the supervisor knows it
        self.say(f"3. Someone walks in: {motion.name} reports motion, with the lights "
                 f"still off. The physical-intrusion rule should put {cam.name} under closer "
                 f"watch (suspicious: its web page behind the gate, only its allowed "
                 f"destinations) and switch the lights on.")
        started = time.monotonic()
        self.device_api(motion, "PUT", "/state", {"motion": True})
        step = self.expect("intrusion", cam.name, "suspicious", started)
        try:
            self.until(f"{light.name} switching on",
                       lambda: self.device_api(light, "GET", "/status").get("on") is True)
            self.say(f"   -> {light.name} is on: the supervisor switched it on.")
        except Failed as e:
            if step.ok:
                self.say(f"   !! {e}")
        self.device_api(motion, "PUT", "/state", {"motion": False})
        self.leds()

    def attack(self) -> None:
        cam = self.first("camera")
        atk_ns, atk_ip = self.lab.namespaces["atk"], self.lab.gateway["attacker_ip"]
        if self._unblock(atk_ip):
            self.say(f"   (the attacker {atk_ip} was still in the kernel's drop set from an "
                     f"earlier run; it is let go so the demo can start afresh)")
        self.say(f"1. An attacker at {atk_ip} guesses passwords on {cam.name}'s telnet port "
                 f"({cam.ip}:23), connection after connection. The brute-force detector in XDP "
                 f"should see it, drop the attacker, and the supervisor should put {cam.name} "
                 f"in attack (quarantined: management traffic only).")
        started = time.monotonic()
        for _ in range(15):
            self.connect(atk_ns, cam.ip, 23, timeout=0.3)
        step = self.expect("attack", cam.name, "attack", started)
        if step.ok:
            alerts = [a for a in self.ask("alerts", device=cam.name, limit=10)
                      if a["type"] == "brute-force"]
            if alerts:
                self.say(f"   -> alert: brute-force on {cam.name} ({alerts[0]['severity']}).")
        self.leds()

    def scan(self) -> None:
        light, plug = (self.first(t) for t in NEEDS["scan"])
        self.say(f"1. {light.name} has been taken over and scans its neighbours: it tries "
                 f"{plug.name}'s ports 1 to 39. Devices may not open connections to each other "
                 f"(lateral block) and the scan detector counts the ports, so the supervisor "
                 f"should put {light.name} in quarantine.")
        started = time.monotonic()
        for port in range(1, 40):
            self.connect(light.namespace, plug.ip, port, timeout=0.1)
        step = self.expect("scan", light.name, "quarantine", started)
        if step.ok:
            others = {n: d["posture"] for n, d in self.devices().items() if n != light.name}
            self.say("   -> the others keep their posture: "
                     + ", ".join(f"{n} {p}" for n, p in sorted(others.items())))
        self.leds()

    def probe(self) -> None:
        plug = self.first("plug")
        gw = self.lab.gateway["lan_ip"]
        self.say(f"1. {plug.name} has been taken over and turns on the appliance itself: it "
                 f"tries the gateway's SSH and web page ({gw}:22, :443). Devices may use the "
                 f"gateway's DHCP, DNS, NTP, MQTT and ping and nothing else, so the gateway "
                 f"guard in XDP should drop the attempts and the supervisor should put "
                 f"{plug.name} in quarantine.")
        started = time.monotonic()
        for port in (22, 443):
            self.connect(plug.namespace, gw, port, timeout=0.3)
        step = self.expect("probe", plug.name, "quarantine", started)
        if step.ok:
            probes = [a for a in self.ask("alerts", device=plug.name, limit=10)
                      if a["type"] == "gateway-probe"]
            if probes:
                self.say(f"   -> alert: gateway-probe on {plug.name}, port "
                         f"{probes[-1]['details'].get('dst_port')} ({probes[0]['severity']}).")
        self.leds()

    def _unblock(self, ip: str) -> bool:
        """Takes `ip` out of the lab's kernel drop set (pinned map), if it is there."""
        from appliance.dataplane import bpf, maps
        key = ctypes.c_uint32(int.from_bytes(socket.inet_aton(ip), "little"))
        try:
            m = bpf.Map(f"/sys/fs/bpf/kalki/{self.lab.name}/kalki_drop_set", *maps.MAPS["kalki_drop_set"])
        except (OSError, KalkiError):
            return False
        try:
            return bool(m.lookup(key) is not None and m.delete(key))
        finally:
            m.close()


def play(lab: topology.LabState, which: str, say: Callable[[str], None] = print,
         wait: float = WAIT) -> list[Step]:
    """Plays `which` ("intrusion", "attack", "scan", "probe" or "all") on a running lab; returns each
    announced posture change with what was seen. Never raises for a change that does not come;
    it says so and goes on with the next scenario."""
    if which not in (*SCENARIOS, "all"):
        raise LabError(f"scenario: one of {', '.join(SCENARIOS)} or all, got {which!r}")
    demo = _Demo(lab, say, wait)
    names = SCENARIOS if which == "all" else (which,)
    for i, name in enumerate(names):
        say("")
        say(f"== {name} " + "=" * (60 - len(name)))
        try:
            demo.reset()
            getattr(demo, name)()
        except (Failed, KalkiError) as e:     # KalkiError: the supervisor refused or is gone
            demo.steps.append(Step(name, "", "", "", False, 0.0, str(e)))
            say(f"   !! {e}")
    say("")
    say("== what happened " + "=" * 52)
    for s in demo.steps:
        mark = "ok" if s.ok else "FAILED"
        what = f"{s.device} -> {s.expected}" if s.device else s.message
        say(f"   {s.scenario:10} {what:32} {mark}" + (f" ({s.seconds:.1f} s)" if s.ok else ""))
    return demo.steps


def succeeded(steps: list[Step]) -> bool:
    return bool(steps) and all(s.ok for s in steps)


def report(steps: list[Step]) -> list[dict]:
    return [asdict(s) for s in steps]
