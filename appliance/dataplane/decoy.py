"""The decoy: the user-space half of the `deception` umbox, run inside the gate's process
(appliance/dataplane/gate.py: --decoy-telnet-port, --decoy-http-port).

For a device whose posture has `deception`, nftables sends what a source in the drop set opens
to the device's telnet port (23) to the decoy's telnet port, and to its web ports (80, 8080) to
the decoy's HTTP port; the rest from that source to the device is dropped, so the device never
sees the attacker. The decoy learns the device from SO_ORIGINAL_DST, as the gate does, and its
name and type from the device's policy file (gatepolicy: "device", and "decoy": {"type": ...});
without a usable file it answers as `generic`. It imitates the type:

- telnet: busybox telnetd's option negotiation (it offers ECHO and SGA, asks for NAWS, refuses
  every other option), "<host> login: " and "Password: ". No login ever succeeds: after each
  password a pause of 0.5-1 s, then "Login incorrect"; the third closes the connection.
- HTTP (h11, keep-alive): camera, a login page and 401 (Basic) elsewhere; light, a Hue
  bridge's API (`/api/<user>/...`: 200 with the error "unauthorized user"); plug, a WeMo's
  `POST /upnp/control/basicevent1` GetBinaryState and /setup.xml, 401 elsewhere; any other
  type, 401. `POST /login` is refused (401) for every type.

It never performs anything: no shell, no state, nothing is passed to a device or anywhere else.
What the source sent is evidence: each (user, password) tried (telnet, HTTP Basic or a login
form), telnet lines typed while a login was being "checked", and per HTTP request its method,
target, answer, User-Agent, Authorization and the first 1 KiB of its body; all of it escaped to
printable ASCII and capped per session. When a session ends (closed, 60 s idle, 10 min at most)
one `deception` report goes through the gate's --alert-command:

    kind deception, source the attacker, target the device's address, details
    {"service": "telnet" | "http", "device": NAME | "", "type": TYPE, "port": PORT,
     "logins": [[USER, PASSWORD], ...], "lines" | "requests": [...], "duration_s": SECONDS}

the details at most 8 KiB ("truncated": true and "left_out": N when something was left out).
At most one report per source, device and service in REPORT_INTERVAL: sessions that end sooner
are merged into the next one ("sessions": N). A source has at most 8 sessions at a time, and
the decoy 64; one more is closed at once and counted (`decoy-refused` in the gate's counters).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import h11

from appliance.dataplane.gate import (
    BACKLOG,
    HEAD_LIMIT,
    AlertCallback,
    _Side,
    parse_basic,
    redirected_target,
    simple_response,
)
from appliance.dataplane.gatepolicy import PolicyFiles

log = logging.getLogger("kalki.decoy")

KIND = "deception"
IDLE_TIMEOUT = 60.0              # silence that ends a session
SESSION_SECONDS = 600.0          # the longest a session lasts
PER_SOURCE = 8                   # sessions at a time, per source
TOTAL = 64                       # and in all
LOGIN_ATTEMPTS = 3               # then busybox's login gives up, and the connection closes
FAIL_DELAY = (0.5, 1.0)          # seconds before "Login incorrect"
LINE_BYTES = 256                 # of a telnet line, kept
TELNET_INPUT = 64 * 1024         # bytes a telnet session may send
TELNET_LINES = 64                # lines it may send (empty user names too)
TELNET_RECORD_CHARS = 4096       # evidence per telnet session: users, passwords, lines
TELNET_RECORD_LINES = 20
HTTP_REQUESTS = 100              # per connection; the last is answered with Connection: close
HTTP_RECORD_REQUESTS = 50        # recorded per session
HTTP_RECORD_CHARS = 16 * 1024
BODY_LIMIT = 64 * 1024           # of a request's body; more: 413 and the connection ends
BODY_RECORD = 1024
FIELD_CHARS = 128                # User-Agent, Authorization, a user or password
TARGET_CHARS = 256
RECORD_LOGINS = 20               # (user, password) pairs per session
DETAILS_LIMIT = 8192             # of a report's details, as JSON
REPORT_INTERVAL = 30.0           # one report per (source, device, service) in this long
MERGED_CHARS = 2 * DETAILS_LIMIT  # of the sessions merged into one report, kept
PENDING_LIMIT = 256              # merged reports waiting; beyond, a session reports at once

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
ECHO, SGA, NAWS = 1, 3, 31
# what busybox telnetd sends first (make_new_session's iacs_to_send)
TELNET_HELLO = bytes([IAC, DO, ECHO, IAC, DO, NAWS, IAC, WILL, ECHO, IAC, WILL, SGA])


def printable(data: bytes | str, limit: int) -> str:
    """At most `limit` bytes of `data` as printable ASCII: a backslash doubled, anything else
    outside space..~ as \\xNN."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    out = []
    for b in raw[:limit]:
        out.append("\\\\" if b == 0x5C else chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}")
    return "".join(out)


