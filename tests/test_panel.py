"""The LEDs and the button (appliance/faces/panel.py) on gpiozero's mock pins, with a fake supervisor
that has the supervisor's panel hooks and a real store, a real asyncio loop in a thread (the
supervisor's loop) and a fake monotonic clock for hold times: no sleeping 15 s, no root. One
lab test presses the lab supervisor's mock button through the control socket."""
import asyncio
import datetime
import subprocess
import sys
import threading
import time

import pytest
from gpiozero import LED, Button
from gpiozero.pins.mock import MockFactory
from labutil import wait_until

from appliance import client
from appliance.config import Config
from appliance.faces.panel import PATTERNS, Panel, action_for, readme_table
from appliance.store.state import Store


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


class FakeOps:
    """What the panel uses of appliance.supervisor.ops.Ops, with the same effects on a real store."""

    def __init__(self, tmp_path, loop, clock):
        self.cfg = Config()
        self.loop = loop
        self.clock = clock
        self.store = Store(tmp_path / "state")
        self.known = {"camera1": {"name": "camera1", "posture": "normal", "approved": True},
                      "plug1": {"name": "plug1", "posture": "normal", "approved": True}}
        self.posture_summary = "normal"
        self.claim_until = None
        self.calls = []
        self.auth_epoch = 0
        self.stuck_since = None
        self.site_error = None
        self._listeners = set()

    def audit(self, kind, actor, details):
        self.store.audit(kind, actor, details)

    @property
    def heartbeat(self):    # a ticking loop, until the test makes it stick
        return self.stuck_since if self.stuck_since is not None else self.clock()

    def subscribe(self):
        q = asyncio.Queue(maxsize=1000)
        self._listeners.add(q)
        return q

    def unsubscribe(self, q):
        self._listeners.discard(q)

    def notify(self, event):
        assert threading.current_thread() is self.loop_thread, "notify off the loop"
        for q in list(self._listeners):
            q.put_nowait(event)

    def summary(self):
        return self.posture_summary

    def set_summary(self, value):
        self.posture_summary = value
        self.notify({"kind": "posture"})

    def open_claim_window(self, minutes=5, actor="button"):
        self.calls.append("claim")
        self.claim_until = (datetime.datetime.now(datetime.UTC)
                            + datetime.timedelta(minutes=minutes))
        self.store.audit("claim-window", actor, {"until": self.claim_until.isoformat()})
        self.notify({"kind": "panel", "event": "claim-window"})

    def claim_open(self):
        return (self.claim_until is not None
                and datetime.datetime.now(datetime.UTC) < self.claim_until)

    def reset_admin(self, actor="button"):
        self.calls.append("admin-reset")
        self.store.set_setting("admin", None)
        self.auth_epoch += 1
        self.store.audit("admin-reset", actor, {})
        self.notify({"kind": "panel", "event": "admin-reset"})

    def factory_reset(self, actor="button"):
        self.calls.append("factory-reset")
        self.known.clear()
        self.auth_epoch += 1
        self.store.audit("factory-reset", actor, {})
        self.notify({"kind": "panel", "event": "factory-reset"})


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    loop.thread = thread
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def sup(tmp_path, loop, clock):
    s = FakeOps(tmp_path, loop, clock)
    s.loop_thread = loop.thread
    yield s
    s.store.close()


@pytest.fixture
def factory():
    f = MockFactory()
    yield f
    f.close()


@pytest.fixture
def panel(sup, factory, clock):
    p = Panel(sup, pin_factory=factory, clock=clock, watch_every=None)
    assert wait_until(lambda: p.pattern == "normal", 3)
    yield p
    p.close()


def on_loop(sup, fn, *args):
    async def call():
        return fn(*args)
    return asyncio.run_coroutine_threadsafe(call(), sup.loop).result(3)


def lit(panel):
    return {c for c, led in panel.leds.items() if led.is_lit}


def blinks(led, within=2.5):
    """The LED was seen both lit and dark."""
    seen = set()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and len(seen) < 2:
        seen.add(bool(led.is_lit))
        time.sleep(0.005)
    return seen == {True, False}


def steady(led, lit=True, for_s=0.3):
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        if bool(led.is_lit) != lit:
            return False
        time.sleep(0.01)
    return True


