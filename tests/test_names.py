"""Destinations by name, in the lab: real dnsmasq on the gateway forwarding to the internet
host's name server, the supervisor's resolver front on the devices' port 53, real XDP.

A camera whose profile allows `*.camera.example:443/tcp` resolves through the gateway and
connects at the first try; an address it never resolved, or resolved for a name its profile
does not give, is refused.
"""
import ctypes
import shutil
import signal
import socket
import threading
import time

import dns.message
import dns.query
import dns.rdatatype
import pytest

from appliance import client, netns
from appliance.dataplane import bpf, maps
from appliance.policy.profiles import PROFILE_DIR
from lab import topology
from tests.labutil import connect
from tests.test_supervisor import restart_supervisor

pytestmark = pytest.mark.lab

CAMERA = """
type = "camera"
description = "a camera whose cloud is known by name"

[postures.normal]
anti_spoof = {}
lateral_block = {}
allowlist = { destinations = ["*.camera.example:443/tcp", "pool.ntp.example:123/udp"] }

[postures.attack]
quarantine = { management = true }
"""


@pytest.fixture(scope="module")
def nlab(run_suffix, tmp_path_factory):
    profiles = tmp_path_factory.mktemp("profiles")
    for p in PROFILE_DIR.glob("*.toml"):
        if p.name != "camera.toml":
            shutil.copy(p, profiles / p.name)
    (profiles / "camera.toml").write_text(CAMERA)
    name = f"s{run_suffix}dns"
    state = topology.up(name, devices=5, supervisor=True, services=False, ui=False,
                        profiles=str(profiles))
    stop = threading.Event()
    try:
        topology.dns_set(state, "edge.cdn.example", ["198.19.64.10", "198.19.64.11"], ttl=60)
        topology.dns_set(state, "cloud.camera.example", cname="edge.cdn.example", ttl=60)
        topology.dns_set(state, "api.camera.example", ["198.19.64.30"], ttl=60)
        topology.dns_set(state, "other.example", ["198.19.64.20"], ttl=60)
        with netns.entered(state.namespaces["inet"]):
            server = socket.create_server(("0.0.0.0", 443), backlog=64)
        server.settimeout(0.2)

        def accept():
            while not stop.is_set():
                try:
                    server.accept()[0].close()
                except OSError:
                    pass
        threading.Thread(target=accept, daemon=True).start()
        yield state
    finally:
        stop.set()
        topology.down(name)


def resolve(lab, device, hostname, server=topology.GATEWAY_LAN_IP, tcp=False):
    """The A records a device gets for `hostname` from `server` (the gateway's resolver
    answers whatever server is asked: nftables redirects the query)."""
    query = dns.message.make_query(hostname, "A")
    with netns.entered(lab.device(device).namespace):
        answer = (dns.query.tcp if tcp else dns.query.udp)(query, server, timeout=3)
    return sorted(r.address for rrset in answer.answer if rrset.rdtype == dns.rdatatype.A
                  for r in rrset)


def names_of(lab, device):
    return client.request(lab.gateway["socket"], "device_show", name=device)["names"]


def test_an_address_resolved_through_the_gateway_opens_at_the_first_try(nlab):
    cam = nlab.device("camera1").namespace
    assert not connect(cam, "198.19.64.10", 443, timeout=0.5)     # never resolved: refused
    # a CNAME chain from the allowed name to two addresses
    assert resolve(nlab, "camera1", "cloud.camera.example") == ["198.19.64.10", "198.19.64.11"]
    assert connect(cam, "198.19.64.10", 443, timeout=1)
    assert connect(cam, "198.19.64.11", 443, timeout=1)
    # only the allowed port
    assert not connect(cam, "198.19.64.10", 8443, timeout=0.5)
    bound = {b["address"]: b for b in names_of(nlab, "camera1")["bound"]}
    assert bound["198.19.64.10"]["names"] == ["cloud.camera.example", "edge.cdn.example"]
    assert 60 < bound["198.19.64.10"]["expires_in_s"] <= 60 + 300


