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

/// One frame's body as a writer sends it: whole, or with one byte range (an id) replaced.
/// A rewritten id costs three slices of the same buffer instead of a copy of the body: for a
/// 32 MiB frame that copy and its fresh pages were a tenth of the time through the proxy.
///
/// A frame too big to hold also has a `tail`: the rest of its body, copied from where it
/// arrives (see [`crate::codec::Item::Head`]) as it arrives.
#[derive(Debug, Default)]
pub struct Frame {
    parts: [Bytes; 3],
    tail: Option<Streamed>,
}

/// The rest of a streamed body: `len` bytes that arrive on `rx`. A channel closed before
/// `len` bytes came means the frame was cut off on purpose (see [`CUT`]).
#[derive(Debug)]
pub struct Streamed {
    /// Bytes still to come.
    pub len: usize,
    /// Where they come from.
    pub rx: mpsc::Receiver<Bytes>,
}

/// The error a writer returns when a streamed frame's tail ended early: the sender cut it
/// off. A socket write never fails with this kind, so the caller can tell it from one.
pub const CUT: std::io::ErrorKind = std::io::ErrorKind::InvalidData;

impl Frame {
    /// The body as it is.
    pub fn whole(body: Bytes) -> Frame {
        Frame {
            parts: [body, Bytes::new(), Bytes::new()],
            tail: None,
        }
    }

    /// `body` with the bytes in `span` replaced by `with`.
    pub fn spliced(body: &Bytes, span: (usize, usize), with: Bytes) -> Frame {
        Frame {
            parts: [body.slice(..span.0), with, body.slice(span.1..)],
            tail: None,
        }
    }

    /// This frame's start, followed by `tail`.
    pub fn then(mut self, tail: Streamed) -> Frame {
        self.tail = Some(tail);
        self
    }

