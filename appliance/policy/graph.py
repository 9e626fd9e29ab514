"""The posture state machine the rules make: postures as nodes, from the least strict to the
most, and each rule's `set_posture` as edges from the postures it can move a device out of to
the one it sets.

Which postures a rule moves a device out of:
- Rules only escalate (the supervisor skips a set_posture that would lower a posture), so only
  postures not stricter than the target, and not the target itself.
- A set_posture on "self" is also bounded by the rule's own posture conditions on "self" (a
  `not {posture = {is = "quarantine"}}` keeps it from moving a quarantined device): every other
  condition may be true or false, so each posture is kept unless the posture conditions alone
  make the rule false there.
- A set_posture on other devices ({type = "camera"}, a name) is not bounded by the conditions:
  they speak of another device.

A rule that can move a device out of every posture below its target has one edge from ANY:
drawn as such, not as one edge per posture.

A graph for one device type keeps the postures its profile has, and the set_posture actions
that can select a device of that type; a rule that would set a posture the type has not is
listed in "missing" (the supervisor refuses it at run time).
"""
from __future__ import annotations

from typing import Callable

from appliance.policy.rules import Rule
from appliance.vocab import ESCALATION, POSTURES, SETTABLE_POSTURES, stricter

ANY = "*"     # an edge's source: every posture below its target


def ordered(postures) -> list[str]:
    """Least strict first; postures of the same strictness in the kernel's order."""
    return sorted(dict.fromkeys(postures), key=lambda p: (ESCALATION.get(p, 0), POSTURES.index(p)))


def _may_hold(cond: dict, posture: str) -> bool | None:
    """Whether `cond` holds while "self" is in `posture`: True, False, or None when that
    depends on anything besides self's posture."""
    kind, body = next(iter(cond.items()))
    if kind == "posture":
        return posture in body["in"] if body["device"] == "self" else None
    if kind == "not":
        inner = _may_hold(body, posture)
        return None if inner is None else not inner
    if kind in ("all", "any"):
        values = [_may_hold(c, posture) for c in body]
        decisive, other = (False, True) if kind == "all" else (True, False)
        if decisive in values:
            return decisive
        return other if all(v is other for v in values) else None
    return None


def _selects(selector, device_type: str, rule: Rule, type_of: Callable[[str], str | None]) -> bool:
    """Whether a set_posture's device selector can pick a device of `device_type`."""
    if selector == "self":
        return not rule.applies_to or device_type in rule.applies_to
    if selector == "any":
        return True
    if isinstance(selector, str):
        return type_of(selector) in (device_type, None)
    if "type" in selector:
        return selector["type"] == device_type
    return True     # a group may hold a device of any type


def posture_graph(rules: list[Rule], postures=SETTABLE_POSTURES, device_type: str | None = None,
                  type_of: Callable[[str], str | None] = lambda name: None) -> dict:
    """{"nodes": [posture, ...], "edges": [{"rule", "from", "to", "from_postures", "enabled",
    "for_seconds", "source"}], "missing": [{"rule", "posture"}]}; "from" is a posture or ANY,
    "from_postures" the postures it stands for. `postures`: the nodes ("unknown" is left out:
    no rule moves a device waiting for approval); `device_type`: only what can move a device of
    that type; `type_of(name)`: a device's type, for rules that name a device."""
    nodes = ordered(p for p in postures if p in SETTABLE_POSTURES)
    edges: list[dict] = []
    missing: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    missed: set[tuple[str, str]] = set()
    for rule in sorted(rules, key=lambda r: (-r.priority, r.name)):
        for action in rule.then:
            kind, a = next(iter(action.items()))
            if kind != "set_posture":
                continue
            if device_type is not None and not _selects(a["device"], device_type, rule, type_of):
                continue
            target = a["posture"]
            if target not in nodes:
                if (rule.name, target) not in missed:
                    missed.add((rule.name, target))
                    missing.append({"rule": rule.name, "posture": target})
                continue
            below = [p for p in nodes if p != target and not stricter(p, target)]
            sources = below if a["device"] != "self" else [
                p for p in below if _may_hold(rule.when, p) is not False]
            if len(sources) > 1 and sources == below:
                sources = [ANY]
            for source in sources:
                if (rule.name, source, target) in seen:
                    continue
                seen.add((rule.name, source, target))
                edges.append({"rule": rule.name, "from": source, "to": target,
                              "from_postures": below if source == ANY else [source],
                              "enabled": rule.enabled, "for_seconds": a["for"],
                              "source": rule.source})
    return {"nodes": nodes, "edges": edges, "missing": missing}
