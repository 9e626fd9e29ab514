"""Validation of umbox stacks and profiles, without the kernel."""
import ctypes

import pytest

from appliance.dataplane import maps, umbox
from appliance.errors import ConfigError, UnknownUmboxError
from appliance.policy import profiles


def test_every_shipped_profile_is_valid_and_covers_the_umboxes():
    known = profiles.load_all()
    assert {"camera", "plug", "light", "motion_sensor"} <= set(known)
    used = {u for p in known.values() for stack in p.postures.values() for u in stack}
    assert used == set(umbox.CATALOGUE)


def test_compile_sets_flags_and_fields():
    c = umbox.compile_stack({
        "rate_limit": {"packets_per_second": 10},
        "brute_force": {"ports": [22, 23]},
        "egress_anomaly": {"destinations": ["198.19.8.0/24", "198.19.8.1:443/tcp"], "block": True},
        "quarantine": {"management": False},
    })
    assert c.flags == (maps.Flag.RATE_LIMIT | maps.Flag.BRUTE_FORCE | maps.Flag.EGRESS_ANOMALY
                       | maps.Flag.EGRESS_BLOCK | maps.Flag.QUARANTINE)
    assert c.device_fields["packet_interval_ns"] == 100_000_000      # 10 per second
    assert c.device_fields["packet_tolerance_ns"] == 9 * 100_000_000   # burst 10
    assert c.device_fields["bf_ports"] == [22, 23]
    assert c.destinations[1] == umbox.Destination(
        __import__("ipaddress").IPv4Network("198.19.8.1/32"), 6, 443)


