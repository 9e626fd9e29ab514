#!/usr/bin/env python3
"""The supervisor for real in a lab: stimulus-to-enforced latency and resident memory.

1. MQTT: a 100-device lab (Mosquitto + `kalki run`, fake clock after hours), every device
   publishing telemetry once a second with its own credentials from its own namespace; the
   intrusion rule (motion with the lights off, after hours -> every camera suspicious) is
   triggered over and over. The sensor's trigger carries its publish time (`sent_ns`, this
   process's time.monotonic_ns(), the clock the supervisor records its decision's moments on:
   one host); mqtt_enforce is the decision's monotonic_ns.enforce - sent_ns, so the broker hop
   is in it. The supervisor's own timing_ms (from the message's arrival on its loop) is kept
   as *_from_arrival. And an end-to-end figure from here: publish call -> the first camera's
   retained posture message at an MQTT client.
2. Kernel detector: brute force on each camera's telnet port from the attacker namespace
   (a fresh source address per camera, because the first one lands in the drop set), the
   decision of rule device-under-attack: timing_ms.enforce, which the supervisor times from the
   kernel event's own bpf_ktime_get_ns().
3. Memory: VmRSS / VmHWM of the supervisor at 100 devices (after 1 and 2) and in a second lab
   with 1,000 devices (and how long `topology.up` takes to build it).
4. Start to enforced, in the 1,000-device lab: the supervisor stopped and started again, from
   its start to its control socket answering with all 1,000 enforced: with its pins kept (a
   restart) and with them removed (the dispatcher compiled again, every device added).
5. MQTT at 1,000 devices, every one publishing once a second (issue 13's condition): the
   same trigger as 1., in one room. The first 100 devices are a room whose cameras, lights
   and motion sensors are in groups (hall-cameras, hall-lights, hall-motion); a site rule
   (put over the control socket) is the intrusion rule for that room, and the built-in one,
   which would move all 250 cameras of the site, is switched off. So 25 cameras move per
   trigger, as in 1., with a table ten times as large and ten times the telemetry.
6. The kernel detector at 1,000 devices, every one publishing once a second: 2.'s brute
   force on the first KALKI_BENCH_SUP_BIG_KERNEL cameras, with the site's default rules (the
   built-in intrusion rule switched on again beside the room's).

Everything runs inside lab namespaces (198.18.0.0/15) and is removed in finally: blocks.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paho.mqtt.client as mqtt
from common import (
    Loads,
    emit,
    install_signal_handlers,
    lab_only,
    median,
    percentile,
    remove_lab,
    suffix,
    vm_status,
)

from appliance import (
    client,
    netns,
)
from appliance.dataplane import api as dataplane_api
from lab import topology

BENCH = "supervisor"
AFTER_HOURS = "2026-11-28T23:00:00+01:00"      # a Saturday night in Berlin
TRIGGERS = int(os.environ.get("KALKI_BENCH_TRIGGERS", "100"))
TRIGGER_BUDGET = float(os.environ.get("KALKI_BENCH_TRIGGER_SECONDS", "80"))   # stop early after this
SMALL = int(os.environ.get("KALKI_BENCH_SUP_SMALL", "100"))
BIG = int(os.environ.get("KALKI_BENCH_SUP_DEVICES", "1000"))
UI = os.environ.get("KALKI_BENCH_SUP_UI", "1") != "0"     # the web page and the panel in the supervisor
STARTS = int(os.environ.get("KALKI_BENCH_SUP_STARTS", "1"))   # supervisor starts of each kind, big lab
BIG_MQTT = os.environ.get("KALKI_BENCH_SUP_BIG_MQTT", "1") != "0"   # 5. (the big lab's triggers)
ROOM = 100                     # the big lab's room: its first 100 devices (25 cameras)
ROOM_RULE = """
[[rules]]
name = "hall-intrusion"
priority = 50
when = {all = [
  {time = {business_hours = false}},
  {telemetry = {device = {group = "hall-motion"}, field = "motion", op = "==", value = true, within = "5m"}},
  {telemetry = {device = {group = "hall-lights"}, field = "on", op = "==", value = false, match = "all"}},
]}
then = [
  {alert = {type = "physical-intrusion", severity = "critical", message = "hall: motion, lights off"}},
  {set_posture = {device = {group = "hall-cameras"}, posture = "suspicious", for = "30m"}},
  {command = {device = {group = "hall-lights"}, payload = {on = true}}},
]
"""
ATTACK_SRC_BASE = 100          # extra attacker addresses 198.19.0.100.. (one per camera)
BIG_KERNEL = int(os.environ.get("KALKI_BENCH_SUP_BIG_KERNEL", "100"))   # cameras attacked, big lab


# -- a supervised lab that always goes away ---------------------------------------------------
@contextlib.contextmanager
def supervised_lab(tag: str, devices: int):
    """topology.up(..., supervisor=True); yields (state, seconds topology.up took)."""
    install_signal_handlers()
    name = f"b{tag}{suffix()}"[:20]
    try:
        t0 = time.monotonic()
        state = topology.up(name, devices=devices, services=False, supervisor=True,
                            fake_time=AFTER_HOURS, ui=UI)
        yield state, time.monotonic() - t0
    finally:
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            remove_lab(name)
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def ask(state, op, **args):
    return client.request(state.gateway["socket"], op, **args)


def after_next_full_collection(state) -> dict:
    """The supervisor's status once its ticker has run the next full collection (every 15 s),
    after which it gives the C heap's free pages back: its memory then is the steady state."""
    done = ask(state, "status").get("full_collections", 0)
    wait_for(lambda: ask(state, "status").get("full_collections", 0) > done, 30, 1)
    return ask(state, "status")


