//! Pieces of the fault-injection and soak harness (`benches/chaos.rs`, `tests/soak.rs`).
//!
//! - [`host`]: the fake CLIs' shared session storage as a process-independent service, so each
//!   backend can be its own killable process (`chaos fake-cli`);
//! - [`front`]: that per-backend process;
//! - [`relay`]: a TCP relay owned by the test that can stop forwarding both ways (a partition);
//! - [`mux`]: a multiplexed JSON-RPC client (many sessions, concurrent requests, events routed
//!   by session, every call with a deadline);
//! - [`procs`]: starting copilot-lb, `/proc` readings, the admin API;
//! - [`faults`]: the "faults under load" run; [`soak`]: the soak run.
//!
//! Every loop is bounded by a count or a deadline; everything listens on 127.0.0.1.
#![allow(dead_code)]

pub mod faults;
pub mod front;
pub mod host;
pub mod mux;
pub mod procs;
pub mod relay;
pub mod soak;

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Latency percentiles (µs) of a set of samples in nanoseconds; reuses the load generator's.
pub fn pct(ns: Vec<u64>) -> crate::lg::Pct {
    crate::lg::Pct::of(ns)
}

/// Counts by label, printable.
#[derive(Default, Debug)]
pub struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    /// Adds one to `key`.
    pub fn add(&self, key: impl Into<String>) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.into())
            .or_default() += 1;
    }

    /// A copy of the counts.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sum of every count.
    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }
}

/// `--key value` style arguments.
pub struct Args(Vec<String>);

impl Args {
    /// From the arguments after the subcommand (`--bench`, which cargo adds, is dropped).
    pub fn new(v: Vec<String>) -> Args {
        Args(v.into_iter().filter(|a| a != "--bench").collect())
    }

    /// The value after `--name`, if given.
    pub fn get(&self, name: &str) -> Option<String> {
        let flag = format!("--{name}");
        self.0
            .iter()
            .position(|a| *a == flag)
            .and_then(|i| self.0.get(i + 1).cloned())
    }

    /// The value after `--name` parsed, or `default`; exits with a message if unparsable.
    pub fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("chaos: --{name} {v}: not a number");
                std::process::exit(2)
            }),
        }
    }
}
