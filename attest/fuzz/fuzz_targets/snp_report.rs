#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cvm_attest_fuzz::snp_report(data));
