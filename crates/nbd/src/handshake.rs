//! The fixed-newstyle handshake as a state machine over bytes: the driver
//! feeds it the client flags and each option, and writes out the bytes it
//! returns. No I/O happens here.

use std::sync::Arc;

use crate::error::ProtocolError;
use crate::export::{Catalog, Export};
use crate::proto::*;
use crate::wire::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};

/// The 18 bytes the server sends first.
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Header of one option request: `IHAVEOPT`, option code, data length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Decodes a 16-byte option header. The data that follows must be at most
/// [`MAX_OPTION_LEN`] bytes; a longer one ends the connection.
pub fn decode_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtocolError> {
    let magic = get_u64(buf, 0);
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    let header = OptionHeader {
        option: get_u32(buf, 8),
        len: get_u32(buf, 12),
    };
    if header.len > MAX_OPTION_LEN {
        return Err(ProtocolError::OptionTooLarge {
            option: header.option,
            len: header.len,
            max: MAX_OPTION_LEN,
        });
    }
    Ok(header)
}

/// What was agreed for the transmission phase.
#[derive(Clone)]
pub struct Agreement {
    pub export: Arc<dyn Export>,
    pub transmission_flags: u16,
    pub structured: bool,
    /// The client selected `base:allocation` for this export.
    pub base_allocation: bool,
}

impl std::fmt::Debug for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agreement")
            .field("export", &self.export.name())
            .field("transmission_flags", &self.transmission_flags)
            .field("structured", &self.structured)
            .field("base_allocation", &self.base_allocation)
            .finish()
    }
}

/// What the driver does after sending the replies of one option.
#[derive(Debug)]
pub enum Step {
    /// Read the next option.
    Continue,
    /// Enter the transmission phase.
    Transmit(Agreement),
    /// The client ended the session (NBD_OPT_ABORT).
    Close,
    /// Start TLS on the connection now (NBD_OPT_STARTTLS was
    /// acknowledged), then call [`Negotiation::tls_started`] and go on
    /// reading options over TLS.
    StartTls,
}

/// Whether the connection must use TLS (NBD_OPT_STARTTLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tls {
    /// Not offered: STARTTLS is unsupported.
    Off,
    /// Required: every option but STARTTLS and ABORT is refused until TLS
    /// is running.
    Required,
    /// Running.
    Started,
}

/// Server side of option haggling for one connection.
pub struct Negotiation<'a> {
    catalog: &'a dyn Catalog,
    no_zeroes: bool,
    structured: bool,
    /// Export name and whether `base:allocation` was selected by the last
    /// NBD_OPT_SET_META_CONTEXT.
    meta: Option<(String, bool)>,
    shutting_down: bool,
    tls: Tls,
}

impl<'a> Negotiation<'a> {
    pub fn new(catalog: &'a dyn Catalog) -> Self {
        Negotiation {
            catalog,
            no_zeroes: false,
            structured: false,
            meta: None,
            shutting_down: false,
            tls: Tls::Off,
        }
    }

    /// TLS is required on this connection (the server's TLS-only mode of
    /// the NBD protocol).
    pub fn require_tls(&mut self) {
        self.tls = Tls::Required;
    }

    /// The TLS handshake after [`Step::StartTls`] succeeded.
    pub fn tls_started(&mut self) {
        self.tls = Tls::Started;
    }

    /// From now on, options other than ABORT are refused with
    /// NBD_REP_ERR_SHUTDOWN.
    pub fn set_shutting_down(&mut self) {
        self.shutting_down = true;
    }

