//! libFuzzer target `upstream_json`: the checks of `rollgate_proxy_core::fuzzing::upstream_json`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollgate_proxy_core::fuzzing::upstream_json(data));
