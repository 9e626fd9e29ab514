"""Posture changes, isolation between devices, refusal of bad parameters, and a supervisor
killed with SIGKILL: all on real packets in the lab."""
import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import normal_specs
from labutil import connect, open_connection, ping, send_raw, tcp_syn, udp_send

from appliance.dataplane import api as dataplane
from appliance.errors import ConfigError, UnknownDeviceError, UnknownUmboxError
from lab import topology

pytestmark = pytest.mark.lab


def telnet_login(sock):
    sock.recv(100)
    sock.sendall(b"admin\n")
    sock.recv(100)
    sock.sendall(f"{topology.DEVICE_PASSWORD}\n".encode())
    assert b"welcome" in sock.recv(100)


def echo(sock, text: bytes) -> bytes:
    sock.sendall(text + b"\n")
    time.sleep(0.1)
    return sock.recv(1000)


def test_posture_change_keeps_established_connection(lab, fresh):
    cam = lab.device("camera1")
    inet = lab.namespaces["inet"]
    session = open_connection(inet, cam.ip, 23)
    try:
        telnet_login(session)
        assert b"before" in echo(session, b"before")
        id_before = fresh.device_id("camera1")
        counters_before = fresh.counters("camera1")["pass"]["packets"]
        # to the profile's suspicious posture: gate, rate limit, allow-list, tighter limits
        fresh.set_stack("camera1", __import__("appliance.policy.profiles", fromlist=["x"])
                        .load_all()["camera"].stack("suspicious"))
        assert b"after" in echo(session, b"after")        # the session survives
        assert fresh.device_id("camera1") == id_before
        assert fresh.counters("camera1")["pass"]["packets"] > counters_before  # not reset
        # ... while new connections meet the new posture: port 80 is now behind the gate
        from labutil import http
        assert http(inet, cam.ip)[0] == 401
        assert not connect(cam.namespace, "198.19.9.1", 80)   # allow-list now enforced
    finally:
        session.close()


def test_posture_change_applies_to_the_next_packet(lab, fresh):
    cam = lab.device("camera1")
    for _ in range(5):
        fresh.set_stack("camera1", {"quarantine": {}})
        assert ping(cam.namespace, "198.19.8.1", wait=0.5) == 0
        fresh.set_stack("camera1", {"anti_spoof": {}})
        assert ping(cam.namespace, "198.19.8.1") == 1


def test_quarantine_or_flood_does_not_disturb_the_others(lab, fresh):
    cam, light = lab.device("camera1"), lab.device("light1")
    fresh.set_stack("camera1", {"quarantine": {}, "syn_flood": {"syns": 50}})
    stop = threading.Event()

    def flood():
        while not stop.is_set():
            send_raw(lab.namespaces["atk"], [tcp_syn(topology.ATTACKER_IP, cam.ip, 1024 + i, 80)
                                             for i in range(500)])
            udp_send(cam.namespace, "198.19.8.1", 9, 500)

    t = threading.Thread(target=flood)
    t.start()
    try:
        replies = ping(lab.namespaces["inet"], light.ip, count=20, interval=0.05)
        # port 23: the light counts connections to port 80 as login attempts
        reached = [connect(lab.namespaces["inet"], light.ip, 23) for _ in range(10)]
    finally:
        stop.set()
        t.join()
    assert replies == 20 and all(reached)
    assert fresh.counters("camera1")["quarantine"]["packets"] > 500
    assert "quarantine" not in fresh.counters("light1")


@pytest.mark.parametrize("stack, culprit, error", [
    ({"allowlist": {"destinations": ["198.19.8.0/33"]}}, "198.19.8.0/33", ConfigError),
    ({"allowlist": {"destinations": ["198.19.8.1/24"]}}, "198.19.8.1/24", ConfigError),
    ({"rate_limit": {"packets_per_second": -5}}, "packets_per_second", ConfigError),
    ({"rate_limit": {"packets_per_second": "fast"}}, "packets_per_second", ConfigError),
    ({"teleport": {}}, "teleport", UnknownUmboxError),
    ({"port_scan": {"prots": 3}}, "prots", ConfigError),
    ({"brute_force": {"ports": [22, 70000]}}, "70000", ConfigError),
    ({"conn_limit": {}}, "conn_limit", ConfigError),
])
def test_bad_parameters_are_refused_and_change_nothing(lab, fresh, stack, culprit, error):
    device_id = fresh.device_id("camera1")
    entry = bytes(fresh._maps["kalki_devices"].lookup(ctypes.c_uint32(device_id)))
    nft_before = fresh._nft.read_back()
    with pytest.raises(error) as e:
        fresh.set_stack("camera1", {"anti_spoof": {}, **stack})
    assert culprit in str(e.value) and "camera1" in str(e.value)
    assert bytes(fresh._maps["kalki_devices"].lookup(ctypes.c_uint32(device_id))) == entry
    assert fresh._nft.read_back() == nft_before
    assert fresh.counters("camera1") is not None


def test_unknown_device_and_bad_identity_are_refused(lab, fresh):
    with pytest.raises(UnknownDeviceError, match="toaster"):
        fresh.set_stack("toaster", {"quarantine": {}})
    with pytest.raises(UnknownDeviceError, match="toaster"):
        fresh.counters("toaster")
    with pytest.raises(ConfigError, match="MAC"):
        fresh.apply(dataplane.DeviceSpec("new1", "02:00:00:zz:00:01", "198.18.1.1", {}))
    with pytest.raises(ConfigError, match="address"):
        fresh.apply(dataplane.DeviceSpec("new1", "02:00:00:00:00:01", "198.18.1.300", {}))
    with pytest.raises(ConfigError, match="camera1"):   # somebody else's MAC
        fresh.apply(dataplane.DeviceSpec("new1", lab.device("camera1").mac, "198.18.1.1", {}))
    with pytest.raises(ConfigError, match="duration"):
        fresh.block_source("198.19.0.66", -1)
    assert "new1" not in fresh.devices


