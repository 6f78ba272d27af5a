//! The `copilot-lb` command line.
#![forbid(unsafe_code)]

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use copilot_lb::config::{self, Config, Overrides};
use copilot_lb::status_cli::{self, View};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "copilot-lb",
    version,
    about = "Session-aware load balancer for GitHub Copilot CLI servers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy.
    Serve {
        /// YAML config (default: $COPILOT_LB_CONFIG, ./config/copilot-lb.yaml, /etc/copilot-lb/copilot-lb.yaml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Client listener HOST:PORT (replaces the first listener's address).
        #[arg(long)]
        listen: Option<String>,
        /// Backend HOST:PORT, repeatable (replaces the config's backends).
        #[arg(long = "backend")]
        backends: Vec<String>,
        /// Admin API HOST:PORT.
        #[arg(long)]
        admin: Option<String>,
        /// The embedded session registry's file (state.kind embedded; replaces state.path).
        #[arg(long)]
        state_path: Option<PathBuf>,
    },
    /// Validate a config file and explain any errors.
    CheckConfig {
        /// The YAML file.
        file: PathBuf,
    },
    /// Print a session's backend ranking (its failover order).
    Route {
        /// The YAML file.
        #[arg(long, short)]
        config: PathBuf,
        /// Session id.
        session_id: String,
    },
    /// Print the method routing table (what is forwarded, how, and what is refused) as JSON.
    Routes {
        /// Include this config's routing.allow_global / allow_session.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The README's Markdown table instead of JSON.
        #[arg(long)]
        markdown: bool,
    },
    /// Show the backends (state, health, sessions, links, drain) and the session registry.
    Status {
        #[command(flatten)]
        admin: status_cli::AdminArgs,
    },
    /// List the sessions the proxy knows (tenant, backend, age, idle), one page at a time.
    Sessions {
        #[command(flatten)]
        admin: status_cli::AdminArgs,
        /// First session to show (sessions are in id order).
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Sessions per page (at most 10000).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Rolling restart of the managed CLI pool through the admin API (drain, move sessions,
    /// restart, wait healthy, undrain; one CLI at a time). Waits until it is done.
    Restart {
        /// Config whose admin.listen and admin.token_env to use (default: as for serve).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Admin API HOST:PORT (overrides the config's admin.listen).
        #[arg(long)]
        admin: Option<String>,
    },
    /// Print the hash of a client token, for tenants[].token_hashes (reads stdin if no arg).
    HashToken {
        /// The token (prefer stdin so it stays out of shell history).
        token: Option<String>,
    },
}

fn load(path: &Path) -> Result<Config> {
    Ok(Config::load(path)?)
}

/// Prints to stdout; a reader that stops early (`| head`) is not an error.
fn print(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// `status` and `sessions`: their errors carry their own exit codes (see `status_cli`).
fn admin_view(view: View, args: &status_cli::AdminArgs) -> Result<()> {
    match status_cli::run(view, args) {
        Ok(text) => print(&text),
        Err(e) => {
            eprintln!("copilot-lb: {e}");
            std::process::exit(i32::from(e.exit_code()));
        }
    }
}

fn main() -> Result<()> {
    // The guardian of a managed CLI (started by the pool, never by hand): its arguments are
    // the CLI's own command line, which clap must not interpret.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).and_then(|a| a.to_str()) == Some(copilot_lb::managed::guard::SUBCOMMAND) {
        match copilot_lb::managed::guard::run(args[2..].to_vec()) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("copilot-lb {}: {e}", copilot_lb::managed::guard::SUBCOMMAND);
                std::process::exit(2);
            }
        }
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Status { admin } => admin_view(View::Status, &admin),
        Cmd::Sessions {
            admin,
            offset,
            limit,
        } => admin_view(View::Sessions { offset, limit }, &admin),
        Cmd::Serve {
            config: path,
            listen,
            backends,
            admin,
            state_path,
        } => {
            let o = Overrides {
                listen,
                backends,
                admin,
                state_path,
            };
            let flags_only = o.listen.is_some() || !o.backends.is_empty();
            let file = match path {
                Some(p) => Some(p),
                None if flags_only => None,
                None => match config::default_path() {
                    Some(p) => Some(p),
                    None => bail!("no config given and none found at {:?}; use --config FILE or --listen/--backend", config::DEFAULT_CONFIG_PATHS),
                },
            };
            let (cfg, origin) = match &file {
                Some(p) => (load(p)?, p.display().to_string()),
                None => (Config::default(), "command line".to_string()),
            };
            let mut cfg = cfg.apply(&o, &origin)?;
            if cfg.listeners.is_empty() {
                cfg = cfg.apply(
                    &Overrides {
                        listen: Some("127.0.0.1:4321".into()),
                        ..Default::default()
                    },
                    &origin,
                )?;
            }
            copilot_lb::app::init_logging(&cfg);
            // Accepting, health checks and the admin API run here; client connections run on
            // the event loops `app::run` starts (config `runtime`).
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let source = file.map(|f| (f, o.clone()));
            rt.block_on(copilot_lb::app::run(cfg, source))
                .context("copilot-lb failed")?;
            Ok(())
        }
        Cmd::CheckConfig { file } => {
            let cfg = load(&file)?;
            let mut problems = Vec::new();
            for b in &cfg.backends {
                if let Err(e) = Config::backend_token(b) {
                    problems.push(e);
                }
            }
            let pool = cfg
                .managed
                .as_ref()
                .map(|m| format!(", a managed pool of {}", m.count.value))
                .unwrap_or_default();
            println!(
                "{}: ok ({} listener(s), {} backend(s){pool})",
                file.display(),
                cfg.listeners.len(),
                cfg.backends.len()
            );
            for p in &problems {
                println!("warning: {p} (the proxy will refuse to start until it is available)");
            }
            Ok(())
        }
        Cmd::Route {
            config: path,
            session_id,
        } => {
            let cfg = load(&path)?;
            // A managed pool's CLIs rank by their names; their ports are chosen at start.
            let list: Vec<(String, f64, String)> = match &cfg.managed {
                Some(m) => m
                    .names()
                    .into_iter()
                    .map(|n| (n, 1.0, "managed".to_string()))
                    .collect(),
                None => cfg
                    .backends
                    .iter()
                    .map(|b| (b.name().to_string(), b.weight, b.address.value.clone()))
                    .collect(),
            };
            let order = copilot_lb::balance::rank(
                &session_id,
                list.iter().map(|(n, w, _)| (n.as_str(), *w)),
            );
            for (n, i) in order.iter().enumerate() {
                let (name, weight, address) = &list[*i];
                let score = copilot_lb::balance::score(name, *weight, &session_id);
                println!("{}. {name} ({address}) score={score:.6}", n + 1);
            }
            Ok(())
        }
        Cmd::Routes { config, markdown } => {
            let text = if markdown {
                copilot_lb::app::routing_table_markdown()
            } else {
                let routing = match config {
                    Some(p) => load(&p)?.routing,
                    None => Default::default(),
                };
                let table = copilot_lb::app::routing_table(&routing);
                serde_json::to_string_pretty(&table)? + "\n"
            };
            // Piped into `head` or `grep -q`: a reader that stops early is not an error.
            print(&text)
        }
        Cmd::Restart {
            config: path,
            admin,
        } => {
            let file = path.or_else(config::default_path);
            let cfg = match &file {
                Some(p) => Some(load(p)?),
                None => None,
            };
            let admin_cfg = cfg.as_ref().and_then(|c| c.admin.as_ref());
            let addr = match (admin, admin_cfg) {
                (Some(a), _) => a,
                (None, Some(a)) => a.listen.value.clone(),
                (None, None) => {
                    bail!("no admin address: give --admin HOST:PORT or a config with admin.listen")
                }
            };
            let token =
                match admin_cfg.and_then(|a| a.token_env.as_ref()) {
                    Some(var) => Some(std::env::var(var).with_context(|| {
                        format!("admin.token_env names {var}, which is not set")
                    })?),
                    None => None,
                };
            eprintln!("rolling restart of the managed pool via {addr} (one CLI at a time; this takes a while)...");
            let (status, body) =
                status_cli::admin_post(&addr, "/api/backends/restart", token.as_deref())?;
            print!("{body}");
            if status != 200 {
                bail!("rolling restart failed (HTTP {status})");
            }
            Ok(())
        }
        Cmd::HashToken { token } => {
            let token = match token {
                Some(t) => t,
                None => {
                    let mut s = String::new();
                    std::io::stdin().read_line(&mut s)?;
                    s.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            if token.is_empty() {
                bail!("empty token");
            }
            println!("{}", copilot_lb::auth::hash_token(&token));
            Ok(())
        }
    }
}
