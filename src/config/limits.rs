//! How the process runs: event loops (`runtime:`), resource limits (`limits:`) and logging
//! (`log:`).

use super::values::Millis;
use serde::Deserialize;
use std::time::Duration;

/// How the data path is run.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Event-loop threads serving client connections; 0 means one per CPU.
    #[serde(default)]
    pub threads: usize,
    /// After the last frame, keep polling sockets this long instead of sleeping; 0 is off.
    #[serde(default)]
    pub busy_poll: Option<Millis>,
}

/// Resource limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame body accepted from either side, in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// Largest header block, in bytes.
    #[serde(default = "default_max_header")]
    pub max_header_bytes: usize,
    /// Concurrent client connections; further ones wait in the accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TCP connect timeout towards backends.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Millis,
    /// Time a backend has to answer the proxy's own `connect`.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Millis,
    /// On SIGTERM, the absolute deadline for in-flight requests before connections are cut.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Millis,
    /// Deepest nesting of arrays and objects accepted in a client frame (serde_json's own
    /// limit is 128); deeper frames get -32700 from the proxy and never reach a backend.
    #[serde(default = "default_max_json_depth")]
    pub max_json_depth: usize,
    /// Bytes of replies and events that may wait for one client to read them; past that the
    /// client's own links stop reading (backpressure to the CLI), so a client that does not
    /// read costs bounded memory. A frame larger than this waits alone.
    #[serde(default = "default_max_queued_reply_bytes")]
    pub max_queued_reply_bytes: usize,
    /// Frames with a longer body are streamed: forwarded once their envelope is read, the
    /// rest copied as it arrives (checked on the way) instead of held whole. 0 never streams.
    #[serde(default = "default_stream_above_bytes")]
    pub stream_above_bytes: usize,
}

impl LimitsConfig {
    /// The body length past which frames are streamed (`usize::MAX`: never).
    pub fn stream_above(&self) -> usize {
        match self.stream_above_bytes {
            0 => usize::MAX,
            n => n,
        }
    }
}

fn default_stream_above_bytes() -> usize {
    256 * 1024
}

fn default_max_queued_reply_bytes() -> usize {
    64 * 1024 * 1024
}

fn default_max_json_depth() -> usize {
    128
}

fn default_shutdown_timeout() -> Millis {
    Millis(Duration::from_secs(30))
}

fn default_max_frame() -> usize {
    crate::codec::DEFAULT_MAX_FRAME_BYTES
}
fn default_max_header() -> usize {
    crate::codec::DEFAULT_MAX_HEADER_BYTES
}
fn default_max_connections() -> usize {
    10_000
}
fn default_connect_timeout() -> Millis {
    Millis(Duration::from_secs(3))
}
fn default_handshake_timeout() -> Millis {
    Millis(Duration::from_secs(5))
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: default_max_frame(),
            max_header_bytes: default_max_header(),
            max_connections: default_max_connections(),
            connect_timeout: default_connect_timeout(),
            handshake_timeout: default_handshake_timeout(),
            shutdown_timeout: default_shutdown_timeout(),
            max_json_depth: default_max_json_depth(),
            max_queued_reply_bytes: default_max_queued_reply_bytes(),
            stream_above_bytes: default_stream_above_bytes(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as `info` or `copilot_lb=debug`; `RUST_LOG` wins if set.
    #[serde(default)]
    pub level: Option<String>,
}
