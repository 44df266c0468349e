//! Frames on bytes: [`encode`] appends one, [`decode`] takes one off the
//! front of a buffer (docs/PEER.md, "Framing").

use crate::bounds::{
    self, DIVERGED_RULE, MAX_BITMAP, MAX_DIVERGED_RANGES, MAX_HASHES, MAX_LEASE_GROUPS, MAX_NAME,
    MAX_PATH, MAX_REASON, MAX_VOLUMES,
};
use crate::error::PeerError;
use crate::message::{
    message_type, type_name, Ack, Diverged, Hello, Message, Record, RecordOp, ReplicaState, Welcome,
};
use crate::payload::{Encoding, Payload, PAYLOAD_OVERHEAD};
use crate::{FRAME_HEADER_LEN, MAGIC, MAX_PAYLOAD};

/// Record flag: forced unit access.
const FLAG_FUA: u8 = 1;
/// `Welcome` flags: the replica keeps history; it holds a recovery point.
const WELCOME_HISTORY: u8 = 1;
const WELCOME_POINT: u8 = 2;
const WELCOME_FLAGS: u8 = WELCOME_HISTORY | WELCOME_POINT;

/// A validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// The message type (known to this version).
    pub ty: u8,
    /// Payload length (at most [`MAX_PAYLOAD`]).
    pub len: u32,
    /// CRC-32C of the payload.
    pub crc: u32,
    /// The link channel the frame belongs to (0 outside a link, and a
    /// link's own messages; docs/PEER.md, "Links").
    pub channel: u32,
}

impl FrameHeader {
    /// The name of the message type (`"record"`, …).
    pub fn kind(&self) -> &'static str {
        type_name(self.ty).unwrap_or("unknown")
    }

    /// The length of the whole frame.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.len as usize
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Validates as much of a frame header as `buf` holds: magic, type,
/// reserved bytes and length are each checked as soon as they have
/// arrived, so garbage is refused early. `Ok(None)`: fewer than
/// [`FRAME_HEADER_LEN`] bytes, all valid so far.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, PeerError> {
    if buf.len() >= 4 {
        let magic = le_u32(buf);
        if magic != MAGIC {
            return Err(PeerError::BadMagic(magic));
        }
    } else {
        // Check the bytes that are there against the magic's.
        let want = MAGIC.to_le_bytes();
        if buf != &want[..buf.len()] {
            let mut got = [0u8; 4];
            got[..buf.len()].copy_from_slice(buf);
            return Err(PeerError::BadMagic(u32::from_le_bytes(got)));
        }
    }
    if let Some(&ty) = buf.get(4) {
        if type_name(ty).is_none() {
            return Err(PeerError::UnknownType(ty));
        }
    }
    if buf.len() >= 12 {
        let len = le_u32(&buf[8..]);
        if len as usize > MAX_PAYLOAD {
            return Err(PeerError::TooLarge {
                len: u64::from(len),
                max: MAX_PAYLOAD as u64,
            });
        }
    }
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    Ok(Some(FrameHeader {
        ty: buf[4],
        len: le_u32(&buf[8..]),
        crc: le_u32(&buf[12..]),
        channel: u32::from(buf[5]) | u32::from(buf[6]) << 8 | u32::from(buf[7]) << 16,
    }))
}

/// The highest channel number a frame header can carry (24 bits).
pub const MAX_CHANNEL: u32 = (1 << 24) - 1;

/// Decodes one frame from the front of `buf`. `Ok(None)`: `buf` is a valid
/// beginning of a frame and more bytes are needed; `Ok(Some((msg, n)))`:
/// the frame took the first `n` bytes. An error is a protocol error: the
/// connection must be closed. Never allocates more than the frame's length.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, PeerError> {
    match decode_frame(buf)? {
        None => Ok(None),
        Some((0, msg, n)) => Ok(Some((msg, n))),
        Some((channel, msg, _)) => Err(outside_link(channel, msg.kind())),
    }
}

/// A frame for a channel where there are no channels (not on a link).
pub fn outside_link(channel: u32, kind: &'static str) -> PeerError {
    PeerError::malformed(
        kind,
        format_args!("frame on channel {channel}, but this connection is not a link"),
    )
}

