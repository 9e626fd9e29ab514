"""nftables' part of a posture change, against the number of devices in the table.

For each table size (10, 100, 1,000, 4,000 devices), in a scratch namespace of its own:

  posture_change   one device between its normal part (member of `macs`/`ips`) and an attack
                   part (a connection-limit class and a gate entry) and back: Nft.plan + the
                   transaction, median and p99 (ms)
  cameras_25       25 devices moved in one transaction, as a rule that moves every camera does
  old_layout       the layout before stop 18, side by side in the same table size: a chain per
                   device, a posture change = flush the device's chain and add its rule
                   (the same libnftables, the same namespace kind)

and the ratio of the largest table to the smallest (flat = 1). The load average goes beside
each figure. Nothing but nftables is involved: no packets are sent.

At 1,000 devices (or the largest size below), the kernel path's own transaction: a camera
between its normal part (macs, ips, lateral, its two connection-limit classes) and its attack
part (quarantine with deception: out of `macs` and `ips`, into `deceive`; what only restricts
it, lateral and its classes, stays), as the rule device-under-attack moves it, timed back to
back (`camera_attack_hot`) and after 0.3 s asleep (`camera_attack_after_idle`), as a kernel
event finds it; `camera_attack_commands` says how many element commands it is. Beside them,
what idleness costs this machine by itself: one getppid() system call right after another
(`syscall_hot_us`) and the first one after 50 ms of Python without a system call
(`syscall_first_after_busy_us`).
"""
from __future__ import annotations

import ipaddress
import os
import subprocess
import time

import common
from common import emit, median, percentile

from appliance import netns
from appliance.dataplane import nft as nftmod

BENCH = "nft"
SIZES = [int(x) for x in os.environ.get("KALKI_BENCH_NFT_SIZES", "10,100,1000,4000").split(",")]
CHANGES = int(os.environ.get("KALKI_BENCH_NFT_CHANGES", 200))
ATTACK = {"concurrent": 10, "new_per_second": 4}


def device(i: int) -> tuple[str, str]:
    mac = f"02:42:cc:00:{i >> 8:02x}:{i & 0xff:02x}"
    return mac, common.lab_only(str(ipaddress.IPv4Address("198.18.16.0") + i))


def load() -> float:
    return os.getloadavg()[0]


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def fill(nf: nftmod.Nft, size: int) -> dict[int, dict]:
    state: dict[int, dict] = {}
    commands: list[dict] = []
    for i in range(size):
        mac, ip = device(i)
        plan = nf.plan(i, mac, ip, None, None, None)
        assert plan
        commands += plan[0]
        state[i] = plan[1]
        if len(commands) > 4000:
            nf.run(commands, "filling")
            commands = []
    if commands:
        nf.run(commands, "filling")
    return state


def flip(nf: nftmod.Nft, state: dict[int, dict], ids: list[int], attack: list[bool]):
    def once():
        attack[0] = not attack[0]
        commands = []
        for i in ids:
            mac, ip = device(i)
            plan = nf.plan(i, mac, ip, ATTACK if attack[0] else None, 80 if attack[0] else None,
                           state[i])
            assert plan
            commands += plan[0]
            state[i] = plan[1]
        nf.run(commands, "posture change")
    return once


CAMERA_NORMAL = {"concurrent": 50, "new_per_second": 50}      # umboxes/camera.toml


