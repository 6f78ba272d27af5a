//! JSON-RPC envelope parsing: only `jsonrpc`, `id`, `method`, `params.sessionId`, and whether
//! `result`/`error` are present. The body is validated as JSON but never re-encoded, so frames
//! are forwarded byte for byte except where the proxy must rewrite the id.

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

mod fast;
mod stream;
pub use fast::parse_fast;
pub use stream::{parse_head, Head, Tail, TailError};

/// What kind of JSON-RPC message a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Has `id` and `method`.
    Request,
    /// Has `method` and no `id`.
    Notification,
    /// Has `id` and no `method`.
    Response,
}

/// Why a body is not an acceptable JSON-RPC message, with the CLI's error code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not JSON at all.
    #[error("Parse error: {0}")]
    Parse(String),
    /// JSON, but not a JSON-RPC 2.0 message (batch, bad id, bad version).
    #[error("Invalid request: {0}")]
    Invalid(String),
}

impl EnvelopeError {
    /// The JSON-RPC error code the CLI uses for this failure.
    pub fn code(&self) -> i64 {
        match self {
            EnvelopeError::Parse(_) => -32700,
            EnvelopeError::Invalid(_) => -32600,
        }
    }
}

/// The parsed envelope of one frame, borrowing from the body.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// Request, notification or response.
    pub kind: Kind,
    /// The raw JSON text of `id` (value and type exactly as sent), if present.
    pub id: Option<&'a RawValue>,
    /// Byte range of the `id` value inside the body.
    pub id_span: Option<(usize, usize)>,
    /// `method`, if present.
    pub method: Option<Cow<'a, str>>,
    /// `params.sessionId`, when params is an object holding a string there.
    pub session_id: Option<Cow<'a, str>>,
    /// Whether `params` is present.
    pub has_params: bool,
    /// Whether `params` is a JSON object (or absent).
    pub params_is_object: bool,
    /// Whether `error` is present (responses).
    pub is_error: bool,
}

impl Envelope<'_> {
    /// Nothing seen yet: what the walks (`fast.rs`, `stream.rs`) fill in.
    fn blank() -> Self {
        Envelope {
            kind: Kind::Notification,
            id: None,
            id_span: None,
            method: None,
            session_id: None,
            has_params: false,
            params_is_object: true,
            is_error: false,
        }
    }

    /// The id as an unsigned integer, when it is one (ids the proxy allocated).
    pub fn id_u64(&self) -> Option<u64> {
        self.id.and_then(|r| r.get().parse::<u64>().ok())
    }
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, default)]
    jsonrpc: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present_raw")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    params: Option<ParamsEnvelope<'a>>,
    #[serde(default, deserialize_with = "present")]
    result: bool,
    #[serde(default, deserialize_with = "present")]
    error: bool,
}

/// Keeps `"id": null` distinguishable from an absent id.
fn present_raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Keeps `"result": null` distinguishable from an absent result.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    IgnoredAny::deserialize(d).map(|_| true)
}

