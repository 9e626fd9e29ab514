"""The default-login check (issue 15, item 6), lab-free: a profile's [[default_logins]] checked on
load; the checker's telnet, HTTP Basic and form tries against the lab's own device services and
a busybox-style telnetd, all on 127.0.0.1; and the supervisor's side: only approved devices,
one check at a time, one default-credentials alert, results recorded without passwords."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from pathlib import Path

import pytest
from fakes import supervisor

from appliance import cli
from appliance.errors import ConfigError, UnknownDeviceError
from appliance.policy import profiles
from appliance.supervisor import control, logins
from appliance.supervisor.ops import Ops
from lab.device_services import Device
from lab.device_services import serve as serve_device

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
CAM_MAC, CAM_IP = "02:4b:00:00:01:01", "198.18.0.10"
FACTORY = "12345"          # a password that is one of the camera type's defaults
NOT_A_DEFAULT = "lab-device-pw"


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(logins, "PAUSE_SECONDS", 0.01)


def entry(service, port, user, password, **more) -> dict:
    return profiles.check_default_logins([{"service": service, "port": port, "user": user,
                                           "password": password, **more}], "test")[0]


@contextlib.asynccontextmanager
async def lab_device(password: str, type_: str = "camera"):
    """The lab's device services (lab.device_services), user admin, on 127.0.0.1."""
    device = Device("cam1", type_, "admin", password)
    servers = await serve_device(device, "127.0.0.1", 0, 0)
    ports = {name: s.sockets[0].getsockname()[1] for name, s in servers.items()}
    try:
        yield device, ports
    finally:
        for s in servers.values():
            s.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the profile's [[default_logins]] ------------------------------------------------------
BASE = 'type = "cam"\n[postures.normal]\nanti_spoof = {}\n'


def profile(logins_toml: str) -> profiles.Profile:
    return profiles.profile_from_text(BASE + logins_toml, "umboxes/cam.toml")


def test_a_profile_lists_default_logins_and_http_paths_default():
    p = profile('[[default_logins]]\nservice = "telnet"\nport = 23\nuser = "root"\npassword = ""\n'
                '[[default_logins]]\nservice = "http_basic"\nport = 80\nuser = "admin"\npassword = "admin"\n'
                '[[default_logins]]\nservice = "http_form"\nport = 8080\nuser = "admin"\npassword = "x"\n'
                '[[default_logins]]\nservice = "http_basic"\nport = 81\nuser = "a"\npassword = "b"\n'
                'path = "/cgi-bin/status"\n')
    assert p.default_logins == [
        {"service": "telnet", "port": 23, "user": "root", "password": ""},
        {"service": "http_basic", "port": 80, "user": "admin", "password": "admin", "path": "/"},
        {"service": "http_form", "port": 8080, "user": "admin", "password": "x", "path": "/login"},
        {"service": "http_basic", "port": 81, "user": "a", "password": "b", "path": "/cgi-bin/status"}]
    assert profile("").default_logins == []


@pytest.mark.parametrize("body, key", [
    ('service = "ssh"\nport = 22\nuser = "a"\npassword = "b"', "default_logins[0].service"),
    ('service = "telnet"\nport = 0\nuser = "a"\npassword = "b"', "default_logins[0].port"),
    ('service = "telnet"\nport = 65536\nuser = "a"\npassword = "b"', "default_logins[0].port"),
    ('service = "telnet"\nport = "23"\nuser = "a"\npassword = "b"', "default_logins[0].port"),
    ('service = "telnet"\nport = true\nuser = "a"\npassword = "b"', "default_logins[0].port"),
    ('service = "telnet"\nport = 23\nuser = ""\npassword = "b"', "default_logins[0].user"),
    ('service = "telnet"\nport = 23\npassword = "b"', "default_logins[0].user"),
    ('service = "telnet"\nport = 23\nuser = "a"', "default_logins[0].password"),
    ('service = "telnet"\nport = 23\nuser = "a"\npassword = 1234', "default_logins[0].password"),
    ('service = "telnet"\nport = 23\nuser = "a"\npassword = "' + "x" * 65 + '"',
     "default_logins[0].password"),
    ('service = "telnet"\nport = 23\nuser = "a\\r\\nrm -rf /"\npassword = "b"', "default_logins[0].user"),
    ('service = "telnet"\nport = 23\nuser = "a"\npassword = "b"\npath = "/"', "default_logins[0].path"),
    ('service = "http_form"\nport = 80\nuser = "a"\npassword = "b"\npath = "login"',
     "default_logins[0].path"),
    ('service = "http_form"\nport = 80\nuser = "a"\npassword = "b"\npath = "/a b"', "default_logins[0].path"),
    ('service = "telnet"\nport = 23\nuser = "a"\npassword = "b"\nrealm = "x"',
     "default_logins[0]: unknown key"),
])
def test_a_bad_default_login_is_refused_naming_the_file_and_key(body, key):
    with pytest.raises(ConfigError) as err:
        profile(f"[[default_logins]]\n{body}\n")
    assert str(err.value).startswith(f"cam.toml: {key}"), err.value


