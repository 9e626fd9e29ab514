"""Real devices on the page and in the API: the names a device resolved, its refused flows with
the one action that allows each, its own destinations, learning and the profile made of it, and
the profiles (read in plain words, uploaded as TOML or MUD, exported, removed). Over a real
Supervisor (store, profiles, rules) with the fake data path, served on a loopback port."""
import functools
import html
import json
import re
from pathlib import Path

import aiohttp
import test_web
from test_web import aiotest, client, login, new_name, set_admin

from appliance.faces.web import views
from appliance.faces.web.http import parse_multipart
from appliance.policy import profiles
from appliance.supervisor import accounts, explain
from appliance.vocab import iso

sup = test_web.sup      # camera1 (198.18.0.10), plug1, and a new device waiting for approval
LAMP_FILE = Path(__file__).resolve().parent / "data" / "mud" / "mood_lamp-3204432Mud.json"
LAMP_TEXT = LAMP_FILE.read_text()
LAMP_TYPE = "mood_lamp-3204432"
CAMERA_IP = "198.18.0.10"
CLOUD = "n-devs.cam-cloud.example"
REFUSED = {"reason": "allowlist", "action": "dropped", "dst": "198.19.64.9", "dst_port": 443, "proto": 6,
           "src": CAMERA_IP, "suppressed": 0}
HOSTILE = "<script>alert(1)</script>"


def refuse(sup, times=3, device="camera1", **event):
    sup.on_kernel_alerts([(device, "egress-refused", {**REFUSED, **event})] * times)


def seed(sup):
    """camera1 resolved a name its profile gives (bound), one it does not (refused), and opened
    a flow to the refused name's address three times."""
    assert sup.dp.answer(CAMERA_IP, ["pool.ntp.org"], ["198.19.1.5"], 300)
    assert not sup.dp.answer(CAMERA_IP, [CLOUD], ["198.19.64.9"], 300)
    refuse(sup)


def destinations(sup, device="camera1"):
    return sup.dp.devices[device].stack["egress_anomaly"]["destinations"]


def hidden(page: str, action: str, field: str) -> str:
    """The value of a hidden field in the form that posts to `action`."""
    m = re.search(rf'<form method="post" action="{re.escape(action)}"[^>]*>(.*?)</form>', page, re.S)
    assert m, action
    found = re.search(rf'name="{field}" value="([^"]*)"', m.group(1))
    if found:
        return html.unescape(found.group(1))
    found = re.search(rf'<textarea name="{field}"[^>]*>(.*?)</textarea>', m.group(1), re.S)
    assert found, (action, field)
    return html.unescape(found.group(1))


def installed(sup) -> list:
    directory = profiles.installed_dir(sup.cfg.state.directory)
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def upload(csrf, data: bytes | None = None, filename="mood_lamp-3204432Mud.json", **fields):
    form = aiohttp.FormData()
    if csrf is not None:
        form.add_field("csrf", csrf)
    if data is not None:
        form.add_field("file", data, filename=filename, content_type="application/json")
    for k, v in fields.items():
        form.add_field(k, v)
    return form


# -- the device page --------------------------------------------------------------------------

@aiotest
async def test_the_device_page_shows_names_and_refused_flows(sup):
    set_admin(sup)
    seed(sup)
    async with client(sup) as c:
        await login(c)
        page = await (await c.get("/devices/camera1")).text()
        bound = page.split('class="names-bound"')[1].split("</table>")[0]
        assert "198.19.1.5" in bound and "pool.ntp.org" in bound and "yes" in bound
        assert re.search(r"\d+ min", bound)                                # expires in
        names_refused = page.split('class="names-refused"')[1].split("</table>")[0]
        assert CLOUD in names_refused and '<td data-label="times">1</td>' in names_refused
        flows = page.split('class="flows-refused"')[1].split("</table>")[0]
        assert f"asked for {CLOUD}:443 (tcp) 3 times, refused" in flows
        assert hidden(page, "/devices/camera1/allow", "destination") == f"{CLOUD}:443/tcp"
        assert 'class="own-destinations"' in page and "Start learning" in page
        # a device that is not in the data path has no names, and the page still shows
        other = await c.get(f"/devices/{new_name(sup)}")
        assert other.status == 200 and 'class="names-bound"' in await other.text()
    assert sup.store.alerts(device="camera1") == []       # refusals are shown, not alarmed


