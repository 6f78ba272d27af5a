//! Socket plumbing shared by client and backend connections: socket options and the writer
//! task that frames bodies and coalesces small frames into one write.

use crate::codec::write_header;
use bytes::Bytes;
use std::io::IoSlice;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Frames above this size are written with a vectored write instead of being copied.
const COPY_LIMIT: usize = 64 * 1024;
/// Upper bound on one coalesced write.
const BATCH_LIMIT: usize = 256 * 1024;

/// Sets TCP_NODELAY: every frame is one buffer, so Nagle only adds latency.
pub fn tune(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// Sends the ACK the kernel is holding back, at once. SDKs write the header and body of a
/// frame in two writes without TCP_NODELAY, so Nagle holds the body until the header is
/// acknowledged; a delayed ACK would stall it ~40 ms. Called only when a read left a partial
/// frame: keeping the socket in quick-ACK mode all the time costs a syscall per frame and an
/// extra ACK segment per request for clients that write whole frames.
#[cfg(target_os = "linux")]
pub fn quickack(stream: &tokio::net::tcp::OwnedReadHalf) {
    let _ = socket2::SockRef::from(stream.as_ref()).set_tcp_quickack(true);
}

/// No-op where TCP_QUICKACK does not exist.
#[cfg(not(target_os = "linux"))]
pub fn quickack(_stream: &tokio::net::tcp::OwnedReadHalf) {}

/// Writes framed bodies from `rx` until the channel closes or a write fails.
pub async fn writer<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::Receiver<Bytes>,
) -> std::io::Result<()> {
    writer_with(w, &mut rx, Some).await
}

/// Like [`writer`], but turns each queued item into a body with `prepare` just before it is
/// written (`None` skips it). Links use this to assign upstream ids at send time.
pub async fn writer_with<W, T, F>(
    mut w: W,
    rx: &mut mpsc::Receiver<T>,
    mut prepare: F,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    F: FnMut(T) -> Option<Bytes>,
{
    let mut buf: Vec<u8> = Vec::new();
    while let Some(item) = rx.recv().await {
        let Some(body) = prepare(item) else { continue };
        if body.len() > COPY_LIMIT {
            write_big(&mut w, &body).await?;
            w.flush().await?;
            continue;
        }
        buf.clear();
        write_header(&mut buf, body.len());
        buf.extend_from_slice(&body);
        while buf.len() < BATCH_LIMIT {
            let more = match rx.try_recv() {
                Ok(item) => match prepare(item) {
                    Some(b) => Ok(b),
                    None => continue,
                },
                Err(e) => Err(e),
            };
            match more {
                Ok(more) if more.len() <= COPY_LIMIT => {
                    write_header(&mut buf, more.len());
                    buf.extend_from_slice(&more);
                }
                Ok(more) => {
                    w.write_all(&buf).await?;
                    buf.clear();
                    write_big(&mut w, &more).await?;
                }
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            w.write_all(&buf).await?;
        }
        // A TLS stream may hold encrypted records until flushed; with nothing written after
        // the last frame they would sit there forever (a no-op on plain TCP).
        w.flush().await?;
        // Keep the buffer while frames keep coming; release it when the queue runs dry so an
        // idle connection holds no write buffer.
        if rx.is_empty() {
            buf = Vec::new();
        }
    }
    w.shutdown().await.ok();
    Ok(())
}

async fn write_big<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(32);
    write_header(&mut head, body.len());
    let (mut h, mut b) = (&head[..], body);
    while !h.is_empty() {
        let n = w
            .write_vectored(&[IoSlice::new(h), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        if n < h.len() {
            h = &h[n..];
        } else {
            b = &b[n - h.len()..];
            h = &[];
        }
    }
    w.write_all(b).await
}
