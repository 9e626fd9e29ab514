"""The supervisor's configuration: one TOML file, typed, self-documenting.

`kalki config defaults` prints every key with its default and what it means; an error names
the file, the key and what was expected. Unknown keys are errors, not ignored: a typo must not
silently leave a default in force.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
import ssl
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import ConfigError
from appliance.vocab import (
    SEVERITIES,
    WORKDAYS,
    check_business_hours,
    check_controllers,
    check_days,
    check_device_name,
    check_discovery_prefix,
    check_my_controllers,
    check_timezone,
    parse_hhmm,
)

DEFAULT_PATH = Path("/etc/kalki/kalki.toml")


def _doc(text: str, default, bounds: tuple[int, int] | None = None):
    """A key: its meaning, its default (which gives its type) and, for a number, its bounds."""
    meta = {"doc": text, "bounds": bounds}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


PORT = (1, 65535)
GPIO = (0, 27)       # BCM numbers on the Pi's header


@dataclass
class GatewaySection:
    devices_interface: str = _doc("interface facing the IoT devices (XDP dispatcher)", "eth1")
    uplink_interface: str = _doc("interface facing the network", "eth0")
    address: str = _doc("the gateway's address on the device side (DHCP, DNS, MQTT)", "198.18.0.1")
    lan: str = _doc("the device network, CIDR", "198.18.0.0/20")
    namespace: str = _doc("network namespace of the gateway (the lab only; empty on a Pi)", "")
    instance: str = _doc("name of the pin directory under /sys/fs/bpf/kalki/", "appliance")
    gate_port: int = _doc("port of the authentication gate on the gateway", 8181, PORT)
    gate_policy_dir: str = _doc("where the supervisor writes what the gate does for each gated "
                                "device (auth_gate, api_filter, token_guard), one file per device "
                                "address, for the gate's --policy-dir; empty: none",
                                "/run/kalki/gate")
    gate_credentials: str = _doc("where the supervisor writes the admin account (user, scrypt hash) "
                                 "for the gate's auth_gate (its --credentials-file), whenever it "
                                 "changes; empty: not written", "/run/kalki/gate-credentials.json")
    dhcp_leases: str = _doc("the DHCP server's lease file (dnsmasq): a device's first packets "
                            "from a new address are not taken for spoofing", "/var/lib/kalki/dnsmasq/leases")


@dataclass
class StateSection:
    directory: str = _doc("where the store lives (the data partition on a Pi)", "/var/lib/kalki")
    history_per_device: int = _doc("posture changes kept per device", 200, (1, 100_000))
    alerts: int = _doc("alerts kept", 5000, (1, 1_000_000))
    decisions: int = _doc("decisions (audit log entries) kept", 5000, (1, 1_000_000))
    max_age_days: int = _doc("nothing older is kept", 30, (1, 3650))
    traffic_charts: bool = _doc("read each device's kernel counters every 10 s for the page's "
                                "traffic charts (the last hour in 10-s slots, the last day in "
                                "5-minute ones; about 13 KB of memory per device), kept in "
                                "traffic.bin in the directory above", True)
    traffic_save_minutes: int = _doc("the traffic charts' history is written to the data "
                                     "partition this often, and at a clean stop (what a power "
                                     "cut loses)", 5, (1, 60))


@dataclass
class MqttSection:
    host: str = _doc("broker address", "127.0.0.1")
    port: int = _doc("broker port", 1883, PORT)
    base: str = _doc("topic prefix: <base>/<device>, <base>/<device>/set, <base>/bridge/state", "kalki")
    user: str = _doc("the supervisor's broker user", "kalki")
    password_file: str = _doc("file holding the supervisor's broker password", "/etc/kalki/mqtt-password")
    max_payload: int = _doc("bytes; bigger telemetry payloads are rejected and counted", 4096,
                            (64, 65536))   # the broker's max_packet_size
    discovery_prefix: str = _doc("Home Assistant's discovery prefix (its MQTT integration's setting "
                                 "of that name): the entities' configs go under <prefix>/..., and "
                                 "its \"online\" on <prefix>/status has them published again",
                                 "homeassistant")
    home_assistant_user: str = _doc("the broker user Home Assistant logs in as: it may read the "
                                    "discovery configs and the supervisor's topics, and it alone "
                                    "may set a posture (<base>/<device>/posture/set); empty: none",
                                    "homeassistant")
    broker_directory: str = _doc("the directory of Mosquitto's configuration, password file and "
                                 "ACL as appliance/system/broker.py writes them: where the Home "
                                 "Assistant user's password is set, and the broker found by its "
                                 "configuration's path to reload", "/var/lib/kalki/mqtt")


@dataclass
class PolicySection:
    timezone: str = _doc("time zone of business hours", "UTC")
    business_days: list = _doc("days with business hours", list(WORKDAYS))
    business_start: str = _doc("business hours start, HH:MM", "08:00")
    business_end: str = _doc("business hours end, HH:MM", "18:00")
    fake_time: str = _doc("lab only: ISO time the policy clock starts at (it then runs)", "")


@dataclass
class ControlSection:
    socket: str = _doc("root-only unix socket of the CLI", "/run/kalki/kalki.sock")


@dataclass
class WebSection:
    enabled: bool = _doc("serve the operator's web page", False)
    listen: str = _doc("address of the web page", "0.0.0.0")
    port: int = _doc("port of the web page", 443, PORT)
    tls: bool = _doc("HTTPS with a certificate the appliance makes at first start", True)
    tls_dir: str = _doc("where the certificate and key are kept", "/var/lib/kalki/tls")
    netns: str = _doc("lab only: network namespace file to listen in (e.g. /proc/1/ns/net)", "")


@dataclass
class PanelSection:
    enabled: bool = _doc("drive the posture LEDs and the button", False)
    mock_pins: bool = _doc("gpiozero's mock pin factory instead of real GPIO (the lab, tests)", False)
    led_green: int = _doc("BCM pin of the green LED", 17, GPIO)
    led_amber: int = _doc("BCM pin of the amber LED", 27, GPIO)
    led_red: int = _doc("BCM pin of the red LED", 22, GPIO)
    button: int = _doc("BCM pin of the button (to ground)", 3, GPIO)


@dataclass
class AdaptersSection:
    credentials_file: str = _doc('polled devices\' API users: {"device": {"user": "..."}}',
                                 "/etc/kalki/adapter-credentials.json")


@dataclass
class NamesSection:
    resolver: bool = _doc("answer the devices' DNS (any resolver they ask) through the gateway, "
                          "binding each answer's addresses for the device that asked", True)
    upstream_port: int = _doc("port of dnsmasq on 127.0.0.1, behind the devices' port 53", 5301, PORT)
    grace_seconds: int = _doc("a resolved address stays allowed this long past the answer's TTL",
                              300, (0, 86_400))
    keep_seconds: int = _doc("and at least this long past the last flow the device opened to it",
                             3600, (0, 7 * 86_400))


@dataclass
class StationsSection:
    bridge: str = _doc("a bridge whose forwarding table shows which port each device is on (the "
                       "Pi's own wired ports, or a switch the site hands over): a device's MAC on "
                       "two ports is a clone; empty: none", "")
    bridge_namespace: str = _doc("network namespace of that bridge, as a path (/run/netns/NAME); "
                                 "empty: the gateway's own", "")
    hostapd_control: str = _doc("hostapd's control socket for the devices' access point "
                                "(/run/hostapd/wlan0): one MAC associating again and again is a "
                                "clone; empty: none", "")
    window_seconds: int = _doc("moves or associations of one MAC counted within this window",
                               60, (5, 3600))
    cut_clone_port: bool = _doc("switch off the bridge port a clone appeared on (the victim keeps "
                                "its own port)", True)


@dataclass
class MudSection:
    fetch: bool = _doc("fetch the MUD file a new device names in DHCP (option 161) over HTTPS, "
                       "check it and its signature where one is published, and offer it as the "
                       "device's type at approval (docs/mud.md)", False)
    ca_file: str = _doc("PEM file of the CAs trusted for MUD file servers and MUD file signatures, "
                        "instead of the system's; empty: the system's trust store", "")
    timeout_seconds: int = _doc("a MUD file, its signature and the signature's check take at most "
                                "this long", 10, (1, 120))


@dataclass
class NotifySection:
    min_severity: str = _doc("alerts of this severity and above are sent on every channel below "
                             "and as Home Assistant alert events (info, warning, critical)", "warning")
    ntfy_url: str = _doc("ntfy server, e.g. https://ntfy.sh (http only to a loopback or LAN host: "
                         "see docs/operators-manual.md#notifications); empty: no ntfy", "")
    ntfy_topic: str = _doc("the ntfy topic (letters, digits, - and _, at most 64)", "")
    ntfy_token_file: str = _doc("file holding an ntfy access token (sent as a bearer token); "
                                "empty: none", "")
    webhook_url: str = _doc("URL the alert is POSTed to as JSON, signed (X-Kalki-Signature: "
                            "sha256=HMAC of \"<X-Kalki-Timestamp>.<body>\"); same rule as ntfy_url; "
                            "empty: no webhook", "")
    webhook_secret_file: str = _doc("file holding the webhook's HMAC secret (needed with "
                                    "webhook_url)", "")
    smtp_host: str = _doc("SMTP relay for e-mail; empty: no e-mail", "")
    smtp_port: int = _doc("the relay's port (submission)", 587, PORT)
    smtp_starttls: bool = _doc("STARTTLS before anything else, the certificate checked; false "
                               "only to a loopback or LAN relay", True)
    smtp_ca_file: str = _doc("PEM file of the CAs trusted for the relay, instead of the system's; "
                             "empty: the system's trust store", "")
    smtp_user: str = _doc("login at the relay (with smtp_password_file); empty: no login", "")
    smtp_password_file: str = _doc("file holding the relay password", "")
    smtp_from: str = _doc("sender address", "")
    smtp_to: list = _doc("recipient addresses", [])
    timeout_seconds: int = _doc("one try on one channel takes at most this long", 10, (1, 120))
    max_per_minute: int = _doc("messages per channel per minute; the rest are summed up in one "
                               "\"N more alerts\" message at the end of the minute", 10, (1, 600))


@dataclass
class Config:
    gateway: GatewaySection = field(default_factory=GatewaySection)
    state: StateSection = field(default_factory=StateSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    policy: PolicySection = field(default_factory=PolicySection)
    control: ControlSection = field(default_factory=ControlSection)
    web: WebSection = field(default_factory=WebSection)
    panel: PanelSection = field(default_factory=PanelSection)
    adapters: AdaptersSection = field(default_factory=AdaptersSection)
    names: NamesSection = field(default_factory=NamesSection)
    mud: MudSection = field(default_factory=MudSection)
    stations: StationsSection = field(default_factory=StationsSection)
    notify: NotifySection = field(default_factory=NotifySection)
    profiles: str = _doc("directory of device-type profiles", "")
    controllers: dict = _doc("the site's controllers, named once: {class = [address, prefix or DNS "
                             "name, ...]}; profiles open them as {controller = \"class\", proto, "
                             "port} (RFC 8520's controller), e.g. {camera-cloud = "
                             "[\"*.vendor-cloud.com\"], phone = [\"198.18.0.50\"]}", {})
    my_controllers: dict = _doc("the site's controllers per device MUD URL (RFC 8520's "
                                "my-controller): {\"MUD URL\" = [address, prefix or DNS name, "
                                "...]}; a device whose MUD URL (its profile's mud_url, else the one "
                                "it sends in DHCP) is a key may open those hosts where its profile "
                                "says \"my-controller\", e.g. {\"https://lamps.example.com/"
                                "lamp.json\" = [\"198.18.0.60\"]}", {})
    path: str = ""

    def check(self) -> Config:
        where = self.path or "config"
        for f in dataclasses.fields(self):     # every key: its type and bounds (beside its default)
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sf in dataclasses.fields(value):
                    _check_value(sf, getattr(value, sf.name), f"{where}: {f.name}.{sf.name}")
            elif f.name != "path":
                _check_value(f, value, f"{where}: {f.name}")
        try:
            net = ipaddress.IPv4Network(self.gateway.lan)
            if ipaddress.IPv4Address(self.gateway.address) not in net:
                raise ConfigError(f"{where}: gateway.address {self.gateway.address} is not in "
                                  f"gateway.lan {self.gateway.lan}")
        except ValueError as e:
            raise ConfigError(f"{where}: gateway.lan / gateway.address: {e}") from None
        p = self.policy
        check_days(p.business_days, f"{where}: policy.business_days")
        parse_hhmm(p.business_start, f"{where}: policy.business_start")
        parse_hhmm(p.business_end, f"{where}: policy.business_end")
        check_business_hours({"days": p.business_days, "start": p.business_start, "end": p.business_end},
                             f"{where}: policy.business_days/start/end")
        check_timezone(p.timezone, f"{where}: policy.timezone")
        check_controllers(self.controllers, f"{where}: controllers")
        if self.mud.ca_file:
            try:
                ssl.create_default_context(cafile=self.mud.ca_file)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"{where}: mud.ca_file: {self.mud.ca_file}: "
                                  f"{getattr(e, 'strerror', None) or e} (a PEM file of CA "
                                  "certificates)") from None
        check_my_controllers(self.my_controllers, f"{where}: my_controllers")
        check_notify(self.notify, f"{where}: notify")
        check_mqtt(self.mqtt, f"{where}: mqtt")
        return self


def check_mqtt(m: MqttSection, where: str) -> None:
    """The names that become topic levels and the broker's ACL lines; `where` names the section."""
    check_discovery_prefix(m.discovery_prefix, m.base, f"{where}.discovery_prefix")
    if m.home_assistant_user:
        check_device_name(m.home_assistant_user, f"{where}.home_assistant_user")
        if m.home_assistant_user == m.user:
            raise ConfigError(f"{where}.home_assistant_user: {m.user!r} is the supervisor's broker "
                              "user (mqtt.user); give Home Assistant one of its own")
        if m.home_assistant_user == "bridge":
            raise ConfigError(f"{where}.home_assistant_user: 'bridge' is reserved (<base>/bridge/... "
                              "is the supervisor's)")


