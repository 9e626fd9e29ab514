"""Backup and restore (`kalki backup`, `kalki restore FILE`, the settings page): the site's
settings, the profiles installed at run time, the site rules and the device list, as one JSON
document that another appliance (after a re-flash, say) can take back:

    {"format": "kalki-backup", "version": 1, "created": "...", "secrets": false,
     "sha256": "<the content as canonical JSON, hashed>",
     "content": {"settings": {...}, "profiles": [{"type", "text"}], "rules": [...],
                 "devices": [{"name", "mac", "ip", "type", "group", "identity", "approved",
                              "posture", "allow"}], "secrets": {...}}}

The checksum refuses a file cut short or changed by hand (it is no signature: anyone may make
a valid one). The admin password's hash and the API tokens are in it only when asked for
(`secrets`). A device's posture is the one it holds without an end (a timed one is saved as the
posture it returns to).

A restore checks everything against this appliance before anything changes: the format, the
version and the checksum, each setting, each profile (as `kalki profile import` does), each rule
(as the rule editor does) and the rule set as a whole, each device record and the type it names.
An error names the culprit ("backup devices[3].type: unknown type 'lamp'"). Then it writes the
profiles, then the settings, rules and devices (one store write), and puts the devices'
postures in force through Supervisor.set_postures, as an approval does; a step that fails undoes
those before it. A restore adds and replaces, and removes nothing; and it never lowers a
posture: a device held here in a stricter posture than the backup's keeps it, and the result
says so.
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import ipaddress
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from appliance import policy
from appliance.dataplane import umbox
from appliance.errors import ConfigError, KalkiError, StoreError
from appliance.policy import profiles
from appliance.store.state import IDENTITY_KEYS, Store
from appliance.supervisor import accounts
from appliance.vocab import check_device_name, check_mac, check_posture, iso, stricter

FORMAT = "kalki-backup"
VERSION = 1
MAX_BYTES = 2_000_000         # a backup's file (the control socket carries up to 8 MB, escaped)
# The operator's settings (Ops.update_settings); the admin password and the API tokens are
# secrets, kept out unless asked for; maintenance is of the moment and not kept, nor are the
# built-in and profile rules switched off (rules_off): a restore never weakens protection.
SETTINGS = ("business_hours", "timezone")
SECRETS = ("admin", accounts.TOKENS_SETTING)
DOCUMENT_KEYS = ("format", "version", "created", "secrets", "sha256", "content")
CONTENT_KEYS = ("settings", "profiles", "rules", "devices", "secrets")
DEVICE_KEYS = ("name", "mac", "ip", "type", "group", "identity", "approved", "posture", "allow")
MAX_ALLOW = 64               # a device's own destinations, as the store keeps them

log = logging.getLogger("kalki.backup")


def checksum(content: dict) -> str:
    """sha256 of the content as canonical JSON (sorted keys, no spaces, UTF-8)."""
    try:
        text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"backup content: not plain JSON ({e})") from None
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# -- making one -------------------------------------------------------------------------------

def standing_posture(d: dict) -> str:
    """The posture a device holds without an end: its own, or for a timed one, the one it
    returns to last."""
    if not d.get("posture_expires"):
        return d.get("posture") or "unknown"
    after = d.get("posture_after") or []
    last = next((e.get("posture") for e in after if isinstance(e, dict) and e.get("until") is None), None)
    return last or d.get("posture_revert_to") or "normal"


def _device_record(d: dict) -> dict:
    return {"name": d["name"], "mac": d["mac"], "ip": d.get("ip"), "type": d.get("type"),
            "group": d.get("group"),
            "identity": {k: v for k, v in (d.get("identity") or {}).items() if v},
            "approved": bool(d.get("approved")), "posture": standing_posture(d),
            "allow": list(d.get("allow") or [])}


def make(sup, with_secrets: bool = False) -> dict:
    """The backup document of the supervisor's state now."""
    store = sup.store
    stored = store.settings()
    installed = []
    for type_, p in sorted(sup.profiles.items()):
        if p.installed:
            try:
                installed.append({"type": type_, "text": p.path.read_text(encoding="utf-8")})
            except OSError as e:
                raise ConfigError(f"{p.path}: {e.strerror or e}") from None
    content: dict = {
        "settings": {k: stored[k] for k in SETTINGS if stored.get(k) is not None},
        "profiles": installed,
        "rules": [{k: v for k, v in r.items() if k != "updated"} for r in store.rules()],
        "devices": [_device_record(d) for d in sorted(sup.known.values(), key=lambda d: d["name"])]}
    if with_secrets:
        content["secrets"] = {k: store.get_setting(k) for k in SECRETS
                              if store.get_setting(k) is not None}
    return {"format": FORMAT, "version": VERSION, "created": iso(sup.now()),
            "secrets": bool(with_secrets), "sha256": checksum(content), "content": content}


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


