"""Rules readable (issue 14, item 6): every rule in plain words, built-in and profile rules
switched off and on (audited, persisted, said on the pages), the posture state machine as an
SVG graph, and a rule editor whose example is a placeholder. Lab-free: a real Supervisor with the
fake data path; the pages served on loopback as tests/test_web.py serves them."""
from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET

import pytest
from fakes import supervisor
from test_profiles_cli import kalki, served  # noqa: F401  (the control socket's fixture)
from test_web import aiotest, client, login, set_admin

from appliance import policy
from appliance.errors import ConfigError
from appliance.faces.web.graph import posture_graph_svg
from appliance.policy import graph, profiles, rules
from appliance.supervisor import backup, explain
from appliance.supervisor.core import Supervisor
from appliance.supervisor.ops import RULE_EXAMPLE, Ops

SVG = "{http://www.w3.org/2000/svg}"


def rule(when, then=None, applies_to=None, name="r") -> policy.Rule:
    data = {"name": name, "when": when, "then": then or [{"set_posture": {"posture": "attack"}}]}
    if applies_to:
        data["applies_to"] = applies_to
    return policy.parse_rule(data, "test")


# -- the words ----------------------------------------------------------------------------------

# One condition of each kind the parser accepts, with what its words must say. A kind the
# parser learns without an entry here (and in explain.CONDITION_WORDS) fails the test below.
CONDITIONS = {
    "alert": ({"alert": {"type": "brute-force", "count": 3, "within": "5m"}},
              "a camera has raised brute-force alerts 3 times within 5 min"),
    "telemetry": ({"telemetry": {"device": {"type": "light"}, "field": "on", "op": "==", "value": False,
                                 "match": "all"}},
                  "every light's on is false"),
    "changed": ({"changed": {"field": "open", "from": False, "to": True}},
                "a camera's open changes from false to true"),
    "posture": ({"posture": {"in": ["suspicious", "attack"]}},
                "a camera is in posture suspicious or attack"),
    "time": ({"time": {"between": ["22:00", "06:00"], "days": ["sat", "sun"], "timezone": "Europe/Berlin"}},
             "the time is between 22:00 and 06:00 on sat, sun (Europe/Berlin)"),
    "all": ({"all": [{"time": {"business_hours": False}}, {"alert": {"type": "port-scan"}}]},
            "the time is outside business hours and a camera has raised a port-scan alert in the "
            "last 10 min"),
    "any": ({"any": [{"posture": {"is": "attack"}}, {"alert": {}}]},
            "a camera is in posture attack or it has raised an alert of any kind in the last 10 min"),
    "not": ({"not": {"posture": {"is": "quarantine"}}}, "a camera is not in quarantine"),
}
ACTIONS = {
    "set_posture": ({"set_posture": {"posture": "quarantine", "for": "30m"}},
                    "it goes to quarantine for 30 min"),
    "command": ({"command": {"device": {"type": "light"}, "payload": {"on": True}}},
                "every light is sent the command on = true"),
    "alert": ({"alert": {"type": "overheat", "severity": "critical", "message": "too hot"}},
              'a critical overheat alert is raised ("too hot")'),
    "poll": ({"poll": {"device": {"group": "hall"}, "every": "1s", "for": "30m"}},
             "every device in group hall is polled every 1 s for 30 min"),
}


def test_every_kind_the_parser_accepts_has_words():
    # the parser's own lists agree with its parsers ...
    assert set(rules._CONDITION_PARSERS) | {"all", "any", "not"} == set(rules.CONDITIONS)
    assert set(rules._ACTION_PARSERS) == set(rules.ACTIONS)
    # ... and each kind has words, and a sample here that shows them
    assert set(explain.CONDITION_WORDS) == set(rules.CONDITIONS) == set(CONDITIONS)
    assert set(explain.ACTION_WORDS) == set(rules.ACTIONS) == set(ACTIONS)
    assert set(explain.OP_WORDS) == set(rules.COMPARISONS)
    assert set(explain.AGGREGATE_WORDS) == set(rules.AGGREGATES)


