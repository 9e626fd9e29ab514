"""nftables half of the data path: table `inet kalki`, every change one transaction through
libnftables' JSON API (python3-nftables).

nftables carries what it does best here: connection tracking (connection limits) and the
redirect of a device's web port to the authentication gate. XDP carries the rest.

A device has no chain and no rule of its own: it is an element in sets (its MAC in `macs`, its
address in `ips`, and in the sets of the umboxes its posture turns on), each element carrying
the device id as its comment. The rules are fixed, one per umbox class (a connection limit of
10 is the class `cl_10`), and are added when the supervisor starts (Dataplane.prepare: every
profile's), or else the first time a class is used. This is what keeps a posture change's
cost flat: libnftables reads the table's chains, rules and sets, but not the sets' elements,
before each transaction, so a table of elements costs the same at 10 devices as at 4,000
(bench_apply: nft_posture_change_ms), where a chain per device made it grow.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import time

from appliance import netns
from appliance.errors import DataplaneError

TABLE = "kalki"
FAMILY = "inet"
_T: dict[str, object] = {"family": FAMILY, "table": TABLE}
# The tamper watch lists the table although its generation says nothing but this process
# changed it, at least this often: a backstop (see Nft.untouched), not the watch itself.
FULL_LOOK_SECONDS = 60.0

NETLINK_NETFILTER = 12
_GETGEN = (10 << 8) | 16        # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN
_NEWGEN = (10 << 8) | 15
_NFTA_GEN_ID = 1


class Generation:
    """The nftables ruleset's generation in one network namespace. The kernel counts every
    committed transaction, by anyone, on any table; a refused or no-op transaction, a listing
    and a timed-out element count nothing. So an unchanged number is an unchanged ruleset.
    One netlink request (NFT_MSG_GETGEN), decoded here: importing pyroute2 for it would cost
    the supervisor 7-20 MB."""

    def __init__(self, namespace: str | None):
        with netns.entered(namespace):
            self._sock: socket.socket | None = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(1.0)
        self._seq = 0

    def read(self) -> int | None:
        """The generation now, or None if the kernel does not say (then nothing is trusted)."""
        if self._sock is None:
            return None
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        request = struct.pack("=IHHII", 20, _GETGEN, 1, self._seq, 0) + bytes(4)  # NLM_F_REQUEST
        try:
            self._sock.send(request)
            while True:
                reply = self._sock.recv(4096)
                length, kind, _, seq, _ = struct.unpack_from("=IHHII", reply)
                if seq == self._seq:
                    break
        except (OSError, struct.error):
            return None
        if kind != _NEWGEN:
            return None
        offset = 20     # nlmsghdr + nfgenmsg
        while offset + 4 <= min(length, len(reply)):
            size, attr = struct.unpack_from("=HH", reply, offset)
            if size < 4:
                break
            if attr & 0x7FFF == _NFTA_GEN_ID and size >= 8:
                return struct.unpack_from(">I", reply, offset + 4)[0]
            offset += (size + 3) & ~3
        return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _match(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key):
    return {"meta": {"key": key}}


_CT_NEW = _match({"ct": {"key": "state"}}, "new", "in")
_ETHER_SADDR = {"payload": {"protocol": "ether", "field": "saddr"}}
_IP_DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}
_IP_SADDR = {"payload": {"protocol": "ip", "field": "saddr"}}
DEVICE_SETS = ("macs", "ips", "lateral", "gate", "deceive")     # the fixed sets that hold devices
DECOY_PORTS = (2323, 8082)      # the gateway's decoy: telnet, web (appliance/dataplane/decoy.py)
DECOYED_TELNET, DECOYED_WEB = 23, (80, 8080)     # a deception device's ports the decoy answers
METER_SIZE = 65535
STRAY = -1      # read_back's device id for elements someone else put in our sets


def class_sets(conn_limit: dict | None) -> list[str]:
    """The class sets a device's address is in for its connection limits: cl_<concurrent>
    and rl_<new per second>."""
    if not conn_limit:
        return []
    out = []
    if conn_limit.get("concurrent"):
        out.append(f"cl_{conn_limit['concurrent']}")
    if conn_limit.get("new_per_second"):
        out.append(f"rl_{conn_limit['new_per_second']}")
    return out


def _class_rule(name: str) -> list[dict]:
    """The rule of a class: per device (its address is the meter's key), over the limit is
    dropped. cl_N: more than N connections open at once; rl_N: more than N new a second."""
    kind, value = name.split("_")
    n = int(value)
    stmt: dict[str, dict]
    if kind == "cl":
        stmt = {"ct count": {"val": n, "inv": True}}
        op = "add"
    else:
        stmt = {"limit": {"rate": n, "burst": max(1, n // 2), "per": "second", "inv": True}}
        op = "update"
    return [_match(_IP_DADDR, f"@{name}"), _CT_NEW,
            {"set": {"op": op, "elem": _IP_DADDR, "set": f"@{name}_meter", "stmt": [stmt]}},
            {"counter": None}, {"drop": None}]


class Nft:
    """Transactions against `inet kalki` inside one network namespace."""

    def __init__(self, namespace: str | None, devices_if: str, gateway_ip: str, gate_port: int,
                 decoy_ports: tuple[int, int] = DECOY_PORTS):
        self.namespace = namespace
        self.devices_if = devices_if
        self.gateway_ip = gateway_ip
        self.gate_port = gate_port
        self.decoy_telnet, self.decoy_http = decoy_ports
        self._classes: set[str] | None = None
        import nftables
        with netns.entered(namespace):
            self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        # One libnftables context is not safe in two threads at once (the tamper watch reads in
        # a worker thread while the loop changes postures): a crossing aborted the supervisor
        # inside libnftnl ("nf_tables kernel ABI is broken").
        self._lock = threading.Lock()
        self._generation = Generation(namespace)
        # The generation at which the table was last found as expected, and this process's
        # own transactions committed since; None: look again (untouched()).
        self._trusted: int | None = None
        self._own_since = 0
        self._looked_at = -1e9

    def close(self) -> None:
        self._generation.close()

    def _cmd(self, commands: list[dict]):
        with self._lock, netns.entered(self.namespace):
            result = self._nft.json_cmd({"nftables": commands})
            if result[0] == 0 and any("list" not in c for c in commands):
                if any("delete" in c for c in commands):
                    # A delete that held changed the table, so the transaction moved the
                    # generation by exactly one: counted for the watch's next look, not read
                    # now (80 us of a posture change's 0.5 ms after the loop had been idle,
                    # against 9 us back to back). A posture change always deletes something.
                    self._own_since += 1
                else:
                    self._after_adds()
            return result

    def _after_adds(self) -> None:
        """A transaction of adds alone may have changed nothing (an element already there),
        so it moved the generation by one or by none: read now, and any more means somebody
        else committed since the table was last trusted. (Theirs just before an add of ours
        that changed nothing reads as ours: the periodic full look is the backstop for that.)"""
        now = self._generation.read()
        expected = None if self._trusted is None else self._trusted + self._own_since
        if expected is not None and now is not None and 0 <= now - expected <= 1:
            self._trusted, self._own_since = now, 0
        else:
            self._trusted = None

    # -- tampering: whether anyone else changed the ruleset ---------------------------------
    def untouched(self) -> bool:
        """Whether nobody but this process has committed to nftables since the table was
        last found as expected (trust()), and that look is under FULL_LOOK_SECONDS old: then
        the tamper watch need not list the table, which costs 14 ms at 100 devices and 53 ms
        at 1,000 (a listing's JSON is parsed holding the GIL, which the loop then waits for)."""
        with self._lock:
            if self._trusted is None or time.monotonic() - self._looked_at >= FULL_LOOK_SECONDS:
                return False
            now = self._generation.read()
            # Each of our transactions counted since moved it by exactly one (_cmd): any other
            # number means somebody else committed, and the table is listed.
            if now is None or now != self._trusted + self._own_since:
                self._trusted = None
                return False
            self._trusted, self._own_since = now, 0
            return True

    def generation(self) -> int | None:
        with self._lock:
            return self._generation.read()

    def trust(self, generation: int | None) -> None:
        """The table was found as expected at `generation` (read before the look): trusted
        from there, if nothing was committed since."""
        with self._lock:
            if generation is not None and self._generation.read() == generation:
                self._trusted, self._own_since, self._looked_at = generation, 0, time.monotonic()

    def run(self, commands: list[dict], what: str) -> dict:
        rc, out, err = self._cmd(commands)
        if rc != 0:
            raise DataplaneError(f"nftables refused {what}: {str(err).strip()}")
        return out or {}

    # -- the table ------------------------------------------------------------------------
    def base_commands(self, existing_chains=()) -> list[dict]:
        """The table's own maps, sets, chains and rules; chains in existing_chains (and their
        rules) are left out, so a table made by an older version gains what it lacks."""
        dev = self.devices_if

        def rule(chain, *expr):
            return {"add": {"rule": {**_T, "chain": chain, "expr": list(expr)}}}

        def kept(cmd):
            what = next(iter(cmd["add"]))
            body = cmd["add"][what]
            return not ((what == "chain" and body["name"] in existing_chains)
                        or (what == "rule" and body["chain"] in existing_chains))

        return [c for c in self._base(dev, rule) if kept(c)]

    def _base(self, dev, rule) -> list[dict]:
        return [
            {"add": {"table": {"family": FAMILY, "name": TABLE}}},
            {"add": {"set": {**_T, "name": "macs", "type": "ether_addr"}}},
            {"add": {"set": {**_T, "name": "ips", "type": "ipv4_addr"}}},
            {"add": {"set": {**_T, "name": "lateral", "type": "ether_addr"}}},
            {"add": {"set": {**_T, "name": "gate", "type": ["ipv4_addr", "inet_service"]}}},
            # deception: the devices it is on, and the sources the drop set holds (mirrored by
            # the data path, with a timeout past the drop set's own)
            {"add": {"set": {**_T, "name": "deceive", "type": "ipv4_addr"}}},
            {"add": {"set": {**_T, "name": "attackers", "type": "ipv4_addr", "flags": ["timeout"]}}},
            {"add": {"chain": {**_T, "name": "from_devices"}}},
            {"add": {"chain": {**_T, "name": "to_devices"}}},
            {"add": {"chain": {**_T, "name": "forward", "type": "filter", "hook": "forward",
                               "prio": 0, "policy": "drop"}}},
            {"add": {"chain": {**_T, "name": "prerouting", "type": "nat", "hook": "prerouting",
                               "prio": -100, "policy": "accept"}}},
            {"add": {"chain": {**_T, "name": "input", "type": "filter", "hook": "input",
                               "prio": 0, "policy": "accept"}}},
            {"add": {"chain": {**_T, "name": "resolver", "type": "nat", "hook": "prerouting",
                               "prio": -110, "policy": "accept"}}},
            # A device's DNS, wherever it is addressed (8.8.8.8, a resolver it was built
            # with), is answered by the gateway's resolver, which binds every answer in the
            # data path (appliance.dataplane.names); XDP lets port 53 through for this.
            rule("resolver", _match(_meta("iifname"), dev),
                 _match({"payload": {"protocol": "ip", "field": "daddr"}}, self.gateway_ip, "!="),
                 _match(_meta("l4proto"), {"set": ["tcp", "udp"]}),
                 _match({"payload": {"protocol": "th", "field": "dport"}}, 53),
                 {"dnat": {"family": "ip", "addr": self.gateway_ip}}),
            # What a known attacker sends a deception device and the decoy does not take (see
            # prerouting) goes nowhere, even on a connection opened before it was known.
            rule("forward", _match(_IP_SADDR, "@attackers"), _match(_IP_DADDR, "@deceive"),
                 {"counter": None}, {"drop": None}),
            rule("forward", _match({"ct": {"key": "state"}}, ["established", "related"], "in"),
                 {"accept": None}),
            rule("forward", _match({"ct": {"key": "state"}}, "invalid", "in"), {"drop": None}),
            # XDP checks destinations on the packets that open a connection; this makes sure a
            # TCP connection can only be opened by a SYN (conntrack's loose pick-up of
            # mid-stream packets would otherwise let an ACK open one).
            rule("forward", _match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}},
                                          ["fin", "syn", "rst", "ack"]]}, "syn", "!="),
                 _CT_NEW, {"counter": None}, {"drop": None}),
            # Traffic between two devices passes the sender's checks, then the receiver's.
            rule("forward", _match(_meta("iifname"), dev), {"jump": {"target": "from_devices"}}),
            rule("forward", _match(_meta("oifname"), dev), {"jump": {"target": "to_devices"}}),
            rule("forward", {"accept": None}),
            # A device not in `macs` / `ips` (unknown, or in quarantine) is forwarded nowhere,
            # even with XDP detached.
            rule("from_devices", _match(_ETHER_SADDR, "@macs", "!="), {"counter": None}, {"drop": None}),
            # lateral_block again, behind XDP's, so that a detached program (the watch puts it
            # back within a second) is no window for lateral movement.
            rule("from_devices", _match(_ETHER_SADDR, "@lateral"), _match(_meta("oifname"), dev),
                 {"counter": None}, {"drop": None}),
            rule("to_devices", _match(_IP_DADDR, "@ips", "!="), {"counter": None}, {"drop": None}),
            # Devices reach the gateway at its device-side address only, where XDP lets
            # through DHCP, DNS, NTP, MQTT and ping and reports the rest. Its other addresses
            # (the uplink's, where SSH and the web page listen) are not theirs to open.
            rule("input", _match(_meta("iifname"), dev),
                 _match({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}),
            rule("input", _match(_meta("iifname"), dev),
                 _match({"payload": {"protocol": "udp", "field": "dport"}}, 67), {"accept": None}),
            rule("input", _match(_meta("iifname"), dev),
                 _match({"payload": {"protocol": "ip", "field": "daddr"}}, self.gateway_ip, "!="),
                 {"counter": None}, {"drop": None}),
            # The gate learns the device it stands for from SO_ORIGINAL_DST. (A dnat through a
            # concatenated map would do too, but libnftables 1.0.6 crashes parsing it as JSON.)
            # deception: XDP lets a drop-set source's packets to a deception device through once
            # the source is in `attackers`; its telnet and web connections go to the decoy.
            rule("prerouting", _match(_IP_SADDR, "@attackers"), _match(_IP_DADDR, "@deceive"),
                 _match({"payload": {"protocol": "tcp", "field": "dport"}}, DECOYED_TELNET),
                 {"counter": None}, {"redirect": {"port": self.decoy_telnet}}),
            rule("prerouting", _match(_IP_SADDR, "@attackers"), _match(_IP_DADDR, "@deceive"),
                 _match({"payload": {"protocol": "tcp", "field": "dport"}}, {"set": list(DECOYED_WEB)}),
                 {"counter": None}, {"redirect": {"port": self.decoy_http}}),
            rule("prerouting", _match({"concat": [{"payload": {"protocol": "ip", "field": "daddr"}},
                                                  {"payload": {"protocol": "tcp", "field": "dport"}}]},
                                      "@gate"), {"redirect": {"port": self.gate_port}}),
        ]

    def table_exists(self) -> bool:
        rc, _, _ = self._cmd([{"list": {"table": {"family": FAMILY, "name": TABLE}}}])
        return rc == 0

    def create_table(self) -> None:
        self._classes = set()
        self.run(self.base_commands(), "creating table inet kalki")

    def ensure_table(self) -> None:
        """Creates the table, or adds the base chains a table made by an older version lacks.
        A table of the older layout (a chain per device, verdict maps) is replaced in one
        transaction: there is no moment without a table, and its devices are applied again."""
        self._classes = None
        if not self.table_exists():
            self.create_table()
            return
        out = self.run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}], "reading inet kalki")
        items = json.loads(out)["nftables"] if isinstance(out, str) else out["nftables"]
        chains = {i["chain"]["name"] for i in items if "chain" in i}
        if (any("map" in i for i in items) or any(c.startswith("dev") for c in chains)
                or self._base_rules_differ(items, chains)):
            self.run([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}, *self.base_commands()],
                     "replacing inet kalki of an older layout")
            self._classes = set()
            return
        missing = [c for c in self.base_commands(chains) if "chain" in c["add"] or "rule" in c["add"]]
        if missing:
            self.run(self.base_commands(chains), "adding base chains to inet kalki")

    def _base_rules_differ(self, items: list[dict], chains: set[str]) -> bool:
        """Whether a base chain the table has holds other rules than this version's (an older
        version's table; to_devices also holds one rule per connection-limit class)."""
        have: dict[str, int] = {}
        for i in items:
            if "rule" in i and i["rule"]["chain"] in self.BASE_CHAINS:
                have[i["rule"]["chain"]] = have.get(i["rule"]["chain"], 0) + 1
        classes = sum(1 for i in items if "set" in i and _is_class(i["set"]["name"]))
        want = self.expected_base_rules()
        return any(have.get(c, 0) != want[c] + (classes if c == "to_devices" else 0)
                   for c in self.BASE_CHAINS if c in chains)

    def expected_base_rules(self) -> dict[str, int]:
        base_rules = {c: 0 for c in self.BASE_CHAINS}
        for cmd in self._base(self.devices_if, lambda chain, *expr: {"add": {"rule": {"chain": chain}}}):
            body = cmd["add"].get("rule")
            if body:
                base_rules[body["chain"]] += 1
        return base_rules

    def delete_table(self) -> None:
        if self.table_exists():
            self.run([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}], "deleting inet kalki")

    # -- devices --------------------------------------------------------------------------
    def known_classes(self) -> set[str]:
        """The class sets the table has (and so their rules), read once; kept in step after."""
        if self._classes is None:
            out = self.run([{"list": {"sets": {"family": FAMILY}}}], "reading the sets of inet kalki")
            items = json.loads(out)["nftables"] if isinstance(out, str) else out["nftables"]
            self._classes = {i["set"]["name"] for i in items if "set" in i
                             and i["set"].get("table") == TABLE and _is_class(i["set"]["name"])}
        return self._classes

    def _class_commands(self, names) -> list[dict]:
        cmds: list[dict] = []
        for name in sorted(set(names) - self.known_classes()):
            cmds += [{"add": {"set": {**_T, "name": name, "type": "ipv4_addr"}}},
                     {"add": {"set": {**_T, "name": f"{name}_meter", "type": "ipv4_addr",
                                      "size": METER_SIZE}}},
                     {"add": {"rule": {**_T, "chain": "to_devices", "expr": _class_rule(name)}}}]
        return cmds

    def ensure_classes(self, names) -> list[str]:
        """The classes of `names` the table lacks, added in one transaction; returns them."""
        missing = sorted(set(names) - self.known_classes())
        if missing:
            self.run(self._class_commands(missing),
                     f"adding the connection-limit classes {', '.join(missing)}")
            self.known_classes().update(missing)
        return missing

    def plan(self, device_id: int, mac: str, ip: str, conn_limit: dict | None, gate_port: int | None,
             current: dict | None, lateral_block: bool = False,
             quarantine: bool = False, deception: bool = False) -> tuple[list[dict], dict] | None:
        """What makes the device's part of the table what it should be, given what the table
        holds for it now: (the transaction's commands, the device's state after them), or None
        when nothing needs to change. Only elements are added and deleted, and only those that
        differ. In quarantine the device misses `macs`, `ips` and `gate`, so nothing is
        forwarded to or from it, nor steered to the gate, even with XDP detached."""
        held = current or empty_state()
        if quarantine:
            # With deception a known attacker still meets the decoy (prerouting redirects to the
            # gateway itself, forward drops the rest). What only restricts the device further
            # (`lateral`, its connection-limit classes) stays as it was, for its own mac and ip:
            # each deletion would cost the kernel path's transaction one element command (4 in
            # all for a camera under attack: 0.38 against 0.24 ms hot, bench_nft's camera_attack).
            wanted = {**empty_state(), "deceive": [ip] if deception else [],
                      "lateral": [m for m in held["lateral"] if m == mac],
                      "classes": [(name, v) for name, v in held["classes"] if v == ip]}
        else:
            wanted = {"macs": [mac], "ips": [ip], "gates": [(ip, gate_port)] if gate_port else [],
                      "lateral": [mac] if lateral_block else [],
                      "deceive": [ip] if deception else [],
                      "classes": [(name, ip) for name in class_sets(conn_limit)]}
        cmds = self._changes(device_id, held, wanted)
        return (cmds, wanted) if cmds is not None else None

    def _changes(self, device_id: int, held: dict, wanted: dict) -> list[dict] | None:
        """The commands that take a device's part from `held` to `wanted`; None if equal."""
        has, wants = _elements(held), _elements(wanted)
        if has == wants:
            return None
        tag = str(device_id)
        cmds = self._class_commands(name for name, _ in wanted["classes"])
        for _, set_name, value in has - wants:
            cmds.append({"delete": {"element": {**_T, "name": set_name, "elem": [_elem_key(value)]}}})
        for _, set_name, value in wants - has:
            cmds.append({"add": {"element": {**_T, "name": set_name, "elem": [
                {"elem": {"val": _elem_key(value), "comment": tag}}]}}})
        if cmds and self._classes is not None:
            self._classes |= {name for name, _ in wanted["classes"]}
        return cmds

    # -- deception: the drop set's sources, mirrored ------------------------------------
    def add_attacker(self, ip: str, seconds: int | None) -> None:
        """`ip` in `attackers` for `seconds` (None: until removed), replacing what was there:
        one transaction, add-delete-add, which holds whether the element was there or not.
        (A delete of an absent element fails its transaction, and libnftables' error path
        took 11 ms of the loop after every kernel detector's block.)"""
        elem: dict = {"val": ip}
        if seconds:
            elem["timeout"] = seconds
        self.run([*self._attacker_gone(ip), {"add": {"element": {**_T, "name": "attackers",
                                                                  "elem": [{"elem": elem}]}}}],
                 f"marking {ip} an attacker for deception")

    def remove_attacker(self, ip: str) -> None:
        self._cmd(self._attacker_gone(ip))      # no table (yet): nothing to remove

    @staticmethod
    def _attacker_gone(ip: str) -> list[dict]:
        element = {"element": {**_T, "name": "attackers", "elem": [ip]}}
        return [{"add": element}, {"delete": element}]

    def removal_commands(self, device_id: int, current: dict | None) -> list[dict]:
        """Every element of the device's deleted."""
        return self._changes(device_id, current or empty_state(), empty_state()) or []

    def forget_classes(self) -> None:
        """The table was made anew (or behind our back): read its classes again."""
        self._classes = None

    # -- tampering ------------------------------------------------------------------------
    BASE_CHAINS = ("from_devices", "to_devices", "forward", "prerouting", "input", "resolver")

    def fingerprint(self) -> dict | None:
        """What a look at the table's outline shows, cheaply (no device rules are listed):
        its chains, the rules of its base chains, and the entries of its maps and the gate
        set. None if the table is gone."""
        lists: list[dict] = [{"list": {"chains": None}}]
        lists += [{"list": {"chain": {**_T, "name": c}}} for c in self.BASE_CHAINS]
        lists += [{"list": {"set": {**_T, "name": m}}} for m in DEVICE_SETS]
        lists += [{"list": {"set": {**_T, "name": c}}} for c in sorted(self.known_classes())]
        items: list[dict] = []
        for command in lists:     # libnftables 1.0.6 refuses several list commands at once
            rc, out, _ = self._cmd([command])
            if rc != 0:
                break
            items += json.loads(out)["nftables"] if isinstance(out, str) else out["nftables"]
        if rc != 0:
            return None if not self.table_exists() else {"unreadable": True}
        chains = {i["chain"]["name"] for i in items
                  if "chain" in i and i["chain"].get("table") == TABLE and i["chain"].get("family") == FAMILY}
        base_rules = {c: 0 for c in self.BASE_CHAINS}
        for i in items:
            if "rule" in i and i["rule"]["chain"] in base_rules:
                base_rules[i["rule"]["chain"]] += 1
        elements = {i[k]["name"]: len(i[k].get("elem", [])) for i in items for k in ("map", "set") if k in i}
        return {"chains": chains, "base_rules": base_rules, "elements": elements}

    def expected_fingerprint(self, state: dict[int, dict]) -> dict:
        """The outline the table has when it holds `state` (per device, as read_back gives)."""
        base_rules = self.expected_base_rules()
        classes = sorted(self.known_classes())
        base_rules["to_devices"] += len(classes)
        elements = {name: 0 for name in (*DEVICE_SETS, *classes)}
        for d in state.values():
            for _key, set_name, _value in _elements(d):
                elements[set_name] = elements.get(set_name, 0) + 1
        return {"chains": set(self.BASE_CHAINS), "base_rules": base_rules, "elements": elements}

    # -- read back ------------------------------------------------------------------------
    def read_back(self) -> dict[int, dict]:
        """What the kernel has, per device id (the elements' comments): its state as plan()
        builds it. Classes the table has are learnt on the way."""
        out = self.run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}], "reading inet kalki")
        items = json.loads(out)["nftables"] if isinstance(out, str) else out["nftables"]
        devices: dict[int, dict] = {}
        classes = set()
        for item in items:
            body = item.get("set")
            if not body or body.get("table") != TABLE:
                continue
            name = body["name"]
            if _is_class(name):
                classes.add(name)
            elif name not in DEVICE_SETS:
                continue
            for element in body.get("elem", []):
                inner = element.get("elem") if isinstance(element, dict) else None
                value, tag = (inner["val"], inner.get("comment", "")) if inner else (element, "")
                # An element without a device id is not ours: it goes as stale (STRAY).
                d = devices.setdefault(int(tag) if str(tag).isdigit() else STRAY, empty_state())
                if name == "gate":
                    d["gates"].append(tuple(value["concat"]))
                elif name in ("macs", "ips", "lateral", "deceive"):
                    d[name].append(value)
                else:
                    d["classes"].append((name, value))
        self._classes = classes
        for d in devices.values():
            d["classes"].sort()
        return devices


