"""The default-login check: a device type's well-known factory logins (its profile's
`[[default_logins]]`) tried against an approved device's own login services, from the gateway.

One try per entry, one entry at a time, PAUSE_SECONDS apart (a device that locks out after a
few failures is not locked out by us); each try gets CONNECT_SECONDS to connect and TRY_SECONDS
in all. Services:

- `telnet`: the option negotiation is answered by refusing every option; then the user name at
  the login prompt, the password at the password prompt, and what comes back is read: a shell
  prompt or a welcome and no failure words is a success; failure words ("Login incorrect"), a
  new login prompt or the connection closed is a failure.
- `http_basic`: GET `path` without credentials must answer 401 (else nothing there asks for a
  login), then with the credentials: 2xx is a success, 401/403 a failure.
- `http_form`: POST `path` with the JSON object {"user", "password"} (the lab devices' form;
  a 400, 415 or 422, a request the device could not read, is sent once more form-encoded;
  404 or 405 means no form there): 2xx with a JSON body that reports no failure is a
  success; 401/403, or a body that says ok/success false or an error, is a failure; a page
  that is not JSON tells nothing (inconclusive) unless it has failure words.

Each result is {service, port, user, path (http), outcome, detail}, outcome one of OUTCOMES.
No password is in a result, a log line or an error: the caller records results as they are.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import urllib.parse

log = logging.getLogger("kalki.logins")

CONNECT_SECONDS = 3.0     # to connect to the device's service
TRY_SECONDS = 8.0         # one entry, connection to verdict
PAUSE_SECONDS = 1.0       # between two tries on one device
READ_LIMIT = 64 * 1024    # of an answer, read at most
TEXT_LIMIT = 8 * 1024     # of a telnet session's text, kept for the verdict
# success: the login worked; failure: the device refused it; unreachable: nothing answered on
# the port; no-login: the service asks for no login there; inconclusive: it answered, but not
# in a way that tells.
OUTCOMES = ("success", "failure", "unreachable", "no-login", "inconclusive")

# telnet (RFC 854): the bytes of option negotiation
IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
LOGIN_PROMPT = re.compile(r"(login|user ?name|user)\s*:$", re.I)
PASSWORD_PROMPT = re.compile(r"pass(word|wd|code)?\s*:$", re.I)
SHELL_PROMPT = re.compile(r"[#$>%]$")
WELCOME = re.compile(r"welcome|busybox|built-in shell|last login", re.I)
FAILURE_WORDS = re.compile(r"incorrect|invalid|fail|denied|wrong|not allowed|unauthori[sz]ed|refused",
                           re.I)


class Unreachable(Exception):
    """Nothing answered on the port (refused, no route, or no answer within CONNECT_SECONDS)."""


def result(entry: dict, outcome: str, detail: str) -> dict:
    """A try's record: the entry without its password, the outcome and why."""
    out = {k: entry[k] for k in ("service", "port", "user", "path") if k in entry}
    return {**out, "outcome": outcome, "detail": detail}


async def check(entries: list[dict], address: str, pause: float | None = None) -> list[dict]:
    """Tries each entry against `address` (the device's, or a test's 127.0.0.1), one after
    another, `pause` (PAUSE_SECONDS) apart; a port that was unreachable is not tried again."""
    pause = PAUSE_SECONDS if pause is None else pause
    out: list[dict] = []
    dead: set[int] = set()
    first = True
    for entry in entries:
        if entry["port"] in dead:
            out.append(result(entry, "unreachable", f"port {entry['port']}: unreachable (above)"))
            continue
        if not first:
            await asyncio.sleep(pause)
        first = False
        r = await try_login(entry, address)
        if r["outcome"] == "unreachable":
            dead.add(entry["port"])
        log.info("%s %s:%s user %s: %s (%s)", entry["service"], address, entry["port"],
                 entry["user"], r["outcome"], r["detail"])
        out.append(r)
    return out


async def try_login(entry: dict, address: str) -> dict:
    """One entry, one try, within TRY_SECONDS; never raises for what the device does."""
    progress = _Progress()
    tries = {"telnet": _telnet, "http_basic": _http_basic, "http_form": _http_form}
    # asyncio.timeout, not wait_for, here and in _connect: wait_for's frame keeps the task
    # that holds a failure, whose traceback keeps that frame, a cycle per refused port
    # (tests/test_garbage.py); a site's first check of its devices is thousands.
    try:
        async with asyncio.timeout(TRY_SECONDS):
            return await tries[entry["service"]](entry, address, progress)
    except Unreachable as e:
        return result(entry, "unreachable", str(e))
    except TimeoutError:
        return _timed_out(entry, progress)
    except (OSError, EOFError, ValueError, UnicodeError, asyncio.LimitOverrunError) as e:
        return result(entry, "inconclusive", f"{progress.phase}: {type(e).__name__}: {e}"[:300])