@pytest.mark.parametrize("kind", sorted(CONDITIONS))
def test_the_words_of_each_condition(kind):
    when, said = CONDITIONS[kind]
    words = explain.rule_words(rule(when, applies_to=["camera"]))
    assert words.startswith(f"When {said}, "), words


@pytest.mark.parametrize("kind", sorted(ACTIONS))
def test_the_words_of_each_action(kind):
    then, said = ACTIONS[kind]
    words = explain.rule_words(rule({"alert": {"type": "x"}}, [then], applies_to=["camera"]))
    assert words.endswith(f", {said}."), words


def test_the_issues_example_and_the_other_details():
    r = rule({"alert": {"type": "brute-force", "count": 3, "within": "5m"}},
             [{"set_posture": {"posture": "quarantine", "for": "30m"}}], applies_to=["camera"])
    assert explain.rule_words(r) == ("When a camera has raised brute-force alerts 3 times within 5 min, "
                                     "it goes to quarantine for 30 min.")
    # no applies_to: "a device"; several kinds; a device by name; aggregates and windows
    r = rule({"all": [{"alert": {"type": ["spoofing", "gateway-probe"], "within": "5m"}},
                      {"telemetry": {"device": "plug1", "field": "power_w", "agg": "avg", "last": 5,
                                     "op": ">", "value": 2000}},
                      {"telemetry": {"device": {"type": "motion_sensor"}, "field": "motion", "op": "==",
                                     "value": True, "within": "5m"}},
                      {"telemetry": {"field": "temperature", "agg": "max", "within": "1h", "op": "in",
                                     "value": [30, 40]}},
                      {"alert": {"device": {"type": "camera"}, "count": 2}},
                      {"not": {"time": {"business_hours": False}}},
                      {"not": {"any": [{"changed": {"field": "open", "to": True}}]}}]},
             [{"set_posture": {"device": "any", "posture": "suspicious"}}])
    assert explain.rule_words(r) == (
        "When a device has raised a spoofing or gateway-probe alert in the last 5 min, plug1's "
        "average power_w over the last 5 reports is above 2000, any motion_sensor's motion "
        "(reported in the last 5 min) is true, its highest temperature over the last 1 h is one "
        "of 30 or 40, the camera devices together have raised alerts of any kind 2 times within "
        "10 min, the time is within business hours and not (its open changes to true), every "
        "device goes to suspicious.")


def test_every_shipped_rule_has_words():
    shipped = policy.builtin_rules() + [r for p in profiles.load_all(profiles.PROFILE_DIR).values()
                                        for r in p.rules]
    assert len(shipped) >= 7
    for r in shipped:
        words = explain.rule_words(r)
        assert words.startswith("When ") and words.endswith(".") and "None" not in words, words
        assert "{'" not in words and "()" not in words, words


# -- the graph ----------------------------------------------------------------------------------

def edges(g: dict) -> set[tuple[str, str, str]]:
    return {(e["rule"], e["from"], e["to"]) for e in g["edges"]}


def test_the_graph_of_the_built_in_rules():
    g = graph.posture_graph(policy.builtin_rules())
    assert g["nodes"] == ["learning", "normal", "suspicious", "attack", "quarantine"]
    # none of them looks at the device's posture first (device-under-attack's "not quarantine"
    # excludes nothing a rule could raise to attack): one edge each, from any lower posture
    assert edges(g) == {("device-compromised", graph.ANY, "quarantine"),
                        ("device-under-attack", graph.ANY, "attack"),
                        ("physical-intrusion", graph.ANY, "suspicious")}
    by_rule = {e["rule"]: e for e in g["edges"]}
    assert by_rule["device-under-attack"]["from_postures"] == ["learning", "normal", "suspicious"]
    assert by_rule["physical-intrusion"]["for_seconds"] == 1800


