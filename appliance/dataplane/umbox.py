"""The umbox catalogue: each umbox a named unit with validated parameters, and how a device's
stack of umboxes becomes one kernel entry (XDP) plus one nftables fragment.

A stack is a mapping {umbox name: {parameter: value}}, as profiles write it. `compile_stack`
validates all of it before anything is touched, so a bad stack changes nothing.
"""
from __future__ import annotations

import copy
import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from appliance import vocab
from appliance.dataplane import maps
from appliance.errors import ConfigError, UnknownUmboxError
from appliance.vocab import CONTROLLER, check_dns_name

PROTOCOLS = {"any": 0, "icmp": 1, "tcp": 6, "udp": 17}


@dataclass(frozen=True)
class Param:
    kind: type
    default: object = None
    minimum: int | None = None
    maximum: int | None = None
    required: bool = False


def _ms(default: int) -> Param:
    """A window in milliseconds: 1 ms to one hour."""
    return Param(int, default, minimum=1, maximum=3_600_000)


_BLOCK = Param(int, 0, 0, 86_400)

CATALOGUE: dict[str, dict[str, Param]] = {
    "quarantine": {"management": Param(bool, True)},
    "allowlist": {"destinations": Param(list, required=True), "registrable_domains": Param(bool, False)},
    "rate_limit": {
        "packets_per_second": Param(int, 0, 0, 100_000_000),
        "bytes_per_second": Param(int, 0, 0, 1_250_000_000),
        "burst_packets": Param(int, None, 1, 100_000_000),
        "burst_bytes": Param(int, None, 64, 1_000_000_000),
    },
    "conn_limit": {
        "concurrent": Param(int, 0, 0, 1_000_000),
        "new_per_second": Param(int, 0, 0, 1_000_000),
    },
    "port_scan": {"ports": Param(int, 10, 1, 65_535), "window_ms": _ms(1000),
                  "block_seconds": _BLOCK},
    "syn_flood": {"syns": Param(int, 200, 1, 10_000_000), "window_ms": _ms(1000),
                  "block_seconds": _BLOCK},
    "brute_force": {"attempts": Param(int, 5, 1, 1_000_000), "window_ms": _ms(10_000),
                    "ports": Param(list, [22, 23]), "block_seconds": Param(int, 300, 0, 86_400)},
    "egress_anomaly": {"block": Param(bool, False), "destinations": Param(list, None),
                       "registrable_domains": Param(bool, False)},
    # the device's DNS goes to the gateway only: DNS to any other resolver is refused, not
    # redirected to the gateway's resolver
    "dns_gateway_only": {},
    # what a source in the drop set sends the device goes to the gateway's decoy (telnet 23,
    # web 80 and 8080; the rest is dropped), which imitates the device and records the attempt
    "deception": {"imitate": Param(str, "generic")},
    "lateral_block": {},
    "anti_spoof": {},
    "auth_gate": {"port": Param(int, 80, 1, 65_535)},
    # the gate's other two (appliance/dataplane/gate.py); their port is auth_gate's when they
    # give none, else 80
    "api_filter": {"port": Param(int, None, 1, 65_535), "allow": Param(list, required=True)},
    "token_guard": {"port": Param(int, None, 1, 65_535), "max_failures": Param(int, 10, 1, 1_000_000),
                    "window_ms": _ms(60_000), "block_seconds": Param(int, 300, 0, 86_400),
                    "statuses": Param(list, [401, 403]), "failure_text": Param(str, "")},
}
GATE_UMBOXES = ("auth_gate", "api_filter", "token_guard")


@dataclass(frozen=True)
class Destination:
    """One destination a device may open: an address or prefix, a DNS name (exact, or
    "*.suffix" for the names under it), the site's device LAN ("lan"), or one of RFC 8520's
    abstractions, which compile_stack replaces by addresses: a site's controller class, the
    approved devices of a MUD authority (same_manufacturer: the device's own), or the hosts the
    site names for the device's MUD URL (my_controller)."""
    network: ipaddress.IPv4Network | None
    proto: int = 0
    port: int = 0
    name: str | None = None
    lan: bool = False
    controller: str | None = None     # a class the site names (config `controllers`)
    same_manufacturer: bool = False   # devices whose MUD authority is this device's
    manufacturer: str | None = None   # devices whose MUD authority is this host
    my_controller: bool = False       # the hosts the site names for the device's MUD URL

    def matches_name(self, qname: str) -> bool:
        """Whether a name the device resolved is this destination's (names are lower case,
        without the final dot)."""
        if self.name is None:
            return False
        if self.name.startswith("*."):
            return qname.endswith(self.name[1:])
        return qname == self.name


