//! The set of backends, swapped whole on reload, and the rankings and placement over it.

use super::{Backend, BackendError, State};
use crate::balance::{self, Candidate};
use crate::config::Config;
use arc_swap::ArcSwap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The set of backends, swapped whole on reload.
#[derive(Debug, Default)]
pub struct Pool {
    inner: ArcSwap<Vec<Arc<Backend>>>,
}

impl Pool {
    /// Builds the pool from config.
    pub fn new(cfg: &Config) -> Result<Pool, BackendError> {
        let list = cfg
            .backends
            .iter()
            .map(|b| Backend::from_config(b).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pool {
            inner: ArcSwap::from_pointee(list),
        })
    }

    /// A snapshot of the current backends.
    pub fn all(&self) -> Arc<Vec<Arc<Backend>>> {
        self.inner.load_full()
    }

    /// Finds a backend by name.
    pub fn get(&self, name: &str) -> Option<Arc<Backend>> {
        self.all().iter().find(|b| b.name == name).cloned()
    }

    /// Every backend in `key`'s rendezvous order (weighted HRW): a session's ranking.
    pub fn ranked(&self, key: &str) -> Vec<Arc<Backend>> {
        let all = self.all();
        balance::rank(key, all.iter().map(|b| (b.name.as_str(), b.weight)))
            .into_iter()
            .map(|i| all[i].clone())
            .collect()
    }

    /// The first backend in `key`'s ranking that serves: up preferred, then draining. On the
    /// path of every process-wide call, so it ranks indexes and clones one `Arc`.
    pub fn first_serving(&self, key: &str) -> Option<Arc<Backend>> {
        let all = self.all();
        let order = balance::rank(key, all.iter().map(|b| (b.name.as_str(), b.weight)));
        let up = order.iter().find(|&&i| all[i].state() == State::Up);
        up.or_else(|| order.iter().find(|&&i| all[i].state() != State::Down))
            .map(|&i| all[i].clone())
    }

    /// Chooses a backend for a new session: bounded-load HRW over the up backends `allowed`
    /// and not in `exclude`.
    pub fn place(
        &self,
        sid: &str,
        allowed: impl Fn(&str) -> bool,
        exclude: &[String],
        bounded_load: f64,
    ) -> Option<Arc<Backend>> {
        let all = self.all();
        let cands: Vec<Candidate> = all
            .iter()
            .map(|b| Candidate {
                name: &b.name,
                weight: b.weight,
                eligible: b.state() == State::Up && allowed(&b.name) && !exclude.contains(&b.name),
                live: b.fleet_sessions(),
                max_sessions: b.max_sessions,
            })
            .collect();
        balance::place(sid, &cands, bounded_load)
            .ok()
            .map(|i| all[i].clone())
    }

    /// Replaces the backend list, keeping runtime state of backends whose name and address
    /// are unchanged. Returns (added, removed) names.
    pub fn replace(&self, cfg: &Config) -> Result<(Vec<String>, Vec<String>), BackendError> {
        let old = self.all();
        let mut next = Vec::new();
        let mut added = Vec::new();
        for b in &cfg.backends {
            let keep = old.iter().find(|o| {
                // A managed CLI's token belongs to its supervisor, not to the file.
                let token_same = o.managed
                    || o.token().as_deref().map(String::as_str)
                        == Config::backend_token(b).ok().flatten().as_deref();
                o.name == b.name()
                    && o.managed == b.managed
                    && o.address == b.address.value
                    && o.weight == b.weight
                    && o.max_sessions == b.max_sessions
                    && token_same
            });
            match keep {
                Some(o) => {
                    // The file's drain flag applies when it changes, so a reload does not undo
                    // a drain an operator started through the admin API.
                    if o.config_drain.swap(b.drain, Ordering::AcqRel) != b.drain {
                        o.set_draining(b.drain);
                    }
                    next.push(o.clone())
                }
                None => {
                    let nb = Backend::from_config(b)?;
                    if let Some(o) = old.iter().find(|o| o.name == b.name()) {
                        // Same name, new settings: carry the counters so accounting stays right.
                        nb.live_sessions.store(o.live_sessions(), Ordering::Relaxed);
                        nb.set_draining(o.draining());
                        o.fence();
                    } else {
                        added.push(nb.name.clone());
                    }
                    next.push(Arc::new(nb));
                }
            }
        }
        let removed: Vec<String> = old
            .iter()
            .filter(|o| !cfg.backends.iter().any(|b| b.name() == o.name))
            .map(|o| {
                // Its links close, so the CLI releases its sessions before they move.
                o.fence();
                o.name.clone()
            })
            .collect();
        self.inner.store(Arc::new(next));
        Ok((added, removed))
    }
}
