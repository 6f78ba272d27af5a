#!/usr/bin/env bash
# Checks deploy/prometheus/ and deploy/grafana/ with promtool (Debian's `prometheus` package,
# installed by scripts/install-test-deps.sh): the rules parse, their unit tests pass (one
# scenario per alert, a backend going down among them), the example scrape config is valid,
# and every PromQL expression of the dashboard parses (Grafana's $variables replaced by
# values). That the metrics they name exist is tests/deploy_metrics.rs's job.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v promtool >/dev/null || { echo "promtool missing: run scripts/install-test-deps.sh" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

promtool check rules deploy/prometheus/copilot-lb.rules.yaml
(cd deploy/prometheus && promtool test rules copilot-lb.rules.test.yaml)
promtool check config deploy/prometheus/prometheus.yaml

# The dashboard's expressions as recording rules, so promtool parses each one.
python3 - deploy/grafana/copilot-lb.json "$tmp/dashboard.rules.yaml" <<'PY'
import json, sys
dash = json.load(open(sys.argv[1]))
exprs = []
def walk(v):
    if isinstance(v, dict):
        if v.get("type") != "row" and isinstance(v.get("targets"), list):
            exprs.extend(t["expr"] for t in v["targets"] if "expr" in t)
        for x in v.values():
            walk(x)
    elif isinstance(v, list):
        for x in v:
            walk(x)
walk(dash)
if len(exprs) < 20:
    sys.exit(f"only {len(exprs)} expressions found in {sys.argv[1]}")
subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$job": ".*", "$instance": ".*"}
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        for k, v in subst.items():
            e = e.replace(k, v)
        if "$" in e:
            sys.exit(f"unknown Grafana variable in {e!r}")
        out.write(f"      - record: dashboard:expr_{i}\n        expr: {json.dumps(e)}\n")
print(f"{len(exprs)} dashboard expressions")
PY
promtool check rules "$tmp/dashboard.rules.yaml"
