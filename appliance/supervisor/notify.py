"""Notifications: alerts of `[notify] min_severity` and above, sent to people on the channels
the site configured: ntfy (a topic on a server), a webhook (JSON, signed with an HMAC) and
e-mail through an SMTP relay (STARTTLS, login). Home Assistant gets its alert events over MQTT
(appliance.telemetry.mqtt, `publish_alert_event`), not from here.

Never on the loop: the supervisor hands each alert over (`Notifier.alert`, which only words
it and queues it), and each channel has one thread of its own that sends, so a slow or dead
server delays nothing but its own channel's next message. A send that fails is tried again
after 2, 10 and 30 s; one that fails every time is counted (`status()`: failed, last_error)
and raises a `notify-failed` alert, at most once an hour per channel, which is sent on the
other channels and never on the one it is about. A channel sends at most `max_per_minute`
messages a minute; the rest are summed up in one "N more alerts" message at the end of the
minute, by device and kind.

Secrets (the ntfy token, the webhook's HMAC secret, the relay's password) are read from their
files, never logged, never shown: errors are worded here, and any secret in one is masked.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import datetime
import email.header
import email.message
import email.utils
import hashlib
import hmac
import json
import logging
import os
import queue
import smtplib
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from appliance.config import NotifySection
from appliance.errors import ConfigError
from appliance.supervisor import explain
from appliance.vocab import SEVERITIES, iso

log = logging.getLogger("kalki.notify")

CHANNELS = ("ntfy", "webhook", "email")
BACKOFF = (2.0, 10.0, 30.0)          # seconds before each try again: 4 tries in all
FAILURE_ALERT_EVERY = 3600.0         # one notify-failed alert per channel at most this often
QUEUE_MAX = 500                      # messages waiting per channel (uplink down); more: dropped, counted
WINDOW = 60.0                        # max_per_minute's minute
USER_AGENT = "kalki-notify/1"
NTFY_PRIORITY = {"critical": "5", "warning": "4", "info": "3"}
NTFY_TAG = {"critical": "rotating_light", "warning": "warning", "info": "information_source"}


@dataclass(frozen=True)
class Message:
    """What every channel sends: a title, a text for people, and the JSON a webhook gets."""
    event: str                   # "alert", "summary" (the minute's rest) or "test"
    title: str
    text: str
    severity: str
    device: str | None = None
    kind: str | None = None
    payload: dict = field(default_factory=dict)
    exclude: str | None = None   # a channel it is not sent on (a notify-failed alert's own)


class Sender(Protocol):
    """One channel: sends a message or raises. `to` is what the page may show (no secret)."""
    channel: str
    to: str

    def send(self, m: Message) -> None: ...


# -- the senders --------------------------------------------------------------------------------
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: a token or a signed body goes only where the config says."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _opener() -> urllib.request.OpenerDirector:
    # No proxies from the environment, no redirects, the system's CAs for https.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect(),
                                       urllib.request.HTTPSHandler(context=ssl.create_default_context()))


def _where(url: str) -> str:
    """A URL as the page may show it: scheme, host and port only (a webhook's path or query,
    an ntfy topic, may be a secret of its own)."""
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


def _ascii_header(text: str) -> str:
    """A header value: as it is if ASCII, else RFC 2047 (ntfy and mail readers decode it)."""
    text = " ".join(text.split())
    return text if text.isascii() else email.header.Header(text, "utf-8").encode()


class NtfySender:
    channel = "ntfy"

    def __init__(self, server: str, topic: str, token: str | None, timeout: float):
        self.url = f"{server.rstrip('/')}/{topic}"
        self.to = f"{_where(server)} (a topic)"
        self.token, self.timeout = token, timeout
        self.opener = _opener()

    def send(self, m: Message) -> None:
        headers = {"Title": _ascii_header(m.title), "Priority": NTFY_PRIORITY.get(m.severity, "3"),
                   "Tags": ",".join(t for t in (NTFY_TAG.get(m.severity), m.kind) if t),
                   "Content-Type": "text/plain; charset=utf-8", "User-Agent": USER_AGENT}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url, data=m.text.encode("utf-8"), headers=headers, method="POST")
        with self.opener.open(req, timeout=self.timeout) as r:
            body = r.read(65536)
        try:      # ntfy answers the message it published, as JSON with its id
            answer = json.loads(body)
            ok = isinstance(answer, dict) and "id" in answer
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("the server's answer is not ntfy's (no message id)")


class WebhookSender:
    channel = "webhook"

    def __init__(self, url: str, secret: bytes, timeout: float):
        self.url, self.secret, self.timeout = url, secret, timeout
        self.to = _where(url)
        self.opener = _opener()

    def signed(self, body: bytes, timestamp: str) -> str:
        """What X-Kalki-Signature says: HMAC-SHA256, keyed with the secret, of the timestamp,
        a dot and the body, so that neither can be changed or replayed under another time."""
        return "sha256=" + hmac.new(self.secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()

    def send(self, m: Message) -> None:
        body = json.dumps(m.payload, sort_keys=True, default=str).encode("utf-8")
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   "X-Kalki-Event": m.event, "X-Kalki-Timestamp": timestamp,
                   "X-Kalki-Signature": self.signed(body, timestamp),
                   "X-Kalki-Delivery": str(m.payload.get("delivery") or "")}
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self.opener.open(req, timeout=self.timeout) as r:
            r.read(65536)


class EmailSender:
    channel = "email"

    def __init__(self, n: NotifySection, password: str | None):
        self.host, self.port, self.starttls = n.smtp_host, n.smtp_port, n.smtp_starttls
        self.ca_file, self.user, self.password = n.smtp_ca_file or None, n.smtp_user, password
        self.sender, self.recipients, self.timeout = n.smtp_from, list(n.smtp_to), n.timeout_seconds
        self.to = f"{', '.join(self.recipients)} through {self.host}:{self.port}"

    def message(self, m: Message) -> email.message.EmailMessage:
        msg = email.message.EmailMessage()
        msg["Subject"] = m.title
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg["Date"] = email.utils.formatdate(localtime=True)
        msg["Message-ID"] = email.utils.make_msgid(domain=self.sender.rsplit("@", 1)[-1])
        msg["X-Kalki-Severity"] = m.severity
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(m.text)
        return msg

    def send(self, m: Message) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as s:
            s.ehlo()
            if self.starttls:     # required: smtplib refuses if the relay does not offer it
                s.starttls(context=ssl.create_default_context(cafile=self.ca_file))
                s.ehlo()
            if self.user:
                s.login(self.user, self.password or "")
            refused = s.send_message(self.message(m))
        if refused:
            raise smtplib.SMTPRecipientsRefused(refused)


def read_secret(path: str, key: str) -> str:
    """A secret from its file (stripped); a warning, never the secret, if others may read it."""
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"notify.{key}: {path}: {getattr(e, 'strerror', None) or e}") from None
    if st.st_mode & 0o077:
        log.warning("notify.%s: %s may be read by others (mode %o): 0600 recommended", key, path,
                    st.st_mode & 0o777)
    if not text:
        raise ConfigError(f"notify.{key}: {path} is empty")
    return text


def build_senders(n: NotifySection) -> tuple[dict[str, Sender], dict[str, str], list[str]]:
    """The configured channels' senders; the channels that could not be built, with why (a
    secret's file gone since the config was checked); and the secrets, to mask in errors."""
    senders: dict[str, Sender] = {}
    broken: dict[str, str] = {}
    secrets: list[str] = []
    t = float(n.timeout_seconds)

    def secret(path: str, key: str) -> str:
        value = read_secret(path, key)
        secrets.append(value)
        return value
    try:
        if n.ntfy_url:
            token = secret(n.ntfy_token_file, "ntfy_token_file") if n.ntfy_token_file else None
            senders["ntfy"] = NtfySender(n.ntfy_url, n.ntfy_topic, token, t)
    except ConfigError as e:
        broken["ntfy"] = str(e)
    try:
        if n.webhook_url:
            senders["webhook"] = WebhookSender(
                n.webhook_url, secret(n.webhook_secret_file, "webhook_secret_file").encode(), t)
    except ConfigError as e:
        broken["webhook"] = str(e)
    try:
        if n.smtp_host:
            password = secret(n.smtp_password_file, "smtp_password_file") if n.smtp_password_file else None
            senders["email"] = EmailSender(n, password)
    except ConfigError as e:
        broken["email"] = str(e)
    for channel, why in broken.items():
        log.error("notifications by %s are off: %s", channel, why)
    return senders, broken, secrets