@aiotest
async def test_allow_puts_the_destination_in_force_and_remove_takes_it_back(sup):
    set_admin(sup)
    seed(sup)
    async with client(sup) as c:
        token = await login(c)
        post = functools.partial(c.post, allow_redirects=False)
        page = await (await c.get("/devices/camera1")).text()
        destination = hidden(page, "/devices/camera1/allow", "destination")
        r = await post("/devices/camera1/allow", data={"destination": destination, "csrf": token})
        assert r.status == 303 and r.headers["Location"] == "/devices/camera1"
        assert destination in destinations(sup)                             # in force
        assert sup.device("camera1")["allow"] == [destination] and sup.posture("camera1") == "normal"
        page = await (await c.get("/devices/camera1")).text()
        own = page.split('class="own-destinations"')[1].split("</table>")[0]
        assert destination in own and f"{CLOUD} on TCP 443" in own
        assert hidden(page, "/devices/camera1/disallow", "destination") == destination
        flows = page.split('class="flows-refused"')[1].split("</table>")[0]
        assert ">allowed<" in flows and "Allow</button>" not in flows
        # refused input changes nothing, and says why
        for bad, status in (("not a destination!", 400), ("", 400)):
            r = await post("/devices/camera1/allow", data={"destination": bad, "csrf": token})
            assert r.status == status and "device camera1" in await r.text()
        r = await post("/devices/nope/allow", data={"destination": destination, "csrf": token})
        assert r.status == 404
        assert sup.device("camera1")["allow"] == [destination]
        # a destination typed by hand
        r = await post("/devices/camera1/allow", data={"destination": " lan:6668/tcp ", "csrf": token})
        assert r.status == 303 and "lan:6668/tcp" in destinations(sup)
        r = await post("/devices/camera1/disallow", data={"destination": destination, "csrf": token})
        assert r.status == 303
        assert destination not in destinations(sup) and sup.device("camera1")["allow"] == ["lan:6668/tcp"]
    audit = [(a["event"], a["actor"]) for a in sup.store.decisions(kind="audit")]
    assert ("device-allow", "web:admin") in audit and ("device-disallow", "web:admin") in audit


@aiotest
async def test_hostile_text_is_escaped(sup):
    set_admin(sup)
    # a name and an address as a flow record holds them: the page must not trust either
    sup.flows.record("refused", "camera1", {"dst": HOSTILE, "dst_port": 443, "proto": 6},
                     [f'"><img src=x onerror=alert(1)>{HOSTILE}'], iso(sup.now()))
    sup.flows.record("refused", "camera1", {"dst": HOSTILE, "dst_port": 80, "proto": 6}, [], iso(sup.now()))
    profile = f'type = "nasty"\ndescription = "{HOSTILE}"\n[postures.normal]\nanti_spoof = {{}}\n'
    async with client(sup) as c:
        token = await login(c)
        r = await c.post("/profiles", data=upload(token, text=profile), allow_redirects=False)
        assert r.status == 303
        for path in ("/devices/camera1", "/profiles", "/profiles/nasty"):
            page = await (await c.get(path)).text()
            assert "<script>alert" not in page and "<img" not in page, path
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, path
        page = await (await c.get("/devices/camera1")).text()
        # the Allow button carries the text back as it was, for the ops to refuse
        assert hidden(page, "/devices/camera1/allow", "destination").endswith(f"{HOSTILE}:443/tcp")
        r = await c.post("/devices/camera1/allow", data={"csrf": token, "destination": hidden(
            page, "/devices/camera1/allow", "destination")}, allow_redirects=False)
        text = await r.text()
        assert r.status == 400 and "<script>alert" not in text and "&lt;script&gt;" in text
    assert sup.device("camera1").get("allow") in (None, [])


