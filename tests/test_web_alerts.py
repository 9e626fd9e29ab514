"""Why was this blocked, in plain words and local time: each alert's and decision's sentence
(appliance.supervisor.explain, through ops), the page's release / keep / block buttons, the
drop set with its unblock button, and no UTC ISO time on the pages. Lab-free: test_web's
Supervisor with a fake data path, served on loopback."""
import asyncio
import datetime
import functools
import json
import re

import test_web
from test_web import api_headers, client, login, new_name, set_admin

from appliance.supervisor import explain
from appliance.supervisor.ops import Ops

sup = test_web.sup      # camera1 (198.18.0.10, camera), plug1 (198.18.0.11, plug), one waiting
aiotest = test_web.aiotest

ATTACKER = "198.19.0.66"
GATEWAY = "198.18.0.1"
ISO = re.compile(r"\d{4}-\d\d-\d\dT")
# 21:00:08 UTC on Saturday 1 June 2024 is 23:00:08 in Berlin (CEST)
SATURDAY = "2024-06-01T21:00:08+00:00"
QUARANTINE = "it can reach only DHCP, DNS and the gateway's MQTT"


def at_berlin(sup, when=SATURDAY):
    sup.clock.set(when)
    Ops(sup).update_settings({"timezone": "Europe/Berlin"}, "test")


def probe(sup, port=22, device="plug1", src="198.18.0.11"):
    """A device opening something on the gateway: the kernel's gateway-probe event."""
    sup.on_kernel_alerts([(device, "gateway-probe", {"reason": "gateway", "umbox": "gateway_guard",
                                                     "src": src, "dst": GATEWAY, "dst_port": port,
                                                     "proto": 6, "action": "dropped", "count": 1})])


def brute_force(sup, action="dropped"):
    sup.on_kernel_alerts([("camera1", "brute-force", {"reason": "brute_force", "umbox": "brute_force",
                                                      "src": ATTACKER, "dst": "198.18.0.10",
                                                      "dst_port": 23, "proto": 6, "action": action,
                                                      "count": 10})])


def said(sup, kind, device=None) -> str:
    """The newest alert of `kind` (of `device`), as ops tells it."""
    return next(a["explanation"] for a in Ops(sup).alerts(device=device, limit=100) if a["type"] == kind)


def forms(page: str) -> dict[str, str]:
    """{action: the form's inner HTML} of every form on a page."""
    found = re.finditer(r'<form method="post" action="([^"]+)"[^>]*>(.*?)</form>', page, re.S)
    return {m.group(1): m.group(2) for m in found}


def alert_id(sup, kind) -> int:
    return next(a["id"] for a in sup.store.alerts(limit=100) if a["type"] == kind)


# -- the words ----------------------------------------------------------------------------------

def test_the_example_sentence_in_the_sites_time_zone(sup):
    at_berlin(sup)
    probe(sup)
    assert sup.posture("plug1") == "quarantine"
    assert said(sup, "gateway-probe") == (
        "plug1 tried to open the gateway's SSH port (22) at 23:00:08. A device that does this is "
        "probably taken over, so it is in quarantine: it can reach only DHCP, DNS and the gateway's MQTT.")
    # the same words on every call (the CLI, a test comparing two lists), and in the decision's
    first = Ops(sup).alerts()
    assert Ops(sup).alerts() == first
    decision = next(d for d in Ops(sup).decisions(kind="decision") if d["rule"] == "device-compromised")
    assert decision["explanation"] == (
        "Rule device-compromised put plug1 in quarantine at 23:00:08, after a gateway-probe alert on "
        f"plug1. In quarantine, {QUARANTINE}.")