def error_words(e: BaseException) -> str:
    """A failed send in a few words (the page and the log show them; masked after)."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        r = e.reason
        return f"cannot reach the server: {getattr(r, 'strerror', None) or r}"
    if isinstance(e, smtplib.SMTPNotSupportedError):
        return f"the relay does not offer STARTTLS ({e})" if "STARTTLS" in str(e) else f"SMTP: {e}"
    if isinstance(e, smtplib.SMTPRecipientsRefused):
        return f"the relay refused the recipients {', '.join(map(str, e.recipients))}"
    if isinstance(e, smtplib.SMTPResponseException):
        text = e.smtp_error.decode(errors="replace") if isinstance(e.smtp_error, bytes) else str(e.smtp_error)
        return f"SMTP {e.smtp_code} {text}"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(e, OSError):
        return f"cannot reach the server: {e.strerror or e}"
    return f"{type(e).__name__}: {e}"


# -- one channel's queue and thread --------------------------------------------------------------
_STOP = object()


class Channel:
    """A sender, its queue and its thread (started with the first message): rate limit,
    retries, and what happened (`status`)."""

    def __init__(self, sender: Sender, max_per_minute: int, mask: Callable[[str], str],
                 on_failure: Callable[[str, str, int], None], backoff: tuple[float, ...] = BACKOFF,
                 window: float = WINDOW, failure_alert_every: float = FAILURE_ALERT_EVERY):
        self.sender, self.name = sender, sender.channel
        self.max_per_minute, self.mask, self.on_failure = max_per_minute, mask, on_failure
        self.backoff, self.window, self.failure_alert_every = backoff, window, failure_alert_every
        self.queue: queue.Queue = queue.Queue(QUEUE_MAX)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.last_error: str | None = None
        self.last_error_at: str | None = None
        self.last_sent_at: str | None = None
        self._alerted_at: float | None = None      # the last notify-failed alert (monotonic)
        self._window_end: float | None = None
        self._in_window = 0
        self._held: list[Message] = []

    def put(self, m: Message) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=f"notify-{self.name}", daemon=True)
            self.thread.start()
        try:
            self.queue.put_nowait(m)
        except queue.Full:
            with self.lock:
                self.counts["dropped"] += 1

    def close(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            try:
                self.queue.put_nowait(_STOP)
            except queue.Full:
                pass

    def status(self) -> dict:
        with self.lock:
            return {"to": self.sender.to, "sent": self.counts["sent"], "failed": self.counts["failed"],
                    "retried": self.counts["retried"], "summed_up": self.counts["summed_up"],
                    "dropped": self.counts["dropped"], "queued": self.queue.qsize(),
                    "last_sent_at": self.last_sent_at, "last_error": self.last_error,
                    "last_error_at": self.last_error_at}

    def _run(self) -> None:
        while not self.stopping.is_set():
            timeout = None
            if self._held and self._window_end is not None:
                timeout = max(0.0, self._window_end - time.monotonic())
            try:
                item = self.queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            now = time.monotonic()
            if self._window_end is not None and now >= self._window_end:
                held, self._held, self._window_end = self._held, [], None
                if held:
                    self.deliver(summary(held))
            if item is None:
                continue
            if self._window_end is None:
                self._window_end, self._in_window = now + self.window, 0
            if self._in_window >= self.max_per_minute:
                self._held.append(item)
                with self.lock:
                    self.counts["summed_up"] += 1
                continue
            self._in_window += 1
            self.deliver(item)

    def try_once(self, m: Message) -> str | None:
        """One try; None if it went, else the error in words (masked)."""
        try:
            self.sender.send(m)
            return None
        except Exception as e:     # noqa: BLE001 - any failure of a send is the channel's, worded
            return self.mask(error_words(e))[:300]

    def deliver(self, m: Message) -> bool:
        """Tries, and tries again after each of `backoff`; records the outcome."""
        error: str | None = None
        for attempt in range(len(self.backoff) + 1):
            if attempt:
                with self.lock:
                    self.counts["retried"] += 1
                if self.stopping.wait(self.backoff[attempt - 1]):
                    return False
            error = self.try_once(m)
            if error is None:
                with self.lock:
                    self.counts["sent"] += 1
                    self.last_sent_at = iso(datetime.datetime.now(datetime.UTC))
                return True
            log.warning("notify %s: try %d of %d failed: %s", self.name, attempt + 1,
                        len(self.backoff) + 1, error)
        with self.lock:
            self.counts["failed"] += 1
            self.last_error = error
            self.last_error_at = iso(datetime.datetime.now(datetime.UTC))
            failed = self.counts["failed"]
        log.error("notify %s: gave up on %r after %d tries: %s", self.name, m.title,
                  len(self.backoff) + 1, error)
        now = time.monotonic()
        if self._alerted_at is None or now - self._alerted_at >= self.failure_alert_every:
            self._alerted_at = now
            self.on_failure(self.name, error or "failed", failed)
        return False


def summary(held: list[Message]) -> Message:
    """The minute's rest in one message: how many, from which devices, of which kinds."""
    by_device: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for m in held:
        by_device[m.device or "the gateway"][m.kind or m.event] += 1
    parts = []
    for device, kinds in sorted(by_device.items(), key=lambda x: -sum(x[1].values())):
        which = ", ".join(f"{k}{f' ×{n}' if n > 1 else ''}" for k, n in kinds.most_common())
        parts.append(f"{sum(kinds.values())} from {device} ({which})")
    severity = max((m.severity for m in held), key=lambda s: SEVERITIES.index(s) if s in SEVERITIES else 0)
    n = len(held)
    title = f"Kalki: {n} more alert{'s' if n != 1 else ''}"
    text = (f"{n} more alert{'s' if n != 1 else ''} in the last minute, not sent one by one: "
            f"{'; '.join(parts)}. Every alert is on the appliance's alerts page (kalki alerts).")
    payload = {"event": "summary", "count": n, "severity": severity,
               "by_device": {d: dict(k) for d, k in by_device.items()},
               "title": title, "text": text, "delivery": str(uuid.uuid4())}
    return Message("summary", title, text, severity, payload=payload)


