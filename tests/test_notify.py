"""Notifications (appliance.supervisor.notify) against real servers on 127.0.0.1 (lab.notifyservers):
an SMTP relay (aiosmtpd) with STARTTLS and AUTH, a webhook receiver that checks the HMAC and the
timestamp, and a receiver speaking ntfy's publishing API. The supervisor is a real one (store,
rules, explain) on a fake data path; the HA alert event is checked on a real mosquitto."""
import asyncio
import datetime
import email
import email.policy
import json
import logging
import os
import time
import urllib.request

import pytest
from fakes import FakeDataplane

from appliance import cli, config
from appliance.errors import ConfigError
from appliance.supervisor import notify
from appliance.supervisor.core import Supervisor
from appliance.supervisor.ops import Ops
from lab.mudserver import TestCA
from lab.notifyservers import NtfyReceiver, SmtpRelay, WebhookReceiver, free_port

SATURDAY = "2024-06-01T21:00:08+00:00"      # 23:00:08 in Berlin (CEST)
TOKEN = "tk_n0tify-t0ken-SECRET"
HOOK_SECRET = "whsec-0123456789-SECRET"
SMTP_PASSWORD = "smtp-pa55word-SECRET"
SECRETS = (TOKEN, HOOK_SECRET, SMTP_PASSWORD)
FAST = {"backoff": (0.02, 0.05, 0.1), "window": 1.0}


def secret_file(tmp_path, name, value, mode=0o600):
    path = tmp_path / name
    path.write_text(value + "\n")
    path.chmod(mode)
    return str(path)


def make_sup(tmp_path, explained=True, **kwargs) -> Supervisor:
    """A supervisor (camera1, plug1) whose [notify] is `notify`; its notifier tries fast and
    its "minute" is 1 s. With `explained`, its words are ops' (as appliance.run wires them)."""
    notify_keys = {k: v for k, v in kwargs.items() if k not in ("backoff", "window")}
    cfg = config.Config()
    cfg.state.directory = str(tmp_path / "state")
    cfg.mqtt.password_file = str(tmp_path / "mqtt-supervisor")
    cfg.gateway.gate_credentials = str(tmp_path / "gate-credentials.json")
    for k, v in notify_keys.items():
        setattr(cfg.notify, k, v)
    cfg.check()
    sup = Supervisor(cfg)
    sup.notifier.close()
    sup.notifier = notify.Notifier(cfg.notify, now=sup.now, timezone=lambda: sup.settings()["timezone"],
                                   on_failure=sup._notify_failed,
                                   backoff=kwargs.get("backoff", FAST["backoff"]),
                                   window=kwargs.get("window", FAST["window"]))
    sup.attach(FakeDataplane(), loop=None)
    sup.add_device("camera1", "02:4b:00:00:00:01", "198.18.0.10", "camera", approve=True)
    sup.add_device("plug1", "02:4b:00:00:00:02", "198.18.0.11", "plug", approve=True)
    if explained:
        ops = Ops(sup)
        sup.notifier.explain = lambda alert: ops.alert_event(alert)["explanation"]
    return sup


@pytest.fixture
def sups():
    made: list[Supervisor] = []
    yield made
    for s in made:
        s.close()


def probe(sup):
    """plug1 opens the gateway's SSH port: a critical gateway-probe, and quarantine."""
    sup.clock.set(SATURDAY)
    Ops(sup).update_settings({"timezone": "Europe/Berlin"}, "test")
    sup.on_kernel_alerts([("plug1", "gateway-probe", {"reason": "gateway", "umbox": "gateway_guard",
                                                      "src": "198.18.0.11", "dst": "198.18.0.1",
                                                      "dst_port": 22, "proto": 6, "action": "dropped",
                                                      "count": 1})])


def alarm(sup, device="camera1", kind="test-alarm", severity="warning"):
    return sup.raise_alert(device, kind, "operator", {"message": "a test"}, time.monotonic_ns(),
                           severity=severity)


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def await_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