def test_sentences_for_the_kernels_and_the_others_alert_kinds(sup):
    at_berlin(sup)
    brute_force(sup, action="blocked")
    assert said(sup, "brute-force") == (
        f"{ATTACKER} tried to log in to camera1's Telnet port (23) 10 times in a short while at 23:00:08. "
        f"The gateway put {ATTACKER} in the drop set. Someone is guessing its password, so it is in "
        f"posture attack: {QUARANTINE}.")
    event = {"src": ATTACKER, "dst": "198.18.0.11", "dst_port": 80, "proto": 6, "action": "dropped",
             "count": 40}
    sup.on_kernel_alerts([("plug1", "port-scan", {**event, "reason": "port_scan"}),
                          ("plug1", "syn-flood", {**event, "reason": "syn_flood"})])
    assert said(sup, "port-scan").startswith(f"{ATTACKER} scanned plug1's ports at 23:00:08 (40 of them")
    assert "Someone is looking for a way in, so it is in posture attack" in said(sup, "port-scan")
    assert said(sup, "syn-flood").startswith(f"{ATTACKER} flooded plug1 with connection requests (SYN) at")
    # a device reaching for another: named, not only numbered
    sup.on_kernel_alerts([("camera1", "lateral-movement", {"reason": "lateral", "src": "198.18.0.10",
                                                           "dst": "198.18.0.11", "dst_port": 23,
                                                           "proto": 6, "action": "dropped"})])
    assert said(sup, "lateral-movement").startswith(
        "camera1 tried to reach another device, plug1 (198.18.0.11), on Telnet port (23) at 23:00:08.")
    # a refused flow is news, not an alarm: no word on a posture (the supervisor records it as
    # a flow; a gate or a rule may raise one)
    sup.raise_alert("camera1", "egress-refused", "kernel", {"reason": "allowlist", "src": "198.18.0.10",
                                                            "dst": "198.19.64.9", "dst_port": 443,
                                                            "proto": 6, "action": "dropped"}, 0)
    assert said(sup, "egress-refused") == (
        "camera1 tried to reach 198.19.64.9 on HTTPS port (443) at 23:00:08; its profile does not allow "
        "that, and the gateway refused it. Not an alarm: allow it on the device's page if the device "
        "needs it.")
    sup.on_denied("plug1", "kalki/camera1", 3)
    assert said(sup, "mqtt-denied").startswith(
        "plug1 tried to publish on kalki/camera1 (not its own topic) 3 times at 23:00:08; the broker "
        "refused it. A device that speaks for another")
    ops = Ops(sup)
    ops.raise_alert("api-denied", source=ATTACKER, target="198.18.0.11", by="gate",
                    details={"method": "PUT", "path": "/state", "count": 2})
    assert said(sup, "api-denied").startswith(
        f"{ATTACKER} sent PUT /state to plug1's web API 2 times at 23:00:08; its profile does not allow")
    sup.raise_alert(None, "tamper", "kernel", {"problems": ["XDP detached from wlan0"], "restored": ["xdp"],
                                               "error": None}, 0)
    assert said(sup, "tamper") == ("Something changed the gateway's protection behind its back at "
                                   "23:00:08: XDP detached from wlan0. It was put back.")
    sup.raise_alert("camera1", "default-credentials", "supervisor",
                    {"logins": [{"service": "http_basic", "port": 80, "user": "admin"}],
                     "message": "camera1 accepts its type's default login"}, 0)
    assert said(sup, "default-credentials").startswith(
        "camera1 accepts its type's factory (default) login at 23:00:08 (admin on http_basic port 80). "
        "Anyone who can reach it can log in")
    waiting = new_name(sup)
    assert said(sup, "new-device").startswith(f"A new device, {waiting}, joined")


