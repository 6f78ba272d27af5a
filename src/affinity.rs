//! The affinity table: which backend holds each session, who owns it, and how many client
//! connections have it open. Sessions never move on membership changes; only failover moves
//! them, through [`SessionTable::reassign`].

use crate::backend::Pool;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use std::time::{Instant, SystemTime};

/// One session's placement.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Backend name.
    pub backend: String,
    /// Owning tenant.
    pub owner: String,
    /// When the proxy first saw it.
    pub created: SystemTime,
    /// Last request routed to it.
    pub last_seen: Instant,
    /// Client connections that created or resumed it and have not detached.
    pub live_conns: u32,
    /// Times it was moved by failover.
    pub moves: u32,
    /// The registry record's epoch this placement reflects (moves raise it).
    pub epoch: u64,
}

/// Outcome of trying to claim a session id for a tenant.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Newly placed on the given backend.
    New,
    /// Already known and owned by the caller, on this backend.
    Existing(String),
    /// Owned by someone else.
    Foreign,
}

/// Sessions of one (owner, backend) pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Sessions this replica knows.
    pub known: u64,
    /// Of those, sessions with a client of this replica joined.
    pub live: u64,
}

/// Session id → placement.
#[derive(Debug, Default)]
pub struct SessionTable {
    map: DashMap<String, Placement>,
}

impl SessionTable {
    /// Looks a session up.
    pub fn get(&self, id: &str) -> Option<Placement> {
        self.map.get(id).map(|p| p.clone())
    }

    /// Number of known sessions.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Claims `id` for `owner` on `backend` if unknown; never overwrites an existing route.
    pub fn claim(&self, id: &str, owner: &str, backend: &str) -> Claim {
        match self.map.entry(id.to_string()) {
            Entry::Occupied(e) => {
                if e.get().owner == owner {
                    Claim::Existing(e.get().backend.clone())
                } else {
                    Claim::Foreign
                }
            }
            Entry::Vacant(v) => {
                v.insert(Placement {
                    backend: backend.to_string(),
                    owner: owner.to_string(),
                    created: SystemTime::now(),
                    last_seen: Instant::now(),
                    live_conns: 0,
                    moves: 0,
                    epoch: 1,
                });
                Claim::New
            }
        }
    }

    /// Records that one more client connection has the session open.
    pub fn join(&self, id: &str, pool: &Pool) {
        if let Some(mut p) = self.map.get_mut(id) {
            p.live_conns += 1;
            p.last_seen = Instant::now();
            if p.live_conns == 1 {
                if let Some(b) = pool.get(&p.backend) {
                    b.session_started();
                }
            }
        }
    }

    /// Records that a client connection closed or detached the session.
    pub fn leave(&self, id: &str, pool: &Pool) {
        if let Some(mut p) = self.map.get_mut(id) {
            if p.live_conns > 0 {
                p.live_conns -= 1;
                if p.live_conns == 0 {
                    if let Some(b) = pool.get(&p.backend) {
                        b.session_ended();
                    }
                }
            }
        }
    }

    /// Whether `tenant` owns the session (`None`: unknown); a match also refreshes last-seen,
    /// so a routed request costs one lookup here.
    pub fn owned_by_touch(&self, id: &str, tenant: &str) -> Option<bool> {
        let mut p = self.map.get_mut(id)?;
        let mine = p.owner == tenant;
        if mine {
            p.last_seen = Instant::now();
        }
        Some(mine)
    }

    /// Forgets a session (deleted, or a create that failed).
    pub fn remove(&self, id: &str, pool: &Pool) -> Option<Placement> {
        let (_, p) = self.map.remove(id)?;
        if p.live_conns > 0 {
            if let Some(b) = pool.get(&p.backend) {
                b.session_ended();
            }
        }
        Some(p)
    }

    /// Moves a session from `from` to `to` if it is still on `from`; returns where it is now.
    /// Concurrent failovers of one session agree on a single new home this way.
    pub fn reassign(&self, id: &str, from: &str, to: &str, pool: &Pool) -> Option<String> {
        let mut p = self.map.get_mut(id)?;
        if p.backend == from {
            if p.live_conns > 0 {
                if let Some(b) = pool.get(from) {
                    b.session_ended();
                }
                if let Some(b) = pool.get(to) {
                    b.session_started();
                }
            }
            p.backend = to.to_string();
            p.moves += 1;
            p.epoch += 1;
        }
        Some(p.backend.clone())
    }

    /// Takes in what the registry holds for `id`: a new entry, or a newer epoch of a known one
    /// (moved by another replica); an older epoch changes nothing. Returns the entry as it is.
    pub fn learn(
        &self,
        id: &str,
        owner: &str,
        backend: &str,
        epoch: u64,
        created: SystemTime,
        pool: &Pool,
    ) -> Placement {
        match self.map.entry(id.to_string()) {
            Entry::Occupied(mut e) => {
                let p = e.get_mut();
                if epoch > p.epoch {
                    if p.backend != backend {
                        p.moves += 1;
                    }
                    if p.live_conns > 0 && p.backend != backend {
                        if let Some(b) = pool.get(&p.backend) {
                            b.session_ended();
                        }
                        if let Some(b) = pool.get(backend) {
                            b.session_started();
                        }
                    }
                    p.backend = backend.to_string();
                    p.owner = owner.to_string();
                    p.epoch = epoch;
                }
                p.clone()
            }
            Entry::Vacant(v) => v
                .insert(Placement {
                    backend: backend.to_string(),
                    owner: owner.to_string(),
                    created,
                    last_seen: Instant::now(),
                    live_conns: 0,
                    moves: 0,
                    epoch,
                })
                .clone(),
        }
    }

    /// Overrides the cached owner and placement of `id` with the registry's (which differed
    /// from this replica's belief: another replica moved it, or re-asserted it first after
    /// the store lost its data). Unknown ids are left alone.
    pub fn replace(&self, id: &str, owner: &str, backend: &str, epoch: u64, pool: &Pool) {
        if let Some(mut p) = self.map.get_mut(id) {
            if p.live_conns > 0 && p.backend != backend {
                if let Some(b) = pool.get(&p.backend) {
                    b.session_ended();
                }
                if let Some(b) = pool.get(backend) {
                    b.session_started();
                }
            }
            p.owner = owner.to_string();
            p.backend = backend.to_string();
            p.epoch = epoch;
        }
    }

    /// Forgets `id` unless a client connection of this replica has it open (a cached entry
    /// that may be stale is dropped; a live one is kept and re-checked by the next sync).
    pub fn forget_idle(&self, id: &str) {
        self.map.remove_if(id, |_, p| p.live_conns == 0);
    }

    /// Live sessions owned by `owner` (counted in place, nothing copied).
    pub fn live_owned_by(&self, owner: &str) -> u64 {
        self.map
            .iter()
            .filter(|e| e.owner == owner && e.live_conns > 0)
            .count() as u64
    }

    /// Sessions known and live per (owner, backend), without copying the table: the status
    /// page asks for this every second it is open.
    pub fn tally(&self) -> std::collections::BTreeMap<(String, String), Tally> {
        let mut out = std::collections::BTreeMap::<(String, String), Tally>::new();
        for e in self.map.iter() {
            let p = e.value();
            let key = (p.owner.clone(), p.backend.clone());
            let t = out.entry(key).or_default();
            t.known += 1;
            if p.live_conns > 0 {
                t.live += 1;
            }
        }
        out
    }

    /// A snapshot of every entry, for the admin API and listing.
    pub fn snapshot(&self) -> Vec<(String, Placement)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}
