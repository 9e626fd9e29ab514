"""The rule language: what a rule is and how it is checked. `parse_rule` validates all of a rule
and normalises it (durations in seconds, times in minutes, defaults filled); an error names the
place, e.g. "camera.toml: rules[2].when.all[1].alert: unknown key(s) ['cout']". How rules are
evaluated is appliance.policy.engine's business."""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Protocol

from appliance.errors import ConfigError
from appliance.vocab import (
    MAX_POSTURE_SECONDS,
    SEVERITIES,
    WORKDAYS,
    check_days,
    check_posture,
    check_timezone,
    parse_hhmm,
)

AGGREGATES = ("last", "avg", "min", "max", "count", "sum")
CONDITIONS = ("alert", "telemetry", "changed", "posture", "time", "all", "any", "not")
ACTIONS = ("set_posture", "command", "alert", "poll")
COMPARISONS = ("==", "!=", "<", "<=", ">", ">=", "in")
MAX_NESTING = 16      # levels of all/any/not in one condition
POLL_MIN_SECONDS, POLL_MAX_SECONDS = 1, 3600    # the poll action's `every`
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NO_DATA = object()


# ---------------------------------------------------------------- data types

@dataclass(frozen=True)
class Stimulus:
    kind: str            # "alert" | "telemetry" | "posture" | "tick"
    device: str | None   # the device it is about ("self" in rules)
    data: dict
    received_ns: int     # time.monotonic_ns() when it came in (a kernel alert: the event's time)


class Facts(Protocol):
    def now(self) -> datetime.datetime: ...
    def device_type(self, device: str) -> str | None: ...
    def devices(self) -> list[str]: ...
    def group_of(self, device: str) -> str | None: ...
    def devices_where(self, key: str, value: str) -> list[str]: ...   # key: "type" | "group"
    def alerts(self, device: str | None, types: set[str] | None, since: datetime.datetime) -> int: ...
    def telemetry(self, device: str, field: str, last: int | None = None,
                  since: datetime.datetime | None = None) -> list: ...
    def posture(self, device: str) -> str: ...
    def settings(self) -> dict: ...


@dataclass(frozen=True)
class Rule:
    name: str
    when: dict           # condition tree, normalised
    then: tuple          # actions, normalised
    priority: int = 0    # higher first
    enabled: bool = True
    applies_to: tuple = ()   # device types evaluated as "self"; () = every device
    source: str = "site"     # "profile:camera", "site", ...


@dataclass(frozen=True)
class Action:
    kind: str                     # "set_posture" | "command" | "alert" | "poll"
    targets: tuple[str, ...]      # resolved device names
    params: dict


@dataclass(frozen=True)
class Decision:
    rule: str
    device: str | None     # the "self" it fired for
    stimulus: Stimulus
    actions: tuple[Action, ...]
    decided_ns: int


# ---------------------------------------------------------------- validation