def test_unknown_kinds_are_told_from_their_name_message_and_details(sup):
    at_berlin(sup)
    ops = Ops(sup)
    ops.raise_alert("fridge-door-open", target="198.18.0.10", by="operator",
                    details={"minutes": 12, "door": "left", "nested": {"x": 1}})
    assert said(sup, "fridge-door-open") == (
        "The operator raised alert fridge-door-open about camera1 at 23:00:08 (minutes 12, door left). "
        "Its posture did not change.")
    sup.raise_alert("plug1", "power-anomaly", "rule", {"message": "average draw above 2 kW"}, 0)
    assert said(sup, "power-anomaly").startswith(
        "A rule raised alert power-anomaly about plug1 at 23:00:08: average draw above 2 kW.")
    # whatever the details hold, or lack, a sentence comes out
    ctx = explain.Context(None, None, lambda ip: None, "")
    for alert in ({"type": "gateway-probe", "source": "kernel", "details": {}},
                  {"type": "brute-force", "source": "kernel", "details": {"dst_port": "x", "count": True}},
                  {"type": "mqtt-denied", "source": "mqtt", "details": {}},
                  {"type": None, "source": None, "details": None},
                  {"type": "identity-clone", "source": "discovery", "details": {"mac": 5}}):
        words = explain.alert_words(alert, ctx, "", "")
        assert words and words.endswith(".") and "None" not in words.replace("'None'", ""), (alert, words)
    assert explain.alert_words({"type": "gateway-probe", "source": "kernel", "details": {}}, ctx, "", "") \
        .startswith("a device tried to open a port of the gateway.")


def test_the_posture_sentence_reads_the_devices_profile(sup):
    at_berlin(sup)
    plug = sup.profiles["plug"]
    suspicious = explain.reach_words("suspicious", plug.stack("suspicious"))
    assert suspicious.startswith("besides the gateway's DHCP, DNS, NTP and MQTT, it can reach only the "
                                 "site's controller plug-cloud (any protocol); pool.ntp.org on UDP 123")
    assert "at most 500 packets/s" in suspicious and "at most 2 inbound connections at once" in suspicious
    assert explain.reach_words("normal", plug.stack("normal")).startswith(
        "it reaches the network as its profile allows, but not the other devices")
    # a quarantine without the management path says so, wherever the posture is told
    plug.postures["quarantine"] = {"quarantine": {"management": False}}
    probe(sup)
    assert said(sup, "gateway-probe").endswith(
        "so it is in quarantine: it can reach only DHCP and DNS on the gateway.")
    # an alert after which no rule moved the device: the posture it was in already
    probe(sup, port=8080)
    assert sup.posture("plug1") == "quarantine"
    Ops(sup).raise_alert("fridge-door-open", target="198.18.0.11", by="operator")
    assert said(sup, "fridge-door-open").endswith(
        "It was in quarantine already: it can reach only DHCP and DNS on the gateway.")


def test_local_times_and_how_long_ago():
    now = datetime.datetime.fromisoformat(SATURDAY)
    berlin = "Europe/Berlin"
    w = explain.when("2024-06-01T20:57:08.000001+00:00", now, berlin)
    assert (w["local"], w["ago"]) == ("22:57:08", "3 min ago")
    assert w["title"] == "Sat 1 Jun 2024 22:57:08 CEST"
    assert explain.when("2024-05-30T10:00:00+00:00", now, berlin)["local"] == "Thu 12:00"
    assert explain.when("2024-05-30T10:00:00+00:00", now, berlin)["ago"] == "2 days ago"   # 59 h
    assert explain.when("2024-06-01T21:15:08+00:00", now, berlin)["ago"] == "in 15 min"
    assert explain.when("2024-05-01T10:00:00+00:00", now, berlin)["local"] == "1 May 12:00"
    assert explain.when("2023-12-24T10:00:00+00:00", now, berlin)["local"] == "24 Dec 2023"
    # the day is the site's: 23:30 in New York is the next day in UTC
    ny = explain.when("2024-06-02T03:30:00+00:00",
                      datetime.datetime.fromisoformat("2024-06-02T03:40:00+00:00"), "America/New_York")
    assert (ny["local"], ny["ago"]) == ("23:30:00", "10 min ago")
    assert explain.when("not a time", now, berlin) is None and explain.when(None, now, berlin) is None
    assert explain.when(now, now, "Nowhere/Atlantis")["local"] == "21:00:08"      # an unknown zone: UTC
    assert [explain.ago(s) for s in (5, 42, 179, 179.6, 5400, 90000, -900, -899.9)] == \
        ["just now", "42 s ago", "2 min ago", "3 min ago", "2 h ago", "1 day ago", "in 15 min", "in 15 min"]


