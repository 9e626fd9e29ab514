"""Every page in headless Chromium (Selenium), lab-free: a real Supervisor with a fake data path,
served on a loopback port as tests/test_web.py serves it. At a desk's width and a phone's, light
and dark: nothing overflows sideways, tables are cards on a phone, the CSP is kept, the text
keeps its contrast; a rename, an unblock and a restore done through the page; the traffic
charts drawn and following the counters; the posture graph. Screenshots go to test-artifacts/
(web-page-*.png, web-do-*.png), which CI keeps."""
import asyncio
import base64
import os
import re
import threading
import time
from pathlib import Path

import pytest
from fakes import FakeDataplane
from labutil import CHROMEDRIVER, CHROMIUM, headless_chromium

from appliance import config
from appliance.faces.web import create_app, listening_socket, serve
from appliance.supervisor import accounts
from appliance.supervisor.core import Supervisor
from appliance.supervisor.ops import Ops
from appliance.system.broker import BrokerFiles, random_password, write_config

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PASSWORD = "correct horse battery"
SIZES = {"desk": (1280, 900), "phone": (390, 844)}
# the longest name a device may have, with nowhere to break it
LONG_NAME = "hallway_motion_sensor_upstairs_landing_1"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"no {CHROMIUM} / {CHROMEDRIVER} (scripts/setup.sh installs chromium and "
                "chromium-driver)", allow_module_level=True)

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


