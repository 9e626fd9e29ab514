"""Deception (issue 15, item 1) in a lab with the supervisor: an attacker brute-forces the
camera's telnet from the internet host's side, the kernel's brute_force detector puts it in the
drop set, the camera goes to `attack` (quarantine + deception), and from then on whatever the
attacker tries, the right password included, meets the decoy on the gateway: the real camera
never sees another packet of it, and what it typed is evidence on the camera's alerts."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
from labutil import connect, wait_until

from appliance import client, netns
from lab import topology

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def dlab(run_suffix):
    name = f"d{run_suffix}dcy"
    state = topology.up(name, devices=5, supervisor=True)      # camera1 .. camera2
    try:
        yield state
    finally:
        topology.down(name)


def ask(lab, op, **args):
    return client.request(lab.gateway["socket"], op, **args)


def stats(device) -> dict:
    """The emulated device's own counters, read inside its namespace."""
    out = subprocess.run(["ip", "netns", "exec", device.namespace, "curl", "-s", "--max-time", "3",
                          "http://127.0.0.1/_lab/stats"], capture_output=True, text=True).stdout
    return json.loads(out)


def telnet_login(namespace: str, ip: str, user: str, password: str) -> bytes:
    """A telnet client's login: everything the other side said, IAC negotiation included."""
    said = b""
    with netns.entered(namespace), socket.create_connection((ip, 23), timeout=5) as s:
        s.settimeout(3)

        def read_until(*words: bytes) -> None:
            nonlocal said
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(w in said.lower() for w in words):
                try:
                    chunk = s.recv(4096)
                except TimeoutError:
                    break
                if not chunk:
                    break
                said += chunk
        read_until(b"login:", b"username")
        s.sendall(user.encode() + b"\r\n")
        read_until(b"password")
        s.sendall(password.encode() + b"\r\n")
        read_until(b"incorrect", b"welcome", b"$ ", b"# ")
    return said


def posture(lab, name):
    return {d["name"]: d["posture"] for d in ask(lab, "devices")}[name]


def test_an_attacker_that_brute_forces_then_logs_in_meets_only_the_decoy(dlab):
    cam = dlab.device("camera1")
    atk = dlab.namespaces["atk"]
    others = {d.name: posture(dlab, d.name) for d in dlab.devices if d.name != "camera1"}
    # the brute force: connection attempts to the login port, faster than the profile allows
    for _ in range(15):
        connect(atk, cam.ip, 23, timeout=0.3)
    assert wait_until(lambda: posture(dlab, "camera1") == "attack", 10), posture(dlab, "camera1")
    blocked = wait_until(lambda: [e for e in ask(dlab, "blocked_sources")
                                  if e["source"] == topology.ATTACKER_IP and e.get("decoy")], 10)
    assert blocked, ask(dlab, "blocked_sources")
    time.sleep(0.5)
    sessions = stats(cam)["telnet_sessions"]
    # the attacker "logs in" with the camera's real password: the decoy refuses it
    said = telnet_login(atk, cam.ip, "admin", topology.DEVICE_PASSWORD)
    assert b"incorrect" in said.lower(), said
    # and its other ports are closed to it
    assert not connect(atk, cam.ip, 554, timeout=0.5)
    # (a session right after the decoy took over may be reported on its own, and the next ones
    # are merged into one report within 30 s)
    evidence = wait_until(lambda: [a for a in ask(dlab, "alerts", limit=100)
                                   if a["type"] == "deception" and a["device"] == "camera1"
                                   and ["admin", topology.DEVICE_PASSWORD] in a["details"]["logins"]], 75)
    assert evidence, [a for a in ask(dlab, "alerts", limit=100) if a["type"] == "deception"]
    assert evidence[0]["details"]["service"] == "telnet"
    # the real camera never saw the attacker after it was blocked
    assert stats(cam)["telnet_sessions"] == sessions
    # nobody else was disturbed
    assert {d.name: posture(dlab, d.name) for d in dlab.devices if d.name != "camera1"} == others


@pytest.mark.skipif(not shutil.which("hydra"), reason="no hydra (scripts/setup.sh installs it)")
def test_hydra_guessing_telnet_passwords_finds_none_and_is_recorded(dlab, tmp_path):
    """The real tool: hydra guesses camera2's telnet password from the internet side, the right
    one last. The detector stops it early; every guess after that meets the decoy, so hydra
    finds nothing, the real camera never accepts a login, and the guesses are evidence."""
    cam = dlab.device("camera2")
    atk = dlab.namespaces["atk"]
    ask(dlab, "unblock_source", ip=topology.ATTACKER_IP)     # the test above blocked it
    others = {d.name: posture(dlab, d.name) for d in dlab.devices if d.name != "camera2"}
    guesses = [f"guess{i:02d}" for i in range(60)] + [topology.DEVICE_PASSWORD]
    (tmp_path / "passwords").write_text("\n".join(guesses) + "\n")
    log = tmp_path / "hydra.log"

    def decoy_saw() -> set[str]:
        """The passwords the decoy recorded for camera2 (reports merge for up to 30 s)."""
        return {pair[1] for a in ask(dlab, "alerts", limit=200)
                if a["type"] == "deception" and a["device"] == "camera2"
                for pair in a["details"]["logins"]}
    with log.open("w") as out:
        hydra = subprocess.Popen(["ip", "netns", "exec", atk, "hydra", "-I", "-t", "4", "-w", "5",
                                  "-l", "admin", "-P", str(tmp_path / "passwords"),
                                  f"telnet://{cam.ip}"],
                                 cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            # hydra's children that were on connections to the real camera when the gateway cut
            # them off may wait there for good, holding a guess to redo: hydra need not end by
            # itself. Enough that it has sent every guess.
            wait_until(lambda: hydra.poll() is not None
                       or f"{len(guesses)} tries" in log.read_text(), 150)
        finally:
            with contextlib.suppress(ProcessLookupError):      # hydra and its children
                os.killpg(hydra.pid, signal.SIGTERM)
            hydra.wait()
    said = log.read_text()
    recorded = wait_until(lambda: len(decoy_saw() & set(guesses)) >= 10 and decoy_saw(), 75)
    assert recorded, (decoy_saw(), said[-3000:])
    # hydra never believed a login worked ("[23][telnet] host: ... password: ...")
    assert "[telnet] host:" not in said and "1 valid password" not in said, said[-3000:]
    assert stats(cam)["logins_ok"] == 0             # the real camera accepted no login
    assert stats(cam)["logins_failed"] < len(guesses)
    assert posture(dlab, "camera2") == "attack"
    assert [e for e in ask(dlab, "blocked_sources")
            if e["source"] == topology.ATTACKER_IP and e.get("decoy")], ask(dlab, "blocked_sources")
    assert {d.name: posture(dlab, d.name) for d in dlab.devices if d.name != "camera2"} == others
