"""Alerts and posture decisions in plain words, and times as people read them: in the site's
time zone, with how long ago. The one place these sentences are made; the page, the API and
the `kalki` command get them through ops.

    plug1 tried to open the gateway's SSH port (22) at 23:00:08. A device that does this is
    probably taken over, so it is in quarantine: it can reach only DHCP, DNS and the gateway's
    MQTT.

An alert is told from its kind and details (a kernel event's src, dst, dst_port, proto, action
and count, ebpf/kalki.h's struct kalki_event; the gate's and the broker's own), the device it
is about, and the posture that followed: the decision a rule took on it, else the posture the
device was in already, said with what that posture's umbox stack lets the device reach. A kind
without words of its own (a rule's, or a new one) is told from its name, its message and a few
of its details.

Times: today "23:00:08", within a week "Sat 23:00", further "1 Jun 23:00" (another year: "1
Jun 2023"), each with "3 min ago" or "in 5 min". The page's script refreshes the relative part
by the same rule (appliance/faces/web/static/app.js, ago()).
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import re
from typing import Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from appliance.vocab import stricter

# -- times --------------------------------------------------------------------------------------
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def parse_time(at) -> datetime.datetime | None:
    """A stored time (ISO 8601 with its offset, or a datetime) as an aware datetime; None if
    there is none or it is not a time (a naive one is taken as UTC)."""
    if isinstance(at, datetime.datetime):
        t = at
    elif isinstance(at, str) and at:
        try:
            t = datetime.datetime.fromisoformat(at)
        except ValueError:
            return None
    else:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=datetime.UTC)


def zone(tz: str | None) -> datetime.tzinfo:
    try:
        return ZoneInfo(tz) if tz else datetime.UTC
    except (ZoneInfoNotFoundError, ValueError):
        return datetime.UTC


def ago(seconds: float) -> str:
    """How long ago (or, negative, how long until): "just now", "40 s ago", "3 min ago",
    "2 h ago", "5 days ago", "in 15 min". Minutes are whole ones gone by; hours and days the
    nearest."""
    s = int(abs(seconds) + 0.5)        # the nearest second, half up (the script's Math.round)
    if s < 10:
        return "just now"
    if s < 60:
        n = f"{s} s"
    elif s < 3600:
        n = f"{s // 60} min"
    elif s < 86400 - 1800:
        n = f"{int(s / 3600 + 0.5)} h"        # half up, as the script's Math.round
    else:
        days = max(1, int(s / 86400 + 0.5))
        n = f"{days} day{'s' if days > 1 else ''}"
    return f"in {n}" if seconds < 0 else f"{n} ago"


def local_time(at: datetime.datetime, now: datetime.datetime, tz: datetime.tzinfo) -> str:
    """`at` in the site's zone, as short as `now` allows: "23:00:08" today, "Sat 23:00" within
    a week either way, "1 Jun 23:00" this year, else "1 Jun 2023"."""
    local, today = at.astimezone(tz), now.astimezone(tz).date()
    if local.date() == today:
        return local.strftime("%H:%M:%S")
    if abs((local.date() - today).days) < 7:
        return f"{DAY_NAMES[local.weekday()]} {local:%H:%M}"
    day = f"{local.day} {MONTH_NAMES[local.month - 1]}"
    return f"{day} {local:%H:%M}" if local.year == today.year else f"{day} {local.year}"


def when(at, now: datetime.datetime, tz: str | None) -> dict | None:
    """{"local": "23:00:08", "ago": "3 min ago", "title": "Sat 1 Jun 2024 23:00:08 CEST",
    "epoch": seconds since 1970} for a stored time, or None if `at` is no time."""
    t = parse_time(at)
    if t is None:
        return None
    z = zone(tz)
    local = t.astimezone(z)
    title = (f"{DAY_NAMES[local.weekday()]} {local.day} {MONTH_NAMES[local.month - 1]} "
             f"{local.year} {local:%H:%M:%S} {local.tzname() or ''}").rstrip()
    return {"local": local_time(t, now, z), "ago": ago((now - t).total_seconds()),
            "title": title, "epoch": round(t.timestamp(), 3)}


def seconds_words(seconds) -> str:
    """90 -> '90 s', 900 -> '15 min', 7200 -> '2 h', 86400 -> '1 day'."""
    if not isinstance(seconds, int) or isinstance(seconds, bool):
        return str(seconds)
    for size, unit in ((86400, " day"), (3600, " h"), (60, " min")):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            return f"{n}{unit}{'s' if unit == ' day' and n > 1 else ''}"
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"


# -- destinations -------------------------------------------------------------------------------
PROTOCOL_WORDS = {"tcp": "TCP", "udp": "UDP", "icmp": "ICMP"}
_PROTOCOLS = ("any", "icmp", "tcp", "udp")


def _destination_parts(entry) -> dict:
    """A profile destination, as the data path reads it (appliance.dataplane.umbox
    .parse_destination, which the profile passed on load): {kind, target, proto, port}."""
    if isinstance(entry, dict):
        kind = next((k for k in ("address", "name", "lan", "controller", "same_manufacturer",
                                 "manufacturer", "my_controller") if k in entry), "address")
        return {"kind": kind, "target": entry.get(kind), "proto": entry.get("proto") or "any",
                "port": entry.get("port") or 0}
    text, proto = str(entry), "any"
    port: int | str = 0
    if "/" in text and text.rsplit("/", 1)[1] in _PROTOCOLS:
        text, proto = text.rsplit("/", 1)
    if ":" in text:
        text, _, port_text = text.partition(":")
        port = int(port_text) if port_text.isdigit() else port_text
    if text in ("lan", "same-manufacturer", "my-controller"):
        return {"kind": text.replace("-", "_"), "target": True, "proto": proto, "port": port}
    if text.startswith("@"):
        return {"kind": "controller", "target": text[1:], "proto": proto, "port": port}
    kind = "address" if re.fullmatch(r"[0-9.]+(/.*)?", text) else "name"
    return {"kind": kind, "target": text, "proto": proto, "port": port}


def destination_words(entry) -> str:
    """'cloud.example.com:443/tcp' -> 'cloud.example.com on TCP 443'; 'lan:6667/udp' -> 'the
    LAN on UDP 6667'; {controller = "camera-cloud", ...} -> "the site's controller
    camera-cloud on TCP 443"."""
    d = _destination_parts(entry)
    kind, target = d["kind"], d["target"]
    if kind == "lan":
        what = "the LAN"
    elif kind == "controller":
        what = f"the site's controller {target}"
    elif kind == "same_manufacturer":
        what = "the devices of the same manufacturer (MUD URL host)"
    elif kind == "manufacturer":
        what = f"the devices of manufacturer {target} (MUD URL host)"
    elif kind == "my_controller":
        what = "the site's controllers for the device's MUD URL"
    elif kind == "name" and str(target).startswith("*."):
        what = f"any name under {str(target)[2:]}"
    elif kind == "address" and "/" in str(target) and not str(target).endswith("/32"):
        what = f"the addresses {target}"
    else:
        what = str(target).removesuffix("/32")
    proto = PROTOCOL_WORDS.get(d["proto"])
    if proto and d["port"]:
        return f"{what} on {proto} {d['port']}"
    if proto:
        return f"{what} on {proto}" + (" (any port)" if d["proto"] != "icmp" else "")
    return f"{what} (any protocol)"


