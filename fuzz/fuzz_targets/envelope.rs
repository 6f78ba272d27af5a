//! Arbitrary bodies through the envelope parser and the id splice the proxy performs.
#![no_main]

use copilot_lb::envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = envelope::sniff_id(data);
    if let Ok(env) = envelope::parse(data) {
        if let Some(span) = env.id_span {
            let out = envelope::splice(data, span, b"4242");
            let again = envelope::parse(&out).expect("splicing an integer id keeps the body valid");
            assert_eq!(again.id_u64(), Some(4242));
            assert_eq!(again.method, env.method);
            assert_eq!(again.session_id, env.session_id);
        }
    }
});
