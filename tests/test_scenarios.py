"""The demo scenarios (lab/scenarios.py) on real labs: what they report is what the
supervisor shows."""
import subprocess
import sys

import pytest

from appliance import client
from appliance.errors import LabError
from lab import scenarios, topology


def test_scenario_arguments_are_checked_before_a_lab_is_built():
    assert scenarios.check_lab_args("all", False, False, 4, "") == scenarios.AFTER_HOURS
    assert scenarios.check_lab_args("intrusion", False, False, 4, "2026-01-01T23:00:00+01:00") \
        == "2026-01-01T23:00:00+01:00"
    assert scenarios.check_lab_args("attack", False, False, 4, "") == ""
    for bad in [("all", True, False, 4, ""), ("all", False, True, 4, ""), ("all", False, False, 3, ""),
                ("nonsense", False, False, 4, "")]:
        with pytest.raises(LabError):
            scenarios.check_lab_args(*bad)


@pytest.fixture(scope="module")
def demo_lab(run_suffix):
    name = f"c{run_suffix}scen"
    lab = topology.up(name, devices=4, supervisor=True, fake_time=scenarios.AFTER_HOURS)
    try:
        yield lab
    finally:
        topology.down(name)


@pytest.mark.lab
def test_all_scenarios_report_the_postures_the_supervisor_shows(demo_lab):
    said = []
    steps = scenarios.play(demo_lab, "all", say=said.append)
    text = "\n".join(said)
    assert [(s.scenario, s.device, s.expected, s.posture, s.ok) for s in steps] == [
        ("intrusion", "camera1", "suspicious", "suspicious", True),
        ("attack", "camera1", "attack", "attack", True),
        ("scan", "light1", "quarantine", "quarantine", True),
        ("probe", "plug1", "quarantine", "quarantine", True)], text
    assert scenarios.succeeded(steps)
    assert "light1 is on" in text                    # the intrusion switched the lights on
    assert "(reset camera1 from suspicious to normal)" in text
    assert "(reset camera1 from attack to normal)" in text
    # the supervisor agrees: the last scenario's state is still there, the others were reset
    postures = {d["name"]: d["posture"] for d in client.request(demo_lab.gateway["socket"], "devices")}
    assert postures == {"camera1": "normal", "plug1": "quarantine", "light1": "normal",
                        "motion_sensor1": "normal"}
    panel = client.request(demo_lab.gateway["socket"], "panel")
    assert panel["pattern"] == "alert" and panel["leds"]["red"]["lit"]
    alerts = {a["type"] for a in client.request(demo_lab.gateway["socket"], "alerts", limit=100)}
    assert {"physical-intrusion", "brute-force", "gateway-probe"} <= alerts
    assert "(reset light1 from quarantine to normal)" in text
    assert alerts & {"lateral-movement", "port-scan-outbound"}


@pytest.mark.lab
def test_a_posture_that_does_not_come_is_reported_not_raised(demo_lab):
    said = []
    # the lab as the scenario sees it, without its light: the scan cannot be played
    lab = topology.LabState(demo_lab.name, demo_lab.namespaces,
                            [d for d in demo_lab.devices if d.type != "light"], demo_lab.gateway)
    steps = scenarios.play(lab, "scan", say=said.append)
    assert len(steps) == 1 and not steps[0].ok
    assert "the lab has no light" in "\n".join(said)
    assert not scenarios.succeeded(steps)


@pytest.mark.lab
def test_lab_up_with_a_scenario_leaves_the_lab_up(run_suffix):
    name = f"c{run_suffix}cli"
    try:
        out = subprocess.run([sys.executable, "-m", "appliance.cli", "lab", "up", "--name", name,
                              "--scenario", "attack"], capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "camera1 is now in the attack posture" in out.stdout
        assert f"the lab stays up; remove it with: kalki lab down {name}" in out.stdout
        assert name in topology.labs()
        lab = topology.load(name)
        postures = {d["name"]: d["posture"] for d in client.request(lab.gateway["socket"], "devices")}
        assert postures["camera1"] == "attack" and postures["plug1"] == "normal"
    finally:
        topology.down(name)


@pytest.mark.lab
def test_lab_play_plays_a_scenario_on_a_running_lab(demo_lab):
    out = subprocess.run([sys.executable, "-m", "appliance.cli", "lab", "play", demo_lab.name, "probe"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "probe      plug1 -> quarantine              ok" in out.stdout, out.stdout
    bad = subprocess.run([sys.executable, "-m", "appliance.cli", "lab", "play", demo_lab.name, "dance"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'dance'" in bad.stderr
