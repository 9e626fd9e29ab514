"""RFC 8520's device abstractions in the profile language and in enforcement: same-manufacturer,
{manufacturer = HOST} and my-controller destinations (appliance.dataplane.umbox), the site's
my_controllers (appliance.config), and the supervisor giving them the addresses of the approved
devices by MUD authority, re-applying a maker's devices when one comes, moves or goes. A fake
data path (tests/fakes.py) and the data path's own compile; no root needed. The MUD importer's
side is tests/test_mud.py."""
from __future__ import annotations

import ipaddress
import json

import pytest
from fakes import supervisor

from appliance import config
from appliance.dataplane import umbox
from appliance.dataplane.api import Dataplane, DeviceSpec, GatewaySettings
from appliance.errors import ConfigError
from appliance.supervisor.ops import Ops

URL = "https://things.example.com/plug2000"         # the plugs' MUD URL: authority things.example.com


def net(*addresses: str) -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network(f"{a}/32") for a in addresses]


# -- the profile language ----------------------------------------------------------------------

def test_the_abstractions_parse_as_strings_and_tables():
    p = umbox.parse_destination
    assert p("same-manufacturer:6668/tcp") == umbox.Destination(None, 6, 6668, same_manufacturer=True)
    assert p({"same_manufacturer": True, "proto": "tcp", "port": 6668}) == p("same-manufacturer:6668/tcp")
    assert p("my-controller") == umbox.Destination(None, 0, 0, my_controller=True)
    assert p({"my_controller": True, "proto": "udp"}) == umbox.Destination(None, 17, 0, my_controller=True)
    assert p({"manufacturer": "Hubs.Example.NET.", "proto": "udp", "port": 5683}) == \
        umbox.Destination(None, 17, 5683, manufacturer="hubs.example.net")
    assert p("@phone:8080/tcp").controller == "phone"         # the site's classes are unchanged


@pytest.mark.parametrize("entry, message", [
    ({"same_manufacturer": False}, "same_manufacturer must be true"),
    ({"my_controller": "yes"}, "my_controller must be true"),
    ({"manufacturer": "*.example.com"}, "manufacturer: expected the host"),
    ({"manufacturer": 7}, "manufacturer: expected the host"),
    ({"manufacturer": "bad_host!.example"}, "manufacturer: 'bad_host!.example'"),
    ({"manufacturer": "a.example", "lan": True}, "exactly one of address, name, lan, controller, "
                                                 "same_manufacturer, manufacturer or my_controller"),
    ({"same_manufacturer": True, "makers": 2}, r"unknown key\(s\) \['makers'\]"),
    ("same-manufacturer:80/icmp", "a port needs proto tcp or udp"),
    ("my-controller:x/tcp", "invalid port 'x'"),
])
def test_bad_abstractions_name_the_culprit(entry, message):
    with pytest.raises(ConfigError, match=message) as e:
        umbox.compile_stack({"allowlist": {"destinations": [entry]}}, where="plug.toml: ")
    assert str(e.value).startswith("plug.toml: umbox allowlist, destination ")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "kalki.toml"
    path.write_text(text)
    return str(path)


def test_the_site_names_my_controllers_per_mud_url(tmp_path):
    cfg = config.load(write(tmp_path, f'[my_controllers]\n"{URL}" = ["198.18.0.60", "hub.example.com"]\n'))
    assert cfg.my_controllers == {URL: ["198.18.0.60", "hub.example.com"]}
    assert "my_controllers = {}" in config.defaults_toml()       # documented with the others
    assert config.load(write(tmp_path, config.dump(cfg))).my_controllers == cfg.my_controllers
    checked = umbox.check_my_controllers(cfg.my_controllers, "config: my_controllers")
    assert checked[URL] == [umbox.Destination(net("198.18.0.60")[0]),
                            umbox.Destination(None, name="hub.example.com")]


