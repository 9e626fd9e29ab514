"""The operator's web page and its JSON API, served by the supervisor with Microdot.

`start_web(ops)` is called by the supervisor when [web] enabled = true. Everything behind the
page goes through the same code as the control socket (`appliance.supervisor.control.handle`), so the
page, the API and the CLI validate alike and errors name the culprit.

Why Microdot (an asyncio web framework of one module) and not aiohttp: the page lives in the
supervisor, and aiohttp's import alone made the supervisor 12 MB bigger, a quarter of its
memory target on a Raspberry Pi (bench/bench_supervisor.py). Microdot adds 0.2 MB. What it does
not do, this module does: a byte and time budget for each request's head and body, a cap on
open connections, SameSite cookies, and no traceback for a malformed request.

Security: no default password (the first admin is set during the button's claim window),
scrypt password hashes, HttpOnly SameSite=Strict session cookies (Secure with TLS), sessions
that end when the admin password is reset (`ops.auth_epoch`), login rate limiting per client
address, a synchronizer CSRF token on every state change, API tokens stored hashed, and strict
security headers (a CSP without inline scripts).
"""
from __future__ import annotations

import asyncio
import ctypes
import datetime
import hmac
import json
import logging
import os
import socket
import ssl
from pathlib import Path
from urllib.parse import unquote

from microdot import Microdot, Request, Response

from appliance.errors import ConfigError
from appliance.faces.web import auth

log = logging.getLogger("kalki.web")

STATIC = Path(__file__).parent / "static"
COOKIE = "kalki_session"
CSRF_HEADER = "X-CSRF-Token"
PUBLIC = ("/login", "/claim", "/healthz")
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")

MAX_BODY = 256 * 1024          # a request body (rules as TOML are the biggest)
MAX_HEAD = 32 * 1024           # the request line and the headers together
REQUEST_SECONDS = 10.0         # to send the head and the body
WRITE_SECONDS = 30.0           # for a client to take each piece of the answer
MAX_CONNECTIONS = 64           # open at once; more are closed at once (live pages hold one each)

# Microdot's limits are class attributes, read when a request is parsed. A line may be 8 KiB
# (Microdot's 2 KiB would refuse a browser that holds other cookies for the same address).
Request.max_content_length = MAX_BODY
Request.max_body_length = MAX_BODY
Request.max_readline = 8 * 1024


class Page(Microdot):
    """The application: Microdot's routing plus the page's state, and a request parser that
    answers 400 to a malformed or oversized head instead of printing a traceback."""

    def __init__(self, st: WebState):
        super().__init__()
        self.state = st
        self.options_handler = None      # OPTIONS is 405: nothing here is for other origins

    async def handle_request(self, reader, writer):
        try:
            req = await Request.create(self, reader, writer, writer.get_extra_info("peername"))
        except (TimeoutError, ValueError, IndexError, EOFError, OSError) as e:
            log.debug("web: bad request from %s: %s", writer.get_extra_info("peername"), e)
            req = None
        res = await self.dispatch_request(req)
        await res.write(writer)
        if req is not None and req.content_length > MAX_BODY:
            await reader.discard()      # so that the client reads the 413 rather than a reset
        await writer.aclose()


class WebState:
    def __init__(self, ops, tls: bool):
        self.ops = ops
        self.tls = tls
        self.sessions = auth.Sessions()
        self.logins = auth.RateLimiter(limit=5, window=60)
        self.bearer = auth.RateLimiter(limit=20, window=60)

    def admin(self) -> str | None:
        """The admin's user name, or None before the gateway is claimed."""
        return self.ops.admin_user()

    def set_cookie(self, response: Response, session: auth.Session) -> None:
        add_cookie(response, f"{COOKIE}={session.id}; Path=/; HttpOnly; SameSite=Strict"
                             + ("; Secure" if self.tls else ""))

    def anonymous(self, request: Request, response: Response) -> auth.Session:
        """The request's session, or a new anonymous one (for the login and claim forms'
        CSRF token), with its cookie set on the response."""
        s = request.g.session
        if s is None:
            s = request.g.session = self.sessions.new(None, self.ops.auth_epoch)
        self.set_cookie(response, s)
        return s


