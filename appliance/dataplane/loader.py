"""Compile, load, pin and attach the XDP dispatcher, in a child process.

bcc brings LLVM (about 130 MB resident, ARCHITECTURE.md); running it in a short-lived child
keeps that out of the supervisor. The child prints one JSON line: program ids, compile
seconds, peak memory. Run as: python -m appliance.dataplane.loader --pin-dir D [--netns N] ...
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import subprocess
import sys
import time

from appliance import HOME
from appliance.dataplane import maps
from appliance.errors import DataplaneError

EBPF_DIR = HOME / "ebpf"
SOURCE = EBPF_DIR / "dispatcher.bpf.c"


def cflags(defines: dict[str, object] | None = None) -> list[str]:
    """The compiler's flags. KALKI_SLOT_SEED, the key of the detectors' slot tables
    (dispatcher.bpf.c), is drawn anew at each compile unless given: a secret of the running
    program, which nobody needs to know again (a new program starts with empty windows)."""
    defines = dict(defines or {})
    defines.setdefault("KALKI_SLOT_SEED", f"{secrets.randbits(32):#010x}u")
    flags = [f"-I{EBPF_DIR}", f"-DKALKI_MAX_DEVICES={defines.pop('KALKI_MAX_DEVICES', maps.MAX_DEVICES)}"]
    for k, v in defines.items():
        flags.append(f"-D{k}" if v is None else f"-D{k}={v}")
    return flags


def _attach(fd: int, ifname: str) -> None:
    from bcc import libbcc
    if libbcc.lib.bpf_attach_xdp(ifname.encode(), fd, 0) < 0:
        raise DataplaneError(f"cannot attach XDP to {ifname}")


def load(pin_dir: str, attach: dict[str, str], defines=None) -> dict:
    """Compiles and pins everything under pin_dir, then attaches {program: ifname}."""
    from bcc import BPF, libbcc

    started = time.monotonic()
    bpf = BPF(src_file=str(SOURCE).encode(), cflags=cflags(defines))
    fns = {name: bpf.load_func(name.encode(), BPF.XDP) for name in maps.PROGRAMS}
    compiled = time.monotonic() - started
    os.makedirs(pin_dir, exist_ok=True)
    for name in (*maps.MAPS, maps.RINGBUF):
        fd = bpf.get_table(name).map_fd
        if libbcc.lib.bpf_obj_pin(fd, f"{pin_dir}/{name}".encode()) < 0:
            raise DataplaneError(f"cannot pin map {name} under {pin_dir} (is it already pinned?)")
    for name, fn in fns.items():
        if libbcc.lib.bpf_obj_pin(fn.fd, f"{pin_dir}/{name}".encode()) < 0:
            raise DataplaneError(f"cannot pin program {name} under {pin_dir}")
    for name, ifname in attach.items():
        _attach(fns[name].fd, ifname)
    return {"compile_seconds": round(compiled, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def reattach(pin_dir: str, attach: dict[str, str]) -> dict:
    """Attaches the pinned programs again (after someone detached them): no compile."""
    from appliance.dataplane import bpf as sysbpf
    for name, ifname in attach.items():
        fd = sysbpf.obj_get(f"{pin_dir}/{name}")
        try:
            _attach(fd, ifname)
        finally:
            os.close(fd)
    return {"reattached": sorted(attach.values())}


def run_child(pin_dir: str, attach: dict[str, str], netns: str | None = None,
              only_reattach: bool = False, defines=None) -> dict:
    """Runs this module in a child process and returns what it printed."""
    cmd = [sys.executable, "-m", "appliance.dataplane.loader", "--pin-dir", pin_dir,
           "--attach", json.dumps(attach), "--defines", json.dumps(defines or {})]
    if netns:
        cmd += ["--netns", netns]
    if only_reattach:
        cmd.append("--reattach")
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          cwd=str(EBPF_DIR.parent), timeout=300)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise DataplaneError(f"loading the XDP dispatcher failed:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m appliance.dataplane.loader")
    ap.add_argument("--pin-dir", required=True)
    ap.add_argument("--attach", default="{}", help='JSON {"program": "ifname"}')
    ap.add_argument("--defines", default="{}")
    ap.add_argument("--netns")
    ap.add_argument("--reattach", action="store_true")
    args = ap.parse_args(argv)
    if args.netns:
        from appliance.netns import enter_for_good
        enter_for_good(args.netns)
    attach = json.loads(args.attach)
    try:
        if args.reattach:
            result = reattach(args.pin_dir, attach)
        else:
            result = load(args.pin_dir, attach, json.loads(args.defines))
    except DataplaneError as e:
        print(f"loader: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