def test_default_logins_must_be_tables_few_and_distinct():
    one = '[[default_logins]]\nservice = "telnet"\nport = 23\nuser = "a"\npassword = "b"\n'
    with pytest.raises(ConfigError, match=r"cam.toml: key 'default_logins' must be a list"):
        profiles.profile_from_text('default_logins = "admin:admin"\n' + BASE, "umboxes/cam.toml")
    with pytest.raises(ConfigError, match=r"cam.toml: default_logins: 11 entries; at most 10"):
        profile("".join(one.replace('"b"', f'"b{i}"') for i in range(11)))
    with pytest.raises(ConfigError, match=r"cam.toml: default_logins\[1\]: the same login as "
                                          r"default_logins\[0\]"):
        profile(one + one)


def test_the_shipped_profiles_keep_their_lists_short_and_mud_and_learnt_ones_have_none():
    shipped = profiles.load_all()
    assert {t for t, p in shipped.items() if p.default_logins} == {"camera", "plug", "light"}
    assert all(len(p.default_logins) <= 6 for p in shipped.values())
    # a profile written by the appliance (MUD import, learnt) carries them only if given
    text = profiles.dump_profile({"type": "x", "postures": {"normal": {"anti_spoof": {}}}})
    assert "default_logins" not in text


def test_a_profile_written_again_keeps_its_default_logins():
    """profile import --type rewrites the file (dump_profile); export is the file itself."""
    camera = profiles.load_profile(profiles.PROFILE_DIR / "camera.toml")
    data = {"type": "camera-copy", "postures": {"normal": {"anti_spoof": {}}},
            "default_logins": camera.default_logins}
    again = profiles.profile_from_text(profiles.dump_profile(data), "camera-copy.toml")
    assert again.default_logins == camera.default_logins


def test_profile_show_lists_them_without_passwords(tmp_path):
    sup = supervisor(tmp_path)
    shown = Ops(sup).profile_show("camera")["default_logins"]
    assert shown and all("password" not in x for x in shown)
    assert {"service": "telnet", "port": 23, "user": "root"} in shown


# -- the checker against the lab's device services -------------------------------------------
def test_telnet_basic_and_form_tell_success_from_failure_on_the_lab_device():
    async def main():
        async with lab_device(FACTORY) as (device, ports):
            t, h = ports["telnet"], ports["http"]
            tries = [entry("telnet", t, "admin", FACTORY), entry("telnet", t, "admin", "admin"),
                     entry("telnet", t, "root", FACTORY),
                     entry("http_basic", h, "admin", FACTORY, path="/status"),
                     entry("http_basic", h, "admin", "admin", path="/status"),
                     entry("http_basic", h, "admin", FACTORY),          # "/" asks for no login
                     entry("http_form", h, "admin", FACTORY), entry("http_form", h, "admin", "admin"),
                     entry("http_form", h, "admin", FACTORY, path="/nothing")]
            got = await logins.check(tries, "127.0.0.1")
            return device.stats, got
    stats, got = asyncio.run(main())
    assert [r["outcome"] for r in got] == ["success", "failure", "failure", "success", "failure",
                                           "no-login", "success", "failure", "no-login"], got
    assert got[0]["detail"] == "a shell prompt after the password"
    assert got[1]["detail"] == "refused: Login incorrect"
    # one login try per entry on the device, no more: 3 telnet, 2 Basic, 2 form
    assert stats["logins_ok"] == 3 and stats["logins_failed"] == 4 and stats["telnet_sessions"] == 3
    assert all("password" not in r for r in got)
    assert {k for r in got for k in r} == {"service", "port", "user", "path", "outcome", "detail"}


