// The backend-services guide's health check pattern (client.getStatus()), through copilot-lb.
//
//   COPILOT_CLI_URL=127.0.0.1:4321 node health/health.mjs            one check, exit 0 (healthy) or 1
//   COPILOT_CLI_URL=127.0.0.1:4321 node health/health.mjs --every 30 a check every 30 s, forever
//
// Prints one JSON line per check: {"ok":true,"version":"1.0.102","protocolVersion":3,"ms":4}.
// Env: COPILOT_CLI_URL (default 127.0.0.1:4321), COPILOT_CONNECTION_TOKEN (if the proxy needs one),
// COPILOT_HEALTH_TIMEOUT_MS (default 5000).
import { CopilotClient, RuntimeConnection } from "@github/copilot-sdk";

const env = (name) => (process.env[name] ?? "").trim() || undefined;
const cliUrl = env("COPILOT_CLI_URL") ?? "127.0.0.1:4321";
const token = env("COPILOT_CONNECTION_TOKEN");
const timeoutMs = Number(env("COPILOT_HEALTH_TIMEOUT_MS") ?? 5000);
const i = process.argv.indexOf("--every");
const everyS = i > 0 ? Number(process.argv[i + 1]) : 0;

const newClient = () =>
  new CopilotClient({
    connection: RuntimeConnection.forUri(cliUrl, token ? { connectionToken: token } : undefined),
  });
let client = null; // connected lazily; replaced after a failed check

const withTimeout = (p, ms) =>
  Promise.race([p, new Promise((_, reject) => setTimeout(() => reject(new Error(`timeout after ${ms} ms`)), ms).unref())]);

async function checkCLIHealth() {
  const t0 = performance.now();
  try {
    if (client === null) {
      client = newClient();
      await withTimeout(client.start(), timeoutMs);
    }
    const status = await withTimeout(client.getStatus(), timeoutMs);
    const ok = status !== undefined && Boolean(status.version);
    return { ok, version: status?.version, protocolVersion: status?.protocolVersion, ms: Math.round(performance.now() - t0) };
  } catch (e) {
    return { ok: false, error: String(e?.message ?? e), ms: Math.round(performance.now() - t0) };
  }
}

async function close() {
  if (client === null) return;
  try {
    await withTimeout(client.stop(), timeoutMs);
  } catch {
    await client.forceStop().catch(() => {});
  }
}

if (everyS > 0) {
  for (;;) {
    const r = await checkCLIHealth();
    console.log(JSON.stringify(r));
    if (!r.ok && client !== null) {
      // Drop the connection; the next round dials again.
      await client.forceStop().catch(() => {});
      client = null;
    }
    await new Promise((resolve) => setTimeout(resolve, everyS * 1000));
  }
} else {
  const r = await checkCLIHealth();
  console.log(JSON.stringify(r));
  if (r.ok) await close();
  else await client?.forceStop().catch(() => {});
  process.exit(r.ok ? 0 : 1);
}
