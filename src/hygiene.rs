//! Session hygiene: the backend-services guide tells services to list sessions periodically and
//! delete old ones, because the CLI keeps every session on local disk. copilot-lb can do it per
//! tenant (`max_session_age`, `max_idle`; off by default), and the admin API deletes on demand.
//!
//! One reaper for the whole fleet: the replica holding the hygiene lease (Redis; the embedded
//! and memory stores are one process's, which always holds it) walks every record in the
//! store, not only the sessions it has cached. Idle time counts from the record's shared
//! last-used time (written by every replica's sync loop) or this replica's own, whichever is
//! later. A delete is a compare-and-set on the record as the reaper read it, so a session
//! used or moved meanwhile through any replica is kept; only then is the CLI asked to delete
//! it, and if the CLI cannot, the record is put back exactly as it was.

use crate::auth::Tenant;
use crate::backend::{Backend, CallError, State};
use crate::context::Shared;
use crate::registry::{now_ms, Record, StoreError};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Bound on one `session.delete` sent by the proxy itself.
const DELETE_TIMEOUT: Duration = Duration::from_secs(10);

/// One request on a fresh connection of the proxy's own (not a client's link).
pub(crate) async fn call_once(
    b: &Backend,
    method: &str,
    params: &Value,
    timeout: Duration,
) -> Result<Value, CallError> {
    let run = async {
        let (mut reader, mut w) = b.open().await?;
        crate::backend::request(&mut reader, &mut w, 1, method, params).await
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| CallError::Timeout {
            what: "the request",
            after: timeout,
        })?
}

/// Why the proxy could not delete a session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeleteError {
    /// The session's backend was removed from the config.
    #[error("backend {0} is no longer configured")]
    Unconfigured(String),
    /// The backend could not be asked.
    #[error("backend {backend}: {source}")]
    Call {
        /// Backend name.
        backend: String,
        /// Cause.
        source: CallError,
    },
    /// The backend answered with an error.
    #[error("backend {backend} refused: {error}")]
    Refused {
        /// Backend name.
        backend: String,
        /// Its error, as JSON.
        error: String,
    },
    /// The session registry could not say where the session lives.
    #[error("session registry: {0}")]
    Registry(#[from] StoreError),
}

/// Asks `b` to delete `sid`. A result of any kind counts as deleted: the CLI answers
/// `success: false` only when it has no such session file, which is the state wanted.
async fn delete_on_backend(b: &Backend, sid: &str) -> Result<(), DeleteError> {
    let v = call_once(
        b,
        "session.delete",
        &json!({ "sessionId": sid }),
        DELETE_TIMEOUT,
    )
    .await
    .map_err(|source| DeleteError::Call {
        backend: b.name.clone(),
        source,
    })?;
    if let Some(err) = v.get("error") {
        return Err(DeleteError::Refused {
            backend: b.name.clone(),
            error: err.to_string(),
        });
    }
    Ok(())
}

/// Deletes a session on its backend and forgets it everywhere (admin API). `Ok(false)` if
/// the registry has no record of it.
pub(crate) async fn delete_session(shared: &Shared, sid: &str) -> Result<bool, DeleteError> {
    let Some(p) = shared.sessions.lookup(sid, &shared.pool).await? else {
        return Ok(false);
    };
    let b = shared
        .pool
        .get(&p.backend)
        .ok_or_else(|| DeleteError::Unconfigured(p.backend.clone()))?;
    delete_on_backend(&b, sid).await?;
    if let Err(e) = shared.sessions.remove_gone(sid, &shared.pool).await {
        warn!(session = %sid, error = %e, "deleted on its backend but still in the session registry");
    }
    shared.metrics.session_deleted("admin");
    info!(session = %sid, backend = %b.name, owner = %p.owner, reason = "admin", "session deleted by copilot-lb");
    Ok(true)
}

/// Which limit a session is past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Age,
    Idle,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Age => "max_session_age",
            Reason::Idle => "max_idle",
        }
    }
}

/// Whether a session is due, from its record and (when this replica has it cached) its
/// local last use, at `now_ms`. `grace` is how stale a record's last-used time may be
/// (other replicas write theirs once per sync interval), so a session used within
/// `max_idle` through any replica is never judged idle.
pub(crate) fn verdict(
    rec: &Record,
    max_age: Option<Duration>,
    max_idle: Option<Duration>,
    local_used_ms: Option<u64>,
    now_ms: u64,
    grace: Duration,
) -> Option<Reason> {
    let ms = |d: Duration| d.as_millis() as u64;
    if max_age.is_some_and(|age| now_ms.saturating_sub(rec.created_ms) > ms(age)) {
        return Some(Reason::Age);
    }
    let used = rec.last_used_ms.max(local_used_ms.unwrap_or(0));
    if max_idle.is_some_and(|idle| now_ms.saturating_sub(used) > ms(idle) + ms(grace)) {
        return Some(Reason::Idle);
    }
    None
}

