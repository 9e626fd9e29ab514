"""Fakes behind the product's Protocol seams, for the tests that need no root."""
from __future__ import annotations

import contextlib
import dataclasses
import time

from appliance.dataplane import umbox
from appliance.dataplane.names import NameBindings


class FakeTable:
    """A BPF hash map's calls, in a dict (the name bindings' kernel table)."""

    def __init__(self):
        self.entries = {}

    def update(self, key, value):
        self.entries[bytes(key)] = (key, value)

    def delete(self, key):
        self.entries.pop(bytes(key), None)

    def lookup(self, key):
        found = self.entries.get(bytes(key))
        return found[1] if found else None

    def keys(self):
        return [k for k, _ in list(self.entries.values())]


class FakeDataplane:
    """The data path as the supervisor sees it (appliance.dataplane.port.DataplanePort), in
    memory: what is applied is what reads back."""

    def __init__(self):
        self.devices = {}
        self.blocked = {}
        self.blocked_until = {}     # source -> (time.monotonic() it ends or None, device)
        self.decoyed: set[str] = set()     # sources decoy_source was asked for
        self.tampered = []
        self.names = NameBindings(FakeTable())
        self.removed: list[str] = []       # every remove(), in order
        self.waiting_events: list[dict] = []   # what events() hands out next, as the ring would
        # a device's kernel counters, {reason: {"umbox", "packets", "bytes"}}, once a test makes
        # them grow (count()); the others read FIXED_COUNTERS
        self.counter_values: dict[str, dict[str, dict]] = {}

    def apply(self, spec):
        self.devices[spec.name] = spec
        device_id = list(self.devices).index(spec.name) + 1
        self.names.set_device(device_id, spec.name, spec.mac,
                              umbox.compile_stack(spec.stack).names)
        return device_id

    def answer(self, device_ip, chain, addresses, ttl):
        for i, spec in enumerate(self.devices.values()):
            if spec.ip == device_ip:
                return self.names.answer(i + 1, chain, addresses, ttl)
        return False

    def names_of(self, name):
        return self.names.of_device(list(self.devices).index(name) + 1)

    def resolved_names(self, name, address):
        if name not in self.devices:
            return []
        return self.names.resolved(list(self.devices).index(name) + 1, address)

    def name_snapshot(self):
        return self.names.snapshot()

    def restore_names(self, entries):
        return {"restored": self.names.restore(entries), "pruned": self.names.prune()}

    def expire_names(self):
        return self.names.expire()

    def batch(self):
        return contextlib.nullcontext()

    def remove(self, name):
        self.removed.append(name)
        self.devices.pop(name, None)
        self.counter_values.pop(name, None)       # the kernel empties the slot's counters

    def rename(self, name, new):
        """The same device id (its place in the dict) under the new name; nothing removed."""
        if new in self.devices:
            raise ValueError(f"the fake data path holds a device {new}")
        spec = dataclasses.replace(self.devices[name], name=new)
        self.devices = {new if n == name else n: spec if n == name else s
                        for n, s in self.devices.items()}
        if name in self.counter_values:           # the same slot, so the same counters
            self.counter_values[new] = self.counter_values.pop(name)
        self.names.set_device(list(self.devices).index(new) + 1, new, spec.mac,
                              umbox.compile_stack(spec.stack).names)

    def read_back(self, name):
        return self.devices[name].posture

    def read_back_all(self, names):
        return {name: self.read_back(name) for name in names}

    FIXED_COUNTERS = {"brute_force": {"umbox": "brute_force", "packets": 7, "bytes": 420},
                      "pass": {"umbox": "dispatcher", "packets": 100, "bytes": 9000}}

    def counters(self, name):
        kept = self.counter_values.get(name, self.FIXED_COUNTERS)
        return {reason: dict(c) for reason, c in kept.items()}

    def count(self, name, reason, packets, bytes_=None):
        """The device's counter of `reason` grows by `packets` (of 100 bytes each unless
        `bytes_`), as the kernel's does; its first count starts it from zero."""
        c = self.counter_values.setdefault(name, {}).setdefault(
            reason, {"umbox": None if reason == "pass" else reason, "packets": 0, "bytes": 0})
        c["packets"] += packets
        c["bytes"] += 100 * packets if bytes_ is None else bytes_

    def reset_counters(self, name):
        """The device's counters start again from zero (its slot re-used, the program reloaded)."""
        self.counter_values[name] = {}

    def block_source(self, ip, seconds, device=None):
        self.blocked[ip] = seconds
        self.blocked_until[ip] = (time.monotonic() + seconds if seconds else None, device)

    def decoy_source(self, ip):
        self.decoyed.add(ip)
        return ip in self.blocked

    def unblock_source(self, ip):
        self.decoyed.discard(ip)
        self.blocked_until.pop(ip, None)
        return self.blocked.pop(ip, None) is not None

    def drop_set(self):
        now = time.monotonic()
        return [{"source": ip, "device": device, "reason": "drop_set",
                 "seconds_left": None if until is None else round(until - now, 1)}
                for ip, (until, device) in self.blocked_until.items() if until is None or until > now]

    def device_by_ip(self, ip):
        return next((n for n, s in self.devices.items() if s.ip == ip), None)

    def events(self, timeout=0.0, limit=4096, consume=True):
        out, self.waiting_events = self.waiting_events, []
        return out

    def consume_events(self):
        pass

    def events_pending(self):
        return bool(self.waiting_events)

    def events_fileno(self):
        raise OSError("the fake data path has no ring buffer")

    def kernel_postures(self):
        return {s.mac: s.posture for s in self.devices.values()}

    def prepare(self, stacks):
        self.prepared = list(stacks)
        return []

    def reconcile(self, wanted):
        for spec in wanted:
            self.apply(spec)
        return {"applied": [s.name for s in wanted]}

    def drift(self):
        """A test tampers by setting `tampered`: what drift() reports until restore()."""
        return list(self.tampered)

    def restore(self, wanted):
        self.tampered = []
        return self.reconcile(wanted)

    def close(self):
        pass


def supervisor(tmp_path, **devices):
    """A Supervisor on a real store in tmp_path and a FakeDataplane, with devices given as
    name=(mac, ip, type), each approved."""
    from appliance import config
    from appliance.supervisor.core import Supervisor
    cfg = config.Config()
    cfg.state.directory = str(tmp_path / "state")
    cfg.mqtt.password_file = str(tmp_path / "mqtt-supervisor")
    cfg.gateway.gate_credentials = str(tmp_path / "gate-credentials.json")
    sup = Supervisor(cfg)
    sup.attach(FakeDataplane(), loop=None)
    for name, (mac, ip, type_) in devices.items():
        sup.add_device(name, mac, ip, type_, approve=True)
    return sup