SENTENCE = ("plug1 tried to open the gateway's SSH port (22) at 23:00:08. A device that does this is "
            "probably taken over, so it is in quarantine")


# -- the config ---------------------------------------------------------------------------------

def load(tmp_path, text):
    path = tmp_path / "kalki.toml"
    path.write_text(text)
    return config.load(path)


def test_defaults_send_nothing_and_are_documented():
    n = config.Config().check().notify
    assert (n.min_severity, n.ntfy_url, n.webhook_url, n.smtp_host) == ("warning", "", "", "")
    assert (n.smtp_port, n.smtp_starttls, n.timeout_seconds, n.max_per_minute) == (587, True, 10, 10)
    text = config.defaults_toml()
    assert "[notify]" in text and "smtp_password_file" in text and "max_per_minute" in text
    assert notify.Notifier(n, now=lambda: None).channels == {}


@pytest.mark.parametrize("table, key, words", [
    ('min_severity = "loud"', "notify.min_severity", "known: info, warning, critical"),
    ('ntfy_url = "http://ntfy.sh"\nntfy_topic = "t"', "notify.ntfy_url", "http (no TLS) only"),
    ('ntfy_url = "ftp://ntfy.example.com"\nntfy_topic = "t"', "notify.ntfy_url", "https://"),
    ('ntfy_url = "https://me:pw@ntfy.sh"\nntfy_topic = "t"', "notify.ntfy_url", "no user or password"),
    ('ntfy_url = "https://ntfy.sh"\nntfy_topic = "no spaces"', "notify.ntfy_topic", "letters"),
    ('ntfy_url = "https://ntfy.sh"', "notify.ntfy_topic", "letters"),
    ('ntfy_topic = "alerts"', "notify.ntfy_topic", "ntfy_url is empty"),
    ('ntfy_url = "https://ntfy.sh"\nntfy_topic = "t"\nntfy_token_file = "/nonexistent/token"',
     "notify.ntfy_token_file", "No such file"),
    ('webhook_url = "https://hooks.example.com/x"', "notify.webhook_secret_file", "needed"),
    ('webhook_url = "http://8.8.8.8/hook"\nwebhook_secret_file = "/etc/hostname"', "notify.webhook_url",
     "loopback or LAN"),
    ('smtp_host = "mail.example.com"\nsmtp_from = "kalki"\nsmtp_to = ["me@example.com"]',
     "notify.smtp_from", "not an e-mail address"),
    ('smtp_host = "mail.example.com"\nsmtp_from = "k@example.com"\nsmtp_to = ["me@example.com", "you"]',
     "notify.smtp_to[1]", "not an e-mail address"),
    ('smtp_host = "mail.example.com"\nsmtp_from = "k@example.com"', "notify.smtp_to", "at least one"),
    ('smtp_host = "mail.example.com"\nsmtp_starttls = false\nsmtp_from = "k@example.com"\n'
     'smtp_to = ["me@example.com"]', "notify.smtp_starttls", "loopback or LAN"),
    ('smtp_host = "mail.example.com"\nsmtp_user = "k"\nsmtp_from = "k@example.com"\n'
     'smtp_to = ["me@example.com"]', "notify.smtp_password_file", "go together"),
    ('smtp_host = "mail.example.com"\nsmtp_ca_file = "/nonexistent.pem"\nsmtp_from = "k@example.com"\n'
     'smtp_to = ["me@example.com"]', "notify.smtp_ca_file", "PEM"),
    ('smtp_to = ["me@example.com"]', "notify.smtp_to", "smtp_host is empty"),
    ('smtp_pasword_file = "/x"', "notify", "unknown key"),
    ("timeout_seconds = 0", "notify.timeout_seconds", "1 to 120"),
    ("max_per_minute = 0", "notify.max_per_minute", "1 to 600"),
    ('smtp_to = "me@example.com"', "notify.smtp_to", "expected list"),
])
def test_config_errors_name_the_key(tmp_path, table, key, words):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, f"[notify]\n{table}\n")
    assert key in str(e.value) and words in str(e.value), str(e.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://192.168.1.5/ntfy", "http://ntfy.lan",
                                 "http://pi.local:81", "http://[::1]:8080", "https://ntfy.sh"])
