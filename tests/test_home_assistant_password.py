"""Home Assistant's password on the appliance's broker (issue 14): set from the settings page,
the `kalki` command or the site file, only its hash kept, in force at once by a reload of the
running broker (the old password refused and its session ended, nobody else disconnected).
Against a real Mosquitto on loopback, with the broker's ACL and plugin as broker.py writes them
(tests/test_home_assistant.py's), and a real Supervisor on the fake data path."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from fakes import supervisor
from test_home_assistant import HA, LIGHT, PLUG, audits, plugin, until, wired  # noqa: F401
from test_mqtt import free_port
from test_profiles_cli import kalki, served  # noqa: F401
from test_web import client, csrf_of, login, set_admin

from appliance.errors import ConfigError, KalkiError
from appliance.supervisor.ops import HOME_ASSISTANT, Ops
from appliance.system import broker as broker_mod
from appliance.system import site
from appliance.system.broker import PASSWORDS, Broker, random_password, write_config

pytestmark = pytest.mark.skipif(not Path(broker_mod.MOSQUITTO).exists(), reason="mosquitto is not installed")


def login_answer(port: int, user: str, password: str, client_id: str | None = None,
                 timeout: float = 5.0) -> str:
    """The broker's answer to a login: "Success", or the refusal's reason ("Not authorized")."""
    done = threading.Event()
    answer: list[str] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=HA if client_id is None else client_id)
    c.username_pw_set(user, password)

    def connected(client, userdata, flags, reason_code, properties):
        answer.append(str(reason_code))
        done.set()

    def gone(client, userdata, flags, reason_code, properties):
        answer.append(str(reason_code))   # refused before a CONNACK (the plugin may just close)
        done.set()
    c.on_connect, c.on_disconnect = connected, gone
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert done.wait(timeout), f"no answer to {user}'s login"
    finally:
        c.disconnect()
        c.loop_stop()
    return answer[0]


class Session:
    """Home Assistant logged in, with what happens to its connection recorded."""

    def __init__(self, port: int, password: str, client_id: str = HA):
        self.dropped = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.c.username_pw_set(HA, password)
        self.c.on_disconnect = lambda *a: self.dropped.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        deadline = time.monotonic() + 5
        while not self.c.is_connected():
            assert time.monotonic() < deadline, "Home Assistant did not log in"
            time.sleep(0.02)

    def publish(self, topic: str, payload: str) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def hashes(directory: Path) -> dict[str, str]:
    """The broker's password file: {user: hash}."""
    return dict(line.split(":", 1) for line in (directory / PASSWORDS).read_text().splitlines())


@pytest.fixture
def broker(tmp_path, plugin):  # noqa: F811
    """The appliance's broker before anyone set Home Assistant's password: its user is in the
    ACL, and not in the password file."""
    users = {name: random_password() for name in ("kalki", "light1", "plug1")}
    b = Broker(tmp_path / "mqtt", port=free_port(), users=users, denials_plugin=plugin,
               home_assistant_user=HA).start()
    yield b
    b.stop()


def pointed_at(sup, broker):
    """The supervisor given the broker's files as appliance.run gives them."""
    sup.cfg.mqtt.port = broker.port
    sup.cfg.mqtt.broker_directory = str(broker.directory)
    sup.broker_files = broker_mod.BrokerFiles(broker.directory, ("127.0.0.1", broker.port))
    return sup


@pytest.fixture
def sup(tmp_path, broker):
    s = pointed_at(supervisor(tmp_path / "sup", light1=LIGHT, plug1=PLUG), broker)
    yield s
    s.store.close()


# ---------------------------------------------------------------- through Ops, on the broker

