//! The envelope of a backend frame without a JSON parser: a structural walk that reads the
//! top-level members the proxy routes on and jumps over every other value.
//!
//! [`super::parse`] runs serde over the whole body, which costs ~12 µs for a 64 KiB
//! `session.event` (its `deltaContent` string is scanned byte by byte). Here a string is
//! skipped by looking for its closing quote with `memchr` and counting the backslashes in
//! front of it, so the same event costs about as much as one vectorised search. The answer is
//! the one [`super::parse`] gives for every well-formed body; whenever this walk is not sure
//! (an escaped key or routed value, a duplicate member, anything malformed) it returns `None`
//! and the caller runs the full parser, which also words the error.
//!
//! What it does not check inside skipped values is their grammar beyond structure (brackets
//! balance, strings end): a value such as `tru` inside an event's data passes. That is why it
//! serves frames from backends, whose bodies are the CLI's own `JSON.stringify` output, and
//! never frames from clients, which get the full parse and the text checks.

use super::{validate_id, Envelope, Kind};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// The envelope of `body` when the walk is sure of it; `None` means "ask [`super::parse`]".
pub fn parse_fast(body: &[u8]) -> Option<Envelope<'_>> {
    let mut w = Walk::new(body);
    w.ws();
    w.eat(b'{')?;
    let mut seen = Seen::default();
    let mut env = Envelope::blank();
    let mut jsonrpc_ok = false;
    w.ws();
    if w.peek()? == b'}' {
        return None;
    }
    loop {
        let key = w.key()?;
        match key {
            b"jsonrpc" => {
                seen.mark(0)?;
                jsonrpc_ok = w.plain_string()? == b"2.0";
            }
            b"id" => {
                seen.mark(1)?;
                let (id, span) = w.id()?;
                env.id = Some(id);
                env.id_span = Some(span);
            }
            b"method" => {
                seen.mark(2)?;
                let m = w.plain_string()?;
                env.method = Some(Cow::Borrowed(std::str::from_utf8(m).ok()?));
            }
            b"params" => {
                seen.mark(3)?;
                match w.peek()? {
                    b'{' => {
                        env.has_params = true;
                        env.session_id = w.params_object()?;
                    }
                    b'[' => {
                        env.has_params = true;
                        env.params_is_object = false;
                        w.skip_value()?;
                    }
                    // `"params": null` is no params to the full parser (an absent Option).
                    b'n' => w.literal(b"null")?,
                    // A string or number is an invalid params type to the full parser.
                    _ => return None,
                }
            }
            b"result" => {
                seen.mark(4)?;
                w.skip_value()?;
            }
            b"error" => {
                seen.mark(5)?;
                env.is_error = true;
                w.skip_value()?;
            }
            _ => w.skip_value()?,
        }
        w.ws();
        match w.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    w.ws();
    if w.i != body.len() || !jsonrpc_ok {
        return None;
    }
    env.kind = match (env.id.is_some(), env.method.is_some()) {
        (true, true) => Kind::Request,
        (false, true) => Kind::Notification,
        (true, false) if seen.has(4) || seen.has(5) => Kind::Response,
        _ => return None,
    };
    Some(env)
}

/// Which of the routed top-level members appeared; a second one makes serde refuse the body.
#[derive(Default)]
pub(super) struct Seen(u8);

impl Seen {
    pub(super) fn mark(&mut self, bit: u8) -> Option<()> {
        if self.has(bit) {
            return None;
        }
        self.0 |= 1 << bit;
        Some(())
    }
    pub(super) fn has(&self, bit: u8) -> bool {
        self.0 & (1 << bit) != 0
    }
}

/// A cursor over JSON text that reads the few values the proxy routes on and steps over the
/// rest; `None` from any step means "not sure" (also used for the head of a streamed frame,
/// `stream.rs`).
pub(super) struct Walk<'a> {
    b: &'a [u8],
    pub(super) i: usize,
}

impl<'a> Walk<'a> {
    pub(super) fn new(b: &'a [u8]) -> Walk<'a> {
        Walk { b, i: 0 }
    }

    /// An `id` value and its span: a string or an integer the CLI accepts (`null` and
    /// anything else is left to the full parser, which words the error).
    pub(super) fn id(&mut self) -> Option<(&'a RawValue, (usize, usize))> {
        let start = self.i;
        self.scalar()?;
        let text = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        validate_id(text).ok()?;
        let id = serde_json::from_str::<&RawValue>(text).ok()?;
        Some((id, (start, self.i)))
    }

    /// A member's name and its colon, with the whitespace around them.
    pub(super) fn key(&mut self) -> Option<&'a [u8]> {
        self.ws();
        let key = self.plain_string()?;
        self.ws();
        self.eat(b':')?;
        self.ws();
        Some(key)
    }

