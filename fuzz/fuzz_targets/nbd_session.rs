//! Fuzzes a whole NBD session (handshake, then transmission) on the
//! server's codecs: `cargo +nightly fuzz run nbd_session`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_nbd::fuzzing::fuzz_one(data);
});
