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
