//! One test suite, run against every store: what the proxy relies on of a registry.

use super::*;
use test_support::redis::{RedisServer, SentinelGroup};

fn rec(owner: &str, backend: &str) -> Record {
    Record::new(owner, backend)
}

/// Every rule of [`Store`], on a store with nothing in it.
async fn rules<S: Store>(s: &S) {
    // Unknown ids are unknown.
    assert_eq!(s.get("s1").await.unwrap(), None);

    // Create is insert-if-absent: the second create, by anyone, finds the first.
    let a = rec("team-a", "b1");
    assert_eq!(s.create("s1", &a).await.unwrap(), Created::Inserted);
    assert_eq!(s.get("s1").await.unwrap(), Some(a.clone()));
    match s.create("s1", &rec("team-b", "b2")).await.unwrap() {
        Created::Exists(r) => assert_eq!(r, a),
        other => panic!("{other:?}"),
    }

    // A move names the epoch it saw: exactly one of two movers wins, the other follows.
    let won = s.move_to("s1", 1, "b2").await.unwrap();
    let Moved::Done(r) = won else {
        panic!("{won:?}")
    };
    assert_eq!(
        (r.backend.as_str(), r.epoch, r.owner.as_str()),
        ("b2", 2, "team-a")
    );
    match s.move_to("s1", 1, "b3").await.unwrap() {
        Moved::Stale(Some(r)) => assert_eq!((r.backend.as_str(), r.epoch), ("b2", 2)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.move_to("nope", 1, "b3").await.unwrap(),
        Moved::Stale(None)
    );

    // Sync: last-used only goes up; a missing record is re-asserted; a differing one is
    // reported as the store has it.
    let mut mine = s.get("s1").await.unwrap().unwrap();
    mine.last_used_ms += 5_000;
    let mut stale = mine.clone();
    stale.backend = "b1".into();
    stale.epoch = 1;
    let lost = rec("team-c", "b3");
    let differs = s
        .sync(&[("s1".into(), stale), ("s9".into(), lost.clone())])
        .await
        .unwrap();
    assert_eq!(differs.len(), 1, "{differs:?}");
    assert_eq!(differs[0].0, "s1");
    assert_eq!(
        (differs[0].1.backend.as_str(), differs[0].1.epoch),
        ("b2", 2)
    );
    assert_eq!(differs[0].1.last_used_ms, mine.last_used_ms);
    assert_eq!(s.get("s9").await.unwrap(), Some(lost));
    let mut older = mine.clone();
    older.last_used_ms -= 10_000;
    assert!(s.sync(&[("s1".into(), older)]).await.unwrap().is_empty());
    assert_eq!(
        s.get("s1").await.unwrap().unwrap().last_used_ms,
        mine.last_used_ms
    );

    // Delete: compare-and-set when an epoch is named, unconditional otherwise.
    assert!(!s.remove("s1", Some(1)).await.unwrap());
    assert!(s.get("s1").await.unwrap().is_some());
    assert!(s.remove("s1", Some(2)).await.unwrap());
    assert_eq!(s.get("s1").await.unwrap(), None);
    assert!(s.remove("s9", None).await.unwrap());
    assert!(!s.remove("s9", None).await.unwrap());

    // Undo of a create: only the exact record it wrote.
    let mine = rec("u", "b1");
    assert_eq!(s.create("u1", &mine).await.unwrap(), Created::Inserted);
    let mut other = mine.clone();
    other.created_ms += 1;
    assert!(!s.undo_create("u1", &other).await.unwrap());
    assert!(s.undo_create("u1", &mine).await.unwrap());
    assert_eq!(s.get("u1").await.unwrap(), None);
    assert!(!s.undo_create("u1", &mine).await.unwrap());

    // The reaper's delete: only the record exactly as it was read. Once its last-used time
    // moved on (a replica synced a use), or it was moved, the delete is refused.
    let seen = rec("h", "b1");
    assert_eq!(s.create("h1", &seen).await.unwrap(), Created::Inserted);
    let mut used = seen.clone();
    used.last_used_ms += 1_000;
    assert!(s
        .sync(&[("h1".into(), used.clone())])
        .await
        .unwrap()
        .is_empty());
    assert!(!s.remove_exact("h1", &seen).await.unwrap());
    assert_eq!(s.get("h1").await.unwrap(), Some(used.clone()));
    let Moved::Done(moved) = s.move_to("h1", 1, "b2").await.unwrap() else {
        panic!("move refused")
    };
    assert!(!s.remove_exact("h1", &used).await.unwrap());
    assert!(s.remove_exact("h1", &moved).await.unwrap());
    assert_eq!(s.get("h1").await.unwrap(), None);
    assert!(!s.remove_exact("h1", &moved).await.unwrap());
    // Put back as it was (the CLI could not delete it): exactly the record, again reapable.
    assert_eq!(s.create("h1", &moved).await.unwrap(), Created::Inserted);
    assert_eq!(s.get("h1").await.unwrap(), Some(moved.clone()));
    assert!(s.remove_exact("h1", &moved).await.unwrap());

    // Ids are opaque: anything a client may send is its own key, never a pattern.
    for id in ["a:b", "s*", "x y", "ünï", "{tag}"] {
        assert_eq!(
            s.create(id, &rec("t", "b1")).await.unwrap(),
            Created::Inserted
        );
    }
    assert_eq!(s.get("s").await.unwrap(), None);
    assert!(s.get("s*").await.unwrap().is_some());

    // Concurrent creates of one id: one insert, every other caller sees that record.
    let racers = (0..16).map(|i| {
        let r = rec(&format!("t{i}"), "b1");
        async move { s.create("race", &r).await.unwrap() }
    });
    let outcomes = futures_util::future::join_all(racers).await;
    let inserted = outcomes.iter().filter(|o| **o == Created::Inserted).count();
    assert_eq!(inserted, 1, "{outcomes:?}");
    let winner = s.get("race").await.unwrap().unwrap();
    for o in outcomes {
        if let Created::Exists(r) = o {
            assert_eq!(r, winner);
        }
    }
}

/// The reaper's walk: every record, in bounded pages, whoever wrote it.
async fn walk<S: Store>(s: &S) {
    let ids: std::collections::BTreeSet<String> = (0..600).map(|i| format!("w-{i}")).collect();
    for id in &ids {
        assert_eq!(
            s.create(id, &rec("w", "b1")).await.unwrap(),
            Created::Inserted
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut from: Option<String> = None;
    for pages in 1.. {
        let page = s.scan(from.as_deref(), 100).await.unwrap();
        // Redis's COUNT is a hint: a page may hold a few more, never the whole set at once.
        assert!(
            page.records.len() <= 300,
            "{} in one page",
            page.records.len()
        );
        for (id, r) in page.records {
            assert_eq!(r.owner, "w");
            seen.insert(id);
        }
        match page.next {
            Some(n) => from = Some(n),
            None => break,
        }
        assert!(pages < 1_000, "the walk never ended");
    }
    assert_eq!(seen, ids);
}

/// The hygiene lease on a store several replicas share: one holder at a time, renewed by
/// its holder only, lost after its TTL without renewal, handed over on release.
async fn lease_is_exclusive<S: Store>(s: &S) {
    let ttl = Duration::from_millis(400);
    assert_eq!(s.lease("r1", ttl).await.unwrap().as_deref(), Some("r1"));
    assert_eq!(s.lease("r2", ttl).await.unwrap().as_deref(), Some("r1"));
    // Renewed by r1 for longer than one TTL: r2 never gets it.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(s.lease("r1", ttl).await.unwrap().as_deref(), Some("r1"));
        assert_eq!(s.lease("r2", ttl).await.unwrap().as_deref(), Some("r1"));
    }
    // r1 stalls (stops renewing): after the TTL r2 takes it, and r1 cannot renew r2's.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.lease("r2", ttl).await.unwrap().as_deref(), Some("r2"));
    assert_eq!(s.lease("r1", ttl).await.unwrap().as_deref(), Some("r2"));
    // A release by a non-holder changes nothing; the holder's hands it over at once.
    s.release("r1").await.unwrap();
    assert_eq!(s.lease("r1", ttl).await.unwrap().as_deref(), Some("r2"));
    s.release("r2").await.unwrap();
    assert_eq!(s.lease("r1", ttl).await.unwrap().as_deref(), Some("r1"));
}

#[tokio::test]
async fn embedded_store_walks_every_record_and_always_holds_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let s = Embedded::open(&dir.path().join("state.redb")).unwrap();
    walk(&s).await;
    // One process has the file (a second opener is refused): it is the only reaper.
    let ttl = Duration::from_millis(100);
    assert_eq!(s.lease("r1", ttl).await.unwrap().as_deref(), Some("r1"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(s.lease("r1", ttl).await.unwrap().as_deref(), Some("r1"));
}

#[tokio::test]
async fn redis_store_walks_every_record_and_leases_one_holder_at_a_time() {
    let server = RedisServer::start().expect("redis-server");
    // A prefix with glob characters: the walk matches it literally.
    let s = RedisStore::new(&redis_config(&server.url(), "w*[1]:")).unwrap();
    let other = RedisStore::new(&redis_config(&server.url(), "w-other:")).unwrap();
    assert_eq!(
        other.create("x", &rec("o", "b1")).await.unwrap(),
        Created::Inserted
    );
    walk(&s).await;
    lease_is_exclusive(&s).await;
    // Another fleet's lease (another prefix) is its own.
    assert_eq!(
        other
            .lease("r9", Duration::from_secs(1))
            .await
            .unwrap()
            .as_deref(),
        Some("r9")
    );
}

#[tokio::test]
async fn a_registry_reports_its_hygiene_lease_and_gives_it_up_on_shutdown() {
    let server = RedisServer::start().expect("redis-server");
    let open = || {
        let mut r = Registry::with(
            Kind::Redis(std::sync::Arc::new(
                RedisStore::new(&redis_config(&server.url(), "hl:")).unwrap(),
            )),
            Duration::from_millis(300),
            Duration::from_millis(200),
        );
        r.lease_ttl = Duration::from_secs(30);
        r
    };
    let (r1, r2) = (open(), open());
    assert!(r1.hygiene_lease().await);
    assert!(!r2.hygiene_lease().await);
    let (s1, s2) = (r1.status(), r2.status());
    assert!(s1.hygiene_lease_held && !s2.hygiene_lease_held);
    assert_eq!(
        s2.hygiene_lease_holder.as_deref(),
        Some(s1.replica.as_str())
    );
    assert_eq!(r1.idle_grace(), Duration::from_millis(200));
    // Shut down: handed over at once (not after the 30 s TTL), and never taken again.
    r1.release_lease(true).await;
    assert!(r2.hygiene_lease().await);
    r2.release_lease(false).await;
    assert!(!r1.hygiene_lease().await);
    assert!(!r1.status().hygiene_lease_held);
    // Redis stalled: the holder stops counting itself the holder (it may have lapsed).
    assert!(r2.hygiene_lease().await);
    server.pause();
    assert!(!r2.hygiene_lease().await);
    server.resume();
}

#[tokio::test]
async fn embedded_store_keeps_every_rule() {
    let dir = tempfile::tempdir().unwrap();
    let s = Embedded::open(&dir.path().join("state.redb")).unwrap();
    rules(&s).await;
}

#[tokio::test]
async fn embedded_store_survives_a_reopen_and_refuses_a_second_opener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/state.redb");
    {
        let s = Embedded::open(&path).unwrap();
        assert_eq!(
            s.create("s1", &rec("a", "b1")).await.unwrap(),
            Created::Inserted
        );
        let e = Embedded::open(&path)
            .err()
            .expect("a second opener is refused");
        assert!(e.to_string().contains("already open"), "{e}");
    }
    let s = Embedded::open(&path).unwrap();
    assert_eq!(s.get("s1").await.unwrap().unwrap().owner, "a");
    assert_eq!(s.list_now().unwrap().len(), 1);
}

fn redis_config(url: &str, prefix: &str) -> StateConfig {
    StateConfig {
        kind: StateKind::Redis,
        url: Some(url.to_string()),
        key_prefix: Some(prefix.to_string()),
        timeout: Some(crate::config::Millis(Duration::from_millis(300))),
        ..Default::default()
    }
}

#[tokio::test]
async fn redis_store_keeps_every_rule() {
    let server = RedisServer::start().expect("redis-server");
    let s = RedisStore::new(&redis_config(&server.url(), "t1:")).unwrap();
    rules(&s).await;
    // Key prefixes keep two fleets on one Redis apart.
    let other = RedisStore::new(&redis_config(&server.url(), "t2:")).unwrap();
    assert_eq!(other.get("race").await.unwrap(), None);
}

#[tokio::test]
async fn a_registry_fails_closed_while_redis_is_stalled_and_recovers() {
    let server = RedisServer::start().expect("redis-server");
    let pool = Pool::default();
    let reg = Registry::with(
        Kind::Redis(std::sync::Arc::new(
            RedisStore::new(&redis_config(&server.url(), "r:")).unwrap(),
        )),
        Duration::from_millis(300),
        Duration::from_secs(5),
    );
    assert_eq!(
        reg.claim("known", "a", "b1", &pool).await.unwrap(),
        Claim::New
    );
    server.pause();
    // Known here: answered from the cache, the store is not asked.
    let t = Instant::now();
    assert_eq!(reg.owner("known", "a", &pool).await.unwrap(), Some(true));
    assert!(t.elapsed() < Duration::from_millis(100));
    // Unknown: an error within the timeout, never "nobody's, so yours".
    let t = Instant::now();
    assert!(reg.owner("unknown", "b", &pool).await.is_err());
    assert!(reg.claim("fresh", "b", "b1", &pool).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(!reg.status().up);
    server.resume();
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        match reg.owner("unknown", "b", &pool).await {
            Ok(v) => {
                assert_eq!(v, None);
                break;
            }
            Err(e) => assert!(Instant::now() < until, "not recovered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reg.status().up);
}

#[tokio::test]
async fn two_registries_on_one_redis_agree_on_owners_and_moves() {
    let server = RedisServer::start().expect("redis-server");
    let pool = Pool::default();
    let open = || {
        Registry::with(
            Kind::Redis(std::sync::Arc::new(
                RedisStore::new(&redis_config(&server.url(), "f:")).unwrap(),
            )),
            Duration::from_millis(500),
            Duration::from_secs(5),
        )
    };
    let (r1, r2) = (open(), open());
    assert_eq!(r1.claim("s", "a", "b1", &pool).await.unwrap(), Claim::New);
    // The other replica never saw it, and still knows whose it is.
    assert_eq!(r2.owner("s", "b", &pool).await.unwrap(), Some(false));
    assert_eq!(
        r2.claim("s", "b", "b2", &pool).await.unwrap(),
        Claim::Foreign
    );
    assert_eq!(r2.lookup("s", &pool).await.unwrap().unwrap().backend, "b1");
    // Both lose b1 at once: one move wins, the other follows it.
    let (m1, m2) = tokio::join!(
        r1.reassign("s", "b1", "b2", &pool),
        r2.reassign("s", "b1", "b3", &pool)
    );
    let (m1, m2) = (m1.unwrap().unwrap(), m2.unwrap().unwrap());
    assert_eq!(m1, m2, "two replicas chose different homes");
    // Deleted through one, unknown to the store for the other.
    r1.remove("s", &pool).await.unwrap();
    assert!(r2.refresh("s", &pool).await.unwrap().is_none());
}

#[tokio::test]
async fn a_restarted_empty_redis_is_refilled_by_the_replicas_that_hold_sessions() {
    let mut server = RedisServer::start().expect("redis-server");
    let pool = Pool::default();
    let store = RedisStore::new(&redis_config(&server.url(), "e:")).unwrap();
    let reg = Registry::with(
        Kind::Redis(std::sync::Arc::new(store)),
        Duration::from_millis(300),
        Duration::from_millis(100),
    );
    assert_eq!(
        reg.claim("held", "a", "b1", &pool).await.unwrap(),
        Claim::New
    );
    reg.table.join("held", &pool);
    server.restart_empty().unwrap();
    let stop = CancellationToken::new();
    let check = RedisStore::new(&redis_config(&server.url(), "e:")).unwrap();
    let sync = reg.sync_loop(&pool, stop.clone());
    let wait = async {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(r)) = check.get("held").await {
                break r;
            }
            assert!(Instant::now() < until, "never re-asserted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let r = tokio::select! {
        r = wait => r,
        _ = sync => unreachable!("sync loop ended"),
    };
    stop.cancel();
    assert_eq!((r.owner.as_str(), r.backend.as_str()), ("a", "b1"));
}

#[tokio::test]
async fn replicas_see_each_others_live_counts_until_one_stops_publishing() {
    let server = RedisServer::start().expect("redis-server");
    let s = RedisStore::new(&redis_config(&server.url(), "l:")).unwrap();
    let mut mine = LiveCounts::default();
    mine.tenants.insert("a".into(), 2);
    mine.backends.insert("b1".into(), 2);
    let ttl = Duration::from_millis(400);
    assert_eq!(
        s.share_live("r1", &mine, ttl).await.unwrap(),
        LiveCounts::default()
    );
    let mut two = LiveCounts::default();
    two.tenants.insert("a".into(), 1);
    two.backends.insert("b2".into(), 1);
    let seen_by_2 = s.share_live("r2", &two, ttl).await.unwrap();
    assert_eq!(seen_by_2, mine);
    let seen_by_3 = s
        .share_live("r3", &LiveCounts::default(), ttl)
        .await
        .unwrap();
    assert_eq!(seen_by_3.tenants.get("a"), Some(&3));
    assert_eq!(seen_by_3.backends.get("b2"), Some(&1));
    // r1 and r2 stop publishing (died): their counts expire with them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = s
        .share_live("r3", &LiveCounts::default(), ttl)
        .await
        .unwrap();
    assert_eq!(later, LiveCounts::default());
}

#[tokio::test]
async fn a_create_answered_too_late_is_undone() {
    let server = RedisServer::start().expect("redis-server");
    let pool = Pool::default();
    let reg = Registry::with(
        Kind::Redis(std::sync::Arc::new(
            RedisStore::new(&redis_config(&server.url(), "u:")).unwrap(),
        )),
        Duration::from_millis(300),
        Duration::from_secs(5),
    );
    // Connected, scripts loaded: the next create is sent, then stalls.
    assert_eq!(
        reg.claim("warm", "a", "b1", &pool).await.unwrap(),
        Claim::New
    );
    server.pause();
    assert!(reg.claim("late", "a", "b1", &pool).await.is_err());
    server.resume();
    let check = RedisStore::new(&redis_config(&server.url(), "u:")).unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if check.get("late").await.unwrap().is_none() {
            break;
        }
        assert!(Instant::now() < until, "the late create stayed recorded");
    }
    // Another tenant may now create that id.
    assert_eq!(
        reg.claim("late", "b", "b1", &pool).await.unwrap(),
        Claim::New
    );
}

/// `state` for the group's sentinel; passwords (data nodes', sentinel's) from files in `dir`.
fn sentinel_config(
    g: &SentinelGroup,
    prefix: &str,
    dir: &std::path::Path,
    password: Option<&str>,
    sentinel_password: Option<&str>,
) -> StateConfig {
    let file = |name: &str, pw: Option<&str>| {
        pw.map(|pw| {
            let path = dir.join(name);
            std::fs::write(&path, format!("{pw}\n")).unwrap();
            path
        })
    };
    StateConfig {
        kind: StateKind::Redis,
        sentinel: Some(serde_saphyr::Spanned {
            value: crate::config::SentinelConfig {
                master_name: SentinelGroup::MASTER_NAME.into(),
                nodes: vec![g.sentinel_addr()],
                password_env: None,
                password_file: file("sentinel-password", sentinel_password),
            },
            referenced: serde_saphyr::Location::UNKNOWN,
            defined: serde_saphyr::Location::UNKNOWN,
        }),
        password_file: file("password", password),
        key_prefix: Some(prefix.to_string()),
        timeout: Some(crate::config::Millis(Duration::from_millis(500))),
        ..Default::default()
    }
}

#[tokio::test]
async fn redis_store_keeps_every_rule_through_sentinel_with_passwords() {
    let (pw, spw) = ("data-secret-1", "sentinel-secret-2");
    let g = tokio::task::spawn_blocking(move || SentinelGroup::start(Some(pw), Some(spw)))
        .await
        .unwrap()
        .expect("sentinel group");
    let dir = tempfile::tempdir().unwrap();
    let s = RedisStore::new(&sentinel_config(&g, "st:", dir.path(), Some(pw), Some(spw))).unwrap();
    rules(&s).await;
    let w = RedisStore::new(&sentinel_config(&g, "sw:", dir.path(), Some(pw), Some(spw))).unwrap();
    walk(&w).await;
    lease_is_exclusive(&w).await;
    // Each password is used where it belongs: without the data nodes' one, or with the
    // sentinel's wrong, nothing is answered (and no error names a secret).
    for (p, sp) in [
        (None, Some(spw)),
        (Some(pw), Some("wrong")),
        (Some(pw), None),
    ] {
        let d = tempfile::tempdir().unwrap();
        let bad = RedisStore::new(&sentinel_config(&g, "st:", d.path(), p, sp)).unwrap();
        let e = bad
            .get("s1")
            .await
            .expect_err("answered without the right passwords");
        let text = format!("{e} {e:?}");
        assert!(!text.contains(pw) && !text.contains(spw), "{text}");
    }
}

#[tokio::test]
async fn the_store_follows_a_sentinel_failover() {
    failover_through_sentinel(false).await
}

/// A stalled master keeps its connections open and silent: the store's operations time out,
/// and the subscriber (whose stream never ends) moves when the data connection does.
#[tokio::test]
async fn the_store_follows_a_sentinel_failover_off_a_stalled_master() {
    failover_through_sentinel(true).await
}

/// Records made, the master SIGKILLed (or SIGSTOPped when `stall`), the replica promoted:
/// the store answers there with the replicated records, and another replica's subscriber
/// hears announcements there.
async fn failover_through_sentinel(stall: bool) {
    let what = if stall { "stalled" } else { "killed" };
    let g = tokio::task::spawn_blocking(|| SentinelGroup::start(None, None))
        .await
        .unwrap()
        .expect("sentinel group");
    let dir = tempfile::tempdir().unwrap();
    let cfg = sentinel_config(&g, "fo:", dir.path(), None, None);
    let store = std::sync::Arc::new(RedisStore::new(&cfg).unwrap());
    let pool = Pool::default();
    let open = || {
        Registry::with(
            Kind::Redis(std::sync::Arc::new(RedisStore::new(&cfg).unwrap())),
            Duration::from_millis(500),
            Duration::from_secs(5),
        )
    };
    let (r1, mut r2) = (open(), open());
    // r2's periodic store traffic (as a running proxy's): what moves its data connection.
    r2.sync_every = Duration::from_millis(200);
    let r2 = r2;
    let stop = CancellationToken::new();
    let follow = async {
        tokio::join!(
            r2.follow(&pool, stop.clone()),
            r2.sync_loop(&pool, stop.clone())
        )
    };
    let body = async {
        for i in 0..20 {
            let r = rec(&format!("t{i}"), "b1");
            assert_eq!(
                store.create(&format!("pre{i}"), &r).await.unwrap(),
                Created::Inserted
            );
        }
        assert_eq!(r1.claim("s", "a", "b1", &pool).await.unwrap(), Claim::New);
        assert_eq!(r2.lookup("s", &pool).await.unwrap().unwrap().backend, "b1");
        let (old, new) = (g.master.port(), g.replica.port());
        assert_eq!(g.master_port(), Some(old));
        let g = tokio::task::spawn_blocking(move || {
            g.wait_replicated().expect("replicated");
            g
        })
        .await
        .unwrap();
        let mut g = g;

        // The master dies; until the sentinel promotes the replica every operation fails
        // (closed), each within the timeout; then the store answers on the new master.
        let t0 = Instant::now();
        if stall {
            g.master.pause();
        } else {
            g.master.kill();
        }
        let until = t0 + Duration::from_secs(30);
        let mut failures = 0;
        loop {
            let t = Instant::now();
            match tokio::time::timeout(
                Duration::from_secs(2),
                store.create("post", &rec("z", "b2")),
            )
            .await
            {
                Ok(Ok(c)) => {
                    assert_eq!(c, Created::Inserted);
                    break;
                }
                Ok(Err(_)) => failures += 1,
                Err(_) => panic!("an operation outlived its bound during the failover"),
            }
            assert!(
                t.elapsed() < Duration::from_millis(1500),
                "one attempt took {:?}",
                t.elapsed()
            );
            assert!(
                Instant::now() < until,
                "no answer 30 s after the master died"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = t0.elapsed();
        println!("sentinel failover: the store answered again {took:?} after the master was {what} ({failures} operations failed closed meanwhile)");
        assert!(failures > 0, "the store never noticed the master was gone");
        assert_eq!(
            g.master_port(),
            Some(new),
            "the sentinel named another master"
        );
        assert_eq!(store.get("post").await.unwrap().unwrap().owner, "z");
        for i in 0..20 {
            let r = store.get(&format!("pre{i}")).await.unwrap();
            assert_eq!(r.map(|r| r.owner), Some(format!("t{i}")), "pre{i} lost");
        }

        // The other replica's subscriber moved to the new master: it hears the next move.
        let until = Instant::now() + Duration::from_secs(10);
        let moved = loop {
            match r1.reassign("s", "b1", "b2", &pool).await {
                Ok(Some(b)) => break b,
                r => assert!(Instant::now() < until, "r1 never moved the session: {r:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(moved, "b2");
        let master = redis::Client::open(format!("redis://127.0.0.1:{new}/")).unwrap();
        let mut c = master.get_multiplexed_async_connection().await.unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, n): (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("fo:events")
                .query_async(&mut c)
                .await
                .unwrap();
            if n >= 1 {
                break;
            }
            assert!(
                Instant::now() < until,
                "nobody subscribed on the new master"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Cached (from the store, or learned from the first announcement) as b2.
        let until = Instant::now() + Duration::from_secs(5);
        while r2.lookup("s", &pool).await.unwrap().unwrap().backend != "b2" {
            assert!(Instant::now() < until, "r2 never saw the first move");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            r1.reassign("s", "b2", "b3", &pool)
                .await
                .unwrap()
                .as_deref(),
            Some("b3")
        );
        // r2 answers from its cache: only the announcement can change what it says.
        let until = Instant::now() + Duration::from_secs(5);
        while r2.lookup("s", &pool).await.unwrap().unwrap().backend != "b3" {
            assert!(
                Instant::now() < until,
                "r2 never heard the move on the new master"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        g
    };
    tokio::select! {
        g = body => drop(g),
        _ = follow => unreachable!("the subscriber stopped"),
    }
    stop.cancel();
}