/// [`decode`] of a frame on a link: also says which channel it is on.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(u32, Message, usize)>, PeerError> {
    let Some(header) = parse_header(buf)? else {
        return Ok(None);
    };
    let total = header.frame_len();
    if buf.len() < total {
        return Ok(None);
    }
    let msg = decode_payload(&header, &buf[FRAME_HEADER_LEN..total])?;
    Ok(Some((header.channel, msg, total)))
}

/// Checks the CRC of `payload` against `header` and decodes the message.
pub fn decode_payload(header: &FrameHeader, payload: &[u8]) -> Result<Message, PeerError> {
    let kind = header.kind();
    if payload.len() != header.len as usize {
        return Err(PeerError::malformed(
            kind,
            format_args!(
                "payload of {} bytes, header says {}",
                payload.len(),
                header.len
            ),
        ));
    }
    let actual = crc32c::crc32c(payload);
    if actual != header.crc {
        return Err(PeerError::Checksum {
            kind,
            expected: header.crc,
            actual,
        });
    }
    let mut r = Reader { buf: payload, kind };
    let msg = match header.ty {
        1 => {
            let version = r.u16("version")?;
            let primary = r.name("primary")?;
            let replica = r.name("replica")?;
            let group = r.name("group")?;
            let epoch = r.u64("epoch")?;
            let fork_epoch = r.u64("fork epoch")?;
            let fork_seq = r.u64("fork seq")?;
            // An item is at least a 2-byte name length and a u64 size.
            let n = r.count("volumes", 2 + 8, (MAX_VOLUMES, "at most 1024"))?;
            let mut volumes = Vec::with_capacity(n);
            for _ in 0..n {
                let name = r.name("volume name")?;
                let size = r.u64("volume size")?;
                volumes.push((name, size));
            }
            Message::Hello(Hello {
                version,
                primary,
                replica,
                group,
                epoch,
                fork_epoch,
                fork_seq,
                volumes,
            })
        }
        2 => {
            let replica = r.name("replica")?;
            let epoch = r.u64("epoch")?;
            let applied = r.u64("applied")?;
            let durable = r.u64("durable")?;
            let state = r.u8("state")?;
            let state = ReplicaState::from_u8(state)
                .ok_or_else(|| PeerError::malformed(kind, format_args!("unknown state {state}")))?;
            let flags = r.u8("flags")?;
            if flags & !WELCOME_FLAGS != 0 {
                return Err(PeerError::malformed(
                    kind,
                    format_args!("unknown flags {flags:#04x}"),
                ));
            }
            Message::Welcome(Welcome {
                replica,
                epoch,
                applied,
                durable,
                state,
                history: flags & WELCOME_HISTORY != 0,
                point: flags & WELCOME_POINT != 0,
            })
        }
        3 => Message::Refuse {
            reason: r.str("reason")?,
        },
        4 => {
            let epoch = r.u64("epoch")?;
            let seq = r.u64("seq")?;
            let volume = r.u32("volume")?;
            let op = r.u8("op")?;
            let op = RecordOp::from_u8(op)
                .ok_or_else(|| PeerError::malformed(kind, format_args!("unknown op {op}")))?;
            let flags = r.u8("flags")?;
            if flags & !FLAG_FUA != 0 {
                return Err(PeerError::malformed(
                    kind,
                    format_args!("unknown flags {flags:#04x}"),
                ));
            }
            let offset = r.u64("offset")?;
            let len = r.u64("len")?;
            if offset.checked_add(len).is_none() {
                return Err(bounds::out_of_bounds(
                    kind,
                    "len",
                    len,
                    "offset + len must not pass 2^64",
                ));
            }
            let data = if op == RecordOp::Write {
                let data = r.payload("data")?;
                if u64::from(data.raw_len) != len {
                    return Err(PeerError::malformed(
                        kind,
                        format_args!("write of {len} bytes carries {} bytes", data.raw_len),
                    ));
                }
                data
            } else {
                Payload::empty()
            };
            Message::Record(Record {
                epoch,
                seq,
                volume,
                op,
                fua: flags & FLAG_FUA != 0,
                offset,
                len,
                data,
            })
        }
        5 => Message::Ack(Ack {
            received: r.u64("received")?,
            durable: r.u64("durable")?,
            applied: r.u64("applied")?,
        }),
        6 => Message::ResyncBegin {
            epoch: r.u64("epoch")?,
            resume_at: r.u64("resume_at")?,
            bytes: r.u64("bytes")?,
        },
        7 => {
            let volume = r.u32("volume")?;
            let offset = r.u64("offset")?;
            let chunk = r.u32("chunk")?;
            bounds::check_chunk(kind, chunk)?;
            let n = r.count("hashes", 32, (MAX_HASHES, "at most 1024"))?;
            let mut hashes = Vec::with_capacity(n);
            for _ in 0..n {
                let mut h = [0u8; 32];
                h.copy_from_slice(r.take(32, "hash")?);
                hashes.push(h);
            }
            Message::Hashes {
                volume,
                offset,
                chunk,
                hashes,
            }
        }
        8 => {
            let volume = r.u32("volume")?;
            let offset = r.u64("offset")?;
            let chunk = r.u32("chunk")?;
            bounds::check_chunk(kind, chunk)?;
            let len = r.u32("bitmap")?;
            if len as usize > MAX_BITMAP {
                return Err(bounds::out_of_bounds(
                    kind,
                    "bitmap",
                    u64::from(len),
                    "at most 128 bytes",
                ));
            }
            Message::Diff {
                volume,
                offset,
                chunk,
                bitmap: r.take(len as usize, "bitmap")?.to_vec(),
            }
        }
        9 => Message::Chunk {
            volume: r.u32("volume")?,
            offset: r.u64("offset")?,
            data: r.payload("data")?,
        },
        10 => Message::ResyncEnd {
            consistent_at: r.u64("consistent_at")?,
        },
        11 => {
            let path = r.str_within("path", MAX_PATH, "at most 4096 bytes")?;
            let mode = r.u32("mode")?;
            if mode > bounds::MAX_MODE {
                return Err(bounds::out_of_bounds(
                    kind,
                    "mode",
                    u64::from(mode),
                    "at most 0o7777",
                ));
            }
            Message::File {
                path,
                mode,
                data: r.payload("data")?,
            }
        }
        12 => Message::Ping(r.u64("nanos")?),
        13 => Message::Pong(r.u64("nanos")?),
        14 => Message::ResyncDone {
            resume_at: r.u64("resume_at")?,
        },
        15 => Message::Define {
            group: r.name("group")?,
            definition: r.str("definition")?,
        },
        16 => Message::Defined {
            group: r.name("group")?,
        },
        17 => Message::Retire {
            group: r.name("group")?,
        },
        18 => Message::Retired {
            group: r.name("group")?,
        },
        19 => Message::Link {
            version: r.u16("version")?,
            primary: r.name("primary")?,
            replica: r.name("replica")?,
        },
        20 => Message::Linked {
            version: r.u16("version")?,
        },
        21 => Message::End {
            reason: r.str("reason")?,
        },
        22 => {
            let id = r.u64("id")?;
            let duration_ms = r.u32("duration_ms")?;
            let n = r.count("groups", 2 + 8, (MAX_LEASE_GROUPS, "at most 4096"))?;
            let mut groups = Vec::with_capacity(n);
            for _ in 0..n {
                let group = r.name("group")?;
                groups.push((group, r.u64("epoch")?));
            }
            Message::LeaseAsk {
                id,
                duration_ms,
                groups,
            }
        }
        23 => {
            let id = r.u64("id")?;
            let duration_ms = r.u32("duration_ms")?;
            let n = r.count("answers", 2 + 2, (MAX_LEASE_GROUPS, "at most 4096"))?;
            let mut answers = Vec::with_capacity(n);
            for _ in 0..n {
                let group = r.name("group")?;
                let reason = r.str_within("reason", MAX_REASON, "at most 256 bytes")?;
                answers.push((group, reason));
            }
            Message::LeaseAnswer {
                id,
                duration_ms,
                answers,
            }
        }
        24 => Message::StatusRequest {
            site: r.name("site")?,
        },
        25 => Message::StatusReport {
            report: r.payload("report")?,
        },
        28 => Message::ApiRequest {
            site: r.name("site")?,
            method: r.str_within("method", bounds::MAX_API_METHOD, bounds::API_METHOD_RULE)?,
            path: r.str_within("path", MAX_PATH, bounds::PATH_RULE)?,
            query: r.str_within("query", MAX_PATH, bounds::PATH_RULE)?,
            body: r.payload("body")?,
        },
        29 => Message::ApiAnswer {
            status: r.u16("status")?,
            body: r.payload("body")?,
        },
        26 => {
            let resync_epoch = r.u64("resync_epoch")?;
            let known = match r.u8("known")? {
                0 => false,
                1 => true,
                k => {
                    return Err(PeerError::malformed(
                        kind,
                        format_args!("known must be 0 or 1, not {k}"),
                    ))
                }
            };
            let n = r.count("ranges", 4 + 8 + 8, (MAX_DIVERGED_RANGES, DIVERGED_RULE))?;
            if n > 0 && !known {
                return Err(PeerError::malformed(kind, "ranges that are not known"));
            }
            let mut ranges = Vec::with_capacity(n);
            for _ in 0..n {
                let volume = r.u32("volume")?;
                let offset = r.u64("offset")?;
                let len = r.u64("len")?;
                if offset.checked_add(len).is_none() {
                    return Err(bounds::out_of_bounds(
                        kind,
                        "len",
                        len,
                        "offset + len must not pass 2^64",
                    ));
                }
                ranges.push((volume, offset, len));
            }
            Message::Diverged(Diverged {
                resync_epoch,
                known,
                ranges,
            })
        }
        27 => Message::Mark {
            seq: r.u64("seq")?,
            time_ms: r.u64("time_ms")?,
        },
        ty => return Err(PeerError::UnknownType(ty)),
    };
    r.finish()?;
    Ok(msg)
}

