//! libFuzzer target `upstream_machine`: the checks of `rollgate_proxy_core::fuzzing::upstream_machine`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollgate_proxy_core::fuzzing::upstream_machine(data));
