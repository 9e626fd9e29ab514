"""The deception umbox's decoy (issue 15, item 1), user-space half, all on loopback: the telnet
decoy that never lets a login succeed, the HTTP decoy per device type, the evidence reports,
their caps, the session limits, and the gate's CLI and run() that start it."""

import asyncio
import base64
import json
import shlex
import socket
import sys
import time
from collections import Counter

import pytest

from appliance.dataplane import decoy as decoy_mod
from appliance.dataplane import gate as gate_mod
from appliance.dataplane import gatepolicy
from appliance.dataplane.decoy import (
    DETAILS_LIMIT,
    DO,
    DONT,
    ECHO,
    IAC,
    NAWS,
    SB,
    SE,
    WILL,
    WONT,
    Decoy,
    Evidence,
    TelnetInput,
)
from appliance.dataplane.gate import FailureTracker, Gate
from lab.device_services import Device
from lab.device_services import serve as serve_device

DEVICE = ("127.0.0.1", 23)       # the original destination the tests pretend nftables saw
TTYPE = 24


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def run_decoy(tmp_path, scenario, policy: dict | None = None, target=DEVICE, **decoy_args):
    """Both decoy servers on ephemeral loopback ports, `policy` (None: no file) as the policy
    file of the device at `target`; scenario(ports, decoy, reports, files)."""
    async def main():
        files = gatepolicy.PolicyFiles(tmp_path / "policy")
        if policy is not None:
            files.write(target[0], policy)
        reports: list[tuple] = []
        args = {"fail_delay": (0.05, 0.1), "report_interval": 0.0, **decoy_args}
        decoy = Decoy(files, lambda *a: reports.append(a), Counter(), target_override=target, **args)
        servers = await decoy_mod.serve(decoy, "127.0.0.1", 0, 0)
        ports = {name: s.sockets[0].getsockname()[1] for name, s in servers.items()}
        try:
            return await scenario(ports, decoy, reports, files)
        finally:
            for s in servers.values():
                s.close()
            await decoy.aclose()
    return asyncio.run(main())


def strip_iac(data: bytes) -> bytes:
    """Telnet text without the option negotiation (IAC DO/DONT/WILL/WONT x)."""
    out, i = bytearray(), 0
    while i < len(data):
        if data[i] == IAC and i + 1 < len(data) and data[i + 1] in (DO, DONT, WILL, WONT):
            i += 3
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