fn has_limits(tenants: &[Arc<Tenant>]) -> bool {
    tenants
        .iter()
        .any(|t| t.max_session_age.is_some() || t.max_idle.is_some())
}

/// Every `sessions.hygiene_interval`, if any tenant has a limit and this replica holds the
/// hygiene lease, deletes the fleet's sessions past their tenant's age or idle limit. With
/// no limits it asks nothing of the store (an idle proxy costs nothing).
pub(crate) async fn reap(shared: Arc<Shared>) {
    loop {
        let every = shared.config().sessions.hygiene_interval();
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shared.shutdown.cancelled() => {
                shared.sessions.release_lease(true).await;
                return;
            }
        }
        let tenants = shared.auth().tenants();
        if !has_limits(&tenants) {
            shared.sessions.release_lease(false).await;
            continue;
        }
        if shared.sessions.hygiene_lease().await {
            reap_pass(&shared, &tenants).await;
        }
    }
}

/// One walk over every record, page by page; renews the lease on the way and stops if it
/// was lost (another replica reaps from then on).
async fn reap_pass(shared: &Shared, tenants: &[Arc<Tenant>]) {
    let grace = shared.sessions.idle_grace();
    let renew_every = shared.sessions.lease_ttl() / 3;
    let mut renewed = Instant::now();
    let mut from: Option<String> = None;
    loop {
        let page = match shared.sessions.scan_page(from.as_deref()).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "session hygiene: registry walk failed; retrying next interval");
                return;
            }
        };
        for (id, rec) in page.records {
            if shared.shutdown.is_cancelled() {
                return;
            }
            if renewed.elapsed() > renew_every {
                if !shared.sessions.hygiene_lease().await {
                    return;
                }
                renewed = Instant::now();
            }
            let Some(t) = tenants.iter().find(|t| t.name == rec.owner) else {
                continue;
            };
            let local = shared.sessions.get(&id).map(|p| p.last_seen);
            let now = now_ms();
            let local_ms = local.map(|seen| now.saturating_sub(seen.elapsed().as_millis() as u64));
            let Some(reason) = verdict(&rec, t.max_session_age, t.max_idle, local_ms, now, grace)
            else {
                continue;
            };
            reap_one(shared, &id, &rec, local, reason).await;
        }
        match page.next {
            Some(next) => from = Some(next),
            None => return,
        }
    }
}

