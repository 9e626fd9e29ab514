"""The policy engine on a fake clock and in-memory facts: conditions, windows, time zones, edge
triggering, priorities, selectors, the built-in rules and validation errors."""
import datetime
import time

import pytest

from appliance.errors import ConfigError
from appliance.policy import Engine, Stimulus, builtin_rules, parse_duration, parse_rule
from appliance.policy.builtin import ATTACK_RULES, INTRUSION_RULE

UTC = datetime.UTC
WEDNESDAY_0700_UTC = datetime.datetime(2024, 5, 15, 7, 0, tzinfo=UTC)   # 09:00 in Berlin (CEST)
SATURDAY_NOON_UTC = datetime.datetime(2024, 5, 18, 12, 0, tzinfo=UTC)
WEDNESDAY_2000_UTC = datetime.datetime(2024, 5, 15, 20, 0, tzinfo=UTC)  # 22:00 in Berlin

DEVICES = {   # name: (type, group)
    "cam1": ("camera", "hall"), "cam2": ("camera", "yard"),
    "light1": ("light", "hall"), "light2": ("light", "hall"),
    "motion1": ("motion_sensor", "hall"), "plug1": ("plug", "kitchen"),
}


class FakeFacts:
    def __init__(self, now=WEDNESDAY_0700_UTC, devices=DEVICES):
        self.clock = now
        self.types = {name: t for name, (t, _) in devices.items()}
        self.groups = {name: g for name, (_, g) in devices.items()}
        self.alert_log: list[tuple] = []            # (time, device, type)
        self.reports: dict[tuple, list] = {}        # (device, field) -> [(time, value)]
        self.postures: dict[str, str] = {}
        self.config = {"business_hours": {"days": ["mon", "tue", "wed", "thu", "fri"],
                                          "start": "08:00", "end": "18:00"},
                       "timezone": "Europe/Berlin"}

    def advance(self, seconds):
        self.clock += datetime.timedelta(seconds=seconds)

    def alert(self, device, type_):
        self.alert_log.append((self.clock, device, type_))
        return Stimulus("alert", device, {"type": type_}, time.monotonic_ns())

    def report(self, device, **fields):
        for field, value in fields.items():
            self.reports.setdefault((device, field), []).append((self.clock, value))
        return Stimulus("telemetry", device, dict(fields), time.monotonic_ns())

    # the Facts protocol
    def now(self):
        return self.clock

    def device_type(self, device):
        return self.types.get(device)

    def devices(self):
        return list(self.types)

    def group_of(self, device):
        return self.groups.get(device)

    def devices_where(self, key, value):
        return [d for d in self.types if (self.types if key == "type" else self.groups).get(d) == value]

    def alerts(self, device, types, since):
        return sum(1 for t, d, kind in self.alert_log
                   if t >= since and (device is None or d == device) and (types is None or kind in types))

    def telemetry(self, device, field, last=None, since=None):
        values = [v for t, v in self.reports.get((device, field), []) if since is None or t >= since]
        return values[-last:] if last else values

    def posture(self, device):
        return self.postures.get(device, "normal")

    def settings(self):
        return self.config


def tick():
    return Stimulus("tick", None, {}, time.monotonic_ns())


def rule(when, then=None, name="r", **extra):
    then = then or [{"set_posture": {"posture": "suspicious"}}]
    return parse_rule({"name": name, "when": when, "then": then, **extra}, f"test: {name}")


def fires(r, facts, stimulus):
    """Whether a fresh engine with this one rule decides anything for `stimulus`."""
    return bool(Engine([r]).evaluate(stimulus, facts))


# ---------------------------------------------------------------- conditions

def test_alert_count_types_and_window():
    f = FakeFacts()
    r = rule({"alert": {"type": ["port-scan", "syn-flood"], "count": 2, "within": "5m"}})
    f.alert("cam1", "port-scan")
    assert not fires(r, f, f.alert("cam1", "brute-force"))      # wrong type does not count
    assert fires(r, f, f.alert("cam1", "syn-flood"))
    f.advance(301)
    assert not fires(r, f, f.alert("cam1", "port-scan"))        # the first two left the window
    assert not fires(r, f, f.alert("cam2", "port-scan"))        # self is cam2: only one


def test_alert_any_type_and_selectors():
    f = FakeFacts()
    f.alert("light1", "brute-force")
    f.alert("light2", "port-scan")
    stim = f.report("plug1", power=1)
    assert fires(rule({"alert": {"device": "any", "count": 2}}), f, stim)
    assert fires(rule({"alert": {"device": {"type": "light"}, "count": 2}}), f, stim)   # summed
    assert not fires(rule({"alert": {"device": {"type": "light"}, "count": 3}}), f, stim)
    assert fires(rule({"alert": {"device": {"group": "hall"}, "count": 2}}), f, stim)
    assert not fires(rule({"alert": {"device": {"group": "kitchen"}}}), f, stim)
    assert fires(rule({"alert": {"device": "light2", "type": "port-scan"}}), f, stim)
    assert not fires(rule({"alert": {}}), f, stim)                   # self (plug1) has none


