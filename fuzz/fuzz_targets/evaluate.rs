//! libFuzzer target `evaluate`: the checks of `rollgate_proxy_core::fuzzing::evaluate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollgate_proxy_core::fuzzing::evaluate(data));