def test_http_only_to_loopback_or_lan(tmp_path, url):
    assert load(tmp_path, f'[notify]\nntfy_url = "{url}"\nntfy_topic = "kalki"\n').notify.ntfy_url == url


def test_a_secret_readable_by_others_is_a_warning_never_shown(tmp_path, caplog):
    path = secret_file(tmp_path, "token", TOKEN, mode=0o644)
    with caplog.at_level(logging.WARNING, "kalki.notify"):
        assert notify.read_secret(path, "ntfy_token_file") == TOKEN
    assert "0600 recommended" in caplog.text and TOKEN not in caplog.text


# -- ntfy ---------------------------------------------------------------------------------------

def test_ntfy_gets_the_alert_in_words_with_its_headers(tmp_path, sups):
    with NtfyReceiver(token=TOKEN) as ntfy:
        sup = make_sup(tmp_path, ntfy_url=ntfy.url, ntfy_topic="kalki-home",
                       ntfy_token_file=secret_file(tmp_path, "ntfy-token", TOKEN))
        sups.append(sup)
        probe(sup)
        got = ntfy.wait(1)[0]
    assert got["topic"] == "kalki-home" and got["method"] == "POST"
    assert got["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert got["title"] == "Kalki: critical gateway-probe on plug1"
    assert got["priority"] == 5 and got["tags"] == ["rotating_light", "gateway-probe"]
    assert got["message"].startswith(SENTENCE)
    assert "\nDevice: plug1\nKind: gateway-probe\nSeverity: critical\nTime: Sat 1 Jun 2024 23:00:08 CEST" \
        in got["message"]
    st = Ops(sup).status()["notify"]["ntfy"]
    assert (st["sent"], st["failed"], st["last_error"]) == (1, 0, None)
    assert "kalki-home" not in json.dumps(Ops(sup).status()["notify"])   # the topic is a secret too


def test_ntfy_without_the_right_token_fails_and_says_why(tmp_path, sups):
    with NtfyReceiver(token="tk_another") as ntfy:
        sup = make_sup(tmp_path, ntfy_url=ntfy.url, ntfy_topic="kalki-home",
                       ntfy_token_file=secret_file(tmp_path, "ntfy-token", TOKEN))
        sups.append(sup)
        r = asyncio.run(Ops(sup).notify_test())
    assert r["ntfy"]["ok"] is False and r["ntfy"]["error"] == "HTTP 401 Unauthorized"


# -- the webhook --------------------------------------------------------------------------------

def test_webhook_is_signed_over_timestamp_and_body(tmp_path, sups):
    with WebhookReceiver(HOOK_SECRET.encode()) as hook:
        sup = make_sup(tmp_path, webhook_url=f"{hook.url}/kalki?k=1",
                       webhook_secret_file=secret_file(tmp_path, "hook", HOOK_SECRET))
        sups.append(sup)
        probe(sup)
        got = hook.wait(1)[0]
        body = got["json"]
        assert got["headers"]["X-Kalki-Event"] == "alert"
        assert got["headers"]["X-Kalki-Signature"].startswith("sha256=")
        assert abs(int(got["headers"]["X-Kalki-Timestamp"]) - time.time()) < 60
        assert (body["event"], body["device"], body["kind"], body["severity"]) == \
            ("alert", "plug1", "gateway-probe", "critical")
        assert body["text"].startswith(SENTENCE)
        assert body["local_time"] == "Sat 1 Jun 2024 23:00:08 CEST"
        assert body["alert"]["details"]["dst_port"] == 22 and body["alert"]["source"] == "kernel"
        assert hook.refused == []

        def post(headers, data):
            req = urllib.request.Request(hook.url, data=data, headers=headers, method="POST")
            try:
                return urllib.request.urlopen(req, timeout=5).status
            except urllib.error.HTTPError as e:
                return e.code
        headers = {k: v for k, v in got["headers"].items() if k.startswith("X-Kalki")}
        # the same request again is a replay; another time under the same signature is forged
        assert post(headers, got["body"]) == 401
        assert post({**headers, "X-Kalki-Timestamp": str(int(time.time()) + 1),
                     "X-Kalki-Delivery": "other"}, got["body"]) == 401
        old = str(int(time.time()) - 3600)
        sender = sup.notifier.channels["webhook"].sender
        assert post({**headers, "X-Kalki-Timestamp": old, "X-Kalki-Delivery": "other2",
                     "X-Kalki-Signature": sender.signed(got["body"], old)}, got["body"]) == 401
        assert hook.refused == ["replayed delivery", "bad signature", "stale timestamp"]


# -- e-mail -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    ca = TestCA(tmp_path_factory.mktemp("smtp-ca"), name="Kalki test SMTP CA")
    return ca, ca.server_context(("localhost", "127.0.0.1"))


def email_keys(tmp_path, relay, ca_file, **over):
    keys = {"smtp_host": "127.0.0.1", "smtp_port": relay.port, "smtp_ca_file": str(ca_file),
            "smtp_user": "kalki", "smtp_password_file": secret_file(tmp_path, "smtp", SMTP_PASSWORD),
            "smtp_from": "kalki@gateway.example.com", "smtp_to": ["ops@example.com", "me@example.org"]}
    return {**keys, **over}


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_email_over_starttls_with_login(tmp_path, sups, ca, mechanism):
    authority, context = ca
    with SmtpRelay(context, {"kalki": SMTP_PASSWORD}, mechanisms=(mechanism,)) as relay:
        sup = make_sup(tmp_path, **email_keys(tmp_path, relay, authority.cert_path))
        sups.append(sup)
        probe(sup)
        mail = relay.wait(1)[0]
    assert mail.tls and mail.login == "kalki" and mail.mechanism == mechanism
    assert mail.mail_from == "kalki@gateway.example.com"
    assert mail.rcpt_tos == ["ops@example.com", "me@example.org"]
    assert mail.headers["Subject"] == "Kalki: critical gateway-probe on plug1"
    assert mail.headers["To"] == "ops@example.com, me@example.org"
    assert mail.headers["X-Kalki-Severity"] == "critical"
    text = email.message_from_bytes(mail.content, policy=email.policy.default).get_content()
    assert SENTENCE in text and "Time: Sat 1 Jun 2024 23:00:08 CEST" in text
    assert SMTP_PASSWORD not in text


def test_email_refuses_a_relay_without_starttls_or_with_another_certificate(tmp_path, sups, ca):
    authority, context = ca
    with SmtpRelay(None, {}) as plain:
        sup = make_sup(tmp_path, **email_keys(tmp_path, plain, authority.cert_path))
        sups.append(sup)
        r = asyncio.run(Ops(sup).notify_test("email"))["email"]
        assert not r["ok"] and "STARTTLS" in r["error"], r
        assert plain.received == []
    other = TestCA(tmp_path / "other-ca", name="Someone else's CA")
    with SmtpRelay(context, {"kalki": SMTP_PASSWORD}) as relay:
        sup = make_sup(tmp_path, **email_keys(tmp_path, relay, other.cert_path))
        sups.append(sup)
        r = asyncio.run(Ops(sup).notify_test("email"))["email"]
        assert not r["ok"] and "certificate" in r["error"], r
        assert relay.received == []


def test_email_with_the_wrong_password_fails_without_showing_it(tmp_path, sups, ca, caplog):
    authority, context = ca
    with SmtpRelay(context, {"kalki": "the-real-one"}) as relay, caplog.at_level(logging.DEBUG):
        sup = make_sup(tmp_path, **email_keys(tmp_path, relay, authority.cert_path))
        sups.append(sup)
        r = asyncio.run(Ops(sup).notify_test("email"))["email"]
        assert set(relay.failed_logins) == {"kalki"}     # smtplib tries PLAIN, then LOGIN
    assert not r["ok"] and r["error"].startswith("SMTP 535"), r
    assert SMTP_PASSWORD not in caplog.text and SMTP_PASSWORD not in json.dumps(r)


def test_email_without_starttls_to_a_loopback_relay(tmp_path, sups):
    """smtp_starttls = false, to a relay on the same host (or the LAN), and no login."""
    with SmtpRelay(None, {}) as relay:
        sup = make_sup(tmp_path, smtp_host="127.0.0.1", smtp_port=relay.port, smtp_starttls=False,
                       smtp_from="kalki@gateway.example.com", smtp_to=["ops@example.com"])
        sups.append(sup)
        alarm(sup, severity="critical")
        mail = relay.wait(1)[0]
    assert not mail.tls and mail.login is None and mail.rcpt_tos == ["ops@example.com"]


# -- what is sent, and how often ----------------------------------------------------------------

def test_only_alerts_at_or_above_min_severity(tmp_path, sups):
    with NtfyReceiver() as ntfy:
        sup = make_sup(tmp_path, min_severity="critical", ntfy_url=ntfy.url, ntfy_topic="k")
        sups.append(sup)
        alarm(sup, kind="minor", severity="info")
        alarm(sup, kind="middling", severity="warning")
        alarm(sup, kind="major", severity="critical")
        ntfy.wait(1)
        time.sleep(0.3)
    assert [m["title"] for m in ntfy.received] == ["Kalki: critical major on camera1"]


def test_more_than_max_per_minute_are_summed_up_at_the_end_of_the_minute(tmp_path, sups):
    with NtfyReceiver() as ntfy:
        sup = make_sup(tmp_path, ntfy_url=ntfy.url, ntfy_topic="k", max_per_minute=3)
        sups.append(sup)
        for _ in range(5):
            alarm(sup, "camera1", "brute-force-ish")
        for _ in range(2):
            alarm(sup, "plug1", "odd-power")
        alarm(sup, "plug1", "worse", severity="critical")
        ntfy.wait(3)
        assert len(ntfy.received) == 3        # the minute's share; the rest wait for its end
        got = ntfy.wait(4, timeout=5)
        time.sleep(0.3)
    assert len(got) == 4
    summary = got[3]
    assert summary["title"] == "Kalki: 5 more alerts" and summary["priority"] == 5
    assert summary["message"].startswith("5 more alerts in the last minute, not sent one by one: "
                                         "3 from plug1 (odd-power ×2, worse); 2 from camera1 "
                                         "(brute-force-ish ×2).")
    st = Ops(sup).status()["notify"]["ntfy"]
    assert (st["sent"], st["summed_up"], st["failed"]) == (4, 5, 0)


def test_a_dead_server_is_retried_then_counted_with_one_notify_failed_alert(tmp_path, sups):
    dead = f"http://127.0.0.1:{free_port()}"       # nothing listens there

    async def main(hook):
        sup = make_sup(tmp_path, ntfy_url=dead, ntfy_topic="k", webhook_url=hook.url,
                       webhook_secret_file=secret_file(tmp_path, "hook", HOOK_SECRET))
        sups.append(sup)
        sup.notifier.loop = asyncio.get_running_loop()
        alarm(sup, kind="first", severity="critical")
        alarm(sup, kind="second", severity="critical")
        ntfy = sup.notifier.channels["ntfy"]
        await await_until(lambda: ntfy.status()["failed"] == 2, what="both ntfy messages to fail")
        await await_until(lambda: len(hook.received) == 3, what="the webhook's 2 alerts and the failure")
        await asyncio.sleep(0.3)       # a notify-failed sent to ntfy itself would fail a 3rd time
        return sup, ntfy.status()

    with WebhookReceiver(HOOK_SECRET.encode()) as hook:
        sup, st = asyncio.run(main(hook))
    assert (st["failed"], st["retried"], st["sent"]) == (2, 6, 0)
    assert st["last_error"].startswith("cannot reach the server: ") and "refused" in st["last_error"]
    failures = [a for a in sup.store.alerts(limit=100) if a["type"] == "notify-failed"]
    assert len(failures) == 1      # at most one an hour per channel
    assert failures[0]["details"] == {"channel": "ntfy", "error": st["last_error"], "failed": 1}
    assert [m["json"]["kind"] for m in hook.received] == ["first", "second", "notify-failed"]
    assert hook.received[2]["json"]["text"].startswith("Notifications by ntfy failed at ")
    assert "(cannot reach the server: Connection refused; 1 so far)" in hook.received[2]["json"]["text"]
    assert hook.received[2]["json"]["severity"] == "warning"


def test_a_slow_server_never_delays_raise_alert(tmp_path, sups):
    """The server takes 5 s to answer: raising alerts takes what it takes without notifying."""
    with NtfyReceiver() as ntfy:
        ntfy.delay = 5.0
        sup = make_sup(tmp_path, ntfy_url=ntfy.url, ntfy_topic="k")
        sups.append(sup)

        async def main():
            sup.notifier.loop = asyncio.get_running_loop()
            ticks = []

            async def ticker():
                while True:
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.01)
            t = asyncio.create_task(ticker())
            await asyncio.sleep(0.05)
            started = time.monotonic()
            for i in range(3):
                alarm(sup, kind=f"slow-{i}", severity="critical")
            took = time.monotonic() - started
            await asyncio.sleep(0.5)
            t.cancel()
            return took, max(b - a for a, b in zip(ticks, ticks[1:], strict=False))
        took, worst_gap = asyncio.run(main())
        assert len(ntfy.received) <= 1           # the first is still being answered
        ntfy.delay = 0.0
    assert took < 0.5, took
    assert worst_gap < 0.5, worst_gap