def hold(panel, clock, seconds, step=0.5, during=None):
    """Holds the mock button for `seconds` of the fake clock, with the panel noticing every
    `step` (what the watchdog thread does every 0.1 s); `during(held)` is called at each step.
    Returns the patterns shown while held."""
    pin = panel.button.pin
    pin.drive_low()
    shown = [panel.pattern]
    held = 0.0
    while held < seconds:
        d = min(step, seconds - held)
        clock.advance(d)
        held += d
        shown.append(panel.refresh())
        if during:
            during(round(held, 2))
    pin.drive_high()
    return shown


def button_audits(sup):
    return [a["details"] for a in sup.store.decisions(kind="audit") if a["event"] == "button"]


def settled(sup, n):
    """The loop has carried out the n-th button action: its audit entry is there (the first
    thing the action does), and then the loop has run one more callback (so the action, one
    callback on the loop, has finished)."""
    if not wait_until(lambda: len(button_audits(sup)) >= n, 3):
        return False
    on_loop(sup, lambda: None)
    return True


# -- the button's thresholds -------------------------------------------------------------------
def test_a_short_press_opens_the_claim_window_and_is_audited(panel, sup, clock):
    hold(panel, clock, 0.3)
    assert settled(sup, 1)
    assert button_audits(sup) == [{"held_s": 0.3, "action": "claim-window"}]
    assert sup.calls == ["claim"] and sup.claim_open()
    assert wait_until(lambda: panel.pattern == "claim", 3)
    assert blinks(panel.green)
    assert not panel.amber.is_lit and not panel.red.is_lit


def test_release_at_4_9_s_only_opens_the_claim_window(panel, sup, clock):
    shown = hold(panel, clock, 4.9, step=0.7)
    assert "countdown" not in shown and "factory-reset" not in shown
    assert settled(sup, 1)
    assert button_audits(sup) == [{"held_s": 4.9, "action": "claim-window"}]
    assert sup.calls == ["claim"]
    assert sup.auth_epoch == 0


def test_held_5_s_resets_the_admin_and_keeps_the_devices(panel, sup, clock):
    devices = {k: dict(v) for k, v in sup.known.items()}
    sup.store.set_setting("admin", {"user": "admin", "password_sha256": "0" * 64})
    seen = {}

    def look(held):
        seen[held] = (panel.pattern, lit(panel))

    hold(panel, clock, 5.0, step=0.5, during=look)
    assert seen[4.5][0] == "normal" and seen[4.5][1] == {"green"}   # nothing yet at 4.5 s
    assert seen[5.0][0] == "countdown"                               # at 5 s: it shows
    assert settled(sup, 1)
    assert button_audits(sup) == [{"held_s": 5.0, "action": "admin-reset"}]
    assert sup.calls == ["admin-reset"] and sup.auth_epoch == 1
    assert sup.store.get_setting("admin") is None
    assert sup.known == devices                                      # inventory and protection stay
    assert wait_until(lambda: panel.pattern == "normal", 3)
    assert lit(panel) == {"green"}


def test_release_at_10_s_only_resets_the_admin(panel, sup, clock):
    hold(panel, clock, 10.0)
    assert settled(sup, 1)
    assert button_audits(sup) == [{"held_s": 10.0, "action": "admin-reset"}]
    assert sup.calls == ["admin-reset"]
    assert not sup.claim_open() and sup.known


def test_held_15_s_is_a_factory_reset_and_the_leds_count_down(panel, sup, clock):
    seen = {}

    def look(held):
        if held in (5.0, 14.5, 15.0):
            seen[held] = panel.pattern
            if held == 5.0:    # amber steady, red fast: the countdown toward 15 s
                assert steady(panel.amber) and blinks(panel.red, within=0.6)
                assert not panel.green.is_lit
            if held == 15.0:   # all three steady
                assert all(steady(led) for led in panel.leds.values())

    hold(panel, clock, 15.0, during=look)
    assert seen == {5.0: "countdown", 14.5: "countdown", 15.0: "factory-reset"}
    assert settled(sup, 1)
    assert button_audits(sup) == [{"held_s": 15.0, "action": "factory-reset"}]
    assert sup.calls == ["factory-reset"]                   # not an admin reset on the way
    assert sup.known == {}