# ---------------------------------------------------------------- evidence

@dataclass
class Evidence:
    """What one session (or several merged) of a source recorded."""
    service: str                 # "telnet" | "http"
    source: str
    where: str                   # "device ip:port", "" when unknown
    device: str = ""
    type: str = "generic"
    started: float = field(default_factory=time.monotonic)
    duration: float = 0.0
    logins: list[list[str | None]] = field(default_factory=list)
    records: list = field(default_factory=list)      # lines (str) or requests (dict)
    left_out: int = 0
    sessions: int = 1
    chars: int = 0

    @property
    def budget(self) -> tuple[int, int]:
        """(records, characters) one session keeps."""
        if self.service == "telnet":
            return TELNET_RECORD_LINES, TELNET_RECORD_CHARS
        return HTTP_RECORD_REQUESTS, HTTP_RECORD_CHARS

    def _fits(self, size: int) -> bool:
        if self.chars + size > self.budget[1]:
            self.left_out += 1
            return False
        self.chars += size
        return True

    def add_login(self, user: str, password: str | None) -> None:
        if len(self.logins) >= RECORD_LOGINS:
            self.left_out += 1
        elif self._fits(len(user) + len(password or "")):
            self.logins.append([user, password])

    def add_record(self, record: str | dict) -> None:
        size = len(record) if isinstance(record, str) else len(json.dumps(record))
        if len(self.records) >= self.budget[0]:
            self.left_out += 1
        elif self._fits(size):
            self.records.append(record)

    def merge(self, other: Evidence) -> None:
        """Another session's evidence into this one (waiting to be reported), up to
        MERGED_CHARS in all."""
        for mine, theirs in ((self.logins, other.logins), (self.records, other.records)):
            for item in theirs:
                size = len(json.dumps(item))
                if self.chars + size > MERGED_CHARS:
                    self.left_out += 1
                else:
                    self.chars += size
                    mine.append(item)
        self.left_out += other.left_out
        self.sessions += other.sessions
        self.duration += other.duration
        if not self.device:
            self.device, self.type = other.device, other.type

    def details(self) -> dict:
        """The report's details, at most DETAILS_LIMIT as JSON: requests or lines are left out
        from the end first, then logins."""
        records, logins = list(self.records), list(self.logins)
        left_out = self.left_out
        port = self.where.rpartition(":")[2]

        def build() -> dict:
            d = {"service": self.service, "device": self.device[:64], "type": self.type,
                 "port": int(port) if port.isdigit() else None, "logins": logins,
                 "lines" if self.service == "telnet" else "requests": records,
                 "duration_s": round(self.duration, 1)}
            if self.sessions > 1:
                d["sessions"] = self.sessions
            if left_out:
                d["truncated"], d["left_out"] = True, left_out
            return d

        d = build()
        while len(json.dumps(d, sort_keys=True)) > DETAILS_LIMIT and (records or logins):
            (records or logins).pop()
            left_out += 1
            d = build()
        return d


# ---------------------------------------------------------------- device types

@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Imitation:
    """How the decoy looks for one device type."""
    hostname: str                # in telnet's login prompt
    banner: str                  # the lines before the first prompt
    server: str                  # HTTP Server header
    realm: str                   # HTTP Basic realm
    routes: Callable[[Imitation, str, str, dict[bytes, bytes], bytes], Answer | None] | None = None


def _json(status: int, value: object) -> Answer:
    return Answer(status, json.dumps(value).encode())


def _unauthorized(imitation: Imitation) -> Answer:
    return Answer(401, b"401 Unauthorized\n", "text/plain",
                  (("WWW-Authenticate", f'Basic realm="{imitation.realm}"'),))