/// Deletes one due session: the record by compare-and-set, then the session on its CLI.
async fn reap_one(shared: &Shared, id: &str, rec: &Record, local: Option<Instant>, reason: Reason) {
    let Some(b) = shared.pool.get(&rec.backend) else {
        debug!(session = %id, backend = %rec.backend, "session hygiene: backend not configured; left alone");
        return;
    };
    // Its CLI cannot delete it now: tried again once the backend is back, rather than taking
    // and restoring the record every interval.
    if b.state() == State::Down {
        return;
    }
    // Used through this replica since it was judged: kept.
    if shared.sessions.get(id).map(|p| p.last_seen) != local {
        return;
    }
    match shared.sessions.take_if_unchanged(id, rec).await {
        Ok(true) => {}
        Ok(false) => {
            debug!(session = %id, "session hygiene: used, moved or deleted meanwhile; kept");
            return;
        }
        Err(e) => {
            warn!(session = %id, error = %e, "session hygiene: registry did not answer; will retry");
            return;
        }
    }
    match delete_on_backend(&b, id).await {
        Ok(()) => {
            shared.sessions.forget_gone(id, &shared.pool).await;
            shared.metrics.session_deleted(reason.as_str());
            info!(session = %id, backend = %b.name, owner = %rec.owner, reason = reason.as_str(), "session deleted by copilot-lb");
        }
        Err(e) => {
            // The record went first (that is the compare-and-set); the session is still on
            // its CLI, so its record comes back exactly as it was, and the next pass tries
            // again.
            match shared.sessions.restore(id, rec).await {
                Ok(true) => {
                    warn!(session = %id, error = %e, reason = reason.as_str(), "session cleanup failed on its backend; record restored, will retry")
                }
                Ok(false) => {
                    warn!(session = %id, error = %e, "session cleanup failed on its backend; the id was recorded again meanwhile and is left as it is")
                }
                Err(re) => {
                    warn!(session = %id, error = %e, restore_error = %re, "session cleanup failed on its backend and its record could not be restored: the session is refused as unknown until a replica holding it re-asserts it")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Store;

    /// The CLI cannot delete a due session (nothing listens at its address): the record the
    /// reaper took comes back exactly as it was, and the next pass, with the CLI back, deletes
    /// it once.
    #[tokio::test]
    async fn a_session_its_cli_cannot_delete_gets_its_record_back_exactly() {
        let redis = test_support::redis::RedisServer::start().expect("redis-server");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let yaml = format!(
            "listeners: [{{listen: \"127.0.0.1:0\"}}]\nbackends: [{{name: cli, address: \"{addr}\"}}]\nstate: {{kind: redis, url: \"{}\", key_prefix: \"rr:\"}}\ntenants:\n  - name: a\n    token_hashes: [\"{}\"]\n    max_session_age: 1ms\n",
            redis.url(),
            crate::auth::hash_token("t")
        );
        let cfg = crate::config::Config::from_yaml(&yaml, "t").unwrap();
        let check = crate::registry::RedisStore::new(&cfg.state).unwrap();
        let shared = Shared::new(cfg, None).unwrap();
        let claimed = shared.sessions.claim("old", "a", "cli", &shared.pool).await;
        assert_eq!(claimed.unwrap(), crate::affinity::Claim::New);
        let before = check.get("old").await.unwrap().expect("recorded");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let tenants = shared.auth().tenants();
        let deleted = |shared: &Shared| {
            shared
                .metrics
                .render([], crate::metrics::RegistryGauges::default())
                .contains("sessions_deleted_total{reason=\"max_session_age\"} 1")
        };

        reap_pass(&shared, &tenants).await;
        assert_eq!(check.get("old").await.unwrap(), Some(before.clone()));
        assert!(
            shared.sessions.get("old").is_some(),
            "dropped from the cache"
        );
        assert!(!deleted(&shared));

        let fake = test_support::fake_cli::FakeCli::start(test_support::fake_cli::FakeConfig {
            name: "cli".into(),
            addr: Some(addr),
            ..Default::default()
        })
        .await
        .expect("fake CLI");
        reap_pass(&shared, &tenants).await;
        assert_eq!(fake.requests("session.delete"), 1);
        assert_eq!(check.get("old").await.unwrap(), None);
        assert!(shared.sessions.get("old").is_none());
        assert!(deleted(&shared));
        reap_pass(&shared, &tenants).await;
        assert_eq!(fake.requests("session.delete"), 1, "deleted twice");
    }

    fn rec(created_ms: u64, last_used_ms: u64) -> Record {
        Record {
            owner: "a".into(),
            backend: "b1".into(),
            epoch: 1,
            created_ms,
            last_used_ms,
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn idle_counts_from_the_later_of_the_shared_and_the_local_last_use() {
        let idle = Some(10 * S);
        // Shared last use 11 s ago: idle.
        assert_eq!(
            verdict(&rec(0, 1_000), None, idle, None, 12_000, Duration::ZERO),
            Some(Reason::Idle)
        );
        // Used here 1 s ago, though the record is stale: kept.
        assert_eq!(
            verdict(
                &rec(0, 1_000),
                None,
                idle,
                Some(11_000),
                12_000,
                Duration::ZERO
            ),
            None
        );
        // Used through another replica (the record moved on): kept, whatever this replica saw.
        assert_eq!(
            verdict(
                &rec(0, 11_000),
                None,
                idle,
                Some(1_000),
                12_000,
                Duration::ZERO
            ),
            None
        );
    }

    #[test]
    fn the_grace_covers_one_sync_interval_of_staleness() {
        let idle = Some(10 * S);
        let r = rec(0, 1_000);
        assert_eq!(verdict(&r, None, idle, None, 12_000, 5 * S), None);
        assert_eq!(
            verdict(&r, None, idle, None, 16_001, 5 * S),
            Some(Reason::Idle)
        );
    }

    #[test]
    fn age_counts_from_creation_whatever_the_use() {
        let r = rec(1_000, 99_000);
        assert_eq!(
            verdict(&r, Some(90 * S), None, Some(99_000), 91_000, Duration::ZERO),
            None
        );
        assert_eq!(
            verdict(
                &r,
                Some(90 * S),
                Some(10 * S),
                Some(99_000),
                91_001,
                Duration::ZERO
            ),
            Some(Reason::Age)
        );
        // No limits: never due; a clock behind the record never underflows.
        assert_eq!(verdict(&r, None, None, None, 0, Duration::ZERO), None);
        assert_eq!(verdict(&r, Some(S), Some(S), None, 0, Duration::ZERO), None);
    }
}
