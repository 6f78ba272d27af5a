// The backend-services guide's "Web API with Express" pattern, pointed at copilot-lb.
//
//   COPILOT_CLI_URL=127.0.0.1:4321 node express-api/server.mjs        (from examples/, after install.sh)
//   curl -s 127.0.0.1:3000/chat -H 'content-type: application/json' -d '{"userId":"42","message":"hi"}'
//
// One CopilotClient (one TCP connection to the proxy) is shared by every request. POST /chat
// {userId, message} resumes session `user-<userId>`, or creates it on the user's first request,
// sends the message, waits for the reply and answers {sessionId, resumed, content}. Requests of
// one user are serialized (a session takes one turn at a time); different users run concurrently.
// GET /healthz is the guide's health check (client.getStatus()) through the proxy.
//
// Environment:
//   COPILOT_CLI_URL            copilot-lb address, host:port (default 127.0.0.1:4321)
//   COPILOT_CONNECTION_TOKEN   token for `connect`, if the proxy's tenants require one
//   HOST, PORT                 where this app listens (default 127.0.0.1:3000)
//   COPILOT_MODEL              model id; unset: the CLI's default model
//   COPILOT_PROVIDER_BASE_URL  BYOK: set to use your own OpenAI-compatible/Azure/Anthropic endpoint
//   COPILOT_PROVIDER_TYPE      openai (default) | azure | anthropic
//   COPILOT_PROVIDER_API_KEY   the provider's API key
//   COPILOT_PROVIDER_WIRE_API  completions | responses
//   COPILOT_SEND_TIMEOUT_MS    per-message wait (default 120000)
import express from "express";
import { CopilotClient, RuntimeConnection, approveAll } from "@github/copilot-sdk";

const env = (name) => (process.env[name] ?? "").trim() || undefined;
const cliUrl = env("COPILOT_CLI_URL") ?? "127.0.0.1:4321";
const token = env("COPILOT_CONNECTION_TOKEN");
const host = env("HOST") ?? "127.0.0.1";
const port = Number(env("PORT") ?? 3000);
const sendTimeoutMs = Number(env("COPILOT_SEND_TIMEOUT_MS") ?? 120000);

/** Session options, identical on create and resume (a BYOK provider must be given on both). */
function sessionConfig() {
  // approveAll lets the agent use its tools on the CLI host; narrow it for untrusted users.
  const cfg = { onPermissionRequest: approveAll };
  if (env("COPILOT_MODEL")) cfg.model = env("COPILOT_MODEL");
  if (env("COPILOT_PROVIDER_BASE_URL")) {
    cfg.provider = {
      type: env("COPILOT_PROVIDER_TYPE") ?? "openai",
      baseUrl: env("COPILOT_PROVIDER_BASE_URL"),
      apiKey: env("COPILOT_PROVIDER_API_KEY"),
      wireApi: env("COPILOT_PROVIDER_WIRE_API"),
    };
  }
  return cfg;
}

// Single shared connection to copilot-lb (the proxy keeps each session on its own backend).
const client = new CopilotClient({
  connection: RuntimeConnection.forUri(cliUrl, token ? { connectionToken: token } : undefined),
});

// One turn at a time per session: chain each user's requests.
const tails = new Map();
function serialized(key, fn) {
  const run = (tails.get(key) ?? Promise.resolve()).then(fn);
  const tail = run.catch(() => {});
  tails.set(key, tail);
  tail.then(() => tails.get(key) === tail && tails.delete(key));
  return run;
}

async function chat(sessionId, message) {
  // Create or resume session (the guide's pattern).
  let session;
  let resumed = true;
  try {
    session = await client.resumeSession(sessionId, sessionConfig());
  } catch {
    resumed = false;
    session = await client.createSession({ sessionId, ...sessionConfig() });
  }
  try {
    const response = await session.sendAndWait({ prompt: message }, sendTimeoutMs);
    return { sessionId, resumed, content: response?.data?.content ?? null };
  } finally {
    // Release this connection's hold on the session; its history stays on the (shared) disk
    // and the next request resumes it.
    await session.disconnect().catch(() => {});
  }
}

// The guide's health check pattern.
async function checkCLIHealth() {
  try {
    const status = await client.getStatus();
    return status !== undefined ? status : false;
  } catch {
    return false;
  }
}

const app = express();
app.use(express.json({ limit: "1mb" }));

app.post("/chat", async (req, res) => {
  const { userId, message } = req.body ?? {};
  if (typeof userId !== "string" || !/^[A-Za-z0-9_.-]{1,64}$/.test(userId)) {
    return res.status(400).json({ error: "userId: 1-64 characters of [A-Za-z0-9_.-]" });
  }
  if (typeof message !== "string" || message.length === 0) {
    return res.status(400).json({ error: "message: a non-empty string" });
  }
  const sessionId = `user-${userId}`;
  try {
    res.json(await serialized(sessionId, () => chat(sessionId, message)));
  } catch (e) {
    console.error(`chat ${sessionId}: ${e?.stack ?? e}`);
    res.status(502).json({ sessionId, error: String(e?.message ?? e) });
  }
});

app.get("/healthz", async (_req, res) => {
  const status = await checkCLIHealth();
  if (status) res.json({ ok: true, version: status.version, protocolVersion: status.protocolVersion });
  else res.status(503).json({ ok: false });
});

await client.start();
const server = app.listen(port, host, () => {
  const a = server.address();
  console.log(`express-api listening on http://${a.address}:${a.port} (copilot-lb ${cliUrl})`);
});

let stopping = false;
async function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  console.log(`express-api: ${signal}, shutting down`);
  server.close();
  server.closeIdleConnections?.();
  const timer = setTimeout(() => process.exit(1), 10000);
  timer.unref();
  try {
    await client.stop();
  } catch {
    await client.forceStop().catch(() => {});
  }
  process.exit(0);
}
process.on("SIGTERM", () => shutdown("SIGTERM"));
process.on("SIGINT", () => shutdown("SIGINT"));
