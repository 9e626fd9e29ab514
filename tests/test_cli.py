"""The `kalki` command for people (issue 14, "The CLI"): aligned tables on a terminal and JSON for
scripts, a closed pipe that ends quietly, help on every argument, and errors that say what is
wrong and what there is. Over a real control socket, to a supervisor with the fake data path
(tests/test_profiles_cli.py's `served`)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import supervisor
from test_profiles_cli import kalki, served  # noqa: F401  (the socket's fixture)

from appliance import cli
from appliance.supervisor.ops import Ops
from lab import topology

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("camera", "door_sensor", "generic", "light", "motion_sensor", "plug", "thermostat")


@pytest.fixture
def ops(tmp_path):
    """`served` serves these ops: two approved devices with a little history, one waiting."""
    sup = supervisor(tmp_path, camera1=("02:4b:00:00:00:01", "198.18.0.10", "camera"),
                     **{"hall-plug-with-a-long-name": ("02:4b:00:00:00:02", "198.18.0.11", "plug")})
    sup.discovered("02:4b:00:00:00:03", "198.18.0.12")
    sup.raise_alert("camera1", "api-denied", "gate", {"source": "198.18.0.66", "method": "PUT"}, 0)
    ops = Ops(sup)
    ops.posture_set("camera1", "suspicious", "15m")
    yield ops
    sup.store.close()


def columns(line: str, headers: list[str]) -> list[int]:
    return [line.index(h) for h in headers]


def test_tables_on_a_terminal_are_aligned(served, capsys, monkeypatch):  # noqa: F811
    sock, _ = served
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = kalki(capsys, sock, "devices")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["DEVICE", "POSTURE", "TYPE", "GROUP", "ADDRESS", "MAC",
                                              "ENFORCED", "UNTIL", "NOTE"]
    starts = columns(lines[0], ["POSTURE", "TYPE", "ADDRESS", "MAC", "UNTIL"])
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) >= {"camera1", "hall-plug-with-a-long-name"} and len(rows) == 3
    for line in lines[1:]:          # every value starts under its header
        assert [line[s - 1] for s in starts] == [" "] * 5, line
    assert rows["camera1"][starts[0]:].startswith("suspicious ")
    assert rows["camera1"][starts[1]:].startswith("camera ")
    assert rows["camera1"][starts[3]:].startswith("02:4b:00:00:00:01")
    assert rows["camera1"][starts[4]:].startswith("20") and "Z, then normal  " in rows["camera1"]
    waiting = next(v for k, v in rows.items() if k.startswith("device-"))
    assert waiting[starts[0]:].startswith("waiting for approval ")

    code, out, _ = kalki(capsys, sock, "alerts")
    head, *rows_ = out.splitlines()
    assert code == 0 and head.split()[:6] == ["ID", "AT", "(UTC)", "DEVICE", "KIND", "SEVERITY"]
    api = next(r for r in rows_ if " api-denied " in r)
    assert api[head.index("DEVICE"):].startswith("camera1 ") and "Z " in api
    assert len(max(out.splitlines(), key=len)) <= 80 + 1        # cut to the terminal's width

    code, out, _ = kalki(capsys, sock, "decisions", "--device", "camera1")
    head = out.splitlines()[0]
    assert code == 0 and head.split()[:5] == ["ID", "AT", "(UTC)", "KIND", "DEVICE"]
    assert any(" audit " in line and "posture by operator" in line for line in out.splitlines())

    code, out, _ = kalki(capsys, sock, "profile", "list")
    head, *rows_ = out.splitlines()
    assert code == 0 and head.split() == ["TYPE", "SOURCE", "USED", "BY", "DESCRIPTION"]
    camera = next(r for r in rows_ if r.startswith("camera "))
    assert camera[head.index("USED BY"):].startswith("camera1 ")
    assert camera[head.index("SOURCE"):].startswith("shipped ")


def test_json_for_scripts_unless_asked_for_a_table(served, capsys):  # noqa: F811
    sock, _ = served
    code, out, _ = kalki(capsys, sock, "devices")             # not a terminal: JSON lines, as ever
    assert code == 0 and [json.loads(line)["name"] for line in out.splitlines()][0] == "camera1"
    code, out, _ = kalki(capsys, sock, "alerts", "--json")
    assert code == 0 and json.loads(out)[0]["explanation"]
    code, out, _ = kalki(capsys, sock, "decisions", "--limit", "1")
    assert code == 0 and len(out.splitlines()) == 1 and json.loads(out)
    code, out, _ = kalki(capsys, sock, "devices", "--table")
    assert code == 0 and out.startswith("DEVICE ")
    code, out, _ = kalki(capsys, sock, "profile", "list", "--json")
    assert code == 0 and {r["type"] for r in json.loads(out)} >= set(SHIPPED)
    assert "--table gives the table anyway" in subprocess.run(
        [sys.executable, "-m", "appliance.cli", "devices", "--help"], cwd=REPO, capture_output=True,
        text=True).stdout.replace("\n", " ")


def test_a_closed_pipe_ends_quietly(served):  # noqa: F811
    sock, _ = served
    for args in (["devices"], ["devices", "--table"], ["alerts", "--json"], ["--help"]):
        read, write = os.pipe()
        os.close(read)                  # `| head` that has gone
        try:
            p = subprocess.run([sys.executable, "-m", "appliance.cli", "--socket", sock, *args],
                               cwd=REPO, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write)
        assert p.returncode == 0 and p.stderr == "", (args, p.stderr)


def test_the_errors_say_what_is_wrong_and_what_there_is(served, capsys, tmp_path, monkeypatch):  # noqa: F811
    sock, ops = served
    waiting = next(n for n, d in ops._sup.known.items() if not d["approved"])
    code, _, err = kalki(capsys, sock, "device", "approve", waiting, "--type", "toaster")
    assert code == 2 and f"device {waiting}: 'toaster' is not a known device type: expected one of " \
                         f"{', '.join(SHIPPED)}" in err
    code, _, err = kalki(capsys, sock, "device", "approve", waiting)
    assert code == 2 and f"device {waiting}: give it a type (--type): one of camera," in err
    code, _, err = kalki(capsys, sock, "device", "learn", waiting, "--type", "toaster")
    assert code == 2 and "'toaster' is not a known device type" in err
    code, _, err = kalki(capsys, sock, "device", "add", "x1", "02:4b:00:00:00:09", "198.18.0.19",
                         "--type", "toaster")
    assert code == 2 and "unknown type 'toaster' (known: " in err and "camera" in err
    for op in ("alerts", "decisions"):
        code, out, err = kalki(capsys, sock, op, "--device", "nope")
        assert code == 2 and out == "" and "device 'nope': no such device" in err
    code, _, err = kalki(capsys, sock, "device", "show", "nope")
    assert code == 2 and "device 'nope' does not exist" in err
    with pytest.raises(SystemExit):
        kalki(capsys, sock, "posture", "set", "camera1", "bogus")
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and "'quarantine'" in err and "'normal'" in err

    monkeypatch.setattr(topology, "STATE_DIR", tmp_path / "labs")
    code, _, err = cli.main(["--lab", "zz", "devices"]), *capsys.readouterr()
    assert code == 2 and "--lab zz: no such lab; there is none (kalki lab up)" in err
    for name in ("demo", "t1"):
        (tmp_path / "labs" / name).mkdir(parents=True)
        (tmp_path / "labs" / name / "lab.json").write_text("{}")
    code, _, err = cli.main(["--lab", "zz", "devices"]), *capsys.readouterr()
    assert code == 2 and "--lab zz: no such lab; the labs here: demo, t1" in err


def test_every_argument_has_help_and_the_lists_are_there(served, capsys):  # noqa: F811
    sock, ops = served

    def undocumented(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {c.dest: c.help for c in action._choices_actions}
                for name, sub in action.choices.items():
                    if not helps.get(name):
                        yield " ".join([*path, name])
                    yield from undocumented(sub, [*path, name])
            elif not action.help:
                yield f"{' '.join(path)} {action.dest}"
    assert list(undocumented(cli.build_parser(), ["kalki"])) == []

    code = None
    with pytest.raises(SystemExit) as done:
        cli.main(["--socket", sock, "device", "approve", "-h"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "device types, from the running supervisor: camera, door_sensor" in out
    with pytest.raises(SystemExit):
        cli.main(["--socket", sock + ".gone", "device", "approve", "--help"])
    out = capsys.readouterr().out
    assert f"device types, shipped with this version (no supervisor answered): {', '.join(SHIPPED)}" \
        in " ".join(out.split())
    with pytest.raises(SystemExit):
        cli.main(["posture", "set", "-h"])
    assert "one of: normal, suspicious, attack, quarantine, learning" in capsys.readouterr().out
    assert code is None


def test_rename_and_group_from_the_command(served, capsys):  # noqa: F811
    sock, ops = served
    code, out, err = kalki(capsys, sock, "device", "rename", "camera1", "frontdoor")
    assert code == 0 and out == "camera1 is now frontdoor\n" and "MQTT user and topic stay camera1" in err
    code, _, err = kalki(capsys, sock, "device", "rename", "frontdoor", "hall-plug-with-a-long-name")
    assert code == 2 and "device frontdoor: cannot rename it hall-plug-with-a-long-name: device " \
                         "hall-plug-with-a-long-name has that name" in err
    code, out, _ = kalki(capsys, sock, "device", "group", "frontdoor", "hall")
    assert code == 0 and out == "frontdoor: group hall\n" and ops._sup.group_of("frontdoor") == "hall"
    code, out, _ = kalki(capsys, sock, "device", "group", "frontdoor", "--none")
    assert code == 0 and out == "frontdoor: in no group\n" and ops._sup.group_of("frontdoor") is None
    code, _, err = kalki(capsys, sock, "device", "group", "frontdoor", "a.b")
    assert code == 2 and "device frontdoor: group 'a.b'" in err
    code, out, _ = kalki(capsys, sock, "alerts", "--device", "frontdoor", "--table")
    assert code == 0 and " frontdoor " in out.splitlines()[1]
    code, _, err = kalki(capsys, sock, "alerts", "--device", "camera1")
    assert code == 2 and "no such device: it was renamed frontdoor" in err
