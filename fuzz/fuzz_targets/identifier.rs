#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kakehashi_fuzz::identifier(data));
