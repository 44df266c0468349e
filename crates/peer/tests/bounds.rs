//! Every length, count and size in a peer message is bounded before
//! anything is allocated for it (docs/PEER.md, "Bounds"): frames built by
//! hand with extreme values of each field (0, 1, the bound, one past it,
//! `u32::MAX`, `u64::MAX`) decode when within the bounds and are refused
//! with a typed error otherwise, and decoding never makes an allocation
//! larger than the frame (measured by this test binary's allocator).
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // hand-built frames fit the wire's fields

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Cursor;

use proptest::prelude::*;
use tandem_peer::*;

/// Wraps the system allocator to record, per thread, the largest single
/// allocation since the last [`largest_allocation`] reset.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is passed on to `System` unchanged; the tracking only
// reads the requested size.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `f` and returns its result with the largest allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

fn raw_frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&MAGIC.to_le_bytes());
    f.extend_from_slice(&[ty, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Slack over a frame's length that decoding may allocate at once: the
/// decoded form of a list is larger than its wire form (a volume's name
/// and size take 32 bytes in memory, 1024 of them at most).
const SLACK: usize = 64 << 10;

/// Decodes `frame` (with the slice decoder and the blocking reader, which
/// must agree), checking that no allocation is larger than the frame plus
/// [`SLACK`].
fn decode_bounded(frame: &[u8]) -> Result<Message, PeerError> {
    let (sliced, largest) = largest_allocation(|| decode(frame));
    assert!(
        largest <= frame.len() + SLACK,
        "decoding a {}-byte frame allocated {largest} bytes at once",
        frame.len()
    );
    let (streamed, largest) = largest_allocation(|| {
        let mut buf = Vec::new();
        read_message(&mut Cursor::new(frame), &mut buf)
    });
    assert!(
        largest <= frame.len() + SLACK,
        "reading a {}-byte frame allocated {largest} bytes at once",
        frame.len()
    );
    match (sliced, streamed) {
        (Ok(Some((m, n))), Ok(s)) => {
            assert_eq!(n, frame.len());
            assert_eq!(m, s);
            Ok(m)
        }
        (Err(e), Err(_)) => Err(e),
        (a, b) => panic!("decode gave {a:?}, read_message {b:?}"),
    }
}

/// The field an out-of-bounds refusal names.
fn out_of_bounds(r: Result<Message, PeerError>) -> &'static str {
    match r {
        Err(PeerError::OutOfBounds { field, .. }) => field,
        other => panic!("expected an out-of-bounds refusal, got {other:?}"),
    }
}

fn data_too_large(r: Result<Message, PeerError>) -> (u64, u64) {
    match r {
        Err(PeerError::DataTooLarge { len, max }) => (len, max),
        other => panic!("expected data too large, got {other:?}"),
    }
}

struct P(Vec<u8>);

impl P {
    fn new() -> P {
        P(Vec::new())
    }
    fn u8(mut self, v: u8) -> P {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> P {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> P {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> P {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> P {
        self.0.extend_from_slice(b);
        self
    }
    /// A string whose length field says `len` (and that many bytes follow,
    /// up to `have`).
    fn str_of(self, len: u16, have: usize) -> P {
        self.u16(len).bytes(&vec![b'a'; have])
    }
    fn name(self, len: usize) -> P {
        self.str_of(len as u16, len)
    }
    fn frame(&self, ty: u8) -> Vec<u8> {
        raw_frame(ty, &self.0)
    }
}

/// A `Hashes` payload: volume 0, offset 0, `chunk`, `count` hashes
/// announced, `have` present.
fn hashes(chunk: u32, count: u32, have: usize) -> Vec<u8> {
    P::new()
        .u32(0)
        .u64(0)
        .u32(chunk)
        .u32(count)
        .bytes(&vec![7u8; 32 * have])
        .frame(7)
}

#[test]
fn the_60_byte_hashes_probe_is_refused_without_allocating() {
    // The probe: one hash of a 4 GiB chunk made the replica allocate the
    // whole volume.
    let f = hashes(0xFFFF_FFFF, 1, 1);
    assert!(f.len() <= 68, "{}", f.len());
    assert_eq!(out_of_bounds(decode_bounded(&f)), "chunk");
    let e = decode(&f).unwrap_err().to_string();
    assert!(
        e.contains("4294967295") && e.contains("power of two"),
        "{e}"
    );
}

#[test]
fn hashes_chunk_and_count() {
    for chunk in [0, 1, 2, 4095, 4097, 3 << 12, 2 << 20, 1 << 31, u32::MAX] {
        assert_eq!(
            out_of_bounds(decode_bounded(&hashes(chunk, 1, 1))),
            "chunk",
            "{chunk}"
        );
    }
    for chunk in [MIN_CHUNK, 64 << 10, MAX_CHUNK] {
        assert!(decode_bounded(&hashes(chunk, 1, 1)).is_ok(), "{chunk}");
    }
    for count in [0, 1, MAX_HASHES as u32] {
        assert!(decode_bounded(&hashes(4096, count, count as usize)).is_ok());
    }
    // Past the bound: refused on the count, whatever follows.
    for (count, have) in [
        (MAX_HASHES as u32 + 1, MAX_HASHES + 1),
        (u32::MAX, 1),
        (u32::MAX, 0),
    ] {
        assert_eq!(
            out_of_bounds(decode_bounded(&hashes(4096, count, have))),
            "hashes"
        );
    }
}

#[test]
fn diff_chunk_and_bitmap() {
    let diff = |chunk: u32, len: u32, have: usize| {
        P::new()
            .u32(0)
            .u64(u64::MAX)
            .u32(chunk)
            .u32(len)
            .bytes(&vec![0xff; have])
            .frame(8)
    };
    for chunk in [0, 1, 4095, u32::MAX] {
        assert_eq!(out_of_bounds(decode_bounded(&diff(chunk, 1, 1))), "chunk");
    }
    for len in [0, 1, MAX_BITMAP as u32] {
        assert!(decode_bounded(&diff(4096, len, len as usize)).is_ok());
    }
    for (len, have) in [(MAX_BITMAP as u32 + 1, MAX_BITMAP + 1), (u32::MAX, 3)] {
        assert_eq!(
            out_of_bounds(decode_bounded(&diff(4096, len, have))),
            "bitmap"
        );
    }
}

fn hello(names: [usize; 3], volumes: u32, volume_name: usize, have: usize) -> Vec<u8> {
    let mut p = P::new()
        .u16(VERSION)
        .name(names[0])
        .name(names[1])
        .name(names[2])
        .u64(u64::MAX)
        .u64(u64::MAX)
        .u64(u64::MAX)
        .u32(volumes);
    for _ in 0..have {
        p = p.name(volume_name).u64(u64::MAX);
    }
    p.frame(1)
}

#[test]
fn hello_names_and_volumes() {
    assert!(decode_bounded(&hello([0, 1, MAX_NAME], 0, 0, 0)).is_ok());
    assert!(decode_bounded(&hello([1, 1, 1], 1, MAX_NAME, 1)).is_ok());
    let many = hello([1, 1, 1], MAX_VOLUMES as u32, 1, MAX_VOLUMES);
    assert!(
        many.len() <= MAX_PREAUTH_PAYLOAD,
        "the largest hello fits before authentication"
    );
    assert!(decode_bounded(&many).is_ok());
    for (i, field) in ["primary", "replica", "group"].into_iter().enumerate() {
        let mut names = [1; 3];
        names[i] = MAX_NAME + 1;
        assert_eq!(out_of_bounds(decode_bounded(&hello(names, 0, 0, 0))), field);
        names[i] = usize::from(u16::MAX);
        assert_eq!(out_of_bounds(decode_bounded(&hello(names, 0, 0, 0))), field);
    }
    assert_eq!(
        out_of_bounds(decode_bounded(&hello([1; 3], 1, MAX_NAME + 1, 1))),
        "volume name"
    );
    // A name announced at u16::MAX with nothing behind it.
    let short = P::new().u16(VERSION).str_of(u16::MAX, 0).frame(1);
    assert_eq!(out_of_bounds(decode_bounded(&short)), "primary");
    for (count, have) in [(MAX_VOLUMES as u32 + 1, MAX_VOLUMES + 1), (u32::MAX, 0)] {
        assert_eq!(
            out_of_bounds(decode_bounded(&hello([1; 3], count, 1, have))),
            "volumes"
        );
    }
}

fn record(op: u8, offset: u64, len: u64, data: Option<(u8, u32, usize)>) -> Vec<u8> {
    let mut p = P::new()
        .u64(u64::MAX)
        .u64(u64::MAX)
        .u32(u32::MAX)
        .u8(op)
        .u8(1)
        .u64(offset)
        .u64(len);
    if let Some((encoding, raw_len, have)) = data {
        p = p
            .u8(encoding)
            .u32(raw_len)
            .u32(have as u32)
            .bytes(&vec![1; have]);
    }
    p.frame(4)
}

#[test]
fn record_offsets_lengths_and_data() {
    // A trim or zeroing of any length, as long as offset + len fits; the
    // replica checks it against the volume.
    assert!(decode_bounded(&record(2, 0, u64::MAX, None)).is_ok());
    assert!(decode_bounded(&record(1, u64::MAX, 0, None)).is_ok());
    for (offset, len) in [(1, u64::MAX), (u64::MAX, 1), (u64::MAX, u64::MAX)] {
        assert_eq!(
            out_of_bounds(decode_bounded(&record(2, offset, len, None))),
            "len"
        );
    }
    // Write data: zeroes up to MAX_DATA are announced, not carried (the
    // frame stays small; decoding the payload is bounded by MAX_DATA).
    let max = MAX_DATA as u32;
    assert!(decode_bounded(&record(0, 0, u64::from(max), Some((2, max, 0)))).is_ok());
    for raw_len in [max + 1, u32::MAX] {
        let (len, limit) = data_too_large(decode_bounded(&record(
            0,
            0,
            u64::from(raw_len),
            Some((2, raw_len, 0)),
        )));
        assert_eq!((len, limit), (u64::from(raw_len), MAX_DATA as u64));
    }
}

fn chunk_msg(raw_len: u32) -> Vec<u8> {
    P::new()
        .u32(u32::MAX)
        .u64(u64::MAX)
        .u8(2)
        .u32(raw_len)
        .u32(0)
        .frame(9)
}

#[test]
fn chunk_data_is_at_most_one_chunk() {
    for raw_len in [0, 1, MAX_CHUNK] {
        assert!(decode_bounded(&chunk_msg(raw_len)).is_ok());
    }
    for raw_len in [MAX_CHUNK + 1, MAX_DATA as u32, u32::MAX] {
        let (_, limit) = data_too_large(decode_bounded(&chunk_msg(raw_len)));
        assert_eq!(limit, u64::from(MAX_CHUNK));
    }
}

fn file(path: u16, path_have: usize, mode: u32, raw_len: u32) -> Vec<u8> {
    P::new()
        .str_of(path, path_have)
        .u32(mode)
        .u8(2)
        .u32(raw_len)
        .u32(0)
        .frame(11)
}

#[test]
fn file_path_mode_and_size() {
    let max_path = MAX_PATH as u16;
    assert!(decode_bounded(&file(0, 0, 0, 0)).is_ok());
    assert!(decode_bounded(&file(max_path, MAX_PATH, MAX_MODE, MAX_FILE)).is_ok());
    for (len, have) in [(max_path + 1, MAX_PATH + 1), (u16::MAX, 0)] {
        assert_eq!(
            out_of_bounds(decode_bounded(&file(len, have, 0, 0))),
            "path"
        );
    }
    for mode in [MAX_MODE + 1, u32::MAX] {
        assert_eq!(out_of_bounds(decode_bounded(&file(1, 1, mode, 0))), "mode");
    }
    for raw_len in [MAX_FILE + 1, u32::MAX] {
        let (_, limit) = data_too_large(decode_bounded(&file(1, 1, 0o644, raw_len)));
        assert_eq!(limit, u64::from(MAX_FILE));
    }
}

fn status_report(raw_len: u32) -> Vec<u8> {
    P::new().u8(2).u32(raw_len).u32(0).frame(25)
}

#[test]
fn status_report_and_request_bounds() {
    for raw_len in [0, 1, MAX_STATUS_REPORT] {
        assert!(decode_bounded(&status_report(raw_len)).is_ok());
    }
    for raw_len in [MAX_STATUS_REPORT + 1, MAX_DATA as u32, u32::MAX] {
        let (_, limit) = data_too_large(decode_bounded(&status_report(raw_len)));
        assert_eq!(limit, u64::from(MAX_STATUS_REPORT));
    }
    assert!(decode_bounded(&P::new().name(MAX_NAME).frame(24)).is_ok());
    assert_eq!(
        out_of_bounds(decode_bounded(&P::new().name(MAX_NAME + 1).frame(24))),
        "site"
    );
}

#[test]
fn group_and_site_names_elsewhere() {
    for ty in [15u8, 16, 17, 18] {
        let mut ok = P::new().name(MAX_NAME);
        let mut long = P::new().name(MAX_NAME + 1);
        if ty == 15 {
            ok = ok.name(100);
            long = long.name(100);
        }
        assert!(decode_bounded(&ok.frame(ty)).is_ok(), "{ty}");
        assert_eq!(out_of_bounds(decode_bounded(&long.frame(ty))), "group");
    }
    let welcome = |name: usize| {
        P::new()
            .name(name)
            .u64(u64::MAX)
            .u64(u64::MAX)
            .u64(u64::MAX)
            .u8(0)
            .u8(3)
            .frame(2)
    };
    assert!(decode_bounded(&welcome(MAX_NAME)).is_ok());
    assert_eq!(
        out_of_bounds(decode_bounded(&welcome(MAX_NAME + 1))),
        "replica"
    );
}

#[test]
fn before_authentication_a_large_frame_is_refused_from_its_header() {
    // A hello announcing 60 MiB, with its first 64 KiB sent.
    let mut f = Vec::new();
    f.extend_from_slice(&MAGIC.to_le_bytes());
    f.extend_from_slice(&[1, 0, 0, 0]);
    f.extend_from_slice(&(60u32 << 20).to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&vec![0; 64 << 10]);
    let (r, largest) = largest_allocation(|| {
        let mut cur = Cursor::new(&f[..]);
        let mut buf = Vec::new();
        let r = read_message_within(&mut cur, &mut buf, MAX_PREAUTH_PAYLOAD);
        (r, cur.position())
    });
    let (r, read) = r;
    assert!(
        matches!(r, Err(PeerError::TooLarge { len, max }) if len == 60 << 20 && max == MAX_PREAUTH_PAYLOAD as u64),
        "{r:?}"
    );
    assert_eq!(
        read, FRAME_HEADER_LEN as u64,
        "nothing past the header read"
    );
    assert!(largest < 4096, "{largest}");
    // The same frame after authentication is read as it arrives (and here
    // ends truncated), growing the buffer only with the bytes.
    let (r, largest) =
        largest_allocation(|| read_message(&mut Cursor::new(&f[..]), &mut Vec::new()));
    assert!(matches!(r, Err(PeerError::Truncated)), "{r:?}");
    assert!(largest <= 2 << 20, "{largest}");
}

#[test]
fn the_encoder_refuses_what_the_decoder_would() {
    let mut out = Vec::new();
    let bad = [
        Message::Hashes {
            volume: 0,
            offset: 0,
            chunk: 0,
            hashes: vec![],
        },
        Message::Hashes {
            volume: 0,
            offset: 0,
            chunk: 4096,
            hashes: vec![[0; 32]; MAX_HASHES + 1],
        },
        Message::Diff {
            volume: 0,
            offset: 0,
            chunk: u32::MAX,
            bitmap: vec![],
        },
        Message::Chunk {
            volume: 0,
            offset: 0,
            data: Payload::zeroes(MAX_CHUNK + 1),
        },
        Message::File {
            path: "/".repeat(MAX_PATH + 1),
            mode: 0,
            data: Payload::empty(),
        },
        Message::Defined {
            group: "g".repeat(MAX_NAME + 1),
        },
    ];
    for msg in bad {
        let e = try_encode(&msg, &mut out).unwrap_err();
        assert!(
            matches!(
                e,
                PeerError::OutOfBounds { .. } | PeerError::DataTooLarge { .. }
            ),
            "{e}"
        );
        assert!(out.is_empty());
    }
}

/// An extreme value for a field: 0, 1, the bound, one past it, or the
/// type's maximum.
fn extreme(bound: u64, max: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(bound),
        Just(bound.saturating_add(1).min(max)),
        Just(max)
    ]
}

proptest! {
    /// Extreme values in every bounded field of a `Hashes`, `Diff`,
    /// `Chunk` or `File`: within the bounds it decodes, outside it is an
    /// out-of-bounds or data-too-large error; never a large allocation.
    #[test]
    fn extreme_values_decode_or_are_refused_with_a_typed_error(
        ty in prop_oneof![Just(7u8), Just(8), Just(9), Just(11)],
        a in extreme(u64::from(MAX_CHUNK), u64::from(u32::MAX)),
        b in extreme(MAX_HASHES as u64, u64::from(u32::MAX)),
        c in extreme(u64::from(MAX_MODE), u64::from(u32::MAX)),
        offset in extreme(u64::MAX, u64::MAX),
    ) {
        let (a, b, c) = (a as u32, b as u32, c as u32);
        let frame = match ty {
            7 => hashes(a, b, (b as usize).min(MAX_HASHES + 1)),
            8 => P::new().u32(0).u64(offset).u32(a).u32(b).bytes(&vec![1; (b as usize).min(MAX_BITMAP + 1)]).frame(8),
            9 => P::new().u32(b).u64(offset).u8(2).u32(a).u32(0).frame(9),
            _ => file((b as u16).min(4097), (b as usize).min(4097), c, a),
        };
        match decode_bounded(&frame) {
            Ok(msg) => {
                // What decodes is within every bound: it encodes again.
                let mut again = Vec::new();
                prop_assert!(try_encode(&msg, &mut again).is_ok());
                prop_assert_eq!(again, frame);
            }
            Err(PeerError::OutOfBounds { .. } | PeerError::DataTooLarge { .. }) => {}
            Err(e) => prop_assert!(false, "untyped refusal: {}", e),
        }
    }
}

/// A `Diverged` payload: `known`, `count` ranges announced, `ranges`
/// present.
fn diverged(known: u8, count: u32, ranges: &[(u32, u64, u64)]) -> Vec<u8> {
    let mut p = P::new().u64(3).u8(known).u32(count);
    for &(v, o, l) in ranges {
        p = p.u32(v).u64(o).u64(l);
    }
    p.frame(26)
}

#[test]
fn diverged_ranges() {
    let one = [(0, 4 << 20, 4 << 20)];
    match decode_bounded(&diverged(1, 1, &one)) {
        Ok(Message::Diverged(d)) => {
            assert!(d.known);
            assert_eq!((d.resync_epoch, d.ranges), (3, one.to_vec()));
        }
        other => panic!("{other:?}"),
    }
    assert!(decode_bounded(&diverged(0, 0, &[])).is_ok());
    // Past the bound: refused on the count, before anything is allocated.
    for count in [MAX_DIVERGED_RANGES as u32 + 1, u32::MAX] {
        assert_eq!(
            out_of_bounds(decode_bounded(&diverged(1, count, &one))),
            "ranges"
        );
    }
    // A range that wraps past 2^64.
    assert_eq!(
        out_of_bounds(decode_bounded(&diverged(1, 1, &[(0, u64::MAX, 1)]))),
        "len"
    );
    // Ranges the sender does not know, and a flag that is not one.
    for frame in [diverged(0, 1, &one), diverged(2, 0, &[])] {
        assert!(matches!(
            decode_bounded(&frame),
            Err(PeerError::Malformed(_))
        ));
    }
    // The encoder refuses what the decoder would.
    let unknown = Message::Diverged(Diverged {
        resync_epoch: 0,
        known: false,
        ranges: one.to_vec(),
    });
    assert!(try_encode(&unknown, &mut Vec::new()).is_err());
}

#[test]
fn forwarded_api_requests_and_answers_are_bounded() {
    let request = |method: &str, path: &str, body: Payload| Message::ApiRequest {
        site: "ny".into(),
        method: method.into(),
        path: path.into(),
        query: String::new(),
        body,
    };
    let mut out = Vec::new();
    let ok = request(
        "GET",
        "/api/v1/groups/web01/points",
        Payload::raw(vec![0; MAX_API_BODY as usize]),
    );
    try_encode(&ok, &mut out).unwrap();
    assert_eq!(decode(&out).unwrap().unwrap().0, ok);
    let long_method = request("GETGETGETGETGETGE", "/", Payload::empty());
    assert!(matches!(
        try_encode(&long_method, &mut Vec::new()),
        Err(PeerError::OutOfBounds {
            field: "method",
            ..
        })
    ));
    let long_path = request("GET", &"p".repeat(MAX_PATH + 1), Payload::empty());
    assert!(matches!(
        try_encode(&long_path, &mut Vec::new()),
        Err(PeerError::OutOfBounds { field: "path", .. })
    ));
    let big = request(
        "POST",
        "/",
        Payload::raw(vec![0; MAX_API_BODY as usize + 1]),
    );
    assert!(matches!(
        try_encode(&big, &mut Vec::new()),
        Err(PeerError::DataTooLarge { .. })
    ));
    // A frame claiming a body over the bound is refused from its
    // header, before the body is allocated.
    let mut frame = Vec::new();
    encode(&big, &mut frame);
    assert!(matches!(
        decode(&frame),
        Err(PeerError::DataTooLarge { .. })
    ));
    let answer = Message::ApiAnswer {
        status: 200,
        body: Payload::zeroes(MAX_API_ANSWER + 1),
    };
    assert!(matches!(
        try_encode(&answer, &mut Vec::new()),
        Err(PeerError::DataTooLarge { .. })
    ));
}