# -- what a posture lets a device do ------------------------------------------------------------
def posture_name(posture: str) -> str:
    """'in quarantine', 'in posture attack', 'learning', ... (after "it is")."""
    return {"quarantine": "in quarantine", "learning": "learning", "normal": "normal",
            "unknown": "waiting for approval"}.get(posture, f"in posture {posture}")


def reach_words(posture: str, stack: dict | None) -> str:
    """What a device in `posture`, whose profile gives it `stack` there, can reach: 'it can
    reach only DHCP, DNS and the gateway's MQTT'."""
    stack = stack or {}
    if "quarantine" in stack or posture == "unknown":
        management = (stack.get("quarantine") or {}).get("management", posture != "unknown")
        return ("it can reach only DHCP, DNS and the gateway's MQTT" if management
                else "it can reach only DHCP and DNS on the gateway")
    if posture == "learning":
        return "it reaches what it asks for, and each flow outside its profile is recorded"
    allow = stack.get("allowlist")
    egress = stack.get("egress_anomaly")
    destinations = None
    if allow is not None:
        destinations = allow.get("destinations") or []
    elif egress is not None and egress.get("block") and egress.get("destinations") is not None:
        destinations = egress["destinations"]
    if destinations is None:
        said = "it reaches the network as its profile allows"
        if "lateral_block" in stack:
            said += ", but not the other devices"
    elif destinations:
        said = ("besides the gateway's DHCP, DNS, NTP and MQTT, it can reach only "
                + "; ".join(destination_words(x) for x in destinations))
    else:
        said = "it can reach only the gateway's DHCP, DNS, NTP and MQTT"
    limits = []
    if (stack.get("rate_limit") or {}).get("packets_per_second"):
        limits.append(f"at most {stack['rate_limit']['packets_per_second']} packets/s")
    if (stack.get("conn_limit") or {}).get("concurrent"):
        limits.append(f"at most {stack['conn_limit']['concurrent']} inbound connections at once")
    return said + (f" ({', '.join(limits)})" if limits else "")


