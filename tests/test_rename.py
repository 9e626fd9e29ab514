"""Devices renamed and grouped (issue 14, item 3), lab-free: a real Supervisor and store with the
fake data path (tests/fakes.py), a Bus whose publishes are recorded instead of sent, and the web
page served for real (tests/test_web.py's helpers).

A rename keeps the device's identity (MAC, slot in the data path, posture: nothing is removed or
applied again), its history (posture history, alerts, decisions, audit: found under the new name,
also after a restart), and its MQTT identity (the broker user and topic its firmware uses); the
supervisor's own retained topics move, and Home Assistant keeps the entity (same node, same
unique_id)."""
from __future__ import annotations

import json

import pytest
from fakes import supervisor
from test_web import aiotest, client, login, set_admin

from appliance.errors import ConfigError, UnknownDeviceError
from appliance.faces.web.icons import icon, icon_of
from appliance.store.state import Store
from appliance.supervisor.core import Supervisor
from appliance.supervisor.ops import Ops
from appliance.telemetry.adapters import HueAdapter
from appliance.telemetry.mqtt import Bus

CAMERA = ("02:4b:00:00:00:01", "198.18.0.10", "camera")
PLUG = ("02:4b:00:00:00:02", "198.18.0.11", "plug")
LIGHT = ("02:4b:00:00:00:03", "198.18.0.12", "light")


@pytest.fixture
def sup(tmp_path):
    s = supervisor(tmp_path, camera1=CAMERA, plug1=PLUG, light1=LIGHT)
    yield s
    s.store.close()


@pytest.fixture
def web_sup(tmp_path):
    """As tests/test_web.py's: two approved devices and one waiting, the page on plain HTTP."""
    s = supervisor(tmp_path, camera1=CAMERA, plug1=PLUG)
    s.cfg.web.tls = False
    s.discovered("02:4b:00:00:00:03", "198.18.0.12")
    yield s
    s.store.close()


class RecordingBus(Bus):
    """The real Bus's topics and payloads, recorded instead of published (no broker)."""

    def __init__(self):      # noqa: D107 - none of Bus's connection
        self.base, self.state_topic, self.node_of = "kalki", "kalki/bridge/state", None
        self.discovery_prefix = "homeassistant"
        self.published: list[tuple[str, object, bool]] = []

    def _publish(self, topic, payload, retain=False):
        self.published.append((topic, payload, retain))

    def retained(self) -> dict:
        """What the broker would hold now: the last retained payload of each topic ("" forgets)."""
        held: dict = {}
        for topic, payload, retain in self.published:
            if retain:
                held[topic] = payload
        return {t: p for t, p in held.items() if p != ""}