class Served:
    """The page served from a loop in a thread of its own, as the supervisor serves it; the
    supervisor is touched only from that loop (its live view's queues are asyncio's). Its
    ticker runs there too (it reads the counters for the traffic charts every 10 s), and every
    device has traffic: its counters grow each second, as the kernel's would."""

    def __init__(self, sup: Supervisor):
        self.sup, self.ops = sup, Ops(sup)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kalki-web", daemon=True)
        self.thread.start()
        self.server = self.wait(serve(create_app(self.ops), listening_socket("127.0.0.1", 0)))
        host, port = self.server.addresses[0]
        self.url = f"http://{host}:{port}"
        self.ticker = asyncio.run_coroutine_threadsafe(sup._ticker(), self.loop)
        self.feeder = asyncio.run_coroutine_threadsafe(self._traffic(), self.loop)

    async def _traffic(self):
        dp = self.sup.dp
        while True:
            for i, name in enumerate(list(dp.devices)):
                dp.count(name, "pass", 20 + 10 * i)
                if i == 0:
                    dp.count(name, "brute_force", 2)
            await asyncio.sleep(1)

    def wait(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def call(self, fn, *args, **kwargs):
        async def on_loop():
            return fn(*args, **kwargs)
        return self.wait(on_loop())

    def settle(self):
        """A page left behind leaves its event stream open here until something is written to
        it (a keep-alive every 15 s): a tick now lets the server see it gone, so that a quick
        walk through the pages does not reach the cap on connections from one address."""
        for _ in range(50):
            self.call(self.sup.notify, {"kind": "panel", "event": "tick"})
            time.sleep(0.02)
            if self.server.open_count("127.0.0.1") <= 4:
                return

    def close(self):
        self.feeder.cancel()
        self.loop.call_soon_threadsafe(self.sup._stop.set)
        self.ticker.result(10)
        self.wait(self.server.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def seeded(directory: Path) -> Supervisor:
    """test_web.py's supervisor, with what makes a page long or wide: an attack with its
    detector events and decisions, a name of 40 characters, long JSON, a blocked source, flows
    learnt and refused, alerts of each severity, and twenty minutes of traffic."""
    cfg = config.Config()
    cfg.state.directory = str(directory / "state")
    cfg.mqtt.password_file = str(directory / "mqtt-supervisor")
    cfg.web.tls = False
    cfg.gateway.gate_credentials = str(directory / "gate-credentials.json")     # the ticker writes it
    s = Supervisor(cfg)
    s.attach(FakeDataplane(), loop=None)
    s.add_device("camera1", "02:4b:00:00:00:01", "198.18.0.10", "camera", approve=True)
    s.add_device("plug1", "02:4b:00:00:00:02", "198.18.0.11", "plug", approve=True)
    s.add_device(LONG_NAME, "02:4b:00:00:00:04", "198.18.0.13", "motion_sensor", approve=True)
    s.discovered("02:4b:00:00:00:03", "198.18.0.12")       # a new device, waiting
    s.store.set_setting("admin", {"user": "admin", "scrypt": accounts.hash_password(PASSWORD)})
    s.raise_alert("camera1", "brute-force", "kernel",
                  {"src": "198.19.0.66", "dst": "198.18.0.10", "dst_port": 23, "action": "drop",
                   "payload": "x" * 300}, 0)
    s.raise_alert(LONG_NAME, "motion-at-night", "kernel", {"zone": "landing"}, 0, severity="warning")
    s.on_telemetry("plug1", {"on": True, "power_w": 12, "firmware": "v" + "1.2.3-" * 40})
    s.on_telemetry(LONG_NAME, {"motion": True})
    s.dp.block_source("198.19.0.66", 3600)
    # flows: what the long-named one learnt (a profile can be made of it), what plug1 was refused
    flow = {"reason": "egress_anomaly", "action": "reported", "dst": "198.19.64.9", "dst_port": 443,
            "proto": 6, "suppressed": 0}
    Ops(s).device_learn(LONG_NAME, for_="2h")
    s.dp.answer("198.18.0.13", ["telemetry.a-motion-sensor-vendors-cloud.example"], ["198.19.64.9"], 300)
    s.on_kernel_alerts([(LONG_NAME, "egress-report", {**flow, "src": "198.18.0.13"})])
    s.dp.answer("198.18.0.11", ["firmware-updates.plug-vendor.example"], ["198.19.64.10"], 300)
    s.on_kernel_alerts([("plug1", "egress-refused", {**flow, "src": "198.18.0.11", "dst": "198.19.64.10",
                                                     "reason": "allowlist", "action": "dropped"})])
    Ops(s).device_allow("plug1", "time.plug-vendor.example:123/udp")
    traffic_before(s)
    return s


def traffic_before(s, minutes=20):
    """The last minutes' traffic, read every 10 s as the ticker reads it, so that the charts
    have a line to draw from the start (a single reading is a lone point, which draws nothing)."""
    now, mono = s.now().timestamp(), time.monotonic()
    for k in range(minutes * 6, -1, -1):
        for i, name in enumerate(list(s.dp.devices)):
            s.dp.count(name, "pass", (20 + 10 * i) * 10 + (k % 7) * 15)
            if i == 0:
                s.dp.count(name, "brute_force", 2 * (k % 3))
            s.traffic.record(name, s.dp.counters(name), now - 10 * k, mono - 10 * k)


def new_name(s):
    return next(n for n, d in s.known.items() if not d["approved"])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    sup = seeded(tmp_path_factory.mktemp("browser-pages"))
    srv = Served(sup)
    try:
        yield srv
    finally:
        srv.close()
        sup.store.close()


# Set before any page's own script runs (DevTools' scripts are not the page's, so the CSP
# allows them): every CSP violation the page meets, whether it logs one or not; and the last
# answer of each traffic query the page's script made, which is what its charts were given.
WATCH = """window.kalkiCsp = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.kalkiCsp.push(e.violatedDirective + " " + (e.blockedURI || "inline") + " " +
                       (e.sourceFile || "") + ":" + (e.lineNumber || ""));
});
window.kalkiFetched = {};
var kalkiFetch = window.fetch;
window.fetch = function (input) {
  var url = String((input && input.url) || input).replace(/^https?:[/][/][^/]+/, "");
  return kalkiFetch.apply(this, arguments).then(function (r) {
    if (url.indexOf("/traffic") >= 0) {
      r.clone().json().then(function (j) { window.kalkiFetched[url] = j; }).catch(function () {});
    }
    return r;
  });
};"""


@pytest.fixture(scope="module")
def browser():
    with headless_chromium({"goog:loggingPrefs": {"browser": "ALL"}}) as driver:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH})
        yield driver


