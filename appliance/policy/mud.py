"""RFC 8520 Manufacturer Usage Descriptions (MUD): a MUD file in, a device-type profile out, and
a profile's `normal` destinations back out as a MUD file.

A MUD file is JSON (RFC 7951) of the YANG modules ietf-mud (RFC 8520), ietf-acldns (RFC 8520)
and ietf-access-control-list with ietf-packet-fields (RFC 8519). `parse_mud` reads it strictly:
a node outside those modules, or a match this gateway cannot enforce, is an error naming the
file and the JSON path, never skipped. `to_profile` maps what the device may open to the
`normal` posture's allow-list and says, in notes for the operator, what it did with everything
else (replies, the gateway's own services, LAN chatter, artefacts of a MUD generator).

The mapping (docs/mud.md says the same for operators):
- from-device ACEs that accept: destinations the device may open. `ietf-acldns:dst-dnsname` is
  a name, `destination-ipv4-network` an address or prefix, `ietf-mud:mud` `local-networks` the
  site's device LAN ("lan"); no destination at all is any address (0.0.0.0/0).
  `same-manufacturer`, `manufacturer` and `my-controller` are the profile's own
  "same-manufacturer", {manufacturer = HOST} and "my-controller" entries, which the supervisor
  gives addresses (the approved devices of that MUD authority; the site's my_controllers for the
  device's MUD URL); the profile then has no lateral_block. `model` is refused.
- Controllers urn:ietf:params:mud:gateway, :dns and :ntp are the gateway itself, whose guard lets
  every device reach its DHCP, DNS, NTP, MQTT and ping: no entry, a note.
- Broadcast (255.255.255.255) and multicast (224.0.0.0/4) destinations are LAN chatter, which
  the data path always passes: no entry, a note.
- A from-device destination that is the device's own address is an artefact of the capture a
  generator (UNSW's mudgee) learnt from, not a destination: dropped, with a note naming the ACE.
  The rule is exact: the destination is a /32 equal to an address known to be the device's,
  namely `device_ip` if given, a to-device ACE's destination-ipv4-network /32 (a to-device ACE's
  destination is the device) or a from-device ACE's source-ipv4-network /32 (its source is the
  device). A /32 in RFC 1918 or link-local space that matches none of these is kept, with a
  note that says how to give the device's address.
- to-device ACEs add no entry. Those describing replies (tcp direction-initiated from-device,
  or a source port and no destination port) are the replies to flows the device opens, which
  pass as replies. Those describing flows opened towards the device (direction-initiated
  to-device, or a destination port) are inbound: from local-networks, the LAN's devices may
  open them as far as their own lateral_block lets them (the lateral rule governs this).
- drop/reject ACEs add nothing (the allow-list refuses whatever it does not list), unless an
  accept follows a drop in the same ACL: an exception an allow-list cannot express, refused.
"""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any

from appliance import vocab
from appliance.dataplane import umbox
from appliance.errors import ConfigError
from appliance.policy import profiles

MAX_BYTES = 1_000_000          # a MUD file larger than this is refused unread
MAX_DEPTH = 32                 # levels of JSON nesting; a MUD file needs about 12
ACL_CONTAINERS = ("ietf-access-control-list:acls",            # RFC 8519's container (RFC 8520's example)
                  "ietf-access-control-list:access-lists")    # what mudgee and older drafts write
GATEWAY_CONTROLLERS = {
    "urn:ietf:params:mud:gateway": "the gateway",
    "urn:ietf:params:mud:dns": "the DNS server (the gateway)",
    "urn:ietf:params:mud:ntp": "the NTP server (the gateway)",
}
PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp"}
_LAN_CHATTER = (ipaddress.IPv4Network("255.255.255.255/32"), ipaddress.IPv4Network("224.0.0.0/4"))
# Where the LAN of a capture would be (RFC 1918, link-local): a /32 there is flagged, not dropped.
_CAPTURE_LANS = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12",
                                                           "192.168.0.0/16", "169.254.0.0/16"))
SUSPICIOUS_RATE = {"packets_per_second": 100, "bytes_per_second": 100_000}   # as generic.toml

_MUD_KEYS = {"mud-version", "mud-url", "last-update", "mud-signature", "cache-validity",
             "is-supported", "systeminfo", "mfg-name", "model-name", "firmware-rev", "software-rev",
             "documentation", "extensions", "from-device-policy", "to-device-policy"}
_ACE_MATCHES = {"eth", "ipv4", "ipv6", "tcp", "udp", "icmp", "egress-interface", "ingress-interface",
                "ietf-mud:mud"}
_IPV4_KEYS = {"dscp", "ecn", "length", "ttl", "protocol", "ihl", "flags", "offset", "identification",
              "destination-ipv4-network", "source-ipv4-network", "ietf-acldns:src-dnsname",
              "ietf-acldns:dst-dnsname"}
_IPV4_SUPPORTED = {"protocol", "destination-ipv4-network", "source-ipv4-network",
                   "ietf-acldns:src-dnsname", "ietf-acldns:dst-dnsname"}
_TCP_KEYS = {"sequence-number", "acknowledgement-number", "data-offset", "reserved", "flags",
             "window-size", "urgent-pointer", "options", "source-port", "destination-port",
             "ietf-mud:direction-initiated"}
_UDP_KEYS = {"length", "source-port", "destination-port"}
_L4_SUPPORTED = {"source-port", "destination-port", "ietf-mud:direction-initiated"}
_ICMP_KEYS = {"type", "code", "rest-of-header"}
_ETH_KEYS = {"destination-mac-address", "destination-mac-address-mask", "source-mac-address",
             "source-mac-address-mask", "ethertype"}
_MUD_MATCH_KEYS = {"manufacturer", "same-manufacturer", "model", "local-networks", "controller",
                   "my-controller"}
_PORT_KEYS = {"operator", "port", "lower-port", "upper-port"}
_ETHERTYPES = {0x0800: "ipv4", 0x0806: "arp"}