def test_a_rename_keeps_identity_history_and_enforcement(sup, tmp_path):
    ops = Ops(sup)
    device_id = list(sup.dp.devices).index("camera1") + 1
    ops.posture_set("camera1", "suspicious", "1h")
    sup.raise_alert("camera1", "api-denied", "gate", {"source": "198.18.0.66"}, 0)
    sup.on_telemetry("camera1", {"motion": True})
    sup.flows.record("refused", "camera1", {"proto": 6, "dst": "203.0.113.9", "dst_port": 443},
                     ["cloud.example.com"], "2024-01-01T00:00:00+00:00")
    before = ops.device_show("camera1")

    r = ops.device_rename("camera1", "frontdoor", actor="web:admin")
    assert r["from"] == "camera1" and r["device"]["name"] == "frontdoor"
    # the data path: the same slot under the new name, nothing removed or applied anew
    assert sup.dp.removed == [] and "camera1" not in sup.dp.devices
    assert list(sup.dp.devices).index("frontdoor") + 1 == device_id
    assert sup.dp.read_back("frontdoor") == sup.dp.devices["frontdoor"].posture
    after = ops.device_show("frontdoor")
    for key in ("mac", "ip", "type", "approved", "posture", "posture_since", "posture_expires",
                "first_seen", "enforced"):
        assert after[key] == before[key], key
    # the posture history, each record now under the new name
    assert after["history"] == [{**h, "device": "frontdoor"} for h in before["history"]]
    assert [a["id"] for a in after["alerts"]] == [a["id"] for a in before["alerts"]]
    assert all(a["device"] == "frontdoor" for a in after["alerts"])
    assert after["flows"]["refused"] and sup.recent_telemetry("frontdoor")
    decisions = ops.decisions(device="frontdoor")
    assert {"posture", "device-rename"} <= {d.get("event") for d in decisions}
    rename = next(d for d in decisions if d.get("event") == "device-rename")
    assert rename["actor"] == "web:admin" and rename["details"]["from"] == "camera1"
    # the old name is no device any more, and says what it became
    with pytest.raises(UnknownDeviceError, match="renamed frontdoor"):
        ops.alerts(device="camera1")
    with pytest.raises(UnknownDeviceError):
        ops.device_show("camera1")
    # the timed posture still ends, under the new name
    assert sup.known["frontdoor"]["posture_revert_to"] == "normal"

    # after a restart: the same
    sup.store.flush()
    sup.store.close()
    again = Supervisor(sup.cfg)
    try:
        assert again.store.posture_history("frontdoor", 20) == after["history"]
        assert again.store.posture_history("camera1") == []
        assert [a["id"] for a in again.store.alerts(device="frontdoor")] == \
            [a["id"] for a in before["alerts"]]
        assert again.known["frontdoor"]["mqtt_user"] == "camera1"
    finally:
        again.store.close()


def test_history_follows_each_rename_and_only_its_own_records(tmp_path):
    """A name given up and taken by another device later: the old records stay the renamed
    device's, the new ones are the newcomer's, after restarts too; a failed batch moves nothing."""
    store = Store(tmp_path)
    try:
        store.upsert_device("cam", "02:00:00:00:00:01")
        store.record_posture("cam", "normal", "approved")
        store.add_alert({"device": "cam", "type": "port-scan", "source": "kernel", "severity": "warning"})
        with pytest.raises(RuntimeError), store.batch():
            store.rename_device("cam", "door", logs=True)
            raise RuntimeError("the write after it failed")
        assert store.get_device("cam") and len(store.alerts(device="cam")) == 1
        store.rename_device("cam", "door", logs=True)
        store.upsert_device("cam", "02:00:00:00:00:02")          # another device, the name free
        store.record_posture("cam", "unknown", "new device")
        store.rename_device("door", "hall", logs=True)
        store.rename_device("cam", "porch", logs=True)           # the second "cam" goes too
        store.upsert_device("cam", "02:00:00:00:00:03")          # and a third one comes
        store.record_posture("cam", "unknown", "third device")
        store.flush()
    finally:
        store.close()
    for _ in range(2):         # a start files them again, and so does the next
        store = Store(tmp_path)
        try:
            assert [h["reason"] for h in store.posture_history("hall")] == ["approved"]
            assert [h["reason"] for h in store.posture_history("porch")] == ["new device"]
            assert [h["reason"] for h in store.posture_history("cam")] == ["third device"]
            assert [a["device"] for a in store.alerts(device="hall")] == ["hall"]
            assert [f["name"] for f in store.get_device("hall")["former_names"]] == ["cam", "door"]
        finally:
            store.close()


