"""Shared helpers of the benchmarks: JSON output, statistics, a lab that always goes away,
a pinned-but-unattached data path for BPF_PROG_TEST_RUN, packet building, CPU accounting.

Every benchmark prints one JSON line per figure: {"bench", "metric", "value", "unit", ...}.
Traffic stays inside the lab's namespaces, addresses only from 198.18.0.0/15.
"""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from labutil import tcp_syn, udp_packet  # noqa: F401  (packet builders of the tests)

from appliance import netns
from appliance.dataplane import api as dataplane
from appliance.dataplane import bpf, loader, maps, umbox
from lab import topology

LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
# bench_apply, bench_switch and bench_nft time the Dataplane (bench_nft: Nft, in a scratch
# namespace of its own) from inside its namespace, as the appliance runs (lab(in_gateway=True));
# 0: entering the namespace around each nftables transaction, as before stop 27
IN_GATEWAY = os.environ.get("KALKI_BENCH_IN_GATEWAY", "1") != "0"
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICTS = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}


# -- output and statistics ----------------------------------------------------------------
def emit(bench: str, metric: str, value, unit: str, **extra) -> None:
    print(json.dumps({"bench": bench, "metric": metric, "value": value, "unit": unit, **extra}),
          flush=True)


def emit_where(bench: str) -> None:
    """Says how a benchmark that times the Dataplane or libnftables reached the namespace."""
    emit(bench, "dataplane_in_gateway", int(IN_GATEWAY), "bool",
         what="1: timed from inside the namespace (the lab's gateway, or bench_nft's own), as the "
              "appliance runs; 0: entering it and leaving it again around each nftables "
              "transaction (KALKI_BENCH_IN_GATEWAY=0)")


def median(xs):
    return statistics.median(xs)


def percentile(xs, q: float):
    """Nearest-rank percentile, q in 0..100: the ceil(q/100 * n)-th smallest. (Until stop 23
    the rank was round(q/100 * n + 0.5), which rounds 99.5 to 100 by Python's round-half-even:
    the p99 of 100 samples was their maximum.)"""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s) - 1e-9) - 1))
    return s[k]


def suffix() -> str:
    return secrets.token_hex(2)


def lab_only(ip: str) -> str:
    assert ipaddress.IPv4Address(ip) in LAB_RANGE, f"{ip} is outside 198.18.0.0/15"
    return ip


# -- clean-up also on SIGTERM / SIGHUP ------------------------------------------------------
def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every finally: block removes what it made."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)


# -- the lab --------------------------------------------------------------------------------
@contextlib.contextmanager
def lab(tag: str, devices: int = 1, open_dataplane: bool = True, in_gateway: bool = False):
    """A lab without services, with the data path loaded and attached (not protected: no
    device applied). Yields (state, Dataplane or None). Always torn down.

    in_gateway: the calling thread stays in the gateway's namespace for the block and the
    Dataplane is opened there as the appliance opens its own (namespace None), so that its
    calls are timed as a Pi makes them. Otherwise each nftables transaction enters the
    namespace and leaves it again: two setns(2) calls, 19 us back to back but 120-155 us
    after 12 ms of idleness on the development VM, a cost only the lab has."""
    install_signal_handlers()
    name = f"b{tag}{suffix()}"[:20]
    state = None
    dp = None
    ignored: dict = {}     # the handlers set aside while tearing down, once it has begun
    try:
        state = topology.up(name, devices=devices, services=False, protect=False)
        gw = state.namespaces["gw"]
        with netns.entered(gw if in_gateway else None):
            if open_dataplane:
                dp = dataplane.Dataplane.open(name, None if in_gateway else gw,
                                              topology.gateway_settings(state))
            try:
                yield state, dp
            finally:
                # Further signals are ignored from here to the end, leaving the namespace
                # included, so that teardown is neither cut short nor run from the gateway's.
                ignored.update(_ignore_signals())
                if dp is not None:
                    try:
                        dp.destroy()    # in the namespace it was opened in
                    except Exception as e:  # the namespace removal below takes the rest
                        print(f"teardown: {e}", file=sys.stderr)
    finally:
        if not ignored:
            ignored.update(_ignore_signals())
        try:
            remove_lab(name)
        finally:
            for s, h in ignored.items():
                signal.signal(s, h)


