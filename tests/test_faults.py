"""Faults and their siblings, over the real supervisor, store and policy with a fake data path
(the lab tests in test_supervisor.py take the same paths with real packets)."""
from __future__ import annotations

import time

import pytest
from fakes import supervisor

from appliance.errors import KalkiError
from appliance.supervisor.ops import Ops

CAMERA = ("02:4b:00:00:00:01", "198.18.0.10", "camera")
PLUG = ("02:4b:00:00:00:02", "198.18.0.11", "plug")


@pytest.fixture
def sup(tmp_path):
    s = supervisor(tmp_path, camera1=CAMERA, plug1=PLUG)
    yield s
    s.store.close()


def alert(sup, device, kind):
    sup.raise_alert(device, kind, "kernel", {"src": "198.19.0.66"}, time.monotonic_ns())


def test_a_reset_means_judge_from_now_on(sup):
    alert(sup, "camera1", "brute-force")
    assert sup.posture("camera1") == "attack"
    Ops(sup).posture_reset("camera1")
    assert sup.posture("camera1") == "normal"       # the old alert does not put it back
    alert(sup, "camera1", "brute-force")
    assert sup.posture("camera1") == "attack"       # a new one escalates again, at once
    fired = [d for d in sup.store.decisions(device="camera1") if d.get("rule") == "device-under-attack"]
    assert len(fired) == 2


def test_resetting_a_quarantined_device_keeps_it_reset(sup):
    alert(sup, "plug1", "gateway-probe")
    assert sup.posture("plug1") == "quarantine"
    Ops(sup).posture_reset("plug1")
    assert sup.posture("plug1") == "normal"
    alert(sup, "plug1", "port-scan")                 # an attack now is an attack, not a return
    assert sup.posture("plug1") == "attack"
    alert(sup, "plug1", "spoofing")
    assert sup.posture("plug1") == "quarantine"


def test_rules_alone_do_not_re_arm(sup):
    alert(sup, "camera1", "brute-force")
    alert(sup, "camera1", "brute-force")             # still within the window: no second decision
    fired = [d for d in sup.store.decisions(device="camera1") if d.get("rule") == "device-under-attack"]
    assert len(fired) == 1


def test_a_posture_the_kernel_does_not_show_is_refused_by_name(sup, monkeypatch):
    """Enforced means read back from the kernel, all the devices of a change in one read."""
    asked = []
    monkeypatch.setattr(sup.dp, "read_back_all",
                        lambda names: asked.append(list(names)) or {n: None for n in names})
    with pytest.raises(KalkiError, match="device plug1: the kernel does not show posture quarantine"):
        sup.set_posture("plug1", "quarantine", "test")
    assert asked == [["plug1"]]


def test_a_source_blocked_by_hand_is_recorded(sup):
    ops = Ops(sup)
    assert ops.block_source("198.19.0.66", 60) == {"blocked": "198.19.0.66", "seconds": 60}
    assert sup.dp.blocked == {"198.19.0.66": 60}
    blocked = [a for a in sup.store.alerts() if a["type"] == "blocked"]
    assert blocked and blocked[0]["device"] is None and blocked[0]["details"]["source"] == "198.19.0.66"
    assert ops.unblock_source("198.19.0.66") == {"unblocked": "198.19.0.66", "was_blocked": True}
    assert not sup.dp.blocked
    assert any(a["event"] == "unblock" for a in sup.store.decisions(kind="audit"))


def test_a_refused_publish_by_an_unknown_user_is_an_alert(sup):
    sup.on_denied("stranger", "kalki/camera1/telemetry", 3)
    denied = [a for a in sup.store.alerts() if a["type"] == "mqtt-denied"]
    assert denied and denied[0]["device"] is None and denied[0]["details"]["user"] == "stranger"


def test_tampering_is_told_once_and_restored_every_time(sup):
    sup.dp.tampered = ["nftables table inet kalki is gone"]
    assert sup.watch.check_kernel() == ["nftables table inet kalki is gone"]
    assert sup.dp.tampered == []                                  # restored
    sup.dp.tampered = ["nftables table inet kalki is gone"]
    sup.watch.check_kernel()
    tamper = [a for a in sup.store.alerts() if a["type"] == "tamper"]
    assert len(tamper) == 1 and tamper[0]["severity"] == "critical"   # told once a minute
    assert Ops(sup).status()["tamper"]["problems"] == ["nftables table inet kalki is gone"]
    assert sup.summary() == "alert"
    assert sup.watch.check_kernel() == []                               # nothing new