def postures(state) -> dict[str, str]:
    return {d["name"]: d["posture"] for d in ask(state, "devices")}


def wait_for(pred, timeout: float, poll: float = 0.0005):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            return None
        time.sleep(poll)


# -- device MQTT clients -------------------------------------------------------------------------
class Fleet:
    """One paho client per device, each connected from its device's namespace with its own
    credentials. No paho threads: publish() writes at once in the calling thread (QoS 0), one
    I/O thread reads CONNACK/PINGRESP and keeps the connections alive. The background publisher
    sends every device's state once a second, except `held` devices (the trigger's)."""

    def __init__(self, state, held=()):
        pw = json.loads((topology.state_path(state.name).parent / "mqtt-passwords.json").read_text())
        self.state = state
        self.values = {}
        self.clients: dict[str, mqtt.Client] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.held = set(held)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        defaults = {"camera": {"recording": True}, "plug": {"on": True, "power_w": 12.5},
                    "light": {"on": False, "brightness": 100}, "motion_sensor": {"motion": False}}
        for d in state.devices:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{d.name}-bench")
            c.username_pw_set(d.name, pw[d.name])
            with netns.entered(d.namespace):      # the socket is made in this thread: here
                c.connect(lab_only(topology.GATEWAY_LAN_IP), topology.MQTT_PORT, keepalive=60)
            self.clients[d.name] = c
            self.locks[d.name] = threading.Lock()
            self.values[d.name] = dict(defaults.get(d.type, {"on": False}))
        for target in (self._io, self._background):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        ok = wait_for(lambda: all(c.is_connected() for c in self.clients.values()), 20, 0.05)
        if not ok:
            bad = [n for n, c in self.clients.items() if not c.is_connected()][:5]
            raise RuntimeError(f"MQTT clients not connected: {bad}")

    def publish(self, name: str, payload: dict, stamp: bool = False) -> int:
        """Publishes; returns the time.monotonic_ns() of the publish call, which `stamp` also
        puts in the payload as `sent_ns` (an extra scalar: the supervisor keeps it in the
        decision's stimulus)."""
        with self.locks[name]:
            sent = time.monotonic_ns()
            body = json.dumps({**payload, "sent_ns": sent} if stamp else payload)
            info = self.clients[name].publish(f"kalki/{name}", body, qos=0)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publish as {name}: {mqtt.error_string(info.rc)}")
        return sent

    def _io(self):
        """epoll, not select(): a 1,000-device fleet has descriptors past select's 1,024."""
        sel = selectors.DefaultSelector()
        registered: dict[str, socket.socket] = {}
        last_misc = 0.0
        try:
            while not self._stop.is_set():
                for name, c in self.clients.items():
                    s = c.socket()
                    if registered.get(name) is not s:
                        with contextlib.suppress(KeyError, ValueError, OSError):
                            sel.unregister(registered.pop(name))
                        if s is not None:
                            with contextlib.suppress(ValueError, OSError):
                                sel.register(s, selectors.EVENT_READ, name)
                                registered[name] = s
                try:
                    ready = sel.select(0.1)
                except (OSError, ValueError):
                    continue
                for key, _ in ready:
                    with self.locks[key.data]:
                        self.clients[key.data].loop_read()
                now = time.monotonic()
                every = now - last_misc >= 1.0
                if every:
                    last_misc = now
                for name, c in self.clients.items():
                    with self.locks[name]:
                        if every:
                            c.loop_misc()
                        if c.want_write():
                            c.loop_write()
        finally:
            sel.close()

    def _background(self):
        names = list(self.clients)
        while not self._stop.is_set():
            start = time.monotonic()
            for i, name in enumerate(names):
                if self._stop.is_set():
                    return
                if name not in self.held:
                    try:
                        self.publish(name, self.values[name])
                    except RuntimeError:
                        pass
                # spread the round over the second rather than a burst of 100
                target = start + (i + 1) / len(names)
                delay = target - time.monotonic()
                if delay > 0:
                    time.sleep(delay)

    def close(self):
        self._stop.set()
        for t in self._threads:
            t.join(2)
        for c in self.clients.values():
            try:
                c.disconnect()
            except Exception:
                pass
            s = c.socket()
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()