@pytest.fixture(scope="module")
def page(served, browser):
    """The browser, logged in as the admin."""
    d = browser
    d.get(served.url + "/login")
    d.find_element(By.NAME, "user").send_keys("admin")
    d.find_element(By.NAME, "password").send_keys(PASSWORD)
    d.find_element(By.ID, "login").click()
    wait(d).until(lambda drv: drv.find_elements(By.ID, "devices"))
    return d


@pytest.fixture
def sized(page, served, request):
    """The logged-in browser at a size (request.param: a key of SIZES) in light mode."""
    width, height = SIZES[request.param]
    page.set_window_size(width, height)
    scheme(page, "light")
    yield page
    served.settle()


def wait(driver, timeout=10):
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))


def scheme(driver, which):
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                           {"features": [{"name": "prefers-color-scheme", "value": which}]})


def shot(driver, name):
    """The whole page, not only what the window shows."""
    ARTIFACTS.mkdir(exist_ok=True)
    # the window's width, not the page's: the shot has no scroll bar to leave room for
    width, height = driver.execute_script("return [Math.max(window.innerWidth, "
                                          "document.documentElement.scrollWidth), "
                                          "document.documentElement.scrollHeight]")
    try:
        png = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 12000), "scale": 1}})
        (ARTIFACTS / f"web-{name}.png").write_bytes(base64.b64decode(png["data"]))
    except Exception:    # noqa: BLE001 - an older Chromium: what the window shows will do
        driver.save_screenshot(str(ARTIFACTS / f"web-{name}.png"))


def slug(path):
    return re.sub(r"[^a-z0-9]+", "-", path.strip("/").lower()).strip("-") or "overview"


def open_page(driver, url):
    driver.get(url)
    wait(driver).until(lambda drv: drv.find_elements(By.TAG_NAME, "h1"))


# What sticks out on the right, outside any box that scrolls it: the message when a page is
# too wide.
OVERFLOW = """
const limit = window.innerWidth + 1, out = [];
function scrolls(el) {        // el, or a box around it, scrolls what sticks out
  for (let p = el; p && p !== document.body; p = p.parentElement) {
    const o = getComputedStyle(p).overflowX;
    if (o !== "visible" && o !== "clip") return true;
  }
  return false;
}
function said(el, r, what) {
  out.push(el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
           (el.className && el.className.baseVal === undefined ? "." + el.className : "") + what +
           " right=" + Math.round(r.right) + " '" + (el.textContent || "").trim().slice(0, 40) + "'");
}
for (const el of document.body.querySelectorAll("*")) {
  const r = el.getBoundingClientRect();
  if (r.width && r.right > limit && !scrolls(el.parentElement)) said(el, r, "");
  if (scrolls(el)) continue;
  for (const n of el.childNodes) {          // text runs past its box where it cannot break
    if (n.nodeType !== 3 || !n.textContent.trim()) continue;
    const range = document.createRange();
    range.selectNodeContents(n);
    const t = range.getBoundingClientRect();
    if (t.width && t.right > limit) said(el, t, " (its text)");
  }
}
// On a phone every table is cards: none scrolls in its box, none is left out of the phone's
// layout (a data table is in a .scroll; uPlot's legends are no data tables), and every cell
// says its column (but an empty state's, across them all).
const phone = window.innerWidth <= 600;
const scrolled = phone ? Array.from(document.querySelectorAll(".scroll:has(> table)"))
  .filter(s => s.scrollWidth > s.clientWidth + 1).map(s => s.innerHTML.slice(0, 60)) : [];
const loose = phone ? Array.from(document.querySelectorAll("main table:not(.u-legend)"))
  .filter(t => !t.parentElement.matches(".scroll")).map(t => t.outerHTML.slice(0, 60)) : [];
const unlabelled = Array.from(document.querySelectorAll(".scroll > table > tbody > tr > td"))
  .filter(td => !td.hasAttribute("data-label") && !td.hasAttribute("colspan"))
  .map(td => (td.closest("table").id || td.closest("table").className) + ": " + td.textContent.slice(0, 30));
return {width: document.documentElement.scrollWidth, inner: window.innerWidth, out: out.slice(-8),
        scrolled: scrolled, loose: loose, unlabelled: unlabelled};
"""

