"""mud.fetch in the lab (issue 10, section 3): a new device names its MUD file in DHCP (option
161, from busybox's udhcpc), the supervisor fetches it over HTTPS from the manufacturer's
server on the internet host, checks the published signature, offers the type, and approval
installs it. A file changed after signing is never offered."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from labutil import wait_until

from appliance import client
from lab import mudserver, topology

pytestmark = pytest.mark.lab

LAMP_MUD = "tests/data/mud/mood_lamp-3204432Mud.json"


@pytest.fixture(scope="module")
def mlab(run_suffix):
    name = f"u{run_suffix}mud"
    state = topology.up(name, devices=2, supervisor=True, unapproved=1, mud=True)
    try:
        yield state
    finally:
        topology.down(name)


def ask(lab, op, **args):
    return client.request(lab.gateway["socket"], op, **args)


def publish(lab, name: str, tamper: bool = False) -> str:
    """The lamp's MUD file at <base><name>.json with its signature at <name>.p7s; with
    `tamper`, the file is changed after it was signed. Returns its URL."""
    base, files = lab.gateway["mud_base"], Path(lab.gateway["mud_files"])
    url = f"{base}{name}.json"
    mud = json.loads(open(LAMP_MUD).read())
    mud["ietf-mud:mud"]["mud-url"] = url
    mud["ietf-mud:mud"]["mud-signature"] = f"{base}{name}.p7s"
    path = files / f"{name}.json"
    path.write_text(json.dumps(mud, indent=2))
    ca = mudserver.TestCA(topology.state_path(lab.name).parent / "mud-ca")
    mudserver.sign(path, *ca.signer(), out=files / f"{name}.p7s")
    if tamper:
        mud["ietf-mud:mud"]["systeminfo"] = "a lamp, said someone else"
        path.write_text(json.dumps(mud, indent=2))
    return url


def ask_with_mud_url(lab, device, url: str) -> None:
    script = topology.state_path(lab.name).parent / "udhcpc.script"
    subprocess.run(["ip", "netns", "exec", device.namespace, "busybox", "udhcpc", "-i", "eth0", "-n",
                    "-q", "-t", "5", "-T", "1", "-x", f"0xa1:{url.encode().hex()}", "-s", str(script)],
                   check=True, capture_output=True, timeout=30)


def record_of(lab, device) -> dict:
    return next(d for d in ask(lab, "devices") if d["mac"] == device.mac)


def test_a_fetched_signed_mud_file_is_offered_and_approval_installs_it(mlab):
    if shutil.which("busybox") is None:
        pytest.skip("busybox (udhcpc) is not installed")
    new = mlab.devices[-1]
    # first a file changed after it was signed: refused, never offered
    bad = publish(mlab, "tampered-lamp", tamper=True)
    ask_with_mud_url(mlab, new, bad)
    offer = wait_until(lambda: (record_of(mlab, new).get("mud_offer") or {}).get("state") == "failed"
                       and record_of(mlab, new)["mud_offer"], 15)
    assert offer and offer["url"] == bad and "signature does not verify" in offer["error"], offer
    # then the real one
    good = publish(mlab, "mood-lamp")
    ask_with_mud_url(mlab, new, good)
    offer = wait_until(lambda: (record_of(mlab, new).get("mud_offer") or {}).get("state") == "offered"
                       and record_of(mlab, new)["mud_offer"], 15)
    assert offer and offer["url"] == good, record_of(mlab, new)
    assert "verified by" in offer["signature"] and "Kalki lab MUD signer" in offer["signature"], offer
    name = record_of(mlab, new)["name"]
    ask(mlab, "device_approve", name=name, type=offer["type"])
    installed = {p["type"] for p in ask(mlab, "profile_list")}
    assert offer["type"] in installed
    d = record_of(mlab, new)
    assert d["approved"] and d["type"] == offer["type"] and d["posture"] == "normal", d
    assert wait_until(lambda: ask(mlab, "status")["enforced"] == len(mlab.devices), 5), ask(mlab, "status")