struct ParamsEnvelope<'a> {
    is_object: bool,
    session_id: Option<Cow<'a, str>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for ParamsEnvelope<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = ParamsEnvelope<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("params object or array")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut session_id = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "sessionId" {
                        let v: SessionIdValue<'a> = map.next_value()?;
                        session_id = v.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ParamsEnvelope {
                    is_object: true,
                    session_id,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ParamsEnvelope {
                    is_object: false,
                    session_id: None,
                })
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(ParamsEnvelope {
                    is_object: false,
                    session_id: None,
                })
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A `sessionId` value: a string is kept, anything else (null, number) is treated as absent.
struct SessionIdValue<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for SessionIdValue<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = SessionIdValue<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a session id")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(SessionIdValue(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(SessionIdValue(Some(Cow::Owned(v.to_string()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(SessionIdValue(Some(Cow::Owned(v))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(SessionIdValue(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(SessionIdValue(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(SessionIdValue(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(SessionIdValue(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(SessionIdValue(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(SessionIdValue(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(SessionIdValue(None))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Checks what [`parse`] skips over without looking: the whole body is UTF-8 (RFC 8259 §8.1)
/// and nests arrays and objects no deeper than `max_depth`. Both matter for what the proxy
/// forwards untouched: a backend answers a frame it cannot parse with `id: null`, which
/// nobody could route back to the sender.
pub fn check_text(body: &[u8], max_depth: usize) -> Result<(), EnvelopeError> {
    if let Err(e) = std::str::from_utf8(body) {
        return Err(EnvelopeError::Parse(format!(
            "invalid UTF-8 at byte {}",
            e.valid_up_to()
        )));
    }
    // Nesting deeper than max_depth needs more than max_depth brackets: one vectorised
    // count settles almost every frame; only bracket-heavy ones get the exact scan.
    if memchr::memchr2_iter(b'[', b'{', body).count() <= max_depth {
        return Ok(());
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => {
                // Skip the string: brackets inside it do not nest.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', body.get(i..).unwrap_or_default()) {
                        Some(p) if body[i + p] == b'\\' => i += p + 2,
                        Some(p) => {
                            i += p + 1;
                            break;
                        }
                        // Unterminated: the JSON parser reports it.
                        None => return Ok(()),
                    }
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(EnvelopeError::Parse(format!(
                        "nesting deeper than {max_depth} levels (limits.max_json_depth)"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Parses and validates the envelope of one frame body.
pub fn parse(body: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'{') => {}
        Some(b'[') => {
            // Validate first so a broken array is still a parse error, like the CLI.
            serde_json::from_slice::<IgnoredAny>(body)
                .map_err(|e| EnvelopeError::Parse(e.to_string()))?;
            return Err(EnvelopeError::Invalid(
                "not a recognizable JSON-RPC request, notification, or response".into(),
            ));
        }
        None => return Err(EnvelopeError::Parse("empty body".into())),
        _ => {
            serde_json::from_slice::<IgnoredAny>(body)
                .map_err(|e| EnvelopeError::Parse(e.to_string()))?;
            return Err(EnvelopeError::Invalid(
                "not a recognizable JSON-RPC request, notification, or response".into(),
            ));
        }
    }
    let raw: RawEnvelope = serde_json::from_slice(body).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            EnvelopeError::Parse(e.to_string())
        } else {
            EnvelopeError::Invalid(e.to_string())
        }
    })?;
    match raw.jsonrpc.as_deref() {
        Some("2.0") => {}
        Some(v) => {
            return Err(EnvelopeError::Invalid(format!(
                "unsupported jsonrpc version {v:?}"
            )))
        }
        None => {
            return Err(EnvelopeError::Invalid(
                "missing \"jsonrpc\": \"2.0\"".into(),
            ))
        }
    }
    if let Some(id) = raw.id {
        validate_id(id.get())?;
    }
    let kind = match (&raw.id, &raw.method) {
        (Some(_), Some(_)) => Kind::Request,
        (None, Some(_)) => Kind::Notification,
        (Some(_), None) => {
            if !raw.result && !raw.error {
                return Err(EnvelopeError::Invalid(
                    "response has neither result nor error".into(),
                ));
            }
            Kind::Response
        }
        (None, None) => {
            return Err(EnvelopeError::Invalid(
                "not a recognizable JSON-RPC request, notification, or response".into(),
            ))
        }
    };
    let id_span = raw.id.map(|r| {
        let s = r.get();
        let start = s.as_ptr() as usize - body.as_ptr() as usize;
        (start, start + s.len())
    });
    let (has_params, params_is_object, session_id) = match raw.params {
        Some(p) => (true, p.is_object, p.session_id),
        None => (false, true, None),
    };
    Ok(Envelope {
        kind,
        id: raw.id,
        id_span,
        method: raw.method,
        session_id,
        has_params,
        params_is_object,
        is_error: raw.error,
    })
}

/// The envelope of a frame from a backend: the structural walk when it is sure, the full
/// parse otherwise (see [`parse_fast`] for why only backend frames take this path).
pub fn parse_backend(body: &[u8]) -> Result<Envelope<'_>, EnvelopeError> {
    match parse_fast(body) {
        Some(e) => Ok(e),
        None => parse(body),
    }
}

/// Accepts what the CLI accepts: strings and integers in the signed 64-bit range.
fn validate_id(text: &str) -> Result<(), EnvelopeError> {
    let t = text.as_bytes();
    match t.first() {
        Some(b'"') => Ok(()),
        Some(b'-' | b'0'..=b'9') => {
            if text.parse::<i64>().is_ok() {
                Ok(())
            } else {
                Err(EnvelopeError::Invalid(format!(
                    "id {text} is not a string or a 64-bit integer"
                )))
            }
        }
        _ => Err(EnvelopeError::Invalid(format!(
            "id {text} is not a string or a 64-bit integer"
        ))),
    }
}

