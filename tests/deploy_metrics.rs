//! The Grafana dashboard (deploy/grafana/) and the Prometheus rules (deploy/prometheus/) name
//! only metrics, labels and label values that copilot-lb really exports, and the dashboard
//! shows every metric it exports: a running proxy is scraped over its admin socket after some
//! traffic, and the files are read as they are checked in. (promtool checks the rules'
//! syntax and behaviour in scripts/check-deploy.sh.)

mod common;

use common::{within, Client, Fixture};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What the scrape says: metric families (as written in PromQL: `_total` counters, histogram
/// `_bucket`/`_sum`/`_count`), and for every sample name its label keys and values.
#[derive(Default, Debug)]
struct Exported {
    families: BTreeSet<String>,
    names: BTreeSet<String>,
    labels: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

fn parse_scrape(text: &str) -> Exported {
    let mut e = Exported::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            let names: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_string()],
            };
            e.families
                .insert(names[0].trim_end_matches("_bucket").to_string());
            e.names.extend(names);
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, labels) = match line.find('{') {
            Some(i) => (&line[..i], &line[i + 1..line.rfind('}').unwrap()]),
            None => (line.split_whitespace().next().unwrap(), ""),
        };
        let entry = e.labels.entry(name.to_string()).or_default();
        for (k, v) in matchers(labels) {
            entry.entry(k).or_default().insert(v);
        }
    }
    e
}

/// `k="v", k2=~"x"` → (key, value) pairs, whatever the operator.
fn matchers(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(op) = rest.find(['=', '!']) {
        let key = rest[..op].trim().trim_start_matches(',').trim().to_string();
        let after = rest[op..].trim_start_matches(['=', '!', '~']);
        let Some(open) = after.find('"') else { break };
        let body = &after[open + 1..];
        let close = body.find('"').unwrap_or(body.len());
        out.push((key, body[..close].to_string()));
        rest = body.get(close + 1..).unwrap_or("");
    }
    out
}

/// One use of a metric in an expression: its name, and its `{...}` matchers if any.
#[derive(Debug)]
struct Use {
    name: String,
    matchers: Vec<(String, String, bool)>,
}

fn uses(expr: &str) -> (Vec<Use>, BTreeSet<String>) {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut grouping = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        let ident = |j: usize| j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_');
        if expr[i..].starts_with("copilot_lb_") && (i == 0 || !ident(i - 1)) {
            let start = i;
            while ident(i) {
                i += 1;
            }
            let name = expr[start..i].to_string();
            let mut ms = Vec::new();
            if b.get(i) == Some(&b'{') {
                let close = expr[i..].find('}').map(|c| i + c).unwrap_or(b.len());
                let inner = &expr[i + 1..close];
                for part in split_matchers(inner) {
                    let exact =
                        !part.contains("=~") && !part.contains("!=") && !part.contains("!~");
                    if let Some((k, v)) = matchers(&part).into_iter().next() {
                        ms.push((k, v, exact));
                    }
                }
                i = close;
            }
            out.push(Use { name, matchers: ms });
            continue;
        }
        for kw in ["by (", "by(", "without (", "without("] {
            if expr[i..].starts_with(kw) && (i == 0 || !ident(i - 1)) {
                let open = i + kw.len();
                let close = expr[open..].find(')').map(|c| open + c).unwrap_or(b.len());
                for l in expr[open..close].split(',') {
                    grouping.insert(l.trim().to_string());
                }
            }
        }
        i += 1;
    }
    (out, grouping)
}

fn split_matchers(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

/// Every string under a key named `expr` or `query` (panels, variables) in the dashboard.
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

#[derive(serde::Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(serde::Deserialize)]
struct RuleGroup {
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize)]
struct Rule {
    expr: String,
}

/// Labels Prometheus adds to every scraped series, and the histogram bucket label.
const TARGET_LABELS: [&str; 3] = ["job", "instance", "le"];

