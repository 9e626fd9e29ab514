"""Per-device traffic charts (appliance.supervisor.traffic) and the telemetry table, lab-free:
the rings' arithmetic on readings of the kernel's counters, their file on the data partition,
the supervisor's wiring (rename, remove, restart), the ops API's refusals, and the page: its
JSON, its chart containers and the vendored uPlot it loads under its CSP."""
import asyncio
import collections
import datetime
import hashlib
import json
import logging
import math
import re
import time
import zlib
from array import array
from pathlib import Path

import pytest
from fakes import FakeDataplane, supervisor
from test_web import aiotest, client, login, set_admin

from appliance import config
from appliance.errors import ConfigError, UnknownDeviceError
from appliance.supervisor import core, traffic
from appliance.supervisor.core import Supervisor
from appliance.supervisor.ops import Ops, error_status
from appliance.supervisor.traffic import DAY, HOUR, MAX_GAP, Traffic

VENDOR = Path(__file__).resolve().parents[1] / "appliance/faces/web/static/vendor"
T0 = 1_700_000_100.0            # a window's start (divisible by 300: a day slot's start too)
CAM = ("02:4b:00:00:00:01", "198.18.0.10", "camera")
PLUG = ("02:4b:00:00:00:02", "198.18.0.11", "plug")


def counters(passed=0, passed_bytes=None, **drops):
    """Dataplane.counters() as the kernel gives it: reasons that counted anything."""
    out = {}
    if passed:
        out["pass"] = {"umbox": None, "packets": passed,
                       "bytes": 100 * passed if passed_bytes is None else passed_bytes}
    for reason, packets in drops.items():
        out[reason] = {"umbox": reason, "packets": packets, "bytes": 60 * packets}
    return out


def hour_at(t: Traffic, name: str, at: float) -> dict:
    """The hour ring's values of the slot that holds `at`, read as the page would read them."""
    s = t.series(name, HOUR, at)
    return {k: s[k][-1] for k in ("passed_packets", "dropped_packets", "passed_bytes", "dropped_bytes")} | {
        "reasons": {r: v[-1] for r, v in s["reasons"].items()}}


# -- the rings' arithmetic ------------------------------------------------------------------------

def test_a_reading_is_kept_as_what_the_counters_grew_by(tmp_path):
    t = Traffic(tmp_path / "traffic.bin")
    assert not t.record("cam", counters(100, port_scan=5), T0, 0.0)       # the baseline
    assert t.record("cam", counters(130, port_scan=9, allowlist=1), T0 + 10, 10.0)
    assert hour_at(t, "cam", T0 + 10) == {"passed_packets": 30, "dropped_packets": 5,
                                          "passed_bytes": 3000, "dropped_bytes": 300,
                                          "reasons": {"allowlist": 1, "port_scan": 4}}
    assert hour_at(t, "cam", T0)["passed_packets"] is None     # the baseline's slot: no data
    t.record("cam", counters(130, port_scan=9, allowlist=1), T0 + 20, 20.0)
    assert hour_at(t, "cam", T0 + 20) == {"passed_packets": 0, "dropped_packets": 0, "passed_bytes": 0,
                                          "dropped_bytes": 0, "reasons": {"allowlist": 0, "port_scan": 0}}


def test_every_reading_adds_to_its_five_minute_slot_of_the_day(tmp_path):
    t = Traffic(tmp_path / "traffic.bin")
    total = 0
    t.record("cam", counters(0), T0, 0.0)
    for k in range(1, 61):                          # ten minutes: two day slots
        total += k
        t.record("cam", counters(total, syn_flood=total), T0 + 10 * k, 10.0 * k)
    hour = t.series("cam", HOUR, T0 + 600)
    day = t.series("cam", DAY, T0 + 600)
    by_five_minutes = [sum(v for v in hour["passed_packets"][i:i + 30] if v is not None)
                       for i in range(299, 359, 30)]       # index 359 is T0+600
    # the first day slot holds readings 1..29 (T0+10 .. T0+290), the second 30..59, the third
    # (still filling: one reading so far) 60
    assert [v for v in day["passed_packets"] if v is not None] == [sum(range(1, 30)), sum(range(30, 60)), 60]
    assert by_five_minutes == [sum(range(1, 30)), sum(range(30, 60))]
    assert day["totals"]["reasons"] == {"syn_flood": sum(range(1, 61))}
    assert len(hour["at"]) == 360 and len(day["at"]) == 288
    assert hour["at"][-1] == T0 + 600 and day["at"][-1] == T0 + 600 and day["step"] == 300
    assert day["last_seconds"] == 10 and t.series("cam", DAY, T0 + 655)["last_seconds"] == 60
    assert t.series("cam", DAY, T0 + 899)["last_seconds"] == 300 and hour["last_seconds"] == 10


