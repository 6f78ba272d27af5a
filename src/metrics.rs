//! Prometheus metrics (prometheus-client). Labels are low-cardinality: method class, result,
//! backend name, direction. Never a session id, method name from a client, or a token.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Request outcome labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReqLabels {
    /// Route class (session, create, list, global, local, denied, …).
    pub class: &'static str,
    /// ok, error (backend error reply), proxy_error (answered by the proxy with an error).
    pub result: &'static str,
}

/// Per-backend labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// Backend name.
    pub backend: String,
}

/// Backend state transition labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// Backend name.
    pub backend: String,
    /// New state.
    pub to: &'static str,
}

/// Why a managed CLI was started again.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestartLabels {
    /// Backend name.
    pub backend: String,
    /// `exited` (it exited or never became ready) or `rolling` (a rolling restart).
    pub reason: &'static str,
}

/// Passive failure labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// Backend name.
    pub backend: String,
    /// refused, reset, timeout, tls, self_connect, closed, protocol, io.
    pub kind: &'static str,
}

/// Direction labels for byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    /// client_in, client_out, backend_in, backend_out.
    pub direction: &'static str,
}

/// Class labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// Route class.
    pub class: &'static str,
}

/// Reason labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 22))
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Client connections accepted.
    connections_total: Counter,
    /// Client connections open now.
    connections_active: Gauge,
    /// The listeners' cap on concurrent client connections (`limits.max_connections`).
    connections_max: Gauge,
    /// Client requests by class and result.
    requests: Family<ReqLabels, Counter>,
    /// Request latency by class (seconds, client request in to reply out).
    request_duration: Family<ClassLabels, Histogram, fn() -> Histogram>,
    /// Frame bytes by direction.
    frame_bytes: Family<DirLabels, Counter>,
    /// Frames by direction.
    frames: Family<DirLabels, Counter>,
    /// Frames refused (oversized, unparseable) by reason.
    bad_frames: Family<ReasonLabels, Counter>,
    /// Live sessions per backend.
    sessions: Family<BackendLabels, Gauge>,
    /// Backend state: 0 up, 1 draining, 2 down.
    backend_state: Family<BackendLabels, Gauge>,
    /// Backend state transitions.
    backend_transitions: Family<TransitionLabels, Counter>,
    /// Upstream links open per backend.
    backend_links: Family<BackendLabels, Gauge>,
    /// Sessions moved to another backend by failover.
    failovers: Family<BackendLabels, Counter>,
    /// Sessions that could not fail over (policy fail, or resume refused).
    failover_failures: Family<BackendLabels, Counter>,
    /// Managed CLIs started again, by reason.
    managed_restarts: Family<RestartLabels, Counter>,
    /// Health probe latency (seconds).
    probe_duration: Family<BackendLabels, Histogram, fn() -> Histogram>,
    /// Health probe failures.
    probe_failures: Family<BackendLabels, Counter>,
    /// Passive failures seen on live traffic.
    passive_failures: Family<FailureLabels, Counter>,
    /// Sessions deleted by copilot-lb (hygiene limits or admin API), by reason.
    sessions_reaped: Family<ReasonLabels, Counter>,
    /// Requests refused because the session registry could not answer.
    registry_refusals: Counter,
    /// Requests refused by a tenant's or a backend's noisy-neighbour limit.
    limited: Family<ReasonLabels, Counter>,
    /// Whether the session registry's last operation succeeded.
    registry_up: Gauge,
    /// Registry operations that failed or timed out (read from the registry at scrape).
    registry_errors: Counter,
    /// Sessions in this replica's registry cache.
    registry_cached: Gauge,
    /// Whether this replica holds the hygiene lease (reaps for the fleet).
    hygiene_lease: Gauge,
    /// The frame counters of each direction, resolved once: a family lookup hashes the label
    /// under a lock, on every frame.
    dirs: Vec<(&'static str, Counter, Counter)>,
    /// Request counters and latency histograms, resolved on first use for the same reason:
    /// every forwarded request counted one and observed the other through a family lookup.
    req_cache: [[OnceLock<Counter>; RESULTS.len()]; CLASSES.len()],
    duration_cache: [OnceLock<Histogram>; CLASSES.len()],
    /// Frames forwarded as they arrived (longer than `limits.stream_above_bytes`).
    streamed_frames: Family<DirLabels, Counter>,
    /// Label-free totals of the counters the status page charts (history.rs samples them):
    /// a family cannot be summed without encoding it, and these cost one relaxed add.
    totals: Totals,
}