def test_every_press_is_audited(panel, sup, clock):
    for seconds in (0.2, 6.0, 0.5, 16.0):
        hold(panel, clock, seconds)
    assert settled(sup, 4)
    assert [a["action"] for a in reversed(button_audits(sup))] == [
        "claim-window", "admin-reset", "claim-window", "factory-reset"]
    assert [action_for(s) for s in (0, 4.99, 5, 14.99, 15, 100)] == [
        "claim-window", "claim-window", "admin-reset", "admin-reset", "factory-reset",
        "factory-reset"]


def test_the_watchdog_thread_shows_the_thresholds_as_they_pass(sup, factory, clock):
    p = Panel(sup, pin_factory=factory, clock=clock, watch_every=0.02)
    try:
        assert wait_until(lambda: p.pattern == "normal", 3)
        p.button.pin.drive_low()
        clock.advance(5.1)
        assert wait_until(lambda: p.pattern == "countdown", 2)     # nobody called refresh()
        assert p.state()["button"] == {"pressed": True, "held_s": 5.1, "on_release": "admin-reset"}
        clock.advance(10)
        assert wait_until(lambda: p.pattern == "factory-reset", 2)
        p.button.pin.drive_high()
        assert settled(sup, 1) and sup.calls == ["factory-reset"]
    finally:
        p.close()


# -- the patterns ------------------------------------------------------------------------------
@pytest.mark.parametrize("summary,led", [("normal", "green"), ("warning", "amber"),
                                         ("alert", "red")])
def test_the_posture_leds_follow_the_summary(panel, sup, summary, led):
    on_loop(sup, sup.set_summary, summary)
    assert wait_until(lambda: panel.pattern == summary, 3)
    assert lit(panel) == {led} and steady(panel.leds[led])
    assert panel.leds[led].pin.state == 1        # the pin itself, not only gpiozero's view
    assert panel.state()["leds"][led] == {"lit": True, "mode": "steady"}


def test_the_summary_is_read_at_least_every_second_without_events(panel, sup):
    sup.posture_summary = "alert"                # no notify(): the periodic evaluation finds it
    assert wait_until(lambda: panel.pattern == "alert", 2.5)


def test_booting_until_the_supervisor_has_evaluated(sup, factory, clock):
    gate = threading.Event()
    sup.loop.call_soon_threadsafe(gate.wait, 5)  # the loop is still busy starting
    p = Panel(sup, pin_factory=factory, clock=clock, watch_every=None)
    try:
        assert p.pattern == "booting" and p.is_booting
        assert blinks(p.amber) and not p.green.is_lit and not p.red.is_lit
        gate.set()
        assert wait_until(lambda: p.pattern == "normal", 3)
        assert lit(p) == {"green"}
    finally:
        gate.set()
        p.close()


def test_claim_window_blinks_green_and_keeps_showing_an_alert(panel, sup):
    on_loop(sup, sup.set_summary, "alert")
    on_loop(sup, sup.open_claim_window, 5, "test")
    assert wait_until(lambda: panel.pattern == "claim", 3)
    assert blinks(panel.green) and steady(panel.red) and not panel.amber.is_lit
    sup.claim_until = datetime.datetime.now(datetime.UTC)      # the window closes
    assert wait_until(lambda: panel.pattern == "alert", 2.5)
    assert lit(panel) == {"red"} and steady(panel.red)


def test_a_stuck_loop_shows_the_fault_pattern(panel, sup, clock):
    sup.stuck_since = clock()
    clock.advance(2.9)
    assert panel.refresh() == "normal"           # 2.9 s is not yet a fault
    clock.advance(0.2)
    assert panel.refresh() == "fault" and panel.is_fault
    assert not panel.green.is_lit
    samples = []
    deadline = time.monotonic() + 1.3
    while time.monotonic() < deadline:
        samples.append((panel.red.is_lit, panel.amber.is_lit))
        time.sleep(0.01)
    assert (True, False) in samples and (False, True) in samples     # in turn
    opposite = sum(1 for r, a in samples if r != a)
    assert opposite >= 0.85 * len(samples)
    sup.stuck_since = None                       # it ticks again
    assert panel.refresh() == "normal" and lit(panel) == {"green"}


