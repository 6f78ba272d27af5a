//! A few-seconds run of the benchmark load generator (`benches/lg`), so it cannot rot: every
//! scenario once, tiny, against the fake CLI directly and through in-process copilot-lb
//! (plain and mTLS), plus the Markdown/SVG rendering.

#[path = "../benches/lg/mod.rs"]
mod lg;

use copilot_lb::config::Config;
use std::time::Duration;
use test_support::fake_cli::{FakeCli, FakeConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_smoke() {
    tokio::time::timeout(Duration::from_secs(60), smoke())
        .await
        .expect("loadgen smoke run took longer than 60 s");
}

async fn smoke() {
    let fake = FakeCli::start(FakeConfig::named("smoke")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tls = lg::mtls_pki(dir.path());
    let yaml = format!(
        "listeners:\n  - listen: 127.0.0.1:0\n{}backends:\n  - address: {}\nlog: {{ level: warn }}\nrouting: {{ allow_global: [test.echo, test.stream] }}\nstate: {{ path: {} }}\n",
        lg::tls_listener_yaml(dir.path(), "127.0.0.1:0"),
        fake.addr(),
        dir.path().join("state.redb").display()
    );
    let proxy = copilot_lb::app::start(Config::from_yaml(&yaml, "smoke").unwrap())
        .await
        .unwrap();
    let me = Some(std::process::id());
    let targets = [
        lg::Target {
            name: "direct".into(),
            addr: fake.addr(),
            tls: None,
            pid: me,
        },
        lg::Target {
            name: "copilot-lb".into(),
            addr: proxy.listen_addrs[0],
            tls: None,
            pid: me,
        },
        lg::Target {
            name: "copilot-lb mTLS".into(),
            addr: proxy.listen_addrs[1],
            tls: Some(tls),
            pid: me,
        },
    ];
    let spec = lg::LoadSpec {
        conns: 4,
        sessions: 2,
        duration: Duration::from_millis(300),
        max_ops: 200,
        stream_every: 10,
        stream_count: 5,
        stream_size: 200,
        payload: 16,
        warmup: 5,
    };
    let mut series = Vec::new();
    for t in &targets {
        let r = lg::load(t, &spec).await;
        assert_eq!(r.errors, 0, "{}: {r:?}", t.name);
        assert!(r.lat.n > 10 && r.events_per_s > 0.0, "{}: {r:?}", t.name);
        assert!(r.lat.p50 > 0.0 && r.lat.p50 <= r.lat.p99 && r.lat.p99 <= r.lat.max);
        let s = lg::stream(t, 200, 200, 2).await;
        assert_eq!(s.errors, 0, "{}: {s:?}", t.name);
        assert!(s.events_per_s > 0.0);
        let b = lg::big_frames(t, 256 * 1024, 2, Duration::from_secs(10)).await;
        assert_eq!(b.errors, 0, "{}: {b:?}", t.name);
        assert_eq!(b.lat.n, 2);
        let i = lg::idle(t, 20, true, Duration::from_secs(10)).await;
        assert_eq!((i.open, i.errors), (20, 0), "{}: {i:?}", t.name);
        series.push(lg::Series {
            name: t.name.clone(),
            points: lg::plot_points(&r.lat),
        });
    }
    assert!(lg::cpu_secs(std::process::id()).unwrap() > 0.0);
    assert!(lg::rss_kib(std::process::id()).unwrap() > 0);
    let svg = lg::svg_plot("smoke", &[("load".into(), series)]);
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
}
