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


def lease_range(lan: str, gateway_ip: str) -> tuple[str, str]:
    """The addresses leased: the upper half of the LAN's hosts (the lower half is for fixed
    addresses), never the gateway's own."""
    net = ipaddress.IPv4Network(lan)
    gateway = ipaddress.IPv4Address(gateway_ip)
    if gateway not in net:
        raise ConfigError(f"dhcp: gateway {gateway_ip} is not in {lan}")
    hosts = list(net.hosts())
    first, last = hosts[len(hosts) // 2], hosts[-1]
    if gateway == last:
        last = hosts[-2]
    elif gateway == first:
        first = hosts[len(hosts) // 2 + 1]
    return str(first), str(last)


def dnsmasq_conf(interface: str, gateway_ip: str, lan: str, lease_file: str, *,
                 upstream: list[str], lease_script: str | None = None,
                 reserved: dict[str, str] | None = None, extra: list[str] | None = None,
                 dns_port: int = 5301) -> str:
    """dnsmasq.conf for the devices side, the one rule for the lab and the appliance: DHCP and
    DNS on `interface` only, the gateway as router and name server, leases from lease_range(),
    `reserved` = {mac: address} pinned, each lease event to `lease_script` (as root: it talks
    to the root-only control socket). `upstream`: where DNS goes on (resolv-file=... or
    no-resolv). dnsmasq's DNS is on 127.0.0.1:`dns_port`, behind the supervisor's front on
    the devices' port 53 (appliance.dataplane.resolver, config names.upstream_port), which
    binds each answer in the data path; the devices' port `dns_port` is closed by XDP."""
    first, last = lease_range(lan, gateway_ip)
    lines = [
        f"interface={interface}", "listen-address=127.0.0.1", f"port={dns_port}",
        f"dhcp-range={first},{last},{ipaddress.IPv4Network(lan).netmask},12h",
        f"dhcp-option=option:router,{gateway_ip}", f"dhcp-option=option:dns-server,{gateway_ip}",
        "dhcp-authoritative", f"dhcp-leasefile={lease_file}", *upstream,
    ]
    if lease_script:
        lines += [f"dhcp-script={lease_script}", "dhcp-scriptuser=root"]
    lines += [f"dhcp-host={mac},{ip}" for mac, ip in (reserved or {}).items()]
    return "\n".join(lines + (extra or [])) + "\n"


def write_config(directory: Path, interface: str, gateway_ip: str, lan: str, socket_path: str,
                 reserved: dict[str, str] | None = None, upstream: list[str] | None = None) -> Path:
    """The lab's dnsmasq.conf and lease script in `directory` (dnsmasq runs as root there)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "lease-event"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m appliance.system.dhcp "
                      f"--socket {socket_path} \"$@\"\n")
    script.chmod(0o700)
    conf = directory / "dnsmasq.conf"
    conf.write_text(dnsmasq_conf(
        interface, gateway_ip, lan, str(directory / "leases"),
        upstream=upstream or ["no-resolv", "no-hosts"],
        lease_script=str(script), reserved=reserved,
        extra=["bind-interfaces", "log-dhcp",
               f"log-facility={directory / 'dnsmasq.log'}", f"pid-file={directory / 'dnsmasq.pid'}",
               "user=root"]))
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
                "vendor_class": env.get("DNSMASQ_VENDOR_CLASS"),
                # RFC 8520's DHCP option 161, which dnsmasq (2.81+) hands its script
                "mud_url": env.get("DNSMASQ_MUD_URL")}
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
