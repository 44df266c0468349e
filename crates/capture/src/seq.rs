//! Sequence numbers that increase across restarts and crashes: a reserved
//! block is made durable before any number of it is issued (docs/CAPTURE.md).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::CaptureError;

const MAGIC: &[u8; 8] = b"TNDSEQ01";
const SLOT_LEN: usize = 32;
const SLOT_STRIDE: u64 = 512;
/// Numbers reserved per durable write.
pub const RESERVE: u64 = 1 << 20;

/// Issues sequence numbers for one group.
#[derive(Debug)]
pub struct SeqAllocator {
    file: File,
    path: PathBuf,
    generation: u64,
    next: u64,
    reserved_until: u64,
}

impl SeqAllocator {
    pub fn open(path: &Path) -> Result<SeqAllocator, CaptureError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(CaptureError::io(path, "open sequence file"))?;
        let len = file
            .metadata()
            .map_err(CaptureError::io(path, "stat"))?
            .len();
        let (generation, start) = if len == 0 {
            (0, 1)
        } else {
            let mut best: Option<(u64, u64)> = None;
            for slot in 0..2 {
                let mut buf = [0u8; SLOT_LEN];
                match file.read_exact_at(&mut buf, slot * SLOT_STRIDE) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => continue,
                    Err(e) => return Err(CaptureError::io(path, "read sequence file")(e)),
                }
                if let Some(found) = decode_slot(&buf) {
                    if best.is_none_or(|b| found.0 > b.0) {
                        best = Some(found);
                    }
                }
            }
            best.ok_or_else(|| CaptureError::Corrupt {
                path: path.to_owned(),
                reason: "neither sequence slot is valid".into(),
            })?
        };
        let mut seq = SeqAllocator {
            file,
            path: path.to_owned(),
            generation,
            next: start,
            reserved_until: start,
        };
        seq.reserve()?;
        Ok(seq)
    }

    /// The next number, reserving a new block durably when needed.
    pub fn issue(&mut self) -> Result<u64, CaptureError> {
        if self.next >= self.reserved_until {
            self.reserve()?;
        }
        let n = self.next;
        self.next += 1;
        Ok(n)
    }

    /// Makes the next number at least `floor`, durably (a new owner's
    /// sequence continues after the records it took over with).
    pub fn raise_to(&mut self, floor: u64) -> Result<(), CaptureError> {
        if self.next < floor {
            self.next = floor;
            self.reserve()?;
        }
        Ok(())
    }

    /// Starts the sequence file of a new owner: numbers from `floor` on.
    pub fn create_from(path: &Path, floor: u64) -> Result<(), CaptureError> {
        SeqAllocator::open(path)?.raise_to(floor)
    }

    /// The number the next change will get.
    pub fn peek(&self) -> u64 {
        self.next
    }

    fn reserve(&mut self) -> Result<(), CaptureError> {
        let generation = self.generation + 1;
        let until = self.next + RESERVE;
        let slot = encode_slot(generation, until);
        self.file
            .write_all_at(&slot, (generation % 2) * SLOT_STRIDE)
            .and_then(|()| self.file.sync_data())
            .map_err(CaptureError::io(&self.path, "write sequence reservation"))?;
        self.generation = generation;
        self.reserved_until = until;
        Ok(())
    }
}

fn encode_slot(generation: u64, reserved_until: u64) -> [u8; SLOT_LEN] {
    let mut buf = [0u8; SLOT_LEN];
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&generation.to_le_bytes());
    buf[16..24].copy_from_slice(&reserved_until.to_le_bytes());
    let crc = crc32c::crc32c(&buf[0..24]);
    buf[24..28].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// `(generation, reserved_until)` of a valid slot.
fn decode_slot(buf: &[u8; SLOT_LEN]) -> Option<(u64, u64)> {
    if &buf[0..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(buf[24..28].try_into().ok()?);
    if crc != crc32c::crc32c(&buf[0..24]) {
        return None;
    }
    let generation = u64::from_le_bytes(buf[8..16].try_into().ok()?);
    let until = u64::from_le_bytes(buf[16..24].try_into().ok()?);
    Some((generation, until))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_increase_across_reopen_and_skip_the_unused_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seq");
        let mut a = SeqAllocator::open(&path).unwrap();
        assert_eq!(a.issue().unwrap(), 1);
        assert_eq!(a.issue().unwrap(), 2);
        drop(a); // as after SIGKILL: nothing more is written
        let mut b = SeqAllocator::open(&path).unwrap();
        let n = b.issue().unwrap();
        assert!(n > 2, "got {n}");
        assert_eq!(n, 1 + RESERVE);
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_other_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seq");
        let mut a = SeqAllocator::open(&path).unwrap();
        let first = a.issue().unwrap();
        drop(a);
        let b = SeqAllocator::open(&path).unwrap(); // writes generation 2 (slot 0)
        drop(b);
        // Damage the newest slot (generation 2 lives in slot 0).
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 4], 10).unwrap();
        let mut c = SeqAllocator::open(&path).unwrap();
        assert!(c.issue().unwrap() > first);
    }

    #[test]
    fn two_bad_slots_are_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seq");
        std::fs::write(&path, vec![7u8; 1024]).unwrap();
        let err = SeqAllocator::open(&path).unwrap_err().to_string();
        assert!(err.contains("seq") && err.contains("neither"), "{err}");
    }
}