@aiotest
async def test_learning_from_the_page(sup):
    set_admin(sup)
    waiting = new_name(sup)
    async with client(sup) as c:
        token = await login(c)
        post = functools.partial(c.post, allow_redirects=False)
        for bad in ("soon", "-5m", "0s", "3600"):
            r = await post("/devices/camera1/learn", data={"for": bad, "csrf": token})
            assert r.status == 400 and "duration" in await r.text(), bad
            assert sup.posture("camera1") == "normal"
        r = await post("/devices/camera1/learn", data={"for": "2h", "csrf": token})
        assert r.status == 303 and sup.posture("camera1") == "learning"
        expires = sup.device("camera1")["posture_expires"]
        page = await (await c.get(r.headers["Location"])).text()
        assert "learning for 2 h" in page and 'id="learning"' in page
        until = explain.when(expires, sup.now(), "UTC")      # in the site's zone, never ISO
        assert re.search(rf'Learning until <time title="[^"]+">{until["local"]}</time> '
                         r'<span class="ago muted" data-at="[0-9.]+">in 2 h</span>, then normal',
                         page)
        # what it does now is let through and recorded, with the name it resolved
        assert not sup.dp.answer(CAMERA_IP, [CLOUD], ["198.19.64.9"], 300)
        sup.on_kernel_alerts([("camera1", "egress-report", {**REFUSED, "reason": "egress_anomaly",
                                                            "action": "reported"})])
        page = await (await c.get("/devices/camera1")).text()
        learnt = page.split('class="flows-learnt"')[1].split("</table>")[0]
        assert f"asked for {CLOUD}:443 (tcp) once, let through while learning" in learnt
        assert f"{CLOUD}:443/tcp" in learnt and "Make a profile</button>" in page
        # a device not approved yet is approved first, as the type chosen; 24 h by default
        r = await post(f"/devices/{waiting}/learn", data={"for": "", "type": "light", "csrf": token})
        assert r.status == 303
        d = sup.device(waiting)
        assert (d["approved"], d["type"], d["posture"]) == (True, "light", "learning")
        assert "learning for 1 day" in await (await c.get(f"/devices/{waiting}")).text()
        r = await post("/devices/nope/learn", data={"csrf": token})
        assert r.status == 404
    assert ("learn", "web:admin") in [(a["event"], a["actor"]) for a in sup.store.decisions(kind="audit")]


@aiotest
async def test_make_a_profile_then_install_it(sup):
    set_admin(sup)
    async with client(sup) as c:
        token = await login(c)
        post = functools.partial(c.post, allow_redirects=False)
        r = await c.get("/devices/camera1/profile")
        assert r.status == 400 and "nothing learnt yet" in await r.text()
        await post("/devices/camera1/learn", data={"csrf": token})
        sup.dp.answer(CAMERA_IP, [CLOUD], ["198.19.64.9"], 300)
        sup.on_kernel_alerts([("camera1", "egress-report", {**REFUSED, "action": "reported"})])
        r = await c.get("/devices/camera1/profile?type=")
        page = await r.text()
        assert r.status == 200
        shown = html.unescape(re.search(r'<pre id="profile-text">(.*?)</pre>', page, re.S).group(1))
        assert 'type = "camera-camera1"' in shown and f"{CLOUD}:443/tcp" in shown
        # the download is the same profile, as a file
        d = await c.get("/devices/camera1/profile/download?type=camera-camera1")
        assert d.headers["Content-Disposition"] == 'attachment; filename="camera-camera1.toml"'
        assert profiles.profile_from_text(await d.text(), "x.toml").type == "camera-camera1"
        mud = await c.get("/devices/camera1/profile/download?type=camera-camera1&format=mud")
        assert mud.headers["Content-Disposition"].endswith('filename="camera-camera1.mud.json"')
        assert CLOUD in json.dumps(json.loads(await mud.text()))
        # a type name of our own, and a bad one
        r = await c.get("/devices/camera1/profile?type=my-cam")
        assert 'type = "my-cam"' in html.unescape(await r.text())
        r = await c.get("/devices/camera1/profile?type=../etc")
        assert r.status == 400 and "type" in await r.text()
        # Install: what was shown, sent back as a browser sends a textarea (CR LF)
        text, type_ = hidden(page, "/devices/camera1/profile/install", "text"), \
            hidden(page, "/devices/camera1/profile/install", "type")
        assert text == shown and type_ == "camera-camera1"
        r = await post("/devices/camera1/profile/install", data={"csrf": token, "type": "../x",
                                                                 "text": text})
        assert r.status == 400 and installed(sup) == []
        r = await post("/devices/camera1/profile/install", data={"csrf": token, "type": type_,
                                                                 "text": text.replace("\n", "\r\n")})
        assert r.status == 303 and r.headers["Location"] == "/profiles/camera-camera1"
        assert "camera-camera1" in sup.profiles and installed(sup) == ["camera-camera1.toml"]
        file = profiles.installed_dir(sup.cfg.state.directory) / "camera-camera1.toml"
        assert "\r" not in file.read_text()
        page = await (await c.get("/profiles/camera-camera1")).text()
        assert "Profile camera-camera1 installed." in page and "installed" in page
        assert f"{CLOUD} on TCP 443" in page
        # installing it again while a device uses it is refused, with the ops' words
        sup.add_device("cam2", "02:4b:00:00:00:20", "198.18.0.20", "camera-camera1", approve=True)
        r = await post("/devices/camera1/profile/install", data={"csrf": token, "type": type_, "text": text})
        assert r.status == 400 and "used by cam2" in await r.text()