def check_controllers(controllers, where: str) -> dict[str, list[Destination]]:
    """The site's controllers (config `controllers`), each host as a Destination without a
    port: what compile_stack puts in place of a profile's controller entries."""
    vocab.check_controllers(controllers, where)
    return {name: [parse_destination(h, "controller", f"{where}.{name}: ") for h in hosts]
            for name, hosts in controllers.items()}


def check_my_controllers(my_controllers, where: str) -> dict[str, list[Destination]]:
    """The site's controllers per MUD URL (config `my_controllers`), each host as a Destination
    without a port: what compile_stack puts in place of a profile's my-controller entries."""
    vocab.check_my_controllers(my_controllers, where)
    return {url: [parse_destination(h, "my_controller", f'{where}."{url}": ') for h in hosts]
            for url, hosts in my_controllers.items()}


def named_authorities(stack, authority: str | None) -> set[str]:
    """The MUD authorities whose devices a stack's destinations name: `authority` (the
    device's own) for same-manufacturer, and each manufacturer. A quick look, not a check
    (compile_stack checks): the supervisor gathers the peers' addresses only for these."""
    out: set[str] = set()
    for umbox in ("allowlist", "egress_anomaly"):
        params = stack.get(umbox) if isinstance(stack, dict) else None
        listed = params.get("destinations") if isinstance(params, dict) else None
        for entry in listed if isinstance(listed, list) else ():
            if isinstance(entry, str):
                same = re.split(r"[:/]", entry, maxsplit=1)[0] == vocab.SAME_MANUFACTURER
            elif isinstance(entry, dict):
                same = entry.get("same_manufacturer") is True
                if isinstance(entry.get("manufacturer"), str):
                    out.add(entry["manufacturer"].lower().rstrip("."))
            else:
                continue
            if same and authority:
                out.add(authority)
    return out




@dataclass
class CompiledStack:
    """What a stack means for the kernel: one kalki_devices entry, allow-list prefixes and
    the nftables part."""
    flags: int = 0
    device_fields: dict = field(default_factory=dict)
    destinations: list[Destination] = field(default_factory=list)   # addresses and "lan"
    names: list[Destination] = field(default_factory=list)   # bound to addresses as resolved
    missing_controllers: list[str] = field(default_factory=list)  # named, but not by the site
    # RFC 8520 abstractions that stand for nothing yet ("same-manufacturer", "manufacturer
    # example.com", "my-controller"): no approved device of that authority, no MUD URL, or no
    # my_controllers for the device's MUD URL. They open nothing until they do.
    missing_mud: list[str] = field(default_factory=list)
    conn_limit: dict | None = None
    gate_port: int | None = None
    # what the gate does for the device (the policy file, appliance/dataplane/gatepolicy.py)
    gate_policy: dict | None = None
    params: dict = field(default_factory=dict)


def _check(umbox: str, name: str, spec: Param, value, where: str):
    culprit = f"{where}umbox {umbox}, parameter {name}"
    if spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{culprit}: expected an integer, got {value!r}")
        if spec.minimum is not None and value < spec.minimum:
            raise ConfigError(f"{culprit}: {value} is below the minimum {spec.minimum}")
        if spec.maximum is not None and value > spec.maximum:
            raise ConfigError(f"{culprit}: {value} is above the maximum {spec.maximum}")
    elif spec.kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{culprit}: expected true or false, got {value!r}")
    elif spec.kind is list and not isinstance(value, list):
        raise ConfigError(f"{culprit}: expected a list, got {value!r}")
    elif spec.kind is str and not isinstance(value, str):
        raise ConfigError(f"{culprit}: expected text, got {value!r}")
    return value