/// Reads the fields of one payload; every error names message and field.
struct Reader<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], PeerError> {
        if self.buf.len() < n {
            return Err(PeerError::malformed(
                self.kind,
                format_args!(
                    "{field} truncated ({n} bytes needed, {} left)",
                    self.buf.len()
                ),
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], PeerError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u8(&mut self, field: &str) -> Result<u8, PeerError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &str) -> Result<u16, PeerError> {
        self.array(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &str) -> Result<u32, PeerError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &str) -> Result<u64, PeerError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// `u16 length + UTF-8`.
    fn str(&mut self, field: &'static str) -> Result<String, PeerError> {
        self.str_within(field, usize::from(u16::MAX), "")
    }

    /// A site, group or volume name: a string of at most [`MAX_NAME`]
    /// bytes.
    fn name(&mut self, field: &'static str) -> Result<String, PeerError> {
        self.str_within(field, MAX_NAME, bounds::NAME_RULE)
    }

    /// A string of at most `max` bytes (`rule` says so), its length
    /// checked before anything is copied.
    fn str_within(
        &mut self,
        field: &'static str,
        max: usize,
        rule: &'static str,
    ) -> Result<String, PeerError> {
        let len = self.u16(field)?;
        if usize::from(len) > max {
            return Err(bounds::out_of_bounds(
                self.kind,
                field,
                u64::from(len),
                rule,
            ));
        }
        let bytes = self.take(usize::from(len), field)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(PeerError::malformed(
                self.kind,
                format_args!("{field} is not UTF-8 ({e})"),
            )),
        }
    }