# -- profiles ---------------------------------------------------------------------------------

@aiotest
async def test_the_profiles_page_reads_each_profile_in_plain_words(sup):
    set_admin(sup)
    async with client(sup) as c:
        await login(c)
        page = await (await c.get("/profiles")).text()
        rows = page.split('class="profiles"')[1].split("</table>")[0]
        assert '<a href="/profiles/camera">camera</a>' in rows and "shipped" in rows
        assert "IP camera with a web API" in rows and "camera1" in rows
        assert 'enctype="multipart/form-data"' in page and 'href="/profiles"' in page     # the menu
        cam = await (await c.get("/profiles/camera")).text()
        normal = cam.split('data-posture="normal">')[1].split("</ul>")[0]
        assert ("egress watch (reported, not blocked): flows to anything but the site&#x27;s controller "
                "camera-cloud (any protocol); pool.ntp.org on UDP 123; any name under pool.ntp.org on "
                "UDP 123") in normal
        assert ("password-guessing detector: 10 connection attempts to port 23 from one source within "
                "10 s; the source is dropped for 5 min") in normal
        suspicious = cam.split('data-posture="suspicious">')[1].split("</ul>")[0]
        assert "allow-list: the site&#x27;s controller camera-cloud" in suspicious
        assert "authentication gate: its web port 80" in suspicious
        assert "quarantine: nothing but DHCP, DNS and MQTT to the gateway" in cam
        assert "Remove this profile" not in cam                              # shipped
        r = await c.get("/profiles/camera/export?format=toml")
        assert r.headers["Content-Disposition"] == 'attachment; filename="camera.toml"'
        assert await r.text() == (profiles.PROFILE_DIR / "camera.toml").read_text()
        r = await c.get("/profiles/camera/export?format=mud")
        assert r.status == 400 and "has no mud_url" in await r.text()
        r = await c.get("/profiles/camera/export?format=mud&mud_url=https%3A%2F%2Fexample.com%2Fcam.json")
        # the camera names the site's controller class camera-cloud, which this site does not
        # name: refused, never written as an ACE of any address
        assert r.status == 400 and "the site names no controller class" in await r.text()
        assert (await c.get("/profiles/toaster")).status == 404


