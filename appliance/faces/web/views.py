"""Server-rendered pages: small, escaped HTML; the JavaScript is a static file (no inline script,
so the CSP can forbid it)."""
from __future__ import annotations

import asyncio
import html
import json
import re
from urllib.parse import urlencode, urlsplit

from microdot import Response

from appliance.errors import ConfigError, KalkiError
from appliance.faces.web import leds
from appliance.faces.web.graph import posture_graph_svg
from appliance.faces.web.http import (
    MAX_BODY,
    client_address,
    html_response,
    json_response,
    route,
    see_other,
    upload_name,
)
from appliance.faces.web.http import files as form_files
from appliance.faces.web.http import form as form_data
from appliance.faces.web.http import state as web_state
from appliance.faces.web.icons import icon
from appliance.supervisor.ops import (
    MAX_PASSWORD,
    MIN_PASSWORD,
    RULE_EXAMPLE,
    SETTABLE_POSTURES,
    destination_words,
    error_status,
    seconds_words,
)
from appliance.vocab import DAYS

NAV = (("/", "Overview"), ("/alerts", "Alerts"), ("/profiles", "Profiles"), ("/rules", "Rules"),
       ("/audit", "Audit"), ("/settings", "Settings"), ("/leds", "LEDs"))


def e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def j(value) -> str:
    return e(json.dumps(value, sort_keys=True, default=str))


def when_html(ops, at, empty: str = "—") -> str:
    """A stored time as the page shows every time: in the site's time zone ("23:00:08" today,
    "Sat 23:00" within a week, a date beyond; the full date and zone in its title) and how long
    ago, which the page's script keeps current (data-at, seconds since 1970). Never the ISO
    text itself."""
    w = ops.when(at)
    if w is None:
        return e(at) if at else empty
    return when_of(w)


def at_html(ops, rec: dict) -> str:
    """A log record's time (when_html), marked where the clock went back before it."""
    return when_html(ops, rec.get("at")) + clock_back_html(rec)


def clock_back_html(rec: dict) -> str:
    """The store marks a record stamped earlier than the one recorded before it in its list
    ("clock_back"): the lists read in the order things happened, so its time seems to run
    backwards, and this says why."""
    if not rec.get("clock_back"):
        return ""
    return (' <span class="clock-back muted" title="The policy clock was set back (or stepped back) '
            'before this: it happened after the entries below, at the time shown by that clock.">'
            '(clock went back)</span>')


def when_of(w: dict | None, empty: str = "—") -> str:
    """when_html() of a time ops.when() gave already."""
    if not w:
        return empty
    return (f'<time title="{e(w["title"])}">{e(w["local"])}</time> '
            f'<span class="ago muted" data-at="{e(w["epoch"])}">{e(w["ago"])}</span>')


def raw_details(value, summary: str = "details") -> str:
    """The raw JSON, behind a toggle."""
    return f'<details class="raw"><summary>{e(summary)}</summary><code>{j(value)}</code></details>'


def badge(device: dict) -> str:
    posture = device.get("posture") or "unknown"
    word = posture if device.get("approved") else "waiting for approval"
    return (f'<span class="posture posture-{e(posture)}" data-role="posture" '
            f'data-posture="{e(posture)}">{e(word)}</span>')


def csrf_field(request) -> str:
    return f'<input type="hidden" name="csrf" value="{e(request.g.session.csrf)}">'


def form(request, action: str, inner: str, button: str, cls: str = "") -> str:
    return (f'<form method="post" action="{e(action)}" class="{e(cls)}">{csrf_field(request)}'
            f'{inner}<button type="submit">{e(button)}</button></form>')


def cell(header, content) -> str:
    """A table's cell with its column's header beside it (data-label): on a phone the style
    sheet shows each row as a card, every value under its name, which a hidden head cannot."""
    return f'<td data-label="{e(header)}">{content}</td>'


