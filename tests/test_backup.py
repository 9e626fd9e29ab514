"""Backup and restore (appliance.supervisor.backup): one JSON file with the settings, the
installed profiles, the site rules and the device list, taken back by another appliance through
the ops, the `kalki` command (over a real control socket) and the web page. Everything is checked
before anything changes; a refused file names its culprit and leaves the appliance as it was; a
stricter posture held here is kept. On real Supervisors and stores with the fake data path."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import os
import stat
import threading

import aiohttp
import pytest
import test_web
from fakes import supervisor
from test_web import aiotest, client, login, set_admin

from appliance import cli
from appliance.errors import ConfigError, KalkiError
from appliance.policy import profiles
from appliance.supervisor import accounts, backup, control
from appliance.supervisor.ops import Ops
from appliance.vocab import POSTURE_CODES

sup = test_web.sup      # the page's supervisor: camera1, plug1, a new device waiting

CAMERA = ("02:4b:00:00:00:01", "198.18.0.10", "camera")
PLUG = ("02:4b:00:00:00:02", "198.18.0.11", "plug")
LAMP_MAC, LAMP_IP = "02:4b:00:00:00:40", "198.18.0.40"
TV_MAC = "02:4b:00:00:00:50"
LAMP = """# a mood lamp, installed at run time
type = "lamp"
description = "a mood lamp"

[postures.normal]
anti_spoof = {}
allowlist = { destinations = ["lamp.example.com:443/tcp"] }

