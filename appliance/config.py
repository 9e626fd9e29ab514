"""The supervisor's configuration: one TOML file, typed, self-documenting.

`kalki config defaults` prints every key with its default and what it means; an error names
the file, the key and what was expected. Unknown keys are errors, not ignored: a typo must not
silently leave a default in force.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import ConfigError
from appliance.vocab import (
    WORKDAYS,
    check_business_hours,
    check_controllers,
    check_days,
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


@dataclass
class MqttSection:
    host: str = _doc("broker address", "127.0.0.1")
    port: int = _doc("broker port", 1883, PORT)
    base: str = _doc("topic prefix: <base>/<device>, <base>/<device>/set, <base>/bridge/state", "kalki")
    user: str = _doc("the supervisor's broker user", "kalki")
    password_file: str = _doc("file holding the supervisor's broker password", "/etc/kalki/mqtt-password")
    max_payload: int = _doc("bytes; bigger telemetry payloads are rejected and counted", 4096,
                            (64, 65536))   # the broker's max_packet_size


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
        return self


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