def test_a_set_password_lets_home_assistant_in_to_set_a_posture_and_a_new_one_shuts_the_old_out(
        sup, broker, caplog):
    ops = Ops(sup)
    assert login_answer(broker.port, HA, "anything") == "Not authorized"      # none yet
    assert ops.home_assistant_broker()["password_set"] is False
    devices_before = {u: h for u, h in hashes(broker.directory).items() if u != HA}

    async def main():
        async with wired(sup, broker) as bus:
            reconnects: list[int] = []
            connected = bus.on_connected
            bus.on_connected = lambda: (reconnects.append(1), connected())
            first = await ops.home_assistant_password("tester")
            assert first["broker_reloaded"] is True and first["user"] == HA
            assert first["listeners"] == [{"address": "127.0.0.1", "port": broker.port, "tls": False}]
            assert first["client_id"] == HA and first["discovery_prefix"] == "homeassistant"
            home_assistant = await asyncio.to_thread(Session, broker.port, first["password"])
            try:
                home_assistant.publish("kalki/light1/posture/set", "quarantine")
                await until(lambda: sup.known["light1"]["posture"] == "quarantine", "the posture")

                second = await ops.home_assistant_password("tester")
                assert second["password"] != first["password"]
                # Mosquitto checks every session again at the reload: the old login is ended
                assert await asyncio.to_thread(home_assistant.dropped.wait, 5)
            finally:
                home_assistant.close()
            assert await asyncio.to_thread(login_answer, broker.port, HA, first["password"]) == \
                "Not authorized"
            assert await asyncio.to_thread(login_answer, broker.port, HA, second["password"]) == "Success"
            assert await asyncio.to_thread(login_answer, broker.port, HA, second["password"] + "x") == \
                "Not authorized"
            again = await asyncio.to_thread(Session, broker.port, second["password"])
            try:
                again.publish("kalki/plug1/posture/set", "suspicious")
                await until(lambda: sup.known["plug1"]["posture"] == "suspicious", "the second posture")
            finally:
                again.close()
            # the supervisor's own session lived through both reloads
            assert bus.connected and not reconnects
            return first["password"], second["password"]

    with caplog.at_level(logging.DEBUG):
        first, second = asyncio.run(main())
    posture = [r for r in audits(sup, "posture") if r["actor"] == HOME_ASSISTANT]
    assert {(r["details"]["device"], r["details"]["posture"]) for r in posture} == {
        ("light1", "quarantine"), ("plug1", "suspicious")}
    assert sup.store.posture_history("light1", 1)[0]["reason"] == "set by Home Assistant"
    set_ = audits(sup, "ha-password-set")
    assert [(r["actor"], r["details"]) for r in set_] == [
        ("tester", {"user": HA, "broker_reloaded": True})] * 2
    # only the hash is kept, the devices' lines are as they were, and no log line has it
    kept = hashes(broker.directory)
    assert kept[HA].startswith("$7$") and broker_mod.mosquitto_hash_matches(second, kept[HA])
    assert not broker_mod.mosquitto_hash_matches(first, kept[HA])
    assert {u: h for u, h in kept.items() if u != HA} == devices_before
    text = (broker.directory / PASSWORDS).read_text() + str(sup.store.decisions(limit=500))
    assert first not in text and second not in text
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "tester" in logged and first not in logged and second not in logged
    view = Ops(sup).home_assistant_broker()
    assert view["password_set"] and view["password_set_by"] == "tester" and "password" not in view


def test_home_assistant_must_log_in_with_its_name_as_client_id(sup, broker):
    """The page tells the operator to set the client id: Home Assistant's own default (a random
    22-character id, mqtt.base62) is refused by the broker's plugin."""
    password = asyncio.run(Ops(sup).home_assistant_password())["password"]
    assert login_answer(broker.port, HA, password, client_id="2BqXTkR9VNpWm5HhZcYdLe") != "Success"
    assert login_answer(broker.port, HA, password, client_id="light1") != "Success"
    assert login_answer(broker.port, HA, password, client_id=f"{HA}-kitchen") == "Success"
    assert login_answer(broker.port, HA, password, client_id="") == "Success"    # the broker's auto-


def test_rewriting_the_broker_files_for_a_device_keeps_home_assistants_password(sup, broker):
    password = asyncio.run(Ops(sup).home_assistant_password())["password"]
    broker.add_user("plug9", random_password())          # write_config, and a reload
    assert login_answer(broker.port, HA, password) == "Success"
    assert login_answer(broker.port, "plug9", broker.users["plug9"], client_id="plug9") == "Success"


def test_without_a_running_broker_the_file_has_it_for_the_start(tmp_path, plugin):  # noqa: F811
    s = supervisor(tmp_path / "sup", light1=LIGHT)
    try:
        b = Broker(tmp_path / "mqtt", port=free_port(), users={"kalki": random_password()},
                   denials_plugin=plugin, home_assistant_user=HA)      # written, not started
        pointed_at(s, b)
        new = asyncio.run(Ops(s).home_assistant_password())
        assert new["broker_reloaded"] is False
        assert audits(s, "ha-password-set")[0]["details"]["broker_reloaded"] is False
        with b:
            assert login_answer(b.port, HA, new["password"]) == "Success"
        s.broker_files = broker_mod.BrokerFiles(tmp_path / "nowhere", ("127.0.0.1", b.port))
        with pytest.raises(ConfigError, match="mqtt.broker_directory"):
            asyncio.run(Ops(s).home_assistant_password())
        s.broker_files = None
        with pytest.raises(KalkiError, match="without the broker's files"):
            asyncio.run(Ops(s).home_assistant_password())
        assert Ops(s).home_assistant_broker()["listeners"] == []
    finally:
        s.store.close()