[[rules]]
name = "lamp-alerts"
when = { alert = { device = "self", count = 3, within = "1m" } }
then = [ { set_posture = { posture = "suspicious", for = "10m" } } ]
"""
RULE = {"name": "plug-watch", "description": "two alerts on a plug: attack for 15 minutes",
        "applies_to": ["plug"], "when": {"alert": {"device": "self", "count": 2, "within": "5m"}},
        "then": [{"set_posture": {"posture": "attack", "for": "15m"}}]}


def source(tmp_path) -> Ops:
    """An appliance with something of everything: an installed profile and a device of it in a
    group, a device's own destination, a quarantined device, a site rule, a time zone, a device
    waiting for approval."""
    ops = Ops(supervisor(tmp_path / "source", camera1=CAMERA, plug1=PLUG))
    ops.profile_import(LAMP, "lamp.toml")
    ops.device_add("lamp1", LAMP_MAC, LAMP_IP, type="lamp", approve=True, group="hall")
    ops.device_allow("camera1", "cloud.example.com:443/tcp")
    ops.posture_set("plug1", "quarantine")
    ops.put_rules([RULE], "rules", "operator")
    ops.update_settings({"timezone": "Europe/Berlin"}, "operator")
    ops._sup.discovered(TV_MAC, "198.18.0.50", {"hostname": "tv"})
    return ops


def fresh(tmp_path, name="target", **devices) -> Ops:
    return Ops(supervisor(tmp_path / name, **devices))


def document(text: str) -> dict:
    return json.loads(text)


def signed(doc: dict) -> str:
    """The document with its checksum made again: a change the checksum cannot catch."""
    return json.dumps({**doc, "sha256": backup.checksum(doc["content"])})


def records(ops: Ops) -> dict:
    keys = ("mac", "ip", "type", "group", "approved", "posture", "allow")
    return {d["name"]: {**{k: d.get(k) for k in keys},
                        "identity": {k: v for k, v in d["identity"].items() if v}}
            for d in ops.devices()}


def installed_files(ops: Ops) -> dict:
    directory = profiles.installed_dir(ops.cfg.state.directory)
    return {p.name: p.read_text() for p in sorted(directory.iterdir())} if directory.exists() else {}


def snapshot(ops: Ops):
    """All a restore could change: the store's file, the profiles' files and the supervisor's
    view, the rules in force and what the data path holds."""
    sup = ops._sup
    held = {n: (s.posture, json.dumps(s.stack, sort_keys=True, default=str))
            for n, s in sup.dp.devices.items()}
    return (json.dumps(sup.store._storage.read(), sort_keys=True), installed_files(ops),
            sorted(sup.profiles), copy.deepcopy(sup.known), sorted(r.name for r in sup.rules()), held)


# -- the round trip ---------------------------------------------------------------------------

def test_a_backup_restored_on_a_fresh_appliance_gives_the_same_devices_profiles_and_rules(tmp_path):
    src = source(tmp_path)
    made = src.backup()
    assert made["filename"].startswith("kalki-backup-") and made["filename"].endswith(".json")
    assert (made["devices"], made["profiles"], made["rules"], made["secrets"]) == (4, 1, 1, False)
    doc = document(made["text"])
    assert doc["format"] == "kalki-backup" and doc["version"] == 1
    assert doc["sha256"] == backup.checksum(doc["content"]) and "secrets" not in doc["content"]

    dst = fresh(tmp_path)
    result = dst.restore(made["text"])
    assert result["dry_run"] is False
    assert sorted(result["devices"]["added"]) == ["camera1", "lamp1", "plug1", "tv"]
    assert result["profiles"]["installed"] == ["lamp"] and result["rules"]["added"] == ["plug-watch"]
    assert result["enforced"] == ["camera1", "lamp1", "plug1"] and result["kept"] == []
    assert any("no admin password or API tokens" in n for n in result["notes"])

    assert records(dst) == records(src)
    assert records(dst)["plug1"]["posture"] == "quarantine"
    assert records(dst)["lamp1"]["group"] == "hall"
    assert records(dst)["camera1"]["allow"] == ["cloud.example.com:443/tcp"]
    assert records(dst)["tv"]["approved"] is False and records(dst)["tv"]["identity"] == {"hostname": "tv"}
    assert installed_files(dst) == installed_files(src) == {"lamp.toml": LAMP}
    assert dst.profile_show("lamp")["source"] == "installed"
    assert [r for r in dst._sup.store.rules()] == [r for r in src._sup.store.rules()]
    assert "lamp-alerts" in {r.name for r in dst._sup.rules()}
    assert dst.settings()["timezone"] == "Europe/Berlin"
    # the kernel (here the fake) holds what the store says, as after an approval
    held = dst._sup.dp.devices
    assert sorted(held) == ["camera1", "lamp1", "plug1"]
    assert held["plug1"].posture == POSTURE_CODES["quarantine"]
    assert held["camera1"].stack == src._sup.dp.devices["camera1"].stack
    assert "cloud.example.com:443/tcp" in held["camera1"].stack["egress_anomaly"]["destinations"]
    # and its own backup says the same
    assert document(dst.backup()["text"])["content"] == doc["content"]
    assert {a["event"] for a in dst.audit_log()} >= {"restore", "backup"}


def test_a_dry_run_says_what_it_would_do_and_changes_nothing(tmp_path):
    text = source(tmp_path).backup()["text"]
    dst = fresh(tmp_path, camera1=CAMERA)
    before = snapshot(dst)
    result = dst.restore(text, dry_run=True)
    assert result["dry_run"] is True
    assert sorted(result["devices"]["added"]) == ["lamp1", "plug1", "tv"]
    assert result["devices"]["updated"] == ["camera1"]
    assert result["profiles"]["installed"] == ["lamp"]
    assert snapshot(dst) == before
    assert [a for a in dst.audit_log() if a["event"] == "restore"] == []


# -- refused, with the culprit named, and nothing changed ------------------------------------

def _device_index(doc: dict, name: str) -> int:
    return next(i for i, d in enumerate(doc["content"]["devices"]) if d["name"] == name)


def cut_short(text):
    return text[:len(text) // 2]


def newer(text):
    return signed({**document(text), "version": 2})


def edited(text):           # a change by hand, the checksum left as it was
    doc = document(text)
    doc["content"]["devices"][0]["posture"] = "attack"
    return json.dumps(doc)


def bad_profile(text):
    doc = document(text)
    doc["content"]["profiles"][0]["text"] = LAMP.replace("anti_spoof = {}", "anti_spoof = { bogus = 1 }")
    return signed(doc)


def bad_rule(text):
    doc = document(text)
    doc["content"]["rules"][0]["then"] = [{"set_posture": {"posture": "nap"}}]
    return signed(doc)


def unknown_type(text):
    doc = document(text)
    doc["content"]["profiles"] = []      # lamp1 is of a type nobody defines
    return signed(doc)


def bad_mac(text):
    doc = document(text)
    doc["content"]["devices"][0]["mac"] = "02:4b:zz:00:00:01"
    return signed(doc)


def bad_destination(text):
    doc = document(text)
    doc["content"]["devices"][_device_index(doc, "camera1")]["allow"] = ["not a destination!"]
    return signed(doc)


def bad_setting(text):
    doc = document(text)
    doc["content"]["settings"]["timezone"] = "Mars/Olympus"
    return signed(doc)


def clashing_rule(text):
    doc = document(text)
    doc["content"]["rules"][0]["name"] = "lamp-alerts"       # the lamp profile's rule
    return signed(doc)


def not_a_backup(text):
    return json.dumps({"format": "something-else", "version": 1})


@pytest.mark.parametrize("change, culprit", [
    (cut_short, "backup: not a Kalki backup, or cut short: not JSON"),
    (newer, "backup: version 2: this appliance reads version 1 (the file is from a newer Kalki"),
    (edited, "backup: the checksum (sha256) does not match the content"),
    (not_a_backup, "backup: not a Kalki backup (format 'something-else'"),
    (bad_profile, "backup profiles[0] (lamp.toml): postures.normal: umbox anti_spoof"),
    (bad_rule, "backup rules[0].then[0].set_posture"),
    (unknown_type, "backup devices[1].type: unknown type 'lamp'"),
    (bad_mac, "backup devices[0].mac: invalid MAC address"),
    (bad_destination, "backup devices[0].allow[0]: umbox allow, destination 'not a destination!'"),
    (bad_setting, "backup settings.timezone:"),
    (clashing_rule, "backup rules[0]: a profile:lamp rule is named 'lamp-alerts'"),
], ids=lambda v: getattr(v, "__name__", None))
def test_a_bad_backup_is_refused_with_its_culprit_named_and_nothing_changed(tmp_path, change, culprit):
    text = source(tmp_path).backup()["text"]
    assert _device_index(document(text), "lamp1") == 1 and _device_index(document(text), "camera1") == 0
    dst = fresh(tmp_path, camera1=CAMERA)
    dst.posture_set("camera1", "suspicious")
    before = snapshot(dst)
    for dry_run in (True, False):
        with pytest.raises(ConfigError) as e:
            dst.restore(change(text), dry_run=dry_run)
        assert culprit in str(e.value), str(e.value)
        assert snapshot(dst) == before


def test_a_name_taken_here_by_another_device_is_refused(tmp_path):
    text = source(tmp_path).backup()["text"]
    dst = fresh(tmp_path, plug1=("02:4b:00:00:00:99", "198.18.0.99", "plug"))
    before = snapshot(dst)
    with pytest.raises(ConfigError, match=r"backup devices\[2\]: the name plug1 is taken here by the "
                                          r"device with MAC 02:4b:00:00:00:99"):
        dst.restore(text)
    assert snapshot(dst) == before


def test_a_step_that_fails_undoes_the_steps_before_it(tmp_path, monkeypatch):
    text = source(tmp_path).backup()["text"]
    dst = fresh(tmp_path, camera1=CAMERA)
    before = snapshot(dst)

    def refused(*args, **kwargs):
        raise KalkiError("device lamp1: the kernel does not show posture normal after applying it")
    monkeypatch.setattr(dst._sup, "set_postures", refused)
    with pytest.raises(KalkiError, match="the kernel does not show"):
        dst.restore(text)
    assert snapshot(dst) == before and installed_files(dst) == {}
    assert "lamp" not in dst.profile_types()


# -- protection never weakens -----------------------------------------------------------------

def test_a_stricter_posture_here_is_kept_and_said(tmp_path):
    src = source(tmp_path)
    src.posture_reset("plug1")                       # the backup says normal
    text = src.backup()["text"]
    dst = fresh(tmp_path, plug1=PLUG, camera1=CAMERA)
    dst.posture_set("plug1", "quarantine", for_="2h")
    expires = dst._sup.device("plug1")["posture_expires"]
    result = dst.restore(text)
    assert result["kept"] == [{"device": "plug1", "posture": "quarantine", "backup": "normal"}]
    assert any(n.startswith("plug1: kept quarantine here, stricter than the backup's normal")
               for n in result["notes"])
    plug = dst._sup.device("plug1")
    assert plug["posture"] == "quarantine"
    later = (datetime.datetime.fromisoformat(plug["posture_expires"])
             - datetime.datetime.fromisoformat(expires)).total_seconds()
    assert 0 <= later < 1              # its time is kept (to the second, rounded up)
    assert dst._sup.dp.devices["plug1"].posture == POSTURE_CODES["quarantine"]
    assert dst._sup.device("camera1")["posture"] == "normal"


def test_a_device_seen_here_under_another_name_takes_its_name_and_keeps_its_address(tmp_path):
    text = source(tmp_path).backup()["text"]
    dst = fresh(tmp_path)
    dst._sup.discovered(CAMERA[0], "198.18.0.77", {"hostname": "ipcam"})
    assert "ipcam" in dst._sup.known
    result = dst.restore(text)
    assert result["devices"]["renamed"] == [{"from": "ipcam", "to": "camera1"}]
    assert "ipcam" not in dst._sup.known
    camera = dst._sup.device("camera1")
    assert camera["approved"] and camera["ip"] == "198.18.0.77"        # what was seen here is newer
    assert camera["identity"]["hostname"] == "ipcam"
    assert dst._sup.dp.devices["camera1"].ip == "198.18.0.77"


def test_a_replaced_profile_is_enforced_on_every_device_of_its_type(tmp_path):
    text = source(tmp_path).backup()["text"]
    dst = fresh(tmp_path)
    old = LAMP.replace("lamp.example.com", "old.example.com") + "\n[postures.attack]\nquarantine = {}\n"
    dst.profile_import(old, "lamp.toml")
    dst.device_add("lamp9", "02:4b:00:00:00:49", "198.18.0.49", type="lamp", approve=True)
    assert dst._sup.dp.devices["lamp9"].stack["allowlist"]["destinations"] == ["old.example.com:443/tcp"]
    dst.posture_set("lamp9", "attack")
    # the backup's lamp has no posture attack, which lamp9 holds here: refused, before anything
    before = snapshot(dst)
    with pytest.raises(ConfigError, match=r"^backup profiles\[0\]: device lamp9 here is in posture "
                                          "attack, which the backup's lamp profile does not have"):
        dst.restore(text)
    assert snapshot(dst) == before
    dst.posture_set("lamp9", "quarantine")
    result = dst.restore(text)
    assert result["profiles"]["replaced"] == ["lamp"] and installed_files(dst) == {"lamp.toml": LAMP}
    assert "lamp9" in result["enforced"]                 # not in the backup, but of the type
    held = dst._sup.dp.devices["lamp9"]
    assert held.stack == dst._sup.profiles["lamp"].stack("quarantine")
    assert held.posture == POSTURE_CODES["quarantine"] and dst._sup.device("lamp9")["posture"] == "quarantine"
    dst.posture_reset("lamp9")
    assert dst._sup.dp.devices["lamp9"].stack["allowlist"]["destinations"] == ["lamp.example.com:443/tcp"]



def test_a_profile_restored_without_its_adapter_ends_its_devices_polls(tmp_path):
    """The backup's lamp profile has no [adapter]; here the lamp's is polled by one, with a poll
    action in force: restoring ends the poll (a later ask is refused, not found in force)."""
    from appliance.telemetry.adapters import HueAdapter
    text = source(tmp_path).backup()["text"]
    dst = fresh(tmp_path)
    dst.profile_import(LAMP + '\n[adapter]\nkind = "hue"\npoll_seconds = 1\n', "lamp.toml")
    dst.device_add("lamp9", "02:4b:00:00:00:49", "198.18.0.49", type="lamp", approve=True)
    sup = dst._sup
    sup.adapter = HueAdapter({"lamp9": {"user": "kalki"}}, devices=lambda: sup.known,
                             profile=sup.profiles.get, on_report=sup.on_telemetry,
                             on_availability=sup.on_availability, loop=None)
    sup._set_polls("poll-lamps", ("lamp9",), 5, 600)
    assert "lamp9" in sup.polls and sup.adapter.interval("lamp9") == 5.0
    dst.restore(text)
    assert sup.polls == {} and sup.store.get_setting("polls") == {}
    step, = sup._set_polls("poll-lamps", ("lamp9",), 5, 600)
    assert "no polling adapter" in step["error"]

# -- secrets ----------------------------------------------------------------------------------

def test_the_password_hash_and_tokens_only_with_secrets(tmp_path):
    src = source(tmp_path)
    store = src._sup.store
    store.set_setting("admin", {"user": "admin", "scrypt": accounts.hash_password("correct horse battery")})
    token, _ = src.create_token("script", "operator")
    plain = src.backup()["text"]
    assert "scrypt" not in plain and "api_tokens" not in plain and token not in plain
    made = src.backup(with_secrets=True)
    assert made["secrets"] is True
    assert document(made["text"])["content"]["secrets"]["admin"]["user"] == "admin"
    assert token not in made["text"]                 # tokens are kept hashed, in the backup too

    dst = fresh(tmp_path)
    assert dst.admin_user() is None
    dst.restore(plain)
    assert dst.admin_user() is None and dst.tokens() == []
    result = dst.restore(made["text"])
    assert result["secrets"] == ["admin", "api_tokens"]
    assert any("replace this appliance's" in n for n in result["notes"])
    assert dst.check_admin_password("admin", "correct horse battery")
    assert dst.token_owner(token)["name"] == "script"


# -- the command, over the control socket -----------------------------------------------------

@contextlib.contextmanager
def served(ops: Ops, path: str):
    """The ops behind a real control socket, served by a loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(asyncio.start_unix_server(
        lambda r, w: control.serve_client(ops, r, w), path=path), loop).result(10)
    try:
        yield path
    finally:
        async def shut() -> None:
            server.close()
            await server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shut(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def kalki(capsys, sock: str, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--socket", sock, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_kalki_backup_and_restore(tmp_path, capsys):
    src, dst = source(tmp_path), fresh(tmp_path)
    file = tmp_path / "kalki.json"
    with served(src, str(tmp_path / "src.sock")) as sock:
        code, out, err = kalki(capsys, sock, "backup", "-o", str(file))
        assert code == 0 and out == "", err
        assert "4 device(s), 1 installed profile(s), 1 site rule(s); without the admin password" in err
        assert stat.S_IMODE(os.stat(file).st_mode) == 0o600
        code, out, _ = kalki(capsys, sock, "backup")
        assert code == 0 and document(out)["content"] == document(file.read_text())["content"]
    with served(dst, str(tmp_path / "dst.sock")) as sock:
        before = snapshot(dst)
        code, out, err = kalki(capsys, sock, "restore", str(file), "--dry-run")
        assert code == 0 and out.endswith("dry run: nothing was changed\n"), err
        assert f"{file}: would restore 2 setting(s), 1 profile(s) (0 unchanged), 1 rule(s), 4 device(s) " \
               "(4 new, 0 renamed)" in out
        assert snapshot(dst) == before
        broken = tmp_path / "broken.json"
        broken.write_text(cut_short(file.read_text()))
        code, out, err = kalki(capsys, sock, "restore", str(broken))
        assert code == 2 and out == "" and "Traceback" not in err
        assert err.startswith(f"kalki: {broken}: backup: not a Kalki backup, or cut short")
        assert err.rstrip().endswith("nothing was changed") and snapshot(dst) == before
        code, out, err = kalki(capsys, sock, "restore", str(file))
        assert code == 0 and "enforced: camera1, lamp1, plug1" in out, err
        assert "note: the backup holds no admin password or API tokens" in out
    assert records(dst) == records(src)


# -- the web page -----------------------------------------------------------------------------

def upload(csrf, data: bytes, **fields):
    form = aiohttp.FormData()
    if csrf is not None:
        form.add_field("csrf", csrf)
    form.add_field("file", data, filename="kalki-backup.json", content_type="application/json")
    for k, v in fields.items():
        form.add_field(k, v)
    return form


def page_state(sup):
    return (json.dumps(sup.store._storage.read(), sort_keys=True), sorted(sup.profiles),
            {n: s.posture for n, s in sup.dp.devices.items()})


@aiotest
async def test_the_settings_page_downloads_and_restores_with_csrf(sup, tmp_path):
    set_admin(sup)
    text = source(tmp_path).backup()["text"].encode()
    async with client(sup) as c:
        token = await login(c)
        page = await (await c.get("/settings")).text()
        assert 'href="/settings/backup"' in page and 'action="/settings/restore"' in page
        form = page.split('action="/settings/restore"')[1].split("</form>")[0]
        assert 'enctype="multipart/form-data"' in page and f'name="csrf" value="{token}"' in form
        # the download
        r = await c.get("/settings/backup")
        assert r.status == 200
        assert r.headers["Content-Disposition"].startswith('attachment; filename="kalki-backup-')
        mine = document(await r.text())
        assert mine["format"] == "kalki-backup" and "scrypt" not in await r.text()
        assert {d["name"] for d in mine["content"]["devices"]} == set(sup.known)
        r = await c.get("/settings/backup?secrets=1")
        assert document(await r.text())["content"]["secrets"]["admin"]["user"] == "admin"
        # an upload without the CSRF token, or with a forged one, changes nothing
        before = page_state(sup)
        for csrf in (None, "forged"):
            r = await c.post("/settings/restore", data=upload(csrf, text), allow_redirects=False)
            assert r.status == 403
        assert page_state(sup) == before
        # a file cut short: refused by name, on the page, nothing changed
        r = await c.post("/settings/restore", data=upload(token, text[:len(text) // 2]))
        body = await r.text()
        assert r.status == 400 and "not a Kalki backup, or cut short" in body
        assert "nothing was changed" in body and page_state(sup) == before
        # a dry run
        r = await c.post("/settings/restore", data=upload(token, text, dry_run="1"))
        body = await r.text()
        assert r.status == 200
        assert "Would restore 2 setting(s), 1 profile(s), 1 rule(s) and 4 device(s)" in body
        assert "Dry run: nothing was changed." in body and page_state(sup) == before
        # and the restore: camera1 and plug1 are the same devices (their MACs), the rest is new
        r = await c.post("/settings/restore", data=upload(token, text), allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/settings"
        body = await (await c.get("/settings")).text()
        assert "Restored 2 setting(s), 1 profile(s), 1 rule(s) and 4 device(s)" in body
    assert sup.device("plug1")["posture"] == "quarantine" and "lamp" in sup.profiles
    assert sup.dp.devices["lamp1"].posture == POSTURE_CODES["normal"]


@aiotest
async def test_the_api_backs_up_and_restores_with_a_token(sup, tmp_path):
    set_admin(sup)
    token = accounts.create_token(sup.store, "script", sup.now())[0]
    h = {"Authorization": f"Bearer {token}"}
    doc = document(source(tmp_path).backup()["text"])
    async with client(sup) as c:
        assert (await c.get("/api/backup")).status == 401
        assert (await c.post("/api/restore", json={"backup": doc})).status == 401
        mine = await (await c.get("/api/backup", headers=h)).json()
        assert mine["format"] == "kalki-backup" and "secrets" not in mine["content"]
        before = page_state(sup)
        r = await c.post("/api/restore", json={"backup": doc, "dry_run": True}, headers=h)
        assert r.status == 200 and (await r.json())["dry_run"] is True and page_state(sup) == before
        r = await c.post("/api/restore", json={"backup": {**doc, "version": 7}}, headers=h)
        assert r.status == 400 and "version 7" in (await r.json())["error"]
        r = await c.post("/api/restore", json={"backup": doc, "dry_run": "yes"}, headers=h)
        assert r.status == 400 and "dry_run" in (await r.json())["error"] and page_state(sup) == before
        r = await c.post("/api/restore", json={"text": json.dumps(doc)}, headers=h)
        assert r.status == 200 and sorted((await r.json())["enforced"]) == ["camera1", "lamp1", "plug1"]
        spec = await (await c.get("/api/openapi.json", headers=h)).json()
        assert "/api/backup" in spec["paths"] and "/api/restore" in spec["paths"]
    audit = {(a["event"], a["actor"]) for a in sup.store.decisions(kind="audit")}
    assert ("restore", "web:token:script") in audit and ("backup", "web:token:script") in audit


def test_a_timed_posture_is_saved_as_the_one_it_returns_to(tmp_path):
    ops = Ops(supervisor(tmp_path, plug1=PLUG))
    ops.posture_set("plug1", "quarantine")
    ops.posture_set("plug1", "attack", for_="10m")
    saved, = document(ops.backup()["text"])["content"]["devices"]
    assert saved["posture"] == "quarantine"
    ops.posture_set("plug1", "suspicious", for_="1h")
    ops.posture_reset("plug1")
    ops.posture_set("plug1", "attack", for_="5m")
    saved, = document(ops.backup()["text"])["content"]["devices"]
    assert saved["posture"] == "normal"
    assert isinstance(datetime.datetime.fromisoformat(document(ops.backup()["text"])["created"]),
                      datetime.datetime)