def add_cookie(response: Response, cookie: str) -> None:
    response.headers["Set-Cookie"] = [*(response.headers.get("Set-Cookie") or []), cookie]


def state(request: Request) -> WebState:
    return request.app.state


def is_public(path: str) -> bool:
    return path in PUBLIC or path.startswith("/static/")


def wants_json(request: Request | None) -> bool:
    return request is not None and request.path.startswith("/api/")


def mime(request: Request) -> str:
    return (request.content_type or "").split(";")[0].strip().lower()


def json_response(data, status: int = 200, **headers) -> Response:
    return Response(json.dumps(data, default=str), status,
                    {"Content-Type": "application/json; charset=utf-8", **headers})


def json_error(status: int, message: str, **headers) -> Response:
    return json_response({"error": message}, status, **headers)


def html_response(text: str, status: int = 200) -> Response:
    return Response(text, status, {"Content-Type": "text/html; charset=utf-8"})


def see_other(location: str) -> Response:
    return Response.redirect(location, 303)


def form(request: Request):
    """The request's urlencoded form (a MultiDict: .get(), .getlist()), empty for any other
    body. A body that is not a form (bad %-escapes, not UTF-8) is a ConfigError."""
    if mime(request) != "application/x-www-form-urlencoded":
        return {}
    try:
        return request.form
    except ValueError as e:
        raise ConfigError(f"malformed form body: {e}") from None


def route(app: Microdot, method: str, path: str, handler) -> None:
    """Routes `handler(request)`; the path's <arguments>, %-decoded, are in request.url_args.
    Handlers are coroutines, so they run in the supervisor's loop (Microdot would put plain
    functions in a thread)."""
    async def call(request, **args):
        request.url_args = {k: unquote(v) for k, v in args.items()}
        return await handler(request)
    call.__name__ = handler.__name__
    app.route(path, methods=[method])(call)


def identify(request: Request) -> None:
    """Sets request.g.session, .user and .via ("session" or "token"), and .bad_token."""
    st = state(request)
    ops = st.ops
    g = request.g
    g.user = g.via = None
    g.bad_token = False
    session = st.sessions.get(request.cookies.get(COOKIE))
    if session is not None and session.epoch != ops.auth_epoch:
        st.sessions.drop(session.id)      # the password was reset: this session is over
        session = None
    g.session = session
    admin = st.admin()
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        token = header[7:].strip()
        owner = ops.token_owner(token) if admin and token else None
        if owner:
            g.user, g.via = f"token:{owner['name']}", "token"
        else:
            g.bad_token = True
        return
    if session is not None and session.user is not None:
        if admin and session.user == admin:
            g.user, g.via = session.user, "session"
        else:
            st.sessions.drop(session.id)
            g.session = None


async def guard(request: Request):
    """Runs before every routed request: who is asking, and the CSRF token on changes."""
    st = state(request)
    identify(request)
    g = request.g
    if not is_public(request.path) and g.user is None:
        if g.bad_token:
            addr = client_address(request)
            retry = st.bearer.retry_after(addr)
            st.bearer.fail(addr)
            if retry:
                return json_error(429, "too many failed attempts; try again later",
                                  **{"Retry-After": str(retry)})
        if wants_json(request) or g.bad_token:
            return json_error(401, "authentication required: log in or send "
                                   "'Authorization: Bearer <token>'",
                              **{"WWW-Authenticate": 'Bearer realm="kalki"'})
        if request.method in UNSAFE:
            return json_error(401, "authentication required")
        return see_other("/login" if st.admin() else "/claim")
    if request.method in UNSAFE and g.via != "token":
        session = g.session
        sent = request.headers.get(CSRF_HEADER)
        if sent is None and mime(request) in FORM_TYPES:
            try:
                sent = form(request).get("csrf")
            except ConfigError as e:
                return json_error(400, str(e))
        if session is None or not isinstance(sent, str) or not hmac.compare_digest(sent, session.csrf):
            return json_error(403, "missing or wrong CSRF token (reload the page)")
    return None


