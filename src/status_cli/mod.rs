//! `copilot-lb status` and `copilot-lb sessions`: the admin API as terminal tables (or its JSON)
//! for operators who live in a shell.
//!
//! The flow is plain: resolve where the admin API is and which token to send (`target`), fetch
//! with one bounded HTTP/1.1 client (`http`), render (`render`, pure). Every failure is a
//! [`StatusError`] with its own exit code, so scripts can tell "proxy not running" from "token
//! missing" from "proxy answered nonsense".
//!
//! `copilot-lb restart` reuses the same client for its one POST ([`admin_post`]), unbounded in
//! time: a rolling restart takes as long as its CLIs need.

mod http;
mod render;
mod target;

use crate::config::{ConfigError, DurationError};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

/// The flags both commands share (`--admin`, `--config`, the token source, `--timeout`).
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// Admin API HOST:PORT (default: the config's admin.listen, else 127.0.0.1:9464).
    #[arg(long)]
    pub admin: Option<String>,
    /// Config to read admin.listen and admin.token_env from (default: $COPILOT_LB_CONFIG,
    /// ./config/copilot-lb.yaml or /etc/copilot-lb/copilot-lb.yaml, when present).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Environment variable holding the admin token (default: the config's admin.token_env,
    /// then COPILOT_LB_ADMIN_TOKEN). The token itself is never a flag: flags land in shell history.
    #[arg(long)]
    pub token_env: Option<String>,
    /// File holding the admin token (used when the environment variable is unset or empty).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Bound on the whole exchange with the admin API (e.g. 500ms, 5s).
    #[arg(long, default_value = "5s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Print the admin API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_timeout(s: &str) -> Result<Duration, DurationError> {
    let d = crate::config::parse_duration(s)?;
    if d.is_zero() || d > crate::config::MAX_DURATION {
        return Err(DurationError::Invalid(s.into()));
    }
    Ok(d)
}

/// What to show.
#[derive(Debug, Clone, Copy)]
pub enum View {
    /// Backends and the session registry.
    Status,
    /// One page of sessions.
    Sessions {
        /// First session (in session-id order).
        offset: usize,
        /// At most this many (1..=10000, the admin API's page limit).
        limit: usize,
    },
}

/// The admin API's largest page of sessions.
pub const MAX_PAGE: usize = 10_000;

/// Largest reply accepted: a full page of sessions is a few MiB; anything far beyond is not
/// the admin API.
const MAX_BODY: usize = 64 << 20;