def test_an_answer_from_the_resolver_s_cache_binds_too(nlab):
    """dnsmasq's own set hooks fire on cache misses only; the front sees every answer."""
    cam2 = nlab.device("camera2").namespace
    resolve(nlab, "camera1", "cloud.camera.example")      # in dnsmasq's cache now
    assert not connect(cam2, "198.19.64.10", 443, timeout=0.5)
    os_pid = nlab.pids["inet-dns"]
    import os
    os.killpg(os_pid, signal.SIGTERM)     # the upstream is gone: only the cache can answer
    try:
        os.waitpid(os_pid, 0)
    except ChildProcessError:
        pass
    try:
        assert resolve(nlab, "camera2", "cloud.camera.example") == ["198.19.64.10", "198.19.64.11"]
        assert connect(cam2, "198.19.64.10", 443, timeout=1)
    finally:
        topology.dns_set(nlab, "api.camera.example", ["198.19.64.30"], ttl=60)   # restarts it


def test_dns_to_another_resolver_is_answered_by_the_gateway(nlab):
    cam = nlab.device("camera1").namespace
    # 198.19.64.53 runs no name server: only the gateway's redirect can answer, over UDP and TCP
    assert resolve(nlab, "camera1", "api.camera.example", server="198.19.64.53") == ["198.19.64.30"]
    assert connect(cam, "198.19.64.30", 443, timeout=1)
    assert resolve(nlab, "camera1", "api.camera.example", server="198.19.64.53", tcp=True) == ["198.19.64.30"]


def test_a_name_outside_the_profile_resolves_but_does_not_open(nlab):
    cam = nlab.device("camera1").namespace
    assert resolve(nlab, "camera1", "other.example") == ["198.19.64.20"]
    assert not connect(cam, "198.19.64.20", 443, timeout=0.5)
    assert names_of(nlab, "camera1")["refused"].get("other.example", 0) >= 1
    # the refused flow is on the device, with the name it was for: the operator may allow it
    show = lambda: client.request(nlab.gateway["socket"], "device_show", name="camera1")  # noqa: E731
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not show()["flows"]["refused"]:
        time.sleep(0.1)
    refused = show()["flows"]["refused"]
    assert any(f["names"] == ["other.example"] and f["port"] == 443 for f in refused), refused
    assert show()["posture"] == "normal"


def _name_table(lab):
    return bpf.Map(f"/sys/fs/bpf/kalki/{lab.name}/kalki_name_allow", maps.NameKey, maps.NameValue)


def _set_expiry(lab, address: str, seconds_from_now: float) -> None:
    table = _name_table(lab)
    try:
        want = int.from_bytes(socket.inet_aton(address), "little")
        mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        for k, v in table.items():
            if k.addr == want:
                v.expires_ns = max(0, mono + int(seconds_from_now * 1e9))
                table.update(k, v)
    finally:
        table.close()


def test_the_kernel_honours_the_expiry_and_a_flow_stretches_it(nlab):
    cam = nlab.device("camera1").namespace
    resolve(nlab, "camera1", "api.camera.example")
    _set_expiry(nlab, "198.19.64.30", -1)
    assert not connect(cam, "198.19.64.30", 443, timeout=0.5)       # past its time: refused
    _set_expiry(nlab, "198.19.64.30", 0.6)
    assert connect(cam, "198.19.64.30", 443, timeout=1)             # stretches it by keep_s
    time.sleep(1.0)
    assert connect(cam, "198.19.64.30", 443, timeout=1)


