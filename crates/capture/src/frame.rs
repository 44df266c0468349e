//! The frame of one spilled record (docs/CAPTURE.md, "The replication queue
//! on disk"): a 56-byte header with its own CRC, then the payload. Pure
//! encoding and checking; the segment files are in `spill`.

use std::time::{Duration, Instant};

use crate::group::{Op, Record};

pub const HEADER_LEN: usize = 56;
const MAGIC: &[u8; 4] = b"TSF1";

const KIND_WRITE: u8 = 1;
const KIND_WRITE_ZEROES: u8 = 2;
const KIND_TRIM: u8 = 3;
const KIND_FLUSH: u8 = 4;
const FLAG_FUA: u8 = 1;

/// Why a frame was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic")]
    Magic,
    #[error("header checksum mismatch")]
    HeaderCrc,
    #[error("payload checksum mismatch")]
    PayloadCrc,
    #[error("invalid field: {0}")]
    Field(&'static str),
    #[error("payload of {0} bytes is too large for a frame")]
    TooLarge(usize),
}

/// A checked frame header: everything about the record but its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub seq: u64,
    pub volume: u32,
    kind: u8,
    fua: bool,
    pub offset: u64,
    /// Bytes the change touches (the payload length for a WRITE).
    pub len: u64,
    /// Capture time, nanoseconds after the base instant.
    pub at_nanos: u64,
    payload_len: u32,
    payload_crc: u32,
}

