"""The supervisor's configuration: one TOML file, typed, self-documenting.

`kalki config defaults` prints every key with its default and what it means; an error names
the file, the key and what was expected. Unknown keys are errors, not ignored: a typo must not
silently leave a default in force.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import ConfigError
from appliance.vocab import WORKDAYS, check_business_hours, check_timezone

DEFAULT_PATH = Path("/etc/kalki/kalki.toml")


def _doc(text: str, default):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class GatewaySection:
    devices_interface: str = _doc("interface facing the IoT devices (XDP dispatcher)", "eth1")
    uplink_interface: str = _doc("interface facing the network", "eth0")
    address: str = _doc("the gateway's address on the device side (DHCP, DNS, MQTT)", "198.18.0.1")
    lan: str = _doc("the device network, CIDR", "198.18.0.0/20")
    namespace: str = _doc("network namespace of the gateway (the lab only; empty on a Pi)", "")
    instance: str = _doc("name of the pin directory under /sys/fs/bpf/kalki/", "appliance")
    gate_port: int = _doc("port of the authentication gate on the gateway", 8181)
    dhcp_leases: str = _doc("the DHCP server's lease file (dnsmasq): a device's first packets "
                            "from a new address are not taken for spoofing", "/var/lib/kalki/dnsmasq/leases")


@dataclass
class StateSection:
    directory: str = _doc("where the store lives (the data partition on a Pi)", "/var/lib/kalki")
    history_per_device: int = _doc("posture changes kept per device", 200)
    alerts: int = _doc("alerts kept", 5000)
    decisions: int = _doc("decisions (audit log entries) kept", 5000)
    max_age_days: int = _doc("nothing older is kept", 30)


@dataclass
class MqttSection:
    host: str = _doc("broker address", "127.0.0.1")
    port: int = _doc("broker port", 1883)
    base: str = _doc("topic prefix: <base>/<device>, <base>/<device>/set, <base>/bridge/state", "kalki")
    user: str = _doc("the supervisor's broker user", "kalki")
    password_file: str = _doc("file holding the supervisor's broker password", "/etc/kalki/mqtt-password")
    max_payload: int = _doc("bytes; bigger telemetry payloads are rejected and counted", 4096)


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
    port: int = _doc("port of the web page", 443)
    tls: bool = _doc("HTTPS with a certificate the appliance makes at first start", True)
    tls_dir: str = _doc("where the certificate and key are kept", "/var/lib/kalki/tls")
    netns: str = _doc("lab only: network namespace file to listen in (e.g. /proc/1/ns/net)", "")


@dataclass
class PanelSection:
    enabled: bool = _doc("drive the posture LEDs and the button", False)
    mock_pins: bool = _doc("gpiozero's mock pin factory instead of real GPIO (the lab, tests)", False)
    led_green: int = _doc("BCM pin of the green LED", 17)
    led_amber: int = _doc("BCM pin of the amber LED", 27)
    led_red: int = _doc("BCM pin of the red LED", 22)
    button: int = _doc("BCM pin of the button (to ground)", 3)


@dataclass
class AdaptersSection:
    credentials_file: str = _doc('polled devices\' API users: {"device": {"user": "..."}}',
                                 "/etc/kalki/adapter-credentials.json")


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
    profiles: str = _doc("directory of device-type profiles", "")
    path: str = ""

    def check(self) -> Config:
        where = self.path or "config"
        try:
            net = ipaddress.IPv4Network(self.gateway.lan)
            if ipaddress.IPv4Address(self.gateway.address) not in net:
                raise ConfigError(f"{where}: gateway.address {self.gateway.address} is not in "
                                  f"gateway.lan {self.gateway.lan}")
        except ValueError as e:
            raise ConfigError(f"{where}: gateway.lan / gateway.address: {e}") from None
        p = self.policy
        check_business_hours({"days": p.business_days, "start": p.business_start, "end": p.business_end},
                             f"{where}: policy.business_days/start/end")
        check_timezone(p.timezone, f"{where}: policy.timezone")
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
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}" if where else name)
        elif type(default) is not type(value) and not (isinstance(default, float) and isinstance(value, int)):
            raise ConfigError(f"{where}.{name}: expected {type(default).__name__}, got {value!r}"
                              if where else f"{name}: expected {type(default).__name__}, got {value!r}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load(path: Path | str) -> Config:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
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
    return str(value)


def dump(cfg: Config) -> str:
    """A configuration as TOML (for the lab, which writes one per lab)."""
    lines = []
    if cfg.profiles:
        lines.append(f"profiles = {_toml(cfg.profiles)}")
    for f in dataclasses.fields(Config):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section) and not isinstance(section, type):
            lines.append(f"[{f.name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in dataclasses.asdict(section).items()]
    return "\n".join(lines) + "\n"
