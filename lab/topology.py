"""The lab: the appliance and its world in network namespaces, with real packets.

    device namespaces ─┐                                    ┌─ inet     198.19.0.2 (+198.19.8.0/24)
      eth0 198.18.0.x  ├─ switch: br-dev (isolated ports) ─ dev0 GATEWAY up0 ─ br-up ┤
                       ┘          198.18.0.1/20                 198.19.0.1/24       └─ attacker 198.19.0.66

Devices sit on isolated bridge ports (like hostapd's ap_isolate), so everything they send,
even to each other, crosses the gateway's device-facing interface and its XDP dispatcher; the
gateway answers ARP for the segment (proxy_arp_pvlan). Every name carries the lab's name, all
addresses come from 198.18.0.0/15, and `down` removes all of it.
"""
from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance import client
from appliance.errors import KalkiError, LabError

STATE_DIR = Path(os.environ.get("KALKI_LAB_DIR", "/run/kalki/labs"))
SHM_DIR = Path("/dev/shm/kalki-labs")     # what the appliance keeps on tmpfs (gate_policy_dir)
LAN = ipaddress.IPv4Network("198.18.0.0/20")
GATEWAY_LAN_IP = "198.18.0.1"
UPLINK = ipaddress.IPv4Network("198.19.0.0/24")
GATEWAY_UP_IP = "198.19.0.1"
INET_IP = "198.19.0.2"
INET_EXTRA = ("198.19.8.1", "198.19.8.2", "198.19.9.1")    # destinations for allow-lists
INET_ROUTED = "198.19.8.0/21"
INET_ANY = "198.19.64.0/18"     # the internet host takes traffic for any address in it
# The lab's site settings: the clouds the shipped profiles open as controllers (`<type>-cloud`),
# by name (the internet's name server answers cloud.<type>.example) and, for the tests written
# before names, the lab's old cloud prefix. The product's profiles name no lab address.
CLOUD_TYPES = ("camera", "door-sensor", "generic", "light", "motion-sensor", "plug", "thermostat")
LAB_CONTROLLERS = {f"{t}-cloud": ["198.19.8.0/24", f"cloud.{t}.example"] for t in CLOUD_TYPES}
LAB_DNS = {**{f"cloud.{t}.example": {"addresses": [f"198.19.64.{100 + i}"], "ttl": 300, "cname": None}
              for i, t in enumerate(CLOUD_TYPES)},
           # the NTP pool the shipped profiles name, answered inside the lab
           "pool.ntp.org": {"addresses": ["198.19.64.123"], "ttl": 300, "cname": None}}
ATTACKER_IP = "198.19.0.66"
DEFAULT_TYPES = ("camera", "plug", "light", "motion_sensor")
DEVICE_PASSWORD = "lab-device-pw"
GATE_USER = "admin"
GATE_PASSWORD = "lab-gate-pw"      # the appliance's own credentials, in the lab only
MAX_DEVICES = 1000


@dataclass
class LabDevice:
    name: str
    type: str
    mac: str
    ip: str
    namespace: str
    compromised: bool = False
    dhcp: bool = False          # gets its address from the gateway's DHCP server (a new device)


@dataclass
class LabState:
    name: str
    namespaces: dict[str, str]
    devices: list[LabDevice]
    gateway: dict
    pids: dict[str, int] = field(default_factory=dict)
    created: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> LabState:
        data = dict(data)
        data["devices"] = [LabDevice(**d) for d in data["devices"]]
        return cls(**data)

    def device(self, name: str) -> LabDevice:
        for d in self.devices:
            if d.name == name:
                return d
        raise LabError(f"lab {self.name} has no device {name!r}")


def _run(args: list[str], what: str, input: str | None = None) -> str:
    proc = subprocess.run(args, input=input, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"{what} failed: {' '.join(args[:6])}: {proc.stderr.strip()}")
    return proc.stdout


