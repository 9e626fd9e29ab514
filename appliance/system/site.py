"""Site settings: the `kalki.toml` a technician drops on the SD card's FAT partition before
the first boot, the way Raspberry Pi users already drop files there.

    [network]
    devices_interface = "wlan0"      # faces the IoT devices (a wlan* interface: an access point)
    uplink_interface = "eth0"        # faces the network (DHCP client)
    isolation = "auto"               # what keeps devices apart: auto, ap_isolate, switch, none
    [wifi]                           # only, and then required, when the devices side is wlan*
    ssid = "kalki-devices"
    passphrase = "at least 8 characters"   # WPA2-PSK, 8 to 63 printable ASCII characters
    country = "DE"                   # optional regulatory domain
    [time]
    timezone = "Europe/Berlin"
    [business_hours]
    days = ["mon", "tue", "wed", "thu", "fri"]
    start = "08:00"
    end = "18:00"
    [ssh]
    enabled = true
    authorized_key = "ssh-ed25519 AAAA... technician@laptop"
    [mqtt]
    home_assistant_password = "16 to 128 characters"  # taken once, if the broker has none yet

`load` validates it (unknown keys are errors; every message names the file and the key).
`isolation_warning` says, in plain words, when devices on the devices side may reach each other
without crossing the gateway (docs/image.md, "Device isolation on Wi-Fi"); the supervisor shows
it in its status, on the page and on the LEDs.
`render` turns it into what the image's services run from: the supervisor's kalki.toml (via
appliance.config, so the supervisor's own validation applies too), hostapd.conf, dnsmasq.conf,
the systemd-networkd files, the uplink NAT table and SSH's authorized_keys.

`apply` is what the image's kalki-site.service runs at every boot. It never falls back to an
open network: with a missing or wrong file it writes the error to the status file (which the
supervisor, the web page and the LEDs show) and renders a fail-closed set instead: no access
point, no DHCP on the devices side, no NAT, no SSH, and a kalki.toml with the interfaces it
could read (so the supervisor still starts and shows the error). While the status file exists,
the image keeps its boot firewall (nothing forwarded) in place.

    python -m appliance.system.site check /boot/firmware/kalki.toml
    python -m appliance.system.site apply [--source F] [--out DIR] [--error-file F]
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import ipaddress
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from appliance import config
from appliance.errors import ConfigError, KalkiError
from appliance.system import broker, dhcp
from appliance.vocab import WORKDAYS, check_business_hours, check_timezone

SOURCE = Path("/boot/firmware/kalki.toml")
OUT = Path("/run/kalki/site")
ERROR_FILE = Path("/run/kalki/site-error")
STATE_DIR = "/var/lib/kalki"                        # the data partition
LEASE_FILE = f"{STATE_DIR}/dnsmasq/leases"
PASSWORD_FILE = "/var/lib/kalki/secrets/mqtt-password"
BROKER_DIRECTORY = f"{STATE_DIR}/mqtt"             # kalki-mosquitto.service runs from there
PROFILES = "/opt/kalki/umboxes"
# The passphrase of kalki.toml.example: refused, so that no card runs with a published one.
PLACEHOLDER_PASSPHRASE = "CHANGE-ME-8-to-63-characters"

IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
COUNTRY = re.compile(r"[A-Z]{2}")
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
             "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
             "sk-ecdsa-sha2-nistp256@openssh.com")

# network.isolation: what keeps the devices apart below the gateway, so that traffic between two
# of them crosses the data path (lateral_block) at all. "auto" judges from the devices interface's
# driver; "ap_isolate" (the access point's driver honours hostapd's ap_isolate) and "switch" (wired
# ports on a switch with port isolation) are the operator's word; "none": the site knows there is
# nothing, and the warning stays.
ISOLATION = ("auto", "ap_isolate", "switch", "none")
# The Pi's built-in Wi-Fi. In Debian 12's kernel (6.1) its driver has no change_bss operation, so
# hostapd's ap_isolate (NL80211_CMD_SET_BSS) is refused with EOPNOTSUPP, which hostapd ignores, and
# the chip's firmware goes on forwarding frames between stations itself. Support came with
# commit d358795df908 (wireless-next, September 2025), years after this kernel.
BUILTIN_WIFI_DRIVERS = frozenset({"brcmfmac"})
SYS_CLASS_NET = Path("/sys/class/net")

# Every file render() can produce; apply() removes the ones a new rendering leaves out, so a
# setting turned off (SSH, Wi-Fi) does not survive in a stale file.
FILES = ("kalki.toml", "hostapd.conf", "dnsmasq.conf", "nat.nft", "authorized_keys",
         "ssh-enabled", "network/10-kalki-uplink.network", "network/10-kalki-devices.network")


class SiteError(ConfigError):
    """The site file is missing or wrong; the message names the file and the key."""


@dataclass
class Wifi:
    ssid: str
    passphrase: str = field(repr=False)     # a repr ends up in logs and tracebacks
    country: str = ""
    channel: int = 6


@dataclass
class Site:
    devices_interface: str = "wlan0"
    uplink_interface: str = "eth0"
    isolation: str = "auto"
    address: str = "198.18.0.1"
    lan: str = "198.18.0.0/20"
    wifi: Wifi | None = None
    timezone: str = "UTC"
    business_days: list = field(default_factory=lambda: list(WORKDAYS))
    business_start: str = "08:00"
    business_end: str = "18:00"
    ssh_enabled: bool = False
    ssh_authorized_key: str = ""
    notify: dict = field(default_factory=dict)    # the supervisor's [notify] keys, as given
    # Never rendered: only its hash goes into the broker's password file (home_assistant_password).
    home_assistant_password: str = field(default="", repr=False)
    path: str = ""

    @property
    def wireless(self) -> bool:
        return is_wireless(self.devices_interface)


def is_wireless(interface: str) -> bool:
    # By name: the image turns predictable names off (net.ifnames=0), so Wi-Fi is wlan0.
    return interface.startswith("wl")


# -- parsing ---------------------------------------------------------------------------------
def _table(data, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(data, dict):
        raise SiteError(f"{where}: expected a table")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SiteError(f"{where}: unknown key(s) {unknown} (known: {', '.join(allowed)})")
    return data


# Keys whose values a site error never shows: a mistyped secret is a secret still.
SECRET_KEYS = frozenset({"passphrase", "home_assistant_password"})


def _str(data: dict, key: str, where: str, default=None) -> str:
    value = data.get(key, default)
    if value is None:
        raise SiteError(f"{where}.{key}: required")
    if not isinstance(value, str):
        got = f"a value of type {type(value).__name__}" if key in SECRET_KEYS else repr(value)
        raise SiteError(f"{where}.{key}: expected a string, got {got}")
    return value


def _interface(data: dict, key: str, where: str, default: str) -> str:
    value = _str(data, key, where, default)
    if not IFNAME.fullmatch(value):
        raise SiteError(f"{where}.{key}: {value!r} is not an interface name")
    return value


def check_passphrase(value: str, where: str) -> str:
    # WPA2-PSK: 8 to 63 printable ASCII characters (IEEE 802.11i, annex H.4).
    if not 8 <= len(value) <= 63:
        raise SiteError(f"{where}: a WPA2 passphrase has 8 to 63 characters, this one {len(value)}")
    if any(not 32 <= ord(c) <= 126 for c in value):
        raise SiteError(f"{where}: only printable ASCII characters (no accents, no control characters)")
    if value == PLACEHOLDER_PASSPHRASE:
        raise SiteError(f"{where}: still the example's placeholder; choose your own passphrase")
    return value


def check_authorized_key(value: str, where: str) -> str:
    parts = value.strip().split(None, 2)
    if "\n" in value.strip() or len(parts) < 2 or parts[0] not in KEY_TYPES:
        raise SiteError(f"{where}: expected one public key line, e.g. 'ssh-ed25519 AAAA... name' "
                        f"(types: {', '.join(KEY_TYPES)})")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise SiteError(f"{where}: the key's second field is not base64") from None
    kind = parts[0].encode()
    if blob[:4] != len(kind).to_bytes(4, "big") or blob[4:4 + len(kind)] != kind:
        raise SiteError(f"{where}: the key data is not a {parts[0]} key")
    return " ".join(parts)


def parse(data: dict, path: str = "kalki.toml") -> Site:
    """The site file as a Site; SiteError names the file and the key at fault."""
    top = _table(data, path, ("network", "wifi", "time", "business_hours", "ssh", "notify", "mqtt"))
    site = Site(path=path)
    _parse_network(site, top.get("network", {}), path)
    _parse_wifi(site, top, path)
    _parse_time(site, top.get("time", {}), top.get("business_hours", {}), path)
    _parse_ssh(site, top.get("ssh", {}), path)
    _parse_mqtt(site, top.get("mqtt", {}), path)
    site.notify = top.get("notify", {})
    if not isinstance(site.notify, dict):
        raise SiteError(f"{path}: notify: expected a table (the supervisor's [notify] keys)")
    try:
        supervisor_config(site).check()
    except ConfigError as e:
        raise SiteError(f"{path}: {e}") from None
    return site

def _parse_network(site: Site, section: dict, path: str) -> None:
    net = _table(section, f"{path}: network",
                 ("devices_interface", "uplink_interface", "isolation", "address", "lan"))
    w = f"{path}: network"
    site.devices_interface = _interface(net, "devices_interface", w, site.devices_interface)
    site.uplink_interface = _interface(net, "uplink_interface", w, site.uplink_interface)
    if site.devices_interface == site.uplink_interface:
        raise SiteError(f"{w}.devices_interface: the same interface as uplink_interface "
                        f"({site.uplink_interface!r}); the devices must be on their own side")
    site.isolation = _isolation(net, w, site)
    site.lan = _str(net, "lan", w, site.lan)
    site.address = _str(net, "address", w, site.address)
    try:
        lan = ipaddress.IPv4Network(site.lan)
    except ValueError as e:
        raise SiteError(f"{w}.lan: {e}") from None
    try:
        address = ipaddress.IPv4Address(site.address)
    except ValueError as e:
        raise SiteError(f"{w}.address: {e}") from None
    if address not in lan or address in (lan.network_address, lan.broadcast_address):
        raise SiteError(f"{w}.address: {address} is not a host address of lan {lan}")
    if lan.prefixlen > 28:
        raise SiteError(f"{w}.lan: {lan} leaves too few addresses for devices (at most /28)")


def _isolation(net: dict, where: str, site: Site) -> str:
    value = net.get("isolation", site.isolation)
    if value not in ISOLATION:
        raise SiteError(f"{where}.isolation: expected one of {', '.join(ISOLATION)}, got {value!r}")
    if value == "ap_isolate" and not site.wireless:
        raise SiteError(f"{where}.isolation: \"ap_isolate\" is an access point's setting and "
                        f"devices_interface {site.devices_interface!r} is wired; say \"switch\" for "
                        f"ports on an isolating switch, or \"none\"")
    if value == "switch" and site.wireless:
        raise SiteError(f"{where}.isolation: \"switch\" is for a wired devices_interface, not "
                        f"{site.devices_interface!r}; say \"ap_isolate\" for a Wi-Fi adapter whose "
                        f"driver honours it, or \"none\"")
    return value


def _parse_wifi(site: Site, top: dict, path: str) -> None:
    if "wifi" in top:
        wt = _table(top["wifi"], f"{path}: wifi", ("ssid", "passphrase", "country", "channel"))
        w = f"{path}: wifi"
        if not site.wireless:
            raise SiteError(f"{w}: a Wi-Fi access point needs a wireless devices_interface "
                            f"(wlan0), not {site.devices_interface!r}; remove [wifi] or change "
                            f"network.devices_interface")
        ssid = _str(wt, "ssid", w)
        if not 1 <= len(ssid.encode()) <= 32:
            raise SiteError(f"{w}.ssid: 1 to 32 bytes, got {len(ssid.encode())}")
        passphrase = check_passphrase(_str(wt, "passphrase", w), f"{w}.passphrase")
        country = _str(wt, "country", w, "")
        if country and not COUNTRY.fullmatch(country):
            raise SiteError(f"{w}.country: expected a two-letter country code like 'DE', got {country!r}")
        channel = wt.get("channel", 6)
        if not isinstance(channel, int) or isinstance(channel, bool) or not 1 <= channel <= 13:
            raise SiteError(f"{w}.channel: expected a 2.4 GHz channel 1 to 13, got {channel!r}")
        site.wifi = Wifi(ssid, passphrase, country, channel)
    elif site.wireless:
        raise SiteError(f"{path}: wifi: required when network.devices_interface is "
                        f"{site.devices_interface!r} (ssid and passphrase of the devices' access "
                        f"point); there is no open Wi-Fi")


def _parse_time(site: Site, time_section: dict, hours_section: dict, path: str) -> None:
    tt = _table(time_section, f"{path}: time", ("timezone",))
    site.timezone = _str(tt, "timezone", f"{path}: time", site.timezone)
    check_timezone(site.timezone, f"{path}: time.timezone", SiteError)
    bt = _table(hours_section, f"{path}: business_hours", ("days", "start", "end"))
    w = f"{path}: business_hours"
    hours = check_business_hours({"days": bt.get("days", site.business_days),
                                  "start": bt.get("start", site.business_start),
                                  "end": bt.get("end", site.business_end)}, w, SiteError)
    site.business_days, site.business_start, site.business_end = hours["days"], hours["start"], hours["end"]


def _parse_ssh(site: Site, section: dict, path: str) -> None:
    st = _table(section, f"{path}: ssh", ("enabled", "authorized_key"))
    enabled = st.get("enabled", False)
    if not isinstance(enabled, bool):
        raise SiteError(f"{path}: ssh.enabled: expected true or false, got {enabled!r}")
    if "authorized_key" in st:
        site.ssh_authorized_key = check_authorized_key(
            _str(st, "authorized_key", f"{path}: ssh"), f"{path}: ssh.authorized_key")
    if enabled and not site.ssh_authorized_key:
        raise SiteError(f"{path}: ssh.authorized_key: required when ssh.enabled is true "
                        f"(SSH logs in only with a key)")
    site.ssh_enabled = enabled


def _parse_mqtt(site: Site, section: dict, path: str) -> None:
    mt = _table(section, f"{path}: mqtt", ("home_assistant_password",))
    if "home_assistant_password" in mt:
        where = f"{path}: mqtt.home_assistant_password"
        value = _str(mt, "home_assistant_password", f"{path}: mqtt")
        # It guards the posture commands, and the broker lets anyone on the network try it.
        if not 16 <= len(value) <= 128:
            raise SiteError(f"{where}: 16 to 128 characters, this one {len(value)}")
        if any(not 33 <= ord(c) <= 126 for c in value):
            raise SiteError(f"{where}: only printable ASCII characters, no spaces")
        site.home_assistant_password = value


def home_assistant_password(site: Site, directory: Path | str = BROKER_DIRECTORY) -> str:
    """The site file's [mqtt] home_assistant_password put into the broker's password file in
    directory (its hash only), when the broker has none yet for Home Assistant's user: the
    first boot's, or one set later from the page, is never replaced by the card's. Says what
    was done. (kalki-firstboot, before the broker starts.)"""
    if not site.home_assistant_password:
        return "no Home Assistant password in the site file"
    cfg = supervisor_config(site)
    user = cfg.mqtt.home_assistant_user
    if not user:
        return "no Home Assistant user (mqtt.home_assistant_user is empty)"
    if broker.password_is_set(Path(directory), user):
        return (f"Home Assistant's broker user {user} has a password already: the site file's is "
                "not used (the web page's Settings set a new one)")
    running = broker.set_password(Path(directory), user, site.home_assistant_password,
                                  (cfg.mqtt.host, cfg.mqtt.port))
    return (f"Home Assistant's broker user {user} has the site file's password"
            + (" (the broker re-read it)" if running else ""))


def load(path: Path | str = SOURCE) -> Site:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SiteError(f"{path}: missing: put the site settings there before the first boot "
                        f"(see kalki.toml.example next to it)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SiteError(f"{path}: cannot be read: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SiteError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise SiteError(f"{path}: not valid TOML: nested too deeply") from None
    return parse(data, str(path))


# -- isolation between devices ---------------------------------------------------------------
def interface_driver(interface: str, sys_class_net: Path = SYS_CLASS_NET) -> str | None:
    """The kernel driver of a network interface: the name its device/driver link points to
    (brcmfmac for the Pi's own Wi-Fi, rt2800usb for a USB adapter, r8152 for a USB Ethernet
    adapter). None for a virtual interface or one that is not there (yet)."""
    if not IFNAME.fullmatch(interface) or interface.startswith("."):
        return None
    try:
        return os.path.basename(os.readlink(sys_class_net / interface / "device" / "driver")) or None
    except OSError:
        return None


def isolation_warning(site: Site, driver: str | None) -> str | None:
    """In plain words, why devices on the devices side may reach each other without crossing the
    gateway (where lateral_block would see it); None where the site has isolation. `driver`: the
    devices interface's (interface_driver)."""
    if site.isolation == "none":
        return (f"Devices on {site.devices_interface} may reach each other directly (the site file "
                f"says isolation = \"none\"), so lateral_block does not see that traffic.")
    if site.wireless and driver in BUILTIN_WIFI_DRIVERS:
        # Even if the site file says ap_isolate: this kernel's driver cannot pass it on.
        return (f"Devices on the built-in Wi-Fi ({driver}) may reach each other directly: its "
                f"driver in this kernel ignores ap_isolate, so lateral_block does not see that "
                f"traffic. Use a USB Wi-Fi adapter whose driver honours ap_isolate, or wired ports "
                f"on an isolating switch, and say so in the site file (isolation = ...).")
    if site.isolation in ("ap_isolate", "switch"):
        return None
    if site.wireless:
        return (f"Devices on the Wi-Fi adapter ({driver or 'driver unknown'}) may reach each other "
                f"directly: whether its driver honours ap_isolate is not known, so lateral_block "
                f"may not see that traffic. If it does, say so in the site file "
                f"(isolation = \"ap_isolate\").")
    return (f"Devices on the wired devices side ({site.devices_interface}"
            f"{', ' + driver if driver else ''}) may reach each other directly through a switch, "
            f"so lateral_block does not see that traffic. Use ports on a switch with port "
            f"isolation and say so in the site file (isolation = \"switch\").")


