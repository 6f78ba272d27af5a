// copilot-lb e2e: core scenario with the real Node SDK (@github/copilot-sdk 1.0.14).
//
//   node tests/e2e/node/core.mjs --url 127.0.0.1:PORT --model-url http://127.0.0.1:M/v1
//        [--e2e-dir <repo>/.e2e] [--nonce N] [--sessions 4] [--token T]
//
// One client: connect, ping, status, create N sessions, sendAndWait in each (concurrently);
// then a NEW client: resume session 0 (provider passed again) + history + send, listSessions,
// delete every session, listSessions again. One "PASS <step>" / "FAIL <step>: why" line per
// step, a final "RESULT {json}" line, exit 0 only if every step passed.
import { common, opt, sdk } from "./args.mjs";

const { CopilotClient, RuntimeConnection } = sdk;
const { url, nonce, nSessions, timeoutMs, cfg } = common("core.mjs");
const token = opt("--token", process.env.COPILOT_CONNECTION_TOKEN);

const ids = Array.from({ length: nSessions }, (_, n) => `e2e-node-${n}-${nonce}`);
const prompt = (n) => `node prompt ${n} nonce ${nonce}`;
const echo = (p) => "ECHO: " + p.toUpperCase();

let failed = 0;
let passed = 0;
async function step(name, fn, check = () => [true, ""]) {
  const t = performance.now();
  let v;
  try {
    v = await fn();
  } catch (e) {
    console.log(`FAIL ${name} (${(performance.now() - t).toFixed(0)} ms): ${e?.stack ?? e}`);
    failed++;
    throw e;
  }
  const [ok, detail] = check(v);
  console.log(`${ok ? "PASS" : "FAIL"} ${name} (${(performance.now() - t).toFixed(0)} ms)${detail ? (ok ? " - " : ": ") + detail : ""}`);
  if (!ok) {
    failed++;
    throw new Error(`step ${name} failed`);
  }
  passed++;
  return v;
}

const mk = () =>
  new CopilotClient({ connection: RuntimeConnection.forUri(url, token ? { connectionToken: token } : undefined) });
const clients = [];
try {
  const c1 = mk();
  clients.push(c1);
  await step("connect", () => c1.start());
  await step("ping", () => c1.ping("node-e2e"), (r) => [r.message === "pong: node-e2e", r.message]);
  await step("status", () => c1.getStatus(), (r) => [Boolean(r.version), `cli ${r.version} protocol ${r.protocolVersion}`]);
  const sessions = await step(
    "create",
    () => Promise.all(ids.map((sessionId) => c1.createSession({ sessionId, ...cfg }))),
    (ss) => [ss.every((s, i) => s.sessionId === ids[i]), `${ss.length} sessions on one client`],
  );
  await step(
    "send-each",
    () => Promise.all(sessions.map((s, n) => s.sendAndWait({ prompt: prompt(n) }, timeoutMs))),
    (rs) => {
      const bad = rs.map((r, n) => [n, r?.data?.content]).filter(([n, c]) => c !== echo(prompt(n)));
      return [bad.length === 0, bad.length ? `wrong replies ${JSON.stringify(bad)}` : `${rs.length} replies ok`];
    },
  );
  await step("close1", async () => {
    for (const s of sessions) await s.disconnect();
    const errs = await c1.stop();
    if (errs?.length) throw new Error(`stop errors: ${errs.map(String).join("; ")}`);
  });

  const c2 = mk();
  clients.push(c2);
  await step("reconnect", () => c2.start());
  const s2 = await step("resume", () => c2.resumeSession(ids[0], cfg), (s) => [s.sessionId === ids[0], s.sessionId]);
  await step("history", () => s2.getEvents(), (evs) => {
    const users = evs.filter((e) => e.type === "user.message").map((e) => e.data?.content ?? "");
    return [users.some((u) => u.includes(prompt(0))), `user messages ${JSON.stringify(users)}`];
  });
  const p2 = `node second turn nonce ${nonce}`;
  await step("send2", () => s2.sendAndWait({ prompt: p2 }, timeoutMs), (r) => [r?.data?.content === echo(p2), JSON.stringify(r?.data?.content)]);
  await step("list", () => c2.listSessions(), (l) => {
    const have = new Set(l.map((m) => m.sessionId));
    const missing = ids.filter((id) => !have.has(id));
    return [missing.length === 0, missing.length ? `missing ${missing}` : `${l.length} session(s) listed`];
  });
  await step("delete", async () => {
    await s2.disconnect();
    for (const id of ids) await c2.deleteSession(id);
  });
  await step("gone", () => c2.listSessions(), (l) => {
    const left = l.map((m) => m.sessionId).filter((id) => ids.includes(id));
    return [left.length === 0, left.length ? `still listed ${left}` : ""];
  });
  await step("stop", async () => {
    const errs = await c2.stop();
    if (errs?.length) throw new Error(`stop errors: ${errs.map(String).join("; ")}`);
  });
} catch {
  /* reported above */
} finally {
  for (const c of clients) {
    try {
      await c.forceStop();
    } catch {
      /* already stopped */
    }
  }
}
console.log(`RESULT ${JSON.stringify({ ids, nonce, passed, failed })}`);
console.log(failed ? `FAIL overall: ${passed} passed, ${failed} failed` : `PASS overall: ${passed} passed`);
process.exit(failed ? 1 : 0);
