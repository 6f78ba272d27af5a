//! Content-Length framing for the SDK⇄CLI JSON-RPC stream.
//!
//! Reading is two-phase, as in mini-redis: first check that a whole header block and body are
//! buffered (cheap, no allocation), then split the frame off. Writing always produces exactly
//! `Content-Length: <n>\r\n\r\n` followed by the body in one buffer, because the Python SDK
//! accepts nothing else and one buffer means one `write`.

use bytes::{Buf, Bytes, BytesMut};
use std::pin::Pin;
use tokio::io::AsyncRead;

/// Default cap on one header block.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 8 * 1024;
/// Default cap on one frame body (the CLI itself accepts 256 MiB requests).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;
/// How much of an oversized body is kept to recover its request id for the error reply.
const OVERSIZE_PEEK: usize = 64 * 1024;
/// The longest oversized body that is skipped to keep the stream in sync. A longer one (a
/// `Content-Length: 999999999999`) would take minutes or forever to skip; the connection is
/// closed after the error reply instead.
pub const MAX_SKIP_BYTES: usize = 1 << 30;

/// Framing errors; each says whether the stream can continue.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The header block grew past the limit without a blank line.
    #[error("header block exceeds {limit} bytes")]
    HeaderTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// A header block without a Content-Length header.
    #[error("Header must provide a Content-Length property.")]
    MissingContentLength,
    /// A Content-Length that is not a non-negative decimal integer.
    #[error("invalid Content-Length value {0:?}")]
    InvalidContentLength(String),
    /// A header line that is not `Name: value`.
    #[error("malformed header line {0:?}")]
    MalformedHeader(String),
    /// The body is larger than the limit. Reported as soon as the header is read, so the
    /// sender hears of it before it has sent the body; the next read skips the body, keeping
    /// the stream in sync, unless it is too long to skip (`skippable` false).
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Declared body length.
        len: usize,
        /// The configured limit.
        limit: usize,
        /// The start of the body, as far as it had arrived, to recover the request id.
        head: Bytes,
        /// Whether the body will be skipped (false: the stream cannot continue).
        skippable: bool,
    },
    /// The peer closed the stream in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    UnexpectedEof,
    /// Socket error.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl CodecError {
    /// Whether the stream is still aligned on a frame boundary after this error.
    pub fn recoverable(&self) -> bool {
        matches!(
            self,
            CodecError::FrameTooLarge {
                skippable: true,
                ..
            }
        )
    }
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Maximum header block size in bytes.
    pub max_header: usize,
    /// Maximum body size in bytes.
    pub max_frame: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header: DEFAULT_MAX_HEADER_BYTES,
            max_frame: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// Result of scanning the buffer for a header block.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderScan {
    /// Not enough bytes yet.
    Incomplete,
    /// A complete header: its length in bytes (including the blank line) and the body length.
    Complete {
        /// Bytes taken by the header block including the terminating blank line.
        header_len: usize,
        /// Declared body length.
        body_len: usize,
    },
}

/// Scans `buf` for a complete header block and parses Content-Length (case-insensitive).
///
/// Accepts `\r\n` line endings (and, leniently, bare `\n`), extra headers, and whitespace
/// around the value, as the CLI does.
pub fn scan_header(buf: &[u8], max_header: usize) -> Result<HeaderScan, CodecError> {
    let end = match find_header_end(buf) {
        Some(e) => e,
        None => {
            if buf.len() > max_header {
                return Err(CodecError::HeaderTooLarge { limit: max_header });
            }
            return Ok(HeaderScan::Incomplete);
        }
    };
    let (block_len, total) = end;
    if block_len > max_header {
        return Err(CodecError::HeaderTooLarge { limit: max_header });
    }
    let block = &buf[..block_len];
    let mut length = None;
    for raw in block.split(|b| *b == b'\n') {
        let line = trim_cr(raw);
        if line.is_empty() {
            continue;
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| CodecError::MalformedHeader(lossy(line)))?;
        let name = trim_ascii(&line[..colon]);
        let value = trim_ascii(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            let text = std::str::from_utf8(value)
                .map_err(|_| CodecError::InvalidContentLength(lossy(value)))?;
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CodecError::InvalidContentLength(text.to_string()));
            }
            let n: usize = text
                .parse()
                .map_err(|_| CodecError::InvalidContentLength(text.to_string()))?;
            length = Some(n);
        }
    }
    match length {
        Some(body_len) => Ok(HeaderScan::Complete {
            header_len: total,
            body_len,
        }),
        None => Err(CodecError::MissingContentLength),
    }
}