def test_a_broker_that_does_not_reload_keeps_the_old_password(tmp_path):
    """Something running from the conf that never says it re-read it: the file is put back as
    it was, and the broker is told again (it may have read the new line, and only not said so)."""
    directory = tmp_path / "mqtt"
    write_config(directory, users={"kalki": "pw", HA: "old"}, home_assistant_user=HA, denials_plugin=None)
    (directory / broker_mod.LOG).write_text("")
    before = (directory / PASSWORDS).read_text()
    hups = tmp_path / "hups"
    deaf = tmp_path / "deaf.py"
    deaf.write_text("import signal, sys, time\n"
                    "def hup(*_):\n"
                    "    with open(sys.argv[1], 'a') as f:\n"
                    "        f.write('hup\\n')\n"
                    "signal.signal(signal.SIGHUP, hup)\n"
                    "open(sys.argv[1], 'a').close()\n"
                    "time.sleep(60)\n")
    process = subprocess.Popen(["mosquitto", str(deaf), str(hups), "-c", str(directory / broker_mod.CONF)],
                               executable=sys.executable)
    try:
        deadline = time.monotonic() + 5
        while broker_mod.running_pid(directory / broker_mod.CONF) != process.pid or not hups.exists():
            assert time.monotonic() < deadline, "the stand-in is not found as the broker"
            time.sleep(0.05)
        with pytest.raises(KalkiError, match="did not take the new password.*keeps the old one"):
            broker_mod.set_password(directory, HA, "new-password", ("127.0.0.1", 1), timeout=0.3)
        deadline = time.monotonic() + 5
        while hups.read_text().count("hup") < 2:
            assert time.monotonic() < deadline, "the broker was not told to read the old line again"
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
    assert (directory / PASSWORDS).read_text() == before


def test_a_password_file_that_cannot_be_written_is_an_error_naming_it(sup, broker):
    """A read-only file system, say (here: the temporary file's name taken by a directory,
    which root cannot write either): the page says which file, and nothing changes."""
    set_admin(sup)
    before = (broker.directory / PASSWORDS).read_text()
    (broker.directory / (PASSWORDS + ".tmp")).mkdir()
    with pytest.raises(broker_mod.BrokerFilesError, match=f"{broker.directory / PASSWORDS}: cannot write"):
        broker_mod.set_password(broker.directory, HA, "new-password", ("127.0.0.1", broker.port))

    async def main():
        async with client(sup) as c:
            token = await login(c)
            r = await post_for_password(c, token)
            return r.status, await r.text()
    status, page = asyncio.run(main())
    assert status == 400 and f"{broker.directory / PASSWORDS}: cannot write" in page
    assert (broker.directory / PASSWORDS).read_text() == before
    assert not audits(sup, "ha-password-set")


def test_the_password_file_is_private_from_its_creation_and_on_the_disk_before_it_is_in_place(
        tmp_path, monkeypatch):
    directory = tmp_path / "mqtt"
    write_config(directory, users={"kalki": "pw"}, home_assistant_user=HA, denials_plugin=None)
    leftover = directory / (PASSWORDS + ".tmp")
    leftover.write_text("from a crash")
    leftover.chmod(0o644)
    created, synced = [], []
    real_open, real_fsync = broker_mod.os.open, broker_mod.os.fsync
    monkeypatch.setattr(broker_mod.os, "open", lambda path, flags, mode=0o777, *a, **k: (
        created.append((Path(path).name, mode)), real_open(path, flags, mode, *a, **k))[1])
    monkeypatch.setattr(broker_mod.os, "fsync", lambda fd: (
        synced.append((directory / PASSWORDS).read_text()), real_fsync(fd))[1])
    broker_mod.set_password(directory, HA, "a-new-password", ("127.0.0.1", 1))
    assert (PASSWORDS + ".tmp", 0o600) in created
    assert synced and HA not in synced[-1]         # synced before the rename
    assert (directory / PASSWORDS).stat().st_mode & 0o777 == 0o600 and not leftover.exists()


def test_off_when_there_is_no_home_assistant_user(sup):
    sup.cfg.mqtt.home_assistant_user = ""
    ops = Ops(sup)
    assert ops.home_assistant_broker() == {"enabled": False, "setting": "mqtt.home_assistant_user"}
    with pytest.raises(ConfigError, match="mqtt.home_assistant_user is empty"):
        asyncio.run(ops.home_assistant_password())
    assert not audits(sup, "ha-password-set")


