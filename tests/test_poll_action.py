"""The rule action `poll`: a polling adapter's interval for a device or a group, for a while,
over the real supervisor, store, profiles and HueAdapter (no HTTP: nothing is started, or its
poll is replaced) with a fake data path."""
from __future__ import annotations

import asyncio
import datetime
import time

import pytest
from fakes import supervisor

from appliance.errors import ConfigError
from appliance.policy import parse_rule
from appliance.policy.profiles import profile_from_text
from appliance.supervisor import explain
from appliance.telemetry.adapters import HueAdapter

CAMERA = ("02:4b:00:00:00:01", "198.18.0.10", "camera")
LIGHT1 = ("02:4b:00:00:00:03", "198.18.0.12", "light")
LIGHT2 = ("02:4b:00:00:00:04", "198.18.0.13", "light")
PLUG = ("02:4b:00:00:00:02", "198.18.0.11", "plug")


def adapter_for(sup, *names):
    return HueAdapter({n: {"user": "kalki"} for n in names}, devices=lambda: sup.known,
                      profile=sup.profiles.get, on_report=sup.on_telemetry,
                      on_availability=sup.on_availability, loop=None)


@pytest.fixture
def sup(tmp_path):
    s = supervisor(tmp_path, camera1=CAMERA, light1=LIGHT1, light2=LIGHT2, plug1=PLUG)
    s.adapter = adapter_for(s, "light1", "light2")
    yield s
    s.store.close()


def site_rule(sup, name, poke, poll):
    """A site rule: an alert of type `poke` on a device polls as `poll` says."""
    sup.store.put_rule(name, {"name": name, "when": {"alert": {"type": poke}}, "then": [{"poll": poll}]})
    sup.reload_rules()


def poke(sup, kind, device="camera1"):
    sup.raise_alert(device, kind, "operator", {}, time.monotonic_ns())


def later(sup, **delta):
    sup.clock.set((sup.now() + datetime.timedelta(**delta)).isoformat())
    sup._expire_polls()


def audit(sup, event):
    return [a for a in sup.store.decisions(kind="audit", limit=1000) if a["event"] == event]


def poll_steps(sup, rule):
    return [a for d in sup.store.decisions(kind="decision", limit=1000) if d["rule"] == rule
            for a in d["actions"] if a["action"] == "poll"]


# -- the language ---------------------------------------------------------------------------

def rule(poll):
    return {"name": "fast", "when": {"posture": {"is": "suspicious"}}, "then": [{"poll": poll}]}


def test_a_poll_action_is_parsed_and_normalised():
    r = parse_rule(rule({"device": {"group": "hall"}, "every": "1s", "for": "30m"}), "site rule fast")
    assert r.then == ({"poll": {"device": {"group": "hall"}, "every": 1, "for": 1800}},)
    r = parse_rule(rule({"every": 3600}), "site rule fast")
    assert r.then == ({"poll": {"device": "self", "every": 3600, "for": None}},)


@pytest.mark.parametrize("poll, error", [
    ({"device": "light1", "every": "1s", "evry": "2s"}, r"poll: unknown key\(s\) \['evry'\]"),
    ({"device": "light1", "group": "hall", "every": "1s"}, r"poll: unknown key\(s\) \['group'\]"),
    ({"device": "light1"}, r"poll: key 'every' is required"),
    ({"every": "0s"}, r"poll.every: duration must be more than 0"),
    ({"every": "2h"}, r"poll.every: expected 1 s to 3600 s"),
    ({"every": "fast"}, r"poll.every: invalid duration 'fast'"),
    ({"every": "1s", "for": "31d"}, r"poll.for: at most 30 days"),
    ({"every": "1s", "device": {"room": "hall"}}, r"poll.device: unknown selector"),
    ("1s", r"poll: expected a table"),
])
def test_parse_errors_name_the_rule_and_the_key(poll, error):
    with pytest.raises(ConfigError, match=r"^site rule fast\.then\[0\]\." + error):
        parse_rule(rule(poll), "site rule fast")


def test_a_profile_s_bad_poll_rule_names_the_file_and_the_rule_s_place():
    text = ('type = "lamp"\n[postures.normal]\nanti_spoof = {}\n[[rules]]\nname = "x"\n'
            'when = {posture = {is = "suspicious"}}\n'
            'then = [{poll = {every = "1s", for = "1h", evry = 1}}]\n')
    with pytest.raises(ConfigError, match=r"^lamp.toml: rules\[0\]\.then\[0\]\.poll: unknown key"):
        profile_from_text(text, "lamp.toml")


