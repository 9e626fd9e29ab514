"""The policy engine: rules are data, evaluated on every stimulus; what fires becomes decisions
(actions) that the supervisor carries out. Pure Python: no I/O, no threads, and time only through
the injected Facts, so tests run on a fake clock.

A rule is {name, when, then, priority, enabled, applies_to}. `parse_rule` validates all of it and
normalises it (durations in seconds, times in minutes, defaults filled); an error names the place,
e.g. "camera.toml: rules[2].when.all[1].alert: unknown key(s) ['cout']".

Who "self" is:
- A rule that says "self" anywhere (conditions default to "self"), or has applies_to, is a
  per-device rule: it is evaluated with self = the stimulus's device, only if that device's type is
  in applies_to (when given). For a stimulus without a device (a "tick"), it is evaluated once for
  every known device it applies to. Conditions on other devices in a per-device rule are therefore
  re-checked for self on that device's stimuli and on ticks.
- Any other rule is global: evaluated once per stimulus, with no self (Decision.device is None).

Firing is edge-triggered per (rule, self): a rule fires when its condition becomes true, not again
while it stays true, and re-arms when a later evaluation finds it false. A "changed" condition is an
edge in itself: true only on the telemetry report that makes the change.

One evaluation sees the facts as they are before any of its decisions is carried out, so nothing a
rule decides can make it (or another rule) fire within the same evaluation. A rule is also not
evaluated on an alert stimulus that it raised itself (the alert action's params carry "rule"; the
supervisor keeps them as the stimulus data when it feeds the alert back).

Rules are evaluated by priority, higher first, ties by name. Every rule that fires gives a decision,
but when several set the posture of the same device in one evaluation, only the first (highest
priority) keeps that device in its set_posture targets; the others keep their other actions.
"""
from __future__ import annotations

import datetime
import operator
import re
import time
from dataclasses import dataclass
from typing import Protocol
from zoneinfo import ZoneInfo

from appliance.errors import ConfigError
from appliance.vocab import DAYS, SEVERITIES, WORKDAYS, check_days, check_posture, check_timezone, parse_hhmm

AGGREGATES = ("last", "avg", "min", "max", "count", "sum")
CONDITIONS = ("alert", "telemetry", "changed", "posture", "time", "all", "any", "not")
ACTIONS = ("set_posture", "command", "alert")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NO_DATA = object()


# ---------------------------------------------------------------- data types

@dataclass(frozen=True)
class Stimulus:
    kind: str            # "alert" | "telemetry" | "posture" | "tick"
    device: str | None   # the device it is about ("self" in rules)
    data: dict
    received_ns: int     # time.monotonic_ns() when it came in


class Facts(Protocol):
    def now(self) -> datetime.datetime: ...
    def device_type(self, device: str) -> str | None: ...
    def devices(self) -> list[str]: ...
    def group_of(self, device: str) -> str | None: ...
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
    kind: str                     # "set_posture" | "command" | "alert"
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


