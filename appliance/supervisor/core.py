"""The supervisor (`kalki run`): one asyncio process that knows every device, holds its posture,
and moves postures from kernel alerts, MQTT telemetry, other devices' state and the time of day,
enforcing each change through the data path and reading it back before calling it enforced.

It is the only writer of the store. The MQTT client thread, the neighbour monitor thread and the
control socket hand their events to the loop; nothing else touches the state.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import datetime
import functools
import inspect
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import policy
from appliance.config import Config
from appliance.dataplane import umbox
from appliance.dataplane.api import DeviceSpec
from appliance.dataplane.port import DataplanePort
from appliance.errors import ConfigError, KalkiError, UnknownDeviceError
from appliance.policy import profiles
from appliance.store.state import RULES_OFF_KEY, Retention, Store
from appliance.supervisor import logins, notify
from appliance.supervisor.clock import Clock
from appliance.supervisor.flows import Flows
from appliance.supervisor.memory import Collector, Listeners, Recent, give_back_free_memory
from appliance.supervisor.traffic import Traffic
from appliance.supervisor.watch import Watch
from appliance.vocab import (
    MAX_POSTURE_SECONDS,
    POSTURE_CODES,
    POSTURES,
    SETTABLE_POSTURES,
    UNDER_ATTACK_ALERT_SECONDS,
    check_device_name,
    check_posture,
    device_name_for,
    iso,
    mud_authority,
    severity_of,
    stricter,
    under_attack,
)

log = logging.getLogger("kalki.supervisor")
POLLS_SETTING = "polls"      # the poll actions in force (restore_polls)
RESERVED_NAMES = ("bridge",)  # kalki/bridge/... is the supervisor's (appliance.system.broker)
MUD_RETRY_SECONDS = 300      # a MUD file that could not be fetched is tried again after this
MUD_FETCHES = 2              # MUD files fetched at once (the others wait their turn)
PRUNE_SECONDS = 60           # how often the ticker applies the retention limits

class KnownDevices(dict):
    """The supervisor's devices by name; `version` moves whenever a device comes, goes, or
    changes its type or group, so what is derived from those (the rules' index of types and
    groups) knows when to be made again. A posture change leaves it: 25 cameras moved by one
    rule made the index of 1,000 devices again for each camera's own rules. A record is
    replaced whole, never changed in place."""

    SELECTED_BY = ("type", "group")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.version = 0

    def _changed(self) -> None:
        self.version += 1

    def __setitem__(self, key, value):
        old = self.get(key)
        super().__setitem__(key, value)
        if old is None or any(old.get(k) != value.get(k) for k in self.SELECTED_BY):
            self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def clear(self):
        super().clear()
        self._changed()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def pop(self, *args):
        value = super().pop(*args)
        self._changed()
        return value

    def popitem(self):
        item = super().popitem()
        self._changed()
        return item

    def setdefault(self, key, default=None):
        value = super().setdefault(key, default)
        self._changed()
        return value


def _no_ring() -> None:
    """Supervisor.kernel_first until appliance.run hands the data path's in: no ring to read."""


