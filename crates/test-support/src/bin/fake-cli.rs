//! One fake Copilot CLI server as its own process, for tests outside cargo (the status page's
//! browser test kills it with SIGKILL, as a crashed CLI dies).
//!
//! ```text
//! fake-cli [--name NAME] [--port PORT] [--token-env VAR]
//! ```
//!
//! Binds 127.0.0.1:PORT (0, the default, lets the kernel choose), prints `listening ADDR` on
//! stdout, and serves until its stdin closes (so it never outlives the process that started
//! it) or it is killed. `--token-env` names the variable holding the token it requires.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use test_support::fake_cli::{FakeCli, FakeConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The command line, parsed.
struct Args {
    name: String,
    port: u16,
    token: Option<String>,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        name: "fake".into(),
        port: 0,
        token: None,
    };
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--name" => a.name = value,
            "--port" => {
                a.port = value
                    .parse()
                    .map_err(|_| format!("--port {value}: not a port number"))?
            }
            "--token-env" => {
                let t = std::env::var(&value)
                    .map_err(|_| format!("--token-env {value}: the variable is not set"))?;
                if t.is_empty() {
                    return Err(format!("--token-env {value}: the variable is empty"));
                }
                a.token = Some(t);
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "fake-cli: {e}\nusage: fake-cli [--name NAME] [--port PORT] [--token-env VAR]"
            );
            return ExitCode::from(2);
        }
    };
    let cfg = FakeConfig {
        token: args.token,
        addr: Some(SocketAddr::from(([127, 0, 0, 1], args.port))),
        ..FakeConfig::named(args.name)
    };
    let fake = match FakeCli::start(cfg).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fake-cli: {e}");
            return ExitCode::from(1);
        }
    };
    let mut out = tokio::io::stdout();
    let line = format!("listening {}\n", fake.addr());
    if out.write_all(line.as_bytes()).await.is_err() || out.flush().await.is_err() {
        return ExitCode::from(1);
    }
    // Serve until stdin reaches its end (the parent closed it or died).
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = lines.next_line().await {}
    ExitCode::SUCCESS
}
