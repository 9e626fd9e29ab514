"""Notifications (issue 14) from a real supervisor in a lab to servers on the lab's internet
host: an ntfy-speaking receiver and a webhook receiver that checks the HMAC signature. The
receivers' sockets are made inside the internet host's namespace (198.19.0.2); the supervisor
reaches them through the gateway's uplink, as it would reach a site's servers."""
import os
import time

import pytest
from labutil import connect

from appliance import client, netns
from lab import notifyservers, topology

pytestmark = pytest.mark.lab

NTFY_PORT, HOOK_PORT = 18080, 18081
SECRET = b"lab-webhook-secret-0123456789"


@pytest.fixture(scope="module")
def nlab(run_suffix, tmp_path_factory):
    secret = tmp_path_factory.mktemp("notify") / "webhook.secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    name = f"n{run_suffix}ntf"
    state = topology.up(name, devices=4, supervisor=True, notify={
        "min_severity": "critical",
        "ntfy_url": f"http://{topology.INET_IP}:{NTFY_PORT}", "ntfy_topic": "kalki-lab",
        "webhook_url": f"http://{topology.INET_IP}:{HOOK_PORT}/hook",
        "webhook_secret_file": str(secret)})
    try:
        with netns.entered(state.namespaces["inet"]):     # their sockets live on the internet host
            ntfy = notifyservers.NtfyReceiver(topology.INET_IP, NTFY_PORT)
            hook = notifyservers.WebhookReceiver(SECRET, topology.INET_IP, HOOK_PORT)
        with ntfy, hook:
            yield state, ntfy, hook
    finally:
        topology.down(name)


def test_a_critical_alert_reaches_ntfy_and_a_signed_webhook(nlab):
    lab, ntfy, hook = nlab
    cam = lab.device("camera1")
    for _ in range(15):       # a brute force: critical, and the camera goes to attack
        connect(lab.namespaces["atk"], cam.ip, 23, timeout=0.3)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (ntfy.received and hook.received):
        time.sleep(0.2)
    assert ntfy.received and hook.received, client.request(lab.gateway["socket"], "status")["notify"]
    said = ntfy.received[0]
    assert said["topic"] == "kalki-lab"
    assert "camera1" in (said.get("message") or "") + (said.get("title") or ""), said
    sent = hook.received[0]["json"]      # the receiver refused anything unsigned or stale
    assert sent["device"] == "camera1" and sent["kind"] == "brute-force", sent
    status = client.request(lab.gateway["socket"], "status")["notify"]
    assert all(not c.get("failed") for c in status.values() if isinstance(c, dict)), status