# -- carrying it out ------------------------------------------------------------------------

def test_the_camera_profile_s_rule_polls_the_lights_every_second_for_30_minutes(sup):
    sup.adapter.set_interval("light1", 60)       # slower than the profile's, to see the change
    sup.set_posture("camera1", "suspicious", "test")
    assert sup.adapter.interval("light1") == sup.adapter.interval("light2") == 1.0
    until = sup.polls["light1"]["until"]
    assert datetime.datetime.fromisoformat(until) - sup.now() > datetime.timedelta(minutes=29)
    assert sup.poll_of("light1") == {"every_seconds": 1, "until": until,
                                     "rule": "camera-suspicious-poll-lights"}
    steps = poll_steps(sup, "camera-suspicious-poll-lights")
    assert {(s["target"], s["every_seconds"], s["for_seconds"]) for s in steps} == {
        ("light1", 1, 1800), ("light2", 1, 1800)}
    assert {a["device"] for a in audit(sup, "poll")} == {"light1", "light2"}
    assert sup.poll_of("plug1") is None and sup.poll_of("camera1") is None     # no adapter polls them


def test_cameras_turning_suspicious_together_poll_each_light_once(tmp_path):
    """The intrusion rule moves every camera at once: each asks for every light's poll, and
    only the first is carried out (one audit per light, not one per camera, and one write of
    the polls in force for all the lights); the others' decisions say, in one step each and in
    words, that the lights' polls are in force."""
    cameras = {f"camera{i}": (f"02:4b:00:00:01:{i:02x}", f"198.18.0.{20 + i}", "camera") for i in range(1, 4)}
    s = supervisor(tmp_path, light1=LIGHT1, light2=LIGHT2, **cameras)
    try:
        s.adapter = adapter_for(s, "light1", "light2")
        writes = []
        set_setting = s.store.set_setting
        s.store.set_setting = lambda key, value: (writes.append(key), set_setting(key, value))[1]
        s.set_postures([(name, "suspicious", None) for name in cameras], "test")
        assert sorted(a["device"] for a in audit(s, "poll")) == ["light1", "light2"]
        assert writes.count("polls") == 1
        steps = poll_steps(s, "camera-suspicious-poll-lights")
        set_ = [s_ for s_ in steps if "target" in s_]
        found = [s_ for s_ in steps if "in_force" in s_]
        assert sorted(s_["target"] for s_ in set_) == ["light1", "light2"]
        assert [s_["in_force"] for s_ in found] == [["light1", "light2"]] * (len(cameras) - 1)
        assert {s_["until"] for s_ in steps} == {s.polls["light1"]["until"]}
        words = [explain.decision_words(d, "", lambda *_: None)
                 for d in s.store.decisions(kind="decision", limit=100)
                 if d["rule"] == "camera-suspicious-poll-lights"]
        assert sum("found 2 devices polled every 1 s already" in w for w in words) == len(cameras) - 1
        assert sum("polls light1 every 1 s" in w for w in words) == 1
    finally:
        s.store.close()


def test_the_interval_changes_at_once_and_reverts_after_for(sup):
    site_rule(sup, "slow-light", "poke", {"device": "light1", "every": "10s", "for": "5m"})
    poke(sup, "poke")
    assert sup.adapter.interval("light1") == 10.0
    assert sup.adapter.interval("light2") == 1.0          # the profile's
    later(sup, minutes=4)
    assert sup.adapter.interval("light1") == 10.0
    later(sup, minutes=1, seconds=1)
    assert sup.adapter.interval("light1") == 1.0          # the light profile's poll_seconds
    assert "light1" not in sup.polls
    assert sup.poll_of("light1") == {"every_seconds": 1.0, "until": None, "rule": None}
    expired = [a for a in audit(sup, "poll") if a["actor"] == "timer"]
    assert [(a["device"], a["details"]["reason"], a["details"]["every_seconds"]) for a in expired] == [
        ("light1", "expired", 1.0)]


def test_a_later_poll_replaces_an_earlier_one(sup):
    site_rule(sup, "a-slow", "poke", {"device": "light1", "every": "10s", "for": "5m"})
    site_rule(sup, "b-slower", "prod", {"device": "light1", "every": "30s"})
    poke(sup, "poke")
    poke(sup, "prod")
    assert sup.adapter.interval("light1") == 30.0 and sup.polls["light1"]["until"] is None
    later(sup, minutes=6)
    assert sup.adapter.interval("light1") == 30.0          # no end: the first one's end is gone


