"""A thousand devices on one gateway: all protected, a posture change on one leaves the rest
alone, and the data path reads back what it was given."""
import pytest
from conftest import normal_specs
from labutil import ping

from appliance.dataplane import api as dataplane
from lab import topology

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def big(run_suffix):
    name = f"big{run_suffix}"
    state = topology.up(name, devices=1000, services=False)
    try:
        yield state
    finally:
        topology.down(name)


def test_a_thousand_devices(big):
    specs = normal_specs(big)
    with dataplane.Dataplane.open(big.name, big.namespaces["gw"], topology.gateway_settings(big)) as dp:
        report = dp.reconcile(specs)
        assert len(report["unchanged"]) == 1000 and not report["fixed"] and not report["added"]
        first, middle, last = big.devices[0], big.devices[500], big.devices[999]
        for d in (first, middle, last):
            assert ping(d.namespace, "198.19.8.1") == 1, (d, dp.counters(d.name))  # allowed out
            assert ping(d.namespace, big.devices[1].ip) == 0      # no lateral movement
        dp.set_stack(last.name, {"quarantine": {}})
        assert ping(last.namespace, "198.19.8.1") == 0
        assert ping(middle.namespace, "198.19.8.1") == 1
        assert dp.counters(last.name)["quarantine"]["packets"] == 1
        assert "quarantine" not in dp.counters(middle.name)
        dp.remove(middle.name)
        assert ping(middle.namespace, "198.19.8.1") == 0         # unknown again: closed
        report = dp.reconcile(specs)
        assert report["fixed"] == [last.name] and report["added"] == [middle.name]
        assert ping(middle.namespace, "198.19.8.1") == 1 and ping(last.namespace, "198.19.8.1") == 1