def test_telemetry_last_value_and_operators():
    f = FakeFacts()
    f.report("plug1", power=10)
    stim = f.report("plug1", power=40, state="on")
    t = lambda op, value: fires(rule({"telemetry": {"field": "power", "op": op, "value": value}}), f, stim)
    assert t(">", 30) and t(">=", 40) and t("==", 40) and t("!=", 10) and t("in", [40, 50])
    assert not t("<", 40) and not t("<=", 39) and not t("in", [10])
    assert not t(">", "x")                                               # mismatched types: false
    assert fires(rule({"telemetry": {"field": "state", "op": "==", "value": "on"}}), f, stim)
    assert not fires(rule({"telemetry": {"field": "nothing", "op": "!=", "value": 1}}), f, stim)


def test_telemetry_bool_is_not_int():
    f = FakeFacts()
    stim = f.report("motion1", motion=1)
    assert not fires(rule({"telemetry": {"field": "motion", "op": "==", "value": True}}), f, stim)
    stim = f.report("motion1", motion=True)
    assert fires(rule({"telemetry": {"field": "motion", "op": "==", "value": True}}), f, stim)


def test_telemetry_aggregates_over_last_n_and_window():
    f = FakeFacts()
    for value in (1, 2, 3, 4, 100):
        stim = f.report("plug1", power=value)
        f.advance(60)
    def t(agg, op, value, **window):
        c = {"field": "power", "agg": agg, "op": op, "value": value, **window}
        return fires(rule({"telemetry": c}), f, stim)
    assert t("avg", "==", 22) and t("sum", "==", 110) and t("min", "==", 1) and t("max", "==", 100)
    assert t("count", "==", 5) and t("last", "==", 100)
    assert t("avg", "==", 3, last=3) is False and t("avg", "==", (3 + 4 + 100) / 3, last=3)
    assert t("min", "==", 3, last=3) and t("count", "==", 3, last=3)
    # now = 5 minutes after the first report; "3m" keeps the reports at +2m, +3m, +4m
    assert t("sum", "==", 107, within="3m") and t("count", "==", 3, within=180)
    f.advance(3600)
    assert t("count", "==", 0, within="10m")       # silence is a count of 0
    assert not t("avg", ">=", 0, within="10m")      # no data: false
    assert not t("last", "==", 100, within="10m")


def test_telemetry_match_any_and_all():
    f = FakeFacts()
    f.report("light1", on=False)
    stim = f.report("light2", on=True)
    some = {"device": {"type": "light"}, "field": "on", "op": "==", "value": False}
    assert fires(rule({"telemetry": some}), f, stim)
    assert not fires(rule({"telemetry": {**some, "match": "all"}}), f, stim)
    f.report("light2", on=False)
    assert fires(rule({"telemetry": {**some, "match": "all"}}), f, stim)
    assert not fires(rule({"telemetry": {**some, "device": {"type": "camera"}}}), f, stim)


def test_changed_is_an_edge_on_that_devices_report():
    f = FakeFacts()
    r = rule({"changed": {"field": "on", "from": False, "to": True}})
    assert not fires(r, f, f.report("light1", on=True))             # first value: no change
    assert not fires(r, f, f.report("light1", on=True))             # true -> true
    f.report("light1", on=False)
    stim = f.report("light1", on=True)
    assert fires(r, f, stim)
    assert not fires(r, f, tick())                                  # not a report
    assert not fires(r, f, f.report("light1", brightness=3))       # a report of another field
    any_light = rule({"changed": {"device": {"type": "light"}, "field": "on", "to": True}})
    assert fires(any_light, f, stim)
    assert not fires(any_light, f, f.report("plug1", on=True))      # not a light
    f.report("light2", on=True)
    assert not fires(rule({"changed": {"device": "light2", "field": "on", "to": True}}), f, stim)


def test_posture_condition():
    f = FakeFacts()
    f.postures["cam2"] = "attack"
    stim = f.report("cam1", x=1)
    assert not fires(rule({"posture": {"is": "attack"}}), f, stim)
    assert fires(rule({"posture": {"device": "cam2", "in": ["attack", "quarantine"]}}), f, stim)
    assert fires(rule({"posture": {"device": {"type": "camera"}, "is": "attack"}}), f, stim)
    assert fires(rule({"posture": {"is": "normal"}}), f, stim)