def test_secrets_never_in_logs_status_or_the_page_data(tmp_path, sups, ca, caplog):
    authority, context = ca
    with NtfyReceiver(token="tk_other") as ntfy, WebhookReceiver(b"another secret") as hook, \
            SmtpRelay(context, {"kalki": "not-this"}) as relay, caplog.at_level(logging.DEBUG):
        sup = make_sup(tmp_path, ntfy_url=ntfy.url, ntfy_topic="k",
                       ntfy_token_file=secret_file(tmp_path, "t", TOKEN), webhook_url=hook.url,
                       webhook_secret_file=secret_file(tmp_path, "h", HOOK_SECRET),
                       **email_keys(tmp_path, relay, authority.cert_path))
        sups.append(sup)
        ops = Ops(sup)
        results = asyncio.run(ops.notify_test())
        alarm(sup, severity="critical")
        wait_until(lambda: all(c.status()["failed"] == 1 for c in sup.notifier.channels.values()),
                   what="every channel to fail once")
        seen = json.dumps([results, ops.status(), ops.notify_settings(), ops.alerts(limit=20),
                           ops.decisions(limit=50)], default=str)
    assert {c: r["ok"] for c, r in results.items()} == {"ntfy": False, "webhook": False, "email": False}
    # the test, 4 tries of the alert and of the others' notify-failed alerts: every one refused
    assert len(hook.refused) >= 5 and set(hook.refused) == {"bad signature"}
    for secret in SECRETS:
        assert secret not in caplog.text and secret not in seen
    assert sup.notifier.mask(f"x {TOKEN} y") == "x *** y"


