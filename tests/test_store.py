"""The supervisor's store: every table, retention, error messages, and survival of SIGKILL."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.errors import ConfigError, StoreError
from appliance.store.logs import LogTable
from appliance.store.state import Retention, Store
from appliance.store.storage import AtomicJSONStorage

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now

    def advance(self, **kw):
        self.now += timedelta(**kw)


def iso(dt):
    return dt.isoformat(timespec="microseconds")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    with Store(tmp_path, clock=clock) as s:
        yield s


def alert(device="cam1", n=0, **kw):
    return {"device": device, "type": "port_scan", "source": "kernel", "severity": "high",
            "details": {"n": n}, **kw}


def writes(monkeypatch):
    """Counts disk writes (file replacements)."""
    count = [0]
    original = AtomicJSONStorage._replace

    def counting(self, text):
        count[0] += 1
        original(self, text)
    monkeypatch.setattr(AtomicJSONStorage, "_replace", counting)
    return count


# devices

def test_new_device_gets_defaults_and_timestamps(store):
    d = store.upsert_device("cam1", "AA:BB:CC:00:00:01", ip="10.0.0.5", type="camera",
                            identity={"hostname": "cam"})
    assert d == {"name": "cam1", "mac": "aa:bb:cc:00:00:01", "ip": "10.0.0.5", "type": "camera",
                 "identity": {"hostname": "cam", "client_id": None, "vendor_class": None, "mud_url": None},
                 "approved": False, "posture": "unknown", "posture_since": iso(T0),
                 "posture_expires": None, "posture_revert_to": None, "posture_after": [], "group": None,
                 "first_seen": iso(T0), "last_seen": iso(T0)}
    assert store.get_device("cam1") == d
    assert store.device_by_mac("aa-bb-cc-00-00-01") == d
    assert store.get_device("nope") is None and store.device_by_mac("aa:bb:cc:00:00:09") is None


def test_upsert_of_known_device_keeps_what_is_not_given(store, clock):
    store.upsert_device("cam1", "aa:bb:cc:00:00:01", approved=True, posture="normal",
                        group="cams", identity={"hostname": "cam"})
    clock.advance(minutes=5)
    d = store.upsert_device("cam1", "aa:bb:cc:00:00:01", ip="10.0.0.6",
                            identity={"vendor_class": "udhcp 1.30"})
    assert (d["approved"], d["posture"], d["group"]) == (True, "normal", "cams")
    assert d["ip"] == "10.0.0.6"
    assert d["identity"] == {"hostname": "cam", "client_id": None, "vendor_class": "udhcp 1.30",
                             "mud_url": None}
    assert d["first_seen"] == d["posture_since"] == iso(T0)
    assert d["last_seen"] == iso(clock.now)
    assert [x["name"] for x in store.devices()] == ["cam1"]


def test_update_device_posture_restarts_since_and_clears_expiry(store, clock):
    store.upsert_device("cam1", "aa:bb:cc:00:00:01", posture="normal")
    clock.advance(hours=1)
    until = T0 + timedelta(hours=2)
    d = store.update_device("cam1", posture="quarantined", posture_expires=until,
                            posture_revert_to="normal")
    assert d["posture_since"] == iso(clock.now)
    assert (d["posture_expires"], d["posture_revert_to"]) == (iso(until), "normal")
    clock.advance(hours=1)
    d = store.update_device("cam1", posture="normal")
    assert (d["posture_since"], d["posture_expires"], d["posture_revert_to"]) == (
        iso(clock.now), None, None)
    d = store.update_device("cam1", approved=True, posture="normal")
    assert d["approved"] and d["posture_since"] == iso(clock.now)   # same posture: unchanged


def test_device_errors_name_the_culprit(store):
    store.upsert_device("cam1", "aa:bb:cc:00:00:01")
    cases = [
        (lambda: store.update_device("ghost", approved=True), "device 'ghost' does not exist"),
        (lambda: store.remove_device("ghost"), "device 'ghost' does not exist"),
        (lambda: store.upsert_device("cam2", "zz:00"),
         "device 'cam2': invalid MAC address 'zz:00'"),
        (lambda: store.upsert_device("cam2", "aa:bb:cc:00:00:01"),
         "device 'cam2': MAC address aa:bb:cc:00:00:01 already belongs to device 'cam1'"),
        (lambda: store.update_device("cam1", colour="red"),
         "device 'cam1': unknown field(s) ['colour']"),
        (lambda: store.update_device("cam1", name="cam9"),
         "device 'cam1': the name cannot be changed"),
        (lambda: store.update_device("cam1", ip="10.0.0.300"),
         "device 'cam1', field ip: invalid IPv4 address '10.0.0.300'"),
        (lambda: store.update_device("cam1", approved="yes"), "device 'cam1', field approved"),
        (lambda: store.update_device("cam1", identity={"serial": 1}),
         "device 'cam1', field identity"),
        (lambda: store.update_device("cam1", posture_expires=datetime(2025, 1, 1)),
         "device 'cam1', field posture_expires: timestamp 2025-01-01T00:00:00 has no time zone"),
        (lambda: store.update_device("cam1", last_seen="yesterday"),
         "device 'cam1', field last_seen: invalid ISO 8601 timestamp 'yesterday'"),
    ]
    for call, message in cases:
        with pytest.raises(StoreError, match=re.escape(message)):
            call()
    assert store.devices()[0]["mac"] == "aa:bb:cc:00:00:01"


def test_returned_records_are_copies(store):
    store.upsert_device("cam1", "aa:bb:cc:00:00:01", identity={"hostname": "cam"})
    store.add_alert(alert())
    store.get_device("cam1")["identity"]["hostname"] = "evil"
    store.alerts()[0]["details"]["n"] = 99
    given = alert(n=5)
    store.add_alert(given)
    given["details"]["n"] = 6       # the caller's dict is not the stored one
    assert store.get_device("cam1")["identity"]["hostname"] == "cam"
    assert [a["details"]["n"] for a in store.alerts()] == [5, 0]


def test_remove_device_keeps_history_alerts_and_decisions(store):
    store.upsert_device("cam1", "aa:bb:cc:00:00:01")
    store.record_posture("cam1", "quarantined", "port scan")
    store.add_alert(alert())
    store.add_decision({"device": "cam1", "to": "quarantined"})
    store.remove_device("cam1")
    assert store.get_device("cam1") is None
    assert [h["posture"] for h in store.posture_history("cam1")] == ["quarantined"]
    assert len(store.alerts("cam1")) == 1 and len(store.decisions("cam1")) == 1
    with pytest.raises(StoreError, match="device 'cam1' does not exist"):
        store.record_posture("cam1", "normal", "back")


# history, alerts, decisions

def test_posture_history_newest_first(store, clock):
    store.upsert_device("cam1", "aa:bb:cc:00:00:01")
    for posture in ("normal", "suspicious", "quarantined"):
        store.record_posture("cam1", posture, f"to {posture}")
        clock.advance(seconds=1)
    store.record_posture("cam1", "probation", "backdated", at="2025-03-01T11:00:00Z")
    # in the order recorded, whatever the times say (a clock set back): the one stamped
    # earlier than the record before it is marked, however few are asked for
    assert [h["posture"] for h in store.posture_history("cam1")] == [
        "probation", "quarantined", "suspicious", "normal"]
    assert [h.get("clock_back", False) for h in store.posture_history("cam1")] == [True, False, False, False]
    assert store.posture_history("cam1", limit=1)[0]["clock_back"] is True
    assert store.posture_history("cam1", limit=2)[1] == {
        "device": "cam1", "posture": "quarantined", "reason": "to quarantined",
        "at": iso(T0 + timedelta(seconds=2))}
    assert store.posture_history("cam1")[0]["at"] == "2025-03-01T11:00:00.000000+00:00"
    with pytest.raises(StoreError, match="device 'cam1', posture normal, reason"):
        store.record_posture("cam1", "normal", "")


def test_alerts_crud_filters_and_counts(store, clock):
    first = store.add_alert(alert("cam1", 0))
    clock.advance(minutes=1)
    second = store.add_alert(alert("cam2", 1, type="syn_flood", source="mqtt"))
    clock.advance(minutes=1)
    store.add_alert(alert("cam1", 2, at=T0 - timedelta(minutes=1)))
    assert second > first
    a = store.alerts()
    assert [x["details"]["n"] for x in a] == [2, 1, 0]       # as recorded; the earlier stamp marked
    assert [x.get("clock_back", False) for x in a] == [True, False, False]
    assert a[2] == {"device": "cam1", "type": "port_scan", "source": "kernel",
                    "severity": "high", "details": {"n": 0}, "at": iso(T0), "id": first}
    assert [x["details"]["n"] for x in store.alerts("cam1")] == [2, 0]
    assert [x["details"]["n"] for x in store.alerts(since=T0)] == [1, 0]
    assert len(store.alerts(limit=1)) == 1
    assert store.count_alerts("cam1", ["port_scan"], iso(T0)) == 1
    assert store.count_alerts("cam1", "port_scan", None) == 2
    assert store.count_alerts(None, ["syn_flood", "port_scan"], T0) == 2
    assert store.count_alerts("cam2", ["port_scan"], None) == 0


def test_alert_errors_name_the_culprit(store):
    with pytest.raises(StoreError, match="alert for device 'cam1': unknown source 'radio'"):
        store.add_alert(alert(source="radio"))
    with pytest.raises(StoreError, match=re.escape("alert for device 'cam1': missing field(s) "
                                                   "['severity']")):
        store.add_alert({k: v for k, v in alert().items() if k != "severity"})
    with pytest.raises(StoreError, match=re.escape("alert for device 'cam1': unknown field(s) "
                                                   "['colour']")):
        store.add_alert(alert(colour="red"))
    with pytest.raises(StoreError, match="alert for device 'cam1': cannot be stored as JSON"):
        store.add_alert(alert(details={"when": object()}))
    with pytest.raises(StoreError, match="alert for device 'cam1': details must be a table"):
        store.add_alert(alert(details=[1]))
    assert store.alerts() == []


def test_decisions_and_audit_share_the_log(store, clock):
    d = store.add_decision({"device": "cam1", "from": "normal", "to": "quarantined",
                            "rule": "scan"})
    clock.advance(seconds=1)
    a = store.audit("approve", "operator", {"device": "cam1", "via": "cli"})
    clock.advance(seconds=1)
    store.audit("button", "button", {})
    assert [x["id"] for x in store.decisions()] == [a + 1, a, d]
    assert store.decisions("cam1", limit=1) == [
        {"kind": "audit", "event": "approve", "actor": "operator", "device": "cam1",
         "details": {"device": "cam1", "via": "cli"}, "at": iso(T0 + timedelta(seconds=1)),
         "id": a}]
    assert [x["kind"] for x in store.decisions(kind="decision")] == ["decision"]
    with pytest.raises(StoreError, match="decision for device 'cam1': kind is 'audit'"):
        store.add_decision({"device": "cam1", "kind": "audit"})
    with pytest.raises(StoreError, match="audit event 'x', actor"):
        store.audit("x", "", {})


# retention

def test_history_is_bounded_per_device(tmp_path, clock):
    with Store(tmp_path, Retention(history_per_device=10), clock=clock) as store:
        store.upsert_device("cam1", "aa:bb:cc:00:00:01")
        store.upsert_device("cam2", "aa:bb:cc:00:00:02")
        for i in range(40):
            clock.advance(seconds=1)
            store.record_posture("cam1", "normal", str(i))
        store.record_posture("cam2", "normal", "only")
        before = len(store.posture_history("cam1", limit=100))
        assert 10 <= before <= 12
        assert store.prune()["history"] == before - 10
        kept = store.posture_history("cam1", limit=100)
        assert [h["reason"] for h in kept] == [str(i) for i in range(39, 29, -1)]
        assert len(store.posture_history("cam2")) == 1


def test_alerts_and_decisions_are_bounded_by_count(tmp_path, clock):
    with Store(tmp_path, Retention(alerts=20, decisions=20), clock=clock) as store:
        for i in range(100):
            clock.advance(seconds=1)
            store.add_alert(alert(n=i))
            store.add_decision({"device": "cam1", "n": i})
        alerts, decisions = store.count_alerts(None), len(store.decisions(limit=1000))
        assert 20 <= alerts <= 22 and 20 <= decisions <= 22     # pruned 10% over the bound
        assert store.prune() == {"alerts": alerts - 20, "decisions": decisions - 20, "history": 0}
        assert [a["details"]["n"] for a in store.alerts(limit=1000)] == list(range(99, 79, -1))
        assert [d["n"] for d in store.decisions(limit=1000)] == list(range(99, 79, -1))


def test_alerts_and_decisions_age_out(store, clock):
    store.add_alert(alert(n=0))
    store.add_decision({"device": "cam1", "n": 0})
    clock.advance(days=20)
    store.add_alert(alert(n=1))
    store.audit("approve", "operator", {"device": "cam1"})
    assert store.prune() == {"alerts": 0, "decisions": 0, "history": 0}
    assert store.prune(now=T0 + timedelta(days=30, seconds=1)) == {
        "alerts": 1, "decisions": 1, "history": 0}
    assert [a["details"]["n"] for a in store.alerts()] == [1]
    clock.advance(days=31)
    assert store.prune() == {"alerts": 1, "decisions": 1, "history": 0}
    assert store.alerts() == [] and store.decisions() == []


def test_retention_must_be_positive():
    with pytest.raises(ConfigError, match="retention alerts: expected a positive integer, got 0"):
        Retention(alerts=0)


# rules, settings, maintenance

def test_rules_crud(store):
    r = store.put_rule("night-scan", {"when": {"alert": "port_scan"}, "then": "quarantine"})
    assert r == {"name": "night-scan", "enabled": True, "when": {"alert": "port_scan"},
                 "then": "quarantine"}
    store.put_rule("a-first", {"then": "notify", "enabled": False})
    assert [x["name"] for x in store.rules()] == ["a-first", "night-scan"]
    assert store.set_rule_enabled("night-scan", False)["enabled"] is False
    r = store.put_rule("night-scan", {"then": "suspicious"})    # an edit keeps it disabled
    assert r == {"name": "night-scan", "enabled": False, "then": "suspicious"}
    store.delete_rule("night-scan")
    assert store.get_rule("night-scan") is None and len(store.rules()) == 1
    for call in (lambda: store.delete_rule("night-scan"),
                 lambda: store.set_rule_enabled("night-scan", True)):
        with pytest.raises(StoreError, match="rule 'night-scan' does not exist"):
            call()
    with pytest.raises(StoreError, match="rule 'x', field enabled: expected true or false"):
        store.put_rule("x", {"enabled": "yes"})
    with pytest.raises(StoreError, match="rule 'x': the data names another rule, 'y'"):
        store.put_rule("x", {"name": "y"})


def test_settings_defaults_and_checks(store):
    assert store.get_setting("timezone") == "UTC"
    assert store.get_setting("business_hours")["days"] == ["mon", "tue", "wed", "thu", "fri"]
    assert store.get_setting("missing") is None and store.get_setting("missing", 3) == 3
    store.set_setting("timezone", "Europe/Paris")
    store.set_setting("business_hours", {"days": ["sat"], "start": "09:30", "end": "12:00"})
    store.set_setting("mqtt_broker", {"host": "127.0.0.1", "port": 1883})
    assert store.settings() == {
        "timezone": "Europe/Paris", "mqtt_broker": {"host": "127.0.0.1", "port": 1883},
        "business_hours": {"days": ["sat"], "start": "09:30", "end": "12:00"}}
    with pytest.raises(StoreError, match="setting timezone: unknown time zone 'Mars/Olympus'"):
        store.set_setting("timezone", "Mars/Olympus")
    with pytest.raises(StoreError, match=r"setting business_hours.end: invalid time '25:00' \(HH:MM"):
        store.set_setting("business_hours", {"days": ["mon"], "start": "08:00", "end": "25:00"})
    with pytest.raises(StoreError, match="setting business_hours.days: expected a list of days"):
        store.set_setting("business_hours", {"days": [], "start": "08:00", "end": "18:00"})
    with pytest.raises(StoreError, match=r"setting business_hours.days\[0\]: unknown day 'monday'"):
        store.set_setting("business_hours", {"days": ["monday"], "start": "08:00", "end": "18:00"})
    assert store.get_setting("timezone") == "Europe/Paris"


def test_maintenance(store):
    assert store.maintenance_until() is None
    store.set_maintenance("2025-03-01T14:00:00+01:00")
    assert store.maintenance_until() == "2025-03-01T13:00:00.000000+00:00"
    store.set_maintenance(None)
    assert store.maintenance_until() is None
    with pytest.raises(StoreError, match="maintenance until: invalid ISO 8601 timestamp 'soon'"):
        store.set_maintenance("soon")



def test_a_setting_is_read_from_the_table_once_until_it_is_written(store, mocker):
    """The rules ask for the maintenance window on every evaluation: the settings are read
    once, and again after a write, or after a batch that failed (what it set is gone)."""
    store.set_maintenance("2025-03-01T14:00:00+01:00")
    reads = mocker.spy(store._t["settings"], "all")
    for _ in range(3):
        assert store.maintenance_until() == "2025-03-01T13:00:00.000000+00:00"
    assert reads.call_count == 1
    with pytest.raises(RuntimeError), store.batch():
        store.set_maintenance(None)
        assert store.maintenance_until() is None
        raise RuntimeError("the batch fails")
    assert store.maintenance_until() == "2025-03-01T13:00:00.000000+00:00"
    store.set_setting("timezone", "Europe/Paris")
    assert store.maintenance_until() == "2025-03-01T13:00:00.000000+00:00"
    assert store.get_setting("timezone") == "Europe/Paris"
    assert reads.call_count == 4


# persistence, writes, batches

def test_state_survives_reopening(tmp_path, clock):
    with Store(tmp_path, clock=clock) as store:
        store.upsert_device("cam1", "aa:bb:cc:00:00:01", approved=True)
        store.record_posture("cam1", "normal", "approved")
        alert_id = store.add_alert(alert())
        store.put_rule("r", {"then": "notify"})
        store.set_setting("timezone", "Asia/Tokyo")
    with Store(tmp_path, clock=clock) as store:
        assert store.get_device("cam1")["approved"] is True
        assert store.posture_history("cam1")[0]["reason"] == "approved"
        assert store.alerts()[0]["id"] == alert_id
        assert store.add_alert(alert()) == alert_id + 1
        assert store.get_rule("r")["then"] == "notify"
        assert store.get_setting("timezone") == "Asia/Tokyo"


def test_state_changes_are_one_write_each_and_logs_wait_for_flush(tmp_path, clock, monkeypatch):
    count = writes(monkeypatch)
    with Store(tmp_path, Retention(alerts=10), clock=clock) as store:
        state_calls = [
            lambda: store.upsert_device("cam1", "aa:bb:cc:00:00:01"),
            lambda: store.upsert_device("cam1", "aa:bb:cc:00:00:01", ip="10.0.0.1"),
            lambda: store.update_device("cam1", posture="normal"),
            lambda: store.put_rule("r", {}),
            lambda: store.put_rule("r", {"x": 1}),
            lambda: store.set_rule_enabled("r", False),
            lambda: store.delete_rule("r"),
            lambda: store.set_setting("k", 1),
            lambda: store.set_setting("k", 2),
            lambda: store.set_maintenance(None),
        ]
        log_calls = [
            lambda: store.record_posture("cam1", "normal", "x"),
            lambda: store.add_decision({"device": "cam1"}),
            lambda: store.audit("approve", "operator", {}),
        ] + [lambda: store.add_alert(alert())] * 31    # including the inserts that prune
        for call in state_calls:
            before = count[0]
            call()
            assert count[0] == before + 1
        def log_bytes():
            return {n: (tmp_path / f"{n}.jsonl").stat().st_size
                    if (tmp_path / f"{n}.jsonl").exists() else 0
                    for n in ("history", "alerts", "decisions")}
        for call in log_calls:
            before = count[0]
            call()
            assert count[0] == before                  # no state write for a log entry
        assert log_bytes() == {"history": 0, "alerts": 0, "decisions": 0}   # in memory
        store.flush()
        flushed = log_bytes()
        assert all(flushed.values())
        store.flush()
        assert log_bytes() == flushed                  # nothing new, nothing written
        assert store.prune()["alerts"] == 1
        store.flush()
        assert len(store.alerts(limit=100)) == 10
        assert log_bytes()["alerts"] == flushed["alerts"]  # a tenth removed: not worth a rewrite
        assert count[0] == len(state_calls)
        with store.batch():
            store.upsert_device("cam2", "aa:bb:cc:00:00:02")
            store.record_posture("cam2", "normal", "new")
            store.add_alert(alert("cam2"))
        assert count[0] == len(state_calls) + 1
        store.remove_device("cam1")
    # close() flushes the logs
    with Store(tmp_path, clock=clock) as again:
        assert [a["device"] for a in again.alerts(limit=1)] == ["cam2"]


def test_a_failed_batch_changes_nothing(tmp_path, clock, monkeypatch):
    count = writes(monkeypatch)
    with Store(tmp_path, clock=clock) as store:
        store.upsert_device("cam1", "aa:bb:cc:00:00:01")
        with pytest.raises(StoreError, match="device 'ghost' does not exist"), store.batch():
            store.update_device("cam1", posture="quarantined")
            store.add_alert(alert())
            store.record_posture("ghost", "quarantined", "scan")
        assert count[0] == 1
        assert store.get_device("cam1")["posture"] == "unknown" and store.alerts() == []
        store.add_alert(alert())
    with Store(tmp_path, clock=clock) as store:
        assert len(store.alerts()) == 1


def test_closed_store_refuses_and_close_is_idempotent(tmp_path):
    store = Store(tmp_path)
    store.close()
    store.close()
    with pytest.raises(StoreError, match=f"the store {tmp_path / 'kalki.json'} is closed"):
        store.get_device("cam1")


# the storage

def test_storage_reads_none_for_a_missing_file_and_refuses_an_empty_one(tmp_path):
    path = tmp_path / "db.json"
    assert AtomicJSONStorage(path).read() is None
    path.write_text("  \n")       # a 0-byte or blank file is not an empty store: it lost one
    with pytest.raises(StoreError, match=f"the store {path} is empty; it is left as it is"):
        AtomicJSONStorage(path).read()


def test_the_previous_generation_is_kept_and_can_be_put_back(tmp_path):
    from appliance.store.storage import previous_path, restore_previous
    with Store(tmp_path) as store:
        store.upsert_device("camera1", "02:4b:00:00:00:01", ip="198.18.0.10")
        store.update_device("camera1", approved=True, type="camera", posture="normal")
        store.update_device("camera1", posture="quarantine")
    path = tmp_path / "kalki.json"
    prev = previous_path(path)
    assert json.loads(prev.read_text())["devices"]["1"]["posture"] == "normal"   # one write behind
    path.write_bytes(b"")                               # what a power cut on a bad card leaves
    with pytest.raises(StoreError, match=r"is empty; .*kalki.json.prev: `kalki store restore-previous`"):
        Store(tmp_path)
    path.write_text('{"devices": {"1": {"name": "cam')   # torn
    with pytest.raises(StoreError, match="is corrupt"):
        Store(tmp_path)
    refused = restore_previous(path)
    assert refused.read_text().startswith('{"devices"')
    with Store(tmp_path) as store:
        assert store.get_device("camera1")["approved"] and store.get_device("camera1")["posture"] == "normal"


def test_storage_writes_atomically_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "db.json"
    storage = AtomicJSONStorage(path, indent=1)
    storage.write({"t": {"1": {"a": [1]}}})
    assert json.loads(path.read_text()) == {"t": {"1": {"a": [1]}}}
    assert sorted(os.listdir(tmp_path)) == ["db.json"]
    data = storage.read()
    data["t"] = {}                      # what TinyDB does with the table it updates
    assert storage.read() == {"t": {"1": {"a": [1]}}}
    assert AtomicJSONStorage(path).read() == {"t": {"1": {"a": [1]}}}


def test_an_update_that_fails_to_reach_the_disk_leaves_the_state_as_it_was(tmp_path, monkeypatch):
    """TinyDB edits the documents it updates in place: the table makes them its own first, so
    the state in memory stays what the file says when the write fails (outside a batch too)."""
    from tinydb import TinyDB

    from appliance.store.storage import _Table
    db = TinyDB(tmp_path / "db.json", storage=AtomicJSONStorage)
    db.table_class = _Table
    t = db.table("t", cache_size=0)
    t.insert({"a": 1, "n": {"x": 1}})

    def fail(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(StoreError, match="No space left"):
        t.update({"a": 2})
    with pytest.raises(StoreError):
        t.remove(doc_ids=[1])
    assert t.get(doc_id=1) == {"a": 1, "n": {"x": 1}}
    monkeypatch.undo()
    t.update({"a": 3})
    assert t.get(doc_id=1)["a"] == 3 and json.loads((tmp_path / "db.json").read_text())["t"]["1"]["a"] == 3


def test_an_update_copies_only_the_documents_it_looks_at(tmp_path):
    """A posture change makes its device's record anew and leaves every other one the same
    object (what lets the storage reuse their text), with the old record unchanged: by
    doc_ids, by a condition, a callable, a remove and an insert."""
    from tinydb import TinyDB, where

    from appliance.store.storage import _Table
    db = TinyDB(tmp_path / "db.json", storage=AtomicJSONStorage)
    db.table_class = _Table
    t = db.table("t", cache_size=0)
    t.insert_multiple({"n": i, "tag": "a"} for i in range(5))
    storage = db.storage

    def stored():
        return dict(storage.read()["t"])
    before = stored()
    t.update({"tag": "b"}, doc_ids=[2])
    after = stored()
    assert [k for k in before if after[k] is not before[k]] == ["2"]
    assert before["2"] == {"n": 1, "tag": "a"} and after["2"] == {"n": 1, "tag": "b"}
    t.update(lambda doc: doc.update(tag="c"), where("n") == 3)
    assert stored()["4"]["tag"] == "c" and before["4"]["tag"] == "a"
    t.remove(where("n") == 0)
    t.insert({"n": 9})
    assert sorted(stored()) == ["2", "3", "4", "5", "6"]
    assert stored()["3"] is before["3"]
    assert json.loads((tmp_path / "db.json").read_text())["t"] == stored()


def test_the_state_file_text_is_what_json_writes_after_every_kind_of_change(tmp_path, clock):
    """Each document's text is reused while it is the same object: after adds, updates,
    renames, removals, rules, settings and a failed batch, the file still says exactly what
    json.dumps of the state says."""
    store = Store(tmp_path, clock=clock)
    storage = store._storage

    def file_matches():
        text = (tmp_path / "kalki.json").read_text()
        assert text == json.dumps(storage.read())
    for i in range(6):
        store.upsert_device(f"cam{i}", f"02:00:00:00:00:0{i}", ip=f"198.18.0.{i + 2}", type="camera")
        file_matches()
    store.update_device("cam1", posture="attack", identity={"hostname": "Ünïcode ☃"})
    file_matches()
    store.rename_device("cam2", "door", logs=True)
    file_matches()
    store.remove_device("cam3")
    file_matches()
    store.put_rule("r1", {"when": {"always": True}, "then": []})
    store.set_setting("notify.email_to", "ops@example.org")
    file_matches()
    with pytest.raises(RuntimeError), store.batch():
        store.update_device("cam4", posture="quarantine")
        raise RuntimeError("refused")
    store.update_device("cam5", posture="suspicious")
    file_matches()
    assert store.get_device("cam4")["posture"] == "unknown"
    store.close()
    with Store(tmp_path, clock=clock) as again:
        assert again.get_device("cam1")["identity"]["hostname"] == "Ünïcode ☃"


def test_a_device_is_found_by_name_after_renames_removals_and_a_failed_batch(store):
    """Names are looked up by the id they were last found under, checked each time."""
    store.upsert_device("cam1", "02:00:00:00:00:01")
    store.upsert_device("cam2", "02:00:00:00:00:02")
    assert store.get_device("cam1")["mac"] == "02:00:00:00:00:01"
    store.rename_device("cam1", "cam9")
    assert store.get_device("cam1") is None and store.get_device("cam9")["mac"] == "02:00:00:00:00:01"
    store.rename_device("cam2", "cam1")      # the old name, another record
    assert store.get_device("cam1")["mac"] == "02:00:00:00:00:02"
    store.remove_device("cam1")
    assert store.get_device("cam1") is None
    store.upsert_device("cam1", "02:00:00:00:00:03")
    assert store.get_device("cam1")["mac"] == "02:00:00:00:00:03"
    with pytest.raises(RuntimeError), store.batch():
        store.remove_device("cam9")
        store.upsert_device("cam9", "02:00:00:00:00:04")
        assert store.get_device("cam9")["mac"] == "02:00:00:00:00:04"
        raise RuntimeError("refused")
    assert store.get_device("cam9")["mac"] == "02:00:00:00:00:01"
    with pytest.raises(StoreError, match="'cam2' does not exist"):
        store.update_device("cam2", posture="attack")


def test_corrupt_file_raises_naming_the_path(tmp_path):
    path = tmp_path / "kalki.json"
    path.write_text('{"devices": {"1": {"name": "cam')
    with pytest.raises(StoreError, match=f"the store {path} is corrupt"):
        Store(tmp_path)
    path.write_text('[1, 2]')
    with pytest.raises(StoreError, match=f"the store {path} is not a TinyDB file"):
        AtomicJSONStorage(path).read()
    assert path.read_text() == '[1, 2]'     # left for the operator to inspect


# SIGKILL at random moments

CHILD = r"""
import sys
from appliance.store.state import Retention, Store
big = 10 ** 6
store = Store(sys.argv[1], Retention(history_per_device=big, alerts=big, decisions=big,
                                     max_age_days=36500))
