//! A split TLS stream carries data both ways at once: one thread writes
//! while another reads, as the replication shipper does.
#![allow(clippy::unwrap_used)]
#![allow(clippy::cast_possible_truncation)] // pattern bytes keep the low bits on purpose

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use tandem_tls::{certs, PeerStream, TlsIdentity};

fn load(dir: &std::path::Path, site: &str) -> TlsIdentity {
    TlsIdentity::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{site}.pem")),
        &dir.join(format!("{site}.key")),
    )
    .unwrap()
}

#[test]
fn split_tls_halves_carry_data_both_ways_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    certs::create(dir.path(), &["ny".to_string(), "chicago".to_string()]).unwrap();
    let (ny, chicago) = (load(dir.path(), "ny"), load(dir.path(), "chicago"));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    const N: usize = 16 << 20;
    // The server echoes everything back through its own split halves.
    let server = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let stream = PeerStream::accept_tls(tcp, &chicago).unwrap();
        assert_eq!(stream.peer_site().as_deref(), Some("ny"));
        let (mut r, mut w) = stream.split().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        while total < N {
            let n = r.read(&mut buf).unwrap();
            assert!(n > 0, "closed early at {total}");
            w.write_all(&buf[..n]).unwrap();
            total += n;
        }
        w.flush().unwrap();
    });
    let stream =
        PeerStream::connect_tls(TcpStream::connect(addr).unwrap(), &ny, "chicago").unwrap();
    let (mut r, mut w) = stream.split().unwrap();
    let data: Vec<u8> = (0..N).map(|i| (i * 7 + i / 4096) as u8).collect();
    let expected = data.clone();
    let writer = thread::spawn(move || {
        for chunk in data.chunks(100_000) {
            w.write_all(chunk).unwrap();
        }
        w.flush().unwrap();
    });
    let mut got = vec![0u8; N];
    r.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    server.join().unwrap();
    assert!(got == expected, "echoed data differs");
}
