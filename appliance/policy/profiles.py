"""Device-type profiles in umboxes/: data, not code. Each file gives, per posture, the umbox
stack with its parameters. Validated on load; an error names the file and the key."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from appliance import HOME
from appliance.config import parse_toml, read_text
from appliance.dataplane import umbox
from appliance.errors import ConfigError
from appliance.policy.rules import parse_rule
from appliance.vocab import check_posture

PROFILE_DIR = HOME / "umboxes"
ADAPTER_KINDS = ("hue",)      # appliance.telemetry.adapters


@dataclass
class Profile:
    type: str
    description: str
    postures: dict[str, dict]
    path: Path
    telemetry: dict = field(default_factory=dict)   # field -> meaning
    commands: dict = field(default_factory=dict)    # field -> meaning (what /set accepts)
    rules: list = field(default_factory=list)       # policy.Rule, applying to this type
    match: dict = field(default_factory=dict)       # mac_prefixes, hostname (regex), vendor_class
    adapter: dict | None = None                     # a polling adapter (appliance.telemetry.adapters)

    def matches(self, mac: str, identity: dict) -> bool:
        """Whether a newly seen device looks like this type (a suggestion for the operator)."""
        m = self.match
        if any(mac.lower().startswith(p.lower()) for p in m.get("mac_prefixes", [])):
            return True
        host = identity.get("hostname") or ""
        if m.get("hostname") and host and re.fullmatch(m["hostname"], host):
            return True
        vendor = identity.get("vendor_class") or ""
        return bool(m.get("vendor_class") and vendor and m["vendor_class"].lower() in vendor.lower())

    def stack(self, posture: str) -> dict:
        try:
            return self.postures[posture]
        except KeyError:
            raise ConfigError(f"{self.path.name}: device type {self.type} has no posture "
                              f"{posture!r} (it has: {', '.join(self.postures)})") from None


def load_profile(path: Path) -> Profile:
    path = Path(path)
    try:
        data = parse_toml(read_text(path), str(path))
    except OSError as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown = set(data) - {"type", "description", "postures", "telemetry", "commands", "rules",
                           "match", "adapter"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}")
    if not isinstance(data.get("type"), str):
        raise ConfigError(f"{path}: key 'type' is required (the device type's name)")
    postures = data.get("postures")
    if not isinstance(postures, dict) or "normal" not in postures:
        raise ConfigError(f"{path}: key 'postures' must be a table with at least postures.normal")
    checked = {}
    for posture, stack in postures.items():
        check_posture(posture, f"{path.name}: postures.{posture}")    # "unknown" may be given
        checked[posture] = umbox.validate(stack, where=f"{path.name}: postures.{posture}: ")
        umbox.compile_stack(stack, where=f"{path.name}: postures.{posture}: ")
    # A posture without umboxes would leave an unapproved device open: fail closed instead.
    checked.setdefault("unknown", umbox.validate({"quarantine": {"management": False}}))
    checked.setdefault("quarantine", umbox.validate({"quarantine": {}}))
    for key in ("telemetry", "commands", "match"):
        if not isinstance(data.get(key, {}), dict):
            raise ConfigError(f"{path.name}: key {key!r} must be a table")
    match = data.get("match", {})
    unknown = set(match) - {"mac_prefixes", "hostname", "vendor_class"}
    if unknown:
        raise ConfigError(f"{path.name}: match: unknown key(s) {sorted(unknown)}")
    if "hostname" in match:
        try:
            re.compile(match["hostname"])
        except re.error as e:
            raise ConfigError(f"{path.name}: match.hostname: invalid pattern: {e}") from None
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise ConfigError(f"{path.name}: key 'rules' must be a list of tables ([[rules]])")
    parsed = [parse_rule(r, f"{path.name}: rules[{i}]", (data["type"],),
                                source=f"profile:{data['type']}") for i, r in enumerate(rules)]
    adapter = None
    if "adapter" in data:
        adapter = check_profile_adapter(data["adapter"], path.name)
    return Profile(data["type"], data.get("description", ""), checked, path,
                   data.get("telemetry", {}), data.get("commands", {}), parsed, match, adapter)


def load_all(directory: Path = PROFILE_DIR) -> dict[str, Profile]:
    out: dict[str, Profile] = {}
    for path in sorted(Path(directory).glob("*.toml")):
        p = load_profile(path)
        if p.type in out:
            raise ConfigError(f"{path}: device type {p.type} is also defined in {out[p.type].path.name}")
        out[p.type] = p
    return out


def check_profile_adapter(data, where: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: adapter must be a table")
    unknown = set(data) - {"kind", "poll_seconds"}
    if unknown:
        raise ConfigError(f"{where}: adapter: unknown key(s) {sorted(unknown)}")
    if data.get("kind") not in ADAPTER_KINDS:
        raise ConfigError(f"{where}: adapter.kind must be one of {', '.join(ADAPTER_KINDS)}")
    poll = data.get("poll_seconds", 2)
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 0.2 <= poll <= 3600:
        raise ConfigError(f"{where}: adapter.poll_seconds must be 0.2 to 3600, got {poll!r}")
    return {"kind": data["kind"], "poll_seconds": float(poll)}
