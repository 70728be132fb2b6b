//! libFuzzer target `sse_decoder`: the checks of `rollgate_proxy_core::fuzzing::sse_decoder`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollgate_proxy_core::fuzzing::sse_decoder(data));