@dataclass(frozen=True)
class Ace:
    """One access-control entry, as far as the gateway can enforce it."""
    acl: str
    name: str
    path: str                      # its JSON path, for messages
    direction: str                 # "from-device" or "to-device": the policy that names its ACL
    accept: bool
    protocol: int | None = None    # 1, 6, 17, or None: any
    src_network: ipaddress.IPv4Network | None = None
    dst_network: ipaddress.IPv4Network | None = None
    src_dnsname: str | None = None
    dst_dnsname: str | None = None
    local_networks: bool = False
    controller: str | None = None
    same_manufacturer: bool = False     # the devices whose MUD authority is this device's
    manufacturer: str | None = None     # the devices whose MUD authority is this host
    my_controller: bool = False         # the hosts the site names for this MUD URL
    src_port: int | None = None
    dst_port: int | None = None
    initiated: str | None = None   # ietf-mud:direction-initiated
    icmp_type: int | None = None
    arp: bool = False              # an ethertype 0x0806 entry: ARP only

    @property
    def label(self) -> str:
        return f"ACE {self.name!r}"


@dataclass
class MudFile:
    source: str
    mud_url: str
    systeminfo: str = ""
    mfg_name: str = ""
    model_name: str = ""
    documentation: str = ""
    last_update: str = ""
    is_supported: bool = True
    signed: bool = False
    from_device: list[Ace] = field(default_factory=list)
    to_device: list[Ace] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # what reading it noticed


