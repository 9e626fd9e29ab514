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
          var cells = [a, badge, document.createTextNode(d.type || "—"),
                       document.createTextNode(d.ip || ""), document.createTextNode("")];
          if (!d.approved) {
            var link = document.createElement("a");
            link.href = "/devices/" + encodeURIComponent(d.name);
            text(link, "approve…");
            cells[4] = link;
          }
          cells.forEach(function (c) { var td = document.createElement("td"); td.appendChild(c); row.appendChild(td); });
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
      if (ev.kind === "posture") { setPosture(ev.device, ev.posture, true); refreshSummary(); }
      else if (ev.kind === "alert") { addAlert(ev); if (ev.type === "new-device") { addDeviceRows(); refreshSummary(); } }
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

  document.addEventListener("DOMContentLoaded", function () {
    if (document.body.dataset.now) skew = Number(document.body.dataset.now) - Date.now() / 1000;
    setInterval(refreshAgo, 15000);
    live(); reloadLater();
  });
})();
