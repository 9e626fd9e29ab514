"""What the page and the API do, in one place: control operations (appliance.supervisor.control.handle,
the same code as the CLI), site rules, settings, the admin password.

Every function validates before it changes anything, and raises a KalkiError (or ValueError)
whose message names the culprit.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

from appliance.supervisor import control
from appliance.policy import engine as policy
from appliance.errors import ConfigError, UnknownDeviceError
from appliance.faces.web import auth

SETTABLE_POSTURES = ("normal", "suspicious", "attack", "quarantine")


def run(sup, op: str, **args):
    return control.handle(sup, {"op": op, "args": args})


def error_status(e: Exception) -> int:
    if isinstance(e, UnknownDeviceError):
        return 404
    if isinstance(e, (ConfigError, ValueError, TypeError)) or type(e).__name__ == "StoreError":
        return 400
    return 500


# -- devices ------------------------------------------------------------------------------

def telemetry(sup, name: str, limit: int = 20) -> list[dict]:
    return [{"at": at.isoformat(timespec="seconds"), "values": payload}
            for at, payload in sup.recent_telemetry(name, limit)]


def device_detail(sup, name: str) -> dict:
    view = run(sup, "device_show", name=name)
    view["telemetry"] = telemetry(sup, name)
    view["decisions"] = sup.store.decisions(device=name, limit=30)
    view["kernel_alerts"] = [a for a in view.get("alerts", []) if a.get("source") == "kernel"]
    if not view.get("approved") and name in getattr(sup, "suggestions", {}):
        view["suggested_type"] = sup.suggestions[name]
    return view


def set_posture(sup, name, posture, for_=None):
    if posture not in SETTABLE_POSTURES:
        raise ConfigError(f"posture: expected one of {', '.join(SETTABLE_POSTURES)}, got {posture!r}")
    return run(sup, "posture_set", name=name, posture=posture, **({"for": for_} if for_ else {}))


def approve(sup, name, type_):
    if not isinstance(type_, str) or type_ not in sup.profiles:
        raise ConfigError(f"type: expected one of {', '.join(sup.profiles)}, got {type_!r}")
    sup._device(name)
    return run(sup, "device_approve", name=name, type=type_)


def maintenance(sup, minutes):
    if isinstance(minutes, str):
        if not minutes.strip().isdigit():
            raise ConfigError(f"maintenance: minutes must be 0 to 1440, got {minutes!r}")
        minutes = int(minutes)
    return run(sup, "maintenance", minutes=minutes)


# -- rules --------------------------------------------------------------------------------

def rules_view(sup) -> list[dict]:
    stored = {r["name"]: r for r in sup.store.rules()}
    out = []
    for r in sup._rules():
        row = {"name": r.name, "source": r.source, "priority": r.priority, "enabled": r.enabled,
               "applies_to": list(r.applies_to), "editable": r.source == "site",
               "description": (stored.get(r.name) or {}).get("description", "")}
        if r.source == "site":
            row["definition"] = {k: v for k, v in stored.get(r.name, {}).items() if k != "updated"}
        out.append(row)
    order = {"builtin": 0, "site": 2}
    return sorted(out, key=lambda r: (order.get(r["source"], 1), r["source"], r["name"]))


def _fixed_names(sup) -> dict[str, str]:
    return {r.name: r.source for r in sup._rules() if r.source != "site"}


def put_rules(sup, rules: list[dict], where: str, actor: str) -> list[str]:
    """Adds or replaces site rules after checking each and the whole rule set."""
    if not isinstance(rules, list) or not rules:
        raise ConfigError(f"{where}: expected a non-empty list of rules")
    parsed = [policy.parse_rule(r, f"{where}: rules[{i}]") for i, r in enumerate(rules)]
    fixed = _fixed_names(sup)
    for r in parsed:
        if r.name in fixed:
            raise ConfigError(f"rule {r.name!r}: a {fixed[r.name]} rule has that name; "
                              "choose another name")
    site = {r["name"]: r for r in sup.store.rules()}
    for r in rules:
        site[r["name"]] = {**r, "enabled": r.get("enabled", site.get(r["name"], {}).get("enabled", True))}
    candidate = [r for r in sup._rules() if r.source != "site"]
    candidate += [policy.parse_rule({k: v for k, v in d.items() if k != "updated"},
                                    f"site rule {n}", source="site") for n, d in site.items()]
    policy.Engine(candidate)     # duplicate names, anything else the engine refuses
    with sup.store.batch():
        for r in rules:
            sup.store.put_rule(r["name"], r)
            sup.store.audit("rule-put", actor, {"rule": r["name"]})
    sup.engine.replace_rules(sup._rules())
    return [r.name for r in parsed]


def put_rules_text(sup, text, actor: str) -> list[str]:
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("rules: the text is empty")
    control.validate_rules_text(text, "rules")
    return put_rules(sup, tomllib.loads(text)["rules"], "rules", actor)


def _site_rule(sup, name):
    if not isinstance(name, str) or sup.store.get_rule(name) is None:
        fixed = _fixed_names(sup)
        if name in fixed:
            raise ConfigError(f"rule {name!r} is a {fixed[name]} rule; only site rules can be changed")
        raise ConfigError(f"rule {name!r} does not exist")


def set_rule_enabled(sup, name, enabled, actor: str) -> dict:
    _site_rule(sup, name)
    if isinstance(enabled, str) and enabled in ("true", "false", "1", "0"):
        enabled = enabled in ("true", "1")
    if not isinstance(enabled, bool):
        raise ConfigError(f"rule {name!r}: enabled must be true or false, got {enabled!r}")
    with sup.store.batch():
        rule = sup.store.set_rule_enabled(name, enabled)
        sup.store.audit("rule-enabled" if enabled else "rule-disabled", actor, {"rule": name})
    sup.engine.replace_rules(sup._rules())
    return rule


def delete_rule(sup, name, actor: str) -> None:
    _site_rule(sup, name)
    with sup.store.batch():
        sup.store.delete_rule(name)
        sup.store.audit("rule-delete", actor, {"rule": name})
    sup.engine.replace_rules(sup._rules())


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)      # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def rule_toml(rule: dict) -> str:
    lines = ["[[rules]]"]
    for k in ("name", "description", "priority", "enabled", "applies_to", "when", "then"):
        if k in rule:
            lines.append(f"{k} = {toml_value(rule[k])}")
    return "\n".join(lines) + "\n"


RULE_EXAMPLE = """[[rules]]
name = "night-camera-watch"
description = "any alert on a camera at night: suspicious for an hour"
applies_to = ["camera"]
when = {all = [{time = {business_hours = false}}, {alert = {device = "self", count = 1, within = "10m"}}]}
then = [{set_posture = {posture = "suspicious", for = "1h"}}]
"""


# -- settings -----------------------------------------------------------------------------

def update_settings(sup, changes: dict, actor: str) -> dict:
    if not isinstance(changes, dict) or not changes:
        raise ConfigError("settings: expected an object with business_hours and/or timezone")
    unknown = set(changes) - {"business_hours", "timezone"}
    if unknown:
        raise ConfigError(f"settings: unknown key(s) {sorted(unknown)} (known: business_hours, timezone)")
    from appliance.store.state import _check_setting
    for k, v in changes.items():   # all checked before any is stored
        _check_setting(k, v)
    with sup.store.batch():
        for k, v in changes.items():
            sup.store.set_setting(k, v)
        sup.store.audit("settings", actor, {"changed": sorted(changes)})
    return sup.settings()


def change_password(sup, current, new, confirm, actor: str) -> None:
    admin = sup.store.get_setting("admin")
    if not admin or not isinstance(current, str) or not auth.verify_password(current, admin["scrypt"]):
        raise ConfigError("current password: wrong")
    user = auth.check_new_credentials(admin["user"], new, confirm)
    with sup.store.batch():
        sup.store.set_setting("admin", {"user": user, "scrypt": auth.hash_password(new)})
        sup.store.audit("admin-password", actor, {})


def claim(sup, user, password, confirm, actor: str) -> str:
    if sup.store.get_setting("admin"):
        raise ConfigError("this gateway has an admin already: log in")
    if not sup.claim_open():
        raise ConfigError("the claim window is closed: press the button on the box, then try again "
                          "within 5 minutes")
    user = auth.check_new_credentials(user, password, confirm)
    with sup.store.batch():
        sup.store.set_setting("admin", {"user": user, "scrypt": auth.hash_password(password)})
        sup.store.set_setting(auth.TOKENS_SETTING, [])     # a new owner: old tokens go
        sup.store.audit("admin-claimed", actor, {"user": user})
    sup.claim_until = None       # one claim per press
    return user


def broker_users(sup) -> set[str] | None:
    """Devices with a user on the MQTT broker, from Mosquitto's password file when the
    supervisor can see it (the lab; on a Pi /etc/kalki/mqtt/passwords); None if unknown."""
    pw = Path(sup.cfg.mqtt.password_file)
    for candidate in (pw.parent / "mqtt" / "passwords", Path("/etc/kalki/mqtt/passwords")):
        try:
            return {line.split(":", 1)[0] for line in candidate.read_text().splitlines() if ":" in line}
        except OSError:
            continue
    return None


def mqtt_view(sup) -> list[dict]:
    users = broker_users(sup)
    return [{"device": name, "broker_user": None if users is None else name in users,
             "availability": sup.availability.get(name)}
            for name in sorted(sup.known)]


