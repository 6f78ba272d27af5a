//! Talking to a backend on a connection of the proxy's own or a link's: the proxy's
//! `connect` handshake with the backend's token, one request and its reply, and the typed
//! failures passive health tells apart.

use super::Backend;
use crate::codec::{CodecError, FrameReader};
use crate::tls::{BoxRead, BoxWrite, DialError, DialErrorKind};
use serde_json::Value;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// What kind of failure a backend showed, for passive health, metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Nothing listens there.
    Refused,
    /// The connection was reset.
    Reset,
    /// No answer in time.
    Timeout,
    /// TLS refused (certificate, protocol, name).
    Tls,
    /// The socket connected to itself.
    SelfConnect,
    /// The backend closed the connection.
    Closed,
    /// The backend spoke something other than the CLI's protocol, or refused the proxy's
    /// `connect` (a wrong token).
    Protocol,
    /// Anything else at the socket level.
    Io,
}

impl FailureKind {
    /// A short stable name, for labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::Reset => "reset",
            FailureKind::Timeout => "timeout",
            FailureKind::Tls => "tls",
            FailureKind::SelfConnect => "self_connect",
            FailureKind::Closed => "closed",
            FailureKind::Protocol => "protocol",
            FailureKind::Io => "io",
        }
    }

    fn of_io(e: &std::io::Error) -> FailureKind {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => FailureKind::Refused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => FailureKind::Reset,
            K::TimedOut => FailureKind::Timeout,
            K::UnexpectedEof => FailureKind::Closed,
            _ => FailureKind::Io,
        }
    }
}

/// A failed exchange with a backend.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Connecting (or the TLS handshake) failed.
    #[error("connect: {0}")]
    Dial(#[from] DialError),
    /// Writing failed.
    #[error("write: {0}")]
    Write(std::io::Error),
    /// Reading failed.
    #[error("read: {0}")]
    Read(CodecError),
    /// The backend closed the connection.
    #[error("backend closed the connection")]
    Closed,
    /// A reply that is not JSON.
    #[error("bad reply: {0}")]
    BadReply(serde_json::Error),
    /// The backend refused the proxy's `connect` (its token).
    #[error("backend refused the proxy's connect: {code} {message}")]
    Refused {
        /// JSON-RPC error code.
        code: i64,
        /// Its message.
        message: String,
    },
    /// The backend answered `ping` with an error.
    #[error("ping failed: {0}")]
    Ping(String),
    /// No answer in time.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
}

impl CallError {
    /// The kind of failure, for passive health.
    pub fn kind(&self) -> FailureKind {
        match self {
            CallError::Dial(d) => match d.kind() {
                DialErrorKind::Refused => FailureKind::Refused,
                DialErrorKind::Reset => FailureKind::Reset,
                DialErrorKind::Timeout => FailureKind::Timeout,
                DialErrorKind::Tls => FailureKind::Tls,
                DialErrorKind::SelfConnect => FailureKind::SelfConnect,
                DialErrorKind::Io => FailureKind::Io,
            },
            CallError::Write(e) => FailureKind::of_io(e),
            CallError::Read(CodecError::Io(e)) => FailureKind::of_io(e),
            CallError::Read(CodecError::UnexpectedEof) | CallError::Closed => FailureKind::Closed,
            CallError::Read(_) | CallError::BadReply(_) | CallError::Refused { .. } => {
                FailureKind::Protocol
            }
            CallError::Ping(_) => FailureKind::Protocol,
            CallError::Timeout { .. } => FailureKind::Timeout,
        }
    }
}

/// Sends one request on a connection of the proxy's own and waits for the reply with that id,
/// skipping anything else the backend sends meanwhile.
pub async fn request(
    reader: &mut FrameReader<BoxRead>,
    w: &mut BoxWrite,
    id: u64,
    method: &str,
    params: &Value,
) -> Result<Value, CallError> {
    let frame = crate::codec::encode_frame(&crate::rpc::request(id, method, params));
    w.write_all(&frame).await.map_err(CallError::Write)?;
    // A TLS stream may hold the records until flushed.
    w.flush().await.map_err(CallError::Write)?;
    loop {
        let f = reader
            .read_frame()
            .await
            .map_err(CallError::Read)?
            .ok_or(CallError::Closed)?;
        let Ok(env) = crate::envelope::parse_backend(&f) else {
            continue;
        };
        if env.kind == crate::envelope::Kind::Response && env.id_u64() == Some(id) {
            return serde_json::from_slice(&f).map_err(CallError::BadReply);
        }
    }
}