# -- alerts -------------------------------------------------------------------------------------
PROTO_NUMBERS = {1: "ICMP", 6: "TCP", 17: "UDP"}
PORT_NAMES = {21: "FTP", 22: "SSH", 23: "Telnet", 25: "SMTP", 53: "DNS", 67: "DHCP", 80: "HTTP",
              123: "NTP", 139: "NetBIOS", 161: "SNMP", 443: "HTTPS", 445: "SMB", 554: "RTSP",
              1883: "MQTT", 2323: "Telnet", 3389: "remote desktop", 5900: "VNC", 7547: "TR-069",
              8080: "HTTP", 8443: "HTTPS", 8883: "MQTT"}
# What a source in the drop set is there for (its reason, as the data path names it).
DROP_REASONS = {"drop_set": "blocked by hand (the operator, or the gate)", "port_scan": "a port scan",
                "stealth_scan": "a stealth scan", "brute_force": "password guessing",
                "syn_flood": "a SYN flood"}
# Alerts that are news rather than alarms: no word on the posture after them.
NEWS = ("egress-refused", "egress-report", "new-device", "device-renamed", "dataplane-replaced",
        "posture-kept", "blocked", "mqtt-user-clash")


def port_words(port, proto=None) -> str:
    """22 -> "SSH port (22)"; 4444 -> "port 4444"; with UDP: "UDP port 5353"; "" if none."""
    if not isinstance(port, int) or isinstance(port, bool) or port <= 0:
        return ""
    name = PORT_NAMES.get(port)
    p = PROTO_NUMBERS.get(proto) if isinstance(proto, int) else None
    if name:
        return f"{name} port ({port})"
    return f"{p + ' ' if p in ('TCP', 'UDP') else ''}port {port}"


def _port_of(owner: str, port, proto) -> str:
    """"the gateway's SSH port (22)", or "a port of the gateway" if the port is not known."""
    said = port_words(port, proto)
    return f"{owner}'s {said}" if said else f"a port of {owner}"


def _times(count) -> str:
    if not isinstance(count, int) or isinstance(count, bool) or count <= 1:
        return ""
    return f" {count} times"


def _ip(value) -> str | None:
    try:
        return str(ipaddress.IPv4Address(value)) if isinstance(value, str) else None
    except ValueError:
        return None


class Context:
    """What an alert's sentence needs besides the alert: names for addresses, the device, the
    time. `name_of(ip)` names a device's address (None if no device has it)."""

    def __init__(self, device: str | None, device_ip: str | None,
                 name_of: Callable[[str], str | None], at: str):
        self.device, self.device_ip, self.name_of, self.at = device, device_ip, name_of, at

    def who(self, ip) -> str:
        """An address as a person reads it: the device's name if it is one, else the address."""
        if not isinstance(ip, str) or not ip:
            return "someone"
        if ip == self.device_ip and self.device:
            return self.device
        name = self.name_of(ip)
        return f"{name} ({ip})" if name else ip

    @property
    def dev(self) -> str:
        return self.device or "a device"


# (what happened, what follows the time of it, why it matters or None)
Said = tuple[str, str, str | None]


