"""The gate: the user-space umboxes in front of a device's web port (auth_gate, api_filter,
token_guard).

nftables redirects connections aimed at a gated device's web port (set `gate` of `inet kalki`)
to this process, which learns the device from SO_ORIGINAL_DST. It speaks HTTP/1.1 on both
sides (h11): every request on a connection, keep-alive and pipelined ones too, is parsed and
checked before it is written to the device, and every answer is parsed on its way back.

- auth_gate: each request carries the appliance's own credentials (HTTP Basic), which never
  reach the device (X-Device-Authorization reaches it as Authorization); failures per source
  lock the source out (gate-login-failures, then the drop set), as before.
- api_filter: only the methods and paths the policy allows reach the device; anything else gets
  403, an `api-denied` alert (at most one per source, device and minute, with the count) and a
  counter, and the connection ends.
- token_guard: the device's own 401/403 answers are counted per source, however many come on
  one connection; past the threshold, a `token-brute-force` alert and the drop set.

What applies to which device is in the policy files the data path writes
(appliance/dataplane/gatepolicy.py: `<policy dir>/<device IP>.json`, read again for every
request). A missing or unusable policy fails closed: 502, nothing reaches the device. Without
--policy-dir every device gets auth_gate alone (the gate before the policy files).

Framing is the device's safety: a request with both Content-Length and Transfer-Encoding, a
transfer coding other than chunked, a bad chunk, conflicting lengths or an oversized head is
refused with 400 and the connection closed; what reaches the device is written anew by h11,
never the client's bytes as sent. After 101 Switching Protocols (WebSocket) or a CONNECT the
gate relays bytes and sees no more requests.

Counters per reason are logged on SIGUSR1 and at exit, and written to --stats-file.

With --decoy-telnet-port and/or --decoy-http-port the same process and event loop also run the
`deception` umbox's decoy (appliance/dataplane/decoy.py), which reports through --alert-command.

    python -m appliance.dataplane.gate --listen 0.0.0.0:8181 --policy-dir /run/kalki/gate \
        --credentials-file creds.json --block-command "kalki block {ip} {seconds} --reason \
        {reason} --target {target} --by gate" --alert-command "kalki raise-alert {kind} \
        --source {ip} --target {target} --details {details} --by gate"
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import shlex
import signal
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h11

from appliance.dataplane import gatepolicy
from appliance.dataplane.gatepolicy import Policy, PolicyFiles, TokenGuard
from appliance.vocab import verify_password

log = logging.getLogger("kalki.gate")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
BACKLOG = 1024  # a brute-forcer opens many connections at once
REALM = "kalki-gate"
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024
IDLE_TIMEOUT = 60.0          # a kept-open connection between requests; silence within a message
RESPONSE_HEAD_LIMIT = 64 * 1024
READ_SIZE = 64 * 1024
HEAD_READ = 4096
ALERT_INTERVAL = 60.0        # one alert per (kind, source, device) in this long, with the count
STATS_INTERVAL = 5.0

BlockCallback = Callable[[str, int], None]                    # (source, seconds)
AlertCallback = Callable[[str, str, str, dict], None]         # (kind, source, "ip:port", details)
TokenBlockCallback = Callable[[str, int, str], None]          # (source, seconds, "ip:port")


# ---------------------------------------------------------------- credentials

def hash_password(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


@dataclass(frozen=True)
class Credentials:
    user: str
    password_sha256: str

    @classmethod
    def load(cls, path: str) -> Credentials:
        with open(path) as f:
            data = json.load(f)
        return cls(str(data["user"]), str(data["password_sha256"]).lower())

    def check(self, user: str, password: str) -> bool:
        # Both comparisons always run so timing does not reveal which part was wrong.
        user_ok = hmac.compare_digest(user.encode(), self.user.encode())
        pw_ok = hmac.compare_digest(hash_password(password), self.password_sha256)
        return user_ok and pw_ok


VERIFIED_SECONDS = 300


class CredentialsFile:
    """The appliance's own credentials for auth_gate, read again whenever the file changes:
    the lab's {"user", "password_sha256"}, or the admin account the supervisor writes,
    {"user", "scrypt": {...}} (appliance.vocab.verify_password). A missing or unreadable file
    is no credentials, and every request is refused (a box not claimed yet has no admin).
    scrypt costs tens of milliseconds, so a pair that passed is remembered (its SHA-256, with
    the file's version) for VERIFIED_SECONDS; a wrong one is not, and the FailureTracker
    blocks a source after a few."""

    def __init__(self, path: str):
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._data: dict | None = None
        self._verified: dict[bytes, float] = {}

    def _load(self) -> dict | None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._data = None, None
            return None
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            self._stamp, self._verified = stamp, {}
            try:
                with open(self.path) as f:
                    data = json.load(f)
                self._data = data if isinstance(data, dict) and isinstance(data.get("user"), str) else None
            except (OSError, ValueError):
                self._data = None
            if self._data is None:
                log.error("credentials %s: not {user, password_sha256 | scrypt}", self.path)
        return self._data

    def check(self, user: str, password: str) -> bool:
        data = self._load()
        if data is None:
            return False
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        now = time.monotonic()
        if self._verified.get(key, 0) > now:
            return True
        user_ok = hmac.compare_digest(user.encode(), data["user"].encode())
        if isinstance(data.get("scrypt"), dict):
            pw_ok = verify_password(password, data["scrypt"])
        else:
            pw_ok = hmac.compare_digest(hash_password(password), str(data.get("password_sha256", "")).lower())
        if user_ok and pw_ok:
            if len(self._verified) > 64:
                self._verified = {k: t for k, t in self._verified.items() if t > now}
            self._verified[key] = now + VERIFIED_SECONDS
        return user_ok and pw_ok


def parse_basic(header_value: bytes) -> tuple[str, str] | None:
    scheme, _, value = header_value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


# ---------------------------------------------------------------- failure tracking

class FailureTracker:
    """Counts failed logins per client IP in a sliding window and blocks offenders.

    More than max_failures failures within `window` seconds blocks the IP for
    `block_seconds`; on_block(ip, block_seconds) runs at most once per window.
    """

    STALE_SWEEP_AT = 10_000  # tracked IPs before forgotten ones are swept out

    def __init__(self, max_failures: int = 5, window: float = 60.0, block_seconds: int = 300,
                 on_block: BlockCallback | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window = window
        self.block_seconds = block_seconds
        self.on_block = on_block or (lambda ip, seconds: None)
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}
        self._last_block_call: dict[str, float] = {}

    def is_blocked(self, ip: str) -> bool:
        until = self._blocked_until.get(ip)
        if until is None:
            return False
        if self.clock() >= until:
            del self._blocked_until[ip]
            return False
        return True

    def failures(self, ip: str) -> int:
        times = self._failures.get(ip)
        if not times:
            return 0
        self._expire(times, self.clock())
        return len(times)

    def record_failure(self, ip: str) -> bool:
        """Record one failure; returns True if the IP is blocked as a result."""
        now = self.clock()
        if len(self._failures) > self.STALE_SWEEP_AT:
            self._sweep(now)
        times = self._failures.setdefault(ip, deque())
        times.append(now)
        self._expire(times, now)
        if len(times) <= self.max_failures:
            return False
        self._blocked_until[ip] = now + self.block_seconds
        times.clear()  # after the block the client starts with a clean slate
        last = self._last_block_call.get(ip)
        if last is None or now - last >= self.window:
            self._last_block_call[ip] = now
            self.on_block(ip, self.block_seconds)
        return True

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()

    def _sweep(self, now: float) -> None:
        # A brute-forcer spraying from many addresses must not grow memory forever.
        for ip in list(self._failures):
            self._expire(self._failures[ip], now)
            if not self._failures[ip]:
                del self._failures[ip]
        for ip, last in list(self._last_block_call.items()):
            if now - last >= self.window:
                del self._last_block_call[ip]


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def command_runner(template: str, what: str = "block") -> Callable[..., None]:
    """A function running a shell-free command made from `template`, its placeholders
    ({ip}, {seconds}, {reason}, {target}, {kind}, {details}) replaced by keyword arguments;
    each argument stays one argv element whatever it holds."""
    argv_template = shlex.split(template)
    running: set[asyncio.Task] = set()  # keep references so tasks are not garbage collected

    async def run(argv: list[str]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(*argv)
            rc = await proc.wait()
        except OSError as exc:
            log.error("%s command %s failed: %s", what, argv, exc)
            return
        (log.info if rc == 0 else log.error)("%s command %s exited %d", what, argv, rc)

    def start(**values: object) -> None:
        # one pass, so a value holding "{ip}" (a request path in {details}) stays as it is
        argv = [_PLACEHOLDER.sub(lambda m: str(values[m[1]]) if m[1] in values else m[0], arg)
                for arg in argv_template]
        task = asyncio.get_running_loop().create_task(run(argv))
        running.add(task)
        task.add_done_callback(running.discard)

    return start


def command_blocker(template: str) -> BlockCallback:
    """on_block callback running a shell-free command, e.g. "kalki-block {ip} {seconds}"
    ({reason} is gate-login-failures, {target} empty: a lockout is the gate's, not a device's)."""
    start = command_runner(template)

    def on_block(ip: str, seconds: int) -> None:
        start(ip=ip, seconds=seconds, reason="gate-login-failures", target="")

    return on_block


# ---------------------------------------------------------------- HTTP bits

def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Pre-DNAT destination of a connection redirected by nftables (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(addr), port


def redirected_target(writer: asyncio.StreamWriter,
                      override: tuple[str, int] | None = None) -> tuple[str, int] | None:
    """The device a connection nftables redirected here was aimed at (SO_ORIGINAL_DST), or
    `override` (tests); None for a connection not redirected, or aimed at this port itself
    (forwarding it would loop)."""
    if override:
        return override
    try:
        target = original_destination(writer.get_extra_info("socket"))
    except OSError:
        return None
    if target == writer.get_extra_info("sockname")[:2]:
        return None
    return target


def simple_response(status: int, reason: str, extra_headers: tuple[str, ...] = ()) -> bytes:
    body = f"{status} {reason}\n".encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/plain",
            f"Content-Length: {len(body)}", "Connection: close", *extra_headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


UNAUTHORIZED = simple_response(401, "Unauthorized", (f'WWW-Authenticate: Basic realm="{REALM}"',))
FORBIDDEN = simple_response(403, "Forbidden")


def device_headers(items, auth: bool, drop_expect: bool = False) -> list[tuple[bytes, bytes]]:
    """A request's headers ((name, value) pairs as sent) for the device. With auth_gate the
    gate's credentials go (all Authorization headers, so the gate password never reaches the
    device) and X-Device-Authorization, if any, becomes Authorization, the device's own. Expect
    goes when the gate has answered 100 Continue itself."""
    out = []
    for name, value in items:
        low = name.lower()
        if auth and low == b"authorization":
            continue
        if auth and low == b"x-device-authorization":
            name = b"Authorization"
        if drop_expect and low == b"expect":
            continue
        out.append((name, value))
    return out


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        # Half-close so the far side sees EOF and can finish its answer.
        try:
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass


async def relay(client_r, client_w, device_r, device_w) -> None:
    upstream = asyncio.create_task(pipe(client_r, device_w))
    downstream = asyncio.create_task(pipe(device_r, client_w))
    try:
        # The device closing ends the exchange; the client closing only
        # half-closes towards the device, which then finishes its reply.
        await downstream
    finally:
        upstream.cancel()
        downstream.cancel()
        device_w.close()


class _Side:
    """One end of the relay: its stream and h11's state of HTTP/1.1 on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, role, head_limit: int):
        self.reader, self.writer = reader, writer
        # h11 refuses an incomplete head over its limit; heads are read HEAD_READ bytes at a
        # time, so a complete one is never longer than head_limit either
        self.h11 = h11.Connection(role, max_incomplete_event_size=head_limit - HEAD_READ)
        self._head_state = h11.IDLE if role is h11.SERVER else h11.SEND_RESPONSE

    async def next_event(self, timeout: float):
        """The next event (h11.RemoteProtocolError if the peer breaks HTTP/1.1; TimeoutError if
        it does not come within `timeout` seconds)."""
        async with asyncio.timeout(timeout):
            while True:
                event = self.h11.next_event()
                if event is not h11.NEED_DATA:
                    return event
                head = self.h11.their_state is self._head_state
                self.h11.receive_data(await self.reader.read(HEAD_READ if head else READ_SIZE))

    async def send(self, event, timeout: float) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)
            async with asyncio.timeout(timeout):
                await self.writer.drain()

    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE


