"""Destinations by name: what the resolver front adds to a DNS answer, side by side.

Three ways to ask the same dnsmasq (in the lab gateway's namespace, 1,000 host records, so
every answer is dnsmasq's own and no upstream is involved), interleaved query by query so the
machine's noise falls on all three alike:
  dnsmasq     straight to dnsmasq (127.0.0.1:5301), the baseline
  front       through appliance.dataplane.resolver with a hook that binds nothing
  front_bind  through the front binding every answer in kalki_name_allow for a device whose
              profile allows *.bench.example (the real Dataplane.answer: one map update)
Clients ask over loopback from the gateway's namespace: the device side's veth and XDP are the
same for all three and left out. The front runs in this process, alone; in `kalki run` it
shares the interpreter with the supervisor's loop.

  answer_us     per query, p50 and p99, for each way, and the ratios to dnsmasq
  qps           queries per second with 32 in flight for 3 s, each way in turn
  memory        the name bindings' memory: Python bookkeeping (tracemalloc) and the kernel map
                (fdinfo memlock) for 1,000 names of one address, and one name of 1,000 addresses
Each line carries the load average.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
import tracemalloc

import common
import dns.message
from common import emit, median, percentile

from appliance import netns
from appliance.dataplane import api as dataplane
from appliance.dataplane.resolver import Resolver

BENCH = "names"
NAMES = 1000
QUERIES = int(os.environ.get("KALKI_BENCH_NAME_QUERIES", "3000"))
DNSMASQ_PORT = 5301
WAYS = {"dnsmasq": ("127.0.0.1", DNSMASQ_PORT), "front": ("127.0.0.2", 5353),
        "front_bind": ("127.0.0.3", 5353)}


def load() -> float:
    return os.getloadavg()[0]


def address(i: int) -> str:
    return f"198.19.{64 + i // 250}.{1 + i % 250}"


def start_dnsmasq(lab, directory) -> subprocess.Popen:
    conf = directory / "bench-dnsmasq.conf"
    conf.write_text("\n".join([
        "listen-address=127.0.0.1", f"port={DNSMASQ_PORT}", "bind-interfaces", "no-resolv", "no-hosts",
        "user=root", "cache-size=10000", *[f"host-record=h{i}.bench.example,{address(i)},300"
                                          for i in range(NAMES)]]) + "\n")
    return common.ns_popen(lab.namespaces["gw"], ["/usr/sbin/dnsmasq", f"--conf-file={conf}",
                                                  "--keep-in-foreground"], start_new_session=True)


def wire(i: int, qid: int) -> bytes:
    q = dns.message.make_query(f"h{i % NAMES}.bench.example", "A")
    q.id = qid
    return q.to_wire()


def client(ns: str) -> socket.socket:
    with netns.entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    return s


def latencies(ns: str) -> dict[str, list[float]]:
    socks = {w: client(ns) for w in WAYS}
    out: dict[str, list[float]] = {w: [] for w in WAYS}
    for i in range(QUERIES):
        for way, target in WAYS.items():
            data = wire(i, i & 0xFFFF)
            t0 = time.perf_counter()
            socks[way].sendto(data, target)
            socks[way].recv(4096)
            out[way].append((time.perf_counter() - t0) * 1e6)
    for s in socks.values():
        s.close()
    return out


def throughput(ns: str, target, seconds: float = 3.0, window: int = 32) -> float:
    s = client(ns)
    s.settimeout(1)
    queries = [wire(i, i & 0xFFFF) for i in range(NAMES)]
    sent = answered = 0
    deadline = time.perf_counter() + seconds
    while sent - answered < window:
        s.sendto(queries[sent % NAMES], target)
        sent += 1
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        try:
            s.recv(4096)
        except TimeoutError:
            break
        answered += 1
        s.sendto(queries[sent % NAMES], target)
        sent += 1
    elapsed = time.perf_counter() - start
    s.close()
    return answered / elapsed


def memlock(dp) -> int:
    fd = dp._maps["kalki_name_allow"].fd
    text = open(f"/proc/self/fdinfo/{fd}").read()
    return int(re.search(r"memlock:\s+(\d+)", text).group(1))


def main() -> int:
    with common.lab("nm", devices=1) as (lab, dp):
        device = lab.devices[0]
        dp.apply(dataplane.DeviceSpec(device.name, device.mac, device.ip,
                                      {"allowlist": {"destinations": ["*.bench.example:443/tcp"]}}))
        lab_dir = topology_dir(lab)
        proc = start_dnsmasq(lab, lab_dir)
        fronts = []
        try:
            time.sleep(0.5)
            ns = lab.namespaces["gw"]
            with netns.entered(ns):
                subprocess.run(["ip", "addr", "add", "127.0.0.2/8", "dev", "lo"], capture_output=True)
                subprocess.run(["ip", "addr", "add", "127.0.0.3/8", "dev", "lo"], capture_output=True)
            fronts.append(Resolver("127.0.0.2", ("127.0.0.1", DNSMASQ_PORT), lambda *a: False,
                                   port=5353, namespace=ns).start())
            fronts.append(Resolver("127.0.0.3", ("127.0.0.1", DNSMASQ_PORT),
                                   lambda _ip, chain, addrs, ttl: dp.answer(device.ip, chain, addrs, ttl),
                                   port=5353, namespace=ns).start())
            latencies(ns)   # warm: dnsmasq's cache, the interpreter
            la = load()
            lat = latencies(ns)
            for way, xs in lat.items():
                emit(BENCH, "answer_us", round(median(xs), 1), "us", way=way,
                     p99=round(percentile(xs, 99), 1), n=len(xs), load=la)
            for way in ("front", "front_bind"):
                emit(BENCH, "answer_added_us", round(median(lat[way]) - median(lat["dnsmasq"]), 1), "us",
                     way=way, p99_added=round(percentile(lat[way], 99) - percentile(lat["dnsmasq"], 99), 1),
                     ratio_p50=round(median(lat[way]) / median(lat["dnsmasq"]), 2), load=la)
            bound = fronts[1].counts["bound"]
            emit(BENCH, "answers_bound", bound, "answers", way="front_bind", load=la)
            for way, target in WAYS.items():
                la = load()
                emit(BENCH, "qps", round(throughput(ns, target)), "queries/s", way=way, in_flight=32, load=la)
        finally:
            for f in fronts:
                f.close()
            common.stop(proc, sig=15)
        # memory: fresh bindings for the device, from the bookkeeping's own calls
        names = dp._loaded_names()
        device_id = dp.device_id(device.name)
        dp.expire_names()
        for shape, calls in (("1000 names x 1 address", [([f"n{i}.bench.example"], [address(i)])
                                                          for i in range(NAMES)]),
                             ("1 name x 1000 addresses", [(["many.bench.example"],
                                                           [address(i) for i in range(NAMES)])])):
            names.forget_device(device_id)
            dp.apply(dataplane.DeviceSpec(device.name, device.mac, device.ip,
                                          {"allowlist": {"destinations": ["*.bench.example:443/tcp"]}}))
            kernel_before = memlock(dp)
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for chain, addrs in calls:
                names.answer(device_id, chain, addrs, 300)
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            python_bytes = sum(s.size_diff for s in after.compare_to(before, "filename"))
            emit(BENCH, "memory_bytes", python_bytes, "bytes", part="python bookkeeping", shape=shape,
                 per_binding=round(python_bytes / NAMES), load=load())
            emit(BENCH, "memory_bytes", memlock(dp) - kernel_before, "bytes", part="kernel map (memlock)",
                 shape=shape, per_binding=round((memlock(dp) - kernel_before) / NAMES), load=load())
    return 0


def topology_dir(lab):
    from lab import topology
    return topology.state_path(lab.name).parent


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    raise SystemExit(main())
