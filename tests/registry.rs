//! The session registry (issue #13): ownership and placement survive a restart of the proxy
//! (embedded store), and replicas sharing a Redis act as one proxy: a session placed by one
//! is routed and owned the same through another, and a stalled or emptied Redis fails closed
//! for what a replica does not know. Real loopback sockets, the fake CLI, a real redis-server.

mod common;

use common::*;
use copilot_lb::config::Config;
use copilot_lb::rpc;
use serde_json::json;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};
use test_support::redis::{RedisServer, SentinelGroup};

const T: Duration = Duration::from_secs(60);

fn tenants_yaml() -> String {
    tenants_capped("")
}

/// Tenants a (with `extra` settings) and b.
fn tenants_capped(extra: &str) -> String {
    format!(
        "tenants:\n  - name: a\n    token_hashes: [\"{}\"]\n{extra}  - name: b\n    token_hashes: [\"{}\"]\n",
        copilot_lb::auth::hash_token("tok-a"),
        copilot_lb::auth::hash_token("tok-b"),
    )
}

async fn as_tenant(addr: SocketAddr, token: &str) -> Client {
    let mut c = Client::connect(addr).await;
    c.ok("connect", json!({"token": token})).await;
    c
}

/// A copilot-lb process, killed with SIGKILL when dropped (no clean shutdown to lean on).
struct Proc(Child, SocketAddr);

