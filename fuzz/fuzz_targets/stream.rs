//! Arbitrary bodies through the streamed-frame path: the envelope read from a prefix, and
//! the check fed in arbitrary chunks. The check must never accept a body the buffered path
//! refuses, nor one whose envelope differs from what the prefix said.
#![no_main]

use copilot_lb::envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let head_len = (split as usize * 4).min(body.len());
    let Some(head) = envelope::parse_head(&body[..head_len]) else {
        return;
    };
    let mut check = envelope::Tail::new(head.cut, 128);
    let mut ok = true;
    for c in body.chunks(1 + split as usize % 7) {
        if check.feed(c).is_err() {
            ok = false;
            break;
        }
    }
    if !ok || check.finish().is_err() {
        return;
    }
    let full = envelope::check_text(body, 128)
        .and_then(|()| envelope::parse(body))
        .expect("a body the stream check accepts is one the buffered path accepts");
    assert_eq!(full.kind, head.env.kind);
    assert_eq!(full.id_span, head.env.id_span);
    assert_eq!(full.method, head.env.method);
    assert_eq!(full.session_id, head.env.session_id);
});