def test_the_listeners_are_read_from_the_brokers_configuration(tmp_path):
    write_config(tmp_path, listen="0.0.0.0", port=1884, denials_plugin=None)
    assert broker_mod.listeners(tmp_path) == [{"address": "", "port": 1884, "tls": False}]
    conf = tmp_path / broker_mod.CONF
    conf.write_text(conf.read_text() + "listener 8883 198.18.0.1\ncertfile /x.pem\nkeyfile /x.key\n")
    assert broker_mod.listeners(tmp_path)[1:] == [{"address": "198.18.0.1", "port": 8883, "tls": True}]
    assert broker_mod.listeners(tmp_path / "none") == []


# ---------------------------------------------------------------- the settings page

async def post_for_password(c, token):
    return await c.post("/settings/home-assistant-password", data={"csrf": token})


def test_the_settings_page_sets_it_and_shows_it_once(sup, broker):
    set_admin(sup)

    async def main():
        async with client(sup) as c:
            token = await login(c)
            page = await (await c.get("/settings")).text()
            section = page.split('id="home-assistant"', 1)[1].split("</section>", 1)[0]
            assert f'id="ha-user">{HA}<' in section and f"<code>{broker.port}</code>" in section
            assert "plain MQTT, no TLS" in section and "none yet" in section
            assert "Client ID" in section and "advanced options" in section
            assert 'action="/settings/home-assistant-password"' in section
            assert "Set a new password" in section
            # no CSRF token, or a forged one: refused, and nothing set
            for data in ({}, {"csrf": "forged"}):
                r = await c.post("/settings/home-assistant-password", data=data)
                assert r.status == 403
            assert HA not in hashes(broker.directory) and not audits(sup, "ha-password-set")

            r = await post_for_password(c, token)
            shown = await r.text()
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            password = re.search(r'id="ha-password">([^<]+)<', shown).group(1)
            assert shown.count(password) == 1
            assert await asyncio.to_thread(login_answer, broker.port, HA, password) == "Success"
            # once: the page afterwards says it is set, and does not have it
            after = await (await c.get("/settings")).text()
            assert password not in after and 'id="ha-password"' not in after
            assert "only its hash is kept here" in after and "by web:admin" in after
            # a second press: a new one, and the first stops working
            token = csrf_of(after)
            second = re.search(r'id="ha-password">([^<]+)<',
                               await (await post_for_password(c, token)).text()).group(1)
            assert second != password
            assert await asyncio.to_thread(login_answer, broker.port, HA, password) == "Not authorized"
            assert await asyncio.to_thread(login_answer, broker.port, HA, second) == "Success"
    asyncio.run(main())
    assert [r["actor"] for r in audits(sup, "ha-password-set")] == ["web:admin"] * 2


def test_the_page_says_every_address_when_the_broker_listens_on_all(sup, broker):
    write_config(broker.directory, listen="0.0.0.0", port=broker.port, denials_plugin=None,
                 home_assistant_user=HA)       # the image's listener (read, not restarted)
    set_admin(sup)

    async def main():
        async with client(sup) as c:
            await login(c)
            return await (await c.get("/settings")).text()
    page = asyncio.run(main())
    assert "<code>127.0.0.1</code> (this page's address: the broker listens on every address" in page


def test_the_page_says_it_is_off_without_a_user_and_has_no_button(sup):
    sup.cfg.mqtt.home_assistant_user = ""
    set_admin(sup)

    async def main():
        async with client(sup) as c:
            token = await login(c)
            page = await (await c.get("/settings")).text()
            r = await post_for_password(c, token)
            return page, r.status, await r.text()
    page, status, refused = asyncio.run(main())
    section = page.split('id="home-assistant"', 1)[1].split("</section>", 1)[0]
    assert "Off: <code>mqtt.home_assistant_user</code> is empty" in section
    assert "/settings/home-assistant-password" not in section and "Set a new password" not in section
    assert status == 400 and "mqtt.home_assistant_user is empty" in refused


# ---------------------------------------------------------------- the command

@pytest.fixture
def ops(sup):
    """`served` (tests/test_profiles_cli.py) serves these over a real control socket."""
    return Ops(sup)