class Supervisor:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.clock = Clock(cfg.policy.fake_time)
        self.profiles = profiles.load_all(Path(cfg.profiles) if cfg.profiles else profiles.PROFILE_DIR)
        s = cfg.state
        self.store = Store(Path(s.directory), Retention(s.history_per_device, s.alerts, s.decisions,
                                                        s.max_age_days), clock=self.clock.now)
        self.known = KnownDevices({d["name"]: d for d in self.store.devices()})
        self._selection: tuple[int, dict[tuple[str, str], list[str]]] = (-1, {})
        self._renamed = self._rename_bad_names()
        self.engine = policy.Engine(self.rules())
        self._dp: DataplanePort | None = None
        self.bus: Any = None       # telemetry.mqtt.Bus, handed in by appliance.run (None: MQTT off)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started_ns = time.monotonic_ns()
        self.reconcile_report: dict = {}
        self.recent = Recent()
        self.watch = Watch(self)     # the kernel and the disk, checked from the ticker
        self._judged_since: dict[str, datetime.datetime] = {}   # see _judge_from
        # device -> when (monotonic s) its last critical alert came, while that makes it "under
        # attack" for Home Assistant (vocab.under_attack; see under_attack_now)
        self._critical_at: dict[str, float] = {}
        self._stop = asyncio.Event()
        self.counters: collections.Counter[str] = collections.Counter()
        self.collector = Collector()                # collections by the ticker
        self.trim_pause_max_ms = 0.0                # the C heap's free pages given back, after each full one
        self.listeners = Listeners()
        self.site_error: str | None = None   # the site file's error (appliance.run), on the LEDs and the page
        self.isolation_warning: str | None = None   # devices reach each other unseen (appliance.run)
        self.adapter: Any = None   # telemetry.adapters: polls devices with an HTTP API and no MQTT
        # Acts on the kernel's events waiting in its ring, if any (appliance.run.kernel_first):
        # called before each telemetry report and each of the ticker's steps, so that an attack
        # waits for the one piece of work under way, not for all that was queued before it.
        self.kernel_first: Callable[[], None] = _no_ring
        # system.broker.BrokerFiles (appliance.run): Home Assistant's password on the broker
        self.broker_files: Any = None
        self.polls: dict[str, dict] = {}   # the rule action poll's intervals in force: see poll_of
        self.evaluations = Evaluations()    # how long stimuli held the loop (status: evaluations)
        self._evaluating = 0                # _evaluate's depth: the posture changes it sets off nest
        self.clones: dict[str, dict] = {}  # MAC -> the clone seen below the gateway: see on_clone
        self._gate_credentials: str | None = None   # what sync_gate_credentials last wrote
        self.panel: Any = None     # faces.panel.Panel: the LEDs and the button, when enabled
        self.claim_until: datetime.datetime | None = None
        self.auth_epoch = 0                        # bumped when the admin password is reset
        self._names_saved: list = []
        self.flows = self._load_flows()
        self.traffic = self._load_traffic()        # the page's traffic charts; None if off
        self.heartbeat = time.monotonic()          # the loop's last tick (the panel's watchdog)
        self.availability: dict[str, str] = {}     # from MQTT, not worth a write to the SD card
        self.suggestions: dict[str, str] = {}      # profile matches for new devices
        # A renamed device keeps the broker user and topic it was set up with (its mqtt_user):
        # {mqtt_user: device}, see device_for_topic. And each device's Home Assistant node id,
        # kept after it is removed (its discovery is cleared by it): see ha_node.
        self._mqtt_owner: dict[str, str] = {d["mqtt_user"]: n for n, d in self.known.items()
                                            if d.get("mqtt_user")}
        self._nodes: dict[str, str] = {}
        # MUD files fetched for new devices ([mud] fetch): the URLs being fetched, and when a
        # fetch last failed (and why); see _offer. The offer itself is on the device (mud_offer).
        self._mud_fetching: set[str] = set()
        self._mud_failed: dict[str, tuple[float, str]] = {}
        self._mud_tasks: set[asyncio.Future] = set()
        self._mud_executor: concurrent.futures.ThreadPoolExecutor | None = None   # its own threads
        # The default-login checks running, one per device at most (see check_logins), and the
        # address they go to instead of the device's (tests only: None is the device's own).
        self._login_checks: dict[str, asyncio.Future] = {}
        self.login_address: str | None = None
        # Notifications ([notify]): alerts at min_severity and above, sent off the loop
        # (appliance.supervisor.notify); appliance.run wires its words (ops' explanation).
        self.notifier = notify.Notifier(cfg.notify, now=self.now,
                                        timezone=lambda: self.settings()["timezone"],
                                        on_failure=self._notify_failed)
        for name, d in self.known.items():
            offer = d.get("mud_offer") or {}
            if not d.get("approved") and offer.get("state") == "offered" and offer.get("type"):
                self.suggestions[name] = offer["type"]

    # -- the rules ------------------------------------------------------------------------
    def rules(self) -> list[policy.Rule]:
        """Every rule: built-in, from the profiles, the site's; a built-in or profile rule the
        operator switched off (Ops.set_rule_enabled) is there, disabled."""
        rules = policy.builtin_rules()
        for p in self.profiles.values():
            rules += p.rules
        off = set(self.store.get_setting(RULES_OFF_KEY) or ())
        rules = [dataclasses.replace(r, enabled=False) if r.name in off else r for r in rules]
        for i, r in enumerate(self.store.rules()):
            data = {k: v for k, v in r.items() if k not in ("updated",)}
            rules.append(policy.parse_rule(data, f"site rule {r.get('name', i)}", source="site"))
        return rules

    def _rename_bad_names(self) -> list[tuple[str, str]]:
        """A name an older version let in (a dot, say) that the name rule refuses now would stop
        every start (the data path and the broker refuse it): the device gets a name that fits,
        keeps its MAC, posture and approval, and the operator is told (start())."""
        renamed = []
        for name, d in list(self.known.items()):
            try:
                check_device_name(name)
            except ConfigError:
                new = device_name_for(name, d["mac"], self.known)
                try:
                    self.known[new] = self.store.rename_device(name, new)
                except KalkiError as e:
                    log.error("device %r: %s", name, e)
                    continue
                del self.known[name]
                self.store.audit("device-renamed", "supervisor", {"from": name, "to": new})
                renamed.append((name, new))
                log.warning("device %r renamed %r: the name rule refuses the old name", name, new)
        return renamed

    def reload_rules(self) -> None:
        self.engine.replace_rules(self.rules())

    # -- policy.Facts ---------------------------------------------------------------------
    def now(self) -> datetime.datetime:
        return self.clock.now()

    def devices(self) -> list[str]:
        return list(self.known)

    def device_type(self, device: str) -> str | None:
        d = self.known.get(device)
        return d.get("type") if d else None

    def group_of(self, device: str) -> str | None:
        d = self.known.get(device)
        return d.get("group") if d else None

    def devices_where(self, key: str, value: str) -> list[str]:
        """The devices of a type or a group: indexed once per change of the devices, since the
        rules ask on every report (1,000 devices read 1,000 times a second, otherwise)."""
        version, index = self._selection
        if version != self.known.version:
            index = {}
            for name, d in self.known.items():
                for k in ("type", "group"):
                    if d.get(k) is not None:
                        index.setdefault((k, d[k]), []).append(name)
            self._selection = (self.known.version, index)
        return list(index.get((key, value), ()))

    def alerts(self, device, types, since) -> int:
        judged = self._judged_since.get(device) if device is not None else None
        return self.recent.alerts(device, types, since if judged is None else max(since, judged))

    def _judge_from(self, name: str, at: datetime.datetime) -> None:
        """An operator (or an expiry) lowered the device's posture: what happened before is
        judged, and the rules look only at what comes after. A rule whose condition held
        is re-armed, so the next alert escalates again at once."""
        self._judged_since[name] = at
        self.engine.forget(name)
        self._critical_at.pop(name, None)

    def telemetry(self, device, field, last=None, since=None) -> list:
        return self.recent.telemetry(device, field, last, since)

    def recent_telemetry(self, device: str, limit: int = 20) -> list[tuple[datetime.datetime, dict]]:
        """The device's last reports, newest first, for people to read."""
        return self.recent.reports(device, limit, self.now().tzinfo)

    def posture(self, device: str) -> str:
        d = self.known.get(device)
        return d["posture"] if d else "unknown"

    def settings(self) -> dict:
        # Two settings read alone: the rules ask on every report, and a copy of all of them
        # (the polls in force, the accounts, ...) was most of an intrusion burst's time.
        p = self.cfg.policy
        hours, tz = self.store.get_setting("business_hours"), self.store.get_setting("timezone")
        return {"business_hours": hours or
                {"days": p.business_days, "start": p.business_start, "end": p.business_end},
                "timezone": tz if tz not in (None, "UTC") else p.timezone}

    # -- life cycle -----------------------------------------------------------------------
    @property
    def dp(self) -> DataplanePort:
        if self._dp is None:
            raise KalkiError("the supervisor has no data path yet (attach() comes first)")
        return self._dp

    def enforced_devices(self) -> dict:
        """The devices the data path holds ({} before it is attached)."""
        return self._dp.devices if self._dp is not None else {}

    @property
    def attached(self) -> bool:
        return self._dp is not None

    def enforced(self, name: str) -> bool:
        return name in self.dp.devices

    def attach(self, dp: DataplanePort, loop: asyncio.AbstractEventLoop) -> None:
        """Takes the opened data path, converges it to the store, and owns it from now on."""
        self._dp, self.loop = dp, loop
        if loop is not None:
            self.notifier.loop = loop
        self._keep_stricter_kernel_postures()
        for old, new in self._renamed:
            self.raise_alert(new, "device-renamed", "supervisor", {"from": old, "to": new},
                             time.monotonic_ns())
        self.reconcile_report = self.dp.reconcile(self.wanted())
        self.store.audit("reconcile", "supervisor", self.reconcile_report)
        log.info("reconciled the data path: %s", {k: v for k, v in self.reconcile_report.items() if v})
        self.make_ahead()
        clash = self.home_assistant_clash()
        if clash is not None:
            log.error("device %s logs in to the broker as %r, mqtt.home_assistant_user: Home "
                      "Assistant's posture commands are refused", clash, self.cfg.mqtt.home_assistant_user)
            self.raise_alert(clash, "mqtt-user-clash", "supervisor",
                             {"user": self.cfg.mqtt.home_assistant_user}, time.monotonic_ns())
        older = getattr(dp, "older_layout", None)
        if older:
            self.store.audit("dataplane-replaced", "supervisor", {"why": older})
            self.raise_alert(None, "dataplane-replaced", "supervisor", {"why": older},
                             time.monotonic_ns())
        self._restore_names()

    def make_ahead(self) -> None:
        """What a move to any posture of any profile would otherwise make on its way
        (Dataplane.prepare: nftables' connection-limit classes), made now: at the start and
        when a profile is imported. A failure is logged; a posture change that needs a class
        still makes it itself."""
        if self._dp is None:
            return
        try:
            made = self.dp.prepare(s for p in self.profiles.values() for s in p.postures.values())
            if made:
                log.info("made ahead the connection-limit classes %s", ", ".join(made))
        except KalkiError as e:
            log.error("the connection-limit classes could not be made ahead: %s", e)

    # -- flows devices opened outside their profiles: learnt and refused ------------------
    @property
    def _flows_path(self) -> Path:
        return self.store.directory / "flows.json"

    def _load_flows(self) -> Flows:
        try:
            return Flows.from_json(json.loads(self._flows_path.read_text()))
        except FileNotFoundError:
            return Flows()
        except (OSError, ValueError) as e:
            log.warning("%s: not read (%s): learnt and refused flows start empty", self._flows_path, e)
            return Flows()

    def _record_flow(self, device: str, kind: str, e: dict) -> bool:
        """Records a flow outside the device's profile; True if that is all it is (no alert):
        while learning, or a refusal."""
        d = self.known.get(device)
        learning = d is not None and d.get("posture") == "learning"
        if kind not in ("egress-refused", "egress-report", "egress-anomaly"):
            return False
        try:
            names = self.dp.resolved_names(device, e.get("dst", ""))
        except KalkiError:
            names = []
        if learning:
            self.flows.record("learnt", device, e, names, iso(self.now()))
            return True
        if kind == "egress-refused" or e.get("action") != "reported":
            self.flows.record("refused", device, e, names, iso(self.now()))
        return kind == "egress-refused"

    # -- traffic: each device's kernel counters over the last hour and day ----------------
    def _load_traffic(self) -> Traffic | None:
        if not self.cfg.state.traffic_charts:
            return None
        traffic = Traffic(self.store.directory / "traffic.bin")
        traffic.load()
        for old, new in self._renamed:
            traffic.rename(old, new)
        traffic.keep(self.known)          # devices removed while the supervisor was stopped
        return traffic

    # -- names: the addresses devices resolved, outliving restarts -------------------------
    @property
    def _names_path(self) -> Path:
        return self.store.directory / "names.json"

    def _restore_names(self) -> None:
        """The bindings of the last snapshot, where their time has not run out: devices
        reconnect to addresses they resolved long before a restart or a reboot."""
        entries: list = []
        try:
            loaded = json.loads(self._names_path.read_text())
            if isinstance(loaded, list):
                entries = [e for e in loaded if isinstance(e, dict) and isinstance(e.get("address"), str)
                           and isinstance(e.get("expires"), (int, float))]
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("%s: not read (%s): names are learnt anew from the next lookups",
                        self._names_path, e)
        try:
            report = self.dp.restore_names(entries)
        except (KalkiError, ValueError) as e:
            log.error("restoring the name bindings: %s", e)
            return
        self._names_saved = entries
        log.info("name bindings: %s", report)

    async def _save_names(self) -> None:
        """Expires what ran out, then writes the snapshot if it changed (off the loop: the
        SD card may stall)."""
        self.dp.expire_names()
        snapshot = self.dp.name_snapshot()
        writes: list[tuple[Path, Any]] = []
        if snapshot != self._names_saved:
            writes.append((self._names_path, snapshot))
        if self.flows.changed:
            writes.append((self._flows_path, self.flows.to_json()))
        if not writes:
            return

        def write() -> None:
            for path, data in writes:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, path)
        await asyncio.to_thread(write)
        self._names_saved = snapshot
        self.flows.changed = False

    def _keep_stricter_kernel_postures(self) -> None:
        """Reconcile never lowers protection by itself: where the kernel holds a stricter
        posture than the store (a decision whose write was lost, a crash between the two), the
        kernel's stays, the store follows, and the operator is told."""
        kernel = self.dp.kernel_postures()
        for name, d in list(self.known.items()):
            code = kernel.get(d["mac"])
            if code is None or not d.get("approved") or not 0 <= code < len(POSTURES):
                continue
            held = POSTURES[code]
            if stricter(held, d["posture"]):
                log.warning("%s: the kernel holds %s, the store %s: keeping %s", name, held,
                            d["posture"], held)
                self.known[name] = {**d, "posture": held, "posture_expires": None,
                                    "posture_revert_to": None, "posture_after": []}
                try:
                    self._update_device(name, posture=held)
                    self.store.record_posture(name, held, "kept from the kernel at start")
                except KalkiError as e:
                    log.error("%s: %s", name, e)
                self.store.audit("posture-kept", "supervisor",
                                 {"device": name, "kernel": held, "store": d["posture"]})
                self.raise_alert(name, "posture-kept", "supervisor",
                                 {"kernel": held, "store": d["posture"]}, time.monotonic_ns())

    def attach_bus(self, bus) -> None:
        """Takes the MQTT side (None: MQTT off). It calls republish() on every connect."""
        self.bus = bus
        if bus is not None:
            bus.node_of = self.ha_node       # Home Assistant's node id per device: kept on a rename

    def republish(self) -> None:
        """Every approved device's retained posture and Home Assistant discovery, again: after
        a (re)connect, since a restarted broker has forgotten them."""
        if self.bus is None:
            return
        self.counters["mqtt_republished"] += 1
        for name, d in self.known.items():
            if d.get("approved"):
                self._publish_posture(name)
                self.publish_discovery(name)

    def _publish_posture(self, name: str) -> None:
        d = self.known[name]
        self.bus.publish_posture(name, d["posture"], d.get("posture_since") or "",
                                 self.under_attack_now(name))

    def publish_discovery(self, name: str) -> None:
        """The device's Home Assistant entities (appliance.telemetry.mqtt), its select offering
        the postures of its type."""
        self.bus.publish_discovery(name, self.known[name].get("type") or "generic",
                                   self.posture_options(name))

    def posture_options(self, name: str) -> list[str]:
        """The settable postures of the device's type but "learning": Home Assistant's select
        offers these. Learning set from there would have no end, and it is the most permissive
        posture (`kalki device learn` sets it, for a while)."""
        d = self.device(name)
        profile = self.profiles.get(d.get("type") or "")
        if profile is None:
            # Its type's profile is gone, so nothing can be set (set_posture): the one option is
            # where it is, or normal rather than offer learning.
            return [d["posture"] if d["posture"] != "learning" else "normal"]
        return [p for p in SETTABLE_POSTURES if p in profile.postures and p != "learning"]

    def under_attack_now(self, name: str) -> bool:
        """Home Assistant's "under attack" (vocab.under_attack): the device's posture, or a
        critical alert about it in the last UNDER_ATTACK_ALERT_SECONDS that no lowering of its
        posture has judged since (_judge_from)."""
        d = self.known.get(name)
        at = self._critical_at.get(name)
        recent = at is not None and time.monotonic() - at < UNDER_ATTACK_ALERT_SECONDS
        return d is not None and under_attack(d["posture"], recent)

    def _expire_critical_alerts(self) -> None:
        """A critical alert no longer recent: Home Assistant's sensor follows the posture again."""
        for name, at in list(self._critical_at.items()):
            if time.monotonic() - at >= UNDER_ATTACK_ALERT_SECONDS:
                del self._critical_at[name]
                if self.bus and self.known.get(name, {}).get("approved"):
                    self._publish_posture(name)

    def start_ticker(self) -> None:
        assert self.loop is not None
        self.loop.create_task(self._ticker())

    def enforced_count(self) -> int:
        return len(self.wanted())

    def close(self) -> None:
        """Stops listening; what is in the kernel stays and keeps protecting."""
        if self.panel:
            self.panel.close()
            self.panel = None
        if self.adapter:
            self.adapter.close()
            self.adapter = None
        if self.bus:
            self.bus.close()
            self.bus = None
        if self._dp:
            self._dp.close()
        if self._mud_executor:
            self._mud_executor.shutdown(wait=False, cancel_futures=True)
        self.notifier.close()
        for task in list(self._login_checks.values()):
            task.cancel()
        self._stop.set()
        if self.traffic is not None:
            self.traffic.save()
        self.store.close()

    def stack_of(self, d: dict, posture: str) -> dict:
        """The device's umbox stack in a posture: its profile's, and where that names
        destinations, the device's own (`kalki device allow`) on top."""
        stack = self.profiles[d["type"]].stack(posture)
        own = d.get("allow") or []
        if not own:
            return stack
        stack = {k: dict(v) for k, v in stack.items()}
        for umbox_name in ("allowlist", "egress_anomaly"):
            if stack.get(umbox_name, {}).get("destinations") is not None:
                stack[umbox_name]["destinations"] = [*stack[umbox_name]["destinations"], *own]
        return stack

    def wanted(self) -> list[DeviceSpec]:
        """What the data path should hold: every approved device with an address, in its posture."""
        out = []
        peers: list = []
        for d in self.known.values():
            if d.get("approved") and d.get("type") in self.profiles and d.get("ip"):
                stack = self.stack_of(d, d["posture"])
                out.append(self._spec(d, stack, POSTURE_CODES.get(d["posture"], 0), peers))
        return out

    # -- RFC 8520: a device's MUD URL, and the devices of a manufacturer -------------------
    def mud_url_of(self, d: dict) -> str | None:
        """The device's MUD URL, whose host is its MUD authority (what same-manufacturer and
        manufacturer compare) and which the site's my_controllers are keyed by: its profile's
        mud_url (the MUD file the operator imported and approved the device under), else the URL
        the device sends in DHCP (option 161). The profile's comes first: what a device sends is
        its own claim, and a device that changed it would otherwise join another maker's devices."""
        p = self.profiles.get(d.get("type") or "")
        return (p.mud_url if p else None) or (d.get("identity") or {}).get("mud_url") or None

    def _peers(self) -> dict[str, list[str]]:
        """{MUD authority: the addresses of the approved devices with it} (the devices wanted()
        gives the data path)."""
        out: dict[str, list[str]] = {}
        for d in self.known.values():
            if d.get("approved") and d.get("type") in self.profiles and d.get("ip"):
                authority = mud_authority(self.mud_url_of(d))
                if authority:
                    out.setdefault(authority, []).append(d["ip"])
        return {a: sorted(ips) for a, ips in out.items()}

    def _spec(self, d: dict, stack: dict, code: int, peers: list) -> DeviceSpec:
        """The device as the data path takes it, with its MUD URL and the addresses of the
        manufacturers its stack names. `peers` is a batch's cache: _peers() is gathered once, and
        only if a stack names a manufacturer."""
        mud_url = self.mud_url_of(d)
        named = umbox.named_authorities(stack, mud_authority(mud_url))
        if named and not peers:
            peers.append(self._peers())
        mine = {a: peers[0][a] for a in sorted(named) if a in peers[0]} if named else {}
        return DeviceSpec(d["name"], d["mac"], d["ip"], stack, code, mud_url=mud_url, peers=mine)

    def _reapply_manufacturers(self, authorities, skip: str | None = None) -> None:
        """Re-applies, in their postures, the approved devices whose stacks name one of these MUD
        authorities (same-manufacturer, manufacturer): a device of it was approved, moved, changed
        its MUD URL or went. Only the data path changes; a failure is logged, and what caused it
        stands."""
        authorities = {a for a in authorities if a}
        if not authorities or self._dp is None:
            return
        peers: list = []
        specs = []
        for d in self.known.values():
            if (d["name"] != skip and d.get("approved") and d.get("type") in self.profiles
                    and d.get("ip") and d["name"] in self.dp.devices):
                stack = self.stack_of(d, d["posture"])
                if umbox.named_authorities(stack, mud_authority(self.mud_url_of(d))) & authorities:
                    specs.append(self._spec(d, stack, POSTURE_CODES.get(d["posture"], 0), peers))
        if not specs:
            return
        try:
            with self.dp.batch():
                for spec in specs:
                    self.dp.apply(spec)
        except KalkiError as e:
            log.error("re-applying %s for a device of %s: %s", ", ".join(s.name for s in specs),
                      ", ".join(sorted(authorities)), e)
            return
        log.info("re-applied %s: a device of %s came, went or moved", ", ".join(s.name for s in specs),
                 ", ".join(sorted(authorities)))

    # -- telemetry (wired by appliance.run) ----------------------------------------------
    def on_telemetry(self, device: str, payload: dict) -> None:
        """`device`: the topic's device level, the device's name or its broker user."""
        self.kernel_first()
        received = time.monotonic_ns()
        device = self.device_for_topic(device) or device
        self.counters["telemetry"] += 1
        payload = self.recent.add_telemetry(device, payload, self.now())
        self._evaluate(policy.Stimulus("telemetry", device, payload, received))

    def on_availability(self, device: str, state: str) -> None:
        self.availability[self.device_for_topic(device) or device] = state

    def on_denied(self, user: str, topic: str, count: int) -> None:
        """The broker refused a device's publishes outside its own topic (speaking for another
        device, or sending commands): an alert, and no posture change by itself, as a
        misconfigured device does the same."""
        self.raise_alert(self.device_for_topic(user), "mqtt-denied", "mqtt",
                         {"user": user, "topic": topic, "count": count}, time.monotonic_ns())

    def on_client_id_denied(self, user: str, client_id: str, count: int) -> None:
        """The broker refused a connection whose client id is not the user's: an attempt to
        take over another device's (or the supervisor's) session. An alert naming both."""
        self.raise_alert(self.device_for_topic(user), "mqtt-denied", "mqtt",
                         {"user": user, "client_id": client_id, "count": count}, time.monotonic_ns())

    # -- kernel events --------------------------------------------------------------------
    def on_kernel_alerts(self, alerts) -> None:
        """(device, alert kind, kernel event) from appliance.telemetry.kernel."""
        received = time.monotonic_ns()
        for device, kind, e in alerts:
            if kind == "spoofing" and self._leased(device, e["src"]):
                continue
            if self._record_flow(device, kind, e):
                continue
            clone = self._clone_of(device)
            if clone:   # the victim's protection stays; the record says who else it may be
                e = {**e, "clone": f"another station uses this device's identity "
                                   f"(port {clone['port'] or '?'})"}
            self.raise_alert(device, kind, "kernel", e, event_ns(e, received))
            if e.get("action") == "blocked" and e.get("src"):
                self._decoy(e["src"])

    def _decoy(self, src: str) -> None:
        """A source a detector put in the drop set: deception devices' decoys may answer it."""
        try:
            self.dp.decoy_source(src)
        except KalkiError as e:      # it stays dropped everywhere: closed, not open
            log.error("deception: %s stays dropped for every device: %s", src, e)

    # -- stations below the gateway (appliance.telemetry.stations) ----------------------------
    def on_clone(self, clone, cut: str | None) -> None:
        """Two stations use one MAC. The alert names the device as the victim and the port the
        other one is on; `cut` says whether that port was switched off. Nothing here lowers the
        device's posture, and nothing raises it either: the clone's own packets, counted
        against the device by the kernel, do that, and their alerts say so (_clone_of)."""
        device = next((n for n, d in self.known.items() if d.get("mac") == clone.mac), None)
        details = {"mac": clone.mac, "home_port": clone.home_port, "port": clone.other_port,
                   "why": clone.why, "victim": device,
                   "action": cut or "none: the hardware has no port to switch off"}
        self.clones[clone.mac] = {**details, "at": iso(self.now()),
                                  "until_ns": time.monotonic_ns()
                                  + self.cfg.stations.window_seconds * 1_000_000_000}
        log.warning("identity clone: %s; %s", clone.why, details["action"])
        self.raise_alert(device, "identity-clone", "discovery", details, time.monotonic_ns())

    def _clone_of(self, device: str | None) -> dict | None:
        mac = self.known.get(device or "", {}).get("mac")
        clone = self.clones.get(mac) if mac else None
        return clone if clone and clone["until_ns"] > time.monotonic_ns() else None

    def _leased(self, device: str, src: str) -> bool:
        """A device's first packets from the address the DHCP server has just leased it can
        come before the server's lease event (its script takes 0.1-0.2 s to reach us): the
        lease file, written as the lease is made, says it is the device's new address, not
        a spoof. The address is taken at once; the packets before it were dropped."""
        mac = self.known[device]["mac"]
        try:
            leases = Path(self.cfg.gateway.dhcp_leases).read_text(errors="replace")
        except OSError:
            return False
        for line in leases.splitlines():
            fields = line.split()    # expiry MAC address hostname client-id
            if len(fields) >= 3 and fields[1].lower() == mac and fields[2] == src:
                log.info("%s: first packets from %s, its new lease: renumbered, not spoofing",
                         device, src)
                self.discovered(mac, src)
                return True
        return False

    def raise_alert(self, device: str | None, kind: str, source: str, details: dict,
                    received_ns: int, rule: str | None = None, severity: str | None = None) -> dict:
        alert = {"device": device, "type": kind, "source": source,
                 "severity": severity or severity_of(kind), "details": details,
                 "at": iso(self.now())}
        self.recent.add_alert(self.now(), device, kind)
        self.counters["alerts"] += 1
        # before the rules act, so that a posture they set is published as under attack too
        attacked = device if device in self.known and alert["severity"] == "critical" else None
        newly_attacked = attacked is not None and not self.under_attack_now(attacked)
        if attacked is not None:
            self._critical_at[attacked] = time.monotonic()
        data = {"type": kind, **({"rule": rule} if rule else {})}
        # Enforce first: the rules read alerts from memory, and the records can wait.
        self._evaluate(policy.Stimulus("alert", device, data, received_ns))
        self.store.add_alert(alert)
        if self.bus:
            self.bus.publish_alert(alert)
            if attacked is not None and newly_attacked and (self.known.get(attacked) or {}).get("approved"):
                self._publish_posture(attacked)
        self.notify({"kind": "alert", **alert})
        self._send_alert(alert)
        return alert

    def _send_alert(self, alert: dict) -> None:
        """An alert at [notify] min_severity or above: queued for the notification channels
        (sent off the loop), and a Home Assistant alert event on MQTT. Never raises."""
        if not self.notifier.wants(alert) or not (self.notifier.channels or self.bus):
            return
        m = self.notifier.alert(alert)
        if self.bus:
            try:
                self.bus.publish_alert_event(alert, m.payload["text"] if m else self.notifier.words(alert))
            except Exception:     # noqa: BLE001 - a broker's trouble is not the alert's
                log.exception("MQTT: alert event for %s", alert.get("type"))

    def _notify_failed(self, channel: str, error: str, failed: int) -> None:
        """A channel gave up on a message (at most once an hour per channel): an alert, which
        the notifier sends on the other channels only."""
        self.raise_alert(None, "notify-failed", "supervisor",
                         {"channel": channel, "error": error, "failed": failed}, time.monotonic_ns())

    # -- decisions ------------------------------------------------------------------------
    def maintenance_active(self) -> bool:
        until = self.store.maintenance_until()
        return until is not None and datetime.datetime.fromisoformat(until) > self.now()

    def _evaluate(self, stimulus: policy.Stimulus) -> None:
        if self.maintenance_active():
            return
        top = not self._evaluating
        started = time.perf_counter_ns()
        self._evaluating += 1
        try:
            try:
                decisions = self.engine.evaluate(stimulus, self)
            except KalkiError as e:
                log.error("policy evaluation failed: %s", e)
                return
            with self.store.batch():     # one write for everything this stimulus changed
                for d in decisions:
                    self._execute(d)
        finally:
            self._evaluating -= 1
            if top:
                self.evaluations.note(stimulus, time.perf_counter_ns() - started, self.now())

    def _execute(self, d: policy.Decision) -> None:
        done: list[dict] = []
        enforced = self._carry_out(d, done)
        for a in d.actions:
            if a.kind == "alert":
                params = {k: v for k, v in a.params.items() if k not in ("type", "severity")}
                self.raise_alert(d.device or (a.targets[0] if a.targets else None), a.params["type"],
                                 "rule", params, d.decided_ns, rule=d.rule,
                                 severity=a.params.get("severity"))
                done.append({"action": "alert", **a.params})
        self._record_decision(d, done, enforced)

    def _carry_out(self, d: policy.Decision, done: list) -> tuple[int, int] | None:
        """The decision's postures first, all in force together (one nftables transaction),
        then its commands. Returns when the postures were in XDP and when all of them were
        read back from the kernel (set_postures)."""
        changes, steps = [], []
        for a in d.actions:
            if a.kind != "set_posture":
                continue
            for target in a.targets:
                step = {"action": a.kind, "target": target, **a.params}
                current = self.posture(target)
                if stricter(current, a.params["posture"]):
                    # Rules only escalate; lowering is for the operator and expiries.
                    done.append({**step, "skipped": f"{target} is already {current}"})
                    continue
                try:
                    self._check_posture(target, a.params["posture"], a.params.get("for_seconds"))
                except KalkiError as e:
                    log.error("rule %s: set_posture on %s failed: %s", d.rule, target, e)
                    done.append({**step, "error": str(e)})
                    continue
                changes.append((target, a.params["posture"], a.params.get("for_seconds")))
                steps.append(step)
        enforced = None
        if changes:
            try:
                enforced = self.set_postures(changes, f"rule {d.rule}", actor=f"rule {d.rule}")
            except KalkiError as e:     # a refused batch is put back whole (Dataplane.batch)
                log.error("rule %s: the data path refused its postures: %s", d.rule, e)
                steps = [{**step, "error": str(e)} for step in steps]
        done.extend(steps)
        for a in d.actions:
            if a.kind != "command":
                continue
            for target in a.targets:
                step = {"action": a.kind, "target": target, **a.params}
                try:
                    if self.adapter and self.adapter.handles(target) and self.loop:
                        self.loop.create_task(self._adapter_command(target, a.params["payload"]))
                    elif self.bus:     # on the topic the device reads: its broker user's
                        self.bus.send_command(self.mqtt_name(target), a.params["payload"])
                except KalkiError as e:
                    log.error("rule %s: command to %s failed: %s", d.rule, target, e)
                    step["error"] = str(e)
                done.append(step)
        for a in d.actions:
            if a.kind == "poll":
                done.extend(self._set_polls(d.rule, a.targets, a.params["every_seconds"],
                                            a.params["for_seconds"]))
        return enforced

    def _set_polls(self, rule: str, targets, every: int, for_seconds: int | None) -> list[dict]:
        """The rule action poll on its devices: each one's adapter polls it every `every`
        seconds at once, until `for_seconds` have passed (_expire_polls) or a later poll
        replaces it. A device no adapter polls is refused: logged and audited, its step says
        why. Returns the steps: one per device set or refused, and one naming together the
        devices whose poll was found in force.

        25 cameras turning suspicious at once each ask for every light's poll: the first sets
        it, the others find it so (nothing written or audited again, and only an adapter's
        device has a poll in force, so it is not asked again). The polls in force are written
        once for the whole action. At 1,000 devices (250 lights) a motion held the loop 128 ms
        at the median when each light was written on its own and each camera's decision
        listed every light."""
        actor = f"rule {rule}"
        end = self.now() + datetime.timedelta(seconds=for_seconds) if for_seconds else None
        until = iso(end) if end else None
        steps, changed, in_force = [], [], []
        polls = self.polls
        # The devices one call sets share one record (never edited in place), and a record is
        # judged once: 25 cameras asking for every light's poll were 6,250 comparisons and
        # date parses per motion at 1,000 devices (250 lights).
        record = {"every_seconds": every, "until": until, "rule": rule}
        verdicts: dict[int, bool] = {}      # id(a record in force) -> the same poll as asked
        for target in targets:
            p = polls.get(target)
            if p is not None:
                same = verdicts.get(id(p))
                if same is None:
                    same = verdicts[id(p)] = (p.get("rule") == rule and p.get("every_seconds") == every
                                              and _ends_together(p.get("until"), end))
                if same:
                    in_force.append(target)
                    continue
            step = {"action": "poll", "target": target, "every_seconds": every, "for_seconds": for_seconds}
            if not (self.adapter and self.adapter.handles(target)):
                why = (f"device {target}: no polling adapter (its profile has no [adapter], or the "
                       "adapter has no credentials for it)")
                log.warning("rule %s: poll refused: %s", rule, why)
                self.store.audit("poll-refused", actor, {"device": target, "why": why})
                steps.append({**step, "error": why})
                continue
            self.adapter.set_interval(target, every)
            polls[target] = record
            changed.append(target)
            steps.append({**step, "until": until})
        if in_force:
            steps.append({"action": "poll", "in_force": in_force, "every_seconds": every,
                          "for_seconds": for_seconds, "until": self.polls[in_force[0]]["until"]})
        if changed:
            self.store.set_setting(POLLS_SETTING, self.polls)
            for target in changed:
                self.store.audit("poll", actor, {"device": target, "every_seconds": every, "until": until})
        return steps

    def end_polls_not_polled(self, names=None) -> None:
        """Polls in force on devices (of `names`, or all) the adapter no longer polls are let go
        (one write): the device was approved again as a type without [adapter], or a backup
        restored its type's profile without one (an import cannot: a profile in use is
        refused). _set_polls takes a poll in force as an adapter's device's without asking the
        adapter again, so a later ask is refused and said, not found in force."""
        names = list(self.polls) if names is None else [n for n in names if n in self.polls]
        gone = [n for n in names if not (self.adapter and self.adapter.handles(n))]
        if gone:
            self._let_polls_go(gone)

    def _let_polls_go(self, names: list[str]) -> None:
        """The devices' polls ended: the profile's interval again, and the polls in force
        written once for all of them (the 250 lights one motion set end in the same tick)."""
        for name in names:
            del self.polls[name]
            if self.adapter:
                self.adapter.set_interval(name, None)
        self.store.set_setting(POLLS_SETTING, self.polls)

    def restore_polls(self) -> list[str]:
        """The poll actions in force when the supervisor stopped, again (appliance.run, once the
        adapter is there): those whose time is not up, for devices it still polls. Returns the
        devices restored."""
        kept = {}
        now = self.now()
        for name, p in (self.store.get_setting(POLLS_SETTING) or {}).items():
            try:
                until = datetime.datetime.fromisoformat(p["until"]) if p.get("until") else None
                every = p["every_seconds"]
            except (KeyError, TypeError, ValueError):
                continue
            if (until is None or until > now) and self.adapter and self.adapter.handles(name):
                self.adapter.set_interval(name, every)
                kept[name] = {"every_seconds": every, "until": p.get("until"), "rule": p.get("rule")}
        self.polls = kept
        self.store.set_setting(POLLS_SETTING, kept)
        return sorted(kept)

    def poll_of(self, name: str) -> dict | None:
        """What the device view shows of polling: {"every_seconds", "until", "rule"}: a poll
        action's (until None: no end), or the profile's interval (rule None); None if no adapter
        polls the device. Kept in the store: a restart restores those whose time is not up."""
        if not (self.adapter and self.adapter.handles(name)):
            return None
        if name in self.polls:
            return dict(self.polls[name])
        return {"every_seconds": self.adapter.interval(name), "until": None, "rule": None}

    def _record_decision(self, d: policy.Decision, done: list, enforced: tuple[int, int] | None) -> None:
        s = d.stimulus
        rec = {"kind": "decision", "rule": d.rule, "device": d.device,
               "stimulus": {"kind": s.kind, "device": s.device, "data": s.data},
               "actions": done, "at": iso(self.now()),
               "timing_ms": {"decide": round((d.decided_ns - s.received_ns) / 1e6, 3),
                             "xdp": round((enforced[0] - s.received_ns) / 1e6, 3) if enforced else None,
                             "enforce": round((enforced[1] - s.received_ns) / 1e6, 3)
                             if enforced else None},
               # the same moments on CLOCK_MONOTONIC, for a measurement that starts elsewhere
               # (bench/bench_supervisor.py: at the device's publish)
               "monotonic_ns": {"stimulus": s.received_ns, "xdp": enforced[0] if enforced else None,
                                "enforce": enforced[1] if enforced else None}}
        self.store.add_decision(rec)
        self.notify(rec)
        self.counters["decisions"] += 1
        if self.bus:
            self.bus.publish_decision(rec)

    async def _adapter_command(self, name: str, payload: dict) -> None:
        try:
            await self.adapter.command(name, payload)
        except (TimeoutError, OSError, ValueError, KalkiError) as e:
            log.error("command %s to %s failed: %s", payload, name, e)

    def set_posture(self, name: str, posture: str, reason: str, for_seconds: int | None = None,
                    actor: str = "operator") -> int:
        """Enforces a posture and reads it back; returns the monotonic ns it was confirmed."""
        return self.set_postures([(name, posture, for_seconds)], reason, actor)[1]

    def _check_posture(self, name: str, posture: str, for_seconds: int | None) -> tuple[dict, int]:
        """(the device, the posture's code); raises if the change cannot be made."""
        d = self.device(name)
        if not d.get("approved") or d.get("type") not in self.profiles:
            raise ConfigError(f"device {name}: approve it with a type before setting its posture")
        check_posture(posture, f"device {name}")
        if for_seconds is not None and (isinstance(for_seconds, bool) or not isinstance(for_seconds, int)
                                        or for_seconds <= 0):
            raise ConfigError(f"device {name}: duration must be a positive number of seconds")
        if for_seconds is not None and for_seconds > MAX_POSTURE_SECONDS:
            raise ConfigError(f"device {name}: a timed posture lasts at most 30 days "
                              f"({MAX_POSTURE_SECONDS} s), got {for_seconds} s; leave the duration out "
                              "for a posture without an end")
        return d, POSTURE_CODES.get(posture, 0)

    def set_postures(self, changes: list[tuple[str, str, int | None]], reason: str,
                     actor: str = "operator", returns: dict[str, list] | None = None) -> tuple[int, int]:
        """Puts several (device, posture, seconds or None) in force together: all are checked
        before any changes; each device's XDP entry is in force as it is written and nftables'
        part of all of them is one transaction. The records, the MQTT messages and the rules
        that watch postures follow once every device is read back from the kernel. Returns the
        monotonic ns when every XDP entry was written and when all was read back."""
        checked = [(name, posture, seconds, *self._check_posture(name, posture, seconds))
                   for name, posture, seconds in changes]
        peers: list = []
        with self.dp.batch():
            for name, posture, _, d, code in checked:
                stack = self.stack_of(d, posture)
                self.dp.apply(self._spec(d, stack, code, peers))
            xdp = time.monotonic_ns()      # in force for the next packet; nftables' part follows
        held = self.dp.read_back_all([name for name, *_ in checked])
        for name, posture, _, _, code in checked:
            if held[name] != code:
                raise KalkiError(f"device {name}: the kernel does not show posture {posture} "
                                 "after applying it")
        enforced = time.monotonic_ns()
        now = self.now()
        if not actor.startswith("rule "):
            for name, posture, _, d, _ in checked:
                if stricter(d["posture"], posture):
                    self._judge_from(name, now)
        moved = []
        with self.store.batch():     # one write to the SD card, all or nothing
            for name, posture, for_seconds, d, _ in checked:
                after = (returns or {}).get(name)
                if after is None:
                    after = _returns_after(d, for_seconds)
                changed = posture != d["posture"]
                self._update_device(name, posture=posture,
                                    posture_expires=iso(now + datetime.timedelta(seconds=for_seconds))
                                    if for_seconds else None,
                                    posture_revert_to=after[0]["posture"] if after else None,
                                    posture_after=after)
                if changed:
                    moved.append((name, posture))
                    self.store.record_posture(name, posture, reason)
                    self.store.audit("posture", actor, {"device": name, "posture": posture,
                                                        "reason": reason, "for_seconds": for_seconds})
        for name, posture in moved:
            if self.bus:
                self._publish_posture(name)
            self.notify({"kind": "posture", "device": name, "posture": posture, "reason": reason})
        for name, posture in moved:
            self._evaluate(policy.Stimulus("posture", name, {"to": posture}, enforced))
        return xdp, enforced

    # -- devices --------------------------------------------------------------------------
    def device_ip(self, name: str) -> str | None:
        """The device's address, or None if the supervisor does not know the device."""
        d = self.known.get(name)
        return (d.get("ip") or "") if d else None

    def device(self, name: str) -> dict:
        try:
            return self.known[name]
        except KeyError:
            raise UnknownDeviceError(f"device {name!r} does not exist") from None

    def _update_device(self, name: str, **fields) -> None:
        if name in self.known:
            self.known[name] = self.store.update_device(name, **fields)

    def add_device(self, name: str, mac: str, ip: str, type: str | None = None,
                   approve: bool = False, group: str | None = None, actor: str = "operator") -> dict:
        DeviceSpec(name, mac, ip).checked()
        if type is not None and type not in self.profiles:
            raise ConfigError(f"device {name}: unknown type {type!r} (known: {', '.join(self.profiles)})")
        for other in self.known.values():
            if other["name"] != name and other["mac"] == mac.lower():
                raise ConfigError(f"device {name}: MAC {mac} already belongs to {other['name']}")
        self._not_an_mqtt_user(name, name, f"device {name}")
        self.known[name] = self.store.upsert_device(name, mac.lower(), ip=ip, type=type, group=group)
        self.store.audit("device-add", actor, {"device": name, "mac": mac, "ip": ip, "type": type})
        self.notify({"kind": "device", "device": name, "event": "added"})
        if approve:
            self.approve(name, type, actor=actor)
        return self.known[name]

    def approve(self, name: str, type: str | None, actor: str = "operator") -> dict:
        d = self.device(name)
        type = type or d.get("type")
        if type not in self.profiles:
            raise ConfigError(f"device {name}: give a type to approve it (known: {', '.join(self.profiles)})")
        if not d.get("ip"):
            raise ConfigError(f"device {name}: no address known yet")
        maker = mud_authority(self.mud_url_of(d)) if d.get("approved") else None
        # Home Assistant knows a device approved from now on by its MAC, which no rename changes
        # (one approved before keeps kalki_<its name then>: see ha_node)
        node = {} if d.get("approved") or d.get("ha_id") else {"ha_id": "kalki_" + d["mac"].replace(":", "")}
        self._update_device(name, type=type, approved=True, **node)
        self.store.audit("approve", actor, {"device": name, "type": type})
        self.end_polls_not_polled([name])
        self.set_posture(name, "normal", f"approved by {actor}", actor=actor)
        self._reapply_manufacturers({maker, mud_authority(self.mud_url_of(self.known[name]))}, name)
        if self.bus:
            self.publish_discovery(name)
        self._check_logins_soon(name, f"approval by {actor}")
        return self.known[name]

    def remove(self, name: str, actor: str = "operator") -> None:
        d = self.device(name)
        maker = mud_authority(self.mud_url_of(d)) if d.get("approved") else None
        if name in self.dp.devices:
            self.dp.remove(name)
        self.store.remove_device(name)
        self.ha_node(name)          # remembered: its discovery is cleared below
        del self.known[name]
        self._critical_at.pop(name, None)
        if self.traffic is not None:
            self.traffic.forget(name)
        if self._mqtt_owner.get(d.get("mqtt_user") or "") == name:
            del self._mqtt_owner[d["mqtt_user"]]
        self._reapply_manufacturers({maker})
        self.store.audit("remove", actor, {"device": name})
        self.notify({"kind": "device", "device": name, "event": "removed"})
        if self.bus:
            self.bus.remove_discovery(name)

    # -- names: a device renamed keeps its identity, history and MQTT topics --------------
    def mqtt_name(self, name: str) -> str:
        """The device's broker user, and so its topic level (kalki/<it>, its availability and
        the commands it reads): the name it was set up with (mqtt_user) if it was renamed."""
        d = self.known.get(name)
        return (d.get("mqtt_user") if d else None) or name

    def home_assistant_clash(self) -> str | None:
        """The device whose broker user is Home Assistant's (mqtt.home_assistant_user, set after
        the device was added), or None. The broker's ACL lets that user set any device's
        posture, so while a device logs in as it nobody can tell Home Assistant's commands
        from the device's."""
        user = self.cfg.mqtt.home_assistant_user
        if not user:
            return None
        return next((name for name in self.known if self.mqtt_name(name) == user), None)

    def device_for_topic(self, level: str) -> str | None:
        """The device a topic's device level (a broker user) belongs to: the device whose
        mqtt_user it is, else the device of that name; None if neither."""
        owner = self._mqtt_owner.get(level)
        if owner is not None and (self.known.get(owner) or {}).get("mqtt_user") == level:
            return owner
        return level if level in self.known else None

    def ha_node(self, name: str) -> str | None:
        """The device's Home Assistant node id (discovery topics, unique_ids, the HA device's
        identifier), which a rename keeps: kalki_<MAC> for a device approved by this version
        (ha_id), else kalki_<the name it was set up with>, as discovery has always said; None
        for what is no device (the bridge)."""
        d = self.known.get(name)
        if d is None:
            return self._nodes.get(name)
        node = d.get("ha_id") or f"kalki_{d.get('mqtt_user') or name}"
        self._nodes[name] = node
        return node

    def _not_an_mqtt_user(self, new: str, name: str, culprit: str) -> None:
        """Refuses a name that is another device's broker user, or Home Assistant's: its topics
        are that device's, and Home Assistant's user may set postures."""
        if new == self.cfg.mqtt.home_assistant_user:
            raise ConfigError(f"{culprit}: {new} is Home Assistant's MQTT user "
                              "(mqtt.home_assistant_user); give the device another name")
        owner = self._mqtt_owner.get(new)
        if owner is not None and owner != name and (self.known.get(owner) or {}).get("mqtt_user") == new:
            raise ConfigError(f"{culprit}: {new} is taken: device {owner}, renamed, still uses it as "
                              f"its MQTT user and topic (kalki/{new})")

    def rename_device(self, name: str, new: str, actor: str = "operator") -> dict:
        """Gives a device another name, keeping its identity (MAC, slot in the data path, posture
        and approval), its history (posture history, alerts, decisions and audit records are found
        under the new name) and its MQTT identity: the broker user and topic its firmware uses stay
        (recorded as its mqtt_user) while the supervisor's own retained topics move: the posture
        under kalki/<old> is cleared and published under kalki/<new>, and Home Assistant's
        discovery is published again under the same node id, so Home Assistant keeps the entity
        and shows the new name. The data path's name mapping moves and nothing is re-applied: its
        protection never lapses. Refused, with the culprit named, if the new name breaks the name
        rule or is taken (by a device, or as a renamed device's MQTT user). Audited."""
        d = self.device(name)
        check_device_name(new, f"device {name}: new name")
        if new == name:
            return d
        if new in self.known:
            raise ConfigError(f"device {name}: cannot rename it {new}: device {new} has that name")
        if new in RESERVED_NAMES:
            raise ConfigError(f"device {name}: cannot rename it {new}: kalki/{new} is the supervisor's")
        self._not_an_mqtt_user(new, name, f"device {name}: cannot rename it {new}")
        mqtt_user = self.mqtt_name(name)
        fields = {"mqtt_user": None if mqtt_user == new else mqtt_user}
        held = self._dp is not None and name in self._dp.devices
        if held:
            self.dp.rename(name, new)       # first: a refusal there changes nothing
        try:
            with self.store.batch():        # the record, its logs and the audit: one write
                record = self.store.rename_device(name, new, logs=True, **fields)
                if name in self.polls:
                    polls = {new if n == name else n: p for n, p in self.polls.items()}
                    self.store.set_setting(POLLS_SETTING, polls)
                self.store.audit("device-rename", actor, {"device": new, "from": name, "to": new,
                                                          "mqtt_user": fields["mqtt_user"]})
        except BaseException:
            if held:
                self.dp.rename(new, name)
            raise
        del self.known[name]
        self.known[new] = record
        if fields["mqtt_user"]:
            self._mqtt_owner[fields["mqtt_user"]] = new
        else:
            self._mqtt_owner.pop(mqtt_user, None)
        self._nodes.pop(name, None)
        # what is kept in memory by name
        by_names: tuple[dict, ...] = (self.availability, self.suggestions, self._judged_since,
                                      self._login_checks, self._critical_at)
        for by_name in by_names:
            if name in by_name:
                by_name[new] = by_name.pop(name)
        if name in self.polls:
            self.polls = {new if n == name else n: p for n, p in self.polls.items()}
            if self.adapter:
                self.adapter.set_interval(name, None)
                self.adapter.set_interval(new, self.polls[new]["every_seconds"])
        self.recent.rename(name, new)
        self.engine.rename(name, new)
        self.flows.rename(name, new)
        if self.traffic is not None:
            self.traffic.rename(name, new)
        if self.bus and record.get("approved"):
            try:
                self.bus.clear_posture(name)
                self._publish_posture(new)
                self.publish_discovery(new)
            except (KalkiError, ValueError, OSError) as e:     # again at the next connect
                log.error("MQTT: moving %s's retained topics to %s: %s", name, new, e)
        self.notify({"kind": "device", "device": new, "event": "renamed", "from": name})
        return record

    def set_group(self, name: str, group: str | None, actor: str = "operator") -> dict:
        """Puts a device in a group (rules select {group = "..."}), or in none; audited."""
        d = self.device(name)
        if group is not None:
            check_device_name(group, f"device {name}: group")
        if d.get("group") == group:
            return d
        with self.store.batch():
            self._update_device(name, group=group)
            self.store.audit("device-group", actor, {"device": name, "group": group,
                                                     "was": d.get("group")})
        self.notify({"kind": "device", "device": name, "event": "group", "group": group})
        return self.known[name]

    def discovered(self, mac: str, ip: str, identity: dict | None = None) -> None:
        """A device seen on the device side (neighbour table or DHCP lease)."""
        mac = mac.lower()
        identity = {k: v for k, v in (identity or {}).items()
                    if k in ("hostname", "client_id", "vendor_class", "mud_url") and isinstance(v, str) and v}
        if "mud_url" in identity and not _mud_url_ok(identity["mud_url"]):
            log.warning("%s: ignoring the MUD URL it sent (not an https URL of up to 255 printable "
                        "characters): %r", mac, identity["mud_url"][:80])
            del identity["mud_url"]
        known = next((d for d in self.known.values() if d["mac"] == mac), None)
        if known:   # identity is the MAC: the same device, perhaps at a new address
            mud_url = self.mud_url_of(known)
            if identity and any(known["identity"].get(k) != v for k, v in identity.items()):
                self._update_device(known["name"], identity=identity)
                if not known.get("approved"):
                    self._suggest(known["name"])
            elif not known.get("approved") and self._mud_missing(known):
                self._suggest(known["name"])     # its MUD file: not fetched yet, or failed a while ago
            moved = known.get("ip") != ip
            if moved:
                self._update_device(known["name"], ip=ip)
                if known.get("approved"):
                    self.set_posture(known["name"], known["posture"], "address changed", actor="discovery")
            d = self.known[known["name"]]
            if known.get("approved") and (moved or self.mud_url_of(d) != mud_url):
                if not moved and self._dp is not None and d["name"] in self._dp.devices:
                    # its own my-controller and same-manufacturer entries follow its MUD URL
                    self.dp.apply(self._spec(d, self.stack_of(d, d["posture"]),
                                             POSTURE_CODES.get(d["posture"], 0), []))
                self._reapply_manufacturers({mud_authority(mud_url), mud_authority(self.mud_url_of(d))},
                                            d["name"])
            return
        name = device_name_for(identity.get("hostname", ""), mac,
                               self.known.keys() | self._mqtt_owner | {self.cfg.mqtt.home_assistant_user})
        self.known[name] = self.store.upsert_device(name, mac, ip=ip, identity=identity,
                                                      approved=False, posture="unknown")
        suggestion = self._suggest(name)
        self.raise_alert(name, "new-device", "discovery", {"mac": mac, "ip": ip,
                                                           "suggested_type": suggestion},
                         time.monotonic_ns())

    def _suggest(self, name: str) -> str | None:
        """The profile a new device seems to fit; shown to the operator, who decides. A profile
        imported from the MUD file the device names (DHCP option 161) fits first."""
        d = self.known[name]
        mud_url = (d.get("identity") or {}).get("mud_url")
        by_url = next((t for t, p in self.profiles.items()
                       if mud_url and getattr(p, "mud_url", None) == mud_url), None)
        suggestion = by_url or next((t for t, p in self.profiles.items()
                                     if p.matches(d["mac"], d.get("identity") or {})), None)
        if mud_url and by_url is None and self.cfg.mud.fetch:
            # the device's own MUD file, fetched and checked, once it is there
            suggestion = self._offer(name, mud_url) or suggestion
        if suggestion:
            self.suggestions[name] = suggestion
        return suggestion

    # -- MUD files fetched from the URL a device sends (appliance.policy.mudfetch) ---------------
    @property
    def mud_cache(self) -> Path:
        return self.store.directory / "mud-cache"

    def _mud_missing(self, d: dict) -> bool:
        """Whether a device's MUD file is still to be fetched: fetching is on, it names a MUD URL
        no profile has, and nothing is offered or on its way for it."""
        url = (d.get("identity") or {}).get("mud_url")
        offer = d.get("mud_offer") or {}
        # "fetching" from before a restart is not on its way any more
        pending = offer.get("url") == url and (offer.get("state") == "offered" or url in self._mud_fetching)
        return bool(self.cfg.mud.fetch and url and not pending)

    def _offer(self, name: str, url: str) -> str | None:
        """The type offered from the MUD file at `url` once it was fetched and checked (kept on
        the device as mud_offer, the file in the cache); until then None, and a fetch behind the
        loop, one per URL. A failed fetch is tried again after MUD_RETRY_SECONDS."""
        offer = self.known[name].get("mud_offer") or {}
        if offer.get("url") == url and offer.get("state") == "offered" and offer.get("type"):
            return offer["type"]
        if url in self._mud_fetching:
            if offer.get("url") != url or offer.get("state") != "fetching":
                self._record_offer(name, {"url": url, "state": "fetching", "at": iso(self.now())})
            return None
        failed = self._mud_failed.get(url)
        if failed and time.monotonic() - failed[0] < MUD_RETRY_SECONDS:
            if offer.get("url") != url or offer.get("error") != failed[1]:
                self._record_offer(name, {"url": url, "state": "failed", "error": failed[1],
                                          "at": iso(self.now())})
            return None
        loop = self.loop
        if loop is None or not loop.is_running():
            return None      # no loop to fetch behind (a test without one)
        self._mud_fetching.add(url)
        self._record_offer(name, {"url": url, "state": "fetching", "at": iso(self.now())})
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        task: asyncio.Future
        if on_loop:
            task = loop.create_task(self._fetch_mud(url))
        else:
            task = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._fetch_mud(url), loop),
                                       loop=loop)
        self._mud_tasks.add(task)
        task.add_done_callback(self._mud_tasks.discard)
        return None

    async def _fetch_mud(self, url: str) -> None:
        """Fetches and checks the MUD file in a thread (the loop never waits on the network or
        on openssl), then records the offer, or the error, on every new device that names it.
        Never raises: a MUD file is a suggestion, and nothing else depends on it."""
        m = self.cfg.mud
        record: dict[str, str]
        if self._mud_executor is None:     # not the default executor: slow servers must not hold
            self._mud_executor = concurrent.futures.ThreadPoolExecutor(   # up the others' work
                MUD_FETCHES, thread_name_prefix="kalki-mud")
        try:
            got = await asyncio.get_running_loop().run_in_executor(
                self._mud_executor, functools.partial(_mudfetch().fetch_cached, url, self.mud_cache,
                                                      m.ca_file, m.timeout_seconds))
        except Exception as e:     # noqa: BLE001
            if isinstance(e, KalkiError):
                error = str(e)
                log.warning("MUD file: %s", e)
            else:
                error = f"{url}: {type(e).__name__}: {e}"
                log.exception("MUD file %s", url)
            self._mud_failed[url] = (time.monotonic(), error[:2000])
            record = {"url": url, "state": "failed", "error": error[:2000], "at": iso(self.now())}
        else:
            self._mud_failed.pop(url, None)
            record = {"url": url, "state": "offered", "type": self._offer_type(got.type_name),
                      "signature": got.signature, "fetched": got.fetched, "at": iso(self.now())}
        finally:
            self._mud_fetching.discard(url)
        try:
            self.store.audit("mud-fetch", "supervisor", {k: v for k, v in record.items() if k != "at"})
            for name, d in list(self.known.items()):
                if not d.get("approved") and (d.get("identity") or {}).get("mud_url") == url:
                    self._record_offer(name, record)
                    if record.get("type"):
                        self.suggestions[name] = record["type"]
        except Exception:     # noqa: BLE001
            log.exception("MUD file %s: recording what was fetched", url)

    def _offer_type(self, base: str) -> str:
        """The type name for an offered MUD file: the importer's, unless a profile has it."""
        for suffix in ("", "-mud", *(f"-mud{i}" for i in range(2, 100))):
            name = base[:40 - len(suffix)] + suffix
            if name not in self.profiles:
                return name
        return base

    def _record_offer(self, name: str, record: dict) -> None:
        try:
            self._update_device(name, mud_offer=record)
        except KalkiError as e:
            log.error("device %s: the MUD file's offer not recorded: %s", name, e)
            return
        self.notify({"kind": "device", "device": name, "event": "mud-offer"})

    # -- the default-login check (appliance.supervisor.logins) ----------------------------------
    def _check_logins_soon(self, name: str, actor: str) -> None:
        """After an approval: the check behind the loop, if the device's type lists default
        logins and there is a running loop (a test without one checks nothing)."""
        loop = self.loop
        d = self.known.get(name) or {}
        p = self.profiles.get(d.get("type") or "")
        if loop is None or not loop.is_running() or p is None or not p.default_logins:
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._start_login_check(name, actor)
        else:
            loop.call_soon_threadsafe(self._start_login_check, name, actor)

    def _start_login_check(self, name: str, actor: str) -> asyncio.Future:
        """The device's check: the one running, or a new one (on the loop)."""
        task = self._login_checks.get(name)
        if task is not None and not task.done():
            return task
        task = asyncio.ensure_future(self._check_logins(name, actor))
        self._login_checks[name] = task

        def finished(t: asyncio.Future) -> None:
            if self._login_checks.get(name) is t:
                del self._login_checks[name]
            if not t.cancelled() and t.exception() is not None:
                e = t.exception()
                if isinstance(e, KalkiError):
                    log.warning("device %s: default-login check: %s", name, e)
                else:
                    log.error("device %s: default-login check failed", name, exc_info=e)
        task.add_done_callback(finished)
        return task

    async def check_logins(self, name: str, actor: str = "operator") -> dict:
        """Tries the device's type's default logins now (or waits for the check already
        running) and returns what came of it. Refused for an unknown or unapproved device."""
        d = self.device(name)
        if not d.get("approved"):
            raise ConfigError(f"device {name}: not approved: the gateway tries no login on a device "
                              "the operator has not approved (approve it first)")
        return await asyncio.shield(self._start_login_check(name, actor))

    async def _check_logins(self, name: str, actor: str) -> dict:
        """Runs the check, records it on the device (logins_checked: the entries without their
        passwords and each outcome), audits it, and raises one default-credentials alert
        listing every login that worked."""
        d = self.device(name)
        if not d.get("approved"):
            raise ConfigError(f"device {name}: not approved: no login is tried")
        type_, posture = d.get("type") or "", d.get("posture") or "unknown"
        p = self.profiles.get(type_)
        entries = p.default_logins if p is not None else []
        record: dict[str, Any] = {"at": iso(self.now()), "by": actor, "type": type_, "posture": posture,
                                  "state": "done", "results": []}
        address = self.login_address or d.get("ip")
        if not entries:
            record.update(state="skipped", reason=f"its type {type_} lists no default logins")
        elif not address:
            record.update(state="skipped", reason="no address known yet")
        elif "quarantine" in self.stack_of(d, posture):
            # XDP drops the device's replies to the gateway too: nothing could answer.
            record.update(state="skipped", reason=f"posture {posture} quarantines it: check again "
                                                  "once it is out of quarantine")
        else:
            record["results"] = await logins.check(entries, address)
        worked = [r for r in record["results"] if r["outcome"] == "success"]
        record["found"] = len(worked)
        if name not in self.known:      # removed while it ran
            return record
        self._update_device(name, logins_checked=record)
        outcomes = collections.Counter(r["outcome"] for r in record["results"])
        self.store.audit("check-logins", actor, {"device": name, "state": record["state"],
                                                 "outcomes": dict(outcomes)})
        if worked:
            which = ", ".join(f"{r['user']} on {r['service']} port {r['port']}" for r in worked)
            self.raise_alert(name, "default-credentials", "supervisor",
                             {"logins": [{k: r[k] for k in ("service", "port", "user", "path", "outcome")
                                          if k in r} for r in worked],
                              "message": f"{name} accepts its type's default login ({which}): change "
                                         "the password on the device itself"},
                             time.monotonic_ns())
        self.notify({"kind": "device", "device": name, "event": "logins-checked"})
        return record

    # -- listeners (the web page's live view, the LEDs) -----------------------------------
    def subscribe(self) -> asyncio.Queue:
        return self.listeners.subscribe()

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.listeners.unsubscribe(q)

    def notify(self, event: dict) -> None:
        self.listeners.notify(event)

    def summary(self) -> str:
        """What the posture LEDs show: "alert" (any attack or quarantine), "warning" (any
        suspicious or learning, a new device waiting for approval, or devices that may reach each
        other without crossing the data path: isolation_warning), "normal"."""
        postures = {d["posture"] for d in self.known.values() if d.get("approved")}
        waiting = any(not d.get("approved") for d in self.known.values())
        if postures & {"attack", "quarantine"} or self.watch.tampered_recently():
            return "alert"
        if self.watch.disk_error or self.isolation_warning:
            return "warning"
        if postures & {"suspicious", "learning"} or waiting:
            return "warning"
        return "normal"

    # -- the technician's button ----------------------------------------------------------
    def open_claim_window(self, minutes: int = 5, actor: str = "button") -> None:
        self.claim_until = self.now() + datetime.timedelta(minutes=minutes)
        self.store.audit("claim-window", actor, {"until": iso(self.claim_until)})
        self.notify({"kind": "panel", "event": "claim-window", "until": iso(self.claim_until)})

    def claim_open(self) -> bool:
        return self.claim_until is not None and self.now() < self.claim_until

    def reset_admin(self, actor: str = "button") -> None:
        """Held 5 s: the admin password and every session go; devices and protection stay."""
        self.store.set_setting("admin", None)
        self.auth_epoch += 1
        self.store.audit("admin-reset", actor, {})
        self.notify({"kind": "panel", "event": "admin-reset"})

    def factory_reset(self, actor: str = "button") -> None:
        """Held 15 s: the store back to defaults and every device back to unknown, which the
        data path keeps closed."""
        for name in list(self.known):
            if name in self.dp.devices:
                self.dp.remove(name)
        with self.store.batch():
            for name in list(self.known):
                self.store.remove_device(name)
            for rule in self.store.rules():
                self.store.delete_rule(rule["name"])
            self.store.set_setting("admin", None)
            self.store.set_maintenance(None)
        self.known.clear()
        if self.traffic is not None:
            self.traffic.keep(())
        self.auth_epoch += 1
        self.store.audit("factory-reset", actor, {})
        self.notify({"kind": "panel", "event": "factory-reset"})

    # -- timers ---------------------------------------------------------------------------
    def sync_gate_credentials(self) -> None:
        """The gate's auth_gate checks the admin account: its file follows the store's setting
        (claimed, changed, reset), written whole and readable by root only; none without one."""
        path = self.cfg.gateway.gate_credentials
        admin = self.store.get_setting("admin")
        wanted = json.dumps({"user": admin["user"], "scrypt": admin["scrypt"]}, sort_keys=True) \
            if admin and admin.get("scrypt") else None
        if not path or wanted == self._gate_credentials:
            return
        target = Path(path)
        if wanted is None:
            target.unlink(missing_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(target.name + ".new")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(wanted)
            os.replace(temp, target)
        self._gate_credentials = wanted

    async def _tick_step(self, step: str, fn, said: dict[str, tuple[str, float]]) -> None:
        """One of the ticker's periodic steps, on its own: one that fails (the SD card full or
        failing, or anything unforeseen) must not stop the others, retention and flushing
        above all, nor the heartbeat (a ticker that died once left the disk unretried and the
        panel's watchdog blind). Counted in counters["ticker_errors_<step>"]; said once a
        minute per step, not every tick (said: step -> the error last said, and when)."""
        self.kernel_first()
        try:
            result = fn()
            if inspect.isawaitable(result):
                await result
        except Exception as e:     # noqa: BLE001
            self.counters[f"ticker_errors_{step}"] += 1
            last, at = said.get(step, ("", 0.0))
            if str(e) != last or time.monotonic() - at > 60:
                if isinstance(e, KalkiError):
                    log.error("ticker: %s: %s", step, e)
                else:
                    log.exception("ticker: %s: %s", step, e)
                said[step] = (str(e), time.monotonic())

    async def _ticker(self) -> None:
        last_prune = last_flush = last_traffic_save = time.monotonic()
        ticks = 0
        said: dict[str, tuple[str, float]] = {}
        step = functools.partial(self._tick_step, said=said)
        while not self._stop.is_set():
            await asyncio.sleep(0.25)
            self.heartbeat = time.monotonic()
            ticks += 1
            self.kernel_first()
            if self.collector.tick() == 2:
                started = time.perf_counter()
                give_back_free_memory()
                self.trim_pause_max_ms = max(self.trim_pause_max_ms,
                                             (time.perf_counter() - started) * 1e3)
            if ticks % 2 == 0:
                await step("kernel", self.watch.kernel_behind)
                await step("gate_credentials", self.sync_gate_credentials)
            if ticks % 4 == 0:
                await step("disk", self.watch.check_disk)
            await step("postures", self._expire_postures)
            await step("polls", self._expire_polls)
            await step("critical_alerts", self._expire_critical_alerts)
            if time.monotonic() - last_flush >= 1:
                last_flush = time.monotonic()
                await step("flush", self.store.flush_behind)
            if ticks % 40 == 0:
                await step("names", self._save_names)
            traffic = self.traffic
            if traffic is not None:
                await step("traffic", lambda: traffic.tick(self.dp, self.now().timestamp(),
                                                           time.monotonic(), self.kernel_first))
                if time.monotonic() - last_traffic_save >= 60 * self.cfg.state.traffic_save_minutes:
                    last_traffic_save = time.monotonic()
                    await step("traffic_save", traffic.save_behind)
            if time.monotonic() - last_prune > PRUNE_SECONDS:
                last_prune = time.monotonic()
                await step("prune", self.store.prune)

    def _expire_postures(self) -> None:
        now = self.now()
        for name, d in list(self.known.items()):
            exp = d.get("posture_expires")
            if exp and datetime.datetime.fromisoformat(exp) <= now:
                posture, seconds, rest = _next_return(d, now)
                try:
                    self.set_postures([(name, posture, seconds)], "expired", actor="timer",
                                      returns={name: rest})
                except KalkiError as e:
                    log.error("reverting %s: %s", name, e)
                    self._update_device(name, posture_expires=None)

    def _expire_polls(self) -> None:
        """Poll actions whose time is up (on the policy's clock), or whose device is gone: the
        profile's interval again."""
        now = self.now()
        ended = [name for name, p in self.polls.items()
                 if name not in self.known
                 or (p["until"] is not None and datetime.datetime.fromisoformat(p["until"]) <= now)]
        if not ended:
            return
        self._let_polls_go(ended)
        for name in ended:
            if name in self.known:
                self.store.audit("poll", "timer", {
                    "device": name, "reason": "expired", "until": None,
                    "every_seconds": self.adapter.interval(name) if self.adapter else None})


class Evaluations:
    """How long each stimulus's evaluation held the supervisor's loop: the rules, and all their
    decisions set off (postures enforced, the decisions those changes made in turn, records,
    messages); what comes before the rules (the report kept, an alert's own record) is not
    counted. The loop does nothing else meanwhile, so a stimulus arriving then, an attack's
    included, waits that long. Kept: how many, the slowest, and the last SLOW_KEPT that took
    SLOW_MS or more, each named by its stimulus (status: evaluations)."""

    SLOW_MS = 5.0
    SLOW_KEPT = 64

    def __init__(self):
        self.count = 0
        self.slowest: dict | None = None
        self.slow: collections.deque[dict] = collections.deque(maxlen=self.SLOW_KEPT)

    def note(self, stimulus: policy.Stimulus, held_ns: int, at: datetime.datetime) -> None:
        self.count += 1
        ms = held_ns / 1e6
        if ms < self.SLOW_MS:
            return
        seen = {"ms": round(ms, 2), "stimulus": stimulus.kind, "device": stimulus.device, "at": iso(at)}
        self.slow.append(seen)
        if self.slowest is None or ms > self.slowest["ms"]:
            self.slowest = seen

    def status(self) -> dict:
        return {"count": self.count, "slow_ms": self.SLOW_MS, "slowest": self.slowest,
                "slow": list(self.slow)}


def _ends_together(stored: str | None, end: datetime.datetime | None) -> bool:
    """Whether a poll in force, ending at `stored` (as the polls table keeps it; None: no
    end), ends with a new ask's `end`: both without an end, or within a second."""
    if stored is None or end is None:
        return stored is None and end is None
    return abs((datetime.datetime.fromisoformat(stored) - end).total_seconds()) < 1


def event_ns(event: dict, read_ns: int) -> int:
    """When a kernel event happened: its own bpf_ktime_get_ns() (CLOCK_MONOTONIC, the clock of
    time.monotonic_ns()), so a decision is timed from the packet, not from when the ring buffer
    was read; `read_ns` if the event carries no time, or one later than its reading."""
    ts = event.get("ts_ns")
    return ts if isinstance(ts, int) and not isinstance(ts, bool) and 0 < ts <= read_ns else read_ns


def _mud_url_ok(url: str) -> bool:
    """What a device may say its MUD URL is (RFC 8520: https; DHCP option 161 holds 255 bytes)."""
    return url.startswith("https://") and len(url) <= 255 and url.isprintable() and " " not in url


def _returns_after(d: dict, for_seconds: int | None) -> list[dict]:
    """What a device returns to after a new posture: nothing for a posture without an end; for
    a timed one, the posture it had (until its own end, if it had one), then what that one
    returned to. So `attack` for 5 minutes over `suspicious` for 10 goes back to `suspicious`
    for what is left of its 10 minutes."""
    if not for_seconds:
        return []
    if not d.get("posture_expires"):
        return [{"posture": d["posture"], "until": None}]
    before = d.get("posture_after")
    if before is None:    # a record from before posture_after: its one return
        before = [{"posture": d.get("posture_revert_to") or "normal", "until": None}]
    return [{"posture": d["posture"], "until": d["posture_expires"]}, *before]


def _next_return(d: dict, now: datetime.datetime) -> tuple[str, int | None, list[dict]]:
    """(posture, seconds it has left or None, what follows it) for a device whose timed
    posture has ended: the first return that has not ended too."""
    after = d.get("posture_after")
    if after is None:
        after = [{"posture": d.get("posture_revert_to") or "normal", "until": None}]
    for i, entry in enumerate(after):
        if entry["until"] is None:
            return entry["posture"], None, after[i + 1:]
        left = (datetime.datetime.fromisoformat(entry["until"]) - now).total_seconds()
        if left >= 1:
            return entry["posture"], int(left), after[i + 1:]
    return "normal", None, []


def _mudfetch():
    """appliance.policy.mudfetch, imported when a MUD file is fetched: urllib.request and
    http.client cost the supervisor 2.4 MB resident, and [mud] fetch is off by default."""
    from appliance.policy import mudfetch
    return mudfetch
