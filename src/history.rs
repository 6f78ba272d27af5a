//! Recent history of the proxy's counters for the status page: a bounded ring of fixed
//! intervals (10 s × 60 = the last 10 minutes), each holding how much every counter grew in it.
//!
//! The ring is fed by sampling cumulative totals from a background tick, never from the data
//! path: a request costs nothing here, and the ring's size never depends on traffic.

use serde::Serialize;
use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Length of one bucket.
pub(crate) const INTERVAL: Duration = Duration::from_secs(10);
/// Buckets kept (10 minutes).
pub(crate) const BUCKETS: usize = 60;

/// Cumulative counters since start (or their growth over one bucket).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Counts {
    /// Client requests answered, any result.
    pub(crate) requests: u64,
    /// Requests the proxy answered with an error itself (refused: auth, policy, limits, no
    /// backend, registry unavailable).
    pub(crate) refused: u64,
    /// Requests a CLI answered with an error.
    pub(crate) backend_errors: u64,
    /// Sessions moved to another backend.
    pub(crate) failovers: u64,
    /// Sessions that could not be moved.
    pub(crate) failover_failures: u64,
    /// Failed health probes and failures seen on live traffic.
    pub(crate) health_failures: u64,
    /// Frames refused (oversized, unparseable, TLS handshakes that failed).
    pub(crate) bad_frames: u64,
}

impl Counts {
    /// Growth from `older` to `self`; a counter never shrinks, but a saturating difference
    /// keeps a bucket at zero rather than wrapping if it ever did.
    pub(crate) fn since(&self, older: &Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(older.requests),
            refused: self.refused.saturating_sub(older.refused),
            backend_errors: self.backend_errors.saturating_sub(older.backend_errors),
            failovers: self.failovers.saturating_sub(older.failovers),
            failover_failures: self
                .failover_failures
                .saturating_sub(older.failover_failures),
            health_failures: self.health_failures.saturating_sub(older.health_failures),
            bad_frames: self.bad_frames.saturating_sub(older.bad_frames),
        }
    }

    fn add(&mut self, o: &Counts) {
        self.requests = self.requests.saturating_add(o.requests);
        self.refused = self.refused.saturating_add(o.refused);
        self.backend_errors = self.backend_errors.saturating_add(o.backend_errors);
        self.failovers = self.failovers.saturating_add(o.failovers);
        self.failover_failures = self.failover_failures.saturating_add(o.failover_failures);
        self.health_failures = self.health_failures.saturating_add(o.health_failures);
        self.bad_frames = self.bad_frames.saturating_add(o.bad_frames);
    }
}

/// One interval of the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Bucket {
    /// Start, Unix milliseconds.
    pub(crate) start_ms: u64,
    /// End, Unix milliseconds (for the open bucket: now).
    pub(crate) end_ms: u64,
    /// How much each counter grew in it.
    #[serde(flatten)]
    pub(crate) counts: Counts,
}

/// The ring. Closed buckets are the growth between two samples; the open bucket (from the last
/// sample to now) is computed when asked, so the page is current to the second.
#[derive(Debug)]
pub(crate) struct History {
    cap: usize,
    closed: VecDeque<Bucket>,
    /// The last sample: when, and the totals then.
    last: Option<(u64, Counts)>,
}

impl Default for History {
    fn default() -> Self {
        History::new(BUCKETS)
    }
}

/// Milliseconds since the Unix epoch (0 before it, saturating far after).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl History {
    /// An empty ring of at most `cap` closed buckets (at least one).
    pub(crate) fn new(cap: usize) -> History {
        History {
            cap: cap.max(1),
            closed: VecDeque::with_capacity(cap.max(1)),
            last: None,
        }
    }

    /// Records the totals at `at`: closes the bucket since the previous sample (the first
    /// sample only sets the baseline, so what happened before it is not counted). A clock that
    /// went backwards closes nothing and restarts from this sample.
    pub(crate) fn sample(&mut self, at: SystemTime, totals: Counts) {
        let now = unix_ms(at);
        if let Some((start, before)) = self.last {
            if now >= start {
                if self.closed.len() == self.cap {
                    self.closed.pop_front();
                }
                self.closed.push_back(Bucket {
                    start_ms: start,
                    end_ms: now,
                    counts: totals.since(&before),
                });
            }
        }
        self.last = Some((now, totals));
    }

    /// The buckets, oldest first, ending with the open one (last sample to `now`, given the
    /// totals now) when a baseline exists.
    pub(crate) fn view(&self, now: SystemTime, totals: Counts) -> Vec<Bucket> {
        let mut v: Vec<Bucket> = self.closed.iter().copied().collect();
        if let Some((start, before)) = self.last {
            v.push(Bucket {
                start_ms: start,
                end_ms: unix_ms(now).max(start),
                counts: totals.since(&before),
            });
        }
        v
    }

    /// Sum over every bucket of [`History::view`]: the growth over the window kept.
    pub(crate) fn window_total(buckets: &[Bucket]) -> Counts {
        let mut sum = Counts::default();
        for b in buckets {
            sum.add(&b.counts);
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    fn refused(n: u64) -> Counts {
        Counts {
            refused: n,
            requests: n * 2,
            ..Counts::default()
        }
    }

    #[test]
    fn the_first_sample_is_a_baseline_and_buckets_hold_growth() {
        let mut h = History::new(5);
        assert!(h.view(at(0), refused(9)).is_empty());
        h.sample(at(0), refused(7));
        h.sample(at(10), refused(10));
        h.sample(at(20), refused(10));
        let v = h.view(at(25), refused(12));
        let got: Vec<u64> = v.iter().map(|b| b.counts.refused).collect();
        // 7 before the baseline are not counted; 3, 0, then the open bucket's 2.
        assert_eq!(got, [3, 0, 2]);
        assert_eq!(v[0].start_ms, unix_ms(at(0)));
        assert_eq!(v[2].end_ms, unix_ms(at(25)));
        assert_eq!(History::window_total(&v).requests, 10);
    }

    #[test]
    fn the_ring_is_bounded_and_drops_the_oldest() {
        let mut h = History::new(3);
        for i in 0..100u64 {
            h.sample(at(i * 10), refused(i * i));
        }
        let v = h.view(at(995), refused(99 * 99));
        assert_eq!(v.len(), 4, "3 closed + the open one");
        // The newest closed bucket is 98² → 99².
        assert_eq!(v[2].counts.refused, 99 * 99 - 98 * 98);
        assert_eq!(v[0].start_ms, unix_ms(at(960)));
        assert_eq!(v[3].counts, Counts::default());
        assert!(h.closed.capacity() < 16, "no growth past the cap");
    }

    #[test]
    fn odd_inputs_never_wrap_or_panic() {
        let mut h = History::new(0);
        h.sample(at(10), refused(5));
        // A counter that went down and a clock that went back.
        h.sample(at(5), refused(1));
        assert!(h.closed.is_empty(), "a backwards clock closes nothing");
        h.sample(at(15), refused(0));
        let v = h.view(at(1), refused(0));
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].counts.refused, 0, "saturates, never wraps");
        assert!(v[1].end_ms >= v[1].start_ms);
        let max = Counts {
            requests: u64::MAX,
            ..Counts::default()
        };
        let w = History::window_total(&[
            Bucket {
                start_ms: 0,
                end_ms: 1,
                counts: max,
            },
            Bucket {
                start_ms: 1,
                end_ms: 2,
                counts: max,
            },
        ]);
        assert_eq!(w.requests, u64::MAX);
    }
}
