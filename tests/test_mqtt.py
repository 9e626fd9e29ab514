"""The project's mosquitto (ACL, passwords, reload) and the supervisor's Bus, on loopback."""

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from appliance.errors import ConfigError, KalkiError
from appliance.system import broker as broker_mod
from appliance.system.broker import DENIALS_PLUGIN, Broker, random_password, write_config
from appliance.telemetry.mqtt import Bus
from lab.device_services import Device, MqttTelemetry

REPO = Path(__file__).resolve().parents[1]
DEVICES = ("light1", "light2", "plug1")
GHOST = "ghost"  # has broker credentials, but the supervisor does not know it

pytestmark = pytest.mark.skipif(not os.path.exists(broker_mod.MOSQUITTO),
                                reason="mosquitto is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    users = {name: random_password() for name in ("kalki", *DEVICES, GHOST)}
    with Broker(tmp_path_factory.mktemp("mqtt"), port=free_port(), users=users) as b:
        yield b


class Recorder:
    def __init__(self):
        self.telemetry: list[tuple[str, dict]] = []
        self.availability: list[tuple[str, str]] = []
        self.denied: list[tuple[str, str, int]] = []


@pytest.fixture
def bus(broker):
    seen = Recorder()
    b = Bus("127.0.0.1", broker.port, "kalki", broker.users["kalki"],
            known_device=lambda name: name in DEVICES,
            on_telemetry=lambda d, data: seen.telemetry.append((d, data)),
            on_availability=lambda d, state: seen.availability.append((d, state)),
            on_denied=lambda user, topic, count: seen.denied.append((user, topic, count)))
    b.seen = seen
    b.wait_connected(5)
    yield b
    b.close()


class Client:
    """A plain MQTT client standing in for a device (or an attacker with its credentials)."""

    def __init__(self, broker, user):
        self.messages: list[mqtt.MQTTMessage] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.username_pw_set(user, broker.users[user])
        self.client.on_message = lambda c, u, m: self.messages.append(m)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        wait_for(self.client.is_connected, what=f"{user} to connect")

    def publish(self, topic, payload, retain=False):
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload)
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def subscribe(self, topic):
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def device(broker):
    clients = []

    def connect(user):
        clients.append(Client(broker, user))
        return clients[-1]
    yield connect
    for c in clients:
        c.close()


def sub_command(broker, *args, user="kalki"):
    return ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port),
            "-u", user, "-P", broker.users[user], *args]


def retained(broker, topic) -> bytes | None:
    """The retained payload on topic, or None; mosquitto_sub times out when there is none."""
    out = subprocess.run(sub_command(broker, "-t", topic, "--retained-only", "-C", "1", "-W", "1"),
                         capture_output=True, timeout=10)
    return out.stdout.rstrip(b"\n") if out.returncode == 0 else None


def pub(broker, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                           *args], capture_output=True, text=True, timeout=10)


# ---------------------------------------------------------------- config files

def test_config_files(tmp_path):
    conf = write_config(tmp_path, port=18830, users={"kalki": "a", "light1": "b"})
    text = conf.read_text()
    for line in ("allow_anonymous false", "per_listener_settings false", "persistence false",
                 "listener 18830 127.0.0.1", "max_packet_size 65536"):
        assert line in text.splitlines()
    acl = (tmp_path / "acl").read_text().splitlines()
    assert "pattern write kalki/%u" in acl and "pattern read kalki/%u/set" in acl
    assert (tmp_path / "passwords").stat().st_mode & 0o077 == 0
    assert (tmp_path / "passwords").read_text().startswith("kalki:$7$101$")
    assert DENIALS_PLUGIN.is_file(), "scripts/setup.sh builds it"
    assert f"plugin {DENIALS_PLUGIN}" in text.splitlines() and "plugin_opt_base kalki" in text
    without = write_config(tmp_path / "without", denials_plugin=tmp_path / "missing.so")
    assert not [line for line in without.read_text().splitlines() if line.startswith("plugin")]


@pytest.mark.parametrize("name", ["a/b", "a+", "#", "", "bridge", "a b"])
def test_bad_user_names_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="user"):
        write_config(tmp_path, users={name: "pw"})


def test_start_failures_are_explained(tmp_path, broker):
    taken = Broker(tmp_path / "taken", port=broker.port, users={"kalki": "pw"})
    with pytest.raises(KalkiError, match=f"port {broker.port} .* already in use"):
        taken.start()
    bad = Broker(tmp_path / "bad", port=free_port(), users={"kalki": "pw"})
    with open(bad.conf, "a") as conf:
        conf.write("no_such_option 1\n")
    with pytest.raises(KalkiError, match="mosquitto exited") as exc:
        bad.start()
    assert "no_such_option" in str(exc.value)  # the tail of the broker's output
    bad.stop()
    bad.stop()  # idempotent