# ---------------------------------------------------------------- time

@pytest.mark.parametrize("now, inside", [
    (WEDNESDAY_0700_UTC, True),                                   # 09:00 Berlin, UTC says 07:00
    (datetime.datetime(2024, 5, 15, 5, 59, tzinfo=UTC), False),   # 07:59 Berlin
    (datetime.datetime(2024, 5, 15, 15, 59, tzinfo=UTC), True),   # 17:59 Berlin
    (datetime.datetime(2024, 5, 15, 16, 0, tzinfo=UTC), False),   # 18:00 Berlin: end excluded
    (SATURDAY_NOON_UTC, False),
    (datetime.datetime(2024, 1, 17, 7, 0, tzinfo=UTC), True),     # winter (CET): 08:00 Berlin
    (datetime.datetime(2024, 1, 17, 6, 59, tzinfo=UTC), False),
])
def test_business_hours_in_the_sites_time_zone(now, inside):
    f = FakeFacts(now)
    stim = tick()
    assert fires(rule({"time": {"business_hours": True}}, name="g", then=[{"alert": {"type": "x"}}]),
                 f, stim) is inside
    assert fires(rule({"time": {"business_hours": False}}, name="g", then=[{"alert": {"type": "x"}}]),
                 f, stim) is not inside


def test_between_across_midnight_days_and_time_zone():
    at = lambda *a: FakeFacts(datetime.datetime(*a, tzinfo=UTC))
    night = {"between": ["22:00", "06:00"]}      # the site's zone: Europe/Berlin
    alert = [{"alert": {"type": "x"}}]
    t = lambda cond, f: fires(rule({"time": cond}, then=alert), f, tick())
    assert t(night, at(2024, 5, 15, 20, 0))           # 22:00 Berlin
    assert t(night, at(2024, 5, 16, 3, 59))           # 05:59 Berlin
    assert not t(night, at(2024, 5, 16, 4, 0))        # 06:00 Berlin
    assert not t(night, at(2024, 5, 15, 19, 59))      # 21:59 Berlin
    assert t({**night, "timezone": "UTC"}, at(2024, 5, 15, 22, 0))
    assert not t({**night, "timezone": "UTC"}, at(2024, 5, 15, 20, 0))
    assert t({"between": ["09:00", "10:00"], "timezone": "America/New_York"}, at(2024, 5, 15, 13, 30))
    # The small hours belong to the night that started the evening before.
    friday_night = {**night, "days": ["fri"]}
    assert t(friday_night, at(2024, 5, 17, 21, 0))     # Friday 23:00 Berlin
    assert t(friday_night, at(2024, 5, 18, 2, 0))      # Saturday 04:00 Berlin, Friday's night
    assert not t(friday_night, at(2024, 5, 18, 21, 0))  # Saturday 23:00
    assert not t(friday_night, at(2024, 5, 17, 2, 0))   # Friday 04:00 is Thursday's night


# ---------------------------------------------------------------- nesting

def test_all_any_not_nesting():
    f = FakeFacts()
    stim = f.report("plug1", power=50, state="on")
    p = lambda op, v: {"telemetry": {"field": "power", "op": op, "value": v}}
    assert fires(rule({"all": [p(">", 10), {"any": [p("<", 0), {"not": p("==", 1)}]}]}), f, stim)
    assert not fires(rule({"all": [p(">", 10), {"any": [p("<", 0), {"not": p("==", 50)}]}]}), f, stim)
    assert fires(rule({"not": {"all": [p(">", 10), p("<", 20)]}}), f, stim)
    assert fires(rule({"any": [{"all": [p("<", 0)]}, {"not": {"not": p("==", 50)}}]}), f, stim)


# ---------------------------------------------------------------- firing

def test_edge_triggered_per_device_and_rearms():
    f = FakeFacts()
    engine = Engine([rule({"telemetry": {"field": "power", "op": ">", "value": 100}}, name="hot")])
    assert [d.device for d in engine.evaluate(f.report("plug1", power=150), f)] == ["plug1"]
    assert engine.evaluate(f.report("plug1", power=160), f) == []        # still true: quiet
    assert engine.evaluate(f.report("cam1", power=200), f)[0].device == "cam1"   # own latch
    assert engine.evaluate(tick(), f) == []                              # both still true
    assert engine.evaluate(f.report("plug1", power=50), f) == []         # false: re-arms
    d = engine.evaluate(f.report("plug1", power=170), f)
    assert [x.rule for x in d] == ["hot"] and d[0].actions[0].targets == ("plug1",)
    assert d[0].decided_ns >= d[0].stimulus.received_ns