def test_counters_that_start_again_give_neither_negative_counts_nor_a_spike(tmp_path, caplog):
    t = Traffic(tmp_path / "traffic.bin")
    t.record("cam", counters(5_000_000, port_scan=40_000), T0, 0.0)
    # the slot emptied and re-used, or the data path reloaded: a count from zero again
    assert t.record("cam", counters(12, allowlist=3), T0 + 10, 10.0)
    got = hour_at(t, "cam", T0 + 10)
    assert got["passed_packets"] == 12 and got["dropped_packets"] == 3
    assert got["reasons"] == {"allowlist": 3}
    # counters far above what any link carries in 10 s: another counter, taken as a new start
    with caplog.at_level(logging.WARNING, "kalki.traffic"):
        assert not t.record("cam", counters(12 + 10 ** 12), T0 + 20, 20.0)
    assert "cam" in caplog.text and "new start" in caplog.text
    assert t.record("cam", counters(12 + 10 ** 12 + 7), T0 + 30, 30.0)
    assert hour_at(t, "cam", T0 + 30)["passed_packets"] == 7
    # after a gap (the device out of the data path, the supervisor stopped), what the counters
    # grew by is not one slot's: a new baseline
    assert not t.record("cam", counters(12 + 10 ** 12 + 1007), T0 + 40 + MAX_GAP, 31.0 + MAX_GAP)
    assert hour_at(t, "cam", T0 + 40 + MAX_GAP)["passed_packets"] is None
    assert t.record("cam", counters(12 + 10 ** 12 + 1010), T0 + 50 + MAX_GAP, 41.0 + MAX_GAP)
    series = t.series("cam", HOUR, T0 + 50)
    assert all(v is None or 0 <= v <= 12 for v in series["passed_packets"])
    assert all(v is None or v >= 0 for v in series["dropped_packets"])


def test_old_slots_are_evicted_and_unwritten_ones_are_gaps(tmp_path):
    t = Traffic(tmp_path / "traffic.bin")
    t.record("cam", counters(0), T0, 0.0)
    t.record("cam", counters(10, brute_force=2), T0 + 10, 10.0)
    t.record("cam", counters(20, brute_force=2), T0 + 50, 20.0)       # 30 s nobody read
    s = t.series("cam", HOUR, T0 + 50)
    assert s["passed_packets"][-5:] == [10, None, None, None, 10]
    # an hour and more later the ring has moved on past every slot it held
    t.record("cam", counters(25, brute_force=2), T0 + 50 + 3600, 30.0)
    s = t.series("cam", HOUR, T0 + 60 + 3600)
    assert [v for v in s["passed_packets"] if v is not None] == [5]
    assert s["reasons"] == {} and s["totals"]["dropped_packets"] == 0   # the reason's slots went too
    ring = t.devices["cam"].hour
    assert ring.reasons == {} and sum(1 for v in ring.packets if v != traffic.NO_DATA["I"]) == 2
    # the day ring still holds the first readings, an hour back
    day = t.series("cam", DAY, T0 + 3900)
    assert day["totals"]["passed_packets"] == 25 and day["totals"]["reasons"] == {"brute_force": 2}


def test_a_ring_goes_round_without_adding_to_what_was_there(tmp_path):
    t = Traffic(tmp_path / "traffic.bin")
    for k in range(400):                  # more than the hour's 360 slots, one packet each
        t.record("cam", counters(k, port_scan=k), T0 + 10 * k, 10.0 * k)
    s = t.series("cam", HOUR, T0 + 3990)
    assert s["passed_packets"] == [1] * 360 and s["reasons"]["port_scan"] == [1] * 360
    # 30 s to the next reading, after the ring went round: the slots between are gaps, not
    # what they held an hour ago
    assert t.record("cam", counters(405, port_scan=405), T0 + 4020, 4020.0)
    s = t.series("cam", HOUR, T0 + 4020)
    assert s["passed_packets"][-4:] == [1, None, None, 6]
    # the slots from T0+430: 357 readings of one, and the six
    assert s["totals"]["passed_packets"] == 357 + 6 and s["totals"]["reasons"]["port_scan"] == 363