def test_bindings_outlive_a_restart_and_a_reboot(nlab):
    import os
    cam = nlab.device("camera1").namespace
    resolve(nlab, "camera1", "cloud.camera.example")
    state = topology.state_path(nlab.name).parent / "state" / "names.json"
    deadline = time.monotonic() + 15            # the ticker writes the snapshot every 10 s
    while time.monotonic() < deadline and "198.19.64.11" not in (state.read_text() if state.exists() else ""):
        time.sleep(0.25)
    assert "198.19.64.11" in state.read_text()
    os.killpg(nlab.pids["supervisor"], signal.SIGKILL)
    # a reboot: the kernel's bindings are gone with the pinned maps' contents
    table = _name_table(nlab)
    try:
        for k in list(table.keys()):
            table.delete(k)
    finally:
        table.close()
    assert not connect(cam, "198.19.64.11", 443, timeout=0.5)
    restart_supervisor(nlab)
    # no new lookup: the device reconnects to what it resolved before
    assert connect(cam, "198.19.64.11", 443, timeout=1)
    assert ctypes.sizeof(maps.NameValue) == 48


def test_learning_records_what_a_device_opens_and_makes_a_profile_of_it(nlab):
    """Learning on the light, whose profile does not name api.hue-cloud.example: the flow
    passes and is recorded with its name; the learnt profile, imported and approved, lets the
    same flow through in normal with no alert."""
    sock = nlab.gateway["socket"]
    light = nlab.device("light1").namespace
    topology.dns_set(nlab, "api.hue-cloud.example", ["198.19.64.40"], ttl=60)
    client.request(sock, "device_learn", name="light1", **{"for": "1h"})
    addr, = resolve(nlab, "light1", "api.hue-cloud.example")
    assert connect(light, addr, 443, timeout=1)
    deadline = time.monotonic() + 3
    learnt = []
    while time.monotonic() < deadline and not learnt:
        learnt = client.request(sock, "device_show", name="light1")["flows"]["learnt"]
        time.sleep(0.1)
    assert [(f["address"], f["port"], f["names"]) for f in learnt] == [(addr, 443, ["api.hue-cloud.example"])]
    made = client.request(sock, "profile_from_device", name="light1", type="learnt-light")
    assert "api.hue-cloud.example:443/tcp" in made["destinations"]
    assert client.request(sock, "profile_import", text=made["text"], filename="learnt-light.toml")["type"] \
        == "learnt-light"
    before = client.request(sock, "alerts", device="light1")
    client.request(sock, "device_approve", name="light1", type="learnt-light")
    assert client.request(sock, "device_show", name="light1")["posture"] == "normal"
    resolve(nlab, "light1", "api.hue-cloud.example")
    assert connect(light, addr, 443, timeout=1)
    time.sleep(0.5)
    assert [a for a in client.request(sock, "alerts", device="light1") if a not in before] == []


def test_the_devices_cannot_reach_dnsmasq_behind_the_front(nlab):
    """Last: the probe is a gateway probe, which quarantines the plug."""
    query = dns.message.make_query("api.camera.example", "A")
    with netns.entered(nlab.device("plug1").namespace), pytest.raises(dns.exception.Timeout):
        dns.query.udp(query, topology.GATEWAY_LAN_IP, port=5301, timeout=1)


def test_a_shipped_profile_opens_the_cloud_the_site_names(nlab):
    """The shipped light profile names no address: it opens {controller = "light-cloud"},
    which the lab's site settings give as cloud.light.example."""
    light = nlab.device("light1").namespace
    before = client.request(nlab.gateway["socket"], "alerts", device="light1")
    cloud, = resolve(nlab, "light1", "cloud.light.example")
    assert connect(light, cloud, 443, timeout=1)
    time.sleep(0.5)
    after = client.request(nlab.gateway["socket"], "alerts", device="light1")
    assert [a for a in after if a not in before] == []
    assert names_of(nlab, "light1")["bound"][0]["names"] == ["cloud.light.example"]


def test_kalki_lab_dns_set_gives_the_internet_a_name(nlab):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "appliance.cli", "lab", "dns", nlab.name, "set",
                          "cli.camera.example", "198.19.64.77", "--ttl", "30"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert resolve(nlab, "camera1", "cli.camera.example") == ["198.19.64.77"]
    bad = subprocess.run([sys.executable, "-m", "appliance.cli", "lab", "dns", nlab.name, "set",
                          "x.example", "8.8.8.8"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "outside the lab" in bad.stderr

