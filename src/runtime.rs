//! Data-plane event loops: one single-threaded tokio runtime per thread. Each client
//! connection is handed to the least-loaded loop and stays there with its upstream links and
//! writer, so a request crosses no thread on its way through (no work stealing, no cross-core
//! wake-ups). Optionally a loop busy-polls for a while after the last frame instead of
//! sleeping in `epoll_wait`: on virtual machines waking a halted vCPU costs tens of
//! microseconds per hop, which dominates loopback latency.

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Errors starting the event loops.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A loop thread or its runtime could not be created.
    #[error("cannot start event loop {index}: {source}")]
    Start {
        /// Loop number.
        index: usize,
        /// Cause.
        source: std::io::Error,
    },
}

struct Lane {
    handle: Handle,
    conns: Arc<AtomicUsize>,
}

/// The event loops serving client connections.
pub struct Loops {
    lanes: Vec<Lane>,
    next: AtomicUsize,
    stop: CancellationToken,
    busy_poll: Duration,
}

impl std::fmt::Debug for Loops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loops")
            .field("threads", &self.lanes.len())
            .field("busy_poll", &self.busy_poll)
            .finish()
    }
}

impl Loops {
    /// Starts `threads` loops (0: one per CPU), each busy-polling for `busy_poll` after its
    /// last frame (zero: never).
    pub fn start(threads: usize, busy_poll: Duration) -> Result<Loops, RuntimeError> {
        let n = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let stop = CancellationToken::new();
        let mut lanes = Vec::with_capacity(n);
        for index in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| RuntimeError::Start { index, source })?;
            let handle = rt.handle().clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("copilot-lb-loop-{index}"))
                .spawn(move || {
                    rt.block_on(async {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = idle(busy_poll) => {}
                        }
                    });
                    // Dropping the runtime cancels the connections still on it.
                    drop(rt);
                })
                .map_err(|source| RuntimeError::Start { index, source })?;
            lanes.push(Lane {
                handle,
                conns: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(Loops {
            lanes,
            next: AtomicUsize::new(0),
            stop,
            busy_poll,
        })
    }

    /// Number of loops.
    pub fn threads(&self) -> usize {
        self.lanes.len()
    }

    /// Connections currently served by each loop.
    pub fn load(&self) -> Vec<usize> {
        self.lanes
            .iter()
            .map(|l| l.conns.load(Ordering::Relaxed))
            .collect()
    }

    /// The loop with the fewest connections; ties go round-robin so bursts of accepts spread.
    fn pick(&self) -> &Lane {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.lanes.len();
        (0..n)
            .map(|i| &self.lanes[(start + i) % n])
            .min_by_key(|l| l.conns.load(Ordering::Relaxed))
            .unwrap_or(&self.lanes[0])
    }

    /// Stops every loop (their connections are dropped).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Runs `serve` for an accepted connection: on the least-loaded loop when there are loops,
/// otherwise as a task on the current runtime (tests, embedding).
pub fn spawn_conn<F, Fut>(loops: Option<&Loops>, stream: TcpStream, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(loops) = loops else {
        tokio::spawn(serve(stream));
        return;
    };
    // A socket belongs to the reactor it was registered with: hand over the raw socket and
    // register it again on the chosen loop.
    let std = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot hand an accepted connection to an event loop");
            return;
        }
    };
    let lane = loops.pick();
    let conns = lane.conns.clone();
    conns.fetch_add(1, Ordering::Relaxed);
    lane.handle.spawn(async move {
        let _count = Count(conns);
        match TcpStream::from_std(std) {
            Ok(s) => serve(s).await,
            Err(e) => warn!(error = %e, "cannot register a connection with its event loop"),
        }
    });
}

struct Count(Arc<AtomicUsize>);

