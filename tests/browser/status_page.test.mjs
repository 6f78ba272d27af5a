// The status page in a real browser (issue #16 item 4): Debian's chromium driven by
// playwright-core, against a copilot-lb process with three fake CLI processes behind it.
//
//   COPILOT_LB_BIN=… FAKE_CLI_BIN=… node --test tests/browser/status_page.test.mjs
//   (tests/browser/run.sh builds both and runs this)
//
// It asserts that the page shows the backends, sessions by tenant and backend and the recent
// counters; that a backend killed with SIGKILL shows as down within a few seconds without a
// reload; that Drain asks for the admin token when the API answers 401, refuses a wrong one,
// drains with the right one and keeps the token in this tab only; that Undrain then works
// without asking again; that the page breaks no rule of its Content-Security-Policy; and that a
// cross-origin POST is refused. It saves a screenshot to $STATUS_PAGE_SCREENSHOT, or to the
// system temp dir (the suite must not rewrite a tracked file; refresh docs/status-page.png with
// STATUS_PAGE_SCREENSHOT=docs/status-page.png bash tests/browser/run.sh). Every wait is bounded; the whole test has a 60 s limit.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, "../..");
const LB_BIN = process.env.COPILOT_LB_BIN;
const FAKE_BIN = process.env.FAKE_CLI_BIN;
const CHROMIUM = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
const SCREENSHOT = process.env.STATUS_PAGE_SCREENSHOT || path.join(os.tmpdir(), "copilot-lb-status-page.png");
const ADMIN_TOKEN = "page-test-admin-token";
const CLI_TOKEN = "page-test-cli-token";
const TENANTS = { "team-a": "team-a-token", "team-b": "team-b-token" };
// How soon a killed backend must show as down on the page: fall 2 × (interval/8 ≥ 50 ms while
// suspect) after the first failed 300 ms probe, plus one 1 s poll, with room for a busy machine.
const DOWN_WITHIN_MS = 5000;

const children = [];
const cleanups = [];

function killAll() {
  for (const c of children) {
    if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
  }
}
process.on("exit", killAll);
// `timeout` (tests/browser/run.sh) or a Ctrl-C: no child outlives the test.
for (const sig of ["SIGTERM", "SIGINT"]) {
  process.on(sig, () => {
    killAll();
    process.exit(1);
  });
}

function withTimeout(promise, ms, what) {
  let t;
  const timeout = new Promise((_, reject) => {
    t = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(t));
}

async function freePort() {
  const srv = net.createServer();
  await new Promise((resolve, reject) => {
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", resolve);
  });
  const { port } = srv.address();
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

// Starts one fake CLI process; resolves with its process and port once it listens.
async function startFake(name) {
  const child = spawn(FAKE_BIN, ["--name", name, "--token-env", "CLI_TOKEN"], {
    env: { ...process.env, CLI_TOKEN },
    stdio: ["pipe", "pipe", "inherit"],
  });
  children.push(child);
  const port = await withTimeout(
    new Promise((resolve, reject) => {
      let out = "";
      child.stdout.on("data", (d) => {
        out += d;
        const m = out.match(/listening 127\.0\.0\.1:(\d+)/);
        if (m) resolve(Number(m[1]));
      });
      child.once("exit", (code) => reject(new Error(`fake CLI ${name} exited (${code}) before listening`)));
    }),
    10000,
    `fake CLI ${name} start`
  );
  return { name, child, port };
}

function hashToken(token) {
  const r = spawnSync(LB_BIN, ["hash-token"], { input: `${token}\n`, encoding: "utf8", timeout: 10000 });
  assert.equal(r.status, 0, `hash-token failed: ${r.stderr}`);
  return r.stdout.trim();
}

function get(port, p, headers = {}) {
  return httpRequest(port, "GET", p, headers);
}

function httpRequest(port, method, p, headers = {}) {
  return withTimeout(
    new Promise((resolve, reject) => {
      const req = http.request({ host: "127.0.0.1", port, method, path: p, headers }, (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (d) => (body += d));
        res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body }));
      });
      req.on("error", reject);
      req.end();
    }),
    5000,
    `${method} ${p}`
  );
}

// A minimal JSON-RPC client over the CLI's Content-Length framing.
class Rpc {
  static async open(port) {
    const sock = net.connect({ host: "127.0.0.1", port });
    await withTimeout(
      new Promise((resolve, reject) => {
        sock.once("connect", resolve);
        sock.once("error", reject);
      }),
      5000,
      "connect to the proxy"
    );
    return new Rpc(sock);
  }