def test_in_one_evaluation_the_higher_priority_keeps_the_device(sup):
    for name, every, priority in (("a-fast", "5s", 10), ("b-slow", "50s", 0)):
        sup.store.put_rule(name, {"name": name, "priority": priority,
                                  "when": {"alert": {"type": "poke"}},
                                  "then": [{"poll": {"device": "light1", "every": every}}]})
    sup.reload_rules()
    poke(sup, "poke")
    assert sup.adapter.interval("light1") == 5.0
    assert poll_steps(sup, "b-slow") == []


def test_a_poll_on_a_device_without_an_adapter_is_refused_and_audited(sup):
    site_rule(sup, "poll-plug", "poke", {"device": "plug1", "every": "5s"})
    poke(sup, "poke")                                       # no crash
    step, = poll_steps(sup, "poll-plug")
    assert step["target"] == "plug1" and "no polling adapter" in step["error"]
    refused, = audit(sup, "poll-refused")
    assert (refused["device"], refused["actor"]) == ("plug1", "rule poll-plug")
    assert "plug1" not in sup.polls and not audit(sup, "poll")


def test_a_device_approved_again_as_a_type_no_adapter_polls_has_its_poll_let_go(sup):
    """A poll found in force is not asked of the adapter again: a light approved again as a
    plug (no [adapter]) loses its poll at once, and the same ask (the same rule, interval and
    end) is then refused and said so, not found in force."""
    site_rule(sup, "poll-light", "poke", {"device": "light1", "every": "5s", "for": "10m"})
    poke(sup, "poke")
    assert "light1" in sup.polls and sup.adapter.interval("light1") == 5.0
    sup.approve("light1", "plug")
    assert "light1" not in sup.polls and "light1" not in sup.store.get_setting("polls")
    step, = sup._set_polls("poll-light", ("light1",), 5, 600)
    assert "no polling adapter" in step["error"]
    words = explain.decision_words({"rule": "poll-light", "actions": [step]}, "", lambda *_: None)
    assert "could not poll light1 (device light1: no polling adapter" in words


def test_without_any_adapter_every_poll_is_refused(sup):
    sup.adapter = None
    site_rule(sup, "poll-light", "poke", {"device": "light1", "every": "5s"})
    poke(sup, "poke")
    step, = poll_steps(sup, "poll-light")
    assert "no polling adapter" in step["error"] and audit(sup, "poll-refused")
    assert sup.polls == {} and sup.poll_of("light1") is None


def test_a_group_target_changes_each_member_with_an_adapter(sup):
    sup.add_device("light3", "02:4b:00:00:00:05", "198.18.0.14", "light", approve=True, group="hall")
    sup.add_device("plug2", "02:4b:00:00:00:06", "198.18.0.15", "plug", approve=True, group="hall")
    sup.adapter = adapter_for(sup, "light1", "light2", "light3")
    site_rule(sup, "hall-fast", "poke", {"device": {"group": "hall"}, "every": "2s", "for": "1h"})
    poke(sup, "poke")
    assert sup.adapter.interval("light3") == 2.0
    assert sup.adapter.interval("light1") == 1.0            # not in the hall
    steps = {s["target"]: s for s in poll_steps(sup, "hall-fast")}
    assert set(steps) == {"light3", "plug2"}
    assert "error" not in steps["light3"] and "no polling adapter" in steps["plug2"]["error"]
    assert [a["device"] for a in audit(sup, "poll-refused")] == ["plug2"]


def test_a_removed_device_s_interval_is_forgotten(sup):
    site_rule(sup, "slow-light", "poke", {"device": "light1", "every": "10s"})
    poke(sup, "poke")
    sup.remove("light1")
    sup._expire_polls()
    assert "light1" not in sup.polls and "light1" not in sup.adapter._intervals


# -- the adapter's loop ---------------------------------------------------------------------