def empty_state() -> dict:
    return {"macs": [], "ips": [], "gates": [], "lateral": [], "deceive": [], "classes": []}


def merged(commands: list[dict]) -> list[dict]:
    """The same transaction with each set's element deletions in one command and its element
    additions in another: 25 cameras changing posture together are 75 element commands, and
    libnftables takes about half as long over 5 (the rest first, then every deletion, then
    every addition; a device's elements are its own, so no element is both)."""
    head: list[dict] = []
    groups: dict[tuple[str, str], dict] = {}
    for command in commands:
        (op, body), = command.items()
        element = body.get("element") if op in ("add", "delete") and isinstance(body, dict) else None
        if element is None:
            head.append(command)
            continue
        group = groups.get((op, element["name"]))
        if group is None:
            groups[(op, element["name"])] = {op: {"element": {**element, "elem": list(element["elem"])}}}
        else:
            group[op]["element"]["elem"].extend(element["elem"])
    return (head + [g for (op, _), g in groups.items() if op == "delete"]
            + [g for (op, _), g in groups.items() if op == "add"])


def _is_class(name: str) -> bool:
    kind, _, value = name.partition("_")
    return kind in ("cl", "rl") and value.isdigit()


def _elem_key(value):
    return {"concat": list(value)} if isinstance(value, tuple) else value


def _elements(state: dict) -> set[tuple[str, str, object]]:
    """(key, set, value) of every element a device state stands for."""
    out: set[tuple[str, str, object]] = set()
    for mac in state.get("macs", ()):
        out.add(("mac", "macs", mac))
    for ip in state.get("ips", ()):
        out.add(("ip", "ips", ip))
    for gate in state.get("gates", ()):
        out.add(("gate", "gate", tuple(gate)))
    for mac in state.get("lateral", ()):
        out.add(("mac", "lateral", mac))
    for ip in state.get("deceive", ()):
        out.add(("ip", "deceive", ip))
    for name, ip in state.get("classes", ()):
        out.add(("ip", name, ip))
    return out