    /// `u32 length + bytes`.
    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], PeerError> {
        let len = self.u32(field)?;
        // Checked by `take` before any copy.
        self.take(len as usize, field)
    }

    /// A list's `u32 count`, checked against its bound `max` and against
    /// the bytes left (each item takes at least `min_item` bytes) before
    /// anything is allocated.
    fn count(
        &mut self,
        field: &'static str,
        min_item: usize,
        (max, rule): (usize, &'static str),
    ) -> Result<usize, PeerError> {
        let n = self.u32(field)?;
        if n as usize > max {
            return Err(bounds::out_of_bounds(self.kind, field, u64::from(n), rule));
        }
        let need = u64::from(n) * min_item as u64;
        if need > self.buf.len() as u64 {
            return Err(PeerError::malformed(
                self.kind,
                format_args!(
                    "{field}: {n} items need at least {need} bytes, {} left",
                    self.buf.len()
                ),
            ));
        }
        Ok(n as usize)
    }

    /// Encoded bytes: `encoding u8, raw_len u32, u32 length + bytes`; the
    /// decoded length is checked against the message's bound (e.g. a
    /// `Chunk` holds at most [`bounds::MAX_CHUNK`]) before anything is
    /// copied.
    fn payload(&mut self, field: &'static str) -> Result<Payload, PeerError> {
        let encoding = self.u8(field)?;
        let encoding = Encoding::from_u8(encoding).ok_or_else(|| {
            PeerError::malformed(
                self.kind,
                format_args!("{field}: unknown encoding {encoding}"),
            )
        })?;
        let raw_len = self.u32(field)?;
        bounds::check_data(self.kind, raw_len)?;
        let bytes = self.bytes(field)?;
        let payload = Payload {
            encoding,
            raw_len,
            bytes: bytes::Bytes::copy_from_slice(bytes),
        };
        payload.check(self.kind)?;
        Ok(payload)
    }

    fn finish(&self) -> Result<(), PeerError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(PeerError::malformed(
                self.kind,
                format_args!("{} trailing bytes", self.buf.len()),
            ))
        }
    }
}

