"""The appliance's words, each defined once: postures and their order, severities, alert kinds,
days, and one validator each for a device name, a MAC address, a time of day (HH:MM), a time
zone and business hours.

Validators take `where` (the culprit, named in the message) and `error` (the exception class of
the caller's layer: a store raises StoreError, a site file SiteError), so the rule is the same
everywhere while each layer keeps its own exception.
"""
from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import hmac
import ipaddress
import re
import secrets
import urllib.parse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from appliance.errors import ConfigError

# -- postures -----------------------------------------------------------------------------------
# The order is the kernel's code (kalki.h's posture field) and must not change.
POSTURES = ("unknown", "normal", "suspicious", "attack", "quarantine", "learning")
POSTURE_CODES = {p: i for i, p in enumerate(POSTURES)}
SETTABLE_POSTURES = POSTURES[1:]      # an operator or a rule never sets "unknown"
MAX_POSTURE_SECONDS = 30 * 86400       # a timed posture lasts at most 30 days (--for 30d)
# How strict each posture is: a rule never lowers a posture that another raised.
# "learning" (the device reaches what it asks for, and what it asks for is recorded) is below
# "normal": anything a rule or an operator sets ends it.
ESCALATION = {"learning": -1, "unknown": 0, "normal": 0, "suspicious": 1, "attack": 2, "quarantine": 3}
LEARNING_SECONDS = 86400              # learning ends by itself after this, unless told otherwise


def stricter(a: str, b: str) -> bool:
    """True if posture `a` protects more than `b`."""
    return ESCALATION.get(a, 0) > ESCALATION.get(b, 0)


# Home Assistant's "under attack" (a problem binary sensor per device), said here only: the
# device's posture is attack or stricter (attack, quarantine), or a critical alert about it came
# within the last UNDER_ATTACK_ALERT_SECONDS and nobody has lowered its posture since (a critical
# alert is not always followed by a posture: default-credentials, a rule's own alert).
UNDER_ATTACK_FROM = "attack"
UNDER_ATTACK_ALERT_SECONDS = 300


def under_attack(posture: str, critical_alert: bool = False) -> bool:
    return ESCALATION.get(posture, 0) >= ESCALATION[UNDER_ATTACK_FROM] or critical_alert


def check_posture(value, where: str, settable: bool = False, error: type[Exception] = ConfigError) -> str:
    known = SETTABLE_POSTURES if settable else POSTURES
    if value not in known:
        raise error(f"{where}: unknown posture {value!r} (known: {', '.join(known)})")
    return value


# -- alerts -------------------------------------------------------------------------------------
SEVERITIES = ("info", "warning", "critical")
# Every alert kind the appliance raises itself, with its severity. Rules may raise others.
ALERT_SEVERITY = {
    "port-scan": "warning", "port-scan-outbound": "critical", "syn-flood": "critical",
    "brute-force": "critical", "egress-anomaly": "warning", "egress-report": "info",
    "spoofing": "critical", "lateral-movement": "critical", "gateway-probe": "critical",
    "gate-login-failures": "warning", "new-device": "info", "mqtt-denied": "warning",
    "api-denied": "warning", "token-brute-force": "critical",
    "tamper": "critical", "disk-error": "critical", "posture-kept": "warning",
    "device-renamed": "warning", "dataplane-replaced": "warning", "egress-refused": "info",
    # Home Assistant's broker user is a device's too: its posture commands are refused
    "mqtt-user-clash": "warning",
    "stealth-scan": "critical", "identity-clone": "critical",
    # a device accepts its type's factory login (appliance.supervisor.logins): anyone who can
    # reach it can log in; no built-in rule moves a posture on it
    "default-credentials": "critical",
    # what a blocked attacker tried on the decoy (appliance/dataplane/decoy.py): evidence, not a
    # new attack (the source is in the drop set already)
    "deception": "warning",
    # a notification channel (appliance.supervisor.notify) failed after its retries; at most
    # one an hour per channel, and never sent on the channel it is about
    "notify-failed": "warning",
}
ALERT_SOURCES = ("kernel", "mqtt", "rule", "gate", "operator", "discovery", "supervisor")


def severity_of(kind: str) -> str:
    return ALERT_SEVERITY.get(kind, "warning")


# -- days and times -----------------------------------------------------------------------------
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WORKDAYS = DAYS[:5]


def iso(at: datetime.datetime) -> str:
    """The one form a time is stored and sent in: UTC, ISO 8601, microseconds."""
    return at.astimezone(datetime.UTC).isoformat(timespec="microseconds")


def parse_hhmm(text, where: str, error: type[Exception] = ConfigError) -> int:
    """'HH:MM' -> minutes after midnight."""
    m = re.fullmatch(r"(\d{2}):(\d{2})", text) if isinstance(text, str) else None
    if not m or int(m[1]) > 23 or int(m[2]) > 59:
        raise error(f"{where}: invalid time {text!r} (HH:MM, 00:00 to 23:59)")
    return int(m[1]) * 60 + int(m[2])