def _ignore_signals() -> dict:
    return {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def remove_lab(name: str) -> None:
    """Everything of lab `name` goes; says so if a namespace stays behind."""
    topology.down(name)
    dataplane.remove_pins(name)
    left = [n for n in os.listdir("/run/netns") if n.startswith(f"kalki-{name}-")] \
        if os.path.isdir("/run/netns") else []
    if left:
        print(f"teardown: namespaces left behind: {left}", file=sys.stderr)


def ns_run(ns: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    """A command inside a namespace (nsenter: keeps /sys/fs/bpf visible)."""
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *args], capture_output=True,
                          text=True, **kw)


def ns_popen(ns: str, args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", *args], **kw)


@contextlib.contextmanager
def xdp_filter_peer(ports=(23, 2323, 7547), ips=("198.18.250.1", "198.18.250.2"),
                    macs=("02:00:00:00:fa:01",)):
    """xdp-tools' xdp-filter with every feature on (tcp, udp, ipv4, ipv6, ethernet; policy
    allow) on a veth in a namespace of its own, with some deny entries so each lookup has a
    populated map. Yields the program's fd for BPF_PROG_TEST_RUN, or None (and why) without
    xdp-filter. Always unloaded and removed."""
    install_signal_handlers()
    if not shutil.which("xdp-filter"):
        yield None, "no xdp-filter (Debian package xdp-tools)"
        return
    # xdp-filter keeps its maps under /sys/fs/bpf/xdp-filter for the whole host, whatever the
    # namespace: one already there is someone else's, whose lists this must not change.
    if Path("/sys/fs/bpf/xdp-filter").exists():
        yield None, "an xdp-filter is already loaded on this host (/sys/fs/bpf/xdp-filter)"
        return
    ns = f"kalki-xf{suffix()}"
    libxdp_dir = Path("/sys/fs/bpf/xdp")        # libxdp's working directory, made on first use
    made_libxdp_dir = not libxdp_dir.exists()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "xf0", "type", "veth", "peer", "name", "xf1"],
                       check=True)
        for link in ("xf0", "xf1"):
            subprocess.run(["ip", "-n", ns, "link", "set", link, "up"], check=True)
        steps = [["load", "-m", "native", "-f", "all", "-p", "allow", "xf0"],
                 *(["port", str(p)] for p in ports), *(["ip", lab_only(a)] for a in ips),
                 *(["ether", m] for m in macs)]
        for step in steps:
            r = ns_run(ns, ["xdp-filter", *step])
            if r.returncode:
                raise RuntimeError(f"xdp-filter {' '.join(step)}: {r.stderr.strip() or r.stdout.strip()}")
        link = json.loads(subprocess.run(["ip", "-j", "-n", ns, "link", "show", "dev", "xf0"],
                                         capture_output=True, text=True, check=True).stdout)[0]
        prog = link["xdp"]["prog"]
        fd = bpf.prog_fd_by_id(prog["id"])
        try:
            yield fd, prog["name"]
        finally:
            os.close(fd)
    finally:
        ns_run(ns, ["xdp-filter", "unload", "--all"])
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if made_libxdp_dir:
            with contextlib.suppress(OSError):
                libxdp_dir.rmdir()


def link_mac(ns: str, ifname: str) -> str:
    out = subprocess.run(["ip", "-j", "-n", ns, "link", "show", "dev", ifname], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)[0]["address"]