def test_tick_evaluates_per_device_rules_for_each_applicable_device():
    f = FakeFacts()
    f.alert("cam1", "brute-force")
    f.alert("plug1", "brute-force")
    engine = Engine([rule({"alert": {}}, name="cams", applies_to=["camera"]),
                     rule({"alert": {}}, name="all-devices")])
    fired = {(d.rule, d.device) for d in engine.evaluate(tick(), f)}
    assert fired == {("cams", "cam1"), ("all-devices", "cam1"), ("all-devices", "plug1")}
    # a stimulus about a plug does not evaluate a camera rule for it
    engine = Engine([rule({"alert": {}}, name="cams", applies_to=["camera"])])
    assert engine.evaluate(f.alert("plug1", "port-scan"), f) == []


def test_global_rule_fires_once_per_condition_not_per_device():
    f = FakeFacts()
    f.alert("plug1", "syn-flood")
    engine = Engine([rule({"alert": {"device": "any"}}, then=[{"alert": {"type": "site-alert"}}])])
    decisions = engine.evaluate(tick(), f)
    assert len(decisions) == 1 and decisions[0].device is None
    assert engine.evaluate(tick(), f) == []


def test_priority_order_and_posture_conflict():
    f = FakeFacts()
    stim = f.alert("cam1", "brute-force")
    low = rule({"alert": {}}, name="a-low", priority=1,
               then=[{"set_posture": {"device": {"type": "camera"}, "posture": "suspicious"}},
                     {"command": {"payload": {"reboot": True}}}])
    high = rule({"alert": {}}, name="z-high", priority=10, then=[{"set_posture": {"posture": "attack"}}])
    tie = rule({"alert": {}}, name="b-tie", priority=1, then=[{"alert": {"type": "noted"}}])
    decisions = Engine([low, tie, high]).evaluate(stim, f)
    assert [d.rule for d in decisions] == ["z-high", "a-low", "b-tie"]
    assert decisions[0].actions[0].params == {"posture": "attack", "for_seconds": None}
    # a-low loses cam1's posture to z-high but keeps cam2 and its command
    kinds = [(a.kind, a.targets) for a in decisions[1].actions]
    assert kinds == [("set_posture", ("cam2",)), ("command", ("cam1",))]
    assert [a.kind for a in decisions[2].actions] == ["alert"]


def test_losing_rule_with_only_a_posture_keeps_an_empty_decision():
    f = FakeFacts()
    stim = f.alert("cam1", "brute-force")
    a = rule({"alert": {}}, name="a", priority=2, then=[{"set_posture": {"posture": "attack"}}])
    b = rule({"alert": {}}, name="b", priority=1, then=[{"set_posture": {"posture": "suspicious"}}])
    decisions = Engine([b, a]).evaluate(stim, f)
    assert [(d.rule, len(d.actions)) for d in decisions] == [("a", 1), ("b", 0)]


def test_targets_resolve_by_type_group_name_and_any():
    f = FakeFacts()
    stim = f.report("motion1", motion=True)
    then = [{"command": {"device": {"type": "light"}, "payload": {"on": True}}},
            {"command": {"device": {"group": "hall"}, "payload": {"a": 1}}},
            {"command": {"device": "plug1", "payload": {"b": 1}}},
            {"command": {"device": "nonexistent", "payload": {"c": 1}}},   # dropped
            {"command": {"device": "any", "payload": {"d": 1}}},
            {"set_posture": {"posture": "suspicious", "for": "15m"}},
            {"alert": {"type": "seen", "severity": "info", "message": "hello"}}]
    decision, = Engine([rule({"telemetry": {"field": "motion", "op": "==", "value": True}},
                             then=then)]).evaluate(stim, f)
    got = [(a.kind, a.targets) for a in decision.actions]
    assert got == [("command", ("light1", "light2")),
                   ("command", ("cam1", "light1", "light2", "motion1")),
                   ("command", ("plug1",)),
                   ("command", tuple(DEVICES)),
                   ("set_posture", ("motion1",)),
                   ("alert", ("motion1",))]
    assert decision.actions[4].params == {"posture": "suspicious", "for_seconds": 900}
    assert decision.actions[5].params == {"type": "seen", "severity": "info", "message": "hello",
                                          "rule": "r"}


def test_a_rule_does_not_trigger_itself_with_its_own_alert():
    f = FakeFacts()
    echo = rule({"alert": {"type": "physical-intrusion"}}, name="echo",
                then=[{"alert": {"type": "physical-intrusion"}}])
    engine = Engine([echo])
    fed_back = Stimulus("alert", "cam1", {"type": "physical-intrusion", "rule": "echo"},
                        time.monotonic_ns())
    f.alert_log.append((f.clock, "cam1", "physical-intrusion"))
    assert engine.evaluate(fed_back, f) == []
    assert len(engine.evaluate(f.alert("cam1", "physical-intrusion"), f)) == 1   # from elsewhere