/// Finds the blank line ending the header block: returns (block length, block + terminator).
fn find_header_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut start = 0;
    while let Some(pos) = memchr::memchr(b'\n', &buf[start..]) {
        let nl = start + pos;
        let next = nl + 1;
        if buf.get(next..next + 2) == Some(b"\r\n") {
            return Some((nl + 1, next + 2));
        }
        if buf.get(next) == Some(&b'\n') {
            return Some((nl + 1, next + 1));
        }
        if next >= buf.len() {
            return None;
        }
        start = next;
    }
    None
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_ascii(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

fn lossy(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(80)]);
    s.into_owned()
}

/// Writes a canonical frame (one header, then the body) into one buffer.
pub fn encode_frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 32);
    write_header(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// Appends the canonical header for a body of `len` bytes.
pub fn write_header(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(b"Content-Length: ");
    let mut num = itoa_buf(len);
    out.append(&mut num);
    out.extend_from_slice(b"\r\n\r\n");
}

fn itoa_buf(n: usize) -> Vec<u8> {
    n.to_string().into_bytes()
}

/// A read is never attempted into less spare room than this.
const MIN_READ: usize = 1024;
/// Read buffer growth step for small frames.
const READ_CHUNK: usize = 4096;
/// Largest read-ahead sized from the previous frame.
const MAX_CHUNK: usize = 256 * 1024;

/// How much of a streamed body is gathered before its start is handed over: enough for any
/// envelope an SDK or the CLI writes (they put `jsonrpc`, `id`, `method` and `sessionId`
/// first), little enough to stay a buffer and not a frame.
pub const STREAM_HEAD: usize = 16 * 1024;

/// The least room a streamed body is read into at a time.
const STREAM_READ: usize = 64 * 1024;

/// One frame as [`FrameReader::read_item`] gives it.
#[derive(Debug)]
pub enum Item {
    /// The whole body.
    Whole(Bytes),
    /// The start of a body longer than the caller buffers; the rest comes from
    /// [`FrameReader::read_chunk`] (or whole from [`FrameReader::read_rest`]).
    Head {
        /// The first bytes of the body (at least [`STREAM_HEAD`] of them, or all).
        head: Bytes,
        /// The whole body's length.
        len: usize,
    },
}

/// `read_item(usize::MAX)` never streams: no body is longer than that.
fn unreachable_head() -> Result<Option<Bytes>, CodecError> {
    Err(CodecError::FrameTooLarge {
        len: usize::MAX,
        limit: usize::MAX,
        head: Bytes::new(),
        skippable: false,
    })
}

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    limits: Limits,
    on_partial: Option<fn(&R)>,
    /// Read size for the next frame: the last frame's size, so a stream of large frames is
    /// read in a few big reads instead of a small one per header.
    chunk: usize,
    /// Bytes of an oversized body still to discard before the next header.
    skip: usize,
    /// Bytes of a streamed body not yet handed out by `read_chunk`.
    rest: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a reader.
    pub fn new(inner: R, limits: Limits) -> Self {
        FrameReader {
            inner,
            // Grown on demand: an idle connection should hold a few KiB, not a big buffer.
            buf: BytesMut::new(),
            limits,
            on_partial: None,
            chunk: READ_CHUNK,
            skip: 0,
            rest: 0,
        }
    }

    /// Runs `hook` once per frame when only part of it has arrived and the reader must wait
    /// for the rest (used to send an immediate ACK: see [`crate::wire::quickack`]).
    pub fn with_on_partial(mut self, hook: fn(&R)) -> Self {
        self.on_partial = Some(hook);
        self
    }

    async fn fill(&mut self) -> Result<usize, CodecError> {
        let n = std::future::poll_fn(|cx| {
            if self.buf.capacity() - self.buf.len() < MIN_READ {
                self.buf.reserve(self.chunk);
            }
            let r = tokio_util::io::poll_read_buf(Pin::new(&mut self.inner), cx, &mut self.buf);
            if r.is_pending() && self.buf.is_empty() {
                // Nothing buffered and nothing to read: the connection is idle, and an idle
                // connection should not pin a read buffer (10,000 of them would hold 40 MiB).
                self.buf = BytesMut::new();
            }
            r
        })
        .await?;
        Ok(n)
    }

    /// Bytes of read buffer currently allocated (zero while idle).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Fills after a read that left a partial frame, telling the hook first.
    async fn fill_partial(&mut self, told: &mut bool) -> Result<usize, CodecError> {
        if let (Some(h), false) = (self.on_partial, *told) {
            h(&self.inner);
            *told = true;
        }
        self.fill().await
    }

    /// Returns the next frame body, `Ok(None)` on a clean end of stream between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>, CodecError> {
        match self.read_item(usize::MAX).await? {
            Some(Item::Whole(b)) => Ok(Some(b)),
            Some(Item::Head { .. }) => unreachable_head(),
            None => Ok(None),
        }
    }

    /// Like [`read_frame`](Self::read_frame), but a body longer than `stream_above` comes
    /// as its head; the caller then takes the rest with [`read_chunk`](Self::read_chunk)
    /// or [`read_rest`](Self::read_rest). A rest not taken is discarded by the next read.
    pub async fn read_item(&mut self, stream_above: usize) -> Result<Option<Item>, CodecError> {
        if self.rest > 0 {
            self.skip += std::mem::take(&mut self.rest);
        }
        if self.skip > 0 {
            self.skip_rest().await?;
        }
        let mut told = false;
        loop {
            match scan_header(&self.buf, self.limits.max_header)? {
                HeaderScan::Complete {
                    header_len,
                    body_len,
                } => {
                    if body_len > self.limits.max_frame {
                        self.buf.advance(header_len);
                        let have = self.buf.len().min(body_len);
                        let head = Bytes::copy_from_slice(&self.buf[..have.min(OVERSIZE_PEEK)]);
                        self.buf.advance(have);
                        self.skip = body_len - have;
                        return Err(CodecError::FrameTooLarge {
                            len: body_len,
                            limit: self.limits.max_frame,
                            head,
                            skippable: body_len <= MAX_SKIP_BYTES,
                        });
                    }
                    let need = header_len + body_len;
                    if body_len > stream_above {
                        let want = header_len + body_len.min(STREAM_HEAD);
                        while self.buf.len() < want {
                            self.reserve_read();
                            if self.fill_partial(&mut told).await? == 0 {
                                return Err(CodecError::UnexpectedEof);
                            }
                        }
                        self.buf.advance(header_len);
                        let head = self.buf.split_to(self.buf.len().min(body_len)).freeze();
                        self.rest = body_len - head.len();
                        self.chunk = MAX_CHUNK;
                        return Ok(Some(Item::Head {
                            head,
                            len: body_len,
                        }));
                    }
                    if self.buf.len() < need {
                        self.buf.reserve(need - self.buf.len());
                        while self.buf.len() < need {
                            if self.fill_partial(&mut told).await? == 0 {
                                return Err(CodecError::UnexpectedEof);
                            }
                        }
                    }
                    self.chunk = need.clamp(READ_CHUNK, MAX_CHUNK);
                    self.buf.advance(header_len);
                    let body = self.buf.split_to(body_len).freeze();
                    self.release_big();
                    return Ok(Some(Item::Whole(body)));
                }
                HeaderScan::Incomplete => {
                    if self.buf.capacity() - self.buf.len() < MIN_READ {
                        self.buf.reserve(self.buf.len().max(self.chunk));
                    }
                    let n = if self.buf.is_empty() {
                        self.fill().await?
                    } else {
                        self.fill_partial(&mut told).await?
                    };
                    if n == 0 {
                        if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                            return Ok(None);
                        }
                        return Err(CodecError::UnexpectedEof);
                    }
                }
            }
        }
    }

    /// The next piece of a streamed body (whatever has arrived, at most one read buffer);
    /// `Ok(None)` once it is all out.
    pub async fn read_chunk(&mut self) -> Result<Option<Bytes>, CodecError> {
        if self.rest == 0 {
            return Ok(None);
        }
        if self.buf.is_empty() {
            // A whole read buffer each time: the tail of the last allocation may be a sliver,
            // and a sliver per read would mean a syscall and a chunk per few bytes.
            // `reserve` takes the whole allocation back once the writer has dropped the
            // chunks split from it, so a long body reuses a few buffers instead of mapping
            // fresh pages per read.
            if self.buf.capacity() < STREAM_READ {
                self.buf.reserve(self.chunk.max(STREAM_READ));
            }
            if self.fill().await? == 0 {
                return Err(CodecError::UnexpectedEof);
            }
        }
        let take = self.rest.min(self.buf.len());
        self.rest -= take;
        let chunk = self.buf.split_to(take).freeze();
        if self.rest == 0 {
            self.release_big();
        }
        Ok(Some(chunk))
    }

    /// The whole body of a streamed frame, `head` first: for a caller that found it cannot
    /// stream this one.
    pub async fn read_rest(&mut self, head: Bytes) -> Result<Bytes, CodecError> {
        let mut body = BytesMut::with_capacity(head.len() + self.rest);
        body.extend_from_slice(&head);
        while let Some(c) = self.read_chunk().await? {
            body.extend_from_slice(&c);
        }
        Ok(body.freeze())
    }

    /// Bytes of a streamed body not yet handed out.
    pub fn remaining(&self) -> usize {
        self.rest
    }

    /// Room for one big read: a streamed body is read a buffer at a time.
    fn reserve_read(&mut self) {
        if self.buf.capacity() - self.buf.len() < MIN_READ {
            self.buf.reserve(self.chunk);
        }
    }

    /// Do not pin a big frame's allocation to a connection that goes idle.
    fn release_big(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 64 * 1024 {
            self.buf = BytesMut::new();
        }
    }

    /// Discards the rest of an oversized body without buffering it.
    async fn skip_rest(&mut self) -> Result<(), CodecError> {
        loop {
            let take = self.skip.min(self.buf.len());
            self.buf.advance(take);
            self.skip -= take;
            if self.skip == 0 {
                return Ok(());
            }
            self.buf.clear();
            if self.fill().await? == 0 {
                return Err(CodecError::UnexpectedEof);
            }
        }
    }

    /// Gives back the underlying reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_reader_releases_its_buffer_and_acks_partial_frames_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static PARTIAL: AtomicUsize = AtomicUsize::new(0);
        fn hook(_: &tokio::io::DuplexStream) {
            PARTIAL.fetch_add(1, Ordering::Relaxed);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::io::AsyncWriteExt;
            let (mut w, r) = tokio::io::duplex(1 << 16);
            let mut r = FrameReader::new(r, Limits::default()).with_on_partial(hook);
            w.write_all(&encode_frame(b"{\"a\":1}")).await.unwrap();
            assert_eq!(&r.read_frame().await.unwrap().unwrap()[..], b"{\"a\":1}");
            assert_eq!(
                PARTIAL.load(Ordering::Relaxed),
                0,
                "whole frame is not partial"
            );
            assert!(r.buffer_capacity() > 0);
            // Nothing more to read: the pending read drops the buffer.
            let pending =
                tokio::time::timeout(std::time::Duration::from_millis(20), r.read_frame()).await;
            assert!(pending.is_err());
            assert_eq!(r.buffer_capacity(), 0);
            // A header alone, then its body: the hook runs once for the frame.
            w.write_all(b"Content-Length: 7\r\n\r\n").await.unwrap();
            let read = tokio::spawn(async move { (r.read_frame().await, r) });
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            w.write_all(b"{\"b\":").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            w.write_all(b"2}").await.unwrap();
            let (got, _r) = read.await.unwrap();
            assert_eq!(&got.unwrap().unwrap()[..], b"{\"b\":2}");
            assert_eq!(PARTIAL.load(Ordering::Relaxed), 1);
        });
    }

    fn frames(input: &[u8], limits: Limits) -> Vec<Result<Bytes, String>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = FrameReader::new(input, limits);
            let mut out = Vec::new();
            loop {
                match r.read_frame().await {
                    Ok(Some(b)) => out.push(Ok(b)),
                    Ok(None) => break,
                    Err(e) => {
                        let rec = e.recoverable();
                        out.push(Err(e.to_string()));
                        if !rec {
                            break;
                        }
                    }
                }
            }
            out
        })
    }

    #[test]
    fn parses_case_insensitive_and_extra_headers() {
        let input = b"content-length: 2\r\nContent-Type: application/json\r\n\r\n{}Content-Length:3\r\n\r\n[1]";
        let got = frames(input, Limits::default());
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].as_ref().unwrap().as_ref(), b"{}");
        assert_eq!(got[1].as_ref().unwrap().as_ref(), b"[1]");
    }

    #[test]
    fn missing_content_length_is_fatal() {
        let got = frames(b"Content-Type: x\r\n\r\n{}", Limits::default());
        assert_eq!(
            got,
            vec![Err("Header must provide a Content-Length property.".into())]
        );
    }

    #[test]
    fn oversized_frame_is_skipped_and_stream_continues() {
        let limits = Limits {
            max_header: 1024,
            max_frame: 4,
        };
        let got = frames(
            b"Content-Length: 10\r\n\r\n0123456789Content-Length: 2\r\n\r\n{}",
            limits,
        );
        assert!(got[0].as_ref().unwrap_err().contains("exceeds the limit"));
        assert_eq!(got[1].as_ref().unwrap().as_ref(), b"{}");
    }

    #[test]
    fn oversized_frame_is_reported_before_its_body_arrives() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::io::AsyncWriteExt;
            let limits = Limits {
                max_header: 1024,
                max_frame: 8,
            };
            let (mut w, r) = tokio::io::duplex(1 << 16);
            let mut r = FrameReader::new(r, limits);
            w.write_all(b"Content-Length: 22\r\n\r\n{\"id\":7,")
                .await
                .unwrap();
            let t = std::time::Duration::from_secs(5);
            match tokio::time::timeout(t, r.read_frame()).await.unwrap() {
                Err(CodecError::FrameTooLarge {
                    len: 22,
                    head,
                    skippable: true,
                    ..
                }) => assert_eq!(&head[..], b"{\"id\":7,"),
                other => panic!("{other:?}"),
            }
            // The rest of the body is skipped on the next read; the stream stays in sync.
            w.write_all(b"\"x\":\"abcdefg\"}Content-Length: 2\r\n\r\n{}")
                .await
                .unwrap();
            let f = tokio::time::timeout(t, r.read_frame()).await.unwrap();
            assert_eq!(&f.unwrap().unwrap()[..], b"{}");
            // A length nobody could skip in reasonable time is reported at once, as fatal.
            w.write_all(b"Content-Length: 999999999999\r\n\r\n{")
                .await
                .unwrap();
            let e = tokio::time::timeout(t, r.read_frame()).await.unwrap();
            let e = e.unwrap_err();
            assert!(!e.recoverable(), "{e:?}");
        });
    }

    #[test]
    fn header_too_large() {
        let limits = Limits {
            max_header: 16,
            max_frame: 100,
        };
        let got = frames(&[b'x'; 64], limits);
        assert!(got[0]
            .as_ref()
            .unwrap_err()
            .contains("header block exceeds"));
    }

    #[test]
    fn negative_or_garbage_length_rejected() {
        for bad in ["-1", "abc", "", "1 2"] {
            let input = format!("Content-Length: {bad}\r\n\r\n");
            let got = frames(input.as_bytes(), Limits::default());
            assert!(got[0].is_err(), "{bad}");
        }
    }

    #[test]
    fn truncated_body_is_eof_error() {
        let got = frames(b"Content-Length: 10\r\n\r\n{}", Limits::default());
        assert_eq!(
            got,
            vec![Err("connection closed in the middle of a frame".into())]
        );
    }

    #[test]
    fn encode_is_canonical() {
        assert_eq!(encode_frame(b"{}"), b"Content-Length: 2\r\n\r\n{}".to_vec());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn roundtrip_any_split(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
                let mut wire = Vec::new();
                for b in &bodies { wire.extend(encode_frame(b)); }
                let got = frames(&wire, Limits::default());
                prop_assert_eq!(got.len(), bodies.len());
                for (g, b) in got.iter().zip(&bodies) {
                    prop_assert_eq!(g.as_ref().unwrap().as_ref(), b.as_slice());
                }
            }

            #[test]
            fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = frames(&input, Limits { max_header: 64, max_frame: 128 });
            }
        }
    }
}