def _batch(lines: list[str], what: str) -> None:
    """Runs `ip` lines; a line "-n NS cmd" runs in NS (grouped: ip -batch has no -n)."""
    groups: dict[str | None, list[str]] = {}
    for line in lines:
        ns = None
        if line.startswith("-n "):
            _, ns, line = line.split(" ", 2)
        groups.setdefault(ns, []).append(line)
    for ns, group in groups.items():
        _run(["ip", *(["-n", ns] if ns else []), "-force", "-batch", "-"], what,
             input="\n".join(group) + "\n")


def state_path(name: str) -> Path:
    return STATE_DIR / name / "lab.json"


def new_name() -> str:
    return "lab" + secrets.token_hex(3)


def _mac(lab: str, index: int) -> str:
    tag = hashlib.sha256(lab.encode()).digest()[0]
    return f"02:4b:{tag:02x}:00:{index >> 8:02x}:{index & 0xff:02x}"


def plan(name: str, devices: int = 4, compromised: bool = False) -> LabState:
    if not 1 <= devices <= MAX_DEVICES:
        raise LabError(f"lab {name}: --devices must be 1 to {MAX_DEVICES}, got {devices}")
    if not name.replace("-", "").isalnum() or len(name) > 20:
        raise LabError(f"lab name {name!r}: use up to 20 letters, digits and '-'")
    ns = {role: f"kalki-{name}-{role}" for role in ("gw", "sw", "inet", "atk")}
    hosts = list(LAN.hosts())
    devs = []
    for i in range(devices):
        dtype = DEFAULT_TYPES[i % len(DEFAULT_TYPES)]
        dname = f"{dtype}{i // len(DEFAULT_TYPES) + 1}"
        devs.append(LabDevice(dname, dtype, _mac(name, i + 1), str(hosts[9 + i]),
                              f"kalki-{name}-d{i}", compromised and i == devices - 1))
    gateway = {"namespace": ns["gw"], "devices_if": "dev0", "uplink_if": "up0",
               "lan_ip": GATEWAY_LAN_IP, "lan": str(LAN), "uplink_ip": GATEWAY_UP_IP,
               "uplink": str(UPLINK), "inet_ip": INET_IP, "inet_extra": list(INET_EXTRA),
               "attacker_ip": ATTACKER_IP}
    return LabState(name, ns, devs, gateway, created=time.time())


def _topology_commands(s: LabState) -> list[list[str]]:
    """Three batches: namespaces; links; addresses and routes."""
    gw, sw, inet, atk = (s.namespaces[k] for k in ("gw", "sw", "inet", "atk"))
    names = [gw, sw, inet, atk] + [d.namespace for d in s.devices]
    first = [f"netns add {n}" for n in names]
    links = [
        f"link add br-dev netns {sw} type bridge",
        f"link add br-up netns {sw} type bridge",
        f"link add dev0 netns {gw} type veth peer name gw-dev netns {sw}",
        f"link add up0 netns {gw} type veth peer name gw-up netns {sw}",
        f"link add eth0 netns {inet} type veth peer name inet netns {sw}",
        f"link add eth0 netns {atk} type veth peer name atk netns {sw}",
    ]
    for i, d in enumerate(s.devices):
        links.append(f"link add eth0 netns {d.namespace} address {d.mac} type veth "
                     f"peer name d{i} netns {sw}")
    cfg = [
        f"-n {sw} link set br-dev up", f"-n {sw} link set br-up up",
        f"-n {sw} link set gw-dev master br-dev up", f"-n {sw} link set gw-up master br-up up",
        f"-n {sw} link set inet master br-up up", f"-n {sw} link set atk master br-up up",
        f"-n {gw} link set lo up", f"-n {gw} addr add {GATEWAY_LAN_IP}/{LAN.prefixlen} dev dev0",
        f"-n {gw} link set dev0 up", f"-n {gw} addr add {GATEWAY_UP_IP}/{UPLINK.prefixlen} dev up0",
        f"-n {gw} link set up0 up", f"-n {gw} route add {INET_ROUTED} via {INET_IP}",
        f"-n {inet} link set lo up", f"-n {inet} addr add {INET_IP}/{UPLINK.prefixlen} dev eth0",
        f"-n {inet} link set eth0 up", f"-n {inet} route add {LAN} via {GATEWAY_UP_IP}",
        f"-n {atk} link set lo up", f"-n {atk} addr add {ATTACKER_IP}/{UPLINK.prefixlen} dev eth0",
        f"-n {atk} link set eth0 up", f"-n {atk} route add {LAN} via {GATEWAY_UP_IP}",
    ]
    cfg += [f"-n {inet} addr add {ip}/32 dev lo" for ip in INET_EXTRA]
    # Re-enacted captures and resolved cloud names land anywhere in INET_ANY: the internet
    # host answers for all of it (a local route), so every flow arrives and can be counted.
    cfg += [f"-n {gw} route add {INET_ANY} via {INET_IP}",
            f"-n {inet} route add local {INET_ANY} dev lo"]
    for i in range(len(s.devices)):
        # isolated ports talk only to the gateway's port, never to each other
        cfg += [f"-n {sw} link set d{i} master br-dev up",
                f"-n {sw} link set dev d{i} type bridge_slave isolated on"]
    return [first, links, cfg]