def test_the_command_line_gets_the_same_words(sup):
    from appliance.supervisor import control
    at_berlin(sup)
    probe(sup)
    ops = Ops(sup)
    rows = control.handle(ops, {"op": "alerts", "args": {"limit": 5}})
    said = next(r for r in rows if r["type"] == "gateway-probe")
    assert said["explanation"].startswith("plug1 tried to open the gateway's SSH port (22) at 23:00:08.")
    shown = control.handle(ops, {"op": "device_show", "args": {"name": "plug1"}})["alerts"]
    assert said["explanation"] in [a["explanation"] for a in shown]
    ops.block_source(ATTACKER, 60)
    assert [b["source"] for b in control.handle(ops, {"op": "blocked_sources"})] == [ATTACKER]
    assert control.handle(ops, {"op": "alert_keep", "args": {"alert": said["id"]}}) == \
        {"alert": said["id"], "kept": True}
    released = control.handle(ops, {"op": "alert_release", "args": {"alert": str(said["id"])}})
    assert released["posture"] == "normal"
    assert sup.posture("plug1") == "normal"


# -- the page -----------------------------------------------------------------------------------

@aiotest
async def test_pages_show_the_words_and_local_times_and_no_iso_time(sup):
    set_admin(sup)
    at_berlin(sup)
    probe(sup)
    brute_force(sup)
    sup.on_telemetry("plug1", {"on": True, "power_w": 12})
    sup.set_posture("camera1", "suspicious", "test", for_seconds=900)
    Ops(sup).block_source(ATTACKER, 600)
    Ops(sup).maintenance(30)
    async with client(sup) as c:
        await login(c)
        pages = {path: await (await c.get(path)).text()
                 for path in ("/", "/alerts", "/devices/plug1", "/devices/camera1", "/audit", "/settings")}
        # the audit log's at column too; its raw details are as they were recorded
        assert ('<td data-label="at"><time title="Sat 1 Jun 2024 23:00:08 CEST">23:00:08</time>'
                in pages.pop("/audit"))
        for path, text in pages.items():
            found = ISO.search(text)
            assert not found, (path, found and text[found.start() - 80:][:200])
            assert "+00:00" not in text, path
        home = pages["/"]
        assert ("plug1 tried to open the gateway&#x27;s SSH port (22) at 23:00:08. A device that does "
                "this is probably taken over, so it is in quarantine: it can reach only DHCP, DNS and the "
                "gateway&#x27;s MQTT.") in home
        assert '<time title="Sat 1 Jun 2024 23:00:08 CEST">23:00:08</time>' in home
        assert "Maintenance (automation paused) until <time" in home and ">23:30:08</time>" in home
        assert 'data-now="1717275608' in home          # the script counts from the server's clock
        # the raw JSON is there, behind a toggle
        assert re.search(r'<details class="raw"><summary>details</summary><code>[^<]*gateway_guard', home)
        plug = pages["/devices/plug1"]
        assert "Rule device-compromised put plug1 in quarantine at 23:00:08" in plug
        assert "A device that does this is probably taken over" in plug
        cam = pages["/devices/camera1"]
        assert "until <time" in cam and ">23:15:08</time>" in cam and "in 15 min" in cam
        # three minutes on: the times stay, how long ago moves
        sup.clock.set("2024-06-01T21:03:10+00:00")
        home = await (await c.get("/")).text()
        assert ">23:00:08</time>" in home and "3 min ago" in home
        # two days on: the day of the week
        sup.clock.set("2024-06-03T09:00:00+00:00")
        assert ">Sat 23:00</time>" in await (await c.get("/alerts")).text()
        # the live stream's alerts carry the same words and times
        r = await c.get("/api/events")
        await asyncio.sleep(0.05)
        probe(sup, port=23)
        event = None
        for _ in range(40):
            line = (await asyncio.wait_for(r.content.readline(), 5)).decode()
            if line.startswith("data: ") and json.loads(line[6:]).get("kind") == "alert":
                event = json.loads(line[6:])
                break
        r.close()
        assert event and event["when"]["local"] == "11:00:00" and event["when"]["ago"] == "just now"
        assert event["explanation"].startswith(
            "plug1 tried to open the gateway's Telnet port (23) at 11:00:00.")