def stop(proc: subprocess.Popen | None, sig=signal.SIGINT, timeout: float = 5.0) -> None:
    """Stops a child we started with start_new_session=True, and whatever it forked (trafgen
    forks its workers): the signal goes to the child's own process group, by its id."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # stragglers of the group, if any
    except ProcessLookupError:
        pass
    proc.wait()


# -- stacks -----------------------------------------------------------------------------------
ALLOWED = ["198.19.8.0/24", "198.19.0.2/32", "198.19.9.1/32:443/tcp", "198.19.10.0/23"]


def all_on_stack(destinations=None) -> dict:
    """Every in-kernel umbox on except quarantine (which short-circuits), with limits high
    enough that a 1e6-repeat BPF_PROG_TEST_RUN stays XDP_PASS."""
    return {
        "anti_spoof": {},
        "lateral_block": {},
        "rate_limit": {"packets_per_second": 100_000_000, "bytes_per_second": 1_250_000_000,
                       "burst_packets": 100_000_000, "burst_bytes": 1_000_000_000},
        "port_scan": {"ports": 1000, "window_ms": 1000},
        "syn_flood": {"syns": 10_000_000, "window_ms": 1000},
        "brute_force": {"attempts": 1_000_000, "window_ms": 1000, "ports": [22, 23]},
        "egress_anomaly": {"block": False},
        "allowlist": {"destinations": list(destinations or ALLOWED)},
    }


def fake_device(i: int) -> tuple[str, str]:
    """(MAC, IPv4) of made-up device i (0..8191): addresses from 198.18.1.0, in the lab's LAN
    (198.18.0.0/20) up to i = 3839, then on into 198.18.16.0/20 (the lab's range, outside its
    LAN: nothing routes to them, which entries only do not need)."""
    assert 0 <= i < 8192, i
    mac = f"02:42:bb:00:{i >> 8:02x}:{i & 0xff:02x}"
    ip = str(ipaddress.IPv4Address("198.18.1.0") + i)
    return mac, lab_only(ip)


# -- packets ------------------------------------------------------------------------------------
def eth(dst_mac: str, src_mac: str, payload: bytes, ethertype: int = 0x0800) -> bytes:
    return (bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
            + ethertype.to_bytes(2, "big") + payload)


def udp_frame(src_mac, dst_mac, src, dst, sport, dport, payload=b"kalki-bench") -> bytes:
    return eth(dst_mac, src_mac, udp_packet(lab_only(src), lab_only(dst), sport, dport, payload))


# -- a pinned, unattached data path for BPF_PROG_TEST_RUN ------------------------------------
class PinnedPath:
    """The dispatcher compiled into its own pin dir, attached nowhere, maps written directly
    (no nftables, no namespace): for BPF_PROG_TEST_RUN only."""

    def __init__(self, instance: str, settings: dataplane.GatewaySettings | None = None, defines=None):
        self.instance = instance
        self.pin_dir = f"{dataplane.BPFFS}/kalki/{instance}"
        self.maps: dict[str, bpf.Map] = {}
        self.prog_fds: dict[str, int] = {}
        self.load_report = loader.run_child(self.pin_dir, {}, None, defines=defines)
        for name, (k, v) in maps.MAPS.items():
            self.maps[name] = bpf.Map(f"{self.pin_dir}/{name}", k, v)
        for name in maps.PROGRAMS:
            self.prog_fds[name] = bpf.obj_get(f"{self.pin_dir}/{name}")
        s = settings or dataplane.GatewaySettings()
        lan = ipaddress.IPv4Network(s.lan)
        ip_be = dataplane._ip_be
        self.maps["kalki_settings"].update(ctypes.c_uint32(0), maps.Settings(
            gateway_ip=ip_be(s.gateway_ip), lan_net=ip_be(str(lan.network_address)),
            lan_mask=ip_be(str(lan.netmask)), mqtt_port=s.mqtt_port,
            events_per_sec=s.events_per_sec, unknown_flags=0))
        self._helper = dataplane.Dataplane(instance)   # only for its entry-building methods
        self._helper.max_devices = int((defines or {}).get("KALKI_MAX_DEVICES", maps.MAX_DEVICES))
        self._helper._maps = self.maps                 # ... and its shared allow-lists

    def add_device(self, device_id: int, spec: dataplane.DeviceSpec) -> None:
        spec = spec.checked()
        c = umbox.compile_stack(spec.stack)
        m = self.maps
        key = ctypes.c_uint32(device_id)
        m["kalki_dev_state"].update(key, maps.DevState())
        allow_id = self._helper._list_id(self._helper._allow_content(c), create=True)
        m["kalki_devices"].update(key, self._helper._device_entry(spec, c, allow_id))
        m["kalki_dev_by_mac"].update(dataplane._mac_key(spec.mac), key)
        self._helper._slot_mac(spec.mac, device_id)
        m["kalki_dev_by_ip"].update(ctypes.c_uint32(dataplane._ip_be(spec.ip)), key)

    def counter(self, device_id: int, reason: int) -> int:
        per_cpu = self.maps["kalki_counters"].lookup(ctypes.c_uint32(device_id * maps.REASON_SLOTS + reason))
        return sum(c.packets for c in per_cpu)

    def close(self) -> None:
        for fd in self.prog_fds.values():
            os.close(fd)
        self.prog_fds.clear()
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        dataplane.remove_pins(self.instance)


@contextlib.contextmanager
def pinned_path(tag: str, **kw):
    install_signal_handlers()
    instance = f"b{tag}{suffix()}"
    path = None
    try:
        path = PinnedPath(instance, **kw)
        yield path
    finally:
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            if path is not None:
                path.close()
            dataplane.remove_pins(instance)
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# -- the load average beside every figure -------------------------------------------------------
class Loads:
    """The 1-minute load average, sampled during a run (after each round or block), for the
    `load1` (median) and `load1_max` keys every figure carries."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.sample()

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    def kw(self) -> dict:
        return {"load1": round(median(self.samples), 2), "load1_max": round(max(self.samples), 2)}


