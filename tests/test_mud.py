"""RFC 8520 MUD files: the importer (appliance.policy.mud) on a real file made by mudgee, on
hand-written files with DNS names, on bad input (refused, naming the file and the JSON path),
and the export back to MUD, which imports to the same destinations. No root needed.

Name and lan destinations are the data path's to accept (appliance.dataplane.umbox): the
assertions that need its parser call umbox.parse_destination or load the profile
(loads_as_a_profile); ietf-acldns names are also checked with it."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from appliance.dataplane import umbox
from appliance.errors import ConfigError
from appliance.policy import mud, profiles

DATA = Path(__file__).resolve().parent / "data" / "mud"
LAMP_FILE = DATA / "mood_lamp-3204432Mud.json"
LAMP = json.loads(LAMP_FILE.read_text())
ACLS = "ietf-access-control-list:access-lists"     # what mudgee writes
ACL_CONTAINER = "ietf-access-control-list:acls"    # what the export writes (RFC 8519's)
FROM_ACES = f"$.{ACLS}.acl[0].aces.ace"
TO_ACES = f"$.{ACLS}.acl[1].aces.ace"


def lamp() -> dict:
    return copy.deepcopy(LAMP)


def from_aces(doc: dict) -> list[dict]:
    return doc[ACLS]["acl"][0]["aces"]["ace"]


def to_aces(doc: dict) -> list[dict]:
    return doc[ACLS]["acl"][1]["aces"]["ace"]


def imported(doc_or_text, device_ip=None, type_name="lamp", source="lamp.json"):
    text = doc_or_text if isinstance(doc_or_text, (str, bytes)) else json.dumps(doc_or_text)
    return mud.to_profile(mud.parse_mud(text, source), type_name, device_ip)


def destinations(profile: dict, posture: str = "normal") -> list:
    return profile["postures"][posture]["allowlist"]["destinations"]


def loads_as_a_profile(profile: dict) -> profiles.Profile:
    """What import writes is a profile the supervisor loads (umbox validation included)."""
    text = profiles.dump_profile(profile, ["a test"])
    return profiles.profile_from_text(text, f"{profile['type']}.toml")


def note_about(notes: list[str], *words: str) -> str:
    found = [n for n in notes if all(w in n for w in words)]
    assert len(found) == 1, (words, notes)
    return found[0]


# -- the real file: a mood lamp, as UNSW's mudgee wrote it ----------------------------------

def test_the_real_mudgee_file_becomes_a_profile():
    profile, notes = imported(LAMP_FILE.read_bytes(), device_ip="10.42.0.174",
                              type_name="mood_lamp")
    assert profile["type"] == "mood_lamp"
    assert profile["mud_url"] == "https://mood_lamp-3204432.com/mood_lamp-3204432"
    assert "mood_lamp-3204432" in profile["description"]            # systeminfo
    assert "https://mood_lamp-3204432.com/mood_lamp-3204432" in profile["description"]
    # The two cloud flows the lamp opens, and nothing else.
    assert destinations(profile) == ["18.185.182.159:443/tcp", "3.124.225.12:8886/tcp"]
    normal = profile["postures"]["normal"]
    assert list(normal) == ["anti_spoof", "lateral_block", "port_scan", "allowlist"]
    suspicious = profile["postures"]["suspicious"]
    assert set(suspicious) == set(normal) | {"rate_limit"}
    assert destinations(profile, "suspicious") == destinations(profile)
    assert profile["postures"]["attack"] == {"quarantine": {"management": True}}
    loaded = loads_as_a_profile(profile)
    assert loaded.mud_url == profile["mud_url"]
    assert loaded.stack("normal")["allowlist"]["destinations"] == destinations(profile)


def test_the_real_file_s_notes_say_what_became_of_every_other_entry():
    _, notes = imported(LAMP, device_ip="10.42.0.174")
    # mudgee's artefact: a "destination" that is the lamp's own address.
    artefact = note_about(notes, "'from-ipv4-mood_lamp-3204432-0'")
    assert "10.42.0.174" in artefact and "own address" in artefact and "dropped" in artefact
    # the broadcast to 255.255.255.255 on UDP 6667 (Tuya's discovery): LAN chatter.
    chatter = note_about(notes, "'from-ipv4-mood_lamp-3204432-3'")
    assert "255.255.255.255" in chatter and "LAN chatter" in chatter
    # the gateway controller (its DHCP answers, from port 67): the gateway's own.
    gateway = note_about(notes, "'to-ipv4-mood_lamp-3204432-0'")
    assert "gateway" in gateway and "port 67" in gateway
    # the cloud's replies on 443: replies to the flow the lamp opens.
    replies = note_about(notes, "'to-ipv4-mood_lamp-3204432-1'")
    assert "replies" in replies and "'from-ipv4-mood_lamp-3204432-1'" in replies
    assert len(notes) == 4


def test_without_the_device_address_a_private_destination_is_kept_and_flagged():
    """The rule is exact: a private /32 on a high port is not enough to call it the device."""
    profile, notes = imported(LAMP)
    assert destinations(profile) == ["10.42.0.174:40572/tcp", "18.185.182.159:443/tcp",
                                     "3.124.225.12:8886/tcp"]
    kept = note_about(notes, "'from-ipv4-mood_lamp-3204432-0'")
    assert "private address 10.42.0.174" in kept and "--device-ip" in kept
    assert not any("artefact" in n for n in notes)


def test_the_device_s_address_is_known_from_a_to_device_entry_too():
    doc = lamp()
    to_aces(doc)[1]["matches"]["ipv4"]["destination-ipv4-network"] = "10.42.0.174/32"
    profile, notes = imported(doc)
    assert destinations(profile) == ["18.185.182.159:443/tcp", "3.124.225.12:8886/tcp"]
    artefact = note_about(notes, "'from-ipv4-mood_lamp-3204432-0'", "own address")
    assert "to-device ACE 'to-ipv4-mood_lamp-3204432-1'" in artefact


def test_the_device_s_address_is_known_from_a_from_device_source():
    doc = lamp()
    from_aces(doc)[1]["matches"]["ipv4"]["source-ipv4-network"] = "10.42.0.174/32"
    profile, notes = imported(doc)
    assert "10.42.0.174:40572/tcp" not in destinations(profile)
    assert "the source of from-device ACE 'from-ipv4-mood_lamp-3204432-1'" in \
        note_about(notes, "own address")


def test_the_type_name_defaults_to_the_mud_url_s_last_segment():
    assert mud.default_type_name(mud.parse_mud(LAMP_FILE.read_text(), "lamp.json")) == "mood_lamp-3204432"


# -- DNS names, the LAN, the RFC's own spelling ----------------------------------------------

def ace(name: str, matches: dict, action: str = "accept") -> dict:
    return {"name": name, "matches": matches, "actions": {"forwarding": action}}


def mud_file(from_device: list[dict], to_device: list[dict] = (), container: str = ACLS,
             url: str = "https://things.example.com/plug2000") -> dict:
    policies = {"from-device-policy": {"access-lists": {"access-list": [{"name": "fr"}]}}}
    acls = [{"name": "fr", "type": "ipv4-acl-type", "aces": {"ace": list(from_device)}}]
    if to_device:
        policies["to-device-policy"] = {"access-lists": {"access-list": [{"name": "to"}]}}
        acls.append({"name": "to", "type": "ipv4-acl-type", "aces": {"ace": list(to_device)}})
    return {"ietf-mud:mud": {"mud-version": 1, "mud-url": url, "last-update": "2024-01-01T00:00:00Z",
                             "cache-validity": 48, "is-supported": True,
                             "systeminfo": "A plug that talks to its cloud", **policies},
            container: {"acl": acls}}


CLOUD = ace("cloud", {"ipv4": {"protocol": 6, "ietf-acldns:dst-dnsname": "api.plugcloud.example.com"},
                      "tcp": {"destination-port": {"operator": "eq", "port": 443},
                              "ietf-mud:direction-initiated": "from-device"}})
NTP = ace("ntp", {"ipv4": {"protocol": 17, "ietf-acldns:dst-dnsname": "pool.ntp.org"},
                  "udp": {"destination-port": {"operator": "eq", "port": 123}}})
CLOUD_REPLIES = ace("cloud-back", {
    "ipv4": {"protocol": 6, "ietf-acldns:src-dnsname": "api.plugcloud.example.com"},
    "tcp": {"source-port": {"operator": "eq", "port": 443}, "ietf-mud:direction-initiated": "from-device"}})
LOCAL = ace("local", {"ietf-mud:mud": {"local-networks": [None]}, "ipv4": {"protocol": 6},
                      "tcp": {"destination-port": {"operator": "eq", "port": 6668}}})
FROM_LAN = ace("from-lan", {"ietf-mud:mud": {"local-networks": [None]}, "ipv4": {"protocol": 6},
                            "tcp": {"destination-port": {"operator": "eq", "port": 6668},
                                    "ietf-mud:direction-initiated": "to-device"}})


LANTERN = ace("lantern", {"ipv4": {"ietf-acldns:dst-dnsname": "lantern.example.com"}})


def test_dns_names_become_name_destinations():
    profile, notes = imported(mud_file([CLOUD, NTP, LANTERN], [CLOUD_REPLIES]), type_name="plug2000")
    assert destinations(profile) == ["api.plugcloud.example.com:443/tcp", "pool.ntp.org:123/udp",
                                     "lantern.example.com"]
    assert "lateral_block" in profile["postures"]["normal"]        # a name is not the LAN
    assert "replies" in note_about(notes, "'cloud-back'")
    # the data path's parser reads them as names (umbox.parse_destination)
    parsed = [umbox.parse_destination(d) for d in destinations(profile)]
    assert [(d.name, d.proto, d.port) for d in parsed] == [("api.plugcloud.example.com", 6, 443),
                                                           ("pool.ntp.org", 17, 123),
                                                           ("lantern.example.com", 0, 0)]
    loads_as_a_profile(profile)


def test_local_networks_become_lan_entries_without_lateral_block():
    profile, notes = imported(mud_file([CLOUD, LOCAL], [FROM_LAN]))
    assert destinations(profile) == ["api.plugcloud.example.com:443/tcp", "lan:6668/tcp"]
    assert "lateral_block" not in profile["postures"]["normal"]
    assert "lateral_block" not in profile["postures"]["suspicious"]
    assert "'local'" in note_about(notes, "no lateral_block")
    inbound = note_about(notes, "'from-lan'")
    assert "lateral" in inbound and "nothing" in inbound
    assert umbox.parse_destination("lan:6668/tcp").lan
    loads_as_a_profile(profile)


def test_the_rfc_s_own_spelling_is_read_too():
    """RFC 8519's container is "acls", and identities may carry their module's prefix."""
    doc = mud_file([CLOUD], container="ietf-access-control-list:acls")
    doc["ietf-access-control-list:acls"]["acl"][0]["aces"]["ace"][0]["actions"]["forwarding"] = \
        "ietf-access-control-list:accept"
    doc["ietf-access-control-list:acls"]["acl"][0]["type"] = "ietf-access-control-list:ipv4-acl-type"
    assert destinations(imported(doc)[0]) == ["api.plugcloud.example.com:443/tcp"]


def test_gateway_controllers_and_trailing_drops_add_nothing_and_say_so():
    dns = ace("dns", {"ietf-mud:mud": {"controller": "urn:ietf:params:mud:dns"}, "ipv4": {"protocol": 17},
                      "udp": {"destination-port": {"operator": "eq", "port": 53}}})
    web = ace("gw-web", {"ietf-mud:mud": {"controller": "urn:ietf:params:mud:gateway"},
                         "ipv4": {"protocol": 6}, "tcp": {"destination-port": {"port": 8080}}})
    rest = ace("rest", {}, "drop")
    profile, notes = imported(mud_file([CLOUD, dns, web, rest]))
    assert destinations(profile) == ["api.plugcloud.example.com:443/tcp"]
    assert "gateway guard" in note_about(notes, "'dns'")
    assert "refuse" in note_about(notes, "'gw-web'")
    assert "refuses whatever it does not list" in note_about(notes, "'rest'")


def test_an_entry_without_a_destination_is_any_address():
    profile, notes = imported(mud_file([ace("https", {"tcp": {"destination-port": {"port": 443}}})]))
    assert destinations(profile) == ["0.0.0.0/0:443/tcp"]
    assert "any address" in note_about(notes, "'https'")


# -- bad input: refused, naming the file and the JSON path; never skipped ----------------------

def refused(doc_or_text, *words: str, source: str = "lamp.json") -> str:
    text = doc_or_text if isinstance(doc_or_text, (str, bytes)) else json.dumps(doc_or_text)
    with pytest.raises(ConfigError) as e:
        mud.parse_mud(text, source)
    message = str(e.value)
    assert message.startswith(f"{source}: "), message
    for w in words:
        assert w in message, message
    return message


def test_malformed_json_is_refused_with_line_and_column():
    refused(LAMP_FILE.read_text().replace('"mud-version" : 1,', '"mud-version" : 1', 1),
            "malformed JSON", "line 4", "column")


def test_a_duplicate_member_is_refused():
    refused('{"ietf-mud:mud": {"mud-version": 1, "mud-version": 1}}', "malformed JSON", "'mud-version'",
            "twice")


def test_an_unknown_yang_node_is_refused():
    doc = lamp()
    from_aces(doc)[1]["matches"]["ipv4"]["protocl"] = 6
    refused(doc, f"{FROM_ACES}[1].matches.ipv4.protocl: unknown YANG node 'protocl'")
    doc = lamp()
    doc["ietf-mud:mud"]["vendor"] = "LSC"
    refused(doc, "$.ietf-mud:mud.vendor: unknown YANG node")
    doc = lamp()
    doc["extra"] = {}
    refused(doc, "$.extra: unknown YANG node")


def test_an_unknown_protocol_is_refused():
    doc = lamp()
    from_aces(doc)[3]["matches"]["ipv4"]["protocol"] = 2       # IGMP
    refused(doc, f"{FROM_ACES}[3].matches.ipv4.protocol: ", "unknown protocol 2")


def test_ipv6_is_refused():
    doc = lamp()
    doc[ACLS]["acl"][0]["type"] = "ipv6-acl-type"
    refused(doc, f"$.{ACLS}.acl[0].type: unsupported", "IPv6")
    doc = lamp()
    from_aces(doc)[1]["matches"]["ipv6"] = {"destination-ipv6-network": "2001:db8::/32"}
    refused(doc, f"{FROM_ACES}[1].matches.ipv6: unsupported", "IPv6")


def test_a_port_range_is_refused_unless_it_is_one_port():
    doc = lamp()
    from_aces(doc)[1]["matches"]["tcp"]["destination-port"] = {"lower-port": 443, "upper-port": 450}
    refused(doc, f"{FROM_ACES}[1].matches.tcp.destination-port: unsupported: port range 443-450")
    from_aces(doc)[1]["matches"]["tcp"]["destination-port"] = {"lower-port": 443, "upper-port": 443}
    profile, _ = imported(doc, device_ip="10.42.0.174")
    assert "18.185.182.159:443/tcp" in destinations(profile)
    from_aces(doc)[1]["matches"]["tcp"]["destination-port"] = {"operator": "gte", "port": 1024}
    refused(doc, f"{FROM_ACES}[1].matches.tcp.destination-port.operator: unsupported: operator gte")


def test_model_matches_and_other_controllers_are_refused():
    for key, value, words in (("model", "https://lsc.example.com/lamp", "model"),
                              ("controller", "https://lsc.example.com/hub", "controller")):
        doc = lamp()
        from_aces(doc)[3]["matches"]["ietf-mud:mud"] = {key: value}
        refused(doc, f"{FROM_ACES}[3].matches.ietf-mud:mud.{key}: unsupported", words)


def test_bad_manufacturer_matches_are_refused():
    at = f"$.{ACLS}.acl[0].aces.ace[0].matches"
    for matches, words in (
            ({"ietf-mud:mud": {"same-manufacturer": True}},
             (f"{at}.ietf-mud:mud.same-manufacturer: ", "[null]")),
            ({"ietf-mud:mud": {"my-controller": "hub"}}, (f"{at}.ietf-mud:mud.my-controller: ", "[null]")),
            ({"ietf-mud:mud": {"manufacturer": "*.example.com"}},
             (f"{at}.ietf-mud:mud.manufacturer: ", "not the host of a MUD URL")),
            ({"ietf-mud:mud": {"manufacturer": 7}}, (f"{at}.ietf-mud:mud.manufacturer: ", "a string")),
            ({"ietf-mud:mud": {"manufacturer": "a.example", "same-manufacturer": [None]}},
             (f"{at}: unsupported", "same-manufacturer and a manufacturer", "one peer")),
            ({"ietf-mud:mud": {"my-controller": [None], "local-networks": [None]}},
             (f"{at}: unsupported", "local-networks and my-controller")),
            ({"ietf-mud:mud": {"manufacturer": "a.example"},
              "ipv4": {"destination-ipv4-network": "198.18.0.9/32"}},
             (f"{at}: unsupported", "an address and a manufacturer"))):
        refused(mud_file([ace("x", matches)]), *words)


# -- RFC 8520's device abstractions: same-manufacturer, manufacturer, my-controller -------------

SAME = ace("same", {"ietf-mud:mud": {"same-manufacturer": [None]}, "ipv4": {"protocol": 6},
                    "tcp": {"destination-port": {"operator": "eq", "port": 6668},
                            "ietf-mud:direction-initiated": "from-device"}})
SAME_REPLIES = ace("same-back", {"ietf-mud:mud": {"same-manufacturer": [None]}, "ipv4": {"protocol": 6},
                                 "tcp": {"source-port": {"operator": "eq", "port": 6668},
                                         "ietf-mud:direction-initiated": "from-device"}})
FROM_SAME = ace("from-same", {"ietf-mud:mud": {"same-manufacturer": [None]}, "ipv4": {"protocol": 6},
                              "tcp": {"destination-port": {"operator": "eq", "port": 6668},
                                      "ietf-mud:direction-initiated": "to-device"}})
MAKER = ace("maker", {"ietf-mud:mud": {"manufacturer": "Hubs.Example.NET"}, "ipv4": {"protocol": 17},
                      "udp": {"destination-port": {"operator": "eq", "port": 5683}}})
MINE = ace("mine", {"ietf-mud:mud": {"my-controller": [None]}, "ipv4": {"protocol": 6},
                    "tcp": {"destination-port": {"operator": "eq", "port": 8443}}})


def test_manufacturer_abstractions_become_profile_entries():
    profile, notes = imported(mud_file([CLOUD, SAME, MAKER, MINE], [CLOUD_REPLIES, SAME_REPLIES, FROM_SAME]))
    assert destinations(profile) == [
        "api.plugcloud.example.com:443/tcp", "same-manufacturer:6668/tcp",
        {"manufacturer": "hubs.example.net", "proto": "udp", "port": 5683}, "my-controller:8443/tcp"]
    assert destinations(profile, "suspicious") == destinations(profile)
    # the devices and controllers they name may be on the LAN, which lateral_block would close
    assert "lateral_block" not in profile["postures"]["normal"]
    assert "lateral_block" not in profile["postures"]["suspicious"]
    lateral = note_about(notes, "no lateral_block")
    assert all(f"'{x}'" in lateral for x in ("same", "maker", "mine")), lateral
    # each says what it will stand for: this file's MUD authority, the manufacturer, the site's
    assert "things.example.com" in note_about(notes, "'same'", "becomes")
    assert "hubs.example.net" in note_about(notes, "'maker'", "becomes")
    mine = note_about(notes, "'mine'", "becomes")
    assert "my_controllers" in mine and "https://things.example.com/plug2000" in mine
    assert "replies to flows the device opens (ACE 'same')" in note_about(notes, "'same-back'")
    assert "its own profile's to decide" in note_about(notes, "'from-same'")
    parsed = [umbox.parse_destination(d) for d in destinations(profile)]
    assert (parsed[1].same_manufacturer, parsed[1].proto, parsed[1].port) == (True, 6, 6668)
    assert (parsed[2].manufacturer, parsed[2].proto, parsed[2].port) == ("hubs.example.net", 17, 5683)
    assert (parsed[3].my_controller, parsed[3].proto, parsed[3].port) == (True, 6, 8443)
    loaded = loads_as_a_profile(profile)          # what import writes, read back as TOML
    assert loaded.mud_url == "https://things.example.com/plug2000"
    assert loaded.stack("normal")["allowlist"]["destinations"] == destinations(profile)


def test_manufacturer_abstractions_round_trip_through_export():
    given = ["same-manufacturer:6668/tcp", {"manufacturer": "hubs.example.net", "proto": "udp", "port": 5683},
             "my-controller:8443/tcp", "my-controller", {"same_manufacturer": True, "proto": "udp"},
             "api.plugcloud.example.com:443/tcp"]
    profile = profiles.profile_from_text(profiles.dump_profile(profile_with(given)), "rt.toml")
    exported = mud.profile_to_mud(profile, "https://things.example.com/plug2000")
    out = [a["matches"].get("ietf-mud:mud") for a in exported[ACL_CONTAINER]["acl"][0]["aces"]["ace"]]
    assert out == [{"same-manufacturer": [None]}, {"manufacturer": "hubs.example.net"},
                   {"my-controller": [None]}, {"my-controller": [None]}, {"same-manufacturer": [None]}, None]
    again, _ = imported(json.dumps(exported), type_name="roundtrip")
    assert destinations(again) == ["same-manufacturer:6668/tcp",
                                   {"manufacturer": "hubs.example.net", "proto": "udp", "port": 5683},
                                   "my-controller:8443/tcp", "my-controller", "same-manufacturer/udp",
                                   "api.plugcloud.example.com:443/tcp"]
    assert ({umbox.parse_destination(d) for d in destinations(again)}
            == {umbox.parse_destination(d) for d in given})


def test_other_unsupported_matches_are_refused():
    cases = [
        (lambda d: from_aces(d)[3]["matches"]["eth"].update(ethertype="0x86dd"),
         f"{FROM_ACES}[3].matches.eth.ethertype: unsupported", "ethertype"),
        (lambda d: from_aces(d)[1]["matches"]["ipv4"].update(ttl=64),
         f"{FROM_ACES}[1].matches.ipv4.ttl: unsupported", "ttl"),
        (lambda d: from_aces(d)[1]["matches"]["tcp"].update(flags="syn"),
         f"{FROM_ACES}[1].matches.tcp.flags: unsupported", "flags"),
        (lambda d: from_aces(d)[1]["matches"].update({"ingress-interface": "eth0"}),
         f"{FROM_ACES}[1].matches.ingress-interface: unsupported", "interface"),
        (lambda d: from_aces(d)[1]["matches"]["ipv4"].update({"ietf-acldns:dst-dnsname": "*.tuyaeu.com"}),
         f"{FROM_ACES}[1].matches.ipv4.ietf-acldns:dst-dnsname: ", "wildcard"),
        (lambda d: from_aces(d)[1]["matches"]["ipv4"].update({"ietf-acldns:dst-dnsname": "a.example.com"}),
         f"{FROM_ACES}[1].matches: unsupported", "an address and a DNS name"),
        (lambda d: d["ietf-mud:mud"].update({"mud-url": "http://lsc.example.com/lamp"}),
         "$.ietf-mud:mud.mud-url: ", "https"),
        (lambda d: d["ietf-mud:mud"].update({"mud-version": 2}),
         "$.ietf-mud:mud.mud-version: unsupported", "version 2"),
        (lambda d: d["ietf-mud:mud"]["from-device-policy"]["access-lists"]["access-list"][0]
         .update(name="nowhere"), "$.ietf-mud:mud.from-device-policy.access-lists.access-list[0].name",
         "'nowhere'"),
    ]
    for change, *words in cases:
        doc = lamp()
        change(doc)
        refused(doc, *words)


def test_a_drop_before_an_accept_is_refused():
    refused(mud_file([ace("no-ntp", {"ipv4": {"protocol": 17}}, "drop"), NTP]),
            f"$.{ACLS}.acl[0].aces.ace[1]: unsupported", "'ntp' accepts after ACE 'no-ntp' drops")


def test_too_deep_too_big_and_not_utf8_are_refused():
    deep = lamp()
    node = from_aces(deep)[1]["matches"]["ipv4"]
    for _ in range(mud.MAX_DEPTH):
        node["x"] = {}
        node = node["x"]
    refused(deep, f"at most {mud.MAX_DEPTH}")
    refused('{"ietf-mud:mud": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply")
    big = LAMP_FILE.read_text() + " " * mud.MAX_BYTES
    refused(big, f"at most {mud.MAX_BYTES} bytes")
    refused(big.encode(), f"at most {mud.MAX_BYTES} bytes")
    refused(LAMP_FILE.read_bytes().replace(b"mood_lamp", b"mood_l\xe4mp", 1), "not UTF-8", "byte 77 (line 4)")


# -- export: a profile as a MUD file, and back -------------------------------------------------

ROUND_TRIP = ["api.plugcloud.example.com:443/tcp", "pool.ntp.org:123/udp", "198.19.8.0/24",
              "198.19.8.1:8883/tcp", "lan:6668/tcp", "lan/udp", "203.0.113.7/icmp", "0.0.0.0/0:443/tcp"]


def profile_with(dests: list) -> dict:
    return {"type": "roundtrip", "description": "a device of many habits",
            "postures": {"normal": {"anti_spoof": {}, "allowlist": {"destinations": dests}}}}


def test_export_then_import_gives_the_same_destinations():
    profile = profiles.profile_from_text(profiles.dump_profile(profile_with(ROUND_TRIP)), "rt.toml")
    exported = mud.profile_to_mud(profile, "https://example.com/roundtrip")
    again, notes = imported(json.dumps(exported), type_name="roundtrip")
    assert destinations(again) == ROUND_TRIP
    assert again["mud_url"] == "https://example.com/roundtrip"
    # every to-device entry is the replies of a from-device one, or says it adds nothing
    assert all("nothing to add" in n or "lan entries" in n or "any address" in n for n in notes), notes
    assert sum("replies to flows the device opens" in n for n in notes) == 6    # with ports


def test_export_of_the_imported_real_file_round_trips():
    profile, _ = imported(LAMP, device_ip="10.42.0.174", type_name="mood_lamp")
    exported = mud.profile_to_mud(loads_as_a_profile(profile), profile["mud_url"])
    assert "ietf-access-control-list:acls" in exported      # RFC 8519's container
    assert destinations(imported(json.dumps(exported))[0]) == destinations(profile)


def test_export_compares_by_meaning_for_other_spellings():
    given = ["198.19.8.1/32:443/tcp", {"name": "Pool.NTP.org.", "proto": "udp", "port": 123},
             {"lan": True, "proto": "udp", "port": 6667}, {"address": "198.19.9.0/24"}]
    exported = mud.profile_to_mud(profile_with(given), "https://example.com/x")
    back = destinations(imported(json.dumps(exported))[0])
    assert {umbox.parse_destination(d) for d in back} == {umbox.parse_destination(d) for d in given}


def test_export_refuses_what_mud_cannot_say():
    with pytest.raises(ConfigError) as e:
        mud.profile_to_mud(profile_with(["*.tuyaeu.com"]), "https://example.com/x")
    assert "'*.tuyaeu.com'" in str(e.value) and "wildcard" in str(e.value)
    plug = profiles.load_all()["plug"]       # no destinations in normal: it may open anything
    with pytest.raises(ConfigError) as e:
        mud.profile_to_mud(plug, "https://example.com/plug")
    assert "profile plug" in str(e.value) and "nothing to export" in str(e.value)
    with pytest.raises(ConfigError) as e:
        mud.profile_to_mud(profile_with(["198.19.8.0/24"]), "http://example.com/x")
    assert "https" in str(e.value)


def test_a_shipped_profile_with_a_wildcard_name_is_refused_naming_it():
    """MUD's dst-dnsname is one host: *.pool.ntp.org cannot be said, and is not dropped."""
    camera = profiles.load_all()["camera"]
    site = umbox.check_controllers({"camera-cloud": ["cloud.camera.example"]}, "site")
    with pytest.raises(ConfigError, match=r"\*\.pool\.ntp\.org.*wildcard"):
        mud.profile_to_mud(camera, "https://example.com/camera", site)