# ---------------------------------------------------------------- authentication and ACL

def test_anonymous_and_wrong_password_are_refused(broker):
    assert "not authorised" in pub(broker, "-t", "kalki/light1", "-m", "{}").stderr
    assert "not authorised" in pub(broker, "-u", "light1", "-P", "wrong", "-t", "kalki/light1",
                                   "-m", "{}").stderr
    assert pub(broker, "-u", "light1", "-P", broker.users["light1"], "-t", "kalki/light1",
               "-m", "{}").returncode == 0


def test_device_publishes_only_under_its_own_topic(broker, bus, device):
    watcher = subprocess.Popen(sub_command(broker, "-v", "-t", "kalki/light1", "-t", "kalki/light2"),
                               stdout=subprocess.PIPE, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(watcher.stdout), daemon=True).start()
    try:
        light2 = device("light2")
        def pinged():  # mosquitto_sub does not say when it has subscribed
            light2.publish("kalki/light2", {"ping": 1})
            return lines
        wait_for(pinged, what="mosquitto_sub")

        light2.publish("kalki/light1", {"on": True, "forged_by": "light2"})
        light2.publish("kalki/light1/availability", "offline")
        light2.publish("kalki/light2", {"marker": "after"})
        wait_for(lambda: ("light2", {"marker": "after"}) in bus.seen.telemetry, what="marker at bus")
        wait_for(lambda: any("after" in line for line in lines), what="marker at mosquitto_sub")
    finally:
        watcher.terminate()
        watcher.wait()
    assert not [line for line in lines if line.startswith("kalki/light1")]
    assert not [d for d, _ in bus.seen.telemetry + bus.seen.availability if d == "light1"]
    # the broker dropped them, and its plugin told the supervisor (within a second)
    wait_for(lambda: bus.denied["light2"] == 2, what="the broker's denied report")
    assert bus.rejected == {"denied": 2}
    assert sum(c for u, _, c in bus.seen.denied if u == "light2") == 2
    assert bus.seen.denied[-1][1] in ("kalki/light1", "kalki/light1/availability")


def test_a_flood_of_refused_publishes_is_one_report_a_second(broker, bus, device):
    light2 = device("light2")
    for n in range(300):
        light2.client.publish("kalki/light1", f'{{"n": {n}}}', qos=0)
    light2.publish("kalki/light1/set", {"on": False})          # qos 1: all sent before this returns
    wait_for(lambda: bus.denied["light2"] == 301, what="301 refusals counted")
    assert len(bus.seen.denied) <= 4                          # a report a second, not 301 messages
    assert bus.seen.denied[-1][1] == "kalki/light1/set"


def test_the_broker_report_is_checked_too(bus):
    for bad in (b"{not json", b"[]", b'{"denied": 3}', b'{"denied": [{"user": "x"}]}',
                b'{"denied": [{"user": "x", "topic": "t", "count": -1}]}',
                b'{"denied": [], "untracked": "many"}'):
        bus.handle("kalki/bridge/denied", bad)
    assert bus.rejected == {"malformed": 6} and not bus.seen.denied
    bus.handle("kalki/bridge/denied", b'{"denied": [{"user": "light2", "topic": "kalki/light1", '
                                      b'"count": 3}], "untracked": 2}')
    assert bus.denied == {"light2": 3, "(untracked)": 2} and bus.rejected["denied"] == 5
    assert bus.seen.denied == [("light2", "kalki/light1", 3)]


def test_device_cannot_read_another_devices_commands(bus, device):
    light1, light2 = device("light1"), device("light2")
    light1.subscribe("kalki/light1/set")
    light2.subscribe("kalki/light1/set")
    light2.subscribe("kalki/#")
    bus.send_command("light1", {"on": True})
    wait_for(lambda: light1.messages, what="light1's command")
    time.sleep(0.2)
    assert json.loads(light1.messages[0].payload) == {"on": True}
    assert [m.topic for m in light2.messages] == ["kalki/bridge/state"]  # retained, and readable


# ---------------------------------------------------------------- validation