    /// Steps over a value known to end inside the buffer: one that reaches its very end (a
    /// number) might go on past it.
    pub(super) fn skip_within(&mut self) -> Option<()> {
        self.skip_value()?;
        (self.i < self.b.len()).then_some(())
    }

    pub(super) fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    pub(super) fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    pub(super) fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    pub(super) fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// A string with no escapes (keys and routed values); its content. Escaped ones are left
    /// to the full parser, which decodes them.
    pub(super) fn plain_string(&mut self) -> Option<&'a [u8]> {
        let start = self.i + 1;
        self.string()?;
        let s = &self.b[start..self.i - 1];
        (!s.contains(&b'\\')).then_some(s)
    }

    /// Steps over a string starting at its opening quote.
    fn string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        let mut from = self.i;
        loop {
            let q = from + memchr::memchr(b'"', self.b.get(from..)?)?;
            // A quote is escaped when an odd number of backslashes stands before it.
            let slashes = self.b[self.i..q]
                .iter()
                .rev()
                .take_while(|&&c| c == b'\\')
                .count();
            if slashes % 2 == 0 {
                self.i = q + 1;
                return Some(());
            }
            from = q + 1;
        }
    }

    pub(super) fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// A string, number or literal (an id); objects and arrays are refused.
    fn scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string(),
            b'-' | b'0'..=b'9' => {
                while matches!(
                    self.peek(),
                    Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                ) {
                    self.i += 1;
                }
                Some(())
            }
            _ => None,
        }
    }

    /// Steps over any value: strings and containers by structure, the rest as a token.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.scalar(),
            _ => None,
        }
    }

    /// The members of `params`: the last string `sessionId` wins, as in the full parser.
    fn params_object(&mut self) -> Option<Option<Cow<'a, str>>> {
        self.eat(b'{')?;
        let mut session = None;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(None);
        }
        loop {
            let key = self.key()?;
            if key == b"sessionId" {
                if self.peek()? == b'"' {
                    let s = self.plain_string()?;
                    session = Some(Cow::Borrowed(std::str::from_utf8(s).ok()?));
                } else {
                    session = None;
                    self.skip_value()?;
                }
            } else {
                self.skip_value()?;
            }
            self.ws();
            match self.next()? {
                b',' => continue,
                b'}' => return Some(session),
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    /// What both parsers say of a body, comparable.
    fn view(e: &Envelope<'_>) -> String {
        format!(
            "{:?} id={:?} span={:?} method={:?} sid={:?} params={} obj={} err={}",
            e.kind,
            e.id.map(|r| r.get()),
            e.id_span,
            e.method,
            e.session_id,
            e.has_params,
            e.params_is_object,
            e.is_error
        )
    }

    fn agrees(body: &[u8]) {
        if let Some(f) = parse_fast(body) {
            let full = parse(body).unwrap_or_else(|e| {
                panic!(
                    "fast walk accepted what the parser refuses ({e}): {}",
                    String::from_utf8_lossy(body)
                )
            });
            assert_eq!(view(&f), view(&full), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn reads_what_the_cli_sends() {
        let cases: &[&[u8]] = &[
            br#"{"jsonrpc":"2.0","method":"session.event","params":{"sessionId":"s1","event":{"type":"assistant.message_delta","data":{"deltaContent":"a \"quoted\" }] \\"}}}}"#,
            br#"{"jsonrpc":"2.0","id":7,"result":{"sessionId":"x"}}"#,
            br#"{"jsonrpc":"2.0","id":"abc","error":{"code":-32603,"message":"m"}}"#,
            br#"{"jsonrpc":"2.0","id":3,"method":"permission.request","params":{"sessionId":"s","x":[1,2,{"a":null}]}}"#,
            br#" { "jsonrpc" : "2.0" , "method" : "m" , "params" : [ 1 , 2 ] } "#,
            br#"{"jsonrpc":"2.0","method":"m","params":null}"#,
            br#"{"jsonrpc":"2.0","method":"m","params":{"sessionId":"a","sessionId":"b"}}"#,
            br#"{"jsonrpc":"2.0","method":"m","params":{"sessionId":1}}"#,
            br#"{"jsonrpc":"2.0","method":"m","params":{}}"#,
            br#"{"method":"m","jsonrpc":"2.0","extra":true,"params":{"sessionId":"z"}}"#,
            br#"{"jsonrpc":"2.0","method":"m","params":{"sessionId":"s"},"id":9}"#,
        ];
        for c in cases {
            assert!(parse_fast(c).is_some(), "{}", String::from_utf8_lossy(c));
            agrees(c);
        }
        let e = parse_fast(cases[0]).unwrap();
        assert_eq!(e.kind, Kind::Notification);
        assert_eq!(e.session_id.as_deref(), Some("s1"));
        // An id after params, written by no CLI, is still seen.
        assert_eq!(parse_fast(cases[10]).unwrap().kind, Kind::Request);
    }

    #[test]
    fn leaves_the_unsure_to_the_parser() {
        let cases: &[&[u8]] = &[
            br#"{"jsonrpc":"2.0","id":1,"id":2,"result":1}"#,
            br#"{"jsonrpc":"2.0","method":"m\u0031"}"#,
            br#"{"jsonrpc":"1.0","method":"m"}"#,
            br#"{"jsonrpc":"2.0","id":null,"error":{}}"#,
            br#"{"jsonrpc":"2.0","id":1.5,"result":1}"#,
            br#"{"jsonrpc":"2.0","id":1}"#,
            br#"{"jsonrpc":"2.0","method":"m","params":"x"}"#,
            br#"{"jsonrpc":"2.0","method":"m","params":{"sessionId":"a\"b"}}"#,
            br#"{"jsonrpc":"2.0","method":"m"} x"#,
            br#"{"jsonrpc":"2.0","method":"m","params":{"a":"unterminated}}"#,
            br#"{"jsonrpc":"2.0","method":"m","params":{"a":[1,2}"#,
            br#"[{"jsonrpc":"2.0","method":"m"}]"#,
            br#"{}"#,
            b"",
        ];
        for c in cases {
            assert!(parse_fast(c).is_none(), "{}", String::from_utf8_lossy(c));
        }
    }

    #[test]
    fn a_64k_event_is_one_search() {
        let body = format!(
            r#"{{"jsonrpc":"2.0","method":"session.event","params":{{"sessionId":"s","event":{{"type":"assistant.message_delta","data":{{"deltaContent":"{}"}}}}}}}}"#,
            "x\\\"y".repeat(16_384)
        );
        agrees(body.as_bytes());
        assert_eq!(
            parse_fast(body.as_bytes()).unwrap().session_id.as_deref(),
            Some("s")
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// On any well-formed message, the walk either defers or says what serde says.
            #[test]
            fn agrees_with_the_parser(
                id in prop_oneof![Just(None), any::<i64>().prop_map(|n| Some(n.to_string())), "[a-z\"]{0,5}".prop_map(|s| Some(serde_json::Value::from(s).to_string()))],
                method in proptest::option::of("[a-z.]{1,12}"),
                params in proptest::option::of(crate::envelope::arb_json()),
                sid in proptest::option::of("[a-z0-9-]{1,8}"),
                tail in proptest::option::of(prop_oneof![Just("result"), Just("error"), Just("other")]),
                body in crate::envelope::arb_json(),
            ) {
                let mut s = String::from(r#"{"jsonrpc":"2.0""#);
                if let Some(id) = &id { s += &format!(r#","id":{id}"#); }
                if let Some(m) = &method { s += &format!(r#","method":"{m}""#); }
                match (params, &sid) {
                    (Some(serde_json::Value::Object(mut o)), Some(sid)) => {
                        o.insert("sessionId".into(), sid.clone().into());
                        s += &format!(r#","params":{}"#, serde_json::Value::Object(o));
                    }
                    (Some(p), _) => s += &format!(r#","params":{p}"#),
                    (None, _) => {}
                }
                if let Some(t) = tail { s += &format!(r#","{t}":{body}"#); }
                s.push('}');
                agrees(s.as_bytes());
                // Nothing here needs deferring unless the id is escaped: the walk must answer.
                if parse(s.as_bytes()).is_ok() && !id.as_deref().unwrap_or("").contains('\\') {
                    prop_assert!(parse_fast(s.as_bytes()).is_some(), "deferred: {}", s);
                }
            }

            #[test]
            fn never_panics(input in proptest::collection::vec(any::<u8>(), 0..256)) {
                let _ = parse_fast(&input);
            }
        }
    }
}