CAMERA_PAGE = b"""<!DOCTYPE html>
<html><head><title>IP Camera</title></head>
<body><h3>IP Camera</h3>
<form method="post" action="/login">
User name <input name="user"> Password <input name="password" type="password">
<input type="submit" value="Login"></form></body></html>
"""


def _camera(imitation: Imitation, method: str, path: str, headers: dict[bytes, bytes],
            body: bytes) -> Answer | None:
    if method in ("GET", "HEAD") and path in ("/", "/index.html", "/login", "/login.html"):
        return Answer(200, CAMERA_PAGE, "text/html")
    return None


HUE_PAGE = b"<!DOCTYPE html><html><head><title>hi</title></head><body>hue personal wireless " \
           b"lighting</body></html>\n"


def _light(imitation: Imitation, method: str, path: str, headers: dict[bytes, bytes],
           body: bytes) -> Answer | None:
    """A Hue bridge's v1 API to a client it does not know: every user name is unknown."""
    if path == "/api" or path.startswith("/api/"):
        parts = path.split("/")[2:]
        if not any(parts) and method == "POST":      # creating a user: the button was not pressed
            return _json(200, [{"error": {"type": 101, "address": "",
                                          "description": "link button not pressed"}}])
        address = "/" + "/".join(parts[1:])
        return _json(200, [{"error": {"type": 1, "address": address,
                                      "description": "unauthorized user"}}])
    if method in ("GET", "HEAD") and path in ("/", "/index.html"):
        return Answer(200, HUE_PAGE, "text/html")
    return Answer(404, b"404 Not Found\n", "text/plain")


SOAP = ('<?xml version="1.0" encoding="utf-8"?>\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/'
        'soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>\n'
        '{}\n</s:Body> </s:Envelope>\n')
WEMO_STATE = SOAP.format('<u:GetBinaryStateResponse xmlns:u="urn:Belkin:service:basicevent:1">\n'
                         '<BinaryState>1</BinaryState>\n</u:GetBinaryStateResponse>').encode()
WEMO_FAULT = SOAP.format('<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError'
                         '</faultstring><detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
                         '<errorCode>401</errorCode><errorDescription>Invalid Action'
                         '</errorDescription></UPnPError></detail></s:Fault>').encode()
WEMO_SETUP = b"""<?xml version="1.0"?>
<root xmlns="urn:Belkin:device-1-0"><specVersion><major>1</major><minor>0</minor></specVersion>
<device><deviceType>urn:Belkin:device:insight:1</deviceType><friendlyName>WeMo Insight</friendlyName>
<manufacturer>Belkin International Inc.</manufacturer><modelName>Insight</modelName>
<modelNumber>1.0</modelNumber><firmwareVersion>WeMo_WW_2.00.11408.PVT-OWRT-InsightV2</firmwareVersion>
<serviceList><service><serviceType>urn:Belkin:service:basicevent:1</serviceType>
<serviceId>urn:Belkin:serviceId:basicevent1</serviceId><controlURL>/upnp/control/basicevent1</controlURL>
<eventSubURL>/upnp/event/basicevent1</eventSubURL><SCPDURL>/eventservice.xml</SCPDURL></service>
</serviceList></device></root>
"""
XML = 'text/xml; charset="utf-8"'


def _plug(imitation: Imitation, method: str, path: str, headers: dict[bytes, bytes],
          body: bytes) -> Answer | None:
    """A WeMo's UPnP control point: GetBinaryState is answered (on), every other action (the
    SetBinaryState that would switch it) is an Invalid Action fault; nothing is switched."""
    if path == "/upnp/control/basicevent1" and method == "POST":
        action = headers.get(b"soapaction", b"") + body[:BODY_RECORD]
        if b"GetBinaryState" in action:
            return Answer(200, WEMO_STATE, XML, (("X-User-Agent", "redsonic"),))
        return Answer(500, WEMO_FAULT, XML, (("X-User-Agent", "redsonic"),))
    if method in ("GET", "HEAD") and path == "/setup.xml":
        return Answer(200, WEMO_SETUP, XML)
    return None