def _condition(data, where: str) -> dict:
    if not isinstance(data, dict) or len(data) != 1:
        raise ConfigError(f"{where}: a condition is a table with exactly one of: "
                          f"{', '.join(CONDITIONS)}")
    kind, body = next(iter(data.items()))
    where = f"{where}.{kind}"
    if kind in ("all", "any"):
        if not isinstance(body, list) or not body:
            raise ConfigError(f"{where}: needs a non-empty list of conditions")
        return {kind: tuple(_condition(c, f"{where}[{i}]") for i, c in enumerate(body))}
    if kind == "not":
        return {"not": _condition(body, where)}
    if kind == "alert":
        c = _keys(body, where, optional=("type", "device", "count", "within"))
        return {"alert": {
            "type": _texts(c["type"], f"{where}.type") if "type" in c else None,
            "device": _selector(c.get("device", "self"), f"{where}.device"),
            "count": _count(c.get("count", 1), f"{where}.count"),
            "within": parse_duration(c.get("within", "10m"), f"{where}.within"),
        }}
    if kind == "telemetry":
        c = _keys(body, where, required=("field", "op", "value"),
                  optional=("device", "agg", "last", "within", "match"))
        if c["op"] not in _OPS:
            raise ConfigError(f"{where}.op: unknown operator {c['op']!r} (known: {', '.join(_OPS)})")
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
        return {"telemetry": {
            "device": _selector(c.get("device", "self"), f"{where}.device"),
            "field": _text(c["field"], f"{where}.field"), "op": c["op"], "value": value,
            "agg": c.get("agg", "last"),
            "last": _count(c["last"], f"{where}.last") if "last" in c else None,
            "within": parse_duration(c["within"], f"{where}.within") if "within" in c else None,
            "match": c.get("match", "any"),
        }}
    if kind == "changed":
        c = _keys(body, where, required=("field", "to"), optional=("device", "from"))
        out = {"device": _selector(c.get("device", "self"), f"{where}.device"),
               "field": _text(c["field"], f"{where}.field"), "to": _value(c["to"], f"{where}.to")}
        if "from" in c:
            out["from"] = _value(c["from"], f"{where}.from")
        return {"changed": out}
    if kind == "posture":
        c = _keys(body, where, optional=("device", "in", "is"))
        if ("in" in c) == ("is" in c):
            raise ConfigError(f"{where}: give exactly one of 'in' or 'is'")
        key = "in" if "in" in c else "is"
        postures = _texts(c[key], f"{where}.{key}")
        for p in postures:
            check_posture(p, f"{where}.{key}")
        return {"posture": {"device": _selector(c.get("device", "self"), f"{where}.device"),
                            "in": postures}}
    if kind == "time":
        c = _keys(body, where, optional=("business_hours", "between", "days", "timezone"))
        if ("business_hours" in c) == ("between" in c):
            raise ConfigError(f"{where}: give exactly one of 'business_hours' or 'between'")
        if "business_hours" in c:
            if set(c) != {"business_hours"}:
                raise ConfigError(f"{where}: 'days' and 'timezone' go with 'between'; business "
                                  "hours come from the settings")
            if not isinstance(c["business_hours"], bool):
                raise ConfigError(f"{where}.business_hours: expected true or false")
            return {"time": {"business_hours": c["business_hours"]}}
        between = c["between"]
        if not isinstance(between, list) or len(between) != 2:
            raise ConfigError(f"{where}.between: expected [start, end], e.g. [\"22:00\", \"06:00\"]")
        return {"time": {
            "between": _window(*between, f"{where}.between"),
            "days": check_days(c["days"], f"{where}.days") if "days" in c else None,
            "timezone": check_timezone(c["timezone"], f"{where}.timezone") if "timezone" in c else None,
        }}
    raise ConfigError(f"{where}: unknown condition {kind!r} (known: {', '.join(CONDITIONS)})")


def _action(data, where: str) -> dict:
    if not isinstance(data, dict) or len(data) != 1:
        raise ConfigError(f"{where}: an action is a table with exactly one of: {', '.join(ACTIONS)}")
    kind, body = next(iter(data.items()))
    where = f"{where}.{kind}"
    if kind == "set_posture":
        a = _keys(body, where, required=("posture",), optional=("device", "for"))
        check_posture(a["posture"], f"{where}.posture")
        return {kind: {"device": _selector(a.get("device", "self"), f"{where}.device"),
                       "posture": a["posture"],
                       "for": parse_duration(a["for"], f"{where}.for") if "for" in a else None}}
    if kind == "command":
        a = _keys(body, where, required=("payload",), optional=("device",))
        if not isinstance(a["payload"], dict) or not a["payload"]:
            raise ConfigError(f"{where}.payload: expected a non-empty table, got {a['payload']!r}")
        return {kind: {"device": _selector(a.get("device", "self"), f"{where}.device"),
                       "payload": a["payload"]}}
    if kind == "alert":
        a = _keys(body, where, required=("type",), optional=("severity", "message"))
        if a.get("severity", "warning") not in SEVERITIES:
            raise ConfigError(f"{where}.severity: unknown severity {a['severity']!r} "
                              f"(known: {', '.join(SEVERITIES)})")
        message = a.get("message", "")
        if not isinstance(message, str):
            raise ConfigError(f"{where}.message: expected a string, got {message!r}")
        return {kind: {"type": _text(a["type"], f"{where}.type"),
                       "severity": a.get("severity", "warning"), "message": message}}
    raise ConfigError(f"{where}: unknown action {kind!r} (known: {', '.join(ACTIONS)})")


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


# ---------------------------------------------------------------- evaluation

def _same(a, b) -> bool:
    # TOML true must not equal a reported 1, nor false 0.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


_OPS = {
    "==": _same,
    "!=": lambda a, b: not _same(a, b),
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "in": lambda a, b: any(_same(a, x) for x in b),
}


def _compare(op: str, a, b) -> bool:
    try:
        return bool(_OPS[op](a, b))
    except TypeError:   # "on" > 3: a mismatched rule is false, not a crash of every evaluation
        return False


def _aggregate(agg: str, values: list):
    if agg == "count":
        return len(values)
    if not values:
        return _NO_DATA
    if agg == "last":
        return values[-1]
    try:
        if agg in ("avg", "sum"):
            if not all(isinstance(v, (int, float)) for v in values):
                return _NO_DATA
            return sum(values) / len(values) if agg == "avg" else sum(values)
        return min(values) if agg == "min" else max(values)
    except TypeError:
        return _NO_DATA