def test_the_adapter_polls_each_device_at_its_own_interval_and_a_change_counts_at_once(sup):
    polled: dict[str, int] = {"light1": 0, "light2": 0}

    async def fake_poll(name):
        polled[name] += 1
        return {}

    async def run():
        adapter = adapter_for(sup, "light1", "light2")
        adapter.poll = fake_poll
        adapter.set_interval("light2", 3600)
        task = asyncio.get_running_loop().create_task(adapter._poll_forever())
        await asyncio.sleep(0.3)
        assert polled == {"light1": 1, "light2": 1}
        adapter.set_interval("light2", 1)       # due within 1 s from now, not in an hour
        await asyncio.sleep(1.7)
        task.cancel()
        return adapter

    adapter = asyncio.run(run())
    assert polled["light1"] >= 2 and polled["light2"] == 2
    assert adapter.interval("light2") == 1.0


def test_polls_in_force_outlive_a_restart_and_expired_ones_do_not(sup, tmp_path):
    site_rule(sup, "slow-light", "poke", {"device": "light1", "every": "10s", "for": "5m"})
    site_rule(sup, "slow-light2", "prod", {"device": "light2", "every": "20s", "for": "1m"})
    poke(sup, "poke")
    poke(sup, "prod")
    until = sup.polls["light1"]["until"]
    sup.store.close()
    again = supervisor(tmp_path)        # the same store: a restarted supervisor
    try:
        again.clock.set((sup.now() + datetime.timedelta(minutes=2)).isoformat())
        again.adapter = adapter_for(again, "light1", "light2")
        assert again.restore_polls() == ["light1"]                  # light2's minute is up
        assert again.adapter.interval("light1") == 10.0 and again.adapter.interval("light2") == 1.0
        assert again.poll_of("light1") == {"every_seconds": 10, "until": until, "rule": "slow-light"}
        again.clock.set((again.now() + datetime.timedelta(minutes=4)).isoformat())
        again._expire_polls()
        assert again.adapter.interval("light1") == 1.0 and again.store.get_setting("polls") == {}
    finally:
        again.store.close()


def test_a_device_that_does_not_answer_is_polled_less_often_until_it_does(sup):
    """An unplugged light was polled at its interval for ever (the lab's 250 lights without
    their HTTP API: 250 failed connections a second on the loop): after each failure the wait
    doubles, to a minute at most; an answer, or a poll interval set by a rule, ends it."""
    adapter = adapter_for(sup, "light1", "light2")
    assert adapter.interval("light1") == 1.0
    assert [adapter.backoff("light1", n) for n in (1, 2, 3, 5, 6, 40)] == [2, 4, 8, 32, 60, 60]
    answers = {"light1": False, "light2": True}
    polled: dict[str, list[float]] = {"light1": [], "light2": []}

    async def fake_poll(name):
        polled[name].append(time.monotonic())
        if not answers[name]:
            raise OSError(111, "Connection refused")
        return {}

    async def run():
        adapter.poll = fake_poll
        task = asyncio.get_running_loop().create_task(adapter._poll_forever())
        await asyncio.sleep(3.5)
        failing, answering = len(polled["light1"]), len(polled["light2"])
        answers["light1"] = True
        adapter.set_interval("light1", 1)          # a rule asks: due within a second
        await asyncio.sleep(2.3)
        task.cancel()
        return failing, answering

    failing, answering = asyncio.run(run())
    assert failing == 2 and answering >= 3          # at 0 s and 2 s; the next at 6 s
    assert len(polled["light1"]) >= 4               # answering again: every second


@pytest.mark.parametrize("at_once", [32, 1])
def test_a_device_that_hangs_holds_no_other_device_s_poll_back(sup, monkeypatch, at_once):
    """light1 answers nothing until its time-out (2 s, as adapters.TIMEOUT): polled one after
    another, light2's poll each second waited behind it. Side by side, light2 keeps its
    interval, and light1 is never polled twice at once; with one poll at a time allowed
    (MAX_POLLS_AT_ONCE), light2 waits again, which shows the bound holds."""
    from appliance.telemetry import adapters
    monkeypatch.setattr(adapters, "MAX_POLLS_AT_ONCE", at_once)
    adapter = adapter_for(sup, "light1", "light2")
    polled: dict[str, list[float]] = {"light1": [], "light2": []}
    open_polls = {"light1": 0, "most": 0}

    async def fake_poll(name):
        polled[name].append(time.monotonic())
        if name == "light1":
            open_polls["light1"] += 1
            open_polls["most"] = max(open_polls["most"], open_polls["light1"])
            try:
                await asyncio.sleep(2.0)
                raise TimeoutError
            finally:
                open_polls["light1"] -= 1
        return {}

    async def run():
        adapter.poll = fake_poll
        task = asyncio.get_running_loop().create_task(adapter._poll_forever())
        await asyncio.sleep(2.6)
        task.cancel()
        await asyncio.sleep(0.05)       # the cancelled loop cancels the poll under way

    asyncio.run(run())
    if at_once == 1:
        assert len(polled["light2"]) <= 2
        return
    assert len(polled["light2"]) >= 3           # at 0, 1 and 2 s
    assert len(polled["light1"]) == 1 and open_polls["most"] == 1
    assert open_polls["light1"] == 0            # nothing left running after close


