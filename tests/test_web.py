"""The web page and its API, lab-free: a real Supervisor (store, profiles, rules engine) with a
fake data path, served for real on a loopback port (aiohttp is the test's HTTP client)."""
import asyncio
import contextlib
import datetime
import functools
import json
import re

import aiohttp
import pytest
from fakes import FakeDataplane

from appliance import config
from appliance.faces.web import auth, create_app, listening_socket, serve
from appliance.supervisor import accounts, ops
from appliance.supervisor.core import Supervisor
from appliance.supervisor.ops import Ops

PASSWORD = "correct horse battery"


@pytest.fixture
def sup(tmp_path):
    cfg = config.Config()
    cfg.state.directory = str(tmp_path / "state")
    cfg.mqtt.password_file = str(tmp_path / "mqtt-supervisor")
    cfg.web.tls = False
    s = Supervisor(cfg)
    s.attach(FakeDataplane(), loop=None)
    s.add_device("camera1", "02:4b:00:00:00:01", "198.18.0.10", "camera", approve=True)
    s.add_device("plug1", "02:4b:00:00:00:02", "198.18.0.11", "plug", approve=True)
    s.discovered("02:4b:00:00:00:03", "198.18.0.12")       # a new device, waiting
    yield s
    s.store.close()


def new_name(s):
    return next(n for n, d in s.known.items() if not d["approved"])