def test_a_rename_is_refused_with_the_culprit_named_and_nothing_changed(sup, tmp_path):
    ops = Ops(sup)
    (tmp_path / "mqtt").mkdir()
    (tmp_path / "mqtt" / "passwords").write_text("camera1:x\nplug1:x\nlight1:x\nghost:x\n")
    cases = [("plug1", "device camera1: cannot rename it plug1: device plug1 has that name"),
             ("cam.1", "device camera1: new name 'cam.1': use 1 to 40 letters"),
             ("", "new name ''"), ("x" * 41, "use 1 to 40 letters"),
             ("bridge", "kalki/bridge is the supervisor's"),
             ("ghost", "ghost is a user of the MQTT broker")]
    for new, words in cases:
        with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("(", r"\(")):
            ops.device_rename("camera1", new)
    with pytest.raises(UnknownDeviceError):
        ops.device_rename("nope", "other")
    assert "camera1" in sup.known and "camera1" in sup.dp.devices and sup.dp.removed == []
    assert not [d for d in ops.decisions(kind="audit") if d["event"] == "device-rename"]
    # a renamed device's MQTT user stays its own: no other device may take that name
    ops.device_rename("camera1", "frontdoor")
    with pytest.raises(ConfigError, match="camera1 is taken: device frontdoor, renamed, still uses it"):
        ops.device_rename("plug1", "camera1")
    with pytest.raises(ConfigError, match="camera1 is taken"):
        sup.add_device("camera1", "02:4b:00:00:00:09", "198.18.0.19", "plug")
    sup.discovered("02:4b:00:00:00:0a", "198.18.0.20", {"hostname": "camera1"})
    assert "camera1" not in sup.known                          # a new device got another name
    # and it may take its first name back
    ops.device_rename("frontdoor", "camera1")
    assert sup.known["camera1"].get("mqtt_user") is None


def test_the_retained_topics_move_and_home_assistant_keeps_the_entity(sup):
    bus = RecordingBus()
    sup.attach_bus(bus)
    # one approved before discovery was keyed by MAC: its node is its name then
    sup.known["old1"] = sup.store.upsert_device("old1", "02:4b:00:00:00:05", ip="198.18.0.15",
                                                type="plug", approved=True, posture="normal")
    sup.republish()
    held = bus.retained()
    camera_config = held["homeassistant/sensor/kalki_024b00000001/posture/config"]
    old_config = held["homeassistant/sensor/kalki_old1/posture/config"]
    assert camera_config["unique_id"] == "kalki_024b00000001_posture"       # by MAC, now
    assert old_config["unique_id"] == "kalki_old1_posture"                  # as it always was
    assert json.dumps(held["kalki/camera1/posture"])

    bus.published.clear()
    Ops(sup).device_rename("camera1", "frontdoor")
    Ops(sup).device_rename("old1", "hall-plug")
    topics = [(t, p) for t, p, _ in bus.published]
    # the posture: the old retained topic cleared, the new one published
    assert ("kalki/camera1/posture", "") in topics and ("kalki/old1/posture", "") in topics
    held = bus.retained()
    assert "kalki/camera1/posture" not in held and "kalki/old1/posture" not in held
    assert held["kalki/frontdoor/posture"]["posture"] == "normal"
    assert held["kalki/hall-plug/posture"]["posture"] == "normal"
    # discovery: the same topics and unique_ids, never cleared (Home Assistant would drop the
    # entity), with the new name and state topic
    assert not [t for t, p in topics if t.startswith("homeassistant/") and p == ""]
    for node, name in (("kalki_024b00000001", "frontdoor"), ("kalki_old1", "hall-plug")):
        config = held[f"homeassistant/sensor/{node}/posture/config"]
        assert config["unique_id"] == f"{node}_posture"
        assert config["device"]["identifiers"] == [node] and config["device"]["name"] == name
        assert config["state_topic"] == f"kalki/{name}/posture"
    assert not [t for t in held if "frontdoor" in t and t.startswith("homeassistant/")]

    # the device keeps speaking as camera1: its telemetry, availability and refusals are the
    # renamed device's, and its commands go where it reads them
    assert sup.device_for_topic("camera1") == "frontdoor"
    assert sup.device_for_topic("frontdoor") == "frontdoor"
    assert sup.device_for_topic("ghost") is None
    sup.on_telemetry("camera1", {"motion": True})
    sup.on_availability("camera1", "online")
    assert sup.recent_telemetry("frontdoor") and sup.availability["frontdoor"] == "online"
    sup.on_denied("camera1", "kalki/plug1", 3)
    assert sup.store.alerts(device="frontdoor", limit=1)[0]["type"] == "mqtt-denied"
    assert bus.send_command(sup.mqtt_name("frontdoor"), {"on": True}) is None
    assert bus.published[-1][0] == "kalki/camera1/set"

    # removed: its discovery is cleared under the node Home Assistant knows
    bus.published.clear()
    sup.remove("frontdoor")
    assert ("homeassistant/sensor/kalki_024b00000001/posture/config", "", True) in bus.published


