//! Noisy neighbours: each tenant's request rate and concurrent turns, and fair admission of
//! turns to a saturated backend.
//!
//! Three mechanisms, each a pure decision with the state around it kept small:
//!
//! - **Rate**: a token bucket per tenant, run as GCRA ([`gcra`]) over one atomic, so the check
//!   on every request is a clock read and one compare-and-swap on the tenant's own word: no
//!   lock, and tenants never touch each other's cache lines.
//! - **Tenant turns**: a counter per tenant of turns in progress on this replica, charged by
//!   a [`TurnSlot`] that gives its share back when dropped. The connection keeps the slot
//!   beside the session it runs on, so every way a turn can end (its `session.idle` or
//!   `session.error`, an error reply, the session left or deleted, the link or the connection
//!   gone) releases it without a path of its own.
//! - **Backend turns**: a backend with `max_concurrent_turns` admits that many turns at once;
//!   further ones wait in a bounded queue, and each freed slot goes to the waiter whose tenant
//!   has the fewest turns running on that backend ([`pick_waiter`]), not to the first that
//!   came. A full queue takes a newcomer only by displacing the latest waiter of the tenant
//!   holding most of the backend ([`displace`]); everything else is refused, retryably.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// GCRA, the token bucket as one number: `tat` is the theoretical arrival time of the next
/// request (ns since an epoch), `interval` the ns between requests at the sustained rate and
/// `burst` how many may come at once. Returns the new `tat` when the request conforms, else
/// how long until it would.
pub(crate) fn gcra(tat: u64, now: u64, interval: u64, burst: u64) -> Result<u64, u64> {
    let next = tat.max(now).saturating_add(interval);
    let allowed = interval.saturating_mul(burst.max(1));
    let ahead = next - now;
    if ahead <= allowed {
        Ok(next)
    } else {
        Err(ahead - allowed)
    }
}

/// A tenant's limits and the state that enforces them on this replica. Shared by every
/// connection of the tenant, and carried over a reload (settings are atomics, so a reload
/// changes them in place and the counts stay right).
#[derive(Debug)]
pub struct TenantLimits {
    epoch: Instant,
    /// ns between requests at the sustained rate; 0: no rate limit.
    interval: AtomicU64,
    burst: AtomicU64,
    /// The bucket (GCRA's theoretical arrival time, ns since `epoch`).
    tat: AtomicU64,
    /// Cap on turns in progress; 0: none.
    max_turns: AtomicU64,
    turns: AtomicU64,
}

impl Default for TenantLimits {
    fn default() -> Self {
        TenantLimits {
            epoch: Instant::now(),
            interval: AtomicU64::new(0),
            burst: AtomicU64::new(1),
            tat: AtomicU64::new(0),
            max_turns: AtomicU64::new(0),
            turns: AtomicU64::new(0),
        }
    }
}

/// A request refused by a tenant's rate limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RateLimited {
    /// When the next request would be accepted.
    pub(crate) retry_after: Duration,
    /// The configured rate (requests per second) and burst, for the message.
    pub(crate) per_second: f64,
    pub(crate) burst: u64,
}

impl TenantLimits {
    /// Applies settings: `rate` as (requests per second, burst), `max_turns` (0: none).
    pub fn configure(&self, rate: Option<(f64, u64)>, max_turns: u64) {
        let (interval, burst) = match rate {
            Some((rps, burst)) if rps > 0.0 => ((1e9 / rps).max(1.0) as u64, burst.max(1)),
            _ => (0, 1),
        };
        self.interval.store(interval, Ordering::Relaxed);
        self.burst.store(burst, Ordering::Relaxed);
        self.max_turns.store(max_turns, Ordering::Relaxed);
    }