def test_a_secret_file_gone_at_start_turns_its_channel_off_and_says_so(tmp_path, sups):
    path = secret_file(tmp_path, "hook", HOOK_SECRET)
    cfg = config.Config()
    cfg.notify.webhook_url, cfg.notify.webhook_secret_file = "https://hooks.example.com/k", path
    cfg.check()
    os.unlink(path)
    n = notify.Notifier(cfg.notify, now=lambda: datetime.datetime.now(datetime.UTC))
    assert n.channels == {} and "No such file" in n.broken["webhook"]
    assert n.status()["webhook"]["off"].startswith("notify.webhook_secret_file: ")
    r = n.test()
    assert r["webhook"]["ok"] is False and "No such file" in r["webhook"]["error"]


# -- ops, the command, the page -----------------------------------------------------------------

def test_notify_test_sends_on_each_channel_or_one(tmp_path, sups, ca):
    authority, context = ca
    with NtfyReceiver() as ntfy, WebhookReceiver(HOOK_SECRET.encode()) as hook, \
            SmtpRelay(context, {"kalki": SMTP_PASSWORD}) as relay:
        sup = make_sup(tmp_path, ntfy_url=ntfy.url, ntfy_topic="k", webhook_url=hook.url,
                       webhook_secret_file=secret_file(tmp_path, "h", HOOK_SECRET),
                       **email_keys(tmp_path, relay, authority.cert_path))
        sups.append(sup)
        ops = Ops(sup)
        r = asyncio.run(ops.notify_test())
        assert {c: x["ok"] for c, x in r.items()} == {"ntfy": True, "webhook": True, "email": True}, r
        assert r["email"]["to"] == f"ops@example.com, me@example.org through 127.0.0.1:{relay.port}"
        assert r["ntfy"]["to"] == f"{ntfy.url} (a topic)"
        assert ntfy.received[0]["title"] == "Kalki: test notification"
        assert hook.received[0]["json"]["event"] == "test"
        assert relay.received[0].headers["Subject"] == "Kalki: test notification"
        assert list(asyncio.run(ops.notify_test("webhook"))) == ["webhook"]
        assert len(hook.received) == 2 and len(ntfy.received) == 1
    audit = [d for d in ops.decisions(kind="audit", limit=20) if d["event"] == "notify-test"]
    assert [a["details"] for a in audit] == [
        {"webhook": {"ok": True, "error": None}},
        {c: {"ok": True, "error": None} for c in ("ntfy", "webhook", "email")}]
    # a test is not an alert, and is not counted as one
    assert sup.store.alerts(limit=10) == [] and ops.status()["notify"]["ntfy"]["sent"] == 0
    with pytest.raises(ConfigError, match="unknown channel 'pager'"):
        asyncio.run(ops.notify_test("pager"))