def _keys(data, where: str, required=(), optional=()) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {data!r}")
    unknown = set(data) - set(required) - set(optional)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} "
                          f"(known: {', '.join([*required, *optional])})")
    for key in required:
        if key not in data:
            raise ConfigError(f"{where}: key {key!r} is required")
    return data


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _texts(value, where: str) -> tuple[str, ...]:
    """A string or a non-empty list of strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: expected a string or a non-empty list of strings, got {value!r}")
    return tuple(_text(item, f"{where}[{i}]") for i, item in enumerate(items))


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected a whole number >= 1, got {value!r}")
    return value


def parse_duration(text_or_int, where) -> int:
    """'90s', '15m', '2h', '1d' or a number of seconds; always > 0."""
    value = text_or_int
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (m := re.fullmatch(r"(\d+)([smhd])", value.strip())):
        seconds = int(m[1]) * _UNITS[m[2]]
    else:
        raise ConfigError(f"{where}: invalid duration {value!r} (use e.g. 90s, 15m, 2h, 1d or seconds)")
    if seconds <= 0:
        raise ConfigError(f"{where}: duration must be more than 0, got {value!r}")
    return seconds


def _window(start, end, where: str) -> tuple[int, int]:
    start, end = parse_hhmm(start, f"{where}[0]"), parse_hhmm(end, f"{where}[1]")
    if start == end:
        raise ConfigError(f"{where}: start and end are the same time; the window would be empty")
    return start, end


def parse_business_hours(settings: dict, where: str = "settings") -> dict:
    """settings["business_hours"] and settings["timezone"] → {"days", "between", "timezone"}.
    The supervisor can call it when settings are saved, so evaluation never meets bad ones."""
    hours = _keys(settings.get("business_hours"), f"{where}.business_hours",
                  required=("start", "end"), optional=("days",))
    return {
        "days": check_days(hours.get("days", list(WORKDAYS)), f"{where}.business_hours.days"),
        "between": _window(hours["start"], hours["end"], f"{where}.business_hours.start/end"),
        "timezone": check_timezone(settings.get("timezone", "UTC"), f"{where}.timezone"),
    }


def _selector(value, where: str):
    """'self' | 'any' | a device name | {type = "light"} | {group = "hall"}."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("type", "group"):
        key, name = next(iter(value.items()))
        return {key: _text(name, f"{where}.{key}")}
    raise ConfigError(f"{where}: unknown selector {value!r} (use 'self', 'any', a device name, "
                      "{type = ...} or {group = ...})")


def _value(value, where: str):
    if isinstance(value, (dict, datetime.date, datetime.time)):
        raise ConfigError(f"{where}: expected a number, string or true/false, got {value!r}")
    return value


def _condition(data, where: str, depth: int = 0) -> dict:
    """`depth`: how many all/any/not enclose this condition (at most MAX_NESTING)."""
    if not isinstance(data, dict) or len(data) != 1:
        raise ConfigError(f"{where}: a condition is a table with exactly one of: "
                          f"{', '.join(CONDITIONS)}")
    kind, body = next(iter(data.items()))
    if kind not in CONDITIONS:
        raise ConfigError(f"{where}.{kind}: unknown condition {kind!r} (known: {', '.join(CONDITIONS)})")
    if kind in ("all", "any", "not") and depth >= MAX_NESTING:
        raise ConfigError(f"{where}.{kind}: nested deeper than {MAX_NESTING} levels of all/any/not")
    if kind == "not":
        return {kind: _condition(body, f"{where}.{kind}", depth + 1)}
    if kind in ("all", "any"):
        return {kind: _all_or_any(body, f"{where}.{kind}", depth + 1)}
    return {kind: _CONDITION_PARSERS[kind](body, f"{where}.{kind}")}


def _all_or_any(body, where: str, depth: int = 0) -> tuple:
    if not isinstance(body, list) or not body:
        raise ConfigError(f"{where}: needs a non-empty list of conditions")
    return tuple(_condition(c, f"{where}[{i}]", depth) for i, c in enumerate(body))


def _alert_condition(body, where: str) -> dict:
    c = _keys(body, where, optional=("type", "device", "count", "within"))
    return {
        "type": _texts(c["type"], f"{where}.type") if "type" in c else None,
        "device": _selector(c.get("device", "self"), f"{where}.device"),
        "count": _count(c.get("count", 1), f"{where}.count"),
        "within": parse_duration(c.get("within", "10m"), f"{where}.within"),
    }


