//! A minimal NBD client for the demo: fixed newstyle handshake
//! (`NBD_OPT_GO`, falling back to `NBD_OPT_EXPORT_NAME`), then one request
//! at a time with simple replies: WRITE, READ, FLUSH, DISC. Wire constants
//! and the request/reply header codecs come from `tandem-nbd`; what the
//! server sends is decoded by the functions at the bottom, on bytes, which
//! return errors and never panic, whatever the bytes.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_nbd::proto::{
    CMD_DISC, CMD_FLUSH, CMD_READ, CMD_WRITE, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_EXPORT, NBDMAGIC, OPTION_REPLY_MAGIC,
    OPT_EXPORT_NAME, OPT_GO, REP_ACK, REP_ERR_UNSUP, REP_INFO, SIMPLE_REPLY_LEN, TF_READ_ONLY,
};
use tandem_nbd::transmission::{decode_reply_header, ReplyHeader, RequestHeader};

/// Longest option reply this client accepts (servers send a few bytes).
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Largest single request this client sends (the server's limit is 32 MiB).
pub const MAX_REQUEST: usize = 8 << 20;
const GREETING_LEN: usize = 18;
const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size and transmission flags, the answer to `NBD_OPT_EXPORT_NAME`.
const EXPORT_NAME_REPLY_LEN: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("NBD I/O failed")]
    Io(#[from] io::Error),
    #[error("not a newstyle NBD server (magic {magic:#x}, {newstyle:#x})")]
    NotNewstyle { magic: u64, newstyle: u64 },
    #[error("the server does not speak fixed newstyle")]
    NotFixedNewstyle,
    #[error("bad option reply (magic {magic:#x}, option {option}, expected option {expected})")]
    BadOptionReply {
        magic: u64,
        option: u32,
        expected: u32,
    },
    #[error("option reply of {len} bytes is too long")]
    OptionReplyTooLong { len: u32 },
    #[error("NBD_OPT_GO acknowledged without the export's size")]
    NoExportInfo,
    #[error("the server refused the export: {message} (reply type {reply_type:#x})")]
    Refused { reply_type: u32, message: String },
    #[error("the export name is too long")]
    NameTooLong,
    #[error("the export is read-only")]
    ReadOnly,
    #[error("request of {len} bytes is over {MAX_REQUEST}")]
    RequestTooLarge { len: usize },
    #[error("reply for cookie {found}, expected {expected}")]
    WrongCookie { found: u64, expected: u64 },
    #[error("structured reply without having asked for it")]
    StructuredReply,
    #[error("bad reply header")]
    BadReply(#[source] tandem_nbd::ProtocolError),
    #[error("short reply header")]
    ShortReply,
    #[error("{command} of {length} bytes at {offset} failed with NBD error {code}")]
    Command {
        command: &'static str,
        offset: u64,
        length: u32,
        code: u32,
    },
}

/// One connection to one export, in the transmission phase.
pub struct NbdClient {
    stream: UnixStream,
    size: u64,
    read_only: bool,
    cookie: u64,
}

impl NbdClient {
    /// Connects to the Unix socket `path` and selects `export`. Every read
    /// and write on the socket gives up after `timeout`.
    pub fn connect(path: &Path, export: &str, timeout: Duration) -> Result<NbdClient, NbdError> {
        let stream = UnixStream::connect(path).map_err(|source| NbdError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        NbdClient::handshake(stream, export, timeout)
    }

    /// Selects `export` on a stream connected to a server that has not
    /// greeted yet.
    pub fn handshake(
        stream: UnixStream,
        export: &str,
        timeout: Duration,
    ) -> Result<NbdClient, NbdError> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut client = NbdClient {
            stream,
            size: 0,
            read_only: false,
            cookie: 0,
        };
        client.negotiate(export)?;
        Ok(client)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn negotiate(&mut self, export: &str) -> Result<(), NbdError> {
        let mut greeting = [0u8; GREETING_LEN];
        self.stream.read_exact(&mut greeting)?;
        let no_zeroes = decode_greeting(&greeting)?;
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        self.stream.write_all(&client_flags.to_be_bytes())?;

        // NBD_OPT_GO: name length, name, no information requests.
        let name = export.as_bytes();
        let name_len = u32::try_from(name.len()).map_err(|_| NbdError::NameTooLong)?;
        let mut data = Vec::with_capacity(6 + name.len());
        data.extend_from_slice(&name_len.to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &data)?;
        let mut got_export_info = false;
        loop {
            let (reply_type, body) = self.read_option_reply(OPT_GO)?;
            match reply_type {
                REP_INFO => {
                    if let Some((size, flags)) = decode_export_info(&body) {
                        self.size = size;
                        self.read_only = flags & TF_READ_ONLY != 0;
                        got_export_info = true;
                    }
                }
                REP_ACK => {
                    if !got_export_info {
                        return Err(NbdError::NoExportInfo);
                    }
                    return Ok(());
                }
                REP_ERR_UNSUP => return self.export_name(export, no_zeroes),
                t if t & (1 << 31) != 0 => {
                    return Err(NbdError::Refused {
                        reply_type: t,
                        message: String::from_utf8_lossy(&body).into_owned(),
                    })
                }
                _ => {} // Other replies may be ignored.
            }
        }
    }

    /// The old way to pick an export, for servers without NBD_OPT_GO.
    fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<(), NbdError> {
        self.send_option(OPT_EXPORT_NAME, export.as_bytes())?;
        let mut head = [0u8; EXPORT_NAME_REPLY_LEN];
        self.stream.read_exact(&mut head)?;
        let (size, flags) = decode_export_name_reply(&head);
        self.size = size;
        self.read_only = flags & TF_READ_ONLY != 0;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            self.stream.read_exact(&mut zeroes)?;
        }
        Ok(())
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let len = u32::try_from(data.len()).map_err(|_| NbdError::NameTooLong)?;
        let mut out = Vec::with_capacity(16 + data.len());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(data);
        self.stream.write_all(&out)?;
        Ok(())
    }

    fn read_option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let mut head = [0u8; OPTION_REPLY_HEADER_LEN];
        self.stream.read_exact(&mut head)?;
        let (reply_type, len) = decode_option_reply_header(&head, option)?;
        let mut body = vec![0u8; len as usize];
        self.stream.read_exact(&mut body)?;
        Ok((reply_type, body))
    }

    /// Writes `data` at `offset`; returns once the server acknowledged it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        if self.read_only {
            return Err(NbdError::ReadOnly);
        }
        let length = request_len(data.len())?;
        let cookie = self.send(CMD_WRITE, offset, length, data)?;
        self.reply("WRITE", cookie, offset, length)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let length = request_len(buf.len())?;
        let cookie = self.send(CMD_READ, offset, length, &[])?;
        self.reply("READ", cookie, offset, length)?;
        self.stream.read_exact(buf)?;
        Ok(())
    }

    /// Makes every acknowledged write durable on the server.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        let cookie = self.send(CMD_FLUSH, 0, 0, &[])?;
        self.reply("FLUSH", cookie, 0, 0)
    }

    /// Ends the session politely (NBD_CMD_DISC has no reply).
    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, &[]);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn send(
        &mut self,
        kind: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<u64, NbdError> {
        self.cookie += 1;
        let header = RequestHeader {
            flags: 0,
            kind,
            cookie: self.cookie,
            offset,
            length,
        };
        let mut out = Vec::with_capacity(28 + payload.len());
        header.encode(&mut out);
        out.extend_from_slice(payload);
        self.stream.write_all(&out)?;
        Ok(self.cookie)
    }

    fn reply(
        &mut self,
        command: &'static str,
        cookie: u64,
        offset: u64,
        length: u32,
    ) -> Result<(), NbdError> {
        let mut head = [0u8; SIMPLE_REPLY_LEN];
        self.stream.read_exact(&mut head)?;
        match decode_simple_reply(&head, cookie)? {
            0 => Ok(()),
            code => Err(NbdError::Command {
                command,
                offset,
                length,
                code,
            }),
        }
    }
}