SUPERVISOR = textwrap.dedent("""
    import sys, time
    from appliance.dataplane import api as dataplane
    from lab import topology
    from conftest import normal_specs
    lab = topology.load(sys.argv[1])
    dp = dataplane.Dataplane.open(lab.name, lab.namespaces["gw"], topology.gateway_settings(lab))
    specs = normal_specs(lab)
    specs[0].stack = {"quarantine": {}}
    dp.reconcile(specs)
    print("ready", flush=True)
    time.sleep(60)
""")


def test_sigkill_leaves_enforcement_and_a_new_process_reconciles(lab, fresh, tmp_path):
    cam, light = lab.device("camera1"), lab.device("light1")
    script = tmp_path / "supervisor.py"
    script.write_text(SUPERVISOR)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.path.dirname(__file__)])}
    proc = subprocess.Popen([sys.executable, str(script), lab.name], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        # a steady flow to a permitted device across the kill and the restart
        pinger = subprocess.Popen(["ip", "netns", "exec", lab.namespaces["inet"], "ping", "-n",
                                   "-q", "-c", "60", "-i", "0.02", light.ip],
                                  stdout=subprocess.PIPE, text=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert ping(cam.namespace, "198.19.8.1", wait=0.5) == 0     # still quarantined
        wanted = normal_specs(lab)
        wanted[0].stack = {"quarantine": {}}
        with dataplane.Dataplane.open(lab.name, lab.namespaces["gw"],
                                      topology.gateway_settings(lab)) as again:
            report = again.reconcile(wanted)
            assert report["fixed"] == [] and report["added"] == [] and report["reattached"] == []
            assert sorted(report["unchanged"]) == sorted(d.name for d in lab.devices)
        out, _ = pinger.communicate(timeout=30)
        assert " 0% packet loss" in out, out
    finally:
        proc.kill()
        fresh.apply(normal_specs(lab)[0])


def test_reconcile_repairs_what_was_tampered_with(lab, fresh):
    cam, plug = lab.device("camera1"), lab.device("plug1")
    gw = lab.namespaces["gw"]
    plug_id = fresh.device_id("plug1")
    # somebody detaches XDP, deletes a device entry and the plug's gate element
    subprocess.run(["ip", "-n", gw, "link", "set", "dev", "up0", "xdp", "off"], check=True)
    fresh._maps["kalki_devices"].delete(ctypes.c_uint32(fresh.device_id("camera1")))
    subprocess.run(["ip", "netns", "exec", gw, "nft", "delete", "element", "inet", "kalki", "gate",
                    f"{{ {plug.ip} . 80 }}"], check=True)
    stray = dataplane.DeviceSpec("stray", "02:00:00:00:99:99", "198.18.9.9", {"anti_spoof": {}})
    fresh.apply(stray)
    report = fresh.reconcile(normal_specs(lab))
    assert report["reattached"] == ["up0"]
    assert sorted(report["fixed"]) == ["camera1", "plug1"]
    assert len(report["removed"]) == 1 and "stray" not in fresh.devices
    attached, pinned = fresh.attached_programs(), fresh.pinned_program_ids()
    assert attached == pinned
    assert fresh.reconcile(normal_specs(lab))["unchanged"] == [d.name for d in lab.devices]
    assert fresh.device_id("plug1") == plug_id
    assert ping(cam.namespace, "198.19.8.1") == 1
    assert fresh._nft.read_back()[plug_id]["gates"] == [(plug.ip, 80)]


@pytest.mark.parametrize("batches", [True, False], ids=["batch lookup", "entry by entry"])
def test_drift_names_a_device_whose_xdp_entry_was_changed(lab, fresh, monkeypatch, batches):
    """The tamper watch reads every XDP entry in one call, or one by one where the kernel has
    no batch lookups: either way a posture rewritten behind its back is named."""
    from appliance.dataplane import bpf
    monkeypatch.setattr(dataplane, "READ_ONE_BY_ONE", 0)    # (4 devices: a batch all the same)
    if not batches:     # a command number no kernel has: EINVAL, as from one without batches
        monkeypatch.setattr(bpf, "BPF_MAP_LOOKUP_BATCH", 9999)
    assert fresh.drift() == []
    key = ctypes.c_uint32(fresh.device_id("plug1"))
    entry = fresh._maps["kalki_devices"].lookup(key)
    entry.posture += 1
    fresh._maps["kalki_devices"].update(key, entry)
    try:
        assert fresh.drift() == ["XDP entries changed for plug1"]
    finally:
        fresh.reconcile(normal_specs(lab))
    assert fresh.drift() == []


def _mac_slot_of(dp, mac):
    """The kalki_mac_slots index holding the MAC, or None."""
    first = dataplane.mac_pair(mac, dp.max_devices)
    for i in (first, first + 1):
        slot = dp._maps["kalki_mac_slots"].lookup(ctypes.c_uint32(i))
        if slot is not None and dataplane._mac_str(slot.addr) == mac:
            return i
    return None


def _macs_sharing_the_pair_of(mac, dp, count):
    """`count` made-up MACs whose kalki_mac_slots pair is the MAC's."""
    want, out, n = dataplane.mac_pair(mac, dp.max_devices), [], 0
    while len(out) < count:
        n += 1
        candidate = f"02:aa:{n >> 24 & 255:02x}:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}"
        if dataplane.mac_pair(candidate, dp.max_devices) == want:
            out.append(candidate)
    return out


def test_a_device_is_found_by_its_mac_slot_without_the_hash_map(lab, fresh):
    """The kernel finds the plug in the slot user space chose for it (the two agree on the
    MAC's pair), without kalki_dev_by_mac: its entry deleted behind the data path's back."""
    plug = lab.device("plug1")
    assert _mac_slot_of(fresh, plug.mac) is not None
    fresh._maps["kalki_dev_by_mac"].delete(dataplane._mac_key(plug.mac))
    try:
        before = fresh.counters("plug1").get("pass", {}).get("packets", 0)
        assert ping(plug.namespace, "198.19.8.1") == 1
        assert fresh.counters("plug1")["pass"]["packets"] > before
    finally:
        fresh.reconcile(normal_specs(lab))
    # Reconcile gave the plug a new id, and removed the old one's entry without taking the
    # plug's address index with it: a block of its address still finds it.
    by_ip = fresh._maps["kalki_dev_by_ip"].lookup(ctypes.c_uint32(dataplane._ip_be(plug.ip)))
    assert by_ip is not None and by_ip.value == fresh.device_id("plug1")
    fresh.block_source(plug.ip, 60)
    try:
        assert ping(plug.namespace, "198.19.8.1", wait=0.5) == 0
    finally:
        fresh.unblock_source(plug.ip)


def test_reconcile_takes_away_the_address_index_a_device_no_longer_has(lab, fresh):
    """The plug's entry says another address, whose index names it (as after a crash between
    an address change's writes): reconcile writes the plug's own and removes that one, which
    would otherwise make unblocking that address clear the plug's drop-set mark."""
    plug_id = fresh.device_id("plug1")
    key, other = ctypes.c_uint32(plug_id), ctypes.c_uint32(dataplane._ip_be("198.18.200.99"))
    entry = fresh._maps["kalki_devices"].lookup(key)
    entry.ipv4 = other.value
    fresh._maps["kalki_devices"].update(key, entry)
    fresh._maps["kalki_dev_by_ip"].update(other, key)
    assert "plug1" in fresh.reconcile(normal_specs(lab))["fixed"]
    assert fresh._maps["kalki_dev_by_ip"].lookup(other) is None
    assert fresh._maps["kalki_devices"].lookup(key).ipv4 == dataplane._ip_be(lab.device("plug1").ip)


def test_a_device_whose_mac_pair_is_full_is_found_in_the_hash_map(lab, fresh):
    """Two devices took the plug's pair of slots first: the plug is found in kalki_dev_by_mac,
    which is no drift, and takes a slot once one is free."""
    plug = lab.device("plug1")
    spec = fresh.devices["plug1"]
    others = [dataplane.DeviceSpec(f"pair{i}", mac, f"198.18.200.{10 + i}", {"anti_spoof": {}})
              for i, mac in enumerate(_macs_sharing_the_pair_of(plug.mac, fresh, 2))]
    fresh.remove("plug1")
    try:
        for o in others:
            fresh.apply(o)
        fresh.apply(spec)
        assert _mac_slot_of(fresh, plug.mac) is None
        assert all(_mac_slot_of(fresh, o.mac) is not None for o in others)
        assert ping(plug.namespace, "198.19.8.1") == 1
        fresh._slots_checked_at = -1e9      # (the slots are read at the next look)
        assert fresh.drift() == []
    finally:
        for o in others:
            if o.name in fresh.devices:
                fresh.remove(o.name)
    fresh.reconcile(normal_specs(lab))
    assert _mac_slot_of(fresh, plug.mac) is not None
    assert all(_mac_slot_of(fresh, o.mac) is None for o in others)


def test_a_mac_slot_written_behind_the_data_paths_back_is_named_and_cleared(lab, fresh, monkeypatch):
    """A slot that gives a stranger's MAC a device's id would let the stranger through as that
    device: the tamper watch names it (it reads the slots every MAC_SLOTS_CHECK_SECONDS), and
    reconcile clears it."""
    monkeypatch.setattr(dataplane, "MAC_SLOTS_CHECK_SECONDS", 0)
    stranger = "02:bb:00:00:00:01"
    first = dataplane.mac_pair(stranger, fresh.max_devices)
    free = next(i for i in (first, first + 1)
                if fresh._maps["kalki_mac_slots"].lookup(ctypes.c_uint32(i)) is None)
    forged = dataplane.maps.MacSlot(addr=dataplane._mac_key(stranger).addr,
                                    device=fresh.device_id("camera1"))
    fresh._maps["kalki_mac_slots"].update(ctypes.c_uint32(free), forged)
    try:
        assert fresh.drift() == [f"kalki_mac_slots changed: slot {free} ({stranger} -> device id "
                                 f"{fresh.device_id('camera1')})"]
    finally:
        fresh.reconcile(normal_specs(lab))
    assert fresh._maps["kalki_mac_slots"].lookup(ctypes.c_uint32(free)) is None
    assert fresh.drift() == []


@pytest.mark.parametrize("in_batch", [False, True], ids=["alone", "in a batch"])
def test_attackers_pass_xdp_to_a_decoy_only_once_nftables_redirects_them(lab, fresh, monkeypatch,
                                                                          in_batch):
    """Deception lets a drop-set source's packets through XDP for nftables to send to the decoy.
    While the transaction that puts the camera in `deceive` has not committed, nftables would
    forward them to the camera itself: its XDP entry is quarantine without deception until then."""
    from appliance.dataplane import maps
    from appliance.policy import profiles
    key = ctypes.c_uint32(fresh.device_id("camera1"))
    nf = fresh._loaded_nft()
    real_run, flags_then = nf.run, []

    def run(commands, what):
        if any("deceive" in json.dumps(c) for c in commands):
            flags_then.append(fresh._maps["kalki_devices"].lookup(key).flags)
        return real_run(commands, what)

    monkeypatch.setattr(nf, "run", run)
    attack = profiles.load_all()["camera"].stack("attack")
    if in_batch:
        with fresh.batch():
            fresh.set_stack("camera1", attack)
    else:
        fresh.set_stack("camera1", attack)
    assert len(flags_then) == 1
    assert flags_then[0] & maps.Flag.QUARANTINE and not flags_then[0] & maps.Flag.DECEPTION
    assert fresh._maps["kalki_devices"].lookup(key).flags & maps.Flag.DECEPTION
    assert bytes(fresh._maps["kalki_devices"].lookup(key)) == bytes(fresh._applied("camera1").entry)


def test_a_batch_that_changes_a_device_twice_is_refused_by_name_and_changes_nothing(lab, fresh):
    """nftables cannot take two plans for one device in one transaction (the deletions of both go
    first): the second is refused naming the device, and the batch is put back whole."""
    from appliance.policy import profiles
    camera = profiles.load_all()["camera"]
    key = ctypes.c_uint32(fresh.device_id("camera1"))
    entry, table = bytes(fresh._maps["kalki_devices"].lookup(key)), fresh._nft.read_back()
    with pytest.raises(ConfigError, match="device camera1: changed twice in one batch"):
        with fresh.batch():
            fresh.set_stack("camera1", camera.stack("attack"))
            fresh.set_stack("camera1", camera.stack("suspicious"))
    assert bytes(fresh._maps["kalki_devices"].lookup(key)) == entry
    assert fresh._nft.read_back() == table
    assert fresh.drift() == []


def test_a_batch_is_one_nftables_transaction_and_all_or_nothing(lab, fresh, monkeypatch):
    """A rule that moves several devices at once: XDP entries at once, one nft transaction."""
    from labutil import http

    from appliance.errors import DataplaneError
    names = ["camera1", "plug1", "light1"]
    gated = {"anti_spoof": {}, "auth_gate": {"port": 80}, "conn_limit": {"concurrent": 7}}
    runs, sent = [], []
    real_run = fresh._nft.run
    monkeypatch.setattr(fresh._nft, "run",
                        lambda cmds, what: runs.append(what) or sent.append(cmds) or real_run(cmds, what))
    with fresh.batch():
        for name in names:
            fresh.set_stack(name, gated)
    assert len(runs) == 1
    # one command per set and operation, whatever the number of devices (nft.merged)
    element_ops = [(op, body["element"]["name"]) for c in sent[0] for op, body in c.items()
                   if "element" in body]
    assert len(element_ops) == len(set(element_ops)), element_ops
    gate_adds = [body["element"]["elem"] for c in sent[0] for op, body in c.items()
                 if op == "add" and body.get("element", {}).get("name") == "gate"]
    assert len(gate_adds) == 1 and len(gate_adds[0]) >= 2, gate_adds    # (one may be gated already)
    for name in names:
        assert http(lab.namespaces["inet"], lab.device(name).ip)[0] == 401   # behind the gate
    # nftables refuses: every device of the batch is put back as it was
    entries = {n: bytes(fresh._maps["kalki_devices"].lookup(ctypes.c_uint32(fresh.device_id(n))))
               for n in names}

    def refuse(cmds, what):
        raise DataplaneError("refused on purpose")
    monkeypatch.setattr(fresh._nft, "run", refuse)
    with pytest.raises(DataplaneError, match="on purpose"), fresh.batch():
        for name in names:
            fresh.set_stack(name, {"anti_spoof": {}, "conn_limit": {"concurrent": 3}})
    monkeypatch.setattr(fresh._nft, "run", real_run)
    for n in names:
        assert bytes(fresh._maps["kalki_devices"].lookup(
            ctypes.c_uint32(fresh.device_id(n)))) == entries[n]
    assert http(lab.namespaces["inet"], lab.device("camera1").ip)[0] == 401
    assert all(fresh.devices[n].stack == gated for n in names)      # its own view put back too

    # A device of the batch is refused before nftables is even asked (an address that belongs
    # to another device): the ones already written, quarantine included, are put back too.
    clash = lab.device("light1")
    with pytest.raises(ConfigError, match="already belongs"), fresh.batch():
        fresh.set_stack("camera1", {"quarantine": {}})
        fresh.set_stack("plug1", {"anti_spoof": {}})
        fresh.apply(dataplane.DeviceSpec("plug1", lab.device("plug1").mac, clash.ip,
                                         {"anti_spoof": {}}))
    for n in names:
        assert bytes(fresh._maps["kalki_devices"].lookup(
            ctypes.c_uint32(fresh.device_id(n)))) == entries[n]
        assert fresh.devices[n].stack == gated
    assert fresh._nft.read_back()[fresh.device_id("camera1")]["gates"] == [(lab.device("camera1").ip, 80)]


def test_a_posture_change_sends_nftables_only_what_differs(lab, fresh, monkeypatch):
    """A device is elements in sets, never a chain or rule of its own: a posture change adds
    and deletes only the elements that differ (issue 13: a cost flat in the table's size)."""
    sent = []
    real_run = fresh._nft.run
    monkeypatch.setattr(fresh._nft, "run", lambda cmds, what: sent.append(cmds) or real_run(cmds, what))
    light = lab.device("light1")
    fresh.set_stack("light1", {"anti_spoof": {}, "auth_gate": {"port": 80}, "conn_limit": {"concurrent": 7}})
    sent.clear()
    fresh.set_stack("light1", {"anti_spoof": {}, "auth_gate": {"port": 80}, "conn_limit": {"concurrent": 3}})
    ops = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in sent[0]]
    # the class cl_3 is new to the table: its sets and its one rule come first, once
    assert ops[:3] == [("add", "set"), ("add", "set"), ("add", "rule")], ops
    assert ops[3:] == [("delete", "element"), ("add", "element")], ops
    state = fresh._nft.read_back()[fresh.device_id("light1")]
    assert state["gates"] == [(light.ip, 80)] and state["macs"] == [light.mac]
    assert state["classes"] == [("cl_3", light.ip)]
    sent.clear()      # back to 7: the class is there already, so two elements and nothing else
    fresh.set_stack("light1", {"anti_spoof": {}, "auth_gate": {"port": 80}, "conn_limit": {"concurrent": 7}})
    ops = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in sent[0]]
    assert ops == [("delete", "element"), ("add", "element")], ops
    sent.clear()      # and to no gate and no limit: those elements go, nothing else
    fresh.set_stack("light1", {"anti_spoof": {}})
    ops = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in sent[0]]
    assert ops == [("delete", "element")] * 2, ops
    state = fresh._nft.read_back()[fresh.device_id("light1")]
    assert state["gates"] == [] and state["classes"] == [] and state["ips"] == [light.ip]


