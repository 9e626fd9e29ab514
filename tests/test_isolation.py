"""Isolation between devices (issue "Faults", item 16): the site file's network.isolation, the
warning for the devices interface's driver (appliance.system.site.isolation_warning), and how
it reaches the status, the LEDs' summary and the web page. No root: sysfs is a tree in tmp_path."""
import asyncio
import re

import aiohttp
import pytest
from fakes import FakeDataplane, supervisor

from appliance import config
from appliance.faces.panel import PATTERNS
from appliance.faces.web import create_app, listening_socket, serve
from appliance.supervisor import accounts
from appliance.supervisor.ops import Ops
from appliance.system import site
from appliance.system.site import Site, SiteError, Wifi

WIFI = '[wifi]\nssid = "kalki-devices"\npassphrase = "correct horse battery"\n'


def toml(devices="wlan0", isolation=None):
    net = f'[network]\ndevices_interface = "{devices}"\nuplink_interface = "eth0"\n'
    if isolation is not None:
        net += f"isolation = {isolation}\n"
    return net + (WIFI if devices.startswith("wl") else "")


def write(tmp_path, text):
    path = tmp_path / "kalki.toml"
    path.write_text(text)
    return path


def a_site(devices="wlan0", isolation="auto"):
    wifi = Wifi("kalki-devices", "correct horse battery") if devices.startswith("wl") else None
    return Site(devices_interface=devices, isolation=isolation, wifi=wifi)


# -- the site file ---------------------------------------------------------------------------
def test_isolation_defaults_to_auto(tmp_path):
    assert site.load(write(tmp_path, toml())).isolation == "auto"
    assert site.load(write(tmp_path, toml("eth1"))).isolation == "auto"


@pytest.mark.parametrize("devices, isolation", [
    ("wlan0", "auto"), ("wlan0", "ap_isolate"), ("wlan0", "none"),
    ("eth1", "auto"), ("eth1", "switch"), ("eth1", "none"),
])
def test_each_setting_that_fits_the_devices_side_loads(tmp_path, devices, isolation):
    s = site.load(write(tmp_path, toml(devices, f'"{isolation}"')))
    assert s.isolation == isolation
    assert site.render(s)["kalki.toml"]       # the supervisor's configuration is unchanged by it


@pytest.mark.parametrize("devices, value, words", [
    ("wlan0", '"isolated"', "expected one of auto, ap_isolate, switch, none, got 'isolated'"),
    ("wlan0", "true", "expected one of auto, ap_isolate, switch, none, got True"),
    ("wlan0", '""', "got ''"),
    ("wlan0", '"switch"', '"switch" is for a wired devices_interface, not \'wlan0\''),
    ("eth1", '"ap_isolate"', '"ap_isolate" is an access point\'s setting and devices_interface '
                             "'eth1' is wired"),
])
def test_a_wrong_isolation_names_the_file_and_the_key(tmp_path, devices, value, words):
    path = write(tmp_path, toml(devices, value))
    with pytest.raises(SiteError) as e:
        site.load(path)
    assert str(e.value).startswith(f"{path}: network.isolation: ")
    assert words in str(e.value)


def test_a_wrong_isolation_leaves_the_devices_side_closed(tmp_path):
    out, err = tmp_path / "out", tmp_path / "err"
    ok, message = site.apply(write(tmp_path, toml("wlan0", '"switch"')), out, err, panel=False)
    assert not ok and "network.isolation" in err.read_text()
    assert not (out / "hostapd.conf").exists() and not (out / "dnsmasq.conf").exists()


def test_hostapd_asks_for_isolation_whatever_the_setting(tmp_path):
    for isolation in ("auto", "ap_isolate", "none"):
        s = site.load(write(tmp_path, toml("wlan0", f'"{isolation}"')))
        assert "\nap_isolate=1\n" in site.render(s)["hostapd.conf"]


# -- the warning -----------------------------------------------------------------------------
BUILTIN = ("Devices on the built-in Wi-Fi (brcmfmac) may reach each other directly: its driver in "
           "this kernel ignores ap_isolate, so lateral_block does not see that traffic. Use a USB "
           "Wi-Fi adapter whose driver honours ap_isolate, or wired ports on an isolating switch, "
           "and say so in the site file (isolation = ...).")


@pytest.mark.parametrize("isolation", ["auto", "ap_isolate"])
def test_the_builtin_wifi_is_never_taken_as_isolated(isolation):
    # ap_isolate is the operator's word, but this kernel's brcmfmac has no change_bss at all.
    assert site.isolation_warning(a_site("wlan0", isolation), "brcmfmac") == BUILTIN


@pytest.mark.parametrize("driver", ["rt2800usb", "mt76x2u", "mt7601u", None])
def test_a_usb_wifi_adapter_is_unknown_until_the_site_says_ap_isolate(driver):
    warning = site.isolation_warning(a_site("wlan0", "auto"), driver)
    assert warning and "not known" in warning and 'isolation = "ap_isolate"' in warning
    assert f"({driver or 'driver unknown'})" in warning
    assert site.isolation_warning(a_site("wlan0", "ap_isolate"), driver) is None


@pytest.mark.parametrize("driver", ["r8152", "smsc95xx", "lan78xx", "bcmgenet", None])
def test_a_wired_devices_side_is_unknown_until_the_site_says_switch(driver):
    warning = site.isolation_warning(a_site("eth1", "auto"), driver)
    assert warning and warning.startswith("Devices on the wired devices side (eth1")
    assert (f"eth1, {driver})" if driver else "(eth1)") in warning
    assert 'isolation = "switch"' in warning and "lateral_block does not see" in warning
    assert site.isolation_warning(a_site("eth1", "switch"), driver) is None


