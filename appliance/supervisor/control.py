"""The supervisor's control socket: one JSON request per line, one JSON answer per line.

A root-only unix socket; the `kalki` CLI (and the lab, and later the web page) talk to the
running supervisor through it, so the supervisor stays the only writer of the store.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

from appliance.policy import engine as policy
from appliance.errors import ConfigError, KalkiError

MAX_REQUEST = 1 << 20


def _device_view(sup, d: dict) -> dict:
    name = d["name"]
    out = dict(d)
    out["enforced"] = name in sup.dp.devices
    out["availability"] = sup.availability.get(name)
    if name in sup.suggestions:
        out["suggested_type"] = sup.suggestions[name]
    return out


def _duration(value) -> int | None:
    if value in (None, ""):
        return None
    return policy.parse_duration(value, "--for")


def handle(sup, req: dict):
    """Carries out one request on the supervisor's loop; returns the result or raises."""
    op = req.get("op")
    args = req.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError("args must be an object")

    def arg(name, default=...):
        if name in args:
            return args[name]
        if default is ...:
            raise ConfigError(f"{op}: missing argument {name!r}")
        return default

    if op == "status":
        return {"devices": len(sup.known), "enforced": len(sup.dp.devices),
                "uptime_s": round((time.monotonic_ns() - sup.started_ns) / 1e9, 1),
                "mqtt": bool(sup.bus and sup.bus.connected),
                "mqtt_rejected": dict(sup.bus.rejected) if sup.bus else {},
                "mqtt_denied": dict(sup.bus.denied) if sup.bus else {},
                "maintenance_until": sup.store.maintenance_until(),
                "policy_time": sup.now().isoformat(), "reconcile": sup.reconcile_report,
                "site_error": getattr(sup, "site_error", None),
                "counters": dict(sup.counters),
                "gc_pause_max_ms": [round(x, 2) for x in getattr(sup, "gc_pause_max_ms", [])]}
    if op == "devices":
        return [_device_view(sup, d) for d in sorted(sup.known.values(), key=lambda d: d["name"])]
    if op == "device_show":
        name = arg("name")
        d = sup._device(name)
        view = _device_view(sup, d)
        view["history"] = sup.store.posture_history(name, limit=20)
        view["counters"] = sup.dp.counters(name) if name in sup.dp.devices else {}
        view["alerts"] = sup.store.alerts(device=name, limit=20)
        view["umboxes"] = sup.profiles[d["type"]].stack(d["posture"]) if d.get("type") in sup.profiles else {}
        return view
    if op == "device_add":
        return sup.add_device(arg("name"), arg("mac"), arg("ip"), arg("type", None),
                              bool(arg("approve", False)), arg("group", None))
    if op == "device_approve":
        return sup.approve(arg("name"), arg("type", None))
    if op == "device_remove":
        sup.remove(arg("name"))
        return {"removed": arg("name")}
    if op == "posture_set":
        ns = sup.set_posture(arg("name"), arg("posture"), "set by operator", _duration(arg("for", None)))
        return {"device": arg("name"), "posture": arg("posture"), "enforced_ns": ns}
    if op == "posture_reset":
        sup.set_posture(arg("name"), "normal", "reset by operator")
        return {"device": arg("name"), "posture": "normal"}
    if op == "alerts":
        return sup.store.alerts(device=arg("device", None), limit=int(arg("limit", 50)))
    if op == "decisions":
        return sup.store.decisions(device=arg("device", None), limit=int(arg("limit", 50)))
    if op == "maintenance":
        minutes = arg("minutes")
        if isinstance(minutes, bool) or not isinstance(minutes, int) or not 0 <= minutes <= 24 * 60:
            raise ConfigError(f"maintenance: minutes must be 0 to 1440, got {minutes!r}")
        import datetime
        until = (sup.now() + datetime.timedelta(minutes=minutes)).isoformat() if minutes else None
        sup.store.set_maintenance(until)
        sup.store.audit("maintenance", "operator", {"until": until})
        return {"maintenance_until": until}
    if op == "memory":     # for a field engineer chasing growth: VmRSS/VmHWM, and where if traced
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile")))
        out = {k: v.strip() for k, v in status.items()}
        import tracemalloc
        if tracemalloc.is_tracing():   # PYTHONTRACEMALLOC=N in the supervisor's environment
            top = tracemalloc.take_snapshot().statistics("lineno")[:int(arg("top", 25))]
            out["top"] = [{"where": str(t.traceback), "kb": round(t.size / 1024, 1), "count": t.count}
                          for t in top]
        return out
    if op == "rules_validate":
        return validate_rules_text(arg("text"), arg("source", "rules"))
    if op == "block_source":
        ip, seconds = arg("ip"), arg("seconds")
        sup.dp.block_source(ip, seconds)
        device = sup.dp.device_by_ip(arg("target", "")) if arg("target", None) else None
        sup.raise_alert(device, arg("reason", "blocked"), arg("by", "operator"),
                        {"source": ip, "seconds": seconds}, time.monotonic_ns())
        return {"blocked": ip, "seconds": seconds}
    if op == "dhcp_lease":
        if arg("action") in ("add", "old"):
            identity = arg("identity", {}) or {}
            if not isinstance(identity, dict):
                raise ConfigError("dhcp_lease: identity must be an object")
            sup.discovered(arg("mac"), arg("ip"), identity)
        return {"ok": True}
    if op == "clock_set":
        if not sup.cfg.policy.fake_time:
            raise ConfigError("clock_set: only with policy.fake_time set (the lab)")
        sup.clock.set(arg("time"))
        return {"policy_time": sup.now().isoformat()}
    # -- the panel (appliance/faces/panel.py): the lab's finger on the button, and the LEDs --
    if op == "button":
        if not sup.panel:
            raise ConfigError("button: the panel is off ([panel] enabled = false)")
        return sup.panel.simulate(arg("action"), arg("seconds", None))
    if op == "panel":
        if not sup.panel:
            return {"enabled": False, "claim_open": sup.claim_open()}
        return {"enabled": True, **sup.panel.state(), "claim_open": sup.claim_open(),
                "claim_until": sup.claim_until.isoformat() if sup.claim_open() else None}
    raise ConfigError(f"unknown request {op!r}")