def _table_sets(lab) -> set[str]:
    out = subprocess.run(["ip", "netns", "exec", lab.namespaces["gw"], "nft", "-j", "list", "sets",
                          "inet"], capture_output=True, text=True, check=True).stdout
    import json
    return {i["set"]["name"] for i in json.loads(out)["nftables"]
            if "set" in i and i["set"]["table"] == "kalki"}


def test_classes_made_ahead_leave_a_posture_change_only_its_elements(lab, fresh, monkeypatch):
    """The first device moved to a posture with a new connection limit used to make the class
    on its way (two sets and a rule: tens of milliseconds, bench_supervisor's worst MQTT
    trigger). prepare() makes it before, and a table made anew gets it again."""
    odd = {"anti_spoof": {}, "conn_limit": {"concurrent": 4241, "new_per_second": 4243}}
    assert {"cl_4241", "rl_4243"}.isdisjoint(_table_sets(lab))
    assert sorted(fresh.prepare([odd, {"quarantine": {}}, {"conn_limit": "not a limit"}])) == \
        ["cl_4241", "rl_4243"]
    assert {"cl_4241", "cl_4241_meter", "rl_4243", "rl_4243_meter"} <= _table_sets(lab)
    assert fresh.prepare([odd]) == []           # made once
    sent = []
    real_run = fresh._nft.run
    monkeypatch.setattr(fresh._nft, "run", lambda cmds, what: sent.append(cmds) or real_run(cmds, what))
    fresh.set_stack("plug1", odd)
    ops = {(next(iter(c)), next(iter(next(iter(c.values()))))) for cmds in sent for c in cmds}
    assert ops <= {("add", "element"), ("delete", "element")}, ops
    state = fresh._nft.read_back()[fresh.device_id("plug1")]
    assert sorted(state["classes"]) == [("cl_4241", lab.device("plug1").ip),
                                        ("rl_4243", lab.device("plug1").ip)]
    # the table goes behind the data path's back: restore makes it anew, classes made ahead too
    subprocess.run(["ip", "netns", "exec", lab.namespaces["gw"], "nft", "delete", "table", "inet",
                    "kalki"], check=True)
    monkeypatch.undo()
    report = fresh.restore(normal_specs(lab))
    assert {"cl_4241", "rl_4243"} <= _table_sets(lab)
    assert {"cl_4241", "rl_4243"} <= set(report["classes"])
    assert fresh.drift() == []