def test_a_device_removed_before_its_poll_runs_is_let_go(sup):
    """A poll is started as a task and runs at the loop's next turn: the device may be gone by
    then. Its poll ends quietly, with nothing reported and no failure counted."""
    adapter = adapter_for(sup, "light1", "light2")
    known = dict(sup.known)
    adapter._devices = lambda: known
    del known["light1"]
    asyncio.run(adapter._poll_one("light1"))
    assert adapter._failures == {} and adapter._available == {}


@pytest.mark.parametrize("answer, says", [({"2": {"state": {"on": True, "bri": 254}}}, "no '1'"),
                                          ({"1": "on"}, "string indices")])
def test_an_answer_of_the_wrong_shape_marks_the_device_offline_and_names_it(sup, monkeypatch,
                                                                             caplog, answer, says):
    """A light whose API answers something else than a Hue light: before, its KeyError or
    TypeError ended the adapter's whole loop (every light unpolled from then on)."""
    from appliance.telemetry import adapters

    async def fake_http(method, ip, path, body=None, port=80):
        return answer

    monkeypatch.setattr(adapters, "http", fake_http)
    adapter = adapter_for(sup, "light1", "light2")
    asyncio.run(adapter._poll_one("light1"))
    assert adapter._failures == {"light1": 1} and adapter._available == {"light1": "offline"}
    assert any("polling light1" in r.getMessage() and says in r.getMessage() for r in caplog.records)


def test_a_stimulus_and_the_decisions_it_sets_off_are_timed_as_one_and_a_slow_one_named(
        sup, monkeypatch):
    """An alert puts camera1 suspicious; its posture change sets off the camera profile's
    rule, which polls the lights: one evaluation on the loop, timed whole and named by the
    alert (status: evaluations), not one per decision. A clock that moves 5 ms per reading
    makes it slow."""
    from appliance.supervisor import core
    ticks = iter(range(10**9))
    monkeypatch.setattr(core.time, "perf_counter_ns", lambda: next(ticks) * 5_000_000)
    then = [{"set_posture": {"device": "self", "posture": "suspicious"}}]
    sup.store.put_rule("poke-suspicious", {"name": "poke-suspicious", "when": {"alert": {"type": "poke"}},
                                           "then": then})
    sup.reload_rules()
    before = sup.evaluations.count
    poke(sup, "poke")
    assert poll_steps(sup, "camera-suspicious-poll-lights")     # the nested decision ran
    assert sup.evaluations.count == before + 1
    slow = sup.evaluations.status()["slow"][-1]
    assert (slow["stimulus"], slow["device"]) == ("alert", "camera1") and slow["ms"] >= 2
    assert sup.evaluations.status()["slowest"]["ms"] >= slow["ms"]


def test_a_quick_evaluation_is_counted_and_not_kept(sup, monkeypatch):
    from appliance.supervisor import core
    monkeypatch.setattr(core.time, "perf_counter_ns", lambda: 7)     # no time passes
    before = sup.evaluations.status()
    poke(sup, "nothing-watches-this")
    after = sup.evaluations.status()
    assert after["count"] == before["count"] + 1 and after["slow"] == before["slow"]


def test_polls_ending_together_are_written_once(sup):
    """The lights one motion set polling end in the same tick: the polls in force are written
    once for all of them, each still audited and back at its profile's interval."""
    site_rule(sup, "poll-lights", "poke", {"device": {"type": "light"}, "every": "5s", "for": "10m"})
    poke(sup, "poke")
    assert set(sup.polls) == {"light1", "light2"}
    writes = []
    set_setting = sup.store.set_setting
    sup.store.set_setting = lambda key, value: (writes.append(key), set_setting(key, value))[1]
    later(sup, minutes=11)
    assert sup.polls == {} and writes.count("polls") == 1
    assert sorted(a["device"] for a in audit(sup, "poll") if a["details"].get("reason") == "expired") == [
        "light1", "light2"]
    assert sup.adapter.interval("light1") == sup.adapter.interval("light2") != 5.0
