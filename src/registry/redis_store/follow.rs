//! The Redis store's announcements: what a replica publishes after it moves or deletes a
//! session, and the follower that applies the other replicas' to its own cache (and moves its
//! subscription with the master under Sentinel).

use super::RedisStore;
use crate::affinity::SessionTable;
use crate::backend::Pool;
use crate::registry::Record;
use futures_util::StreamExt;
use redis::AsyncCommands;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A move or delete, as announced to the other replicas.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Event {
    Move {
        id: String,
        owner: String,
        backend: String,
        epoch: u64,
    },
    Delete {
        id: String,
    },
    /// Deleted on its CLI too (hygiene, admin): dropped from every cache even where a
    /// client connection still holds it, so no replica re-asserts a session that is gone.
    Gone {
        id: String,
    },
}

impl RedisStore {
    async fn publish(&self, ev: &Event) {
        let Ok(msg) = serde_json::to_string(ev) else {
            return;
        };
        // A lost announcement costs a stale cache entry until the next sync, which repairs it.
        match self.conn().await {
            Ok(mut c) => {
                if let Err(e) = c.publish::<_, _, ()>(self.channel(), msg).await {
                    debug!(error = %e, "registry announcement not published");
                }
            }
            Err(e) => debug!(error = %e, "registry announcement not published"),
        }
    }

    pub(crate) async fn announce_move(&self, id: &str, r: &Record) {
        self.publish(&Event::Move {
            id: id.to_string(),
            owner: r.owner.clone(),
            backend: r.backend.clone(),
            epoch: r.epoch,
        })
        .await
    }

    pub(crate) async fn announce_delete(&self, id: &str) {
        self.publish(&Event::Delete { id: id.to_string() }).await
    }

    pub(crate) async fn announce_gone(&self, id: &str) {
        self.publish(&Event::Gone { id: id.to_string() }).await
    }

    /// Applies the other replicas' announcements to `table` until `stop`. On every
    /// (re)subscription the cache's idle entries are dropped: announcements made while this
    /// replica was not listening are lost, and an idle entry is cheap to look up again.
    pub(crate) async fn follow(&self, table: &SessionTable, pool: &Pool, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        // Sentinel mode: announcements are published on the master the data connection
        // reaches, so the subscription moves when that does (a stalled old master would
        // otherwise keep this stream open and silent).
        let mut changes = self.target.master_changes();
        loop {
            // The master this attempt tried (Sentinel mode): if it fails there, the data
            // connection to that master is dropped too, so the next lookup asks the
            // sentinels (a replica that only follows would otherwise retry a dead master).
            let mut tried = None;
            let subscribed = async {
                let (client, addr) = self.target.pubsub_client(self.timeout).await?;
                tried.clone_from(&addr);
                let mut ps = client.get_async_pubsub().await?;
                ps.subscribe(self.channel()).await?;
                Ok::<_, redis::RedisError>((ps, addr))
            };
            let ps = tokio::select! {
                _ = stop.cancelled() => return,
                r = tokio::time::timeout(self.timeout, subscribed) => r,
            };
            if !matches!(ps, Ok(Ok(_))) {
                self.target.forget_master(tried.as_deref());
            }
            match ps {
                Ok(Ok((ps, addr))) => {
                    backoff = Duration::from_millis(100);
                    for (id, _) in table.snapshot() {
                        table.forget_idle(&id);
                    }
                    info!(channel = %self.channel(), "following the session registry's moves and deletes");
                    let mut msgs = ps.into_on_message();
                    let mut moved_on = false;
                    loop {
                        let msg = tokio::select! {
                            _ = stop.cancelled() => return,
                            m = msgs.next() => m,
                            moved = master_moved(changes.as_mut(), addr.as_deref()) => {
                                info!(master = %moved, "registry master changed; moving the subscription");
                                moved_on = true;
                                break;
                            }
                        };
                        let Some(msg) = msg else { break };
                        let Ok(text) = msg.get_payload::<String>() else {
                            continue;
                        };
                        match serde_json::from_str::<Event>(&text) {
                            Ok(Event::Move {
                                id,
                                owner,
                                backend,
                                epoch,
                            }) => {
                                if table.get(&id).is_some() {
                                    table.learn(
                                        &id,
                                        &owner,
                                        &backend,
                                        epoch,
                                        std::time::SystemTime::now(),
                                        pool,
                                    );
                                }
                            }
                            Ok(Event::Delete { id }) => table.forget_idle(&id),
                            Ok(Event::Gone { id }) => {
                                table.remove(&id, pool);
                            }
                            Err(e) => {
                                debug!(error = %e, "unreadable registry announcement ignored")
                            }
                        }
                    }
                    if !moved_on {
                        warn!("registry subscription lost; resubscribing");
                        self.target.forget_master(addr.as_deref());
                    }
                }
                Ok(Err(e)) => {
                    warn!(error = %e, retry_in = ?backoff, "cannot subscribe to the session registry")
                }
                Err(_) => {
                    warn!(retry_in = ?backoff, "cannot subscribe to the session registry: timed out")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Resolves when the master changes to another address than `addr` (never without
/// Sentinel, or when the sender is gone).
async fn master_moved(
    rx: Option<&mut tokio::sync::watch::Receiver<Option<String>>>,
    addr: Option<&str>,
) -> String {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    loop {
        // Checked before waiting too: a change between the lookup and the subscription.
        let now = rx.borrow_and_update().clone();
        if let Some(now) = now {
            if Some(now.as_str()) != addr {
                return now;
            }
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_round_trip() {
        let ev = Event::Move {
            id: "s 1|x".into(),
            owner: "team".into(),
            backend: "b2".into(),
            epoch: 4,
        };
        let text = serde_json::to_string(&ev).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), ev);
    }
}