def test_a_batch_whose_plan_fails_leaves_the_device_as_it_was(lab, fresh, monkeypatch):
    """In a batch, nftables' part is planned after the XDP entry is written; a plan that
    fails (it may read the table's classes) puts the entry back before the batch unwinds."""
    from appliance.errors import DataplaneError
    before = fresh.read_back("plug1")
    spec = fresh.devices["plug1"]

    def refuse(*args, **kwargs):
        raise DataplaneError("nftables refused reading the sets of inet kalki: test")
    monkeypatch.setattr(fresh._nft, "plan", refuse)
    with pytest.raises(DataplaneError, match="test"):
        with fresh.batch():
            fresh.apply(dataclasses.replace(spec, stack={"quarantine": {}}, posture=4))
    monkeypatch.undo()
    assert fresh.read_back("plug1") == before and fresh.devices["plug1"] == spec
    fresh.set_stack("plug1", {"quarantine": {}}, 4)     # and the next change is whole
    assert fresh.read_back("plug1") == 4


def test_postures_read_back_in_one_batch_are_what_the_kernel_holds(lab, fresh, monkeypatch):
    names = [d.name for d in lab.devices]
    one_by_one = {n: fresh.read_back(n) for n in names}
    assert fresh.read_back_all(names) == one_by_one     # 4 devices: a lookup each
    monkeypatch.setattr(dataplane, "READ_ONE_BY_ONE", 0)
    reads = []
    real = fresh._maps["kalki_devices"].values_from
    monkeypatch.setattr(fresh._maps["kalki_devices"], "values_from",
                        lambda first, count: reads.append((first, count)) or real(first, count))
    assert fresh.read_back_all(names) == one_by_one     # the batch read, lowest id to highest
    ids = sorted(fresh.device_id(n) for n in names)
    assert reads == [(ids[0], ids[-1] - ids[0] + 1)]
    with monkeypatch.context() as m:     # ids too far apart: lookups
        m.setattr(dataplane, "SLOTS_PER_LOOKUP", 0)
        assert fresh.read_back_all(names) == one_by_one and len(reads) == 1
    from appliance.dataplane import bpf
    with monkeypatch.context() as m:     # a kernel without batch lookups: lookups
        m.setattr(bpf, "BPF_MAP_LOOKUP_BATCH", 9999)
        assert fresh.read_back_all(names) == one_by_one
    # a slot changed behind the data path's back: the batch reads the kernel, not a copy
    devices = fresh._maps["kalki_devices"]
    key = ctypes.c_uint32(fresh.device_id("plug1"))
    entry = devices.lookup(key)
    entry.posture = 4
    devices.update(key, entry)
    try:
        assert fresh.read_back_all(names)["plug1"] == 4 == fresh.read_back("plug1")
    finally:
        fresh.reconcile(normal_specs(lab))
    assert fresh.read_back_all(names) == one_by_one