def _what_kernel(kind: str, d: dict, c: Context) -> Said:
    src, dst, port, proto = d.get("src"), d.get("dst"), d.get("dst_port"), d.get("proto")
    on = f"on {port_words(port, proto)}" if port_words(port, proto) else "on some port"
    count = d.get("count")
    count = count if isinstance(count, int) and not isinstance(count, bool) else None
    if kind == "gateway-probe":
        return (f"{c.dev} tried to open {_port_of('the gateway', port, proto)}", "",
                "A device that does this is probably taken over")
    if kind == "port-scan":
        return (f"{c.who(src)} scanned {c.dev}'s ports",
                f" ({count} of them in a short while)" if count else "", "Someone is looking for a way in")
    if kind == "port-scan-outbound":
        return (f"{c.dev} scanned the ports of other addresses", f" (the last: {c.who(dst)}, {on})",
                "A device that does this is probably taken over")
    if kind == "stealth-scan":
        return (f"{c.who(src)} probed {c.dev} with TCP packets no real connection sends", " (a stealth scan)",
                "Someone is mapping it while trying not to be noticed")
    if kind == "syn-flood":
        return (f"{c.who(src)} flooded {c.dev} with connection requests (SYN)",
                f", {count} in a short while" if count else "",
                "Someone is trying to knock it off the network")
    if kind == "brute-force":
        return (f"{c.who(src)} tried to log in to {_port_of(c.dev, port, proto)}"
                + (f" {count} times in a short while" if count else ""), "",
                "Someone is guessing its password")
    if kind == "spoofing":
        return (f"{c.dev} sent packets with a sender address that is not its own ({src})",
                f"; {d['clone']}" if d.get("clone") else "",
                "A device that does this is probably taken over, or another one pretends to be it")
    if kind == "lateral-movement":
        return (f"{c.dev} tried to reach another device, {c.who(dst)}, {on}", "",
                "Its profile gives it no reason to, and a taken-over device spreads this way")
    if kind in ("egress-anomaly", "egress-report"):
        return (f"{c.dev} opened a connection to {c.who(dst)} {on}", ", outside what its profile expects",
                "It may be taken over, or its firmware changed" if kind == "egress-anomaly"
                else "Reported only: its profile does not block this")
    if kind == "egress-refused":
        return (f"{c.dev} tried to reach {c.who(dst)} {on}",
                "; its profile does not allow that, and the gateway refused it",
                "Not an alarm: allow it on the device's page if the device needs it")
    return "", "", None


def _what_other(kind: str, d: dict, c: Context, source: str | None) -> Said:
    src = d.get("source") or d.get("src")
    for_ = f"; it is dropped for {seconds_words(d['seconds'])}" if d.get("seconds") else ""
    if kind == "identity-clone":
        where = f" on port {d['port']}" if d.get("port") else ""
        return (f"Another station{where} uses {c.dev}'s MAC address ({d.get('mac')})",
                f": {d['why']}" if d.get("why") else "",
                f"Someone may be impersonating it; the gateway's answer: {d.get('action') or 'none'}")
    if kind == "api-denied":
        asked = " ".join(str(x) for x in (d.get("method"), d.get("path")) if x)
        return (f"{c.who(src)} sent {asked or 'a request'} to {c.dev}'s web API{_times(d.get('count'))}",
                "; its profile does not allow that, and the gateway refused it",
                "Someone is trying what the device should not be asked")
    if kind == "token-brute-force":
        return (f"{c.who(src)} kept failing to authenticate to {c.dev}'s web API", for_,
                "Someone is guessing its access token")
    if kind == "deception":
        pairs = [x for x in d.get("logins") or [] if isinstance(x, list) and x]
        tried = f", tried {len(pairs)} login{'s' if len(pairs) != 1 else ''}" if pairs else ""
        return (f"{c.who(src)}, already blocked, kept at {c.dev} and met the gateway's decoy "
                f"({d.get('service') or '?'}){tried}", "; the device itself saw none of it",
                "What it typed is kept with this alert as evidence")
    if kind == "gate-login-failures":
        return (f"{c.who(src)} failed again and again to log in to a device's web page through the gateway",
                for_, "Someone is guessing the password")
    if kind == "mqtt-denied":
        user = d.get("user") or c.dev
        if d.get("client_id"):
            what = f"{user} tried to connect to the broker as {d['client_id']} (not its own client id)"
        else:
            what = f"{user} tried to publish on {d.get('topic') or 'a topic'} (not its own topic)"
        return (what + _times(d.get("count")), "; the broker refused it",
                "A device that speaks for another, or sends commands, may be taken over (or misconfigured)")
    if kind == "default-credentials":
        logins = [x for x in d.get("logins") or [] if isinstance(x, dict)]
        which = ", ".join(f"{x.get('user')} on {x.get('service')} port {x.get('port')}" for x in logins[:3])
        return (f"{c.dev} accepts its type's factory (default) login", f" ({which})" if which else "",
                "Anyone who can reach it can log in: change the password on the device itself")
    if kind == "tamper":
        problems = d.get("problems") or []
        return ("Something changed the gateway's protection behind its back",
                f": {'; '.join(str(p) for p in problems[:3])}" if problems else "",
                "It was put back" if d.get("restored") else
                f"Putting it back failed: {d['error']}" if d.get("error") else None)
    if kind == "disk-error":
        return ("The SD card refused a write", f" ({d.get('error') or 'no reason given'})",
                "What changed is kept in memory and written again every second; if this goes on, "
                "replace the card")
    if kind == "new-device":
        return (f"A new device, {c.dev}, joined", f" ({d.get('mac') or '?'}, {d.get('ip') or '?'})"
                + (f"; it looks like a {d['suggested_type']}" if d.get("suggested_type") else ""),
                "Until you approve it with a type it can reach only DHCP and DNS on the gateway")
    if kind == "posture-kept":
        return (f"At start the kernel held {c.dev} in {d.get('kernel')}",
                f", stricter than the {d.get('store')} on record", "The stricter posture was kept")
    if kind == "device-renamed":
        return (f"The device {d.get('from')} was renamed {d.get('to')}", ": its old name did not fit the "
                "rule for names", None)
    if kind == "mqtt-user-clash":
        return (f"{c.dev} logs in to the broker as {d.get('user') or '?'}, the user Home Assistant "
                "is configured to use", " (mqtt.home_assistant_user)",
                "Home Assistant's posture commands are refused until another user is named for it")
    if kind == "dataplane-replaced":
        return "The data path of an older version was replaced", f" ({d.get('why') or '?'})", None
    if kind == "notify-failed":
        return (f"Notifications by {d.get('channel') or 'a channel'} failed",
                f" ({d.get('error') or 'no reason given'}; {d.get('failed') or 1} so far)",
                "Alerts are still recorded and shown here; check the channel's settings "
                "(kalki notify test)")
    if kind == "blocked":
        return (f"{src or 'A source'} was put in the drop set"
                + (f" by the {source}" if source and source != "rule" else ""),
                f" for {seconds_words(d['seconds'])}" if d.get("seconds") else " until unblocked", None)
    return "", "", None