def test_destinations_and_umboxes_in_words():
    w = views.destination_words
    assert w("cloud.example.com:443/tcp") == "cloud.example.com on TCP 443"
    assert w("@camera-cloud:443/tcp") == "the site's controller camera-cloud on TCP 443"
    assert w({"controller": "camera-cloud", "proto": "tcp", "port": 443}) == \
        "the site's controller camera-cloud on TCP 443"
    assert w("lan:6667/udp") == "the LAN on UDP 6667"
    assert w({"lan": True, "proto": "udp", "port": 6667}) == "the LAN on UDP 6667"
    assert w("*.tuyaeu.com") == "any name under tuyaeu.com (any protocol)"
    assert w("198.19.8.0/24") == "the addresses 198.19.8.0/24 (any protocol)"
    assert w("198.19.8.1:8886/tcp") == "198.19.8.1 on TCP 8886"
    assert w("198.19.8.1/icmp") == "198.19.8.1 on ICMP"
    assert views.umbox_words("allowlist", {"destinations": [
        "cloud.example.com:443/tcp", "@camera-cloud:443/tcp", "lan:6667/udp"]}) == (
        "allow-list: cloud.example.com on TCP 443; the site's controller camera-cloud on TCP 443; "
        "the LAN on UDP 6667")
    assert views.umbox_words("allowlist", {"destinations": []}) == "allow-list: nothing"
    assert views.umbox_words("egress_anomaly", {"destinations": None, "block": True}) == \
        "egress watch (refused): flows outside the allow-list"
    assert views.umbox_words("allowlist", {"destinations": ["vendor.example.com:443/tcp"],
                                           "registrable_domains": True}) == (
        "allow-list: vendor.example.com on TCP 443 (each name with every name under its registrable domain)")
    assert views.umbox_words("something_new", {"x": 1}) == 'something_new: {"x": 1}'
    flow = {"proto": "tcp", "address": "198.19.64.9", "port": 443, "names": []}
    assert views.allow_as(flow) == "198.19.64.9:443/tcp"
    assert views.allow_as({**flow, "names": [CLOUD, "other.example"]}) == f"{CLOUD}:443/tcp"
    assert views.allow_as({**flow, "proto": "icmp", "port": 0}) == "198.19.64.9/icmp"
    assert [views.seconds_words(s) for s in (45, 90, 900, 7200, 86400, 172800, 3700)] == \
        ["45 s", "1 min 30 s", "15 min", "2 h", "1 day", "2 days", "1 h 1 min"]