class _Refused(Exception):
    """A request the gate answers itself and ends the connection with."""

    def __init__(self, response: bytes, stat: str, message: str, level: int = logging.WARNING):
        super().__init__(message)
        self.response, self.stat, self.level = response, stat, level


def _header(headers, name: bytes) -> bytes | None:
    return next((v for n, v in headers if n == name), None)


# ---------------------------------------------------------------- the gate

class Gate:
    """One gate for every gated device. `policies` (the data path's policy files) says per
    device what applies; without it every device gets auth_gate alone. `on_alert(kind, source,
    target, details)` reports api-denied (and a report-only token_guard's token-brute-force);
    `on_token_block(source, seconds, target)` puts a token guesser in the drop set."""

    def __init__(self, credentials: Credentials | CredentialsFile | None, tracker: FailureTracker,
                 target_override: tuple[str, int] | None = None,
                 head_timeout: float = HEAD_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT,
                 *, policies: PolicyFiles | None = None, on_alert: AlertCallback | None = None,
                 on_token_block: TokenBlockCallback | None = None,
                 idle_timeout: float = IDLE_TIMEOUT, clock: Callable[[], float] = time.monotonic):
        self.credentials = credentials
        self.tracker = tracker
        self.target_override = target_override
        self.head_timeout = head_timeout
        self.connect_timeout = connect_timeout
        self.policies = policies
        self.on_alert = on_alert or (lambda kind, ip, target, details: None)
        self.on_token_block = on_token_block or (lambda ip, seconds, target: None)
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.stats: Counter[str] = Counter()     # per outcome: allowed, api-denied, ...
        self._token_trackers: dict[str, FailureTracker] = {}    # per device address
        self._alerted: dict[tuple[str, str, str], tuple[float, int]] = {}

    def target_for(self, writer: asyncio.StreamWriter) -> tuple[str, int] | None:
        return redirected_target(writer, self.target_override)

    def policy_for(self, target: tuple[str, int]) -> tuple[Policy | None, str]:
        if self.policies is None:
            return Policy(target[1], auth=True), ""
        return self.policies.load(*target)

    def token_tracker(self, target: tuple[str, int], guard: TokenGuard) -> FailureTracker:
        tracker = self._token_trackers.get(target[0])
        if tracker is None:
            where = f"{target[0]}:{target[1]}"
            tracker = FailureTracker(on_block=lambda ip, seconds: self._token_blocked(ip, seconds, where),
                                     clock=self.clock)
            self._token_trackers[target[0]] = tracker
        # the policy file may have changed since: its parameters, the counts kept
        tracker.max_failures, tracker.window = guard.max_failures, guard.window_ms / 1000
        tracker.block_seconds = guard.block_seconds
        return tracker

    def _token_blocked(self, ip: str, seconds: int, where: str) -> None:
        self.stats["token-brute-force"] += 1
        log.warning("token-brute-force client=%s target=%s: %s", ip, where,
                    f"dropped for {seconds} s" if seconds else "reported only")
        self.on_token_block(ip, seconds, where)

    def alert(self, kind: str, ip: str, where: str, details: dict) -> None:
        """on_alert, at most once per (kind, source, device) in ALERT_INTERVAL; the next one
        counts the ones left out."""
        now = self.clock()
        key = (kind, ip, where)
        last, left_out = self._alerted.get(key, (None, 0))
        if last is not None and now - last < ALERT_INTERVAL:
            self._alerted[key] = (last, left_out + 1)
            return
        if len(self._alerted) > FailureTracker.STALE_SWEEP_AT:
            self._alerted = {k: v for k, v in self._alerted.items() if now - v[0] < ALERT_INTERVAL}
        self._alerted[key] = (now, 0)
        self.on_alert(kind, ip, where, {**details, "count": left_out + 1})

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip = writer.get_extra_info("peername")[0]
        try:
            await self._handle(ip, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("closed %s: client or device went away", ip)
        except TimeoutError:
            log.info("closed %s: timed out", ip)
        except h11.LocalProtocolError as exc:
            log.warning("closed %s: could not pass a message on: %s", ip, exc)
        except Exception:
            log.exception("gate handler failed for %s", ip)
        finally:
            writer.close()

    async def _handle(self, ip: str, reader, writer) -> None:
        target = self.target_for(writer)
        where = f"{target[0]}:{target[1]}" if target else "?"
        if self.tracker.is_blocked(ip):
            self.stats["blocked"] += 1
            log.warning("blocked client=%s target=%s (still blocked)", ip, where)
            return await self._answer(reader, writer, FORBIDDEN)
        if target is None:
            self.stats["no-destination"] += 1
            log.warning("denied client=%s target=? reason=no original destination", ip)
            return await self._answer(reader, writer, simple_response(502, "Bad Gateway"))
        client = _Side(reader, writer, h11.SERVER, HEAD_LIMIT)
        device: _Side | None = None
        try:
            first = True
            while True:
                try:
                    request = await self._next_request(client, first)
                    if request is None:
                        return
                    first = False
                    policy = self._check(ip, target, where, request)
                    if device is None or device.reader.at_eof():
                        if device is not None:
                            device.writer.close()
                        device = await self._connect(target)
                    log.info("allowed client=%s target=%s %s %s", ip, where,
                             request.method.decode(), request.target.decode("ascii", "replace")[:200])
                    self.stats["allowed"] += 1
                    if not await self._exchange(ip, target, where, policy, request, client, device):
                        return
                except _Refused as r:
                    self.stats[r.stat] += 1
                    log.log(r.level, "denied client=%s target=%s reason=%s", ip, where, r)
                    if client.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await self._answer(reader, writer, r.response)
                    return
                if not (client.reusable() and device.reusable()):
                    return
                client.h11.start_next_cycle()
                device.h11.start_next_cycle()
        finally:
            if device is not None:
                device.writer.close()

    async def _next_request(self, client: _Side, first: bool) -> h11.Request | None:
        """The next request's head; None when the client is done with the connection."""
        try:
            event = await client.next_event(self.head_timeout if first else self.idle_timeout)
        except TimeoutError:
            if first:
                raise _Refused(simple_response(408, "Request Timeout"), "head-timeout",
                               "head timeout") from None
            return None      # a kept-open connection nobody uses any more (or a slow head)
        except h11.RemoteProtocolError as exc:
            raise _Refused(simple_response(400, "Bad Request"), "bad-request",
                           f"malformed request: {exc}") from None
        return event if isinstance(event, h11.Request) else None

    def _check(self, ip: str, target: tuple[str, int], where: str, request: h11.Request) -> Policy:
        """The device's policy if the request may pass; raises _Refused if not."""
        headers = request.headers
        if (_header(headers, b"transfer-encoding") is not None
                and _header(headers, b"content-length") is not None):
            raise _Refused(simple_response(400, "Bad Request"), "bad-request",
                           "both Content-Length and Transfer-Encoding (request smuggling?)")
        if self.tracker.is_blocked(ip):
            raise _Refused(FORBIDDEN, "blocked", "still blocked")
        policy, why = self.policy_for(target)
        if policy is not None and not policy.gated:     # (PolicyFiles.load says so too)
            policy, why = None, f"the policy for {where} has no gate umbox"
        if policy is None:
            raise _Refused(simple_response(502, "Bad Gateway"), "no-policy", why, logging.ERROR)
        if policy.token_guard and self.token_tracker(target, policy.token_guard).is_blocked(ip):
            raise _Refused(FORBIDDEN, "blocked", "still blocked (token guessing)")
        if policy.auth:
            if self.credentials is None:
                raise _Refused(simple_response(502, "Bad Gateway"), "no-policy",
                               "auth_gate without --credentials-file", logging.ERROR)
            creds = parse_basic(_header(headers, b"authorization") or b"")
            if creds is None or not self.credentials.check(*creds):
                reason = "no credentials" if creds is None else f"wrong credentials user={creds[0]!r}"
                if self.tracker.record_failure(ip):
                    raise _Refused(FORBIDDEN, "auth-blocked", f"{reason}, too many failures")
                raise _Refused(UNAUTHORIZED, "auth-failed", reason)
        method = request.method.decode("ascii", "replace")
        try:
            path = gatepolicy.request_path(request.target.decode("ascii"))
        except UnicodeDecodeError:
            path = None
        if not policy.allows(method, path):
            shown = request.target.decode("ascii", "replace")[:200]
            self.alert("api-denied", ip, where, {"method": method[:16], "path": shown,
                                                 "device": policy.device})
            raise _Refused(FORBIDDEN, "api-denied", f"api_filter: {method[:16]} {shown} is not allowed")
        return policy

    async def _connect(self, target: tuple[str, int]) -> _Side:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*target), self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise _Refused(simple_response(502, "Bad Gateway"), "device-unreachable",
                           f"device unreachable: {exc}") from None
        return _Side(reader, writer, h11.CLIENT, RESPONSE_HEAD_LIMIT)

    async def _exchange(self, ip: str, target: tuple[str, int], where: str, policy: Policy,
                        request: h11.Request, client: _Side, device: _Side) -> bool:
        """Passes one allowed request to the device and its answer back; False when the
        connection is to end."""
        t = self.idle_timeout
        expect = client.h11.they_are_waiting_for_100_continue
        headers = device_headers(request.headers.raw_items(), policy.auth, drop_expect=expect)
        if _header(request.headers, b"host") is None:     # HTTP/1.0; the device gets HTTP/1.1
            headers.append((b"Host", f"{target[0]}:{target[1]}".encode()))
        await device.send(h11.Request(method=request.method, target=request.target, headers=headers), t)
        if expect:
            await client.send(h11.InformationalResponse(status_code=100, headers=[]), t)
        device_gone = False
        while True:     # the request's body, checked for framing by h11 as it comes
            try:
                event = await client.next_event(t)
            except h11.RemoteProtocolError as exc:
                raise _Refused(simple_response(400, "Bad Request"), "bad-request",
                               f"malformed request body: {exc}") from None
            except TimeoutError:
                raise _Refused(simple_response(408, "Request Timeout"), "body-timeout",
                               "request body timeout") from None
            if not isinstance(event, (h11.Data, h11.EndOfMessage)):
                return False     # the client went away in the middle of its request
            if not device_gone:
                try:
                    await device.send(event, t)
                except (ConnectionError, OSError):
                    device_gone = True    # it may have answered early: read what it said
            if isinstance(event, h11.EndOfMessage):
                break
        return await self._answer_back(ip, target, where, policy, client, device)

    async def _answer_back(self, ip: str, target: tuple[str, int], where: str, policy: Policy,
                           client: _Side, device: _Side) -> bool:
        t = self.idle_timeout
        started = False
        guard = policy.token_guard
        scan = bytearray() if guard is not None and guard.failure_text else None
        while True:
            try:
                event = await device.next_event(t)
            except (h11.RemoteProtocolError, TimeoutError, ConnectionError) as exc:
                if started:
                    log.warning("closed client=%s target=%s: the device's answer broke off: %s",
                                ip, where, exc or type(exc).__name__)
                    return False
                status = (504, "Gateway Timeout") if isinstance(exc, TimeoutError) else (502, "Bad Gateway")
                raise _Refused(simple_response(*status), "device-error",
                               f"no answer from the device: {exc or type(exc).__name__}") from None
            if isinstance(event, h11.ConnectionClosed):
                if started:
                    return False
                raise _Refused(simple_response(502, "Bad Gateway"), "device-error",
                               "the device closed without answering")
            if isinstance(event, h11.InformationalResponse):
                await client.send(h11.InformationalResponse(status_code=event.status_code,
                                                            headers=event.headers.raw_items(),
                                                            reason=event.reason), t)
            elif isinstance(event, h11.Response):
                started = True
                if self._count_answer(ip, target, policy, event.status_code):
                    scan = None     # counted once
                await client.send(h11.Response(status_code=event.status_code,
                                               headers=event.headers.raw_items(), reason=event.reason), t)
            elif isinstance(event, h11.Data):
                if scan is not None and guard is not None:
                    scan += bytes(event.data)[:gatepolicy.FAILURE_SCAN_BYTES - len(scan)]
                    if guard.failure_text in scan:
                        scan = None
                        self._count_failure(ip, target, guard)
                    elif len(scan) >= gatepolicy.FAILURE_SCAN_BYTES:
                        scan = None
                await client.send(event, t)
            elif isinstance(event, h11.EndOfMessage):
                if event.headers and client.h11.their_http_version != b"1.1":
                    event = h11.EndOfMessage()    # trailers, which only chunked framing carries
                await client.send(event, t)
            if device.h11.their_state is h11.SWITCHED_PROTOCOL:
                return await self._switched(client, device)
            if isinstance(event, h11.EndOfMessage):
                return True

    async def _switched(self, client: _Side, device: _Side) -> bool:
        """After 101 Switching Protocols (or a CONNECT's 2xx): bytes both ways, unparsed."""
        to_device, _ = client.h11.trailing_data
        to_client, _ = device.h11.trailing_data
        if to_device:
            device.writer.write(bytes(to_device))
        if to_client:
            client.writer.write(bytes(to_client))
        await relay(client.reader, client.writer, device.reader, device.writer)
        return False

    def _count_answer(self, ip: str, target: tuple[str, int], policy: Policy, status: int) -> bool:
        """Counts a failed answer by its status; whether it did."""
        guard = policy.token_guard
        if guard is None or status not in guard.statuses:
            return False
        self._count_failure(ip, target, guard)
        return True

    def _count_failure(self, ip: str, target: tuple[str, int], guard: TokenGuard) -> None:
        self.stats["token-failures"] += 1
        self.token_tracker(target, guard).record_failure(ip)

    @staticmethod
    async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      response: bytes) -> None:
        writer.write(response)
        await writer.drain()
        # Lingering close: closing with unread request bytes makes the kernel
        # send a RST, which can destroy the answer before the client reads it.
        writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(LINGER_SECONDS):
                drained = 0
                while drained < LINGER_BYTES and (data := await reader.read(4096)):
                    drained += len(data)


