"""The appliance's face: three LEDs (green, amber, red) and one button, through gpiozero.

The LEDs show the posture summary (`Supervisor.summary()`), the claim window, the button's
thresholds while it is held, and a supervisor whose loop has stopped ticking. The button opens
the claim window (short press), resets the admin password (held 5 s) or the whole appliance
(held 15 s); what happens is decided by the threshold reached when it is released.

Threads: gpiozero calls the button handlers in its own threads, the watchdog is a thread of its
own (a stuck loop cannot notice that it is stuck), and the posture is read by a task on the
supervisor's loop. Every action goes to the loop with `call_soon_threadsafe`: the supervisor is
the only owner of the store. The LEDs themselves are driven under one lock from whichever
thread changes what they should show.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Protocol

log = logging.getLogger("kalki.panel")

ADMIN_RESET_AFTER = 5.0      # seconds held: release resets the admin password and sessions
FACTORY_RESET_AFTER = 15.0   # seconds held: release resets the appliance to factory defaults
FAULT_AFTER = 3.0            # seconds without a supervisor heartbeat: the loop is stuck
CLAIM_MINUTES = 5
EVALUATE_EVERY = 1.0         # the posture is read at least this often, besides on events
WATCH_EVERY = 0.1            # the watchdog's and the button thresholds' resolution

# LED modes: "on", or a blink (seconds on, seconds off); "alternate" is the opposite of red.
SLOW, BLINK, FAST = (0.8, 0.8), (0.5, 0.5), (0.1, 0.1)
ALTERNATE = "alternate"

# What the technician sees, what it means and what to do: the words the web page and the
# docs/leds.md show too. Ordered as a technician would look them up.
PATTERNS: dict[str, dict[str, str]] = {
    "normal": {
        "leds": "green steady",
        "meaning": "Every device is protected in its normal posture.",
        "action": "Nothing to do.",
    },
    "warning": {
        "leds": "amber steady",
        "meaning": "A device is suspicious (for example motion after hours with the lights "
                   "off), or a new device is waiting for approval and is kept closed until then, "
                   "or the devices may reach each other directly because nothing isolates them "
                   "on the devices side (the web page's isolation warning says why).",
        "action": "Open the web page: approve or remove the new device, read the alert, or fix "
                  "the isolation as its warning says.",
    },
    "alert": {
        "leds": "red steady",
        "meaning": "A device is under attack or in quarantine; its traffic is cut down to what "
                   "its profile allows in that posture.",
        "action": "Open the web page and read the alerts; fix or replace the device, then reset "
                  "its posture there.",
    },
    "claim": {
        "leds": "green blinking (amber or red stay lit if a device needs attention)",
        "meaning": "The claim window is open for 5 minutes after a short press: the web "
                   "page's claim page accepts a new admin password (one claim per press).",
        "action": "Open the web page and set the admin password now; if the window has "
                  "closed, press the button again.",
    },
    "countdown": {
        "leds": "amber steady, red blinking fast",
        "meaning": "The button has been held for 5 seconds. Released now, it resets the admin "
                   "password and signs everyone out; devices and their protection stay.",
        "action": "Release now for an admin password reset, or keep holding to 15 seconds for "
                  "a factory reset.",
    },
    "factory-reset": {
        "leds": "green, amber and red steady",
        "meaning": "The button has been held for 15 seconds. Released, it erases the settings, "
                   "rules and the device list; every device is blocked until approved again.",
        "action": "Release to reset to factory defaults. To cancel, unplug the power before "
                  "releasing the button.",
    },
    "booting": {
        "leds": "amber blinking slowly",
        "meaning": "The supervisor is starting and has not shown a posture yet.",
        "action": "Wait about a minute. If it never stops blinking, unplug the power and plug "
                  "it in again.",
    },
    "fault": {
        "leds": "red and amber blinking in turn",
        "meaning": "The supervisor has stopped responding (no heartbeat for 3 seconds). The "
                   "kernel keeps enforcing the last postures, but nothing new is detected, "
                   "decided or shown.",
        "action": "Wait a minute; if it does not go back to a posture colour, unplug the power "
                  "and plug it in again. If it comes back, report it with the appliance's logs.",
    },
    "site-error": {
        "leds": "red blinking fast",
        "meaning": "The site settings file (kalki.toml on the SD card) has an error; the "
                   "devices side stays closed (no Wi-Fi, no DHCP, nothing forwarded).",
        "action": "Open the web page (it names the error), or take out the card, correct "
                  "kalki.toml on its first partition and boot again.",
    },
    "off": {
        "leds": "all dark",
        "meaning": "No power, or the supervisor is not running.",
        "action": "Check the power supply; then unplug and plug it in again.",
    },
}

# Which LED does what in each pattern ("claim" adds the posture's amber or red, see _modes).
_MODES: dict[str, dict[str, object]] = {
    "normal": {"green": "on"},
    "warning": {"amber": "on"},
    "alert": {"red": "on"},
    "claim": {"green": BLINK},
    "countdown": {"amber": "on", "red": FAST},
    "factory-reset": {"green": "on", "amber": "on", "red": "on"},
    "booting": {"amber": SLOW},
    "fault": {"red": BLINK, "amber": ALTERNATE},
    "site-error": {"red": FAST},
    "off": {},
}

BUTTON_ACTIONS = {"claim-window": "open the claim window", "admin-reset": "reset the admin "
                  "password and sessions", "factory-reset": "reset to factory defaults"}


def action_for(held_s: float) -> str:
    """What a press of this length means when the button is released."""
    if held_s >= FACTORY_RESET_AFTER:
        return "factory-reset"
    if held_s >= ADMIN_RESET_AFTER:
        return "admin-reset"
    return "claim-window"


def readme_table() -> str:
    """The LED table as Markdown, for docs/leds.md and the web page."""
    rows = ["| LEDs | pattern | what it means | what to do |", "|---|---|---|---|"]
    for name, p in PATTERNS.items():
        rows.append(f"| {p['leds']} | `{name}` | {p['meaning']} | {p['action']} |")
    return "\n".join(rows)



class PanelOps(Protocol):
    """What the panel uses of the ops (appliance.supervisor.ops.Ops): the seam its tests fake."""
    @property
    def cfg(self) -> Any: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...
    @property
    def heartbeat(self) -> float: ...
    @property
    def site_error(self) -> str | None: ...

    def summary(self) -> str: ...
    def claim_open(self) -> bool: ...
    def subscribe(self) -> asyncio.Queue: ...
    def unsubscribe(self, q: asyncio.Queue) -> None: ...
    def notify(self, event: dict) -> None: ...
    def audit(self, kind: str, actor: str, details: dict) -> None: ...
    def open_claim_window(self, minutes: int = 5, actor: str = "button") -> None: ...
    def reset_admin(self, actor: str = "button") -> None: ...
    def factory_reset(self, actor: str = "button") -> None: ...

class Panel:
    """The LEDs and the button of one supervisor.

    `pin_factory`: a gpiozero pin factory (tests pass a MockFactory); by default a MockFactory
    when `[panel] mock_pins` is set, else gpiozero's default (real GPIO). `clock`: the
    monotonic clock for hold durations and the heartbeat, the same clock as
    `ops.heartbeat` (tests pass a fake one). `watch_every`: the watchdog thread's period, or
    None for no thread (tests then call `refresh()` themselves)."""

    def __init__(self, ops: PanelOps, pin_factory=None, clock=time.monotonic,
                 watch_every: float | None = WATCH_EVERY, evaluate_every: float = EVALUATE_EVERY):
        from gpiozero import LED, Button
        cfg = ops.cfg.panel
        self.ops = ops
        self._clock = clock
        self._own_factory = False
        if pin_factory is None and cfg.mock_pins:
            from gpiozero.pins.mock import MockFactory
            pin_factory = MockFactory()
            self._own_factory = True
        self.mock = cfg.mock_pins or type(pin_factory).__name__.startswith("Mock")
        self._factory = pin_factory
        self._lock = threading.RLock()
        self._closed = False
        self._posture: str | None = None     # None until the first evaluation: booting
        self._claim = False
        self._fault = False
        self._pressed_at: float | None = None
        self._stage = "claim-window"         # the threshold the held button has reached
        self._pattern = "off"
        self._modes: dict[str, object] = {}
        self._shown: tuple | None = None
        self._started = clock()
        self._pressing: threading.Thread | None = None
        self._stop = threading.Event()
        self.leds = {}
        self.button = None
        try:
            for colour, pin in (("green", cfg.led_green), ("amber", cfg.led_amber),
                                ("red", cfg.led_red)):
                self.leds[colour] = LED(pin, pin_factory=pin_factory)
            self.button = Button(cfg.button, pull_up=True, bounce_time=None if self.mock else 0.05,
                                 pin_factory=pin_factory)
        except Exception:
            self._release_pins()
            raise
        self.button.when_pressed = self._on_pressed
        self.button.when_released = self._on_released
        self.refresh()                       # "booting" until the loop has evaluated
        self._queue: asyncio.Queue | None = None
        self._task = None
        if ops.loop is not None:
            self._task = asyncio.run_coroutine_threadsafe(self._watch_postures(evaluate_every),
                                                          ops.loop)
        self._watchdog = None
        if watch_every:
            self._watchdog = threading.Thread(target=self._watch, args=(watch_every,),
                                              name="kalki-panel-watchdog", daemon=True)
            self._watchdog.start()

    # -- what the LEDs show ---------------------------------------------------------------
    @property
    def green(self):
        return self.leds["green"]

    @property
    def amber(self):
        return self.leds["amber"]

    @property
    def red(self):
        return self.leds["red"]

    @property
    def pattern(self) -> str:
        """The name of what the LEDs show now (a key of PATTERNS)."""
        return self._pattern

    @property
    def meaning(self) -> str:
        return PATTERNS[self._pattern]["meaning"]

    @property
    def is_booting(self) -> bool:
        return self._pattern == "booting"

    @property
    def is_fault(self) -> bool:
        return self._pattern == "fault"

    @property
    def is_claim_shown(self) -> bool:
        return self._pattern == "claim"

    @property
    def is_counting_down(self) -> bool:
        return self._pattern in ("countdown", "factory-reset")

    @property
    def button_is_pressed(self) -> bool:
        return self._pressed_at is not None

    @property
    def held_seconds(self) -> float:
        at = self._pressed_at
        return 0.0 if at is None else max(0.0, self._clock() - at)

    def state(self) -> dict:
        """For the control socket and the web page: the pattern, its words, each LED."""
        with self._lock:
            modes = dict(self._modes)
            leds = {c: {"lit": bool(led.is_lit) if not self._closed else False,
                        "mode": _mode_word(modes.get(c))} for c, led in self.leds.items()}
            words = PATTERNS[self._pattern]
            return {"pattern": self._pattern, "shows": words["leds"], "meaning": words["meaning"],
                    "action": words["action"], "leds": leds,
                    "posture": self._posture, "claim": self._claim, "fault": self._fault,
                    "button": {"pressed": self._pressed_at is not None,
                               "held_s": round(self.held_seconds, 1),
                               "on_release": self._stage if self._pressed_at is not None else None},
                    "mock_pins": self.mock}

    def _wanted(self) -> tuple[str, dict]:
        if self._closed:
            return "off", {}
        if self._pressed_at is not None and self._stage != "claim-window":
            name = "countdown" if self._stage == "admin-reset" else "factory-reset"
        elif self._fault:
            name = "fault"
        elif self.ops.site_error:
            name = "site-error"
        elif self._posture is None:
            name = "booting"
        elif self._claim:
            name = "claim"
        else:
            name = self._posture
        modes = dict(_MODES[name])
        if name == "claim" and self._posture in ("warning", "alert"):
            modes["amber" if self._posture == "warning" else "red"] = "on"
        return name, modes

    def refresh(self) -> str:
        """Re-reads the button's hold time and the heartbeat, and updates the LEDs if what
        they should show changed. Returns the pattern. Thread-safe; the watchdog calls it."""
        with self._lock:
            if self._closed:
                return self._pattern
            now = self._clock()
            heartbeat = max(self.ops.heartbeat, self._started)
            fault = now - heartbeat > FAULT_AFTER
            if fault != self._fault:
                self._fault = fault
                if fault:
                    log.error("the supervisor's loop has not ticked for %.1f s", now - heartbeat)
                else:
                    log.warning("the supervisor's loop ticks again")
            if self._pressed_at is not None:
                stage = action_for(now - self._pressed_at)
                if stage != self._stage:
                    self._stage = stage
                    log.info("button held %.1f s: release now to %s", now - self._pressed_at,
                             BUTTON_ACTIONS[stage])
                    self._to_loop(self.ops.notify, {"kind": "panel", "event": "button-held",
                                                    "on_release": stage})
            name, modes = self._wanted()
            shown = (name, tuple(sorted((k, str(v)) for k, v in modes.items())))
            if shown != self._shown:
                self._show(modes)
                self._shown, self._pattern, self._modes = shown, name, modes
            return self._pattern

    def _show(self, modes: dict) -> None:
        for led in self.leds.values():
            led.source = None
            led.off()
        for colour, mode in modes.items():
            led = self.leds[colour]
            if mode == "on":
                led.on()
            elif isinstance(mode, tuple):
                led.blink(on_time=mode[0], off_time=mode[1])
        for colour, mode in modes.items():
            if mode == ALTERNATE:     # phase-locked to red: lit whenever red is dark
                from gpiozero.tools import negated
                self.leds[colour].source_delay = 0.02
                self.leds[colour].source = negated(self.red)

    # -- the posture, from the loop ---------------------------------------------------------
    async def _watch_postures(self, every: float) -> None:
        q = self.ops.subscribe()
        self._queue = q
        try:
            while not self._closed:
                self._evaluate()
                try:
                    await asyncio.wait_for(q.get(), every)
                except TimeoutError:
                    pass
                while not q.empty():      # a burst of events: one evaluation
                    q.get_nowait()
        finally:
            self.ops.unsubscribe(q)

    def _evaluate(self) -> None:
        """On the loop: the posture summary and the claim window, then the LEDs."""
        try:
            summary, claim = self.ops.summary(), bool(self.ops.claim_open())
        except Exception:
            log.exception("panel: reading the posture summary failed")
            return
        with self._lock:
            self._posture, self._claim = summary, claim
            self.refresh()

    def _watch(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.refresh()
            except Exception:     # the watchdog must outlive one bad refresh
                log.exception("panel: refreshing the LEDs failed")

    # -- the button -----------------------------------------------------------------------
    def _on_pressed(self) -> None:
        with self._lock:
            if self._closed or self._pressed_at is not None:
                return
            self._pressed_at = self._clock()
            self._stage = "claim-window"
        self._to_loop(self.ops.notify, {"kind": "panel", "event": "button-down"})
        self.refresh()

    def _on_released(self) -> None:
        with self._lock:
            if self._pressed_at is None:
                return
            held = self._clock() - self._pressed_at
            self._pressed_at = None
            self._stage = "claim-window"
            action = action_for(held)
            self.refresh()
        log.info("button released after %.1f s: %s", held, BUTTON_ACTIONS[action])
        self._to_loop(self._act, round(held, 2), action)

    def _act(self, held_s: float, action: str) -> None:
        """On the loop: the audit entry, then what the press means."""
        ops = self.ops
        try:
            ops.audit("button", "technician", {"held_s": held_s, "action": action})
            if action == "claim-window":
                ops.open_claim_window(minutes=CLAIM_MINUTES, actor="button")
            elif action == "admin-reset":
                ops.reset_admin(actor="button")
            else:
                ops.factory_reset(actor="button")
        except Exception:
            log.exception("button: %s failed", action)
        self._evaluate()

    def _to_loop(self, fn, *args) -> None:
        loop = self.ops.loop
        if loop is None or loop.is_closed():
            log.warning("panel: no running supervisor loop for %s", getattr(fn, "__name__", fn))
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:      # the loop closed meanwhile
            pass

    # -- the lab's finger on the button -----------------------------------------------------
    def simulate(self, action: str, seconds: float | None = None) -> dict:
        """Presses the mock button in a background thread (the caller, the loop, is not
        blocked): "press" for `seconds` (0.2), "hold" for `seconds`. Mock pins only."""
        from appliance.errors import ConfigError
        if not self.mock:
            raise ConfigError("button: only with mock pins ([panel] mock_pins, the lab); "
                              "press the real button")
        if action not in ("press", "hold"):
            raise ConfigError(f"button: action is press or hold, got {action!r}")
        if seconds is None:
            if action == "hold":
                raise ConfigError("button hold: how many seconds?")
            seconds = 0.2
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not 0 < seconds <= 60:
            raise ConfigError(f"button: seconds must be more than 0 and at most 60, got {seconds!r}")
        with self._lock:
            if self._closed:
                raise ConfigError("button: the panel is closed")
            if self._pressing is not None and self._pressing.is_alive():
                raise ConfigError("button: it is being held already")
            button = self.button
            assert button is not None, "panel: the button is made in __init__, which failed"
            pin = button.pin

            def finger():
                pin.drive_low()
                self._stop.wait(seconds)
                with self._lock:
                    if not self._closed:
                        pin.drive_high()

            self._pressing = threading.Thread(target=finger, name="kalki-panel-finger", daemon=True)
            self._pressing.start()
        return {"button": action, "seconds": seconds, "on_release": action_for(seconds)}

    # -- the end --------------------------------------------------------------------------
    def close(self) -> None:
        """Stops the threads and the task, turns the LEDs off and releases the pins. Safe to
        call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pressed_at = None
        self._stop.set()
        if self._watchdog and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=2)
        if self._pressing and self._pressing is not threading.current_thread():
            self._pressing.join(timeout=2)
        if self._task is not None:
            self._task.cancel()
        if self._queue is not None:
            self.ops.unsubscribe(self._queue)
        with self._lock:
            self._release_pins()
            self._pattern, self._modes, self._shown = "off", {}, None

    def _release_pins(self) -> None:
        for led in self.leds.values():
            try:
                led.source = None
                led.off()
                led.close()
            except Exception:
                log.exception("panel: releasing an LED")
        if self.button is not None:
            try:
                self.button.when_pressed = self.button.when_released = None
                self.button.close()
            except Exception:
                log.exception("panel: releasing the button")
        if self._own_factory and self._factory is not None:
            self._factory.close()


def _mode_word(mode) -> str:
    if mode is None:
        return "off"
    if mode == "on":
        return "steady"
    if mode == ALTERNATE:
        return "blinking, opposite red"
    return {SLOW: "blinking slowly", BLINK: "blinking", FAST: "blinking fast"}.get(mode, "blinking")