# -- the profile format: mud_url, installed profiles ------------------------------------------

def test_a_profile_s_mud_url_must_be_https(tmp_path):
    path = tmp_path / "toaster.toml"
    rest = '[postures.normal]\nanti_spoof = {}\n'
    path.write_text('type = "toaster"\nmud_url = "ftp://example.com/t"\n' + rest)
    with pytest.raises(ConfigError) as e:
        profiles.load_profile(path)
    assert str(path) in str(e.value) and "mud_url" in str(e.value) and "https" in str(e.value)
    path.write_text('type = "toaster"\nmud_url = "https://example.com/t"\n' + rest)
    assert profiles.load_profile(path).mud_url == "https://example.com/t"


def test_an_installed_profile_may_not_reuse_a_shipped_type(tmp_path):
    installed = tmp_path / "profiles"
    installed.mkdir()
    (installed / "camera.toml").write_text('type = "camera"\n[postures.normal]\nanti_spoof = {}\n')
    with pytest.raises(ConfigError) as e:
        profiles.load_all(profiles.PROFILE_DIR, installed)
    assert str(installed / "camera.toml") in str(e.value)
    assert str(profiles.PROFILE_DIR / "camera.toml") in str(e.value)
    (installed / "camera.toml").rename(installed / "lamp.toml")
    with pytest.raises(ConfigError) as e:          # and its file is named after its type
        profiles.load_all(profiles.PROFILE_DIR, installed)
    assert "lamp.toml" in str(e.value) and "camera" in str(e.value)
    (installed / "lamp.toml").write_text('type = "lamp"\n[postures.normal]\nanti_spoof = {}\n')
    loaded = profiles.load_all(profiles.PROFILE_DIR, installed)
    assert loaded["lamp"].installed and not loaded["camera"].installed