def test_replace_rules_keeps_state_of_unchanged_rules_and_rejects_duplicates():
    f = FakeFacts()
    f.alert("cam1", "port-scan")
    a, b = rule({"alert": {}}, name="a"), rule({"alert": {}}, name="b")
    engine = Engine([a, b])
    assert len(engine.evaluate(tick(), f)) == 2
    b2 = rule({"alert": {"count": 1, "within": "1h"}}, name="b")
    engine.replace_rules([a, b2, rule({"alert": {}}, name="c", enabled=False)])
    assert [d.rule for d in engine.evaluate(tick(), f)] == ["b"]      # changed rule: new state
    with pytest.raises(ConfigError, match="'a' is defined twice"):
        engine.replace_rules([a, a])


# ---------------------------------------------------------------- built-in rules

def intrusion_site(now):
    f = FakeFacts(now)
    f.report("light1", on=False)
    f.report("light2", on=False)
    return f, Engine(builtin_rules())


def test_intrusion_after_hours_three_actions():
    f, engine = intrusion_site(WEDNESDAY_2000_UTC)
    decision, = engine.evaluate(f.report("motion1", motion=True), f)
    assert decision.rule == "physical-intrusion" and decision.device is None
    alert, posture, command = decision.actions
    assert alert.kind == "alert" and alert.params["type"] == "physical-intrusion"
    assert alert.targets == ("motion1",)
    assert posture.kind == "set_posture" and posture.targets == ("cam1", "cam2")
    assert posture.params == {"posture": "suspicious", "for_seconds": 1800}
    assert command.kind == "command" and command.targets == ("light1", "light2")
    assert command.params == {"payload": {"on": True}}
    assert engine.evaluate(f.report("motion1", motion=True), f) == []   # still the same intrusion


def test_intrusion_not_during_business_hours_nor_with_lights_on_nor_on_old_motion():
    f, engine = intrusion_site(WEDNESDAY_0700_UTC)
    assert engine.evaluate(f.report("motion1", motion=True), f) == []
    f, engine = intrusion_site(SATURDAY_NOON_UTC)                       # weekend: outside hours
    f.report("light2", on=True)
    assert engine.evaluate(f.report("motion1", motion=True), f) == []
    assert engine.evaluate(f.report("motion1", motion=False), f) == []
    f.report("light2", on=False)
    f.advance(600)
    assert engine.evaluate(tick(), f) == []                             # no motion in 5 minutes


def test_intrusion_when_business_hours_end_and_rearm():
    f, engine = intrusion_site(datetime.datetime(2024, 5, 15, 15, 58, tzinfo=UTC))  # 17:58 Berlin
    assert engine.evaluate(f.report("motion1", motion=True), f) == []
    f.advance(120)                                                      # 18:00 Berlin
    assert [d.rule for d in engine.evaluate(tick(), f)] == ["physical-intrusion"]
    engine.evaluate(f.report("light1", on=True), f)                    # lights came on: re-arms
    # off again with the motion of two minutes ago still in the window: it fires again
    assert [d.rule for d in engine.evaluate(f.report("light1", on=False), f)] == ["physical-intrusion"]
    engine.evaluate(f.report("light1", on=True), f)
    f.report("light1", on=False)       # recorded, never evaluated (as in maintenance): ...
    assert engine.evaluate(f.report("motion1", motion=True), f) == []   # (a repeat: skipped)
    f.advance(1)                       # ... seen within a second, as what time alone changes
    assert [d.rule for d in engine.evaluate(f.report("motion1", motion=True), f)] == ["physical-intrusion"]


def test_attack_rules():
    f = FakeFacts()
    engine = Engine(builtin_rules())
    decision, = engine.evaluate(f.alert("cam1", "brute-force"), f)
    assert decision.rule == "device-under-attack"
    assert [(a.kind, a.targets, a.params["posture"]) for a in decision.actions] == [
        ("set_posture", ("cam1",), "attack")]
    assert engine.evaluate(f.alert("cam1", "port-scan"), f) == []       # still under attack
    f.advance(301)
    assert engine.evaluate(tick(), f) == []                             # quiet: re-arms
    assert engine.evaluate(f.alert("cam1", "syn-flood"), f)[0].rule == "device-under-attack"
    for kind in ("spoofing", "lateral-movement", "egress-anomaly", "port-scan-outbound"):
        f = FakeFacts()
        decision, = Engine(builtin_rules()).evaluate(f.alert("plug1", kind), f)
        assert decision.rule == "device-compromised"
        assert decision.actions[0].params["posture"] == "quarantine"
    f = FakeFacts()
    assert Engine(builtin_rules()).evaluate(f.alert("plug1", "gate-login-failures"), f) == []