IMITATIONS = {
    "camera": Imitation("IPCAM", "Linux 3.10.14 (IPCAM)", "Boa/0.94.14rc21", "IP Camera", _camera),
    "light": Imitation("hue-bridge", "", "nginx", "hue", _light),
    "plug": Imitation("WeMo", "", "Unspecified, UPnP/1.0, Unspecified", "WeMo", _plug),
    "generic": Imitation("(none)", "", "lighttpd/1.4.45", "Login"),
}

USER_KEYS = ("user", "username", "login", "name", "usr", "account")
PASSWORD_KEYS = ("password", "pass", "passwd", "pwd")


def form_login(body: bytes) -> tuple[str, str] | None:
    """(user, password) from a login form's body: a JSON object or a urlencoded form."""
    fields: dict = {}
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            fields = {str(k).lower(): v for k, v in data.items()}
    except ValueError:
        pairs = urllib.parse.parse_qsl(body.decode("latin-1"), max_num_fields=32)
        fields = {k.lower(): v for k, v in pairs}
    user = next((fields[k] for k in USER_KEYS if k in fields), None)
    password = next((fields[k] for k in PASSWORD_KEYS if k in fields), None)
    if user is None and password is None:
        return None
    return (printable(str(user if user is not None else ""), FIELD_CHARS),
            printable(str(password if password is not None else ""), FIELD_CHARS))


def answer(imitation: Imitation, method: str, path: str, headers: dict[bytes, bytes],
           body: bytes) -> Answer:
    """What the decoy says to one request."""
    if path == "/login" and method == "POST":
        return _json(401, {"ok": False})
    got = imitation.routes(imitation, method, path, headers, body) if imitation.routes else None
    return got or _unauthorized(imitation)


# ---------------------------------------------------------------- telnet

class _End(Exception):
    """The telnet session is over (the peer went away, or sent too much)."""