def test_the_clock_going_back(tmp_path):
    t = Traffic(tmp_path / "traffic.bin")
    t.record("cam", counters(0), T0 + 100, 0.0)
    t.record("cam", counters(10), T0 + 100, 10.0)
    t.record("cam", counters(15), T0 + 60, 20.0)        # a little back: still in the ring, kept
    s = t.series("cam", HOUR, T0 + 100)
    assert s["passed_packets"][-1] == 10 and s["passed_packets"][-5] == 5
    t.record("cam", counters(20), T0 - 2 * 86400, 30.0)    # days back: the history was a wrong clock's
    assert t.series("cam", HOUR, T0 + 110)["totals"]["passed_packets"] == 0
    assert t.series("cam", HOUR, T0 - 2 * 86400)["passed_packets"][-1] == 5


def test_a_count_saturates_below_no_data(tmp_path):
    t = Traffic(tmp_path / "traffic.bin")
    t.record("cam", counters(0), T0, 0.0)
    t.record("cam", counters(10, passed_bytes=2 ** 33), T0 + 10, 10.0)      # > 32 bits in 10 s
    assert hour_at(t, "cam", T0 + 10)["passed_bytes"] == 2 ** 32 - 2
    assert t.series("cam", DAY, T0 + 10)["passed_bytes"][-1] == 2 ** 33      # the day's are 64-bit


class Held:
    """What tick() needs of the data path: the devices it holds and their counters."""

    def __init__(self, names):
        self.devices = dict.fromkeys(names)
        self.reads: list[tuple[str, float]] = []
        self.now = 0.0

    def counters(self, name):
        self.reads.append((name, self.now))
        return counters(int(self.now))


def test_the_readings_of_a_window_are_spread_over_it(tmp_path):
    t = Traffic(tmp_path / "traffic.bin")
    dp = Held([f"d{i}" for i in range(100)])
    per_tick = []
    for k in range(3 * 40):                         # 30 s of the supervisor's 0.25-s ticks
        dp.now = T0 + 0.25 * k
        per_tick.append(t.tick(dp, dp.now, dp.now))
    windows = [[n for n, at in dp.reads if T0 + 10 * w <= at < T0 + 10 * (w + 1)] for w in range(3)]
    assert all(sorted(w) == sorted(dp.devices) for w in windows)     # each device once a window
    assert max(per_tick) <= math.ceil(100 / (40 * traffic.SPREAD)) + 1
    assert all(at - math.floor(at / 10) * 10 <= 10 * traffic.SPREAD for _, at in dp.reads)
    # a late tick: the rest of the window is read at the next one, for the window it belongs to
    t2, dp2 = Traffic(tmp_path / "t2.bin"), Held(["a", "b", "c", "d"])
    for at in (T0, T0 + 10):
        dp2.now = at
        t2.tick(dp2, at, at)
    dp2.now = T0 + 12.0
    t2.tick(dp2, dp2.now, dp2.now)
    dp2.now = T0 + 25.0                              # the loop was held: no tick until here
    # the 3 left of the window before, and the 3 of this one due by its 5th second
    assert t2.tick(dp2, dp2.now, dp2.now) == 3 + 3
    series = t2.series("d", HOUR, T0 + 30)
    assert series["passed_packets"][-3] is not None  # the window T0+10: read late, counted there


def test_a_device_that_went_while_its_window_was_read_is_skipped(tmp_path):
    t, dp = Traffic(tmp_path / "traffic.bin"), Held(["a", "b"])
    dp.now = T0
    t.tick(dp, T0, T0)
    del dp.devices["b"]
    dp.now = T0 + 9.5
    t.tick(dp, dp.now, dp.now)
    assert {n for n, _ in dp.reads} == {"a"}


# -- kept on the data partition -------------------------------------------------------------------

def filled(path: Path, devices=3) -> Traffic:
    t = Traffic(path)
    for i in range(devices):
        t.record(f"d{i}", counters(0), T0, 0.0)
        for k in range(1, 20):
            t.record(f"d{i}", counters(k * (i + 1), port_scan=k, quarantine=2 * k), T0 + 10 * k, 10.0 * k)
    return t