def test_an_element_someone_else_put_in_a_device_set_goes_at_reconcile(lab, fresh):
    gw = lab.namespaces["gw"]
    subprocess.run(["ip", "netns", "exec", gw, "nft", "add", "element", "inet", "kalki", "macs",
                    "{ 02:de:ad:be:ef:01 }"], check=True)
    assert fresh._nft.read_back()[-1]["macs"] == ["02:de:ad:be:ef:01"]
    assert any("changed" in p for p in fresh.drift())
    report = fresh.restore(normal_specs(lab))
    assert report["stale_nft"] == [-1]
    assert -1 not in fresh._nft.read_back() and fresh.drift() == []


def _listings(monkeypatch):
    """Counts the tamper watch's listings of the table."""
    from appliance.dataplane import nft
    calls = []
    real = nft.Nft.fingerprint
    monkeypatch.setattr(nft.Nft, "fingerprint", lambda self: calls.append(1) or real(self))
    return calls


def test_the_tamper_watch_lists_the_table_only_after_somebody_else_commits(lab, fresh, monkeypatch):
    gw = lab.namespaces["gw"]
    listings = _listings(monkeypatch)
    assert fresh.drift() == []       # a look, which the table passes: trusted from here
    looked = len(listings)
    for posture in ("suspicious", "normal"):     # our own transactions keep the trust
        fresh.apply(normal_specs(lab, posture)[0])
    assert fresh.drift() == [] and len(listings) == looked
    # somebody else commits, even to another table: the next look lists ours again
    subprocess.run(["ip", "netns", "exec", gw, "nft", "add", "table", "inet", "someone"], check=True)
    try:
        assert fresh.drift() == [] and len(listings) == looked + 1
        assert fresh.drift() == [] and len(listings) == looked + 1
        # a commit by somebody else just before one of ours is not taken for ours
        subprocess.run(["ip", "netns", "exec", gw, "nft", "delete", "element", "inet", "kalki",
                        "ips", f"{{ {lab.device('plug1').ip} }}"], check=True)
        fresh.apply(normal_specs(lab, "suspicious")[0])
        assert any("changed" in p for p in fresh.drift()), "the deleted element went unseen"
        assert len(listings) == looked + 2
    finally:
        subprocess.run(["ip", "netns", "exec", gw, "nft", "delete", "table", "inet", "someone"], check=True)
        fresh.restore(normal_specs(lab))
    assert fresh.drift() == []


