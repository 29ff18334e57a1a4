#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tern_fuzz::cluster::cluster_record(data));