def test_the_data_path_moves_only_the_name(tmp_path):
    """Dataplane.rename, without a kernel: the device keeps its id, its indexes, its name bindings
    and its gate policy (written again, naming it anew); no map or nftables call is made (the
    instance has none: any would fail)."""
    from fakes import FakeTable

    from appliance.dataplane import gatepolicy, umbox
    from appliance.dataplane.api import Dataplane, DeviceSpec, _Applied
    from appliance.dataplane.names import NameBindings
    from appliance.policy import profiles

    dp = Dataplane("rename-test")
    dp._names = NameBindings(FakeTable())
    dp._gate_files = gatepolicy.PolicyFiles(tmp_path / "gate")
    stack = profiles.load_all()["camera"].stack("suspicious")     # behind the gate
    spec = DeviceSpec("camera1", "02:4b:00:00:00:01", "198.18.0.10", stack, 1).checked()
    compiled = umbox.compile_stack(stack)
    dp._put(_Applied(spec, 7, compiled))
    dp._write_gate_policy(spec, compiled)
    dp.rename("camera1", "frontdoor")
    assert list(dp.devices) == ["frontdoor"] and dp.device_id("frontdoor") == 7
    assert dp.devices["frontdoor"].mac == spec.mac and dp.devices["frontdoor"].posture == 1
    assert dp.device_by_ip("198.18.0.10") == "frontdoor" and dp._name_by_id[7] == "frontdoor"
    assert dp._names._devices[7].name == "frontdoor"
    assert json.loads(dp._gate_files.path("198.18.0.10").read_text())["device"] == "frontdoor"
    with pytest.raises(ConfigError, match="new name 'a b'"):
        dp.rename("frontdoor", "a b")
    assert list(dp.devices) == ["frontdoor"]


def test_a_polled_device_renamed_is_still_polled_with_its_credentials(sup):
    sup.adapter = HueAdapter({"light1": {"user": "hue-user"}}, devices=lambda: sup.known,
                             profile=sup.profiles.get, on_report=sup.on_telemetry,
                             on_availability=sup.on_availability, loop=None)
    sup.polls["light1"] = {"every_seconds": 1, "until": None, "rule": "r"}
    Ops(sup).device_rename("light1", "porch")
    assert sup.adapter.handles("porch") and sup.adapter._user("porch") == "hue-user"
    assert sup.poll_of("porch")["every_seconds"] == 1 and "light1" not in sup.polls


def test_groups_apply_in_rules_and_are_audited(sup):
    ops = Ops(sup)
    ops.put_rules([{"name": "hall-watch", "when": {"alert": {"type": "api-denied",
                                                            "device": {"group": "hall"}}},
                    "then": [{"set_posture": {"device": {"group": "hall"}, "posture": "suspicious"}}]}],
                  "rules", "operator")
    assert ops.device_group("camera1", "hall", actor="web:admin")["group"] == "hall"
    ops.device_group("plug1", "hall")
    ops.device_group("plug1", None)
    with pytest.raises(ConfigError, match="device light1: group 'the hall'"):
        ops.device_group("light1", "the hall")
    sup.raise_alert("camera1", "api-denied", "gate", {"source": "198.18.0.66"}, 0)
    assert sup.posture("camera1") == "suspicious"
    assert sup.posture("plug1") == "normal" and sup.posture("light1") == "normal"
    audit = [(d["event"], d["details"].get("group"), d["actor"]) for d in ops.decisions(kind="audit")
             if d["event"] == "device-group"]
    assert audit == [("device-group", None, "operator"), ("device-group", "hall", "operator"),
                     ("device-group", "hall", "web:admin")]
    # a group outlives a rename, and rules that name the old name are pointed out
    ops.put_rules([{"name": "camera-watch", "when": {"alert": {"device": "camera1"}},
                    "then": [{"set_posture": {"posture": "attack"}}]}], "rules", "operator")
    r = ops.device_rename("camera1", "frontdoor")
    assert sup.group_of("frontdoor") == "hall"
    assert any("rule camera-watch names the device as camera1" in n for n in r["notes"])