def test_a_rules_own_posture_conditions_bound_its_edges():
    only_suspicious = rule({"all": [{"posture": {"is": "suspicious"}}, {"alert": {"count": 2}}]},
                           name="suspicious-to-attack")
    not_learning = rule({"not": {"posture": {"in": ["learning", "suspicious"]}}},
                        [{"set_posture": {"posture": "quarantine"}}], name="not-learning")
    either = rule({"any": [{"posture": {"is": "normal"}}, {"alert": {}}]}, name="either")
    other = rule({"posture": {"device": "cam2", "is": "attack"}},
                 [{"set_posture": {"device": "plug1", "posture": "suspicious"}}], name="other-device")
    to_learning = rule({"alert": {}}, [{"set_posture": {"posture": "learning"}}], name="to-learning")
    g = graph.posture_graph([only_suspicious, not_learning, either, other, to_learning])
    assert edges(g) == {("suspicious-to-attack", "suspicious", "attack"),
                        ("not-learning", "normal", "quarantine"), ("not-learning", "attack", "quarantine"),
                        ("either", graph.ANY, "attack"),          # the alert may hold in any posture
                        ("other-device", graph.ANY, "suspicious")}   # cam2's posture bounds not plug1's
    # learning is the least strict: no rule raises a device to it, so no edge
    assert not [e for e in g["edges"] if e["to"] == "learning"]


def test_a_graph_for_one_type():
    cameras_only = rule({"alert": {}}, applies_to=["camera"], name="cameras-only")
    lights = rule({"alert": {}}, [{"set_posture": {"device": {"type": "light"}, "posture": "suspicious"}}],
                  name="lights")
    named = rule({"alert": {}}, [{"set_posture": {"device": "plug1", "posture": "quarantine"}}],
                 name="named")
    rs = [cameras_only, lights, named]
    type_of = {"plug1": "plug"}.get
    plug = graph.posture_graph(rs, ["normal", "suspicious", "quarantine", "learning", "unknown"], "plug",
                               type_of)
    assert plug["nodes"] == ["learning", "normal", "suspicious", "quarantine"]     # no "unknown"
    assert edges(plug) == {("named", graph.ANY, "quarantine")}
    camera = graph.posture_graph(rs, ["normal", "suspicious", "quarantine"], "camera", type_of)
    assert edges(camera) == set() and camera["missing"] == [{"rule": "cameras-only", "posture": "attack"}]


def svg_of(g: dict) -> ET.Element:
    return ET.fromstring(posture_graph_svg(g, explain.seconds_words))


def test_the_svg_has_a_node_per_posture_and_an_edge_per_transition():
    off = rule({"posture": {"is": "suspicious"}}, name="suspicious-to-attack & <more>")
    rs = policy.builtin_rules() + [dataclasses.replace(off, enabled=False)]
    g = graph.posture_graph(rs)
    root = svg_of(g)                       # parses as XML: names are escaped
    assert root.tag == f"{SVG}svg" and root.get("viewBox")
    nodes = root.findall(f"{SVG}g[@class]")
    postures = [n.get("data-posture") for n in nodes if "pg-node" in n.get("class")]
    assert postures == list(g["nodes"]) == ["learning", "normal", "suspicious", "attack", "quarantine"]
    drawn = [(n.get("data-rule"), n.get("data-from"), n.get("data-to"), n.get("class"))
             for n in nodes if "pg-edge" in n.get("class")]
    assert len(drawn) == len(g["edges"]) == 4
    assert {d[:3] for d in drawn} == edges(g)
    assert ("suspicious-to-attack & <more>", "suspicious", "attack", "pg-edge pg-off") in drawn
    for n in nodes:                        # every edge has an arrowhead and its rule's name
        if "pg-edge" in n.get("class"):
            assert n.find(f"{SVG}path").get("marker-end") == "url(#pg-arrow)"
            assert n.get("data-rule") in n.find(f"{SVG}text").text
    # the CSP forbids style attributes: colours come from classes and currentColor
    assert not [el for el in root.iter() if el.get("style") is not None]
    assert root.find(f"{SVG}defs/{SVG}marker/{SVG}path").get("fill") == "currentColor"
    # a "from any posture" edge ticks each posture it leaves from
    compromised = next(n for n in nodes if n.get("data-rule") == "device-compromised")
    assert len(compromised.findall(f"{SVG}path[@class='pg-tick']")) == 3     # and the line from learning


