"""The lab's fake clock never makes the logs read out of order (issue 14, "The lab"): the
policy clock may be set back (`kalki clock set`, ops.clock_set) to replay a night, and the
records stamped after it then carry earlier times than older ones. Posture history, alerts,
decisions and the audit trail still read in the order things happened, through Ops, the web
page and the command, with a mark where the clock went back."""
import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fakes import FakeDataplane
from test_profiles_cli import kalki, served  # noqa: F401  (the socket's fixture)
from test_web import aiotest, client, login, set_admin

from appliance import config
from appliance.store.state import Retention, Store
from appliance.supervisor.core import Supervisor
from appliance.supervisor.ops import Ops

START = "2026-11-25T22:00:00+01:00"
NIGHT = "2026-11-25T23:00:00+01:00"
LATER = "2026-11-25T23:30:00+01:00"
BACK = "2026-11-25T21:00:00+01:00"      # before all of it: the night replayed


@pytest.fixture
def sup(tmp_path):
    cfg = config.Config()
    cfg.state.directory = str(tmp_path / "state")
    cfg.mqtt.password_file = str(tmp_path / "mqtt-supervisor")
    cfg.gateway.gate_credentials = str(tmp_path / "gate-credentials.json")
    cfg.web.tls = False
    cfg.policy.fake_time = START
    s = Supervisor(cfg)
    s.attach(FakeDataplane(), loop=None)
    s.add_device("camera1", "02:4b:00:00:00:01", "198.18.0.10", "camera", approve=True)
    s.add_device("plug1", "02:4b:00:00:00:02", "198.18.0.11", "plug", approve=True)
    yield s
    s.store.close()


@pytest.fixture
def ops(sup):
    """The night played forward, then again from before it began."""
    o = Ops(sup)
    o.clock_set(NIGHT)
    o.posture_set("camera1", "suspicious")
    sup.raise_alert("plug1", "port-scan", "kernel", {"n": 1}, time.monotonic_ns())   # plug1: attack
    o.clock_set(LATER)
    o.posture_set("camera1", "quarantine")
    sup.raise_alert("camera1", "api-denied", "gate", {"n": 2}, time.monotonic_ns())
    o.clock_set(BACK)
    o.posture_set("camera1", "learning")
    sup.raise_alert("camera1", "brute-force", "kernel", {"n": 3}, time.monotonic_ns())
    o.posture_set("camera1", "normal")
    sup.raise_alert("plug1", "port-scan-outbound", "kernel", {"n": 4}, time.monotonic_ns())  # quarantine
    return o


# newest first: a rule put it under attack (the brute-force alert) between two operator changes
CAMERA_HISTORY = ["normal", "attack", "learning", "quarantine", "suspicious", "normal"]
MARKED = [False, False, True, False, False, False]      # the first record after the clock went back


def test_ops_read_the_logs_in_the_order_things_happened(ops, sup):
    history = ops.device_show("camera1")["history"]
    assert [h["posture"] for h in history] == CAMERA_HISTORY
    # the one record whose time is earlier than the one before it is marked; the others are not
    assert [bool(h.get("clock_back")) for h in history] == MARKED
    assert history[2]["at"] < history[3]["at"]        # as stamped: the clock's own reading

    alerts = ops.alerts()
    assert [a["details"].get("n") for a in alerts] == [4, 3, 2, 1]
    assert [bool(a.get("clock_back")) for a in alerts] == [False, True, False, False]
    assert [a["details"].get("n") for a in ops.alerts(device="camera1")] == [3, 2]
    # the posture camera1 was in at the api-denied alert: by the times, not the first in the list
    assert "in quarantine already" in alerts[2]["explanation"]

    recs = ops.decisions(limit=100)
    ids = [r["id"] for r in recs]
    assert ids == sorted(ids, reverse=True) and len(recs) > 8
    # the clock set back is in the audit trail, where it happened, and the record after it marked
    i = next(i for i, r in enumerate(recs) if r.get("event") == "clock-set"
             and r["details"]["to"].startswith("2026-11-25T20:00:00"))
    assert recs[i]["details"]["from"].startswith("2026-11-25T22:30")
    assert recs[i].get("clock_back") and not any(r.get("clock_back") for r in recs[:i] + recs[i + 1:])
    assert recs[i - 1]["details"]["posture"] == "learning"
    assert recs[i + 1]["details"]["posture"] == "quarantine"
    rules = [(r["rule"], r["device"]) for r in ops.decisions(kind="decision")]
    assert rules == [("device-compromised", "plug1"), ("device-under-attack", "camera1"),
                     ("device-under-attack", "plug1"), ("camera-suspicious-poll-lights", "camera1")]
    audit = ops.audit_log()
    assert [r["event"] for r in audit[:2]] == ["posture", "posture"]
    assert [r["event"] for r in audit].count("clock-set") == 3
    assert [r["details"].get("posture") for r in ops.decisions(device="camera1", kind="audit")[:4]] == [
        "normal", "attack", "learning", "quarantine"]