@aiotest
async def test_the_real_mud_file_uploads_and_reads_in_words(sup):
    set_admin(sup)
    async with client(sup) as c:
        token = await login(c)
        form = upload(token, LAMP_TEXT.encode(), type="", device_ip="10.42.0.174")
        r = await c.post("/profiles", data=form, allow_redirects=False)
        assert r.status == 303, await r.text()
        assert r.headers["Location"] == f"/profiles/{LAMP_TYPE}"
        assert installed(sup) == [f"{LAMP_TYPE}.toml"]
        page = await (await c.get(r.headers["Location"])).text()
        assert f"Profile {LAMP_TYPE} installed (from MUD)." in page
        assert "the device&#x27;s own address" in page and "LAN broadcast" in page      # the notes
        normal = page.split('data-posture="normal">')[1].split("</ul>")[0]
        assert "allow-list: 18.185.182.159 on TCP 443; 3.124.225.12 on TCP 8886" in normal
        assert "https://mood_lamp-3204432.com/mood_lamp-3204432" in page
        r = await c.get(f"/profiles/{LAMP_TYPE}/export?format=mud")
        assert r.status == 200 and "18.185.182.159" in await r.text()
        # listed as installed; removing it is refused while a device uses it
        rows = (await (await c.get("/profiles")).text()).split('class="profiles"')[1]
        assert (f'<a href="/profiles/{LAMP_TYPE}">{LAMP_TYPE}</a></td>'
                                '<td data-label="source">installed') in rows
        sup.add_device("lamp1", "b8:06:0d:18:84:b4", "198.18.0.40", LAMP_TYPE, approve=True)
        r = await c.post(f"/profiles/{LAMP_TYPE}/remove", data={"csrf": token}, allow_redirects=False)
        assert r.status == 400 and f"profile {LAMP_TYPE} is used by lamp1" in await r.text()
        assert installed(sup) == [f"{LAMP_TYPE}.toml"]
        sup.remove("lamp1")
        r = await c.post(f"/profiles/{LAMP_TYPE}/remove", data={"csrf": token}, allow_redirects=False)
        assert r.status == 303 and installed(sup) == [] and LAMP_TYPE not in sup.profiles
        r = await c.post("/profiles/camera/remove", data={"csrf": token}, allow_redirects=False)
        assert r.status == 400 and "shipped" in await r.text()
        # pasted text, with a type name of our own
        r = await c.post("/profiles", data=upload(token, text=LAMP_TEXT, type="lamp"), allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/profiles/lamp"


@aiotest
async def test_a_malformed_upload_shows_the_error_and_installs_nothing(sup):
    set_admin(sup)
    before = sorted(sup.profiles)
    broken = LAMP_TEXT.replace('"mud-version" : 1,', '"mud-version" : 1', 1)
    unknown_node = LAMP_TEXT.replace('"protocol" : 17,\n              "destination-ipv4-network" : "255',
                                     '"protocl" : 17,\n              "destination-ipv4-network" : "255', 1)
    assert broken != LAMP_TEXT and unknown_node != LAMP_TEXT
    async with client(sup) as c:
        token = await login(c)
        cases = [(upload(token, broken.encode()), (f"{LAMP_FILE.name}: ", "malformed JSON", "line 4")),
                 (upload(token, unknown_node.encode()),
                  (f"{LAMP_FILE.name}: ", "acl[0].aces.ace[3].matches.ipv4.protocl", "unknown YANG node")),
                 (upload(token, b"\xff\xfe{", filename="lamp.json"), ("lamp.json: not UTF-8",)),
                 (upload(token, LAMP_TEXT.encode(), type="../../x"), ("type",)),
                 (upload(token, LAMP_TEXT.encode(), device_ip="somewhere"), ("somewhere",)),
                 (upload(token, text='type = "x"\n[postures.normal]\nnot_an_umbox = {}\n'),
                  ("pasted.toml", "not_an_umbox")),
                 (upload(token), ("choose a file",)),
                 (upload(token, b"", filename=""), ("choose a file",))]
        for form, words in cases:
            r = await c.post("/profiles", data=form, allow_redirects=False)
            text = html.unescape(await r.text())
            assert r.status == 400, (words, r.status)
            for w in words:
                assert w in text, (w, text[-800:])
            assert 'class="error"' in text
        assert sorted(sup.profiles) == before and installed(sup) == []
        assert not [a for a in sup.store.decisions(kind="audit") if a["event"] == "profile-import"]


def test_multipart_forms_are_read_exactly_and_broken_ones_refused():
    body = (b"--XX\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\ntok\r\n"
            b"--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"C:\\\\d\\\\a b.json\"\r\n"
            b"Content-Type: application/json\r\n\r\n{\"a\": 1}\r\n\r\n--XX--\r\n")
    fields, files = parse_multipart("multipart/form-data; boundary=XX", body)
    assert fields.get("csrf") == "tok" and files == {"file": ("a_b.json", b'{"a": 1}\r\n')}
    import pytest

    from appliance.errors import ConfigError
    for bad in (b"no boundary here", b"--XX\r\nContent-Type: text/plain\r\n\r\nx\r\n--XX--\r\n",
                b"--XX\r\nContent-Disposition: form-data; name=\"t\"\r\n\r\n\xff\r\n--XX--\r\n"):
        with pytest.raises(ConfigError, match="multipart"):
            parse_multipart("multipart/form-data; boundary=XX", bad)


# -- who may change things --------------------------------------------------------------------

CHANGES = [("POST", "/devices/camera1/learn"), ("POST", "/devices/camera1/allow"),
           ("POST", "/devices/camera1/disallow"), ("POST", "/devices/camera1/profile/install"),
           ("POST", "/profiles"), ("POST", "/profiles/camera/remove"),
           ("POST", "/api/devices/camera1/learn"), ("POST", "/api/devices/camera1/allow"),
           ("POST", "/api/devices/camera1/disallow"), ("POST", "/api/profiles"),
           ("DELETE", "/api/profiles/camera")]
READS = ["/profiles", "/profiles/camera", "/profiles/camera/export", "/devices/camera1/profile",
         "/devices/camera1/profile/download"]
API_READS = ["/api/profiles", "/api/profiles/camera", "/api/profiles/camera/export",
             "/api/devices/camera1/profile"]


def untouched(sup):
    return (sup.posture("camera1"), sup.device("camera1").get("allow"), sorted(sup.profiles))


@aiotest
async def test_changes_need_a_login_the_csrf_token_and_the_page_s_origin(sup):
    set_admin(sup)
    seed(sup)
    before = untouched(sup)
    form = {"destination": f"{CLOUD}:443/tcp", "for": "1h", "text": LAMP_TEXT, "type": "lamp"}
    async with client(sup) as c:
        for path in READS:
            r = await c.get(path, allow_redirects=False)
            assert r.status == 303 and r.headers["Location"] == "/login", path
        for path in API_READS:
            assert (await c.get(path)).status == 401, path
        for method, path in CHANGES:
            assert (await c.request(method, path, data=form)).status == 401, (method, path)
        token = await login(c)
        for method, path in CHANGES:
            r = await c.request(method, path, data=form)
            assert r.status == 403, (method, path)
            r = await c.request(method, path, data={**form, "csrf": "forged"})
            assert r.status == 403, (method, path)
            r = await c.request(method, path, json={"destination": form["destination"]})
            assert r.status == 403, (method, path)
            r = await c.request(method, path, data=upload(None, LAMP_TEXT.encode(), **form))
            assert r.status == 403, (method, path)
            for origin in ({"Origin": "https://evil.example"}, {"Referer": "http://evil.example/x"}):
                r = await c.request(method, path, data={**form, "csrf": token}, headers=origin)
                assert r.status == 403 and "cross-origin" in (await r.json())["error"], (method, path)
            r = await c.request(method, path, data=upload(token, LAMP_TEXT.encode(), **form),
                                headers={"Origin": "https://evil.example"})
            assert r.status == 403, (method, path)
        assert untouched(sup) == before and installed(sup) == []
        # the page's own origin, with the token in a multipart form, goes through
        own = (await c.get("/healthz")).url
        r = await c.post("/profiles", data=upload(token, LAMP_TEXT.encode()), allow_redirects=False,
                         headers={"Origin": f"{own.scheme}://{own.host}:{own.port}"})
        assert r.status == 303 and installed(sup) == [f"{LAMP_TYPE}.toml"]


# -- the API ----------------------------------------------------------------------------------

@aiotest
async def test_the_api_with_a_token(sup):
    set_admin(sup)
    seed(sup)
    token = accounts.create_token(sup.store, "script", sup.now())[0]
    h = {"Authorization": f"Bearer {token}"}
    async with client(sup) as c:
        show = await (await c.get("/api/devices/camera1", headers=h)).json()
        assert show["names"]["bound"][0]["address"] == "198.19.1.5"
        assert show["names"]["refused"] == {CLOUD: 1}
        refused, = show["flows"]["refused"]
        assert refused["says"] == f"asked for {CLOUD}:443 (tcp) 3 times, refused"
        assert refused["allow_as"] == f"{CLOUD}:443/tcp"
        before = json.dumps(sup.store._storage.read(), sort_keys=True)
        bad = [("POST", "/api/devices/camera1/allow", {"destination": 5}, 400, "destination"),
               ("POST", "/api/devices/camera1/allow", {}, 400, "destination"),
               ("POST", "/api/devices/camera1/allow", {"destination": "x:1/tcp", "why": 1}, 400, "why"),
               ("POST", "/api/devices/camera1/allow", {"destination": "not one!"}, 400, "device camera1"),
               ("POST", "/api/devices/nope/allow", {"destination": "x.example:1/tcp"}, 404, "nope"),
               ("POST", "/api/devices/camera1/learn", {"for": "soon"}, 400, "soon"),
               ("POST", "/api/devices/camera1/learn", {"for": True}, 400, "for"),
               ("POST", "/api/devices/camera1/learn", {"for": "1h", "type": 5}, 400, "type"),
               ("POST", "/api/devices/camera1/learn", {"until": "1h"}, 400, "until"),
               ("GET", "/api/devices/camera1/profile", None, 400, "nothing learnt yet"),
               ("POST", "/api/profiles", {"text": LAMP_TEXT.replace('"mud-version" : 1,', "", 1),
                                          "filename": "lamp.json"}, 400, "lamp.json: "),
               ("POST", "/api/profiles", {"text": ""}, 400, "text"),
               ("POST", "/api/profiles", {"text": LAMP_TEXT, "colour": "red"}, 400, "colour"),
               ("POST", "/api/profiles", {"text": LAMP_TEXT, "device_ip": 5}, 400, "device_ip"),
               ("GET", "/api/profiles/toaster", None, 404, "toaster"),
               ("GET", "/api/profiles/camera/export?format=pdf", None, 400, "pdf"),
               ("GET", "/api/profiles/camera/export?format=mud", None, 400, "mud_url"),
               ("DELETE", "/api/profiles/camera", None, 400, "shipped"),
               ("DELETE", "/api/profiles/toaster", None, 404, "toaster")]
        for method, path, body, status, word in bad:
            r = await c.request(method, path, json=body, headers=h)
            answer = await r.json()
            assert r.status == status and word in answer["error"], (method, path, body, answer)
        assert json.dumps(sup.store._storage.read(), sort_keys=True) == before and installed(sup) == []
        # allow, disallow
        r = await c.post("/api/devices/camera1/allow", json={"destination": refused["allow_as"]}, headers=h)
        assert r.status == 200 and (await r.json())["allow"] == [refused["allow_as"]]
        assert refused["allow_as"] in destinations(sup)
        r = await c.post("/api/devices/camera1/disallow", json={"destination": refused["allow_as"]},
                         headers=h)
        assert (await r.json())["allow"] == [] and refused["allow_as"] not in destinations(sup)
        # learning, and the profile made of it
        r = await c.post("/api/devices/camera1/learn", json={"for": "2h"}, headers=h)
        assert (await r.json())["for_seconds"] == 7200 and sup.posture("camera1") == "learning"
        sup.on_kernel_alerts([("camera1", "egress-report", {**REFUSED, "action": "reported"})])
        made = await (await c.get("/api/devices/camera1/profile?type=cam-learnt", headers=h)).json()
        assert made["type"] == "cam-learnt" and f"{CLOUD}:443/tcp" in made["destinations"]
        mud = await (await c.get("/api/devices/camera1/profile?format=mud", headers=h)).json()
        assert mud["format"] == "mud" and "ietf-mud:mud" in mud["text"]
        # profiles: import, list, read in words, export, remove
        r = await c.post("/api/profiles", json={"text": made["text"], "filename": "cam-learnt.toml"},
                         headers=h)
        assert r.status == 201 and (await r.json())["type"] == "cam-learnt"
        r = await c.post("/api/profiles", json={"text": LAMP_TEXT, "filename": LAMP_FILE.name,
                                                "device_ip": "10.42.0.174"}, headers=h)
        got = await r.json()
        assert r.status == 201 and got["type"] == LAMP_TYPE and got["format"] == "mud"
        assert any("own address" in n for n in got["notes"])
        listed = {p["type"]: p for p in await (await c.get("/api/profiles", headers=h)).json()}
        assert listed[LAMP_TYPE]["source"] == "installed" and listed["camera"]["source"] == "shipped"
        lamp = await (await c.get(f"/api/profiles/{LAMP_TYPE}", headers=h)).json()
        assert "allow-list: 18.185.182.159 on TCP 443; 3.124.225.12 on TCP 8886" in lamp["in_words"]["normal"]
        assert list(lamp["in_words"])[0] == "normal"
        exported = await (await c.get(f"/api/profiles/{LAMP_TYPE}/export?format=mud", headers=h)).json()
        assert exported["format"] == "mud" and "18.185.182.159" in exported["text"]
        exported = await (await c.get("/api/profiles/camera/export", headers=h)).json()
        assert exported["text"] == (profiles.PROFILE_DIR / "camera.toml").read_text()
        r = await c.delete(f"/api/profiles/{LAMP_TYPE}", headers=h)
        assert (await r.json()) == {"removed": LAMP_TYPE} and LAMP_TYPE not in sup.profiles
        spec = await (await c.get("/api/openapi.json", headers=h)).json()
        for path in ("/api/devices/{name}/learn", "/api/devices/{name}/allow", "/api/devices/{name}/disallow",
                     "/api/devices/{name}/profile", "/api/profiles", "/api/profiles/{type}",
                     "/api/profiles/{type}/export"):
            assert path in spec["paths"], path
    actors = {(a["event"], a["actor"]) for a in sup.store.decisions(kind="audit")}
    assert {("device-allow", "web:token:script"), ("learn", "web:token:script"),
            ("profile-import", "web:token:script"), ("profile-remove", "web:token:script")} <= actors