async def serve(gate: Gate, host: str = "0.0.0.0", port: int = 8181) -> asyncio.Server:
    return await asyncio.start_server(gate.handle, host, port, limit=HEAD_LIMIT, backlog=BACKLOG)


def host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def tcp_port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value!r}")
    return int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=host_port, default=("0.0.0.0", 8181))
    p.add_argument("--policy-dir", help="the data path's policy files, one per gated device "
                   "(appliance/dataplane/gatepolicy.py); without it every device gets auth_gate")
    p.add_argument("--credentials-file", help="the appliance's gate credentials (auth_gate)")
    p.add_argument("--max-failures", type=int, default=5)
    p.add_argument("--failure-window", type=float, default=60.0)
    p.add_argument("--block-seconds", type=int, default=300)
    p.add_argument("--block-command", help="argv template run to put a source in the drop set: "
                   "{ip} {seconds} {reason} (gate-login-failures, token-brute-force) {target}, "
                   'e.g. "kalki block {ip} {seconds} --reason {reason} --target {target} --by gate"')
    p.add_argument("--alert-command", help="argv template run to report: {kind} (api-denied, or "
                   "token-brute-force without a block) {ip} {target} {details} (JSON), e.g. "
                   '"kalki raise-alert {kind} --source {ip} --target {target} --details {details} '
                   '--by gate"')
    p.add_argument("--stats-file", help="counters per outcome, JSON, rewritten every few seconds")
    p.add_argument("--decoy-telnet-port", type=tcp_port, help="the deception umbox's telnet decoy "
                   "(appliance/dataplane/decoy.py) on this port of --listen's address; off without it")
    p.add_argument("--decoy-http-port", type=tcp_port, help="the deception umbox's HTTP decoy on this "
                   "port of --listen's address; off without it. The decoy reports through "
                   "--alert-command ({kind} deception)")
    p.add_argument("--target-override", type=host_port)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if not args.policy_dir and not args.credentials_file:
        p.error("--credentials-file is needed without --policy-dir (every device gets auth_gate)")
    return args


