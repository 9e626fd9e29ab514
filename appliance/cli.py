"""The `kalki` command: the lab, the supervisor (`kalki run`), and operator commands that talk
to the running supervisor over its control socket (`--lab NAME` for a lab's supervisor)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from appliance.errors import KalkiError
from appliance.vocab import SETTABLE_POSTURES

DEFAULT_SOCKET = "/run/kalki/kalki.sock"


def _print(result, as_json: bool) -> None:
    if as_json or not isinstance(result, list):
        print(json.dumps(result, indent=1, default=str))
        return
    for row in result:
        print(json.dumps(row, default=str))


# -- tables for people, JSON for scripts --------------------------------------------------------
LISTING = ("On a terminal: an aligned table. Otherwise (a pipe, a file) one JSON object per line, "
           "as scripts have always read it; --table gives the table anyway, --json one JSON array.")


def _listing_flags(p: argparse.ArgumentParser) -> None:
    how = p.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true", help="JSON: one array of objects")
    how.add_argument("--table", action="store_true",
                     help="an aligned table even when the output is not a terminal")


def _as_table(args) -> bool:
    return bool(getattr(args, "table", False)) or (not getattr(args, "json", False) and sys.stdout.isatty())


def table(headers: tuple[str, ...], rows: list[tuple], width: int | None = None) -> str:
    """Aligned columns under upper-case headers, two spaces apart; the last column is not padded
    and, given a width (the terminal's), cut to it with an ellipsis."""
    cells = [[("—" if c is None or c == "" else str(c)).replace("\n", " ") for c in row] for row in rows]
    head = [h.upper() for h in headers]
    widths = [max(len(r[i]) for r in [head, *cells]) for i in range(len(headers) - 1)]
    lines = []
    for r in [head, *cells]:
        line = "  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip()
        if width and len(line) > width:
            line = line[:max(width - 1, 0)] + "…"
        lines.append(line)
    return "\n".join(lines)


def _width() -> int | None:
    import shutil
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _utc(at) -> str:
    """A stored time as the command shows it: ISO 8601 in UTC, to the second."""
    import datetime
    try:
        t = datetime.datetime.fromisoformat(str(at))
    except ValueError:
        return str(at or "")
    if t.tzinfo is None:
        return t.isoformat(timespec="seconds")
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _at(rec: dict) -> str:
    """A log record's time (_utc), marked where the store says the clock went back before it:
    the list reads in the order things happened, so that time seems to run backwards."""
    return _utc(rec.get("at")) + (" (clock went back)" if rec.get("clock_back") else "")


def _device_rows(devices: list[dict]) -> tuple[tuple[str, ...], list[tuple]]:
    rows = []
    for d in devices:
        until = (f"{_utc(d['posture_expires'])}, then {d.get('posture_revert_to')}"
                 if d.get("posture_expires") else "")
        note = f"suggested type {d['suggested_type']}" if d.get("suggested_type") else ""
        if d.get("mqtt_user"):
            note = ", ".join(x for x in (note, f"MQTT as {d['mqtt_user']}") if x)
        rows.append((d.get("name"), d.get("posture") if d.get("approved") else "waiting for approval",
                     d.get("type"), d.get("group"), d.get("ip"), d.get("mac"),
                     "yes" if d.get("enforced") else "no", until, note))
    return ("device", "posture", "type", "group", "address", "mac", "enforced", "until", "note"), rows


def _alert_rows(alerts: list[dict]) -> tuple[tuple[str, ...], list[tuple]]:
    return (("id", "at (UTC)", "device", "kind", "severity", "what happened"),
            [(a.get("id"), _at(a), a.get("device"), a.get("type"), a.get("severity"),
              a.get("explanation") or json.dumps(a.get("details"), default=str)) for a in alerts])


def _decision_rows(recs: list[dict]) -> tuple[tuple[str, ...], list[tuple]]:
    rows = []
    for r in recs:
        if r.get("kind") == "audit":
            details = {k: v for k, v in (r.get("details") or {}).items() if k != "device"}
            what = f"{r.get('event')} by {r.get('actor')}" + (f": {json.dumps(details, default=str)}"
                                                              if details else "")
            ms = None
        else:
            what = r.get("explanation") or f"rule {r.get('rule')}"
            ms = (r.get("timing_ms") or {}).get("enforce")
        rows.append((r.get("id"), _at(r), r.get("kind"), r.get("device"), ms, what))
    return ("id", "at (UTC)", "kind", "device", "enforce ms", "what"), rows


def _listing(op, render, cut: bool = True, **fields):
    """A request whose answer is a list: a table on a terminal (or --table), else JSON. `cut`:
    the table's lines are cut to the terminal's width (its last column is words)."""
    def run(args) -> int:
        from appliance.client import request
        values = {k: getattr(args, v) for k, v in fields.items() if getattr(args, v) is not None}
        result = request(_socket(args), op, **values)
        if _as_table(args):
            headers, rows = render(result)
            print(table(headers, rows, _width() if cut else None) if rows else f"no {op}")
        else:
            _print(result, args.json)
        return 0
    return run


# -- the lab --------------------------------------------------------------------------------
def _lab_up(args) -> int:
    from lab import topology
    fake_time = args.fake_time
    if args.scenario:     # the demo scenarios (lab/scenarios.py)
        from lab import scenarios
        fake_time = scenarios.check_lab_args(args.scenario, args.no_supervisor, args.no_services,
                                             args.devices, fake_time)
    s = topology.up(args.name, args.devices, args.compromised, services=not args.no_services,
                    supervisor=not args.no_supervisor, unapproved=args.unapproved,
                    fake_time=fake_time, ui=not args.no_ui)
    if args.chatter:
        from lab import chatter
        chatter.start(s)
    if args.json:
        print(json.dumps(s.to_json(), indent=1))
        return 0
    print(f"lab {s.name} is up: gateway {s.namespaces['gw']}, {len(s.devices)} devices, "
          f"protected by XDP and nftables" + (", supervisor and MQTT broker running"
                                              if not args.no_supervisor else ""))
    for d in s.devices:
        print(f"  {d.name:16} {d.type:14} {d.ip:15} {d.mac}  netns {d.namespace}")
    print(f"  attacker {s.gateway['attacker_ip']} in {s.namespaces['atk']}, "
          f"internet {s.gateway['inet_ip']} in {s.namespaces['inet']}")
    if not args.no_supervisor:
        print(f"talk to its supervisor: kalki --lab {s.name} devices")
        print(f"its web page: {s.gateway.get('web_url')} (claim it: kalki --lab {s.name} button press)")
    if args.scenario:
        from lab import scenarios
        ok = scenarios.succeeded(scenarios.play(s, args.scenario))
        print(f"the lab stays up; remove it with: kalki lab down {s.name}")
        return 0 if ok else 1
    print(f"remove it with: kalki lab down {s.name}")
    return 0


def _lab_play(args) -> int:
    """A demo scenario on a running lab (watch it on the page after claiming it)."""
    from lab import scenarios, topology
    lab = topology.load(args.name)
    if not lab.gateway.get("supervisor"):
        raise KalkiError(f"lab {args.name} runs no supervisor: build it without --no-supervisor")
    ok = scenarios.succeeded(scenarios.play(lab, args.scenario))
    return 0 if ok else 1


def _lab_down(args) -> int:
    from lab import topology
    removed = topology.down(args.name)
    print(f"lab {args.name}: removed {len(removed)} namespaces and processes")
    return 0


def _lab_status(args) -> int:
    from lab import topology
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
    from appliance.dataplane.api import Dataplane
    from lab import topology
    s = topology.load(args.name)
    with Dataplane.open(s.name, s.namespaces["gw"], topology.gateway_settings(s)) as dp:
        dp.block_source(args.source, args.seconds)
    print(f"lab {args.name}: {args.source} dropped for {args.seconds} s")
    return 0


def _lab_dns(args) -> int:
    from lab import topology
    s = topology.load(args.name)
    if not s.pids.get("inet-dns"):
        print(f"lab {args.name}: it has no name server (it runs with the supervisor)", file=sys.stderr)
        return 2
    topology.dns_set(s, args.hostname, args.addresses, args.ttl, cname=args.cname)
    what = f"CNAME {args.cname}" if args.cname else " ".join(args.addresses)
    print(f"lab {args.name}: {args.hostname} -> {what} (TTL {args.ttl} s)")
    return 0


# -- the supervisor -------------------------------------------------------------------------
def _run(args) -> int:
    # paho-mqtt imports dnspython whenever it is installed, for SRV lookups the supervisor never
    # makes: 3 MB of its memory where the tests' packages are (the image has no dnspython).
    if "dns" not in sys.modules:
        sys.modules["dns"] = None       # type: ignore[assignment]
    from appliance.run import main
    return main(args.config)


def _store_restore_previous(args) -> int:
    """Offline: the supervisor must not have the store open while its file is replaced."""
    from pathlib import Path

    from appliance.client import request
    from appliance.config import load
    from appliance.store.state import FILENAME
    from appliance.store.storage import restore_previous
    directory = Path(args.state_dir or load(args.config).state.directory)
    try:
        request(_socket(args), "status", timeout=2)
    except KalkiError:
        pass
    else:
        raise KalkiError("a supervisor is running and has the store open: stop it first "
                         "(systemctl stop kalki), then run this again")
    refused = restore_previous(directory / FILENAME)
    print(f"{directory / FILENAME}: the previous generation is back; the refused file is {refused}")
    return 0


def _config_defaults(args) -> int:
    from appliance.config import defaults_toml
    print(defaults_toml())
    return 0


def _rules_validate(args) -> int:
    from appliance.config import read_text
    from appliance.supervisor.ops import validate_rules_text
    try:
        text = read_text(args.file)       # UTF-8, or a ConfigError naming the byte
    except OSError as e:
        raise KalkiError(f"{args.file}: {e.strerror}") from None
    result = validate_rules_text(text, args.file)
    print(f"{args.file}: {len(result['valid'])} valid rule(s): {', '.join(result['valid'])}")
    return 0


def _rule_rows(rules: list[dict]) -> tuple[tuple[str, ...], list[tuple]]:
    return (("rule", "source", "on", "what it does"),
            [(r.get("name"), r.get("source"),
              "yes" if r.get("enabled") else "switched off" if r.get("switched_off") or r.get("editable")
              else "off in its profile", r.get("words")) for r in rules])


def _rules_switch(args) -> int:
    """Built-in and profile rules too: switching one off is audited and shown on the web page."""
    from appliance.client import request
    r = request(_socket(args), "set_rule_enabled", name=args.name, enabled=args.enabled)
    what = "built-in" if r.get("source") == "builtin" else r.get("source") or "site"
    print(f"{r.get('name', args.name)} ({what} rule): {'on' if args.enabled else 'switched off'}")
    return 0


def _read_file(path: str, max_bytes: int, what: str) -> str:
    """A file sent to the supervisor: at most `max_bytes`, UTF-8 (a ConfigError naming the
    byte otherwise); errors name the file."""
    from appliance.config import read_text
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise KalkiError(f"{path}: {size} bytes: {what} is at most {max_bytes}")
        return read_text(path)
    except OSError as e:
        raise KalkiError(f"{path}: {e.strerror}") from None


def _profile_import(args) -> int:
    """Sends the file's text; the supervisor tells a MUD file (JSON) from a TOML profile."""
    from appliance.client import request
    from appliance.policy.mud import MAX_BYTES
    text = _read_file(args.file, MAX_BYTES, "a profile or MUD file")
    fields = {"type": args.type, "device_ip": args.device_ip}
    result = request(_socket(args), "profile_import", text=text, filename=args.file,
                     **{k: v for k, v in fields.items() if v is not None})
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(result["type"])
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    return 0


def _profile_list(args) -> int:
    from appliance.client import request
    rows = request(_socket(args), "profile_list")
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(table(("type", "source", "used by", "description"),
                [(r["type"], r["source"], ", ".join(r["devices"]) if r["devices"] else "unused",
                  r["description"]) for r in rows], _width()))
    return 0


def _profile_export(args) -> int:
    from appliance.client import request
    fields = {"mud_url": args.mud_url} if args.mud_url else {}
    result = request(_socket(args), "profile_export", type=args.type, format=args.format, **fields)
    sys.stdout.write(result["text"])
    return 0


def _profile_from_device(args) -> int:
    from appliance.client import request
    fields = {k: v for k, v in (("type", args.type), ("mud_url", args.mud_url)) if v}
    result = request(_socket(args), "profile_from_device", name=args.device, format=args.format, **fields)
    sys.stdout.write(result["text"])
    return 0


def _notify_test(args) -> int:
    """One test message per channel; waits for the slowest (one try, [notify] timeout_seconds)."""
    from appliance.client import request
    fields = {"channel": args.channel} if args.channel else {}
    r = request(_socket(args), "notify_test", timeout=300, **fields)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        for channel, x in r.items():
            to = f" to {x['to']}" if x.get("to") else ""
            print(f"{channel:8} {'sent' if x['ok'] else 'FAILED'}{to}"
                  + (f" ({x['seconds']} s)" if x["ok"] else f": {x['error']}"))
    return 0 if all(x["ok"] for x in r.values()) else 1


def _home_assistant_lines(ha: dict) -> list[str]:
    """What to enter in Home Assistant's MQTT integration, as the page's Home Assistant section
    says it."""
    if not ha["enabled"]:
        return [f"Home Assistant: off ({ha['setting']} is empty in the config file)"]
    lines = []
    for li in ha["listeners"]:
        where = li["address"] or "any address of the appliance (the one its web page is at)"
        lines += [f"broker            {where}",
                  f"port              {li['port']} ({'TLS' if li['tls'] else 'plain MQTT, no TLS'})"]
    if not ha["listeners"]:
        lines.append(f"broker            unknown: no broker configuration in {ha['broker_directory']} "
                     "(mqtt.broker_directory)")
    lines += [f"username          {ha['user']}",
              f"client id         {ha['client_id']} (the integration's advanced options; the broker "
              f"accepts {ha['client_id_rule']})",
              f"discovery prefix  {ha['discovery_prefix']}"]
    return lines


def _home_assistant(args) -> int:
    from appliance.client import request
    ha = request(_socket(args), "home_assistant_broker")
    if args.json:
        print(json.dumps(ha, indent=1))
        return 0
    print("\n".join(_home_assistant_lines(ha)))
    if ha["enabled"]:
        print("password          " + ("set (only its hash is kept; `kalki mqtt home-assistant-password` "
                                      "sets a new one)" if ha["password_set"] else
                                      f"unknown: {ha['password_error']}" if ha.get("password_error") else
                                      "none yet: `kalki mqtt home-assistant-password` sets one"))
    return 0


def _home_assistant_password(args) -> int:
    """Prints the new password this once: the supervisor keeps only its hash."""
    from appliance.client import request
    ha = request(_socket(args), "home_assistant_password")
    if args.json:
        print(json.dumps(ha, indent=1))
        return 0
    print("\n".join(_home_assistant_lines(ha)))
    print(f"password          {ha['password']}")
    print("shown this once: enter it in Home Assistant now; the old password no longer works"
          + ("" if ha["broker_reloaded"] else " (the broker is not running: it takes the new one "
             "when it starts)"), file=sys.stderr)
    return 0


def _device_rename(args) -> int:
    from appliance.client import request
    r = request(_socket(args), "device_rename", name=args.name, new=args.new)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"{r['from']} is now {r['device']['name']}")
    for note in r["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _device_group(args) -> int:
    from appliance.client import request
    r = request(_socket(args), "device_group", name=args.name, group=None if args.none else args.group)
    print(f"{r['name']}: group {r['group']}" if r.get("group") else f"{r['name']}: in no group")
    return 0


def _device_check_logins(args) -> int:
    """Waits for the check (a try per entry, a second or more apart); exits 1 if a login worked."""
    from appliance.client import request
    from appliance.policy.profiles import MAX_DEFAULT_LOGINS
    from appliance.supervisor import logins
    longest = MAX_DEFAULT_LOGINS * (logins.TRY_SECONDS + 2 * logins.PAUSE_SECONDS) + 30
    r = request(_socket(args), "device_check_logins", timeout=longest, name=args.name)
    if args.json:
        print(json.dumps(r, indent=1))
        return 1 if r.get("found") else 0
    if r["state"] == "skipped":
        print(f"{args.name}: not checked: {r.get('reason')}")
        return 0
    for x in r["results"]:
        where = f"{x['service']} port {x['port']}" + (f" {x['path']}" if x.get("path") else "")
        print(f"{x['outcome']:12} {where:28} user {x['user']}: {x['detail']}")
    if r.get("found"):
        print(f"{args.name}: {r['found']} default login(s) work: change the password on the device "
              "(a default-credentials alert was raised)")
        return 1
    print(f"{args.name}: no default login worked")
    return 0


def _profile_remove(args) -> int:
    from appliance.client import request
    print(f"removed {request(_socket(args), 'profile_remove', type=args.type)['removed']}")
    return 0


def _profile_test(args) -> int:
    """Runs here, as root, not in the supervisor (whose loop must not wait seconds for a
    compile): the profiles are read as the supervisor reads them, shipped and installed."""
    from pathlib import Path

    from appliance.config import DEFAULT_PATH, Config, load
    from appliance.dataplane import capture, trial
    from appliance.dataplane.api import GatewaySettings
    from appliance.dataplane.umbox import check_controllers, check_my_controllers, compile_stack
    from appliance.policy import profiles
    from appliance.vocab import check_mac
    cfg = Config() if args.config is None and not DEFAULT_PATH.exists() else load(args.config or DEFAULT_PATH)
    state_dir = Path(args.state_dir or cfg.state.directory)
    known = profiles.load_all(Path(cfg.profiles) if cfg.profiles else profiles.PROFILE_DIR,
                              profiles.installed_dir(state_dir))
    if args.type not in known:
        raise KalkiError(f"profile {args.type!r}: no such device type (known: {', '.join(sorted(known))})")
    packets = capture.read_packets(args.capture)
    mac = (check_mac(args.mac, f"{args.capture}: --mac", unicast=True) if args.mac
           else capture.device_mac(packets, args.capture))
    controllers = check_controllers(cfg.controllers, f"{cfg.path or 'config'}: controllers")
    my_controllers = check_my_controllers(cfg.my_controllers, f"{cfg.path or 'config'}: my_controllers")
    settings = GatewaySettings(mqtt_port=cfg.mqtt.port, name_grace_s=cfg.names.grace_seconds,
                               name_keep_s=cfg.names.keep_seconds, controllers=controllers,
                               my_controllers=my_controllers)
    stack = known[args.type].stack("normal")
    device, gateway, lan = trial.addresses(packets, mac, source=args.capture)
    if os.geteuid() != 0:
        raise KalkiError("kalki profile test needs root: it loads the XDP dispatcher in a "
                         "throwaway network namespace")
    mud_url = known[args.type].mud_url
    compiled = compile_stack(stack, "", controllers, my_controllers, mud_url)
    for name in compiled.missing_controllers:
        print(f"note: the profile names controller {name!r}, which the site does not define "
              "(config `controllers`): it opens nothing here", file=sys.stderr)
    for name in compiled.missing_mud:
        print(f"note: the profile names {name}, which stands for no host in this test (other "
              "devices are not in it; my-controller is config `my_controllers` for the profile's "
              "mud_url): it opens nothing here", file=sys.stderr)
    rows = trial.try_profile(stack, packets, mac, device, settings=settings, source=args.capture,
                             mud_url=mud_url)
    failed = [r for r in rows if r["direction"] == "from-device"
              and (r["dropped"] or (r["opening"] or {}).get("verdict", "passed") != "passed")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 1 if failed else 0
    print(f"{args.type} (normal) on {args.capture}: device {mac} at {device}, gateway {gateway}, "
          f"lan {lan}; {len(packets)} packets, nothing sent")
    width = max(len(_peer(r)) for r in rows)
    for r in rows:
        print(f"{r['direction']:11} {r['proto']:5} {_peer(r):{width}}  {r['packets']:5} packets  "
              f"{_outcome(r)}")
    print(f"{len(failed)} flow(s) from the device dropped" if failed
          else "every flow from the device passed")
    return 1 if failed else 0


def _peer(row: dict) -> str:
    return row["peer"] if row["port"] is None else f"{row['peer']}:{row['port']}"


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def _outcome(row: dict) -> str:
    """passed / DROPPED (reason n, ...), what was reported, the verdict on a SYN the capture
    did not hold, and the names the device resolved for the peer."""
    drops = {k: v for k, v in row["reasons"].items() if k != "pass"}
    text = f"DROPPED ({_counts(drops)})" if row["dropped"] else "passed"
    reported = {k: v for k, v in row["events"].items() if k not in drops}     # not said twice
    if reported:
        text += f", reported: {_counts(reported)}"
    opening = row["opening"]
    if opening:
        verdict = "passed" if opening["verdict"] == "passed" else f"DROPPED ({opening['reason']})"
        text += f"; opened before the capture, its SYN: {verdict}"
        reported = {k: v for k, v in opening["events"].items() if k != opening["reason"]}
        if reported:
            text += f", reported: {_counts(reported)}"
    if row["names"]:
        text += f"  [{', '.join(row['names'])}]"
    return text


def _backup(args) -> int:
    """Writes the backup to -o FILE (made readable by its owner only) or to stdout."""
    from appliance.client import request
    result = request(_socket(args), "backup", with_secrets=args.with_secrets)
    if args.output in (None, "-"):
        sys.stdout.write(result["text"])
    else:
        try:
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(result["text"])
        except OSError as e:
            raise KalkiError(f"{args.output}: {e.strerror or e}") from None
    where = "stdout" if args.output in (None, "-") else args.output
    secrets = ("with the admin password hash and the API tokens: keep it safe" if result["secrets"]
               else "without the admin password or API tokens (--with-secrets to include them)")
    print(f"backup to {where}: {result['devices']} device(s), {result['profiles']} installed "
          f"profile(s), {result['rules']} site rule(s); {secrets}", file=sys.stderr)
    return 0


def _restore(args) -> int:
    """Sends the file's text; the supervisor checks all of it before it changes anything."""
    from appliance.client import request
    from appliance.supervisor.backup import MAX_BYTES
    text = _read_file(args.file, MAX_BYTES, "a backup")
    try:
        result = request(_socket(args), "restore", text=text, dry_run=args.dry_run)
    except KalkiError as e:
        raise KalkiError(f"{args.file}: {e}; nothing was changed") from None
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    verb = "would restore" if result["dry_run"] else "restored"
    p, r, d = result["profiles"], result["rules"], result["devices"]
    print(f"{args.file}: {verb} {len(result['settings'])} setting(s), "
          f"{len(p['installed']) + len(p['replaced'])} profile(s) ({len(p['unchanged'])} unchanged), "
          f"{len(r['added']) + len(r['replaced'])} rule(s), {len(d['added']) + len(d['updated'])} "
          f"device(s) ({len(d['added'])} new, {len(d['renamed'])} renamed)")
    if result["enforced"]:
        print(f"{'would enforce' if result['dry_run'] else 'enforced'}: {', '.join(result['enforced'])}")
    for note in result["notes"]:
        print(f"note: {note}")
    if result["dry_run"]:
        print("dry run: nothing was changed")
    return 0


def _socket(args) -> str:
    if args.lab:
        from lab import topology
        labs = topology.labs()
        if args.lab not in labs:
            raise KalkiError(f"--lab {args.lab}: no such lab; " + (
                f"the labs here: {', '.join(labs)}" if labs else "there is none (kalki lab up)"))
        return topology.control_socket(args.lab)
    return args.socket


# Where the supervisor is, for the help of the commands that list what it knows (main() sets it).
_WHERE = argparse.Namespace(lab=None, socket=DEFAULT_SOCKET)


def known_types() -> tuple[list[str], str]:
    """The device types, and where from: the running supervisor's (installed ones too), else
    the profiles shipped with this version."""
    from appliance.client import request
    try:
        return (sorted(r["type"] for r in request(_socket(_WHERE), "profile_list", timeout=2)),
                "from the running supervisor")
    except (KalkiError, OSError, ValueError):
        from appliance.policy import profiles
        return (sorted(profiles.load_all(profiles.PROFILE_DIR)),
                "shipped with this version (no supervisor answered)")


class _TypesHelp(argparse.Action):
    """-h/--help of the commands that take a device type: the help ends with the types."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default,
                         help=help or "show this help, with the device types there are, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        types, where = known_types()
        parser.epilog = f"device types, {where}: {', '.join(types)}"
        parser.print_help()
        parser.exit()


def _call(op, **fields):
    def run(args) -> int:
        from appliance.client import request
        values = {k: getattr(args, v) for k, v in fields.items() if getattr(args, v) is not None}
        _print(request(_socket(args), op, **values), getattr(args, "json", False))
        return 0
    return run


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kalki", description="Kalki on a Raspberry Pi")
    ap.add_argument("--lab", metavar="NAME", help="talk to the supervisor of this lab")
    ap.add_argument("--socket", default=DEFAULT_SOCKET, help="the supervisor's control socket")
    sub = ap.add_subparsers(dest="command", required=True)

    lab = sub.add_parser("lab", help="the lab of network namespaces").add_subparsers(
        dest="lab_command", required=True)
    p = lab.add_parser("up", help="build a lab and protect its devices")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--name")
    p.add_argument("--compromised", action="store_true",
                   help="the last device is compromised (for lateral-movement stories)")
    p.add_argument("--unapproved", type=int, default=0,
                   help="this many of the last devices are new: unknown until approved")
    p.add_argument("--fake-time", default="", help="ISO time the supervisor's policy clock starts at")
    p.add_argument("--no-services", action="store_true")
    p.add_argument("--no-supervisor", action="store_true",
                   help="apply the profiles directly; no supervisor, no broker")
    p.add_argument("--no-ui", action="store_true",
                   help="the supervisor runs without the web page and the LED panel")
    p.add_argument("--json", action="store_true")
    p.add_argument("--chatter", action="store_true",
                   help="the devices then behave like real ones, in real time, until the lab goes "
                        "down: cloud by name over TLS, NTP, mDNS, SSDP, vendor broadcasts")
    p.add_argument("--scenario", choices=("intrusion", "attack", "scan", "probe", "all"),
                   help="then play a demo scenario (lab/scenarios.py); the lab stays up")
    p.set_defaults(func=_lab_up)
    p = lab.add_parser("down", help="remove a lab and everything it created")
    p.add_argument("name")
    p.set_defaults(func=_lab_down)
    p = lab.add_parser("play", help="play a demo scenario on a running lab (the intrusion needs "
                                    "a lab built with an after-hours --fake-time)")
    p.add_argument("name", help="the lab (kalki lab status lists them)")
    p.add_argument("scenario", choices=("intrusion", "attack", "scan", "probe", "all"),
                   help="the story to play (lab/scenarios.py)")
    p.set_defaults(func=_lab_play)
    p = lab.add_parser("status", help="list the labs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_lab_status)
    p = lab.add_parser("block", help="put a source into a lab's kernel drop set directly")
    p.add_argument("name")
    p.add_argument("source")
    p.add_argument("seconds", type=int)
    p.set_defaults(func=_lab_block)
    p = lab.add_parser("dns", help="the lab internet's name server, which the gateway's resolver "
                       "forwards to: `kalki lab dns LAB set HOSTNAME ADDRESS... [--ttl S]`")
    p.add_argument("name", help="the lab")
    p.add_argument("action", choices=("set",), help="give a host name addresses (or a CNAME)")
    p.add_argument("hostname")
    p.add_argument("addresses", nargs="*", help="lab addresses (198.18.0.0/15)")
    p.add_argument("--ttl", type=int, default=300)
    p.add_argument("--cname", help="an alias for this name instead of addresses")
    p.set_defaults(func=_lab_dns)

    p = sub.add_parser("run", help="run the supervisor")
    p.add_argument("--config", default="/etc/kalki/kalki.toml")
    p.set_defaults(func=_run)
    store = sub.add_parser("store", help="the state store").add_subparsers(dest="store_command",
                                                                            required=True)
    p = store.add_parser("restore-previous", help="put back the store's previous generation "
                         "(kalki.json.prev) after an empty or corrupt kalki.json; supervisor stopped")
    p.add_argument("--config", default="/etc/kalki/kalki.toml")
    p.add_argument("--state-dir", help="the state directory (default: the config's state.directory)")
    p.set_defaults(func=_store_restore_previous)
    cfg = sub.add_parser("config", help="the configuration file").add_subparsers(
        dest="config_command", required=True)
    cfg.add_parser("defaults", help="every key with its default and meaning").set_defaults(
        func=_config_defaults)
    rules = sub.add_parser("rules", help="the rules: list them, switch one off or on, check a "
                           "file of site rules").add_subparsers(dest="rules_command", required=True)
    p = rules.add_parser("validate", help="check a TOML file of [[rules]]")
    p.add_argument("file")
    p.set_defaults(func=_rules_validate)
    p = rules.add_parser("list", help="every rule (built-in, profile, site), on or off, in words",
                         description=f"Every rule with what it does. {LISTING}")
    _listing_flags(p)
    p.set_defaults(func=_listing("rules_view", _rule_rows))
    for verb, enabled, says in (("disable", False, "switch a rule off (a built-in one too: audited, "
                                 "and the web page says so until it is on again)"),
                                ("enable", True, "switch a rule on again")):
        p = rules.add_parser(verb, help=says)
        p.add_argument("name", help="the rule's name (kalki rules list)")
        p.set_defaults(func=_rules_switch, enabled=enabled)

    prof = sub.add_parser("profile", help="device-type profiles: import (TOML or RFC 8520 MUD), list, "
                          "show, export, remove, test").add_subparsers(dest="profile_command",
                                                                       required=True)
    p = prof.add_parser("import", help="install a profile from a TOML profile or a MUD file; "
                        "prints its type")
    p.add_argument("file")
    p.add_argument("--type", help="the device type's name (default: the file's)")
    p.add_argument("--device-ip", help="MUD files: the device's address in the capture the file was "
                   "made from; entries to it are artefacts and are dropped")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_profile_import)
    p = prof.add_parser("list", help="every device type, shipped and installed",
                        description="every device type, shipped and installed: an aligned table "
                        "(--json: one JSON array)")
    p.add_argument("--json", action="store_true", help="JSON: one array of objects")
    p.set_defaults(func=_profile_list)
    p = prof.add_parser("show", help="one device type's profile")
    p.add_argument("type")
    p.set_defaults(func=_call("profile_show", type="type"))
    p = prof.add_parser("export", help="a profile as TOML, or its normal destinations as a MUD file")
    p.add_argument("type")
    p.add_argument("--format", choices=("toml", "mud"), default="toml")
    p.add_argument("--mud-url", help="the MUD URL to export under (default: the profile's mud_url)")
    p.set_defaults(func=_profile_export)
    p = prof.add_parser("from-device", help="what a device did while learning, as a profile to read, "
                        "edit and import")
    p.add_argument("device")
    p.add_argument("--type", help="the new type's name (default <type>-<device>)")
    p.add_argument("--format", choices=("toml", "mud"), default="toml")
    p.add_argument("--mud-url", help="with --format mud: the URL to publish it under")
    p.set_defaults(func=_profile_from_device)
    p = prof.add_parser("remove", help="remove an installed profile no device uses")
    p.add_argument("type")
    p.set_defaults(func=_profile_remove)
    p = prof.add_parser("test", help="what a type's normal posture does with a capture (pcap or "
                        "pcapng) of a device, flow by flow, by the real XDP dispatcher in a "
                        "throwaway namespace; nothing is sent (root; no supervisor needed)")
    p.add_argument("type")
    p.add_argument("capture")
    p.add_argument("--mac", help="the device's MAC (default: the host in the capture that sends "
                   "most unicast IPv4 from a private address)")
    p.add_argument("--config", help="the configuration file, for the state directory (installed "
                   "profiles), controllers and names (default: /etc/kalki/kalki.toml if it exists)")
    p.add_argument("--state-dir", help="the state directory (default: the config's state.directory)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_profile_test)

    p = sub.add_parser("backup", help="settings, installed profiles, site rules and the device list "
                       "as one JSON file (no password hash or API tokens unless --with-secrets)")
    p.add_argument("-o", "--output", metavar="FILE", help="write it here (default: stdout)")
    p.add_argument("--with-secrets", action="store_true",
                   help="include the admin password's hash and the API tokens")
    p.set_defaults(func=_backup)
    p = sub.add_parser("restore", help="put a backup in force: all of it is checked first, and an "
                       "error changes nothing; a stricter posture held here is kept")
    p.add_argument("file", help="a file made by `kalki backup` or the settings page")
    p.add_argument("--dry-run", action="store_true", help="only check it, and say what would change")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_restore)
    p = sub.add_parser("status", help="the supervisor's state")
    p.set_defaults(func=_call("status"))
    p = sub.add_parser("devices", help="every device with its posture",
                       description=f"Every device with its posture. {LISTING}")
    _listing_flags(p)
    p.set_defaults(func=_listing("devices", _device_rows, cut=False))
    dev = sub.add_parser("device", help="one device").add_subparsers(dest="device_command",
                                                                     required=True)
    p = dev.add_parser("show", help="a device: identity, posture, history, alerts, names, flows (JSON)")
    p.add_argument("name", help="the device's name")
    p.set_defaults(func=_call("device_show", name="name"))
    p = dev.add_parser("approve", add_help=False, help="let a new device out, as a type: its "
                       "profile's umboxes protect it (-h lists the types)")
    p.add_argument("-h", "--help", action=_TypesHelp)
    p.add_argument("name", help="the device's name (kalki devices)")
    p.add_argument("--type", help="its device type (default: the type it has); -h lists them")
    p.set_defaults(func=_call("device_approve", name="name", type="type"))
    p = dev.add_parser("remove", help="forget a device: the data path closes it again; its "
                       "history stays")
    p.add_argument("name", help="the device's name")
    p.set_defaults(func=_call("device_remove", name="name"))
    p = dev.add_parser("rename", help="give a device another name; its identity, posture, history "
                       "and MQTT topics stay (its firmware's broker user and topic do not change)")
    p.add_argument("name", help="the device's name now")
    p.add_argument("new", help="its new name: 1 to 40 letters, digits, '_' or '-', not taken")
    p.add_argument("--json", action="store_true", help="the answer as JSON")
    p.set_defaults(func=_device_rename)
    p = dev.add_parser("group", help="put a device in a group (rules select {group = \"...\"}), "
                       "or in none")
    p.add_argument("name", help="the device's name")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("group", nargs="?", help="the group: 1 to 40 letters, digits, '_' or '-'")
    which.add_argument("--none", action="store_true", help="take it out of its group")
    p.set_defaults(func=_device_group)
    p = dev.add_parser("add", help="pre-provision a device by MAC and address")
    p.add_argument("name")
    p.add_argument("mac")
    p.add_argument("ip")
    p.add_argument("--type")
    p.add_argument("--approve", action="store_true")
    p.set_defaults(func=_call("device_add", name="name", mac="mac", ip="ip", type="type",
                              approve="approve"))
    p = dev.add_parser("learn", help="posture learning: the device reaches what it asks for and "
                       "every flow outside its profile is recorded (24 h unless --for)")
    p.add_argument("name")
    p.add_argument("--for", dest="duration", help="how long (90s, 15m, 2h, 1d)")
    p.add_argument("--type", help="for a device not approved yet: its type (default generic)")
    p.set_defaults(func=_call("device_learn", name="name", type="type", **{"for": "duration"}))
    p = dev.add_parser("check-logins", help="try the device type's well-known default logins "
                       "(its profile's [[default_logins]]) on an approved device, from the gateway; "
                       "exits 1 if one works")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_device_check_logins)
    for verb, what in (("allow", "a destination the device may open on top of its profile"),
                       ("disallow", "take back a destination given with allow")):
        p = dev.add_parser(verb, help=what)
        p.add_argument("name")
        p.add_argument("destination",
                       help="name:port/proto, address[/prefix][:port][/proto] or lan:port/proto")
        p.set_defaults(func=_call(f"device_{verb}", name="name", destination="destination"))
    posture = sub.add_parser("posture", help="set or reset a posture").add_subparsers(
        dest="posture_command", required=True)
    p = posture.add_parser("set", help="put a device in a posture, for a while or until changed")
    p.add_argument("name", help="the device's name")
    p.add_argument("posture", choices=SETTABLE_POSTURES, metavar="posture",
                   help=f"one of: {', '.join(SETTABLE_POSTURES)}")
    p.add_argument("--for", dest="duration", help="revert after this long (90s, 15m, 2h)")
    p.set_defaults(func=_call("posture_set", name="name", posture="posture", **{"for": "duration"}))
    p = posture.add_parser("reset", help="back to normal (rules judge it from now on)")
    p.add_argument("name", help="the device's name")
    p.set_defaults(func=_call("posture_reset", name="name"))
    for op, render, what in (("alerts", _alert_rows, "the alerts, newest first, each in words"),
                             ("decisions", _decision_rows, "the rules' decisions (with their timings) "
                                                           "and the audit trail, newest first")):
        p = sub.add_parser(op, help=what, description=f"{what[0].upper()}{what[1:]}. {LISTING}")
        p.add_argument("--device", help="only this device's")
        p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
        _listing_flags(p)
        p.set_defaults(func=_listing(op, render, device="device", limit="limit"))
    p = sub.add_parser("maintenance", help="pause automation for N minutes (0 ends it)")
    p.add_argument("minutes", type=int)
    p.set_defaults(func=_call("maintenance", minutes="minutes"))
    p = sub.add_parser("block", help="put a source into the kernel drop set")
    p.add_argument("source")
    p.add_argument("seconds", type=int)
    p.add_argument("--reason", default="blocked")
    p.add_argument("--by", default="operator")
    p.add_argument("--target", help="the device address the source went for")
    p.set_defaults(func=_call("block_source", ip="source", seconds="seconds", reason="reason",
                              by="by", target="target"))
    p = sub.add_parser("unblock", help="take a source out of the kernel drop set")
    p.add_argument("source")
    p.set_defaults(func=_call("unblock_source", ip="source"))
    p = sub.add_parser("blocked", help="the sources in the kernel drop set, why and until when")
    p.set_defaults(func=_call("blocked_sources"))
    notify = sub.add_parser("notify", help="notifications of alerts ([notify] in the config "
                            "file)").add_subparsers(dest="notify_command", required=True)
    p = notify.add_parser("test", help="send a test message on each configured channel (one try "
                          "each); exits 1 if one fails")
    p.add_argument("--channel", choices=("ntfy", "webhook", "email"), help="only this channel")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_notify_test)
    mqtt = sub.add_parser("mqtt", help="the appliance's MQTT broker").add_subparsers(
        dest="mqtt_command", required=True)
    p = mqtt.add_parser("home-assistant", help="what to enter in Home Assistant's MQTT integration "
                        "(but the password)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_home_assistant)
    p = mqtt.add_parser("home-assistant-password", help="give Home Assistant's broker user a new "
                        "random password, in force at once (the old one stops working), and print "
                        "it, once: only its hash is kept")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_home_assistant_password)
    p = sub.add_parser("raise-alert", help="record an alert (the gate's api-denied, ...); rules "
                       "see it like any other")
    p.add_argument("kind")
    p.add_argument("--source", help="the address the alert is about")
    p.add_argument("--target", help="the device's address")
    p.add_argument("--by", default="operator")
    p.add_argument("--details", help="a JSON object")
    p.set_defaults(func=_call("raise_alert", kind="kind", source="source", target="target", by="by",
                              details="details"))
    # the panel (appliance/faces/panel.py): the button (mock pins in the lab) and the LEDs
    button = sub.add_parser("button", help="press the appliance's button (the lab's mock "
                            "pins)").add_subparsers(dest="button_command", required=True)
    p = button.add_parser("press", help="a short press: opens the claim window")
    p.set_defaults(func=_call("button", action="action"), action="press")
    p = button.add_parser("hold", help="hold: 5 s resets the admin password, 15 s the appliance")
    p.add_argument("seconds", type=float)
    p.set_defaults(func=_call("button", action="action", seconds="seconds"), action="hold")
    p = sub.add_parser("memory", help="the supervisor's resident memory (and its biggest "
                       "allocations when started with PYTHONTRACEMALLOC=N)")
    p.add_argument("--top", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_call("memory", top="top"))
    p = sub.add_parser("panel", help="what the LEDs show now")
    p.set_defaults(func=_call("panel"))
    clock = sub.add_parser("clock", help="the lab's policy clock").add_subparsers(
        dest="clock_command", required=True)
    p = clock.add_parser("set", help="set the lab's policy clock (with policy.fake_time only)")
    p.add_argument("time")
    p.set_defaults(func=_call("clock_set", time="time"))
    _fill_help(ap, [])
    return ap


# The help of the arguments (and commands) build_parser() gives none: by command and argument,
# else by argument. tests/test_cli.py checks that every argument has some.
HELP = {
    "json": "JSON output", "config": "the configuration file (default /etc/kalki/kalki.toml)",
    "type": "the device type's name", "name": "the device's name", "format": "toml or mud",
    "source": "an IPv4 address", "seconds": "how long, in seconds (0: until unblocked)",
    "lab up devices": "how many emulated devices (default 4)",
    "lab up name": "the lab's name (default: one made up)",
    "lab up no_services": "the devices run no services (web, telnet, MQTT telemetry)",
    "lab up json": "the lab's state as JSON", "lab status json": "the labs' state as JSON",
    "lab down name": "the lab's name (kalki lab status)", "lab block name": "the lab's name",
    "lab dns hostname": "the host name to answer for", "lab dns ttl": "the answers' TTL in seconds",
    "rules validate file": "a TOML file of [[rules]] tables",
    "profile import file": "a TOML profile, or a vendor's MUD file (JSON)",
    "profile import json": "the type, the format and the importer's notes as JSON",
    "profile from-device device": "the device that was learning",
    "profile test capture": "a pcap or pcapng capture of the device",
    "profile test json": "each flow's outcome as JSON", "restore json": "what was done, as JSON",
    "device add mac": "its MAC address", "device add ip": "its IPv4 address",
    "device add approve": "approve it at once (needs --type)",
    "device check-logins json": "the outcomes as JSON",
    "maintenance minutes": "0 to 1440; 0 ends maintenance",
    "block reason": "why, for the alert (default: blocked)",
    "block by": "who blocks it, for the alert (default: operator)",
    "notify test json": "the outcomes as JSON",
    "mqtt home-assistant json": "the settings as JSON",
    "mqtt home-assistant-password json": "the settings and the password as JSON",
    "raise-alert kind": "the alert's kind: lower-case words joined by - (api-denied)",
    "raise-alert by": "who raises it (gate, operator, ...)",
    "button hold seconds": "how long the button is held",
    "memory top": "how many of the biggest allocations (with PYTHONTRACEMALLOC)",
    "memory json": "JSON output (it is JSON anyway)",
    "clock set time": "an ISO 8601 time with its zone",
}


def _fill_help(parser: argparse.ArgumentParser, path: list[str]) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                choice.help = choice.help or HELP.get(" ".join([*path, choice.dest]))
            for name, sub in action.choices.items():
                _fill_help(sub, [*path, name])
        elif not action.help:
            action.help = HELP.get(" ".join([*path, action.dest])) or HELP.get(action.dest)


def main(argv=None) -> int:
    global _WHERE
    where = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    where.add_argument("--lab")
    where.add_argument("--socket", default=DEFAULT_SOCKET)
    try:
        _WHERE = where.parse_known_args(argv)[0]
    except argparse.ArgumentError:
        pass      # the real parser says what is wrong
    try:
        args = build_parser().parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()      # a closed pipe shows here, not at exit
        return code
    except KalkiError as e:
        print(f"kalki: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went (`kalki devices | head`): it has what it wanted. Quietly, and with
        # nothing left for Python to flush into the closed pipe at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


if __name__ == "__main__":
    sys.exit(main())