# -- switching built-in rules off and on --------------------------------------------------------

@pytest.fixture
def ops(tmp_path):
    sup = supervisor(tmp_path, camera1=("02:4b:00:00:00:01", "198.18.0.10", "camera"),
                     plug1=("02:4b:00:00:00:02", "198.18.0.11", "plug"))
    yield Ops(sup)
    sup.store.close()


def brute_force(sup) -> None:
    sup.raise_alert("camera1", "brute-force", "kernel",
                    {"src": "198.19.0.66", "dst": "198.18.0.10", "dst_port": 23}, 0)


def decisions(sup, rule_name: str) -> list[dict]:
    return [d for d in sup.store.decisions(kind="decision") if d.get("rule") == rule_name]


def audits(sup, event: str) -> list[dict]:
    return [a for a in sup.store.decisions(kind="audit") if a["event"] == event]


def test_a_built_in_rule_switched_off_does_not_fire_and_on_again_does(ops):
    sup = ops._sup
    ops.set_rule_enabled("device-under-attack", False, "web:admin")
    assert "device-under-attack" not in [r.name for r in sup.engine.rules]
    brute_force(sup)
    assert decisions(sup, "device-under-attack") == [] and sup.posture("camera1") == "normal"
    assert [(a["actor"], a["details"]) for a in audits(sup, "rule-disabled")] == [
        ("web:admin", {"rule": "device-under-attack", "source": "builtin"})]
    assert ops.status()["rules_off"] == [{"name": "device-under-attack", "source": "builtin"}]
    assert ops.rules_off_words() == "1 built-in rule off: device-under-attack"
    row = next(r for r in ops.rules_view() if r["name"] == "device-under-attack")
    assert row["enabled"] is False and row["switched_off"] and row["switchable"] and not row["editable"]

    # kept in the store: a restarted supervisor keeps it off
    again = Supervisor(sup.cfg)
    assert "device-under-attack" not in [r.name for r in again.engine.rules]
    again.store.close()

    ops.set_rule_enabled("device-under-attack", "true", "web:admin")
    brute_force(sup)
    [d] = decisions(sup, "device-under-attack")
    assert d["device"] == "camera1" and sup.posture("camera1") == "attack"
    assert [a["actor"] for a in audits(sup, "rule-enabled")] == ["web:admin"]
    assert ops.status()["rules_off"] == [] and ops.rules_off_words() == ""


def test_a_profile_rule_switched_off(ops):
    sup = ops._sup
    ops.set_rule_enabled("plug-power-spike", False, "operator")
    sup.on_telemetry("plug1", {"power_w": 3000})
    assert sup.posture("plug1") == "normal" and decisions(sup, "plug-power-spike") == []
    assert ops.rules_off_words() == "1 profile rule off: plug-power-spike"
    ops.set_rule_enabled("device-compromised", False, "operator")
    assert ops.rules_off_words() == ("1 built-in rule and 1 profile rule off: device-compromised, "
                                     "plug-power-spike")
    ops.set_rule_enabled("plug-power-spike", True, "operator")
    sup.on_telemetry("plug1", {"power_w": 3000})
    assert sup.posture("plug1") == "suspicious" and len(decisions(sup, "plug-power-spike")) == 1


def test_what_cannot_be_switched(ops, monkeypatch):
    with pytest.raises(ConfigError, match="rule 'nope' does not exist"):
        ops.set_rule_enabled("nope", False, "operator")
    with pytest.raises(ConfigError, match="enabled must be true or false"):
        ops.set_rule_enabled("device-compromised", "maybe", "operator")
    with pytest.raises(ConfigError, match="only site rules can be changed or deleted"):
        ops.delete_rule("device-compromised", "operator")
    # a profile rule its own file disables is that file's business
    sup = ops._sup
    shipped = sup.rules
    monkeypatch.setattr(sup, "rules", lambda: [dataclasses.replace(r, enabled=False)
                                               if r.name == "plug-power-spike" else r for r in shipped()])
    with pytest.raises(ConfigError, match="disabled in its profile"):
        ops.set_rule_enabled("plug-power-spike", True, "operator")
    assert not next(r for r in ops.rules_view() if r["name"] == "plug-power-spike")["switchable"]
    assert audits(sup, "rule-disabled") == audits(sup, "rule-enabled") == []


