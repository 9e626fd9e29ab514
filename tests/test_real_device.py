"""A real device, re-enacted in the lab: the Tuya mood lamp of ../shared/real-devices (its
capture and MUD file are in tests/data), every address mapped into the lab's range first.

- With its MUD file imported, every flow the lamp opened passes, no alert is raised and the
  posture stays normal; a flow outside the file is refused.
- Learning on the same re-enactment gives a profile that covers every entry of mudgee's file
  the lamp really opened, and a device approved with it passes the re-enactment quietly.
"""
import socket
import threading
import time
from pathlib import Path

import pytest
from labutil import connect

from appliance import client, netns
from appliance.dataplane import capture
from lab import replay, topology

pytestmark = pytest.mark.lab

DATA = Path(__file__).parent / "data"
LAMP_MAC = "b8:06:0d:18:84:b4"


@pytest.fixture(scope="module")
def rlab(run_suffix):
    name = f"s{run_suffix}real"
    state = topology.up(name, devices=2, supervisor=True, services=False, ui=False)
    stop = threading.Event()
    try:
        servers = []
        for port in (443, 8886):
            with netns.entered(state.namespaces["inet"]):
                server = socket.create_server(("0.0.0.0", port), backlog=64)
            server.settimeout(0.2)
            servers.append(server)

        def accept(server):
            while not stop.is_set():
                try:
                    server.accept()[0].close()
                except OSError:
                    pass
        for server in servers:
            threading.Thread(target=accept, args=(server,), daemon=True).start()
        yield state
    finally:
        stop.set()
        topology.down(name)


def ask(lab, op, **args):
    return client.request(lab.gateway["socket"], op, **args)


def lamp(lab, device):
    """(the capture's flows, the address map) with `device` playing the lamp."""
    packets = capture.read_packets(DATA / "captures" / "G06-mood_lamp-3204432.pcap")
    mapping = replay.address_map(packets, LAMP_MAC, lab.device(device).ip)
    return capture.flows(packets, LAMP_MAC), mapping


def quietly(lab, device, run):
    """Runs `run`; returns what it returned and the alerts raised on the device meanwhile."""
    before = ask(lab, "alerts", device=device)
    result = run()
    time.sleep(0.5)
    return result, [a for a in ask(lab, "alerts", device=device) if a not in before]


def drops(lab, device):
    """Packets dropped per reason; the lab device's own IPv6 chatter (router solicitations,
    which the appliance drops by design) is not the lamp's and is left out."""
    counters = ask(lab, "device_show", name=device)["counters"]
    return {reason: c["packets"] for reason, c in counters.items()
            if reason not in ("pass", "not_ipv4") and c["packets"]}


def test_the_lamp_with_its_mud_file_imported_passes_quietly(rlab):
    flows, mapping = lamp(rlab, "plug1")
    mud = replay.map_text((DATA / "mud" / "mood_lamp-3204432Mud.json").read_text(), mapping)
    imported = ask(rlab, "profile_import", text=mud, filename="mood_lamp.json", type="mood-lamp",
                   device_ip=rlab.device("plug1").ip)
    assert imported["type"] == "mood-lamp"
    ask(rlab, "device_approve", name="plug1", type="mood-lamp")
    dropped_before = drops(rlab, "plug1")
    results, alerts = quietly(rlab, "plug1", lambda: replay.reenact(rlab, "plug1", flows, mapping))
    assert {(r["proto"], r["peer"], r["port"]) for r in results} == {
        ("tcp", mapping["3.124.225.12"], 8886), ("tcp", mapping["18.185.182.159"], 443),
        ("udp", "255.255.255.255", 6667)}
    assert all(r["opened"] for r in results), results
    assert alerts == []
    assert drops(rlab, "plug1") == dropped_before
    assert ask(rlab, "device_show", name="plug1")["posture"] == "normal"
    # a flow the MUD file does not give is refused (and shown, not alarmed)
    assert not connect(rlab.device("plug1").namespace, mapping["18.185.182.159"], 8886, timeout=0.5)
    assert ask(rlab, "device_show", name="plug1")["posture"] == "normal"


def test_learning_the_lamp_covers_its_mud_file_and_the_learnt_profile_passes(rlab):
    flows, mapping = lamp(rlab, "camera1")
    ask(rlab, "device_approve", name="camera1", type="generic")
    ask(rlab, "device_learn", name="camera1", **{"for": "1h"})
    results, alerts = quietly(rlab, "camera1", lambda: replay.reenact(rlab, "camera1", flows, mapping))
    assert all(r["opened"] for r in results) and alerts == []
    made = ask(rlab, "profile_from_device", name="camera1", type="learnt-lamp")
    # mudgee's entries the lamp opened: the two cloud flows (its own address and the
    # broadcast are the capture's artefact and LAN chatter, the gateway's DHCP the gateway's)
    assert {f"{mapping['18.185.182.159']}:443/tcp", f"{mapping['3.124.225.12']}:8886/tcp"} \
        <= set(made["destinations"])
    ask(rlab, "profile_import", text=made["text"], filename="learnt-lamp.toml")
    ask(rlab, "device_approve", name="camera1", type="learnt-lamp")
    assert ask(rlab, "device_show", name="camera1")["posture"] == "normal"
    dropped_before = drops(rlab, "camera1")
    results, alerts = quietly(rlab, "camera1", lambda: replay.reenact(rlab, "camera1", flows, mapping))
    assert all(r["opened"] for r in results) and alerts == []
    assert drops(rlab, "camera1") == dropped_before
