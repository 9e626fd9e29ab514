"""The supervisor's state: devices, site rules and settings in one TinyDB file (kalki.json, in
/var/lib/kalki by default), and beside it the logs (posture history, alerts, decisions and the
audit trail: appliance.store.logs).

Only the supervisor process writes them. Every write of kalki.json replaces the whole file
atomically, so a kill or a power cut at any instant leaves the old state or the new one.
Each public mutating call is one disk write; `with store.batch():` makes several calls one
write, all or nothing.

Timestamps are ISO 8601 UTC strings with microseconds, all in the same form, so comparing
the strings compares the times.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import ipaddress
import json
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinydb import TinyDB, where
from tinydb.table import Table

from appliance.errors import ConfigError, StoreError
from appliance.store.logs import ANY, LogTable
from appliance.store.storage import AtomicJSONStorage, _Table
from appliance.vocab import (
    ALERT_SOURCES,
    WORKDAYS,
    check_business_hours,
    check_device_name,
    check_mac,
    check_timezone,
    iso,
)

if TYPE_CHECKING:
    from appliance.store.logs import _Append, _Rewrite

DEFAULT_DIRECTORY = Path("/var/lib/kalki")
FILENAME = "kalki.json"
# What enforcement depends on is written at once; the logs (posture history, alerts, decisions)
# are written behind, at most a flush interval late, so that an alert storm does not rewrite
# the device file and a decision does not wait for the disk.
STATE_TABLES = ("devices", "rules", "settings")
LOG_TABLES = ("history", "alerts", "decisions")
TABLES = STATE_TABLES + LOG_TABLES
IDENTITY_KEYS = ("hostname", "client_id", "vendor_class", "mud_url")
DEFAULT_SETTINGS = {
    "business_hours": {"days": list(WORKDAYS),
                       "start": "08:00", "end": "18:00"},
    "timezone": "UTC",
}
MAINTENANCE_KEY = "maintenance_until"
# The built-in and profile rules the operator switched off (their own files cannot be edited on
# the appliance): a sorted list of rule names.
RULES_OFF_KEY = "rules_off"
MAX_RULES_OFF = 1000
MAX_FORMER_NAMES = 16     # a device's renames whose logs follow it (older ones: the old name again)
HA_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")     # a device's Home Assistant node id


@dataclass(frozen=True)
class Retention:
    history_per_device: int = 200
    alerts: int = 5000
    decisions: int = 5000
    max_age_days: int = 30      # alerts and decisions; a device's posture history has no age

    def __post_init__(self):
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"retention {name}: expected a positive integer, got {value!r}")


def _over(count: int, bound: int) -> bool:
    """True once a table exceeds its bound by 10%: pruning then removes a tenth of it at once,
    instead of one record per insert."""
    return count > bound + max(1, bound // 10)


def _stamp(value, what: str) -> str:
    """A datetime or ISO string as the one form we store; naive times are refused, as a
    timestamp without a zone is a guess."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise StoreError(f"{what}: invalid ISO 8601 timestamp {value!r}") from None
    if not isinstance(value, datetime):
        raise StoreError(f"{what}: expected a timestamp, got {value!r}")
    if value.tzinfo is None:
        raise StoreError(f"{what}: timestamp {value.isoformat()} has no time zone")
    return iso(value)


def _json(value, what: str):
    """A private copy of what the caller gave, checked to be storable."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what}: cannot be stored as JSON: {e}") from None


def _text(value, what: str, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise StoreError(f"{what}: expected a non-empty string, got {value!r}")
    return value


def _mac(value, culprit: str) -> str:
    return check_mac(value, culprit, StoreError)


def _posture_after(value, what: str) -> list[dict]:
    """The postures a timed one returns to, in order: [{"posture", "until"}], until None for
    the last (the one that does not expire)."""
    if not isinstance(value, list):
        raise StoreError(f"{what}: expected a list, got {value!r}")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or set(entry) != {"posture", "until"}:
            raise StoreError(f"{what}[{i}]: expected {{posture, until}}, got {entry!r}")
        until = None if entry["until"] is None else _stamp(entry["until"], f"{what}[{i}].until")
        out.append({"posture": _text(entry["posture"], f"{what}[{i}].posture"), "until": until})
    return out


def _logins_checked(value, what: str) -> dict:
    """The last default-login check of a device (appliance.supervisor.logins): a small table
    of texts and numbers, with a list of results. Never a password: a record that holds one
    anywhere is refused."""
    value = _json(value, what)
    if not isinstance(value, dict) or len(json.dumps(value)) > 8192:
        raise StoreError(f"{what}: expected a table of at most 8 KB")
    _no_password(value, what)
    return value


def _no_password(x, where: str) -> None:
    # (a function of the module: a recursive closure is a cycle each time it is made)
    if isinstance(x, dict):
        for k, v in x.items():
            if "password" in str(k).lower():
                raise StoreError(f"{where}: holds a password ({k!r}); the check records none")
            _no_password(v, f"{where}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _no_password(v, f"{where}[{i}]")


def _plain(doc) -> dict:
    """The document as the caller's own dict."""
    return copy.deepcopy(dict(doc))