def _generic(kind: str, d: dict, c: Context, source: str | None) -> Said:
    """A kind without words of its own: its name, its message, a few of its details."""
    by = {"rule": "A rule", "kernel": "The data path", "mqtt": "The MQTT broker", "gate": "The gate",
          "operator": "The operator", "discovery": "Discovery", "supervisor": "The supervisor"}
    said = f"{by.get(source or '', source or 'Someone')} raised alert {kind}" + (
        f" about {c.device}" if c.device else "")
    if isinstance(d.get("message"), str) and d["message"]:
        return said, f": {d['message']}", None
    shown = [f"{k} {v}" for k, v in d.items()
             if isinstance(v, (str, int, float)) and not isinstance(v, bool) and k != "ts_ns"][:4]
    return said, f" ({', '.join(shown)})" if shown else "", None


def _action(d: dict, c: Context) -> str:
    """What the data path did beyond dropping the packet, if the alert is a kernel event."""
    if d.get("action") == "blocked":
        return f"The gateway put {c.who(d.get('src'))} in the drop set."
    return ""


def alert_words(alert: dict, c: Context, at_words: str, posture: str) -> str:
    """An alert in sentences: what happened (at `at_words`), why it matters, and `posture`
    (the sentence on the posture that followed, or "")."""
    kind = str(alert.get("type") or "alert")
    details = alert.get("details")
    d: dict = details if isinstance(details, dict) else {}
    source = alert.get("source")
    said: Said = ("", "", None)
    if source == "kernel" or "dst_port" in d:
        said = _what_kernel(kind, d, c)
    if not said[0]:
        said = _what_other(kind, d, c, source)
    if not said[0]:
        said = _generic(kind, d, c, source)
    what, tail, why = said
    out = f"{what}{' at ' + at_words if at_words else ''}{tail}."
    action = _action(d, c) if source == "kernel" else ""
    if action:
        out += f" {action}"
    if why and posture.startswith("so "):
        return f"{out} {why}, {posture}"
    if why:
        out += f" {why}."
    return f"{out} {posture}".rstrip()