def _configure_devices(s: LabState) -> None:
    """Addresses and routes in each device namespace, over netlink from this process
    (one `ip` process per namespace would cost seconds at 1,000 devices)."""
    from pyroute2 import IPRoute

    from appliance import netns
    for d in s.devices:
        with netns.entered(d.namespace), IPRoute() as ipr:
            lo, eth0 = ipr.link_lookup(ifname="lo")[0], ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=lo, state="up")
            ipr.link("set", index=eth0, state="up")
            if not d.dhcp:
                ipr.addr("add", index=eth0, address=d.ip, prefixlen=LAN.prefixlen)
                ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY_LAN_IP)


def _sysctls(s: LabState) -> None:
    gw = s.namespaces["gw"]
    settings = {"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.send_redirects": 0,
                "net.ipv4.conf.dev0.send_redirects": 0, "net.ipv4.conf.dev0.proxy_arp": 1,
                "net.ipv4.conf.dev0.proxy_arp_pvlan": 1,
                "net.ipv4.neigh.dev0.proxy_delay": 0,   # else proxy ARP answers up to 0.8 s late
                "net.ipv6.conf.all.disable_ipv6": 1}
    _run(["ip", "netns", "exec", gw, "sysctl", "-q", "-w",
          *[f"{k}={v}" for k, v in settings.items()]], "gateway sysctls")


NEIGH = "/proc/sys/net/ipv4/neigh/default/gc_thresh"


