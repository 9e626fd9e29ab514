"""What devices opened outside their profiles: flows learnt (posture "learning") and flows
refused, each with the DNS names the device had resolved for the address.

Real devices drift: new names under the vendor's domains, a regional NTP pool. A refused flow
is shown on the device ("asked for n-devs.tplinkcloud.com:443 3 times, refused") for the
operator to allow; a learnt one becomes a profile (`kalki profile from-device`). Neither is
an alarm. Kept in memory, bounded per device, and saved beside the store by the ticker.
"""
from __future__ import annotations

import ipaddress
from collections import OrderedDict

PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp"}
KEPT_PER_DEVICE = 512


def flow_key(event: dict) -> str:
    """"proto/address:port" of a kernel event's flow."""
    proto = PROTOCOL_NAMES.get(event.get("proto", 0), str(event.get("proto", 0)))
    port = event.get("dst_port") or 0
    return f"{proto}/{event.get('dst')}:{port}"


class Flows:
    def __init__(self) -> None:
        # {"learnt" | "refused": {device: {flow key: entry}}}
        self._kinds: dict[str, dict[str, OrderedDict]] = {"learnt": {}, "refused": {}}
        self.changed = False

    def record(self, kind: str, device: str, event: dict, names: list[str], at: str) -> dict:
        flows = self._kinds[kind].setdefault(device, OrderedDict())
        key = flow_key(event)
        entry = flows.pop(key, None) or {"proto": PROTOCOL_NAMES.get(event.get("proto", 0), "other"),
                                         "address": event.get("dst"), "port": event.get("dst_port") or 0,
                                         "names": [], "count": 0, "first": at}
        entry["count"] += 1 + int(event.get("suppressed") or 0)
        entry["last"] = at
        entry["names"] = sorted(set(entry["names"]) | set(names))
        flows[key] = entry          # the most recent last
        while len(flows) > KEPT_PER_DEVICE:
            flows.popitem(last=False)
        self.changed = True
        return entry

    def of(self, kind: str, device: str) -> list[dict]:
        return [{**e, "says": describe(e, kind)} for e in self._kinds[kind].get(device, {}).values()]

    def forget(self, device: str, kind: str | None = None) -> None:
        for k, by_device in self._kinds.items():
            if kind in (None, k) and by_device.pop(device, None) is not None:
                self.changed = True

    def rename(self, old: str, new: str) -> None:
        for by_device in self._kinds.values():
            if old in by_device:
                by_device[new] = by_device.pop(old)
                self.changed = True

    def to_json(self) -> dict:
        return {kind: {device: list(flows.values()) for device, flows in by_device.items()}
                for kind, by_device in self._kinds.items()}

    @classmethod
    def from_json(cls, data) -> Flows:
        """A saved state; what is not understood is left out (it is a record, not protection)."""
        flows = cls()
        if not isinstance(data, dict):
            return flows
        for kind in flows._kinds:
            for device, entries in (data.get(kind) or {}).items():
                if not isinstance(entries, list):
                    continue
                kept = OrderedDict()
                for e in entries[-KEPT_PER_DEVICE:]:
                    if isinstance(e, dict) and {"proto", "address", "port", "count"} <= set(e):
                        kept[f"{e['proto']}/{e['address']}:{e['port']}"] = e
                flows._kinds[kind][str(device)] = kept
        return flows


def describe(entry: dict, kind: str) -> str:
    """In words: "asked for n-devs.tplinkcloud.com:443 (tcp) 3 times, refused"."""
    target = entry["names"][0] if entry.get("names") else entry["address"]
    port = f":{entry['port']}" if entry.get("port") else ""
    times = "once" if entry["count"] == 1 else f"{entry['count']} times"
    verdict = "refused" if kind == "refused" else "let through while learning"
    return f"asked for {target}{port} ({entry['proto']}) {times}, {verdict}"


def destination_of(entry: dict, lan: str) -> str:
    """The profile destination that would allow a recorded flow: the name the device resolved
    where there is one, "lan" for its LAN peers, else the address; with port and protocol."""
    proto, port = entry["proto"], entry.get("port") or 0
    if entry.get("names"):
        target = entry["names"][0]
    elif ipaddress.IPv4Address(entry["address"]) in ipaddress.IPv4Network(lan):
        target = "lan"
    else:
        target = entry["address"]
    if proto in ("tcp", "udp"):
        return f"{target}:{port}/{proto}" if port else f"{target}/{proto}"
    return f"{target}/{proto}" if proto in ("icmp",) else target
