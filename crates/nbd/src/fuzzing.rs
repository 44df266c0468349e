//! A whole NBD session driven from one byte string, with no sockets: the
//! entry point of the fuzz target (`fuzz/fuzz_targets/nbd_session.rs`) and
//! of the codec's property tests. It must never panic or allocate without
//! bound, whatever the bytes.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::ExportError;
use crate::export::{Catalog, Completion, Export, Extent, ZeroFlags};
use crate::handshake::{decode_option_header, Negotiation, Step};
use crate::proto::*;
use crate::transmission::{self as tx, Command, Session};

/// An export held in memory.
pub struct MemExport {
    name: String,
    data: Mutex<Vec<u8>>,
}

impl MemExport {
    pub fn new(name: &str, size: usize) -> MemExport {
        MemExport {
            name: name.to_owned(),
            data: Mutex::new(vec![0; size]),
        }
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().clone()
    }

    /// The server checked the range against the size (a `usize`); a
    /// range past it panics on slicing, never wraps.
    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let at = |x: u64| usize::try_from(x).unwrap_or(usize::MAX);
        at(offset)..at(offset + len)
    }
}

impl Export for MemExport {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.data.lock().len() as u64
    }
    fn multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        buf.copy_from_slice(&self.data.lock()[self.range(offset, buf.len() as u64)]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<Completion, ExportError> {
        self.data.lock()[self.range(offset, data.len() as u64)].copy_from_slice(data);
        Ok(Completion::Done)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _flags: ZeroFlags,
    ) -> Result<Completion, ExportError> {
        self.data.lock()[self.range(offset, len)].fill(0);
        Ok(Completion::Done)
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<Completion, ExportError> {
        self.data.lock()[self.range(offset, len)].fill(0);
        Ok(Completion::Done)
    }
    fn flush(&self) -> Result<Completion, ExportError> {
        Ok(Completion::Deferred(Box::new(|| Ok(()))))
    }
    fn cache(&self, _offset: u64, _len: u64) -> Result<(), ExportError> {
        Ok(())
    }
    fn extents(&self, _offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        Ok(vec![Extent {
            length: u32::try_from(len).unwrap_or(u32::MAX),
            flags: 0,
        }])
    }
}

pub struct MemCatalog(pub Arc<MemExport>);

impl Catalog for MemCatalog {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        (name.is_empty() || name == self.0.name()).then(|| Arc::clone(&self.0) as Arc<dyn Export>)
    }
    fn list(&self) -> Vec<Arc<dyn Export>> {
        vec![Arc::clone(&self.0) as Arc<dyn Export>]
    }
}

/// What a session produced: every byte the server would have sent, and
/// how it ended.
#[derive(Debug, Default)]
pub struct Transcript {
    pub sent: Vec<u8>,
    pub transmission: bool,
    pub requests: usize,
    pub closed_because: Option<String>,
}

/// Runs the server side of a session over `input` as the client's bytes.
pub fn run_session(export: Arc<MemExport>, input: &[u8]) -> Transcript {
    let catalog = MemCatalog(Arc::clone(&export));
    let mut t = Transcript::default();
    let mut rest = input;
    let mut take = |n: usize| -> Option<&[u8]> {
        if rest.len() < n {
            return None;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    };
    let mut negotiation = Negotiation::new(&catalog);
    let Some(flags) = take(4) else { return t };
    if let Err(e) =
        negotiation.client_flags(u32::from_be_bytes([flags[0], flags[1], flags[2], flags[3]]))
    {
        t.closed_because = Some(e.to_string());
        return t;
    }
    let agreement = loop {
        let Some(header) = take(OPTION_HEADER_LEN) else {
            return t;
        };
        let mut h = [0u8; OPTION_HEADER_LEN];
        h.copy_from_slice(header);
        let header = match decode_option_header(&h) {
            Ok(header) => header,
            Err(e) => {
                t.closed_because = Some(e.to_string());
                return t;
            }
        };
        let Some(data) = take(header.len as usize) else {
            return t;
        };
        match negotiation.option(header.option, data, &mut t.sent) {
            Ok(Step::Continue) => {}
            Ok(Step::Close) => return t,
            Ok(Step::Transmit(agreement)) => break agreement,
            Ok(Step::StartTls) => {}
            Err(e) => {
                t.closed_because = Some(e.to_string());
                return t;
            }
        }
    };
    t.transmission = true;
    let session = Session {
        export_size: agreement.export.size(),
        read_only: false,
        structured: agreement.structured,
        base_allocation: agreement.base_allocation,
    };
    loop {
        let Some(bytes) = take(REQUEST_LEN) else {
            return t;
        };
        let header = match tx::decode_request(bytes) {
            Ok(Some(h)) => h,
            Ok(None) => return t,
            Err(e) => {
                t.closed_because = Some(e.to_string());
                return t;
            }
        };
        t.requests += 1;
        let payload = header.payload_len() as usize;
        let command = tx::validate(&header, &session);
        let data = if payload > 0 {
            match take(payload) {
                Some(d) => d,
                None => return t,
            }
        } else {
            &[]
        };
        let export = &agreement.export;
        let result = match command {
            Err(e) => Err(e),
            Ok(Command::Disconnect) => return t,
            Ok(Command::Read { offset, len }) => {
                let mut buf = vec![0u8; len as usize];
                export.read(offset, &mut buf).map(|()| {
                    tx::read_reply_header(
                        &mut t.sent,
                        session.structured,
                        header.cookie,
                        offset,
                        len,
                    );
                    t.sent.extend_from_slice(&buf);
                })
            }
            Ok(Command::Write { offset, fua, .. }) => export.write(offset, data, fua).map(|_| {
                tx::ok_reply(&mut t.sent, header.cookie);
            }),
            Ok(Command::WriteZeroes { offset, len, flags }) => export
                .write_zeroes(offset, u64::from(len), flags)
                .map(|_| tx::ok_reply(&mut t.sent, header.cookie)),
            Ok(Command::Trim { offset, len, fua }) => export
                .trim(offset, u64::from(len), fua)
                .map(|_| tx::ok_reply(&mut t.sent, header.cookie)),
            Ok(Command::Flush) => export
                .flush()
                .map(|_| tx::ok_reply(&mut t.sent, header.cookie)),
            Ok(Command::Cache { offset, len }) => export
                .cache(offset, u64::from(len))
                .map(|()| tx::ok_reply(&mut t.sent, header.cookie)),
            Ok(Command::BlockStatus { offset, len, .. }) => {
                export.extents(offset, u64::from(len)).map(|e| {
                    tx::block_status_reply(&mut t.sent, header.cookie, &e);
                })
            }
        };
        if let Err(e) = result {
            tx::error_reply(&mut t.sent, session.structured, header.cookie, &e);
        }
    }
}

/// The fuzz target's body: any input, no panic.
pub fn fuzz_one(input: &[u8]) {
    let export = Arc::new(MemExport::new("fuzz", 1 << 16));
    let _ = run_session(export, input);
}
