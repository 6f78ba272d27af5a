// copilot-lb e2e: the session-aware sidecar with the real Node SDK (@github/copilot-sdk 1.0.14).
//
//   node tests/e2e/node/sidecar.mjs --url 127.0.0.1:PORT --model-url http://127.0.0.1:M/v1
//        [--e2e-dir <repo>/.e2e] [--nonce N] [--sessions 4]
//
// One client (never replaced): create N sessions with one turn each, print "READY", then wait
// for a line on stdin (the test kills an edge meanwhile) and, with the same client object,
// sendAndWait a RECALL turn on every session: each answer must list the session's earlier
// prompt (the history survived the move). "PASS <step>" / "FAIL <step>: why" lines, a final
// "RESULT {json}" line with the milliseconds from "go" to each answer; exit 0 only if all pass.
import readline from "node:readline";
import { common, opt, sdk } from "./args.mjs";

const { CopilotClient, RuntimeConnection } = sdk;
const { url, nonce, nSessions, timeoutMs, cfg } = common("sidecar.mjs");

const ids = Array.from({ length: nSessions }, (_, n) => `sc-node-${n}-${nonce}`);
const first = (n) => `node first turn ${n} nonce ${nonce}`;

let failed = 0;
const took = [];
const client = new CopilotClient({ connection: RuntimeConnection.forUri(url) });
try {
  await client.start();
  const sessions = await Promise.all(ids.map((sessionId) => client.createSession({ sessionId, ...cfg })));
  const replies = await Promise.all(sessions.map((s, n) => s.sendAndWait({ prompt: first(n) }, timeoutMs)));
  const bad = replies.filter((r, n) => r?.data?.content !== "ECHO: " + first(n).toUpperCase());
  console.log(bad.length ? `FAIL first-turns: ${JSON.stringify(bad.map((r) => r?.data?.content))}` : "PASS first-turns");
  if (bad.length) failed++;
  console.log(`READY ${JSON.stringify(ids)}`);
  const rl = readline.createInterface({ input: process.stdin });
  await new Promise((resolve) => rl.once("line", resolve));
  rl.close();
  const t0 = performance.now();
  await Promise.all(
    sessions.map(async (s, n) => {
      const ask = `RECALL after the edge died ${n}`;
      try {
        const r = await s.sendAndWait({ prompt: ask }, timeoutMs);
        took.push(Math.round(performance.now() - t0));
        const want = `RECALL: ${first(n)}`;
        if (r?.data?.content === want) {
          console.log(`PASS recall ${ids[n]}`);
        } else {
          failed++;
          console.log(`FAIL recall ${ids[n]}: ${JSON.stringify(r?.data?.content)} != ${JSON.stringify(want)}`);
        }
      } catch (e) {
        failed++;
        console.log(`FAIL recall ${ids[n]}: ${e?.message ?? e}`);
      }
    }),
  );
} catch (e) {
  failed++;
  console.log(`FAIL setup: ${e?.stack ?? e}`);
} finally {
  try {
    await client.forceStop();
  } catch {
    /* already stopped */
  }
}
console.log(`RESULT ${JSON.stringify({ ids, nonce, failed, took })}`);
console.log(failed ? `FAIL overall: ${failed} failed` : "PASS overall");
process.exit(failed ? 1 : 0);
