"""The operator's web page and its JSON API, served by the supervisor with Microdot.

`start_web(ops)` is called by the supervisor when [web] enabled = true. Everything behind the
page goes through the same code as the control socket (`appliance.supervisor.control.handle`), so the
page, the API and the CLI validate alike and errors name the culprit.

Why Microdot (an asyncio web framework of one module) and not aiohttp: the page lives in the
supervisor, and aiohttp's import alone made the supervisor 12 MB bigger, a quarter of its
memory target on a Raspberry Pi (bench/bench_supervisor.py). Microdot adds 0.2 MB. What it does
not do, this module does: a byte and time budget for each request's head and body, a cap on
open connections (in all and per client address), SameSite cookies, and no traceback for a
malformed request.

Security: no default password (the first admin is set during the button's claim window),
scrypt password hashes, HttpOnly SameSite=Strict session cookies (Secure with TLS), sessions
that end when the admin password is reset (`ops.auth_epoch`), login rate limiting per client
address, a synchronizer CSRF token on every state change, state changes from another origin
(Origin, or Referer) refused whether by session or token, API tokens stored hashed, and strict
security headers (a CSP without inline scripts).
"""
from __future__ import annotations

import logging

from appliance.faces.web import api, views
from appliance.faces.web.http import (
    ERRORS,
    Page,
    WebState,
    error_page,
    guard,
    route,
    security_headers,
    static_file,
    vendor_file,
)
from appliance.faces.web.server import WebServer, listening_socket, serve, ssl_context

__all__ = ["create_app", "listening_socket", "serve", "start_web"]
log = logging.getLogger("kalki.web")


def create_app(ops, tls: bool | None = None) -> Page:
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
    route(app, "GET", "/static/vendor/<name>", vendor_file)
    return app




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
