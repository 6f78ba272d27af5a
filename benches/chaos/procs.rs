//! Child processes (copilot-lb, fake backends), `/proc` readings and the admin API.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process, killed (SIGKILL) and reaped on drop.
pub struct Proc {
    /// For messages.
    pub name: String,
    /// The child.
    pub child: Child,
}

impl Proc {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9` and reap now.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process cannot die of SIGKILL until continued on some kernels' views of
        // job control; SIGKILL works on stopped processes on Linux, SIGCONT is harmless.
        signal(self.pid(), "CONT");
        self.kill9();
    }
}

/// Sends a signal (`STOP`, `CONT`, `KILL`, ...) with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A free port on 127.0.0.1 now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The copilot-lb binary: `$COPILOT_LB_BIN`, else `fallback`.
pub fn lb_bin(fallback: &str) -> PathBuf {
    std::env::var("COPILOT_LB_BIN")
        .ok()
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(fallback))
}

/// A running copilot-lb.
pub struct Lb {
    /// The process.
    pub proc: Proc,
    /// Its client listener.
    pub listen: SocketAddr,
    /// Its admin listener.
    pub admin: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
}

/// Starts `copilot-lb serve --config` with the YAML `body` (listener and admin added here)
/// and waits until `/readyz` says ready (20 s bound).
pub fn spawn_lb(bin: &Path, body: &str, dir: &Path) -> std::io::Result<Lb> {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let yaml = format!("listeners:\n  - listen: {listen}\nadmin:\n  listen: {admin}\n{body}");
    let cfg = dir.join("copilot-lb.yaml");
    std::fs::write(&cfg, yaml)?;
    let log = dir.join("copilot-lb.log");
    // The default embedded registry file lands in the working directory (an older build under
    // comparison may not know `--state-path`).
    let child = Command::new(bin)
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .map_err(|e| std::io::Error::other(format!("{}: {e}", bin.display())))?;
    let proc = Proc {
        name: "copilot-lb".into(),
        child,
    };
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((200, _)) = http(admin, "GET", "/readyz") {
            break;
        }
        if Instant::now() >= until {
            return Err(std::io::Error::other(format!(
                "copilot-lb not ready within 20 s (log {})",
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Lb {
        proc,
        listen,
        admin,
        log,
    })
}

/// Starts `<this binary> fake-cli --port P --storage DIR --name N` and waits for `READY`.
pub fn spawn_front(port: u16, storage: &Path, name: &str, log: &Path) -> std::io::Result<Proc> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["fake-cli", "--port", &port.to_string(), "--name", name])
        .arg("--storage")
        .arg(storage)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)?,
        )
        .spawn()?;
    let mut line = String::new();
    let out = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout"))?;
    BufReader::new(out).read_line(&mut line)?;
    let mut p = Proc {
        name: name.into(),
        child,
    };
    if !line.starts_with("READY") {
        p.kill9();
        return Err(std::io::Error::other(format!(
            "fake-cli {name} said {line:?} (log {})",
            log.display()
        )));
    }
    Ok(p)
}

/// One HTTP/1.0 request to the admin API: (status, body). 3 s bound.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Some((status, body.to_string()))
}

/// `GET /api/backends`: name → state (`up`, `down`, `draining`).
pub fn backend_states(admin: SocketAddr) -> Option<Vec<(String, String)>> {
    let (_, body) = http(admin, "GET", "/api/backends")?;
    let v: Value = serde_json::from_str(&body).ok()?;
    Some(
        v["backends"]
            .as_array()?
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap_or("").to_string(),
                    b["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect(),
    )
}

/// The state of one backend per the admin API.
pub fn backend_state(admin: SocketAddr, name: &str) -> Option<String> {
    backend_states(admin)?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s)
}

/// `GET /api/sessions` (all pages): session id → backend.
pub fn placements(admin: SocketAddr) -> Option<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for page in 0..100 {
        let (_, body) = http(
            admin,
            "GET",
            &format!("/api/sessions?offset={}&limit=10000", page * 10_000),
        )?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let list = v["sessions"].as_array()?;
        for s in list {
            out.insert(
                s["session_id"].as_str().unwrap_or("").to_string(),
                s["backend"].as_str().unwrap_or("").to_string(),
            );
        }
        if list.len() < 10_000 {
            break;
        }
    }
    Some(out)
}

/// `GET /metrics`.
pub fn metrics(admin: SocketAddr) -> Option<String> {
    http(admin, "GET", "/metrics").map(|x| x.1)
}

/// Sum of every sample of metric `name` (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// `Threads:` of `/proc/PID/status`.
pub fn threads(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("Threads:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Polls `f` every 50 ms until it is true or `limit` passes; returns the time it took.
pub async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}
