"""Home Assistant over MQTT (issue 14): per device an "under attack" problem sensor and a posture
select beside the posture sensor and the alert event; the discovery prefix a setting; Home
Assistant's birth message answered with every discovery config; a removed device's entities
cleared. A real Supervisor (the fake data path, tests/fakes.py) wired to a real Mosquitto on
loopback the way appliance.run wires it, with the broker's ACL and plugin (built from this
tree's source) as broker.py writes them: only Home Assistant's broker user may set a posture."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from fakes import supervisor
from test_mqtt import Client, free_port, retained
from test_rename import RecordingBus

from appliance import HOME, config, run
from appliance.errors import ConfigError
from appliance.policy import profiles
from appliance.supervisor import ops as ops_mod
from appliance.supervisor.ops import HOME_ASSISTANT, Ops
from appliance.system import broker as broker_mod
from appliance.system.broker import Broker, random_password, write_config
from appliance.telemetry.mqtt import Bus
from appliance.vocab import POSTURE_CODES, UNDER_ATTACK_ALERT_SECONDS

pytestmark = pytest.mark.skipif(not os.path.exists(broker_mod.MOSQUITTO) or not shutil.which("cc"),
                                reason="mosquitto or a C compiler is not installed")

HA = "homeassistant"                  # Home Assistant's broker user (mqtt.home_assistant_user)
LIGHT = ("02:4b:00:00:00:03", "198.18.0.12", "light")
PLUG = ("02:4b:00:00:00:02", "198.18.0.11", "plug")
LIGHT_NODE, PLUG_NODE = "kalki_024b00000003", "kalki_024b00000002"    # by MAC (Supervisor.ha_node)
ENTITIES = ("sensor/{node}/posture", "binary_sensor/{node}/under_attack", "select/{node}/posture",
            "event/{node}/alert")


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The broker plugin from the source in this tree, as scripts/setup.sh builds it."""
    out = tmp_path_factory.mktemp("plugin") / "kalki_denials.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
                    str(HOME / "mosquitto" / "kalki_denials.c")], check=True, capture_output=True)
    return out


def start_broker(directory: Path, plugin, prefix: str = "homeassistant") -> Broker:
    users = {name: random_password() for name in ("kalki", HA, "light1", "plug1")}
    return Broker(directory, port=free_port(), users=users, denials_plugin=plugin,
                  home_assistant_user=HA, discovery_prefix=prefix).start()


@pytest.fixture
def broker(tmp_path, plugin):
    b = start_broker(tmp_path / "mqtt", plugin)
    yield b
    b.stop()


@pytest.fixture
def sup(tmp_path):
    s = supervisor(tmp_path, light1=LIGHT, plug1=PLUG)
    yield s
    s.store.close()


@pytest.fixture
def clients(broker):
    made: list[Client] = []

    def connect(user):
        made.append(Client(broker, user))
        return made[-1]
    yield connect
    for c in made:
        c.close()


@contextlib.asynccontextmanager
async def wired(sup, broker):
    """The supervisor's bus as appliance.run makes and wires it, on the test's broker."""
    sup.cfg.mqtt.port = broker.port
    sup.cfg.mqtt.discovery_prefix = broker.discovery_prefix
    Path(sup.cfg.mqtt.password_file).write_text(broker.users["kalki"])
    bus = run.connect_mqtt(sup.cfg, sup, Ops(sup), asyncio.get_running_loop())
    sup.attach_bus(bus)
    try:
        await asyncio.to_thread(bus.wait_connected, 5)
        yield bus
    finally:
        sup.bus = None
        await asyncio.to_thread(bus.close)