class PostureWatch:
    """Waits for a device's retained posture message, as an integrator's client would see it,
    instead of polling the control socket (which kept a core busy beside the supervisor)."""

    def __init__(self, state, device: str):
        lab_dir = topology.state_path(state.name).parent
        self.topic = f"kalki/{device}/posture"
        self.posture = None
        self.changed = threading.Condition()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{topology.SUPERVISOR_USER}-bench-watch")
        c.username_pw_set(topology.SUPERVISOR_USER, (lab_dir / "mqtt-supervisor").read_text().strip())
        c.on_message = self._on_message
        c.on_connect = lambda client, *_: client.subscribe(self.topic, qos=1)
        with netns.entered(state.namespaces["gw"]):
            c.connect(lab_only(topology.GATEWAY_LAN_IP), topology.MQTT_PORT, keepalive=60)
        c.loop_start()
        self.client = c

    def _on_message(self, client, userdata, msg):
        with self.changed:
            self.posture = json.loads(msg.payload).get("posture")
            self.changed.notify_all()

    def wait(self, posture: str, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.posture == posture, timeout)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


# -- 1. MQTT stimulus to enforced --------------------------------------------------------------------
def newest_decision(state, rule: str, device: str | None = None, limit: int = 10):
    args = {"limit": limit, **({"device": device} if device else {})}
    for d in ask(state, "decisions", **args):
        if d.get("kind", "decision") == "decision" and d.get("rule") == rule:
            return d
    return None


def bench_intrusion(state, devices=None, rule: str = "physical-intrusion") -> dict:
    """`devices`: those the rule reads and moves (default: the whole site's)."""
    devices = devices or state.devices
    sensor = next(d for d in devices if d.type == "motion_sensor")
    cameras = [d.name for d in devices if d.type == "camera"]
    first_cam = cameras[0]
    fleet = Fleet(state, held=[sensor.name])
    watch = PostureWatch(state, first_cam)
    try:
        fleet.publish(sensor.name, {"motion": False})
        time.sleep(2.2)     # two rounds: every light has reported "off", the rule sees false
        before = newest_decision(state, rule)
        last_id = before["id"] if before else -1
        decide, enforce, xdp, e2e, targets = [], [], [], [], []
        pub_enforce, pub_xdp, pub_decide, hop = [], [], [], []
        misses = unstamped = 0
        size_before = state_file_size(state)
        deadline = time.monotonic() + TRIGGER_BUDGET
        for _ in range(TRIGGERS):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter_ns()
            fleet.publish(sensor.name, {"motion": True}, stamp=True)
            seen = watch.wait("suspicious", 5)
            t1 = time.perf_counter_ns()
            if not seen:
                misses += 1
            else:
                e2e.append((t1 - t0) / 1e6)
                dec = wait_for(lambda: (lambda d: d if d and d["id"] != last_id else None)(
                    newest_decision(state, rule)), 2, 0.01)
                if dec:
                    last_id = dec["id"]
                    decide.append(dec["timing_ms"]["decide"])
                    if dec["timing_ms"]["enforce"] is not None:
                        enforce.append(dec["timing_ms"]["enforce"])
                        xdp.append(dec["timing_ms"]["xdp"])
                    targets.append(sum(1 for a in dec["actions"] if a.get("action") == "set_posture"
                                       and "skipped" not in a and "error" not in a))
                    sent = (dec["stimulus"].get("data") or {}).get("sent_ns")
                    clock = dec.get("monotonic_ns") or {}
                    if isinstance(sent, int) and clock.get("enforce"):
                        pub_enforce.append((clock["enforce"] - sent) / 1e6)
                        pub_xdp.append((clock["xdp"] - sent) / 1e6)
                        pub_decide.append((clock["stimulus"] - sent) / 1e6 + dec["timing_ms"]["decide"])
                        hop.append((clock["stimulus"] - sent) / 1e6)
                    else:    # another device's report made the rule true: not from our publish
                        unstamped += 1
            # re-arm the edge-triggered rule and put the cameras back
            fleet.publish(sensor.name, {"motion": False})
            for cam in cameras:
                ask(state, "posture_reset", name=cam)
            watch.wait("normal", 5)
            # The 25 resets are 25 writes of the state file (1 MB at 1,000 devices), each
            # holding the loop while the reports queue: the next trigger is timed once the
            # supervisor has caught up (a control request answers after what queued before it).
            ask(state, "status")
            time.sleep(0.05)
        status = ask(state, "status")
    finally:
        watch.close()
        fleet.close()
    return {"decide": decide, "enforce": enforce, "xdp": xdp, "e2e": e2e, "misses": misses,
            "pub_enforce": pub_enforce, "pub_xdp": pub_xdp, "pub_decide": pub_decide, "hop": hop,
            "unstamped": unstamped,
            "cameras": len(cameras), "targets": targets, "status": status, "sensor": sensor.name,
            "state_kb": (round(size_before / 1024), round(state_file_size(state) / 1024))}