def test_a_transaction_of_ours_that_deletes_is_counted_and_one_of_adds_is_read(lab, fresh, monkeypatch):
    """A posture change (it always deletes something, so it moved nftables' generation by
    exactly one) does not ask for the generation, 80 us after an idle loop: the watch's next
    look compares it with the transactions counted. A transaction of adds alone may have
    changed nothing, and the generation is asked right after it, so that a commit of
    somebody else's after it is not taken for ours."""
    nf = fresh._nft
    gw = lab.namespaces["gw"]
    listings = _listings(monkeypatch)
    assert fresh.drift() == []
    looked = len(listings)
    reads = []
    real_read = nf._generation.read
    monkeypatch.setattr(nf._generation, "read", lambda: reads.append(1) or real_read())
    for posture in ("suspicious", "normal"):
        fresh.apply(normal_specs(lab, posture)[0])
    assert reads == []
    assert fresh.drift() == [] and len(listings) == looked and len(reads) == 1
    # an add of what is there already commits nothing, and says so at once: still trusted
    cam = lab.device("camera1")
    held = [{"add": {"element": {"family": "inet", "table": "kalki", "name": "macs", "elem": [
        {"elem": {"val": cam.mac, "comment": str(fresh.device_id("camera1"))}}]}}}]
    nf.run(held, "an element the table holds")
    assert len(reads) == 2
    assert fresh.drift() == [] and len(listings) == looked
    # the same, then somebody else deletes an element: seen at the next look
    nf.run(held, "an element the table holds")
    plug = lab.device("plug1")
    subprocess.run(["ip", "netns", "exec", gw, "nft", "delete", "element", "inet", "kalki",
                    "ips", f"{{ {plug.ip} }}"], check=True)
    try:
        assert any("changed" in p for p in fresh.drift()), "the deleted element went unseen"
        assert len(listings) == looked + 1
    finally:
        fresh.restore(normal_specs(lab))
    assert fresh.drift() == []


def test_the_tamper_watch_lists_the_table_once_a_minute_anyway(lab, fresh, monkeypatch):
    from appliance.dataplane import nft
    listings = _listings(monkeypatch)
    assert fresh.drift() == []
    looked = len(listings)
    monkeypatch.setattr(nft, "FULL_LOOK_SECONDS", 0.0)
    assert fresh.drift() == [] and len(listings) == looked + 1