def camera_attack(nf: nftmod.Nft, state: dict[int, dict], idle: float) -> list[float]:
    """Device 0 as a camera, normal -> attack (the timed transaction) -> normal, CHANGES // 5
    times, `idle` seconds asleep before each timed one."""
    mac, ip = device(0)

    def run(attack: bool) -> float:
        plan = (nf.plan(0, mac, ip, None, None, state[0], quarantine=True, deception=True) if attack
                else nf.plan(0, mac, ip, CAMERA_NORMAL, None, state[0], lateral_block=True))
        if plan is None:        # already normal (the first call)
            return 0.0
        t0 = time.perf_counter()
        nf.run(nftmod.merged(plan[0]), "camera posture")
        state[0] = plan[1]
        return (time.perf_counter() - t0) * 1000

    run(False)
    out = []
    for _ in range(max(10, CHANGES // 5)):
        if idle:
            time.sleep(idle)
        out.append(run(True))
        run(False)
    return out


def syscall_cost(busy_s: float, n: int = 30) -> tuple[list[float], list[float]]:
    """(getppid right after another, the first getppid after `busy_s` of Python), µs."""
    hot, first = [], []
    for _ in range(n):
        end = time.perf_counter() + busy_s
        while time.perf_counter() < end:
            pass
        t0 = time.perf_counter_ns()
        os.getppid()
        t1 = time.perf_counter_ns()
        os.getppid()
        t2 = time.perf_counter_ns()
        first.append((t1 - t0) / 1e3)
        hot.append((t2 - t1) / 1e3)
    return hot, first


def old_layout(ns: str | None, size: int) -> list[float]:
    """A chain per device in a table of its own (kbench_old), as nft.py had it until stop 18;
    ns None: in this thread's namespace, as sized() uses the new layout."""
    import nftables

    with netns.entered(ns):
        lib = nftables.Nftables()
    t = {"family": "inet", "table": "kbench_old"}

    def run(cmds):
        with netns.entered(ns):
            rc, _, err = lib.json_cmd({"nftables": cmds})
        assert rc == 0, err

    run([{"add": {"table": {"family": "inet", "name": "kbench_old"}}},
         {"add": {"map": {**t, "name": "to_device", "type": "ipv4_addr", "map": "verdict"}}}])
    cmds: list[dict] = []
    for i in range(size):
        _, ip = device(i)
        cmds += [{"add": {"chain": {**t, "name": f"dev{i}_in"}}},
                 {"add": {"chain": {**t, "name": f"dev{i}_out"}}},
                 {"add": {"element": {**t, "name": "to_device",
                                      "elem": [[ip, {"goto": {"target": f"dev{i}_in"}}]]}}}]
        if len(cmds) > 4000:
            run(cmds)
            cmds = []
    if cmds:
        run(cmds)
    rule = [nftmod._CT_NEW, {"ct count": {"val": 10, "inv": True}}, {"counter": None}, {"drop": None}]
    on = [False]

    def once():
        on[0] = not on[0]
        c = [{"flush": {"chain": {**t, "name": "dev0_in"}}}]
        if on[0]:
            c.append({"add": {"rule": {**t, "chain": "dev0_in", "expr": rule}}})
        run(c)
    try:
        return timed(once, CHANGES)
    finally:
        run([{"delete": {"table": {"family": "inet", "name": "kbench_old"}}}])


def sized(ns: str, size: int, camera_size: int, results: dict) -> None:
    """One table size's figures, in `ns`. With KALKI_BENCH_IN_GATEWAY (the default) this
    thread is inside `ns` already and libnftables is used as the appliance uses it (namespace
    None: no setns(2) around each transaction)."""
    where = None if common.IN_GATEWAY else ns
    nf = nftmod.Nft(where, "dev0", "198.18.0.1", 8181)
    nf.ensure_table()
    state = fill(nf, size)
    one = timed(flip(nf, state, [0], [False]), CHANGES)
    cams = timed(flip(nf, state, list(range(min(25, size))), [False]), max(20, CHANGES // 5))
    old = old_layout(where, size)
    if size == camera_size:
        hot, after_idle = [], []
        for _ in range(2):      # interleaved
            hot += camera_attack(nf, state, 0)
            after_idle += camera_attack(nf, state, 0.3)
        for name, xs in (("camera_attack_hot", hot), ("camera_attack_after_idle", after_idle)):
            emit(BENCH, f"{name}_p50", round(median(xs), 3), "ms", devices=size, n=len(xs),
                 p99=round(percentile(xs, 99), 3), load=round(load(), 2))
        mac, ip = device(0)
        attack = nf.plan(0, mac, ip, None, None, state[0], quarantine=True, deception=True)
        emit(BENCH, "camera_attack_commands", len(nftmod.merged(attack[0])) if attack else 0,
             "commands", devices=size, what="element commands in the timed transaction")
        emit(BENCH, "camera_attack_after_idle_over_hot_p50",
             round(median(after_idle) / median(hot), 2), "ratio", devices=size,
             load=round(load(), 2), what="the same transaction after 0.3 s asleep / back to back")
        sys_hot, sys_first = syscall_cost(0.05)
        emit(BENCH, "syscall_hot_us", round(median(sys_hot), 2), "us", n=len(sys_hot),
             load=round(load(), 2), what="getppid() right after another")
        emit(BENCH, "syscall_first_after_busy_us", round(median(sys_first), 2), "us",
             n=len(sys_first), p90=round(percentile(sys_first, 90), 2), load=round(load(), 2),
             what="the first getppid() after 50 ms of Python without a system call")
    results[size] = {"posture_change": one, "cameras_25": cams, "old_layout": old}
    for name, xs in results[size].items():
        emit(BENCH, f"{name}_p50", round(median(xs), 3), "ms", devices=size, n=len(xs),
             load=round(load(), 2))
        emit(BENCH, f"{name}_p99", round(percentile(xs, 99), 3), "ms", devices=size,
             n=len(xs), load=round(load(), 2))
    emit(BENCH, "old_over_new_p50", round(median(old) / median(one), 1), "ratio",
         devices=size, load=round(load(), 2))


def main() -> None:
    common.emit_where(BENCH)
    common.install_signal_handlers()
    results: dict[int, dict[str, list[float]]] = {}
    camera_size = max([s for s in SIZES if s <= 1000] or [min(SIZES)])
    for size in SIZES:
        ns = f"kalki-bnft{common.suffix()}-gw"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            subprocess.run(["ip", "-n", ns, "link", "add", "dev0", "type", "veth", "peer", "name",
                            "dev0p"], check=True)
            with netns.entered(ns if common.IN_GATEWAY else None):
                sized(ns, size, camera_size, results)
        finally:
            subprocess.run(["ip", "netns", "del", ns])
    big = max(results)
    for name in ("posture_change", "cameras_25", "old_layout"):
        # 25 cameras need a table of 25 at least
        small = min(s for s in results if name != "cameras_25" or s >= 25)
        emit(BENCH, f"{name}_growth_{big}_over_{small}",
             round(median(results[big][name]) / median(results[small][name]), 2), "ratio",
             load=round(load(), 2), what="median at the largest table / at the smallest (flat = 1)")


if __name__ == "__main__":
    main()