def posture_sentence(device: str | None, approved: bool, kind: str, decided: dict | None,
                     before: str | None, stack_of: Callable[[str], dict | None]) -> str:
    """The posture that followed an alert: `decided` the set_posture step a rule took on the
    device for it ({"posture", "for_seconds", "skipped", "error"}), else `before` the posture
    the device was in when it came."""
    if not device or not approved or kind in NEWS:
        return ""
    if decided and not decided.get("skipped") and not decided.get("error"):
        p = decided["posture"]
        timed = f" for {seconds_words(decided['for_seconds'])}" if decided.get("for_seconds") else ""
        return f"so it is {posture_name(p)}{timed}: {reach_words(p, stack_of(p))}."
    if decided and decided.get("error"):
        return f"A rule tried to put it {posture_name(decided['posture'])} and failed: {decided['error']}."
    if before and stricter(before, "normal"):
        return f"It was {posture_name(before)} already: {reach_words(before, stack_of(before))}."
    return "Its posture did not change."


def decided_step(decision: dict | None, device: str | None) -> dict | None:
    """The set_posture step a decision took on `device`, if any."""
    for a in (decision or {}).get("actions") or []:
        if a.get("action") == "set_posture" and a.get("target") == device:
            return a
    return None


def match_decisions(alerts: list[dict], decisions: list[dict], within: float = 10.0) -> dict[int, dict]:
    """{index in `alerts`: the decision it set off}: a decision on an alert belongs to the last
    alert of that kind on that device at or before it (at most `within` seconds before)."""
    keyed: dict[tuple, list[tuple[datetime.datetime, int]]] = {}
    for i, a in enumerate(alerts):
        t = parse_time(a.get("at"))
        if t is not None:
            keyed.setdefault((a.get("device"), a.get("type")), []).append((t, i))
    for entries in keyed.values():
        entries.sort(key=lambda x: x[0])
    out: dict[int, dict] = {}
    for dec in decisions:
        s = dec.get("stimulus") or {}
        if s.get("kind") != "alert":
            continue
        found = keyed.get((s.get("device"), (s.get("data") or {}).get("type")))
        t = parse_time(dec.get("at"))
        if not found or t is None:
            continue
        before = [(at, i) for at, i in found if at <= t]
        if before and (t - before[-1][0]).total_seconds() <= within:
            i = before[-1][1]
            first = parse_time(out[i].get("at")) if i in out else None
            if first is None or first > t:      # the first decision it set off
                out[i] = dec
    return out


def posture_at(history: list[dict], at) -> str | None:
    """The posture a device was in at `at`, from its posture history (newest first): the one
    stamped last at or before it. Not the first such in the list: the list is in the order
    recorded, and after a clock set back its newest records carry the earliest times."""
    t = parse_time(at)
    if t is None:
        return None
    found, found_at = None, None
    for h in history:
        ht = parse_time(h.get("at"))
        if ht is not None and ht <= t and (found_at is None or ht > found_at):
            found, found_at = h.get("posture"), ht
    return found


# -- decisions ----------------------------------------------------------------------------------
def _trigger(stimulus: dict) -> str:
    kind, device, data = stimulus.get("kind"), stimulus.get("device"), stimulus.get("data") or {}
    if kind == "alert":
        return f"after a {data.get('type')} alert" + (f" on {device}" if device else "")
    if kind == "posture":
        return f"after {device} went {data.get('to')}"
    if kind == "telemetry":
        shown = ", ".join(f"{k} {json.dumps(v, default=str)}" for k, v in list(data.items())[:3])
        return f"after {device} reported {shown}" if shown else f"after a report from {device}"
    return f"after {kind}" if kind else ""


def decision_words(decision: dict, at_words: str, stack_of: Callable[[str, str], dict | None]) -> str:
    """A rule's decision in sentences: "Rule device-compromised put plug1 in quarantine at
    23:00:08, after a gateway-probe alert on plug1. In quarantine it can reach only DHCP, DNS
    and the gateway's MQTT." `stack_of(device, posture)` is the device's stack there."""
    done, reach = [], ""
    for a in decision.get("actions") or []:
        kind, target = a.get("action"), a.get("target")
        if kind == "set_posture":
            p = a.get("posture")
            if a.get("skipped"):
                done.append(f"left {target} as it was ({a['skipped']})")
            elif a.get("error"):
                done.append(f"could not put {target} {posture_name(p)} ({a['error']})")
            else:
                timed = f" for {seconds_words(a['for_seconds'])}" if a.get("for_seconds") else ""
                done.append(f"put {target} {posture_name(p)}{timed}")
                if not reach:
                    reach = (f"{posture_name(p)[0].upper()}{posture_name(p)[1:]}, "
                             f"{reach_words(p, stack_of(target, p))}.")
        elif kind == "alert":
            done.append(f"raised {a.get('type')}" + (f" ({a['message']})" if a.get("message") else ""))
        elif kind == "command":
            done.append(f"sent {target} {json.dumps(a.get('payload'), default=str)}")
        elif kind == "poll" and a.get("in_force"):
            found = a["in_force"]
            who = found[0] if len(found) == 1 else f"{len(found)} devices"
            done.append(f"found {who} polled every {seconds_words(a.get('every_seconds'))} already")
        elif kind == "poll" and a.get("error"):
            done.append(f"could not poll {target} ({a['error']})")
        elif kind == "poll":
            done.append(f"polls {target} every {seconds_words(a.get('every_seconds'))}")
    said = f"Rule {decision.get('rule')} " + (", ".join(done) if done else "did nothing")
    if at_words:
        said += f" at {at_words}"
    trigger = _trigger(decision.get("stimulus") or {})
    said += f", {trigger}." if trigger else "."
    return f"{said} {reach}".rstrip()