def _with_ids(docs) -> list[dict]:
    for doc in docs:
        doc["id"] = doc.doc_id
    return docs


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


class Store:
    """The state of one gateway. Use as a context manager, or call close()."""

    def __init__(self, directory: Path = DEFAULT_DIRECTORY, retention: Retention = Retention(),
                 clock=None):
        self.directory = Path(directory)
        self.path = self.directory / FILENAME
        self.retention = retention
        self._clock = clock or (lambda: datetime.now(UTC))
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the store directory {self.directory}: {e}") from None
        # A refused write keeps the new state in memory (see disk_error): what the supervisor
        # records is already in force in the kernel, and going back to the file's older state
        # would release a device at the next restart.
        self._db = TinyDB(self.path, storage=AtomicJSONStorage, keep_unsaved=True)
        self._db.table_class = _Table
        storage = self._db.storage
        assert isinstance(storage, AtomicJSONStorage), "TinyDB made the storage class it was given"
        self._storage = storage
        self._storage.read()    # a corrupt file fails here, at start-up, naming itself
        # No query cache: reads are served from memory anyway, and a cache could hold results
        # of a batch that was rolled back.
        self._t: dict[str, Table | LogTable] = {
            name: self._db.table(name, cache_size=0) for name in STATE_TABLES}
        self._logs = {name: LogTable(self.directory / f"{name}.jsonl") for name in LOG_TABLES}
        self._t.update(self._logs)
        self._closed = False
        self._settings_memo: tuple[dict | None, dict] | None = None   # (the raw table, its values)
        self._device_ids: dict[str, int] = {}    # name -> TinyDB id, checked on each use (_named)
        self._batch_depth = 0
        self._undo: list[Callable[[], None]] = []   # run if the batch they were made in fails
        renamed = [(former, doc["name"]) for doc in self._table("devices").all()
                   for former in doc.get("former_names") or []]
        for name, log in self._logs.items():        # renamed devices: their logs follow them
            log.relabel_all([(former["name"], new, former["below"][name]) for former, new in renamed
                             if isinstance(former["below"].get(name), int)])
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        # (future, [(log, job)]) of the flush running behind
        self._behind: tuple[concurrent.futures.Future[list[None]],
                            list[tuple[LogTable, _Append | _Rewrite]]] | None = None

    @property
    def disk_error(self) -> str | None:
        """Why the state in memory is not on disk yet, or None when it is."""
        return self._storage.unsaved

    def write_behind(self) -> None:
        """From now on the state file is written in a worker thread, the newest state each
        time, while the caller goes on (storage.AtomicJSONStorage): appliance.run's choice for
        the supervisor's loop. A refused write is `disk_error`, as before. flush() and close()
        wait for the writer."""
        self._storage.write_behind = True

    def retry_write(self) -> bool:
        """Writes the state kept in memory after a refused write; True when the disk has it."""
        return self._storage.retry()

    def flush(self):
        """Writes the log lines kept in memory since the last flush (the supervisor does this
        every second, with flush_behind(), and at exit; a crash loses at most that much of the
        logs)."""
        if not self._closed:
            self._storage.settle()
            self._settle()
            self._finish([(log, job) for log in self._logs.values()
                          if (job := log.begin_flush()) is not None], run=True)

    async def flush_behind(self) -> None:
        """flush(), with the writing and the fsyncs in a worker thread: the loop goes on
        meanwhile (an SD card's fsync can take tens of milliseconds, a log's rewrite longer).
        Nothing is taken from the middle of a batch; one flush runs at a time."""
        if self._closed or self._behind is not None or self._batch_depth:
            return
        jobs = [(log, job) for log in self._logs.values() if (job := log.begin_flush()) is not None]
        if not jobs:
            return
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kalki-store")
        fut = self._writer.submit(lambda: [job.run() for _, job in jobs])
        self._behind = (fut, jobs)
        try:
            await asyncio.wrap_future(fut)
        finally:
            if self._behind is not None and self._behind[0] is fut:
                self._settle()

    def _settle(self) -> None:
        """Waits for a flush running behind and takes its result (on the loop's thread)."""
        if self._behind is not None:
            fut, jobs = self._behind
            self._behind = None
            concurrent.futures.wait([fut])
            self._finish(jobs, run=False)

    def _finish(self, jobs, run: bool) -> None:
        failed = None
        for log, job in jobs:
            if run:
                job.run()
            try:
                replaced = log.finish_flush(job)
            except StoreError as e:
                failed = failed or e
                continue
            if replaced is not None:
                if run or self._writer is None:
                    replaced.close()
                else:
                    self._writer.submit(replaced.close)
        if failed is not None:
            raise failed

    def close(self):
        if not self._closed:
            try:
                self.flush()
            finally:
                self._closed = True
                if self._writer is not None:
                    self._writer.shutdown()
                self._db.close()
                for log in self._logs.values():
                    log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def batch(self):
        """Several mutating calls as one disk write; if the block raises, none of them count."""
        if self._closed:
            raise StoreError(f"the store {self.path} is closed")
        marks = {name: log.mark() for name, log in self._logs.items()}
        undo_mark = len(self._undo)
        self._batch_depth += 1
        try:
            with self._storage.batch():
                yield
        except BaseException:
            while len(self._undo) > undo_mark:     # what a rename moved in the logs
                self._undo.pop()()
            for name, log in self._logs.items():
                log.rollback(marks[name])
            raise
        finally:
            self._batch_depth -= 1
            if not self._batch_depth:
                self._undo.clear()

    def _now(self) -> str:
        return _stamp(self._clock(), "clock")

    def _table(self, name):
        if self._closed:
            raise StoreError(f"the store {self.path} is closed")
        return self._t[name]

    # devices

    def upsert_device(self, name: str, mac: str, ip=None, type=None, identity: dict | None = None,
                      approved: bool | None = None, posture: str | None = None,
                      group: str | None = None) -> dict:
        """Adds a device, or refreshes the one with this name, and marks it seen now. For a
        known device, arguments left as None keep their stored value (a DHCP sighting must not
        reset approval or posture); a new device starts unapproved with posture "unknown"."""
        check_device_name(name, "device name", StoreError)
        _mac(mac, f"device {name!r}")
        given = {"mac": mac, "ip": ip, "type": type, "identity": identity, "approved": approved,
                 "posture": posture, "group": group}
        fields = {k: v for k, v in given.items() if v is not None}
        with self.batch():
            current = self._named(name)
            now = self._now()
            if current is None:
                blank: dict[str, Any] = {"ip": None, "type": None, "identity": dict.fromkeys(IDENTITY_KEYS),
                         "approved": False, "posture": "unknown", "posture_since": now,
                         "posture_expires": None, "posture_revert_to": None, "posture_after": [],
                         "group": None,
                         "first_seen": now}
                doc = {"name": name, **blank, **self._device_fields(name, blank, fields, now),
                       "last_seen": now}
                self._table("devices").insert(doc)
            else:
                changes = self._device_fields(name, current, fields, now)
                self._table("devices").update({**changes, "last_seen": now},
                                              doc_ids=[current.doc_id])
        return _plain(self._device(name))

    def get_device(self, name: str) -> dict | None:
        doc = self._named(name)
        return None if doc is None else _plain(doc)

    def device_by_mac(self, mac: str) -> dict | None:
        doc = self._table("devices").get(where("mac") == _mac(mac, "device lookup"))
        return None if doc is None else _plain(doc)

    def devices(self) -> list[dict]:
        return sorted((_plain(d) for d in self._table("devices").all()), key=lambda d: d["name"])

    def update_device(self, name: str, /, **fields) -> dict:
        """Changes some fields of a known device. A new posture restarts posture_since and,
        unless given too, clears posture_expires and posture_revert_to."""
        with self.batch():
            current = self._device(name)
            changes = self._device_fields(name, current, fields, self._now())
            self._table("devices").update(changes, doc_ids=[current.doc_id])
        return _plain(self._device(name))

    def rename_device(self, name: str, new: str, *, logs: bool = False, **fields) -> dict:
        """Gives a device a new name, keeping its record (MAC, posture, approval) and changing
        `fields` with it, in one write. With `logs`, its posture history, alerts, decisions and
        audit records are found under the new name from now on: the lines on disk keep the name
        they were written with, and the device's `former_names` (each with the first record id
        of every log after the rename) file them under the new name again at every start.
        Without, they keep the old name (for names an older version let in that the name rule
        refuses now)."""
        check_device_name(new, "device name", StoreError)
        with self.batch():
            doc = self._device(name)
            if self._named(new) is not None:
                raise StoreError(f"device {name!r}: cannot rename it to {new!r}, which is taken")
            changes = self._device_fields(name, doc, fields, self._now()) if fields else {}
            below = {table: log.mark() for table, log in self._logs.items()}
            if logs:
                changes["former_names"] = [*(doc.get("former_names") or []),
                                           {"name": name, "below": below, "at": self._now()}
                                           ][-MAX_FORMER_NAMES:]
            self._table("devices").update({**changes, "name": new}, doc_ids=[doc.doc_id])
            if logs:
                for table, log in self._logs.items():
                    moved = log.relabel(name, new, below[table])
                    self._undo.append(functools.partial(log.unlabel, moved, name))
        return _plain(self._device(new))

    def remove_device(self, name: str):
        """Forgets the device; its posture history, alerts and decisions stay."""
        with self.batch():
            self._table("devices").remove(doc_ids=[self._device(name).doc_id])

    def _named(self, name: str):
        """The device named so, or None: by the id it was last found under (a posture change
        looks its device up five times, and a search reads every device), then by a search."""
        devices = self._table("devices")
        doc_id = self._device_ids.get(name)
        if doc_id is not None:
            doc = devices.get(doc_id=doc_id)
            if doc is not None and doc["name"] == name:
                return doc
        doc = devices.get(where("name") == name)
        if doc is not None:
            self._device_ids[name] = doc.doc_id
        return doc

    def _device(self, name):
        doc = self._named(name)
        if doc is None:
            raise StoreError(f"device {name!r} does not exist")
        return doc

    def _device_fields(self, name, current, fields, now) -> dict:
        """The checked changes to a device record, with what follows from them."""
        culprit = f"device {name!r}"
        if "name" in fields:
            raise StoreError(f"{culprit}: the name cannot be changed; remove the device and add it")
        unknown = set(fields) - set(current) - {"mac", "last_seen", "posture_after", "allow", "mud_offer",
                                                "logins_checked", "mqtt_user", "ha_id"}
        if unknown:
            raise StoreError(f"{culprit}: unknown field(s) {sorted(unknown)}")
        out = {}
        for key, value in fields.items():
            what = f"{culprit}, field {key}"
            if key == "mac":
                value = _mac(value, culprit)
                owner = self._table("devices").get(where("mac") == value)
                if owner is not None and owner["name"] != name:
                    raise StoreError(f"{culprit}: MAC address {value} already belongs to device "
                                     f"{owner['name']!r}")
            elif key == "ip" and value is not None:
                try:
                    value = str(ipaddress.IPv4Address(value))
                except ValueError:
                    raise StoreError(f"{what}: invalid IPv4 address {value!r}") from None
            elif key == "identity":
                if not isinstance(value, dict) or set(value) - set(IDENTITY_KEYS):
                    raise StoreError(f"{what}: expected a table with keys among "
                                     f"{', '.join(IDENTITY_KEYS)}, got {value!r}")
                value = {**current["identity"], **_json(value, what)}
            elif key == "approved" and not isinstance(value, bool):
                raise StoreError(f"{what}: expected true or false, got {value!r}")
            elif key == "posture":
                _text(value, what)
            elif (key in ("posture_since", "first_seen", "last_seen")
                  or key == "posture_expires" and value is not None):
                value = _stamp(value, what)
            elif key in ("type", "group", "posture_revert_to"):
                _text(value, what, optional=True)
            elif key == "posture_after":
                value = _posture_after(value, what)
            elif key == "allow":    # the device's own destinations, on top of its profile's
                texts = isinstance(value, list) and all(isinstance(x, str) and len(x) <= 300 for x in value)
                if not texts or len(value) > 64:
                    raise StoreError(f"{what}: expected up to 64 destinations as text, got {value!r}")
            elif key == "mud_offer" and value is not None:   # the MUD file fetched from its MUD URL
                texts = isinstance(value, dict) and all(isinstance(k, str) and isinstance(x, str)
                                                        and len(x) <= 2048 for k, x in value.items())
                if not texts or len(value) > 16:
                    raise StoreError(f"{what}: expected a table of texts, got {value!r}")
                value = dict(value)
            elif key == "logins_checked" and value is not None:   # the default-login check's last run
                value = _logins_checked(value, what)
            elif key == "mqtt_user" and value is not None:    # its broker user and topic, if not its name
                check_device_name(value, what, StoreError)
            elif key == "ha_id" and (not isinstance(value, str) or not HA_ID.fullmatch(value)):
                raise StoreError(f"{what}: expected 1 to 64 letters, digits, '_' or '-', got {value!r}")
            out[key] = value
        if "posture" in out and out["posture"] != current["posture"]:
            out.setdefault("posture_since", now)
            out.setdefault("posture_expires", None)
            out.setdefault("posture_revert_to", None)
            out.setdefault("posture_after", [])
        return out

    # posture history

    def record_posture(self, device: str, posture: str, reason: str, at=None) -> int:
        _text(posture, f"device {device!r}, posture")
        _text(reason, f"device {device!r}, posture {posture}, reason")
        at = self._now() if at is None else _stamp(at, f"device {device!r}, posture time")
        history = self._table("history")
        with self.batch():
            self._device(device)
            doc_id = history.insert({"device": device, "posture": posture, "reason": reason,
                                     "at": at})
            if _over(history.count_for(device), self.retention.history_per_device):
                history.trim(self.retention.history_per_device, device)
        return doc_id

    def posture_history(self, device: str, limit: int = 50) -> list[dict]:
        """Newest first (in the order recorded, see LogTable; "clock_back" marks a record
        stamped earlier than the one before it); kept after the device is removed."""
        history = self._table("history")
        return history.newest(history.rows(device), limit)

    # alerts

    def add_alert(self, alert: dict) -> int:
        """alert: device (None: about no one device, e.g. a source blocked by hand), type,
        source (one of ALERT_SOURCES), severity, and optionally details (a table) and at
        (default now). Returns the alert's id."""
        alert = self._record("alert", {"device": None, **alert}, required=("type", "source", "severity"),
                             optional=("device", "details", "at"))
        if alert["device"] is not None:
            _text(alert["device"], "alert, device")
        if alert["source"] not in ALERT_SOURCES:
            raise StoreError(f"alert for device {alert['device']!r}: unknown source "
                             f"{alert['source']!r} (known: {', '.join(ALERT_SOURCES)})")
        alert.setdefault("details", {})
        return self._append("alerts", alert, self.retention.alerts)

    def alerts(self, device: str | None = None, since=None, limit: int = 100) -> list[dict]:
        """Newest first, each with its id (and "clock_back", as posture_history)."""
        return _with_ids(self._table("alerts").newest(self._alerts(device, None, since), limit))

    def count_alerts(self, device: str | None, types=None, since=None) -> int:
        """Alerts of the device (any device if None) of these types (any if None) at or after
        since (ever if None)."""
        return len(self._alerts(device, [types] if isinstance(types, str) else types, since))

    def _alerts(self, device, types, since):
        since = None if since is None else _seconds(_stamp(since, "alerts since"))
        return self._table("alerts").rows(ANY if device is None else device, types, since)

    # decisions and the audit log

    def add_decision(self, rec: dict) -> int:
        """A posture decision, with whatever fields the rules engine records; at defaults to
        now. Returns its id."""
        if not isinstance(rec, dict):
            raise StoreError(f"decision: expected a table, got {rec!r}")
        if rec.get("kind", "decision") != "decision":
            raise StoreError(f"decision for device {rec.get('device')!r}: kind is "
                             f"{rec['kind']!r}; audit entries go through audit()")
        culprit = f"decision for device {rec.get('device')!r}"
        at = self._now() if rec.get("at") is None else _stamp(rec["at"], f"{culprit}, at")
        fields = _json({k: v for k, v in rec.items() if k != "at"}, culprit)
        rec = {"kind": "decision", "device": None, **fields, "at": at}
        return self._append("decisions", rec, self.retention.decisions)

    def audit(self, event: str, actor: str, details: dict | None = None) -> int:
        """An operator action (or a button press) in the audit log; details["device"], if
        present, files it under that device."""
        _text(event, "audit event")
        _text(actor, f"audit event {event!r}, actor")
        details = _json(details or {}, f"audit event {event!r}, details")
        if not isinstance(details, dict):
            raise StoreError(f"audit event {event!r}: details must be a table, got {details!r}")
        rec = {"kind": "audit", "event": event, "actor": actor, "device": details.get("device"),
               "details": details, "at": self._now()}
        return self._append("decisions", rec, self.retention.decisions)

    def decisions(self, device: str | None = None, limit: int = 100, kind: str | None = None
                  ) -> list[dict]:
        """Newest first, each with its id (and "clock_back", as posture_history); kind
        "decision" or "audit" to see only one kind."""
        decisions = self._table("decisions")
        rows = decisions.rows(ANY if device is None else device, None if kind is None else [kind])
        return _with_ids(decisions.newest(rows, limit))

    def _record(self, what, rec, required, optional) -> dict:
        if not isinstance(rec, dict):
            raise StoreError(f"{what}: expected a table, got {rec!r}")
        culprit = f"{what} for device {rec.get('device')!r}"
        missing = [k for k in required if rec.get(k) is None]
        if missing:
            raise StoreError(f"{culprit}: missing field(s) {missing}")
        for key in required:
            _text(rec[key], f"{culprit}, field {key}")
        unknown = set(rec) - set(required) - set(optional)
        if unknown:
            raise StoreError(f"{culprit}: unknown field(s) {sorted(unknown)} "
                             f"(known: {', '.join(required + optional)})")
        at = self._now() if rec.get("at") is None else _stamp(rec["at"], f"{culprit}, at")
        rec = {**_json({k: v for k, v in rec.items() if k != "at"}, culprit), "at": at}
        if not isinstance(rec.get("details", {}), dict):
            raise StoreError(f"{culprit}: details must be a table, got {rec['details']!r}")
        return rec

    def _append(self, name, rec, bound) -> int:
        table = self._table(name)
        with self.batch():
            doc_id = table.insert(rec)
            if _over(len(table), bound):
                self._prune_log(table, bound, self._age_cutoff(None))
        return doc_id

    # site rules

    def put_rule(self, name: str, data: dict) -> dict:
        """Adds or replaces a rule. enabled defaults to the rule's current state (true for a
        new rule), so editing a disabled rule does not switch it on."""
        _text(name, "rule name")
        if not isinstance(data, dict):
            raise StoreError(f"rule {name!r}: expected a table, got {data!r}")
        if data.get("name", name) != name:
            raise StoreError(f"rule {name!r}: the data names another rule, {data['name']!r}")
        data = _json(data, f"rule {name!r}")
        with self.batch():
            current = self._table("rules").get(where("name") == name)
            enabled = data.get("enabled", True if current is None else current["enabled"])
            if not isinstance(enabled, bool):
                raise StoreError(f"rule {name!r}, field enabled: expected true or false, "
                                 f"got {enabled!r}")
            doc = {**data, "name": name, "enabled": enabled}

            def replace(old):   # update() with a table would keep fields the new data dropped
                old.clear()
                old.update(doc)
            if current is None:
                self._table("rules").insert(doc)
            else:
                self._table("rules").update(replace, doc_ids=[current.doc_id])
        return _plain(self._rule(name))

    def get_rule(self, name: str) -> dict | None:
        doc = self._table("rules").get(where("name") == name)
        return None if doc is None else _plain(doc)

    def rules(self) -> list[dict]:
        return sorted((_plain(d) for d in self._table("rules").all()), key=lambda r: r["name"])

    def delete_rule(self, name: str):
        with self.batch():
            self._table("rules").remove(doc_ids=[self._rule(name).doc_id])

    def set_rule_enabled(self, name: str, enabled: bool) -> dict:
        if not isinstance(enabled, bool):
            raise StoreError(f"rule {name!r}: enabled must be true or false, got {enabled!r}")
        with self.batch():
            self._table("rules").update({"enabled": enabled}, doc_ids=[self._rule(name).doc_id])
        return _plain(self._rule(name))

    def _rule(self, name):
        doc = self._table("rules").get(where("name") == name)
        if doc is None:
            raise StoreError(f"rule {name!r} does not exist")
        return doc

    # settings and maintenance

    def get_setting(self, key: str, default=None):
        """The stored value; else default; else the built-in default (business_hours,
        timezone); else None."""
        table = self._table("settings")
        raw = self._storage.table("settings")
        memo = self._settings_memo
        if memo is None or memo[0] is not raw:
            # Made again only when the table was written or read again (a failed batch): the
            # rules ask for the maintenance window on every evaluation, 1,000 a second at
            # 1,000 devices, and a query scanned the table each time.
            memo = self._settings_memo = (raw, {d["key"]: d["value"] for d in table.all()})
        if key in memo[1]:
            return copy.deepcopy(memo[1][key])
        if default is not None:
            return default
        return copy.deepcopy(DEFAULT_SETTINGS.get(key))

    @staticmethod
    def check_setting(key, value) -> None:
        """Raises StoreError naming the setting if `value` would be refused."""
        _check_setting(key, value)

    def set_setting(self, key: str, value):
        _text(key, "setting name")
        value = _json(value, f"setting {key}")
        _check_setting(key, value)
        settings = self._table("settings")
        with self.batch():
            current = settings.get(where("key") == key)
            if current is None:
                settings.insert({"key": key, "value": value})
            else:
                settings.update({"value": value}, doc_ids=[current.doc_id])

    def settings(self) -> dict:
        stored = {d["key"]: d["value"] for d in self._table("settings").all()}
        return copy.deepcopy({**DEFAULT_SETTINGS, **stored})

    def set_maintenance(self, until):
        """Maintenance mode until this time (a datetime or ISO string); None ends it."""
        self.set_setting(MAINTENANCE_KEY,
                         None if until is None else _stamp(until, "maintenance until"))

    def maintenance_until(self) -> str | None:
        """As stored, even if already past: the caller compares it with its own clock."""
        return self.get_setting(MAINTENANCE_KEY)

    # retention

    def prune(self, now=None) -> dict[str, int]:
        """Applies the retention limits exactly, in one write; returns how many records each
        table lost. Inserts prune only once a table is 10% over its limit."""
        cutoff = self._age_cutoff(now)
        removed = {}
        with self.batch():
            for name, bound in (("alerts", self.retention.alerts),
                                ("decisions", self.retention.decisions)):
                removed[name] = self._prune_log(self._table(name), bound, cutoff)
            history, keep = self._table("history"), self.retention.history_per_device
            removed["history"] = sum(history.trim(keep, device)
                                     for device in history.devices_over(keep))
        return removed

    def _age_cutoff(self, now) -> float:
        now = datetime.fromisoformat(self._now() if now is None else _stamp(now, "prune now"))
        return (now - timedelta(days=self.retention.max_age_days)).timestamp()

    @staticmethod
    def _prune_log(table, bound, cutoff) -> int:
        return table.trim(bound, before=cutoff)


def _check_setting(key, value):
    """The settings other modules rely on are checked here, so a bad value fails when set,
    not hours later when a rule first looks at the clock."""
    if key == "timezone":
        check_timezone(value, "setting timezone", StoreError)
    elif key == "business_hours":
        if not isinstance(value, dict) or set(value) != {"days", "start", "end"}:
            raise StoreError("setting business_hours: expected a table with days, start and end, "
                             f"got {value!r}")
        check_business_hours(value, "setting business_hours", StoreError)
    elif key == RULES_OFF_KEY:
        if (not isinstance(value, list) or len(value) > MAX_RULES_OFF
                or not all(isinstance(n, str) and n for n in value) or len(set(value)) != len(value)):
            raise StoreError(f"setting {RULES_OFF_KEY}: expected a list of distinct rule names, "
                             f"got {value!r}"[:300])
