//! Fuzzes the undo history's entry decoder (docs/HISTORY.md): every input
//! is refused or decodes to an entry that re-encodes to the same bytes:
//! `cargo +nightly fuzz run history_entry`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_replication::history::entry::fuzz_one(data);
});
