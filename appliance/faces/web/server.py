"""Serving the page: Microdot's parser fed under a byte and time budget per request, caps on
open connections (in all and per client address, counted from accept to close, TLS handshake
included), TLS with a certificate made at first start, and the listening socket (in a network
namespace for the lab)."""
from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import os
import socket
import ssl
from pathlib import Path

from appliance import netns
from appliance.faces.web.http import MAX_BODY, Page, address_of

log = logging.getLogger("kalki.web")
MAX_HEAD = 32 * 1024           # the request line and the headers together
REQUEST_SECONDS = 10.0         # to send the head and the body
WRITE_SECONDS = 30.0           # for a client to take each piece of the answer
MAX_CONNECTIONS = 64           # open at once; more are closed at once (live pages hold one each)
# Open at once from one client address; more from it are closed at once, so that one client
# (a slow loris holds each connection up to REQUEST_SECONDS, a live page for as long as it is
# open) cannot take every connection: it takes at most a quarter, and others are still served.
# A browser opens at most 6 connections to a host (a live page's stream among them), so this
# is two browsers and a script behind one address. Must stay below MAX_CONNECTIONS.
MAX_PER_SOURCE = 16
REFUSAL_LOG_SECONDS = 10.0     # refused connections are logged at most this often
CLOSE_SECONDS = 1.0            # for a client to take the end of the answer (TLS: close_notify)


# -- serving -----------------------------------------------------------------------------

