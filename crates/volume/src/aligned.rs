//! Buffers for direct I/O: their bytes start at a [`DIRECT_ALIGN`]ed
//! address (what `O_DIRECT` asks of memory), without `unsafe`.

use crate::file::DIRECT_ALIGN;

/// `len` zeroed bytes at an aligned address.
pub struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let off = raw.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { raw, off, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bytes_start_aligned_and_are_as_long_as_asked() {
        for len in [0, 1, 4095, 4096, 1 << 20] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.bytes().len(), len);
            assert_eq!(b.bytes_mut().as_ptr() as usize % DIRECT_ALIGN, 0);
            assert!(b.bytes().iter().all(|&x| x == 0));
        }
    }
}
