//! The undo log's entries on bytes (docs/HISTORY.md, "Files"): encoding,
//! and decoding that never trusts what it reads.

/// `TNDH`.
pub const MAGIC: &[u8; 4] = b"TNDH";
/// Bytes before an entry's payload.
pub const HEADER_LEN: usize = 52;
/// Largest payload of one undo entry (old data is saved in pieces of at
/// most this).
pub const MAX_PAYLOAD: usize = 4 << 20;

const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_POINT: u8 = 3;

/// What an entry says, without its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryHead {
    /// `[offset, offset + len)` of `volume` held the payload (`zero`:
    /// read as zeroes, no payload) right before the next write to it.
    Undo {
        volume: u32,
        offset: u64,
        len: u64,
        zero: bool,
        /// The record about to overwrite (0, 0 for a resync chunk).
        epoch: u64,
        seq: u64,
    },
    /// The images held exactly the records up to `seq` of `epoch`, which
    /// the primary had captured by `time_ms`.
    Point { epoch: u64, seq: u64, time_ms: u64 },
}

impl EntryHead {
    /// Payload bytes that follow the header.
    pub fn payload_len(&self) -> usize {
        match *self {
            // At most MAX_PAYLOAD (checked when decoding and encoding).
            EntryHead::Undo {
                len, zero: false, ..
            } => usize::try_from(len).unwrap_or(usize::MAX),
            _ => 0,
        }
    }

    /// Header plus payload.
    pub fn entry_len(&self) -> u64 {
        HEADER_LEN as u64 + self.payload_len() as u64
    }
}

/// Why bytes are not an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("{0} bytes: shorter than an entry header")]
    Short(usize),
    #[error("bad magic")]
    Magic,
    #[error("unknown entry kind {0}")]
    Kind(u8),
    #[error("entry length {stated} does not match its kind (expected {expected})")]
    Length { stated: u32, expected: u64 },
    #[error("undo payload of {0} bytes is larger than {MAX_PAYLOAD}")]
    TooLarge(u64),
    #[error("an undo entry of zero bytes")]
    Empty,
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("checksum mismatch")]
    Crc,
}

/// Appends `head` and its `payload` (the old data for a data undo entry,
/// empty otherwise) to `out`.
///
/// # Panics
/// Never for entries this crate builds; a payload whose length does not
/// match `head` is a bug and is refused by [`decode_head`] on reading.
pub fn encode(head: &EntryHead, payload: &[u8], out: &mut Vec<u8>) {
    let start = begin(out);
    out.extend_from_slice(payload);
    seal(head, start, out);
}

/// Starts an entry at the end of `out` built in place: room for its
/// header, which [`seal`] fills once the payload follows it. Returns
/// where the entry starts.
pub fn begin(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    start
}

/// Writes the header of `head` over the room [`begin`] made at `start`;
/// the payload is all of `out` after it.
///
/// # Panics
/// When `out` is shorter than `start + HEADER_LEN` (no [`begin`]: a bug).
pub fn seal(head: &EntryHead, start: usize, out: &mut [u8]) {
    let (kind, volume, a, b, epoch, seq) = match *head {
        EntryHead::Undo {
            volume,
            offset,
            len,
            zero,
            epoch,
            seq,
        } => (
            if zero { KIND_ZERO } else { KIND_DATA },
            volume,
            offset,
            len,
            epoch,
            seq,
        ),
        EntryHead::Point {
            epoch,
            seq,
            time_ms,
        } => (KIND_POINT, 0, time_ms, 0, epoch, seq),
    };
    let (h, payload) = out[start..].split_at_mut(HEADER_LEN);
    // HEADER_LEN + at most MAX_PAYLOAD: fits.
    #[allow(clippy::cast_possible_truncation)]
    let total = (HEADER_LEN + payload.len()) as u32;
    h[0..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&total.to_le_bytes());
    h[8] = kind;
    h[9..12].fill(0);
    h[12..16].copy_from_slice(&volume.to_le_bytes());
    h[16..24].copy_from_slice(&a.to_le_bytes());
    h[24..32].copy_from_slice(&b.to_le_bytes());
    h[32..40].copy_from_slice(&epoch.to_le_bytes());
    h[40..48].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[0..48]), payload);
    h[48..52].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes a header; returns it and the CRC to check the payload with
/// ([`check_payload`]).
pub fn decode_head(bytes: &[u8]) -> Result<(EntryHead, u32), EntryError> {
    let h: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(EntryError::Short(bytes.len()))?;
    if &h[0..4] != MAGIC {
        return Err(EntryError::Magic);
    }
    let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[at..at + 8]);
        u64::from_le_bytes(b)
    };
    if h[9..12] != [0, 0, 0] {
        return Err(EntryError::Reserved);
    }
    let total = u32_at(4);
    let head = match h[8] {
        KIND_DATA | KIND_ZERO => {
            let len = u64_at(24);
            if len == 0 {
                return Err(EntryError::Empty);
            }
            let zero = h[8] == KIND_ZERO;
            if !zero && len > MAX_PAYLOAD as u64 {
                return Err(EntryError::TooLarge(len));
            }
            EntryHead::Undo {
                volume: u32_at(12),
                offset: u64_at(16),
                len,
                zero,
                epoch: u64_at(32),
                seq: u64_at(40),
            }
        }
        KIND_POINT => {
            if u32_at(12) != 0 || u64_at(24) != 0 {
                return Err(EntryError::Reserved);
            }
            EntryHead::Point {
                epoch: u64_at(32),
                seq: u64_at(40),
                time_ms: u64_at(16),
            }
        }
        other => return Err(EntryError::Kind(other)),
    };
    if u64::from(total) != head.entry_len() {
        return Err(EntryError::Length {
            stated: total,
            expected: head.entry_len(),
        });
    }
    // The CRC covers the header's first 48 bytes and the payload.
    let partial = crc32c::crc32c(&h[0..48]);
    let stored = u32_at(48);
    Ok((head, partial ^ stored))
}

