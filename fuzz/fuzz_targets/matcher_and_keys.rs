//! libFuzzer entry for `ratekeeper::fuzzing::matcher_and_keys`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ratekeeper::fuzzing::matcher_and_keys(data));