// ---------------------------------------------------------------- encoding

/// The longest prefix of `s` that fits a `u16` length, cut at a character
/// boundary (what [`encode`] writes for an oversize string).
fn wire_str(s: &str) -> &str {
    let max = usize::from(u16::MAX);
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn str_len(s: &str) -> usize {
    2 + wire_str(s).len()
}

/// The payload length of `msg`'s frame (without the 16-byte header), as
/// [`encode`] writes it.
pub fn payload_len(msg: &Message) -> usize {
    match msg {
        Message::Hello(h) => {
            2 + str_len(&h.primary)
                + str_len(&h.replica)
                + str_len(&h.group)
                + 8 * 3
                + 4
                + h.volumes
                    .iter()
                    .map(|(name, _)| str_len(name) + 8)
                    .sum::<usize>()
        }
        Message::Welcome(w) => str_len(&w.replica) + 8 + 8 + 8 + 1 + 1,
        Message::Refuse { reason } => str_len(reason),
        Message::Record(rec) => {
            8 + 8
                + 4
                + 1
                + 1
                + 8
                + 8
                + if rec.op == RecordOp::Write {
                    rec.data.wire_len()
                } else {
                    0
                }
        }
        Message::Ack(_) | Message::ResyncBegin { .. } => 24,
        Message::Mark { .. } => 16,
        Message::Hashes { hashes, .. } => 4 + 8 + 4 + 4 + 32 * hashes.len(),
        Message::Diff { bitmap, .. } => 4 + 8 + 4 + 4 + bitmap.len(),
        Message::Chunk { data, .. } => 4 + 8 + data.wire_len(),
        Message::ResyncEnd { .. }
        | Message::ResyncDone { .. }
        | Message::Ping(_)
        | Message::Pong(_) => 8,
        Message::File { path, data, .. } => str_len(path) + 4 + data.wire_len(),
        Message::Define { group, definition } => str_len(group) + str_len(definition),
        Message::Defined { group } | Message::Retire { group } | Message::Retired { group } => {
            str_len(group)
        }
        Message::Link {
            primary, replica, ..
        } => 2 + str_len(primary) + str_len(replica),
        Message::Linked { .. } => 2,
        Message::End { reason } => str_len(reason),
        Message::LeaseAsk { groups, .. } => {
            8 + 4 + 4 + groups.iter().map(|(g, _)| str_len(g) + 8).sum::<usize>()
        }
        Message::LeaseAnswer { answers, .. } => {
            8 + 4
                + 4
                + answers
                    .iter()
                    .map(|(g, r)| str_len(g) + str_len(r))
                    .sum::<usize>()
        }
        Message::StatusRequest { site } => str_len(site),
        Message::StatusReport { report } => report.wire_len(),
        Message::Diverged(d) => 8 + 1 + 4 + 20 * d.ranges.len(),
        Message::ApiRequest {
            site,
            method,
            path,
            query,
            body,
        } => str_len(site) + str_len(method) + str_len(path) + str_len(query) + body.wire_len(),
        Message::ApiAnswer { body, .. } => 2 + body.wire_len(),
    }
}

/// Appends one frame for `msg` to `out`.
///
/// Infallible for a valid message (see [`try_encode`]). For an invalid one
/// it still writes a frame, which the receiver refuses or reads
/// differently: a string over 65535 bytes is cut at a character boundary;
/// a `Record` that is not a write carries no data; a frame over the limit
/// gets its length, which the receiver refuses. Use [`try_encode`] (or
/// [`crate::write_message`]) to be told instead.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    encode_on(0, msg, out)
}

/// [`encode`] on a link's `channel` (its low 24 bits; channels are at
/// most [`MAX_CHANNEL`]).
pub fn encode_on(channel: u32, msg: &Message, out: &mut Vec<u8>) {
    encode_parts(channel, msg, out, false);
}

/// Records whose data is at least this long are encoded without it
/// ([`try_encode_split`]); shorter data is cheaper to copy.
pub const SPLIT_AT: usize = 64 << 10;