@pytest.mark.parametrize("text, message", [
    ('my_controllers = ["198.18.0.60"]', "my_controllers: expected dict"),
    ('[my_controllers]\n"http://things.example.com/x" = ["198.18.0.60"]',
     "my_controllers: key 'http://things.example.com/x': expected an https URL"),
    (f'[my_controllers]\n"{URL}" = "198.18.0.60"', f'my_controllers."{URL}": expected a list of hosts'),
    (f'[my_controllers]\n"{URL}" = ["198.18.0.600"]', f"my_controllers.\"{URL}\": host '198.18.0.600'"),
    (f'[my_controllers]\n"{URL}" = ["same-manufacturer"]',
     f"my_controllers.\"{URL}\": host 'same-manufacturer': expected an address"),
    (f'[my_controllers]\n"{URL}" = [7]', f"my_controllers.\"{URL}\": host 7: expected a string"),
])
def test_bad_my_controllers_name_the_key(tmp_path, text, message):
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(e.value).startswith(f"{path}: "), str(e.value)
    assert message in str(e.value), str(e.value)


# -- compiled: the addresses they stand for ----------------------------------------------------

STACK = {"allowlist": {"destinations": [
    "cloud.example.com:443/tcp", "same-manufacturer:6668/tcp",
    {"manufacturer": "hubs.example.net", "proto": "udp", "port": 5683}, "my-controller:8443/tcp"]}}
PEERS = {"things.example.com": ["198.18.0.5", "198.18.0.6"], "hubs.example.net": ["198.18.0.9"]}
MINE = umbox.check_my_controllers({URL: ["198.18.0.60", "hub.example.com"]}, "config: my_controllers")


def test_compiled_the_abstractions_become_the_peers_and_controllers_addresses():
    c = umbox.compile_stack(STACK, "device plug1: ", None, MINE, URL, PEERS)
    assert [(d.network, d.proto, d.port) for d in c.destinations] == [
        *((n, 6, 6668) for n in net("198.18.0.5", "198.18.0.6")), (net("198.18.0.9")[0], 17, 5683),
        (net("198.18.0.60")[0], 6, 8443)]
    assert [(d.name, d.proto, d.port) for d in c.names] == [("cloud.example.com", 6, 443),
                                                            ("hub.example.com", 6, 8443)]
    assert c.missing_mud == []


def test_compiled_what_stands_for_nothing_opens_nothing_and_is_reported():
    alone = umbox.compile_stack(STACK)                     # a profile on its own
    assert alone.destinations == [] and [d.name for d in alone.names] == ["cloud.example.com"]
    assert alone.missing_mud == ["same-manufacturer", "manufacturer hubs.example.net", "my-controller"]
    other = umbox.compile_stack(STACK, "", None, MINE, "https://other.example.org/x",
                                {"things.example.com": ["198.18.0.5"]})
    assert other.destinations == []     # no device of other.example.org, of hubs.example.net
    assert other.missing_mud == ["same-manufacturer", "manufacturer hubs.example.net", "my-controller"]


def test_the_data_path_compiles_a_device_with_its_peers_and_the_site_s_controllers():
    """Dataplane._compile (what apply and reconcile use), without a kernel: the settings give
    my_controllers, the spec the device's MUD URL and peers; the cache tells peers apart."""
    dp = Dataplane("unit", settings=GatewaySettings(my_controllers=MINE))
    spec = DeviceSpec("plug1", "02:00:00:00:00:05", "198.18.0.5", STACK, 1, mud_url=URL, peers=PEERS)
    assert {d.network for d in dp._compile(spec).destinations} == set(
        net("198.18.0.5", "198.18.0.6", "198.18.0.9", "198.18.0.60"))
    moved = DeviceSpec("plug1", "02:00:00:00:00:05", "198.18.0.5", STACK, 1, mud_url=URL,
                       peers={"things.example.com": ["198.18.0.5", "198.18.0.7"]})
    assert {d.network for d in dp._compile(moved).destinations} == set(
        net("198.18.0.5", "198.18.0.7", "198.18.0.60"))