def test_quarantine_holds_in_nftables_alone_and_keeps_what_restricts(lab, fresh):
    """A camera moved as a kernel event moves it (its profile's attack posture: quarantine with
    deception): nftables' part is three element commands, out of `macs` and `ips` and into
    `deceive`; its lateral and connection-limit elements stay, since they only restrict it.
    With every XDP program detached nothing is forwarded to or from it; back to normal, it is
    forwarded again, and a device removed leaves no element behind."""
    from appliance.dataplane import nft as nftmod
    from appliance.policy import profiles
    cam = lab.device("camera1")
    gw, inet = lab.namespaces["gw"], lab.namespaces["inet"]
    cam_id, nf = fresh.device_id("camera1"), fresh._nft
    normal = nf.read_back()[cam_id]
    assert normal["macs"] == [cam.mac] and normal["lateral"] == [cam.mac] and normal["classes"]
    plan = nf.plan(cam_id, cam.mac, cam.ip, None, None, normal, quarantine=True, deception=True)
    assert plan is not None
    ops = sorted((op, body["element"]["name"]) for c in plan[0] for op, body in c.items())
    assert ops == [("add", "deceive"), ("delete", "ips"), ("delete", "macs")]
    # elements of an old address or mac are not kept: they would restrict somebody else
    moved = nf.plan(cam_id, cam.mac, "198.18.9.9", None, None, normal, quarantine=True)
    assert moved is not None and moved[1]["classes"] == [] and moved[1]["lateral"] == [cam.mac]

    fresh.set_stack("camera1", profiles.load_all()["camera"].stack("attack"))
    held = nf.read_back()[cam_id]
    assert held == {**nftmod.empty_state(), "deceive": [cam.ip], "lateral": [cam.mac],
                    "classes": normal["classes"]}
    assert fresh.drift() == []
    detached = list(fresh.attached_programs())
    try:
        for ifname in detached:
            subprocess.run(["ip", "-n", gw, "link", "set", "dev", ifname, "xdp", "off"], check=True)
        assert not any(fresh.attached_programs().values())
        assert ping(cam.namespace, "198.19.8.1") == 0
        assert not connect(inet, cam.ip, 80)
        assert connect(inet, lab.device("light1").ip, 80)    # nftables forwards the others
    finally:
        assert fresh.reconcile(normal_specs(lab, "attack"))["reattached"]
    fresh.apply(normal_specs(lab)[0])
    assert ping(cam.namespace, "198.19.8.1") == 1
    assert nf.read_back()[cam_id] == normal
    fresh.remove("camera1")
    try:
        assert cam_id not in nf.read_back()
    finally:
        fresh.apply(normal_specs(lab)[0])


def test_the_xdp_programs_read_over_netlink_are_what_ip_shows(lab, fresh):
    """Dataplane._links asks rtnetlink for each interface XDP belongs on (dataplane.links),
    not `ip -j link show`: the same ids, None once detached, and an interface that is not
    there left out, which the tamper watch names."""
    import json as json_

    from appliance.dataplane import links
    gw = lab.namespaces["gw"]

    def shown() -> dict:
        out = subprocess.run(["ip", "-j", "-n", gw, "link", "show"], capture_output=True,
                             text=True, check=True).stdout
        return {x["ifname"]: x.get("xdp", {}).get("prog", {}).get("id") for x in json_.loads(out)}

    wanted = list(fresh.attached_programs())
    assert wanted and all(fresh.attached_programs().values())
    assert fresh.attached_programs() == {i: shown()[i] for i in wanted}
    probe = links.XdpLinks(gw)
    try:
        assert probe.programs([*wanted, "nosuch0"]) == {i: shown()[i] for i in wanted}
        subprocess.run(["ip", "-n", gw, "link", "set", "dev", wanted[0], "xdp", "off"], check=True)
        assert probe.programs(wanted)[wanted[0]] is None and shown()[wanted[0]] is None
        subprocess.run(["ip", "-n", gw, "link", "set", "dev", wanted[0], "down"], check=True)
        subprocess.run(["ip", "-n", gw, "link", "set", "dev", wanted[0], "name", "gone0"], check=True)
        assert wanted[0] not in probe.programs(wanted)
        assert any(f"interface {wanted[0]} is missing" in p for p in fresh.drift())
    finally:
        subprocess.run(["ip", "-n", gw, "link", "set", "dev", "gone0", "name", wanted[0]],
                       capture_output=True)
        subprocess.run(["ip", "-n", gw, "link", "set", "dev", wanted[0], "up"], check=True)
        probe.close()
        probe.close()       # twice: nothing happens
        assert fresh.reconcile(normal_specs(lab))["reattached"] == [wanted[0]]
    assert fresh.drift() == []


def test_an_rtm_newlink_body_says_which_xdp_program():
    import struct as struct_

    from appliance.dataplane import links
    head = struct_.pack("=BxHiII", 0, 1, 7, 0, 0)

    def attr(kind, value):
        out = struct_.pack("=HH", 4 + len(value), kind) + value
        return out + bytes(-len(out) % 4)
    name = attr(links.IFLA_IFNAME, b"dev0\0")
    xdp = attr(links.IFLA_XDP | 0x8000, attr(links.IFLA_XDP_ATTACHED, b"\x01")
               + attr(links.IFLA_XDP_PROG_ID, struct_.pack("=I", 1339)))
    none = attr(links.IFLA_XDP | 0x8000, attr(links.IFLA_XDP_ATTACHED, b"\x00"))
    assert links.xdp_program(head + name + xdp) == 1339
    assert links.xdp_program(head + name + none) is None
    assert links.xdp_program(head + name) is None
    assert links.xdp_program(head + attr(links.IFLA_XDP, b"\x02\x00")) is None    # cut short


