"""Real servers for the appliance's notifications (appliance.supervisor.notify), outside the
product: an SMTP relay (aiosmtpd, with STARTTLS and AUTH PLAIN/LOGIN), a webhook receiver that
checks the HMAC signature and the timestamp, and a receiver that speaks ntfy's publishing API
(POST or PUT /<topic>, the Title/Priority/Tags headers, a bearer token, a JSON answer). The
tests run them on 127.0.0.1; a lab can run them on its internet host.

Each records what it got in `received` and can be told to answer slowly (`delay`) or with an
error (`status`), to see the appliance retry and never wait on its loop.
"""
from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _HttpReceiver:
    """A threaded HTTP server whose handler calls `self.handle(handler, body)`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.received: list[dict] = []
        self.delay = 0.0
        self.status: int | None = None          # an error to answer with, instead
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self) -> None:
                outer._serve(self, self._body())

            def do_PUT(self) -> None:
                outer._serve(self, self._body())

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.host, self.port = host, int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self):
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self, h: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        if self.delay:
            time.sleep(self.delay)
        status, answer = self.handle(h, body)
        if self.status is not None:
            status, answer = self.status, {"error": "told to fail"}
        data = json.dumps(answer).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def handle(self, h, body: bytes) -> tuple[int, dict]:
        raise NotImplementedError

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{type(self).__name__}: {len(self.received)} of {count} "
                                     f"messages within {timeout} s")
            time.sleep(0.02)
        return self.received


class NtfyReceiver(_HttpReceiver):
    """ntfy's publishing API, as far as the appliance uses it: POST/PUT /<topic> with the
    message as the body and Title, Priority (1-5 or min/low/default/high/urgent, and the
    aliases), Tags (comma-separated) headers; `Authorization: Bearer <token>` where `token` is
    set (401 without it, as ntfy answers); the answer is the message as JSON, like ntfy's."""

    PRIORITIES = {"1": 1, "min": 1, "2": 2, "low": 2, "3": 3, "default": 3, "4": 4, "high": 4,
                  "5": 5, "max": 5, "urgent": 5}

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        super().__init__(host, port)
        self.token = token

    def handle(self, h, body: bytes) -> tuple[int, dict]:
        topic = h.path.lstrip("/").split("?", 1)[0]
        if not topic or "/" in topic:
            return 404, {"code": 40401, "http": 404, "error": "page not found"}
        if self.token and h.headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"code": 40101, "http": 401, "error": "unauthorized"}
        priority = self.PRIORITIES.get((h.headers.get("Priority") or h.headers.get("X-Priority")
                                        or "3").lower())
        if priority is None:
            return 400, {"code": 40007, "http": 400, "error": "invalid priority"}
        title = h.headers.get("Title") or h.headers.get("X-Title") or ""
        tags = [t.strip() for t in (h.headers.get("Tags") or h.headers.get("X-Tags") or "").split(",")
                if t.strip()]
        message = {"id": secrets.token_hex(6), "time": int(time.time()), "expires": int(time.time()) + 43200,
                   "event": "message", "topic": topic, "title": title, "message": body.decode("utf-8"),
                   "priority": priority, "tags": tags}
        with self.lock:
            self.received.append({**message, "headers": dict(h.headers), "method": h.command})
        return 200, {k: v for k, v in message.items() if v not in ("", [])}


class WebhookReceiver(_HttpReceiver):
    """Checks what the appliance promises: X-Kalki-Signature is "sha256=" and the HMAC-SHA256,
    keyed with `secret`, of X-Kalki-Timestamp, a dot and the body; the timestamp is within
    `tolerance` seconds of now; a delivery id is not seen twice. Refused (401) otherwise, and
    counted in `refused` with why."""

    def __init__(self, secret: bytes, host: str = "127.0.0.1", port: int = 0, tolerance: int = 300):
        super().__init__(host, port)
        self.secret, self.tolerance = secret, tolerance
        self.refused: list[str] = []
        self.deliveries: set[str] = set()

    def verify(self, headers, body: bytes) -> str | None:
        """None if the request is genuine and fresh, else why not."""
        stamp, signature = headers.get("X-Kalki-Timestamp") or "", headers.get("X-Kalki-Signature") or ""
        if not stamp.isdigit():
            return "no timestamp"
        if abs(time.time() - int(stamp)) > self.tolerance:
            return "stale timestamp"
        wanted = "sha256=" + hmac.new(self.secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(wanted, signature):
            return "bad signature"
        delivery = headers.get("X-Kalki-Delivery") or ""
        if delivery in self.deliveries:
            return "replayed delivery"
        return None

    def handle(self, h, body: bytes) -> tuple[int, dict]:
        why = self.verify(h.headers, body)
        with self.lock:
            if why:
                self.refused.append(why)
                return 401, {"error": why}
            self.deliveries.add(h.headers.get("X-Kalki-Delivery") or "")
            self.received.append({"headers": dict(h.headers), "body": body, "json": json.loads(body)})
        return 200, {"ok": True}


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    login: str | None
    mechanism: str | None
    headers: dict = field(default_factory=dict)


class SmtpRelay:
    """An SMTP relay (aiosmtpd): STARTTLS offered with `tls_context` and then required, AUTH
    (PLAIN and LOGIN, only over TLS) against `users`; every message it accepts is a `Mail`.
    `mechanisms` limits the AUTH mechanisms offered (e.g. ("LOGIN",))."""

    def __init__(self, tls_context: ssl.SSLContext | None, users: dict[str, str],
                 host: str = "127.0.0.1", port: int = 0, mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword
        self.received: list[Mail] = []
        self.failed_logins: list[str] = []
        self.users = users
        outer = self

        def authenticator(server, session, envelope, mechanism, auth_data):
            if isinstance(auth_data, LoginPassword):
                user, password = auth_data.login.decode(), auth_data.password.decode()
                if outer.users.get(user) == password:
                    session.kalki_mechanism = mechanism
                    return AuthResult(success=True, auth_data=user)
                outer.failed_logins.append(user)
            return AuthResult(success=False, handled=False)

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                import email
                parsed = email.message_from_bytes(envelope.content)
                outer.received.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                                           session.ssl is not None, session.auth_data,
                                           getattr(session, "kalki_mechanism", None), dict(parsed.items())))
                return "250 OK"

        offered = {"PLAIN", "LOGIN"}
        self.controller = Controller(
            Handler(), hostname=host, port=port or free_port(host), tls_context=tls_context,
            require_starttls=tls_context is not None, authenticator=authenticator,
            auth_required=bool(users), auth_require_tls=tls_context is not None,
            auth_exclude_mechanism=sorted(offered - set(mechanisms)))
        self.host, self.port = host, self.controller.port

    def start(self):
        self.controller.start()
        return self

    def close(self) -> None:
        self.controller.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[Mail]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"SMTP: {len(self.received)} of {count} messages within {timeout} s")
            time.sleep(0.02)
        return self.received
