"""Profiles managed at run time: `kalki profile import/list/show/export/remove` and the ops
behind them, on a supervisor with a fake data path (tests/fakes.py) and, for the command, its
real control socket. A type imported is usable at once; a failed import writes nothing. No root
needed.

Name and lan destinations ("pool.ntp.org:123/udp", "lan:6668/tcp") are the data path's to accept
(appliance.dataplane.umbox.parse_destination); the tests that use them say so."""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from fakes import supervisor

from appliance import cli
from appliance.errors import ConfigError, StoreError
from appliance.policy import profiles
from appliance.supervisor import control
from appliance.supervisor.core import Supervisor
from appliance.supervisor.ops import Ops

DATA = Path(__file__).resolve().parent / "data" / "mud"
LAMP_FILE = DATA / "mood_lamp-3204432Mud.json"
LAMP_TEXT = LAMP_FILE.read_text()
LAMP_IP = "10.42.0.174"        # the lamp's address in the capture its MUD file was made from
MAC = "b8:06:0d:18:84:b4"


@pytest.fixture
def ops(tmp_path):
    return Ops(supervisor(tmp_path))


def installed_dir(ops: Ops) -> Path:
    return profiles.installed_dir(ops.cfg.state.directory)


def audit_events(ops: Ops) -> list[str]:
    return [r["event"] for r in ops.audit_log() if r["event"].startswith("profile-")]


# -- the ops ----------------------------------------------------------------------------------

def test_import_list_approve_remove(ops):
    result = ops.profile_import(LAMP_TEXT, "mood_lamp-3204432Mud.json", device_ip=LAMP_IP)
    assert result["type"] == "mood_lamp-3204432" and result["format"] == "mud"
    assert any("own address" in n for n in result["notes"])
    path = installed_dir(ops) / "mood_lamp-3204432.toml"
    assert result["path"] == str(path) and path.exists()
    text = path.read_text()
    assert text.startswith("# Device type mood_lamp-3204432, made by `kalki profile import`")
    assert "own address" in text                 # the notes are in the file, as comments

    rows = {r["type"]: r for r in ops.profile_list()}
    assert rows["mood_lamp-3204432"]["source"] == "installed"
    assert rows["mood_lamp-3204432"]["mud_url"] == "https://mood_lamp-3204432.com/mood_lamp-3204432"
    assert rows["camera"]["source"] == "shipped"
    shown = ops.profile_show("mood_lamp-3204432")
    assert shown["postures"]["normal"]["allowlist"]["destinations"] == [
        "18.185.182.159:443/tcp", "3.124.225.12:8886/tcp"]

    # usable at once: a device is approved with the new type and enforced with its stack
    ops.device_add("lamp1", MAC, "198.18.0.40")
    ops.device_approve("lamp1", type="mood_lamp-3204432")
    spec = ops._sup.dp.devices["lamp1"]
    assert spec.stack["allowlist"]["destinations"] == ["18.185.182.159:443/tcp", "3.124.225.12:8886/tcp"]
    assert ops.profile_list()[[r["type"] for r in ops.profile_list()].index("mood_lamp-3204432")][
        "devices"] == ["lamp1"]

    with pytest.raises(ConfigError) as e:
        ops.profile_remove("mood_lamp-3204432")
    assert "lamp1" in str(e.value)
    assert path.exists() and "mood_lamp-3204432" in ops.profile_types()

    ops.device_remove("lamp1")
    assert ops.profile_remove("mood_lamp-3204432") == {"removed": "mood_lamp-3204432"}
    assert not path.exists() and "mood_lamp-3204432" not in ops.profile_types()
    assert audit_events(ops) == ["profile-remove", "profile-import"]       # newest first


def test_shipped_profiles_cannot_be_removed_or_shadowed(ops):
    with pytest.raises(ConfigError) as e:
        ops.profile_remove("camera")
    assert "shipped" in str(e.value) and "camera.toml" in str(e.value)
    with pytest.raises(ConfigError) as e:
        ops.profile_import(LAMP_TEXT, "lamp.json", type="camera")
    assert "lamp.json" in str(e.value) and "shipped" in str(e.value) and "camera.toml" in str(e.value)
    with pytest.raises(ConfigError) as e:
        ops.profile_import('type = "plug"\n[postures.normal]\nanti_spoof = {}\n', "plug.toml")
    assert "plug.toml" in str(e.value) and "shipped" in str(e.value)
    assert not installed_dir(ops).exists()
    with pytest.raises(ConfigError) as e:
        ops.profile_remove("toaster")
    assert "'toaster'" in str(e.value)