def reporters(block_command: str | None, alert_command: str | None
              ) -> tuple[AlertCallback | None, TokenBlockCallback | None]:
    """(on_alert, on_token_block) running the commands. A token guesser goes to the drop set
    through the block command (which raises the alert); with block_seconds 0, or without a block
    command, token-brute-force is an alert only."""
    block = command_runner(block_command) if block_command else None
    alert = command_runner(alert_command, "alert") if alert_command else None

    def on_alert(kind: str, ip: str, target: str, details: dict) -> None:
        if alert:
            alert(kind=kind, ip=ip, target=target.rpartition(":")[0],
                  details=json.dumps(details, sort_keys=True))

    def on_token_block(ip: str, seconds: int, target: str) -> None:
        if block and seconds:
            block(ip=ip, seconds=seconds, reason="token-brute-force", target=target.rpartition(":")[0])
        else:
            on_alert("token-brute-force", ip, target, {"seconds": seconds})

    return on_alert, on_token_block


async def write_stats(gate: Gate, path: str) -> None:
    last = None
    while True:
        text = json.dumps(dict(gate.stats), sort_keys=True)
        if text != last:
            tmp = f"{path}.tmp"
            try:
                Path(tmp).write_text(text)
                os.replace(tmp, path)
                last = text
            except OSError as e:
                log.error("stats file %s: %s", path, e)
        await asyncio.sleep(STATS_INTERVAL)


