"""Every discovery payload the appliance publishes, judged by Home Assistant itself: its MQTT
discovery schemas (the posture sensor, the under-attack binary sensor, the posture select, the
alert events), with no key dropped as unknown, and its templates rendering the appliance's state
payloads into the values each entity expects.

Home Assistant is installed from PyPI, once, into a virtual environment of its own (build/ha-venv,
or $KALKI_HA_VENV), never into the appliance's: a release pinned per Python version. Where it
cannot be installed (no network, no release pinned for this Python) the tests are skipped and
say why.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import supervisor
from test_rename import RecordingBus

from appliance import HOME
from appliance.vocab import POSTURES, SEVERITIES

# Home Assistant drops support for a Python version a few releases after the next one is out:
# the last release for each. paho-mqtt: what that release's MQTT integration requires.
HA_RELEASES = {(3, 11): ("homeassistant==2024.1.6", "paho-mqtt==1.6.1")}
VENV = Path(os.environ.get("KALKI_HA_VENV") or HOME / "build" / "ha-venv")
CHECK = Path(__file__).with_name("ha_discovery_check.py")
LIGHT = ("02:4b:00:00:00:03", "198.18.0.12", "light")
PLUG = ("02:4b:00:00:00:02", "198.18.0.11", "plug")


@pytest.fixture(scope="module")
def home_assistant() -> Path:
    """The Python of a virtual environment with Home Assistant, made on first use."""
    release = HA_RELEASES.get(sys.version_info[:2])
    if release is None:
        pytest.skip(f"no Home Assistant release pinned for Python {sys.version_info[0]}."
                    f"{sys.version_info[1]} (HA_RELEASES in {Path(__file__).name})")
    python, stamp = VENV / "bin" / "python", VENV / ".kalki-release"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / (VENV.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # two test runs at once make it once
        if python.exists() and stamp.exists() and stamp.read_text() == " ".join(release):
            return python
        shutil.rmtree(VENV, ignore_errors=True)
        made = subprocess.run([sys.executable, "-m", "venv", str(VENV)], capture_output=True, text=True)
        installed = made.returncode == 0 and subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *release],
            capture_output=True, text=True, timeout=1200)
        if not installed or installed.returncode != 0:
            said = (installed or made).stderr.strip().splitlines()[-3:]
            shutil.rmtree(VENV, ignore_errors=True)
            pytest.skip(f"Home Assistant ({' '.join(release)}) could not be installed from PyPI "
                        f"into {VENV}: {' | '.join(said) or 'no output'}")
        stamp.write_text(" ".join(release))
    return python


def judged(python: Path, prefix: str, entities: list[dict]) -> dict[str, dict]:
    request = json.dumps({"prefix": prefix, "entities": entities})
    out = subprocess.run([str(python), str(CHECK)], input=request, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return {a["topic"]: a for a in json.loads(out.stdout)}


def payload(published) -> str:
    return published if isinstance(published, str) else json.dumps(published)


@pytest.mark.timeout(1500)     # the first run installs Home Assistant
@pytest.mark.parametrize("prefix", ["homeassistant", "site1/ha"])
def test_home_assistant_accepts_every_discovery_payload(tmp_path, home_assistant, prefix):
    sup = supervisor(tmp_path, light1=LIGHT, plug1=PLUG)
    try:
        bus = RecordingBus()
        bus.discovery_prefix = prefix
        sup.attach_bus(bus)
        sup.republish()
        configs = {t: c for t, c in bus.retained().items() if t.startswith(prefix + "/")}
        configs[bus.bridge_event_discovery_topic()] = bus.bridge_event_config()
        # the state payloads: the device in every posture, and under attack by an alert alone
        for posture in POSTURES:
            bus.publish_posture("light1", posture, "2024-06-01T12:00:00+00:00")
        bus.publish_posture("light1", "normal", "2024-06-01T12:00:00+00:00", attacked=True)
        postures = [json.loads(payload(p)) for t, p, _ in bus.published if t == "kalki/light1/posture"
                    and p != ""][-len(POSTURES) - 1:]
        options = sup.posture_options("light1")
    finally:
        sup.store.close()
    assert {t.split("/")[-3] for t in configs} >= {"kalki_bridge", sup.ha_node("light1")}
    states = [json.dumps(p) for p in postures]
    availability = [json.dumps({"state": "online"}), json.dumps({"state": "offline"})]
    answers = judged(home_assistant, prefix, [
        {"topic": t, "config": c, "states": states, "availability": availability}
        for t, c in configs.items()])

    assert {a["component"] for a in answers.values()} == {"sensor", "binary_sensor", "select", "event"}
    assert len(answers) == 2 * 4 + 1
    for topic, a in answers.items():
        assert a["error"] is None, f"{topic}: Home Assistant refuses it: {a['error']}"
        unknown = a["dropped"] + a["device_dropped"]
        assert not unknown, f"{topic}: keys Home Assistant does not know (and would drop): {unknown}"
        v = a["validated"]
        assert a["availability"] == [v["payload_available"], v["payload_not_available"]], topic
        node = topic.split("/")[-3]
        if a["component"] == "sensor":
            assert a["states"] == [p["posture"] for p in postures], topic
        elif a["component"] == "binary_sensor":
            assert v["device_class"] == "problem"
            assert a["states"] == [v["payload_on"] if p["under_attack"] else v["payload_off"]
                                   for p in postures], topic
            assert a["states"].count(v["payload_on"]) == 3      # attack, quarantine, the alert
        elif a["component"] == "select":
            assert v["options"] == options and v["command_topic"].endswith("/posture/set")
            assert a["states"] == [p["posture"] for p in postures], topic
            assert all(s in v["options"] for s, p in zip(a["states"], postures)
                       if p["posture"] in options), topic
        else:
            assert v["event_types"] == list(SEVERITIES), topic
        assert node == "kalki_bridge" or v["device"]["identifiers"] == [node]