def test_the_switches_are_not_in_a_backup(ops):
    """A backup carries only the operator's settings that it lists (backup.SETTINGS): a
    restored appliance starts with all of its own protection on."""
    ops.set_rule_enabled("device-under-attack", False, "operator")
    content = backup.make(ops._sup)["content"]
    assert "rules_off" not in content["settings"] and "device-under-attack" not in str(content)


def test_the_setting_is_checked(ops):
    store = ops._sup.store
    for bad in ("device-compromised", ["a", "a"], [""], [1]):
        with pytest.raises(Exception, match="setting rules_off"):
            store.set_setting("rules_off", bad)


# -- the command --------------------------------------------------------------------------------

def test_the_command_lists_and_switches_rules(served, capsys):  # noqa: F811
    sock, ops = served
    code, out, _ = kalki(capsys, sock, "rules", "disable", "device-under-attack")
    assert code == 0 and out == "device-under-attack (built-in rule): switched off\n"
    assert [a["actor"] for a in audits(ops._sup, "rule-disabled")] == ["operator"]
    code, out, _ = kalki(capsys, sock, "rules", "list", "--table")
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0 and out.splitlines()[0].split()[:3] == ["RULE", "SOURCE", "ON"]
    assert "switched off" in lines["device-under-attack"] and "When a device has raised" in out
    code, out, _ = kalki(capsys, sock, "rules", "enable", "device-under-attack")
    assert code == 0 and out == "device-under-attack (built-in rule): on\n"
    code, _, err = kalki(capsys, sock, "rules", "disable", "nope")
    assert code == 2 and "rule 'nope' does not exist" in err


# -- the pages ----------------------------------------------------------------------------------

def csrf(text: str) -> str:
    return re.search(r'name="csrf-token" content="([^"]+)"', text).group(1)


def svg_in(page: str) -> ET.Element:
    return ET.fromstring(re.search(r"<svg .*?</svg>", page, re.S).group(0))


@aiotest
async def test_the_rules_page(ops):
    sup = ops._sup
    set_admin(sup)
    async with client(sup) as c:
        await login(c)
        page = await (await c.get("/rules")).text()
        # each rule in words, and a switch for the built-in ones too
        assert "When a device has raised a brute-force, port-scan, stealth-scan or syn-flood alert " \
               "in the last 5 min and it is not in quarantine, it goes to attack." in page
        assert 'action="/rules/device-under-attack/enabled"' in page and "Switch off" in page
        assert 'id="rules-off"' not in page
        # the editor is empty: the example is its placeholder, which no click saves
        editor = re.search(r'<textarea name="text"[^>]*>(.*?)</textarea>', page, re.S)
        assert editor.group(1) == "" and 'placeholder="[[rules]]' in editor.group(0)
        assert "night-camera-watch" in editor.group(0) and "night-camera-watch" in RULE_EXAMPLE
        # the graph: one node per posture, one edge per transition
        g = ops.posture_graph()
        root = svg_in(page)
        assert [n.get("data-posture") for n in root.iter(f"{SVG}g") if n.get("data-posture")] == \
            ["learning", "normal", "suspicious", "attack", "quarantine"] == g["nodes"]
        assert len([n for n in root.iter(f"{SVG}g") if n.get("data-rule")]) == len(g["edges"]) == 5
        assert "style=" not in re.search(r"<svg .*?</svg>", page, re.S).group(0)

        # switched off from the page: audited by the user, said on the rules page and the overview
        r = await c.post("/rules/device-compromised/enabled",
                         data={"enabled": "false", "csrf": csrf(page)}, allow_redirects=False)
        assert r.status == 303
        assert [a["actor"] for a in audits(sup, "rule-disabled")] == ["web:admin"]
        page = await (await c.get("/rules")).text()
        assert "1 built-in rule off: device-compromised" in page
        assert "Switch on" in page and 'class="pg-edge pg-off" data-rule="device-compromised"' in page
        home = await (await c.get("/")).text()
        assert 'id="rules-off"' in home and "1 built-in rule off: device-compromised" in home
        r = await c.post("/rules/device-compromised/enabled",
                         data={"enabled": "true", "csrf": csrf(home)}, allow_redirects=False)
        assert r.status == 303 and 'id="rules-off"' not in await (await c.get("/")).text()

        # one device type's graph: the postures its profile has; a wrong type says so
        page = await (await c.get("/rules?type=plug")).text()
        assert '<option value="plug" selected>' in page and 'data-type="plug"' in page
        page = await (await c.get("/rules?type=lamp")).text()
        assert "posture graph: &#x27;lamp&#x27; is not a known device type" in page and 'data-type=""' in page

        # editing a site rule still fills the editor with its TOML
        sup_ops = Ops(sup)
        sup_ops.put_rules_text('[[rules]]\nname = "watch"\nwhen = {alert = {}}\n'
                               'then = [{set_posture = {posture = "suspicious"}}]\n', "test")
        page = await (await c.get("/rules?edit=watch")).text()
        editor = re.search(r'<textarea name="text"[^>]*>(.*?)</textarea>', page, re.S)
        assert 'name = &quot;watch&quot;' in editor.group(1)


