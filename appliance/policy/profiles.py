"""Device-type profiles: data, not code. Each file gives, per posture, the umbox stack with its
parameters. Validated on load; an error names the file and the key.

The shipped profiles are umboxes/*.toml; the ones an operator installs at run time (`kalki
profile import`) live in <state directory>/profiles/*.toml and may not reuse a shipped type."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from appliance import HOME
from appliance.config import parse_toml, read_text
from appliance.dataplane import umbox
from appliance.errors import ConfigError
from appliance.policy.rules import parse_rule
from appliance.vocab import check_mud_url as vocab_check_mud_url
from appliance.vocab import check_posture

PROFILE_DIR = HOME / "umboxes"
INSTALLED_SUBDIR = "profiles"     # under the state directory: the profiles installed at run time
ADAPTER_KINDS = ("hue",)      # appliance.telemetry.adapters
TYPE_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")    # a type names a file: <type>.toml
PROFILE_KEYS = ("type", "description", "mud_url", "postures", "telemetry", "commands", "rules",
                "match", "adapter", "default_logins")
# [[default_logins]]: a device type's well-known factory logins, which the supervisor tries against
# an approved device's own login services (appliance.supervisor.logins).
LOGIN_SERVICES = ("telnet", "http_basic", "http_form")
LOGIN_KEYS = ("service", "port", "user", "password", "path")
LOGIN_PATHS = {"http_basic": "/", "http_form": "/login"}     # the default path per HTTP service
MAX_DEFAULT_LOGINS = 10          # each is one login try, a second or more apart
MAX_LOGIN_TEXT = 64              # user and password
MAX_LOGIN_PATH = 200


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
    mud_url: str | None = None                      # the RFC 8520 MUD URL it was imported from
    installed: bool = False                         # installed at run time, not shipped
    # [[default_logins]]: {service, port, user, password, path (http only)}, checked
    default_logins: list = field(default_factory=list)

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


def load_profile(path: Path, installed: bool = False) -> Profile:
    path = Path(path)
    try:
        data = parse_toml(read_text(path), str(path))
    except OSError as e:
        raise ConfigError(f"{path}: {e}") from None
    return parse_profile(data, path, installed)


def profile_from_text(text: str, source: str) -> Profile:
    """A profile from TOML text that is not (yet) a file: `source` names it in errors."""
    return parse_profile(parse_toml(text, source), Path(source))


def parse_profile(data: dict, path: Path, installed: bool = False) -> Profile:
    """A profile's TOML, parsed, validated; `path` names it in errors."""
    path = Path(path)
    unknown = set(data) - set(PROFILE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}")
    if not isinstance(data.get("type"), str):
        raise ConfigError(f"{path}: key 'type' is required (the device type's name)")
    check_type_name(data["type"], f"{path}: type")
    if not isinstance(data.get("description", ""), str):
        raise ConfigError(f"{path}: key 'description' must be a string")
    mud_url = data.get("mud_url")
    if mud_url is not None:
        check_mud_url(mud_url, f"{path}: mud_url")
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
    checked.setdefault("learning", umbox.validate(umbox.learning_stack(checked["normal"])))
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
    logins = check_default_logins(data.get("default_logins", []), path.name)
    return Profile(data["type"], data.get("description", ""), checked, path,
                   data.get("telemetry", {}), data.get("commands", {}), parsed, match, adapter,
                   mud_url, installed, logins)


def installed_dir(state_directory: Path | str) -> Path:
    """Where the profiles installed at run time live: <state directory>/profiles."""
    return Path(state_directory) / INSTALLED_SUBDIR


def load_all(directory: Path = PROFILE_DIR, installed: Path | None = None) -> dict[str, Profile]:
    """The shipped profiles in `directory`, then those installed in `installed` (if given): a
    type defined twice is an error naming both files."""
    out: dict[str, Profile] = {}
    for path in sorted(Path(directory).glob("*.toml")):
        p = load_profile(path)
        if p.type in out:
            raise ConfigError(f"{path}: device type {p.type} is also defined in {out[p.type].path.name}")
        out[p.type] = p
    if installed is not None:
        out.update(load_installed(installed, out))
    return out


def load_installed(directory: Path, shipped: dict[str, Profile]) -> dict[str, Profile]:
    """The installed profiles in `directory` (none if it does not exist); a type that is also
    in `shipped` (and not from this very file) is an error naming both files."""
    out: dict[str, Profile] = {}
    directory = Path(directory)
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.toml")):
        p = load_profile(path, installed=True)
        if path.stem != p.type:
            raise ConfigError(f"{path}: holds device type {p.type!r}; an installed profile's file "
                              f"is named after its type ({p.type}.toml)")
        other = shipped.get(p.type)
        if other is not None and other.path != p.path:
            raise ConfigError(f"{path}: device type {p.type} is also defined in {other.path} "
                              "(shipped with the appliance): remove one of them")
        out[p.type] = p
    return out


def check_type_name(name, where: str) -> str:
    if not isinstance(name, str) or not TYPE_NAME.fullmatch(name):
        raise ConfigError(f"{where}: a device type is 1 to 40 letters, digits, '_' or '-', got {name!r}")
    return name


def check_mud_url(url, where: str) -> str:
    """An RFC 8520 MUD URL: https (RFC 8520 allows no other scheme), with a host, no spaces."""
    return vocab_check_mud_url(url, where)


