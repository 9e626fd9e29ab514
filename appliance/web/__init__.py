"""The operator's web page and its JSON API, served by the supervisor with aiohttp.

`start_web(sup)` is called by the supervisor when [web] enabled = true. Everything behind the
page goes through the same code as the control socket (`appliance.control.handle`), so the
page, the API and the CLI validate alike and errors name the culprit.

Security: no default password (the first admin is set during the button's claim window),
scrypt password hashes, HttpOnly SameSite=Strict session cookies (Secure with TLS), sessions
that end when the admin password is reset (`sup.auth_epoch`), login rate limiting per client
address, a synchronizer CSRF token on every state change, API tokens stored hashed, and strict
security headers (a CSP without inline scripts).
"""
from __future__ import annotations

import ctypes
import datetime
import hmac
import logging
import os
import socket
import ssl
from pathlib import Path

from aiohttp import web

from . import auth

log = logging.getLogger("kalki.web")

STATIC = Path(__file__).parent / "static"
COOKIE = "kalki_session"
CSRF_HEADER = "X-CSRF-Token"
PUBLIC = ("/login", "/claim", "/healthz")
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")

STATE = web.AppKey("kalki_state", object)
SESSION = web.RequestKey("kalki_session", object)
USER = web.RequestKey("kalki_user", object)
VIA = web.RequestKey("kalki_via", object)
BAD_TOKEN = web.RequestKey("kalki_bad_token", bool)


class WebState:
    def __init__(self, sup, tls: bool):
        self.sup = sup
        self.tls = tls
        self.sessions = auth.Sessions()
        self.logins = auth.RateLimiter(limit=5, window=60)
        self.bearer = auth.RateLimiter(limit=20, window=60)

    def admin(self) -> dict | None:
        return self.sup.store.get_setting("admin")

    def set_cookie(self, response: web.StreamResponse, session: auth.Session) -> None:
        response.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict", secure=self.tls,
                            path="/")

    def anonymous(self, request: web.Request, response: web.StreamResponse) -> auth.Session:
        """The request's session, or a new anonymous one (for the login and claim forms'
        CSRF token), with its cookie set on the response."""
        s = request.get(SESSION)
        if s is None:
            s = self.sessions.new(None, self.sup.auth_epoch)
            request[SESSION] = s
        self.set_cookie(response, s)
        return s


def state(request: web.Request) -> WebState:
    return request.app[STATE]


def is_public(path: str) -> bool:
    return path in PUBLIC or path.startswith("/static/")


def wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def json_error(status: int, message: str, **headers) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def identify(request: web.Request) -> None:
    """Sets request[SESSION], request[USER] and request[VIA] ("session" or "token")."""
    st = state(request)
    sup = st.sup
    request[USER] = request[VIA] = None
    session = st.sessions.get(request.cookies.get(COOKIE))
    if session is not None and session.epoch != sup.auth_epoch:
        st.sessions.drop(session.id)      # the password was reset: this session is over
        session = None
    request[SESSION] = session
    admin = st.admin()
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        token = header[7:].strip()
        owner = auth.token_owner(sup.store, token) if admin and token else None
        if owner:
            request[USER], request[VIA] = f"token:{owner['name']}", "token"
        else:
            request[BAD_TOKEN] = True
        return
    if session is not None and session.user is not None:
        if admin and session.user == admin.get("user"):
            request[USER], request[VIA] = session.user, "session"
        else:
            st.sessions.drop(session.id)
            request[SESSION] = None


@web.middleware
async def guard(request: web.Request, handler):
    st = state(request)
    identify(request)
    if not is_public(request.path) and request[USER] is None:
        if request.get(BAD_TOKEN):
            addr = request.remote or "?"
            retry = st.bearer.retry_after(addr)
            st.bearer.fail(addr)
            if retry:
                return json_error(429, "too many failed attempts; try again later",
                                  **{"Retry-After": str(retry)})
        if wants_json(request) or request.get(BAD_TOKEN):
            return json_error(401, "authentication required: log in or send "
                                   "'Authorization: Bearer <token>'",
                              **{"WWW-Authenticate": 'Bearer realm="kalki"'})
        if request.method in UNSAFE:
            return json_error(401, "authentication required")
        target = "/login" if st.admin() else "/claim"
        raise web.HTTPSeeOther(target)
    if request.method in UNSAFE and request[VIA] != "token":
        session = request[SESSION]
        sent = request.headers.get(CSRF_HEADER)
        if sent is None and request.content_type in ("application/x-www-form-urlencoded",
                                                      "multipart/form-data"):
            sent = (await request.post()).get("csrf")
        if session is None or not isinstance(sent, str) or not hmac.compare_digest(sent, session.csrf):
            return json_error(403, "missing or wrong CSRF token (reload the page)")
    return await handler(request)


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    h = response.headers
    h.setdefault("Content-Security-Policy", CSP)
    h["X-Frame-Options"] = "DENY"
    h["X-Content-Type-Options"] = "nosniff"
    h["Referrer-Policy"] = "no-referrer"
    h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    if state(request).tls:
        h["Strict-Transport-Security"] = "max-age=31536000"
    if request.path.startswith("/static/"):
        h["Cache-Control"] = "no-cache"
    else:
        h["Cache-Control"] = "no-store"


def create_app(sup, tls: bool | None = None) -> web.Application:
    from . import api, views
    app = web.Application(middlewares=[guard], client_max_size=256 * 1024)
    app[STATE] = WebState(sup, sup.cfg.web.tls if tls is None else tls)
    app.on_response_prepare.append(security_headers)
    views.add_routes(app)
    api.add_routes(app)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    return app


# -- listening ---------------------------------------------------------------------------

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
    now = datetime.datetime.now(datetime.timezone.utc)
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


async def start_web(sup) -> web.AppRunner:
    """Serves the page on [web] listen:port (in [web] netns if set); returns the runner
    (`await runner.cleanup()` stops it)."""
    w = sup.cfg.web
    app = create_app(sup)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    sock = listening_socket(w.listen, w.port, w.netns)
    ctx = ssl_context(w.tls_dir) if w.tls else None
    site = web.SockSite(runner, sock, ssl_context=ctx)
    await site.start()
    log.info("web page on %s://%s:%d/%s", "https" if w.tls else "http", w.listen,
             sock.getsockname()[1], f" (network namespace {w.netns})" if w.netns else "")
    return runner
