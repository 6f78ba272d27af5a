//! Arbitrary bytes through the frame reader: it must never panic, and every frame it returns
//! must re-encode to a canonical frame that decodes to the same body.
#![no_main]

use copilot_lb::codec::{encode_frame, FrameReader, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let limits = Limits {
            max_header: 256,
            max_frame: 4096,
        };
        let mut r = FrameReader::new(data, limits);
        for _ in 0..64 {
            match r.read_frame().await {
                Ok(Some(body)) => {
                    let wire = encode_frame(&body);
                    let mut again = FrameReader::new(&wire[..], limits);
                    let back = again.read_frame().await.unwrap().unwrap();
                    assert_eq!(back, body);
                }
                Ok(None) => break,
                Err(e) if e.recoverable() => continue,
                Err(_) => break,
            }
        }
    });
});