def test_the_watchdog_thread_notices_a_stuck_loop_by_itself(sup, factory, clock):
    p = Panel(sup, pin_factory=factory, clock=clock, watch_every=0.02)
    try:
        assert wait_until(lambda: p.pattern == "normal", 3)
        sup.stuck_since = clock()
        clock.advance(3.5)
        assert wait_until(lambda: p.pattern == "fault", 2)
        sup.stuck_since = None
        assert wait_until(lambda: p.pattern == "normal", 2)
    finally:
        p.close()


def test_close_is_idempotent_and_releases_the_pins(sup, factory, clock):
    p = Panel(sup, pin_factory=factory, clock=clock, watch_every=0.02)
    assert wait_until(lambda: p.pattern == "normal", 3)
    leds = dict(p.leds)
    p.close()
    p.close()
    assert p.pattern == "off"
    assert all(led.closed for led in leds.values()) and p.button.closed
    for pin in (17, 27, 22):                     # free for someone else
        LED(pin, pin_factory=factory).close()
    Button(3, pin_factory=factory).close()
    assert wait_until(lambda: not sup._listeners, 2)


def test_the_pattern_table_has_words_for_every_pattern():
    for name in ("normal", "warning", "alert", "booting", "claim", "countdown", "factory-reset",
                 "fault"):
        assert set(PATTERNS[name]) == {"leds", "meaning", "action"}
        assert all(PATTERNS[name].values())
    table = readme_table()
    assert table.count("\n") == len(PATTERNS) + 1 and "`countdown`" in table


def test_simulated_press_runs_in_the_background(sup, factory):
    p = Panel(sup, pin_factory=factory, watch_every=0.02)     # the real clock
    try:
        assert wait_until(lambda: p.pattern == "normal", 3)
        started = time.monotonic()
        answer = p.simulate("press")
        assert time.monotonic() - started < 0.1
        assert answer == {"button": "press", "seconds": 0.2, "on_release": "claim-window"}
        with pytest.raises(Exception, match="held already"):
            p.simulate("press")
        assert settled(sup, 1) and sup.calls == ["claim"]
        with pytest.raises(Exception, match="seconds"):
            p.simulate("hold")
    finally:
        p.close()


# -- in the lab --------------------------------------------------------------------------------
@pytest.mark.lab
def test_the_lab_button_opens_the_claim_window(run_suffix):
    from lab import topology
    name = f"p{run_suffix}panel"
    lab = topology.up(name, devices=2, services=False, supervisor=True)
    try:
        sock = lab.gateway["socket"]
        assert wait_until(lambda: client.request(sock, "panel")["pattern"] == "normal", 5)
        assert client.request(sock, "panel")["claim_open"] is False
        out = subprocess.run([sys.executable, "-m", "appliance.cli", "--lab", name, "button",
                              "press"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert wait_until(lambda: client.request(sock, "panel")["claim_open"], 5)
        shown = client.request(sock, "panel")
        assert wait_until(lambda: client.request(sock, "panel")["pattern"] == "claim", 3)
        assert shown["enabled"] and shown["claim_until"]
        audit = [a for a in client.request(sock, "decisions", limit=20)
                 if a.get("kind") == "audit" and a.get("event") == "button"]
        assert audit and audit[0]["details"]["action"] == "claim-window"
        # a 5 s hold: the loop keeps answering while the mock finger holds the button
        client.request(sock, "button", action="hold", seconds=5.3)
        started = time.monotonic()
        client.request(sock, "status")
        assert time.monotonic() - started < 1
        assert wait_until(lambda: client.request(sock, "panel")["pattern"] == "countdown", 7)
        assert wait_until(lambda: any(
            a.get("event") == "admin-reset" for a in client.request(sock, "decisions", limit=20)), 5)
        assert len(client.request(sock, "devices")) == 2          # the devices stay
        bad = subprocess.run([sys.executable, "-m", "appliance.cli", "--lab", name, "button",
                              "hold", "0"], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and "seconds" in bad.stderr
    finally:
        topology.down(name)


def test_a_site_settings_error_has_its_own_pattern(panel, sup):
    sup.site_error = "kalki.toml: wifi.passphrase: 8 to 63 characters"
    assert panel.refresh() == "site-error"
    assert "kalki.toml" in panel.state()["meaning"]
    sup.site_error = None
    assert panel.refresh() == "normal"
