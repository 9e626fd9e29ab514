"""Site settings on the FAT partition (appliance/system/site.py): validation names the file and the key,
a good file renders every service's configuration, a bad or missing one renders a fail-closed
set and an error status file. Pure Python."""
import base64
import hashlib
import tomllib

import pytest

from appliance import config
from appliance.system import site
from appliance.system.site import SiteError

KEY = "ssh-ed25519 " + base64.b64encode(
    len(b"ssh-ed25519").to_bytes(4, "big") + b"ssh-ed25519" + (32).to_bytes(4, "big") + bytes(32)
).decode() + " tech@laptop"

GOOD = f"""
[network]
devices_interface = "wlan0"
uplink_interface = "eth0"

[wifi]
ssid = "kalki-devices"
passphrase = "correct horse battery"
country = "DE"

[time]
timezone = "Europe/Berlin"

[business_hours]
days = ["mon", "tue", "wed"]
start = "07:30"
end = "17:00"

[ssh]
enabled = true
authorized_key = "{KEY}"
"""

WIRED = """
[network]
devices_interface = "eth1"
uplink_interface = "eth0"
"""


def write(tmp_path, text, name="kalki.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_file_parses(tmp_path):
    s = site.load(write(tmp_path, GOOD))
    assert (s.devices_interface, s.uplink_interface) == ("wlan0", "eth0")
    assert s.wifi.ssid == "kalki-devices" and s.wifi.country == "DE"
    assert s.timezone == "Europe/Berlin"
    assert s.business_days == ["mon", "tue", "wed"] and s.business_start == "07:30"
    assert s.ssh_enabled and s.ssh_authorized_key == KEY


def test_wired_devices_side_needs_no_wifi(tmp_path):
    s = site.load(write(tmp_path, WIRED))
    assert s.wifi is None and not s.ssh_enabled
    assert "hostapd.conf" not in site.render(s)


@pytest.mark.parametrize("text, key", [
    ('[network]\ndevices_interface = "wlan0"\n', "wifi: required"),
    (GOOD.replace("correct horse battery", "short"), "wifi.passphrase"),
    (GOOD.replace("correct horse battery", "x" * 64), "wifi.passphrase"),
    (GOOD.replace("correct horse battery", "pässwort-lang"), "wifi.passphrase"),
    (GOOD.replace('ssid = "kalki-devices"', 'ssid = ""'), "wifi.ssid"),
    (GOOD.replace('country = "DE"', 'country = "Germany"'), "wifi.country"),
    (GOOD.replace("Europe/Berlin", "Mars/Olympus"), "time.timezone"),
    (GOOD.replace('"07:30"', '"7:30"'), "business_hours.start"),
    (GOOD.replace('"17:00"', '"24:00"'), "business_hours.end"),
    (GOOD.replace('"wed"]', '"someday"]'), "business_hours.days[2]"),
    (GOOD.replace('"17:00"', '"07:30"'), "business_hours.start/end"),
    (GOOD.replace(KEY, "ssh-ed25519 not-base64!"), "ssh.authorized_key"),
    (GOOD.replace(KEY, "ssh-rsa " + KEY.split()[1]), "ssh.authorized_key"),
    (GOOD.replace(f'authorized_key = "{KEY}"', ""), "ssh.authorized_key: required"),
    (GOOD.replace("enabled = true", 'enabled = "yes"'), "ssh.enabled"),
    (GOOD.replace('uplink_interface = "eth0"', 'uplink_interface = "wlan0"'), "devices_interface"),
    (GOOD.replace('uplink_interface = "eth0"', 'uplink_interface = "eth 0"'), "uplink_interface"),
    (GOOD.replace("[time]", "[time]\ntimezon = 'UTC'"), "unknown key(s) ['timezon']"),
    (GOOD + "\n[extra]\n", "unknown key(s) ['extra']"),
    (WIRED + '\n[wifi]\nssid = "x"\npassphrase = "12345678"\n', "wifi: a Wi-Fi access point"),
    (WIRED.replace('"eth0"', '"eth0"\naddress = "10.0.0.1"'), "network.address"),
    (WIRED.replace('"eth0"', '"eth0"\nlan = "10.0.0.0/33"'), "network.lan"),
    (WIRED.replace('"eth0"', '"eth0"\nisolation = "port-isolation"'), "network.isolation: expected one of"),
    (WIRED.replace('"eth0"', '"eth0"\nisolation = "ap_isolate"'), "network.isolation: \"ap_isolate\""),
    (GOOD.replace('uplink_interface = "eth0"', 'uplink_interface = "eth0"\nisolation = "switch"'),
     "network.isolation: \"switch\""),
    ("this is = = not toml", "not valid TOML"),
])
def test_errors_name_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(SiteError) as e:
        site.load(path)
    assert str(path) in str(e.value)
    assert key in str(e.value)


@pytest.mark.parametrize("key, text", [
    ("mqtt.home_assistant_password", WIRED + "[mqtt]\nhome_assistant_password = 73310958112345678\n"),
    ("wifi.passphrase", GOOD.replace('"correct horse battery"', "73310958112345678")),
    ("wifi.passphrase", GOOD.replace('"correct horse battery"', "[73310958112345678]")),
])
def test_a_secret_of_the_wrong_type_is_not_shown_in_the_error(tmp_path, key, text):
    with pytest.raises(SiteError) as e:
        site.load(write(tmp_path, text))
    assert f"{key}: expected a string, got a value of type " in str(e.value)
    assert "73310958112345678" not in str(e.value)
    # a key that is no secret still says what it got
    with pytest.raises(SiteError, match=r"time.timezone: expected a string, got 7"):
        site.load(write(tmp_path, GOOD.replace('"Europe/Berlin"', "7")))


def test_a_secret_is_not_in_the_settings_repr(tmp_path):
    s = site.load(write(tmp_path, GOOD + '[mqtt]\nhome_assistant_password = "a-site-password-16"\n'))
    assert s.home_assistant_password == "a-site-password-16"
    assert s.wifi.passphrase == "correct horse battery"
    assert "a-site-password-16" not in repr(s) and "correct horse battery" not in repr(s)
    assert "kalki-devices" in repr(s)                # the rest is shown


def test_missing_file(tmp_path):
    with pytest.raises(SiteError, match="missing"):
        site.load(tmp_path / "kalki.toml")


def test_supervisor_config_is_valid_and_on_the_data_partition(tmp_path):
    files = site.render(site.load(write(tmp_path, GOOD)))
    path = write(tmp_path, files["kalki.toml"], "rendered.toml")
    cfg = config.load(path)
    assert cfg.gateway.devices_interface == "wlan0" and cfg.gateway.uplink_interface == "eth0"
    assert cfg.state.directory == "/var/lib/kalki"
    assert cfg.mqtt.password_file.startswith("/var/lib/kalki/")
    assert cfg.policy.timezone == "Europe/Berlin"
    assert cfg.policy.business_days == ["mon", "tue", "wed"]
    assert (cfg.policy.business_start, cfg.policy.business_end) == ("07:30", "17:00")
    assert cfg.profiles == "/opt/kalki/umboxes"
    assert cfg.web.enabled and cfg.web.tls_dir == "/var/lib/kalki/tls"
    assert not cfg.panel.enabled


def test_panel_only_on_a_pi(tmp_path):
    s = site.load(write(tmp_path, WIRED))
    assert tomllib.loads(site.render(s, panel=True)["kalki.toml"])["panel"]["enabled"] is True
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\0")
    assert site.is_raspberry_pi(model)
    model.write_bytes(b"linux,dummy-virt\0")
    assert not site.is_raspberry_pi(model)
    assert not site.is_raspberry_pi(tmp_path / "absent")
    out, err = tmp_path / "out", tmp_path / "err"
    site.apply(tmp_path / "missing.toml", out, err, panel=True)
    assert tomllib.loads((out / "kalki.toml").read_text())["panel"]["enabled"] is True


def test_hostapd_is_wpa2_with_isolation_and_no_plain_passphrase(tmp_path):
    s = site.load(write(tmp_path, GOOD))
    conf = site.render(s)["hostapd.conf"]
    lines = dict(line.split("=", 1) for line in conf.splitlines() if "=" in line and not line.startswith("#"))
    assert lines["interface"] == "wlan0"
    assert lines["wpa"] == "2" and lines["wpa_key_mgmt"] == "WPA-PSK" and lines["rsn_pairwise"] == "CCMP"
    assert lines["ap_isolate"] == "1"
    assert bytes.fromhex(lines["ssid2"]).decode() == "kalki-devices"
    expected = hashlib.pbkdf2_hmac("sha1", b"correct horse battery", b"kalki-devices", 4096, 32).hex()
    assert lines["wpa_psk"] == expected
    assert "correct horse battery" not in conf
    assert lines["country_code"] == "DE"


def test_wpa_psk_known_vector():
    # IEEE 802.11i-2004, annex H.4.3, test vector 1.
    assert site.wpa_psk("IEEE", "password") == \
        "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"


def test_dnsmasq_serves_only_the_devices_side(tmp_path):
    conf = site.render(site.load(write(tmp_path, WIRED)))["dnsmasq.conf"]
    assert "interface=eth1" in conf.splitlines()
    # DNS behind the supervisor's front on the devices' port 53 (appliance.dataplane.resolver)
    assert {"listen-address=127.0.0.1", "port=5301"} <= set(conf.splitlines())
    assert "dhcp-range=198.18.8.0,198.18.15.254,255.255.240.0,12h" in conf   # the upper half
    assert "dhcp-option=option:router,198.18.0.1" in conf
    assert "/var/lib/kalki/" in conf


def test_networkd_and_nat(tmp_path):
    files = site.render(site.load(write(tmp_path, WIRED)))
    uplink = files["network/10-kalki-uplink.network"]
    devices = files["network/10-kalki-devices.network"]
    assert "Name=eth0" in uplink and "DHCP=yes" in uplink
    assert "Name=eth1" in devices and "Address=198.18.0.1/20" in devices
    assert 'oifname "eth0" ip saddr 198.18.0.0/20 masquerade' in files["nat.nft"]


def test_ssh_only_with_a_key(tmp_path):
    files = site.render(site.load(write(tmp_path, GOOD)))
    assert files["authorized_keys"] == KEY + "\n" and "ssh-enabled" in files
    files = site.render(site.load(write(tmp_path, GOOD.replace("enabled = true", "enabled = false"))))
    assert "authorized_keys" not in files and "ssh-enabled" not in files


def test_apply_good_then_bad_is_fail_closed(tmp_path):
    out, err = tmp_path / "out", tmp_path / "site-error"
    src = write(tmp_path, GOOD)
    ok, _ = site.apply(src, out, err)
    assert ok and not err.exists()
    for name in ("kalki.toml", "hostapd.conf", "dnsmasq.conf", "nat.nft", "authorized_keys",
                 "ssh-enabled", "network/10-kalki-uplink.network"):
        assert (out / name).exists(), name
    assert oct((out / "hostapd.conf").stat().st_mode & 0o777) == "0o600"

    write(tmp_path, GOOD.replace("correct horse battery", "short"))
    ok, message = site.apply(src, out, err)
    assert not ok
    assert "wifi.passphrase" in err.read_text() and str(src) in err.read_text()
    # Fail-closed: no access point, no DHCP for devices, no NAT, no SSH; the supervisor's
    # config is still there with the interfaces the file named.
    for name in ("hostapd.conf", "dnsmasq.conf", "nat.nft", "authorized_keys", "ssh-enabled",
                 "network/10-kalki-devices.network"):
        assert not (out / name).exists(), name
    cfg = tomllib.loads((out / "kalki.toml").read_text())
    assert cfg["gateway"]["devices_interface"] == "wlan0"

    write(tmp_path, GOOD)
    ok, _ = site.apply(src, out, err)
    assert ok and not err.exists() and (out / "hostapd.conf").exists()


def test_apply_missing_file_is_fail_closed(tmp_path):
    out, err = tmp_path / "out", tmp_path / "site-error"
    ok, message = site.apply(tmp_path / "kalki.toml", out, err)
    assert not ok and "missing" in err.read_text()
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == \
        ["10-kalki-uplink.network", "kalki.toml"]


def test_fail_closed_keeps_readable_interfaces(tmp_path):
    out, err = tmp_path / "out", tmp_path / "site-error"
    src = write(tmp_path, WIRED + "\n[time]\ntimezone = 'Nowhere/Land'\n")
    ok, _ = site.apply(src, out, err)
    assert not ok and "time.timezone" in err.read_text()
    cfg = tomllib.loads((out / "kalki.toml").read_text())
    assert cfg["gateway"]["devices_interface"] == "eth1"


def test_cli(tmp_path, capsys):
    assert site.main(["check", str(write(tmp_path, GOOD))]) == 0
    assert site.main(["check", str(write(tmp_path, "[wifi]\n"))]) == 1
    assert "wifi" in capsys.readouterr().err
    src = write(tmp_path, WIRED)
    assert site.main(["apply", "--source", str(src), "--out", str(tmp_path / "o"),
                      "--error-file", str(tmp_path / "e")]) == 0


def test_example_file_in_the_image_is_valid():
    from pathlib import Path
    example = Path(__file__).resolve().parent.parent / "image" / "files" / "boot" / "kalki.toml.example"
    with pytest.raises(SiteError, match="wifi.passphrase: still the example's placeholder"):
        site.load(example)
    text = example.read_text().replace(site.PLACEHOLDER_PASSPHRASE, "a passphrase of our own")
    s = site.parse(tomllib.loads(text), "kalki.toml")
    assert s.wifi is not None and not s.ssh_enabled and s.devices_interface == "wlan0"
    assert s.isolation == "auto"
    for value in site.ISOLATION:
        assert f'"{value}"' in text           # each setting is explained in the example


def test_the_lab_and_the_appliance_lease_by_one_rule(tmp_path):
    from appliance.system import dhcp
    assert dhcp.lease_range("198.18.0.0/24", "198.18.0.1") == ("198.18.0.128", "198.18.0.254")
    assert dhcp.lease_range("198.18.0.0/24", "198.18.0.254") == ("198.18.0.128", "198.18.0.253")
    lab = dhcp.write_config(tmp_path / "lab", "dev0", "198.18.0.1", "198.18.0.0/20", "/run/x.sock")
    lab = lab.read_text()
    appliance = site.render(site.load(write(tmp_path, WIRED)))["dnsmasq.conf"]
    ranges = {line for text in (lab, appliance) for line in text.splitlines()
              if line.startswith("dhcp-range=")}
    assert ranges == {"dhcp-range=198.18.8.0,198.18.15.254,255.255.240.0,12h"}


def test_the_site_file_sets_notifications_checked_as_the_supervisor_checks_them(tmp_path):
    from appliance.system import site as site_mod
    base = {"network": {"devices_interface": "eth1", "uplink_interface": "eth0", "isolation": "switch"}}
    good = site_mod.parse({**base, "notify": {"min_severity": "critical", "ntfy_url": "https://ntfy.sh",
                                              "ntfy_topic": "site-kalki"}}, "kalki.toml")
    cfg = site_mod.supervisor_config(good)
    assert (cfg.notify.min_severity, cfg.notify.ntfy_url, cfg.notify.ntfy_topic) == (
        "critical", "https://ntfy.sh", "site-kalki")
    for bad, words in [({"nfty_url": "https://x"}, "nfty_url"), ("yes", "notify: expected a table"),
                       ({"ntfy_url": "http://ntfy.sh", "ntfy_topic": "t"}, "ntfy_url")]:
        with pytest.raises(site_mod.SiteError) as e:
            site_mod.parse({**base, "notify": bad}, "kalki.toml")
        assert "kalki.toml" in str(e.value) and words in str(e.value), str(e.value)