def isolation_warning_now(source: Path = SOURCE, sys_class_net: Path = SYS_CLASS_NET) -> str | None:
    """For the supervisor (appliance.run): the warning for the card's site file and the devices
    interface's driver as they are now. None without a site file (not the image: the lab, a
    development machine) and for a wrong one (its error is shown instead, and the devices side
    stays closed)."""
    if not Path(source).exists():
        return None
    try:
        site = load(source)
    except SiteError:
        return None
    return isolation_warning(site, interface_driver(site.devices_interface, sys_class_net))


# -- rendering -------------------------------------------------------------------------------
def is_raspberry_pi(model_file: Path = Path("/sys/firmware/devicetree/base/model")) -> bool:
    """The posture LEDs and the button are on a Pi's GPIO header; elsewhere (qemu's boot test)
    there is none, and the panel stays off."""
    try:
        return model_file.read_bytes().startswith(b"Raspberry Pi")
    except OSError:
        return False


def supervisor_config(site: Site, panel: bool = False) -> config.Config:
    cfg = config.Config()
    cfg.web.enabled = True               # the operator's page; certificate on the data partition
    cfg.web.tls_dir = f"{STATE_DIR}/tls"
    cfg.panel.enabled = panel
    cfg.profiles = PROFILES
    cfg.gateway.devices_interface = site.devices_interface
    cfg.gateway.uplink_interface = site.uplink_interface
    cfg.gateway.address = site.address
    cfg.gateway.lan = site.lan
    cfg.gateway.dhcp_leases = LEASE_FILE
    if site.notify:     # alerts to ntfy, a webhook, e-mail: checked as the supervisor checks them
        cfg.notify = config._build(type(cfg.notify), site.notify, "notify")
    if site.wifi:   # hostapd's station events: a MAC two radios fight over is a clone
        cfg.stations.hostapd_control = f"{HOSTAPD_CONTROL_DIR}/{site.devices_interface}"
    cfg.state.directory = STATE_DIR
    cfg.mqtt.password_file = PASSWORD_FILE
    cfg.mqtt.broker_directory = BROKER_DIRECTORY
    cfg.policy.timezone = site.timezone
    cfg.policy.business_days = list(site.business_days)
    cfg.policy.business_start = site.business_start
    cfg.policy.business_end = site.business_end
    return cfg


