//! The session registry: the one authoritative record of who owns each session and which
//! backend holds it, so ownership and placement survive a restart (the embedded store) and
//! every replica of a fleet routes a session to the same CLI (Redis).
//!
//! The session table ([`SessionTable`]) is this replica's cache of the record, plus what only
//! this replica knows: which of its client connections hold each session. A request on a
//! session the cache knows never waits on the store; a lookup miss, a create, a move and a
//! delete do, bounded by `state.timeout`. When the store cannot answer, known sessions keep
//! working and unknown ones fail closed (the caller answers with a retryable error): an id
//! the registry cannot vouch for belongs to nobody.
//!
//! A record holds no create or resume parameters: they can carry provider API keys, and stay
//! in the memory of the replica serving the session.

mod embedded;
mod redis_conn;
mod redis_store;
#[cfg(test)]
mod suite;

use crate::affinity::{Claim, Placement, SessionTable};
use crate::backend::Pool;
use crate::config::{StateConfig, StateKind};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub(crate) use embedded::Embedded;
pub(crate) use redis_store::RedisStore;

/// One session's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// Owning tenant.
    pub(crate) owner: String,
    /// Backend that holds it.
    pub(crate) backend: String,
    /// Raised by every move; a move names the epoch it saw, so of two replicas moving one
    /// session at once exactly one wins and the other follows.
    pub(crate) epoch: u64,
    /// Created, milliseconds since the Unix epoch.
    pub(crate) created_ms: u64,
    /// Last used through any replica (written at most once per sync interval per session).
    pub(crate) last_used_ms: u64,
}

impl Record {
    pub(crate) fn new(owner: &str, backend: &str) -> Record {
        let now = now_ms();
        Record {
            owner: owner.to_string(),
            backend: backend.to_string(),
            epoch: 1,
            created_ms: now,
            last_used_ms: now,
        }
    }

    fn of(p: &Placement) -> Record {
        let idle = p.last_seen.elapsed().as_millis() as u64;
        Record {
            owner: p.owner.clone(),
            backend: p.backend.clone(),
            epoch: p.epoch,
            created_ms: ms_of(p.created),
            last_used_ms: now_ms().saturating_sub(idle),
        }
    }

    fn created(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.created_ms)
    }
}

/// What an insert-if-absent found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Created {
    /// The record is now the given one.
    Inserted,
    /// The id was already recorded (by anyone, for anyone).
    Exists(Record),
}

/// What a compare-and-set move found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Moved {
    /// Moved; the record as it now is.
    Done(Record),
    /// The epoch had changed (someone else moved it first): the record as it is, or `None`
    /// when it was deleted.
    Stale(Option<Record>),
}

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded store failed (disk, corruption, already open elsewhere).
    #[error("embedded store: {0}")]
    Embedded(#[from] redb::Error),
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A stored record could not be read back.
    #[error("stored record for session {id:?} is malformed ({why})")]
    Corrupt {
        /// The session.
        id: String,
        /// What was wrong.
        why: &'static str,
    },
    /// The embedded store's writer thread is gone.
    #[error("embedded store: writer thread stopped")]
    WriterGone,
    /// The transaction a write was part of did not commit.
    #[error("embedded store: commit failed: {0}")]
    CommitFailed(String),
}

/// Live sessions by owning tenant and by backend: what one replica holds (published), or
/// what all the others hold (summed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LiveCounts {
    pub(crate) tenants: std::collections::HashMap<String, u64>,
    pub(crate) backends: std::collections::HashMap<String, u64>,
}

/// One page of a walk over every record (the hygiene reaper's).
#[derive(Debug, Default)]
pub(crate) struct Page {
    pub(crate) records: Vec<(String, Record)>,
    /// Where the next page starts; `None` when this was the last.
    pub(crate) next: Option<String>,
}

