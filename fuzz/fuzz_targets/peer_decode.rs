//! Fuzzes the peer-protocol decoder (frames, messages, payload decoding)
//! and its round trip: `cargo +nightly fuzz run peer_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tandem_peer::fuzzing::fuzz_one(data);
});