/// Checks a payload against what [`decode_head`] returned for its header.
pub fn check_payload(crc_key: u32, header: &[u8], payload: &[u8]) -> Result<(), EntryError> {
    let partial = crc32c::crc32c(header.get(..48).ok_or(EntryError::Short(header.len()))?);
    let stored = crc_key ^ partial;
    if crc32c::crc32c_append(partial, payload) == stored {
        Ok(())
    } else {
        Err(EntryError::Crc)
    }
}

/// Decodes one whole entry (header and payload) from the front of
/// `bytes`: the head, the payload and the entry's length.
pub fn decode(bytes: &[u8]) -> Result<(EntryHead, &[u8], usize), EntryError> {
    let (head, key) = decode_head(bytes)?;
    let n = head.payload_len();
    let payload = bytes
        .get(HEADER_LEN..HEADER_LEN + n)
        .ok_or(EntryError::Short(bytes.len()))?;
    check_payload(key, bytes, payload)?;
    Ok((head, payload, HEADER_LEN + n))
}

/// The fuzz target's body (`fuzz/fuzz_targets/history_entry.rs`): any
/// input is refused or decodes to an entry that encodes to the same
/// bytes.
///
/// # Panics
/// When that does not hold (the fuzzer's finding).
pub fn fuzz_one(data: &[u8]) {
    if let Ok((head, payload, n)) = decode(data) {
        let mut again = Vec::new();
        encode(&head, payload, &mut again);
        assert_eq!(&again[..], &data[..n], "an entry re-encodes to its bytes");
        assert_eq!(n as u64, head.entry_len());
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // small test values
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn head() -> impl Strategy<Value = (EntryHead, Vec<u8>)> {
        prop_oneof![
            (
                any::<u32>(),
                any::<u64>(),
                1u64..9000,
                any::<bool>(),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(volume, offset, len, zero, epoch, seq)| {
                    let payload = if zero {
                        Vec::new()
                    } else {
                        (0..len).map(|i| (i * 7 + seq) as u8).collect()
                    };
                    (
                        EntryHead::Undo {
                            volume,
                            offset,
                            len,
                            zero,
                            epoch,
                            seq,
                        },
                        payload,
                    )
                }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(epoch, seq, time_ms)| (
                EntryHead::Point {
                    epoch,
                    seq,
                    time_ms
                },
                Vec::new()
            )),
        ]
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The bytes docs/HISTORY.md describes, whether encoded whole or
    /// built in place after other entries.
    #[test]
    fn entries_have_the_documented_bytes() {
        let data = EntryHead::Undo {
            volume: 3,
            offset: 0x1234,
            len: 5,
            zero: false,
            epoch: 7,
            seq: 9,
        };
        let point = EntryHead::Point {
            epoch: 2,
            seq: 11,
            time_ms: 1000,
        };
        let mut out = Vec::new();
        encode(&data, b"hello", &mut out);
        assert_eq!(
            hex(&out),
            "544e4448390000000100000003000000341200000000000005000000000000000700000000000000\
             090000000000000054163b8d68656c6c6f"
        );
        let start = begin(&mut out);
        seal(&point, start, &mut out);
        assert_eq!(
            hex(&out[start..]),
            "544e4448340000000300000000000000e803000000000000000000000000000002000000000000000b\
             0000000000000013d5e6ad"
        );
        let start = begin(&mut out);
        out.extend_from_slice(b"hello");
        seal(&data, start, &mut out);
        assert_eq!(out[start..], out[..start - HEADER_LEN]);
    }

    proptest! {
        #[test]
        fn entries_decode_as_encoded((h, payload) in head()) {
            let mut out = Vec::new();
            encode(&h, &payload, &mut out);
            prop_assert_eq!(out.len() as u64, h.entry_len());
            let (back, p, n) = decode(&out).unwrap();
            prop_assert_eq!(back, h);
            prop_assert_eq!(p, &payload[..]);
            prop_assert_eq!(n, out.len());
        }

        #[test]
        fn any_flipped_bit_is_refused((h, payload) in head(), bit in any::<prop::sample::Index>()) {
            let mut out = Vec::new();
            encode(&h, &payload, &mut out);
            let i = bit.index(out.len() * 8);
            out[i / 8] ^= 1 << (i % 8);
            prop_assert!(decode(&out).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn a_cut_entry_is_refused((h, payload) in head(), cut in any::<prop::sample::Index>()) {
            let mut out = Vec::new();
            encode(&h, &payload, &mut out);
            let n = cut.index(out.len());
            prop_assert!(decode(&out[..n]).is_err());
        }
    }
}