def test_a_site_controller_exports_as_its_hosts_and_never_as_any_address():
    """An ACE without a destination matches every address: a site's controller class
    ("@phone") was written so, which would have opened everything to whoever imports the file."""
    given = ["@phone:8080/tcp", "cloud.example.com:443/tcp"]
    controllers = umbox.check_controllers({"phone": ["198.18.0.50", "hub.example.com"]}, "site")
    exported = mud.profile_to_mud(profile_with(given), "https://example.com/x", controllers)
    aces = [a for acl in exported["ietf-access-control-list:acls"]["acl"] if acl["name"].startswith("from")
            for a in acl["aces"]["ace"]]
    for ace in aces:      # every ACE names a peer
        ipv4 = ace["matches"].get("ipv4", {})
        assert "destination-ipv4-network" in ipv4 or "ietf-acldns:dst-dnsname" in ipv4, ace
    peers = {(a["matches"]["ipv4"].get("destination-ipv4-network")
              or a["matches"]["ipv4"].get("ietf-acldns:dst-dnsname"),
              a["matches"].get("tcp", {}).get("destination-port", {}).get("port")) for a in aces}
    assert peers == {("198.18.0.50/32", 8080), ("hub.example.com", 8080), ("cloud.example.com", 443)}
    with pytest.raises(ConfigError) as e:      # a class the site does not name: refused
        mud.profile_to_mud(profile_with(given), "https://example.com/x", {})
    assert "'@phone:8080/tcp'" in str(e.value) and "'phone'" in str(e.value)