# -- CPU accounting -----------------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_times(cpu: int | None = None) -> dict[str, int]:
    """CPU time in ns from /proc/stat, by column: system-wide (the first line), or one CPU's
    line. Tick-sampled (this kernel: CONFIG_TICK_CPU_ACCOUNTING, HZ=250)."""
    label = "cpu" if cpu is None else f"cpu{cpu}"
    with open("/proc/stat") as f:
        for line in f:
            if line.split(maxsplit=1)[0] == label:
                fields = line.split()[1:]
                break
        else:
            raise RuntimeError(f"/proc/stat has no line {label}")
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    vals = {n: int(v) * 1_000_000_000 // CLK_TCK for n, v in zip(names, fields)}
    vals["busy"] = sum(vals[n] for n in ("user", "nice", "system", "irq", "softirq"))
    return vals


def task_runtime_ns(pid: int) -> int:
    """The CPU time of a process, its threads and its descendants, in ns, exactly (the
    scheduler's sum_exec_runtime, /proc/<pid>/task/<tid>/schedstat), not tick-sampled. Without
    IRQ_TIME_ACCOUNTING (this kernel), the softirqs a task runs in its own context (a veth
    transmit runs the receiver's NET_RX there) are in its runtime."""
    return sum(ns for _, ns in tasks(pid))


def tasks(pid: int) -> list[tuple[int, int]]:
    """(tid, runtime ns) of every thread of a process and of its descendants."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    out.append((int(tid), int(f.read().split()[0])))
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    for c in f.read().split():
                        out += tasks(int(c))
            except (FileNotFoundError, ProcessLookupError):
                pass
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def ksoftirqd_pid(cpu: int) -> int:
    """The pid of ksoftirqd/<cpu>: the softirqs of that CPU that do not run where they were raised."""
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/comm") as f:
                    if f.read().strip() == f"ksoftirqd/{cpu}":
                        return int(p)
            except OSError:
                pass
    raise RuntimeError(f"no ksoftirqd/{cpu}")


# BPF_ENABLE_STATS: while the returned fd is open, the kernel times every BPF program run
# (bpf_prog_info.run_time_ns / run_cnt; two clock reads per run). Closed: off again. This
# leaves the sysctl kernel.bpf_stats_enabled alone.
_BPF_ENABLE_STATS, _BPF_STATS_RUN_TIME = 32, 0
_RUN_TIME_OFFSET = 192      # offsetof(struct bpf_prog_info, run_time_ns); run_cnt follows


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


def enable_bpf_stats() -> int:
    return bpf._bpf(_BPF_ENABLE_STATS, _EnableStatsAttr(type=_BPF_STATS_RUN_TIME), "BPF_ENABLE_STATS")


def prog_run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a BPF program: counted only while stats are enabled."""
    info = bpf.prog_info(prog_fd)
    raw = bytes(info)
    assert ctypes.sizeof(info) >= _RUN_TIME_OFFSET + 16
    return (int.from_bytes(raw[_RUN_TIME_OFFSET:_RUN_TIME_OFFSET + 8], "little"),
            int.from_bytes(raw[_RUN_TIME_OFFSET + 8:_RUN_TIME_OFFSET + 16], "little"))


def net_rx_softirqs() -> int:
    with open("/proc/softirqs") as f:
        for line in f:
            if line.split(":")[0].strip() == "NET_RX":
                return sum(int(x) for x in line.split(":")[1].split())
    return 0


def vm_status(pid: str = "self") -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])   # kB
    return out
