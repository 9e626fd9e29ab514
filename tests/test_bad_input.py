"""Bad input of any kind gets a ConfigError naming the culprit (the file and the key), and
nothing half-applied: the configuration, device-type profiles, rule files on the command line
and rules sent to the web API. No root needed."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import test_web
from test_web import aiotest, api_headers, client, login, set_admin

from appliance import config
from appliance.errors import ConfigError
from appliance.policy import profiles
from appliance.policy.rules import MAX_NESTING, parse_rule
from appliance.supervisor.ops import validate_rules_text

ROOT = Path(__file__).resolve().parents[1]
sup = test_web.sup      # the web tests' supervisor (real store, profiles, rules; fake data path)


def load_toml(tmp_path, text: str) -> config.Config:
    path = tmp_path / "kalki.toml"
    path.write_text(text)
    return config.load(path)


def refused(tmp_path, text: str, *words: str) -> str:
    """Loading `text` as kalki.toml is refused, naming the file and every one of `words`."""
    with pytest.raises(ConfigError) as e:
        load_toml(tmp_path, text)
    message = str(e.value)
    assert str(tmp_path / "kalki.toml") in message, message
    for word in words:
        assert word in message, message
    return message


# -- the configuration (kalki.toml) -----------------------------------------------------------

@pytest.mark.parametrize("section, key, value", [
    ("mqtt", "port", 70000), ("mqtt", "port", 0), ("web", "port", 65536), ("web", "port", -443),
    ("gateway", "gate_port", 0), ("gateway", "gate_port", 100000)])
def test_config_refuses_a_port_outside_1_to_65535(tmp_path, section, key, value):
    refused(tmp_path, f"[{section}]\n{key} = {value}\n", f"{section}.{key}", str(value), "65535")


@pytest.mark.parametrize("key", ["history_per_device", "alerts", "decisions", "max_age_days"])
@pytest.mark.parametrize("value", [0, -1])
def test_config_refuses_a_retention_that_is_not_positive(tmp_path, key, value):
    refused(tmp_path, f"[state]\n{key} = {value}\n", f"state.{key}", str(value))


@pytest.mark.parametrize("value", [0, 63, 10**9])
def test_config_refuses_a_max_payload_out_of_bounds(tmp_path, value):
    refused(tmp_path, f"[mqtt]\nmax_payload = {value}\n", "mqtt.max_payload", str(value))


def test_config_refuses_an_unknown_time_zone(tmp_path):
    refused(tmp_path, '[policy]\ntimezone = "Mars/Olympus"\n', "policy.timezone", "Mars/Olympus")


def test_config_refuses_an_unknown_business_day(tmp_path):
    refused(tmp_path, '[policy]\nbusiness_days = ["mon", "funday"]\n',
            "policy.business_days[1]", "funday")


def test_config_refuses_an_invalid_business_start(tmp_path):
    refused(tmp_path, '[policy]\nbusiness_start = "25:00"\n', "policy.business_start", "25:00")


def test_config_file_refuses_a_string_for_an_int(tmp_path):
    refused(tmp_path, '[mqtt]\nport = "1883"\n', "mqtt.port", "expected int", "'1883'")


@pytest.mark.parametrize("section, key, value", [
    ("mqtt", "port", "1883"), ("state", "alerts", 0), ("web", "port", 70000), ("panel", "button", 40),
    ("web", "enabled", 1)])
def test_config_built_in_code_is_checked_like_a_file(section, key, value):
    """appliance.system.site builds a Config in code and calls check(): same rules as a file."""
    cfg = config.Config(path="kalki.toml")
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError) as e:
        cfg.check()
    assert f"kalki.toml: {section}.{key}" in str(e.value) and repr(value) in str(e.value)


def test_config_refuses_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "kalki.toml"
    path.write_bytes(b'[mqtt]\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert str(path) in str(e.value) and "byte 18" in str(e.value) and "UTF-8" in str(e.value)


def test_config_defaults_round_trip(tmp_path):
    """What `kalki config defaults` prints loads and checks, and gives the defaults back."""
    out = subprocess.run([sys.executable, "-m", "appliance.cli", "config", "defaults"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    cfg = load_toml(tmp_path, out)
    assert dataclasses.replace(cfg, path="") == config.Config()
    assert load_toml(tmp_path, config.dump(cfg)) == cfg


# -- device-type profiles (umboxes/*.toml) ----------------------------------------------------

PROFILE = """type = "toaster"
[postures.normal]
anti_spoof = {}
"""


def profile_refused(tmp_path, text: str, *words: str) -> str:
    path = tmp_path / "toaster.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        profiles.load_profile(path)
    message = str(e.value)
    assert "toaster.toml" in message, message
    for word in words:
        assert word in message, message
    return message


def test_profile_refuses_an_unknown_posture(tmp_path):
    profile_refused(tmp_path, PROFILE + "[postures.suspicous]\nanti_spoof = {}\n",
                    "postures.suspicous", "unknown posture")


def test_profile_may_still_give_the_unknown_posture(tmp_path):
    """Not a refusal: "unknown" is a posture a profile may set (else the closed default)."""
    path = tmp_path / "toaster.toml"
    path.write_text(PROFILE + "[postures.unknown]\nquarantine = {management = true}\n")
    assert profiles.load_profile(path).postures["unknown"] == {"quarantine": {"management": True}}


def test_profile_refuses_a_rate_limit_that_limits_nothing(tmp_path):
    """0 is "no limit" in the kernel (kalki.h: packet_interval_ns / byte_cost_ns_x1024 = 0),
    so a rate_limit with both rates 0 would limit nothing."""
    profile_refused(tmp_path, PROFILE + "rate_limit = {packets_per_second = 0, bytes_per_second = 0}\n",
                    "postures.normal", "rate_limit", "packets_per_second")


def test_profile_refuses_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "toaster.toml"
    path.write_bytes(PROFILE.encode() + b'description = "\xff"\n')
    with pytest.raises(ConfigError) as e:
        profiles.load_profile(path)
    assert str(path) in str(e.value) and f"byte {len(PROFILE) + 15}" in str(e.value)


# -- rules: nesting, absurd nesting, encoding -------------------------------------------------

THEN = [{"set_posture": {"posture": "attack"}}]


def nested(levels: int) -> dict:
    """A condition inside `levels` of all, any and not, in turn from the outside."""
    when: dict = {"alert": {}}
    for i in reversed(range(levels)):
        kind = ("all", "any", "not")[i % 3]
        when = {kind: when if kind == "not" else [when]}
    return when


def rule_toml(when: str) -> str:
    return f'[[rules]]\nname = "deep"\nwhen = {when}\nthen = [{{set_posture = {{posture = "attack"}}}}]\n'


def deep_toml(levels: int) -> str:
    return rule_toml(json.dumps(nested(levels)).replace('": ', '" = ').replace('"', ""))


# Nesting tomllib and json cannot read (RecursionError), well inside the web's 256 KiB body.
ABSURD_TOML = rule_toml("{all = " + "[" * 3000 + "]" * 3000 + "}")


def test_rule_nesting_up_to_the_limit_is_accepted():
    """Not a refusal: the boundary."""
    assert parse_rule({"name": "r", "when": nested(MAX_NESTING), "then": THEN}, "f.toml: rules[0]")


def test_rule_nested_too_deeply_is_refused_naming_the_place():
    with pytest.raises(ConfigError) as e:
        parse_rule({"name": "r", "when": nested(MAX_NESTING + 1), "then": THEN}, "f.toml: rules[0]")
    assert str(e.value).startswith("f.toml: rules[0].when.all[0].any[0].not.all[0]")
    assert f"nested deeper than {MAX_NESTING}" in str(e.value)


def test_rules_text_nested_past_what_toml_can_read_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        validate_rules_text(ABSURD_TOML, "site-rules.toml")
    assert str(e.value).startswith("site-rules.toml: ") and "nested too deeply" in str(e.value)


def kalki_rules_validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", "rules", "validate", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def cli_refused(path: Path, *words: str) -> None:
    r = kalki_rules_validate(path)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert str(path) in r.stderr, r.stderr
    for word in words:
        assert word in r.stderr, r.stderr


def test_cli_rules_validate_refuses_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_bytes(b'[[rules]]\nname = "caf\xe9"\n')
    cli_refused(path, "UTF-8", "byte 21")


def test_cli_rules_validate_refuses_rules_nested_too_deeply(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(deep_toml(MAX_NESTING + 1))
    cli_refused(path, "rules[0].when.all[0]", f"nested deeper than {MAX_NESTING}")


def test_cli_rules_validate_refuses_absurd_nesting(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(ABSURD_TOML)
    cli_refused(path, "nested too deeply")


def test_cli_rules_validate_accepts_nesting_up_to_the_limit(tmp_path):
    """Not a refusal: the same path, at the boundary."""
    path = tmp_path / "rules.toml"
    path.write_text(deep_toml(MAX_NESTING))
    r = kalki_rules_validate(path)
    assert r.returncode == 0 and "1 valid rule(s): deep" in r.stdout, r.stderr


async def api_refused(sup, method: str, path: str, word: str, **request) -> None:
    """The API answers 400 naming `word` (not 500) and changes nothing."""
    set_admin(sup)
    async with client(sup) as c:
        h = api_headers(await login(c))
        before = json.dumps(sup.store._storage.read(), sort_keys=True)
        r = await c.request(method, path, headers=h, **request)
        answer = await r.json()
        assert r.status == 400 and word in answer["error"], (r.status, answer)
        assert json.dumps(sup.store._storage.read(), sort_keys=True) == before
        assert sup.store.get_rule("deep") is None


@aiotest
async def test_api_post_rules_nested_too_deeply_is_400(sup):
    await api_refused(sup, "POST", "/api/rules", "rules[0].when.all[0].any[0].not.all[0]",
                      json={"text": deep_toml(MAX_NESTING + 1)})


@aiotest
async def test_api_post_rules_nested_past_what_toml_can_read_is_400(sup):
    await api_refused(sup, "POST", "/api/rules", "rules: nested too deeply",
                      json={"text": ABSURD_TOML})


@aiotest
async def test_api_put_rule_nested_too_deeply_is_400(sup):
    await api_refused(sup, "PUT", "/api/rules/deep", f"nested deeper than {MAX_NESTING}",
                      json={"when": nested(MAX_NESTING + 1), "then": THEN})


@aiotest
async def test_api_json_body_nested_past_what_json_can_read_is_400(sup):
    await api_refused(sup, "POST", "/api/rules", "malformed JSON: nested too deeply",
                      data='{"text": ' + "[" * 20000 + "]" * 20000 + "}")