@aiotest
async def test_release_keep_and_block_post_with_csrf_and_call_their_ops(sup):
    set_admin(sup)
    probe(sup)
    brute_force(sup)
    probe_id, brute_id = alert_id(sup, "gateway-probe"), alert_id(sup, "brute-force")
    async with client(sup) as c:
        token = await login(c)
        post = functools.partial(c.post, allow_redirects=False)
        home = await (await c.get("/")).text()
        shown = forms(home)
        for action in (f"/alerts/{probe_id}/release", f"/alerts/{probe_id}/keep",
                       f"/alerts/{brute_id}/release", f"/alerts/{brute_id}/keep",
                       f"/alerts/{brute_id}/block"):
            assert action in shown and 'name="csrf"' in shown[action], action
        assert f"/alerts/{probe_id}/block" not in shown          # its source is the device itself
        # without the CSRF token nothing happens
        for action in (f"/alerts/{probe_id}/release", f"/alerts/{probe_id}/keep", f"/alerts/{brute_id}/block",
                       "/unblock"):
            r = await post(action, data={"seconds": "3600", "source": ATTACKER, "next": "/"})
            assert r.status == 403, action
        assert sup.posture("plug1") == "quarantine" and not sup.dp.blocked
        assert not [a for a in sup.store.decisions(kind="audit") if a["event"].startswith("alert-")]
        # keep: an audit record, and no more buttons for that alert
        r = await post(f"/alerts/{probe_id}/keep", data={"csrf": token, "next": "/"})
        assert r.status == 303 and r.headers["Location"] == "/"
        kept = sup.store.decisions(kind="audit")[0]
        assert (kept["event"], kept["actor"]) == ("alert-keep", "web:admin")
        assert kept["details"]["alert"] == probe_id
        assert sup.posture("plug1") == "quarantine"
        home = await (await c.get("/")).text()
        assert f"/alerts/{probe_id}/release" not in home and f"/alerts/{probe_id}/keep" not in home
        assert "Kept by web:admin" in home
        # block the source: block_source, for the time chosen, and the drop-set list shows it
        for bad in ("soon", "-5", "99999999"):
            r = await post(f"/alerts/{brute_id}/block", data={"csrf": token, "seconds": bad})
            assert r.status == 400, bad
        assert not sup.dp.blocked
        r = await post(f"/alerts/{brute_id}/block", data={"csrf": token, "seconds": "3600",
                                                          "next": "/devices/camera1"})
        assert r.status == 303 and r.headers["Location"] == "/devices/camera1"
        assert sup.dp.blocked == {ATTACKER: 3600}
        assert any(a["event"] == "block" and a["actor"] == "web:admin" and a["details"]["alert"] == brute_id
                   for a in sup.store.decisions(kind="audit"))
        page = await (await c.get("/devices/camera1")).text()
        assert f"/alerts/{brute_id}/block" not in page                 # blocked already
        # release: back to normal (posture_reset), audited, the buttons gone
        r = await post(f"/alerts/{brute_id}/release", data={"csrf": token, "next": "https://evil.example/"})
        assert r.status == 303 and r.headers["Location"] == "/alerts"   # only back to a page of ours
        assert sup.posture("camera1") == "normal"
        events = [a["event"] for a in sup.store.decisions(device="camera1", kind="audit")]
        assert "alert-release" in events and "posture" in events
        page = await (await c.get("/alerts")).text()
        assert f"/alerts/{brute_id}/release" not in page and "Released by web:admin" in page
        # an alert that is not there, or one about no device, is refused and changes nothing
        r = await post("/alerts/99999/keep", data={"csrf": token})
        assert r.status == 400 and "99999" in await r.text()
        sup.raise_alert(None, "tamper", "kernel", {"problems": ["x"]}, 0)
        r = await post(f"/alerts/{alert_id(sup, 'tamper')}/release", data={"csrf": token})
        assert r.status == 400 and "no device" in await r.text()
        # the same through the API, with the CSRF header
        h = api_headers(token)
        r = await c.post(f"/api/alerts/{alert_id(sup, 'tamper')}/keep", headers=h, json={})
        assert r.status == 200 and (await r.json())["kept"] is True
        r = await c.post(f"/api/alerts/{probe_id}/block", headers=h, json={"seconds": "1h"})
        assert r.status == 400 and "no source" in (await r.json())["error"]
        alerts = await (await c.get("/api/alerts", headers=h)).json()
        assert all(isinstance(a["explanation"], str) and a["explanation"] for a in alerts)