def wpa_psk(ssid: str, passphrase: str) -> str:
    """The 256-bit PSK hostapd would derive (PBKDF2-SHA1, 4096 rounds, salted with the SSID):
    no passphrase in hostapd.conf and no quoting problems."""
    return hashlib.pbkdf2_hmac("sha1", passphrase.encode(), ssid.encode(), 4096, 32).hex()


HOSTAPD_CONTROL_DIR = "/run/hostapd"


def hostapd_conf(site: Site) -> str:
    wifi = site.wifi
    if wifi is None:
        raise SiteError(f"hostapd.conf: the site has no [wifi] settings (devices interface "
                        f"{site.devices_interface!r})")
    lines = [
        "# Rendered at boot from the site settings by appliance/system/site.py; do not edit.",
        f"interface={site.devices_interface}",
        "driver=nl80211",
        f"ctrl_interface={HOSTAPD_CONTROL_DIR}",
        f"ssid2={wifi.ssid.encode().hex()}",
        "utf8_ssid=1",
        "hw_mode=g",
        f"channel={wifi.channel}",
        "ieee80211n=1",
        "wmm_enabled=1",
        "auth_algs=1",
        "ignore_broadcast_ssid=0",
        # Device to device traffic must cross the gateway (lateral-movement protection), if the
        # driver honours it: the built-in Wi-Fi's does not (isolation_warning).
        "ap_isolate=1",
        "wpa=2",
        "wpa_key_mgmt=WPA-PSK",
        "rsn_pairwise=CCMP",
        f"wpa_psk={wpa_psk(wifi.ssid, wifi.passphrase)}",
    ]
    if wifi.country:
        lines += [f"country_code={wifi.country}", "ieee80211d=1"]
    return "\n".join(lines) + "\n"


