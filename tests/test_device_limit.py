"""The device limit (issue 13): 4,096 slots by default, a compile-time define; past the limit a
clear error, and pins made with another number of slots are replaced like any older layout."""
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


def test_the_broker_may_hold_a_connection_per_device_at_the_limit():
    """Mosquitto takes no more clients than its descriptors allow, and systemd gives a service
    1,024 unless its unit says otherwise."""
    import configparser
    from pathlib import Path
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(Path(__file__).parent.parent / "image/files/rootfs/etc/systemd/system/kalki-mosquitto.service")
    assert int(unit["Service"]["LimitNOFILE"]) >= 2 * maps.MAX_DEVICES