class TelnetInput:
    """Lines from a telnet client. Options are never answered, as busybox's telnetd does not
    answer them; a DONT ECHO says the client echoes itself; subnegotiations are skipped. Lines
    end with CR LF, CR NUL, CR or LF; backspace and DEL edit; other control characters are
    dropped; a line keeps its first LINE_BYTES bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self.lines: list[bytes] = []
        self.line = bytearray()
        self.state = "data"         # data, cr, iac, option, sb, sb-iac
        self.verb = 0
        self.echo = False           # echo what is typed (the user name, not the password)
        self.client_echoes = False  # the client refused our ECHO: it echoes itself
        self.received = 0
        self.count = 0
        self.closed = False         # the peer went away while lines were drained

    async def readline(self, echo: bool) -> bytes:
        """The next line (_End when the peer closes, is silent for `timeout` or sends too
        much)."""
        self.echo = echo
        while not self.lines:
            await self.read(self.timeout)
        return self.lines.pop(0)

    async def read(self, timeout: float) -> None:
        """Reads once, within `timeout` seconds (TimeoutError if nothing came)."""
        data = await asyncio.wait_for(self.reader.read(1024), timeout)
        if not data:
            raise _End("closed")
        self.received += len(data)
        if self.received > TELNET_INPUT:
            raise _End("too much input")
        out = self.feed(data)
        if out:
            self.writer.write(out)
            await self.writer.drain()

    async def drain_for(self, seconds: float) -> list[bytes]:
        """Whatever lines come within `seconds` (typed ahead while a login is "checked")."""
        self.echo = False
        deadline = asyncio.get_running_loop().time() + seconds
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                await self.read(left)
            except TimeoutError:
                break
            except _End:
                self.closed = True
                break
        lines, self.lines = self.lines, []
        return lines

    def feed(self, data: bytes) -> bytes:
        """Takes bytes in; returns what to send back: only the echo of what was typed, when
        it echoes (no option is answered, as busybox's telnetd answers none)."""
        out = bytearray()
        for b in data:
            if self.state == "iac":
                if b == IAC:
                    self.state = "data"
                    self._char(b, out)
                elif b in (DO, DONT, WILL, WONT):
                    self.state, self.verb = "option", b
                elif b == SB:
                    self.state = "sb"
                else:       # NOP, GA, AYT, IP, ...: nothing to answer
                    self.state = "data"
            elif self.state == "option":
                # busybox's telnetd answers no option, whatever is offered or asked: it only
                # learns that the client echoes. Refusing (as RFC 854 would) is a tell, and
                # makes clients such as hydra fall back to a character mode they get wrong.
                self.state = "data"
                if self.verb == DONT and b == ECHO:
                    self.client_echoes = True
            elif self.state == "sb":
                if b == IAC:
                    self.state = "sb-iac"
            elif self.state == "sb-iac":
                self.state = "data" if b == SE else "sb"
            elif b == IAC:
                self.state = "iac"
            elif self.state == "cr" and b in (0, 0x0A):
                self.state = "data"     # CR LF, CR NUL: one end of line
            else:
                self.state = "data"
                if b in (0x0D, 0x0A):
                    self._end_line(out)
                    if b == 0x0D:
                        self.state = "cr"
                else:
                    self._char(b, out)
        return bytes(out)

    def _char(self, b: int, out: bytearray) -> None:
        shown = self.echo and not self.client_echoes
        if b in (0x08, 0x7F):
            if self.line:
                self.line.pop()
                if shown:
                    out += b"\b \b"
        elif b >= 0x20 and b != 0x7F:
            if len(self.line) < LINE_BYTES:
                self.line.append(b)
                if shown and b < 0x7F:
                    out.append(b)

    def _end_line(self, out: bytearray) -> None:
        self.count += 1
        if self.count > TELNET_LINES:
            raise _End("too many lines")
        if self.echo and not self.client_echoes:
            out += b"\r\n"
        self.lines.append(bytes(self.line))
        self.line.clear()


# ---------------------------------------------------------------- the decoy

ReportCallback = AlertCallback      # (kind, source, "ip:port", details)


class Decoy:
    """The decoy's telnet and HTTP servers' handlers, for every deceived device. `policies`
    names the device and its type (None: every device is `generic`); `on_report(kind, source,
    target, details)` takes the evidence; `stats` is the gate's counters."""

    def __init__(self, policies: PolicyFiles | None = None, on_report: ReportCallback | None = None,
                 stats: Counter[str] | None = None, *, target_override: tuple[str, int] | None = None,
                 idle_timeout: float = IDLE_TIMEOUT, session_seconds: float = SESSION_SECONDS,
                 fail_delay: tuple[float, float] = FAIL_DELAY, per_source: int = PER_SOURCE,
                 total: int = TOTAL, report_interval: float = REPORT_INTERVAL):
        self.policies = policies
        self.on_report = on_report or (lambda kind, ip, target, details: None)
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.target_override = target_override
        self.idle_timeout, self.session_seconds = idle_timeout, session_seconds
        self.fail_delay = fail_delay
        self.per_source, self.total = per_source, total
        self.report_interval = report_interval
        self._active: Counter[str] = Counter()
        self._sessions: set[asyncio.Task] = set()
        self._last_report: dict[tuple[str, str, str], float] = {}
        self._pending: dict[tuple[str, str, str], tuple[Evidence, asyncio.TimerHandle]] = {}

    @property
    def active(self) -> int:
        return self._active.total()

    # -- who and what
    def target_for(self, writer: asyncio.StreamWriter) -> tuple[str, int] | None:
        return redirected_target(writer, self.target_override)

    def identify(self, ev: Evidence, target: tuple[str, int] | None) -> Imitation:
        if target is None or self.policies is None:
            return IMITATIONS["generic"]
        try:
            policy, why = self.policies.read(target[0])
        except ValueError:
            return IMITATIONS["generic"]
        if policy is None:
            log.debug("decoy for %s:%d: %s; answering as generic", *target, why)
            return IMITATIONS["generic"]
        ev.device = policy.device
        if policy.decoy is not None:
            ev.type = policy.decoy.type
        return IMITATIONS.get(ev.type, IMITATIONS["generic"])

    # -- sessions
    async def handle_telnet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._session("telnet", reader, writer)

    async def handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._session("http", reader, writer)

    async def _session(self, service: str, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = peer[0] if peer else "?"
        if self.active >= self.total or self._active[source] >= self.per_source:
            self.stats["decoy-refused"] += 1
            log.debug("decoy refused client=%s (%d sessions of it, %d in all)", source,
                      self._active[source], self.active)
            writer.transport.abort()
            return
        self._active[source] += 1
        self.stats["decoy-sessions"] += 1
        task = asyncio.current_task()
        if task is not None:
            self._sessions.add(task)
        target = self.target_for(writer)
        ev = Evidence(service, source, f"{target[0]}:{target[1]}" if target else "")
        imitation = self.identify(ev, target)
        try:
            async with asyncio.timeout(self.session_seconds):
                if service == "telnet":
                    await self._telnet(reader, writer, ev, imitation)
                else:
                    await self._http(reader, writer, ev, imitation)
        except (_End, TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except h11.ProtocolError as exc:
            log.info("decoy client=%s: %s", source, exc)
        except asyncio.CancelledError:
            pass        # shutting down: the evidence is still reported
        except Exception:
            log.exception("decoy %s session of %s failed", service, source)
        finally:
            self._active[source] -= 1
            if self._active[source] <= 0:
                del self._active[source]
            if task is not None:
                self._sessions.discard(task)
            writer.close()
            ev.duration = time.monotonic() - ev.started
            self._finish(ev)

    async def _telnet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      ev: Evidence, imitation: Imitation) -> None:
        typed = TelnetInput(reader, writer, self.idle_timeout)
        banner = f"\r\n{imitation.banner}\r\n" if imitation.banner else "\r\n"
        writer.write(TELNET_HELLO + banner.encode())
        prompt = f"{imitation.hostname} login: ".encode()
        for attempt in range(1, LOGIN_ATTEMPTS + 1):
            user = b""
            while not user.strip():
                writer.write(prompt)
                await writer.drain()
                user = await typed.readline(echo=True)
            writer.write(b"Password: ")
            await writer.drain()
            try:
                password: bytes | None = await typed.readline(echo=False)
            except (_End, TimeoutError):
                password = None
            writer.write(b"\r\n")
            ev.add_login(printable(user.strip(), LINE_BYTES),
                         None if password is None else printable(password, LINE_BYTES))
            self.stats["decoy-logins"] += 1
            if password is None:
                return
            for line in await typed.drain_for(random.uniform(*self.fail_delay)):
                ev.add_record(printable(line, LINE_BYTES))
            if typed.closed:
                return
            writer.write(b"Login incorrect\r\n")
            await writer.drain()
        # like busybox's login after the third: the connection ends

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    ev: Evidence, imitation: Imitation) -> None:
        side = _Side(reader, writer, h11.SERVER, HEAD_LIMIT)
        t = self.idle_timeout
        for served in range(1, HTTP_REQUESTS + 1):
            try:
                event = await side.next_event(t)
                if not isinstance(event, h11.Request):
                    return
                if side.h11.they_are_waiting_for_100_continue:
                    await side.send(h11.InformationalResponse(status_code=100, headers=[]), t)
                body, size = bytearray(), 0
                while not isinstance(part := await side.next_event(t), h11.EndOfMessage):
                    if not isinstance(part, h11.Data):
                        return      # gone in the middle of its request
                    size += len(part.data)
                    body += bytes(part.data)[:BODY_RECORD - len(body)]
                    if size > BODY_LIMIT:
                        break
            except h11.RemoteProtocolError as exc:
                ev.add_record({"error": printable(str(exc), FIELD_CHARS)})
                self.stats["decoy-requests"] += 1
                if side.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    writer.write(simple_response(400, "Bad Request"))
                    await writer.drain()
                return
            self.stats["decoy-requests"] += 1
            last = served == HTTP_REQUESTS or size > BODY_LIMIT
            got = self._request(ev, imitation, event, bytes(body), size)
            await self._send(side, event, imitation, got, last)
            if last or side.h11.our_state is not h11.DONE or side.h11.their_state is not h11.DONE:
                return
            side.h11.start_next_cycle()

    def _request(self, ev: Evidence, imitation: Imitation, request: h11.Request, body: bytes,
                 size: int) -> Answer:
        """The answer to one request, and its record."""
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        headers = {name: value for name, value in request.headers}     # (lower-case names)
        if size > BODY_LIMIT:
            got = Answer(413, b"413 Payload Too Large\n", "text/plain")
        else:
            path = urllib.parse.urlsplit(target).path if not target.startswith("/") else target
            got = answer(imitation, method, path.split("?", 1)[0] or "/", headers, body)
        record: dict = {"method": printable(method, 16), "path": printable(target, TARGET_CHARS),
                        "status": got.status}
        if b"user-agent" in headers:
            record["user_agent"] = printable(headers[b"user-agent"], FIELD_CHARS)
        authorization = headers.get(b"authorization")
        if authorization is not None:
            creds = parse_basic(authorization)
            if creds is not None:
                user, password = (printable(c, FIELD_CHARS) for c in creds)
                record["user"] = user
                ev.add_login(user, password)
                self.stats["decoy-logins"] += 1
            else:
                record["authorization"] = printable(authorization, FIELD_CHARS)
        if body:
            record["body"] = printable(body, BODY_RECORD)
            if method == "POST" and (creds := form_login(body)) is not None:
                ev.add_login(*creds)
                self.stats["decoy-logins"] += 1
        ev.add_record(record)
        return got

    async def _send(self, side: _Side, request: h11.Request, imitation: Imitation, got: Answer,
                    last: bool) -> None:
        headers = [("Server", imitation.server), ("Content-Type", got.content_type),
                   ("Content-Length", str(len(got.body))), *got.headers]
        if last:
            headers.append(("Connection", "close"))
        t = self.idle_timeout
        await side.send(h11.Response(status_code=got.status, headers=headers), t)
        if got.body and request.method != b"HEAD":
            await side.send(h11.Data(data=got.body), t)
        await side.send(h11.EndOfMessage(), t)

    # -- reports
    def _finish(self, ev: Evidence) -> None:
        """One report for the session, or merged into the next one for the same source,
        device and service within report_interval."""
        if not ev.logins and not ev.records:
            self.stats["decoy-empty"] += 1      # connected, sent nothing (a port probe): reported too
        key = (ev.source, ev.where, ev.service)
        now = time.monotonic()
        pending = self._pending.get(key)
        if pending is not None:
            pending[0].merge(ev)
            self.stats["decoy-merged"] += 1
            return
        last = self._last_report.get(key)
        wait = 0.0 if last is None else last + self.report_interval - now
        if wait <= 0 or len(self._pending) >= PENDING_LIMIT:
            self._report(key, ev)
            return
        try:
            handle = asyncio.get_running_loop().call_later(wait, self._flush, key)
        except RuntimeError:        # no loop any more: at once
            self._report(key, ev)
            return
        self._pending[key] = (ev, handle)

    def _flush(self, key: tuple[str, str, str]) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending[1].cancel()
            self._report(key, pending[0])

    def _report(self, key: tuple[str, str, str], ev: Evidence) -> None:
        now = time.monotonic()
        if len(self._last_report) > 4 * PENDING_LIMIT:
            self._last_report = {k: t for k, t in self._last_report.items()
                                 if now - t < self.report_interval}
        self._last_report[key] = now
        details = ev.details()
        self.stats["decoy-reports"] += 1
        if details.get("truncated"):
            self.stats["decoy-truncated"] += 1
        log.warning("deception client=%s target=%s service=%s device=%s logins=%d %s=%d sessions=%d",
                    ev.source, ev.where or "?", ev.service, ev.device or "?", len(ev.logins),
                    "lines" if ev.service == "telnet" else "requests", len(ev.records), ev.sessions)
        try:
            self.on_report(KIND, ev.source, ev.where, details)
        except Exception:
            log.exception("deception report for %s failed", ev.source)

    async def aclose(self) -> None:
        """Ends the open sessions (each reports what it has) and sends the merged reports."""
        sessions = list(self._sessions)
        for task in sessions:
            task.cancel()
        if sessions:
            await asyncio.wait(sessions, timeout=2.0)
        for key in list(self._pending):
            self._flush(key)


async def serve(decoy: Decoy, host: str, telnet_port: int | None = None,
                http_port: int | None = None) -> dict[str, asyncio.Server]:
    """The decoy's listeners that are asked for: {"telnet": server, "http": server}."""
    servers: dict[str, asyncio.Server] = {}
    wanted: Iterable[tuple[str, int | None, Callable]] = (
        ("telnet", telnet_port, decoy.handle_telnet), ("http", http_port, decoy.handle_http))
    try:
        for name, port, handler in wanted:
            if port is not None:
                servers[name] = await asyncio.start_server(handler, host, port, limit=HEAD_LIMIT,
                                                           backlog=BACKLOG)
    except OSError:
        for server in servers.values():
            server.close()
        raise
    return servers