async def until(predicate, what: str, timeout: float = 8.0) -> None:
    """Waits on the loop, which the bus's callbacks need, for predicate (run in a thread: it may
    ask the broker)."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def held(broker, topic):
    payload = retained(broker, topic)
    return json.loads(payload) if payload else None


def audits(sup, event: str) -> list[dict]:
    return [r for r in sup.store.decisions(kind="audit", limit=100) if r["event"] == event]


# ---------------------------------------------------------------- the entities

def test_the_new_entities_discovery_payloads(broker):
    bus = Bus("127.0.0.1", broker.port, "kalki", broker.users["kalki"], known_device=bool,
              on_telemetry=lambda *a: None, on_availability=lambda *a: None)
    try:
        bus.wait_connected(5)
        bus.publish_discovery("light1", "light", ["normal", "suspicious", "quarantine"]).wait_for_publish(5)
        problem = held(broker, "homeassistant/binary_sensor/kalki_light1/under_attack/config")
        select = held(broker, "homeassistant/select/kalki_light1/posture/config")
        posture = held(broker, "homeassistant/sensor/kalki_light1/posture/config")
        event = held(broker, "homeassistant/event/kalki_light1/alert/config")
    finally:
        bus.close()
    assert problem == {
        "name": "Under attack", "unique_id": "kalki_light1_under_attack", "device_class": "problem",
        "state_topic": "kalki/light1/posture",
        "value_template": "{{ 'ON' if value_json.under_attack else 'OFF' }}",
        "payload_on": "ON", "payload_off": "OFF",
        "availability_topic": "kalki/bridge/state", "availability_template": "{{ value_json.state }}",
        "device": posture["device"]}
    assert select == {
        "name": "Set posture", "unique_id": "kalki_light1_posture_select",
        "state_topic": "kalki/light1/posture", "value_template": "{{ value_json.posture }}",
        "command_topic": "kalki/light1/posture/set",
        "options": ["normal", "suspicious", "quarantine"], "qos": 1,
        "availability_topic": "kalki/bridge/state", "availability_template": "{{ value_json.state }}",
        "device": posture["device"]}
    # one Home Assistant device, four entities of their own
    assert posture["device"] == event["device"] == {"identifiers": ["kalki_light1"], "name": "light1",
                                                    "model": "light", "manufacturer": "Kalki"}
    assert len({c["unique_id"] for c in (problem, select, posture, event)}) == 4


@pytest.mark.parametrize("posture, attacked", [("normal", False), ("suspicious", False),
                                               ("learning", False), ("attack", True),
                                               ("quarantine", True)])
def test_under_attack_is_attack_or_quarantine_by_the_posture(posture, attacked):
    bus = RecordingBus()
    bus.publish_posture("light1", posture, "2024-05-01T12:00:00Z")
    assert bus.published[-1] == ("kalki/light1/posture", {
        "posture": posture, "since": "2024-05-01T12:00:00Z", "under_attack": attacked}, True)


def test_a_recent_critical_alert_is_under_attack_until_it_is_old_or_judged(sup):
    bus = RecordingBus()
    sup.attach_bus(bus)
    ops = Ops(sup)

    def attacked():
        return bus.retained()["kalki/light1/posture"]["under_attack"]
    sup.republish()
    assert not attacked()
    sup.raise_alert("light1", "api-denied", "gate", {}, time.monotonic_ns())       # a warning
    assert not attacked()
    # critical, and no rule moves a posture on it: the posture stays, Home Assistant is told
    sup.raise_alert("light1", "default-credentials", "supervisor", {}, time.monotonic_ns())
    assert sup.known["light1"]["posture"] == "normal" and attacked()
    sup._expire_critical_alerts()
    assert attacked()                                        # still recent
    sup._critical_at["light1"] -= UNDER_ATTACK_ALERT_SECONDS
    sup._expire_critical_alerts()
    assert not attacked()
    # an operator who lowers the posture has judged what came before
    sup.raise_alert("light1", "default-credentials", "supervisor", {}, time.monotonic_ns())
    ops.posture_set("light1", "attack")
    assert attacked()
    ops.posture_set("light1", "suspicious")
    assert not attacked() and bus.retained()["kalki/light1/posture"]["posture"] == "suspicious"


def test_the_select_offers_the_postures_of_the_devices_type(sup):
    bus = RecordingBus()
    sup.attach_bus(bus)
    tiny = profiles.parse_profile({"type": "tiny", "postures": {"normal": {}}}, Path("tiny.toml"))
    sup.profiles["tiny"] = tiny
    sup.add_device("tiny1", "02:4b:00:00:00:09", "198.18.0.19", "tiny", approve=True)
    node = sup.ha_node("tiny1")
    assert bus.retained()[f"homeassistant/select/{node}/posture/config"]["options"] == \
        ["normal", "quarantine"]         # a profile's own, and quarantine, always there; never learning
    sup.republish()
    assert bus.retained()[f"homeassistant/select/{LIGHT_NODE}/posture/config"]["options"] == \
        ["normal", "suspicious", "attack", "quarantine"]
    # a device learning whose profile is gone: where it is would be the one option, not offered
    Ops(sup).device_learn("tiny1")
    del sup.profiles["tiny"]
    assert sup.posture_options("tiny1") == ["normal"]


# ---------------------------------------------------------------- the discovery prefix

def test_the_discovery_prefix_is_a_setting(tmp_path, plugin):
    path = tmp_path / "kalki.toml"
    path.write_text('[mqtt]\ndiscovery_prefix = "ha/site1"\n')
    assert config.load(path).mqtt.discovery_prefix == "ha/site1"
    assert config.Config().mqtt.discovery_prefix == "homeassistant"

    async def main(sup, broker):
        async with wired(sup, broker) as bus:
            await until(lambda: retained(broker, f"ha/site1/select/{LIGHT_NODE}/posture/config"),
                        "the select under the prefix")
            assert retained(broker, f"homeassistant/select/{LIGHT_NODE}/posture/config") is None
            assert bus.bridge_event_discovery_topic() == "ha/site1/event/kalki_bridge/alert/config"
            assert retained(broker, "ha/site1/event/kalki_bridge/alert/config")
            # Home Assistant reads there (the ACL is the prefix's too), and is answered there
            home_assistant = Client(broker, HA)
            try:
                home_assistant.subscribe("ha/site1/#")
                await until(lambda: any(m.topic.endswith("/config") for m in home_assistant.messages),
                            "Home Assistant to read the configs")
                republished = sup.counters["mqtt_republished"]
                home_assistant.publish("ha/site1/status", "online")
                await until(lambda: sup.counters["mqtt_republished"] == republished + 1,
                            "the configs published again")
            finally:
                home_assistant.close()

    sup = supervisor(tmp_path / "sup", light1=LIGHT)
    broker = start_broker(tmp_path / "mqtt", plugin, prefix="ha/site1")
    try:
        asyncio.run(main(sup, broker))
    finally:
        broker.stop()
        sup.store.close()


@pytest.mark.parametrize("prefix", ["", "a/#", "home/+/x", "/ha", "ha/", "ha//x", "h a", "ha\n",
                                    "kalki", "kalki/ha", "x" * 65])
def test_a_bad_discovery_prefix_is_refused_naming_the_setting(tmp_path, prefix):
    path = tmp_path / "kalki.toml"
    path.write_text(f"[mqtt]\ndiscovery_prefix = {json.dumps(prefix)}\n")
    with pytest.raises(ConfigError, match=f"{path}: mqtt.discovery_prefix: ") as e:
        config.load(path)
    assert repr(prefix) in str(e.value)
    with pytest.raises(ConfigError, match="discovery prefix"):
        write_config(tmp_path / "mqtt", users={"kalki": "pw"}, discovery_prefix=prefix)
    with pytest.raises(ConfigError, match="discovery prefix"):
        Bus("127.0.0.1", 1, "kalki", "pw", known_device=bool, on_telemetry=print,
            on_availability=print, discovery_prefix=prefix)


@pytest.mark.parametrize("user, culprit", [("a b", "home_assistant_user 'a b'"),
                                           ("kalki", "supervisor's broker user"),
                                           ("bridge", "reserved")])
def test_a_bad_home_assistant_user_is_refused_naming_the_setting(tmp_path, user, culprit):
    path = tmp_path / "kalki.toml"
    path.write_text(f'[mqtt]\nhome_assistant_user = "{user}"\n')
    with pytest.raises(ConfigError, match="mqtt.home_assistant_user") as e:
        config.load(path)
    assert culprit in str(e.value)
    path.write_text('[mqtt]\nhome_assistant_user = ""\n')       # none
    assert config.load(path).mqtt.home_assistant_user == ""


# ---------------------------------------------------------------- the broker

def test_the_acl_gives_home_assistant_its_topics_and_the_posture_commands(tmp_path):
    conf = write_config(tmp_path, users={"kalki": "a", HA: "b", "light1": "c"}, home_assistant_user=HA,
                        denials_plugin=HOME / "build" / "kalki_denials.so")
    acl = (tmp_path / "acl").read_text().split("\n\n")
    assert f"user {HA}" in acl[1].splitlines()
    assert set(acl[1].splitlines()[1:]) == {
        "topic read homeassistant/#", "topic write homeassistant/status",
        "topic read kalki/+/posture", "topic write kalki/+/posture/set", "topic read kalki/+/alert",
        "topic read kalki/bridge/state", "topic read kalki/bridge/event"}
    if (HOME / "build" / "kalki_denials.so").is_file():
        assert f"plugin_opt_home_assistant {HA}" in conf.read_text().splitlines()
    without = write_config(tmp_path / "without", users={"kalki": "a"})
    assert f"user {HA}" not in (tmp_path / "without" / "acl").read_text()
    assert "home_assistant" not in without.read_text()
    with pytest.raises(ConfigError, match="Home Assistant user"):
        write_config(tmp_path / "bad", users={"kalki": "a"}, home_assistant_user="kalki")


def test_only_home_assistants_user_may_publish_a_posture_command_by_the_acl_alone(tmp_path):
    """The ACL file is the gate (the plugin only refuses earlier and counts): a broker without
    the plugin delivers Home Assistant's command and none of a device's."""
    users = {name: random_password() for name in ("kalki", HA, "light1")}
    with Broker(tmp_path, port=free_port(), users=users, denials_plugin=None,
                home_assistant_user=HA) as b:
        watcher, light1, home_assistant = Client(b, "kalki"), Client(b, "light1"), Client(b, HA)
        try:
            watcher.subscribe("kalki/+/posture/set")
            light1.publish("kalki/light1/posture/set", "normal")
            light1.publish("kalki/plug1/posture/set", "normal")
            home_assistant.publish("kalki/light1/posture/set", "quarantine")
            deadline = time.monotonic() + 5
            while not watcher.messages and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)
            assert [(m.topic, m.payload) for m in watcher.messages] == [
                ("kalki/light1/posture/set", b"quarantine")]
        finally:
            for c in (watcher, light1, home_assistant):
                c.close()


# ---------------------------------------------------------------- commands

def test_a_command_from_home_assistant_sets_the_posture(sup, broker, clients):
    async def main():
        async with wired(sup, broker):
            home_assistant = clients(HA)
            home_assistant.publish("kalki/light1/posture/set", "quarantine")
            await until(lambda: sup.known["light1"]["posture"] == "quarantine", "the posture")
            # the select's state is the posture topic's: it follows
            await until(lambda: (held(broker, "kalki/light1/posture") or {}).get("posture") == "quarantine",
                        "the retained posture")
            assert held(broker, "kalki/light1/posture")["under_attack"] is True
    asyncio.run(main())
    assert sup.dp.read_back("light1") == POSTURE_CODES["quarantine"]            # enforced
    record = audits(sup, "posture")[0]
    assert record["actor"] == HOME_ASSISTANT == "Home Assistant"
    assert record["details"]["device"] == "light1" and record["details"]["posture"] == "quarantine"
    assert sup.store.posture_history("light1", 1)[0]["reason"] == "set by Home Assistant"


def test_a_devices_command_is_refused_by_the_broker(sup, broker, clients):
    async def main():
        async with wired(sup, broker) as bus:
            light1 = clients("light1")
            light1.publish("kalki/light1/posture/set", "learning")      # its own
            light1.publish("kalki/plug1/posture/set", "learning")       # another's
            await until(lambda: bus.denied["light1"] == 2, "the broker's refusals")
            # nor may Home Assistant speak for a device (its telemetry)
            home_assistant = clients(HA)
            home_assistant.publish("kalki/light1", {"on": True})
            home_assistant.publish("kalki/light1/posture/set", "suspicious")     # a marker
            await until(lambda: sup.known["light1"]["posture"] == "suspicious", "Home Assistant's")
            assert not sup.recent_telemetry("light1")
    asyncio.run(main())
    assert sup.known["plug1"]["posture"] == "normal"
    assert [r["details"]["posture"] for r in audits(sup, "posture")
            if r["actor"] == HOME_ASSISTANT] == ["suspicious"]
    denied = [a for a in sup.store.alerts(limit=10) if a["type"] == "mqtt-denied"]
    assert denied and all(a["device"] == "light1" for a in denied)


def test_a_bad_command_changes_nothing_and_names_the_culprit(sup, broker, clients, caplog,
                                                              monkeypatch):
    home_assistant = clients(HA)
    # given before the supervisor listens: stale when it arrives (retained), and never obeyed
    home_assistant.publish("kalki/light1/posture/set", "attack", retain=True)

    async def main():
        async with wired(sup, broker) as bus:
            await until(lambda: bus.rejected["retained"] == 1, "the stale command")
            with caplog.at_level(logging.ERROR, logger="kalki.ops"):
                home_assistant.publish("kalki/light1/posture/set", "panic")
                home_assistant.publish("kalki/light1/posture/set", "unknown")     # never settable
                home_assistant.publish("kalki/nope/posture/set", "attack")        # no such device
                home_assistant.publish("kalki/light1/posture/set", b"\xff\xfe")
                home_assistant.publish("kalki/light1/posture/set", "q" * 100)
                await until(lambda: sum(bus.rejected.values()) == 3, "three rejections")
                # the minute is over: the next refusal is recorded, counting the one that was not
                monkeypatch.setattr(ops_mod, "REFUSED_COMMAND_AUDIT_SECONDS", 0)
                home_assistant.publish("kalki/light1/posture/set", "learning")
                await until(lambda: len(audits(sup, "posture-refused")) == 2, "two records")
            assert bus.rejected == {"malformed": 1, "oversized": 1, "retained": 1}
    alerts_before = len(sup.store.alerts(limit=100))
    asyncio.run(main())
    assert sup.known["light1"]["posture"] == "normal" and "nope" not in sup.known
    assert not [r for r in audits(sup, "posture") if r["actor"] == HOME_ASSISTANT]
    # "unknown" within the minute of "panic": counted, not recorded; "nope" is no device
    refused = [(r["details"]["device"], r["details"]["posture"], r["details"].get("suppressed"))
               for r in audits(sup, "posture-refused")][::-1]
    assert refused == [("light1", "panic", None), ("light1", "learning", 1)]
    assert all(r["actor"] == HOME_ASSISTANT for r in audits(sup, "posture-refused"))
    logged = [r.getMessage() for r in caplog.records if r.name == "kalki.ops"]
    assert any("light1" in m and "'panic'" in m for m in logged), logged
    assert any("nope" in m for m in logged), logged
    assert len(sup.store.alerts(limit=100)) == alerts_before           # an audit, not an alert


def test_a_posture_outside_the_devices_type_is_refused(sup):
    sup.profiles["tiny"] = profiles.parse_profile({"type": "tiny", "postures": {"normal": {}}},
                                                  Path("tiny.toml"))
    sup.add_device("tiny1", "02:4b:00:00:00:09", "198.18.0.19", "tiny", approve=True)
    assert Ops(sup).home_assistant_posture("tiny1", "attack") is None
    assert sup.known["tiny1"]["posture"] == "normal"
    assert audits(sup, "posture-refused")[0]["details"]["error"] == \
        "device tiny1: unknown posture 'attack' (its type's: normal, quarantine)"
    assert Ops(sup).home_assistant_posture("tiny1", "quarantine")["posture"] == "quarantine"


def test_learning_is_refused_from_home_assistant(sup, caplog):
    """Set from there, learning (the most permissive posture) would have no end."""
    ops = Ops(sup)
    with caplog.at_level(logging.ERROR, logger="kalki.ops"):
        assert ops.home_assistant_posture("light1", "learning") is None
    assert sup.known["light1"]["posture"] == "normal"
    [record] = audits(sup, "posture-refused")
    assert record["actor"] == HOME_ASSISTANT
    assert record["details"]["device"] == "light1" and record["details"]["posture"] == "learning"
    assert "'learning'" in record["details"]["error"] and "no end" in record["details"]["error"]
    assert any("light1" in r.getMessage() and "'learning'" in r.getMessage() for r in caplog.records)
    ops.device_learn("light1")                   # an operator's, for a while
    assert sup.known["light1"]["posture"] == "learning" and sup.known["light1"]["posture_expires"]


def test_refusals_are_recorded_once_a_minute_per_device_and_never_for_a_name_that_is_no_device(
        sup, caplog):
    ops = Ops(sup)

    def later(seconds):
        ops._refused_commands = {k: (at - seconds, n) for k, (at, n) in ops._refused_commands.items()}
    with caplog.at_level(logging.ERROR, logger="kalki.ops"):
        for i in range(5):
            ops.home_assistant_posture("light1", f"panic{i}")
        ops.home_assistant_posture("plug1", "panic")         # another device: its own minute
        for _ in range(3):
            ops.home_assistant_posture("nope", "attack")
        later(59)
        ops.home_assistant_posture("light1", "panic5")
        later(2)
        ops.home_assistant_posture("light1", "panic6")
        ops.home_assistant_posture("nope", "attack")
    recorded = [(r["details"]["device"], r["details"]["posture"], r["details"].get("suppressed"))
                for r in audits(sup, "posture-refused")][::-1]
    assert recorded == [("light1", "panic0", None), ("plug1", "panic", None),
                        ("light1", "panic6", 5)]
    assert not [r for r in sup.store.decisions(limit=100) if r.get("device") == "nope"
                or (r.get("details") or {}).get("device") == "nope"]
    logged = [r.getMessage() for r in caplog.records if r.name == "kalki.ops"]
    assert len(logged) == 5                          # what is recorded, and nope's once a minute
    assert [m for m in logged if "nope" in m][1].endswith("(2 more refused since, not recorded)")


# ---------------------------------------------------------------- birth, removal, rename

def test_online_on_the_status_topic_publishes_every_discovery_config_again(sup, broker, clients):
    configs = [f"homeassistant/{e.format(node=node)}/config"
               for node in (LIGHT_NODE, PLUG_NODE) for e in ENTITIES]

    async def main():
        async with wired(sup, broker):
            await until(lambda: all(retained(broker, t) for t in configs), "the configs at connect")
            cleaner = clients("kalki")             # a broker restarted without them, say
            for topic in configs:
                cleaner.publish(topic, "", retain=True)
            assert not any(retained(broker, t) for t in configs)
            republished = sup.counters["mqtt_republished"]
            home_assistant = clients(HA)
            home_assistant.publish("homeassistant/status", "offline")       # its last will: nothing
            home_assistant.publish("homeassistant/status", "online")
            await until(lambda: all(retained(broker, t) for t in configs), "the configs again")
            await asyncio.sleep(0.3)
            assert sup.counters["mqtt_republished"] == republished + 1
            # a device may not pretend to be Home Assistant
            clients("light1").publish("homeassistant/status", "online")
            await asyncio.sleep(1.3)
            assert sup.counters["mqtt_republished"] == republished + 1
    asyncio.run(main())


def test_removed_clears_every_entity_and_renamed_keeps_the_node(sup, broker, clients):
    light = [f"homeassistant/{e.format(node=LIGHT_NODE)}/config" for e in ENTITIES]

    async def main():
        ops = Ops(sup)
        async with wired(sup, broker):
            await until(lambda: all(retained(broker, t) for t in light), "the light's configs")
            ops.device_rename("light1", "hall")
            await until(lambda: (held(broker, light[2]) or {}).get("command_topic")
                        == "kalki/hall/posture/set", "the select under the new name")
            for topic in light:                  # the same node and unique_id, the new name
                assert held(broker, topic)["device"]["name"] == "hall"
            assert held(broker, light[1])["state_topic"] == "kalki/hall/posture"
            clients(HA).publish("kalki/hall/posture/set", "attack")
            await until(lambda: sup.known["hall"]["posture"] == "attack", "the posture by its new name")
            ops.device_remove("hall")
            await until(lambda: not any(retained(broker, t) for t in light), "every entity cleared")
            assert retained(broker, f"homeassistant/select/{PLUG_NODE}/posture/config")   # not plug1's
    asyncio.run(main())


def test_a_device_may_not_take_home_assistants_name(sup):
    with pytest.raises(ConfigError, match="homeassistant is Home Assistant's MQTT user"):
        sup.add_device(HA, "02:4b:00:00:00:0b", "198.18.0.21", "plug")
    with pytest.raises(ConfigError, match="Home Assistant's MQTT user"):
        Ops(sup).device_rename("plug1", HA)
    sup.discovered("02:4b:00:00:00:0a", "198.18.0.20", {"hostname": HA})
    assert HA not in sup.known and "homeassistant-00000a" in sup.known


def test_a_device_logging_in_as_home_assistant_s_user_stops_its_commands(tmp_path, caplog):
    """mqtt.home_assistant_user named after a device was added as that user: the broker lets
    the user set any posture, so a command may be the device's. Refused and said, at start
    (an alert naming the device) and at each command (an audit naming both)."""
    from fakes import FakeDataplane

    from appliance.supervisor.core import Supervisor
    first = supervisor(tmp_path, light1=LIGHT, plug1=PLUG)
    first.store.close()
    cfg = first.cfg
    cfg.mqtt.home_assistant_user = "plug1"          # set later, in the config file
    s = Supervisor(cfg)
    try:
        with caplog.at_level(logging.ERROR, logger="kalki.supervisor"):
            s.attach(FakeDataplane(), loop=None)
        [alert] = [a for a in s.store.alerts(limit=20) if a["type"] == "mqtt-user-clash"]
        assert alert["device"] == "plug1" and alert["details"]["user"] == "plug1"
        assert any("plug1" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
        assert Ops(s).home_assistant_posture("light1", "quarantine") is None
        assert s.known["light1"]["posture"] == "normal"
        [refused] = audits(s, "posture-refused")
        assert "device plug1's" in refused["details"]["error"]
        assert "mqtt.home_assistant_user" in refused["details"]["error"]
        cfg.mqtt.home_assistant_user = "homeassistant"     # another user named: obeyed again
        assert Ops(s).home_assistant_posture("light1", "quarantine")["posture"] == "quarantine"
    finally:
        s.store.close()
