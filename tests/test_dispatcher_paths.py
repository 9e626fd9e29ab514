"""bench_dispatcher's named paths take the branches they claim: each of bench/dispatcher_paths.py's
cases, run through the pinned dispatcher with BPF_PROG_TEST_RUN (no namespaces, no traffic),
gets its verdict and grows device 1's counter for its reason, by exactly the packets run, and
no other; the SYN-path detectors it names ran on each packet (syn_flood's count, port_scan's
last-flow cache in kalki_dev_state) and those it does not name did not; varied_dst misses the
last-flow cache on every packet; and -DKALKI_NO_STEALTH_SCAN takes the stealth-scan check out."""
from __future__ import annotations

import ctypes
import os
import secrets
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import dispatcher_paths as paths  # noqa: E402
from common import PinnedPath, dataplane, maps  # noqa: E402
from labutil import tcp_packet  # noqa: E402

pytestmark = pytest.mark.lab

REPEAT = 100
HOUR_MS = 3_600_000     # detector windows that do not restart during the test: exact counts
CASES = {c.name: c for c in paths.cases()}


@pytest.fixture(scope="module")
def pins():
    made: dict[str, PinnedPath] = {}
    instances = {name: f"tdp{secrets.token_hex(2)}{name[:4]}" for name in paths.PIN_DIRS}
    try:
        for name, defines in paths.PIN_DIRS.items():
            made[name] = PinnedPath(instances[name], defines=defines)
            paths.prepare(name, made[name], count_window_ms=HOUR_MS)
        yield made
    finally:
        for path in made.values():
            path.close()
        for instance in instances.values():     # also one whose loading failed half-way
            dataplane.remove_pins(instance)


def cache(path) -> tuple[int, int, int]:
    st = paths.dev_state(path)
    return st.scan_src, st.scan_dst, st.scan_port


@pytest.mark.parametrize("name", list(CASES))
def test_each_path_ends_in_its_verdict_and_counts_only_its_reason(pins, name):
    case = CASES[name]
    path = pins[case.pin_dir]
    before, syns, flow_before = paths.counts(path), paths.dev_state(path).syn_count, cache(path)
    verdicts, ns = paths.run(path, case, REPEAT)
    paths.check(case, verdicts, before, paths.counts(path), REPEAT)
    assert ns > 0
    # syn_flood counted every packet, or none
    grew = paths.dev_state(path).syn_count - syns
    assert grew == (REPEAT if "syn_flood" in case.detectors else 0), (name, grew)
    # port_scan saw the (last) packet: its flow is the cache's; else the cache is untouched
    want = paths.flow(paths.last_packet(case) if case.per_run else case.packets[0]) \
        if "port_scan" in case.detectors else flow_before
    assert cache(path) == want, name
    if "brute_force" in case.detectors:     # on, and the packet's port is one of its ports
        entry = path.maps["kalki_devices"].lookup(ctypes.c_uint32(1))
        assert entry.flags & maps.Flag.BRUTE_FORCE and entry.flags & maps.Flag.SYN_FLOOD
        assert paths.LOGIN_PORT in list(entry.bf_ports)
        assert paths.flow(case.packets[0])[2] == paths.LOGIN_PORT | 6 << 16


def test_varied_destinations_miss_the_last_flow_cache_on_every_packet(pins):
    case = CASES["varied_dst"]
    path = pins["one"]
    fd = path.prog_fds[case.program]
    held = cache(path)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})     # (the allow-list's memory is per CPU)
    try:
        for i in range(3 * len(case.packets)):
            flow = paths.flow(case.packets[i % len(case.packets)])
            assert flow != held, i        # the cache holds another flow: this packet misses it
            assert flow[1:] != _seen(path)[min(cpus)][:2], i    # ... and the allow-list's memory
            verdict, _ = paths.bpf.prog_test_run(fd, case.packets[i % len(case.packets)], 1)
            assert verdict == paths.XDP_PASS
            held = cache(path)
            assert held == flow, i        # ... and port_scan went on and recorded it,
            assert flow[1:] == _seen(path)[min(cpus)][:2], i   # and the trie's verdict
    finally:
        os.sched_setaffinity(0, cpus)
    assert len(set(map(paths.flow, case.packets))) == len(case.packets) >= 2


def test_the_1000_device_path_has_1000_devices_with_their_own_lists(pins):
    devices = [v for _, v in pins["distinct"].maps["kalki_devices"].items()]
    assert len(devices) == paths.DISTINCT_DEVICES
    assert len({d.allow_id for d in devices}) == paths.DISTINCT_DEVICES