impl Backend {
    /// The proxy's own `connect` on a fresh connection, with this backend's token (never a
    /// client's). It must complete before anything else: a CLI with a token answers earlier
    /// requests with AUTHENTICATION_REQUIRED, and it serves requests concurrently.
    pub async fn handshake(
        &self,
        reader: &mut FrameReader<BoxRead>,
        w: &mut BoxWrite,
        telemetry: bool,
    ) -> Result<(), CallError> {
        let mut params = serde_json::Map::new();
        if let Some(t) = self.token() {
            params.insert("token".into(), Value::String(t.as_str().to_string()));
        }
        if telemetry {
            params.insert("enableGitHubTelemetryForwarding".into(), Value::Bool(true));
        }
        if self.edge {
            // Asks an edge to announce its shutdown on this link instead of just closing it.
            params.insert(crate::rpc::GOAWAY_OPT_IN.into(), Value::Bool(true));
        }
        let v = request(reader, w, 0, "connect", &Value::Object(params)).await?;
        if let Some(err) = v.get("error") {
            let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
            if code == crate::rpc::METHOD_NOT_FOUND {
                // A legacy CLI without `connect`: accepted, as the SDKs do.
                return Ok(());
            }
            let message = err.get("message").and_then(Value::as_str).unwrap_or("");
            return Err(CallError::Refused {
                code,
                message: message.to_string(),
            });
        }
        if let Some(ver) = v.pointer("/result/version").and_then(Value::as_str) {
            self.set_version(ver);
        }
        Ok(())
    }

    /// Dials this backend (TLS if configured) and performs the proxy's `connect`.
    pub async fn open(&self) -> Result<(FrameReader<BoxRead>, BoxWrite), CallError> {
        let (r, mut w) = crate::tls::dial(&self.address, self.tls.as_deref(), None).await?;
        let mut reader = FrameReader::new(r, Default::default());
        self.handshake(&mut reader, &mut w, false).await?;
        Ok((reader, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn failures_are_told_apart() {
        let io = |k| CallError::Write(Error::from(k));
        assert_eq!(io(ErrorKind::ConnectionReset).kind(), FailureKind::Reset);
        assert_eq!(io(ErrorKind::BrokenPipe).kind(), FailureKind::Reset);
        assert_eq!(
            io(ErrorKind::ConnectionRefused).kind(),
            FailureKind::Refused
        );
        assert_eq!(io(ErrorKind::Other).kind(), FailureKind::Io);
        let read = CallError::Read(CodecError::Io(Error::from(ErrorKind::ConnectionReset)));
        assert_eq!(read.kind(), FailureKind::Reset);
        assert_eq!(CallError::Closed.kind(), FailureKind::Closed);
        assert_eq!(
            CallError::Read(CodecError::UnexpectedEof).kind(),
            FailureKind::Closed
        );
        assert_eq!(
            CallError::Read(CodecError::MissingContentLength).kind(),
            FailureKind::Protocol
        );
        let refused = CallError::Refused {
            code: -32002,
            message: "bad token".into(),
        };
        assert_eq!(refused.kind(), FailureKind::Protocol);
        assert_eq!(
            refused.to_string(),
            "backend refused the proxy's connect: -32002 bad token"
        );
        let t = CallError::Timeout {
            what: "the probe",
            after: Duration::from_millis(500),
        };
        assert_eq!(t.kind(), FailureKind::Timeout);
        assert_eq!(t.to_string(), "the probe timed out after 500ms");
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let e = crate::tls::dial(&addr, None, Some(Duration::from_secs(2)))
            .await
            .err()
            .expect("nothing listens");
        assert_eq!(CallError::from(e).kind(), FailureKind::Refused);
    }
}