@aiotest
async def test_the_drop_set_with_expiry_and_unblock(sup):
    set_admin(sup)
    at_berlin(sup)
    ops = Ops(sup)
    ops.block_source(ATTACKER, 900)
    ops.block_source("198.19.0.77", 0)
    blocked = {b["source"]: b for b in ops.blocked_sources()}
    assert blocked[ATTACKER]["until"].startswith("2024-06-01T21:15:0")
    assert blocked["198.19.0.77"]["until"] is None
    assert blocked[ATTACKER]["why"] == "blocked by hand (the operator, or the gate)"
    async with client(sup) as c:
        token = await login(c)
        page = await (await c.get("/alerts")).text()
        section = page.split('id="blocked"')[1].split("</section>")[0]
        assert ATTACKER in section and "198.19.0.77" in section and "until unblocked" in section
        assert re.search(r"until <time[^>]*>23:15:0[78]</time> <span[^>]*>in 15 min</span>", section)
        unblocks = re.findall(r'<form method="post" action="/unblock"[^>]*>(.*?)</form>', section, re.S)
        assert [re.search(r'name="source" value="([^"]+)"', f).group(1) for f in unblocks] == \
            [ATTACKER, "198.19.0.77"]
        assert all('name="csrf"' in f for f in unblocks)
        assert (await c.post("/unblock", data={"source": ATTACKER}, allow_redirects=False)).status == 403
        assert ATTACKER in sup.dp.blocked
        r = await c.post("/unblock", data={"source": ATTACKER, "csrf": token, "next": "/alerts"},
                         allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/alerts" and ATTACKER not in sup.dp.blocked
        audit = next(a for a in sup.store.decisions(kind="audit") if a["event"] == "unblock")
        assert (audit["actor"], audit["details"]["source"]) == ("web:admin", ATTACKER)
        r = await c.post("/unblock", data={"source": "not-an-address", "csrf": token}, allow_redirects=False)
        assert r.status == 400
        # the API: the list, and DELETE to unblock
        h = api_headers(token)
        listed = await (await c.get("/api/blocked", headers=h)).json()
        assert [b["source"] for b in listed] == ["198.19.0.77"] and listed[0]["seconds_left"] is None
        r = await c.delete("/api/blocked/198.19.0.77", headers=h)
        assert r.status == 200 and (await r.json())["was_blocked"] is True
        assert await (await c.get("/api/blocked", headers=h)).json() == []
        assert "none" in (await (await c.get("/")).text()).split('id="blocked"')[1].split("</section>")[0]