def _neighbour_room(s: LabState) -> None:
    """Linux keeps one ARP table for all namespaces, and its limits (gc_thresh1-3, 128/512/
    1,024 by default) count every namespace's entries: a device's entry for the gateway and
    the gateway's for the device. A 1,000-device lab needs about 2,000; past gc_thresh3 new
    neighbours are refused and devices stop reaching the gateway (seen at the 349th MQTT
    client). The host's limits are raised for a big lab, never lowered; `down` puts them
    back when no other lab is left."""
    needed = 2 * len(s.devices) + 256
    old = {i: int(Path(f"{NEIGH}{i}").read_text()) for i in (1, 2, 3)}
    if old[3] >= 2 * needed:
        return
    s.gateway["neigh_restore"] = old
    for i, value in ((3, 2 * needed), (2, needed), (1, max(old[1], needed // 4))):
        Path(f"{NEIGH}{i}").write_text(str(max(old[i], value)))
    _save(s)


def _neighbour_restore(s: LabState) -> None:
    old = {int(i): value for i, value in (s.gateway.get("neigh_restore") or {}).items()}  # JSON: "1"
    if not old or [n for n in labs() if n != s.name]:
        return
    for i in sorted(old):      # thresh1 first: thresh1 <= thresh2 <= thresh3 at every step
        with contextlib.suppress(OSError):
            Path(f"{NEIGH}{i}").write_text(str(old[i]))


def spawn(namespace: str, args: list[str], log: Path) -> int:
    """Starts a long-lived process inside a namespace; returns its pid."""
    with open(log, "ab") as out:
        # nsenter switches only the network namespace; `ip netns exec` would also remount
        # /sys and so hide the pinned maps under /sys/fs/bpf from the process.
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{namespace}", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(Path(__file__).resolve().parents[1]))
    return proc.pid


def wait_for_files(paths: list[Path], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.exists() for p in paths):
            return
        time.sleep(0.05)
    missing = [p for p in paths if not p.exists()]
    logs = ""
    for flag in missing[:2]:     # what the service said, if it said anything
        log = flag.with_suffix(".log")
        if log.exists():
            logs += f"\n--- {log.name} ---\n" + log.read_text(errors="replace")[-1500:]
    raise LabError(f"{what} did not start within {timeout:.0f} s: "
                   f"{', '.join(p.name for p in missing[:5])}{logs}")


def up(name: str | None = None, devices: int = 4, compromised: bool = False,
       services: bool = True, protect: bool = True, supervisor: bool = False,
       unapproved: int = 0, fake_time: str = "", ui: bool = True,
       profiles: str = "", mud: bool = False, notify: dict | None = None) -> LabState:
    """Builds the lab. With `supervisor`, the gateway runs the MQTT broker and `kalki run`,
    which takes over the data path; the last `unapproved` devices are left for the operator
    to approve; without `ui` it runs without the web page and the panel; `profiles` is a
    directory of device-type profiles instead of umboxes/; with `mud`, the internet host runs
    a MUD file server (lab.mudserver) and the supervisor fetches MUD files ([mud] fetch),
    trusting the lab's CA; `notify` sets the supervisor's [notify] keys (servers a test runs on
    the internet host). On any failure, removes what it built and raises."""
    name = name or new_name()
    if state_path(name).exists():
        raise LabError(f"lab {name} already exists: `kalki lab down {name}` first")
    s = plan(name, devices, compromised)
    lab_dir = state_path(name).parent
    lab_dir.mkdir(parents=True, exist_ok=True)
    _save(s)
    if supervisor:
        if not 0 <= unapproved <= len(s.devices):
            raise LabError(f"lab {name}: --unapproved must be 0 to {len(s.devices)}")
        for d in s.devices[len(s.devices) - unapproved:]:
            d.dhcp = True
    try:
        for i, batch in enumerate(_topology_commands(s)):
            _batch(batch, f"lab {name}: topology step {i + 1}")
        _configure_devices(s)
        _sysctls(s)
        _neighbour_room(s)
        if supervisor:
            s.gateway["supervisor"] = True
            s.gateway["socket"] = str(lab_dir / "kalki.sock")
            _start_name_server(s, lab_dir)
            _start_supervisor(s, lab_dir, fake_time, ui, profiles, mud, notify)
            for d in s.devices:
                if not d.dhcp:
                    client.request(s.gateway["socket"], "device_add", name=d.name, mac=d.mac,
                                    ip=d.ip, type=d.type, approve=True)
            _start_dhcp(s, lab_dir)
        elif protect:
            _protect(s)
        if services:
            _start_services(s, lab_dir)
        _save(s)
    except BaseException:
        down(name)
        raise
    return s


MQTT_PORT = 1883
SUPERVISOR_USER = "kalki"


def _name_server_conf(lab_dir: Path, records: dict) -> Path:
    lines = [f"listen-address={INET_IP}", "bind-interfaces", "no-resolv", "no-hosts",
             f"pid-file={lab_dir / 'inet-dns.pid'}", "user=root"]
    for hostname, r in sorted(records.items()):
        if r.get("cname"):
            lines.append(f"cname={hostname},{r['cname']},{r['ttl']}")
        else:
            lines += [f"host-record={hostname},{a},{r['ttl']}" for a in r["addresses"]]
    conf = lab_dir / "inet-dns.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _start_name_server(s: LabState, lab_dir: Path) -> None:
    """The internet host's name server, which the gateway's resolver forwards to as a real
    gateway forwards to its ISP's: it answers what `dns_set` gave it."""
    from appliance.system import dhcp
    records = s.gateway.setdefault("dns_records", dict(LAB_DNS))
    conf = _name_server_conf(lab_dir, records)
    s.pids["inet-dns"] = dhcp.start(conf, s.namespaces["inet"])
    _save(s)
    _wait_for_name_server(s)


def dns_set(s: LabState, hostname: str, addresses: tuple[str, ...] | list[str] = (), ttl: int = 300,
            cname: str | None = None) -> None:
    """Gives the internet's name server a record (A records for `addresses`, or a CNAME),
    then restarts it. Lab addresses only."""
    from appliance.dataplane.umbox import check_dns_name
    hostname = check_dns_name(hostname, f"lab {s.name}: dns")
    if hostname.startswith("*.") or not 0 <= ttl <= 86_400:
        raise LabError(f"lab {s.name}: dns: give one host name and a TTL of 0 to 86400 s")
    for a in addresses:
        if ipaddress.IPv4Address(a) not in ipaddress.IPv4Network("198.18.0.0/15"):
            raise LabError(f"lab {s.name}: dns: {a} is outside the lab's 198.18.0.0/15")
    if bool(cname) == bool(addresses):
        raise LabError(f"lab {s.name}: dns: give addresses or a cname")
    records = s.gateway.setdefault("dns_records", dict(LAB_DNS))
    records[hostname] = {"addresses": list(addresses), "ttl": ttl, "cname": cname}
    lab_dir = state_path(s.name).parent
    pid = s.pids.get("inet-dns")
    if pid:
        try:
            os.killpg(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    _start_name_server(s, lab_dir)


def _wait_for_name_server(s: LabState, timeout: float = 5.0) -> None:
    from dnslib import DNSRecord

    from appliance import netns
    deadline = time.monotonic() + timeout
    while True:
        try:
            with netns.entered(s.namespaces["inet"]):
                DNSRecord.question("kalki.invalid").send(INET_IP, 53, timeout=0.2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise LabError(f"lab {s.name}: the internet's name server does not answer") from None
            time.sleep(0.05)


def _start_supervisor(s: LabState, lab_dir: Path, fake_time: str, ui: bool = True,
                      profiles: str = "", mud: bool = False, notify: dict | None = None) -> None:
    """The appliance in miniature: Mosquitto with a user per device, and `kalki run`."""
    from appliance import config
    from appliance.system.broker import Broker, random_password
    passwords = {d.name: random_password() for d in s.devices}
    (lab_dir / "mqtt-passwords.json").write_text(json.dumps(passwords))
    os.chmod(lab_dir / "mqtt-passwords.json", 0o600)
    supervisor_password = random_password()
    pw_file = lab_dir / "mqtt-supervisor"
    pw_file.write_text(supervisor_password)
    os.chmod(pw_file, 0o600)
    broker = Broker(lab_dir / "mqtt", listen=GATEWAY_LAN_IP, port=MQTT_PORT,
                    users={**passwords, SUPERVISOR_USER: supervisor_password},
                    supervisor_user=SUPERVISOR_USER,
                    # its ACL, so that a password set on the page lets Home Assistant in
                    home_assistant_user=config.Config().mqtt.home_assistant_user or None)
    broker.start(namespace=s.namespaces["gw"])
    broker_pid = broker.pid
    if broker_pid is None:
        raise LabError(f"lab {s.name}: mosquitto has no process after starting")
    s.pids["broker"] = broker_pid
    _save(s)
    cfg = config.Config()
    cfg.gateway.devices_interface, cfg.gateway.uplink_interface = "dev0", "up0"
    cfg.gateway.address, cfg.gateway.lan, cfg.gateway.instance = GATEWAY_LAN_IP, str(LAN), s.name
    cfg.state.directory = str(lab_dir / "state")
    cfg.gateway.dhcp_leases = str(lab_dir / "dhcp" / "leases")
    cfg.gateway.gate_policy_dir = str(gate_policy_dir(s))
    cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.user = GATEWAY_LAN_IP, MQTT_PORT, SUPERVISOR_USER
    cfg.mqtt.password_file = str(pw_file)
    cfg.mqtt.broker_directory = str(lab_dir / "mqtt")
    cfg.control.socket = s.gateway["socket"]
    cfg.gateway.gate_credentials = ""     # the lab's gate has the lab's own (gate.json)
    cfg.adapters.credentials_file = str(lab_dir / "adapter-credentials.json")
    (lab_dir / "adapter-credentials.json").write_text(json.dumps(
        {d.name: {"user": f"hue-{passwords[d.name][:12]}"} for d in s.devices if d.type == "light"}))
    cfg.policy.fake_time = fake_time
    cfg.profiles = profiles
    cfg.controllers = {k: list(v) for k, v in LAB_CONTROLLERS.items()}
    for key, value in (notify or {}).items():
        setattr(cfg.notify, key, value)
    if mud:     # a manufacturer's MUD file server on the internet host, and its CA trusted
        from lab import mudserver
        cfg.mud.fetch, cfg.mud.ca_file = True, str(mudserver.start_in_lab(s, lab_dir).cert_path)
        _save(s)
    # The lab's switch is the hardware that sees where each device is plugged in.
    cfg.stations.bridge, cfg.stations.bridge_namespace = "br-dev", f"/run/netns/{s.namespaces['sw']}"
    cfg.policy.timezone = "Europe/Berlin"
    cfg.panel.enabled = ui          # the LEDs and the button, on gpiozero's mock pins
    cfg.panel.mock_pins = True
    # The web page, for the host: the supervisor lives in the gateway's namespace and makes
    # its listening socket in the host's (plain HTTP on loopback is fine in the lab).
    import socket as _socket
    with _socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        web_port = probe.getsockname()[1]
    cfg.web.enabled, cfg.web.listen, cfg.web.port = ui, "127.0.0.1", web_port
    # The host's namespace is this process's: name it (ip netns attach), so the supervisor can
    # find it by path; `down` drops the name with the lab's namespaces, not the namespace.
    host = f"kalki-{s.name}-host"
    _run(["ip", "netns", "attach", host, str(os.getpid())], f"lab {s.name}: naming the host namespace")
    cfg.web.tls, cfg.web.netns, cfg.web.tls_dir = False, f"/run/netns/{host}", str(lab_dir / "tls")
    s.gateway["web_url"] = f"http://127.0.0.1:{web_port}/" if ui else None
    (lab_dir / "kalki.toml").write_text(config.dump(cfg))
    s.pids["supervisor"] = spawn(s.namespaces["gw"], [sys.executable, "-m", "appliance.cli", "run",
                                                      "--config", str(lab_dir / "kalki.toml")],
                                 lab_dir / "supervisor.log")
    _save(s)
    wait_for_supervisor(s, 60)


UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    ip route replace default via "$router" ;;
esac
"""


def _start_dhcp(s: LabState, lab_dir: Path) -> None:
    """dnsmasq on the gateway; the new (unapproved) devices ask it for an address the way a
    real device does, saying who they are (hostname, vendor class)."""
    from appliance.system import dhcp
    conf = dhcp.write_config(lab_dir / "dhcp", "dev0", GATEWAY_LAN_IP, str(LAN),
                             s.gateway["socket"], {d.mac: d.ip for d in s.devices},
                             upstream=["no-resolv", "no-hosts", f"server={INET_IP}"])
    s.pids["dnsmasq"] = dhcp.start(conf, s.namespaces["gw"])
    _save(s)
    script = lab_dir / "udhcpc.script"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o700)
    for d in s.devices:
        if d.dhcp:
            _run(["ip", "netns", "exec", d.namespace, "busybox", "udhcpc", "-i", "eth0", "-n", "-q",
                  "-t", "10", "-T", "1", "-x", f"hostname:{d.type.replace('_', '-')}-new",
                  "-V", d.type, "-s", str(script)], f"lab {s.name}: DHCP for {d.name}")


def wait_for_supervisor(s: LabState, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.request(s.gateway["socket"], "status", timeout=5)
        except (LabError, OSError, ValueError, KalkiError) as e:
            if time.monotonic() > deadline:
                log = (state_path(s.name).parent / "supervisor.log")
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise LabError(f"lab {s.name}: the supervisor did not answer within "
                               f"{timeout:.0f} s: {e}\n{tail}") from None
            time.sleep(0.1)


def _start_services(s: LabState, lab_dir: Path) -> None:
    py = sys.executable
    ready = []
    passwords = {}
    if s.gateway.get("supervisor"):
        passwords = json.loads((lab_dir / "mqtt-passwords.json").read_text())
    for d in s.devices[:64]:     # a 1,000-device lab runs services on the first 64 only
        flag = lab_dir / f"{d.name}.ready"
        mqtt = []
        if d.type == "light" and s.gateway.get("supervisor"):   # polled by the supervisor
            hue = json.loads((lab_dir / "adapter-credentials.json").read_text())[d.name]["user"]
            mqtt = ["--hue-user", hue]
        elif d.name in passwords:
            mqtt = ["--mqtt-host", GATEWAY_LAN_IP, "--mqtt-port", str(MQTT_PORT), "--mqtt-user",
                    d.name, f"--mqtt-password={passwords[d.name]}", "--telemetry-interval", "0.5"]
        s.pids[d.name] = spawn(d.namespace, [py, "-m", "lab.device_services", "--name",
                                             d.name, "--type", d.type, "--bind", "0.0.0.0",
                                             "--user", "admin", "--password", DEVICE_PASSWORD,
                                             "--ready-file", str(flag), *mqtt],
                               lab_dir / f"{d.name}.log")
        ready.append(flag)
    flag = lab_dir / "inet.ready"
    s.pids["inet"] = spawn(s.namespaces["inet"], [py, "-m", "lab.sink", "--ports", "80,1883,8080",
                                                  "--tls-ports", "443,8883", "--ready-file", str(flag)],
                           lab_dir / "inet.log")
    ready.append(flag)
    reporting = []
    if s.gateway.get("supervisor"):   # the supervisor blocks, and records the alert
        cli = f"{py} -m appliance.cli --socket {s.gateway['socket']}"
        block_command = f"{cli} block {{ip}} {{seconds}} --reason {{reason}} --target {{target}} --by gate"
        reporting = ["--alert-command", f"{cli} raise-alert {{kind}} --source {{ip}} --target {{target}} "
                     "--details {details} --by gate"]
    else:
        block_command = f"{py} -m appliance.cli lab block {s.name} {{ip}} {{seconds}}"
    creds = lab_dir / "gate.json"
    from appliance.dataplane.gate import hash_password
    creds.write_text(json.dumps({"user": GATE_USER, "password_sha256": hash_password(GATE_PASSWORD)}))
    s.pids["gate"] = spawn(s.namespaces["gw"], [
        py, "-m", "appliance.dataplane.gate", "--listen", "0.0.0.0:8181", "--credentials-file", str(creds),
        "--policy-dir", str(gate_policy_dir(s)), "--stats-file", str(lab_dir / "gate-stats.json"),
        "--decoy-telnet-port", "2323", "--decoy-http-port", "8082",
        "--max-failures", "5", "--failure-window", "60", "--block-seconds", "300",
        "--block-command", block_command, *reporting],
        lab_dir / "gate.log")
    _save(s)
    wait_for_files(ready, 90, f"lab {s.name}: services")


def _protect(s: LabState) -> None:
    """Loads the data path in the gateway and applies each device's normal posture."""
    from appliance.dataplane import api as dataplane
    from appliance.policy import profiles
    known = profiles.load_all()
    dp = dataplane.Dataplane.open(s.name, s.namespaces["gw"], gateway_settings(s))
    try:
        for d in s.devices:
            dp.apply(dataplane.DeviceSpec(d.name, d.mac, d.ip, known[d.type].stack("normal")))
    finally:
        dp.close()


def gateway_settings(s: LabState):
    from appliance.dataplane.api import GatewaySettings
    g = s.gateway
    from appliance.dataplane.umbox import check_controllers
    return GatewaySettings(devices_if=g["devices_if"], uplink_if=g["uplink_if"],
                           gateway_ip=g["lan_ip"], lan=g["lan"],
                           controllers=check_controllers(LAB_CONTROLLERS, "lab controllers"),
                           gate_policy_dir=str(gate_policy_dir(s)))


def gate_policy_dir(s: LabState) -> Path:
    """The policy files the data path writes for the lab's gate (--policy-dir). On tmpfs, as
    the appliance's /run/kalki/gate is: where /run is a disk's (containers), a rename over a
    file costs ten times tmpfs's, on a posture change's way to being enforced."""
    return SHM_DIR / s.name / "gate-policy"


def _save(s: LabState) -> None:
    p = state_path(s.name)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(s.to_json(), indent=1))
    os.replace(tmp, p)


def load(name: str) -> LabState:
    try:
        return LabState.from_json(json.loads(state_path(name).read_text()))
    except FileNotFoundError:
        raise LabError(f"no lab named {name} (see `kalki lab status`)") from None


def labs() -> list[str]:
    if not STATE_DIR.is_dir():
        return []
    return sorted(p.name for p in STATE_DIR.iterdir() if (p / "lab.json").exists())


def down(name: str) -> list[str]:
    """Removes everything of lab `name`: processes, namespaces, pins, state. Tolerates a
    half-built lab. Returns what it removed."""
    from appliance.dataplane.api import remove_pins
    removed = []
    try:
        s = load(name)
    except LabError:
        s = None
    if s:
        for what, pid in s.pids.items():
            try:
                os.killpg(pid, signal.SIGTERM)
                removed.append(f"process {what}")
            except ProcessLookupError:
                pass
    prefix = f"kalki-{name}-"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    namespaces = [line.split()[0] for line in listed.splitlines() if line.startswith(prefix)]
    own = os.stat("/proc/self/ns/net").st_ino
    if s:   # processes that `ip netns exec` started and that outlived their group
        for ns in namespaces:
            # Never the host's namespace (the lab names it for the web page): its "pids" are
            # every process on the machine.
            if ns.endswith("-host") or os.stat(f"/run/netns/{ns}").st_ino == own:
                continue
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
            for pid_text in pids.split():
                try:
                    os.kill(int(pid_text), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    if namespaces:
        _batch([f"netns del {n}" for n in namespaces], f"lab {name}: removing namespaces")
        removed += namespaces
    remove_pins(name)
    if s:
        _neighbour_restore(s)
    shutil.rmtree(state_path(name).parent, ignore_errors=True)
    shutil.rmtree(SHM_DIR / name, ignore_errors=True)
    return removed


def control_socket(name: str) -> str:
    """The control socket of lab `name`'s supervisor."""
    return str(state_path(name).parent / "kalki.sock")