# Text and its background, by WCAG 2's contrast ratio; the background is the nearest one drawn
# behind it. Form fields and the cards' labels (::before) too.
CONTRAST = """
function rgb(s) {
  const m = s.match(/rgba?\\(([^)]+)\\)/);
  if (!m) return null;
  const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
  return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1};
}
function lum(c) {
  const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
  return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b);
}
function behind(el) {
  for (let p = el; p; p = p.parentElement) {
    const c = rgb(getComputedStyle(p).backgroundColor);
    if (c && c.a > 0.5) return c;
  }
  return rgb(getComputedStyle(document.documentElement).backgroundColor) || {r: 255, g: 255, b: 255};
}
function ratio(a, b) {
  const x = lum(a), y = lum(b);
  return (Math.max(x, y) + 0.05) / (Math.min(x, y) + 0.05);
}
function visible(el) {
  const s = getComputedStyle(el);
  return el.getClientRects().length && s.visibility !== "hidden" && s.opacity !== "0";
}
const bad = [];
function check(el, fg, bg, what) {
  const r = ratio(fg, bg);
  if (r < 4.5) bad.push(what + " " + r.toFixed(2) + " rgb(" + [fg.r, fg.g, fg.b] + ") on rgb(" +
                        [bg.r, bg.g, bg.b] + ")");
}
function name(el) {
  return el.tagName.toLowerCase() + (el.className && el.className.baseVal === undefined ?
    "." + el.className.split(" ").join(".") : "") + " '" +
    (el.textContent || el.value || "").trim().slice(0, 30) + "'";
}
for (const el of document.body.querySelectorAll("*")) {
  if (el.closest("svg, option, script, style") || !visible(el)) continue;
  const field = el.matches("input:not([type=checkbox]):not([type=hidden]), select, textarea, button");
  const text = Array.from(el.childNodes).some(n => n.nodeType === 3 && n.textContent.trim());
  if (field || text) check(el, rgb(getComputedStyle(el).color), behind(el), name(el));
  const before = getComputedStyle(el, "::before");
  if (el.dataset.label && before.content && before.content !== "none" && before.content !== '""') {
    check(el, rgb(before.color), behind(el), "label of " + name(el));
  }
}
return bad.slice(0, 12);
"""