# -- 2. kernel detector to enforced -----------------------------------------------------------------
def brute_force(atk_ns: str, src: str, dst: str, port: int = 23, attempts: int = 11) -> int:
    """attempts connection attempts from src; stops at the first that goes unanswered (the
    source is in the drop set by then). Returns how many were answered."""
    answered = 0
    with netns.entered(atk_ns):
        for _ in range(attempts):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(0.3)
            try:
                s.bind((lab_only(src), 0))
                s.connect((lab_only(dst), port))
                answered += 1
            except ConnectionRefusedError:
                answered += 1
            except (TimeoutError, OSError):
                break
            finally:
                s.close()
    return answered


def bench_brute_force(state, limit: int | None = None) -> dict:
    """The first `limit` cameras (all by default) attacked one after another."""
    atk = state.namespaces["atk"]
    cams = [d for d in state.devices if d.type == "camera"][:limit]
    prefix = topology.UPLINK.prefixlen
    decide, xdp, enforce, e2e, misses, other = [], [], [], [], 0, {}
    for i, cam in enumerate(cams):
        src = lab_only(f"198.19.0.{ATTACK_SRC_BASE + i}")
        topology._run(["ip", "-n", atk, "addr", "add", f"{src}/{prefix}", "dev", "eth0"],
                      "attacker address")
        t0 = time.perf_counter_ns()
        brute_force(atk, src, cam.ip)
        dec = wait_for(lambda: newest_decision(state, "device-under-attack", cam.name, 10), 5, 0.005)
        t1 = time.perf_counter_ns()
        if not dec:
            misses += 1
            p = postures(state).get(cam.name)
            other[p] = other.get(p, 0) + 1
            continue
        e2e.append((t1 - t0) / 1e6)
        decide.append(dec["timing_ms"]["decide"])
        if dec["timing_ms"]["enforce"] is not None:
            enforce.append(dec["timing_ms"]["enforce"])
        if dec["timing_ms"].get("xdp") is not None:
            xdp.append(dec["timing_ms"]["xdp"])
    return {"decide": decide, "xdp": xdp, "enforce": enforce, "e2e": e2e, "misses": misses,
            "postures_of_misses": other, "cameras": len(cams)}


# -- 3. memory ----------------------------------------------------------------------------------------
def supervisor_memory(state) -> dict:
    pid = state.pids["supervisor"]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmd = f.read().split(b"\0")
    assert b"appliance.cli" in cmd and b"run" in cmd, cmd    # nsenter exec'd the supervisor
    return vm_status(str(pid))


def state_file_size(state) -> int:
    p = topology.state_path(state.name).parent / "state" / "kalki.json"
    return p.stat().st_size if p.exists() else 0