impl Proc {
    async fn start(cfg: &Path, state: &Path) -> Proc {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = spawn_serve(cfg, addr, state);
        let until = Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < until, "copilot-lb did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Proc(child, addr)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn ownership_survives_a_restart_of_the_proxy() {
    within(T, async {
        let fake = fakes(1, true).await.remove(0);
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("lb.yaml");
        std::fs::write(
            &cfg,
            format!(
                "backends: [{{address: {}}}]\nhealth: {{interval: 100ms, timeout: 500ms}}\n{}",
                fake.addr(),
                tenants_yaml()
            ),
        )
        .unwrap();
        let state = dir.path().join("state.redb");
        let lb = Proc::start(&cfg, &state).await;
        let mut a = as_tenant(lb.1, "tok-a").await;
        a.ok("session.create", json!({"sessionId": "kept-1"})).await;
        drop(a);
        // Killed, not stopped: what a create answered must already be on disk.
        drop(lb);
        let lb = Proc::start(&cfg, &state).await;
        let mut b = as_tenant(lb.1, "tok-b").await;
        let r = b
            .call("session.resume", json!({"sessionId": "kept-1"}))
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
        assert!(!b
            .ok("session.list", json!({}))
            .await
            .to_string()
            .contains("kept-1"));
        let mut a = as_tenant(lb.1, "tok-a").await;
        a.ok("session.resume", json!({"sessionId": "kept-1"})).await;
        a.ok(
            "session.send",
            json!({"sessionId": "kept-1", "prompt": "still mine"}),
        )
        .await;
        let list = a.ok("session.list", json!({})).await;
        assert!(list.to_string().contains("kept-1"), "{list}");
    })
    .await;
}

/// A proxy on `redis` in front of `fakes`, with tenants a and b; `drain` names backends this
/// replica alone treats as draining (so it places sessions off their rendezvous home).
async fn replica(
    redis: &RedisServer,
    fakes: &[test_support::fake_cli::FakeCli],
    drain: &[usize],
    sync: &str,
) -> (copilot_lb::app::Running, SocketAddr) {
    let backends: String = fakes
        .iter()
        .enumerate()
        .map(|(i, f)| {
            format!(
                "  - {{name: {}, address: {}, drain: {}}}\n",
                f.name(),
                f.addr(),
                drain.contains(&i)
            )
        })
        .collect();
    let yaml = format!(
        "listeners: [{{listen: 127.0.0.1:0}}]\nbackends:\n{backends}health: {{interval: 100ms, timeout: 500ms, rise: 1, fall: 2}}\nsessions: {{shared_storage: true}}\nstate: {{kind: redis, url: \"{}\", key_prefix: \"it:\", timeout: 300ms, sync_interval: {sync}}}\n{}",
        redis.url(),
        tenants_capped("    max_sessions: 2\n")
    );
    proxy(Config::from_yaml(&yaml, "replica").expect("config")).await
}

/// A session id whose rendezvous home among `fakes` is `fakes[home]`.
fn homed_on(fakes: &[test_support::fake_cli::FakeCli], home: usize, tag: &str) -> String {
    (0..)
        .map(|i| format!("{tag}-{i}"))
        .find(|id| {
            let ranked = copilot_lb::balance::rank(id, fakes.iter().map(|f| (f.name(), 1.0)));
            ranked[0] == home
        })
        .unwrap()
}

#[tokio::test]
async fn replicas_on_one_redis_route_and_own_a_session_alike() {
    within(T, async {
        let redis = RedisServer::start().expect("redis-server");
        let fakes = fakes(2, true).await;
        // Replica 1 places off home (its home backend drains there); replica 2 does not.
        let (_r1, one) = replica(&redis, &fakes, &[0], "5s").await;
        let (_r2, two) = replica(&redis, &fakes, &[], "5s").await;
        let sid = homed_on(&fakes, 0, "off-home");
        let mut a1 = as_tenant(one, "tok-a").await;
        a1.ok("session.create", json!({"sessionId": sid})).await;
        assert_eq!(holders(&fakes, &sid)[0].name(), fakes[1].name());

        // The other tenant, through the other replica: refused, and the list hides it.
        let mut b2 = as_tenant(two, "tok-b").await;
        for m in ["session.resume", "session.delete"] {
            let r = b2.call(m, json!({"sessionId": sid})).await;
            assert_eq!(
                r.error_code(),
                Some(rpc::SESSION_FORBIDDEN),
                "{m}: {}",
                r.text()
            );
        }
        assert!(!b2
            .ok("session.list", json!({}))
            .await
            .to_string()
            .contains(&sid));

        // The owner, through the other replica: routed to where the session lives, not to
        // its rendezvous home, and deleted there.
        drop(a1);
        let mut a2 = as_tenant(two, "tok-a").await;
        a2.ok("session.resume", json!({"sessionId": sid})).await;
        a2.ok("session.send", json!({"sessionId": sid, "prompt": "hi"}))
            .await;
        assert_eq!(
            fakes[0].requests("session.send"),
            0,
            "sent to the home backend"
        );
        assert!(a2
            .ok("session.list", json!({}))
            .await
            .to_string()
            .contains(&sid));
        let r = a2.ok("session.delete", json!({"sessionId": sid})).await;
        assert_eq!(r["success"], json!(true), "{r}");
        assert!(!fakes[1].storage().contains(&sid), "not deleted");
        assert_eq!(
            fakes[0].requests("session.delete"),
            0,
            "deleted at the home backend"
        );
    })
    .await;
}

#[tokio::test]
async fn a_stalled_or_emptied_redis_fails_closed_and_is_refilled() {
    within(T, async {
        let mut redis = RedisServer::start().expect("redis-server");
        let fakes = fakes(1, true).await;
        let (_r1, one) = replica(&redis, &fakes, &[], "200ms").await;
        let mut a = as_tenant(one, "tok-a").await;
        a.ok("session.create", json!({"sessionId": "held-1"})).await;

        redis.pause();
        // Known here: keeps working while Redis is stalled.
        let t = Instant::now();
        a.ok(
            "session.send",
            json!({"sessionId": "held-1", "prompt": "x"}),
        )
        .await;
        assert!(
            t.elapsed() < Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        // Unknown here: a retryable refusal within the registry's timeout, never a claim.
        let mut direct = Client::connect(fakes[0].addr()).await;
        direct
            .ok("session.create", json!({"sessionId": "elsewhere-1"}))
            .await;
        let t = Instant::now();
        let r = a
            .call("session.resume", json!({"sessionId": "elsewhere-1"}))
            .await;
        assert_eq!(
            r.error_code(),
            Some(rpc::BACKEND_UNAVAILABLE),
            "{}",
            r.text()
        );
        assert!(r.text().contains("registry"), "{}", r.text());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let r = a
            .call("session.create", json!({"sessionId": "new-1"}))
            .await;
        assert_eq!(
            r.error_code(),
            Some(rpc::BACKEND_UNAVAILABLE),
            "{}",
            r.text()
        );
        assert_eq!(fakes[0].requests("session.resume"), 0);

        // Restarted empty: the replica that holds held-1 writes it back, so a replica that
        // never saw it knows whose it is.
        redis.resume();
        redis.restart_empty().unwrap();
        let (_r2, two) = replica(&redis, &fakes, &[], "200ms").await;
        let mut b2 = as_tenant(two, "tok-b").await;
        let mut a2 = as_tenant(two, "tok-a").await;
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let r = a2
                .call("session.resume", json!({"sessionId": "held-1"}))
                .await;
            if r.error_code().is_none() {
                break;
            }
            assert!(Instant::now() < until, "never re-asserted: {}", r.text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = b2
            .call("session.resume", json!({"sessionId": "held-1"}))
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
    })
    .await;
}

#[tokio::test]
async fn a_tenants_cap_counts_every_replicas_sessions() {
    within(T, async {
        let redis = RedisServer::start().expect("redis-server");
        let fakes = fakes(2, true).await;
        let (_r1, one) = replica(&redis, &fakes, &[], "100ms").await;
        let (_r2, two) = replica(&redis, &fakes, &[], "100ms").await;
        // a may hold 2 live sessions: one through each replica.
        let mut a1 = as_tenant(one, "tok-a").await;
        let mut a2 = as_tenant(two, "tok-a").await;
        a1.ok("session.create", json!({"sessionId": "cap-1"})).await;
        a2.ok("session.create", json!({"sessionId": "cap-2"})).await;
        // Once the replicas have exchanged counts (one sync interval), a third is refused
        // through either replica, though each holds only one itself.
        for (c, tag) in [(&mut a1, "one"), (&mut a2, "two")] {
            let until = Instant::now() + Duration::from_secs(5);
            for n in 0.. {
                let sid = format!("cap-{tag}-{n}");
                let r = c.call("session.create", json!({"sessionId": sid})).await;
                if r.error_code() == Some(rpc::SESSION_LIMIT) {
                    break;
                }
                // Created before the counts arrived: give it back and try again.
                assert!(r.error_code().is_none(), "{}", r.text());
                c.ok("session.delete", json!({"sessionId": sid})).await;
                assert!(
                    Instant::now() < until,
                    "the cap never counted the other replica"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // One detached through replica 2: replica 1 may create again (after a sync).
        a2.ok("session.detach", json!({"sessionId": "cap-2"})).await;
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let r = a1
                .call("session.create", json!({"sessionId": "cap-after"}))
                .await;
            if r.error_code().is_none() {
                break;
            }
            assert_eq!(r.error_code(), Some(rpc::SESSION_LIMIT), "{}", r.text());
            assert!(Instant::now() < until, "the freed slot never counted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// A replica on `redis` in front of `fakes` whose tenant a deletes sessions idle for 1.5 s,
/// checked every second; last-used times are shared every 200 ms.
async fn hygiene_replica(
    redis: &RedisServer,
    fakes: &[test_support::fake_cli::FakeCli],
) -> copilot_lb::app::Running {
    let backends: String = fakes
        .iter()
        .map(|f| format!("  - {{name: {}, address: {}}}\n", f.name(), f.addr()))
        .collect();
    let yaml = format!(
        "listeners: [{{listen: 127.0.0.1:0}}]\nbackends:\n{backends}health: {{interval: 100ms, timeout: 500ms, rise: 1, fall: 2}}\nsessions: {{shared_storage: true, hygiene_interval: 1s}}\nstate: {{kind: redis, url: \"{}\", key_prefix: \"hy:\", timeout: 300ms, sync_interval: 200ms, lease_ttl: 3s}}\n{}",
        redis.url(),
        tenants_capped("    max_idle: 1500ms\n")
    );
    proxy(Config::from_yaml(&yaml, "hygiene replica").expect("config"))
        .await
        .0
}

/// Sessions `sessions.max_idle` deleted by this replica, from its metrics.
fn reaped_by(r: &copilot_lb::app::Running) -> u64 {
    r.shared
        .render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix("copilot_lb_sessions_deleted_total{reason=\"max_idle\"} "))
        .map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test]
async fn one_replica_reaps_the_fleets_idle_sessions_and_keeps_the_busy_ones() {
    within(T, async {
        let redis = RedisServer::start().expect("redis-server");
        let fakes = fakes(1, true).await;
        let fake = &fakes[0];
        // Replica A first, so it takes the hygiene lease; then B.
        let a = hygiene_replica(&redis, &fakes).await;
        let until = Instant::now() + Duration::from_secs(10);
        while !a.shared.sessions.status().hygiene_lease_held {
            assert!(Instant::now() < until, "replica A never took the lease");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let b = hygiene_replica(&redis, &fakes).await;
        let mut a1 = as_tenant(a.listen_addrs[0], "tok-a").await;
        let mut b1 = as_tenant(b.listen_addrs[0], "tok-a").await;
        // busy: created through A, then used through B only (A's own view of it goes stale).
        // both: created through A, opened through B, then left alone.
        // b-only: created through B; A never hears of it.
        a1.ok("session.create", json!({"sessionId": "hy-busy"}))
            .await;
        a1.ok("session.create", json!({"sessionId": "hy-both"}))
            .await;
        b1.ok("session.resume", json!({"sessionId": "hy-busy"}))
            .await;
        b1.ok("session.resume", json!({"sessionId": "hy-both"}))
            .await;
        b1.ok("session.create", json!({"sessionId": "hy-b-only"}))
            .await;
        assert!(a.shared.sessions.get("hy-b-only").is_none());

        // Keep hy-busy busy through B until both idle ones are gone, and a pass beyond.
        let idle_gone = || {
            let s = fake.storage();
            !s.contains("hy-both") && !s.contains("hy-b-only")
        };
        let until = Instant::now() + Duration::from_secs(15);
        let mut gone_at = None;
        loop {
            b1.ok(
                "session.send",
                json!({"sessionId": "hy-busy", "prompt": "still here"}),
            )
            .await;
            if gone_at.is_none() && idle_gone() {
                gone_at = Some(Instant::now());
            }
            if gone_at.is_some_and(|t| t.elapsed() > Duration::from_millis(2500)) {
                break;
            }
            assert!(
                Instant::now() < until,
                "idle sessions not reaped: {:?}",
                fake.storage().ids()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        assert!(
            fake.storage().contains("hy-busy"),
            "the busy session was reaped"
        );
        assert_eq!(
            fake.requests("session.delete"),
            2,
            "each idle session deleted exactly once"
        );
        assert_eq!(
            reaped_by(&a),
            2,
            "the lease holder reaps the fleet's sessions"
        );
        assert_eq!(reaped_by(&b), 0, "a replica without the lease reaped");
        assert!(!b.shared.sessions.status().hygiene_lease_held);
        // B dropped them from its cache, though its client still held one open: it is gone
        // on the CLI, so B refuses it as unknown rather than re-asserting it.
        let until = Instant::now() + Duration::from_secs(5);
        while b.shared.sessions.get("hy-both").is_some()
            || b.shared.sessions.get("hy-b-only").is_some()
        {
            assert!(
                Instant::now() < until,
                "replica B still caches reaped sessions"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = b1
            .call(
                "session.send",
                json!({"sessionId": "hy-both", "prompt": "x"}),
            )
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
        // And the busy one still works through either replica.
        a1.ok(
            "session.send",
            json!({"sessionId": "hy-busy", "prompt": "via A"}),
        )
        .await;
    })
    .await;
}

/// A replica like [`replica`], on the master `group`'s sentinel names.
async fn sentinel_replica(
    group: &SentinelGroup,
    fakes: &[test_support::fake_cli::FakeCli],
) -> (copilot_lb::app::Running, SocketAddr) {
    let backends: String = fakes
        .iter()
        .map(|f| format!("  - {{name: {}, address: {}}}\n", f.name(), f.addr()))
        .collect();
    let yaml = format!(
        "listeners: [{{listen: 127.0.0.1:0}}]\nbackends:\n{backends}health: {{interval: 100ms, timeout: 500ms, rise: 1, fall: 2}}\nsessions: {{shared_storage: true}}\nstate:\n  kind: redis\n  sentinel: {{master_name: {}, nodes: [\"{}\"]}}\n  key_prefix: \"sn:\"\n  timeout: 500ms\n  sync_interval: 200ms\n{}",
        SentinelGroup::MASTER_NAME,
        group.sentinel_addr(),
        tenants_yaml()
    );
    proxy(Config::from_yaml(&yaml, "sentinel replica").expect("config")).await
}

#[tokio::test]
async fn two_replicas_on_sentinel_ride_out_a_master_failover() {
    within(T, async {
        let group = tokio::task::spawn_blocking(|| SentinelGroup::start(None, None))
            .await
            .unwrap()
            .expect("sentinel group");
        let fakes = fakes(2, true).await;
        let (_r1, one) = sentinel_replica(&group, &fakes).await;
        let (_r2, two) = sentinel_replica(&group, &fakes).await;
        let mut a1 = as_tenant(one, "tok-a").await;
        a1.ok("session.create", json!({"sessionId": "before-1"}))
            .await;
        let mut b2 = as_tenant(two, "tok-b").await;
        let r = b2
            .call("session.resume", json!({"sessionId": "before-1"}))
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
        let new = group.replica.port();
        let mut group = tokio::task::spawn_blocking(move || {
            group.wait_replicated().expect("replicated");
            group
        })
        .await
        .unwrap();

        let t0 = Instant::now();
        group.master.kill();
        // Known to replica 1: served from its cache while there is no master.
        a1.ok(
            "session.send",
            json!({"sessionId": "before-1", "prompt": "during"}),
        )
        .await;
        // A create through replica 2: refused (retryable) until the sentinel has promoted the
        // replica, then made there.
        let mut refused = 0;
        let mut a2 = as_tenant(two, "tok-a").await;
        loop {
            let t = Instant::now();
            let r = a2
                .call("session.create", json!({"sessionId": "after-1"}))
                .await;
            match r.error_code() {
                None => break,
                Some(c) => {
                    assert_eq!(c, rpc::BACKEND_UNAVAILABLE, "{}", r.text());
                    refused += 1;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            assert!(t0.elapsed() < Duration::from_secs(30), "no master after 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "sentinel failover through copilot-lb: a create succeeded {:?} after the master was killed ({refused} refused with -32011 meanwhile)",
            t0.elapsed()
        );
        let named = tokio::task::spawn_blocking(move || {
            let p = group.master_port();
            (p, group)
        })
        .await
        .unwrap();
        assert_eq!(named.0, Some(new));
        // The record made before the failover survived it: still a's, still refused to b,
        // and usable by a through the other replica.
        let r = b2
            .call("session.resume", json!({"sessionId": "before-1"}))
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
        a2.ok("session.resume", json!({"sessionId": "before-1"}))
            .await;
        a2.ok(
            "session.send",
            json!({"sessionId": "before-1", "prompt": "after"}),
        )
        .await;
        // And the new one is a's for replica 1 too.
        let mut b1 = as_tenant(one, "tok-b").await;
        let r = b1
            .call("session.resume", json!({"sessionId": "after-1"}))
            .await;
        assert_eq!(r.error_code(), Some(rpc::SESSION_FORBIDDEN), "{}", r.text());
        drop(named);
    })
    .await;
}