def check_days(value, where: str, error: type[Exception] = ConfigError) -> tuple[str, ...]:
    """A day or a non-empty list of days: "mon" .. "sun"."""
    days = [value] if isinstance(value, str) else value
    if not isinstance(days, (list, tuple)) or not days:
        raise error(f"{where}: expected a list of days like [\"mon\", \"tue\"], got {value!r}")
    for i, day in enumerate(days):
        if day not in DAYS:
            raise error(f"{where}[{i}]: unknown day {day!r} (known: {', '.join(DAYS)})")
    return tuple(days)


def check_timezone(value, where: str, error: type[Exception] = ConfigError) -> str:
    try:
        if not isinstance(value, str) or not value:
            raise ValueError
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise error(f"{where}: unknown time zone {value!r} (e.g. Europe/Berlin, UTC)") from None
    return value


def check_business_hours(value, where: str, error: type[Exception] = ConfigError) -> dict:
    """{"days": [...], "start": "HH:MM", "end": "HH:MM"} -> the same, checked; days default
    to the working week. The window may cross midnight but may not be empty."""
    if not isinstance(value, dict) or not {"start", "end"} <= set(value) <= {"days", "start", "end"}:
        raise error(f"{where}: expected a table with days, start and end, got {value!r}")
    days = check_days(value.get("days", list(WORKDAYS)), f"{where}.days", error)
    start = parse_hhmm(value["start"], f"{where}.start", error)
    end = parse_hhmm(value["end"], f"{where}.end", error)
    if start == end:
        raise error(f"{where}.start/end: the same time; business hours would be empty")
    return {"days": list(days), "start": value["start"], "end": value["end"]}


# -- identities ---------------------------------------------------------------------------------
# A device name becomes an MQTT topic level, an ACL %u, an nftables chain name and a URL path
# segment: letters, digits, '_' and '-' only (no wildcards, separators or dots), at most 40.
DEVICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def check_device_name(name, where: str = "device name", error: type[Exception] = ConfigError) -> str:
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise error(f"{where} {name!r}: use 1 to 40 letters, digits, '_' or '-'")
    return name


def device_name_for(hostname: str, mac: str, taken) -> str:
    """A name for a newly seen device: its DHCP hostname made valid, else 'device-' and the end
    of its MAC; the MAC's end is added when the name is taken."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", hostname or "")[:33]
    if not name or name in taken:
        name = (name + "-" if name else "device-") + mac.replace(":", "")[-6:]
    return name


def check_mac(value, where: str, error: type[Exception] = ConfigError, unicast: bool = False) -> str:
    """A MAC address in the one form kept: lower case, colons. `unicast` refuses the all-zero
    and group addresses, which no device has."""
    mac = value.lower().replace("-", ":") if isinstance(value, str) else value
    if not isinstance(mac, str) or not _MAC.fullmatch(mac):
        raise error(f"{where}: invalid MAC address {value!r}")
    if unicast and (mac == "00:00:00:00:00:00" or int(mac[:2], 16) & 1):
        raise error(f"{where}: {value!r} is not a device's (unicast) MAC address")
    return mac


# -- MQTT topics --------------------------------------------------------------------------------
# A topic prefix the settings give (Home Assistant's discovery prefix): it goes into Mosquitto's
# ACL file, a line each, and under subscriptions, so levels of letters, digits, '_', '-' and '.'
# only: no wildcard ('+', '#'), no empty level, no space.
TOPIC_LEVELS = re.compile(r"[A-Za-z0-9_.-]{1,64}(/[A-Za-z0-9_.-]{1,64}){0,7}")


def check_topic_prefix(value, where: str, error: type[Exception] = ConfigError) -> str:
    if not isinstance(value, str) or not TOPIC_LEVELS.fullmatch(value):
        raise error(f"{where}: {value!r}: expected MQTT topic levels of letters, digits, '_', '-' "
                    "and '.' separated by '/' (no wildcard '+' or '#', no empty level), e.g. "
                    "\"homeassistant\"")
    return value


def check_discovery_prefix(value, base: str, where: str, error: type[Exception] = ConfigError) -> str:
    """Home Assistant's discovery prefix, beside the topic base <base>: not under it, where
    every level is a device's (<base>/status would be one's telemetry)."""
    check_topic_prefix(value, where, error)
    if value == base or value.startswith(base + "/"):
        raise error(f"{where}: {value!r} is under the topic base {base!r}, whose levels are the "
                    "devices'")
    return value


# -- hosts: where a device may go ---------------------------------------------------------------
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
DNS_NAME = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")
CONTROLLER = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")


def check_dns_name(text: str, culprit: str, error: type[Exception] = ConfigError) -> str:
    """A DNS name as a profile gives it: lower case, no final dot, "*." only as its start."""
    name = text.lower().rstrip(".")
    if len(name) > 253 or not DNS_NAME.fullmatch(name) or name.isdigit() or (
            name.startswith("*.") and "." not in name[2:]):
        raise error(f"{culprit}: {text!r} is neither an address, a prefix, \"lan\" nor a "
                          "DNS name (exact, or *.suffix with at least two labels)")
    return name


def check_controllers(controllers, where: str, error: type[Exception] = ConfigError) -> dict[str, list[str]]:
    """The site's controllers, {class: [address, prefix or DNS name, ...]}: shape, class names
    and hosts checked; the profile gives each its protocol and port."""
    if not isinstance(controllers, dict):
        raise error(f"{where}: expected a table of class = [hosts], got {controllers!r}")
    for name, hosts in controllers.items():
        if not isinstance(name, str) or not CONTROLLER.fullmatch(name):
            raise error(f"{where}: class {name!r}: use 1-40 lower-case letters, digits, - and _")
        _check_hosts(hosts, f"{where}.{name}", error)
    return controllers


def _check_hosts(hosts, where: str, error: type[Exception]) -> None:
    """A controller's hosts: [address, prefix or DNS name, ...]."""
    if not isinstance(hosts, list):
        raise error(f"{where}: expected a list of hosts, got {hosts!r}")
    for host in hosts:
        culprit = f"{where}: host {host!r}"
        if not isinstance(host, str):
            raise error(f"{culprit}: expected a string")
        if host in (SAME_MANUFACTURER, MY_CONTROLLER):
            raise error(f"{culprit}: expected an address, a prefix or a DNS name")
        if re.fullmatch(r"[0-9.]+(/[0-9]+)?", host):
            try:
                ipaddress.IPv4Network(host, strict=True)
            except ValueError as e:
                raise error(f"{culprit}: {e}") from None
        else:
            check_dns_name(host, culprit, error)