/// [`try_encode_on`] that does not copy a long write's data: for a
/// `Record` with at least [`SPLIT_AT`] bytes of data, appends the frame up
/// to the data (its length and CRC cover the data) and returns the data,
/// which the caller sends right after; for any other message, appends the
/// whole frame and returns `None`.
pub fn try_encode_split(
    channel: u32,
    msg: &Message,
    out: &mut Vec<u8>,
) -> Result<Option<bytes::Bytes>, PeerError> {
    check_encodable(channel, msg)?;
    let split = matches!(msg, Message::Record(r) if r.op == RecordOp::Write && r.data.bytes.len() >= SPLIT_AT);
    Ok(encode_parts(channel, msg, out, split).cloned())
}

/// Encodes `msg`; with `split`, a record's data bytes are left out (and
/// returned) but counted in the frame's length and CRC.
fn encode_parts<'m>(
    channel: u32,
    msg: &'m Message,
    out: &mut Vec<u8>,
    split: bool,
) -> Option<&'m bytes::Bytes> {
    let mut left_out = None;
    let start = out.len();
    let data_len = match msg {
        Message::Record(r) if split => r.data.bytes.len(),
        _ => 0,
    };
    out.reserve(FRAME_HEADER_LEN + payload_len(msg) - data_len);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(message_type(msg));
    out.extend_from_slice(&channel.to_le_bytes()[..3]);
    out.extend_from_slice(&[0; 8]); // length and CRC, patched below
    let body = out.len();
    let w = out;
    match msg {
        Message::Hello(h) => {
            put_u16(w, h.version);
            put_str(w, &h.primary);
            put_str(w, &h.replica);
            put_str(w, &h.group);
            put_u64(w, h.epoch);
            put_u64(w, h.fork_epoch);
            put_u64(w, h.fork_seq);
            put_u32(w, len_u32(h.volumes.len()));
            for (name, size) in &h.volumes {
                put_str(w, name);
                put_u64(w, *size);
            }
        }
        Message::Welcome(wl) => {
            put_str(w, &wl.replica);
            put_u64(w, wl.epoch);
            put_u64(w, wl.applied);
            put_u64(w, wl.durable);
            w.push(wl.state as u8);
            w.push(
                if wl.history { WELCOME_HISTORY } else { 0 }
                    | if wl.point { WELCOME_POINT } else { 0 },
            );
        }
        Message::Refuse { reason } => put_str(w, reason),
        Message::Record(rec) => {
            put_u64(w, rec.epoch);
            put_u64(w, rec.seq);
            put_u32(w, rec.volume);
            w.push(rec.op as u8);
            w.push(if rec.fua { FLAG_FUA } else { 0 });
            put_u64(w, rec.offset);
            put_u64(w, rec.len);
            if rec.op == RecordOp::Write {
                if split {
                    w.push(rec.data.encoding as u8);
                    put_u32(w, rec.data.raw_len);
                    put_u32(w, len_u32(rec.data.bytes.len()));
                    left_out = Some(&rec.data.bytes);
                } else {
                    put_payload(w, &rec.data);
                }
            }
        }
        Message::Ack(a) => {
            put_u64(w, a.received);
            put_u64(w, a.durable);
            put_u64(w, a.applied);
        }
        Message::ResyncBegin {
            epoch,
            resume_at,
            bytes,
        } => {
            put_u64(w, *epoch);
            put_u64(w, *resume_at);
            put_u64(w, *bytes);
        }
        Message::Hashes {
            volume,
            offset,
            chunk,
            hashes,
        } => {
            put_u32(w, *volume);
            put_u64(w, *offset);
            put_u32(w, *chunk);
            put_u32(w, len_u32(hashes.len()));
            for h in hashes {
                w.extend_from_slice(h);
            }
        }
        Message::Diff {
            volume,
            offset,
            chunk,
            bitmap,
        } => {
            put_u32(w, *volume);
            put_u64(w, *offset);
            put_u32(w, *chunk);
            put_bytes(w, bitmap);
        }
        Message::Chunk {
            volume,
            offset,
            data,
        } => {
            put_u32(w, *volume);
            put_u64(w, *offset);
            put_payload(w, data);
        }
        Message::ResyncEnd { consistent_at } => put_u64(w, *consistent_at),
        Message::ResyncDone { resume_at } => put_u64(w, *resume_at),
        Message::File { path, mode, data } => {
            put_str(w, path);
            put_u32(w, *mode);
            put_payload(w, data);
        }
        Message::Ping(nanos) | Message::Pong(nanos) => put_u64(w, *nanos),
        Message::Define { group, definition } => {
            put_str(w, group);
            put_str(w, definition);
        }
        Message::Defined { group } | Message::Retire { group } | Message::Retired { group } => {
            put_str(w, group)
        }
        Message::Link {
            version,
            primary,
            replica,
        } => {
            put_u16(w, *version);
            put_str(w, primary);
            put_str(w, replica);
        }
        Message::Linked { version } => put_u16(w, *version),
        Message::End { reason } => put_str(w, reason),
        Message::LeaseAsk {
            id,
            duration_ms,
            groups,
        } => {
            put_u64(w, *id);
            put_u32(w, *duration_ms);
            put_u32(w, len_u32(groups.len()));
            for (group, epoch) in groups {
                put_str(w, group);
                put_u64(w, *epoch);
            }
        }
        Message::LeaseAnswer {
            id,
            duration_ms,
            answers,
        } => {
            put_u64(w, *id);
            put_u32(w, *duration_ms);
            put_u32(w, len_u32(answers.len()));
            for (group, reason) in answers {
                put_str(w, group);
                put_str(w, reason);
            }
        }
        Message::StatusRequest { site } => put_str(w, site),
        Message::StatusReport { report } => put_payload(w, report),
        Message::ApiRequest {
            site,
            method,
            path,
            query,
            body,
        } => {
            put_str(w, site);
            put_str(w, method);
            put_str(w, path);
            put_str(w, query);
            put_payload(w, body);
        }
        Message::ApiAnswer { status, body } => {
            put_u16(w, *status);
            put_payload(w, body);
        }
        Message::Diverged(d) => {
            put_u64(w, d.resync_epoch);
            w.push(u8::from(d.known));
            put_u32(w, len_u32(d.ranges.len()));
            for &(volume, offset, len) in &d.ranges {
                put_u32(w, volume);
                put_u64(w, offset);
                put_u64(w, len);
            }
        }
        Message::Mark { seq, time_ms } => {
            put_u64(w, *seq);
            put_u64(w, *time_ms);
        }
    }
    let data: &[u8] = left_out.map_or(&[], |b| b);
    let len = len_u32(w.len() - body + data.len());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&w[body..]), data);
    w[start + 8..start + 12].copy_from_slice(&len.to_le_bytes());
    w[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
    left_out
}