@pytest.mark.parametrize("stack, message", [
    ("quarantine", "table of umbox names"),
    ({"nope": {}}, "unknown umbox 'nope'"),
    ({"rate_limit": {}}, "set packets_per_second or bytes_per_second"),
    ({"rate_limit": {"packets_per_second": True}}, "expected an integer"),
    ({"port_scan": {"window_ms": 0}}, "below the minimum 1"),
    ({"quarantine": {"management": "yes"}}, "expected true or false"),
    ({"allowlist": {}}, "parameter destinations is required"),
    ({"allowlist": {"destinations": ["10.0.0.0/8:99999"]}}, "invalid port"),
    ({"allowlist": {"destinations": ["198.19.8.1:80/icmp"]}}, "needs proto tcp or udp"),
    ({"allowlist": {"destinations": ["198.19.8.1/gre"]}}, "invalid address or CIDR"),
    ({"allowlist": {"destinations": [{"address": "198.19.8.1", "color": 1}]}}, "unknown key"),
    ({"allowlist": {"destinations": ["198.19.8.1"]}, "egress_anomaly": {"destinations": []}},
     "set them in one place"),
    ({"egress_anomaly": {}}, "destinations is required"),
    ({"brute_force": {"ports": [1, 2, 3, 4, 5]}}, "1 to 4 login ports"),
    ({"allowlist": {"destinations": [f"198.19.8.1:{p}/tcp" for p in range(1, 10)]}}, "at most 8"),
])
def test_bad_stacks_name_the_culprit(stack, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        umbox.compile_stack(stack, where="device cam: ")


def test_unknown_umbox_lists_the_known_ones():
    with pytest.raises(UnknownUmboxError) as e:
        umbox.validate({"firewall": {}})
    assert "quarantine" in str(e.value)


def test_profile_errors_name_file_and_key(tmp_path):
    p = tmp_path / "toaster.toml"
    p.write_text('type = "toaster"\n[postures.normal]\nrate_limit = { packets_per_second = -1 }\n')
    with pytest.raises(ConfigError, match=r"toaster.toml: postures.normal: umbox rate_limit"):
        profiles.load_profile(p)
    p.write_text('type = "toaster"\n[postures.normal]\nanti_spoof = {}\n[postures.attack]\nzap = {}\n')
    with pytest.raises(ConfigError, match=r"toaster.toml: postures.attack: unknown umbox 'zap'"):
        profiles.load_profile(p)
    p.write_text('type = "toaster"\n[postures.normal\n')
    with pytest.raises(ConfigError, match="toaster.toml"):
        profiles.load_profile(p)
    p.write_text('type = "toaster"\n[postures.suspicious]\nanti_spoof = {}\n')
    with pytest.raises(ConfigError, match="postures.normal"):
        profiles.load_profile(p)


def test_a_profile_without_unknown_posture_fails_closed(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text('type = "t"\n[postures.normal]\nanti_spoof = {}\n')
    prof = profiles.load_profile(p)
    assert "quarantine" in prof.stack("unknown") and "quarantine" in prof.stack("quarantine")


def test_contract_sizes_match_the_header():
    """The loader compares these with the kernel's sizes; pin down the C layout here too."""
    assert ctypes.sizeof(maps.Device) == 96
    assert ctypes.sizeof(maps.Event) == 40
    assert ctypes.sizeof(maps.AllowKey) == 8 and ctypes.sizeof(maps.AllowValue) == 36


def test_a_protocol_that_is_not_a_word_is_refused_by_name():
    with pytest.raises(ConfigError, match="unknown protocol"):
        umbox.compile_stack({"allowlist": {"destinations": [{"address": "198.19.8.0/24", "proto": ["tcp"]}]}},
                            "camera.toml: normal")


def test_a_stack_never_shares_the_catalogue_s_default_list():
    stack = umbox.validate({"brute_force": {}}, "x")
    stack["brute_force"]["ports"].append(2323)
    assert umbox.validate({"brute_force": {}}, "x")["brute_force"]["ports"] == [22, 23]


# -- the gate's umboxes: auth_gate, api_filter, token_guard (appliance/dataplane/gate.py) ----------

def test_gate_umboxes_compile_to_one_port_and_one_policy():
    c = umbox.compile_stack({"api_filter": {"allow": ["GET *", "PUT /api/*/lights/*/state"]},
                             "token_guard": {"max_failures": 3}})
    assert c.gate_port == 80
    assert c.gate_policy == {"port": 80, "auth": False, "allow": ["GET *", "PUT /api/*/lights/*/state"],
                             "token_guard": {"max_failures": 3, "window_ms": 60000, "block_seconds": 300,
                                             "statuses": [401, 403], "failure_text": ""}}
    c = umbox.compile_stack({"auth_gate": {"port": 8080}, "api_filter": {"allow": []}, "token_guard": {}})
    assert c.gate_port == 8080 and c.gate_policy["auth"] and c.gate_policy["allow"] == []
    assert c.gate_policy["port"] == 8080
    assert umbox.compile_stack({"token_guard": {"port": 8443}}).gate_port == 8443
    c = umbox.compile_stack({"anti_spoof": {}})
    assert c.gate_port is None and c.gate_policy is None
    # what the data path writes is what the gate reads
    from appliance.dataplane import gatepolicy
    policy = gatepolicy.Policy.from_json({**umbox.compile_stack(
        {"auth_gate": {}, "api_filter": {"allow": ["GET *"]}}).gate_policy, "device": "light1"})
    assert policy.auth and policy.allows("GET", "/x") and not policy.allows("PUT", "/x")


@pytest.mark.parametrize("stack, message", [
    ({"api_filter": {}}, "umbox api_filter: parameter allow is required"),
    ({"api_filter": {"allow": "GET *"}}, "umbox api_filter, parameter allow: expected a list"),
    ({"api_filter": {"allow": ["GET"]}}, "parameter allow: 'GET': expected \"METHOD PATH\""),
    ({"api_filter": {"allow": ["get /"]}}, "parameter allow: 'get /': 'get' is not an upper-case"),
    ({"api_filter": {"allow": ["GET api/x"]}}, "parameter allow: 'GET api/x': the path must be"),
    ({"api_filter": {"allow": ["GET /a/../b"]}}, "parameter allow: 'GET /a/../b'"),
    ({"api_filter": {"allow": ["GET /a?b=1"]}}, "parameter allow: 'GET /a?b=1'"),
    ({"api_filter": {"allow": [7]}}, "parameter allow: expected a string"),
    ({"api_filter": {"allow": ["GET *"] * 101}}, "parameter allow: 101 rules, at most 100"),
    ({"api_filter": {"allow": [], "port": 0}}, "umbox api_filter, parameter port: 0 is below the minimum 1"),
    ({"api_filter": {"allow": [], "methods": ["GET"]}}, "umbox api_filter: unknown parameter"),
    ({"auth_gate": {}, "api_filter": {"allow": [], "port": 8080}},
     "umbox api_filter, parameter port: 8080 is not auth_gate's port 80"),
    ({"api_filter": {"allow": [], "port": 81}, "token_guard": {"port": 82}},
     "umbox token_guard, parameter port: 82 is not api_filter's port 81"),
    ({"token_guard": {"max_failures": 0}}, "token_guard, parameter max_failures: 0 is below the minimum 1"),
    ({"token_guard": {"max_failures": True}}, "token_guard, parameter max_failures: expected an integer"),
    ({"token_guard": {"window_ms": 3_600_001}}, "umbox token_guard, parameter window_ms: 3600001 is above"),
    ({"token_guard": {"block_seconds": -1}}, "umbox token_guard, parameter block_seconds: -1 is below"),
    ({"token_guard": {"statuses": [200]}}, "token_guard, parameter statuses: expected a list of HTTP error"),
    ({"token_guard": {"statuses": []}}, "umbox token_guard, parameter statuses"),
    ({"token_guard": {"statuses": "401"}}, "umbox token_guard, parameter statuses: expected a list"),
    ({"token_guard": {"failure_text": 1}}, "umbox token_guard, parameter failure_text: expected text"),
    ({"token_guard": {"failure_text": "x" * 201}}, "token_guard, parameter failure_text: expected printable"),
    ({"token_guard": {"failure_text": "a\nb"}}, "token_guard, parameter failure_text: expected printable"),
])
def test_bad_gate_parameters_name_the_umbox_and_the_key(stack, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        umbox.compile_stack(stack, where="device light1: ")