class Telnet:
    """A telnet client's side: the text (negotiation taken out) read up to a marker, the rest
    kept for the next; `raw` is every byte received."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.buf, self.raw = b"", bytearray()

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> "Telnet":
        return cls(*await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)))

    async def until(self, marker: bytes) -> bytes:
        async with asyncio.timeout(5):
            while marker not in self.buf:
                data = await self.reader.read(1024)
                if not data:
                    raise ConnectionError(f"closed before {marker!r}; got {self.buf!r}")
                self.raw += data
                self.buf += strip_iac(data)
        end = self.buf.index(marker) + len(marker)
        text, self.buf = self.buf[:end], self.buf[end:]
        return text

    async def rest(self) -> bytes:
        data = await asyncio.wait_for(self.reader.read(), 5)
        self.raw += data
        text, self.buf = self.buf + strip_iac(data), b""
        return text


async def wait_for(predicate, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- telnet

async def telnet_session(port: int, pairs, extra: bytes = b""):
    """Tries each (user, password) on one connection: (the text before the first prompt,
    [(what the decoy said after each password, how long it took)], every byte received)."""
    t = await Telnet.open(port)
    first = await t.until(b"login: ")
    # busybox telnetd's options first; a client refuses its DO ECHO, offers NAWS and a TTYPE
    assert bytes(t.raw).startswith(bytes([IAC, DO, ECHO, IAC, DO, NAWS, IAC, WILL, ECHO, IAC, WILL, 3]))
    t.writer.write(bytes([IAC, WONT, ECHO, IAC, WILL, NAWS, IAC, SB, NAWS, 0, 80, 0, 24, IAC, SE,
                          IAC, WILL, TTYPE, IAC, DO, 3]))
    answers = []
    for i, (user, password) in enumerate(pairs):
        t.writer.write(user.encode() + b"\r\n")
        echo = await t.until(b"Password: ")
        assert user.encode() in echo                        # the user name is echoed
        started = time.monotonic()
        t.writer.write(password.encode() + b"\r\n" + (extra if i == 0 else b""))
        said = await t.until(b"Login incorrect\r\n")
        answers.append((said, time.monotonic() - started))
        assert password.encode() not in said                # the password is not
        if i < len(pairs) - 1:
            assert (await t.until(b"login: ")).endswith(b"IPCAM login: ")
    # after the third the decoy closes; before, the client leaves
    rest = await t.rest() if len(pairs) >= decoy_mod.LOGIN_ATTEMPTS else b""
    t.writer.close()
    return first, answers, rest, bytes(t.raw)


def test_a_telnet_brute_forcer_never_logs_in_and_every_pair_is_reported(tmp_path):
    attempts = [("root", "xc3511"), ("admin", "admin"), ("root", "vizxv"),
                ("admin", "12345"), ("admin", "dev-pass")]        # the last: the device's own

    async def scenario(ports, decoy, reports, files):
        first, answers, rest, raw = await telnet_session(ports["telnet"], attempts[:3], extra=b"sh\r\n")
        assert b"Linux 3.10.14 (IPCAM)" in first and first.endswith(b"IPCAM login: ")
        # like busybox's telnetd: no option answered, the TTYPE offer included
        assert bytes([IAC, DONT, TTYPE]) not in raw and bytes([IAC, WONT, 3]) not in raw
        for said, seconds in answers:
            assert b"Login incorrect" in said and seconds >= 0.05
        assert rest == b""                                          # then closed, after three
        _, answers, rest, raw = await telnet_session(ports["telnet"], attempts[3:])
        assert all(b"Login incorrect" in said for said, _ in answers)
        assert b"$ " not in raw and b"#" not in raw                 # never a shell prompt
        await wait_for(lambda: len(reports) == 2)
        return reports

    reports = run_decoy(tmp_path, scenario, {"device": "cam1", "decoy": {"type": "camera"}})
    (kind, source, target, details), second = reports
    assert (kind, source, target) == ("deception", "127.0.0.1", "127.0.0.1:23")
    assert details["service"] == "telnet" and details["device"] == "cam1" and details["port"] == 23
    assert details["type"] == "camera"
    assert details["logins"] == [list(p) for p in attempts[:3]]
    assert details["lines"] == ["sh"]                 # typed while the first login was "checked"
    assert second[3]["logins"] == [list(p) for p in attempts[3:]] and second[3]["lines"] == []
    assert details["duration_s"] >= 0 and "truncated" not in details


def test_the_telnet_decoy_answers_no_option_skips_subnegotiation_and_edits_lines():
    typed = TelnetInput(None, None, 1.0)        # (feed only: no stream)
    linemode = 34
    # busybox's telnetd answers nothing; a refused LINEMODE sends hydra into a character mode
    # that loses bytes
    assert typed.feed(bytes([IAC, DO, TTYPE, IAC, WILL, linemode, IAC, DONT, 5])) == b""
    assert typed.feed(bytes([IAC, WILL, 5, IAC, DO, ECHO, IAC, DO, 3, IAC, WILL, NAWS])) == b""
    assert typed.feed(bytes([IAC, SB, NAWS, 0, IAC, IAC, 80, 0, 24, IAC, SE])) == b""
    typed.echo = True
    assert typed.feed(b"ab\x7fc\x03\r\x00") == b"ab\b \bc\r\n"        # echoed, DEL edits
    assert typed.feed(b"x" + bytes([IAC, IAC]) + b"y\r\nz\n") == b"xy\r\nz\r\n"
    assert typed.lines == [b"ac", b"x\xffy", b"z"]
    typed.feed(bytes([IAC, DONT, ECHO]) + b"secret\r\n")            # the client echoes itself
    assert typed.lines[-1] == b"secret"
    typed.feed(b"q" * 1000 + b"\n")
    assert typed.lines[-1] == b"q" * decoy_mod.LINE_BYTES


def test_an_idle_telnet_session_ends_and_still_reports(tmp_path):
    async def scenario(ports, decoy, reports, files):
        t = await Telnet.open(ports["telnet"])
        await t.until(b"login: ")
        t.writer.write(b"root\r\n")
        await t.until(b"Password: ")
        assert await t.rest() == b"\r\n"                     # idle: closed
        t.writer.close()
        await wait_for(lambda: reports)
        return reports[0][3]

    details = run_decoy(tmp_path, scenario, None, idle_timeout=0.2)
    assert details["logins"] == [["root", None]] and details["device"] == "" \
        and details["type"] == "generic"


# ---------------------------------------------------------------- HTTP

async def http(port: int, *requests: bytes) -> list[tuple[int, dict, bytes]]:
    """Requests on one kept-open connection; their answers."""
    from test_gate import read_response
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    for request in requests:
        writer.write(request)
        out.append(await read_response(reader, to_head=request.startswith(b"HEAD ")))
    writer.close()
    return out


def req(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    from test_gate import http_request
    return http_request(method, path, body, **headers)


def test_the_http_decoy_answers_as_the_device_type_and_records_the_requests(tmp_path):
    async def scenario(ports, decoy, reports, files):
        port = ports["http"]

        def policy(kind):
            files.write("127.0.0.1", {"device": f"{kind}1", "decoy": {"type": kind}})

        policy("light")
        got = await http(port, req("GET", "/api/guessed-token/lights", User_Agent="hydra"),
                         req("POST", "/api", b'{"devicetype": "x#y"}'),
                         req("PUT", "/api/t0k/lights/1/state", b'{"on": true}'))
        assert [s for s, _, _ in got] == [200, 200, 200]
        assert json.loads(got[0][2]) == [{"error": {"type": 1, "address": "/lights",
                                                    "description": "unauthorized user"}}]
        assert json.loads(got[1][2])[0]["error"]["type"] == 101          # link button not pressed
        assert json.loads(got[2][2])[0]["error"]["description"] == "unauthorized user"

        policy("camera")
        got = await http(port, req("GET", "/"), req("GET", "/status"),
                         req("GET", "/snapshot.jpg", Authorization=basic("admin", "12345")),
                         req("POST", "/login", b'{"user": "admin", "password": "admin"}'),
                         req("HEAD", "/"))
        assert got[0][0] == 200 and b'<form method="post" action="/login">' in got[0][2]
        assert got[1][0] == 401 and got[1][1]["www-authenticate"] == 'Basic realm="IP Camera"'
        assert got[2][0] == 401 and got[3][0] == 401 and got[4][0] == 200

        policy("plug")
        soap = '"urn:Belkin:service:basicevent:1#{}"'
        got = await http(port, req("POST", "/upnp/control/basicevent1", b"<s:Envelope/>",
                                   SOAPACTION=soap.format("GetBinaryState")),
                         req("POST", "/upnp/control/basicevent1", b"<BinaryState>0</BinaryState>",
                             SOAPACTION=soap.format("SetBinaryState")),
                         req("GET", "/setup.xml"), req("GET", "/status"))
        assert got[0][0] == 200 and b"<BinaryState>1</BinaryState>" in got[0][2]
        assert got[1][0] == 500 and b"Invalid Action" in got[1][2]       # nothing is switched
        assert got[2][0] == 200 and b"urn:Belkin:device" in got[2][2] and got[3][0] == 401

        files.remove("127.0.0.1")                                       # no file: generic
        got = await http(port, req("GET", "/"), req("GET", "/api/x/lights"))
        assert [s for s, _, _ in got] == [401, 401]
        await wait_for(lambda: len(reports) == 4)
        return [r[3] for r in reports], decoy.stats

    (light, camera, plug, generic), stats = run_decoy(tmp_path, scenario)
    assert light["service"] == "http" and light["device"] == "light1" and light["type"] == "light"
    assert light["requests"][0] == {"method": "GET", "path": "/api/guessed-token/lights",
                                    "status": 200, "user_agent": "hydra"}
    assert light["requests"][1]["body"] == '{"devicetype": "x#y"}'
    assert camera["logins"] == [["admin", "12345"], ["admin", "admin"]]  # Basic, then the form
    assert camera["requests"][2]["user"] == "admin" and camera["requests"][2]["status"] == 401
    assert [r["method"] for r in camera["requests"]] == ["GET", "GET", "GET", "POST", "HEAD"]
    assert plug["requests"][0]["status"] == 200 and plug["requests"][1]["status"] == 500
    assert generic["type"] == "generic" and generic["device"] == ""
    assert stats["decoy-sessions"] == 4 and stats["decoy-requests"] == 14 and stats["decoy-reports"] == 4


def test_the_http_decoy_refuses_bad_framing_and_big_bodies(tmp_path):
    async def scenario(ports, decoy, reports, files):
        reader, writer = await asyncio.open_connection("127.0.0.1", ports["http"])
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400 ")
        writer.close()
        body = b"x" * (decoy_mod.BODY_LIMIT + 10)
        got = await http(ports["http"], req("POST", "/login", body))
        assert got[0][0] == 413 and got[0][1]["connection"] == "close"
        await wait_for(lambda: len(reports) == 2)
        return [r[3] for r in reports]

    bad, big = run_decoy(tmp_path, scenario)
    assert "error" in bad["requests"][0]
    assert big["requests"][0]["status"] == 413 and len(big["requests"][0]["body"]) == decoy_mod.BODY_RECORD


# ---------------------------------------------------------------- evidence and its caps

def test_evidence_is_capped_escaped_and_the_details_fit():
    ev = Evidence("telnet", "10.0.0.9", "10.0.0.2:23")
    for i in range(30):
        ev.add_record(f"line {i}")
    assert len(ev.records) == decoy_mod.TELNET_RECORD_LINES and ev.left_out == 10
    ev = Evidence("telnet", "10.0.0.9", "10.0.0.2:23")
    ev.add_login("u" * 250, "p" * 250)
    for _ in range(20):
        ev.add_record("x" * 256)
    assert ev.chars <= decoy_mod.TELNET_RECORD_CHARS and ev.left_out > 0
    assert decoy_mod.printable(b"a\\b\x1b[31m\xff", 100) == "a\\\\b\\x1b[31m\\xff"
    assert decoy_mod.printable("é", 100) == "\\xc3\\xa9"
    ev = Evidence("http", "10.0.0.9", "10.0.0.2:80")
    for i in range(60):
        ev.add_record({"method": "POST", "path": f"/x{i}", "status": 401, "body": "b" * 1024})
    assert len(ev.records) <= decoy_mod.HTTP_RECORD_REQUESTS and ev.chars <= decoy_mod.HTTP_RECORD_CHARS
    details = ev.details()
    assert len(json.dumps(details, sort_keys=True)) <= DETAILS_LIMIT
    assert details["truncated"] is True and details["left_out"] == 60 - len(details["requests"])
    assert details["requests"][0]["path"] == "/x0"                  # the first ones are kept


def test_a_long_http_session_is_recorded_up_to_its_caps(tmp_path):
    async def scenario(ports, decoy, reports, files):
        n = decoy_mod.HTTP_REQUESTS
        got = await http(ports["http"], *[req("GET", f"/cgi-bin/{i}", User_Agent="x" * 500)
                                          for i in range(n)])
        assert all(s == 401 for s, _, _ in got) and got[-1][1]["connection"] == "close"
        await wait_for(lambda: reports)
        return reports[0][3]

    details = run_decoy(tmp_path, scenario, {"device": "cam1", "decoy": {"type": "camera"}})
    assert len(json.dumps(details, sort_keys=True)) <= DETAILS_LIMIT and details["truncated"] is True
    assert len(details["requests"]) + details["left_out"] == decoy_mod.HTTP_REQUESTS
    assert len(details["requests"][0]["user_agent"]) == decoy_mod.FIELD_CHARS


def test_sessions_ending_within_the_interval_are_merged_into_one_report():
    def session(source: str, user: str) -> Evidence:
        ev = Evidence("telnet", source, "10.0.0.2:23", device="cam1", type="camera")
        ev.add_login(user, f"{user}-pw")
        ev.add_record("x" * 200)
        return ev

    async def main():
        reports: list[tuple] = []
        decoy = Decoy(None, lambda *a: reports.append(a), report_interval=0.3)
        decoy._finish(session("10.0.0.9", "a"))                 # the first: at once
        decoy._finish(session("10.0.0.9", "b"))                 # held for the interval ...
        decoy._finish(session("10.0.0.9", "c"))                 # ... and merged
        decoy._finish(session("10.0.0.8", "d"))                 # another source: at once
        assert [r[3]["logins"] for r in reports] == [[["a", "a-pw"]], [["d", "d-pw"]]]
        await wait_for(lambda: len(reports) == 3)
        big = session("10.0.0.7", "e")
        for i in range(200):                                    # merging keeps MERGED_CHARS
            big.merge(session("10.0.0.7", f"u{i}"))
        assert big.chars <= decoy_mod.MERGED_CHARS and big.left_out > 0 and big.sessions == 201
        return reports[2][3], decoy.stats

    merged, stats = asyncio.run(main())
    assert merged["logins"] == [["b", "b-pw"], ["c", "c-pw"]] and merged["sessions"] == 2
    assert merged["lines"] == ["x" * 200] * 2
    assert stats["decoy-merged"] == 1 and stats["decoy-reports"] == 3


# ---------------------------------------------------------------- limits

def test_sessions_are_limited_per_source_and_in_all(tmp_path):
    async def scenario(ports, decoy, reports, files):
        async def open_from(source):
            t = await Telnet.open(ports["telnet"], source)
            try:
                await t.until(b"login: ")
            except (ConnectionError, TimeoutError):
                t.writer.close()
                return None
            return t.reader, t.writer

        a1, a2 = await open_from("127.0.0.1"), await open_from("127.0.0.1")
        assert a1 and a2
        assert await open_from("127.0.0.1") is None             # a third from the same source
        b1 = await open_from("127.0.0.2")
        assert b1 and decoy.active == 3
        assert await open_from("127.0.0.3") is None             # a fourth in all
        assert decoy.stats["decoy-refused"] == 2
        a1[1].close()
        await wait_for(lambda: decoy.active == 2)
        c1 = await open_from("127.0.0.3")                       # room again
        assert c1
        for _, writer in (a2, b1, c1):
            writer.close()
        await wait_for(lambda: decoy.active == 0)
        await wait_for(lambda: len(reports) == 4)
        return decoy.stats

    stats = run_decoy(tmp_path, scenario, per_source=2, total=3)
    assert stats["decoy-sessions"] == 4 and stats["decoy-refused"] == 2 and stats["decoy-reports"] == 4


# ---------------------------------------------------------------- the policy file and the gate

def test_the_policy_file_s_decoy_key():
    decoy_only = gatepolicy.Policy.from_json({"device": "cam1", "decoy": {"type": "camera"}})
    assert decoy_only.decoy == gatepolicy.DecoyPolicy("camera") and not decoy_only.gated
    assert decoy_only.port == 0 and decoy_only.device == "cam1"
    both = gatepolicy.Policy.from_json({"port": 80, "allow": ["GET *"], "decoy": {"type": "light"}})
    assert both.gated and both.decoy.type == "light"
    assert gatepolicy.Policy.from_json({"port": 80, "auth": True}).decoy is None
    for bad in ({"decoy": {"type": "camera", "imitate": "x"}}, {"decoy": {"type": "../x"}},
                {"decoy": {}}, {"decoy": "camera"}, {"decoy": {"type": "camera"}, "auth": True},
                {"decoy": {"type": "camera"}, "port": 0}, {"auth": False}):
        with pytest.raises(ValueError):
            gatepolicy.Policy.from_json(bad)


@pytest.mark.parametrize("policy", [
    {"device": "light1", "decoy": {"type": "light"}},
    {"device": "light1", "port": None, "decoy": {"type": "light"}},
    {"device": "light1", "port": "PORT", "decoy": {"type": "light"}},
    {"device": "light1", "port": "PORT", "auth": False, "allow": None, "token_guard": None,
     "decoy": {"type": "light"}},
    {"device": "light1", "port": "PORT"},
])
def test_a_decoy_only_policy_never_opens_the_gate_to_the_device(tmp_path, policy):
    """The gate proxies only for a file with a gate umbox: one for the decoy alone is no policy
    (502), whatever its port, and nothing reaches the device."""
    from test_gate import http_request, request

    async def main():
        device = Device("light1", "light")
        server = (await serve_device(device, "127.0.0.1", 0, services=["http"]))["http"]
        target = ("127.0.0.1", server.sockets[0].getsockname()[1])
        files = gatepolicy.PolicyFiles(tmp_path / "policy")
        files.write("127.0.0.1", {k: target[1] if v == "PORT" else v for k, v in policy.items()})
        gate = Gate(None, FailureTracker(), target_override=target, policies=files)
        gate_server = await gate_mod.serve(gate, "127.0.0.1", 0)
        port = gate_server.sockets[0].getsockname()[1]
        try:
            status = (await request(port, http_request("GET", "/", keep_alive=False)))[0]
            assert files.load(*target)[0] is None
            # the same device with a gate umbox and deception: the gate passes what it allows
            files.write("127.0.0.1", {"device": "light1", "port": target[1], "allow": ["GET *"],
                                      "decoy": {"type": "light"}})
            allowed = (await request(port, http_request("GET", "/", keep_alive=False)))[0]
            return status, allowed, device.stats["http_requests"], gate.stats
        finally:
            gate_server.close()
            server.close()

    status, allowed, reached, stats = asyncio.run(main())
    assert status == 502 and stats["no-policy"] == 1
    assert allowed == 200 and reached == 1          # only the gated request reached the device


# ---------------------------------------------------------------- the gate's command line

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_gate_s_decoy_options():
    args = gate_mod.parse_args(["--policy-dir", "/run/x"])
    assert args.decoy_telnet_port is None and args.decoy_http_port is None      # off by default
    args = gate_mod.parse_args(["--policy-dir", "/run/x", "--decoy-telnet-port", "2323",
                                "--decoy-http-port", "8082"])
    assert (args.decoy_telnet_port, args.decoy_http_port) == (2323, 8082)
    for bad in ("0", "65536", "x", "-1"):
        with pytest.raises(SystemExit):
            gate_mod.parse_args(["--policy-dir", "/run/x", "--decoy-http-port", bad])


def test_run_starts_the_decoy_only_when_asked_and_reports_through_the_alert_command(tmp_path):
    out = tmp_path / "alerts"
    script = "import sys; open(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + '\\n')"
    alert = shlex.join([sys.executable, "-c", f"import json; {script}", str(out)]) + \
        " {kind} --source {ip} --target {target} --details {details}"
    files = gatepolicy.PolicyFiles(tmp_path / "policy")
    files.write("127.0.0.1", {"device": "cam1", "decoy": {"type": "camera"}})

    async def refused(port: int) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return True
        writer.close()
        return False

    async def main(with_decoy: bool):
        gate_port, telnet_port, http_port = free_port(), free_port(), free_port()
        argv = ["--listen", f"127.0.0.1:{gate_port}", "--policy-dir", str(files.directory),
                "--alert-command", alert, "--target-override", "127.0.0.1:23"]
        if with_decoy:
            argv += ["--decoy-telnet-port", str(telnet_port), "--decoy-http-port", str(http_port)]
        stop = asyncio.Event()
        task = asyncio.create_task(gate_mod.run(gate_mod.parse_args(argv), stop))
        try:
            await wait_for(lambda: not task.done() and listening(gate_port))
            if not with_decoy:
                return await refused(telnet_port) and await refused(http_port)
            t = await Telnet.open(telnet_port)
            assert (await t.until(b"login: ")).endswith(b"IPCAM login: ")
            t.writer.write(b"root\r\nxc3511\r\n")
            await t.until(b"Login incorrect")
            t.writer.close()
            assert (await http(http_port, req("GET", "/status")))[0][0] == 401
            await wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 2, 10)
            return [json.loads(line) for line in out.read_text().splitlines()]
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    assert asyncio.run(main(with_decoy=False)) is True
    calls = sorted(asyncio.run(main(with_decoy=True)), key=lambda argv: json.loads(argv[6])["service"])
    assert [c[:6] for c in calls] == [["deception", "--source", "127.0.0.1", "--target", "127.0.0.1",
                                       "--details"]] * 2
    http_details, telnet_details = (json.loads(c[6]) for c in calls)
    assert telnet_details["logins"] == [["root", "xc3511"]] and telnet_details["device"] == "cam1"
    assert http_details["requests"][0]["path"] == "/status"


def test_the_supervisor_records_the_decoy_s_evidence(tmp_path):
    from fakes import supervisor

    from appliance.errors import ConfigError
    from appliance.supervisor.ops import Ops
    sup = supervisor(tmp_path, cam1=("02:00:00:00:00:21", "198.18.0.21", "camera"))
    ops = Ops(sup)
    ev = Evidence("http", "198.19.0.66", "198.18.0.21:80", device="cam1", type="camera")
    for i in range(60):
        ev.add_record({"method": "POST", "path": f"/x{i}", "status": 401, "body": "b" * 1024})
    details = ev.details()
    assert len(json.dumps(details)) > 2048                  # more than other alerts may carry
    ops.raise_alert("deception", source="198.19.0.66", target="198.18.0.21", by="gate",
                    details=json.dumps(details, sort_keys=True))
    alert, = [a for a in sup.store.alerts() if a["type"] == "deception"]
    assert alert["device"] == "cam1" and alert["severity"] == "warning" and alert["source"] == "gate"
    assert alert["details"]["requests"] == details["requests"]
    with pytest.raises(ConfigError):                        # the others keep their 2 KB
        ops.raise_alert("api-denied", details=json.dumps(details))
