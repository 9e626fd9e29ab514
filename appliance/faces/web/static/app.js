// Kalki's page: live postures and alerts from server-sent events. No inline scripts (CSP).
"use strict";
(function () {
  function text(el, value) { el.textContent = value; }

  function setPosture(device, posture, approved) {
    document.querySelectorAll('[data-device="' + CSS.escape(device) + '"] [data-role="posture"]')
      .forEach(function (el) {
        el.className = "posture posture-" + posture;
        el.dataset.posture = posture;
        text(el, approved === false ? "waiting for approval" : posture);
      });
  }

  var WORDS = { normal: "All devices normal",
                warning: "Attention: a device is suspicious or waits for approval",
                alert: "Alert: a device is under attack or in quarantine" };

  // A posture event asks for the summary after a quarter of a second, once for a burst: 25
  // cameras moved by one rule are one request for the page, not 25 (each a status, whole).
  var summarySoon = null;
  function refreshSummarySoon() {
    if (summarySoon !== null) return;
    summarySoon = setTimeout(function () { summarySoon = null; refreshSummary(); }, 250);
  }

  function refreshSummary() {
    var el = document.getElementById("summary");
    if (!el) return;
    fetch("/api/status", { credentials: "same-origin" }).then(function (r) { return r.json(); })
      .then(function (s) {
        if (!s.summary) return;
        el.className = "summary summary-" + s.summary;
        el.dataset.summary = s.summary;
        text(el, WORDS[s.summary] || s.summary);
      }).catch(function () {});
  }

  // A device renamed: its row keeps its place, icon and buttons under the new name.
  function renameRow(from, to) {
    var row = document.querySelector('#devices tr[data-device="' + CSS.escape(from) + '"]');
    if (!row) return;
    row.dataset.device = to;
    row.querySelectorAll('a[href="/devices/' + encodeURIComponent(from) + '"]').forEach(function (a) {
      a.href = "/devices/" + encodeURIComponent(to);
      if (a.textContent === from) text(a, to);
    });
    row.querySelectorAll("form[action]").forEach(function (f) {
      f.action = f.getAttribute("action").replace("/devices/" + from + "/", "/devices/" + to + "/");
    });
    row.querySelectorAll("[data-spark]").forEach(function (el) { el.dataset.spark = to; });
  }

  function addDeviceRows() {
    var tbody = document.querySelector("#devices tbody");
    if (!tbody) return;
    fetch("/api/devices", { credentials: "same-origin" }).then(function (r) { return r.json(); })
      .then(function (list) {
        list.forEach(function (d) {
          var row = tbody.querySelector('tr[data-device="' + CSS.escape(d.name) + '"]');
          if (row) { setPosture(d.name, d.posture, d.approved); return; }
          row = document.createElement("tr");
          row.dataset.device = d.name;
          var a = document.createElement("a");
          a.href = "/devices/" + encodeURIComponent(d.name);
          text(a, d.name);
          var badge = document.createElement("span");
          badge.dataset.role = "posture";
          var spark = document.createElement("div");
          spark.className = "spark";
          spark.dataset.spark = d.name;
          var cells = [a, badge, document.createTextNode(d.type || "—"),
                       document.createTextNode(d.ip || ""), spark, document.createTextNode("")];
          if (!d.approved) {
            var link = document.createElement("a");
            link.href = "/devices/" + encodeURIComponent(d.name);
            text(link, "approve…");
            cells[5] = link;
          }
          // each cell named by its column, as the server's rows are (a card on a phone)
          var labels = Array.prototype.map.call(document.querySelectorAll("#devices thead th"),
                                                function (th) { return th.textContent; });
          cells.forEach(function (c, i) {
            var td = document.createElement("td");
            td.dataset.label = labels[i] || "";
            td.appendChild(c);
            row.appendChild(td);
          });
          tbody.appendChild(row);
          setPosture(d.name, d.posture, d.approved);
        });
      }).catch(function () {});
  }

  // Times: the server sends them in the site's time zone (when.local, when.title) with how
  // long ago; ago() is the server's rule (appliance/supervisor/explain.py), counted from the
  // server's clock (body data-now), so a lab's clock reads the same here.
  var skew = 0;

  function ago(seconds) {
    var s = Math.round(Math.abs(seconds)), n;
    if (s < 10) return "just now";
    if (s < 60) n = s + " s";
    else if (s < 3600) n = Math.floor(s / 60) + " min";
    else if (s < 86400 - 1800) n = Math.round(s / 3600) + " h";
    else { var days = Math.max(1, Math.round(s / 86400)); n = days + " day" + (days > 1 ? "s" : ""); }
    return seconds < 0 ? "in " + n : n + " ago";
  }

  function serverNow() { return Date.now() / 1000 + skew; }

  function refreshAgo() {
    var now = serverNow();
    document.querySelectorAll("[data-at]").forEach(function (el) {
      text(el, ago(now - Number(el.dataset.at)));
    });
  }

  function whenNodes(w) {
    var t = document.createElement("time");
    t.title = w.title || "";
    text(t, w.local || "");
    var rel = document.createElement("span");
    rel.className = "ago muted";
    rel.dataset.at = String(w.epoch);
    text(rel, w.ago || "");
    return [t, document.createTextNode(" "), rel];
  }

  function addAlert(a) {
    var list = document.getElementById("alerts");
    if (!list) return;
    var li = document.createElement("li");
    li.className = "alert";
    var sev = document.createElement("span");
    sev.className = "sev sev-" + (a.severity || "info");
    text(sev, a.severity || "");
    li.appendChild(sev);
    var kind = document.createElement("span");
    kind.className = "kind";
    text(kind, a.type || "");
    li.appendChild(document.createTextNode(" "));
    li.appendChild(kind);
    li.appendChild(document.createTextNode((a.device ? " " + a.device : "") + " "));
    if (a.when) whenNodes(a.when).forEach(function (n) { li.appendChild(n); });
    if (a.explanation) {
      var said = document.createElement("p");
      said.className = "explain";
      said.dataset.role = "explanation";
      text(said, a.explanation);
      li.appendChild(said);
    }
    var more = document.createElement("p");
    more.className = "muted";
    var link = document.createElement("a");
    link.href = "/alerts";
    text(link, "what to do about it: the alerts page");
    more.appendChild(link);
    li.appendChild(more);
    var none = list.querySelector(".muted:only-child");
    if (none && none.parentNode === list) list.removeChild(none);
    list.insertBefore(li, list.firstChild);
    var max = Number(list.dataset.max || 10);
    while (list.children.length > max) list.removeChild(list.lastChild);
  }

  function live() {
    if (!document.body.dataset.live || !window.EventSource) return;
    var es = new EventSource("/api/events");
    es.onmessage = function (m) {
      var ev;
      try { ev = JSON.parse(m.data); } catch (e) { return; }
      if (ev.kind === "posture") { setPosture(ev.device, ev.posture, true); refreshSummarySoon(); }
      else if (ev.kind === "alert") { addAlert(ev); if (ev.type === "new-device") { addDeviceRows(); refreshSummarySoon(); } }
      else if (ev.kind === "device") {
        if (ev.event === "renamed") renameRow(ev.from, ev.device);
        addDeviceRows(); refreshSummary();
      }
    };
    es.addEventListener("logout", function () { es.close(); window.location.href = "/login"; });
    es.onopen = function () { document.body.dataset.connected = "1"; };
  }

  function reloadLater() {
    var el = document.querySelector("[data-reload]");
    if (el) setTimeout(function () { window.location.reload(); }, 1000 * Number(el.dataset.reload || 3));
  }

  // Charts: uPlot (static/vendor/, loaded before this file on the pages that have charts), fed
  // from the JSON API every 10 s while the page is seen: the gateway reads the kernel's
  // counters every 10 s (appliance/supervisor/traffic.py), so polling is as live as it gets.
  var CHART_MS = 10000;
  var PASSED = "#1e8e3e", DROPPED = "#d93025", VALUE = "#1a5fb4";
  var drawn = [];         // {el, chart, height}: resized with the window

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin" }).then(function (r) {
      if (!r.ok) throw new Error(url + ": " + r.status);
      return r.json();
    });
  }

  function every(ms, fn) {
    fn();
    setInterval(function () { if (!document.hidden) fn(); }, ms);
  }

  // as views.size_words says it
  function sizeWords(n) {
    if (typeof n !== "number") return "—";
    var units = [["GB", 1e9], ["MB", 1e6], ["KB", 1e3]];
    for (var i = 0; i < units.length; i++) {
      if (n >= units[i][1]) return (n / units[i][1]).toFixed(1) + " " + units[i][0];
    }
    return n + " B";
  }

  function count(n) { return Number(n).toLocaleString("en"); }

  // counts per slot as rates; the last slot may still be filling (t.last_seconds of it so far)
  function perSecond(values, seconds, lastSeconds) {
    var last = values.length - 1;
    return values.map(function (v, i) {
      return v === null ? null : v / (i === last && lastSeconds ? lastSeconds : seconds);
    });
  }

  // the site's time zone on the axes, as the page's times are in it
  function zoned(tz) {
    try { new Intl.DateTimeFormat("en", { timeZone: tz }); } catch (e) { return undefined; }
    return function (ts) { return uPlot.tzDate(new Date(ts * 1e3), tz); };
  }

  function widthOf(el) { return Math.max(120, Math.floor(el.clientWidth || 300)); }

  function chartOn(el, series, data, tz, height, format) {
    // Canvas has no CSS: the axes take the text colour the style sheet gives the container.
    var ink = getComputedStyle(el).color || "#444", faint = "rgba(128,128,128,0.25)";
    var axis = { stroke: ink, grid: { stroke: faint, width: 1 }, ticks: { stroke: faint, width: 1 } };
    var values = Object.assign({ size: 64 }, axis);
    if (format) {
      values.values = function (u, splits) { return splits.map(format); };
      // wide enough for its longest label ("12.5 MB/s")
      values.size = function (u, labels) {
        var longest = (labels || []).reduce(function (n, l) { return Math.max(n, String(l).length); }, 4);
        return 16 + 7 * longest;
      };
    }
    var chart = new uPlot({ width: widthOf(el), height: height, tzDate: zoned(tz),
                            series: [{}].concat(series), axes: [axis, values] }, data, el);
    drawn.push({ el: el, chart: chart, height: height });
    return chart;
  }

  function forget(chart) {
    drawn = drawn.filter(function (d) { return d.chart !== chart; });
    chart.destroy();
  }

  function plain(v) { return v < 10 ? String(Math.round(v * 100) / 100) : count(Math.round(v)); }

  function bytesPerSecond(v) { return sizeWords(Math.round(v)) + "/s"; }

  function line(label, colour, format) {
    return { label: label, stroke: colour, width: 2, spanGaps: false, points: { show: false },
             value: function (u, v) { return v === null || v === undefined ? "—" : (format || plain)(v); } };
  }

  function trafficWords(section, t) {
    var totals = t.totals;
    text(section.querySelector("#traffic-totals"),
         (t.span === "day" ? "In the last day" : "In the last hour") + ": " + count(totals.passed_packets) +
         " packets passed (" + sizeWords(totals.passed_bytes) + "), " + count(totals.dropped_packets) +
         " dropped (" + sizeWords(totals.dropped_bytes) + ").");
    var list = section.querySelector("#drop-reasons");
    while (list.firstChild) list.removeChild(list.firstChild);
    (t.drops.length ? t.drops : [null]).forEach(function (x) {
      var li = document.createElement("li");
      if (x) { li.dataset.reason = x.reason; text(li, count(x.packets) + " packets: " + x.words); }
      else { li.className = "muted"; text(li, "none dropped"); }
      list.appendChild(li);
    });
  }

  function trafficCharts() {
    var section = document.querySelector("[data-traffic]");
    if (!section || !window.uPlot) return;
    var span = "hour", charts = {};
    function draw(t) {
      if (t.span !== span) return;       // an answer for the span before a click
      var sets = { packets: [t.passed_packets, t.dropped_packets], bytes: [t.passed_bytes, t.dropped_bytes] };
      Object.keys(sets).forEach(function (kind) {
        var el = section.querySelector('[data-chart="' + kind + '"]');
        var data = [t.at, perSecond(sets[kind][0], t.step, t.last_seconds),
                    perSecond(sets[kind][1], t.step, t.last_seconds)];
        if (charts[kind] && charts[kind].span === t.span) { charts[kind].chart.setData(data); return; }
        if (charts[kind]) forget(charts[kind].chart);
        var format = kind === "bytes" ? bytesPerSecond : plain;
        charts[kind] = { span: t.span, chart: chartOn(el, [line("passed", PASSED, format),
                                                           line("dropped", DROPPED, format)],
                                                      data, t.timezone, 180, format) };
      });
      trafficWords(section, t);
    }
    function refresh() {
      getJSON("/api/devices/" + encodeURIComponent(section.dataset.traffic) + "/traffic?span=" + span)
        .then(draw).catch(function () {});
    }
    section.querySelectorAll("button[data-span]").forEach(function (b) {
      b.addEventListener("click", function () {
        span = b.dataset.span;
        section.querySelectorAll("button[data-span]").forEach(function (o) {
          o.setAttribute("aria-pressed", o === b ? "true" : "false");
        });
        refresh();
      });
    });
    every(CHART_MS, refresh);
  }

  function sparklines() {
    if (!document.getElementById("devices") || !window.uPlot) return;     // rows may come later
    // By the cell, not the device's name: a renamed row keeps its cell (renameRow), and a
    // chart found under the old name would be drawn again beside the one there.
    var charts = new WeakMap();
    function draw(o) {
      document.querySelectorAll("[data-spark]").forEach(function (el) {
        var name = el.dataset.spark, d = o.devices[name];
        if (!d) return;
        var data = [o.at, d.passed_packets, d.dropped_packets];      // packets per second already
        el.title = name + ": packets per second over the last hour, passed (green) and dropped (red)";
        var chart = charts.get(el);
        if (chart) { chart.setData(data); return; }
        charts.set(el, new uPlot({
          width: 120, height: 32, legend: { show: false }, cursor: { show: false }, select: { show: false },
          axes: [{ show: false }, { show: false }],
          series: [{}, { stroke: PASSED, width: 1, points: { show: false } },
                   { stroke: DROPPED, width: 1, points: { show: false } }] }, data, el));
      });
    }
    every(CHART_MS, function () {
      getJSON("/api/traffic?span=hour&points=60").then(draw).catch(function () {});
    });
  }

  function whenCell(w) {
    var td = document.createElement("td");
    if (w) whenNodes(w).forEach(function (n) { td.appendChild(n); });
    else text(td, "—");
    return td;
  }

  function telemetryRows(t) {
    var tbody = document.querySelector("table.telemetry tbody");
    if (!tbody || !t.latest.length) return;
    var labels = Array.prototype.map.call(document.querySelectorAll("table.telemetry thead th"),
                                          function (th) { return th.textContent; });
    while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
    t.latest.forEach(function (x) {
      var tr = document.createElement("tr"), cells = [];
      var key = document.createElement("code");
      text(key, x.key);
      var td = document.createElement("td");
      td.appendChild(key);
      cells.push(td);
      var value = document.createElement("td");
      if (typeof x.value === "object" && x.value !== null) {        // a table or a list: as JSON
        var json = document.createElement("code");
        text(json, JSON.stringify(x.value));
        value.appendChild(json);
      } else {
        text(value, String(x.value));
      }
      var meaning = document.createElement("td");
      text(meaning, x.meaning || "—");
      cells.push(value, meaning);
      cells.push(whenCell(x.when));
      var from = document.createElement("td");
      text(from, x.source || "");
      cells.push(from);
      cells.forEach(function (c, i) { c.dataset.label = labels[i] || ""; tr.appendChild(c); });
      tbody.appendChild(tr);
    });
  }

  function telemetryCharts() {
    var box = document.getElementById("telemetry-charts");
    if (!box || !window.uPlot) return;
    var charts = {};
    function draw(t) {
      telemetryRows(t);
      Object.keys(t.series).sort().forEach(function (key) {
        var s = t.series[key], data = [s.at, s.values];
        if (charts[key]) { charts[key].setData(data); return; }
        var fig = document.createElement("figure");
        fig.className = "chart";
        fig.dataset.key = key;
        var caption = document.createElement("figcaption");
        text(caption, key);
        fig.appendChild(caption);
        box.appendChild(fig);
        var series = line(key, VALUE);
        series.points = { show: true, size: 5 };
        charts[key] = chartOn(fig, [series], data, t.timezone, 140, plain);
      });
    }
    every(CHART_MS, function () {
      getJSON("/api/devices/" + encodeURIComponent(box.dataset.telemetry) + "/telemetry")
        .then(draw).catch(function () {});
    });
  }

  function resizeCharts() {
    var pending = null;
    window.addEventListener("resize", function () {
      clearTimeout(pending);
      pending = setTimeout(function () {
        drawn.forEach(function (d) { d.chart.setSize({ width: widthOf(d.el), height: d.height }); });
      }, 200);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (document.body.dataset.now) skew = Number(document.body.dataset.now) - Date.now() / 1000;
    setInterval(refreshAgo, 15000);
    live(); reloadLater();
    trafficCharts(); sparklines(); telemetryCharts(); resizeCharts();
  });
})();