# -- reading one ------------------------------------------------------------------------------

def read(text) -> dict:
    """The document in a backup's text, its format, version and checksum checked."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("backup: the file is empty")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise ConfigError(f"backup: {size} bytes: a backup is at most {MAX_BYTES}")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"backup: not a Kalki backup, or cut short: not JSON ({e.msg} at line "
                          f"{e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ConfigError("backup: not a Kalki backup: nested too deeply") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(f"backup: not a Kalki backup (format {found!r}, expected {FORMAT!r})")
    version = doc.get("version")
    if isinstance(version, bool) or version != VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > VERSION
        raise ConfigError(f"backup: version {version!r}: this appliance reads version {VERSION}"
                          + (" (the file is from a newer Kalki: update this one first)" if newer else ""))
    unknown = set(doc) - set(DOCUMENT_KEYS)
    if unknown:
        raise ConfigError(f"backup: unknown key(s) {sorted(unknown)}")
    content = doc.get("content")
    if not isinstance(content, dict):
        raise ConfigError("backup: content: expected an object")
    sha = doc.get("sha256")
    if not isinstance(sha, str) or sha.lower() != checksum(content):
        raise ConfigError("backup: the checksum (sha256) does not match the content: the file was "
                          "changed or damaged; nothing was restored")
    unknown = set(content) - set(CONTENT_KEYS)
    if unknown:
        raise ConfigError(f"backup content: unknown key(s) {sorted(unknown)} "
                          f"(known: {', '.join(CONTENT_KEYS)})")
    return doc


# -- checking it against this appliance -------------------------------------------------------

@dataclass
class _Device:
    where: str
    record: dict             # name, mac, ip, type, group, identity, approved, posture, allow
    current: dict | None     # the device here with the same MAC
    keep: str | None = None  # a stricter posture it holds here, kept

    @property
    def name(self) -> str:
        return self.record["name"]


@dataclass
class Plan:
    created: str | None
    settings: dict
    secrets: dict
    profiles: list[tuple[str, str]]          # (type, text) to install or replace
    profiles_unchanged: list[str]
    rules: list[dict]
    devices: list[_Device]
    notes: list[str] = field(default_factory=list)


def _object(value, where: str, known: tuple, required: tuple = ()) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected an object, got {value!r}"[:300])
    unknown = set(value) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: {', '.join(known)})")
    for key in required:
        if value.get(key) is None:
            raise ConfigError(f"{where}: {key} is required")
    return value


def _list(content: dict, key: str) -> list:
    value = content.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"backup {key}: expected a list")
    return value


def _settings(content: dict) -> dict:
    value = _object(content.get("settings", {}), "backup settings", SETTINGS)
    for k, v in value.items():
        try:
            Store.check_setting(k, v)
        except (StoreError, ConfigError) as e:
            raise ConfigError(f"backup settings.{k}: {e}") from None
    return value


def _secrets(content: dict) -> dict:
    value = _object(content.get("secrets", {}), "backup secrets", SECRETS)
    admin = value.get("admin")
    if admin is not None:
        ok = (isinstance(admin, dict) and isinstance(admin.get("user"), str) and admin["user"]
              and isinstance(admin.get("scrypt"), dict)
              and {"salt", "hash", "n", "r", "p"} <= set(admin["scrypt"]))
        if not ok:
            raise ConfigError("backup secrets.admin: expected {user, scrypt: {salt, hash, n, r, p, "
                              "dklen}}")
    tokens = value.get(accounts.TOKENS_SETTING)
    if tokens is not None:
        if not isinstance(tokens, list) or len(tokens) > 50:
            raise ConfigError(f"backup secrets.{accounts.TOKENS_SETTING}: expected a list of up to 50 tokens")
        for i, t in enumerate(tokens):
            if not (isinstance(t, dict) and all(isinstance(t.get(k), str) and t[k]
                                                for k in ("id", "name", "sha256", "created"))):
                raise ConfigError(f"backup secrets.{accounts.TOKENS_SETTING}[{i}]: expected "
                                  "{id, name, sha256, created}")
    return value


def _profiles(sup, content: dict, candidate: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """The installed profiles to write; `candidate` (the types after the restore) is updated."""
    write, same, seen = [], [], set()
    for i, entry in enumerate(_list(content, "profiles")):
        where = f"backup profiles[{i}]"
        entry = _object(entry, where, ("type", "text"), ("type", "text"))
        type_ = profiles.check_type_name(entry["type"], f"{where}.type")
        text = entry["text"]
        if not isinstance(text, str):
            raise ConfigError(f"{where}.text: expected the profile's TOML")
        if type_ in seen:
            raise ConfigError(f"{where}: device type {type_} is in the backup twice")
        seen.add(type_)
        parsed = profiles.profile_from_text(text, f"{where} ({type_}.toml)")
        if parsed.type != type_:
            raise ConfigError(f"{where}: the text is of device type {parsed.type!r}, not {type_!r}")
        existing = sup.profiles.get(type_)
        if existing is not None and not existing.installed:
            raise ConfigError(f"{where}: device type {type_} is shipped with this appliance "
                              f"({existing.path}); an installed profile cannot replace it")
        if existing is not None and _read(existing.path) == text:
            same.append(type_)
        else:
            write.append((type_, text))
        candidate[type_] = parsed
    return write, same


def _read(path: Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return None


def _rules(sup, content: dict, candidate: dict) -> list[dict]:
    """The site rules to write, after checking each and the rule set they make with the rest."""
    fixed = [r for r in sup.rules() if r.source != "site" and not r.source.startswith("profile:")]
    fixed += [r for p in candidate.values() for r in p.rules]
    fixed_names = {r.name: r.source for r in fixed}
    site = {r["name"]: {k: v for k, v in r.items() if k != "updated"} for r in sup.store.rules()}
    out: list[dict] = []
    seen: dict[str, int] = {}
    for i, data in enumerate(_list(content, "rules")):
        where = f"backup rules[{i}]"
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected an object")
        data = {k: v for k, v in data.items() if k != "updated"}
        rule = policy.parse_rule(data, where, source="site")
        if rule.name in fixed_names:
            raise ConfigError(f"{where}: a {fixed_names[rule.name]} rule is named {rule.name!r} here; "
                              "a site rule cannot take its name")
        if rule.name in seen:
            raise ConfigError(f"{where}: rule {rule.name!r} is also rules[{seen[rule.name]}]")
        seen[rule.name] = i
        site[rule.name] = data
        out.append(data)
    rules = fixed + [policy.parse_rule(d, f"site rule {n}", source="site") for n, d in site.items()]
    try:
        policy.Engine(rules)
    except ConfigError as e:
        raise ConfigError(f"backup rules: {e}") from None
    return out


def _device(entry, where: str, types: dict) -> dict:
    r = _object(entry, where, DEVICE_KEYS, ("name", "mac"))
    name = check_device_name(r["name"], f"{where}.name")
    mac = check_mac(r["mac"], f"{where}.mac", unicast=True)
    ip = r.get("ip")
    if ip is not None:
        try:
            ip = str(ipaddress.IPv4Address(ip))
        except ValueError:
            raise ConfigError(f"{where}.ip: invalid IPv4 address {ip!r}") from None
    type_ = r.get("type")
    if type_ is not None and (not isinstance(type_, str) or type_ not in types):
        raise ConfigError(f"{where}.type: unknown type {type_!r} (known here and in the backup: "
                          f"{', '.join(sorted(types))})")
    group = r.get("group")
    if group is not None and (not isinstance(group, str) or not 1 <= len(group) <= 64
                              or not group.isprintable()):
        raise ConfigError(f"{where}.group: expected 1 to 64 printable characters, got {group!r}")
    identity = _object(r.get("identity") or {}, f"{where}.identity", IDENTITY_KEYS)
    for k, v in identity.items():
        if v is not None and (not isinstance(v, str) or len(v) > 255):
            raise ConfigError(f"{where}.identity.{k}: expected text of up to 255 characters, got {v!r}")
    approved = r.get("approved", False)
    if not isinstance(approved, bool):
        raise ConfigError(f"{where}.approved: expected true or false, got {approved!r}")
    posture = check_posture(r.get("posture") or ("normal" if approved else "unknown"), f"{where}.posture")
    allow = r.get("allow") or []
    if not isinstance(allow, list) or len(allow) > MAX_ALLOW:
        raise ConfigError(f"{where}.allow: expected a list of up to {MAX_ALLOW} destinations")
    for j, destination in enumerate(allow):
        if not isinstance(destination, str) or len(destination) > 300:
            raise ConfigError(f"{where}.allow[{j}]: expected a destination as text, got {destination!r}")
        umbox.parse_destination(destination, "allow", f"{where}.allow[{j}]: ")
    if approved and type_ is None:
        raise ConfigError(f"{where}: approved, but it has no type")
    return {"name": name, "mac": mac, "ip": ip, "type": type_, "group": group,
            "identity": {k: v for k, v in identity.items() if v}, "approved": approved,
            "posture": posture, "allow": list(allow)}


def _devices(sup, content: dict, types: dict, notes: list[str]) -> list[_Device]:
    by_mac = {d["mac"]: d for d in sup.known.values()}
    names: dict[str, int] = {}
    macs: dict[str, int] = {}
    out = []
    for i, entry in enumerate(_list(content, "devices")):
        where = f"backup devices[{i}]"
        r = _device(entry, where, types)
        name, mac = r["name"], r["mac"]
        if name in names:
            raise ConfigError(f"{where}.name: {name} is also devices[{names[name]}]")
        if mac in macs:
            raise ConfigError(f"{where}.mac: {mac} is also devices[{macs[mac]}]")
        names[name], macs[mac] = i, i
        holder = sup.known.get(name)
        if holder is not None and holder["mac"] != mac:
            raise ConfigError(f"{where}: the name {name} is taken here by the device with MAC "
                              f"{holder['mac']}: remove that device first (kalki device remove {name})")
        current = by_mac.get(mac)
        if not r["approved"] and current is not None and current.get("approved"):
            notes.append(f"{current['name']}: approved here but not in the backup: left as it is")
            continue
        dev = _Device(where, r, current)
        if r["approved"]:
            if not (r["ip"] or (current or {}).get("ip")):
                raise ConfigError(f"{where}: approved, but no address is known for it (ip)")
            if r["posture"] in ("unknown", "learning"):
                if r["posture"] == "learning":
                    notes.append(f"{name}: was learning; restored in normal (kalki device learn "
                                 f"{name} to learn again)")
                r["posture"] = "normal"
            held = (current or {}).get("posture")
            if (current is not None and current.get("approved") and current.get("type") in sup.profiles
                    and held and stricter(held, r["posture"])):
                dev.keep = held
                notes.append(f"{name}: kept {held} here, stricter than the backup's {r['posture']}: a "
                             "restore never lowers protection")
        out.append(dev)
    return out


def _check_postures(sup, content: dict, devices: list[_Device], types: dict, written: set[str]) -> None:
    """Each device to be enforced has its posture in its profile as it will be: the restored
    devices, and those here of a type whose profile the backup replaces."""
    for dev in devices:
        r = dev.record
        posture = dev.keep or r["posture"]
        if r["approved"] and posture not in types[r["type"]].postures:
            held = " (the stricter one it holds here, which a restore keeps)" if dev.keep else ""
            raise ConfigError(f"{dev.where}.posture: device type {r['type']} has no posture "
                              f"{posture!r}{held}")
    planned = {dev.record["mac"] for dev in devices}
    where = {e["type"]: f"backup profiles[{i}]" for i, e in enumerate(_list(content, "profiles"))}
    for name, d in sorted(sup.known.items()):
        if (d["mac"] not in planned and d.get("approved") and d.get("type") in written
                and d["posture"] not in types[d["type"]].postures):
            raise ConfigError(f"{where[d['type']]}: device {name} here is in posture {d['posture']}, "
                              f"which the backup's {d['type']} profile does not have")


def check(sup, doc: dict) -> Plan:
    """Everything in the backup checked against this appliance; nothing is changed."""
    content = doc["content"]
    notes: list[str] = []
    settings = _settings(content)
    secrets = _secrets(content)
    candidate = dict(sup.profiles)
    write, same = _profiles(sup, content, candidate)
    rules = _rules(sup, content, candidate)
    devices = _devices(sup, content, candidate, notes)
    _check_postures(sup, content, devices, candidate, {t for t, _ in write})
    if secrets:
        notes.append("the backup holds the admin password and API tokens: they replace this "
                     "appliance's")
    else:
        notes.append("the backup holds no admin password or API tokens (made without secrets): "
                     "this appliance keeps its own")
    return Plan(doc.get("created") if isinstance(doc.get("created"), str) else None, settings,
                secrets, write, same, rules, devices, notes)


# -- applying it ------------------------------------------------------------------------------

def _seconds_left(d: dict, now: datetime.datetime) -> int | None:
    exp = d.get("posture_expires")
    if not exp:
        return None
    # rounded up: a kept posture ends no sooner than it would have
    return max(1, math.ceil((datetime.datetime.fromisoformat(exp) - now).total_seconds()))


def _summary(sup, plan: Plan, dry_run: bool) -> dict:
    site = {r["name"] for r in sup.store.rules()}
    added = [d.name for d in plan.devices if d.current is None]
    renamed = [{"from": d.current["name"], "to": d.name} for d in plan.devices
               if d.current is not None and d.current["name"] != d.name]
    return {"dry_run": dry_run, "created": plan.created, "settings": sorted(plan.settings),
            "secrets": sorted(plan.secrets),
            "profiles": {"installed": [t for t, _ in plan.profiles if t not in sup.profiles],
                         "replaced": [t for t, _ in plan.profiles if t in sup.profiles],
                         "unchanged": plan.profiles_unchanged},
            "rules": {"added": [r["name"] for r in plan.rules if r["name"] not in site],
                      "replaced": [r["name"] for r in plan.rules if r["name"] in site]},
            "devices": {"added": added,
                        "updated": [d.name for d in plan.devices if d.current is not None],
                        "renamed": renamed},
            "enforced": sorted(d.name for d in plan.devices if d.record["approved"]),
            "kept": [{"device": d.name, "posture": d.keep, "backup": d.record["posture"]}
                     for d in plan.devices if d.keep],
            "notes": list(plan.notes)}


def restore(sup, text, directory: Path, dry_run: bool = False, actor: str = "operator") -> dict:
    """Checks the backup, then (unless dry_run) puts it in force; returns what was (or would
    be) done. Raises ConfigError naming the culprit, with nothing changed."""
    plan = check(sup, read(text))
    result = _summary(sup, plan, dry_run)
    if dry_run:
        return result
    _apply(sup, plan, Path(directory), actor, result)
    sup.end_polls_not_polled()      # a profile or a device's type restored without [adapter]
    if sup.bus:
        for dev in plan.devices:
            if dev.current is not None and dev.current["name"] != dev.name:
                sup.bus.remove_discovery(dev.current["name"])
            if dev.record["approved"]:
                sup.publish_discovery(dev.name)
    for dev in plan.devices:
        sup.notify({"kind": "device", "device": dev.name, "event": "restored"})
    return result


def _apply(sup, plan: Plan, directory: Path, actor: str, result: dict) -> None:
    store = sup.store
    written: list[tuple[str, str | None]] = []
    before = {"profiles": dict(sup.profiles), "known": copy.deepcopy(sup.known),
              "suggestions": dict(sup.suggestions), "availability": dict(sup.availability)}
    touched = False       # the data path was changed: on failure, converge it back
    try:
        # 1. the profiles, each file written atomically
        loaded = {}
        for type_, text in plan.profiles:
            path = directory / f"{type_}.toml"
            written.append((type_, _read(path) if path.exists() else None))
            profiles.write_installed(directory, type_, text)
            loaded[type_] = profiles.load_profile(path, installed=True)
        sup.profiles.update(loaded)      # in place: the adapters hold the dict
        replaced = set(loaded)
        # 2. settings, secrets, rules and devices: one store write, all or nothing
        with store.batch():
            for k, v in {**plan.settings, **plan.secrets}.items():
                store.set_setting(k, v)
            for data in plan.rules:
                store.put_rule(data["name"], data)
            for dev in plan.devices:
                old = dev.current["name"] if dev.current is not None else None
                if old is not None and old != dev.name:
                    sup.known[dev.name] = store.rename_device(old, dev.name)
                    del sup.known[old]
                    sup.suggestions.pop(old, None)
                    sup.availability.pop(old, None)
                    if old in sup.enforced_devices():
                        touched = True
                        sup.dp.remove(old)     # closed until it is applied under its name below
            for dev in plan.devices:
                _write_device(sup, dev)
            sup.reload_rules()
            store.audit("restore", actor, {
                "created": plan.created, "settings": sorted(plan.settings),
                "secrets": sorted(plan.secrets), "profiles": [t for t, _ in plan.profiles],
                "rules": [r["name"] for r in plan.rules], "devices": [d.name for d in plan.devices],
                "kept": [d.name for d in plan.devices if d.keep]})
            # 3. in force: the restored devices, and those whose profile was replaced
            changes, returns = _changes(sup, plan, replaced)
            if changes:
                touched = True
                sup.set_postures(changes, "restored from a backup", actor=actor, returns=returns)
            result["enforced"] = sorted(name for name, _, _ in changes)
    except BaseException:
        _undo(sup, directory, written, before, touched)
        raise


def _write_device(sup, dev: _Device) -> None:
    store, r = sup.store, dev.record
    current = sup.known.get(dev.name)
    if current is None:
        sup.known[dev.name] = store.upsert_device(
            dev.name, r["mac"], ip=r["ip"], type=r["type"], identity=r["identity"], approved=False,
            posture="unknown", group=r["group"])
        fields: dict = {}
    else:      # what the appliance saw of it since (its address, its DHCP identity) is newer
        seen = {k: v for k, v in (current.get("identity") or {}).items() if v}
        fields = {"type": r["type"], "group": r["group"], "identity": {**r["identity"], **seen}}
        if not current.get("ip") and r["ip"]:
            fields["ip"] = r["ip"]
    if r["allow"] or (current or {}).get("allow"):
        fields["allow"] = r["allow"]
    if r["approved"]:
        fields["approved"] = True
    sup.known[dev.name] = store.update_device(dev.name, **fields)


def _changes(sup, plan: Plan, replaced: set[str]):
    """(device, posture, seconds) for set_postures, and what timed ones return to: the backup's
    posture, or the stricter one a device holds here, with its time left."""
    now = sup.now()
    changes, returns = [], {}
    planned = {d.name: d for d in plan.devices}

    def held(name: str) -> None:
        d = sup.known[name]
        seconds = _seconds_left(d, now)
        changes.append((name, d["posture"], seconds))
        if seconds and isinstance(d.get("posture_after"), list):
            returns[name] = d["posture_after"]

    for dev in plan.devices:
        if not dev.record["approved"]:
            continue
        if dev.keep:
            held(dev.name)
        else:
            changes.append((dev.name, dev.record["posture"], None))
    for name, d in sup.known.items():      # others of a type whose profile changed
        if (name not in planned and d.get("approved") and d.get("type") in replaced
                and d.get("ip") and d["posture"] != "unknown"):
            held(name)
    return changes, returns


def _undo(sup, directory: Path, written, before: dict, touched: bool) -> None:
    """Puts back what a failed restore changed outside the store (whose batch is rolled back
    by itself): the profiles' files, the supervisor's view, and the data path."""
    for type_, previous in reversed(written):
        try:
            if previous is None:
                profiles.remove_installed(directory / f"{type_}.toml")
            else:
                profiles.write_installed(directory, type_, previous)
        except ConfigError as e:
            log.error("restore: putting back profile %s: %s", type_, e)
    sup.profiles.clear()
    sup.profiles.update(before["profiles"])
    sup.known.clear()
    sup.known.update(before["known"])
    for key in ("suggestions", "availability"):
        getattr(sup, key).clear()
        getattr(sup, key).update(before[key])
    try:
        sup.reload_rules()
    except KalkiError as e:
        log.error("restore: reloading the rules: %s", e)
    if touched:
        try:
            sup.dp.reconcile(sup.wanted())
        except Exception as e:     # noqa: BLE001 - the restore's own error is the one raised
            log.error("restore: converging the data path back: %s", e)
