// Shared setup of the Node e2e scripts: command-line options, the real SDK from the e2e
// install, and the session config pointing at the fake model.
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const args = process.argv.slice(2);

/** The value after `name` on the command line, or `dflt`. */
export const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt;
};

const here = path.dirname(fileURLToPath(import.meta.url));
const e2eDir = opt("--e2e-dir", process.env.COPILOT_LB_E2E_DIR ?? path.resolve(here, "../../../.e2e"));
const require = createRequire(path.join(e2eDir, "npm", "package.json"));
/** The SDK the e2e install pinned. */
export const sdk = require("@github/copilot-sdk");

/** The options every script shares; exits 2 with `script`'s usage when one is missing. */
export function common(script) {
  const url = opt("--url", null);
  const modelUrl = opt("--model-url", null);
  if (!url || !modelUrl) {
    console.error(`usage: ${script} --url HOST:PORT --model-url http://127.0.0.1:M/v1 [...]`);
    process.exit(2);
  }
  const provider = { type: "openai", baseUrl: modelUrl, apiKey: "fake-key", wireApi: "completions" };
  return {
    url,
    modelUrl,
    nonce: opt("--nonce", Math.random().toString(16).slice(2, 10)),
    nSessions: Number(opt("--sessions", "4")),
    timeoutMs: Number(opt("--timeout-ms", "60000")),
    cfg: { model: "fake-echo-1", provider, onPermissionRequest: sdk.approveAll },
  };
}
