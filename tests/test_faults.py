"""Faults and their siblings, over the real supervisor, store and policy with a fake data path
(the lab tests in test_supervisor.py take the same paths with real packets)."""
from __future__ import annotations

import time

import pytest
from fakes import supervisor

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
    assert sup.check_kernel() == ["nftables table inet kalki is gone"]
    assert sup.dp.tampered == []                                  # restored
    sup.dp.tampered = ["nftables table inet kalki is gone"]
    sup.check_kernel()
    tamper = [a for a in sup.store.alerts() if a["type"] == "tamper"]
    assert len(tamper) == 1 and tamper[0]["severity"] == "critical"   # told once a minute
    assert Ops(sup).status()["tamper"]["problems"] == ["nftables table inet kalki is gone"]
    assert sup.summary() == "alert"
    assert sup.check_kernel() == []                               # nothing new


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
