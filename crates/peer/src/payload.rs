//! Encoded bytes (docs/PEER.md, "Encoded bytes"): raw, zstd or all zeroes,
//! and the per-connection compression policy that picks among them.

use std::fmt;

use bytes::Bytes;

use crate::error::PeerError;
use crate::MAX_DATA;

/// How the bytes of a [`Payload`] encode its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// The data itself.
    Raw = 0,
    /// One or more zstd frames.
    Zstd = 1,
    /// `raw_len` zero bytes; nothing on the wire.
    Zeroes = 2,
}

impl Encoding {
    /// `"raw"`, `"zstd"` or `"zeroes"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Zstd => "zstd",
            Encoding::Zeroes => "zeroes",
        }
    }

    /// Parses the wire value.
    pub fn from_u8(value: u8) -> Option<Encoding> {
        Some(match value {
            0 => Encoding::Raw,
            1 => Encoding::Zstd,
            2 => Encoding::Zeroes,
            _ => return None,
        })
    }
}

/// Encoded data as carried by `Record`, `Chunk` and `File`.
///
/// On the wire: `encoding u8, raw_len u32, u32 length + bytes`. A decoded
/// frame guarantees `raw_len <= MAX_DATA`, `bytes.len() == raw_len` for
/// `Raw` and empty `bytes` for `Zeroes`; `Zstd` bytes are only checked by
/// [`Payload::decode`].
#[derive(Clone, PartialEq, Eq)]
pub struct Payload {
    pub encoding: Encoding,
    /// Length of the decoded data.
    pub raw_len: u32,
    /// The bytes on the wire (shared: a raw payload is the caller's
    /// buffer, not a copy of it).
    pub bytes: Bytes,
}

/// Bytes of a payload on the wire besides its bytes.
pub const PAYLOAD_OVERHEAD: usize = 1 + 4 + 4;

/// Data shorter than this is never compressed.
const MIN_COMPRESS: usize = 128;

impl fmt::Debug for Payload {
    // The bytes may be megabytes: show their size only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payload")
            .field("encoding", &self.encoding)
            .field("raw_len", &self.raw_len)
            .field("bytes", &format_args!("[{} bytes]", self.bytes.len()))
            .finish()
    }
}

impl Default for Payload {
    fn default() -> Payload {
        Payload::empty()
    }
}

impl Payload {
    /// No data (raw, zero length).
    pub fn empty() -> Payload {
        Payload {
            encoding: Encoding::Raw,
            raw_len: 0,
            bytes: Bytes::new(),
        }
    }

    /// `data` as it is. `data` must be at most [`MAX_DATA`] bytes (a larger
    /// one gets a `raw_len` that the encoder refuses).
    pub fn raw(data: impl Into<Bytes>) -> Payload {
        let bytes = data.into();
        Payload {
            encoding: Encoding::Raw,
            raw_len: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
            bytes,
        }
    }

    /// `len` zero bytes.
    pub fn zeroes(len: u32) -> Payload {
        Payload {
            encoding: Encoding::Zeroes,
            raw_len: len,
            bytes: Bytes::new(),
        }
    }

    /// Encodes with the compressor's current policy: all-zero data ->
    /// `Zeroes` (no bytes); zstd if it saves at least 1/8 and the compressor
    /// is not backing off, else `Raw`. Empty data gives [`Payload::empty`].
    /// `data` must be at most [`MAX_DATA`] bytes.
    pub fn encode(data: &[u8], compressor: &mut Compressor) -> Payload {
        compressor.encode(data, None)
    }

    /// [`Payload::encode`] of shared data: sent raw, the payload shares
    /// `data` instead of copying it.
    pub fn encode_shared(data: &Bytes, compressor: &mut Compressor) -> Payload {
        compressor.encode(data, Some(data))
    }

    /// Whether the data is empty.
    pub fn is_empty(&self) -> bool {
        self.raw_len == 0
    }

    /// Bytes on the wire for this payload (header and bytes).
    pub fn wire_len(&self) -> usize {
        PAYLOAD_OVERHEAD + self.bytes.len()
    }

    /// Checks what a decoder checks of a payload without decompressing it.
    pub(crate) fn check(&self, kind: &str) -> Result<(), PeerError> {
        if self.raw_len as usize > MAX_DATA {
            return Err(PeerError::DataTooLarge {
                len: u64::from(self.raw_len),
                max: MAX_DATA as u64,
            });
        }
        match self.encoding {
            Encoding::Raw if self.bytes.len() != self.raw_len as usize => {
                Err(PeerError::malformed(
                    kind,
                    format_args!(
                        "raw data of {} bytes but raw_len {}",
                        self.bytes.len(),
                        self.raw_len
                    ),
                ))
            }
            Encoding::Zeroes if !self.bytes.is_empty() => Err(PeerError::malformed(
                kind,
                format_args!("zeroes encoding carries {} bytes", self.bytes.len()),
            )),
            _ => Ok(()),
        }
    }