# -- [notify] -----------------------------------------------------------------------------------
# http (no TLS) is allowed only to a host on the loopback or the LAN: an IP address Python's
# ipaddress calls loopback, private or link-local (127/8, 10/8, 172.16/12, 192.168/16,
# 169.254/16, ::1, fc00::/7, fe80::/10, ...), "localhost", or a name under one of these suffixes.
LAN_SUFFIXES = (".local", ".lan", ".home.arpa", ".internal")
NTFY_TOPIC = re.compile(r"[-_A-Za-z0-9]{1,64}")
EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)+")
HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[?[0-9A-Fa-f:.]+\]?")


def lan_host(host: str) -> bool:
    """True for a loopback or LAN host (the rule above), which may be spoken to without TLS."""
    host = host.lower().strip("[]").rstrip(".")
    if host == "localhost" or host.endswith(LAN_SUFFIXES):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local


def check_notify_url(url, key: str, query: bool = True) -> str:
    """An https URL, or http to a loopback or LAN host; no user or password in it (a secret
    comes from a file), no fragment. `key` names it in the error."""
    if not isinstance(url, str) or any(c.isspace() for c in url):
        raise ConfigError(f"{key}: {url!r} is not a URL")
    try:
        parts = urllib.parse.urlsplit(url)
        host, _port = parts.hostname, parts.port
    except ValueError as e:
        raise ConfigError(f"{key}: {url!r}: {e}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigError(f"{key}: {url!r}: expected https://host/...")
    if parts.scheme == "http" and not lan_host(host):
        raise ConfigError(f"{key}: {url!r}: http (no TLS) only to a loopback or LAN host "
                          f"(a private address, localhost, or *{', *'.join(LAN_SUFFIXES)}); use https")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{key}: {url!r}: no user or password in the URL (secrets come from files)")
    if parts.fragment or (parts.query and not query):
        raise ConfigError(f"{key}: {url!r}: no {'fragment' if parts.fragment else 'query'} here")
    return url


def check_email(value, key: str) -> str:
    if not isinstance(value, str) or not EMAIL.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} is not an e-mail address (name@example.com)")
    return value