# -- writing profiles --------------------------------------------------------------------------
def dump_profile(data: dict, comments: list[str] | tuple[str, ...] = ()) -> str:
    """A profile (the dict a profile's TOML holds) as TOML, readably: each posture a table,
    each umbox a line (or a table of its own when its line would be long)."""
    lines = [f"# {line}".rstrip() for text in comments for line in text.splitlines() or [""]]
    if lines:
        lines.append("")
    for key in ("type", "description", "mud_url"):
        if data.get(key) is not None:
            lines.append(f"{key} = {toml_value(data[key])}")
    for name, stack in data.get("postures", {}).items():
        lines += ["", f"[postures.{_key(name)}]"]
        deferred = []
        for umbox_name, params in stack.items():
            line = f"{_key(umbox_name)} = {toml_value(params)}"
            if len(line) <= 100:
                lines.append(line)
            else:
                deferred.append((umbox_name, params))
        for umbox_name, params in deferred:
            lines += ["", f"[postures.{_key(name)}.{_key(umbox_name)}]"]
            for k, v in params.items():
                if isinstance(v, list) and v:
                    lines += [f"{_key(k)} = ["] + [f"    {toml_value(x)}," for x in v] + ["]"]
                else:
                    lines.append(f"{_key(k)} = {toml_value(v)}")
    for table in ("telemetry", "commands", "match", "adapter"):
        if data.get(table):
            lines += ["", f"[{table}]"] + [f"{_key(k)} = {toml_value(v)}" for k, v in data[table].items()]
    for rule in data.get("rules", []):
        lines += ["", "[[rules]]"] + [f"{_key(k)} = {toml_value(v)}" for k, v in rule.items()]
    for login in data.get("default_logins", []):
        lines += ["", "[[default_logins]]"] + [f"{_key(k)} = {toml_value(v)}" for k, v in login.items()]
    return "\n".join(lines) + "\n"


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):      # a JSON string is a TOML basic string, but for DEL
        return json.dumps(v).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}" if v else "{}"
    raise ConfigError(f"cannot write {v!r} as TOML")


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def write_installed(directory: Path, type_name: str, text: str) -> Path:
    """Writes <directory>/<type>.toml atomically (a temporary file, fsync, rename, fsync of the
    directory): a power cut leaves the old file or the new one."""
    check_type_name(type_name, "type")
    directory = Path(directory)
    path = directory / f"{type_name}.toml"
    tmp = directory / f".{type_name}.toml.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass        # a read-only file system made none, and refuses the unlink too
        raise ConfigError(f"{path}: cannot write the profile: {e.strerror or e}") from None
    return path


def remove_installed(path: Path) -> None:
    try:
        Path(path).unlink()
        _fsync_dir(Path(path).parent)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ConfigError(f"{path}: cannot remove the profile: {e.strerror or e}") from None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def check_default_logins(data, where: str) -> list[dict]:
    """[[default_logins]]: each {service, port, user, password, path}; `path` for the HTTP
    services only (default "/" for http_basic, "/login" for http_form). Returns them checked,
    with the path filled in."""
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ConfigError(f"{where}: key 'default_logins' must be a list of tables ([[default_logins]])")
    if len(data) > MAX_DEFAULT_LOGINS:
        raise ConfigError(f"{where}: default_logins: {len(data)} entries; at most {MAX_DEFAULT_LOGINS} "
                          "(each is a login try on the device)")
    out: list[dict] = []
    for i, entry in enumerate(data):
        at = f"{where}: default_logins[{i}]"
        unknown = set(entry) - set(LOGIN_KEYS)
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {sorted(unknown)} (known: {', '.join(LOGIN_KEYS)})")
        service = entry.get("service")
        if service not in LOGIN_SERVICES:
            raise ConfigError(f"{at}.service: expected one of {', '.join(LOGIN_SERVICES)}, got {service!r}")
        port = entry.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"{at}.port: expected a port 1 to 65535, got {port!r}")
        user = entry.get("user")
        if not isinstance(user, str) or not user:
            raise ConfigError(f"{at}.user: expected a user name (text, not empty), got {user!r}")
        password = entry.get("password")
        if not isinstance(password, str):
            raise ConfigError(f"{at}.password: expected text (\"\" for none), got {type(password).__name__}")
        for key, value in (("user", user), ("password", password)):
            if len(value) > MAX_LOGIN_TEXT or any(ord(c) < 0x20 or ord(c) == 0x7f for c in value):
                raise ConfigError(f"{at}.{key}: at most {MAX_LOGIN_TEXT} characters, no control "
                                  "characters")
        login = {"service": service, "port": port, "user": user, "password": password}
        if service in LOGIN_PATHS:
            path = entry.get("path", LOGIN_PATHS[service])
            if (not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_LOGIN_PATH
                    or any(ord(c) <= 0x20 or ord(c) >= 0x7f for c in path)):
                raise ConfigError(f"{at}.path: expected a path starting with / of at most "
                                  f"{MAX_LOGIN_PATH} printable ASCII characters, no spaces, got {path!r}")
            login["path"] = path
        elif "path" in entry:
            raise ConfigError(f"{at}.path: only the HTTP services (http_basic, http_form) have a path")
        if login in out:
            raise ConfigError(f"{at}: the same login as default_logins[{out.index(login)}]")
        out.append(login)
    return out