#[derive(Debug, Default)]
struct Totals {
    requests: AtomicU64,
    refused: AtomicU64,
    backend_errors: AtomicU64,
    failovers: AtomicU64,
    failover_failures: AtomicU64,
    health_failures: AtomicU64,
    bad_frames: AtomicU64,
}

/// One backend's gauges, read from the pool when `/metrics` is scraped: the data path only
/// keeps its own atomics and never pushes gauges.
#[derive(Debug, Clone)]
pub struct BackendGauges {
    /// Backend name.
    pub backend: String,
    /// Live sessions.
    pub sessions: u64,
    /// 0 up, 1 draining, 2 down.
    pub state: i64,
    /// Upstream links open.
    pub links: u64,
}

/// The session registry's state, read when `/metrics` is scraped.
#[derive(Debug, Clone, Copy, Default)]
pub struct RegistryGauges {
    /// Whether its last operation succeeded.
    pub up: bool,
    /// Failed or timed-out operations since start.
    pub errors: u64,
    /// Sessions in the cache.
    pub cached: usize,
    /// Whether this replica holds the hygiene lease.
    pub lease_held: bool,
}

const DIRECTIONS: [&str; 4] = ["client_in", "client_out", "backend_in", "backend_out"];
/// The route classes and results the cache above holds (others go through the family).
const CLASSES: [&str; 9] = [
    "session", "create", "resume", "delete", "detach", "list", "global", "local", "denied",
];
const RESULTS: [&str; 3] = ["ok", "error", "proxy_error"];