def test_bad_messages_are_counted_and_later_ones_still_processed(broker, bus, device, caplog):
    light1, ghost = device("light1"), device(GHOST)
    kalki = Client(broker, "kalki")  # only the supervisor can write a topic no device owns
    try:
        with caplog.at_level(logging.WARNING, logger="kalki.mqtt"):
            light1.publish("kalki/light1", b"{not json")
            light1.publish("kalki/light1", b"\xff\xfe")
            light1.publish("kalki/light1", [1, 2])
            light1.publish("kalki/light1", {"nested": {"a": 1}})
            light1.publish("kalki/light1", b'{"x": NaN}')
            light1.publish("kalki/light1", {f"k{i}": i for i in range(65)})
            light1.publish("kalki/light1/availability", "maybe")
            light1.publish("kalki/light1", b"[" * 4000)        # under max_payload, nested too deeply
            light1.publish("kalki/light1", json.dumps({"pad": "x" * 5000}))  # < broker maximum
            light1.publish("kalki/light1", {"device": "light2", "on": True})
            ghost.publish("kalki/ghost", {"on": True})
            kalki.publish("kalki/has space", {"on": True})
            light1.publish("kalki/light1", {"device": "light1", "on": True, "w": 1.5, "n": None})
            wait_for(lambda: bus.seen.telemetry, what="the valid message")
    finally:
        kalki.close()
    assert bus.rejected == {"malformed": 8, "oversized": 1, "forged": 1, "unknown_device": 1,
                            "bad_topic": 1}
    assert not [r for r in caplog.records if r.exc_info]          # no traceback for any of them
    assert bus.seen.telemetry == [("light1", {"device": "light1", "on": True, "w": 1.5, "n": None})]
    logged = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(logged) == 1  # rate-limited


def test_bridge_and_echo_topics_are_ignored_quietly(bus):
    for topic in ("kalki/bridge", "kalki/bridge/state", "kalki/light1/posture", "kalki/light1/set"):
        bus.handle(topic, b"whatever")
    bus.handle("other/light1", b"{}")
    bus.handle("kalki/light1/a/b", b"{}")
    assert bus.rejected == {"bad_topic": 2}
    bus.handle("kalki/light1/availability", b"online")
    assert bus.seen.availability[-1] == ("light1", "online")


def test_callbacks_go_through_the_event_loop(broker, device):
    async def main():
        loop = asyncio.get_running_loop()
        threads = []
        got = asyncio.Event()

        def on_telemetry(name, data):
            threads.append(threading.current_thread())
            got.set()
        b = Bus("127.0.0.1", broker.port, "kalki", broker.users["kalki"], loop=loop,
                known_device=lambda name: name in DEVICES, on_telemetry=on_telemetry,
                on_availability=lambda *a: None)
        await asyncio.to_thread(b.wait_connected, 5)
        await asyncio.to_thread(device("plug1").publish, "kalki/plug1", {"power_w": 3})
        await asyncio.wait_for(got.wait(), 5)
        await asyncio.to_thread(b.close)
        return threads
    assert asyncio.run(main()) == [threading.main_thread()]


# ---------------------------------------------------------------- bridge state, posture, discovery

def test_last_will_marks_the_bridge_offline(broker):
    script = ("import sys, time; from appliance.telemetry.mqtt import Bus\n"
              "b = Bus('127.0.0.1', int(sys.argv[1]), 'kalki', sys.argv[2], known_device=bool,"
              " on_telemetry=print, on_availability=print)\n"
              "b.wait_connected(5); print('ready', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(broker.port), broker.users["kalki"]],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        wait_for(lambda: retained(broker, "kalki/bridge/state") == b'{"state": "online"}',
                 what="retained online")
        child.send_signal(signal.SIGKILL)
        child.wait()
        wait_for(lambda: retained(broker, "kalki/bridge/state") == b'{"state": "offline"}',
                 what="the last will")
    finally:
        child.kill()
        child.wait()


def test_close_publishes_offline(broker, bus):
    assert retained(broker, "kalki/bridge/state") == b'{"state": "online"}'
    bus.close()
    bus.close()
    assert not bus.connected
    assert retained(broker, "kalki/bridge/state") == b'{"state": "offline"}'


def test_posture_and_discovery(broker, bus):
    bus.publish_posture("light1", "quarantine", "2024-05-01T12:00:00Z").wait_for_publish(5)
    assert json.loads(retained(broker, "kalki/light1/posture")) == {
        "posture": "quarantine", "since": "2024-05-01T12:00:00Z", "under_attack": True}

    bus.publish_discovery("light1", "light").wait_for_publish(5)
    topic = "homeassistant/sensor/kalki_light1/posture/config"
    config = json.loads(retained(broker, topic))
    assert config["unique_id"] == "kalki_light1_posture"
    assert config["state_topic"] == "kalki/light1/posture"
    assert config["value_template"] == "{{ value_json.posture }}"
    assert config["availability_topic"] == "kalki/bridge/state"
    assert config["availability_template"] == "{{ value_json.state }}"
    assert config["device"] == {"identifiers": ["kalki_light1"], "name": "light1",
                                "model": "light", "manufacturer": "Kalki"}
    assert config["name"]

    entities = ("sensor/kalki_light1/posture", "binary_sensor/kalki_light1/under_attack",
                "select/kalki_light1/posture", "event/kalki_light1/alert")
    assert all(retained(broker, f"homeassistant/{entity}/config") for entity in entities)
    bus.remove_discovery("light1").wait_for_publish(5)
    for entity in entities:
        assert retained(broker, f"homeassistant/{entity}/config") is None, entity
    with pytest.raises(ConfigError):
        bus.send_command("light1/#", {})