def _secret_file(path: str, key: str) -> None:
    """Readable and not empty; the secret itself is read by the notifier, never shown."""
    try:
        with open(path, "rb") as f:
            empty = not f.read(4096).strip()
    except OSError as e:
        raise ConfigError(f"{key}: {path}: {e.strerror}") from None
    if empty:
        raise ConfigError(f"{key}: {path} is empty")


def check_notify(n: NotifySection, where: str) -> None:
    """Each channel whole (its URL or relay, and what it needs), or not at all: a key set for
    a channel that is off is an error, not ignored. `where` names the section."""
    if n.min_severity not in SEVERITIES:
        raise ConfigError(f"{where}.min_severity: {n.min_severity!r} (known: {', '.join(SEVERITIES)})")

    def only_with(main: str, *keys: str) -> None:
        for k in keys:
            if getattr(n, k) and not getattr(n, main):
                raise ConfigError(f"{where}.{k}: set, but {main} is empty (that channel is off)")
    only_with("ntfy_url", "ntfy_topic", "ntfy_token_file")
    only_with("webhook_url", "webhook_secret_file")
    only_with("smtp_host", "smtp_ca_file", "smtp_user", "smtp_password_file", "smtp_from", "smtp_to")
    if n.ntfy_url:
        check_notify_url(n.ntfy_url, f"{where}.ntfy_url", query=False)
        if not NTFY_TOPIC.fullmatch(n.ntfy_topic):
            raise ConfigError(f"{where}.ntfy_topic: {n.ntfy_topic!r}: expected 1 to 64 letters, "
                              "digits, - and _")
        if n.ntfy_token_file:
            _secret_file(n.ntfy_token_file, f"{where}.ntfy_token_file")
    if n.webhook_url:
        check_notify_url(n.webhook_url, f"{where}.webhook_url")
        if not n.webhook_secret_file:
            raise ConfigError(f"{where}.webhook_secret_file: needed with webhook_url (every "
                              "message is signed)")
        _secret_file(n.webhook_secret_file, f"{where}.webhook_secret_file")
    if n.smtp_host:
        if not HOST.fullmatch(n.smtp_host):
            raise ConfigError(f"{where}.smtp_host: {n.smtp_host!r}: expected a host name or address")
        if not n.smtp_starttls and not lan_host(n.smtp_host):
            raise ConfigError(f"{where}.smtp_starttls: false only to a loopback or LAN relay, "
                              f"not {n.smtp_host!r}")
        if bool(n.smtp_user) != bool(n.smtp_password_file):
            raise ConfigError(f"{where}.{'smtp_password_file' if n.smtp_user else 'smtp_user'}: "
                              "smtp_user and smtp_password_file go together")
        if n.smtp_password_file:
            _secret_file(n.smtp_password_file, f"{where}.smtp_password_file")
        if n.smtp_ca_file:
            try:
                ssl.create_default_context(cafile=n.smtp_ca_file)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"{where}.smtp_ca_file: {n.smtp_ca_file}: "
                                  f"{getattr(e, 'strerror', None) or e} (a PEM file of CA "
                                  "certificates)") from None
        check_email(n.smtp_from, f"{where}.smtp_from")
        if not n.smtp_to:
            raise ConfigError(f"{where}.smtp_to: at least one recipient")
        for i, to in enumerate(n.smtp_to):
            check_email(to, f"{where}.smtp_to[{i}]")


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, key)
        else:
            kwargs[name] = _check_value(f, value, key)
    return cls(**kwargs)


