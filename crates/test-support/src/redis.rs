//! A real `redis-server` on a loopback port for one test, killed when dropped. It never
//! persists anything (`--save ""`, no AOF), so a restart comes back empty, as a Redis without
//! persistence does in production. [`SentinelGroup`]: a master, a replica and one sentinel
//! (the same binary with `--sentinel`) that fails over within a few seconds.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// More `--name value` arguments (replication, passwords).
    extra: Vec<String>,
}

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The binary is not installed.
    #[error("redis-server is not installed (scripts/install-test-deps.sh installs it): {0}")]
    Missing(std::io::Error),
    /// It did not answer PING in time.
    #[error("redis-server on port {0} did not answer PING within 10 s")]
    NoAnswer(u16),
    /// A port could not be found.
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
    /// The sentinel group's directory or config file could not be written.
    #[error("sentinel group files: {0}")]
    Files(std::io::Error),
    /// The group did not reach its starting state in time.
    #[error("sentinel group not ready within {secs} s: {what}")]
    NotReady {
        /// What was waited for.
        what: &'static str,
        /// The bound.
        secs: u64,
    },
}

fn free_port() -> Result<u16, RedisError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(RedisError::Port)?;
    Ok(l.local_addr().map_err(RedisError::Port)?.port())
}

fn pong(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    // A server with `requirepass` answers -NOAUTH: up, all the same.
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && (&buf == b"+PONG\r\n" || &buf == b"-NOAUTH")
}

impl RedisServer {
    /// Starts one on a free loopback port and waits until it answers.
    pub fn start() -> Result<RedisServer, RedisError> {
        RedisServer::start_with(Vec::new())
    }

