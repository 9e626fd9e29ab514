"""The default-credential check (issue 15, item 6) in a lab: from the gateway, against a real
emulated camera's telnet, HTTP Basic and login form; never before approval; never in
quarantine; the gate's redirect is not in the way of the gateway's own connections."""
import json
import re
import subprocess
import time

import pytest
from labutil import wait_until

from appliance import client
from appliance.errors import KalkiError
from lab import topology

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def llab(run_suffix):
    name = f"l{run_suffix}lgn"
    state = topology.up(name, devices=5, supervisor=True, unapproved=1)
    try:
        yield state
    finally:
        topology.down(name)


def ask(lab, op, **args):
    return client.request(lab.gateway["socket"], op, **args)


def stats(lab, device) -> dict:
    """The emulated device's own counters, read inside its namespace (not through the gateway)."""
    out = subprocess.run(["ip", "netns", "exec", device.namespace, "curl", "-s", "--max-time", "3",
                          "http://127.0.0.1/_lab/stats"], capture_output=True, text=True).stdout
    return json.loads(out)


def alerts(lab, kind):
    return [a for a in ask(lab, "alerts", limit=200) if a["type"] == kind]


def lab_camera_profile() -> str:
    text = open("umboxes/camera.toml").read()
    text = re.sub(r'^type = "camera"', 'type = "camera-lab"', text, flags=re.M)
    text = text[:text.index("[match]")]      # not its match (camera1 is a camera) nor its rules
    pw = topology.DEVICE_PASSWORD
    entries = [("telnet", 23, "admin", pw, None), ("telnet", 23, "root", "xc3511", None),
               ("http_basic", 80, "admin", pw, "/status"), ("http_form", 80, "admin", pw, None),
               ("http_form", 80, "admin", "admin", None)]
    for service, port, user, password, path in entries:
        text += (f'\n[[default_logins]]\nservice = "{service}"\nport = {port}\nuser = "{user}"\n'
                 f'password = "{password}"\n' + (f'path = "{path}"\n' if path else ""))
    return text


def test_checked_after_approval_only_and_what_worked_is_one_alert(llab):
    new = llab.devices[-1]
    name = next(d["name"] for d in ask(llab, "devices") if d["mac"] == new.mac)
    with pytest.raises(KalkiError, match="not approved"):
        ask(llab, "device_check_logins", name=name)
    time.sleep(1)
    before = stats(llab, new)
    assert before["telnet_sessions"] == 0 and before["logins_failed"] == 0 and before["logins_ok"] == 0
    ask(llab, "profile_import", text=lab_camera_profile(), filename="camera-lab.toml")
    postures = {d["name"]: d["posture"] for d in ask(llab, "devices")}
    ask(llab, "device_approve", name=name, type="camera-lab")
    found = wait_until(lambda: [a for a in alerts(llab, "default-credentials") if a["device"] == name], 20)
    assert len(found) == 1, found
    worked = {(e["service"], e["port"], e["user"]) for e in found[0]["details"]["logins"]}
    assert worked == {("telnet", 23, "admin"), ("http_basic", 80, "admin"), ("http_form", 80, "admin")}
    record = ask(llab, "device_show", name=name)["logins_checked"]
    assert record["by"] == "approval by operator"
    assert [r["outcome"] for r in record["results"]] == ["success", "failure", "success", "success",
                                                         "failure"], record
    assert topology.DEVICE_PASSWORD not in json.dumps(record) and "xc3511" not in json.dumps(record)
    after = stats(llab, new)
    assert after["telnet_sessions"] == 2 and after["logins_ok"] == 3 and after["logins_failed"] == 2, after
    # nothing else moved: no posture, no detector, no drop set
    now = {d["name"]: d["posture"] for d in ask(llab, "devices")}
    assert now[name] == "normal" and {k: v for k, v in now.items() if k != name} == \
        {k: v for k, v in postures.items() if k != name}
    assert not alerts(llab, "brute-force") and not alerts(llab, "gateway-probe")


def test_the_shipped_list_on_demand_finds_nothing_on_lab_passwords(llab):
    result = ask(llab, "device_check_logins", name="camera1")
    assert result["found"] == 0, result
    outcomes = {r["service"]: r["outcome"] for r in result["results"]}
    assert outcomes.get("telnet") == "failure" and outcomes.get("http_basic") == "no-login", result


def test_in_quarantine_nothing_is_tried(llab):
    new = llab.devices[-1]
    name = next(d["name"] for d in ask(llab, "devices") if d["mac"] == new.mac)
    ask(llab, "posture_set", name=name, posture="quarantine")
    before = stats(llab, new)["telnet_sessions"]
    result = ask(llab, "device_check_logins", name=name)
    assert result["state"] == "skipped" and "quarantine" in result["reason"], result
    assert stats(llab, new)["telnet_sessions"] == before
