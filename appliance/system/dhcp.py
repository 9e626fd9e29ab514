"""The device side's DHCP (and DNS) server: dnsmasq, configured by the project.

dnsmasq runs `python -m appliance.system.dhcp` as its dhcp-script on every lease event; that hands
what the device said of itself (MAC, address, hostname, client id, vendor class) to the
supervisor over its control socket. The supervisor stays the only writer of the store.
"""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

from appliance import netns
from appliance.errors import ConfigError, KalkiError

DNSMASQ = "/usr/sbin/dnsmasq"


def write_config(directory: Path, interface: str, gateway_ip: str, lan: str, socket_path: str,
                 reserved: dict[str, str] | None = None) -> Path:
    """dnsmasq.conf for the device side: leases from the upper part of the LAN (the lower
    part is for fixed addresses), `reserved` = {mac: address} pinned, DNS answered locally."""
    net = ipaddress.IPv4Network(lan)
    if ipaddress.IPv4Address(gateway_ip) not in net:
        raise ConfigError(f"dhcp: gateway {gateway_ip} is not in {lan}")
    hosts = list(net.hosts())
    first, last = hosts[len(hosts) // 2], hosts[-1]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "lease-event"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m appliance.system.dhcp --socket {socket_path} \"$@\"\n")
    script.chmod(0o700)
    lines = [
        f"interface={interface}", "bind-interfaces", "except-interface=lo",
        f"listen-address={gateway_ip}",
        f"dhcp-range={first},{last},{net.netmask},12h",
        f"dhcp-option=option:router,{gateway_ip}", f"dhcp-option=option:dns-server,{gateway_ip}",
        f"dhcp-leasefile={directory / 'leases'}",
        f"dhcp-script={script}", "dhcp-scriptuser=root",
        "no-resolv", "no-hosts", "log-dhcp", f"log-facility={directory / 'dnsmasq.log'}",
        f"pid-file={directory / 'dnsmasq.pid'}", "user=root",
    ]
    lines += [f"dhcp-host={mac},{ip}" for mac, ip in (reserved or {}).items()]
    conf = directory / "dnsmasq.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def start(conf: Path, namespace: str | None = None) -> int:
    """Starts dnsmasq (in a namespace for the lab); returns its pid."""
    cmd = [DNSMASQ, f"--conf-file={conf}", "--keep-in-foreground"]
    if namespace:
        cmd = ["nsenter", f"--net={netns.path(namespace)}", *cmd]
    log = Path(conf).parent / "dnsmasq.out"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc.pid


def lease_event(socket_path: str, argv: list[str], env: dict) -> None:
    """dnsmasq calls: add|old|del MAC IP [HOSTNAME], details in DNSMASQ_* variables."""
    from appliance import client
    if len(argv) < 3 or argv[0] not in ("add", "old", "del"):
        return
    action, mac, ip = argv[:3]
    identity = {"hostname": (argv[3] if len(argv) > 3 else None) or env.get("DNSMASQ_SUPPLIED_HOSTNAME"),
                "client_id": env.get("DNSMASQ_CLIENT_ID"),
                "vendor_class": env.get("DNSMASQ_VENDOR_CLASS")}
    client.request(socket_path, "dhcp_lease", action=action, mac=mac, ip=ip,
                    identity={k: v for k, v in identity.items() if v})


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "--socket":
        print("usage: python -m appliance.system.dhcp --socket PATH add|old|del MAC IP [HOSTNAME]",
              file=sys.stderr)
        return 2
    try:
        lease_event(argv[1], argv[2:], dict(os.environ))
    except KalkiError as e:   # dnsmasq logs what the script printed
        print(f"kalki dhcp event: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