fn request_len(len: usize) -> Result<u32, NbdError> {
    if len > MAX_REQUEST {
        return Err(NbdError::RequestTooLarge { len });
    }
    u32::try_from(len).map_err(|_| NbdError::RequestTooLarge { len })
}

/// Big-endian fields read off the front of a byte slice.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_be_bytes)
    }
}

/// The server's greeting: whether it will omit the 124 zeroes after
/// `NBD_OPT_EXPORT_NAME`.
fn decode_greeting(greeting: &[u8; GREETING_LEN]) -> Result<bool, NbdError> {
    let mut f = Fields(greeting);
    let (magic, newstyle, flags) = (f.u64(), f.u64(), f.u16());
    let (Some(magic), Some(newstyle), Some(flags)) = (magic, newstyle, flags) else {
        return Err(NbdError::ShortReply);
    };
    if magic != NBDMAGIC || newstyle != IHAVEOPT {
        return Err(NbdError::NotNewstyle { magic, newstyle });
    }
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::NotFixedNewstyle);
    }
    Ok(flags & FLAG_NO_ZEROES != 0)
}

/// An option reply's header: its type and the length of its data, which
/// this client is willing to read.
fn decode_option_reply_header(
    head: &[u8; OPTION_REPLY_HEADER_LEN],
    option: u32,
) -> Result<(u32, u32), NbdError> {
    let mut f = Fields(head);
    let (magic, replied_to, reply_type, len) = (f.u64(), f.u32(), f.u32(), f.u32());
    let (Some(magic), Some(replied_to), Some(reply_type), Some(len)) =
        (magic, replied_to, reply_type, len)
    else {
        return Err(NbdError::ShortReply);
    };
    if magic != OPTION_REPLY_MAGIC || replied_to != option {
        return Err(NbdError::BadOptionReply {
            magic,
            option: replied_to,
            expected: option,
        });
    }
    if len > MAX_OPTION_REPLY {
        return Err(NbdError::OptionReplyTooLong { len });
    }
    Ok((reply_type, len))
}