  constructor(sock) {
    this.sock = sock;
    this.buf = Buffer.alloc(0);
    this.next = 1;
    this.pending = new Map();
    sock.on("data", (d) => this.onData(d));
    sock.on("error", () => {});
    cleanups.push(() => sock.destroy());
  }

  onData(d) {
    this.buf = Buffer.concat([this.buf, d]);
    for (;;) {
      const end = this.buf.indexOf("\r\n\r\n");
      if (end < 0) return;
      const m = this.buf.subarray(0, end).toString("latin1").match(/Content-Length:\s*(\d+)/i);
      assert.ok(m, "frame without Content-Length");
      const len = Number(m[1]);
      if (this.buf.length < end + 4 + len) return;
      const body = JSON.parse(this.buf.subarray(end + 4, end + 4 + len).toString("utf8"));
      this.buf = this.buf.subarray(end + 4 + len);
      const p = body.id !== undefined && body.method === undefined && this.pending.get(body.id);
      if (p) {
        this.pending.delete(body.id);
        p(body);
      }
    }
  }

  call(method, params) {
    const id = this.next++;
    const body = Buffer.from(JSON.stringify({ jsonrpc: "2.0", id, method, params }), "utf8");
    this.sock.write(Buffer.concat([Buffer.from(`Content-Length: ${body.length}\r\n\r\n`), body]));
    return withTimeout(new Promise((resolve) => this.pending.set(id, resolve)), 10000, method);
  }
}