def _port(umbox: str, value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{where}umbox {umbox}: invalid port {value!r} (1-65535)")
    return value


_TARGETS = ("address", "name", "lan", "controller", "same_manufacturer", "manufacturer",
            "my_controller")     # a destination table's keys naming where it goes: one of them


def parse_destination(entry, umbox: str = "allowlist", where: str = "") -> Destination:
    """'198.19.8.0/24', 'cloud.example.com:443/tcp', '*.example.com', 'lan:6668/tcp',
    '@phone:8080/tcp', 'same-manufacturer:6668/tcp', 'my-controller:443/tcp'; or a table
    {address = "198.19.8.0/24" | name = "pool.ntp.org" | lan = true | controller = "phone" |
    same_manufacturer = true | manufacturer = "example.com" | my_controller = true, proto, port}
    (MUD-like)."""
    culprit = f"{where}umbox {umbox}, destination {entry!r}"
    target: dict[str, Any]
    if isinstance(entry, str):
        addr, proto, port = entry, "any", 0
        if "/" in entry and entry.rsplit("/", 1)[1] in PROTOCOLS:
            addr, proto = entry.rsplit("/", 1)
        if ":" in addr:
            addr, _, port_text = addr.partition(":")
            if not port_text.isdigit():
                raise ConfigError(f"{culprit}: invalid port {port_text!r}")
            port = int(port_text)
        if addr == "lan":
            target = {"lan": True}
        elif addr == vocab.SAME_MANUFACTURER:
            target = {"same_manufacturer": True}
        elif addr == vocab.MY_CONTROLLER:
            target = {"my_controller": True}
        elif addr.startswith("@"):
            target = {"controller": addr[1:]}
        elif re.fullmatch(r"[0-9.]+(/.*)?", addr):
            target = {"address": addr}
        else:
            target = {"name": addr}
        entry_dict: dict[str, Any] = {**target, "proto": proto, "port": port}
    elif isinstance(entry, dict):
        unknown = set(entry) - {*_TARGETS, "proto", "port"}
        if unknown:
            raise ConfigError(f"{culprit}: unknown key(s) {sorted(unknown)}")
        given = [k for k in _TARGETS if k in entry]
        if len(given) != 1:
            raise ConfigError(f"{culprit}: give exactly one of {', '.join(_TARGETS[:-1])} or "
                              f"{_TARGETS[-1]}")
        for key in ("lan", "same_manufacturer", "my_controller"):
            if key in entry and entry[key] is not True:
                raise ConfigError(f"{culprit}: {key} must be true")
        entry_dict = {"proto": "any", "port": 0, **entry}
    else:
        raise ConfigError(f"{culprit}: expected 'address[/prefix][:port][/proto]', "
                          "'name[:port][/proto]', 'lan[:port][/proto]', '@controller[:port][/proto]', "
                          f"'{vocab.SAME_MANUFACTURER}[:port][/proto]', "
                          f"'{vocab.MY_CONTROLLER}[:port][/proto]' or a table")
    proto = entry_dict["proto"]
    if not isinstance(proto, str) or proto not in PROTOCOLS:
        raise ConfigError(f"{culprit}: unknown protocol {proto!r} (known: {', '.join(PROTOCOLS)})")
    port = entry_dict["port"]
    if port:
        _port(umbox, port, where)
        if proto not in ("tcp", "udp"):
            raise ConfigError(f"{culprit}: a port needs proto tcp or udp")
    if "name" in entry_dict:
        if not isinstance(entry_dict["name"], str):
            raise ConfigError(f"{culprit}: name must be a string")
        return Destination(None, PROTOCOLS[proto], port, name=check_dns_name(entry_dict["name"], culprit))
    if "lan" in entry_dict:
        return Destination(None, PROTOCOLS[proto], port, lan=True)
    if "same_manufacturer" in entry_dict:
        return Destination(None, PROTOCOLS[proto], port, same_manufacturer=True)
    if "my_controller" in entry_dict:
        return Destination(None, PROTOCOLS[proto], port, my_controller=True)
    if "manufacturer" in entry_dict:
        return Destination(None, PROTOCOLS[proto], port, manufacturer=vocab.check_mud_authority(
            entry_dict["manufacturer"], f"{culprit}: manufacturer"))
    if "controller" in entry_dict:
        controller = entry_dict["controller"]
        if not isinstance(controller, str) or not CONTROLLER.fullmatch(controller):
            raise ConfigError(f"{culprit}: controller: a class name of 1-40 lower-case letters, "
                              "digits, - and _")
        return Destination(None, PROTOCOLS[proto], port, controller=controller)
    try:
        network = ipaddress.IPv4Network(str(entry_dict.get("address")), strict=True)
    except ValueError as e:
        raise ConfigError(f"{culprit}: invalid address or CIDR: {e}") from None
    return Destination(network, PROTOCOLS[proto], port)


def _mud_hosts(entry: Destination, c: CompiledStack, my_controllers, mud_url, peers,
               where: str) -> list[Destination]:
    """What a same-manufacturer, manufacturer or my-controller entry stands for, with the
    entry's protocol and port; nothing (and a line in c.missing_mud) while it stands for none."""
    if entry.my_controller:
        hosts = (my_controllers or {}).get(mud_url) if mud_url else None
        if hosts is None:
            c.missing_mud.append(vocab.MY_CONTROLLER)
        return [dataclasses.replace(h, proto=entry.proto, port=entry.port) for h in hosts or ()]
    authority = entry.manufacturer or vocab.mud_authority(mud_url)
    addresses = (peers or {}).get(authority) if authority else None
    if not addresses:
        c.missing_mud.append(f"manufacturer {entry.manufacturer}" if entry.manufacturer
                             else vocab.SAME_MANUFACTURER)
        return []
    out = []
    for address in addresses:
        try:
            network = ipaddress.IPv4Network(f"{address}/32")
        except ValueError:
            raise ConfigError(f"{where}the device of MUD authority {authority} at {address!r}: "
                              "not an IPv4 address") from None
        out.append(Destination(network, entry.proto, entry.port))
    return out


def registrable_domains(destinations: list[Destination]) -> list[Destination]:
    """For each name, the registrable domain it is under (by the Public Suffix List, from the
    publicsuffixlist package) and every name below it, with the same protocol and port:
    a vendor's cloud moves between names under its own domain. A name that is itself a public
    suffix (or under a private one such as s3.amazonaws.com's) gives only itself."""
    from publicsuffixlist import PublicSuffixList
    psl = _psl(PublicSuffixList)
    out = []
    for d in destinations:
        if d.name is None:
            continue
        domain = psl.privatesuffix(d.name.removeprefix("*."))
        if domain:
            out += [dataclasses.replace(d, name=domain), dataclasses.replace(d, name=f"*.{domain}")]
    return out


_PSL: list = []


def _psl(factory):
    if not _PSL:
        _PSL.append(factory())
    return _PSL[0]


def learning_stack(normal: dict) -> dict:
    """The posture "learning" of a profile, from its normal stack: the detectors, anti-spoofing
    (and the gateway guard, always on) stay; nothing the device opens is blocked, and every flow
    outside the profile's destinations is reported (egress_anomaly, report only), so the
    supervisor can record it. The lateral block goes too: a device's LAN peers are learnt."""
    stack = copy.deepcopy(normal)
    stack.pop("lateral_block", None)
    stack.pop("quarantine", None)
    allow = stack.pop("allowlist", None)
    egress = stack.pop("egress_anomaly", None) or {}
    destinations = (allow or {}).get("destinations") or egress.get("destinations") or []
    stack["egress_anomaly"] = {"destinations": list(destinations), "block": False}
    return stack


def validate(stack, where: str = "") -> dict[str, dict]:
    """Checks names and parameters and fills defaults; returns the normalised stack."""
    if not isinstance(stack, dict):
        raise ConfigError(f"{where}umbox stack must be a table of umbox names, got {stack!r}")
    out = {}
    for umbox, given in stack.items():
        if umbox not in CATALOGUE:
            raise UnknownUmboxError(
                f"{where}unknown umbox {umbox!r} (known: {', '.join(sorted(CATALOGUE))})")
        given = {} if given in (None, True) else given
        if not isinstance(given, dict):
            raise ConfigError(f"{where}umbox {umbox}: parameters must be a table, got {given!r}")
        spec = CATALOGUE[umbox]
        unknown = set(given) - set(spec)
        if unknown:
            raise ConfigError(f"{where}umbox {umbox}: unknown parameter(s) {sorted(unknown)} "
                              f"(known: {', '.join(spec) or 'none'})")
        params = {}
        for name, p in spec.items():
            if name in given and not (given[name] is None and p.default is None):
                params[name] = _check(umbox, name, p, given[name], where)
            elif p.required:
                raise ConfigError(f"{where}umbox {umbox}: parameter {name} is required")
            else:
                params[name] = copy.deepcopy(p.default)   # a stack never shares the catalogue's list
        out[umbox] = params
    return out


def compile_stack(stack, where: str = "",
                  controllers: dict[str, list[Destination]] | None = None,
                  my_controllers: dict[str, list[Destination]] | None = None,
                  mud_url: str | None = None,
                  peers: dict[str, list[str]] | None = None) -> CompiledStack:
    """`controllers` (check_controllers' result) stands in for the profile's controller
    entries; without it they are checked and left out (a profile on its own). The same for
    RFC 8520's device abstractions: `mud_url` is the device's MUD URL, `my_controllers`
    (check_my_controllers' result) the site's hosts per MUD URL, and `peers` {MUD authority:
    [LAN address, ...]} the approved devices by authority; same-manufacturer and manufacturer
    entries become /32s of those addresses (the device's own among them does no harm: its
    packets to itself never reach the gateway, and devices of one maker share one list)."""
    params = validate(stack, where)
    c = CompiledStack(params=params)
    d = c.device_fields
    F = maps.Flag
    if "quarantine" in params:
        c.flags |= F.QUARANTINE
        if params["quarantine"]["management"]:
            c.flags |= F.QUARANTINE_MGMT
    if "rate_limit" in params:
        p = params["rate_limit"]
        if not p["packets_per_second"] and not p["bytes_per_second"]:
            raise ConfigError(f"{where}umbox rate_limit: set packets_per_second or bytes_per_second")
        c.flags |= F.RATE_LIMIT
        pps, bps = p["packets_per_second"], p["bytes_per_second"]
        if pps:   # GCRA: the kernel keeps the interval between packets and the burst as time
            interval = 10**9 // pps
            d.update(packet_interval_ns=interval,
                     packet_tolerance_ns=((p["burst_packets"] or pps) - 1) * interval)
        if bps:
            d.update(byte_cost_ns_x1024=max(1, round(1024 * 10**9 / bps)),
                     byte_tolerance_ns=(p["burst_bytes"] or max(1514, bps)) * 10**9 // bps)
    if "port_scan" in params:
        p = params["port_scan"]
        c.flags |= F.PORT_SCAN
        d.update(scan_ports=p["ports"], scan_window_ms=p["window_ms"], scan_block_s=p["block_seconds"])
    if "syn_flood" in params:
        p = params["syn_flood"]
        c.flags |= F.SYN_FLOOD
        d.update(syn_limit=p["syns"], syn_window_ms=p["window_ms"], syn_block_s=p["block_seconds"])
    if "brute_force" in params:
        p = params["brute_force"]
        ports = [_port("brute_force", x, where) for x in p["ports"]]
        if not 1 <= len(ports) <= maps.LOGIN_PORTS:
            raise ConfigError(f"{where}umbox brute_force, parameter ports: give 1 to "
                              f"{maps.LOGIN_PORTS} login ports, got {len(ports)}")
        c.flags |= F.BRUTE_FORCE
        d.update(bf_attempts=p["attempts"], bf_window_ms=p["window_ms"], bf_block_s=p["block_seconds"],
                 bf_ports=ports)
    if "lateral_block" in params:
        c.flags |= F.LATERAL_BLOCK
    if "dns_gateway_only" in params:
        c.flags |= F.DNS_GATEWAY_ONLY
    if "deception" in params:
        c.flags |= F.DECEPTION
    if "anti_spoof" in params:
        c.flags |= F.ANTI_SPOOF
    destinations = None
    if "allowlist" in params:
        c.flags |= F.ALLOWLIST
        destinations = params["allowlist"]["destinations"]
    if "egress_anomaly" in params:
        p = params["egress_anomaly"]
        c.flags |= F.EGRESS_ANOMALY | (F.EGRESS_BLOCK if p["block"] else 0)
        if p["destinations"] is not None and destinations is not None:
            raise ConfigError(f"{where}umbox egress_anomaly, parameter destinations: the allowlist "
                              "umbox already gives the destinations; set them in one place")
        if destinations is None:
            if p["destinations"] is None:
                raise ConfigError(f"{where}umbox egress_anomaly: parameter destinations is required "
                                  "without an allowlist umbox")
            destinations = p["destinations"]
    if destinations is not None:
        umbox = "allowlist" if "allowlist" in params else "egress_anomaly"
        parsed = []
        for entry in (parse_destination(x, umbox, where) for x in destinations):
            if entry.same_manufacturer or entry.manufacturer or entry.my_controller:
                parsed += _mud_hosts(entry, c, my_controllers, mud_url, peers, where)
                continue
            if entry.controller is None:
                parsed.append(entry)
                continue
            hosts = (controllers or {}).get(entry.controller)
            if hosts is None:
                c.missing_controllers.append(entry.controller)
            parsed += [dataclasses.replace(h, proto=entry.proto, port=entry.port) for h in hosts or ()]
        if params.get(umbox, {}).get("registrable_domains"):
            parsed += registrable_domains(parsed)
        c.destinations = [d for d in parsed if d.name is None]
        c.names = list(dict.fromkeys(d for d in parsed if d.name is not None))
        per_target: dict = {}
        for dst in parsed:
            per_target.setdefault(dst.name or ("lan" if dst.lan else dst.network), []).append(dst)
        for target, rules in per_target.items():
            if len(rules) > maps.ALLOW_RULES:
                raise ConfigError(f"{where}umbox {umbox}: {target} has {len(rules)} port rules, "
                                  f"at most {maps.ALLOW_RULES} per destination")
    if "conn_limit" in params:
        p = params["conn_limit"]
        if not p["concurrent"] and not p["new_per_second"]:
            raise ConfigError(f"{where}umbox conn_limit: set concurrent or new_per_second")
        c.conn_limit = p
    c.gate_port, c.gate_policy = _gate(params, where)
    if "deception" in params:
        imitate = params["deception"]["imitate"]
        if not isinstance(imitate, str) or not re.fullmatch(r"[a-z][a-z0-9_-]{0,39}", imitate):
            raise ConfigError(f"{where}umbox deception, parameter imitate: a device type's name "
                              f"(lower-case letters, digits, - and _), got {imitate!r}")
        # the decoy learns from the gate's policy file what to imitate; nftables never steers
        # a decoy-only device's own web port to the gate (no gate_port)
        c.gate_policy = {**(c.gate_policy or {"port": None, "auth": False, "allow": None,
                                              "token_guard": None}),
                         "decoy": {"type": imitate}}
    return c


def _gate(params: dict, where: str) -> tuple[int | None, dict | None]:
    """The web port nftables steers to the gate and the gate's policy for it, from auth_gate,
    api_filter and token_guard: one port per device, so the ones given must agree."""
    from appliance.dataplane import gatepolicy
    present = [u for u in GATE_UMBOXES if u in params]
    if not present:
        return None, None
    ports = [(u, params[u]["port"]) for u in present if params[u]["port"] is not None]
    for umbox, port in ports[1:]:
        if port != ports[0][1]:
            raise ConfigError(f"{where}umbox {umbox}, parameter port: {port} is not {ports[0][0]}'s "
                              f"port {ports[0][1]} (the gate stands in front of one web port per "
                              "device; leave it out to take the other's)")
    port = ports[0][1] if ports else 80
    allow = None
    if "api_filter" in params:
        allow = params["api_filter"]["allow"]
        if len(allow) > gatepolicy.MAX_RULES:
            raise ConfigError(f"{where}umbox api_filter, parameter allow: {len(allow)} rules, at most "
                              f"{gatepolicy.MAX_RULES}")
        for rule in allow:
            try:
                gatepolicy.compile_rule(rule)
            except ValueError as e:
                raise ConfigError(f"{where}umbox api_filter, parameter allow: {e}") from None
    guard = None
    if "token_guard" in params:
        guard = {k: v for k, v in params["token_guard"].items() if k != "port"}
        try:
            gatepolicy.check_token_guard(guard)
        except ValueError as e:
            raise ConfigError(f"{where}umbox token_guard, parameter {e}") from None
    return port, {"port": port, "auth": "auth_gate" in params, "allow": allow, "token_guard": guard}