def console_errors(driver):
    """The page's severe console messages (a CSP violation is one), but for the favicon's 404."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry.get("level") == "SEVERE" and "favicon.ico" not in entry.get("message", "")]


def brightness(css):
    r, g, b = (int(x) for x in re.findall(r"[\d.]+", css)[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def pages(served, driver):
    """Every page in the menu, each kind of device page, a profile's page, a profile made from
    a device (its text in a <pre>)."""
    open_page(driver, served.url + "/")
    menu = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "header nav a")]
    paths = [re.sub(r"^https?://[^/]+", "", href) for href in menu]
    assert "/" in paths and "/settings" in paths, paths
    return paths + ["/devices/camera1", f"/devices/{new_name(served.sup)}", f"/devices/{LONG_NAME}",
                    "/profiles/camera", f"/devices/{LONG_NAME}/profile"]


@pytest.mark.parametrize("sized", list(SIZES), indirect=True)
@pytest.mark.parametrize("mode", ["light", "dark"])
def test_every_page_fits_keeps_the_csp_and_its_contrast(served, sized, mode, request):
    d = sized
    size = request.node.callspec.params["sized"]
    width, height = SIZES[size]
    scheme(d, mode)
    d.get_log("browser")              # what came before is another test's
    problems = []
    for path in pages(served, d):
        open_page(d, served.url + path)
        assert d.find_element(By.TAG_NAME, "h1").text and "/login" not in d.current_url, path
        # the raw JSON behind each toggle is the widest thing on a page: shown, to be measured
        d.execute_script("document.querySelectorAll('details').forEach(x => { x.open = true; })")
        fit = d.execute_script(OVERFLOW)
        assert fit["inner"] == width, f"the window is {fit['inner']} px wide inside, not {width}"
        if fit["width"] > fit["inner"] + 1 or fit["out"]:
            problems.append(f"{path}: {fit['width']} px wide in {fit['inner']}: {fit['out']}")
        if fit["scrolled"]:
            problems.append(f"{path}: a table scrolls sideways on a phone: {fit['scrolled']}")
        if fit["loose"]:
            problems.append(f"{path}: a table outside the phone's layout (not in a .scroll): {fit['loose']}")
        if fit["unlabelled"]:
            problems.append(f"{path}: cells without data-label: {fit['unlabelled']}")
        csp = d.execute_script("return window.kalkiCsp")
        if csp:
            problems.append(f"{path}: CSP violations {csp}")
        errors = console_errors(d)
        if errors:
            problems.append(f"{path}: console errors {errors}")
        low = d.execute_script(CONTRAST)
        if low:
            problems.append(f"{path}: contrast below 4.5: {low}")
        body = d.execute_script("return getComputedStyle(document.body).backgroundColor")
        if (brightness(body) < 0.25) != (mode == "dark"):
            problems.append(f"{path}: the background is {body} in {mode} mode")
        shot(d, f"page-{slug(path)}-{width}x{height}{'-dark' if mode == 'dark' else ''}")
        served.settle()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("sized", ["phone"], indirect=True)
def test_tables_are_cards_on_a_phone_and_rows_on_a_desk(served, sized):
    d = sized
    open_page(d, served.url + "/devices/camera1")
    cell = d.find_element(By.CSS_SELECTOR, "table.counters tbody td")
    assert cell.get_attribute("data-label") == "reason"
    assert d.execute_script("return getComputedStyle(arguments[0]).display", cell) == "flow-root"
    label = d.execute_script("return getComputedStyle(arguments[0], '::before').content", cell)
    assert label == '"reason"'
    d.set_window_size(*SIZES["desk"])
    assert d.execute_script("return getComputedStyle(arguments[0]).display", cell) == "table-cell"
    assert d.execute_script("return getComputedStyle(arguments[0], '::before').content", cell) == "none"


@pytest.mark.parametrize("sized", ["phone"], indirect=True)
def test_the_overview_rows_are_labelled_when_the_page_adds_one(served, sized):
    """A device the gateway learns while the overview is open gets its row from the script;
    on a phone it is a card like the others."""
    d = sized
    open_page(d, served.url + "/")
    wait(d).until(lambda drv: drv.execute_script("return document.body.dataset.connected") == "1")
    served.call(served.sup.discovered, "02:4b:00:00:00:05", "198.18.0.14")
    name = next(n for n, x in served.sup.known.items() if x["mac"] == "02:4b:00:00:00:05")
    row = wait(d).until(lambda drv: drv.find_element(By.CSS_SELECTOR, f'#devices tr[data-device="{name}"]'))
    labels = [td.get_attribute("data-label") for td in row.find_elements(By.TAG_NAME, "td")]
    heads = [th.get_attribute("textContent") for th in d.find_elements(By.CSS_SELECTOR, "#devices thead th")]
    assert labels == heads and labels[:4] == ["Device", "Posture", "Type", "Address"], labels
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")


@pytest.mark.parametrize("sized", ["phone"], indirect=True)
def test_the_approve_form_fits_a_phone(served, sized):
    d = sized
    name = new_name(served.sup)
    for path in ("/", f"/devices/{name}"):
        open_page(d, served.url + path)
        form = d.find_element(By.CSS_SELECTOR, "form.approve")
        right = d.execute_script("""const f = arguments[0];
            return Math.max(...Array.from(f.querySelectorAll("*")).concat([f])
                .map(x => x.getBoundingClientRect().right))""", form)
        assert right <= d.execute_script("return window.innerWidth"), (path, right)
        assert form.find_element(By.CSS_SELECTOR, "button").is_displayed()
    shot(d, "do-approve-390x844")


@pytest.mark.parametrize("sized", ["phone"], indirect=True)
def test_home_assistant_s_new_password_is_shown_once_and_fits_a_phone(served, sized, tmp_path):
    """The settings page's Home Assistant section on a phone: its button gives a password,
    shown this once in a line that fits, and gone from the page after."""
    d = sized
    sup = served.sup
    write_config(tmp_path / "mqtt", port=1883, users={"kalki": random_password()},
                 home_assistant_user=sup.cfg.mqtt.home_assistant_user)     # written, not started
    sup.broker_files = BrokerFiles(tmp_path / "mqtt", ("127.0.0.1", 1883))
    try:
        open_page(d, served.url + "/settings")
        section = d.find_element(By.ID, "home-assistant")
        assert "none yet" in section.text and sup.cfg.mqtt.home_assistant_user in section.text
        section.find_element(By.CSS_SELECTOR, "form button").click()
        shown = wait(d).until(lambda drv: drv.find_elements(By.ID, "ha-password"))
        password = shown[0].text
        assert len(password) >= 16, password
        d.execute_script("arguments[0].scrollIntoView()", shown[0])
        fit = d.execute_script(OVERFLOW)
        assert fit["width"] <= fit["inner"] + 1 and not fit["out"], fit
        right = d.execute_script("return arguments[0].getBoundingClientRect().right", shown[0])
        assert right <= d.execute_script("return window.innerWidth"), right
        shot(d, "do-ha-password-390x844")
        open_page(d, served.url + "/settings")
        assert not d.find_elements(By.ID, "ha-password") and password not in d.page_source
        assert "only its hash is kept here" in d.find_element(By.ID, "home-assistant").text
    finally:
        sup.broker_files = None


@pytest.mark.parametrize("sized", ["phone"], indirect=True)
def test_a_rename_through_the_page_keeps_the_history(served, sized):
    d = sized
    served.call(served.ops.posture_set, "plug1", "suspicious", None, actor="test")
    served.call(served.ops.posture_reset, "plug1", actor="test")
    open_page(d, served.url + "/devices/plug1")
    history = history_of(d)
    assert len(history) >= 2 and any("set by operator" in row for row in history), history
    field = d.find_element(By.CSS_SELECTOR, "form.rename input[name=new]")
    field.clear()
    field.send_keys("kitchen-plug")
    d.find_element(By.CSS_SELECTOR, "form.rename button").click()
    wait(d).until(lambda drv: drv.current_url.endswith("/devices/kitchen-plug"))
    said = " ".join(p.text for p in d.find_elements(By.CSS_SELECTOR, ".flash"))
    assert "plug1 is now kitchen-plug" in said, said
    assert history_of(d)[-len(history):] == history, history_of(d)
    assert "plug1" in d.find_element(By.CSS_SELECTOR, "dl.facts").text      # "Formerly"
    shot(d, "do-rename-390x844")
    open_page(d, served.url + "/")
    assert d.find_elements(By.CSS_SELECTOR, '#devices tr[data-device="kitchen-plug"]')
    assert not d.find_elements(By.CSS_SELECTOR, '#devices tr[data-device="plug1"]')
    assert "plug1" not in served.sup.known and "kitchen-plug" in served.sup.known


def history_of(driver):
    """The device page's posture history: each row's posture and reason (its time is told in
    words that change as it ages)."""
    section = driver.find_element(By.XPATH, "//section[h2[text()='Posture history']]")
    return [" ".join(td.text for td in tr.find_elements(By.TAG_NAME, "td")[1:])
            for tr in section.find_elements(By.CSS_SELECTOR, "tbody tr")]


@pytest.mark.parametrize("sized", ["phone"], indirect=True)
def test_an_unblock_through_the_page(served, sized):
    d = sized
    served.call(served.ops.block_source, "198.19.0.77", 0)
    open_page(d, served.url + "/alerts")
    blocked = d.find_element(By.ID, "blocked")
    assert "198.19.0.77" in blocked.text and "until unblocked" in blocked.text
    shot(d, "do-unblock-before-390x844")
    blocked.find_element(By.XPATH, ".//button[text()='Unblock 198.19.0.77']").click()
    wait(d).until(lambda drv: "198.19.0.77 unblocked" in
                  " ".join(p.text for p in drv.find_elements(By.CSS_SELECTOR, ".flash")))
    assert d.current_url.endswith("/alerts")
    assert "198.19.0.77" not in d.find_element(By.ID, "blocked").text
    assert "198.19.0.66" in d.find_element(By.ID, "blocked").text          # the other stays
    assert "198.19.0.77" not in {b["source"] for b in served.call(served.ops.blocked_sources)}
    shot(d, "do-unblock-390x844")


@pytest.mark.parametrize("sized", ["phone"], indirect=True)
def test_a_restore_through_the_page_undoes_a_change(served, sized, tmp_path):
    d = sized
    ops = served.ops
    served.call(ops.update_settings, {"timezone": "Europe/Lisbon"}, "test")
    served.call(ops.device_group, "camera1", "yard", actor="test")
    backup = tmp_path / "kalki-backup.json"
    backup.write_text(served.call(ops.backup, actor="test")["text"], encoding="utf-8")
    served.call(ops.update_settings, {"timezone": "Asia/Tokyo"}, "test")
    served.call(ops.device_group, "camera1", "garage", actor="test")
    open_page(d, served.url + "/settings")
    assert d.find_element(By.NAME, "timezone").get_attribute("value") == "Asia/Tokyo"
    d.find_element(By.CSS_SELECTOR, "#backup input[type=file]").send_keys(str(backup))
    d.find_element(By.ID, "restore").click()
    flash = wait(d).until(lambda drv: [p.text for p in drv.find_elements(By.CSS_SELECTOR, ".flash")])
    said = " ".join(flash)
    assert re.search(r"Restored \d+ setting\(s\), \d+ profile\(s\), \d+ rule\(s\) and \d+ device\(s\)",
                     said), said
    assert d.find_element(By.NAME, "timezone").get_attribute("value") == "Europe/Lisbon"
    assert served.call(ops.settings)["timezone"] == "Europe/Lisbon"
    assert served.sup.known["camera1"].get("group") == "yard"
    shot(d, "do-restore-390x844")


@pytest.mark.parametrize("sized", ["desk"], indirect=True)
def test_dark_mode_follows_the_system_without_a_reload(served, sized):
    d = sized
    open_page(d, served.url + "/devices/camera1")
    d.execute_script("window.kalkiMarker = 1")
    light = d.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert brightness(light) > 0.75, light
    scheme(d, "dark")
    dark = d.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert brightness(dark) < 0.25, dark
    assert d.execute_script("return window.kalkiMarker") == 1
    # the page's own parts turn too, not only its background
    card = d.execute_script("return getComputedStyle(document.querySelector('table')).backgroundColor")
    assert brightness(card) < 0.3, card
    field = d.execute_script("return getComputedStyle(document.querySelector('select')).backgroundColor")
    assert brightness(field) < 0.3, field
    shot(d, "do-dark-device-1280x900")
    scheme(d, "light")


# -- the charts (uPlot, drawn by app.js from the JSON API) and the posture graph (server SVG) --

def inked(driver, css):
    """How many of the canvas's pixels are drawn on (0: none, or no such canvas)."""
    return driver.execute_script("""
        var c = document.querySelector(arguments[0]);
        if (!c || !c.width || !c.height) return 0;
        var px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data, n = 0;
        for (var i = 3; i < px.length; i += 4) if (px[i]) n++;
        return n;""", css)