def test_the_same_stack_object_is_compiled_once_and_again_when_it_changed():
    """A profile's stack is one object: the data path finds it compiled by that, unless the
    object was edited since, or the device's MUD URL is another."""
    dp = Dataplane("unit")
    stack = {"allowlist": {"destinations": ["cloud.example.com:443/tcp"]}}
    spec = DeviceSpec("cam1", "02:00:00:00:00:05", "198.18.0.5", stack, 1)
    first = dp._compile(spec)
    assert dp._compile(DeviceSpec("cam2", "02:00:00:00:00:06", "198.18.0.6", stack, 1)) is first
    assert dp._compile(DeviceSpec("cam2", "02:00:00:00:00:06", "198.18.0.6", stack, 1,
                                  mud_url=URL)) is not first
    stack["allowlist"]["destinations"].append("ntp.example.com:123/udp")     # edited in place
    again = dp._compile(spec)
    assert again is not first and [d.name for d in again.names] == ["cloud.example.com", "ntp.example.com"]


def test_named_authorities_is_what_a_stack_names():
    assert umbox.named_authorities(STACK, "things.example.com") == {"things.example.com", "hubs.example.net"}
    assert umbox.named_authorities(STACK, None) == {"hubs.example.net"}
    assert umbox.named_authorities({"anti_spoof": {}}, "things.example.com") == set()


# -- the supervisor: MUD authorities, and re-applying a maker's devices ------------------------

def mud_file() -> str:
    """A plug that talks to its cloud and to the plugs of its maker (TCP 6668)."""
    def ace(name, matches):
        return {"name": name, "matches": matches, "actions": {"forwarding": "accept"}}
    aces = [ace("cloud", {"ipv4": {"protocol": 6, "ietf-acldns:dst-dnsname": "api.plugcloud.example.com"},
                          "tcp": {"destination-port": {"operator": "eq", "port": 443}}}),
            ace("same", {"ietf-mud:mud": {"same-manufacturer": [None]}, "ipv4": {"protocol": 6},
                         "tcp": {"destination-port": {"operator": "eq", "port": 6668}}})]
    return json.dumps({
        "ietf-mud:mud": {"mud-version": 1, "mud-url": URL, "systeminfo": "a plug",
                         "from-device-policy": {"access-lists": {"access-list": [{"name": "fr"}]}}},
        "ietf-access-control-list:acls": {"acl": [{"name": "fr", "aces": {"ace": aces}}]}})


HUB = """type = "hub"
description = "a hub that switches the plugs of things.example.com"
[postures.normal]
anti_spoof = {}
allowlist = {destinations = [{manufacturer = "things.example.com", proto = "tcp", port = 6668}]}
"""
PLUG1 = ("02:00:00:00:00:05", "198.18.0.5")
PLUG2 = ("02:00:00:00:00:06", "198.18.0.6")


@pytest.fixture
def sup(tmp_path):
    s = supervisor(tmp_path)
    ops = Ops(s)
    assert ops.profile_import(mud_file(), "plug2000.json")["type"] == "plug2000"
    assert ops.profile_import(HUB, "hub.toml")["type"] == "hub"
    s.add_device("plug1", *PLUG1, "plug2000", approve=True)
    s.add_device("plug2", *PLUG2, "plug2000", approve=True)
    s.add_device("hub1", "02:00:00:00:00:09", "198.18.0.9", "hub", approve=True)
    s.add_device("cam1", "02:00:00:00:00:0a", "198.18.0.10", "camera", approve=True)
    yield s
    s.store.close()


def opens(sup, name: str) -> set:
    """The addresses the device's spec, as the supervisor handed it over, opens."""
    spec = sup.dp.devices[name]
    return {str(d.network.network_address)
            for d in umbox.compile_stack(spec.stack, "", None, None, spec.mud_url, spec.peers).destinations}


@pytest.fixture
def applied(sup, monkeypatch):
    """The names the data path is given, in order, from now on."""
    names: list[str] = []
    apply = sup.dp.apply
    monkeypatch.setattr(sup.dp, "apply", lambda spec: (names.append(spec.name), apply(spec))[1])
    return names