async def run(args: argparse.Namespace, stop: asyncio.Event | None = None) -> None:
    """The gate (and the decoy, when asked) until SIGTERM or SIGINT, or until `stop` is set
    (then no signal handlers)."""
    on_block = command_blocker(args.block_command) if args.block_command else None
    on_alert, on_token_block = reporters(args.block_command, args.alert_command)
    tracker = FailureTracker(args.max_failures, args.failure_window, args.block_seconds, on_block)
    credentials = CredentialsFile(args.credentials_file) if args.credentials_file else None
    policies = PolicyFiles(args.policy_dir) if args.policy_dir else None
    gate = Gate(credentials, tracker, args.target_override, policies=policies,
                on_alert=on_alert, on_token_block=on_token_block)
    server = await serve(gate, *args.listen)
    log.info("gate listening on %s:%d", *args.listen)
    decoy = None
    decoy_servers: dict[str, asyncio.Server] = {}
    if args.decoy_telnet_port or args.decoy_http_port:
        from appliance.dataplane import decoy as decoy_mod  # (here: it imports this module)
        decoy = decoy_mod.Decoy(policies, on_alert, gate.stats, target_override=args.target_override)
        decoy_servers = await decoy_mod.serve(decoy, args.listen[0], args.decoy_telnet_port,
                                              args.decoy_http_port)
        for name, decoy_server in decoy_servers.items():
            log.info("decoy (%s) listening on %s:%d", name, *decoy_server.sockets[0].getsockname()[:2])
    stats_task = asyncio.create_task(write_stats(gate, args.stats_file)) if args.stats_file else None

    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("stats %s", dict(gate.stats)))
    await stop.wait()
    for decoy_server in decoy_servers.values():
        decoy_server.close()
    if decoy is not None:
        await decoy.aclose()        # each open session reports what it has
    log.info("stats %s", dict(gate.stats))
    if stats_task:
        stats_task.cancel()
    server.close()
    # Newer Pythons wait for open relays here; do not let one hold up shutdown.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 2.0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