# -- RFC 8520: MUD URLs and what they make a device ---------------------------------------------
# A profile's destinations may name RFC 8520's device abstractions: "same-manufacturer" (the
# approved devices whose MUD authority is the device's own), {manufacturer = "example.com"}
# (those whose MUD authority is that host) and "my-controller" (the hosts the site names for
# the device's MUD URL, config `my_controllers`). A MUD authority is the host part of a MUD URL,
# lower case, without port.
SAME_MANUFACTURER = "same-manufacturer"
MY_CONTROLLER = "my-controller"


def check_mud_url(url, where: str, error: type[Exception] = ConfigError) -> str:
    """An RFC 8520 MUD URL: https (RFC 8520 allows no other scheme), with a host, no spaces."""
    if not isinstance(url, str) or not 0 < len(url) <= 2048:
        raise error(f"{where}: expected an https URL (up to 2048 characters), got {url!r}")
    if mud_authority(url) is None or any(c.isspace() or ord(c) < 32 for c in url):
        raise error(f"{where}: expected an https URL (a MUD URL is https), got {url!r}")
    return url


@functools.lru_cache(maxsize=1024)
def mud_authority(url: str | None) -> str | None:
    """The MUD authority of an https MUD URL: its host, lower case, without port (None: none,
    or not an https URL with a host)."""
    if not url:
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme != "https" or not host:
        return None
    return host.rstrip(".") or None


def check_mud_authority(value, where: str, error: type[Exception] = ConfigError) -> str:
    """A manufacturer as RFC 8520 names one: a MUD authority, the host of MUD URLs (a DNS name,
    no wildcard), lower case."""
    if not isinstance(value, str) or value.startswith("*"):
        raise error(f"{where}: expected the host of the manufacturer's MUD URLs (e.g. "
                    f"\"example.com\"), got {value!r}")
    return check_dns_name(value, where, error)


def check_my_controllers(my_controllers, where: str,
                         error: type[Exception] = ConfigError) -> dict[str, list[str]]:
    """The site's controllers per device MUD URL, {MUD URL: [address, prefix or DNS name, ...]}
    (RFC 8520's my-controller): shape, URLs and hosts checked."""
    if not isinstance(my_controllers, dict):
        raise error(f"{where}: expected a table of \"MUD URL\" = [hosts], got {my_controllers!r}")
    for url, hosts in my_controllers.items():
        check_mud_url(url, f"{where}: key {url!r}", error)
        _check_hosts(hosts, f'{where}."{url}"', error)
    return my_controllers


# -- passwords ----------------------------------------------------------------------------------
# The admin's password is kept as scrypt, with its parameters beside the hash (so they can be
# raised later); the supervisor sets it, the web page and the gate (auth_gate) check it.
SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hash_password(password: str, **params) -> dict:
    """{"salt", "hash", "n", "r", "p", "dklen"}: scrypt with a fresh salt, parameters kept
    with the hash so they can be raised later without breaking old hashes."""
    p = {**SCRYPT, **params}
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=p["n"], r=p["r"], p=p["p"],
                            dklen=p["dklen"], maxmem=128 * 1024 * 1024)
    return {"salt": _b64(salt), "hash": _b64(digest), **p}


def verify_password(password: str, stored: dict) -> bool:
    try:
        salt, expected = base64.b64decode(stored["salt"]), base64.b64decode(stored["hash"])
        digest = hashlib.scrypt(password.encode(), salt=salt, n=int(stored["n"]),
                                r=int(stored["r"]), p=int(stored["p"]), dklen=len(expected),
                                maxmem=128 * 1024 * 1024)
    except (KeyError, TypeError, ValueError):
        return False
    return hmac.compare_digest(digest, expected)