    /// Takes one request from the bucket.
    pub(crate) fn check_rate(&self) -> Result<(), RateLimited> {
        let interval = self.interval.load(Ordering::Relaxed);
        if interval == 0 {
            return Ok(());
        }
        let burst = self.burst.load(Ordering::Relaxed);
        let now = self.epoch.elapsed().as_nanos() as u64;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            match gcra(tat, now, interval, burst) {
                Ok(next) => match self.tat.compare_exchange_weak(
                    tat,
                    next,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Ok(()),
                    Err(seen) => tat = seen,
                },
                Err(wait) => {
                    return Err(RateLimited {
                        retry_after: Duration::from_nanos(wait),
                        per_second: 1e9 / interval as f64,
                        burst,
                    })
                }
            }
        }
    }

    /// Turns in progress now.
    #[cfg(test)]
    pub fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }

    /// Charges one turn, unless the tenant is at its cap (`Err` carries the cap).
    pub(crate) fn try_turn(self: &Arc<Self>) -> Result<TurnSlot, u64> {
        let max = self.max_turns.load(Ordering::Relaxed);
        let r = self
            .turns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            });
        match r {
            Ok(_) => Ok(TurnSlot {
                tenant: self.clone(),
                backend: None,
            }),
            Err(_) => Err(max),
        }
    }
}

/// One turn in progress: its tenant's share (and its backend's, once admitted there), given
/// back when dropped.
#[derive(Debug)]
pub(crate) struct TurnSlot {
    tenant: Arc<TenantLimits>,
    backend: Option<BackendSlot>,
}

impl TurnSlot {
    /// Adds the backend's admission to this turn.
    pub(crate) fn on_backend(&mut self, slot: BackendSlot) {
        self.backend = Some(slot);
    }
}

impl Drop for TurnSlot {
    fn drop(&mut self) {
        self.tenant.turns.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a backend answered a turn's request for admission.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Admitted now.
    Now(BackendSlot),
    /// Queued: the receiver yields the slot when a running turn ends.
    Wait(oneshot::Receiver<BackendSlot>),
    /// The queue is full of waiters of tenants with no more turns than this one.
    Full,
}

/// What the gate knows of one waiting turn.
#[derive(Debug)]
struct Waiter {
    tenant: Arc<str>,
    tx: oneshot::Sender<BackendSlot>,
}

#[derive(Debug, Default)]
struct GateState {
    running: usize,
    /// Turns running here per tenant (only tenants with one or more).
    per_tenant: HashMap<Arc<str>, usize>,
    waiting: VecDeque<Waiter>,
}

/// A backend's admission of turns: its cap, what runs, what waits.
#[derive(Debug)]
pub(crate) struct Gate {
    cap: usize,
    max_waiting: usize,
    state: Mutex<GateState>,
}

/// A turn admitted to a backend; dropping it frees the slot for the next waiter.
#[derive(Debug)]
pub(crate) struct BackendSlot {
    gate: Arc<Gate>,
    tenant: Arc<str>,
}

impl Drop for BackendSlot {
    fn drop(&mut self) {
        self.gate.release(&self.tenant);
    }
}

/// Which waiter a freed slot goes to: the first of those whose tenant has the fewest turns
/// running on the backend (`turns_of`). FIFO within a tenant and among equals.
pub(crate) fn pick_waiter<'a>(
    waiting: impl IntoIterator<Item = &'a str>,
    turns_of: impl Fn(&str) -> usize,
) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (i, t) in waiting.into_iter().enumerate() {
        let n = turns_of(t);
        if best.is_none_or(|(_, m)| n < m) {
            best = Some((i, n));
        }
    }
    best.map(|(i, _)| i)
}