def test_an_icon_per_type():
    assert icon_of("camera") == "camera" and icon_of("door_sensor") == "door_sensor"
    assert icon_of("camera-lamp1") == "camera" and icon_of("mood_lamp-3204432") == "light"
    assert icon_of("toaster") == "generic" and icon_of(None) == "unknown"
    svg = icon("camera")
    assert svg.startswith("<svg") and 'data-icon="camera"' in svg and "http" not in svg.split("viewBox")[1]
    assert "<script" not in icon('x"><script>') and "&quot;" in icon('x"><script>')


@aiotest
async def test_the_page_renames_and_groups_with_csrf(web_sup):
    sup = web_sup
    set_admin(sup)
    async with client(sup) as c:
        token = await login(c)
        page = await (await c.get("/")).text()
        assert 'data-icon="camera"' in page and 'data-icon="unknown"' in page
        page = await (await c.get("/devices/camera1")).text()
        assert 'action="/devices/camera1/rename"' in page and 'action="/devices/camera1/group"' in page
        for path, data in (("/devices/camera1/rename", {"new": "frontdoor"}),
                           ("/devices/camera1/group", {"group": "hall"})):
            assert (await c.post(path, data=data)).status == 403
            assert (await c.post(path, data={**data, "csrf": "forged"})).status == 403
        for path, data in (("/api/devices/camera1/rename", {"name": "frontdoor"}),
                           ("/api/devices/camera1/group", {"group": "hall"})):
            assert (await c.post(path, json=data)).status == 403
            assert (await c.post(path, json=data, headers={"X-CSRF-Token": "forged"})).status == 403
        assert "camera1" in sup.known and sup.known["camera1"]["group"] is None

        r = await c.post("/devices/camera1/rename", data={"new": "plug1", "csrf": token},
                         allow_redirects=False)
        assert r.status == 400 and "device plug1 has that name" in await r.text()
        r = await c.post("/devices/camera1/rename", data={"new": "frontdoor", "csrf": token},
                         allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/devices/frontdoor"
        page = await (await c.get("/devices/frontdoor")).text()
        assert "camera1 is now frontdoor" in page and "Formerly" in page
        assert "set by operator" in page or "approved by" in page      # the history came along
        r = await c.post("/devices/frontdoor/group", data={"group": "hall", "csrf": token},
                         allow_redirects=False)
        assert r.status == 303 and sup.group_of("frontdoor") == "hall"

        headers = {"X-CSRF-Token": token}
        r = await c.post("/api/devices/frontdoor/rename", json={"name": "door"}, headers=headers)
        assert r.status == 200 and (await r.json())["device"]["name"] == "door"
        r = await c.post("/api/devices/door/rename", json={"name": "a b"}, headers=headers)
        assert r.status == 400 and "'a b'" in (await r.json())["error"]
        r = await c.post("/api/devices/door/group", json={"group": None}, headers=headers)
        assert r.status == 200 and sup.group_of("door") is None
        r = await c.post("/api/devices/nope/group", json={"group": "x"}, headers=headers)
        assert r.status == 404
        spec = await (await c.get("/api/openapi.json")).json()
        assert {"/api/devices/{name}/rename", "/api/devices/{name}/group"} <= set(spec["paths"])