def test_quarantine_wins_and_is_never_downgraded():
    f = FakeFacts()
    f.alert("cam1", "brute-force")
    decisions = Engine(builtin_rules()).evaluate(f.alert("cam1", "spoofing"), f)
    assert [d.rule for d in decisions] == ["device-compromised", "device-under-attack"]
    assert decisions[0].actions[0].params["posture"] == "quarantine"
    assert decisions[1].actions == ()                                   # its posture dropped
    f = FakeFacts()
    f.postures["cam1"] = "quarantine"
    assert Engine(builtin_rules()).evaluate(f.alert("cam1", "brute-force"), f) == []


def test_builtin_dicts_parse():
    for data in (INTRUSION_RULE, *ATTACK_RULES):
        assert parse_rule(data, "builtin").name == data["name"]


# ---------------------------------------------------------------- validation

def test_parse_duration():
    assert [parse_duration(x, "w") for x in ("90s", "15m", "2h", "1d", 42)] == [90, 900, 7200, 86400, 42]
    for bad in ("5x", "", "m", "-5m", "1.5h", 0, -3, True, None, 2.5):
        with pytest.raises(ConfigError, match="^w: "):
            parse_duration(bad, "w")


def bad(when=None, then=None, **extra):
    data = {"name": "n", "when": when or {"alert": {}},
            "then": then or [{"set_posture": {"posture": "attack"}}], **extra}
    with pytest.raises(ConfigError) as e:
        parse_rule(data, "camera.toml: rules[2]")
    return str(e.value)


def test_validation_errors_name_the_place_and_key():
    nested = lambda c: {"all": [{"alert": {}}, c]}
    assert bad(nested({"alert": {"cout": 2}})).startswith(
        "camera.toml: rules[2].when.all[1].alert: unknown key(s) ['cout']")
    assert bad(nested({"alret": {}})).startswith(
        "camera.toml: rules[2].when.all[1].alret: unknown condition 'alret'")
    assert bad({"telemetry": {"field": "x", "op": "=~", "value": 1}}).startswith(
        "camera.toml: rules[2].when.telemetry.op: unknown operator '=~'")
    assert bad(nested({"alert": {"within": "5x"}})).startswith(
        "camera.toml: rules[2].when.all[1].alert.within: invalid duration '5x'")
    assert bad({"time": {"between": ["25:00", "06:00"]}}).startswith(
        "camera.toml: rules[2].when.time.between[0]: invalid time '25:00'")
    assert bad({"alert": {"device": {"kind": "light"}}}).startswith(
        "camera.toml: rules[2].when.alert.device: unknown selector")
    assert bad({"all": []}).startswith("camera.toml: rules[2].when.all: needs a non-empty list")
    assert bad({"any": [{"not": {"any": []}}]}).startswith(
        "camera.toml: rules[2].when.any[0].not.any: needs a non-empty list")


def test_more_validation_errors():
    assert "when.telemetry: key 'op' is required" in bad({"telemetry": {"field": "x", "value": 1}})
    assert "when.telemetry.agg: unknown aggregate 'median'" in bad(
        {"telemetry": {"field": "x", "op": ">", "value": 1, "agg": "median"}})
    assert "when.telemetry.value: operator 'in' needs a list" in bad(
        {"telemetry": {"field": "x", "op": "in", "value": 1}})
    assert "give 'last' or 'within', not both" in bad(
        {"telemetry": {"field": "x", "op": ">", "value": 1, "last": 3, "within": "5m"}})
    assert "when.posture.is: unknown posture 'evil'" in bad({"posture": {"is": "evil"}})
    assert "when.time.days[1]: unknown day 'funday'" in bad(
        {"time": {"between": ["22:00", "06:00"], "days": ["mon", "funday"]}})
    assert "when.time.timezone: unknown time zone 'Mars/Olympus'" in bad(
        {"time": {"between": ["22:00", "06:00"], "timezone": "Mars/Olympus"}})
    assert "when.time.between: start and end are the same" in bad({"time": {"between": ["06:00", "06:00"]}})
    assert "when.alert.count: expected a whole number" in bad({"alert": {"count": 0}})
    assert "when: a condition is a table with exactly one" in bad({"alert": {}, "posture": {"is": "normal"}})
    assert "rules[2].then[0].set_posture.posture: unknown posture 'bad'" in bad(
        then=[{"set_posture": {"posture": "bad"}}])
    assert "rules[2].then[0].set_posture.for: invalid duration" in bad(
        then=[{"set_posture": {"posture": "attack", "for": "soon"}}])
    assert "rules[2].then[0].reboot: unknown action 'reboot'" in bad(then=[{"reboot": {}}])
    assert "rules[2].then[0].alert.severity: unknown severity 'loud'" in bad(
        then=[{"alert": {"type": "x", "severity": "loud"}}])
    assert "rules[2].then[0].command.payload: expected a non-empty table" in bad(
        then=[{"command": {"payload": {}}}])
    assert "rules[2]: unknown key(s) ['prio']" in bad(prio=3)
    with pytest.raises(ConfigError, match=r"rules\[2\].then: needs a non-empty list"):
        parse_rule({"name": "n", "when": {"alert": {}}, "then": []}, "camera.toml: rules[2]")


