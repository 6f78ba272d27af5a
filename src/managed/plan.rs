//! The supervisor's decisions as pure functions: how long to wait before restarting a CLI that
//! exited, and in which order a rolling restart takes the pool's CLIs.

use std::time::Duration;

/// A CLI that ran at least this long before it exited was healthy: its next exit starts the
/// back-off from the beginning again instead of doubling it.
pub(crate) const STABLE_AFTER: Duration = Duration::from_secs(30);

/// After a CLI exited having run `uptime`, with `failures` quick exits before it: the new
/// count of quick exits and the delay before starting it again. The delay is `min` doubled
/// per quick exit in a row, capped at `max`; a CLI that had been up for [`STABLE_AFTER`]
/// is restarted after `min` (one crash of a long-running CLI is not a crash loop).
pub(crate) fn after_exit(
    failures: u32,
    uptime: Duration,
    min: Duration,
    max: Duration,
) -> (u32, Duration) {
    let failures = if uptime >= STABLE_AFTER {
        1
    } else {
        failures.saturating_add(1)
    };
    let doubled = min
        .checked_mul(1u32 << (failures - 1).min(20))
        .unwrap_or(max);
    (failures, doubled.min(max).max(min.min(max)))
}

/// What a rolling restart knows of one CLI when it decides the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RestartView {
    /// Whether health checks call it reachable.
    pub(crate) healthy: bool,
    /// Live sessions on it (what has to move).
    pub(crate) sessions: u64,
}

/// The order of a rolling restart, as indexes into `views` (the pool's order). CLIs that are
/// down go first (restarting them moves nothing and may give the others a place to move to),
/// then the healthy ones with the fewest sessions: every CLI restarted early has fewer
/// sessions to move, and the ones moved first land on CLIs already restarted. Ties keep the
/// pool's order, so the order is the same on every run with the same state.
pub(crate) fn restart_order(views: &[RestartView]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..views.len()).collect();
    order.sort_by_key(|&i| (views[i].healthy, views[i].sessions, i));
    order
}

/// Whether a rolling restart may take a CLI down now: at least one other CLI of the pool is
/// up to take its sessions (else its sessions would have nowhere to go and fail).
pub(crate) fn may_stop(views: &[RestartView], which: usize) -> bool {
    views
        .iter()
        .enumerate()
        .any(|(i, v)| i != which && v.healthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn quick_exits_double_the_delay_up_to_the_cap() {
        let (min, max) = (MS(500), MS(4000));
        let mut f = 0;
        let mut delays = Vec::new();
        for _ in 0..6 {
            let (nf, d) = after_exit(f, MS(100), min, max);
            f = nf;
            delays.push(d.as_millis());
        }
        assert_eq!(delays, [500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(f, 6);
    }

    #[test]
    fn a_cli_that_ran_long_starts_the_back_off_again() {
        let (f, d) = after_exit(9, STABLE_AFTER, MS(500), MS(30_000));
        assert_eq!((f, d), (1, MS(500)));
        // Just short of stable counts as a quick exit.
        let (f, d) = after_exit(2, STABLE_AFTER - MS(1), MS(500), MS(30_000));
        assert_eq!((f, d), (3, MS(2000)));
    }

    #[test]
    fn the_delay_never_overflows_and_respects_the_cap() {
        let (f, d) = after_exit(u32::MAX, MS(0), Duration::from_secs(3600), MS(30_000));
        assert_eq!((f, d), (u32::MAX, MS(30_000)));
        let (_, d) = after_exit(40, MS(0), MS(500), Duration::from_secs(365 * 86_400));
        assert!(d <= Duration::from_secs(365 * 86_400) && d >= MS(500));
    }

    #[test]
    fn down_first_then_fewest_sessions_then_pool_order() {
        let v = |healthy, sessions| RestartView { healthy, sessions };
        let views = [v(true, 5), v(true, 1), v(false, 3), v(true, 1), v(false, 0)];
        assert_eq!(restart_order(&views), [4, 2, 1, 3, 0]);
        assert!(restart_order(&[]).is_empty());
    }

    #[test]
    fn a_cli_is_stopped_only_when_another_can_take_its_sessions() {
        let v = |healthy| RestartView {
            healthy,
            sessions: 1,
        };
        assert!(may_stop(&[v(true), v(true)], 0));
        assert!(!may_stop(&[v(true), v(false)], 0));
        assert!(may_stop(&[v(true), v(false)], 1));
        assert!(!may_stop(&[v(true)], 0));
    }
}
