//! The whole client-frame path (framing → envelope → route → id rewrite → backend → reply)
//! against one in-process proxy in front of one in-process fake CLI, both started once per
//! process. Each input is decoded into a few chunks written to a fresh loopback connection.
//!
//! Invariants: the proxy never panics; every frame it sends is well-framed JSON-RPC 2.0 (valid
//! JSON, responses with an id and exactly one of result/error); every response id is `null` or
//! a whole id the client sent; and it keeps serving: a `ping` after the input is answered, on
//! the same connection when the input left the stream in sync, otherwise on a fresh one.
//!
//! `CLIENT_PATH_KNOWN=sniffed-id` lets through error replies whose id the proxy recovered from
//! an unparsable frame with `envelope::sniff_id` (a known issue, see fuzz/RESULTS.md), so a
//! long run can look past it.
#![no_main]

use bytes::Bytes;
use copilot_lb::app::{self, Running};
use copilot_lb::codec::{encode_frame, CodecError, FrameReader, Limits};
use copilot_lb::config::{Config, Overrides};
use copilot_lb::envelope::{self, Kind};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::Duration;
use test_support::fake_cli::{FakeCli, FakeConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::time::{timeout_at, Instant};

/// Small limits so the oversize and header-limit paths are reachable with small inputs.
const MAX_FRAME: usize = 4096;
const MAX_HEADER: usize = 1024;
/// How long replies may take when nothing is wrong; only a hang ever waits this long.
const REPLY_DEADLINE: Duration = Duration::from_secs(5);
/// Past this many stored sessions the fake's storage is emptied, so `session.list` replies
/// (and the time to build them) do not grow over millions of inputs.
const MAX_STORED: usize = 32;

const METHODS: &[&str] = &[
    "connect",
    "ping",
    "session.create",
    "session.resume",
    "session.send",
    "session.list",
    "session.getLastId",
    "sessions.open",
    "session.delete",
    "session.destroy",
    "session.detach",
    "session.getMessages",
    "session.getMetadata",
    "sessions.list",
    "sessions.delete",
    "sessions.transferRemoteControl",
    "sessions.stopRemoteControl",
    "session.getForeground",
    "status.get",
    "models.list",
    "runtime.shutdown",
    "account.login",
    "sessionFs.setProvider",
    "sessions.bulkDelete",
    "test.echo",
    "test.callClient",
    "$/cancelRequest",
];

/// Ids of every JSON type, including ones the proxy must echo byte for byte and ones that
/// look like the integers it allocates itself.
const IDS: &[&str] = &[
    "1",
    "2",
    "7",
    "0",
    "-1",
    "\"a\"",
    "\"\"",
    "null",
    "1.5",
    "1e3",
    "-0",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "\"\\u0000\"",
    "\"\\\"}\"",
    "\"é\"",
    "[1]",
    "{}",
    "true",
];

const SESSIONS: &[&str] = &["s0", "s1", "s2", "", "s\"q", "ü", "../x"];

const OPEN_KINDS: &[&str] = &["create", "resume", "attach", "resumeLast", "bogus"];

const SENTINEL_PING: &[u8] = br#"{"jsonrpc":"2.0","id":"~ping~","method":"ping","params":{}}"#;
/// Forwarded to the backend on the same link as the input's requests, so its reply comes
/// after theirs: once it is in, the backend has answered everything before it.
const SENTINEL_END: &[u8] = br#"{"jsonrpc":"2.0","id":"~end~","method":"status.get","params":{}}"#;

struct Env {
    rt: Runtime,
    proxy: SocketAddr,
    fake: FakeCli,
    running: Running,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn env() -> &'static Env {
    ENV.get_or_init(|| {
        // One thread: proxy, fake and client all advance only inside `block_on`, which keeps
        // each input cheap (no cross-thread wake-ups) and the process quiet between inputs.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (fake, running, proxy) = rt.block_on(async {
            let fake = FakeCli::start(FakeConfig::named("b1"))
                .await
                .expect("fake CLI");
            let o = Overrides {
                listen: Some("127.0.0.1:0".into()),
                backends: vec![fake.addr().to_string()],
                admin: None,
                state_path: None,
            };
            let mut cfg = Config::default().apply(&o, "fuzz").expect("config");
            // No file per fuzz process; the registry's own logic has its suite.
            cfg.state.kind = copilot_lb::config::StateKind::Memory;
            cfg.limits.max_frame_bytes = MAX_FRAME;
            cfg.limits.max_header_bytes = MAX_HEADER;
            // The fake's own methods are not in the routing table: forwarded as an operator
            // would forward a CLI's extensions, so the inputs still reach a backend.
            cfg.routing.allow_global = vec!["test.echo".into(), "test.callClient".into()];
            let running = app::start(cfg).await.expect("proxy");
            let proxy = running.listen_addrs[0];
            wait_ready(proxy).await;
            (fake, running, proxy)
        });
        Env {
            rt,
            proxy,
            fake,
            running,
        }
    })
}

