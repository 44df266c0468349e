//! Fuzzes the replica journal's segment scanner (docs/REPLICA.md): the
//! valid run it finds is a prefix of entries that encode back to their
//! bytes, in increasing seq order, ended only as the format says:
//! `cargo +nightly fuzz run journal_segment`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_replication::journal::fuzz_one(data);
});
