//! Fuzzes the rollback `.index` decoder (docs/ROLLBACK.md): every input is
//! refused or decodes to an index that re-encodes to the same bytes and
//! keeps its invariants: `cargo +nightly fuzz run rollback_index`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_agent::rollback::fuzz_one(data);
});