    /// Starts one with more `--name value` arguments.
    pub fn start_with(extra: Vec<String>) -> Result<RedisServer, RedisError> {
        let mut s = RedisServer {
            child: None,
            port: free_port()?,
            extra,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), RedisError> {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .args(["--dir", &std::env::temp_dir().display().to_string()])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(RedisError::Missing)?;
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if pong(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(RedisError::NoAnswer(self.port))
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id (0 when it is not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// Stalls it (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Kills it (data and all).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills it and starts an empty one on the same port.
    pub fn restart_empty(&mut self) -> Result<(), RedisError> {
        self.kill();
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// `redis-cli` against a loopback port: the command's output, or "" when it fails.
fn cli(port: u16, password: Option<&str>, args: &[&str]) -> String {
    let mut c = Command::new("redis-cli");
    c.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(pw) = password {
        c.args(["-a", pw, "--no-auth-warning"]);
    }
    c.args(args).stdin(Stdio::null()).stderr(Stdio::null());
    match c.output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => String::new(),
    }
}

/// Polls `ok` every 50 ms until it holds or `secs` pass.
fn wait_for(what: &'static str, secs: u64, mut ok: impl FnMut() -> bool) -> Result<(), RedisError> {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(RedisError::NotReady { what, secs })
}

/// A Redis replication group under one sentinel, all on loopback: a master, a replica of it
/// (`--replicaof`), and a sentinel monitoring them with quorum 1, `down-after-milliseconds`
/// 500 and a short failover timeout, so a killed master is replaced within a few seconds.
/// Everything is killed and its directory removed when dropped.
pub struct SentinelGroup {
    /// The master at start.
    pub master: RedisServer,
    /// Its replica at start (the master after a failover).
    pub replica: RedisServer,
    sentinel: Option<Child>,
    sentinel_port: u16,
    dir: std::path::PathBuf,
    password: Option<String>,
    sentinel_password: Option<String>,
}

impl SentinelGroup {
    /// The name the sentinel monitors the master under.
    pub const MASTER_NAME: &'static str = "mymaster";

    /// Starts the group; `password` is the data nodes' (`requirepass`, `masterauth`, the
    /// sentinel's `auth-pass`), `sentinel_password` the sentinel's own `requirepass`. Returns
    /// once the replica is in sync and the sentinel knows it (so it can fail over to it).
    pub fn start(
        password: Option<&str>,
        sentinel_password: Option<&str>,
    ) -> Result<SentinelGroup, RedisError> {
        let dir =
            std::env::temp_dir().join(format!("copilot-lb-sentinel-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).map_err(RedisError::Files)?;
        let mut auth = Vec::new();
        if let Some(pw) = password {
            for k in ["--requirepass", "--masterauth"] {
                auth.push(k.to_string());
                auth.push(pw.to_string());
            }
        }
        // No delay before a full sync (the default waits 5 s for more replicas).
        // A directory of the group's own (a replica writes the RDB it receives there).
        let mut common = vec![
            "--repl-diskless-sync-delay".to_string(),
            "0".to_string(),
            "--dir".to_string(),
            dir.display().to_string(),
        ];
        common.extend(auth);
        let master = RedisServer::start_with(common.clone())?;
        let mut replica_args = common;
        replica_args.extend([
            "--replicaof".to_string(),
            "127.0.0.1".to_string(),
            master.port().to_string(),
        ]);
        let replica = RedisServer::start_with(replica_args)?;
        let mut g = SentinelGroup {
            master,
            replica,
            sentinel: None,
            sentinel_port: free_port()?,
            dir,
            password: password.map(str::to_string),
            sentinel_password: sentinel_password.map(str::to_string),
        };
        let (rp, pw) = (g.replica.port(), g.password.clone());
        wait_for("replica in sync", 10, || {
            cli(rp, pw.as_deref(), &["INFO", "replication"]).contains("master_link_status:up")
        })?;
        let name = Self::MASTER_NAME;
        let mut conf = format!(
            "port {}\nbind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {} 1\n\
             sentinel down-after-milliseconds {name} 500\nsentinel failover-timeout {name} 3000\n\
             sentinel parallel-syncs {name} 1\n",
            g.sentinel_port,
            g.dir.display(),
            g.master.port()
        );
        if let Some(pw) = password {
            conf.push_str(&format!("sentinel auth-pass {name} {pw}\n"));
        }
        if let Some(pw) = sentinel_password {
            conf.push_str(&format!("requirepass {pw}\n"));
        }
        // The sentinel rewrites its config file, so it is one of its own.
        let path = g.dir.join("sentinel.conf");
        std::fs::write(&path, conf).map_err(RedisError::Files)?;
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(bin)
            .arg(&path)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(RedisError::Missing)?;
        g.sentinel = Some(child);
        let (sp, spw) = (g.sentinel_port, g.sentinel_password.clone());
        wait_for("sentinel knows the replica", 15, || {
            let out = cli(sp, spw.as_deref(), &["SENTINEL", "replicas", name]);
            let lines: Vec<&str> = out.lines().collect();
            let field = |k: &str| {
                lines
                    .windows(2)
                    .find(|w| w[0] == k)
                    .map(|w| w[1].to_string())
            };
            field("flags").as_deref() == Some("slave")
                && field("master-link-status").as_deref() == Some("ok")
        })?;
        Ok(g)
    }

    /// The sentinel's `host:port`.
    pub fn sentinel_addr(&self) -> String {
        format!("127.0.0.1:{}", self.sentinel_port)
    }

    /// The port of the master the sentinel names now, if it names one.
    pub fn master_port(&self) -> Option<u16> {
        let out = cli(
            self.sentinel_port,
            self.sentinel_password.as_deref(),
            &["SENTINEL", "get-master-addr-by-name", Self::MASTER_NAME],
        );
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// Waits until the replica has applied every write the master took so far (its
    /// replication offset reached the master's), so what was written survives losing the
    /// master.
    pub fn wait_replicated(&self) -> Result<(), RedisError> {
        let pw = self.password.as_deref();
        let offset = |port: u16, field: &str| -> Option<u64> {
            let out = cli(port, pw, &["INFO", "replication"]);
            out.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().parse().ok())
        };
        let Some(want) = offset(self.master.port(), "master_repl_offset:") else {
            return Err(RedisError::NotReady {
                what: "the master's replication offset",
                secs: 0,
            });
        };
        let rp = self.replica.port();
        wait_for("replica caught up with the master", 5, || {
            offset(rp, "slave_repl_offset:").is_some_and(|o| o >= want)
        })
    }
}

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        if let Some(mut c) = self.sentinel.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.master.kill();
        self.replica.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