    /// Checks the client's 32-bit flags word.
    pub fn client_flags(&mut self, flags: u32) -> Result<(), ProtocolError> {
        if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(ProtocolError::NotFixedNewstyle(flags));
        }
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(ProtocolError::UnknownClientFlags(flags));
        }
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    /// Handles one option; replies are appended to `out`.
    pub fn option(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Step, ProtocolError> {
        if self.shutting_down && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Err(ProtocolError::UnknownExport(
                    "(server shutting down)".into(),
                ));
            }
            reply(out, option, REP_ERR_SHUTDOWN, b"server is shutting down");
            return Ok(Step::Continue);
        }
        if option == OPT_STARTTLS {
            match self.tls {
                Tls::Off => reply(out, option, REP_ERR_UNSUP, b"TLS is not offered here"),
                Tls::Started => reply(out, option, REP_ERR_INVALID, b"TLS is already running"),
                Tls::Required if !data.is_empty() => {
                    reply(
                        out,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STARTTLS takes no data",
                    );
                }
                Tls::Required => {
                    reply(out, option, REP_ACK, &[]);
                    return Ok(Step::StartTls);
                }
            }
            return Ok(Step::Continue);
        }
        if self.tls == Tls::Required && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Err(ProtocolError::TlsRequired);
            }
            reply(
                out,
                option,
                REP_ERR_TLS_REQD,
                b"TLS is required: send NBD_OPT_STARTTLS first",
            );
            return Ok(Step::Continue);
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data, out),
            OPT_ABORT => {
                reply(out, option, REP_ACK, &[]);
                Ok(Step::Close)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(out, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                } else {
                    for export in self.catalog.list() {
                        let name = export.name().as_bytes();
                        let Ok(len) = u32::try_from(name.len()) else {
                            continue; // not expressible on the wire
                        };
                        let mut body = Vec::with_capacity(4 + name.len());
                        body.extend_from_slice(&len.to_be_bytes());
                        body.extend_from_slice(name);
                        reply(out, option, REP_SERVER, &body);
                    }
                    reply(out, option, REP_ACK, &[]);
                }
                Ok(Step::Continue)
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(
                        out,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured = true;
                    reply(out, option, REP_ACK, &[]);
                }
                Ok(Step::Continue)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, out);
                Ok(Step::Continue)
            }
            _ => {
                let message = format!("option {option} is not supported");
                reply(out, option, REP_ERR_UNSUP, message.as_bytes());
                Ok(Step::Continue)
            }
        }
    }

    fn export_name(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<Step, ProtocolError> {
        let name = String::from_utf8_lossy(data).into_owned();
        let export = self
            .catalog
            .lookup(&name)
            .ok_or(ProtocolError::UnknownExport(name))?;
        let agreement = self.agreement(export);
        put_u64(out, agreement.export.size());
        put_u16(out, agreement.transmission_flags);
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Ok(Step::Transmit(agreement))
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Step, ProtocolError> {
        let Some((name, requests)) = parse_info_request(data) else {
            reply(
                out,
                option,
                REP_ERR_INVALID,
                b"malformed NBD_OPT_INFO/NBD_OPT_GO data",
            );
            return Ok(Step::Continue);
        };
        let Some(export) = self.catalog.lookup(&name) else {
            let message = format!("no export named {name:?}");
            reply(out, option, REP_ERR_UNKNOWN, message.as_bytes());
            return Ok(Step::Continue);
        };
        let agreement = self.agreement(export);
        let mut info = Vec::with_capacity(16);
        put_u16(&mut info, INFO_EXPORT);
        put_u64(&mut info, agreement.export.size());
        put_u16(&mut info, agreement.transmission_flags);
        reply(out, option, REP_INFO, &info);
        // Block sizes are always sent: any alignment works, 4 KiB is best.
        info.clear();
        put_u16(&mut info, INFO_BLOCK_SIZE);
        put_u32(&mut info, 1);
        put_u32(&mut info, 4096);
        put_u32(&mut info, MAX_PAYLOAD);
        reply(out, option, REP_INFO, &info);
        for request in requests {
            let text = match request {
                INFO_NAME => agreement.export.name().to_owned(),
                INFO_DESCRIPTION => agreement.export.description(),
                _ => continue,
            };
            if request == INFO_DESCRIPTION && text.is_empty() {
                continue;
            }
            info.clear();
            put_u16(&mut info, request);
            info.extend_from_slice(truncate_utf8(&text, MAX_STRING).as_bytes());
            reply(out, option, REP_INFO, &info);
        }
        reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            Ok(Step::Transmit(agreement))
        } else {
            Ok(Step::Continue)
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) {
        if option == OPT_SET_META_CONTEXT {
            // Every SET replaces the previous selection, even when it fails.
            self.meta = None;
        }
        if !self.structured {
            reply(
                out,
                option,
                REP_ERR_INVALID,
                b"negotiate structured replies first",
            );
            return;
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            reply(
                out,
                option,
                REP_ERR_INVALID,
                b"malformed meta context request",
            );
            return;
        };
        let Some(export) = self.catalog.lookup(&name) else {
            let message = format!("no export named {name:?}");
            reply(out, option, REP_ERR_UNKNOWN, message.as_bytes());
            return;
        };
        let selects = |q: &str| {
            q == META_BASE_ALLOCATION || (option == OPT_LIST_META_CONTEXT && q == "base:")
        };
        let chosen = if option == OPT_LIST_META_CONTEXT && queries.is_empty() {
            true
        } else {
            queries.iter().any(|q| selects(q))
        };
        if chosen {
            let id = if option == OPT_SET_META_CONTEXT {
                META_ID_BASE_ALLOCATION
            } else {
                0
            };
            let mut body = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
            put_u32(&mut body, id);
            body.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            reply(out, option, REP_META_CONTEXT, &body);
        }
        if option == OPT_SET_META_CONTEXT {
            self.meta = Some((export.name().to_owned(), chosen));
        }
        reply(out, option, REP_ACK, &[]);
    }

    fn agreement(&self, export: Arc<dyn Export>) -> Agreement {
        let mut flags = TF_HAS_FLAGS
            | TF_SEND_FLUSH
            | TF_SEND_FUA
            | TF_SEND_TRIM
            | TF_SEND_WRITE_ZEROES
            | TF_SEND_CACHE
            | TF_SEND_FAST_ZERO;
        if export.read_only() {
            flags |= TF_READ_ONLY;
        }
        if export.multi_conn() {
            flags |= TF_CAN_MULTI_CONN;
        }
        if self.structured {
            // Reads are always answered in one chunk, so DF is free.
            flags |= TF_SEND_DF;
        }
        let base_allocation =
            self.structured && matches!(&self.meta, Some((name, true)) if name == export.name());
        Agreement {
            export,
            transmission_flags: flags,
            structured: self.structured,
            base_allocation,
        }
    }
}

/// Appends one option reply. `data` is small: names, messages and info
/// blocks built from strings of at most [`MAX_STRING`] bytes or from an
/// option's data (at most [`MAX_OPTION_LEN`] bytes).
pub fn reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    put_u64(out, OPTION_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, reply_type);
    #[allow(clippy::cast_possible_truncation)] // well under 4 GiB (above)
    put_u32(out, data.len() as u32);
    out.extend_from_slice(data);
}