def test_the_command_prints_it_once(served, capsys, broker):  # noqa: F811
    sock, ops = served
    code, out, _ = kalki(capsys, sock, "mqtt", "home-assistant")
    assert code == 0 and f"username          {HA}" in out and "none yet" in out
    assert f"port              {broker.port} (plain MQTT, no TLS)" in out

    code, out, err = kalki(capsys, sock, "mqtt", "home-assistant-password")
    password = re.search(r"^password +(\S+)$", out, re.M).group(1)
    assert code == 0 and "shown this once" in err and password not in err
    assert login_answer(broker.port, HA, password) == "Success"
    code, out, _ = kalki(capsys, sock, "mqtt", "home-assistant")
    assert code == 0 and password not in out and "set (only its hash is kept" in out

    code, out, _ = kalki(capsys, sock, "mqtt", "home-assistant-password", "--json")
    second = json.loads(out)["password"]
    assert code == 0 and second != password
    assert login_answer(broker.port, HA, password) == "Not authorized"
    assert login_answer(broker.port, HA, second) == "Success"
    assert [r["actor"] for r in audits(ops._sup, "ha-password-set")] == ["operator"] * 2

    ops.cfg.mqtt.home_assistant_user = ""
    code, out, err = kalki(capsys, sock, "mqtt", "home-assistant-password")
    assert code == 2 and out == "" and "mqtt.home_assistant_user is empty" in err


# ---------------------------------------------------------------- the site file

WIRED = {"network": {"devices_interface": "eth1", "uplink_interface": "eth0"}}


def test_the_site_file_may_give_it_and_it_is_hashed_once(tmp_path, capsys):
    s = site.parse({**WIRED, "mqtt": {"home_assistant_password": "a-site-password-16"}}, "kalki.toml")
    assert s.home_assistant_password == "a-site-password-16"
    assert not any("a-site-password-16" in text for text in site.render(s).values())
    directory = tmp_path / "mqtt"
    write_config(directory, users={"kalki": "pw"}, home_assistant_user=HA, denials_plugin=None)
    assert "has the site file's password" in site.home_assistant_password(s, directory)
    hashed = hashes(directory)[HA]
    assert broker_mod.mosquitto_hash_matches("a-site-password-16", hashed)
    assert "a-site-password-16" not in (directory / PASSWORDS).read_text()
    # set since (from the page, say): the card's is not taken again
    broker_mod.set_password(directory, HA, "from-the-page", ("127.0.0.1", 1))
    assert "not used" in site.home_assistant_password(s, directory)
    assert broker_mod.mosquitto_hash_matches("from-the-page", hashes(directory)[HA])
    # the command kalki-firstboot runs
    source = tmp_path / "kalki.toml"
    source.write_text('[network]\ndevices_interface = "eth1"\nuplink_interface = "eth0"\n'
                      '[mqtt]\nhome_assistant_password = "a-site-password-16"\n')
    assert site.main(["home-assistant-password", "--source", str(source),
                      "--broker-directory", str(directory)]) == 0
    assert "not used" in capsys.readouterr().out
    assert site.home_assistant_password(site.parse(WIRED, "kalki.toml"), directory) == \
        "no Home Assistant password in the site file"


@pytest.mark.parametrize("value, words", [("short", "16 to 128 characters, this one 5"),
                                          ("x" * 129, "16 to 128"),
                                          ("with a space 0123", "no spaces"),
                                          ("pässwörd-0123456789", "printable ASCII"),
                                          (12345678901234567, "expected a string")])
def test_a_bad_site_password_is_refused_naming_the_key(value, words):
    with pytest.raises(site.SiteError) as e:
        site.parse({**WIRED, "mqtt": {"home_assistant_password": value}}, "kalki.toml")
    assert "kalki.toml: mqtt.home_assistant_password" in str(e.value) and words in str(e.value)
    with pytest.raises(site.SiteError, match=r"kalki.toml: mqtt: unknown key\(s\) \['user'\]"):
        site.parse({**WIRED, "mqtt": {"user": "x"}}, "kalki.toml")


def test_an_unreadable_password_file_is_named_on_the_page_which_still_renders(sup, broker):
    set_admin(sup)
    passwords = broker.directory / PASSWORDS
    saved = passwords.read_text()
    passwords.unlink()
    passwords.mkdir()                  # reading it fails as an unreadable file's read would
    try:
        assert "cannot read the broker's passwords" in Ops(sup).home_assistant_broker()["password_error"]

        async def main():
            async with client(sup) as c:
                await login(c)
                r = await c.get("/settings")
                return r.status, await r.text()
        status, page = asyncio.run(main())
        section = page.split('id="home-assistant"', 1)[1].split("</section>", 1)[0]
        assert status == 200 and f"unknown: {passwords}: cannot read" in section
    finally:
        passwords.rmdir()
        passwords.write_text(saved)
