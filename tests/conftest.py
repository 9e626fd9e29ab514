import os
import secrets

import pytest

from appliance.dataplane import api as dataplane
from appliance.policy import profiles
from lab import topology


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="lab tests need root (network namespaces, XDP, nftables)")
        for item in items:
            if "lab" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def run_suffix():
    return secrets.token_hex(2)


@pytest.fixture(scope="module")
def lab(run_suffix, request):
    """A four-device lab, protected, for one test module; removed even when tests fail."""
    name = f"t{run_suffix}{request.module.__name__[-6:].replace('_', '')}"[:20]
    state = topology.up(name, devices=4)
    try:
        yield state
    finally:
        topology.down(name)
        assert not [n for n in os.listdir("/run/netns") if n.startswith(f"kalki-{name}-")]


@pytest.fixture(scope="module")
def dp(lab):
    d = dataplane.Dataplane.open(lab.name, lab.namespaces["gw"], topology.gateway_settings(lab))
    d.reconcile(normal_specs(lab))
    yield d
    d.close()


def normal_specs(lab, posture="normal"):
    known = profiles.load_all()
    return [dataplane.DeviceSpec(d.name, d.mac, d.ip, known[d.type].stack(posture)) for d in lab.devices]


@pytest.fixture
def fresh(lab, dp):
    """Every device back in its normal posture, the drop set empty, no pending events."""
    for spec in normal_specs(lab):
        dp.apply(spec)
    for entry in dp.drop_set():
        dp.unblock_source(entry["source"])
    dp.events()
    return dp