def drop_words(entry: dict) -> str:
    """Why a source is in the drop set, from its reason and device."""
    reason = DROP_REASONS.get(entry.get("reason") or "", str(entry.get("reason") or "?").replace("_", " "))
    return reason + (f", against {entry['device']}" if entry.get("device") else "")


# -- rules --------------------------------------------------------------------------------------
# A rule in one sentence, from its parsed form (appliance.policy.rules.parse_rule):
#
#     When a camera has raised brute-force alerts 3 times within 5 min, it goes to quarantine
#     for 30 min.
#
# "self" is named once, by the rule's applies_to ("a camera", or "a device"), then "it". Every
# condition and action kind the parser accepts has its words here (CONDITION_WORDS,
# ACTION_WORDS); tests/test_rules_words.py fails on a kind without them.
OP_WORDS = {"==": "is", "!=": "is not", "<": "is below", "<=": "is at most", ">": "is above",
            ">=": "is at least", "in": "is one of"}
AGGREGATE_WORDS = {"last": "{field}", "avg": "average {field}", "min": "lowest {field}",
                   "max": "highest {field}", "sum": "total {field}", "count": "number of {field} reports"}


def _a(word: str) -> str:
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _joined(items: list[str], last: str) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def _value_words(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return _joined([_value_words(v) for v in value], "or")
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def _postures_words(postures) -> str:
    if len(postures) == 1:
        return posture_name(postures[0])
    return "in posture " + _joined(list(postures), "or")


class _RuleWords:
    def __init__(self, applies_to: tuple):
        self.applies_to = applies_to
        self.named = False       # "self" said once already: "it" from then on

    def me(self) -> str:
        if self.named:
            return "it"
        self.named = True
        return _a(_joined(list(self.applies_to), "or")) if self.applies_to else "a device"

    def who(self, selector, every: bool = False) -> str:
        """A selector as the subject of a sentence: any (or every) device it selects."""
        if selector == "self":
            return self.me()
        q = "every" if every else "any"
        if selector == "any":
            return f"{q} device"
        if isinstance(selector, str):
            return selector
        if "type" in selector:
            return f"{q} {selector['type']}"
        return f"{q} device in group {selector['group']}"

    def whose(self, selector, every: bool = False) -> str:
        if selector == "self" and self.named:
            return "its"
        return f"{self.who(selector, every)}'s"

    def condition(self, cond: dict, nested: bool = False) -> str:
        kind, body = next(iter(cond.items()))
        said = CONDITION_WORDS[kind](self, body)
        return f"({said})" if nested and kind in ("all", "any") else said

    def alert(self, c: dict) -> str:
        kinds = _joined(list(c["type"]), "or") if c["type"] else None
        within = seconds_words(c["within"])
        if c["count"] == 1:
            what = f"{_a(kinds)} alert" if kinds else "an alert of any kind"
            return f"{self.who(c['device'])} has raised {what} in the last {within}"
        sel = c["device"]
        if sel == "self" or (isinstance(sel, str) and sel != "any"):
            who = self.who(sel)
        elif sel == "any":
            who = "the devices together"
        elif "type" in sel:
            who = f"the {sel['type']} devices together"
        else:
            who = f"the devices in group {sel['group']} together"
        what = f"{kinds} alerts" if kinds else "alerts of any kind"
        verb = "have" if who.endswith("together") else "has"
        return f"{who} {verb} raised {what} {c['count']} times within {within}"

    def telemetry(self, c: dict) -> str:
        quantity = AGGREGATE_WORDS[c["agg"]].format(field=c["field"])
        if c["agg"] == "last":
            span = f" (reported in the last {seconds_words(c['within'])})" if c["within"] else ""
        elif c["last"]:
            span = f" over the last {c['last']} reports"
        elif c["within"]:
            span = f" over the last {seconds_words(c['within'])}"
        else:
            span = ""
        return (f"{self.whose(c['device'], c['match'] == 'all')} {quantity}{span} "
                f"{OP_WORDS[c['op']]} {_value_words(c['value'])}")

    def changed(self, c: dict) -> str:
        owner = self.whose(c["device"])
        start = f"from {_value_words(c['from'])} " if "from" in c else ""
        return f"{owner} {c['field']} changes {start}to {_value_words(c['to'])}"

    def posture(self, c: dict, negated: bool = False) -> str:
        return f"{self.who(c['device'])} is {'not ' if negated else ''}{_postures_words(c['in'])}"

    def time(self, c: dict, negated: bool = False) -> str:
        if "business_hours" in c:
            inside = c["business_hours"] != negated
            return f"the time is {'within' if inside else 'outside'} business hours"
        start, end = (f"{m // 60:02d}:{m % 60:02d}" for m in c["between"])
        days = f" on {', '.join(c['days'])}" if c["days"] else ""
        zone_ = f" ({c['timezone']})" if c["timezone"] else ""
        return f"the time is {'not ' if negated else ''}between {start} and {end}{days}{zone_}"

    def all(self, conds: tuple) -> str:
        return _joined([self.condition(c, nested=True) for c in conds], "and")

    def any(self, conds: tuple) -> str:
        return _joined([self.condition(c, nested=True) for c in conds], "or")

    def not_(self, cond: dict) -> str:
        kind, body = next(iter(cond.items()))
        if kind in ("posture", "time"):
            return getattr(self, kind)(body, negated=True)
        return f"not ({self.condition(cond)})"

    def action(self, action: dict) -> str:
        kind, body = next(iter(action.items()))
        return ACTION_WORDS[kind](self, body)

    def set_posture(self, a: dict) -> str:
        timed = f" for {seconds_words(a['for'])}" if a["for"] else ""
        return f"{self.who(a['device'], every=True)} goes to {a['posture']}{timed}"

    def command(self, a: dict) -> str:
        sent = ", ".join(f"{k} = {_value_words(v)}" for k, v in a["payload"].items())
        return f"{self.who(a['device'], every=True)} is sent the command {sent}"

    def raise_alert(self, a: dict) -> str:
        said = f"{_a(a['severity'])} {a['type']} alert is raised"
        return said + (f' ("{a["message"]}")' if a["message"] else "")

    def poll(self, a: dict) -> str:
        timed = f" for {seconds_words(a['for'])}" if a["for"] else ""
        return f"{self.who(a['device'], every=True)} is polled every {seconds_words(a['every'])}{timed}"


CONDITION_WORDS: dict[str, Callable[..., str]] = {
    "alert": _RuleWords.alert, "telemetry": _RuleWords.telemetry, "changed": _RuleWords.changed,
    "posture": _RuleWords.posture, "time": _RuleWords.time, "all": _RuleWords.all,
    "any": _RuleWords.any, "not": _RuleWords.not_}
ACTION_WORDS: dict[str, Callable[..., str]] = {
    "set_posture": _RuleWords.set_posture, "command": _RuleWords.command,
    "alert": _RuleWords.raise_alert, "poll": _RuleWords.poll}


def rule_words(rule) -> str:
    """A parsed rule (appliance.policy.Rule) in one sentence: "When <its conditions>, <its
    actions>." """
    w = _RuleWords(tuple(rule.applies_to))
    when = w.condition(rule.when)
    then = _joined([w.action(a) for a in rule.then], "and")
    return f"When {when}, {then}."


def rules_off_words(off: list[dict]) -> str:
    """The built-in and profile rules switched off ({"name", "source"}), in a line: "2 built-in
    rules off: device-compromised, device-under-attack"; "" if none."""
    if not off:
        return ""
    builtin = sum(1 for r in off if r["source"] == "builtin")
    parts = [f"{n} {what} rule{'s' if n > 1 else ''}"
             for n, what in ((builtin, "built-in"), (len(off) - builtin, "profile")) if n]
    return f"{' and '.join(parts)} off: {', '.join(r['name'] for r in off)}"