/// With the queue full, which waiter a newcomer of tenant `newcomer` displaces: the latest
/// waiter of the tenant with the largest claim on the backend (turns running plus waiting),
/// if that claim exceeds the newcomer's own (counting the turn it asks for). None: refuse
/// the newcomer instead.
pub(crate) fn displace(
    waiting: &[&str],
    newcomer: &str,
    turns_of: impl Fn(&str) -> usize,
) -> Option<usize> {
    let claim = |t: &str| turns_of(t) + waiting.iter().filter(|w| **w == t).count();
    let mine = claim(newcomer) + 1;
    let mut best: Option<(usize, usize)> = None;
    for (i, t) in waiting.iter().enumerate() {
        let c = claim(t);
        if *t != newcomer && best.is_none_or(|(_, m)| c >= m) {
            best = Some((i, c));
        }
    }
    best.filter(|(_, c)| *c > mine).map(|(i, _)| i)
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for a slot for a turn of `tenant`.
    pub(crate) fn admit(self: &Arc<Self>, tenant: &Arc<str>) -> Admission {
        let mut s = self.lock();
        // Waiters whose request gave up (timed out, connection gone) hold no place.
        s.waiting.retain(|w| !w.tx.is_closed());
        if s.running < self.cap && s.waiting.is_empty() {
            s.running += 1;
            *s.per_tenant.entry(tenant.clone()).or_default() += 1;
            return Admission::Now(BackendSlot {
                gate: self.clone(),
                tenant: tenant.clone(),
            });
        }
        if s.waiting.len() >= self.max_waiting {
            let names: Vec<&str> = s.waiting.iter().map(|w| &*w.tenant).collect();
            let victim = displace(&names, tenant, |t| {
                s.per_tenant.get(t).copied().unwrap_or(0)
            });
            match victim {
                // Dropping its sender refuses the displaced waiter.
                Some(i) => drop(s.waiting.remove(i)),
                None => return Admission::Full,
            }
        }
        let (tx, rx) = oneshot::channel();
        s.waiting.push_back(Waiter {
            tenant: tenant.clone(),
            tx,
        });
        Admission::Wait(rx)
    }

    fn release(self: &Arc<Self>, tenant: &Arc<str>) {
        // A slot a waiter could not take (it gave up meanwhile) is dropped after the lock is
        // released: its own drop hands it on again.
        let mut undelivered = Vec::new();
        let mut s = self.lock();
        s.running = s.running.saturating_sub(1);
        if let Some(n) = s.per_tenant.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                s.per_tenant.remove(tenant);
            }
        }
        while s.running < self.cap {
            let pick = pick_waiter(s.waiting.iter().map(|w| &*w.tenant), |t| {
                s.per_tenant.get(t).copied().unwrap_or(0)
            });
            let Some(w) = pick.and_then(|i| s.waiting.remove(i)) else {
                break;
            };
            s.running += 1;
            *s.per_tenant.entry(w.tenant.clone()).or_default() += 1;
            let slot = BackendSlot {
                gate: self.clone(),
                tenant: w.tenant.clone(),
            };
            if let Err(slot) = w.tx.send(slot) {
                undelivered.push(slot);
            }
        }
        drop(s);
        drop(undelivered);
    }

    /// Turns running and waiting.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.running, s.waiting.len())
    }
}

/// Every backend's gate, by backend name, kept across reloads (a running turn holds the gate
/// it was admitted to; a changed cap applies to a new gate and the old one drains).
#[derive(Debug, Default)]
pub struct TurnGates {
    gates: Mutex<HashMap<String, Arc<Gate>>>,
}