impl Header {
    /// The header of `record`, timed relative to `base`.
    pub fn of(record: &Record, base: Instant) -> Result<Header, FrameError> {
        let (kind, fua, offset, len, payload) = match &record.op {
            Op::Write { offset, data, fua } => {
                (KIND_WRITE, *fua, *offset, data.len() as u64, &data[..])
            }
            Op::WriteZeroes { offset, len, fua } => {
                (KIND_WRITE_ZEROES, *fua, *offset, *len, &[][..])
            }
            Op::Trim { offset, len, fua } => (KIND_TRIM, *fua, *offset, *len, &[][..]),
            Op::Flush => (KIND_FLUSH, false, 0, 0, &[][..]),
        };
        let payload_len =
            u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge(payload.len()))?;
        let at_nanos =
            u64::try_from(record.at.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX);
        Ok(Header {
            seq: record.seq,
            volume: record.volume,
            kind,
            fua,
            offset,
            len,
            at_nanos,
            payload_len,
            payload_crc: crc32c::crc32c(payload),
        })
    }

    pub fn payload_len(&self) -> u64 {
        u64::from(self.payload_len)
    }

    /// Bytes of the whole frame.
    pub fn frame_len(&self) -> u64 {
        HEADER_LEN as u64 + self.payload_len()
    }

    /// The range of the volume the change touches (as [`Op::range`]).
    pub fn range(&self) -> Option<(u64, u64)> {
        (self.kind != KIND_FLUSH).then_some((self.offset, self.len))
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.volume.to_le_bytes());
        b[20] = self.kind;
        b[21] = if self.fua { FLAG_FUA } else { 0 };
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b[40..48].copy_from_slice(&self.at_nanos.to_le_bytes());
        b[48..52].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Checks and decodes a header (invariant S1: nothing in it is trusted
    /// before its CRC matches).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        if &b[0..4] != MAGIC {
            return Err(FrameError::Magic);
        }
        if crc32c::crc32c(&b[..52]) != le32(&b[52..56]) {
            return Err(FrameError::HeaderCrc);
        }
        let h = Header {
            payload_len: le32(&b[4..8]),
            seq: le64(&b[8..16]),
            volume: le32(&b[16..20]),
            kind: b[20],
            fua: b[21] & FLAG_FUA != 0,
            offset: le64(&b[24..32]),
            len: le64(&b[32..40]),
            at_nanos: le64(&b[40..48]),
            payload_crc: le32(&b[48..52]),
        };
        if b[21] & !FLAG_FUA != 0 || b[22..24] != [0, 0] {
            return Err(FrameError::Field("flags"));
        }
        let payload_ok = match h.kind {
            KIND_WRITE => h.len == h.payload_len(),
            KIND_WRITE_ZEROES | KIND_TRIM => h.payload_len == 0,
            KIND_FLUSH => h.payload_len == 0 && h.offset == 0 && h.len == 0 && !h.fua,
            _ => return Err(FrameError::Field("kind")),
        };
        if !payload_ok {
            return Err(FrameError::Field("length"));
        }
        if h.offset.checked_add(h.len).is_none() {
            return Err(FrameError::Field("offset"));
        }
        Ok(h)
    }

    /// The record, from this header and its payload (checked against the
    /// payload CRC).
    pub fn record(&self, payload: Vec<u8>, base: Instant) -> Result<Record, FrameError> {
        if payload.len() as u64 != self.payload_len() {
            return Err(FrameError::Field("payload length"));
        }
        if crc32c::crc32c(&payload) != self.payload_crc {
            return Err(FrameError::PayloadCrc);
        }
        let (offset, len, fua) = (self.offset, self.len, self.fua);
        let op = match self.kind {
            KIND_WRITE => Op::Write {
                offset,
                data: bytes::Bytes::from(payload),
                fua,
            },
            KIND_WRITE_ZEROES => Op::WriteZeroes { offset, len, fua },
            KIND_TRIM => Op::Trim { offset, len, fua },
            _ => Op::Flush,
        };
        Ok(Record {
            seq: self.seq,
            volume: self.volume,
            op,
            at: self.at(base),
        })
    }

    pub fn at(&self, base: Instant) -> Instant {
        base + Duration::from_nanos(self.at_nanos)
    }
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn payload(op: &Op) -> &[u8] {
        match op {
            Op::Write { data, .. } => data,
            _ => &[],
        }
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..300),
                any::<bool>()
            )
                .prop_map(|(offset, data, fua)| Op::Write {
                    offset: u64::from(offset),
                    data: data.into(),
                    fua
                }),
            (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(o, l, fua)| Op::WriteZeroes {
                offset: u64::from(o),
                len: u64::from(l),
                fua
            }),
            (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(o, l, fua)| Op::Trim {
                offset: u64::from(o),
                len: u64::from(l),
                fua
            }),
            Just(Op::Flush),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(seq in 1u64.., volume in 0u32..8, op in arb_op(), after in 0u64..1 << 40) {
            let base = Instant::now();
            let record = Record { seq, volume, op, at: base + Duration::from_nanos(after) };
            let h = Header::of(&record, base).unwrap();
            let decoded = Header::decode(&h.encode()).unwrap();
            prop_assert_eq!(decoded, h);
            prop_assert_eq!(decoded.range(), record.op.range());
            let back = decoded.record(payload(&record.op).to_vec(), base).unwrap();
            prop_assert_eq!(back, record);
        }

        #[test]
        fn any_flipped_header_bit_is_rejected(op in arb_op(), bit in 0usize..HEADER_LEN * 8) {
            let base = Instant::now();
            let record = Record { seq: 7, volume: 1, op, at: base };
            let mut b = Header::of(&record, base).unwrap().encode();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Header::decode(&b).is_err());
        }
    }

    #[test]
    fn a_damaged_payload_is_rejected() {
        let base = Instant::now();
        let record = Record {
            seq: 3,
            volume: 0,
            op: Op::Write {
                offset: 4096,
                data: vec![5; 512].into(),
                fua: false,
            },
            at: base,
        };
        let h = Header::decode(&Header::of(&record, base).unwrap().encode()).unwrap();
        let mut data = vec![5; 512];
        data[100] = 6;
        assert_eq!(h.record(data, base), Err(FrameError::PayloadCrc));
        assert_eq!(
            h.record(vec![5; 511], base),
            Err(FrameError::Field("payload length"))
        );
    }

    #[test]
    fn garbage_headers_are_rejected_without_panicking() {
        assert_eq!(Header::decode(&[0; HEADER_LEN]), Err(FrameError::Magic));
        let mut b = [0xffu8; HEADER_LEN];
        b[0..4].copy_from_slice(MAGIC);
        assert_eq!(Header::decode(&b), Err(FrameError::HeaderCrc));
    }
}
