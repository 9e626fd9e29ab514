"""api_filter and token_guard (issue 15, items 2 and 3) in a lab with the supervisor: real
clients in the attacker's namespace, the real nftables redirect to the gate, the lab light's
Hue-style API answering as a real bridge does (a wrong token: status 200, "unauthorized user")."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from labutil import connect, wait_until

from appliance import client
from lab import topology

pytestmark = pytest.mark.lab

# Requests on ONE kept-open connection, from inside a namespace: [(method, path)] -> statuses
# and bodies, as JSON. A request the gate refuses ends the connection (403, then close) only
# when the gate says so; the client stops at the first closed connection.
CLIENT = r"""
import http.client, json, sys
host, requests = sys.argv[1], json.loads(sys.argv[2])
conn = http.client.HTTPConnection(host, 80, timeout=5)
out = []
for method, path in requests:
    try:
        conn.request(method, path, body=b'{"on": true}' if method == "PUT" else None,
                     headers={"Connection": "keep-alive"})
        r = conn.getresponse()
        out.append([r.status, r.read().decode(errors="replace")[:4000]])
    except (OSError, http.client.HTTPException) as e:
        out.append([0, type(e).__name__])
        break
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def glab(run_suffix):
    name = f"g{run_suffix}gate"
    state = topology.up(name, devices=4, supervisor=True)
    try:
        yield state
    finally:
        topology.down(name)


def ask(lab, op, **args):
    return client.request(lab.gateway["socket"], op, **args)