def spark_peak(driver, device):
    """The most packets a second passed in the overview's last answer for the sparklines."""
    return driver.execute_script("""
        var got = Object.keys(window.kalkiFetched)
          .filter(function (u) { return u.indexOf("/api/traffic?") === 0; });
        var d = got.length && window.kalkiFetched[got[0]].devices[arguments[0]];
        if (!d) return null;
        return Math.max.apply(null, d.passed_packets.filter(function (v) { return v !== null; }).concat([0]));
        """, device)


def counts(text):
    """(passed, dropped) packets from the words a chart's page says them in."""
    m = re.search(r"([\d,]+) packets passed\b.*?([\d,]+) dropped", text or "")
    assert m, text
    return tuple(int(x.replace(",", "")) for x in m.groups())


@pytest.mark.parametrize("sized", ["desk"], indirect=True)
def test_the_traffic_charts_are_drawn_and_follow_the_kernel_s_counters(served, sized):
    d = sized
    assert served.sup.traffic is not None, "[state] traffic_charts is on by default"
    dp = served.sup.dp
    # the overview: a sparkline in each device's row, given what the counters grew by
    open_page(d, served.url + "/")
    canvas = '[data-spark="camera1"] canvas'
    wait(d, 15).until(lambda drv: inked(drv, canvas))
    drawn = lambda: d.execute_script(f"return document.querySelector('{canvas}').toDataURL()")
    wait(d, 15).until(lambda drv: spark_peak(drv, "camera1") is not None)
    assert spark_peak(d, "camera1") < 500         # the feeder's 20 packets a second
    before = drawn()
    served.call(dp.count, "camera1", "pass", 50_000)
    started = time.monotonic()
    # 50,000 packets in one 10-s slot: over 800 a second in the minute that holds it
    # a reading every 10 s, the page's query every 10 s: 20 s at most, and room to spare
    wait(d, 40).until(lambda drv: spark_peak(drv, "camera1") >= 500)
    wait(d, 5).until(lambda drv: drawn() != before)
    print(f"sparkline: 50,000 more packets drawn {time.monotonic() - started:.1f} s after counting")
    shot(d, "do-sparklines-1280x900")
    # the device page: packets and bytes, passed and dropped, and the drops by reason
    open_page(d, served.url + "/devices/camera1")
    for chart in ("packets", "bytes"):
        wait(d, 15).until(lambda drv: inked(drv, f'[data-chart="{chart}"] canvas'))
    totals = lambda: d.find_element(By.ID, "traffic-totals").text
    packets = '[data-chart="packets"] canvas'
    drawn = lambda: d.execute_script(f"return document.querySelector('{packets}').toDataURL()")
    _, dropped = counts(totals())
    before = drawn()
    served.call(dp.count, "camera1", "port_scan", 20_000)
    started = time.monotonic()
    wait(d, 40).until(lambda drv: counts(totals())[1] >= dropped + 20_000)
    wait(d, 5).until(lambda drv: drawn() != before)
    print(f"traffic chart: 20,000 more drops shown {time.monotonic() - started:.1f} s after counting")
    reasons = {li.get_attribute("data-reason") for li in d.find_elements(By.CSS_SELECTOR, "#drop-reasons li")}
    assert {"port_scan", "brute_force"} <= reasons, reasons
    shot(d, "do-traffic-chart-1280x900")