/// Returns `body` with the byte range `span` replaced by `replacement`.
pub fn splice(body: &[u8], span: (usize, usize), replacement: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() - (span.1 - span.0) + replacement.len());
    out.extend_from_slice(&body[..span.0]);
    out.extend_from_slice(replacement);
    out.extend_from_slice(&body[span.1..]);
    out
}

/// Finds the byte offset just after the `{` that opens the top-level `params` object.
///
/// Used to inject a field without re-encoding the rest of the body.
pub fn params_object_start(body: &[u8]) -> Option<usize> {
    #[derive(Deserialize)]
    struct P<'a> {
        #[serde(borrow)]
        params: Option<&'a RawValue>,
    }
    let p: P = serde_json::from_slice(body).ok()?;
    let raw = p.params?.get();
    if !raw.starts_with('{') {
        return None;
    }
    Some(raw.as_ptr() as usize - body.as_ptr() as usize + 1)
}

/// Returns the raw `params` text of a body, if any.
pub fn raw_params(body: &[u8]) -> Option<&str> {
    #[derive(Deserialize)]
    struct P<'a> {
        #[serde(borrow)]
        params: Option<&'a RawValue>,
    }
    let p: P = serde_json::from_slice(body).ok()?;
    p.params.map(|r| r.get())
}