def dnsmasq_conf(site: Site) -> str:
    return ("# Rendered at boot from the site settings by appliance/system/site.py; do not edit.\n"
            "# DHCP and DNS for the devices side only.\n"
            + dhcp.dnsmasq_conf(
                site.devices_interface, site.address, site.lan, LEASE_FILE,
                # The uplink's name servers as systemd-resolved learnt them (not its stub).
                upstream=["resolv-file=/run/systemd/resolve/resolv.conf", "domain-needed", "bogus-priv"],
                extra=["bind-dynamic"]))


def networkd_files(site: Site) -> dict[str, str]:
    prefix = ipaddress.IPv4Network(site.lan).prefixlen
    return {
        "network/10-kalki-uplink.network": "\n".join([
            "# Rendered at boot from the site settings; the uplink is a DHCP client.",
            "[Match]", f"Name={site.uplink_interface}", "",
            "[Network]", "DHCP=yes", "", ""]),
        "network/10-kalki-devices.network": "\n".join([
            "# Rendered at boot from the site settings; the gateway's address on the devices side.",
            "[Match]", f"Name={site.devices_interface}", "",
            "[Link]", "RequiredForOnline=no", "",
            "[Network]", f"Address={site.address}/{prefix}", "ConfigureWithoutCarrier=yes",
            "LinkLocalAddressing=no", "IPv6AcceptRA=no", "", ""]),
    }