def nothing_installed(ops: Ops, before: list[str]) -> None:
    assert ops.profile_types() == before
    directory = installed_dir(ops)
    assert not directory.exists() or list(directory.iterdir()) == []
    assert audit_events(ops) == []


@pytest.mark.parametrize("change, words", [
    (lambda t: t.replace('"mud-version" : 1,', '"mud-version" : 1', 1), ("malformed JSON", "line 4")),
    (lambda t: t.replace('"protocol" : 17,\n              "destination-ipv4-network" : "255',
                         '"protocl" : 17,\n              "destination-ipv4-network" : "255', 1),
     ("acl[0].aces.ace[3].matches.ipv4.protocl", "unknown YANG node")),
    (lambda t: t.replace('"protocol" : 17,\n              "destination-ipv4-network" : "255',
                         '"protocol" : 2,\n              "destination-ipv4-network" : "255', 1),
     ("acl[0].aces.ace[3].matches.ipv4.protocol", "unknown protocol 2")),
    (lambda t: t.replace('"local-networks" : [ null ]', '"model" : "https://lsc.example.com/lamp"', 1),
     ("acl[0].aces.ace[3].matches.ietf-mud:mud.model", "unsupported")),
    (lambda t: t.replace('"operator" : "eq",\n                "port" : 443',
                         '"lower-port" : 443,\n                "upper-port" : 444', 1),
     ("acl[0].aces.ace[1].matches.tcp.destination-port", "port range 443-444")),
    (lambda t: t.replace('"ipv4-acl-type"', '"ipv6-acl-type"', 1), ("acl[0].type", "IPv6")),
])
def test_a_bad_mud_file_installs_nothing(ops, change, words):
    before = ops.profile_types()
    text = change(LAMP_TEXT)
    assert text != LAMP_TEXT
    with pytest.raises(ConfigError) as e:
        ops.profile_import(text, "lamp.json")
    assert str(e.value).startswith("lamp.json: "), str(e.value)
    for w in words:
        assert w in str(e.value), str(e.value)
    nothing_installed(ops, before)


def test_a_bad_toml_profile_installs_nothing(ops):
    before = ops.profile_types()
    head = 'type = "toaster"\n'
    for text, words in ((head + '[postures.normal]\nbogus = {}\n', ("unknown umbox",)),
                        (head + '[postures.normal]\nallowlist = {destinations = ["lan:99999/tcp"]}\n',
                         ("invalid port",)),
                        (head + 'mud_url = "http://x.example/t"\n[postures.normal]\nanti_spoof = {}\n',
                         ("mud_url", "https")),
                        ("type = [\n", ("toaster.toml",)),
                        ('type = "toaster"\n[postures.normal]\nanti_spoof = {}\n[[rules]]\nname = '
                         '"device-under-attack"\nwhen = {alert = {}}\nthen = [{set_posture = '
                         '{posture = "attack"}}]\n', ("device-under-attack",))):
        with pytest.raises(ConfigError) as e:
            ops.profile_import(text, "toaster.toml")
        for w in words:
            assert w in str(e.value), str(e.value)
    with pytest.raises(ConfigError) as e:
        ops.profile_import(LAMP_TEXT + " " * 1_000_000, "lamp.json")
    assert "lamp.json" in str(e.value) and "larger than" in str(e.value)
    nothing_installed(ops, before)


def test_a_toml_profile_imports_and_takes_the_type_given(ops):
    text = '# my toaster\ntype = "toaster"\ndescription = "a toaster"\n[postures.normal]\nanti_spoof = {}\n'
    assert ops.profile_import(text, "toaster.toml") == {
        "type": "toaster", "format": "toml", "notes": [],
        "path": str(installed_dir(ops) / "toaster.toml")}
    assert (installed_dir(ops) / "toaster.toml").read_text() == text        # as given, comments and all
    assert ops.profile_export("toaster")["text"] == text
    result = ops.profile_import(text, "toaster.toml", type="oven")
    assert result["type"] == "oven" and "rewritten" in result["notes"][0]
    assert profiles.load_profile(installed_dir(ops) / "oven.toml").type == "oven"
    assert {"toaster", "oven"} <= set(ops.profile_types())