impl Drop for Count {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-thread activity record read by that thread's busy poller.
struct Activity {
    frames: Cell<u64>,
    asleep: Cell<bool>,
    wake: Rc<Notify>,
}

thread_local! {
    static ACTIVITY: Activity = Activity {
        frames: Cell::new(0),
        asleep: Cell::new(false),
        wake: Rc::new(Notify::new()),
    };
}

/// Records that a frame was read on this thread (keeps its loop polling, or wakes it up).
#[inline]
pub fn activity() {
    ACTIVITY.with(|a| {
        a.frames.set(a.frames.get().wrapping_add(1));
        if a.asleep.get() {
            a.asleep.set(false);
            a.wake.notify_one();
        }
    });
}

/// Whether this thread's busy poller is asleep (for tests).
pub fn poller_asleep() -> bool {
    ACTIVITY.with(|a| a.asleep.get())
}

/// The loop's own future: nothing, or the busy poller.
async fn idle(busy_poll: Duration) {
    if busy_poll.is_zero() {
        std::future::pending::<()>().await;
    }
    poll_busily(busy_poll).await;
}

/// While frames keep coming, yield instead of sleeping: a current-thread runtime with a
/// yielded task polls the reactor with a zero timeout rather than blocking in `epoll_wait`,
/// so the next readiness event is seen without a wake-up. After `budget` without a frame it
/// sleeps until the next one.
pub async fn poll_busily(budget: Duration) {
    let wake = ACTIVITY.with(|a| a.wake.clone());
    loop {
        let mut seen = ACTIVITY.with(|a| a.frames.get());
        let mut since = Instant::now();
        loop {
            tokio::task::yield_now().await;
            // Let any other runnable thread on this CPU (the backend, the client) go first:
            // the point is to keep the CPU from halting, not to keep it from others.
            std::thread::yield_now();
            let now = ACTIVITY.with(|a| a.frames.get());
            if now != seen {
                seen = now;
                since = Instant::now();
            } else if since.elapsed() >= budget {
                break;
            }
        }
        let notified = wake.notified();
        ACTIVITY.with(|a| a.asleep.set(true));
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poller_sleeps_when_idle_and_wakes_on_a_frame() {
        // Budget and waits far apart, so a busy CI machine pausing this thread for a few
        // milliseconds cannot flip the outcome.
        let budget = Duration::from_millis(100);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let local = tokio::task::LocalSet::new();
            local
                .run_until(async {
                    tokio::task::spawn_local(poll_busily(budget));
                    // Busy while frames arrive more often than the budget.
                    for _ in 0..20 {
                        activity();
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        assert!(!poller_asleep(), "poller slept despite activity");
                    }
                    tokio::time::sleep(budget * 4).await;
                    assert!(poller_asleep(), "poller still spinning after its budget");
                    activity();
                    assert!(!poller_asleep());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    assert!(!poller_asleep(), "poller slept again at once");
                    // Asleep again only if it resumed spinning after the frame.
                    tokio::time::sleep(budget * 4).await;
                    assert!(poller_asleep(), "poller did not resume after a frame");
                })
                .await;
        });
    }

    #[test]
    fn connections_spread_over_loops_and_are_counted() {
        let loops = Loops::start(2, Duration::ZERO).unwrap();
        assert_eq!(loops.threads(), 2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let mut clients = Vec::new();
            let (tx, mut rx) = tokio::sync::mpsc::channel(8);
            for _ in 0..4 {
                clients.push(TcpStream::connect(addr).await.unwrap());
                let (s, _) = l.accept().await.unwrap();
                let tx = tx.clone();
                spawn_conn(Some(&loops), s, move |mut s| async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let name = std::thread::current().name().unwrap_or("").to_string();
                    tx.send(name).await.unwrap();
                    let mut b = [0u8; 1];
                    // Echo one byte, then hold the connection until the client closes.
                    if s.read_exact(&mut b).await.is_ok() {
                        let _ = s.write_all(&b).await;
                        let _ = s.read(&mut b).await;
                    }
                });
            }
            let mut names = Vec::new();
            for _ in 0..4 {
                names.push(rx.recv().await.unwrap());
            }
            names.sort();
            assert_eq!(
                names,
                vec![
                    "copilot-lb-loop-0",
                    "copilot-lb-loop-0",
                    "copilot-lb-loop-1",
                    "copilot-lb-loop-1"
                ]
            );
            assert_eq!(loops.load(), vec![2, 2]);
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for c in &mut clients {
                c.write_all(b"x").await.unwrap();
                let mut b = [0u8; 1];
                c.read_exact(&mut b).await.unwrap();
                assert_eq!(&b, b"x");
            }
            drop(clients);
            for _ in 0..100 {
                if loops.load() == vec![0, 0] {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(loops.load(), vec![0, 0]);
        });
    }
}