ROOM_RULE = '''
[[rules]]
name = "hall-intrusion"
when = {all = [{telemetry = {device = {group = "hall-motion"}, field = "motion", op = "==", value = true}}]}
then = [{set_posture = {device = {group = "hall-cameras"}, posture = "suspicious"}}]
'''


def test_site_rules_put_over_the_control_socket(ops):
    from appliance.supervisor import control
    sup = ops._sup
    ops.device_group("camera1", "hall-cameras")
    ops.device_group("plug1", "hall-motion")
    assert control.handle(ops, {"op": "rules_put", "args": {"text": ROOM_RULE}}) == {
        "saved": ["hall-intrusion"]}
    assert [a["details"]["rule"] for a in audits(sup, "rule-put")] == ["hall-intrusion"]
    sup.on_telemetry("plug1", {"motion": True})
    assert sup.posture("camera1") == "suspicious"
    # one wrong rule saves none of the text, and the error names it
    bad = ROOM_RULE.replace("hall-intrusion", "second") + ROOM_RULE.replace(
        "hall-intrusion", "third").replace('op = "=="', 'op = "~~"')
    with pytest.raises(ConfigError, match=r"rules\[1\]"):
        control.handle(ops, {"op": "rules_put", "args": {"text": bad}})
    assert {r["name"] for r in sup.store.rules()} == {"hall-intrusion"}
    with pytest.raises(ConfigError, match="missing argument"):
        control.handle(ops, {"op": "rules_put", "args": {}})


def test_the_rules_index_of_types_and_groups_follows_the_devices(ops):
    sup = ops._sup
    assert sup.devices_where("type", "camera") == ["camera1"]
    assert sup.devices_where("group", "hall") == []
    ops.device_group("camera1", "hall")
    assert sup.devices_where("group", "hall") == ["camera1"]
    ops.device_rename("camera1", "porch-camera")
    assert sup.devices_where("group", "hall") == sup.devices_where("type", "camera") == ["porch-camera"]
    ops.device_group("porch-camera", "")
    assert sup.devices_where("group", "hall") == []
    ops.device_remove("porch-camera")
    assert sup.devices_where("type", "camera") == []


def test_a_posture_change_keeps_the_rules_index_and_a_new_type_remakes_it(ops):
    """The index of types and groups is made again only when one of them can have changed:
    25 cameras moved by one rule remade it for each camera's own rules at 1,000 devices."""
    sup = ops._sup
    assert sup.devices_where("type", "camera") == ["camera1"]
    version = sup.known.version
    ops.posture_set("camera1", "suspicious")
    assert sup.posture("camera1") == "suspicious"
    assert sup.known.version == version
    ops.device_approve("plug1", type="camera")
    assert sup.known.version != version
    assert sup.devices_where("type", "camera") == ["camera1", "plug1"]
    assert sup.devices_where("type", "plug") == []