def test_notify_test_of_a_channel_not_configured(tmp_path, sups):
    sup = make_sup(tmp_path)
    sups.append(sup)
    with pytest.raises(ConfigError, match="no channel is configured"):
        asyncio.run(Ops(sup).notify_test())
    with pytest.raises(ConfigError, match="email is not configured"):
        asyncio.run(Ops(sup).notify_test("email"))


def test_the_command(monkeypatch, capsys):
    asked = {}

    def request(socket, op, timeout=30.0, **args):
        asked.update(op=op, args=args)
        return {"ntfy": {"ok": True, "error": None, "to": "https://ntfy.sh (a topic)", "seconds": 0.2},
                "email": {"ok": False, "error": "SMTP 535 no", "to": "a@b.c through m:587", "seconds": 1}}
    monkeypatch.setattr("appliance.client.request", request)
    assert cli.main(["notify", "test"]) == 1
    out = capsys.readouterr().out
    assert asked == {"op": "notify_test", "args": {}}
    assert "ntfy     sent to https://ntfy.sh (a topic) (0.2 s)" in out
    assert "email    FAILED to a@b.c through m:587: SMTP 535 no" in out
    cli.main(["notify", "test", "--channel", "ntfy"])
    assert asked["args"] == {"channel": "ntfy"}
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["notify", "test", "--channel", "pager"])


