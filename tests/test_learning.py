"""Learning, drift and the device's own destinations, over the real supervisor, store and
profiles with a fake data path (tests/test_names.py::test_learning... runs it with real XDP)."""
from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from fakes import supervisor

from appliance.errors import ConfigError
from appliance.policy import profiles
from appliance.supervisor.ops import Ops

LIGHT = ("02:4b:00:00:00:03", "198.18.0.12", "light")
EVENT = {"reason": "egress_anomaly", "action": "reported", "src": "198.18.0.12", "dst": "198.19.64.9",
         "dst_port": 443, "proto": 6, "suppressed": 0}


@pytest.fixture
def sup(tmp_path):
    s = supervisor(tmp_path, light1=LIGHT)
    yield s
    s.store.close()


def destinations(sup):
    return sup.dp.devices["light1"].stack["egress_anomaly"]["destinations"]


def kernel(sup, kind, **event):
    sup.on_kernel_alerts([("light1", kind, {**EVENT, **event})])


def test_a_new_device_learns_for_a_day_then_returns_to_its_type_s_normal(sup):
    ops = Ops(sup)
    sup.add_device("lamp1", "02:4b:00:00:00:09", "198.18.0.19")
    assert ops.device_learn("lamp1")["for_seconds"] == 86400
    lamp = sup.device("lamp1")
    assert (lamp["approved"], lamp["type"], lamp["posture"]) == (True, "generic", "learning")
    stack = sup.dp.devices["lamp1"].stack
    assert "lateral_block" not in stack and stack["egress_anomaly"]["block"] is False
    assert "anti_spoof" in stack and "port_scan" in stack       # detectors stay on
    assert sup.summary() == "warning"
    sup.clock.set((sup.now() + datetime.timedelta(hours=23)).isoformat())
    sup._expire_postures()
    assert sup.posture("lamp1") == "learning"
    sup.clock.set((sup.now() + datetime.timedelta(hours=1, seconds=1)).isoformat())
    sup._expire_postures()
    assert sup.posture("lamp1") == "normal"
    assert sup.dp.devices["lamp1"].stack == sup.profiles["generic"].stack("normal")


def test_while_learning_flows_are_recorded_not_alarmed(sup):
    ops = Ops(sup)
    ops.device_learn("light1", for_="2h")
    sup.dp.answer("198.18.0.12", ["api.hue-cloud.example"], ["198.19.64.9"], 300)   # refused name
    kernel(sup, "egress-report")
    kernel(sup, "egress-report")
    kernel(sup, "egress-report", dst="198.18.0.30", dst_port=9999)                # a LAN peer
    assert sup.store.alerts(device="light1") == []
    learnt = ops.device_show("light1")["flows"]["learnt"]
    assert [(f["address"], f["port"], f["names"], f["count"]) for f in learnt] == [
        ("198.19.64.9", 443, ["api.hue-cloud.example"], 2), ("198.18.0.30", 9999, [], 1)]
    assert learnt[0]["says"] == \
        "asked for api.hue-cloud.example:443 (tcp) 2 times, let through while learning"
    made = ops.profile_from_device("light1")
    assert made["destinations"] == ["api.hue-cloud.example:443/tcp", "lan:9999/tcp"]
    p = profiles.profile_from_text(made["text"], "x.toml")
    assert p.type == "light-light1"
    assert "api.hue-cloud.example:443/tcp" in p.postures["normal"]["egress_anomaly"]["destinations"]
    assert "lateral_block" not in p.postures["normal"]      # it talks to its LAN
    assert "quarantine" in p.postures["attack"]
    # and the same as a MUD file, which the importer takes back
    mud = ops.profile_from_device("light1", format="mud", mud_url="https://example.com/light1")
    assert "api.hue-cloud.example" in mud["text"]


