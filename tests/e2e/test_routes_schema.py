"""copilot-lb's routing table against the installed Copilot CLI's own RPC schema.

The table (`copilot-lb routes`) is an allow-list derived from the schema the CLI package ships
(`schemas/api.schema.json`, unpacked by the CLI into COPILOT_CACHE_HOME/pkg/<platform>/<version>).
When a CLI upgrade adds, drops or reshapes a method, these tests fail and name it, instead of
copilot-lb silently refusing (or, worse, forwarding) something nobody classified.

Only the schema's `server` and `session` groups are client-to-CLI requests; `clientSession` and
`clientGlobal` are what the CLI asks a client, never routed by the proxy.
"""
from __future__ import annotations

import json
import re
import subprocess

import pytest

import harness

pytestmark = pytest.mark.e2e

# Session-naming params of forwarded methods that the table deliberately does not check, each
# with the reason. Anything else whose name says it holds session ids must be in the table.
NOT_LOCAL_SESSIONS = {
    # Kinds the proxy refuses before forwarding (remote, handoff) name remote sessions.
    ("sessions.open", "remoteSessionId"): "kind remote is refused by the proxy",
    ("sessions.open", "metadata.sessionId"): "kind handoff is refused by the proxy",
    ("sessions.open", "metadata.remoteSessionIds"): "kind handoff is refused by the proxy",
    # A Mission Control session id, not a local CLI session.
    ("sessions.startRemoteControl", "config.existingMcSession.mcSessionId"): "a Mission Control id",
}
SESSION_FIELD = re.compile(r"(^|[a-z])(sessionId|SessionId|sessionIds|SessionIds)$")


def cli_version() -> str:
    pkg = harness.NPM_DIR / "node_modules" / "@github" / "copilot" / "package.json"
    return json.loads(pkg.read_text())["version"]


@pytest.fixture(scope="module")
def schema(e2e_install) -> dict:
    path = harness.CACHE_DIR / "pkg" / "linux-x64" / cli_version() / "schemas" / "api.schema.json"
    if not path.exists():
        pytest.fail(f"the installed CLI's schema is not at {path}: run tests/e2e/install.sh")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def table() -> dict[str, dict]:
    binary = harness.proxy_bin()
    if not binary.exists():
        pytest.fail(f"copilot-lb binary not found at {binary}")
    out = subprocess.run([str(binary), "routes"], capture_output=True, text=True, check=True, timeout=30)
    return {m["method"]: m for m in json.loads(out.stdout)["methods"]}


def schema_methods(schema: dict) -> dict[str, dict]:
    found: dict[str, dict] = {}

    def walk(node):
        if isinstance(node, dict):
            if "rpcMethod" in node:
                found[node["rpcMethod"]] = node
                return
            for v in node.values():
                walk(v)
    for group in ("server", "session"):
        walk(schema[group])
    return found


def session_fields(schema: dict, method: dict) -> set[str]:
    """Dotted paths of every param property (at any depth, through $ref, anyOf/oneOf/allOf,
    arrays) whose name says it holds session ids."""
    defs = schema["definitions"]
    out: set[str] = set()

    def visit(node, path: list[str], seen: frozenset):
        if not isinstance(node, dict):
            return
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name in seen:
                return
            seen = seen | {name}
            node = defs[name]
        for comb in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(comb, []):
                visit(sub, path, seen)
        for key, sub in (node.get("properties") or {}).items():
            p = path + [key]
            if SESSION_FIELD.search(key):
                out.add(".".join(p))
            visit(sub, p, seen)
        if isinstance(node.get("items"), dict):
            visit(node["items"], path[:-1] + [path[-1] + "[]"] if path else ["[]"], seen)
    if method.get("params"):
        visit(method["params"], [], frozenset())
    return out


def covered(entry: dict) -> set[str]:
    """The param paths the table checks for an entry."""
    got = {a["field"] for a in entry["also"]}
    key = entry["session"] or ""
    if key.startswith("options.sessionId"):  # sessions.open, by kind
        got |= {"options.sessionId", "sessionId"}
    elif key.endswith("[0]"):
        got.add(key[:-3])
    elif key:
        got.add(key)
    return got


def test_every_schema_method_is_classified(schema, table):
    missing = sorted(set(schema_methods(schema)) - set(table))
    assert not missing, (
        f"CLI {cli_version()} has {len(missing)} method(s) copilot-lb's routing table does not "
        f"classify (they are refused until it does; add them to src/route/table.rs): {missing}")


def test_every_classified_method_exists_in_the_schema(schema, table):
    methods = schema_methods(schema)
    gone = sorted(m for m, e in table.items() if e["origin"] == "schema" and m not in methods)
    assert not gone, f"the routing table classifies method(s) CLI {cli_version()} no longer has: {gone}"
    marked_sdk = sorted(m for m, e in table.items() if e["origin"] == "sdk" and m in methods)
    assert not marked_sdk, f"in the CLI's schema now, but marked as SDK-only in the table: {marked_sdk}"


def test_sdk_only_methods_are_still_sent_or_served(table):
    """Methods the table keeps although the schema does not list them must be ones an
    installed SDK still sends or the installed CLI still serves (else they are dead entries)."""
    node = harness.NPM_DIR / "node_modules" / "@github" / "copilot-sdk" / "dist"
    venv = harness.E2E_DIR / "venv" / "lib"
    py = next(venv.glob("python3*/site-packages/copilot"), None)
    sources = [node / "client.js", node / "session.js"]
    if py:
        sources += [py / "client.py", py / "session.py"]
    sources.append(harness.CACHE_DIR / "pkg" / "linux-x64" / cli_version() / "cli-main.js")
    text = "\n".join(p.read_text("utf-8", "replace") for p in sources if p.exists())
    unsent = sorted(m for m, e in table.items() if e["origin"] == "sdk" and f'"{m}"' not in text)
    assert not unsent, f"SDK-only entries no installed SDK sends and the CLI does not serve: {unsent}"


def test_every_session_naming_field_of_a_forwarded_method_is_checked(schema, table):
    unchecked = []
    for name, method in sorted(schema_methods(schema).items()):
        entry = table.get(name)
        if entry is None or entry["route"] == "refused":
            continue
        for field in sorted(session_fields(schema, method) - covered(entry)):
            if (name, field) not in NOT_LOCAL_SESSIONS:
                unchecked.append(f"{name}: {field}")
    assert not unchecked, (
        "forwarded method(s) with a session-naming param the routing table does not check "
        f"(add it to the entry's key or `also` in src/route/table.rs): {unchecked}")


def test_the_table_checks_no_field_the_schema_does_not_have(schema, table):
    methods = schema_methods(schema)
    stale = []
    for name, entry in sorted(table.items()):
        if name not in methods:
            continue
        fields = session_fields(schema, methods[name])
        for f in sorted(covered(entry) - {"sessionId"}):
            if f not in fields:
                stale.append(f"{name}: {f}")
    assert not stale, f"the routing table checks param(s) the CLI's schema does not have: {stale}"


def test_session_scoped_schema_methods_are_routed_by_their_session(schema, table):
    """Every method of the schema's `session` group carries params.sessionId and is routed by
    it after the ownership check."""
    wrong = []

    def walk(node):
        if isinstance(node, dict):
            if "rpcMethod" in node:
                e = table.get(node["rpcMethod"])
                if e is None or e["session"] != "sessionId" or e["route"] not in ("session", "detach", "delete"):
                    wrong.append(node["rpcMethod"])
                return
            for v in node.values():
                walk(v)
    walk(schema["session"])
    assert not wrong, f"session-group methods not routed by params.sessionId: {wrong}"
