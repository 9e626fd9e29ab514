"""The supervisor's side of MQTT, with Zigbee2MQTT-style topics:

    <base>/<device>                 device telemetry, a flat JSON object   (device -> us)
    <base>/<device>/availability    "online" / "offline", retained         (device -> us)
    <base>/<device>/set             commands                               (us -> device)
    <base>/<device>/posture         {"posture", "since", "under_attack"}, retained (us -> anyone);
                                    under_attack: vocab.under_attack (its posture is attack or
                                    quarantine, or a critical alert about it is recent)
    <base>/<device>/posture/set     a posture, as text: Home Assistant's posture select (Home
                                    Assistant -> us). Only mqtt.home_assistant_user may publish
                                    there (the broker's ACL: MQTT does not tell us who published);
                                    the supervisor takes only a posture of the device's type
                                    (Ops.home_assistant_posture), retained ones never
    <base>/bridge/state             {"state": "online"|"offline"}, retained; our last will
    <base>/bridge/alerts, <base>/bridge/decisions
    <base>/<device>/alert           an alert at [notify] min_severity or above, for Home
                                    Assistant's event entity: {"event_type": severity, ...}
    <base>/bridge/event             the same for an alert about no one device
    <base>/bridge/denied            what the broker refused to devices (publishes outside their
                                    topics, connections with another's client id), once a
                                    second at most (mosquitto/kalki_denials.c) (broker -> us)
    <prefix>/status                 Home Assistant's birth message: on "online" every discovery
                                    config is published again              (Home Assistant -> us)
    Home Assistant discovery, per device (<prefix>: mqtt.discovery_prefix, "homeassistant"):
    <prefix>/sensor/kalki_<device>/posture/config          the posture
    <prefix>/binary_sensor/kalki_<device>/under_attack/config   under attack or quarantined
                                    (device class problem; the posture topic's under_attack)
    <prefix>/select/kalki_<device>/posture/config          the posture, set from Home Assistant
                                    (options: the postures of the device's type; state: the
                                    posture topic; commands: <base>/<device>/posture/set)
    <prefix>/event/kalki_<device>/alert/config             alerts (an event entity)
    <prefix>/event/kalki_bridge/alert/config               alerts about the gateway itself
                                    (kalki_<device>: the device's node id, which a rename keeps;
                                    kalki_<MAC> for the devices approved now: Bus.node_id). A
                                    device removed has all four cleared (empty, retained).

Everything a device sends is untrusted: it is checked here and counted in `rejected` by
reason, never raised into paho's network thread.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

import paho.mqtt.client as mqtt
from paho.mqtt.matcher import MQTTMatcher

from appliance.errors import KalkiError
from appliance.vocab import (
    SETTABLE_POSTURES,
    SEVERITIES,
    check_device_name,
    check_discovery_prefix,
    under_attack,
)

log = logging.getLogger("kalki.mqtt")

DISCOVERY_PREFIX = "homeassistant"   # mqtt.discovery_prefix's default, as Home Assistant's
MAX_KEYS = 64
MAX_COMMAND = 64   # bytes of a posture command: the longest posture is 10
LOG_EVERY = 10.0  # seconds between log lines for one rejection reason
AVAILABILITY = ("online", "offline")
SCALARS = (str, int, float, bool, type(None))
QUIET_SUFFIXES = {"posture", "set", "alert"}  # our own publications, if a wildcard ever echoes them
# A message that passed the checks: (kind, device, the availability state, the telemetry or the
# posture asked for).
Checked = (tuple[Literal["availability"], str, str] | tuple[Literal["telemetry"], str, dict]
           | tuple[Literal["posture"], str, str])


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")  # Python would otherwise accept NaN and Infinity


class _Matcher(MQTTMatcher):
    """paho's matcher of filtered callbacks, giving the same answers without making a cycle:
    paho (2.2) asks it about every message received, and its iter_match makes a recursive
    closure, a cycle each time (a function, its cells, a list), left to the collector: one
    per device report, 37,482 in one bench_supervisor run at 1,000 devices (a gc hook)."""

    def iter_match(self, topic):
        return self._matches(self._root, topic.split("/"), 0, not topic.startswith("$"))

    def _matches(self, node, parts: list[str], i: int, normal: bool):
        # a topic starting with $ is matched by no wildcard at its first level (MQTT 4.7.2)
        if i == len(parts):
            if node._content is not None:
                yield node._content
        else:
            if parts[i] in node._children:
                yield from self._matches(node._children[parts[i]], parts, i + 1, normal)
            if "+" in node._children and (normal or i > 0):
                yield from self._matches(node._children["+"], parts, i + 1, normal)
        if "#" in node._children and (normal or i > 0):
            content = node._children["#"]._content
            if content is not None:
                yield content


class Bus:
    def __init__(self, host: str, port: int, user: str, password: str, base: str = "kalki", *,
                 known_device: Callable[[str], bool],
                 on_telemetry: Callable[[str, dict], None],
                 on_availability: Callable[[str, str], None],
                 on_denied: Callable[[str, str, int], None] = lambda user, topic, count: None,
                 on_client_id_denied: Callable[[str, str, int], None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, max_payload: int = 4096,
                 on_connected: Callable[[], None] = lambda: None,
                 on_posture_command: Callable[[str, str], object] | None = None,
                 on_home_assistant_online: Callable[[], None] = lambda: None,
                 discovery_prefix: str = DISCOVERY_PREFIX):
        self.host, self.port, self.user, self.base = host, port, user, base
        self.discovery_prefix = check_discovery_prefix(discovery_prefix, base, "MQTT discovery prefix")
        self.known_device = known_device
        self.on_telemetry = on_telemetry
        self.on_availability = on_availability
        self.on_denied = on_denied
        # (user, client id, count): connections the broker refused because the client id was
        # not the user's. Without it they go to on_denied, the client id in the topic's place.
        self.on_client_id_denied = on_client_id_denied
        self.on_connected = on_connected   # every (re)connect, from paho's thread
        # (device, the posture asked for) from <base>/<device>/posture/set; None: not listened to
        self.on_posture_command = on_posture_command
        self.on_home_assistant_online = on_home_assistant_online   # its birth message
        # device -> its Home Assistant node id, or None for kalki_<device> (see node_id)
        self.node_of: Callable[[str], str | None] | None = None
        self.loop = loop
        self.max_payload = max_payload
        self.rejected: collections.Counter[str] = collections.Counter()
        self.denied: collections.Counter[str] = collections.Counter()   # per broker user
        self.state_topic = f"{base}/bridge/state"
        self.denied_topic = f"{base}/bridge/denied"
        self._last_logged: dict[str, float] = {}
        self._connected = threading.Event()
        self._refusal = "no answer yet"
        self._closed = False

        # "<user>-...": the broker's plugin lets only this user connect with it. The random suffix:
        # a second supervisor process (or a test) does not kick the first off.
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"{user}-{secrets.token_hex(6)}")
        self.client.username_pw_set(user, password)
        self.client.will_set(self.state_topic, json.dumps({"state": "offline"}), qos=1, retain=True)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        if isinstance(getattr(self.client, "_on_message_filtered", None), MQTTMatcher):
            self.client._on_message_filtered = _Matcher()     # empty, as paho made its own
        self.client.connect_async(host, port)
        self.client.loop_start()

    # ------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float = 10.0) -> None:
        if not self._connected.wait(timeout):
            raise KalkiError(f"MQTT broker {self.host}:{self.port} did not accept user "
                             f"{self.user!r} within {timeout:g}s: {self._refusal}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refusal = str(reason_code)
            log.warning("MQTT broker %s:%s refused %r: %s", self.host, self.port, self.user, reason_code)
            return
        client.publish(self.state_topic, json.dumps({"state": "online"}), qos=1, retain=True)
        client.publish(self.bridge_event_discovery_topic(), json.dumps(self.bridge_event_config()),
                       qos=1, retain=True)
        client.subscribe([(f"{self.base}/+", 1), (f"{self.base}/+/availability", 1),
                          (self.denied_topic, 1), (self.home_assistant_status_topic(), 1),
                          *([(f"{self.base}/+/posture/set", 1)] if self.on_posture_command else [])])
        self._connected.set()
        # A broker that restarted has lost its retained topics (persistence is off): whoever
        # owns them publishes them again. An error there must not end paho's thread.
        try:
            self.on_connected()
        except Exception:     # noqa: BLE001
            log.exception("MQTT: the on-connect callback failed")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if not self._closed:
            log.warning("MQTT connection to %s:%s lost: %s", self.host, self.port, reason_code)

    def close(self, timeout: float = 2.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self.client.is_connected():
            # A clean disconnect suppresses the last will, so say it ourselves.
            info = self.client.publish(self.state_topic, json.dumps({"state": "offline"}),
                                       qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass  # the connection went at the same moment; the will covers it
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    # ------------------------------------------------------------ incoming

    def _on_message(self, client, userdata, message) -> None:
        # paho's thread: hand the raw message over, the checks call the supervisor.
        if self.loop is None:
            self.handle(message.topic, message.payload, message.retain)
            return
        try:
            self.loop.call_soon_threadsafe(self.handle, message.topic, message.payload, message.retain)
        except RuntimeError:
            pass  # the loop is closed: we are shutting down

    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Check one incoming message and pass it on, or count why not. Never raises."""
        try:
            if topic == self.denied_topic:
                self._count_denied(payload)
                return
            if topic == self.home_assistant_status_topic():
                if payload == b"online":
                    self.on_home_assistant_online()
                return
            parsed = self._check(topic, payload, retained)
            if parsed is None:
                return
            if parsed[0] == "availability":
                _, device, state = parsed
                self.on_availability(device, state)
            elif parsed[0] == "posture":
                _, device, asked = parsed
                if self.on_posture_command is not None:
                    self.on_posture_command(device, asked)
            else:
                _, device, data = parsed
                self.on_telemetry(device, data)
        except Rejected as exc:
            self.rejected[exc.reason] += 1
            self._log_rejection(exc.reason, topic, str(exc))
        except Exception:
            log.exception("handling MQTT message on %s failed", topic)

    def _check(self, topic: str, payload: bytes, retained: bool = False) -> Checked | None:
        prefix = f"{self.base}/"
        if not topic.startswith(prefix):
            raise Rejected("bad_topic", "outside the base topic")
        levels = topic[len(prefix):].split("/")
        device = levels[0]
        if device == "bridge" or (len(levels) == 2 and levels[1] in QUIET_SUFFIXES):
            return None
        if levels[1:] == ["posture", "set"]:
            return self._check_posture_command(device, payload, retained)
        if len(levels) > 2 or (len(levels) == 2 and levels[1] != "availability"):
            raise Rejected("bad_topic", "not a device topic")
        try:
            check_device_name(device)
        except KalkiError:
            raise Rejected("bad_topic", f"bad device name {device!r}") from None
        if not self.known_device(device):
            raise Rejected("unknown_device", f"unknown device {device!r}")
        if len(payload) > self.max_payload:
            raise Rejected("oversized", f"{len(payload)} bytes from {device}")

        if len(levels) == 2:
            state = payload.decode("ascii", errors="replace")
            if state not in AVAILABILITY:
                raise Rejected("malformed", f"availability {state[:20]!r} from {device}")
            return "availability", device, state

        try:
            data = json.loads(payload.decode("utf-8"), parse_constant=_no_constants)
        except (UnicodeDecodeError, ValueError) as exc:
            raise Rejected("malformed", f"not JSON from {device}: {exc}") from None
        except RecursionError:     # "[[[[..." under max_payload: a device must not crash us
            raise Rejected("malformed", f"JSON nested too deeply from {device}") from None
        if not isinstance(data, dict):
            raise Rejected("malformed", f"telemetry from {device} is not a JSON object")
        if len(data) > MAX_KEYS:
            raise Rejected("malformed", f"{len(data)} keys from {device}")
        for key, value in data.items():
            if not isinstance(value, SCALARS) or (isinstance(value, float) and not math.isfinite(value)):
                raise Rejected("malformed", f"{key!r} from {device} is not a scalar")
        if "device" in data and data["device"] != device:
            raise Rejected("forged", f"{device} claims to be {data['device']!r}")
        return "telemetry", device, data

    def _check_posture_command(self, device: str, payload: bytes, retained: bool) -> Checked:
        """Home Assistant's posture select. Only its shape here; whether the posture is one the
        device may take is the supervisor's to say (and to audit, naming the device and value)."""
        try:
            check_device_name(device)
        except KalkiError:
            raise Rejected("bad_topic", f"posture command for a bad device name {device!r}") from None
        if retained:
            # a retained command would be obeyed again at every reconnect, long after it was given
            raise Rejected("retained", f"a retained posture command for {device} (ignored)")
        if len(payload) > MAX_COMMAND:
            raise Rejected("oversized", f"posture command of {len(payload)} bytes for {device}")
        try:
            asked = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("malformed", f"posture command for {device} is not UTF-8 text") from None
        return "posture", device, asked

    def _count_denied(self, payload: bytes) -> None:
        """The broker's report of what it refused to devices: publishes ("denied", by topic) and
        connections with a client id that is not the user's ("connects", by client id; absent
        from an older plugin's reports). Only the broker and the supervisor's own user can write
        this topic, and it is checked all the same."""
        def entries(listed: object, what: str) -> list[tuple[str, str, int]]:
            if not isinstance(listed, list):
                raise ValueError("bad shape")
            checked = []
            for e in listed:
                user, name, count = e["user"], e[what], e["count"]
                if not (isinstance(user, str) and isinstance(name, str)
                        and isinstance(count, int) and count > 0):
                    raise ValueError(f"bad entry {e!r}")
                checked.append((user, name, count))
            return checked

        try:
            try:
                report = json.loads(payload.decode("utf-8"), parse_constant=_no_constants)
            except RecursionError:
                raise ValueError("nested too deeply") from None
            untracked = report.get("untracked", 0)
            if not isinstance(untracked, int) or untracked < 0:
                raise ValueError("bad shape")
            publishes = entries(report["denied"], "topic")
            connects = entries(report.get("connects", []), "client_id")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise Rejected("malformed", f"broker's denied report: {exc}") from None
        if untracked:
            self.rejected["denied"] += untracked
            self.denied["(untracked)"] += untracked
        for user, topic, count in publishes:
            self.rejected["denied"] += count
            self.denied[user] += count
            self._log_rejection("denied", topic, f"{user} may not publish there, {count} time(s)")
            self.on_denied(user, topic, count)
        for user, client_id, count in connects:
            self.rejected["denied"] += count
            self.denied[user] += count
            self._log_rejection("denied", self.denied_topic,
                                f"{user} may not connect as client id {client_id!r}, {count} time(s)")
            if self.on_client_id_denied is not None:
                self.on_client_id_denied(user, client_id, count)
            else:
                self.on_denied(user, f"client id {client_id}", count)

    def _log_rejection(self, reason: str, topic: str, detail: str) -> None:
        # A flooding device must not flood the log as well.
        now = time.monotonic()
        if now - self._last_logged.get(reason, -LOG_EVERY) < LOG_EVERY:
            return
        self._last_logged[reason] = now
        log.warning("rejected MQTT message on %s (%s): %s; %d %s so far",
                    topic, reason, detail, self.rejected[reason], reason)

    # ------------------------------------------------------------ outgoing

    def _publish(self, topic: str, payload: dict | str, retain: bool = False) -> mqtt.MQTTMessageInfo:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        return self.client.publish(topic, text, qos=1, retain=retain)

    def posture_topic(self, device: str) -> str:
        return f"{self.base}/{check_device_name(device)}/posture"

    def node_id(self, device: str) -> str:
        """The device's Home Assistant node id: the discovery topics' node, the unique_ids' stem
        and the HA device's identifier. node_of's (the supervisor's, which a rename keeps: so
        Home Assistant keeps the entity), else kalki_<device>."""
        node = self.node_of(device) if self.node_of else None
        return node or f"kalki_{check_device_name(device)}"

    def discovery_topic(self, device: str) -> str:
        return f"{self.discovery_prefix}/sensor/{self.node_id(device)}/posture/config"

    def under_attack_discovery_topic(self, device: str) -> str:
        return f"{self.discovery_prefix}/binary_sensor/{self.node_id(device)}/under_attack/config"

    def select_discovery_topic(self, device: str) -> str:
        return f"{self.discovery_prefix}/select/{self.node_id(device)}/posture/config"

    def posture_command_topic(self, device: str) -> str:
        return f"{self.posture_topic(device)}/set"

    def home_assistant_status_topic(self) -> str:
        return f"{self.discovery_prefix}/status"

    def clear_posture(self, device: str) -> mqtt.MQTTMessageInfo:
        """An empty retained payload: the broker forgets the posture under this name (renamed)."""
        return self._publish(self.posture_topic(device), "", retain=True)

    def publish_posture(self, device: str, posture: str, since_iso: str,
                        attacked: bool | None = None) -> mqtt.MQTTMessageInfo:
        """attacked: whether the device is under attack (the supervisor knows its alerts too);
        None: as its posture says (vocab.under_attack)."""
        return self._publish(self.posture_topic(device), {
            "posture": posture, "since": since_iso,
            "under_attack": under_attack(posture) if attacked is None else attacked}, retain=True)

    def publish_alert(self, alert: dict) -> mqtt.MQTTMessageInfo:
        return self._publish(f"{self.base}/bridge/alerts", alert)

    def publish_decision(self, decision: dict) -> mqtt.MQTTMessageInfo:
        return self._publish(f"{self.base}/bridge/decisions", decision)

    def publish_telemetry(self, device: str, payload: dict) -> mqtt.MQTTMessageInfo:
        """For a polled device (appliance.telemetry.adapters): its state where it would publish it."""
        return self._publish(f"{self.base}/{device}", payload)

    def send_command(self, device: str, payload: dict) -> mqtt.MQTTMessageInfo:
        return self._publish(f"{self.base}/{check_device_name(device)}/set", payload)

    def _ha_device(self, device: str, device_type: str) -> dict:
        """The Home Assistant device every entity of the device belongs to."""
        return {"identifiers": [self.node_id(device)], "name": device, "model": device_type,
                "manufacturer": "Kalki"}

    def discovery_config(self, device: str, device_type: str) -> dict:
        return {
            "name": "Posture",
            "unique_id": f"{self.node_id(device)}_posture",
            "state_topic": self.posture_topic(device),
            "value_template": "{{ value_json.posture }}",
            "availability_topic": self.state_topic,
            "availability_template": "{{ value_json.state }}",
            "device": self._ha_device(device, device_type),
        }

    def under_attack_config(self, device: str, device_type: str) -> dict:
        """A problem binary sensor: on while the device is under attack (vocab.under_attack)."""
        return {
            "name": "Under attack",
            "unique_id": f"{self.node_id(device)}_under_attack",
            "device_class": "problem",
            "state_topic": self.posture_topic(device),
            "value_template": "{{ 'ON' if value_json.under_attack else 'OFF' }}",
            "payload_on": "ON",
            "payload_off": "OFF",
            "availability_topic": self.state_topic,
            "availability_template": "{{ value_json.state }}",
            "device": self._ha_device(device, device_type),
        }

    def select_config(self, device: str, device_type: str, postures: Sequence[str]) -> dict:
        """The posture as a select: its state is the posture topic's, and picking an option
        publishes it, as text, on the command topic (not retained, Home Assistant's default)."""
        return {
            "name": "Set posture",
            "unique_id": f"{self.node_id(device)}_posture_select",
            "state_topic": self.posture_topic(device),
            "value_template": "{{ value_json.posture }}",
            "command_topic": self.posture_command_topic(device),
            "options": list(postures),
            "qos": 1,
            "availability_topic": self.state_topic,
            "availability_template": "{{ value_json.state }}",
            "device": self._ha_device(device, device_type),
        }

    def discovery_configs(self, device: str, device_type: str,
                          postures: Sequence[str] = SETTABLE_POSTURES) -> dict[str, dict]:
        """{discovery topic: config} of every entity of the device; postures: its type's."""
        return {
            self.discovery_topic(device): self.discovery_config(device, device_type),
            self.under_attack_discovery_topic(device): self.under_attack_config(device, device_type),
            self.select_discovery_topic(device): self.select_config(device, device_type, postures),
            self.event_discovery_topic(device): self.event_config(device, device_type),
        }

    def publish_discovery(self, device: str, device_type: str,
                          postures: Sequence[str] = SETTABLE_POSTURES) -> mqtt.MQTTMessageInfo:
        """The device's posture sensor, under-attack sensor, posture select and alert event
        entity; postures: the select's options, the postures of the device's type."""
        sent = [self._publish(topic, config, retain=True)
                for topic, config in self.discovery_configs(device, device_type, postures).items()]
        return sent[-1]

    def remove_discovery(self, device: str) -> mqtt.MQTTMessageInfo:
        # An empty retained payload clears the retained config; Home Assistant drops the entity.
        sent = [self._publish(topic, "", retain=True) for topic in self.discovery_configs(device, "")]
        return sent[-1]

    # Alerts as Home Assistant events: an `event` entity per device (and one for the gateway),
    # whose event_type is the alert's severity; kind, message, time and source are attributes.
    def event_topic(self, device: str | None) -> str:
        if device is None:
            return f"{self.base}/bridge/event"
        return f"{self.base}/{check_device_name(device)}/alert"

    def event_discovery_topic(self, device: str) -> str:
        return f"{self.discovery_prefix}/event/{self.node_id(device)}/alert/config"

    def bridge_event_discovery_topic(self) -> str:
        return f"{self.discovery_prefix}/event/kalki_bridge/alert/config"

    def event_config(self, device: str, device_type: str) -> dict:
        return {
            "name": "Alert",
            "unique_id": f"{self.node_id(device)}_alert",
            "state_topic": self.event_topic(device),
            "event_types": list(SEVERITIES),
            "availability_topic": self.state_topic,
            "availability_template": "{{ value_json.state }}",
            "device": self._ha_device(device, device_type),
        }

    def bridge_event_config(self) -> dict:
        """The gateway's own event entity (alerts about no one device), at
        bridge_event_discovery_topic()."""
        return {"name": "Alert", "unique_id": "kalki_bridge_alert", "state_topic": self.event_topic(None),
                "event_types": list(SEVERITIES), "availability_topic": self.state_topic,
                "availability_template": "{{ value_json.state }}",
                "device": {"identifiers": ["kalki_bridge"], "name": "Kalki gateway",
                           "model": "gateway", "manufacturer": "Kalki"}}

    def publish_alert_event(self, alert: dict, message: str = "") -> mqtt.MQTTMessageInfo:
        """An alert (at [notify] min_severity or above) to its device's event entity, or the
        gateway's; not retained (an event happens once)."""
        device = alert.get("device") if isinstance(alert.get("device"), str) else None
        return self._publish(self.event_topic(device), {
            "event_type": alert.get("severity") or "warning", "kind": alert.get("type"),
            "device": device, "message": message, "at": alert.get("at"),
            "source": alert.get("source")})

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