@pytest.mark.parametrize("sized", list(SIZES), indirect=True)
def test_the_rules_page_draws_the_posture_graph(served, sized):
    d = sized
    open_page(d, served.url + "/rules")
    svg = d.find_element(By.CSS_SELECTOR, "svg.posture-graph")
    assert svg.is_displayed() and svg.size["width"] > 100 and svg.size["height"] > 40
    nodes = [g.get_attribute("data-posture") for g in svg.find_elements(By.CSS_SELECTOR, "g.pg-node")]
    assert {"normal", "suspicious", "attack", "quarantine"} <= set(nodes), nodes
    words = [t.get_attribute("textContent") for t in svg.find_elements(By.CSS_SELECTOR, "g.pg-node text")]
    assert {"normal", "attack"} <= {w.strip() for w in words}, words
    rules = {g.get_attribute("data-rule") for g in svg.find_elements(By.CSS_SELECTOR, "g[data-rule]")}
    assert "device-under-attack" in rules, rules
    # a graph wider than a phone scrolls in its own box, which stays in the window
    width = d.execute_script("return window.innerWidth")
    assert d.execute_script("return arguments[0].parentElement.getBoundingClientRect().right", svg) <= width
    shot(d, f"do-posture-graph-{width}x{d.get_window_size()['height']}")
