//! The guardian: a small copilot-lb process between the proxy and each managed CLI
//! (`copilot-lb managed-child`), so that nothing outlives the proxy, not even on SIGKILL.
//!
//! The kernel's parent-death signal (`PR_SET_PDEATHSIG`) can only be set by a process on
//! itself, which the proxy cannot do for a child without `unsafe` code between fork and exec.
//! The guardian sets it on itself (through rustix's safe API) before it starts the CLI, in a
//! process group of its own: when the proxy dies, however, the guardian gets SIGTERM and kills
//! that whole group, so the CLI's own children (shell tools, MCP servers) die with it. The
//! guardian is also how the supervisor stops a CLI: SIGTERM to the guardian, which gives the
//! group `grace` to exit, then SIGKILLs it.

use rustix::process::{Pid, Signal};
use std::ffi::OsString;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// The hidden subcommand the supervisor starts.
pub const SUBCOMMAND: &str = "managed-child";

/// Why the guardian could not run its CLI.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The arguments were not `--parent PID --grace-ms MS -- COMMAND [ARGS…]`.
    #[error("usage: copilot-lb {SUBCOMMAND} --parent PID --grace-ms MS -- COMMAND [ARGS...] (started by copilot-lb's managed pool, not by hand)")]
    Usage,
    /// The parent-death signal could not be set.
    #[error("cannot set the parent-death signal: {0}")]
    Pdeathsig(std::io::Error),
    /// The proxy that started it is already gone.
    #[error("the copilot-lb process that started this guardian has exited")]
    Orphaned,
    /// The CLI could not be started.
    #[error("cannot start {command}: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The runtime or signal handlers could not be set up.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

struct GuardArgs {
    parent: i32,
    grace: Duration,
    argv: Vec<OsString>,
}

fn parse(args: Vec<OsString>) -> Result<GuardArgs, GuardError> {
    let mut it = args.into_iter();
    let (mut parent, mut grace) = (None, None);
    loop {
        let a = it.next().ok_or(GuardError::Usage)?;
        match a.to_str() {
            Some("--parent") => {
                parent = it.next().and_then(|v| v.to_str()?.parse::<i32>().ok());
            }
            Some("--grace-ms") => {
                grace = it.next().and_then(|v| v.to_str()?.parse::<u64>().ok());
            }
            Some("--") => break,
            _ => return Err(GuardError::Usage),
        }
    }
    let argv: Vec<OsString> = it.collect();
    match (parent, grace, argv.is_empty()) {
        // 1 too: copilot-lb may be a container's init process.
        (Some(p), Some(g), false) if p >= 1 => Ok(GuardArgs {
            parent: p,
            grace: Duration::from_millis(g),
            argv,
        }),
        _ => Err(GuardError::Usage),
    }
}

fn kill_group(pgid: Option<Pid>, sig: Signal) {
    if let Some(p) = pgid {
        // ESRCH (the group is already empty) is the normal case after the CLI exited.
        let _ = rustix::process::kill_process_group(p, sig);
    }
}

/// Runs the guardian with the arguments after the subcommand; returns the exit code (the
/// CLI's own, or 128 + signal as a shell reports it).
pub fn run(args: Vec<OsString>) -> Result<i32, GuardError> {
    let a = parse(args)?;
    rustix::process::set_parent_process_death_signal(Some(Signal::TERM))
        .map_err(|e| GuardError::Pdeathsig(e.into()))?;
    // The proxy may have died between fork and the line above: then no signal will come.
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(a.parent) {
        return Err(GuardError::Orphaned);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let command = a.argv[0].to_string_lossy().into_owned();
        let mut child = tokio::process::Command::new(&a.argv[0])
            .args(&a.argv[1..])
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| GuardError::Spawn { command, source })?;
        let pgid = child
            .id()
            .and_then(|id| Pid::from_raw(i32::try_from(id).ok()?));
        let code = tokio::select! {
            st = child.wait() => {
                let st = st?;
                // The CLI is gone; whatever it started goes with it.
                kill_group(pgid, Signal::KILL);
                exit_code(st)
            }
            _ = term.recv() => stop(&mut child, pgid, a.grace).await,
            _ = int.recv() => stop(&mut child, pgid, a.grace).await,
        };
        Ok(code)
    })
}

async fn stop(child: &mut tokio::process::Child, pgid: Option<Pid>, grace: Duration) -> i32 {
    kill_group(pgid, Signal::TERM);
    let st = tokio::time::timeout(grace, child.wait()).await;
    kill_group(pgid, Signal::KILL);
    match st {
        Ok(Ok(st)) => exit_code(st),
        _ => {
            let _ = child.wait().await;
            128 + 9
        }
    }
}

fn exit_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code()
        .or_else(|| st.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn arguments_are_strict() {
        let a = parse(os(&[
            "--parent",
            "42",
            "--grace-ms",
            "5000",
            "--",
            "copilot",
            "--x",
        ]))
        .unwrap();
        assert_eq!((a.parent, a.grace), (42, Duration::from_secs(5)));
        assert_eq!(a.argv, os(&["copilot", "--x"]));
        for bad in [
            &["--parent", "42", "--grace-ms", "5000", "--"][..],
            &["--parent", "0", "--grace-ms", "5", "--", "c"],
            &["--grace-ms", "5", "--", "c"],
            &["--parent", "x", "--grace-ms", "5", "--", "c"],
            &["--bogus", "--", "c"],
            &[],
        ] {
            assert!(matches!(parse(os(bad)), Err(GuardError::Usage)), "{bad:?}");
        }
    }
}
