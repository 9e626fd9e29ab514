"""The operations: the one API that every face calls. The control socket (and so the `kalki`
command and dnsmasq's lease script), the web page and the technician's button all go through
`Ops`, and none of them reaches deeper into the supervisor.

Every operation validates before it changes anything, and raises a KalkiError (or ValueError)
whose message names the culprit. `CONTROL` lists the ones the control socket serves.
"""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import math
import re
import time
import tomllib
from pathlib import Path

from appliance import policy
from appliance.config import parse_toml
from appliance.dataplane import umbox
from appliance.errors import ConfigError, KalkiError, StoreError, UnknownDeviceError
from appliance.policy import graph as posture_graphs
from appliance.policy import mud as mudfiles
from appliance.policy import profiles
from appliance.store.state import RULES_OFF_KEY
from appliance.supervisor import accounts, explain, flows, traffic
from appliance.supervisor import backup as backups
from appliance.supervisor.accounts import MAX_PASSWORD, MIN_PASSWORD  # noqa: F401  (the faces' limits)
from appliance.supervisor.explain import destination_words, seconds_words  # noqa: F401  (the faces' words)
from appliance.vocab import ALERT_SOURCES, LEARNING_SECONDS, SETTABLE_POSTURES, check_posture, iso, stricter

# The control socket's requests, each an Ops method of the same name.
CONTROL = ("status", "devices", "device_show", "device_add", "device_approve", "device_remove",
           "posture_set", "posture_reset", "alerts", "decisions", "maintenance", "memory",
           "rules_validate", "block_source", "unblock_source", "dhcp_lease", "clock_set", "button", "panel",
           "profile_import", "profile_list", "profile_show", "profile_export", "profile_remove",
           "device_learn", "device_allow", "device_disallow", "profile_from_device", "raise_alert",
           "backup", "restore", "device_check_logins", "blocked_sources", "alert_keep", "alert_release",
           "notify_test", "device_rename", "device_group", "rules_view", "rules_put", "set_rule_enabled",
           "home_assistant_broker", "home_assistant_password")

log = logging.getLogger("kalki.ops")
HOME_ASSISTANT = "Home Assistant"    # the actor of what Home Assistant asks over MQTT
# Whoever holds Home Assistant's broker password can publish refused commands as fast as the
# broker takes them: at most one audit record of them per device this often.
REFUSED_COMMAND_AUDIT_SECONDS = 60.0
TELEMETRY_CHARTED = 64              # reports per device the page charts: all that memory.py keeps
MAX_BLOCK_SECONDS = 30 * 86400       # a source blocked from the page: at most 30 days (0: until unblocked)

# The rule editor's placeholder: shown in the empty editor, never saved by a click.
RULE_EXAMPLE = """[[rules]]
name = "night-camera-watch"
description = "any alert on a camera at night: suspicious for an hour"
applies_to = ["camera"]
when = {all = [{time = {business_hours = false}}, {alert = {device = "self", count = 1, within = "10m"}}]}
then = [{set_posture = {posture = "suspicious", for = "1h"}}]
"""


def error_status(e: Exception) -> int:
    """The HTTP status a face answers an operation's error with."""
    if isinstance(e, UnknownDeviceError):
        return 404
    if isinstance(e, (ConfigError, ValueError, TypeError, StoreError)):
        return 400
    return 500


def _duration(value) -> int | None:
    if value in (None, ""):
        return None
    return policy.parse_duration(value, "--for")