def table(headers, rows, cls="") -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    labels = list(headers)
    body = "".join("<tr>" + "".join(cell(labels[i] if i < len(labels) else "", c) for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="muted">none</td></tr>'
    return f'<div class="scroll"><table class="{e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def page(request, title: str, body: str, *, status: int = 200, error: str | None = None,
         live: bool = False, nav: bool = True, charts: bool = False) -> Response:
    st = web_state(request)
    session = request.g.session
    flash = ""
    if session is not None and session.flash:
        flash = "".join(f'<p class="flash">{e(m)}</p>' for m in session.flash)
        session.flash.clear()
    if error:
        flash += f'<p class="error" role="alert">{e(error)}</p>'
    site_error = st.ops.site_error if hasattr(st, "ops") else None
    if site_error:   # the site settings on the card are wrong: the devices side stays closed
        flash += (f'<p class="error" id="site-error" role="alert">The site settings (kalki.toml '
                  f'on the SD card) are wrong, so the devices side stays closed: {e(site_error)}</p>')
    if hasattr(st, "ops") and getattr(request.g, "user", None):
        # Devices may reach each other without crossing the data path: a warning (amber), not an error.
        isolation = st.ops.status().get("isolation_warning")
        if isolation:
            flash += (f'<p class="summary summary-warning" id="isolation-warning" role="status">'
                      f'{e(isolation)}</p>')
    menu = ""
    if nav and request.g.user:
        links = "".join(f'<a href="{href}"{" class=current" if request.path == href else ""}>{e(t)}</a>'
                        for href, t in NAV)
        menu = (f'<nav>{links}<form method="post" action="/logout" class="inline">'
                f'{csrf_field(request)}<button type="submit" class="link">Log out</button></form></nav>')
    csrf = f'<meta name="csrf-token" content="{e(session.csrf)}">' if session else ""
    # the server's time, so that the script's "3 min ago" agrees with the page's (a lab's clock)
    w = st.ops.when(st.ops.now()) if hasattr(st, "ops") else None
    now = f' data-now="{e(w["epoch"])}"' if w else ""
    text = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{csrf}<title>{e(title)} · Kalki</title>
<link rel="stylesheet" href="/static/style.css">
{CHART_HEAD if charts else ""}<script src="/static/app.js" defer></script>
</head><body{' data-live="1"' if live else ''}{now}>
<header><a class="brand" href="/">Kalki</a>{menu}</header>
<main><h1>{e(title)}</h1>{flash}{body}</main>
</body></html>"""
    resp = html_response(text, status)
    if session is not None:
        st.set_cookie(resp, session)
    return resp


# uPlot (static/vendor/VENDORED.md) for the pages with charts; deferred scripts run in order, so
# it is there when app.js draws.
CHART_HEAD = ('<link rel="stylesheet" href="/static/vendor/uPlot.min.css">\n'
              '<script src="/static/vendor/uPlot.iife.min.js" defer></script>\n')


def done(request, message: str, to: str) -> Response:
    request.g.session.flash.append(message)
    return see_other(to)


def actor(request) -> str:
    return f"web:{request.g.user}"


# -- login, claim, logout ------------------------------------------------------------------

async def login_page(request, error=None, status=200):
    st = web_state(request)
    if not st.admin():
        return see_other("/claim")
    if request.g.user:
        return see_other("/")
    resp = Response()
    st.anonymous(request, resp)
    body = f"""<form method="post" action="/login" class="card narrow">{csrf_field(request)}
<label>User <input name="user" autocomplete="username" required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit" id="login">Log in</button></form>
<p class="muted">Forgot the password? Hold the button on the box for 5 seconds, then claim it again.</p>"""
    return page(request, "Log in", body, error=error, status=status, nav=False)


async def login_post(request):
    st = web_state(request)
    addr = client_address(request)
    retry = st.logins.retry_after(addr)
    if retry:
        resp = await login_page(request, f"Too many failed logins: try again in {retry} s.", 429)
        resp.headers["Retry-After"] = str(retry)
        return resp
    data = form_data(request)
    if not st.admin():
        return see_other("/claim")
    user, password = data.get("user"), data.get("password")
    ok = isinstance(password, str) and 0 < len(password) <= MAX_PASSWORD
    if ok:
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(None, st.ops.check_admin_password, user, password)
    if not ok:
        st.logins.fail(addr)
        return await login_page(request, "Wrong user or password.", 401)
    st.logins.clear(addr)
    if request.g.session:
        st.sessions.drop(request.g.session.id)      # a fresh id after login (fixation)
    session = request.g.session = st.sessions.new(user, st.ops.auth_epoch)
    resp = see_other("/")
    st.set_cookie(resp, session)
    return resp


async def logout_post(request):
    st = web_state(request)
    st.sessions.drop(request.g.session.id)
    resp = see_other("/login")
    resp.delete_cookie("kalki_session", path="/", http_only=True)
    return resp


async def claim_page(request, error=None, status=200):
    st = web_state(request)
    if st.admin():
        return see_other("/login")
    resp = Response()
    st.anonymous(request, resp)
    ops = st.ops
    if ops.claim_open():
        body = f"""<p class="ok" id="claim-open">The claim window is open. Choose the admin user and password.</p>
<form method="post" action="/claim" class="card narrow">{csrf_field(request)}
<label>User <input name="user" value="admin" autocomplete="username" required></label>
<label>Password (at least {MIN_PASSWORD} characters)
<input name="password" type="password" autocomplete="new-password" required minlength="{MIN_PASSWORD}"></label>
<label>Password again <input name="confirm" type="password" autocomplete="new-password" required></label>
<button type="submit" id="claim">Set the admin password</button></form>"""
    else:
        body = """<p class="press" id="press-button">Press the button on the box.</p>
<p>This gateway has no admin yet, and there is no default password. A short press of the button
opens a 5-minute window in which this page lets you choose one. This page checks every few
seconds.</p><p data-reload="3"></p>"""
    body += "<h2>What the LEDs say</h2>" + led_table()
    return page(request, "Claim this gateway", body, error=error, status=status, nav=False)


async def claim_post(request):
    st = web_state(request)
    addr = client_address(request)
    retry = st.logins.retry_after(addr)
    if retry:
        resp = await claim_page(request, f"Too many attempts: try again in {retry} s.", 429)
        resp.headers["Retry-After"] = str(retry)
        return resp
    data = form_data(request)
    try:
        st.ops.claim(data.get("user"), data.get("password"), data.get("confirm"),
                  actor=f"web:{addr}")
    except KalkiError as err:
        if not st.ops.claim_open():
            st.logins.fail(addr)
        return await claim_page(request, str(err), 400)
    request.g.session.flash.append("Admin password set: log in.")
    return see_other("/login")


def led_table() -> str:
    return table(("LEDs", "pattern", "what it means", "what to do"),
                 [(f"<strong>{e(p['leds'])}</strong>", e(p["name"]), e(p["meaning"]), e(p["action"]))
                  for p in leds.patterns()], "leds")


async def leds_page(request):
    now = leds.current(web_state(request).ops)
    shown = (f'<p class="big" id="led-now">Now: <strong>{e(now.get("shows"))}</strong> '
             f'({e(now.get("pattern"))}) — {e(now.get("meaning"))}</p>') if now else \
        '<p class="muted">The panel is off on this gateway ([panel] enabled = false).</p>'
    return page(request, "What the LEDs mean", shown + led_table() +
                "<p class=muted>The button: a short press opens the claim window (5 minutes); held 5 s "
                "it resets the admin password and signs everyone out (devices and protection stay); "
                "held 15 s it resets the gateway to factory settings.</p>")


# -- overview ------------------------------------------------------------------------------

SUMMARY_WORDS = {"normal": "All devices normal",
                 "warning": "Attention: a device is suspicious, learning or waits for approval, "
                            "or something needs the operator (see above)",
                 "alert": "Alert: a device is under attack or in quarantine"}


def summary_html(ops) -> str:
    s = ops.summary()
    return f'<p id="summary" class="summary summary-{e(s)}" data-summary="{e(s)}">{e(SUMMARY_WORDS.get(s, s))}</p>'


def type_select(ops, selected=None, name="type") -> str:
    types = ops.profile_types()
    opts = "".join(f'<option value="{e(t)}"{" selected" if t == selected else ""}>{e(t)}</option>'
                   for t in types)
    if selected and selected not in types:   # offered from the device's MUD file; installed at approval
        opts += f'<option value="{e(selected)}" selected>{e(selected)} (from its MUD file)</option>'
    return f'<select name="{e(name)}" aria-label="type">{opts}</select>'


def mud_offer_text(offer: dict) -> str:
    """What became of the MUD file the device names (mud.fetch), in words."""
    if offer.get("state") == "offered":
        return f"offered as type {offer.get('type')}: {offer.get('signature')} ({offer.get('url')})"
    if offer.get("state") == "fetching":
        return f"being fetched from {offer.get('url')}"
    return f"not offered: {offer.get('error')}"


async def overview(request, error=None, status=200):
    ops = web_state(request).ops
    devices = ops.devices()
    rows = []
    for d in devices:
        name = d["name"]
        action = ""
        if not d.get("approved"):
            action = form(request, f"/devices/{name}/approve",
                          type_select(ops, d.get("suggested_type") or d.get("type")), "Approve",
                          "inline approve")
        group = f' <span class="muted group">· {e(d["group"])}</span>' if d.get("group") else ""
        rows.append(f'<tr data-device="{e(name)}">'
                    + cell("Device", f'{icon(d.get("type"))} <a href="/devices/{e(name)}">{e(name)}</a>')
                    + cell("Posture", badge(d)) + cell("Type", f'{e(d.get("type") or "—")}{group}')
                    + cell("Address", e(d.get("ip"))) + cell("Last hour", spark(name))
                    + cell("", action) + '</tr>')
    if not rows:
        rows = ['<tr><td colspan="6" class="muted">no devices yet</td></tr>']
    maint = ops.maintenance_until()
    m_text = (f"Maintenance (automation paused) until {when_html(ops, maint)}." if maint and ops.maintenance_active()
              else "Automation is on.")
    alert_items = alert_list(request, ops.alert_rows(limit=10), "/")
    body = f"""{summary_html(ops)}{rules_off_html(ops)}
<div class="scroll"><table id="devices"><thead><tr><th>Device</th><th>Posture</th><th>Type</th><th>Address</th><th>Last hour</th><th></th></tr></thead>
<tbody>{''.join(rows)}</tbody></table></div>
<h2>Recent alerts</h2><ul id="alerts" class="alerts">{alert_items}</ul>
<p><a href="/alerts">All alerts</a></p>
{blocked_html(request, ops, "/")}
<h2>Maintenance</h2><p id="maintenance">{m_text}</p>
{form(request, "/maintenance", '<label>Pause automation for <input name="minutes" inputmode="numeric" size="4" value="30"> minutes (0 ends it)</label>', "Set", "inline")}"""
    return page(request, "Devices", body, error=error, status=status, live=True, charts=True)


def spark(name: str) -> str:
    """Where the page's script draws the device's packets of the last hour (passed, dropped)."""
    return f'<div class="spark" data-spark="{e(name)}" role="img" aria-label="packets of {e(name)} over the last hour"></div>'


# -- traffic and telemetry: the device page's charts (drawn by app.js from the JSON API) ---------

def size_words(count) -> str:
    """12345678 -> "12.3 MB" (the page's script says sizes the same way)."""
    if not isinstance(count, int):
        return "—"
    for unit, scale in (("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


SPAN_WORDS = {"hour": "In the last hour", "day": "In the last day"}


def traffic_html(ops, name: str) -> str:
    """The device's traffic charts (passed and dropped, packets and bytes per second) with a
    switch between the last hour and the last day, and the drops by reason in words; nothing if
    the charts are off."""
    try:
        t = ops.traffic(name, "hour")
    except KalkiError:
        return ""
    totals = t["totals"]
    said = (f'{SPAN_WORDS["hour"]}: {totals["passed_packets"]:,} packets passed '
            f'({size_words(totals["passed_bytes"])}), {totals["dropped_packets"]:,} dropped '
            f'({size_words(totals["dropped_bytes"])}).')
    drops = "".join(f'<li data-reason="{e(x["reason"])}">{x["packets"]:,} packets: {e(x["words"])}</li>'
                    for x in t["drops"]) or '<li class="muted">none dropped</li>'
    return f"""<section id="traffic" data-traffic="{e(name)}"><h2>Traffic</h2>
<p class="muted">What went through the gateway for this device, from the kernel's counters, read every 10 seconds: passed (green) and dropped (red). A gap is a time with no reading.</p>
<div class="span-switch" role="group" aria-label="how far back"><button type="button" data-span="hour" aria-pressed="true">Last hour</button> <button type="button" data-span="day" aria-pressed="false">Last day</button></div>
<h3>Packets per second</h3><div class="chart" data-chart="packets"></div>
<h3>Bytes per second</h3><div class="chart" data-chart="bytes"></div>
<h3>Why packets were dropped</h3><p id="traffic-totals">{e(said)}</p>
<ul id="drop-reasons" class="words">{drops}</ul></section>"""


def telemetry_value(value) -> str:
    if isinstance(value, (dict, list)):
        return f"<code>{j(value)}</code>"
    if isinstance(value, bool):
        return "true" if value else "false"
    return e(value)


def telemetry_html(ops, name: str) -> str:
    """The device's telemetry: its latest value of each key (one row per key), and a chart of
    each numeric key's recent values."""
    t = ops.telemetry_view(name)
    rows = [(f"<code>{e(x['key'])}</code>", f'<span data-role="value">{telemetry_value(x["value"])}</span>',
             e(x.get("meaning") or "—"), when_of(x.get("when")), e(x.get("source")))
            for x in t["latest"]]
    return f"""<section id="telemetry"><h2>Telemetry</h2>
<p class="muted">The latest value of each thing the device reports; below, how its numbers went over its last reports.</p>
{table(("key", "latest value", "what it is", "when", "from"), rows, "telemetry")}
<div id="telemetry-charts" class="charts" data-telemetry="{e(name)}"></div></section>"""


# -- alerts: why, in words; what to do about them; the sources blocked -----------------------

BLOCK_FOR = (("3600", "1 h"), ("900", "15 min"), ("86400", "1 day"), ("604800", "7 days"),
             ("0", "until unblocked"))
RAW_ALERT = ("id", "type", "device", "source", "severity", "details")
BACK = re.compile(r"/(alerts|devices/[A-Za-z0-9_-]{1,40})?")


def back_to(request, default: str = "/alerts") -> str:
    """Where a button on an alert returns to: the page it was on (a form's "next"), if it is one
    of the pages that show alerts."""
    to = form_data(request).get("next")
    return to if isinstance(to, str) and BACK.fullmatch(to) else default


def alert_list(request, alerts: list[dict], back: str) -> str:
    return "".join(alert_item(request, a, back) for a in alerts) or '<li class="muted">none</li>'


def alert_item(request, a: dict, back: str) -> str:
    """One alert (ops.alert_rows): severity, kind, device and when; what happened and what
    followed, in words; release, keep and block the source, until it is handled; the raw JSON
    behind a toggle."""
    dev, aid = a.get("device"), a.get("id")
    where = f' <a href="/devices/{e(dev)}">{e(dev)}</a>' if dev else ""
    head = (f'<span class="sev sev-{e(a.get("severity"))}">{e(a.get("severity"))}</span> '
            f'<span class="kind">{e(a.get("type"))}</span>{where} {when_of(a.get("when"))}{clock_back_html(a)}')
    said = f'<p class="explain" data-role="explanation">{e(a.get("explanation"))}</p>'
    handled, acts = a.get("handled"), a.get("actions") or {}
    if handled:
        w = handled.get("when")
        doing = (f'<p class="muted" data-role="handled">{e(handled["how"].capitalize())} by {e(handled.get("by"))}'
                 f'{", " + w["local"] + " (" + w["ago"] + ")" if w else ""}.</p>')
    else:
        nxt = f'<input type="hidden" name="next" value="{e(back)}">'
        buttons = []
        if acts.get("release"):
            buttons.append(form(request, f"/alerts/{aid}/release", nxt, f"Release {dev} (back to normal)",
                                "inline"))
        if acts.get("keep"):
            buttons.append(form(request, f"/alerts/{aid}/keep", nxt, "Keep", "inline"))
        if acts.get("block"):
            opts = "".join(f'<option value="{v}">{t}</option>' for v, t in BLOCK_FOR)
            buttons.append(form(request, f"/alerts/{aid}/block",
                                f'{nxt}<label>for <select name="seconds" aria-label="how long">{opts}</select></label>',
                                f"Block {acts['block']}", "inline"))
        doing = f'<div class="actions" data-role="actions">{"".join(buttons)}</div>' if buttons else ""
    raw = raw_details({k: a.get(k) for k in RAW_ALERT if k in a})
    return f'<li class="alert" data-alert="{e(aid)}">{head}{said}{doing}{raw}</li>'


def blocked_html(request, ops, back: str) -> str:
    """The sources in the kernel's drop set, until when, each with an unblock button."""
    rows = []
    for b in ops.blocked_sources():
        dev = b.get("device")
        until = "until unblocked" if b.get("until") is None else f"until {when_html(ops, b['until'])}"
        rows.append((f"<code>{e(b['source'])}</code>", e(b.get("why")),
                     f'<a href="/devices/{e(dev)}">{e(dev)}</a>' if dev else "—", until,
                     form(request, "/unblock", f'<input type="hidden" name="source" value="{e(b["source"])}">'
                          f'<input type="hidden" name="next" value="{e(back)}">', f"Unblock {b['source']}",
                          "inline")))
    return (f'<section id="blocked"><h2>Blocked sources</h2><p class="muted">Addresses the gateway drops '
            f'(its drop set): put there by a detector or by hand, each until it expires or is unblocked.</p>'
            f'{table(("source", "why", "device", "expires", ""), rows, "blocked")}</section>')


async def alerts_page(request, error=None, status=200):
    ops = web_state(request).ops
    device = request.args.get("device") or None
    try:
        rows = ops.alert_rows(device=device, limit=100)
    except (KalkiError, ValueError) as err:
        return page(request, "Alerts", f"<p>{e(err)}</p>", status=error_status(err))
    shown = f' for <a href="/devices/{e(device)}">{e(device)}</a>' if device else ""
    body = f"""<p class="muted">The last 100 alerts{shown}, newest first: what happened and what followed, in words. <strong>Release</strong> puts the device back to normal; <strong>Keep</strong> leaves it as it is and says you saw it; <strong>Block</strong> puts the source into the drop set.</p>
<ul id="alerts" class="alerts" data-max="100">{alert_list(request, rows, "/alerts")}</ul>
{blocked_html(request, ops, "/alerts")}"""
    return page(request, "Alerts", body, error=error, status=status, live=True)


async def _alert_action(request, what: str):
    ops = web_state(request).ops
    alert_id, to = request.url_args["id"], back_to(request)
    try:
        if what == "release":
            r = ops.alert_release(alert_id, actor=actor(request))
            said = f"{r['device']}: back to normal."
        elif what == "keep":
            ops.alert_keep(alert_id, actor=actor(request))
            said = f"Alert {alert_id} kept."
        else:
            r = ops.alert_block(alert_id, form_data(request).get("seconds"), actor=actor(request))
            said = (f"{r['blocked']} blocked " + (f"for {seconds_words(r['seconds'])}." if r["seconds"]
                                                  else "until unblocked."))
    except (KalkiError, ValueError) as err:
        return await alerts_page(request, str(err), error_status(err))
    return done(request, said, to)


async def alert_release_post(request):
    return await _alert_action(request, "release")


async def alert_keep_post(request):
    return await _alert_action(request, "keep")


async def alert_block_post(request):
    return await _alert_action(request, "block")


async def unblock_post(request):
    ops = web_state(request).ops
    source, to = form_data(request).get("source"), back_to(request)
    try:
        r = ops.unblock_source(source, by=actor(request))
    except (KalkiError, ValueError) as err:
        return await alerts_page(request, str(err), error_status(err))
    return done(request, f"{source} unblocked." if r["was_blocked"] else f"{source} was not blocked.", to)


async def maintenance_post(request):
    ops = web_state(request).ops
    data = form_data(request)
    try:
        r = ops.maintenance(_form_minutes(data.get("minutes")))
    except (KalkiError, ValueError) as err:
        return await overview(request, str(err), 400)
    until = ops.when(r["maintenance_until"])
    return done(request, f"Maintenance until {until['local']}." if until
         else "Maintenance ended.", "/")


# -- a device ------------------------------------------------------------------------------

async def device_page(request, error=None, status=200):
    ops = web_state(request).ops
    name = request.url_args["name"]
    try:
        d = ops.device_detail(name)
    except KalkiError as err:
        return page(request, "No such device", f"<p>{e(err)}</p>", status=error_status(err))
    ident = [("MAC", e(d.get("mac"))), ("Address", e(d.get("ip"))),
             ("Type", f'{icon(d.get("type"))} {e(d.get("type") or "—")}'),
             ("Approved", "yes" if d.get("approved") else "no"), ("Group", e(d.get("group") or "—")),
             ("MQTT", e(d.get("availability") or "—")), ("First seen", when_html(ops, d.get("first_seen"))),
             ("Last seen", when_html(ops, d.get("last_seen")))]
    if d.get("mqtt_user"):      # renamed: its firmware still speaks as the name it was set up with
        ident.append(("MQTT user and topic", f"{e(d['mqtt_user'])} (kalki/{e(d['mqtt_user'])})"))
    former = [f.get("name") for f in d.get("former_names") or []]
    if former:
        ident.append(("Formerly", e(", ".join(reversed(former)))))
    ident += [(k, e(v)) for k, v in (d.get("identity") or {}).items() if v]
    if d.get("mud_offer"):
        ident.append(("MUD file", e(mud_offer_text(d["mud_offer"]))))
    ident_html = "<dl class='facts'>" + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in ident) + "</dl>"
    p = f'<p class="big" data-device="{e(name)}">{badge(d)} <span class="muted">since {when_html(ops, d.get("posture_since"))}'
    if d.get("posture_expires"):
        p += f' · until {when_html(ops, d["posture_expires"])}, then {e(d.get("posture_revert_to"))}'
    p += "</span></p>"
    if d.get("approved"):
        posture_opts = "".join(f'<option value="{x}"{" selected" if x == d.get("posture") else ""}>{x}</option>'
                               for x in SETTABLE_POSTURES)
        p += form(request, f"/devices/{name}/posture",
                  f'<label>Posture <select name="posture" id="posture-select">{posture_opts}</select></label>'
                  '<label>for <input name="for" placeholder="e.g. 15m (empty: until changed)" size="12"></label>',
                  "Set posture", "inline")
        p += form(request, f"/devices/{name}/reset", "", "Reset to normal", "inline")
    else:
        p += form(request, f"/devices/{name}/approve",
                  f"<label>Type {type_select(ops, d.get('suggested_type') or d.get('type'))}</label>",
                  "Approve", "inline approve")
    umbox_rows = [(e(u), f"<code>{j(params)}</code>") for u, params in (d.get("umboxes") or {}).items()]
    counters = d.get("counters") or {}
    counter_rows = [(e(reason), e(c.get("umbox")), e(c.get("packets")), e(c.get("bytes")))
                    for reason, c in sorted(counters.items(), key=lambda kv: -kv[1].get("packets", 0))]
    # not at_html: a clock_back mark is about the whole list of its alerts, not these alone
    kernel_rows = [(when_html(ops, a.get("at")), e(a["type"]), e(a.get("explanation")),
                    e((a.get("details") or {}).get("action")), raw_details(a.get("details")))
                   for a in d.get("kernel_alerts", [])]
    hist_rows = [(at_html(ops, h), e(h["posture"]), e(h["reason"])) for h in d.get("history", [])]
    alert_items = alert_list(request, ops.alert_rows(device=name, limit=20), f"/devices/{name}")
    dec_rows = []
    for x in d.get("decisions", []):
        t = x.get("timing_ms") or {}
        what = x.get("explanation") or (x.get("rule") if x.get("kind") == "decision"
                                        else f'{x.get("event")} by {x.get("actor")}')
        dec_rows.append((at_html(ops, x), e(x.get("kind")), e(what),
                         raw_details(x.get("actions") or x.get("details")),
                         e(t.get("decide")), e(t.get("xdp")), e(t.get("enforce"))))
    body = f"""<section><h2>Posture</h2>{p}</section>
<section><h2>Identity</h2>{ident_html}{names_html(request, d)}</section>
{logins_html(request, d)}
<section><h2>Umboxes active now</h2>{table(("umbox", "parameters"), umbox_rows)}</section>
{traffic_html(ops, name)}
{destinations_html(request, ops, d)}
<section><h2>Why blocked</h2><h3>Drops and passes counted in the kernel, by reason</h3>
{table(("reason", "umbox", "packets", "bytes"), counter_rows, "counters")}
<h3>Detector events</h3>{table(("at", "detector", "what happened", "action", "details"), kernel_rows)}</section>
<section><h2>Posture history</h2>{table(("at", "posture", "reason"), hist_rows)}</section>
<section><h2>Alerts</h2><ul id="device-alerts" class="alerts">{alert_items}</ul>
<p><a href="/alerts?device={e(name)}">All alerts of {e(name)}</a></p></section>
{telemetry_html(ops, name)}
<section><h2>Decisions and audit</h2>{table(("at", "kind", "what", "actions / details", "decide ms", "in XDP ms", "enforce ms"), dec_rows)}</section>"""
    return page(request, f"Device {name}", body, error=error, status=status, live=True, charts=True)


def names_html(request, d: dict) -> str:
    """Rename the device (its history and MQTT topics follow), and put it in a group."""
    name = d["name"]
    rename = form(request, f"/devices/{name}/rename",
                  f'<label>Name <input name="new" value="{e(name)}" size="16" maxlength="40" required '
                  'pattern="[A-Za-z0-9_\\-]{1,40}" title="1 to 40 letters, digits, _ or -"></label>',
                  "Rename", "inline rename")
    group = form(request, f"/devices/{name}/group",
                 f'<label>Group <input name="group" value="{e(d.get("group") or "")}" size="12" '
                 'maxlength="40" pattern="[A-Za-z0-9_\\-]{1,40}" placeholder="none" '
                 'title="1 to 40 letters, digits, _ or -; empty: no group"></label>',
                 "Set group", "inline group")
    return f'<div class="names">{rename}{group}</div>'


async def device_rename_post(request):
    ops = web_state(request).ops
    name = request.url_args["name"]
    new = (form_data(request).get("new") or "").strip()
    try:
        r = ops.device_rename(name, new, actor=actor(request))
    except KalkiError as err:
        return await device_page(request, str(err), error_status(err))
    for note in r["notes"]:
        request.g.session.flash.append(f"{r['device']['name']}: {note}.")
    return done(request, f"{name} is now {r['device']['name']}.", f"/devices/{r['device']['name']}")


async def device_group_post(request):
    ops = web_state(request).ops
    name = request.url_args["name"]
    group = (form_data(request).get("group") or "").strip() or None
    try:
        ops.device_group(name, group, actor=actor(request))
    except KalkiError as err:
        return await device_page(request, str(err), error_status(err))
    return done(request, f"{name}: group {group}." if group else f"{name}: in no group.", f"/devices/{name}")


def logins_html(request, d: dict) -> str:
    """The last default-login check (its type's [[default_logins]] tried on the device), and
    the button that runs it again."""
    name, r = d["name"], d.get("logins_checked")
    if not r:
        text = "<p class='muted'>Not checked yet.</p>"
    elif r.get("state") == "skipped":
        text = f"<p>Not checked ({when_html(web_state(request).ops, r.get('at'))}): {e(r.get('reason'))}.</p>"
    else:
        found = r.get("found") or 0
        verdict = (f'<p class="error" data-role="default-logins">{found} default login(s) work: change '
                   "the password on the device itself.</p>" if found else
                   '<p data-role="default-logins">No default login worked.</p>')
        rows = [(e(x.get("outcome")), e(x.get("service")), e(x.get("port")), e(x.get("path") or "—"),
                 e(x.get("user")), e(x.get("detail"))) for x in r.get("results", [])]
        text = (f"<p class='muted'>Checked {when_html(web_state(request).ops, r.get('at'))} ({e(r.get('by'))}).</p>{verdict}"
                + table(("outcome", "service", "port", "path", "user", "detail"), rows, "logins"))
    button = (form(request, f"/devices/{name}/check-logins", "", "Check default logins", "inline")
              if d.get("approved") else "")
    return f"""<section><h2>Default logins</h2>
<p class="muted">The gateway tries the well-known factory logins of the device's type on the device's own login services (never on a device not approved; never a password shown).</p>
{text}{button}</section>"""


async def device_check_logins_post(request):
    ops = web_state(request).ops
    name = request.url_args["name"]
    try:
        r = await ops.device_check_logins(name, actor=actor(request))
    except (KalkiError, ValueError) as err:
        return await device_page(request, str(err), error_status(err))
    if r["state"] == "skipped":
        return done(request, f"{name}: not checked: {r.get('reason')}.", f"/devices/{name}")
    found = r.get("found") or 0
    return done(request, f"{name}: {found} default login(s) work: change the password on the device."
                if found else f"{name}: no default login worked.", f"/devices/{name}")


async def device_posture_post(request):
    ops = web_state(request).ops
    name = request.url_args["name"]
    data = form_data(request)
    try:
        ops.posture_set(name, data.get("posture"), (data.get("for") or "").strip() or None)
    except KalkiError as err:
        return await device_page(request, str(err), error_status(err))
    return done(request, f"{name}: posture {data.get('posture')}.", f"/devices/{name}")


async def device_reset_post(request):
    ops = web_state(request).ops
    name = request.url_args["name"]
    try:
        ops.posture_reset(name=name)
    except KalkiError as err:
        return await device_page(request, str(err), error_status(err))
    return done(request, f"{name}: back to normal.", f"/devices/{name}")


async def device_approve_post(request):
    ops = web_state(request).ops
    name = request.url_args["name"]
    data = form_data(request)
    try:
        ops.device_approve(name, data.get("type"))
    except KalkiError as err:
        if error_status(err) == 404:
            return await device_page(request, str(err), 404)
        return await overview(request, str(err), error_status(err))
    return done(request, f"{name} approved as {data.get('type')}.", "/")


# -- destinations and profiles in plain words (the page and the API) -----------------------

POSTURE_ORDER = ("normal", "suspicious", "attack", "quarantine", "learning", "unknown")


def _destinations(values, params: dict | None = None) -> str:
    said = "; ".join(destination_words(x) for x in values) if values else "nothing"
    if values and (params or {}).get("registrable_domains"):
        said += " (each name with every name under its registrable domain)"
    return said


def _window(ms) -> str:
    if not isinstance(ms, int):
        return str(ms)
    return f"{ms // 1000} s" if ms % 1000 == 0 else f"{ms} ms"


def _blocked(params) -> str:
    block = params.get("block_seconds")
    return f"the source is dropped for {seconds_words(block)}" if block else "the source is reported, not blocked"


def umbox_words(name: str, params: dict) -> str:
    """One umbox of a stack, with its parameters, in a sentence."""
    params = params or {}
    if name == "quarantine":
        extra = ", DNS and MQTT" if params.get("management", True) else " and DNS"
        return f"quarantine: nothing but DHCP{extra} to the gateway"
    if name == "allowlist":
        return f"allow-list: {_destinations(params.get('destinations'), params)}"
    if name == "egress_anomaly":
        verdict = "refused" if params.get("block") else "reported, not blocked"
        if params.get("destinations") is None:
            return f"egress watch ({verdict}): flows outside the allow-list"
        return f"egress watch ({verdict}): flows to anything but {_destinations(params['destinations'], params)}"
    if name == "rate_limit":
        parts = []
        if params.get("packets_per_second"):
            parts.append(f"{params['packets_per_second']} packets/s")
        if params.get("bytes_per_second"):
            parts.append(f"{params['bytes_per_second']} bytes/s")
        if params.get("burst_packets"):
            parts.append(f"bursts of {params['burst_packets']} packets")
        if params.get("burst_bytes"):
            parts.append(f"bursts of {params['burst_bytes']} bytes")
        return "rate limit: " + (", ".join(parts) if parts else "no limit set")
    if name == "conn_limit":
        parts = []
        if params.get("concurrent"):
            parts.append(f"at most {params['concurrent']} inbound connections open at once")
        if params.get("new_per_second"):
            parts.append(f"at most {params['new_per_second']} new ones a second")
        return "connection limit: " + (", ".join(parts) if parts else "no limit set")
    if name == "port_scan":
        return (f"port-scan detector: {params.get('ports')} distinct destinations from one source "
                f"within {_window(params.get('window_ms'))}; {_blocked(params)}")
    if name == "syn_flood":
        return (f"SYN-flood detector: more than {params.get('syns')} SYNs within "
                f"{_window(params.get('window_ms'))} are dropped; {_blocked(params)}")
    if name == "brute_force":
        ports = list(params.get("ports") or [])
        where = f"port{'s' if len(ports) != 1 else ''} {', '.join(str(x) for x in ports) or 'none'}"
        return (f"password-guessing detector: {params.get('attempts')} connection attempts to {where} "
                f"from one source within {_window(params.get('window_ms'))}; {_blocked(params)}")
    if name == "dns_gateway_only":
        return "DNS to the gateway only: DNS to any other resolver is refused"
    if name == "lateral_block":
        return "lateral block: no connections to the other devices"
    if name == "anti_spoof":
        return "anti-spoofing: its IPv4 and ARP sender address must be its own"
    if name == "auth_gate":
        return (f"authentication gate: its web port {params.get('port')} is reached only with the "
                "appliance's credentials")
    if name == "api_filter":
        allow = ", ".join(str(r) for r in params.get("allow") or []) or "nothing"
        return (f"API filter: on its web port {params.get('port') or 80} only {allow} pass; the "
                "rest is refused (403) and reported")
    if name == "token_guard":
        return (f"token-guessing detector: more than {params.get('max_failures')} "
                f"{'/'.join(str(s) for s in params.get('statuses') or [])} answers of its web API to "
                f"one source within {_window(params.get('window_ms'))}; {_blocked(params)}")
    return f"{name}: {json.dumps(params, sort_keys=True, default=str)}"


def profile_words(postures: dict) -> dict[str, list[str]]:
    """A profile's postures, each a list of its umboxes in sentences (normal first)."""
    order = [p for p in POSTURE_ORDER if p in postures] + [p for p in postures if p not in POSTURE_ORDER]
    return {p: [umbox_words(u, params) for u, params in (postures[p] or {}).items()] for p in order}


def allow_as(entry: dict) -> str:
    """The destination that allows a flow, as `kalki device allow` takes it: what ops gives
    (the name the device resolved, "lan" for a LAN peer, else the address; port, protocol),
    else the name or the address with port and protocol."""
    if entry.get("allow_as"):
        return str(entry["allow_as"])
    names = entry.get("names") or []
    target = names[0] if names else str(entry.get("address"))
    proto, port = entry.get("proto"), entry.get("port") or 0
    if proto in ("tcp", "udp"):
        return f"{target}:{port}/{proto}" if port else f"{target}/{proto}"
    return f"{target}/icmp" if proto == "icmp" else target


# -- a device's destinations: names, refusals, its own, learning ---------------------------

def destinations_html(request, ops, d: dict) -> str:
    name = d["name"]
    names = d.get("names") or {}
    bound = [(e(b.get("address")), e(", ".join(b.get("names") or [])),
              "yes" if b.get("in_force") else "no (not in this posture)",
              e(seconds_words(b.get("expires_in_s")))) for b in names.get("bound") or []]
    refused_names = [(e(n), e(times)) for n, times in (names.get("refused") or {}).items()]
    own = list(d.get("allow") or [])
    flows = d.get("flows") or {}
    refused = []
    for f in flows.get("refused") or []:
        dest = allow_as(f)
        action = ('<span class="muted">allowed</span>' if dest in own else
                  form(request, f"/devices/{name}/allow",
                       f'<input type="hidden" name="destination" value="{e(dest)}">', "Allow", "inline"))
        refused.append((f'<span data-role="says">{e(f.get("says"))}</span>', f"<code>{e(dest)}</code>",
                        when_html(ops, f.get("last")), action))
    own_rows = [(f"<code>{e(x)}</code>", e(destination_words(x)),
                 form(request, f"/devices/{name}/disallow",
                      f'<input type="hidden" name="destination" value="{e(x)}">', "Remove", "inline"))
                for x in own]
    learnt = [(f'<span data-role="says">{e(f.get("says"))}</span>', f"<code>{e(allow_as(f))}</code>",
               when_html(ops, f.get("last"))) for f in flows.get("learnt") or []]
    learning = ""
    if d.get("posture") == "learning":
        until = when_html(ops, d.get("posture_expires"), "changed")
        learning = (f'<p class="ok" id="learning">Learning until {until}'
                    f'{", then " + e(d.get("posture_revert_to")) if d.get("posture_revert_to") else ""}: '
                    "the device reaches what it asks for; detectors and anti-spoofing stay on.</p>")
    type_field = "" if d.get("approved") else \
        f"<label>as type {type_select(ops, d.get('suggested_type') or d.get('type') or 'generic')}</label>"
    learn_form = form(request, f"/devices/{name}/learn",
                      '<label>Learn for <input name="for" value="24h" size="6" '
                      'aria-label="how long (90s, 15m, 2h, 1d)"></label>'
                      f'<span class="muted">(90s, 15m, 2h, 1d)</span>{type_field}',
                      "Start learning", "inline")
    make = ""
    if learnt:
        make = (f'<form method="get" action="/devices/{e(name)}/profile" class="inline">'
                '<label>type name <input name="type" placeholder="default: type-device" size="18">'
                '</label><button type="submit">Make a profile</button></form>')
    return f"""<section id="names"><h2>Names</h2>
<p class="muted">What the device resolved through the gateway: bound where its profile names them, else refused (the answer is delivered, the address stays closed).</p>
<h3>Bound</h3>{table(("address", "names", "in force", "expires in"), bound, "names-bound")}
<h3>Refused</h3>{table(("name", "times"), refused_names, "names-refused")}</section>
<section id="refused"><h2>Refused destinations</h2>
<p class="muted">Flows the device opened outside its profile. Not an alarm; one action allows one for this device.</p>
{table(("what it did", "allow as", "last", ""), refused, "flows-refused")}</section>
<section id="own"><h2>Allowed for this device</h2>
<p class="muted">On top of its profile, where the posture names destinations.</p>
{table(("destination", "in words", ""), own_rows, "own-destinations")}
{form(request, f"/devices/{name}/allow", '<label>Allow <input name="destination" placeholder="cloud.example.com:443/tcp" size="30"></label>', "Allow", "inline")}</section>
<section id="learn"><h2>Learning</h2>{learning}
<p class="muted">In posture learning the device reaches what it asks for, and every flow outside its profile is recorded with the name it resolved; then make a profile of it.</p>
{learn_form}
<h3>Learnt</h3>{table(("what it did", "as a destination", "last"), learnt, "flows-learnt")}
{make}</section>"""


def _text(value) -> str | None:
    """A form field's text, stripped; None if empty or not text."""
    return (value.strip() or None) if isinstance(value, str) else None


def _lines(text) -> str:
    """A textarea's text as a file holds it: a browser sends its lines ended by CR LF."""
    return text.replace("\r\n", "\n") if isinstance(text, str) else ""


async def device_learn_post(request):
    ops = web_state(request).ops
    name = request.url_args["name"]
    data = form_data(request)
    try:
        r = ops.device_learn(name, for_=_text(data.get("for")), type=_text(data.get("type")),
                             actor=actor(request))
    except (KalkiError, ValueError) as err:
        return await device_page(request, str(err), error_status(err))
    return done(request, f"{name}: learning for {seconds_words(r['for_seconds'])}.", f"/devices/{name}")


async def _own_destination_post(request, add: bool):
    ops = web_state(request).ops
    name = request.url_args["name"]
    destination = _text(form_data(request).get("destination"))
    try:
        if add:
            ops.device_allow(name, destination, actor=actor(request))
        else:
            ops.device_disallow(name, destination, actor=actor(request))
    except (KalkiError, ValueError) as err:
        return await device_page(request, str(err), error_status(err))
    return done(request, f"{name}: {destination} {'allowed' if add else 'no longer allowed'}.",
                f"/devices/{name}")


async def device_allow_post(request):
    return await _own_destination_post(request, True)


async def device_disallow_post(request):
    return await _own_destination_post(request, False)


def _made(request) -> dict:
    ops = web_state(request).ops
    return ops.profile_from_device(request.url_args["name"], type=_text(request.args.get("type")),
                                   format=request.args.get("format") or "toml")


def made_profile_page(request, made: dict, error=None, status=200):
    name = request.url_args["name"]
    query = f"?{urlencode({'type': made['type']})}"
    body = f"""<p>What <a href="/devices/{e(name)}">{e(name)}</a> was seen to do while learning, as device type <strong>{e(made["type"])}</strong>: read it, download it to edit, or install it as it is.</p>
<pre id="profile-text">{e(made["text"])}</pre>
<p><a href="/devices/{e(name)}/profile/download{e(query)}" download>Download (TOML)</a> ·
<a href="/devices/{e(name)}/profile/download{e(query + '&format=mud')}" download>Download as a MUD file</a></p>
{form(request, f"/devices/{name}/profile/install",
      f'<input type="hidden" name="type" value="{e(made["type"])}">'
      f'<textarea name="text" hidden>{e(made["text"])}</textarea>', "Install", "inline")}"""
    return page(request, f"A profile from {name}", body, error=error, status=status)


async def device_profile_page(request):
    try:
        made = _made(request)
    except (KalkiError, ValueError) as err:
        return await device_page(request, str(err), error_status(err))
    return made_profile_page(request, made)


async def device_profile_download(request):
    try:
        made = _made(request)
    except (KalkiError, ValueError) as err:
        return await device_page(request, str(err), error_status(err))
    return download(made["text"], f"{made['type']}.{'toml' if made['format'] == 'toml' else 'mud.json'}")


async def device_profile_install(request):
    ops = web_state(request).ops
    data = form_data(request)
    text, type_ = _lines(data.get("text")), _text(data.get("type")) or ""
    made = {"type": type_, "text": text}
    try:
        if not TYPE_NAME.fullmatch(type_):
            raise ConfigError(f"type: expected 1-40 letters, digits, - and _, got {type_!r}")
        r = ops.profile_import(text, filename=f"{type_}.toml", actor=actor(request))
    except (KalkiError, ValueError) as err:
        return made_profile_page(request, made, str(err), error_status(err))
    for note in r.get("notes") or []:
        request.g.session.flash.append(note)
    return done(request, f"Profile {r['type']} installed.", f"/profiles/{r['type']}")


def download(text: str, filename: str) -> Response:
    kind = "application/json" if filename.endswith(".json") else "text/plain"
    return Response(text, 200, {"Content-Type": f"{kind}; charset=utf-8",
                                "Content-Disposition": f'attachment; filename="{upload_name(filename)}"'})


# -- profiles ------------------------------------------------------------------------------

TYPE_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")


async def profiles_page(request, error=None, status=200):
    ops = web_state(request).ops
    rows = [(f'<a href="/profiles/{e(p["type"])}">{e(p["type"])}</a>', e(p["source"]), e(p["description"]),
             e(", ".join(p.get("devices") or []) or "—")) for p in ops.profile_list()]
    body = f"""<p class="muted">A device type's profile gives, for each posture, the umboxes that protect the device. Shipped ones come with the appliance; installed ones are imported here or with <code>kalki profile import</code>.</p>
{table(("type", "source", "description", "devices"), rows, "profiles")}
<h2>Install a profile</h2>
<p class="muted">A Kalki profile (TOML) or a vendor's RFC 8520 MUD file (JSON), at most {MAX_BODY // 1024} KiB. Everything is checked before anything is installed; an error names the file and the place in it.</p>
<form method="post" action="/profiles" enctype="multipart/form-data" class="card">{csrf_field(request)}
<label>File <input type="file" name="file" accept=".toml,.json,application/json"></label>
<label>or its text <textarea name="text" rows="6" spellcheck="false"></textarea></label>
<label>Type name (optional; default: the file's) <input name="type" placeholder="mood_lamp"></label>
<label>The device's address in the capture (MUD files, optional) <input name="device_ip" placeholder="10.42.0.174"></label>
<button type="submit" id="import">Check and install</button></form>"""
    return page(request, "Profiles", body, error=error, status=status)


async def profiles_post(request):
    ops = web_state(request).ops
    data = form_data(request)
    upload = form_files(request).get("file")
    try:
        if upload is not None:
            filename, raw = upload
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"{filename}: not UTF-8 text") from None
        else:
            text = _lines(data.get("text"))
            filename = "pasted.json" if text.lstrip("\ufeff \t\r\n").startswith("{") else "pasted.toml"
        if not text.strip():
            raise ConfigError("choose a file, or paste its text")
        r = ops.profile_import(text, filename, type=_text(data.get("type")),
                               device_ip=_text(data.get("device_ip")), actor=actor(request))
    except (KalkiError, ValueError) as err:
        return await profiles_page(request, str(err), error_status(err))
    for note in r.get("notes") or []:
        request.g.session.flash.append(note)
    return done(request, f"Profile {r['type']} installed (from {r['format'].upper()}).", f"/profiles/{r['type']}")


async def profile_page(request, error=None, status=200):
    ops = web_state(request).ops
    type_ = request.url_args["type"]
    try:
        p = ops.profile_show(type_)
    except (KalkiError, ValueError) as err:
        return page(request, "No such profile", f"<p>{e(err)}</p>", status=404)
    words = profile_words(p.get("postures") or {})
    postures = "".join(f'<h3>{e(posture)}</h3><ul class="words" data-posture="{e(posture)}">'
                       + "".join(f"<li>{e(s)}</li>" for s in sentences) + "</ul>"
                       for posture, sentences in words.items())
    facts = [("Source", p["source"]), ("Description", p.get("description") or "—"),
             ("Devices", ", ".join(p.get("devices") or []) or "none"), ("MUD URL", p.get("mud_url") or "—"),
             ("Rules", ", ".join(p.get("rules") or []) or "none")]
    facts_html = "<dl class='facts'>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts) + "</dl>"
    t = e(p["type"])
    mud = (f'<a href="/profiles/{t}/export?format=mud" download>MUD</a>' if p.get("mud_url") else
           f'<form method="get" action="/profiles/{t}/export" class="inline">'
           '<input type="hidden" name="format" value="mud"><label>as MUD, published at '
           '<input name="mud_url" placeholder="https://example.com/device.json" size="30"></label>'
           '<button type="submit">Export MUD</button></form>')
    remove = ""
    if p["source"] == "installed":
        remove = form(request, f"/profiles/{p['type']}/remove", "", "Remove this profile", "inline")
    body = f"""{facts_html}
<section><h2>What each posture does</h2>{postures}</section>
<section><h2>Export</h2><p><a href="/profiles/{t}/export?format=toml" download>TOML</a></p>{mud}</section>
{f'<section><h2>Remove</h2>{remove}</section>' if remove else ''}"""
    return page(request, f"Profile {p['type']}", body, error=error, status=status)


async def profile_export(request):
    ops = web_state(request).ops
    type_ = request.url_args["type"]
    try:
        r = ops.profile_export(type_, format=request.args.get("format") or "toml",
                               mud_url=_text(request.args.get("mud_url")))
    except (KalkiError, ValueError) as err:
        return await profile_page(request, str(err), error_status(err))
    return download(r["text"], f"{r['type']}.{'toml' if r['format'] == 'toml' else 'mud.json'}")


async def profile_remove_post(request):
    ops = web_state(request).ops
    type_ = request.url_args["type"]
    try:
        ops.profile_remove(type_, actor=actor(request))
    except (KalkiError, ValueError) as err:
        return await profile_page(request, str(err), error_status(err))
    return done(request, f"Profile {type_} removed.", "/profiles")


# -- rules ---------------------------------------------------------------------------------

def rules_off_html(ops) -> str:
    """Built-in or profile rules switched off, said where the operator looks (the overview, the
    rules page): protection the appliance ships with never goes quietly."""
    words = ops.rules_off_words()
    if not words:
        return ""
    return (f'<p id="rules-off" class="summary summary-warning" role="status">{e(words)}. '
            f'Not applied until switched on again (<a href="/rules">Rules</a>).</p>')


def _rule_switch(request, r: dict) -> str:
    on = r["enabled"]
    return form(request, f"/rules/{r['name']}/enabled",
                f'<input type="hidden" name="enabled" value="{"false" if on else "true"}">',
                "Switch off" if on else "Switch on", "inline")


def posture_graph_html(request, ops) -> str:
    """The posture state machine as SVG, for every device or one type (a GET form: no script)."""
    chosen = request.args.get("type") or ""
    try:
        graph = ops.posture_graph(chosen or None)
    except KalkiError as err:
        graph, chosen = ops.posture_graph(None), ""
        problem = f'<p class="error" role="alert">{e(err)}</p>'
    else:
        problem = ""
    options = "".join(f'<option value="{e(t)}"{" selected" if t == chosen else ""}>{e(t)}</option>'
                      for t in ops.profile_types())
    picker = (f'<form method="get" action="/rules" class="inline"><label>Device type '
              f'<select name="type"><option value="">every type</option>{options}</select></label>'
              f'<button type="submit">Show</button></form>')
    missing = "".join(f"<li>{e(m['rule'])} would set posture {e(m['posture'])}, which type "
                      f"{e(chosen)} does not have: the supervisor refuses it</li>" for m in graph["missing"])
    return f"""<h2>How the rules move postures</h2>
{picker}{problem}
<figure class="posture-graph-figure"><div class="scroll">{posture_graph_svg(graph, seconds_words)}</div>
<figcaption class="muted">Postures from the least strict (left) to the most. From above: a rule that moves a device out of any less strict posture (a tick marks each); from below: a rule that starts from one posture. A duration: the posture goes back when it ends. Dashed: switched off. Rules only raise a posture; an operator or an expiry lowers it. A device waiting for approval is moved by no rule.</figcaption></figure>
{f'<ul class="words">{missing}</ul>' if missing else ''}"""


async def rules_page(request, error=None, status=200, text=None):
    ops = web_state(request).ops
    rows = []
    for r in ops.rules_view():
        actions = _rule_switch(request, r) if r["switchable"] else ""
        if r["editable"]:
            actions = (f'<a href="/rules?edit={e(r["name"])}">edit</a> ' + actions +
                       form(request, f"/rules/{r['name']}/delete", "", "Delete", "inline"))
        on = ("yes" if r["enabled"] else "switched off" if r["switched_off"] or r["editable"]
              else "off in its profile")
        what = e(r["words"]) + (f'<br><span class="muted">{e(r["description"])}</span>'
                                if r["description"] else "")
        rows.append((e(r["name"]), e(r["source"]), e(r["priority"]), on, what, actions))
    edit = request.args.get("edit")
    if text is None:
        text = ops.rule_text(edit)
    body = f"""{rules_off_html(ops)}
{table(("rule", "source", "priority", "on", "what it does", ""), rows, "rules")}
<p class="muted">Built-in and profile rules cannot be edited here, only switched off and on; switching one off is audited and said on the overview until it is on again.</p>
{posture_graph_html(request, ops)}
<h2>Add or replace site rules</h2>
<p class="muted">TOML, one <code>[[rules]]</code> table per rule (the empty editor shows an example); a rule with an existing site rule's name replaces it.</p>
<form method="post" action="/rules" class="card">{csrf_field(request)}
<textarea name="text" rows="10" spellcheck="false" id="rule-text" placeholder="{e(RULE_EXAMPLE)}">{e(text)}</textarea>
<button type="submit">Validate and save</button></form>"""
    return page(request, "Rules", body, error=error, status=status)


async def rules_post(request):
    ops = web_state(request).ops
    data = form_data(request)
    text = data.get("text")
    try:
        names = ops.put_rules_text(text, actor(request))
    except (KalkiError, ValueError) as err:
        return await rules_page(request, str(err), 400, text=text if isinstance(text, str) else "")
    return done(request, f"Saved: {', '.join(names)}.", "/rules")


async def rule_enabled_post(request):
    ops = web_state(request).ops
    data = form_data(request)
    try:
        ops.set_rule_enabled(request.url_args["name"], data.get("enabled"), actor(request))
    except KalkiError as err:
        return await rules_page(request, str(err), 400)
    return done(request, f"Rule {request.url_args['name']} "
                  f"{'switched on' if data.get('enabled') in ('true', '1') else 'switched off'}.", "/rules")


async def rule_delete_post(request):
    ops = web_state(request).ops
    try:
        ops.delete_rule(request.url_args["name"], actor(request))
    except KalkiError as err:
        return await rules_page(request, str(err), 400)
    return done(request, f"Rule {request.url_args['name']} deleted.", "/rules")


# -- audit ---------------------------------------------------------------------------------

async def audit_page(request):
    ops = web_state(request).ops
    rows = [(at_html(ops, a), e(a.get("event")), e(a.get("actor")),
             f'<a href="/devices/{e(a["device"])}">{e(a["device"])}</a>' if a.get("device") else "",
             f"<code>{j(a.get('details'))}</code>") for a in ops.audit_log(300)]
    return page(request, "Audit log", table(("at", "event", "actor", "device", "details"), rows, "audit"))


# -- settings ------------------------------------------------------------------------------

async def settings_page(request, error=None, status=200, new_token=None, new_ha=None):
    ops = web_state(request).ops
    s = ops.settings()
    bh = s["business_hours"]
    days = "".join(f'<label class="day"><input type="checkbox" name="days" value="{d}"'
                   f'{" checked" if d in bh["days"] else ""}> {d}</label>' for d in DAYS)
    tokens = [(e(t["name"]), e(t["id"]), when_html(ops, t.get("created")),
               form(request, f"/settings/tokens/{t['id']}/delete", "", "Delete", "inline"))
              for t in ops.tokens()]
    shown = (f'<p class="ok">New token (shown once; send it as <code>Authorization: Bearer …</code>): '
             f'<code id="new-token">{e(new_token)}</code></p>') if new_token else ""
    mqtt_rows = [(e(m["device"]), {True: "yes", False: "no", None: "unknown"}[m["broker_user"]],
                  e(m["availability"] or "—")) for m in ops.mqtt_view()]
    body = f"""<section><h2>Business hours</h2>
{form(request, "/settings/business-hours", f'<div class="days">{days}</div><label>from <input name="start" value="{e(bh["start"])}" size="5"></label><label>to <input name="end" value="{e(bh["end"])}" size="5"></label>', "Save", "card")}
</section><section><h2>Time zone</h2>
{form(request, "/settings/timezone", f'<label>Time zone <input name="timezone" value="{e(s["timezone"])}" placeholder="Europe/Berlin"></label>', "Save", "inline")}
</section><section><h2>Admin password</h2>
{form(request, "/settings/password", '<label>Current <input type="password" name="current" autocomplete="current-password"></label><label>New <input type="password" name="password" autocomplete="new-password"></label><label>Again <input type="password" name="confirm" autocomplete="new-password"></label>', "Change password", "card")}
</section><section><h2>API tokens</h2>{shown}
{table(("name", "id", "created", ""), tokens)}
{form(request, "/settings/tokens", '<label>Name <input name="name" placeholder="home-assistant"></label>', "Create token", "inline")}
<p class="muted">The API is described at <a href="/api/openapi.json">/api/openapi.json</a>.</p>
</section><section><h2>MQTT: devices with a broker user</h2>
{table(("device", "broker user", "availability"), mqtt_rows)}</section>
{home_assistant_html(request, ops, new_ha)}
{notify_html(request, ops)}
{backup_html(request)}"""
    return page(request, "Settings", body, error=error, status=status)


def page_host(request) -> str | None:
    """The host name or address this page was reached at (its Host header, without the port)."""
    try:
        return urlsplit("//" + (request.headers.get("Host") or "")).hostname
    except ValueError:
        return None


def home_assistant_html(request, ops, new=None) -> str:
    """What to enter in Home Assistant's MQTT integration, and the button that gives its broker
    user a new password; new: the answer of that, whose password is shown here once."""
    ha = ops.home_assistant_broker()
    if not ha["enabled"]:
        return f"""<section id="home-assistant"><h2>Home Assistant</h2>
<p class="muted">Off: <code>{e(ha["setting"])}</code> is empty in the config file, so Home Assistant has no user on this appliance's MQTT broker. Name one there (<code>homeassistant</code>, say) to connect Home Assistant.</p></section>"""
    here = page_host(request)
    rows = []
    for li in ha["listeners"]:
        host = (f'<code>{e(li["address"])}</code>' if li["address"] else
                (f'<code>{e(here)}</code> (this page\'s address: the broker listens on every '
                 'address of the appliance)' if here else "any address of the appliance"))
        rows.append(("Broker", host))
        rows.append(("Port", f'<code>{e(li["port"])}</code> ' + (
            "(TLS)" if li["tls"] else '<span class="muted">(plain MQTT, no TLS: the password '
            "and the messages cross the network readable, so keep Home Assistant on a network you "
            "trust)</span>")))
    if not ha["listeners"]:
        rows.append(("Broker", f'<span class="sev-warning">unknown: no broker configuration in '
                     f'<code>{e(ha["broker_directory"])}</code> (<code>mqtt.broker_directory</code>)</span>'))
    rows.append(("Username", f'<code id="ha-user">{e(ha["user"])}</code>'))
    if ha["password_set"]:
        by = (f' ({when_html(ops, ha["password_set_at"])} by {e(ha["password_set_by"])})'
              if ha["password_set_at"] else "")
        rows.append(("Password", f"set{by}; only its hash is kept here, so it cannot be shown again"))
    elif ha.get("password_error"):
        rows.append(("Password", f'<span class="error">unknown: {e(ha["password_error"])}</span>'))
    else:
        rows.append(("Password", '<span class="sev-warning">none yet: Home Assistant cannot log in '
                     "until you set one</span>"))
    rows.append(("Client ID", f'<code>{e(ha["client_id"])}</code> <span class="muted">(in the '
                 "integration's advanced options: the broker refuses Home Assistant's default, a "
                 f'random id, and accepts {e(ha["client_id_rule"])})</span>'))
    rows.append(("Discovery prefix", f'<code>{e(ha["discovery_prefix"])}</code>'))
    shown = ""
    if new:
        later = ("" if new["broker_reloaded"] else
                 " The broker is not running now: it takes the password when it starts.")
        shown = (f'<p class="ok" id="ha-password-shown">New password for <code>{e(new["user"])}</code>, '
                 f'shown this once (the appliance keeps only its hash): <code id="ha-password">'
                 f'{e(new["password"])}</code>. Enter it in Home Assistant now; the old one no '
                 f"longer works.{e(later)}</p>")
    button = form(request, "/settings/home-assistant-password", "", "Set a new password", "inline")
    return f"""<section id="home-assistant"><h2>Home Assistant</h2>
<p class="muted">Home Assistant's MQTT integration logs in to this appliance's broker with the settings below; it then finds every approved device by discovery, and alone may set a device's posture.</p>{shown}
{table(("setting", "value"), rows, "home-assistant")}
<p class="muted">A new password replaces the current one at once: Home Assistant is logged out until it is given the new one.</p>
{button}</section>"""


async def home_assistant_password_post(request):
    ops = web_state(request).ops
    try:
        new = await ops.home_assistant_password(actor(request))
    except (KalkiError, ValueError) as err:
        return await settings_page(request, str(err), error_status(err))
    # Rendered here, never put in the session's flash: the password is in this answer only.
    return await settings_page(request, new_ha=new)


CHANNEL_NAMES = {"ntfy": "ntfy", "webhook": "Webhook", "email": "E-mail"}


def notify_html(request, ops) -> str:
    """[notify]: the channels configured (where they go, never a secret), their counts and
    last error, and a button that sends a test on each (or one)."""
    n = ops.notify_settings()
    rows = []
    for channel, to in n["channels"].items():
        st = n["status"].get(channel) or {}
        if to is None and channel not in n["off"]:
            rows.append((e(CHANNEL_NAMES[channel]), '<span class="muted">not configured</span>', "", ""))
            continue
        if channel in n["off"]:
            rows.append((e(CHANNEL_NAMES[channel]), '<span class="muted">off</span>', "",
                         f'<span class="error">{e(n["off"][channel])}</span>'))
            continue
        last = (f'{e(st.get("last_error"))} ({when_html(ops, st.get("last_error_at"))})'
                if st.get("last_error") else "—")
        rows.append((e(CHANNEL_NAMES[channel]), e(to),
                     e(f'{st.get("sent", 0)} sent, {st.get("failed", 0)} failed, '
                       f'{st.get("summed_up", 0)} summed up'), last))
    configured = [c for c, to in n["channels"].items() if to is not None or c in n["off"]]
    choose = "".join(f'<option value="{e(c)}">{e(CHANNEL_NAMES[c])} only</option>' for c in configured)
    button = (form(request, "/settings/notify-test",
                   f'<label>Channel <select name="channel"><option value="">every channel</option>'
                   f'{choose}</select></label>', "Send a test", "inline")
              if configured else
              '<p class="muted">No channel is configured: <code>[notify]</code> in the config file '
              '(<code>kalki config defaults</code> lists its keys).</p>')
    return f"""<section id="notifications"><h2>Notifications</h2>
<p class="muted">Alerts of severity <strong>{e(n["min_severity"])}</strong> and above are sent on each channel below (at most {e(n["max_per_minute"])} a minute each; the rest in one summary), and to Home Assistant as alert events. Set in the config file's <code>[notify]</code>.</p>
{table(("channel", "to", "so far", "last error"), rows, "notify")}
{button}</section>"""


async def notify_test_post(request):
    ops = web_state(request).ops
    channel = (form_data(request).get("channel") or "").strip() or None
    try:
        results = await ops.notify_test(channel, actor=actor(request))
    except (KalkiError, ValueError) as err:
        return await settings_page(request, str(err), error_status(err))
    failed = [f"{CHANNEL_NAMES.get(c, c)}: {r['error']}" for c, r in results.items() if not r["ok"]]
    sent = [CHANNEL_NAMES.get(c, c) for c, r in results.items() if r["ok"]]
    if sent:
        request.g.session.flash.append(f"Test sent by {', '.join(sent)}.")
    if failed:
        return await settings_page(request, "Test failed: " + "; ".join(failed), 502)
    return see_other("/settings#notifications")


def backup_html(request) -> str:
    return f"""<section id="backup"><h2>Backup and restore</h2>
<p class="muted">One JSON file with the settings, the installed profiles, the site rules and the device list (types, names, groups, own destinations, postures). The admin password and the API tokens are left out unless you ask for them.</p>
<p><a href="/settings/backup" download id="backup-download">Download a backup</a> · <a href="/settings/backup?secrets=1" download id="backup-download-secrets">with the admin password hash and API tokens</a></p>
<form method="post" action="/settings/restore" enctype="multipart/form-data" class="card">{csrf_field(request)}
<label>Backup file (at most {MAX_BODY // 1024} KiB here; larger: <code>kalki restore FILE</code>) <input type="file" name="file" accept=".json,application/json"></label>
<label><input type="checkbox" name="dry_run" value="1"> only check it, and say what would change</label>
<button type="submit" id="restore">Check and restore</button></form>
<p class="muted">All of it is checked before anything changes. A restore adds and replaces, and removes nothing; a device held in a stricter posture here than in the backup keeps it.</p></section>"""


async def backup_download(request):
    ops = web_state(request).ops
    try:
        r = ops.backup(with_secrets=request.args.get("secrets") == "1", actor=actor(request))
    except (KalkiError, ValueError) as err:
        return await settings_page(request, str(err), error_status(err))
    return download(r["text"], r["filename"])


def restore_words(r: dict) -> list[str]:
    """What a restore did (or would do), for the flash."""
    p, rules, d = r["profiles"], r["rules"], r["devices"]
    verb = "Would restore" if r["dry_run"] else "Restored"
    lines = [f"{verb} {len(r['settings'])} setting(s), {len(p['installed']) + len(p['replaced'])} "
             f"profile(s), {len(rules['added']) + len(rules['replaced'])} rule(s) and "
             f"{len(d['added']) + len(d['updated'])} device(s)"
             + (f"; {'would enforce' if r['dry_run'] else 'enforced'}: {', '.join(r['enforced'])}"
                if r["enforced"] else "") + "."]
    lines += [f"{n[0].upper()}{n[1:]}." for n in r["notes"]]
    if r["dry_run"]:
        lines.append("Dry run: nothing was changed.")
    return lines


async def restore_post(request):
    ops = web_state(request).ops
    data = form_data(request)
    upload = form_files(request).get("file")
    try:
        if upload is None:
            raise ConfigError("choose a backup file")
        filename, raw = upload
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{filename}: not UTF-8 text") from None
        r = ops.restore(text, dry_run=data.get("dry_run") in ("1", "on", "true"), actor=actor(request))
    except (KalkiError, ValueError) as err:
        return await settings_page(request, f"{err}; nothing was changed", error_status(err))
    words = restore_words(r)
    request.g.session.flash.extend(words[:-1])
    return done(request, words[-1], "/settings")


async def business_hours_post(request):
    ops = web_state(request).ops
    data = form_data(request)
    value = {"days": data.getlist("days") if data else [], "start": data.get("start", ""), "end": data.get("end", "")}
    try:
        ops.update_settings({"business_hours": value}, actor(request))
    except (KalkiError, ValueError) as err:
        return await settings_page(request, str(err), 400)
    return done(request, "Business hours saved.", "/settings")


async def timezone_post(request):
    ops = web_state(request).ops
    data = form_data(request)
    try:
        ops.update_settings({"timezone": (data.get("timezone") or "").strip()}, actor(request))
    except (KalkiError, ValueError) as err:
        return await settings_page(request, str(err), 400)
    return done(request, "Time zone saved.", "/settings")


async def password_post(request):
    st = web_state(request)
    data = form_data(request)
    addr = client_address(request)
    retry = st.logins.retry_after(addr)
    if retry:
        resp = await settings_page(request, f"Too many failed attempts: try again in {retry} s.", 429)
        resp.headers["Retry-After"] = str(retry)
        return resp
    try:
        st.ops.change_password(data.get("current"), data.get("password"), data.get("confirm"),
                            actor(request))
    except KalkiError as err:
        if "current password" in str(err):
            st.logins.fail(addr)
        return await settings_page(request, str(err), 400)
    return done(request, "Password changed.", "/settings")


async def token_post(request):
    ops = web_state(request).ops
    data = form_data(request)
    try:
        token, rec = ops.create_token(data.get("name"), actor(request))
    except KalkiError as err:
        return await settings_page(request, str(err), 400)
    return await settings_page(request, new_token=token)


async def token_delete_post(request):
    ops = web_state(request).ops
    try:
        rec = ops.delete_token(request.url_args["id"], actor(request))
    except KalkiError as err:
        return await settings_page(request, str(err), 400)
    return done(request, f"Token {rec['name']} deleted.", "/settings")


async def healthz(request):
    import time
    ops = web_state(request).ops
    age = round(time.monotonic() - ops.heartbeat, 2)
    ok = age < 10
    return json_response({"ok": ok, "heartbeat_age_s": age}, 200 if ok else 503)


def add_routes(app) -> None:
    route(app, "GET", "/healthz", healthz)
    route(app, "GET", "/login", login_page)
    route(app, "POST", "/login", login_post)
    route(app, "POST", "/logout", logout_post)
    route(app, "GET", "/claim", claim_page)
    route(app, "POST", "/claim", claim_post)
    route(app, "GET", "/", overview)
    route(app, "GET", "/alerts", alerts_page)
    route(app, "POST", "/alerts/<id>/release", alert_release_post)
    route(app, "POST", "/alerts/<id>/keep", alert_keep_post)
    route(app, "POST", "/alerts/<id>/block", alert_block_post)
    route(app, "POST", "/unblock", unblock_post)
    route(app, "POST", "/maintenance", maintenance_post)
    route(app, "GET", "/devices/<name>", device_page)
    route(app, "POST", "/devices/<name>/posture", device_posture_post)
    route(app, "POST", "/devices/<name>/reset", device_reset_post)
    route(app, "POST", "/devices/<name>/approve", device_approve_post)
    route(app, "POST", "/devices/<name>/check-logins", device_check_logins_post)
    route(app, "POST", "/devices/<name>/rename", device_rename_post)
    route(app, "POST", "/devices/<name>/group", device_group_post)
    route(app, "POST", "/devices/<name>/learn", device_learn_post)
    route(app, "POST", "/devices/<name>/allow", device_allow_post)
    route(app, "POST", "/devices/<name>/disallow", device_disallow_post)
    route(app, "GET", "/devices/<name>/profile", device_profile_page)
    route(app, "GET", "/devices/<name>/profile/download", device_profile_download)
    route(app, "POST", "/devices/<name>/profile/install", device_profile_install)
    route(app, "GET", "/profiles", profiles_page)
    route(app, "POST", "/profiles", profiles_post)
    route(app, "GET", "/profiles/<type>", profile_page)
    route(app, "GET", "/profiles/<type>/export", profile_export)
    route(app, "POST", "/profiles/<type>/remove", profile_remove_post)
    route(app, "GET", "/rules", rules_page)
    route(app, "POST", "/rules", rules_post)
    route(app, "POST", "/rules/<name>/enabled", rule_enabled_post)
    route(app, "POST", "/rules/<name>/delete", rule_delete_post)
    route(app, "GET", "/audit", audit_page)
    route(app, "GET", "/settings", settings_page)
    route(app, "POST", "/settings/business-hours", business_hours_post)
    route(app, "POST", "/settings/timezone", timezone_post)
    route(app, "POST", "/settings/notify-test", notify_test_post)
    route(app, "POST", "/settings/home-assistant-password", home_assistant_password_post)
    route(app, "POST", "/settings/password", password_post)
    route(app, "POST", "/settings/tokens", token_post)
    route(app, "POST", "/settings/tokens/<id>/delete", token_delete_post)
    route(app, "GET", "/settings/backup", backup_download)
    route(app, "POST", "/settings/restore", restore_post)
    route(app, "GET", "/leds", leds_page)



def _form_minutes(value):
    """A form sends text: "30" is 30 minutes; anything else goes to the op, which names it."""
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value