impl TurnGates {
    /// The gate of `backend` with cap `cap` (and room for `max_waiting` waiters).
    pub(crate) fn gate(&self, backend: &str, cap: usize, max_waiting: usize) -> Arc<Gate> {
        let mut g = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        match g.get(backend) {
            Some(x) if x.cap == cap && x.max_waiting == max_waiting => x.clone(),
            _ => {
                let x = Arc::new(Gate {
                    cap: cap.max(1),
                    max_waiting,
                    state: Mutex::new(GateState::default()),
                });
                g.insert(backend.to_string(), x.clone());
                x
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn gcra_allows_a_burst_then_the_rate() {
        // 10/s (100 ms apart), burst 3.
        let (iv, b) = (100 * MS, 3);
        let mut tat = 0;
        for _ in 0..3 {
            tat = gcra(tat, 1_000 * MS, iv, b).unwrap();
        }
        let wait = gcra(tat, 1_000 * MS, iv, b).unwrap_err();
        assert_eq!(wait, 100 * MS, "the fourth waits one interval");
        // 100 ms later, one more; not two.
        tat = gcra(tat, 1_100 * MS, iv, b).unwrap();
        assert!(gcra(tat, 1_100 * MS, iv, b).is_err());
        // After a long idle the bucket is full again, never fuller.
        let mut t2 = tat;
        for _ in 0..3 {
            t2 = gcra(t2, 10_000 * MS, iv, b).unwrap();
        }
        assert!(gcra(t2, 10_000 * MS, iv, b).is_err());
    }

    #[test]
    fn tenant_limits_rate_and_turns() {
        let l = Arc::new(TenantLimits::default());
        assert!((0..1000).all(|_| l.check_rate().is_ok()), "unset: no limit");
        l.configure(Some((1.0, 2)), 2);
        assert!(l.check_rate().is_ok() && l.check_rate().is_ok());
        let e = l.check_rate().unwrap_err();
        assert!(e.retry_after > Duration::from_millis(900) && e.burst == 2);
        assert_eq!(e.per_second, 1.0);
        let a = l.try_turn().unwrap();
        let b = l.try_turn().unwrap();
        assert_eq!(l.try_turn().unwrap_err(), 2);
        assert_eq!(l.turns(), 2);
        drop(a);
        let c = l.try_turn().unwrap();
        drop((b, c));
        assert_eq!(l.turns(), 0);
    }

    #[test]
    fn freed_slots_go_to_the_tenant_with_fewest_turns() {
        let turns = |t: &str| match t {
            "b" => 3,
            "c" => 1,
            _ => 0,
        };
        assert_eq!(pick_waiter(["b", "b", "c", "a", "a"], turns), Some(3));
        assert_eq!(pick_waiter(["b", "c", "c"], turns), Some(1));
        assert_eq!(pick_waiter(["b", "b"], turns), Some(0), "FIFO among equals");
        assert_eq!(pick_waiter([], turns), None);
    }

    #[test]
    fn a_full_queue_displaces_only_the_heaviest_tenant() {
        let turns = |t: &str| if t == "b" { 2 } else { 0 };
        // b holds 2 and waits 2 (claim 4); a newcomer of a (claim 1) displaces b's latest.
        assert_eq!(displace(&["b", "a", "b"], "a", turns), Some(2));
        // b itself never displaces anyone; nor does a tenant already as heavy.
        assert_eq!(displace(&["b", "b"], "b", turns), None);
        assert_eq!(displace(&["a", "a"], "c", |_| 0), Some(1));
        assert_eq!(displace(&["a"], "c", |_| 0), None, "claims 1 vs 1");
    }

    #[tokio::test]
    async fn gate_admits_fairly_and_bounds_its_queue() {
        let gates = TurnGates::default();
        let g = gates.gate("cli-1", 2, 2);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let Admission::Now(b1) = g.admit(&b) else {
            panic!()
        };
        let Admission::Now(_b2) = g.admit(&b) else {
            panic!()
        };
        let Admission::Wait(b3) = g.admit(&b) else {
            panic!()
        };
        let Admission::Wait(b4) = g.admit(&b) else {
            panic!()
        };
        assert!(matches!(g.admit(&b), Admission::Full));
        // a displaces b's latest waiter, then gets the first freed slot though it came last.
        let Admission::Wait(mut a1) = g.admit(&a) else {
            panic!()
        };
        assert!(b4.await.is_err(), "displaced: refused");
        assert_eq!(g.counts(), (2, 2));
        drop(b1);
        let slot = a1.try_recv().expect("a admitted first");
        assert_eq!(&*slot.tenant, "a");
        drop(slot);
        assert_eq!(&*b3.await.unwrap().tenant, "b");
        assert_eq!(g.counts(), (1, 0), "b3's slot was dropped at once");
        // A waiter that gave up is skipped.
        let Admission::Now(x) = g.admit(&a) else {
            panic!()
        };
        let Admission::Wait(gone) = g.admit(&b) else {
            panic!()
        };
        drop(gone);
        drop(x);
        assert_eq!(g.counts(), (1, 0));
    }
}