/// Splits INFO/GO data into the export name and the information requests.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let (name, rest) = take_string(data)?;
    if rest.len() < 2 {
        return None;
    }
    let count = get_u16(rest, 0) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return None;
    }
    let requests = (0..count).map(|i| get_u16(list, i * 2)).collect();
    Some((name, requests))
}

/// Splits LIST/SET_META_CONTEXT data into the export name and the queries.
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let (name, mut rest) = take_string(data)?;
    if rest.len() < 4 {
        return None;
    }
    let count = get_u32(rest, 0) as usize;
    rest = &rest[4..];
    // Each query needs at least 4 bytes: a lying count cannot allocate.
    let mut queries = Vec::with_capacity(count.min(rest.len() / 4));
    for _ in 0..count {
        let (query, tail) = take_string(rest)?;
        queries.push(query);
        rest = tail;
    }
    rest.is_empty().then_some((name, queries))
}

/// A length-prefixed string of at most [`MAX_STRING`] bytes.
fn take_string(data: &[u8]) -> Option<(String, &[u8])> {
    if data.len() < 4 {
        return None;
    }
    let len = get_u32(data, 0) as usize;
    if len > MAX_STRING || data.len() - 4 < len {
        return None;
    }
    let text = std::str::from_utf8(&data[4..4 + len]).ok()?;
    Some((text.to_owned(), &data[4 + len..]))
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