def nat_nft(site: Site) -> str:
    # Its own table: the supervisor owns `inet kalki` and the boot firewall is `inet kalki_boot`.
    return "\n".join([
        "# Rendered at boot from the site settings: the devices' network leaves through the uplink.",
        "table ip kalki_nat",
        "delete table ip kalki_nat",
        "table ip kalki_nat {",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{site.uplink_interface}" ip saddr {site.lan} masquerade',
        "  }",
        "}",
        "",
    ])


def render(site: Site, panel: bool = False) -> dict[str, str]:
    """Every file of a good site, by name relative to the output directory."""
    files = {"kalki.toml": config.dump(supervisor_config(site, panel)),
             "dnsmasq.conf": dnsmasq_conf(site),
             "nat.nft": nat_nft(site),
             **networkd_files(site)}
    if site.wifi:
        files["hostapd.conf"] = hostapd_conf(site)
    if site.ssh_enabled:
        files["authorized_keys"] = site.ssh_authorized_key + "\n"
        files["ssh-enabled"] = "\n"
    return files


def render_fail_closed(site: Site | None = None, panel: bool = False) -> dict[str, str]:
    """After an error: only the supervisor's kalki.toml (so it starts and shows the error) and
    the uplink's DHCP client (so the web page can be reached). No access point, no DHCP or DNS
    for the devices, no NAT, no SSH."""
    site = site or Site()
    files = {"kalki.toml": config.dump(supervisor_config(site, panel))}
    files["network/10-kalki-uplink.network"] = networkd_files(site)["network/10-kalki-uplink.network"]
    return files


