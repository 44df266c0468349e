//! Property and example tests of the NBD codecs, on bytes only.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // offsets in a small test export; test names and payloads of a few KiB

use std::sync::Arc;

use proptest::prelude::*;
use tandem_nbd::fuzzing::{run_session, MemExport};
use tandem_nbd::proto::*;
use tandem_nbd::transmission::{
    decode_reply_header, decode_request, validate, Command, ReplyHeader, RequestHeader, Session,
};

const SIZE: usize = 1 << 16;

fn option(out: &mut Vec<u8>, code: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn name_and_infos(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Option replies as (option, type, data).
fn option_replies(mut sent: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while sent.len() >= 20
        && u64::from_be_bytes(sent[0..8].try_into().unwrap()) == OPTION_REPLY_MAGIC
    {
        let opt = u32::from_be_bytes(sent[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(sent[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(sent[16..20].try_into().unwrap()) as usize;
        out.push((opt, ty, sent[20..20 + len].to_vec()));
        sent = &sent[20 + len..];
    }
    out
}

fn hello(structured: bool) -> Vec<u8> {
    let mut c = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    if structured {
        option(&mut c, OPT_STRUCTURED_REPLY, &[]);
    }
    option(&mut c, OPT_GO, &name_and_infos("disk", &[INFO_BLOCK_SIZE]));
    c
}

#[test]
fn go_reports_size_flags_and_block_sizes() {
    let t = run_session(Arc::new(MemExport::new("disk", SIZE)), &hello(false));
    assert!(t.transmission);
    let replies = option_replies(&t.sent);
    let export = replies
        .iter()
        .find(|r| r.1 == REP_INFO && r.2[0..2] == INFO_EXPORT.to_be_bytes())
        .expect("INFO_EXPORT");
    assert_eq!(
        u64::from_be_bytes(export.2[2..10].try_into().unwrap()),
        SIZE as u64
    );
    let flags = u16::from_be_bytes(export.2[10..12].try_into().unwrap());
    for f in [
        TF_HAS_FLAGS,
        TF_SEND_FLUSH,
        TF_SEND_FUA,
        TF_SEND_TRIM,
        TF_SEND_WRITE_ZEROES,
        TF_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing in {flags:#x}");
    }
    assert_eq!(flags & TF_READ_ONLY, 0);
    let sizes = replies
        .iter()
        .find(|r| r.1 == REP_INFO && r.2[0..2] == INFO_BLOCK_SIZE.to_be_bytes())
        .expect("INFO_BLOCK_SIZE");
    assert_eq!(
        u32::from_be_bytes(sizes.2[10..14].try_into().unwrap()),
        MAX_PAYLOAD
    );
    assert_eq!(replies.last().unwrap().1, REP_ACK);
}

#[test]
fn unknown_options_get_unsup_and_unknown_exports_get_unknown() {
    let mut c = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    option(&mut c, 77, b"junk");
    option(&mut c, OPT_GO, &name_and_infos("nope", &[]));
    option(&mut c, OPT_LIST, &[]);
    option(&mut c, OPT_ABORT, &[]);
    let t = run_session(Arc::new(MemExport::new("disk", SIZE)), &c);
    let types: Vec<(u32, u32)> = option_replies(&t.sent).iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(
        types,
        vec![
            (77, REP_ERR_UNSUP),
            (OPT_GO, REP_ERR_UNKNOWN),
            (OPT_LIST, REP_SERVER),
            (OPT_LIST, REP_ACK),
            (OPT_ABORT, REP_ACK)
        ]
    );
    assert!(!t.transmission);
}

#[test]
fn bad_option_magic_and_oversized_options_close_the_session() {
    let mut c = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    c.extend_from_slice(&[0u8; 16]);
    let t = run_session(Arc::new(MemExport::new("disk", SIZE)), &c);
    assert!(t.closed_because.unwrap().contains("magic"));

    let mut c = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    c.extend_from_slice(&IHAVEOPT.to_be_bytes());
    c.extend_from_slice(&OPT_GO.to_be_bytes());
    c.extend_from_slice(&u32::MAX.to_be_bytes());
    let t = run_session(Arc::new(MemExport::new("disk", SIZE)), &c);
    assert!(t.closed_because.unwrap().contains("limit"));

    let t = run_session(Arc::new(MemExport::new("disk", SIZE)), &0u32.to_be_bytes());
    assert!(t.closed_because.unwrap().contains("fixed-newstyle"));
}

#[test]
fn block_status_needs_the_meta_context() {
    let session = Session {
        export_size: 4096,
        read_only: false,
        structured: true,
        base_allocation: false,
    };
    let h = RequestHeader {
        flags: 0,
        kind: CMD_BLOCK_STATUS,
        cookie: 1,
        offset: 0,
        length: 512,
    };
    assert!(validate(&h, &session).is_err());
    let with = Session {
        base_allocation: true,
        ..session
    };
    assert!(matches!(
        validate(&h, &with),
        Ok(Command::BlockStatus { .. })
    ));
}

#[test]
fn range_and_size_errors_follow_the_spec() {
    let s = Session {
        export_size: 8192,
        read_only: false,
        structured: false,
        base_allocation: false,
    };
    let req = |kind, offset, length| RequestHeader {
        flags: 0,
        kind,
        cookie: 9,
        offset,
        length,
    };
    let code = |h| validate(&h, &s).unwrap_err().code.wire();
    assert_eq!(code(req(CMD_READ, 8192, 1)), 22);
    assert_eq!(code(req(CMD_WRITE, 4096, 8192)), 28);
    assert_eq!(code(req(CMD_WRITE_ZEROES, u64::MAX, 2)), 28);
    assert_eq!(code(req(CMD_TRIM, 1, 8192)), 22);
    assert_eq!(code(req(CMD_READ, 0, MAX_PAYLOAD + 1)), 22);
    assert_eq!(code(req(99, 0, 0)), 22);
    let mut fua_read = req(CMD_READ, 0, 512);
    fua_read.flags = CMD_FLAG_FUA;
    assert_eq!(code(fua_read), 22);
}

/// A client-side view of the transmission replies: (cookie, error, data).
fn parse_replies(
    mut sent: &[u8],
    reads: &std::collections::HashMap<u64, u32>,
) -> Vec<(u64, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((h, n)) = decode_reply_header(sent).unwrap() {
        sent = &sent[n..];
        match h {
            ReplyHeader::Simple { error, cookie } => {
                let len = if error == 0 {
                    reads.get(&cookie).copied().unwrap_or(0) as usize
                } else {
                    0
                };
                out.push((cookie, error, sent[..len].to_vec()));
                sent = &sent[len..];
            }
            ReplyHeader::Chunk {
                kind, cookie, len, ..
            } => {
                let body = &sent[..len as usize];
                let (error, data) = match kind {
                    REPLY_TYPE_OFFSET_DATA => (0, body[8..].to_vec()),
                    REPLY_TYPE_ERROR => {
                        (u32::from_be_bytes(body[0..4].try_into().unwrap()), vec![])
                    }
                    _ => (0, vec![]),
                };
                out.push((cookie, error, data));
                sent = &sent[len as usize..];
            }
        }
    }
    out
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u32),
    Read(u64, u32),
    Bad(u64, u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            0u64..SIZE as u64 - 1,
            proptest::collection::vec(any::<u8>(), 1..600)
        )
            .prop_map(|(o, d)| {
                let n = d.len().min(SIZE - o as usize);
                Op::Write(o, d[..n].to_vec())
            }),
        (0u64..SIZE as u64 - 1, 1u32..5000)
            .prop_map(|(o, l)| Op::Zero(o, l.min((SIZE as u64 - o) as u32))),
        (0u64..SIZE as u64 - 1, 1u32..5000)
            .prop_map(|(o, l)| Op::Read(o, l.min((SIZE as u64 - o) as u32))),
        (SIZE as u64..u64::MAX, any::<u32>()).prop_map(|(o, l)| Op::Bad(o, l % 4096 + 1)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn request_headers_round_trip(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
        let h = RequestHeader { flags, kind, cookie, offset, length };
        let mut buf = Vec::new();
        h.encode(&mut buf);
        prop_assert_eq!(decode_request(&buf).unwrap(), Some(h));
        prop_assert_eq!(decode_request(&buf[..27]).unwrap(), None);
    }

    #[test]
    fn any_bytes_are_handled_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode_request(&bytes);
        let _ = run_session(Arc::new(MemExport::new("disk", SIZE)), &bytes);
        // The same bytes after a valid handshake reach the transmission codec.
        let mut input = hello(true);
        input.extend_from_slice(&bytes);
        let t = run_session(Arc::new(MemExport::new("disk", SIZE)), &input);
        prop_assert!(t.transmission);
    }

    #[test]
    fn a_session_applies_writes_and_reads_them_back(structured: bool, ops in proptest::collection::vec(op(), 1..40)) {
        let export = Arc::new(MemExport::new("disk", SIZE));
        let mut model = vec![0u8; SIZE];
        let mut input = hello(structured);
        let handshake_len = run_session(Arc::clone(&export), &input).sent.len();
        let mut reads = std::collections::HashMap::new();
        let mut expect = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let cookie = i as u64;
            let (kind, offset, length) = match op {
                Op::Write(o, d) => (CMD_WRITE, *o, d.len() as u32),
                Op::Zero(o, l) => (CMD_WRITE_ZEROES, *o, *l),
                Op::Read(o, l) => (CMD_READ, *o, *l),
                Op::Bad(o, l) => (CMD_READ, *o, *l),
            };
            RequestHeader { flags: 0, kind, cookie, offset, length }.encode(&mut input);
            match op {
                Op::Write(o, d) => {
                    input.extend_from_slice(d);
                    model[*o as usize..*o as usize + d.len()].copy_from_slice(d);
                    expect.push((cookie, 0, vec![]));
                }
                Op::Zero(o, l) => {
                    model[*o as usize..(*o + u64::from(*l)) as usize].fill(0);
                    expect.push((cookie, 0, vec![]));
                }
                Op::Read(o, l) => {
                    reads.insert(cookie, *l);
                    expect.push((cookie, 0, model[*o as usize..(*o + u64::from(*l)) as usize].to_vec()));
                }
                Op::Bad(..) => expect.push((cookie, 22, vec![])),
            }
        }
        let t = run_session(Arc::clone(&export), &input);
        prop_assert_eq!(t.requests, ops.len());
        prop_assert!(t.closed_because.is_none());
        let got = parse_replies(&t.sent[handshake_len..], &reads);
        prop_assert_eq!(got, expect);
        prop_assert_eq!(export.contents(), model);
    }
}

/// Where TLS is required, nothing but STARTTLS (and ABORT) gets anywhere
/// before TLS runs; STARTTLS is acknowledged once; after it the usual
/// options work.
#[test]
fn tls_required_refuses_everything_before_starttls() {
    use tandem_nbd::handshake::{Negotiation, Step};
    use tandem_nbd::Catalog;
    struct One(Arc<MemExport>);
    impl Catalog for One {
        fn lookup(&self, _: &str) -> Option<Arc<dyn tandem_nbd::Export>> {
            Some(Arc::clone(&self.0) as Arc<dyn tandem_nbd::Export>)
        }
        fn list(&self) -> Vec<Arc<dyn tandem_nbd::Export>> {
            vec![Arc::clone(&self.0) as Arc<dyn tandem_nbd::Export>]
        }
    }
    let catalog = One(Arc::new(MemExport::new("disk", 1 << 20)));
    let mut n = Negotiation::new(&catalog);
    n.require_tls();
    n.client_flags(FLAG_C_FIXED_NEWSTYLE).unwrap();
    let go = name_and_infos("disk", &[]);
    for opt in [OPT_GO, OPT_INFO, OPT_LIST, OPT_STRUCTURED_REPLY] {
        let mut out = Vec::new();
        let data: &[u8] = if matches!(opt, OPT_GO | OPT_INFO) {
            &go
        } else {
            &[]
        };
        assert!(matches!(n.option(opt, data, &mut out), Ok(Step::Continue)));
        assert_eq!(
            option_replies(&out),
            vec![(
                opt,
                REP_ERR_TLS_REQD,
                b"TLS is required: send NBD_OPT_STARTTLS first".to_vec()
            )]
        );
    }
    let mut out = Vec::new();
    assert!(n.option(OPT_EXPORT_NAME, b"disk", &mut out).is_err());
    let mut out = Vec::new();
    assert!(matches!(
        n.option(OPT_STARTTLS, b"x", &mut out),
        Ok(Step::Continue)
    ));
    assert_eq!(option_replies(&out)[0].1, REP_ERR_INVALID);
    let mut out = Vec::new();
    assert!(matches!(
        n.option(OPT_STARTTLS, &[], &mut out),
        Ok(Step::StartTls)
    ));
    assert_eq!(option_replies(&out)[0].1, REP_ACK);
    n.tls_started();
    let mut out = Vec::new();
    assert!(matches!(
        n.option(OPT_STARTTLS, &[], &mut out),
        Ok(Step::Continue)
    ));
    assert_eq!(option_replies(&out)[0].1, REP_ERR_INVALID);
    let mut out = Vec::new();
    assert!(matches!(
        n.option(OPT_GO, &go, &mut out),
        Ok(Step::Transmit(_))
    ));
    // Without TLS offered, STARTTLS is unsupported.
    let mut plain = Negotiation::new(&catalog);
    plain.client_flags(FLAG_C_FIXED_NEWSTYLE).unwrap();
    let mut out = Vec::new();
    assert!(matches!(
        plain.option(OPT_STARTTLS, &[], &mut out),
        Ok(Step::Continue)
    ));
    assert_eq!(option_replies(&out)[0].1, REP_ERR_UNSUP);
}