def _check_value(f: dataclasses.Field, value, key: str):
    """A key's value against its default's type and its declared bounds; `key` names it."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if type(default) is not type(value) and not (isinstance(default, float) and isinstance(value, int)):
        raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}")
    bounds = f.metadata.get("bounds")
    if bounds and not bounds[0] <= value <= bounds[1]:
        raise ConfigError(f"{key}: expected {bounds[0]} to {bounds[1]}, got {value!r}")
    return value


def read_text(path: Path | str) -> str:
    """A file's text, decoded as UTF-8; a ConfigError names the file and the first bad byte.
    OSError (no such file, ...) is the caller's to word."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte {e.start} (line {line}) is "
                          f"0x{raw[e.start]:02x} ({e.reason})") from None


def parse_toml(text: str, where: str) -> dict:
    """TOML text as a dict; a ConfigError names `where`, also for absurd nesting."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read") from None


def load(path: Path | str) -> Config:
    path = Path(path)
    try:
        data = parse_toml(read_text(path), str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    try:
        cfg = _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.path = str(path)
    return cfg.check()


def defaults_toml() -> str:
    """Every key with its default and meaning: the self-documenting configuration."""
    lines = ["# Kalki supervisor configuration (/etc/kalki/kalki.toml). Every key is optional.", ""]
    top = Config()
    for f in dataclasses.fields(Config):
        if f.name == "path" or dataclasses.is_dataclass(getattr(top, f.name)):
            continue
        lines += [f"# {f.metadata.get('doc', '')}", f"{f.name} = {_toml(getattr(top, f.name))}", ""]
    for f in dataclasses.fields(Config):
        section = getattr(top, f.name)
        if not dataclasses.is_dataclass(section):
            continue
        lines.append(f"[{f.name}]")
        for sf in dataclasses.fields(section):
            lines += [f"# {sf.metadata.get('doc', '')}", f"{sf.name} = {_toml(getattr(section, sf.name))}"]
        lines.append("")
    return "\n".join(lines)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def dump(cfg: Config) -> str:
    """A configuration as TOML (for the lab, which writes one per lab)."""
    lines = []
    if cfg.profiles:
        lines.append(f"profiles = {_toml(cfg.profiles)}")
    if cfg.controllers:
        lines.append(f"controllers = {_toml(cfg.controllers)}")
    if cfg.my_controllers:
        lines.append(f"my_controllers = {_toml(cfg.my_controllers)}")
    for f in dataclasses.fields(Config):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section) and not isinstance(section, type):
            lines.append(f"[{f.name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in dataclasses.asdict(section).items()]
    return "\n".join(lines) + "\n"