def aiotest(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        asyncio.run(fn(*args, **kwargs))
    return wrapper


@contextlib.asynccontextmanager
async def client(sup, tls=False):
    """A session against the page served on 127.0.0.1 (its cookies kept, as a browser would)."""
    server = await serve(create_app(Ops(sup), tls=tls), listening_socket("127.0.0.1", 0))
    host, port = server.addresses[0]
    try:
        async with aiohttp.ClientSession(f"http://{host}:{port}",
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as c:
            yield c
    finally:
        await server.cleanup()


def set_admin(sup, user="admin", password=PASSWORD):
    sup.store.set_setting("admin", {"user": user, "scrypt": accounts.hash_password(password)})


def csrf_of(text):
    m = re.search(r'name="csrf-token" content="([^"]+)"', text)
    return m.group(1) if m else None


async def login(c, user="admin", password=PASSWORD):
    page = await c.get("/login")
    token = csrf_of(await page.text())
    r = await c.post("/login", data={"user": user, "password": password, "csrf": token},
                     allow_redirects=False)
    assert r.status == 303, await r.text()
    home = await c.get("/")
    assert home.status == 200
    return csrf_of(await home.text())


def api_headers(token):
    return {"X-CSRF-Token": token, "Content-Type": "application/json"}


PAGES = ["/", "/devices/camera1", "/rules", "/audit", "/settings", "/leds"]
API_GET = ["/api/status", "/api/devices", "/api/devices/camera1", "/api/alerts", "/api/decisions",
           "/api/audit", "/api/rules", "/api/settings", "/api/tokens", "/api/events",
           "/api/openapi.json"]
UNSAFE = [("POST", "/maintenance"), ("POST", "/devices/camera1/posture"),
          ("POST", "/devices/camera1/reset"), ("POST", "/devices/camera1/approve"),
          ("POST", "/rules"), ("POST", "/rules/x/enabled"), ("POST", "/rules/x/delete"),
          ("POST", "/settings/business-hours"), ("POST", "/settings/timezone"),
          ("POST", "/settings/password"), ("POST", "/settings/tokens"),
          ("POST", "/settings/tokens/abc/delete"), ("POST", "/settings/home-assistant-password"),
          ("POST", "/logout"),
          ("POST", "/api/devices/camera1/approve"), ("POST", "/api/devices/camera1/posture"),
          ("POST", "/api/devices/camera1/reset"), ("DELETE", "/api/devices/camera1"),
          ("POST", "/api/maintenance"), ("POST", "/api/rules"), ("POST", "/api/rules/validate"),
          ("PUT", "/api/rules/x"), ("POST", "/api/rules/x/enabled"), ("DELETE", "/api/rules/x"),
          ("PUT", "/api/settings"), ("POST", "/api/tokens"), ("DELETE", "/api/tokens/abc")]


@aiotest
async def test_every_route_needs_authentication(sup):
    set_admin(sup)
    async with client(sup) as c:
        for path in PAGES:
            r = await c.get(path, allow_redirects=False)
            assert r.status == 303 and r.headers["Location"] == "/login", path
        for path in API_GET:
            r = await c.get(path)
            assert r.status == 401, path
            assert "error" in await r.json()
        for method, path in UNSAFE:
            r = await c.request(method, path, json={})
            assert r.status == 401, (method, path)
        # a wrong API token is no better
        r = await c.get("/api/devices", headers={"Authorization": "Bearer kalki_nope"})
        assert r.status == 401
        # what is public
        assert (await c.get("/healthz")).status == 200
        assert (await c.get("/login")).status == 200
        assert (await c.get("/static/app.js")).status == 200
    assert sup.posture("camera1") == "normal"


@aiotest
async def test_without_admin_everything_leads_to_the_claim_page(sup):
    async with client(sup) as c:
        r = await c.get("/", allow_redirects=False)
        assert r.headers["Location"] == "/claim"
        r = await c.get("/login", allow_redirects=False)
        assert r.headers["Location"] == "/claim"
        page = await (await c.get("/claim")).text()
        assert "Press the button on the box" in page and 'name="password"' not in page


@aiotest
async def test_claim_only_while_the_window_is_open(sup):
    async with client(sup) as c:
        token = csrf_of(await (await c.get("/claim")).text())
        form = {"user": "admin", "password": PASSWORD, "confirm": PASSWORD, "csrf": token}
        r = await c.post("/claim", data=form, allow_redirects=False)
        assert r.status == 400 and "claim window is closed" in await r.text()
        assert sup.store.get_setting("admin") is None
        sup.open_claim_window()
        page = await (await c.get("/claim")).text()
        assert 'name="password"' in page
        # validation: short password, mismatch, missing CSRF
        for bad, msg in (({"password": "short", "confirm": "short"}, "at least 10"),
                         ({"confirm": "something else"}, "differ"),
                         ({"user": ""}, "user:")):
            r = await c.post("/claim", data={**form, **bad}, allow_redirects=False)
            assert r.status == 400 and msg in await r.text(), bad
            assert sup.store.get_setting("admin") is None
        r = await c.post("/claim", data={**form, "csrf": "wrong"}, allow_redirects=False)
        assert r.status == 403 and sup.store.get_setting("admin") is None
        r = await c.post("/claim", data=form, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/login"
        admin = sup.store.get_setting("admin")
        assert admin["user"] == "admin" and PASSWORD not in json.dumps(admin)
        assert set(admin["scrypt"]) >= {"salt", "hash", "n", "r", "p"}
        assert not sup.claim_open()              # one claim per press
        assert any(a["event"] == "admin-claimed" for a in sup.store.decisions(kind="audit"))
        # a second claim is refused even with the window open again
        sup.open_claim_window()
        r = await c.post("/claim", data=form, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/login"   # the page sends you to log in
        assert accounts.verify_password(PASSWORD, sup.store.get_setting("admin")["scrypt"])
        await login(c)


@aiotest
async def test_login_cookie_flags_and_wrong_password(sup):
    set_admin(sup)
    async with client(sup) as c:
        token = csrf_of(await (await c.get("/login")).text())
        r = await c.post("/login", data={"user": "admin", "password": "nope", "csrf": token})
        assert r.status == 401 and "Wrong user or password" in await r.text()
        r = await c.post("/login", data={"user": "admin", "password": PASSWORD}, allow_redirects=False)
        assert r.status == 403                    # no CSRF token
        r = await c.post("/login", data={"user": "admin", "password": PASSWORD, "csrf": token},
                         allow_redirects=False)
        assert r.status == 303
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
        assert (await c.get("/")).status == 200


@aiotest
async def test_secure_cookie_with_tls(sup):
    set_admin(sup)
    async with client(sup, tls=True) as c:
        r = await c.get("/login")
        assert "Secure" in r.headers["Set-Cookie"]
        assert "max-age" in r.headers["Strict-Transport-Security"]


@aiotest
async def test_login_rate_limit(sup):
    set_admin(sup)
    async with client(sup) as c:
        token = csrf_of(await (await c.get("/login")).text())
        for _ in range(5):
            r = await c.post("/login", data={"user": "admin", "password": "guess", "csrf": token})
            assert r.status == 401
        r = await c.post("/login", data={"user": "admin", "password": PASSWORD, "csrf": token},
                         allow_redirects=False)
        assert r.status == 429 and int(r.headers["Retry-After"]) > 0
        assert (await c.get("/", allow_redirects=False)).status == 303   # not logged in


def test_rate_limiter_window():
    now = [0.0]
    rl = auth.RateLimiter(limit=5, window=60, clock=lambda: now[0])
    for _ in range(5):
        assert rl.retry_after("a") is None
        rl.fail("a")
    assert rl.retry_after("a") == 61 and rl.retry_after("b") is None
    now[0] = 61
    assert rl.retry_after("a") is None


@aiotest
async def test_csrf_is_needed_for_every_state_change(sup):
    set_admin(sup)
    async with client(sup) as c:
        token = await login(c)
        for method, path in UNSAFE:
            r = await c.request(method, path, json={"posture": "attack"})
            assert r.status == 403, (method, path)
            r = await c.request(method, path, data={"posture": "attack", "csrf": "forged"})
            assert r.status == 403, (method, path)
        assert sup.posture("camera1") == "normal" and "camera1" in sup.known
        r = await c.post("/api/devices/camera1/posture", json={"posture": "suspicious"},
                         headers={"X-CSRF-Token": token})
        assert r.status == 200 and sup.posture("camera1") == "suspicious"


@aiotest
async def test_session_ends_when_the_admin_password_is_reset(sup):
    set_admin(sup)
    async with client(sup) as c:
        await login(c)
        assert (await c.get("/api/devices")).status == 200
        sup.reset_admin()            # the button held 5 s
        assert (await c.get("/api/devices")).status == 401
        set_admin(sup)               # claimed again: the old session stays dead
        assert (await c.get("/api/devices")).status == 401
        assert (await c.get("/", allow_redirects=False)).status == 303


@aiotest
async def test_logout(sup):
    set_admin(sup)
    async with client(sup) as c:
        token = await login(c)
        r = await c.post("/logout", data={"csrf": token}, allow_redirects=False)
        assert r.status == 303
        assert (await c.get("/api/devices")).status == 401


@aiotest
async def test_security_headers(sup):
    set_admin(sup)
    async with client(sup) as c:
        for path in ("/login", "/healthz", "/api/devices", "/static/app.js"):
            r = await c.get(path)
            h = r.headers
            assert "script-src 'self'" in h["Content-Security-Policy"] and "unsafe-inline" not in \
                h["Content-Security-Policy"], path
            assert h["X-Frame-Options"] == "DENY" and h["X-Content-Type-Options"] == "nosniff"
            assert h["Referrer-Policy"] == "no-referrer"
        r = await c.get("/api/devices")
        assert r.headers["Cache-Control"] == "no-store"
        await login(c)
        page = await (await c.get("/")).text()
        assert "<script>" not in page and 'src="/static/app.js"' in page


@aiotest
async def test_pages_show_the_devices(sup):
    set_admin(sup)
    sup.raise_alert("camera1", "brute-force", "kernel",
                    {"src": "198.19.0.66", "dst": "198.18.0.10", "dst_port": 23, "action": "drop"}, 0)
    sup.on_telemetry("plug1", {"on": True, "power_w": 12})
    async with client(sup) as c:
        await login(c)
        home = await (await c.get("/")).text()
        assert 'data-device="camera1"' in home and "posture-attack" in home    # the rule fired
        assert new_name(sup) in home and "waiting for approval" in home
        cam = await (await c.get("/devices/camera1")).text()
        for word in ("Why blocked", "brute_force", "198.19.0.66", "device-under-attack", "quarantine",
                     "Posture history", "decide ms", "in XDP ms"):
            assert word in cam, word
        plug = await (await c.get("/devices/plug1")).text()
        assert "power_w" in plug
        assert (await c.get("/devices/nope")).status == 404
        rules = await (await c.get("/rules")).text()
        assert "physical-intrusion" in rules and "profile:" in rules or "builtin" in rules
        audit = await (await c.get("/audit")).text()
        assert "device-add" in audit
        leds = await (await c.get("/leds")).text()
        assert "green steady" in leds and "claim" in leds and "fault" in leds
        assert "Business hours" in await (await c.get("/settings")).text()


@aiotest
async def test_forms_change_things_and_refuse_bad_input(sup):
    set_admin(sup)
    name = new_name(sup)
    async with client(sup) as c:
        token = await login(c)
        post = functools.partial(c.post, allow_redirects=False)
        # approve: bad type refused, then approved
        r = await post(f"/devices/{name}/approve", data={"type": "toaster", "csrf": token})
        assert r.status == 400 and "toaster" in await r.text() and not sup.known[name]["approved"]
        r = await post(f"/devices/{name}/approve", data={"type": "light", "csrf": token})
        assert r.status == 303 and sup.posture(name) == "normal"
        # posture
        for bad, msg in (({"posture": "panic"}, "panic"), ({"posture": "suspicious", "for": "soon"}, "soon")):
            r = await post("/devices/camera1/posture", data={**bad, "csrf": token})
            assert r.status == 400 and msg in await r.text(), bad
            assert sup.posture("camera1") == "normal"
        r = await post("/devices/camera1/posture", data={"posture": "suspicious", "for": "15m",
                                                         "csrf": token})
        assert r.status == 303 and sup.posture("camera1") == "suspicious"
        assert sup.known["camera1"]["posture_expires"]
        r = await post("/devices/nope/posture", data={"posture": "attack", "csrf": token})
        assert r.status == 404
        r = await post("/devices/camera1/reset", data={"csrf": token})
        assert r.status == 303 and sup.posture("camera1") == "normal"
        # maintenance
        for bad in ("-1", "many", "9999"):
            r = await post("/maintenance", data={"minutes": bad, "csrf": token})
            assert r.status == 400 and "minutes" in await r.text()
            assert sup.store.maintenance_until() is None
        r = await post("/maintenance", data={"minutes": "30", "csrf": token})
        assert r.status == 303 and sup.maintenance_active()
        # settings
        r = await post("/settings/timezone", data={"timezone": "Mars/Olympus", "csrf": token})
        assert r.status == 400 and "Mars/Olympus" in await r.text()
        r = await post("/settings/business-hours", data={"days": ["mon", "funday"], "start": "08:00",
                                                         "end": "18:00", "csrf": token})
        assert r.status == 400 and "days" in await r.text()
        r = await post("/settings/business-hours", data={"days": "mon", "start": "8am", "end": "18:00",
                                                         "csrf": token})
        assert r.status == 400 and "start" in await r.text()
        assert sup.settings()["timezone"] == "UTC"
        r = await post("/settings/timezone", data={"timezone": "Europe/Berlin", "csrf": token})
        assert r.status == 303 and sup.settings()["timezone"] == "Europe/Berlin"
        r = await post("/settings/business-hours", data={"days": ["sat", "sun"], "start": "10:00",
                                                         "end": "16:00", "csrf": token})
        assert r.status == 303 and sup.settings()["business_hours"]["days"] == ["sat", "sun"]
        # password change
        r = await post("/settings/password", data={"current": "wrong", "password": "x" * 12,
                                                   "confirm": "x" * 12, "csrf": token})
        assert r.status == 400 and "current password" in await r.text()
        r = await post("/settings/password", data={"current": PASSWORD, "password": "short",
                                                   "confirm": "short", "csrf": token})
        assert r.status == 400 and accounts.verify_password(PASSWORD,
                                                            sup.store.get_setting("admin")["scrypt"])
        r = await post("/settings/password", data={"current": PASSWORD, "password": "y" * 12,
                                                   "confirm": "y" * 12, "csrf": token})
        assert r.status == 303 and accounts.verify_password("y" * 12,
                                                            sup.store.get_setting("admin")["scrypt"])
        # tokens
        r = await post("/settings/tokens", data={"name": "", "csrf": token})
        assert r.status == 400 and not accounts.list_tokens(sup.store)
        r = await post("/settings/tokens", data={"name": "ha", "csrf": token})
        assert r.status == 200
        shown = re.search(r'id="new-token">([^<]+)<', await r.text()).group(1)
        assert shown not in json.dumps(sup.store.get_setting(accounts.TOKENS_SETTING))   # stored hashed
        tid = accounts.list_tokens(sup.store)[0]["id"]
        r = await post("/settings/tokens/nope/delete", data={"csrf": token})
        assert r.status == 400
        r = await post(f"/settings/tokens/{tid}/delete", data={"csrf": token})
        assert r.status == 303 and not accounts.list_tokens(sup.store)


RULE = """[[rules]]
name = "plug-watch"
description = "a plug drawing too much"
applies_to = ["plug"]
when = {telemetry = {device = "self", field = "power_w", op = ">", value = 2000}}
then = [{set_posture = {posture = "suspicious"}}]
"""


@aiotest
async def test_site_rules_edit_validate_enable(sup):
    set_admin(sup)
    async with client(sup) as c:
        token = await login(c)
        post = functools.partial(c.post, allow_redirects=False)
        for bad, msg in ((RULE.replace('op = ">"', 'op = "~"'), "rules[0]"),
                         (RULE.replace("then = [", "then = [{explode = {}}, "), "explode"),
                         ("not toml [", "rules"),
                         (RULE.replace("plug-watch", "device-under-attack"), "device-under-attack"),
                         (RULE + RULE, "plug-watch")):
            r = await post("/rules", data={"text": bad, "csrf": token})
            text = await r.text()
            assert r.status == 400 and msg in text, (bad, text[-500:])
            assert sup.store.rules() == []
        r = await post("/rules", data={"text": RULE, "csrf": token})
        assert r.status == 303
        assert "plug-watch" in [x.name for x in sup.engine.rules]
        edit = await (await c.get("/rules?edit=plug-watch")).text()
        assert "power_w" in edit
        r = await post("/rules/plug-watch/enabled", data={"enabled": "false", "csrf": token})
        assert r.status == 303 and "plug-watch" not in [x.name for x in sup.engine.rules]
        # a built-in rule can be switched off and on (tests/test_rules_words.py), never deleted
        r = await post("/rules/device-under-attack/delete", data={"csrf": token})
        assert r.status == 400 and "only site rules can be changed or deleted" in await r.text()
        r = await post("/rules/plug-watch/enabled", data={"enabled": "maybe", "csrf": token})
        assert r.status == 400
        r = await post("/rules/plug-watch/enabled", data={"enabled": "true", "csrf": token})
        assert "plug-watch" in [x.name for x in sup.engine.rules]
        # the rule works: telemetry moves the plug
        sup.on_telemetry("plug1", {"power_w": 3000})
        assert sup.posture("plug1") == "suspicious"
        r = await post("/rules/plug-watch/delete", data={"csrf": token})
        assert r.status == 303 and sup.store.rules() == []
        assert "plug-watch" not in [x.name for x in sup.engine.rules]
        events = {a["event"] for a in sup.store.decisions(kind="audit")}
        assert {"rule-put", "rule-disabled", "rule-enabled", "rule-delete"} <= events


@aiotest
async def test_api_with_token_and_bad_input(sup):
    set_admin(sup)
    name = new_name(sup)
    async with client(sup) as c:
        csrf = await login(c)
        r = await c.post("/api/tokens", json={"name": "script"}, headers={"X-CSRF-Token": csrf})
        assert r.status == 201
        token = (await r.json())["token"]
    async with client(sup) as c:      # a fresh client: no cookies, only the token
        h = {"Authorization": f"Bearer {token}"}
        devices = await (await c.get("/api/devices", headers=h)).json()
        assert {d["name"] for d in devices} >= {"camera1", "plug1", name}
        show = await (await c.get("/api/devices/camera1", headers=h)).json()
        assert show["umboxes"] and show["counters"]["brute_force"]["packets"] == 7
        assert "decisions" in show and "telemetry" in show
        bad = [("POST", "/api/devices/camera1/posture", {"posture": "panic"}, 400, "panic"),
               ("POST", "/api/devices/camera1/posture", {"posture": "attack", "for": -5}, 400, "for"),
               ("POST", "/api/devices/camera1/posture", {"posture": "attack", "extra": 1}, 400, "extra"),
               ("POST", "/api/devices/camera1/posture", {}, 400, "posture"),
               ("POST", "/api/devices/nope/posture", {"posture": "attack"}, 404, "nope"),
               ("POST", f"/api/devices/{name}/approve", {"type": "toaster"}, 400, "toaster"),
               ("POST", f"/api/devices/{name}/approve", {}, 400, "type"),
               ("POST", "/api/maintenance", {"minutes": "30"}, 400, "minutes"),
               ("POST", "/api/maintenance", {"minutes": True}, 400, "minutes"),
               ("PUT", "/api/settings", {"timezone": "Nowhere/Land"}, 400, "Nowhere/Land"),
               ("PUT", "/api/settings", {"timezone": "UTC", "colour": "red"}, 400, "colour"),
               ("PUT", "/api/settings", {"business_hours": {"days": ["mon"], "start": "25:00",
                                                            "end": "18:00"}}, 400, "start"),
               ("POST", "/api/rules", {"text": RULE.replace("power_w", "")}, 400, "rules[0]"),
               ("POST", "/api/rules/validate", {"text": "x = 1"}, 400, "[[rules]]"),
               ("PUT", "/api/rules/r1", {"when": {"nonsense": 1}, "then": []}, 400, "rule r1"),
               ("PUT", "/api/rules/r1", {"name": "r2", "when": {}, "then": []}, 400, "r2"),
               ("POST", "/api/rules/none/enabled", {"enabled": True}, 400, "none"),
               ("DELETE", "/api/rules/none", None, 400, "none"),
               ("POST", "/api/tokens", {"name": 5}, 400, "token name"),
               ("DELETE", "/api/tokens/none", None, 400, "none")]
        before = json.dumps(sup.store._storage.read(), sort_keys=True)
        for method, path, body, status, word in bad:
            r = await c.request(method, path, json=body, headers=h)
            answer = await r.json()
            assert r.status == status and word in answer["error"], (method, path, body, answer)
        r = await c.post("/api/devices/camera1/posture", data="{not json", headers={
            **h, "Content-Type": "application/json"})
        assert r.status == 400 and "malformed JSON" in (await r.json())["error"]
        r = await c.post("/api/devices/camera1/posture", data="posture=attack", headers={
            **h, "Content-Type": "application/x-www-form-urlencoded"})
        assert r.status == 400 and "JSON" in (await r.json())["error"]
        r = await c.get("/api/alerts?limit=lots", headers=h)
        assert r.status == 400 and "limit" in (await r.json())["error"]
        assert json.dumps(sup.store._storage.read(), sort_keys=True) == before   # nothing changed
        # and the good ones
        r = await c.post(f"/api/devices/{name}/approve", json={"type": "light"}, headers=h)
        assert r.status == 200 and sup.posture(name) == "normal"
        r = await c.post("/api/devices/camera1/posture", json={"posture": "attack", "for": "10m"}, headers=h)
        assert r.status == 200 and sup.posture("camera1") == "attack"
        r = await c.post("/api/devices/camera1/reset", headers=h)
        assert r.status == 200 and sup.posture("camera1") == "normal"
        r = await c.put("/api/settings", json={"timezone": "Europe/Berlin"}, headers=h)
        assert (await r.json())["timezone"] == "Europe/Berlin"
        r = await c.post("/api/rules", json={"text": RULE}, headers=h)
        assert (await r.json()) == {"saved": ["plug-watch"]}
        r = await c.post("/api/rules/plug-watch/enabled", json={"enabled": False}, headers=h)
        assert r.status == 200 and sup.store.get_rule("plug-watch")["enabled"] is False
        audit = await (await c.get("/api/audit", headers=h)).json()
        assert any(a["actor"] == "web:token:script" for a in audit)
        spec = await (await c.get("/api/openapi.json", headers=h)).json()
        assert spec["openapi"].startswith("3.") and "/api/devices/{name}/posture" in spec["paths"]
        status = await (await c.get("/api/status", headers=h)).json()
        assert status["summary"] in ("normal", "warning", "alert")


@aiotest
async def test_tokens_stop_working_when_the_admin_is_reset(sup):
    set_admin(sup)
    token, _ = accounts.create_token(sup.store, "ha", sup.now())
    async with client(sup) as c:
        h = {"Authorization": f"Bearer {token}"}
        assert (await c.get("/api/devices", headers=h)).status == 200
        sup.reset_admin()
        assert (await c.get("/api/devices", headers=h)).status == 401
        sup.open_claim_window()
        Ops(sup).claim("admin", PASSWORD, PASSWORD, "test")     # a new owner: old tokens gone
        assert (await c.get("/api/devices", headers=h)).status == 401


@aiotest
async def test_server_sent_events_are_live_and_unsubscribe(sup):
    set_admin(sup)
    async with client(sup) as c:
        await login(c)
        r = await c.get("/api/events")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        await asyncio.sleep(0.05)
        assert len(sup.listeners) == 1
        sup.set_posture("plug1", "suspicious", "test")
        got = None
        for _ in range(20):
            line = (await asyncio.wait_for(r.content.readline(), 5)).decode()
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event.get("kind") == "posture":
                    got = event
                    break
        assert got == {"kind": "posture", "device": "plug1", "posture": "suspicious", "reason": "test"}
        r.close()
        for _ in range(100):
            if not len(sup.listeners):
                break
            sup.notify({"kind": "panel", "event": "tick"})     # the writer notices the gone client
            await asyncio.sleep(0.02)
        assert not len(sup.listeners)
        # the stream ends when the password is reset
        r = await c.get("/api/events")
        await asyncio.sleep(0.05)
        sup.reset_admin()
        text = (await asyncio.wait_for(r.content.read(), 5)).decode()
        assert "event: logout" in text
        await asyncio.sleep(0.05)
        assert not len(sup.listeners)


@aiotest
async def test_healthz(sup):
    async with client(sup) as c:
        r = await c.get("/healthz")
        assert r.status == 200 and (await r.json())["ok"] is True


def test_passwords_use_scrypt_with_salt():
    a, b = accounts.hash_password(PASSWORD), accounts.hash_password(PASSWORD)
    assert a["salt"] != b["salt"] and a["hash"] != b["hash"]
    assert accounts.verify_password(PASSWORD, a) and not accounts.verify_password(PASSWORD + "x", a)
    assert not accounts.verify_password(PASSWORD, {"salt": "!!"})


def test_rule_toml_round_trip():
    import tomllib
    rule = tomllib.loads(RULE)["rules"][0]
    assert tomllib.loads(ops.rule_toml(rule))["rules"][0] == rule
    assert ops.validate_rules_text(ops.RULE_EXAMPLE, "example")["valid"] == ["night-camera-watch"]


@aiotest
async def test_start_web_with_tls_makes_a_certificate(sup, tmp_path):
    import aiohttp

    from appliance.faces.web import start_web
    set_admin(sup)
    sup.cfg.web.listen, sup.cfg.web.port, sup.cfg.web.tls = "127.0.0.1", 0, True
    sup.cfg.web.tls_dir = str(tmp_path / "tls")
    runner = await start_web(Ops(sup))
    try:
        port = runner.addresses[0][1]
        assert (tmp_path / "tls" / "key.pem").stat().st_mode & 0o077 == 0
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://127.0.0.1:{port}/login", ssl=False) as r:
                assert r.status == 200 and "Secure" in r.headers["Set-Cookie"]
    finally:
        await runner.cleanup()


@aiotest
async def test_start_web_in_a_network_namespace_file(sup):
    import os

    import aiohttp

    from appliance.faces.web import start_web
    if os.geteuid() != 0:
        pytest.skip("setns needs root")
    sup.cfg.web.listen, sup.cfg.web.port, sup.cfg.web.tls = "127.0.0.1", 0, False
    sup.cfg.web.netns = "/proc/self/ns/net"
    runner = await start_web(Ops(sup))
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200
    finally:
        await runner.cleanup()


@aiotest
async def test_a_site_settings_error_is_shown_on_every_page(sup):
    set_admin(sup)
    sup.site_error = "kalki.toml: wifi.passphrase: 8 to 63 characters"
    async with client(sup) as c:
        await login(c)
        for path in ("/", "/settings"):
            text = await (await c.get(path)).text()
            assert 'id="site-error"' in text and "wifi.passphrase" in text
        sup.site_error = None
        assert 'id="site-error"' not in await (await c.get("/")).text()


@aiotest
async def test_repeated_reports_are_kept_once_and_still_counted(sup):
    for watts in (5, 5, 5, 9):
        sup.on_telemetry("plug1", {"on": True, "power_w": watts})
    kept = [payload for _, payload in sup.recent_telemetry("plug1", 4)][::-1]
    assert kept[0] is kept[1] is kept[2] and kept[3] is not kept[2]
    assert sup.telemetry("plug1", "power_w") == [5, 5, 5, 9]
    since = sup.now() - datetime.timedelta(minutes=1)
    assert sup.telemetry("plug1", "power_w", last=2, since=since) == [5, 9]
    assert [row[1]["power_w"] for row in sup.recent_telemetry("plug1", 3)] == [9, 5, 5]


@aiotest
async def test_the_ticker_goes_on_when_the_sd_card_fails(sup, monkeypatch, caplog):
    """Heartbeat, expiries and collections must outlive a failing store (a full SD card)."""
    from appliance.errors import StoreError

    async def full():
        raise StoreError("cannot write the log /var/lib/kalki/alerts.jsonl: No space left on device")
    monkeypatch.setattr(sup.store, "flush_behind", full)
    sup.set_posture("plug1", "suspicious", "test", for_seconds=60)
    sup.clock.set((sup.now() + datetime.timedelta(minutes=2)).isoformat())     # past its expiry
    ticker = asyncio.ensure_future(sup._ticker())
    await asyncio.sleep(1.4)
    beat = sup.heartbeat
    await asyncio.sleep(0.6)
    assert not ticker.done() and sup.heartbeat > beat
    sup._stop.set()
    await asyncio.wait_for(ticker, 2)
    assert sup.known["plug1"]["posture"] == "normal"                   # the expiry still came
    said = [r.getMessage() for r in caplog.records if "No space left" in r.getMessage()]
    assert len(said) == 1                                              # once, not every tick


# -- the server itself: what Microdot leaves to us ------------------------------------------

async def raw(port, data: bytes, timeout=5.0, source=None) -> bytes:
    """Sends bytes as they are (from the address `source`, if given) and returns all the
    server answers before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   local_addr=(source, 0) if source else None)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:           # closed with our bytes unread
        return b""
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def served(sup):
    server = await serve(create_app(Ops(sup), tls=False), listening_socket("127.0.0.1", 0))
    try:
        yield server, server.addresses[0][1]
    finally:
        await server.cleanup()


@aiotest
async def test_malformed_requests_get_400_and_the_server_goes_on(sup, capsys):
    set_admin(sup)
    async with served(sup) as (_, port):
        for junk in (b"NONSENSE\r\n\r\n", b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
                     b"GET / HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
                     b"POST /login HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                     b"GET /?a=%zz HTTP/1.1\r\n\r\n", b"\xff\xfe / HTTP/1.1\r\n\r\n",
                     b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n"):
            answer = await raw(port, junk)
            assert answer.startswith(b"HTTP/1.0 400"), (junk[:40], answer[:80])
        assert b" 200 " in (await raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[:20]
        cookies = "; ".join(f"other{i}={'v' * 60}" for i in range(60))    # 4 KB of a neighbour's
        assert b" 200 " in (await raw(port, f"GET /healthz HTTP/1.1\r\nCookie: {cookies}\r\n\r\n"
                                            .encode()))[:20]
    assert "Traceback" not in capsys.readouterr().err      # a scanner does not fill the log


@aiotest
async def test_too_many_headers_or_too_big_a_body_is_refused_and_changes_nothing(sup):
    set_admin(sup)
    async with served(sup) as (_, port):
        headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 1000) for i in range(40))
        answer = await raw(port, b"GET /login HTTP/1.1\r\n" + headers + b"\r\n")
        assert answer.startswith(b"HTTP/1.0 400")
        body = b'{"text": "' + b"x" * (300 * 1024) + b'"}'
        answer = await raw(port, b"POST /api/rules HTTP/1.1\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert answer.startswith(b"HTTP/1.0 413") and b"256 KiB" in answer
    assert not sup.store.rules()


@aiotest
async def test_a_client_that_stalls_is_cut_off(sup, monkeypatch):
    from appliance.faces.web import server
    monkeypatch.setattr(server, "REQUEST_SECONDS", 0.3)
    async with served(sup) as (_, port):
        t0 = asyncio.get_running_loop().time()
        answer = await raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", timeout=5)  # no blank line
        assert answer.startswith(b"HTTP/1.0 400")
        assert asyncio.get_running_loop().time() - t0 < 3


@aiotest
async def test_open_connections_are_capped_and_cleanup_closes_them(sup, monkeypatch):
    from appliance.faces.web import server
    monkeypatch.setattr(server, "MAX_CONNECTIONS", 3)
    async with served(sup) as (server, port):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert await raw(port, b"GET /healthz HTTP/1.1\r\n\r\n") == b""   # closed at once
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.2)
        assert b" 200 " in (await raw(port, b"GET /healthz HTTP/1.1\r\n\r\n"))[:20]
        # a live page's stream stays open until the server is cleaned up
        set_admin(sup)
        async with aiohttp.ClientSession() as s:
            r = await s.get(f"http://127.0.0.1:{port}/api/events",
                            headers={"Authorization": "Bearer " + accounts.create_token(
                                sup.store, "t", sup.now())[0]})
            assert r.status == 200
            await asyncio.sleep(0.05)
            assert len(sup.listeners) == 1
            await asyncio.wait_for(server.cleanup(), 3)
            assert await asyncio.wait_for(r.content.read(), 3) is not None   # ended, not hung
            assert not len(sup.listeners)


@aiotest
async def test_static_files_only_by_name(sup):
    set_admin(sup)
    async with client(sup) as c:
        ok = await c.get("/static/style.css")
        assert ok.status == 200 and ok.headers["Content-Type"].startswith("text/css")
        for path in ("/static/..%2f__init__.py", "/static/%2e%2e%2fauth.py", "/static/.hidden",
                     "/static/nothing.js", "/static/"):
            assert (await c.get(path)).status == 404, path


@aiotest
async def test_unknown_paths_and_methods(sup):
    set_admin(sup)
    async with client(sup) as c:
        r = await c.get("/api/nothing")
        assert r.status == 404 and (await r.json()) == {"error": "not found"}
        assert r.headers["X-Frame-Options"] == "DENY"              # error answers too
        assert (await c.request("OPTIONS", "/api/devices")).status == 405
        assert (await c.request("PATCH", "/api/devices")).status == 405
        assert (await c.head("/login")).status == 200
        r = await c.head("/api/events")                            # no stream, nothing held
        assert r.status == 401


@aiotest
async def test_a_head_request_on_the_event_stream_holds_nothing(sup):
    set_admin(sup)
    token = accounts.create_token(sup.store, "t", sup.now())[0]
    async with client(sup) as c:
        r = await c.head("/api/events", headers={"Authorization": f"Bearer {token}"})
        assert r.status == 200
        await asyncio.sleep(0.05)
        assert not len(sup.listeners)


@aiotest
async def test_a_client_that_expects_100_continue_gets_it(sup):
    """curl asks for it before sending a body over 1 KiB (rules as TOML), and waits a second."""
    set_admin(sup)
    token = accounts.create_token(sup.store, "t", sup.now())[0]
    body = json.dumps({"text": RULE}).encode()
    async with served(sup) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /api/rules/validate HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + token.encode() + b"\r\n"
                         b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            await writer.drain()
            assert await asyncio.wait_for(reader.readline(), 0.5) == b"HTTP/1.1 100 Continue\r\n"
            assert await reader.readline() == b"\r\n"
            writer.write(body)
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.0 200") and b'"valid"' in answer
        finally:
            writer.close()