def stats(name: str, xs: list[float], unit: str = "ms", target=None, **extra) -> None:
    if not xs:
        emit(BENCH, f"{name}_p50", None, unit, n=0, **extra)
        return
    emit(BENCH, f"{name}_p50", round(percentile(xs, 50), 3), unit, n=len(xs), **extra)
    emit(BENCH, f"{name}_p99", round(percentile(xs, 99), 3), unit, n=len(xs),
         **({"target": target, "met": percentile(xs, 99) <= target} if target is not None else {}),
         **extra)
    emit(BENCH, f"{name}_max", round(max(xs), 3), unit, n=len(xs), **extra)


# -- 4. supervisor start to all enforced ---------------------------------------------------------
def start_to_enforced(state, keep_pins: bool) -> dict:
    """Stops the lab's supervisor (SIGTERM, its process group: we started it), optionally
    removes its pins (as if bpffs had been emptied: the dispatcher is compiled again and every
    device added), starts it again as topology.up did, and times its start to the first answer
    of its control socket, which it opens once the data path is reconciled: `enforced` then
    says how many devices are in the kernel."""
    pid = state.pids["supervisor"]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:      # not our child (an older lab's): wait for it to go
            if not os.path.exists(f"/proc/{pid}"):
                break
        time.sleep(0.02)
    else:
        raise RuntimeError(f"the supervisor ({pid}) did not stop within 20 s")
    if not keep_pins:
        dataplane_api.remove_pins(state.name)
    lab_dir = topology.state_path(state.name).parent
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state.gateway["socket"])
    t0 = time.monotonic()
    state.pids["supervisor"] = topology.spawn(
        state.namespaces["gw"], [sys.executable, "-m", "appliance.cli", "run",
                                 "--config", str(lab_dir / "kalki.toml")], lab_dir / "supervisor.log")
    topology._save(state)      # so that the lab's teardown stops this one
    status = None
    while time.monotonic() - t0 < 180:
        try:
            status = client.request(state.gateway["socket"], "status", timeout=5)
            break
        except Exception:      # not listening yet
            time.sleep(0.01)
    t1 = time.monotonic()
    if status is None:
        raise RuntimeError("the supervisor did not answer within 180 s of its start")
    return {"seconds": t1 - t0, "enforced": status["enforced"], "devices": status["devices"],
            "reconcile": {k: len(v) for k, v in (status.get("reconcile") or {}).items()
                          if isinstance(v, list) and v}}