def requests_from_attacker(lab, ip, requests) -> list:
    proc = subprocess.run(["ip", "netns", "exec", lab.namespaces["atk"], sys.executable, "-c", CLIENT,
                           ip, json.dumps(requests)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def alerts_of(lab, kind):
    return [a for a in ask(lab, "alerts", limit=200) if a["type"] == kind]


def test_the_api_filter_checks_every_request_of_a_kept_open_connection(glab):
    light = glab.device("light1")
    ask(glab, "posture_set", name="light1", posture="suspicious")
    policy = topology.gate_policy_dir(glab) / f"{light.ip}.json"
    assert wait_until(policy.exists, 5), "the data path wrote no gate policy for light1"
    assert json.loads(policy.read_text())["allow"] == ["GET *"]
    def requests_seen():
        status, body = requests_from_attacker(glab, light.ip, [["GET", "/_lab/stats"]])[0]
        assert status == 200, body
        return json.loads(body)["http_requests"]

    before = requests_seen()
    got = requests_from_attacker(glab, light.ip, [["GET", "/"], ["PUT", "/api/x/lights/1/state"]])
    assert got[0][0] == 200 and got[1][0] == 403, got
    assert requests_seen() == before + 1        # the GET reached the light, the PUT never did
    denied = wait_until(lambda: alerts_of(glab, "api-denied"), 10)
    assert denied and denied[0]["device"] == "light1", denied
    assert {d["name"]: d["posture"] for d in ask(glab, "devices")}["light1"] == "suspicious"


def test_curl_on_one_reused_connection_gets_its_get_and_a_403_for_its_put(glab):
    """The same with a real tool: curl sends a GET, then a PUT on the same connection
    (--next reuses it: num_connects 0; the lab light keeps a connection open when asked to),
    and only the GET reaches the light."""
    light = glab.device("light1")
    ask(glab, "posture_set", name="light1", posture="suspicious")
    out = subprocess.run(
        ["ip", "netns", "exec", glab.namespaces["atk"], "curl", "-s", "-o", "/dev/null", "--max-time", "5",
         "-w", "%{http_code} %{num_connects}\n", "-H", "Connection: keep-alive", f"http://{light.ip}/",
         "--next", "-s", "-o", "/dev/null", "--max-time", "5", "-w", "%{http_code} %{num_connects}\n",
         "-X", "PUT", "-d", '{"on": false}', f"http://{light.ip}/api/x/lights/1/state"],
        capture_output=True, text=True, timeout=30).stdout.split("\n")
    assert out[0] == "200 1" and out[1] == "403 0", out


def test_token_guessing_on_one_connection_is_counted_alerted_and_dropped(glab):
    light = glab.device("light1")
    ask(glab, "posture_set", name="light1", posture="suspicious")
    guesses = [["GET", f"/api/guess{i:02d}/lights"] for i in range(14)]
    got = requests_from_attacker(glab, light.ip, guesses)
    # a real bridge's answer to a wrong token: 200 and Hue's error, counted by its text
    assert got[0][0] == 200 and "unauthorized user" in got[0][1], got[0]
    brute = wait_until(lambda: alerts_of(glab, "token-brute-force"), 10)
    assert brute and brute[0]["device"] == "light1", brute
    assert brute[0]["details"]["source"] == topology.ATTACKER_IP
    # the attacker is in the drop set: its next connection to the light goes nowhere
    time.sleep(0.3)
    assert not connect(glab.namespaces["atk"], light.ip, 80, timeout=1.0)
    ask(glab, "unblock_source", ip=topology.ATTACKER_IP)
    assert wait_until(lambda: connect(glab.namespaces["atk"], light.ip, 80, timeout=1.0), 5)



def device_stats(lab, device) -> dict:
    """The emulated device's own counters, read inside its namespace (no gate in between)."""
    out = subprocess.run(["ip", "netns", "exec", device.namespace, "curl", "-s", "--max-time", "3",
                          "http://127.0.0.1/_lab/stats"], capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.mark.skipif(not shutil.which("hydra"), reason="no hydra (scripts/setup.sh installs it)")
def test_hydra_guessing_the_gate_s_password_is_locked_out_and_finds_none(glab, tmp_path):
    """The real tool against auth_gate: hydra guesses the gate's password for camera1's web API
    (HTTP Basic), the right one last. The gate answers each guess itself, locks the source out
    after its failures (the drop set), and hydra never gets the password; the camera saw none
    of it."""
    cam = glab.device("camera1")
    # the default-login check that followed camera1's approval asks its web page too: done first
    assert wait_until(lambda: ask(glab, "device_show", name="camera1").get("logins_checked"), 60)
    ask(glab, "posture_set", name="camera1", posture="suspicious")       # auth_gate on port 80
    seen = device_stats(glab, cam)["http_requests"]
    guesses = [f"guess{i:02d}" for i in range(30)] + [topology.GATE_PASSWORD]
    (tmp_path / "passwords").write_text("\n".join(guesses) + "\n")
    log = tmp_path / "hydra.log"
    try:
        with log.open("w") as out:
            hydra = subprocess.Popen(["ip", "netns", "exec", glab.namespaces["atk"], "hydra", "-I",
                                      "-t", "4", "-w", "5", "-l", topology.GATE_USER,
                                      "-P", str(tmp_path / "passwords"), f"http-get://{cam.ip}/"],
                                     cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            try:
                hydra.wait(timeout=120)      # once locked out its connections go nowhere
            except subprocess.TimeoutExpired:
                pass
            finally:
                with contextlib.suppress(ProcessLookupError):   # it ended by itself
                    os.killpg(hydra.pid, signal.SIGTERM)
                hydra.wait()
        said = log.read_text()
        # hydra takes any answer but 401 for a hit, the lockout's 403 included: what it
        # "found" is wrong guesses, never the gate's password
        found = [line for line in said.splitlines() if "[http-get] host:" in line]
        assert not [line for line in found if line.endswith(f"password: {topology.GATE_PASSWORD}")]
        assert all(line.split("password: ")[1] in guesses[:-1] for line in found), found
        locked = wait_until(lambda: [e for e in ask(glab, "blocked_sources")
                                     if e["source"] == topology.ATTACKER_IP], 10)
        assert locked, ask(glab, "blocked_sources")
        lockouts = alerts_of(glab, "gate-login-failures")
        assert lockouts and topology.ATTACKER_IP in json.dumps(lockouts[0]["details"]), lockouts
        assert device_stats(glab, cam)["http_requests"] == seen      # the camera saw no guess
    finally:
        ask(glab, "unblock_source", ip=topology.ATTACKER_IP)
        ask(glab, "posture_set", name="camera1", posture="normal")
