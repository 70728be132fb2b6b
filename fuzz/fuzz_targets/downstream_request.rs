//! libFuzzer target `downstream_request`: the checks of `rollgate_proxy_core::fuzzing::downstream_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollgate_proxy_core::fuzzing::downstream_request(data));