/// Checks each use against the scrape; `values` also checks exact matcher values.
fn check(file: &str, exprs: &[String], e: &Exported, values: bool, problems: &mut Vec<String>) {
    let all_keys: BTreeSet<&str> = e
        .labels
        .values()
        .flat_map(|m| m.keys().map(String::as_str))
        .chain(TARGET_LABELS)
        .collect();
    for expr in exprs {
        let (us, grouping) = uses(expr);
        for u in &us {
            if !e.names.contains(&u.name) {
                problems.push(format!("{file}: {} is not exported (in {expr:?})", u.name));
                continue;
            }
            for (k, v, exact) in &u.matchers {
                if TARGET_LABELS.contains(&k.as_str()) {
                    continue;
                }
                let Some(seen) = e.labels.get(&u.name) else {
                    problems.push(format!(
                        "{file}: {} has no series in the scrape to check {k} against",
                        u.name
                    ));
                    continue;
                };
                match seen.get(k) {
                    None => problems.push(format!(
                        "{file}: {} has no label {k} (has {:?})",
                        u.name,
                        seen.keys().collect::<Vec<_>>()
                    )),
                    Some(vals) if values && *exact && !vals.contains(v) => problems.push(format!(
                        "{file}: {}{{{k}=\"{v}\"}}: the proxy exports {k} values {vals:?}",
                        u.name
                    )),
                    Some(_) => {}
                }
            }
        }
        for g in grouping {
            if !all_keys.contains(g.as_str()) {
                problems.push(format!(
                    "{file}: grouping by unknown label {g:?} in {expr:?}"
                ));
            }
        }
    }
}