def _in_window(now: datetime.datetime, tz: str, between: tuple[int, int], days) -> bool:
    local = now.astimezone(ZoneInfo(tz))
    minute, day = local.hour * 60 + local.minute, local.weekday()
    start, end = between
    if start < end:
        inside = start <= minute < end
    elif minute >= start:
        inside = True
    else:
        # The early-morning part of a window across midnight belongs to the day it started.
        inside, day = minute < end, (day - 1) % 7
    return inside and (days is None or DAYS[day] in days)


class _Context:
    """One evaluation: the stimulus, one reading of the clock, and the device list read once."""

    def __init__(self, stimulus: Stimulus, facts: Facts):
        self.stimulus, self.facts = stimulus, facts
        now = facts.now()
        self.now = now if now.tzinfo else now.replace(tzinfo=datetime.UTC)
        self._devices: list[str] | None = None
        self._hours: dict | None = None

    def devices(self) -> list[str]:
        if self._devices is None:
            self._devices = list(dict.fromkeys(self.facts.devices()))
        return self._devices

    def business_hours(self) -> dict:
        if self._hours is None:
            self._hours = parse_business_hours(self.facts.settings())
        return self._hours

    def select(self, selector, me: str | None) -> list[str]:
        if selector == "self":
            return [me] if me is not None else []
        if selector == "any":
            return self.devices()
        if isinstance(selector, str):
            return [selector] if selector in self.devices() else []
        if "type" in selector:
            return [d for d in self.devices() if self.facts.device_type(d) == selector["type"]]
        return [d for d in self.devices() if self.facts.group_of(d) == selector["group"]]

    def holds(self, cond: dict, me: str | None) -> bool:
        kind, c = next(iter(cond.items()))
        return getattr(self, f"_{kind}")(c, me)

    def _all(self, conds, me):
        return all(self.holds(c, me) for c in conds)

    def _any(self, conds, me):
        return any(self.holds(c, me) for c in conds)

    def _not(self, cond, me):
        return not self.holds(cond, me)

    def _alert(self, c, me):
        types = set(c["type"]) if c["type"] else None
        since = self.now - datetime.timedelta(seconds=c["within"])
        if c["device"] == "any":
            return self.facts.alerts(None, types, since) >= c["count"]
        total = sum(self.facts.alerts(d, types, since) for d in self.select(c["device"], me))
        return total >= c["count"]

    def _telemetry(self, c, me):
        since = self.now - datetime.timedelta(seconds=c["within"]) if c["within"] else None
        # "last" needs the newest value only, in the window or not: stop there
        last = c["last"] or (1 if c["agg"] == "last" else None)
        results = []
        for device in self.select(c["device"], me):
            values = [v for v in self.facts.telemetry(device, c["field"], last=last, since=since)
                      if v is not None]
            value = _aggregate(c["agg"], values)
            if value is not _NO_DATA:   # a device that never reported neither passes nor fails
                results.append(_compare(c["op"], value, c["value"]))
        if not results:
            return False
        return all(results) if c["match"] == "all" else any(results)

    def _changed(self, c, me):
        s = self.stimulus
        if s.kind != "telemetry" or c["field"] not in s.data:
            return False
        if s.device not in self.select(c["device"], me):
            return False
        values = self.facts.telemetry(s.device, c["field"], last=2)
        if len(values) < 2 or not _same(values[-1], c["to"]):
            return False
        return _same(values[-2], c["from"]) if "from" in c else not _same(values[-2], c["to"])

    def _posture(self, c, me):
        return any(self.facts.posture(d) in c["in"] for d in self.select(c["device"], me))

    def _time(self, c, me):
        if "business_hours" in c:
            hours = self.business_hours()
            inside = _in_window(self.now, hours["timezone"], hours["between"], hours["days"])
            return inside == c["business_hours"]
        tz = c["timezone"] or self.facts.settings().get("timezone") or "UTC"
        return _in_window(self.now, tz, c["between"], c["days"])

    def actions(self, rule: Rule, me: str | None) -> tuple[Action, ...]:
        out = []
        for action in rule.then:
            kind, a = next(iter(action.items()))
            if kind == "alert":
                about = me if me is not None else self.stimulus.device
                params = {**a, "rule": rule.name}
                out.append(Action(kind, (about,) if about is not None else (), params))
                continue
            targets = tuple(self.select(a["device"], me))
            if not targets:   # e.g. "the lights" on a site that has none
                continue
            if kind == "set_posture":
                params = {"posture": a["posture"], "for_seconds": a["for"]}
            else:
                params = {"payload": dict(a["payload"])}
            out.append(Action(kind, targets, params))
        return tuple(out)