def test_the_settings_page_shows_channels_and_sends_a_test(tmp_path, sups):
    import test_web
    from test_web import client, login, set_admin

    async def main(ntfy):
        sup = make_sup(tmp_path, ntfy_url=ntfy.url, ntfy_topic="secret-topic",
                       ntfy_token_file=secret_file(tmp_path, "t", TOKEN))
        sup.cfg.web.tls = False
        sups.append(sup)
        set_admin(sup)
        async with client(sup) as c:
            token = await login(c)
            page = await (await c.get("/settings")).text()
            assert 'id="notifications"' in page and "Send a test" in page
            assert f"{ntfy.url} (a topic)" in page and "not configured" in page
            assert "secret-topic" not in page and TOKEN not in page
            r = await c.post("/settings/notify-test", data={"csrf": token, "channel": "ntfy"},
                             allow_redirects=False)
            assert r.status == 303, await r.text()
            page = await (await c.get("/settings")).text()
            assert "Test sent by ntfy." in page
            r = await c.post("/settings/notify-test", data={"channel": "ntfy"}, allow_redirects=False)
            assert r.status in (400, 403)          # no CSRF token: refused
        return ntfy.received

    assert test_web      # its helpers
    with NtfyReceiver(token=TOKEN) as ntfy:
        got = asyncio.run(main(ntfy))
    assert [m["title"] for m in got] == ["Kalki: test notification"]