/// Appends one frame for `msg` to `out` if the receiver will decode it to
/// the same message; otherwise appends nothing and says what is wrong
/// (`TooLarge` for a frame over [`MAX_PAYLOAD`], `DataTooLarge` for data
/// over [`crate::MAX_DATA`], `Malformed` for the rest).
pub fn try_encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), PeerError> {
    try_encode_on(0, msg, out)
}

/// [`try_encode`] on a link's `channel`.
pub fn try_encode_on(channel: u32, msg: &Message, out: &mut Vec<u8>) -> Result<(), PeerError> {
    check_encodable(channel, msg)?;
    encode_on(channel, msg, out);
    Ok(())
}

/// What [`try_encode_on`] and [`try_encode_split`] check first.
fn check_encodable(channel: u32, msg: &Message) -> Result<(), PeerError> {
    validate(msg)?;
    if channel > MAX_CHANNEL {
        return Err(PeerError::malformed(
            msg.kind(),
            format_args!("channel {channel} exceeds {MAX_CHANNEL}"),
        ));
    }
    Ok(())
}

/// Checks that `msg` can be encoded: what [`try_encode`] checks.
pub fn validate(msg: &Message) -> Result<(), PeerError> {
    let kind = crate::frame_kind(msg);
    let check_str = |field: &str, s: &str| {
        if s.len() > usize::from(u16::MAX) {
            Err(PeerError::malformed(
                kind,
                format_args!("{field} of {} bytes exceeds 65535", s.len()),
            ))
        } else {
            Ok(())
        }
    };
    match msg {
        Message::Hello(h) => {
            check_str("primary", &h.primary)?;
            check_str("replica", &h.replica)?;
            check_str("group", &h.group)?;
            for (name, _) in &h.volumes {
                check_str("volume name", name)?;
            }
        }
        Message::Welcome(w) => check_str("replica", &w.replica)?,
        Message::Refuse { reason } => check_str("reason", reason)?,
        Message::Record(rec) => {
            if rec.op == RecordOp::Write {
                rec.data.check(kind)?;
                if u64::from(rec.data.raw_len) != rec.len {
                    return Err(PeerError::malformed(
                        kind,
                        format_args!(
                            "write of {} bytes carries {} bytes",
                            rec.len, rec.data.raw_len
                        ),
                    ));
                }
            } else if rec.data != Payload::empty() {
                return Err(PeerError::malformed(
                    kind,
                    format_args!("{} record carries data", rec.op),
                ));
            }
        }
        Message::Chunk { data, .. } => data.check(kind)?,
        Message::File { path, data, .. } => {
            check_str("path", path)?;
            data.check(kind)?;
        }
        Message::Define { group, definition } => {
            check_str("group", group)?;
            check_str("definition", definition)?;
        }
        Message::Defined { group } | Message::Retire { group } | Message::Retired { group } => {
            check_str("group", group)?
        }
        Message::Link {
            primary, replica, ..
        } => {
            check_str("primary", primary)?;
            check_str("replica", replica)?;
        }
        Message::End { reason } => check_str("reason", reason)?,
        Message::LeaseAsk { groups, .. } => {
            for (group, _) in groups {
                check_str("group", group)?;
            }
        }
        Message::LeaseAnswer { answers, .. } => {
            for (group, reason) in answers {
                check_str("group", group)?;
                check_str("reason", reason)?;
            }
        }
        Message::StatusRequest { site } => check_str("site", site)?,
        Message::StatusReport { report } => report.check(kind)?,
        Message::ApiRequest {
            site,
            method,
            path,
            query,
            body,
        } => {
            check_str("site", site)?;
            check_str("method", method)?;
            check_str("path", path)?;
            check_str("query", query)?;
            body.check(kind)?;
        }
        Message::ApiAnswer { body, .. } => body.check(kind)?,
        _ => {}
    }
    bounds::check(msg)?;
    let len = payload_len(msg);
    if len > MAX_PAYLOAD {
        return Err(PeerError::TooLarge {
            len: len as u64,
            max: MAX_PAYLOAD as u64,
        });
    }
    Ok(())
}

