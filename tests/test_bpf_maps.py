"""appliance.dataplane.bpf's own map calls against the kernel: a new device's slots emptied in
one batch call, and entry by entry where the kernel refuses batches."""
from __future__ import annotations

import ctypes

import pytest

from appliance.dataplane import bpf, maps

pytestmark = pytest.mark.lab

SLOTS = maps.REASON_SLOTS


def array(map_type: int, value_type) -> bpf.Map:
    fd = bpf.map_create(map_type, ctypes.c_uint32, value_type, 4 * SLOTS, 0, "kalki_test")
    return bpf.Map("test map", ctypes.c_uint32, value_type, fd=fd)


def filled(m: bpf.Map) -> None:
    for k in range(m.max_entries):
        m.update(ctypes.c_uint32(k), m.value_type(k + 1, k + 2, k + 3) if m.value_type is maps.EventLimit
                 else m.value_type(k + 1, k + 2))


def empty(value) -> bool:
    values = value if isinstance(value, list) else [value]
    return not any(any(bytes(v)) for v in values)


@pytest.fixture(params=["array", "per-cpu array"])
def slots(request):
    m = (array(bpf.BPF_MAP_TYPE_ARRAY, maps.EventLimit) if request.param == "array"
         else array(bpf.BPF_MAP_TYPE_PERCPU_ARRAY, maps.Counter))
    filled(m)
    yield m
    m.close()


@pytest.mark.parametrize("batches", [True, False], ids=["batch", "no batch in the kernel"])
def test_a_devices_slots_are_emptied_and_only_those(slots, monkeypatch, batches):
    updates = []
    real_update = bpf.Map.update
    monkeypatch.setattr(bpf.Map, "update", lambda self, *a, **k: (updates.append(a[0].value),
                                                                  real_update(self, *a, **k))[1])
    if not batches:     # a command number no kernel has: EINVAL, as from one without batches
        monkeypatch.setattr(bpf, "BPF_MAP_UPDATE_BATCH", 9999)
    slots.zero(2 * SLOTS, SLOTS)
    assert updates == ([] if batches else list(range(2 * SLOTS, 3 * SLOTS)))
    for k in range(slots.max_entries):
        assert empty(slots.lookup(ctypes.c_uint32(k))) == (2 * SLOTS <= k < 3 * SLOTS), k


def test_a_refused_batch_names_the_map(slots):
    with pytest.raises(bpf.DataplaneError, match="batch update in kalki_test"):
        slots.zero(slots.max_entries - 1, 2)        # past the end


def test_the_first_entries_of_an_array_are_read_in_one_call_and_none_without_batches(monkeypatch):
    """What the tamper watch reads the devices' XDP entries with: every entry, indexed by its
    key, as entry-by-entry lookups see them; None where the kernel refuses batch lookups."""
    fd = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, maps.Device, 64, 0, "kalki_test")
    devices = bpf.Map("test map", ctypes.c_uint32, maps.Device, fd=fd)
    try:
        for k in (0, 5, 63):
            entry = maps.Device(flags=int(maps.Flag.PRESENT), posture=k % 5 + 1)
            devices.update(ctypes.c_uint32(k), entry)
        lookups = []
        real_lookup = bpf.Map.lookup
        monkeypatch.setattr(bpf.Map, "lookup", lambda self, key: (lookups.append(key.value),
                                                                  real_lookup(self, key))[1])
        entries = devices.first_values(64)
        assert lookups == [] and len(entries) == 64
        assert [e.posture for e in devices.first_values(6)] == [1, 0, 0, 0, 0, 1]
        assert len(devices.first_values(0)) == 0 and len(devices.first_values(1000)) == 64
        monkeypatch.undo()
        for k in range(64):
            one = devices.lookup(ctypes.c_uint32(k))
            assert bytes(entries[k]) == (bytes(one) if one is not None else bytes(maps.Device())), k
        assert [entries[k].posture for k in (0, 5, 63)] == [1, 1, 4]
        middle = devices.values_from(5, 59)     # index 0 is entry 5 (Dataplane.read_back_all)
        assert len(middle) == 59 and [bytes(middle[k - 5]) for k in range(5, 64)] == \
            [bytes(entries[k]) for k in range(5, 64)]
        assert len(devices.values_from(60, 100)) == 4        # cut at the map's end
        monkeypatch.setattr(bpf, "BPF_MAP_LOOKUP_BATCH", 9999)
        assert devices.first_values(64) is None and devices.values_from(5, 3) is None
    finally:
        devices.close()


@pytest.mark.parametrize("first", [0, 2 * SLOTS, 4 * SLOTS - 3])
def test_a_run_of_slots_is_read_in_one_call_as_lookups_see_it(slots, monkeypatch, first):
    """What a device's counters are read with (Dataplane.counters): its 16 slots in one batch
    lookup from any offset, per CPU for a per-CPU array, cut at the map's end."""
    lookups = []
    real_lookup = bpf.Map.lookup
    monkeypatch.setattr(bpf.Map, "lookup", lambda self, key: (lookups.append(key.value),
                                                              real_lookup(self, key))[1])
    got = slots.slots(first, SLOTS)
    assert lookups == []
    monkeypatch.undo()
    want = [slots.lookup(ctypes.c_uint32(k)) for k in range(first, min(first + SLOTS, slots.max_entries))]
    assert len(got) == len(want) > 0

    def raw(value):
        return [bytes(v) for v in value] if isinstance(value, list) else bytes(value)
    assert [raw(v) for v in got] == [raw(v) for v in want]
    assert not empty(got[0])                        # filled(): not a run of empty slots
    monkeypatch.setattr(bpf, "BPF_MAP_LOOKUP_BATCH", 9999)
    assert slots.slots(first, SLOTS) is None


@pytest.mark.parametrize("batches", [True, False], ids=["batch", "no batch in the kernel"])
def test_a_sparse_arrays_entries_are_read_in_one_call_and_the_same_without_batches(monkeypatch,
                                                                                    batches):
    """kalki_devices' present entries (what a Dataplane reads before its first apply): one
    batch lookup, no key-by-key walk over the free slots; the walk where the kernel refuses
    batches, with the same keys and values."""
    fd = bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, ctypes.c_uint32, maps.Device, 256, 0, "kalki_test")
    devices = bpf.Map("test map", ctypes.c_uint32, maps.Device, fd=fd)
    try:
        assert devices.sparse
        for k in (1, 7, 255):
            devices.update(ctypes.c_uint32(k), maps.Device(flags=int(maps.Flag.PRESENT), posture=k % 5 + 1,
                                                           allow_id=k))
        calls = []
        real = bpf._bpf
        monkeypatch.setattr(bpf, "_bpf", lambda cmd, *a: (calls.append(cmd), real(cmd, *a))[1])
        if not batches:
            monkeypatch.setattr(bpf, "BPF_MAP_LOOKUP_BATCH", 9999)
        keys = [k.value for k in devices.keys()]
        items = {k.value: (v.posture, v.allow_id) for k, v in devices.items()}
        assert keys == [1, 7, 255]
        assert items == {1: (2, 1), 7: (3, 7), 255: (1, 255)}
        if batches:
            assert calls == [bpf.BPF_MAP_LOOKUP_BATCH] * 2
        else:       # a key and a lookup per slot, each walk
            assert len(calls) > 2 * 256
    finally:
        devices.close()