class _Progress:
    """How far a try got: what the verdict on a timeout rests on."""

    def __init__(self):
        self.phase = "connecting"
        self.text = ""


def _timed_out(entry: dict, progress: _Progress) -> dict:
    text = progress.text
    if progress.phase == "after the password" and not FAILURE_WORDS.search(text) and WELCOME.search(text):
        return result(entry, "success", "a welcome after the password")
    return result(entry, "inconclusive", f"no verdict within {TRY_SECONDS:g} s ({progress.phase})")


async def _connect(address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        async with asyncio.timeout(CONNECT_SECONDS):
            return await asyncio.open_connection(address, port, limit=READ_LIMIT)
    except TimeoutError:
        raise Unreachable(f"port {port}: no answer within {CONNECT_SECONDS:g} s") from None
    except OSError as e:
        raise Unreachable(f"port {port}: {e.strerror or type(e).__name__}") from None


def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
    except (OSError, RuntimeError):
        pass


# -- telnet ------------------------------------------------------------------------------
class TelnetText:
    """The printable text of a telnet session; every option the server asks for or offers is
    refused once (WONT to DO, DONT to WILL), subnegotiation is skipped."""

    def __init__(self):
        self._state = "data"
        self._command = 0
        self._answered: set[tuple[int, int]] = set()

    def feed(self, data: bytes) -> tuple[str, bytes]:
        """The text in `data`, and the bytes to send back."""
        text, reply = bytearray(), bytearray()
        for b in data:
            state = self._state
            if state == "data":
                if b == IAC:
                    self._state = "iac"
                elif b in (9, 10, 13) or 0x20 <= b < 0x7F:
                    text.append(b)
            elif state == "iac":
                if b in (DO, DONT, WILL, WONT):
                    self._command, self._state = b, "option"
                elif b == SB:
                    self._state = "sb"
                else:                      # IAC IAC (a data byte 255), NOP, GA, ...
                    self._state = "data"
            elif state == "option":
                refusal = {DO: WONT, WILL: DONT}.get(self._command)
                if refusal is not None and (self._command, b) not in self._answered:
                    self._answered.add((self._command, b))
                    reply += bytes((IAC, refusal, b))
                self._state = "data"
            elif state == "sb":
                if b == IAC:
                    self._state = "sb-iac"
            elif state == "sb-iac":
                self._state = "data" if b == SE else "sb"
        return text.decode("ascii"), bytes(reply)


async def _telnet(entry: dict, address: str, progress: _Progress) -> dict:
    reader, writer = await _connect(address, entry["port"])
    session = TelnetText()
    try:
        async def read_until(*patterns: re.Pattern, anywhere: tuple[re.Pattern, ...] = ()) -> bool:
            """Reads until a pattern matches the end of the text (or one in `anywhere`
            matches anywhere in it); False at the end of the connection."""
            while True:
                tail = progress.text.rstrip()
                if any(p.search(tail) for p in patterns) or any(p.search(progress.text) for p in anywhere):
                    return True
                data = await reader.read(4096)
                if not data:
                    return False
                text, reply = session.feed(data)
                if reply:
                    writer.write(reply)
                    await writer.drain()
                progress.text = (progress.text + text)[-TEXT_LIMIT:]

        progress.phase = "waiting for a login prompt"
        if not await read_until(LOGIN_PROMPT, PASSWORD_PROMPT):
            return result(entry, "inconclusive", "closed before a login prompt")
        if not PASSWORD_PROMPT.search(progress.text.rstrip()):
            writer.write(entry["user"].encode("utf-8") + b"\r\n")
            await writer.drain()
            progress.phase, progress.text = "after the user name", ""
            if not await read_until(PASSWORD_PROMPT, LOGIN_PROMPT, SHELL_PROMPT, anywhere=(FAILURE_WORDS,)):
                return result(entry, "inconclusive", "closed after the user name")
            tail = progress.text.rstrip()
            if FAILURE_WORDS.search(progress.text) or LOGIN_PROMPT.search(tail):
                return result(entry, "failure", "refused the user name")
            if not PASSWORD_PROMPT.search(tail):
                return result(entry, "success", "a shell after the user name alone (no password asked)")
        writer.write(entry["password"].encode("utf-8") + b"\r\n")
        await writer.drain()
        progress.phase, progress.text = "after the password", ""
        closed = not await read_until(SHELL_PROMPT, LOGIN_PROMPT, PASSWORD_PROMPT, anywhere=(FAILURE_WORDS,))
        text, tail = progress.text, progress.text.rstrip()
        if FAILURE_WORDS.search(text):
            return result(entry, "failure", f"refused: {_quote(FAILURE_WORDS, text)}")
        if LOGIN_PROMPT.search(tail) or PASSWORD_PROMPT.search(tail):
            return result(entry, "failure", "asked for the login again")
        if SHELL_PROMPT.search(tail):
            return result(entry, "success", "a shell prompt after the password")
        if closed and WELCOME.search(text):
            return result(entry, "success", "a welcome after the password")
        return result(entry, "failure", "closed the connection after the password")
    finally:
        _close(writer)


def _quote(pattern: re.Pattern, text: str) -> str:
    """The line of `text` where `pattern` matches, shortened."""
    m = pattern.search(text)
    if not m:
        return ""
    start = text.rfind("\n", 0, m.start()) + 1
    end = text.find("\n", m.end())
    return text[start:end if end >= 0 else None].strip()[:80]


# -- HTTP --------------------------------------------------------------------------------
async def http(address: str, port: int, method: str, path: str, headers: dict[str, str] | None = None,
               body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 exchange on its own connection: (status, headers in lower case, body)."""
    reader, writer = await _connect(address, port)
    try:
        host = address if port == 80 else f"{address}:{port}"
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "User-Agent: kalki-login-check",
                 "Accept: */*", "Connection: close",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            raise EOFError("a truncated HTTP answer" if e.partial else "closed before an HTTP answer") \
                from None
        except asyncio.LimitOverrunError:
            raise ValueError(f"an HTTP head of more than {READ_LIMIT} bytes") from None
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        m = re.match(r"HTTP/1\.[01] (\d{3})", status_line)
        if not m:
            raise ValueError(f"not an HTTP answer: {status_line[:60]!r}")
        answer = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                answer[name.strip().lower()] = value.strip()
        return int(m[1]), answer, await _body(reader, answer)
    finally:
        _close(writer)


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = b""
        while len(out) < READ_LIMIT:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            out += await reader.readexactly(min(size, READ_LIMIT))
            await reader.readline()
        return out[:READ_LIMIT]
    length = headers.get("content-length", "")
    if length.isdigit():
        try:
            return await reader.readexactly(min(int(length), READ_LIMIT))
        except asyncio.IncompleteReadError as e:
            return e.partial
    return await reader.read(READ_LIMIT)


async def _http_basic(entry: dict, address: str, progress: _Progress) -> dict:
    port, path = entry["port"], entry["path"]
    progress.phase = "asking without credentials"
    status, headers, _ = await http(address, port, "GET", path)
    if status != 401:
        if 200 <= status < 400:
            return result(entry, "no-login", f"{path} answers {status} without a login")
        return result(entry, "inconclusive", f"{path} answers {status} without credentials, not 401")
    challenge = headers.get("www-authenticate", "")
    if challenge and not challenge.lower().startswith("basic"):
        return result(entry, "inconclusive",
                      f"{path} asks for {challenge.split()[0]} authentication, not Basic")
    token = base64.b64encode(f"{entry['user']}:{entry['password']}".encode()).decode("ascii")
    progress.phase = "asking with the credentials"
    status, _, _ = await http(address, port, "GET", path, {"Authorization": f"Basic {token}"})
    if 200 <= status < 300:
        return result(entry, "success", f"{path} answers {status} with the login (401 without)")
    if status in (401, 403):
        return result(entry, "failure", f"{path} answers {status} with the login")
    return result(entry, "inconclusive", f"{path} answers {status} with the login")


async def _http_form(entry: dict, address: str, progress: _Progress) -> dict:
    port, path = entry["port"], entry["path"]
    credentials = {"user": entry["user"], "password": entry["password"]}
    progress.phase = "posting the login form (JSON)"
    status, _, body = await http(address, port, "POST", path, {"Content-Type": "application/json"},
                                 json.dumps(credentials).encode())
    how = "JSON"
    if status in (404, 405):
        return result(entry, "no-login", f"no login form at {path} (it answers {status})")
    if status in (400, 415, 422):       # it could not read JSON: no login was tried
        await asyncio.sleep(PAUSE_SECONDS)
        progress.phase = "posting the login form (form-encoded)"
        status, _, body = await http(address, port, "POST", path,
                                     {"Content-Type": "application/x-www-form-urlencoded"},
                                     urllib.parse.urlencode(credentials).encode())
        how = "form-encoded"
    return _form_verdict(entry, status, body, how)


def _form_verdict(entry: dict, status: int, body: bytes, how: str) -> dict:
    path = entry["path"]
    if status in (401, 403):
        return result(entry, "failure", f"{path} answers {status} to the login ({how})")
    if not 200 <= status < 300:
        return result(entry, "inconclusive", f"{path} answers {status} to the login ({how})")
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        said_no = any(data.get(k) is False for k in ("ok", "success", "result")) or "error" in data
        said_yes = any(data.get(k) is True for k in ("ok", "success", "result"))
        if said_no or (not said_yes and FAILURE_WORDS.search(text)):
            return result(entry, "failure", f"{path} answers {status} and a refusal ({how})")
        return result(entry, "success", f"{path} answers {status} and no refusal ({how})")
    if FAILURE_WORDS.search(text):
        return result(entry, "failure", f"{path} answers {status} and a refusal ({how})")
    return result(entry, "inconclusive", f"{path} answers {status}, not in JSON: cannot tell ({how})")