def _minutes(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 24 * 60:
        raise ConfigError(f"maintenance: minutes must be 0 to 1440, got {value!r}")
    return value


def validate_rules_text(text, source: str) -> dict:
    """A TOML file of [[rules]] (site rules), validated without changing anything."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{source}: the text is empty")
    data = parse_toml(text, source)     # a ConfigError also for absurd nesting
    rules = data.get("rules")
    if not isinstance(rules, list) or not rules:
        raise ConfigError(f"{source}: expected [[rules]] tables")
    parsed = [policy.parse_rule(r, f"{source}: rules[{i}]") for i, r in enumerate(rules)]
    policy.Engine(parsed)     # duplicate names
    return {"valid": [r.name for r in parsed]}


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


class Ops:
    """What can be asked of the supervisor. `sup` is the one writer (supervisor.core)."""

    SETTABLE_POSTURES = SETTABLE_POSTURES

    def __init__(self, sup):
        self._sup = sup
        # device (None: any name that is no device) -> (when its refusal was last said, how
        # many were not said since)
        self._refused_commands: dict[str | None, tuple[float, int]] = {}
        self._add_installed_profiles()

    # -- what the faces read ------------------------------------------------------------
    @property
    def cfg(self):
        return self._sup.cfg

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._sup.loop

    @property
    def heartbeat(self) -> float:
        """The loop's last tick, time.monotonic() (the panel's watchdog)."""
        return self._sup.heartbeat

    @property
    def site_error(self) -> str | None:
        return self._sup.site_error

    @property
    def auth_epoch(self) -> int:
        return self._sup.auth_epoch

    @property
    def panel_state(self) -> dict | None:
        """What the LEDs show now, if the panel runs."""
        panel = self._sup.panel
        try:
            return panel.state() if panel is not None else None
        except Exception:     # a page must not fail because of the LEDs
            return None

    def now(self) -> datetime.datetime:
        return self._sup.now()

    def summary(self) -> str:
        return self._sup.summary()

    def claim_open(self) -> bool:
        return self._sup.claim_open()

    def maintenance_until(self) -> str | None:
        return self._sup.store.maintenance_until()

    def maintenance_active(self) -> bool:
        return self._sup.maintenance_active()

    def profile_types(self) -> list[str]:
        return sorted(self._sup.profiles)

    def settings(self) -> dict:
        return self._sup.settings()

    def subscribe(self) -> asyncio.Queue:
        return self._sup.subscribe()

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._sup.unsubscribe(q)

    def notify(self, event: dict) -> None:
        self._sup.notify(event)

    def audit(self, kind: str, actor: str, details: dict) -> None:
        self._sup.store.audit(kind, actor, details)

    def audit_log(self, limit: int = 300) -> list[dict]:
        return self._sup.store.decisions(kind="audit", limit=limit)

    # -- the control socket's operations ------------------------------------------------
    def status(self) -> dict:
        sup = self._sup
        return {"devices": len(sup.known), "enforced": len(sup.enforced_devices()),
                "uptime_s": round((time.monotonic_ns() - sup.started_ns) / 1e9, 1),
                "mqtt": bool(sup.bus and sup.bus.connected),
                "mqtt_rejected": dict(sup.bus.rejected) if sup.bus else {},
                "mqtt_denied": dict(sup.bus.denied) if sup.bus else {},
                "maintenance_until": sup.store.maintenance_until(),
                "policy_time": sup.now().isoformat(), "reconcile": sup.reconcile_report,
                "site_error": sup.site_error, "isolation_warning": sup.isolation_warning,
                "counters": dict(sup.counters), "tamper": sup.watch.tamper,
                "rules_skipped": sup.engine.skipped,    # global rules a report could not change
                "disk_error": sup.store.disk_error,
                **sup.collector.status(),
                "trim_pause_max_ms": round(sup.trim_pause_max_ms, 2),
                "evaluations": sup.evaluations.status(),
                "rules_off": self.rules_off(),
                "notify": sup.notifier.status()}

    def _view(self, d: dict) -> dict:
        sup, name = self._sup, d["name"]
        out = dict(d)
        out["enforced"] = name in sup.enforced_devices()
        out["availability"] = sup.availability.get(name)
        out["poll"] = sup.poll_of(name)      # the adapter's interval now, and until when
        if name in sup.suggestions:
            out["suggested_type"] = sup.suggestions[name]
        return out

    def devices(self) -> list[dict]:
        return [self._view(d) for d in sorted(self._sup.known.values(), key=lambda d: d["name"])]

    def device_show(self, name: str) -> dict:
        sup = self._sup
        d = sup.device(name)
        view = self._view(d)
        view["history"] = sup.store.posture_history(name, limit=20)
        held = name in sup.enforced_devices()
        view["counters"] = sup.dp.counters(name) if held else {}
        # the names it resolved through the gateway: bound, or refused (not in its profile)
        view["names"] = sup.dp.names_of(name) if held else {"bound": [], "refused": {}}
        # flows outside its profile: refused (for the operator to allow), learnt (while learning)
        lan = sup.cfg.gateway.lan      # each refusal with the destination that allows it ("lan" for a peer)
        view["flows"] = {kind: [{**f, "allow_as": _allow_as(f, lan)} for f in sup.flows.of(kind, name)]
                         for kind in ("refused", "learnt")}
        view["alerts"] = self._explained(sup.store.alerts(device=name, limit=20))
        view["umboxes"] = sup.profiles[d["type"]].stack(d["posture"]) if d.get("type") in sup.profiles else {}
        return view

    def device_add(self, name, mac, ip, type=None, approve=False, group=None) -> dict:
        return self._sup.add_device(name, mac, ip, type, bool(approve), group)

    def device_approve(self, name, type=None, actor: str = "operator") -> dict:
        sup = self._sup
        d = sup.device(name)
        type = type or d.get("type")
        self._install_offer(d, type, actor)
        self._known_type(type, f"device {name}")
        return sup.approve(name, type, actor=actor)

    def _install_offer(self, d: dict, type, actor: str) -> None:
        """When `type` is the one offered from the device's MUD file (mud.fetch) and not installed
        yet: installs it from the cached file, as it was checked (appliance.policy.mudfetch)."""
        offer = d.get("mud_offer") or {}
        if (not isinstance(type, str) or type in self._sup.profiles or offer.get("state") != "offered"
                or offer.get("type") != type):
            return
        url = offer["url"]
        # imported only when a fetched file is approved (urllib.request: 2.4 MB)
        from appliance.policy import mudfetch

        got = mudfetch.cached(self._sup.mud_cache, url)
        if got is None:
            raise ConfigError(f"device {d['name']}: the MUD file offered from {url} is no longer in "
                              f"{self._sup.mud_cache}: it is fetched again when the device renews "
                              "its lease; or import it (kalki profile import)")
        self._profile_import(got.text, url, type=type, actor=actor, signature=got.signature)

    # -- notifications (appliance.supervisor.notify) --------------------------------------
    def notify_settings(self) -> dict:
        """What the settings page shows of [notify]: the threshold, each channel's destination
        (scheme and host of a URL, the relay and recipients; never a secret, a topic or a
        path), the channels that are off and why, and each one's counts and last error."""
        sup = self._sup
        return {**sup.notifier.describe(), "status": sup.notifier.status()}

    async def notify_test(self, channel=None, actor: str = "operator") -> dict:
        """A test message on each configured channel (or `channel`: ntfy, webhook, email), one
        try each, off the loop: {channel: {"ok", "error", "to", "seconds"}}. Audited."""
        sup = self._sup
        if channel in ("", None):
            channel = None
        elif not isinstance(channel, str):
            raise ConfigError(f"notify test: channel {channel!r} is not a name")
        results = await asyncio.to_thread(sup.notifier.test, channel)
        sup.store.audit("notify-test", actor, {c: {"ok": r["ok"], "error": r["error"]}
                                               for c, r in results.items()})
        return results

    async def device_check_logins(self, name, actor: str = "operator") -> dict:
        """Tries the device type's default logins (its profile's [[default_logins]]) against the
        device now, from the gateway, and returns the outcomes (never a password); a login that
        works raises a default-credentials alert. Only for an approved device; while a check
        runs (one starts at approval), this waits for it."""
        if not isinstance(name, str):
            raise ConfigError(f"device: expected a device's name, got {name!r}")
        return await self._sup.check_logins(name, actor=actor)

    def _known_type(self, type, culprit: str) -> None:
        """Refuses a type no profile has, listing the ones there are."""
        known = ", ".join(sorted(self._sup.profiles))
        if type in (None, ""):
            raise ConfigError(f"{culprit}: give it a type (--type): one of {known}")
        if not isinstance(type, str) or type not in self._sup.profiles:
            raise ConfigError(f"{culprit}: {type!r} is not a known device type: expected one of {known}")

    def device_remove(self, name, actor: str = "operator") -> dict:
        self._sup.remove(name, actor=actor)
        return {"removed": name}

    def device_rename(self, name, new, actor: str = "operator") -> dict:
        """Another name for a device; its identity, history, posture and MQTT topics stay
        (Supervisor.rename_device). Refused if the name breaks the name rule, or is taken: by a
        device, or by a user of the MQTT broker that is not the device's own. Answers the device
        and notes: the rules that name it by its old name (they do not follow it)."""
        sup = self._sup
        d = sup.device(name)
        if not isinstance(new, str):
            raise ConfigError(f"device {name}: new name: expected text, got {new!r}")
        users = self._broker_users()
        if users and new in users and new != sup.mqtt_name(name) and sup.device_for_topic(new) is None:
            raise ConfigError(f"device {name}: cannot rename it {new}: {new} is a user of the MQTT "
                              "broker, whose topics (kalki/" + new + ") are that user's")
        renamed = sup.rename_device(d["name"], new, actor=actor)
        notes = [f"rule {r} names the device as {name}: it no longer applies to it; edit the rule"
                 for r in self._rules_naming(name) if new != name]
        mqtt_user = renamed.get("mqtt_user")
        if mqtt_user:
            notes.append(f"its MQTT user and topic stay {mqtt_user} (kalki/{mqtt_user}): the device "
                         "needs no change")
        return {"device": self._view(renamed), "from": name, "notes": notes}

    def _rules_naming(self, name: str) -> list[str]:
        """The rules in force whose conditions or actions name this device."""
        def names(x) -> bool:
            if isinstance(x, dict):
                return any((k in ("device", "targets") and (v == name or (isinstance(v, (list, tuple))
                                                                          and name in v)))
                           or names(v) for k, v in x.items())
            if isinstance(x, (list, tuple)):
                return any(names(v) for v in x)
            return False
        return sorted(r.name for r in self._sup.rules() if names(r.when) or names(r.then))

    def device_group(self, name, group=None, actor: str = "operator") -> dict:
        """Puts a device in a group, which rules select with {group = "..."}; None or "" takes
        it out of its group. A group's name follows the device name rule."""
        if group == "":
            group = None
        if group is not None and not isinstance(group, str):
            raise ConfigError(f"device {name}: group: expected text, got {group!r}")
        return self._view(self._sup.set_group(name, group, actor=actor))

    def posture_set(self, name, posture, for_=None, actor: str = "operator") -> dict:
        check_posture(posture, "posture", settable=True)
        ns = self._sup.set_posture(name, posture, f"set by {actor}", _duration(for_), actor=actor)
        return {"device": name, "posture": posture, "enforced_ns": ns}

    def home_assistant_posture(self, name: str, posture: str) -> dict | None:
        """Home Assistant's posture select (<base>/<device>/posture/set, appliance.telemetry.mqtt).
        The broker's ACL lets only mqtt.home_assistant_user publish there (MQTT does not tell us
        who published); this checks what is asked: a posture of the device's type, not
        learning (posture_options). Anything else changes nothing, and is logged and audited
        (no alert), naming the device and the value, at most once a minute per device (the
        next record counts those not recorded); for a name that is no device, only logged.
        None then."""
        try:
            clash = self._sup.home_assistant_clash()
            if clash is not None:
                user = self._sup.cfg.mqtt.home_assistant_user
                raise ConfigError(f"device {name}: posture commands are refused: {user!r}, Home "
                                  f"Assistant's broker user (mqtt.home_assistant_user), is also "
                                  f"device {clash}'s, so the command may be the device's; name "
                                  "another user for Home Assistant")
            if posture == "learning":
                raise ConfigError(f"device {name}: posture 'learning' is not Home Assistant's to "
                                  "set (it would have no end; `kalki device learn` sets it for a "
                                  "while)")
            allowed = self._sup.posture_options(name)
            if posture not in allowed:
                raise ConfigError(f"device {name}: unknown posture {posture!r} (its type's: "
                                  f"{', '.join(allowed)})")
            return self.posture_set(name, posture, actor=HOME_ASSISTANT)
        except KalkiError as e:
            self._refused_command(name, posture, e)
            return None

    def _refused_command(self, name: str, posture: str, error: KalkiError) -> None:
        # The name is the topic's: records under any name published would fill the audit
        # log with devices that never were.
        device = name if name in self._sup.known else None
        now = time.monotonic()
        said_at, unsaid = self._refused_commands.get(device, (None, 0))
        if said_at is not None and now - said_at < REFUSED_COMMAND_AUDIT_SECONDS:
            self._refused_commands[device] = (said_at, unsaid + 1)
            return
        self._refused_commands[device] = (now, 0)
        more = f" ({unsaid} more refused since, not recorded)" if unsaid else ""
        log.error("Home Assistant's posture command refused: %s%s", error, more)
        if device is None:
            return
        details: dict = {"device": name, "posture": posture, "error": str(error)}
        if unsaid:
            details["suppressed"] = unsaid
        self._sup.store.audit("posture-refused", HOME_ASSISTANT, details)

    def device_learn(self, name, for_=None, type=None, actor: str = "operator") -> dict:
        """Posture "learning" for a while (24 h unless told): the device reaches what it asks
        for, detectors and anti-spoofing stay on, and every flow outside its profile is
        recorded with the names it resolved. A device not approved yet is approved first, as
        `type` (or what it was given, or generic), and returns to that type's normal after."""
        sup = self._sup
        d = sup.device(name)
        seconds = _duration(for_) or LEARNING_SECONDS
        if not d.get("approved"):
            type = type or d.get("type") or "generic"
            self._install_offer(d, type, actor)
            self._known_type(type, f"device {name}")
            sup.approve(name, type, actor=actor)
        ns = sup.set_posture(name, "learning", f"learning, started by {actor}", seconds, actor=actor)
        sup.store.audit("learn", actor, {"device": name, "seconds": seconds})
        return {"device": name, "posture": "learning", "for_seconds": seconds, "enforced_ns": ns}

    def _own_destinations(self, name, destination, add: bool, actor: str) -> dict:
        sup = self._sup
        d = sup.device(name)
        if not isinstance(destination, str):
            raise ConfigError(f"device {name}: destination: expected text such as "
                              f"'n-devs.tplinkcloud.com:443/tcp', got {destination!r}")
        umbox.parse_destination(destination, "allow", f"device {name}: ")
        before = list(d.get("allow") or [])
        own = [x for x in before if x != destination] + ([destination] if add else [])
        if own == before:
            return {"device": name, "allow": own}
        sup._update_device(name, allow=own)
        if d.get("approved") and d.get("type") in sup.profiles:
            try:        # in force now, or not at all
                sup.set_posture(name, d["posture"], f"destination {destination} "
                                f"{'allowed' if add else 'no longer allowed'} by {actor}", actor=actor)
            except KalkiError:
                sup._update_device(name, allow=before)
                raise
        sup.store.audit("device-allow" if add else "device-disallow", actor,
                        {"device": name, "destination": destination})
        return {"device": name, "allow": own}

    def device_allow(self, name, destination, actor: str = "operator") -> dict:
        """One destination the device may open on top of its profile (a drifted cloud name)."""
        return self._own_destinations(name, destination, True, actor)

    def device_disallow(self, name, destination, actor: str = "operator") -> dict:
        return self._own_destinations(name, destination, False, actor)

    def profile_from_device(self, name, type=None, format="toml", mud_url=None) -> dict:
        """What a device was seen to do while learning, as a profile for the operator to read,
        edit and import: its type's postures with the learnt destinations added (the names it
        resolved rather than addresses, "lan" for its LAN peers), and without the lateral
        block if it talked to its LAN."""
        sup = self._sup
        d = sup.device(name)
        learnt = sup.flows.of("learnt", name)
        if not learnt:
            raise ConfigError(f"device {name}: nothing learnt yet (kalki device learn {name})")
        base = sup.profiles.get(d.get("type") or "generic") or sup.profiles["generic"]
        type = type or f"{base.type}-{name}".lower().replace("_", "-")[:40]
        profiles.check_type_name(type, "type")
        if format not in ("toml", "mud"):
            raise ConfigError(f"format: expected toml or mud, got {format!r}")
        seen = sorted({flows.destination_of(e, sup.cfg.gateway.lan) for e in learnt})
        postures = {}
        for posture, stack in base.postures.items():
            if posture in ("unknown", "learning"):
                continue
            # (validated stacks hold every parameter; a default left as None is not written)
            stack = {k: {pk: pv for pk, pv in v.items() if pv is not None} for k, v in stack.items()}
            for umbox_name in ("allowlist", "egress_anomaly"):
                if umbox_name in stack and stack[umbox_name].get("destinations") is not None:
                    old = list(stack[umbox_name]["destinations"])
                    stack[umbox_name]["destinations"] = old + [x for x in seen if x not in old]
            if any(x.startswith("lan") for x in seen):
                stack.pop("lateral_block", None)
            postures[posture] = stack
        if not any(k in postures["normal"] for k in ("allowlist", "egress_anomaly")):
            postures["normal"]["egress_anomaly"] = {"destinations": seen, "block": False}
        data = {"type": type, "description": f"learnt from device {name} ({len(learnt)} flows), "
                                              f"on top of the {base.type} profile", "postures": postures}
        text = profiles.dump_profile(data, [f"Learnt by kalki from device {name} at {iso(sup.now())}.",
                                            "Read it, edit it, then: kalki profile import FILE"])
        profiles.profile_from_text(text, f"{type}.toml")      # it must be importable
        if format == "mud":     # what the device did, and nothing the base profile adds
            only = profiles.profile_from_text(profiles.dump_profile(
                {"type": type, "postures": {"normal": {"egress_anomaly": {"destinations": seen}}}}),
                f"{type}.toml")
            text = json.dumps(mudfiles.profile_to_mud(only, mud_url or f"https://{type}.invalid/mud",
                                                      self._site_controllers()), indent=2) + "\n"
        return {"type": type, "format": format, "text": text, "destinations": seen}

    def posture_reset(self, name, actor: str = "operator") -> dict:
        self._sup.set_posture(name, "normal", "reset by operator", actor=actor)
        return {"device": name, "posture": "normal"}

    def alerts(self, device=None, limit=50) -> list[dict]:
        """Newest first, each with its "explanation" in words (explain.alert_words)."""
        self._device_filter(device)
        return self._explained(self._sup.store.alerts(device=device, limit=int(limit)))

    def decisions(self, device=None, limit=50, kind=None) -> list[dict]:
        """Decisions (kind "decision"), the audit trail ("audit"), or both (None); each decision
        with its "explanation" in words."""
        self._device_filter(device)
        return self._explained_decisions(self._sup.store.decisions(device=device, limit=int(limit),
                                                                   kind=kind))

    def _device_filter(self, device) -> None:
        """A device asked for by name (alerts, decisions): one here, or one removed whose records
        are kept; else an UnknownDeviceError saying so (and what it is called now, if renamed)."""
        sup = self._sup
        if device is None or device in sup.known:
            return
        store = sup.store
        if isinstance(device, str) and (store.count_alerts(device)
                                        or store.decisions(device=device, limit=1)):
            return
        now = next((n for n, d in sup.known.items()
                    if any(f.get("name") == device for f in d.get("former_names") or [])), None)
        if now is not None:
            raise UnknownDeviceError(f"device {device!r}: no such device: it was renamed {now}")
        raise UnknownDeviceError(f"device {device!r}: no such device (none here, and no alerts "
                                 "or decisions under that name)")

    def maintenance(self, minutes, actor: str = "operator") -> dict:
        minutes = _minutes(minutes)
        sup = self._sup
        until = (sup.now() + datetime.timedelta(minutes=minutes)).isoformat() if minutes else None
        sup.store.set_maintenance(until)
        sup.store.audit("maintenance", actor, {"until": until})
        return {"maintenance_until": until}

    def memory(self, top=25) -> dict:
        """VmRSS/VmHWM, and where the memory went if traced: for a field engineer chasing growth."""
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile")))
        out: dict = {k: v.strip() for k, v in status.items()}
        import tracemalloc
        if tracemalloc.is_tracing():   # PYTHONTRACEMALLOC=N in the supervisor's environment
            stats = tracemalloc.take_snapshot().statistics("lineno")[:int(top)]
            out["top"] = [{"where": str(t.traceback), "kb": round(t.size / 1024, 1), "count": t.count}
                          for t in stats]
        return out

    def rules_validate(self, text, source="rules") -> dict:
        return validate_rules_text(text, source)

    def block_source(self, ip, seconds, target=None, reason="blocked", by="operator") -> dict:
        sup = self._sup
        sup.dp.block_source(ip, seconds)
        device = sup.dp.device_by_ip(target) if target else None
        sup.raise_alert(device, reason, by, {"source": ip, "seconds": seconds}, time.monotonic_ns())
        return {"blocked": ip, "seconds": seconds}

    def raise_alert(self, kind, source=None, target=None, by="operator", details=None) -> dict:
        """An alert reported from outside the supervisor, e.g. the gate's api-denied: `kind`
        lower-case words joined by -, `source` and `target` (the device's address) IPv4,
        `details` a table (or its JSON) of at most 2 KB (8 KB for the decoy's `deception`
        evidence, appliance/dataplane/decoy.py). Rules see it as any other alert."""
        if not isinstance(kind, str) or not re.fullmatch(r"[a-z][a-z0-9-]{0,39}", kind):
            raise ConfigError(f"raise_alert: kind {kind!r}: lower-case letters, digits and -")
        if by not in ALERT_SOURCES:
            raise ConfigError(f"raise_alert: by {by!r} (known: {', '.join(ALERT_SOURCES)})")
        for what, ip in (("source", source), ("target", target)):
            if ip not in (None, ""):
                try:
                    ipaddress.IPv4Address(ip)
                except ValueError:
                    raise ConfigError(f"raise_alert: {what} {ip!r} is not an IPv4 address") from None
        if isinstance(details, str):
            try:
                details = json.loads(details) if details else {}
            except ValueError as e:
                raise ConfigError(f"raise_alert: details: {e}") from None
        details = details or {}
        limit = 8192 if kind == "deception" else 2048
        if not isinstance(details, dict) or len(json.dumps(details)) > limit:
            raise ConfigError(f"raise_alert: details must be a table of at most {limit // 1024} KB")
        sup = self._sup
        device = sup.dp.device_by_ip(target) if target else None
        return sup.raise_alert(device, kind, by, {**details, **({"source": source} if source else {})},
                               time.monotonic_ns())

    def unblock_source(self, ip, by="operator") -> dict:
        try:
            ipaddress.IPv4Address(ip if isinstance(ip, str) else "")
        except ValueError:
            raise ConfigError(f"unblock: {ip!r} is not an IPv4 address") from None
        sup = self._sup
        removed = sup.dp.unblock_source(ip)
        sup.store.audit("unblock", by, {"source": ip, "was_blocked": removed})
        return {"unblocked": ip, "was_blocked": removed}

    def blocked_sources(self) -> list[dict]:
        """The sources in the kernel's drop set, by address: source, device, reason (the
        detector's, or drop_set for a block by hand), why (in words), seconds_left and until
        (ISO; None: until unblocked)."""
        sup = self._sup
        if not sup.attached:
            return []
        now = sup.now()
        out = []
        for entry in sup.dp.drop_set():
            left = entry.get("seconds_left")
            out.append({**entry, "why": explain.drop_words(entry),
                        "until": None if left is None else iso(now + datetime.timedelta(seconds=left))})
        return sorted(out, key=lambda b: ipaddress.IPv4Address(b["source"]))

    # -- alerts in plain words, times in the site's time zone (appliance.supervisor.explain) --
    def _timezone(self) -> str:
        return self._sup.settings().get("timezone") or "UTC"

    def when(self, at) -> dict | None:
        """A stored time as people read it, in the site's time zone: {"local": "23:00:08",
        "ago": "3 min ago", "title", "epoch"}; None if `at` is no time."""
        return explain.when(at, self._sup.now(), self._timezone())

    def _stack(self, device: str | None, posture: str) -> dict | None:
        """The umbox stack the device's profile gives it in `posture`."""
        d = self._sup.known.get(device or "")
        p = self._sup.profiles.get(d.get("type") or "") if d else None
        return p.postures.get(posture) if p else None

    def _explained(self, alerts: list[dict], recent: int = 500) -> list[dict]:
        """Each alert with "explanation": what happened, why it matters, and the posture that
        followed with what it lets the device reach (the decision a rule took on the alert, else
        the posture the device was in). The same words for the same alert on every call (its
        time aside, which says "Sat 23:00" rather than "23:00:08" once the day is over). The
        decisions looked at are the `recent` last ones."""
        if not alerts:
            return alerts
        sup = self._sup
        now, tz = sup.now(), self._timezone()
        decided = explain.match_decisions(alerts, sup.store.decisions(kind="decision", limit=recent))
        by_ip = {d["ip"]: n for n, d in sup.known.items() if d.get("ip")}
        histories: dict[str, list[dict]] = {}
        for i, a in enumerate(alerts):
            device = a.get("device") if isinstance(a.get("device"), str) else None
            d = sup.known.get(device or "")
            step = explain.decided_step(decided.get(i), device)
            before = None
            if device is not None and d is not None and step is None:
                if device not in histories:
                    histories[device] = sup.store.posture_history(device, limit=50)
                before = explain.posture_at(histories[device], a.get("at"))

            def stack(posture: str, device: str | None = device) -> dict | None:
                return self._stack(device, posture)
            sentence = explain.posture_sentence(device if d else None, bool(d and d.get("approved")),
                                                str(a.get("type")), step, before, stack)
            w = explain.when(a.get("at"), now, tz)
            a["explanation"] = explain.alert_words(
                a, explain.Context(device, d.get("ip") if d else None, by_ip.get, str(a.get("at") or "")),
                w["local"] if w else "", sentence)
        return alerts

    def _explained_decisions(self, recs: list[dict]) -> list[dict]:
        now, tz = self._sup.now(), self._timezone()
        for r in recs:
            if r.get("kind", "decision") == "decision" and r.get("rule"):
                w = explain.when(r.get("at"), now, tz)
                r["explanation"] = explain.decision_words(r, w["local"] if w else "", self._stack)
        return recs

    def alert_event(self, event: dict) -> dict:
        """A live alert (subscribe()) as the page shows it: with its explanation and "when"."""
        a = self._explained([dict(event)], recent=20)[0]     # its decision was the last, if any
        a["when"] = self.when(a.get("at"))
        return a

    def alert_rows(self, device=None, limit=50) -> list[dict]:
        """alerts() as the page shows them, each also with "when" (its time in the site's time
        zone), "handled" (kept or released: how, by whom, when; or None) and "actions": what may
        be done about it, {"release": bool, "keep": bool, "block": the source's address or None}."""
        sup = self._sup
        alerts = self.alerts(device, limit)
        handled = self._handled_alerts()
        blocked = {b["source"] for b in self.blocked_sources()}
        for a in alerts:
            a["when"] = self.when(a.get("at"))
            h = a["handled"] = handled.get(a["id"]) if isinstance(a.get("id"), int) else None
            d = sup.known.get(a.get("device") or "")
            source = self._alert_source(a)
            a["actions"] = {
                "release": bool(not h and d and d.get("approved") and stricter(d.get("posture"), "normal")),
                "keep": not h,
                "block": source if not h and source and source not in blocked else None}
        return alerts

    def _handled_alerts(self) -> dict[int, dict]:
        """{alert id: {"how": "kept" or "released", "by", "at", "when"}} from the audit log."""
        out = {}
        for rec in reversed(self._sup.store.decisions(kind="audit", limit=500)):
            how = {"alert-keep": "kept", "alert-release": "released"}.get(rec.get("event"))
            alert_id = (rec.get("details") or {}).get("alert")
            if how and isinstance(alert_id, int):
                out[alert_id] = {"how": how, "by": rec.get("actor"), "at": rec.get("at"),
                                 "when": self.when(rec.get("at"))}
        return out

    def _alert_source(self, a: dict) -> str | None:
        """The address an alert is about that the drop set could hold: the kernel event's
        source, or the source the gate or a rule reported; never the device's own address or
        the gateway's."""
        found = a.get("details")
        details: dict = found if isinstance(found, dict) else {}
        raw = details.get("src") if a.get("source") == "kernel" else (details.get("source")
                                                                       or details.get("src"))
        try:
            ip = str(ipaddress.IPv4Address(raw)) if isinstance(raw, str) else None
        except ValueError:
            return None
        d = self._sup.known.get(a.get("device") or "")
        if ip is None or (d and d.get("ip") == ip) or ip == self._sup.cfg.gateway.address:
            return None
        return ip

    def _alert(self, alert) -> dict:
        if isinstance(alert, str) and alert.isdigit():
            alert = int(alert)
        if isinstance(alert, bool) or not isinstance(alert, int):
            raise ConfigError(f"alert: expected an alert's id (a number), got {alert!r}")
        found = next((a for a in self._sup.store.alerts(limit=1000) if a["id"] == alert), None)
        if found is None:
            raise ConfigError(f"alert {alert} does not exist (or is among the oldest, beyond 1000)")
        return found

    def alert_keep(self, alert, actor: str = "operator") -> dict:
        """The operator saw the alert and keeps the posture that followed: an audit record, and
        the page offers nothing more for it."""
        a = self._alert(alert)
        self._sup.store.audit("alert-keep", actor, {"alert": a["id"], "type": a["type"],
                                                    **({"device": a["device"]} if a.get("device") else {})})
        return {"alert": a["id"], "kept": True}

    def alert_release(self, alert, actor: str = "operator") -> dict:
        """The alert's device back to normal (posture_reset), and an audit record of why."""
        a = self._alert(alert)
        if not a.get("device") or a["device"] not in self._sup.known:
            raise ConfigError(f"alert {a['id']} ({a['type']}) is about no device here: nothing to release")
        done = self.posture_reset(a["device"], actor=actor)
        self._sup.store.audit("alert-release", actor, {"alert": a["id"], "type": a["type"],
                                                       "device": a["device"]})
        return {"alert": a["id"], **done}

    def alert_block(self, alert, seconds, actor: str = "operator") -> dict:
        """The alert's source into the drop set (block_source) for `seconds` (or "15m", "1d";
        0: until unblocked), with an audit record."""
        a = self._alert(alert)
        source = self._alert_source(a)
        if source is None:
            raise ConfigError(f"alert {a['id']} ({a['type']}) names no source address to block")
        if isinstance(seconds, str) and seconds.strip().isdigit():
            seconds = int(seconds)
        seconds = 0 if seconds in (0, "0") else policy.parse_duration(seconds, "block for")
        if seconds > MAX_BLOCK_SECONDS:
            raise ConfigError(f"block for: at most 30 days ({MAX_BLOCK_SECONDS} s), got {seconds} s")
        d = self._sup.known.get(a.get("device") or "")
        done = self.block_source(source, seconds, target=d.get("ip") if d else None)
        self._sup.store.audit("block", actor, {"source": source, "seconds": seconds, "alert": a["id"],
                                               **({"device": a["device"]} if d else {})})
        return done

    def dhcp_lease(self, action, mac=None, ip=None, identity=None) -> dict:
        if action in ("add", "old"):
            if identity is not None and not isinstance(identity, dict):
                raise ConfigError("dhcp_lease: identity must be an object")
            if mac is None or ip is None:
                raise ConfigError(f"dhcp_lease {action}: mac and ip are required")
            self._sup.discovered(mac, ip, identity or {})
        return {"ok": True}

    def clock_set(self, time) -> dict:
        sup = self._sup
        if not sup.cfg.policy.fake_time:
            raise ConfigError("clock_set: only with policy.fake_time set (the lab)")
        was = sup.now()
        sup.clock.set(time)
        now = sup.now()
        # In the audit trail where it happened, so that times running backwards there (and in
        # every log after it) are seen to be the clock's doing.
        sup.store.audit("clock-set", "operator", {"from": iso(was), "to": iso(now)})
        return {"policy_time": now.isoformat()}

    def button(self, action, seconds=None) -> dict:
        """The lab's finger on the button."""
        if not self._sup.panel:
            raise ConfigError("button: the panel is off ([panel] enabled = false)")
        return self._sup.panel.simulate(action, seconds)

    def panel(self) -> dict:
        sup = self._sup
        if not sup.panel:
            return {"enabled": False, "claim_open": sup.claim_open()}
        return {"enabled": True, **sup.panel.state(), "claim_open": sup.claim_open(),
                "claim_until": sup.claim_until.isoformat() if sup.claim_open() else None}

    # -- device-type profiles installed at run time --------------------------------------
    @property
    def _installed_dir(self) -> Path:
        return profiles.installed_dir(self._sup.cfg.state.directory)

    def _add_installed_profiles(self) -> None:
        """The profiles installed in <state directory>/profiles join the shipped ones (a no-op for
        those the supervisor loaded itself). The dict is updated in place: whoever holds it (the
        adapters' profile lookup) sees the same profiles."""
        sup = self._sup
        installed = profiles.load_installed(self._installed_dir, sup.profiles)
        if any(t not in sup.profiles for t in installed):
            sup.profiles.update(installed)
            sup.reload_rules()

    def _profile(self, type) -> profiles.Profile:
        p = self._sup.profiles.get(type) if isinstance(type, str) else None
        if p is None:
            raise ConfigError(f"profile {type!r}: no such device type (known: "
                              f"{', '.join(sorted(self._sup.profiles))})")
        return p

    def _devices_of(self, type: str) -> list[str]:
        return sorted(n for n, d in self._sup.known.items() if d.get("type") == type)

    def _profile_row(self, p: profiles.Profile) -> dict:
        return {"type": p.type, "description": p.description,
                "source": "installed" if p.installed else "shipped", "path": str(p.path),
                "mud_url": p.mud_url, "devices": self._devices_of(p.type)}

    def _site_controllers(self) -> dict:
        """The site's controller classes as destinations (what a MUD export writes for "@class")."""
        return umbox.check_controllers(self._sup.cfg.controllers, "config: controllers")

    def profile_list(self) -> list[dict]:
        return [self._profile_row(p) for _, p in sorted(self._sup.profiles.items())]

    def profile_show(self, type) -> dict:
        p = self._profile(type)
        return {**self._profile_row(p), "postures": p.postures, "match": p.match,
                "telemetry": p.telemetry, "commands": p.commands, "adapter": p.adapter,
                "rules": [r.name for r in p.rules],
                # what the check tries, without the passwords (the profile's file has them)
                "default_logins": [{k: v for k, v in x.items() if k != "password"}
                                   for x in p.default_logins]}

    def profile_import(self, text, filename, type=None, device_ip=None, actor: str = "operator") -> dict:
        """Installs a profile from a TOML profile or an RFC 8520 MUD file (JSON), told apart by
        their content. Everything is checked before anything is written; the file is written
        atomically and the type is usable at once. Returns the type and notes for the operator."""
        return self._profile_import(text, filename, type, device_ip, actor)

    def _profile_import(self, text, filename, type=None, device_ip=None, actor: str = "operator",
                        signature: str | None = None) -> dict:
        """profile_import; `signature` is what was checked of a MUD file fetched from its URL."""
        sup = self._sup
        if not isinstance(filename, str) or not filename:
            raise ConfigError("profile import: filename must be the file's name")
        if not isinstance(text, str):
            raise ConfigError(f"{filename}: expected the file's text")
        if len(text.encode("utf-8", "surrogatepass")) > mudfiles.MAX_BYTES:
            raise ConfigError(f"{filename}: larger than {mudfiles.MAX_BYTES} bytes: refused")
        if type is not None:
            profiles.check_type_name(type, "type")
        if device_ip is not None and not isinstance(device_ip, str):
            raise ConfigError(f"device_ip: expected an IPv4 address, got {device_ip!r}")
        notes: list[str] = []
        if text.lstrip("\ufeff \t\r\n").startswith("{"):       # JSON: a MUD file
            mud = mudfiles.parse_mud(text, filename, signature)
            type_name = type or mudfiles.default_type_name(mud)
            data, notes = mudfiles.to_profile(mud, type_name, device_ip)
            header = [f"Device type {type_name}, made by `kalki profile import` from the MUD file "
                      f"{Path(filename).name}", f"MUD URL: {mud.mud_url}"]
            header += ["What the importer did besides the allow-list:"] + [f"- {n}" for n in notes]
            content = profiles.dump_profile(data, header)
            fmt = "mud"
        else:
            if device_ip is not None:
                raise ConfigError(f"{filename}: a device address is for MUD files only (it finds "
                                  "artefacts of the capture); this is a TOML profile")
            data = parse_toml(text, filename)
            content, fmt = text, "toml"
            given = data.get("type")
            if type is not None and given != type:
                data["type"] = type
                content = profiles.dump_profile(data, [f"Device type {type}, from {Path(filename).name} "
                                                       f"(type {given!r} there)"])
                notes.append(f"the profile's type is {type} (the file said {given!r}); the file was "
                             "rewritten, without its comments")
        # Check the text that is written, as the supervisor will load it after a restart.
        profile = profiles.profile_from_text(content, filename)
        type_name = profile.type
        existing = sup.profiles.get(type_name)
        if existing is not None and not existing.installed:
            raise ConfigError(f"{filename}: device type {type_name} is shipped with the appliance "
                              f"({existing.path}): choose another type name (--type)")
        if existing is not None:
            users = self._devices_of(type_name)
            if users:
                raise ConfigError(f"{filename}: device type {type_name} is installed already and used "
                                  f"by {', '.join(users)}: give another type name, or move those "
                                  "devices to another type first")
        rules = [r for r in sup.rules() if r.source != f"profile:{type_name}"] + profile.rules
        policy.Engine(rules)      # rule names that clash with others in force
        directory = self._installed_dir
        path = directory / f"{type_name}.toml"
        try:
            previous = path.read_text(encoding="utf-8") if path.exists() else None
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror or e}") from None
        try:
            with sup.store.batch():
                sup.store.audit("profile-import", actor, {"type": type_name, "file": Path(filename).name,
                                                          "format": fmt, "replaced": previous is not None,
                                                          "notes": len(notes)})
                profiles.write_installed(directory, type_name, content)
            installed = profiles.load_profile(path, installed=True)
        except BaseException:
            try:        # put back what was there, and raise what went wrong
                if previous is None:
                    profiles.remove_installed(path)
                else:
                    profiles.write_installed(directory, type_name, previous)
            except ConfigError:
                pass
            raise
        sup.profiles[type_name] = installed
        sup.reload_rules()
        sup.make_ahead()
        return {"type": type_name, "format": fmt, "path": str(path), "notes": notes}

    def profile_export(self, type, format="toml", mud_url=None) -> dict:
        """A profile as its TOML file, or its normal posture's destinations as a MUD file (the
        profile's mud_url, or `mud_url`)."""
        p = self._profile(type)
        if format == "toml":
            try:
                text = p.path.read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"{p.path}: {e.strerror or e}") from None
        elif format == "mud":
            url = mud_url or p.mud_url
            if not url:
                raise ConfigError(f"profile {p.type} has no mud_url: give the MUD URL to export it under "
                                  "(--mud-url https://...)")
            text = json.dumps(mudfiles.profile_to_mud(p, url, self._site_controllers()), indent=2) + "\n"
        else:
            raise ConfigError(f"format: expected toml or mud, got {format!r}")
        return {"type": p.type, "format": format, "text": text}

    def profile_remove(self, type, actor: str = "operator") -> dict:
        sup = self._sup
        p = self._profile(type)
        if not p.installed:
            raise ConfigError(f"profile {p.type} is shipped with the appliance ({p.path}); only installed "
                              "profiles can be removed")
        users = self._devices_of(p.type)
        if users:
            raise ConfigError(f"profile {p.type} is used by {', '.join(users)}: give them another type "
                              "or remove them first")
        try:
            text = p.path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{p.path}: {e.strerror or e}") from None
        try:
            with sup.store.batch():
                sup.store.audit("profile-remove", actor, {"type": p.type})
                profiles.remove_installed(p.path)
        except BaseException:
            if not p.path.exists():        # the record was refused after the file went
                try:
                    profiles.write_installed(p.path.parent, p.type, text)
                except ConfigError:
                    pass
            raise
        del sup.profiles[p.type]
        for name, suggested in list(sup.suggestions.items()):
            if suggested == p.type:
                del sup.suggestions[name]
        sup.reload_rules()
        return {"removed": p.type}

    # -- the page's views ---------------------------------------------------------------
    def telemetry(self, name: str, limit: int = 20) -> list[dict]:
        return [{"at": at.isoformat(timespec="seconds"), "values": payload}
                for at, payload in self._sup.recent_telemetry(name, limit)]

    def telemetry_view(self, name) -> dict:
        """The device's telemetry as people read it: one row per key with its latest value, when
        it came, where from and what it means (its profile's [telemetry] words), and each numeric
        key's recent values for a chart: {"latest": [{"key", "value", "at", "when", "source",
        "meaning"}], "series": {key: {"at": [epoch seconds], "values": [...]}}}, oldest first."""
        sup = self._sup
        if not isinstance(name, str):
            raise ConfigError(f"telemetry: expected a device's name, got {name!r}")
        d = sup.device(name)
        profile = sup.profiles.get(d.get("type") or "")
        meanings = profile.telemetry if profile else {}
        if sup.adapter is not None and profile is not None and profile.adapter:
            source = f"polled by the gateway ({profile.adapter['kind']} API)"
        else:
            source = f"MQTT {sup.cfg.mqtt.base}/{sup.mqtt_name(name)}"
        latest: dict[str, tuple] = {}
        series: dict[str, dict] = {}
        for at, payload in reversed(sup.recent_telemetry(name, TELEMETRY_CHARTED)):
            for key, value in payload.items():
                latest[key] = (value, at)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    points = series.setdefault(key, {"at": [], "values": []})
                    # a chart's times must rise: reports within one millisecond are set apart
                    stamp = round(at.timestamp(), 3)
                    if points["at"] and stamp <= points["at"][-1]:
                        stamp = round(points["at"][-1] + 0.001, 3)
                    points["at"].append(stamp)
                    points["values"].append(value)
        rows = [{"key": key, "value": value, "at": iso(at), "when": self.when(at), "source": source,
                 "meaning": meanings.get(key) if isinstance(meanings.get(key), str) else None}
                for key, (value, at) in sorted(latest.items())]
        return {"device": name, "latest": rows, "series": series, "timezone": self._timezone()}

    # -- traffic: the kernel's counters over the last hour and day (supervisor.traffic) ---
    def _traffic_span(self, span, culprit: str) -> tuple[traffic.Traffic, traffic.Span]:
        if span not in traffic.SPANS:
            raise ConfigError(f"{culprit}: unknown span {span!r} (known: {', '.join(traffic.SPANS)})")
        if self._sup.traffic is None:
            raise ConfigError(f"{culprit}: the traffic charts are off ([state] traffic_charts = false)")
        return self._sup.traffic, traffic.SPANS[span]

    def traffic(self, name, span="hour") -> dict:
        """A device's traffic over the last hour (10-s slots) or day (5-minute slots), from the
        kernel's counters: each slot's start ("at", epoch seconds), passed and dropped packets
        and bytes per slot (None: no data then), dropped packets per slot by reason, the span's
        totals, and "drops": the reasons in words, most packets first."""
        sup = self._sup
        if not isinstance(name, str):
            raise ConfigError(f"traffic: expected a device's name, got {name!r}")
        sup.device(name)
        rings, chosen = self._traffic_span(span, f"traffic of device {name}")
        out = rings.series(name, chosen, sup.now().timestamp())
        by_reason = out["totals"]["reasons"]
        out["drops"] = [{"reason": r, "packets": n, "words": traffic.REASON_WORDS.get(r, r)}
                        for r, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0])) if n]
        return {"device": name, "timezone": self._timezone(), **out}

    def traffic_overview(self, span="hour", points=60) -> dict:
        """Every device's passed and dropped packets over the span in `points` buckets (1 to
        the span's slots), for the overview's small charts."""
        rings, chosen = self._traffic_span(span, "traffic")
        if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= chosen.slots:
            raise ConfigError(f"traffic: points must be 1 to {chosen.slots}, got {points!r}")
        sup = self._sup
        return {"timezone": self._timezone(),
                **rings.overview(sorted(sup.known), chosen, sup.now().timestamp(), points)}

    def device_detail(self, name: str) -> dict:
        view = self.device_show(name)
        view["telemetry"] = self.telemetry(name)
        view["decisions"] = self._explained_decisions(self._sup.store.decisions(device=name, limit=30))
        view["kernel_alerts"] = [a for a in view.get("alerts", []) if a.get("source") == "kernel"]
        return view

    def mqtt_view(self) -> list[dict]:
        users = self._broker_users()
        sup = self._sup
        return [{"device": name, "mqtt_user": sup.mqtt_name(name),     # its own, if renamed
                 "broker_user": None if users is None else sup.mqtt_name(name) in users,
                 "availability": sup.availability.get(name)}
                for name in sorted(sup.known)]

    def _broker_users(self) -> set[str] | None:
        """Devices with a user on the MQTT broker, from Mosquitto's password file when the
        supervisor can see it (in mqtt.broker_directory, on a Pi /var/lib/kalki/mqtt/passwords);
        None if unknown."""
        m = self._sup.cfg.mqtt
        pw = Path(m.password_file)
        for candidate in (Path(m.broker_directory) / "passwords", pw.parent / "mqtt" / "passwords",
                          Path("/etc/kalki/mqtt/passwords")):
            try:
                return {line.split(":", 1)[0] for line in candidate.read_text().splitlines() if ":" in line}
            except OSError:
                continue
        return None

    # -- Home Assistant's broker user ----------------------------------------------------
    def home_assistant_broker(self) -> dict:
        """What Home Assistant's MQTT integration is to be given, but the password: the
        broker's listeners (from its configuration: address "" is every address of the
        appliance), the user, the client ids the broker's plugin lets it use, the discovery
        prefix, and whether a password is set. {"enabled": False, ...} when
        mqtt.home_assistant_user is empty."""
        m = self.cfg.mqtt
        user = m.home_assistant_user
        if not user:
            return {"enabled": False, "setting": "mqtt.home_assistant_user"}
        files = self._sup.broker_files
        last = next((r for r in self._sup.store.decisions(kind="audit", limit=500)
                     if r.get("event") == "ha-password-set"), None)
        password_error = None
        try:
            password_set = bool(files and files.password_is_set(user))
        except KalkiError as e:     # an unreadable password file: the page says so, and why
            password_set, password_error = False, str(e)
        # Home Assistant's own default client id is a random one, which the plugin refuses.
        return {"enabled": True, "user": user, "client_id": user,
                "client_id_rule": f"{user}, or {user}- followed by anything that is not "
                                  "another broker user's name",
                "discovery_prefix": m.discovery_prefix,
                "listeners": files.listeners() if files else [],
                "broker_directory": str(files.directory) if files else m.broker_directory,
                "password_set": password_set, "password_error": password_error,
                "password_set_at": last["at"] if last else None,
                "password_set_by": last["actor"] if last else None}

    async def home_assistant_password(self, actor: str = "operator") -> dict:
        """A new random password for Home Assistant's broker user, in force at once: its hash
        replaces the old one in the broker's password file and the running broker re-reads
        it (the old password stops working, a session logged in with it is ended; nobody else
        is disconnected). Returned once, with home_assistant_broker()'s view; the appliance
        keeps only the hash. Audited as ha-password-set, without the password."""
        m = self.cfg.mqtt
        user = m.home_assistant_user
        if not user:
            raise ConfigError("mqtt.home_assistant_user is empty: Home Assistant has no broker "
                              "user on this appliance (set one in the config file's [mqtt])")
        files = self._sup.broker_files
        if files is None:
            raise KalkiError("this supervisor was started without the broker's files "
                             "(mqtt.broker_directory)")
        # Off the loop: the broker is waited for (a reload takes a few milliseconds, at most 5 s).
        password, reloaded = await asyncio.to_thread(files.new_password, user)
        self._sup.store.audit("ha-password-set", actor, {"user": user, "broker_reloaded": reloaded})
        log.info("a new broker password for Home Assistant's user %s, set by %s", user, actor)
        return {**self.home_assistant_broker(), "password": password, "broker_reloaded": reloaded}

    # -- rules --------------------------------------------------------------------------
    def rules_view(self) -> list[dict]:
        """Every rule, with its conditions and actions in words. `switched_off`: a built-in or
        profile rule the operator switched off; `switchable`: it can be switched (not a profile
        rule its own file disables)."""
        sup = self._sup
        stored = {r["name"]: r for r in sup.store.rules()}
        off = self._switched_off()
        out = []
        for r in sup.rules():
            switched_off = r.source != "site" and r.name in off
            switchable = r.enabled or r.source == "site" or switched_off
            row = {"name": r.name, "source": r.source, "priority": r.priority, "enabled": r.enabled,
                   "applies_to": list(r.applies_to), "editable": r.source == "site",
                   "switched_off": switched_off, "switchable": switchable,
                   "words": explain.rule_words(r),
                   "description": (stored.get(r.name) or {}).get("description", "")}
            if r.source == "site":
                row["definition"] = {k: v for k, v in stored.get(r.name, {}).items() if k != "updated"}
            out.append(row)
        order = {"builtin": 0, "site": 2}
        return sorted(out, key=lambda r: (order.get(r["source"], 1), r["source"], r["name"]))

    def rule_text(self, name: str | None) -> str:
        """A site rule as TOML for the editor; "" for a new one (the editor shows RULE_EXAMPLE
        as its placeholder, so that no click saves the example)."""
        rule = self._sup.store.get_rule(name) if name else None
        if rule is None:
            return ""
        return rule_toml({k: v for k, v in rule.items() if k != "updated"})

    def _switched_off(self) -> set[str]:
        return set(self._sup.store.get_setting(RULES_OFF_KEY) or ())

    def rules_off(self) -> list[dict]:
        """The built-in and profile rules switched off, [{"name", "source"}]: protection the
        appliance ships with and does not apply now, which the pages say wherever they can."""
        off = self._switched_off()
        if not off:      # every page asks (the status): no rule parsed for nothing
            return []
        return [{"name": r.name, "source": r.source} for r in self._sup.rules()
                if r.source != "site" and r.name in off]

    def rules_off_words(self) -> str:
        return explain.rules_off_words(self.rules_off())

    def posture_graph(self, type=None) -> dict:
        """The posture state machine the rules make (appliance.policy.graph), for every device
        or for one type (the postures its profile has), with each rule's words."""
        sup = self._sup
        postures = SETTABLE_POSTURES
        if type not in (None, ""):
            self._known_type(type, "posture graph")
            postures = tuple(sup.profiles[type].postures)
        rules = sup.rules()
        out = posture_graphs.posture_graph(rules, postures, type or None, sup.device_type)
        named = {e["rule"] for e in out["edges"]} | {m["rule"] for m in out["missing"]}
        out["words"] = {r.name: explain.rule_words(r) for r in rules if r.name in named}
        out["type"] = type or None
        return out

    def _fixed_names(self) -> dict[str, str]:
        return {r.name: r.source for r in self._sup.rules() if r.source != "site"}

    def put_rules(self, rules: list[dict], where: str, actor: str) -> list[str]:
        """Adds or replaces site rules after checking each and the whole rule set."""
        sup = self._sup
        if not isinstance(rules, list) or not rules:
            raise ConfigError(f"{where}: expected a non-empty list of rules")
        parsed = [policy.parse_rule(r, f"{where}: rules[{i}]") for i, r in enumerate(rules)]
        fixed = self._fixed_names()
        for r in parsed:
            if r.name in fixed:
                raise ConfigError(f"rule {r.name!r}: a {fixed[r.name]} rule has that name; "
                                  "choose another name")
        site = {r["name"]: r for r in sup.store.rules()}
        for new in rules:
            enabled = new.get("enabled", site.get(new["name"], {}).get("enabled", True))
            site[new["name"]] = {**new, "enabled": enabled}
        candidate = [r for r in sup.rules() if r.source != "site"]
        candidate += [policy.parse_rule({k: v for k, v in d.items() if k != "updated"},
                                        f"site rule {n}", source="site") for n, d in site.items()]
        policy.Engine(candidate)     # duplicate names, anything else the engine refuses
        with sup.store.batch():
            for new in rules:
                sup.store.put_rule(new["name"], new)
                sup.store.audit("rule-put", actor, {"rule": new["name"]})
        sup.reload_rules()
        return [r.name for r in parsed]

    def put_rules_text(self, text, actor: str) -> list[str]:
        validate_rules_text(text, "rules")
        return self.put_rules(tomllib.loads(text)["rules"], "rules", actor)

    def rules_put(self, text, actor: str = "operator") -> dict:
        """Site rules from TOML text ([[rules]] tables, as `kalki rules validate` checks them),
        for scripts and integrators: each added, or replacing the site rule of its name, as the
        page's rules editor does. All or none: one wrong rule saves nothing."""
        return {"saved": self.put_rules_text(text, actor)}

    def _site_rule(self, name) -> None:
        if not isinstance(name, str) or self._sup.store.get_rule(name) is None:
            fixed = self._fixed_names()
            if name in fixed:
                raise ConfigError(f"rule {name!r} is a {fixed[name]} rule; only site rules can be "
                                  "changed or deleted (it can be switched off and on)")
            raise ConfigError(f"rule {name!r} does not exist")

    def set_rule_enabled(self, name, enabled, actor: str = "operator") -> dict:
        """Switches a rule off or on: a site rule in its record, a built-in or profile rule in
        the setting rules_off (their files are not the site's to edit). Audited either way."""
        fixed = self._fixed_names()
        if not (isinstance(name, str) and name in fixed):
            self._site_rule(name)
        if isinstance(enabled, str) and enabled in ("true", "false", "1", "0"):
            enabled = enabled in ("true", "1")
        if not isinstance(enabled, bool):
            raise ConfigError(f"rule {name!r}: enabled must be true or false, got {enabled!r}")
        if name in fixed:
            return self._switch_fixed_rule(name, fixed[name], enabled, actor)
        store = self._sup.store
        with store.batch():
            rule = store.set_rule_enabled(name, enabled)
            store.audit("rule-enabled" if enabled else "rule-disabled", actor, {"rule": name})
        self._sup.reload_rules()
        return rule

    def _switch_fixed_rule(self, name: str, source: str, enabled: bool, actor: str) -> dict:
        sup = self._sup
        off = self._switched_off()
        rule = next(r for r in sup.rules() if r.name == name)
        if enabled and name not in off and not rule.enabled:
            raise ConfigError(f"rule {name!r} is disabled in its profile ({source}), not here; "
                              "switch it on there")
        off = (off - {name}) if enabled else (off | {name})
        with sup.store.batch():
            sup.store.set_setting(RULES_OFF_KEY, sorted(off))
            sup.store.audit("rule-enabled" if enabled else "rule-disabled", actor,
                            {"rule": name, "source": source})
        if not enabled:
            log.warning("%s rule %s switched off by %s: the appliance no longer applies it",
                        source, name, actor)
        sup.reload_rules()
        return {"name": name, "source": source, "enabled": enabled}

    def delete_rule(self, name, actor: str) -> None:
        self._site_rule(name)
        store = self._sup.store
        with store.batch():
            store.delete_rule(name)
            store.audit("rule-delete", actor, {"rule": name})
        self._sup.reload_rules()

    # -- settings -----------------------------------------------------------------------
    def update_settings(self, changes: dict, actor: str) -> dict:
        if not isinstance(changes, dict) or not changes:
            raise ConfigError("settings: expected an object with business_hours and/or timezone")
        unknown = set(changes) - {"business_hours", "timezone"}
        if unknown:
            raise ConfigError(f"settings: unknown key(s) {sorted(unknown)} (known: business_hours, timezone)")
        store = self._sup.store
        for k, v in changes.items():   # all checked before any is stored
            store.check_setting(k, v)
        with store.batch():
            for k, v in changes.items():
                store.set_setting(k, v)
            store.audit("settings", actor, {"changed": sorted(changes)})
        return self._sup.settings()

    # -- backup and restore (appliance.supervisor.backup) -------------------------------
    def backup(self, with_secrets=False, actor: str = "operator") -> dict:
        """The settings, the installed profiles, the site rules and the device list as one
        JSON file: {filename, text, secrets, devices, profiles, rules}. The admin password's
        hash and the API tokens are in it only with with_secrets."""
        if not isinstance(with_secrets, bool):
            raise ConfigError(f"with_secrets: expected true or false, got {with_secrets!r}")
        sup = self._sup
        doc = backups.make(sup, with_secrets)
        content = doc["content"]
        sup.store.audit("backup", actor, {"secrets": with_secrets, "devices": len(content["devices"])})
        stamp = doc["created"][:16].replace(":", "")
        return {"filename": f"kalki-backup-{stamp}.json", "text": backups.dumps(doc),
                "secrets": with_secrets, "devices": len(content["devices"]),
                "profiles": len(content["profiles"]), "rules": len(content["rules"])}

    def restore(self, text, dry_run=False, actor: str = "operator") -> dict:
        """Puts a backup in force: everything checked first (an error names the culprit and
        changes nothing), then profiles, rules and devices written, the devices' postures
        enforced; a posture stricter here than in the backup is kept. dry_run: only checked;
        the answer says what would be done."""
        if not isinstance(dry_run, bool):
            raise ConfigError(f"dry_run: expected true or false, got {dry_run!r}")
        return backups.restore(self._sup, text, self._installed_dir, dry_run, actor)

    # -- accounts -----------------------------------------------------------------------
    def admin_user(self) -> str | None:
        admin = self._sup.store.get_setting("admin")
        return admin["user"] if admin else None

    def check_admin_password(self, user, password) -> bool:
        """Slow on purpose (scrypt): call it from a thread."""
        admin = self._sup.store.get_setting("admin")
        return bool(admin and isinstance(password, str) and user == admin["user"]
                    and accounts.verify_password(password, admin["scrypt"]))

    def change_password(self, current, new, confirm, actor: str) -> None:
        store = self._sup.store
        admin = store.get_setting("admin")
        if not (admin and isinstance(current, str) and accounts.verify_password(current, admin["scrypt"])):
            raise ConfigError("current password: wrong")
        user = accounts.check_new_credentials(admin["user"], new, confirm)
        with store.batch():
            store.set_setting("admin", {"user": user, "scrypt": accounts.hash_password(new)})
            store.audit("admin-password", actor, {})

    def claim(self, user, password, confirm, actor: str) -> str:
        sup = self._sup
        if sup.store.get_setting("admin"):
            raise ConfigError("this gateway has an admin already: log in")
        if not sup.claim_open():
            raise ConfigError("the claim window is closed: press the button on the box, then try again "
                              "within 5 minutes")
        user = accounts.check_new_credentials(user, password, confirm)
        with sup.store.batch():
            sup.store.set_setting("admin", {"user": user, "scrypt": accounts.hash_password(password)})
            sup.store.set_setting(accounts.TOKENS_SETTING, [])     # a new owner: old tokens go
            sup.store.audit("admin-claimed", actor, {"user": user})
        sup.claim_until = None       # one claim per press
        return user

    def tokens(self) -> list[dict]:
        return accounts.list_tokens(self._sup.store)

    def create_token(self, name, actor: str) -> tuple[str, dict]:
        store = self._sup.store
        with store.batch():
            token, rec = accounts.create_token(store, name, self._sup.now())
            store.audit("api-token-create", actor, {"token": rec["name"]})
        return token, rec

    def delete_token(self, token_id, actor: str) -> dict:
        store = self._sup.store
        with store.batch():
            rec = accounts.delete_token(store, token_id)
            store.audit("api-token-delete", actor, {"token": rec["name"]})
        return rec

    def token_owner(self, token: str) -> dict | None:
        return accounts.token_owner(self._sup.store, token)

    # -- the technician's button --------------------------------------------------------
    def open_claim_window(self, minutes: int = 5, actor: str = "button") -> None:
        self._sup.open_claim_window(minutes, actor)

    def reset_admin(self, actor: str = "button") -> None:
        self._sup.reset_admin(actor)

    def factory_reset(self, actor: str = "button") -> None:
        self._sup.factory_reset(actor)


def _allow_as(flow: dict, lan: str) -> str | None:
    """The destination that allows a recorded flow (flows.destination_of); None for a record
    that is not a flow (the page then shows what it has)."""
    try:
        return flows.destination_of(flow, lan)
    except (KeyError, TypeError, ValueError):
        return None
