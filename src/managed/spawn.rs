//! Starting one managed CLI: its command line and scrubbed environment (pure), and the one
//! long-lived thread every child is forked from.
//!
//! The kernel sends the parent-death signal when the *thread* that forked a child exits, not
//! the process: a child forked from a tokio blocking-pool thread would be killed when that
//! idle thread is retired. So every guardian is forked by one dedicated thread that lives as
//! long as the supervisor.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// What one start of one CLI needs. No `Debug`: its environment holds the token.
#[derive(Clone)]
pub(crate) struct Launch {
    /// The guardian's executable (this copilot-lb binary).
    pub(crate) guard_exe: PathBuf,
    /// The CLI's executable and arguments, proxy's own flags included.
    pub(crate) argv: Vec<OsString>,
    /// The whole environment of the CLI (nothing else is inherited).
    pub(crate) env: Vec<(OsString, OsString)>,
    /// Its working directory.
    pub(crate) cwd: PathBuf,
    /// Time the CLI has to exit after SIGTERM.
    pub(crate) grace: Duration,
}

/// The CLI's argument list: the operator's `args`, then what the proxy needs: headless, on
/// loopback, on the port it chose, never updating itself, logging into its own home.
pub(crate) fn cli_argv(command: &Path, args: &[String], port: u16, home: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![command.into()];
    v.extend(args.iter().map(OsString::from));
    for a in ["--headless", "--host", "127.0.0.1", "--port"] {
        v.push(a.into());
    }
    v.push(port.to_string().into());
    v.push("--no-auto-update".into());
    v.push("--log-dir".into());
    v.push(home.join("logs").into());
    v
}

/// The CLI's environment, built from nothing: `PATH`, `HOME` and the locale of the proxy,
/// its own `COPILOT_HOME`, the connection token, a marker naming its pool, and exactly the
/// variables the operator listed in `env_pass` that are set. `lookup` reads the proxy's
/// environment (a parameter, so the rule is testable).
pub(crate) fn cli_env(
    lookup: impl Fn(&str) -> Option<OsString>,
    pass: &[String],
    home: &Path,
    token: &str,
    marker: &str,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = Vec::new();
    let path = lookup("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    env.push(("PATH".into(), path));
    // HOME stays the operator's: the CLI keeps its unpacked runtime under it, ~200 MB that
    // every CLI of the pool shares instead of unpacking its own.
    env.push(("HOME".into(), lookup("HOME").unwrap_or_else(|| home.into())));
    // Not secrets, and where the shared runtime lives.
    for v in [
        "LANG",
        "LC_ALL",
        "TMPDIR",
        "TZ",
        "COPILOT_CACHE_HOME",
        "XDG_CACHE_HOME",
    ] {
        if let Some(x) = lookup(v) {
            env.push((v.into(), x));
        }
    }
    env.push(("COPILOT_HOME".into(), home.into()));
    env.push(("COPILOT_AUTO_UPDATE".into(), "false".into()));
    env.push(("NO_COLOR".into(), "1".into()));
    env.push(("COPILOT_CONNECTION_TOKEN".into(), token.into()));
    env.push(("COPILOT_LB_POOL".into(), marker.into()));
    for v in pass {
        if let Some(x) = lookup(v) {
            env.push((v.into(), x));
        }
    }
    env
}

/// A started guardian.
pub(crate) struct Started {
    pub(crate) child: tokio::process::Child,
}

type Reply = tokio::sync::oneshot::Sender<std::io::Result<Started>>;

/// The thread that forks every guardian (see the module comment).
pub(crate) struct Spawner {
    tx: std::sync::Mutex<mpsc::Sender<(Launch, Reply)>>,
}

impl Spawner {
    /// Starts the thread; children are registered with `rt`'s process driver.
    pub(crate) fn start(rt: tokio::runtime::Handle) -> std::io::Result<Spawner> {
        let (tx, rx) = mpsc::channel::<(Launch, Reply)>();
        std::thread::Builder::new()
            .name("copilot-lb-spawner".into())
            .spawn(move || {
                let _enter = rt.enter();
                // Ends when the supervisor (the only sender) is dropped, after its children.
                while let Ok((launch, reply)) = rx.recv() {
                    let _ = reply.send(fork(&launch));
                }
            })?;
        Ok(Spawner {
            tx: std::sync::Mutex::new(tx),
        })
    }

    /// Starts one guardian and its CLI.
    pub(crate) async fn spawn(&self, launch: Launch) -> std::io::Result<Started> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((launch, reply));
        if sent.is_err() {
            return Err(std::io::Error::other("the spawner thread has stopped"));
        }
        rx.await
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawner thread has stopped")))
    }
}

fn fork(l: &Launch) -> std::io::Result<Started> {
    let mut cmd = tokio::process::Command::new(&l.guard_exe);
    cmd.arg(super::guard::SUBCOMMAND)
        .arg("--parent")
        .arg(std::process::id().to_string())
        .arg("--grace-ms")
        .arg(l.grace.as_millis().to_string())
        .arg("--")
        .args(&l.argv)
        .env_clear()
        .envs(l.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&l.cwd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Its own group: a Ctrl-C at the terminal reaches the proxy only, which stops the
        // pool in order, instead of every CLI at once.
        .process_group(0);
    // No kill_on_drop: a SIGKILLed guardian could not take the CLI's group with it. A
    // guardian whose proxy is gone gets its parent-death SIGTERM and stops the group itself.
    Ok(Started {
        child: cmd.spawn()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_carries_only_what_is_named() {
        let proxy_env = |k: &str| -> Option<OsString> {
            match k {
                "PATH" => Some("/opt/bin:/usr/bin".into()),
                "HOME" => Some("/home/op".into()),
                "COPILOT_GITHUB_TOKEN" => Some("gho_secret".into()),
                "AWS_SECRET_ACCESS_KEY" => Some("nope".into()),
                "ADMIN_TOKEN" => Some("nope".into()),
                _ => None,
            }
        };
        let pass = vec!["COPILOT_GITHUB_TOKEN".to_string(), "UNSET_ONE".to_string()];
        let env = cli_env(proxy_env, &pass, Path::new("/pool/cli-1"), "tok", "/pool");
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
        };
        assert_eq!(get("PATH").as_deref(), Some("/opt/bin:/usr/bin"));
        assert_eq!(get("HOME").as_deref(), Some("/home/op"));
        assert_eq!(get("COPILOT_HOME").as_deref(), Some("/pool/cli-1"));
        assert_eq!(get("COPILOT_CONNECTION_TOKEN").as_deref(), Some("tok"));
        assert_eq!(get("COPILOT_GITHUB_TOKEN").as_deref(), Some("gho_secret"));
        assert_eq!(get("COPILOT_LB_POOL").as_deref(), Some("/pool"));
        for absent in ["AWS_SECRET_ACCESS_KEY", "ADMIN_TOKEN", "UNSET_ONE"] {
            assert_eq!(get(absent), None, "{absent}");
        }
    }

    #[test]
    fn the_proxy_owns_the_listening_flags() {
        let v = cli_argv(
            Path::new("copilot"),
            &["--log-level".into(), "debug".into()],
            41001,
            Path::new("/pool/cli-1"),
        );
        let v: Vec<String> = v.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert_eq!(
            v,
            [
                "copilot",
                "--log-level",
                "debug",
                "--headless",
                "--host",
                "127.0.0.1",
                "--port",
                "41001",
                "--no-auto-update",
                "--log-dir",
                "/pool/cli-1/logs"
            ]
        );
    }
}