fn position(list: &[&str], s: &str) -> Option<usize> {
    list.iter().position(|c| *c == s)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("copilot_lb");
        let m = Metrics {
            connections_total: Counter::default(),
            connections_active: Gauge::default(),
            connections_max: Gauge::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            frame_bytes: Family::default(),
            frames: Family::default(),
            bad_frames: Family::default(),
            sessions: Family::default(),
            backend_state: Family::default(),
            backend_transitions: Family::default(),
            backend_links: Family::default(),
            failovers: Family::default(),
            failover_failures: Family::default(),
            managed_restarts: Family::default(),
            probe_duration: Family::new_with_constructor(latency_histogram),
            probe_failures: Family::default(),
            passive_failures: Family::default(),
            sessions_reaped: Family::default(),
            registry_refusals: Counter::default(),
            limited: Family::default(),
            registry_up: Gauge::default(),
            registry_errors: Counter::default(),
            registry_cached: Gauge::default(),
            hygiene_lease: Gauge::default(),
            registry: Registry::default(),
            dirs: Vec::new(),
            streamed_frames: Family::default(),
            req_cache: Default::default(),
            duration_cache: Default::default(),
            totals: Totals::default(),
        };
        let mut m = m;
        m.dirs = DIRECTIONS
            .iter()
            .map(|&direction| {
                let l = DirLabels { direction };
                (
                    direction,
                    m.frames.get_or_create(&l).clone(),
                    m.frame_bytes.get_or_create(&l).clone(),
                )
            })
            .collect();
        // Born at 0 for the same reason as the failover counters (see `render`): the TLS
        // alert looks at its increase.
        let _ = m.bad_frames.get_or_create(&ReasonLabels {
            reason: "tls_handshake",
        });
        registry.register(
            "connections",
            "Client connections accepted",
            m.connections_total.clone(),
        );
        registry.register(
            "connections_active",
            "Client connections open now",
            m.connections_active.clone(),
        );
        registry.register(
            "connections_max",
            "Cap on concurrent client connections per listener (limits.max_connections)",
            m.connections_max.clone(),
        );
        registry.register(
            "requests",
            "Client requests by route class and result",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Client request latency through the proxy",
            m.request_duration.clone(),
        );
        registry.register(
            "frame_bytes",
            "Frame body bytes by direction",
            m.frame_bytes.clone(),
        );
        registry.register("frames", "Frames by direction", m.frames.clone());
        registry.register(
            "streamed_frames",
            "Frames forwarded as they arrived, too big to hold, by the direction they came in",
            m.streamed_frames.clone(),
        );
        registry.register(
            "bad_frames",
            "Frames refused, by reason",
            m.bad_frames.clone(),
        );
        registry.register(
            "backend_sessions",
            "Live sessions per backend",
            m.sessions.clone(),
        );
        registry.register(
            "backend_state",
            "Backend state (0 up, 1 draining, 2 down)",
            m.backend_state.clone(),
        );
        registry.register(
            "backend_transitions",
            "Backend state transitions",
            m.backend_transitions.clone(),
        );
        registry.register(
            "backend_links",
            "Upstream links open per backend",
            m.backend_links.clone(),
        );
        registry.register(
            "failovers",
            "Sessions moved to another backend by failover, by old backend",
            m.failovers.clone(),
        );
        registry.register(
            "managed_restarts",
            "Managed CLIs started again, by backend and reason (exited, rolling)",
            m.managed_restarts.clone(),
        );
        registry.register(
            "failover_failures",
            "Sessions that could not fail over, by old backend",
            m.failover_failures.clone(),
        );
        registry.register(
            "health_probe_duration_seconds",
            "Active health probe latency",
            m.probe_duration.clone(),
        );
        registry.register(
            "health_probe_failures",
            "Active health probe failures",
            m.probe_failures.clone(),
        );
        registry.register(
            "passive_failures",
            "Failures seen on live traffic (refused, reset, timeout)",
            m.passive_failures.clone(),
        );
        registry.register(
            "sessions_deleted",
            "Sessions deleted by copilot-lb (max_session_age, max_idle, admin)",
            m.sessions_reaped.clone(),
        );
        registry.register(
            "registry_refusals",
            "Requests refused (retryable) because the session registry could not answer",
            m.registry_refusals.clone(),
        );
        registry.register(
            "limited_requests",
            "Requests refused (retryable) by a limit: tenant rate, tenant turns, backend turns",
            m.limited.clone(),
        );
        registry.register(
            "registry_up",
            "Whether the session registry's last operation succeeded (1) or not (0)",
            m.registry_up.clone(),
        );
        registry.register(
            "registry_errors",
            "Session registry operations that failed or timed out",
            m.registry_errors.clone(),
        );
        registry.register(
            "registry_cached_sessions",
            "Sessions in this replica's cache of the registry",
            m.registry_cached.clone(),
        );
        registry.register(
            "hygiene_lease_held",
            "Whether this replica holds the hygiene lease and reaps idle and old sessions for the fleet (1) or not (0)",
            m.hygiene_lease.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts one request outcome.
    pub fn request(&self, class: &'static str, result: &'static str) {
        let labels = || ReqLabels { class, result };
        match (position(&CLASSES, class), position(&RESULTS, result)) {
            (Some(c), Some(r)) => self.req_cache[c][r]
                .get_or_init(|| self.requests.get_or_create(&labels()).clone())
                .inc(),
            _ => self.requests.get_or_create(&labels()).inc(),
        };
        bump(&self.totals.requests);
        match result {
            "proxy_error" => bump(&self.totals.refused),
            "error" => bump(&self.totals.backend_errors),
            _ => {}
        }
    }

    /// The totals the status page's history samples.
    pub(crate) fn totals(&self) -> crate::history::Counts {
        let t = &self.totals;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        crate::history::Counts {
            requests: get(&t.requests),
            refused: get(&t.refused),
            backend_errors: get(&t.backend_errors),
            failovers: get(&t.failovers),
            failover_failures: get(&t.failover_failures),
            health_failures: get(&t.health_failures),
            bad_frames: get(&t.bad_frames),
        }
    }

    /// Counts one frame.
    pub fn frame(&self, direction: &'static str, bytes: usize) {
        if let Some((_, n, b)) = self.dirs.iter().find(|(d, _, _)| *d == direction) {
            n.inc();
            b.inc_by(bytes as u64);
            return;
        }
        let l = DirLabels { direction };
        self.frames.get_or_create(&l).inc();
        self.frame_bytes.get_or_create(&l).inc_by(bytes as u64);
    }

    /// Counts one request outcome and, for a reply the backend gave, its latency.
    pub fn reply(&self, class: &'static str, result: &'static str, started: std::time::Instant) {
        self.request(class, result);
        let secs = started.elapsed().as_secs_f64();
        match position(&CLASSES, class) {
            Some(c) => self.duration_cache[c]
                .get_or_init(|| {
                    self.request_duration
                        .get_or_create(&ClassLabels { class })
                        .clone()
                })
                .observe(secs),
            None => self
                .request_duration
                .get_or_create(&ClassLabels { class })
                .observe(secs),
        }
    }

    /// Counts a frame forwarded as it arrived (`client_in` or `backend_in`).
    pub fn streamed(&self, direction: &'static str) {
        self.streamed_frames
            .get_or_create(&DirLabels { direction })
            .inc();
    }

    /// Counts a frame the proxy refused.
    pub fn bad_frame(&self, reason: &'static str) {
        self.bad_frames
            .get_or_create(&ReasonLabels { reason })
            .inc();
        bump(&self.totals.bad_frames);
    }

    /// Counts a session moved off `from` by failover.
    pub fn failover(&self, from: &str) {
        self.failovers.get_or_create(&backend(from)).inc();
        bump(&self.totals.failovers);
    }

    /// Counts a managed CLI started again.
    pub fn managed_restart(&self, b: &str, reason: &'static str) {
        self.managed_restarts
            .get_or_create(&RestartLabels {
                backend: b.to_string(),
                reason,
            })
            .inc();
    }

    /// Counts a session that could not fail over from `from`.
    pub fn failover_failed(&self, from: &str) {
        self.failover_failures.get_or_create(&backend(from)).inc();
        bump(&self.totals.failover_failures);
    }

    /// Counts a failure seen on live traffic, by kind (refused, reset, timeout, …).
    pub fn passive_failure(&self, b: &str, kind: &'static str) {
        self.passive_failures
            .get_or_create(&FailureLabels {
                backend: b.to_string(),
                kind,
            })
            .inc();
        bump(&self.totals.health_failures);
    }

    /// Records one active probe.
    pub fn probe(&self, b: &str, result: Result<std::time::Duration, ()>) {
        match result {
            Ok(d) => self
                .probe_duration
                .get_or_create(&backend(b))
                .observe(d.as_secs_f64()),
            Err(()) => {
                self.probe_failures.get_or_create(&backend(b)).inc();
                bump(&self.totals.health_failures);
            }
        }
    }

    /// Counts a backend state transition.
    pub fn transition(&self, b: &str, to: &'static str) {
        self.backend_transitions
            .get_or_create(&TransitionLabels {
                backend: b.to_string(),
                to,
            })
            .inc();
    }

    /// Counts a session deleted by the proxy.
    pub fn session_deleted(&self, reason: &'static str) {
        self.sessions_reaped
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a request refused because the registry could not answer.
    pub fn registry_refusal(&self) {
        self.registry_refusals.inc();
    }

    /// Counts a request refused by a noisy-neighbour limit (`rate`, `tenant_turns`,
    /// `backend_turns`).
    pub fn limited(&self, limit: &'static str) {
        self.limited
            .get_or_create(&ReasonLabels { reason: limit })
            .inc();
    }

    /// Counts a client connection opened.
    pub fn connection_opened(&self) {
        self.connections_total.inc();
        self.connections_active.inc();
    }

    /// Records the listeners' connection cap, so alerts can compare `connections_active`
    /// with it instead of repeating the config.
    pub fn set_connections_max(&self, max: usize) {
        self.connections_max
            .set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    /// Counts a client connection closed.
    pub fn connection_closed(&self) {
        self.connections_active.dec();
    }

    /// Renders the Prometheus text format, with the backend gauges as of now.
    pub fn render(
        &self,
        backends: impl IntoIterator<Item = BackendGauges>,
        registry: RegistryGauges,
    ) -> String {
        self.registry_up.set(i64::from(registry.up));
        self.registry_cached.set(registry.cached as i64);
        self.hygiene_lease.set(i64::from(registry.lease_held));
        self.registry_errors
            .inner()
            .store(registry.errors, std::sync::atomic::Ordering::Relaxed);
        // Rebuilt whole, so a backend removed by a reload leaves no stale series behind.
        self.sessions.clear();
        self.backend_state.clear();
        self.backend_links.clear();
        for g in backends {
            let l = backend(&g.backend);
            // Alerts use increase() on these: a series born at its first failure (already 1, or
            // 5 when five sessions are lost at once) never "increases", so they start at 0.
            let _ = self.failovers.get_or_create(&l);
            let _ = self.failover_failures.get_or_create(&l);
            self.sessions.get_or_create(&l).set(g.sessions as i64);
            self.backend_state.get_or_create(&l).set(g.state);
            self.backend_links.get_or_create(&l).set(g.links as i64);
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

fn backend(name: &str) -> BackendLabels {
    BackendLabels {
        backend: name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges(name: &str) -> BackendGauges {
        BackendGauges {
            backend: name.into(),
            sessions: 0,
            state: 0,
            links: 0,
        }
    }

    #[test]
    fn alerting_counters_exist_at_zero_before_their_first_event() {
        let m = Metrics::new();
        m.set_connections_max(10_000);
        let out = m.render([gauges("cli-1")], RegistryGauges::default());
        for line in [
            "copilot_lb_failovers_total{backend=\"cli-1\"} 0",
            "copilot_lb_failover_failures_total{backend=\"cli-1\"} 0",
            "copilot_lb_bad_frames_total{reason=\"tls_handshake\"} 0",
            "copilot_lb_connections_max 10000",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line:?} in\n{out}");
        }
        m.failover_failed("cli-1");
        let out = m.render([gauges("cli-1")], RegistryGauges::default());
        assert!(out.contains("copilot_lb_failover_failures_total{backend=\"cli-1\"} 1"));
    }
}