def test_devices_of_one_maker_open_each_other(sup):
    assert sup.mud_url_of(sup.device("plug1")) == URL
    assert sup.dp.devices["plug1"].peers == {"things.example.com": ["198.18.0.5", "198.18.0.6"]}
    assert opens(sup, "plug1") == opens(sup, "plug2") == {"198.18.0.5", "198.18.0.6"}
    assert opens(sup, "hub1") == {"198.18.0.5", "198.18.0.6"}          # {manufacturer = ...}
    assert sup.dp.devices["cam1"].peers == {}                           # names no maker
    # at start, the data path is given the same (reconcile)
    wanted = {s.name: s for s in sup.wanted()}
    assert wanted["hub1"].peers == sup.dp.devices["hub1"].peers


def test_a_device_that_moves_has_its_maker_s_devices_re_applied(sup, applied):
    sup.set_posture("plug1", "suspicious", "watch it", for_seconds=3600)
    expires = sup.device("plug1")["posture_expires"]
    applied.clear()
    sup.discovered(PLUG2[0], "198.18.0.7")
    assert applied[0] == "plug2" and sorted(applied[1:]) == ["hub1", "plug1"]    # not cam1
    assert opens(sup, "plug1") == opens(sup, "hub1") == {"198.18.0.5", "198.18.0.7"}
    # only the data path: plug1 keeps its posture and when it ends
    assert sup.dp.devices["plug1"].stack == sup.profiles["plug2000"].stack("suspicious")
    assert (sup.posture("plug1"), sup.device("plug1")["posture_expires"]) == ("suspicious", expires)


def test_an_approved_or_removed_device_has_its_maker_s_devices_re_applied(sup, applied):
    sup.add_device("plug3", "02:00:00:00:00:08", "198.18.0.8", "plug2000")
    assert applied == []                                   # not approved: no device of the maker yet
    sup.approve("plug3", "plug2000")
    assert applied[0] == "plug3" and sorted(applied[1:]) == ["hub1", "plug1", "plug2"]
    assert opens(sup, "hub1") == {"198.18.0.5", "198.18.0.6", "198.18.0.8"}
    applied.clear()
    sup.remove("plug2")
    assert sorted(applied) == ["hub1", "plug1", "plug3"]
    assert opens(sup, "plug1") == {"198.18.0.5", "198.18.0.8"}


def test_the_mud_url_a_device_sends_counts_only_without_its_profile_s(sup, applied):
    # a plug that claims another maker in DHCP stays its profile's: nothing changes
    sup.discovered(PLUG2[0], PLUG2[1], {"mud_url": "https://other.example.org/x"})
    assert sup.mud_url_of(sup.device("plug2")) == URL and applied == []
    # a device of a type without a mud_url is its DHCP MUD URL's maker's
    sup.add_device("lamp1", "02:00:00:00:00:0b", "198.18.0.11", "generic")
    sup.discovered("02:00:00:00:00:0b", "198.18.0.11", {"mud_url": "https://things.example.com/lamp"})
    assert applied == []                                   # not approved yet
    sup.approve("lamp1", "generic")
    assert sorted(applied[1:]) == ["hub1", "plug1", "plug2"]
    assert "198.18.0.11" in opens(sup, "hub1")
    applied.clear()
    sup.discovered("02:00:00:00:00:0b", "198.18.0.11", {"mud_url": "https://lamps.example.org/lamp"})
    assert sorted(applied) == ["hub1", "lamp1", "plug1", "plug2"]
    assert "198.18.0.11" not in opens(sup, "hub1")
    assert sup.dp.devices["lamp1"].mud_url == "https://lamps.example.org/lamp"


def test_the_page_says_them_in_words():
    from appliance.faces.web import views
    w = views.destination_words
    assert w("same-manufacturer:6668/tcp") == \
        "the devices of the same manufacturer (MUD URL host) on TCP 6668"
    assert w({"same_manufacturer": True}) == \
        "the devices of the same manufacturer (MUD URL host) (any protocol)"
    assert w({"manufacturer": "hubs.example.net", "proto": "udp", "port": 5683}) == \
        "the devices of manufacturer hubs.example.net (MUD URL host) on UDP 5683"
    assert w("my-controller:8443/tcp") == "the site's controllers for the device's MUD URL on TCP 8443"
    assert w({"my_controller": True, "proto": "tcp"}) == \
        "the site's controllers for the device's MUD URL on TCP (any port)"