def _one_posture_per_device(decisions: list[Decision]) -> list[Decision]:
    """Decisions come highest priority first: the first to set a device's posture keeps it."""
    claimed: set[str] = set()
    out = []
    for d in decisions:
        actions = []
        for a in d.actions:
            if a.kind == "set_posture":
                targets = tuple(t for t in a.targets if t not in claimed)
                claimed.update(targets)
                if not targets:
                    continue
                a = Action(a.kind, targets, a.params)
            actions.append(a)
        out.append(Decision(d.rule, d.device, d.stimulus, tuple(actions), d.decided_ns))
    return out


class Engine:
    def __init__(self, rules: list[Rule]):
        self._rules: list[tuple[Rule, bool]] = []
        self._latched: set[tuple[str, str | None]] = set()   # (rule, self) found true last time
        self.replace_rules(rules)

    @property
    def rules(self) -> list[Rule]:
        return [rule for rule, _ in self._rules]

    def replace_rules(self, rules: list[Rule]) -> None:
        """Takes a new rule set. A rule that is unchanged keeps its firing state, so a reload
        does not fire again every rule that is currently true."""
        seen: dict[str, Rule] = {}
        for rule in rules:
            if rule.name in seen:
                raise ConfigError(f"rule {rule.name!r} is defined twice "
                                  f"({seen[rule.name].source} and {rule.source})")
            seen[rule.name] = rule
        old = {rule.name: rule for rule in self.rules}
        active = sorted((r for r in rules if r.enabled), key=lambda r: (-r.priority, r.name))
        kept = {r.name for r in active if r.name in old and
                (old[r.name].when, old[r.name].applies_to) == (r.when, r.applies_to)}
        self._latched = {key for key in self._latched if key[0] in kept}
        self._rules = [(r, bool(r.applies_to) or _mentions_self((r.when, r.then))) for r in active]

    def _selves(self, rule: Rule, per_device: bool, ctx: _Context) -> list[str | None]:
        if not per_device:
            return [None]
        device = ctx.stimulus.device
        candidates = [device] if device is not None else ctx.devices()
        if not rule.applies_to:
            return candidates
        return [d for d in candidates if ctx.facts.device_type(d) in rule.applies_to]

    def evaluate(self, stimulus: Stimulus, facts: Facts) -> list[Decision]:
        ctx = _Context(stimulus, facts)
        decisions = []
        for rule, per_device in self._rules:
            if stimulus.kind == "alert" and stimulus.data.get("rule") == rule.name:
                continue   # its own alert fed back: it must not trigger itself
            for me in self._selves(rule, per_device, ctx):
                key = (rule.name, me)
                if not ctx.holds(rule.when, me):
                    self._latched.discard(key)
                elif key not in self._latched:
                    self._latched.add(key)
                    decisions.append(Decision(rule.name, me, stimulus, ctx.actions(rule, me),
                                              time.monotonic_ns()))
        return _one_posture_per_device(decisions)


# ---------------------------------------------------------------- built-in rules

INTRUSION_RULE = {
    "name": "physical-intrusion",
    "priority": 50,
    "when": {"all": [
        {"time": {"business_hours": False}},
        # A motion report older than a few minutes is not someone in the room now.
        {"telemetry": {"device": {"type": "motion_sensor"}, "field": "motion", "op": "==",
                       "value": True, "within": "5m"}},
        {"telemetry": {"device": {"type": "light"}, "field": "on", "op": "==", "value": False,
                       "match": "all"}},
    ]},
    "then": [
        {"alert": {"type": "physical-intrusion", "severity": "critical",
                   "message": "motion with the lights off outside business hours"}},
        {"set_posture": {"device": {"type": "camera"}, "posture": "suspicious", "for": "30m"}},
        {"command": {"device": {"type": "light"}, "payload": {"on": True}}},
    ],
}

ATTACK_RULES = [
    {
        "name": "device-under-attack",
        "priority": 90,
        "when": {"all": [
            {"alert": {"type": ["brute-force", "port-scan", "syn-flood"], "count": 1, "within": "5m"}},
            # Never downgrade a quarantined device to "attack".
            {"not": {"posture": {"is": "quarantine"}}},
        ]},
        "then": [{"set_posture": {"posture": "attack"}}],
    },
    {
        "name": "device-compromised",
        "priority": 100,   # above "attack": quarantine wins when both fire at once
        "when": {"alert": {"type": ["spoofing", "lateral-movement", "egress-anomaly",
                                    "port-scan-outbound", "gateway-probe"],
                           "count": 1, "within": "5m"}},
        "then": [{"set_posture": {"posture": "quarantine"}}],
    },
]


def builtin_rules() -> list[Rule]:
    return [parse_rule(r, f"policy.py: {r['name']}", source="builtin")
            for r in (INTRUSION_RULE, *ATTACK_RULES)]