if store.get_device("d0") is None:
    store.upsert_device("d0", "02:00:00:00:00:00")
na = store.count_alerts(None)
nh = len(store.posture_history("d0", limit=big))
nd = len(store.decisions(limit=big))
print("ready", flush=True)
ops = 0
while True:
    ops += 1
    if ops % 7 == 0:
        store.flush()       # as the supervisor does every second
    if na == nh == nd:
        store.add_alert({"device": "d0", "type": "t", "source": "kernel", "severity": "low",
                         "details": {"n": na}})
        na += 1
    elif nh < na:
        store.record_posture("d0", "normal", str(nh))
        nh += 1
    else:
        with store.batch():
            store.add_decision({"device": "d0", "n": nd})
            store.set_setting("counter", nd)
            store.upsert_device(f"d{nd % 20}", "02:00:00:00:00:%02x" % (nd % 20), group=str(nd))
        nd += 1
"""


def check_consistent(directory: Path) -> int:
    """Every table a gap-free prefix, in step with the others; the batch all or nothing."""
    json.loads((directory / "kalki.json").read_text())
    big = 10 ** 6
    with Store(directory) as store:
        alerts = [a["details"]["n"] for a in store.alerts(limit=big)]
        history = [int(h["reason"]) for h in store.posture_history("d0", limit=big)]
        decisions = [d["n"] for d in store.decisions(limit=big)]
        na, nh, nd = len(alerts), len(history), len(decisions)
        assert alerts == list(range(na - 1, -1, -1))
        assert history == list(range(nh - 1, -1, -1))
        assert decisions == list(range(nd - 1, -1, -1))
        # each log is flushed on its own: each is a gap-free prefix, not in step with the others
        # the device file is written at once, the logs behind it: state may be ahead
        counter = store.get_setting("counter")
        if nd:
            assert counter is not None and counter >= nd - 1
        if counter is not None:
            assert store.get_device(f"d{counter % 20}")["group"] == str(counter)
        return na


def test_sigkill_at_random_moments_leaves_a_consistent_store(tmp_path):
    rng = random.Random(1)
    progress = []
    for _ in range(20):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "ready\n", child.stderr.read()
            time.sleep(rng.uniform(0.005, 0.2))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()
        progress.append(check_consistent(tmp_path))
    assert progress == sorted(progress) and progress[-1] >= 5, progress


def test_a_torn_last_log_line_is_dropped_and_a_corrupt_one_is_refused(tmp_path, clock):
    with Store(tmp_path, clock=clock) as store:
        for _ in range(3):
            store.add_alert(alert())
    path = tmp_path / "alerts.jsonl"
    good = path.read_bytes()
    path.write_bytes(good + b'{"_id": 4, "device": "cam')      # power cut mid-append
    with Store(tmp_path, clock=clock) as store:
        assert len(store.alerts()) == 3
        store.add_alert(alert())
    assert len(Store(tmp_path, clock=clock).alerts()) == 4       # and the file was mended
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0], b"garbage", *lines[1:]]))
    with pytest.raises(StoreError, match=r"alerts.jsonl is corrupt at line 2"):
        Store(tmp_path, clock=clock)


def test_logs_keep_an_index_in_memory_and_give_whole_records(tmp_path, clock):
    actions = [{"action": "set_posture", "target": f"cam{i}", "posture": "suspicious"} for i in range(25)]
    with Store(tmp_path, clock=clock) as s:
        s.upsert_device("cam0", "02:00:00:00:00:01")
        first = s.add_decision({"rule": "physical-intrusion", "device": None,
                                "stimulus": {"kind": "telemetry", "data": {"motion": True}},
                                "actions": actions, "timing_ms": {"decide": 0.3, "enforce": 5.1}})
        s.add_alert(alert("cam0", type="gateway-probe"))
    with Store(tmp_path, clock=clock) as s:          # from the file, after a restart
        rec = s.decisions()[0]
        assert rec["id"] == first and rec["actions"] == actions and rec["timing_ms"]["enforce"] == 5.1
        rec["actions"].clear()                        # the caller's own copy
        assert s.decisions()[0]["actions"] == actions
        assert s.count_alerts("cam0", "gateway-probe") == 1
        assert s.alerts("cam0")[0]["type"] == "gateway-probe"


def test_logs_hold_a_few_numbers_per_record_in_memory(tmp_path, clock):
    """The memory target at 1,000 devices holds with the logs at their retention limits:
    200,000 history records must not cost more than a few megabytes."""
    actions = [{"action": "set_posture", "target": f"cam{i}", "posture": "suspicious"} for i in range(25)]
    log = LogTable(tmp_path / "decisions.jsonl")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(2000):
            log.insert({"kind": "decision", "device": f"cam{n % 25}", "actions": actions,
                        "at": f"2026-11-26T0{n // 1000}:00:00.{n % 1000:06d}+00:00"})
        log.flush()
        per_record = (tracemalloc.get_traced_memory()[0] - before) / 2000
    finally:
        tracemalloc.stop()
    assert per_record < 60, per_record          # the lines (1.9 KB each) are in the file only
    assert (tmp_path / "decisions.jsonl").stat().st_size > 2000 * 1800
    newest = log.records(log.rows("cam24")[:2])
    assert [r.doc_id for r in newest] == [2000, 1975] and newest[0]["actions"] == actions
    log.close()


def test_log_rewrites_keep_the_records_and_where_they_are(tmp_path, clock):
    path = tmp_path / "alerts.jsonl"
    log = LogTable(path)
    for n in range(30):
        log.insert({"device": f"d{n % 3}", "type": "scan", "at": f"2026-11-26T00:00:{n:02d}+00:00"})
    log.flush()
    assert log.trim(9, "d0") == 1                   # a tenth of a device: the file is left alone
    log.flush()
    assert len(path.read_text().splitlines()) == 30 and len(LogTable(path)) == 30
    assert log.trim(2, "d0") == 7                   # over a quarter of the file removed: rewritten
    log.insert({"device": "d0", "type": "flood", "at": "2026-11-26T00:01:00+00:00"})
    log.flush()                                     # old runs copied, the new line added
    assert log.count_for("d0") == 3 and len(log) == 23
    again = LogTable(path)
    for table in (log, again):
        got = table.records(table.rows("d0"))
        assert [r["at"][14:19] for r in got] == ["01:00", "00:27", "00:24"]
        assert [r["type"] for r in table.records(table.rows(tags=["flood"]))] == ["flood"]
        assert len(table.rows(since=datetime(2026, 11, 26, 0, 0, 25, tzinfo=UTC).timestamp())) == 6
    assert len(path.read_text().splitlines()) == 23
    log.close()
    again.close()


def test_a_failed_append_is_written_whole_by_the_next_flush(tmp_path, monkeypatch):
    path = tmp_path / "history.jsonl"
    log = LogTable(path)
    log.insert({"device": "cam", "posture": "normal", "at": "2026-11-26T00:00:00+00:00"})
    log.flush()
    log.insert({"device": "cam", "posture": "attack", "at": "2026-11-26T00:00:01+00:00"})
    real_fsync = os.fsync

    def torn(fd):                                   # half a line reached the file, then the card failed
        os.ftruncate(fd, os.fstat(fd).st_size - 20)
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fsync", torn)
    with pytest.raises(StoreError, match="cannot write the log .*history.jsonl"):
        log.flush()
    monkeypatch.setattr(os, "fsync", real_fsync)
    log.flush()
    assert [r["posture"] for r in LogTable(path).records(LogTable(path).rows())] == ["attack", "normal"]


# -- flushing behind: the logs' writing and fsyncs in a worker thread ----------------------

def _alert(store, device, n, kind="scan"):
    return store.add_alert({"device": device, "type": kind, "source": "kernel", "severity": "warning",
                            "details": {"n": n}, "at": f"2026-11-26T00:{n // 60:02d}:{n % 60:02d}+00:00"})


class SlowDisk:
    """os.fsync that waits until released, and says which thread called it."""

    def __init__(self, monkeypatch):
        import threading
        self.release = threading.Event()
        self.threads = []
        self._real = os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd):
        import threading
        self.threads.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            assert self.release.wait(5), "never released"
        self._real(fd)


def _records(store, name):
    log = store._logs[name]
    return [(r.doc_id, r["device"], r["details"]["n"]) for r in log.records(log.rows())]


def test_a_flush_behind_leaves_the_loop_free(tmp_path, monkeypatch):
    import asyncio
    store = Store(tmp_path)
    for n in range(5):
        _alert(store, "cam", n)
    disk = SlowDisk(monkeypatch)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        t = asyncio.ensure_future(ticker())
        flush = asyncio.ensure_future(store.flush_behind())
        await asyncio.sleep(0.3)
        assert not flush.done() and ticks >= 10          # the loop ran while the disk was busy
        _alert(store, "cam", 5)                          # and the store still takes records
        assert len(store.alerts()) == 6
        disk.release.set()
        await asyncio.wait_for(flush, 5)
        t.cancel()
    asyncio.run(main())
    assert disk.threads and all(name.startswith("kalki-store") for name in disk.threads)
    assert [a["details"]["n"] for a in Store(tmp_path).alerts()] == [4, 3, 2, 1, 0]  # 5: next flush
    store.close()
    assert [a["details"]["n"] for a in Store(tmp_path).alerts()] == [5, 4, 3, 2, 1, 0]


@pytest.mark.parametrize("rewrite", [False, True])
def test_records_added_and_removed_during_a_flush_behind_stay_right(tmp_path, monkeypatch, rewrite):
    import asyncio
    store = Store(tmp_path)
    log = store._logs["alerts"]
    for n in range(40):
        _alert(store, f"d{n % 4}", n)
    if rewrite:
        store.flush()
        log.trim(2, "d0")                 # 8 of 40 removed: over a quarter once d1 goes too
        log.trim(2, "d1")
        assert log._rewrite
    disk = SlowDisk(monkeypatch)

    async def main():
        flush = asyncio.ensure_future(store.flush_behind())
        await asyncio.sleep(0.1)                 # the worker is inside the fsync
        assert not flush.done()
        log.trim(1, "d2")                        # removed while its lines are being written
        for n in range(40, 44):
            _alert(store, f"d{n % 4}", n)        # added while the flush runs
        expected = _records(store, "alerts")
        disk.release.set()
        await asyncio.wait_for(flush, 5)
        assert _records(store, "alerts") == expected   # read from the file where they now lie
        return expected
    expected = asyncio.run(main())
    store.flush()
    store.close()
    again = Store(tmp_path)
    got = _records(again, "alerts")
    assert [r for r in got if r in expected] == expected
    # besides: only removed records, which a restart may bring back until the file is rewritten
    assert all(r[0] <= 40 and r not in expected for r in got if r not in expected)
    again.close()


def test_a_flush_behind_that_fails_is_written_whole_next_time(tmp_path, monkeypatch):
    import asyncio
    store = Store(tmp_path)
    _alert(store, "cam", 0)
    store.flush()
    _alert(store, "cam", 1)
    real = os.fsync

    def torn(fd):
        os.ftruncate(fd, os.fstat(fd).st_size - 10)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", torn)
    with pytest.raises(StoreError, match="cannot write the log .*alerts.jsonl: .*No space left"):
        asyncio.run(store.flush_behind())
    monkeypatch.setattr(os, "fsync", real)
    asyncio.run(store.flush_behind())
    store.close()
    assert [a["details"]["n"] for a in Store(tmp_path).alerts()] == [1, 0]


def test_nothing_is_flushed_behind_from_the_middle_of_a_batch(tmp_path):
    import asyncio
    store = Store(tmp_path)
    with store.batch():
        _alert(store, "cam", 0)
        asyncio.run(store.flush_behind())
        assert not (tmp_path / "alerts.jsonl").exists()
    asyncio.run(store.flush_behind())
    assert (tmp_path / "alerts.jsonl").exists()
    store.close()


def test_a_log_that_cannot_be_rewritten_does_not_stop_the_others(tmp_path):
    import asyncio
    store = Store(tmp_path)
    store.upsert_device("cam", "02:4b:00:00:00:01")
    for n in range(8):
        _alert(store, "cam", n)
        store.record_posture("cam", "normal", f"r{n}")
    store.flush()
    store._logs["history"].trim(1, "cam")          # 8 of 9 removed: the file is to be rewritten
    (tmp_path / "history.jsonl").unlink()          # and is gone (a card fault, a hand)
    _alert(store, "cam", 8)
    with pytest.raises(StoreError, match="cannot write the log .*history.jsonl"):
        store.flush()
    assert [a["details"]["n"] for a in Store(tmp_path).alerts()][:1] == [8]   # alerts went on
    _alert(store, "cam", 9)
    with pytest.raises(StoreError, match="cannot write the log .*history.jsonl"):
        asyncio.run(store.flush_behind())
    assert [a["details"]["n"] for a in Store(tmp_path).alerts()][:1] == [9]
    with pytest.raises(StoreError, match="history.jsonl"):
        store.close()                               # said each time, never a flush stuck


def test_kalki_store_restore_previous_puts_it_back(tmp_path):
    import subprocess
    import sys
    with Store(tmp_path) as store:
        store.upsert_device("camera1", "02:4b:00:00:00:01", ip="198.18.0.10")
        store.update_device("camera1", approved=True)
    (tmp_path / "kalki.json").write_bytes(b"")
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "--socket", str(tmp_path / "none.sock"),
                          "store", "restore-previous", "--state-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert "previous generation is back" in run.stdout
    with Store(tmp_path) as store:
        assert store.get_device("camera1") is not None


def test_a_rewrite_on_a_read_only_directory_fails_into_its_job(tmp_path, monkeypatch):
    """The faults issue, 4 (found by the lab's read-only test): the clean-up of a rewrite's
    temporary file raised OSError on a read-only file system, out of the worker; the ticker
    died and the logs were left half-flushed (an IndexError on the next read)."""
    import errno
    import pathlib
    from array import array

    from appliance.store.logs import _Rewrite
    job = _Rewrite(tmp_path / "alerts.jsonl", tmp_path / ".alerts.jsonl.tmp", None, array("q"),
                   array("q"), array("q"), {})

    def refused(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(job, "_write", refused)
    monkeypatch.setattr(pathlib.Path, "unlink", refused)
    job.run()                                   # raised before: the worker's future failed
    assert isinstance(job.error, OSError) and job.error.errno == errno.EROFS