def _interfaces_only(path: Path) -> Site:
    """What of a bad file can still be used for the fail-closed set: the interface names."""
    site = Site()
    try:
        net = tomllib.loads(path.read_text(encoding="utf-8")).get("network", {})
        net = net if isinstance(net, dict) else {}
        for key in ("devices_interface", "uplink_interface"):
            value = net.get(key)
            if isinstance(value, str) and IFNAME.fullmatch(value):
                setattr(site, key, value)
        if site.devices_interface == site.uplink_interface:
            site = Site()
    except Exception:  # noqa: BLE001 - a broken file only means: defaults
        pass
    return site


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def apply(source: Path = SOURCE, out: Path = OUT, error_file: Path = ERROR_FILE,
          panel: bool | None = None) -> tuple[bool, str]:
    """Render the site into out; returns (ok, message). Never raises for a bad site file.
    panel: drive the LEDs and the button (default: on a Raspberry Pi)."""
    source, out, error_file = Path(source), Path(out), Path(error_file)
    panel = is_raspberry_pi() if panel is None else panel
    try:
        site = load(source)
        files, ok, message = render(site, panel), True, f"{source}: site settings applied"
    except SiteError as e:
        files, ok, message = render_fail_closed(_interfaces_only(source), panel), False, str(e)
    for name in FILES:
        if name not in files:
            (out / name).unlink(missing_ok=True)
    for name, text in files.items():
        _write(out / name, text, 0o600 if name in ("hostapd.conf", "authorized_keys") else 0o644)
    if ok:
        error_file.unlink(missing_ok=True)
    else:
        _write(error_file, message + "\n")
    return ok, message


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m appliance.system.site",
                                 description="the SD card's site settings (kalki.toml on the FAT partition)")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate a site file")
    p.add_argument("file", nargs="?", default=str(SOURCE))
    p = sub.add_parser("apply", help="render the services' configuration from the site file")
    p.add_argument("--source", default=str(SOURCE))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--error-file", default=str(ERROR_FILE))
    p = sub.add_parser("home-assistant-password", help="the site file's [mqtt] "
                       "home_assistant_password into the broker's password file, if it has none")
    p.add_argument("--source", default=str(SOURCE))
    p.add_argument("--broker-directory", default=BROKER_DIRECTORY)
    args = ap.parse_args(argv)
    if args.command == "home-assistant-password":
        try:
            said = home_assistant_password(load(args.source), args.broker_directory)
        except KalkiError as e:     # a wrong site file is apply's to report; nothing done here
            print(f"kalki-site: {e}; no Home Assistant password set", file=sys.stderr)
            return 1
        print(f"kalki-site: {said}")
        return 0
    if args.command == "check":
        try:
            load(args.file)
        except SiteError as e:
            print(f"kalki-site: {e}", file=sys.stderr)
            return 1
        print(f"kalki-site: {args.file}: ok")
        return 0
    ok, message = apply(Path(args.source), Path(args.out), Path(args.error_file))
    print(f"kalki-site: {message}" if ok else
          f"kalki-site: ERROR: {message}; the devices side stays closed (fail-closed)",
          file=sys.stdout if ok else sys.stderr, flush=True)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