/// Recovers the request id from the start of a body that could not be parsed whole (too
/// large, or not valid JSON), so the error reply can name it. Only a member `"id"` of the
/// top-level object counts, and only a value that is a well-formed JSON-RPC id: a valid JSON
/// string, or an integer token that fits in 64 bits and was not cut off by the end of `head`.
/// Anything else gives `None` (the reply then carries `id: null`), so a reply is always valid
/// JSON and never names some other request.
pub fn sniff_id(head: &[u8]) -> Option<String> {
    // RFC 8259 §8.1: a parser may ignore a byte order mark.
    let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(head);
    let mut i = skip_ws(head, 0);
    if head.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut depth = 1usize;
    let mut want_key = true;
    loop {
        i = skip_ws(head, i);
        match *head.get(i)? {
            b'"' => {
                let end = string_end(head, i)?;
                if depth == 1 && want_key {
                    let key = &head[i..end];
                    i = skip_ws(head, end);
                    if head.get(i) != Some(&b':') {
                        return None;
                    }
                    i = skip_ws(head, i + 1);
                    if key == b"\"id\"" {
                        return id_token(&head[i..]);
                    }
                    want_key = false;
                } else {
                    i = end;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return None;
                }
                i += 1;
            }
            b',' => {
                want_key = depth == 1;
                i += 1;
            }
            _ => i += 1,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// Index just past the string that starts with the quote at `start`.
fn string_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        // A trailing backslash steps past the end: `get` ends the scan instead of panicking.
        let p = memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
        if b[i + p] == b'\\' {
            i += p + 2;
        } else {
            return Some(i + p + 1);
        }
    }
}

fn id_token(v: &[u8]) -> Option<String> {
    // The member must end where the value does: `,` or `}` next (a string may also end the
    // head, which is all an oversized frame shows). Anything else, and the id never was one.
    let ends = |at: usize, may_cut: bool| match v.get(skip_ws(v, at)) {
        Some(b',' | b'}') => true,
        None => may_cut,
        Some(_) => false,
    };
    if v.first() == Some(&b'"') {
        let end = string_end(v, 0)?;
        let text = std::str::from_utf8(&v[..end]).ok()?;
        // Validated as JSON so control characters and bad escapes never reach a reply.
        serde_json::from_str::<Cow<'_, str>>(text).ok()?;
        return ends(end, true).then(|| text.to_string());
    }
    let len = v
        .iter()
        .position(|c| !(c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E')))?;
    // A number cut by the end of the head could be the prefix of a longer one.
    if !ends(len, false) {
        return None;
    }
    let num = std::str::from_utf8(&v[..len]).ok()?;
    let digits = num.strip_prefix('-').unwrap_or(num);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|c| c.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    (canonical && num.parse::<i64>().is_ok()).then(|| num.to_string())
}

/// Arbitrary JSON values for the walks' property tests (`fast.rs`, `stream.rs`): strings with
/// escapes and multi-byte characters, floats, nesting.
#[cfg(test)]
fn arb_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        "[ -~\\\\\"\u{e9}\u{1F600}\n]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-zI]{1,4}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_check_refuses_bad_utf8_and_deep_nesting() {
        let ok = br#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{"message":"[[[{{{ \" [["}}"#;
        assert_eq!(check_text(ok, 2), Ok(()));
        let bad = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\",\"params\":{\"m\":\"\xff\"}}";
        assert_eq!(check_text(bad, 128).unwrap_err().code(), -32700);
        let mut deep = br#"{"jsonrpc":"2.0","id":1,"method":"ping","params":{"a":"#.to_vec();
        deep.extend(std::iter::repeat_n(b'[', 200));
        deep.extend(std::iter::repeat_n(b']', 200));
        deep.extend_from_slice(b"}}");
        assert!(check_text(&deep, 128).is_err());
        assert_eq!(check_text(&deep, 202), Ok(()));
        // Many brackets side by side are not deep.
        let mut wide = br#"{"a":"#.to_vec();
        for _ in 0..500 {
            wide.extend_from_slice(b"[],");
        }
        wide.extend_from_slice(b"0}");
        assert_eq!(check_text(&wide, 128), Ok(()));
    }

    #[test]
    fn a_trailing_backslash_never_panics() {
        assert_eq!(sniff_id(b"{\"id\":\"\\"), None);
        assert_eq!(sniff_id(b"{\"a\":\"\\"), None);
        let mut b = b"[],[],[],\"".to_vec();
        b.push(b'\\');
        assert_eq!(check_text(&b, 2), Ok(()));
    }

    #[test]
    fn a_sniffed_id_must_end_its_member() {
        // Found by the client_path fuzzer: `"id":"~"` followed by garbage was echoed, though
        // the member never ended; a reply may only name an id the frame really carried.
        assert_eq!(sniff_id(br#"{"id":"~"g#"#), None);
        assert_eq!(sniff_id(br#"{"id":7 g}"#), None);
        assert_eq!(sniff_id(br#"{"id":"a"]"#), None);
        assert_eq!(sniff_id(br#"{"id":"a" , "m"#).as_deref(), Some(r#""a""#));
        assert_eq!(sniff_id(br#"{"id": 5 }"#).as_deref(), Some("5"));
        // A head cut right after a whole string still names it (oversized frames).
        assert_eq!(sniff_id(br#"{"id":"a""#).as_deref(), Some(r#""a""#));
    }

    #[test]
    fn sniffed_ids_are_never_cut() {
        assert_eq!(sniff_id(br#"{"id":12"#), None);
        assert_eq!(sniff_id(br#"{"id":123,"#).as_deref(), Some("123"));
        assert_eq!(sniff_id(br#"{"id":"ab"#), None);
    }

    #[test]
    fn sniffed_ids_are_valid_top_level_ids_only() {
        let ok = |b: &[u8], want: &str| assert_eq!(sniff_id(b).as_deref(), Some(want), "{b:?}");
        ok(br#"{"jsonrpc":"2.0","id":7,"method":"x""#, "7");
        ok(br#" { "params":{"id":99}, "id" : -3 }"#, "-3");
        ok(br#"{"method":"a,\"id\":5","id":"q\"r"}"#, r#""q\"r""#);
        ok(br#"{"id":0}"#, "0");
        ok(b"\xEF\xBB\xBF{\"id\":10,", "10");
        for bad in [
            &br#"{"jsonrpc":"2.0","id":012,"method":"ping"}"#[..],
            b"{\"id\":\"a\x01b\"}",
            br#"{"id":"\q"}"#,
            b"{\"id\":\"a\nb\"}",
            br#"{"id":1.5}"#,
            br#"{"id":1e3}"#,
            br#"{"id":99999999999999999999}"#,
            br#"{"id":null}"#,
            br#"{"jsonrpc":"2.0","method":"ping","params":{"id":99}"#,
            br#"[{"id":1}]"#,
        ] {
            assert_eq!(sniff_id(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn request_with_string_id_and_session() {
        let b = br#"{"jsonrpc":"2.0","id":"a-b","method":"session.send","params":{"prompt":"x","sessionId":"s1"}}"#;
        let e = parse(b).unwrap();
        assert_eq!(e.kind, Kind::Request);
        assert_eq!(e.id.unwrap().get(), "\"a-b\"");
        let (s, t) = e.id_span.unwrap();
        assert_eq!(&b[s..t], b"\"a-b\"");
        assert_eq!(e.session_id.as_deref(), Some("s1"));
        assert_eq!(e.method.as_deref(), Some("session.send"));
    }

    #[test]
    fn response_with_null_result_is_response() {
        let e = parse(br#"{"jsonrpc":"2.0","id":7,"result":null}"#).unwrap();
        assert_eq!(e.kind, Kind::Response);
        assert_eq!(e.id_u64(), Some(7));
    }

    #[test]
    fn response_without_result_or_error_is_invalid() {
        assert!(matches!(
            parse(br#"{"jsonrpc":"2.0","id":7}"#),
            Err(EnvelopeError::Invalid(_))
        ));
    }

    #[test]
    fn notification() {
        let e = parse(
            br#"{"jsonrpc":"2.0","method":"session.event","params":{"sessionId":"s","event":{}}}"#,
        )
        .unwrap();
        assert_eq!(e.kind, Kind::Notification);
        assert_eq!(e.session_id.as_deref(), Some("s"));
    }

    #[test]
    fn rejects_what_the_cli_rejects() {
        for (body, code) in [
            (
                &br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#[..],
                -32600,
            ),
            (br#"{"id":1,"method":"ping"}"#, -32600),
            (br#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#, -32600),
            (br#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#, -32600),
            (br#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#, -32600),
            (
                br#"{"jsonrpc":"2.0","id":18446744073709551615,"method":"ping"}"#,
                -32600,
            ),
            (br#"{"jsonrpc":"2.0","id":1,"method":"ping""#, -32700),
            (b"garbage", -32700),
            (b"", -32700),
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(err.code(), code, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn escaped_session_id_is_unescaped() {
        let e = parse(br#"{"jsonrpc":"2.0","id":1,"method":"m","params":{"sessionId":"a\u0041"}}"#)
            .unwrap();
        assert_eq!(e.session_id.as_deref(), Some("aA"));
    }

    #[test]
    fn nested_session_id_is_ignored() {
        let e =
            parse(br#"{"jsonrpc":"2.0","id":1,"method":"m","params":{"x":{"sessionId":"no"}}}"#)
                .unwrap();
        assert_eq!(e.session_id, None);
    }

    #[test]
    fn splice_and_params_start() {
        let b = br#"{"jsonrpc":"2.0","id":"x","method":"session.create","params":{"model":"m"}}"#;
        let e = parse(b).unwrap();
        let out = splice(b, e.id_span.unwrap(), b"42");
        assert_eq!(parse(&out).unwrap().id_u64(), Some(42));
        let at = params_object_start(&out).unwrap();
        let mut injected = out[..at].to_vec();
        injected.extend_from_slice(br#""sessionId":"gen","#);
        injected.extend_from_slice(&out[at..]);
        assert_eq!(parse(&injected).unwrap().session_id.as_deref(), Some("gen"));
    }

    #[test]
    fn sniff_ids() {
        assert_eq!(
            sniff_id(br#"{"jsonrpc":"2.0","id":"ab\"c","method""#).as_deref(),
            Some(r#""ab\"c""#)
        );
        assert_eq!(
            sniff_id(br#"{"jsonrpc":"2.0","id": 12,"#).as_deref(),
            Some("12")
        );
        assert_eq!(sniff_id(br#"{"jsonrpc":"2.0","method":"x"#), None);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn never_panics(input in proptest::collection::vec(any::<u8>(), 0..256)) {
                let _ = parse(&input);
                let _ = sniff_id(&input);
            }

            #[test]
            fn id_roundtrips_exactly(id in prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                "[a-zA-Z0-9 _-]{0,20}".prop_map(|s| format!("\"{s}\"")),
            ]) {
                let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping","params":{{}}}}"#);
                let e = parse(body.as_bytes()).unwrap();
                let (s, t) = e.id_span.unwrap();
                prop_assert_eq!(&body[s..t], id.as_str());
            }
        }
    }
}
