"""Authentication gate: a user-space umbox in front of a device's web port.

nftables DNATs connections aimed at a protected device to this gate.  The gate
asks for the appliance's own credentials (HTTP Basic) before it opens a
connection to the device's original address and relays bytes both ways, so a
device with default credentials is not reachable by anyone who merely knows them.

    python -m appliance.dataplane.gate --listen 0.0.0.0:8181 --credentials-file creds.json
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
import shlex
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("kalki.gate")

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
BACKLOG = 1024  # a brute-forcer opens many connections at once
REALM = "kalki-gate"
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024

BlockCallback = Callable[[str, int], None]


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


def command_blocker(template: str) -> BlockCallback:
    """on_block callback running a shell-free command, e.g. "kalki-block {ip} {seconds}"."""
    argv_template = shlex.split(template)
    running: set[asyncio.Task] = set()  # keep references so tasks are not garbage collected

    async def run(argv: list[str]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(*argv)
            rc = await proc.wait()
        except OSError as exc:
            log.error("block command %s failed: %s", argv, exc)
            return
        (log.info if rc == 0 else log.error)("block command %s exited %d", argv, rc)

    def on_block(ip: str, seconds: int) -> None:
        argv = [a.replace("{ip}", ip).replace("{seconds}", str(seconds)) for a in argv_template]
        task = asyncio.get_running_loop().create_task(run(argv))
        running.add(task)
        task.add_done_callback(running.discard)

    return on_block


# ---------------------------------------------------------------- HTTP bits

def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Pre-DNAT destination of a connection redirected by nftables (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(addr), port


def simple_response(status: int, reason: str, extra_headers: tuple[str, ...] = ()) -> bytes:
    body = f"{status} {reason}\n".encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/plain",
            f"Content-Length: {len(body)}", "Connection: close", *extra_headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


UNAUTHORIZED = simple_response(401, "Unauthorized", (f'WWW-Authenticate: Basic realm="{REALM}"',))
FORBIDDEN = simple_response(403, "Forbidden")


def header_name(line: bytes) -> bytes:
    return line.split(b":", 1)[0].strip().lower()


def device_head(lines: list[bytes]) -> bytes:
    """Request head for the device: gate credentials removed, X-Device-Authorization
    (if any) renamed to Authorization so the device sees its own credentials."""
    out = [lines[0]]
    for line in lines[1:]:
        name = header_name(line)
        if name == b"authorization":
            continue  # all of them, so the gate password never reaches the device
        if name == b"x-device-authorization":
            line = b"Authorization:" + line.split(b":", 1)[1]
        out.append(line)
    return b"\r\n".join(out) + b"\r\n\r\n"


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


# ---------------------------------------------------------------- the gate

class Gate:
    def __init__(self, credentials: Credentials, tracker: FailureTracker,
                 target_override: tuple[str, int] | None = None,
                 head_timeout: float = HEAD_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT):
        self.credentials = credentials
        self.tracker = tracker
        self.target_override = target_override
        self.head_timeout = head_timeout
        self.connect_timeout = connect_timeout

    def target_for(self, writer: asyncio.StreamWriter) -> tuple[str, int] | None:
        if self.target_override:
            return self.target_override
        try:
            target = original_destination(writer.get_extra_info("socket"))
        except OSError:
            return None  # not a DNATed connection
        if target == writer.get_extra_info("sockname")[:2]:
            return None  # aimed at the gate itself: forwarding would loop
        return target

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ip = writer.get_extra_info("peername")[0]
        try:
            await self._handle(ip, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("closed %s: client went away", ip)
        except Exception:
            log.exception("gate handler failed for %s", ip)
        finally:
            writer.close()

    async def _handle(self, ip: str, reader, writer) -> None:
        target = self.target_for(writer)
        where = f"{target[0]}:{target[1]}" if target else "?"
        if self.tracker.is_blocked(ip):
            log.warning("blocked client=%s target=%s (still blocked)", ip, where)
            return await self._answer(reader, writer, FORBIDDEN)
        if target is None:
            log.warning("denied client=%s target=? reason=no original destination", ip)
            return await self._answer(reader, writer, simple_response(502, "Bad Gateway"))

        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.head_timeout)
        except asyncio.LimitOverrunError:
            log.warning("denied client=%s target=%s reason=head too large", ip, where)
            return await self._answer(reader, writer, simple_response(400, "Request Header Too Large"))
        except TimeoutError:
            log.warning("denied client=%s target=%s reason=head timeout", ip, where)
            return await self._answer(reader, writer, simple_response(408, "Request Timeout"))

        lines = head[:-4].split(b"\r\n")
        auth = next((h.split(b":", 1)[1] for h in lines[1:] if header_name(h) == b"authorization"), b"")
        creds = parse_basic(auth)
        if creds is None or not self.credentials.check(*creds):
            reason = "no credentials" if creds is None else f"wrong credentials user={creds[0]!r}"
            if self.tracker.record_failure(ip):
                log.warning("blocked client=%s target=%s reason=%s, too many failures", ip, where, reason)
                return await self._answer(reader, writer, FORBIDDEN)
            log.warning("denied client=%s target=%s reason=%s", ip, where, reason)
            return await self._answer(reader, writer, UNAUTHORIZED)

        try:
            device_r, device_w = await asyncio.wait_for(
                asyncio.open_connection(*target), self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            log.warning("denied client=%s target=%s reason=device unreachable: %s", ip, where, exc)
            return await self._answer(reader, writer, simple_response(502, "Bad Gateway"))
        log.info("allowed client=%s target=%s user=%s", ip, where, creds[0])
        # Only the first request is checked: later keep-alive requests on this
        # connection belong to the client that already authenticated.
        device_w.write(device_head(lines))
        await relay(reader, writer, device_r, device_w)

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=host_port, default=("0.0.0.0", 8181))
    p.add_argument("--credentials-file", required=True)
    p.add_argument("--max-failures", type=int, default=5)
    p.add_argument("--failure-window", type=float, default=60.0)
    p.add_argument("--block-seconds", type=int, default=300)
    p.add_argument("--block-command", help='argv template, e.g. "kalki-block {ip} {seconds}"')
    p.add_argument("--target-override", type=host_port)
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    on_block = command_blocker(args.block_command) if args.block_command else None
    tracker = FailureTracker(args.max_failures, args.failure_window, args.block_seconds, on_block)
    gate = Gate(Credentials.load(args.credentials_file), tracker, args.target_override)
    server = await serve(gate, *args.listen)
    log.info("gate listening on %s:%d", *args.listen)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
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