@pytest.mark.parametrize("devices, driver", [
    ("wlan0", "brcmfmac"), ("wlan0", "rt2800usb"), ("wlan0", None), ("eth1", "r8152"), ("eth1", None),
])
def test_none_keeps_the_warning_on(devices, driver):
    assert site.isolation_warning(a_site(devices, "none"), driver) == (
        f'Devices on {devices} may reach each other directly (the site file says isolation = '
        f'"none"), so lateral_block does not see that traffic.')


# -- the driver, from sysfs ------------------------------------------------------------------
def fake_sysfs(root, interface, driver, bus="sdio"):
    """/sys/class/net/<if>/device -> the device, whose driver -> /sys/bus/<bus>/drivers/<driver>."""
    drivers = root / "bus" / bus / "drivers" / driver
    drivers.mkdir(parents=True, exist_ok=True)
    device = root / "devices" / f"{interface}-device"
    device.mkdir(parents=True)
    (device / "driver").symlink_to(drivers)
    net = root / "class" / "net" / interface
    net.mkdir(parents=True)
    (net / "device").symlink_to(device)
    return root / "class" / "net"


def test_the_driver_is_read_from_the_interfaces_device_link(tmp_path):
    net = fake_sysfs(tmp_path, "wlan0", "brcmfmac")
    fake_sysfs(tmp_path, "wlan1", "rt2800usb", bus="usb")
    (net / "veth0").mkdir()                               # virtual: no device link
    assert site.interface_driver("wlan0", net) == "brcmfmac"
    assert site.interface_driver("wlan1", net) == "rt2800usb"
    assert site.interface_driver("veth0", net) is None
    assert site.interface_driver("eth9", net) is None     # not there (yet)
    assert site.interface_driver("..", net) is None
    assert site.interface_driver("a/b", net) is None


def test_the_warning_now_is_the_card_s_site_and_the_driver(tmp_path):
    net = fake_sysfs(tmp_path / "sys", "wlan0", "brcmfmac")
    assert site.isolation_warning_now(tmp_path / "absent.toml", net) is None      # not the image
    source = write(tmp_path, toml("wlan0", '"ap_isolate"'))
    assert site.isolation_warning_now(source, net) == BUILTIN
    source.write_text(toml("wlan0", '"nonsense"'))
    assert site.isolation_warning_now(source, net) is None     # the site error says it, closed
    source.write_text(toml("eth1", '"switch"'))
    assert site.isolation_warning_now(source, net) is None


# -- status, LEDs, page ----------------------------------------------------------------------
@pytest.fixture
def sup(tmp_path):
    s = supervisor(tmp_path, camera1=("02:4b:00:00:00:01", "198.18.0.10", "camera"))
    yield s
    s.store.close()


def test_status_carries_the_warning(sup):
    assert Ops(sup).status()["isolation_warning"] is None
    sup.isolation_warning = BUILTIN
    assert Ops(sup).status()["isolation_warning"] == BUILTIN


def test_the_summary_warns_unless_an_alert_wins(sup):
    assert sup.summary() == "normal"
    sup.isolation_warning = BUILTIN
    assert sup.summary() == "warning"
    sup.set_posture("camera1", "attack", "test")
    assert sup.summary() == "alert"
    sup.set_posture("camera1", "normal", "test")
    sup.isolation_warning = None
    assert sup.summary() == "normal"


def test_the_leds_warning_pattern_names_it():
    words = PATTERNS["warning"]["meaning"] + " " + PATTERNS["warning"]["action"]
    assert "reach each other directly" in words and "isolation" in words


PASSWORD = "correct horse battery"


async def _page_after_login(sup, paths):
    sup.store.set_setting("admin", {"user": "admin", "scrypt": accounts.hash_password(PASSWORD)})
    server = await serve(create_app(Ops(sup), tls=False), listening_socket("127.0.0.1", 0))
    host, port = server.addresses[0]
    pages = {}
    try:
        async with aiohttp.ClientSession(f"http://{host}:{port}",
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as c:
            login = await (await c.get("/login")).text()
            pages["/login"] = login
            token = re.search(r'name="csrf-token" content="([^"]+)"', login).group(1)
            r = await c.post("/login", data={"user": "admin", "password": PASSWORD, "csrf": token},
                             allow_redirects=False)
            assert r.status == 303, await r.text()
            for path in paths:
                pages[path] = await (await c.get(path)).text()
    finally:
        await server.cleanup()
    return pages


@pytest.fixture
def web_sup(tmp_path):
    cfg = config.Config()
    cfg.state.directory = str(tmp_path / "state")
    cfg.mqtt.password_file = str(tmp_path / "mqtt-supervisor")
    cfg.web.tls = False
    from appliance.supervisor.core import Supervisor
    s = Supervisor(cfg)
    s.attach(FakeDataplane(), loop=None)
    yield s
    s.store.close()


def test_the_page_shows_a_warning_banner_not_the_site_error(web_sup):
    web_sup.isolation_warning = BUILTIN
    pages = asyncio.run(_page_after_login(web_sup, ["/", "/settings"]))
    for path in ("/", "/settings"):
        banner = re.search(r'<p class="([^"]+)" id="isolation-warning" role="status">([^<]*)</p>',
                           pages[path])
        assert banner, path
        assert banner.group(1) == "summary summary-warning"
        assert "built-in Wi-Fi (brcmfmac)" in banner.group(2)
        assert 'id="site-error"' not in pages[path] and 'class="error"' not in pages[path]
        assert 'data-summary="warning"' in pages["/"]
    assert 'id="isolation-warning"' not in pages["/login"]     # not before signing in


def test_no_banner_without_a_warning(web_sup):
    pages = asyncio.run(_page_after_login(web_sup, ["/"]))
    assert 'id="isolation-warning"' not in pages["/"]
