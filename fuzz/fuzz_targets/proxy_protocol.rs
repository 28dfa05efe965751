//! PROXY protocol v2 headers: any bytes give a length within bounds and a
//! source address or a clean refusal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turnstile::proto::proxy_protocol::{FIXED_LEN, body_len, source};

fuzz_target!(|data: &[u8]| {
    let Some(fixed) = data.get(..FIXED_LEN) else {
        return;
    };
    let fixed: &[u8; FIXED_LEN] = fixed.try_into().unwrap();
    if let Ok(n) = body_len(fixed) {
        assert!(n <= u16::MAX as usize);
        let body = &data[FIXED_LEN..];
        let body = &body[..n.min(body.len())];
        std::hint::black_box(source(fixed, body).ok());
    }
});