def test_outside_learning_a_refusal_is_shown_and_one_action_allows_it(sup):
    ops = Ops(sup)
    sup.dp.answer("198.18.0.12", ["n-devs.hue-cloud.example"], ["198.19.64.9"], 300)
    for _ in range(3):
        kernel(sup, "egress-refused", reason="allowlist", action="dropped")
    assert sup.store.alerts(device="light1") == []          # a refusal is not an alarm
    assert sup.posture("light1") == "normal"
    refused, = ops.device_show("light1")["flows"]["refused"]
    assert refused["says"] == "asked for n-devs.hue-cloud.example:443 (tcp) 3 times, refused"
    ops.device_allow("light1", "n-devs.hue-cloud.example:443/tcp")
    assert "n-devs.hue-cloud.example:443/tcp" in destinations(sup)
    assert sup.device("light1")["allow"] == ["n-devs.hue-cloud.example:443/tcp"]
    assert sup.posture("light1") == "normal"
    ops.device_disallow("light1", "n-devs.hue-cloud.example:443/tcp")
    assert "n-devs.hue-cloud.example:443/tcp" not in destinations(sup)
    with pytest.raises(ConfigError, match="device light1"):
        ops.device_allow("light1", "not a destination!")
    assert sup.device("light1")["allow"] == []


def test_a_report_only_egress_outside_learning_is_still_a_report(sup):
    kernel(sup, "egress-report")
    assert [a["type"] for a in sup.store.alerts(device="light1")] == ["egress-report"]
    assert sup.posture("light1") == "normal"


def test_from_device_without_learning_says_so(sup):
    with pytest.raises(ConfigError, match="nothing learnt yet"):
        Ops(sup).profile_from_device("light1")


def test_flows_outlive_a_restart(sup, tmp_path):
    import asyncio
    ops = Ops(sup)
    ops.device_learn("light1")
    kernel(sup, "egress-report")
    asyncio.run(sup._save_names())
    again = supervisor(tmp_path)
    try:
        assert [f["address"] for f in Ops(again).device_show("light1")["flows"]["learnt"]] == ["198.19.64.9"]
    finally:
        again.store.close()


def test_the_mud_url_a_device_sends_is_recorded_and_suggests_its_profile(sup, tmp_path):
    ops = Ops(sup)
    mud = (Path(__file__).parent / "data" / "mud" / "mood_lamp-3204432Mud.json").read_text()
    ops.profile_import(mud, "lamp.json", type="mood-lamp")
    url = "https://mood_lamp-3204432.com/mood_lamp-3204432"
    ops.dhcp_lease("add", mac="02:4b:00:00:00:31", ip="198.18.0.31",
                   identity={"hostname": "lamp", "mud_url": url})
    lamp = next(d for d in sup.known.values() if d["mac"] == "02:4b:00:00:00:31")
    assert lamp["identity"]["mud_url"] == url
    assert sup.suggestions[lamp["name"]] == "mood-lamp"
    # a device's bad MUD URL is dropped, not stored, and the lease still counts
    ops.dhcp_lease("add", mac="02:4b:00:00:00:32", ip="198.18.0.32",
                   identity={"hostname": "odd", "mud_url": "http://plain.example/x\n"})
    odd = next(d for d in sup.known.values() if d["mac"] == "02:4b:00:00:00:32")
    assert not odd["identity"].get("mud_url") and odd["ip"] == "198.18.0.32"


def test_dnsmasq_s_mud_url_reaches_the_supervisor(monkeypatch):
    from appliance.system import dhcp
    sent = {}
    monkeypatch.setattr("appliance.client.request", lambda sock, op, **kw: sent.update(op=op, **kw))
    dhcp.lease_event("/run/x.sock", ["add", "02:4b:00:00:00:31", "198.18.0.31", "lamp"],
                     {"DNSMASQ_MUD_URL": "https://example.com/lamp.json"})
    assert sent["identity"] == {"hostname": "lamp", "mud_url": "https://example.com/lamp.json"}


def test_a_refused_lan_peer_is_offered_as_lan_and_a_cloud_name_as_its_name(sup):
    ops = Ops(sup)
    sup.dp.answer("198.18.0.12", ["n-devs.hue-cloud.example"], ["198.19.64.9"], 300)
    kernel(sup, "egress-refused", reason="allowlist", action="dropped")
    kernel(sup, "egress-refused", reason="allowlist", action="dropped", dst="198.18.0.40", dst_port=6668)
    offered = {f["address"]: f["allow_as"] for f in ops.device_show("light1")["flows"]["refused"]}
    assert offered == {"198.19.64.9": "n-devs.hue-cloud.example:443/tcp", "198.18.0.40": "lan:6668/tcp"}
