//! libFuzzer entry for `ratekeeper::fuzzing::config_loader`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ratekeeper::fuzzing::config_loader(data));