def test_parse_rule_defaults_and_applies_to():
    r = parse_rule({"name": "n", "when": {"alert": {}}, "then": [{"alert": {"type": "x"}}]},
                   "camera.toml: rules[0]", default_applies_to=("camera",), source="profile:camera")
    assert (r.priority, r.enabled, r.applies_to, r.source) == (0, True, ("camera",), "profile:camera")
    assert r.when == {"alert": {"type": None, "device": "self", "count": 1, "within": 600}}
    r = parse_rule({"name": "n", "when": {"alert": {}}, "then": [{"alert": {"type": "x"}}],
                    "applies_to": "light"}, "w", default_applies_to=("camera",))
    assert r.applies_to == ("light",)


def test_bad_settings_name_the_setting():
    f = FakeFacts()
    f.config = {"business_hours": {"start": "8am", "end": "18:00"}, "timezone": "Europe/Berlin"}
    with pytest.raises(ConfigError, match=r"settings.business_hours.start/end\[0\]: invalid time"):
        Engine([rule({"time": {"business_hours": True}})]).evaluate(tick(), f)


# ---------------------------------------------------------------- which reports a rule reads

class CountingFacts(FakeFacts):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.selections = 0

    def devices_where(self, key, value):
        self.selections += 1
        return super().devices_where(key, value)


HALL_RULE = {"all": [
    {"telemetry": {"device": {"group": "hall"}, "field": "motion", "op": "==", "value": True}},
    {"telemetry": {"device": {"type": "light"}, "field": "on", "op": "==", "value": False,
                   "match": "all"}}]}


def test_a_report_a_global_rule_does_not_read_does_not_evaluate_it():
    f = CountingFacts()
    cameras = {"set_posture": {"device": {"type": "camera"}, "posture": "suspicious"}}
    engine = Engine([rule(HALL_RULE, [cameras])])
    f.report("light1", on=False)
    f.report("light2", on=False)
    assert engine.evaluate(f.report("motion1", motion=False), f) == []
    asked = f.selections
    for _ in range(5):      # the plug's power and the camera's recording: not read by the rule
        assert engine.evaluate(f.report("plug1", on=True, power_w=3.0), f) == []
        assert engine.evaluate(f.report("cam2", motion=True), f) == []     # not in the hall
    assert f.selections == asked and engine.skipped == 10
    [d] = engine.evaluate(f.report("motion1", motion=True), f)
    assert d.actions[0].targets == ("cam1", "cam2")
    assert engine.evaluate(f.report("light1", on=True), f) == []         # read: re-arms
    assert engine.skipped == 10
    assert engine.evaluate(f.report("light1", on=True), f) == []         # its value repeated
    assert engine.skipped == 11


def test_a_repeated_value_skips_only_what_it_cannot_change():
    f = CountingFacts(now=WEDNESDAY_2000_UTC)      # after hours
    engine = Engine(builtin_rules())
    for light in ("light1", "light2"):
        f.report(light, on=False)
    assert engine.evaluate(f.report("motion1", motion=False), f) == []
    asked = f.selections
    for _ in range(3):      # the same values again: the site-wide rule is not read
        assert engine.evaluate(f.report("light1", on=False), f) == []
        assert engine.evaluate(f.report("motion1", motion=False), f) == []
    assert f.selections == asked and engine.skipped == 6
    [d] = engine.evaluate(f.report("motion1", motion=True), f)           # a new value: read
    assert d.rule == "physical-intrusion"
    engine.evaluate(f.report("light2", on=True), f)                       # re-arms
    engine.evaluate(f.report("light2", on=False), f)                      # fires again
    f.advance(301)          # the motion of 5 min 1 s ago left the window: lights on, off
    engine.evaluate(f.report("light2", on=True), f)
    assert engine.evaluate(f.report("light2", on=False), f) == []
    # the same motion value again, but its previous one is outside the window: read, fires
    [d] = engine.evaluate(f.report("motion1", motion=True), f)
    assert d.rule == "physical-intrusion"