def _later(sup, seconds):
    """Moves the supervisor's policy clock on, as the lab's fake clock does."""
    sup.clock.set((sup.now() + __import__("datetime").timedelta(seconds=seconds)).isoformat())


def test_a_shorter_timed_posture_returns_to_the_longer_one_it_covered(sup):
    ops = Ops(sup)
    ops.posture_set("camera1", "suspicious", for_="10m")
    ops.posture_set("camera1", "attack", for_="5m")
    d = sup.device("camera1")
    assert d["posture"] == "attack" and d["posture_revert_to"] == "suspicious"
    _later(sup, 5 * 60 + 1)
    sup._expire_postures()
    d = sup.device("camera1")
    assert d["posture"] == "suspicious"                          # not normal: 5 min of its 10 are left
    left = (__import__("datetime").datetime.fromisoformat(d["posture_expires"]) - sup.now()).total_seconds()
    assert 4 * 60 < left <= 5 * 60
    assert d["posture_revert_to"] == "normal"
    _later(sup, 5 * 60)
    sup._expire_postures()
    assert sup.posture("camera1") == "normal"


def test_a_timed_posture_that_outlives_the_one_it_covered_returns_past_it(sup):
    ops = Ops(sup)
    ops.posture_set("camera1", "suspicious", for_="5m")
    ops.posture_set("camera1", "quarantine", for_="10m")
    _later(sup, 10 * 60 + 1)
    sup._expire_postures()
    assert sup.posture("camera1") == "normal"


def test_a_timed_posture_is_bounded(sup):
    with pytest.raises(Exception, match="at most 30 days"):
        Ops(sup).posture_set("camera1", "attack", for_="400d")
    assert sup.posture("camera1") == "normal"


def test_report_only_means_report(sup):
    """Issue 10: the camera's egress anomaly is "report only", yet a built-in rule quarantined
    it on the first report. A blocked one still does."""
    from appliance.telemetry import kernel
    reported = {"device": "camera1", "reason": "egress_anomaly", "action": "reported", "src": CAMERA[1],
                "dst": "198.19.9.1"}
    sup.on_kernel_alerts(kernel.alerts([reported], sup.device_ip))
    assert [a["type"] for a in sup.store.alerts(device="camera1")] == ["egress-report"]
    assert sup.posture("camera1") == "normal"
    sup.on_kernel_alerts(kernel.alerts([{**reported, "action": "dropped"}], sup.device_ip))
    assert sup.posture("camera1") == "quarantine"


def test_a_posture_decided_while_the_disk_refuses_is_kept_and_written_later(sup, monkeypatch):
    """The faults issue, 4: postures enforced while the state directory could not be written
    were never written, and a quarantined device was released at the next restart."""
    import json
    import os
    path = sup.store.path

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    Ops(sup).posture_set("plug1", "quarantine")                 # answered, not an error
    assert sup.dp.read_back("plug1") == 4 and sup.posture("plug1") == "quarantine"
    assert "No space left" in Ops(sup).status()["disk_error"]
    on_disk = {d["name"]: d["posture"] for d in json.loads(path.read_text())["devices"].values()}
    assert on_disk["plug1"] == "normal"                          # not yet on disk
    sup.watch.check_disk()
    assert sup.watch.disk_error and "No space left" in sup.watch.disk_error
    monkeypatch.undo()                                           # the disk is back
    sup.watch.check_disk()
    assert Ops(sup).status()["disk_error"] is None
    on_disk = {d["name"]: d["posture"] for d in json.loads(path.read_text())["devices"].values()}
    assert on_disk["plug1"] == "quarantine"
    assert any(a["event"] == "store-recovered" for a in sup.store.decisions(kind="audit"))
    sup.store.flush()
    assert any(a["type"] == "disk-error" for a in sup.store.alerts())


@pytest.mark.parametrize("behind", [False, True], ids=["written on the loop", "written behind"])
def test_a_disk_error_ends_when_any_write_gets_through(sup, monkeypatch, behind):
    """The episode ends (told, audited, the LEDs' disk fault off) when the disk takes a write,
    whether the watch's retry wrote it or the next posture change did: with the state file
    written behind, the retry steps aside while the writer works, and the writer's success
    ended nothing, the fault shown for good."""
    import contextlib
    import os

    from appliance.errors import StoreError
    if behind:
        sup.store.write_behind()

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    Ops(sup).posture_set("plug1", "quarantine")
    with contextlib.suppress(StoreError):       # the writer's turn first; the logs refuse too
        sup.store.flush()
    sup.watch.check_disk()
    assert sup.watch.disk_error and "No space left" in sup.watch.disk_error
    monkeypatch.undo()                                           # the disk is back
    Ops(sup).posture_set("plug1", "attack")                      # and this write gets through
    sup.store.flush()
    assert sup.store.disk_error is None
    sup.watch.check_disk()
    assert sup.watch.disk_error is None
    assert any(a["event"] == "store-recovered" for a in sup.store.decisions(kind="audit"))