def test_zz_a_restart_converges_with_the_table_but_without_the_maps(lab, dp):
    """The faults issue, 3: with the table present but the pinned maps out of sight (as under
    `ip netns exec`, which remounts /sys), `kalki run` exited with "nftables refused device
    light1: ... File exists", and under systemd's Restart= that is a crash loop. Last in the
    module: it replaces the data path the other tests share."""
    dp.close()
    dataplane.remove_pins(lab.name)           # the maps out of sight; programs and table stay
    again = dataplane.Dataplane.open(lab.name, lab.namespaces["gw"], topology.gateway_settings(lab))
    try:
        # in another order than the first time: the new ids are not the old chains' ids
        report = again.reconcile(normal_specs(lab)[::-1])
        assert sorted(report["added"]) == sorted(d.name for d in lab.devices)
        assert not again.drift()
        cam = lab.device("camera1")
        assert connect(lab.namespaces["inet"], cam.ip, 23)
        quarantined = [s for s in normal_specs(lab, "quarantine") if s.name == "camera1"][0]
        quarantined.posture = 4
        again.apply(quarantined)
        assert not connect(lab.namespaces["inet"], cam.ip, 23)
        # and once more from what this left: maps present, table deleted by hand
        subprocess.run(["ip", "netns", "exec", lab.namespaces["gw"], "nft", "delete", "table", "inet",
                        "kalki"], check=True)
        again.close()
        third = dataplane.Dataplane.open(lab.name, lab.namespaces["gw"], topology.gateway_settings(lab))
        try:
            third.reconcile(normal_specs(lab))
            assert not third.drift()
        finally:
            third.close()
    finally:
        again.close()


def test_pins_of_an_older_layout_are_replaced_and_their_postures_still_count(run_suffix):
    """An older version's pins (here: without kalki_name_allow) cannot be used as they are: the
    program is loaded anew (attaching replaces the old one in one step), the postures the old
    maps held still count as the kernel's at start, and reconcile converges."""
    from appliance.vocab import POSTURE_CODES
    name = f"o{run_suffix}old"
    state = topology.up(name, devices=2, services=False, protect=True)
    try:
        settings = topology.gateway_settings(state)
        cam = state.device("camera1")
        with dataplane.Dataplane.open(name, state.namespaces["gw"], settings) as old:
            held = {d.name: "quarantine" if d.name == "camera1" else "normal" for d in state.devices}
            old.reconcile([dataplane.DeviceSpec(d.name, d.mac, d.ip,
                                                {"quarantine": {}} if held[d.name] == "quarantine"
                                                else {"anti_spoof": {}}, POSTURE_CODES[held[d.name]])
                           for d in state.devices])
            old_ids = old.pinned_program_ids()
        os.unlink(f"/sys/fs/bpf/kalki/{name}/kalki_name_allow")
        with dataplane.Dataplane.open(name, state.namespaces["gw"], settings) as new:
            assert new.older_layout and "kalki_name_allow" in new.older_layout
            assert new.kernel_postures()[cam.mac] == POSTURE_CODES["quarantine"]
            assert new.pinned_program_ids() != old_ids
            assert new.attached_programs() == new.pinned_program_ids()
            specs = [dataplane.DeviceSpec(d.name, d.mac, d.ip, {"anti_spoof": {}}) for d in state.devices]
            new.reconcile(specs)
            assert new.drift() == []
        assert os.path.exists(f"/sys/fs/bpf/kalki/{name}/kalki_name_allow")
        assert not os.path.exists(f"/sys/fs/bpf/kalki/{name}-older")
        assert ping(state.namespaces["inet"], state.device("plug1").ip) == 1
    finally:
        topology.down(name)
        dataplane.remove_pins(name)


def test_a_table_of_the_older_layout_is_replaced_in_one_step(run_suffix):
    """Up to stop 17 each device had a chain pair and entries in verdict maps. A supervisor of
    this version meets such a table after an upgrade: it replaces it in one transaction (no
    moment without a table) and applies its devices as elements."""
    name = f"o{run_suffix}nft"
    state = topology.up(name, devices=2, services=False, protect=False)
    gw = state.namespaces["gw"]
    try:
        cam = state.device("camera1")
        old = textwrap.dedent(f"""
            table inet kalki {{
              map from_device {{ type ether_addr : verdict; }}
              map to_device {{ type ipv4_addr : verdict; }}
              chain dev0_in {{ }}
              chain dev0_out {{ }}
              chain forward {{ type filter hook forward priority 0; policy drop; }}
            }}
            add element inet kalki to_device {{ {cam.ip} : goto dev0_in }}
        """)
        subprocess.run(["ip", "netns", "exec", gw, "nft", "-f", "-"], input=old, text=True, check=True)
        dp = dataplane.Dataplane.open(name, gw, topology.gateway_settings(state))
        try:
            dp.reconcile(normal_specs(state))
            listing = subprocess.run(["ip", "netns", "exec", gw, "nft", "list", "table", "inet", "kalki"],
                                     capture_output=True, text=True, check=True).stdout
            assert "map from_device" not in listing and "dev0_in" not in listing
            assert f"{cam.ip} comment" in listing and "set macs" in listing
            assert not dp.drift()
            assert dp.read_back("camera1") is not None
        finally:
            dp.close()
    finally:
        topology.down(name)


def test_merged_keeps_every_element_and_puts_deletions_before_additions():
    from appliance.dataplane.nft import merged

    def elem(op, name, *values):
        return {op: {"element": {"family": "inet", "table": "kalki", "name": name, "elem": list(values)}}}
    new_set = {"add": {"set": {"family": "inet", "table": "kalki", "name": "cl_3", "type": "ipv4_addr"}}}
    commands = [elem("delete", "ips", "198.18.0.1"), elem("add", "gate", ["198.18.0.1", 80]), new_set,
                elem("add", "cl_3", "198.18.0.1"), elem("delete", "ips", "198.18.0.2"),
                elem("add", "gate", ["198.18.0.2", 80]), elem("add", "cl_3", "198.18.0.2")]
    assert merged(commands) == [new_set, elem("delete", "ips", "198.18.0.1", "198.18.0.2"),
                                elem("add", "gate", ["198.18.0.1", 80], ["198.18.0.2", 80]),
                                elem("add", "cl_3", "198.18.0.1", "198.18.0.2")]
    assert commands[0] == elem("delete", "ips", "198.18.0.1")      # the caller's commands untouched