def validate_rules_text(text: str, source: str) -> dict:
    """A TOML file of [[rules]] (site rules), validated without changing anything."""
    import tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {e}") from None
    rules = data.get("rules")
    if not isinstance(rules, list) or not rules:
        raise ConfigError(f"{source}: expected [[rules]] tables")
    parsed = [policy.parse_rule(r, f"{source}: rules[{i}]") for i, r in enumerate(rules)]
    policy.Engine(parsed)     # duplicate names
    return {"valid": [r.name for r in parsed]}


async def serve_client(sup, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            if len(line) > MAX_REQUEST:
                answer = {"ok": False, "error": "request too large"}
            else:
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ConfigError("a request is a JSON object")
                    answer = {"ok": True, "result": handle(sup, req)}
                except json.JSONDecodeError as e:
                    answer = {"ok": False, "error": f"malformed request: {e}"}
                except (KalkiError, ValueError) as e:
                    answer = {"ok": False, "error": str(e)}
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def request(socket_path: str, op: str, timeout: float = 30.0, **args):
    """One request to a running supervisor; raises KalkiError with its message on refusal."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(socket_path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise KalkiError(f"no supervisor listening on {socket_path} (is `kalki run` running?)") from None
    try:
        s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    if not data:
        raise KalkiError(f"the supervisor on {socket_path} closed the connection without an answer")
    answer = json.loads(data)
    if not answer.get("ok"):
        raise KalkiError(answer.get("error", "refused"))
    return answer["result"]


def socket_for_lab(name: str) -> str:
    from lab import topology
    return str(topology.state_path(name).parent / "kalki.sock")