class _Reader:
    """A connection's incoming bytes for Microdot's parser, which reads the head by lines and
    the body by length: at most MAX_HEAD bytes of head and MAX_BODY of body, all within
    REQUEST_SECONDS. A client that sends too much or never finishes gets a 400."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._head_left, self._body_left = MAX_HEAD, MAX_BODY
        self._deadline = asyncio.get_running_loop().time() + REQUEST_SECONDS
        self._expects_continue = False

    async def _within_time(self, coro):
        remaining = self._deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            coro.close()
            raise TimeoutError("the request took too long")
        return await asyncio.wait_for(coro, remaining)

    async def readline(self):
        line = await self._within_time(self._reader.readline())
        self._head_left -= len(line)
        if self._head_left < 0:
            raise ValueError(f"the request's head is over {MAX_HEAD} bytes")
        if line[:7].lower() == b"expect:" and b"100-continue" in line.lower():
            self._expects_continue = True
        return line

    async def _continue(self) -> None:
        """curl sends `Expect: 100-continue` with a body over 1 KiB and waits a second for
        this before sending it; Microdot does not say it. Said when the body is read, so a body
        refused unread (413) is never sent."""
        if self._expects_continue:
            self._expects_continue = False
            self._writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await self._within_time(self._writer.drain())

    async def readexactly(self, n):
        if n > self._body_left:
            raise ValueError(f"the request's body is over {MAX_BODY} bytes")
        await self._continue()
        data = await self._within_time(self._reader.readexactly(n))
        self._body_left -= len(data)
        return data

    async def discard(self, seconds: float = 1.0) -> None:
        """Reads and drops what the client still sends, for a while."""
        left = 2 * MAX_BODY
        try:
            async with asyncio.timeout(seconds):
                while left > 0 and (data := await self._reader.read(min(left, 65536))):
                    left -= len(data)
        except (TimeoutError, OSError):
            pass

    async def read(self, n=-1):
        n = self._body_left if n < 0 else min(n, self._body_left)
        await self._continue()
        data = await self._within_time(self._reader.read(n))
        self._body_left -= len(data)
        return data


class _Writer:
    """What Microdot writes to, with a time limit on each piece."""

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer = writer

    def get_extra_info(self, name, default=None):
        return self._writer.get_extra_info(name, default)

    async def awrite(self, data: bytes) -> None:
        self._writer.write(data)
        await asyncio.wait_for(self._writer.drain(), WRITE_SECONDS)

    async def aclose(self) -> None:
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_SECONDS)
        except (TimeoutError, OSError):
            pass


class WebServer:
    """A listening page: `addresses` [(host, port)], `await cleanup()` closes it and every
    open connection (live pages included)."""

    def __init__(self, app: Page, sock: socket.socket, ssl_context: ssl.SSLContext | None):
        self.app = app
        self._sock = sock
        self._ssl = ssl_context
        self._accepting: asyncio.Task | None = None
        self._unstarted: dict[asyncio.Task, socket.socket] = {}
        self._open: set[asyncio.Task] = set()
        self._per_source: dict[str, int] = {}      # open connections by client address
        self._refused, self._refusal_logged = 0, float("-inf")
        self.addresses = [sock.getsockname()[:2]]

    def open_count(self, source: str | None = None) -> int:
        """Connections open now: all of them, or those from one client address."""
        return len(self._open) if source is None else self._per_source.get(source, 0)

    def _refusal(self, source: str) -> str | None:
        """Why a new connection from `source` is closed at once, or None to serve it."""
        if len(self._open) >= MAX_CONNECTIONS:
            return f"{len(self._open)} connections open"
        if self._per_source.get(source, 0) >= MAX_PER_SOURCE:
            return f"{self._per_source[source]} connections open from {source}"
        return None

    def _log_refusal(self, why: str, peer) -> None:
        """A flood of connections is a flood of refusals: logged once in a while, with a count."""
        self._refused += 1
        now = asyncio.get_running_loop().time()
        if now - self._refusal_logged >= REFUSAL_LOG_SECONDS:
            log.warning("web: %s; closing a connection from %s (%d closed since the last "
                        "such message)", why, peer, self._refused)
            self._refused, self._refusal_logged = 0, now

    async def start(self) -> WebServer:
        self._accepting = asyncio.get_running_loop().create_task(self._accept())
        return self

    async def _accept(self) -> None:
        """Takes each new connection and counts it before anything else is done with it, its
        TLS handshake included: asyncio's start_server hands a connection over only after the
        handshake, so a client that never sent its hello would hold a file descriptor that no
        cap counted (1024 of them, systemd's default, and the supervisor can open no file)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self._sock)
            except ConnectionAbortedError:  # the client gave up before it was taken
                continue
            except OSError as e:            # out of file descriptors, say: again in a while
                self._log_refusal(f"cannot accept a connection ({e})", "?")
                await asyncio.sleep(1.0)
                continue
            source = address_of(peer)
            why = self._refusal(source)
            if why:
                self._log_refusal(why, peer)
                conn.close()
                continue
            task = loop.create_task(self._serve(conn, peer))
            # counted here and given back by _release, whichever way the connection ends
            self._open.add(task)
            self._per_source[source] = self._per_source.get(source, 0) + 1
            self._unstarted[task] = conn
            task.add_done_callback(functools.partial(self._release, source))

    def _release(self, source: str, task: asyncio.Task) -> None:
        self._open.discard(task)
        left = self._per_source.pop(source) - 1
        if left:
            self._per_source[source] = left
        conn = self._unstarted.pop(task, None)      # cancelled before it began (cleanup)
        if conn is not None:
            conn.close()
        if not task.cancelled() and task.exception() is not None:
            log.error("web: serving a connection from %s failed", source, exc_info=task.exception())

    async def _serve(self, conn: socket.socket, peer) -> None:
        task = asyncio.current_task()
        assert task is not None, "each connection is served in a task of its own (_accept)"
        self._unstarted.pop(task, None)         # begun: the transport below closes it now
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        # asyncio would wait 30 s for a TLS client's close_notify, the connection uncounted
        # by then: a client that never sends it would hold file descriptors all the same.
        try:
            if self._ssl:
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, conn, ssl=self._ssl, ssl_handshake_timeout=REQUEST_SECONDS,
                    ssl_shutdown_timeout=CLOSE_SECONDS)
            else:
                transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
        except OSError as e:                # the TLS handshake failed or took too long
            log.debug("web: connection from %s ended in the TLS handshake: %s", peer, e)
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            await self.app.handle_request(_Reader(reader, writer), _Writer(writer))
        except (TimeoutError, OSError) as e:    # the client went away or stopped reading
            log.debug("web: connection from %s ended: %s", peer, e)
        except asyncio.CancelledError:
            pass
        finally:
            # The answer had CLOSE_SECONDS to be taken (_Writer.aclose): a client that has not
            # taken it is cut off now, so that the connection ends with its slot; with TLS,
            # ssl_shutdown_timeout does it (Python 3.11's TLS transport cannot be aborted once
            # closed, by us or by the client).
            if self._ssl is None:
                transport.abort()
            elif not transport.is_closing():
                transport.close()

    async def cleanup(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.wait([self._accepting])
            self._accepting = None
        for task in list(self._open):
            task.cancel()
        if self._open:
            await asyncio.wait(list(self._open), timeout=1.0)
        self._sock.close()


async def serve(app: Page, sock: socket.socket, ssl_context: ssl.SSLContext | None = None) -> WebServer:
    return await WebServer(app, sock, ssl_context).start()


def listening_socket(host: str, port: int, netns_path: str = "") -> socket.socket:
    """A bound, listening TCP socket; with netns_path, made inside that network namespace
    (the lab's supervisor runs in the gateway's namespace, the page is for the host)."""
    with netns.entered(netns_path or None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock


def ensure_certificate(tls_dir: str | Path, hostname: str = "kalki.local") -> tuple[Path, Path]:
    """A self-signed certificate made at first start (the cryptography package); kept."""
    d = Path(tls_dir)
    cert, key = d / "cert.pem", d / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    pk = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pk.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=3650))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname),
                                                     x509.DNSName("localhost")]), critical=False)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .sign(pk, hashes.SHA256()))
    tmp = key.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()))
    os.replace(tmp, key)
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    return cert, key


def ssl_context(tls_dir: str | Path) -> ssl.SSLContext:
    cert, key = ensure_certificate(tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
