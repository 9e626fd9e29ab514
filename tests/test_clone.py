"""A device whose MAC and address another station clones (issue 11, item 9): the hardware below
the gateway tells it, the clone is cut off where there is a port to cut, and the victim is
named as the victim. Unit tests of the judgement, the parsers and the supervisor's record; a
fake hostapd control socket speaking hostapd's protocol; and a lab where a clone really plugs
into the lab's switch with camera1's MAC and address."""
import asyncio
import os
import socket
import subprocess
import time

import pytest
from fakes import supervisor
from labutil import wait_until

from appliance import client
from appliance.system import site as site_mod
from appliance.telemetry.stations import (
    Clone,
    CloneDetector,
    HostapdWatch,
    parse_fdb_line,
    parse_hostapd_event,
)
from lab import topology

CAMERA = "02:4b:00:00:00:01"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


# ---------------------------------------------------------------- the judgement

def test_a_mac_on_a_second_port_while_its_own_is_up_is_a_clone():
    d = CloneDetector(60, Clock())
    d.known(CAMERA, "d0")
    clone = d.moved(CAMERA, "d7", lambda port: port == "d0")
    assert clone == Clone(CAMERA, "d0", "d7", clone.why)
    assert "d7" in clone.why and "port d0 is still up" in clone.why
    # the two keep taking the MAC from each other: told once per window, the home port kept
    assert d.moved(CAMERA, "d0", lambda port: True) is None
    assert d.moved(CAMERA, "d7", lambda port: True) is None


def test_a_device_plugged_elsewhere_is_a_move_not_a_clone():
    clock = Clock()
    d = CloneDetector(60, clock)
    d.known(CAMERA, "d0")
    assert d.moved(CAMERA, "d3", lambda port: False) is None
    assert d.port_of(CAMERA) == "d3"
    clock.t += 120      # and again much later: still a move
    assert d.moved(CAMERA, "d5", lambda port: False) is None


def test_flapping_between_ports_within_the_window_is_a_clone_even_with_links_down():
    clock = Clock()
    d = CloneDetector(60, clock)
    d.known(CAMERA, "d0")
    assert d.moved(CAMERA, "d3", lambda port: False) is None
    clock.t += 5
    clone = d.moved(CAMERA, "d0", lambda port: False)
    assert clone and "2 times within 60 s" in clone.why and clone.home_port == "d3"


def test_the_first_sighting_and_the_same_port_are_nothing():
    d = CloneDetector(60, Clock())
    assert d.moved(CAMERA, "d0", lambda port: True) is None
    assert d.moved(CAMERA, "d0", lambda port: True) is None


def test_associations_again_and_again_are_a_clone_and_a_few_are_not():
    clock = Clock()
    d = CloneDetector(60, clock)
    assert d.associated(CAMERA, "wlan0") is None
    clock.t += 61     # a reconnect a minute later is a device waking up
    assert d.associated(CAMERA, "wlan0") is None
    clock.t += 1
    clone = d.associated(CAMERA, "wlan0")
    assert clone is None
    clock.t += 1
    clone = d.associated(CAMERA, "wlan0")
    assert clone and clone.other_port == "" and "3 times within 60 s" in clone.why


# ---------------------------------------------------------------- what the hardware says

@pytest.mark.parametrize("line, parsed", [
    ("02:4b:00:00:00:01 dev d0 master br-dev ", (CAMERA, "d0", False)),
    ("Deleted 02:4B:00:00:00:01 dev d7 master br-dev", (CAMERA, "d7", True)),
    ("02:4b:00:00:00:01 dev d0 master br-other", None),          # another bridge
    ("de:4f:18:81:3c:d9 dev d0 master br-dev permanent", None),  # the port's own
    ("33:33:00:00:00:01 dev br-dev self permanent", None),
    ("02:4b:00:00:00:01 dev d0 vlan 1 master br-dev static", None),
    ("garbage", None), ("", None), ("zz:4b:00:00:00:01 dev d0 master br-dev", None),
])
def test_bridge_monitor_lines(line, parsed):
    assert parse_fdb_line(line, "br-dev") == parsed