/// Waits until the proxy forwards to the backend, so early inputs are not all "no backend".
async fn wait_ready(proxy: SocketAddr) {
    let give_up = Instant::now() + Duration::from_secs(30);
    while Instant::now() < give_up {
        let mut s = TcpStream::connect(proxy).await.expect("connect to proxy");
        s.write_all(&encode_frame(SENTINEL_END)).await.unwrap();
        let (r, _w) = s.into_split();
        let mut fr = FrameReader::new(r, Limits::default());
        if let Ok(Ok(Some(b))) = tokio::time::timeout(Duration::from_secs(2), fr.read_frame()).await
        {
            if serde_json::from_slice::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v.get("result").cloned())
                .is_some()
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("proxy never forwarded to the fake backend");
}

/// Reads input bytes; past the end it yields zeros so every input decodes to something.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = self.byte() as usize % (max + 1);
        let start = self.pos.min(self.data.len());
        let s = &self.data[start..(start + n).min(self.data.len())];
        self.pos += n;
        s
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.byte() as usize % from.len()]
    }
}

fn json_str(bytes: &[u8]) -> String {
    serde_json::to_string(&String::from_utf8_lossy(bytes)).unwrap()
}

/// One JSON-RPC request body shaped by the input: real method names, ids of every type,
/// session ids in the places the router looks, and optional damage.
fn request_body(c: &mut Cursor<'_>) -> Vec<u8> {
    let method = match c.byte() as usize % (METHODS.len() + 1) {
        i if i < METHODS.len() => serde_json::to_string(METHODS[i]).unwrap(),
        _ => json_str(c.bytes(20)),
    };
    let flags = c.byte();
    let id = match c.byte() as usize % (IDS.len() + 1) {
        i if i < IDS.len() => Some(IDS[i].to_string()),
        _ => None,
    };
    let mut params = String::from("{");
    let mut sep = "";
    if flags & 1 != 0 {
        let sid = serde_json::to_string(c.pick(SESSIONS)).unwrap();
        params.push_str(&format!(r#""sessionId":{sid}"#));
        sep = ",";
    }
    if flags & 2 != 0 {
        let text = json_str(c.bytes(24));
        let key = c.pick(&["prompt", "message", "payload", "token", "sessionId"]);
        params.push_str(&format!(r#"{sep}"{key}":{text}"#));
        sep = ",";
    }
    if flags & 4 != 0 {
        // Session ids where the special methods keep them.
        let kind = c.pick(OPEN_KINDS);
        let sid = serde_json::to_string(c.pick(SESSIONS)).unwrap();
        params.push_str(&format!(
            r#"{sep}"kind":"{kind}","options":{{"sessionId":{sid}}},"toSessionId":{sid},"expectedSessionId":{sid}"#
        ));
        sep = ",";
    }
    if flags & 8 != 0 {
        // A server→client round trip through the proxy (answered by a later response op).
        let m = c.pick(&["hooks.invoke", "tool.call", "permission.request"]);
        params.push_str(&format!(r#"{sep}"method":"{m}","params":{{}}"#));
        sep = ",";
    }
    if flags & 16 != 0 {
        // Raw bytes inside params: mostly breaks the JSON, sometimes adds a field.
        params.push_str(sep);
        params.push_str(&String::from_utf8_lossy(c.bytes(16)));
    }
    params.push('}');
    let params = match flags >> 5 {
        0 => String::new(),
        1 => r#","params":[1]"#.to_string(),
        2 => r#","params":"x""#.to_string(),
        _ => format!(r#","params":{params}"#),
    };
    let id = id.map(|i| format!(r#","id":{i}"#)).unwrap_or_default();
    let body = if flags & 0x80 != 0 && flags & 0x40 != 0 {
        // Method before id, and the envelope with odd spacing: the id span must still be exact.
        format!(r#"{{ "method" : {method} {params} {id} , "jsonrpc":"2.0" }}"#)
    } else {
        format!(r#"{{"jsonrpc":"2.0"{id},"method":{method}{params}}}"#)
    };
    body.into_bytes()
}

/// A client response, as to a server→client request (the proxy maps its ids back).
fn response_body(c: &mut Cursor<'_>) -> Vec<u8> {
    let id = match c.byte() % 4 {
        0 => IDS[c.byte() as usize % IDS.len()].to_string(),
        _ => (c.byte() % 8).to_string(),
    };
    let tail = if c.byte() & 1 == 0 {
        r#""result":{"ok":true}"#.to_string()
    } else {
        r#""error":{"code":-32000,"message":"no"}"#.to_string()
    };
    format!(r#"{{"jsonrpc":"2.0","id":{id},{tail}}}"#).into_bytes()
}

/// Frames `body`, sometimes with an extra header, a wrong length or an odd header form.
fn frame(c: &mut Cursor<'_>, body: &[u8]) -> Vec<u8> {
    let len = body.len();
    let head = match c.byte() % 10 {
        0 => format!(
            "Content-Length: {len}\r\nContent-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n"
        ),
        1 => format!("content-length:{len}\r\n\r\n"),
        2 => {
            let delta = c.byte() as i8 as i64 % 8;
            format!("Content-Length: {}\r\n\r\n", (len as i64 + delta).max(0))
        }
        3 => format!("Content-Length: {}\r\n\r\n", MAX_FRAME + 1 + c.byte() as usize),
        4 => format!("Content-Length: {len}\n\n"),
        _ => format!("Content-Length: {len}\r\n\r\n"),
    };
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Decodes the input into the chunks to write, each written separately.
fn chunks(data: &[u8]) -> Vec<Vec<u8>> {
    let mut c = Cursor { data, pos: 0 };
    let mut out = Vec::new();
    while !c.done() && out.len() < 8 {
        match c.byte() % 8 {
            0 => out.push(c.bytes(64).to_vec()),
            1 => {
                let b = response_body(&mut c);
                out.push(frame(&mut c, &b));
            }
            2 => {
                // A framed body of raw input bytes: the envelope parser's error paths.
                let b = c.bytes(64).to_vec();
                out.push(frame(&mut c, &b));
            }
            _ => {
                let b = request_body(&mut c);
                let f = frame(&mut c, &b);
                // Sometimes split a frame in two writes, inside the header or the body.
                let cut = c.byte() as usize;
                if cut < f.len() && cut % 3 == 0 && cut > 0 {
                    out.push(f[..cut].to_vec());
                    out.push(f[cut..].to_vec());
                } else {
                    out.push(f);
                }
            }
        }
    }
    out
}

/// What the proxy reads from the bytes sent: decoded bodies and the kept starts of oversize
/// ones, in order, and whether it gets as far as both sentinels.
struct Seen {
    bodies: Vec<Bytes>,
    heads: Vec<Bytes>,
    in_sync: bool,
}

/// Decodes `sent` the way the proxy does: oversize frames are skipped, any other framing
/// error ends the connection.
async fn decode(sent: &[u8]) -> Seen {
    let limits = Limits {
        max_header: MAX_HEADER,
        max_frame: MAX_FRAME,
    };
    let mut r = FrameReader::new(sent, limits);
    let mut seen = Seen {
        bodies: Vec::new(),
        heads: Vec::new(),
        in_sync: false,
    };
    let mut last: (Option<Bytes>, Option<Bytes>) = (None, None);
    loop {
        match r.read_frame().await {
            Ok(Some(b)) => {
                seen.bodies.push(b.clone());
                last = (last.1, Some(b));
            }
            Err(CodecError::FrameTooLarge { head, .. }) => {
                seen.heads.push(head);
                last = (last.1, None);
            }
            Ok(None) => {
                seen.in_sync = last.0.as_deref() == Some(SENTINEL_PING)
                    && last.1.as_deref() == Some(SENTINEL_END);
                break;
            }
            Err(_) => break,
        }
    }
    seen
}

/// Whether `tok` occurs in `hay` as a whole JSON value, not as part of a longer one.
fn has_token(hay: &[u8], tok: &[u8]) -> bool {
    if tok.is_empty() || tok.len() > hay.len() {
        return false;
    }
    (0..=hay.len() - tok.len()).any(|i| {
        hay[i..].starts_with(tok)
            && (i == 0 || b":[, \t\r\n".contains(&hay[i - 1]))
            && hay
                .get(i + tok.len())
                .is_none_or(|c| b",}] \t\r\n".contains(c))
    })
}

/// The proxy's invariants for one frame it sent; the raw response id, if it is a response.
fn check_reply(body: &[u8], seen: &Seen) -> Result<Option<String>, String> {
    let text = || String::from_utf8_lossy(body).into_owned();
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(body) {
        return Err(format!(
            "proxy sent a frame that is not valid JSON ({e}): {:?}",
            text()
        ));
    }
    // Raw values keep each member's exact text: ids must come back byte for byte.
    let msg: HashMap<String, Box<RawValue>> = serde_json::from_slice(body)
        .map_err(|e| format!("proxy sent JSON that is not an object ({e}): {:?}", text()))?;
    let get = |k: &str| msg.get(k).map(|r| r.get());
    if get("jsonrpc") != Some("\"2.0\"") {
        return Err(format!("no jsonrpc 2.0 in {:?}", text()));
    }
    if msg.contains_key("method") {
        return Ok(None);
    }
    if msg.contains_key("result") == msg.contains_key("error") {
        return Err(format!(
            "a response needs exactly one of result and error: {:?}",
            text()
        ));
    }
    let Some(id) = get("id") else {
        return Err(format!("response without an id: {:?}", text()));
    };
    // The id must be one the client sent, whole: a leaked internal id, or a prefix of the
    // client's (1 for 1.5), would be taken as the answer to some other request.
    let sent = |b: &Bytes| has_token(b, id.as_bytes());
    if id != "null" && !seen.bodies.iter().chain(&seen.heads).any(sent) {
        return Err(format!(
            "response id {id} is not an id the client sent: {:?}",
            text()
        ));
    }
    Ok(Some(id.to_string()))
}

/// Whether `body` is the proxy's error reply to a frame whose id it recovered with
/// `envelope::sniff_id` (the known issue that `CLIENT_PATH_KNOWN=sniffed-id` lets through).
fn is_sniffed_reply(body: &[u8], seen: &Seen) -> bool {
    let unparsed = seen
        .bodies
        .iter()
        .filter(|b| envelope::parse(b).is_err())
        .chain(&seen.heads);
    unparsed
        .filter_map(|b| envelope::sniff_id(b))
        .any(|id| body.starts_with(format!(r#"{{"jsonrpc":"2.0","id":{id},"error":"#).as_bytes()))
}

static TOLERATE_SNIFFED: LazyLock<bool> = LazyLock::new(|| {
    std::env::var("CLIENT_PATH_KNOWN").is_ok_and(|v| v.split(',').any(|k| k == "sniffed-id"))
});
static SNIFFED: AtomicU64 = AtomicU64::new(0);

static STATS: LazyLock<bool> = LazyLock::new(|| std::env::var_os("CLIENT_PATH_STATS").is_some());
static INPUTS: AtomicU64 = AtomicU64::new(0);

/// With `CLIENT_PATH_STATS` set, the state the proxy and fake keep across inputs, at every
/// power of two: what to look at when the process's memory grows over a long run.
fn stats(env: &Env) {
    let n = INPUTS.fetch_add(1, Ordering::Relaxed) + 1;
    if *STATS && n.is_power_of_two() {
        let sh = &env.running.shared;
        eprintln!(
            "client_path stats after {n} inputs: proxy sessions {} connections {}, fake connections {} stored {} request kinds {}",
            sh.sessions.len(),
            sh.conn_count(),
            env.fake.connections(),
            env.fake.stored_sessions().len(),
            env.fake.request_counts().len(),
        );
    }
}

/// Checks one reply, panicking on a violation; returns its response id.
fn check(body: &[u8], seen: &Seen) -> Option<String> {
    match check_reply(body, seen) {
        Ok(id) => id,
        Err(_) if *TOLERATE_SNIFFED && is_sniffed_reply(body, seen) => {
            let n = SNIFFED.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                eprintln!(
                    "client_path: {n} replies with a bad sniffed id let through (known issue)"
                );
            }
            None
        }
        Err(why) => panic!("{why}"),
    }
}

/// Sends `ping` on a fresh connection; the proxy must answer it.
async fn fresh_ping(proxy: SocketAddr) {
    let deadline = Instant::now() + REPLY_DEADLINE;
    let s = timeout_at(deadline, TcpStream::connect(proxy))
        .await
        .expect("proxy stopped accepting connections")
        .expect("connect to proxy after an input");
    s.set_nodelay(true).ok();
    let (r, mut w) = s.into_split();
    w.write_all(&encode_frame(SENTINEL_PING)).await.unwrap();
    let mut fr = FrameReader::new(r, Limits::default());
    let reply = timeout_at(deadline, fr.read_frame())
        .await
        .expect("proxy did not answer ping on a fresh connection in time")
        .expect("framing of the proxy's ping reply")
        .expect("proxy closed a fresh connection without answering ping");
    let seen = decode(&encode_frame(SENTINEL_PING)).await;
    assert_eq!(
        check(&reply, &seen).as_deref(),
        Some("\"~ping~\""),
        "unexpected ping reply {:?}",
        String::from_utf8_lossy(&reply)
    );
}

/// Deletes every stored session straight on the fake (not through the proxy).
async fn empty_storage(env: &Env) {
    let ids = env.fake.stored_sessions();
    let s = TcpStream::connect(env.fake.addr()).await.expect("fake");
    let (r, mut w) = s.into_split();
    let mut out = Vec::new();
    for (n, sid) in ids.iter().enumerate() {
        let p = serde_json::json!({"sessionId": sid});
        out.extend(encode_frame(
            format!(r#"{{"jsonrpc":"2.0","id":{n},"method":"session.delete","params":{p}}}"#)
                .as_bytes(),
        ));
    }
    w.write_all(&out).await.unwrap();
    let mut fr = FrameReader::new(r, Limits::default());
    let mut left = ids.len();
    let deadline = Instant::now() + REPLY_DEADLINE;
    while left > 0 {
        let b = timeout_at(deadline, fr.read_frame())
            .await
            .expect("fake did not answer deletes")
            .expect("fake framing")
            .expect("fake closed");
        if envelope::parse(&b)
            .map(|e| e.kind == Kind::Response)
            .unwrap_or(false)
        {
            left -= 1;
        }
    }
}

async fn run_one(env: &Env, data: &[u8]) {
    let parts = chunks(data);
    let mut sent: Vec<u8> = parts.concat();
    let sentinels = [encode_frame(SENTINEL_PING), encode_frame(SENTINEL_END)].concat();
    sent.extend_from_slice(&sentinels);
    let seen = decode(&sent).await;
    let expect_sentinels = seen.in_sync;

    let s = TcpStream::connect(env.proxy)
        .await
        .expect("connect to proxy");
    s.set_nodelay(true).ok();
    let (r, mut w) = s.into_split();
    let mut reader = FrameReader::new(r, Limits::default());
    // A proxy that closes early makes later writes fail; that is allowed, not a finding.
    let mut write_ok = true;
    for p in parts.iter().chain(std::iter::once(&sentinels)) {
        if write_ok && w.write_all(p).await.is_err() {
            write_ok = false;
        }
        // Let the proxy see this chunk on its own before the next one arrives.
        tokio::task::yield_now().await;
    }
    if !expect_sentinels {
        let _ = w.shutdown().await;
    }

    let deadline = Instant::now() + REPLY_DEADLINE;
    let (mut saw_ping, mut saw_end, mut shut) = (false, false, !expect_sentinels);
    loop {
        match timeout_at(deadline, reader.read_frame()).await {
            Ok(Ok(Some(body))) => match check(&body, &seen).as_deref() {
                Some("\"~ping~\"") => saw_ping = true,
                Some("\"~end~\"") => saw_end = true,
                _ => {}
            },
            // A reset (the proxy closing with input unread) ends the stream like a close.
            Ok(Ok(None)) | Ok(Err(CodecError::Io(_))) => break,
            Ok(Err(e)) => panic!("proxy sent a badly framed reply: {e}"),
            Err(_) => break,
        }
        if saw_ping && saw_end && !shut {
            // Everything is answered; closing now ends the connection without waiting.
            let _ = w.shutdown().await;
            shut = true;
        }
    }
    if expect_sentinels {
        assert!(
            saw_ping && saw_end,
            "the input left the stream in sync but the proxy did not answer the sentinels (ping: {saw_ping}, status.get: {saw_end})"
        );
    } else {
        fresh_ping(env.proxy).await;
    }
    if env.fake.stored_sessions().len() > MAX_STORED {
        empty_storage(env).await;
    }
    stats(env);
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    env.rt.block_on(run_one(env, data));
});