def test_a_repeated_value_still_counts_and_still_changes_nothing():
    f = FakeFacts()
    counting = rule({"telemetry": {"device": "plug1", "field": "power_w", "agg": "count",
                                   "op": ">=", "value": 3, "within": "1m"}},
                    [{"set_posture": {"device": "cam1", "posture": "suspicious"}}], name="counting")
    edge = rule({"changed": {"device": "plug1", "field": "on", "to": True}},
                [{"set_posture": {"device": "cam2", "posture": "suspicious"}}], name="edge")
    engine = Engine([counting, edge])
    assert engine.evaluate(f.report("plug1", power_w=5.0), f) == []
    assert engine.evaluate(f.report("plug1", power_w=5.0), f) == []
    [d] = engine.evaluate(f.report("plug1", power_w=5.0), f)               # the third report
    assert d.rule == "counting"
    f.report("plug1", on=False)
    [d] = engine.evaluate(f.report("plug1", on=True), f)
    assert d.rule == "edge"
    assert engine.evaluate(f.report("plug1", on=True), f) == []           # no change: re-arms
    engine.evaluate(f.report("plug1", on=False), f)
    [d] = engine.evaluate(f.report("plug1", on=True), f)
    assert d.rule == "edge"


def test_any_and_all_stop_at_the_device_that_settles_them():
    f = CountingFacts(now=WEDNESDAY_2000_UTC)
    f.report("light1", on=True)
    f.report("light2", on=False)
    reads = []
    cam1 = [{"set_posture": {"device": "cam1", "posture": "suspicious"}}]      # a global rule
    telemetry = f.telemetry
    f.telemetry = lambda device, *a, **k: reads.append(device) or telemetry(device, *a, **k)
    lights_off = rule({"telemetry": {"device": {"type": "light"}, "field": "on", "op": "==",
                                     "value": False, "match": "all"}}, cam1)
    assert not fires(lights_off, f, tick()) and reads == ["light1"]      # light1 settles "all"
    reads.clear()
    one_on = rule({"telemetry": {"device": {"type": "light"}, "field": "on", "op": "==",
                                 "value": True}}, cam1)
    assert fires(one_on, f, tick()) and reads == ["light1"]              # and "any"
    nobody = rule({"telemetry": {"device": {"type": "camera"}, "field": "on", "op": "==",
                                 "value": False, "match": "all"}}, cam1)
    assert not fires(nobody, f, tick())          # no camera reported: neither passes nor fails


def test_what_time_alone_changes_is_seen_on_any_report_a_second_later():
    f = FakeFacts(now=datetime.datetime(2024, 5, 15, 15, 59, 59, tzinfo=UTC))     # 17:59:59 in Berlin
    after_hours = rule({"all": [{"time": {"business_hours": False}},
                                {"telemetry": {"device": "motion1", "field": "motion", "op": "==",
                                               "value": True}}]},
                       [{"set_posture": {"device": "cam1", "posture": "suspicious"}}])
    engine = Engine([after_hours])
    assert engine.evaluate(f.report("motion1", motion=True), f) == []     # business hours
    f.advance(0.5)
    assert engine.evaluate(f.report("plug1", on=True), f) == []            # skipped: 0.5 s
    assert engine.skipped == 1
    f.advance(1)    # 18:00:00.5: the same report of the plug now evaluates it, and it fires
    [d] = engine.evaluate(f.report("plug1", on=True), f)
    assert d.rule == "r" and d.actions[0].targets == ("cam1",)


def test_alerts_and_postures_evaluate_the_rules_that_read_them():
    f = FakeFacts()
    counting = rule({"alert": {"device": "any", "type": ["port-scan"], "count": 2, "within": "5m"}},
                    [{"set_posture": {"device": "cam1", "posture": "attack"}}], name="counting")
    watching = rule({"posture": {"device": {"group": "hall"}, "is": "attack"}},
                    [{"set_posture": {"device": "plug1", "posture": "suspicious"}}], name="watching")
    engine = Engine([counting, watching])
    f.alert("cam2", "port-scan")
    assert engine.evaluate(f.report("plug1", on=True), f) == [] and engine.skipped == 0
    assert engine.evaluate(f.alert("cam2", "brute-force"), f) == []       # a type it does not count
    assert engine.skipped == 2                                             # nor a posture
    [d] = engine.evaluate(f.alert("cam2", "port-scan"), f)                # at once, not a second later
    assert d.rule == "counting" and engine.skipped == 3
    f.postures["cam2"] = "attack"
    assert engine.evaluate(Stimulus("posture", "cam2", {"to": "attack"}, 0), f) == []   # the yard
    f.postures["cam1"] = "attack"
    [d] = engine.evaluate(Stimulus("posture", "cam1", {"to": "attack"}, 0), f)
    assert d.rule == "watching"