    /// The decoded data. Checks `raw_len <= MAX_DATA` and that the bytes
    /// decode to exactly `raw_len` bytes; never allocates more than
    /// `raw_len` bytes, whatever the compressed data claims.
    pub fn decode(&self) -> Result<Vec<u8>, PeerError> {
        let mut out = Vec::new();
        self.decode_into(&mut out)?;
        Ok(out)
    }

    /// Like [`Payload::decode`], into `out` (cleared first), so that a
    /// buffer can be reused.
    pub fn decode_into(&self, out: &mut Vec<u8>) -> Result<(), PeerError> {
        out.clear();
        self.decode_append(out)
    }

    /// Like [`Payload::decode`], appended to `out` (a record decoded
    /// straight into a batch: no copy in between). On an error `out` is
    /// as it was.
    pub fn decode_append(&self, out: &mut Vec<u8>) -> Result<(), PeerError> {
        self.check("payload")?;
        let want = self.raw_len as usize;
        match self.encoding {
            Encoding::Raw => out.extend_from_slice(&self.bytes),
            Encoding::Zeroes => out.resize(out.len() + want, 0),
            Encoding::Zstd => {
                let start = out.len();
                out.resize(start + want, 0);
                let mut dctx = zstd::bulk::Decompressor::new()
                    .map_err(|e| PeerError::Decompress(format!("zstd context: {e}")))?;
                // The destination (exactly `want` bytes) bounds the
                // output: zstd fails rather than write past it, so no
                // compressed data can make us allocate more.
                let decoded = dctx.decompress_to_buffer(&self.bytes, &mut out[start..]);
                match decoded {
                    Ok(got) if got == want => {}
                    Ok(got) => {
                        out.truncate(start);
                        return Err(PeerError::Decompress(format!(
                            "zstd data decodes to {got} bytes but raw_len is {want}"
                        )));
                    }
                    Err(e) => {
                        out.truncate(start);
                        return Err(PeerError::Decompress(format!(
                            "zstd data ({} bytes, raw_len {want}): {e}",
                            self.bytes.len()
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether every byte of `data` is zero (fast: whole blocks at a time).
pub fn is_zero(data: &[u8]) -> bool {
    // Most data written is not zero, and says so in its first bytes.
    let head = &data[..data.len().min(64)];
    if head.iter().any(|&b| b != 0) {
        return false;
    }
    data.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Consecutive incompressible payloads before backing off.
const BACKOFF_AFTER: u32 = 8;
/// Payloads skipped at the first backoff; doubles at each failed probe.
const BACKOFF_FIRST: u32 = 64;
/// Scratch capacity kept between payloads.
const SCRATCH_KEEP: usize = 4 << 20;
/// The longest backoff, in payloads.
const BACKOFF_MAX: u32 = 1024;

/// Per-connection compression policy with backoff.
///
/// After [`BACKOFF_AFTER`] (8) consecutive incompressible payloads (zstd
/// saves less than 1/8), compression is not attempted for the next 64
/// payloads; then one payload is tried: incompressible again doubles the
/// pause (up to 1024 payloads), compressible resumes compressing every
/// payload. Incompressible streams thus cost about one attempt per thousand
/// payloads. All-zero data is always sent as `Zeroes`, even when disabled.
/// Data under 128 bytes is sent raw and does not count.
pub struct Compressor {
    ctx: Option<zstd::bulk::Compressor<'static>>,
    level: i32,
    misses: u32,
    skip: u32,
    next_backoff: u32,
    raw_bytes: u64,
    wire_bytes: u64,
    attempts: u64,
    skipped: u64,
    /// Whether compressing pays now (see [`Compressor::set_wanted`]).
    wanted: bool,
    scratch: Vec<u8>,
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressor")
            .field("enabled", &self.ctx.is_some())
            .field("level", &self.level)
            .field("misses", &self.misses)
            .field("skip", &self.skip)
            .field("raw_bytes", &self.raw_bytes)
            .field("wire_bytes", &self.wire_bytes)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl Default for Compressor {
    /// Level 1.
    fn default() -> Compressor {
        Compressor::new(1)
    }
}

impl Compressor {
    /// A compressor at zstd `level` (1 to 3 suit replication; other levels
    /// are passed to zstd as they are). If zstd cannot set up a context,
    /// the compressor is disabled.
    pub fn new(level: i32) -> Compressor {
        Compressor::with_context(zstd::bulk::Compressor::new(level).ok(), level)
    }

    /// A compressor that never compresses (zero data still becomes `Zeroes`).
    pub fn disabled() -> Compressor {
        Compressor::with_context(None, 0)
    }

    fn with_context(ctx: Option<zstd::bulk::Compressor<'static>>, level: i32) -> Compressor {
        Compressor {
            ctx,
            level,
            misses: 0,
            skip: 0,
            next_backoff: BACKOFF_FIRST,
            raw_bytes: 0,
            wire_bytes: 0,
            attempts: 0,
            skipped: 0,
            wanted: true,
            scratch: Vec::new(),
        }
    }

    /// Whether compressing is worth its CPU now (the default). A sender
    /// whose link keeps up with it says no: zstd costs ~2 ms of CPU per
    /// MiB, more than sending the raw bytes to a link with room; once the
    /// link falls behind, fewer bytes are what counts. While not wanted,
    /// payloads go raw (zero data still becomes `Zeroes`).
    pub fn set_wanted(&mut self, wanted: bool) {
        self.wanted = wanted;
    }

    /// Whether this compressor ever compresses.
    pub fn is_enabled(&self) -> bool {
        self.ctx.is_some()
    }

    /// `(raw_bytes, wire_bytes)`: data given to [`Payload::encode`] and the
    /// bytes its payloads take on the wire ([`Payload::wire_len`]).
    pub fn stats(&self) -> (u64, u64) {
        (self.raw_bytes, self.wire_bytes)
    }

    /// How many payloads zstd was run on.
    pub fn attempts(&self) -> u64 {
        self.attempts
    }

    /// How many payloads were sent raw without trying zstd (backoff).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Whether the compressor is backing off now (the next compressible
    /// payload would be sent raw).
    pub fn backing_off(&self) -> bool {
        self.skip > 0
    }

    fn encode(&mut self, data: &[u8], shared: Option<&Bytes>) -> Payload {
        let raw =
            || Payload::raw(shared.map_or_else(|| Bytes::copy_from_slice(data), Bytes::clone));
        let payload = self.choose(data, raw);
        self.raw_bytes += data.len() as u64;
        self.wire_bytes += payload.wire_len() as u64;
        payload
    }

    /// `raw`: the data as a raw payload.
    fn choose(&mut self, data: &[u8], raw: impl FnOnce() -> Payload) -> Payload {
        if data.is_empty() {
            return Payload::empty();
        }
        let raw_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        if is_zero(data) {
            return Payload::zeroes(raw_len);
        }
        let Some(ctx) = self.ctx.as_mut() else {
            return raw();
        };
        if data.len() < MIN_COMPRESS || !self.wanted {
            return raw();
        }
        if self.skip > 0 {
            self.skip -= 1;
            self.skipped += 1;
            return raw();
        }
        self.attempts += 1;
        // Room for the largest output worth sending: saving at least 1/8.
        // zstd fails when the output does not fit, which is a miss.
        let limit = data.len() - data.len().div_ceil(8);
        self.scratch.clear();
        self.scratch.reserve_exact(limit);
        match ctx.compress_to_buffer(data, &mut self.scratch) {
            Ok(n) if n <= limit => {
                self.misses = 0;
                self.next_backoff = BACKOFF_FIRST;
                let bytes = Bytes::copy_from_slice(&self.scratch[..n]);
                self.trim_scratch();
                Payload {
                    encoding: Encoding::Zstd,
                    raw_len,
                    bytes,
                }
            }
            _ => {
                self.trim_scratch();
                self.misses = self.misses.saturating_add(1);
                if self.misses >= BACKOFF_AFTER {
                    self.skip = self.next_backoff;
                    self.next_backoff = (self.next_backoff * 2).min(BACKOFF_MAX);
                }
                raw()
            }
        }
    }

    /// Keeps no more than a few MiB of scratch between payloads.
    fn trim_scratch(&mut self) {
        if self.scratch.capacity() > SCRATCH_KEEP {
            self.scratch = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 32) & 0xff) as u8
            })
            .collect()
    }

    #[test]
    fn backoff_schedule() {
        let mut c = Compressor::new(1);
        let mut tried = Vec::new();
        for i in 0..1000u64 {
            let before = c.attempts();
            c.encode(&noise(512, i + 1), None);
            if c.attempts() > before {
                tried.push(i);
            }
        }
        // 8 misses, then a probe after 64, 128, 256 and 512 skipped.
        let probes = [8 + 64, 8 + 64 + 1 + 128, 8 + 64 + 1 + 128 + 1 + 256];
        let mut want: Vec<u64> = (0..8).collect();
        want.extend(probes);
        want.push(probes[2] + 1 + 512);
        assert_eq!(tried, want);
        assert_eq!(c.next_backoff, BACKOFF_MAX);
    }

    #[test]
    fn is_zero_blocks() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 10_000]));
        let mut d = vec![0u8; 10_000];
        d[9_999] = 1;
        assert!(!is_zero(&d));
    }

    #[test]
    fn zero_detection_sees_every_byte() {
        for len in [0, 1, 7, 8, 63, 64, 65, 4096, 4097] {
            let mut b = vec![0u8; len];
            assert!(is_zero(&b));
            for i in 0..len {
                b[i] = 1;
                assert!(!is_zero(&b), "{len} bytes, byte {i}");
                b[i] = 0;
            }
        }
    }

    #[test]
    fn scratch_is_trimmed() {
        let mut c = Compressor::new(1);
        c.encode(&noise(6 << 20, 3), None);
        assert!(c.scratch.capacity() <= SCRATCH_KEEP);
    }

    #[test]
    fn debug_hides_bytes() {
        let p = Payload::raw(vec![7; 1000]);
        assert_eq!(
            format!("{p:?}"),
            "Payload { encoding: Raw, raw_len: 1000, bytes: [1000 bytes] }"
        );
    }
}
