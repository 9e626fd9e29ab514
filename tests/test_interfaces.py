"""A configured interface that is not there: at start (an adapter not plugged in, a name that
differs) and at run time (unplugged). The supervisor names the fault and waits for it on
netlink, then loads and enforces; an interface that comes back gets its XDP program again."""
import json
import signal
import subprocess
import sys
import time

import pytest
from labutil import wait_until

from appliance import client
from appliance.dataplane import api as dataplane
from lab import topology

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def ilab(run_suffix):
    name = f"s{run_suffix}if"
    state = topology.up(name, devices=1, supervisor=True, services=False, ui=False)
    try:
        yield state
    finally:
        topology.down(name)
        dataplane.remove_pins(f"{name}x")


def status(lab):
    return client.request(lab.gateway["socket"], "status", timeout=5)


def xdp_on(lab, ifname):
    out = subprocess.run(["ip", "-j", "-n", lab.namespaces["gw"], "link", "show", "dev", ifname],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)[0].get("xdp", {}).get("prog", {}).get("id")


def add_interface(lab, ifname):
    gw = lab.namespaces["gw"]
    subprocess.run(["ip", "-n", gw, "link", "add", ifname, "type", "veth", "peer", "name", f"{ifname}p"],
                   check=True)
    subprocess.run(["ip", "-n", gw, "link", "set", ifname, "up"], check=True)


def test_a_missing_interface_is_named_waited_for_then_enforced(ilab):
    lab_dir = topology.state_path(ilab.name).parent
    import os
    os.killpg(ilab.pids["supervisor"], signal.SIGKILL)
    config = (lab_dir / "kalki.toml").read_text()
    config = config.replace('devices_interface = "dev0"', 'devices_interface = "dev9"')
    config = config.replace(f'instance = "{ilab.name}"', f'instance = "{ilab.name}x"')
    assert 'devices_interface = "dev9"' in config and f'"{ilab.name}x"' in config
    (lab_dir / "kalki-dev9.toml").write_text(config)
    ilab.pids["supervisor"] = topology.spawn(ilab.namespaces["gw"], [
        sys.executable, "-m", "appliance.cli", "run", "--config", str(lab_dir / "kalki-dev9.toml")],
        lab_dir / "supervisor.log")
    topology._save(ilab)
    first = topology.wait_for_supervisor(ilab, 60)
    # the command answers and names the fault; nothing is attached anywhere yet
    assert "devices interface dev9 missing" in (first["site_error"] or ""), first
    assert "gateway.devices_interface" in first["site_error"]
    assert first["enforced"] == 0
    time.sleep(1.5)
    assert "dev9" in (status(ilab)["site_error"] or "")
    add_interface(ilab, "dev9")
    assert wait_until(lambda: status(ilab)["site_error"] is None and status(ilab)["enforced"] == 1, 30)
    assert xdp_on(ilab, "dev9") is not None


def test_an_interface_unplugged_at_run_time_is_told_and_reattached_when_back(ilab):
    gw = ilab.namespaces["gw"]
    assert xdp_on(ilab, "dev9") is not None
    subprocess.run(["ip", "-n", gw, "link", "del", "dev9"], check=True)
    assert wait_until(lambda: any("interface dev9 is missing" in p
                                  for p in (status(ilab)["tamper"] or {}).get("problems", [])), 5)
    alerts = client.request(ilab.gateway["socket"], "alerts")
    assert any(a["type"] == "tamper" and any("dev9 is missing" in p for p in a["details"]["problems"])
               for a in alerts)
    assert status(ilab)["enforced"] == 1          # still up, still answering
    add_interface(ilab, "dev9")
    assert wait_until(lambda: xdp_on(ilab, "dev9") is not None, 5)