def test_the_rings_survive_a_save_and_a_load(tmp_path):
    path = tmp_path / "traffic.bin"
    t = filled(path)
    assert t.save() and path.exists() and not list(tmp_path.glob(".*tmp"))
    again = Traffic(path)
    again.load()
    assert set(again.devices) == {"d0", "d1", "d2"}
    for name in again.devices:
        for span, at in ((HOUR, T0 + 200), (DAY, T0 + 300)):
            assert again.series(name, span, at) == t.series(name, span, at)
    assert again.devices["d1"].last is None      # counters are not saved: a baseline after a start


@aiotest
async def test_saving_behind_writes_the_same_file(tmp_path):
    t = filled(tmp_path / "traffic.bin")
    assert await t.save_behind()
    again = Traffic(t.path)
    again.load()
    assert again.series("d2", HOUR, T0 + 200) == t.series("d2", HOUR, T0 + 200)


def _damaged(good: bytes) -> dict[str, bytes]:
    """What a file of the rings may have become, each with a wrong part."""
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    other = {"hour": [60, 60, "I"], "day": [288, 300, "Q"]}
    return {"torn": good[:len(good) // 2], "flipped": bytes(flipped), "empty": b"",
            "foreign": b'{"devices": {"cam": [1, 2, 3]}}\n', "magic only": traffic.MAGIC,
            "another layout": _with_header(good, lambda h: {**h, "layout": other}),
            "another byte order": _with_header(good, lambda h: {**h, "byteorder": "middle"}),
            "lying header": _with_header(good, lambda h: {**h, "devices": h["devices"] * 2}),
            "fewer rings": _with_header(good, lambda h: {**h, "devices": h["devices"][:1]}),
            "bad name": _with_header(good, lambda h: {
                **h, "devices": [["../x", *e[1:]] for e in h["devices"]]}),
            "bad reason": _with_header(good, lambda h: {
                **h, "devices": [[*e[:3], [99], e[4]] for e in h["devices"]]}),
            "header a list": _with_header(good, lambda h: [h]),
            "another body under the digest": good[:len(traffic.MAGIC) + 32] + _with_header(
                good, lambda h: {**h, "devices": h["devices"][::-1]})[len(traffic.MAGIC) + 32:]}


def _with_header(good: bytes, change) -> bytes:
    """A well-made file (right magic and checksum) whose header says something else."""
    data = zlib.decompress(good[len(traffic.MAGIC) + 32:])
    size = int.from_bytes(data[:4], "big")
    header = json.dumps(change(json.loads(data[4:4 + size]))).encode()
    body = zlib.compress(len(header).to_bytes(4, "big") + header + data[4 + size:])
    return traffic.MAGIC + hashlib.sha256(body).digest() + body


def test_a_damaged_or_foreign_file_is_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "traffic.bin"
    filled(path).save()
    for what, content in _damaged(path.read_bytes()).items():
        bad = tmp_path / f"bad-{len(content)}-{abs(hash(what))}.bin"
        bad.write_bytes(content)
        caplog.clear()
        t = Traffic(bad)
        with caplog.at_level(logging.WARNING, "kalki.traffic"):
            t.load()
        assert t.devices == {}, what
        assert str(bad) in caplog.text, what          # the warning names the file
    # a file too big to be one is not read whole
    big = tmp_path / "big.bin"
    big.write_bytes(traffic.MAGIC + b"\0" * (traffic.MAX_FILE_BYTES + 10))
    t = Traffic(big)
    t.load()
    assert t.devices == {}
    # no file: nothing to say
    caplog.clear()
    Traffic(tmp_path / "none.bin").load()
    assert "none.bin" not in caplog.text


def test_a_write_that_fails_says_so_and_keeps_the_old_file(tmp_path, caplog):
    path = tmp_path / "traffic.bin"
    t = filled(path)
    assert t.save()
    before = path.read_bytes()
    (tmp_path / ".traffic.bin.tmp").mkdir()              # the temporary file cannot be made
    with caplog.at_level(logging.WARNING, "kalki.traffic"):
        assert not t.save()
    assert "traffic.bin" in caplog.text and path.read_bytes() == before


def test_a_late_save_behind_never_writes_an_older_snapshot_over_a_newer_one(tmp_path):
    t = filled(tmp_path / "traffic.bin")
    older = t._payload()                       # taken on the loop, its writing still behind
    t.forget("d0")
    assert t.save()                           # a clean stop meanwhile
    assert t._write(older)
    again = Traffic(t.path)
    again.load()
    assert set(again.devices) == {"d1", "d2"}


def test_the_file_is_bounded_and_small(tmp_path):
    t = filled(tmp_path / "traffic.bin", devices=200)
    t.save()
    assert t.path.stat().st_size < 200 * 2048          # slots without data compress to little
    assert t.path.stat().st_size < traffic.MAX_FILE_BYTES


# -- the supervisor's wiring ----------------------------------------------------------------------

def run(sup, seconds: int, grow=None):
    """Ticks the sampler as the supervisor's ticker does, over the last `seconds` up to now;
    `grow(window)` makes the fake kernel's counters grow before each 10-s window."""
    start = (sup.now().timestamp() // 10) * 10 - seconds
    mono0 = time.monotonic() - seconds
    for w in range(seconds // 10):
        if grow:
            grow(w)
        for k in range(40):
            at = start + 10 * w + 0.25 * k
            sup.traffic.tick(sup.dp, at, mono0 + 10 * w + 0.25 * k)


def test_the_supervisor_samples_its_data_path_and_a_restart_keeps_the_history(tmp_path):
    sup = supervisor(tmp_path, cam=CAM, plug=PLUG)
    dp = sup.dp

    def grow(w):
        dp.count("cam", "pass", 50)
        dp.count("cam", "allowlist", 3)
        dp.count("plug", "pass", 1)
    run(sup, 300, grow)
    ops = Ops(sup)
    cam = ops.traffic("cam")
    assert cam["totals"]["passed_packets"] >= 50 * 28 and cam["totals"]["dropped_packets"] >= 3 * 28
    assert cam["drops"][0]["reason"] == "allowlist" and "allow-list" in cam["drops"][0]["words"]
    assert ops.traffic("plug", "day")["totals"]["passed_packets"] >= 28
    before = ops.traffic("cam", "day")["totals"]
    sup.close()                                          # a clean stop saves
    assert (tmp_path / "state" / "traffic.bin").exists()
    again = Supervisor(sup.cfg)
    again.attach(FakeDataplane(), loop=None)
    assert Ops(again).traffic("cam", "day")["totals"] == before
    again.store.close()


def test_a_renamed_device_keeps_its_history_and_a_removed_one_loses_it(tmp_path):
    sup = supervisor(tmp_path, cam=CAM, plug=PLUG)
    run(sup, 100, lambda w: sup.dp.count("cam", "pass", 10))
    ops = Ops(sup)
    before = ops.traffic("cam")["totals"]["passed_packets"]
    assert before >= 80
    ops.device_rename("cam", "porch-camera")
    assert ops.traffic("porch-camera")["totals"]["passed_packets"] == before
    with pytest.raises(UnknownDeviceError, match="cam"):
        ops.traffic("cam")
    run(sup, 30, lambda w: sup.dp.count("porch-camera", "pass", 10))     # the same counters go on
    assert "cam" not in sup.traffic.devices
    ops.device_remove("porch-camera")
    assert "porch-camera" not in sup.traffic.devices
    sup.add_device("porch-camera", *CAM, approve=True)                   # a new one of that name
    assert ops.traffic("porch-camera")["totals"]["passed_packets"] == 0
    sup.store.close()


def test_rings_of_devices_removed_while_stopped_are_dropped_at_start(tmp_path):
    sup = supervisor(tmp_path, cam=CAM, plug=PLUG)
    run(sup, 30, lambda w: sup.dp.count("plug", "pass", 1))
    sup.close()
    again = Supervisor(sup.cfg)
    assert set(again.traffic.devices) <= {"cam", "plug"}
    again.store.remove_device("plug")
    again.store.close()
    third = Supervisor(sup.cfg)
    assert "plug" not in third.traffic.devices
    third.store.close()


def test_a_damaged_file_does_not_stop_the_supervisor(tmp_path, caplog):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "traffic.bin").write_bytes(b"\x00garbage" * 100)
    with caplog.at_level(logging.WARNING):
        sup = supervisor(tmp_path, cam=CAM)
    assert "traffic.bin" in caplog.text and sup.enforced("cam")
    assert Ops(sup).traffic("cam")["totals"]["passed_packets"] == 0
    sup.store.close()


@aiotest
async def test_the_ticker_reads_the_counters(tmp_path):
    sup = supervisor(tmp_path, cam=CAM)
    sup.dp.count("cam", "pass", 1)
    ticker = asyncio.ensure_future(sup._ticker())
    try:
        for _ in range(8):          # each tick a window later on the policy clock
            await asyncio.sleep(0.3)
            sup.dp.count("cam", "pass", 5)
            sup.clock.set((sup.now() + datetime.timedelta(seconds=10)).isoformat())
    finally:
        sup._stop.set()
        await asyncio.wait_for(ticker, 2)
    assert sup.traffic.readings >= 3
    assert sup.traffic.devices["cam"].hour.newest is not None
    sup.store.close()


@aiotest
async def test_a_failing_traffic_tick_stops_neither_flushing_nor_retention(tmp_path, monkeypatch, caplog):
    """Each of the ticker's steps on its own: the charts' reading failing every tick (and the
    expiry of critical alerts too) must not stop the store's flushing and pruning."""
    sup = supervisor(tmp_path, cam=CAM)
    assert isinstance(sup.dp, FakeDataplane)
    ran = collections.Counter()

    def broken(*_):
        raise RuntimeError("the counters map is gone")
    monkeypatch.setattr(sup.traffic, "tick", broken)
    monkeypatch.setattr(sup, "_expire_critical_alerts", broken)
    flush = sup.store.flush_behind

    async def flushed():
        ran["flush"] += 1
        await flush()
    monkeypatch.setattr(sup.store, "flush_behind", flushed)
    monkeypatch.setattr(sup.store, "prune", lambda *_: ran.update(["prune"]) or {})
    monkeypatch.setattr(core, "PRUNE_SECONDS", 0)
    ticker = asyncio.ensure_future(sup._ticker())
    try:
        await asyncio.sleep(1.4)
    finally:
        sup._stop.set()
        await asyncio.wait_for(ticker, 2)
    assert ran["flush"] >= 1 and ran["prune"] >= 3
    assert sup.counters["ticker_errors_traffic"] >= 3
    assert sup.counters["ticker_errors_critical_alerts"] >= 3
    said = [r for r in caplog.records if "the counters map is gone" in r.getMessage()]
    assert len(said) == 2                        # once for each step, not every tick
    sup.store.close()


def test_charts_off(tmp_path):
    cfg = config.Config()
    cfg.state.directory = str(tmp_path / "state")
    cfg.state.traffic_charts = False
    cfg.mqtt.password_file = str(tmp_path / "mqtt")
    sup = Supervisor(cfg)
    sup.attach(FakeDataplane(), loop=None)
    sup.add_device("cam", *CAM, approve=True)
    assert sup.traffic is None
    with pytest.raises(ConfigError, match="traffic_charts"):
        Ops(sup).traffic("cam")
    sup.close()
    assert not (tmp_path / "state" / "traffic.bin").exists()


def test_the_settings_are_documented_and_bounded():
    text = config.defaults_toml()
    assert "traffic_charts = true" in text and "traffic_save_minutes = 5" in text
    with pytest.raises(ConfigError, match="traffic_save_minutes"):
        config._build(config.Config, {"state": {"traffic_save_minutes": 0}}, "")


# -- the ops API ----------------------------------------------------------------------------------

def test_the_ops_api_names_the_culprit(tmp_path):
    sup = supervisor(tmp_path, cam=CAM)
    ops = Ops(sup)
    with pytest.raises(UnknownDeviceError, match="'nope'") as e:
        ops.traffic("nope")
    assert error_status(e.value) == 404
    with pytest.raises(ConfigError, match=r"device cam: unknown span 'week' \(known: hour, day\)") as e:
        ops.traffic("cam", "week")
    assert error_status(e.value) == 400
    with pytest.raises(ConfigError, match="expected a device's name"):
        ops.traffic(["cam"])
    with pytest.raises(ConfigError, match="unknown span 'year'"):
        ops.traffic_overview("year")
    with pytest.raises(ConfigError, match="points must be 1 to 360, got 0"):
        ops.traffic_overview("hour", 0)
    with pytest.raises(UnknownDeviceError, match="'nope'"):
        ops.telemetry_view("nope")
    hour = ops.traffic("cam")
    assert hour["device"] == "cam" and hour["span"] == "hour" and hour["step"] == 10
    assert len(hour["at"]) == len(hour["passed_packets"]) == 360 and hour["timezone"] == "UTC"
    overview = ops.traffic_overview("day", 48)
    assert overview["step"] == 1800 and len(overview["at"]) == 48
    assert set(overview["devices"]) == {"cam"} and len(overview["devices"]["cam"]["dropped_packets"]) == 48
    sup.store.close()


def test_the_telemetry_view_has_one_row_per_key(tmp_path):
    sup = supervisor(tmp_path, plug=PLUG)
    for watts in [12] * 19 + [30]:
        sup.on_telemetry("plug", {"on": True, "power_w": watts, "fw": {"v": 2}})
    view = Ops(sup).telemetry_view("plug")
    rows = {r["key"]: r for r in view["latest"]}
    assert list(rows) == ["fw", "on", "power_w"]
    assert rows["power_w"]["value"] == 30 and rows["power_w"]["meaning"] == "power drawn now, watts"
    assert rows["on"]["source"] == "MQTT kalki/plug" and rows["on"]["when"]["ago"]
    assert list(view["series"]) == ["power_w"]            # numbers only: no booleans, no tables
    assert view["series"]["power_w"]["values"] == [12] * 19 + [30]
    at = view["series"]["power_w"]["at"]
    assert all(a < b for a, b in zip(at, at[1:])) and len(at) == 20   # rising, as a chart's must
    sup.store.close()


# -- the page -------------------------------------------------------------------------------------

@pytest.fixture
def sup(tmp_path):
    cfg = config.Config()
    cfg.state.directory = str(tmp_path / "state")
    cfg.mqtt.password_file = str(tmp_path / "mqtt-supervisor")
    cfg.web.tls = False
    s = Supervisor(cfg)
    s.attach(FakeDataplane(), loop=None)
    s.add_device("camera1", *CAM, approve=True)
    s.add_device("plug1", *PLUG, approve=True)
    yield s
    s.store.close()


@aiotest
async def test_the_traffic_json_endpoints(sup):
    set_admin(sup)
    run(sup, 60, lambda w: (sup.dp.count("camera1", "pass", 20), sup.dp.count("camera1", "port_scan", 4)))
    async with client(sup) as c:
        assert (await c.get("/api/devices/camera1/traffic")).status == 401
        assert (await c.get("/api/traffic")).status == 401
        await login(c)
        r = await c.get("/api/devices/camera1/traffic?span=day")
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
        t = await r.json()
        assert t["span"] == "day" and len(t["at"]) == 288 and t["totals"]["passed_packets"] >= 80
        assert t["drops"] == [{"reason": "port_scan", "packets": t["totals"]["dropped_packets"],
                               "words": "a port scan"}]
        hour = await (await c.get("/api/devices/camera1/traffic")).json()
        assert hour["span"] == "hour" and [v for v in hour["reasons"]["port_scan"] if v is not None][-1] == 4
        r = await c.get("/api/devices/camera1/traffic?span=week")
        assert r.status == 400 and "week" in (await r.json())["error"]
        r = await c.get("/api/devices/nope/traffic")
        assert r.status == 404 and "nope" in (await r.json())["error"]
        all_ = await (await c.get("/api/traffic?span=hour&points=60")).json()
        assert set(all_["devices"]) == {"camera1", "plug1"} and len(all_["at"]) == 60
        rates = [v for v in all_["devices"]["camera1"]["passed_packets"] if v is not None]
        assert rates and all(v == 2.0 for v in rates)          # 20 packets in each 10 s
        r = await c.get("/api/traffic?points=many")
        assert r.status == 400 and "points" in (await r.json())["error"]
        sup.on_telemetry("plug1", {"power_w": 7})
        tele = await (await c.get("/api/devices/plug1/telemetry")).json()
        assert tele["latest"][0]["key"] == "power_w" and tele["series"]["power_w"]["values"] == [7]
        spec = await (await c.get("/api/openapi.json")).json()
        assert {"/api/devices/{name}/traffic", "/api/traffic",
                "/api/devices/{name}/telemetry"} <= set(spec["paths"])


@aiotest
async def test_the_pages_have_the_charts_and_load_the_vendored_uplot(sup):
    set_admin(sup)
    for _ in range(20):                 # twenty reports, the same: one row per key, not twenty
        sup.on_telemetry("plug1", {"on": True, "power_w": 12})
    async with client(sup) as c:
        await login(c)
        home = await (await c.get("/")).text()
        cam = await (await c.get("/devices/camera1")).text()
        plug = await (await c.get("/devices/plug1")).text()
        for page in (home, cam):
            assert '<script src="/static/vendor/uPlot.iife.min.js" defer></script>' in page
            assert '<link rel="stylesheet" href="/static/vendor/uPlot.min.css">' in page
            # uPlot before the script that draws with it (deferred scripts run in order)
            assert page.index("uPlot.iife.min.js") < page.index("/static/app.js")
            assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page)     # no inline script
            assert "<style" not in page and " style=" not in page                # no inline style
        assert 'data-spark="camera1"' in home and 'data-spark="plug1"' in home
        assert "<th>Last hour</th>" in home
        assert 'data-traffic="camera1"' in cam
        assert 'data-chart="packets"' in cam and 'data-chart="bytes"' in cam
        assert 'data-span="hour"' in cam and 'data-span="day"' in cam and 'id="drop-reasons"' in cam
        assert 'id="telemetry-charts"' in plug and 'data-telemetry="plug1"' in plug
        telemetry = plug[plug.index('id="telemetry"'):]
        telemetry = telemetry[:telemetry.index("</section>")]
        assert telemetry.count("<tr>") == 1 + 2                      # the head, "on", "power_w"
        assert "power drawn now, watts" in telemetry and "MQTT kalki/plug1" in telemetry
        # pages without charts do not load it
        assert "uPlot" not in await (await c.get("/rules")).text()


@aiotest
async def test_the_vendored_files_are_served_like_the_pages_own(sup):
    set_admin(sup)
    async with client(sup) as c:
        js = await c.get("/static/vendor/uPlot.iife.min.js")
        css = await c.get("/static/vendor/uPlot.min.css")
        own = await c.get("/static/app.js")
        assert js.status == css.status == 200                      # public, as the page's own
        assert js.headers["Content-Type"] == own.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert css.headers["Content-Type"] == "text/css; charset=utf-8"
        for r in (js, css):
            assert r.headers["Cache-Control"] == own.headers["Cache-Control"] == "no-cache"
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert (await js.read()).startswith(b"/*! https://github.com/leeoniya/uPlot (v1.6.32) */")
        for path in ("/static/vendor/VENDORED.md", "/static/vendor/uPlot.LICENSE",
                     "/static/vendor/..%2fapp.js", "/static/vendor/.hidden.js",
                     "/static/vendor/nothing.js", "/static/vendor/"):
            assert (await c.get(path)).status == 404, path


def test_the_vendored_files_are_the_recorded_release_unmodified():
    record = (VENDOR / "VENDORED.md").read_text()
    assert "1.6.32" in record and "e995b061e9fc5476a6d862cd2fb2ebc7452ca012" in record
    assert "https://github.com/leeoniya/uPlot" in record and "MIT" in record
    sums = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", record, re.M))
    assert set(sums) == {"uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"}
    for name, digest in sums.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (VENDOR / "uPlot.LICENSE").read_text()


def test_uplot_needs_nothing_the_csp_forbids():
    """style-src 'self' forbids <style> elements and style attributes, not the CSSOM
    (element.style.x = ...), which is how uPlot styles; script-src 'self' forbids eval."""
    js = (VENDOR / "uPlot.iife.min.js").read_text()
    for forbidden in ('createElement("style")', "innerHTML", "insertAdjacentHTML", 'setAttribute("style"',
                      "cssText", "eval(", "new Function", "document.write"):
        assert forbidden not in js, forbidden
    assert ".style." in js or ".style[" in js         # what it does instead


def test_a_ring_costs_what_the_module_says(tmp_path):
    """~13 KB a device in arrays, whatever its traffic (the module's docstring, the bench)."""
    ring = traffic.DeviceTraffic()
    size = sum(len(a) * a.itemsize for r in (ring.hour, ring.day) for a in r.arrays())
    assert 12_000 <= size <= 14_000
    assert isinstance(ring.hour.packets, array) and ring.hour.packets.typecode == "I"