def _telemetry_condition(body, where: str) -> dict:
    c = _keys(body, where, required=("field", "op", "value"),
              optional=("device", "agg", "last", "within", "match"))
    if c["op"] not in COMPARISONS:
        raise ConfigError(f"{where}.op: unknown operator {c['op']!r} (known: {', '.join(COMPARISONS)})")
    if c["op"] == "in" and not isinstance(c["value"], list):
        raise ConfigError(f"{where}.value: operator 'in' needs a list, got {c['value']!r}")
    if c.get("agg", "last") not in AGGREGATES:
        raise ConfigError(f"{where}.agg: unknown aggregate {c['agg']!r} "
                          f"(known: {', '.join(AGGREGATES)})")
    if "last" in c and "within" in c:
        raise ConfigError(f"{where}: give 'last' or 'within', not both")
    if c.get("match", "any") not in ("any", "all"):
        raise ConfigError(f"{where}.match: expected 'any' or 'all', got {c['match']!r}")
    value = c["value"]
    value = (tuple(_value(v, f"{where}.value[{i}]") for i, v in enumerate(value))
             if c["op"] == "in" else _value(value, f"{where}.value"))
    return {
        "device": _selector(c.get("device", "self"), f"{where}.device"),
        "field": _text(c["field"], f"{where}.field"), "op": c["op"], "value": value,
        "agg": c.get("agg", "last"),
        "last": _count(c["last"], f"{where}.last") if "last" in c else None,
        "within": parse_duration(c["within"], f"{where}.within") if "within" in c else None,
        "match": c.get("match", "any"),
    }


def _changed_condition(body, where: str) -> dict:
    c = _keys(body, where, required=("field", "to"), optional=("device", "from"))
    out = {"device": _selector(c.get("device", "self"), f"{where}.device"),
           "field": _text(c["field"], f"{where}.field"), "to": _value(c["to"], f"{where}.to")}
    if "from" in c:
        out["from"] = _value(c["from"], f"{where}.from")
    return out


def _posture_condition(body, where: str) -> dict:
    c = _keys(body, where, optional=("device", "in", "is"))
    if ("in" in c) == ("is" in c):
        raise ConfigError(f"{where}: give exactly one of 'in' or 'is'")
    key = "in" if "in" in c else "is"
    postures = _texts(c[key], f"{where}.{key}")
    for p in postures:
        check_posture(p, f"{where}.{key}")
    return {"device": _selector(c.get("device", "self"), f"{where}.device"), "in": postures}


def _time_condition(body, where: str) -> dict:
    c = _keys(body, where, optional=("business_hours", "between", "days", "timezone"))
    if ("business_hours" in c) == ("between" in c):
        raise ConfigError(f"{where}: give exactly one of 'business_hours' or 'between'")
    if "business_hours" in c:
        if set(c) != {"business_hours"}:
            raise ConfigError(f"{where}: 'days' and 'timezone' go with 'between'; business "
                              "hours come from the settings")
        if not isinstance(c["business_hours"], bool):
            raise ConfigError(f"{where}.business_hours: expected true or false")
        return {"business_hours": c["business_hours"]}
    between = c["between"]
    if not isinstance(between, list) or len(between) != 2:
        raise ConfigError(f"{where}.between: expected [start, end], e.g. [\"22:00\", \"06:00\"]")
    return {
        "between": _window(between[0], between[1], f"{where}.between"),
        "days": check_days(c["days"], f"{where}.days") if "days" in c else None,
        "timezone": check_timezone(c["timezone"], f"{where}.timezone") if "timezone" in c else None,
    }


_CONDITION_PARSERS = {     # all, any and not: _condition, which counts their nesting
    "alert": _alert_condition, "telemetry": _telemetry_condition, "changed": _changed_condition,
    "posture": _posture_condition, "time": _time_condition,
}


def _set_posture_action(body, where: str) -> dict:
    a = _keys(body, where, required=("posture",), optional=("device", "for"))
    check_posture(a["posture"], f"{where}.posture", settable=True)
    return {"device": _selector(a.get("device", "self"), f"{where}.device"),
            "posture": a["posture"],
            "for": parse_duration(a["for"], f"{where}.for") if "for" in a else None}


def _command_action(body, where: str) -> dict:
    a = _keys(body, where, required=("payload",), optional=("device",))
    if not isinstance(a["payload"], dict) or not a["payload"]:
        raise ConfigError(f"{where}.payload: expected a non-empty table, got {a['payload']!r}")
    return {"device": _selector(a.get("device", "self"), f"{where}.device"), "payload": a["payload"]}


