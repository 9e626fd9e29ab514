"""The `kalki` command."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import KalkiError


def _lab_up(args) -> int:
    from .lab import topology
    s = topology.up(args.name, args.devices, args.compromised, services=not args.no_services)
    if args.json:
        print(json.dumps(s.to_json(), indent=1))
    else:
        print(f"lab {s.name} is up: gateway {s.namespaces['gw']}, "
              f"{len(s.devices)} devices, protected by XDP and nftables")
        for d in s.devices:
            print(f"  {d.name:16} {d.type:14} {d.ip:15} {d.mac}  netns {d.namespace}")
        print(f"  attacker {s.gateway['attacker_ip']} in {s.namespaces['atk']}, "
              f"internet {s.gateway['inet_ip']} in {s.namespaces['inet']}")
        print(f"remove it with: kalki lab down {s.name}")
    return 0


def _lab_down(args) -> int:
    from .lab import topology
    removed = topology.down(args.name)
    print(f"lab {args.name}: removed {len(removed)} namespaces and processes")
    return 0


def _lab_status(args) -> int:
    from .lab import topology
    names = topology.labs()
    if args.json:
        print(json.dumps([topology.load(n).to_json() for n in names], indent=1))
    elif not names:
        print("no labs")
    else:
        for n in names:
            s = topology.load(n)
            print(f"{n}: {len(s.devices)} devices, gateway {s.namespaces['gw']}")
    return 0


def _lab_block(args) -> int:
    from .dataplane import Dataplane
    from .lab import topology
    s = topology.load(args.name)
    with Dataplane.open(s.name, s.namespaces["gw"], topology.gateway_settings(s)) as dp:
        dp.block_source(args.source, args.seconds)
    print(f"lab {args.name}: {args.source} dropped for {args.seconds} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kalki", description="Kalki on a Raspberry Pi")
    sub = ap.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("lab", help="the lab of network namespaces").add_subparsers(
        dest="lab_command", required=True)
    p = lab.add_parser("up", help="build a lab and protect its devices")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--name")
    p.add_argument("--compromised", action="store_true",
                   help="the last device is compromised (for lateral-movement stories)")
    p.add_argument("--no-services", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_lab_up)
    p = lab.add_parser("down", help="remove a lab and everything it created")
    p.add_argument("name")
    p.set_defaults(func=_lab_down)
    p = lab.add_parser("status", help="list the labs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_lab_status)
    p = lab.add_parser("block", help="put a source into the lab's kernel drop set")
    p.add_argument("name")
    p.add_argument("source")
    p.add_argument("seconds", type=int)
    p.set_defaults(func=_lab_block)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KalkiError as e:
        print(f"kalki: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
