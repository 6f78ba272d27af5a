//! One bodiless GET or POST over HTTP/1.1 with hyper's client connection (no pool: one
//! request per command, or two for `status`). The caller bounds the whole exchange with its
//! timeout, if it wants one.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

/// Why a request failed before a status code (or the whole body) could be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    /// TCP connect failed (refused, unreachable, name not resolved).
    #[error("{0}")]
    Connect(std::io::Error),
    /// The HTTP exchange broke (closed early, not HTTP).
    #[error("{0}")]
    Hyper(hyper::Error),
    /// The request could not be built (a header value with control characters).
    #[error("invalid request: {0}")]
    Request(hyper::http::Error),
    /// The body is larger than the limit.
    #[error("reply too large")]
    TooLarge,
}

/// `GET path` on `addr`, with `Authorization: Bearer` when a token is given. Returns the status
/// code and the body (at most `max_body` bytes).
pub(crate) async fn get(
    addr: &str,
    path: &str,
    token: Option<&str>,
    max_body: usize,
) -> Result<(u16, Bytes), HttpError> {
    request(hyper::Method::GET, addr, path, token, max_body).await
}

/// `POST path` with an empty body; otherwise as [`get`].
pub(crate) async fn post(
    addr: &str,
    path: &str,
    token: Option<&str>,
    max_body: usize,
) -> Result<(u16, Bytes), HttpError> {
    request(hyper::Method::POST, addr, path, token, max_body).await
}

async fn request(
    method: hyper::Method,
    addr: &str,
    path: &str,
    token: Option<&str>,
    max_body: usize,
) -> Result<(u16, Bytes), HttpError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(HttpError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(HttpError::Hyper)?;
    // The connection task ends when the request is answered and `send` drops, or with the
    // runtime when the caller's timeout fires.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder()
        .method(method.clone())
        .uri(path)
        .header(hyper::header::HOST, addr)
        .header(
            hyper::header::USER_AGENT,
            concat!("copilot-lb/", env!("CARGO_PKG_VERSION")),
        );
    // hyper sends no length for an empty body; some servers and proxies answer a POST
    // without one with 411.
    if method == hyper::Method::POST {
        req = req.header(hyper::header::CONTENT_LENGTH, 0);
    }
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    // Only invalid header values fail here (target.rs already refuses such tokens).
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(HttpError::Request)?;
    let resp = send.send_request(req).await.map_err(HttpError::Hyper)?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(h) => HttpError::Hyper(*h),
            Err(_) => HttpError::TooLarge,
        })?
        .to_bytes();
    Ok((status, body))
}