def test_without_the_stealth_scan_check_a_probe_passes(pins):
    """A FIN probe to the device: dropped as stealth_scan by the usual build, passed by the one
    compiled with -DKALKI_NO_STEALTH_SCAN (the check, not the SYN path, is what it takes out)."""
    probe = paths.from_uplink(tcp_packet(paths.REMOTE, paths.DEV_IP, 40001, 2222, "F"))
    for name, verdict, reason in (("one", paths.XDP_DROP, "stealth_scan"),
                                  ("no_stealth", paths.XDP_PASS, "pass")):
        path = pins[name]
        before = paths.counts(path)
        got, _ = paths.bpf.prog_test_run(path.prog_fds["xdp_to_devices"], probe, 1)
        assert (got, paths.grown(before, paths.counts(path))) == (verdict, {reason: 1}), name



def test_each_allow_list_is_its_own_trie_and_reads_back_from_the_kernel(pins):
    """A list's prefixes live in a trie of its own (so a lookup walks one list, however many
    there are), and a fresh reader, as after a restart, finds every device's list by content."""
    path = pins["distinct"]
    reader = dataplane.Dataplane("reader")
    reader._maps = path.maps
    index = reader._list_index()
    assert set(index.values()) == {d.allow_id for _, d in path.maps["kalki_devices"].items()}
    content, list_id = next(iter(index.items()))
    trie_id = path.maps["kalki_allow_lists"].lookup(ctypes.c_uint32(list_id)).value
    trie = paths.bpf.Map.by_id(trie_id, maps.AllowKey, maps.AllowValue)
    try:
        assert len(list(trie.keys())) == len(content) >= 2
    finally:
        trie.close()


def test_a_freed_allow_list_slot_is_given_again_only_after_the_others(pins):
    """A packet may have read a device's old list id just before the device moved: that slot
    must not hold another list a moment later."""
    path = pins["one"]
    lists = path.maps["kalki_allow_lists"]
    dp = dataplane.Dataplane("slots")
    dp._maps = path.maps
    dp._kept_lists = lambda: 0          # (kept lists: the test below)
    in_use = set(dp._list_index().values())
    first = dp._list_id(((32, "198.19.77.1", ((17, 53),)),), create=True)
    dp._collect_lists()                 # no device has it: its slot is emptied
    assert lists.lookup(ctypes.c_uint32(first)) is None
    assert path.maps["kalki_allow_list_ids"].lookup(ctypes.c_uint32(first)) is None
    second = dp._list_id(((32, "198.19.77.2", ((17, 53),)),), create=True)
    assert second not in in_use | {first}
    dp._collect_lists()
    assert lists.lookup(ctypes.c_uint32(second)) is None


def test_a_slot_a_device_names_is_never_given_to_another_list(pins):
    """After an undo a device may name a list the index no longer holds (it was collected
    before the undo): that slot is still in use."""
    path = pins["one"]
    dp = dataplane.Dataplane("named")
    dp._maps = path.maps
    device_list = dp._allow_ids()[1]
    index = dp._list_index()
    lost = next(content for content, list_id in index.items() if list_id == device_list)
    del index[lost]
    dp._last_list = device_list - 1           # the cursor would offer that slot next
    made = dp._list_id(((32, "198.19.77.3", ((17, 53),)),), create=True)
    assert made != device_list
    index[lost] = device_list
    dp._kept_lists = lambda: 0
    dp._collect_lists()
    assert path.maps["kalki_allow_lists"].lookup(ctypes.c_uint32(device_list)) is not None


class _SlotsNotToRead:
    """kalki_allow_lists, to a reader that must not read it: on Linux 6.1 each read of an
    array of maps waits for an RCU grace period (8,192 slots took 140 s at the image's boot)."""

    max_entries = 2 * paths.DISTINCT_DEVICES

    def __getattr__(self, name):
        raise AssertionError(f"kalki_allow_lists.{name}: the slots were read")


def test_the_index_reads_the_slots_trie_ids_and_never_the_slots(pins):
    path = pins["distinct"]
    ids = {k.value: v.value for k, v in path.maps["kalki_allow_list_ids"].items()}
    # in step with the slots themselves (read here once, as the test's own check)
    assert ids == {k.value: v.value for k, v in path.maps["kalki_allow_lists"].items()}
    reader = dataplane.Dataplane("ids")
    reader._maps = {**path.maps, "kalki_allow_lists": _SlotsNotToRead()}
    index = reader._list_index()
    assert sorted(index.values()) == sorted(ids) and len(ids) == paths.DISTINCT_DEVICES