    /// Length of the body on the wire.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum::<usize>() + self.tail.as_ref().map_or(0, |t| t.len)
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Bytes> for Frame {
    fn from(b: Bytes) -> Frame {
        Frame::whole(b)
    }
}

impl From<Vec<u8>> for Frame {
    fn from(b: Vec<u8>) -> Frame {
        Frame::whole(Bytes::from(b))
    }
}

impl From<String> for Frame {
    fn from(b: String) -> Frame {
        Frame::whole(Bytes::from(b))
    }
}

/// Writes framed bodies from `rx` until the channel closes or a write fails.
pub async fn writer<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::Receiver<Bytes>,
) -> std::io::Result<()> {
    writer_with(w, &mut rx, |b| Some(Frame::whole(b))).await
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
    F: FnMut(T) -> Option<Frame>,
{
    let mut buf: Vec<u8> = Vec::new();
    while let Some(item) = rx.recv().await {
        let Some(mut body) = prepare(item) else {
            continue;
        };
        if body.len() > COPY_LIMIT || body.tail.is_some() {
            write_big(&mut w, &mut body).await?;
            w.flush().await?;
            continue;
        }
        buf.clear();
        append(&mut buf, &body);
        while buf.len() < BATCH_LIMIT {
            let more = match rx.try_recv() {
                Ok(item) => match prepare(item) {
                    Some(b) => Ok(b),
                    None => continue,
                },
                Err(e) => Err(e),
            };
            match more {
                Ok(more) if more.len() <= COPY_LIMIT && more.tail.is_none() => {
                    append(&mut buf, &more)
                }
                Ok(mut more) => {
                    w.write_all(&buf).await?;
                    buf.clear();
                    write_big(&mut w, &mut more).await?;
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

fn append(buf: &mut Vec<u8>, f: &Frame) {
    write_header(buf, f.len());
    for p in &f.parts {
        buf.extend_from_slice(p);
    }
}

/// Header and parts in vectored writes until all are out: no copy of a big body. Then the
/// tail, chunk by chunk as it arrives.
async fn write_big<W: AsyncWrite + Unpin>(w: &mut W, body: &mut Frame) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(32);
    write_header(&mut head, body.len());
    write_slices(
        w,
        &mut [&head, &body.parts[0], &body.parts[1], &body.parts[2]],
    )
    .await?;
    let Some(tail) = &mut body.tail else {
        return Ok(());
    };
    let mut chunks: Vec<Bytes> = Vec::new();
    while tail.len > 0 {
        // What has arrived goes out in one write, not a write per read.
        chunks.clear();
        match tail.rx.recv().await {
            Some(c) => chunks.push(c),
            None => return Err(std::io::Error::new(CUT, "a streamed frame was cut off")),
        }
        while let Ok(c) = tail.rx.try_recv() {
            chunks.push(c);
        }
        let n: usize = chunks.iter().map(Bytes::len).sum();
        // More than promised would desynchronise the stream: never written.
        if n > tail.len {
            return Err(std::io::Error::new(CUT, "a streamed frame ran long"));
        }
        tail.len -= n;
        let mut slices: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
        write_slices(w, &mut slices).await?;
    }
    Ok(())
}

/// Writes every slice, vectored, however the writer splits them.
async fn write_slices<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: &mut [&[u8]],
) -> std::io::Result<()> {
    let mut first = 0;
    while first < parts.len() {
        if parts[first].is_empty() {
            first += 1;
            continue;
        }
        let slices: Vec<IoSlice<'_>> = parts[first..]
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        for p in parts[first..].iter_mut() {
            let take = n.min(p.len());
            *p = &p[take..];
            n -= take;
            if n == 0 {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Takes at most `max` bytes per write, so every partial-write branch runs.
    struct Trickle {
        out: Vec<u8>,
        max: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut left = self.max;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(left);
                self.out.extend_from_slice(&b[..take]);
                left -= take;
                n += take;
                if left == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_header(&mut v, body.len());
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn spliced_frames_go_out_as_if_copied_big_or_small() {
        let small = Bytes::from_static(br#"{"jsonrpc":"2.0","id":7,"result":1}"#);
        let mut big = br#"{"jsonrpc":"2.0","id":7,"result":""#.to_vec();
        big.resize(COPY_LIMIT + 1000, b'x');
        big.extend_from_slice(b"\"}");
        let big = Bytes::from(big);
        for max in [1, 7, 4096, usize::MAX] {
            let (tx, mut rx) = mpsc::channel(8);
            for b in [&small, &big, &small] {
                let f = Frame::spliced(b, (22, 23), Bytes::from_static(b"12345"));
                tx.send(f).await.unwrap();
            }
            drop(tx);
            let mut w = Trickle {
                out: Vec::new(),
                max,
            };
            writer_with(&mut w, &mut rx, Some).await.unwrap();
            let mut want = Vec::new();
            for b in [&small, &big, &small] {
                want.extend(framed(&crate::envelope::splice(b, (22, 23), b"12345")));
            }
            assert_eq!(w.out.len(), want.len(), "max {max}");
            assert!(w.out == want, "max {max}");
        }
    }

    #[tokio::test]
    async fn a_streamed_tail_follows_its_head_and_a_cut_one_fails() {
        let head = Bytes::from_static(br#"{"jsonrpc":"2.0","id":7,"result":"ab"#);
        for (chunks, ok) in [
            (vec![&b"cd"[..], b"ef\"}"], true),
            (vec![&b"cd"[..]], false),
            (vec![&b"cdef\"}xx"[..]], false),
        ] {
            let (ctx, crx) = mpsc::channel(4);
            let (tx, mut rx) = mpsc::channel(4);
            let f = Frame::spliced(&head, (22, 23), Bytes::from_static(b"99"))
                .then(Streamed { len: 6, rx: crx });
            tx.send(f).await.unwrap();
            tx.send(Frame::whole(Bytes::from_static(b"{}")))
                .await
                .unwrap();
            drop(tx);
            for c in chunks {
                ctx.send(Bytes::copy_from_slice(c)).await.unwrap();
            }
            drop(ctx);
            let mut w = Trickle {
                out: Vec::new(),
                max: 5,
            };
            let res = writer_with(&mut w, &mut rx, Some).await;
            if ok {
                res.unwrap();
                let mut want = framed(br#"{"jsonrpc":"2.0","id":99,"result":"abcdef"}"#);
                want.extend(framed(b"{}"));
                assert_eq!(
                    String::from_utf8_lossy(&w.out),
                    String::from_utf8_lossy(&want)
                );
            } else {
                assert_eq!(res.unwrap_err().kind(), CUT);
            }
        }
    }
}
