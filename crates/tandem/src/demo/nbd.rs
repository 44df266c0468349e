//! A minimal NBD client for the demo: fixed newstyle handshake
//! (`NBD_OPT_GO`, falling back to `NBD_OPT_EXPORT_NAME`), then one request
//! at a time with simple replies: WRITE, READ, FLUSH, DISC. Wire constants
//! and the request/reply header codecs come from `tandem-nbd`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
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

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("NBD I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD protocol: {0}")]
    Protocol(String),
    #[error("the server refused the export: {0}")]
    Refused(String),
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
            path: path.display().to_string(),
            source,
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut client = NbdClient {
            stream,
            size: 0,
            read_only: false,
            cookie: 0,
        };
        client.handshake(export)?;
        Ok(client)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn handshake(&mut self, export: &str) -> Result<(), NbdError> {
        let mut greeting = [0u8; 18];
        self.stream.read_exact(&mut greeting)?;
        let magic = u64::from_be_bytes(bytes8(&greeting[0..8]));
        let newstyle = u64::from_be_bytes(bytes8(&greeting[8..16]));
        if magic != NBDMAGIC || newstyle != IHAVEOPT {
            return Err(NbdError::Protocol(format!(
                "not a newstyle NBD server (magic {magic:#x}, {newstyle:#x})"
            )));
        }
        let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Protocol(
                "the server does not speak fixed newstyle".into(),
            ));
        }
        let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        self.stream.write_all(&client_flags.to_be_bytes())?;

        // NBD_OPT_GO: name length, name, no information requests.
        let name = export.as_bytes();
        let name_len = u32::try_from(name.len())
            .map_err(|_| NbdError::Protocol("export name too long".into()))?;
        let mut data = Vec::with_capacity(6 + name.len());
        data.extend_from_slice(&name_len.to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &data)?;
        let mut got_export_info = false;
        loop {
            let (reply_type, body) = self.read_option_reply(OPT_GO)?;
            match reply_type {
                REP_INFO
                    if body.len() >= 12
                        && u16::from_be_bytes([body[0], body[1]]) == INFO_EXPORT =>
                {
                    self.size = u64::from_be_bytes(bytes8(&body[2..10]));
                    let flags = u16::from_be_bytes([body[10], body[11]]);
                    self.read_only = flags & TF_READ_ONLY != 0;
                    got_export_info = true;
                }
                REP_ACK => {
                    if !got_export_info {
                        return Err(NbdError::Protocol(
                            "NBD_OPT_GO acknowledged without the export's size".into(),
                        ));
                    }
                    return Ok(());
                }
                REP_ERR_UNSUP => return self.export_name(export, no_zeroes),
                t if t & (1 << 31) != 0 => {
                    return Err(NbdError::Refused(format!(
                        "{} (reply type {t:#x})",
                        String::from_utf8_lossy(&body)
                    )))
                }
                _ => {} // Other replies may be ignored.
            }
        }
    }

    /// The old way to pick an export, for servers without NBD_OPT_GO.
    fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<(), NbdError> {
        self.send_option(OPT_EXPORT_NAME, export.as_bytes())?;
        let mut head = [0u8; 10];
        self.stream.read_exact(&mut head)?;
        self.size = u64::from_be_bytes(bytes8(&head[0..8]));
        let flags = u16::from_be_bytes([head[8], head[9]]);
        self.read_only = flags & TF_READ_ONLY != 0;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            self.stream.read_exact(&mut zeroes)?;
        }
        Ok(())
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Protocol("option data too long".into()))?;
        let mut out = Vec::with_capacity(16 + data.len());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(data);
        self.stream.write_all(&out)?;
        Ok(())
    }

    fn read_option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let mut head = [0u8; 20];
        self.stream.read_exact(&mut head)?;
        let magic = u64::from_be_bytes(bytes8(&head[0..8]));
        let replied_to = u32::from_be_bytes(bytes4(&head[8..12]));
        let reply_type = u32::from_be_bytes(bytes4(&head[12..16]));
        let len = u32::from_be_bytes(bytes4(&head[16..20]));
        if magic != OPTION_REPLY_MAGIC || replied_to != option {
            return Err(NbdError::Protocol(format!(
                "bad option reply (magic {magic:#x}, option {replied_to})"
            )));
        }
        if len > MAX_OPTION_REPLY {
            return Err(NbdError::Protocol(format!(
                "option reply of {len} bytes is too long"
            )));
        }
        let mut body = vec![0u8; len as usize];
        self.stream.read_exact(&mut body)?;
        Ok((reply_type, body))
    }

    /// Writes `data` at `offset`; returns once the server acknowledged it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        if self.read_only {
            return Err(NbdError::Protocol("the export is read-only".into()));
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
        match decode_reply_header(&head) {
            Ok(Some((ReplyHeader::Simple { error, cookie: c }, _))) => {
                if c != cookie {
                    return Err(NbdError::Protocol(format!(
                        "reply for cookie {c}, expected {cookie}"
                    )));
                }
                if error != 0 {
                    return Err(NbdError::Command {
                        command,
                        offset,
                        length,
                        code: error,
                    });
                }
                Ok(())
            }
            Ok(Some((ReplyHeader::Chunk { .. }, _))) => Err(NbdError::Protocol(
                "structured reply without having asked for it".into(),
            )),
            Ok(None) => Err(NbdError::Protocol("short reply header".into())),
            Err(e) => Err(NbdError::Protocol(e.to_string())),
        }
    }
}

fn request_len(len: usize) -> Result<u32, NbdError> {
    if len > MAX_REQUEST {
        return Err(NbdError::Protocol(format!(
            "request of {len} bytes is over {MAX_REQUEST}"
        )));
    }
    u32::try_from(len).map_err(|_| NbdError::Protocol("request too long".into()))
}

fn bytes8(s: &[u8]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&s[..8]);
    b
}

fn bytes4(s: &[u8]) -> [u8; 4] {
    let mut b = [0u8; 4];
    b.copy_from_slice(&s[..4]);
    b
}