def test_reconcile_keeps_a_stricter_posture_the_kernel_holds(tmp_path):
    """The faults issue, 4: where the kernel holds a stricter posture than the store (a write
    lost with a crash), a restart keeps the kernel's, records why and tells the operator."""
    from fakes import FakeDataplane

    from appliance.dataplane.api import DeviceSpec
    first = supervisor(tmp_path, camera1=CAMERA, plug1=PLUG)
    first.store.close()
    kernel = FakeDataplane()
    kernel.apply(DeviceSpec("plug1", PLUG[0], PLUG[1], {}, 4))       # quarantine, never written
    kernel.apply(DeviceSpec("camera1", CAMERA[0], CAMERA[1], {}, 0))  # looser than the store
    from appliance import config
    from appliance.supervisor.core import Supervisor
    cfg = config.Config()
    cfg.state.directory = str(tmp_path / "state")
    cfg.mqtt.password_file = str(tmp_path / "mqtt-supervisor")
    again = Supervisor(cfg)
    try:
        again.attach(kernel, loop=None)
        assert again.posture("plug1") == "quarantine" and kernel.read_back("plug1") == 4
        assert again.posture("camera1") == "normal" and kernel.read_back("camera1") == 1
        assert any(a["event"] == "posture-kept" for a in again.store.decisions(kind="audit"))
        again.store.flush()
        assert [a["type"] for a in again.store.alerts(device="plug1")] == ["posture-kept"]
    finally:
        again.store.close()


def test_every_connect_republishes_the_retained_topics(sup):
    """The faults issue, 12: appliance.run wires the bus's on_connected to republish()."""
    class Bus:
        def __init__(self):
            self.postures, self.discovery = {}, set()

        def publish_posture(self, name, posture, since, attacked=None):
            self.postures[name] = posture

        def publish_discovery(self, name, type_, postures=()):
            self.discovery.add(name)
    sup.bus = Bus()
    Ops(sup).posture_set("plug1", "attack")
    sup.bus.postures.clear()
    sup.republish()
    assert sup.bus.postures == {"camera1": "normal", "plug1": "attack"}
    assert sup.bus.discovery == {"camera1", "plug1"}


def test_a_name_an_older_version_let_in_is_renamed_not_fatal(tmp_path):
    """The faults issue, 6: `kalki device add cam.1 ... --approve` was accepted, and every later
    start failed on the broker's name rule. The door refuses it now; a store that already has
    such a name starts, with the device renamed, still approved and in its posture."""
    import json
    first = supervisor(tmp_path, camera1=CAMERA)
    Ops(first).posture_set("camera1", "quarantine")
    first.store.close()
    path = tmp_path / "state" / "kalki.json"
    data = json.loads(path.read_text())
    for doc in data["devices"].values():
        doc["name"] = "cam.1"
    path.write_text(json.dumps(data))
    from fakes import FakeDataplane

    from appliance import config
    from appliance.supervisor.core import Supervisor
    cfg = config.Config()
    cfg.state.directory = str(tmp_path / "state")
    cfg.mqtt.password_file = str(tmp_path / "mqtt-supervisor")
    again = Supervisor(cfg)
    try:
        again.attach(FakeDataplane(), loop=None)
        assert "cam.1" not in again.known and again.posture("cam-1") == "quarantine"
        assert again.device("cam-1")["approved"] and again.dp.read_back("cam-1") == 4
        again.store.flush()
        assert [a["type"] for a in again.store.alerts(device="cam-1")] == ["device-renamed"]
    finally:
        again.store.close()
    with pytest.raises(Exception, match="use 1 to 40 letters"):
        Ops(supervisor(tmp_path / "b")).device_add("cam.1", "02:4b:00:00:00:09", "198.18.0.19")


def test_a_stealth_scan_moves_the_device_to_attack_as_a_syn_scan_does(sup):
    alert(sup, "camera1", "stealth-scan")
    assert sup.posture("camera1") == "attack"