async fn scrape(admin: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("scrape timed out")
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[tokio::test]
async fn dashboard_and_rules_name_only_exported_metrics_and_the_dashboard_shows_them_all() {
    within(Duration::from_secs(60), async {
        let f = Fixture::with(2, true, |c| c.sessions.shared_storage = true).await;
        // Traffic that makes the labelled series exist: ok and proxy_error results, a refused
        // frame, a live session.
        let mut c = Client::connected(f.addr).await;
        c.ok("session.create", json!({"sessionId": "deploy-metrics"}))
            .await;
        c.ok(
            "session.send",
            json!({"sessionId": "deploy-metrics", "prompt": "x"}),
        )
        .await;
        let r = c.call("no.such.method", json!({})).await;
        assert!(r.error_code().is_some(), "{}", r.text());
        let mut bad = Client::connect(f.addr).await;
        bad.send_raw(b"Content-Length: nope\r\n\r\n").await;
        assert!(bad.closed_within(Duration::from_secs(5)).await);
        // The session's backend dies under it: a passive failure, a state transition and a
        // failover (the fakes share storage).
        let holder = common::holders(&f.fakes, "deploy-metrics")[0];
        holder.kill();
        let r = c
            .call(
                "session.send",
                json!({"sessionId": "deploy-metrics", "prompt": "y"}),
            )
            .await;
        assert!(r.json.get("result").is_some(), "no failover: {}", r.text());
        let admin = f.running.admin_addr.unwrap();
        let down = format!(
            "copilot_lb_backend_state{{backend=\"{}\"}} 2",
            holder.addr()
        );
        let mut text = String::new();
        for _ in 0..100 {
            text = scrape(admin).await;
            if text.lines().any(|l| l == down) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            text.lines().any(|l| l == down),
            "backend never down:\n{text}"
        );
        let e = parse_scrape(&text);
        assert!(
            e.names.len() > 20,
            "scrape parsed to nothing: {e:?}\n{text}"
        );

        let dash: Value = serde_json::from_str(&read("deploy/grafana/copilot-lb.json"))
            .expect("the dashboard is JSON");
        let mut dexprs = Vec::new();
        dashboard_exprs(&dash, &mut dexprs);
        assert!(dexprs.len() > 20, "{dexprs:?}");
        let rules = read("deploy/prometheus/copilot-lb.rules.yaml");
        let rules_tests = read("deploy/prometheus/copilot-lb.rules.test.yaml");
        let mut problems = Vec::new();
        check(
            "deploy/grafana/copilot-lb.json",
            &dexprs,
            &e,
            true,
            &mut problems,
        );
        // The whole rules file: expressions and the metrics its annotations point to.
        check(
            "deploy/prometheus/copilot-lb.rules.yaml",
            std::slice::from_ref(&rules),
            &e,
            true,
            &mut problems,
        );
        // The promtool scenarios' input series: names and label keys (values are scenario data).
        check(
            "deploy/prometheus/copilot-lb.rules.test.yaml",
            &[rules_tests],
            &e,
            false,
            &mut problems,
        );

        // Every exported family is on the dashboard.
        let shown: BTreeSet<String> = dexprs
            .iter()
            .flat_map(|x| uses(x).0)
            .map(|u| u.name)
            .collect();
        for fam in &e.families {
            let on = shown.iter().any(|n| {
                n == fam
                    || n.strip_suffix("_bucket") == Some(fam)
                    || n.strip_suffix("_count") == Some(fam)
                    || n.strip_suffix("_sum") == Some(fam)
            });
            if !on {
                problems.push(format!(
                    "deploy/grafana/copilot-lb.json: no panel shows {fam}"
                ));
            }
        }
        // Every item of the README's "Alert on" list has a rule on its metric.
        let parsed: RuleFile = serde_saphyr::from_str(&rules).expect("the rules file parses");
        let exprs: Vec<&str> = parsed
            .groups
            .iter()
            .flat_map(|g| g.rules.iter().map(|r| r.expr.as_str()))
            .collect();
        for metric in [
            "copilot_lb_backend_state",
            "copilot_lb_failover_failures_total",
            "copilot_lb_requests_total",
            "copilot_lb_bad_frames_total",
            "copilot_lb_connections_active",
            "copilot_lb_registry_up",
            "up",
        ] {
            if !exprs.iter().any(|x| {
                uses(x).0.iter().any(|u| u.name == metric) || x.starts_with(&format!("{metric}{{"))
            }) {
                problems.push(format!(
                    "deploy/prometheus/copilot-lb.rules.yaml: no rule on {metric}"
                ));
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    })
    .await;
}

#[test]
fn the_checker_catches_unknown_names_labels_and_values() {
    let scrape = "# TYPE copilot_lb_requests counter\n\
                  copilot_lb_requests_total{class=\"local\",result=\"ok\"} 1\n\
                  # TYPE copilot_lb_backend_state gauge\n\
                  copilot_lb_backend_state{backend=\"a\"} 0\n\
                  # TYPE copilot_lb_request_duration_seconds histogram\n\
                  copilot_lb_request_duration_seconds_bucket{class=\"local\",le=\"0.1\"} 1\n";
    let e = parse_scrape(scrape);
    assert!(e
        .names
        .contains("copilot_lb_request_duration_seconds_bucket"));
    assert!(e.families.contains("copilot_lb_request_duration_seconds"));
    let mut p = Vec::new();
    let good = [
        "sum by (class) (rate(copilot_lb_requests_total{job=~\"$job\", result=\"ok\"}[5m]))".to_string(),
        "histogram_quantile(0.9, sum by (le) (rate(copilot_lb_request_duration_seconds_bucket[1m])))".to_string(),
        "copilot_lb_backend_state == 2".to_string(),
    ];
    check("f", &good, &e, true, &mut p);
    assert!(p.is_empty(), "{p:?}");
    for bad in [
        "copilot_lb_request_total",
        "copilot_lb_requests_total{reason=\"x\"}",
        "copilot_lb_requests_total{result=\"proxy_eror\"}",
        "sum by (tenant) (copilot_lb_requests_total)",
        "copilot_lb_backend_state_total",
    ] {
        let mut p = Vec::new();
        check("f", &[bad.to_string()], &e, true, &mut p);
        assert_eq!(p.len(), 1, "{bad}: {p:?}");
    }
}

#[test]
fn the_dashboard_is_well_formed_for_grafana() {
    let dash: Value = serde_json::from_str(&read("deploy/grafana/copilot-lb.json")).unwrap();
    let vars: BTreeSet<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, BTreeSet::from(["datasource", "instance", "job"]));
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{title} overlaps another panel at {cx},{cy}"
                );
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().unwrap()),
                "{title}: duplicate refId"
            );
            let e = t["expr"].as_str().unwrap();
            // Every query follows the job and replica pickers.
            for u in uses(e).0 {
                let keys: Vec<&str> = u.matchers.iter().map(|m| m.0.as_str()).collect();
                assert!(
                    keys.contains(&"job") && keys.contains(&"instance"),
                    "{title}: {e}"
                );
            }
        }
    }
}