def report_mqtt(r: dict, loads: Loads, devices: int, prefix: str = "mqtt",
                rule: str = "physical-intrusion") -> None:
    """The JSON lines of one bench_intrusion run; metric names start with `prefix`."""
    loads.sample()
    load = loads.kw()
    extra = {"rule": rule,
             "cameras_per_decision": round(median(r["targets"])) if r["targets"] else r["cameras"],
             "devices": devices, "publishing_hz_per_device": 1, **load}
    stats(f"{prefix}_enforce", r["pub_enforce"], target=10, **extra, unstamped=r["unstamped"],
          how="the sensor's publish (sent_ns in its payload) -> every camera enforced and read back, "
              "nftables' part included (the decision's monotonic_ns.enforce)")
    stats(f"{prefix}_xdp", r["pub_xdp"], **extra,
          how="the sensor's publish -> every camera's XDP entry written (nftables' part follows)")
    stats(f"{prefix}_decide", r["pub_decide"], **extra, how="the sensor's publish -> the rule decided")
    held = [e["ms"] for e in (r["status"].get("evaluations") or {}).get("slow", [])
            if e["stimulus"] == "telemetry" and e["device"] == r["sensor"]]
    stats(f"{prefix}_loop_held_per_trigger", held, **extra,
          how="the supervisor's loop held by one trigger's evaluation: the rule, the cameras "
              "enforced and the decisions their changes set off (status: evaluations: the "
              "last 64 of 5 ms or more, so at most the last 64 triggers); a stimulus arriving "
              "meanwhile waits")
    stats(f"{prefix}_broker_hop", r["hop"], **extra,
          how="the sensor's publish -> the message on the supervisor's loop (broker and paho's thread)")
    stats(f"{prefix}_enforce_from_arrival", r["enforce"], **extra,
          how="the supervisor's timing_ms.enforce: from the message's arrival on its loop")
    stats(f"{prefix}_xdp_from_arrival", r["xdp"], **extra)
    stats(f"{prefix}_decide_from_arrival", r["decide"], **extra)
    stats(f"{prefix}_end_to_end", r["e2e"], **extra,
          how="publish call -> the first camera's retained posture message received by an MQTT client")
    per_camera = (round(median(r["pub_enforce"]) / max(1, extra["cameras_per_decision"]), 3)
                  if r["pub_enforce"] else None)
    emit(BENCH, f"{prefix}_enforce_per_camera_median", per_camera, "ms", n=len(r["pub_enforce"]),
         how="median enforce / cameras in the decision (cameras are enforced one after another)",
         **load)
    if len(r["pub_enforce"]) >= 20:
        emit(BENCH, f"{prefix}_enforce_first10_median", round(median(r["pub_enforce"][:10]), 3), "ms",
             n=10, state_file_kb=r["state_kb"][0], **load)
        emit(BENCH, f"{prefix}_enforce_last10_median", round(median(r["pub_enforce"][-10:]), 3), "ms",
             n=10, state_file_kb=r["state_kb"][1], **load)
    emit(BENCH, f"{prefix}_triggers", len(r["e2e"]) + r["misses"], "count", misses=r["misses"],
         asked=TRIGGERS, budget_s=TRIGGER_BUDGET, **load)
    emit(BENCH, f"supervisor_counters_after_{prefix}", r["status"]["counters"], "count",
         mqtt_rejected=r["status"]["mqtt_rejected"], rules_skipped=r["status"].get("rules_skipped"),
         **load)
    st = r["status"]
    emit(BENCH, "gc_pause_max_ms", st.get("gc_pause_max_ms"), "ms",
         how="longest collection of generations 0-1 and 0-2 (what is not frozen) by the "
             "supervisor's ticker between events ([0] unused)", devices=devices,
         full_pause_last_ms=st.get("gc_full_pause_last_ms"),
         whole_heap_pause_max_ms=st.get("gc_whole_heap_pause_max_ms"),
         whole_heap_passes=st.get("gc_whole_heap_passes"),
         whole_heap_found_last=st.get("gc_whole_heap_found_last"), frozen=st.get("gc_frozen"),
         **load)


def report_kernel(b: dict, loads: Loads, prefix: str, **extra) -> None:
    """The JSON lines of one bench_brute_force run; metric names start with `prefix`."""
    loads.sample()
    extra = {"rule": "device-under-attack", **extra, **loads.kw()}
    stats(f"{prefix}_enforce", b["enforce"], target=1, **extra,
          how="the kernel event's bpf_ktime_get_ns() -> the camera enforced and read back")
    stats(f"{prefix}_xdp", b["xdp"], **extra,
          how="the kernel event -> the camera's XDP entry written (its posture in force for the "
              "next packet; nftables' part follows)")
    stats(f"{prefix}_decide", b["decide"], **extra, how="the kernel event -> the rule decided")
    stats(f"{prefix}_end_to_end", b["e2e"], **extra,
          how="first SYN -> decision seen via control (includes the 11 connects)")
    emit(BENCH, f"{prefix}_misses", b["misses"], "count", n=b["cameras"],
         postures=b["postures_of_misses"], **loads.kw())


def room(state) -> list:
    """The big lab's first ROOM devices as a room (see 5. above): their cameras, lights and
    motion sensors grouped, the room's intrusion rule put, the site-wide one switched off."""
    devices = state.devices[:ROOM]
    for d in devices:
        group = {"camera": "hall-cameras", "light": "hall-lights", "motion_sensor": "hall-motion"}.get(d.type)
        if group:
            ask(state, "device_group", name=d.name, group=group)
    ask(state, "rules_put", text=ROOM_RULE)
    ask(state, "set_rule_enabled", name="physical-intrusion", enabled=False)
    return devices


