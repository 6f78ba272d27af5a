//! Session hygiene: the backend-services guide tells services to list sessions periodically and
//! delete old ones, because the CLI keeps every session on local disk. copilot-lb can do it per
//! tenant (`max_session_age`, `max_idle`; off by default), and the admin API deletes on demand.

use crate::backend::{Backend, CallError};
use crate::context::Shared;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

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
}

/// Deletes a session on its backend and forgets it. `Ok(false)` if the proxy does not know it.
pub(crate) async fn delete_session(
    shared: &Shared,
    sid: &str,
    reason: &str,
) -> Result<bool, DeleteError> {
    let Some(p) = shared.sessions.get(sid) else {
        return Ok(false);
    };
    let b = shared
        .pool
        .get(&p.backend)
        .ok_or_else(|| DeleteError::Unconfigured(p.backend.clone()))?;
    let v = call_once(
        &b,
        "session.delete",
        &json!({ "sessionId": sid }),
        Duration::from_secs(10),
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
    if let Err(e) = shared.sessions.remove(sid, &shared.pool).await {
        warn!(session = %sid, error = %e, "deleted on its backend but still in the session registry");
    }
    shared.metrics.session_deleted(match reason {
        "max_session_age" => "max_session_age",
        "max_idle" => "max_idle",
        _ => "admin",
    });
    info!(session = %sid, backend = %b.name, owner = %p.owner, reason, "session deleted by copilot-lb");
    Ok(true)
}

/// Every few seconds, deletes sessions past their tenant's age or idle limit.
pub(crate) async fn reap(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let tenants = shared.auth().tenants();
        if tenants
            .iter()
            .all(|t| t.max_session_age.is_none() && t.max_idle.is_none())
        {
            continue;
        }
        let now = SystemTime::now();
        for (sid, p) in shared.sessions.snapshot() {
            let Some(t) = tenants.iter().find(|t| t.name == p.owner) else {
                continue;
            };
            let reason = if t
                .max_session_age
                .is_some_and(|age| now.duration_since(p.created).unwrap_or_default() > age)
            {
                "max_session_age"
            } else if t.max_idle.is_some_and(|idle| p.last_seen.elapsed() > idle) {
                "max_idle"
            } else {
                continue;
            };
            if let Err(e) = delete_session(&shared, &sid, reason).await {
                warn!(session = %sid, error = %e, reason, "session cleanup failed; will retry");
            }
        }
    }
}