/// Why a status command failed. Exit codes: 2 bad input (flags, config, token file), 3 the
/// admin API could not be reached (refused, timeout, broken exchange), 4 the token was missing
/// or refused, 5 the admin API answered something unexpected.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The config file could not be read or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A bad `--admin` or admin.listen address.
    #[error("admin address {addr:?}: {reason}")]
    Address {
        /// The address given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A bad `--limit`.
    #[error("--limit must be between 1 and {MAX_PAGE} (the admin API's page size), got {0}")]
    Limit(usize),
    /// The token file could not be read.
    #[error("admin token file {path}: {source}")]
    TokenFile {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The token file holds nothing.
    #[error("admin token file {path} is empty")]
    TokenFileEmpty {
        /// The file.
        path: String,
    },
    /// The token holds characters an HTTP header cannot carry.
    #[error("the admin token from {from} contains control characters")]
    TokenInvalid {
        /// `$NAME` or `file PATH`.
        from: String,
    },
    /// Nothing accepted the connection.
    #[error("cannot connect to the admin API at {addr}: {source} (is copilot-lb running with admin.listen {addr}? --admin HOST:PORT names another)")]
    Connect {
        /// Where.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No complete answer in time.
    #[error("the admin API at {addr} did not answer within {after:?} (--timeout)")]
    Timeout {
        /// Where.
        addr: String,
        /// The bound.
        after: Duration,
    },
    /// The HTTP exchange broke.
    #[error("HTTP exchange with the admin API at {addr} failed: {source}")]
    Http {
        /// Where.
        addr: String,
        /// The cause.
        source: hyper::Error,
    },
    /// 401 or 403.
    #[error("the admin API at {addr} answered GET {path} with {status}: {hint}")]
    Unauthorized {
        /// Where.
        addr: String,
        /// The route.
        path: String,
        /// 401 or 403.
        status: u16,
        /// What to do about it (names the token source, never the token).
        hint: String,
    },
    /// Any other non-200 answer.
    #[error("the admin API at {addr} answered GET {path} with HTTP {status}: {body}")]
    Status {
        /// Where.
        addr: String,
        /// The route.
        path: String,
        /// The status code.
        status: u16,
        /// The start of the body, control characters escaped.
        body: String,
    },
    /// A reply that is not the admin API's: not HTTP, not its JSON, too large.
    #[error("the admin API at {addr} answered GET {path} unexpectedly: {reason}")]
    Reply {
        /// Where.
        addr: String,
        /// The route.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// The runtime for the client could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

impl StatusError {
    /// The process exit code for this error (see the type's documentation).
    pub fn exit_code(&self) -> u8 {
        match self {
            StatusError::Runtime(_) => 1,
            StatusError::Config(_)
            | StatusError::Address { .. }
            | StatusError::Limit(_)
            | StatusError::TokenFile { .. }
            | StatusError::TokenFileEmpty { .. }
            | StatusError::TokenInvalid { .. } => 2,
            StatusError::Connect { .. }
            | StatusError::Timeout { .. }
            | StatusError::Http { .. } => 3,
            StatusError::Unauthorized { .. } => 4,
            StatusError::Status { .. } | StatusError::Reply { .. } => 5,
        }
    }
}

/// Why `copilot-lb restart`'s POST got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// Nothing accepted the connection.
    #[error("cannot reach the admin API at {addr}")]
    Connect {
        /// Where.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// What came back was not an HTTP answer, or the exchange broke before one.
    #[error("the admin API sent no HTTP status")]
    NoStatus(hyper::Error),
    /// The request could not be built (a token with control characters).
    #[error("invalid request: {0}")]
    Request(hyper::http::Error),
    /// The answer was larger than any the admin API sends.
    #[error("reply too large")]
    TooLarge,
    /// The runtime for the client could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// `POST path` to the admin API at `addr` (with `Authorization: Bearer` when a token is
/// given), waiting as long as the answer takes. Returns the status code and the body.
pub fn admin_post(addr: &str, path: &str, token: Option<&str>) -> Result<(u16, String), PostError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(PostError::Runtime)?;
    let (status, body) = rt
        .block_on(http::post(addr, path, token, MAX_BODY))
        .map_err(|e| match e {
            http::HttpError::Connect(source) => PostError::Connect {
                addr: addr.to_string(),
                source,
            },
            http::HttpError::Hyper(e) => PostError::NoStatus(e),
            http::HttpError::Request(e) => PostError::Request(e),
            http::HttpError::TooLarge => PostError::TooLarge,
        })?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Runs one view against the admin API and returns what to print (a table, or JSON).
pub fn run(view: View, args: &AdminArgs) -> Result<String, StatusError> {
    if let View::Sessions { limit, .. } = view {
        if limit == 0 || limit > MAX_PAGE {
            return Err(StatusError::Limit(limit));
        }
    }
    let target = target::resolve(args, |k| std::env::var(k).ok())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StatusError::Runtime)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let work = async {
        match view {
            View::Status => status_view(&target, args.json, now_ms).await,
            View::Sessions { offset, limit } => {
                sessions_view(&target, args.json, offset, limit).await
            }
        }
    };
    rt.block_on(async {
        tokio::time::timeout(args.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(StatusError::Timeout {
                    addr: target.addr.clone(),
                    after: args.timeout,
                })
            })
    })
}

/// `status`: `/api/backends` and `/api/registry`; `--json` prints
/// `{"backends": [...], "registry": {...}}`, each exactly as the API sent it.
async fn status_view(t: &target::Target, json: bool, now_ms: u64) -> Result<String, StatusError> {
    let mut backends = get_json(t, "/api/backends").await?;
    let registry = get_json(t, "/api/registry").await?;
    let list = backends
        .get_mut("backends")
        .filter(|b| b.is_array())
        .map(Value::take)
        .ok_or_else(|| reply_error(t, "/api/backends", "no \"backends\" array"))?;
    if json {
        let v = serde_json::json!({"backends": list, "registry": registry});
        return Ok(format!("{v:#}\n"));
    }
    let b: Vec<render::BackendRow> = parse(t, "/api/backends", list)?;
    let r: render::RegistryRow = parse(t, "/api/registry", registry)?;
    Ok(render::status(&t.addr, &b, &r, now_ms))
}

/// `sessions`: one page of `/api/sessions`; `--json` prints the API's reply unchanged.
async fn sessions_view(
    t: &target::Target,
    json: bool,
    offset: usize,
    limit: usize,
) -> Result<String, StatusError> {
    let path = format!("/api/sessions?offset={offset}&limit={limit}");
    let raw = get_body(t, &path).await?;
    let page: Value = decode(t, &path, &raw)?;
    if json {
        // Byte for byte what the API sent (checked to be JSON above).
        let text = String::from_utf8_lossy(&raw);
        return Ok(if text.ends_with('\n') {
            text.into_owned()
        } else {
            format!("{text}\n")
        });
    }
    let p: render::SessionsPage = parse(t, "/api/sessions", page)?;
    Ok(render::sessions(&p))
}

async fn get_json(t: &target::Target, path: &str) -> Result<Value, StatusError> {
    let body = get_body(t, path).await?;
    decode(t, path, &body)
}

fn decode(t: &target::Target, path: &str, body: &[u8]) -> Result<Value, StatusError> {
    serde_json::from_slice(body).map_err(|e| reply_error(t, path, &e.to_string()))
}

/// The body of a 200 answer; any other status is an error naming what to do.
async fn get_body(t: &target::Target, path: &str) -> Result<bytes::Bytes, StatusError> {
    let token = t.token.as_ref().map(|k| k.value.as_str());
    let (status, body) = http::get(&t.addr, path, token, MAX_BODY)
        .await
        .map_err(|e| match e {
            http::HttpError::Connect(source) => StatusError::Connect {
                addr: t.addr.clone(),
                source,
            },
            // Something answered, but not in HTTP: the address is another service's (often
            // the client listener instead of the admin one).
            http::HttpError::Hyper(source) if source.is_parse() => reply_error(
                t,
                path,
                &format!(
                    "not an HTTP reply ({source}); is {} the admin listener?",
                    t.addr
                ),
            ),
            http::HttpError::Hyper(source) => StatusError::Http {
                addr: t.addr.clone(),
                source,
            },
            http::HttpError::Request(e) => reply_error(t, path, &format!("request not built: {e}")),
            http::HttpError::TooLarge => {
                reply_error(t, path, &format!("larger than {MAX_BODY} bytes"))
            }
        })?;
    match status {
        200 => Ok(body),
        401 | 403 => Err(StatusError::Unauthorized {
            addr: t.addr.clone(),
            path: path.into(),
            status,
            hint: t.token_hint(),
        }),
        _ => Err(StatusError::Status {
            addr: t.addr.clone(),
            path: path.into(),
            status,
            body: render::clean(&String::from_utf8_lossy(&body[..body.len().min(300)]))
                .trim()
                .to_string(),
        }),
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    t: &target::Target,
    path: &str,
    v: Value,
) -> Result<T, StatusError> {
    serde_json::from_value(v).map_err(|e| reply_error(t, path, &e.to_string()))
}

fn reply_error(t: &target::Target, path: &str, reason: &str) -> StatusError {
    StatusError::Reply {
        addr: t.addr.clone(),
        path: path.split('?').next().unwrap_or(path).into(),
        reason: reason.into(),
    }
}
