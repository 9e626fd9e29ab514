"""nftables half of the data path: table `inet kalki`, one chain pair per device, dispatch by
verdict maps, every change one transaction through libnftables' JSON API (python3-nftables).

nftables carries what it does best here: connection tracking (connection limits) and the
redirect of a device's web port to the authentication gate. XDP carries the rest.
"""
from __future__ import annotations

import json

from appliance import netns
from appliance.errors import DataplaneError

TABLE = "kalki"
FAMILY = "inet"
_T: dict[str, object] = {"family": FAMILY, "table": TABLE}


def chain_in(device_id: int) -> str:
    return f"dev{device_id}_in"


def chain_out(device_id: int) -> str:
    return f"dev{device_id}_out"


def _match(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key):
    return {"meta": {"key": key}}


_CT_NEW = _match({"ct": {"key": "state"}}, "new", "in")


class Nft:
    """Transactions against `inet kalki` inside one network namespace."""

    def __init__(self, namespace: str | None, devices_if: str, gateway_ip: str, gate_port: int):
        self.namespace = namespace
        self.devices_if = devices_if
        self.gateway_ip = gateway_ip
        self.gate_port = gate_port
        import nftables
        with netns.entered(namespace):
            self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)

    def run(self, commands: list[dict], what: str) -> dict:
        with netns.entered(self.namespace):
            rc, out, err = self._nft.json_cmd({"nftables": commands})
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
            {"add": {"map": {**_T, "name": "from_device", "type": "ether_addr", "map": "verdict"}}},
            {"add": {"map": {**_T, "name": "to_device", "type": "ipv4_addr", "map": "verdict"}}},
            {"add": {"set": {**_T, "name": "gate", "type": ["ipv4_addr", "inet_service"]}}},
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
            rule("forward", _match({"ct": {"key": "state"}}, ["established", "related"], "in"),
                 {"accept": None}),
            rule("forward", _match({"ct": {"key": "state"}}, "invalid", "in"), {"drop": None}),
            # XDP checks destinations on the packets that open a connection; this makes sure a
            # TCP connection can only be opened by a SYN (conntrack's loose pick-up of
            # mid-stream packets would otherwise let an ACK open one).
            rule("forward", _match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}},
                                          ["fin", "syn", "rst", "ack"]]}, "syn", "!="),
                 _CT_NEW, {"counter": None}, {"drop": None}),
            # A device's own chain is entered by goto and returns here, so traffic between
            # two devices passes the sender's chain and then the receiver's.
            rule("forward", _match(_meta("iifname"), dev), {"jump": {"target": "from_devices"}}),
            rule("forward", _match(_meta("oifname"), dev), {"jump": {"target": "to_devices"}}),
            rule("forward", {"accept": None}),
            rule("from_devices", {"vmap": {"key": {"payload": {"protocol": "ether", "field": "saddr"}},
                                           "data": "@from_device"}}),
            rule("from_devices", {"counter": None}, {"drop": None}),
            rule("to_devices", {"vmap": {"key": {"payload": {"protocol": "ip", "field": "daddr"}},
                                         "data": "@to_device"}}),
            rule("to_devices", {"counter": None}, {"drop": None}),
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
            rule("prerouting", _match({"concat": [{"payload": {"protocol": "ip", "field": "daddr"}},
                                                  {"payload": {"protocol": "tcp", "field": "dport"}}]},
                                      "@gate"), {"redirect": {"port": self.gate_port}}),
        ]

    def table_exists(self) -> bool:
        with netns.entered(self.namespace):
            rc, _, _ = self._nft.json_cmd({"nftables": [{"list": {"table": {"family": FAMILY,
                                                                            "name": TABLE}}}]})
        return rc == 0

    def create_table(self) -> None:
        self.run(self.base_commands(), "creating table inet kalki")

    def ensure_table(self) -> None:
        """Creates the table, or adds the base chains a table made by an older version lacks."""
        if not self.table_exists():
            self.create_table()
            return
        out = self.run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}], "reading inet kalki")
        items = json.loads(out)["nftables"] if isinstance(out, str) else out["nftables"]
        chains = {i["chain"]["name"] for i in items if "chain" in i}
        missing = [c for c in self.base_commands(chains) if "chain" in c["add"] or "rule" in c["add"]]
        if missing:
            self.run(self.base_commands(chains), "adding base chains to inet kalki")

    def delete_table(self) -> None:
        if self.table_exists():
            self.run([{"delete": {"table": {"family": FAMILY, "name": TABLE}}}], "deleting inet kalki")

    # -- devices --------------------------------------------------------------------------
    def device_rules(self, device_id: int, conn_limit: dict | None) -> list[list]:
        """Rule expressions of the device's inbound chain."""
        rules = []
        if conn_limit:
            if conn_limit["concurrent"]:
                rules.append([_CT_NEW, {"ct count": {"val": conn_limit["concurrent"], "inv": True}},
                              {"counter": None}, {"drop": None}])
            if conn_limit["new_per_second"]:
                rules.append([_CT_NEW, {"limit": {"rate": conn_limit["new_per_second"],
                                                  "burst": max(1, conn_limit["new_per_second"] // 2),
                                                  "per": "second", "inv": True}},
                              {"counter": None}, {"drop": None}])
        return rules

    def out_rules(self, lateral_block: bool) -> list[list]:
        """Rule expressions of the device's outbound chain: the lateral block again, behind
        XDP's, so that a detached program (the watch puts it back within a second) is no
        window for lateral movement."""
        if not lateral_block:
            return []
        return [[_match(_meta("oifname"), self.devices_if), {"counter": None}, {"drop": None}]]

    def device_commands(self, device_id: int, mac: str, ip: str, rules: list,
                        gate_port: int | None, current: dict | None) -> list[dict]:
        """One transaction that makes the device's nftables state exactly what is wanted,
        touching only what differs from current (a posture change of 25 cameras is one
        transaction, and the smaller the faster). `rules`: ("in" | "out", expression)."""
        cin, cout = chain_in(device_id), chain_out(device_id)
        current = current or {}
        have_chains = set(current.get("chains", ()))
        cmds = [{"add": {"chain": {**_T, "name": c}}} for c in (cin, cout) if c not in have_chains]
        cmds += [{"flush": {"chain": {**_T, "name": c}}} for c in (cin, cout) if c in have_chains]
        cmds += [{"add": {"rule": {**_T, "chain": cin if kind == "in" else cout, "expr": r}}}
                 for kind, r in rules]
        gates = [(ip, gate_port)] if gate_port else []
        cmds += self._element_removals({
            "macs": [m for m in current.get("macs", ()) if m != mac],
            "ips": [i for i in current.get("ips", ()) if i != ip],
            "gates": [tuple(g) for g in current.get("gates", ()) if tuple(g) not in gates]})
        if mac not in current.get("macs", ()):
            cmds.append(self._element("from_device", mac, {"goto": {"target": cout}}, "add"))
        if ip not in current.get("ips", ()):
            cmds.append(self._element("to_device", ip, {"goto": {"target": cin}}, "add"))
        for gate_ip, port in gates:
            if (gate_ip, port) not in map(tuple, current.get("gates", ())):
                cmds.append({"add": {"element": {**_T, "name": "gate",
                                                 "elem": [{"concat": [gate_ip, port]}]}}})
        return cmds

    def plan(self, device_id: int, mac: str, ip: str, conn_limit: dict | None, gate_port: int | None,
             current: dict | None, lateral_block: bool = False,
             quarantine: bool = False) -> tuple[list[dict], dict] | None:
        """What makes the device's part of the table what it should be, given what the table
        holds for it now: (the transaction's commands, the device's state after them), or None
        when nothing needs to change. The data path asks once and runs the commands once.
        In quarantine the device has no part at all: its MAC and address miss the verdict
        maps, whose default is drop, so nothing is forwarded to or from it even with XDP
        detached."""
        if quarantine:
            if not current or not (current.get("macs") or current.get("ips") or current.get("chains")):
                return None
            return self.removal_commands(device_id, current), {"macs": [], "ips": [], "gates": [],
                                                                "rules": [], "normalised": [], "chains": []}
        rules = [("in", r) for r in self.device_rules(device_id, conn_limit)]
        rules += [("out", r) for r in self.out_rules(lateral_block)]
        wanted = {"macs": [mac], "ips": [ip], "gates": [(ip, gate_port)] if gate_port else [],
                  "rules": normalise_rules(rules)}
        if current and not differs(current, wanted):
            return None
        commands = self.device_commands(device_id, mac, ip, rules, gate_port, current)
        return commands, {**wanted, "rules": rules, "normalised": wanted["rules"],
                          "chains": [chain_in(device_id), chain_out(device_id)]}

    def removal_commands(self, device_id: int, current: dict | None) -> list[dict]:
        cmds = self._element_removals(current)
        for chain in (chain_in(device_id), chain_out(device_id)):
            if current and chain in current.get("chains", ()):
                cmds.append({"delete": {"chain": {**_T, "name": chain}}})
        return cmds

    def _element(self, map_name, key, value, op):
        return {op: {"element": {**_T, "name": map_name, "elem": [[key, value]]}}}

    def _element_removals(self, current: dict | None) -> list[dict]:
        if not current:
            return []
        cmds = []
        for mac in current.get("macs", ()):
            cmds.append({"delete": {"element": {**_T, "name": "from_device", "elem": [mac]}}})
        for ip in current.get("ips", ()):
            cmds.append({"delete": {"element": {**_T, "name": "to_device", "elem": [ip]}}})
        for ip, port in current.get("gates", ()):
            cmds.append({"delete": {"element": {**_T, "name": "gate",
                                                "elem": [{"concat": [ip, port]}]}}})
        return cmds

    # -- tampering ------------------------------------------------------------------------
    BASE_CHAINS = ("from_devices", "to_devices", "forward", "prerouting", "input", "resolver")
    VERDICT_MAPS = ("from_device", "to_device")

    def fingerprint(self) -> dict | None:
        """What a look at the table's outline shows, cheaply (no device rules are listed):
        its chains, the rules of its base chains, and the entries of its maps and the gate
        set. None if the table is gone."""
        lists: list[dict] = [{"list": {"chains": None}}]
        lists += [{"list": {"chain": {**_T, "name": c}}} for c in self.BASE_CHAINS]
        lists += [{"list": {"map": {**_T, "name": m}}} for m in self.VERDICT_MAPS]
        lists += [{"list": {"set": {**_T, "name": "gate"}}}]
        items: list[dict] = []
        with netns.entered(self.namespace):
            for command in lists:     # libnftables 1.0.6 refuses several list commands at once
                rc, out, _ = self._nft.json_cmd({"nftables": [command]})
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
        base_rules = {c: 0 for c in self.BASE_CHAINS}
        for cmd in self._base(self.devices_if, lambda chain, *expr: {"add": {"rule": {"chain": chain}}}):
            body = cmd["add"].get("rule")
            if body:
                base_rules[body["chain"]] += 1
        chains = set(self.BASE_CHAINS) | {c for d in state.values() for c in d.get("chains", ())}
        elements = {"from_device": sum(len(d.get("macs", ())) for d in state.values()),
                    "to_device": sum(len(d.get("ips", ())) for d in state.values()),
                    "gate": sum(len(d.get("gates", ())) for d in state.values())}
        return {"chains": chains, "base_rules": base_rules, "elements": elements}

    # -- read back ------------------------------------------------------------------------
    def read_back(self) -> dict[int, dict]:
        """What the kernel has, per device id: macs, ips, gate entries, chains, inbound rules."""
        out = self.run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}], "reading inet kalki")
        items = json.loads(out)["nftables"] if isinstance(out, str) else out["nftables"]
        devices: dict[int, dict] = {}
        ip_to_id: dict[str, int] = {}

        def entry(device_id):
            return devices.setdefault(device_id, {"macs": [], "ips": [], "gates": [],
                                                  "chains": [], "rules": []})

        def id_of(chain):
            return int(chain[3:].split("_")[0])

        for item in items:
            if "map" in item:
                m = item["map"]
                for key, value in m.get("elem", []):
                    if m["name"] == "from_device":
                        entry(id_of(value["goto"]["target"]))["macs"].append(key)
                    elif m["name"] == "to_device":
                        device_id = id_of(value["goto"]["target"])
                        entry(device_id)["ips"].append(key)
                        ip_to_id[key] = device_id
            elif "chain" in item and item["chain"]["name"].startswith("dev"):
                entry(id_of(item["chain"]["name"]))["chains"].append(item["chain"]["name"])
            elif "rule" in item and item["rule"]["chain"].startswith("dev"):
                expr = [e for e in item["rule"]["expr"]]
                kind = "out" if item["rule"]["chain"].endswith("_out") else "in"
                entry(id_of(item["rule"]["chain"]))["rules"].append((kind, expr))
        for item in items:
            if "set" in item and item["set"]["name"] == "gate":
                for key in item["set"].get("elem", []):
                    ip, port = key["concat"]
                    if ip in ip_to_id:
                        entry(ip_to_id[ip])["gates"].append((ip, port))
        return devices


def differs(current: dict, wanted: dict) -> bool:
    """Whether a device's state in the table (as read_back gives it) is not `wanted`."""
    return (sorted(current["macs"]) != wanted["macs"] or sorted(current["ips"]) != wanted["ips"]
            or sorted(map(tuple, current["gates"])) != sorted(wanted["gates"])
            or (current.get("normalised") or normalise_rules(current["rules"])) != wanted["rules"])


def normalise_rules(rules: list) -> list[str]:
    """("in" | "out", expression) rules as comparable text: counters' values and burst
    defaults differ from what was sent."""
    out = []
    for kind, r in rules:
        clean = [{"counter": None} if "counter" in e else e for e in r]
        out.append(json.dumps([kind, clean], sort_keys=True))
    return out