def test_the_order_survives_a_restart(ops, sup):
    sup.store.close()
    with Store(Path(sup.cfg.state.directory)) as again:
        assert [h["posture"] for h in again.posture_history("camera1")] == CAMERA_HISTORY
        assert [a["details"]["n"] for a in again.alerts()] == [4, 3, 2, 1]
        assert [a.get("clock_back", False) for a in again.alerts()] == [False, True, False, False]


def _section(html: str, heading: str) -> str:
    return html.split(f"<h2>{heading}</h2>", 1)[1].split("</section>", 1)[0]


@aiotest
async def test_the_device_page_shows_them_in_that_order(ops, sup):
    set_admin(sup)
    async with client(sup) as c:
        await login(c)
        html = await (await c.get("/devices/camera1")).text()
    rows = re.findall(r"<tr>(.*?)</tr>", _section(html, "Posture history"), re.S)[1:]   # after the heads
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r, re.S) for r in rows]
    assert [c[1] for c in cells] == CAMERA_HISTORY
    assert ["clock went back" in c[0] for c in cells] == MARKED
    alerts = _section(html, "Alerts")
    assert alerts.index("brute-force") < alerts.index("api-denied")
    assert alerts.count("clock went back") == 1
    marked = [r for r in re.findall(r"<tr>(.*?)</tr>", _section(html, "Decisions and audit"), re.S)
              if "clock went back" in r]
    assert len(marked) == 1 and "learning" in marked[0]       # camera1's first record after it


def test_the_command_shows_them_in_that_order(served, capsys):  # noqa: F811
    sock, _ = served
    code, out, _ = kalki(capsys, sock, "device", "show", "camera1")
    assert code == 0 and [h["posture"] for h in json.loads(out)["history"]] == CAMERA_HISTORY
    code, out, _ = kalki(capsys, sock, "alerts", "--table")
    lines = out.splitlines()[1:]
    assert code == 0 and [line.split()[0] for line in lines] == ["4", "3", "2", "1"]
    assert ["clock went back" in line for line in lines] == [False, True, False, False]


def test_retention_keeps_what_came_last_not_what_is_stamped_last(tmp_path):
    """Before, the records stamped after the clock went back were the "oldest", and the first
    that retention dropped: a full posture history lost each new change at once."""
    now = [datetime(2026, 11, 25, 23, tzinfo=UTC)]
    with Store(tmp_path, Retention(history_per_device=3, alerts=3), clock=lambda: now[0]) as store:
        store.upsert_device("cam", "aa:bb:cc:00:00:01")
        for n in range(5):
            store.record_posture("cam", f"p{n}", "before")
            store.add_alert({"device": "cam", "type": "scan", "source": "kernel", "severity": "high",
                             "details": {"n": n}})
            now[0] += timedelta(minutes=1)
        now[0] -= timedelta(hours=2)
        store.record_posture("cam", "after", "the clock set back")
        store.add_alert({"device": "cam", "type": "scan", "source": "kernel", "severity": "high",
                         "details": {"n": 5}})
        store.prune()
        assert [h["posture"] for h in store.posture_history("cam")] == ["after", "p4", "p3"]
        assert [a["details"]["n"] for a in store.alerts()] == [5, 4, 3]