/// What a registry store does; [`suite`] runs the same tests against every implementation.
pub(crate) trait Store: Send + Sync + 'static {
    /// The record of `id`, if any.
    fn get(&self, id: &str) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;
    /// Records `rec` for `id` unless `id` is recorded already, atomically.
    fn create(
        &self,
        id: &str,
        rec: &Record,
    ) -> impl Future<Output = Result<Created, StoreError>> + Send;
    /// Moves `id` to `backend` if its epoch is still `epoch` (the epoch is then raised).
    fn move_to(
        &self,
        id: &str,
        epoch: u64,
        backend: &str,
    ) -> impl Future<Output = Result<Moved, StoreError>> + Send;
    /// Deletes `id` (only if its epoch is still `epoch`, when given); whether it was deleted.
    fn remove(
        &self,
        id: &str,
        epoch: Option<u64>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// For sessions this replica holds: raises each one's last-used time, re-inserts a
    /// missing record (the store restarted empty), and returns the records that differ from
    /// what this replica believes (moved or re-owned elsewhere).
    fn sync(
        &self,
        held: &[(String, Record)],
    ) -> impl Future<Output = Result<Vec<(String, Record)>, StoreError>> + Send;
    /// Deletes `id` only if its record is exactly `rec` (owner, backend, epoch, created): the
    /// undo of a create whose answer never came (it may have been applied after the caller
    /// gave up), which must not touch a record someone else made. Whether it deleted.
    fn undo_create(
        &self,
        id: &str,
        rec: &Record,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Deletes `id` only if its record is exactly `rec` (owner, backend, epoch, created and
    /// last-used time): the hygiene reaper's compare-and-set, so a session touched (synced)
    /// or moved through any replica since the reaper read it is kept. Whether it deleted.
    fn remove_exact(
        &self,
        id: &str,
        rec: &Record,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Up to about `count` records, from `from` (`None`: the start); `next` is where the
    /// following page starts (`None`: the walk is complete). A record present for the whole
    /// walk is returned at least once; one may be returned twice.
    fn scan(
        &self,
        from: Option<&str>,
        count: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;
    /// Takes or renews the hygiene lease for replica `me` for `ttl`; returns the holder as
    /// the store has it now (`Some(me)` when `me` holds it; `None` when nobody does).
    fn lease(
        &self,
        me: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
    /// Gives the hygiene lease up if `me` holds it.
    fn release(&self, me: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Publishes what replica `me` holds live (kept for `ttl`, so a replica that dies stops
    /// counting) and returns the sum of what every other live replica published.
    fn share_live(
        &self,
        me: &str,
        mine: &LiveCounts,
        ttl: Duration,
    ) -> impl Future<Output = Result<LiveCounts, StoreError>> + Send;
}

/// Why the registry could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The embedded file could not be opened or created.
    #[error("state file {path}: {source}")]
    Embedded {
        /// The file.
        path: String,
        /// The cause.
        source: redb::Error,
    },
    /// The Redis settings are unusable.
    #[error("state: redis: {0}")]
    Redis(redis_conn::TargetError),
}

enum Kind {
    /// No store: the table is the whole record (ownership is lost on restart).
    Memory,
    // Shared with the tasks that undo a create whose answer never came.
    Embedded(std::sync::Arc<Embedded>),
    Redis(std::sync::Arc<RedisStore>),
}

/// Runs `$body` with `$s` bound to the store, for the kinds that have one.
macro_rules! with_store {
    ($self:ident, $s:ident => $body:expr) => {
        match &$self.store {
            Kind::Memory => unreachable!("memory registry has no store"),
            Kind::Embedded($s) => $body,
            Kind::Redis($s) => $body,
        }
    };
}

/// The session registry: the cache and the store behind it.
pub struct Registry {
    table: SessionTable,
    /// This process's name in the fleet's published live counts.
    replica: String,
    /// Live sessions per tenant held through other replicas, as of the last sync.
    elsewhere: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    store: Kind,
    timeout: Duration,
    sync_every: Duration,
    up: AtomicBool,
    errors: AtomicU64,
    /// The hygiene lease: how long it lasts unrenewed, whether this replica holds it (as of
    /// its last attempt), the holder the store named then, and whether it was given up for
    /// good (shutdown).
    lease_ttl: Duration,
    lease_held: AtomicBool,
    lease_holder: std::sync::Mutex<Option<String>>,
    lease_closed: AtomicBool,
}

/// Records per page of the hygiene reaper's walk (one SCAN and one pipelined read each).
const SCAN_BATCH: usize = 256;

/// A snapshot of the registry's state, for `/readyz`, the admin API and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegistryStatus {
    /// `memory`, `embedded` or `redis`.
    pub kind: &'static str,
    /// Whether the last store operation succeeded.
    pub up: bool,
    /// Store operations that failed or timed out since start.
    pub errors: u64,
    /// Sessions in this replica's cache.
    pub cached: usize,
    /// This replica's id in the fleet (random per process; names the hygiene lease holder).
    pub replica: String,
    /// Whether this replica holds the hygiene lease (it alone reaps idle and old sessions).
    pub hygiene_lease_held: bool,
    /// The lease holder as of this replica's last attempt (`None`: nobody, or not asked:
    /// no tenant has a hygiene limit).
    pub hygiene_lease_holder: Option<String>,
}

impl Registry {
    /// A registry with no store (tests, and `state: {kind: memory}`).
    pub fn memory() -> Registry {
        Registry::with(Kind::Memory, Duration::from_secs(1), Duration::from_secs(5))
    }

    fn with(store: Kind, timeout: Duration, sync_every: Duration) -> Registry {
        Registry {
            table: SessionTable::default(),
            replica: uuid::Uuid::new_v4().to_string(),
            elsewhere: std::sync::Mutex::new(std::collections::HashMap::new()),
            store,
            timeout,
            sync_every,
            up: AtomicBool::new(true),
            errors: AtomicU64::new(0),
            lease_ttl: Duration::from_secs(15),
            lease_held: AtomicBool::new(false),
            lease_holder: std::sync::Mutex::new(None),
            lease_closed: AtomicBool::new(false),
        }
    }

    /// Opens the configured store. The embedded store is read into the cache now (it is this
    /// replica's alone); Redis is connected lazily, so a proxy starts while Redis is down.
    pub fn open(cfg: &StateConfig, pool: &Pool) -> Result<Registry, OpenError> {
        let (timeout, sync_every) = (cfg.timeout(), cfg.sync_interval());
        let store = match cfg.kind {
            StateKind::Memory => Kind::Memory,
            StateKind::Embedded => {
                let path = cfg.embedded_path();
                let db = Embedded::open(&path).map_err(|source| OpenError::Embedded {
                    path: path.display().to_string(),
                    source,
                })?;
                Kind::Embedded(std::sync::Arc::new(db))
            }
            StateKind::Redis => Kind::Redis(std::sync::Arc::new(
                RedisStore::new(cfg).map_err(OpenError::Redis)?,
            )),
        };
        let mut reg = Registry::with(store, timeout, sync_every);
        reg.lease_ttl = cfg.lease_ttl();
        if let Kind::Embedded(db) = &reg.store {
            let all = db.list_now().map_err(|source| OpenError::Embedded {
                path: cfg.embedded_path().display().to_string(),
                source,
            })?;
            let n = all.len();
            for (id, r) in all {
                reg.table
                    .learn(&id, &r.owner, &r.backend, r.epoch, r.created(), pool);
            }
            info!(sessions = n, path = %cfg.embedded_path().display(), "session registry loaded");
        }
        Ok(reg)
    }

    fn kind(&self) -> &'static str {
        match self.store {
            Kind::Memory => "memory",
            Kind::Embedded(_) => "embedded",
            Kind::Redis(_) => "redis",
        }
    }

    fn shared_store(&self) -> bool {
        !matches!(self.store, Kind::Memory)
    }

    /// The registry's state.
    pub fn status(&self) -> RegistryStatus {
        RegistryStatus {
            kind: self.kind(),
            up: self.up.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            cached: self.table.len(),
            replica: self.replica.clone(),
            hygiene_lease_held: self.lease_held.load(Ordering::Relaxed),
            hygiene_lease_holder: self
                .lease_holder
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Bounds a store operation and records whether the store answered.
    async fn guarded<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let r = match tokio::time::timeout(self.timeout, op).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        let ok = r.is_ok();
        let was = self.up.swap(ok, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if was != ok {
            match &r {
                Ok(_) => info!(kind = self.kind(), "session registry reachable again"),
                Err(e) => {
                    warn!(kind = self.kind(), error = %e, "session registry unavailable; unknown sessions are refused until it answers")
                }
            }
        }
        r
    }

    // ---- cache reads (never wait on the store) ----------------------------------------

    /// The cached placement of `id`.
    pub fn get(&self, id: &str) -> Option<Placement> {
        self.table.get(id)
    }

    /// Sessions in the cache.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// One more client connection of this replica has `id` open.
    pub fn join(&self, id: &str, pool: &Pool) {
        self.table.join(id, pool)
    }

    /// A client connection of this replica closed or detached `id`.
    pub fn leave(&self, id: &str, pool: &Pool) {
        self.table.leave(id, pool)
    }

    /// Live sessions owned by `owner` on this replica.
    pub fn live_owned_by(&self, owner: &str) -> u64 {
        self.table.live_owned_by(owner)
    }

    /// Live sessions owned by `owner` across the fleet (other replicas' share as of the last
    /// sync): what a tenant's `max_sessions` counts.
    pub fn fleet_owned_by(&self, owner: &str) -> u64 {
        let others = self
            .elsewhere
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(owner)
            .copied()
            .unwrap_or(0);
        self.live_owned_by(owner) + others
    }

    /// What this replica holds live, by tenant and by backend.
    fn my_live(&self) -> LiveCounts {
        let mut c = LiveCounts::default();
        for (_, p) in self.table.snapshot() {
            if p.live_conns > 0 {
                *c.tenants.entry(p.owner).or_default() += 1;
                *c.backends.entry(p.backend).or_default() += 1;
            }
        }
        c
    }

    /// The cache counted per (owner, backend) (the status page).
    pub fn tally(&self) -> std::collections::BTreeMap<(String, String), crate::affinity::Tally> {
        self.table.tally()
    }

    /// The cache, sorted by id (admin API, hygiene).
    pub fn snapshot(&self) -> Vec<(String, Placement)> {
        self.table.snapshot()
    }

    // ---- decisions that may need the store --------------------------------------------

    /// Whether `tenant` owns `id`: `Ok(None)` when the registry has no record of it. A cache
    /// hit answers at once (and refreshes the idle time); a miss asks the store.
    pub async fn owner(
        &self,
        id: &str,
        tenant: &str,
        pool: &Pool,
    ) -> Result<Option<bool>, StoreError> {
        if let Some(mine) = self.table.owned_by_touch(id, tenant) {
            return Ok(Some(mine));
        }
        Ok(self.lookup(id, pool).await?.map(|p| p.owner == tenant))
    }

    /// The placement of `id`, from the cache or else the store (and then cached).
    pub async fn lookup(&self, id: &str, pool: &Pool) -> Result<Option<Placement>, StoreError> {
        if let Some(p) = self.table.get(id) {
            return Ok(Some(p));
        }
        if !self.shared_store() {
            return Ok(None);
        }
        self.fetch(id, pool).await
    }

    /// Reads `id` from the store into the cache (moves by other replicas win by epoch).
    async fn fetch(&self, id: &str, pool: &Pool) -> Result<Option<Placement>, StoreError> {
        let rec = with_store!(self, s => self.guarded(s.get(id)).await)?;
        Ok(rec.map(|r| self.learn(id, &r, pool)))
    }

    /// Re-reads `id` from the store before a decision that must not act on a stale cache
    /// (a failover). Memory registries answer from the table.
    pub async fn refresh(&self, id: &str, pool: &Pool) -> Result<Option<Placement>, StoreError> {
        // Memory and embedded: this process is the only writer, so its table is the record.
        if !matches!(self.store, Kind::Redis(_)) {
            return Ok(self.table.get(id));
        }
        match self.fetch(id, pool).await? {
            Some(p) => Ok(Some(p)),
            None => {
                // Deleted (or never recorded): this replica's entry is stale.
                self.table.forget_idle(id);
                Ok(self.table.get(id))
            }
        }
    }

    fn learn(&self, id: &str, r: &Record, pool: &Pool) -> Placement {
        self.table
            .learn(id, &r.owner, &r.backend, r.epoch, r.created(), pool)
    }

    /// Claims `id` for `owner` on `backend` unless it is recorded already (by anyone):
    /// insert-if-absent in the store, so two replicas creating one id agree on one owner.
    pub async fn claim(
        &self,
        id: &str,
        owner: &str,
        backend: &str,
        pool: &Pool,
    ) -> Result<Claim, StoreError> {
        let known = |p: &Placement| {
            if p.owner == owner {
                Claim::Existing(p.backend.clone())
            } else {
                Claim::Foreign
            }
        };
        if let Some(p) = self.table.get(id) {
            return Ok(known(&p));
        }
        if !self.shared_store() {
            return Ok(self.table.claim(id, owner, backend));
        }
        let rec = Record::new(owner, backend);
        let created = with_store!(self, s => self.guarded(s.create(id, &rec)).await);
        let created = match created {
            Ok(c) => c,
            Err(e) => {
                // The caller is told nothing was done, so nothing may stay done: a create
                // sent before the timeout can still be applied after it.
                self.undo_create_later(id, rec);
                return Err(e);
            }
        };
        match created {
            Created::Inserted => {
                let p = self.learn(id, &rec, pool);
                // A concurrent local claim may have cached it first; the store decided.
                Ok(if p.owner == owner && p.epoch == rec.epoch {
                    Claim::New
                } else {
                    known(&p)
                })
            }
            Created::Exists(r) => Ok(known(&self.learn(id, &r, pool))),
        }
    }

    /// Undoes a create that failed or timed out, in the background, until the store answers
    /// (bounded: eight attempts over about a minute, then logged).
    fn undo_create_later(&self, id: &str, rec: Record) {
        fn spawn<S: Store>(s: std::sync::Arc<S>, id: String, rec: Record, timeout: Duration) {
            tokio::spawn(async move {
                let mut wait = Duration::from_millis(250);
                for _ in 0..8 {
                    if let Ok(Ok(undone)) =
                        tokio::time::timeout(timeout, s.undo_create(&id, &rec)).await
                    {
                        if undone {
                            info!(session = %id, "a create the registry answered too late was undone");
                        }
                        return;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(15));
                }
                warn!(session = %id, "could not undo a create the registry may have applied late; its owner can still use or delete it");
            });
        }
        match &self.store {
            Kind::Memory => {}
            Kind::Embedded(s) => spawn(s.clone(), id.to_string(), rec, self.timeout),
            Kind::Redis(s) => spawn(s.clone(), id.to_string(), rec, self.timeout),
        }
    }

    /// Moves `id` from `from` to `to` if it is still on `from`, by compare-and-set on the
    /// record's epoch; returns where it is now (`None`: deleted meanwhile).
    pub async fn reassign(
        &self,
        id: &str,
        from: &str,
        to: &str,
        pool: &Pool,
    ) -> Result<Option<String>, StoreError> {
        let Some(p) = self.table.get(id) else {
            return Ok(None);
        };
        if p.backend != from {
            return Ok(Some(p.backend));
        }
        if !self.shared_store() {
            return Ok(self.table.reassign(id, from, to, pool));
        }
        if let Kind::Embedded(s) = &self.store {
            // The only writer: the table decides at once, and the durable write follows in
            // the background, so a failover of many sessions never queues behind fsyncs (the
            // double-failure test measured that). A crash in between leaves the old backend
            // in the file, which the next request fails over from again.
            let now_on = self.table.reassign(id, from, to, pool);
            if now_on.as_deref() == Some(to) {
                let (s, id, to, epoch) = (s.clone(), id.to_string(), to.to_string(), p.epoch);
                tokio::spawn(async move {
                    if let Err(e) = s.move_to(&id, epoch, &to).await {
                        warn!(session = %id, error = %e, "failover not written to the state file");
                    }
                });
            }
            return Ok(now_on);
        }
        let moved = with_store!(self, s => self.guarded(s.move_to(id, p.epoch, to)).await)?;
        match moved {
            Moved::Done(r) => {
                self.table.reassign(id, from, to, pool);
                self.learn(id, &r, pool);
                if let Kind::Redis(s) = &self.store {
                    s.announce_move(id, &r).await;
                }
                Ok(Some(r.backend))
            }
            Moved::Stale(Some(r)) => Ok(Some(self.learn(id, &r, pool).backend)),
            Moved::Stale(None) => {
                self.table.remove(id, pool);
                Ok(None)
            }
        }
    }

    /// Forgets `id` here and in the store (deleted, or a create that failed).
    pub async fn remove(&self, id: &str, pool: &Pool) -> Result<Option<Placement>, StoreError> {
        let p = self.table.remove(id, pool);
        if self.shared_store() {
            with_store!(self, s => self.guarded(s.remove(id, None)).await)?;
            if let Kind::Redis(s) = &self.store {
                s.announce_delete(id).await;
            }
        }
        Ok(p)
    }

    /// Forgets `id` here and in the store after its CLI deleted it (admin API): every other
    /// replica drops it too, even where a client connection still holds it.
    pub(crate) async fn remove_gone(&self, id: &str, pool: &Pool) -> Result<(), StoreError> {
        self.table.remove(id, pool);
        if self.shared_store() {
            with_store!(self, s => self.guarded(s.remove(id, None)).await)?;
            if let Kind::Redis(s) = &self.store {
                s.announce_gone(id).await;
            }
        }
        Ok(())
    }

    /// Keeps the store in step with what this replica holds, every `state.sync_interval`,
    /// until `stop`: last-used times, re-assertion after the store lost its data, the cache
    /// corrected where another replica moved or re-owned a session, and the fleet's live
    /// counts exchanged (so caps and bounded load count every replica's sessions).
    pub async fn sync_loop(&self, pool: &Pool, stop: CancellationToken) {
        if !self.shared_store() {
            return;
        }
        let mut since = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.sync_every) => {}
            }
            let started = Instant::now();
            if self.sync_once(pool, since).await {
                since = started;
            }
            self.share_live(pool).await;
        }
    }

    /// One sync of the sessions used since `since` or held now; whether it went through.
    async fn sync_once(&self, pool: &Pool, since: Instant) -> bool {
        let held: Vec<(String, Record)> = self
            .table
            .snapshot()
            .into_iter()
            .filter(|(_, p)| p.live_conns > 0 || p.last_seen >= since)
            .map(|(id, p)| {
                let r = Record::of(&p);
                (id, r)
            })
            .collect();
        if held.is_empty() {
            return true;
        }
        match with_store!(self, s => self.guarded(s.sync(&held)).await) {
            Ok(differs) => {
                for (id, r) in differs {
                    warn!(session = %id, backend = %r.backend, epoch = r.epoch, "registry record differs from this replica's; following the record");
                    self.table.replace(&id, &r.owner, &r.backend, r.epoch, pool);
                }
                true
            }
            Err(e) => {
                warn!(error = %e, sessions = held.len(), "session registry sync failed; retrying next interval");
                false
            }
        }
    }

    /// Publishes this replica's live counts and takes in the others'. A failure keeps the
    /// last known counts (they only ever make caps stricter for one interval).
    async fn share_live(&self, pool: &Pool) {
        let mine = self.my_live();
        let ttl = self.sync_every * 3;
        let others =
            with_store!(self, s => self.guarded(s.share_live(&self.replica, &mine, ttl)).await);
        let others = match others {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, "fleet live counts not exchanged; keeping the last ones");
                return;
            }
        };
        for b in pool.all().iter() {
            b.set_elsewhere(others.backends.get(&b.name).copied().unwrap_or(0));
        }
        *self.elsewhere.lock().unwrap_or_else(|e| e.into_inner()) = others.tenants;
    }

    // ---- session hygiene: one reaper for the fleet ---------------------------------------

    /// Takes or renews the hygiene lease; whether this replica holds it now. A store that
    /// does not answer means "not held": the lease then lapses after its TTL and another
    /// replica takes it, so a stalled holder stops reaping rather than reaping twice.
    pub async fn hygiene_lease(&self) -> bool {
        if self.lease_closed.load(Ordering::Relaxed) {
            return false;
        }
        let holder = match &self.store {
            Kind::Memory => Ok(Some(self.replica.clone())),
            Kind::Embedded(s) => self.guarded(s.lease(&self.replica, self.lease_ttl)).await,
            Kind::Redis(s) => self.guarded(s.lease(&self.replica, self.lease_ttl)).await,
        };
        let (held, holder) = match holder {
            Ok(h) => (h.as_deref() == Some(self.replica.as_str()), h),
            Err(e) => {
                debug!(error = %e, "hygiene lease not renewed");
                (false, None)
            }
        };
        let was = self.lease_held.swap(held, Ordering::Relaxed);
        if was != held {
            if held {
                info!(replica = %self.replica, "hygiene lease taken: this replica reaps idle and old sessions for the fleet");
            } else {
                info!(replica = %self.replica, holder = ?holder, "hygiene lease not held: another replica reaps");
            }
        }
        *self.lease_holder.lock().unwrap_or_else(|e| e.into_inner()) = holder;
        held
    }

    /// Gives the hygiene lease up. `for_good` (shutdown) also stops this replica from taking
    /// it again; otherwise (no tenant has a limit any more) it may take it later.
    pub async fn release_lease(&self, for_good: bool) {
        if for_good {
            self.lease_closed.store(true, Ordering::Relaxed);
        }
        if !self.lease_held.swap(false, Ordering::Relaxed) {
            return;
        }
        *self.lease_holder.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let r = match &self.store {
            Kind::Memory => Ok(()),
            Kind::Embedded(s) => self.guarded(s.release(&self.replica)).await,
            Kind::Redis(s) => self.guarded(s.release(&self.replica)).await,
        };
        match r {
            Ok(()) => info!(replica = %self.replica, "hygiene lease released"),
            Err(e) => {
                warn!(error = %e, "hygiene lease not released; it lapses after state.lease_ttl")
            }
        }
    }

    /// How long the hygiene lease lasts unrenewed.
    pub(crate) fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// How stale a record's last-used time may be: other replicas write theirs once per
    /// sync interval (Redis); a single process knows every use itself.
    pub(crate) fn idle_grace(&self) -> Duration {
        match self.store {
            Kind::Redis(_) => self.sync_every,
            _ => Duration::ZERO,
        }
    }

    /// One page of the walk over every record in the store (the whole fleet's, not only
    /// this replica's cache); the memory registry's table is its whole record.
    pub(crate) async fn scan_page(&self, from: Option<&str>) -> Result<Page, StoreError> {
        match &self.store {
            Kind::Memory => Ok(Page {
                records: self
                    .table
                    .snapshot()
                    .into_iter()
                    .map(|(id, p)| {
                        let r = Record::of(&p);
                        (id, r)
                    })
                    .collect(),
                next: None,
            }),
            Kind::Embedded(s) => self.guarded(s.scan(from, SCAN_BATCH)).await,
            Kind::Redis(s) => self.guarded(s.scan(from, SCAN_BATCH)).await,
        }
    }

    /// The reaper's compare-and-set: removes the record of `id` only if it is still exactly
    /// `rec` (so a session used or moved meanwhile, through any replica, is kept). The
    /// cache entry stays until the CLI has deleted the session ([`Registry::forget_gone`]).
    pub(crate) async fn take_if_unchanged(
        &self,
        id: &str,
        rec: &Record,
    ) -> Result<bool, StoreError> {
        match &self.store {
            Kind::Memory => Ok(self.table.get(id).is_some_and(|p| p.epoch == rec.epoch)),
            Kind::Embedded(s) => self.guarded(s.remove_exact(id, rec)).await,
            Kind::Redis(s) => self.guarded(s.remove_exact(id, rec)).await,
        }
    }

    /// Puts back, exactly, a record the reaper took when the CLI then could not delete the
    /// session (insert-if-absent: a session re-created meanwhile under that id is left
    /// alone). Whether it is back as it was.
    pub(crate) async fn restore(&self, id: &str, rec: &Record) -> Result<bool, StoreError> {
        let created = match &self.store {
            Kind::Memory => return Ok(true),
            Kind::Embedded(s) => self.guarded(s.create(id, rec)).await?,
            Kind::Redis(s) => self.guarded(s.create(id, rec)).await?,
        };
        Ok(created == Created::Inserted)
    }

    /// Forgets a session its CLI has deleted: here, and (announced) in every other
    /// replica's cache, even where a client connection still holds it.
    pub(crate) async fn forget_gone(&self, id: &str, pool: &Pool) {
        self.table.remove(id, pool);
        if let Kind::Redis(s) = &self.store {
            s.announce_gone(id).await;
        }
    }

    /// Follows other replicas' moves and deletes (Redis pub/sub) until `stop`, so the cache
    /// does not route to a backend the record has left. Nothing to follow for other kinds.
    pub async fn follow(&self, pool: &Pool, stop: CancellationToken) {
        let Kind::Redis(s) = &self.store else {
            return;
        };
        s.follow(&self.table, pool, stop).await
    }
}

pub(crate) fn now_ms() -> u64 {
    ms_of(SystemTime::now())
}

fn ms_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
