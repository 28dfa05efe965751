//! The metrics and admin listeners' request heads: any bytes parse into a
//! request within the buffer, ask for more, or are refused; query
//! parameters of whatever parsed are read without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turnstile::ops::http::{Head, parse_head};

fuzz_target!(|data: &[u8]| {
    if let Head::Complete { request, head_len, .. } = parse_head(data) {
        assert!(head_len <= data.len());
        for name in ["ttl", "username", "", "user"] {
            std::hint::black_box(request.query_param(name));
        }
    }
});