def raise_descriptor_limit() -> None:
    """A paho client per device here, and Mosquitto (our child) a connection per device."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * BIG + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def main() -> int:
    install_signal_handlers()
    raise_descriptor_limit()
    t_start = time.monotonic()
    loads = Loads()
    with supervised_lab("sup", SMALL) as (state, up_s):
        emit(BENCH, f"lab_up_{SMALL}_devices", round(up_s, 2), "s", **loads.kw())
        r = bench_intrusion(state)
        report_mqtt(r, loads, SMALL)

        b = bench_brute_force(state)
        report_kernel(b, loads, "kernel", devices=SMALL, publishing_hz_per_device=0,
                      samples="one per camera, fresh attacker source each")

        # the steady state, not the burst's (hwm_* keeps the burst's peak)
        status = after_next_full_collection(state)
        pauses = status.get("gc_pause_max_ms")
        emit(BENCH, "gc_full_pause_ms", pauses[2] if pauses else None, "ms",
             trim_pause_max_ms=status.get("trim_pause_max_ms"),
             last_ms=status.get("gc_full_pause_last_ms"),
             how="the longest full collection after the runs above (of what is not frozen: "
                 "memory.Collector): the loop waits that long every 15 s, and as long as "
                 "trim_pause_max_ms for the heap given back after it",
             **loads.kw())

        m = supervisor_memory(state)
        emit(BENCH, f"rss_{SMALL}_devices", round(m["VmRSS"] / 1024, 1), "MB", target=48,
             met=m["VmRSS"] / 1024 <= 48, hwm_mb=round(m["VmHWM"] / 1024, 1),
             state_file_kb=round(state_file_size(state) / 1024), web_and_panel=UI, **loads.kw())
        emit(BENCH, f"hwm_{SMALL}_devices", round(m["VmHWM"] / 1024, 1), "MB", **loads.kw())

    if BIG:       # KALKI_BENCH_SUP_DEVICES=0 skips the big lab
        with supervised_lab("supbig", BIG) as (state, up_s):
            loads.sample()
            emit(BENCH, f"lab_up_{BIG}_devices", round(up_s, 2), "s", **loads.kw(),
                 how="topology.up with supervisor: namespaces, then devices added+approved one by one "
                     "over the control socket (supervisor_start_* is the supervisor's part)")
            status = after_next_full_collection(state)     # the steady state, as above
            m = supervisor_memory(state)
            emit(BENCH, f"rss_{BIG}_devices", round(m["VmRSS"] / 1024, 1), "MB", target=64,
                 met=m["VmRSS"] / 1024 <= 64, hwm_mb=round(m["VmHWM"] / 1024, 1),
                 enforced=status["enforced"], state_file_kb=round(state_file_size(state) / 1024),
                 web_and_panel=UI, note="no telemetry in this lab", **loads.kw())
            emit(BENCH, f"hwm_{BIG}_devices", round(m["VmHWM"] / 1024, 1), "MB", **loads.kw())
            starts: dict[str, list[dict]] = {"restart": [], "cold": []}
            for _ in range(STARTS):          # interleaved
                for kind in starts:
                    starts[kind].append(start_to_enforced(state, keep_pins=kind == "restart"))
                    loads.sample()
            for kind, rs in starts.items():
                secs = [x["seconds"] for x in rs]
                if not secs:        # KALKI_BENCH_SUP_STARTS=0
                    continue
                emit(BENCH, f"supervisor_start_to_enforced_{kind}_{BIG}", round(median(secs), 2), "s",
                     n=len(rs), runs=[round(x, 2) for x in secs],
                     enforced=[x["enforced"] for x in rs], devices=rs[-1]["devices"],
                     reconcile=rs[-1]["reconcile"], **loads.kw(),
                     how=("pins kept: start, store, data path reconciled unchanged" if kind == "restart"
                          else "pins removed: start, dispatcher compiled and attached, every device added")
                     + "; to the control socket's first answer")
            if BIG_MQTT:
                devices = room(state)
                r = bench_intrusion(state, devices, rule="hall-intrusion")
                report_mqtt(r, loads, BIG, prefix=f"mqtt_{BIG}", rule="hall-intrusion")
            if BIG_KERNEL:
                # the site's default rules: the built-in intrusion rule over all 250 lights
                # and 250 motion sensors is on again (the room's rule stays)
                ask(state, "set_rule_enabled", name="physical-intrusion", enabled=True)
                fleet = Fleet(state)        # every device reporting once a second meanwhile
                try:
                    time.sleep(1.0)
                    b = bench_brute_force(state, BIG_KERNEL)
                finally:
                    fleet.close()
                report_kernel(b, loads, f"kernel_{BIG}", devices=BIG, publishing_hz_per_device=1,
                              samples=f"one per camera ({b['cameras']}), fresh attacker source each",
                              site_rules="built-in physical-intrusion on (all lights, all motion sensors)")
    emit(BENCH, "wall_time", round(time.monotonic() - t_start, 1), "s", **loads.kw())
    return 0


if __name__ == "__main__":
    sys.exit(main())