# -- Home Assistant -----------------------------------------------------------------------------

class FakeBus:
    def __init__(self):
        self.events: list[tuple[dict, str]] = []

    def publish_alert(self, alert):
        pass

    def publish_posture(self, name, posture, since, attacked=None):
        pass

    def publish_decision(self, decision):
        pass

    def close(self):
        pass

    def publish_alert_event(self, alert, message):
        self.events.append((alert, message))


def test_alerts_at_min_severity_become_home_assistant_events(tmp_path, sups):
    sup = make_sup(tmp_path, min_severity="warning")
    sups.append(sup)
    sup.bus = FakeBus()
    alarm(sup, kind="minor", severity="info")
    probe(sup)
    assert [(a["type"], a["device"]) for a, _ in sup.bus.events] == [("gateway-probe", "plug1")]
    assert sup.bus.events[0][1].startswith(SENTENCE)


@pytest.mark.skipif(not os.path.exists("/usr/sbin/mosquitto"), reason="mosquitto is not installed")
def test_home_assistant_event_entity_on_a_real_broker(tmp_path):
    from test_mqtt import Client, retained

    from appliance.system.broker import Broker, random_password
    from appliance.telemetry.mqtt import Bus
    users = {"kalki": random_password(), "light1": random_password()}
    with Broker(tmp_path, port=free_port(), users=users) as broker:
        bus = Bus("127.0.0.1", broker.port, "kalki", users["kalki"], known_device=lambda n: n == "light1",
                  on_telemetry=lambda d, p: None, on_availability=lambda d, s: None)
        try:
            bus.wait_connected(5)
            bus.publish_discovery("light1", "light").wait_for_publish(5)
            config_ = json.loads(retained(broker, "homeassistant/event/kalki_light1/alert/config"))
            assert config_["state_topic"] == "kalki/light1/alert"
            assert config_["event_types"] == ["info", "warning", "critical"]
            assert config_["unique_id"] == "kalki_light1_alert"
            assert config_["device"]["identifiers"] == ["kalki_light1"]   # the posture sensor's device
            gateway = json.loads(retained(broker, "homeassistant/event/kalki_bridge/alert/config"))
            assert gateway["state_topic"] == "kalki/bridge/event"
            watcher = Client(broker, "kalki")
            watcher.subscribe("kalki/+/alert")
            watcher.subscribe("kalki/bridge/event")
            bus.publish_alert_event({"device": "light1", "type": "brute-force", "severity": "critical",
                                     "at": SATURDAY, "source": "kernel"}, "light1 was attacked.")
            bus.publish_alert_event({"device": None, "type": "tamper", "severity": "critical",
                                     "at": SATURDAY, "source": "supervisor"}, "Something changed.")
            wait_until(lambda: len(watcher.messages) == 2, what="the two alert events")
            got = {m.topic: json.loads(m.payload) for m in watcher.messages}
            assert got["kalki/light1/alert"] == {"event_type": "critical", "kind": "brute-force",
                                                 "device": "light1", "message": "light1 was attacked.",
                                                 "at": SATURDAY, "source": "kernel"}
            assert got["kalki/bridge/event"]["kind"] == "tamper"
            assert not any(m.retain for m in watcher.messages)
            watcher.close()
            bus.remove_discovery("light1").wait_for_publish(5)
            assert retained(broker, "homeassistant/event/kalki_light1/alert/config") is None
        finally:
            bus.close()