/// An `NBD_REP_INFO` body: the export's size and transmission flags if it
/// is `NBD_INFO_EXPORT`; other information is ignored.
fn decode_export_info(body: &[u8]) -> Option<(u64, u16)> {
    let mut f = Fields(body);
    if f.u16()? != INFO_EXPORT {
        return None;
    }
    Some((f.u64()?, f.u16()?))
}

/// The answer to `NBD_OPT_EXPORT_NAME`: size and transmission flags.
fn decode_export_name_reply(head: &[u8; EXPORT_NAME_REPLY_LEN]) -> (u64, u16) {
    let [s0, s1, s2, s3, s4, s5, s6, s7, f0, f1] = *head;
    (
        u64::from_be_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        u16::from_be_bytes([f0, f1]),
    )
}

/// A simple reply's header to the request `cookie`: its error value.
fn decode_simple_reply(head: &[u8; SIMPLE_REPLY_LEN], cookie: u64) -> Result<u32, NbdError> {
    match decode_reply_header(head) {
        Ok(Some((ReplyHeader::Simple { error, cookie: c }, _))) => {
            if c != cookie {
                return Err(NbdError::WrongCookie {
                    found: c,
                    expected: cookie,
                });
            }
            Ok(error)
        }
        Ok(Some((ReplyHeader::Chunk { .. }, _))) => Err(NbdError::StructuredReply),
        Ok(None) => Err(NbdError::ShortReply),
        Err(e) => Err(NbdError::BadReply(e)),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tandem_nbd::proto::{SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};

    use super::*;

    fn greeting(magic: u64, flags: u16) -> [u8; GREETING_LEN] {
        let mut g = [0u8; GREETING_LEN];
        g[..8].copy_from_slice(&magic.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..].copy_from_slice(&flags.to_be_bytes());
        g
    }

    #[test]
    fn greetings() {
        let both = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
        assert!(decode_greeting(&greeting(NBDMAGIC, both)).expect("valid"));
        assert!(!decode_greeting(&greeting(NBDMAGIC, FLAG_FIXED_NEWSTYLE)).expect("valid"));
        assert!(matches!(
            decode_greeting(&greeting(NBDMAGIC, 0)),
            Err(NbdError::NotFixedNewstyle)
        ));
        assert!(matches!(
            decode_greeting(&greeting(1, both)),
            Err(NbdError::NotNewstyle { magic: 1, .. })
        ));
    }

    #[test]
    fn option_replies() {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        h[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        h[12..16].copy_from_slice(&REP_INFO.to_be_bytes());
        h[16..].copy_from_slice(&12u32.to_be_bytes());
        assert_eq!(
            decode_option_reply_header(&h, OPT_GO).expect("valid"),
            (REP_INFO, 12)
        );
        assert!(matches!(
            decode_option_reply_header(&h, OPT_EXPORT_NAME),
            Err(NbdError::BadOptionReply { .. })
        ));
        h[16..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_option_reply_header(&h, OPT_GO),
            Err(NbdError::OptionReplyTooLong { len: u32::MAX })
        ));
    }

    #[test]
    fn export_info() {
        let mut body = INFO_EXPORT.to_be_bytes().to_vec();
        body.extend_from_slice(&(256u64 << 20).to_be_bytes());
        body.extend_from_slice(&TF_READ_ONLY.to_be_bytes());
        assert_eq!(decode_export_info(&body), Some((256 << 20, TF_READ_ONLY)));
        // Truncated, or another kind of information: ignored.
        assert_eq!(decode_export_info(&body[..11]), None);
        assert_eq!(decode_export_info(&[0, 9, 1, 2]), None);
        assert_eq!(decode_export_info(&[]), None);
    }

    #[test]
    fn simple_replies() {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&5u32.to_be_bytes());
        h[8..].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(decode_simple_reply(&h, 7).expect("valid"), 5);
        assert!(matches!(
            decode_simple_reply(&h, 8),
            Err(NbdError::WrongCookie {
                found: 7,
                expected: 8
            })
        ));
        h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert!(decode_simple_reply(&h, 7).is_err());
        h[..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
        assert!(matches!(
            decode_simple_reply(&h, 7),
            Err(NbdError::BadReply(_))
        ));
    }

    /// A server that greets with garbage is an error, not a hang or panic.
    #[test]
    fn a_bad_server_is_an_error() {
        let (client, mut server) = UnixStream::pair().expect("socketpair");
        let talker = std::thread::spawn(move || {
            let _ = server.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        });
        let result = NbdClient::handshake(client, "x", Duration::from_secs(5));
        assert!(matches!(result, Err(NbdError::NotNewstyle { .. })));
        talker.join().expect("server thread");
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut greeting = [0u8; GREETING_LEN];
            let mut option = [0u8; OPTION_REPLY_HEADER_LEN];
            let mut simple = [0u8; SIMPLE_REPLY_LEN];
            let mut export = [0u8; EXPORT_NAME_REPLY_LEN];
            for buf in [&mut greeting[..], &mut option[..], &mut simple[..], &mut export[..]] {
                let n = buf.len().min(bytes.len());
                buf[..n].copy_from_slice(&bytes[..n]);
            }
            let _ = decode_greeting(&greeting);
            let _ = decode_option_reply_header(&option, OPT_GO);
            let _ = decode_simple_reply(&simple, 1);
            let _ = decode_export_name_reply(&export);
            let _ = decode_export_info(&bytes);
        }
    }
}
