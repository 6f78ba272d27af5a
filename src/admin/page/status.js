// The status page: polls /api/status every second while the tab is visible (a hidden or
// closed tab sends nothing) and renders it with DOM calls only (textContent, never HTML from
// data). Drain and undrain are POSTs to the admin API; when it answers 401 the page asks for
// the admin token and keeps it in this tab's sessionStorage only.
"use strict";

const POLL_MS = 1000;
const TIMEOUT_MS = 3000;
const TOKEN_KEY = "copilot-lb.admin-token";
const MAX_TOKEN_TRIES = 3;
const SERIES = [
  // key, label, whether a non-zero value is bad news
  ["requests", "requests", false],
  ["refused", "refused by the proxy", true],
  ["backend_errors", "errors from CLIs", true],
  ["failovers", "sessions failed over", false],
  ["failover_failures", "failovers that failed", true],
  ["health_failures", "health check failures", true],
  ["bad_frames", "bad frames", true],
];

let timer = null;
let polling = false;
let last = null;
const rows = new Map();
const charts = new Map();

// ---- small DOM helpers -----------------------------------------------------------------

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function $(id) {
  return document.getElementById(id);
}

function ago(ms, now) {
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s ago`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

// ---- the token, this tab only ----------------------------------------------------------

function storedToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch (_) {
    return null;
  }
}

function storeToken(t) {
  try {
    if (t === null) sessionStorage.removeItem(TOKEN_KEY);
    else sessionStorage.setItem(TOKEN_KEY, t);
  } catch (_) {
    // Storage disabled: the token lives in this page's memory only.
  }
  memoryToken = t;
}

let memoryToken = storedToken();

// Shows the token dialog; resolves to the token, or null when cancelled.
function askToken(message) {
  const dialog = $("token-dialog");
  const form = $("token-form");
  const input = $("token-input");
  const error = $("token-error");
  error.hidden = !message;
  error.textContent = message || "";
  input.value = "";
  return new Promise((resolve) => {
    const done = (value) => {
      form.removeEventListener("submit", onSubmit);
      $("token-cancel").removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      input.value = "";
      resolve(value);
    };
    const onSubmit = (ev) => {
      ev.preventDefault();
      done(input.value);
    };
    const onCancel = (ev) => {
      ev.preventDefault();
      done(null);
    };
    form.addEventListener("submit", onSubmit);
    $("token-cancel").addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onCancel);
    dialog.showModal();
    input.focus();
  });
}

async function post(path, token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const ctl = new AbortController();
  const t = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  try {
    return await fetch(path, { method: "POST", headers, cache: "no-store", signal: ctl.signal });
  } finally {
    clearTimeout(t);
  }
}

async function act(name, action, button) {
  button.disabled = true;
  const path = `/api/backends/${encodeURIComponent(name)}/${action}`;
  try {
    let r = await post(path, memoryToken);
    let tries = 0;
    let message = memoryToken ? "The stored token was refused." : null;
    while (r.status === 401 && tries < MAX_TOKEN_TRIES) {
      if (memoryToken) storeToken(null);
      const t = await askToken(message);
      if (t === null) return;
      tries += 1;
      r = await post(path, t);
      if (r.status !== 401) storeToken(t);
      message = "That token was refused.";
    }
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      notice(`${action} ${name}: ${body.error || `HTTP ${r.status}`}`);
    } else {
      notice(null);
    }
  } catch (e) {
    notice(`${action} ${name}: ${e.message || e}`);
  } finally {
    button.disabled = false;
    poll();
  }
}

function notice(text) {
  const n = $("notice");
  n.hidden = !text;
  n.textContent = text || "";
}

// ---- rendering -------------------------------------------------------------------------

function backendRow(name) {
  let r = rows.get(name);
  if (r) return r;
  const tr = el("tr");
  tr.dataset.backend = name;
  r = {
    tr,
    name: el("td", "mono", name),
    address: el("td", "mono"),
    state: el("span", "pill state"),
    stateNote: el("span", "muted small"),
    sessions: el("td", "num sessions"),
    links: el("td", "num links"),
    version: el("td", "mono small"),
    checks: el("div", "checks"),
    lastCheck: el("td", "reason small"),
    button: el("button", "action"),
  };
  const stateTd = el("td");
  stateTd.append(r.state, " ", r.stateNote);
  const checksTd = el("td");
  checksTd.append(r.checks);
  const actionTd = el("td");
  actionTd.append(r.button);
  tr.append(r.name, r.address, stateTd, r.sessions, r.links, r.version, checksTd, r.lastCheck, actionTd);
  r.button.addEventListener("click", () => {
    act(name, r.button.dataset.action, r.button);
  });
  rows.set(name, r);
  return r;
}

function renderBackends(d) {
  const tbody = $("backends").tBodies[0];
  const seen = new Set();
  for (const b of d.backends) {
    seen.add(b.name);
    const r = backendRow(b.name);
    r.address.textContent = b.address;
    r.state.textContent = b.state;
    r.state.className = `pill state ${b.state}`;
    r.stateNote.textContent = b.drained ? "drained" : b.draining && b.state === "down" ? "draining" : "";
    let s = String(b.live_sessions);
    if (b.fleet_sessions !== b.live_sessions) s += ` (fleet ${b.fleet_sessions})`;
    if (b.max_sessions != null) s += ` / ${b.max_sessions}`;
    r.sessions.textContent = s;
    r.links.textContent = String(b.links);
    r.version.textContent = b.version || "";
    const history = (b.health_history || []).slice().reverse();
    r.checks.replaceChildren(
      ...history.map((c) => {
        const sq = el("span", c.ok ? "check" : "check failed");
        sq.title = `${clock(c.at_ms)} ${c.ok ? `ok ${c.latency_ms ?? ""} ms` : `failed: ${c.detail}`}`;
        return sq;
      })
    );
    const newest = b.health_history && b.health_history[0];
    if (newest) {
      const what = newest.ok
        ? `ok${newest.latency_ms != null ? ` in ${newest.latency_ms} ms` : ""}`
        : newest.detail;
      r.lastCheck.textContent = `${what} · ${ago(newest.at_ms, d.now_ms)}`;
      r.lastCheck.title = `${clock(newest.at_ms)}: ${newest.detail}`;
      r.lastCheck.classList.toggle("error", !newest.ok);
    } else {
      r.lastCheck.textContent = "no check yet";
    }
    const action = b.draining ? "undrain" : "drain";
    r.button.dataset.action = action;
    r.button.textContent = b.draining ? "Undrain" : "Drain";
    r.button.title = d.admin_token_required ? "needs the admin token" : "";
    if (r.tr.parentNode !== tbody) tbody.append(r.tr);
  }
  for (const [name, r] of rows) {
    if (!seen.has(name)) {
      r.tr.remove();
      rows.delete(name);
    }
  }
  // Keep the configured order.
  for (const b of d.backends) tbody.append(rows.get(b.name).tr);
}

function renderSessions(d) {
  const table = $("sessions");
  const names = d.backends.map((b) => b.name);
  const head = el("tr");
  head.append(el("th", "", "tenant"), ...names.map((n) => el("th", "num", n)), el("th", "num", "total"));
  table.tHead.replaceChildren(head);
  const body = [];
  for (const t of d.sessions.tenants) {
    const tr = el("tr");
    tr.dataset.tenant = t.tenant;
    tr.append(el("td", "mono", t.tenant || "(open)"));
    for (const n of names) {
      const c = t.backends[n];
      const td = el("td", "num", c ? `${c.live} / ${c.known}` : "–");
      td.dataset.backend = n;
      tr.append(td);
    }
    tr.append(el("td", "num total", `${t.live} / ${t.known}`));
    body.push(tr);
  }
  table.tBodies[0].replaceChildren(...body);
  $("no-sessions").hidden = d.sessions.tenants.length > 0;
}

function chart(key, label, bad) {
  let c = charts.get(key);
  if (c) return c;
  const box = el("div", "chart");
  box.dataset.series = key;
  const title = el("div", "title");
  const total = el("span", "total");
  title.append(el("span", "", label), total);
  const plot = svg("svg", { viewBox: "0 0 600 48", preserveAspectRatio: "none", role: "img" });
  box.append(title, plot);
  $("history").append(box);
  c = { box, total, plot, bad };
  charts.set(key, c);
  return c;
}

function renderHistory(d) {
  const h = d.history;
  const buckets = h.buckets || [];
  $("interval").textContent = String(h.interval_s);
  const span = buckets.length ? (buckets[buckets.length - 1].end_ms - buckets[0].start_ms) / 60000 : 0;
  $("window-minutes").textContent = span >= 1 ? String(Math.round(span)) : "few";
  for (const [key, label, bad] of SERIES) {
    const c = chart(key, label, bad);
    const total = h.window[key] || 0;
    c.total.textContent = String(total);
    c.box.classList.toggle("zero", total === 0);
    c.box.classList.toggle("bad", bad && total > 0);
    const max = Math.max(1, ...buckets.map((b) => b[key] || 0));
    const slots = 61;
    const w = 600 / slots;
    const first = slots - buckets.length;
    c.plot.replaceChildren(
      ...buckets.map((b, i) => {
        const v = b[key] || 0;
        const height = v === 0 ? 0 : Math.max(2, (v / max) * 46);
        const r = svg("rect", { x: (first + i) * w + 1, y: 48 - height, width: w - 2, height });
        const t = svg("title");
        t.textContent = `${clock(b.start_ms)}–${clock(b.end_ms)}: ${v}`;
        r.append(t);
        return r;
      })
    );
  }
}

function render(d) {
  last = d;
  $("version").textContent = `v${d.version}`;
  const reg = d.registry;
  const regText = reg ? `registry ${reg.kind} ${reg.up ? "up" : "DOWN"}` : "";
  $("summary").textContent =
    `${d.connections} client connections · ${d.sessions.live} live sessions · ${regText} · ` +
    `admin up ${ago(d.started_ms, d.now_ms).replace(" ago", "")}`;
  renderBackends(d);
  renderSessions(d);
  renderHistory(d);
}

function setLive(ok, error) {
  const l = $("live");
  l.className = ok ? "pill live" : "pill stale";
  l.textContent = ok ? `live · ${clock(Date.now())}` : `no answer: ${error && error.message ? error.message : error}`;
}

// ---- polling ---------------------------------------------------------------------------

function schedule() {
  clearTimeout(timer);
  timer = null;
  if (!document.hidden) timer = setTimeout(poll, POLL_MS);
}

async function poll() {
  if (polling) return;
  polling = true;
  clearTimeout(timer);
  const ctl = new AbortController();
  const t = setTimeout(() => ctl.abort(), TIMEOUT_MS);
  try {
    const r = await fetch("/api/status", { cache: "no-store", signal: ctl.signal });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    render(await r.json());
    setLive(true);
  } catch (e) {
    setLive(false, ctl.signal.aborted ? new Error("timed out") : e);
  } finally {
    clearTimeout(t);
    polling = false;
    schedule();
  }
}

document.addEventListener("visibilitychange", () => {
  if (document.hidden) {
    clearTimeout(timer);
    timer = null;
  } else {
    poll();
  }
});

poll();