def test_the_shipped_camera_list_on_a_lab_camera():
    """The camera profile's own entries (ports moved to the lab device's): with the factory
    password admin, telnet and the form log in; "/" asks for no login; with the lab's password
    nothing works."""
    shipped = profiles.load_all()["camera"].default_logins

    async def run(password):
        async with lab_device(password) as (_, ports):
            moved = [{**x, "port": ports["telnet" if x["service"] == "telnet" else "http"]}
                     for x in shipped]
            return await logins.check(moved, "127.0.0.1")
    found = asyncio.run(run("admin"))
    assert [(r["service"], r["user"]) for r in found if r["outcome"] == "success"] == [
        ("telnet", "admin"), ("http_form", "admin")], found
    assert {r["outcome"] for r in found if r["service"] == "http_basic"} == {"no-login"}
    none = asyncio.run(run(NOT_A_DEFAULT))
    assert not [r for r in none if r["outcome"] == "success"], none


class Busybox:
    """A busybox-style telnetd: option negotiation (WILL ECHO, WILL SGA, DO ECHO, DO NAWS and
    a TTYPE subnegotiation), "<host> login:", "Password:", and then BusyBox's shell or, after a
    delay, "Login incorrect" and the login prompt again."""

    def __init__(self, user: str, password: str):
        self.user, self.password = user, password
        self.received = bytearray()

    async def line(self, reader) -> str:
        raw = await asyncio.wait_for(reader.readuntil(b"\n"), 5)
        self.received += raw
        return re.sub(rb"\xff[\xfb-\xfe].", b"", raw).decode().strip()

    async def handle(self, reader, writer):
        try:
            writer.write(bytes((IAC, WILL, 1, IAC, WILL, 3, IAC, DO, 1, IAC, DO, 31))
                         + bytes((IAC, SB, 24, 1, IAC, SE)) + b"\r\n\r\nkalkicam login: ")
            user = await self.line(reader)
            writer.write(b"Password: ")
            password = await self.line(reader)
            if (user, password) == (self.user, self.password):
                writer.write(b"\r\n\r\nBusyBox v1.31.1 (2021-05-03 10:00:00 UTC) built-in shell (ash)\r\n"
                             b"Enter 'help' for a list of built-in commands.\r\n\r\n~ # ")
            else:
                await asyncio.sleep(0.2)
                writer.write(b"\r\nLogin incorrect\r\nkalkicam login: ")
            await writer.drain()
            await asyncio.wait_for(reader.read(), 5)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("password, outcome, detail", [
    ("xc3511", "success", "a shell prompt after the password"),
    ("nope", "failure", "refused: Login incorrect"),
])
def test_a_busybox_telnetd(password, outcome, detail):
    async def main():
        daemon = Busybox("root", "xc3511")
        server = await asyncio.start_server(daemon.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return daemon, await logins.try_login(entry("telnet", port, "root", password), "127.0.0.1")
        finally:
            server.close()
    daemon, got = asyncio.run(main())
    assert (got["outcome"], got["detail"]) == (outcome, detail), got
    sent = bytes(daemon.received)
    # every option refused, once each; the subnegotiation not answered
    for refusal in ((IAC, DONT, 1), (IAC, DONT, 3), (IAC, WONT, 1), (IAC, WONT, 31)):
        assert sent.count(bytes(refusal)) == 1, sent
    assert bytes((IAC, WILL)) not in sent and bytes((IAC, DO)) not in sent
    assert re.sub(rb"\xff[\xfb-\xfe].", b"", sent) == f"root\r\n{password}\r\n".encode()


def test_the_telnet_parser_takes_sequences_split_across_reads():
    t = logins.TelnetText()
    text1, reply1 = t.feed(bytes((ord("a"), IAC)))
    text2, reply2 = t.feed(bytes((DO, 24, IAC, SB, 24, 1)) + b"hidden")
    text3, reply3 = t.feed(bytes((IAC, SE, IAC, IAC)) + b"b\x00\x07c\r\n" + bytes((IAC, DO, 24)))
    assert text1 + text2 + text3 == "abc\r\n"
    assert reply1 + reply2 + reply3 == bytes((IAC, WONT, 24))      # answered once


def test_an_unreachable_port_is_said_at_once_and_not_tried_again():
    port = closed_port()
    started = time.monotonic()
    got = asyncio.run(logins.check([entry("telnet", port, "admin", "admin"),
                                    entry("http_basic", port, "admin", "admin")], "127.0.0.1", pause=5))
    assert time.monotonic() - started < 1.5
    assert [r["outcome"] for r in got] == ["unreachable", "unreachable"], got
    assert got[1]["detail"].endswith("unreachable (above)")


def test_a_service_that_says_nothing_is_inconclusive_within_the_try_s_time(monkeypatch):
    monkeypatch.setattr(logins, "TRY_SECONDS", 0.5)

    async def main():
        async def mute(reader, writer):
            await reader.read()
            writer.close()
        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await asyncio.gather(logins.try_login(entry("telnet", port, "a", "b"), "127.0.0.1"),
                                        logins.try_login(entry("http_form", port, "a", "b"), "127.0.0.1"))
        finally:
            server.close()
    started = time.monotonic()
    telnet, form = asyncio.run(main())
    assert time.monotonic() - started < 2
    assert telnet["outcome"] == form["outcome"] == "inconclusive"
    assert "waiting for a login prompt" in telnet["detail"]


def test_a_form_that_wants_form_encoding_is_tried_so_and_html_is_not_taken_for_success():
    """A 400 to the JSON object: the same login once more, form-encoded; a 2xx page that is not
    JSON tells nothing, unless it says the login failed."""
    seen = []

    async def main(answer: bytes):
        async def form(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head)[1])
            body = await reader.readexactly(length)
            seen.append(body)
            if body.startswith(b"{"):
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: "
                             + str(len(answer)).encode() + b"\r\n\r\n" + answer)
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(form, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await logins.try_login(entry("http_form", port, "admin", "p&w"), "127.0.0.1")
        finally:
            server.close()
    got = asyncio.run(main(b"<html>Welcome</html>"))
    assert got["outcome"] == "inconclusive" and "form-encoded" in got["detail"], got
    assert seen == [b'{"user": "admin", "password": "p&w"}', b"user=admin&password=p%26w"]
    got = asyncio.run(main(b"<html>Invalid password</html>"))
    assert got["outcome"] == "failure", got


def test_basic_behind_another_scheme_is_not_tried():
    async def main():
        async def digest(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Digest realm="x", nonce="1"\r\n'
                         b"Content-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(digest, "127.0.0.1", 0)
        try:
            return await logins.try_login(entry("http_basic", server.sockets[0].getsockname()[1], "a", "b"),
                                          "127.0.0.1")
        finally:
            server.close()
    got = asyncio.run(main())
    assert got["outcome"] == "inconclusive" and "Digest" in got["detail"]


# -- the supervisor --------------------------------------------------------------------------
def point_at(sup, ports: dict) -> list[dict]:
    """The camera type's list for this test, on the lab device's ports at 127.0.0.1."""
    t, h = ports["telnet"], ports["http"]
    sup.login_address = "127.0.0.1"
    sup.profiles["camera"].default_logins = [
        entry("telnet", t, "admin", FACTORY), entry("telnet", t, "root", "xc3511"),
        entry("http_basic", h, "admin", FACTORY, path="/status"), entry("http_form", h, "admin", "admin")]
    return sup.profiles["camera"].default_logins


def everything_written(sup) -> str:
    sup.store.flush()
    return "".join(p.read_text(errors="replace") for p in Path(sup.store.directory).rglob("*") if p.is_file())


def test_a_check_raises_one_alert_listing_what_worked_and_records_no_password(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    sup = supervisor(tmp_path, cam1=(CAM_MAC, CAM_IP, "camera"))
    ops = Ops(sup)

    async def main():
        async with lab_device(FACTORY) as (device, ports):
            point_at(sup, ports)
            return await ops.device_check_logins("cam1")
    r = asyncio.run(main())
    assert r["state"] == "done" and r["found"] == 2 and r["by"] == "operator" and r["type"] == "camera"
    assert [x["outcome"] for x in r["results"]] == ["success", "failure", "success", "failure"]
    alerts = [a for a in sup.store.alerts(device="cam1") if a["type"] == "default-credentials"]
    assert len(alerts) == 1
    a = alerts[0]
    assert a["severity"] == "critical" and a["source"] == "supervisor"
    assert [(x["service"], x["user"], x["outcome"]) for x in a["details"]["logins"]] == [
        ("telnet", "admin", "success"), ("http_basic", "admin", "success")]
    assert "change the password on the device" in a["details"]["message"]
    shown = ops.device_show("cam1")
    assert shown["logins_checked"]["found"] == 2 and len(shown["logins_checked"]["results"]) == 4
    assert any(x["event"] == "check-logins" for x in sup.store.decisions(kind="audit", limit=10))
    # no password anywhere: not in the record, the alert, the audit, the store's files, the log
    for text in (json.dumps(shown), json.dumps(alerts), everything_written(sup), caplog.text):
        assert FACTORY not in text and "xc3511" not in text and '"password"' not in text
    sup.store.close()


def test_nothing_is_tried_on_a_device_not_approved_or_unknown(tmp_path):
    sup = supervisor(tmp_path)
    ops = Ops(sup)
    sup.discovered("02:4b:00:00:01:02", "198.18.0.20", {"hostname": "ipcam-7"})
    name = next(n for n, d in sup.known.items() if not d["approved"])

    async def main():
        async with lab_device(FACTORY) as (device, ports):
            point_at(sup, ports)
            with pytest.raises(ConfigError, match=f"device {name}: not approved"):
                await ops.device_check_logins(name)
            with pytest.raises(UnknownDeviceError):
                await ops.device_check_logins("nobody")
            await asyncio.sleep(0.05)
            return device.stats
    stats = asyncio.run(main())
    assert stats["telnet_sessions"] == stats["http_requests"] == 0
    assert "logins_checked" not in sup.known[name]
    sup.store.close()


def test_approval_starts_the_check_behind_the_loop(tmp_path):
    sup = supervisor(tmp_path)
    ops = Ops(sup)
    sup.discovered("02:4b:00:00:01:03", "198.18.0.21", {"hostname": "ipcam-8"})
    name = next(n for n, d in sup.known.items() if not d["approved"])

    async def main():
        sup.loop = asyncio.get_running_loop()
        async with lab_device(FACTORY) as (device, ports):
            point_at(sup, ports)
            ops.device_approve(name, "camera")
            task = sup._login_checks[name]        # started, not awaited by the approval
            assert not task.done()
            # asked meanwhile: the same check, not a second one
            r = await ops.device_check_logins(name)
            assert r is await task
            return device.stats, r
    stats, r = asyncio.run(main())
    assert r["by"] == "approval by operator" and r["found"] == 2
    assert stats["telnet_sessions"] == 2 and stats["logins_ok"] + stats["logins_failed"] == 4
    assert len([a for a in sup.store.alerts(device=name) if a["type"] == "default-credentials"]) == 1
    sup.store.close()


def test_without_a_running_loop_approval_checks_nothing(tmp_path):
    sup = supervisor(tmp_path, cam1=(CAM_MAC, CAM_IP, "camera"))
    assert sup._login_checks == {} and "logins_checked" not in sup.known["cam1"]
    sup.store.close()


def test_quarantine_and_a_type_without_logins_are_skipped_and_say_why(tmp_path):
    sup = supervisor(tmp_path, cam1=(CAM_MAC, CAM_IP, "camera"),
                     door1=("02:4b:00:00:01:04", "198.18.0.22", "door_sensor"))
    ops = Ops(sup)
    ops.posture_set("cam1", "quarantine")

    async def main():
        async with lab_device(FACTORY) as (device, ports):
            point_at(sup, ports)
            quarantined = await ops.device_check_logins("cam1")
            ops.posture_set("cam1", "attack")        # the camera's attack posture is a quarantine too
            attacked = await ops.device_check_logins("cam1")
            return device.stats, quarantined, attacked, await ops.device_check_logins("door1")
    stats, quarantined, attacked, door = asyncio.run(main())
    assert stats["telnet_sessions"] == stats["http_requests"] == 0
    for r in (quarantined, attacked):
        assert r["state"] == "skipped" and "quarantines it" in r["reason"] and r["results"] == []
    assert door["state"] == "skipped" and door["reason"] == "its type door_sensor lists no default logins"
    assert not [a for a in sup.store.alerts() if a["type"] == "default-credentials"]
    sup.store.close()


def test_no_alert_when_no_default_login_works(tmp_path):
    sup = supervisor(tmp_path, cam1=(CAM_MAC, CAM_IP, "camera"))

    async def main():
        async with lab_device(NOT_A_DEFAULT) as (_, ports):
            point_at(sup, ports)
            return await Ops(sup).device_check_logins("cam1")
    r = asyncio.run(main())
    assert r["found"] == 0 and {x["outcome"] for x in r["results"]} == {"failure"}
    assert not [a for a in sup.store.alerts() if a["type"] == "default-credentials"]
    sup.store.close()


def test_the_store_refuses_a_record_holding_a_password(tmp_path):
    sup = supervisor(tmp_path, cam1=(CAM_MAC, CAM_IP, "camera"))
    with pytest.raises(Exception, match="holds a password"):
        sup.store.update_device("cam1", logins_checked={"results": [{"user": "a", "password": "b"}]})
    sup.store.close()


# -- the faces: the control socket and `kalki device check-logins`, the page ---------------------
def test_kalki_device_check_logins_through_the_control_socket(tmp_path, capsys):
    sup = supervisor(tmp_path, cam1=(CAM_MAC, CAM_IP, "camera"))
    ops = Ops(sup)
    path = str(tmp_path / "kalki.sock")

    async def main():
        server = await asyncio.start_unix_server(lambda r, w: control.serve_client(ops, r, w), path=path)
        try:
            async with lab_device(FACTORY) as (_, ports):
                point_at(sup, ports)
                code = await asyncio.to_thread(cli.main, ["--socket", path, "device", "check-logins", "cam1"])
                as_json = await asyncio.to_thread(cli.main, ["--socket", path, "device", "check-logins",
                                                             "cam1", "--json"])
                refused = await asyncio.to_thread(cli.main, ["--socket", path, "device", "check-logins",
                                                             "nobody"])
                return code, as_json, refused
        finally:
            server.close()
    code, as_json, refused = asyncio.run(main())
    out = capsys.readouterr()
    assert code == 1 and as_json == 1 and refused == 2
    assert "success      telnet port" in out.out and "2 default login(s) work" in out.out
    assert "device 'nobody' does not exist" in out.err
    assert FACTORY not in out.out
    sup.store.close()


def test_the_device_page_has_the_button_and_shows_the_result(tmp_path):
    from test_web import client, login, set_admin
    sup = supervisor(tmp_path, cam1=(CAM_MAC, CAM_IP, "camera"))
    sup.cfg.web.tls = False
    set_admin(sup)

    async def main():
        async with lab_device(FACTORY) as (_, ports), client(sup) as c:
            point_at(sup, ports)
            token = await login(c)
            page = await (await c.get("/devices/cam1")).text()
            assert "Not checked yet." in page and 'action="/devices/cam1/check-logins"' in page
            r = await c.post("/devices/cam1/check-logins", data={"csrf": token}, allow_redirects=False)
            assert r.status == 303, await r.text()
            page = await (await c.get("/devices/cam1")).text()
            refused = await c.post("/devices/cam1/check-logins", data={}, allow_redirects=False)
            return page, refused.status
    page, refused = asyncio.run(main())
    assert "cam1: 2 default login(s) work: change the password on the device." in page
    assert 'data-role="default-logins">2 default login(s) work' in page
    assert page.count('<td data-label="outcome">success</td>') == 2 and FACTORY not in page
    assert refused in (400, 403)        # no CSRF token, no check
    sup.store.close()