def test_an_imported_profiles_postures_are_made_ready_in_the_data_path(ops):
    """Its connection-limit classes are made at the import, not by the first device moved to
    one of its postures (Dataplane.prepare)."""
    text = ('type = "kettle"\n[postures.normal]\nconn_limit = { concurrent = 7 }\n'
            '[postures.suspicious]\nconn_limit = { concurrent = 3, new_per_second = 1 }\n')
    ops.profile_import(text, "kettle.toml")
    limits = [s.get("conn_limit") for s in ops._sup.dp.prepared]
    assert any(c and c["concurrent"] == 7 for c in limits), limits
    assert any(c and (c["concurrent"], c["new_per_second"]) == (3, 1) for c in limits), limits


def test_reimporting_an_installed_type_replaces_it_unless_a_device_uses_it(ops):
    ops.profile_import(LAMP_TEXT, "lamp.json", type="lamp")
    assert "10.42.0.174:40572/tcp" in ops.profile_show("lamp")["postures"]["normal"]["allowlist"][
        "destinations"]
    ops.profile_import(LAMP_TEXT, "lamp.json", type="lamp", device_ip=LAMP_IP)     # the artefact goes
    assert "10.42.0.174:40572/tcp" not in ops.profile_show("lamp")["postures"]["normal"]["allowlist"][
        "destinations"]
    ops.device_add("lamp1", MAC, "198.18.0.40", type="lamp", approve=True)
    with pytest.raises(ConfigError) as e:
        ops.profile_import(LAMP_TEXT, "lamp.json", type="lamp")
    assert "lamp1" in str(e.value)


def test_export_as_mud_and_back(ops):
    ops.profile_import(LAMP_TEXT, "lamp.json", type="lamp", device_ip=LAMP_IP)
    exported = ops.profile_export("lamp", "mud")
    assert exported["format"] == "mud"
    doc = json.loads(exported["text"])
    assert doc["ietf-mud:mud"]["mud-url"] == "https://mood_lamp-3204432.com/mood_lamp-3204432"
    ops.profile_import(exported["text"], "lamp-export.json", type="lamp2")
    assert ops.profile_show("lamp2")["postures"]["normal"] == ops.profile_show("lamp")["postures"]["normal"]
    with pytest.raises(ConfigError) as e:
        ops.profile_export("camera", "mud")
    assert "mud_url" in str(e.value)
    assert json.loads(ops.profile_export("lamp", "mud", mud_url="https://example.com/lamp")["text"])
    with pytest.raises(ConfigError):
        ops.profile_export("lamp", "yaml")


def test_installed_profiles_outlive_a_restart(tmp_path):
    ops = Ops(supervisor(tmp_path))
    ops.profile_import(LAMP_TEXT, "lamp.json", type="lamp", device_ip=LAMP_IP)
    ops.device_add("lamp1", MAC, "198.18.0.40", type="lamp", approve=True)
    ops._sup.close()
    again = Supervisor(ops.cfg)            # as appliance.run builds it: Ops before attach
    held = again.profiles
    restarted = Ops(again)
    assert "lamp" in restarted.profile_types() and restarted.profile_show("lamp")["source"] == "installed"
    assert again.profiles is held          # updated in place (the adapters hold it)
    assert [s.name for s in again.wanted()] == ["lamp1"]
    again.close()


# -- the command, over the control socket -----------------------------------------------------

