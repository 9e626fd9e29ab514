"""The lab itself: its description, two labs side by side, and that nothing is left behind."""
import ipaddress
import json
import os
import subprocess
import sys

import pytest
from labutil import LAB_RANGE, connect, ping

from appliance.errors import LabError
from lab import topology

pytestmark = pytest.mark.lab


def leftovers(name):
    ns = [n for n in os.listdir("/run/netns") if n.startswith(f"kalki-{name}-")] \
        if os.path.isdir("/run/netns") else []
    pins = os.path.exists(f"/sys/fs/bpf/kalki/{name}")
    files = topology.state_path(name).exists() or (topology.SHM_DIR / name).exists()
    return ns, pins, files


def kalki(*args):
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_two_labs_side_by_side_and_json(run_suffix):
    a, b = f"la{run_suffix}", f"lb{run_suffix}"
    try:
        out = kalki("lab", "up", "--name", a, "--devices", "2", "--json")
        assert out.returncode == 0, out.stderr
        desc = json.loads(out.stdout)
        assert kalki("lab", "up", "--name", b, "--devices", "1", "--no-services").returncode == 0
        assert [d["type"] for d in desc["devices"]] == ["camera", "plug"]
        for d in desc["devices"]:
            assert ipaddress.IPv4Address(d["ip"]) in LAB_RANGE
            assert d["namespace"].startswith(f"kalki-{a}-") and d["mac"].startswith("02:")
        g = desc["gateway"]
        for key in ("lan_ip", "uplink_ip", "inet_ip", "attacker_ip"):
            assert ipaddress.IPv4Address(g[key]) in LAB_RANGE
        assert g["devices_if"] == "dev0" and desc["namespaces"]["gw"] == f"kalki-{a}-gw"
        # same addresses in both labs, no interference
        cam_a = desc["devices"][0]
        cam_b = topology.load(b).devices[0]
        assert cam_a["ip"] == cam_b.ip
        assert ping(cam_a["namespace"], "198.19.8.1") == 1
        assert ping(cam_b.namespace, "198.19.8.1") == 1
        assert connect(desc["namespaces"]["inet"], cam_a["ip"], 23)
        status = kalki("lab", "status", "--json")
        assert {a, b} <= {s["name"] for s in json.loads(status.stdout)}
        assert kalki("lab", "up", "--name", a).returncode == 2      # exists already
    finally:
        kalki("lab", "down", a)
        kalki("lab", "down", b)
    assert leftovers(a) == ([], False, False) and leftovers(b) == ([], False, False)


def test_a_lab_that_fails_half_way_is_removed(run_suffix, monkeypatch):
    name = f"lf{run_suffix}"

    def broken(state):
        raise LabError("simulated failure while protecting")

    monkeypatch.setattr(topology, "_protect", broken)
    with pytest.raises(LabError, match="simulated"):
        topology.up(name, devices=2)
    assert leftovers(name) == ([], False, False)


def test_bad_lab_requests_are_refused():
    with pytest.raises(LabError, match="--devices"):
        topology.plan("x", devices=0)
    with pytest.raises(LabError, match="--devices"):
        topology.plan("x", devices=1001)
    with pytest.raises(LabError, match="lab name"):
        topology.plan("bad name!", devices=1)
    with pytest.raises(LabError, match="no lab named"):
        topology.load("never-made")
    assert kalki("lab", "down", "never-made").returncode == 0