/// A length as written on the wire; only a frame far over the limit (which
/// the receiver refuses anyway) could saturate.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn put_u16(w: &mut Vec<u8>, v: u16) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    let s = wire_str(s);
    put_u16(w, u16::try_from(s.len()).unwrap_or(u16::MAX)); // wire_str: fits
    w.extend_from_slice(s.as_bytes());
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_u32(w, len_u32(b.len()));
    w.extend_from_slice(b);
}

fn put_payload(w: &mut Vec<u8>, p: &Payload) {
    w.push(p.encoding as u8);
    put_u32(w, p.raw_len);
    put_bytes(w, &p.bytes);
}

const _: () = assert!(PAYLOAD_OVERHEAD == 9);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_str_cuts_at_char_boundary() {
        assert_eq!(wire_str("abc"), "abc");
        let s = "€".repeat(30_000); // 3 bytes each
        let w = wire_str(&s);
        assert!(w.len() <= 65535 && w.chars().count() * 3 == w.len() && w.len() > 65530);
        assert_eq!(str_len(&s), 2 + w.len());
    }

    #[test]
    fn header_prefixes() {
        let mut f = Vec::new();
        encode(&Message::Pong(9), &mut f);
        for n in 0..FRAME_HEADER_LEN {
            assert!(matches!(parse_header(&f[..n]), Ok(None)), "{n}");
        }
        let h = parse_header(&f).unwrap().unwrap();
        assert_eq!((h.ty, h.len, h.kind(), h.frame_len()), (13, 8, "pong", 24));
        assert_eq!(h.crc, crc32c::crc32c(&f[16..]));
        // A payload that is not the header's length.
        assert!(matches!(
            decode_payload(&h, &f[16..20]),
            Err(PeerError::Malformed(_))
        ));
    }

    #[test]
    fn record_without_data_is_short() {
        let rec = Record {
            epoch: 1,
            seq: 2,
            volume: 3,
            op: RecordOp::Trim,
            fua: false,
            offset: 4096,
            len: 1 << 20,
            data: Payload::empty(),
        };
        let mut f = Vec::new();
        try_encode(&Message::Record(rec), &mut f).unwrap();
        assert_eq!(f.len(), FRAME_HEADER_LEN + 38);
    }
}