def client_address(request: Request) -> str:
    addr = request.client_addr
    return str(addr[0]) if isinstance(addr, (tuple, list)) and addr else "?"


def security_headers(st: WebState):
    async def add(request: Request | None, response: Response) -> Response:
        h = response.headers
        if "Content-Security-Policy" not in h:
            h["Content-Security-Policy"] = CSP
        h["X-Frame-Options"] = "DENY"
        h["X-Content-Type-Options"] = "nosniff"
        h["Referrer-Policy"] = "no-referrer"
        if "Cross-Origin-Opener-Policy" not in h:
            h["Cross-Origin-Opener-Policy"] = "same-origin"
        if st.tls:
            h["Strict-Transport-Security"] = "max-age=31536000"
        static = request is not None and request.path.startswith("/static/")
        h["Cache-Control"] = "no-cache" if static else "no-store"
        return response
    return add


ERRORS = {400: "bad request", 404: "not found", 405: "method not allowed",
          413: f"request body too large (at most {MAX_BODY // 1024} KiB)", 500: "internal error"}


def error_page(status: int):
    async def answer(request: Request | None) -> Response:
        if wants_json(request):
            return json_error(status, ERRORS[status])
        return Response(ERRORS[status].capitalize() + ".\n", status,
                        {"Content-Type": "text/plain; charset=utf-8"})
    return answer


STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


async def static_file(request: Request) -> Response:
    """The page's own files, by name only: no directories, nothing outside STATIC."""
    name = request.url_args["name"]
    path = STATIC / name
    if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
        return await error_page(404)(request)
    return Response(path.read_bytes(), 200, {"Content-Type": STATIC_TYPES[path.suffix]})


def create_app(ops, tls: bool | None = None) -> Page:
    from appliance.faces.web import api, views
    st = WebState(ops, ops.cfg.web.tls if tls is None else tls)
    app = Page(st)
    app.before_request(guard)
    headers = security_headers(st)
    app.after_request(headers)
    app.after_error_request(headers)
    for status in ERRORS:
        app.errorhandler(status)(error_page(status))
    views.add_routes(app)
    api.add_routes(app)
    route(app, "GET", "/static/<name>", static_file)
    return app


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
        tls = {"ssl": self._ssl, "ssl_handshake_timeout": REQUEST_SECONDS} if self._ssl else {}
        self._server = await asyncio.start_server(self._serve, sock=self._sock, **tls)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= MAX_CONNECTIONS:
            log.warning("web: %d connections open; closing one from %s", len(self._open),
                        writer.get_extra_info("peername"))
            writer.close()
            return
        task = asyncio.current_task()
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


CLONE_NEWNET = 0x40000000


def listening_socket(host: str, port: int, netns_path: str = "") -> socket.socket:
    """A bound, listening TCP socket; with netns_path, made inside that network namespace
    (the lab's supervisor runs in the gateway's namespace, the page is for the host)."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = target = None
    if netns_path:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(netns_path, os.O_RDONLY)
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            os.close(own)
            os.close(target)
            raise OSError(err, f"web: cannot enter network namespace {netns_path}: {os.strerror(err)}")
    try:
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
    finally:
        if own is not None:
            if libc.setns(own, CLONE_NEWNET) != 0:   # must not stay in the other namespace
                raise OSError(ctypes.get_errno(), "web: cannot return to the own network namespace")
            os.close(own)
            os.close(target)


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


async def start_web(ops) -> WebServer:
    """Serves the page on [web] listen:port (in [web] netns if set); returns the server
    (`await server.cleanup()` stops it)."""
    w = ops.cfg.web
    app = create_app(ops)
    ctx = ssl_context(w.tls_dir) if w.tls else None
    sock = listening_socket(w.listen, w.port, w.netns)
    try:
        server = await serve(app, sock, ctx)
    except BaseException:
        sock.close()
        raise
    log.info("web page on %s://%s:%d/%s", "https" if w.tls else "http", w.listen,
             sock.getsockname()[1], f" (network namespace {w.netns})" if w.netns else "")
    return server