class _Reader:
    """Walks the JSON with its path; every refusal names the file and the path."""

    def __init__(self, source: str):
        self.source = source

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {message}")

    def obj(self, value, path: str, known: set[str], required: tuple[str, ...] = (),
            what: str = "") -> dict:
        if not isinstance(value, dict):
            raise self.error(path, f"expected an object, got {_show(value)}")
        for key in value:
            if key not in known:
                raise self.error(f"{path}.{key}", f"unknown YANG node {key!r}"
                                 f"{' in ' + what if what else ''} (known here: {', '.join(sorted(known))})")
        for key in required:
            if key not in value:
                raise self.error(path, f"{key!r} is required")
        return value

    def text(self, value, path: str) -> str:
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {_show(value)}")
        return value

    def integer(self, value, path: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(path, f"expected an integer, got {_show(value)}")
        if not low <= value <= high:
            raise self.error(path, f"{value} is out of range ({low} to {high})")
        return value

    def empty(self, value, path: str) -> None:
        """YANG's type empty: [null] in JSON (RFC 7951 section 6.9)."""
        if value != [None]:
            raise self.error(path, f"expected [null] (YANG type empty), got {_show(value)}")

    def unsupported(self, path: str, why: str) -> ConfigError:
        return self.error(path, f"unsupported: {why}")


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _identity(value: str, module: str = "ietf-access-control-list") -> str:
    """An identityref's name, with or without its module prefix (RFC 7951 section 6.8)."""
    return value.removeprefix(module + ":")


# -- reading a MUD file ------------------------------------------------------------------------
def parse_mud(text: str | bytes, source: str, signature: str | None = None) -> MudFile:
    """Reads a MUD file strictly; a ConfigError names `source` and the JSON path at fault.
    `signature` is what was checked of a file fetched from its MUD URL (appliance.policy.mudfetch:
    "verified by ..." or "no signature published"), for the notes."""
    if isinstance(text, bytes):
        raw = text
        if len(raw) > MAX_BYTES:
            raise ConfigError(f"{source}: {len(raw)} bytes: a MUD file is at most {MAX_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ConfigError(f"{source}: not UTF-8 text (RFC 8520 MUD files are UTF-8): byte "
                              f"{e.start} (line {line}) is 0x{raw[e.start]:02x}") from None
    if not isinstance(text, str):
        raise ConfigError(f"{source}: expected the MUD file's text")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise ConfigError(f"{source}: {size} bytes: a MUD file is at most {MAX_BYTES} bytes")
    try:
        data = json.loads(text.removeprefix("\ufeff"), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except _Duplicate as e:
        raise ConfigError(f"{source}: malformed JSON: member {e.args[0]!r} appears twice in one "
                          "object") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to read") from None
    depth = _depth(data)
    if depth > MAX_DEPTH:
        raise ConfigError(f"{source}: JSON nested {depth} levels deep; a MUD file needs far fewer "
                          f"(at most {MAX_DEPTH} are read)")
    mud = _MudParser(_Reader(source)).parse(data)
    if signature is not None:      # fetched and checked: say what, not that nothing was
        mud.notes = [n for n in mud.notes if not n.startswith(_UNCHECKED_SIGNATURE)]
        mud.notes.insert(0, f"fetched from its MUD URL over HTTPS; signature: {signature}")
    return mud


_UNCHECKED_SIGNATURE = "the file names a signature"


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _depth(data) -> int:
    """How deeply containers nest (without recursion)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                children = value.values() if isinstance(value, dict) else value
                stack.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


class _MudParser:
    def __init__(self, r: _Reader):
        self.r = r

    def parse(self, data) -> MudFile:
        r = self.r
        top = r.obj(data, "$", {"ietf-mud:mud", *ACL_CONTAINERS}, ("ietf-mud:mud",), "a MUD file")
        containers = [c for c in ACL_CONTAINERS if c in top]
        if len(containers) > 1:
            raise r.error("$", f"both {containers[0]!r} and {containers[1]!r}: give the ACLs once")
        mp = "$.ietf-mud:mud"
        mud = r.obj(top["ietf-mud:mud"], mp, _MUD_KEYS, ("mud-version", "mud-url"), "ietf-mud:mud")
        version = r.integer(mud["mud-version"], f"{mp}.mud-version", 0, 255)
        if version != 1:
            raise r.unsupported(f"{mp}.mud-version", f"MUD version {version} (RFC 8520 is version 1)")
        url = r.text(mud["mud-url"], f"{mp}.mud-url")
        try:
            profiles.check_mud_url(url, f"{r.source}: {mp}.mud-url")
        except ConfigError as e:
            raise ConfigError(str(e)) from None
        out = MudFile(r.source, url)
        for key, attr in (("systeminfo", "systeminfo"), ("mfg-name", "mfg_name"),
                          ("model-name", "model_name"), ("documentation", "documentation"),
                          ("last-update", "last_update"), ("firmware-rev", None),
                          ("software-rev", None), ("mud-signature", None)):
            if key in mud:
                value = r.text(mud[key], f"{mp}.{key}")
                if attr:
                    setattr(out, attr, value)
        if "cache-validity" in mud:
            r.integer(mud["cache-validity"], f"{mp}.cache-validity", 1, 168)
        if "is-supported" in mud:
            if not isinstance(mud["is-supported"], bool):
                raise r.error(f"{mp}.is-supported",
                              f"expected true or false, got {_show(mud['is-supported'])}")
            out.is_supported = mud["is-supported"]
        if "mud-signature" in mud:
            out.signed = True
            out.notes.append(f"{_UNCHECKED_SIGNATURE} ({mud['mud-signature']}); it is not "
                             "checked here: import only a file you trust")
        if "extensions" in mud:
            ext = mud["extensions"]
            if not isinstance(ext, list) or not all(isinstance(x, str) for x in ext):
                raise r.error(f"{mp}.extensions", f"expected a list of names, got {_show(ext)}")
            if ext:
                raise r.unsupported(f"{mp}.extensions", f"MUD extension(s) {', '.join(ext)}: their "
                                    "meaning is not known here")
        policies = {}
        for direction in ("from-device", "to-device"):
            key = f"{direction}-policy"
            if key in mud:
                policies[direction] = self.policy(mud[key], f"{mp}.{key}")
        acls = {}
        if containers:
            acls = self.acls(top[containers[0]], f"$.{containers[0]}")
        used = set()
        for direction, names in policies.items():
            for name, path in names:
                if name not in acls:
                    raise r.error(path, f"names ACL {name!r}, which the file does not define"
                                  + (f" (it defines: {', '.join(acls)})" if acls else ""))
                if name in used:
                    raise r.error(path, f"ACL {name!r} is named by both policies; an ACL is from the "
                                  "device or to it")
                used.add(name)
                aces = self.aces(acls[name], direction)
                (out.from_device if direction == "from-device" else out.to_device).extend(aces)
        for name in acls:
            if name not in used:
                out.notes.append(f"ACL {name!r} is named by neither policy: it applies to nothing")
        return out

    def policy(self, value, path: str) -> list[tuple[str, str]]:
        r = self.r
        pol = r.obj(value, path, {"access-lists"}, what="a device policy")
        if "access-lists" not in pol:
            return []
        lists = r.obj(pol["access-lists"], f"{path}.access-lists", {"access-list"})
        entries = lists.get("access-list", [])
        if not isinstance(entries, list):
            raise r.error(f"{path}.access-lists.access-list", f"expected a list, got {_show(entries)}")
        out = []
        for i, entry in enumerate(entries):
            p = f"{path}.access-lists.access-list[{i}]"
            e = r.obj(entry, p, {"name"}, ("name",))
            out.append((r.text(e["name"], f"{p}.name"), f"{p}.name"))
        return out

    def acls(self, value, path: str) -> dict[str, tuple[str, dict]]:
        r = self.r
        container = r.obj(value, path, {"acl"})
        acl_list = container.get("acl", [])
        if not isinstance(acl_list, list):
            raise r.error(f"{path}.acl", f"expected a list, got {_show(acl_list)}")
        out: dict[str, tuple[str, dict]] = {}
        for i, acl in enumerate(acl_list):
            p = f"{path}.acl[{i}]"
            a = r.obj(acl, p, {"name", "type", "aces"}, ("name",), "an ACL")
            name = r.text(a["name"], f"{p}.name")
            if name in out:
                raise r.error(f"{p}.name", f"ACL {name!r} is defined twice")
            if "type" in a:
                kind = _identity(r.text(a["type"], f"{p}.type"))
                if "ipv6" in kind:
                    raise r.unsupported(f"{p}.type", f"{kind}: IPv6 ACLs (the gateway drops IPv6 "
                                        "from devices)")
                if kind not in ("ipv4-acl-type", "eth-acl-type", "mixed-eth-ipv4-acl-type"):
                    raise r.error(f"{p}.type", f"unknown ACL type {kind!r} (known: ipv4-acl-type, "
                                  "eth-acl-type, mixed-eth-ipv4-acl-type)")
            out[name] = (p, a)
        return out

    def aces(self, acl: tuple[str, dict], direction: str) -> list[Ace]:
        r = self.r
        path, a = acl
        aces = r.obj(a.get("aces", {}), f"{path}.aces", {"ace"})
        entries = aces.get("ace", [])
        if not isinstance(entries, list):
            raise r.error(f"{path}.aces.ace", f"expected a list, got {_show(entries)}")
        out: list[Ace] = []
        names = set()
        for i, entry in enumerate(entries):
            ace = self.ace(entry, f"{path}.aces.ace[{i}]", a["name"], direction)
            if ace.name in names:
                raise r.error(f"{path}.aces.ace[{i}].name", f"ACE {ace.name!r} appears twice in its ACL")
            names.add(ace.name)
            out.append(ace)
        # From the device, the order matters: the allow-list is the accepts, and refuses the rest.
        dropped = next((x for x in out if not x.accept), None)
        later = next((x for x in out[out.index(dropped):] if x.accept), None) if dropped else None
        if direction == "from-device" and dropped and later:
            raise r.unsupported(later.path, f"{later.label} accepts after {dropped.label} drops: an "
                                "allow-list cannot express an exception to a wider accept")
        return out

    def ace(self, value, path: str, acl: str, direction: str) -> Ace:
        r = self.r
        e = r.obj(value, path, {"name", "matches", "actions"}, ("name", "actions"), "an ACE")
        name = r.text(e["name"], f"{path}.name")
        actions = r.obj(e["actions"], f"{path}.actions", {"forwarding", "logging"}, ("forwarding",))
        forwarding = _identity(r.text(actions["forwarding"], f"{path}.actions.forwarding"))
        if forwarding not in ("accept", "drop", "reject"):
            raise r.error(f"{path}.actions.forwarding", f"unknown forwarding action {forwarding!r} "
                          "(known: accept, drop, reject)")
        if "logging" in actions:
            logging = _identity(r.text(actions["logging"], f"{path}.actions.logging"))
            if logging not in ("log-none", "log-syslog"):
                raise r.error(f"{path}.actions.logging", f"unknown logging action {logging!r}")
        fields: dict[str, Any] = {"acl": acl, "name": name, "path": path, "direction": direction,
                                  "accept": forwarding == "accept"}
        m = r.obj(e.get("matches", {}), f"{path}.matches", _ACE_MATCHES, what="matches")
        mp = f"{path}.matches"
        for key in ("egress-interface", "ingress-interface"):
            if key in m:
                raise r.unsupported(f"{mp}.{key}", "matching on an interface (the gateway has one "
                                    "device side)")
        if "ipv6" in m:
            raise r.unsupported(f"{mp}.ipv6", "IPv6 matches (the gateway drops IPv6 from devices)")
        l4 = [k for k in ("tcp", "udp", "icmp") if k in m]
        if len(l4) > 1:
            raise r.error(mp, f"{' and '.join(l4)} in one ACE: RFC 8519's l4 is a choice of one")
        if "eth" in m:
            self.eth(m["eth"], f"{mp}.eth", fields)
            if fields.get("arp") and ("ipv4" in m or l4):
                raise r.error(f"{mp}.eth.ethertype", "ARP (0x0806) with IPv4 or transport matches")
        if "ipv4" in m:
            self.ipv4(m["ipv4"], f"{mp}.ipv4", fields)
        proto = {"tcp": 6, "udp": 17, "icmp": 1}.get(l4[0]) if l4 else None
        if proto is not None:
            given = fields.get("protocol")
            if given is not None and given != proto:
                raise r.error(f"{mp}.ipv4.protocol", f"protocol {given} contradicts the {l4[0]} match")
            fields["protocol"] = proto
            if l4[0] == "icmp":
                self.icmp(m["icmp"], f"{mp}.icmp", fields)
            else:
                self.l4(m[l4[0]], f"{mp}.{l4[0]}", l4[0], fields)
        if "ietf-mud:mud" in m:
            self.mud_match(m["ietf-mud:mud"], f"{mp}.ietf-mud:mud", fields)
        self.check_targets(fields, mp)
        return Ace(**fields)

    def eth(self, value, path: str, fields: dict) -> None:
        r = self.r
        eth = r.obj(value, path, _ETH_KEYS, what="eth")
        for key in ("destination-mac-address-mask", "source-mac-address", "source-mac-address-mask"):
            if key in eth:
                raise r.unsupported(f"{path}.{key}", "matching on MAC addresses (the gateway knows a "
                                    "device by its own MAC)")
        if "destination-mac-address" in eth:
            mac = r.text(eth["destination-mac-address"], f"{path}.destination-mac-address").lower()
            if mac != "ff:ff:ff:ff:ff:ff":
                raise r.unsupported(f"{path}.destination-mac-address", f"destination MAC {mac} "
                                    "(only ff:ff:ff:ff:ff:ff, broadcast, which LAN chatter is)")
        if "ethertype" in eth:
            value = eth["ethertype"]
            code: int | None = None
            if isinstance(value, int) and not isinstance(value, bool):
                code = value
            elif isinstance(value, str):
                v = _identity(value.lower(), "ietf-ethertypes")
                code = {"ipv4": 0x0800, "arp": 0x0806}.get(v)
                if code is None and re.fullmatch(r"(0x)?[0-9a-f]{4}", v):
                    code = int(v.removeprefix("0x"), 16)
            if code not in _ETHERTYPES:
                raise r.unsupported(f"{path}.ethertype", f"ethertype {_show(value)} (only IPv4, "
                                    "0x0800, and ARP, 0x0806: the gateway passes no other)")
            fields["arp"] = code == 0x0806

    def ipv4(self, value, path: str, fields: dict) -> None:
        r = self.r
        ip = r.obj(value, path, _IPV4_KEYS, what="ipv4")
        for key in ip:
            if key not in _IPV4_SUPPORTED:
                raise r.unsupported(f"{path}.{key}", f"matching on the IPv4 header's {key}")
        if "protocol" in ip:
            proto = r.integer(ip["protocol"], f"{path}.protocol", 0, 255)
            if proto not in PROTOCOL_NAMES:
                raise r.unsupported(f"{path}.protocol", f"unknown protocol {proto}: the gateway's "
                                    "allow-list knows ICMP (1), TCP (6) and UDP (17)")
            fields["protocol"] = proto
        for key, attr in (("destination-ipv4-network", "dst_network"),
                          ("source-ipv4-network", "src_network")):
            if key in ip:
                text = r.text(ip[key], f"{path}.{key}")
                if "/" not in text:
                    raise r.error(f"{path}.{key}", f"{text!r}: an ipv4-prefix is address/length")
                try:
                    fields[attr] = ipaddress.IPv4Network(text, strict=True)
                except ValueError as e:
                    raise r.error(f"{path}.{key}", f"{text!r}: {e}") from None
        for key, attr in (("ietf-acldns:dst-dnsname", "dst_dnsname"),
                          ("ietf-acldns:src-dnsname", "src_dnsname")):
            if key in ip:
                fields[attr] = self.dnsname(ip[key], f"{path}.{key}")

    def dnsname(self, value, path: str) -> str:
        r = self.r
        text = r.text(value, path)
        if "*" in text:
            raise r.error(path, f"{text!r}: an inet:host is one host name, not a wildcard")
        try:
            ipaddress.ip_address(text)
        except ValueError:
            pass
        else:
            raise r.unsupported(path, f"{text!r}: an address as a DNS name; give it as "
                                "destination-ipv4-network / source-ipv4-network")
        try:
            dst = umbox.parse_destination({"name": text})
        except ConfigError as e:
            raise r.error(path, f"{text!r} is not a host name ({e})") from None
        name = getattr(dst, "name", None)
        if not name:      # a data path that knows no names yet
            raise r.unsupported(path, f"{text!r}: this gateway's allow-list takes no names")
        return name

    def l4(self, value, path: str, proto: str, fields: dict) -> None:
        r = self.r
        t = r.obj(value, path, _TCP_KEYS if proto == "tcp" else _UDP_KEYS, what=proto)
        for key in t:
            if key not in _L4_SUPPORTED:
                raise r.unsupported(f"{path}.{key}", f"matching on the {proto.upper()} header's {key}")
        for key, attr in (("source-port", "src_port"), ("destination-port", "dst_port")):
            if key in t:
                fields[attr] = self.port(t[key], f"{path}.{key}")
        if "ietf-mud:direction-initiated" in t:
            d = r.text(t["ietf-mud:direction-initiated"], f"{path}.ietf-mud:direction-initiated")
            if d not in ("from-device", "to-device"):
                raise r.error(f"{path}.ietf-mud:direction-initiated",
                              f"expected from-device or to-device, got {d!r}")
            fields["initiated"] = d

    def port(self, value, path: str) -> int:
        r = self.r
        p = r.obj(value, path, _PORT_KEYS, what="a port match")
        if "lower-port" in p or "upper-port" in p:
            if "operator" in p or "port" in p:
                raise r.error(path, "a range (lower-port, upper-port) or an operator and a port, not both")
            low = r.integer(p.get("lower-port"), f"{path}.lower-port", 0, 65535)
            high = r.integer(p.get("upper-port"), f"{path}.upper-port", 0, 65535)
            if low != high:
                raise r.unsupported(path, f"port range {low}-{high}: the allow-list takes one port per "
                                    "entry; list the ports the device uses")
            port = low
        else:
            if "port" not in p:
                raise r.error(path, "'port' is required")
            op = r.text(p.get("operator", "eq"), f"{path}.operator")
            if op != "eq":
                if op not in ("lte", "gte", "neq"):
                    raise r.error(f"{path}.operator", f"unknown operator {op!r} (known: eq, lte, gte, neq)")
                raise r.unsupported(f"{path}.operator", f"operator {op} (only eq: one port per entry)")
            port = r.integer(p["port"], f"{path}.port", 0, 65535)
        if port == 0:
            raise r.unsupported(path, "port 0")
        return port

    def icmp(self, value, path: str, fields: dict) -> None:
        r = self.r
        i = r.obj(value, path, _ICMP_KEYS, what="icmp")
        if "rest-of-header" in i:
            raise r.unsupported(f"{path}.rest-of-header", "matching on ICMP's rest of header")
        if "type" in i:
            t = r.integer(i["type"], f"{path}.type", 0, 255)
            if t not in (0, 8):
                raise r.unsupported(f"{path}.type", f"ICMP type {t} (the gateway opens flows with echo "
                                    "requests, type 8, and passes their replies, type 0)")
            fields["icmp_type"] = t
        if "code" in i and r.integer(i["code"], f"{path}.code", 0, 255) != 0:
            raise r.unsupported(f"{path}.code", f"ICMP code {i['code']} (echo has code 0)")

    def mud_match(self, value, path: str, fields: dict) -> None:
        r = self.r
        m = r.obj(value, path, _MUD_MATCH_KEYS, what="ietf-mud:mud matches")
        if "model" in m:
            raise r.unsupported(f"{path}.model", "devices of a model: the gateway groups devices by "
                                "MUD authority (same-manufacturer, manufacturer), not by model")
        if "local-networks" in m:
            r.empty(m["local-networks"], f"{path}.local-networks")
            fields["local_networks"] = True
        for key, attr in (("same-manufacturer", "same_manufacturer"), ("my-controller", "my_controller")):
            if key in m:
                r.empty(m[key], f"{path}.{key}")
                fields[attr] = True
        if "manufacturer" in m:
            text = r.text(m["manufacturer"], f"{path}.manufacturer")
            try:
                fields["manufacturer"] = vocab.check_mud_authority(text, "manufacturer")
            except ConfigError as e:
                raise r.error(f"{path}.manufacturer", f"{text!r} is not the host of a MUD URL "
                              f"({e})") from None
        if "controller" in m:
            c = r.text(m["controller"], f"{path}.controller")
            if c not in GATEWAY_CONTROLLERS:
                raise r.unsupported(f"{path}.controller", f"controller {c!r}: only "
                                    f"{', '.join(GATEWAY_CONTROLLERS)}, which the gateway itself serves")
            fields["controller"] = c

    def check_targets(self, fields: dict, path: str) -> None:
        """One peer per ACE: an address, a name, local-networks or a controller (local-networks
        may narrow a broadcast or multicast address, as mudgee writes it)."""
        r = self.r
        outbound = fields["direction"] == "from-device"
        net = fields.get("dst_network" if outbound else "src_network")
        dns = fields.get("dst_dnsname" if outbound else "src_dnsname")
        wrong_dns = fields.get("src_dnsname" if outbound else "dst_dnsname")
        if wrong_dns:
            side = "source" if outbound else "destination"
            raise r.unsupported(path, f"a {side} DNS name in a {fields['direction']} ACE: that side "
                                "is the device itself")
        given = [k for k, v in (("an address", net), ("a DNS name", dns),
                                ("local-networks", fields.get("local_networks")),
                                ("a controller", fields.get("controller")),
                                ("same-manufacturer", fields.get("same_manufacturer")),
                                ("a manufacturer", fields.get("manufacturer")),
                                ("my-controller", fields.get("my_controller"))) if v]
        chatter = net is not None and _is_chatter(net)
        if len(given) > 1 and not (given == ["an address", "local-networks"] and chatter):
            raise r.unsupported(path, f"{' and '.join(given)} in one ACE: give one peer per entry")


def _is_chatter(net: ipaddress.IPv4Network) -> bool:
    return any(net.subnet_of(c) for c in _LAN_CHATTER)


# -- a MUD file as a profile -------------------------------------------------------------------
def default_type_name(mud: MudFile) -> str:
    """The last segment of the MUD URL's path (mudgee: the device's name), fit for a type."""
    path = mud.mud_url.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    tail = path.rsplit("/", 1)[-1] if path.count("/") > 2 else ""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", tail.removesuffix(".json")).strip("_-")[:40]
    if not name:
        raise ConfigError(f"{mud.source}: no type name in the MUD URL {mud.mud_url}: give one (--type)")
    return name


def format_destination(target: str, proto: int | None, port: int | None) -> str:
    """A destination in the profile's string form: ADDR[/LEN], NAME or lan, then [:PORT][/PROTO]."""
    text = target
    if port:
        text += f":{port}"
    if proto:
        text += f"/{PROTOCOL_NAMES[proto]}"
    return text


def _target(ace: Ace) -> str:
    if ace.dst_dnsname:
        return ace.dst_dnsname
    if ace.local_networks:
        return "lan"
    if ace.dst_network is not None:
        net = ace.dst_network
        return str(net.network_address) if net.prefixlen == 32 else str(net)
    return "0.0.0.0/0"


def _describe(ace: Ace, peer_of: str = "dst") -> str:
    """What an ACE matches, in a few words, for a note."""
    dns = ace.dst_dnsname if peer_of == "dst" else ace.src_dnsname
    net = ace.dst_network if peer_of == "dst" else ace.src_network
    if ace.controller:
        peer = GATEWAY_CONTROLLERS[ace.controller]
    elif ace.same_manufacturer:
        peer = "devices of the same manufacturer"
    elif ace.manufacturer:
        peer = f"devices of manufacturer {ace.manufacturer}"
    elif ace.my_controller:
        peer = "the site's controllers for this MUD URL (my-controller)"
    elif ace.local_networks:
        peer = f"{net} on the local networks" if net is not None else "the local networks"
    else:
        peer = dns or (str(net) if net is not None else "any address")
    proto = PROTOCOL_NAMES.get(ace.protocol or 0, "any protocol")
    ports = []
    if ace.src_port:
        ports.append(f"from port {ace.src_port}")
    if ace.dst_port:
        ports.append(f"to port {ace.dst_port}")
    return f"{peer}, {proto}{' ' + ' '.join(ports) if ports else ''}"


def _gateway_service(ace: Ace) -> bool:
    """Whether the gateway guard serves this: DHCP, DNS, NTP, MQTT or ping at the gateway."""
    port = ace.dst_port if ace.direction == "from-device" else ace.src_port
    if ace.protocol == 1:
        return True
    if ace.protocol == 17:
        return port in (None, 53, 67, 123)
    if ace.protocol == 6:
        return port in (None, 53, 1883)
    return True


def device_addresses(mud: MudFile, device_ip: str | None = None) -> dict[ipaddress.IPv4Address, str]:
    """The addresses known to be the device's, each with where that is known from (the rule
    that finds a generator's artefacts: module docstring)."""
    out: dict[ipaddress.IPv4Address, str] = {}
    if device_ip is not None:
        try:
            out[ipaddress.IPv4Address(device_ip)] = "the device address given"
        except ValueError:
            raise ConfigError(f"device address: {device_ip!r} is not an IPv4 address") from None
    for ace in mud.to_device:
        net = ace.dst_network
        if net is not None and net.prefixlen == 32 and not _is_chatter(net):
            out.setdefault(net.network_address, f"the destination of to-device {ace.label}")
    for ace in mud.from_device:
        net = ace.src_network
        if net is not None and net.prefixlen == 32:
            out.setdefault(net.network_address, f"the source of from-device {ace.label}")
    return out


def to_profile(mud: MudFile, type_name: str, device_ip: str | None = None) -> tuple[dict, list[str]]:
    """The profile (as a profile's TOML holds it) for a device that behaves as `mud` says, and
    notes for the operator on everything that did not become an allow-list entry."""
    profiles.check_type_name(type_name, "type")
    notes = list(mud.notes)
    if not mud.is_supported:
        notes.append("the MUD file says the manufacturer no longer supports this device "
                     "(is-supported: false)")
    own = device_addresses(mud, device_ip)
    destinations: list[str | dict] = []
    lan_aces: list[str] = []
    peer_aces: list[str] = []       # same-manufacturer, manufacturer, my-controller
    for ace in mud.from_device:
        entry = _from_device(ace, own, notes, mud.mud_url)
        if entry is not None:
            if _abstract(ace):
                peer_aces.append(ace.label)
            elif _target(ace) == "lan":
                lan_aces.append(ace.label)
            if entry not in destinations:
                destinations.append(entry)
    for ace in mud.to_device:
        notes.append(_to_device(ace, mud.from_device))
    normal: dict[str, dict] = {"anti_spoof": {}}
    if lan_aces and not peer_aces:
        notes.append(f"no lateral_block: the MUD file lets the device open flows to the local "
                     f"networks ({', '.join(lan_aces)}); the allow-list's lan entries say which")
    elif peer_aces:
        # lateral_block drops every flow to the LAN, the devices and controllers named included;
        # the allow-list still refuses the LAN addresses it does not list
        lan = f"to the local networks ({', '.join(lan_aces)}) and " if lan_aces else ""
        notes.append(f"no lateral_block: the MUD file lets the device open flows {lan}to other "
                     f"devices or the site's controllers ({', '.join(peer_aces)}), which may be on "
                     "the LAN; the allow-list's entries say which")
    else:
        normal["lateral_block"] = {}
    normal["port_scan"] = {}
    suspicious = {**normal, "rate_limit": dict(SUSPICIOUS_RATE)}
    normal["allowlist"] = {"destinations": destinations}
    suspicious["allowlist"] = {"destinations": list(destinations)}
    if not destinations:
        notes.append("the allow-list is empty: the device may reach the gateway's services and "
                     "the LAN's broadcast and multicast, nothing else")
    what = mud.systeminfo or " ".join(x for x in (mud.mfg_name, mud.model_name) if x) or type_name
    description = f"{what} (from the MUD file {mud.mud_url})"
    profile = {"type": type_name, "description": description, "mud_url": mud.mud_url,
               "postures": {"normal": normal, "suspicious": suspicious,
                            "attack": {"quarantine": {"management": True}}}}
    return profile, notes


def _from_device(ace: Ace, own: dict, notes: list[str], mud_url: str = "") -> str | dict | None:
    """The allow-list entry for one from-device ACE, or None and a note saying why none."""
    if not ace.accept:
        notes.append(f"{ace.label} drops ({_describe(ace)}): nothing to add, the allow-list "
                     "refuses whatever it does not list")
        return None
    if ace.arp:
        notes.append(f"{ace.label}: ARP always passes on the device side (anti_spoof checks its "
                     "sender address): nothing to add")
        return None
    if ace.controller:
        if _gateway_service(ace):
            notes.append(f"{ace.label} ({_describe(ace)}) is served by the gateway guard, which lets "
                         "every device reach the gateway's DHCP, DNS, NTP, MQTT and ping: dropped")
        else:
            notes.append(f"{ace.label} ({_describe(ace)}) goes to the gateway, but not to a service "
                         "the gateway guard lets devices open (DHCP, DNS, NTP, MQTT, ping): dropped; "
                         "the gateway will refuse such flows")
        return None
    if ace.initiated == "to-device" or (ace.src_port and not ace.dst_port) or ace.icmp_type == 0:
        notes.append(f"{ace.label} ({_describe(ace)}) describes the device's replies to flows "
                     "opened towards it: replies pass, nothing to add")
        return None
    if _abstract(ace):
        return _abstract_entry(ace, notes, mud_url)
    net = ace.dst_network
    if net is not None and _is_chatter(net):
        notes.append(f"{ace.label} ({_describe(ace)}) is LAN broadcast or multicast, which the data "
                     "path always passes (LAN chatter): no allow-list entry needed")
        return None
    if net is not None and net.prefixlen == 32 and net.network_address in own:
        notes.append(f"{ace.label} goes to {net.network_address}, the device's own address ("
                     f"{own[net.network_address]}): an artefact of the capture the MUD file was "
                     "made from, not a destination: dropped")
        return None
    entry = format_destination(_target(ace), ace.protocol, ace.dst_port)
    if ace.src_port and ace.dst_port:
        notes.append(f"{ace.label}: source port {ace.src_port} is not checked (the allow-list "
                     f"matches destinations): {entry}")
    if entry.startswith("0.0.0.0/0"):
        notes.append(f"{ace.label} names no destination: any address ({entry})")
    elif (net is not None and net.prefixlen == 32 and not ace.local_networks
          and any(net.subnet_of(lan) for lan in _CAPTURE_LANS)):
        notes.append(f"{ace.label} goes to the private address {net.network_address}: kept as "
                     f"{entry}; if that is the device's own address in the capture the file was "
                     "made from, import again giving it (kalki profile import --device-ip) and the "
                     "entry is dropped")
    return entry


def _abstract(ace: Ace) -> tuple:
    """An ACE's RFC 8520 device abstraction, if any: (same-manufacturer, manufacturer,
    my-controller)."""
    return (ace.same_manufacturer, ace.manufacturer, ace.my_controller) if (
        ace.same_manufacturer or ace.manufacturer or ace.my_controller) else ()


def _abstract_entry(ace: Ace, notes: list[str], mud_url: str) -> str | dict:
    """The profile's same-manufacturer, manufacturer or my-controller entry for a from-device ACE
    (umbox.parse_destination reads it; the supervisor gives it addresses), and a note saying what
    it will stand for."""
    proto = PROTOCOL_NAMES[ace.protocol] if ace.protocol else None
    if ace.manufacturer:
        entry: str | dict = {"manufacturer": ace.manufacturer, **({"proto": proto} if proto else {}),
                             **({"port": ace.dst_port} if ace.dst_port else {})}
        what = (f"the LAN addresses of the approved devices whose MUD URL's host is "
                f"{ace.manufacturer}; none until one is approved")
    elif ace.same_manufacturer:
        entry = format_destination(vocab.SAME_MANUFACTURER, ace.protocol, ace.dst_port)
        what = (f"the LAN addresses of the other approved devices whose MUD URL's host is this "
                f"device's ({vocab.mud_authority(mud_url) or 'its MUD URL'}); none until one is approved")
    else:
        entry = format_destination(vocab.MY_CONTROLLER, ace.protocol, ace.dst_port)
        what = (f"the hosts the site names for this MUD URL (config my_controllers, key "
                f"{mud_url or 'the MUD URL'}); none until it does")
    notes.append(f"{ace.label} ({_describe(ace)}) becomes {entry}: {what}")
    if ace.src_port and ace.dst_port:
        notes.append(f"{ace.label}: source port {ace.src_port} is not checked (the allow-list "
                     f"matches destinations): {entry}")
    return entry


def _to_device(ace: Ace, from_device: list[Ace]) -> str:
    """What a to-device ACE becomes: always a note, never an allow-list entry."""
    what = f"to-device {ace.label} ({_describe(ace, 'src')})"
    if not ace.accept:
        return f"{what} drops: nothing to add"
    if ace.arp:
        return f"{what}: ARP always passes: nothing to add"
    if ace.controller:
        return (f"{what}: the gateway's own traffic to the device (its DHCP and DNS answers, an "
                "adapter polling it) passes: nothing to add")
    if ace.initiated == "from-device" or (ace.src_port and not ace.dst_port) or ace.icmp_type == 0:
        opened = [f for f in from_device if f.accept and _same_peer(ace, f)]
        if opened:
            return (f"{what}: replies to flows the device opens ({', '.join(f.label for f in opened)})"
                    ", which pass as replies: nothing to add")
        return (f"{what}: replies to flows the device would open, but no from-device entry opens "
                "such a flow, so none will come: nothing to add")
    if ace.initiated == "to-device" or ace.dst_port or ace.icmp_type == 8:
        if ace.local_networks:
            return (f"{what}: flows opened towards the device from the LAN. Whether another device "
                    "may open them is its own profile's lateral rule (lateral_block) to decide; "
                    "this profile adds nothing")
        if _abstract(ace):
            return (f"{what}: flows opened towards the device by them. Whether another device may "
                    "open them is its own profile's to decide (its allow-list and lateral_block); "
                    "this profile adds nothing")
        return (f"{what}: flows opened towards the device from outside. The allow-list governs "
                "what the device opens, not what reaches it; its inbound umboxes (conn_limit, "
                "brute_force, syn_flood) can be added to the profile by hand: nothing to add")
    return (f"{what}: neither replies nor inbound flows by their ports; replies to the device's "
            "own flows pass, and this profile opens nothing towards the device: nothing to add")


def _same_peer(reply: Ace, opened: Ace) -> bool:
    """Whether to-device `reply` answers flows from-device `opened` opens (same peer, protocol
    and port, where given)."""
    if reply.protocol and opened.protocol and reply.protocol != opened.protocol:
        return False
    if reply.src_port and opened.dst_port and reply.src_port != opened.dst_port:
        return False
    if _abstract(reply) or _abstract(opened):
        return _abstract(reply) == _abstract(opened)
    if reply.local_networks or opened.local_networks:
        return reply.local_networks and opened.local_networks
    if reply.src_dnsname or opened.dst_dnsname:
        return reply.src_dnsname == opened.dst_dnsname
    if reply.src_network is None or opened.dst_network is None:
        return reply.src_network is None and opened.dst_network is None
    return reply.src_network.overlaps(opened.dst_network)


# -- a profile as a MUD file -------------------------------------------------------------------
def profile_to_mud(profile: profiles.Profile | dict, mud_url: str,
                   controllers: dict[str, list] | None = None) -> dict:
    """The `normal` posture's destinations as an RFC 8520 MUD file (a dict, for json.dumps):
    one from-device ACE per destination, one to-device ACE for its replies; same-manufacturer,
    manufacturer and my-controller entries as RFC 8520's own matches. A site's controller class
    ("@phone") has no RFC 8520 form (a MUD controller is a URI the manufacturer names), so its
    hosts from the site's `controllers` (umbox.check_controllers' result) are written instead,
    each with the entry's protocol and port; a class the site does not name is refused, never
    written as a match of any address. A wildcard name cannot be said in MUD (a dst-dnsname is
    one host) and is refused."""
    if isinstance(profile, profiles.Profile):
        type_name, description, stack = profile.type, profile.description, profile.stack("normal")
    else:
        given_type = profile.get("type")
        given_stack = (profile.get("postures") or {}).get("normal")
        if not isinstance(given_type, str) or not isinstance(given_stack, dict):
            raise ConfigError("profile: expected a profile with a type and postures.normal")
        type_name, description, stack = given_type, str(profile.get("description", "")), given_stack
    profiles.check_mud_url(mud_url, f"profile {type_name}: mud_url")
    listed = (stack.get("allowlist") or {}).get("destinations")
    if listed is None:
        listed = (stack.get("egress_anomaly") or {}).get("destinations")
    if listed is None:
        raise ConfigError(f"profile {type_name}: its normal posture has no allowlist or egress_anomaly "
                          "destinations, so it lets the device open anything; a MUD file lists what "
                          "a device may open: nothing to export")
    from_aces: list[dict] = []
    to_aces: list[dict] = []
    where = f"profile {type_name}: postures.normal: "
    expanded = []
    for entry in listed:
        dst = umbox.parse_destination(entry, "allowlist", where)
        if dst.controller is None:
            expanded.append((entry, dst))
            continue
        hosts = (controllers or {}).get(dst.controller)
        if not hosts:
            raise ConfigError(f"{where}destination {entry!r}: the site names no controller class "
                              f"{dst.controller!r} (config controllers), and a MUD file cannot say "
                              "a site's class: name it in the site's settings to export its hosts")
        for host in hosts:
            expanded.append((entry, dataclasses.replace(host, proto=dst.proto, port=dst.port)))
    for i, (entry, dst) in enumerate(expanded):
        name = getattr(dst, "name", None)
        if name and name.startswith("*."):
            raise ConfigError(f"{where}destination {entry!r}: a wildcard name cannot be said in a MUD "
                              "file (ietf-acldns:dst-dnsname is one host name)")
        proto = dst.proto or None
        out_ipv4: dict[str, Any] = {}
        in_ipv4: dict[str, Any] = {}
        mud_match: dict[str, Any] = {}
        if proto:
            out_ipv4["protocol"] = in_ipv4["protocol"] = proto
        if name:
            out_ipv4["ietf-acldns:dst-dnsname"] = name
            in_ipv4["ietf-acldns:src-dnsname"] = name
        elif getattr(dst, "lan", False):
            mud_match = {"ietf-mud:mud": {"local-networks": [None]}}
        elif dst.same_manufacturer:
            mud_match = {"ietf-mud:mud": {"same-manufacturer": [None]}}
        elif dst.manufacturer:
            mud_match = {"ietf-mud:mud": {"manufacturer": dst.manufacturer}}
        elif dst.my_controller:
            mud_match = {"ietf-mud:mud": {"my-controller": [None]}}
        elif dst.network is not None and dst.network.prefixlen:
            out_ipv4["destination-ipv4-network"] = str(dst.network)
            in_ipv4["source-ipv4-network"] = str(dst.network)
        out_m: dict[str, Any] = dict(mud_match)
        in_m: dict[str, Any] = dict(mud_match)
        if out_ipv4:
            out_m["ipv4"], in_m["ipv4"] = out_ipv4, in_ipv4
        if proto in (6, 17):
            l4 = PROTOCOL_NAMES[proto]
            out_l4: dict[str, Any] = {}
            in_l4: dict[str, Any] = {}
            if dst.port:
                out_l4["destination-port"] = {"operator": "eq", "port": dst.port}
                in_l4["source-port"] = {"operator": "eq", "port": dst.port}
            if proto == 6:
                out_l4["ietf-mud:direction-initiated"] = "from-device"
                in_l4["ietf-mud:direction-initiated"] = "from-device"
            if out_l4:
                out_m[l4], in_m[l4] = out_l4, in_l4
        elif proto == 1:
            out_m["icmp"], in_m["icmp"] = {"type": 8}, {"type": 0}
        from_aces.append({"name": f"from-ipv4-{type_name}-{i}", "matches": out_m,
                          "actions": {"forwarding": "accept"}})
        to_aces.append({"name": f"to-ipv4-{type_name}-{i}", "matches": in_m,
                        "actions": {"forwarding": "accept"}})
    from_name, to_name = f"from-ipv4-{type_name}", f"to-ipv4-{type_name}"
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return {
        "ietf-mud:mud": {
            "mud-version": 1,
            "mud-url": mud_url,
            "last-update": now,
            "cache-validity": 48,
            "is-supported": True,
            "systeminfo": description or type_name,
            "from-device-policy": {"access-lists": {"access-list": [{"name": from_name}]}},
            "to-device-policy": {"access-lists": {"access-list": [{"name": to_name}]}},
        },
        "ietf-access-control-list:acls": {"acl": [
            {"name": from_name, "type": "ipv4-acl-type", "aces": {"ace": from_aces}},
            {"name": to_name, "type": "ipv4-acl-type", "aces": {"ace": to_aces}},
        ]},
    }
