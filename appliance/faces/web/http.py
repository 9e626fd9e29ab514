"""The page's HTTP plumbing: the Microdot app with its state, responses, routing, who is
asking (session or token), the CSRF guard, security headers and error pages."""
from __future__ import annotations

import hmac
import json
import logging
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from microdot import Microdot, Request, Response
from microdot.microdot import MultiDict

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
DEFAULT_PORTS = {"http": 80, "https": 443}

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
        # OPTIONS is 405: nothing here is for other origins. Microdot tests the handler for
        # None (find_route); its stub types it as always callable.
        self.options_handler = None  # type: ignore[assignment]

    async def handle_request(self, reader, writer):
        try:
            scheme = "https" if writer.get_extra_info("ssl_object") is not None else "http"
            req = await Request.create(self, reader, writer, writer.get_extra_info("peername"),
                                       scheme)
        except (TimeoutError, ValueError, IndexError, EOFError, OSError) as e:
            log.debug("web: bad request from %s: %s", writer.get_extra_info("peername"), e)
            req = None
        # Microdot's own handle_request passes None for a request it could not parse, and
        # dispatch_request answers it; its stub wants a Request.
        res = await self.dispatch_request(req)  # type: ignore[arg-type]
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
    app = request.app
    if not isinstance(app, Page):
        raise TypeError(f"the request was routed by {app!r}, not by the page's application")
    return app.state


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
    """The request's form, urlencoded or multipart (a MultiDict: .get(), .getlist(); a
    multipart form's text fields only, its files are `files()`), empty for any other body. A
    body that is not a form (bad %-escapes, not UTF-8, a broken multipart) is a ConfigError."""
    if mime(request) == "multipart/form-data":
        return _multipart(request)[0]
    if mime(request) != "application/x-www-form-urlencoded":
        return {}
    try:
        return request.form
    except ValueError as e:
        raise ConfigError(f"malformed form body: {e}") from None


def files(request: Request) -> dict[str, tuple[str, bytes]]:
    """A multipart form's files: {field: (the file's name, its bytes)}; a field whose file
    input was left empty is not there. Bounded by MAX_BODY, as every body."""
    if mime(request) != "multipart/form-data":
        return {}
    return _multipart(request)[1]


def _multipart(request: Request) -> tuple[MultiDict, dict[str, tuple[str, bytes]]]:
    parsed = getattr(request.g, "multipart", None)
    if parsed is None:
        parsed = parse_multipart(request.headers.get("Content-Type", ""), request.body or b"")
        request.g.multipart = parsed
    return parsed


def parse_multipart(content_type: str, body: bytes) -> tuple[MultiDict, dict[str, tuple[str, bytes]]]:
    """A multipart/form-data body (RFC 7578), read by the standard library's MIME parser:
    its text fields, and its files {field: (file name, bytes)}. The body is in memory already
    (at most MAX_BODY); anything malformed is a ConfigError."""
    head = f"MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    import email.parser  # here: about 0.5 MB the supervisor need not hold until an upload
    import email.policy
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart() or msg.defects:
        raise ConfigError("malformed multipart form body")
    fields, found = MultiDict(), {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_content_disposition() != "form-data" or not isinstance(name, str) or part.defects:
            raise ConfigError("malformed multipart form body: a part without a form field's name")
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename is not None:
            if filename or data:        # an empty file input sends an empty part without a name
                found[name] = (upload_name(filename), data)
            continue
        try:
            fields[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"malformed multipart form body: field {name[:40]!r} is not UTF-8") from None
    return fields, found


def upload_name(filename: str) -> str:
    """An uploaded file's name as errors may show it: its last path component, in plain
    characters, at most 100 of them."""
    base = re.split(r"[\\/]", filename)[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[:100] or "upload"


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
    """Runs before every routed request: the Origin of a change, who is asking, and the CSRF
    token on changes."""
    st = state(request)
    if request.method in UNSAFE:
        refused = foreign_origin(request)
        if refused:
            log.debug("web: %s (%s %s from %s)", refused, request.method, request.path,
                      client_address(request))
            return json_error(403, refused)
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


def same_origin(url: str, scheme: str, host: str | None) -> bool:
    """Whether `url` (an Origin, or a Referer) is of the page as this request reached it: the
    connection's scheme and the request's Host (the gateway is reached by address or by name),
    the port given or the scheme's own."""
    def origin(u: str):
        try:
            parts = urlsplit(u)
            port = parts.port
        except ValueError:              # not a URL, or a port that is not a number
            return None
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            return None
        return parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme]
    own = origin(f"{scheme}://{host}") if host else None
    return own is not None and origin(url) == own


def foreign_origin(request: Request) -> str | None:
    """Why a state change is refused as coming from another origin, or None. A browser says
    where a change comes from in Origin (older ones in Referer only); a client that sends
    neither (curl, Home Assistant with a token) is not a page in a browser and is let through.
    Origin "null" is what a browser sends for the page's own forms under its Referrer-Policy
    no-referrer, and for a sandboxed or privacy-sensitive page anywhere: taken as the page's
    only when the browser does not say otherwise in Sec-Fetch-Site (set by browsers only)."""
    h = request.headers
    origin, referer = h.get("Origin"), h.get("Referer")
    if origin == "null":
        if h.get("Sec-Fetch-Site", "same-origin") == "same-origin":
            return None
        what, sent = "Origin", origin
    elif origin is not None:
        what, sent = "Origin", origin
    elif referer is not None:
        what, sent = "Referer", referer
    else:
        return None
    if sent != "null" and same_origin(sent, request.scheme, h.get("Host")):
        return None
    shown = sent if len(sent) <= 100 else sent[:100] + "…"
    return f"cross-origin request refused: {what} {shown} is not this gateway's"


def address_of(peer) -> str:
    """A client's address as the limits count it (connections per source, failed logins): the
    peer's host, an IPv4 address on a dual-stack socket (::ffff:a.b.c.d) as a.b.c.d, "?" if
    unknown. From the connection, never from a header."""
    host = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else "?"
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def client_address(request: Request) -> str:
    return address_of(request.client_addr)


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
    return await _file_in(STATIC, request)


async def vendor_file(request: Request) -> Response:
    """Others' files the page uses, unmodified (static/vendor/VENDORED.md says whose), by name
    only, as the page's own are served."""
    return await _file_in(STATIC / "vendor", request)


async def _file_in(directory: Path, request: Request) -> Response:
    # Microdot (find_route) and route() set url_args on the request; its stub does not declare it.
    name = request.url_args["name"]  # type: ignore[attr-defined]
    path = directory / name
    if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
        return await error_page(404)(request)
    return Response(path.read_bytes(), 200, {"Content-Type": STATIC_TYPES[path.suffix]})