def _alert_action(body, where: str) -> dict:
    a = _keys(body, where, required=("type",), optional=("severity", "message"))
    if a.get("severity", "warning") not in SEVERITIES:
        raise ConfigError(f"{where}.severity: unknown severity {a['severity']!r} "
                          f"(known: {', '.join(SEVERITIES)})")
    message = a.get("message", "")
    if not isinstance(message, str):
        raise ConfigError(f"{where}.message: expected a string, got {message!r}")
    return {"type": _text(a["type"], f"{where}.type"), "severity": a.get("severity", "warning"),
            "message": message}


def _poll_action(body, where: str) -> dict:
    """A polling adapter's interval for the selected devices: `every` from 1 s to 1 h, for a
    while (`for`, as long as a timed posture at most) or until another poll action."""
    a = _keys(body, where, required=("every",), optional=("device", "for"))
    every = parse_duration(a["every"], f"{where}.every")
    if not POLL_MIN_SECONDS <= every <= POLL_MAX_SECONDS:
        raise ConfigError(f"{where}.every: expected {POLL_MIN_SECONDS} s to {POLL_MAX_SECONDS} s "
                          f"(1s to 1h), got {a['every']!r}")
    for_seconds = parse_duration(a["for"], f"{where}.for") if "for" in a else None
    if for_seconds is not None and for_seconds > MAX_POSTURE_SECONDS:
        raise ConfigError(f"{where}.for: at most 30 days ({MAX_POSTURE_SECONDS} s), got {a['for']!r}; "
                          "leave it out for an interval without an end")
    return {"device": _selector(a.get("device", "self"), f"{where}.device"), "every": every,
            "for": for_seconds}


_ACTION_PARSERS = {
    "set_posture": _set_posture_action, "command": _command_action, "alert": _alert_action,
    "poll": _poll_action,
}


def _action(data, where: str) -> dict:
    if not isinstance(data, dict) or len(data) != 1:
        raise ConfigError(f"{where}: an action is a table with exactly one of: {', '.join(ACTIONS)}")
    kind, body = next(iter(data.items()))
    if kind not in _ACTION_PARSERS:
        raise ConfigError(f"{where}.{kind}: unknown action {kind!r} (known: {', '.join(ACTIONS)})")
    return {kind: _ACTION_PARSERS[kind](body, f"{where}.{kind}")}


def parse_rule(data: dict, where: str, default_applies_to: tuple = (), *,
               source: str = "site") -> Rule:
    """Validates a rule (from a profile's [[rules]] or a site rule in the store) and returns it
    normalised. `where` names it in errors, e.g. "camera.toml: rules[2]"."""
    r = _keys(data, where, required=("name", "when", "then"),
              optional=("priority", "enabled", "applies_to", "description"))
    name = _text(r["name"], f"{where}.name")
    priority = r.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigError(f"{where}.priority: expected an integer, got {priority!r}")
    if not isinstance(r.get("enabled", True), bool):
        raise ConfigError(f"{where}.enabled: expected true or false, got {r['enabled']!r}")
    then = r["then"]
    if not isinstance(then, list) or not then:
        raise ConfigError(f"{where}.then: needs a non-empty list of actions")
    applies_to = (_texts(r["applies_to"], f"{where}.applies_to") if "applies_to" in r
                  else tuple(default_applies_to))
    return Rule(name=name, when=_condition(r["when"], f"{where}.when"),
                then=tuple(_action(a, f"{where}.then[{i}]") for i, a in enumerate(then)),
                priority=priority, enabled=r.get("enabled", True), applies_to=applies_to,
                source=source)


def _mentions_self(node) -> bool:
    if isinstance(node, dict):
        return node.get("device") == "self" or any(_mentions_self(v) for v in node.values())
    if isinstance(node, tuple):
        return any(_mentions_self(v) for v in node)
    return False