# -- the notifier ---------------------------------------------------------------------------------
class Notifier:
    """The channels of `[notify]`; `alert()` on the loop, sends off it.

    `now` and `timezone` give the local time a message states; `explain(alert)` the alert in
    words (appliance.run wires ops.alert_event's explanation; without it, the words of the alert
    alone); `on_failure(channel, error, failed)` is called on `loop` (raise a notify-failed)."""

    def __init__(self, n: NotifySection, *, now: Callable[[], datetime.datetime],
                 timezone: Callable[[], str] = lambda: "UTC",
                 on_failure: Callable[[str, str, int], None] = lambda c, e, f: None,
                 senders: dict[str, Sender] | None = None, backoff: tuple[float, ...] = BACKOFF,
                 window: float = WINDOW, failure_alert_every: float = FAILURE_ALERT_EVERY):
        self.cfg, self.now, self.timezone, self.on_failure = n, now, timezone, on_failure
        self.min_level = SEVERITIES.index(n.min_severity) if n.min_severity in SEVERITIES else 1
        self.explain: Callable[[dict], str] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        if senders is None:
            senders, self.broken, self._secrets = build_senders(n)
        else:
            self.broken, self._secrets = {}, []
        self.channels = {name: Channel(s, n.max_per_minute, self.mask, self._failed, backoff, window,
                                       failure_alert_every) for name, s in senders.items()}

    def mask(self, text: str) -> str:
        for s in self._secrets:
            if s:
                text = text.replace(s, "***")
        return text

    def wants(self, alert: dict) -> bool:
        """Its severity is min_severity or above."""
        s = alert.get("severity")
        return s in SEVERITIES and SEVERITIES.index(s) >= self.min_level

    def _failed(self, channel: str, error: str, failed: int) -> None:
        """From a channel's thread: on the loop (the supervisor's state is the loop's)."""
        if self.loop is None:
            self.on_failure(channel, error, failed)
            return
        try:
            self.loop.call_soon_threadsafe(self.on_failure, channel, error, failed)
        except RuntimeError:
            pass      # the loop is closed: shutting down

    def words(self, alert: dict) -> str:
        if self.explain is not None:
            try:
                return self.explain(alert)
            except Exception:     # noqa: BLE001 - a message must go out even if its words fail
                log.exception("notify: wording alert %s", alert.get("type"))
        device = alert.get("device") if isinstance(alert.get("device"), str) else None
        w = explain.when(alert.get("at"), self.now(), self.timezone())
        return explain.alert_words(alert, explain.Context(device, None, lambda ip: None,
                                                          str(alert.get("at") or "")),
                                   w["local"] if w else "", "")

    def message(self, alert: dict) -> Message:
        """The alert as people read it: its sentence, then device, kind, severity, local time."""
        device = alert.get("device") if isinstance(alert.get("device"), str) else None
        kind, severity = str(alert.get("type") or "alert"), str(alert.get("severity") or "warning")
        w = explain.when(alert.get("at"), self.now(), self.timezone())
        local = w["title"] if w else str(alert.get("at") or "")
        sentence = self.words(alert)
        text = (f"{sentence}\n\nDevice: {device or '(the gateway itself)'}\nKind: {kind}\n"
                f"Severity: {severity}\nTime: {local}\n")
        title = f"Kalki: {severity} {kind}" + (f" on {device}" if device else "")
        payload = {"event": "alert", "delivery": str(uuid.uuid4()), "title": title, "text": sentence,
                   "device": device, "kind": kind, "severity": severity, "local_time": local,
                   "alert": alert}
        exclude = None
        if kind == "notify-failed" and isinstance(alert.get("details"), dict):
            exclude = alert["details"].get("channel")
        return Message("alert", title, text, severity, device, kind, payload, exclude)

    def alert(self, alert: dict) -> Message | None:
        """On the loop, after the alert is recorded: worded and queued on every channel (at
        min_severity or above). Never blocks, never raises. Returns the message, if any."""
        if not self.wants(alert) or not self.channels:
            return None
        try:
            m = self.message(alert)
            for name, channel in self.channels.items():
                if name != m.exclude:
                    channel.put(m)
            return m
        except Exception:     # noqa: BLE001 - notifications must never break raise_alert
            log.exception("notify: alert %s", alert.get("type"))
            return None

    def test_message(self) -> Message:
        at = self.now()
        w = explain.when(at, at, self.timezone())
        local = w["title"] if w else iso(at)
        text = (f"A test notification from the Kalki gateway, sent at {local}. Alerts of severity "
                f"{self.cfg.min_severity} and above come this way.")
        payload = {"event": "test", "delivery": str(uuid.uuid4()), "title": "Kalki: test notification",
                   "text": text, "severity": "info", "local_time": local}
        return Message("test", payload["title"], text, "info", None, "test", payload)

    def test(self, channel: str | None = None) -> dict[str, dict]:
        """One test message on each configured channel (or `channel`), sent now, in parallel,
        one try each: {channel: {"ok", "error", "to", "seconds"}}. Blocks: call it off the loop."""
        if channel is not None and channel not in CHANNELS:
            raise ConfigError(f"notify test: unknown channel {channel!r} (known: {', '.join(CHANNELS)})")
        wanted = [channel] if channel else [c for c in CHANNELS if c in self.channels or c in self.broken]
        if channel and channel not in self.channels and channel not in self.broken:
            raise ConfigError(f"notify test: {channel} is not configured ([notify] in the config file; "
                              f"configured: {', '.join(self.channels) or 'none'})")
        if not wanted:
            raise ConfigError("notify test: no channel is configured ([notify] in the config file)")
        m = self.test_message()
        results: dict[str, dict] = {}

        def one(name: str) -> dict:
            if name in self.broken:
                return {"ok": False, "error": self.broken[name], "to": None, "seconds": 0.0}
            c = self.channels[name]
            started = time.monotonic()
            error = c.try_once(m)
            return {"ok": error is None, "error": error, "to": c.sender.to,
                    "seconds": round(time.monotonic() - started, 3)}
        with concurrent.futures.ThreadPoolExecutor(len(wanted), thread_name_prefix="notify-test") as pool:
            for name, result in zip(wanted, pool.map(one, wanted), strict=True):
                results[name] = result
        return results

    def status(self) -> dict:
        """Per configured channel: where it goes, counts, the last error (no secret)."""
        out: dict[str, dict] = {name: c.status() for name, c in self.channels.items()}
        for name, why in self.broken.items():
            out[name] = {"to": None, "off": why}
        return out

    def describe(self) -> dict:
        """What the settings page shows: the threshold and each channel, configured or not."""
        return {"min_severity": self.cfg.min_severity, "max_per_minute": self.cfg.max_per_minute,
                "channels": {c: (self.channels[c].sender.to if c in self.channels else None)
                             for c in CHANNELS},
                "off": dict(self.broken)}

    def close(self) -> None:
        for c in self.channels.values():
            c.close()
