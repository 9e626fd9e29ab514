"""The device limit (issue 13): 4,096 slots by default, a compile-time define; past the limit a
clear error, and pins made with another number of slots are replaced like any older layout."""
import json

import pytest

from appliance.dataplane import api as dataplane
from appliance.dataplane import maps
from appliance.errors import DataplaneError
from lab import topology

pytestmark = pytest.mark.lab


def fake(i: int) -> tuple[str, str]:
    return f"02:42:dd:00:00:{i:02x}", f"198.18.2.{i}"


def test_the_default_is_4096_slots():
    assert maps.MAX_DEVICES == 4096


def test_past_the_limit_a_clear_error_and_other_sizes_are_an_older_layout(run_suffix):
    name = f"m{run_suffix}max"
    state = topology.up(name, devices=1, services=False, protect=False)
    gw, settings = state.namespaces["gw"], topology.gateway_settings(state)
    try:
        dp = dataplane.Dataplane.open(name, gw, settings, defines={"KALKI_MAX_DEVICES": 8})
        try:
            assert dp.max_devices == 8 and dp.older_layout is None
            for i in range(1, 8):      # slot 0 is the unknown device
                mac, ip = fake(i)
                dp.apply(dataplane.DeviceSpec(f"d{i}", mac, ip, {"anti_spoof": {}}))
            mac, ip = fake(8)
            with pytest.raises(DataplaneError, match="no free device slot: the data path holds 7 devices"):
                dp.apply(dataplane.DeviceSpec("d8", mac, ip, {"anti_spoof": {}}))
            assert "d8" not in dp.devices and len(dp.devices) == 7
        finally:
            dp.close()
        bigger = dataplane.Dataplane.open(name, gw, settings, defines={"KALKI_MAX_DEVICES": 16})
        try:
            assert bigger.older_layout == "map kalki_devices has 8 device slots, this version 16"
            assert bigger._maps["kalki_devices"].max_entries == 16
            mac, ip = fake(8)
            bigger.apply(dataplane.DeviceSpec("d8", mac, ip, {"anti_spoof": {}}))
            assert bigger.read_back("d8") is not None
        finally:
            bigger.close()
    finally:
        topology.down(name)


def test_the_image_keeps_a_neighbour_entry_per_device_at_the_limit():
    from pathlib import Path
    conf = (Path(__file__).parent.parent / "image/files/rootfs/etc/sysctl.d/90-kalki.conf").read_text()
    values = dict(line.replace(" ", "").split("=") for line in conf.splitlines()
                  if line.strip() and not line.startswith("#"))
    thresholds = [int(values[f"net.ipv4.neigh.default.gc_thresh{i}"]) for i in (1, 2, 3)]
    assert thresholds == sorted(thresholds) and thresholds[0] >= maps.MAX_DEVICES


def test_a_big_lab_raises_the_hosts_neighbour_limits_and_puts_them_back(tmp_path, monkeypatch):
    for i, value in ((1, 128), (2, 512), (3, 1024)):
        (tmp_path / f"t{i}").write_text(str(value))
    monkeypatch.setattr(topology, "NEIGH", str(tmp_path / "t"))
    monkeypatch.setattr(topology, "_save", lambda s: None)
    monkeypatch.setattr(topology, "labs", lambda: [])
    small, big = topology.plan("nsmall", devices=10), topology.plan("nbig", devices=1000)
    topology._neighbour_room(small)
    assert (tmp_path / "t3").read_text() == "1024" and "neigh_restore" not in small.gateway
    topology._neighbour_room(big)
    assert [int((tmp_path / f"t{i}").read_text()) for i in (1, 2, 3)] == [564, 2256, 4512]
    topology._neighbour_restore(topology.LabState.from_json(json.loads(json.dumps(big.to_json()))))
    assert [(tmp_path / f"t{i}").read_text() for i in (1, 2, 3)] == ["128", "512", "1024"]


def test_the_broker_may_hold_a_connection_per_device_at_the_limit():
    """Mosquitto takes no more clients than its descriptors allow, and systemd gives a service
    1,024 unless its unit says otherwise."""
    import configparser
    from pathlib import Path
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(Path(__file__).parent.parent / "image/files/rootfs/etc/systemd/system/kalki-mosquitto.service")
    assert int(unit["Service"]["LimitNOFILE"]) >= 2 * maps.MAX_DEVICES
