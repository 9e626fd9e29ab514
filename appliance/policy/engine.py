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

A global rule is evaluated on a stimulus only if the stimulus can change it: a report from a
device one of its telemetry (or changed) conditions selects, with one of their fields (and,
for a condition on the last value, a value other than the device's previous one in the
window); an alert its alert conditions count; a posture change of a device its posture
conditions look at. Otherwise only if it was last evaluated a second or more ago (on the
policy's clock), which is what time alone changes (a window, business hours, a device added
to a group) waits for. On a site of 1,000 devices reporting once a second, every rule over a type or a group
read 1,000 devices 1,000 times a second, and the supervisor fell behind its reports; and a
kernel alert waited 0.2 ms for rules that count no alerts. Ticks evaluate every rule.

Rules are evaluated by priority, higher first, ties by name. Every rule that fires gives a decision,
but when several set the posture of the same device in one evaluation, only the first (highest
priority) keeps that device in its set_posture targets; the others keep their other actions. The
same holds for a device's polling interval (poll).
"""
from __future__ import annotations

import datetime
import operator
import time
from zoneinfo import ZoneInfo

from appliance.errors import ConfigError
from appliance.policy.rules import (
    _NO_DATA,
    Action,
    Decision,
    Facts,
    Rule,
    Stimulus,
    _mentions_self,
    parse_business_hours,
)
from appliance.vocab import DAYS

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
        key, value = next(iter(selector.items()))      # {type = ...} or {group = ...}
        return self.facts.devices_where(key, value)

    def selects(self, selector, device: str | None) -> bool:
        """Whether `selector` (of a global rule: never "self") selects `device`."""
        if device is None or selector == "self":
            return False
        if selector == "any":
            return True
        if isinstance(selector, str):
            return selector == device
        if "type" in selector:
            return self.facts.device_type(device) == selector["type"]
        return self.facts.group_of(device) == selector["group"]

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
        # The first device that settles it stops the reading ("all": one that fails; "any":
        # one that passes): the site-wide rules read hundreds of devices.
        wanted_all = c["match"] == "all"
        seen = False
        for device in self.select(c["device"], me):
            values = [v for v in self.facts.telemetry(device, c["field"], last=last, since=since)
                      if v is not None]
            value = _aggregate(c["agg"], values)
            if value is _NO_DATA:       # a device that never reported neither passes nor fails
                continue
            seen = True
            if _compare(c["op"], value, c["value"]) != wanted_all:
                return not wanted_all
        return seen and wanted_all

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
            elif kind == "poll":
                params = {"every_seconds": a["every"], "for_seconds": a["for"]}
            else:
                params = {"payload": dict(a["payload"])}
            out.append(Action(kind, targets, params))
        return tuple(out)


ONE_PER_DEVICE = ("set_posture", "poll")   # actions of which a device takes one per evaluation
STALE_SECONDS = 1.0     # a global rule skipped by reports this long is evaluated on the next


REREAD = -1     # _inputs: a report of the field changes the condition even if its value repeats


def _inputs(cond: dict, kind_wanted: str) -> tuple[tuple, ...]:
    """What the conditions of one kind in a condition tree read: (selector, field, repeat) of
    every telemetry and changed condition (repeat: REREAD, or, when a report repeating the
    device's last value of the field leaves the condition as it was, the condition's window,
    None for none), (selector, alert types or None) of every alert condition, (selector,) of
    every posture condition."""
    kind, c = next(iter(cond.items()))
    if kind in ("all", "any"):
        return tuple(i for sub in c for i in _inputs(sub, kind_wanted))
    if kind == "not":
        return _inputs(c, kind_wanted)
    if kind_wanted == "telemetry" and kind == "telemetry":
        # a repeated value changes only a condition on its last value; its window, if any
        repeat = (c["within"] or None) if c["agg"] == "last" else REREAD
        return ((c["device"], c["field"], repeat),)
    if kind_wanted == "telemetry" and kind == "changed":
        return ((c["device"], c["field"], REREAD),)
    if kind_wanted == "alert" and kind == "alert":
        return ((c["device"], frozenset(c["type"]) if c["type"] else None),)
    if kind_wanted == "posture" and kind == "posture":
        return ((c["device"],),)
    return ()


def _one_per_device(decisions: list[Decision]) -> list[Decision]:
    """Decisions come highest priority first: the first to set a device's posture (or its
    polling interval) keeps it."""
    claimed: dict[str, set[str]] = {kind: set() for kind in ONE_PER_DEVICE}
    out = []
    for d in decisions:
        actions = []
        for a in d.actions:
            if a.kind in claimed:
                targets = tuple(t for t in a.targets if t not in claimed[a.kind])
                claimed[a.kind].update(targets)
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
        self._inputs: dict[tuple[str, str], tuple[tuple, ...]] = {}   # (rule, stimulus kind) -> what it reads
        self._evaluated: dict[str, datetime.datetime] = {}   # global rule -> last evaluated
        self.skipped = 0      # evaluations of global rules a stimulus could not change
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
        self._inputs = {(r.name, kind): _inputs(r.when, kind) for r in active
                        for kind in ("telemetry", "alert", "posture")}
        self._evaluated = {}

    def forget(self, device: str) -> None:
        """Re-arms every rule for `device`: the next time a condition holds it fires."""
        self._latched = {key for key in self._latched if key[1] != device}

    def rename(self, device: str, new: str) -> None:
        """A device renamed keeps its rules' firing state."""
        self._latched = {(rule, new if me == device else me) for rule, me in self._latched}

    def _selves(self, rule: Rule, per_device: bool, ctx: _Context) -> list[str | None]:
        if not per_device:
            return [None]
        device = ctx.stimulus.device
        candidates: list[str | None] = [device] if device is not None else list(ctx.devices())
        if not rule.applies_to:
            return candidates
        return [d for d in candidates if d is not None and ctx.facts.device_type(d) in rule.applies_to]

    def _unchanged_by(self, rule: Rule, ctx: _Context) -> bool:
        """A stimulus that no condition of the (global) rule reads (a report of fields it does
        not read, or of a device it does not select; an alert or a posture of a device it does
        not look at), and the rule evaluated less than STALE_SECONDS ago: nothing it reads can
        have changed. A tick is read by every rule."""
        s = ctx.stimulus
        if s.kind not in ("telemetry", "alert", "posture"):
            return False
        last = self._evaluated.get(rule.name)
        if last is None or (ctx.now - last).total_seconds() >= STALE_SECONDS or ctx.now < last:
            return False
        inputs = self._inputs.get((rule.name, s.kind), ())
        if s.kind == "telemetry":
            return not any(field in s.data and ctx.selects(selector, s.device)
                           and not self._repeated(ctx, field, repeat)
                           for selector, field, repeat in inputs)
        if s.kind == "alert":
            return not any((types is None or s.data.get("type") in types)
                           and (selector == "any" or ctx.selects(selector, s.device))
                           for selector, types in inputs)
        return not any(selector == "any" or ctx.selects(selector, s.device) for selector, in inputs)

    @staticmethod
    def _repeated(ctx: _Context, field: str, repeat) -> bool:
        """Whether the report repeats the device's previous value of `field`, and that value
        is inside the condition's window: then the device's last value, all a condition on it
        reads, is what the rule's last evaluation saw. (Most sensors report the same state
        every second: a site-wide rule over 250 lights read 500 devices on each of their
        reports.)"""
        s = ctx.stimulus
        if repeat == REREAD or s.device is None:
            return False
        since = ctx.now - datetime.timedelta(seconds=repeat) if repeat else None
        values = ctx.facts.telemetry(s.device, field, last=2, since=since)
        return (len(values) == 2 and _same(values[0], values[1])
                and _same(values[1], s.data[field]))

    def evaluate(self, stimulus: Stimulus, facts: Facts) -> list[Decision]:
        ctx = _Context(stimulus, facts)
        decisions = []
        for rule, per_device in self._rules:
            if stimulus.kind == "alert" and stimulus.data.get("rule") == rule.name:
                continue   # its own alert fed back: it must not trigger itself
            if not per_device:
                if self._unchanged_by(rule, ctx):
                    self.skipped += 1
                    continue
                self._evaluated[rule.name] = ctx.now
            for me in self._selves(rule, per_device, ctx):
                key = (rule.name, me)
                if not ctx.holds(rule.when, me):
                    self._latched.discard(key)
                elif key not in self._latched:
                    self._latched.add(key)
                    decisions.append(Decision(rule.name, me, stimulus, ctx.actions(rule, me),
                                              time.monotonic_ns()))
        return _one_per_device(decisions)
