//! Where the Redis store's commands go: one fixed server (`state.url`), through the `redis`
//! crate's connection manager, which reconnects to that address by itself; or the current
//! master of a Sentinel-monitored group (`state.sentinel`), which the crate's
//! [`SentinelClient`] asks the sentinels for. A master's address changes on failover, so in
//! Sentinel mode a connection that fails (an I/O error, a read-only replica, an answer that
//! never came) is dropped, and the next operation asks the sentinels again. Nothing here
//! retries a command: the operation that meets the failure fails (the registry fails closed
//! and the client retries), since a script may have run before its answer was lost.

use crate::config::StateConfig;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ErrorKind, RedisFuture, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tokio::sync::{watch, Mutex};
use tracing::{debug, info};

/// Why a Redis target could not be built from the config.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// A URL, address or secret setting could not be read.
    #[error("{0}")]
    Config(#[from] crate::config::StateSecretError),
    /// `state.url` does not parse.
    #[error("url: {0}")]
    Url(redis::RedisError),
    /// A sentinel address is not `host:port`.
    #[error("state.sentinel.nodes: {node:?} {why}")]
    Node {
        /// The address as configured.
        node: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The client refused the settings.
    #[error("redis client: {0}")]
    Client(redis::RedisError),
}

/// The configured target.
pub(crate) enum Target {
    Direct {
        client: Client,
        conn: Mutex<Option<ConnectionManager>>,
    },
    Sentinel(Sentinel),
}

/// The master as the sentinels last named it, and one multiplexed connection to it.
pub(crate) struct Sentinel {
    /// `&mut` to ask; the lock also makes one lookup at a time (the others wait for it).
    client: Mutex<SentinelClient>,
    current: Arc<StdMutex<Option<Current>>>,
    generation: AtomicU64,
    /// `host:port` of the master last connected to, for the pub/sub subscriber to follow.
    master: watch::Sender<Option<String>>,
    master_name: String,
}

#[derive(Clone)]
pub(crate) struct Current {
    generation: u64,
    conn: MultiplexedConnection,
    client: Client,
    addr: String,
}

/// A connection for one operation.
#[derive(Clone)]
pub(crate) enum Conn {
    Direct(ConnectionManager),
    Master {
        conn: MultiplexedConnection,
        generation: u64,
        current: Arc<StdMutex<Option<Current>>>,
    },
}

/// Whether an error means the master this connection reaches may no longer be the master.
fn master_lost(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_unrecoverable_error()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
                | ErrorKind::Server(redis::ServerErrorKind::MasterDown)
                | ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
        )
}

/// Drops the shared master connection of `generation` (not a newer one another operation
/// made meanwhile).
fn forget(current: &StdMutex<Option<Current>>, generation: u64) {
    let mut slot = current.lock().unwrap_or_else(|p| p.into_inner());
    if slot.as_ref().is_some_and(|c| c.generation == generation) {
        *slot = None;
    }
}

/// Forgets the master connection if the request it guards never completed (its future was
/// dropped, e.g. by the registry's timeout: a stalled master) or failed as a lost master's.
struct Guard<'a> {
    current: &'a StdMutex<Option<Current>>,
    generation: u64,
    done: bool,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if !self.done {
            forget(self.current, self.generation);
        }
    }
}

/// Runs one request on the shared master connection under a [`Guard`].
async fn guarded<T>(
    current: &StdMutex<Option<Current>>,
    generation: u64,
    request: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    let mut g = Guard {
        current,
        generation,
        done: false,
    };
    let r = request.await;
    g.done = !matches!(&r, Err(e) if master_lost(e));
    r
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Direct(c) => c.req_packed_command(cmd),
            Conn::Master {
                conn,
                generation,
                current,
            } => Box::pin(guarded(current, *generation, conn.req_packed_command(cmd))),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Master {
                conn,
                generation,
                current,
            } => Box::pin(guarded(
                current,
                *generation,
                conn.req_packed_commands(pipeline, offset, count),
            )),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Direct(c) => c.get_db(),
            Conn::Master { conn, .. } => conn.get_db(),
        }
    }
}