test("status page: live backend states, sessions, drain with the admin token", { timeout: 60000 }, async () => {
  assert.ok(LB_BIN && fs.existsSync(LB_BIN), `COPILOT_LB_BIN (${LB_BIN}) must name the copilot-lb binary`);
  assert.ok(FAKE_BIN && fs.existsSync(FAKE_BIN), `FAKE_CLI_BIN (${FAKE_BIN}) must name the fake-cli binary`);
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} missing: run scripts/install-test-deps.sh`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "copilot-lb-page-"));
  cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
  let browser = null;
  let lbLog = path.join(dir, "copilot-lb.log");
  try {
    const fakes = [];
    for (const n of ["cli-1", "cli-2", "cli-3"]) fakes.push(await startFake(n));
    const listen = await freePort();
    const admin = await freePort();
    const tenants = Object.entries(TENANTS)
      .map(([name, tok]) => `  - name: ${name}\n    token_hashes: ["${hashToken(tok)}"]\n`)
      .join("");
    const config = [
      "listeners:",
      `  - {name: main, listen: "127.0.0.1:${listen}"}`,
      `admin: {listen: "127.0.0.1:${admin}", token_env: ADMIN_TOKEN}`,
      "backends:",
      ...fakes.map((f) => `  - {name: ${f.name}, address: "127.0.0.1:${f.port}", token_env: CLI_TOKEN}`),
      "health: {interval: 300ms, timeout: 300ms, rise: 1, fall: 2, max_down_interval: 1s}",
      "state: {kind: memory}",
      "log: {format: json, level: info}",
      "tenants:",
      tenants,
    ].join("\n");
    const cfgPath = path.join(dir, "copilot-lb.yaml");
    fs.writeFileSync(cfgPath, config);
    const log = fs.openSync(lbLog, "w");
    const lb = spawn(LB_BIN, ["serve", "--config", cfgPath], {
      env: { ...process.env, ADMIN_TOKEN, CLI_TOKEN, RUST_LOG: "info" },
      stdio: ["ignore", log, log],
    });
    children.push(lb);

    // Ready: a probe confirmed a backend (bounded).
    const readyBy = Date.now() + 10000;
    for (;;) {
      const r = await get(admin, "/readyz").catch(() => ({ status: 0 }));
      if (r.status === 200) break;
      assert.ok(lb.exitCode === null, "copilot-lb exited during start-up");
      assert.ok(Date.now() < readyBy, "copilot-lb not ready within 10 s");
      await new Promise((r) => setTimeout(r, 100));
    }

    // The page and its headers, as served.
    const index = await get(admin, "/");
    assert.equal(index.status, 200);
    assert.match(index.headers["content-type"], /^text\/html/);
    const csp = index.headers["content-security-policy"] || "";
    for (const rule of ["default-src 'none'", "script-src 'self'", "frame-ancestors 'none'"]) {
      assert.ok(csp.includes(rule), `CSP has ${rule}: ${csp}`);
    }
    assert.ok(!csp.includes("unsafe"), `no unsafe-* in the CSP: ${csp}`);
    // A page on another site cannot drain through the operator's browser.
    const foreign = await httpRequest(admin, "POST", "/api/backends/cli-1/drain", {
      Origin: "http://attacker.example",
      Authorization: `Bearer ${ADMIN_TOKEN}`,
    });
    assert.equal(foreign.status, 403, `cross-origin POST: ${foreign.body}`);

    // Sessions: 4 for team-a, 2 for team-b, their connections kept open (live).
    const sessionsOf = {};
    for (const [tenant, n] of [["team-a", 4], ["team-b", 2]]) {
      const c = await Rpc.open(listen);
      const hello = await c.call("connect", { token: TENANTS[tenant] });
      assert.equal(hello.result?.ok, true, `connect ${tenant}: ${JSON.stringify(hello)}`);
      sessionsOf[tenant] = [];
      for (let i = 0; i < n; i++) {
        const r = await c.call("session.create", { sessionId: `${tenant}-${i}` });
        assert.ok(r.result, `session.create: ${JSON.stringify(r)}`);
        sessionsOf[tenant].push(`${tenant}-${i}`);
      }
      sessionsOf[`${tenant}:conn`] = c;
    }
    // Two refused connects (a wrong token), so the refusals chart has something to show.
    for (let i = 0; i < 2; i++) {
      const c = await Rpc.open(listen);
      const r = await c.call("connect", { token: "not-a-tenant-token" });
      assert.ok(r.error, "a wrong tenant token is refused");
    }

    browser = await chromium.launchPersistentContext(path.join(dir, "chromium-profile"), {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
      viewport: { width: 1400, height: 940 },
      timeout: 20000,
    });
    const page = browser.pages()[0] || (await browser.newPage());
    page.setDefaultTimeout(5000);
    const problems = [];
    let refusedPosts = 0;
    page.on("console", (m) => {
      if (m.type() !== "error") return;
      // The two POSTs the API answers 401 (no token yet, then the wrong one) are expected.
      if (/status of 401/.test(m.text())) refusedPosts += 1;
      else problems.push(`console: ${m.text()}`);
    });
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    const statusCalls = [];
    page.on("request", (r) => {
      if (r.url().endsWith("/api/status")) statusCalls.push(Date.now());
    });
    await page.goto(`http://127.0.0.1:${admin}/`, { timeout: 10000 });

    const states = () =>
      page.evaluate(() =>
        Object.fromEntries(
          [...document.querySelectorAll("#backends tr[data-backend]")].map((tr) => [
            tr.dataset.backend,
            tr.querySelector(".state").textContent,
          ])
        )
      );
    const waitState = (name, want, timeout) =>
      page.waitForFunction(
        ([n, w]) => document.querySelector(`#backends tr[data-backend="${n}"] .state`)?.textContent === w,
        [name, want],
        { timeout }
      );
    for (const f of fakes) await waitState(f.name, "up", 5000);
    assert.deepEqual(await states(), { "cli-1": "up", "cli-2": "up", "cli-3": "up" });
    // Sessions by tenant: live / known.
    await page.waitForFunction(
      () => document.querySelector('#sessions tr[data-tenant="team-a"] .total')?.textContent === "4 / 4",
      null,
      { timeout: 5000 }
    );
    assert.equal(await page.textContent('#sessions tr[data-tenant="team-b"] .total'), "2 / 2");
    const api = JSON.parse((await get(admin, "/api/sessions")).body);
    const onCli2 = api.sessions.filter((s) => s.backend === "cli-2");
    // The page's cell per backend agrees with the admin API.
    const cellA2 = await page.textContent('#sessions tr[data-tenant="team-a"] td[data-backend="cli-2"]');
    const a2 = onCli2.filter((s) => s.owner === "team-a").length;
    assert.equal(cellA2, a2 ? `${a2} / ${a2}` : "–");
    // Health checks are listed, with latency.
    assert.ok((await page.locator('#backends tr[data-backend="cli-1"] .check').count()) > 0);
    assert.match(await page.textContent('#backends tr[data-backend="cli-1"] .reason'), /^ok in [\d.]+ ms/);
    // The refused connects are in the recent history.
    await page.waitForFunction(
      () => Number(document.querySelector('[data-series="refused"] .total')?.textContent) >= 2,
      null,
      { timeout: 5000 }
    );

    // Kill cli-2 like a crash; the page shows it down, without a reload.
    const killedAt = Date.now();
    fakes[1].child.kill("SIGKILL");
    await waitState("cli-2", "down", DOWN_WITHIN_MS);
    const downAfter = Date.now() - killedAt;
    console.log(`cli-2 shown down ${downAfter} ms after SIGKILL`);
    assert.equal((await states())["cli-1"], "up");
    assert.match(await page.textContent('#backends tr[data-backend="cli-2"] .reason'), /refused|reset|closed/);
    // A request for a session on the dead backend: its failure shows in the history.
    const dead = onCli2[0];
    if (dead) {
      const c = sessionsOf[`${dead.owner}:conn`];
      await c.call("session.getMessages", { sessionId: dead.session_id });
    }

    // Drain cli-1 from the page: the API answers 401, the page asks for the token.
    const button = page.locator('#backends tr[data-backend="cli-1"] button.action');
    assert.equal(await button.textContent(), "Drain");
    await button.click();
    await page.locator("#token-dialog[open]").waitFor({ timeout: 3000 });
    assert.equal(await page.isVisible("#token-error"), false, "no error before a first try");
    await page.fill("#token-input", "wrong-token");
    await page.click("#token-submit");
    // Refused: the dialog asks again and says why.
    await page.waitForFunction(
      () => document.querySelector("#token-dialog").open && !document.querySelector("#token-error").hidden,
      null,
      { timeout: 3000 }
    );
    assert.match(await page.textContent("#token-error"), /refused/);
    let b = JSON.parse((await get(admin, "/api/backends")).body).backends.find((x) => x.name === "cli-1");
    assert.equal(b.draining, false, "a wrong token drains nothing");
    await page.fill("#token-input", ADMIN_TOKEN);
    await page.click("#token-submit");
    await waitState("cli-1", "draining", 3000);
    assert.equal(await page.locator("#token-dialog[open]").count(), 0, "dialog closed");
    b = JSON.parse((await get(admin, "/api/backends")).body).backends.find((x) => x.name === "cli-1");
    assert.equal(b.draining, true, "the admin API agrees: cli-1 is draining");
    // The token is kept in this tab only: sessionStorage, never localStorage or a cookie.
    const kept = await page.evaluate(() => ({
      session: sessionStorage.getItem("copilot-lb.admin-token"),
      local: localStorage.length,
      cookie: document.cookie,
    }));
    assert.deepEqual(kept, { session: ADMIN_TOKEN, local: 0, cookie: "" });
    assert.equal((await browser.cookies()).length, 0);

    await page.waitForFunction(
      () => document.querySelector('#backends tr[data-backend="cli-1"] button.action')?.textContent === "Undrain",
      null,
      { timeout: 3000 }
    );
    // Let the history show the failover attempt, then the screenshot: cli-1 draining, cli-2 down.
    await page.waitForTimeout(1200);
    fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
    console.log(`screenshot: ${SCREENSHOT}`);

    // Undrain: the token is known now, no second prompt.
    await button.click();
    await waitState("cli-1", "up", 3000);
    assert.equal(await page.locator("#token-dialog[open]").count(), 0, "no prompt with a kept token");
    b = JSON.parse((await get(admin, "/api/backends")).body).backends.find((x) => x.name === "cli-1");
    assert.equal(b.draining, false);

    // Live updates are polling: about one request a second while visible.
    const span = statusCalls.length > 1 ? statusCalls[statusCalls.length - 1] - statusCalls[0] : 0;
    assert.ok(statusCalls.length >= 3 && span / (statusCalls.length - 1) < 2500, `polls: ${statusCalls.length} over ${span} ms`);
    assert.deepEqual(problems, [], "no console errors, CSP violations or page errors");
    assert.equal(refusedPosts, 2, "401 only for the untokened and the wrong-token POST");
    assert.ok(lb.exitCode === null, "copilot-lb still running");
  } catch (e) {
    const tail = fs.existsSync(lbLog) ? fs.readFileSync(lbLog, "utf8").split("\n").slice(-40).join("\n") : "";
    console.error(`copilot-lb log (last lines):\n${tail}`);
    throw e;
  } finally {
    if (browser) await withTimeout(browser.close(), 10000, "closing chromium").catch(() => {});
    killAll();
    for (const c of cleanups.reverse()) {
      try {
        c();
      } catch (_) {
        // best effort
      }
    }
  }
});
