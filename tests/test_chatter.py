"""Every shipped profile against an hour (simulated) of what real devices do: cloud by name
over TLS, NTP from the pool, mDNS, SSDP and vendor broadcasts (lab/chatter.py), with the
lab's device services (MQTT telemetry, the light's polled API) running too. Zero alerts, no
packet dropped, every posture still normal."""
import time

import pytest

from appliance import client
from lab import chatter, topology

pytestmark = pytest.mark.lab

# The lab's devices, by plan: camera1 plug1 light1 motion_sensor1 camera2 plug2 light2;
# the last three are approved as the other shipped types.
RETYPED = {"camera2": "door_sensor", "plug2": "thermostat", "light2": "generic"}


@pytest.fixture(scope="module")
def clab(run_suffix):
    name = f"s{run_suffix}chat"
    state = topology.up(name, devices=7, supervisor=True, ui=False)
    try:
        yield state
    finally:
        topology.down(name)


def ask(lab, op, **args):
    return client.request(lab.gateway["socket"], op, **args)


def test_an_hour_of_normal_chatter_raises_nothing_for_any_shipped_profile(clab):
    for device, device_type in RETYPED.items():
        ask(clab, "device_approve", name=device, type=device_type)
    types = {d["name"]: d["type"] for d in ask(clab, "devices")}
    assert set(types.values()) == {"camera", "plug", "light", "motion_sensor", "door_sensor",
                                   "thermostat", "generic"}
    before = {d: ask(clab, "alerts", device=d) for d in types}
    drops_before = {d: drops(clab, d) for d in types}
    days = chatter.run(clab, types, minutes=60, seconds_per_minute=1.0)
    time.sleep(1.0)
    for device, day in days.items():
        assert day.failed == [], (device, day.failed[:5])
        assert day.done["tls"] == 60 and day.done["ntp"] == 60, (device, day.done)
        assert day.done["dns"] >= 12, (device, day.done)     # re-resolved as TTLs ran out
        assert day.done["mdns"] == day.done["ssdp"] == day.done["broadcast"] == 360
        new = [a for a in ask(clab, "alerts", device=device) if a not in before[device]]
        assert new == [], (device, new[:3])
        assert drops(clab, device) == drops_before[device], device
        assert ask(clab, "device_show", name=device)["posture"] == "normal"


def drops(lab, device):
    """Packets dropped per reason, leaving out the lab device's own IPv6 chatter (router
    solicitations; the appliance drops IPv6 by design)."""
    counters = ask(lab, "device_show", name=device)["counters"]
    return {reason: c["packets"] for reason, c in counters.items()
            if reason not in ("pass", "not_ipv4") and c["packets"]}


def test_lab_up_with_chatter_keeps_the_devices_talking_until_down(run_suffix):
    """`kalki lab up --chatter`: a background process of the lab's, in real time, stopped
    with the lab."""
    import json
    import os
    import subprocess
    import sys
    import time
    name = f"t{run_suffix}cht"
    up = subprocess.run([sys.executable, "-m", "appliance.cli", "lab", "up", "--name", name,
                         "--devices", "2", "--no-ui", "--chatter", "--json"],
                        capture_output=True, text=True, timeout=180)
    try:
        assert up.returncode == 0, up.stderr
        pid = topology.load(name).pids["chatter"]
        os.kill(pid, 0)                   # running
        lab = topology.load(name)
        assert json.loads(up.stdout)["name"] == name
        first = lab.devices[0]

        def bound():     # the device resolved its cloud through the gateway: the name is bound
            shown = client.request(lab.gateway["socket"], "device_show", name=first.name)
            return [b for b in (shown.get("names") or {}).get("bound") or []
                    if chatter.cloud_name(first.type) in (b.get("names") or [])]
        deadline = time.monotonic() + 20
        while not bound() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert bound(), (topology.state_path(name).parent / "chatter.log").read_text()
    finally:
        topology.down(name)
    time.sleep(0.5)
    try:      # gone, or a zombie its reaper has not collected yet
        with open(f"/proc/{pid}/stat") as f:
            gone = f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        gone = True
    assert gone, "the chatter process outlived its lab"