@pytest.fixture
def served(ops, tmp_path):
    """The ops behind a real control socket, served by a loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    path = str(tmp_path / "kalki.sock")
    server = asyncio.run_coroutine_threadsafe(asyncio.start_unix_server(
        lambda r, w: control.serve_client(ops, r, w), path=path), loop).result(10)
    yield path, ops

    async def shut() -> None:
        server.close()
        await server.wait_closed()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:          # connections the client closed, not yet seen to end
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


def test_the_command_imports_lists_shows_exports_and_removes(served, capsys, tmp_path):
    sock, ops = served
    code, out, err = kalki(capsys, sock, "profile", "import", str(LAMP_FILE), "--device-ip", LAMP_IP)
    assert code == 0 and out == "mood_lamp-3204432\n"
    assert "own address" in err and "LAN chatter" in err          # the notes, on stderr

    code, out, _ = kalki(capsys, sock, "profile", "list", "--json")
    rows = {r["type"]: r for r in json.loads(out)}
    assert code == 0 and rows["mood_lamp-3204432"]["source"] == "installed"
    code, out, _ = kalki(capsys, sock, "profile", "list")
    assert code == 0 and any(line.startswith("mood_lamp-3204432") and "installed" in line
                             for line in out.splitlines())
    code, out, _ = kalki(capsys, sock, "profile", "show", "mood_lamp-3204432")
    assert code == 0 and json.loads(out)["mud_url"].startswith("https://mood_lamp-3204432.com")

    code, out, _ = kalki(capsys, sock, "profile", "export", "mood_lamp-3204432", "--format", "mud")
    assert code == 0 and json.loads(out)["ietf-mud:mud"]["from-device-policy"]
    exported = tmp_path / "exported.json"
    exported.write_text(out)
    code, out, _ = kalki(capsys, sock, "profile", "import", str(exported), "--type", "lamp_again")
    assert code == 0 and out == "lamp_again\n"
    code, out, _ = kalki(capsys, sock, "profile", "export", "lamp_again", "--format", "toml")
    assert code == 0 and out == (installed_dir(ops) / "lamp_again.toml").read_text()

    code, out, _ = kalki(capsys, sock, "device", "add", "lamp1", MAC, "198.18.0.40", "--type",
                         "lamp_again", "--approve")
    assert code == 0
    code, _, err = kalki(capsys, sock, "profile", "remove", "lamp_again")
    assert code == 2 and "lamp1" in err
    kalki(capsys, sock, "device", "remove", "lamp1")
    code, out, _ = kalki(capsys, sock, "profile", "remove", "lamp_again")
    assert code == 0 and out == "removed lamp_again\n"
    code, _, err = kalki(capsys, sock, "profile", "remove", "camera")
    assert code == 2 and "shipped" in err


def test_the_command_reports_a_bad_file_by_name_and_path(served, capsys, tmp_path):
    sock, ops = served
    bad = tmp_path / "lamp.json"
    bad.write_text(LAMP_TEXT.replace('"protocol" : 6,\n              "destination-ipv4-network" : "18.',
                                     '"protocol" : 6,\n              "dscp" : 1,\n'
                                     '              "destination-ipv4-network" : "18.', 1))
    code, out, err = kalki(capsys, sock, "profile", "import", str(bad))
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"{bad}: $.ietf-access-control-list:access-lists.acl[0].aces.ace[1].matches.ipv4.dscp: " \
           "unsupported" in err
    big = tmp_path / "big.json"
    big.write_text(LAMP_TEXT + " " * 1_000_001)
    code, _, err = kalki(capsys, sock, "profile", "import", str(big))
    assert code == 2 and str(big) in err
    assert not installed_dir(ops).exists()


def test_a_large_mud_file_goes_through_the_control_socket(served, capsys, tmp_path):
    """Longer than the socket reader's 64 KiB line: the control socket reads it whole. (Its
    destinations are names: umbox.parse_destination must take them.)"""
    sock, ops = served
    doc = json.loads(LAMP_TEXT)
    aces = doc["ietf-access-control-list:access-lists"]["acl"][0]["aces"]["ace"]
    for i in range(400):
        aces.append({"name": f"cloud-{i}", "matches": {
            "ipv4": {"protocol": 6, "ietf-acldns:dst-dnsname": f"node{i}.cloud.example.com"},
            "tcp": {"destination-port": {"operator": "eq", "port": 443}}},
            "actions": {"forwarding": "accept"}})
    path = tmp_path / "large.json"
    path.write_text(json.dumps(doc, indent=4))
    assert path.stat().st_size > 100_000
    code, out, err = kalki(capsys, sock, "profile", "import", str(path), "--type", "large")
    assert code == 0 and out == "large\n", err
    assert len(ops.profile_show("large")["postures"]["normal"]["allowlist"]["destinations"]) == 403


def test_an_import_the_disk_or_the_store_refuses_leaves_nothing(ops, monkeypatch):
    before = ops.profile_types()
    directory = installed_dir(ops)
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.write_text("not a directory")          # the profile cannot be written
    with pytest.raises(ConfigError) as e:
        ops.profile_import(LAMP_TEXT, "lamp.json", type="lamp")
    assert str(e.value).startswith(f"{directory / 'lamp.toml'}: cannot write the profile")
    assert ops.profile_types() == before and audit_events(ops) == []
    directory.unlink()

    def refused(*args, **kwargs):
        raise StoreError("the store refuses the write")
    monkeypatch.setattr(ops._sup.store, "audit", refused)      # the record cannot be kept
    with pytest.raises(StoreError):
        ops.profile_import(LAMP_TEXT, "lamp.json", type="lamp")
    nothing_installed(ops, before)