def test_alerts_and_decisions_reach_the_supervisor_only(broker, bus, device):
    light1, watcher = device("light1"), device("kalki")
    light1.subscribe("kalki/bridge/#")  # devices may read bridge/state and nothing else there
    watcher.subscribe("kalki/bridge/+")
    bus.publish_alert({"device": "light1", "kind": "brute_force"}).wait_for_publish(5)
    bus.publish_decision({"device": "light1", "posture": "quarantine"}).wait_for_publish(5)
    wait_for(lambda: {"kalki/bridge/alerts", "kalki/bridge/decisions"}
             <= {m.topic for m in watcher.messages}, what="alert and decision")
    assert {m.topic for m in light1.messages} <= {"kalki/bridge/state"}


# ---------------------------------------------------------------- run-time users

def test_add_user_without_restart(broker, bus):
    pid = broker.pid
    password = random_password()
    denied = pub(broker, "-u", "plug9", "-P", password, "-t", "kalki/plug9", "-m", "{}")
    assert "not authorised" in denied.stderr
    broker.add_user("plug9", password)
    try:
        assert pub(broker, "-u", "plug9", "-P", password, "-t", "kalki/plug9",
                   "-m", '{"on": true}').returncode == 0
        assert broker.pid == pid
    finally:
        broker.remove_user("plug9")
    assert "not authorised" in pub(broker, "-u", "plug9", "-P", password, "-t", "kalki/plug9",
                                   "-m", "{}").stderr


def test_refusals_are_counted_once_after_reloads(broker, bus, device):
    broker.reload()
    broker.reload()                               # the plugin must not register itself twice
    device("light2").publish("kalki/light1", {"on": True})
    wait_for(lambda: bus.denied["light2"], what="the broker's denied report")
    time.sleep(1.2)                               # a second report, if any, would be here by now
    assert bus.denied == {"light2": 1} and bus.seen.denied == [("light2", "kalki/light1", 1)]


# ---------------------------------------------------------------- the lab's device side

def test_device_services_telemetry_and_commands(broker):
    async def main():
        loop = asyncio.get_running_loop()
        states: list[dict] = []
        bus = Bus("127.0.0.1", broker.port, "kalki", broker.users["kalki"], loop=loop,
                  known_device=lambda name: name == "light1",
                  on_telemetry=lambda name, data: states.append(data),
                  on_availability=lambda *a: None)
        light = Device("light1", "light")
        telemetry = MqttTelemetry(light, "127.0.0.1", broker.port, "light1",
                                  broker.users["light1"], interval=0.1)
        try:
            await asyncio.to_thread(bus.wait_connected, 5)
            async with asyncio.timeout(5):
                while not states:
                    await asyncio.sleep(0.02)
            assert states[0] == {"on": False, "brightness": 100}
            bus.send_command("light1", {"on": True})
            async with asyncio.timeout(5):
                while not (light.state["on"] and states[-1]["on"]):
                    await asyncio.sleep(0.02)
        finally:
            await telemetry.close()
            await asyncio.to_thread(bus.close)
        return bus.rejected
    assert asyncio.run(main()) == {}


def test_generated_passwords_survive_any_command_line():
    # A generated password once began with '-', and argparse took it for an option:
    # the lab's camera never started. Letters and digits only, long enough to guess at never.
    passwords = {random_password() for _ in range(2000)}
    assert len(passwords) == 2000
    assert all(len(p) == 32 and p.isascii() and p.isalnum() for p in passwords)


def test_a_restarted_broker_gets_the_retained_topics_again(tmp_path):
    """The faults issue, 12: after a broker restart the retained postures and Home Assistant's
    discovery were gone until the next change."""
    users = {"kalki": random_password(), "light1": random_password()}
    connects = []
    buses = []      # the callback comes from paho's thread, maybe before Bus() has returned

    def republish():
        connects.append(time.monotonic())
        wait_for(lambda: buses, what="the bus")
        buses[0].publish_posture("light1", "attack", "now")
    with Broker(tmp_path, port=free_port(), users=users) as b:
        bus = Bus("127.0.0.1", b.port, "kalki", users["kalki"], known_device=lambda n: n == "light1",
                  on_telemetry=lambda *a: None, on_availability=lambda *a: None, on_connected=republish)
        buses.append(bus)
        try:
            bus.wait_connected(5)
            wait_for(lambda: retained(b, "kalki/light1/posture") is not None, what="the first posture")
            b.stop()
            b.start()
            wait_for(lambda: len(connects) >= 2, timeout=40, what="the bus to reconnect")
            wait_for(lambda: retained(b, "kalki/light1/posture") is not None, what="the posture again")
            assert b'"attack"' in retained(b, "kalki/light1/posture")
        finally:
            bus.close()
