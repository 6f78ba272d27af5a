//! A real `redis-server` on a loopback port for one test, killed when dropped. It never
//! persists anything (`--save ""`, no AOF), so a restart comes back empty, as a Redis without
//! persistence does in production.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
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
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl RedisServer {
    /// Starts one on a free loopback port and waits until it answers.
    pub fn start() -> Result<RedisServer, RedisError> {
        let mut s = RedisServer {
            child: None,
            port: free_port()?,
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