@pytest.mark.parametrize("message, parsed", [
    (b"<3>AP-STA-CONNECTED 02:4b:00:00:00:01", ("connected", CAMERA)),
    (b"<3>AP-STA-DISCONNECTED 02:4b:00:00:00:01 reason=3", ("disconnected", CAMERA)),
    (b"<3>AP-STA-CONNECTED 02:4b:00:00:00:01 keyid=x", ("connected", CAMERA)),
    (b"<3>CTRL-EVENT-EAP-STARTED 02:4b:00:00:00:01", None),
    (b"<3>AP-STA-CONNECTED nonsense", None), (b"\xff\xfe", None),
])
def test_hostapd_events(message, parsed):
    assert parse_hostapd_event(message) == parsed


def test_the_site_asks_hostapd_for_its_control_socket_and_the_supervisor_reads_it():
    site = site_mod.Site()
    site.devices_interface = "wlan0"
    site.wifi = site_mod.Wifi(ssid="kalki-test", passphrase="correct horse battery", channel=6)
    assert "ctrl_interface=/run/hostapd\n" in site_mod.hostapd_conf(site)
    assert site_mod.supervisor_config(site).stations.hostapd_control == "/run/hostapd/wlan0"


def test_a_fake_hostapd_s_station_events_reach_the_supervisor(tmp_path):
    """hostapd's control protocol (ATTACH, then unsolicited "<level>EVENT" datagrams) on a
    unix socket: the seam the Pi's hardware sits behind."""
    control = tmp_path / "wlan0"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(control))
    seen = []

    async def scenario():
        watch = HostapdWatch(str(control), CloneDetector(60), lambda c, cut: seen.append((c, cut)),
                             str(tmp_path))
        loop = asyncio.get_running_loop()
        attach = loop.run_in_executor(None, server.recvfrom, 64)
        await asyncio.sleep(0)
        start = loop.run_in_executor(None, watch.start, loop)
        message, peer = await attach
        assert message == b"ATTACH"
        server.sendto(b"OK\n", peer)
        await start
        for _ in range(3):
            server.sendto(b"<3>AP-STA-CONNECTED " + CAMERA.encode(), peer)
        server.sendto(b"<3>AP-STA-CONNECTED 02:4b:00:00:00:02", peer)
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.02)
        watch.close()
        watch.close()       # idempotent

    try:
        asyncio.run(scenario())
    finally:
        server.close()
    assert len(seen) == 1
    clone, cut = seen[0]
    assert clone.mac == CAMERA and clone.home_port == "wlan0" and cut is None
    assert not any(p.name.startswith("hostapd-") for p in tmp_path.iterdir())


def test_a_hostapd_that_does_not_answer_is_named(tmp_path):
    watch = HostapdWatch(str(tmp_path / "wlan9"), CloneDetector(60), lambda c, cut: None,
                         str(tmp_path))
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(OSError):
            watch.start(loop)
    finally:
        loop.close()
    assert "wlan9" in watch.fault


# ---------------------------------------------------------------- the supervisor's record

@pytest.fixture
def sup(tmp_path):
    s = supervisor(tmp_path, camera1=(CAMERA, "198.18.0.10", "camera"))
    yield s
    s.store.close()


def test_the_alert_names_the_victim_the_port_and_what_was_done(sup):
    clone = Clone(CAMERA, "d0", "d7", "two stations use one identity")
    sup.on_clone(clone, "port d7 of bridge br-dev switched off")
    alert = sup.store.alerts(limit=1)[0]
    assert alert["type"] == "identity-clone" and alert["severity"] == "critical"
    assert alert["device"] == "camera1"
    assert alert["details"]["victim"] == "camera1" and alert["details"]["port"] == "d7"
    assert alert["details"]["action"] == "port d7 of bridge br-dev switched off"
    assert sup.posture("camera1") == "normal"       # the clone alert blames nobody's posture


