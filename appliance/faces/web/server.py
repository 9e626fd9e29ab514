"""Serving the page: Microdot's parser fed under a byte and time budget per request, a cap on
open connections, TLS with a certificate made at first start, and the listening socket (in a
network namespace for the lab)."""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import ssl
from pathlib import Path

from appliance import netns
from appliance.faces.web.http import MAX_BODY, Page

log = logging.getLogger("kalki.web")
MAX_HEAD = 32 * 1024           # the request line and the headers together
REQUEST_SECONDS = 10.0         # to send the head and the body
WRITE_SECONDS = 30.0           # for a client to take each piece of the answer
MAX_CONNECTIONS = 64           # open at once; more are closed at once (live pages hold one each)


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
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        except (TimeoutError, OSError):
            pass


class WebServer:
    """A listening page: `addresses` [(host, port)], `await cleanup()` closes it and every
    open connection (live pages included)."""

    def __init__(self, app: Page, sock: socket.socket, ssl_context: ssl.SSLContext | None):
        self.app = app
        self._sock = sock
        self._ssl = ssl_context
        self._server: asyncio.AbstractServer | None = None
        self._open: set[asyncio.Task] = set()
        self.addresses = [sock.getsockname()[:2]]

    async def start(self) -> WebServer:
        if self._ssl:
            self._server = await asyncio.start_server(self._serve, sock=self._sock, ssl=self._ssl,
                                                      ssl_handshake_timeout=REQUEST_SECONDS)
        else:
            self._server = await asyncio.start_server(self._serve, sock=self._sock)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= MAX_CONNECTIONS:
            log.warning("web: %d connections open; closing one from %s", len(self._open),
                        writer.get_extra_info("peername"))
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None, "asyncio.start_server serves each connection in a task"
        self._open.add(task)
        w = _Writer(writer)
        try:
            await self.app.handle_request(_Reader(reader, writer), w)
        except (TimeoutError, OSError) as e:    # the client went away or stopped reading
            log.debug("web: connection from %s ended: %s", writer.get_extra_info("peername"), e)
        except asyncio.CancelledError:
            pass
        finally:
            self._open.discard(task)
            writer.close()

    async def cleanup(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
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