impl Target {
    /// From `state`: the URL, or the sentinels; passwords from env or file. Connects on
    /// first use.
    pub(crate) fn new(cfg: &StateConfig) -> Result<Target, TargetError> {
        let password = cfg.redis_password()?;
        let Some(s) = &cfg.sentinel else {
            let mut info: redis::ConnectionInfo = cfg
                .redis_url()?
                .as_str()
                .parse()
                .map_err(TargetError::Url)?;
            if let Some(pw) = password {
                let settings = info.redis_settings().clone().set_password(pw);
                info = info.set_redis_settings(settings);
            }
            return Ok(Target::Direct {
                client: Client::open(info).map_err(TargetError::Client)?,
                conn: Mutex::new(None),
            });
        };
        let s = &s.value;
        let mut nodes = Vec::with_capacity(s.nodes.len());
        for n in &s.nodes {
            let (host, port) =
                crate::config::sentinel_node(n).map_err(|why| TargetError::Node {
                    node: n.clone(),
                    why,
                })?;
            nodes.push(ConnectionAddr::Tcp(host, port));
        }
        let mut b = SentinelClientBuilder::new(nodes, &s.master_name, SentinelServerType::Master)
            .map_err(TargetError::Client)?;
        if let Some(pw) = password {
            b = b.set_client_to_redis_password(pw);
        }
        if let Some(pw) = cfg.sentinel_password()? {
            b = b.set_client_to_sentinel_password(pw);
        }
        let client = b.build().map_err(TargetError::Client)?;
        Ok(Target::Sentinel(Sentinel {
            client: Mutex::new(client),
            current: Arc::new(StdMutex::new(None)),
            generation: AtomicU64::new(0),
            master: watch::Sender::new(None),
            master_name: s.master_name.clone(),
        }))
    }

    /// A connection for one operation: the shared one, made on first use (and, in Sentinel
    /// mode, again after a failure, at the master the sentinels name now). `timeout` bounds
    /// the lookup and the connect.
    pub(crate) async fn conn(&self, timeout: Duration) -> Result<Conn, redis::RedisError> {
        match self {
            Target::Direct { client, conn } => {
                let mut slot = conn.lock().await;
                if let Some(c) = slot.as_ref() {
                    return Ok(Conn::Direct(c.clone()));
                }
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(2));
                let c = ConnectionManager::new_with_config(client.clone(), cfg).await?;
                *slot = Some(c.clone());
                Ok(Conn::Direct(c))
            }
            Target::Sentinel(s) => {
                let c = s.current(timeout).await?;
                Ok(Conn::Master {
                    conn: c.conn,
                    generation: c.generation,
                    current: s.current.clone(),
                })
            }
        }
    }

    /// A client for a pub/sub connection, and the master's `host:port` in Sentinel mode.
    pub(crate) async fn pubsub_client(
        &self,
        timeout: Duration,
    ) -> Result<(Client, Option<String>), redis::RedisError> {
        match self {
            Target::Direct { client, .. } => Ok((client.clone(), None)),
            Target::Sentinel(s) => {
                let c = s.current(timeout).await?;
                Ok((c.client, Some(c.addr)))
            }
        }
    }

    /// Sentinel mode: drops the shared connection if it reaches `addr` (which failed the
    /// pub/sub subscriber), so the next operation asks the sentinels.
    pub(crate) fn forget_master(&self, addr: Option<&str>) {
        let (Target::Sentinel(s), Some(addr)) = (self, addr) else {
            return;
        };
        let mut slot = s.current.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|c| c.addr == addr) {
            *slot = None;
        }
    }

    /// Sentinel mode: tells of every master change (the address connected to).
    pub(crate) fn master_changes(&self) -> Option<watch::Receiver<Option<String>>> {
        match self {
            Target::Direct { .. } => None,
            Target::Sentinel(s) => Some(s.master.subscribe()),
        }
    }
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from((
        ErrorKind::Io,
        "no master found through the sentinels in time",
    ))
}

impl Sentinel {
    fn cached(&self) -> Option<Current> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The shared master connection, or a new one to the master the sentinels name (they
    /// check it answers `ROLE` as a master); an error while none is known.
    async fn current(&self, timeout: Duration) -> Result<Current, redis::RedisError> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let found = tokio::time::timeout(timeout, async {
            let mut sc = self.client.lock().await;
            // Another operation may have found it while this one waited for the lock.
            if let Some(c) = self.cached() {
                return Ok(c);
            }
            let client = sc.async_get_client().await?;
            drop(sc);
            let cfg = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout));
            let conn = client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await?;
            let addr = client.get_connection_info().addr().to_string();
            let c = Current {
                generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
                conn,
                client,
                addr,
            };
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
            Ok::<_, redis::RedisError>(c)
        })
        .await;
        match found {
            Ok(Ok(c)) => {
                let changed = self.master.send_if_modified(|m| {
                    if m.as_deref() == Some(c.addr.as_str()) {
                        false
                    } else {
                        *m = Some(c.addr.clone());
                        true
                    }
                });
                if changed {
                    info!(master_name = %self.master_name, master = %c.addr, "registry: connected to the master the sentinels name");
                }
                Ok(c)
            }
            // Debug only: every operation of an outage comes here, and the registry's state
            // (`/readyz`, metrics) already shows it.
            Ok(Err(e)) => {
                debug!(master_name = %self.master_name, error = %e, "registry: no master through the sentinels");
                Err(e)
            }
            Err(_) => {
                debug!(master_name = %self.master_name, ?timeout, "registry: no master through the sentinels in time");
                Err(timed_out())
            }
        }
    }
}