def test_kernel_alerts_while_a_clone_is_about_say_so_and_still_protect(sup):
    sup.on_clone(Clone(CAMERA, "wlan0", "", "associated 3 times"), None)
    sup.on_kernel_alerts([("camera1", "gateway-probe",
                           {"src": "198.18.0.10", "dst": "198.18.0.1", "dport": 22})])
    alert = next(a for a in sup.store.alerts() if a["type"] == "gateway-probe")
    assert "another station" in alert["details"]["clone"]
    assert sup.posture("camera1") == "quarantine"   # protection first: they share one identity


# ---------------------------------------------------------------- the lab: a real clone

@pytest.fixture(scope="module")
def clab(run_suffix):
    name = f"k{run_suffix}cln"
    state = topology.up(name, devices=4, supervisor=True)
    try:
        yield state
    finally:
        topology.down(name)


def _sh(*argv):
    subprocess.run(argv, check=True, capture_output=True, text=True)


@pytest.mark.lab
def test_a_clone_on_the_switch_is_cut_off_and_the_victim_is_not_blamed(clab):
    camera = clab.device("camera1")
    sw = clab.namespaces["sw"]
    ns = f"kalki-{clab.name}-clone"       # removed with the lab's other namespaces
    _sh("ip", "netns", "add", ns)
    _sh("ip", "link", "add", "eth0", "netns", ns, "address", camera.mac, "type", "veth",
        "peer", "name", "dclone", "netns", sw)
    _sh("ip", "-n", sw, "link", "set", "dclone", "master", "br-dev", "up")
    _sh("ip", "-n", sw, "link", "set", "dev", "dclone", "type", "bridge_slave", "isolated", "on")
    _sh("ip", "-n", ns, "addr", "add", f"{camera.ip}/20", "dev", "eth0")
    _sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sock = clab.gateway["socket"]
    # The clone's first frames (ARP for the gateway, a ping) move camera1's MAC to its port.
    subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "2", "-W", "1", topology.GATEWAY_LAN_IP],
                   capture_output=True)
    alerts = wait_until(lambda: [a for a in client.request(sock, "alerts", limit=50)
                                 if a["type"] == "identity-clone"], 10)
    details = alerts[0]["details"]
    assert alerts[0]["device"] == "camera1" and details["victim"] == "camera1"
    assert details["port"] == "dclone" and details["home_port"].startswith("d")
    assert "switched off" in details["action"], details
    link = subprocess.run(["ip", "-n", sw, "-o", "link", "show", "dev", "dclone"],
                          capture_output=True, text=True).stdout
    assert "state DOWN" in link or ",UP" not in link.split(">")[0], link
    # The clone now tries what a taken-over device does (the gateway's SSH): nothing arrives,
    # so nothing is counted against camera1.
    subprocess.run(["ip", "netns", "exec", ns, "timeout", "3", "bash", "-c",
                    f"for i in 1 2 3; do echo > /dev/tcp/{topology.GATEWAY_LAN_IP}/22; done"],
                   capture_output=True)
    time.sleep(1.0)
    cam = {d["name"]: d for d in client.request(sock, "devices")}["camera1"]
    assert cam["posture"] == "normal", cam
    kinds = {a["type"] for a in client.request(sock, "alerts", limit=50) if a["device"] == "camera1"}
    assert kinds == {"identity-clone"}, kinds
    # The real camera1 still reaches the gateway from its own port.
    assert subprocess.run(["ip", "netns", "exec", camera.namespace, "ping", "-c", "1", "-W", "2",
                           topology.GATEWAY_LAN_IP], capture_output=True).returncode == 0
    assert os.path.exists(f"/run/netns/{ns}")