def test_a_trie_id_left_by_a_crash_is_dropped_from_the_index(pins):
    """The slot was emptied (its trie freed) and the process stopped before it forgot the
    trie's id: the id names no map any more, so the slot is free."""
    path = pins["one"]
    ids = path.maps["kalki_allow_list_ids"]
    gone = paths.bpf.map_create(paths.bpf.BPF_MAP_TYPE_LPM_TRIE, maps.AllowKey, maps.AllowValue, 4,
                                paths.bpf.BPF_F_NO_PREALLOC, "kalki_gone")
    gone_id = paths.bpf.map_info(gone).id
    os.close(gone)
    slot = ctypes.c_uint32(path.maps["kalki_allow_lists"].max_entries - 1)
    ids.update(slot, ctypes.c_uint32(gone_id))
    reader = dataplane.Dataplane("crashed")
    reader._maps = path.maps
    for _ in range(100):            # the kernel frees a map after an RCU grace period
        try:
            os.close(paths.bpf.map_fd_by_id(gone_id))
        except OSError:
            break
        time.sleep(0.01)
    assert slot.value not in reader._list_index().values()
    assert ids.lookup(slot) is None


def test_unused_lists_are_kept_for_devices_coming_back_up_to_the_kept_slots(pins):
    """A device leaving quarantine finds its list still there: no slot of the array of maps
    written (each write waits for an RCU grace period). Past the slots kept, the oldest go."""
    path = pins["one"]
    dp = dataplane.Dataplane("kept")
    dp._maps = path.maps
    dp.max_devices = path.maps["kalki_devices"].max_entries
    assert path.maps["kalki_allow_lists"].max_entries == 2 * dp.max_devices + maps.KEPT_LISTS
    assert dp._kept_lists() == maps.KEPT_LISTS
    writes = []
    real_update = path.maps["kalki_allow_lists"].update
    path.maps["kalki_allow_lists"].update = lambda *a, **k: writes.append(a) or real_update(*a, **k)
    try:
        contents = [((32, f"198.19.78.{i}", ((17, 53),)),) for i in range(3)]
        made = [dp._list_id(c, create=True) for c in contents]
        dp._collect_lists()                      # no device names them: kept
        assert [dp._list_id(c, create=True) for c in contents] == made and len(writes) == 3
        dp._kept_lists = lambda: 1
        dp._collect_lists()                      # the two oldest go, the newest stays
        ids = path.maps["kalki_allow_list_ids"]
        assert [ids.lookup(ctypes.c_uint32(i)) is None for i in made] == [True, True, False]
        dp._kept_lists = lambda: 0
        dp._collect_lists()
    finally:
        del path.maps["kalki_allow_lists"].update


def _seen(path, device: int = 1) -> list[tuple[int, int, int, int]]:
    """kalki_allow_seen of the device, one (dst, port, list, trie) per CPU."""
    return [(s.dst, s.port, s.list, s.trie)
            for s in path.maps["kalki_allow_seen"].lookup(ctypes.c_uint32(device))]


def test_a_remembered_verdict_is_forgotten_when_its_lists_slot_gets_a_new_trie(pins):
    """The udp packet's flow, allowed by device 1's trie, is remembered with the list's slot and
    the trie's map id. The device moves to another list; its old slot is emptied and given to
    a list without that destination; the device moves there: the same packet is refused, not
    passed on the memory of the slot's old trie. One CPU throughout, since the memory is per
    CPU and a test run runs on the caller's."""
    path = pins["one"]
    dp = path._helper
    fd = path.prog_fds["xdp_from_devices"]
    udp = CASES["udp"].packets[0]
    _, dst, port = paths.flow(udp)

    def device_1(destinations):
        path.add_device(1, dataplane.DeviceSpec("dev1", paths.DEV_MAC, paths.DEV_IP,
                                                paths.stack(HOUR_MS, destinations)))

    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        assert paths.bpf.prog_test_run(fd, udp, 1)[0] == paths.XDP_PASS
        old = path.maps["kalki_devices"].lookup(ctypes.c_uint32(1)).allow_id
        trie = path.maps["kalki_list_gen"].lookup(ctypes.c_uint32(old)).value
        assert trie == path.maps["kalki_allow_list_ids"].lookup(ctypes.c_uint32(old)).value
        assert _seen(path)[min(cpus)] == (dst, port, old, trie)
        device_1(["198.19.99.0/24"])
        dp._kept_lists = lambda: 0
        dp._collect_lists()
        assert path.maps["kalki_allow_lists"].lookup(ctypes.c_uint32(old)) is None
        dp._last_list = old - 1                 # the cursor gives that slot next
        device_1(["198.19.98.0/24"])
        assert path.maps["kalki_devices"].lookup(ctypes.c_uint32(1)).allow_id == old
        assert path.maps["kalki_list_gen"].lookup(ctypes.c_uint32(old)).value != trie
        before = paths.counts(path)
        assert paths.bpf.prog_test_run(fd, udp, 1)[0] == paths.XDP_DROP
        assert paths.grown(before, paths.counts(path)) == {"allowlist": 1}
    finally:
        os.sched_setaffinity(0, cpus)
        dp.__dict__.pop("_kept_lists", None)
        device_1(None)
